//! Property tests: `print(parse(x)) == x` for generated derivations, JSON both ways, and
//! no input — random, truncated or mutated — makes the ATerm or JSON reader panic.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use firn_derivation::{
    nixbase32, parse_derivation, parse_show_derivation, write_show_derivation, Derivation,
    DerivationOutput, FileIngestionMethod, FixedOutputHash, Hash, HashAlgo, StoreDir, StorePath,
};
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    // Bias towards the bytes that matter to the escaper and the parser.
    let special = prop::sample::select(vec![
        b'"', b'\\', b'\n', b'\r', b'\t', b'(', b')', b',', b'[', b']', 0, 0x7f, 0xff,
    ]);
    vec(prop_oneof![3 => any::<u8>(), 1 => special], 0..40)
}

/// Output names and the like, which Nix prints without escaping.
fn ident() -> impl Strategy<Value = Vec<u8>> {
    "[a-zA-Z0-9_+-]{1,10}".prop_map(String::into_bytes)
}

fn store_path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+._?=-]{1,30}").prop_map(move |(h, n)| {
        let base = format!("{}-{n}{suffix}", nixbase32::encode(&h));
        StorePath::from_base_name(base.as_bytes()).unwrap()
    })
}

fn fixed() -> impl Strategy<Value = FixedOutputHash> {
    (0usize..4, any::<bool>(), any::<[u8; 8]>()).prop_map(|(a, rec, seed)| FixedOutputHash {
        method: if rec {
            FileIngestionMethod::Recursive
        } else {
            FileIngestionMethod::Flat
        },
        hash: Hash::digest(HashAlgo::ALL[a], &seed),
    })
}

fn outputs() -> impl Strategy<Value = BTreeMap<Cow<'static, [u8]>, DerivationOutput>> {
    let ia = btree_map(
        ident().prop_map(Cow::Owned),
        prop_oneof![
            store_path("").prop_map(DerivationOutput::InputAddressed),
            Just(DerivationOutput::Deferred)
        ],
        0..4,
    );
    let fod = fixed()
        .prop_map(|f| BTreeMap::from([(Cow::Borrowed(&b"out"[..]), DerivationOutput::CAFixed(f))]));
    prop_oneof![3 => ia, 1 => fod]
}

prop_compose! {
    fn derivation()(
        name in "[a-zA-Z0-9+._?=-]{1,40}",
        outputs in outputs(),
        input_drvs in btree_map(store_path(".drv"), btree_set(ident().prop_map(Cow::Owned), 0..3), 0..4),
        input_srcs in btree_set(store_path(""), 0..4),
        platform in "[a-zA-Z0-9_ -]{0,16}",
        builder in bytes(),
        args in vec(bytes().prop_map(Cow::Owned), 0..5),
        env in btree_map(bytes().prop_map(Cow::Owned), bytes().prop_map(Cow::Owned), 0..8),
    ) -> Derivation<'static> {
        Derivation {
            name,
            outputs,
            input_drvs,
            input_srcs: input_srcs.into_iter().collect::<BTreeSet<_>>(),
            platform: Cow::Owned(platform.into_bytes()),
            builder: Cow::Owned(builder),
            args,
            env,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn aterm_roundtrip(drv in derivation()) {
        let sd = StoreDir::default();
        let text = drv.to_aterm(&sd).unwrap();
        let back = parse_derivation(&sd, &text, &drv.name).unwrap();
        prop_assert_eq!(&back, &drv);
        prop_assert_eq!(back.to_aterm(&sd).unwrap(), text);
    }

    #[test]
    fn json_roundtrip(drv in derivation()) {
        let sd = StoreDir::default();
        let key = format!("/nix/store/{}-{}.drv", "0".repeat(32), drv.name);
        let mut json = Vec::new();
        write_show_derivation(&sd, [(key.as_str(), &drv)], &mut json).unwrap();
        let back = parse_show_derivation(&sd, &json).unwrap();
        prop_assert_eq!(back.len(), 1);
        prop_assert_eq!(back[0].0.as_deref(), Some(key.as_str()));
        prop_assert_eq!(&back[0].1, &drv);
    }

    #[test]
    fn parser_never_panics_on_random_bytes(input in vec(any::<u8>(), 0..300)) {
        let mut prefixed = b"Derive([".to_vec();
        prefixed.extend_from_slice(&input);
        for text in [&input, &prefixed] {
            let _ = parse_derivation(&StoreDir::default(), text, "x");
            let _ = parse_show_derivation(&StoreDir::default(), text);
        }
    }

    #[test]
    fn parsers_never_panic_on_mutations(
        drv in derivation(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let sd = StoreDir::default();
        let mut text = drv.to_aterm(&sd).unwrap();
        let mut json = Vec::new();
        write_show_derivation(&sd, [("/nix/store/x.drv", &drv)], &mut json).unwrap();
        for buf in [&mut text, &mut json] {
            for (at, byte, op) in &edits {
                let i = at.index(buf.len() + 1);
                match op {
                    0 => buf.insert(i, *byte),
                    1 if i < buf.len() => { buf.remove(i); }
                    _ if i < buf.len() => buf[i] = *byte,
                    _ => {}
                }
            }
        }
        let _ = parse_derivation(&sd, &text, &drv.name);
        let _ = parse_show_derivation(&sd, &json);
    }
}

proptest! {
    // Each case parses every prefix: fewer cases.
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_truncation_is_an_error(drv in derivation()) {
        let sd = StoreDir::default();
        let text = drv.to_aterm(&sd).unwrap();
        for cut in 0..text.len() {
            prop_assert!(parse_derivation(&sd, &text[..cut], &drv.name).is_err(), "accepted a prefix of {} bytes", cut);
        }
    }
}
