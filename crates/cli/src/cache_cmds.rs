//! Binary-cache commands: `firn key generate|public`, `firn sign`, `firn copy`.
//! The work is firn-cache's; this parses, prints and maps errors.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use firn_cache::keys::info_fingerprint;
use firn_cache::{BinaryCache, CacheError, CacheUrl, SecretKey};
use firn_derivation::StorePath;
use firn_store::StoreError;

use crate::error::CliError;
use crate::settings::Settings;
use crate::store_cmds::open;

impl From<CacheError> for CliError {
    fn from(e: CacheError) -> Self {
        CliError::usage(e.to_string())
    }
}

impl From<firn_cache::keys::KeyError> for CliError {
    fn from(e: firn_cache::keys::KeyError) -> Self {
        CliError::usage(e.to_string())
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print a new secret signing key `NAME:base64` on stdout, without a newline (`nix
    /// key generate-secret --key-name NAME`).
    Generate {
        /// The key's name, e.g. `cache.example.org-1`.
        name: String,
    },
    /// Read a secret key on stdin and print its public key (`nix key
    /// convert-secret-to-public`).
    Public,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, `HOST:PORT` (port 0: any free port).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:5000")]
    listen: String,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The secret key file to sign with.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// Store paths to sign (their signatures are added to the database).
    #[arg(required = true)]
    paths: Vec<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("direction").required(true).args(["to", "from"])))]
pub struct CopyArgs {
    /// Copy the closures into this binary cache (`file:///DIR`, parameters
    /// `?compression=xz|zstd|bzip2|none&secret-key=FILE`).
    #[arg(long, value_name = "URL")]
    to: Option<String>,
    /// Copy the closures from this binary cache into the store.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// With --from: accept paths without a trusted signature.
    #[arg(long)]
    no_check_sigs: bool,
    /// Store paths to copy, with their closures.
    #[arg(required = true)]
    paths: Vec<String>,
}

pub fn key(cmd: KeyCommand, out: &mut impl Write) -> Result<(), CliError> {
    let text = match cmd {
        KeyCommand::Generate { name } => SecretKey::generate(&name)?.to_text(),
        KeyCommand::Public => {
            let mut input = String::new();
            std::io::stdin()
                .take(1 << 16)
                .read_to_string(&mut input)
                .map_err(|e| CliError::read(std::path::Path::new("standard input"), e))?;
            SecretKey::parse("standard input", &input)?
                .public()
                .to_text()
        }
    };
    out.write_all(text.as_bytes()).map_err(CliError::stdout)
}

/// `nix store sign -k FILE PATH…`: prints `added N signatures` on stderr, as Nix.
pub fn sign(settings: &Settings, args: &SignArgs) -> Result<(), CliError> {
    let key = SecretKey::read_file(&args.key_file)?;
    let mut store = open(settings)?;
    let sd = store.store_dir().clone();
    let mut added = 0;
    for a in &args.paths {
        let p = store.valid_path_arg(a)?;
        let info = store
            .db()
            .query_path_info(&p)
            .map_err(StoreError::from)?
            .ok_or_else(|| StoreError::NotValid(sd.display(&p)))?;
        let fp = info_fingerprint(&sd, &info).ok_or_else(|| CacheError::ZeroNarSize {
            path: sd.display(&p),
        })?;
        added += store
            .db_mut()
            .add_signatures(&p, &[key.sign(&fp)])
            .map_err(StoreError::from)?;
    }
    if !settings.quiet {
        eprintln!("added {added} signatures");
    }
    Ok(())
}

fn secret_keys(settings: &Settings) -> Result<Vec<SecretKey>, CliError> {
    settings
        .build
        .secret_key_files
        .0
        .iter()
        .map(|f| Ok(SecretKey::read_file(std::path::Path::new(f))?))
        .collect()
}

pub fn copy(settings: &Settings, args: &CopyArgs, out: &mut impl Write) -> Result<(), CliError> {
    let mut store = open(settings)?;
    let sd = store.store_dir().clone();
    if let Some(to) = &args.to {
        // With ca-derivations the realisations of the outputs copied go too.
        if settings.build.ca_derivations() {
            store.enable_ca_derivations()?;
        }
        let paths: Vec<StorePath> = args
            .paths
            .iter()
            .map(|a| store.valid_path_arg(a))
            .collect::<Result<_, _>>()?;
        let cache = BinaryCache::create(&CacheUrl::parse(to)?, &sd)?;
        let mut progress = crate::progress::Progress::new();
        let copied =
            firn_cache::copy::copy_to(&store, &cache, &paths, &secret_keys(settings)?, &mut |c| {
                progress.status(&copy_status(&sd, &c, to))
            });
        progress.finish();
        let copied = copied?;
        for p in copied {
            writeln!(out, "{}", sd.display(&p)).map_err(CliError::stdout)?;
        }
    } else if let Some(from) = &args.from {
        let paths: Vec<StorePath> = args
            .paths
            .iter()
            .map(|a| store.parse_path_arg(a))
            .collect::<Result<_, _>>()?;
        let cache = BinaryCache::open(
            &CacheUrl::parse(from)?,
            &sd,
            &firn_build::substitute::cache_options(&settings.build),
        )?;
        let keys = firn_cache::keys::trusted_keys(
            &settings.build.trusted_public_keys.0,
            &settings.build.secret_key_files.0,
        )?;
        let mut progress = crate::progress::Progress::new();
        let copied = firn_cache::copy::copy_from(
            &mut store,
            &cache,
            &paths,
            !args.no_check_sigs && settings.build.require_sigs,
            &keys,
            &mut |c| progress.status(&copy_status(&sd, &c, from)),
        );
        progress.finish();
        let copied = copied?;
        for p in copied {
            writeln!(out, "{}", sd.display(&p)).map_err(CliError::stdout)?;
        }
    }
    Ok(())
}

/// `firn serve-cache`: prints `http://HOST:PORT` (the address bound) on stdout, then
/// serves the store read-only until SIGINT or SIGTERM. Narinfos are signed with
/// `secret-key-files`.
pub fn serve(settings: &Settings, args: &ServeArgs, out: &mut impl Write) -> Result<(), CliError> {
    let store = open(settings)?;
    let keys = secret_keys(settings)?;
    let server = firn_cache::serve::CacheServer::bind(&args.listen)?;
    let addr = server
        .addr()
        .map_or_else(|| args.listen.clone(), |a| a.to_string());
    writeln!(out, "http://{addr}").map_err(CliError::stdout)?;
    out.flush().map_err(CliError::stdout)?;
    crate::interrupt::install_handlers();
    server.serve(&store, &keys, crate::interrupt::interrupted)?;
    Ok(())
}

/// The status line of a copy on a terminal (`[3/10] copying '…' to/from 'URL'`).
fn copy_status(
    sd: &firn_derivation::StoreDir,
    c: &firn_cache::copy::CopyProgress<'_>,
    url: &str,
) -> String {
    format!(
        "[{}/{}] copying '{}' ({})",
        c.done,
        c.total,
        sd.display(c.path),
        url.split('?').next().unwrap_or(url)
    )
}
