//! Importing store objects that arrive as NARs with their metadata (a substitute from a
//! binary cache, `firn copy --from`), as Nix's `addToStore(info, source)` does, but for
//! a whole closure at once: each NAR is first *staged* — restored below the real store
//! dir under a temporary name while it is hashed, and checked against the expected
//! NAR hash and size ([`Store::stage_nar`]) — and only when every one is staged are
//! they locked, renamed into place and registered in one transaction
//! ([`Store::register_staged`]). So nothing partial ever becomes valid: a truncated or
//! corrupt NAR fails before anything is renamed, and a staged object that is dropped
//! unregistered is deleted.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use firn_derivation::{Hash, HashAlgo, Hasher, StorePath};

use crate::canonical::{canonicalise_restored, delete_path};
use crate::content_address::check_content_address;
use crate::db::{Registration, ValidPathInfo};
use crate::error::{io_err, StoreError};
use crate::lock::PathLocks;
use crate::message::StoreMessage;
use crate::nar;
use crate::store::Store;

/// A store object restored from a NAR and checked, not yet valid. Dropping it removes
/// the temporary tree.
#[derive(Debug)]
pub struct Staged {
    info: ValidPathInfo,
    tmp: PathBuf,
}

impl Staged {
    pub fn info(&self) -> &ValidPathInfo {
        &self.info
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = delete_path(&self.tmp);
    }
}

/// A reader that hashes (sha256) and counts what passes through it.
struct HashingReader<'a, R: ?Sized> {
    inner: &'a mut R,
    hasher: Hasher,
    size: u64,
}

impl<R: Read + ?Sized> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Restore the NAR read from `nar` as the future content of `info.path`, checking
    /// its sha256 and size against `info.nar_hash` / `info.nar_size` and that nothing
    /// follows the NAR. The path is a temporary GC root from here on.
    pub fn stage_nar(
        &self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
    ) -> Result<Staged, StoreError> {
        let shown = self.store_dir().display(&info.path);
        self.add_temp_root(&info.path)?;
        let n = STAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.real_store_dir().join(format!(
            ".{}.import-{}-{n}",
            info.path.base_name(),
            std::process::id()
        ));
        delete_path(&tmp).map_err(io_err(&tmp))?;
        let mut reader = HashingReader {
            inner: nar,
            hasher: Hasher::new(HashAlgo::Sha256),
            size: 0,
        };
        let staged = Staged {
            info: info.clone(),
            tmp: tmp.clone(),
        };
        let metadata = nar::restore_path_for_store(&mut reader, &tmp)?;
        let mut rest = [0u8; 1];
        let trailing = reader.read(&mut rest).map_err(io_err(&tmp))?;
        if trailing != 0 {
            return Err(StoreError::NarTrailingData { path: shown });
        }
        let (hash, size): (Hash, u64) = (reader.hasher.finish(), reader.size);
        if size != info.nar_size {
            return Err(StoreError::NarSizeMismatch {
                path: shown,
                expected: info.nar_size,
                got: size,
            });
        }
        if hash != info.nar_hash {
            return Err(StoreError::NarHashMismatch {
                path: shown,
                expected: info.nar_hash.to_nixbase32(),
                got: hash.to_nixbase32(),
            });
        }
        if let Some(ca) = &info.ca {
            check_content_address(&shown, info.path.hash_part(), ca, &tmp)?;
        }
        canonicalise_restored(&tmp, metadata).map_err(io_err(&tmp))?;
        self.auto_optimise_path(&tmp)?;
        Ok(staged)
    }

    /// Make the staged objects valid, all in one transaction: lock their paths, skip
    /// those that became valid meanwhile, rename the others into place, register. On
    /// any failure nothing of it is valid and the renamed trees are removed again.
    /// Every reference must be valid already or be one of `staged`.
    pub fn register_staged(&mut self, staged: Vec<Staged>) -> Result<(), StoreError> {
        if staged.is_empty() {
            return Ok(());
        }
        let reals: BTreeSet<PathBuf> = staged
            .iter()
            .map(|s| self.real_path(&s.info.path))
            .collect();
        let locks = PathLocks::lock(reals, true, |p| {
            self.report(&StoreMessage::WaitingForLock {
                path: p.display().to_string(),
            });
        })?;
        let mut locks = locks.unwrap_or_default();
        let mut todo = Vec::new();
        for s in staged {
            if !self.db().is_valid_path(&s.info.path)? {
                todo.push(s);
            }
        }
        let mut placed: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for s in &todo {
                let real = self.real_path(&s.info.path);
                // Leftovers of an interrupted add are not valid: remove them.
                delete_path(&real).map_err(io_err(&real))?;
                fs::rename(&s.tmp, &real).map_err(io_err(&real))?;
                placed.push(real);
            }
            // On disk before valid (one syncfs for a large closure).
            crate::durable::make_all_durable(&placed, self.real_store_dir())
                .map_err(io_err(self.real_store_dir()))?;
            let regs: Vec<Registration> = todo
                .iter()
                .map(|s| Registration {
                    info: s.info.clone(),
                    drv_outputs: Default::default(),
                })
                .collect();
            self.db_mut().register_valid_paths(&regs)?;
            Ok(())
        })();
        if let Err(e) = result {
            for p in &placed {
                let _ = delete_path(p);
            }
            return Err(e);
        }
        locks.set_deletion(true);
        Ok(())
    }
}

/// The paths of `infos` in an order where each comes after its references (within the
/// set), for registering or fetching references first.
pub fn references_first(infos: &[ValidPathInfo]) -> Vec<StorePath> {
    let map: std::collections::BTreeMap<StorePath, BTreeSet<StorePath>> = infos
        .iter()
        .map(|i| (i.path.clone(), i.references.clone()))
        .collect();
    crate::db::PathGraph::from_references(&map)
        .topo_sorted()
        .into_iter()
        .cloned()
        .collect()
}
