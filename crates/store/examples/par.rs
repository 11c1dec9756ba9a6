use std::time::Instant;
fn hash(n: usize) -> f64 {
    let buf = vec![7u8; 256 << 10];
    let t = Instant::now();
    let mut h = firn_derivation::Hasher::new(firn_derivation::HashAlgo::Sha256);
    for _ in 0..n {
        h.update(&buf);
    }
    let _ = h.finish();
    n as f64 * 262144.0 / t.elapsed().as_secs_f64() / 1e9
}
fn main() {
    println!("one thread: {:.2} GB/s", hash(2000));
    let t = std::thread::spawn(|| hash(2000));
    let a = hash(2000);
    println!("two threads: {:.2} + {:.2} GB/s", a, t.join().unwrap());
    // memcpy-only thread alongside hashing
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        let src = vec![1u8; 256 << 10];
        let mut dst = vec![0u8; 256 << 10];
        let mut n = 0u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            dst.copy_from_slice(&src);
            n += 1;
            std::hint::black_box(&dst);
        }
        n
    });
    let a = hash(2000);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = t.join();
    println!("hash with memcpy neighbour: {:.2} GB/s", a);
}
