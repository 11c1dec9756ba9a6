use std::time::Instant;
fn main() {
    let root = std::path::Path::new(&std::env::args().nth(1).unwrap()).to_path_buf();
    let subs: Vec<String> = std::env::args().skip(2).collect();
    let subs = if subs.is_empty() {
        vec![String::new()]
    } else {
        subs
    };
    for sub in subs {
        let p = if sub.is_empty() {
            root.clone()
        } else {
            root.join(&sub)
        };
        let _ = firn_store::nar::dump_path(&p, &mut std::io::sink());
        let mut best = [f64::MAX; 3];
        let mut size = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let mut n = 0u64;
            struct C<'a>(&'a mut u64);
            impl std::io::Write for C<'_> {
                fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                    *self.0 += b.len() as u64;
                    Ok(b.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            firn_store::nar::dump_path(&p, &mut C(&mut n)).unwrap();
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut h = firn_store::nar::HashSink::new();
            firn_store::nar::dump_path(&p, &mut h).unwrap();
            best[1] = best[1].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let (_, sz) = firn_store::nar::hash_path(&p).unwrap();
            best[2] = best[2].min(t.elapsed().as_secs_f64());
            size = sz;
        }
        let g = |d: f64| size as f64 / d / 1e9;
        println!(
            "{sub:8} {} MB: dump-only {:.2} GB/s, hash sequential {:.2} GB/s, hash_path {:.2} GB/s",
            size / 1000000,
            g(best[0]),
            g(best[1]),
            g(best[2])
        );
    }
}
