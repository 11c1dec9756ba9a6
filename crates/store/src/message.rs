//! What the store has to say while it works, as typed events. The library prints
//! nothing: a caller that wants Nix's lines on stderr prints each event with `{}` (the
//! `Display` text is Nix 2.8's wording, byte for byte).
//!
//! Two routes deliver them:
//!
//! - messages that can come from anywhere in the store (waiting for a lock, a stale
//!   indirect root removed, a garbage line on the GC socket) go to the [`Reporter`] the
//!   [`crate::Store`] holds ([`crate::Store::set_reporter`]; by default they are
//!   dropped);
//! - the progress of one operation (a collection, a deletion) goes to the callback
//!   given to that call, so that a caller can keep it quiet without losing the others.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// An event of the store. Paths of store objects are as Nix prints them
/// (`/nix/store/<hash>-<name>`, or an entry of the store directory that is not one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreMessage {
    /// `gc.lock` is taken (a collection runs): waiting for it.
    WaitingForGcLock,
    /// Another process holds the lock of the store path `path`: waiting for it.
    WaitingForLock { path: String },
    /// A client of the GC roots socket sent something that is not a store path.
    GarbageRoot { line: String },
    /// A collection starts looking for roots.
    FindingRoots,
    /// The temporary-roots file of a dead process is removed.
    RemovingStaleTempRoots { file: PathBuf },
    /// An indirect root under `gcroots/auto` whose target is gone is removed.
    RemovingStaleLink { link: PathBuf, target: PathBuf },
    /// A potential root could not be read (permission, gone meanwhile): ignored.
    CannotReadRoot { path: PathBuf },
    /// The collection starts deleting.
    DeletingGarbage,
    /// `--print-live` / `--print-dead`: computing the sets.
    DeterminingLiveDead,
    /// One path (or entry of the store directory) is deleted.
    Deleting { path: String },
    /// `--max-freed` was reached.
    MaxFreedReached { max_freed: u64 },
    /// Unused files of `.links` are deleted.
    DeletingUnusedLinks,
    /// What hard linking in `.links` saves, in bytes (may be negative).
    HardLinkingSaves { bytes: i64 },
    /// Optimisation skips a writable file of the store (someone modified it).
    SkippingWritableFile { path: PathBuf },
    /// A file of `.links` whose size is not its content's is removed.
    RemovingCorruptedLink { link: PathBuf },
}

impl fmt::Display for StoreMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WaitingForGcLock => f.write_str("waiting for the big garbage collector lock..."),
            Self::WaitingForLock { path } => write!(f, "waiting for lock on '{path}'..."),
            Self::GarbageRoot { .. } => {
                f.write_str("received garbage instead of a root from client")
            }
            Self::FindingRoots => f.write_str("finding garbage collector roots..."),
            Self::RemovingStaleTempRoots { file } => {
                write!(
                    f,
                    "removing stale temporary roots file '{}'",
                    file.display()
                )
            }
            Self::RemovingStaleLink { link, target } => write!(
                f,
                "removing stale link from '{}' to '{}'",
                link.display(),
                target.display()
            ),
            Self::CannotReadRoot { path } => {
                write!(f, "cannot read potential root '{}'", path.display())
            }
            Self::SkippingWritableFile { path } => {
                write!(f, "skipping suspicious writable file '{}'", path.display())
            }
            Self::RemovingCorruptedLink { link } => {
                write!(f, "removing corrupted link '{}'", link.display())
            }
            Self::DeletingGarbage => f.write_str("deleting garbage..."),
            Self::DeterminingLiveDead => f.write_str("determining live/dead paths..."),
            Self::Deleting { path } => write!(f, "deleting '{path}'"),
            Self::MaxFreedReached { max_freed } => {
                write!(f, "deleted more than {max_freed} bytes; stopping")
            }
            Self::DeletingUnusedLinks => f.write_str("deleting unused links..."),
            Self::HardLinkingSaves { bytes } => write!(
                f,
                "note: currently hard linking saves {:.2} MiB",
                *bytes as f64 / (1024.0 * 1024.0)
            ),
        }
    }
}

/// Where a [`crate::Store`] sends the [`StoreMessage`]s that are not the progress of a
/// call. Cheap to clone (the roots server's threads hold one); the default drops
/// everything.
#[derive(Clone)]
pub struct Reporter(Arc<dyn Fn(&StoreMessage) + Send + Sync>);

impl Reporter {
    pub fn new(f: impl Fn(&StoreMessage) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The reporter that drops every message.
    pub fn discard() -> Self {
        Self::new(|_| {})
    }

    pub fn report(&self, m: &StoreMessage) {
        (self.0)(m)
    }
}

impl Default for Reporter {
    fn default() -> Self {
        Self::discard()
    }
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reporter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn messages_read_as_nixs_lines() {
        let cases = [
            (
                StoreMessage::WaitingForGcLock,
                "waiting for the big garbage collector lock...",
            ),
            (
                StoreMessage::WaitingForLock {
                    path: "/nix/store/abc-x".into(),
                },
                "waiting for lock on '/nix/store/abc-x'...",
            ),
            (
                StoreMessage::GarbageRoot {
                    line: "junk".into(),
                },
                "received garbage instead of a root from client",
            ),
            (
                StoreMessage::MaxFreedReached { max_freed: 10 },
                "deleted more than 10 bytes; stopping",
            ),
            (
                StoreMessage::HardLinkingSaves { bytes: -1 << 20 },
                "note: currently hard linking saves -1.00 MiB",
            ),
        ];
        for (m, text) in cases {
            assert_eq!(m.to_string(), text);
        }
    }

    #[test]
    fn a_reporter_sees_what_is_reported_and_the_default_drops_it() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let r = Reporter::new({
            let seen = seen.clone();
            move |m| seen.lock().unwrap().push(m.clone())
        });
        r.clone().report(&StoreMessage::FindingRoots);
        Reporter::default().report(&StoreMessage::DeletingGarbage);
        assert_eq!(*seen.lock().unwrap(), [StoreMessage::FindingRoots]);
    }
}
