//! Nix's builtin builders, built by firn and by real Nix 2.8 from the same derivations
//! into separate stores: `builtin:buildenv` (a user environment with priorities, merged
//! directories, propagated packages, skipped files and a collision), `builtin:fetchurl`
//! (`file://` flat, `executable`, `unpack` of a NAR and of a `.nar.xz`, and `http://`
//! from a server this test runs, `https://` from `openssl s_server` with a certificate
//! nobody vouches for; a wrong hash and a missing file) and
//! `builtin:unpack-channel` (`.tar.xz` and `.tar.bz2` made here; a tarball with two
//! entries). Outputs must have the same paths and NAR hashes, failures the same exit
//! status and message; firn builds in the sandbox and without it.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

/// Realise `drv` in the store at `root` with `nix-store -r` or `firn realise` (`cmd`),
/// with `--option` pairs `opts`.
fn realise(cmd: &str, root: &Path, opts: &[(&str, &str)], drv: &str) -> Output {
    let mut args: Vec<String> = vec!["--store".into(), root.display().to_string()];
    for (k, v) in opts {
        args.extend(["--option".into(), (*k).into(), (*v).into()]);
    }
    if cmd == "nix-store" {
        args.extend(["--option".into(), "substituters".into(), String::new()]);
        args.push("-r".into());
    } else {
        args.push("realise".into());
    }
    args.push(drv.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(cmd, &args, None)
}

/// The NAR hash of store path `path` (as printed) in the store at `root`, by Nix.
fn nar_hash(root: &Path, path: &str) -> String {
    ok(run(
        "nix-store",
        &["--store", root.to_str().unwrap(), "-q", "--hash", path],
        None,
    ))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `error: …` lines of a build's output, without the builder-failed summary.
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("error: ") && !l.starts_with("error: builder for"))
        .map(str::to_owned)
        .collect()
}

/// Build attribute `attr` of `expr` with Nix (sandboxed: a store not at `/` always
/// is) and with firn in the sandbox and without it, each into its own store; assert
/// the same result; the output path on success.
fn build_all_ways(
    dir: &Path,
    expr: &Path,
    attr: &str,
    sandbox_paths: &str,
) -> (Output, Vec<(&'static str, Output)>) {
    let tag = attr.replace('.', "-");
    let nix_root = dir.join(format!("nix-{tag}"));
    let drv = instantiate_attr(&nix_root, expr, attr);
    let nix = realise(
        "nix-store",
        &nix_root,
        &[("sandbox", "true"), ("sandbox-paths", sandbox_paths)],
        &drv,
    );
    let mut firns = Vec::new();
    for (how, sandbox) in [("sandbox", "true"), ("no-sandbox", "false")] {
        let root = dir.join(format!("firn-{how}-{tag}"));
        assert_eq!(instantiate_attr(&root, expr, attr), drv);
        let firn = realise(
            firn_bin(),
            &root,
            &[("sandbox", sandbox), ("sandbox-paths", sandbox_paths)],
            &drv,
        );
        assert_eq!(
            firn.status.code(),
            nix.status.code(),
            "{attr} ({how}): firn: {}\nnix: {}",
            stderr(&firn),
            stderr(&nix)
        );
        if nix.status.success() {
            assert_eq!(
                firn.stdout, nix.stdout,
                "{attr} ({how}): the same output path"
            );
            let out = String::from_utf8(nix.stdout.clone()).unwrap();
            let out = out.trim();
            assert_eq!(
                nar_hash(&root, out),
                nar_hash(&nix_root, out),
                "{attr} ({how}): the same NAR"
            );
            assert_verifies(&root, attr);
        } else {
            // Nix's hash mismatch message takes three lines, firn's one
            // (docs/build.md): the first line of each error is compared.
            let first = |o: &Output| -> Vec<String> {
                error_lines(o)
                    .into_iter()
                    .map(|l| match l.find("': specified: ") {
                        Some(i) => l[..i + 2].to_owned(),
                        None => l,
                    })
                    .collect()
            };
            assert_eq!(first(&firn), first(&nix), "{attr} ({how}): the same error");
        }
        firns.push((how, firn));
    }
    (nix, firns)
}

const BUILDENV: &str = r#"
let
  mk = name: script: derivation {
    inherit name; system = "x86_64-linux"; builder = "/bin/busybox"; args = [ "sh" "-c" script ];
  };
  a = mk "a" "mkdir -p $out/bin $out/share/a $out/nix-support; echo a > $out/bin/a; echo x > $out/bin/common; echo ${c} > $out/nix-support/propagated-user-env-packages; ln -s /nonexistent $out/bin/dangling; echo hidden > $out/.hidden; echo log > $out/log";
  b = mk "b" "mkdir -p $out/bin $out/share/b $out/lib; echo b > $out/bin/b; echo y > $out/bin/common; ln -s ${d}/lib/x $out/lib/x";
  c = mk "c" "mkdir -p $out/bin $out/share/c; echo c > $out/bin/c; echo z > $out/bin/common";
  d = mk "d" "mkdir -p $out/lib/x; echo d > $out/lib/x/d";
  e = mk "e" "mkdir -p $out/lib/x $out/bin; echo e > $out/lib/x/e; echo e > $out/bin/common";
  f = mk "f" "echo file > $out";
  manifest = builtins.toFile "env-manifest.nix" "[ ]";
  env = derivations: derivation {
    name = "user-environment"; system = "builtin"; builder = "builtin:buildenv";
    inherit manifest derivations; preferLocalBuild = true; allowSubstitutes = false;
  };
in {
  env = env [ "true" "5" "1" a "true" "3" "1" b "false" "1" "1" e "true" "7" "1" e "true" "8" "1" f ];
  collision = env [ "true" "5" "1" a "true" "5" "1" c ];
  fileOverDir = env [ "true" "5" "1" (mk "p1" "mkdir -p $out/share/x; echo > $out/share/x/1") "true" "5" "1" (mk "p2" "mkdir -p $out/share/x; echo > $out/share/x/2") "true" "6" "1" (mk "g" "mkdir -p $out/share; echo > $out/share/x") ];
  dirOverFile = env [ "true" "5" "1" (mk "h" "mkdir -p $out/share; echo > $out/share/x") "true" "6" "1" (mk "p3" "mkdir -p $out/share/x; echo > $out/share/x/3") ];
  badPriority = env [ "true" "high" "1" a ];
}"#;

#[test]
fn buildenv_as_in_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("builtins-buildenv");
    let expr = dir.join("env.nix");
    fs::write(&expr, BUILDENV).unwrap();
    let (_, firns) = build_all_ways(&dir, &expr, "env", "/bin/busybox");
    for (how, firn) in &firns {
        let err = stderr(firn);
        assert!(
            err.contains("warning: skipping dangling symlink '/nix/store/")
                && err.contains("in the user environment because it's not a directory"),
            "{how}: {err}"
        );
    }
    let (nix, firns) = build_all_ways(&dir, &expr, "collision", "/bin/busybox");
    assert_eq!(nix.status.code(), Some(100));
    let lines = error_lines(&firns[0].1);
    assert!(
        lines.len() == 1 && lines[0].contains("have the same priority 5; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME'"),
        "{lines:?}"
    );
    for attr in ["fileOverDir", "dirOverFile"] {
        let (nix, firns) = build_all_ways(&dir, &expr, attr, "/bin/busybox");
        assert_eq!(nix.status.code(), Some(100), "{attr}");
        assert!(
            error_lines(&firns[0].1)[0].contains("collision between"),
            "{attr}"
        );
    }
    let (_, firns) = build_all_ways(&dir, &expr, "badPriority", "/bin/busybox");
    assert!(stderr(&firns[0].1).lines().any(|l| l == "stoi"));
    remove(&dir);
}

/// Serve `files` (path → body) over HTTP/1.1 on 127.0.0.1 until the test ends; 404
/// with a short body for anything else. The port.
fn serve(files: Vec<(String, Vec<u8>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split(' ').nth(1).unwrap_or("");
            let reply = match files.iter().find(|(p, _)| p == path) {
                Some((_, body)) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot here\n".to_vec(),
            };
            let _ = conn.write_all(&reply);
        }
    });
    port
}

/// `nix-hash ARGS… PATH`.
fn nix_hash(args: &[&str], path: &Path) -> String {
    let mut all = args.to_vec();
    all.push(path.to_str().unwrap());
    ok(run("nix-hash", &all, None)).trim().to_owned()
}

#[test]
fn fetchurl_as_in_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("builtins-fetchurl");
    let files = dir.join("files");
    fs::create_dir_all(files.join("tree/sub")).unwrap();
    fs::write(files.join("hello.txt"), "hello, fetchurl\n").unwrap();
    fs::write(files.join("tree/sub/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(
        files.join("tree/sub/run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub/run.sh", files.join("tree/link")).unwrap();
    let nar = ok_bytes(run(
        "nix-store",
        &["--dump", files.join("tree").to_str().unwrap()],
        None,
    ));
    fs::write(files.join("tree.nar"), &nar).unwrap();
    ok(run(
        "xz",
        &["--keep", files.join("tree.nar").to_str().unwrap()],
        None,
    ));
    // The executable's hash is over the NAR of the file with its x bit.
    fs::copy(files.join("hello.txt"), dir.join("hello-x")).unwrap();
    fs::set_permissions(
        dir.join("hello-x"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let flat = nix_hash(
        &["--flat", "--type", "sha256", "--base32"],
        &files.join("hello.txt"),
    );
    let exe = nix_hash(&["--type", "sha256", "--base32"], &dir.join("hello-x"));
    let unpacked = nix_hash(&["--type", "sha256", "--base32"], &files.join("tree"));
    let port = serve(vec![
        (
            "/hello.txt".into(),
            fs::read(files.join("hello.txt")).unwrap(),
        ),
        (
            "/tree.nar.xz".into(),
            fs::read(files.join("tree.nar.xz")).unwrap(),
        ),
    ]);
    let f = files.display();
    let zero = "0".repeat(52);
    let expr = dir.join("fetch.nix");
    fs::write(
        &expr,
        format!(
            r#"let fetch = import <nix/fetchurl.nix>; in {{
  flat = fetch {{ url = "file://{f}/hello.txt"; sha256 = "{flat}"; }};
  executable = fetch {{ url = "file://{f}/hello.txt"; sha256 = "{exe}"; executable = true; name = "hello-x"; }};
  unpack = fetch {{ url = "file://{f}/tree.nar"; sha256 = "{unpacked}"; unpack = true; name = "tree"; }};
  unpackXz = fetch {{ url = "file://{f}/tree.nar.xz"; sha256 = "{unpacked}"; unpack = true; name = "tree-xz"; }};
  http = fetch {{ url = "http://127.0.0.1:{port}/hello.txt"; sha256 = "{flat}"; name = "hello-http"; }};
  httpUnpack = fetch {{ url = "http://127.0.0.1:{port}/tree.nar.xz"; sha256 = "{unpacked}"; unpack = true; name = "tree-http"; }};
  wrongHash = fetch {{ url = "file://{f}/hello.txt"; sha256 = "{zero}"; name = "wrong"; }};
  missing = fetch {{ url = "file://{f}/nope.txt"; sha256 = "{flat}"; name = "missing"; }};
  http404 = fetch {{ url = "http://127.0.0.1:{port}/nope.txt"; sha256 = "{flat}"; name = "missing-http"; }};
}}"#
        ),
    )
    .unwrap();
    let paths = files.display().to_string();
    for attr in [
        "flat",
        "executable",
        "unpack",
        "unpackXz",
        "http",
        "httpUnpack",
    ] {
        let (nix, _) = build_all_ways(&dir, &expr, attr, &paths);
        assert!(nix.status.success(), "{attr}: {}", stderr(&nix));
    }
    let (nix, firns) = build_all_ways(&dir, &expr, "wrongHash", &paths);
    assert_eq!(nix.status.code(), Some(102));
    assert!(stderr(&firns[0].1).contains("hash mismatch in fixed-output derivation"));
    let (nix, firns) = build_all_ways(&dir, &expr, "missing", &paths);
    assert_eq!(
        nix.status.code(),
        Some(1),
        "a fixed-output builder's failure is transient"
    );
    assert_eq!(
        error_lines(&firns[0].1),
        [format!(
            "error: unable to download 'file://{f}/nope.txt': Couldn't read a file:// file (37)"
        )]
    );
    let (_, firns) = build_all_ways(&dir, &expr, "http404", &paths);
    assert!(
        stderr(&firns[0].1).contains(&format!(
            "error: unable to download 'http://127.0.0.1:{port}/nope.txt': HTTP error 404 ('Not Found')"
        )),
        "{}",
        stderr(&firns[0].1)
    );
    remove(&dir);
}

/// `https://` with a certificate no CA vouches for (a throw-away CA the builder does
/// not know): Nix does not check it (`verifyTLS = false`; the output hash is the
/// check) and neither does firn. A real TLS server: `openssl s_server`.
#[test]
fn fetchurl_over_https_as_in_nix() {
    if !can_build() || !have_nix() || !common::tls::have_openssl() {
        return;
    }
    let dir = tempdir("builtins-https");
    let files = dir.join("files");
    fs::create_dir_all(files.join("tree")).unwrap();
    fs::write(files.join("hello.txt"), "hello over TLS\n").unwrap();
    fs::write(files.join("tree/a"), "a\n").unwrap();
    let nar = ok_bytes(run(
        "nix-store",
        &["--dump", files.join("tree").to_str().unwrap()],
        None,
    ));
    fs::write(files.join("tree.nar"), &nar).unwrap();
    let flat = nix_hash(
        &["--flat", "--type", "sha256", "--base32"],
        &files.join("hello.txt"),
    );
    let unpacked = nix_hash(&["--type", "sha256", "--base32"], &files.join("tree"));
    let (_, cert, key) = common::tls::tls_ca(&dir, "fetch");
    let (_server, url) = common::tls::https_server(&files, &cert, &key);
    let expr = dir.join("fetch.nix");
    fs::write(
        &expr,
        format!(
            r#"let fetch = import <nix/fetchurl.nix>; in {{
  https = fetch {{ url = "{url}/hello.txt"; sha256 = "{flat}"; name = "hello-https"; }};
  httpsUnpack = fetch {{ url = "{url}/tree.nar"; sha256 = "{unpacked}"; unpack = true; name = "tree-https"; }};
}}"#
        ),
    )
    .unwrap();
    for attr in ["https", "httpsUnpack"] {
        let (nix, firns) = build_all_ways(&dir, &expr, attr, "");
        assert!(nix.status.success(), "{attr}: {}", stderr(&nix));
        assert!(firns.iter().all(|(_, f)| f.status.success()), "{attr}");
    }
    remove(&dir);
}

fn ok_bytes(out: Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn unpack_channel_as_in_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("builtins-channel");
    let src = dir.join("src");
    fs::create_dir_all(src.join("nixexprs-22.05/pkgs")).unwrap();
    fs::write(src.join("nixexprs-22.05/default.nix"), "{ }: { }\n").unwrap();
    fs::write(src.join("nixexprs-22.05/pkgs/tool.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        src.join("nixexprs-22.05/pkgs/tool.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("default.nix", src.join("nixexprs-22.05/link.nix")).unwrap();
    fs::write(src.join("second"), "x").unwrap();
    let s = src.to_str().unwrap();
    let tar = |name: &str, flag: &str, entries: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["-C", s, flag, out.to_str().unwrap()];
        args.extend_from_slice(entries);
        ok(run("tar", &args, None));
        out
    };
    let xz = tar("nixexprs.tar.xz", "-cJf", &["nixexprs-22.05"]);
    let bz2 = tar("nixexprs.tar.bz2", "-cjf", &["nixexprs-22.05"]);
    let two = tar("two.tar.xz", "-cJf", &["nixexprs-22.05", "second"]);
    let expr = dir.join("channel.nix");
    fs::write(
        &expr,
        format!(
            r#"let chan = name: src: derivation {{
  inherit name src; channelName = "nixpkgs"; builder = "builtin:unpack-channel";
  system = "builtin"; preferLocalBuild = true;
}}; in {{
  xz = chan "nixpkgs-xz" {};
  bz2 = chan "nixpkgs-bz2" {};
  two = chan "two" {};
}}"#,
            xz.display(),
            bz2.display(),
            two.display()
        ),
    )
    .unwrap();
    for attr in ["xz", "bz2"] {
        let (nix, _) = build_all_ways(&dir, &expr, attr, "");
        assert!(nix.status.success(), "{attr}: {}", stderr(&nix));
    }
    let (nix, firns) = build_all_ways(&dir, &expr, "two", "");
    assert_eq!(nix.status.code(), Some(100));
    assert!(
        error_lines(&firns[0].1)[0].contains("contains more than one file"),
        "{}",
        stderr(&firns[0].1)
    );
    remove(&dir);
}
