//! `firn serve-cache`: the store, read-only, as an HTTP binary cache (as nix-serve and
//! harmonia serve one), with `tiny_http`.
//!
//! - `GET /nix-cache-info`: `StoreDir`, `WantMassQuery: 1`, `Priority: 30`;
//! - `GET`/`HEAD /<hashPart>.narinfo`: made from the database — `URL:
//!   nar/<hashPart>.nar`, `Compression: none`, no `FileHash`/`FileSize` (as nix-serve), the
//!   path's signatures plus one per secret key given;
//! - `GET /nar/<hashPart>.nar`: the NAR, dumped as it is sent (a thread writes it into a
//!   pipe), with its length from the database.
//!
//! Nothing else is served: any other path is 404 (the request path is never joined to a
//! file name: only a 32-character nix-base32 hash part is looked up in the database),
//! any other method 405. No `Content-Encoding` is sent (Nix 2.8 breaks on `identity`).
//! Requests are answered one at a time.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;

use firn_derivation::StorePath;
use firn_store::nar;
use firn_store::Store;
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use crate::cache_info::CacheInfo;
use crate::error::CacheError;
use crate::keys::{info_fingerprint, SecretKey};
use crate::narinfo::NarInfo;

/// A server bound to its address, not yet serving.
pub struct CacheServer {
    server: Server,
}

impl std::fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheServer").finish_non_exhaustive()
    }
}

/// The headers of a response: its content type (our constants always make a header).
fn content_type(v: &str) -> Vec<Header> {
    Header::from_bytes(&b"Content-Type"[..], v.as_bytes())
        .into_iter()
        .collect()
}

fn is_hash_part(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&b))
}

impl CacheServer {
    /// Bind `listen` (`HOST:PORT`; port 0 picks one).
    pub fn bind(listen: &str) -> Result<Self, CacheError> {
        let server = Server::http(listen).map_err(|e| CacheError::Serve {
            listen: listen.to_owned(),
            msg: e.to_string(),
        })?;
        Ok(Self { server })
    }

    /// The address bound.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.server_addr().to_ip()
    }

    /// Answer requests until `stop()` says so (checked between requests and every
    /// second).
    pub fn serve(
        &self,
        store: &Store,
        keys: &[SecretKey],
        stop: impl Fn() -> bool,
    ) -> Result<(), CacheError> {
        while !stop() {
            let req = match self.server.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    return Err(CacheError::Serve {
                        listen: format!("{:?}", self.server.server_addr()),
                        msg: e.to_string(),
                    })
                }
            };
            // A client that went away is its own problem.
            let _ = answer(store, keys, req);
        }
        Ok(())
    }
}

fn text(status: u16, body: &str, content_type: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut r = Response::from_string(body).with_status_code(StatusCode(status));
    for h in self::content_type(content_type) {
        r = r.with_header(h);
    }
    r
}

fn answer(store: &Store, keys: &[SecretKey], req: Request) -> std::io::Result<()> {
    if !matches!(req.method(), Method::Get | Method::Head) {
        return req.respond(text(405, "read-only binary cache\n", "text/plain"));
    }
    let url = req.url().split('?').next().unwrap_or("").to_owned();
    let sd = store.store_dir();
    if url == "/nix-cache-info" {
        let info = CacheInfo::new(sd.as_str()).to_text();
        return req.respond(text(200, &info, "text/x-nix-cache-info"));
    }
    let not_found = |req: Request| req.respond(text(404, "not found\n", "text/plain"));
    let lookup = |hash: &str| -> Option<(StorePath, firn_store::ValidPathInfo)> {
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
            return not_found(req);
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
        return req.respond(text(200, &ni.to_text(sd), "text/x-nix-narinfo"));
    }
    if let Some(hash) = url
        .strip_prefix("/nar/")
        .and_then(|u| u.strip_suffix(".nar"))
    {
        let Some((p, info)) = lookup(hash) else {
            return not_found(req);
        };
        let real = store.real_path(&p);
        return send_nar(req, &real, info.nar_size);
    }
    not_found(req)
}

/// Stream the NAR of `real` (of `size` bytes) as the response body.
fn send_nar(req: Request, real: &Path, size: u64) -> std::io::Result<()> {
    let (reader, mut writer) = std::io::pipe()?;
    let real = real.to_path_buf();
    let dumper = std::thread::spawn(move || {
        let r = nar::dump_path(&real, &mut writer);
        drop(writer);
        r
    });
    let body: Box<dyn Read + Send> = Box::new(reader);
    let response = Response::new(
        StatusCode(200),
        content_type("application/x-nix-nar"),
        body,
        usize::try_from(size).ok(),
        None,
    );
    let sent = req.respond(response);
    let _ = dumper.join();
    sent
}
