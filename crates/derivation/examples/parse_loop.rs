//! Parse (or print) one `.drv` file N times, for `perf stat`: cycles per byte are
//! steadier than wall time on a shared machine.
//! `cargo run --release -p firn-derivation --example parse_loop -- FILE N [print]`

use std::hint::black_box;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(file), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: parse_loop FILE N [print]");
        std::process::exit(2);
    };
    let text = std::fs::read(file).expect("read the .drv");
    let sd = firn_derivation::StoreDir::default();
    let base = file.rsplit('/').next().unwrap_or_default();
    let name = firn_derivation::name_from_drv_base_name(base);
    let drv = firn_derivation::parse_derivation(&sd, &text, name).expect("parse");
    let t = std::time::Instant::now();
    if args.get(3).is_some_and(|a| a == "print") {
        let mut out = Vec::new();
        for _ in 0..n {
            out.clear();
            black_box(&drv).write_aterm(&sd, &mut out).expect("print");
        }
    } else {
        for _ in 0..n {
            black_box(
                firn_derivation::parse_derivation(&sd, black_box(&text), name)
                    .map(|d| d.env.len())
                    .ok(),
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:.0} MB/s ({} bytes x {n})",
        (text.len() * n) as f64 / secs / 1e6,
        text.len()
    );
}
