//! The entropy-coded residual codec (`residual-entropy`, `wire::entropy`, docs/PROTOCOL.md §8) on
//! seeded tensors between two session ends and through the wire encoding: its error bound in
//! each direction (requests coarse with a dead zone, replies fine), error feedback over 30 steps
//! against open-loop summation, its key frames, its bits, and the refusal of hostile payloads.

use veil_core::vocab::precision::{ShardCodec, WireDtype};
use veil_core::wire::codec::{decode_counted, encode_counted, WireError};
use veil_core::wire::entropy::{self, REPLIES, REQUESTS};
use veil_core::wire::quant::Quant;
use veil_core::wire::references::{CodecEnd, SendAs};
use veil_core::wire::{Coding, Compression, Limits, Message, RefMode, ReplyCoding, WireTensor};

const SHAPE: [usize; 4] = [2, 8, 16, 16];

/// xorshift normals (Box–Muller) from `seed`.
fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn raw(x: &[f32]) -> WireTensor {
    WireTensor::raw(
        WireDtype::F32,
        SHAPE.to_vec(),
        x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A slowly moving activation: a base field plus `t` steps of drift and fresh noise.
fn trajectory(steps: usize) -> Vec<Vec<f32>> {
    let n: usize = SHAPE.iter().product();
    let base = normals(n, 1);
    let drift = normals(n, 2);
    (0..steps)
        .map(|t| {
            let noise = normals(n, 100 + t as u64);
            base.iter()
                .zip(&drift)
                .zip(&noise)
                .map(|((b, d), e)| b + 0.05 * t as f32 * d + 0.02 * e)
                .collect()
        })
        .collect()
}

/// Carries a coded tensor through the wire encoding (zstd asked for: an entropy payload must
/// travel as it is) and decodes it at `rx`; the values and the payload bytes.
fn through_wire(rx: &mut CodecEnd, coded: WireTensor) -> (Vec<f32>, u64) {
    let msg = Message::Reply {
        outputs: vec![coded],
    };
    let (bytes, sent) = encode_counted(&msg, Compression::Zstd(3)).expect("wire encode");
    let (back, received) = decode_counted(&bytes, &Limits::default()).expect("wire decode");
    assert_eq!(sent, received);
    let Message::Reply { mut outputs } = back else {
        panic!("not a reply")
    };
    let t = rx.decode(outputs.remove(0)).expect("codec decode");
    assert_eq!(t.coding, Coding::default(), "decoded tensors are raw");
    (t.values().expect("values"), sent)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn rms_diff(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// Requests: every element within (½ + dead zone) steps of the truth at every step, the step
/// being `REQUESTS.step_fraction` of that step's RMS, so the error cannot accumulate; summing
/// the same changes quantized open loop drifts far past it. Key frame first, then residuals.
#[test]
fn requests_stay_within_their_step_and_feed_the_error_back() {
    let xs = trajectory(30);
    let (mut tx, mut rx) = (CodecEnd::new(64 << 20, 16), CodecEnd::new(64 << 20, 16));
    let how = SendAs {
        codec: ShardCodec::ResidualEntropy,
        exact: false,
        slot: 4,
    };
    let mut sent_total = 0;
    let mut errors = Vec::new();
    for (t, x) in xs.iter().enumerate() {
        let coded = tx.encode(raw(x), how).expect("encode");
        assert_eq!(coded.coding.quant, Some(Quant::Entropy));
        let mode = if t == 0 {
            RefMode::Keep(4)
        } else {
            RefMode::Residual(4)
        };
        assert_eq!(coded.coding.reference, mode, "step {t}");
        let (y, sent) = through_wire(&mut rx, coded);
        let step = REQUESTS.step_fraction * entropy::rms(x);
        let bound = step * (0.5 + REQUESTS.dead_zone) * 1.0001;
        assert!(
            max_abs_diff(x, &y) <= bound,
            "step {t}: {} > {bound}",
            max_abs_diff(x, &y)
        );
        errors.push(rms_diff(x, &y));
        if t > 0 {
            sent_total += sent;
        }
    }
    // Open loop: the changes quantized alone at the same step and summed.
    let mut open = xs[0].clone();
    for w in xs.windows(2) {
        let d: Vec<f32> = w[1].iter().zip(&w[0]).map(|(p, q)| p - q).collect();
        let mut q = vec![0.0; d.len()];
        let step = REQUESTS.step_fraction * entropy::rms(&w[1]);
        entropy::encode(&d, step, REQUESTS.dead_zone, &mut q);
        for (o, v) in open.iter_mut().zip(q) {
            *o += v;
        }
    }
    let open_err = rms_diff(&xs[29], &open);
    assert!(
        open_err > 3.0 * errors[29],
        "open loop {open_err} vs {}",
        errors[29]
    );
    // The residual steps: well under 2 bits per element (a change of ~0.06 RMS at a step of 0.2
    // RMS codes mostly zeros), against 16 for f16.
    let bits = (sent_total * 8) as f64 / (29 * xs[0].len()) as f64;
    assert!(bits < 2.0, "{bits} bits per element");
    assert_eq!(tx.reference_bytes(), rx.reference_bytes());
}

/// Replies take the fine step and no dead zone, and an exact step travels raw and is kept.
#[test]
fn replies_are_fine_and_exact_steps_are_kept() {
    let xs = trajectory(4);
    let (mut server, mut client) = (CodecEnd::new(64 << 20, 16), CodecEnd::new(64 << 20, 16));
    for (t, x) in xs.iter().enumerate() {
        let coding = ReplyCoding {
            codec: ShardCodec::ResidualEntropy,
            exact: t == 0,
            first_slot: 9,
        };
        let mut out = server
            .encode_replies(vec![raw(x)], &[false], coding)
            .expect("encode replies");
        let (y, _) = through_wire(&mut client, out.remove(0));
        if t == 0 {
            assert_eq!(&y, x, "the exact step is bit-exact");
            continue;
        }
        let bound = REPLIES.step_fraction * entropy::rms(x) * 0.5001;
        assert!(max_abs_diff(x, &y) <= bound, "step {t}");
    }
}

#[test]
fn hostile_entropy_payloads_are_refused() {
    let xs = trajectory(2);
    let mut tx = CodecEnd::new(64 << 20, 16);
    let how = SendAs {
        codec: ShardCodec::ResidualEntropy,
        exact: false,
        slot: 0,
    };
    let key = tx.encode(raw(&xs[0]), how).unwrap();
    let residual = tx.encode(raw(&xs[1]), how).unwrap();
    // A residual without its key frame.
    let mut rx = CodecEnd::new(64 << 20, 16);
    assert!(matches!(
        rx.decode(residual.clone()),
        Err(WireError::Codec(_))
    ));
    let keyed = || {
        let mut r = CodecEnd::new(64 << 20, 16);
        r.decode(key.clone()).unwrap();
        r
    };
    // A bad model index, a non-finite step, a payload past its bound, a truncated stream.
    for corrupt in [
        |d: &mut Vec<u8>| d[4] = 200,
        |d: &mut Vec<u8>| d[..4].copy_from_slice(&f32::INFINITY.to_le_bytes()),
        |d: &mut Vec<u8>| d.extend(std::iter::repeat_n(0, 8 * 1024 * 4)),
        |d: &mut Vec<u8>| d.truncate(3),
    ] {
        let mut bad = residual.clone();
        corrupt(&mut bad.data);
        assert!(matches!(keyed().decode(bad), Err(WireError::Codec(_))));
    }
    keyed().decode(residual.clone()).unwrap();
    // The wire decoder: no payload longer than the bound, and never zstd on an entropy payload.
    let mut long = key.clone();
    long.data
        .resize(Quant::Entropy.payload_len(xs[0].len()).unwrap() + 4, 0);
    assert!(encode_counted(
        &Message::Reply {
            outputs: vec![long]
        },
        Compression::None
    )
    .is_err());
}
