//! `firn serve-cache`: the store, read-only, as an HTTP/1.1 binary cache (as nix-serve
//! and harmonia serve one).
//!
//! - `GET /nix-cache-info`: `StoreDir`, `WantMassQuery: 1`, `Priority: 30`;
//! - `GET`/`HEAD /<hashPart>.narinfo`: made from the database — `URL:
//!   nar/<hashPart>.nar`, `Compression: none`, no `FileHash`/`FileSize` (as nix-serve), the
//!   path's signatures plus one per secret key given;
//! - `GET /nar/<hashPart>.nar`: the NAR, dumped as it is sent, with its length from the
//!   database.
//!
//! Nothing else is served: any other path is 404 (the request path is never joined to a
//! file name: only a 32-character nix-base32 hash part is looked up in the database),
//! any other method 405, a request with a body or a malformed head 400 (and the
//! connection is closed). No `Content-Encoding` is sent (Nix 2.8 breaks on `identity`).
//!
//! Shape: one thread accepts, one thread per connection (at most [`MAX_CONNECTIONS`],
//! idle ones closed after [`IDLE_TIMEOUT`]) reads requests (`http_request`) and writes
//! responses; the database is only touched by the thread that called
//! [`CacheServer::serve`], which answers each request's lookup over a channel (the store
//! is not `Sync`). Connections are kept alive as HTTP/1.1 says: Nix opens up to 25 at
//! once and reuses them. (This replaced `tiny_http`, whose thread pool left a burst of
//! new keep-alive connections unread until older ones closed: the real Nix client
//! stalled for its 300 s timeout on two first runs in three.)

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use firn_store::nar;
use firn_store::Store;

use crate::cache_info::CacheInfo;
use crate::error::CacheError;
use crate::http_request::{read_request, Request};
use crate::keys::{info_fingerprint, SecretKey};
use crate::narinfo::NarInfo;

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A server bound to its address, not yet serving.
#[derive(Debug)]
pub struct CacheServer {
    listener: TcpListener,
    listen: String,
}

/// What a connection asks the serving thread: the request's method and path.
struct Lookup {
    path: String,
    reply: mpsc::Sender<Reply>,
}

/// The serving thread's answer.
enum Reply {
    Text {
        status: u16,
        body: String,
        content_type: &'static str,
    },
    /// The NAR of `real`, `size` bytes long.
    Nar { real: PathBuf, size: u64 },
}

fn is_hash_part(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&b))
}

impl CacheServer {
    /// Bind `listen` (`HOST:PORT`; port 0 picks one).
    pub fn bind(listen: &str) -> Result<Self, CacheError> {
        let err = |e: &dyn std::fmt::Display| CacheError::Serve {
            listen: listen.to_owned(),
            msg: e.to_string(),
        };
        let listener = TcpListener::bind(listen).map_err(|e| err(&e))?;
        // Responses leave in several writes (head, then the body); with Nagle's
        // algorithm each keep-alive response would wait for the client's delayed ACK
        // (40 ms on Linux: 200 paths took Nix 9 s instead of 0.5 s). Accepted sockets
        // inherit TCP_NODELAY from the listener on Linux; it is set on each anyway.
        nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true)
            .map_err(|e| err(&e))?;
        Ok(Self {
            listener,
            listen: listen.to_owned(),
        })
    }

    /// The address bound.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Answer requests until `stop()` says so (checked every second).
    pub fn serve(
        &self,
        store: &Store,
        keys: &[SecretKey],
        stop: impl Fn() -> bool,
    ) -> Result<(), CacheError> {
        let listener = self.listener.try_clone().map_err(|e| CacheError::Serve {
            listen: self.listen.clone(),
            msg: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel::<Lookup>();
        // The acceptor and the connections hold only their sockets and a sender; they
        // end with the process (or when their peer goes), not with this call.
        std::thread::spawn(move || accept_loop(listener, tx));
        while !stop() {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(l) => {
                    // A connection that went away is its own problem.
                    let _ = l.reply.send(answer(store, keys, &l.path));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(CacheError::Serve {
                        listen: self.listen.clone(),
                        msg: "the listening socket failed".into(),
                    })
                }
            }
        }
        Ok(())
    }
}

fn accept_loop(listener: TcpListener, tx: mpsc::Sender<Lookup>) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            let _ = write_text(
                &mut stream,
                false,
                503,
                "too many connections\n",
                "text/plain",
                false,
            );
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (tx, open) = (tx.clone(), open.clone());
        std::thread::spawn(move || {
            let _ = connection(stream, &tx);
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// One connection: requests answered in order until the peer closes, asks to close,
/// goes idle, or sends something we do not read on.
fn connection(stream: TcpStream, tx: &mpsc::Sender<Lookup>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = BufWriter::with_capacity(64 * 1024, stream);
    while let Some(request) = read_request(&mut reader)? {
        let (path, head_only, keep_alive) = match request {
            Request::Get {
                path,
                head_only,
                keep_alive,
            } => (path, head_only, keep_alive),
            Request::OtherMethod { keep_alive } => {
                let body = "read-only binary cache\n";
                write_text(&mut out, false, 405, body, "text/plain", keep_alive)?;
                if keep_alive {
                    continue;
                }
                return Ok(());
            }
            // The body is not read: the connection ends with the answer.
            Request::WithBody { get: false } => {
                let body = "read-only binary cache\n";
                return write_text(&mut out, false, 405, body, "text/plain", false);
            }
            Request::WithBody { get: true } => {
                let body = "a request body is not accepted\n";
                return write_text(&mut out, false, 400, body, "text/plain", false);
            }
            Request::Malformed => {
                return write_text(
                    &mut out,
                    false,
                    400,
                    "malformed request\n",
                    "text/plain",
                    false,
                );
            }
        };
        let (reply_tx, reply_rx) = mpsc::channel();
        let lookup = Lookup {
            path,
            reply: reply_tx,
        };
        if tx.send(lookup).is_err() {
            return Ok(());
        }
        let Ok(reply) = reply_rx.recv() else {
            return Ok(());
        };
        match reply {
            Reply::Text {
                status,
                body,
                content_type,
            } => write_text(&mut out, head_only, status, &body, content_type, keep_alive)?,
            Reply::Nar { real, size } => {
                write_head(&mut out, 200, "application/x-nix-nar", size, keep_alive)?;
                if !head_only {
                    // A NAR that cannot be dumped whole (the path changed under us)
                    // leaves the response short: the connection is closed so the
                    // client sees a truncated body, never a wrong one.
                    let mut counted = CountingWriter {
                        inner: &mut out,
                        n: 0,
                    };
                    let dumped = nar::dump_path(&real, &mut counted);
                    if dumped.is_err() || counted.n != size {
                        let _ = out.flush();
                        return Ok(());
                    }
                }
            }
        }
        out.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

fn write_head(
    out: &mut impl Write,
    status: u16,
    content_type: &str,
    len: u64,
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nServer: firn\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: {connection}\r\n\r\n"
    )
}

fn write_text(
    out: &mut impl Write,
    head_only: bool,
    status: u16,
    body: &str,
    content_type: &str,
    keep_alive: bool,
) -> std::io::Result<()> {
    write_head(out, status, content_type, body.len() as u64, keep_alive)?;
    if !head_only {
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn text(status: u16, body: impl Into<String>, content_type: &'static str) -> Reply {
    Reply::Text {
        status,
        body: body.into(),
        content_type,
    }
}

fn answer(store: &Store, keys: &[SecretKey], url: &str) -> Reply {
    let sd = store.store_dir();
    if url == "/nix-cache-info" {
        return text(
            200,
            CacheInfo::new(sd.as_str()).to_text(),
            "text/x-nix-cache-info",
        );
    }
    let not_found = || text(404, "not found\n", "text/plain");
    let lookup = |hash: &str| {
        if !is_hash_part(hash) {
            return None;
        }
        let p = store.db().query_path_from_hash_part(hash).ok()??;
        let info = store.db().query_path_info(&p).ok()??;
        Some((p, info))
    };
    if let Some(hash) = url
        .strip_prefix('/')
        .and_then(|u| u.strip_suffix(".narinfo"))
    {
        let Some((p, info)) = lookup(hash) else {
            return not_found();
        };
        let mut sigs = info.sigs.clone();
        if let Some(fp) = info_fingerprint(sd, &info) {
            for k in keys {
                let s = k.sign(&fp);
                if !sigs.contains(&s) {
                    sigs.push(s);
                }
            }
        }
        let ni = NarInfo {
            path: p.clone(),
            url: format!("nar/{}.nar", p.hash_part()),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            sigs,
            ca: info.ca.clone(),
        };
        return text(200, ni.to_text(sd), "text/x-nix-narinfo");
    }
    if let Some(hash) = url
        .strip_prefix("/nar/")
        .and_then(|u| u.strip_suffix(".nar"))
    {
        let Some((p, info)) = lookup(hash) else {
            return not_found();
        };
        return Reply::Nar {
            real: store.real_path(&p),
            size: info.nar_size,
        };
    }
    not_found()
}
