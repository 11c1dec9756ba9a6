//! `firn __builtin NAME`: the process a `builtin:NAME` builder runs as (started by the
//! local builder with the build's environment, directory and user, in the sandbox when
//! the build is; `firn_build::builtins::exec`). Hidden: handled before the command line
//! is parsed, so nothing of firn's own set-up (settings files, the store) is read —
//! the builder has its attributes in its environment and nothing else.
//!
//! As Nix's builtins do, it writes warnings (`warning: …`) and its error to the build
//! log (stderr) and exits 1 on failure.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use firn_build::builtins::{self, exec::SUBCOMMAND, Attrs, Context};

/// Nix's `download-attempts` default.
const DOWNLOAD_ATTEMPTS: u32 = 5;

/// The builtin this process was started to run, if it was: `firn __builtin NAME`.
pub fn invocation() -> Option<OsString> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != SUBCOMMAND {
        return None;
    }
    Some(args.next().unwrap_or_default())
}

/// Run builtin `name` with this process's environment.
pub fn run(name: &OsString) -> ExitCode {
    let attrs = Attrs::from_env();
    let mut warn = |w: &str| {
        let _ = writeln!(std::io::stderr(), "warning: {w}");
    };
    let mut cx = Context {
        warn: &mut warn,
        download_attempts: DOWNLOAD_ATTEMPTS,
    };
    match builtins::run(name.as_bytes(), &attrs, &mut cx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{}", e.log_text());
            ExitCode::from(1)
        }
    }
}
