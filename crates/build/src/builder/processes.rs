//! The processes of a local build that firn waits for.
//!
//! Unsandboxed, the child `Command::spawn` forked execs the builder: its exit is the
//! build's. In the sandbox, that child is only the shim: it clones the builder into its
//! namespaces as a child of firn's (`CLONE_PARENT`), writes its id maps, releases it and
//! exits (`sandbox/child.rs`). Both are firn's children, in the process group the shim
//! leads, and are reaped with `waitpid(-group)`. The build's exit is the builder's, or
//! the shim's if it failed before releasing one (the step pipe then says why).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};

use nix::errno::Errno;
use nix::unistd::Pid;

use super::sys;

/// What firn waits for.
#[derive(Debug)]
pub(crate) enum Processes {
    /// The forked child is the builder.
    Direct(Child),
    /// The shim (leading the process group) and the builder it cloned.
    Sandboxed {
        group: Pid,
        shim: Option<ExitStatus>,
        builder: Option<ExitStatus>,
    },
}

impl Processes {
    /// For `child` as `Command::spawn` returned it, a shim if `sandboxed`. Dropping the
    /// `Child` of a shim neither kills nor reaps it: it is reaped here.
    pub(crate) fn new(child: Child, sandboxed: bool) -> Self {
        match sandboxed {
            false => Processes::Direct(child),
            true => Processes::Sandboxed {
                group: Pid::from_raw(child.id() as i32),
                shim: None,
                builder: None,
            },
        }
    }

    /// The process group of the build (the forked child leads it).
    pub(crate) fn group(&self) -> u32 {
        match self {
            Processes::Direct(c) => c.id(),
            Processes::Sandboxed { group, .. } => group.as_raw() as u32,
        }
    }

    /// The build's exit, once there is one.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self {
            Processes::Direct(c) => c.try_wait(),
            Processes::Sandboxed { .. } => self.reap(false),
        }
    }

    /// Wait for the build's exit, then reap whatever is left of its processes (the
    /// caller has killed them, or they have exited).
    pub(crate) fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Processes::Direct(c) => c.wait(),
            Processes::Sandboxed { .. } => {
                let status = self.reap(true)?;
                self.drain();
                status.ok_or_else(|| io::Error::from(Errno::ECHILD))
            }
        }
    }

    /// Reap what is left of the process group (its members are dead or dying).
    pub(crate) fn drain(&mut self) {
        match self {
            Processes::Direct(c) => {
                let _ = c.try_wait();
            }
            Processes::Sandboxed { group, .. } => {
                while let Ok(Some(_)) = sys::wait_group(*group, true) {}
            }
        }
    }

    fn reap(&mut self, block: bool) -> io::Result<Option<ExitStatus>> {
        let Processes::Sandboxed {
            group,
            shim,
            builder,
        } = self
        else {
            return Ok(None);
        };
        loop {
            if let Some(b) = builder {
                return Ok(Some(*b));
            }
            if let Some(s) = shim.filter(|s| !s.success()) {
                return Ok(Some(s));
            }
            match sys::wait_group(*group, block) {
                Ok(None) => return Ok(None),
                Ok(Some((pid, raw))) => match pid == *group {
                    true => *shim = Some(ExitStatus::from_raw(raw)),
                    false => *builder = Some(ExitStatus::from_raw(raw)),
                },
                // Nothing left to wait for: what there was is the exit.
                Err(Errno::ECHILD) => return Ok(builder.or(*shim)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
