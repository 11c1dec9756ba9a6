//! Substitution before building, as Nix 2.8's `DerivationGoal::haveDerivation` and
//! `PathSubstitutionGoal` do it, with firn-cache doing the work: the missing wanted
//! outputs of a derivation (and their closures) are looked up in the `substituters`,
//! in priority order, each narinfo checked against `trusted-public-keys` when
//! `require-sigs`; if every one has a substitute they are fetched and registered
//! together, and the derivation is not built (nor are its inputs). A substitute that
//! is not signed by a trusted key is skipped with Nix's warning (so the derivation is
//! built); a download, decompression or hash failure fails the derivation, unless
//! `fallback`, when it is built instead.

use std::collections::BTreeMap;

use firn_cache::cache::CacheOptions;
use firn_cache::disk_cache::DiskCacheOptions;
use firn_cache::http::HttpOptions;
use firn_cache::substitute::{Plan, Substituters};
use firn_derivation::{Derivation, FixedOutputHash, StoreDir, StorePath};
use firn_store::Store;

use crate::error::BuildError;
use crate::events::{BuildEvents, Message};
use crate::settings::Settings;

/// How substituting a goal's outputs went.
#[derive(Debug)]
pub enum Substituted {
    /// Every path asked for is valid now.
    All,
    /// Not every path has a substitute: build.
    No,
    /// Substituting failed (and `fallback` is off).
    Failed(BuildError),
}

/// How `settings` say caches are reached (`ssl-cert-file`, the narinfo disk cache).
pub fn cache_options(settings: &Settings) -> CacheOptions {
    CacheOptions {
        http: HttpOptions::with_ca_file(&settings.ssl_cert_file),
        disk_cache: DiskCacheOptions::nix_default(
            settings.narinfo_cache_positive_ttl,
            settings.narinfo_cache_negative_ttl,
        ),
    }
}

/// The substituters of `settings`, or `None` when there are none. Caches that cannot
/// be opened are left out with a warning, as Nix does.
pub fn open(
    sd: &StoreDir,
    settings: &Settings,
    events: &mut dyn BuildEvents,
) -> Result<Option<Substituters>, BuildError> {
    if settings.substituters.0.is_empty() {
        return Ok(None);
    }
    let (subs, warnings) = Substituters::open(
        sd,
        &cache_options(settings),
        &settings.substituters.0,
        &settings.trusted_public_keys.0,
        &settings.secret_key_files.0,
        settings.require_sigs,
        settings.fallback,
    )
    .map_err(|e| BuildError::Substitution {
        path: String::new(),
        source: Box::new(e),
    })?;
    for w in &warnings {
        events.message(Message::Warning { text: w });
    }
    Ok((!subs.is_empty()).then_some(subs))
}

/// Whether the derivation lets its outputs be substituted (`allowSubstitutes`,
/// default true).
pub fn allowed(drv: &Derivation<'_>) -> bool {
    drv.env
        .get(b"allowSubstitutes".as_slice())
        .is_none_or(|v| v.as_ref() == b"1")
}

/// What substituting `paths` would fetch (a dry run), `None` without substituters.
pub fn plan(
    store: &Store,
    settings: &Settings,
    paths: &[StorePath],
) -> Result<Option<Plan>, BuildError> {
    let Some(subs) = open(store.store_dir(), settings, &mut crate::events::NoEvents)? else {
        return Ok(None);
    };
    subs.plan(store, paths)
        .map(Some)
        .map_err(|e| BuildError::Substitution {
            path: String::new(),
            source: Box::new(e),
        })
}

/// Substitute `paths` (with their closures) into `store`, if all of them have
/// substitutes; `cas` are the content addresses known of some of them (fixed outputs),
/// for caches of other store directories.
pub fn substitute(
    store: &mut Store,
    settings: &Settings,
    events: &mut dyn BuildEvents,
    paths: &[StorePath],
    cas: &BTreeMap<StorePath, FixedOutputHash>,
) -> Substituted {
    substitute_with(store, settings, events, paths, cas, true)
}

/// Substitute those of `paths` the substituters have (with their closures), leaving the
/// others (Nix's `substitutePaths`, for serve's QueryValidPaths and a daemon's opaque
/// paths): `All` means something was fetched (check each path's validity), `No` that
/// nothing was.
pub fn substitute_available(
    store: &mut Store,
    settings: &Settings,
    events: &mut dyn BuildEvents,
    paths: &[StorePath],
) -> Substituted {
    substitute_with(store, settings, events, paths, &BTreeMap::new(), false)
}

fn substitute_with(
    store: &mut Store,
    settings: &Settings,
    events: &mut dyn BuildEvents,
    paths: &[StorePath],
    cas: &BTreeMap<StorePath, FixedOutputHash>,
    all_or_nothing: bool,
) -> Substituted {
    let sd = store.store_dir().clone();
    let shown = paths
        .iter()
        .map(|p| sd.display(p))
        .collect::<Vec<_>>()
        .join("', '");
    let fail = |e: firn_cache::CacheError| {
        let err = BuildError::Substitution {
            path: shown.clone(),
            source: Box::new(e),
        };
        if settings.fallback {
            Substituted::No
        } else {
            Substituted::Failed(err)
        }
    };
    let subs = match open(&sd, settings, events) {
        Ok(Some(s)) => s,
        Ok(None) => return Substituted::No,
        Err(e) => return Substituted::Failed(e),
    };
    let mut plan = match subs.plan_with_cas(store, paths, cas) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    for w in &plan.warnings {
        events.message(Message::Warning { text: w });
    }
    if !plan.missing.is_empty() {
        // Only what the caches have, closures complete: plan those again.
        let rest: Vec<StorePath> = paths
            .iter()
            .filter(|p| !plan.missing.contains(*p))
            .cloned()
            .collect();
        if all_or_nothing || rest.is_empty() {
            return Substituted::No;
        }
        plan = match subs.plan_with_cas(store, &rest, cas) {
            Ok(p) if p.missing.is_empty() => p,
            Ok(_) => return Substituted::No,
            Err(e) => return fail(e),
        };
    }
    let fetched = subs.fetch(store, &plan, |p, url| {
        events.message(Message::Substituting { path: p, from: url });
    });
    match fetched {
        Ok(_) => Substituted::All,
        Err(e) => {
            if settings.fallback {
                let text = format!("{e}; building from source instead ('fallback')");
                events.message(Message::Warning { text: &text });
            }
            fail(e)
        }
    }
}

/// A step of the walk over dependent realisations.
enum Step {
    /// Look at this realisation, which a dependent says is at this path.
    Visit(firn_derivation::DrvOutput, StorePath),
    /// Its dependencies are done: it comes next.
    Done(firn_derivation::DrvOutput),
}

fn dependencies_of(r: &firn_derivation::Realisation) -> Vec<Step> {
    r.dependent_realisations
        .iter()
        .map(|(id, p)| Step::Visit(id.clone(), p.clone()))
        .collect()
}

/// Realisations found in the substituters for a goal's floating outputs.
#[derive(Debug, Default)]
pub struct Realised {
    /// Each wanted output's.
    pub outputs: BTreeMap<firn_derivation::OutputName, firn_derivation::Realisation>,
    /// The realisations those depend on (`dependentRealisations`, transitively) that
    /// the store does not have, in an order where each comes after those it depends on:
    /// registered first (the Realisations table refers to them).
    pub dependencies: Vec<firn_derivation::Realisation>,
}

/// The realisations of `ids` (outputs whose paths the build would decide: floating
/// content-addressed) from the substituters, in priority order, with those they depend
/// on (Nix's `DrvOutputSubstitutionGoal`); `None` when one of them is in no cache (then
/// it is built). The paths they name are substituted as any path is, their narinfos'
/// signatures checked then.
pub fn realisations(
    store: &Store,
    settings: &Settings,
    events: &mut dyn BuildEvents,
    ids: &[(firn_derivation::OutputName, firn_derivation::DrvOutput)],
) -> Result<Option<Realised>, BuildError> {
    let Some(subs) = open(store.store_dir(), settings, events)? else {
        return Ok(None);
    };
    let query = |id: &firn_derivation::DrvOutput| match subs.query_realisation(id) {
        Ok(r) => Ok(r.map(|(r, _)| r)),
        Err(e) => Err(BuildError::Substitution {
            path: id.to_string(),
            source: Box::new(e),
        }),
    };
    let found = (|| -> Result<Option<Realised>, BuildError> {
        let mut realised = Realised::default();
        for (name, id) in ids {
            let Some(r) = query(id)? else {
                return Ok(None);
            };
            realised.outputs.insert(name.clone(), r);
        }
        // Depth first, so that a realisation follows those it depends on. A dependency
        // the store knows with another path makes the cache's realisation unusable here
        // (its closure would hold two copies of one output): build instead, as Nix.
        let sd = store.store_dir();
        let mut seen = std::collections::BTreeSet::new();
        let mut stack: Vec<Step> = realised
            .outputs
            .values()
            .flat_map(dependencies_of)
            .collect();
        let mut fetched: BTreeMap<firn_derivation::DrvOutput, firn_derivation::Realisation> =
            BTreeMap::new();
        while let Some(step) = stack.pop() {
            let (id, path) = match step {
                Step::Done(id) => {
                    if let Some(r) = fetched.remove(&id) {
                        realised.dependencies.push(r);
                    }
                    continue;
                }
                Step::Visit(id, path) => (id, path),
            };
            let known = store
                .db()
                .query_realisation(&id)
                .map_err(firn_store::StoreError::from)?;
            if let Some(local) = known {
                if local.out_path != path {
                    let text = format!(
                        "a substituter has an incompatible realisation for '{id}', ignoring.\nLocal:  {}\nRemote: {}",
                        sd.display(&local.out_path),
                        sd.display(&path)
                    );
                    events.message(Message::Warning { text: &text });
                    return Ok(None);
                }
                continue;
            }
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(r) = query(&id)? else {
                return Ok(None);
            };
            stack.push(Step::Done(id.clone()));
            stack.extend(dependencies_of(&r));
            fetched.insert(id, r);
        }
        Ok(Some(realised))
    })();
    match found {
        Err(e) if settings.fallback => {
            let text = format!("{e}; building from source instead ('fallback')");
            events.message(Message::Warning { text: &text });
            Ok(None)
        }
        other => other,
    }
}
