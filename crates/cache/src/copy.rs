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
use firn_store::import::{references_first, Staged};
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
    let parallel = transfers(std::iter::once(cache));
    let (found, _) = walk_missing(store, paths, parallel, |p| {
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
/// stays valid until it is used); the invalid ones go to `lookup`, a wave at a time on
/// up to `parallel` threads, and the references of what it finds make the next wave.
pub(crate) fn walk_missing<T: Send>(
    store: &Store,
    paths: &[StorePath],
    parallel: usize,
    lookup: impl Fn(&StorePath) -> Result<Option<(NarInfo, T)>, CacheError> + Sync,
) -> Result<(Found<T>, BTreeSet<StorePath>), CacheError> {
    let mut found = BTreeMap::new();
    let mut missing = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut wave: Vec<StorePath> = paths.to_vec();
    while !wave.is_empty() {
        let mut ask = Vec::new();
        for p in std::mem::take(&mut wave) {
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
            ask.push(p);
        }
        let answers = lookup_all(&ask, parallel, &lookup);
        for (p, answer) in ask.into_iter().zip(answers) {
            match answer? {
                Some((info, tag)) => {
                    wave.extend(info.references.iter().filter(|r| **r != p).cloned());
                    found.insert(p, (info, tag));
                }
                None => {
                    missing.insert(p);
                }
            }
        }
    }
    Ok((found, missing))
}

/// `lookup` of each of `paths` on up to `parallel` threads; the answers in order.
fn lookup_all<R: Send>(
    paths: &[StorePath],
    parallel: usize,
    lookup: &(impl Fn(&StorePath) -> R + Sync),
) -> Vec<R> {
    let workers = parallel.min(paths.len());
    if workers <= 1 {
        return paths.iter().map(lookup).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let answers: std::sync::Mutex<Vec<Option<R>>> =
        std::sync::Mutex::new((0..paths.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(p) = paths.get(k) else { break };
                let r = lookup(p);
                answers.lock().unwrap_or_else(|e| e.into_inner())[k] = Some(r);
            });
        }
    });
    answers
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|a| a.unwrap_or_else(|| unreachable!("every path was looked up")))
        .collect()
}

/// Fetch `infos` (each from the cache `from` gives for it), stage them all and register
/// them in one transaction, references first. Returns the paths in that order.
///
/// The NARs are downloaded and decompressed by up to [`transfers`] threads at once, in
/// that order, each into a bounded channel ([`CHANNEL_CHUNKS`] chunks of
/// [`CHUNK`] bytes); this thread restores, hashes and checks them one after the other
/// in the same order, so a path is staged only after its references and nothing is
/// registered unless every path is staged. A failure stops the transfers (their
/// channels are dropped) and leaves nothing valid.
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
    let jobs: Vec<&(NarInfo, &BinaryCache)> = order.iter().map(|p| by_path[p]).collect();
    let workers = transfers(jobs.iter().map(|(_, c)| *c))
        .min(jobs.len())
        .max(1);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..jobs.len())
        .map(|_| std::sync::mpsc::sync_channel::<Chunk>(CHANNEL_CHUNKS))
        .unzip();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let staged = std::thread::scope(|scope| -> Result<Vec<Staged>, CacheError> {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if k >= jobs.len() || stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let (info, cache) = jobs[k];
                transfer(cache, info, &senders[k]);
            });
        }
        let result = (|| {
            let mut staged = Vec::new();
            for (k, rx) in receivers.into_iter().enumerate() {
                let (info, cache) = jobs[k];
                let p = &info.path;
                on_fetch(p, cache);
                let wrap = |e: CacheError| CacheError::Import {
                    path: sd.display(p),
                    url: cache.url.base.clone(),
                    source: Box::new(e),
                };
                let mut nar = match rx.recv() {
                    Ok(Chunk::Opened) => ChannelReader::new(rx),
                    Ok(Chunk::Failed(e)) => return Err(wrap(e)),
                    Ok(_) | Err(_) => {
                        return Err(wrap(CacheError::Io {
                            path: info.url.clone().into(),
                            source: std::io::Error::other("the transfer ended unexpectedly"),
                        }))
                    }
                };
                let s = store
                    .stage_nar(&path_info(info), &mut nar)
                    .map_err(|e| wrap(e.into()))?;
                staged.push(s);
            }
            Ok(staged)
        })();
        if result.is_err() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        result
    })?;
    store.register_staged(staged)?;
    Ok(order)
}

/// The bytes of one chunk of a transfer (below malloc's mmap threshold, so chunks are
/// reused from the heap rather than mapped and faulted in afresh each time).
const CHUNK: usize = 64 * 1024;
/// How many chunks a transfer may get ahead of the restore (8 MiB).
const CHANNEL_CHUNKS: usize = 128;

/// How many NARs are fetched at once: 8 when one comes over HTTP (Nix has 25
/// `http-connections`), else one per core up to 4 (decompression is the work).
pub fn transfers<'a>(caches: impl Iterator<Item = &'a BinaryCache>) -> usize {
    let mut http = false;
    for c in caches {
        http |= matches!(c.url.location, crate::cache::Location::Http(_));
    }
    if http {
        8
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
    }
}

/// What a transfer sends: `Opened` or `Failed` first, then data up to `End` or `Error`.
enum Chunk {
    Opened,
    Failed(CacheError),
    Data(Vec<u8>),
    Error(std::io::Error),
    End,
}

/// Open, download and decompress the NAR of `info`, into `tx`. Stops quietly when the
/// receiver is gone (the import failed).
fn transfer(cache: &BinaryCache, info: &NarInfo, tx: &std::sync::mpsc::SyncSender<Chunk>) {
    use std::io::Read;
    let mut nar = match cache.open_nar(info) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Chunk::Failed(e));
            return;
        }
    };
    if tx.send(Chunk::Opened).is_err() {
        return;
    }
    loop {
        let mut buf = vec![0u8; CHUNK];
        let msg = match nar.read(&mut buf) {
            Ok(0) => Chunk::End,
            Ok(n) => {
                buf.truncate(n);
                Chunk::Data(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Chunk::Error(e),
        };
        let last = !matches!(msg, Chunk::Data(_));
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

/// The receiving end of a transfer as a reader.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Chunk>,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<Chunk>) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(d)) => {
                    self.buf = d;
                    self.pos = 0;
                }
                Ok(Chunk::End) => self.done = true,
                Ok(Chunk::Error(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Ok(Chunk::Opened | Chunk::Failed(_)) | Err(_) => {
                    self.done = true;
                    return Err(std::io::Error::other("the transfer ended unexpectedly"));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
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
