//! `--check`: rebuild a derivation whose outputs are all valid, in the sandbox (whose
//! private store dir receives the new outputs), and compare each new output's NAR hash
//! with the registered one. A difference fails the goal as not deterministic (exit
//! 104); with `keep-failed` the differing output is kept as `<out>.check`, as Nix does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use firn_derivation::{OutputName, StorePath};
use firn_store::{Store, StoreError};

use crate::builder::RunningBuild;
use crate::error::BuildError;
use crate::events::{BuildEvents, Message};
use crate::outputs::OutputError;

/// Compare the outputs `running` rebuilt with the registered ones.
pub fn compare_outputs(
    store: &Store,
    drv_path: &StorePath,
    outputs: &BTreeMap<OutputName, StorePath>,
    running: &impl RunningBuild,
    keep_failed: bool,
    events: &mut dyn BuildEvents,
) -> Result<(), BuildError> {
    let sd = store.store_dir();
    for (name, p) in outputs {
        let rebuilt = running.built_path(p);
        let real = store.real_path(p);
        if rebuilt == real {
            // An unsandboxed builder would have overwritten the registered output.
            return Err(BuildError::CheckNeedsSandbox);
        }
        if std::fs::symlink_metadata(&rebuilt).is_err() {
            return Err(OutputError::Missing {
                drv: sd.display(drv_path),
                output: name.to_string(),
                path: rebuilt.display().to_string(),
            }
            .into());
        }
        let io = |source| BuildError::Io {
            path: rebuilt.clone(),
            source,
        };
        firn_store::canonical::canonicalise_path_metadata(&rebuilt).map_err(io)?;
        let (hash, _) = firn_store::nar::hash_path(&rebuilt)
            .map_err(|e| BuildError::Store(StoreError::from(e)))?;
        let registered = store
            .db()
            .query_path_info(p)
            .map_err(StoreError::from)?
            .map(|i| i.nar_hash);
        if registered != Some(hash) {
            if keep_failed {
                let mut check = real.clone().into_os_string();
                check.push(".check");
                let check = PathBuf::from(check);
                let _ = firn_store::canonical::delete_path(&check);
                if std::fs::rename(&rebuilt, &check).is_ok() {
                    events.message(Message::KeepingCheckOutput { path: &check });
                }
            }
            return Err(BuildError::NotDeterministic {
                drv: sd.display(drv_path),
                output: sd.display(p),
            });
        }
    }
    Ok(())
}
