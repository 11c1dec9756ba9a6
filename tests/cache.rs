//! Binary caches against real Nix 2.8: keys and signatures (`firn key`, `firn sign`
//! against `nix-store --generate-binary-cache-key`, `nix store sign`, `nix key`),
//! `firn copy --to file://` (narinfos as `nix copy --to` writes them; real Nix
//! substitutes from them), `firn copy --from` (caches Nix wrote; hostile caches are
//! refused with nothing registered), and substitution in `firn realise`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::tls::{have_openssl, https_server, tls_ca, Killed};
use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXPR: &str = r#"
let sh = "/bin/sh";
  dep = derivation { name = "cache-dep"; system = "x86_64-linux"; builder = sh; args = ["-c" "echo dep > $out"]; };
  top = derivation { name = "cache-top"; system = "x86_64-linux"; builder = sh;
    args = ["-c" "mkdir $out; echo ${dep} > $out/ref; echo hi > $out/hi; ln -s hi $out/link"]; };
in { inherit dep top; }
"#;

/// A Nix program on the store at `root` (no substituters unless `args` set them).
fn nix(root: &Path, cmd: &str, args: &[&str]) -> Output {
    let mut all: Vec<&str> = Vec::new();
    if cmd == "nix" {
        all.extend(["--extra-experimental-features", "nix-command"]);
    }
    all.extend(["--store", root.to_str().unwrap()]);
    if !args.contains(&"substituters") {
        all.extend(["--option", "substituters", ""]);
    }
    all.extend(args);
    let mut c = command(cmd);
    c.args(&all).env("NIX_CONF_DIR", tempdir_none());
    c.output().unwrap()
}

fn tempdir_none() -> PathBuf {
    std::env::temp_dir().join("firn-tests-no-config")
}

/// A store at `dir/name` where real Nix built `top` (and so `dep`): (drv, top, dep).
fn built_store(dir: &Path, name: &str) -> (PathBuf, String, String, String) {
    let root = dir.join(name);
    let expr = dir.join("cache.nix");
    fs::write(&expr, EXPR).unwrap();
    let inst = |attr: &str| {
        let out = command("nix-instantiate")
            .args([
                "--store",
                root.to_str().unwrap(),
                "--option",
                "substituters",
                "",
            ])
            .arg(&expr)
            .args(["-A", attr])
            .output()
            .unwrap();
        ok(out).trim().to_owned()
    };
    let drv = inst("top");
    let build = nix(
        &root,
        "nix-store",
        &[
            "--option",
            "sandbox",
            "true",
            "--option",
            "sandbox-paths",
            "/bin/sh=/bin/busybox",
            "-r",
            &drv,
        ],
    );
    let top = ok(build).trim().to_owned();
    let dep = ok(nix(&root, "nix-store", &["-q", "--references", &top]))
        .trim()
        .to_owned();
    assert!(dep.ends_with("-cache-dep"), "{dep}");
    (root, drv, top, dep)
}

fn narinfo_file(cache: &Path, path: &str) -> PathBuf {
    let base = path.rsplit('/').next().unwrap();
    cache.join(format!("{}.narinfo", &base[..32]))
}

fn narinfo(cache: &Path, path: &str) -> BTreeMap<String, String> {
    let text = fs::read_to_string(narinfo_file(cache, path)).unwrap();
    text.lines()
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn hash_of(root: &Path, path: &str) -> String {
    ok(nix(root, "nix-store", &["-q", "--hash", path]))
}

fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()).into_iter().map(|f| format!("{name}/{f}")));
        } else {
            out.push(name);
        }
    }
    out.sort();
    out
}

#[test]
fn keys_and_signatures_are_nixs() {
    if !have_nix() {
        return;
    }
    let dir = tempdir("cache-keys");
    let (sk, _pk, public) = keypair(&dir, "test-1");
    // firn key public of Nix's secret key is Nix's public key, byte for byte.
    let out = run(
        firn_bin(),
        &["key", "public"],
        Some(&fs::read(&sk).unwrap()),
    );
    assert_eq!(ok(out), public);
    // firn's secret keys are Nix's format: Nix derives the same public key from them.
    let firn_sk = ok(run(firn_bin(), &["key", "generate", "firn-1"], None));
    assert!(firn_sk.starts_with("firn-1:") && !firn_sk.ends_with('\n'));
    let nix_pub = ok(run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "key",
            "convert-secret-to-public",
        ],
        Some(firn_sk.as_bytes()),
    ));
    let firn_pub = ok(run(
        firn_bin(),
        &["key", "public"],
        Some(firn_sk.as_bytes()),
    ));
    assert_eq!(firn_pub, nix_pub);
    let firn_sk_file = dir.join("firn.sk");
    fs::write(&firn_sk_file, &firn_sk).unwrap();

    // The same path in a firn store and a Nix store, signed by each with both keys.
    fs::write(dir.join("hello"), "hello\n").unwrap();
    let (ours, theirs) = (dir.join("firn"), dir.join("nix"));
    let p = ok(firn_at(
        &ours,
        &["add", dir.join("hello").to_str().unwrap()],
        None,
    ));
    let p = p.trim();
    assert_eq!(
        ok(nix(
            &theirs,
            "nix-store",
            &["--add", dir.join("hello").to_str().unwrap()]
        ))
        .trim(),
        p
    );
    for key in [&sk, &firn_sk_file] {
        let k = key.to_str().unwrap();
        let f = firn_at(&ours, &["sign", "--key-file", k, p], None);
        assert!(String::from_utf8_lossy(&f.stderr).contains("added 1 signatures"));
        ok(nix(&theirs, "nix", &["store", "sign", "-k", k, p]));
    }
    // Signing again adds nothing.
    let again = firn_at(
        &ours,
        &["sign", "--key-file", sk.to_str().unwrap(), p],
        None,
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("added 0 signatures"));
    let sigs = |root: &Path| ok(nix(root, "nix", &["path-info", "--sigs", p]));
    let theirs_sigs = sigs(&theirs);
    assert_eq!(sigs(&ours), theirs_sigs);
    assert!(theirs_sigs.contains("test-1:") && theirs_sigs.contains("firn-1:"));
    // Nix checks firn's signatures: `nix store verify` with only the firn key trusted.
    let v = nix(
        &ours,
        "nix",
        &[
            "store",
            "verify",
            "--trusted-public-keys",
            firn_pub.as_str(),
            "--sigs-needed",
            "1",
            p,
        ],
    );
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // A content-addressed path needs no signature: copied through an unsigned cache into
    // a store that trusts no key of ours, it is taken (its CA gives its path).
    let unsigned = dir.join("unsigned");
    let url = format!("file://{}", unsigned.display());
    assert_eq!(
        ok(firn_at(&ours, &["copy", "--to", &url, p], None)).trim(),
        p
    );
    let other = dir.join("other");
    assert_eq!(
        ok(firn_at(&other, &["copy", "--from", &url, p], None)).trim(),
        p
    );
    assert_verifies(&other, "content-addressed");
    // A path whose contents no longer have the registered hash is not copied to a cache.
    let real = ours.join(p.trim_start_matches('/'));
    let mut perms = fs::metadata(&real).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&real, perms).unwrap();
    fs::write(&real, "HELLO\n").unwrap();
    let corrupt = dir.join("corrupt");
    let url = format!("file://{}", corrupt.display());
    let out = firn_at(&ours, &["copy", "--to", &url, p], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to copy corrupted path"));
    assert!(!narinfo_file(&corrupt, p).exists());
    assert_eq!(
        files(&corrupt.join("nar")),
        Vec::<String>::new(),
        "no NAR or temporary left"
    );
    // A hostile key file is an error naming it, not a panic.
    fs::write(dir.join("bad.sk"), "nope:AAAA").unwrap();
    let bad = firn_at(
        &ours,
        &[
            "sign",
            "--key-file",
            dir.join("bad.sk").to_str().unwrap(),
            p,
        ],
        None,
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad.sk"));
    remove(&dir);
}

#[test]
fn copy_to_writes_what_nix_writes_and_nix_substitutes_it() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-to");
    let (sk, _pk, public) = keypair(&dir, "test-1");
    let (src, _drv, top, dep) = built_store(&dir, "src");
    let sk = sk.to_str().unwrap();
    for comp in ["xz", "zstd", "none"] {
        let (ours, theirs) = (
            dir.join(format!("firn-{comp}")),
            dir.join(format!("nix-{comp}")),
        );
        let url = |d: &Path| format!("file://{}?compression={comp}&secret-key={sk}", d.display());
        let copied = ok(firn_at(&src, &["copy", "--to", &url(&ours), &top], None));
        assert_eq!(
            copied,
            format!("{dep}\n{top}\n"),
            "{comp}: references first"
        );
        ok(nix(&src, "nix", &["copy", "--to", &url(&theirs), &top]));
        for p in [&dep, &top] {
            let (a, b) = (narinfo(&ours, p), narinfo(&theirs, p));
            for (k, v) in &b {
                // The compressed bytes may differ between compressor builds.
                if comp != "none" && ["URL", "FileHash", "FileSize"].contains(&k.as_str()) {
                    continue;
                }
                assert_eq!(a.get(k), Some(v), "{comp}: {p}: field {k}");
            }
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            if comp == "none" {
                assert_eq!(
                    fs::read(narinfo_file(&ours, p)).unwrap(),
                    fs::read(narinfo_file(&theirs, p)).unwrap(),
                    "{comp}: byte-identical narinfo"
                );
            }
        }
        // Real Nix substitutes from firn's cache, checking firn's signatures.
        let fresh = dir.join(format!("subst-{comp}"));
        let out = nix(
            &fresh,
            "nix-store",
            &[
                "-r",
                &top,
                "--option",
                "substituters",
                &format!("file://{}", ours.display()),
                "--option",
                "trusted-public-keys",
                &public,
            ],
        );
        assert_eq!(ok(out).trim(), top, "{comp}");
        for p in [&dep, &top] {
            assert_eq!(hash_of(&fresh, p), hash_of(&src, p), "{comp}: {p}");
        }
        assert_verifies(&fresh, comp);
        // The cache Nix wrote already has everything: firn copies nothing into it.
        let before = files(&theirs);
        let again = ok(firn_at(&src, &["copy", "--to", &url(&theirs), &top], None));
        assert_eq!(again, "", "{comp}");
        assert_eq!(files(&theirs), before);
    }
    remove(&dir);
}

/// `firn --store ROOT --option trusted-public-keys KEY copy --from URL ARGS…`.
fn copy_from(root: &Path, key: &str, cache: &Path, extra: &[&str], paths: &[&str]) -> Output {
    let url = format!("file://{}", cache.display());
    let mut args = vec![
        "--option",
        "trusted-public-keys",
        key,
        "copy",
        "--from",
        &url,
    ];
    args.extend(extra);
    args.extend(paths);
    firn_at(root, &args, None)
}

fn copy_tree(from: &Path, to: &Path) {
    let st = command("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

#[test]
fn copy_from_takes_nixs_caches_and_refuses_hostile_ones() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-from");
    let (sk, _pk, public) = keypair(&dir, "test-1");
    let (src, _drv, top, dep) = built_store(&dir, "src");
    let sk = sk.to_str().unwrap();
    for comp in ["xz", "zstd", "none"] {
        let cache = dir.join(format!("nix-{comp}"));
        let url = format!(
            "file://{}?compression={comp}&secret-key={sk}",
            cache.display()
        );
        ok(nix(&src, "nix", &["copy", "--to", &url, &top]));
        let ours = dir.join(format!("firn-{comp}"));
        let out = ok(copy_from(&ours, &public, &cache, &[], &[&top]));
        assert_eq!(out, format!("{dep}\n{top}\n"), "{comp}");
        for p in [&dep, &top] {
            assert_eq!(hash_of(&ours, p), hash_of(&src, p), "{comp}: {p}");
        }
        assert_verifies(&ours, comp);
        // Already there: nothing to copy.
        assert_eq!(ok(copy_from(&ours, &public, &cache, &[], &[&top])), "");
    }
    let good = dir.join("nix-none");
    // Each case: a copy of the good cache, spoilt; the copy is refused, nothing of the
    // closure is valid (dep's NAR was fine and staged first), no temporary is left.
    let nar_of = |cache: &Path, p: &str| cache.join(&narinfo(cache, p)["URL"]);
    type Spoil = Box<dyn Fn(&Path)>;
    let edit = |p: String, from: &'static str, to: String| -> Spoil {
        Box::new(move |c: &Path| {
            let f = narinfo_file(c, &p);
            let text = fs::read_to_string(&f).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with(from))
                .unwrap()
                .to_owned();
            fs::write(&f, text.replace(&line, &to)).unwrap();
        })
    };
    let (t1, t2) = (top.clone(), top.clone());
    let cases: Vec<(&str, Vec<&str>, Spoil, &str)> = vec![
        (
            "untrusted key",
            vec![],
            Box::new(|_: &Path| {}),
            "lacks a signature",
        ),
        (
            "bad signature",
            vec![],
            edit(
                top.clone(),
                "Sig: ",
                "Sig: test-1:".to_owned() + &"A".repeat(86) + "==",
            ),
            "lacks a signature",
        ),
        (
            // A content address that does not give the path does not replace a signature.
            "forged content address",
            vec![],
            edit(
                top.clone(),
                "Sig: ",
                format!("CA: fixed:r:{}", narinfo(&good, &top)["NarHash"]),
            ),
            "lacks a signature",
        ),
        (
            "wrong NAR hash",
            vec!["--no-check-sigs"],
            edit(
                top.clone(),
                "NarHash: ",
                format!("NarHash: {}", narinfo(&good, &dep)["NarHash"]),
            ),
            "hash mismatch",
        ),
        (
            // substitute-with-invalid-ca.sh: the content must hash to the CA field.
            "content address of other content",
            vec!["--no-check-sigs"],
            edit(
                top.clone(),
                "Sig: ",
                format!("CA: fixed:r:{}", narinfo(&good, &dep)["NarHash"]),
            ),
            "ca hash mismatch importing path",
        ),
        (
            "truncated NAR",
            vec!["--no-check-sigs"],
            Box::new(move |c: &Path| {
                let f = nar_of(c, &t1);
                let data = fs::read(&f).unwrap();
                fs::write(&f, &data[..data.len() / 2]).unwrap();
            }),
            "",
        ),
        (
            "URL ../x",
            vec!["--no-check-sigs"],
            edit(top.clone(), "URL: ", "URL: ../outside.nar".to_owned()),
            "not inside the cache",
        ),
        (
            "absolute URL",
            vec!["--no-check-sigs"],
            edit(top.clone(), "URL: ", "URL: /etc/passwd".to_owned()),
            "not inside the cache",
        ),
        (
            "symlink out of the cache",
            vec!["--no-check-sigs"],
            Box::new(move |c: &Path| {
                let f = nar_of(c, &t2);
                fs::remove_file(&f).unwrap();
                std::os::unix::fs::symlink("/etc/passwd", &f).unwrap();
            }),
            "not inside the cache",
        ),
        (
            "narinfo without final newline",
            vec!["--no-check-sigs"],
            {
                let t = top.clone();
                Box::new(move |c: &Path| {
                    let f = narinfo_file(c, &t);
                    let text = fs::read_to_string(&f).unwrap();
                    fs::write(&f, text.trim_end()).unwrap();
                })
            },
            "corrupt",
        ),
    ];
    fs::write(dir.join("outside.nar"), b"not a nar").unwrap();
    for (i, (what, extra, spoil, says)) in cases.into_iter().enumerate() {
        let cache = dir.join(format!("spoilt-{i}"));
        copy_tree(&good, &cache);
        spoil(&cache);
        let root = dir.join(format!("victim-{i}"));
        let key = if what == "untrusted key" {
            "other-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
        } else {
            public.as_str()
        };
        let out = copy_from(&root, key, &cache, &extra, &[&top]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(
            store_entries(&root),
            Default::default(),
            "{what}: nothing left"
        );
        for p in [&dep, &top] {
            assert!(
                !nix(&root, "nix-store", &["-q", "--hash", p])
                    .status
                    .success(),
                "{what}"
            );
        }
        assert_verifies(&root, what);
    }
    remove(&dir);
}

/// `firn realise` (or `nix-store -r`) of `drv` in `root` with `cache` as substituter,
/// trusting `key`, in the sandbox.
fn realise_from(
    cmd: &str,
    root: &Path,
    cache: &Path,
    key: &str,
    extra: &[&str],
    drv: &str,
) -> Output {
    let url = format!("file://{}", cache.display());
    let mut args: Vec<&str> = vec![
        "--option",
        "substituters",
        &url,
        "--option",
        "trusted-public-keys",
        key,
        "--option",
        "sandbox",
        "true",
        "--option",
        "sandbox-paths",
        "/bin/sh=/bin/busybox",
    ];
    args.extend(extra);
    if cmd == "nix-store" {
        args.extend(["-r", drv]);
        nix(root, "nix-store", &args)
    } else {
        args.extend(["realise", drv]);
        firn_at(root, &args, None)
    }
}

fn instantiate_into(root: &Path, dir: &Path) -> String {
    let out = command("nix-instantiate")
        .args([
            "--store",
            root.to_str().unwrap(),
            "--option",
            "substituters",
            "",
        ])
        .arg(dir.join("cache.nix"))
        .args(["-A", "top"])
        .output()
        .unwrap();
    ok(out).trim().to_owned()
}

#[test]
fn realise_substitutes_from_caches_nix_wrote() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-subst");
    let (sk, _pk, public) = keypair(&dir, "test-1");
    let (src, drv, top, dep) = built_store(&dir, "src");
    let sk = sk.to_str().unwrap();
    for comp in ["xz", "zstd", "none"] {
        let cache = dir.join(format!("nix-{comp}"));
        let url = format!(
            "file://{}?compression={comp}&secret-key={sk}",
            cache.display()
        );
        ok(nix(&src, "nix", &["copy", "--to", &url, &top]));
        let ours = dir.join(format!("firn-{comp}"));
        assert_eq!(instantiate_into(&ours, &dir), drv);
        // The dry run says what Nix's says.
        let theirs = dir.join(format!("nixdry-{comp}"));
        instantiate_into(&theirs, &dir);
        let said = |o: Output| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| !l.starts_with("warning:"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let firn_dry = said({
            let url = format!("file://{}", cache.display());
            firn_at(
                &ours,
                &[
                    "--option",
                    "substituters",
                    &url,
                    "--option",
                    "trusted-public-keys",
                    &public,
                    "realise",
                    "--dry-run",
                    &drv,
                ],
                None,
            )
        });
        let nix_dry = said(realise_from(
            "nix-store",
            &theirs,
            &cache,
            &public,
            &["--dry-run"],
            &drv,
        ));
        assert_eq!(firn_dry, nix_dry, "{comp}: dry run");
        assert!(
            firn_dry[0].starts_with("these 2 paths will be fetched ("),
            "{firn_dry:?}"
        );
        // The real run fetches, builds nothing, and gives Nix's outputs.
        let out = realise_from(firn_bin(), &ours, &cache, &public, &[], &drv);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(ok(out).trim(), top, "{comp}: {err}");
        assert!(!err.contains("building"), "{comp}: built something: {err}");
        assert!(
            err.contains(&format!("copying path '{dep}' from 'file://")),
            "{err}"
        );
        for p in [&dep, &top] {
            assert_eq!(hash_of(&ours, p), hash_of(&src, p), "{comp}: {p}");
        }
        assert_verifies(&ours, comp);
    }
    let good = dir.join("nix-none");

    // An output path itself (no derivation in the store) is fetched with its closure, as
    // `nix-store -r PATH` does; the dry runs agree.
    let (ours, theirs) = (dir.join("firn-path"), dir.join("nix-path"));
    let url = format!("file://{}", good.display());
    let with = [
        "--option",
        "substituters",
        &url,
        "--option",
        "trusted-public-keys",
        &public,
    ];
    let dry = |o: Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let firn_dry = dry(firn_at(
        &ours,
        &[&with[..], &["realise", "--dry-run", &top]].concat(),
        None,
    ));
    let nix_dry = dry(nix(
        &theirs,
        "nix-store",
        &[&with[..], &["-r", "--dry-run", &top]].concat(),
    ));
    assert_eq!(firn_dry, nix_dry);
    let out = firn_at(&ours, &[&with[..], &["realise", &top]].concat(), None);
    assert_eq!(ok(out).trim(), top);
    assert_eq!(hash_of(&ours, &dep), hash_of(&src, &dep));
    assert_verifies(&ours, "output path");
    let absent = format!("/nix/store/{}-absent", "a".repeat(32));
    let out = firn_at(&ours, &[&with[..], &["realise", &absent]].concat(), None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no substituter that can build it"));

    // A bad signature: the cache is skipped (with Nix's warning) and the path is built.
    let spoilt = dir.join("badsig");
    copy_tree(&good, &spoilt);
    for p in [&dep, &top] {
        let f = narinfo_file(&spoilt, p);
        let text = fs::read_to_string(&f).unwrap();
        let sig = text
            .lines()
            .find(|l| l.starts_with("Sig: "))
            .unwrap()
            .to_owned();
        fs::write(
            &f,
            text.replace(&sig, &format!("Sig: test-1:{}==", "A".repeat(86))),
        )
        .unwrap();
    }
    let root = dir.join("firn-badsig");
    instantiate_into(&root, &dir);
    let out = realise_from(firn_bin(), &root, &spoilt, &public, &[], &drv);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top);
    assert!(
        err.contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{err}"
    );
    assert!(err.contains("building '"), "{err}");
    assert_eq!(hash_of(&root, &top), hash_of(&src, &top));

    // A truncated NAR: the derivation fails, nothing of the closure becomes valid; with
    // `fallback` it is built instead.
    let spoilt = dir.join("truncated");
    copy_tree(&good, &spoilt);
    let nar = spoilt.join(&narinfo(&spoilt, &top)["URL"]);
    let data = fs::read(&nar).unwrap();
    fs::write(&nar, &data[..data.len() - 10]).unwrap();
    let root = dir.join("firn-truncated");
    instantiate_into(&root, &dir);
    let out = realise_from(firn_bin(), &root, &spoilt, &public, &[], &drv);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("substituting"), "{err}");
    assert!(!err.contains("building '"), "{err}");
    for p in [&dep, &top] {
        assert!(
            !nix(&root, "nix-store", &["-q", "--hash", p])
                .status
                .success(),
            "{p}"
        );
    }
    assert_verifies(&root, "truncated");
    let out = realise_from(
        firn_bin(),
        &root,
        &spoilt,
        &public,
        &["--option", "fallback", "true"],
        &drv,
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(err.contains("building '"), "{err}");
    assert_eq!(hash_of(&root, &top), hash_of(&src, &top));
    assert_verifies(&root, "fallback");
    remove(&dir);
}

/// The status line of a raw HTTP/1.0 request to `addr`.
fn http_status(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn serve_cache_is_a_binary_cache_real_nix_substitutes_from() {
    if !can_build() || !have_nix() {
        return;
    }
    use std::io::BufRead;
    let dir = tempdir("cache-serve");
    let (sk, _pk, public) = keypair(&dir, "test-1");
    let (src, _drv, top, dep) = built_store(&dir, "src");
    let mut child = firn_command()
        .args(["--store", src.to_str().unwrap()])
        .args(["--option", "secret-key-files", sk.to_str().unwrap()])
        .args(["serve-cache", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_owned();
    let addr = url.strip_prefix("http://").unwrap().to_owned();
    // Real Nix substitutes the closure over HTTP, checking the server's signatures.
    let fresh = dir.join("fresh");
    let out = command("nix-store")
        .env("NIX_CONF_DIR", tempdir_none())
        .env("XDG_CACHE_HOME", dir.join("xdg-cache"))
        .args(["--store", fresh.to_str().unwrap(), "-r", &top])
        .args(["--option", "substituters", &url])
        .args(["--option", "trusted-public-keys", &public])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(
        err.contains(&format!("copying path '{dep}' from '{url}'")),
        "{err}"
    );
    for p in [&dep, &top] {
        assert_eq!(hash_of(&fresh, p), hash_of(&src, p), "{p}");
    }
    assert_verifies(&fresh, "served");
    // firn substitutes from it too: `realise` builds nothing, `copy --from` copies.
    let ours = dir.join("firn-http");
    let drv = instantiate_into(&ours, &dir);
    let out = realise_from_url(&ours, &url, &public, &drv);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(!err.contains("building"), "{err}");
    assert!(
        err.contains(&format!("copying path '{dep}' from '{url}'")),
        "{err}"
    );
    assert_eq!(hash_of(&ours, &top), hash_of(&src, &top));
    assert_verifies(&ours, "firn from http");
    let other = dir.join("firn-http-copy");
    let out = firn_at(
        &other,
        &[
            "--option",
            "trusted-public-keys",
            &public,
            "copy",
            "--from",
            &url,
            &top,
        ],
        None,
    );
    assert_eq!(ok(out), format!("{dep}\n{top}\n"));
    assert_verifies(&other, "copy --from http");
    // Read-only, and nothing but the cache's own files.
    let hash = &top["/nix/store/".len()..][..32];
    assert!(http_status(&addr, &format!("HEAD /{hash}.narinfo HTTP/1.0\r\n\r\n")).contains(" 200"));
    for (req, status) in [
        ("GET /../../../../etc/passwd HTTP/1.0\r\n\r\n", " 404"),
        (
            "GET /nar/../../../../etc/passwd.nar HTTP/1.0\r\n\r\n",
            " 404",
        ),
        (
            "GET /nar/00000000000000000000000000000000.nar HTTP/1.0\r\n\r\n",
            " 404",
        ),
        (
            "GET /00000000000000000000000000000000.narinfo HTTP/1.0\r\n\r\n",
            " 404",
        ),
        ("GET /nix/store HTTP/1.0\r\n\r\n", " 404"),
        (
            &format!("PUT /{hash}.narinfo HTTP/1.0\r\nContent-Length: 1\r\n\r\nx"),
            " 405",
        ),
        (&format!("DELETE /{hash}.narinfo HTTP/1.0\r\n\r\n"), " 405"),
    ] {
        assert!(http_status(&addr, req).contains(status), "{req:?}");
    }
    for (req, status) in [
        ("GARBAGE\r\n\r\n", " 400"),
        (
            &format!("GET /{hash}.narinfo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            " 400",
        ),
        (
            &format!("GET /{hash}.narinfo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            " 400",
        ),
    ] {
        assert!(http_status(&addr, req).contains(status), "{req:?}");
    }
    // A head over the limit: its answer may be lost to the reset of a socket closed
    // with unread input, so what is asserted is that the server goes on serving.
    let long = format!(
        "GET /{hash}.narinfo HTTP/1.1\r\nX: {}\r\n\r\n",
        "y".repeat(20000)
    );
    let _ = http_status(&addr, &long);
    let again = http_status(&addr, &format!("HEAD /{hash}.narinfo HTTP/1.0\r\n\r\n"));
    assert!(again.contains(" 200"), "{again:?}");
    keep_alive_burst(&addr, hash);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    remove(&dir);
}

/// 40 keep-alive connections opened at once, each then asking twice: every request is
/// answered on its connection. (Nix opens 25 at once; the server firn had before,
/// tiny_http, left some of such a burst unread until older connections closed, and
/// `nix copy` stalled for its 300 s timeout.)
fn keep_alive_burst(addr: &str, hash: &str) {
    use std::io::{BufRead, BufReader, Read, Write};
    let conns: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut readers: Vec<_> = conns
        .iter()
        .map(|c| {
            c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            BufReader::new(c.try_clone().unwrap())
        })
        .collect();
    for round in 0..2 {
        for mut c in &conns {
            write!(c, "GET /{hash}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }
        for (i, r) in readers.iter_mut().enumerate() {
            let mut status = String::new();
            r.read_line(&mut status)
                .unwrap_or_else(|e| panic!("connection {i}, round {round}: {e}"));
            assert!(
                status.starts_with("HTTP/1.1 200"),
                "{i}/{round}: {status:?}"
            );
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            assert!(String::from_utf8_lossy(&body).starts_with("StorePath: /nix/store/"));
        }
    }
}

/// `firn realise DRV` in `root` with the substituter `url`, in the sandbox.
fn realise_from_url(root: &Path, url: &str, key: &str, drv: &str) -> Output {
    firn_at(
        root,
        &[
            "--option",
            "substituters",
            url,
            "--option",
            "trusted-public-keys",
            key,
            "--option",
            "sandbox",
            "true",
            "--option",
            "sandbox-paths",
            "/bin/sh=/bin/busybox",
            "realise",
            drv,
        ],
        None,
    )
}

#[test]
fn an_unreachable_substituter_is_skipped_and_the_derivation_built() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-unreachable");
    let (_src, drv, top, _dep) = built_store(&dir, "src");
    let ours = dir.join("firn");
    assert_eq!(instantiate_into(&ours, &dir), drv);
    // Port 9 (discard) on localhost: nothing listens there.
    let out = realise_from_url(
        &ours,
        "http://127.0.0.1:9",
        "k:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        &drv,
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(
        err.contains("warning: cannot use the substituter 'http://127.0.0.1:9'"),
        "{err}"
    );
    assert!(err.contains("building '"), "{err}");
    remove(&dir);
}

/// fetchurl.sh's "substitute from a different store dir": a cache real Nix wrote for
/// `/fnord/store` (`?store=/fnord/store`) provides a fixed output under the path its
/// content gives in our store, though its builder could only fail; an input-addressed
/// path is not looked up there (its path says nothing about its content).
#[test]
fn fixed_outputs_substitute_from_a_cache_of_another_store_dir() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-foreign");
    let file = dir.join("payload.txt");
    fs::write(&file, "fetched from /fnord/store\n").unwrap();
    let cache = dir.join("other");
    let other = format!("file://{}?store=/fnord/store", cache.display());
    let mut c = command("nix");
    c.args([
        "--extra-experimental-features",
        "nix-command",
        "--store",
        &other,
    ])
    .args(["store", "add-file"])
    .arg(&file)
    .env("NIX_CONF_DIR", tempdir_none());
    let theirs = ok(c.output().unwrap());
    assert!(theirs.starts_with("/fnord/store/"), "{theirs}");
    let hash = ok(nix(
        &dir.join("tmp"),
        "nix-hash",
        &["--flat", "--type", "sha256", file.to_str().unwrap()],
    ));
    let expr = dir.join("fod.nix");
    fs::write(
        &expr,
        format!(
            "{{ fod = derivation {{ name = \"payload.txt\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
             args = [\"-c\" \"exit 1\"]; outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; outputHash = \"{}\"; }}; \
             ia = derivation {{ name = \"payload.txt\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [\"-c\" \"exit 1\"]; }}; }}",
            hash.trim()
        ),
    )
    .unwrap();
    let root = dir.join("root");
    let run = |attr: &str| {
        let drv = instantiate_attr(&root, &expr, attr);
        firn_at(
            &root,
            &[
                "--option",
                "substituters",
                &other,
                "--option",
                "sandbox-paths",
                "/bin/sh=/bin/busybox",
                "realise",
                &drv,
            ],
            None,
        )
    };
    let out = ok(run("fod"));
    let out = out.trim();
    assert!(
        out.starts_with("/nix/store/") && out.ends_with("-payload.txt"),
        "{out}"
    );
    let real = root.join(out.trim_start_matches('/'));
    assert_eq!(fs::read(&real).unwrap(), fs::read(&file).unwrap());
    let ia = run("ia");
    assert_eq!(
        ia.status.code(),
        Some(100),
        "{}",
        String::from_utf8_lossy(&ia.stderr)
    );
    assert_verifies(&root, "after a foreign-store substitution");
    remove(&dir);
}

/// `firn copy` shows a status line on a terminal (`[n/N] copying '…'`, cleared at the
/// end) and nothing on stderr otherwise; stdout lists the copied paths either way.
#[test]
fn copy_shows_progress_on_a_terminal_only() {
    let dir = tempdir("cache-progress");
    let f = dir.join("f");
    fs::write(&f, "progress\n").unwrap();
    let root = dir.join("root");
    let p = ok(firn_at(&root, &["add", f.to_str().unwrap()], None));
    let p = p.trim();
    let plain = firn_at(
        &root,
        &[
            "copy",
            "--to",
            &format!("file://{}", dir.join("c1").display()),
            p,
        ],
        None,
    );
    assert_eq!(ok(plain.clone()).trim(), p);
    assert!(
        plain.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    if Command::new("script").arg("--version").output().is_err() {
        assert!(!is_ci(), "script(1) (util-linux) is needed in CI");
        println!("SKIPPED: no script(1) to run firn on a terminal");
        remove(&dir);
        return;
    }
    let log = dir.join("typescript");
    let cmd = format!(
        "{} --store {} copy --to file://{} {p}",
        firn_bin(),
        root.display(),
        dir.join("c2").display()
    );
    let st = Command::new("script")
        .args(["-qec", &cmd])
        .arg(&log)
        .env("COLUMNS", "200")
        .output()
        .unwrap();
    assert!(st.status.success());
    let seen = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
    assert!(seen.contains(&format!("[1/1] copying '{p}'")), "{seen:?}");
    assert!(
        seen.contains("\r\x1b[K"),
        "the status line is cleared: {seen:?}"
    );
    remove(&dir);
}

/// `copy --to` compresses NARs on several threads but writes narinfos in references-
/// first order, each after its NAR: when a path's content is corrupt, the copy fails
/// with Nix's error, that path and everything referring to it get no narinfo, and what
/// it refers to (already copied) stays readable.
#[test]
fn copy_to_a_corrupt_path_fails_without_narinfos_for_it_or_its_referrers() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-corrupt");
    let (src, _drv, top, dep) = built_store(&dir, "src");
    let real_top = src.join(top.trim_start_matches('/'));
    // Damage the top path's content (its dep is copied first and stays fine).
    let hi = real_top.join("hi");
    fs::set_permissions(
        &real_top,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    fs::set_permissions(&hi, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&hi, "changed\n").unwrap();
    let cache = dir.join("cache");
    let out = firn_at(
        &src,
        &["copy", "--to", &format!("file://{}", cache.display()), &top],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        !narinfo_file(&cache, &top).exists(),
        "a narinfo for the corrupt path"
    );
    assert!(
        narinfo_file(&cache, &dep).exists(),
        "the reference was copied first"
    );
    // What is there is a cache real Nix reads.
    let fresh = dir.join("fresh");
    ok(nix(
        &fresh,
        "nix",
        &[
            "copy",
            "--from",
            &format!("file://{}", cache.display()),
            "--no-check-sigs",
            &dep,
        ],
    ));
    remove(&dir);
}

/// firn on `root` with `NIX_SSL_CERT_FILE` set to `ca` (and a narinfo disk cache of
/// that store's own, so each command asks the server).
fn firn_with_ca(root: &Path, ca: &Path, args: &[&str]) -> Output {
    let mut c = firn_command();
    c.arg("--store")
        .arg(root)
        .args(args)
        .env("NIX_SSL_CERT_FILE", ca)
        .env("XDG_CACHE_HOME", root.with_extension("xdg"));
    c.output().unwrap()
}

/// An https cache (`openssl s_server -WWW` over a cache `nix copy --to file://` wrote,
/// with a throw-away CA): `firn copy --from`, substitution in `firn realise` and real
/// Nix get the same paths; a certificate of another CA, or a CA bundle that cannot be
/// read, is one `error:` line and nothing is registered.
#[test]
fn https_caches_check_certificates_against_ssl_cert_file() {
    if !can_build() || !have_nix() || !have_openssl() {
        return;
    }
    let dir = tempdir("cache-https");
    let (src, drv, top, dep) = built_store(&dir, "src");
    let (sk, _pk, public) = keypair(&dir, "https-test-1");
    let cache = dir.join("cache");
    let to = format!("file://{}?secret-key={}", cache.display(), sk.display());
    ok(nix(&src, "nix", &["copy", "--to", &to, &top]));
    let (ca, cert, key) = tls_ca(&dir, "good");
    let (other_ca, _, _) = tls_ca(&dir, "other");
    let (_server, url) = https_server(&cache, &cert, &key);

    // copy --from with the CA bundle from NIX_SSL_CERT_FILE.
    let fs1 = dir.join("copy");
    let out = firn_with_ca(
        &fs1,
        &ca,
        &[
            "--option",
            "trusted-public-keys",
            &public,
            "copy",
            "--from",
            &url,
            &top,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut got: Vec<String> = ok(out).lines().map(str::to_owned).collect();
    got.sort();
    let mut want = vec![top.clone(), dep.clone()];
    want.sort();
    assert_eq!(got, want, "{err}");
    assert_eq!(hash_of(&fs1, &top), hash_of(&src, &top));
    assert_verifies(&fs1, "after copy --from https");

    // Substitution in realise, the bundle from the setting (it wins over the variable).
    let fs2 = dir.join("realise");
    assert_eq!(instantiate_into(&fs2, &dir), drv);
    let out = firn_with_ca(
        &fs2,
        &other_ca,
        &[
            "--option",
            "ssl-cert-file",
            ca.to_str().unwrap(),
            "--option",
            "substituters",
            &url,
            "--option",
            "trusted-public-keys",
            &public,
            "realise",
            &drv,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(
        err.contains(&format!("copying path '{top}' from '{url}'")),
        "{err}"
    );
    assert!(!err.contains("building '"), "{err}");
    assert_eq!(hash_of(&fs2, &top), hash_of(&src, &top));

    // Real Nix, the oracle, substitutes the same from the same server.
    let ns = dir.join("nix");
    let mut c = command("nix-store");
    c.args([
        "--store",
        ns.to_str().unwrap(),
        "--option",
        "substituters",
        &url,
    ])
    .args(["--option", "trusted-public-keys", &public, "-r", &top])
    .env("NIX_CONF_DIR", tempdir_none())
    .env("XDG_CACHE_HOME", dir.join("nix-xdg"))
    .env("NIX_SSL_CERT_FILE", &ca);
    assert_eq!(ok(c.output().unwrap()).trim(), top);
    assert_eq!(hash_of(&ns, &top), hash_of(&src, &top));

    // The daemon substitutes from it with its own ssl-cert-file, for a real Nix client.
    let droot = dir.join("daemon");
    let socket = droot.join("nix/var/nix/daemon-socket/socket");
    let mut c = firn_command();
    c.arg("--store")
        .arg(&droot)
        .args(["--option", "ssl-cert-file", ca.to_str().unwrap(), "daemon"])
        .env("NIX_SSL_CERT_FILE", &other_ca)
        .env("XDG_CACHE_HOME", dir.join("daemon-xdg"))
        .env_remove("NIX_DAEMON_SOCKET_PATH")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _daemon = Killed(c.spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no daemon socket");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let client = |cmd: &str, args: &[&str]| {
        let mut c = command_isolated(cmd);
        c.args(args)
            .env(
                "NIX_REMOTE",
                format!("unix://{}?root={}", socket.display(), droot.display()),
            )
            .env("HOME", &droot)
            .env("NIX_STATE_DIR", droot.join("client-state"));
        c.output().unwrap()
    };
    let expr = dir.join("cache.nix");
    let out = client("nix-instantiate", &[expr.to_str().unwrap(), "-A", "top"]);
    assert_eq!(ok(out).trim(), drv);
    let out = client(
        "nix-store",
        &[
            "--option",
            "substituters",
            &url,
            "--option",
            "trusted-public-keys",
            &public,
            "-r",
            &drv,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(err.contains("copying path"), "{err}");
    assert_eq!(hash_of(&droot, &top), hash_of(&src, &top));

    // A certificate that does not chain to the bundle: one clear line, nothing valid.
    let fs3 = dir.join("refused");
    let out = firn_with_ca(
        &fs3,
        &other_ca,
        &[
            "--option",
            "trusted-public-keys",
            &public,
            "copy",
            "--from",
            &url,
            &top,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: unable to download '{url}/nix-cache-info': "
        )) && err.contains("UnknownIssuer")
            && err.contains(other_ca.to_str().unwrap()),
        "{err}"
    );
    let base = top.rsplit('/').next().unwrap();
    assert!(!store_entries(&fs3).iter().any(|e| e.contains(base)));
    assert_verifies(&fs3, "after a refused certificate");

    // A bundle that cannot be read: one line naming it and the setting.
    let missing = dir.join("no-such-bundle.pem");
    let out = firn_with_ca(
        &fs3,
        &missing,
        &[
            "--option",
            "trusted-public-keys",
            &public,
            "copy",
            "--from",
            &url,
            &top,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [format!(
            "error: cannot use the CA bundle '{}' (setting 'ssl-cert-file'): No such file or directory",
            missing.display()
        )],
    );
    // Substitution skips such a cache with a warning and builds.
    let fs4 = dir.join("built");
    assert_eq!(instantiate_into(&fs4, &dir), drv);
    let out = firn_with_ca(
        &fs4,
        &other_ca,
        &[
            "--option",
            "substituters",
            &url,
            "--option",
            "trusted-public-keys",
            &public,
            "--option",
            "sandbox",
            "true",
            "--option",
            "sandbox-paths",
            "/bin/sh=/bin/busybox",
            "realise",
            &drv,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), top, "{err}");
    assert!(
        err.contains(&format!("warning: cannot use the substituter '{url}'")),
        "{err}"
    );
    assert!(err.contains("building '"), "{err}");
    remove(&dir);
}

/// What [`counting_server`] records: the paths asked, and the most requests it was
/// answering at once.
#[derive(Default)]
struct ServerLog {
    paths: std::sync::Mutex<Vec<String>>,
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

/// A plain HTTP file server over `dir` on 127.0.0.1 (404 for a missing file, one
/// request per connection, a thread each) that records the paths asked and waits
/// `nar_delay` before answering for a NAR: its URL and the record.
fn counting_server(
    dir: &Path,
    nar_delay: std::time::Duration,
) -> (String, std::sync::Arc<ServerLog>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::Ordering::SeqCst;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(ServerLog::default());
    let (dir, record) = (dir.to_path_buf(), log.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (dir, record) = (dir.clone(), record.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                record.paths.lock().unwrap().push(path.clone());
                let now = record.in_flight.fetch_add(1, SeqCst) + 1;
                record.most.fetch_max(now, SeqCst);
                if path.starts_with("/nar/") {
                    std::thread::sleep(nar_delay);
                }
                let file = dir.join(path.trim_start_matches('/'));
                let _ = match (path.contains(".."), fs::read(&file)) {
                    (false, Ok(body)) => stream
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| stream.write_all(&body)),
                    _ => stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
                record.in_flight.fetch_sub(1, SeqCst);
            });
        }
    });
    (url, log)
}

/// The rows of the disk cache `xdg/nix/binary-cache-v6.sqlite`, each column quoted,
/// without the times and ids: (BinaryCaches, NARs).
fn disk_cache_rows(xdg: &Path) -> (Vec<String>, Vec<String>) {
    let db = rusqlite::Connection::open(xdg.join("nix/binary-cache-v6.sqlite")).unwrap();
    let rows = |sql: &str| -> Vec<String> {
        let mut st = db.prepare(sql).unwrap();
        let v = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
        v.map(Result::unwrap).collect()
    };
    (
        rows("select quote(url)||' '||quote(storeDir)||' '||quote(wantMassQuery)||' '||quote(priority) from BinaryCaches order by url"),
        rows("select quote(hashPart)||' '||quote(namePart)||' '||quote(url)||' '||quote(compression)||' '||quote(fileHash)||' '||quote(fileSize)||' '||quote(narHash)||' '||quote(narSize)||' '||quote(refs)||' '||quote(deriver)||' '||quote(sigs)||' '||quote(ca)||' '||quote(present) from NARs order by hashPart"),
    )
}

/// Nix's narinfo disk cache: firn writes the rows real Nix writes (column for column),
/// each reads the other's (the server is asked for no narinfo and no nix-cache-info
/// again), negative entries spare the server until `narinfo-cache-negative-ttl` has
/// passed, and `narinfo-cache-positive-ttl` bounds the positive ones.
#[test]
fn narinfo_disk_cache_is_shared_with_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-disk");
    let (src, _drv, top, dep) = built_store(&dir, "src");
    let (sk, _pk, public) = keypair(&dir, "disk-test-1");
    let cache = dir.join("cache");
    let to = format!("file://{}?secret-key={}", cache.display(), sk.display());
    ok(nix(&src, "nix", &["copy", "--to", &to, &top]));
    let (url, log) = counting_server(&cache, std::time::Duration::ZERO);
    let take = || std::mem::take(&mut *log.paths.lock().unwrap());
    let asked = |what: &str, log: &[String]| log.iter().filter(|p| p.ends_with(what)).count();
    let firn = |root: &Path, xdg: &Path, extra: &[&str], path: &str| {
        let mut c = firn_command();
        c.arg("--store")
            .arg(root)
            .args(["--option", "trusted-public-keys", &public])
            .args(extra)
            .args(["copy", "--from", &url, path])
            .env("XDG_CACHE_HOME", xdg);
        c.output().unwrap()
    };
    let real_nix = |root: &Path, xdg: &Path| {
        let mut c = command("nix-store");
        c.args([
            "--store",
            root.to_str().unwrap(),
            "--option",
            "substituters",
            &url,
        ])
        .args(["--option", "trusted-public-keys", &public, "-r", &top])
        .env("NIX_CONF_DIR", tempdir_none())
        .env("XDG_CACHE_HOME", xdg);
        assert_eq!(ok(c.output().unwrap()).trim(), top);
    };

    // firn first: it asks the server, then nothing but the NARs.
    let (x1, x2) = (dir.join("xdg1"), dir.join("xdg2"));
    ok(firn(&dir.join("f1"), &x1, &[], &top));
    let l = take();
    assert_eq!(
        (asked("/nix-cache-info", &l), asked(".narinfo", &l)),
        (1, 2),
        "{l:?}"
    );
    ok(firn(&dir.join("f2"), &x1, &[], &top));
    let l = take();
    assert_eq!(
        (asked("/nix-cache-info", &l), asked(".narinfo", &l)),
        (0, 0),
        "{l:?}"
    );
    assert_eq!(asked(".nar.xz", &l), 2, "{l:?}");
    // Real Nix takes firn's rows.
    real_nix(&dir.join("n1"), &x1);
    let l = take();
    assert_eq!(
        (asked("/nix-cache-info", &l), asked(".narinfo", &l)),
        (0, 0),
        "{l:?}"
    );

    // Real Nix first, in a fresh disk cache: its rows are firn's, and firn takes them.
    real_nix(&dir.join("n2"), &x2);
    let l = take();
    assert_eq!(asked(".narinfo", &l), 2, "{l:?}");
    let (nix_rows, firn_rows) = (disk_cache_rows(&x2), disk_cache_rows(&x1));
    assert_eq!(nix_rows, firn_rows);
    assert_eq!(nix_rows.1.len(), 2, "{nix_rows:?}");
    let f3 = dir.join("f3");
    ok(firn(&f3, &x2, &[], &top));
    let l = take();
    assert_eq!(
        (asked("/nix-cache-info", &l), asked(".narinfo", &l)),
        (0, 0),
        "{l:?}"
    );
    assert_eq!(hash_of(&f3, &dep), hash_of(&src, &dep));
    assert_verifies(&f3, "after copy --from through the disk cache");

    // A path the cache lacks: asked once, then known absent, until the TTL passes.
    let missing = format!("{}/{}-missing", "/nix/store", "0".repeat(32));
    for round in 0..2 {
        let out = firn(&dir.join("f4"), &x1, &[], &missing);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            err,
            format!("error: path '{missing}' is not valid in binary cache '{url}'\n")
        );
        let l = take();
        assert_eq!(
            asked(".narinfo", &l),
            usize::from(round == 0),
            "{round}: {l:?}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let ttl1 = ["--option", "narinfo-cache-negative-ttl", "1"];
    assert!(!firn(&dir.join("f4"), &x1, &ttl1, &missing).status.success());
    assert_eq!(asked(".narinfo", &take()), 1);
    // Positive entries count for narinfo-cache-positive-ttl seconds.
    let ttl0 = ["--option", "narinfo-cache-positive-ttl", "0"];
    ok(firn(&dir.join("f5"), &x1, &ttl0, &top));
    assert_eq!(asked(".narinfo", &take()), 2);
    remove(&dir);
}

const CA_EXPR: &str = r#"
let sh = "/bin/sh";
  ca = args: derivation ({ system = "x86_64-linux"; builder = sh; __contentAddressed = true;
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; } // args);
in rec {
  dep = ca { name = "ca-cache-dep"; args = ["-c" "echo dep > $out"]; };
  top = ca { name = "ca-cache-top"; args = ["-c" "echo ${dep} > $out"]; };
}
"#;

/// The files of `dir/realisations` with their bytes.
fn doi_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir.join("realisations"))
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Realisations in caches: `firn copy --to` of CA outputs writes
/// `realisations/<id>.doi` byte for byte as `nix copy --to` writes them (Nix writes
/// those of the installable it copies: the unresolved derivation's with
/// `dependentRealisations` for `-f FILE ATTR`, the resolved one's for a `.drv`; firn,
/// given the output paths, writes every realisation of each), and a cache's
/// realisations are read back by id (`Substituters::query_realisation`), from a cache
/// real Nix wrote, as the store has them.
#[test]
fn ca_outputs_copy_with_their_realisations_as_nix_writes_them() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-realisations");
    let root = dir.join("st");
    let expr = dir.join("ca.nix");
    fs::write(&expr, CA_EXPR).unwrap();
    let ca = [
        "--option",
        "experimental-features",
        "nix-command ca-derivations",
    ];
    let mut args = ca.to_vec();
    args.extend(["--option", "sandbox", "true", "--option", "sandbox-paths"]);
    args.extend(["/bin/sh=/bin/busybox", "--no-out-link", "-A", "top"]);
    args.push(expr.to_str().unwrap());
    let top = ok(nix(&root, "nix-build", &args)).trim().to_owned();
    let drv = ok(nix(
        &root,
        "nix-store",
        &[&ca[..], &["-q", "--deriver", &top]].concat(),
    ))
    .trim()
    .to_owned();
    let dep = ok(nix(&root, "nix-store", &["-q", "--references", &top]))
        .trim()
        .to_owned();

    let (nix_a, nix_b, ours) = (dir.join("nix-a"), dir.join("nix-b"), dir.join("firn"));
    let url = |d: &Path| format!("file://{}", d.display());
    let copy = |to: &Path, what: &[&str]| {
        let mut a = ca.to_vec();
        a.extend(["copy", "--to"]);
        let u = url(to);
        a.push(&u);
        a.extend(what);
        ok(nix(&root, "nix", &a));
    };
    copy(&nix_a, &["-f", expr.to_str().unwrap(), "top"]);
    copy(&nix_b, &[&drv]);
    let out = firn_at(
        &root,
        &[&ca[..], &["copy", "--to", &url(&ours), &top]].concat(),
        None,
    );
    let mut got: Vec<String> = ok(out).lines().map(str::to_owned).collect();
    got.sort();
    let mut want = vec![top.clone(), dep.clone()];
    want.sort();
    assert_eq!(got, want);

    let mut nixs = doi_files(&nix_a);
    nixs.extend(doi_files(&nix_b));
    assert_eq!(nixs.len(), 3, "{:?}", nixs.keys());
    let firns = doi_files(&ours);
    for (name, bytes) in &firns {
        assert_eq!(
            Some(String::from_utf8_lossy(bytes)),
            nixs.get(name).map(|b| String::from_utf8_lossy(b)),
            "{name}"
        );
    }
    assert_eq!(
        firns.keys().collect::<Vec<_>>(),
        nixs.keys().collect::<Vec<_>>()
    );
    // Without the feature the store has no realisations and none are written.
    let plain = dir.join("firn-plain");
    ok(firn_at(&root, &["copy", "--to", &url(&plain), &top], None));
    assert!(doi_files(&plain).is_empty());

    // Reading them back from the cache real Nix wrote, by id, through the substituters.
    let sd = firn_derivation::StoreDir::new("/nix/store").unwrap();
    let (subs, warnings) = firn_cache::substitute::Substituters::open(
        &sd,
        &Default::default(),
        &[url(&nix_a)],
        &[],
        &[],
        true,
        false,
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    for name in nixs.keys().filter(|n| doi_files(&nix_a).contains_key(*n)) {
        let id = firn_derivation::DrvOutput::parse(name.trim_end_matches(".doi")).unwrap();
        let (r, _) = subs.query_realisation(&id).unwrap().unwrap();
        assert_eq!(r.to_json().as_bytes(), &nixs[name][..]);
        let p = sd.display(&r.out_path);
        assert!(p == top || p == dep, "{p}");
    }
    let unknown = firn_derivation::DrvOutput::parse(&format!("sha256:{}!out", "0".repeat(64)));
    assert!(subs.query_realisation(&unknown.unwrap()).unwrap().is_none());
    remove(&dir);
}

/// A content-addressed derivation is substituted through its realisation (Nix's
/// `DrvOutputSubstitutionGoal`): from a cache real Nix wrote with `nix copy --to` of the
/// derivation (its realisations and NARs), a fresh store realises `top` by fetching,
/// building nothing, registers the realisation (a second realise finds it), and gets
/// Nix's paths.
#[test]
fn ca_derivations_are_substituted_through_their_realisations() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cache-ca-substitute");
    let (root, fresh) = (dir.join("st"), dir.join("fresh"));
    let expr = dir.join("ca.nix");
    fs::write(&expr, CA_EXPR).unwrap();
    let ca = [
        "--option",
        "experimental-features",
        "nix-command ca-derivations",
    ];
    let mut args = ca.to_vec();
    args.extend(["--option", "sandbox", "true", "--option", "sandbox-paths"]);
    args.extend(["/bin/sh=/bin/busybox", "--no-out-link", "-A", "top"]);
    args.push(expr.to_str().unwrap());
    let top = ok(nix(&root, "nix-build", &args)).trim().to_owned();
    let cache = dir.join("cache");
    let url = format!("file://{}", cache.display());
    let mut a = ca.to_vec();
    a.extend(["copy", "--to", &url, "-f", expr.to_str().unwrap(), "top"]);
    ok(nix(&root, "nix", &a));
    let mut a = ca.to_vec();
    a.extend(["-A", "top", expr.to_str().unwrap()]);
    let drv = ok(nix(&fresh, "nix-instantiate", &a)).trim().to_owned();
    let realise = || {
        firn_at(
            &fresh,
            &[
                "--option",
                "experimental-features",
                "ca-derivations",
                "--option",
                "substituters",
                &url,
                "--option",
                "require-sigs",
                "false",
                "--option",
                "sandbox-paths",
                "/bin/sh=/bin/busybox",
                "realise",
                &drv,
            ],
            None,
        )
    };
    let o = realise();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(ok(o).trim(), top, "{err}");
    assert!(!err.contains("building '"), "nothing is built:\n{err}");
    assert!(err.contains("copying path '"), "{err}");
    // The realisation is registered: again, nothing is fetched or built.
    let o = realise();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(ok(o).trim(), top);
    assert!(
        !err.contains("copying path") && !err.contains("building"),
        "{err}"
    );
    assert_verifies(&fresh, "fresh");
    remove(&dir);
}

/// Parallel downloads: a closure of 12 text paths, each referring to the one before,
/// from an HTTP server that takes 300 ms per NAR comes in with several transfers at
/// once (in well under 12 × 300 ms), is registered references first (database ids
/// grow along the references) and verifies; a NAR with a wrong hash in the middle of
/// the closure leaves nothing valid and nothing staged.
#[test]
fn closures_download_in_parallel_and_register_references_first() {
    if !have_nix() {
        return;
    }
    let dir = tempdir("cache-parallel");
    let src = dir.join("src");
    let expr = "let chain = n: if n == 0 then builtins.toFile \"chain-0\" \"start\" \
                else builtins.toFile \"chain-${toString n}\" \"after ${chain (n - 1)}\"; \
                in chain 11";
    let out = nix(
        &src,
        "nix-instantiate",
        &["--eval", "--read-write-mode", "-E", expr],
    );
    let top = ok(out).trim().trim_matches('"').to_owned();
    let closure = ok(nix(&src, "nix-store", &["-qR", &top]));
    assert_eq!(closure.lines().count(), 12, "{closure}");
    let cache = dir.join("cache");
    ok(nix(
        &src,
        "nix",
        &["copy", "--to", &format!("file://{}", cache.display()), &top],
    ));

    let delay = std::time::Duration::from_millis(300);
    let (url, log) = counting_server(&cache, delay);
    let ours = dir.join("firn");
    let start = std::time::Instant::now();
    let out = firn_at(&ours, &["copy", "--from", &url, &top], None);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).lines().count(), 12, "{err}");
    let most = log.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most >= 4, "at most {most} requests at once");
    // One at a time would take 12 × 300 ms at least.
    assert!(took < delay * 8, "{took:?}");
    assert_verifies(&ours, "after a parallel copy --from");
    // References first: fetched, staged and printed in an order where each path comes
    // after its references (registered in one transaction, in path order as Nix does).
    let printed: Vec<String> = ok(firn_at(
        &dir.join("again"),
        &["copy", "--from", &url, &top],
        None,
    ))
    .lines()
    .map(str::to_owned)
    .collect();
    for (k, p) in printed.iter().enumerate() {
        let refs = ok(nix(&src, "nix-store", &["-q", "--references", p]));
        for r in refs.lines().filter(|r| *r != p) {
            let at = printed.iter().position(|q| q == r).unwrap();
            assert!(at < k, "{p} printed before its reference {r}");
        }
    }
    assert_eq!(printed.last(), Some(&top));

    // A NAR in the middle that is not the one its narinfo hashes: nothing is valid.
    let middle = closure.lines().nth(5).unwrap().to_owned();
    let info = narinfo(&cache, &middle);
    let nar = cache.join(&info["URL"]);
    let other = cache.join(&narinfo(&cache, closure.lines().next().unwrap())["URL"]);
    fs::copy(&other, &nar).unwrap();
    let bad = dir.join("bad");
    let out = firn_at(&bad, &["copy", "--from", &url, &top], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // Nix's wording, its three lines included.
    let want = format!(
        "error: importing '{middle}' from '{url}': size mismatch importing path '{middle}';\n  specified: "
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(store_entries(&bad).is_empty(), "{:?}", store_entries(&bad));
    assert_verifies(&bad, "after a failed parallel copy --from");
    remove(&dir);
}
