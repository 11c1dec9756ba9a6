//! `builtin:fetchurl` (`import <nix/fetchurl.nix>`): download attribute `url` to
//! attribute `out` — as a file (made executable when `executable` is `1`), or, when
//! `unpack` is `1`, as a NAR to restore there (xz-compressed when the URL ends in
//! `.xz`). The derivation is fixed-output: the worker checks the hash afterwards, as
//! for any other builder.
//!
//! `file://` URLs are read from the file system and `http://` and `https://` ones with
//! `ureq`, as Nix 2.8 does with curl: no decompression of the transfer, redirects
//! followed, proxies from `http_proxy` and friends (the derivation's `impureEnvVars`),
//! transient failures (connection refused, most 5xx) tried `download-attempts` times
//! with Nix's backoff and warning. Like Nix (`request.verifyTLS = false`), the server's
//! certificate is not checked: what is downloaded is checked against the output hash
//! afterwards, and a builder has no CA bundle to check against (nor credentials to
//! protect: firn does not hand `netrc-file` to it). Nix tries the `hashed-mirrors` first
//! for flat outputs; its default list is empty and firn does not offer the setting, so
//! only `url` is tried.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::quoted;
use super::{Attrs, BuiltinError, Context};

/// Nix's `baseRetryTimeMs`.
const BASE_RETRY_MS: f64 = 250.0;

/// Run the builder with `attrs` (`out`, `url`, `unpack`, `executable`,
/// `outputHashMode`).
pub fn fetchurl(attrs: &Attrs, cx: &mut Context<'_>) -> Result<(), BuiltinError> {
    let store_path = PathBuf::from(attrs.get("out")?);
    let url = String::from_utf8_lossy(attrs.get("url")?.as_bytes()).into_owned();
    let unpack = attrs.opt("unpack").map(OsStrExt::as_bytes) == Some(b"1");
    let executable = attrs.opt("executable").map(OsStrExt::as_bytes) == Some(b"1");
    // Nix reads it to decide whether to try the hashed mirrors (none here), and fails
    // without it.
    attrs.get("outputHashMode")?;
    let body = open_url(&url, cx)?;
    let mut source: Box<dyn Read> = match unpack && url.ends_with(".xz") {
        true => Box::new(xz2::read::XzDecoder::new(body)),
        false => body,
    };
    if unpack {
        firn_store::nar::restore_path(&mut source, &store_path)?;
    } else {
        let mut file = File::create(&store_path)
            .map_err(BuiltinError::sys(quoted("opening file", &store_path)))?;
        io::copy(&mut source, &mut file)
            .map_err(|e| BuiltinError::Download(format!("unable to download '{url}': {e}")))?;
    }
    if executable {
        fs::set_permissions(&store_path, fs::Permissions::from_mode(0o755)).map_err(
            BuiltinError::sys(format!("making '{}' executable", store_path.display())),
        )?;
    }
    Ok(())
}

/// How a failed transfer is treated (Nix's `FileTransfer::Error`): only transient
/// failures are tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Transient,
    NotFound,
    Forbidden,
    Misc,
}

/// Nix's kind for an HTTP error status.
pub fn classify_status(status: u16) -> Failure {
    match status {
        404 | 410 => Failure::NotFound,
        401 | 403 | 407 => Failure::Forbidden,
        408 | 429 => Failure::Transient,
        400..=499 => Failure::Misc,
        501 | 505 | 511 => Failure::Misc,
        _ => Failure::Transient,
    }
}

/// One failed attempt: its kind and message (without `error: `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    pub failure: Failure,
    pub message: String,
}

/// The message of an HTTP error answer, with the server's response when it is short or
/// HTML (Nix's heuristic), trailing white space removed.
pub fn http_error_message(url: &str, status: u16, reason: &str, body: Option<&[u8]>) -> String {
    let mut msg = format!("unable to download '{url}': HTTP error {status} ('{reason}')");
    if let Some(body) = body {
        let text = String::from_utf8_lossy(body);
        if body.len() < 1024 || text.contains("<html>") {
            msg.push_str("\n\nresponse body:\n\n");
            msg.push_str(text.trim_end_matches([' ', '\n', '\r', '\t']));
        }
    }
    msg
}

/// Nix's wait before attempt `attempt + 1` (`attempt` failed ones so far), given a
/// number in [0, 1) for its jitter.
pub fn retry_delay_ms(attempt: u32, jitter: f64) -> u64 {
    let exp = f64::from(attempt.saturating_sub(1)) + jitter.clamp(0.0, 1.0) * 0.5;
    (BASE_RETRY_MS * exp.exp2()) as u64
}

/// The body of `url`, trying transient failures again.
fn open_url(url: &str, cx: &mut Context<'_>) -> Result<Box<dyn Read>, BuiltinError> {
    let mut attempt = 0;
    loop {
        match open_once(url) {
            Ok(body) => return Ok(body),
            Err(e) => {
                attempt += 1;
                if e.failure == Failure::Transient && attempt < cx.download_attempts {
                    let ms = retry_delay_ms(attempt, jitter());
                    (cx.warn)(&format!("error: {}; retrying in {ms} ms", e.message));
                    std::thread::sleep(Duration::from_millis(ms));
                    continue;
                }
                return Err(BuiltinError::Download(e.message));
            }
        }
    }
}

/// A number in [0, 1) from the clock (the jitter needs no better randomness).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// The scheme of `url` and what follows `scheme://`.
fn split_scheme(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    Some((scheme, rest))
}

fn open_once(url: &str) -> Result<Box<dyn Read>, AttemptError> {
    let curl = |failure, text: &str, code: u32| AttemptError {
        failure,
        message: format!("unable to download '{url}': {text} ({code})"),
    };
    match split_scheme(url) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("file") => {
            let path = file_url_path(rest).ok_or_else(|| {
                curl(
                    Failure::Misc,
                    "URL using bad/illegal format or missing URL",
                    3,
                )
            })?;
            let unreadable = || curl(Failure::NotFound, "Couldn't read a file:// file", 37);
            if path.is_dir() {
                return Err(unreadable());
            }
            let file = File::open(&path).map_err(|_| unreadable())?;
            Ok(Box::new(file))
        }
        Some((scheme, _))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            http_get(url)
        }
        _ => Err(curl(Failure::Misc, "Unsupported protocol", 1)),
    }
}

/// The path of a `file://` URL's remainder (`/p`, `localhost/p`), `%XX` decoded.
pub fn file_url_path(rest: &str) -> Option<PathBuf> {
    let path = match rest.strip_prefix("localhost") {
        Some(p) if p.starts_with('/') => p,
        _ if rest.starts_with('/') => rest,
        _ => return None,
    };
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as OsStrExt>::from_bytes(&out),
    )))
}

/// GET over HTTP(S): the body of a 2xx answer; an error answer as Nix words it.
fn http_get(url: &str) -> Result<Box<dyn Read>, AttemptError> {
    use ureq::tls::TlsConfig;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(300)))
        // Nix's `verifyTLS = false` (module doc): the output hash is the check.
        .tls_config(TlsConfig::builder().disable_verification(true).build())
        .build()
        .into();
    let curl = |failure, text: &str, code: u32| AttemptError {
        failure,
        message: format!("unable to download '{url}': {text} ({code})"),
    };
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::HostNotFound => curl(Failure::Transient, "Couldn't resolve host name", 6),
        ureq::Error::ConnectionFailed => curl(Failure::Transient, "Couldn't connect to server", 7),
        ureq::Error::Io(ref io) if io.kind() == io::ErrorKind::ConnectionRefused => {
            curl(Failure::Transient, "Couldn't connect to server", 7)
        }
        ureq::Error::Timeout(_) => curl(Failure::Transient, "Timeout was reached", 28),
        ureq::Error::TooManyRedirects => {
            curl(Failure::Misc, "Number of redirects hit maximum amount", 47)
        }
        ureq::Error::BadUri(_) => curl(
            Failure::Misc,
            "URL using bad/illegal format or missing URL",
            3,
        ),
        // curl's CURLE_SSL_CONNECT_ERROR, transient for Nix; with rustls's reason.
        ureq::Error::Rustls(ref tls) => AttemptError {
            failure: Failure::Transient,
            message: format!("unable to download '{url}': SSL connect error (35): {tls}"),
        },
        other => AttemptError {
            failure: Failure::Transient,
            message: format!("unable to download '{url}': {other}"),
        },
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(Box::new(resp.into_body().into_reader()));
    }
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("");
    let mut body = Vec::new();
    let _ = resp
        .into_body()
        .into_reader()
        .take(1 << 20)
        .read_to_end(&mut body);
    Err(AttemptError {
        failure: classify_status(code),
        message: http_error_message(url, code, reason, (!body.is_empty()).then_some(&body[..])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<PathBuf> {
        file_url_path(s)
    }

    #[test]
    fn file_urls() {
        assert_eq!(p("/tmp/a%20b"), Some(PathBuf::from("/tmp/a b")));
        assert_eq!(p("localhost/x"), Some(PathBuf::from("/x")));
        assert_eq!(p("host/x"), None);
        assert_eq!(p("/x?y"), Some(PathBuf::from("/x")));
    }

    #[test]
    fn statuses_and_messages_as_nix() {
        assert_eq!(classify_status(404), Failure::NotFound);
        assert_eq!(classify_status(403), Failure::Forbidden);
        assert_eq!(classify_status(418), Failure::Misc);
        assert_eq!(classify_status(429), Failure::Transient);
        assert_eq!(classify_status(500), Failure::Transient);
        assert_eq!(classify_status(501), Failure::Misc);
        assert_eq!(
            http_error_message("http://h/x", 404, "Not Found", Some(b"gone\n")),
            "unable to download 'http://h/x': HTTP error 404 ('Not Found')\n\nresponse body:\n\ngone"
        );
        assert_eq!(
            http_error_message("http://h/x", 500, "Internal Server Error", None),
            "unable to download 'http://h/x': HTTP error 500 ('Internal Server Error')"
        );
        let long = vec![b'a'; 2000];
        assert!(!http_error_message("u", 404, "Not Found", Some(&long)).contains("response body"));
    }

    #[test]
    fn backoff_as_nix() {
        assert_eq!(retry_delay_ms(1, 0.0), 250);
        assert_eq!(retry_delay_ms(2, 0.0), 500);
        assert_eq!(retry_delay_ms(4, 0.0), 2000);
        assert!(retry_delay_ms(1, 0.999) <= 354);
    }
}
