//! `nix-cache-info`: `Key: value` lines, values trimmed; lines without a colon and
//! unknown keys are ignored, as in Nix. firn reads `StoreDir`, `WantMassQuery` and
//! `Priority`, and writes all three when it creates a cache.

use crate::error::CacheError;

/// At most this many bytes are read (a real one has three short lines).
pub const MAX_CACHE_INFO_SIZE: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: Option<String>,
    pub want_mass_query: bool,
    pub priority: Option<u64>,
}

impl CacheInfo {
    /// What firn writes into a cache it creates: the store dir, mass queries welcome,
    /// and the priority nix-serve and harmonia advertise (30: before cache.nixos.org's 40).
    pub fn new(store_dir: &str) -> Self {
        Self {
            store_dir: Some(store_dir.to_owned()),
            want_mass_query: true,
            priority: Some(30),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.store_dir {
            s.push_str(&format!("StoreDir: {d}\n"));
        }
        if self.want_mass_query {
            s.push_str("WantMassQuery: 1\n");
        }
        if let Some(p) = self.priority {
            s.push_str(&format!("Priority: {p}\n"));
        }
        s
    }

    pub fn parse(file: &str, text: &[u8]) -> Result<Self, CacheError> {
        let bad = |msg: String| CacheError::BadCacheInfo {
            file: file.to_owned(),
            msg,
        };
        if text.len() as u64 > MAX_CACHE_INFO_SIZE {
            return Err(bad(format!(
                "it is larger than {MAX_CACHE_INFO_SIZE} bytes"
            )));
        }
        let text = std::str::from_utf8(text).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        let mut info = CacheInfo {
            store_dir: None,
            want_mass_query: false,
            priority: None,
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "StoreDir" => info.store_dir = Some(v.to_owned()),
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => {
                    info.priority = Some(
                        v.parse()
                            .map_err(|_| bad(format!("'Priority' is not a number: '{v}'")))?,
                    )
                }
                _ => {}
            }
        }
        Ok(info)
    }
}
