//! A cgroup per build: limits (`build-memory-max`, `build-pids-max`), accounting (CPU
//! time, peak memory) and killing everything a build started.
//!
//! Where the cgroups are is read from `/proc/self/mountinfo` (the `cgroup2` mount and
//! any `cgroup` v1 mounts with their controllers) and `/proc/self/cgroup` (firn's own
//! cgroup in each hierarchy). Each controller is taken from where the kernel has it:
//! on a pure v2 machine everything is in the unified hierarchy (memory and pids need to
//! be enabled in the parent's `cgroup.subtree_control`, which firn asks for); on a
//! "hybrid" machine memory and pids may be v1 controllers while the unified hierarchy
//! still gives `cgroup.kill` and `cpu.stat`. A build's cgroup is
//! `<firn's cgroup>/firn-build-<pid>-<n>` in every hierarchy used; the builder joins it
//! before anything else runs (it writes `0`, "myself", to each `cgroup.procs` after the
//! fork), so everything it starts is in it too.
//!
//! A firn that is killed cannot remove its cgroups; the next one removes those of firn
//! processes that are gone before it makes its first.
//!
//! Where no hierarchy can be used, builds run as before, without limits: the caller says
//! so once ([`Cgroups::unavailable`]) when limits were asked for.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits for one build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `build-memory-max`, bytes.
    pub memory_max: Option<u64>,
    /// `build-pids-max`, processes and threads.
    pub pids_max: Option<u64>,
}

/// What a build used, and which limit it hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_user: Option<Duration>,
    pub cpu_system: Option<Duration>,
    /// Bytes.
    pub peak_memory: Option<u64>,
    /// The kernel killed a process of the build for memory.
    pub oom_killed: bool,
    /// A fork of the build failed at `build-pids-max`.
    pub pids_limited: bool,
}

/// The hierarchies firn can make cgroups in.
#[derive(Debug, Clone, Default)]
pub struct Cgroups {
    /// firn's cgroup in the unified (v2) hierarchy, if there is one it may write.
    unified: Option<PathBuf>,
    /// Where memory is controlled (v2: the unified dir, if enabled there; else v1).
    memory: Option<Controller>,
    pids: Option<Controller>,
    /// v1 `cpuacct`, when the unified hierarchy cannot tell CPU time.
    cpuacct: Option<PathBuf>,
    /// Why there is no hierarchy at all.
    unavailable: Option<String>,
    /// Numbers the build cgroups of this process.
    seq: u64,
    /// The cgroups of dead firn processes were removed.
    cleaned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Controller {
    dir: PathBuf,
    v2: bool,
}

/// One `/proc/self/mountinfo` cgroup mount: (mount point, v2, v1 controllers).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, bool, Vec<String>)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next();
            let options = post.next().unwrap_or("");
            match fstype {
                "cgroup2" => Some((PathBuf::from(mount_point), true, Vec::new())),
                "cgroup" => Some((
                    PathBuf::from(mount_point),
                    false,
                    options
                        .split(',')
                        .filter(|o| !o.contains('=') && *o != "rw" && *o != "ro")
                        .map(str::to_owned)
                        .collect(),
                )),
                _ => None,
            }
        })
        .collect()
}

/// `/proc/self/cgroup`: (controllers, path) per line; `""` controllers for v2.
fn own_cgroups(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

fn join(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

impl Cgroups {
    /// What this machine offers, from `/proc`.
    pub fn detect() -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut c = Self::from_proc(
            &mountinfo,
            &own,
            &|p| fs::read_to_string(p).ok(),
            &|p, s| fs::write(p, s).is_ok(),
            // An ordinary user may read every cgroup.procs but make cgroups in none
            // (unless one was delegated to them).
            &|dir| nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok(),
        );
        // What killed firns left, now: a run may not make a cgroup of its own.
        c.remove_stale();
        c.cleaned = true;
        c
    }

    /// [`Cgroups::detect`] on the given texts; `read`/`write` reach the cgroup files.
    fn from_proc(
        mountinfo: &str,
        own: &str,
        read: &dyn Fn(&Path) -> Option<String>,
        write: &dyn Fn(&Path, &str) -> bool,
        may_create: &dyn Fn(&Path) -> bool,
    ) -> Self {
        let mounts = cgroup_mounts(mountinfo);
        let own = own_cgroups(own);
        let mut c = Self::default();
        let usable = |dir: &Path| read(&dir.join("cgroup.procs")).is_some() && may_create(dir);
        if let (Some((m, _, _)), Some((_, p))) = (
            mounts.iter().find(|(_, v2, _)| *v2),
            own.iter().find(|(ctl, _)| ctl.is_empty()),
        ) {
            let dir = join(m, p);
            if usable(&dir) {
                // Controllers the parent offers its children (asking for the ones
                // missing from its subtree_control).
                let available = read(&dir.join("cgroup.controllers")).unwrap_or_default();
                for ctl in ["memory", "pids"] {
                    if !available.split_whitespace().any(|a| a == ctl) {
                        continue;
                    }
                    let enabled = read(&dir.join("cgroup.subtree_control"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .any(|a| a == ctl)
                        || write(&dir.join("cgroup.subtree_control"), &format!("+{ctl}"));
                    if enabled {
                        let controller = Some(Controller {
                            dir: dir.clone(),
                            v2: true,
                        });
                        match ctl {
                            "memory" => c.memory = controller,
                            _ => c.pids = controller,
                        }
                    }
                }
                c.unified = Some(dir);
            }
        }
        for (mount, v2, controllers) in &mounts {
            if *v2 {
                continue;
            }
            for ctl in controllers {
                let Some((_, p)) = own.iter().find(|(cs, _)| cs.split(',').any(|x| x == ctl))
                else {
                    continue;
                };
                let dir = join(mount, p);
                if !usable(&dir) {
                    continue;
                }
                let controller = Some(Controller {
                    dir: dir.clone(),
                    v2: false,
                });
                match ctl.as_str() {
                    "memory" if c.memory.is_none() => c.memory = controller,
                    "pids" if c.pids.is_none() => c.pids = controller,
                    "cpuacct" => c.cpuacct = Some(dir),
                    _ => {}
                }
            }
        }
        // On a hybrid machine whose unified hierarchy controls neither memory nor pids,
        // joining it only buys `cgroup.kill` and `cpu.stat` — and moving a process into
        // a v2 cgroup waits for an RCU grace period (some 7 ms here, per build): take
        // the CPU time from v1's cpuacct and kill by listing instead.
        let unified_controls = |c: &Self| {
            c.memory.as_ref().is_some_and(|m| m.v2) || c.pids.as_ref().is_some_and(|p| p.v2)
        };
        if c.unified.is_some()
            && !unified_controls(&c)
            && (c.memory.is_some() || c.pids.is_some())
            && c.cpuacct.is_some()
        {
            c.unified = None;
        }
        if c.unified.is_none() && c.memory.is_none() && c.pids.is_none() {
            c.unavailable = Some("no cgroup hierarchy is mounted where firn may write".into());
        }
        c
    }

    /// Why builds get no cgroup, if they do not.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Why `limits` cannot be enforced here, if they cannot.
    pub fn cannot_enforce(&self, limits: &Limits) -> Option<String> {
        if limits.memory_max.is_some() && self.memory.is_none() {
            return Some("no memory cgroup controller is available".into());
        }
        if limits.pids_max.is_some() && self.pids.is_none() {
            return Some("no pids cgroup controller is available".into());
        }
        None
    }

    /// The parent directories firn makes build cgroups in.
    fn parents(&self) -> Vec<PathBuf> {
        let mut parents: Vec<PathBuf> = Vec::new();
        for p in [
            self.unified.clone(),
            self.memory.as_ref().map(|c| c.dir.clone()),
            self.pids.as_ref().map(|c| c.dir.clone()),
            self.cpuacct.clone(),
        ]
        .into_iter()
        .flatten()
        {
            if !parents.contains(&p) {
                parents.push(p);
            }
        }
        parents
    }

    /// Remove the build cgroups a firn left when it was killed (`firn-build-<pid>-<n>`
    /// of a pid that is gone), with whatever still runs in them.
    fn remove_stale(&self) {
        for parent in self.parents() {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix("firn-build-")
                    .and_then(|r| r.split('-').next())
                else {
                    continue;
                };
                if pid.is_empty()
                    || !pid.bytes().all(|b| b.is_ascii_digit())
                    || Path::new("/proc").join(pid).exists()
                {
                    continue;
                }
                let mut stale = BuildCgroup::default();
                stale.unified = (Some(&parent) == self.unified.as_ref()).then(|| e.path());
                stale.dirs.push(e.path());
                // Dropping it kills what is in it and removes it.
                drop(stale);
            }
        }
    }

    /// A new cgroup for one build, with `limits` applied.
    pub fn create(&mut self, limits: &Limits) -> io::Result<Option<BuildCgroup>> {
        if self.unavailable.is_some() {
            return Ok(None);
        }
        if !self.cleaned {
            self.remove_stale();
            self.cleaned = true;
        }
        // Numbered across the process: several builders (a daemon's connections) must
        // not share a cgroup, or stopping one build kills the others.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("firn-build-{}-{}", std::process::id(), seq);
        self.seq = seq + 1;
        let mut cg = BuildCgroup::default();
        // Every distinct directory once (memory and pids may share the unified one).
        for parent in self.parents() {
            let dir = parent.join(&name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            cg.dirs.push(dir.clone());
            cg.procs.push(
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(io::Error::other)?,
            );
            if Some(&parent) == self.unified.as_ref() {
                cg.unified = Some(dir.clone());
            }
            if self.memory.as_ref().is_some_and(|c| c.dir == parent) {
                cg.memory = Some(Controller {
                    dir: dir.clone(),
                    v2: self.memory.as_ref().is_some_and(|c| c.v2),
                });
            }
            if self.pids.as_ref().is_some_and(|c| c.dir == parent) {
                cg.pids = Some(Controller {
                    dir: dir.clone(),
                    v2: self.pids.as_ref().is_some_and(|c| c.v2),
                });
            }
            if self.cpuacct.as_ref() == Some(&parent) {
                cg.cpuacct = Some(dir.clone());
            }
        }
        if let (Some(max), Some(m)) = (limits.memory_max, &cg.memory) {
            let limit = if m.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            fs::write(m.dir.join(limit), max.to_string())?;
            // No escape into swap: the limit is on memory and swap together.
            let swap = if m.v2 {
                m.dir.join("memory.swap.max")
            } else {
                m.dir.join("memory.memsw.limit_in_bytes")
            };
            let swap_value = if m.v2 {
                "0".to_owned()
            } else {
                max.to_string()
            };
            if swap.exists() {
                fs::write(swap, swap_value)?;
            }
        }
        if let (Some(max), Some(p)) = (limits.pids_max, &cg.pids) {
            fs::write(p.dir.join("pids.max"), max.to_string())?;
        }
        Ok(Some(cg))
    }
}

/// The cgroup of one build (in each hierarchy used). Dropped, it kills what is left in
/// it and removes it.
#[derive(Debug, Default)]
pub struct BuildCgroup {
    dirs: Vec<PathBuf>,
    /// Each dir's `cgroup.procs`, for the builder to join after the fork.
    procs: Vec<CString>,
    unified: Option<PathBuf>,
    memory: Option<Controller>,
    pids: Option<Controller>,
    cpuacct: Option<PathBuf>,
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The value of `key` in a `key value` per line file (`cpu.stat`, `memory.events`).
fn keyed(p: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(p)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl BuildCgroup {
    /// The `cgroup.procs` files the builder writes `0` to after the fork.
    pub fn procs_files(&self) -> &[CString] {
        &self.procs
    }

    /// Kill every process in the cgroup: `cgroup.kill` where there is one, else a
    /// SIGKILL to each listed process until none is left.
    pub fn kill(&self) {
        if let Some(u) = &self.unified {
            if fs::write(u.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for _ in 0..100 {
            let mut any = false;
            for d in &self.dirs {
                let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    any = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if !any {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the build used and which limits it hit.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        if let Some(dir) = &self.unified {
            let stat = dir.join("cpu.stat");
            u.cpu_user = keyed(&stat, "user_usec").map(Duration::from_micros);
            u.cpu_system = keyed(&stat, "system_usec").map(Duration::from_micros);
        }
        if u.cpu_user.is_none() {
            if let Some(dir) = &self.cpuacct {
                u.cpu_user = read_u64(&dir.join("cpuacct.usage_user")).map(Duration::from_nanos);
                u.cpu_system = read_u64(&dir.join("cpuacct.usage_sys")).map(Duration::from_nanos);
            }
        }
        if let Some(m) = &self.memory {
            if m.v2 {
                u.peak_memory = read_u64(&m.dir.join("memory.peak"));
                u.oom_killed = keyed(&m.dir.join("memory.events"), "oom_kill").unwrap_or(0) > 0;
            } else {
                u.peak_memory = read_u64(&m.dir.join("memory.max_usage_in_bytes"));
                u.oom_killed = keyed(&m.dir.join("memory.oom_control"), "oom_kill").unwrap_or(0)
                    > 0
                    || read_u64(&m.dir.join("memory.failcnt")).unwrap_or(0) > 0;
            }
        }
        if let Some(p) = &self.pids {
            u.pids_limited = keyed(&p.dir.join("pids.events"), "max").unwrap_or(0) > 0;
        }
        u
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        self.kill();
        for d in &self.dirs {
            // A cgroup goes once its last process is reaped: give the kernel a moment.
            for _ in 0..200 {
                match fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_OWN: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/api/x\n2:cpuacct:/\n0::/\n";

    fn detect(mountinfo: &str, own: &str, files: &[(&str, &str)]) -> (Cgroups, Vec<String>) {
        let files: BTreeMap<PathBuf, String> = files
            .iter()
            .map(|(k, v)| (PathBuf::from(k), (*v).to_owned()))
            .collect();
        let writes = RefCell::new(Vec::new());
        let c = Cgroups::from_proc(
            mountinfo,
            own,
            &|p| files.get(p).cloned(),
            &|p, s| {
                writes.borrow_mut().push(format!("{} {s}", p.display()));
                true
            },
            &|_| true,
        );
        (c, writes.into_inner())
    }

    #[test]
    fn hybrid_takes_memory_and_pids_from_v1() {
        let (c, writes) = detect(
            HYBRID,
            HYBRID_OWN,
            &[
                ("/sys/fs/cgroup/unified/cgroup.procs", "1\n"),
                ("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n"),
                ("/sys/fs/cgroup/memory/api/x/cgroup.procs", "1\n"),
                ("/sys/fs/cgroup/pids/cgroup.procs", "1\n"),
                ("/sys/fs/cgroup/cpuacct/cgroup.procs", "1\n"),
            ],
        );
        assert!(writes.is_empty(), "{writes:?}");
        // The unified hierarchy controls nothing here: not joined (it costs a grace
        // period per build); CPU time comes from cpuacct.
        assert_eq!(c.unified, None);
        assert_eq!(
            c.memory,
            Some(Controller {
                dir: "/sys/fs/cgroup/memory/api/x".into(),
                v2: false
            })
        );
        assert_eq!(c.pids.as_ref().map(|p| p.v2), Some(false));
        assert_eq!(c.cpuacct, Some(PathBuf::from("/sys/fs/cgroup/cpuacct")));
        assert!(c.unavailable().is_none());
    }

    #[test]
    fn pure_v2_enables_controllers_for_its_children() {
        let (c, writes) = detect(
            "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "0::/user.slice/firn\n",
            &[
                ("/sys/fs/cgroup/user.slice/firn/cgroup.procs", "1\n"),
                (
                    "/sys/fs/cgroup/user.slice/firn/cgroup.controllers",
                    "cpu io memory pids\n",
                ),
                (
                    "/sys/fs/cgroup/user.slice/firn/cgroup.subtree_control",
                    "pids\n",
                ),
            ],
        );
        assert_eq!(
            writes,
            ["/sys/fs/cgroup/user.slice/firn/cgroup.subtree_control +memory"]
        );
        assert_eq!(c.memory.as_ref().map(|m| m.v2), Some(true));
        assert_eq!(c.pids.as_ref().map(|m| m.v2), Some(true));
        assert!(c
            .cannot_enforce(&Limits {
                memory_max: Some(1),
                pids_max: Some(1)
            })
            .is_none());
    }

    #[test]
    fn nothing_mounted_means_unavailable() {
        let (c, _) = detect("", "", &[]);
        assert!(c.unavailable().is_some());
        assert!(c
            .cannot_enforce(&Limits {
                memory_max: Some(1),
                pids_max: None
            })
            .is_some());
        assert!(c.cannot_enforce(&Limits::default()).is_none());
    }

    #[test]
    fn hierarchies_readable_but_not_writable_are_not_used() {
        // An ordinary user: every cgroup.procs can be read, no cgroup can be made.
        let files: BTreeMap<PathBuf, String> = [
            "/sys/fs/cgroup/unified/cgroup.procs",
            "/sys/fs/cgroup/memory/api/x/cgroup.procs",
            "/sys/fs/cgroup/pids/cgroup.procs",
            "/sys/fs/cgroup/cpuacct/cgroup.procs",
        ]
        .iter()
        .map(|k| (PathBuf::from(k), "1\n".to_owned()))
        .collect();
        let c = Cgroups::from_proc(
            HYBRID,
            HYBRID_OWN,
            &|p| files.get(p).cloned(),
            &|_, _| true,
            &|dir| dir == Path::new("/sys/fs/cgroup/cpuacct"),
        );
        assert!(c.unified.is_none() && c.memory.is_none() && c.pids.is_none());
        assert!(c.unavailable().is_some());
    }
}
