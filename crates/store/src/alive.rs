//! Why a path is alive (what keeps `firn delete` from deleting it), as Nix 2.8 explains
//! it: a root, a temporary root, a referrer, a valid output or deriver, possibly
//! through another path.

use std::fmt;
use std::path::PathBuf;

/// The path next to the one asked about on the way to what keeps it alive, as
/// `'Q'` or `'Q' (through 'X')`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needer {
    /// The path that is a root (or a temporary root).
    pub path: String,
    /// The path next to the one asked about, when it is not `path` itself.
    pub through: Option<String>,
}

impl fmt::Display for Needer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", self.path)?;
        if let Some(t) = &self.through {
            write!(f, " (through '{t}')")?;
        }
        Ok(())
    }
}

/// Why `delete_specific` refuses to delete a path ([`StoreError::StillAlive`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliveReason {
    /// The path is a root, through `link`.
    Root { link: PathBuf },
    /// A path that needs it is a root.
    NeededByRoot { needer: Needer, link: PathBuf },
    /// The path is a temporary root of the processes `pids`.
    TempRoot { pids: Vec<String> },
    /// A path that needs it is a temporary root of `pids`.
    NeededByTempRoot { needer: Needer, pids: Vec<String> },
    /// A valid path not being deleted refers to it (`through` the path next to it).
    Referrer {
        referrer: String,
        through: Option<String>,
    },
    /// With `keep-derivations`: an output of the derivation is still valid.
    ValidOutput {
        output: String,
        through: Option<String>,
    },
    /// With `keep-outputs`: a deriver of the output is still valid.
    ValidDeriver {
        deriver: String,
        through: Option<String>,
    },
    /// A process made it a temporary root after `deleted` other paths were deleted.
    RootedMeanwhile { deleted: usize },
    /// A path referring to it was registered after `deleted` other paths were deleted.
    ReferencedMeanwhile { deleted: usize },
}

impl fmt::Display for AliveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let through = |t: &Option<String>| match t {
            Some(t) => format!(" (through '{t}')"),
            None => String::new(),
        };
        match self {
            Self::Root { link } => write!(f, "it is a GC root ('{}')", link.display()),
            Self::NeededByRoot { needer, link } => {
                write!(
                    f,
                    "it is needed by {needer}, a GC root ('{}')",
                    link.display()
                )
            }
            Self::TempRoot { pids } => write!(
                f,
                "it is in use by process {} (a temporary root)",
                pids.join(", ")
            ),
            Self::NeededByTempRoot { needer, pids } => write!(
                f,
                "it is needed by {needer}, in use by process {} (a temporary root)",
                pids.join(", ")
            ),
            Self::Referrer {
                referrer,
                through: t,
            } => {
                write!(f, "it is still referenced by '{referrer}'{}", through(t))
            }
            Self::ValidOutput { output, through: t } => write!(
                f,
                "the derivation's output '{output}' is still valid{}",
                through(t)
            ),
            Self::ValidDeriver {
                deriver,
                through: t,
            } => {
                write!(f, "its deriver '{deriver}' is still valid{}", through(t))
            }
            Self::RootedMeanwhile { deleted } => write!(
                f,
                "a process started using it (a temporary root) while {deleted} other paths \
                 were deleted"
            ),
            Self::ReferencedMeanwhile { deleted } => write!(
                f,
                "a path referring to it was registered while {deleted} other paths were \
                 deleted"
            ),
        }
    }
}
