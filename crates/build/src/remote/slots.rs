//! A machine's build slots, shared with every other process that dispatches to it (other
//! firn workers, a daemon's connections, Nix's build hook), as Nix 2.8's build-remote
//! keeps them:
//!
//! ```text
//! <state dir>/current-load/main-lock                 held (blocking) while choosing
//! <state dir>/current-load/<uri, '/' → '_'>-<n>      slot n of the machine, n < max-jobs:
//!                                                    flock'ed for as long as a build
//!                                                    runs there; a slot that cannot be
//!                                                    locked without waiting is in use
//! ```
//!
//! The files are Nix's, so firn and Nix dispatching from the same store share the
//! machines' slots.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

/// A slot in use (released when dropped).
#[derive(Debug)]
pub struct SlotLock {
    _lock: Flock<File>,
}

/// The `current-load` directory of a store.
#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
}

/// What [`Slots::probe`] found of one machine.
#[derive(Debug)]
pub struct Probe {
    /// Slots in use (by anyone).
    pub load: u32,
    /// The first free slot, now held.
    pub free: Option<SlotLock>,
}

impl Slots {
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self {
            dir: state_dir.join("current-load"),
        }
    }

    fn open(&self, name: &str) -> io::Result<File> {
        std::fs::create_dir_all(&self.dir)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(name))
    }

    /// Held while a choice is made, so that two processes do not take the same slot
    /// on the strength of the same probe.
    pub fn main_lock(&self) -> io::Result<Flock<File>> {
        Flock::lock(self.open("main-lock")?, FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from(e))
    }

    /// The load of machine `uri` with `max_jobs` slots, and a free slot held, if any.
    pub fn probe(&self, uri: &str, max_jobs: u32) -> io::Result<Probe> {
        let escaped = uri.replace('/', "_");
        let mut p = Probe {
            load: 0,
            free: None,
        };
        for slot in 0..max_jobs {
            let file = self.open(&format!("{escaped}-{slot}"))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) if p.free.is_none() => p.free = Some(SlotLock { _lock: lock }),
                Ok(_) => {}
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => p.load += 1,
                Err((_, e)) => return Err(e.into()),
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_held_slot_is_load_and_the_next_is_taken() {
        let dir = std::env::temp_dir().join(format!("firn-slots-{}", std::process::id()));
        let slots = Slots::new(&dir);
        let uri = "ssh://root@host?remote-store=/r";
        let first = slots.probe(uri, 2).unwrap();
        assert_eq!(first.load, 0);
        assert!(first.free.is_some());
        // Nix's file names.
        assert!(dir
            .join("current-load/ssh:__root@host?remote-store=_r-0")
            .exists());
        let second = slots.probe(uri, 2).unwrap();
        assert_eq!(second.load, 1);
        assert!(second.free.is_some());
        let third = slots.probe(uri, 2).unwrap();
        assert_eq!(third.load, 2);
        assert!(third.free.is_none());
        drop(first);
        assert_eq!(slots.probe(uri, 2).unwrap().load, 1);
        drop(slots.main_lock().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
