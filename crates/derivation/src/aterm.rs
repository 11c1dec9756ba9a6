//! The `.drv` text format (an ATerm), read and written exactly as Nix 2.8 does.
//!
//! ```text
//! drv      = "Derive(" "[" outputs "]" "," "[" inputDrvs "]" "," "[" strings "]" ","
//!            system "," builder "," "[" strings "]" "," "[" envs "]" ")"
//! output   = "(" STRING "," STRING "," STRING "," STRING ")"   name, path, hashAlgo, hash
//! inputDrv = "(" STRING "," "[" strings "]" ")"                drv path, output names
//! env      = "(" STRING "," STRING ")"
//! STRING   = '"' { byte other than '"' and '\' | '\' byte } '"'
//! ```
//!
//! There is no whitespace. Writing escapes `"` `\` LF CR TAB as `\"` `\\` `\n` `\r` `\t`
//! and nothing else; reading maps `\n` `\r` `\t` back and `\x` to `x` for any other byte.
//!
//! Reading mirrors Nix 2.8's `parseDerivation`, oddities included, so that firn accepts
//! exactly what Nix accepts and reads it the same way:
//! - a list element may be preceded by a comma and elements need no comma between them
//!   (`[,"a""b"]` is `["a","b"]`), because Nix's `endOfList` only skips one `,`;
//! - bytes after the final `)` are ignored;
//! - a duplicate output keeps the first entry; duplicate input derivations and env keys
//!   keep the last; inputSrcs and output-name lists are sets (sorted, de-duplicated);
//! - paths are canonicalised (`/nix//store/x` is `/nix/store/x`);
//! - the path of a fixed output is only checked to start with `/`; the hash may be
//!   base16, nixbase32 or base64, and is printed back as base16;
//! - an output with an empty hashAlgo is input-addressed and its hash field is dropped.
//!
//! Where Nix 2.8 loops forever (an unterminated string), firn reports an error. Floating
//! content-addressed and impure outputs are read (Nix needs their experimental feature
//! even to read them; firn asks for it when building: `DerivationType::required_feature`).
//!
//! Writing mirrors `Derivation::unparse`, which does *not* escape output names, paths,
//! hash fields, input-derivation output names or the system: a system containing `"`
//! produces a `.drv` that neither Nix nor firn can read back. firn writes the same bytes
//! as Nix, since the `.drv`'s store path is the hash of those bytes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::ca::{FileIngestionMethod, FixedOutputHash};
use crate::derivation::{ByteStr, Derivation, DerivationError, DerivationOutput};
use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{StoreDir, StorePath, StorePathError};

/// What went wrong, without the position.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseErrorKind {
    #[error("expected '{0}'")]
    Expected(&'static str),
    #[error("unterminated string")]
    UnterminatedString,
    #[error("bad path '{0}' in derivation")]
    BadPath(String),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("fixed output '{0}' has a hash algorithm but an empty hash")]
    FloatingWithPath(String),
}

/// A parse error at a byte offset of the input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("at byte {pos}: {kind}")]
pub struct ParseError {
    /// Offset of the first byte of the offending token.
    pub pos: usize,
    pub kind: ParseErrorKind,
}

type Result<T, E = ParseError> = std::result::Result<T, E>;

struct Parser<'a, 's> {
    input: &'a [u8],
    pos: usize,
    store_dir: &'s StoreDir,
}

impl<'a> Parser<'a, '_> {
    fn err(&self, pos: usize, kind: impl Into<ParseErrorKind>) -> ParseError {
        ParseError {
            pos,
            kind: kind.into(),
        }
    }

    fn expect(&mut self, token: &'static str) -> Result<()> {
        if self.input[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            Ok(())
        } else {
            Err(self.err(self.pos, ParseErrorKind::Expected(token)))
        }
    }

    /// Nix's `endOfList`: skip one `,` (not the end), or consume `]` (the end).
    fn end_of_list(&mut self) -> bool {
        match self.input.get(self.pos) {
            Some(b',') => {
                self.pos += 1;
                false
            }
            Some(b']') => {
                self.pos += 1;
                true
            }
            _ => false,
        }
    }

    fn string(&mut self) -> Result<ByteStr<'a>> {
        let start = self.pos;
        self.expect("\"")?;
        let input = self.input;
        let body = self.pos;
        let Some(i) = find_quote_or_backslash(&input[body..]) else {
            return Err(self.err(start, ParseErrorKind::UnterminatedString));
        };
        if input[body + i] == b'"' {
            self.pos = body + i + 1;
            return Ok(Cow::Borrowed(&input[body..body + i]));
        }
        // Escapes: copy into an owned buffer from here on.
        let mut out = Vec::with_capacity(i + 16);
        let mut at = body;
        let mut next = body + i;
        loop {
            out.extend_from_slice(&input[at..next]);
            if input[next] == b'"' {
                self.pos = next + 1;
                return Ok(Cow::Owned(out));
            }
            let Some(&c) = input.get(next + 1) else {
                return Err(self.err(start, ParseErrorKind::UnterminatedString));
            };
            out.push(match c {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                c => c,
            });
            at = next + 2;
            next = match find_quote_or_backslash(&input[at..]) {
                Some(j) => at + j,
                None => return Err(self.err(start, ParseErrorKind::UnterminatedString)),
            };
        }
    }

    /// `parsePath`: a string that must start with `/`.
    fn path(&mut self) -> Result<(usize, ByteStr<'a>)> {
        let start = self.pos;
        let s = self.string()?;
        if s.first() != Some(&b'/') {
            let shown = String::from_utf8_lossy(&s).into_owned();
            return Err(self.err(start, ParseErrorKind::BadPath(shown)));
        }
        Ok((start, s))
    }

    fn store_path(&mut self) -> Result<StorePath> {
        let (start, s) = self.path()?;
        self.store_dir
            .parse_path(&s)
            .map_err(|e| self.err(start, e))
    }

    fn output(&mut self, name: &[u8]) -> Result<DerivationOutput> {
        self.expect(",")?;
        let path_pos = self.pos;
        let path = self.string()?;
        self.expect(",")?;
        let algo_pos = self.pos;
        let algo = self.string()?;
        self.expect(",")?;
        let hash_pos = self.pos;
        let hash = self.string()?;
        self.expect(")")?;
        let shown = || String::from_utf8_lossy(name).into_owned();
        if !algo.is_empty() {
            let (method, algo_name) = match algo.strip_prefix(b"r:") {
                Some(rest) => (FileIngestionMethod::Recursive, rest),
                None => (FileIngestionMethod::Flat, &algo[..]),
            };
            let algo = HashAlgo::from_bytes(algo_name).ok_or_else(|| {
                let a = String::from_utf8_lossy(algo_name).into_owned();
                self.err(algo_pos, HashError::UnknownAlgo(a))
            })?;
            if hash.is_empty() || hash.as_ref() == b"impure" {
                // Floating (`ca-derivations`) and impure (`impure-derivations`) outputs
                // have no path; which feature building them needs is the builder's
                // business (the derivation type says).
                if !path.is_empty() {
                    return Err(self.err(hash_pos, ParseErrorKind::FloatingWithPath(shown())));
                }
                return Ok(if hash.is_empty() {
                    DerivationOutput::CAFloating { method, algo }
                } else {
                    DerivationOutput::Impure { method, algo }
                });
            }
            if path.first() != Some(&b'/') {
                let p = String::from_utf8_lossy(&path).into_owned();
                return Err(self.err(path_pos, ParseErrorKind::BadPath(p)));
            }
            let hash_str = std::str::from_utf8(&hash).map_err(|_| {
                let h = String::from_utf8_lossy(&hash).into_owned();
                self.err(hash_pos, HashError::InvalidBase16(h))
            })?;
            let hash = Hash::parse_non_sri_unprefixed(hash_str, algo)
                .map_err(|e| self.err(hash_pos, e))?;
            Ok(DerivationOutput::CAFixed(FixedOutputHash { method, hash }))
        } else if path.is_empty() {
            Ok(DerivationOutput::Deferred)
        } else {
            if path.first() != Some(&b'/') {
                let p = String::from_utf8_lossy(&path).into_owned();
                return Err(self.err(path_pos, ParseErrorKind::BadPath(p)));
            }
            let p = self
                .store_dir
                .parse_path(&path)
                .map_err(|e| self.err(path_pos, e))?;
            Ok(DerivationOutput::InputAddressed(p))
        }
    }

    fn string_set(&mut self) -> Result<BTreeSet<ByteStr<'a>>> {
        let mut set = BTreeSet::new();
        while !self.end_of_list() {
            set.insert(self.string()?);
        }
        Ok(set)
    }

    fn derivation(&mut self, name: &str) -> Result<Derivation<'a>> {
        let mut drv = Derivation {
            name: name.to_owned(),
            ..Derivation::default()
        };
        self.expect("Derive([")?;
        while !self.end_of_list() {
            self.expect("(")?;
            let id = self.string()?;
            let output = self.output(&id)?;
            // std::map::emplace: the first entry for a name wins.
            drv.outputs.entry(id).or_insert(output);
        }
        self.expect(",[")?;
        while !self.end_of_list() {
            self.expect("(")?;
            let path = self.store_path()?;
            self.expect(",[")?;
            let outputs = self.string_set()?;
            self.expect(")")?;
            drv.input_drvs.insert(path, outputs);
        }
        self.expect(",[")?;
        while !self.end_of_list() {
            let path = self.store_path()?;
            drv.input_srcs.insert(path);
        }
        self.expect(",")?;
        drv.platform = self.string()?;
        self.expect(",")?;
        drv.builder = self.string()?;
        self.expect(",[")?;
        while !self.end_of_list() {
            drv.args.push(self.string()?);
        }
        self.expect(",[")?;
        while !self.end_of_list() {
            self.expect("(")?;
            let key = self.string()?;
            self.expect(",")?;
            let value = self.string()?;
            self.expect(")")?;
            drv.env.insert(key, value);
        }
        self.expect(")")?;
        // Nix ignores whatever follows.
        Ok(drv)
    }
}

/// The next `"` or `\\`. Escaped strings (build scripts) have them every few dozen
/// bytes, where scanning 8 bytes at a time in place beats restarting memchr after each
/// escape; long runs still go to memchr.
fn find_quote_or_backslash(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Lowest set high bit = first byte of `w` equal to `"` or `\\` (exact for the first).
    let special = |w: u64| {
        let q = w ^ (ONES * u64::from(b'"'));
        let b = w ^ (ONES * u64::from(b'\\'));
        (q.wrapping_sub(ONES) & !q | b.wrapping_sub(ONES) & !b) & HIGH
    };
    let head = s.len().min(64);
    let mut i = 0;
    while i + 8 <= head {
        let mut word = [0u8; 8];
        word.copy_from_slice(&s[i..i + 8]);
        let m = special(u64::from_le_bytes(word));
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    if let Some(j) = s[i..head].iter().position(|&c| c == b'"' || c == b'\\') {
        return Some(i + j);
    }
    memchr::memchr2(b'"', b'\\', &s[head..]).map(|j| j + head)
}

/// Parse a `.drv` file. `name` is the derivation's name (its path's name without
/// `.drv`), which fixed-output paths depend on.
pub fn parse_derivation<'a>(
    store_dir: &StoreDir,
    input: &'a [u8],
    name: &str,
) -> Result<Derivation<'a>> {
    Parser {
        input,
        pos: 0,
        store_dir,
    }
    .derivation(name)
}

/// Bytes that `printString` escapes.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'\n' as usize] = true;
    t[b'\r' as usize] = true;
    t[b'\t' as usize] = true;
    t
};

/// `printString`: quoted, with escapes.
fn print_string(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut rest = s;
    while let Some(i) = rest.iter().position(|&c| NEEDS_ESCAPE[c as usize]) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(match rest[i] {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\t",
        });
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// `printUnquotedString`: quoted, *without* escapes (as Nix writes paths and names).
fn print_unquoted(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

fn print_path(out: &mut Vec<u8>, store_dir: &StoreDir, p: &StorePath) {
    out.push(b'"');
    out.extend_from_slice(store_dir.as_str().as_bytes());
    out.push(b'/');
    out.extend_from_slice(p.base_name().as_bytes());
    out.push(b'"');
}

fn print_list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut f: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        f(out, item);
    }
    out.push(b']');
}

/// How `unparse` writes the inputDrvs and outputs: as in the file, or as
/// `hashDerivationModulo` needs them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unparse<'m, 'a> {
    /// The `.drv` file itself.
    File,
    /// Input derivations replaced by their modulo hashes (hex → output names); outputs
    /// masked (paths and their env entries emptied) if `mask_outputs`.
    Modulo {
        inputs: &'m BTreeMap<String, BTreeSet<ByteStr<'a>>>,
        mask_outputs: bool,
    },
}

impl Derivation<'_> {
    /// The `.drv` text, byte for byte as Nix writes it.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Result<Vec<u8>, DerivationError> {
        let mut out = Vec::new();
        self.write_aterm(store_dir, &mut out)?;
        Ok(out)
    }

    /// Append the `.drv` text to `out`.
    pub fn write_aterm(
        &self,
        store_dir: &StoreDir,
        out: &mut Vec<u8>,
    ) -> Result<(), DerivationError> {
        self.unparse(store_dir, Unparse::File, out)
    }

    pub(crate) fn unparse(
        &self,
        store_dir: &StoreDir,
        mode: Unparse<'_, '_>,
        out: &mut Vec<u8>,
    ) -> Result<(), DerivationError> {
        let mask = matches!(
            mode,
            Unparse::Modulo {
                mask_outputs: true,
                ..
            }
        );
        out.reserve(self.size_hint());
        out.extend_from_slice(b"Derive([");
        for (i, (name, output)) in self.outputs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            print_unquoted(out, name);
            out.push(b',');
            match (output, mask) {
                (DerivationOutput::InputAddressed(p), false) => print_path(out, store_dir, p),
                (DerivationOutput::CAFixed(_), false) => {
                    let p = self.output_path(store_dir, name, output)?;
                    print_path(
                        out,
                        store_dir,
                        p.as_ref().ok_or(DerivationError::NoOutputs)?,
                    );
                }
                _ => out.extend_from_slice(b"\"\""),
            }
            out.push(b',');
            match output {
                DerivationOutput::CAFixed(fixed) => {
                    print_unquoted(out, fixed.method_algo().to_string().as_bytes());
                    out.push(b',');
                    print_unquoted(out, fixed.hash.to_base16().as_bytes());
                }
                DerivationOutput::CAFloating { .. } | DerivationOutput::Impure { .. } => {
                    let algo = output.method_algo().unwrap_or_default();
                    print_unquoted(out, algo.as_bytes());
                    out.push(b',');
                    let hash: &[u8] = match output {
                        DerivationOutput::Impure { .. } => b"impure",
                        _ => b"",
                    };
                    print_unquoted(out, hash);
                }
                _ => out.extend_from_slice(b"\"\",\"\""),
            }
            out.push(b')');
        }
        out.extend_from_slice(b"],");
        match mode {
            Unparse::File => print_list(out, &self.input_drvs, |out, (path, outputs)| {
                out.push(b'(');
                print_path(out, store_dir, path);
                out.push(b',');
                print_list(out, outputs, |out, o| print_unquoted(out, o));
                out.push(b')');
            }),
            Unparse::Modulo { inputs, .. } => print_list(out, inputs, |out, (hash, outputs)| {
                out.push(b'(');
                print_unquoted(out, hash.as_bytes());
                out.push(b',');
                print_list(out, outputs, |out, o| print_unquoted(out, o));
                out.push(b')');
            }),
        }
        out.push(b',');
        print_list(out, &self.input_srcs, |out, p| {
            print_path(out, store_dir, p)
        });
        out.push(b',');
        print_unquoted(out, &self.platform);
        out.push(b',');
        print_string(out, &self.builder);
        out.push(b',');
        print_list(out, &self.args, |out, a| print_string(out, a));
        out.push(b',');
        print_list(out, &self.env, |out, (k, v)| {
            out.push(b'(');
            print_string(out, k);
            out.push(b',');
            if mask && self.outputs.contains_key(k) {
                out.extend_from_slice(b"\"\"");
            } else {
                print_string(out, v);
            }
            out.push(b')');
        });
        out.push(b')');
        Ok(())
    }

    /// A cheap upper-ish estimate of the printed size, to reserve once.
    fn size_hint(&self) -> usize {
        let env: usize = self.env.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let args: usize = self.args.iter().map(|a| a.len() + 3).sum();
        let paths = (self.outputs.len() + self.input_drvs.len() + self.input_srcs.len()) * 96;
        64 + env + args + paths + self.builder.len() + self.platform.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SINGLE: &[u8] = br#"Derive([("out","/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hello > $out"],[("builder","/bin/sh"),("name","single"),("out","/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single"),("system","x86_64-linux")])"#;

    fn parse(s: &[u8]) -> Result<Derivation<'_>> {
        parse_derivation(&StoreDir::default(), s, "x")
    }

    fn print(d: &Derivation<'_>) -> Vec<u8> {
        d.to_aterm(&StoreDir::default()).unwrap()
    }

    #[test]
    fn single_roundtrips_and_borrows() {
        let d = parse_derivation(&StoreDir::default(), SINGLE, "single").unwrap();
        assert_eq!(print(&d), SINGLE);
        assert!(matches!(d.builder, Cow::Borrowed(_)));
        assert_eq!(d.args.len(), 2);
        assert_eq!(d.env.len(), 4);
    }

    #[test]
    fn escapes() {
        let d = parse(br#"Derive([],[],[],"s","b\\\"\n\r\t\x\q",["\\x\\q\\\\"],[])"#).unwrap();
        assert_eq!(&d.builder[..], b"b\\\"\n\r\txq");
        assert_eq!(&d.args[0][..], b"\\x\\q\\\\");
        assert_eq!(
            print(&d),
            br#"Derive([],[],[],"s","b\\\"\n\r\txq",["\\x\\q\\\\"],[])"#
        );
        // Raw control bytes and non-UTF-8 bytes pass through unchanged.
        let raw = b"Derive([],[],[],\"s\",\"b\",[\"\x01\x1f\x7f\xff\xc3\xa9\"],[])";
        assert_eq!(print(&parse(raw).unwrap()), raw);
    }

    #[test]
    fn nix_list_quirks() {
        let d =
            parse(br#"Derive([],[],[],"s","b",[,"a""b"],[("b","1")("a","2"),("b","3")])trailing"#)
                .unwrap();
        assert_eq!(
            d.args,
            vec![Cow::Borrowed(&b"a"[..]), Cow::Borrowed(&b"b"[..])]
        );
        assert_eq!(d.env.get(b"b".as_slice()).map(|v| &v[..]), Some(&b"3"[..]));
        assert_eq!(
            print(&d),
            br#"Derive([],[],[],"s","b",["a","b"],[("a","2"),("b","3")])"#
        );
    }

    #[test]
    fn errors_have_positions() {
        let e = parse(b"").unwrap_err();
        assert_eq!(
            (e.pos, e.to_string()),
            (0, "at byte 0: expected 'Derive(['".to_owned())
        );
        let e = parse(b"Derive([").unwrap_err();
        assert_eq!((e.pos, e.kind), (8, ParseErrorKind::Expected("(")));
        let e = parse(br#"Derive([("out","/nix/store/abc"#).unwrap_err();
        assert_eq!((e.pos, e.kind), (15, ParseErrorKind::UnterminatedString));
        let e = parse(br#"Derive([],[],[],"s","b",["a\"#).unwrap_err();
        assert_eq!((e.pos, e.kind), (25, ParseErrorKind::UnterminatedString));
        let e = parse(br#"Derive([("out","nix/store/x","","")],[],[],"s","b",[],[])"#).unwrap_err();
        assert_eq!(e.pos, 15);
        assert_eq!(e.kind.to_string(), "bad path 'nix/store/x' in derivation");
        let e = parse(br#"Derive([("out","/nix/store/x","r:sha256","")],[],[],"s","b",[],[])"#)
            .unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::FloatingWithPath(_)));
    }

    #[test]
    fn floating_and_impure_outputs_print_back() {
        for text in [
            &br#"Derive([("out","","r:sha256","")],[],[],"s","b",[],[])"#[..],
            br#"Derive([("out","","sha1","impure")],[],[],"s","b",[],[])"#,
        ] {
            let d = parse(text).unwrap();
            assert!(d.output_paths(&StoreDir::default()).unwrap().is_empty());
            assert_eq!(print(&d), text);
        }
        let d = parse(br#"Derive([("out","","r:sha256","")],[],[],"s","b",[],[])"#).unwrap();
        assert_eq!(
            d.derivation_type().unwrap(),
            crate::DerivationType::Floating
        );
    }
}
