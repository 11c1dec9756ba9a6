//! Checks of the `protocol` fuzz target: arbitrary bytes through every decoder of
//! `firn_protocol` (with small limits, so no input can make a decoder allocate much).
//! Beyond "no panic": whatever decodes is written back and decodes to the same value.
//!
//! The input is read five ways:
//! 1. a worker client stream: handshake, then requests and their framed payloads;
//! 2. a worker daemon stream: hello, version, stderr messages, then for each op of a
//!    fixed cycle (all of `Op::ALL`) stderr messages up to the final one and the reply;
//! 3. `data[1..]` as the reply of op `Op::ALL[data[0] % n]`;
//! 4. a serve client stream: hello, then commands (and an AddToStoreNar's NAR bytes);
//! 5. a QueryPathInfos reply and an export-stream trailer.

use firn_protocol::serve::{self, ServeRequest};
use firn_protocol::stderr::StderrMsg;
use firn_protocol::worker::{self, ClientHello, Payload, Reply, Request};
use firn_protocol::{Limits, Op, Reader, Writer};

const LIMITS: Limits = Limits {
    max_string: 1 << 16,
    max_items: 1 << 12,
    max_frame: 1 << 16,
};

fn reader(data: &[u8]) -> Reader<&[u8]> {
    Reader::with_config(data, Default::default(), LIMITS)
}

fn encode(f: impl FnOnce(&mut Writer<Vec<u8>>) -> std::io::Result<()>) -> Vec<u8> {
    let mut w = Writer::new(Vec::new());
    f(&mut w).expect("writing to a Vec cannot fail");
    w.into_inner()
}

fn check_request(req: &Request) {
    let bytes = encode(|w| req.write(w));
    let again = Request::read(&mut reader(&bytes))
        .unwrap_or_else(|e| panic!("{req:?} re-encoded does not decode: {e}"))
        .expect("not at the end");
    assert_eq!(&again, req, "request round trip");
}

fn check_reply(op: Op, reply: &Reply) {
    let bytes = encode(|w| reply.write(w));
    let again = Reply::read(op, &mut reader(&bytes))
        .unwrap_or_else(|e| panic!("{reply:?} re-encoded does not decode: {e}"));
    assert_eq!(&again, reply, "reply round trip");
}

fn check_msg(m: &StderrMsg) {
    let bytes = encode(|w| m.write(w));
    let again = StderrMsg::read(&mut reader(&bytes)).expect("stderr message round trip");
    assert_eq!(&again, m);
}

/// 1: the client side of a worker connection.
pub fn worker_client(data: &[u8]) {
    let mut r = reader(data);
    if worker::read_client_magic(&mut r).is_err() {
        return;
    }
    let Ok(hello) = ClientHello::read(&mut r) else {
        return;
    };
    assert_eq!(
        ClientHello::read(&mut reader(&encode(|w| hello.write(w)))).ok(),
        Some(hello)
    );
    while let Ok(Some(req)) = Request::read(&mut r) {
        check_request(&req);
        if req.payload() == Payload::Framed && r.framed().drain().is_err() {
            return;
        }
    }
}

/// 2: the daemon side of a worker connection.
pub fn worker_daemon(data: &[u8]) {
    let mut r = reader(data);
    if worker::read_server_hello(&mut r).is_err() || worker::read_daemon_version(&mut r).is_err() {
        return;
    }
    for op in std::iter::once(None).chain(Op::ALL.iter().copied().map(Some)) {
        loop {
            let Ok(m) = StderrMsg::read(&mut r) else {
                return;
            };
            check_msg(&m);
            match (m, op) {
                (StderrMsg::Last, Some(op)) => {
                    let Ok(reply) = Reply::read(op, &mut r) else {
                        return;
                    };
                    check_reply(op, &reply);
                    break;
                }
                (StderrMsg::Last | StderrMsg::Error(_), _) => break,
                _ => {}
            }
        }
    }
}

/// 3: one reply of an op chosen by the first byte.
pub fn worker_reply(data: &[u8]) {
    let Some((&b, rest)) = data.split_first() else {
        return;
    };
    let op = Op::ALL[usize::from(b) % Op::ALL.len()];
    if let Ok(reply) = Reply::read(op, &mut reader(rest)) {
        check_reply(op, &reply);
    }
}

/// 4: the client side of a serve connection.
pub fn serve_client(data: &[u8]) {
    let mut r = reader(data);
    let Ok(v) = serve::read_client_hello(&mut r) else {
        return;
    };
    while let Ok(Some(cmd)) = ServeRequest::read(&mut r, v) {
        let bytes = encode(|w| cmd.write(w, v));
        let again = ServeRequest::read(&mut reader(&bytes), v)
            .expect("serve command round trip")
            .expect("not at the end");
        assert_eq!(again, cmd);
        if let ServeRequest::AddToStoreNar(info) = &cmd {
            // Raw NAR bytes, skipped in small pieces (a huge narSize costs nothing).
            let mut left = info.info.nar_size;
            let mut buf = [0u8; 4096];
            while left > 0 {
                let n = usize::try_from(left.min(4096)).unwrap_or(4096);
                if r.read_exact_raw(&mut buf[..n], "NAR").is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
    }
}

/// 5: serve replies.
pub fn serve_replies(data: &[u8]) {
    if let Ok(infos) = serve::read_path_infos(&mut reader(data)) {
        let bytes = encode(|w| serve::write_path_infos(w, &infos));
        assert_eq!(
            serve::read_path_infos(&mut reader(&bytes)).ok(),
            Some(infos)
        );
    }
    if let Ok(t) = serve::ExportTrailer::read(&mut reader(data)) {
        let bytes = encode(|w| t.write(w));
        assert_eq!(
            serve::ExportTrailer::read(&mut reader(&bytes)).ok(),
            Some(t)
        );
    }
}

/// Everything above.
pub fn check_all(data: &[u8]) {
    worker_client(data);
    worker_daemon(data);
    worker_reply(data);
    serve_client(data);
    serve_replies(data);
}
