//! HTTP and HTTPS GETs for binary caches, with `ureq` (TLS by rustls).
//!
//! One [`Http`] client is made per cache and shared by its threads, so connections are
//! kept alive between requests. For `https://` the server's certificate must chain to
//! a certificate of the CA bundle, as Nix's `ssl-cert-file` setting names it (default:
//! `$NIX_SSL_CERT_FILE`, else `$SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`
//! if it exists, see [`default_ssl_cert_file`]); with no bundle at all the Mozilla roots
//! built into firn (webpki-roots) are used. A bundle that cannot be read or holds no
//! certificate is an error when an `https://` cache is opened, not later.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::CacheError;

/// How HTTP(S) binary caches are reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// The CA bundle (PEM) that `https://` servers' certificates must chain to;
    /// `None`: the built-in roots.
    pub ca_file: Option<PathBuf>,
}

impl HttpOptions {
    /// Options from the `ssl-cert-file` setting (empty: none).
    pub fn with_ca_file(ssl_cert_file: &str) -> Self {
        Self {
            ca_file: (!ssl_cert_file.is_empty()).then(|| PathBuf::from(ssl_cert_file)),
        }
    }
}

/// Nix 2.8's default for `ssl-cert-file` (`Settings::Settings`): `$NIX_SSL_CERT_FILE`,
/// else `$SSL_CERT_FILE`, else the first of Debian's and Nix's bundles that exists.
pub fn default_ssl_cert_file() -> String {
    for var in ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"] {
        if let Some(v) = std::env::var_os(var) {
            // Nix takes the first variable that is set, even to an empty value, and
            // looks for the default files only if that value is empty.
            let v = v.to_string_lossy().into_owned();
            if !v.is_empty() {
                return v;
            }
            break;
        }
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
    ]
    .into_iter()
    .find(|f| Path::new(f).exists())
    .unwrap_or("")
    .to_owned()
}

/// A client for one cache (cheap to clone: the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Http {
    agent: ureq::Agent,
    /// What certificates are checked against, for messages.
    roots: String,
}

/// A response body.
pub type Body = Box<dyn Read + Send>;

impl Http {
    /// A client for `base` (`http://…` or `https://…`): for https, with the CA bundle
    /// of `opts` read now.
    pub fn new(base: &str, opts: &HttpOptions) -> Result<Self, CacheError> {
        let mut config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(300)))
            .max_idle_connections_per_host(64);
        let mut roots = String::new();
        if base.starts_with("https://") {
            use ureq::tls::{RootCerts, TlsConfig};
            let certs = match &opts.ca_file {
                Some(f) => {
                    roots = format!("the CA bundle '{}' of 'ssl-cert-file'", f.display());
                    RootCerts::new_with_certs(&read_bundle(f)?)
                }
                None => {
                    roots = "the built-in roots ('ssl-cert-file' is empty)".to_owned();
                    RootCerts::WebPki
                }
            };
            config = config.tls_config(TlsConfig::builder().root_certs(certs).build());
        }
        Ok(Self {
            agent: config.build().into(),
            roots,
        })
    }

    /// GET `url`: its body, `None` on 404 or 403 (as Nix: S3 says 403 for a missing
    /// file), an error otherwise.
    pub fn get(&self, url: &str) -> Result<Option<Body>, CacheError> {
        match self.agent.get(url).call() {
            Ok(resp) => Ok(Some(Box::new(resp.into_body().into_reader()))),
            Err(ureq::Error::StatusCode(404 | 403)) => Ok(None),
            Err(e) => Err(CacheError::Http {
                url: url.to_owned(),
                msg: message(&e, &self.roots),
            }),
        }
    }
}

/// One line for a failed request; a certificate refused says which CA bundle it was
/// checked against.
fn message(e: &ureq::Error, roots: &str) -> String {
    match e {
        ureq::Error::Rustls(tls) => format!("TLS: {tls} (checked against {roots})"),
        // rustls's refusals during the handshake come as I/O errors.
        ureq::Error::Io(io) if !roots.is_empty() && io.to_string().contains("certificate") => {
            format!("TLS: {io} (checked against {roots})")
        }
        other => other.to_string(),
    }
}

/// The certificates of the PEM bundle `f`.
fn read_bundle(f: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, CacheError> {
    let bad = |msg: String| CacheError::CaBundle {
        file: f.to_path_buf(),
        msg,
    };
    let pem = std::fs::read(f).map_err(|e| bad(firn_store::error::strerror(&e)))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    if certs.is_empty() {
        return Err(bad("it holds no PEM certificate".into()));
    }
    Ok(certs)
}
