//! Nix's base-32 encoding ("nixbase32").
//!
//! Alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`). The input is read
//! as a little-endian bit string; output character `k` (0 = leftmost) of an `L`-character
//! string holds the 5 bits starting at bit `5 * (L - 1 - k)`, so the *last* character
//! holds the low bits of byte 0. There is no padding: an `n`-byte value takes
//! `ceil(8n / 5)` characters, and on decoding the bits past `8n` must be zero.

use thiserror::Error;

/// The 32 symbols, index = value.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Reverse table: byte → value, or `0xff` for bytes outside the alphabet.
const DECODE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Why a string is not the nixbase32 form of a value of the expected size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("nixbase32 string has length {got}, expected {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("invalid nixbase32 character {byte:?} at position {pos}")]
    InvalidChar { pos: usize, byte: char },
    #[error("nixbase32 string has non-zero bits beyond the end of the value")]
    NonZeroExcessBits,
}

/// Number of characters needed for `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (8 * n - 1) / 5 + 1
    }
}

/// True if `c` is in the alphabet.
pub fn is_valid_char(c: u8) -> bool {
    DECODE[c as usize] != 0xff
}

/// Encode `bytes` into `out` (which must be exactly `encoded_len(bytes.len())` long).
fn encode_into(bytes: &[u8], out: &mut [u8]) {
    let len = out.len();
    for (k, slot) in out.iter_mut().enumerate() {
        let b = 5 * (len - 1 - k);
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            // `<<` on u16 so that j == 0 does not overflow the shift.
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        *slot = ALPHABET[((lo | hi) & 0x1f) as usize];
    }
}

/// Encode bytes as nixbase32.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = vec![0u8; encoded_len(bytes.len())];
    encode_into(bytes, &mut out);
    // The alphabet is ASCII.
    out.into_iter().map(char::from).collect()
}

/// Decode a nixbase32 string into exactly `N` bytes, strictly: wrong length, a
/// character outside the alphabet or set bits past `8 * N` are errors.
pub fn decode_fixed<const N: usize>(s: &[u8]) -> Result<[u8; N], DecodeError> {
    let mut out = [0u8; N];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decode into `out`, whose length fixes the expected string length.
pub fn decode_into(s: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let n = out.len();
    let expected = encoded_len(n);
    if s.len() != expected {
        return Err(DecodeError::WrongLength {
            expected,
            got: s.len(),
        });
    }
    out.fill(0);
    for (k, &c) in s.iter().enumerate() {
        let digit = DECODE[c as usize];
        if digit == 0xff {
            return Err(DecodeError::InvalidChar {
                pos: k,
                byte: char::from(c),
            });
        }
        let b = 5 * (expected - 1 - k);
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = ((digit as u16) >> (8 - j)) as u8;
        if i + 1 < n {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroExcessBits);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Vectors from nix-2.8-vectors/hashes.txt (nix-hash --to-base32).
    #[test]
    fn vectors() {
        let cases = [
            (
                "0100000000000000000000000000000000000000000000000000000000000000",
                "0000000000000000000000000000000000000000000000000001",
            ),
            (
                "0000000000000000000000000000000000000000000000000000000000000080",
                "1000000000000000000000000000000000000000000000000000",
            ),
            (
                "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
                "1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
            ),
            (
                "ff00000000000000000000000000000000000000",
                "0000000000000000000000000000007z",
            ),
            (
                "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
                "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            ),
        ];
        for (h, b32) in cases {
            let bytes = hex(h);
            assert_eq!(encode(&bytes), b32, "{h}");
            let mut back = vec![0; bytes.len()];
            decode_into(b32.as_bytes(), &mut back).unwrap();
            assert_eq!(back, bytes);
        }
    }

    #[test]
    fn strict_decoding() {
        let mut out = [0u8; 32];
        // 'e' is not in the alphabet.
        let bad = "e0xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
        assert!(matches!(
            decode_into(bad.as_bytes(), &mut out),
            Err(DecodeError::InvalidChar { pos: 0, byte: 'e' })
        ));
        // A leading '2' sets bit 257 of a 256-bit value.
        let excess = "20xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
        assert_eq!(
            decode_into(excess.as_bytes(), &mut out),
            Err(DecodeError::NonZeroExcessBits)
        );
        assert!(matches!(
            decode_into(b"abc", &mut out),
            Err(DecodeError::WrongLength {
                expected: 52,
                got: 3
            })
        ));
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    proptest::proptest! {
        #[test]
        fn roundtrip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 1..80)) {
            let s = encode(&bytes);
            let mut back = vec![0; bytes.len()];
            decode_into(s.as_bytes(), &mut back).unwrap();
            proptest::prop_assert_eq!(back, bytes);
        }
    }
}
