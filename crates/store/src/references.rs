//! Reference scanning, as Nix 2.8 does it (`libstore/references.cc`).
//!
//! The candidates are store paths; a candidate is a reference when its 32-character
//! hash part occurs anywhere in the NAR serialisation of the scanned path, as a plain
//! byte substring: in file contents, entry names and symlink targets alike, with no
//! regard for file boundaries. The name part of a path is not searched.
//!
//! [`RefScanner`] is a streaming [`Write`] sink: feed it the NAR in chunks of any size
//! (it keeps the last 31 bytes of the stream so that an occurrence straddling two
//! chunks is found). The search slides a 32-byte window and checks it from its end:
//! a byte outside the nixbase32 alphabet at window position `j` means no window
//! containing it can match, so the window jumps past it. Only windows made entirely of
//! nixbase32 characters are looked up in a hash set; a found candidate is removed from
//! the set, and the scanner stops looking at all once every candidate was found.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::io::{self, Write};
use std::path::Path;

use firn_derivation::{Hash, StorePath};

use crate::nar::{HashSink, NarError};

/// Length of the hash part of a store path.
pub const HASH_PART_LEN: usize = 32;

/// A window is `HASH_PART_LEN` bytes; this much of the stream is kept between chunks.
const TAIL_LEN: usize = HASH_PART_LEN - 1;

const fn base32_table() -> [bool; 256] {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut table = [false; 256];
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = true;
        i += 1;
    }
    table
}

/// `IS_BASE32[c]`: `c` is in the nixbase32 alphabet.
static IS_BASE32: [bool; 256] = base32_table();

/// A cheap hash for 32-byte windows of nixbase32 text (the keys are store path hashes,
/// uniformly distributed; SipHash would dominate the cost of scanning base32 runs).
#[derive(Default)]
struct WindowHasher(u64);

impl std::hash::Hasher for WindowHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(b))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type WindowMap = HashMap<[u8; HASH_PART_LEN], Vec<usize>, BuildHasherDefault<WindowHasher>>;

/// Streaming scanner for the hash parts of a set of candidate store paths.
pub struct RefScanner {
    /// Sorted, unique.
    candidates: Vec<StorePath>,
    /// Hash parts not found yet → indices into `candidates`.
    pending: WindowMap,
    found: Vec<bool>,
    /// The last `tail_len` (at most `TAIL_LEN`) bytes fed so far.
    tail: [u8; TAIL_LEN],
    tail_len: usize,
}

impl fmt::Debug for RefScanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefScanner")
            .field("candidates", &self.candidates.len())
            .field("found", &self.found().collect::<Vec<_>>())
            .finish()
    }
}

impl RefScanner {
    pub fn new<'a>(candidates: impl IntoIterator<Item = &'a StorePath>) -> Self {
        let candidates: Vec<StorePath> = candidates
            .into_iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut pending = WindowMap::default();
        for (i, path) in candidates.iter().enumerate() {
            if let Ok(key) = <[u8; HASH_PART_LEN]>::try_from(path.hash_part().as_bytes()) {
                pending.entry(key).or_default().push(i);
            }
        }
        Self {
            found: vec![false; candidates.len()],
            candidates,
            pending,
            tail: [0; TAIL_LEN],
            tail_len: 0,
        }
    }

    /// Scan the next `chunk` of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.pending.is_empty() || chunk.is_empty() {
            return;
        }
        if self.tail_len > 0 {
            // Windows straddling the previous chunks and this one.
            let take = chunk.len().min(TAIL_LEN);
            let mut joint = [0u8; 2 * TAIL_LEN];
            joint[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joint[self.tail_len..self.tail_len + take].copy_from_slice(&chunk[..take]);
            self.search(&joint[..self.tail_len + take]);
        }
        self.search(chunk);
        if chunk.len() >= TAIL_LEN {
            self.tail.copy_from_slice(&chunk[chunk.len() - TAIL_LEN..]);
            self.tail_len = TAIL_LEN;
        } else {
            let keep = self.tail_len.min(TAIL_LEN - chunk.len());
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + chunk.len()].copy_from_slice(chunk);
            self.tail_len = keep + chunk.len();
        }
    }

    fn search(&mut self, s: &[u8]) {
        let n = s.len();
        let mut i = 0;
        while i + HASH_PART_LEN <= n {
            let window = &s[i..i + HASH_PART_LEN];
            if let Some(j) = window.iter().rposition(|&c| !IS_BASE32[c as usize]) {
                i += j + 1;
                continue;
            }
            // s[i..i + 32] is all base32: look up every window of this run.
            loop {
                self.lookup(&s[i..i + HASH_PART_LEN]);
                if self.pending.is_empty() {
                    return;
                }
                if i + HASH_PART_LEN < n && IS_BASE32[s[i + HASH_PART_LEN] as usize] {
                    i += 1;
                } else {
                    // s[i + 32] (if any) is not base32: no window containing it matches.
                    i += HASH_PART_LEN + 1;
                    break;
                }
            }
        }
    }

    fn lookup(&mut self, window: &[u8]) {
        if let Ok(key) = <&[u8; HASH_PART_LEN]>::try_from(window) {
            if let Some(indices) = self.pending.remove(key) {
                for i in indices {
                    self.found[i] = true;
                }
            }
        }
    }

    /// The candidates found so far, in order.
    pub fn found(&self) -> impl Iterator<Item = &StorePath> {
        self.candidates
            .iter()
            .zip(&self.found)
            .filter(|(_, &found)| found)
            .map(|(path, _)| path)
    }

    /// The candidates found.
    pub fn into_found(self) -> BTreeSet<StorePath> {
        self.candidates
            .into_iter()
            .zip(self.found)
            .filter(|(_, found)| *found)
            .map(|(path, _)| path)
            .collect()
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`scan_path`] computes in one pass over the NAR of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathScan {
    /// The candidates whose hash part occurs in the NAR.
    pub references: BTreeSet<StorePath>,
    /// sha256 of the NAR.
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// Dump `path` once, hashing the NAR and scanning it for the hash parts of `candidates`
/// (Nix's `scanForReferences`). On two cores for a large path: the reading thread
/// scans, a helper thread hashes ([`crate::nar::dump_path_split`]), so registering a
/// large output is bounded by SHA-256 alone, not by SHA-256 plus the scan.
pub fn scan_path<'a>(
    path: &Path,
    candidates: impl IntoIterator<Item = &'a StorePath>,
) -> Result<PathScan, NarError> {
    let mut scanner = RefScanner::new(candidates);
    let mut sink = HashSink::new();
    crate::nar::dump_path_split(path, &mut scanner, &mut sink)?;
    let (nar_hash, nar_size) = sink.finish();
    Ok(PathScan {
        references: scanner.into_found(),
        nar_hash,
        nar_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0c7dqn2sj3mkwfsmvvmzswbrxrjn28vl";
    const B: &str = "ppbhpyhsxzg8mj3q4jhn6fb5jw6xlmgd";
    const C: &str = "h6wkc51crvbp90yp7wbhib7ys4l5fq2f";

    fn path(hash: &str, name: &str) -> StorePath {
        StorePath::from_base_name(format!("{hash}-{name}").as_bytes()).expect("valid path")
    }

    fn scan_chunks(candidates: &[StorePath], chunks: &[&[u8]]) -> BTreeSet<StorePath> {
        let mut scanner = RefScanner::new(candidates);
        for c in chunks {
            scanner.feed(c);
        }
        scanner.into_found()
    }

    /// Reference implementation: every candidate whose hash part is a substring.
    fn naive(candidates: &[StorePath], data: &[u8]) -> BTreeSet<StorePath> {
        candidates
            .iter()
            .filter(|p| {
                data.windows(HASH_PART_LEN)
                    .any(|w| w == p.hash_part().as_bytes())
            })
            .cloned()
            .collect()
    }

    #[test]
    fn table_matches_firn_derivation() {
        for c in 0..=255u8 {
            assert_eq!(
                IS_BASE32[c as usize],
                firn_derivation::nixbase32::is_valid_char(c),
                "{c}"
            );
        }
    }

    #[test]
    fn finds_in_every_split() {
        let cands = [path(A, "a"), path(B, "b"), path(C, "c")];
        let data = format!("xx/nix/store/{A}-a\0\x01{B}zz{C}").into_bytes();
        let want: BTreeSet<_> = cands.iter().cloned().collect();
        for i in 0..=data.len() {
            assert_eq!(
                scan_chunks(&cands, &[&data[..i], &data[i..]]),
                want,
                "split {i}"
            );
            for j in i..=data.len() {
                assert_eq!(
                    scan_chunks(&cands, &[&data[..i], &data[i..j], &data[j..]]),
                    want,
                    "split {i} {j}"
                );
            }
        }
        for size in 1..=data.len() {
            let chunks: Vec<&[u8]> = data.chunks(size).collect();
            assert_eq!(scan_chunks(&cands, &chunks), want, "chunk size {size}");
        }
    }

    #[test]
    fn hash_inside_longer_base32_run() {
        let cands = [path(A, "a")];
        for pre in 0..40 {
            for post in 0..40 {
                let data = format!("{}{A}{}", "z".repeat(pre), "0".repeat(post));
                let found = scan_chunks(&cands, &[data.as_bytes()]);
                assert_eq!(found.len(), 1, "{data}");
            }
        }
    }

    #[test]
    fn ignores_non_candidates_and_near_misses() {
        let cands = [path(A, "a"), path(B, "b")];
        let mut almost = A.to_string().into_bytes();
        almost[31] = b'e'; // not base32
        let mut other = B.to_string().into_bytes();
        other[0] = b'1';
        let mut data = Vec::new();
        data.extend_from_slice(&almost);
        data.extend_from_slice(b" ");
        data.extend_from_slice(&other);
        data.extend_from_slice(format!(" {C} {}", &A[..31]).as_bytes());
        assert!(scan_chunks(&cands, &[&data]).is_empty());
        // Upper case is not the same hash.
        assert!(scan_chunks(&cands, &[A.to_uppercase().as_bytes()]).is_empty());
    }

    #[test]
    fn agrees_with_naive_search_on_pseudo_random_data() {
        let cands = [path(A, "a"), path(B, "b"), path(C, "c")];
        let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut seed = 0x1234_5678_9abc_def0_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let len = (next() % 400) as usize;
            let mut data: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 16 == 0 {
                        b'e'
                    } else {
                        alphabet[(r >> 8) as usize % 32]
                    }
                })
                .collect();
            if round % 2 == 0 && len > 40 {
                let at = (next() as usize) % (len - 32);
                let which = [A, B, C][(next() % 3) as usize];
                data[at..at + 32].copy_from_slice(which.as_bytes());
            }
            let want = naive(&cands, &data);
            let chunk = 1 + (next() % 50) as usize;
            let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
            assert_eq!(scan_chunks(&cands, &chunks), want, "round {round}");
        }
    }

    #[test]
    fn same_hash_part_different_names() {
        let cands = [path(A, "x"), path(A, "y"), path(B, "z")];
        let found = scan_chunks(&cands, &[A.as_bytes()]);
        assert_eq!(found, cands[..2].iter().cloned().collect());
    }

    #[test]
    fn write_impl_and_found_iterator() {
        let cands = [path(A, "a"), path(B, "b")];
        let mut scanner = RefScanner::new(&cands);
        scanner.write_all(B.as_bytes()).expect("write");
        assert_eq!(scanner.found().collect::<Vec<_>>(), [&cands[1]]);
        assert!(format!("{scanner:?}").contains("ppbhpyhs"));
    }

    #[test]
    fn no_candidates() {
        let mut scanner = RefScanner::new(&[]);
        scanner.feed(A.as_bytes());
        assert!(scanner.into_found().is_empty());
    }
}
