//! What a connection may do: everything ([`Policy::Unrestricted`], the daemon's
//! clients), or only what Nix 2.8's `RestrictedStore` lets a recursive-Nix build do
//! ([`Policy::Restricted`]): see and use the paths of its input closure and the paths it
//! added or built itself ([`AllowedPaths`]).
//!
//! [`Policy::gate`] decides each op before it is served, without touching the store:
//! serve it (then the connection applies the after-effects: censored path infos,
//! filtered answers, added paths recorded), answer it directly, or refuse it with Nix's
//! message.

use firn_build::recursive::AllowedPaths;
use firn_derivation::{StoreDir, StorePath};
use firn_protocol::worker::{GcResult, Request};
use firn_protocol::{BuildMode, DerivedPath, Reply, UnkeyedValidPathInfo};

use crate::events::hl;

/// What a connection is allowed.
#[derive(Debug, Clone, Default)]
pub enum Policy {
    /// A client of the daemon: the whole store (trust decides the rest).
    #[default]
    Unrestricted,
    /// A recursive-Nix build's connection: Nix's `RestrictedStore`.
    Restricted(AllowedPaths),
}

/// What to do with an op before serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Serve it as usual (with the after-effects of the restriction).
    Serve,
    /// Send this reply without serving it.
    Answer(Box<Reply>),
    /// Fail the op with this message (the connection goes on).
    Refuse(String),
}

/// The store path a `DerivedPath` names (Nix's `pathPartOfReq`).
fn path_part(p: &DerivedPath) -> &StorePath {
    match p {
        DerivedPath::Opaque(p) => p,
        DerivedPath::Built { drv_path, .. } => drv_path,
    }
}

impl Policy {
    /// The restriction, if any.
    pub fn restricted(&self) -> Option<&AllowedPaths> {
        match self {
            Self::Unrestricted => None,
            Self::Restricted(a) => Some(a),
        }
    }

    /// Whether `p` may be seen and used.
    pub fn allows(&self, p: &StorePath) -> bool {
        self.restricted().is_none_or(|a| a.is_allowed(p))
    }

    /// Decide `req` (ops whose payload follows are always served: their checks happen
    /// while the payload is read, so that it is drained).
    pub fn gate(&self, req: &Request, sd: &StoreDir) -> Gate {
        let Some(a) = self.restricted() else {
            return Gate::Serve;
        };
        let shown = |p: &StorePath| hl(&sd.display(p));
        let not_valid = |p: &StorePath| Gate::Refuse(format!("path '{}' is not valid", shown(p)));
        let unsupported = |op: &str| {
            Gate::Refuse(format!(
                "operation '{op}' is not supported by store 'Restricted Store'"
            ))
        };
        match req {
            Request::IsValidPath(p) if !a.is_allowed(p) => {
                Gate::Answer(Box::new(Reply::Bool(false)))
            }
            Request::QueryPathInfo(p) if !a.is_allowed(p) => {
                Gate::Answer(Box::new(Reply::PathInfo(None)))
            }
            Request::QueryPathHash(p) | Request::QueryReferences(p) | Request::QueryDeriver(p)
                if !a.is_allowed(p) =>
            {
                not_valid(p)
            }
            // The restricted store knows no referrers and no derivers.
            Request::QueryReferrers(_) | Request::QueryValidDerivers(_) => {
                Gate::Answer(Box::new(Reply::Paths(Vec::new())))
            }
            Request::QueryDeriver(_) => Gate::Answer(Box::new(Reply::OptPath(None))),
            Request::QueryDerivationOutputMap(p)
            | Request::QueryDerivationOutputs(p)
            | Request::QueryDerivationOutputNames(p)
                if !a.is_allowed(p) =>
            {
                Gate::Refuse(format!(
                    "cannot query output map for unknown path '{}' in recursive Nix",
                    shown(p)
                ))
            }
            Request::QueryAllValidPaths => {
                Gate::Answer(Box::new(Reply::Paths(a.all().into_iter().collect())))
            }
            Request::QueryPathFromHashPart(_) => Gate::Refuse("queryPathFromHashPart".into()),
            Request::QueryRealisation(id) if !a.is_allowed_drv_output(&id.to_string()) => {
                Gate::Answer(Box::new(Reply::Realisations(Vec::new())))
            }
            // Roots and garbage collection are the outer store's business.
            Request::AddTempRoot(_) | Request::AddIndirectRoot(_) | Request::SyncWithGC => {
                Gate::Answer(Box::new(Reply::Ok))
            }
            Request::FindRoots => Gate::Answer(Box::new(Reply::Roots(Vec::new()))),
            Request::CollectGarbage { .. } => {
                Gate::Answer(Box::new(Reply::CollectGarbage(GcResult::default())))
            }
            Request::VerifyStore { .. } => Gate::Answer(Box::new(Reply::Bool(false))),
            Request::OptimiseStore => Gate::Answer(Box::new(Reply::Ok)),
            Request::AddSignatures { .. } => unsupported("addSignatures"),
            Request::EnsurePath(p) => match a.is_allowed(p) {
                true => Gate::Answer(Box::new(Reply::Ok)),
                false => Gate::Refuse(format!(
                    "cannot substitute unknown path '{}' in recursive Nix",
                    shown(p)
                )),
            },
            Request::NarFromPath(p) if !a.is_allowed(p) => Gate::Refuse(format!(
                "cannot dump unknown path '{}' in recursive Nix",
                shown(p)
            )),
            Request::BuildPaths { paths, mode }
            | Request::BuildPathsWithResults { paths, mode } => {
                if *mode != BuildMode::Normal {
                    return Gate::Refuse("unsupported build mode".into());
                }
                match paths.iter().find(|p| !a.is_allowed(path_part(p))) {
                    Some(p) => Gate::Refuse(format!(
                        "cannot build '{}' in recursive Nix because path is unknown",
                        hl(&p.to_string(sd))
                    )),
                    None => Gate::Serve,
                }
            }
            Request::BuildDerivation { .. } => unsupported("buildDerivation"),
            Request::RegisterDrvOutput(_) => Gate::Refuse("registerDrvOutput".into()),
            Request::AddTextToStore { references, .. } => match self.foreign(references, None) {
                Some(p) => Gate::Refuse(foreign_message(sd, &p)),
                None => Gate::Serve,
            },
            _ => Gate::Serve,
        }
    }

    /// The first of `references` (other than `own`, a self-reference) the build may not
    /// use. A path added through a restricted connection may refer only to allowed
    /// paths, so that adding cannot bring an outside path into the build's outputs
    /// (Nix does not check this).
    pub fn foreign<'a>(
        &self,
        references: impl IntoIterator<Item = &'a StorePath>,
        own: Option<&StorePath>,
    ) -> Option<StorePath> {
        self.restricted()?;
        references
            .into_iter()
            .find(|r| Some(*r) != own && !self.allows(r))
            .cloned()
    }
}

/// Why an added path with a reference outside the allowed set is refused.
pub fn foreign_message(sd: &StoreDir, p: &StorePath) -> String {
    format!(
        "cannot add a path referring to '{}' in recursive Nix: that path is unknown",
        hl(&sd.display(p))
    )
}

/// Nix's censoring of impure information in the restricted store's path infos.
pub fn censor(info: &mut UnkeyedValidPathInfo) {
    info.deriver = None;
    info.registration_time = 0;
    info.ultimate = false;
    info.sigs.clear();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const IN: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-dummy";
    const OUT: &str = "ffffffffffffffffffffffffffffffff-unreachable";
    const DRV: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-inner.drv";

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s.as_bytes()).expect("a store path")
    }

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").expect("store dir")
    }

    fn restricted() -> Policy {
        Policy::Restricted(AllowedPaths::new([sp(IN)].into()))
    }

    fn refused(g: Gate) -> String {
        match g {
            Gate::Refuse(m) => m,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn unrestricted_serves_everything() {
        let p = Policy::Unrestricted;
        assert_eq!(p.gate(&Request::QueryAllValidPaths, &sd()), Gate::Serve);
        assert_eq!(p.gate(&Request::IsValidPath(sp(OUT)), &sd()), Gate::Serve);
        assert!(p.foreign([&sp(OUT)], None).is_none());
    }

    #[test]
    fn paths_outside_the_closure_are_not_valid() {
        let p = restricted();
        let sd = sd();
        assert_eq!(
            p.gate(&Request::IsValidPath(sp(OUT)), &sd),
            Gate::Answer(Box::new(Reply::Bool(false)))
        );
        assert_eq!(p.gate(&Request::IsValidPath(sp(IN)), &sd), Gate::Serve);
        assert_eq!(
            p.gate(&Request::QueryPathInfo(sp(OUT)), &sd),
            Gate::Answer(Box::new(Reply::PathInfo(None)))
        );
        assert!(refused(p.gate(&Request::QueryReferences(sp(OUT)), &sd)).contains("is not valid"));
        assert!(refused(p.gate(&Request::NarFromPath(sp(OUT)), &sd)).contains("cannot dump"));
        assert!(refused(p.gate(&Request::EnsurePath(sp(OUT)), &sd)).contains("cannot substitute"));
        assert_eq!(
            p.gate(&Request::QueryAllValidPaths, &sd),
            Gate::Answer(Box::new(Reply::Paths(vec![sp(IN)])))
        );
        assert_eq!(
            p.gate(&Request::QueryReferrers(sp(IN)), &sd),
            Gate::Answer(Box::new(Reply::Paths(Vec::new())))
        );
    }

    #[test]
    fn builds_need_allowed_paths() {
        let p = restricted();
        let sd = sd();
        let build = |path: &str, mode| Request::BuildPathsWithResults {
            paths: vec![DerivedPath::Built {
                drv_path: sp(path),
                outputs: BTreeSet::new(),
            }],
            mode,
        };
        let m = refused(p.gate(&build(DRV, BuildMode::Normal), &sd));
        assert!(m.contains("because path is unknown"), "{m}");
        assert!(m.contains("-inner.drv!*"), "{m}");
        // Once the build added the derivation, it may build it.
        p.restricted()
            .expect("restricted")
            .add(&sp(DRV))
            .expect("add");
        assert_eq!(p.gate(&build(DRV, BuildMode::Normal), &sd), Gate::Serve);
        assert_eq!(
            p.gate(&build(DRV, BuildMode::Check), &sd),
            Gate::Refuse("unsupported build mode".into())
        );
        assert!(refused(p.gate(
            &Request::BuildDerivation {
                drv_path: sp(DRV),
                drv: firn_protocol::BasicDerivation::default(),
                mode: BuildMode::Normal
            },
            &sd
        ))
        .contains("not supported"));
    }

    #[test]
    fn added_paths_may_refer_only_to_allowed_paths() {
        let p = restricted();
        let sd = sd();
        let add = |refs: Vec<&str>| Request::AddTextToStore {
            name: "x".into(),
            text: b"x".to_vec(),
            references: refs.into_iter().map(sp).collect(),
        };
        assert_eq!(p.gate(&add(vec![IN]), &sd), Gate::Serve);
        assert!(refused(p.gate(&add(vec![IN, OUT]), &sd)).contains("unreachable"));
        assert_eq!(
            p.foreign([&sp(OUT)], Some(&sp(OUT))),
            None,
            "a self-reference"
        );
    }

    #[test]
    fn roots_and_gc_are_no_ops() {
        let p = restricted();
        let sd = sd();
        assert_eq!(
            p.gate(&Request::FindRoots, &sd),
            Gate::Answer(Box::new(Reply::Roots(Vec::new())))
        );
        assert_eq!(
            p.gate(&Request::AddTempRoot(sp(OUT)), &sd),
            Gate::Answer(Box::new(Reply::Ok))
        );
    }

    #[test]
    fn censored_info() {
        let mut i = UnkeyedValidPathInfo {
            deriver: Some(sp(DRV)),
            nar_hash: firn_derivation::Hash::sha256(b""),
            references: BTreeSet::new(),
            registration_time: 5,
            nar_size: 1,
            ultimate: true,
            sigs: ["k:s".to_owned()].into(),
            ca: None,
        };
        censor(&mut i);
        assert_eq!(
            (i.deriver, i.registration_time, i.ultimate),
            (None, 0, false)
        );
        assert!(i.sigs.is_empty());
    }
}
