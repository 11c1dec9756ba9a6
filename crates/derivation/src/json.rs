//! Derivations as the JSON of `nix show-derivation` (Nix 2.8), both ways.
//!
//! ```text
//! { "<drv path>": { "outputs": { "<name>": { "path": P [, "hashAlgo": "[r:]algo", "hash": HEX] } },
//!                   "inputSrcs": [P…], "inputDrvs": { "<drv path>": [output…] },
//!                   "system": S, "builder": S, "args": [S…], "env": { K: V } } }
//! ```
//!
//! Writing reproduces Nix's bytes: two-space indentation, keys in the order above, maps
//! sorted, a final newline, and Nix's string escaping (`"` `\` LF CR TAB as two-character
//! escapes, other bytes below 0x20 as `\u00xx`, everything else — DEL and non-UTF-8 bytes
//! included — raw). A deferred output is `{}`.
//!
//! Reading accepts that shape (or a single derivation object without the key) with any
//! JSON whitespace; an output `{}`, without `path` or with `"path": ""` is to be computed
//! (deferred); a bare object's name comes from `name`, env.name, env.__json's `name` or
//! a fixed output's path ([`Name`] says whether it must be found); strings may hold raw non-UTF-8 bytes, as Nix writes them. It is
//! stricter than needed on purpose: unknown fields, missing fields, duplicate keys, a
//! fixed output whose `path` disagrees with its hash and a `name` field that disagrees
//! with the `.drv` path it is keyed by are errors.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;

use crate::ca::{FileIngestionMethod, FixedOutputHash};
use crate::derivation::{name_from_drv_base_name, Derivation, DerivationError, DerivationOutput};
use crate::hash::{Hash, HashAlgo};
use crate::store_path::StoreDir;

// ---------------------------------------------------------------------------------------
// Writing

/// Bytes Nix's `toJSON` escapes: `"` `\\` and everything below 0x20.
const JSON_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Append `s` as a JSON string, escaped as Nix's `toJSON` does.
pub fn write_json_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut rest = s;
    while let Some(i) = rest.iter().position(|&c| JSON_ESCAPE[c as usize]) {
        out.extend_from_slice(&rest[..i]);
        let c = rest[i];
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(c >> 4) as usize],
                HEX[(c & 15) as usize],
            ]),
        }
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// A pretty-printer with Nix's layout: `{}`/`[]` when empty, else one item a line.
struct Pretty<'o> {
    out: &'o mut Vec<u8>,
    depth: usize,
    /// Whether the innermost open container has an item yet.
    first: Vec<bool>,
}

impl Pretty<'_> {
    fn newline(&mut self) {
        self.out.push(b'\n');
        self.out.resize(self.out.len() + 2 * self.depth, b' ');
    }

    fn open(&mut self, c: u8) {
        self.out.push(c);
        self.depth += 1;
        self.first.push(true);
    }

    fn close(&mut self, c: u8) {
        self.depth -= 1;
        if self.first.pop() == Some(false) {
            self.newline();
        }
        self.out.push(c);
    }

    fn item(&mut self) {
        if let Some(first) = self.first.last_mut() {
            if !*first {
                self.out.push(b',');
            }
            *first = false;
        }
        self.newline();
    }

    fn key(&mut self, k: &[u8]) {
        self.item();
        write_json_string(self.out, k);
        self.out.extend_from_slice(b": ");
    }

    fn string_attr(&mut self, k: &[u8], v: &[u8]) {
        self.key(k);
        write_json_string(self.out, v);
    }

    fn string_list<'s>(&mut self, k: &[u8], items: impl IntoIterator<Item = &'s [u8]>) {
        self.key(k);
        self.open(b'[');
        for s in items {
            self.item();
            write_json_string(self.out, s);
        }
        self.close(b']');
    }
}

/// Write `{ key: derivation, … }` exactly as `nix show-derivation` prints it.
pub fn write_show_derivation<'d>(
    store_dir: &StoreDir,
    entries: impl IntoIterator<Item = (&'d str, &'d Derivation<'d>)>,
    out: &mut Vec<u8>,
) -> Result<(), DerivationError> {
    let mut p = Pretty {
        out,
        depth: 0,
        first: Vec::new(),
    };
    p.open(b'{');
    for (key, drv) in entries {
        p.key(key.as_bytes());
        write_derivation_object(&mut p, store_dir, drv)?;
    }
    p.close(b'}');
    p.out.push(b'\n');
    Ok(())
}

fn write_derivation_object(
    p: &mut Pretty<'_>,
    store_dir: &StoreDir,
    drv: &Derivation<'_>,
) -> Result<(), DerivationError> {
    p.open(b'{');
    p.key(b"outputs");
    p.open(b'{');
    for (name, output) in &drv.outputs {
        p.key(name);
        p.open(b'{');
        if let Some(path) = drv.output_path(store_dir, name, output)? {
            p.string_attr(b"path", store_dir.display(&path).as_bytes());
        }
        match output {
            DerivationOutput::CAFixed(fixed) => {
                p.string_attr(b"hashAlgo", fixed.method_algo().to_string().as_bytes());
                p.string_attr(b"hash", fixed.hash.to_base16().as_bytes());
            }
            DerivationOutput::CAFloating { .. } | DerivationOutput::Impure { .. } => {
                let algo = output.method_algo().unwrap_or_default();
                p.string_attr(b"hashAlgo", algo.as_bytes());
                if let DerivationOutput::Impure { .. } = output {
                    p.key(b"impure");
                    p.out.extend_from_slice(b"true");
                }
            }
            DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => {}
        }
        p.close(b'}');
    }
    p.close(b'}');
    let srcs: Vec<String> = drv
        .input_srcs
        .iter()
        .map(|s| store_dir.display(s))
        .collect();
    p.string_list(b"inputSrcs", srcs.iter().map(|s| s.as_bytes()));
    p.key(b"inputDrvs");
    p.open(b'{');
    for (path, outputs) in &drv.input_drvs {
        p.string_list(
            store_dir.display(path).as_bytes(),
            outputs.iter().map(|o| &o[..]),
        );
    }
    p.close(b'}');
    p.string_attr(b"system", &drv.platform);
    p.string_attr(b"builder", &drv.builder);
    p.string_list(b"args", drv.args.iter().map(|a| &a[..]));
    p.key(b"env");
    p.open(b'{');
    for (k, v) in &drv.env {
        p.string_attr(k, v);
    }
    p.close(b'}');
    p.close(b'}');
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading: a small JSON parser over bytes (strings may be non-UTF-8, as Nix writes them).

/// A JSON value; strings are bytes, objects keep their order.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Number,
    String(Vec<u8>),
    Array(Vec<Value>),
    Object(Vec<(Vec<u8>, Value)>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

/// Why the JSON could not be read as derivations.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JsonError {
    /// Not JSON at all.
    #[error("invalid JSON at byte {pos}: {msg}")]
    Syntax { pos: usize, msg: String },
    /// JSON, but not a derivation; `at` names the field (`outputs.out.hash`).
    #[error("{at}: {msg}")]
    Shape { at: String, msg: String },
}

const MAX_DEPTH: usize = 64;

struct Reader<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, JsonError> {
        Err(JsonError::Syntax {
            pos: self.pos,
            msg: msg.into(),
        })
    }

    fn ws(&mut self) {
        while matches!(self.s.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > MAX_DEPTH {
            return self.err("nested too deeply");
        }
        self.ws();
        match self.s.get(self.pos) {
            None => self.err("unexpected end of input"),
            Some(b'{') => {
                self.pos += 1;
                let mut items: Vec<(Vec<u8>, Value)> = Vec::new();
                if self.eat(b'}') {
                    return Ok(Value::Object(items));
                }
                loop {
                    self.ws();
                    let key_pos = self.pos;
                    let key = self.string()?;
                    if items.iter().any(|(k, _)| *k == key) {
                        self.pos = key_pos;
                        return self.err(format!("duplicate key {}", show(&key)));
                    }
                    if !self.eat(b':') {
                        return self.err("expected ':'");
                    }
                    let v = self.value(depth + 1)?;
                    items.push((key, v));
                    if self.eat(b'}') {
                        return Ok(Value::Object(items));
                    }
                    if !self.eat(b',') {
                        return self.err("expected ',' or '}'");
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Ok(Value::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(b']') {
                        return Ok(Value::Array(items));
                    }
                    if !self.eat(b',') {
                        return self.err("expected ',' or ']'");
                    }
                }
            }
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                while matches!(
                    self.s.get(self.pos),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                if text.parse::<f64>().is_err() {
                    self.pos = start;
                    return self.err("invalid number");
                }
                Ok(Value::Number)
            }
            Some(&c) => self.err(format!("unexpected {}", show(&[c]))),
        }
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, JsonError> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            self.err("invalid literal")
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self.s.get(self.pos..self.pos + 4).unwrap_or(b"");
        let v = std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.len() == 4 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| u32::from_str_radix(d, 16).ok());
        match v {
            Some(v) => {
                self.pos += 4;
                Ok(v)
            }
            None => self.err("invalid \\u escape"),
        }
    }

    fn string(&mut self) -> Result<Vec<u8>, JsonError> {
        if self.s.get(self.pos) != Some(&b'"') {
            return self.err("expected a string");
        }
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                self.pos = start;
                return self.err("unterminated string");
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let Some(&e) = self.s.get(self.pos) else {
                        self.pos = start;
                        return self.err("unterminated string");
                    };
                    self.pos += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xd800..0xdc00).contains(&cp) {
                                if !self.s[self.pos..].starts_with(b"\\u") {
                                    return self.err("unpaired surrogate in \\u escape");
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return self.err("unpaired surrogate in \\u escape");
                                }
                                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                            }
                            let Some(ch) = char::from_u32(cp) else {
                                return self.err("unpaired surrogate in \\u escape");
                            };
                            let mut buf = [0; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => {
                            self.pos -= 2;
                            return self.err("invalid escape");
                        }
                    }
                }
                0..=0x1f => {
                    self.pos -= 1;
                    return self.err("control character in string");
                }
                _ => out.push(c),
            }
        }
    }
}

fn show(b: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(b))
}

/// The field path in messages, e.g. `'/nix/store/…-x.drv'.outputs.out`.
#[derive(Clone)]
struct At(Vec<String>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("top level");
        }
        f.write_str(&self.0.join("."))
    }
}

impl At {
    fn push(&self, field: &[u8]) -> At {
        let mut v = self.0.clone();
        let f = String::from_utf8_lossy(field);
        if f.contains(['.', '/', ' ']) || f.is_empty() {
            v.push(format!("\"{f}\""));
        } else {
            v.push(f.into_owned());
        }
        At(v)
    }

    fn fail<T>(&self, msg: impl Into<String>) -> Result<T, JsonError> {
        Err(JsonError::Shape {
            at: self.to_string(),
            msg: msg.into(),
        })
    }
}

fn as_object<'v>(v: &'v Value, at: &At) -> Result<&'v [(Vec<u8>, Value)], JsonError> {
    match v {
        Value::Object(o) => Ok(o),
        other => at.fail(format!("expected an object, found {}", other.kind())),
    }
}

fn as_string<'v>(v: &'v Value, at: &At) -> Result<&'v [u8], JsonError> {
    match v {
        Value::String(s) => Ok(s),
        other => at.fail(format!("expected a string, found {}", other.kind())),
    }
}

fn as_str<'v>(v: &'v Value, at: &At) -> Result<&'v str, JsonError> {
    let s = as_string(v, at)?;
    std::str::from_utf8(s).or_else(|_| at.fail("expected UTF-8 text"))
}

fn as_string_array<'v>(v: &'v Value, at: &At) -> Result<Vec<&'v [u8]>, JsonError> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| as_string(item, &at.push(i.to_string().as_bytes())))
            .collect(),
        other => at.fail(format!("expected an array, found {}", other.kind())),
    }
}

/// Look up required and optional fields, rejecting unknown ones.
fn fields<'v, const N: usize>(
    obj: &'v [(Vec<u8>, Value)],
    at: &At,
    required: [&str; N],
    optional: &[&str],
) -> Result<([&'v Value; N], Vec<Option<&'v Value>>), JsonError> {
    for (k, _) in obj {
        let known = required
            .iter()
            .chain(optional)
            .any(|f| f.as_bytes() == &k[..]);
        if !known {
            return at.fail(format!("unknown field {}", show(k)));
        }
    }
    let get = |f: &str| obj.iter().find(|(k, _)| k == f.as_bytes()).map(|(_, v)| v);
    let mut req = [&Value::Null; N];
    for (slot, f) in req.iter_mut().zip(required) {
        *slot = match get(f) {
            Some(v) => v,
            None => return at.fail(format!("missing field '{f}'")),
        };
    }
    Ok((req, optional.iter().map(|f| get(f)).collect()))
}

fn read_output(
    store_dir: &StoreDir,
    drv: &Derivation<'static>,
    name: &[u8],
    v: &Value,
    at: &At,
) -> Result<DerivationOutput, JsonError> {
    let obj = as_object(v, at)?;
    let ([], opt) = fields(obj, at, [], &["path", "hashAlgo", "hash", "impure"])?;
    let impure = match opt[3] {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return at
                .push(b"impure")
                .fail(format!("expected a boolean, got {}", v.kind()))
        }
    };
    let output = match (opt[0], opt[1], opt[2]) {
        (None, None, None) => DerivationOutput::Deferred,
        (Some(path), None, None) => {
            let at = at.push(b"path");
            match as_string(path, &at)? {
                // `""` is what Nix writes before the path is computed (`("out","","","")`).
                b"" => DerivationOutput::Deferred,
                path => match store_dir.parse_path(path) {
                    Ok(p) => DerivationOutput::InputAddressed(p),
                    Err(e) => return at.fail(e.to_string()),
                },
            }
        }
        (None, Some(algo), None) => {
            let algo_at = at.push(b"hashAlgo");
            let algo = as_str(algo, &algo_at)?;
            let (method, algo) = match algo.strip_prefix("r:") {
                Some(a) => (FileIngestionMethod::Recursive, a),
                None => (FileIngestionMethod::Flat, algo),
            };
            let algo = HashAlgo::parse(algo).or_else(|e| algo_at.fail(e.to_string()))?;
            match impure {
                true => DerivationOutput::Impure { method, algo },
                false => DerivationOutput::CAFloating { method, algo },
            }
        }
        (Some(_), Some(_), None) => {
            return at.fail("a content-addressed output without a hash has no path")
        }
        (path, Some(algo), Some(hash)) => {
            let algo_at = at.push(b"hashAlgo");
            let algo = as_str(algo, &algo_at)?;
            let (method, algo) = match algo.strip_prefix("r:") {
                Some(a) => (FileIngestionMethod::Recursive, a),
                None => (FileIngestionMethod::Flat, algo),
            };
            let algo = HashAlgo::parse(algo).or_else(|e| algo_at.fail(e.to_string()))?;
            let hash_at = at.push(b"hash");
            let hash = Hash::parse_non_sri_unprefixed(as_str(hash, &hash_at)?, algo)
                .or_else(|e| hash_at.fail(e.to_string()))?;
            let output = DerivationOutput::CAFixed(FixedOutputHash { method, hash });
            let path_at = at.push(b"path");
            let given = path.map(|p| as_string(p, &path_at)).transpose()?;
            // An empty path is to be computed, as for input-addressed outputs.
            if let Some(given) = given.filter(|g| !g.is_empty()) {
                let want = drv
                    .output_path(store_dir, name, &output)
                    .or_else(|e| path_at.fail(e.to_string()))?
                    .map(|p| store_dir.display(&p))
                    .unwrap_or_default();
                if given != want.as_bytes() {
                    return path_at.fail(format!(
                        "{} does not match the fixed output's hash and name, which give '{want}'",
                        show(given)
                    ));
                }
            }
            output
        }
        (_, None, Some(_)) => return at.fail("'hash' without 'hashAlgo'"),
    };
    Ok(output)
}

/// Whether a derivation read without a `.drv` path must have a name (`derivation add`:
/// its `.drv` path is named after it) or may go without (`derivation print`: the ATerm
/// holds no name, only a fixed output's path depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Required,
    Optional,
}

/// The `name` in `env.__json` (`__structuredAttrs`: every attribute, the name included,
/// is in that one JSON string and the env has no `name`).
fn structured_attrs_name(env: &[(Vec<u8>, Value)], at: &At) -> Result<Option<String>, JsonError> {
    let Some((_, Value::String(json))) = env.iter().find(|(k, _)| k == b"__json") else {
        return Ok(None);
    };
    let at = at.push(b"env").push(b"__json");
    let mut r = Reader { s: json, pos: 0 };
    let attrs = r.value(0).or_else(|e| at.fail(e.to_string()))?;
    let Value::Object(attrs) = attrs else {
        return Ok(None);
    };
    match attrs.iter().find(|(k, _)| k == b"name") {
        Some((_, v)) => Ok(Some(as_str(v, &at.push(b"name"))?.to_owned())),
        None => Ok(None),
    }
}

/// The name from the path of a fixed output `out` (its path's name is the derivation's):
/// the one output whose path depends on the name, so the hash check below confirms it.
fn fixed_output_name(
    store_dir: &StoreDir,
    outputs: &Value,
    at: &At,
) -> Result<Option<String>, JsonError> {
    let Value::Object(outputs) = outputs else {
        return Ok(None);
    };
    let Some((_, Value::Object(out))) = outputs.iter().find(|(k, _)| k == b"out") else {
        return Ok(None);
    };
    let get = |f: &[u8]| out.iter().find(|(k, _)| k == f).map(|(_, v)| v);
    match (get(b"hashAlgo"), get(b"path")) {
        (Some(_), Some(Value::String(path))) if !path.is_empty() => {
            let at = at.push(b"outputs").push(b"out").push(b"path");
            match store_dir.parse_path(path) {
                Ok(p) => Ok(Some(p.name().to_owned())),
                Err(e) => at.fail(e.to_string()),
            }
        }
        _ => Ok(None),
    }
}

fn read_derivation(
    store_dir: &StoreDir,
    key_name: Option<&str>,
    need: Name,
    v: &Value,
    at: &At,
) -> Result<Derivation<'static>, JsonError> {
    let obj = as_object(v, at)?;
    let ([outputs, input_srcs, input_drvs, system, builder, args, env], opt) = fields(
        obj,
        at,
        [
            "outputs",
            "inputSrcs",
            "inputDrvs",
            "system",
            "builder",
            "args",
            "env",
        ],
        &["name"],
    )?;
    let mut drv = Derivation::default();

    let env_at = at.push(b"env");
    let env_obj = as_object(env, &env_at)?;
    for (k, v) in env_obj {
        let value = as_string(v, &env_at.push(k))?;
        drv.env
            .insert(Cow::Owned(k.clone()), Cow::Owned(value.to_vec()));
    }
    drv.name = match (opt[0], key_name) {
        // The key names the derivation (and is what is written back): a `name` field
        // may only repeat it.
        (Some(n), Some(key_name)) => {
            let name_at = at.push(b"name");
            let n = as_str(n, &name_at)?;
            if n != key_name {
                return name_at.fail(format!(
                    "'{n}' disagrees with the name '{key_name}' given by the .drv path"
                ));
            }
            n.to_owned()
        }
        (None, Some(n)) => n.to_owned(),
        (Some(n), None) => as_str(n, &at.push(b"name"))?.to_owned(),
        (None, None) => match drv.env.get(b"name".as_slice()) {
            Some(n) => String::from_utf8_lossy(n).into_owned(),
            None => match structured_attrs_name(env_obj, at)? {
                Some(n) => n,
                None => fixed_output_name(store_dir, outputs, at)?.unwrap_or_default(),
            },
        },
    };
    if drv.name.is_empty() && need == Name::Required {
        return at.fail(
            "cannot tell the derivation's name: key it by its .drv path, or give a 'name' \
             field, env.name, or (with __structuredAttrs) a 'name' in env.__json",
        );
    }

    let outputs_at = at.push(b"outputs");
    for (k, v) in as_object(outputs, &outputs_at)? {
        let at = outputs_at.push(k);
        let output = read_output(store_dir, &drv, k, v, &at)?;
        if drv.name.is_empty() && matches!(output, DerivationOutput::CAFixed(_)) {
            return at.fail(
                "the path of a fixed output depends on the derivation's name: give it as \
                 a 'name' field, env.name or this output's 'path'",
            );
        }
        drv.outputs.insert(Cow::Owned(k.clone()), output);
    }

    let srcs_at = at.push(b"inputSrcs");
    for (i, s) in as_string_array(input_srcs, &srcs_at)?
        .into_iter()
        .enumerate()
    {
        match store_dir.parse_path(s) {
            Ok(p) => drv.input_srcs.insert(p),
            Err(e) => return srcs_at.push(i.to_string().as_bytes()).fail(e.to_string()),
        };
    }

    let drvs_at = at.push(b"inputDrvs");
    for (k, v) in as_object(input_drvs, &drvs_at)? {
        let at = drvs_at.push(k);
        let path = store_dir
            .parse_path(k)
            .or_else(|e| at.fail(e.to_string()))?;
        let outs: BTreeSet<_> = as_string_array(v, &at)?
            .into_iter()
            .map(|o| Cow::Owned(o.to_vec()))
            .collect();
        drv.input_drvs.insert(path, outs);
    }

    drv.platform = Cow::Owned(as_string(system, &at.push(b"system"))?.to_vec());
    drv.builder = Cow::Owned(as_string(builder, &at.push(b"builder"))?.to_vec());
    drv.args = as_string_array(args, &at.push(b"args"))?
        .into_iter()
        .map(|a| Cow::Owned(a.to_vec()))
        .collect();
    Ok(drv)
}

/// Read show-derivation JSON: either `{ "<drv path>": {…}, … }` (the name of each comes
/// from its key) or one bare derivation object, whose name comes from a `name` field,
/// env.name, the `name` in env.__json (`__structuredAttrs`) or the path of a fixed
/// output, and must be found. Returns the keys (if any) with the derivations, in the
/// order given.
pub fn parse_show_derivation(
    store_dir: &StoreDir,
    input: &[u8],
) -> Result<Vec<(Option<String>, Derivation<'static>)>, JsonError> {
    parse_show_derivation_with(store_dir, input, Name::Required)
}

/// [`parse_show_derivation`], where with [`Name::Optional`] a bare derivation object
/// whose name cannot be told is read with an empty name (enough to print its ATerm,
/// which holds no name), unless it has a fixed output without a path.
pub fn parse_show_derivation_with(
    store_dir: &StoreDir,
    input: &[u8],
    need: Name,
) -> Result<Vec<(Option<String>, Derivation<'static>)>, JsonError> {
    let mut r = Reader { s: input, pos: 0 };
    let root = r.value(0)?;
    r.ws();
    if r.pos != input.len() {
        return r.err("trailing data after the JSON value");
    }
    let top = At(Vec::new());
    let obj = as_object(&root, &top)?;
    let keyed = !obj.is_empty() && obj.iter().all(|(k, _)| k.first() == Some(&b'/'));
    if !keyed {
        return Ok(vec![(
            None,
            read_derivation(store_dir, None, need, &root, &top)?,
        )]);
    }
    let mut out = Vec::with_capacity(obj.len());
    for (key, v) in obj {
        let at = top.push(key);
        let key = std::str::from_utf8(key)
            .or_else(|_| at.fail("a .drv path must be UTF-8"))?
            .to_owned();
        let base = key.rsplit('/').next().unwrap_or_default();
        if !base.ends_with(".drv") {
            return at.fail("key is not the path of a .drv file");
        }
        let name = name_from_drv_base_name(base).to_owned();
        let drv = read_derivation(store_dir, Some(&name), need, v, &at)?;
        out.push((Some(key), drv));
    }
    Ok(out)
}

/// Group derivations by key for printing, sorted and de-duplicated as Nix's
/// `StorePathSet` is.
pub fn sorted_entries<'d, 'a>(
    items: impl IntoIterator<Item = (&'d str, &'d Derivation<'a>)>,
) -> BTreeMap<&'d str, &'d Derivation<'a>> {
    items.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aterm::parse_derivation;

    #[test]
    fn string_escaping_is_nixs() {
        let mut out = Vec::new();
        write_json_string(&mut out, b"\\x\"\n\r\t\x01\x1f\x7f\xff\xc3\xa9");
        assert_eq!(out, b"\"\\\\x\\\"\\n\\r\\t\\u0001\\u001f\x7f\xff\xc3\xa9\"");
    }

    #[test]
    fn reader_roundtrips_raw_bytes() {
        let sd = StoreDir::default();
        let text = b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"s\",\"b\",[\"\x01\x7f\xff\\n\\\\\"],[(\"name\",\"x\")])";
        let drv = parse_derivation(&sd, text, "x").unwrap();
        let mut json = Vec::new();
        write_show_derivation(&sd, [("/nix/store/x.drv", &drv)], &mut json).unwrap();
        let back = parse_show_derivation(&sd, &json).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1, drv.clone().into_owned());
        assert_eq!(back[0].1.to_aterm(&sd).unwrap(), text);
    }

    #[test]
    fn reader_errors_name_the_field() {
        let sd = StoreDir::default();
        let e = |s: &str| {
            parse_show_derivation(&sd, s.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e("{"), "invalid JSON at byte 1: expected a string");
        assert_eq!(e("[1,]"), "invalid JSON at byte 3: unexpected ']'");
        assert_eq!(
            e(r#"{"a":1,"a":2}"#),
            "invalid JSON at byte 7: duplicate key 'a'"
        );
        assert!(e(r#"{"outputs":{}}"#).contains("missing field 'inputSrcs'"));
        let bad_hash = r#"{"name":"x","outputs":{"out":{"hashAlgo":"sha256","hash":"abc"}},"inputSrcs":[],"inputDrvs":{},"system":"s","builder":"b","args":[],"env":{}}"#;
        assert_eq!(
            e(bad_hash),
            "outputs.out.hash: hash 'abc' has wrong length for hash type 'sha256'"
        );
        // Keyed by its .drv path, a derivation's name is the key's: a `name` field may
        // repeat it but not contradict it (it would not survive being written back).
        let body = r#""outputs":{},"inputSrcs":[],"inputDrvs":{},"system":"","builder":"","args":[],"env":{}"#;
        assert_eq!(
            e(&format!(
                r#"{{"/nix/store/x-a.drv":{{"name":"b",{body}}}}}"#
            )),
            r#""/nix/store/x-a.drv".name: 'b' disagrees with the name 'x-a' given by the .drv path"#
        );
        let same = format!(r#"{{"/x/a.drv":{{"name":"a",{body}}}}}"#);
        assert_eq!(
            parse_show_derivation(&sd, same.as_bytes()).unwrap()[0]
                .1
                .name,
            "a"
        );
        let deep = "[".repeat(100);
        assert!(e(&deep).contains("nested too deeply"));
    }

    const SINGLE_BODY: &str = r#""inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/sh","args":["-c","echo hello > $out"]"#;

    #[test]
    fn an_empty_output_path_is_to_be_computed() {
        let sd = StoreDir::default();
        let read = |out: &str| {
            let json = format!(
                r#"{{"outputs":{{"out":{out}}},{SINGLE_BODY},"env":{{"name":"single","out":""}}}}"#
            );
            parse_show_derivation(&sd, json.as_bytes()).unwrap()[0]
                .1
                .outputs[b"out".as_slice()]
            .clone()
        };
        assert_eq!(read("{}"), DerivationOutput::Deferred);
        assert_eq!(read(r#"{"path":""}"#), DerivationOutput::Deferred);
        // A fixed output with an empty path: computed from its hash, not compared.
        let fixed = read(
            r#"{"path":"","hashAlgo":"sha256","hash":"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"}"#,
        );
        assert!(matches!(fixed, DerivationOutput::CAFixed(_)));
    }

    #[test]
    fn the_name_comes_from_structured_attrs_or_a_fixed_path() {
        let sd = StoreDir::default();
        let name = |json: &str, need| {
            parse_show_derivation_with(&sd, json.as_bytes(), need)
                .map(|d| d[0].1.name.clone())
                .map_err(|e| e.to_string())
        };
        // __structuredAttrs: env has no `name`, env.__json has (as nix-instantiate writes).
        let structured = format!(
            r#"{{"outputs":{{"out":{{}}}},{SINGLE_BODY},"env":{{"__json":"{{\"name\":\"structured\",\"outputs\":[\"out\"]}}","out":""}}}}"#
        );
        assert_eq!(name(&structured, Name::Required).unwrap(), "structured");
        let bad = structured.replace(r#"{\"name"#, r#"{\"nam"#);
        assert!(name(&bad, Name::Required)
            .unwrap_err()
            .contains("cannot tell the derivation's name"));
        assert_eq!(name(&bad, Name::Optional).unwrap(), "");
        let broken = structured.replace(r#"{\"name"#, r#"{name"#);
        assert!(name(&broken, Name::Required)
            .unwrap_err()
            .starts_with("env.__json: invalid JSON at byte 1"));
        // A fixed output's path is named after the derivation.
        let fixed = format!(
            r#"{{"outputs":{{"out":{{"path":"/nix/store/wwklwj0a26pz90f6l7adic854r8mff8v-fixed-flat","hashAlgo":"sha256","hash":"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"}}}},{SINGLE_BODY},"env":{{}}}}"#
        );
        assert_eq!(name(&fixed, Name::Optional).unwrap(), "fixed-flat");
        // ... and is checked against the hash like any given fixed path.
        let wrong = fixed.replace("-fixed-flat", "-other");
        assert!(name(&wrong, Name::Optional)
            .unwrap_err()
            .contains("does not match the fixed output's hash"));
        // Without a path, a nameless fixed output cannot be printed.
        let no_path = fixed.replace(
            r#""path":"/nix/store/wwklwj0a26pz90f6l7adic854r8mff8v-fixed-flat","#,
            "",
        );
        assert_eq!(
            name(&no_path, Name::Optional).unwrap_err(),
            "outputs.out: the path of a fixed output depends on the derivation's name: give \
             it as a 'name' field, env.name or this output's 'path'"
        );
    }
}
