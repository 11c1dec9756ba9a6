//! The settings that shape a realisation, by their Nix names, in one typed structure.
//!
//! Each setting is declared once below (field, type, Nix name, aliases, default, doc);
//! [`Settings::set`] is the only place a setting's text is parsed, whoever supplies it
//! (`--option NAME VALUE` today; config files and daemon clients' `SetOptions` later).
//! Values are parsed as Nix 2.8 parses them — booleans `true`/`yes`/`1` and
//! `false`/`no`/`0`, `max-jobs` an integer or `auto`, `sandbox` a boolean or `relaxed`,
//! lists separated by whitespace — but a value Nix would only warn about (and then
//! ignore) is an error here, naming the setting: a silently ignored `timeout` or
//! `sandbox` is worse than a refusal. Settings firn does not know are reported by
//! [`Settings::set`] as [`SettingError::Unknown`], which the caller turns into Nix's
//! warning.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::builder::SandboxPath;

/// Why a setting could not be set.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SettingError {
    #[error("unknown setting '{0}'")]
    Unknown(String),
    #[error("Boolean setting '{name}' has invalid value '{value}'")]
    Bool { name: String, value: String },
    #[error("configuration setting '{name}' should be 'auto' or an integer")]
    MaxJobs { name: String, value: String },
    #[error("option '{name}' has invalid value '{value}'")]
    Sandbox { name: String, value: String },
    #[error("setting '{name}' has invalid value '{value}'")]
    Invalid { name: String, value: String },
}

/// `sandbox`: `true`, `false` or `relaxed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    Off,
    On,
    /// Derivations with `__noChroot` build unsandboxed; all others in the sandbox.
    Relaxed,
}

/// `max-jobs`: a number, or `auto` (the number of CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxJobs(pub usize);

/// A number of seconds where 0 means "no limit" (`timeout`, `max-silent-time`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seconds(pub Option<Duration>);

/// A number of bytes where 0 means "no limit" (`max-build-log-size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bytes(pub Option<u64>);

/// A whitespace-separated list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Strings(pub Vec<String>);

/// The default of `substituters`, as in Nix.
pub const NIXOS_CACHE: &str = "https://cache.nixos.org/";

/// The default of `trusted-public-keys`, as in Nix.
pub const NIXOS_CACHE_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Every setting name (and alias) Nix 2.8 knows (`nix show-config` of Nix 2.8, and the
/// aliases in its source). A name here that firn does not act on is accepted without a
/// warning: it is not a typo, and a `nix.conf` written for Nix must not make firn noisy.
pub const NIX_SETTINGS: &[&str] = &[
    "accept-flake-config",
    "access-tokens",
    "allow-dirty",
    "allow-import-from-derivation",
    "allow-new-privileges",
    "allow-symlinked-store",
    "allow-unsafe-native-code-during-evaluation",
    "allowed-impure-host-deps",
    "allowed-uris",
    "allowed-users",
    "auto-optimise-store",
    "bash-prompt",
    "bash-prompt-suffix",
    "binary-cache-public-keys",
    "binary-caches",
    "binary-caches-parallel-connections",
    "build-chroot-dirs",
    "build-compress-log",
    "build-cores",
    "build-extra-chroot-dirs",
    "build-extra-platforms",
    "build-extra-sandbox-paths",
    "build-fallback",
    "build-hook",
    "build-impersonate-linux-26",
    "build-keep-log",
    "build-max-jobs",
    "build-max-log-size",
    "build-max-silent-time",
    "build-poll-interval",
    "build-repeat",
    "build-sandbox-paths",
    "build-timeout",
    "build-use-chroot",
    "build-use-sandbox",
    "build-use-substitutes",
    "build-users-group",
    "commit-lockfile-summary",
    "compress-build-log",
    "connect-timeout",
    "cores",
    "diff-hook",
    "download-attempts",
    "enforce-determinism",
    "env-keep-derivations",
    "eval-cache",
    "extra-platforms",
    "fallback",
    "filter-syscalls",
    "flake-registry",
    "fsync-metadata",
    "gc-keep-derivations",
    "gc-keep-outputs",
    "gc-reserved-space",
    "hashed-mirrors",
    "http-connections",
    "http2",
    "ignored-acls",
    "impersonate-linux-26",
    "keep-build-log",
    "keep-derivations",
    "keep-env-derivations",
    "keep-failed",
    "keep-going",
    "keep-outputs",
    "log-lines",
    "max-build-log-size",
    "max-free",
    "max-jobs",
    "max-silent-time",
    "min-free",
    "min-free-check-interval",
    "nar-buffer-size",
    "netrc-file",
    "nix-path",
    "plugin-files",
    "post-build-hook",
    "pre-build-hook",
    "preallocate-contents",
    "print-missing",
    "pure-eval",
    "repeat",
    "require-sigs",
    "restrict-eval",
    "run-diff-hook",
    "sandbox",
    "sandbox-build-dir",
    "sandbox-dev-shm-size",
    "sandbox-fallback",
    "sandbox-paths",
    "secret-key-files",
    "show-trace",
    "signed-binary-caches",
    "stalled-download-timeout",
    "store",
    "substitute",
    "substituters",
    "sync-before-registering",
    "system",
    "system-features",
    "tarball-ttl",
    "timeout",
    "trace-function-calls",
    "trusted-binary-caches",
    "trusted-public-keys",
    "trusted-substituters",
    "trusted-users",
    "use-binary-caches",
    "use-case-hack",
    "use-registries",
    "use-sqlite-wal",
    "user-agent-suffix",
    "warn-dirty",
];

/// What setting a name did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A setting firn acts on.
    Set,
    /// A setting of Nix's that firn does not act on.
    NixOnly,
}

/// A whitespace-separated set of strings (shown sorted, as Nix keeps it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StringSet(pub std::collections::BTreeSet<String>);

impl StringSet {
    pub fn contains(&self, s: &str) -> bool {
        self.0.contains(s)
    }
}

impl FromIterator<String> for StringSet {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// How one type of setting is read from and shown as text.
pub trait SettingValue: Sized {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError>;
    /// `extra-NAME = VALUE`: add to the value; `false` for settings that are not lists.
    fn append(&mut self, _more: Self) -> bool {
        false
    }
    /// As `nix show-config` prints it.
    fn show(&self) -> String;
}

fn invalid(name: &str, value: &str) -> SettingError {
    SettingError::Invalid {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

impl SettingValue for bool {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        match value {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            _ => Err(SettingError::Bool {
                name: name.to_owned(),
                value: value.to_owned(),
            }),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for u32 {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        value.parse().map_err(|_| invalid(name, value))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for u64 {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        value.parse().map_err(|_| invalid(name, value))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for String {
    fn parse(_: &str, value: &str) -> Result<Self, SettingError> {
        Ok(value.to_owned())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl SettingValue for MaxJobs {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        if value == "auto" {
            return Ok(Self(available_cpus()));
        }
        value.parse().map(Self).map_err(|_| SettingError::MaxJobs {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }
    fn show(&self) -> String {
        self.0.to_string()
    }
}

impl SettingValue for Seconds {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        let n: u64 = value.parse().map_err(|_| invalid(name, value))?;
        Ok(Self((n > 0).then(|| Duration::from_secs(n))))
    }
    fn show(&self) -> String {
        self.0.map_or(0, |d| d.as_secs()).to_string()
    }
}

impl SettingValue for Bytes {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        let n: u64 = value.parse().map_err(|_| invalid(name, value))?;
        Ok(Self((n > 0).then_some(n)))
    }
    fn show(&self) -> String {
        self.0.unwrap_or(0).to_string()
    }
}

impl SettingValue for Strings {
    fn parse(_: &str, value: &str) -> Result<Self, SettingError> {
        Ok(Self(value.split_whitespace().map(str::to_owned).collect()))
    }
    fn append(&mut self, more: Self) -> bool {
        self.0.extend(more.0);
        true
    }
    fn show(&self) -> String {
        self.0.join(" ")
    }
}

impl SettingValue for StringSet {
    fn parse(_: &str, value: &str) -> Result<Self, SettingError> {
        Ok(value.split_whitespace().map(str::to_owned).collect())
    }
    fn append(&mut self, more: Self) -> bool {
        self.0.extend(more.0);
        true
    }
    fn show(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join(" ")
    }
}

impl SettingValue for SandboxMode {
    fn parse(name: &str, value: &str) -> Result<Self, SettingError> {
        match value {
            "relaxed" => Ok(Self::Relaxed),
            _ => match bool::parse(name, value) {
                Ok(true) => Ok(Self::On),
                Ok(false) => Ok(Self::Off),
                Err(_) => Err(SettingError::Sandbox {
                    name: name.to_owned(),
                    value: value.to_owned(),
                }),
            },
        }
    }
    fn show(&self) -> String {
        match self {
            Self::Off => "false",
            Self::On => "true",
            Self::Relaxed => "relaxed",
        }
        .to_owned()
    }
}

/// `sandbox-paths`: space-separated `target=source` or `path`, a `?` at the end making
/// an entry optional.
impl SettingValue for Vec<SandboxPath> {
    fn parse(_: &str, value: &str) -> Result<Self, SettingError> {
        Ok(value
            .split_whitespace()
            .map(|e| {
                let (e, optional) = match e.strip_suffix('?') {
                    Some(x) => (x, true),
                    None => (e, false),
                };
                let (target, source) = e.split_once('=').unwrap_or((e, e));
                SandboxPath {
                    target: PathBuf::from(target),
                    source: PathBuf::from(source),
                    optional,
                }
            })
            .collect())
    }
    fn append(&mut self, more: Self) -> bool {
        self.extend(more);
        true
    }
    /// Sorted, as Nix keeps them (a set).
    fn show(&self) -> String {
        let mut shown: Vec<String> = self
            .iter()
            .map(|p| {
                let mut s = match p.target == p.source {
                    true => p.target.display().to_string(),
                    false => format!("{}={}", p.target.display(), p.source.display()),
                };
                if p.optional {
                    s.push('?');
                }
                s
            })
            .collect();
        shown.sort();
        shown.join(" ")
    }
}

/// The number of CPUs (Nix's default for `cores`, and `max-jobs = auto`).
/// `@<NIX_CONF_DIR>/machines` (default `/etc/nix/machines`), as Nix's `builders`.
pub fn default_builders() -> String {
    let dir = std::env::var_os("NIX_CONF_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/etc/nix"));
    format!("@{}", dir.join("machines").display())
}

pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One setting's description, for `show-config` and `--help`.
#[derive(Debug, Clone, Copy)]
pub struct SettingInfo {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub doc: &'static str,
}

macro_rules! settings {
    ($( #[doc = $doc:literal] $field:ident : $ty:ty = $default:expr, $name:literal $(, [$($alias:literal),*])? ;)*) => {
        /// The settings in force for a realisation.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct Settings {
            $( #[doc = $doc] pub $field: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl Settings {
            /// Every setting firn knows.
            pub const INFO: &'static [SettingInfo] = &[
                $( SettingInfo { name: $name, aliases: &[$($($alias),*)?], doc: $doc.trim_ascii() }, )*
            ];

            /// Set `name` (a Nix setting name or alias) from its text.
            pub fn set(&mut self, name: &str, value: &str) -> Result<(), SettingError> {
                $(
                    if name == $name $($(|| name == $alias)*)? {
                        self.$field = <$ty as SettingValue>::parse($name, value)?;
                        return Ok(());
                    }
                )*
                Err(SettingError::Unknown(name.to_owned()))
            }

            /// `extra-NAME VALUE`: append to the list setting `name`. `Ok(false)` when
            /// `name` is not a list setting of firn's.
            fn append(&mut self, name: &str, value: &str) -> Result<bool, SettingError> {
                $(
                    if name == $name $($(|| name == $alias)*)? {
                        let more = <$ty as SettingValue>::parse($name, value)?;
                        return Ok(SettingValue::append(&mut self.$field, more));
                    }
                )*
                Ok(false)
            }

            /// Every setting with its value as text, by name (`nix show-config`).
            pub fn show(&self) -> Vec<(&'static str, String)> {
                vec![ $( ($name, SettingValue::show(&self.$field)), )* ]
            }
        }
    };
}

settings! {
    /// Builds to run at once (an integer or `auto`).
    max_jobs: MaxJobs = MaxJobs(1), "max-jobs", ["build-max-jobs"];
    /// `NIX_BUILD_CORES` of each build; 0 means every core. Default: the number of CPUs.
    cores: u32 = available_cpus() as u32, "cores", ["build-cores"];
    /// Kill a build that runs longer than this many seconds (0: no limit).
    timeout: Seconds = Seconds(None), "timeout", ["build-timeout"];
    /// Kill a build that writes no output for this many seconds (0: no limit).
    max_silent_time: Seconds = Seconds(None), "max-silent-time", ["build-max-silent-time"];
    /// Kill a build whose log exceeds this many bytes (0: no limit).
    max_build_log_size: Bytes = Bytes(None), "max-build-log-size", ["build-max-log-size"];
    /// Keep building what does not depend on a failed build.
    keep_going: bool = false, "keep-going";
    /// Keep the build directory of failed builds.
    keep_failed: bool = false, "keep-failed";
    /// Build in the sandbox: true, false or relaxed.
    sandbox: SandboxMode = SandboxMode::On, "sandbox", ["build-use-sandbox", "build-use-chroot"];
    /// Host paths mounted read-only into the sandbox (`target=source`, `?` = optional).
    sandbox_paths: Vec<SandboxPath> = Vec::new(), "sandbox-paths", ["build-chroot-dirs", "build-sandbox-paths"];
    /// The group whose members builds run as when firn is root ('' = as the caller).
    build_users_group: String = "nixbld".to_owned(), "build-users-group";
    /// This machine's system type.
    system: String = crate::platform::this_system(), "system";
    /// Other system types this machine builds for.
    extra_platforms: StringSet = crate::platform::default_extra_platforms().into_iter().collect(), "extra-platforms", ["build-extra-platforms"];
    /// Features this machine offers to `requiredSystemFeatures`.
    system_features: StringSet = crate::platform::default_system_features().into_iter().collect(), "system-features";
    /// Experimental features enabled (`ca-derivations`, `impure-derivations` change builds).
    experimental_features: StringSet = StringSet::default(), "experimental-features";
    /// How many lines of a failed build's log its error shows when the log was not.
    log_lines: u64 = 10, "log-lines";
    /// Each build in a cgroup of its own (limits, accounting, killing all it started).
    use_cgroups: bool = true, "use-cgroups";
    /// The memory (with swap) a build may use, in bytes (0: no limit; needs cgroups).
    build_memory_max: Bytes = Bytes(None), "build-memory-max";
    /// The processes and threads a build may have at once (0: no limit; needs cgroups).
    build_pids_max: Bytes = Bytes(None), "build-pids-max";
    /// Binary caches to substitute from, before building (Nix's default: its cache).
    substituters: Strings = Strings(vec![NIXOS_CACHE.to_owned()]), "substituters", ["binary-caches"];
    /// Caches an untrusted client (of a daemon) may add to `substituters`.
    trusted_substituters: Strings = Strings::default(), "trusted-substituters", ["trusted-binary-caches"];
    /// Keys (`NAME:base64`) whose signatures make a substitute acceptable.
    trusted_public_keys: Strings = Strings(vec![NIXOS_CACHE_KEY.to_owned()]), "trusted-public-keys", ["binary-cache-public-keys"];
    /// Substitutes must be signed by a trusted key (or be content-addressed).
    require_sigs: bool = true, "require-sigs";
    /// Secret key files that sign what is copied to a cache; their public halves are trusted.
    secret_key_files: Strings = Strings::default(), "secret-key-files";
    /// Build from source when substituting fails, instead of failing.
    fallback: bool = false, "fallback", ["build-fallback"];
    /// The CA bundle (PEM) for https caches (default: `$NIX_SSL_CERT_FILE`, `$SSL_CERT_FILE`, Debian's).
    ssl_cert_file: String = firn_cache::http::default_ssl_cert_file(), "ssl-cert-file";
    /// Seconds a narinfo learnt from an HTTP cache is taken from the disk cache.
    narinfo_cache_positive_ttl: u64 = 30 * 24 * 3600, "narinfo-cache-positive-ttl";
    /// Seconds a cache's "not there" is taken from the disk cache.
    narinfo_cache_negative_ttl: u64 = 3600, "narinfo-cache-negative-ttl";
    /// The garbage collector keeps the outputs of live derivations.
    keep_outputs: bool = false, "keep-outputs", ["gc-keep-outputs"];
    /// The garbage collector keeps the derivations of live outputs.
    keep_derivations: bool = true, "keep-derivations", ["gc-keep-derivations"];
    /// Hard-link identical files of new store paths through `.links`.
    auto_optimise_store: bool = false, "auto-optimise-store";
    /// A program run after each successful build, with `DRV_PATH` and `OUT_PATHS` set.
    post_build_hook: String = String::new(), "post-build-hook";
    /// Remote machines to build on (`;`-separated; `@FILE`: a machines file).
    builders: String = default_builders(), "builders";
    /// Remote machines substitute the inputs they lack instead of receiving them.
    builders_use_substitutes: bool = false, "builders-use-substitutes";
    /// Users (names, `@group`, `*`) who may connect to `firn daemon`.
    allowed_users: Strings = Strings(vec!["*".to_owned()]), "allowed-users";
    /// Users (names, `@group`, `*`) whom `firn daemon` trusts (any setting, unsigned paths).
    trusted_users: Strings = Strings(vec!["root".to_owned()]), "trusted-users";
}

impl Settings {
    /// Whether the experimental feature `name` is enabled.
    pub fn has_feature(&self, name: &str) -> bool {
        self.experimental_features.0.contains(name)
    }

    /// Whether `ca-derivations` is enabled: content-addressed derivations are built and
    /// realisations recorded.
    pub fn ca_derivations(&self) -> bool {
        self.has_feature("ca-derivations")
    }

    /// The system features this machine has: `system-features`, plus `ca-derivations`
    /// and `recursive-nix` when those experimental features are on (Nix's
    /// `StoreConfig::getDefaultSystemFeatures`).
    pub fn effective_system_features(&self) -> std::collections::BTreeSet<String> {
        let mut f: std::collections::BTreeSet<String> =
            self.system_features.0.iter().cloned().collect();
        for x in ["ca-derivations", "recursive-nix"] {
            if self.has_feature(x) {
                f.insert(x.to_owned());
            }
        }
        f
    }
}

impl Settings {
    /// Apply `NAME = VALUE` from a settings file, `--option` or a client: `extra-NAME`
    /// appends to a list setting; a setting only Nix knows is accepted and ignored;
    /// anything else is [`SettingError::Unknown`].
    pub fn apply(&mut self, name: &str, value: &str) -> Result<Applied, SettingError> {
        // A setting whose own name starts with `extra-` (`extra-platforms`) is itself.
        if Self::is_known(name) {
            self.set(name, value)?;
            return Ok(Applied::Set);
        }
        if let Some(base) = name.strip_prefix("extra-") {
            if self.append(base, value)? {
                return Ok(Applied::Set);
            }
            if NIX_SETTINGS.contains(&base) && !Self::is_known(base) {
                return Ok(Applied::NixOnly);
            }
            return Err(SettingError::Unknown(name.to_owned()));
        }
        match self.set(name, value) {
            Ok(()) => Ok(Applied::Set),
            Err(SettingError::Unknown(_)) if NIX_SETTINGS.contains(&name) => Ok(Applied::NixOnly),
            Err(e) => Err(e),
        }
    }

    /// The setting `name` (or an alias of it) is, if firn knows it.
    pub fn canonical_name(name: &str) -> Option<&'static str> {
        Self::INFO
            .iter()
            .find(|i| i.name == name || i.aliases.contains(&name))
            .map(|i| i.name)
    }

    /// Whether `name` is a setting (or alias) firn knows.
    pub fn is_known(name: &str) -> bool {
        Self::INFO
            .iter()
            .any(|i| i.name == name || i.aliases.contains(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_parser_per_type_with_nix_messages() {
        let mut s = Settings::default();
        s.set("keep-going", "yes").unwrap();
        assert!(s.keep_going);
        s.set("keep-going", "0").unwrap();
        assert!(!s.keep_going);
        assert_eq!(
            s.set("keep-going", "maybe").unwrap_err().to_string(),
            "Boolean setting 'keep-going' has invalid value 'maybe'"
        );
        assert_eq!(
            s.set("cores", "abc").unwrap_err().to_string(),
            "setting 'cores' has invalid value 'abc'"
        );
        assert_eq!(
            s.set("max-jobs", "x").unwrap_err().to_string(),
            "configuration setting 'max-jobs' should be 'auto' or an integer"
        );
        assert_eq!(
            s.set("sandbox", "maybe").unwrap_err().to_string(),
            "option 'sandbox' has invalid value 'maybe'"
        );
        assert_eq!(
            s.set("timeout", "-1").unwrap_err().to_string(),
            "setting 'timeout' has invalid value '-1'"
        );
        assert_eq!(
            s.set("foo-bar", "1").unwrap_err(),
            SettingError::Unknown("foo-bar".into())
        );
        // A failed set leaves the value alone.
        s.set("cores", "3").unwrap();
        assert!(s.set("cores", "x").is_err());
        assert_eq!(s.cores, 3);
    }

    #[test]
    fn typed_values() {
        let mut s = Settings::default();
        assert_eq!(s.sandbox, SandboxMode::On);
        assert_eq!(s.max_jobs, MaxJobs(1));
        s.set("sandbox", "relaxed").unwrap();
        assert_eq!(s.sandbox, SandboxMode::Relaxed);
        s.set("build-use-sandbox", "false").unwrap();
        assert_eq!(s.sandbox, SandboxMode::Off);
        s.set("max-jobs", "auto").unwrap();
        assert_eq!(s.max_jobs.0, available_cpus());
        s.set("timeout", "0").unwrap();
        assert_eq!(s.timeout, Seconds(None));
        s.set("max-silent-time", "7").unwrap();
        assert_eq!(s.max_silent_time, Seconds(Some(Duration::from_secs(7))));
        s.set("max-build-log-size", "100").unwrap();
        assert_eq!(s.max_build_log_size, Bytes(Some(100)));
        s.set("sandbox-paths", "/bin/sh=/bin/busybox /opt/x?")
            .unwrap();
        assert_eq!(
            s.sandbox_paths,
            vec![
                SandboxPath {
                    target: "/bin/sh".into(),
                    source: "/bin/busybox".into(),
                    optional: false
                },
                SandboxPath {
                    target: "/opt/x".into(),
                    source: "/opt/x".into(),
                    optional: true
                }
            ]
        );
        let shown = s.show();
        assert!(shown.contains(&("sandbox-paths", "/bin/sh=/bin/busybox /opt/x?".to_owned())));
        assert!(shown.contains(&("sandbox", "false".to_owned())));
        assert!(Settings::is_known("gc-keep-outputs"));
        // extra- appends to lists; Nix's own settings are accepted; typos are not.
        s.apply("extra-sandbox-paths", "/y").unwrap();
        assert_eq!(s.sandbox_paths.len(), 3);
        assert_eq!(s.sandbox_paths[2].target, PathBuf::from("/y"));
        // (After Nix's default cache, as Nix appends them.)
        s.apply("extra-substituters", "a b").unwrap();
        s.apply("extra-substituters", "c").unwrap();
        assert_eq!(s.substituters.0, [NIXOS_CACHE, "a", "b", "c"]);
        assert_eq!(
            s.apply("fsync-metadata", "false").unwrap(),
            Applied::NixOnly
        );
        s.apply("extra-trusted-users", "u").unwrap();
        assert_eq!(s.trusted_users.0, ["root", "u"]);
        s.apply("extra-platforms", "aarch64-linux").unwrap();
        assert_eq!(s.extra_platforms.show(), "aarch64-linux");
        s.apply("extra-extra-platforms", "i686-linux").unwrap();
        assert_eq!(s.extra_platforms.show(), "aarch64-linux i686-linux");
        assert_eq!(
            s.apply("extra-allowed-uris", "u").unwrap(),
            Applied::NixOnly
        );
        assert_eq!(
            s.apply("extra-cores", "2").unwrap_err(),
            SettingError::Unknown("extra-cores".into())
        );
        assert_eq!(
            s.apply("sandbx", "true").unwrap_err(),
            SettingError::Unknown("sandbx".into())
        );
        assert!(!Settings::is_known("nope"));
    }
}
