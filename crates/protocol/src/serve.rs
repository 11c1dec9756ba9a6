//! The legacy serve protocol (`nix-store --serve`), version 2.x as Nix 2.8 speaks it
//! (serve-protocol.hh, nix-store.cc `opServe`, legacy-ssh-store.cc). No stderr channel:
//! replies go straight to stdout.
//!
//! ```text
//! handshake   C→S int SERVE_MAGIC_1 (0x390c9deb), int clientVersion (0x207 = 2.7)
//!             S→C int SERVE_MAGIC_2 (0x5452eecb), int SERVE_PROTOCOL_VERSION (0x207)
//! command     C→S int cmd, arguments             S→C reply
//!  1 QueryValidPaths  bool lock, bool substitute, list<path>   → list<path>
//!  2 QueryPathInfos   list<path>  → { path, deriver, refs, int downloadSize, int narSize,
//!                     string narHash("sha256:<nixbase32>"), string ca, list<string> sigs }*
//!                     terminated by ""  (invalid paths are left out)
//!  3 DumpStorePath    path                          → raw NAR
//!  4 ImportPaths      export stream                 → int 1
//!  5 ExportPaths      int 0 (obsolete), list<path>  → export stream
//!  6 BuildPaths       list<string path[!outs]>, BuildSettings → int 0 | int status, msg
//!  7 QueryClosure     bool includeOutputs, list<path>   → list<path>
//!  8 BuildDerivation  path drv, BasicDerivation, BuildSettings → BuildResult (no path)
//!  9 AddToStoreNar    ValidPathInfo with path (narHash base16), narSize raw NAR bytes
//!                     → int 1
//! BuildSettings = int maxSilentTime, int buildTimeout, int maxLogSize (≥2.2),
//!                 int buildRepeat, bool enforceDeterminism (≥2.3), bool keepFailed (≥2.7)
//! BuildResult   = int status, string errorMsg, (≥2.3) int timesBuilt, bool isNonDet,
//!                 int startTime, int stopTime, map<string,string> builtOutputs
//!                 (2.8's server always sends builtOutputs: `GET_PROTOCOL_MINOR(v >= 6)`)
//! export stream = { int 1, NAR, int 0x4558494e, path, list<path> refs, opt-path deriver,
//!                   int 0 | int 1 string (legacy signature, ignored) }*, int 0
//! ```
//!
//! Arguments are decoded for a client of any 2.x version ≥ 2.4 (what Nix 2.8's
//! LegacySSHStore requires of servers, and so what a 2.8 client is); the version is the
//! client's, from [`read_client_hello`].

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use firn_derivation::{Hash, HashAlgo, StorePath};
use thiserror::Error;

use crate::types::{
    read_opt_ca, wire_enum, write_opt_ca, BasicDerivation, BuildResult, ContentAddress,
    DerivedPath, UnkeyedValidPathInfo, ValidPathInfo,
};
use crate::wire::{Reader, WireError, WireResult, Writer};

pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// 2.7, the serve version of Nix 2.8.
pub const SERVE_PROTOCOL_VERSION: u64 = 2 << 8 | 7;
/// The marker between a NAR and its metadata in an export stream.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

wire_enum! {
    /// `ServeCommand`.
    Command: "serve command" {
        QueryValidPaths = 1, QueryPathInfos = 2, DumpStorePath = 3, ImportPaths = 4,
        ExportPaths = 5, BuildPaths = 6, QueryClosure = 7, BuildDerivation = 8,
        AddToStoreNar = 9,
    }
}

/// Errors of the serve protocol.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("'nix-store --serve' protocol mismatch: expected magic 0x{expected:x}, got 0x{got:x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("unsupported 'nix-store --serve' protocol version {}.{}", .0 >> 8, .0 & 0xff)]
    UnsupportedVersion(u64),
    #[error("unknown serve command {0}")]
    UnknownCommand(u64),
    #[error("serve command {cmd} ({}): {source}", .cmd.to_u64())]
    Command {
        cmd: Command,
        #[source]
        source: WireError,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl ServeError {
    pub fn is_eof(&self) -> bool {
        match self {
            Self::Command { source, .. } | Self::Wire(source) => source.is_eof(),
            _ => false,
        }
    }
}

fn check_version(v: u64) -> Result<(), ServeError> {
    if v & 0xff00 != 0x200 || v & 0xff < 4 || v > 0xffff {
        return Err(ServeError::UnsupportedVersion(v));
    }
    Ok(())
}

/// Server side: the client's magic and version (must be 2.4 or newer).
pub fn read_client_hello<R: Read>(r: &mut Reader<R>) -> Result<u64, ServeError> {
    let got = r.read_u64("magic")?;
    if got != SERVE_MAGIC_1 {
        return Err(ServeError::BadMagic {
            expected: SERVE_MAGIC_1,
            got,
        });
    }
    let v = r.read_u64("client version")?;
    check_version(v)?;
    Ok(v)
}

/// Server side: magic and [`SERVE_PROTOCOL_VERSION`] (then flush).
pub fn write_server_hello<W: Write>(w: &mut Writer<W>) -> io::Result<()> {
    w.write_u64(SERVE_MAGIC_2)?;
    w.write_u64(SERVE_PROTOCOL_VERSION)
}

/// Client side: magic and version.
pub fn write_client_hello<W: Write>(w: &mut Writer<W>, version: u64) -> io::Result<()> {
    w.write_u64(SERVE_MAGIC_1)?;
    w.write_u64(version)
}

/// Client side: the server's magic and version.
pub fn read_server_hello<R: Read>(r: &mut Reader<R>) -> Result<u64, ServeError> {
    let got = r.read_u64("magic")?;
    if got != SERVE_MAGIC_2 {
        return Err(ServeError::BadMagic {
            expected: SERVE_MAGIC_2,
            got,
        });
    }
    let v = r.read_u64("server version")?;
    check_version(v)?;
    Ok(v)
}

/// The build settings block of BuildPaths and BuildDerivation (`getBuildSettings`).
/// Fields the client's version does not send stay at their values here (0 / false).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildSettings {
    pub max_silent_time: u64,
    pub build_timeout: u64,
    pub max_log_size: u64,
    pub build_repeat: u64,
    pub enforce_determinism: bool,
    pub keep_failed: bool,
}

impl BuildSettings {
    pub fn read<R: Read>(r: &mut Reader<R>, version: u64) -> WireResult<Self> {
        let minor = version & 0xff;
        let mut s = Self {
            max_silent_time: r.read_u64("maxSilentTime")?,
            build_timeout: r.read_u64("buildTimeout")?,
            ..Self::default()
        };
        if minor >= 2 {
            s.max_log_size = r.read_u64("maxLogSize")?;
        }
        if minor >= 3 {
            s.build_repeat = r.read_u64("buildRepeat")?;
            s.enforce_determinism = r.read_bool("enforceDeterminism")?;
        }
        if minor >= 7 {
            s.keep_failed = r.read_bool("keepFailed")?;
        }
        Ok(s)
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>, version: u64) -> io::Result<()> {
        let minor = version & 0xff;
        w.write_u64(self.max_silent_time)?;
        w.write_u64(self.build_timeout)?;
        if minor >= 2 {
            w.write_u64(self.max_log_size)?;
        }
        if minor >= 3 {
            w.write_u64(self.build_repeat)?;
            w.write_bool(self.enforce_determinism)?;
        }
        if minor >= 7 {
            w.write_bool(self.keep_failed)?;
        }
        Ok(())
    }
}

/// A decoded serve command with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeRequest {
    QueryValidPaths {
        lock: bool,
        substitute: bool,
        paths: BTreeSet<StorePath>,
    },
    QueryPathInfos(BTreeSet<StorePath>),
    DumpStorePath(StorePath),
    /// An export stream follows (see [`read_export_marker`]).
    ImportPaths,
    ExportPaths(BTreeSet<StorePath>),
    BuildPaths {
        /// `path` or `drv!out1,out2` (`StorePathWithOutputs`).
        paths: Vec<DerivedPath>,
        settings: BuildSettings,
    },
    QueryClosure {
        include_outputs: bool,
        paths: BTreeSet<StorePath>,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        settings: BuildSettings,
    },
    /// Exactly `info.info.nar_size` raw NAR bytes follow.
    AddToStoreNar(ValidPathInfo),
}

impl ServeRequest {
    pub fn command(&self) -> Command {
        match self {
            Self::QueryValidPaths { .. } => Command::QueryValidPaths,
            Self::QueryPathInfos(_) => Command::QueryPathInfos,
            Self::DumpStorePath(_) => Command::DumpStorePath,
            Self::ImportPaths => Command::ImportPaths,
            Self::ExportPaths(_) => Command::ExportPaths,
            Self::BuildPaths { .. } => Command::BuildPaths,
            Self::QueryClosure { .. } => Command::QueryClosure,
            Self::BuildDerivation { .. } => Command::BuildDerivation,
            Self::AddToStoreNar(_) => Command::AddToStoreNar,
        }
    }

    /// Read the next command; `None` if the client closed the connection cleanly.
    pub fn read<R: Read>(r: &mut Reader<R>, version: u64) -> Result<Option<Self>, ServeError> {
        let start = r.position();
        let n = match r.read_u64("command") {
            Ok(n) => n,
            Err(e) if e.is_eof() && r.position() == start => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let cmd = Command::from_u64(n).ok_or(ServeError::UnknownCommand(n))?;
        Self::read_args(cmd, r, version)
            .map(Some)
            .map_err(|source| ServeError::Command { cmd, source })
    }

    /// The arguments of `cmd`, whose number was read already (a server that decides on
    /// the command before its arguments, as Nix's refuses writes without `--write`).
    pub fn read_command<R: Read>(
        cmd: Command,
        r: &mut Reader<R>,
        version: u64,
    ) -> Result<Self, ServeError> {
        Self::read_args(cmd, r, version).map_err(|source| ServeError::Command { cmd, source })
    }

    fn read_args<R: Read>(cmd: Command, r: &mut Reader<R>, version: u64) -> WireResult<Self> {
        Ok(match cmd {
            Command::QueryValidPaths => Self::QueryValidPaths {
                lock: r.read_bool("lock")?,
                substitute: r.read_bool("substitute")?,
                paths: r.read_store_path_set("paths")?,
            },
            Command::QueryPathInfos => Self::QueryPathInfos(r.read_store_path_set("paths")?),
            Command::DumpStorePath => Self::DumpStorePath(r.read_store_path("path")?),
            Command::ImportPaths => Self::ImportPaths,
            Command::ExportPaths => {
                let _sign = r.read_u32("obsolete sign flag")?;
                Self::ExportPaths(r.read_store_path_set("paths")?)
            }
            Command::BuildPaths => Self::BuildPaths {
                paths: DerivedPath::read_list(r, "paths")?,
                settings: BuildSettings::read(r, version)?,
            },
            Command::QueryClosure => Self::QueryClosure {
                include_outputs: r.read_bool("includeOutputs")?,
                paths: r.read_store_path_set("paths")?,
            },
            Command::BuildDerivation => Self::BuildDerivation {
                drv_path: r.read_store_path("drvPath")?,
                drv: BasicDerivation::read(r)?,
                settings: BuildSettings::read(r, version)?,
            },
            Command::AddToStoreNar => Self::AddToStoreNar(ValidPathInfo::read(r)?),
        })
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>, version: u64) -> io::Result<()> {
        w.write_u64(self.command().to_u64())?;
        match self {
            Self::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                w.write_bool(*lock)?;
                w.write_bool(*substitute)?;
                w.write_store_paths(paths)
            }
            Self::QueryPathInfos(paths) => w.write_store_paths(paths),
            Self::DumpStorePath(p) => w.write_store_path(p),
            Self::ImportPaths => Ok(()),
            Self::ExportPaths(paths) => {
                w.write_u64(0)?;
                w.write_store_paths(paths)
            }
            Self::BuildPaths { paths, settings } => {
                DerivedPath::write_list(w, paths)?;
                settings.write(w, version)
            }
            Self::QueryClosure {
                include_outputs,
                paths,
            } => {
                w.write_bool(*include_outputs)?;
                w.write_store_paths(paths)
            }
            Self::BuildDerivation {
                drv_path,
                drv,
                settings,
            } => {
                w.write_store_path(drv_path)?;
                drv.write(w)?;
                settings.write(w, version)
            }
            Self::AddToStoreNar(info) => info.write(w),
        }
    }
}

/// One entry of the QueryPathInfos reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServePathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
    /// Sent as `sha256:<nixbase32>` (the client requires the prefix).
    pub nar_hash: Hash,
    pub ca: Option<ContentAddress>,
    pub sigs: BTreeSet<String>,
}

impl ServePathInfo {
    /// The entry for `path` described by `info` (downloadSize = narSize, as Nix).
    pub fn from_info(path: StorePath, info: &UnkeyedValidPathInfo) -> Self {
        Self {
            path,
            deriver: info.deriver.clone(),
            references: info.references.clone(),
            download_size: info.nar_size,
            nar_size: info.nar_size,
            nar_hash: info.nar_hash,
            ca: info.ca,
            sigs: info.sigs.clone(),
        }
    }

    /// The local info of a path the remote describes (registered as imported, not
    /// `ultimate`; the registration time is the importer's).
    pub fn to_store(&self) -> firn_store::ValidPathInfo {
        firn_store::ValidPathInfo {
            path: self.path.clone(),
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references.clone(),
            deriver: self.deriver.clone(),
            registration_time: 0,
            ultimate: false,
            sigs: self.sigs.iter().cloned().collect(),
            ca: self.ca.map(|c| c.to_string()),
        }
    }
}

/// Write the QueryPathInfos reply, with its `""` terminator.
pub fn write_path_infos<W: Write>(w: &mut Writer<W>, infos: &[ServePathInfo]) -> io::Result<()> {
    for i in infos {
        w.write_store_path(&i.path)?;
        w.write_opt_store_path(i.deriver.as_ref())?;
        w.write_store_paths(&i.references)?;
        w.write_u64(i.download_size)?;
        w.write_u64(i.nar_size)?;
        w.write_str(&format!("sha256:{}", i.nar_hash.to_nixbase32()))?;
        write_opt_ca(w, i.ca.as_ref())?;
        w.write_strings(&i.sigs)?;
    }
    w.write_str("")
}

/// Read the QueryPathInfos reply up to its terminator. The hash must carry its prefix
/// (`parseAnyPrefixed`).
pub fn read_path_infos<R: Read>(r: &mut Reader<R>) -> WireResult<Vec<ServePathInfo>> {
    let mut v = Vec::new();
    loop {
        let pos = r.position();
        let p = r.read_bytes("path")?;
        if p.is_empty() {
            return Ok(v);
        }
        if v.len() as u64 >= r.limits().max_items {
            return Err(WireError::TooMany {
                pos,
                what: "path infos",
                count: v.len() as u64 + 1,
                limit: r.limits().max_items,
            });
        }
        let path = r
            .store_dir()
            .parse_path(&p)
            .map_err(|source| WireError::StorePath {
                pos,
                what: "path",
                source,
            })?;
        let deriver = r.read_opt_store_path("deriver")?;
        let references = r.read_store_path_set("references")?;
        let download_size = r.read_u64("downloadSize")?;
        let nar_size = r.read_u64("narSize")?;
        let hpos = r.position();
        let h = r.read_string("narHash")?;
        let bad = |message: String| WireError::Invalid {
            pos: hpos,
            what: "narHash",
            message,
        };
        if !h.contains(':') && !h.contains('-') {
            return Err(bad(format!("hash '{h}' does not include a type")));
        }
        let nar_hash = Hash::parse_any(&h, None).map_err(|e| bad(e.to_string()))?;
        if nar_hash.algo() != HashAlgo::Sha256 {
            return Err(bad(format!("hash '{h}' is not sha256")));
        }
        v.push(ServePathInfo {
            path,
            deriver,
            references,
            download_size,
            nar_size,
            nar_hash,
            ca: read_opt_ca(r, "ca")?,
            sigs: r.read_string_set("sigs")?,
        });
    }
}

/// The BuildPaths reply: `Ok` is int 0, a failure the exit status Nix's `buildPaths`
/// gives (`Worker::exitStatus`: 100 build failure, 101 timeout, 102 hash mismatch, 104
/// not deterministic, 1 otherwise; not a `BuildStatus`) and the message.
pub fn write_build_paths_reply<W: Write>(
    w: &mut Writer<W>,
    result: Result<(), (u64, &str)>,
) -> io::Result<()> {
    match result {
        Ok(()) => w.write_u64(0),
        Err((status, msg)) => {
            w.write_u64(status)?;
            w.write_str(msg)
        }
    }
}

/// Read the BuildPaths reply (the client reads the message for any nonzero int).
pub fn read_build_paths_reply<R: Read>(r: &mut Reader<R>) -> WireResult<Result<(), (u64, String)>> {
    let v = r.read_u64("status")?;
    if v == 0 {
        return Ok(Ok(()));
    }
    Ok(Err((v, r.read_string("errorMsg")?)))
}

/// The BuildDerivation reply for a client of `version` (times from 2.3; builtOutputs
/// always, as 2.8's server does).
pub fn write_build_result<W: Write>(
    w: &mut Writer<W>,
    res: &BuildResult,
    version: u64,
) -> io::Result<()> {
    w.write_u64(res.status.to_u64())?;
    w.write_str(&res.error_msg)?;
    if version & 0xff >= 3 {
        w.write_u64(u64::from(res.times_built))?;
        w.write_bool(res.is_non_deterministic)?;
        w.write_u64(res.start_time)?;
        w.write_u64(res.stop_time)?;
    }
    w.write_string_map(&res.built_outputs)
}

/// Read the BuildDerivation reply as a 2.7 client does.
pub fn read_build_result<R: Read>(r: &mut Reader<R>) -> WireResult<BuildResult> {
    BuildResult::read(r)
}

/// The int 1 that ImportPaths and AddToStoreNar answer with.
pub fn read_ok<R: Read>(r: &mut Reader<R>) -> WireResult<()> {
    let pos = r.position();
    match r.read_u64("result")? {
        1 => Ok(()),
        v => Err(WireError::Invalid {
            pos,
            what: "result",
            message: format!("expected 1, got {v}"),
        }),
    }
}

/// The metadata after each NAR of an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    pub path: StorePath,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
}

/// Read the int before each entry of an export stream: `true` if a NAR follows, `false`
/// at the end of the stream.
pub fn read_export_marker<R: Read>(r: &mut Reader<R>) -> WireResult<bool> {
    let pos = r.position();
    match r.read_u64("export marker")? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(WireError::Invalid {
            pos,
            what: "export marker",
            message: format!(
                "input doesn't look like something created by 'nix-store --export' (marker {v})"
            ),
        }),
    }
}

impl ExportTrailer {
    /// Read what follows a NAR: the magic, path, references, deriver, legacy signature.
    pub fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        let pos = r.position();
        let magic = r.read_u64("export magic")?;
        if magic != EXPORT_MAGIC {
            return Err(WireError::Invalid {
                pos,
                what: "export magic",
                message: "Nix archive cannot be imported; wrong format".into(),
            });
        }
        let path = r.read_store_path("path")?;
        let references = r.read_store_path_set("references")?;
        let deriver = r.read_opt_store_path("deriver")?;
        let pos = r.position();
        match r.read_u64("legacy signature flag")? {
            0 => {}
            1 => {
                let _ = r.read_bytes("legacy signature")?;
            }
            v => {
                return Err(WireError::BadBool {
                    pos,
                    what: "legacy signature flag",
                    value: v,
                })
            }
        }
        Ok(Self {
            path,
            references,
            deriver,
        })
    }

    /// Write it (with no legacy signature).
    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_u64(EXPORT_MAGIC)?;
        w.write_store_path(&self.path)?;
        w.write_store_paths(&self.references)?;
        w.write_opt_store_path(self.deriver.as_ref())?;
        w.write_u64(0)
    }
}
