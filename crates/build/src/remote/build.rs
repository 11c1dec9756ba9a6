//! One build on a remote machine, run beside the worker: what Nix 2.8's build hook
//! (`build-remote`) does after it accepted a build, on a thread of its own so that the
//! worker goes on with other builds (and does not wait for ssh to connect, as Nix's
//! `tryBuildHook` does):
//!
//! 1. run `ssh HOST … '<remote-program> --serve --write [--store X]'`, its stderr into
//!    the build's log pipe, and say hello;
//! 2. QueryValidPaths of the input closure (`substitute` = `builders-use-substitutes`),
//!    then AddToStoreNar of each missing path, references first;
//! 3. BuildDerivation of the derivation sent whole (`inputSrcs` = the input closure when
//!    it has input derivations, as Nix);
//! 4. QueryPathInfos and DumpStorePath of the outputs missing here, each NAR imported
//!    with the remote's hash and size checked (`Store::add_nar_locked`: the goal holds
//!    the output locks), references first, no signature check (`NoCheckSigs`). Outputs
//!    known only once built (floating content-addressed) are the `outPath`s of the
//!    realisations the remote returns (`builtOutputs`, keyed by their `DrvOutput`).
//!
//! The thread opens its own handle on the store (SQLite serialises the writers).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firn_derivation::{DrvOutput, OutputName, Realisation, StorePath};
use firn_protocol::serve::{BuildSettings, ServePathInfo};
use firn_protocol::{BasicDerivation, BuildResult};
use firn_store::{Store, StoreError, StoreLayout, StoreOptions};

use super::connection::{Pipes, ServeConnection, SharedChild};
use super::error::RemoteError;
use super::ssh::SshStore;

/// How long ssh may linger after the protocol is over before it is killed.
const LINGER: Duration = Duration::from_secs(5);

/// Everything the thread needs, owned.
#[derive(Debug)]
pub struct RemoteJob {
    pub layout: StoreLayout,
    pub auto_optimise: bool,
    pub ssh: SshStore,
    /// `NIX_SSHOPTS`.
    pub sshopts: String,
    /// Where the shared ssh connections' sockets are (none: one connection a build).
    pub control_dir: Option<PathBuf>,
    pub drv_path: StorePath,
    pub drv: BasicDerivation,
    /// The input closure, which the remote must have.
    pub inputs: BTreeSet<StorePath>,
    /// The outputs to bring back (those not valid here), whose locks the goal holds.
    pub outputs: BTreeSet<StorePath>,
    /// Outputs whose paths the build decides (floating), with their ids.
    pub floating: BTreeMap<OutputName, DrvOutput>,
    pub settings: BuildSettings,
    pub use_substitutes: bool,
}

/// What came back.
#[derive(Debug)]
pub struct RemoteDone {
    /// The remote's result (a failure too: its status and message).
    pub result: BuildResult,
    /// The realisations of the floating outputs, as the remote returned them.
    pub realisations: BTreeMap<OutputName, Realisation>,
}

/// A remote build in progress.
#[derive(Debug)]
pub struct RemoteBuild {
    log: File,
    child: SharedChild,
    thread: Option<JoinHandle<Result<RemoteDone, RemoteError>>>,
    outcome: Option<Result<RemoteDone, RemoteError>>,
    finished_at: Option<Instant>,
    known_hosts: Option<PathBuf>,
    /// Set by the thread once the remote said hello.
    connected: Arc<AtomicBool>,
}

impl RemoteBuild {
    /// Start ssh and the thread that drives it.
    pub fn start(job: RemoteJob) -> Result<Self, RemoteError> {
        let known_hosts = match job.ssh.known_hosts_line() {
            None => None,
            Some(line) => Some(write_known_hosts(&line)?),
        };
        let argv = job.ssh.argv(
            &job.sshopts,
            known_hosts.as_deref(),
            job.control_dir.as_deref(),
        );
        let (read, write) = log_pipe().map_err(|source| RemoteError::Spawn {
            program: argv[0].clone(),
            source,
        })?;
        let spawned = ServeConnection::spawn(&argv, Stdio::from(write));
        let (child, pipes) = match spawned {
            Ok(v) => v,
            Err(e) => {
                if let Some(p) = &known_hosts {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        };
        let connected = Arc::new(AtomicBool::new(false));
        let said_hello = connected.clone();
        let thread = std::thread::Builder::new()
            .name("firn-remote".into())
            .spawn(move || run(job, pipes, &said_hello))
            .map_err(|source| RemoteError::Spawn {
                program: "a thread".into(),
                source,
            })?;
        Ok(Self {
            log: File::from(read),
            child,
            thread: Some(thread),
            outcome: None,
            finished_at: None,
            known_hosts,
            connected,
        })
    }

    /// The remote program answered the handshake (Nix announces a remote build only
    /// then: the hook accepted once connected).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The read end of the remote's stderr (the build log), to poll.
    pub fn log_fd(&self) -> BorrowedFd<'_> {
        self.log.as_fd()
    }

    pub fn read_log(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.log.read(buf)
    }

    /// The outcome, once the protocol is over and ssh has exited (so its last words
    /// are in the log); `None` while it runs.
    pub fn try_finish(&mut self) -> Option<Result<RemoteDone, RemoteError>> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(t) = self.thread.take() {
                self.outcome = Some(t.join().unwrap_or(Err(RemoteError::Stopped)));
                self.finished_at = Some(Instant::now());
            }
        }
        self.outcome.as_ref()?;
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.try_wait() {
            Ok(None) if self.finished_at.is_some_and(|t| t.elapsed() < LINGER) => return None,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Ok(Some(_)) | Err(_) => {}
        }
        drop(child);
        self.outcome.take()
    }

    /// Kill ssh (which ends the remote program and its build) and wait for the thread.
    pub fn kill(&mut self) {
        {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.wait();
        self.outcome = Some(Err(RemoteError::Stopped));
    }
}

impl Drop for RemoteBuild {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.kill();
        }
        if let Some(p) = &self.known_hosts {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn log_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// A known-hosts file holding the machine's host key (Nix writes one per store too).
fn write_known_hosts(line: &str) -> Result<PathBuf, RemoteError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "firn-known-hosts-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, line).map_err(|source| RemoteError::HostKeyFile {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn run(job: RemoteJob, pipes: Pipes, connected: &AtomicBool) -> Result<RemoteDone, RemoteError> {
    let sd = job.layout.store_dir.clone();
    let mut conn = ServeConnection::handshake(pipes, &sd)?;
    connected.store(true, Ordering::Release);
    let options = StoreOptions {
        auto_optimise: job.auto_optimise,
        own_temp_roots: true,
        ..StoreOptions::default()
    };
    let mut store = Store::open_with(&job.layout, &options)?;
    copy_inputs(&mut conn, &store, &job)?;
    let result = conn.build_derivation(&job.drv_path, &job.drv, &job.settings)?;
    if !result.status.is_success() {
        return Ok(RemoteDone {
            result,
            realisations: BTreeMap::new(),
        });
    }
    let mut realisations = BTreeMap::new();
    let mut fetch = job.outputs.clone();
    for (name, id) in &job.floating {
        let key = id.to_string();
        let json = result
            .built_outputs
            .get(&key)
            .ok_or_else(|| RemoteError::MissingOutput { path: key.clone() })?;
        let r = Realisation::from_json(json, &key).map_err(|e| RemoteError::BadRealisation {
            id: key.clone(),
            message: e.to_string(),
        })?;
        if !store
            .db()
            .is_valid_path(&r.out_path)
            .map_err(StoreError::from)?
        {
            fetch.insert(r.out_path.clone());
        }
        realisations.insert(name.clone(), r);
    }
    if !fetch.is_empty() {
        copy_outputs(&mut conn, &mut store, &fetch, &job.outputs)?;
    }
    Ok(RemoteDone {
        result,
        realisations,
    })
}

/// Send what the remote lacks of the input closure, references first.
fn copy_inputs(
    conn: &mut ServeConnection,
    store: &Store,
    job: &RemoteJob,
) -> Result<(), RemoteError> {
    let valid = conn.query_valid_paths(&job.inputs, job.use_substitutes)?;
    let mut infos = Vec::new();
    for p in job.inputs.difference(&valid) {
        let info = store
            .db()
            .query_path_info(p)
            .map_err(StoreError::from)?
            .ok_or_else(|| RemoteError::InputNotValid(p.clone()))?;
        infos.push(info);
    }
    let by_path: BTreeMap<StorePath, &firn_store::ValidPathInfo> =
        infos.iter().map(|i| (i.path.clone(), i)).collect();
    let order = firn_store::import::references_first(&infos);
    for p in &order {
        let info = by_path[p];
        let real = store.real_path(p);
        conn.add_to_store_nar(info, |mut w| {
            firn_store::nar::dump_path(&real, &mut w).map_err(|e| match e {
                // The remote's end is the sink: it went away.
                firn_store::nar::NarError::Write { source } => RemoteError::Send(source),
                e => RemoteError::Store(StoreError::from(e)),
            })
        })?;
    }
    Ok(())
}

/// Bring the outputs back, references first, each checked against the remote's info;
/// `locked`: those whose locks the goal holds.
fn copy_outputs(
    conn: &mut ServeConnection,
    store: &mut Store,
    outputs: &BTreeSet<StorePath>,
    locked: &BTreeSet<StorePath>,
) -> Result<(), RemoteError> {
    let sd = store.store_dir().clone();
    let infos = conn.query_path_infos(outputs)?;
    let described: BTreeSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
    if let Some(p) = outputs.iter().find(|p| !described.contains(p)) {
        return Err(RemoteError::MissingOutput {
            path: sd.display(p),
        });
    }
    let local: Vec<firn_store::ValidPathInfo> = infos
        .iter()
        .filter(|i| outputs.contains(&i.path))
        .map(ServePathInfo::to_store)
        .collect();
    let by_path: BTreeMap<StorePath, &firn_store::ValidPathInfo> =
        local.iter().map(|i| (i.path.clone(), i)).collect();
    for p in firn_store::import::references_first(&local) {
        let info = by_path[&p];
        let held = locked.contains(&p);
        conn.dump_store_path(&p, |nar| {
            match held {
                true => store.add_nar_locked(info, nar),
                false => store.add_nar(info, nar),
            }
            .map_err(|source| RemoteError::Import {
                path: sd.display(&p),
                source: Box::new(source),
            })
        })?;
    }
    Ok(())
}
