//! Parse and print throughput on real `.drv` files (from `fixtures/`, made by Nix 2.8):
//! a nixpkgs-stdenv-like derivation with ~10 KB of env, a small one, and one with many
//! escapes. Run: `cargo bench -p firn-derivation --bench aterm`.

use std::fs;
use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use firn_derivation::{name_from_drv_base_name, parse_derivation, StoreDir};

fn fixture(case: &str) -> (String, Vec<u8>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/cases")
        .join(case);
    let top = fs::read_to_string(dir.join("drvPath")).expect("fixture drvPath");
    let base = top.trim().rsplit('/').next().unwrap_or_default().to_owned();
    let text = fs::read(dir.join("drv").join(&base)).expect("fixture .drv");
    (base, text)
}

fn bench(c: &mut Criterion) {
    let sd = StoreDir::default();
    for case in ["extra-stdenvLike", "single", "escapes"] {
        let (base, text) = fixture(case);
        let name = name_from_drv_base_name(&base).to_owned();
        let mut g = c.benchmark_group(case);
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function("parse", |b| {
            b.iter(|| parse_derivation(&sd, black_box(&text), &name).map(|d| d.env.len()))
        });
        let drv = parse_derivation(&sd, &text, &name).expect("fixture parses");
        let mut out = Vec::with_capacity(text.len());
        g.bench_function("print", |b| {
            b.iter(|| {
                out.clear();
                black_box(&drv)
                    .write_aterm(&sd, &mut out)
                    .map(|()| out.len())
            })
        });
        g.bench_function("drv_path", |b| b.iter(|| black_box(&drv).drv_path(&sd)));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
