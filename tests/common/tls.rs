//! TLS for the end-to-end tests: a throw-away CA and server certificate made by
//! `openssl`, and `openssl s_server -WWW` as a real HTTPS server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{command, is_ci};

/// A throw-away CA made by openssl in `dir` and, if `server`, a certificate for
/// 127.0.0.1 signed by it: (CA certificate, server certificate, server key).
pub fn tls_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let f = |s: &str| dir.join(format!("{name}-{s}"));
    let openssl = |args: &[&str]| {
        let out = command("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca, ca_key, cert, key, csr, ext) = (
        f("ca.pem"),
        f("ca.key"),
        f("cert.pem"),
        f("key.pem"),
        f("req.csr"),
        f("ext.cnf"),
    );
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let (ca_s, ca_key_s) = (s(&ca), s(&ca_key));
    let subj = format!("/CN=firn test CA {name}");
    args.extend([
        "-keyout", &ca_key_s, "-out", &ca_s, "-days", "2", "-subj", &subj,
    ]);
    openssl(&args);
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let (key_s, csr_s, cert_s, ext_s) = (s(&key), s(&csr), s(&cert), s(&ext));
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key_s, "-out", &csr_s, "-subj", "/CN=127.0.0.1"]);
    openssl(&args);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr_s,
        "-CA",
        &ca_s,
        "-CAkey",
        &ca_key_s,
        "-CAcreateserial",
        "-out",
        &cert_s,
        "-days",
        "2",
        "-extfile",
        &ext_s,
    ]);
    (ca, cert, key)
}

/// A process killed when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `openssl s_server -WWW` serving the files of `dir` over TLS on a free port of
/// 127.0.0.1 (it answers 200 even for a missing file, so only caches whose every
/// requested file exists can be served): the server and its `https://` URL.
pub fn https_server(dir: &Path, cert: &Path, key: &Path) -> (Killed, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = command("openssl")
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Killed(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (server, format!("https://127.0.0.1:{port}"))
}

pub fn have_openssl() -> bool {
    let present = Command::new("openssl").arg("version").output().is_ok();
    if !present {
        assert!(!is_ci(), "CI must install openssl (see .ci/run)");
        eprintln!("SKIPPED: openssl is not installed");
    }
    present
}
