//! The build plan: what Nix 2.8 hands a builder, computed from the derivation alone.
//!
//! [`plan`] turns a [`PlanInput`] (the derivation, its output paths, the build directory
//! as the builder sees it, the `cores` setting, the caller's environment) into a
//! [`BuildPlan`]: the program, `argv`, the environment, the files to write into the build
//! directory and the working directory. This is `LocalDerivationGoal::initEnv`,
//! `initTmpDir`, `writeStructuredAttrs` and the argument/environment part of `runChild`;
//! it does no I/O and no system calls, so an executor (sandboxed or not) only has to
//! write [`BuildPlan::files`] and `execve` the rest.
//!
//! The environment is built in this order, a later step overriding an earlier one:
//!
//! 1. `PATH=/path-not-set`, `HOME=/homeless-shelter`, `NIX_STORE=<store dir>`,
//!    `NIX_BUILD_CORES=<cores>`;
//! 2. unless the derivation uses structured attributes (`__json`): every `env` pair of the
//!    derivation, so a derivation attribute overrides step 1. A name listed in
//!    `passAsFile` is not exported: its value goes to the file
//!    `.attr-<nixbase32(sha256(name))>` in the build directory and `<name>Path` points
//!    at it;
//! 3. `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` = the build directory;
//! 4. fixed-output derivations only: `NIX_OUTPUT_CHECKED=1`, then every name in
//!    `impureEnvVars` gets the caller's value — the empty string when the caller does not
//!    have it (`getEnv(i).value_or("")`, confirmed by a real build, see
//!    `tests/data/README.md`), so it can even blank out step 3's `TMPDIR`;
//! 5. `NIX_LOG_FD=2`, `TERM=xterm-256color`;
//! 6. structured attributes only: `NIX_ATTRS_SH_FILE` / `NIX_ATTRS_JSON_FILE`.
//!
//! Finally, as in `runChild`, every argument and every environment string has the output
//! placeholders (`/<nixbase32(sha256("nix-output:<name>"))>`, what
//! `builtins.placeholder` returns) replaced by the output paths; so do the contents of
//! the `passAsFile`, `.attrs.json` and `.attrs.sh` files.
//!
//! Not handled here (they need the store or settings, not just the derivation):
//! the closures `exportReferencesGraph` names (the caller reads them from the store:
//! [`export_references_requests`] says which, [`PlanInput::exported`] brings them), the
//! recursive-Nix `NIX_REMOTE`, hash rewriting of already-valid outputs in unsandboxed
//! builds (the caller passes the paths the builder must write to), and the platform /
//! system-features check.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use firn_derivation::{
    ByteStr, Derivation, DerivationError, DerivationType, Hash, StoreDir, StorePath,
};
use serde_json::{Map, Number, Value};
use thiserror::Error;

/// `HOME` of every builder: a directory that does not exist.
pub const HOME_DIR: &str = "/homeless-shelter";
/// `PATH` of every builder unless the derivation sets one.
pub const PATH_NOT_SET: &str = "/path-not-set";
/// The build directory as a sandboxed builder sees it (`sandbox-build-dir`).
pub const SANDBOX_BUILD_DIR: &str = "/build";
/// Structured attributes as JSON, relative to the build directory.
pub const ATTRS_JSON_FILE: &str = ".attrs.json";
/// Structured attributes as bash `declare` lines, relative to the build directory.
pub const ATTRS_SH_FILE: &str = ".attrs.sh";

/// Everything [`plan`] needs. No field is read from the system.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub drv: &'a Derivation<'a>,
    pub store_dir: &'a StoreDir,
    /// The path each output is built at, by output name (e.g. from
    /// [`Derivation::output_paths`]); every output of `drv` must have one. Entries for
    /// names that are not outputs of `drv` are ignored.
    pub output_paths: &'a BTreeMap<ByteStr<'a>, StorePath>,
    /// The build directory as the builder sees it: [`SANDBOX_BUILD_DIR`] in the sandbox,
    /// the real temporary directory otherwise.
    pub build_dir: &'a Path,
    /// The `cores` setting, passed through as is (Nix 2.8 does not resolve 0).
    pub cores: u32,
    /// The environment of the process that runs the build, for `impureEnvVars`.
    pub caller_env: &'a BTreeMap<Vec<u8>, Vec<u8>>,
    /// Whether the build runs in the sandbox. Nix 2.8's environment does not depend on
    /// it beyond `build_dir`; it is carried into [`BuildPlan::sandboxed`] for the executor.
    pub sandboxed: bool,
    /// For each name [`export_references_requests`] gave: the closure to export, sorted
    /// by path (Nix's `exportReferences`).
    pub exported: &'a BTreeMap<String, Vec<ExportedPath>>,
}

/// One path of an exported references graph, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPath {
    /// The store path, printed.
    pub path: String,
    /// `sha256:<nixbase32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Printed, sorted.
    pub references: Vec<String>,
    /// The content address, rendered.
    pub ca: Option<String>,
    /// The sum of the NAR sizes of the path's closure.
    pub closure_size: u64,
}

/// One `exportReferencesGraph` entry: the name (a file in the build directory, or a
/// key of the structured attributes) and the store paths (as given) whose closure it
/// gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub paths: Vec<String>,
}

/// The `exportReferencesGraph` entries of `drv`. Without structured attributes it is
/// `name1 path1 name2 path2 …` (an odd number of words is an error, and a name must be
/// `[A-Za-z_][A-Za-z0-9_.-]*`); with them, an object of names to lists of paths.
pub fn export_references_requests(drv: &Derivation<'_>) -> Result<Vec<ExportRequest>, PlanError> {
    if let Some(json) = structured_attrs(drv)? {
        let Some(Value::Object(graphs)) = json.get("exportReferencesGraph") else {
            return Ok(Vec::new());
        };
        return Ok(graphs
            .iter()
            .map(|(name, v)| ExportRequest {
                name: name.clone(),
                paths: match v {
                    Value::Array(items) => items
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect(),
                    Value::String(s) => vec![s.clone()],
                    _ => Vec::new(),
                },
            })
            .collect());
    }
    let Some(value) = drv.env.get(b"exportReferencesGraph".as_slice()) else {
        return Ok(Vec::new());
    };
    let words = tokenize(value);
    if !words.len().is_multiple_of(2) {
        return Err(PlanError::ExportOddTokens(
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    let valid_name = |n: &[u8]| {
        n.first()
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
            && n.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    };
    words
        .chunks(2)
        .map(|pair| {
            let name = String::from_utf8_lossy(pair[0]).into_owned();
            if !valid_name(pair[0]) {
                return Err(PlanError::ExportInvalidName(name));
            }
            Ok(ExportRequest {
                name,
                paths: vec![String::from_utf8_lossy(pair[1]).into_owned()],
            })
        })
        .collect()
}

/// The closure file `exportReferencesGraph` writes (`makeValidityRegistration` without
/// derivers or hashes): per path, the path, an empty deriver line, the number of
/// references and the references.
pub fn validity_registration(paths: &[ExportedPath]) -> Vec<u8> {
    let mut s = String::new();
    for p in paths {
        s.push_str(&p.path);
        s.push_str("\n\n");
        s.push_str(&format!("{}\n", p.references.len()));
        for r in &p.references {
            s.push_str(r);
            s.push('\n');
        }
    }
    s.into_bytes()
}

/// The structured-attributes form (`pathInfoToJSON` without impure info, with the
/// closure size).
fn exported_json(paths: &[ExportedPath]) -> Value {
    Value::Array(
        paths
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("path".into(), Value::String(p.path.clone()));
                m.insert("narHash".into(), Value::String(p.nar_hash.clone()));
                m.insert("narSize".into(), Value::Number(Number::from(p.nar_size)));
                m.insert(
                    "references".into(),
                    Value::Array(p.references.iter().cloned().map(Value::String).collect()),
                );
                if let Some(ca) = &p.ca {
                    m.insert("ca".into(), Value::String(ca.clone()));
                }
                m.insert(
                    "closureSize".into(),
                    Value::Number(Number::from(p.closure_size)),
                );
                Value::Object(m)
            })
            .collect(),
    )
}

/// What to run, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// The program to execute: the derivation's `builder`, verbatim.
    pub program: Vec<u8>,
    /// `argv`: the base name of the builder (`baseNameOf`, not rewritten), then the
    /// derivation's arguments with placeholders rewritten.
    pub argv: Vec<Vec<u8>>,
    /// The complete environment, `(name, value)`, in the order Nix 2.8 passes it to
    /// `execve`: its `env` is a `std::map`, so sorted bytewise by name (by the name as it
    /// was before placeholder rewriting, which only matters for a name that contains a
    /// placeholder). Names are unique. Nothing else is inherited: the shell adds its own
    /// variables (`SHLVL`, and it keeps `PWD` only while it matches the cwd).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Files to create in the build directory before starting the builder, as
    /// `(name relative to the build directory, contents)`, in the order Nix writes them:
    /// `passAsFile` files in the order of the derivation's `env`, then [`ATTRS_SH_FILE`]
    /// and [`ATTRS_JSON_FILE`]. Nix writes them mode 0644 (umask 022), owned by the
    /// build user.
    pub files: Vec<(String, Vec<u8>)>,
    /// The working directory: the build directory as the builder sees it.
    pub cwd: PathBuf,
    /// [`PlanInput::sandboxed`], carried through.
    pub sandboxed: bool,
}

impl BuildPlan {
    /// The value of environment variable `name`, if the plan sets it.
    pub fn env_var(&self, name: &[u8]) -> Option<&[u8]> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Set environment variable `name` (replacing it if the plan has it), keeping the
    /// environment sorted by name as Nix's `std::map` is.
    pub fn set_env(&mut self, name: &[u8], value: &[u8]) {
        match self.env.binary_search_by(|(k, _)| k.as_slice().cmp(name)) {
            Ok(i) => self.env[i].1 = value.to_vec(),
            Err(i) => self.env.insert(i, (name.to_vec(), value.to_vec())),
        }
    }

    /// The environment as `execve` takes it: `name=value` (without the trailing NUL; a
    /// NUL inside a string would truncate it in Nix, an executor should refuse it).
    pub fn env_strings(&self) -> Vec<Vec<u8>> {
        self.env
            .iter()
            .map(|(k, v)| {
                let mut s = Vec::with_capacity(k.len() + 1 + v.len());
                s.extend_from_slice(k);
                s.push(b'=');
                s.extend_from_slice(v);
                s
            })
            .collect()
    }

    /// Replace hash parts (`from` → `to`, same length) in the arguments, the
    /// environment's values and the build-dir files: an unsandboxed build of a
    /// derivation with valid outputs writes them at fallback paths (Nix's
    /// `inputRewrites`, applied by `initEnv` and to the arguments).
    pub fn rewrite_hashes(&mut self, rewrites: &[(String, String)]) {
        let rewrite = |s: &mut Vec<u8>| {
            for (from, to) in rewrites {
                let finder = memchr::memmem::Finder::new(from.as_bytes());
                let hits: Vec<usize> = finder.find_iter(s).collect();
                for at in hits {
                    s[at..at + to.len()].copy_from_slice(to.as_bytes());
                }
            }
        };
        self.argv.iter_mut().skip(1).for_each(rewrite);
        self.env.iter_mut().for_each(|(_, v)| rewrite(v));
        self.files.iter_mut().for_each(|(_, c)| rewrite(c));
    }

    /// For a `builtin:<name>` builder (`builtin:fetchurl`, `builtin:buildenv`,
    /// `builtin:unpack-channel`), `<name>`: Nix runs those inside its own process, with
    /// the derivation's `env` (placeholders rewritten) instead of this plan's environment.
    pub fn builtin(&self) -> Option<&[u8]> {
        self.program.strip_prefix(b"builtin:")
    }
}

/// Why no plan could be made for a derivation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error("no output path given for output '{output}' of derivation '{drv}'")]
    MissingOutputPath { drv: String, output: String },
    /// `__json` is not JSON, or not an object (Nix: a JSON parse error, or nlohmann's
    /// type error when it sets `outputs`).
    #[error("cannot process __json attribute of derivation '{drv}': {reason}")]
    StructuredAttrs { drv: String, reason: String },
    #[error("attribute '{attr}' of derivation '{drv}' must be a list of strings")]
    NotAListOfStrings { drv: String, attr: &'static str },
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    ExportOddTokens(String),
    #[error("invalid file name '{0}' in 'exportReferencesGraph'")]
    ExportInvalidName(String),
    /// The caller did not bring the closure of an `exportReferencesGraph` entry.
    #[error("no closure given for '{0}' of 'exportReferencesGraph'")]
    ExportMissing(String),
}

/// Compute the plan for building `input.drv`. Pure: the same input gives the same plan.
pub fn plan(input: &PlanInput<'_>) -> Result<BuildPlan, PlanError> {
    let drv = input.drv;
    // Fixed-output and impure derivations are not sandboxed (`isSandboxed`).
    let fixed_output = matches!(
        drv.derivation_type()?,
        DerivationType::FixedOutput | DerivationType::Impure
    );
    let structured = structured_attrs(drv)?;
    let is_structured = structured.is_some();
    let outputs = output_paths(input)?;
    let rewrites: BTreeMap<Vec<u8>, Vec<u8>> = outputs
        .iter()
        .map(|(name, path)| (hash_placeholder(name.as_bytes()), path.as_bytes().to_vec()))
        .collect();
    let build_dir = input.build_dir.as_os_str().as_bytes();
    let in_build_dir = |file: &str| -> Vec<u8> {
        // `tmpDirInSandbox + "/" + fn`: plain concatenation, as Nix does it.
        let mut p = build_dir.to_vec();
        p.push(b'/');
        p.extend_from_slice(file.as_bytes());
        p
    };

    let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    fn set(env: &mut BTreeMap<Vec<u8>, Vec<u8>>, k: &[u8], v: &[u8]) {
        env.insert(k.to_vec(), v.to_vec());
    }

    // (1) Defaults a derivation attribute may override.
    set(&mut env, b"PATH", PATH_NOT_SET.as_bytes());
    set(&mut env, b"HOME", HOME_DIR.as_bytes());
    set(&mut env, b"NIX_STORE", input.store_dir.as_str().as_bytes());
    set(
        &mut env,
        b"NIX_BUILD_CORES",
        input.cores.to_string().as_bytes(),
    );

    // (2) The derivation's own environment (initTmpDir), unless structured.
    if structured.is_none() {
        let pass_as_file: BTreeSet<&[u8]> = drv
            .env
            .get(b"passAsFile".as_slice())
            .map(|v| tokenize(v).into_iter().collect())
            .unwrap_or_default();
        for (name, value) in &drv.env {
            if pass_as_file.contains(&name[..]) {
                let file = pass_as_file_name(name);
                let mut var = name.to_vec();
                var.extend_from_slice(b"Path");
                set(&mut env, &var, &in_build_dir(&file));
                files.push((file, rewrite_strings(value, &rewrites)));
            } else {
                set(&mut env, name, value);
            }
        }
    }

    // (3) The build directory, forced.
    for var in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(&mut env, var.as_bytes(), build_dir);
    }

    // (4) Fixed-output derivations: NIX_OUTPUT_CHECKED and the impure variables.
    if fixed_output {
        set(&mut env, b"NIX_OUTPUT_CHECKED", b"1");
        for name in impure_env_vars(drv, structured.as_ref())? {
            let value = input.caller_env.get(&name).cloned().unwrap_or_default();
            env.insert(name, value);
        }
    }

    // (5) Forced last.
    set(&mut env, b"NIX_LOG_FD", b"2");
    set(&mut env, b"TERM", b"xterm-256color");

    // (6) Structured attributes (writeStructuredAttrs).
    if let Some(mut json) = structured {
        let outputs_json: Map<String, Value> = outputs
            .iter()
            .map(|(name, path)| (name.clone(), Value::String(path.clone())))
            .collect();
        json.insert("outputs".into(), Value::Object(outputs_json));
        // prepareStructuredAttrs: each graph becomes a top-level attribute.
        for req in export_references_requests(drv)? {
            let paths = input
                .exported
                .get(&req.name)
                .ok_or_else(|| PlanError::ExportMissing(req.name.clone()))?;
            json.insert(req.name, exported_json(paths));
        }

        let sh = rewrite_strings(&attrs_sh(&json), &rewrites);
        files.push((ATTRS_SH_FILE.into(), sh));
        // Nix 2.8 sets these to the host-side temporary directory (`tmpDir`), which a
        // sandboxed builder cannot see (fixtures/…/structured/nar/out.nar records
        // `/tmp/nix-build-structured.drv-0/.attrs.json`). Later Nix uses the directory the
        // builder sees (`tmpDirInSandbox`); so do we.
        set(&mut env, b"NIX_ATTRS_SH_FILE", &in_build_dir(ATTRS_SH_FILE));

        let mut dump = Vec::new();
        dump_json(&Value::Object(json), &mut dump);
        files.push((ATTRS_JSON_FILE.into(), rewrite_strings(&dump, &rewrites)));
        set(
            &mut env,
            b"NIX_ATTRS_JSON_FILE",
            &in_build_dir(ATTRS_JSON_FILE),
        );
    }

    // exportReferencesGraph without structured attributes: one closure file each, after
    // the others (startBuilder writes them last), not rewritten.
    if !is_structured {
        for req in export_references_requests(drv)? {
            let paths = input
                .exported
                .get(&req.name)
                .ok_or_else(|| PlanError::ExportMissing(req.name.clone()))?;
            files.push((req.name, validity_registration(paths)));
        }
    }

    // runChild: rewrite `name=value` (placeholders contain no `=`, so rewriting the two
    // halves separately is the same) and the arguments; argv[0] is not rewritten.
    let env = env
        .into_iter()
        .map(|(k, v)| {
            (
                rewrite_strings(&k, &rewrites),
                rewrite_strings(&v, &rewrites),
            )
        })
        .collect();
    let mut argv = Vec::with_capacity(drv.args.len() + 1);
    argv.push(base_name_of(&drv.builder).to_vec());
    argv.extend(drv.args.iter().map(|a| rewrite_strings(a, &rewrites)));

    Ok(BuildPlan {
        program: drv.builder.to_vec(),
        argv,
        env,
        files,
        cwd: input.build_dir.to_path_buf(),
        sandboxed: input.sandboxed,
    })
}

pub use firn_derivation::hash_placeholder;

/// The file a `passAsFile` attribute is written to: `.attr-<nixbase32(sha256(name))>`.
pub fn pass_as_file_name(attr: &[u8]) -> String {
    format!(".attr-{}", Hash::sha256(attr).to_nixbase32())
}

/// Every output of the derivation with its path as text (output names must be UTF-8:
/// they are store path name parts and, with structured attributes, JSON keys).
fn output_paths(input: &PlanInput<'_>) -> Result<Vec<(String, String)>, PlanError> {
    input
        .drv
        .outputs
        .keys()
        .map(|name| {
            let name_str = std::str::from_utf8(name).map_err(|_| {
                DerivationError::NonUtf8OutputName(String::from_utf8_lossy(name).into())
            })?;
            let path =
                input
                    .output_paths
                    .get(&name[..])
                    .ok_or_else(|| PlanError::MissingOutputPath {
                        drv: input.drv.name.clone(),
                        output: name_str.to_owned(),
                    })?;
            Ok((name_str.to_owned(), input.store_dir.display(path)))
        })
        .collect()
}

/// `ParsedDerivation`'s `__json`, as the object `writeStructuredAttrs` works on. A JSON
/// `null` counts as an empty object (nlohmann turns null into an object when `outputs`
/// is assigned); any other non-object is an error (nlohmann's type error).
fn structured_attrs(drv: &Derivation<'_>) -> Result<Option<Map<String, Value>>, PlanError> {
    let Some(raw) = drv.env.get(b"__json".as_slice()) else {
        return Ok(None);
    };
    let err = |reason: String| PlanError::StructuredAttrs {
        drv: drv.name.clone(),
        reason,
    };
    match serde_json::from_slice::<Value>(&integer_minus_zero_to_zero(raw)) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(Value::Null) => Ok(Some(Map::new())),
        Ok(_) => Err(err("structured attributes must be a JSON object".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// nlohmann reads the integer token `-0` as the integer 0 (dumped `0`), serde_json as
/// the double -0.0; the Nix evaluator writes the float -0.0 as `-0`. So drop the sign of
/// every `-0` number token that has no fraction or exponent, outside strings.
fn integer_minus_zero_to_zero(json: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let (mut in_string, mut escaped) = (false, false);
    for (i, &c) in json.iter().enumerate() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if c == b'"' {
            in_string = true;
        } else if c == b'-'
            && json.get(i + 1) == Some(&b'0')
            && !json
                .get(i + 2)
                .is_some_and(|n| n.is_ascii_digit() || matches!(n, b'.' | b'e' | b'E'))
        {
            out.get_or_insert_with(|| json[..i].to_vec());
            continue;
        }
        if let Some(out) = out.as_mut() {
            out.push(c);
        }
    }
    out.map_or(Cow::Borrowed(json), Cow::Owned)
}

/// `getStringsAttr("impureEnvVars")`: from the JSON list with structured attributes,
/// else the whitespace-separated words of the `env` entry.
fn impure_env_vars(
    drv: &Derivation<'_>,
    structured: Option<&Map<String, Value>>,
) -> Result<Vec<Vec<u8>>, PlanError> {
    const ATTR: &str = "impureEnvVars";
    match structured {
        Some(json) => match json.get(ATTR) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_bytes().to_vec()),
                    _ => Err(PlanError::NotAListOfStrings {
                        drv: drv.name.clone(),
                        attr: ATTR,
                    }),
                })
                .collect(),
            Some(_) => Err(PlanError::NotAListOfStrings {
                drv: drv.name.clone(),
                attr: ATTR,
            }),
        },
        None => Ok(drv
            .env
            .get(ATTR.as_bytes())
            .map(|v| tokenize(v).into_iter().map(<[u8]>::to_vec).collect())
            .unwrap_or_default()),
    }
}

/// `tokenizeString(s)`: the maximal runs of bytes other than space, tab, LF and CR.
fn tokenize(s: &[u8]) -> Vec<&[u8]> {
    s.split(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .filter(|t| !t.is_empty())
        .collect()
}

/// `baseNameOf`: the last path component, ignoring one trailing `/`.
fn base_name_of(path: &[u8]) -> &[u8] {
    if path.is_empty() {
        return path;
    }
    let mut last = path.len() - 1;
    if path[last] == b'/' && last > 0 {
        last -= 1;
    }
    let start = path[..=last]
        .iter()
        .rposition(|&c| c == b'/')
        .map_or(0, |p| p + 1);
    &path[start..=last]
}

/// `rewriteStrings`: for each `(from, to)` in key order, replace every occurrence.
///
/// Nix resumes the search at the start of the text it just inserted; this resumes after
/// it, which is the same unless a match can begin inside an inserted output path. A
/// placeholder is `/` and 52 nixbase32 characters, and an output path's last `/` is
/// followed by 32 such characters and `-`, so that needs a store directory with a
/// component of 52 nixbase32 characters — where Nix itself would loop.
fn rewrite_strings(s: &[u8], rewrites: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut s = s.to_vec();
    for (from, to) in rewrites {
        if from == to || from.is_empty() {
            continue;
        }
        let mut j = 0;
        while let Some(pos) = find(&s[j..], from) {
            let at = j + pos;
            s.splice(at..at + from.len(), to.iter().copied());
            j = at + to.len();
        }
    }
    s
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `.attrs.sh`: one `declare` line per top-level key that is a shell variable name
/// (`[A-Za-z_][A-Za-z0-9_]*`), in key order: scalars as `declare k=v`, lists of scalars
/// as `declare -a k=(v v )`, objects of scalars as `declare -A k=(['x']=v )`; anything
/// else (floats that are not integral as a `float`, nested lists/objects) is left out.
fn attrs_sh(json: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in json {
        if !is_sh_var_name(key) {
            continue;
        }
        if let Some(s) = sh_scalar(value) {
            out.extend_from_slice(b"declare ");
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(&s);
            out.push(b'\n');
        } else if let Value::Array(items) = value {
            let mut body = Vec::new();
            let good = items.iter().all(|item| match sh_scalar(item) {
                Some(s) => {
                    body.extend_from_slice(&s);
                    body.push(b' ');
                    true
                }
                None => false,
            });
            if good {
                out.extend_from_slice(b"declare -a ");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"=(");
                out.extend_from_slice(&body);
                out.extend_from_slice(b")\n");
            }
        } else if let Value::Object(members) = value {
            let mut body = Vec::new();
            let good = members.iter().all(|(k, v)| match sh_scalar(v) {
                Some(s) => {
                    body.push(b'[');
                    body.extend_from_slice(&shell_escape(k.as_bytes()));
                    body.extend_from_slice(b"]=");
                    body.extend_from_slice(&s);
                    body.push(b' ');
                    true
                }
                None => false,
            });
            if good {
                out.extend_from_slice(b"declare -A ");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"=(");
                out.extend_from_slice(&body);
                out.extend_from_slice(b")\n");
            }
        }
    }
    out
}

fn is_sh_var_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && bytes.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `handleSimpleType`: strings shell-quoted; numbers whose `float` value is integral as
/// `std::to_string(value.get<int>())`; null as `''`; booleans as `1` / empty.
fn sh_scalar(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::String(s) => Some(shell_escape(s.as_bytes())),
        Value::Number(n) => sh_number(n).map(|i| i.to_string().into_bytes()),
        Value::Null => Some(b"''".to_vec()),
        Value::Bool(b) => Some(if *b { b"1".to_vec() } else { Vec::new() }),
        _ => None,
    }
}

/// Nix: `auto f = value.get<float>(); if (std::ceil(f) == f) return value.get<int>()`.
/// Integers always pass (any integer is integral as a float) and are cut to 32 bits
/// (two's complement wrap: 2^40 → 0, 2^32-1 → -1). A double passes if its `float`
/// rounding is integral, and converts like x86-64's `cvttsd2si` (truncation; out of
/// range → `i32::MIN`, as the fixtures' x86_64 Nix prints for 1e20).
fn sh_number(n: &Number) -> Option<i32> {
    if let Some(i) = n.as_i64() {
        return Some(i as i32);
    }
    if let Some(u) = n.as_u64() {
        return Some(u as i32);
    }
    let d = n.as_f64()?;
    let f = d as f32;
    if f.ceil() != f {
        return None;
    }
    let t = d.trunc();
    Some(if t >= f64::from(i32::MIN) && t <= f64::from(i32::MAX) {
        t as i32
    } else {
        i32::MIN
    })
}

/// `shellEscape`: single quotes around, each `'` as `'\''`.
fn shell_escape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'\'');
    for &c in s {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// nlohmann's `json::dump()` (compact): keys in byte order, strings with `\"`, `\\`,
/// `\b`, `\f`, `\n`, `\r`, `\t` and `\u00xx` for other control characters (lowercase
/// hex), everything else (including DEL and non-ASCII) raw; integers in decimal, doubles
/// as [`nlohmann_double`].
fn dump_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(d) = n.as_f64() {
                out.extend_from_slice(nlohmann_double(d).as_bytes());
            }
        }
        Value::String(s) => dump_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                dump_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                dump_string(k, out);
                out.push(b':');
                dump_json(v, out);
            }
            out.push(b'}');
        }
    }
}

fn dump_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &c in s.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            _ => out.push(c),
        }
    }
    out.push(b'"');
}

/// A double as nlohmann's `dtoa_impl::to_chars` writes it: the shortest digits that
/// round-trip, plain notation for decimal exponents in (-4, 15] with `.0` on integral
/// values (`123457000.0`, `0.0001`), else `d.ddde±XX` with at least two exponent digits
/// (`1e+20`, `1.5e-07`). Non-finite values (not produced by parsing) are `null`.
///
/// nlohmann takes its digits from Grisu2, which in rare cases gives a longer (still
/// round-tripping) digit string than Rust's exact shortest one; values written by the
/// Nix evaluator (at most 6 significant digits) are not among them.
fn nlohmann_double(x: f64) -> String {
    if !x.is_finite() {
        return "null".into();
    }
    let mut out = String::new();
    if x.is_sign_negative() {
        out.push('-');
    }
    let x = x.abs();
    if x == 0.0 {
        out.push_str("0.0");
        return out;
    }
    // `{:e}` gives the shortest round-tripping digits as `d[.ddd]e<exp>`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    let k = digits.len() as i32;
    // value = 0.digits × 10^n
    let n = exp + 1;
    const MIN_EXP: i32 = -4;
    const MAX_EXP: i32 = 15; // std::numeric_limits<double>::digits10
    if k <= n && n <= MAX_EXP {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
        out.push_str(".0");
    } else if 0 < n && n <= MAX_EXP {
        let (int, frac) = digits.split_at(n as usize);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    } else if MIN_EXP < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let e = n - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.unsigned_abs()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use firn_derivation::{
        parse_derivation, DerivationOutput, FileIngestionMethod, FixedOutputHash,
    };

    fn out_path() -> StorePath {
        StorePath::from_base_name(b"rl5q6dxn34kzrb2jqz05kjq64jqcs7lp-t").unwrap()
    }

    fn drv_with_env(env: &[(&str, &str)]) -> Derivation<'static> {
        let mut drv = Derivation {
            name: "t".into(),
            platform: b"x86_64-linux".to_vec().into(),
            builder: b"/bin/sh".to_vec().into(),
            args: vec![b"-c".to_vec().into(), b"true".to_vec().into()],
            ..Default::default()
        };
        drv.outputs.insert(
            b"out".to_vec().into(),
            DerivationOutput::InputAddressed(out_path()),
        );
        for (k, v) in env {
            drv.env
                .insert(k.as_bytes().to_vec().into(), v.as_bytes().to_vec().into());
        }
        drv
    }

    fn fixed(drv: &mut Derivation<'static>) {
        drv.outputs.insert(
            b"out".to_vec().into(),
            DerivationOutput::CAFixed(FixedOutputHash {
                method: FileIngestionMethod::Flat,
                hash: Hash::sha256(b"hello\n"),
            }),
        );
    }

    fn run(drv: &Derivation<'_>, caller: &[(&str, &str)]) -> Result<BuildPlan, PlanError> {
        let store_dir = StoreDir::default();
        let outputs = drv.output_paths(&store_dir).unwrap();
        let caller: BTreeMap<Vec<u8>, Vec<u8>> = caller
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        plan(&PlanInput {
            drv,
            store_dir: &store_dir,
            output_paths: &outputs,
            build_dir: Path::new("/build"),
            cores: 2,
            caller_env: &caller,
            sandboxed: true,
            exported: &BTreeMap::new(),
        })
    }

    fn var<'p>(p: &'p BuildPlan, k: &str) -> Option<&'p str> {
        p.env_var(k.as_bytes())
            .map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn placeholder_of_out_is_the_well_known_one() {
        // As `builtins.placeholder "out"` writes it into .drv files (fixtures/…/plan-oracle-env.drv).
        assert_eq!(
            hash_placeholder(b"out"),
            b"/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
        assert_eq!(
            hash_placeholder(b"dev"),
            b"/02qcpld1y6xhs5gz9bchpxaw0xdhmsp5dv88lh25r2ss44kh8dxz"
        );
    }

    #[test]
    fn base_name_of_like_nix() {
        assert_eq!(base_name_of(b"/bin/sh"), b"sh");
        assert_eq!(base_name_of(b"/bin/sh/"), b"sh");
        assert_eq!(base_name_of(b"sh"), b"sh");
        assert_eq!(base_name_of(b"/"), b"");
        assert_eq!(base_name_of(b""), b"");
        assert_eq!(base_name_of(b"//"), b"");
        assert_eq!(base_name_of(b"a//"), b"");
        assert_eq!(base_name_of(b"builtin:fetchurl"), b"builtin:fetchurl");
    }

    #[test]
    fn tokenize_on_nix_whitespace() {
        assert_eq!(
            tokenize(b"  a\tb\n\nc\rd  "),
            vec![&b"a"[..], b"b", b"c", b"d"]
        );
        assert!(tokenize(b" \t ").is_empty());
        // Only those four: a vertical tab or form feed is part of a word.
        assert_eq!(tokenize(b"a\x0bb"), vec![&b"a\x0bb"[..]]);
    }

    #[test]
    fn rewrite_strings_replaces_all_in_key_order() {
        let mut rw = BTreeMap::new();
        rw.insert(b"/aa".to_vec(), b"/x/aa-1".to_vec());
        rw.insert(b"/bb".to_vec(), b"/y".to_vec());
        assert_eq!(
            rewrite_strings(b"/aa:/bb:/aa/aa", &rw),
            b"/x/aa-1:/y:/x/aa-1/x/aa-1"
        );
        // The replacement contains the pattern: terminates (Nix would not).
        let mut rw = BTreeMap::new();
        rw.insert(b"a".to_vec(), b"aa".to_vec());
        assert_eq!(rewrite_strings(b"aba", &rw), b"aabaa");
    }

    #[test]
    fn nlohmann_double_formats() {
        for (x, s) in [
            (1.5, "1.5"),
            (-2.5, "-2.5"),
            (3.0, "3.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e20, "1e+20"),
            (-1e20, "-1e+20"),
            (123457000.0, "123457000.0"),
            (1e14, "100000000000000.0"),
            (1e15, "1e+15"),
            (1e16, "1e+16"),
            (1.25e16, "1.25e+16"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e100, "1e+100"),
            (1e-300, "1e-300"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (f64::INFINITY, "null"),
        ] {
            assert_eq!(nlohmann_double(x), s, "{x:e}");
        }
    }

    #[test]
    fn json_dump_like_nlohmann() {
        let v: Value = serde_json::from_str(
            r#"{"z":[1,-2,2.0,1e2,18446744073709551615,18446744073709551616],"a":"q\"b\\s\/\u0001\b\f\n\r\t\u007f\u00e9","m":{"b":null,"a":true}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        dump_json(&v, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"a\":\"q\\\"b\\\\s/\\u0001\\b\\f\\n\\r\\t\u{7f}\u{e9}\",\"m\":{\"a\":true,\"b\":null},\
             \"z\":[1,-2,2.0,100.0,18446744073709551615,1.8446744073709552e+19]}"
        );
    }

    #[test]
    fn json_number_edge_cases() {
        let dump = |s: &str| {
            let mut out = Vec::new();
            dump_json(&serde_json::from_str(s).unwrap(), &mut out);
            String::from_utf8(out).unwrap()
        };
        // Correctly rounded parsing (serde_json's float_roundtrip), as strtod.
        assert_eq!(
            dump("[1.5e-300,2.2250738585072014e-308,1.7976931348623157e308]"),
            "[1.5e-300,2.2250738585072014e-308,1.7976931348623157e+308]"
        );
        assert_eq!(
            dump("[-9223372036854775808,-9223372036854775809]"),
            "[-9223372036854775808,-9.223372036854776e+18]"
        );
        // serde_json alone would give -0.0 here.
        let parsed = |s: &str| {
            let mut out = Vec::new();
            dump_json(
                &serde_json::from_slice(&integer_minus_zero_to_zero(s.as_bytes())).unwrap(),
                &mut out,
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            parsed(r#"{"a":-0,"b":[-0.0,-0e0,-0,-0.5,"-0","\"-0","\\",-0],"-0":-0}"#),
            r#"{"-0":0,"a":0,"b":[-0.0,-0.0,0,-0.5,"-0","\"-0","\\",0]}"#
        );
    }

    #[test]
    fn sh_numbers_like_nix_on_x86_64() {
        let num = |s: &str| match serde_json::from_str::<Value>(s).unwrap() {
            Value::Number(n) => sh_number(&n),
            _ => unreachable!(),
        };
        assert_eq!(num("7"), Some(7));
        assert_eq!(num("-5"), Some(-5));
        assert_eq!(num("1099511627776"), Some(0));
        assert_eq!(num("4294967295"), Some(-1));
        assert_eq!(num("9223372036854775807"), Some(-1));
        assert_eq!(num("18446744073709551615"), Some(-1));
        assert_eq!(num("3.0"), Some(3));
        assert_eq!(num("-3.0"), Some(-3));
        assert_eq!(num("1.5"), None);
        assert_eq!(num("0.0001"), None);
        assert_eq!(num("1e20"), Some(i32::MIN));
        assert_eq!(num("-1e20"), Some(i32::MIN));
        assert_eq!(num("1e300"), Some(i32::MIN));
        // Not integral as a double, but its float rounding is.
        assert_eq!(num("2.00000001"), Some(2));
    }

    #[test]
    fn attrs_sh_shapes() {
        let v: Value = serde_json::from_str(
            r#"{"s":"it's","t":true,"f":false,"n":null,"i":7,"x":1.5,
                "l":[1,"a",null,false],"lf":[1,2.5],"ln":[[1]],"le":[],
                "o":{"k'":"v","b":true},"on":{"a":{}},"oe":{},
                "bad-name":1,"1x":2,"_ok":3,"é":4}"#,
        )
        .unwrap();
        let Value::Object(m) = v else { unreachable!() };
        assert_eq!(
            String::from_utf8(attrs_sh(&m)).unwrap(),
            "declare _ok=3\n\
             declare f=\n\
             declare i=7\n\
             declare -a l=(1 'a' ''  )\n\
             declare -a le=()\n\
             declare n=''\n\
             declare -A o=(['b']=1 ['k'\\''']='v' )\n\
             declare -A oe=()\n\
             declare s='it'\\''s'\n\
             declare t=1\n"
        );
    }

    #[test]
    fn environment_order_of_overrides() {
        let drv = drv_with_env(&[
            ("PATH", "/custom"),
            ("HOME", "/h"),
            ("NIX_STORE", "/s"),
            ("NIX_BUILD_CORES", "99"),
            ("TMPDIR", "/t"),
            ("PWD", "/p"),
            ("NIX_LOG_FD", "7"),
            ("TERM", "dumb"),
            ("NIX_OUTPUT_CHECKED", "x"),
            ("impureEnvVars", "CALLER"),
        ]);
        let p = run(&drv, &[("CALLER", "c")]).unwrap();
        assert_eq!(var(&p, "PATH"), Some("/custom"));
        assert_eq!(var(&p, "HOME"), Some("/h"));
        assert_eq!(var(&p, "NIX_STORE"), Some("/s"));
        assert_eq!(var(&p, "NIX_BUILD_CORES"), Some("99"));
        assert_eq!(var(&p, "TMPDIR"), Some("/build"));
        assert_eq!(var(&p, "PWD"), Some("/build"));
        assert_eq!(var(&p, "NIX_LOG_FD"), Some("2"));
        assert_eq!(var(&p, "TERM"), Some("xterm-256color"));
        // Not fixed-output: impureEnvVars is just a variable, NIX_OUTPUT_CHECKED the drv's.
        assert_eq!(var(&p, "NIX_OUTPUT_CHECKED"), Some("x"));
        assert_eq!(var(&p, "CALLER"), None);
        assert_eq!(var(&p, "impureEnvVars"), Some("CALLER"));
        // Sorted, unique.
        let names: Vec<_> = p.env.iter().map(|(k, _)| k.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert_eq!(
            p.argv,
            vec![b"sh".to_vec(), b"-c".to_vec(), b"true".to_vec()]
        );
        assert_eq!(p.program, b"/bin/sh");
        assert_eq!(p.cwd, Path::new("/build"));
        assert!(p.files.is_empty());
        assert!(p.sandboxed);
        assert_eq!(p.builtin(), None);
    }

    #[test]
    fn fixed_output_impure_env_vars() {
        let mut drv = drv_with_env(&[("impureEnvVars", " SET\tUNSET TMPDIR NIX_LOG_FD ")]);
        fixed(&mut drv);
        let p = run(
            &drv,
            &[("SET", "v"), ("TMPDIR", "/tmp"), ("NIX_LOG_FD", "9")],
        )
        .unwrap();
        assert_eq!(var(&p, "NIX_OUTPUT_CHECKED"), Some("1"));
        assert_eq!(var(&p, "SET"), Some("v"));
        assert_eq!(var(&p, "UNSET"), Some(""));
        assert_eq!(var(&p, "TMPDIR"), Some("/tmp"));
        assert_eq!(var(&p, "NIX_LOG_FD"), Some("2"));
    }

    #[test]
    fn pass_as_file_and_placeholders() {
        let ph = String::from_utf8(hash_placeholder(b"out")).unwrap();
        let mut drv = drv_with_env(&[
            ("passAsFile", "big other nothere"),
            ("big", &format!("x {ph} y")),
            ("other", "o"),
            ("otherPath", "explicit"),
            ("ref", &format!("{ph}/bin:{ph}")),
        ]);
        drv.args.push(format!("-{ph}-").into_bytes().into());
        let p = run(&drv, &[]).unwrap();
        let out = StoreDir::default().display(&out_path());
        let big = pass_as_file_name(b"big");
        assert_eq!(var(&p, "big"), None);
        assert_eq!(var(&p, "other"), None);
        assert_eq!(var(&p, "bigPath"), Some(format!("/build/{big}").as_str()));
        assert_eq!(var(&p, "otherPath"), Some("explicit"));
        assert_eq!(var(&p, "nothere"), None);
        assert_eq!(var(&p, "notherePath"), None);
        assert_eq!(var(&p, "ref"), Some(format!("{out}/bin:{out}").as_str()));
        assert_eq!(p.argv[3], format!("-{out}-").into_bytes());
        assert_eq!(
            p.files,
            vec![
                (big, format!("x {out} y").into_bytes()),
                (pass_as_file_name(b"other"), b"o".to_vec()),
            ]
        );
    }

    #[test]
    fn structured_json_null_is_an_empty_object() {
        let drv = drv_with_env(&[("__json", "null"), ("out", "ignored")]);
        let p = run(&drv, &[]).unwrap();
        let out = StoreDir::default().display(&out_path());
        assert_eq!(var(&p, "out"), None);
        assert_eq!(
            p.files,
            vec![
                (
                    ATTRS_SH_FILE.into(),
                    format!("declare -A outputs=(['out']='{out}' )\n").into_bytes()
                ),
                (
                    ATTRS_JSON_FILE.into(),
                    format!("{{\"outputs\":{{\"out\":\"{out}\"}}}}").into_bytes()
                ),
            ]
        );
        assert_eq!(var(&p, "NIX_ATTRS_JSON_FILE"), Some("/build/.attrs.json"));
        assert_eq!(var(&p, "NIX_ATTRS_SH_FILE"), Some("/build/.attrs.sh"));
    }

    #[test]
    fn structured_errors() {
        for bad in ["[1]", "\"s\"", "{", "{\"a\":1,}", "{} x"] {
            let drv = drv_with_env(&[("__json", bad)]);
            assert!(
                matches!(run(&drv, &[]), Err(PlanError::StructuredAttrs { .. })),
                "{bad}"
            );
        }
        // impureEnvVars must be a list of strings, checked only for fixed outputs.
        let mut drv = drv_with_env(&[("__json", r#"{"impureEnvVars":"A B"}"#)]);
        assert!(run(&drv, &[]).is_ok());
        fixed(&mut drv);
        assert_eq!(
            run(&drv, &[]),
            Err(PlanError::NotAListOfStrings {
                drv: "t".into(),
                attr: "impureEnvVars"
            })
        );
        let mut drv = drv_with_env(&[("__json", r#"{"impureEnvVars":["A",1]}"#)]);
        fixed(&mut drv);
        assert!(matches!(
            run(&drv, &[]),
            Err(PlanError::NotAListOfStrings { .. })
        ));
        let mut drv = drv_with_env(&[("__json", r#"{"impureEnvVars":["A"]}"#)]);
        fixed(&mut drv);
        let p = run(&drv, &[("A", "a")]).unwrap();
        assert_eq!(var(&p, "A"), Some("a"));
        assert_eq!(var(&p, "impureEnvVars"), None);
    }

    #[test]
    fn export_references_graph_requests_and_files() {
        // Without the closure from the store: refused, naming the entry.
        let drv = drv_with_env(&[("exportReferencesGraph", "closure /nix/store/x")]);
        assert_eq!(
            run(&drv, &[]),
            Err(PlanError::ExportMissing("closure".into()))
        );
        assert_eq!(
            export_references_requests(&drv).unwrap(),
            [ExportRequest {
                name: "closure".into(),
                paths: vec!["/nix/store/x".into()]
            }]
        );
        // Empty: nothing to export, as in Nix.
        let drv = drv_with_env(&[("exportReferencesGraph", " ")]);
        assert!(run(&drv, &[]).is_ok());
        // Nix's messages for an odd list and a bad file name.
        let drv = drv_with_env(&[("exportReferencesGraph", "a /nix/store/x b")]);
        assert_eq!(
            run(&drv, &[]).unwrap_err().to_string(),
            "odd number of tokens in 'exportReferencesGraph': 'a /nix/store/x b'"
        );
        let drv = drv_with_env(&[("exportReferencesGraph", "../a /nix/store/x")]);
        assert_eq!(
            run(&drv, &[]).unwrap_err().to_string(),
            "invalid file name '../a' in 'exportReferencesGraph'"
        );
        let drv = drv_with_env(&[(
            "__json",
            r#"{"exportReferencesGraph":{"c":["/nix/store/x"]}}"#,
        )]);
        assert!(matches!(run(&drv, &[]), Err(PlanError::ExportMissing(_))));
        // Not an object: ignored by Nix's structured-attrs code.
        let drv = drv_with_env(&[(
            "__json",
            r#"{"exportReferencesGraph":["c","/nix/store/x"]}"#,
        )]);
        assert!(run(&drv, &[]).is_ok());
        // The closure file: path, empty deriver, count, references.
        let p = |path: &str, refs: &[&str]| ExportedPath {
            path: path.into(),
            nar_hash: "sha256:0".into(),
            nar_size: 1,
            references: refs.iter().map(|r| (*r).to_owned()).collect(),
            ca: None,
            closure_size: 1,
        };
        assert_eq!(
            String::from_utf8(validity_registration(&[
                p("/nix/store/a", &[]),
                p("/nix/store/b", &["/nix/store/a", "/nix/store/b"])
            ]))
            .unwrap(),
            "/nix/store/a\n\n0\n/nix/store/b\n\n2\n/nix/store/a\n/nix/store/b\n"
        );
    }

    #[test]
    fn missing_output_path() {
        let drv = drv_with_env(&[]);
        let store_dir = StoreDir::default();
        let caller = BTreeMap::new();
        let outputs = BTreeMap::new();
        let r = plan(&PlanInput {
            drv: &drv,
            store_dir: &store_dir,
            output_paths: &outputs,
            build_dir: Path::new("/tmp/nix-build-t.drv-0"),
            cores: 0,
            caller_env: &caller,
            sandboxed: false,
            exported: &BTreeMap::new(),
        });
        assert_eq!(
            r,
            Err(PlanError::MissingOutputPath {
                drv: "t".into(),
                output: "out".into()
            })
        );
    }

    #[test]
    fn unsandboxed_build_dir_and_builtin() {
        let text = br#"Derive([("out","/nix/store/rl5q6dxn34kzrb2jqz05kjq64jqcs7lp-t","","")],[],[],"builtin","builtin:fetchurl",[],[("a","v"),("passAsFile","a")])"#;
        let drv = parse_derivation(&StoreDir::default(), text, "t").unwrap();
        let store_dir = StoreDir::default();
        let outputs = drv.output_paths(&store_dir).unwrap();
        let caller = BTreeMap::new();
        let p = plan(&PlanInput {
            drv: &drv,
            store_dir: &store_dir,
            output_paths: &outputs,
            build_dir: Path::new("/tmp/nix-build-t.drv-0"),
            cores: 0,
            caller_env: &caller,
            sandboxed: false,
            exported: &BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(p.builtin(), Some(&b"fetchurl"[..]));
        assert_eq!(p.argv, vec![b"builtin:fetchurl".to_vec()]);
        assert_eq!(var(&p, "NIX_BUILD_CORES"), Some("0"));
        assert_eq!(var(&p, "TMP"), Some("/tmp/nix-build-t.drv-0"));
        assert_eq!(
            var(&p, "aPath").map(str::to_owned),
            Some(format!(
                "/tmp/nix-build-t.drv-0/{}",
                pass_as_file_name(b"a")
            ))
        );
        assert_eq!(p.cwd, Path::new("/tmp/nix-build-t.drv-0"));
        assert!(!p.sandboxed);
        assert_eq!(p.env_strings()[0], b"HOME=/homeless-shelter".to_vec());
    }
}
