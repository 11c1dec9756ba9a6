//! `firn copy --to file:///DIR` and `firn copy --from file:///DIR`.
//!
//! To a cache (Nix's `BinaryCacheStore::addToStore`, in topological order): for each
//! path of the closure the cache lacks, the NAR is dumped, hashed (it must still have
//! the NAR hash the database records), compressed and hashed again into
//! `nar/<fileHash>.nar<ext>` (kept if already there), then the narinfo is written with
//! the path's signatures plus one per secret key.
//!
//! From a cache: the narinfos of the closure are read, each must be signed by a
//! trusted key (unless `check_sigs` is off, the cache is `trusted=1`, or the path is
//! content-addressed — its CA really gives its path), every NAR is staged (restored,
//! hash and size checked) and then all are registered in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};

use firn_derivation::{FileIngestionMethod, FixedOutputHash, Hash, HashAlgo, StoreDir, StorePath};
use firn_store::import::references_first;
use firn_store::nar::{self, HashSink, Tee};
use firn_store::{Store, ValidPathInfo};

use crate::cache::BinaryCache;
use crate::error::{io_err, CacheError};
use crate::keys::{info_fingerprint, PublicKeys, SecretKey};
use crate::narinfo::NarInfo;

/// Whether `info`'s content address really gives its path (`isContentAddressed`): then
/// it needs no signature.
pub fn is_content_addressed(sd: &StoreDir, info: &ValidPathInfo) -> bool {
    let Some(ca) = &info.ca else {
        return false;
    };
    let name = info.path.name();
    let made = if let Some(h) = ca.strip_prefix("text:") {
        let Ok(hash) = Hash::parse_any(h, Some(HashAlgo::Sha256)) else {
            return false;
        };
        sd.make_text_path(name, &hash, info.references.iter())
    } else if let Some(rest) = ca.strip_prefix("fixed:") {
        let (method, h) = match rest.strip_prefix("r:") {
            Some(h) => (FileIngestionMethod::Recursive, h),
            None => (FileIngestionMethod::Flat, rest),
        };
        let Ok(hash) = Hash::parse_any(h, None) else {
            return false;
        };
        if !info.references.is_empty() {
            return false;
        }
        sd.make_fixed_output_path(&FixedOutputHash { method, hash }, name)
    } else {
        return false;
    };
    made.is_ok_and(|p| p == info.path)
}

/// What the store would register for a narinfo.
pub fn path_info(info: &NarInfo) -> ValidPathInfo {
    ValidPathInfo {
        path: info.path.clone(),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        registration_time: firn_store::store::now(),
        ultimate: false,
        sigs: info.sigs.clone(),
        ca: info.ca.clone(),
    }
}

/// Whether a substitute may be taken: signed by a trusted key, or content-addressed,
/// or from a `trusted=1` cache, or with signatures not required.
pub fn acceptable(
    sd: &StoreDir,
    info: &NarInfo,
    keys: &PublicKeys,
    require_sigs: bool,
    cache_trusted: bool,
) -> bool {
    if !require_sigs || cache_trusted {
        return true;
    }
    let vpi = path_info(info);
    if is_content_addressed(sd, &vpi) {
        return true;
    }
    info_fingerprint(sd, &vpi).is_some_and(|fp| keys.count_valid(&fp, &info.sigs) > 0)
}

/// Copy the closures of `paths` into `cache`, signing with `keys` (and the cache's
/// `?secret-key=`). Returns the paths copied (those the cache lacked), references first.
/// Where a copy is, for a progress display: `path` is being copied, the `done`-th of
/// (at most) `total`.
#[derive(Debug, Clone, Copy)]
pub struct CopyProgress<'a> {
    pub path: &'a StorePath,
    pub done: usize,
    pub total: usize,
}

pub fn copy_to(
    store: &Store,
    cache: &BinaryCache,
    paths: &[StorePath],
    keys: &[SecretKey],
    on_copy: &mut dyn FnMut(CopyProgress<'_>),
) -> Result<Vec<StorePath>, CacheError> {
    let sd = store.store_dir().clone();
    let graph = store
        .db()
        .query_closure_graph(paths, false)
        .map_err(firn_store::StoreError::from)?;
    let mut all_keys: Vec<&SecretKey> = keys.iter().collect();
    all_keys.extend(cache.secret_key.as_ref());
    let order = graph.topo_sorted();
    let total = order.len();
    // What the cache lacks, references first, with what compressing needs (the store's
    // database stays on this thread).
    let mut todo: Vec<(usize, ValidPathInfo, std::path::PathBuf)> = Vec::new();
    for (i, p) in order.into_iter().enumerate() {
        if cache.has(p) {
            continue;
        }
        let info = store
            .db()
            .query_path_info(p)
            .map_err(firn_store::StoreError::from)?
            .ok_or_else(|| firn_store::StoreError::NotValid(sd.display(p)))?;
        let real = store.real_path(p);
        todo.push((i, info, real));
    }
    // NARs are compressed and written by up to one thread per core, in that order; the
    // narinfos are written here, in that order too, each once its NAR is in place: a
    // reader never sees a narinfo before its NAR, nor before its references' narinfos.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(todo.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let done: std::sync::Mutex<BTreeMap<usize, Result<NarInfo, CacheError>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let ready = std::sync::Condvar::new();
    let mut copied = Vec::new();
    std::thread::scope(|scope| -> Result<(), CacheError> {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if k >= todo.len() || stop.load(std::sync::atomic::Ordering::SeqCst) {
                    // Wake the writer in case it waits for an entry never to come.
                    ready.notify_all();
                    break;
                }
                let (_, info, real) = &todo[k];
                let r = write_nar(&sd, real, cache, info, &all_keys);
                let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                d.insert(k, r);
                ready.notify_all();
            });
        }
        let result = (|| {
            for (k, (i, info, _)) in todo.iter().enumerate() {
                let narinfo = {
                    let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some(r) = d.remove(&k) {
                            break r?;
                        }
                        d = ready.wait(d).unwrap_or_else(|p| p.into_inner());
                    }
                };
                on_copy(CopyProgress {
                    path: &info.path,
                    done: i + 1,
                    total,
                });
                cache.write_file(
                    &format!("{}.narinfo", info.path.hash_part()),
                    narinfo.to_text(&sd).as_bytes(),
                )?;
                copied.push(info.path.clone());
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        result
    })?;
    // The realisations of the closure's content-addressed outputs, each after the
    // narinfos (Nix's `registerDrvOutput`: `realisations/<id>.doi`, its JSON).
    if store.ca_derivations() {
        for p in &graph.topo_sorted() {
            write_realisations(store, cache, p)?;
        }
    }
    Ok(copied)
}

/// Write `realisations/<id>.doi` for every realisation whose output is `p`, unless the
/// cache has that very file.
fn write_realisations(store: &Store, cache: &BinaryCache, p: &StorePath) -> Result<(), CacheError> {
    let db = store.db();
    let ids = db
        .query_realisations_of_path(p)
        .map_err(firn_store::StoreError::from)?;
    for id in ids {
        let Some(r) = db
            .query_realisation(&id)
            .map_err(firn_store::StoreError::from)?
        else {
            continue;
        };
        let rel = format!("realisations/{id}.doi");
        let json = r.to_json();
        if fs::read(cache.dir()?.join(&rel)).is_ok_and(|old| old == json.as_bytes()) {
            continue;
        }
        cache.write_file(&rel, json.as_bytes())?;
    }
    Ok(())
}

/// Write the compressed NAR of `info` into `cache/nar/` and give its narinfo.
fn write_nar(
    sd: &StoreDir,
    real: &std::path::Path,
    cache: &BinaryCache,
    info: &ValidPathInfo,
    keys: &[&SecretKey],
) -> Result<NarInfo, CacheError> {
    let compression = cache.url.compression;
    let nar_dir = cache.dir()?.join("nar");
    let tmp = cache.tmp_name(&nar_dir.join("upload"));
    let result = (|| {
        let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let counted = Tee(HashSink::new(), BufWriter::new(file));
        let encoder = compression.encoder(counted).map_err(io_err(&tmp))?;
        let mut sink = Tee(HashSink::new(), encoder);
        nar::dump_path(real, &mut sink).map_err(firn_store::StoreError::from)?;
        let Tee(nar_sink, encoder) = sink;
        let Tee(file_sink, mut file) = encoder.finish().map_err(io_err(&tmp))?;
        file.flush().map_err(io_err(&tmp))?;
        file.get_ref().sync_all().map_err(io_err(&tmp))?;
        let (nar_hash, nar_size) = nar_sink.finish();
        let (file_hash, file_size) = file_sink.finish();
        if nar_hash != info.nar_hash || nar_size != info.nar_size {
            return Err(CacheError::CorruptLocalPath {
                path: sd.display(&info.path),
                expected: format!("sha256:{}", info.nar_hash.to_nixbase32()),
                got: format!("sha256:{}", nar_hash.to_nixbase32()),
            });
        }
        Ok((file_hash, file_size))
    })();
    let (file_hash, file_size) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let rel = format!(
        "nar/{}.nar{}",
        file_hash.to_nixbase32(),
        compression.extension()
    );
    let dest = cache.dir()?.join(&rel);
    if dest.exists() {
        let _ = fs::remove_file(&tmp);
    } else {
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    }
    let mut sigs = info.sigs.clone();
    if !keys.is_empty() {
        let fp = info_fingerprint(sd, info).ok_or_else(|| CacheError::ZeroNarSize {
            path: sd.display(&info.path),
        })?;
        for k in keys {
            let s = k.sign(&fp);
            if !sigs.contains(&s) {
                sigs.push(s);
            }
        }
    }
    Ok(NarInfo {
        path: info.path.clone(),
        url: rel,
        compression: compression.name().to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        system: None,
        sigs,
        ca: info.ca.clone(),
    })
}

/// The narinfos of the closure of `paths` in `cache`, without the paths `store` has
/// already; a path the cache lacks, or that fails the signature check, is an error.
pub fn closure_infos(
    store: &Store,
    cache: &BinaryCache,
    paths: &[StorePath],
    check_sigs: bool,
    keys: &PublicKeys,
) -> Result<Vec<NarInfo>, CacheError> {
    let sd = store.store_dir().clone();
    let (found, _) = walk_missing(store, paths, |p| {
        let info = cache.query(&sd, p)?.ok_or_else(|| CacheError::NotInCache {
            path: sd.display(p),
            url: cache.url.base.clone(),
        })?;
        if !acceptable(&sd, &info, keys, check_sigs, cache.url.trusted) {
            return Err(CacheError::NoTrustedSignature {
                path: sd.display(p),
                url: cache.url.base.clone(),
            });
        }
        Ok(Some((info, ())))
    })?;
    Ok(found.into_values().map(|(info, ())| info).collect())
}

/// What [`walk_missing`] found: each path's narinfo with its lookup's tag.
pub(crate) type Found<T> = BTreeMap<StorePath, (NarInfo, T)>;

/// The found part of the closure of `paths` that `store` lacks, and the paths nothing
/// was found for. Each path is rooted before its validity is checked (a valid reference
/// stays valid until it is used); an invalid one goes to `lookup`, and the references
/// of what it finds are walked in turn.
pub(crate) fn walk_missing<T>(
    store: &Store,
    paths: &[StorePath],
    mut lookup: impl FnMut(&StorePath) -> Result<Option<(NarInfo, T)>, CacheError>,
) -> Result<(Found<T>, BTreeSet<StorePath>), CacheError> {
    let mut found = BTreeMap::new();
    let mut missing = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut work: Vec<StorePath> = paths.to_vec();
    while let Some(p) = work.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        store.add_temp_root(&p)?;
        if store
            .db()
            .is_valid_path(&p)
            .map_err(firn_store::StoreError::from)?
        {
            continue;
        }
        match lookup(&p)? {
            Some((info, tag)) => {
                work.extend(info.references.iter().filter(|r| **r != p).cloned());
                found.insert(p, (info, tag));
            }
            None => {
                missing.insert(p);
            }
        }
    }
    Ok((found, missing))
}

/// Fetch `infos` (each from the cache `from` gives for it), stage them all and register
/// them in one transaction, references first. Returns the paths in that order.
pub fn import<'c>(
    store: &mut Store,
    infos: &[(NarInfo, &'c BinaryCache)],
    mut on_fetch: impl FnMut(&StorePath, &'c BinaryCache),
) -> Result<Vec<StorePath>, CacheError> {
    let sd = store.store_dir().clone();
    let vpis: Vec<ValidPathInfo> = infos.iter().map(|(i, _)| path_info(i)).collect();
    let order = references_first(&vpis);
    let by_path: BTreeMap<&StorePath, &(NarInfo, &BinaryCache)> =
        infos.iter().map(|x| (&x.0.path, x)).collect();
    let mut staged = Vec::new();
    for p in &order {
        let (info, cache) = by_path[p];
        on_fetch(p, cache);
        let wrap = |e: CacheError| CacheError::Import {
            path: sd.display(p),
            url: cache.url.base.clone(),
            source: Box::new(e),
        };
        let mut nar = cache.open_nar(info).map_err(wrap)?;
        let s = store
            .stage_nar(&path_info(info), &mut nar)
            .map_err(|e| wrap(e.into()))?;
        staged.push(s);
    }
    store.register_staged(staged)?;
    Ok(order)
}

/// `firn copy --from`: the closures of `paths` from `cache` into `store`.
pub fn copy_from(
    store: &mut Store,
    cache: &BinaryCache,
    paths: &[StorePath],
    check_sigs: bool,
    keys: &PublicKeys,
    on_copy: &mut dyn FnMut(CopyProgress<'_>),
) -> Result<Vec<StorePath>, CacheError> {
    let infos = closure_infos(store, cache, paths, check_sigs, keys)?;
    let pairs: Vec<(NarInfo, &BinaryCache)> = infos.into_iter().map(|i| (i, cache)).collect();
    let total = pairs.len();
    let mut done = 0;
    import(store, &pairs, |p, _| {
        done += 1;
        on_copy(CopyProgress {
            path: p,
            done,
            total,
        })
    })
}
