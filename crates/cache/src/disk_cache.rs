//! Nix's narinfo disk cache, shared with Nix: `$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`
//! (else `$HOME/.cache/nix/…`), in Nix 2.8's schema (`nar-info-disk-cache.cc`), so that a
//! user running both asks a cache once for either.
//!
//! As in Nix it serves HTTP(S) caches only (a `file://` cache is read directly):
//! - `BinaryCaches`: one row per cache URL (without parameters or trailing `/`) with its
//!   `nix-cache-info` (store dir, `WantMassQuery`, `Priority`, 0 when not given, as Nix
//!   writes it); once there, `nix-cache-info` is not fetched again (Nix 2.8 has no TTL
//!   for it);
//! - `NARs`: per (cache, hash part) a narinfo (`present = 1`) or its absence
//!   (`present = 0`), each with the time it was learnt; a positive entry counts for
//!   `narinfo-cache-positive-ttl` seconds (default 30 days), a negative one for
//!   `narinfo-cache-negative-ttl` (default 1 hour). The columns hold what Nix writes:
//!   hashes as `sha256:<nixbase32>`, references as base names joined by spaces, the
//!   deriver's base name or NULL, signatures joined by spaces, `ca` or `''`, `fileHash`
//!   and `fileSize` NULL when unknown;
//! - `Realisations`, `LastPurge`: created as Nix does; entries past the TTLs (at least
//!   an hour / 30 days) are deleted once a day when the cache is opened.
//!
//! The database is a cache: it is opened with Nix's pragmas (`synchronous = off`,
//! `journal_mode = truncate`) and waited on when locked; if it cannot be opened or
//! written, firn goes on without it (a cache must never make a substitution fail).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use firn_derivation::{Hash, StorePath};
use rusqlite::{params, Connection, OptionalExtension};

use crate::cache_info::CacheInfo;
use crate::narinfo::NarInfo;

/// Nix 2.8's schema, statement for statement.
const SCHEMA: &str = r#"
create table if not exists BinaryCaches (
    id        integer primary key autoincrement not null,
    url       text unique not null,
    timestamp integer not null,
    storeDir  text not null,
    wantMassQuery integer not null,
    priority  integer not null
);

create table if not exists NARs (
    cache            integer not null,
    hashPart         text not null,
    namePart         text,
    url              text,
    compression      text,
    fileHash         text,
    fileSize         integer,
    narHash          text,
    narSize          integer,
    refs             text,
    deriver          text,
    sigs             text,
    ca               text,
    timestamp        integer not null,
    present          integer not null,
    primary key (cache, hashPart),
    foreign key (cache) references BinaryCaches(id) on delete cascade
);

create table if not exists Realisations (
    cache integer not null,
    outputId text not null,
    content blob, -- Json serialisation of the realisation, or null if the realisation is absent
    timestamp        integer not null,
    primary key (cache, outputId),
    foreign key (cache) references BinaryCaches(id) on delete cascade
);

create table if not exists LastPurge (
    dummy            text primary key,
    value            integer
);
"#;

/// How often expired entries are deleted (Nix's `purgeInterval`).
const PURGE_INTERVAL: i64 = 24 * 3600;

/// Where the disk cache is and how long its entries count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCacheOptions {
    /// The database file.
    pub file: PathBuf,
    /// `narinfo-cache-positive-ttl`, seconds.
    pub positive_ttl: u64,
    /// `narinfo-cache-negative-ttl`, seconds.
    pub negative_ttl: u64,
}

impl DiskCacheOptions {
    /// Nix's file (`$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`, else under
    /// `$HOME/.cache`) with the given TTLs; `None` when neither variable is set.
    pub fn nix_default(positive_ttl: u64, negative_ttl: u64) -> Option<Self> {
        let dir = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache")
            }
        };
        Some(Self {
            file: dir.join("nix").join("binary-cache-v6.sqlite"),
            positive_ttl,
            negative_ttl,
        })
    }
}

/// What the disk cache knows of a narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Nothing (or only an expired entry): ask the cache.
    Unknown,
    /// The cache did not have it.
    Absent,
    Present(Box<NarInfo>),
}

/// An opened disk cache (one per file and process, see [`DiskCache::shared`]).
#[derive(Debug)]
pub struct DiskCache {
    db: Mutex<Connection>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn ttl(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX / 2)
}

impl DiskCache {
    /// The disk cache in `file`, opened once per process; `None` if it cannot be.
    pub fn shared(file: &Path, opts: &DiskCacheOptions) -> Option<Arc<Self>> {
        static OPEN: OnceLock<Mutex<HashMap<PathBuf, Arc<DiskCache>>>> = OnceLock::new();
        let mut open = OPEN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.get(file) {
            return Some(c.clone());
        }
        let c = Arc::new(Self::open(file, opts).ok()?);
        open.insert(file.to_path_buf(), c.clone());
        Some(c)
    }

    /// Open (creating) the database `file`, with Nix's schema and pragmas, and purge
    /// expired entries if the last purge was a day ago.
    pub fn open(file: &Path, opts: &DiskCacheOptions) -> rusqlite::Result<Self> {
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Connection::open(file)?;
        db.busy_timeout(Duration::from_secs(3600))?;
        db.execute_batch("pragma synchronous = off; pragma main.journal_mode = truncate;")?;
        db.execute_batch(SCHEMA)?;
        let t = now();
        let last: Option<i64> = db
            .query_row("select value from LastPurge", [], |r| r.get(0))
            .optional()?;
        if last.is_none_or(|l| l < t - PURGE_INTERVAL) {
            db.execute(
                "delete from NARs where ((present = 0 and timestamp < ?) or (present = 1 and timestamp < ?))",
                params![
                    t - ttl(opts.negative_ttl.max(3600)),
                    t - ttl(opts.positive_ttl.max(30 * 24 * 3600))
                ],
            )?;
            db.execute(
                "insert or replace into LastPurge(dummy, value) values ('', ?)",
                params![t],
            )?;
        }
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The row of the cache `url`: its id and its `nix-cache-info`.
    pub fn cache_exists(&self, url: &str) -> Option<(i64, CacheInfo)> {
        self.db()
            .query_row(
                "select id, storeDir, wantMassQuery, priority from BinaryCaches where url = ?",
                params![url],
                |r| {
                    let priority: i64 = r.get(3)?;
                    Ok((
                        r.get(0)?,
                        CacheInfo {
                            store_dir: Some(r.get(1)?),
                            want_mass_query: r.get::<_, i64>(2)? != 0,
                            priority: u64::try_from(priority).ok().filter(|p| *p != 0),
                        },
                    ))
                },
            )
            .ok()
    }

    /// Record the cache `url` (as Nix's `createCache`); its id.
    pub fn create_cache(&self, url: &str, store_dir: &str, info: &CacheInfo) -> Option<i64> {
        let db = self.db();
        db.execute(
            "insert or replace into BinaryCaches(url, timestamp, storeDir, wantMassQuery, priority) values (?, ?, ?, ?, ?)",
            params![
                url,
                now(),
                store_dir,
                info.want_mass_query as i64,
                info.priority.map_or(0, |p| i64::try_from(p).unwrap_or(i64::MAX))
            ],
        )
        .ok()?;
        Some(db.last_insert_rowid())
    }

    /// What is known of the narinfo of `hash_part` in the cache `id`, within the TTLs.
    pub fn lookup(&self, id: i64, hash_part: &str, opts: &DiskCacheOptions) -> Lookup {
        let t = now();
        let db = self.db();
        let row = db
            .query_row(
                "select present, namePart, url, compression, fileHash, fileSize, narHash, narSize, refs, deriver, sigs, ca from NARs where cache = ? and hashPart = ? and ((present = 0 and timestamp > ?) or (present = 1 and timestamp > ?))",
                params![
                    id,
                    hash_part,
                    t.saturating_sub(ttl(opts.negative_ttl)),
                    t.saturating_sub(ttl(opts.positive_ttl))
                ],
                |r| {
                    if r.get::<_, i64>(0)? == 0 {
                        return Ok(None);
                    }
                    Ok(Some((
                        r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                        r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        r.get::<_, Option<i64>>(7)?.unwrap_or(0),
                        r.get::<_, Option<String>>(8)?.unwrap_or_default(),
                        r.get::<_, Option<String>>(9)?,
                        r.get::<_, Option<String>>(10)?.unwrap_or_default(),
                        r.get::<_, Option<String>>(11)?.unwrap_or_default(),
                    )))
                },
            )
            .optional();
        let row = match row {
            Ok(Some(Some(row))) => row,
            Ok(Some(None)) => return Lookup::Absent,
            Ok(None) | Err(_) => return Lookup::Unknown,
        };
        let (
            name,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            refs,
            deriver,
            sigs,
            ca,
        ) = row;
        // An entry firn cannot read (another version's, damaged) is as none.
        let parsed = (|| -> Option<NarInfo> {
            let path = StorePath::from_base_name(format!("{hash_part}-{name}").as_bytes()).ok()?;
            let references = refs
                .split(' ')
                .filter(|r| !r.is_empty())
                .map(|r| StorePath::from_base_name(r.as_bytes()).ok())
                .collect::<Option<_>>()?;
            let deriver = match deriver.filter(|d| !d.is_empty()) {
                Some(d) => Some(StorePath::from_base_name(d.as_bytes()).ok()?),
                None => None,
            };
            let file_hash = match file_hash.filter(|h| !h.is_empty()) {
                Some(h) => Some(Hash::parse_any(&h, None).ok()?),
                None => None,
            };
            Some(NarInfo {
                path,
                url,
                compression,
                file_hash,
                file_size: file_size
                    .and_then(|s| u64::try_from(s).ok())
                    .filter(|s| *s != 0),
                nar_hash: Hash::parse_any(&nar_hash, None).ok()?,
                nar_size: u64::try_from(nar_size).ok().filter(|s| *s != 0)?,
                references,
                deriver,
                system: None,
                sigs: sigs
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                ca: (!ca.is_empty()).then_some(ca),
            })
        })();
        parsed.map_or(Lookup::Unknown, |i| Lookup::Present(Box::new(i)))
    }

    /// Record what the cache `id` said of `hash_part`: its narinfo, or (`None`) that it
    /// has none (Nix's `upsertNarInfo`).
    pub fn upsert(&self, id: i64, hash_part: &str, info: Option<&NarInfo>) {
        let db = self.db();
        let _ = match info {
            Some(i) => {
                let refs: Vec<&str> = i.references.iter().map(StorePath::base_name).collect();
                db.execute(
                    "insert or replace into NARs(cache, hashPart, namePart, url, compression, fileHash, fileSize, narHash, narSize, refs, deriver, sigs, ca, timestamp, present) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                    params![
                        id,
                        hash_part,
                        i.path.name(),
                        i.url,
                        i.compression,
                        i.file_hash.as_ref().map(|h| h.to_string()),
                        i.file_size.filter(|s| *s != 0).map(|s| s as i64),
                        i.nar_hash.to_string(),
                        i.nar_size as i64,
                        refs.join(" "),
                        i.deriver.as_ref().map(|d| d.base_name().to_owned()),
                        i.sigs.join(" "),
                        i.ca.clone().unwrap_or_default(),
                        now(),
                    ],
                )
            }
            None => db.execute(
                "insert or replace into NARs(cache, hashPart, timestamp, present) values (?, ?, ?, 0)",
                params![id, hash_part, now()],
            ),
        };
    }

    /// What is known of the realisation `id` (its JSON) in the cache `cache`.
    pub fn lookup_realisation(
        &self,
        cache: i64,
        id: &str,
        opts: &DiskCacheOptions,
    ) -> Option<Option<String>> {
        let t = now();
        self.db()
            .query_row(
                "select content from Realisations where cache = ? and outputId = ? and ((content is null and timestamp > ?) or (content is not null and timestamp > ?))",
                params![
                    cache,
                    id,
                    t.saturating_sub(ttl(opts.negative_ttl)),
                    t.saturating_sub(ttl(opts.positive_ttl))
                ],
                |r| r.get::<_, Option<String>>(0),
            )
            .ok()
    }

    /// Record the realisation `id` of the cache `cache`: its JSON, or (`None`) that the
    /// cache has none (Nix's `upsertRealisation` / `upsertAbsentRealisation`).
    pub fn upsert_realisation(&self, cache: i64, id: &str, json: Option<&str>) {
        let _ = self.db().execute(
            "insert or replace into Realisations(cache, outputId, content, timestamp) values (?, ?, ?, ?)",
            params![cache, id, json, now()],
        );
    }
}
