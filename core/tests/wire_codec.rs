//! The wire codec: round trips of every message, typed errors on malformed input (never a
//! panic), and the tensor conversions.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardReply, ShardRequest};
use veil_core::placement::engine::{Pad, WireDtype};
use veil_core::wire::codec::{decode, encode, WireError};
use veil_core::wire::convert::{calls_from_wire, reply_from_wire, reply_to_wire, request_to_wire};
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
                compression
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
                data: payload
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
    b[4..6].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(dec(&b), Err(WireError::UnsupportedVersion(2)));
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
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
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
    b.extend_from_slice(&[0; 8]);
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
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
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
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
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

    let reply = ShardReply {
        outputs: vec![x.clone(), field(&[1, 2, 3], 4)],
    };
    let outs = reply_to_wire(&reply, WireDtype::F16).unwrap();
    assert!(outs.iter().all(|t| t.dtype == WireDtype::F16));
    let back = reply_from_wire(outs, &dev).unwrap();
    assert_eq!(back.outputs.len(), 2);
    assert_eq!(back.outputs[1].dims(), &[1, 2, 3]);
    assert!(max_rel_err(&x, &back.outputs[0]) <= 1e-3);

    // A tensor whose data disagrees with its shape is refused, not panicked on.
    let bad = WireTensor {
        dtype: WireDtype::F32,
        shape: vec![2, 2],
        data: vec![0; 15],
    };
    assert!(bad.to_tensor(&dev).is_err());
}

/// The fuzz seeds were written by hand (a Python script following docs/PROTOCOL.md, zstd frames
/// from the zstd command line, without a content size): the documented layout decodes.
#[test]
fn hand_written_fuzz_seeds_decode() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/frame_decoder");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut n = 0;
    for e in entries {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let msg = dec(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            encode(&msg, Compression::None)
                .ok()
                .and_then(|b| dec(&b).ok()),
            Some(msg)
        );
        n += 1;
    }
    assert!(n >= 5);
}
