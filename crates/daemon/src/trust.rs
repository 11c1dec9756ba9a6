//! Who is on the other end of a connection, and what they may do: the peer's
//! credentials (`SO_PEERCRED`) matched against `allowed-users` and `trusted-users` as
//! Nix 2.8's `matchUser` does (a name, `@group` for the members of a group and those
//! whose primary group it is, `*` for everyone).

use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};

/// The process on the other end of a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// The user's name (the uid as text if it has none).
    pub user: String,
    /// The name of the primary group (the gid as text if it has none).
    pub group: String,
}

impl Peer {
    /// The credentials of the peer of `socket`.
    pub fn of(socket: &impl AsFd) -> std::io::Result<Self> {
        let cred = getsockopt(socket, PeerCredentials).map_err(std::io::Error::from)?;
        Ok(Self::from_ids(cred.uid(), cred.gid(), cred.pid()))
    }

    /// A peer with these ids, names looked up.
    pub fn from_ids(uid: u32, gid: u32, pid: i32) -> Self {
        let user = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name);
        let group = Group::from_gid(Gid::from_raw(gid))
            .ok()
            .flatten()
            .map_or_else(|| gid.to_string(), |g| g.name);
        Self {
            uid,
            gid,
            pid,
            user,
            group,
        }
    }
}

/// Nix's `matchUser(user, group, users)`.
pub fn match_user(user: &str, group: &str, users: &[String]) -> bool {
    if users.iter().any(|u| u == "*" || u == user) {
        return true;
    }
    users.iter().filter_map(|u| u.strip_prefix('@')).any(|g| {
        g == group
            || Group::from_name(g)
                .ok()
                .flatten()
                .is_some_and(|gr| gr.mem.iter().any(|m| m == user))
    })
}

/// Whether a peer may connect, and whether it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Trusted,
    Untrusted,
    Refused,
}

/// Decide as Nix 2.8's daemon does: trusted users are always allowed; others must be
/// allowed users and not members of the build users group's primary group.
pub fn access(peer: &Peer, settings: &firn_build::Settings) -> Access {
    if match_user(&peer.user, &peer.group, &settings.trusted_users.0) {
        return Access::Trusted;
    }
    let builders = &settings.build_users_group;
    if !match_user(&peer.user, &peer.group, &settings.allowed_users.0)
        || (!builders.is_empty() && peer.group == *builders)
    {
        return Access::Refused;
    }
    Access::Untrusted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn names_groups_and_stars() {
        assert!(match_user("alice", "users", &v(&["*"])));
        assert!(match_user("alice", "users", &v(&["bob", "alice"])));
        assert!(!match_user("alice", "users", &v(&["root"])));
        assert!(match_user("alice", "users", &v(&["@users"])));
        assert!(!match_user(
            "alice",
            "users",
            &v(&["@wheel-that-is-not-here"])
        ));
        let mut s = firn_build::Settings::default();
        let root = Peer::from_ids(0, 0, 1);
        assert_eq!(root.user, "root");
        assert_eq!(access(&root, &s), Access::Trusted);
        let nobody = Peer::from_ids(65534, 65534, 1);
        assert_eq!(access(&nobody, &s), Access::Untrusted);
        s.allowed_users = firn_build::settings::Strings(v(&["root"]));
        assert_eq!(access(&nobody, &s), Access::Refused);
        s.trusted_users = firn_build::settings::Strings(v(&[&nobody.user]));
        assert_eq!(access(&nobody, &s), Access::Trusted);
    }
}
