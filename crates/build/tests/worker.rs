//! The goal and the worker with a fake builder and a temporary store, without root:
//! partial validity, busy build users, keep-going, dependency failures, interrupts,
//! `--check`, and what the worker reports. The fake builder runs no process: it
//! "builds" by writing each output as a small file into a staging directory (as the
//! sandbox leaves outputs in its root), feeds a scripted log through a real pipe, and
//! exits with a scripted status.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::rc::Rc;

use firn_build::builder::{
    AcquiredUser, BuildDir, BuildJob, BuildUser, Builder, Collected, ExecError, RunningBuild,
};
use firn_build::{
    exit_status, BuildEvents, BuildMode, BuildResult, BuildStatus, Message, SandboxMode, Settings,
    Wanted, Worker,
};
use firn_derivation::{OutputName, StorePath};
use firn_store::{Store, StoreLayout};

/// How the fake builder behaves for a derivation (by name).
#[derive(Debug, Clone, Default)]
struct Script {
    log: Vec<u8>,
    exit: i32,
    /// Never exits until killed.
    hang: bool,
    /// What each output file holds (default: "<name> built").
    content: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    scripts: BTreeMap<String, Script>,
    /// How many more times `acquire_user` says all users are busy.
    busy: usize,
    /// `acquire_user` fails like a missing group.
    no_group: bool,
    started: Vec<String>,
    killed: Vec<String>,
    /// The environment of each started build, by derivation name.
    envs: BTreeMap<String, BTreeMap<String, String>>,
    released: usize,
}

#[derive(Debug, Clone)]
struct FakeBuilder {
    staging: PathBuf,
    shared: Rc<RefCell<Shared>>,
}

#[derive(Debug)]
struct FakeBuild {
    name: String,
    reader: io::PipeReader,
    exit: Option<ExitStatus>,
    staging: PathBuf,
    build_dir: PathBuf,
}

impl RunningBuild for FakeBuild {
    fn log_fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }
    fn read_log(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        Ok(self.exit)
    }
    fn kill(&mut self) -> Option<ExitStatus> {
        self.exit = Some(ExitStatus::from_raw(9));
        self.exit
    }
    fn built_path(&self, output: &StorePath) -> PathBuf {
        self.staging.join(output.base_name())
    }
    fn build_uid(&self) -> Option<u32> {
        None
    }
    fn build_dir(&self) -> &Path {
        &self.build_dir
    }
}

impl Builder for FakeBuilder {
    type Build = FakeBuild;

    fn acquire_user(&mut self) -> Result<AcquiredUser, ExecError> {
        let mut s = self.shared.borrow_mut();
        if s.no_group {
            return Err(ExecError::NoSuchGroup("nosuchgroup".into()));
        }
        if s.busy > 0 {
            s.busy -= 1;
            return Ok(AcquiredUser::Busy);
        }
        Ok(AcquiredUser::NotConfigured)
    }

    fn build_dir(
        &mut self,
        drv_path: &StorePath,
        _user: Option<&BuildUser>,
        _sandboxed: bool,
    ) -> Result<BuildDir, ExecError> {
        let dir = self.staging.join(format!("build-{}", drv_path.name()));
        fs::create_dir_all(&dir).unwrap();
        Ok(BuildDir::new(dir.clone(), dir))
    }

    fn start(&mut self, job: BuildJob<'_>) -> Result<FakeBuild, ExecError> {
        let name = job.drv.name.clone();
        let mut shared = self.shared.borrow_mut();
        let script = shared.scripts.get(&name).cloned().unwrap_or_default();
        shared.started.push(name.clone());
        let env: BTreeMap<String, String> = job
            .plan
            .env
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        // "Build" every output the plan names, where the builder was told to.
        let staging = self.staging.join(format!("out-{name}"));
        fs::create_dir_all(&staging).unwrap();
        for out in job.drv.outputs.keys() {
            let out = String::from_utf8_lossy(out).into_owned();
            let path = &env[&out];
            let base = Path::new(path).file_name().unwrap();
            let content = script
                .content
                .clone()
                .unwrap_or_else(|| format!("{name} {out} built"));
            fs::write(staging.join(base), content).unwrap();
        }
        shared.envs.insert(name.clone(), env);
        let (reader, mut writer) = io::pipe().unwrap();
        writer.write_all(&script.log).unwrap();
        let exit = (!script.hang).then(|| ExitStatus::from_raw(script.exit << 8));
        if !script.hang {
            drop(writer);
        } else {
            // Kept open: the build is silent until killed.
            std::mem::forget(writer);
        }
        Ok(FakeBuild {
            name,
            reader,
            exit,
            staging,
            build_dir: job.build_dir.into_real(),
        })
    }

    fn collect_outputs(
        &mut self,
        build: &mut FakeBuild,
        outputs: &BTreeMap<OutputName, (StorePath, PathBuf)>,
    ) -> Result<Collected, ExecError> {
        let mut c = Collected::default();
        for (name, (p, real)) in outputs {
            let inside = build.built_path(p);
            if inside.exists() {
                fs::rename(&inside, real).unwrap();
            } else {
                c.missing_at.insert(name.clone(), inside);
            }
        }
        Ok(c)
    }

    fn release(&mut self, build: FakeBuild, _keep: bool) -> Result<Option<PathBuf>, ExecError> {
        let mut s = self.shared.borrow_mut();
        s.released += 1;
        if build.exit == Some(ExitStatus::from_raw(9)) {
            s.killed.push(build.name.clone());
        }
        let _ = fs::remove_dir_all(&build.staging);
        let _ = fs::remove_dir_all(&build.build_dir);
        Ok(None)
    }
}

/// Everything the worker reported, as lines.
#[derive(Debug, Default)]
struct Recorder {
    lines: Vec<String>,
}

fn name(drv: &StorePath) -> &str {
    firn_derivation::name_from_drv_base_name(drv.base_name())
}

impl BuildEvents for Recorder {
    fn build_started(&mut self, b: firn_build::BuildStarted<'_>) {
        self.lines.push(format!("start {}", name(b.drv)));
    }
    fn build_log(&mut self, drv: &StorePath, data: &[u8]) {
        self.lines.push(format!(
            "log {}: {}",
            name(drv),
            String::from_utf8_lossy(data)
        ));
    }
    fn result(&mut self, drv: &StorePath, r: &BuildResult) {
        self.lines
            .push(format!("result {} {}", name(drv), r.status.as_str()));
    }
    fn message(&mut self, m: Message<'_>) {
        self.lines.push(match m {
            Message::WaitingForBuildUser { drv } => format!("waiting for user {}", name(drv)),
            Message::WaitingForLocks { .. } => "waiting for locks".into(),
            other => format!("{other:?}"),
        });
    }
}

/// What a run gave: the top-level results, the events, the exit status, and the
/// builds an interrupt stopped.
type Outcome = (
    Vec<(StorePath, BuildResult)>,
    Vec<String>,
    u8,
    Vec<StorePath>,
);

struct Env {
    dir: PathBuf,
    store: Store,
    builder: FakeBuilder,
}

impl Env {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("firn-worker-{tag}-{}", std::process::id()));
        let _ = std::process::Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&dir)
            .status();
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("staging")).unwrap();
        let store = Store::open(&StoreLayout::chroot(&dir.join("root"))).unwrap();
        let builder = FakeBuilder {
            staging: dir.join("staging"),
            shared: Rc::new(RefCell::new(Shared::default())),
        };
        Self {
            dir,
            store,
            builder,
        }
    }

    fn script(&self, name: &str, script: Script) {
        self.builder
            .shared
            .borrow_mut()
            .scripts
            .insert(name.to_owned(), script);
    }

    /// Add a derivation with `outputs`, depending on `inputs` (their `out`).
    fn drv(&mut self, name: &str, outputs: &[&str], inputs: &[&StorePath]) -> StorePath {
        let sd = self.store.store_dir().clone();
        let outs: Vec<String> = outputs.iter().map(|o| format!("\"{o}\":{{}}")).collect();
        let env_outs: Vec<String> = outputs.iter().map(|o| format!("\"{o}\":\"\"")).collect();
        let ins: Vec<String> = inputs
            .iter()
            .map(|p| format!("\"{}\":[\"out\"]", sd.display(p)))
            .collect();
        let json = format!(
            r#"{{"name":"{name}","outputs":{{{}}},"inputSrcs":[],"inputDrvs":{{{}}},"system":"x86_64-linux","builder":"/bin/sh","args":[],"env":{{"name":"{name}",{},"outputs":"{}"}}}}"#,
            outs.join(","),
            ins.join(","),
            env_outs.join(","),
            outputs.join(" ")
        );
        let mut drvs = firn_derivation::parse_show_derivation(&sd, json.as_bytes()).unwrap();
        let (_, drv) = drvs.remove(0);
        self.store.add_derivation(drv, false).unwrap()
    }

    fn settings(&self) -> Settings {
        Settings {
            build_users_group: String::new(),
            ..Settings::default()
        }
    }

    /// Realise `tops` with `settings`, stopping when `interrupt_after` turns of the
    /// loop have passed (if given).
    fn run(
        &mut self,
        settings: Settings,
        tops: &[(StorePath, Wanted)],
        mode: BuildMode,
        interrupt_after: Option<usize>,
    ) -> Outcome {
        let mut events = Recorder::default();
        let turns = Cell::new(0usize);
        let interrupted = || {
            turns.set(turns.get() + 1);
            interrupt_after.is_some_and(|n| turns.get() > n)
        };
        let mut worker = Worker::new(
            &mut self.store,
            settings,
            self.builder.clone(),
            &mut events,
            interrupted,
        );
        let results = worker.run(tops, mode);
        let all: Vec<&BuildResult> = worker.results().map(|(_, r)| r).collect();
        let code = exit_status(&all);
        let stopped = worker.interrupted_builds().to_vec();
        drop(worker);
        (results, events.lines, code, stopped)
    }

    fn out_of(&self, r: &BuildResult, name: &str) -> PathBuf {
        self.store.real_path(&r.outputs[name])
    }

    fn valid(&self, p: &StorePath) -> bool {
        self.store.db().is_valid_path(p).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&self.dir)
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn all(p: &StorePath) -> (StorePath, Wanted) {
    (p.clone(), Wanted::All)
}

fn some(p: &StorePath, outs: &[&str]) -> (StorePath, Wanted) {
    (
        p.clone(),
        Wanted::Some(outs.iter().map(|o| OutputName::from(*o)).collect()),
    )
}

#[test]
fn a_chain_builds_inputs_first_and_registers_references() {
    let mut env = Env::new("chain");
    let dep = env.drv("dep", &["out"], &[]);
    let top = env.drv("top", &["out"], &[&dep]);
    // top's output names dep's output: the reference must be found and registered.
    let dep_out = env.store.read_derivation(&dep).unwrap();
    let dep_path = env
        .store
        .store_dir()
        .display(&dep_out.output_paths_by_name(env.store.store_dir()).unwrap()[&OutputName::out()]);
    env.script(
        "top",
        Script {
            content: Some(format!("uses {dep_path}")),
            log: b"hello from top\n".to_vec(),
            ..Script::default()
        },
    );
    let (results, lines, code, _) = env.run(env.settings(), &[all(&top)], BuildMode::Normal, None);
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(results[0].1.status, BuildStatus::Built);
    let starts: Vec<&String> = lines.iter().filter(|l| l.starts_with("start")).collect();
    assert_eq!(starts, ["start dep", "start top"]);
    assert!(
        lines.contains(&"log top: hello from top\n".to_owned()),
        "{lines:?}"
    );
    assert!(lines.contains(&"result top Built".to_owned()));
    let top_out = &results[0].1.outputs["out"];
    let info = env.store.db().query_path_info(top_out).unwrap().unwrap();
    let refs: Vec<String> = info
        .references
        .iter()
        .map(|p| env.store.store_dir().display(p))
        .collect();
    assert_eq!(refs, [dep_path]);
    // The log was kept, compressed, where `firn log` looks.
    let log = results[0].1.log.clone().unwrap();
    assert!(log.exists(), "{}", log.display());
    // A second run finds everything valid and builds nothing.
    let (results, lines, code, _) = env.run(env.settings(), &[all(&top)], BuildMode::Normal, None);
    assert_eq!(code, 0);
    assert_eq!(results[0].1.status, BuildStatus::AlreadyValid);
    assert!(!lines.iter().any(|l| l.starts_with("start")), "{lines:?}");
}

/// Build both outputs, then drop `dev` from the store: `out` is valid, `dev` is not.
fn partially_valid(env: &mut Env, sandbox: SandboxMode) -> (StorePath, BuildResult, u64) {
    let drv = env.drv("two", &["out", "dev"], &[]);
    let mut settings = env.settings();
    settings.sandbox = sandbox;
    let (results, lines, code, _) = env.run(settings, &[all(&drv)], BuildMode::Normal, None);
    assert_eq!(code, 0, "{lines:?}");
    let r = results[0].1.clone();
    let dev = r.outputs["dev"].clone();
    env.store
        .db_mut()
        .invalidate_paths(&[dev.clone()].into_iter().collect())
        .unwrap();
    firn_store::canonical::delete_path(&env.store.real_path(&dev)).unwrap();
    let ino = fs::metadata(env.out_of(&r, "out")).unwrap().ino();
    (drv, r, ino)
}

#[test]
fn a_rebuild_leaves_valid_outputs_alone_when_it_fails_and_when_it_succeeds() {
    for sandbox in [SandboxMode::On, SandboxMode::Off] {
        let mut env = Env::new(&format!("partial-{sandbox:?}"));
        let (drv, first, ino) = partially_valid(&mut env, sandbox);
        let out = first.outputs["out"].clone();
        let dev = first.outputs["dev"].clone();
        let mut settings = env.settings();
        settings.sandbox = sandbox;
        // Failing rebuild of dev.
        env.script(
            "two",
            Script {
                exit: 1,
                content: Some("second build".into()),
                ..Script::default()
            },
        );
        let (results, lines, code, _) = env.run(
            settings.clone(),
            &[some(&drv, &["dev"])],
            BuildMode::Normal,
            None,
        );
        assert_eq!(code, 100, "{lines:?}");
        assert_eq!(results[0].1.status, BuildStatus::PermanentFailure);
        assert_eq!(
            results[0].1.error.as_ref().unwrap().to_string(),
            format!(
                "builder for '{}' failed with exit code 1",
                env.store.store_dir().display(&drv)
            )
        );
        assert!(env.valid(&out));
        assert_eq!(fs::metadata(env.store.real_path(&out)).unwrap().ino(), ino);
        assert_eq!(
            fs::read_to_string(env.store.real_path(&out)).unwrap(),
            "two out built"
        );
        assert!(!env.store.real_path(&dev).exists(), "{sandbox:?}");
        // Succeeding rebuild of dev: dev is built, out stays the same file.
        env.script("two", Script::default());
        let (results, lines, code, _) =
            env.run(settings, &[some(&drv, &["dev"])], BuildMode::Normal, None);
        assert_eq!(code, 0, "{lines:?}");
        assert_eq!(results[0].1.status, BuildStatus::Built);
        assert!(env.valid(&dev));
        assert_eq!(fs::metadata(env.store.real_path(&out)).unwrap().ino(), ino);
        // Unsandboxed, the builder was pointed at a fallback path for the valid output.
        let shared = env.builder.shared.borrow();
        let seen_out = &shared.envs["two"]["out"];
        let real_out = env.store.store_dir().display(&out);
        match sandbox {
            SandboxMode::Off => {
                assert_ne!(seen_out, &real_out, "the valid output is redirected");
                assert!(seen_out.ends_with("-two"), "{seen_out}");
                // And nothing of the fallback path is left.
                let fallback = env.store.layout().real_path_of(Path::new(seen_out));
                assert!(!fallback.exists());
            }
            _ => assert_eq!(seen_out, &real_out),
        }
    }
}

#[test]
fn busy_build_users_make_the_goal_wait_and_a_missing_group_fails_it() {
    let mut env = Env::new("users");
    let drv = env.drv("wait", &["out"], &[]);
    env.builder.shared.borrow_mut().busy = 3;
    let (results, lines, code, _) = env.run(env.settings(), &[all(&drv)], BuildMode::Normal, None);
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(results[0].1.status, BuildStatus::Built);
    // Said once, then built once a user was free.
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == "waiting for user wait")
            .count(),
        1,
        "{lines:?}"
    );
    assert_eq!(env.builder.shared.borrow().busy, 0);

    let other = env.drv("nogroup", &["out"], &[]);
    env.builder.shared.borrow_mut().no_group = true;
    let (results, _, code, _) = env.run(env.settings(), &[all(&other)], BuildMode::Normal, None);
    assert_eq!(code, 1);
    assert_eq!(results[0].1.status, BuildStatus::MiscFailure);
    assert_eq!(
        results[0].1.error.as_ref().unwrap().to_string(),
        "the group 'nosuchgroup' specified in 'build-users-group' does not exist"
    );
    assert!(!env
        .builder
        .shared
        .borrow()
        .started
        .contains(&"nogroup".to_owned()));
    // Nothing was left at the output path, nor a lock file.
    let out = &env.store.read_derivation(&other).unwrap();
    let p = &out.output_paths_by_name(env.store.store_dir()).unwrap()[&OutputName::out()];
    let mut lock = env.store.real_path(p).into_os_string();
    lock.push(".lock");
    assert!(!Path::new(&lock).exists());
}

#[test]
fn a_failed_dependency_fails_its_dependents_and_keep_going_builds_the_rest() {
    let mut env = Env::new("keepgoing");
    let bad = env.drv("bad", &["out"], &[]);
    let top = env.drv("top", &["out"], &[&bad]);
    // Deeper than `bad` (found a round later, as Nix's worker goes), so `bad` gets the
    // one build slot first.
    let leaf = env.drv("leaf", &["out"], &[]);
    let mid = env.drv("mid", &["out"], &[&leaf]);
    let other = env.drv("zother", &["out"], &[&mid]);
    env.script(
        "bad",
        Script {
            exit: 2,
            ..Script::default()
        },
    );
    // Without keep-going: bad fails, top fails as a dependency, zother and what it needs
    // are not built.
    let (results, lines, code, _) = env.run(
        env.settings(),
        &[all(&top), all(&other)],
        BuildMode::Normal,
        None,
    );
    assert_eq!(code, 100, "{lines:?}");
    assert_eq!(results[0].1.status, BuildStatus::DependencyFailed);
    assert_eq!(results[1].1.status, BuildStatus::DependencyFailed);
    assert_eq!(
        results[1].1.error.as_ref().unwrap().to_string(),
        "cancelled because another build failed"
    );
    assert_eq!(env.builder.shared.borrow().started, ["bad"]);
    // With keep-going: zother is built; top's failure names its dependency.
    let mut settings = env.settings();
    settings.keep_going = true;
    let (results, lines, code, _) =
        env.run(settings, &[all(&top), all(&other)], BuildMode::Normal, None);
    assert_eq!(code, 100, "{lines:?}");
    assert_eq!(results[1].1.status, BuildStatus::Built);
    assert_eq!(
        results[0].1.error.as_ref().unwrap().to_string(),
        format!(
            "1 dependency of derivation '{}' failed to build",
            env.store.store_dir().display(&top)
        )
    );
    assert!(lines.contains(&"result top DependencyFailed".to_owned()));
}

#[test]
fn slots_limit_parallel_builds() {
    let mut env = Env::new("slots");
    let a = env.drv("a", &["out"], &[]);
    let b = env.drv("b", &["out"], &[]);
    let c = env.drv("c", &["out"], &[]);
    for n in ["a", "b"] {
        env.script(
            n,
            Script {
                hang: true,
                ..Script::default()
            },
        );
    }
    let mut settings = env.settings();
    settings.max_jobs = firn_build::settings::MaxJobs(2);
    // Two hang in the two slots; c never starts before the interrupt.
    let (results, lines, _, stopped) = env.run(
        settings,
        &[all(&a), all(&b), all(&c)],
        BuildMode::Normal,
        Some(3),
    );
    let started = env.builder.shared.borrow().started.clone();
    assert_eq!(started, ["a", "b"], "{lines:?}");
    let mut stopped = stopped;
    stopped.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(stopped, expected);
    for (_, r) in &results {
        assert_eq!(r.error.as_ref().unwrap().to_string(), "interrupted");
    }
    let mut killed = env.builder.shared.borrow().killed.clone();
    killed.sort();
    assert_eq!(killed, ["a", "b"]);
    // Interrupted builds leave nothing at their output paths.
    for p in [&a, &b] {
        let d = env.store.read_derivation(p).unwrap();
        let out = &d.output_paths_by_name(env.store.store_dir()).unwrap()[&OutputName::out()];
        assert!(!env.store.real_path(out).exists());
    }
}

#[test]
fn check_compares_rebuilt_outputs() {
    let mut env = Env::new("check");
    let drv = env.drv("det", &["out"], &[]);
    let (_, _, code, _) = env.run(env.settings(), &[all(&drv)], BuildMode::Normal, None);
    assert_eq!(code, 0);
    // The same content: the check passes.
    let (results, lines, code, _) = env.run(env.settings(), &[all(&drv)], BuildMode::Check, None);
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(results[0].1.status, BuildStatus::Built);
    // Different content: not deterministic, exit 104; the registered output stays.
    env.script(
        "det",
        Script {
            content: Some("something else".into()),
            ..Script::default()
        },
    );
    let (results, lines, code, _) = env.run(env.settings(), &[all(&drv)], BuildMode::Check, None);
    assert_eq!(code, 104, "{lines:?}");
    assert_eq!(results[0].1.status, BuildStatus::NotDeterministic);
    let out = env.out_of(&results[0].1, "out");
    assert_eq!(fs::read_to_string(out).unwrap(), "det out built");
    // Without the sandbox a check is refused before anything is built.
    let mut settings = env.settings();
    settings.sandbox = SandboxMode::Off;
    let before = env.builder.shared.borrow().started.len();
    let (results, _, code, _) = env.run(settings, &[all(&drv)], BuildMode::Check, None);
    assert_eq!(code, 1);
    assert_eq!(
        results[0].1.error.as_ref().unwrap().to_string(),
        "--check needs the sandbox: the rebuilt outputs go to its private store"
    );
    assert_eq!(env.builder.shared.borrow().started.len(), before);
}

#[test]
fn limits_and_missing_outputs() {
    let mut env = Env::new("limits");
    let big = env.drv("big", &["out"], &[]);
    env.script(
        "big",
        Script {
            log: vec![b'x'; 5000],
            ..Script::default()
        },
    );
    let mut settings = env.settings();
    settings.max_build_log_size = firn_build::settings::Bytes(Some(1000));
    let (results, _, code, _) = env.run(settings, &[all(&big)], BuildMode::Normal, None);
    assert_eq!(code, 1);
    assert_eq!(results[0].1.status, BuildStatus::LogLimitExceeded);
    assert_eq!(
        results[0].1.error.as_ref().unwrap().to_string(),
        format!(
            "building '{}' killed after writing more than 1000 bytes of log output",
            env.store.store_dir().display(&big)
        )
    );
    // A wanted output the derivation does not have.
    let two = env.drv("two", &["out"], &[]);
    let (results, _, code, _) = env.run(
        env.settings(),
        &[some(&two, &["nope"])],
        BuildMode::Normal,
        None,
    );
    assert_eq!(code, 1);
    assert!(results[0]
        .1
        .error
        .as_ref()
        .unwrap()
        .to_string()
        .ends_with("does not have wanted outputs 'nope'"));
}
