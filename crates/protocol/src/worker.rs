//! The worker (daemon) protocol, version 1.34, as Nix 2.8 speaks it (worker-protocol.hh,
//! daemon.cc `processConnection` / `performOp`, remote-store.cc).
//!
//! ```text
//! handshake  C→S  int WORKER_MAGIC_1 (0x6e697863)
//!            S→C  int WORKER_MAGIC_2 (0x6478696f), int PROTOCOL_VERSION (0x122 = 1.34)
//!            C→S  int clientVersion,
//!                 int cpuAffinity (0 = none; else one more int, the affinity)  (≥ 1.14)
//!                 int reserveSpace (obsolete)                               (≥ 1.11)
//!            S→C  string nixVersion ("2.8.0")                              (≥ 1.33)
//!            S→C  stderr messages, STDERR_LAST
//! operation  C→S  int op, the op's arguments [, its payload]
//!            S→C  stderr messages, then STDERR_LAST + reply | STDERR_ERROR
//! ```
//!
//! Payloads that follow the arguments are not part of a [`Request`]: after AddToStore,
//! AddToStoreNar, AddMultipleToStore and AddBuildLog a framed stream follows (read it
//! with [`Reader::framed`]); ImportPaths pulls its data with `STDERR_READ`; the reply of
//! NarFromPath is a raw NAR. [`Request::payload`] says which.
//!
//! firn negotiates exactly 1.34: clients older than 1.34 (Nix < 2.8) are refused in the
//! handshake ([`WorkerError::UnsupportedVersion`]), newer ones speak 1.34 with it, as they
//! gate every feature on the smaller version. Hence no version-dependent forms below.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};

use firn_derivation::{DrvOutput, Realisation, StorePath};
use thiserror::Error;

use crate::stderr::StderrMsg;
use crate::types::{
    read_opt_ca, wire_enum, write_opt_ca, BasicDerivation, BuildMode, BuildResult, ContentAddress,
    ContentAddressMethod, DerivedPath, GcAction, UnkeyedValidPathInfo, ValidPathInfo, Verbosity,
};
use crate::wire::{Reader, WireError, WireResult, Writer};

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// 1.34, the version of Nix 2.8.
pub const PROTOCOL_VERSION: u64 = 1 << 8 | 34;
/// The version string a 2.8 daemon sends.
pub const NIX_VERSION: &str = "2.8.0";

/// `GET_PROTOCOL_MAJOR`: the major part, still shifted (`0x100` for 1.x).
pub const fn major(version: u64) -> u64 {
    version & 0xff00
}

/// `GET_PROTOCOL_MINOR`.
pub const fn minor(version: u64) -> u64 {
    version & 0x00ff
}

wire_enum! {
    /// `WorkerOp`: every operation number of Nix 2.8.
    Op: "worker operation" {
        IsValidPath = 1, HasSubstitutes = 3, QueryPathHash = 4, QueryReferences = 5,
        QueryReferrers = 6, AddToStore = 7, AddTextToStore = 8, BuildPaths = 9,
        EnsurePath = 10, AddTempRoot = 11, AddIndirectRoot = 12, SyncWithGC = 13,
        FindRoots = 14, ExportPath = 16, QueryDeriver = 18, SetOptions = 19,
        CollectGarbage = 20, QuerySubstitutablePathInfo = 21, QueryDerivationOutputs = 22,
        QueryAllValidPaths = 23, QueryFailedPaths = 24, ClearFailedPaths = 25,
        QueryPathInfo = 26, ImportPaths = 27, QueryDerivationOutputNames = 28,
        QueryPathFromHashPart = 29, QuerySubstitutablePathInfos = 30, QueryValidPaths = 31,
        QuerySubstitutablePaths = 32, QueryValidDerivers = 33, OptimiseStore = 34,
        VerifyStore = 35, BuildDerivation = 36, AddSignatures = 37, NarFromPath = 38,
        AddToStoreNar = 39, QueryMissing = 40, QueryDerivationOutputMap = 41,
        RegisterDrvOutput = 42, QueryRealisation = 43, AddMultipleToStore = 44,
        AddBuildLog = 45, BuildPathsWithResults = 46,
    }
}

/// Errors of the worker protocol: what was wrong and where.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("protocol mismatch: expected magic 0x{expected:x}, got 0x{got:x}")]
    BadMagic { expected: u64, got: u64 },
    #[error(
        "protocol version {}.{} is not supported (firn speaks 1.34 and needs a peer at 1.34 or newer)",
        major(*.version) >> 8, minor(*.version)
    )]
    UnsupportedVersion { version: u64 },
    /// An op number Nix 2.8 does not have (the daemon's `invalid operation N`).
    #[error("invalid operation {0}")]
    UnknownOp(u64),
    /// An op Nix 2.8's daemon does not handle either (24, 25).
    #[error("invalid operation {} ({})", .0.to_u64(), .0)]
    UnsupportedOp(Op),
    /// Bad bytes in the arguments or reply of `op`.
    #[error("{op} ({}): {source}", .op.to_u64())]
    Op {
        op: Op,
        #[source]
        source: WireError,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl WorkerError {
    /// True if the peer hung up at an op boundary or mid-message.
    pub fn is_eof(&self) -> bool {
        match self {
            Self::Op { source, .. } | Self::Wire(source) => source.is_eof(),
            _ => false,
        }
    }
}

fn in_op(op: Op) -> impl Fn(WireError) -> WorkerError {
    move |source| WorkerError::Op { op, source }
}

fn expect_magic<R: Read>(r: &mut Reader<R>, expected: u64) -> Result<(), WorkerError> {
    let got = r.read_u64("magic")?;
    if got != expected {
        return Err(WorkerError::BadMagic { expected, got });
    }
    Ok(())
}

/// Daemon side, step 1: the client's magic.
pub fn read_client_magic<R: Read>(r: &mut Reader<R>) -> Result<(), WorkerError> {
    expect_magic(r, WORKER_MAGIC_1)
}

/// Daemon side, step 2: magic and [`PROTOCOL_VERSION`] (then flush).
pub fn write_server_hello<W: Write>(w: &mut Writer<W>) -> io::Result<()> {
    w.write_u64(WORKER_MAGIC_2)?;
    w.write_u64(PROTOCOL_VERSION)
}

/// Client side: the client's magic.
pub fn write_client_magic<W: Write>(w: &mut Writer<W>) -> io::Result<()> {
    w.write_u64(WORKER_MAGIC_1)
}

/// Client side: the daemon's magic and version; refuses daemons other than 1.x ≥ 1.34.
pub fn read_server_hello<R: Read>(r: &mut Reader<R>) -> Result<u64, WorkerError> {
    expect_magic(r, WORKER_MAGIC_2)?;
    let version = r.read_u64("daemon version")?;
    check_version(version)?;
    Ok(version)
}

fn check_version(version: u64) -> Result<(), WorkerError> {
    if major(version) != 0x100 || minor(version) < 34 || version > 0xffff {
        return Err(WorkerError::UnsupportedVersion { version });
    }
    Ok(())
}

/// What a client sends after the daemon's hello (with a 1.34 daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub version: u64,
    /// The obsolete CPU affinity: `Some` if the client sent one (2.8 never does).
    pub cpu_affinity: Option<u32>,
    /// The obsolete reserveSpace flag (2.8 sends 0).
    pub reserve_space: bool,
}

impl ClientHello {
    /// What Nix 2.8 sends.
    pub fn nix_2_8() -> Self {
        Self {
            version: PROTOCOL_VERSION,
            cpu_affinity: None,
            reserve_space: false,
        }
    }

    /// The version both sides then speak: always 1.34.
    pub fn negotiated(&self) -> u64 {
        self.version.min(PROTOCOL_VERSION)
    }

    /// Daemon side, step 3.
    pub fn read<R: Read>(r: &mut Reader<R>) -> Result<Self, WorkerError> {
        let version = r.read_u64("client version")?;
        check_version(version)?;
        let cpu_affinity = if r.read_u32("cpu affinity flag")? != 0 {
            Some(r.read_u32("cpu affinity")?)
        } else {
            None
        };
        let reserve_space = r.read_bool("reserveSpace")?;
        Ok(Self {
            version,
            cpu_affinity,
            reserve_space,
        })
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_u64(self.version)?;
        match self.cpu_affinity {
            Some(a) => {
                w.write_u64(1)?;
                w.write_u64(u64::from(a))?;
            }
            None => w.write_u64(0)?,
        }
        w.write_bool(self.reserve_space)
    }
}

/// Daemon side, the rest of the handshake after [`ClientHello::read`]: the version
/// string, then `STDERR_LAST` (no authentication messages). Flush afterwards.
pub fn write_handshake_end<W: Write>(w: &mut Writer<W>, nix_version: &str) -> io::Result<()> {
    w.write_str(nix_version)?;
    StderrMsg::Last.write(w)
}

/// Client side: the version string of the daemon (the stderr messages follow).
pub fn read_daemon_version<R: Read>(r: &mut Reader<R>) -> WireResult<String> {
    r.read_string("daemon Nix version")
}

/// SetOptions' fields (`ClientSettings`), including the obsolete ones, so that what was
/// read is written back unchanged (except levels above `Vomit`, read as `Vomit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: Verbosity,
    pub max_build_jobs: u32,
    pub max_silent_time: u32,
    /// Obsolete `useBuildHook` (2.8 sends 1).
    pub use_build_hook: bool,
    /// The client sends `Error` for `verbose-build = true`, `Vomit` otherwise.
    pub verbose_build: Verbosity,
    /// Obsolete `logType`.
    pub log_type: u32,
    /// Obsolete `printBuildTrace`.
    pub print_build_trace: u32,
    pub build_cores: u32,
    pub use_substitutes: bool,
    /// Settings changed from their defaults on the client (`name → value`); for a
    /// repeated name the first value wins, as in Nix.
    pub overrides: BTreeMap<String, String>,
}

impl ClientSettings {
    /// True if the client asked for verbose builds.
    pub fn verbose_build(&self) -> bool {
        self.verbose_build == Verbosity::Error
    }

    fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        Ok(Self {
            keep_failed: r.read_bool("keepFailed")?,
            keep_going: r.read_bool("keepGoing")?,
            try_fallback: r.read_bool("tryFallback")?,
            verbosity: Verbosity::read_saturating(r, "verbosity")?,
            max_build_jobs: r.read_u32("maxBuildJobs")?,
            max_silent_time: r.read_u32("maxSilentTime")?,
            use_build_hook: r.read_bool("useBuildHook")?,
            verbose_build: Verbosity::read_saturating(r, "verboseBuild")?,
            log_type: r.read_u32("logType")?,
            print_build_trace: r.read_u32("printBuildTrace")?,
            build_cores: r.read_u32("buildCores")?,
            use_substitutes: r.read_bool("useSubstitutes")?,
            overrides: r.read_string_map("overrides")?,
        })
    }

    fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_bool(self.keep_failed)?;
        w.write_bool(self.keep_going)?;
        w.write_bool(self.try_fallback)?;
        w.write_u64(self.verbosity.to_u64())?;
        w.write_u64(u64::from(self.max_build_jobs))?;
        w.write_u64(u64::from(self.max_silent_time))?;
        w.write_bool(self.use_build_hook)?;
        w.write_u64(self.verbose_build.to_u64())?;
        w.write_u64(u64::from(self.log_type))?;
        w.write_u64(u64::from(self.print_build_trace))?;
        w.write_u64(u64::from(self.build_cores))?;
        w.write_bool(self.use_substitutes)?;
        w.write_string_map(&self.overrides)
    }
}

/// What follows a request's arguments on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    None,
    /// A framed stream (the dump, NAR(s) or log), after the arguments.
    Framed,
    /// The daemon pulls an export stream with `STDERR_READ` (ImportPaths).
    StderrRead,
}

/// A decoded operation with its arguments (1.34 forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    IsValidPath(StorePath),
    HasSubstitutes(StorePath),
    QueryPathHash(StorePath),
    QueryReferences(StorePath),
    QueryReferrers(StorePath),
    /// Followed by a framed dump: raw text, a NAR (`fixed:r:`) or the flat file.
    AddToStore {
        name: String,
        method: ContentAddressMethod,
        references: BTreeSet<StorePath>,
        repair: bool,
    },
    AddTextToStore {
        name: String,
        text: Vec<u8>,
        references: BTreeSet<StorePath>,
    },
    BuildPaths {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    EnsurePath(StorePath),
    AddTempRoot(StorePath),
    /// The absolute path of the client's symlink (not a store path).
    AddIndirectRoot(String),
    SyncWithGC,
    FindRoots,
    ExportPath {
        path: StorePath,
        /// Obsolete sign flag (sent as 0).
        sign: u32,
    },
    QueryDeriver(StorePath),
    SetOptions(ClientSettings),
    CollectGarbage {
        action: GcAction,
        paths_to_delete: BTreeSet<StorePath>,
        ignore_liveness: bool,
        max_freed: u64,
    },
    QuerySubstitutablePathInfo(StorePath),
    QueryDerivationOutputs(StorePath),
    QueryAllValidPaths,
    QueryPathInfo(StorePath),
    /// The export stream is pulled with `STDERR_READ`.
    ImportPaths,
    QueryDerivationOutputNames(StorePath),
    QueryPathFromHashPart(String),
    QuerySubstitutablePathInfos(BTreeMap<StorePath, Option<ContentAddress>>),
    QueryValidPaths {
        paths: BTreeSet<StorePath>,
        substitute: bool,
    },
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    QueryValidDerivers(StorePath),
    OptimiseStore,
    VerifyStore {
        check_contents: bool,
        repair: bool,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        mode: BuildMode,
    },
    AddSignatures {
        path: StorePath,
        sigs: BTreeSet<String>,
    },
    NarFromPath(StorePath),
    /// Followed by the framed NAR.
    AddToStoreNar {
        info: ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
    },
    QueryMissing(Vec<DerivedPath>),
    QueryDerivationOutputMap(StorePath),
    /// A `Realisation`, sent as its JSON (clients at 1.31 or newer).
    RegisterDrvOutput(Realisation),
    /// A `DrvOutput` (`sha256:<hex>!out`).
    QueryRealisation(DrvOutput),
    /// Followed by a framed stream: int count, count × (ValidPathInfo with path, NAR).
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
    },
    /// The base name of the `.drv`; followed by the framed log.
    AddBuildLog(StorePath),
    BuildPathsWithResults {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
}

impl Request {
    pub fn op(&self) -> Op {
        match self {
            Self::IsValidPath(_) => Op::IsValidPath,
            Self::HasSubstitutes(_) => Op::HasSubstitutes,
            Self::QueryPathHash(_) => Op::QueryPathHash,
            Self::QueryReferences(_) => Op::QueryReferences,
            Self::QueryReferrers(_) => Op::QueryReferrers,
            Self::AddToStore { .. } => Op::AddToStore,
            Self::AddTextToStore { .. } => Op::AddTextToStore,
            Self::BuildPaths { .. } => Op::BuildPaths,
            Self::EnsurePath(_) => Op::EnsurePath,
            Self::AddTempRoot(_) => Op::AddTempRoot,
            Self::AddIndirectRoot(_) => Op::AddIndirectRoot,
            Self::SyncWithGC => Op::SyncWithGC,
            Self::FindRoots => Op::FindRoots,
            Self::ExportPath { .. } => Op::ExportPath,
            Self::QueryDeriver(_) => Op::QueryDeriver,
            Self::SetOptions(_) => Op::SetOptions,
            Self::CollectGarbage { .. } => Op::CollectGarbage,
            Self::QuerySubstitutablePathInfo(_) => Op::QuerySubstitutablePathInfo,
            Self::QueryDerivationOutputs(_) => Op::QueryDerivationOutputs,
            Self::QueryAllValidPaths => Op::QueryAllValidPaths,
            Self::QueryPathInfo(_) => Op::QueryPathInfo,
            Self::ImportPaths => Op::ImportPaths,
            Self::QueryDerivationOutputNames(_) => Op::QueryDerivationOutputNames,
            Self::QueryPathFromHashPart(_) => Op::QueryPathFromHashPart,
            Self::QuerySubstitutablePathInfos(_) => Op::QuerySubstitutablePathInfos,
            Self::QueryValidPaths { .. } => Op::QueryValidPaths,
            Self::QuerySubstitutablePaths(_) => Op::QuerySubstitutablePaths,
            Self::QueryValidDerivers(_) => Op::QueryValidDerivers,
            Self::OptimiseStore => Op::OptimiseStore,
            Self::VerifyStore { .. } => Op::VerifyStore,
            Self::BuildDerivation { .. } => Op::BuildDerivation,
            Self::AddSignatures { .. } => Op::AddSignatures,
            Self::NarFromPath(_) => Op::NarFromPath,
            Self::AddToStoreNar { .. } => Op::AddToStoreNar,
            Self::QueryMissing(_) => Op::QueryMissing,
            Self::QueryDerivationOutputMap(_) => Op::QueryDerivationOutputMap,
            Self::RegisterDrvOutput(_) => Op::RegisterDrvOutput,
            Self::QueryRealisation(_) => Op::QueryRealisation,
            Self::AddMultipleToStore { .. } => Op::AddMultipleToStore,
            Self::AddBuildLog(_) => Op::AddBuildLog,
            Self::BuildPathsWithResults { .. } => Op::BuildPathsWithResults,
        }
    }

    /// What the caller must read after the arguments.
    pub fn payload(&self) -> Payload {
        match self {
            Self::AddToStore { .. }
            | Self::AddToStoreNar { .. }
            | Self::AddMultipleToStore { .. }
            | Self::AddBuildLog(_) => Payload::Framed,
            Self::ImportPaths => Payload::StderrRead,
            _ => Payload::None,
        }
    }

    /// Read the next op number: `None` if the client closed the connection cleanly (at
    /// an op boundary); unknown numbers are [`WorkerError::UnknownOp`].
    pub fn read_op<R: Read>(r: &mut Reader<R>) -> Result<Option<Op>, WorkerError> {
        let start = r.position();
        let n = match r.read_u64("op") {
            Ok(n) => n,
            Err(e) if e.is_eof() && r.position() == start => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Op::from_u64(n).map(Some).ok_or(WorkerError::UnknownOp(n))
    }

    /// Read the next request (op and arguments, not its payload); `None` at a clean end.
    pub fn read<R: Read>(r: &mut Reader<R>) -> Result<Option<Self>, WorkerError> {
        match Self::read_op(r)? {
            None => Ok(None),
            Some(op) => Self::read_args(op, r).map(Some),
        }
    }

    /// Read the arguments of `op`.
    pub fn read_args<R: Read>(op: Op, r: &mut Reader<R>) -> Result<Self, WorkerError> {
        let e = in_op(op);
        let inner = |r: &mut Reader<R>| -> Result<Self, WorkerError> {
            let path = |r: &mut Reader<R>| r.read_store_path("path");
            Ok(match op {
                Op::IsValidPath => Self::IsValidPath(path(r)?),
                Op::HasSubstitutes => Self::HasSubstitutes(path(r)?),
                Op::QueryPathHash => Self::QueryPathHash(path(r)?),
                Op::QueryReferences => Self::QueryReferences(path(r)?),
                Op::QueryReferrers => Self::QueryReferrers(path(r)?),
                Op::AddToStore => {
                    let name = r.read_string("name")?;
                    let pos = r.position();
                    let cam = r.read_string("content address method")?;
                    let method = ContentAddressMethod::parse(&cam).map_err(|message| {
                        WireError::Invalid {
                            pos,
                            what: "content address method",
                            message,
                        }
                    })?;
                    Self::AddToStore {
                        name,
                        method,
                        references: r.read_store_path_set("references")?,
                        repair: r.read_bool("repair")?,
                    }
                }
                Op::AddTextToStore => Self::AddTextToStore {
                    name: r.read_string("name")?,
                    text: r.read_bytes("text")?,
                    references: r.read_store_path_set("references")?,
                },
                Op::BuildPaths => Self::BuildPaths {
                    paths: DerivedPath::read_list(r, "derived paths")?,
                    mode: BuildMode::read(r, "build mode")?,
                },
                Op::EnsurePath => Self::EnsurePath(path(r)?),
                Op::AddTempRoot => Self::AddTempRoot(path(r)?),
                Op::AddIndirectRoot => Self::AddIndirectRoot(r.read_string("root path")?),
                Op::SyncWithGC => Self::SyncWithGC,
                Op::FindRoots => Self::FindRoots,
                Op::ExportPath => Self::ExportPath {
                    path: path(r)?,
                    sign: r.read_u32("sign")?,
                },
                Op::QueryDeriver => Self::QueryDeriver(path(r)?),
                Op::SetOptions => Self::SetOptions(ClientSettings::read(r)?),
                Op::CollectGarbage => {
                    let action = GcAction::read(r, "action")?;
                    let paths_to_delete = r.read_store_path_set("pathsToDelete")?;
                    let ignore_liveness = r.read_bool("ignoreLiveness")?;
                    let max_freed = r.read_u64("maxFreed")?;
                    for what in ["obsolete field 1", "obsolete field 2", "obsolete field 3"] {
                        let _ = r.read_u32(what)?;
                    }
                    Self::CollectGarbage {
                        action,
                        paths_to_delete,
                        ignore_liveness,
                        max_freed,
                    }
                }
                Op::QuerySubstitutablePathInfo => Self::QuerySubstitutablePathInfo(path(r)?),
                Op::QueryDerivationOutputs => Self::QueryDerivationOutputs(path(r)?),
                Op::QueryAllValidPaths => Self::QueryAllValidPaths,
                Op::QueryFailedPaths | Op::ClearFailedPaths => {
                    return Err(WorkerError::UnsupportedOp(op))
                }
                Op::QueryPathInfo => Self::QueryPathInfo(path(r)?),
                Op::ImportPaths => Self::ImportPaths,
                Op::QueryDerivationOutputNames => Self::QueryDerivationOutputNames(path(r)?),
                Op::QueryPathFromHashPart => {
                    Self::QueryPathFromHashPart(r.read_string("hash part")?)
                }
                Op::QuerySubstitutablePathInfos => {
                    let n = r.read_count("paths")?;
                    let mut m = BTreeMap::new();
                    for _ in 0..n {
                        let p = r.read_store_path("path")?;
                        let ca = read_opt_ca(r, "ca")?;
                        m.entry(p).or_insert(ca);
                    }
                    Self::QuerySubstitutablePathInfos(m)
                }
                Op::QueryValidPaths => Self::QueryValidPaths {
                    paths: r.read_store_path_set("paths")?,
                    substitute: r.read_bool("substitute")?,
                },
                Op::QuerySubstitutablePaths => {
                    Self::QuerySubstitutablePaths(r.read_store_path_set("paths")?)
                }
                Op::QueryValidDerivers => Self::QueryValidDerivers(path(r)?),
                Op::OptimiseStore => Self::OptimiseStore,
                Op::VerifyStore => Self::VerifyStore {
                    check_contents: r.read_bool("checkContents")?,
                    repair: r.read_bool("repair")?,
                },
                Op::BuildDerivation => Self::BuildDerivation {
                    drv_path: r.read_store_path("drvPath")?,
                    drv: BasicDerivation::read(r)?,
                    mode: BuildMode::read(r, "build mode")?,
                },
                Op::AddSignatures => Self::AddSignatures {
                    path: path(r)?,
                    sigs: r.read_string_set("sigs")?,
                },
                Op::NarFromPath => Self::NarFromPath(path(r)?),
                Op::AddToStoreNar => Self::AddToStoreNar {
                    info: ValidPathInfo::read(r)?,
                    repair: r.read_bool("repair")?,
                    dont_check_sigs: r.read_bool("dontCheckSigs")?,
                },
                Op::QueryMissing => Self::QueryMissing(DerivedPath::read_list(r, "targets")?),
                Op::QueryDerivationOutputMap => Self::QueryDerivationOutputMap(path(r)?),
                Op::RegisterDrvOutput => Self::RegisterDrvOutput(read_realisation(r)?),
                Op::QueryRealisation => {
                    let pos = r.position();
                    let s = r.read_string("drv output")?;
                    Self::QueryRealisation(DrvOutput::parse(&s).map_err(|e| {
                        WireError::Invalid {
                            pos,
                            what: "drv output",
                            message: e.to_string(),
                        }
                    })?)
                }
                Op::AddMultipleToStore => Self::AddMultipleToStore {
                    repair: r.read_bool("repair")?,
                    dont_check_sigs: r.read_bool("dontCheckSigs")?,
                },
                Op::AddBuildLog => {
                    let pos = r.position();
                    let b = r.read_bytes("drv base name")?;
                    Self::AddBuildLog(StorePath::from_base_name(&b).map_err(|source| {
                        WireError::StorePath {
                            pos,
                            what: "drv base name",
                            source,
                        }
                    })?)
                }
                Op::BuildPathsWithResults => Self::BuildPathsWithResults {
                    paths: DerivedPath::read_list(r, "derived paths")?,
                    mode: BuildMode::read(r, "build mode")?,
                },
            })
        };
        inner(r).map_err(|err| match err {
            WorkerError::Wire(w) => e(w),
            other => other,
        })
    }

    /// Write the op and its arguments (not the payload).
    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_u64(self.op().to_u64())?;
        match self {
            Self::IsValidPath(p)
            | Self::HasSubstitutes(p)
            | Self::QueryPathHash(p)
            | Self::QueryReferences(p)
            | Self::QueryReferrers(p)
            | Self::EnsurePath(p)
            | Self::AddTempRoot(p)
            | Self::QueryDeriver(p)
            | Self::QuerySubstitutablePathInfo(p)
            | Self::QueryDerivationOutputs(p)
            | Self::QueryPathInfo(p)
            | Self::QueryDerivationOutputNames(p)
            | Self::QueryValidDerivers(p)
            | Self::NarFromPath(p)
            | Self::QueryDerivationOutputMap(p) => w.write_store_path(p),
            Self::AddToStore {
                name,
                method,
                references,
                repair,
            } => {
                w.write_str(name)?;
                w.write_str(&method.to_string())?;
                w.write_store_paths(references)?;
                w.write_bool(*repair)
            }
            Self::AddTextToStore {
                name,
                text,
                references,
            } => {
                w.write_str(name)?;
                w.write_bytes(text)?;
                w.write_store_paths(references)
            }
            Self::BuildPaths { paths, mode } | Self::BuildPathsWithResults { paths, mode } => {
                DerivedPath::write_list(w, paths)?;
                w.write_u64(mode.to_u64())
            }
            Self::AddIndirectRoot(s) | Self::QueryPathFromHashPart(s) => w.write_str(s),
            Self::RegisterDrvOutput(r) => w.write_str(&r.to_json()),
            Self::QueryRealisation(id) => w.write_str(&id.to_string()),
            Self::SyncWithGC
            | Self::FindRoots
            | Self::QueryAllValidPaths
            | Self::ImportPaths
            | Self::OptimiseStore => Ok(()),
            Self::ExportPath { path, sign } => {
                w.write_store_path(path)?;
                w.write_u64(u64::from(*sign))
            }
            Self::SetOptions(s) => s.write(w),
            Self::CollectGarbage {
                action,
                paths_to_delete,
                ignore_liveness,
                max_freed,
            } => {
                w.write_u64(action.to_u64())?;
                w.write_store_paths(paths_to_delete)?;
                w.write_bool(*ignore_liveness)?;
                w.write_u64(*max_freed)?;
                (0..3).try_for_each(|_| w.write_u64(0))
            }
            Self::QuerySubstitutablePathInfos(m) => {
                w.write_u64(m.len() as u64)?;
                for (p, ca) in m {
                    w.write_store_path(p)?;
                    write_opt_ca(w, ca.as_ref())?;
                }
                Ok(())
            }
            Self::QueryValidPaths { paths, substitute } => {
                w.write_store_paths(paths)?;
                w.write_bool(*substitute)
            }
            Self::QuerySubstitutablePaths(paths) => w.write_store_paths(paths),
            Self::VerifyStore {
                check_contents,
                repair,
            } => {
                w.write_bool(*check_contents)?;
                w.write_bool(*repair)
            }
            Self::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                w.write_store_path(drv_path)?;
                drv.write(w)?;
                w.write_u64(mode.to_u64())
            }
            Self::AddSignatures { path, sigs } => {
                w.write_store_path(path)?;
                w.write_strings(sigs)
            }
            Self::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                info.write(w)?;
                w.write_bool(*repair)?;
                w.write_bool(*dont_check_sigs)
            }
            Self::QueryMissing(paths) => DerivedPath::write_list(w, paths),
            Self::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                w.write_bool(*repair)?;
                w.write_bool(*dont_check_sigs)
            }
            Self::AddBuildLog(p) => w.write_str(p.base_name()),
        }
    }
}

/// Information about a substitutable path (`SubstitutablePathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstitutablePathInfo {
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

impl SubstitutablePathInfo {
    fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        Ok(Self {
            deriver: r.read_opt_store_path("deriver")?,
            references: r.read_store_path_set("references")?,
            download_size: r.read_u64("downloadSize")?,
            nar_size: r.read_u64("narSize")?,
        })
    }

    fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_opt_store_path(self.deriver.as_ref())?;
        w.write_store_paths(&self.references)?;
        w.write_u64(self.download_size)?;
        w.write_u64(self.nar_size)
    }
}

/// The QueryMissing reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

/// The CollectGarbage reply (`GCResults`): paths as text (Nix reports any file it
/// deleted, e.g. a stray `.lock`), bytes freed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcResult {
    pub paths: BTreeSet<String>,
    pub bytes_freed: u64,
}

/// A reply payload (what follows `STDERR_LAST`), by shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing (SetOptions, AddToStoreNar, AddMultipleToStore, RegisterDrvOutput).
    Nothing,
    /// The constant int 1 of many ops (BuildPaths, EnsurePath, AddTempRoot,
    /// AddIndirectRoot, SyncWithGC, OptimiseStore, AddSignatures, ExportPath, AddBuildLog).
    Ok,
    /// IsValidPath, HasSubstitutes, VerifyStore (errors found).
    Bool(bool),
    /// QueryPathHash (base16).
    Text(String),
    /// AddTextToStore.
    Path(StorePath),
    /// QueryDeriver, QueryPathFromHashPart: `""` for none.
    OptPath(Option<StorePath>),
    /// QueryReferences, QueryReferrers, QueryValidDerivers, QueryDerivationOutputs,
    /// QueryAllValidPaths, QueryValidPaths, QuerySubstitutablePaths, ImportPaths.
    Paths(Vec<StorePath>),
    /// QueryDerivationOutputNames.
    Strings(Vec<String>),
    /// QueryRealisation: none or one, each sent as its JSON.
    Realisations(Vec<Realisation>),
    /// QueryDerivationOutputMap.
    OutputMap(BTreeMap<String, Option<StorePath>>),
    /// QueryPathInfo: `None` for an invalid path.
    PathInfo(Option<UnkeyedValidPathInfo>),
    /// AddToStore.
    AddedPath(ValidPathInfo),
    /// FindRoots: (link, target) pairs.
    Roots(Vec<(String, StorePath)>),
    CollectGarbage(GcResult),
    SubstitutablePathInfo(Option<SubstitutablePathInfo>),
    SubstitutablePathInfos(Vec<(StorePath, SubstitutablePathInfo)>),
    Missing(Missing),
    /// BuildDerivation.
    BuildResult(BuildResult),
    /// BuildPathsWithResults.
    BuildResults(Vec<(DerivedPath, BuildResult)>),
    /// NarFromPath: a raw NAR follows (self-delimiting; read it with a NAR parser).
    Nar,
}

impl Reply {
    /// Read the reply of `op` (the client side; used by tests and remote building).
    pub fn read<R: Read>(op: Op, r: &mut Reader<R>) -> Result<Self, WorkerError> {
        Self::read_inner(op, r).map_err(in_op(op))
    }

    fn read_inner<R: Read>(op: Op, r: &mut Reader<R>) -> WireResult<Self> {
        Ok(match op {
            Op::SetOptions | Op::AddToStoreNar | Op::AddMultipleToStore | Op::RegisterDrvOutput => {
                Self::Nothing
            }
            Op::BuildPaths
            | Op::EnsurePath
            | Op::AddTempRoot
            | Op::AddIndirectRoot
            | Op::SyncWithGC
            | Op::OptimiseStore
            | Op::AddSignatures
            | Op::ExportPath
            | Op::AddBuildLog => {
                let pos = r.position();
                match r.read_u64("result")? {
                    1 => Self::Ok,
                    v => {
                        return Err(WireError::Invalid {
                            pos,
                            what: "result",
                            message: format!("expected 1, got {v}"),
                        })
                    }
                }
            }
            Op::IsValidPath | Op::HasSubstitutes | Op::VerifyStore => {
                Self::Bool(r.read_bool("result")?)
            }
            Op::QueryPathHash => Self::Text(r.read_string("hash")?),
            Op::AddTextToStore => Self::Path(r.read_store_path("path")?),
            Op::QueryDeriver | Op::QueryPathFromHashPart => {
                Self::OptPath(r.read_opt_store_path("path")?)
            }
            Op::QueryReferences
            | Op::QueryReferrers
            | Op::QueryValidDerivers
            | Op::QueryDerivationOutputs
            | Op::QueryAllValidPaths
            | Op::QueryValidPaths
            | Op::QuerySubstitutablePaths
            | Op::ImportPaths => Self::Paths(r.read_store_path_list("paths")?),
            Op::QueryDerivationOutputNames => Self::Strings(r.read_string_list("strings")?),
            Op::QueryRealisation => {
                let n = r.read_count("realisations")?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(read_realisation(r)?);
                }
                Self::Realisations(v)
            }
            Op::QueryDerivationOutputMap => {
                let n = r.read_count("outputs")?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let name = r.read_string("output name")?;
                    let p = r.read_opt_store_path("output path")?;
                    m.entry(name).or_insert(p);
                }
                Self::OutputMap(m)
            }
            Op::QueryPathInfo => {
                if r.read_bool("valid")? {
                    Self::PathInfo(Some(UnkeyedValidPathInfo::read(r)?))
                } else {
                    Self::PathInfo(None)
                }
            }
            Op::AddToStore => Self::AddedPath(ValidPathInfo::read(r)?),
            Op::FindRoots => {
                let n = r.read_count("roots")?;
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let link = r.read_string("root link")?;
                    v.push((link, r.read_store_path("root target")?));
                }
                Self::Roots(v)
            }
            Op::CollectGarbage => {
                let paths = r.read_string_set("paths")?;
                let bytes_freed = r.read_u64("bytesFreed")?;
                let _obsolete = r.read_u64("obsolete")?;
                Self::CollectGarbage(GcResult { paths, bytes_freed })
            }
            Op::QuerySubstitutablePathInfo => {
                if r.read_bool("found")? {
                    Self::SubstitutablePathInfo(Some(SubstitutablePathInfo::read(r)?))
                } else {
                    Self::SubstitutablePathInfo(None)
                }
            }
            Op::QuerySubstitutablePathInfos => {
                let n = r.read_count("infos")?;
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let p = r.read_store_path("path")?;
                    v.push((p, SubstitutablePathInfo::read(r)?));
                }
                Self::SubstitutablePathInfos(v)
            }
            Op::QueryMissing => Self::Missing(Missing {
                will_build: r.read_store_path_set("willBuild")?,
                will_substitute: r.read_store_path_set("willSubstitute")?,
                unknown: r.read_store_path_set("unknown")?,
                download_size: r.read_u64("downloadSize")?,
                nar_size: r.read_u64("narSize")?,
            }),
            Op::BuildDerivation => Self::BuildResult(BuildResult::read(r)?),
            Op::BuildPathsWithResults => {
                let n = r.read_count("results")?;
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let p = DerivedPath::read(r, "path")?;
                    v.push((p, BuildResult::read(r)?));
                }
                Self::BuildResults(v)
            }
            Op::NarFromPath => Self::Nar,
            Op::QueryFailedPaths | Op::ClearFailedPaths => {
                return Err(WireError::Invalid {
                    pos: r.position(),
                    what: "reply",
                    message: "Nix 2.8 does not implement this operation".into(),
                })
            }
        })
    }

    /// Write the reply (after `STDERR_LAST`). [`Reply::Nar`] writes nothing: the caller
    /// dumps the NAR.
    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        match self {
            Self::Nothing | Self::Nar => Ok(()),
            Self::Ok => w.write_u64(1),
            Self::Bool(b) => w.write_bool(*b),
            Self::Text(s) => w.write_str(s),
            Self::Path(p) => w.write_store_path(p),
            Self::OptPath(p) => w.write_opt_store_path(p.as_ref()),
            Self::Paths(ps) => w.write_store_paths(ps),
            Self::Strings(s) => w.write_strings(s),
            Self::Realisations(v) => {
                let json: Vec<String> = v.iter().map(Realisation::to_json).collect();
                w.write_strings(&json)
            }
            Self::OutputMap(m) => {
                w.write_u64(m.len() as u64)?;
                for (name, p) in m {
                    w.write_str(name)?;
                    w.write_opt_store_path(p.as_ref())?;
                }
                Ok(())
            }
            Self::PathInfo(None) => w.write_bool(false),
            Self::PathInfo(Some(info)) => {
                w.write_bool(true)?;
                info.write(w)
            }
            Self::AddedPath(info) => info.write(w),
            Self::Roots(v) => {
                w.write_u64(v.len() as u64)?;
                for (link, p) in v {
                    w.write_str(link)?;
                    w.write_store_path(p)?;
                }
                Ok(())
            }
            Self::CollectGarbage(g) => {
                w.write_strings(&g.paths)?;
                w.write_u64(g.bytes_freed)?;
                w.write_u64(0)
            }
            Self::SubstitutablePathInfo(None) => w.write_bool(false),
            Self::SubstitutablePathInfo(Some(i)) => {
                w.write_bool(true)?;
                i.write(w)
            }
            Self::SubstitutablePathInfos(v) => {
                w.write_u64(v.len() as u64)?;
                for (p, i) in v {
                    w.write_store_path(p)?;
                    i.write(w)?;
                }
                Ok(())
            }
            Self::Missing(m) => {
                w.write_store_paths(&m.will_build)?;
                w.write_store_paths(&m.will_substitute)?;
                w.write_store_paths(&m.unknown)?;
                w.write_u64(m.download_size)?;
                w.write_u64(m.nar_size)
            }
            Self::BuildResult(b) => b.write(w),
            Self::BuildResults(v) => {
                w.write_u64(v.len() as u64)?;
                for (p, b) in v {
                    p.write(w)?;
                    b.write(w)?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for ClientHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", major(self.version) >> 8, minor(self.version))
    }
}

/// A `Realisation` sent as its JSON (`worker_proto::read<Realisation>`).
fn read_realisation<R: Read>(r: &mut Reader<R>) -> Result<Realisation, WireError> {
    let pos = r.position();
    let s = r.read_string("realisation")?;
    Realisation::from_json(&s, "remote-protocol").map_err(|e| WireError::Invalid {
        pos,
        what: "realisation",
        message: e.to_string(),
    })
}
