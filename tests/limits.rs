//! Resource limits per build (beyond Nix 2.8, NixOS/nix#2367): each build in a cgroup
//! of its own, `build-memory-max` and `build-pids-max` enforced, CPU time and peak
//! memory reported with `--json`, and everything a build started killed with it. A
//! memory hog and a fork bomb fail cleanly, with a message naming the limit, and leave
//! no process, no cgroup and a store that verifies.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::path::Path;
use std::process::Output;

fn drv(root: &Path, name: &str, script: &str) -> String {
    let json = format!(
        r#"{{"name":"{name}","outputs":{{"out":{{}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"{name}","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
        json_string(script)
    );
    ok(firn_at(root, &["derivation", "add"], Some(json.as_bytes())))
        .trim()
        .to_owned()
}

/// `firn realise`, recording the pid of the firn that ran (its build cgroups are named
/// after it).
fn realise(root: &Path, sandbox: &str, opts: &[(&str, &str)], args: &[&str]) -> Output {
    realise_pid(root, sandbox, opts, args).0
}

fn realise_pid(root: &Path, sandbox: &str, opts: &[(&str, &str)], args: &[&str]) -> (Output, u32) {
    let mut all: Vec<String> = vec!["--store".into(), root.display().to_string()];
    for (k, v) in [("sandbox", sandbox), ("sandbox-paths", "/bin/busybox")]
        .iter()
        .chain(opts)
    {
        all.extend(["--option".into(), (*k).into(), (*v).into()]);
    }
    all.push("realise".into());
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let child = firn_command()
        .args(&all)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

/// Whether this machine gives firn memory and pids controllers; in CI it must.
fn have_cgroups(tag: &str) -> bool {
    let root = tempdir(&format!("cgroup-probe-{tag}"));
    let d = drv(&root, "probe", "echo > $out");
    let out = realise(
        &root,
        "true",
        &[("build-memory-max", "100000000"), ("build-pids-max", "100")],
        &[&d],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    remove(&root);
    let have = out.status.success() && !err.contains("cannot be enforced here");
    if !have {
        assert!(!is_ci(), "CI must offer memory and pids cgroups: {err}");
        eprintln!("SKIPPED: no memory and pids cgroup controllers here: {err}");
    }
    have
}

/// No build cgroup of the firn processes `pids` (which have exited) is left under
/// /sys/fs/cgroup.
fn no_cgroups_left(pids: &[u32]) {
    let out = command("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "4", "-name", "firn-build-*"])
        .output()
        .unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|dir| {
            let name = dir.rsplit('/').next().unwrap_or("");
            let pid = name.split('-').nth(2).unwrap_or("");
            pids.iter().any(|p| p.to_string() == pid)
        })
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

fn last_error(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_memory_hog_and_a_fork_bomb_fail_cleanly() {
    if !can_build() || !have_cgroups("limits") {
        return;
    }
    for sandbox in ["true", "false"] {
        let root = tempdir(&format!("limits-{sandbox}"));
        // 200 MB in a shell variable, under a 64 MB limit.
        let hog = drv(
            &root,
            "hog",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo ${#x} > $out",
        );
        let (out, hog_pid) =
            realise_pid(&root, sandbox, &[("build-memory-max", "67108864")], &[&hog]);
        assert_eq!(
            out.status.code(),
            Some(100),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let e = last_error(&out);
        assert!(e.contains(&format!("builder for '{hog}'")), "{e}");
        assert!(
            e.ends_with("it ran out of memory at build-memory-max = 67108864 bytes"),
            "{e}"
        );

        // A fork bomb left running in the background while the builder fails.
        let bomb = drv(
            &root,
            "bomb",
            "b() { b | b & }; b; sleep 2; echo firn-bomb-$$ > /dev/null; exit 3",
        );
        let (out, bomb_pid) = realise_pid(&root, sandbox, &[("build-pids-max", "64")], &[&bomb]);
        assert_eq!(
            out.status.code(),
            Some(100),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let e = last_error(&out);
        // The builder's own shell may be the one whose fork failed (exit 2), or it exits
        // 3 as told; either way the limit is named.
        assert!(
            e.contains(&format!(
                "error: builder for '{bomb}' failed with exit code "
            )) && e.ends_with(": it reached build-pids-max = 64 processes"),
            "{e}"
        );
        // Nothing of either build is left running, no cgroup stays, the store is sound.
        let left = command("pgrep")
            .args(["-f", "head -c 200000000"])
            .output()
            .unwrap();
        assert!(
            left.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&left.stdout)
        );
        no_cgroups_left(&[hog_pid, bomb_pid]);
        assert_verifies(&root, sandbox);
        // Only the two derivations (and the lock files failed builds leave, as Nix's do).
        let kept: Vec<String> = store_entries(&root)
            .into_iter()
            .filter(|e| !e.ends_with(".lock"))
            .collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        remove(&root);
    }
}

#[test]
fn json_results_report_cpu_and_peak_memory() {
    if !can_build() || !have_cgroups("json") {
        return;
    }
    let root = tempdir("limits-json");
    let d = drv(
        &root,
        "busy",
        "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; x=$(head -c 3000000 /dev/zero | tr '\\0' x); echo ${#x} > $out",
    );
    // Sandboxed builds get a cgroup (and so accounting) when a limit is asked for.
    let (out, pid) = realise_pid(
        &root,
        "true",
        &[("build-pids-max", "1000")],
        &["--json", &d],
    );
    let out = ok(out);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v[0];
    assert_eq!(r["status"], "Built", "{out}");
    assert!(r["cpuUser"].as_u64().unwrap() > 1000, "{out}");
    assert!(r["cpuSystem"].is_u64(), "{out}");
    // The 3 MB string (and the pipe's copies) were in memory at once.
    assert!(r["peakMemory"].as_u64().unwrap() > 3_000_000, "{out}");
    no_cgroups_left(&[pid]);
    remove(&root);
}

/// Limits that cannot be enforced are said once, and builds run as before.
#[test]
fn limits_without_cgroups_are_said_once() {
    if !can_build() {
        return;
    }
    let root = tempdir("limits-off");
    let (a, b) = (
        drv(&root, "a", "echo > $out"),
        drv(&root, "b", "echo > $out"),
    );
    let out = realise(
        &root,
        "true",
        &[("use-cgroups", "false"), ("build-memory-max", "1000")],
        &[&a, &b],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("warning: build-memory-max and build-pids-max cannot be enforced here (use-cgroups is false); builds run without them").count(),
        1,
        "{err}"
    );
    remove(&root);
}

/// A firn killed mid-build cannot remove its cgroup; the next firn does.
#[test]
fn the_cgroups_of_a_killed_firn_are_removed_by_the_next() {
    if !can_build() || !have_cgroups("killed") {
        return;
    }
    let root = tempdir("limits-killed");
    let slow = drv(&root, "slow", "sleep 30; echo > $out");
    let mut child = firn_command()
        .args(["--store", root.to_str().unwrap()])
        // A limit, so that the sandboxed build gets a cgroup.
        .args(["--option", "sandbox-paths", "/bin/busybox"])
        .args(["--option", "build-pids-max", "1000", "realise", &slow])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let has_cgroup = || {
        let out = command("find")
            .args(["/sys/fs/cgroup", "-maxdepth", "4", "-name"])
            .arg(format!("firn-build-{pid}-*"))
            .output()
            .unwrap();
        !out.stdout.is_empty()
    };
    while !has_cgroup() {
        assert!(std::time::Instant::now() < deadline, "no cgroup appeared");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(has_cgroup(), "a killed firn leaves its cgroup");
    let quick = drv(&root, "quick", "echo > $out");
    ok(realise(&root, "true", &[], &[&quick]));
    no_cgroups_left(&[pid]);
    remove(&root);
}
