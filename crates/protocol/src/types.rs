//! Composite values both protocols send, in their Nix 2.8 wire forms.
//!
//! ```text
//! ContentAddress        = "text:sha256:<nixbase32>" | "fixed:" ["r:"] <algo> ":" <nixbase32>
//! ContentAddressMethod  = "text:sha256" | "fixed:" ["r:"] <algo>
//! DerivedPath           = <path> | <drv path> "!" ("*" | <output> ("," <output>)*)
//! ValidPathInfo         = [path] deriver:opt-path narHash:string(base16, no prefix)
//!                         references:list<path> registrationTime:int narSize:int
//!                         ultimate:bool sigs:list<string> ca:string("" = none)
//! BuildResult (1.34)    = status:int errorMsg:string timesBuilt:int isNonDeterministic:bool
//!                         startTime:int stopTime:int builtOutputs:map<string,string>
//! BasicDerivation       = int n, n × (name, path|"", hashAlgo, hash)   (outputs, by name)
//!                         inputSrcs:list<path> platform:string builder:string
//!                         args:list<string> env:map<string,string>
//! ```
//!
//! Numbers of enums (Nix 2.8): `BuildMode` (store-api.hh), `BuildStatus`
//! (build-result.hh), `GcAction` (gc-store.hh), `Verbosity` (logging.hh).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};

use firn_derivation::{FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath};

pub use crate::basic_derivation::{BasicDerivation, WireOutput};
use crate::wire::{Reader, WireError, WireResult, Writer};

/// Define a fieldless enum with fixed wire numbers.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $what:literal {
        $($(#[$vm:meta])* $var:ident = $num:literal),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $var = $num),* }

        impl $name {
            /// Every value, in number order.
            pub const ALL: &'static [$name] = &[$($name::$var),*];

            /// The value with wire number `v`.
            pub fn from_u64(v: u64) -> Option<Self> {
                match v {
                    $($num => Some(Self::$var),)*
                    _ => None,
                }
            }

            /// The wire number.
            pub fn to_u64(self) -> u64 {
                self as u64
            }

            /// The name (Nix's, without its prefix).
            pub fn name(self) -> &'static str {
                match self { $(Self::$var => stringify!($var)),* }
            }

            /// Read the number; an unknown one is an error naming it.
            pub fn read<R: ::std::io::Read>(
                r: &mut $crate::wire::Reader<R>,
                what: &'static str,
            ) -> $crate::wire::WireResult<Self> {
                let pos = r.position();
                let v = r.read_u64(what)?;
                Self::from_u64(v).ok_or_else(|| $crate::wire::WireError::Invalid {
                    pos,
                    what,
                    message: format!(concat!("unknown ", $what, " {}"), v),
                })
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum! {
    /// How to build (`BuildMode`).
    BuildMode: "build mode" { Normal = 0, Repair = 1, Check = 2 }
}

wire_enum! {
    /// `BuildResult::Status`.
    BuildStatus: "build status" {
        Built = 0, Substituted = 1, AlreadyValid = 2, PermanentFailure = 3,
        InputRejected = 4, OutputRejected = 5, TransientFailure = 6, CachedFailure = 7,
        TimedOut = 8, MiscFailure = 9, DependencyFailed = 10, LogLimitExceeded = 11,
        NotDeterministic = 12, ResolvesToAlreadyValid = 13, NoSubstituters = 14,
    }
}

impl BuildStatus {
    /// Built, Substituted, AlreadyValid or ResolvesToAlreadyValid (`BuildResult::success`).
    pub fn is_success(self) -> bool {
        matches!(
            self,
            Self::Built | Self::Substituted | Self::AlreadyValid | Self::ResolvesToAlreadyValid
        )
    }
}

wire_enum! {
    /// `GCOptions::GCAction`.
    GcAction: "garbage collector action" {
        ReturnLive = 0, ReturnDead = 1, DeleteDead = 2, DeleteSpecific = 3,
    }
}

wire_enum! {
    /// Log levels (`Verbosity`, `lvl*`).
    Verbosity: "verbosity" {
        Error = 0, Warn = 1, Notice = 2, Info = 3, Talkative = 4, Chatty = 5, Debug = 6,
        Vomit = 7,
    }
}

impl Verbosity {
    /// Read a level as Nix does (a plain cast, no check): `nix -vvvvvvvv` sends 8 and
    /// more, which log exactly what `Vomit` logs (Nix compares `level <= verbosity`), so
    /// anything above 7 reads as `Vomit`.
    pub fn read_saturating<R: ::std::io::Read>(
        r: &mut crate::wire::Reader<R>,
        what: &'static str,
    ) -> crate::wire::WireResult<Self> {
        let v = r.read_u64(what)?;
        Ok(Self::from_u64(v.min(7)).unwrap_or(Self::Vomit))
    }
}

/// A content address (`ContentAddress`): the derivation crate's, shared with the store.
pub use firn_derivation::ContentAddress;

/// How AddToStore's data is to be added (`ContentAddressMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentAddressMethod {
    /// `text:sha256`: the data is the file's text.
    Text,
    /// `fixed:r:<algo>` (the data is a NAR) or `fixed:<algo>` (the data is the file).
    Fixed {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
}

impl ContentAddressMethod {
    /// Parse as `parseContentAddressMethod` does.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("text:") {
            if rest != "sha256" {
                return Err(format!("text content address '{s}' must use sha256"));
            }
            Ok(Self::Text)
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            let (method, rest) = match rest.strip_prefix("r:") {
                Some(r) => (FileIngestionMethod::Recursive, r),
                None => (FileIngestionMethod::Flat, rest),
            };
            let algo = HashAlgo::parse(rest).map_err(|e| e.to_string())?;
            Ok(Self::Fixed { method, algo })
        } else {
            Err(format!(
                "content address method '{s}' has an unknown prefix"
            ))
        }
    }
}

impl fmt::Display for ContentAddressMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text => f.write_str("text:sha256"),
            Self::Fixed { method, algo } => write!(f, "fixed:{}{}", method.prefix(), algo),
        }
    }
}

/// Read an optional content address (`""` = none).
pub fn read_opt_ca<R: Read>(
    r: &mut Reader<R>,
    what: &'static str,
) -> WireResult<Option<ContentAddress>> {
    let pos = r.position();
    let s = r.read_string(what)?;
    if s.is_empty() {
        return Ok(None);
    }
    ContentAddress::parse(&s)
        .map(Some)
        .map_err(|message| WireError::Invalid { pos, what, message })
}

/// Write an optional content address.
pub fn write_opt_ca<W: Write>(w: &mut Writer<W>, ca: Option<&ContentAddress>) -> io::Result<()> {
    match ca {
        Some(ca) => w.write_str(&ca.to_string()),
        None => w.write_str(""),
    }
}

/// What to build or make valid (`DerivedPath`, protocol ≥ 1.30 string form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DerivedPath {
    /// A store path that must be valid (built, substituted or present).
    Opaque(StorePath),
    /// Outputs of a derivation; an empty set means all (`!*`).
    Built {
        drv_path: StorePath,
        outputs: BTreeSet<String>,
    },
}

impl DerivedPath {
    /// Parse `path` or `drv!out1,out2` / `drv!*` as `DerivedPath::parse` does.
    pub fn parse(dir: &StoreDir, s: &str) -> Result<Self, String> {
        match s.split_once('!') {
            None => dir.parse(s).map(Self::Opaque).map_err(|e| e.to_string()),
            Some((drv, outs)) => {
                let drv_path = dir.parse(drv).map_err(|e| e.to_string())?;
                let outputs = if outs == "*" {
                    BTreeSet::new()
                } else {
                    // tokenizeString: empty tokens are skipped.
                    outs.split(',')
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned)
                        .collect()
                };
                Ok(Self::Built { drv_path, outputs })
            }
        }
    }

    /// The string form (`DerivedPath::to_string`).
    pub fn to_string(&self, dir: &StoreDir) -> String {
        match self {
            Self::Opaque(p) => dir.display(p),
            Self::Built { drv_path, outputs } => {
                let mut s = dir.display(drv_path);
                s.push('!');
                if outputs.is_empty() {
                    s.push('*');
                } else {
                    let v: Vec<&str> = outputs.iter().map(String::as_str).collect();
                    s.push_str(&v.join(","));
                }
                s
            }
        }
    }

    pub fn read<R: Read>(r: &mut Reader<R>, what: &'static str) -> WireResult<Self> {
        let pos = r.position();
        let s = r.read_string(what)?;
        Self::parse(r.store_dir(), &s).map_err(|message| WireError::Invalid { pos, what, message })
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        let s = self.to_string(w.store_dir());
        w.write_str(&s)
    }

    pub fn read_list<R: Read>(r: &mut Reader<R>, what: &'static str) -> WireResult<Vec<Self>> {
        let n = r.read_count(what)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(Self::read(r, what)?);
        }
        Ok(v)
    }

    pub fn write_list<W: Write>(w: &mut Writer<W>, paths: &[Self]) -> io::Result<()> {
        w.write_u64(paths.len() as u64)?;
        paths.iter().try_for_each(|p| p.write(w))
    }
}

/// A path's metadata without the path itself (the QueryPathInfo reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnkeyedValidPathInfo {
    pub deriver: Option<StorePath>,
    /// Always sha256.
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    /// Unix seconds.
    pub registration_time: u64,
    pub nar_size: u64,
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

impl UnkeyedValidPathInfo {
    /// Read the fields after the path (format ≥ 16). The hash is read as `Hash::parseAny`
    /// with sha256: base16, nixbase32 or base64, prefixed or not, or SRI.
    pub fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        let deriver = r.read_opt_store_path("deriver")?;
        let pos = r.position();
        let h = r.read_string("narHash")?;
        let nar_hash =
            Hash::parse_any(&h, Some(HashAlgo::Sha256)).map_err(|e| WireError::Invalid {
                pos,
                what: "narHash",
                message: e.to_string(),
            })?;
        Ok(Self {
            deriver,
            nar_hash,
            references: r.read_store_path_set("references")?,
            registration_time: r.read_u64("registrationTime")?,
            nar_size: r.read_u64("narSize")?,
            ultimate: r.read_bool("ultimate")?,
            sigs: r.read_string_set("sigs")?,
            ca: read_opt_ca(r, "ca")?,
        })
    }

    /// Write the fields after the path; the hash as base16 without a prefix.
    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_opt_store_path(self.deriver.as_ref())?;
        w.write_str(&self.nar_hash.to_base16())?;
        w.write_store_paths(&self.references)?;
        w.write_u64(self.registration_time)?;
        w.write_u64(self.nar_size)?;
        w.write_bool(self.ultimate)?;
        w.write_strings(&self.sigs)?;
        write_opt_ca(w, self.ca.as_ref())
    }
}

/// A path and its metadata (`ValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    pub info: UnkeyedValidPathInfo,
}

impl UnkeyedValidPathInfo {
    /// A database path info on the wire.
    pub fn from_store(i: &firn_store::ValidPathInfo) -> Self {
        Self {
            deriver: i.deriver.clone(),
            nar_hash: i.nar_hash,
            references: i.references.clone(),
            registration_time: u64::try_from(i.registration_time).unwrap_or(0),
            nar_size: i.nar_size,
            ultimate: i.ultimate,
            sigs: i.sigs.iter().cloned().collect(),
            ca: i.ca.as_deref().and_then(|c| ContentAddress::parse(c).ok()),
        }
    }
}

impl ValidPathInfo {
    pub fn from_store(i: &firn_store::ValidPathInfo) -> Self {
        Self {
            path: i.path.clone(),
            info: UnkeyedValidPathInfo::from_store(i),
        }
    }

    /// A wire path info for the database (never `ultimate`: it came from elsewhere).
    pub fn to_store(&self) -> firn_store::ValidPathInfo {
        firn_store::ValidPathInfo {
            path: self.path.clone(),
            nar_hash: self.info.nar_hash,
            nar_size: self.info.nar_size,
            references: self.info.references.clone(),
            deriver: self.info.deriver.clone(),
            registration_time: i64::try_from(self.info.registration_time).unwrap_or(0),
            ultimate: false,
            sigs: self.info.sigs.iter().cloned().collect(),
            ca: self.info.ca.map(|c| c.to_string()),
        }
    }

    /// The "with path" form: the path, then [`UnkeyedValidPathInfo`].
    pub fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        let path = r.read_store_path("path")?;
        Ok(Self {
            path,
            info: UnkeyedValidPathInfo::read(r)?,
        })
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_store_path(&self.path)?;
        self.info.write(w)
    }
}

/// Map from `DrvOutput` strings (`sha256:<hex>!out`) to `Realisation` JSON, kept as text.
pub type DrvOutputs = BTreeMap<String, String>;

/// The outcome of building one thing (`BuildResult`, 1.34 form, without its path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    pub times_built: u32,
    pub is_non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    pub built_outputs: DrvOutputs,
}

impl BuildResult {
    /// A result with just a status (zero times, no outputs).
    pub fn new(status: BuildStatus, error_msg: impl Into<String>) -> Self {
        Self {
            status,
            error_msg: error_msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: DrvOutputs::new(),
        }
    }

    /// status, errorMsg, timesBuilt, isNonDeterministic, startTime, stopTime, builtOutputs.
    pub fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        Ok(Self {
            status: BuildStatus::read(r, "status")?,
            error_msg: r.read_string("errorMsg")?,
            times_built: r.read_u32("timesBuilt")?,
            is_non_deterministic: r.read_bool("isNonDeterministic")?,
            start_time: r.read_u64("startTime")?,
            stop_time: r.read_u64("stopTime")?,
            built_outputs: r.read_string_map("builtOutputs")?,
        })
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_u64(self.status.to_u64())?;
        w.write_str(&self.error_msg)?;
        w.write_u64(u64::from(self.times_built))?;
        w.write_bool(self.is_non_deterministic)?;
        w.write_u64(self.start_time)?;
        w.write_u64(self.stop_time)?;
        w.write_string_map(&self.built_outputs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn content_addresses_round_trip() {
        for s in [
            "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:sha1:0mdqa9w1p6cmli6976v4wi0sw9r4p5pr",
        ] {
            assert_eq!(ContentAddress::parse(s).unwrap().to_string(), s);
        }
        assert!(ContentAddress::parse("text:sha1:0mdqa9w1p6cmli6976v4wi0sw9r4p5pr").is_err());
        assert!(ContentAddress::parse("fixed:r:sha256:zz").is_err());
        for s in [
            "text:sha256",
            "fixed:r:sha256",
            "fixed:sha512",
            "fixed:r:md5",
        ] {
            assert_eq!(ContentAddressMethod::parse(s).unwrap().to_string(), s);
        }
        assert!(ContentAddressMethod::parse("text:sha1").is_err());
        assert!(ContentAddressMethod::parse("nar:sha256").is_err());
    }

    #[test]
    fn derived_paths() {
        let dir = StoreDir::default();
        for s in [
            "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single",
            "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single.drv!*",
            "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single.drv!dev,out",
        ] {
            assert_eq!(DerivedPath::parse(&dir, s).unwrap().to_string(&dir), s);
        }
        assert!(DerivedPath::parse(&dir, "/tmp/x!out").is_err());
    }
}
