//! The `Realisations` and `RealisationsRefs` tables of content-addressed derivations
//! (Nix 2.8's `ca-specific-schema.sql`, made only when `ca-derivations` is enabled, at
//! ca-schema version 3 — the `ca-schema` file beside `schema`), and the queries Nix's
//! `LocalStore` runs on them (`registerDrvOutput`, `queryRealisation`).
//!
//! Rows: `drvPath` holds the `DrvOutput`'s hash (`sha256:<hex>`, not a path),
//! `outputName` the output, `outputPath` the `ValidPaths` id of the output path (so a
//! realisation goes when its path is deleted), `signatures` space-separated or NULL
//! (Nix writes `""` when there are none).

use std::collections::BTreeMap;
use std::path::Path;

use firn_derivation::{DrvOutput, Realisation};
use rusqlite::{params, OptionalExtension};

use super::{Database, DbError};

/// `ca-specific-schema.sql`, verbatim from Nix 2.8.
pub const CA_SCHEMA: &str = r#"-- Extension of the sql schema for content-addressed derivations.
-- Won't be loaded unless the experimental feature `ca-derivations`
-- is enabled

create table if not exists Realisations (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null, -- symbolic output id, usually "out"
    outputPath integer not null,
    signatures text, -- space-separated list
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);

create index if not exists IndexRealisations on Realisations(drvPath, outputName);

create table if not exists RealisationsRefs (
    referrer integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);

-- used by QueryRealisationReferences
create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer);
-- used by cascade deletion when ValidPaths is deleted
create index if not exists IndexRealisationsRefsOnOutputPath on Realisations(outputPath);
"#;

/// The ca-schema version Nix 2.8 writes.
pub const CA_SCHEMA_VERSION: u32 = 3;

/// Why a realisation could not be registered (Nix's messages).
#[derive(Debug, thiserror::Error)]
pub enum RealisationDbError {
    #[error(
        "Trying to register a realisation of '{id}', but we already have another one \
         locally. Local: {local} Remote: {remote}"
    )]
    Conflict {
        id: String,
        local: String,
        remote: String,
    },
    #[error("unable to register the derivation '{id}' as it depends on the non existent '{dep}'")]
    MissingDependency { id: String, dep: String },
    #[error(
        "unable to register the derivation '{id}' as it depends on a realisation of '{dep}' \
         that doesn’t match what we have locally"
    )]
    DependencyMismatch { id: String, dep: String },
    #[error("cannot register realisation '{id}': its output path '{path}' is not valid")]
    InvalidOutput { id: String, path: String },
    #[error(
        "current Nix store ca-schema is version {found}, but I only support {CA_SCHEMA_VERSION}"
    )]
    SchemaTooNew { found: u32 },
}

impl Database {
    /// Nix's `migrateCASchema`: make the content-addressed tables unless `ca_schema_file`
    /// (the `ca-schema` file of the db directory) says they are there, then write it.
    pub fn init_ca_schema(&mut self, ca_schema_file: &Path) -> Result<(), DbError> {
        let found = match std::fs::read_to_string(ca_schema_file) {
            Ok(s) => s.trim().parse::<u32>().unwrap_or(0),
            Err(_) => 0,
        };
        if found == CA_SCHEMA_VERSION {
            return Ok(());
        }
        if found > CA_SCHEMA_VERSION {
            return Err(DbError::Realisation(Box::new(
                RealisationDbError::SchemaTooNew { found },
            )));
        }
        let path = self.path.clone();
        // Versions 1 and 2 lacked only the indices that the schema creates if missing.
        self.write(|tx| {
            tx.execute_batch(CA_SCHEMA)
                .map_err(|source| DbError::Sqlite {
                    path: path.clone(),
                    source,
                })
        })?;
        std::fs::write(ca_schema_file, CA_SCHEMA_VERSION.to_string()).map_err(|e| {
            DbError::BadRow {
                path: ca_schema_file.display().to_string(),
                msg: format!("cannot write the ca-schema file: {e}"),
            }
        })?;
        Ok(())
    }

    /// Nix's `registerDrvOutput`: record `r`, or add its signatures to the same
    /// realisation already there; another path for the same output is an error, and so
    /// is a dependency that is not registered with the same path.
    pub fn register_drv_output(&mut self, r: &Realisation) -> Result<(), DbError> {
        let sd = self.store_dir.clone();
        let id_shown = r.id.to_string();
        let rerr = |e: RealisationDbError| DbError::Realisation(Box::new(e));
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| DbError::Sqlite {
                path: path.clone(),
                source,
            };
            let old = query_core(tx, &sd, &r.id)?;
            match old {
                Some((_, old_path, old_sigs)) => {
                    if old_path != r.out_path {
                        return Err(rerr(RealisationDbError::Conflict {
                            id: id_shown.clone(),
                            local: sd.display(&old_path),
                            remote: sd.display(&r.out_path),
                        }));
                    }
                    let mut sigs = old_sigs;
                    sigs.extend(r.signatures.iter().cloned());
                    let joined = sigs.into_iter().collect::<Vec<_>>().join(" ");
                    tx.execute(
                        "update Realisations set signatures = ? where drvPath = ? and outputName = ?",
                        params![joined, r.id.str_hash(), r.id.output],
                    )
                    .map_err(err)?;
                }
                None => {
                    let valid: Option<i64> = tx
                        .query_row(
                            "select id from ValidPaths where path = ?",
                            [sd.display(&r.out_path)],
                            |row| row.get(0),
                        )
                        .optional()
                        .map_err(err)?;
                    if valid.is_none() {
                        return Err(rerr(RealisationDbError::InvalidOutput {
                            id: id_shown.clone(),
                            path: sd.display(&r.out_path),
                        }));
                    }
                    let joined = r.signatures.iter().cloned().collect::<Vec<_>>().join(" ");
                    tx.execute(
                        "insert into Realisations (drvPath, outputName, outputPath, signatures) values (?, ?, (select id from ValidPaths where path = ?), ?)",
                        params![r.id.str_hash(), r.id.output, sd.display(&r.out_path), joined],
                    )
                    .map_err(err)?;
                }
            }
            for (dep, dep_path) in &r.dependent_realisations {
                let Some((_, local, _)) = query_core(tx, &sd, dep)? else {
                    return Err(rerr(RealisationDbError::MissingDependency {
                        id: id_shown.clone(),
                        dep: dep.to_string(),
                    }));
                };
                if &local != dep_path {
                    return Err(rerr(RealisationDbError::DependencyMismatch {
                        id: id_shown.clone(),
                        dep: dep.to_string(),
                    }));
                }
                tx.execute(
                    "insert or replace into RealisationsRefs (referrer, realisationReference) values ((select id from Realisations where drvPath = ? and outputName = ?), (select id from Realisations where drvPath = ? and outputName = ?))",
                    params![r.id.str_hash(), r.id.output, dep.str_hash(), dep.output],
                )
                .map_err(err)?;
            }
            Ok(())
        })
    }

    /// Nix's `queryRealisation`: the realisation of `id` with the realisations it
    /// depends on, if it is registered (and its path valid).
    pub fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, DbError> {
        let sd = self.store_dir.clone();
        let err = |source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let Some((row_id, out_path, sigs)) = query_core(&tx, &sd, id)? else {
            return Ok(None);
        };
        let mut deps = BTreeMap::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "select drvPath, outputName from Realisations join RealisationsRefs on realisationReference = Realisations.id where referrer = ?",
                )
                .map_err(err)?;
            let rows: Vec<(String, String)> = stmt
                .query_map([row_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for (hash, output) in rows {
                let dep =
                    DrvOutput::parse(&format!("{hash}!{output}")).map_err(|e| DbError::BadRow {
                        path: hash.clone(),
                        msg: e.to_string(),
                    })?;
                if let Some((_, p, _)) = query_core(&tx, &sd, &dep)? {
                    deps.insert(dep, p);
                }
            }
        }
        drop(tx);
        Ok(Some(Realisation {
            id: id.clone(),
            out_path,
            signatures: sigs,
            dependent_realisations: deps,
        }))
    }

    /// Every realisation whose output path is `path` (for `nix realisation info`-like
    /// queries and the garbage collector's messages).
    pub fn query_realisations_of_path(
        &self,
        path: &firn_derivation::StorePath,
    ) -> Result<Vec<DrvOutput>, DbError> {
        let err = |source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "select drvPath, outputName from Realisations inner join ValidPaths as Output on Output.id = Realisations.outputPath where Output.path = ?",
            )
            .map_err(err)?;
        let rows: Vec<(String, String)> = stmt
            .query_map([self.store_dir.display(path)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        rows.into_iter()
            .map(|(h, o)| {
                DrvOutput::parse(&format!("{h}!{o}")).map_err(|e| DbError::BadRow {
                    path: h,
                    msg: e.to_string(),
                })
            })
            .collect()
    }
}

type Core = (
    i64,
    firn_derivation::StorePath,
    std::collections::BTreeSet<String>,
);

/// `queryRealisationCore_`: the row id, output path and signatures of `id`.
fn query_core(
    conn: &rusqlite::Connection,
    sd: &firn_derivation::StoreDir,
    id: &DrvOutput,
) -> Result<Option<Core>, DbError> {
    let err = |source| DbError::Sqlite {
        path: String::new(),
        source,
    };
    let row: Option<(i64, String, Option<String>)> = conn
        .prepare_cached(
            "select Realisations.id, Output.path, Realisations.signatures from Realisations inner join ValidPaths as Output on Output.id = Realisations.outputPath where drvPath = ? and outputName = ?",
        )
        .and_then(|mut s| {
            s.query_row(params![id.str_hash(), id.output], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(err)?;
    let Some((row_id, path, sigs)) = row else {
        return Ok(None);
    };
    let path = sd.parse(&path).map_err(|e| DbError::BadRow {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let sigs = sigs
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    Ok(Some((row_id, path, sigs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Registration, ValidPathInfo};
    use firn_derivation::{Hash, StoreDir, StorePath};

    fn db() -> (std::path::PathBuf, Database) {
        let dir = std::env::temp_dir().join(format!("firn-db-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut db = Database::open(&dir.join("db.sqlite"), StoreDir::default()).unwrap();
        db.init_ca_schema(&dir.join("ca-schema")).unwrap();
        (dir, db)
    }

    fn register(db: &mut Database, base: &str) -> StorePath {
        let path = StorePath::from_base_name(base.as_bytes()).unwrap();
        db.register_valid_paths(&[Registration {
            info: ValidPathInfo {
                path: path.clone(),
                nar_hash: Hash::sha256(b""),
                nar_size: 0,
                references: Default::default(),
                deriver: None,
                registration_time: 0,
                ultimate: true,
                sigs: Vec::new(),
                ca: None,
            },
            drv_outputs: Default::default(),
        }])
        .unwrap();
        path
    }

    #[test]
    fn register_query_and_conflict() {
        let (dir, mut db) = db();
        assert_eq!(std::fs::read_to_string(dir.join("ca-schema")).unwrap(), "3");
        let a = register(&mut db, "7r3fg0w1p2mzm4bxj4pxrhmlgqlxgnq3-a");
        let b = register(&mut db, "8r3fg0w1p2mzm4bxj4pxrhmlgqlxgnq3-b");
        let id_a = DrvOutput::new(Hash::sha256(b"a"), "out");
        let id_b = DrvOutput::new(Hash::sha256(b"b"), "out");
        assert_eq!(db.query_realisation(&id_a).unwrap(), None);
        db.register_drv_output(&Realisation::new(id_a.clone(), a.clone()))
            .unwrap();
        let mut rb = Realisation::new(id_b.clone(), b.clone());
        rb.dependent_realisations.insert(id_a.clone(), a.clone());
        rb.signatures.insert("k:sig".into());
        db.register_drv_output(&rb).unwrap();
        assert_eq!(db.query_realisation(&id_b).unwrap(), Some(rb.clone()));
        // The same again is fine (signatures merge); another path is not.
        db.register_drv_output(&rb).unwrap();
        let e = db
            .register_drv_output(&Realisation::new(id_b.clone(), a.clone()))
            .unwrap_err();
        assert!(e.to_string().contains("we already have another one"), "{e}");
        // A dependency that is not there.
        let mut rc = Realisation::new(DrvOutput::new(Hash::sha256(b"c"), "out"), a);
        rc.dependent_realisations
            .insert(DrvOutput::new(Hash::sha256(b"x"), "out"), b);
        let e = db.register_drv_output(&rc).unwrap_err();
        assert!(e.to_string().contains("non existent"), "{e}");
    }
}
