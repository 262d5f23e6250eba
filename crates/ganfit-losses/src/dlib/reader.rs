//! Primitive values of dlib's serialisation format (`dlib/serialize.h`, `dlib/dnn/tensor.h`).
//!
//! * Integers: a control byte whose high bit is the sign and whose low four bits count the
//!   little-endian magnitude bytes that follow (1 to 8). The three bits in between are reserved;
//!   dlib never writes them, so a set reserved bit means the bytes are not a dlib integer.
//! * Floating point values: the integer mantissa (int64) then the integer exponent (int16),
//!   value = mantissa · 2^exponent; exponents 32000, 32001, 32002 mean +∞, −∞ and NaN.
//! * `bool`: the ASCII byte `'0'` or `'1'`. Strings: unsigned length, then the bytes.
//! * Tensors (version 2): version, then num_samples, k, nr, nc, then that many little-endian
//!   IEEE `f32`s. Alias tensors (version 1): the same four sizes and no data.

use super::DlibFormatError;

type Result<T> = std::result::Result<T, DlibFormatError>;

/// The four sizes dlib gives every tensor: samples, channels (`k`), rows and columns.
pub(crate) type Dims = [usize; 4];

/// A dense dlib tensor read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DlibTensor {
    pub dims: Dims,
    pub data: Vec<f32>,
}

/// Cursor over the bytes of a dlib file; every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

const FLOAT_INF: i64 = 32000;
const FLOAT_NEG_INF: i64 = 32001;
const FLOAT_NAN: i64 = 32002;

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Byte offset of the next read.
    pub fn offset(&self) -> usize {
        self.pos
    }

    pub fn malformed(&self, offset: usize, what: &str, detail: String) -> DlibFormatError {
        DlibFormatError::Malformed {
            offset,
            what: what.to_string(),
            detail,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| DlibFormatError::Truncated {
                offset: self.pos,
                needed: n,
                available: self.bytes.len() - self.pos,
                what: what.to_string(),
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// A signed integer of dlib's variable-length encoding, checked to lie in `[min, max]`.
    pub fn int(&mut self, what: &str, min: i64, max: i64) -> Result<i64> {
        let start = self.pos;
        let control = self.take(1, what)?[0];
        let negative = control & 0x80 != 0;
        let len = usize::from(control & 0x0F);
        if control & 0x70 != 0 || len == 0 || len > 8 {
            return Err(self.malformed(
                start,
                what,
                format!("byte 0x{control:02x} is not a dlib integer control byte"),
            ));
        }
        let magnitude = self
            .take(len, what)?
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let value = i64::try_from(magnitude)
            .ok()
            .map(|m| if negative { -m } else { m })
            .filter(|v| (min..=max).contains(v));
        value.ok_or_else(|| {
            let sign = if negative { "-" } else { "" };
            self.malformed(
                start,
                what,
                format!("value {sign}{magnitude} is outside [{min}, {max}]"),
            )
        })
    }

    /// An `int` field (32-bit signed in dlib).
    pub fn int32(&mut self, what: &str) -> Result<i64> {
        self.int(what, i64::from(i32::MIN), i64::from(i32::MAX))
    }

    /// A non-negative size (`long` or `size_t` in dlib) that must fit in memory.
    pub fn size(&mut self, what: &str) -> Result<usize> {
        let max = i64::try_from(usize::MAX).unwrap_or(i64::MAX);
        let value = self.int(what, 0, max)?;
        Ok(usize::try_from(value).unwrap_or(usize::MAX))
    }

    /// A floating point value (float, double), as dlib's mantissa/exponent pair.
    pub fn float(&mut self, what: &str) -> Result<f64> {
        let start = self.pos;
        if let Some(&first) = self.bytes.get(self.pos)
            && first & 0x70 != 0
        {
            return Err(self.malformed(
                start,
                what,
                "the value uses dlib's pre-2016 text encoding of floats, which this reader does \
                 not support; re-save the model with a current dlib"
                    .into(),
            ));
        }
        let mantissa = self.int(what, i64::MIN + 1, i64::MAX)?;
        let exponent = self.int(what, i64::from(i16::MIN), i64::from(i16::MAX))?;
        Ok(match exponent {
            FLOAT_INF => f64::INFINITY,
            FLOAT_NEG_INF => f64::NEG_INFINITY,
            FLOAT_NAN => f64::NAN,
            e if e > FLOAT_NAN => {
                return Err(self.malformed(
                    start,
                    what,
                    format!("exponent {e} is reserved for special values"),
                ));
            }
            // Exponents fit in i16, so powi is exact for the mantissas dlib writes.
            e => mantissa as f64 * 2f64.powi(e as i32),
        })
    }

    pub fn bool(&mut self, what: &str) -> Result<bool> {
        let start = self.pos;
        match self.take(1, what)?[0] {
            b'0' => Ok(false),
            b'1' => Ok(true),
            other => Err(self.malformed(
                start,
                what,
                format!("byte 0x{other:02x} is neither '0' nor '1'"),
            )),
        }
    }

    /// A string, whose bytes must be UTF-8 (dlib only writes ASCII layer names).
    pub fn string(&mut self, what: &str) -> Result<&'a str> {
        let start = self.pos;
        let len = self.size(what)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map_err(|_| self.malformed(start, what, "the string is not valid UTF-8".into()))
    }

    /// A string that must be one of `expected`; returns which one.
    pub fn tag(&mut self, what: &str, expected: &[&str]) -> Result<usize> {
        let start = self.pos;
        let found = self.string(what)?;
        expected.iter().position(|e| *e == found).ok_or_else(|| {
            self.malformed(
                start,
                what,
                format!("found `{found}`, expected one of {expected:?}"),
            )
        })
    }

    /// An `int` version number that must lie in `[min, max]`.
    pub fn version(&mut self, what: &str, min: i64, max: i64) -> Result<i64> {
        self.int(what, min, max)
    }

    fn dims(&mut self, what: &str) -> Result<(Dims, usize)> {
        let start = self.pos;
        let mut dims = [0usize; 4];
        for d in &mut dims {
            *d = self.size(what)?;
        }
        let count = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| self.malformed(start, what, format!("sizes {dims:?} overflow")))?;
        Ok((dims, count))
    }

    /// A dense tensor (version 2).
    pub fn tensor(&mut self, what: &str) -> Result<DlibTensor> {
        self.version(what, 2, 2)?;
        let (dims, count) = self.dims(what)?;
        // Checking the size against the remaining bytes before allocating keeps a corrupt size
        // field from asking for an absurd amount of memory.
        let byte_len = count.saturating_mul(4);
        let raw = self.take(byte_len, what)?;
        let data = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(DlibTensor { dims, data })
    }

    /// An alias tensor (version 1): a shape describing part of a parameter tensor.
    pub fn alias_tensor(&mut self, what: &str) -> Result<Dims> {
        self.version(what, 1, 1)?;
        Ok(self.dims(what)?.0)
    }

    /// Fails unless every byte has been read.
    pub fn finish(self) -> Result<()> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(DlibFormatError::TrailingBytes {
                offset: self.pos,
                extra: self.bytes.len() - self.pos,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_int(v: i64) -> Vec<u8> {
        let mut magnitude = v.unsigned_abs();
        let mut out = vec![0u8];
        loop {
            out.push((magnitude & 0xFF) as u8);
            magnitude >>= 8;
            if magnitude == 0 {
                break;
            }
        }
        out[0] = (out.len() - 1) as u8 | if v < 0 { 0x80 } else { 0 };
        out
    }

    #[test]
    fn integers_round_trip_through_dlib_encoding() {
        for v in [
            0i64,
            1,
            -1,
            127,
            128,
            255,
            256,
            -70000,
            i64::from(i32::MAX),
            i64::MAX,
        ] {
            let bytes = encode_int(v);
            let mut r = Reader::new(&bytes);
            assert_eq!(r.int("v", i64::MIN + 1, i64::MAX).unwrap(), v);
            r.finish().unwrap();
        }
    }

    #[test]
    fn integers_reject_bad_control_bytes_and_ranges() {
        for bytes in [
            &[0x00u8][..],
            &[0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0x11, 5],
        ] {
            let err = Reader::new(bytes).int("v", 0, 10).unwrap_err();
            assert!(matches!(err, DlibFormatError::Malformed { .. }), "{err}");
        }
        let err = Reader::new(&encode_int(300)).int("v", 0, 255).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let err = Reader::new(&[0x02, 1]).int("v", 0, 10).unwrap_err();
        assert!(matches!(err, DlibFormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn floats_decode_mantissa_and_exponent() {
        // 0.75 = 3 · 2^-2; -inf; and dlib's own encoding of 0.04f (from the model file).
        let mut bytes = encode_int(3);
        bytes.extend(encode_int(-2));
        bytes.extend(encode_int(0));
        bytes.extend(encode_int(32001));
        bytes.extend([0x03, 0x0a, 0xd7, 0xa3, 0x81, 0x1c]);
        let mut r = Reader::new(&bytes);
        assert_eq!(r.float("a").unwrap(), 0.75);
        assert_eq!(r.float("b").unwrap(), f64::NEG_INFINITY);
        assert_eq!(r.float("c").unwrap() as f32, 0.04f32);
        r.finish().unwrap();
        let err = Reader::new(b"0.5 ").float("text").unwrap_err();
        assert!(err.to_string().contains("text encoding"), "{err}");
    }

    #[test]
    fn tensors_check_their_size_before_allocating() {
        let mut bytes = encode_int(2);
        for d in [1i64, 2, 1, 1] {
            bytes.extend(encode_int(d));
        }
        bytes.extend(1.5f32.to_le_bytes());
        bytes.extend((-2f32).to_le_bytes());
        let t = Reader::new(&bytes).tensor("t").unwrap();
        assert_eq!(t.dims, [1, 2, 1, 1]);
        assert_eq!(t.data, vec![1.5, -2.0]);

        // A tensor claiming 2^62 elements must fail cleanly rather than allocate.
        let mut huge = encode_int(2);
        for d in [1i64 << 31, 1 << 31, 1, 1] {
            huge.extend(encode_int(d));
        }
        let err = Reader::new(&huge).tensor("t").unwrap_err();
        assert!(matches!(err, DlibFormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn strings_bools_and_trailing_bytes() {
        let mut bytes = encode_int(4);
        bytes.extend(b"con_1");
        let mut r = Reader::new(&bytes);
        assert_eq!(r.string("s").unwrap(), "con_");
        assert!(r.bool("b").unwrap());
        r.finish().unwrap();
        let mut r = Reader::new(b"x1");
        assert!(r.bool("b").is_err());
        let r = Reader::new(b"1");
        assert!(matches!(
            r.finish(),
            Err(DlibFormatError::TrailingBytes { extra: 1, .. })
        ));
    }
}
