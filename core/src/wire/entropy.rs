//! The entropy-coded quantizer of `residual-entropy` (`Quant::Entropy`): a uniform scalar
//! quantizer with one step per tensor, its integer codes range-coded (constriction) under a
//! two-sided geometric (discrete Laplace) model picked from a fixed family.
//!
//! The block quantizers spend the same bits on every element; the changes a residual codec sends
//! are mostly near zero, and a uniform step with an entropy coder spends on each element what its
//! value costs under the model (a zero code well under a bit). The step is a fraction of the
//! *tensor's* RMS rather than of the residual's, so every tensor is reconstructed to about the same
//! signal-to-noise ratio whatever its change: the distortion is spread evenly and the rate follows
//! the change.
//!
//! Payload: the step (f32, little-endian), the model's index (one byte), then the range coder's
//! 32-bit words (little-endian). The models are built in integer arithmetic from constants, so
//! both ends, on any platform, hold the same tables bit for bit.

use std::sync::OnceLock;

use constriction::stream::model::DefaultContiguousCategoricalEntropyModel;
use constriction::stream::queue::{DefaultRangeDecoder, DefaultRangeEncoder};
use constriction::stream::{Decode, Encode};

/// The largest code magnitude; `step_for` never picks a step that clips a finite value (a
/// caller's own step may: the clipped part is then the next step's residual).
pub const MAX_CODE: i32 = 255;
const SYMBOLS: usize = 2 * MAX_CODE as usize + 1;
/// The models' fixed-point precision (constriction's default for u32 words).
const PRECISION: u32 = 24;
/// Bytes before the coder's words: the step and the model index.
const HEADER: usize = 5;

/// The family of models: mean code magnitudes 0.02 · 1.3^j, j = 0..32 (0.02 to ≈ 69).
const MODELS: usize = 32;

type Model = DefaultContiguousCategoricalEntropyModel;

struct Family {
    models: Vec<Model>,
    /// Bits of code magnitude a (0..=MAX_CODE) under each model, for the encoder's choice.
    bits: Vec<Vec<f64>>,
}

fn family() -> &'static Family {
    static FAMILY: OnceLock<Family> = OnceLock::new();
    FAMILY.get_or_init(|| {
        let mut models = Vec::with_capacity(MODELS);
        let mut bits = Vec::with_capacity(MODELS);
        let mut mean = 0.02f64;
        for _ in 0..MODELS {
            let probs = geometric_fixed_point(mean);
            let total = f64::from(1u32 << PRECISION);
            bits.push(
                (0..=MAX_CODE as usize)
                    .map(|a| -(f64::from(probs[MAX_CODE as usize + a]) / total).log2())
                    .collect(),
            );
            // The probabilities are nonzero and sum to 2^24 by construction.
            match Model::from_nonzero_fixed_point_probabilities(&probs, false) {
                Ok(m) => models.push(m),
                Err(()) => unreachable!("geometric_fixed_point sums to 2^PRECISION"),
            }
            mean *= 1.3;
        }
        Family { models, bits }
    })
}

/// Fixed-point probabilities (each ≥ 1, summing to 2^24) of the codes −MAX_CODE..=MAX_CODE under
/// the two-sided geometric law p(q) ∝ θ^|q| with mean |q| = `mean`. Only IEEE-exact operations
/// (+, −, ×, ÷, √) feed the integers, so every platform computes the same table.
fn geometric_fixed_point(mean: f64) -> Vec<u32> {
    // E|q| = 2θ / (1 − θ²)  ⇔  θ = (√(1 + m²) − 1) / m.
    let theta = ((1.0 + mean * mean).sqrt() - 1.0) / mean;
    let mut w = vec![0f64; MAX_CODE as usize + 1];
    let mut p = 1.0f64;
    for wa in w.iter_mut() {
        *wa = p;
        p *= theta;
    }
    let sum: f64 = w[0] + 2.0 * w[1..].iter().sum::<f64>();
    let spare = (1u64 << PRECISION) - SYMBOLS as u64;
    let mut probs = vec![0u32; SYMBOLS];
    let mut used = 0u64;
    for (i, p) in probs.iter_mut().enumerate() {
        let a = (i as i64 - i64::from(MAX_CODE)).unsigned_abs() as usize;
        // Below `spare` (< 2^24) because w[a] ≤ sum.
        let share = (w[a] / sum * spare as f64).floor() as u64;
        *p = 1 + share as u32;
        used += u64::from(*p);
    }
    // The rounding remainder goes to the zero code.
    probs[MAX_CODE as usize] += ((1u64 << PRECISION) - used) as u32;
    probs
}

/// The code of `v` at `step` (0 for a zero or non-finite step, or a non-finite value).
fn code(v: f32, step: f32) -> i32 {
    if !(step > 0.0 && step.is_finite()) {
        return 0;
    }
    // `as` saturates and maps NaN to 0; the clamp keeps the alphabet.
    ((v / step).round() as i32).clamp(-MAX_CODE, MAX_CODE)
}

/// The payload of `x` at `step` (a nonzero code `q` moves one toward zero unless
/// |v| / step ≥ |q| − 0.5 + `dead_zone`), and writes into `recon` what the receiver will decode.
pub fn encode(x: &[f32], step: f32, dead_zone: f32, recon: &mut [f32]) -> Vec<u8> {
    let step = if step > 0.0 && step.is_finite() {
        step
    } else {
        0.0
    };
    let codes: Vec<i32> = x
        .iter()
        .map(|&v| {
            let q = code(v, step);
            if q != 0 && (v.abs() / step) < q.unsigned_abs() as f32 - 0.5 + dead_zone {
                q - q.signum()
            } else {
                q
            }
        })
        .collect();
    let fam = family();
    let mut hist = vec![0u64; MAX_CODE as usize + 1];
    for &q in &codes {
        hist[q.unsigned_abs() as usize] += 1;
    }
    let cost = |j: usize| -> f64 {
        hist.iter()
            .zip(&fam.bits[j])
            .filter(|(h, _)| **h > 0)
            .map(|(h, b)| *h as f64 * b)
            .sum()
    };
    let best = (0..MODELS)
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(0);
    let mut coder = DefaultRangeEncoder::new();
    let symbols = codes.iter().map(|&q| (q + MAX_CODE) as usize);
    // Every symbol lies in the alphabet and has a nonzero probability, so encoding cannot fail;
    // should it, the payload would not decode and the peer would refuse it.
    let _ = coder.encode_iid_symbols(symbols, &fam.models[best]);
    let words = coder.into_compressed().unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + 4 * words.len());
    out.extend_from_slice(&step.to_le_bytes());
    out.push(best as u8);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    for (r, &q) in recon.iter_mut().zip(&codes) {
        *r = q as f32 * step;
    }
    out
}

/// The longest payload of `n` elements (24 bits per symbol at worst, plus the coder's flush), or
/// None on overflow.
pub fn max_payload_len(n: usize) -> Option<usize> {
    n.checked_add(2)?.checked_mul(4)?.checked_add(HEADER)
}

/// A payload that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntropyError(pub &'static str);

/// Decodes `payload` into `out` (its length is the element count, bounded by the caller).
pub fn decode(payload: &[u8], out: &mut [f32]) -> Result<(), EntropyError> {
    if payload.len() < HEADER || !(payload.len() - HEADER).is_multiple_of(4) {
        return Err(EntropyError("entropy payload length"));
    }
    if max_payload_len(out.len()).is_none_or(|m| payload.len() > m) {
        return Err(EntropyError(
            "entropy payload longer than its elements allow",
        ));
    }
    let step = f32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if !(step >= 0.0 && step.is_finite()) {
        return Err(EntropyError("entropy step not finite and non-negative"));
    }
    let model = family()
        .models
        .get(usize::from(payload[4]))
        .ok_or(EntropyError("entropy model index"))?;
    let words: Vec<u32> = payload[HEADER..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut decoder =
        DefaultRangeDecoder::from_compressed(words).map_err(|_| EntropyError("entropy stream"))?;
    let mut symbols = decoder.decode_iid_symbols(out.len(), model);
    for o in out.iter_mut() {
        let s = symbols
            .next()
            .ok_or(EntropyError("entropy stream ended"))?
            .map_err(|_| EntropyError("entropy stream"))?;
        *o = (s as i32 - MAX_CODE) as f32 * step;
    }
    Ok(())
}

/// How fine each direction quantizes: the step as a fraction of the tensor's RMS, and the dead
/// zone. The phone's uplink is the narrow one (81 vs 341 Mbit/s on the 5g profile), so requests
/// take a coarse step with a dead zone and replies a fine one: the error budget of a picture is
/// spent where bits are dear (docs/BENCHMARKS.md, "Entropy-coded residuals", has the sweep).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fineness {
    pub step_fraction: f32,
    pub dead_zone: f32,
}

/// Requests (phone to server).
pub const REQUESTS: Fineness = Fineness {
    step_fraction: 0.2,
    dead_zone: 0.25,
};

/// Replies (server to phone).
pub const REPLIES: Fineness = Fineness {
    step_fraction: 0.0075,
    dead_zone: 0.0,
};

/// The payload of `x` itself at `fineness` (its step a fraction of `x`'s RMS).
pub fn encode_tensor(x: &[f32], fineness: Fineness, recon: &mut [f32]) -> Vec<u8> {
    encode(
        x,
        fineness.step_fraction * rms(x),
        fineness.dead_zone,
        recon,
    )
}

/// The root mean square of `x`'s finite elements (0 when there are none).
pub fn rms(x: &[f32]) -> f32 {
    let (s, n) = x
        .iter()
        .filter(|v| v.is_finite())
        .fold((0f64, 0usize), |(s, n), v| {
            (s + f64::from(*v) * f64::from(*v), n + 1)
        });
    if n == 0 {
        return 0.0;
    }
    (s / n as f64).sqrt() as f32
}

/// The step for coding `x` (a tensor, or its change) at `fineness` of the tensor whose RMS is
/// `rms`: never so fine that a finite element of `x` would pass the largest code, so nothing is
/// clipped (a clipped outlier would take many steps of error feedback to catch up).
pub fn step_for(x: &[f32], rms: f32, fineness: Fineness) -> f32 {
    let max = x
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    (fineness.step_fraction * rms).max(max / MAX_CODE as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values roughly uniform in [-scale, scale) (a 64-bit LCG's top bits).
    fn seeded(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn tables_sum_to_the_precision() {
        let mut mean = 0.02;
        for _ in 0..MODELS {
            let p = geometric_fixed_point(mean);
            assert_eq!(p.iter().map(|v| u64::from(*v)).sum::<u64>(), 1 << PRECISION);
            assert!(p.iter().all(|v| *v >= 1));
            mean *= 1.3;
        }
    }

    #[test]
    fn round_trip_within_half_a_step_and_small_codes_are_cheap() {
        let x = seeded(4096, 3, 1.0);
        let step = 0.05;
        let mut recon = vec![0.0; x.len()];
        let p = encode(&x, step, 0.0, &mut recon);
        let mut y = vec![9.0; x.len()];
        decode(&p, &mut y).unwrap();
        assert_eq!(y, recon);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= step * 0.5 + 1e-6);
        }
        // Uniform on [−20, 20] steps: log2(41) ≈ 5.4 bits of entropy; a geometric model costs a
        // little more, far less than 8.
        let bits = (p.len() * 8) as f64 / x.len() as f64;
        assert!(bits < 7.0, "{bits}");
        // Mostly-zero codes: well under a bit each.
        let small = seeded(4096, 5, 0.02);
        let p = encode(&small, step, 0.0, &mut recon);
        let bits = (p.len() * 8) as f64 / small.len() as f64;
        assert!(bits < 0.6, "{bits}");
        assert!(p.len() <= max_payload_len(small.len()).unwrap());
    }

    #[test]
    fn clipping_zero_steps_and_hostile_payloads() {
        let mut recon = vec![0.0; 3];
        let p = encode(&[1e9, -1e9, f32::NAN], 1.0, 0.0, &mut recon);
        assert_eq!(recon, vec![255.0, -255.0, 0.0]);
        let mut y = vec![0.0; 3];
        decode(&p, &mut y).unwrap();
        assert_eq!(y, recon);
        let p = encode(&[1.0, 2.0], 0.0, 0.0, &mut recon[..2]);
        decode(&p, &mut y[..2]).unwrap();
        assert_eq!(&y[..2], &[0.0, 0.0]);
        // Wrong lengths, a bad model index, a negative or non-finite step: errors, no panic.
        assert!(decode(&p[..4], &mut y).is_err());
        assert!(decode(&p[..6], &mut y).is_err());
        let mut bad = p.clone();
        bad[4] = MODELS as u8;
        assert!(decode(&bad, &mut y).is_err());
        let mut bad = p.clone();
        bad[..4].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(decode(&bad, &mut y).is_err());
        bad[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(decode(&bad, &mut y).is_err());
        // Any bytes of a valid shape decode to something or to an error, never a panic.
        let mut s = 7u64;
        for len in 0..64usize {
            let junk: Vec<u8> = (0..HEADER + 4 * len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 32) as u8
                })
                .collect();
            let mut junk = junk;
            junk[..4].copy_from_slice(&0.5f32.to_le_bytes());
            junk[4] %= MODELS as u8;
            let mut out = vec![0.0; 4 * len + 3];
            let _ = decode(&junk, &mut out);
        }
    }
}
