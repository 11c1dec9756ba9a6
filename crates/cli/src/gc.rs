//! `firn gc` (`nix-store --gc`) and `firn delete` (`nix-store --delete`): parsing and
//! output only; the collection itself is `firn_store::Store::collect_garbage`.

use std::collections::BTreeSet;
use std::io::Write;

use clap::Args;
use firn_store::{GcAction, GcOptions, GcResults, StoreMessage};

use crate::error::CliError;
use crate::settings::Settings;
use crate::store_cmds::open;

#[derive(Debug, Args)]
pub struct GcArgs {
    // As `nix-store --gc` reads its flags: any may be repeated, `--print-roots` wins
    // over the others, of `--print-live`/`--print-dead` and of `--max-freed` the last
    // one counts.
    /// Print the roots (`LINK -> PATH`, sorted by link), delete nothing.
    #[arg(long, overrides_with = "print_roots")]
    print_roots: bool,
    /// Print the live paths, delete nothing.
    #[arg(long, overrides_with_all = ["print_live", "print_dead"])]
    print_live: bool,
    /// Print the dead paths, delete nothing.
    #[arg(long, overrides_with_all = ["print_live", "print_dead"])]
    print_dead: bool,
    /// Stop after freeing more than N bytes (suffixes K, M, G, T: powers of 1024).
    #[arg(
        long,
        value_name = "N",
        allow_hyphen_values = true,
        overrides_with = "max_freed"
    )]
    max_freed: Option<String>,
}

/// Nix's `getIntArg` with units: an integer with an optional K/M/G/T suffix; negative
/// values count as 0.
fn parse_max_freed(s: &str) -> Result<u64, CliError> {
    let (digits, multiplier) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                u => return Err(CliError::usage(format!("invalid unit specifier '{u}'"))),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| CliError::usage(format!("'{digits}' is not an integer")))?;
    Ok(u64::try_from(n.max(0))
        .unwrap_or(0)
        .saturating_mul(multiplier))
}

fn options(settings: &Settings, action: GcAction) -> Result<GcOptions, CliError> {
    Ok(GcOptions {
        action,
        keep_outputs: settings.build.keep_outputs,
        keep_derivations: settings.build.keep_derivations,
        ..GcOptions::default()
    })
}

/// `N store paths deleted, X.YZ MiB freed`, as Nix prints it on stdout.
fn freed_line(r: &GcResults) -> String {
    format!(
        "{} store paths deleted, {:.2} MiB freed\n",
        r.paths.len(),
        r.bytes_freed as f64 / (1024.0 * 1024.0)
    )
}

/// The progress of a collection on stderr, unless `--quiet`.
fn logger(settings: &Settings) -> impl FnMut(&StoreMessage) {
    let quiet = settings.quiet;
    move |m: &StoreMessage| {
        if !quiet {
            eprintln!("{m}");
        }
    }
}

pub fn gc(settings: &Settings, args: &GcArgs, out: &mut impl Write) -> Result<(), CliError> {
    let mut store = open(settings)?;
    let sd = store.store_dir().clone();
    let mut text = String::new();
    if args.print_roots {
        let mut lines = BTreeSet::new();
        for (target, links) in store.find_roots()? {
            for link in links {
                lines.insert((link.display().to_string(), sd.display(&target)));
            }
        }
        for (link, target) in lines {
            text.push_str(&format!("{link} -> {target}\n"));
        }
        return out.write_all(text.as_bytes()).map_err(CliError::stdout);
    }
    let action = if args.print_live {
        GcAction::ReturnLive
    } else if args.print_dead {
        GcAction::ReturnDead
    } else {
        GcAction::DeleteDead
    };
    let mut opts = options(settings, action)?;
    if let Some(m) = &args.max_freed {
        opts.max_freed = parse_max_freed(m)?;
    }
    let mut log = logger(settings);
    let results = store.collect_garbage(&opts, &mut log)?;
    if action == GcAction::DeleteDead {
        text = freed_line(&results);
    } else {
        for p in &results.paths {
            text.push_str(p);
            text.push('\n');
        }
    }
    out.write_all(text.as_bytes()).map_err(CliError::stdout)
}

/// `firn delete PATH…`: refuses, naming the reason, if any path is still alive.
pub fn delete(settings: &Settings, args: &[String], out: &mut impl Write) -> Result<(), CliError> {
    let mut store = open(settings)?;
    let mut paths = BTreeSet::new();
    for a in args {
        paths.insert(store.parse_path_arg(a)?);
    }
    let opts = options(settings, GcAction::DeleteDead)?;
    let mut log = logger(settings);
    let results = store.delete_specific(&paths, &opts, &mut log)?;
    out.write_all(freed_line(&results).as_bytes())
        .map_err(CliError::stdout)
}
