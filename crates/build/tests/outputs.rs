//! `register_outputs` on outputs made by hand in a temporary store: what a builder could
//! leave behind, good and bad.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use firn_build::outputs::{register_outputs, BuiltOutputs, OutputError};
use firn_derivation::{name_from_drv_base_name, parse_derivation, Derivation, StoreDir, StorePath};
use firn_store::{Store, StoreLayout};

fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("firn-outputs-{tag}-{}", std::process::id()));
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&p)
        .stderr(std::process::Stdio::null())
        .status();
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).unwrap();
    p
}

fn cleanup(p: &Path) {
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(p)
        .stderr(std::process::Stdio::null())
        .status();
    let _ = fs::remove_dir_all(p);
}

fn fixture_drv(case: &str) -> (StorePath, Vec<u8>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/cases")
        .join(case);
    let top = fs::read_to_string(dir.join("drvPath")).unwrap();
    let p = StoreDir::default().parse(top.trim()).unwrap();
    (
        p.clone(),
        fs::read(dir.join("drv").join(p.base_name())).unwrap(),
    )
}

fn parse<'a>(p: &StorePath, text: &'a [u8]) -> Derivation<'a> {
    parse_derivation(
        &StoreDir::default(),
        text,
        name_from_drv_base_name(p.base_name()),
    )
    .unwrap()
}

fn outputs_of(drv: &Derivation<'_>) -> BTreeMap<firn_derivation::OutputName, StorePath> {
    drv.output_paths_by_name(&StoreDir::default()).unwrap()
}

fn built<'d>(drv_path: &'d StorePath, drv: &'d Derivation<'d>) -> BuiltOutputs<'d> {
    BuiltOutputs {
        drv_path,
        drv,
        outputs: outputs_of(drv),
        input_closure: BTreeSet::new(),
        build_uid: None,
        missing_at: BTreeMap::new(),
        secret_keys: &[],
    }
}

#[test]
fn single_output_registers_like_nix() {
    let root = tempdir("single");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let (drv_path, text) = fixture_drv("single");
    let drv = parse(&drv_path, &text);
    let b = built(&drv_path, &drv);
    let out = store.real_path(&b.outputs["out"]);
    fs::write(&out, b"hello\n").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
    let infos = register_outputs(&mut store, &b).unwrap();
    // nix-2.8-vectors/cases/single/nar/out.info
    assert_eq!(infos.len(), 1);
    assert_eq!(
        infos[0].nar_hash.to_string(),
        "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    );
    assert_eq!(infos[0].nar_size, 120);
    assert!(infos[0].references.is_empty());
    assert_eq!(infos[0].deriver.as_ref(), Some(&drv_path));
    assert!(infos[0].ultimate);
    let meta = fs::symlink_metadata(&out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
    assert!(store.db().is_valid_path(&infos[0].path).unwrap());
    cleanup(&root);
}

#[test]
fn missing_and_suspicious_outputs_are_rejected() {
    let root = tempdir("missing");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let (drv_path, text) = fixture_drv("single");
    let drv = parse(&drv_path, &text);
    let b = built(&drv_path, &drv);
    let e = register_outputs(&mut store, &b).unwrap_err();
    assert!(matches!(e, OutputError::Missing { .. }), "{e}");
    assert!(e
        .to_string()
        .contains("failed to produce output path for output 'out'"));
    let out = store.real_path(&b.outputs["out"]);
    fs::write(&out, b"hello\n").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o666)).unwrap();
    let e = register_outputs(&mut store, &b).unwrap_err();
    assert!(matches!(e, OutputError::Suspicious(_)), "{e}");
    assert!(!store.db().is_valid_path(&b.outputs["out"]).unwrap());
    cleanup(&root);
}

#[test]
fn fixed_output_mismatch_registers_the_actual_path_like_nix() {
    let root = tempdir("fod");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let (drv_path, text) = fixture_drv("fixed-wrong");
    let drv = parse(&drv_path, &text);
    let b = built(&drv_path, &drv);
    fs::write(store.real_path(&b.outputs["out"]), b"goodbye\n").unwrap();
    let e = register_outputs(&mut store, &b).unwrap_err();
    assert!(e.is_hash_mismatch());
    // nix-formats.md §17 and nix-2.8-vectors/cases/fixed-wrong/got-path.txt
    assert_eq!(
        e.to_string(),
        format!(
            "hash mismatch in fixed-output derivation '{}': specified: \
             sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM= got: \
             sha256-cVc7kiqHq8P9GpV/LPoJ2eFpmFZ92HioXhIWYRJ1GAY=",
            StoreDir::default().display(&drv_path)
        )
    );
    let got = StoreDir::default()
        .parse("/nix/store/mgll3wg0yx8ch5rss14lj7w8lncq3avf-fixed-wrong")
        .unwrap();
    let info = store.db().query_path_info(&got).unwrap().unwrap();
    assert_eq!(info.deriver.as_ref(), Some(&drv_path));
    assert!(info.ca.unwrap().starts_with("fixed:sha256:01hqfl96"));
    assert!(!store.db().is_valid_path(&b.outputs["out"]).unwrap());
    cleanup(&root);
}

#[test]
fn multi_output_references_are_scanned_and_ordered() {
    let root = tempdir("multi");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let (drv_path, text) = fixture_drv("multi");
    let drv = parse(&drv_path, &text);
    let b = built(&drv_path, &drv);
    let sd = StoreDir::default();
    // dev refers to out, as in the fixture's builder; lib is plain.
    fs::write(store.real_path(&b.outputs["out"]), b"out\n").unwrap();
    let uses = format!("uses {}\n", sd.display(&b.outputs["out"]));
    fs::write(store.real_path(&b.outputs["dev"]), uses).unwrap();
    fs::write(store.real_path(&b.outputs["lib"]), b"lib\n").unwrap();
    let infos = register_outputs(&mut store, &b).unwrap();
    let order: Vec<&StorePath> = infos.iter().map(|i| &i.path).collect();
    let pos = |n: &str| order.iter().position(|p| **p == b.outputs[n]).unwrap();
    assert!(pos("out") < pos("dev"), "references first: {order:?}");
    let dev = store
        .db()
        .query_path_info(&b.outputs["dev"])
        .unwrap()
        .unwrap();
    assert_eq!(dev.references, [b.outputs["out"].clone()].into());
    cleanup(&root);
}

#[test]
fn output_cycles_are_rejected() {
    let root = tempdir("cycle");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let (drv_path, text) = fixture_drv("multi");
    let drv = parse(&drv_path, &text);
    let b = built(&drv_path, &drv);
    let sd = StoreDir::default();
    fs::write(
        store.real_path(&b.outputs["out"]),
        sd.display(&b.outputs["dev"]),
    )
    .unwrap();
    fs::write(
        store.real_path(&b.outputs["dev"]),
        sd.display(&b.outputs["out"]),
    )
    .unwrap();
    fs::write(store.real_path(&b.outputs["lib"]), b"lib\n").unwrap();
    let e = register_outputs(&mut store, &b).unwrap_err();
    assert!(matches!(e, OutputError::Cycle { .. }), "{e}");
    assert!(e.to_string().starts_with("cycle detected in build of"));
    for p in b.outputs.values() {
        assert!(!store.db().is_valid_path(p).unwrap());
    }
    cleanup(&root);
}

#[test]
fn allowed_references_are_enforced() {
    let root = tempdir("allowed");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let (drv_path, text) = fixture_drv("single");
    let mut drv = parse(&drv_path, &text);
    drv.env
        .insert(b"allowedReferences".to_vec().into(), b"".to_vec().into());
    let b = built(&drv_path, &drv);
    let sd = StoreDir::default();
    // A self-reference is a reference: `allowedReferences = []` rejects it (Nix: ["out"]
    // is needed).
    fs::write(
        store.real_path(&b.outputs["out"]),
        sd.display(&b.outputs["out"]),
    )
    .unwrap();
    let e = register_outputs(&mut store, &b).unwrap_err();
    assert!(matches!(e, OutputError::Disallowed { .. }), "{e}");
    let mut drv2 = drv.clone();
    drv2.env
        .insert(b"allowedReferences".to_vec().into(), b"out".to_vec().into());
    let b2 = built(&drv_path, &drv2);
    register_outputs(&mut store, &b2).unwrap();
    cleanup(&root);
}

/// The other constraints: disallowedReferences, allowed/disallowedRequisites (closure,
/// output names resolved), and structured `outputChecks` with maxSize/maxClosureSize.
#[test]
fn other_reference_constraints() {
    let root = tempdir("constraints");
    let mut store = Store::open(&StoreLayout::chroot(&root)).unwrap();
    let sd = StoreDir::default();
    // A valid dependency chain in the store: top -> mid -> base.
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("base"), b"base\n").unwrap();
    let base = store
        .add_to_store(
            &src.join("base"),
            firn_derivation::FileIngestionMethod::Recursive,
            firn_derivation::HashAlgo::Sha256,
        )
        .unwrap()
        .path;
    let mid = store
        .add_text(
            "mid",
            sd.display(&base).as_bytes(),
            [base.clone()].into(),
            BTreeMap::new(),
        )
        .unwrap()
        .path;
    let (drv_path, text) = fixture_drv("single");
    let check = |env: &[(&str, &str)]| {
        let mut drv = parse(&drv_path, &text);
        for (k, v) in env {
            drv.env
                .insert(k.as_bytes().to_vec().into(), v.as_bytes().to_vec().into());
        }
        let root2 = tempdir(&format!(
            "c-{}",
            env.iter().map(|(k, _)| *k).collect::<Vec<_>>().join("-")
        ));
        // Each case in its own store, with the same valid inputs.
        let mut s2 = Store::open(&StoreLayout::chroot(&root2)).unwrap();
        let b2 = s2
            .add_to_store(
                &src.join("base"),
                firn_derivation::FileIngestionMethod::Recursive,
                firn_derivation::HashAlgo::Sha256,
            )
            .unwrap()
            .path;
        let m2 = s2
            .add_text(
                "mid",
                sd.display(&b2).as_bytes(),
                [b2.clone()].into(),
                BTreeMap::new(),
            )
            .unwrap()
            .path;
        let mut b = built(&drv_path, &drv);
        b.input_closure = [b2.clone(), m2.clone()].into();
        fs::write(
            s2.real_path(&b.outputs["out"]),
            format!("uses {}\n", sd.display(&m2)),
        )
        .unwrap();
        let r = register_outputs(&mut s2, &b).map(|_| ());
        cleanup(&root2);
        r
    };
    let mid_s = sd.display(&mid);
    let base_s = sd.display(&base);
    assert!(check(&[]).is_ok());
    assert!(matches!(
        check(&[("disallowedReferences", &mid_s)]),
        Err(OutputError::Disallowed { .. })
    ));
    assert!(
        check(&[("disallowedReferences", &base_s)]).is_ok(),
        "base is not a direct reference"
    );
    assert!(matches!(
        check(&[("disallowedRequisites", &base_s)]),
        Err(OutputError::Disallowed { .. })
    ));
    assert!(matches!(
        check(&[("allowedRequisites", &mid_s)]),
        Err(OutputError::Disallowed { .. })
    ));
    let both = format!("{mid_s} {base_s}");
    assert!(check(&[("allowedRequisites", &both)]).is_ok());
    assert!(matches!(
        check(&[("allowedReferences", "bogus")]),
        Err(OutputError::IllegalSpecifier { .. })
    ));
    let json = |oc: &str| format!(r#"{{"outputChecks":{{"out":{oc}}}}}"#);
    assert!(matches!(
        check(&[("__json", &json(r#"{"maxSize":10}"#))]),
        Err(OutputError::TooLarge { .. })
    ));
    assert!(check(&[("__json", &json(r#"{"maxSize":100000}"#))]).is_ok());
    assert!(matches!(
        check(&[("__json", &json(r#"{"maxClosureSize":200}"#))]),
        Err(OutputError::TooLarge { .. })
    ));
    assert!(matches!(
        check(&[("__json", &json(r#"{"allowedReferences":[]}"#))]),
        Err(OutputError::Disallowed { .. })
    ));
    cleanup(&root);
}
