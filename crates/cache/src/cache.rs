//! A binary cache by URL. firn reads and writes `file:///DIR` caches and reads
//! `http://HOST[:PORT][/PATH]` and `https://…` ones (GETs with [`crate::http`]; 404 and
//! 403 mean absent, as in Nix; certificates checked against `ssl-cert-file`), with Nix's store parameters
//! after `?`: `compression` (`xz`, `zstd`, `bzip2`, `none`),
//! `secret-key` (a key file to sign every narinfo written), `priority`,
//! `want-mass-query`, `trusted` (substitutes accepted without signatures), `store` (the
//! store directory the cache holds paths of, when it is not ours: only
//! content-addressed paths can be substituted from it, under the path their content
//! gives in our store, as Nix does); an unknown parameter is an error (Nix warns and
//! ignores it).
//!
//! Files are written as `<file>.tmp.<pid>.<n>` and renamed, as Nix does: the NAR first,
//! then the narinfo, so a reader that sees the narinfo finds the NAR. A NAR's `URL`
//! must stay inside the cache: a relative path of plain components which, symlinks
//! resolved, is still below the cache's directory.

use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use firn_derivation::realisation::{DrvOutput, Realisation};
use firn_derivation::{StoreDir, StorePath};

use crate::cache_info::{CacheInfo, MAX_CACHE_INFO_SIZE};
use crate::compression::{self, Compression};
use crate::disk_cache::{DiskCache, DiskCacheOptions, Lookup};
use crate::error::{io_err, CacheError};
use crate::http::{Http, HttpOptions};
use crate::keys::SecretKey;
use crate::narinfo::{NarInfo, MAX_NARINFO_SIZE};

/// A directory, or an HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    /// The base URL (`http://…` or `https://…`), without a trailing `/`.
    Http(String),
}

/// A parsed cache URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    /// The URL without its parameters (how messages name the cache).
    pub base: String,
    /// Where the cache is.
    pub location: Location,
    pub compression: Compression,
    pub secret_key: Option<PathBuf>,
    pub priority: Option<u64>,
    pub want_mass_query: Option<bool>,
    pub trusted: bool,
    /// `?store=DIR`: the store directory of the cache's paths.
    pub store: Option<String>,
}

impl CacheUrl {
    pub fn parse(url: &str) -> Result<Self, CacheError> {
        let bad = |reason: &str| CacheError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let location = if let Some(dir) = base.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("the path of a file:// URL must be absolute"));
            }
            Location::Dir(PathBuf::from(dir))
        } else if let Some(rest) = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
        {
            if rest.is_empty() || rest.starts_with('/') {
                return Err(bad("an http:// or https:// URL needs a host"));
            }
            Location::Http(base.trim_end_matches('/').to_owned())
        } else {
            return Err(bad(
                "firn reads and writes file:// binary caches and reads http:// and https:// ones",
            ));
        };
        let mut u = CacheUrl {
            base: base.to_owned(),
            location,
            compression: Compression::Xz,
            secret_key: None,
            priority: None,
            want_mass_query: None,
            trusted: false,
            store: None,
        };
        let boolean = |k: &str, v: &str| match v {
            "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            _ => Err(bad(&format!("parameter '{k}' is not a Boolean: '{v}'"))),
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "compression" => u.compression = Compression::parse(v)?,
                "secret-key" => u.secret_key = Some(PathBuf::from(v)),
                "priority" => {
                    u.priority = Some(v.parse().map_err(|_| {
                        bad(&format!("parameter 'priority' is not a number: '{v}'"))
                    })?)
                }
                "want-mass-query" => u.want_mass_query = Some(boolean(k, v)?),
                "trusted" => u.trusted = boolean(k, v)?,
                "store" => {
                    StoreDir::new(v).map_err(|e| bad(&format!("parameter 'store': {e}")))?;
                    u.store = Some(v.to_owned());
                }
                // Accepted, without effect here.
                "compression-level" | "parallel-compression" => {}
                _ => return Err(bad(&format!("unknown parameter '{k}'"))),
            }
        }
        Ok(u)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How caches are opened: what settings say about reaching them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheOptions {
    pub http: HttpOptions,
    /// Nix's narinfo disk cache, for HTTP(S) caches; `None`: none.
    pub disk_cache: Option<DiskCacheOptions>,
}

/// An opened binary cache.
#[derive(Debug)]
pub struct BinaryCache {
    pub url: CacheUrl,
    pub info: CacheInfo,
    /// The key of `?secret-key=`.
    pub secret_key: Option<SecretKey>,
    /// The client of an HTTP(S) cache.
    http: Option<Http>,
    /// The narinfo disk cache, with this cache's id in it.
    disk: Option<(Arc<DiskCache>, i64, DiskCacheOptions)>,
}

impl BinaryCache {
    /// Open the cache for reading: its `nix-cache-info` (if any) must be for `sd`.
    pub fn open(url: &CacheUrl, sd: &StoreDir, opts: &CacheOptions) -> Result<Self, CacheError> {
        let http = match &url.location {
            Location::Http(base) => Some(Http::new(base, &opts.http)?),
            Location::Dir(_) => None,
        };
        let expected = url.store.as_deref().unwrap_or(sd.as_str());
        let disk = match (&url.location, &opts.disk_cache) {
            (Location::Http(base), Some(o)) => {
                DiskCache::shared(&o.file, o).map(|d| (d, base.clone(), o.clone()))
            }
            _ => None,
        };
        // A cache the disk cache knows (for our store dir) is not asked its
        // nix-cache-info again, as in Nix.
        if let Some((d, base, o)) = &disk {
            if let Some((id, info)) = d.cache_exists(base) {
                if info.store_dir.as_deref() == Some(expected) {
                    let secret_key = match &url.secret_key {
                        Some(f) => Some(SecretKey::read_file(f)?),
                        None => None,
                    };
                    return Ok(Self {
                        url: url.clone(),
                        info,
                        secret_key,
                        http,
                        disk: Some((d.clone(), id, o.clone())),
                    });
                }
            }
        }
        let info = match read_file(
            &url.location,
            http.as_ref(),
            "nix-cache-info",
            MAX_CACHE_INFO_SIZE,
        )? {
            Some(text) => CacheInfo::parse(&shown(&url.location, "nix-cache-info"), &text)?,
            None => CacheInfo {
                store_dir: None,
                want_mass_query: false,
                priority: None,
            },
        };
        if let Some(theirs) = &info.store_dir {
            if theirs != expected {
                return Err(CacheError::WrongStoreDir {
                    url: url.base.clone(),
                    theirs: theirs.clone(),
                    ours: expected.to_owned(),
                });
            }
        }
        let secret_key = match &url.secret_key {
            Some(f) => Some(SecretKey::read_file(f)?),
            None => None,
        };
        let disk = disk.and_then(|(d, base, o)| {
            let id = d.create_cache(&base, expected, &info)?;
            Some((d, id, o))
        });
        Ok(Self {
            url: url.clone(),
            info,
            secret_key,
            http,
            disk,
        })
    }

    /// The cache at `url` with `info` as its `nix-cache-info`, which is not read.
    pub fn with_info(
        url: &CacheUrl,
        info: CacheInfo,
        opts: &CacheOptions,
    ) -> Result<Self, CacheError> {
        let http = match &url.location {
            Location::Http(base) => Some(Http::new(base, &opts.http)?),
            Location::Dir(_) => None,
        };
        Ok(Self {
            url: url.clone(),
            info,
            secret_key: None,
            http,
            disk: None,
        })
    }

    /// Open the cache for writing: make its directories and its `nix-cache-info` if
    /// they are missing.
    pub fn create(url: &CacheUrl, sd: &StoreDir) -> Result<Self, CacheError> {
        let Location::Dir(dir) = &url.location else {
            return Err(CacheError::BadUrl {
                url: url.base.clone(),
                reason: "uploading to an HTTP binary cache is not supported".into(),
            });
        };
        for d in ["", "nar", "log", "realisations"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let info_file = dir.join("nix-cache-info");
        if !info_file.exists() {
            let cache = Self {
                url: url.clone(),
                info: CacheInfo::new(sd.as_str()),
                secret_key: None,
                http: None,
                disk: None,
            };
            cache.write_file("nix-cache-info", cache.info.to_text().as_bytes())?;
        }
        Self::open(url, sd, &CacheOptions::default())
    }

    /// The store directory of the cache's paths (`?store=`), if not the given one.
    pub fn foreign_store_dir(&self, ours: &StoreDir) -> Option<StoreDir> {
        let theirs = self.url.store.as_deref()?;
        if theirs == ours.as_str() {
            return None;
        }
        StoreDir::new(theirs).ok()
    }

    /// Priority: the URL's, else the cache's, else Nix's default of 50.
    pub fn priority(&self) -> u64 {
        self.url.priority.or(self.info.priority).unwrap_or(50)
    }

    fn narinfo_rel(p: &StorePath) -> String {
        format!("{}.narinfo", p.hash_part())
    }

    /// Whether the cache has a narinfo for `p` (an HTTP cache is asked for it).
    pub fn has(&self, p: &StorePath) -> bool {
        match &self.url.location {
            Location::Dir(d) => d.join(Self::narinfo_rel(p)).is_file(),
            Location::Http(_) => self
                .read(&Self::narinfo_rel(p), MAX_NARINFO_SIZE)
                .is_ok_and(|f| f.is_some()),
        }
    }

    /// The narinfo of `p`, or `None` when the cache does not have it. A narinfo that
    /// names another path is refused.
    pub fn query(&self, sd: &StoreDir, p: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        if let Some((d, id, o)) = &self.disk {
            match d.lookup(*id, p.hash_part(), o) {
                Lookup::Present(info) if info.path == *p => return Ok(Some(*info)),
                // Another name under that hash: not the path asked for (Nix's
                // `goodStorePath`).
                Lookup::Present(_) | Lookup::Absent => return Ok(None),
                Lookup::Unknown => {}
            }
        }
        let found = self.query_uncached(sd, p)?;
        if let Some((d, id, _)) = &self.disk {
            d.upsert(*id, p.hash_part(), found.as_ref());
        }
        Ok(found)
    }

    fn query_uncached(&self, sd: &StoreDir, p: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        let rel = Self::narinfo_rel(p);
        let Some(text) = self.read(&rel, MAX_NARINFO_SIZE)? else {
            return Ok(None);
        };
        let shown = shown(&self.url.location, &rel);
        let info = NarInfo::parse(sd, &shown, &text)?;
        if &info.path != p {
            return Err(CacheError::BadNarInfo {
                file: shown,
                msg: format!(
                    "it is about '{}', not '{}'",
                    sd.display(&info.path),
                    sd.display(p)
                ),
            });
        }
        Ok(Some(info))
    }

    /// The realisation `id` (Nix's `queryRealisation` on a binary cache:
    /// `realisations/<id>.doi`), or `None` when the cache has none.
    pub fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, CacheError> {
        let rel = format!("realisations/{id}.doi");
        let shown = shown(&self.url.location, &rel);
        let key = id.to_string();
        let cached = match &self.disk {
            Some((d, cache, o)) => d.lookup_realisation(*cache, &key, o),
            None => None,
        };
        let text = match cached {
            Some(None) => return Ok(None),
            Some(Some(json)) => json.into_bytes(),
            None => {
                let found = self.read(&rel, MAX_NARINFO_SIZE)?;
                if let Some((d, cache, _)) = &self.disk {
                    let json = found.as_deref().and_then(|t| std::str::from_utf8(t).ok());
                    if found.is_none() || json.is_some() {
                        d.upsert_realisation(*cache, &key, json);
                    }
                }
                match found {
                    Some(t) => t,
                    None => return Ok(None),
                }
            }
        };
        let text = String::from_utf8(text).map_err(|_| CacheError::BadRealisation {
            file: shown.clone(),
            msg: "it is not UTF-8".into(),
        })?;
        let r = Realisation::from_json(&text, &shown).map_err(|e| CacheError::BadRealisation {
            file: shown.clone(),
            msg: e.to_string(),
        })?;
        if &r.id != id {
            return Err(CacheError::BadRealisation {
                file: shown,
                msg: format!("it is about '{}', not '{id}'", r.id),
            });
        }
        Ok(Some(r))
    }

    /// The NAR of `info`, decompressed. Its `URL` must name a file inside the cache.
    pub fn open_nar<'a>(&self, info: &NarInfo) -> Result<Box<dyn Read + Send + 'a>, CacheError> {
        let outside = || CacheError::NarUrlOutsideCache {
            file: shown(&self.url.location, &Self::narinfo_rel(&info.path)),
            url: info.url.clone(),
        };
        let rel = Path::new(&info.url);
        // An HTTP cache may add a query (harmonia's `nar/….nar?hash=…`): the path before
        // it is what must stay inside the cache.
        let path_part = match &self.url.location {
            Location::Http(_) => info.url.split('?').next().unwrap_or(""),
            Location::Dir(_) => info.url.as_str(),
        };
        if info.url.contains("://")
            || info.url.contains('\0')
            || info.url.contains('\\')
            || info.url.contains('#')
            || path_part.is_empty()
            || Path::new(path_part)
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(outside());
        }
        let (input, file): (Box<dyn Read + Send + 'a>, String) = match &self.url.location {
            Location::Dir(dir) => {
                let file = dir.join(rel);
                let root = fs::canonicalize(dir).map_err(io_err(dir))?;
                let real = match fs::canonicalize(&file) {
                    Ok(real) if real.starts_with(&root) && real != root => real,
                    Ok(_) => return Err(outside()),
                    Err(e) => return Err(io_err(&file)(e)),
                };
                let f = fs::File::open(&real).map_err(io_err(&real))?;
                (
                    Box::new(std::io::BufReader::new(f)),
                    real.display().to_string(),
                )
            }
            Location::Http(base) => {
                let url = format!("{base}/{}", info.url);
                match self.client()?.get(&url)? {
                    Some(r) => (r, url),
                    None => {
                        return Err(CacheError::Io {
                            path: PathBuf::from(&url),
                            source: std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "the NAR is not in the cache",
                            ),
                        })
                    }
                }
            }
        };
        compression::decoder(&info.compression, input, &file)
    }

    /// The file `rel` of the cache (at most `limit` bytes), `None` if it has none.
    fn read(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, CacheError> {
        read_file(&self.url.location, self.http.as_ref(), rel, limit)
    }

    fn client(&self) -> Result<&Http, CacheError> {
        self.http.as_ref().ok_or_else(|| CacheError::BadUrl {
            url: self.url.base.clone(),
            reason: "not an HTTP binary cache".into(),
        })
    }

    /// Write `rel` atomically (temporary file in the same directory, then rename).
    pub fn write_file(&self, rel: &str, data: &[u8]) -> Result<(), CacheError> {
        let dest = self.dir()?.join(rel);
        let tmp = self.tmp_name(&dest);
        let r = (|| {
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(data).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, &dest).map_err(io_err(&dest))
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    /// A fresh temporary name beside `dest`.
    pub fn tmp_name(&self, dest: &Path) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut s = dest.as_os_str().to_owned();
        s.push(format!(".tmp.{}.{n}", std::process::id()));
        PathBuf::from(s)
    }

    /// The directory of a `file://` cache (the others cannot be written).
    pub fn dir(&self) -> Result<&Path, CacheError> {
        match &self.url.location {
            Location::Dir(d) => Ok(d),
            Location::Http(_) => Err(CacheError::BadUrl {
                url: self.url.base.clone(),
                reason: "uploading to an HTTP binary cache is not supported".into(),
            }),
        }
    }
}

/// The contents of `path`, `None` if it does not exist; more than `limit` bytes is an
/// error.
fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, CacheError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > limit {
        return Err(CacheError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes"),
            ),
        });
    }
    Ok(Some(buf))
}

/// How messages name the file `rel` of the cache at `loc`.
fn shown(loc: &Location, rel: &str) -> String {
    match loc {
        Location::Dir(d) => d.join(rel).display().to_string(),
        Location::Http(base) => format!("{base}/{rel}"),
    }
}

/// The file `rel` of the cache (at most `limit` bytes), `None` if it has none.
fn read_file(
    loc: &Location,
    http: Option<&Http>,
    rel: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, CacheError> {
    match (loc, http) {
        (Location::Dir(d), _) => read_limited(&d.join(rel), limit),
        (Location::Http(base), None) => Err(CacheError::BadUrl {
            url: base.clone(),
            reason: "opened without an HTTP client".into(),
        }),
        (Location::Http(base), Some(http)) => {
            let url = format!("{base}/{rel}");
            let Some(r) = http.get(&url)? else {
                return Ok(None);
            };
            let mut buf = Vec::new();
            r.take(limit + 1)
                .read_to_end(&mut buf)
                .map_err(io_err(&url))?;
            if buf.len() as u64 > limit {
                return Err(CacheError::Io {
                    path: PathBuf::from(url),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("larger than {limit} bytes"),
                    ),
                });
            }
            Ok(Some(buf))
        }
    }
}
