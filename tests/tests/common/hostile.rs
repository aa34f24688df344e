//! Hostile shard requests, as they go on the wire: the inputs that once crashed a release
//! server and the others the server issue lists (used by the abuse suite and the load tests).

use candle_core::Tensor;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardRequest};
use veil_core::placement::engine::{Pad, WireDtype};
use veil_core::wire::codec::encode;
use veil_core::wire::convert::request_to_wire;
use veil_core::wire::{Compression, Message, WireEarlySteps, WireTensor};

use super::{request_bytes, zeros};

pub fn call(op: ShardOp<Tensor>, keep: Option<u64>) -> ShardCall<Tensor> {
    ShardCall {
        op,
        keep_as: keep,
        reply: keep.is_none(),
    }
}

pub fn one(op: ShardOp<Tensor>) -> Vec<u8> {
    request_bytes(&ShardRequest {
        calls: vec![call(op, None)],
    })
}

pub fn inline(d: &[usize]) -> Operand<Tensor> {
    Operand::Inline(zeros(d))
}

pub fn no_pad() -> Pad {
    Pad {
        top: 0,
        bottom: 0,
        left: 0,
        right: 0,
    }
}

pub const DOWN: &str = "down_blocks.0.downsamplers.0.conv";
pub const NORM: &str = "down_blocks.0.resnets.0.norm1";

/// The requests, each as it goes on the wire.
pub fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let early = |k: usize, steps: u32, side: usize| {
        let noise =
            WireTensor::from_tensor(&zeros(&[1, 4, side, side]), WireDtype::F32).expect("noise");
        let job = WireEarlySteps {
            candidates: (0..k).map(|i| format!("a red circle {i}")).collect(),
            negative_prompt: String::new(),
            noise,
            steps,
            server_steps: steps,
            guidance: 5.0,
            scheduler: 0,
            batch_redundancy: 1,
            attention_gate: 0,
            start_step: None,
            condition: None,
        };
        encode(
            &Message::EarlySteps {
                job,
                reply_dtype: WireDtype::F32,
                compression: Compression::None,
            },
            Compression::None,
        )
        .expect("early steps")
    };
    // Decodes to 3 × 4 MiB of zeros (over the 8 MiB message limit) from a few KiB.
    let bomb = {
        let t = request_to_wire(
            &ShardRequest {
                calls: (0..3)
                    .map(|_| {
                        call(
                            ShardOp::Identity {
                                input: inline(&[1 << 20]),
                            },
                            None,
                        )
                    })
                    .collect(),
            },
            WireDtype::F32,
        )
        .expect("wire");
        let m = Message::Request {
            calls: t,
            reply_dtype: WireDtype::F32,
            compression: Compression::None,
            reply_coding: Default::default(),
        };
        let b = encode(&m, Compression::Zstd(3)).expect("bomb");
        assert!(b.len() < 64 << 10, "the bomb is small: {}", b.len());
        b
    };
    vec![
        (
            "stride-2 convolution of a 1×3 input, no padding",
            one(ShardOp::Conv2d {
                layer: DOWN.into(),
                input: inline(&[1, 32, 1, 3]),
                pad: no_pad(),
            }),
        ),
        (
            "the largest padding the wire carries on every side (2^32 − 1)",
            one(ShardOp::Conv2d {
                layer: DOWN.into(),
                input: inline(&[1, 32, 4, 4]),
                pad: Pad {
                    top: u32::MAX as usize,
                    bottom: u32::MAX as usize,
                    left: u32::MAX as usize,
                    right: u32::MAX as usize,
                },
            }),
        ),
        (
            "tokens to a (2^32 − 1)² map of 32 channels (past 2^64 bytes)",
            one(ShardOp::ToSpatial {
                input: inline(&[1, 4, 32]),
                h: u32::MAX as usize,
                w: u32::MAX as usize,
            }),
        ),
        (
            "padding of 2^20 rows and columns",
            one(ShardOp::Conv2d {
                layer: DOWN.into(),
                input: inline(&[1, 32, 4, 4]),
                pad: Pad {
                    top: 1 << 20,
                    bottom: 0,
                    left: 1 << 20,
                    right: 0,
                },
            }),
        ),
        (
            "up-sampling [1, 65536, 1, 1] to 65536 × 65536",
            one(ShardOp::UpsampleRows {
                input: inline(&[1, 65536, 1, 1]),
                src_first: 0,
                src_h: 1,
                dst_h: 65536,
                dst_first: 0,
                dst_len: 65536,
                dst_w: 65536,
            }),
        ),
        (
            "a 1 GiB timestep embedding",
            one(ShardOp::TimestepEmbedding {
                timestep: 1.0,
                batch: 4096,
                dim: 65536,
                flip_sin_to_cos: true,
                shift: 0.0,
            }),
        ),
        (
            "attention of 4096 queries over 65536 keys (a 1 GiB score matrix)",
            one(ShardOp::Attention {
                q: inline(&[1, 4096, 8]),
                k: inline(&[1, 65536, 8]),
                v: inline(&[1, 65536, 8]),
                heads: 1,
            }),
        ),
        (
            "attention with 0 heads",
            one(ShardOp::Attention {
                q: inline(&[1, 4, 8]),
                k: inline(&[1, 4, 8]),
                v: inline(&[1, 4, 8]),
                heads: 0,
            }),
        ),
        (
            "GroupNorm statistics of a rank-3 tensor",
            one(ShardOp::GroupNormStats {
                layer: NORM.into(),
                input: inline(&[1, 32, 4]),
            }),
        ),
        (
            "a convolution of a rank-2 tensor",
            one(ShardOp::Conv2d {
                layer: DOWN.into(),
                input: inline(&[32, 4]),
                pad: no_pad(),
            }),
        ),
        (
            "a concatenation of 8 views of one kept 24 MiB tensor (192 MiB, over one op's 128)",
            request_bytes(&ShardRequest {
                calls: vec![
                    call(
                        ShardOp::TimestepEmbedding {
                            timestep: 1.0,
                            batch: 96,
                            dim: 65536,
                            flip_sin_to_cos: true,
                            shift: 0.0,
                        },
                        Some(1),
                    ),
                    call(
                        ShardOp::Cat {
                            inputs: (0..8).map(|_| Operand::Handle(1)).collect(),
                            dim: 0,
                        },
                        None,
                    ),
                ],
            }),
        ),
        (
            "early steps: K = 64 over T = k = 1000 steps of a 64 × 64 latent",
            early(64, 1000, 64),
        ),
        ("a zstd bomb (12 MiB from a few KiB)", bomb),
    ]
}

/// 10⁴ handles in ten requests: the session's handle table stops them (4096), the rest fail.
pub fn many_handles() -> Vec<Vec<u8>> {
    (0..10u64)
        .map(|r| {
            request_bytes(&ShardRequest {
                calls: (0..1000u64)
                    .map(|i| {
                        call(
                            ShardOp::Identity {
                                input: inline(&[1]),
                            },
                            Some(1 + r * 1000 + i),
                        )
                    })
                    .collect(),
            })
        })
        .collect()
}
