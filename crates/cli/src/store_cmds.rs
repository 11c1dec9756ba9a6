//! Store commands: add, add-fixed, dump, restore, query, path-info, verify, and
//! `derivation add`. Output formats are `nix-store`'s / `nix path-info`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::Args;
use firn_derivation::{FileIngestionMethod, HashAlgo, StorePath};
use firn_store::db::PathGraph;
use firn_store::nar::NarError;
use firn_store::verify::VerifyEvent;
use firn_store::{Reporter, Store, StoreError, ValidPathInfo, VerifyOptions};

use crate::error::CliError;
use crate::settings::Settings;

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::usage(e.to_string())
    }
}

/// Open the store; its messages (waiting for a lock, …) go to stderr as Nix's lines.
pub fn open(settings: &Settings) -> Result<Store, CliError> {
    let options = firn_store::StoreOptions {
        build_users_group: settings.build.build_users_group.clone(),
        auto_optimise: settings.build.auto_optimise_store,
        own_temp_roots: false,
    };
    let mut store = Store::open_with(&settings.layout, &options).map_err(|e| match e {
        StoreError::NotOwner { .. } => {
            let own_root = crate::settings::user_store_root(|k| std::env::var_os(k));
            let own = if settings.store_given {
                format!("drop --store to use {}", own_root.display())
            } else {
                format!("--store {}", own_root.display())
            };
            CliError::ForeignStore {
                source: Box::new(e),
                advice: format!("use your own store ({own}) or a daemon"),
            }
        }
        e => e.into(),
    })?;
    store.set_reporter(Reporter::new(|m| eprintln!("{m}")));
    Ok(store)
}

fn w(out: &mut impl Write, s: &str) -> Result<(), CliError> {
    out.write_all(s.as_bytes()).map_err(CliError::stdout)
}

/// `nix-store --add PATH…`: each named as Nix's `baseNameOf` names the argument as
/// given (so `.` is named `.`), its contents read from the argument made absolute and
/// lexically canonical (`absPath`: `f/` is `f`, `""` the current directory).
pub fn add(settings: &Settings, paths: &[PathBuf], out: &mut impl Write) -> Result<(), CliError> {
    let mut store = open(settings)?;
    for p in paths {
        let info = store.add_to_store_named(
            &base_name_of(p),
            &firn_store::layout::absolute(p),
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
        )?;
        w(out, &format!("{}\n", store.store_dir().display(&info.path)))?;
    }
    Ok(())
}

/// Nix's `baseNameOf`: what follows the last `/`, one trailing `/` ignored (`a/b/` is
/// `b`, `.` is `.`, `a//` and `""` are empty).
pub fn base_name_of(path: &Path) -> String {
    let bytes = path.as_os_str().as_bytes();
    let end = match bytes {
        [.., b'/'] if bytes.len() > 1 => bytes.len() - 1,
        _ => bytes.len(),
    };
    let start = bytes[..end]
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[start..end]).into_owned()
}

pub fn add_fixed(
    settings: &Settings,
    recursive: bool,
    algo: &str,
    paths: &[PathBuf],
    out: &mut impl Write,
) -> Result<(), CliError> {
    let algo = HashAlgo::parse(algo).map_err(|e| CliError::usage(e.to_string()))?;
    let method = if recursive {
        FileIngestionMethod::Recursive
    } else {
        FileIngestionMethod::Flat
    };
    let mut store = open(settings)?;
    // Nix's `addToStoreSlow` reads the argument as given (not made absolute).
    for p in paths {
        let info = store.add_to_store_named(&base_name_of(p), p, method, algo)?;
        w(out, &format!("{}\n", store.store_dir().display(&info.path)))?;
    }
    Ok(())
}

/// `nix-store --dump PATH`: the NAR of any file system object, a symlink at PATH as a
/// symlink (never followed), without opening the store. A logical store path (one that,
/// made absolute lexically, is inside the store dir) is read from the real store dir,
/// as everything is with `--store ROOT`; any other PATH is the file as given.
///
/// With `fd` (standard output, which `out` writes to, flushed), the NAR is written to
/// the descriptor itself and large files' contents go to it from the page cache
/// (`sendfile`; `firn_store::nar::dump_path_to_fd`), not through this process.
pub fn dump(
    settings: &Settings,
    path: &Path,
    out: &mut impl Write,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), CliError> {
    let layout = &settings.layout;
    let mut logical = firn_store::store::absolute(path);
    // `link/` means what `link` points to, as for the kernel.
    if path.as_os_str().as_bytes().ends_with(b"/") {
        logical.push("");
    }
    let in_store = logical
        .strip_prefix(settings.store_dir.as_str())
        .is_ok_and(|rest| rest.components().next().is_some());
    let file = match in_store && layout.is_relocated() {
        true => layout.real_path_of(&logical),
        false => path.to_path_buf(),
    };
    out.flush().map_err(CliError::stdout)?;
    let mut buf = io::BufWriter::with_capacity(1 << 20, out);
    let dumped = match fd {
        Some(fd) => firn_store::nar::dump_path_to_fd(&file, fd),
        None => firn_store::nar::dump_path(&file, &mut buf),
    };
    dumped.map_err(|e| match e {
        NarError::Write { source } if source.kind() == io::ErrorKind::BrokenPipe => {
            CliError::BrokenPipe
        }
        e if file != path => CliError::usage(format!(
            "{e} (the store path '{}' is read from the real store directory '{}')",
            path.display(),
            layout.real_store_dir.display()
        )),
        e => CliError::usage(e.to_string()),
    })?;
    buf.flush().map_err(CliError::stdout)
}

/// How `firn hash` hashes and prints (nix-hash's flags).
#[derive(Debug, Clone, Copy)]
pub struct HashHow {
    pub base32: bool,
    pub flat: bool,
    pub truncate: bool,
}

/// Nix's `compressHash`: fold the digest into `size` bytes by XOR.
fn compress(bytes: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, b) in bytes.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// `nix-hash [--type ALGO] [--base32] [--flat] [--truncate] PATH…`.
pub fn hash(
    algo: &str,
    how: HashHow,
    paths: &[PathBuf],
    out: &mut impl Write,
) -> Result<(), CliError> {
    let algo = HashAlgo::parse(algo).map_err(|e| CliError::usage(e.to_string()))?;
    for p in paths {
        let mut hasher = firn_store::nar::HashSink::with_algo(algo);
        if how.flat {
            let mut f = std::fs::File::open(p).map_err(|source| CliError::Open {
                path: p.display().to_string(),
                source,
            })?;
            io::copy(&mut f, &mut hasher).map_err(|e| CliError::read(p, e))?;
        } else {
            firn_store::nar::dump_path_pipelined(p, &mut hasher)
                .map_err(|e| CliError::usage(e.to_string()))?;
        }
        let (h, _) = hasher.finish();
        let mut bytes = h.as_bytes().to_vec();
        // As nix-hash: only hashes longer than 160 bits are truncated.
        if how.truncate && bytes.len() > 20 {
            bytes = compress(&bytes, 20);
        }
        let shown = if how.base32 {
            firn_derivation::nixbase32::encode(&bytes)
        } else {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        w(out, &format!("{shown}\n"))?;
    }
    Ok(())
}

pub fn restore(path: &std::path::Path) -> Result<(), CliError> {
    let mut input = io::BufReader::with_capacity(1 << 20, io::stdin().lock());
    firn_store::nar::restore_path(&mut input, path).map_err(|e| match e {
        // These name the target already.
        NarError::TargetExists { .. } | NarError::CreateTarget { .. } => {
            CliError::usage(e.to_string())
        }
        e => CliError::usage(format!("restoring '{}': {e}", path.display())),
    })
}

/// `nix-store -q`'s flags: one query (none: `--outputs`, as in Nix) and its modifiers.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    kind: QueryKind,
    /// With a derivation: query its outputs instead (for -R, --references, --referrers,
    /// --referrers-closure, --hash, --size, --graph, --roots).
    #[arg(short = 'u', long)]
    use_output: bool,
    /// Build the derivations (or check the paths are valid) first, as `firn realise`.
    #[arg(short = 'f', long, visible_alias = "force-realize")]
    pub force_realise: bool,
    /// With --requisites: also the outputs of the derivations in the closure (those
    /// that are valid), and their closures.
    #[arg(long)]
    include_outputs: bool,
    /// Store paths, or symlinks to them (none: nothing, as nix-store -q; `--graph`
    /// an empty graph).
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
}

/// Which `nix-store -q` query.
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct QueryKind {
    /// The paths each path refers to, directly.
    #[arg(long)]
    references: bool,
    /// The paths that refer to each path, directly.
    #[arg(long, visible_alias = "referers")]
    referrers: bool,
    /// The closure: each path and everything it refers to, transitively (references
    /// before referrers).
    #[arg(long, short = 'R')]
    requisites: bool,
    /// Each path and everything that refers to it, transitively.
    #[arg(long, visible_alias = "referers-closure")]
    referrers_closure: bool,
    /// The output paths of derivations (the default query).
    #[arg(long)]
    outputs: bool,
    /// The derivation each path was built from (`unknown-deriver` if none is known).
    #[arg(long, short = 'd')]
    deriver: bool,
    /// The sha256 NAR hash of each path, in Nix's base-32.
    #[arg(long)]
    hash: bool,
    /// The NAR size of each path, in bytes.
    #[arg(long)]
    size: bool,
    /// The closure as a tree, shared parts marked `[...]`.
    #[arg(long)]
    tree: bool,
    /// The closure as a Graphviz (dot) graph.
    #[arg(long)]
    graph: bool,
    /// The valid derivations that name each path as an output.
    #[arg(long)]
    valid_derivers: bool,
    /// The GC roots (`LINK -> PATH`) that keep each path alive.
    #[arg(long)]
    roots: bool,
}

/// The references of each of `paths` within the set, one query per path (small sets).
fn graph_of(store: &Store, paths: &BTreeSet<StorePath>) -> Result<PathGraph, CliError> {
    let mut refs = BTreeMap::new();
    for p in paths {
        refs.insert(
            p.clone(),
            store.db().query_references(p).map_err(StoreError::from)?,
        );
    }
    Ok(PathGraph::from_references(&refs))
}

/// A `.drv` stands for its outputs (read from the file), anything else for itself.
fn use_outputs(store: &Store, p: &StorePath) -> Result<BTreeSet<StorePath>, CliError> {
    if !p.is_derivation() {
        return Ok([p.clone()].into());
    }
    let drv = store.read_derivation(p)?;
    let outs = drv
        .output_paths(store.store_dir())
        .map_err(|e| CliError::usage(e.to_string()))?;
    Ok(outs.into_values().collect())
}

fn info(store: &Store, p: &StorePath) -> Result<ValidPathInfo, CliError> {
    store
        .db()
        .query_path_info(p)
        .map_err(StoreError::from)?
        .ok_or_else(|| {
            CliError::usage(format!(
                "path '{}' is not valid",
                store.store_dir().display(p)
            ))
        })
}

fn print_tree(
    store: &Store,
    p: &StorePath,
    first: &str,
    tail: &str,
    done: &mut BTreeSet<StorePath>,
    out: &mut String,
) -> Result<(), CliError> {
    let shown = store.store_dir().display(p);
    if !done.insert(p.clone()) {
        out.push_str(&format!("{first}{shown} [...]\n"));
        return Ok(());
    }
    out.push_str(&format!("{first}{shown}\n"));
    let refs = info(store, p)?.references;
    // Nix reverses topoSortPaths (referrers first), giving references first: our order.
    let graph = graph_of(store, &refs)?;
    let sorted = graph.topo_sorted();
    let n = sorted.len();
    for (i, r) in sorted.iter().enumerate() {
        let last = i + 1 == n;
        print_tree(
            store,
            r,
            &format!("{tail}{}", if last { "└───" } else { "├───" }),
            &format!("{tail}{}", if last { "    " } else { "│   " }),
            done,
            out,
        )?;
    }
    Ok(())
}

/// The paths of `drvs`' closure with the valid outputs of every derivation in it, and
/// theirs, until nothing is added (Nix's `computeFSClosure` with `includeOutputs`).
fn with_outputs(store: &Store, roots: &[StorePath]) -> Result<Vec<StorePath>, CliError> {
    let db = store.db();
    let mut roots = roots.to_vec();
    loop {
        let closure = db.query_closure(&roots, false).map_err(StoreError::from)?;
        let mut more = Vec::new();
        for d in closure.iter().filter(|p| p.is_derivation()) {
            for o in db
                .query_derivation_outputs(d)
                .map_err(StoreError::from)?
                .into_values()
            {
                if !closure.contains(&o) && db.is_valid_path(&o).map_err(StoreError::from)? {
                    more.push(o);
                }
            }
        }
        if more.is_empty() {
            return Ok(roots);
        }
        roots.extend(more);
    }
}

pub fn query(settings: &Settings, args: &QueryArgs, out: &mut impl Write) -> Result<(), CliError> {
    // `--force-realise` was done by the caller (main.rs), which knows `realise`.
    let kind = &args.kind;
    // No query flag: `--outputs`, as `nix-store -q`.
    let outputs = kind.outputs
        || !(kind.references
            || kind.referrers
            || kind.requisites
            || kind.referrers_closure
            || kind.deriver
            || kind.hash
            || kind.size
            || kind.tree
            || kind.graph
            || kind.valid_derivers
            || kind.roots);
    // The queries for which `--use-output` puts a derivation's outputs in its place.
    let outputs_for_drvs = args.use_output
        && (kind.references
            || kind.referrers
            || kind.requisites
            || kind.referrers_closure
            || kind.hash
            || kind.size
            || kind.graph
            || kind.roots);
    let store = open(settings)?;
    let sd = store.store_dir().clone();
    // --outputs and --valid-derivers do not need the path itself to be valid (an
    // output that was never built), as in Nix; everything else does.
    let need_valid = !(outputs || kind.valid_derivers);
    let mut paths = Vec::with_capacity(args.paths.len());
    for a in &args.paths {
        let p = store.parse_path_arg(a)?;
        let ps = match outputs_for_drvs && p.is_derivation() {
            true => use_outputs(&store, &p)?,
            false => [p].into(),
        };
        for p in ps {
            if need_valid && !store.db().is_valid_path(&p).map_err(StoreError::from)? {
                return Err(StoreError::NotValid(sd.display(&p)).into());
            }
            paths.push(p);
        }
    }
    let mut text = String::new();
    let db = store.db();
    if kind.references || kind.referrers {
        let mut set = BTreeSet::new();
        for p in &paths {
            if kind.references {
                set.extend(db.query_references(p).map_err(StoreError::from)?);
            } else {
                set.extend(db.query_referrers(p).map_err(StoreError::from)?);
            }
        }
        for p in graph_of(&store, &set)?.topo_sorted() {
            text.push_str(&sd.display(p));
            text.push('\n');
        }
    } else if kind.requisites || kind.referrers_closure {
        if kind.requisites && args.include_outputs {
            paths = with_outputs(&store, &paths)?;
        }
        let graph = db
            .query_closure_graph(&paths, kind.referrers_closure)
            .map_err(StoreError::from)?;
        for p in graph.topo_sorted() {
            text.push_str(&sd.display(p));
            text.push('\n');
        }
    } else if outputs {
        for p in &paths {
            for o in use_outputs(&store, p)? {
                text.push_str(&format!("{}\n", sd.display(&o)));
            }
        }
    } else if kind.deriver {
        for p in &paths {
            match info(&store, p)?.deriver {
                Some(d) => text.push_str(&format!("{}\n", sd.display(&d))),
                None => text.push_str("unknown-deriver\n"),
            }
        }
    } else if kind.hash || kind.size {
        for p in &paths {
            let i = info(&store, p)?;
            if kind.hash {
                text.push_str(&format!("{}\n", i.nar_hash));
            } else {
                text.push_str(&format!("{}\n", i.nar_size));
            }
        }
    } else if kind.tree {
        let mut done = BTreeSet::new();
        for p in &paths {
            print_tree(&store, p, "", "", &mut done, &mut text)?;
        }
    } else if kind.graph {
        print_graph(&store, paths.iter().cloned().collect(), &mut text)?;
    } else if kind.roots {
        // Nix prints from an unordered map; firn sorts by target, then link.
        let live = store.liveness_closure(&paths)?;
        for (target, links) in store.find_roots()? {
            if live.contains(&target) {
                for link in links {
                    text.push_str(&format!("{} -> {}\n", link.display(), sd.display(&target)));
                }
            }
        }
    } else if kind.valid_derivers {
        for p in &paths {
            for d in db.query_valid_derivers(p).map_err(StoreError::from)? {
                text.push_str(&format!("{}\n", sd.display(&d)));
            }
        }
    }
    w(out, &text)
}

/// `printDotGraph`.
fn print_graph(
    store: &Store,
    roots: BTreeSet<StorePath>,
    out: &mut String,
) -> Result<(), CliError> {
    const COLOURS: [&str; 6] = ["black", "red", "green", "blue", "magenta", "burlywood"];
    let mut colour = 0;
    let mut work = roots;
    let mut done = BTreeSet::new();
    out.push_str("digraph G {\n");
    while let Some(p) = work.pop_first() {
        if !done.insert(p.clone()) {
            continue;
        }
        out.push_str(&format!(
            "\"{}\" [label = \"{}\", shape = box, style = filled, fillcolor = \"#ff0000\"];\n",
            p.base_name(),
            p.name()
        ));
        for r in info(store, &p)?.references {
            if r != p {
                out.push_str(&format!(
                    "\"{}\" -> \"{}\" [color = \"{}\"];\n",
                    r.base_name(),
                    p.base_name(),
                    COLOURS[colour % COLOURS.len()]
                ));
                colour += 1;
                work.insert(r);
            }
        }
    }
    out.push_str("}\n");
    Ok(())
}

/// `nix path-info`'s flags.
#[derive(Debug, Args)]
pub struct PathInfoArgs {
    /// Print JSON, as `nix path-info --json` (invalid paths as `"valid": false`).
    #[arg(long)]
    json: bool,
    /// The closure of the paths, references first.
    #[arg(short, long)]
    recursive: bool,
    /// Print the NAR size of each path.
    #[arg(short, long)]
    size: bool,
    /// Print the sum of the NAR sizes of each path's closure.
    #[arg(short = 'S', long)]
    closure_size: bool,
    /// With --size and --closure-size: sizes as 5.7M (`-h`, as Nix's: help is --help).
    #[arg(short = 'h', long)]
    human_readable: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Print the signatures (`ultimate` for paths built here, `ca:…` for content-addressed
    /// ones, then the signatures).
    #[arg(long)]
    sigs: bool,
    /// Store paths (a `.drv` stands for its outputs), or symlinks to them.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
}

/// `printSize` of `nix path-info`.
fn size_column(value: u64, human: bool) -> String {
    if !human {
        return format!("\t{value:11}");
    }
    const UNITS: [char; 9] = [' ', 'K', 'M', 'G', 'T', 'P', 'E', 'Z', 'Y'];
    let mut power = 0;
    let mut res = value as f64;
    while res > 1024.0 && power + 1 < UNITS.len() {
        power += 1;
        res /= 1024.0;
    }
    format!("\t{res:6.1}{}", UNITS[power])
}

fn closure_size(store: &Store, p: &StorePath) -> Result<u64, CliError> {
    let mut total = 0;
    for q in store
        .db()
        .query_closure(std::slice::from_ref(p), false)
        .map_err(StoreError::from)?
    {
        total += info(store, &q)?.nar_size;
    }
    Ok(total)
}

/// `nix path-info`: a `.drv` argument stands for its outputs (as an installable does in
/// Nix 2.8). With `--json`, invalid paths are listed as `"valid": false`; without, they
/// are an error.
pub fn path_info(
    settings: &Settings,
    args: &PathInfoArgs,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let store = open(settings)?;
    let sd = store.store_dir().clone();
    let mut paths = BTreeSet::new();
    for a in &args.paths {
        let p = store.parse_path_arg(a)?;
        if p.is_derivation() {
            paths.extend(use_outputs(&store, &p)?);
        } else {
            paths.insert(p);
        }
    }
    if args.recursive {
        for p in &paths {
            info(&store, p)?;
        }
        let roots: Vec<StorePath> = paths.iter().cloned().collect();
        paths = store
            .db()
            .query_closure(&roots, false)
            .map_err(StoreError::from)?;
    }
    if !args.json {
        for p in &paths {
            info(&store, p)?;
        }
        // As Nix: references before referrers, else in path order, columns aligned.
        let graph = graph_of(&store, &paths)?;
        let sorted = graph.topo_sorted();
        let width = sorted
            .iter()
            .map(|p| sd.display(p).len())
            .max()
            .unwrap_or(0);
        let columns = args.size || args.closure_size || args.sigs;
        let mut text = String::new();
        for p in sorted {
            let i = info(&store, p)?;
            let shown = sd.display(p);
            text.push_str(&shown);
            if columns {
                text.push_str(&" ".repeat(width - shown.len()));
            }
            if args.size {
                text.push_str(&size_column(i.nar_size, args.human_readable));
            }
            if args.closure_size {
                let size = closure_size(&store, p)?;
                text.push_str(&size_column(size, args.human_readable));
            }
            if args.sigs {
                let mut sigs = Vec::new();
                if i.ultimate {
                    sigs.push("ultimate".to_owned());
                }
                if let Some(ca) = &i.ca {
                    sigs.push(format!("ca:{ca}"));
                }
                sigs.extend(i.sigs.iter().cloned());
                text.push('\t');
                text.push_str(&sigs.join(" "));
            }
            text.push('\n');
        }
        return w(out, &text);
    }
    let mut entries = Vec::new();
    for p in &paths {
        let path = sd.display(p);
        let Some(i) = store.db().query_path_info(p).map_err(StoreError::from)? else {
            entries.push(PathInfoJson::Invalid { path, valid: false });
            continue;
        };
        let closure_size = match args.closure_size {
            true => Some(closure_size(&store, p)?),
            false => None,
        };
        entries.push(PathInfoJson::Valid {
            path,
            nar_hash: i.nar_hash.to_sri(),
            nar_size: i.nar_size,
            references: i.references.iter().map(|r| sd.display(r)).collect(),
            ca: i.ca.clone(),
            closure_size,
            deriver: i.deriver.as_ref().map(|d| sd.display(d)),
            registration_time: i.registration_time,
            ultimate: i.ultimate.then_some(true),
            signatures: i.sigs.clone(),
        });
    }
    let text = serde_json::to_string(&entries)
        .map_err(|e| CliError::usage(format!("writing JSON: {e}")))?;
    // `nix path-info --json` ends without a newline.
    w(out, &text)
}

/// One path of `nix path-info --json`, with Nix 2.8's field order.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum PathInfoJson {
    Invalid {
        path: String,
        valid: bool,
    },
    Valid {
        path: String,
        #[serde(rename = "narHash")]
        nar_hash: String,
        #[serde(rename = "narSize")]
        nar_size: u64,
        references: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ca: Option<String>,
        #[serde(rename = "closureSize", skip_serializing_if = "Option::is_none")]
        closure_size: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        deriver: Option<String>,
        #[serde(rename = "registrationTime")]
        registration_time: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        ultimate: Option<bool>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        signatures: Vec<String>,
    },
}

/// `nix-store --export PATH…`: the export of exactly those paths on stdout
/// (`firn_daemon::export`).
pub fn export(settings: &Settings, args: &[String]) -> Result<(), CliError> {
    let store = open(settings)?;
    let mut paths = BTreeSet::new();
    for a in args {
        paths.insert(store.parse_path_arg(a)?);
    }
    let stdout = io::stdout().lock();
    firn_daemon::export::export_to(
        &store,
        &paths,
        io::BufWriter::with_capacity(1 << 20, stdout),
    )
    .map_err(|e| match e {
        firn_daemon::export::ExportError::Write(e) => CliError::stdout(e),
        e => CliError::usage(e.to_string()),
    })
}

/// `nix-store --import`: add the paths of the export on stdin; print them.
pub fn import(settings: &Settings, out: &mut impl Write) -> Result<(), CliError> {
    let mut store = open(settings)?;
    let stdin = io::stdin().lock();
    let paths =
        firn_daemon::export::import_from(&mut store, io::BufReader::with_capacity(1 << 20, stdin))
            .map_err(|e| CliError::usage(e.to_string()))?;
    let sd = store.store_dir().clone();
    for p in paths {
        w(out, &format!("{}\n", sd.display(&p)))?;
    }
    Ok(())
}

/// `nix-store --verify-path PATH…` (`opVerifyPath`): hash each path's contents again
/// and compare with its registered NAR hash. A modified path is reported (Nix's line,
/// without `error:`) and the others are still checked; an argument that is not a valid
/// path, or contents that cannot be read, end it with the error. Returns whether no
/// path was modified.
pub fn verify_path(settings: &Settings, args: &[String]) -> Result<bool, CliError> {
    let store = open(settings)?;
    let sd = store.store_dir().clone();
    let mut unmodified = true;
    for a in args {
        let p = store.parse_path_arg(a)?;
        if settings.verbosity >= 1 {
            eprintln!("checking path '{}'...", sd.display(&p));
        }
        let info = store
            .db()
            .query_path_info(&p)
            .map_err(StoreError::from)?
            .ok_or_else(|| StoreError::NotValid(sd.display(&p)))?;
        let (got, _) =
            firn_store::nar::hash_path(&store.real_path(&p)).map_err(StoreError::from)?;
        if got != info.nar_hash {
            eprintln!(
                "{}",
                VerifyEvent::Modified {
                    path: sd.display(&p),
                    expected: info.nar_hash,
                    got,
                }
            );
            unmodified = false;
        }
    }
    Ok(unmodified)
}

/// `nix-store --verify [--check-contents] [--repair]` (`Store::verify`), each step on
/// stderr; returns whether all is well.
pub fn verify(settings: &Settings, check_contents: bool, repair: bool) -> Result<bool, CliError> {
    let mut store = open(settings)?;
    let opts = VerifyOptions {
        check_contents,
        repair,
    };
    // With --repair, whether a modified path could be repaired is known only after the
    // rebuild: its "cannot repair" and the final warning wait.
    let mut held = Vec::new();
    let report = store.verify(&opts, &mut |e| match e {
        VerifyEvent::CannotRepair { .. } | VerifyEvent::NotAllFixed if repair => {
            held.push(e.clone())
        }
        e => eprintln!("{e}"),
    })?;
    if !repair || report.modified.is_empty() {
        for e in held {
            eprintln!("{e}");
        }
        return Ok(report.all_fixed());
    }
    let unrepaired = repair_by_rebuilding(settings, &mut store, &report.modified)?;
    let sd = store.store_dir().clone();
    for p in &unrepaired {
        eprintln!(
            "warning: cannot repair '{}': no substituters, and no valid derivation to rebuild it from",
            sd.display(p)
        );
    }
    let fixed = unrepaired.is_empty() && report.missing_with_referrers.is_empty();
    if !fixed {
        eprintln!("{}", VerifyEvent::NotAllFixed);
    }
    Ok(fixed)
}

/// `nix-store --repair-path`: each path (which must be valid) rebuilt from its valid
/// deriver and put in place, whatever its state, in order; the first that cannot be is
/// Nix's error, `cannot repair path '…'`. (Nix substitutes first; firn's repair does not
/// use substituters yet.)
pub fn repair_path(settings: &Settings, paths: &[String]) -> Result<(), CliError> {
    let mut store = open(settings)?;
    for arg in paths {
        let p = store.valid_path_arg(arg)?;
        let unrepaired = repair_by_rebuilding(settings, &mut store, &BTreeSet::from([p]))?;
        if let Some(p) = unrepaired.first() {
            return Err(CliError::usage(format!(
                "cannot repair path '{}'",
                store.store_dir().display(p)
            )));
        }
    }
    Ok(())
}

/// Nix 2.8's `repairPath` without substituters: rebuild the valid deriver of each
/// modified path, in the sandbox, and put the rebuilt outputs in place. Returns the
/// paths that could not be repaired.
fn repair_by_rebuilding(
    settings: &Settings,
    store: &mut Store,
    modified: &BTreeSet<StorePath>,
) -> Result<BTreeSet<StorePath>, CliError> {
    let mut derivers: BTreeSet<StorePath> = BTreeSet::new();
    let mut unrepaired = BTreeSet::new();
    for p in modified {
        let deriver = store
            .db()
            .query_path_info(p)
            .map_err(StoreError::from)?
            .and_then(|i| i.deriver);
        match deriver {
            Some(d) if store.db().is_valid_path(&d).map_err(StoreError::from)? => {
                derivers.insert(d);
            }
            _ => {
                unrepaired.insert(p.clone());
            }
        }
    }
    if derivers.is_empty() {
        return Ok(unrepaired);
    }
    let build = settings.build.clone();
    let builder = crate::local_builder::local_builder(settings, &build, store);
    let mut events = crate::progress::TerminalEvents::with_format(
        store.store_dir().clone(),
        !settings.quiet,
        build.keep_going,
        settings.log_format,
    );
    let tops: Vec<(StorePath, firn_build::Wanted)> = derivers
        .iter()
        .map(|d| (d.clone(), firn_build::Wanted::All))
        .collect();
    crate::interrupt::install_handlers();
    let mut worker = firn_build::Worker::new(
        store,
        build,
        builder,
        &mut events,
        crate::interrupt::interrupted,
    );
    let results = worker.run(&tops, firn_build::BuildMode::Repair);
    drop(worker);
    for (d, r) in &results {
        if r.status.success() {
            continue;
        }
        for p in modified {
            let from_d = store
                .db()
                .query_path_info(p)
                .map_err(StoreError::from)?
                .and_then(|i| i.deriver)
                .as_ref()
                == Some(d);
            if from_d {
                unrepaired.insert(p.clone());
            }
        }
    }
    Ok(unrepaired)
}

pub fn derivation_add(
    settings: &Settings,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut input = Vec::new();
    io::Read::read_to_end(&mut io::stdin(), &mut input)
        .map_err(|e| CliError::read(std::path::Path::new("<stdin>"), e))?;
    let mut store = open(settings)?;
    let mut drvs = firn_derivation::parse_show_derivation(store.store_dir(), &input)
        .map_err(|e| CliError::usage(format!("derivation JSON on stdin: {e}")))?;
    if drvs.len() != 1 {
        return Err(CliError::usage(format!(
            "derivation JSON on stdin holds {} derivations; `add` takes exactly one",
            drvs.len()
        )));
    }
    let (_, drv) = drvs.remove(0);
    let p = store.add_derivation(drv, dry_run)?;
    w(out, &format!("{}\n", store.store_dir().display(&p)))
}

/// `nix-store -l PATH…`: the bzip2 build logs of derivations, or of the derivations that
/// produced outputs, in order; the first without one ends it with Nix's error.
pub fn log(settings: &Settings, args: &[String], out: &mut impl Write) -> Result<(), CliError> {
    if args.is_empty() {
        return Ok(());
    }
    let store = open(settings)?;
    for arg in args {
        log_one(&store, arg, out)?;
    }
    Ok(())
}

fn log_one(store: &Store, arg: &str, out: &mut impl Write) -> Result<(), CliError> {
    let sd = store.store_dir().clone();
    let p = store.parse_path_arg(arg)?;
    let mut candidates = vec![p.clone()];
    if !p.is_derivation() {
        if let Some(i) = store.db().query_path_info(&p).map_err(StoreError::from)? {
            candidates.extend(i.deriver);
        }
        candidates.extend(
            store
                .db()
                .query_valid_derivers(&p)
                .map_err(StoreError::from)?,
        );
    }
    for d in candidates.iter().filter(|d| d.is_derivation()) {
        let file = firn_build::log::log_path(&store.layout().log_dir, d);
        if let Ok(f) = std::fs::File::open(&file) {
            let mut dec = bzip2::read::BzDecoder::new(f);
            io::copy(&mut dec, out).map_err(|e| match e.kind() {
                io::ErrorKind::BrokenPipe => CliError::BrokenPipe,
                _ => CliError::usage(format!("reading log '{}': {e}", file.display())),
            })?;
            return Ok(());
        }
    }
    Err(CliError::usage(format!(
        "build log of derivation '{}' is not available",
        sd.display(&p)
    )))
}
