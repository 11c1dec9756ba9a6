//! `firn`: the command line. Parsing, output and exit codes only; the work is done by
//! the library crates.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod builtin_cmd;
mod cache_cmds;
mod derivation;
mod error;
mod gc;
mod interrupt;
mod local_builder;
mod progress;
mod realise;
mod run;
mod settings;
mod store_cmds;

use error::CliError;
use settings::Settings;

/// A Rust re-implementation of the core of the Nix store, byte-compatible with Nix 2.8.
#[derive(Debug, Parser)]
#[command(
    name = "firn",
    version,
    max_term_width = 100,
    after_help = TOP_AFTER_HELP,
    disable_help_subcommand = true
)]
pub(crate) struct Cli {
    #[command(flatten)]
    global: GlobalArgs,

    #[command(subcommand)]
    command: Command,
}

const TOP_AFTER_HELP: &str = "\
Store: --store ROOT (or FIRN_STORE) opens Nix's chroot store at ROOT. Without it: the store \
NIX_STORE_DIR, NIX_STATE_DIR and NIX_LOG_DIR name, as for Nix; with none of them set, /nix for \
root (as Nix) and ~/.local/share/firn/root for other users (built with user namespaces).

Sandbox: builds run in Nix's sandbox by default (sandbox = true, starting from an empty root); \
--option sandbox false turns it off, --option sandbox-paths /bin/sh=/bin/busybox adds paths.

Settings come from nix.conf and firn.conf files, NIX_CONFIG and --option (see `firn show-config`). \
nix-store's spellings work too: `firn -qR PATH`, `firn -r DRV!out`, `firn --gc`, `firn --add FILE`.";

/// Options that work with every command, anywhere on the line (as Nix's).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Global options")]
struct GlobalArgs {
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

    /// Less output: no warnings about settings, no builder output, no GC progress.
    #[arg(long, global = true)]
    quiet: bool,

    /// Do not warn that what `realise` prints without `--add-root` may be collected.
    #[arg(long, global = true)]
    no_gc_warning: bool,

    /// How progress is shown: bar (a status line on a terminal), raw (lines), or
    /// internal-json (Nix's `@nix` JSON lines, for nix-output-monitor).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "bar",
        value_name = "FORMAT"
    )]
    log_format: progress::LogFormat,

    /// Builds to run at once (setting `max-jobs`; `auto`: one per core).
    #[arg(
        short = 'j',
        long,
        global = true,
        value_name = "N",
        help_heading = "Build settings"
    )]
    max_jobs: Option<String>,

    /// Cores each build may use, passed as NIX_BUILD_CORES (setting `cores`; 0: all).
    #[arg(long, global = true, value_name = "N", help_heading = "Build settings")]
    cores: Option<String>,

    /// Kill a build that runs longer than N seconds (setting `timeout`; 0: no limit).
    #[arg(long, global = true, value_name = "N", help_heading = "Build settings")]
    timeout: Option<String>,

    /// Kill a build that prints nothing for N seconds (setting `max-silent-time`).
    #[arg(long, global = true, value_name = "N", help_heading = "Build settings")]
    max_silent_time: Option<String>,

    /// Keep building what does not depend on a failed build (setting `keep-going`).
    #[arg(short = 'k', long, global = true, help_heading = "Build settings")]
    keep_going: bool,

    /// Keep the build directory of failed builds (setting `keep-failed`; with --check, a
    /// differing output as `<out>.check`).
    #[arg(short = 'K', long, global = true, help_heading = "Build settings")]
    keep_failed: bool,
}

impl GlobalArgs {
    /// `--option` pairs, then the build settings given by their own flags, as more pairs
    /// (so that they are checked and reported as `--option` is).
    fn option_pairs(&self) -> Vec<String> {
        let mut pairs = self.options.clone();
        for (name, value) in [
            ("max-jobs", &self.max_jobs),
            ("cores", &self.cores),
            ("timeout", &self.timeout),
            ("max-silent-time", &self.max_silent_time),
        ] {
            if let Some(v) = value {
                pairs.extend([name.to_owned(), v.clone()]);
            }
        }
        for (name, on) in [
            ("keep-going", self.keep_going),
            ("keep-failed", self.keep_failed),
        ] {
            if on {
                pairs.extend([name.to_owned(), "true".to_owned()]);
            }
        }
        pairs
    }
}

/// The shells `firn completions` writes scripts for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read and write .drv files.
    #[command(subcommand)]
    Derivation(derivation::DerivationCommand),
    /// Build derivations and print their output paths (`nix-store -r`).
    #[command(short_flag = 'r', long_flag = "realise", long_flag_alias = "realize")]
    Realise(realise::RealiseArgs),
    /// Print the build log of a derivation or of one of its outputs (`nix-store -l`).
    #[command(short_flag = 'l', long_flag = "read-log")]
    Log {
        /// `.drv` store paths or output paths (or symlinks to them): their logs in
        /// order, as nix-store -l (none: nothing).
        #[arg(value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Add files or trees to the store, recursive sha256 (`nix-store --add`).
    #[command(long_flag = "add")]
    Add {
        /// Files or directories to add (`""` is the current directory, as for Nix; none:
        /// nothing).
        #[arg(value_parser = any_path())]
        paths: Vec<std::path::PathBuf>,
    },
    /// Add files or trees with a given hash algorithm (`nix-store --add-fixed`).
    #[command(long_flag = "add-fixed")]
    AddFixed {
        /// Hash the NAR serialisation instead of the file's contents.
        #[arg(long)]
        recursive: bool,
        /// md5, sha1, sha256 or sha512.
        algo: String,
        /// Files (or, with --recursive, directories) to add (none: nothing).
        #[arg(value_parser = any_path())]
        paths: Vec<std::path::PathBuf>,
    },
    /// Write the NAR serialisation of a path to stdout (`nix-store --dump`).
    #[command(long_flag = "dump")]
    Dump {
        /// Any file, directory or symlink; a store path is read from the store.
        #[arg(value_parser = any_path())]
        path: std::path::PathBuf,
    },
    /// Hash a file or tree as `nix-hash` does: the NAR serialisation (or, with --flat,
    /// the file's contents), md5 in base16 unless told otherwise.
    Hash {
        /// md5 (the default, as nix-hash), sha1, sha256 or sha512.
        #[arg(long = "type", default_value = "md5", value_name = "ALGO")]
        algo: String,
        /// Print the hash in Nix's base-32 instead of hexadecimal.
        #[arg(long)]
        base32: bool,
        /// Hash the contents of a regular file, not its NAR serialisation (as md5sum).
        #[arg(long)]
        flat: bool,
        /// Fold hashes longer than 160 bits (sha256, sha512) to 160 bits, as Nix does.
        #[arg(long)]
        truncate: bool,
        /// Files or directories to hash (none: nothing to do, as for nix-hash).
        #[arg(value_parser = any_path())]
        paths: Vec<std::path::PathBuf>,
    },
    /// Read a NAR from stdin and unpack it at PATH, which must not exist (`nix-store --restore`).
    #[command(long_flag = "restore")]
    Restore {
        /// Where to unpack; must not exist.
        #[arg(value_parser = any_path())]
        path: std::path::PathBuf,
    },
    /// Query the store (`nix-store -q`; `firn -qR PATH` works too). Without a query
    /// flag: the outputs of derivations.
    #[command(short_flag = 'q', long_flag = "query")]
    Query(store_cmds::QueryArgs),
    /// Show metadata of store paths (`nix path-info`).
    // `-h` is --human-readable there, as in `nix path-info`.
    #[command(disable_help_flag = true)]
    PathInfo(store_cmds::PathInfoArgs),
    /// Check the database against the disk (`nix-store --verify`).
    #[command(long_flag = "verify")]
    Verify {
        /// Also re-hash every path's contents.
        #[arg(long)]
        check_contents: bool,
        /// Fix what can be fixed: missing hashes are filled in; modified contents cannot
        /// be repaired yet (there are no substituters).
        #[arg(long)]
        repair: bool,
    },
    /// Hash paths' contents again and compare with their registered NAR hashes (`nix-store
    /// --verify-path`); exits 1 if one was modified.
    #[command(long_flag = "verify-path")]
    VerifyPath {
        /// Store paths, or symlinks to them.
        paths: Vec<String>,
    },
    /// Rebuild store paths from their valid derivations and put them in place, modified
    /// or not (`nix-store --repair-path`; Nix tries its substituters first).
    #[command(long_flag = "repair-path")]
    RepairPath {
        /// Valid store paths, or symlinks to them.
        paths: Vec<String>,
    },
    /// Write the export of store paths (NARs and metadata, references first) to stdout
    /// (`nix-store --export`).
    #[command(long_flag = "export")]
    Export {
        /// Store paths, or symlinks to them (not their closures).
        paths: Vec<String>,
    },
    /// Add the store paths of an export read from stdin and print them (`nix-store
    /// --import`); signatures are not required, as for Nix.
    #[command(long_flag = "import")]
    Import,
    /// Delete the paths that no root keeps alive (`nix-store --gc`).
    #[command(long_flag = "gc")]
    Gc(gc::GcArgs),
    /// Print the settings in force, from the settings files, `NIX_CONFIG` and
    /// `--option` (`nix show-config`).
    ShowConfig,
    /// Delete store paths that nothing keeps alive (`nix-store --delete`).
    #[command(long_flag = "delete")]
    Delete {
        /// Store paths (or symlinks to them) to delete (none: only the unused files of
        /// `.links`, as nix-store --delete).
        paths: Vec<String>,
    },
    /// Hard-link identical files of the store through `.links` (`nix-store --optimise`).
    #[command(long_flag = "optimise")]
    Optimise,
    /// Print a completion script for SHELL on stdout (e.g. `firn completions bash >
    /// /usr/share/bash-completion/completions/firn`).
    Completions {
        /// bash, zsh or fish.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Write man pages into DIR: firn.1 and one page per command (firn-query.1, …).
    Man {
        /// Directory to write into (created if missing).
        dir: std::path::PathBuf,
    },
    /// Run a command that sees the store at /nix (an ordinary user's own store, in a
    /// user and mount namespace); exits with the command's status.
    Run(run::RunArgs),
    /// Run $SHELL (default /bin/sh) as `firn run` runs a command.
    Shell,
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
    /// Serve Nix's legacy serve protocol on stdin/stdout, as `nix-store --serve`: what a
    /// Nix client runs over ssh for `ssh://` stores and remote builds
    /// (`remote-program=firn` makes it run `firn --serve --write [--store ROOT]`).
    #[command(long_flag = "serve")]
    Serve {
        /// Serve on stdin/stdout (the only transport; accepted for `firn serve --stdio`).
        #[arg(long)]
        stdio: bool,
        /// Allow the commands that change the store: importing paths and building
        /// (refused without it, as by `nix-store --serve`).
        #[arg(long)]
        write: bool,
    },
    /// Copy closures to or from a binary cache (`nix copy --to/--from file:///DIR`);
    /// prints each path copied.
    Copy(cache_cmds::CopyArgs),
    /// Make and convert signing keys for binary caches.
    #[command(subcommand)]
    Key(cache_cmds::KeyCommand),
    /// Sign store paths with a secret key (`nix store sign -k FILE`).
    Sign(cache_cmds::SignArgs),
    /// Serve the store, read-only, as an HTTP binary cache (as nix-serve); prints the
    /// URL, then serves until interrupted. Narinfos are signed with `secret-key-files`.
    ServeCache(cache_cmds::ServeArgs),
}

fn run(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    // `realise -Q` is `--quiet` for the builders' output, as nix-store's `-Q`.
    let quiet = g.quiet || matches!(&cli.command, Command::Realise(a) if a.no_build_output);
    let mut settings = Settings::from_cli(g.store.clone(), &g.option_pairs(), quiet)?;
    settings.log_format = g.log_format;
    settings.verbosity = g.verbose;
    settings.gc_warning = !g.no_gc_warning && !quiet;
    for w in &settings.warnings {
        if !quiet {
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
        Command::Log { paths } => store_cmds::log(&settings, &paths, &mut out)?,
        Command::Add { paths } => store_cmds::add(&settings, &paths, &mut out)?,
        Command::AddFixed {
            recursive,
            algo,
            paths,
        } => store_cmds::add_fixed(&settings, recursive, &algo, &paths, &mut out)?,
        Command::Dump { path } => {
            let stdout = io::stdout();
            let fd = std::os::fd::AsFd::as_fd(&stdout);
            store_cmds::dump(&settings, &path, &mut out, Some(fd))?
        }
        Command::Restore { path } => store_cmds::restore(&path)?,
        Command::Hash {
            algo,
            base32,
            flat,
            truncate,
            paths,
        } => {
            let how = store_cmds::HashHow {
                base32,
                flat,
                truncate,
            };
            store_cmds::hash(&algo, how, &paths, &mut out)?
        }
        Command::Query(args) => {
            if args.force_realise {
                force_realise(&settings, &args.paths)?;
            }
            store_cmds::query(&settings, &args, &mut out)?
        }
        Command::PathInfo(args) => store_cmds::path_info(&settings, &args, &mut out)?,
        Command::Verify {
            check_contents,
            repair,
        } => {
            if !store_cmds::verify(&settings, check_contents, repair)? {
                return Err(CliError::Silent);
            }
        }
        Command::VerifyPath { paths } => {
            if !store_cmds::verify_path(&settings, &paths)? {
                return Err(CliError::Silent);
            }
        }
        Command::RepairPath { paths } => store_cmds::repair_path(&settings, &paths)?,
        Command::Export { paths } => store_cmds::export(&settings, &paths)?,
        Command::Import => store_cmds::import(&settings, &mut out)?,
        Command::Gc(args) => gc::gc(&settings, &args, &mut out)?,
        Command::ShowConfig => {
            let mut shown = settings.build.show();
            shown.sort();
            for (name, value) in shown {
                writeln!(out, "{name} = {value}").map_err(CliError::stdout)?;
            }
        }
        Command::Delete { paths } => gc::delete(&settings, &paths, &mut out)?,
        Command::Optimise => {
            let store = store_cmds::open(&settings)?;
            let stats = store.optimise_store()?;
            eprintln!("{stats}");
        }
        Command::Run(args) => run::run(&settings, &args.command)?,
        Command::Shell => run::shell(&settings)?,
        Command::Daemon { stdio, version } => {
            drop(out);
            return daemon(settings, stdio, version);
        }
        Command::Serve { stdio: _, write } => {
            drop(out);
            return serve(settings, write);
        }
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "firn", &mut buf);
            out.write_all(&buf).map_err(CliError::stdout)?;
        }
        Command::Man { dir } => write_man_pages(&dir)?,
        Command::Copy(args) => cache_cmds::copy(&settings, &args, &mut out)?,
        Command::Key(cmd) => cache_cmds::key(cmd, &mut out)?,
        Command::Sign(args) => cache_cmds::sign(&settings, &args)?,
        Command::ServeCache(args) => cache_cmds::serve(&settings, &args, &mut out)?,
    }
    out.flush().map_err(CliError::stdout)?;
    Ok(())
}

/// `nix-store -q --force-realise`: build (or check) the arguments first, printing
/// nothing on stdout.
fn force_realise(settings: &Settings, paths: &[String]) -> Result<(), CliError> {
    let args = realise::RealiseArgs::of(paths.to_vec());
    match realise::realise(settings, &args, &mut io::sink())? {
        0 => Ok(()),
        code => Err(CliError::Exit(code)),
    }
}

/// `firn.1` and one page per command (`firn-query.1`, `firn-derivation-show.1`, …), from
/// the same definitions as `--help`.
fn write_man_pages(dir: &std::path::Path) -> Result<(), CliError> {
    let fail =
        |e: io::Error| CliError::usage(format!("writing man pages to '{}': {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut cmd = Cli::command();
    cmd.build();
    clap_mangen::generate_to(cmd, dir).map_err(fail)
}

/// A clap error as the house prints usage errors: one `error:` line (clap's message, its
/// lines joined, with its tip if it has one), then where to read more; exit 1. Help and
/// version requests go to stdout as clap renders them, exit 0.
fn usage_error(e: &clap::Error) -> String {
    use clap::error::ErrorKind;
    let text = e.render().to_string();
    let paragraphs: Vec<&str> = text.split("\n\n").collect();
    let flat = |p: &str| p.split_whitespace().collect::<Vec<_>>().join(" ");
    let message = match e.kind() {
        // clap shows the whole help here; Nix says "no operation specified".
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => "no command given".to_owned(),
        _ => {
            let m = flat(paragraphs.first().copied().unwrap_or_default());
            m.strip_prefix("error: ").unwrap_or(&m).to_owned()
        }
    };
    // "a similar argument exists: …" helps; "to pass '-z' as a value, use '-- -z'" rarely.
    let tip = paragraphs
        .iter()
        .map(|p| flat(p))
        .find(|p| p.starts_with("tip: ") && !p.starts_with("tip: to pass"));
    // The command the error is about, from clap's usage line: `Usage: firn query [OPTIONS] …`.
    let command = paragraphs
        .iter()
        .find_map(|p| p.trim_start().strip_prefix("Usage: "))
        .map(|u| {
            u.split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                // A command that is also a flag: `{query|--query|-q}`.
                .map(|w| w.trim_start_matches('{').split('|').next().unwrap_or(w))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| command_path(std::env::args()));
    let mut line = format!("error: {message}");
    if let Some(tip) = tip {
        line.push_str(&format!(" ({tip})"));
    }
    format!("{line}\nTry '{command} --help' for more information.\n")
}

/// The command that `args` name (`firn derivation show`), for errors without a usage
/// line; commands are found by name and by their nix-store flags (`-qR` is `query`).
fn command_path(args: impl Iterator<Item = String>) -> String {
    let mut cmd = Cli::command();
    let mut path = vec!["firn".to_owned()];
    for a in args.skip(1) {
        let short = a.strip_prefix('-').filter(|s| !s.starts_with('-'));
        let found = cmd
            .get_subcommands()
            .find(|s| {
                s.get_name() == a
                    || s.get_long_flag()
                        .is_some_and(|l| a.strip_prefix("--") == Some(l))
                    || s.get_short_flag()
                        .is_some_and(|c| short.is_some_and(|f| f.starts_with(c)))
            })
            .cloned();
        if let Some(sub) = found {
            path.push(sub.get_name().to_owned());
            cmd = sub;
        }
    }
    path.join(" ")
}

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

/// `firn serve` / `firn --serve`: one session on stdin/stdout; an error ends it as
/// `nix-store --serve` ends (`error: …`, exit 1).
fn serve(settings: Settings, write: bool) -> Result<(), CliError> {
    interrupt::install_handlers();
    let config = firn_daemon::DaemonConfig {
        layout: settings.layout.clone(),
        settings: settings.build.clone(),
        userpool: settings.userpool.clone(),
    };
    firn_daemon::serve::serve_stdio(&config, write, &interrupt::interrupted)
        .map_err(|e| CliError::Usage(e.to_string()))
}

/// A path argument as typed, the empty one included: clap's `PathBuf` parser refuses
/// `""`, which Nix takes (as the current directory for `--add`, else as a file that is
/// not there).
fn any_path() -> impl clap::builder::TypedValueParser<Value = std::path::PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().map(std::path::PathBuf::from)
}

fn main() -> ExitCode {
    // A builtin builder (`firn __builtin NAME`), before anything else is read.
    if let Some(name) = builtin_cmd::invocation() {
        return builtin_cmd::run(&name);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version: on stdout as clap renders them.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("{}", usage_error(&e));
            return ExitCode::from(1);
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command (and the commands themselves) says what it does.
    #[test]
    fn every_flag_and_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "firn", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
