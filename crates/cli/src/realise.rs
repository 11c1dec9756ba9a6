//! `firn realise DRV[^outputs]…`: build what is missing and print the output paths, as
//! `nix-store -r` does, with Nix's exit codes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use firn_build::{exit_status, BuildMode, BuildResult, Wanted, Worker};
use firn_derivation::{OutputName, StorePath};

use crate::error::CliError;
use crate::progress::TerminalEvents;
use crate::settings::Settings;
use crate::store_cmds::open;

#[derive(Debug, clap::Args)]
pub struct RealiseArgs {
    /// `.drv` store paths; `DRV!out,dev` or `DRV^out,dev` for some outputs (`!` is
    /// nix-store's spelling), `DRV!*` or `DRV^*` for all; other store paths must be valid.
    // (None: nothing to do, as nix-store -r.)
    #[arg(value_name = "DRV")]
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
    /// Do not show the builders' output (as nix-store's -Q; the same as --quiet here).
    #[arg(short = 'Q', long)]
    pub no_build_output: bool,
    /// Prefix every line of the builders' output with the derivation's name, as
    /// `nix build -L` (the output is shown by default, unprefixed while one build runs
    /// and prefixed while builds run in parallel; -Q or --quiet hides it).
    #[arg(short = 'L', long)]
    pub print_build_logs: bool,
    /// Rebuild the given derivations and compare with their registered outputs
    /// (exit 104 if they differ).
    #[arg(long)]
    pub check: bool,
    // `-j`, `-k` and `-K` are global options (main.rs): they set the settings
    // `max-jobs`, `keep-going` and `keep-failed`, which `realise()` reads.
}

impl RealiseArgs {
    /// Realise `drvs` with nothing else asked (`nix-store -q --force-realise`).
    pub fn of(drvs: Vec<String>) -> Self {
        Self {
            drvs,
            add_root: None,
            dry_run: false,
            json: false,
            no_build_output: false,
            print_build_logs: false,
            check: false,
        }
    }
}

/// `DRV`, `DRV^*`, `DRV^out,dev`, and nix-store's `DRV!out,dev`, `DRV!*`: split at the
/// first `^` or `!` (neither can be in a store path's name). Empty names are dropped, as
/// Nix's `tokenizeString` drops them, and none left means all (`DRV!` is `DRV`).
fn parse_target(arg: &str) -> (&str, Wanted) {
    match arg.split_once(['^', '!']) {
        Some((p, "*")) => (p, Wanted::All),
        Some((p, outs)) => {
            let names: BTreeSet<OutputName> = outs
                .split(',')
                .filter(|o| !o.is_empty())
                .map(OutputName::from)
                .collect();
            match names.is_empty() {
                true => (p, Wanted::All),
                false => (p, Wanted::Some(names)),
            }
        }
        None => (arg, Wanted::All),
    }
}

/// One `--json` result, in the order Nix's fields come.
#[derive(serde::Serialize)]
struct JsonResult<'a> {
    #[serde(rename = "drvPath")]
    drv_path: String,
    status: &'static str,
    success: bool,
    outputs: BTreeMap<&'a str, String>,
    #[serde(rename = "startTime")]
    start_time: u64,
    #[serde(rename = "stopTime")]
    stop_time: u64,
    /// Microseconds, as Nix HEAD's `cpuUser` and `cpuSystem`.
    #[serde(rename = "cpuUser", skip_serializing_if = "Option::is_none")]
    cpu_user: Option<u128>,
    #[serde(rename = "cpuSystem", skip_serializing_if = "Option::is_none")]
    cpu_system: Option<u128>,
    /// Bytes.
    #[serde(rename = "peakMemory", skip_serializing_if = "Option::is_none")]
    peak_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<String>,
}

/// Nix's words for a path no substituter has.
fn no_substituter(sd: &firn_derivation::StoreDir, paths: &[StorePath]) -> CliError {
    let shown: Vec<String> = paths.iter().map(|p| sd.display(p)).collect();
    CliError::usage(format!(
        "path '{}' is required, but there is no substituter that can build it",
        shown.join("', '")
    ))
}

pub fn realise(
    settings: &Settings,
    args: &RealiseArgs,
    out: &mut impl Write,
) -> Result<u8, CliError> {
    let build = settings.build.clone();
    let mut store = open(settings)?;
    let sd = store.store_dir().clone();
    let mut tops: Vec<(StorePath, Wanted)> = Vec::new();
    // Invalid non-derivation paths, to be fetched from the substituters.
    let mut to_fetch: Vec<StorePath> = Vec::new();
    for arg in &args.drvs {
        let (path, wanted) = parse_target(arg);
        let p = store.parse_path_arg(path)?;
        if !p.is_derivation() {
            // A non-derivation path is realised if it is valid.
            if !store
                .db()
                .is_valid_path(&p)
                .map_err(firn_store::StoreError::from)?
            {
                if !build.substituters.0.is_empty() {
                    to_fetch.push(p.clone());
                    tops.push((p, wanted));
                    continue;
                }
                return Err(CliError::usage(format!(
                    "path '{}' is not valid and cannot be built",
                    sd.display(&p)
                )));
            }
        }
        tops.push((p, wanted));
    }
    let drv_tops: Vec<(StorePath, Wanted)> = tops
        .iter()
        .filter(|(p, _)| p.is_derivation())
        .cloned()
        .collect();
    let mut missing = firn_build::missing::query_missing(&store, &build, &drv_tops)
        .map_err(|e| CliError::usage(e.to_string()))?;
    firn_build::missing::add_paths(&store, &build, &to_fetch, &mut missing)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let to_build = firn_build::missing::build_order(&store, &missing.will_build)
        .map_err(|e| CliError::usage(e.to_string()))?;
    // As Nix, which reads every derivation before it says what it will build.
    for p in &to_build {
        let real = store.real_path(p);
        if let Ok(text) = std::fs::read(&real) {
            let name = firn_derivation::name_from_drv_base_name(p.base_name());
            if let Ok(drv) = firn_derivation::parse_derivation(&sd, &text, name) {
                crate::derivation::check_output_features(&drv, &build)?;
            }
        }
    }
    let mut events = TerminalEvents::with_format(
        sd.clone(),
        !settings.quiet,
        build.keep_going,
        settings.log_format,
    )
    .unsandboxed_by(settings.sandbox_off_from.clone())
    .verbosity(settings.verbosity)
    .prefix_logs(args.print_build_logs);
    if args.dry_run && args.json {
        // What QueryMissing would answer, by its names.
        let json = serde_json::json!({
            "willBuild": to_build.iter().map(|p| sd.display(p)).collect::<Vec<_>>(),
            "willSubstitute": missing.will_substitute.iter().map(|p| sd.display(p)).collect::<Vec<_>>(),
            "unknown": [],
            "downloadSize": missing.download_size,
            "narSize": missing.nar_size,
        });
        writeln!(out, "{json}").map_err(CliError::stdout)?;
        return Ok(0);
    }
    if !to_build.is_empty() {
        if to_build.len() == 1 {
            events.line(3, "this derivation will be built:");
        } else {
            events.line(
                3,
                &format!("these {} derivations will be built:", to_build.len()),
            );
        }
        for p in &to_build {
            events.line(3, &format!("  {}", sd.display(p)));
        }
    }
    if !missing.will_substitute.is_empty() {
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        let (d, u) = (mib(missing.download_size), mib(missing.nar_size));
        let n = missing.will_substitute.len();
        events.line(
            3,
            &match n {
                1 => {
                    format!("this path will be fetched ({d:.2} MiB download, {u:.2} MiB unpacked):")
                }
                _ => format!(
                    "these {n} paths will be fetched ({d:.2} MiB download, {u:.2} MiB unpacked):"
                ),
            },
        );
        for p in &missing.will_substitute {
            events.line(3, &format!("  {}", sd.display(p)));
        }
    }
    if args.dry_run {
        return Ok(0);
    }
    crate::interrupt::install_handlers();
    let builder = crate::local_builder::local_builder(settings, &build, &store);
    let recursive = crate::local_builder::recursive_nix(settings, &store);
    events.begin();
    if !to_fetch.is_empty() {
        use firn_build::substitute::{substitute, Substituted};
        match substitute(
            &mut store,
            &build,
            &mut events,
            &to_fetch,
            &Default::default(),
        ) {
            Substituted::All => {}
            Substituted::No => return Err(no_substituter(&sd, &to_fetch)),
            Substituted::Failed(e) => return Err(CliError::usage(e.to_string())),
        }
    }
    let mode = match args.check {
        true => BuildMode::Check,
        false => BuildMode::Normal,
    };
    let mut worker = Worker::new(
        &mut store,
        build,
        builder,
        &mut events,
        crate::interrupt::interrupted,
    )
    .with_recursive_nix(recursive);
    let results = worker.run(&drv_tops, mode);
    if crate::interrupt::interrupted() {
        let stopped: Vec<String> = results
            .iter()
            .filter(|(_, r)| !r.status.success())
            .map(|(p, _)| sd.display(p))
            .collect();
        let by = crate::interrupt::signal_name().unwrap_or("a signal");
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
    // What each argument realised, in argument order (Nix's `opRealise`): a
    // derivation's wanted outputs by name, or the path itself.
    let mut realised: Vec<Realised> = Vec::new();
    for (p, w) in &tops {
        if !p.is_derivation() {
            realised.push(Realised::Path(p.clone()));
            continue;
        }
        let mut outputs = BTreeMap::new();
        if let Some((_, r)) = results.iter().find(|(k, _)| k == p) {
            if r.status.success() {
                for (name, out) in &r.outputs {
                    if w.contains(name.as_str()) {
                        outputs.insert(name.as_str().to_owned(), out.clone());
                    }
                }
            }
        }
        realised.push(Realised::Outputs(outputs));
    }
    // Like Nix's worker flags: every goal's failure counts, not only the top ones'.
    let all: Vec<&BuildResult> = worker.results().map(|(_, r)| r).collect();
    let code = exit_status(&all);
    drop(worker);
    if args.json {
        let json: Vec<JsonResult<'_>> = results
            .iter()
            .map(|(p, r)| JsonResult {
                drv_path: sd.display(p),
                status: r.status.as_str(),
                success: r.status.success(),
                outputs: r
                    .outputs
                    .iter()
                    .map(|(n, o)| (n.as_str(), sd.display(o)))
                    .collect(),
                start_time: r.start_time,
                stop_time: r.stop_time,
                cpu_user: r.usage.and_then(|u| u.cpu_user).map(|d| d.as_micros()),
                cpu_system: r.usage.and_then(|u| u.cpu_system).map(|d| d.as_micros()),
                peak_memory: r.usage.and_then(|u| u.peak_memory),
                error: r.error.as_ref().map(|e| e.to_string()),
                log: r
                    .log
                    .as_ref()
                    .filter(|l| l.exists())
                    .map(|l| l.display().to_string()),
            })
            .collect();
        let mut text = serde_json::to_string(&json)
            .map_err(|e| CliError::usage(format!("writing JSON: {e}")))?;
        text.push('\n');
        out.write_all(text.as_bytes()).map_err(CliError::stdout)?;
    }
    if code == 0 {
        // Rooted with --json too; only the lines are left out then.
        let lines = realised_lines(&store, &realised, args.add_root.as_deref())?;
        // Once per run, as Nix's `printGCWarning`.
        if args.add_root.is_none() && settings.gc_warning && !lines.is_empty() {
            events.line(
                1,
                "warning: you did not specify '--add-root'; the result might be removed by the garbage collector",
            );
        }
        if !args.json {
            for line in lines {
                out.write_all(format!("{line}\n").as_bytes())
                    .map_err(CliError::stdout)?;
            }
        }
    }
    Ok(code)
}

/// What one argument of `realise` stands for once built.
enum Realised {
    /// A path that is not a derivation: itself.
    Path(StorePath),
    /// A derivation: its wanted outputs, by name.
    Outputs(BTreeMap<String, StorePath>),
}

/// The lines `nix-store -r` prints (`opRealise`/`realisePath`), making the roots they
/// name: per argument, in order
/// (a repeated argument is printed again), its paths sorted by their text. With
/// `--add-root LINK` each path is rooted and the root printed instead: the N-th
/// argument's root is LINK, then LINK-N from the second on, with `-NAME` for an output
/// other than `out`.
fn realised_lines(
    store: &firn_store::Store,
    realised: &[Realised],
    add_root_link: Option<&std::path::Path>,
) -> Result<Vec<String>, CliError> {
    let sd = store.store_dir();
    let mut lines = Vec::new();
    for (i, r) in realised.iter().enumerate() {
        let root_nr = i + 1;
        let root_name = |output: Option<&str>| {
            let mut name = add_root_link.map(|l| l.display().to_string())?;
            if root_nr > 1 {
                name.push_str(&format!("-{root_nr}"));
            }
            if let Some(o) = output.filter(|o| *o != "out") {
                name.push_str(&format!("-{o}"));
            }
            Some(PathBuf::from(name))
        };
        let mut shown = BTreeSet::new();
        let wanted: Vec<(Option<&str>, &StorePath)> = match r {
            Realised::Path(p) => vec![(None, p)],
            Realised::Outputs(outs) => outs.iter().map(|(n, p)| (Some(n.as_str()), p)).collect(),
        };
        for (output, p) in wanted {
            match root_name(output) {
                Some(link) => {
                    let root = store.add_perm_root(&link, p)?;
                    shown.insert(root.display().to_string());
                }
                None => {
                    shown.insert(sd.display(p));
                }
            }
        }
        lines.extend(shown);
    }
    Ok(lines)
}
