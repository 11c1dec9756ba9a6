//! The parsers of what a user or a remote gives the dispatcher, fuzzed: `builders`
//! (machines files), `ssh://` store URIs, and a remote's realisations never panic, and
//! what parses prints back the same.

use firn_build::remote::machines::parse_builders;
use firn_build::remote::ssh::SshStore;
use proptest::prelude::*;

fn no_files(_: &std::path::Path) -> std::io::Result<String> {
    Err(std::io::ErrorKind::NotFound.into())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_builders_text_parses_or_is_refused(s in "[ -~\n\t;#@,]{0,200}") {
        if let Ok(machines) = parse_builders(&s, "x86_64-linux", &mut no_files) {
            for m in &machines {
                prop_assert!(!m.store_uri.is_empty());
                prop_assert!(m.speed_factor >= 1);
                prop_assert!(!m.systems.is_empty() || s.contains(','));
            }
        }
    }

    #[test]
    fn rows_of_fields_read_back(
        host in "[a-z][a-z0-9.-]{0,20}",
        systems in prop::collection::vec("[a-z][a-z0-9_-]{0,11}", 1..4),
        jobs in 0u32..1000,
        speed in 0u32..100,
        features in prop::collection::btree_set("[a-z][a-z-]{0,9}", 0..4),
    ) {
        let f: Vec<String> = features.iter().cloned().collect();
        let feats = if f.is_empty() { "-".to_owned() } else { f.join(",") };
        let row = format!("{host} {} - {jobs} {speed} {feats} -", systems.join(","));
        let m = parse_builders(&row, "x86_64-linux", &mut no_files).unwrap();
        prop_assert_eq!(m.len(), 1);
        prop_assert_eq!(&m[0].store_uri, &format!("ssh://{host}"));
        prop_assert_eq!(&m[0].systems, &systems);
        prop_assert_eq!(m[0].max_jobs, jobs);
        prop_assert_eq!(m[0].speed_factor, speed.max(1));
        prop_assert_eq!(&m[0].supported_features, &features);
    }

    #[test]
    fn any_store_uri_parses_or_is_refused(s in "(ssh://)?[ -~]{0,80}") {
        if let Ok(ssh) = SshStore::parse(&s) {
            prop_assert!(!ssh.host.is_empty() && !ssh.host.starts_with('-'));
            let argv = ssh.argv("", None, None);
            // The command is one argument, the last; the host never looks like an option.
            prop_assert!(argv.last().is_some_and(|c| c.contains("--serve --write")));
        }
    }

    #[test]
    fn any_realisation_text_parses_or_is_refused(s in "[ -~]{0,120}") {
        let _ = firn_derivation::Realisation::from_json(&s, "fuzz");
    }
}
