fn main() {
    let p = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    for _ in 0..n {
        firn_store::nar::dump_path(&p, &mut std::io::sink()).unwrap();
    }
}
