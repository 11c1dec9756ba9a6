use std::sync::mpsc::sync_channel;
use std::time::Instant;
fn run(bufsize: usize, nbuf: usize, total: usize) -> f64 {
    let src = vec![3u8; bufsize];
    let (full_tx, full_rx) = sync_channel::<Box<[u8]>>(nbuf);
    let (free_tx, free_rx) = sync_channel::<Box<[u8]>>(nbuf);
    for _ in 0..nbuf {
        free_tx.send(vec![0u8; bufsize].into_boxed_slice()).unwrap();
    }
    let t = Instant::now();
    let c = std::thread::spawn(move || {
        let mut h = firn_derivation::Hasher::new(firn_derivation::HashAlgo::Sha256);
        for b in full_rx {
            h.update(&b);
            let _ = free_tx.send(b);
        }
        h.finish()
    });
    for _ in 0..total / bufsize {
        let mut b = free_rx.recv().unwrap();
        b.copy_from_slice(&src);
        full_tx.send(b).unwrap();
    }
    drop(full_tx);
    c.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}
fn main() {
    for (bs, n) in [
        (64 << 10, 16),
        (256 << 10, 4),
        (256 << 10, 8),
        (256 << 10, 32),
        (1 << 20, 4),
        (4 << 20, 3),
    ] {
        println!("{}K x {}: {:.2} GB/s", bs >> 10, n, run(bs, n, 1 << 30));
    }
}
