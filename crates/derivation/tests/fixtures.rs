//! Every fixture produced by real Nix 2.8 (`fixtures/regen.sh` and the reference
//! vectors): parse, print back byte for byte, recompute the `.drv` path and the output
//! paths from scratch, and show as Nix's JSON, byte for byte. Crafted malformed files
//! are accepted or rejected exactly as Nix 2.8 does.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use firn_derivation::{
    name_from_drv_base_name, parse_derivation, parse_show_derivation, write_show_derivation,
    Derivation, DerivationOutput, ModuloCache, ModuloError, StoreDir, StorePath,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn case_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for parent in ["cases", "nix-2.8-vectors/cases"] {
        for e in fs::read_dir(fixtures().join(parent)).unwrap() {
            dirs.push(e.unwrap().path());
        }
    }
    dirs.sort();
    assert!(
        dirs.len() >= 60,
        "fixtures missing: {} case dirs",
        dirs.len()
    );
    dirs
}

/// All `.drv` files of a case, by store path.
fn load_drvs(dir: &Path) -> BTreeMap<StorePath, Vec<u8>> {
    let sd = StoreDir::default();
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir.join("drv")).unwrap() {
        let p = e.unwrap().path();
        let base = p.file_name().unwrap().to_str().unwrap().to_owned();
        let sp = sd.parse(&format!("/nix/store/{base}")).unwrap();
        out.insert(sp, fs::read(&p).unwrap());
    }
    out
}

fn parse<'a>(path: &StorePath, text: &'a [u8]) -> Derivation<'a> {
    let name = name_from_drv_base_name(path.base_name());
    parse_derivation(&StoreDir::default(), text, name).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn show(entries: &[(String, &Derivation<'_>)]) -> Vec<u8> {
    let mut out = Vec::new();
    write_show_derivation(
        &StoreDir::default(),
        entries.iter().map(|(k, d)| (k.as_str(), *d)),
        &mut out,
    )
    .unwrap();
    out
}

/// Compare bytes, showing them as text when they differ.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        assert_eq!(
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want),
            "{what}"
        );
        panic!("{what}: bytes differ outside UTF-8");
    }
}

#[test]
fn every_drv_roundtrips_and_hashes_to_its_name() {
    let sd = StoreDir::default();
    let mut n = 0;
    for dir in case_dirs() {
        for (path, text) in load_drvs(&dir) {
            let drv = parse(&path, &text);
            assert_eq!(
                drv.to_aterm(&sd).unwrap(),
                text,
                "{path}: printed bytes differ"
            );
            assert_eq!(drv.drv_path(&sd).unwrap(), path, "{path}: own path differs");
            n += 1;
        }
    }
    assert!(n >= 120, "only {n} .drv files");
}

#[test]
fn output_paths_recompute_from_scratch() {
    let sd = StoreDir::default();
    for dir in case_dirs() {
        let drvs = load_drvs(&dir);
        let mut cache = ModuloCache::new();
        let mut load = |p: &StorePath| -> Result<Derivation<'static>, String> {
            let text = drvs.get(p).ok_or_else(|| format!("{p} not in fixture"))?;
            Ok(parse(p, text).into_owned())
        };
        for (path, text) in &drvs {
            let drv = parse(path, text);
            let mut lookup = |p: &StorePath| cache.get(&sd, p, &mut load);
            drv.check_output_paths(&sd, path, &mut lookup)
                .unwrap_or_else(|e: ModuloError<ModuloError<String>>| panic!("{path}: {e}"));

            // Forget every computed path (as the evaluator starts), then fill them in.
            let mut blank = drv.clone();
            for (name, out) in blank.outputs.iter_mut() {
                if matches!(out, DerivationOutput::InputAddressed(_)) {
                    *out = DerivationOutput::Deferred;
                    blank.env.insert(name.clone(), Vec::new().into());
                }
            }
            blank
                .fill_output_paths(&sd, &mut lookup)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(
                blank.to_aterm(&sd).unwrap(),
                *text,
                "{path}: filled-in paths differ"
            );
        }
        // outputs.json (reference vectors) lists the top derivation's output paths.
        if let Ok(outputs) = fs::read_to_string(dir.join("outputs.json")) {
            let top = fs::read_to_string(dir.join("drvPath")).unwrap();
            let top = sd.parse(top.trim()).unwrap();
            let drv = parse(&top, &drvs[&top]);
            for (name, p) in drv.output_paths(&sd).unwrap() {
                let needle = format!(
                    "\"{}\": \"{}\"",
                    String::from_utf8_lossy(&name),
                    sd.display(&p)
                );
                assert!(outputs.contains(&needle), "{}: {needle}", dir.display());
            }
        }
    }
}

#[test]
fn show_derivation_json_is_byte_exact() {
    let sd = StoreDir::default();
    for dir in case_dirs() {
        let drvs = load_drvs(&dir);
        let parsed: BTreeMap<&StorePath, Derivation<'_>> =
            drvs.iter().map(|(p, t)| (p, parse(p, t))).collect();
        let top = fs::read_to_string(dir.join("drvPath")).unwrap();
        let top = sd.parse(top.trim()).unwrap();
        let want = fs::read(dir.join("show-derivation.json")).unwrap();
        let got = show(&[(sd.display(&top), &parsed[&top])]);
        assert_same(&got, &want, &dir.display().to_string());

        let want = fs::read(dir.join("show-derivation-recursive.json")).unwrap();
        let all: Vec<(String, &Derivation<'_>)> =
            parsed.iter().map(|(p, d)| (sd.display(p), d)).collect();
        assert_same(
            &show(&all),
            &want,
            &format!("{} (recursive)", dir.display()),
        );

        // And back: the JSON reads to the same derivations and the same .drv bytes.
        let back = parse_show_derivation(&sd, &want).unwrap();
        assert_eq!(back.len(), parsed.len());
        for (key, drv) in back {
            let key = sd.parse(key.as_deref().unwrap()).unwrap();
            assert_eq!(drv, parsed[&key].clone().into_owned(), "{key}");
            assert_eq!(drv.to_aterm(&sd).unwrap(), drvs[&key], "{key}");
        }
    }
}

/// What firn must say where Nix's message is not a good guide (it loops or needs a
/// feature flag); otherwise firn's message must contain Nix's.
fn expected_firn_message(name: &str, nix_err: &str) -> String {
    match name {
        "unterminated-string" | "unterminated-escape" => "unterminated string".into(),
        "fod-base64url" => "invalid character '_' in base-64 string".into(),
        _ => {
            let first = nix_err.lines().next().unwrap_or_default();
            let msg = first.rsplit("error: ").next().unwrap_or_default();
            msg.replace("expected string ", "expected ")
                .replace('\u{fffd}', "\\xc3")
        }
    }
}

#[test]
fn malformed_files_are_judged_as_nix_does() {
    let sd = StoreDir::default();
    let dir = fixtures().join("malformed");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "drv").then(|| p.file_stem().unwrap().to_str().unwrap().to_owned())
        })
        .collect();
    names.sort();
    assert!(names.len() >= 50, "only {} malformed fixtures", names.len());
    let (mut accepted, mut rejected) = (0, 0);
    for name in names {
        let text = fs::read(dir.join(format!("{name}.drv"))).unwrap();
        let key = fs::read_to_string(dir.join(format!("{name}.path"))).unwrap();
        let key = key.trim();
        let rc: i32 = fs::read_to_string(dir.join(format!("{name}.nix.rc")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let base = key.rsplit('/').next().unwrap();
        let result = parse_derivation(&sd, &text, name_from_drv_base_name(base));
        if name == "floating-ca" {
            // Nix refuses it when reading, without `ca-derivations`; firn reads it and
            // refuses to build it without the feature (the type says which).
            let drv = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            let ty = drv.derivation_type().unwrap();
            assert_eq!(ty.required_feature(), Some("ca-derivations"), "{name}");
            rejected += 1;
            continue;
        }
        if rc == 0 {
            let drv = result.unwrap_or_else(|e| panic!("{name}: Nix accepts it, firn says {e}"));
            let want = fs::read(dir.join(format!("{name}.nix.out"))).unwrap();
            let mut got = Vec::new();
            write_show_derivation(&sd, [(key, &drv)], &mut got).unwrap();
            assert_same(&got, &want, &name);
            accepted += 1;
        } else {
            let Err(e) = result else {
                panic!("{name}: Nix rejects it (rc {rc}), firn accepts it")
            };
            let nix_err = fs::read(dir.join(format!("{name}.nix.err"))).unwrap();
            let nix_err = String::from_utf8_lossy(&nix_err);
            let want = expected_firn_message(&name, &nix_err);
            let got = e.to_string();
            assert!(
                got.contains(&want),
                "{name}: firn says {got:?}, expected it to contain {want:?}"
            );
            rejected += 1;
        }
    }
    assert!(
        accepted >= 15 && rejected >= 25,
        "{accepted} accepted, {rejected} rejected"
    );
}
