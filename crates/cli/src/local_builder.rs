//! The builder of this machine, as the CLI's commands that build (`realise`, `verify
//! --repair`) set it up from the settings.

use firn_build::builder::local::{LocalBuilder, LocalOptions};

use crate::settings::Settings;

/// The builder of this machine for `build`'s settings (saying once when the limits
/// asked for cannot be enforced).
pub fn local_builder(
    settings: &Settings,
    build: &firn_build::Settings,
    store: &firn_store::Store,
) -> LocalBuilder {
    let builder = LocalBuilder::new(LocalOptions::for_store(
        store,
        build,
        settings.userpool.clone(),
    ));
    if let Some(why) = builder.cannot_enforce_limits() {
        eprintln!(
            "warning: build-memory-max and build-pids-max cannot be enforced here ({why}); builds run without them"
        );
    }
    builder
}

/// The private daemon of recursive-Nix builds (`requiredSystemFeatures =
/// ["recursive-nix"]`), served by firn-daemon's connection loop on `store`.
pub fn recursive_nix(
    settings: &Settings,
    store: &firn_store::Store,
) -> std::sync::Arc<dyn firn_build::recursive::RecursiveNix> {
    std::sync::Arc::new(firn_daemon::RecursiveDaemon::new(
        store.layout().clone(),
        settings.userpool.clone(),
    ))
}
