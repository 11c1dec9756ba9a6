//! The code's layout rules that a compiler does not check: within each crate, no
//! module imports a module that imports it back (`use crate::a` in `b` and `use
//! crate::b` in `a`, or a parent's `pub use child::…` with the child using the
//! parent). Doc comments and comments are ignored.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` → `[a, b]`; `mod.rs`, `lib.rs`, `main.rs` name their directory.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The module paths a file refers to through `crate::…` and `super::…`.
fn references(module: &[String], is_dir_module: bool, text: &str) -> Vec<Vec<String>> {
    let mut refs = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let bytes = code.as_bytes();
        for (kw, base) in [
            ("crate::", Vec::new()),
            ("super::", {
                let mut b = module.to_vec();
                if !is_dir_module || !b.is_empty() {
                    b.pop();
                }
                b
            }),
        ] {
            let mut from = 0;
            while let Some(i) = code[from..].find(kw) {
                let start = from + i;
                let before_ok = start == 0
                    || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
                from = start + kw.len();
                if !before_ok {
                    continue;
                }
                let rest = &code[from..];
                let path: Vec<String> = rest
                    .split("::")
                    .map(|seg| {
                        seg.chars()
                            .take_while(|c| {
                                c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'
                            })
                            .collect::<String>()
                    })
                    .take_while(|s| !s.is_empty())
                    .collect();
                let mut full = base.clone();
                full.extend(path);
                refs.push(full);
            }
        }
        // A parent re-exporting from its child: `pub use child::…`.
        if let Some(rest) = code.trim_start().strip_prefix("pub use ") {
            let first: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if rest[first.len()..].starts_with("::") && first != "crate" && first != "super" {
                let mut full = module.to_vec();
                full.push(first);
                refs.push(full);
            }
        }
    }
    refs
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cycles = Vec::new();
    for entry in fs::read_dir(&crates).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeMap<Vec<String>, PathBuf> = files
            .iter()
            .map(|f| (module_of(&src, f), f.clone()))
            .collect();
        let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
        for (m, f) in &modules {
            let dir_module = matches!(
                f.file_name().and_then(|n| n.to_str()),
                Some("mod.rs" | "lib.rs" | "main.rs")
            );
            let text = fs::read_to_string(f).unwrap();
            for r in references(m, dir_module, &text) {
                // The longest prefix that is a module of this crate.
                let target = (0..=r.len())
                    .rev()
                    .map(|k| r[..k].to_vec())
                    .find(|t| modules.contains_key(t));
                if let Some(t) = target {
                    // A module's own ancestors are where it lives, not an import cycle
                    // by themselves.
                    if &t != m && !m.starts_with(&t) {
                        edges.entry(m.clone()).or_default().insert(t);
                    }
                }
            }
        }
        for (a, targets) in &edges {
            for b in targets {
                if a < b && edges.get(b).is_some_and(|t| t.contains(a)) {
                    cycles.push(format!(
                        "{}: {} <-> {}",
                        src.display(),
                        a.join("::"),
                        b.join("::")
                    ));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other: {cycles:#?}"
    );
}
