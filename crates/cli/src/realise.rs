//! `firn realise DRV[^outputs]…`: build what is missing and print the output paths, as
//! `nix-store -r` does, with Nix's exit codes.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use firn_build::worker::{exit_status, BuildSettings, BuildStatus, Wanted, Worker};
use firn_derivation::StorePath;

use crate::error::CliError;
use crate::settings::Settings;
use crate::store_cmds::open;

#[derive(Debug, clap::Args)]
pub struct RealiseArgs {
    /// `.drv` store paths, optionally `DRV^out,dev` for some outputs.
    #[arg(required = true, value_name = "DRV")]
    pub drvs: Vec<String>,
    /// Make LINK a GC root pointing at the (first) output; further outputs get LINK-2, …
    #[arg(long, value_name = "LINK")]
    pub add_root: Option<PathBuf>,
    /// Only say what would be built.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON result object per derivation.
    #[arg(long)]
    pub json: bool,
    /// Builds to run at once (`max-jobs`; `auto` = number of cores).
    #[arg(short = 'j', long = "max-jobs", value_name = "N")]
    pub max_jobs: Option<String>,
    /// Keep building what does not depend on a failure.
    #[arg(short = 'k', long)]
    pub keep_going: bool,
    /// Keep the build directory of failed builds (and, with --check, a differing
    /// output as `<out>.check`).
    #[arg(short = 'K', long)]
    pub keep_failed: bool,
    /// Rebuild the given derivations and compare with their registered outputs
    /// (exit 104 if they differ).
    #[arg(long)]
    pub check: bool,
}

fn parse_jobs(s: &str) -> Result<usize, CliError> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1));
    }
    s.parse().map_err(|_| {
        CliError::usage(format!(
            "invalid value '{s}' for max-jobs: expected a number or 'auto'"
        ))
    })
}

fn secs(settings: &Settings, name: &str) -> Result<Option<Duration>, CliError> {
    match settings.option(name) {
        None => Ok(None),
        Some(v) => {
            let n: u64 = v.parse().map_err(|_| {
                CliError::usage(format!("invalid value '{v}' for setting '{name}'"))
            })?;
            Ok((n > 0).then(|| Duration::from_secs(n)))
        }
    }
}

fn flag(settings: &Settings, name: &str) -> Result<bool, CliError> {
    match settings.option(name) {
        None => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(v) => Err(CliError::usage(format!(
            "invalid value '{v}' for setting '{name}'"
        ))),
    }
}

pub fn realise(
    settings: &Settings,
    args: &RealiseArgs,
    out: &mut impl Write,
) -> Result<u8, CliError> {
    // Nix's default on Linux is `sandbox = true`; firn never falls back silently.
    let sandbox = match settings.option("sandbox") {
        None | Some("true") | Some("1") | Some("relaxed") => true,
        Some("false") | Some("0") => false,
        Some(v) => {
            return Err(CliError::usage(format!(
                "invalid value '{v}' for setting 'sandbox'"
            )))
        }
    };
    let sandbox_paths =
        firn_build::sandbox::parse_sandbox_paths(settings.option("sandbox-paths").unwrap_or(""));
    let mut store = open(settings)?;
    let sd = store.store_dir().clone();
    let mut tops: Vec<(StorePath, Wanted)> = Vec::new();
    for arg in &args.drvs {
        let (path, wanted) = match arg.split_once('^') {
            Some((p, "*")) => (p, Wanted::All),
            Some((p, outs)) => (
                p,
                Wanted::Some(outs.split(',').map(str::to_owned).collect()),
            ),
            None => (arg.as_str(), Wanted::All),
        };
        let p = store.parse_path_arg(path)?;
        if !p.is_derivation() {
            // A non-derivation path is realised if it is valid.
            if !store
                .db()
                .is_valid_path(&p)
                .map_err(firn_store::StoreError::from)?
            {
                return Err(CliError::usage(format!(
                    "path '{}' is not valid and cannot be built",
                    sd.display(&p)
                )));
            }
        }
        tops.push((p, wanted));
    }
    let jobs = match &args.max_jobs {
        Some(j) => parse_jobs(j)?,
        None => match settings.option("max-jobs") {
            Some(j) => parse_jobs(j)?,
            None => 1,
        },
    };
    let build = BuildSettings {
        max_jobs: jobs.max(1),
        // Nix 2.8's default is the number of CPUs (the env-probe vector shows 2 on a
        // 2-core machine).
        cores: settings
            .option("cores")
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)),
        timeout: secs(settings, "timeout")?,
        max_silent_time: secs(settings, "max-silent-time")?,
        max_log_size: settings
            .option("max-build-log-size")
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0),
        keep_going: args.keep_going || flag(settings, "keep-going")?,
        keep_failed: args.keep_failed || flag(settings, "keep-failed")?,
        print_build_logs: !settings.quiet,
        check: args.check,
        sandbox,
        sandbox_paths,
        build_users_group: settings
            .option("build-users-group")
            .unwrap_or("nixbld")
            .to_owned(),
    };
    let drv_tops: Vec<(StorePath, Wanted)> = tops
        .iter()
        .filter(|(p, _)| p.is_derivation())
        .cloned()
        .collect();
    let mut worker = Worker::new(&mut store, build);
    let to_build = worker
        .plan(&drv_tops)
        .map_err(|e| CliError::usage(e.to_string()))?;
    if !to_build.is_empty() {
        if to_build.len() == 1 {
            eprintln!("this derivation will be built:");
        } else {
            eprintln!("these {} derivations will be built:", to_build.len());
        }
        for p in &to_build {
            eprintln!("  {}", sd.display(p));
        }
    }
    if args.dry_run {
        return Ok(0);
    }
    firn_build::worker::install_interrupt_handlers();
    let results = worker.run(&drv_tops);
    if firn_build::worker::interrupted() {
        let stopped: Vec<String> = results
            .iter()
            .filter(|(_, r)| !r.status.success())
            .map(|(p, _)| sd.display(p))
            .collect();
        let by = firn_build::worker::interrupt_signal().unwrap_or("a signal");
        let killed: Vec<String> = worker
            .interrupted_builds()
            .iter()
            .map(|p| format!("'{}'", sd.display(p)))
            .collect();
        let during = match killed.is_empty() {
            true => String::new(),
            false => format!(" while building {}", killed.join(", ")),
        };
        return Err(CliError::usage(format!(
            "interrupted by {by}{during}; stopped realising {}; build directories and partial outputs removed",
            stopped.join(", ")
        )));
    }
    let mut paths: BTreeSet<StorePath> = BTreeSet::new();
    for (p, w) in &tops {
        if !p.is_derivation() {
            paths.insert(p.clone());
            continue;
        }
        if let Some((_, r)) = results.iter().find(|(k, _)| k == p) {
            if r.status.success() {
                for (name, out) in &r.outputs {
                    if match w {
                        Wanted::All => true,
                        Wanted::Some(s) => s.contains(name),
                    } {
                        paths.insert(out.clone());
                    }
                }
            }
        }
    }
    // Like Nix's worker flags: every goal's failure counts, not only the top ones'.
    let code = exit_status(&worker.results().map(|(_, r)| r).collect::<Vec<_>>());
    if args.json {
        let mut text = String::from("[");
        for (i, (p, r)) in results.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let outs: Vec<String> = r
                .outputs
                .iter()
                .map(|(n, o)| format!("\"{n}\":\"{}\"", sd.display(o)))
                .collect();
            text.push_str(&format!(
                "{{\"drvPath\":\"{}\",\"status\":\"{}\",\"success\":{},\"outputs\":{{{}}},\"startTime\":{},\"stopTime\":{}",
                sd.display(p),
                r.status.as_str(),
                r.status.success(),
                outs.join(","),
                r.start_time,
                r.stop_time
            ));
            if let Some(e) = &r.error {
                let mut buf = Vec::new();
                firn_derivation::json::write_json_string(&mut buf, e.as_bytes());
                text.push_str(&format!(",\"error\":{}", String::from_utf8_lossy(&buf)));
            }
            if let Some(l) = &r.log {
                if l.exists() {
                    text.push_str(&format!(",\"log\":\"{}\"", l.display()));
                }
            }
            text.push('}');
        }
        text.push_str("]\n");
        out.write_all(text.as_bytes()).map_err(CliError::stdout)?;
    } else if code == 0 {
        for p in &paths {
            out.write_all(format!("{}\n", sd.display(p)).as_bytes())
                .map_err(CliError::stdout)?;
        }
    }
    if code == 0 {
        if let Some(link) = &args.add_root {
            for (i, p) in paths.iter().enumerate() {
                let l = if i == 0 {
                    link.clone()
                } else {
                    PathBuf::from(format!("{}-{}", link.display(), i + 1))
                };
                add_root(&store, &l, p)?;
            }
        }
    }
    let _ = BuildStatus::Built;
    Ok(code)
}

/// An indirect GC root: LINK → output, and `gcroots/auto/<hash of LINK>` → LINK.
fn add_root(
    store: &firn_store::Store,
    link: &std::path::Path,
    p: &StorePath,
) -> Result<(), CliError> {
    store.add_perm_root(link, p)?;
    Ok(())
}
