//! The checks of the `aterm` and `json` fuzz targets. The regression test
//! `crates/derivation/tests/fuzz_corpus.rs` includes this very file (`#[path]`), so the
//! committed corpus goes through exactly what the fuzzer checks.
//!
//! Each check returns normally when the input is rejected (an `Err` is a fine answer to
//! bad input) and panics when an invariant is broken:
//! - `.drv`: `parse(print(d)) == d` and `print(parse(print(d))) == print(d)` (the
//!   invariants of `tests/properties.rs`), unless a field that Nix writes without
//!   escaping holds `"` or `\` (documented in `docs/derivations.md`: such a `.drv` cannot
//!   be read back, by Nix or firn); and the derivation's show-derivation JSON reads back
//!   equal;
//! - JSON: writing what was read and reading it again gives the same keys and
//!   derivations, and writing that gives the same bytes; each derivation's `.drv` text
//!   reads back equal (same exception).

use firn_derivation::{
    name_from_drv_base_name, parse_derivation, parse_show_derivation, write_show_derivation,
    Derivation, DerivationError, DerivationOutput, StoreDir, StorePath,
};

/// The derivation name given to the `.drv` parser (fixed-output paths depend on it).
pub const DRV_NAME: &str = "fuzz";

/// A valid hash part for made-up `.drv` paths.
const HASH_PART: &str = "00000000000000000000000000000000";

/// Whether the fields that `Derivation::unparse` writes *without* escaping (output names,
/// input-derivation output names, the system, store paths) are free of `"` and `\`, so
/// that the printed `.drv` can be read back. A store path can hold one: Nix (and firn)
/// accept any byte after the 32-character hash part (`<hash>\\name` in a `.drv` string
/// is the base name `<hash>\name`), and print it back raw.
pub fn reprintable(drv: &Derivation<'_>) -> bool {
    let clean = |s: &[u8]| !s.iter().any(|&c| c == b'"' || c == b'\\');
    let clean_path = |p: &StorePath| clean(p.base_name().as_bytes());
    drv.outputs.iter().all(|(k, o)| {
        clean(k) && !matches!(o, DerivationOutput::InputAddressed(p) if !clean_path(p))
    }) && drv
        .input_drvs
        .iter()
        .all(|(p, outs)| clean_path(p) && outs.iter().all(|o| clean(o)))
        && drv.input_srcs.iter().all(clean_path)
        && clean(&drv.platform)
}

/// Printing fails only for a fixed output whose path cannot be computed (an output or
/// derivation name that is no valid store path name).
fn assert_print_error_expected(drv: &Derivation<'_>, e: &DerivationError) {
    let has_fixed = drv
        .outputs
        .values()
        .any(|o| matches!(o, DerivationOutput::CAFixed(_)));
    assert!(
        has_fixed
            && matches!(
                e,
                DerivationError::NonUtf8OutputName(_)
                    | DerivationError::StorePath(_)
                    | DerivationError::EmptyName(_)
            ),
        "printing failed unexpectedly: {e}\n{drv:?}"
    );
}

/// `.drv` text → derivation → text → derivation: equal derivations, equal texts.
pub fn check_aterm_roundtrip(sd: &StoreDir, drv: &Derivation<'_>) {
    let text = match drv.to_aterm(sd) {
        Ok(text) => text,
        Err(e) => return assert_print_error_expected(drv, &e),
    };
    if !reprintable(drv) {
        return;
    }
    let back = match parse_derivation(sd, &text, &drv.name) {
        Ok(back) => back,
        Err(e) => panic!(
            "the printed .drv does not parse: {e}\n{}",
            text.escape_ascii()
        ),
    };
    assert_eq!(&back, drv, "the printed .drv reads back differently");
    match back.to_aterm(sd) {
        Ok(again) => assert_eq!(
            again.escape_ascii().to_string(),
            text.escape_ascii().to_string(),
            "printing is not stable"
        ),
        Err(e) => panic!("the re-read derivation does not print: {e}"),
    }
}

/// Derivations keyed by `.drv` path → JSON → derivations: equal keys and derivations,
/// and the JSON written again is the same bytes.
pub fn check_json_roundtrip(sd: &StoreDir, entries: &[(String, &Derivation<'_>)]) {
    let mut json = Vec::new();
    if let Err(e) =
        write_show_derivation(sd, entries.iter().map(|(k, d)| (k.as_str(), *d)), &mut json)
    {
        for (_, drv) in entries {
            if drv.to_aterm(sd).is_err() {
                return;
            }
        }
        panic!("show-derivation JSON cannot be written: {e}");
    }
    let back = match parse_show_derivation(sd, &json) {
        Ok(back) => back,
        Err(e) => panic!(
            "the written JSON does not read back: {e}\n{}",
            json.escape_ascii()
        ),
    };
    assert_eq!(
        back.len(),
        entries.len(),
        "a different number of derivations"
    );
    for ((key, drv), (back_key, back_drv)) in entries.iter().zip(&back) {
        assert_eq!(back_key.as_deref(), Some(key.as_str()), "a different key");
        assert_eq!(back_drv, *drv, "the JSON reads back differently");
    }
    let mut again = Vec::new();
    let res = write_show_derivation(
        sd,
        entries
            .iter()
            .zip(&back)
            .map(|((k, _), (_, d))| (k.as_str(), d)),
        &mut again,
    );
    assert!(res.is_ok(), "the re-read derivations cannot be written");
    assert_eq!(
        again.escape_ascii().to_string(),
        json.escape_ascii().to_string(),
        "JSON writing is not stable"
    );
}

/// The check of the `aterm` target: arbitrary bytes as a `.drv`.
pub fn check_aterm(data: &[u8]) {
    let sd = StoreDir::default();
    let Ok(drv) = parse_derivation(&sd, data, DRV_NAME) else {
        return;
    };
    check_aterm_roundtrip(&sd, &drv);
    let key = format!("/nix/store/{HASH_PART}-{DRV_NAME}.drv");
    check_json_roundtrip(&sd, &[(key, &drv)]);
}

/// A `.drv` path whose name is `name`, if there is one.
fn key_for(name: &str) -> Option<String> {
    let base = format!("{HASH_PART}-{name}.drv");
    (!base.contains('/') && name_from_drv_base_name(&base) == name)
        .then(|| format!("/nix/store/{base}"))
}

/// The check of the `json` target: arbitrary bytes as show-derivation JSON.
pub fn check_json(data: &[u8]) {
    let sd = StoreDir::default();
    let Ok(read) = parse_show_derivation(&sd, data) else {
        return;
    };
    assert!(!read.is_empty(), "read no derivation without an error");
    for (_, drv) in &read {
        check_aterm_roundtrip(&sd, drv);
    }
    // A bare derivation object (no key) is written back keyed by a made-up `.drv` path
    // of the same name, when its name can be a store path name.
    let mut entries = Vec::new();
    for (key, drv) in &read {
        let key = match key {
            Some(k) => k.clone(),
            None => match key_for(&drv.name) {
                Some(k) => k,
                None => return,
            },
        };
        entries.push((key, drv));
    }
    check_json_roundtrip(&sd, &entries);
}
