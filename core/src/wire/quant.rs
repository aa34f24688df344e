//! Block quantizers of the shard codecs (`vocab::precision::ShardCodec`): a tensor's elements,
//! in order, cut into blocks of `BLOCK`, each block one f16 scale and a code per element. The
//! payload is all the scales, then all the codes packed low bits first. Its length follows
//! from the element count alone (`Quant::payload_len`), so a decoder checks it before it
//! allocates anything.
//!
//! Both ends dequantize with the same function, so a sender knows bit for bit what the receiver
//! reconstructs: that is what keeps the residual codecs' references equal on both ends.

use half::f16;

/// Elements per scale.
pub const BLOCK: usize = 64;

/// A quantizer: how many bits per element and how a code maps to a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    /// q ∈ [-127, 127], value q·s, s = max|x| / 127.
    Int8,
    /// q ∈ [-7, 7], value q·s, s = max|x| / 7.
    Int4,
    /// Four levels, mid-rise: value (2q − 3)·s for q ∈ 0..4, s = max|x| / 3.
    Int2,
    /// The sign alone, value ±s, s = mean |x| (the 1-bit codec of CompactFusion).
    Sign,
    /// One step per tensor, range-coded codes (`wire::entropy`): the payload's length varies,
    /// bounded by `payload_len`.
    Entropy,
}

impl Quant {
    pub fn bits(self) -> usize {
        match self {
            Quant::Int8 => 8,
            Quant::Int4 => 4,
            Quant::Int2 => 2,
            Quant::Sign => 1,
            // Not a fixed width: `payload_len` is a bound.
            Quant::Entropy => 32,
        }
    }

    /// Whether the payload's length is exactly `payload_len` (else at most it).
    pub fn fixed_len(self) -> bool {
        self != Quant::Entropy
    }

    /// Whether a payload of `len` bytes fits `expected` (`payload_len`, or the raw size when
    /// `quant` is None): exactly, or at most for an entropy payload.
    pub fn payload_fits(quant: Option<Quant>, len: usize, expected: usize) -> bool {
        match quant {
            Some(q) if !q.fixed_len() => len <= expected,
            _ => len == expected,
        }
    }

    /// The tag on the wire (docs/PROTOCOL.md §8).
    pub fn tag(self) -> u8 {
        match self {
            Quant::Int8 => 1,
            Quant::Int4 => 2,
            Quant::Int2 => 3,
            Quant::Sign => 4,
            Quant::Entropy => 5,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Quant> {
        [
            Quant::Int8,
            Quant::Int4,
            Quant::Int2,
            Quant::Sign,
            Quant::Entropy,
        ]
        .into_iter()
        .find(|q| q.tag() == tag)
    }

    /// Payload bytes of `n` elements (scales and codes; the most an entropy payload may take),
    /// or None on overflow.
    pub fn payload_len(self, n: usize) -> Option<usize> {
        if self == Quant::Entropy {
            return super::entropy::max_payload_len(n);
        }
        let scales = n.div_ceil(BLOCK).checked_mul(2)?;
        let codes = n.checked_mul(self.bits())?.div_ceil(8);
        scales.checked_add(codes)
    }

    /// The payload of `x` (an entropy payload at the requests' fineness).
    pub fn quantize(self, x: &[f32]) -> Vec<u8> {
        if self == Quant::Entropy {
            let mut recon = vec![0f32; x.len()];
            return super::entropy::encode_tensor(x, super::entropy::REQUESTS, &mut recon);
        }
        let n = x.len();
        let blocks = n.div_ceil(BLOCK);
        let mut out = vec![0u8; self.payload_len(n).unwrap_or(0)];
        let (scales, codes) = out.split_at_mut(blocks * 2);
        let bits = self.bits();
        let per_byte = 8 / bits;
        let mask = (1u16 << bits) - 1;
        for (b, block) in x.chunks(BLOCK).enumerate() {
            let s = self.scale(block);
            scales[2 * b..2 * b + 2].copy_from_slice(&s.to_le_bytes());
            let s = s.to_f32();
            for (i, &v) in block.iter().enumerate() {
                let code = u16::from(self.code(v, s)) & mask;
                let at = b * BLOCK + i;
                // The shift is below 8: `at % per_byte` < 8 / bits.
                codes[at / per_byte] |= (code << ((at % per_byte) * bits)) as u8;
            }
        }
        out
    }

    /// Writes the values of `payload` into `out` (its length is the element count). The payload
    /// must be `payload_len(out.len())` bytes; the caller has checked that.
    pub fn dequantize(self, payload: &[u8], out: &mut [f32]) -> Result<(), LengthError> {
        if self == Quant::Entropy {
            return super::entropy::decode(payload, out).map_err(|_| LengthError);
        }
        let n = out.len();
        if self.payload_len(n) != Some(payload.len()) {
            return Err(LengthError);
        }
        let blocks = n.div_ceil(BLOCK);
        let (scales, codes) = payload.split_at(blocks * 2);
        let bits = self.bits();
        let per_byte = 8 / bits;
        // At most 0xff: `bits` ≤ 8.
        let mask = ((1u16 << bits) - 1) as u8;
        for (b, block) in out.chunks_mut(BLOCK).enumerate() {
            let s = f16::from_le_bytes([scales[2 * b], scales[2 * b + 1]]).to_f32();
            for (i, dst) in block.iter_mut().enumerate() {
                let at = b * BLOCK + i;
                let code = (codes[at / per_byte] >> ((at % per_byte) * bits)) & mask;
                *dst = self.value(code, s);
            }
        }
        Ok(())
    }

    /// A block's scale, rounded to f16 (the value both ends use). Non-finite or huge inputs
    /// give the largest f16 scale rather than ∞.
    fn scale(self, block: &[f32]) -> f16 {
        let s = match self {
            // The MSE-optimal mean |x|. One bit moves every element by exactly ±s a step, so an
            // element changing faster than s falls behind (tests/shard_codec.rs measures it); a
            // larger scale (1.25 × RMS) follows a synthetic drift but scored 11.9 dB against
            // 23.5 dB on the tiny model (docs/BENCHMARKS.md, "Shard codecs", how measured).
            Quant::Sign => block.iter().map(|v| v.abs()).sum::<f32>() / block.len().max(1) as f32,
            _ => {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                max / match self {
                    Quant::Int8 => 127.0,
                    Quant::Int4 => 7.0,
                    _ => 3.0,
                }
            }
        };
        if s.is_finite() {
            f16::from_f32(s).min(f16::MAX)
        } else {
            f16::MAX
        }
    }

    /// The code of `v` under scale `s` (`s` = 0 gives the zero code).
    fn code(self, v: f32, s: f32) -> u8 {
        let r = if s > 0.0 { v / s } else { 0.0 };
        match self {
            // `as` saturates (NaN → 0); the clamp keeps the symmetric range.
            Quant::Int8 => (r.round().clamp(-127.0, 127.0) as i8) as u8,
            Quant::Int4 => (r.round().clamp(-7.0, 7.0) as i8 + 8) as u8,
            Quant::Int2 => ((r + 3.0) / 2.0).round().clamp(0.0, 3.0) as u8,
            Quant::Sign => u8::from(v < 0.0),
            Quant::Entropy => 0,
        }
    }

    fn value(self, code: u8, s: f32) -> f32 {
        match self {
            Quant::Int8 => f32::from(code as i8) * s,
            Quant::Int4 => f32::from(code as i8 - 8) * s,
            Quant::Int2 => f32::from(2 * code as i8 - 3) * s,
            Quant::Sign => {
                if code == 1 {
                    -s
                } else {
                    s
                }
            }
            Quant::Entropy => 0.0,
        }
    }
}

/// A payload whose length is not the one its element count implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthError;

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        // xorshift; roughly uniform in [-2, 2).
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn payload_lengths() {
        assert_eq!(Quant::Int8.payload_len(64), Some(2 + 64));
        assert_eq!(Quant::Int4.payload_len(65), Some(4 + 33));
        assert_eq!(Quant::Int2.payload_len(128), Some(4 + 32));
        assert_eq!(Quant::Sign.payload_len(1), Some(2 + 1));
        assert_eq!(Quant::Sign.payload_len(0), Some(0));
        assert_eq!(Quant::Int8.payload_len(usize::MAX), None);
    }

    #[test]
    fn round_trip_error_is_bounded_by_the_step() {
        let x = seeded(1000, 7);
        for (q, steps) in [(Quant::Int8, 127.0), (Quant::Int4, 7.0)] {
            let p = q.quantize(&x);
            let mut y = vec![0.0; x.len()];
            q.dequantize(&p, &mut y).unwrap();
            for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
                let max = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Half a step, plus the f16 rounding of the scale times the largest code.
                let bound = max / steps * 0.5 + max * 1e-3;
                for (a, c) in xb.iter().zip(yb) {
                    assert!((a - c).abs() <= bound, "{q:?} block {b}: {a} vs {c}");
                }
            }
        }
        // Sign: every value keeps its sign and takes the block's mean magnitude.
        let p = Quant::Sign.quantize(&x);
        let mut y = vec![0.0; x.len()];
        Quant::Sign.dequantize(&p, &mut y).unwrap();
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let s = xb.iter().map(|v| v.abs()).sum::<f32>() / xb.len() as f32;
            for (a, c) in xb.iter().zip(yb) {
                assert_eq!(a.is_sign_negative(), c.is_sign_negative());
                assert!((c.abs() - s).abs() <= s * 1e-3);
            }
        }
        // Int2: the levels ±s, ±3s with s = max/3; nearest level.
        let p = Quant::Int2.quantize(&x);
        Quant::Int2.dequantize(&p, &mut y).unwrap();
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let s = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 3.0;
            for (a, c) in xb.iter().zip(yb) {
                assert!((a - c).abs() <= s * 1.001, "{a} vs {c}");
            }
        }
    }

    #[test]
    fn zeros_hostile_scales_and_lengths() {
        let z = vec![0.0f32; 100];
        for q in [Quant::Int8, Quant::Int4, Quant::Int2, Quant::Sign] {
            let p = q.quantize(&z);
            let mut y = vec![1.0; 100];
            q.dequantize(&p, &mut y).unwrap();
            // Int2 has no zero level: a zero block decodes to ±0·s = 0 because s = 0.
            assert!(y.iter().all(|v| *v == 0.0), "{q:?}");
            assert_eq!(q.dequantize(&p[1..], &mut y), Err(LengthError));
            assert_eq!(Quant::from_tag(q.tag()), Some(q));
        }
        // Non-finite inputs give the largest scale, never a panic.
        let p = Quant::Int8.quantize(&[f32::NAN, f32::INFINITY, 1.0]);
        let mut y = vec![0.0; 3];
        Quant::Int8.dequantize(&p, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        // Any payload of the right length decodes (a hostile scale is just a value).
        let mut p = vec![0xffu8; Quant::Int4.payload_len(70).unwrap()];
        p[0] = 0x00;
        let mut y = vec![0.0; 70];
        Quant::Int4.dequantize(&p, &mut y).unwrap();
        assert_eq!(Quant::from_tag(0), None);
    }
}
