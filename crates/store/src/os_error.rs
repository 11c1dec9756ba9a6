//! The system's words for an I/O error, as Nix prints them (`strerror`), without
//! Rust's ` (os error N)`.

use std::io;

/// The system's text for an I/O error, without Rust's `(os error N)`, as Nix prints it.
pub fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}
