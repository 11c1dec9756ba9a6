//! `firn derivation show` and `firn derivation print`.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use firn_derivation::json::{parse_show_derivation_with, Name};
use firn_derivation::{
    name_from_drv_base_name, parse_derivation, write_show_derivation, Derivation,
};

use crate::error::CliError;
use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub enum DerivationCommand {
    /// Show .drv files as `nix show-derivation` does (JSON keyed by .drv path).
    ///
    /// A DRV is a store path (read from the store given by --store) or any file.
    Show {
        /// Also every derivation in their closures (`nix show-derivation -r`); needs
        /// the store's database.
        #[arg(short, long)]
        recursive: bool,
        /// `.drv` store paths (or symlinks to them), or `.drv` files anywhere.
        #[arg(required = true, value_name = "DRV")]
        drvs: Vec<PathBuf>,
    },
    /// Read derivation JSON (as `show` prints it) on stdin, write the .drv text to stdout.
    Print,
    /// Read derivation JSON on stdin, compute the output paths left empty (inputs must
    /// be in the store), write the .drv into the store and register it.
    Add {
        /// Only print the .drv path it would have.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(
    cmd: DerivationCommand,
    settings: &Settings,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match cmd {
        DerivationCommand::Show { recursive, drvs } => {
            let drvs = derivers_for_outputs(drvs, settings)?;
            match recursive {
                true => show(&closure_drvs(&drvs, settings)?, settings, out),
                false => show(&drvs, settings, out),
            }
        }
        DerivationCommand::Print => print(settings, out),
        DerivationCommand::Add { dry_run } => {
            crate::store_cmds::derivation_add(settings, dry_run, out)
        }
    }
}

/// `nix show-derivation`'s `toDerivations` for an argument that is a store path but not
/// a derivation (an output, say): the derivation that has it as an output and is valid
/// (the first by path, as Nix takes the first of `queryValidDerivers`), else Nix's
/// "'P' does not have a known deriver". Other arguments stay as they are.
fn derivers_for_outputs(drvs: Vec<PathBuf>, settings: &Settings) -> Result<Vec<PathBuf>, CliError> {
    let output_key = |arg: &PathBuf| store_key(arg, settings).filter(|k| !k.ends_with(".drv"));
    if !drvs.iter().any(|a| output_key(a).is_some()) {
        return Ok(drvs);
    }
    let store = crate::store_cmds::open(settings)?;
    let sd = &settings.store_dir;
    drvs.into_iter()
        .map(|arg| {
            let Some(key) = output_key(&arg) else {
                return Ok(arg);
            };
            let path = store.parse_path_arg(&key)?;
            let derivers = store
                .db()
                .query_valid_derivers(&path)
                .map_err(firn_store::StoreError::from)?;
            match derivers.first() {
                Some(d) => Ok(PathBuf::from(sd.display(d))),
                None => Err(CliError::usage(format!(
                    "'{key}' does not have a known deriver"
                ))),
            }
        })
        .collect()
}

/// The argument as a logical store path, if it is one (else it is a file anywhere).
fn store_key(arg: &Path, settings: &Settings) -> Option<String> {
    let (key, _) = locate(arg, settings);
    (key == firn_store::store::absolute(arg).to_string_lossy()).then_some(key)
}

/// The key `nix show-derivation` would use and where to read the file from.
fn locate(arg: &Path, settings: &Settings) -> (String, PathBuf) {
    let store = settings.store_dir.as_str();
    let abs = firn_store::store::absolute(arg);
    let abs_str = abs.to_string_lossy();
    let base = abs
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    let in_store = abs_str
        .strip_prefix(store)
        .is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/'));
    if in_store {
        // A logical store path: read it from the real store directory.
        (abs_str.into_owned(), settings.layout.real_path_of(&abs))
    } else {
        (format!("{store}/{base}"), arg.to_path_buf())
    }
}

/// `drvs` and every derivation in their closures, as store paths (`nix show-derivation
/// -r`): a store path's closure is the database's; a file outside the store stands for
/// itself and the closures of its inputs.
fn closure_drvs(drvs: &[PathBuf], settings: &Settings) -> Result<Vec<PathBuf>, CliError> {
    let store = crate::store_cmds::open(settings)?;
    let sd = &settings.store_dir;
    let mut files = Vec::new();
    let mut roots = Vec::new();
    for arg in drvs {
        if let Some(key) = store_key(arg, settings) {
            roots.push(store.valid_path_arg(&key)?);
            continue;
        }
        let (key, file) = locate(arg, settings);
        let text = fs::read(&file).map_err(|e| CliError::read(&file, e))?;
        let base = key.rsplit('/').next().unwrap_or_default();
        let drv = parse_derivation(sd, &text, name_from_drv_base_name(base))
            .map_err(|e| CliError::usage(format!("parsing derivation '{}' {e}", file.display())))?;
        roots.extend(drv.input_drvs.keys().cloned());
        roots.extend(drv.input_srcs.iter().cloned());
        files.push(arg.clone());
    }
    let closure = store
        .db()
        .query_closure(&roots, false)
        .map_err(firn_store::StoreError::from)?;
    files.extend(
        closure
            .iter()
            .filter(|p| p.is_derivation())
            .map(|p| PathBuf::from(sd.display(p))),
    );
    Ok(files)
}

/// Nix asks for the experimental features of floating and impure outputs when it reads
/// a derivation (`parseDerivationOutput`), before anything else happens.
pub fn check_output_features(
    drv: &Derivation<'_>,
    settings: &firn_build::Settings,
) -> Result<(), CliError> {
    for o in drv.outputs.values() {
        let feature = match o {
            firn_derivation::DerivationOutput::CAFloating { .. } => "ca-derivations",
            firn_derivation::DerivationOutput::Impure { .. } => "impure-derivations",
            _ => continue,
        };
        if !settings.has_feature(feature) {
            return Err(CliError::usage(
                firn_build::BuildError::MissingFeature { feature }.to_string(),
            ));
        }
    }
    Ok(())
}

fn show(drvs: &[PathBuf], settings: &Settings, out: &mut impl Write) -> Result<(), CliError> {
    let sd = &settings.store_dir;
    let mut files = Vec::with_capacity(drvs.len());
    for arg in drvs {
        let (key, file) = locate(arg, settings);
        let text = fs::read(&file).map_err(|e| CliError::read(&file, e))?;
        files.push((key, file, text));
    }
    // Keyed and ordered by store path, duplicates once, as Nix's StorePathSet.
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);
    let mut parsed: Vec<(&str, Derivation<'_>)> = Vec::with_capacity(files.len());
    for (key, file, text) in &files {
        let base = key.rsplit('/').next().unwrap_or_default();
        let drv = parse_derivation(sd, text, name_from_drv_base_name(base))
            .map_err(|e| CliError::usage(format!("parsing derivation '{}' {e}", file.display())))?;
        check_output_features(&drv, &settings.build)?;
        parsed.push((key, drv));
    }
    // JSON is a little larger than the ATerm: reserve once.
    let input_size: usize = files.iter().map(|f| f.2.len()).sum();
    let mut json = Vec::with_capacity(input_size + input_size / 4 + 64);
    write_show_derivation(sd, parsed.iter().map(|(k, d)| (*k, d)), &mut json)
        .map_err(|e| CliError::usage(e.to_string()))?;
    out.write_all(&json).map_err(CliError::stdout)
}

fn print(settings: &Settings, out: &mut impl Write) -> Result<(), CliError> {
    let mut input = Vec::new();
    io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| CliError::read(Path::new("<stdin>"), e))?;
    let sd = &settings.store_dir;
    // The ATerm holds no name: print needs one only for a fixed output's path.
    let mut drvs = parse_show_derivation_with(sd, &input, Name::Optional)
        .map_err(|e| CliError::usage(format!("derivation JSON on stdin: {e}")))?;
    if drvs.len() != 1 {
        return Err(CliError::usage(format!(
            "derivation JSON on stdin holds {} derivations; `print` writes exactly one",
            drvs.len()
        )));
    }
    let (_, drv) = drvs.remove(0);
    let text = drv
        .to_aterm(sd)
        .map_err(|e| CliError::usage(format!("derivation JSON on stdin: {e}")))?;
    out.write_all(&text).map_err(CliError::stdout)
}
