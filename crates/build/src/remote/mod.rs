//! Remote builds: the worker as Nix's build hook, sending builds to the machines of
//! `builders` over ssh and the serve protocol (`nix-store --serve --write` or `firn
//! serve` at the other end).
//!
//! - [`machines`]: the `builders` setting and machines files;
//! - [`ssh`]: an `ssh://` machine's settings and the `ssh` command line;
//! - [`connection`]: the serve protocol's client end;
//! - [`build`]: one remote build on a thread of its own;
//! - [`Dispatcher`] (here): the machines of one run, how many builds each runs, which
//!   failed, and the choice of a machine for a build (Nix's build-remote.cc).
//!
//! The choice, as Nix 2.8 makes it: among the machines that are not disabled, whose
//! systems include the derivation's (or it is `builtin`), that support every required
//! feature and whose mandatory features are all required, the ones with a free slot
//! (`max-jobs` of the machine); the lowest `load / speed-factor` (integer division),
//! then the higher speed factor, then the lower load. If none is free: *postpone* when
//! some machine fits and this machine cannot build it, else *decline* (build here).
//! Loads are counted from the slot lock files in `<state dir>/current-load/` that Nix's
//! build-remote uses ([`slots`]), so other processes' builds (other firn runs, a
//! daemon's other connections, Nix itself) count too; without that directory (tests),
//! from this worker's builds.

pub mod build;
pub mod connection;
pub mod error;
pub mod machines;
pub mod slots;
pub mod ssh;

use std::collections::BTreeSet;

pub use build::{RemoteBuild, RemoteDone, RemoteJob};
pub use error::RemoteError;
pub use machines::{Machine, MachinesError};
pub use slots::{SlotLock, Slots};

/// What to do with a build (build-remote's answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Send it to machine `i`.
    Machine(usize),
    /// Wait for a machine that fits to have a free slot.
    Postpone,
    /// No machine takes it: build it here (if it can be).
    Decline,
}

#[derive(Debug)]
struct MachineState {
    machine: Machine,
    running: u32,
    /// Why it was disabled (it failed during this run).
    failure: Option<String>,
}

/// What [`Dispatcher::reserve`] decided: a [`Choice`] with the slot taken.
#[derive(Debug)]
pub enum Reserved {
    /// Machine `i`, its slot held (none without slot files).
    Machine(usize, Option<SlotLock>),
    Postpone,
    Decline,
}

/// The machines of one run and their state.
#[derive(Debug, Default)]
pub struct Dispatcher {
    machines: Vec<MachineState>,
    slots: Option<Slots>,
    /// The directory of the shared ssh connections' sockets, once one was made.
    control_dir: Option<std::path::PathBuf>,
    /// Machines that were built on (whose shared connections close at the end).
    used: BTreeSet<usize>,
}

impl Dispatcher {
    pub fn new(machines: Vec<Machine>) -> Self {
        Self {
            machines: machines
                .into_iter()
                .map(|machine| MachineState {
                    machine,
                    running: 0,
                    failure: None,
                })
                .collect(),
            slots: None,
            control_dir: None,
            used: BTreeSet::new(),
        }
    }

    /// The directory for the shared ssh connections' sockets (`/tmp/firn-ssh-<uid>`,
    /// private; short, as a socket path must be): `None` if it cannot be made, and then
    /// each build has a connection of its own.
    pub fn control_dir(&mut self) -> Option<std::path::PathBuf> {
        if self.control_dir.is_none() {
            use std::os::unix::fs::{DirBuilderExt, MetadataExt};
            let uid = nix::unistd::getuid().as_raw();
            let dir = std::env::temp_dir().join(format!("firn-ssh-{uid}"));
            let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
            // Ours, and nobody else's to read: the sockets give access to the machines.
            let meta = std::fs::symlink_metadata(&dir).ok()?;
            if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
                return None;
            }
            self.control_dir = Some(dir);
        }
        self.control_dir.clone()
    }

    /// Count loads from (and take slots in) Nix's slot files of `slots`.
    pub fn with_slots(mut self, slots: Slots) -> Self {
        self.slots = Some(slots);
        self
    }

    /// No machines: every build is local (Nix's `# decline-permanently`).
    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }

    pub fn machine(&self, i: usize) -> &Machine {
        &self.machines[i].machine
    }

    /// Some machine that has not failed has a free slot.
    pub fn any_free(&self) -> bool {
        self.machines
            .iter()
            .any(|m| m.failure.is_none() && m.running < m.machine.max_jobs)
    }

    /// Some machine has not failed and has slots at all: waiting for it makes sense.
    pub fn any_usable(&self) -> bool {
        self.machines
            .iter()
            .any(|m| m.failure.is_none() && m.machine.max_jobs > 0)
    }

    /// Where a build for `system` needing `required` goes; `can_build_locally`: this
    /// machine has a free slot and can build it.
    pub fn choose(
        &self,
        system: &str,
        required: &BTreeSet<String>,
        can_build_locally: bool,
    ) -> Choice {
        self.select(system, required, can_build_locally, |i| {
            let m = &self.machines[i];
            (m.running, m.running < m.machine.max_jobs)
        })
    }

    /// [`Self::choose`] with the loads of the slot files (under their main lock), and
    /// the chosen machine's slot taken.
    pub fn reserve(
        &mut self,
        system: &str,
        required: &BTreeSet<String>,
        can_build_locally: bool,
    ) -> Reserved {
        let Some(slots) = self.slots.clone() else {
            return match self.choose(system, required, can_build_locally) {
                Choice::Machine(i) => Reserved::Machine(i, None),
                Choice::Postpone => Reserved::Postpone,
                Choice::Decline => Reserved::Decline,
            };
        };
        // Without the files (a read-only state dir) the loads are this worker's.
        let _main = slots.main_lock();
        let mut probes: Vec<Option<slots::Probe>> = self
            .machines
            .iter()
            .map(|m| {
                let fits = m.failure.is_none()
                    && m.machine.max_jobs > 0
                    && m.machine.fits(system, required);
                fits.then(|| slots.probe(&m.machine.store_uri, m.machine.max_jobs).ok())
                    .flatten()
            })
            .collect();
        let choice = self.select(system, required, can_build_locally, |i| match &probes[i] {
            Some(p) => (p.load, p.free.is_some()),
            None => {
                let m = &self.machines[i];
                (m.running, m.running < m.machine.max_jobs)
            }
        });
        match choice {
            Choice::Machine(i) => Reserved::Machine(i, probes[i].take().and_then(|p| p.free)),
            Choice::Postpone => Reserved::Postpone,
            Choice::Decline => Reserved::Decline,
        }
    }

    /// Nix's choice, with `load_of(i)` giving machine `i`'s load and whether it has a
    /// free slot.
    fn select(
        &self,
        system: &str,
        required: &BTreeSet<String>,
        can_build_locally: bool,
        load_of: impl Fn(usize) -> (u32, bool),
    ) -> Choice {
        let mut right_type = false;
        let mut best: Option<(usize, u32)> = None;
        for (i, m) in self.machines.iter().enumerate() {
            // A machine without slots never frees one: waiting for it would be forever
            // (Nix waits).
            if m.failure.is_some() || m.machine.max_jobs == 0 || !m.machine.fits(system, required) {
                continue;
            }
            right_type = true;
            let (load, free) = load_of(i);
            if !free {
                continue;
            }
            let speed = m.machine.speed_factor;
            let better = match best {
                None => true,
                Some((b, b_load)) => {
                    let b_speed = self.machines[b].machine.speed_factor;
                    let (q, bq) = (load / speed, b_load / b_speed);
                    q < bq || (q == bq && (speed > b_speed || (speed == b_speed && load < b_load)))
                }
            };
            if better {
                best = Some((i, load));
            }
        }
        match best {
            Some((i, _)) => Choice::Machine(i),
            None if right_type && !can_build_locally => Choice::Postpone,
            None => Choice::Decline,
        }
    }

    pub fn started(&mut self, i: usize) {
        self.machines[i].running += 1;
        self.used.insert(i);
    }

    pub fn finished(&mut self, i: usize) {
        let m = &mut self.machines[i];
        m.running = m.running.saturating_sub(1);
    }

    /// Machine `i` failed (`why`): no more builds go there in this run.
    pub fn disable(&mut self, i: usize, why: String) {
        self.machines[i].failure = Some(why);
    }

    /// Every machine, with why it failed or what it offers, for the message of a build
    /// that no machine took.
    pub fn describe(&self) -> Vec<String> {
        self.machines
            .iter()
            .map(|m| match &m.failure {
                Some(why) => format!("'{}' failed: {why}", m.machine.store_uri),
                None => format!(
                    "'{}' (systems {}, max-jobs {}, features {{{}}}, mandatory {{{}}})",
                    m.machine.store_uri,
                    m.machine.systems.join(", "),
                    m.machine.max_jobs,
                    join(&m.machine.supported_features),
                    join(&m.machine.mandatory_features)
                ),
            })
            .collect()
    }
}

impl Drop for Dispatcher {
    /// Close the shared connections of the machines used (OpenSSH would close them
    /// itself a minute after their last session).
    fn drop(&mut self) {
        let Some(dir) = &self.control_dir else {
            return;
        };
        let sshopts = std::env::var("NIX_SSHOPTS").unwrap_or_default();
        for &i in &self.used {
            let Ok(ssh) = ssh::SshStore::of_machine(&self.machines[i].machine) else {
                continue;
            };
            if ssh.is_fake() {
                continue;
            }
            let argv = ssh.exit_argv(&sshopts, dir);
            let _ = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dispatcher(spec: &str) -> Dispatcher {
        Dispatcher::new(
            machines::parse_builders(spec, "x86_64-linux", &mut |_| {
                Err(std::io::ErrorKind::NotFound.into())
            })
            .unwrap(),
        )
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn the_least_loaded_machine_wins_by_nix_s_integer_arithmetic() {
        // a: 4 slots, speed 2; b: 2 slots, speed 1.
        let mut d = dispatcher("a x86_64-linux - 4 2; b x86_64-linux - 2 1");
        // Both empty: load 0/2 == 0/1, a is faster.
        assert_eq!(d.choose("x86_64-linux", &none(), false), Choice::Machine(0));
        d.started(0);
        // a: 1/2 = 0 (integer), b: 0/1 = 0: a again, faster.
        assert_eq!(d.choose("x86_64-linux", &none(), false), Choice::Machine(0));
        d.started(0);
        // a: 2/2 = 1, b: 0: b.
        assert_eq!(d.choose("x86_64-linux", &none(), false), Choice::Machine(1));
        d.started(1);
        d.started(1);
        d.started(0);
        d.started(0);
        // All six slots taken: wait if this machine cannot build it, else build here.
        assert!(!d.any_free());
        assert_eq!(d.choose("x86_64-linux", &none(), false), Choice::Postpone);
        assert_eq!(d.choose("x86_64-linux", &none(), true), Choice::Decline);
        d.finished(1);
        assert_eq!(d.choose("x86_64-linux", &none(), true), Choice::Machine(1));
    }

    #[test]
    fn systems_features_and_failures_decide_who_fits() {
        let mut d =
            dispatcher("a aarch64-linux; b x86_64-linux - 1 1 kvm; c x86_64-linux - 1 1 - bench");
        let kvm: BTreeSet<String> = ["kvm".to_owned()].into();
        let bench: BTreeSet<String> = ["bench".to_owned()].into();
        assert_eq!(
            d.choose("aarch64-linux", &none(), false),
            Choice::Machine(0)
        );
        // c only takes builds that ask for "bench"; b has no mandatory features.
        assert_eq!(d.choose("x86_64-linux", &none(), false), Choice::Machine(1));
        assert_eq!(d.choose("x86_64-linux", &kvm, false), Choice::Machine(1));
        assert_eq!(d.choose("x86_64-linux", &bench, false), Choice::Machine(2));
        // Nobody builds for i686: decline (the local check then says why not).
        assert_eq!(d.choose("i686-linux", &none(), false), Choice::Decline);
        // builtin builders run anywhere that has the features.
        assert_eq!(d.choose("builtin", &kvm, false), Choice::Machine(1));
        d.disable(1, "connection refused".into());
        assert_eq!(d.choose("x86_64-linux", &kvm, false), Choice::Decline);
        let text = d.describe().join("; ");
        assert!(
            text.contains("'ssh://b' failed: connection refused"),
            "{text}"
        );
        assert!(
            text.contains(
                "'ssh://c' (systems x86_64-linux, max-jobs 1, features {}, mandatory {bench})"
            ),
            "{text}"
        );
    }

    /// Slots another process holds count as load: with both of `a`'s taken elsewhere,
    /// `b` gets the build even though `a` is faster.
    #[test]
    fn slots_held_by_other_processes_count() {
        let dir = std::env::temp_dir().join(format!("firn-reserve-{}", std::process::id()));
        let slots = Slots::new(&dir);
        let mut d =
            dispatcher("a x86_64-linux - 2 4; b x86_64-linux - 1 1").with_slots(slots.clone());
        let held: Vec<_> = (0..2)
            .map(|_| slots.probe("ssh://a", 2).unwrap().free.unwrap())
            .collect();
        let Reserved::Machine(i, Some(lock)) = d.reserve("x86_64-linux", &none(), false) else {
            panic!("no machine");
        };
        assert_eq!(i, 1);
        // Now b's only slot is held too: wait.
        assert!(matches!(
            d.reserve("x86_64-linux", &none(), false),
            Reserved::Postpone
        ));
        drop(held);
        assert!(matches!(
            d.reserve("x86_64-linux", &none(), false),
            Reserved::Machine(0, Some(_))
        ));
        drop(lock);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_machine_with_no_slots_never_takes_a_build() {
        let d = dispatcher("a x86_64-linux - 0");
        assert!(!d.any_free());
        assert!(!d.any_usable());
        assert_eq!(d.choose("x86_64-linux", &none(), false), Choice::Decline);
    }
}
