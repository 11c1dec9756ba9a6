//! The store database: SQLite with Nix 2.8's schema (version 10), so that real Nix reads
//! a store firn wrote and the other way round.
//!
//! Connection settings are Nix's: `foreign_keys = 1`, `synchronous = normal`, WAL with
//! `wal_autocheckpoint = 40000`, a one-hour busy timeout. Every write is one
//! `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two writers never
//! deadlock upgrading a read lock) and is retried whole if SQLite still reports busy.
//!
//! Column formats: `hash` is `sha256:<hex>`; `registrationTime` unix seconds; `deriver` a
//! full `.drv` path or NULL; `ultimate` 1 or NULL; `sigs` space-separated or NULL; `ca`
//! as Nix writes it (`text:sha256:<nixbase32>`, `fixed:[r:]<algo>:<nixbase32>`) or NULL.
//! Rows of one registration are inserted in store-path order, references after all
//! paths, as Nix does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use firn_derivation::{Hash, HashAlgo, StoreDir, StorePath};
use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use thiserror::Error;

mod closure;
mod realisations;
pub use realisations::{RealisationDbError, CA_SCHEMA, CA_SCHEMA_VERSION};

/// The schema, verbatim from Nix 2.8's `schema.sql` (SQLite keeps the comments).
pub const SCHEMA: &str = r#"create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to `on
-- delete restrict' on the `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"#;

/// The schema version this code reads and writes (`ROOT/nix/var/nix/db/schema`).
pub const SCHEMA_VERSION: u32 = 10;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database '{path}': {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("database row for '{path}' is malformed: {msg}")]
    BadRow { path: String, msg: String },
    #[error("cannot register '{path}': its reference '{reference}' is not valid")]
    InvalidReference { path: String, reference: String },
    #[error("cycle detected in the references of '{path}' from '{from}'")]
    Cycle { path: String, from: String },
    #[error("cannot delete path '{path}' since it is still referenced by '{referrer}'")]
    StillReferenced { path: String, referrer: String },
    #[error(transparent)]
    Realisation(Box<RealisationDbError>),
}

/// What the database knows about one valid path (`ValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    /// sha256 of the NAR serialisation.
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Unix seconds.
    pub registration_time: i64,
    /// Built locally (trusted without signatures).
    pub ultimate: bool,
    pub sigs: Vec<String>,
    /// Content-address assertion, as Nix writes it.
    pub ca: Option<String>,
}

/// A set of paths (sorted) with, for each, the indices of its references within the set
/// (sorted, without itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathGraph {
    pub paths: Vec<StorePath>,
    pub references: Vec<Vec<usize>>,
}

impl PathGraph {
    /// From each path's references (those outside the set are dropped).
    pub fn from_references(map: &BTreeMap<StorePath, BTreeSet<StorePath>>) -> Self {
        let paths: Vec<StorePath> = map.keys().cloned().collect();
        let references = map
            .values()
            .enumerate()
            .map(|(i, refs)| {
                refs.iter()
                    .filter_map(|r| paths.binary_search(r).ok())
                    .filter(|&j| j != i)
                    .collect()
            })
            .collect();
        Self { paths, references }
    }

    /// Nix's `topoSortPaths` order reversed, i.e. what `nix-store -q` prints: a post-order
    /// depth-first walk over the paths in order, references before referrers.
    pub fn topo_sorted(&self) -> Vec<&StorePath> {
        let mut visited = vec![false; self.paths.len()];
        let mut out = Vec::with_capacity(self.paths.len());
        for root in 0..self.paths.len() {
            if visited[root] {
                continue;
            }
            // Iterative: deep closures must not overflow the stack.
            visited[root] = true;
            let mut stack = vec![(root, 0usize)];
            while let Some((node, next)) = stack.last_mut() {
                let node = *node;
                let refs = &self.references[node];
                match refs[*next..].iter().position(|&c| !visited[c]) {
                    Some(k) => {
                        let child = refs[*next + k];
                        *next += k + 1;
                        visited[child] = true;
                        stack.push((child, 0));
                    }
                    None => {
                        out.push(&self.paths[node]);
                        stack.pop();
                    }
                }
            }
        }
        out
    }
}

/// A path to register, with the outputs it declares if it is a `.drv`.
#[derive(Debug, Clone)]
pub struct Registration {
    pub info: ValidPathInfo,
    /// `DerivationOutputs` rows: output name → output path.
    pub drv_outputs: BTreeMap<String, StorePath>,
}

/// An open store database.
#[derive(Debug)]
pub struct Database {
    conn: Connection,
    path: String,
    store_dir: StoreDir,
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

impl Database {
    /// Open (creating the schema if needed) the database at `path`.
    pub fn open(path: &Path, store_dir: StoreDir) -> Result<Self, DbError> {
        let shown = path.display().to_string();
        let wrap = |source| DbError::Sqlite {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(3600)).map_err(wrap)?;
        conn.execute_batch(
            "pragma foreign_keys = 1;
             pragma synchronous = normal;
             pragma wal_autocheckpoint = 40000;
             pragma cache_size = -65536;
             pragma mmap_size = 268435456;",
        )
        .map_err(wrap)?;
        let mode: String = conn
            .query_row("pragma journal_mode = wal", [], |r| r.get(0))
            .map_err(wrap)?;
        if mode != "wal" {
            return Err(wrap(rusqlite::Error::InvalidParameterName(format!(
                "cannot enable WAL journal mode (got '{mode}')"
            ))));
        }
        let mut db = Self {
            conn,
            path: shown,
            store_dir,
        };
        let path = db.path.clone();
        db.write(|tx| {
            tx.execute_batch(SCHEMA).map_err(|source| DbError::Sqlite {
                path: path.clone(),
                source,
            })
        })?;
        Ok(db)
    }

    fn err(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction (the write lock is taken at `BEGIN`,
    /// so no read-to-write upgrade can deadlock), retrying the whole transaction while
    /// SQLite reports the database busy beyond its busy timeout.
    fn write<T>(
        &mut self,
        mut f: impl FnMut(&Transaction<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let mut attempt = 0u32;
        loop {
            let tx = match self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
            {
                Ok(tx) => tx,
                Err(e) if is_busy(&e) && attempt < 1000 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(u64::from(attempt.min(50))));
                    continue;
                }
                Err(e) => {
                    return Err(DbError::Sqlite {
                        path: self.path.clone(),
                        source: e,
                    })
                }
            };
            let result = f(&tx).and_then(|v| {
                tx.commit().map_err(|e| DbError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
                Ok(v)
            });
            match result {
                Err(DbError::Sqlite { source, .. }) if is_busy(&source) && attempt < 1000 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(u64::from(attempt.min(50))));
                }
                other => return other,
            }
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn display(&self, p: &StorePath) -> String {
        self.store_dir.display(p)
    }

    fn parse_path(&self, s: &str) -> Result<StorePath, DbError> {
        self.store_dir.parse(s).map_err(|e| DbError::BadRow {
            path: s.to_owned(),
            msg: e.to_string(),
        })
    }

    /// Register `regs` as valid in one transaction (`registerValidPaths`): every
    /// reference must be valid already or be in the set; paths already valid get their
    /// info updated; cycles between different paths are rejected.
    pub fn register_valid_paths(&mut self, regs: &[Registration]) -> Result<(), DbError> {
        let in_set: HashMap<&StorePath, &Registration> =
            regs.iter().map(|r| (&r.info.path, r)).collect();
        // Cycle check (self-references are fine) by depth-first search within the set.
        topo_sort(regs, &|p| self.display(p))?;
        let mut sorted: Vec<&Registration> = regs.iter().collect();
        sorted.sort_by(|a, b| a.info.path.cmp(&b.info.path));
        let sd = self.store_dir.clone();
        self.write(|tx| {
            for r in &sorted {
                for reference in &r.info.references {
                    if !in_set.contains_key(reference) && path_id(tx, &sd, reference)?.is_none() {
                        return Err(DbError::InvalidReference {
                            path: sd.display(&r.info.path),
                            reference: sd.display(reference),
                        });
                    }
                }
            }
            let err = |source| DbError::Sqlite { path: String::new(), source };
            for r in &sorted {
                let i = &r.info;
                let hash = format!("sha256:{}", i.nar_hash.to_base16());
                let deriver = i.deriver.as_ref().map(|d| sd.display(d));
                let ultimate = i.ultimate.then_some(1);
                let sigs = (!i.sigs.is_empty()).then(|| i.sigs.join(" "));
                let path = sd.display(&i.path);
                let existing = path_id(tx, &sd, &i.path)?;
                if existing.is_some() {
                    tx.prepare_cached(
                        "update ValidPaths set narSize = ?, hash = ?, ultimate = ?, sigs = ?, ca = ? where path = ?",
                    )
                    .and_then(|mut st| st.execute(params![i.nar_size as i64, hash, ultimate, sigs, i.ca, path]))
                    .map_err(err)?;
                } else {
                    tx.prepare_cached(
                        "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .and_then(|mut st| st.execute(params![path, hash, i.registration_time, deriver, i.nar_size as i64, ultimate, sigs, i.ca]))
                    .map_err(err)?;
                }
                if !r.drv_outputs.is_empty() {
                    let id = path_id(tx, &sd, &i.path)?.unwrap_or_default();
                    for (name, out) in &r.drv_outputs {
                        tx.prepare_cached(
                            "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
                        )
                        .and_then(|mut st| st.execute(params![id, name, sd.display(out)]))
                        .map_err(err)?;
                    }
                }
            }
            for r in &sorted {
                let referrer = path_id(tx, &sd, &r.info.path)?.unwrap_or_default();
                for reference in &r.info.references {
                    let reference = path_id(tx, &sd, reference)?.unwrap_or_default();
                    tx.prepare_cached(
                        "insert or replace into Refs (referrer, reference) values (?, ?)",
                    )
                    .and_then(|mut st| st.execute(params![referrer, reference]))
                    .map_err(err)?;
                }
            }
            Ok(())
        })
        .map_err(|e| match e {
            DbError::Sqlite { source, .. } => self.err(source),
            other => other,
        })
    }

    pub fn is_valid_path(&self, path: &StorePath) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("select 1 from ValidPaths where path = ?")
            .and_then(|mut s| s.query_row([self.display(path)], |_| Ok(())))
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.err(e))
    }

    /// Everything known about `path`, or `None` if it is not valid.
    pub fn query_path_info(&self, path: &StorePath) -> Result<Option<ValidPathInfo>, DbError> {
        let full = self.display(path);
        let row = self
            .conn
            .prepare_cached(
                "select id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca from ValidPaths where path = ?",
            )
            .and_then(|mut s| {
                s.query_row([&full], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                    ))
                })
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((id, hash, time, deriver, size, ultimate, sigs, ca)) = row else {
            return Ok(None);
        };
        let bad = |msg: String| DbError::BadRow {
            path: full.clone(),
            msg,
        };
        let nar_hash = Hash::parse_any(&hash, Some(HashAlgo::Sha256))
            .map_err(|e| bad(format!("hash column: {e}")))?;
        let deriver = match deriver {
            Some(d) if !d.is_empty() => Some(self.parse_path(&d)?),
            _ => None,
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "select path from Refs join ValidPaths on reference = id where referrer = ?",
            )
            .map_err(|e| self.err(e))?;
        let refs = stmt
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut references = BTreeSet::new();
        for r in refs {
            references.insert(self.parse_path(&r.map_err(|e| self.err(e))?)?);
        }
        Ok(Some(ValidPathInfo {
            path: path.clone(),
            nar_hash,
            nar_size: size.unwrap_or(0).max(0) as u64,
            references,
            deriver,
            registration_time: time,
            ultimate: ultimate.unwrap_or(0) != 0,
            sigs: sigs
                .map(|s| {
                    s.split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            ca,
        }))
    }

    fn paths_of(&self, sql: &str, arg: &str) -> Result<BTreeSet<StorePath>, DbError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([arg], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = BTreeSet::new();
        for r in rows {
            out.insert(self.parse_path(&r.map_err(|e| self.err(e))?)?);
        }
        Ok(out)
    }

    pub fn query_references(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, DbError> {
        self.paths_of(
            "select v2.path from ValidPaths v1 join Refs on v1.id = referrer join ValidPaths v2 on reference = v2.id where v1.path = ?",
            &self.display(path),
        )
    }

    pub fn query_referrers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, DbError> {
        self.paths_of(
            "select v1.path from ValidPaths v1 join Refs on v1.id = referrer join ValidPaths v2 on reference = v2.id where v2.path = ?",
            &self.display(path),
        )
    }

    /// The `.drv`s that are valid and declare `path` as an output.
    pub fn query_valid_derivers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, DbError> {
        self.paths_of(
            "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where d.path = ?",
            &self.display(path),
        )
    }

    /// The `DerivationOutputs` rows of a valid `.drv`.
    pub fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "select d.id, d.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where v.path = ?",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([self.display(drv)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (name, p) = r.map_err(|e| self.err(e))?;
            out.insert(name, self.parse_path(&p)?);
        }
        Ok(out)
    }

    /// Every valid path.
    pub fn query_all_valid_paths(&self) -> Result<BTreeSet<StorePath>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("select path from ValidPaths")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = BTreeSet::new();
        for r in rows {
            out.insert(self.parse_path(&r.map_err(|e| self.err(e))?)?);
        }
        Ok(out)
    }

    /// Replace the recorded narHash/narSize of a valid path (`verify --repair` of a
    /// NULL or zero hash, as Nix does).
    pub fn update_nar_hash(
        &mut self,
        path: &StorePath,
        hash: &Hash,
        size: u64,
    ) -> Result<(), DbError> {
        let full = self.display(path);
        let hash = format!("sha256:{}", hash.to_base16());
        self.write(|tx| {
            tx.execute(
                "update ValidPaths set hash = ?, narSize = ? where path = ?",
                params![hash, size as i64, full],
            )
            .map_err(|source| DbError::Sqlite {
                path: String::new(),
                source,
            })?;
            Ok(())
        })
    }

    /// The valid path whose hash part is `hash_part` (`queryPathFromHashPart`), if any.
    pub fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, DbError> {
        let prefix = format!("{}/{hash_part}", self.store_dir.as_str());
        let found: Option<String> = self
            .conn
            .query_row(
                "select path from ValidPaths where path >= ? limit 1",
                [&prefix],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        match found {
            Some(p) if p.starts_with(&prefix) && p.as_bytes().get(prefix.len()) == Some(&b'-') => {
                Ok(Some(self.parse_path(&p)?))
            }
            _ => Ok(None),
        }
    }

    /// Add `sigs` to the signatures of the valid path `path` (those it has already are
    /// not repeated, as Nix's `addSignatures`); returns how many were new.
    pub fn add_signatures(&mut self, path: &StorePath, sigs: &[String]) -> Result<usize, DbError> {
        let full = self.display(path);
        let Some(info) = self.query_path_info(path)? else {
            return Ok(0);
        };
        let mut all = info.sigs;
        let before = all.len();
        for s in sigs {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        let added = all.len() - before;
        if added == 0 {
            return Ok(0);
        }
        let joined = all.join(" ");
        self.write(|tx| {
            tx.execute(
                "update ValidPaths set sigs = ? where path = ?",
                params![joined, full],
            )
            .map_err(|source| DbError::Sqlite {
                path: String::new(),
                source,
            })?;
            Ok(())
        })?;
        Ok(added)
    }

    /// Forget `paths` (they must have no referrers outside the set).
    pub fn invalidate_paths(&mut self, paths: &BTreeSet<StorePath>) -> Result<(), DbError> {
        let sd = self.store_dir.clone();
        self.write(|tx| {
            let err = |source| DbError::Sqlite { path: String::new(), source };
            for p in paths {
                let mut stmt = tx
                    .prepare_cached(
                        "select v1.path from ValidPaths v1 join Refs on v1.id = referrer join ValidPaths v2 on reference = v2.id where v2.path = ? and v1.id != v2.id",
                    )
                    .map_err(err)?;
                let referrers: Vec<String> = stmt
                    .query_map([sd.display(p)], |r| r.get(0))
                    .map_err(err)?
                    .collect::<Result<_, _>>()
                    .map_err(err)?;
                if let Some(r) = referrers
                    .into_iter()
                    .find(|r| sd.parse(r).map(|r| !paths.contains(&r)).unwrap_or(true))
                {
                    return Err(DbError::StillReferenced {
                        path: sd.display(p),
                        referrer: r,
                    });
                }
            }
            // Drop references among the set first, then the rows.
            for p in paths {
                tx.execute(
                    "delete from Refs where referrer = (select id from ValidPaths where path = ?)",
                    [sd.display(p)],
                )
                .map_err(err)?;
            }
            for p in paths {
                tx.execute("delete from ValidPaths where path = ?", [sd.display(p)])
                    .map_err(err)?;
            }
            Ok(())
        })
        .map_err(|e| match e {
            DbError::Sqlite { source, .. } => self.err(source),
            other => other,
        })
    }
}

fn path_id(tx: &Transaction<'_>, sd: &StoreDir, p: &StorePath) -> Result<Option<i64>, DbError> {
    tx.prepare_cached("select id from ValidPaths where path = ?")
        .and_then(|mut s| s.query_row([sd.display(p)], |r| r.get(0)).optional())
        .map_err(|source| DbError::Sqlite {
            path: String::new(),
            source,
        })
}

/// Order `regs` so that references come before their referrers; a cycle between two
/// different paths is an error (Nix's `topoSortPaths`).
pub fn topo_sort<'r>(
    regs: &'r [Registration],
    display: &dyn Fn(&StorePath) -> String,
) -> Result<Vec<&'r Registration>, DbError> {
    let by_path: HashMap<&StorePath, &Registration> =
        regs.iter().map(|r| (&r.info.path, r)).collect();
    let mut done: BTreeSet<&StorePath> = BTreeSet::new();
    let mut out = Vec::with_capacity(regs.len());
    for r in regs {
        // Iterative DFS with an explicit stack of (path, parent, children visited).
        let mut visiting: Vec<&StorePath> = Vec::new();
        let mut stack: Vec<(&StorePath, Option<&StorePath>, bool)> =
            vec![(&r.info.path, None, false)];
        while let Some((p, parent, expanded)) = stack.pop() {
            if expanded {
                visiting.retain(|v| *v != p);
                if done.insert(p) {
                    out.push(by_path[p]);
                }
                continue;
            }
            if done.contains(p) {
                continue;
            }
            if visiting.contains(&p) {
                return Err(DbError::Cycle {
                    path: display(p),
                    from: parent.map(display).unwrap_or_default(),
                });
            }
            visiting.push(p);
            stack.push((p, parent, true));
            for reference in &by_path[p].info.references {
                if reference != p && by_path.contains_key(reference) && !done.contains(reference) {
                    stack.push((reference, Some(p), false));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdb(tag: &str) -> (std::path::PathBuf, Database) {
        let dir = std::env::temp_dir().join(format!("firn-db-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::open(&dir.join("db.sqlite"), StoreDir::default()).unwrap();
        (dir, db)
    }

    fn sp(s: &str) -> StorePath {
        StoreDir::default()
            .parse(&format!("/nix/store/{s}"))
            .unwrap()
    }

    fn info(path: &str, refs: &[&str]) -> Registration {
        Registration {
            info: ValidPathInfo {
                path: sp(path),
                nar_hash: Hash::sha256(path.as_bytes()),
                nar_size: 120,
                references: refs.iter().map(|r| sp(r)).collect(),
                deriver: None,
                registration_time: 1,
                ultimate: false,
                sigs: vec![],
                ca: None,
            },
            drv_outputs: BTreeMap::new(),
        }
    }

    const A: &str = "0hk42s8j7kqg82l6ncz33d8xx332vz9f-a";
    const B: &str = "1hk42s8j7kqg82l6ncz33d8xx332vz9f-b";
    const C: &str = "2hk42s8j7kqg82l6ncz33d8xx332vz9f-c";

    /// `sqlite3 .schema` of a database made by Nix 2.8 (nix-2.8-vectors/db-schema.sql).
    #[test]
    fn schema_is_nixs() {
        let (dir, db) = tmpdb("schema");
        let mut stmt = db
            .conn
            .prepare("select sql from sqlite_master where sql is not null order by rowid")
            .unwrap();
        let ours: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|r| format!("{};", r.unwrap()))
            .collect();
        let nix = include_str!("../../../fixtures/nix-2.8-vectors/db-schema.sql");
        assert_eq!(ours.join("\n"), nix.trim_end());
        let mode: String = db
            .conn
            .query_row("pragma journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A closure's graph is the same whichever way its members are read: one lookup per
    /// member (a small part of the store) or one pass over each table (a large part).
    #[test]
    fn closure_graph_of_a_small_and_a_large_part_of_the_store() {
        let (dir, mut db) = tmpdb("graph");
        // C references B and A, B references A and itself; 40 unrelated paths make the
        // closure of B (2 paths) a small part of the store.
        let others: Vec<String> = (0..40)
            .map(|i| format!("{:02}k42s8j7kqg82l6ncz33d8xx332vz9f-other", 10 + i))
            .collect();
        let mut regs = vec![info(C, &[B, A]), info(B, &[A, B]), info(A, &[])];
        regs.extend(others.iter().map(|o| info(o, &[])));
        db.register_valid_paths(&regs).unwrap();
        let small = db.query_closure_graph(&[sp(B)], false).unwrap();
        assert_eq!(small.paths, [sp(A), sp(B)]);
        assert_eq!(small.references, [vec![], vec![0]]);
        let referrers = db.query_closure_graph(&[sp(A)], true).unwrap();
        assert_eq!(referrers.paths, [sp(A), sp(B), sp(C)]);
        assert_eq!(referrers.references, [vec![], vec![0], vec![0, 1]]);
        // Most of the store: the closure of every path.
        let all: Vec<StorePath> = regs.iter().map(|r| r.info.path.clone()).collect();
        let large = db.query_closure_graph(&all, false).unwrap();
        assert_eq!(large.paths.len(), 43);
        let at = |p: &str| large.paths.iter().position(|x| *x == sp(p)).unwrap();
        assert_eq!(large.references[at(C)], {
            let mut r = vec![at(A), at(B)];
            r.sort_unstable();
            r
        });
        assert_eq!(large.references[at(B)], [at(A)]);
        assert!(large.references[at(A)].is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A closure (both ways) and its graph are what a plain breadth-first walk over the
    /// registered references gives, whether the walk stays on lookups (small closures),
    /// reads the whole `Refs` table part-way (more than an eighth of the store), or
    /// starts from paths that are not valid.
    #[test]
    fn closures_match_a_plain_walk() {
        use proptest::prelude::*;
        let graphs = (1usize..50).prop_flat_map(|n| {
            (
                // Each path's references among the paths before it, or itself.
                proptest::collection::vec(proptest::collection::vec(0usize..n, 0..4), n),
                proptest::collection::vec(0usize..n + 2, 1..4),
            )
        });
        let case = std::cell::Cell::new(0);
        proptest!(ProptestConfig::with_cases(40), |((refs, roots) in graphs)| {
            case.set(case.get() + 1);
            let n = refs.len();
            let name = |i: usize| format!("{i:032}-p{i}");
            let edges: Vec<Vec<usize>> = refs
                .iter()
                .enumerate()
                .map(|(i, r)| r.iter().copied().filter(|&j| j <= i).collect())
                .collect();
            let (dir, mut db) = tmpdb(&format!("walk{}", case.get()));
            let regs: Vec<Registration> = (0..n)
                .map(|i| {
                    let names: Vec<String> = edges[i].iter().map(|&j| name(j)).collect();
                    info(&name(i), &names.iter().map(String::as_str).collect::<Vec<_>>())
                })
                .collect();
            db.register_valid_paths(&regs).unwrap();
            // Roots n and n + 1 are not valid.
            let root_paths: Vec<StorePath> = roots.iter().map(|&r| sp(&name(r))).collect();
            for referrers in [false, true] {
                let mut seen: BTreeSet<usize> = roots.iter().copied().filter(|&r| r < n).collect();
                let mut todo: Vec<usize> = seen.iter().copied().collect();
                while let Some(i) = todo.pop() {
                    let next: Vec<usize> = if referrers {
                        (0..n).filter(|&k| edges[k].contains(&i)).collect()
                    } else {
                        edges[i].clone()
                    };
                    for j in next {
                        if seen.insert(j) {
                            todo.push(j);
                        }
                    }
                }
                let expected: BTreeSet<StorePath> = seen.iter().map(|&i| sp(&name(i))).collect();
                prop_assert_eq!(&db.query_closure(&root_paths, referrers).unwrap(), &expected);
                let graph = db.query_closure_graph(&root_paths, referrers).unwrap();
                prop_assert_eq!(graph.paths.iter().cloned().collect::<BTreeSet<_>>(), expected);
                for (at, p) in graph.paths.iter().enumerate() {
                    let i: usize = p.name()[1..].parse().unwrap();
                    // Its references within the closure (all of them, going down).
                    let want: BTreeSet<StorePath> = edges[i]
                        .iter()
                        .filter(|&&j| j != i && seen.contains(&j))
                        .map(|&j| sp(&name(j)))
                        .collect();
                    let got: BTreeSet<StorePath> =
                        graph.references[at].iter().map(|&k| graph.paths[k].clone()).collect();
                    prop_assert_eq!(got, want);
                }
            }
            std::fs::remove_dir_all(dir).unwrap();
        });
    }

    #[test]
    fn register_and_query() {
        let (dir, mut db) = tmpdb("reg");
        // C references B references A; A references itself.
        db.register_valid_paths(&[info(C, &[B]), info(B, &[A]), info(A, &[A])])
            .unwrap();
        assert!(db.is_valid_path(&sp(A)).unwrap());
        assert_eq!(db.query_references(&sp(B)).unwrap(), [sp(A)].into());
        assert_eq!(db.query_referrers(&sp(A)).unwrap(), [sp(A), sp(B)].into());
        assert_eq!(
            db.query_closure(&[sp(C)], false).unwrap(),
            [sp(A), sp(B), sp(C)].into()
        );
        assert_eq!(
            db.query_closure(&[sp(A)], true).unwrap(),
            [sp(A), sp(B), sp(C)].into()
        );
        let i = db.query_path_info(&sp(A)).unwrap().unwrap();
        assert_eq!(i.nar_hash, Hash::sha256(A.as_bytes()));
        assert_eq!(i.references, [sp(A)].into());
        // Deleting A is refused while B refers to it; deleting all three works.
        let e = db.invalidate_paths(&[sp(A)].into()).unwrap_err();
        assert!(matches!(e, DbError::StillReferenced { .. }), "{e}");
        db.invalidate_paths(&[sp(A), sp(B), sp(C)].into()).unwrap();
        assert!(db.query_all_valid_paths().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_invalid_references_and_cycles_atomically() {
        let (dir, mut db) = tmpdb("bad");
        let e = db.register_valid_paths(&[info(B, &[A])]).unwrap_err();
        assert!(matches!(e, DbError::InvalidReference { .. }), "{e}");
        let e = db
            .register_valid_paths(&[info(A, &[B]), info(B, &[A])])
            .unwrap_err();
        assert!(matches!(e, DbError::Cycle { .. }), "{e}");
        // Nothing of either attempt was written.
        assert!(db.query_all_valid_paths().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn topo_sort_puts_references_first() {
        let regs = [info(C, &[B]), info(A, &[]), info(B, &[A])];
        let order: Vec<String> = topo_sort(&regs, &|p| p.to_string())
            .unwrap()
            .iter()
            .map(|r| r.info.path.name().to_owned())
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
    }
}
