//! Why a builtin builder failed, in Nix 2.8's words.

use std::io;
use std::path::{Path, PathBuf};

/// A builtin builder's failure. The messages are Nix 2.8's (`SysError`s are the
/// context, `: `, and the C library's text for the error number).
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// A required attribute is not in the environment.
    #[error("attribute '{0}' missing")]
    MissingAttr(String),
    /// `builtin:NAME` is not one of Nix's.
    #[error("unsupported builtin builder '{0}'")]
    Unsupported(String),
    /// A number in buildenv's `derivations` that C++'s `std::stoi` refuses (Nix prints
    /// the exception's text, `stoi`, alone).
    #[error("stoi")]
    Stoi,
    /// buildenv's `derivations` ended in the middle of a package (undefined behaviour
    /// in Nix 2.8, which reads past the end of its list).
    #[error("attribute 'derivations' ends in the middle of a package")]
    TruncatedDerivations,
    /// A system call failed (Nix's `SysError`).
    #[error("{context}: {}", strerror(source))]
    Sys { context: String, source: io::Error },
    /// Two packages give the same file at the same priority.
    #[error(
        "packages '{}' and '{}' have the same priority {priority}; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the highest priority)",
        new.display(), old.display()
    )]
    SamePriority {
        new: PathBuf,
        old: PathBuf,
        priority: i32,
    },
    /// A package's directory where another's file is.
    #[error("collision between '{}' and non-directory '{}'", src.display(), target.display())]
    DirOverFile { src: PathBuf, target: PathBuf },
    /// A package's file where the environment has a directory.
    #[error("collision between non-directory '{}' and directory '{}'", src.display(), dst.display())]
    FileOverDir { src: PathBuf, dst: PathBuf },
    /// unpack-channel: the tarball does not hold exactly one top-level entry.
    #[error("channel tarball '{}' contains more than one file", .0.display())]
    ChannelEntries(PathBuf),
    /// fetchurl: the download failed (Nix's `FileTransferError`: the message, and the
    /// server's response when it is short or HTML).
    #[error("{0}")]
    Download(String),
    /// fetchurl with `unpack`: the download is not a NAR that can be restored.
    #[error("{0}")]
    Nar(#[from] firn_store::nar::NarError),
    /// unpack-channel: the tarball cannot be read.
    #[error("{context}: {}", firn_store::error::strerror(source))]
    Archive { context: String, source: io::Error },
}

impl BuiltinError {
    pub(crate) fn sys(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Sys { context, source }
    }

    /// The line (or lines) Nix 2.8's builtin writes to the build log before it exits
    /// 1: its errors as `error: …` (continuation lines indented under the text, as
    /// Nix shows them), a C++ library exception (`stoi`) as its bare text.
    pub fn log_text(&self) -> String {
        if let Self::Stoi = self {
            return "stoi".to_owned();
        }
        let mut out = String::from("error: ");
        for (i, line) in self.to_string().split('\n').enumerate() {
            if i > 0 {
                out.push('\n');
                if !line.is_empty() {
                    out.push_str("       ");
                }
            }
            out.push_str(line);
        }
        out
    }
}

/// The C library's text for `e`'s error number (`strerror`), as Nix's `SysError` puts
/// it; other errors as they display.
pub(crate) fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

/// `'PATH'` context strings.
pub(crate) fn quoted(what: &str, path: &Path) -> String {
    format!("{what} '{}'", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_nix_s() {
        let e = BuiltinError::sys("opening directory '/x'")(io::Error::from_raw_os_error(2));
        assert_eq!(
            e.log_text(),
            "error: opening directory '/x': No such file or directory"
        );
        assert_eq!(BuiltinError::Stoi.log_text(), "stoi");
        let e = BuiltinError::Download(
            "unable to download 'u': HTTP error 404 ('Not Found')\n\nresponse body:\n\n<a>\n b"
                .into(),
        );
        assert_eq!(
            e.log_text(),
            "error: unable to download 'u': HTTP error 404 ('Not Found')\n\n       response body:\n\n       <a>\n        b"
        );
    }
}
