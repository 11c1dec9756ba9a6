//! `post-build-hook`: a program run after every successful build (not after a
//! substitution), as Nix 2.8's `runPostBuildHook`.
//!
//! The hook gets the worker's environment plus
//! - `DRV_PATH`: the derivation, as the store shows it;
//! - `OUT_PATHS`: its output paths, sorted, separated by one space;
//! - `NIX_CONFIG`: the settings in effect, one `name = value` line each (only names Nix
//!   knows, so a `nix` the hook runs takes them without warnings).
//!
//! Its standard output and error are merged and reported line by line
//! ([`BuildEvents::post_build_hook_line`]). A hook that cannot be started or exits
//! non-zero fails the goal with Nix's message (`program '…' failed with exit code N`);
//! the outputs stay registered, as in Nix, where the build was complete.
//!
//! Nix 2.8 passes an empty `OUT_PATHS` (it reads the build result's outputs before they
//! are filled in; fixed in later Nix): firn passes the outputs, as the manual says.

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use firn_derivation::StorePath;

use crate::error::{BuildError, BuilderExit};
use crate::events::BuildEvents;
use crate::settings::{Settings, NIX_SETTINGS};

/// What one run of the hook is told.
#[derive(Debug)]
pub struct HookRun<'a> {
    pub hook: &'a str,
    pub drv: &'a StorePath,
    /// `DRV_PATH`.
    pub drv_shown: String,
    /// The output paths as the store shows them.
    pub outputs: Vec<String>,
}

/// `NIX_CONFIG` for the hook: the settings Nix knows, sorted by name.
pub fn nix_config(settings: &Settings) -> String {
    let mut shown = settings.show();
    shown.retain(|(name, _)| NIX_SETTINGS.contains(name));
    shown.sort();
    shown
        .iter()
        .map(|(name, value)| format!("{name} = {value}\n"))
        .collect()
}

/// The hook's environment beyond the inherited one.
pub fn hook_env(run: &HookRun<'_>, settings: &Settings) -> Vec<(&'static str, String)> {
    let mut outputs = run.outputs.clone();
    outputs.sort();
    vec![
        ("DRV_PATH", run.drv_shown.clone()),
        ("OUT_PATHS", outputs.join(" ")),
        ("NIX_CONFIG", nix_config(settings)),
    ]
}

/// Run the hook to its end, reporting its output.
pub fn run_post_build_hook(
    run: &HookRun<'_>,
    settings: &Settings,
    events: &mut dyn BuildEvents,
) -> Result<(), BuildError> {
    let start_error = |source| BuildError::PostBuildHookStart {
        hook: run.hook.to_owned(),
        source,
    };
    let (read, write) = std::io::pipe().map_err(start_error)?;
    let write_err = write.try_clone().map_err(start_error)?;
    let mut cmd = Command::new(run.hook);
    cmd.envs(hook_env(run, settings))
        .stdin(Stdio::null())
        .stdout(OwnedFd::from(write))
        .stderr(OwnedFd::from(write_err));
    events.post_build_hook_started(run.drv, run.hook);
    let spawned = cmd.spawn();
    // The write ends now live only in the child (and `cmd`): drop ours so that reading
    // ends when the hook (and whatever it left running) closes them.
    drop(cmd);
    let mut child = spawned.map_err(start_error)?;
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                events.post_build_hook_line(run.drv, &String::from_utf8_lossy(text));
            }
        }
    }
    let status = child.wait().map_err(start_error)?;
    events.post_build_hook_finished(run.drv);
    if status.success() {
        return Ok(());
    }
    Err(BuildError::PostBuildHookFailed {
        hook: run.hook.to_owned(),
        exit: match (status.code(), status.signal()) {
            (Some(c), _) => BuilderExit::Code(c),
            (_, Some(s)) => BuilderExit::Signal(s),
            _ => BuilderExit::Unknown,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_names_the_outputs_sorted_and_nix_settings_only() {
        let drv = StorePath::from_base_name(b"0dfl12vqyhd7gm44qcvpwmbiyv09ampg-ph-a.drv").unwrap();
        let run = HookRun {
            hook: "/bin/true",
            drv: &drv,
            drv_shown: "/nix/store/0dfl12vqyhd7gm44qcvpwmbiyv09ampg-ph-a.drv".into(),
            outputs: vec!["/nix/store/b-x-out".into(), "/nix/store/a-x-dev".into()],
        };
        let mut s = Settings::default();
        s.set("max-jobs", "3").unwrap();
        let env = hook_env(&run, &s);
        assert_eq!(
            env[0].1,
            "/nix/store/0dfl12vqyhd7gm44qcvpwmbiyv09ampg-ph-a.drv"
        );
        assert_eq!(env[1].1, "/nix/store/a-x-dev /nix/store/b-x-out");
        let config = &env[2].1;
        assert!(config.lines().any(|l| l == "max-jobs = 3"), "{config}");
        // firn's own settings would make the hook's `nix` warn.
        assert!(!config.contains("build-memory-max"), "{config}");
        let names: Vec<&str> = config
            .lines()
            .map(|l| l.split(" = ").next().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
