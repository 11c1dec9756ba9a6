//! Reading one HTTP/1.1 request head for `serve-cache`, with `httparse`.
//!
//! A head is the request line and headers up to the first empty line, at most
//! [`MAX_HEAD`] bytes (blank lines before the request line are skipped, RFC 9112 §2.2).
//! The binary cache only answers `GET` and `HEAD`, which carry no body: a request
//! announcing one (`Content-Length` other than 0, any `Transfer-Encoding`) is
//! [`Request::WithBody`] and its connection is closed rather than the body skipped.
//! Keep-alive as RFC 9112 §9.3: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
//! `Connection: keep-alive`. The query string is dropped from the path.

use std::io::{BufRead, ErrorKind, Read};

/// The longest request head read (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// The most headers a request may have.
const MAX_HEADERS: usize = 64;

/// What a request head asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET` or (`head_only`) `HEAD` of `path` (without its query).
    Get {
        path: String,
        head_only: bool,
        keep_alive: bool,
    },
    /// Any other method, without a body.
    OtherMethod { keep_alive: bool },
    /// A request with a body (never read).
    WithBody { get: bool },
    /// Not an HTTP request head, too long, or too many headers.
    Malformed,
}

/// Read the next request head; `None` when the peer closed or went idle first.
pub fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let Some(head) = read_head(reader)? else {
        return Ok(None);
    };
    Ok(Some(head.map_or(Request::Malformed, |h| parse_head(&h))))
}

/// `Ok(Some(Err(())))` for a head over [`MAX_HEAD`].
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let limit = (MAX_HEAD - head.len()) as u64 + 1;
        let n = match Read::take(&mut *reader, limit).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The peer closed: between requests that is the normal end; inside a head,
            // there is nobody left to answer.
            return Ok(None);
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Ok(Some(Err(())));
        }
        if line == b"\r\n" || line == b"\n" {
            if head.len() == line.len() {
                head.clear();
                continue;
            }
            return Ok(Some(Ok(head)));
        }
    }
}

fn parse_head(head: &[u8]) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let (Ok(httparse::Status::Complete(_)), Some(method), Some(path), Some(version)) =
        (req.parse(head), req.method, req.path, req.version)
    else {
        return Request::Malformed;
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let connection = header("connection").unwrap_or_default();
    let keep_alive = if version == 0 {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    let has_body = header("transfer-encoding").is_some()
        || header("content-length").is_some_and(|v| v.trim() != "0");
    let get = method == "GET" || method == "HEAD";
    if has_body {
        return Request::WithBody { get };
    }
    if !get {
        return Request::OtherMethod { keep_alive };
    }
    Request::Get {
        path: path.split('?').next().unwrap_or("").to_owned(),
        head_only: method == "HEAD",
        keep_alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> Vec<Request> {
        let mut r = std::io::Cursor::new(input);
        std::iter::from_fn(|| read_request(&mut r).unwrap()).collect()
    }

    fn get(path: &str, head_only: bool, keep_alive: bool) -> Request {
        Request::Get {
            path: path.into(),
            head_only,
            keep_alive,
        }
    }

    #[test]
    fn requests_in_a_row_keep_alive_and_close() {
        let input = b"\r\nGET /nix-cache-info?x=1 HTTP/1.1\r\nHost: a\r\n\r\n\
            HEAD /abc.narinfo HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n\
            GET /x HTTP/1.0\r\n\r\n\
            GET /y HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert_eq!(
            all(input),
            [
                get("/nix-cache-info", false, true),
                get("/abc.narinfo", true, true),
                get("/x", false, false),
                get("/y", false, false),
            ]
        );
    }

    #[test]
    fn bodies_methods_and_garbage() {
        assert_eq!(
            all(b"PUT /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"),
            [Request::WithBody { get: false }]
        );
        assert_eq!(
            all(b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            [Request::WithBody { get: true }]
        );
        assert_eq!(
            all(b"GET /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            [get("/a", false, true)]
        );
        assert_eq!(
            all(b"DELETE /a HTTP/1.1\r\n\r\n"),
            [Request::OtherMethod { keep_alive: true }]
        );
        assert_eq!(all(b"GARBAGE\r\n\r\n"), [Request::Malformed]);
        // A head cut short by the peer: nobody to answer.
        assert_eq!(all(b"GET /a HTTP/1.1\r\nHost"), []);
        let long = format!("GET /a HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(MAX_HEAD));
        assert_eq!(all(long.as_bytes())[0], Request::Malformed);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            all(format!("GET /a HTTP/1.1\r\n{many}\r\n").as_bytes()),
            [Request::Malformed]
        );
    }
}
