//! The wire codec: round trips of every message, typed errors on malformed input (never a
//! panic), and the tensor conversions.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use veil_core::client::hybrid::{Accelerations, BatchRedundancy, EarlySteps};
use veil_core::model::layers::GeluKind;
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardReply, ShardRequest};
use veil_core::placement::engine::{Pad, WireDtype};
use veil_core::wire::codec::{decode, encode, WireError};
use veil_core::wire::convert::{
    calls_from_wire, early_steps_from_wire, early_steps_to_wire, reply_from_wire, reply_to_wire,
    request_to_wire,
};
use veil_core::wire::{
    Compression, ErrorCode, Limits, Message, WireCall, WireOp, WireOperand, WireTensor,
    PROTOCOL_VERSION,
};

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn dtype() -> impl Strategy<Value = WireDtype> {
    prop_oneof![
        Just(WireDtype::F32),
        Just(WireDtype::F16),
        Just(WireDtype::Bf16)
    ]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        (-5i32..=19).prop_map(Compression::Zstd),
        (-5i32..=19).prop_map(Compression::ZstdByteSplit),
    ]
}

fn tensor() -> impl Strategy<Value = WireTensor> {
    (dtype(), prop::collection::vec(0usize..5, 0..=4)).prop_flat_map(|(dtype, shape)| {
        let n = shape.iter().product::<usize>() * dtype.size();
        prop_oneof![
            // Random bytes (incompressible) and repetitive bytes (compressible).
            prop::collection::vec(any::<u8>(), n),
            (any::<u8>()).prop_map(move |b| vec![b; n]),
        ]
        .prop_map(move |data| WireTensor {
            dtype,
            shape: shape.clone(),
            data,
            coding: Default::default(),
        })
    })
}

fn operand() -> impl Strategy<Value = WireOperand> {
    prop_oneof![
        tensor().prop_map(WireOperand::Inline),
        any::<u64>().prop_map(WireOperand::Handle),
    ]
}

fn pad() -> impl Strategy<Value = Pad> {
    (0usize..=u32::MAX as usize, 0usize..4, 0usize..4, 0usize..4).prop_map(
        |(top, bottom, left, right)| Pad {
            top,
            bottom,
            left,
            right,
        },
    )
}

fn layer() -> impl Strategy<Value = String> {
    "[a-z0-9_.é]{0,40}"
}

fn wire_op() -> impl Strategy<Value = WireOp> {
    prop_oneof![
        (layer(), operand(), pad()).prop_map(|(layer, input, pad)| WireOp::Conv2d {
            layer,
            input,
            pad
        }),
        (layer(), operand()).prop_map(|(layer, input)| WireOp::GroupNormStats { layer, input }),
        (operand(), operand(), operand(), any::<u32>())
            .prop_map(|(q, k, v, heads)| WireOp::Attention { q, k, v, heads }),
        operand().prop_map(|input| WireOp::Identity { input }),
        any::<u64>().prop_map(|handle| WireOp::Release { handle }),
        // Any kind byte (the codec does not interpret it). At least one operand: a call with no
        // operands and no parameters would be 9 bytes, under the decoder's 11-byte floor per call
        // (no kind takes nothing; see docs/PROTOCOL.md §4.3).
        (
            any::<u8>(),
            layer(),
            prop::collection::vec(operand(), 1..=8),
            prop::collection::vec(any::<u64>(), 0..=8),
            // Any bits but NaN's (NaN != NaN would fail the comparison, not the codec).
            prop::collection::vec(
                any::<u64>()
                    .prop_map(f64::from_bits)
                    .prop_filter("NaN", |f| !f.is_nan()),
                0..=4
            ),
        )
            .prop_map(|(kind, layer, operands, ints, floats)| WireOp::Apply {
                kind,
                layer,
                operands,
                ints,
                floats,
            }),
    ]
}

fn call() -> impl Strategy<Value = WireCall> {
    (wire_op(), any::<Option<u64>>(), any::<bool>()).prop_map(|(op, keep_as, reply)| WireCall {
        op,
        keep_as,
        reply,
    })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::AuthFailed),
        Just(ErrorCode::ModelMismatch),
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::Malformed),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::WrongState),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Internal),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), ".{0,80}", any::<[u8; 32]>()).prop_map(|(version, token, model_id)| {
            Message::Hello {
                version,
                token,
                model_id,
            }
        }),
        (any::<u16>(), any::<[u8; 32]>())
            .prop_map(|(version, model_id)| Message::Welcome { version, model_id }),
        (prop::collection::vec(call(), 0..6), dtype(), compression()).prop_map(
            |(calls, reply_dtype, compression)| Message::Request {
                calls,
                reply_dtype,
                compression,
                reply_coding: Default::default(),
            }
        ),
        prop::collection::vec(tensor(), 0..6).prop_map(|outputs| Message::Reply { outputs }),
        (error_code(), ".{0,80}").prop_map(|(code, message)| Message::Error { code, message }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(msg in message(), c in compression()) {
        let bytes = encode(&msg, c).expect("encode");
        let back = decode(&bytes, &Limits::default()).expect("decode");
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        kind in 0u8..8,
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = b"VEIL".to_vec();
        bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes.push(kind);
        bytes.extend_from_slice(&body);
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        msg in message(),
        c in compression(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = encode(&msg, c).expect("encode");
        if !bytes.is_empty() {
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
        }
        let _ = decode(&bytes, &Limits::default());
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed inputs
// ---------------------------------------------------------------------------------------------

fn sample_request(c: Compression) -> Vec<u8> {
    let t = |shape: Vec<usize>, dtype: WireDtype| {
        let n = shape.iter().product::<usize>() * dtype.size();
        WireTensor {
            dtype,
            shape,
            data: (0..n).map(|i| (i * 7 % 251) as u8).collect(),
            coding: Default::default(),
        }
    };
    let msg = Message::Request {
        calls: vec![
            WireCall {
                op: WireOp::Conv2d {
                    layer: "down_blocks.0.resnets.0.conv1".into(),
                    input: WireOperand::Inline(t(vec![1, 4, 6, 8], WireDtype::F16)),
                    pad: Pad {
                        top: 1,
                        bottom: 0,
                        left: 1,
                        right: 1,
                    },
                },
                keep_as: Some(3),
                reply: true,
            },
            WireCall {
                op: WireOp::Attention {
                    q: WireOperand::Inline(t(vec![1, 5, 8], WireDtype::F32)),
                    k: WireOperand::Handle(9),
                    v: WireOperand::Inline(t(vec![1, 5, 8], WireDtype::Bf16)),
                    heads: 2,
                },
                keep_as: None,
                reply: true,
            },
            WireCall {
                op: WireOp::GroupNormStats {
                    layer: "mid_block.resnets.0.norm1".into(),
                    input: WireOperand::Handle(3),
                },
                keep_as: None,
                reply: true,
            },
            WireCall {
                op: WireOp::Identity {
                    input: WireOperand::Handle(3),
                },
                keep_as: Some(4),
                reply: false,
            },
            WireCall {
                op: WireOp::Release { handle: 3 },
                keep_as: None,
                reply: false,
            },
        ],
        reply_dtype: WireDtype::F16,
        compression: Compression::ZstdByteSplit(3),
        reply_coding: Default::default(),
    };
    encode(&msg, c).expect("encode")
}

fn header(kind: u8) -> Vec<u8> {
    let mut b = b"VEIL".to_vec();
    b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b.push(kind);
    b
}

/// A reply of one tensor written by hand: dtype, compression, dims, payload length, payload.
fn raw_reply(dtype: u8, comp: u8, dims: &[u32], len: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = header(4);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.push(dtype);
    b.push(comp);
    b.push(dims.len() as u8);
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&[0, 0]); // raw, no reference
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn dec(b: &[u8]) -> Result<Message, WireError> {
    decode(b, &Limits::default())
}

#[test]
fn hand_written_reply_decodes() {
    let payload: Vec<u8> = (0..24).collect();
    let m = dec(&raw_reply(0, 0, &[2, 3], 24, &payload)).expect("valid");
    assert_eq!(
        m,
        Message::Reply {
            outputs: vec![WireTensor {
                dtype: WireDtype::F32,
                shape: vec![2, 3],
                data: payload,
                coding: Default::default(),
            }]
        }
    );
}

#[test]
fn every_prefix_is_truncated() {
    for c in [
        Compression::None,
        Compression::Zstd(3),
        Compression::ZstdByteSplit(3),
    ] {
        let full = sample_request(c);
        assert!(dec(&full).is_ok());
        for n in 0..full.len() {
            assert_eq!(
                dec(&full[..n]),
                Err(WireError::Truncated),
                "prefix {n} of {c:?}"
            );
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut b = sample_request(Compression::Zstd(1));
    b.extend_from_slice(&[0, 0, 0]);
    assert_eq!(dec(&b), Err(WireError::TrailingBytes(3)));
}

#[test]
fn header_errors() {
    let mut b = sample_request(Compression::None);
    b[0] = b'X';
    assert_eq!(dec(&b), Err(WireError::BadMagic));
    let mut b = sample_request(Compression::None);
    let other = PROTOCOL_VERSION + 1;
    b[4..6].copy_from_slice(&other.to_le_bytes());
    assert_eq!(dec(&b), Err(WireError::UnsupportedVersion(other)));
    let mut b = sample_request(Compression::None);
    b[6] = 0;
    assert_eq!(
        dec(&b),
        Err(WireError::UnknownTag {
            what: "message kind",
            tag: 0
        })
    );
    b[6] = 99;
    assert!(matches!(
        dec(&b),
        Err(WireError::UnknownTag {
            what: "message kind",
            tag: 99
        })
    ));
}

#[test]
fn oversized_message_is_refused_before_parsing() {
    let b = sample_request(Compression::None);
    let limits = Limits {
        max_message_bytes: b.len() - 1,
        ..Limits::default()
    };
    assert!(matches!(
        decode(&b, &limits),
        Err(WireError::TooLarge {
            what: "message bytes",
            ..
        })
    ));
}

#[test]
fn oversized_payload_length_is_truncated_not_allocated() {
    let payload = [0u8; 24];
    // Claims u64::MAX payload bytes.
    let b = raw_reply(0, 0, &[2, 3], u64::MAX, &payload);
    assert_eq!(dec(&b), Err(WireError::Truncated));
    // Claims a length that fits but is longer than what is left.
    let b = raw_reply(0, 1, &[2, 3], 25, &payload);
    assert_eq!(dec(&b), Err(WireError::Truncated));
    // Uncompressed length that disagrees with the shape.
    let b = raw_reply(0, 0, &[2, 3], 20, &payload[..20]);
    assert_eq!(
        dec(&b),
        Err(WireError::LengthMismatch {
            what: "tensor payload",
            expected: 24,
            actual: 20
        })
    );
}

#[test]
fn shape_product_overflow() {
    let b = raw_reply(0, 0, &[u32::MAX; 3], 0, &[]);
    assert_eq!(dec(&b), Err(WireError::ShapeOverflow));
    let b = raw_reply(1, 2, &[u32::MAX, u32::MAX, u32::MAX, 4], 0, &[]);
    assert_eq!(dec(&b), Err(WireError::ShapeOverflow));
    // A zero dimension makes an empty tensor, whatever the others are.
    let b = raw_reply(0, 0, &[u32::MAX, 0, u32::MAX], 0, &[]);
    assert!(dec(&b).is_ok());
}

#[test]
fn a_huge_but_finite_shape_breaks_the_tensor_limit() {
    let b = raw_reply(0, 0, &[u32::MAX, 2], 0, &[]);
    assert!(matches!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "tensor bytes",
            len,
            ..
        }) if len == u64::from(u32::MAX) * 8
    ));
}

#[test]
fn unknown_dtype_and_tags() {
    assert_eq!(
        dec(&raw_reply(3, 0, &[1], 4, &[0; 4])),
        Err(WireError::UnknownDtype(3))
    );
    assert_eq!(
        dec(&raw_reply(0, 3, &[1], 4, &[0; 4])),
        Err(WireError::UnknownTag {
            what: "tensor compression",
            tag: 3
        })
    );
    // An unknown op tag: a request with one call whose op byte is 0.
    let mut b = header(3);
    b.push(0); // reply dtype f32
    b.push(0); // no compression
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&[0; 6]); // reply coding: none, not exact, slot 0
    b.extend_from_slice(&1u32.to_le_bytes());
    b.push(0); // op tag
    b.extend_from_slice(&[0; 16]);
    assert_eq!(dec(&b), Err(WireError::UnknownTag { what: "op", tag: 0 }));
    // An unknown error code.
    let mut b = header(5);
    b.push(42);
    b.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        dec(&b),
        Err(WireError::UnknownTag {
            what: "error code",
            tag: 42
        })
    );
    // A bool byte that is neither 0 nor 1 (a release's keep flag).
    let mut b = header(3);
    b.extend_from_slice(&[0; 12]); // reply dtype, compression, reply coding
    b.extend_from_slice(&1u32.to_le_bytes());
    b.push(5);
    b.extend_from_slice(&7u64.to_le_bytes());
    b.extend_from_slice(&[2, 0]);
    assert_eq!(
        dec(&b),
        Err(WireError::InvalidValue {
            what: "keep flag",
            value: 2
        })
    );
}

#[test]
fn rank_above_the_limit() {
    let dims = [1u32; 7];
    assert_eq!(
        dec(&raw_reply(0, 0, &dims, 4, &[0; 4])),
        Err(WireError::TooLarge {
            what: "tensor rank",
            len: 7,
            limit: 6
        })
    );
    // Rank 255 with nothing behind it: refused by the rank limit, not read.
    let mut b = header(4);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&[0, 0, 255]);
    b.extend_from_slice(&[0; 10]);
    assert!(matches!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "tensor rank",
            ..
        })
    ));
}

#[test]
fn names_longer_than_the_limit() {
    let msg = Message::Request {
        calls: vec![WireCall {
            op: WireOp::GroupNormStats {
                layer: "x".repeat(300),
                input: WireOperand::Handle(1),
            },
            keep_as: None,
            reply: true,
        }],
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
        reply_coding: Default::default(),
    };
    let b = encode(&msg, Compression::None).expect("encodes (the limit is the decoder's)");
    assert_eq!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "layer name",
            len: 300,
            limit: 256
        })
    );
    let mut b = header(3);
    b.extend_from_slice(&[0; 12]); // reply dtype, compression, reply coding
    b.extend_from_slice(&1u32.to_le_bytes());
    b.push(2);
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&[0xff, 0xfe]);
    b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(dec(&b), Err(WireError::Utf8("layer name")));
}

#[test]
fn counts_above_the_limit_or_the_bytes_left() {
    let mut b = header(4);
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "output count",
            ..
        })
    ));
    let mut b = header(4);
    b.extend_from_slice(&1000u32.to_le_bytes());
    b.extend_from_slice(&[0; 100]);
    assert_eq!(dec(&b), Err(WireError::Truncated));
    let mut b = header(3);
    b.extend_from_slice(&[0; 12]); // reply dtype, compression, reply coding
    b.extend_from_slice(&5000u32.to_le_bytes());
    assert!(matches!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "call count",
            ..
        })
    ));
}

#[test]
fn zstd_payload_of_the_wrong_size() {
    let data = vec![7u8; 100];
    let z = zstd::bulk::compress(&data, 3).expect("zstd");
    // The shape says 24 f32 = 96 bytes; the frame holds 100.
    let b = raw_reply(0, 1, &[24], z.len() as u64, &z);
    assert_eq!(
        dec(&b),
        Err(WireError::LengthMismatch {
            what: "zstd frame content size",
            expected: 96,
            actual: 100
        })
    );
    // Without a content size in the frame header the decoder still stops at the capacity.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
    enc.include_contentsize(false).expect("flag");
    std::io::Write::write_all(&mut enc, &data).expect("write");
    let z = enc.finish().expect("finish");
    let b = raw_reply(0, 1, &[24], z.len() as u64, &z);
    assert!(matches!(dec(&b), Err(WireError::Decompress(_))));
    // Too little data.
    let b = raw_reply(0, 1, &[26], z.len() as u64, &z);
    assert_eq!(
        dec(&b),
        Err(WireError::LengthMismatch {
            what: "decompressed tensor",
            expected: 104,
            actual: 100
        })
    );
    // Not zstd at all.
    let b = raw_reply(0, 2, &[2], 8, &[1; 8]);
    assert!(matches!(dec(&b), Err(WireError::Decompress(_))));
    let b = raw_reply(0, 1, &[0], 0, &[]);
    assert!(matches!(dec(&b), Err(WireError::Decompress(_))));
}

#[test]
fn compressed_bomb_is_refused_by_the_limit_before_allocating() {
    // 1 GiB of zeros compresses to a few tens of KiB; a frame *claiming* it is made here from a
    // small frame whose header lies, but the decoder never gets that far: the shape alone breaks
    // max_tensor_bytes (256 MiB).
    let z = zstd::bulk::compress(&[0u8; 4096], 19).expect("zstd");
    let b = raw_reply(0, 1, &[1, 1024, 512, 512], z.len() as u64, &z);
    assert_eq!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "tensor bytes",
            len: 1 << 30,
            limit: 256 << 20
        })
    );
    // Under a limit that allows it, the content-size check refuses the lie without allocating.
    let b = raw_reply(0, 1, &[1, 16, 512, 512], z.len() as u64, &z);
    assert!(matches!(
        dec(&b),
        Err(WireError::LengthMismatch {
            what: "zstd frame content size",
            ..
        })
    ));
    // Many honest tensors whose decoded sum exceeds the message limit.
    let limits = Limits {
        max_message_bytes: 1 << 20,
        ..Limits::default()
    };
    let zeros = vec![0u8; 512 << 10];
    let t = WireTensor {
        dtype: WireDtype::F32,
        shape: vec![128 << 10],
        data: zeros,
        coding: Default::default(),
    };
    let msg = Message::Reply {
        outputs: vec![t.clone(), t.clone(), t],
    };
    let b = encode(&msg, Compression::Zstd(3)).expect("encode");
    assert!(b.len() < 4096, "zeros compress well: {}", b.len());
    assert!(matches!(
        decode(&b, &limits),
        Err(WireError::TooLarge {
            what: "decoded tensor bytes of the message",
            ..
        })
    ));
}

#[test]
fn encode_refuses_inconsistent_tensors() {
    let msg = Message::Reply {
        outputs: vec![WireTensor {
            dtype: WireDtype::F16,
            shape: vec![3],
            data: vec![0; 5],
            coding: Default::default(),
        }],
    };
    assert_eq!(
        encode(&msg, Compression::None),
        Err(WireError::LengthMismatch {
            what: "tensor data",
            expected: 6,
            actual: 5
        })
    );
    let long = Message::Error {
        code: ErrorCode::Internal,
        message: "x".repeat(70_000),
    };
    assert!(matches!(
        encode(&long, Compression::None),
        Err(WireError::TooLarge {
            what: "error message",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

fn field(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            (i as f32 * 0.01).sin() * 3.0 + noise
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

#[test]
fn f32_wire_is_bit_exact() {
    let x = field(&[2, 3, 5, 7], 1);
    let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = f32::from_bits(1); // a subnormal
    v[1] = -0.0;
    v[2] = f32::MAX;
    let x = Tensor::from_vec(v.clone(), (2, 3, 5, 7), &Device::Cpu).unwrap();
    let w = WireTensor::from_tensor(&x, WireDtype::F32).unwrap();
    for c in [
        Compression::None,
        Compression::Zstd(3),
        Compression::ZstdByteSplit(3),
    ] {
        let msg = Message::Reply {
            outputs: vec![w.clone()],
        };
        let Message::Reply { outputs } =
            decode(&encode(&msg, c).unwrap(), &Limits::default()).unwrap()
        else {
            panic!("not a reply")
        };
        let y = outputs[0].to_tensor(&Device::Cpu).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5, 7]);
        let back = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(back.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
        .fold(0.0, f32::max)
}

#[test]
fn half_wire_round_trips_within_tolerance() {
    let x = field(&[1, 8, 16, 16], 2);
    let w = WireTensor::from_tensor(&x, WireDtype::F16).unwrap();
    assert_eq!(w.data.len(), 8 * 16 * 16 * 2);
    let y = w.to_tensor(&Device::Cpu).unwrap();
    assert_eq!(y.dtype(), candle_core::DType::F32);
    let e = max_rel_err(&x, &y);
    assert!(e <= 1e-3, "f16 relative error {e}");
    // bf16 has 8 mantissa bits: 2^-9 relative.
    let w = WireTensor::from_tensor(&x, WireDtype::Bf16).unwrap();
    let e = max_rel_err(&x, &w.to_tensor(&Device::Cpu).unwrap());
    assert!(e <= 4e-3, "bf16 relative error {e}");
    // A non-contiguous input converts like its contiguous copy.
    let t = x.transpose(2, 3).unwrap();
    let a = WireTensor::from_tensor(&t, WireDtype::F32).unwrap();
    let b = WireTensor::from_tensor(&t.contiguous().unwrap(), WireDtype::F32).unwrap();
    assert_eq!(a, b);
}

#[test]
fn requests_and_replies_convert_both_ways() {
    let dev = Device::Cpu;
    let x = field(&[1, 4, 6, 8], 3);
    let req = ShardRequest {
        calls: vec![
            ShardCall {
                op: ShardOp::Conv2d {
                    layer: "conv_in".into(),
                    input: Operand::Inline(x.clone()),
                    pad: Pad {
                        top: 1,
                        bottom: 0,
                        left: 1,
                        right: 1,
                    },
                },
                keep_as: Some(1),
                reply: false,
            },
            ShardCall::reply(ShardOp::Attention {
                q: Operand::Handle(1),
                k: Operand::Inline(x.clone()),
                v: Operand::Inline(x.clone()),
                heads: 4,
            }),
            ShardCall::reply(ShardOp::GroupNormStats {
                layer: "n".into(),
                input: Operand::Handle(1),
            }),
            ShardCall::reply(ShardOp::Identity {
                input: Operand::Inline(x.clone()),
            }),
            ShardCall {
                op: ShardOp::Release { handle: 1 },
                keep_as: None,
                reply: false,
            },
        ],
    };
    let calls = request_to_wire(&req, WireDtype::F32).unwrap();
    let msg = Message::Request {
        calls,
        reply_dtype: WireDtype::F16,
        compression: Compression::None,
        reply_coding: Default::default(),
    };
    let bytes = encode(&msg, Compression::ZstdByteSplit(3)).unwrap();
    let Message::Request { calls, .. } = decode(&bytes, &Limits::default()).unwrap() else {
        panic!("not a request")
    };
    let back = calls_from_wire(calls, &dev).unwrap();
    assert_eq!(back.calls.len(), 5);
    match &back.calls[0].op {
        ShardOp::Conv2d { layer, input, pad } => {
            assert_eq!(layer, "conv_in");
            assert_eq!(pad.top, 1);
            let Operand::Inline(t) = input else {
                panic!("inline")
            };
            assert_eq!(max_rel_err(&x, t), 0.0);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        back.calls[1].op,
        ShardOp::Attention {
            q: Operand::Handle(1),
            heads: 4,
            ..
        }
    ));
    assert_eq!(back.calls[0].keep_as, Some(1));
    assert!(!back.calls[0].reply && back.calls[1].reply);
    assert!(matches!(back.calls[4].op, ShardOp::Release { handle: 1 }));

    let reply = ShardReply::in_process(vec![x.clone(), field(&[1, 2, 3], 4)]);
    let asked = ShardRequest {
        calls: vec![
            ShardCall::reply(ShardOp::Identity {
                input: Operand::Inline(x.clone()),
            }),
            ShardCall::reply(ShardOp::GroupNormStats {
                layer: "norm".into(),
                input: Operand::Inline(x.clone()),
            }),
        ],
    };
    let outs = reply_to_wire(&reply, &asked, WireDtype::F16).unwrap();
    // GroupNorm statistics travel in f32 whatever the wire dtype.
    assert_eq!(outs[0].dtype, WireDtype::F16);
    assert_eq!(outs[1].dtype, WireDtype::F32);
    let back = reply_from_wire(outs, &dev).unwrap();
    assert_eq!(back.outputs.len(), 2);
    assert_eq!(back.outputs[1].dims(), &[1, 2, 3]);
    assert!(max_rel_err(&x, &back.outputs[0]) <= 1e-3);

    // A tensor whose data disagrees with its shape is refused, not panicked on.
    let bad = WireTensor {
        dtype: WireDtype::F32,
        shape: vec![2, 2],
        data: vec![0; 15],
        coding: Default::default(),
    };
    assert!(bad.to_tensor(&dev).is_err());
}

/// The fuzz seeds were written by hand (a Python script following docs/PROTOCOL.md, zstd frames
/// from the zstd command line, without a content size; the `request_apply*` seeds by
/// `write_apply_fuzz_seeds` below, two of them laid out by hand; `early_steps_img2img`, an
/// image-to-image early-steps job, by a Python script): the documented layout decodes.
#[test]
fn hand_written_fuzz_seeds_decode() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/frame_decoder");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let (mut n, mut applies, mut img2img) = (0, 0, 0);
    for e in entries {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let msg = dec(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Message::EarlySteps { job, .. } = &msg {
            assert_eq!(
                (job.steps, job.server_steps, job.start_step),
                (10, 3, Some(4))
            );
            img2img += 1;
        }
        if let Message::Request { calls, .. } = &msg {
            applies += calls
                .iter()
                .filter(|c| matches!(c.op, WireOp::Apply { .. }))
                .count();
        }
        assert_eq!(
            encode(&msg, Compression::None)
                .ok()
                .and_then(|b| dec(&b).ok()),
            Some(msg)
        );
        n += 1;
    }
    assert!(n >= 12, "{n} seeds");
    assert!(applies >= 10, "{applies} Apply calls in the seeds");
    assert_eq!(img2img, 1, "the image-to-image early-steps seed");
}

// ---------------------------------------------------------------------------------------------
// Apply: the strip ops on the wire
// ---------------------------------------------------------------------------------------------

/// An inline tensor compared bit for bit: dims and the f32 bits of its elements.
type Bits = (Vec<usize>, Vec<u32>);

fn bits(t: &Tensor) -> Bits {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (t.dims().to_vec(), v.iter().map(|x| x.to_bits()).collect())
}

fn bits_operand(o: &Operand<Tensor>) -> Operand<Bits> {
    match o {
        Operand::Inline(t) => Operand::Inline(bits(t)),
        Operand::Handle(h) => Operand::Handle(*h),
    }
}

/// A copy of `op` that compares exactly through `Debug` (f64s print as the shortest string that
/// reads back as the same bits). Written out per variant, without a wildcard, so that a new op
/// does not compile here until this file says how it travels.
fn comparable(op: &ShardOp<Tensor>) -> ShardOp<Bits> {
    let o = bits_operand;
    match op {
        ShardOp::Conv2d { layer, input, pad } => ShardOp::Conv2d {
            layer: layer.clone(),
            input: o(input),
            pad: *pad,
        },
        ShardOp::GroupNormStats { layer, input } => ShardOp::GroupNormStats {
            layer: layer.clone(),
            input: o(input),
        },
        ShardOp::Attention { q, k, v, heads } => ShardOp::Attention {
            q: o(q),
            k: o(k),
            v: o(v),
            heads: *heads,
        },
        ShardOp::Identity { input } => ShardOp::Identity { input: o(input) },
        ShardOp::Release { handle } => ShardOp::Release { handle: *handle },
        ShardOp::Narrow {
            input,
            dim,
            start,
            len,
        } => ShardOp::Narrow {
            input: o(input),
            dim: *dim,
            start: *start,
            len: *len,
        },
        ShardOp::Cat { inputs, dim } => ShardOp::Cat {
            inputs: inputs.iter().map(o).collect(),
            dim: *dim,
        },
        ShardOp::GroupNormApply {
            layer,
            input,
            moments,
        } => ShardOp::GroupNormApply {
            layer: layer.clone(),
            input: o(input),
            moments: o(moments),
        },
        ShardOp::LayerNorm { layer, input } => ShardOp::LayerNorm {
            layer: layer.clone(),
            input: o(input),
        },
        ShardOp::Linear { layer, input } => ShardOp::Linear {
            layer: layer.clone(),
            input: o(input),
        },
        ShardOp::Silu { input } => ShardOp::Silu { input: o(input) },
        ShardOp::Geglu { input, kind } => ShardOp::Geglu {
            input: o(input),
            kind: *kind,
        },
        ShardOp::Add { a, b } => ShardOp::Add { a: o(a), b: o(b) },
        ShardOp::Scale { input, factor } => ShardOp::Scale {
            input: o(input),
            factor: *factor,
        },
        ShardOp::AddChannelBias { input, bias } => ShardOp::AddChannelBias {
            input: o(input),
            bias: o(bias),
        },
        ShardOp::UpsampleRows {
            input,
            src_first,
            src_h,
            dst_h,
            dst_first,
            dst_len,
            dst_w,
        } => ShardOp::UpsampleRows {
            input: o(input),
            src_first: *src_first,
            src_h: *src_h,
            dst_h: *dst_h,
            dst_first: *dst_first,
            dst_len: *dst_len,
            dst_w: *dst_w,
        },
        ShardOp::ToTokens { input } => ShardOp::ToTokens { input: o(input) },
        ShardOp::ToSpatial { input, h, w } => ShardOp::ToSpatial {
            input: o(input),
            h: *h,
            w: *w,
        },
        ShardOp::TimestepEmbedding {
            timestep,
            batch,
            dim,
            flip_sin_to_cos,
            shift,
        } => ShardOp::TimestepEmbedding {
            timestep: *timestep,
            batch: *batch,
            dim: *dim,
            flip_sin_to_cos: *flip_sin_to_cos,
            shift: *shift,
        },
    }
}

/// A small inline tensor whose first and last elements are awkward f32 values (subnormal, -0,
/// extremes).
fn awkward(shape: &[usize], seed: u64) -> Operand<Tensor> {
    let mut v = field(shape, seed)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let specials = [f32::from_bits(1), -0.0, f32::MAX, f32::MIN_POSITIVE, -1e-30];
    v[0] = specials[seed as usize % specials.len()];
    let last = v.len() - 1;
    v[last] = specials[(seed as usize + 1) % specials.len()];
    Operand::Inline(Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
}

/// Every strip op, with its kind byte (docs/PROTOCOL.md §4.3), inline and handle operands mixed.
fn strip_calls() -> Vec<(u8, ShardCall<Tensor>)> {
    let h = Operand::Handle;
    let ops = vec![
        (
            1,
            ShardOp::Narrow {
                input: awkward(&[1, 2, 4, 3], 10),
                dim: 2,
                start: 1,
                len: 2,
            },
        ),
        (
            1,
            ShardOp::Narrow {
                input: h(7),
                dim: 3,
                start: usize::MAX,
                len: 1 << 40,
            },
        ),
        (
            2,
            ShardOp::Cat {
                inputs: vec![h(1)],
                dim: 0,
            },
        ),
        (
            2,
            ShardOp::Cat {
                inputs: (0..8u64)
                    .map(|i| {
                        if i % 3 == 1 {
                            awkward(&[1, 2, 1, 3], i)
                        } else {
                            h(100 + i)
                        }
                    })
                    .collect(),
                dim: 2,
            },
        ),
        (
            3,
            ShardOp::GroupNormApply {
                layer: "down_blocks.0.resnets.0.norm1".into(),
                input: awkward(&[1, 4, 2, 3], 11),
                moments: awkward(&[1, 2, 2], 12),
            },
        ),
        (
            4,
            ShardOp::LayerNorm {
                layer: "down_blocks.1.attentions.0.transformer_blocks.0.norm1".into(),
                input: h(u64::MAX),
            },
        ),
        (
            5,
            ShardOp::Linear {
                layer: "mid_block.attentions.0.transformer_blocks.0.attn1.to_q".into(),
                input: awkward(&[1, 6, 4], 13),
            },
        ),
        (
            6,
            ShardOp::Silu {
                input: awkward(&[2, 3], 14),
            },
        ),
        (
            7,
            ShardOp::Geglu {
                input: awkward(&[1, 2, 8], 15),
                kind: GeluKind::Erf,
            },
        ),
        (
            7,
            ShardOp::Geglu {
                input: h(0),
                kind: GeluKind::Tanh,
            },
        ),
        (
            8,
            ShardOp::Add {
                a: awkward(&[1, 2, 2, 2], 16),
                b: h(3),
            },
        ),
        (
            9,
            ShardOp::Scale {
                input: h(4),
                factor: 0.1,
            },
        ),
        (
            9,
            ShardOp::Scale {
                input: awkward(&[3], 17),
                factor: -0.0,
            },
        ),
        (
            9,
            ShardOp::Scale {
                input: h(4),
                factor: f64::MIN_POSITIVE / 3.0, // subnormal
            },
        ),
        (
            10,
            ShardOp::AddChannelBias {
                input: h(5),
                bias: awkward(&[1, 4], 18),
            },
        ),
        (
            11,
            ShardOp::UpsampleRows {
                input: awkward(&[1, 1, 2, 2], 19),
                src_first: 3,
                src_h: 8,
                dst_h: 16,
                dst_first: 6,
                dst_len: 4,
                dst_w: 1 << 33,
            },
        ),
        (
            12,
            ShardOp::ToTokens {
                input: awkward(&[1, 2, 2, 3], 20),
            },
        ),
        (
            13,
            ShardOp::ToSpatial {
                input: h(6),
                h: 2,
                w: 3,
            },
        ),
        (
            14,
            ShardOp::TimestepEmbedding {
                timestep: 999.5,
                batch: 2,
                dim: 320,
                flip_sin_to_cos: true,
                shift: 1.0,
            },
        ),
        (
            14,
            ShardOp::TimestepEmbedding {
                timestep: 0.1,
                batch: 1,
                dim: 8,
                flip_sin_to_cos: false,
                shift: -0.0,
            },
        ),
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, (kind, op))| {
            let call = ShardCall {
                op,
                keep_as: (i % 3 == 0).then_some(1000 + i as u64),
                reply: i % 2 == 0,
            };
            (kind, call)
        })
        .collect()
}

fn wire_round_trip(req: &ShardRequest<Tensor>, c: Compression) -> ShardRequest<Tensor> {
    let calls = request_to_wire(req, WireDtype::F32).expect("to wire");
    let msg = Message::Request {
        calls,
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
        reply_coding: Default::default(),
    };
    let bytes = encode(&msg, c).expect("encode");
    let Message::Request { calls, .. } = dec(&bytes).expect("decode") else {
        panic!("not a request")
    };
    calls_from_wire(calls, &Device::Cpu).expect("from wire")
}

#[test]
fn early_steps_round_trip_exactly_with_f32_noise_whatever_the_wire_dtype() {
    let noise = field(&[1, 4, 3, 5], 9);
    for (scheduler, redundancy, gate) in [
        (SchedulerKind::Ddim, BatchRedundancy::Off, None),
        (
            SchedulerKind::EulerDiscrete,
            BatchRedundancy::Exact,
            Some(3),
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            BatchRedundancy::Shared,
            Some(1),
        ),
        (SchedulerKind::EulerAncestral, BatchRedundancy::Off, None),
        (SchedulerKind::Lcm, BatchRedundancy::Exact, Some(2)),
    ] {
        let job = EarlySteps {
            candidates: vec!["a young woman".into(), "an old man".into(), String::new()],
            negative_prompt: "blurry".into(),
            noise: noise.clone(),
            steps: 30,
            // Image-to-image for two of them (protocol 4): the run starts at step 12.
            start_step: matches!(scheduler, SchedulerKind::Ddim | SchedulerKind::Lcm).then_some(12),
            condition: None,
            server_steps: 15,
            guidance: 7.5,
            scheduler,
            accel: Accelerations {
                batch_redundancy: redundancy,
                attention_gate: gate,
            },
        };
        // Its own message (protocol 2), not a shard op.
        // A bf16 wire still carries the noise as f32: every candidate starts from it exactly.
        let msg = Message::EarlySteps {
            job: early_steps_to_wire(&job).expect("to wire"),
            reply_dtype: WireDtype::Bf16,
            compression: Compression::None,
        };
        let Message::EarlySteps { job: wire_job, .. } =
            dec(&encode(&msg, Compression::Zstd(3)).expect("encode")).expect("decode")
        else {
            panic!("not an early-steps message")
        };
        let back = early_steps_from_wire(wire_job, &Device::Cpu).expect("from wire");
        assert_eq!(
            format!("{:?}", comparable_job(&job)),
            format!("{:?}", comparable_job(&back))
        );
    }
    // Server steps past the schedule: refused before it goes out.
    let bad = EarlySteps {
        candidates: vec!["x".into()],
        negative_prompt: String::new(),
        noise: noise.clone(),
        steps: 4,
        start_step: None,
        condition: None,
        server_steps: 5,
        guidance: 5.0,
        scheduler: SchedulerKind::Ddim,
        accel: Accelerations::default(),
    };
    assert!(early_steps_to_wire(&bad).is_err());
    // Image-to-image: the start must lie in the schedule, the server steps after it.
    for (start, k) in [(4, 0), (2, 3)] {
        let bad = EarlySteps {
            start_step: Some(start),
            server_steps: k,
            ..bad.clone()
        };
        assert!(early_steps_to_wire(&bad).is_err(), "start {start}, k {k}");
    }
    let ok = EarlySteps {
        start_step: Some(2),
        server_steps: 2,
        ..bad.clone()
    };
    let msg = Message::EarlySteps {
        job: early_steps_to_wire(&ok).expect("to wire"),
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
    };
    // The flags are bools: any byte but 0 and 1 is refused (the job ends with the
    // image-to-image flag, its start step, then the inpainting flag).
    let bytes = encode(&msg, Compression::None).expect("encode");
    for (flag, set) in [(bytes.len() - 6, 1), (bytes.len() - 1, 0)] {
        assert_eq!(bytes[flag], set);
        let mut bad = bytes.clone();
        bad[flag] = 2;
        assert!(dec(&bad).is_err());
    }
    // An inpainting job carries its condition tensor through the wire unchanged.
    let cond = Tensor::ones((1, 5, 2, 2), candle_core::DType::F32, &Device::Cpu).expect("ones");
    let inpaint = EarlySteps {
        condition: Some(cond.clone()),
        ..ok.clone()
    };
    let msg = Message::EarlySteps {
        job: early_steps_to_wire(&inpaint).expect("to wire"),
        reply_dtype: WireDtype::F16,
        compression: Compression::None,
    };
    let bytes = encode(&msg, Compression::None).expect("encode");
    let Message::EarlySteps { job, .. } = dec(&bytes).expect("decode") else {
        panic!("not an early-steps message");
    };
    let back = early_steps_from_wire(job, &Device::Cpu).expect("from wire");
    let got = back.condition.expect("condition");
    assert_eq!(got.dims(), cond.dims());
    assert_eq!(
        got.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v"),
        vec![1f32; 20]
    );
}

/// A copy of `job` whose noise compares bit for bit through `Debug`.
fn comparable_job(job: &EarlySteps<Tensor>) -> EarlySteps<Bits> {
    EarlySteps {
        candidates: job.candidates.clone(),
        negative_prompt: job.negative_prompt.clone(),
        noise: bits(&job.noise),
        steps: job.steps,
        start_step: job.start_step,
        condition: None,
        server_steps: job.server_steps,
        guidance: job.guidance,
        scheduler: job.scheduler,
        accel: job.accel,
    }
}

#[test]
fn every_strip_op_round_trips_exactly() {
    let (kinds, calls): (Vec<u8>, Vec<_>) = strip_calls().into_iter().unzip();
    let mut seen = kinds.clone();
    seen.dedup();
    assert_eq!(seen, (1..=14).collect::<Vec<u8>>(), "every kind is covered");
    let req = ShardRequest { calls };

    // On the wire: one Apply per strip op, with the documented kind byte and the layer name
    // only where the op has one.
    let wire = request_to_wire(&req, WireDtype::F32).unwrap();
    for ((call, kind), orig) in wire.iter().zip(&kinds).zip(&req.calls) {
        let WireOp::Apply { kind: k, layer, .. } = &call.op else {
            panic!("{:?} is not an Apply", call.op)
        };
        assert_eq!(k, kind);
        assert_eq!(layer.is_empty(), !matches!(*kind, 3..=5), "{orig:?}");
    }

    for c in [
        Compression::None,
        Compression::Zstd(3),
        Compression::ZstdByteSplit(3),
    ] {
        let back = wire_round_trip(&req, c);
        assert_eq!(back.calls.len(), req.calls.len());
        for (a, b) in req.calls.iter().zip(&back.calls) {
            assert_eq!(
                format!("{:?}", comparable(&a.op)),
                format!("{:?}", comparable(&b.op)),
                "{c:?}"
            );
            assert_eq!((a.keep_as, a.reply), (b.keep_as, b.reply));
        }
    }
}

#[test]
fn strip_ops_mixed_with_the_other_ops_round_trip() {
    let x = field(&[1, 2, 3, 4], 30);
    let calls = vec![
        ShardCall {
            op: ShardOp::Conv2d {
                layer: "conv_in".into(),
                input: Operand::Inline(x.clone()),
                pad: Pad {
                    top: 1,
                    bottom: 1,
                    left: 1,
                    right: 1,
                },
            },
            keep_as: Some(1),
            reply: false,
        },
        ShardCall::reply(ShardOp::GroupNormStats {
            layer: "n".into(),
            input: Operand::Handle(1),
        }),
        ShardCall {
            op: ShardOp::GroupNormApply {
                layer: "n".into(),
                input: Operand::Handle(1),
                moments: Operand::Inline(field(&[1, 2, 2], 31)),
            },
            keep_as: Some(1),
            reply: false,
        },
        ShardCall::reply(ShardOp::Narrow {
            input: Operand::Handle(1),
            dim: 2,
            start: 0,
            len: 1,
        }),
        ShardCall::reply(ShardOp::Identity {
            input: Operand::Handle(1),
        }),
        ShardCall {
            op: ShardOp::Release { handle: 1 },
            keep_as: None,
            reply: false,
        },
    ];
    let req = ShardRequest { calls };
    let wire = request_to_wire(&req, WireDtype::F32).unwrap();
    assert!(matches!(wire[0].op, WireOp::Conv2d { .. }));
    assert!(matches!(wire[1].op, WireOp::GroupNormStats { .. }));
    assert!(matches!(wire[2].op, WireOp::Apply { kind: 3, .. }));
    assert!(matches!(wire[3].op, WireOp::Apply { kind: 1, .. }));
    assert!(matches!(wire[4].op, WireOp::Identity { .. }));
    assert!(matches!(wire[5].op, WireOp::Release { handle: 1 }));
    let back = wire_round_trip(&req, Compression::Zstd(1));
    for (a, b) in req.calls.iter().zip(&back.calls) {
        assert_eq!(
            format!("{:?}", comparable(&a.op)),
            format!("{:?}", comparable(&b.op))
        );
        assert_eq!((a.keep_as, a.reply), (b.keep_as, b.reply));
    }
}

#[test]
fn half_precision_strip_operands_round_trip_within_tolerance() {
    let x = field(&[1, 4, 3, 5], 40);
    let req = ShardRequest {
        calls: vec![ShardCall::reply(ShardOp::Add {
            a: Operand::Inline(x.clone()),
            b: Operand::Handle(2),
        })],
    };
    let calls = request_to_wire(&req, WireDtype::F16).unwrap();
    let WireOp::Apply { operands, .. } = &calls[0].op else {
        panic!("not an Apply")
    };
    assert!(matches!(&operands[0], WireOperand::Inline(t) if t.dtype == WireDtype::F16));
    let msg = Message::Request {
        calls,
        reply_dtype: WireDtype::F16,
        compression: Compression::ZstdByteSplit(3),
        reply_coding: Default::default(),
    };
    let bytes = encode(&msg, Compression::ZstdByteSplit(3)).unwrap();
    let Message::Request { calls, .. } = dec(&bytes).unwrap() else {
        panic!("not a request")
    };
    let back = calls_from_wire(calls, &Device::Cpu).unwrap();
    let ShardOp::Add {
        a: Operand::Inline(a),
        b: Operand::Handle(2),
    } = &back.calls[0].op
    else {
        panic!("{:?}", back.calls[0].op)
    };
    assert!(max_rel_err(&x, a) <= 1e-3);
}

/// The layout of docs/PROTOCOL.md §4.3, written out by hand: a Request (reply f32, no
/// compression) of one Apply call, handle operands only, with the three counts given separately
/// so that they can lie. Returns the message and the offset of the operand count byte.
fn raw_apply(
    kind: u8,
    layer: &str,
    (n_ops, handles): (u8, &[u64]),
    (n_ints, ints): (u8, &[u64]),
    (n_floats, floats): (u8, &[f64]),
) -> (Vec<u8>, usize) {
    let mut b = header(3);
    b.push(0); // reply dtype f32
    b.push(0); // reply compression none
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&[0; 6]); // reply coding: none, not exact, slot 0
    b.extend_from_slice(&1u32.to_le_bytes()); // one call
    b.push(6); // op tag Apply
    b.push(kind);
    b.extend_from_slice(&(layer.len() as u16).to_le_bytes());
    b.extend_from_slice(layer.as_bytes());
    let at = b.len();
    b.push(n_ops);
    for h in handles {
        b.push(1); // handle operand
        b.extend_from_slice(&h.to_le_bytes());
    }
    b.push(n_ints);
    for v in ints {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.push(n_floats);
    for v in floats {
        b.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    b.push(1); // keep
    b.extend_from_slice(&9u64.to_le_bytes());
    b.push(1); // reply
    (b, at)
}

fn apply_msg(
    kind: u8,
    layer: &str,
    operands: Vec<WireOperand>,
    ints: Vec<u64>,
    floats: Vec<f64>,
) -> Message {
    Message::Request {
        calls: vec![WireCall {
            op: WireOp::Apply {
                kind,
                layer: layer.into(),
                operands,
                ints,
                floats,
            },
            keep_as: Some(9),
            reply: true,
        }],
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
        reply_coding: Default::default(),
    }
}

#[test]
fn hand_written_apply_matches_the_encoder() {
    // UpsampleRows: one operand, six integers, no float; and TimestepEmbedding: floats.
    let ints = [3, 8, 16, 6, 4, 16];
    let (b, _) = raw_apply(11, "", (1, &[42]), (6, &ints), (0, &[]));
    let msg = apply_msg(11, "", vec![WireOperand::Handle(42)], ints.to_vec(), vec![]);
    assert_eq!(encode(&msg, Compression::None).unwrap(), b);
    assert_eq!(dec(&b), Ok(msg));
    let (b, _) = raw_apply(14, "", (0, &[]), (3, &[2, 320, 1]), (2, &[999.5, 1.0]));
    let msg = apply_msg(14, "", vec![], vec![2, 320, 1], vec![999.5, 1.0]);
    assert_eq!(encode(&msg, Compression::None).unwrap(), b);
    assert_eq!(dec(&b), Ok(msg));
    let (b, _) = raw_apply(3, "norm1", (2, &[1, 2]), (0, &[]), (0, &[]));
    assert!(dec(&b).is_ok());
}

/// The Apply example of docs/PROTOCOL.md §4.5, byte for byte.
#[test]
fn protocol_doc_apply_example() {
    let doc: &[u8] = &[
        0x56, 0x45, 0x49, 0x4C, 0x06, 0x00, 0x03, // "VEIL", version 6, Request
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, // reply f16, no compression, level 0
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // reply codec none, not exact, first slot 0
        0x01, 0x00, 0x00, 0x00, // 1 call
        0x06, 0x09, 0x00, 0x00, // Apply, kind 9 (Scale), layer ""
        0x01, 0x01, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 1 operand: handle 7
        0x00, // 0 integers
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xE0, 0x3F, // 1 float: 0.5
        0x00, 0x01, // keep 0, reply 1
    ];
    assert_eq!(doc.len(), 49);
    let msg = Message::Request {
        calls: vec![WireCall {
            op: WireOp::Apply {
                kind: 9,
                layer: String::new(),
                operands: vec![WireOperand::Handle(7)],
                ints: vec![],
                floats: vec![0.5],
            },
            keep_as: None,
            reply: true,
        }],
        reply_dtype: WireDtype::F16,
        compression: Compression::None,
        reply_coding: Default::default(),
    };
    assert_eq!(dec(doc), Ok(msg.clone()));
    assert_eq!(encode(&msg, Compression::None).unwrap(), doc);
    let Message::Request { calls, .. } = msg else {
        unreachable!()
    };
    let r = calls_from_wire(calls, &Device::Cpu).unwrap();
    assert!(matches!(
        r.calls[0].op,
        ShardOp::Scale {
            input: Operand::Handle(7),
            factor
        } if factor == 0.5
    ));
}

#[test]
fn apply_counts_above_the_limits_are_refused() {
    let handles: Vec<u64> = (0..9).collect();
    let ints: Vec<u64> = (0..9).collect();
    let floats = [0.5; 5];
    // Nine operands (Cat), nine integers, five floats: every byte present, the count too big.
    let (b, _) = raw_apply(2, "", (9, &handles), (1, &[0]), (0, &[]));
    assert_eq!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "apply operands",
            len: 9,
            limit: 8
        })
    );
    let (b, _) = raw_apply(11, "", (1, &[0]), (9, &ints), (0, &[]));
    assert_eq!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "apply integers",
            len: 9,
            limit: 8
        })
    );
    let (b, _) = raw_apply(14, "", (0, &[]), (3, &[1, 8, 0]), (5, &floats));
    assert_eq!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "apply floats",
            len: 5,
            limit: 4
        })
    );
    // The same by patching a valid encoding's count byte: refused before anything is read.
    let msg = apply_msg(
        8,
        "",
        vec![WireOperand::Handle(1), WireOperand::Handle(2)],
        vec![],
        vec![],
    );
    let good = encode(&msg, Compression::None).unwrap();
    let (raw, at) = raw_apply(8, "", (2, &[1, 2]), (0, &[]), (0, &[]));
    assert_eq!(good, raw);
    for n in [9u8, 200, 255] {
        let mut b = good.clone();
        b[at] = n;
        assert_eq!(
            dec(&b),
            Err(WireError::TooLarge {
                what: "apply operands",
                len: u64::from(n),
                limit: 8
            })
        );
    }
    let at_ints = at + 1 + 2 * 9;
    let mut b = good.clone();
    b[at_ints] = 9;
    assert!(matches!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "apply integers",
            ..
        })
    ));
    let mut b = good.clone();
    b[at_ints + 1] = 5;
    assert!(matches!(
        dec(&b),
        Err(WireError::TooLarge {
            what: "apply floats",
            ..
        })
    ));
    // At the limits, the counts are fine for the codec.
    let (b, _) = raw_apply(
        2,
        "",
        (8, &handles[..8]),
        (8, &ints[..8]),
        (4, &floats[..4]),
    );
    assert!(dec(&b).is_ok());
    // The encoder refuses what the decoder would.
    let too_many = apply_msg(
        2,
        "",
        (0..9).map(WireOperand::Handle).collect(),
        vec![0],
        vec![],
    );
    assert!(matches!(
        encode(&too_many, Compression::None),
        Err(WireError::TooLarge { .. })
    ));
    let too_many = apply_msg(11, "", vec![WireOperand::Handle(0)], ints.clone(), vec![]);
    assert!(matches!(
        encode(&too_many, Compression::None),
        Err(WireError::TooLarge { .. })
    ));
    let too_many = apply_msg(14, "", vec![], vec![1, 8, 0], floats.to_vec());
    assert!(matches!(
        encode(&too_many, Compression::None),
        Err(WireError::TooLarge { .. })
    ));
    // A Cat of nine converts, but does not encode.
    let req = ShardRequest {
        calls: vec![ShardCall::reply(ShardOp::Cat {
            inputs: (0..9).map(Operand::Handle).collect(),
            dim: 1,
        })],
    };
    let calls = request_to_wire(&req, WireDtype::F32).unwrap();
    let msg = Message::Request {
        calls,
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
        reply_coding: Default::default(),
    };
    assert!(matches!(
        encode(&msg, Compression::None),
        Err(WireError::TooLarge { .. })
    ));
}

/// An Apply request with a bit of everything: a layer name, inline tensors and handles, integers
/// and floats, and a second call behind it.
fn sample_apply_request(c: Compression) -> Vec<u8> {
    let t = |shape: Vec<usize>, dtype: WireDtype| {
        let n = shape.iter().product::<usize>() * dtype.size();
        WireTensor {
            dtype,
            shape,
            data: (0..n).map(|i| (i * 13 % 251) as u8).collect(),
            coding: Default::default(),
        }
    };
    let msg = Message::Request {
        calls: vec![
            WireCall {
                op: WireOp::Apply {
                    kind: 3,
                    layer: "up_blocks.1.resnets.2.norm2".into(),
                    operands: vec![
                        WireOperand::Inline(t(vec![1, 4, 2, 3], WireDtype::F16)),
                        WireOperand::Handle(77),
                    ],
                    ints: vec![],
                    floats: vec![],
                },
                keep_as: Some(78),
                reply: false,
            },
            WireCall {
                op: WireOp::Apply {
                    kind: 11,
                    layer: String::new(),
                    operands: vec![WireOperand::Inline(t(vec![1, 2, 2, 2], WireDtype::F32))],
                    ints: vec![0, 4, 8, 0, 4, 8],
                    floats: vec![],
                },
                keep_as: None,
                reply: true,
            },
            WireCall {
                op: WireOp::Apply {
                    kind: 14,
                    layer: String::new(),
                    operands: vec![],
                    ints: vec![2, 32, 1],
                    floats: vec![981.0, 1.0],
                },
                keep_as: Some(79),
                reply: false,
            },
        ],
        reply_dtype: WireDtype::Bf16,
        compression: Compression::Zstd(3),
        reply_coding: Default::default(),
    };
    encode(&msg, c).expect("encode")
}

#[test]
fn every_prefix_of_an_apply_request_is_truncated() {
    for c in [
        Compression::None,
        Compression::Zstd(3),
        Compression::ZstdByteSplit(3),
    ] {
        let full = sample_apply_request(c);
        assert!(dec(&full).is_ok());
        for n in 0..full.len() {
            assert_eq!(
                dec(&full[..n]),
                Err(WireError::Truncated),
                "prefix {n} of {c:?}"
            );
        }
    }
    // A lone Apply call: every prefix, including the ones that stop inside a count's items.
    let (full, _) = raw_apply(14, "", (0, &[]), (3, &[2, 32, 1]), (2, &[981.0, 1.0]));
    assert!(dec(&full).is_ok());
    for n in 0..full.len() {
        assert_eq!(dec(&full[..n]), Err(WireError::Truncated), "prefix {n}");
    }
}

/// Decodes `msg` (the codec does not look at kinds or arity) and converts it: the error of
/// `calls_from_wire`.
fn convert_error(msg: &Message) -> veil_core::Error {
    let bytes = encode(msg, Compression::None).expect("encode");
    let Message::Request { calls, .. } = dec(&bytes).expect("the codec accepts it") else {
        panic!("not a request")
    };
    match calls_from_wire(calls, &Device::Cpu) {
        Ok(r) => panic!("accepted {:?}", r.calls[0].op),
        Err(e) => e,
    }
}

fn is_bad_call(e: &veil_core::Error) -> bool {
    matches!(e, veil_core::Error::Wire(WireError::BadCall(_)))
}

#[test]
fn unknown_apply_kinds_are_bad_calls() {
    let h = WireOperand::Handle;
    for kind in [0u8, 15, 200, 255] {
        let e = convert_error(&apply_msg(kind, "", vec![h(1)], vec![], vec![]));
        assert!(is_bad_call(&e), "kind {kind}: {e}");
        assert!(e.to_string().contains("unknown kind"), "{e}");
    }
}

#[test]
fn wrong_apply_arity_is_a_bad_call() {
    let h = WireOperand::Handle;
    let inline = WireOperand::Inline(WireTensor {
        dtype: WireDtype::F32,
        shape: vec![2],
        data: vec![0; 8],
        coding: Default::default(),
    });
    let cases: Vec<(&str, Message)> = vec![
        ("add of one", apply_msg(8, "", vec![h(1)], vec![], vec![])),
        (
            "add of three",
            apply_msg(8, "", vec![h(1), h(2), h(3)], vec![], vec![]),
        ),
        (
            "add with an int",
            apply_msg(8, "", vec![h(1), inline.clone()], vec![0], vec![]),
        ),
        ("empty cat", apply_msg(2, "", vec![], vec![1], vec![])),
        (
            "cat without dim",
            apply_msg(2, "", vec![h(1), h(2)], vec![], vec![]),
        ),
        (
            "narrow with two ints",
            apply_msg(1, "", vec![h(1)], vec![0, 1], vec![]),
        ),
        (
            "narrow of nothing",
            apply_msg(1, "", vec![], vec![0, 1, 1], vec![]),
        ),
        (
            "silu of two",
            apply_msg(6, "", vec![h(1), h(2)], vec![], vec![]),
        ),
        (
            "silu with a float",
            apply_msg(6, "", vec![h(1)], vec![], vec![1.0]),
        ),
        (
            "scale without factor",
            apply_msg(9, "", vec![h(1)], vec![], vec![]),
        ),
        (
            "scale with two",
            apply_msg(9, "", vec![h(1)], vec![], vec![1.0, 2.0]),
        ),
        (
            "geglu without kind",
            apply_msg(7, "", vec![h(1)], vec![], vec![]),
        ),
        (
            "group norm apply of one",
            apply_msg(3, "n", vec![h(1)], vec![], vec![]),
        ),
        (
            "upsample with five",
            apply_msg(11, "", vec![h(1)], vec![0, 1, 2, 0, 2], vec![]),
        ),
        (
            "to_spatial with one",
            apply_msg(13, "", vec![h(1)], vec![4], vec![]),
        ),
        (
            "to_tokens with ints",
            apply_msg(12, "", vec![h(1)], vec![1, 1], vec![]),
        ),
        (
            "timestep with an operand",
            apply_msg(14, "", vec![h(1)], vec![1, 8, 0], vec![1.0, 0.0]),
        ),
        (
            "timestep with one float",
            apply_msg(14, "", vec![], vec![1, 8, 0], vec![1.0]),
        ),
        (
            "linear without layer",
            apply_msg(5, "", vec![h(1)], vec![], vec![]),
        ),
        (
            "layer norm without layer",
            apply_msg(4, "", vec![inline.clone()], vec![], vec![]),
        ),
        (
            "group norm apply without layer",
            apply_msg(3, "", vec![h(1), h(2)], vec![], vec![]),
        ),
        (
            "geglu kind 2",
            apply_msg(7, "", vec![h(1)], vec![2], vec![]),
        ),
        (
            "timestep flip 2",
            apply_msg(14, "", vec![], vec![1, 8, 2], vec![1.0, 0.0]),
        ),
    ];
    for (what, msg) in &cases {
        let e = convert_error(msg);
        assert!(is_bad_call(&e), "{what}: {e}");
    }
}

#[test]
fn non_finite_apply_floats_are_bad_calls() {
    let h = WireOperand::Handle;
    for x in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::from_bits(0x7ff0_0000_0000_0001),
    ] {
        let e = convert_error(&apply_msg(9, "", vec![h(1)], vec![], vec![x]));
        assert!(is_bad_call(&e), "scale {x}: {e}");
        assert!(e.to_string().contains("non-finite"), "{e}");
        let e = convert_error(&apply_msg(14, "", vec![], vec![1, 8, 1], vec![x, 0.0]));
        assert!(is_bad_call(&e), "timestep {x}: {e}");
        let e = convert_error(&apply_msg(14, "", vec![], vec![1, 8, 1], vec![1.0, x]));
        assert!(is_bad_call(&e), "shift {x}: {e}");
    }
    // Finite extremes are the executor's business, not the wire's.
    for x in [f64::MAX, -f64::MAX, f64::from_bits(1), -0.0] {
        let bytes = encode(
            &apply_msg(9, "", vec![h(1)], vec![], vec![x]),
            Compression::None,
        )
        .unwrap();
        let Message::Request { calls, .. } = dec(&bytes).unwrap() else {
            panic!("not a request")
        };
        let r = calls_from_wire(calls, &Device::Cpu).unwrap();
        assert!(
            matches!(r.calls[0].op, ShardOp::Scale { factor, .. } if factor.to_bits() == x.to_bits())
        );
    }
}

#[test]
fn a_bad_apply_fails_the_whole_conversion() {
    // The first call is fine; the conversion of the request still fails as a whole, so a server
    // runs none of its calls.
    let msg = Message::Request {
        calls: vec![
            WireCall {
                op: WireOp::Release { handle: 1 },
                keep_as: None,
                reply: false,
            },
            WireCall {
                op: WireOp::Apply {
                    kind: 8,
                    layer: String::new(),
                    operands: vec![WireOperand::Handle(1)],
                    ints: vec![],
                    floats: vec![],
                },
                keep_as: None,
                reply: true,
            },
        ],
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
        reply_coding: Default::default(),
    };
    let bytes = encode(&msg, Compression::None).unwrap();
    let Message::Request { calls, .. } = dec(&bytes).unwrap() else {
        panic!("not a request")
    };
    assert!(calls_from_wire(calls, &Device::Cpu).is_err_and(|e| is_bad_call(&e)));
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds with Apply calls
// ---------------------------------------------------------------------------------------------

/// Bytes laid out by hand from docs/PROTOCOL.md (not through the encoder).
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn f64(self, v: f64) -> Self {
        self.u64(v.to_bits())
    }
    fn string(self, s: &str) -> Self {
        let mut r = self.u16(s.len() as u16);
        r.0.extend_from_slice(s.as_bytes());
        r
    }
    fn handle(self, h: u64) -> Self {
        self.u8(1).u64(h)
    }
    /// An inline, uncompressed tensor (operand tag 0, then §4.4).
    fn inline(self, dtype: u8, dims: &[u32], data: &[u8]) -> Self {
        let mut r = self.u8(0).u8(dtype).u8(0).u8(dims.len() as u8);
        for d in dims {
            r = r.u32(*d);
        }
        let mut r = r.u8(0).u8(0).u64(data.len() as u64);
        r.0.extend_from_slice(data);
        r
    }
    /// Op tag 6, kind, layer.
    fn apply(self, kind: u8, layer: &str) -> Self {
        self.u8(6).u8(kind).string(layer)
    }
    fn ints(self, v: &[u64]) -> Self {
        v.iter().fold(self.u8(v.len() as u8), |r, x| r.u64(*x))
    }
    fn floats(self, v: &[f64]) -> Self {
        v.iter().fold(self.u8(v.len() as u8), |r, x| r.f64(*x))
    }
    fn keep(self, h: Option<u64>, reply: bool) -> Self {
        let r = match h {
            Some(h) => self.u8(1).u64(h),
            None => self.u8(0),
        };
        r.u8(u8::from(reply))
    }
}

/// The Apply seeds of fuzz/seeds/frame_decoder: (file name, bytes). The first two are laid out by
/// hand and checked against the encoder; the other two exercise the compressed tensor paths.
fn apply_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let f16_data: Vec<u8> = [0x3c00u16, 0xbc00, 0x0001, 0x8000]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    // A strip step: GroupNormApply (inline f16 strip + handle moments), SiLU, halo Cat,
    // UpsampleRows, Scale, TimestepEmbedding, Release.
    let strip = Raw(header(3))
        .u8(1) // reply dtype f16
        .u8(2) // reply compression zstd byte-split
        .u32(3) // zstd level 3 (an i32, same bytes)
        .u8(0) // reply codec none
        .u8(0) // not an exact step
        .u32(0) // first reply slot
        .u32(7) // calls
        .apply(3, "down_blocks.0.resnets.0.norm1")
        .u8(2)
        .inline(1, &[1, 2, 1, 2], &f16_data)
        .handle(5)
        .ints(&[])
        .floats(&[])
        .keep(Some(6), false)
        .apply(6, "")
        .u8(1)
        .handle(6)
        .ints(&[])
        .floats(&[])
        .keep(Some(6), false)
        .apply(2, "")
        .u8(3)
        .handle(1)
        .handle(6)
        .handle(2)
        .ints(&[2])
        .floats(&[])
        .keep(Some(7), true)
        .apply(11, "")
        .u8(1)
        .handle(7)
        .ints(&[3, 8, 16, 6, 4, 16])
        .floats(&[])
        .keep(None, true)
        .apply(9, "")
        .u8(1)
        .handle(7)
        .ints(&[])
        .floats(&[0.18215])
        .keep(Some(8), false)
        .apply(14, "")
        .u8(0)
        .ints(&[2, 320, 1])
        .floats(&[981.0, 1.0])
        .keep(None, true)
        .u8(5) // Release
        .u64(6)
        .keep(None, false)
        .0;
    // Every count at its limit: a Cat of eight, eight integers, four floats (unknown to Cat, but
    // the codec does not look).
    let mut limits = Raw(header(3))
        .u8(0)
        .u8(0)
        .u32(0)
        .u8(0)
        .u8(0)
        .u32(0)
        .u32(1)
        .apply(2, "")
        .u8(8);
    for h in 0..8 {
        limits = limits.handle(h);
    }
    let limits = limits
        .ints(&[0, 1, 2, 3, 4, 5, 6, 7])
        .floats(&[0.5, -0.0, f64::MAX, f64::from_bits(1)])
        .keep(Some(u64::MAX), true)
        .0;
    for b in [&strip, &limits] {
        let msg = dec(b).expect("the hand-written seed decodes");
        assert_eq!(&encode(&msg, Compression::None).unwrap(), b, "{msg:?}");
    }

    // Compressed inline operands: a LayerNorm → Linear → GEGLU → Add chain in f32 (zstd) and
    // the same with f16 (byte-split).
    let chain = |dtype: WireDtype| {
        let t = |shape: Vec<usize>, seed: u64| {
            WireTensor::from_tensor(&field(&shape, seed), dtype).unwrap()
        };
        let call = |op, keep_as, reply| WireCall { op, keep_as, reply };
        Message::Request {
            calls: vec![
                call(
                    WireOp::Apply {
                        kind: 4,
                        layer: "mid_block.attentions.0.transformer_blocks.0.norm3".into(),
                        operands: vec![WireOperand::Inline(t(vec![1, 4, 8], 50))],
                        ints: vec![],
                        floats: vec![],
                    },
                    Some(1),
                    false,
                ),
                call(
                    WireOp::Apply {
                        kind: 5,
                        layer: "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj".into(),
                        operands: vec![WireOperand::Handle(1)],
                        ints: vec![],
                        floats: vec![],
                    },
                    Some(2),
                    false,
                ),
                call(
                    WireOp::Apply {
                        kind: 7,
                        layer: String::new(),
                        operands: vec![WireOperand::Handle(2)],
                        ints: vec![0],
                        floats: vec![],
                    },
                    Some(2),
                    false,
                ),
                call(
                    WireOp::Apply {
                        kind: 8,
                        layer: String::new(),
                        operands: vec![
                            WireOperand::Handle(2),
                            WireOperand::Inline(t(vec![1, 4, 8], 51)),
                        ],
                        ints: vec![],
                        floats: vec![],
                    },
                    None,
                    true,
                ),
                call(
                    WireOp::Apply {
                        kind: 13,
                        layer: String::new(),
                        operands: vec![WireOperand::Handle(2)],
                        ints: vec![2, 2],
                        floats: vec![],
                    },
                    None,
                    true,
                ),
            ],
            reply_dtype: dtype,
            compression: Compression::Zstd(3),
            reply_coding: Default::default(),
        }
    };
    let zstd = encode(&chain(WireDtype::F32), Compression::Zstd(3)).unwrap();
    let split = encode(&chain(WireDtype::F16), Compression::ZstdByteSplit(3)).unwrap();
    vec![
        ("request_apply", strip),
        ("request_apply_limits", limits),
        ("request_apply_zstd", zstd),
        ("request_apply_split", split),
    ]
}

#[test]
fn apply_seeds_follow_the_documented_layout() {
    for (name, bytes) in apply_seeds() {
        let Ok(Message::Request { calls, .. }) = dec(&bytes) else {
            panic!("{name} is not a request")
        };
        assert!(calls.iter().any(|c| matches!(c.op, WireOp::Apply { .. })));
    }
}

/// Writes the Apply seeds into fuzz/seeds/frame_decoder:
/// `VEIL_WRITE_FUZZ_SEEDS=1 cargo test -p veil-core --test wire_codec -- --ignored write_apply_fuzz_seeds`.
#[test]
#[ignore = "writes files; run with VEIL_WRITE_FUZZ_SEEDS=1"]
fn write_apply_fuzz_seeds() {
    if std::env::var_os("VEIL_WRITE_FUZZ_SEEDS").is_none() {
        eprintln!("VEIL_WRITE_FUZZ_SEEDS is not set: nothing written");
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/frame_decoder");
    for (name, bytes) in apply_seeds() {
        std::fs::write(format!("{dir}/{name}"), &bytes).unwrap();
        eprintln!("{name}: {} bytes", bytes.len());
    }
}
