//! `firn`: the command line. Parsing, output and exit codes only; the work is done by
//! the library crates.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod derivation;
mod error;
mod gc;
mod interrupt;
mod progress;
mod realise;
mod settings;
mod store_cmds;

use error::CliError;
use settings::Settings;

/// firn: a Rust re-implementation of the core of the Nix store, byte-compatible with Nix 2.8.
#[derive(Debug, Parser)]
#[command(name = "firn", version, about, max_term_width = 100)]
struct Cli {
    /// Root of the store, in Nix's chroot-store layout (ROOT/nix/store, ROOT/nix/var/nix/db).
    /// Without it: the store NIX_STORE_DIR, NIX_STATE_DIR, NIX_LOG_DIR name, as for Nix.
    #[arg(long, global = true, value_name = "ROOT", env = "FIRN_STORE")]
    store: Option<std::path::PathBuf>,

    /// Set a Nix setting (sandbox, max-jobs, cores, timeout, …); repeatable.
    #[arg(long = "option", global = true, num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    options: Vec<String>,

    /// More output.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Less output.
    #[arg(long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read and write .drv files.
    #[command(subcommand)]
    Derivation(derivation::DerivationCommand),
    /// Build derivations and print their output paths (`nix-store -r`).
    Realise(realise::RealiseArgs),
    /// Print the build log of a derivation or of one of its outputs (`nix-store -l`).
    Log { path: String },
    /// Add files or trees to the store, recursive sha256 (`nix-store --add`).
    Add {
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Add files or trees with a given hash algorithm (`nix-store --add-fixed`).
    AddFixed {
        /// Hash the NAR serialisation instead of the file's contents.
        #[arg(long)]
        recursive: bool,
        /// md5, sha1, sha256 or sha512.
        algo: String,
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Write the NAR serialisation of a path to stdout (`nix-store --dump`).
    Dump { path: std::path::PathBuf },
    /// Hash a file or tree as `nix-hash` does: the NAR serialisation (or, with --flat,
    /// the file's contents), printed in base16 (or nixbase32 with --base32).
    Hash {
        /// md5, sha1, sha256 or sha512.
        #[arg(long = "type", default_value = "sha256")]
        algo: String,
        #[arg(long)]
        base32: bool,
        #[arg(long)]
        flat: bool,
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Read a NAR from stdin and unpack it at PATH, which must not exist (`nix-store --restore`).
    Restore { path: std::path::PathBuf },
    /// Query the store (`nix-store -q`).
    Query {
        #[command(flatten)]
        kind: store_cmds::QueryKind,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Show metadata of store paths (`nix path-info`).
    PathInfo {
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Check the database against the disk (`nix-store --verify`).
    Verify {
        /// Also re-hash every path's contents.
        #[arg(long)]
        check_contents: bool,
        #[arg(long)]
        repair: bool,
    },
    /// Delete the paths that no root keeps alive (`nix-store --gc`).
    Gc(gc::GcArgs),
    /// Print the settings in force, from the settings files, `NIX_CONFIG` and
    /// `--option` (`nix show-config`).
    ShowConfig,
    /// Delete store paths that nothing keeps alive (`nix-store --delete`).
    Delete {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Serve Nix clients over Nix's worker protocol (`nix-daemon`): on the socket
    /// NIX_DAEMON_SOCKET_PATH (default STATE/daemon-socket/socket), or with --stdio one
    /// trusted connection on stdin/stdout.
    Daemon {
        /// Serve one connection on stdin/stdout (the peer is trusted).
        #[arg(long)]
        stdio: bool,
        /// Print the Nix version this daemon speaks for (`nix-daemon (Nix) 2.8.0`).
        #[arg(long)]
        version: bool,
    },
}

fn run(cli: Cli) -> Result<(), CliError> {
    let settings = Settings::from_cli(cli.store, &cli.options, cli.quiet)?;
    for w in &settings.warnings {
        if !cli.quiet {
            eprintln!("warning: {w}");
        }
    }
    let mut out = io::stdout().lock();
    match cli.command {
        Command::Derivation(cmd) => derivation::run(cmd, &settings, &mut out)?,
        Command::Realise(args) => {
            let code = realise::realise(&settings, &args, &mut out)?;
            out.flush().map_err(CliError::stdout)?;
            if code != 0 {
                return Err(CliError::Exit(code));
            }
        }
        Command::Log { path } => store_cmds::log(&settings, &path, &mut out)?,
        Command::Add { paths } => store_cmds::add(&settings, &paths, &mut out)?,
        Command::AddFixed {
            recursive,
            algo,
            paths,
        } => store_cmds::add_fixed(&settings, recursive, &algo, &paths, &mut out)?,
        Command::Dump { path } => store_cmds::dump(&settings, &path, &mut out)?,
        Command::Restore { path } => store_cmds::restore(&path)?,
        Command::Hash {
            algo,
            base32,
            flat,
            paths,
        } => store_cmds::hash(&algo, base32, flat, &paths, &mut out)?,
        Command::Query { kind, paths } => store_cmds::query(&settings, &kind, &paths, &mut out)?,
        Command::PathInfo { json, paths } => {
            store_cmds::path_info(&settings, json, &paths, &mut out)?
        }
        Command::Verify {
            check_contents,
            repair,
        } => {
            if !store_cmds::verify(&settings, check_contents, repair)? {
                return Err(CliError::Silent);
            }
        }
        Command::Gc(args) => gc::gc(&settings, &args, &mut out)?,
        Command::ShowConfig => {
            let mut shown = settings.build.show();
            shown.sort();
            for (name, value) in shown {
                writeln!(out, "{name} = {value}").map_err(CliError::stdout)?;
            }
        }
        Command::Delete { paths } => gc::delete(&settings, &paths, &mut out)?,
        Command::Daemon { stdio, version } => {
            drop(out);
            return daemon(settings, stdio, version);
        }
    }
    out.flush().map_err(CliError::stdout)?;
    Ok(())
}

/// `firn daemon`: settings and store from the command line, the rest in firn-daemon.
fn daemon(settings: Settings, stdio: bool, version: bool) -> Result<(), CliError> {
    if version {
        println!("{}", firn_daemon::VERSION_LINE);
        return Ok(());
    }
    interrupt::install_handlers();
    let config = firn_daemon::DaemonConfig {
        layout: settings.layout.clone(),
        settings: settings.build.clone(),
        userpool: settings.userpool.clone(),
    };
    let result = if stdio {
        firn_daemon::serve_stdio(&config, &interrupt::interrupted)
    } else {
        let socket = std::env::var_os("NIX_DAEMON_SOCKET_PATH")
            .filter(|s| !s.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| firn_daemon::default_socket_path(&settings.layout));
        let quiet = settings.quiet;
        let log: firn_daemon::Log = std::sync::Arc::new(move |m| {
            if !quiet {
                eprintln!("{m}");
            }
        });
        firn_daemon::serve_socket(
            std::sync::Arc::new(config),
            &socket,
            interrupt::interrupted,
            log,
        )
    };
    result.map_err(|e| CliError::usage(e.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`firn … | head`) is not an error worth a message.
        Err(CliError::BrokenPipe) => ExitCode::SUCCESS,
        // Already reported (e.g. by verify, line by line).
        Err(CliError::Silent) => ExitCode::from(1),
        Err(CliError::Exit(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
