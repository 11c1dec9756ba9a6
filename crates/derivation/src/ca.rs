//! Content-addressing methods of fixed outputs.

use std::fmt;

use crate::hash::Hash;

/// How content is hashed: the file's bytes (`flat`) or its NAR serialisation (`r:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileIngestionMethod {
    Flat,
    Recursive,
}

impl FileIngestionMethod {
    /// `""` or `"r:"`, as in a `.drv`'s hashAlgo field (`makeFileIngestionPrefix`).
    pub const fn prefix(self) -> &'static str {
        match self {
            Self::Flat => "",
            Self::Recursive => "r:",
        }
    }
}

/// The declared hash of a fixed-output derivation's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FixedOutputHash {
    pub method: FileIngestionMethod,
    pub hash: Hash,
}

impl FixedOutputHash {
    /// `[r:]algo`, the `.drv` hashAlgo field (`printMethodAlgo`).
    pub fn method_algo(&self) -> MethodAlgo {
        MethodAlgo(*self)
    }
}

/// Display adaptor for `[r:]algo`.
#[derive(Debug, Clone, Copy)]
pub struct MethodAlgo(FixedOutputHash);

impl fmt::Display for MethodAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0.method.prefix(), self.0.hash.algo())
    }
}
