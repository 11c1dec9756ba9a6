//! Nix's export format, as `nix-store --export` writes it and `nix-store --import` and the
//! serve protocol's `cmdImportPaths` read it (`Store::exportPaths`/`importPaths`):
//!
//! ```text
//! export  = { int 1, NAR, int 0x4558494e, path, list<path> references,
//!             string deriver ("" for none), int 0 (no legacy signature) }*, int 0
//! ```
//!
//! The paths go references first among those exported (not their closures). While a
//! path is dumped its NAR hash is checked against the registered one, as Nix does
//! (after the NAR has been written: a changed path ends the stream with the error).
//! On import each NAR is read whole (it comes before its metadata), bounded by
//! [`MAX_IMPORT_NAR`], and added with the references and deriver of its trailer, the NAR
//! hash computed here, without signatures (`NoCheckSigs`, as both of Nix's callers).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use firn_derivation::{Hash, StorePath};
use firn_protocol::serve::{self, ExportTrailer};
use firn_protocol::{Limits, Reader, WireError, Writer};
use firn_store::nar::{HashSink, NarError, Tee};
use firn_store::nar_bound::NarBounded;
use firn_store::{Store, StoreError, ValidPathInfo};
use thiserror::Error;

/// The largest NAR an import takes (it is held in memory until its trailer is read).
pub const MAX_IMPORT_NAR: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(Box<StoreError>),
    /// The stream is not an export, or is cut short.
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("path '{0}' is not valid")]
    NotValid(String),
    /// A path's contents no longer hash to what was registered (Nix's words).
    #[error("hash of path '{}' has changed from '{}' to '{}'!", .0.path, .0.expected, .0.got)]
    HashChanged(Box<HashChange>),
    #[error("writing the export of '{path}': {source}")]
    Dump { path: String, source: NarError },
    #[error("writing the export: {}", firn_store::error::strerror(.0))]
    Write(io::Error),
    #[error("reading an imported NAR: {}", firn_store::error::strerror(.0))]
    ReadNar(io::Error),
    #[error("an imported NAR is larger than {MAX_IMPORT_NAR} bytes or cut short")]
    NarTooLarge,
}

/// A registered NAR hash and what the contents hash to now.
#[derive(Debug)]
pub struct HashChange {
    pub path: String,
    pub expected: Hash,
    pub got: Hash,
}

impl From<StoreError> for ExportError {
    fn from(e: StoreError) -> Self {
        Self::Store(Box::new(e))
    }
}

/// `exportPaths`: `paths` (valid, else nothing is written), references first.
pub fn export_paths<W: Write>(
    store: &Store,
    paths: &BTreeSet<StorePath>,
    w: &mut Writer<W>,
) -> Result<(), ExportError> {
    let sd = store.store_dir().clone();
    let mut infos = Vec::new();
    for p in paths {
        let info = store
            .db()
            .query_path_info(p)
            .map_err(StoreError::from)?
            .ok_or_else(|| ExportError::NotValid(sd.display(p)))?;
        infos.push(info);
    }
    let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
        infos.iter().map(|i| (&i.path, i)).collect();
    for p in firn_store::import::references_first(&infos) {
        let Some(info) = by_path.get(&p) else {
            continue;
        };
        w.write_u64(1).map_err(ExportError::Write)?;
        let mut sink = HashSink::new();
        firn_store::nar::dump_path(&store.real_path(&p), &mut Tee(w.get_mut(), &mut sink))
            .map_err(|source| ExportError::Dump {
                path: sd.display(&p),
                source,
            })?;
        let (got, _) = sink.finish();
        // A missing hash (all zeros, from `--register-validity` without one) is not
        // checked, as in Nix.
        let unknown = info.nar_hash.as_bytes().iter().all(|b| *b == 0);
        if got != info.nar_hash && !unknown {
            return Err(ExportError::HashChanged(Box::new(HashChange {
                path: sd.display(&p),
                expected: info.nar_hash,
                got,
            })));
        }
        ExportTrailer {
            path: p.clone(),
            references: info.references.clone(),
            deriver: info.deriver.clone(),
        }
        .write(w)
        .map_err(ExportError::Write)?;
    }
    w.write_u64(0).map_err(ExportError::Write)?;
    Ok(())
}

/// `importPaths(NoCheckSigs)`: add every path of the export stream on `r`; the paths,
/// in the stream's order. A path already valid is left as it is (and still listed).
pub fn import_paths<R: Read>(
    store: &mut Store,
    r: &mut Reader<R>,
) -> Result<Vec<StorePath>, ExportError> {
    let mut imported = Vec::new();
    while serve::read_export_marker(r)? {
        let mut nar = Vec::new();
        {
            let mut bounded = NarBounded::new(r.get_mut().take(MAX_IMPORT_NAR));
            io::copy(&mut bounded, &mut nar).map_err(ExportError::ReadNar)?;
            if !bounded.is_done() {
                return Err(ExportError::NarTooLarge);
            }
        }
        let trailer = ExportTrailer::read(r)?;
        let info = ValidPathInfo {
            path: trailer.path,
            nar_hash: Hash::sha256(&nar),
            nar_size: nar.len() as u64,
            references: trailer.references,
            deriver: trailer.deriver,
            registration_time: 0,
            ultimate: false,
            sigs: Vec::new(),
            ca: None,
        };
        store.add_nar(&info, &mut &nar[..])?;
        imported.push(info.path);
    }
    Ok(imported)
}

/// [`export_paths`] to a plain writer (`nix-store --export`), flushed at the end.
pub fn export_to<W: Write>(
    store: &Store,
    paths: &BTreeSet<StorePath>,
    out: W,
) -> Result<(), ExportError> {
    let mut w = Writer::new(out);
    export_paths(store, paths, &mut w)?;
    w.flush().map_err(ExportError::Write)
}

/// [`import_paths`] from a plain reader (`nix-store --import`).
pub fn import_from<R: Read>(store: &mut Store, input: R) -> Result<Vec<StorePath>, ExportError> {
    let mut r = Reader::with_config(input, store.store_dir().clone(), Limits::default());
    import_paths(store, &mut r)
}
