//! The shard codecs (docs/PROTOCOL.md §8) on seeded tensors: each codec's round trip through
//! the wire encoding between two session ends, the bound on its error, error feedback keeping
//! the residual codecs' error from accumulating over steps, and the refusals of hostile input.
//! `residual-entropy` (`wire::entropy`) has its own tests at the end: its error bound in each
//! direction (requests coarse with a dead zone, replies fine), its bits, its hostile payloads.

use veil_core::vocab::precision::{ShardCodec, WireDtype};
use veil_core::wire::codec::{decode_counted, encode_counted, WireError};
use veil_core::wire::entropy::{self, REPLIES, REQUESTS};
use veil_core::wire::quant::{Quant, BLOCK};
use veil_core::wire::references::{CodecEnd, SendAs};
use veil_core::wire::{Coding, Compression, Limits, Message, RefMode, ReplyCoding, WireTensor};

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

fn raw(shape: &[usize], x: &[f32]) -> WireTensor {
    WireTensor::raw(
        WireDtype::F32,
        shape.to_vec(),
        x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// Encodes `t` at `tx`, carries it through the wire codec in a Reply, decodes it at `rx`;
/// returns the values and the payload bytes that travelled.
fn carry(tx: &mut CodecEnd, rx: &mut CodecEnd, t: WireTensor, how: SendAs) -> (Vec<f32>, u64) {
    through_wire(rx, tx.encode(t, how).expect("encode"))
}

/// Carries a coded tensor through the wire codec in a Reply (zstd asked for: an entropy payload
/// must travel as it is) and decodes it at `rx`; the values and the payload bytes.
fn through_wire(rx: &mut CodecEnd, coded: WireTensor) -> (Vec<f32>, u64) {
    let msg = Message::Reply {
        outputs: vec![coded],
    };
    let (bytes, sent) = encode_counted(&msg, Compression::Zstd(3)).expect("wire encode");
    let (back, received) = decode_counted(&bytes, &Limits::default()).expect("wire decode");
    assert_eq!(sent, received, "both ends count the same payload bytes");
    let Message::Reply { mut outputs } = back else {
        panic!("not a reply")
    };
    let t = rx.decode(outputs.remove(0)).expect("codec decode");
    assert_eq!(t.coding, Coding::default(), "decoded tensors are raw");
    (t.values().expect("values"), sent)
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

fn end() -> CodecEnd {
    CodecEnd::new(64 << 20, 1024)
}

const SHAPE: [usize; 4] = [1, 8, 16, 16];

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

#[test]
fn stateless_codecs_round_trip_within_half_a_step() {
    let x = normals(SHAPE.iter().product(), 7);
    for (codec, levels) in [(ShardCodec::Int8, 127.0f32), (ShardCodec::Int4, 7.0)] {
        let (mut a, mut b) = (end(), end());
        let how = SendAs {
            codec,
            exact: false,
            slot: 0,
        };
        let (y, sent) = carry(&mut a, &mut b, raw(&SHAPE, &x), how);
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let max = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (p, q) in xb.iter().zip(yb) {
                assert!((p - q).abs() <= max / levels * 0.5 + max * 1e-3, "{codec}");
            }
        }
        let raw_bytes = x.len() as u64 * 4;
        assert!(sent < raw_bytes, "{codec}: {sent} of {raw_bytes} bytes");
        assert_eq!(
            a.reference_bytes() + b.reference_bytes(),
            0,
            "no references"
        );
        // An exact step travels raw and bit-exact.
        let exact = SendAs { exact: true, ..how };
        let (y, _) = carry(&mut a, &mut b, raw(&SHAPE, &x), exact);
        assert_eq!(y, x);
    }
    // `none` leaves the tensor as it is.
    let (mut a, mut b) = (end(), end());
    let how = SendAs {
        codec: ShardCodec::None,
        exact: false,
        slot: 3,
    };
    assert_eq!(carry(&mut a, &mut b, raw(&SHAPE, &x), how).0, x);
}

/// Residual codecs: both ends' references agree (the receiver reconstructs what the sender
/// predicts), and with error feedback the error stays bounded where summing quantized changes
/// without feedback drifts away. int4 and int2 hold a flat error; sign cannot: one bit moves
/// every element by exactly the block's mean change a step, so elements of this heavy-tailed
/// drift that move faster fall behind and its error keeps growing, slower than linearly. The
/// test pins that too, so a change to it is seen.
#[test]
fn residual_codecs_feed_their_error_back() {
    let xs = trajectory(30);
    for (codec, quant) in [
        (ShardCodec::ResidualInt4, Quant::Int4),
        (ShardCodec::ResidualInt2, Quant::Int2),
        (ShardCodec::ResidualSign, Quant::Sign),
    ] {
        let (mut a, mut b) = (end(), end());
        let mut errors = Vec::new();
        let mut sent_total = 0;
        for (t, x) in xs.iter().enumerate() {
            let how = SendAs {
                codec,
                exact: t == 0,
                slot: 5,
            };
            let (y, sent) = carry(&mut a, &mut b, raw(&SHAPE, x), how);
            if t == 0 {
                assert_eq!(&y, x, "{codec}: the exact step is bit-exact");
            }
            sent_total += sent;
            errors.push(rms(x, &y));
        }
        eprintln!("{codec}: {errors:.3?}");
        // Bounded: below twice one step's change (~0.058 rms); not accumulating: the last ten
        // steps' worst error within 10 % of the ten before.
        let step_change = rms(&xs[1], &xs[0]);
        let worst = |r: std::ops::Range<usize>| errors[r].iter().cloned().fold(0.0, f64::max);
        let (early, mid, late) = (worst(1..10), worst(10..20), worst(20..30));
        if codec == ShardCodec::ResidualSign {
            // Sub-linear growth: the last ten steps add less than the ten before.
            assert!(late - mid < mid - early, "{codec}: {early} {mid} {late}");
            assert!(late < 4.0 * step_change, "{codec}: {late} vs {step_change}");
        } else {
            assert!(
                late < 2.0 * step_change,
                "{codec}: error {late} against a step's change {step_change}"
            );
            assert!(late < 1.1 * mid, "{codec}: error grew from {mid} to {late}");
        }
        assert!(
            a.reference_bytes() == b.reference_bytes() && a.reference_bytes() > 0,
            "{codec}: one reference each way"
        );
        // Open loop (each change quantized alone and summed): the errors add up.
        let mut open = xs[0].clone();
        for w in xs.windows(2) {
            let d: Vec<f32> = w[1].iter().zip(&w[0]).map(|(p, q)| p - q).collect();
            let mut q = vec![0.0; d.len()];
            quant.dequantize(&quant.quantize(&d), &mut q).unwrap();
            for (o, v) in open.iter_mut().zip(q) {
                *o += v;
            }
        }
        let open_err = rms(&xs[29], &open);
        assert!(
            open_err > 2.0 * errors[29],
            "{codec}: open loop {open_err} against feedback {}",
            errors[29]
        );
        // Fewer bits than raw f32 after the first step.
        let raw_total = (xs.len() * xs[0].len() * 4) as u64;
        assert!(
            sent_total * 3 < raw_total,
            "{codec}: {sent_total} of {raw_total}"
        );
    }
}

#[test]
fn a_slot_without_a_reference_gets_a_key_frame() {
    let x = normals(SHAPE.iter().product(), 9);
    let mut a = end();
    let how = SendAs {
        codec: ShardCodec::ResidualSign,
        exact: false,
        slot: 0,
    };
    let t = a.encode(raw(&SHAPE, &x), how).unwrap();
    assert_eq!(t.coding.quant, Some(Quant::Int8));
    assert_eq!(t.coding.reference, RefMode::Keep(0));
    let t = a.encode(raw(&SHAPE, &x), how).unwrap();
    assert_eq!(t.coding.reference, RefMode::Residual(0));
    // Another shape in the same slot: a key frame again.
    let t = a.encode(raw(&[1, 2], &[1.0, 2.0]), how).unwrap();
    assert_eq!(t.coding.reference, RefMode::Keep(0));
}

#[test]
fn hostile_coded_tensors_are_refused() {
    let x = normals(SHAPE.iter().product(), 11);
    let mut tx = end();
    let how = SendAs {
        codec: ShardCodec::ResidualInt4,
        exact: false,
        slot: 2,
    };
    let key = tx.encode(raw(&SHAPE, &x), how).unwrap();
    let residual = tx.encode(raw(&SHAPE, &x), how).unwrap();
    // A residual before its key frame, or against a reference of another shape.
    let mut rx = end();
    assert!(matches!(
        rx.decode(residual.clone()),
        Err(WireError::Codec(_))
    ));
    let mut other = residual.clone();
    other.coding.reference = RefMode::Residual(3);
    rx.decode(key.clone()).unwrap();
    assert!(matches!(rx.decode(other), Err(WireError::Codec(_))));
    assert!(rx.decode(residual.clone()).is_ok());
    // A payload of the wrong length.
    let mut short = residual.clone();
    short.data.pop();
    assert!(rx.decode(short).is_err());
    // References over the byte budget or the slot count are refused before allocating.
    let mut small = CodecEnd::new(1000, 1024);
    assert!(matches!(
        small.decode(key.clone()),
        Err(WireError::Codec(_))
    ));
    assert_eq!(small.reference_bytes(), 0);
    let mut few = CodecEnd::new(64 << 20, 1);
    let tiny = |slot| WireTensor {
        coding: Coding {
            quant: None,
            reference: RefMode::Keep(slot),
        },
        ..raw(&[2], &[1.0, 2.0])
    };
    few.decode(tiny(0)).unwrap();
    few.decode(tiny(0)).unwrap();
    assert!(matches!(few.decode(tiny(1)), Err(WireError::Codec(_))));
    // The wire decoder refuses a quantized tensor that is not f32, or a raw residual.
    let mut wrong = key.clone();
    wrong.dtype = WireDtype::F16;
    let msg = Message::Reply {
        outputs: vec![wrong],
    };
    assert!(encode_counted(&msg, Compression::None).is_err());
    let mut bytes = encode_counted(
        &Message::Reply {
            outputs: vec![raw(&[1], &[1.0])],
        },
        Compression::None,
    )
    .unwrap()
    .0;
    // Header 7, count 4, dtype, compression, rank, dim 4, then coding and reference mode.
    let at = 7 + 4 + 3 + 4;
    bytes[at + 1] = 2;
    bytes.splice(at + 2..at + 2, [0u8; 4]);
    assert!(matches!(
        veil_core::wire::codec::decode(&bytes, &Limits::default()),
        Err(WireError::Codec(_))
    ));
}

/// A Request carrying a key frame and a residual of one slot, and a moments operand that stays
/// raw: the `request_coded` seed of fuzz/seeds/frame_decoder (written when
/// `VEIL_WRITE_FUZZ_SEEDS` is set; otherwise the committed seed must decode to this message).
#[test]
fn coded_request_seed() {
    use veil_core::wire::convert::apply_kind;
    use veil_core::wire::references::coded_inputs;
    use veil_core::wire::{WireCall, WireOp, WireOperand};
    let x = normals(128, 21);
    let call = |op| WireCall {
        op,
        keep_as: Some(1),
        reply: false,
    };
    let mut calls = vec![
        call(WireOp::Identity {
            input: WireOperand::Inline(raw(&[1, 2, 8, 8], &x)),
        }),
        call(WireOp::Apply {
            kind: apply_kind::GROUP_NORM_APPLY,
            layer: "down_blocks.0.resnets.0.norm1".into(),
            operands: vec![
                WireOperand::Inline(raw(&[1, 2, 8, 8], &x)),
                WireOperand::Inline(raw(&[1, 2, 2], &[0.0, 1.0, 0.5, 2.0])),
            ],
            ints: vec![],
            floats: vec![],
        }),
    ];
    let mut end = end();
    for (slot, t) in coded_inputs(&mut calls).into_iter().enumerate() {
        let how = SendAs {
            codec: ShardCodec::ResidualSign,
            exact: false,
            slot: 0,
        };
        let raw_t = std::mem::replace(t, raw(&[], &[]));
        *t = end.encode(raw_t, how).unwrap();
        assert!(slot < 2, "the moments are not coded");
    }
    let msg = Message::Request {
        calls,
        reply_dtype: WireDtype::F16,
        compression: Compression::None,
        reply_coding: ReplyCoding {
            codec: ShardCodec::ResidualSign,
            exact: false,
            first_slot: 0,
        },
    };
    let bytes = encode_counted(&msg, Compression::None).unwrap().0;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/frame_decoder/request_coded"
    );
    if std::env::var_os("VEIL_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::write(path, &bytes).unwrap();
    }
    let committed = std::fs::read(path).expect("the committed seed");
    assert_eq!(committed, bytes);
    // The server's side decodes it: a key frame, then a residual against it, moments raw.
    let Ok((Message::Request { mut calls, .. }, _)) =
        decode_counted(&committed, &Limits::default())
    else {
        panic!("seed does not decode")
    };
    let mut server = self::end();
    server.decode_calls(&mut calls).unwrap();
    assert!(server.reference_bytes() > 0);
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
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
    let mut last = vec![0f32; xs[0].len()];
    for (t, x) in xs.iter().enumerate() {
        let coded = tx.encode(raw(&SHAPE, x), how).expect("encode");
        assert_eq!(coded.coding.quant, Some(Quant::Entropy));
        let mode = if t == 0 {
            RefMode::Keep(4)
        } else {
            RefMode::Residual(4)
        };
        assert_eq!(coded.coding.reference, mode, "step {t}");
        let (y, sent) = through_wire(&mut rx, coded);
        // The step codes the change against the last reconstruction (the tensor itself first).
        let change: Vec<f32> = x.iter().zip(&last).map(|(a, b)| a - b).collect();
        let step = entropy::step_for(&change, entropy::rms(x), REQUESTS);
        assert!(step >= REQUESTS.step_fraction * entropy::rms(x));
        let bound = step * (0.5 + REQUESTS.dead_zone) * 1.0001;
        assert!(
            max_abs_diff(x, &y) <= bound,
            "step {t}: {} > {bound}",
            max_abs_diff(x, &y)
        );
        errors.push(rms(x, &y));
        if t > 0 {
            sent_total += sent;
        }
        last = y;
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
    let open_err = rms(&xs[29], &open);
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

/// Replies take the fine step and no dead zone; a key frame with an outlier of 50 RMS is not
/// clipped (the step widens to fit it), and an exact step travels raw and is kept.
#[test]
fn replies_are_fine_unclipped_and_exact_steps_are_kept() {
    let mut xs = trajectory(5);
    xs[0][7] = 50.0 * entropy::rms(&xs[0]);
    let (mut server, mut client) = (CodecEnd::new(64 << 20, 16), CodecEnd::new(64 << 20, 16));
    let mut last = vec![0f32; xs[0].len()];
    for (t, x) in xs.iter().enumerate() {
        let coding = ReplyCoding {
            codec: ShardCodec::ResidualEntropy,
            exact: t == 2,
            first_slot: 9,
        };
        let mut out = server
            .encode_replies(vec![raw(&SHAPE, x)], &[false], coding)
            .expect("encode replies");
        let (y, _) = through_wire(&mut client, out.remove(0));
        if t == 2 {
            assert_eq!(&y, x, "the exact step is bit-exact");
        } else {
            let change: Vec<f32> = x.iter().zip(&last).map(|(a, b)| a - b).collect();
            let step = entropy::step_for(&change, entropy::rms(x), REPLIES);
            assert!(max_abs_diff(x, &y) <= step * 0.5001, "step {t}");
            if t > 2 {
                // No outlier left to fit: the fine step itself.
                assert!(
                    step <= REPLIES.step_fraction * entropy::rms(x) * 1.0001,
                    "step {t}"
                );
            }
        }
        last = y;
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
    let key = tx.encode(raw(&SHAPE, &xs[0]), how).unwrap();
    let residual = tx.encode(raw(&SHAPE, &xs[1]), how).unwrap();
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
    // A bad model index, a non-finite step, a payload past its bound, one shorter than its
    // header. (A stream that ends early reads as zero words: that decodes, to some values.)
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
    // The wire encoder writes no payload longer than its bound.
    let mut long = key.clone();
    long.data
        .resize(Quant::Entropy.payload_len(xs[0].len()).unwrap() + 4, 0);
    let msg = Message::Reply {
        outputs: vec![long],
    };
    assert!(encode_counted(&msg, Compression::None).is_err());
    // The wire decoder: a one-element entropy tensor, then the same frame marked zstd, then with
    // a payload past the bound (5 + 4 × 3 = 17 bytes for one element).
    let one = WireTensor {
        dtype: WireDtype::F32,
        shape: vec![1],
        data: entropy::encode(&[0.5], 0.25, 0.0, &mut [0.0]),
        coding: Coding {
            quant: Some(Quant::Entropy),
            reference: RefMode::None,
        },
    };
    let msg = Message::Reply { outputs: vec![one] };
    let (frame, _) = encode_counted(&msg, Compression::None).unwrap();
    assert_eq!(decode_counted(&frame, &Limits::default()).unwrap().0, msg);
    // Header 7, count 4, then dtype, compression, rank, dim 4, coding, reference mode, length 8.
    let mut zstd = frame.clone();
    zstd[7 + 4 + 1] = 1;
    assert!(matches!(
        decode_counted(&zstd, &Limits::default()),
        Err(WireError::Codec(_))
    ));
    let len_at = 7 + 4 + 3 + 4 + 2;
    let mut long = frame[..len_at].to_vec();
    long.extend_from_slice(&21u64.to_le_bytes());
    long.extend(std::iter::repeat_n(0u8, 21));
    assert!(matches!(
        decode_counted(&long, &Limits::default()),
        Err(WireError::LengthMismatch { .. })
    ));
}

proptest::proptest! {
    /// Any bytes as an entropy payload of any element count decode or are refused; never a
    /// panic.
    #[test]
    fn hostile_entropy_bytes_never_panic(
        bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
        n in 0usize..40,
    ) {
        let mut out = vec![0f32; n];
        let _ = entropy::decode(&bytes, &mut out);
        // With a valid header: a finite step and a known model.
        let mut b = bytes.clone();
        if b.len() >= 5 {
            b[..4].copy_from_slice(&0.5f32.to_le_bytes());
            b[4] %= 32;
            let _ = entropy::decode(&b, &mut out);
        }
    }
    /// Any coded tensor — any quantizer, reference mode, slot, shape and payload bytes of the
    /// right length — decodes or is refused with a `WireError`; never a panic.
    #[test]
    fn hostile_codings_never_panic(
        tag in 0u8..6,
        mode in 0u8..3,
        slot in 0u32..4,
        dims in proptest::collection::vec(0usize..20, 0..4),
        fill in proptest::num::u8::ANY,
        steps in 1usize..4,
    ) {
        let mut rx = CodecEnd::new(1 << 16, 3);
        let n: usize = dims.iter().product();
        for _ in 0..steps {
            let quant = Quant::from_tag(tag);
            let len = quant.map_or(n * 4, |q| q.payload_len(n).unwrap());
            let t = WireTensor {
                dtype: WireDtype::F32,
                shape: dims.clone(),
                data: vec![fill; len],
                coding: Coding {
                    quant,
                    reference: match mode {
                        0 => RefMode::None,
                        1 => RefMode::Keep(slot),
                        _ => RefMode::Residual(slot),
                    },
                },
            };
            let _ = rx.decode(t);
        }
    }
}
