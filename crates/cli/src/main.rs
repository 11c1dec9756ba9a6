//! `firn`: the command line. Parsing, output and exit codes only; the work is done by
//! the library crates.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod derivation;
mod error;
mod settings;

use error::CliError;
use settings::Settings;

/// firn: a Rust re-implementation of the core of the Nix store, byte-compatible with Nix 2.8.
#[derive(Debug, Parser)]
#[command(name = "firn", version, about, max_term_width = 100)]
struct Cli {
    /// Root of the store, in Nix's chroot-store layout (ROOT/nix/store, ROOT/nix/var/nix/db).
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
}

fn run(cli: Cli) -> Result<(), CliError> {
    let settings = Settings::from_cli(cli.store, &cli.options)?;
    for w in &settings.warnings {
        if !cli.quiet {
            eprintln!("warning: {w}");
        }
    }
    let mut out = io::stdout().lock();
    match cli.command {
        Command::Derivation(cmd) => derivation::run(cmd, &settings, &mut out)?,
    }
    out.flush().map_err(CliError::stdout)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`firn … | head`) is not an error worth a message.
        Err(CliError::BrokenPipe) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
