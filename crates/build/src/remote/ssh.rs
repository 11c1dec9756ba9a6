//! An `ssh://` machine: its store URI's settings (Nix 2.8's `LegacySSHStoreConfig`) and
//! the command line of the system's `ssh` that runs the remote program (ssh.cc).
//!
//! ```text
//! uri      = "ssh://" [user "@"] host ["?" param ("&" param)*]
//! param    = remote-program=PROG (default nix-store) | remote-store=STORE
//!          | ssh-key=FILE | base64-ssh-public-host-key=B64 | compress=true|false
//!          | max-connections=N | log-fd=N   (accepted, not used)
//! command  = PROG " --serve --write" [" --store " shell-quoted(STORE)]
//! argv     = ssh HOST -x -a $NIX_SSHOPTS… [-i KEY] [-oUserKnownHostsFile=FILE] [-C]
//!                [-oControlMaster=auto -oControlPath=DIR/%C -oControlPersist=60] COMMAND
//!            (host exactly "localhost": bash -c COMMAND, no ssh, as Nix)
//! ```
//!
//! Unlike Nix 2.8 (one ssh connection per build), firn shares one connection per
//! machine among its builds when given a control directory: the first session becomes
//! the master (OpenSSH's `ControlMaster=auto`), the others are sessions over it, so only
//! the first build pays for the key exchange and authentication. Options in
//! `NIX_SSHOPTS` come first and so win (`-oControlMaster=no` turns it off).
//!
//! The machine's own fields (ssh key, host key) win over the URI's parameters, as in
//! Nix (`Machine::openStore` passes them as store parameters, which the URI's do not
//! override).

use std::collections::BTreeMap;
use std::path::Path;

use thiserror::Error;

use super::machines::Machine;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SshUriError {
    #[error("firn builds remotely only on 'ssh://' machines (Nix's serve protocol), not '{0}'")]
    NotSsh(String),
    #[error("invalid SSH host name '{0}'")]
    BadHost(String),
    #[error("store URI '{uri}': bad parameter '{param}'")]
    BadParam { uri: String, param: String },
}

/// What ssh connects to and what it runs there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshStore {
    /// `[user@]host`.
    pub host: String,
    pub remote_program: String,
    /// `--store` for the remote program ("" = its default store).
    pub remote_store: String,
    pub ssh_key: Option<String>,
    /// base64 of the host's public key line.
    pub host_key: Option<String>,
    pub compress: bool,
}

impl SshStore {
    /// The ssh settings of `machine`.
    pub fn of_machine(machine: &Machine) -> Result<Self, SshUriError> {
        let mut s = Self::parse(&machine.store_uri)?;
        if let Some(k) = &machine.ssh_key {
            s.ssh_key = Some(k.clone());
        }
        if let Some(k) = &machine.public_host_key {
            s.host_key = Some(k.clone());
        }
        Ok(s)
    }

    pub fn parse(uri: &str) -> Result<Self, SshUriError> {
        let rest = uri
            .strip_prefix("ssh://")
            .ok_or_else(|| SshUriError::NotSsh(uri.to_owned()))?;
        let (host, query) = match rest.split_once('?') {
            Some((h, q)) => (h, q),
            None => (rest, ""),
        };
        if host.is_empty() || host.starts_with('-') {
            return Err(SshUriError::BadHost(host.to_owned()));
        }
        let mut params = BTreeMap::new();
        for p in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let bad = || SshUriError::BadParam {
                uri: uri.to_owned(),
                param: p.to_owned(),
            };
            params.insert(
                percent_decode(k).ok_or_else(bad)?,
                percent_decode(v).ok_or_else(bad)?,
            );
        }
        let take = |k: &str| params.get(k).filter(|v| !v.is_empty()).cloned();
        Ok(Self {
            host: percent_decode(host).ok_or_else(|| SshUriError::BadHost(host.to_owned()))?,
            remote_program: take("remote-program").unwrap_or_else(|| "nix-store".to_owned()),
            remote_store: take("remote-store").unwrap_or_default(),
            ssh_key: take("ssh-key"),
            host_key: take("base64-ssh-public-host-key"),
            compress: params.get("compress").is_some_and(|v| v == "true"),
        })
    }

    /// What runs on the machine: Nix 2.8 pastes the program unquoted (so it may carry
    /// arguments) and quotes the store.
    pub fn remote_command(&self) -> String {
        let mut c = format!("{} --serve --write", self.remote_program);
        if !self.remote_store.is_empty() {
            c.push_str(" --store ");
            c.push_str(&shell_quote(&self.remote_store));
        }
        c
    }

    /// Whether Nix would skip ssh: the host is exactly `localhost`.
    pub fn is_fake(&self) -> bool {
        self.host == "localhost"
    }

    /// The host without its user, for a known-hosts line.
    pub fn host_name(&self) -> &str {
        self.host.rsplit_once('@').map_or(&self.host, |(_, h)| h)
    }

    /// The program and arguments that run [`Self::remote_command`] on the machine:
    /// `sshopts` is `NIX_SSHOPTS` (split on whitespace), `known_hosts` the file holding
    /// the host key line when there is one.
    pub fn argv(
        &self,
        sshopts: &str,
        known_hosts: Option<&Path>,
        control: Option<&Path>,
    ) -> Vec<String> {
        let command = self.remote_command();
        if self.is_fake() {
            return vec!["bash".into(), "-c".into(), command];
        }
        let mut v: Vec<String> = vec!["ssh".into(), self.host.clone(), "-x".into(), "-a".into()];
        v.extend(sshopts.split_whitespace().map(str::to_owned));
        if let Some(k) = &self.ssh_key {
            v.push("-i".into());
            v.push(k.clone());
        }
        if let Some(f) = known_hosts {
            v.push(format!("-oUserKnownHostsFile={}", f.display()));
        }
        if self.compress {
            v.push("-C".into());
        }
        if let Some(dir) = control {
            v.extend(control_options(dir));
        }
        v.push(command);
        v
    }

    /// `ssh -O exit`: close the shared connection to this machine, if there is one.
    pub fn exit_argv(&self, sshopts: &str, control: &Path) -> Vec<String> {
        let mut v: Vec<String> = vec!["ssh".into(), self.host.clone()];
        v.extend(sshopts.split_whitespace().map(str::to_owned));
        v.extend(control_options(control));
        v.extend(["-O".into(), "exit".into()]);
        v
    }

    /// The known-hosts line for the host key (`"<host> <decoded key>\n"`), if any.
    pub fn known_hosts_line(&self) -> Option<String> {
        use base64::Engine;
        let key = self.host_key.as_ref()?;
        let decoded = base64::engine::general_purpose::STANDARD.decode(key).ok()?;
        let text = String::from_utf8_lossy(&decoded);
        Some(format!("{} {}\n", self.host_name(), text.trim_end()))
    }
}

fn control_options(dir: &Path) -> [String; 3] {
    [
        "-oControlMaster=auto".into(),
        format!("-oControlPath={}/%C", dir.display()),
        "-oControlPersist=60".into(),
    ]
}

/// `'…'` with each `'` as `'\''` (Nix's `shellEscape`).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_command_line_is_nix_s() {
        let s = SshStore::parse(
            "ssh://root@127.0.0.1?remote-program=/opt/firn&remote-store=/tmp/it%27s%20here",
        )
        .unwrap();
        assert_eq!(s.host, "root@127.0.0.1");
        assert_eq!(s.host_name(), "127.0.0.1");
        assert_eq!(
            s.remote_command(),
            r"/opt/firn --serve --write --store '/tmp/it'\''s here'"
        );
        assert_eq!(
            s.argv("-p 2222  -o StrictHostKeyChecking=no", None, None),
            [
                "ssh",
                "root@127.0.0.1",
                "-x",
                "-a",
                "-p",
                "2222",
                "-o",
                "StrictHostKeyChecking=no",
                "/opt/firn --serve --write --store '/tmp/it'\\''s here'"
            ]
        );
        let d = SshStore::parse("ssh://builder").unwrap();
        assert_eq!(d.remote_command(), "nix-store --serve --write");
        // localhost exactly: no ssh at all.
        let l = SshStore::parse("ssh://localhost?remote-store=/r").unwrap();
        assert_eq!(
            l.argv("-p 1", None, Some(Path::new("/c"))),
            ["bash", "-c", "nix-store --serve --write --store '/r'"]
        );
        assert!(!SshStore::parse("ssh://root@localhost").unwrap().is_fake());
    }

    #[test]
    fn the_machine_s_keys_win_and_go_on_the_command_line() {
        let m = &super::super::machines::read_builders(
            "ssh://b?ssh-key=/uri/key&compress=true x86_64-linux /field/key 1 1 - - c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUE=",
            "x86_64-linux",
        )
        .unwrap()[0];
        let s = SshStore::of_machine(m).unwrap();
        assert_eq!(s.ssh_key.as_deref(), Some("/field/key"));
        assert_eq!(
            s.known_hosts_line().unwrap(),
            "b ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n"
        );
        let argv = s.argv("", Some(Path::new("/tmp/kh")), Some(Path::new("/tmp/c")));
        assert_eq!(
            argv,
            [
                "ssh",
                "b",
                "-x",
                "-a",
                "-i",
                "/field/key",
                "-oUserKnownHostsFile=/tmp/kh",
                "-C",
                "-oControlMaster=auto",
                "-oControlPath=/tmp/c/%C",
                "-oControlPersist=60",
                "nix-store --serve --write"
            ]
        );
        assert_eq!(
            s.exit_argv("-p 22", Path::new("/tmp/c")),
            [
                "ssh",
                "b",
                "-p",
                "22",
                "-oControlMaster=auto",
                "-oControlPath=/tmp/c/%C",
                "-oControlPersist=60",
                "-O",
                "exit"
            ]
        );
    }

    #[test]
    fn other_stores_and_bad_hosts_are_refused() {
        for (uri, want) in [
            (
                "ssh-ng://b",
                "firn builds remotely only on 'ssh://' machines",
            ),
            (
                "/tmp/store",
                "firn builds remotely only on 'ssh://' machines",
            ),
            (
                "ssh://-oProxyCommand=x",
                "invalid SSH host name '-oProxyCommand=x'",
            ),
            ("ssh://", "invalid SSH host name ''"),
            (
                "ssh://b?remote-store=%zz",
                "bad parameter 'remote-store=%zz'",
            ),
        ] {
            let e = SshStore::parse(uri).unwrap_err().to_string();
            assert!(e.contains(want), "{uri}: {e}");
        }
    }
}
