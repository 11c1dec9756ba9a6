//! Sessions of real Nix 2.8 (client and daemon / `nix-store --serve`), recorded byte for
//! byte by `tests/data/record.py` (see `tests/data/README.md`), decoded to the last byte
//! in both directions. Every decoded message is also written back and compared with the
//! bytes it came from, so the writers are checked against Nix as well as the readers.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::PathBuf;

use firn_protocol::serve::{self, ServeRequest};
use firn_protocol::stderr::StderrMsg;
use firn_protocol::worker::{self, ClientHello, Payload, Reply, Request};
use firn_protocol::{
    ActivityType, BuildMode, ContentAddressMethod, DerivedPath, Field, Op, Reader, ResultType,
    Verbosity, Writer,
};

fn data(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Re-encode with `write` and compare with `bytes[start..end]`.
fn same_bytes(bytes: &[u8], start: u64, end: u64, write: impl FnOnce(&mut Writer<Vec<u8>>)) {
    let mut w = Writer::new(Vec::new());
    write(&mut w);
    assert_eq!(
        w.into_inner(),
        &bytes[start as usize..end as usize],
        "re-encoding bytes {start}..{end}"
    );
}

/// Skip one NAR (as the client would read a NarFromPath / DumpStorePath reply).
fn skip_nar(r: &mut Reader<&[u8]>) {
    assert_eq!(r.read_bytes("magic").unwrap(), b"nix-archive-1");
    skip_node(r);
}

fn skip_node(r: &mut Reader<&[u8]>) {
    assert_eq!(r.read_bytes("(").unwrap(), b"(");
    loop {
        let tok = r.read_bytes("token").unwrap();
        match &tok[..] {
            b")" => return,
            b"type" | b"target" | b"contents" | b"name" => {
                r.read_bytes("value").unwrap();
            }
            b"executable" => {
                r.read_bytes("empty").unwrap();
            }
            b"entry" => skip_node_entry(r),
            other => panic!("unexpected NAR token {:?}", String::from_utf8_lossy(other)),
        }
    }
}

fn skip_node_entry(r: &mut Reader<&[u8]>) {
    assert_eq!(r.read_bytes("(").unwrap(), b"(");
    assert_eq!(r.read_bytes("name").unwrap(), b"name");
    r.read_bytes("name").unwrap();
    assert_eq!(r.read_bytes("node").unwrap(), b"node");
    skip_node(r);
    assert_eq!(r.read_bytes(")").unwrap(), b")");
}

/// One decoded operation of a worker session.
#[derive(Debug)]
struct Exchange {
    request: Request,
    /// Framed payload, if any.
    payload: Option<Vec<u8>>,
    messages: Vec<StderrMsg>,
    /// `Ok(reply)` after STDERR_LAST, `Err(message)` after STDERR_ERROR.
    outcome: Result<Reply, String>,
}

/// Decode a whole worker session, checking every byte.
fn worker_session(name: &str) -> (ClientHello, Vec<StderrMsg>, Vec<Exchange>) {
    let c2s = data(&format!("worker/{name}.c2s"));
    let s2c = data(&format!("worker/{name}.s2c"));
    let mut c = Reader::new(&c2s[..]);
    let mut s = Reader::new(&s2c[..]);

    worker::read_client_magic(&mut c).unwrap();
    assert_eq!(worker::read_server_hello(&mut s).unwrap(), 0x122);
    let hello = ClientHello::read(&mut c).unwrap();
    assert_eq!(hello, ClientHello::nix_2_8());
    same_bytes(&c2s, 8, c.position(), |w| hello.write(w).unwrap());
    assert_eq!(worker::read_daemon_version(&mut s).unwrap(), "2.8.0");
    let (handshake_msgs, end) = firn_protocol::stderr::read_until_final(&mut s).unwrap();
    end.unwrap();

    let mut exchanges = Vec::new();
    loop {
        let start = c.position();
        let Some(request) = Request::read(&mut c).unwrap() else {
            break;
        };
        same_bytes(&c2s, start, c.position(), |w| request.write(w).unwrap());
        let payload = match request.payload() {
            Payload::Framed => Some(c.framed().read_to_vec(1 << 20).unwrap()),
            Payload::None => None,
            Payload::StderrRead => panic!("no ImportPaths in the recordings"),
        };
        let mut messages = Vec::new();
        let outcome = loop {
            let start = s.position();
            let m = StderrMsg::read(&mut s).unwrap();
            same_bytes(&s2c, start, s.position(), |w| m.write(w).unwrap());
            match m {
                StderrMsg::Last => {
                    let start = s.position();
                    let reply = Reply::read(request.op(), &mut s).unwrap();
                    same_bytes(&s2c, start, s.position(), |w| reply.write(w).unwrap());
                    if reply == Reply::Nar {
                        skip_nar(&mut s);
                    }
                    break Ok(reply);
                }
                StderrMsg::Error(e) => break Err(e.message()),
                m => messages.push(m),
            }
        };
        exchanges.push(Exchange {
            request,
            payload,
            messages,
            outcome,
        });
    }
    assert_eq!(
        c.position(),
        c2s.len() as u64,
        "{name}: client bytes left over"
    );
    assert_eq!(
        s.position(),
        s2c.len() as u64,
        "{name}: daemon bytes left over"
    );
    (hello, handshake_msgs, exchanges)
}

fn paths() -> (String, String) {
    let t = String::from_utf8(data("paths.txt")).unwrap();
    let get = |k: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_owned()
    };
    (get("added "), get("built "))
}

fn ops(ex: &[Exchange]) -> Vec<Op> {
    ex.iter().map(|e| e.request.op()).collect()
}

fn set_options(ex: &Exchange) -> &worker::ClientSettings {
    match &ex.request {
        Request::SetOptions(s) => s,
        other => panic!("expected SetOptions, got {other:?}"),
    }
}

#[test]
fn add_to_store() {
    let (added, _) = paths();
    let (_, hs, ex) = worker_session("add");
    assert!(hs.is_empty());
    assert_eq!(ops(&ex), [Op::SetOptions, Op::AddToStore]);
    let so = set_options(&ex[0]);
    assert_eq!(so.verbosity, Verbosity::Info);
    assert_eq!(so.max_build_jobs, 1);
    assert!(so.use_build_hook && so.use_substitutes && !so.keep_failed);
    assert!(so.overrides.is_empty());
    assert_eq!(ex[0].outcome, Ok(Reply::Nothing));
    match &ex[1].request {
        Request::AddToStore {
            name,
            method,
            references,
            repair,
        } => {
            assert_eq!(name, "hello.txt");
            assert_eq!(
                *method,
                ContentAddressMethod::parse("fixed:r:sha256").unwrap()
            );
            assert!(references.is_empty() && !repair);
        }
        other => panic!("{other:?}"),
    }
    let nar = ex[1].payload.as_ref().unwrap();
    assert!(nar.starts_with(b"\x0d\0\0\0\0\0\0\0nix-archive-1"));
    assert!(nar
        .windows(34)
        .any(|w| w == b"hello from firn's protocol vectors"));
    match &ex[1].outcome {
        Ok(Reply::AddedPath(info)) => {
            assert_eq!(format!("/nix/store/{}", info.path), added);
            assert_eq!(info.info.nar_size, nar.len() as u64);
            assert_eq!(
                info.info.ca.unwrap().to_string(),
                format!("fixed:r:sha256:{}", info.info.nar_hash.to_nixbase32())
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn is_valid_path_and_query_path_info() {
    let (added, _) = paths();
    let (_, _, ex) = worker_session("is-valid");
    assert_eq!(ops(&ex), [Op::SetOptions, Op::IsValidPath]);
    assert_eq!(ex[1].outcome, Ok(Reply::Bool(true)));
    match &ex[1].request {
        Request::IsValidPath(p) => assert_eq!(format!("/nix/store/{p}"), added),
        other => panic!("{other:?}"),
    }
    let (_, _, ex) = worker_session("query-path-info");
    assert_eq!(ops(&ex), [Op::SetOptions, Op::QueryPathInfo]);
    match &ex[1].outcome {
        Ok(Reply::PathInfo(Some(info))) => {
            assert_eq!(info.deriver, None);
            assert!(info.references.is_empty());
            assert_eq!(info.nar_size, 152);
            assert!(info.registration_time > 1_600_000_000);
            assert!(info.ca.is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn build_with_activities() {
    let (_, built) = paths();
    let (_, _, ex) = worker_session("build");
    let o = ops(&ex);
    assert_eq!(o[0], Op::SetOptions);
    assert!(o.contains(&Op::AddToStore) && o.contains(&Op::QueryMissing));
    assert!(o.contains(&Op::AddTempRoot) && o.contains(&Op::AddIndirectRoot));
    let so = set_options(&ex[0]);
    assert_eq!(
        so.overrides.get("connect-timeout").map(String::as_str),
        Some("7")
    );

    // The .drv went in as text, with the source as a reference.
    let drv_add = ex
        .iter()
        .find(|e| {
            matches!(
                &e.request,
                Request::AddToStore {
                    method: ContentAddressMethod::Text,
                    ..
                }
            )
        })
        .unwrap();
    let text = drv_add.payload.as_ref().unwrap();
    assert!(text.starts_with(b"Derive([(\"out\",\"/nix/store/"));

    let build = ex
        .iter()
        .find(|e| e.request.op() == Op::BuildPaths)
        .unwrap();
    match &build.request {
        Request::BuildPaths { paths, mode } => {
            assert_eq!(*mode, BuildMode::Normal);
            assert!(matches!(&paths[..], [DerivedPath::Built { outputs, .. }]
                if outputs.iter().map(String::as_str).eq(["out"])));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(build.outcome, Ok(Reply::Ok));
    let kinds: Vec<ActivityType> = build
        .messages
        .iter()
        .filter_map(|m| match m {
            StderrMsg::StartActivity { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    for k in [
        ActivityType::Realise,
        ActivityType::Builds,
        ActivityType::Build,
    ] {
        assert!(kinds.contains(&k), "{k} not in {kinds:?}");
    }
    let starts = build
        .messages
        .iter()
        .filter(|m| matches!(m, StderrMsg::StartActivity { .. }))
        .count();
    let stops = build
        .messages
        .iter()
        .filter(|m| matches!(m, StderrMsg::StopActivity(_)))
        .count();
    assert_eq!(starts, stops, "every activity stopped");
    let log: Vec<&[u8]> = build
        .messages
        .iter()
        .filter_map(|m| match m {
            StderrMsg::Result {
                kind: ResultType::BuildLogLine,
                fields,
                ..
            } => match &fields[..] {
                [Field::String(s)] => Some(&s[..]),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(log, [&b"building"[..], b"to stderr"]);
    let map = ex
        .iter()
        .find(|e| e.request.op() == Op::QueryDerivationOutputMap)
        .unwrap();
    match &map.outcome {
        Ok(Reply::OutputMap(m)) => {
            assert_eq!(format!("/nix/store/{}", m["out"].as_ref().unwrap()), built)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn failing_build_ends_in_an_error_frame() {
    let (_, _, ex) = worker_session("build-fail");
    let build = ex
        .iter()
        .find(|e| e.request.op() == Op::BuildPaths)
        .unwrap();
    let msg = build.outcome.as_ref().unwrap_err();
    assert!(msg.contains("failed with exit code 3"), "{msg}");
    assert!(build.messages.iter().any(|m| matches!(m,
        StderrMsg::Result { kind: ResultType::BuildLogLine, fields, .. }
            if fields == &[Field::from("about to fail")])));
    // After STDERR_ERROR the connection stays usable: the session decoded to its end.
}

#[test]
fn gc_and_verify() {
    let (_, _, ex) = worker_session("gc-print-dead");
    match (&ex[1].request, &ex[1].outcome) {
        (
            Request::CollectGarbage {
                action,
                max_freed,
                ignore_liveness,
                ..
            },
            Ok(Reply::CollectGarbage(_)),
        ) => {
            assert_eq!(*action, firn_protocol::GcAction::ReturnDead);
            assert_eq!(*max_freed, u64::MAX);
            assert!(!ignore_liveness);
        }
        other => panic!("{other:?}"),
    }
    let (_, _, ex) = worker_session("verify");
    assert_eq!(
        ex[1].request,
        Request::VerifyStore {
            check_contents: false,
            repair: false
        }
    );
    assert_eq!(ex[1].outcome, Ok(Reply::Bool(false)));
}

/// Decode a serve session; returns the commands.
fn serve_session(name: &str) -> Vec<ServeRequest> {
    let c2s = data(&format!("serve/{name}.c2s"));
    let s2c = data(&format!("serve/{name}.s2c"));
    let mut c = Reader::new(&c2s[..]);
    let mut s = Reader::new(&s2c[..]);
    let v = serve::read_client_hello(&mut c).unwrap();
    assert_eq!(v, serve::SERVE_PROTOCOL_VERSION);
    assert_eq!(serve::read_server_hello(&mut s).unwrap(), 0x207);
    let mut cmds = Vec::new();
    loop {
        let start = c.position();
        let Some(cmd) = ServeRequest::read(&mut c, v).unwrap() else {
            break;
        };
        same_bytes(&c2s, start, c.position(), |w| cmd.write(w, v).unwrap());
        let start = s.position();
        match &cmd {
            ServeRequest::QueryValidPaths { .. } | ServeRequest::QueryClosure { .. } => {
                let ps = s.read_store_path_list("paths").unwrap();
                same_bytes(&s2c, start, s.position(), |w| {
                    w.write_store_paths(&ps).unwrap()
                });
            }
            ServeRequest::QueryPathInfos(_) => {
                let infos = serve::read_path_infos(&mut s).unwrap();
                same_bytes(&s2c, start, s.position(), |w| {
                    serve::write_path_infos(w, &infos).unwrap()
                });
            }
            ServeRequest::DumpStorePath(_) => skip_nar(&mut s),
            ServeRequest::AddToStoreNar(info) => {
                let mut nar = vec![0u8; info.info.nar_size as usize];
                c.read_exact_raw(&mut nar, "NAR").unwrap();
                assert!(nar.starts_with(b"\x0d\0\0\0\0\0\0\0nix-archive-1"));
                serve::read_ok(&mut s).unwrap();
            }
            other => panic!("not in the recordings: {other:?}"),
        }
        cmds.push(cmd);
    }
    assert_eq!(
        c.position(),
        c2s.len() as u64,
        "{name}: client bytes left over"
    );
    assert_eq!(
        s.position(),
        s2c.len() as u64,
        "{name}: server bytes left over"
    );
    cmds
}

#[test]
fn serve_copy_to_and_from() {
    let (_, built) = paths();
    let cmds = serve_session("copy-to");
    assert!(
        matches!(&cmds[0], ServeRequest::QueryValidPaths { lock: false, substitute: false, paths }
        if paths.len() == 1)
    );
    assert!(cmds
        .iter()
        .any(|c| matches!(c, ServeRequest::AddToStoreNar(i)
            if format!("/nix/store/{}", i.path) == built)));
    let cmds = serve_session("copy-from");
    assert!(matches!(cmds[0], ServeRequest::QueryPathInfos(_)));
    assert!(cmds.iter().any(
        |c| matches!(c, ServeRequest::DumpStorePath(p) if format!("/nix/store/{p}") == built)
    ));
}

#[test]
#[ignore = "prints the op sequences for tests/data/README.md"]
fn print_sessions() {
    for name in [
        "add",
        "is-valid",
        "query-path-info",
        "build",
        "build-fail",
        "gc-print-dead",
        "verify",
    ] {
        let (_, _, ex) = worker_session(name);
        let v: Vec<String> = ex
            .iter()
            .map(|e| {
                format!(
                    "{}{}",
                    e.request.op(),
                    if e.outcome.is_err() { "!" } else { "" }
                )
            })
            .collect();
        println!("{name}: {}", v.join(", "));
    }
    for name in ["copy-to", "copy-from"] {
        let v: Vec<_> = serve_session(name)
            .iter()
            .map(|c| c.command().to_string())
            .collect();
        println!("{name}: {}", v.join(", "));
    }
}
