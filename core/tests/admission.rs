//! Hostile shard requests against the executor a server runs for each session: each is refused
//! with a typed error before anything is allocated, the process-wide budget is given back, and
//! the session still works. CI also runs this file on a release build (`cargo test --release`),
//! where integer overflow wraps silently: the shapes below once crashed a release server
//! (a stride-2 convolution of a 1×3 input: SIGSEGV; a petabyte up-sampling: abort).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use veil_core::placement::admission::MemoryBudget;
use veil_core::placement::backend::{Operand, ShardCall, ShardExecutor, ShardOp, ShardRequest};
use veil_core::placement::engine::CandleEngine;
use veil_core::vocab::layers::{Conv2dSpec, GroupNormSpec, ShardLayer};
use veil_core::vocab::precision::Pad;
use veil_core::Error;

const MIB: u64 = 1 << 20;

fn zeros(d: &[usize]) -> Tensor {
    Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu).expect("zeros")
}

/// An executor with a stride-2 3×3 convolution (4 → 4 channels) and a GroupNorm, 64 MiB per
/// op, 16 MiB per reply, drawing from `budget`.
fn executor(budget: &std::sync::Arc<MemoryBudget>) -> ShardExecutor<CandleEngine> {
    let mut w = HashMap::new();
    w.insert("down.weight".into(), zeros(&[4, 4, 3, 3]));
    w.insert("down.bias".into(), zeros(&[4]));
    w.insert("norm.weight".into(), zeros(&[4]));
    w.insert("norm.bias".into(), zeros(&[4]));
    let mut layers = HashMap::new();
    layers.insert(
        "down".to_string(),
        ShardLayer::Conv2d(Conv2dSpec::new("down".into(), 4, 4, 3, 2, 0)),
    );
    layers.insert(
        "norm".to_string(),
        ShardLayer::GroupNorm(GroupNormSpec::new("norm".into(), 2, 4, 1e-5)),
    );
    ShardExecutor::new(CandleEngine::new(w, Device::Cpu), layers).with_limits(
        64 * MIB,
        16 * MIB,
        budget.clone(),
    )
}

fn inline(d: &[usize]) -> Operand<Tensor> {
    Operand::Inline(zeros(d))
}

fn one(op: ShardOp<Tensor>) -> ShardRequest<Tensor> {
    ShardRequest {
        calls: vec![ShardCall::reply(op)],
    }
}

fn no_pad() -> Pad {
    Pad {
        top: 0,
        bottom: 0,
        left: 0,
        right: 0,
    }
}

/// A valid request: the session still works after a refusal.
fn still_works(ex: &ShardExecutor<CandleEngine>) {
    let conv = ShardOp::Conv2d {
        layer: "down".into(),
        input: inline(&[1, 4, 8, 8]),
        pad: no_pad(),
    };
    let out = ex.execute(&one(conv)).expect("a valid convolution");
    assert_eq!(out.outputs[0].dims(), &[1, 4, 3, 3]);
}

fn refused(ex: &ShardExecutor<CandleEngine>, op: ShardOp<Tensor>, what: &str) {
    match ex.execute(&one(op)) {
        Err(Error::InvalidArgument(msg)) => println!("{what}: {msg}"),
        Err(e) => panic!("{what}: expected a refusal, got {e}"),
        Ok(r) => panic!("{what}: ran, giving {:?}", r.outputs[0].dims()),
    }
}

#[test]
fn hostile_shapes_are_refused_before_running() {
    let budget = MemoryBudget::new(256 * MIB);
    let ex = executor(&budget);
    let big = |h: usize, w: usize| Pad {
        top: h,
        bottom: 0,
        left: w,
        right: 0,
    };
    let cases: Vec<(&str, ShardOp<Tensor>)> = vec![
        (
            "stride-2 convolution of a 1×3 input, no padding",
            ShardOp::Conv2d {
                layer: "down".into(),
                input: inline(&[1, 4, 1, 3]),
                pad: no_pad(),
            },
        ),
        (
            "a 3×3 kernel over a 2×2 input",
            ShardOp::Conv2d {
                layer: "down".into(),
                input: inline(&[1, 4, 2, 2]),
                pad: no_pad(),
            },
        ),
        (
            "padding that overflows",
            ShardOp::Conv2d {
                layer: "down".into(),
                input: inline(&[1, 4, 4, 4]),
                pad: big(usize::MAX, 0),
            },
        ),
        (
            "huge padding",
            ShardOp::Conv2d {
                layer: "down".into(),
                input: inline(&[1, 4, 4, 4]),
                pad: big(1 << 20, 1 << 20),
            },
        ),
        (
            "up-sampling [1, 65536, 1, 1] to 65536 × 65536",
            ShardOp::UpsampleRows {
                input: inline(&[1, 65536, 1, 1]),
                src_first: 0,
                src_h: 1,
                dst_h: 65536,
                dst_first: 0,
                dst_len: 65536,
                dst_w: 65536,
            },
        ),
        (
            "a 1 GiB timestep embedding",
            ShardOp::TimestepEmbedding {
                timestep: 1.0,
                batch: 4096,
                dim: 65536,
                flip_sin_to_cos: true,
                shift: 0.0,
            },
        ),
        (
            "attention with a million keys",
            ShardOp::Attention {
                q: inline(&[1, 4096, 8]),
                k: inline(&[1, 1 << 20, 8]),
                v: inline(&[1, 1 << 20, 8]),
                heads: 1,
            },
        ),
        (
            "attention with 0 heads",
            ShardOp::Attention {
                q: inline(&[1, 4, 8]),
                k: inline(&[1, 4, 8]),
                v: inline(&[1, 4, 8]),
                heads: 0,
            },
        ),
        (
            "attention with heads not dividing the channels",
            ShardOp::Attention {
                q: inline(&[1, 4, 8]),
                k: inline(&[1, 4, 8]),
                v: inline(&[1, 4, 8]),
                heads: 3,
            },
        ),
        (
            "attention whose keys and values disagree",
            ShardOp::Attention {
                q: inline(&[1, 4, 8]),
                k: inline(&[1, 4, 8]),
                v: inline(&[1, 5, 8]),
                heads: 2,
            },
        ),
        (
            "GroupNorm statistics of a rank-3 tensor",
            ShardOp::GroupNormStats {
                layer: "norm".into(),
                input: inline(&[1, 4, 4]),
            },
        ),
        (
            "GroupNorm applied with short moments",
            ShardOp::GroupNormApply {
                layer: "norm".into(),
                input: inline(&[1, 4, 2, 2]),
                moments: inline(&[1, 1, 2]),
            },
        ),
        (
            "a concatenation of 64 copies of 4 MiB (256 MiB)",
            ShardOp::Cat {
                inputs: (0..64).map(|_| inline(&[1, 1 << 20])).collect(),
                dim: 0,
            },
        ),
        (
            "to_spatial whose sides overflow",
            ShardOp::ToSpatial {
                input: inline(&[1, 4, 2]),
                h: usize::MAX,
                w: 2,
            },
        ),
        (
            "a reply larger than a reply may be (32 MiB)",
            ShardOp::Identity {
                input: inline(&[8, 1 << 20]),
            },
        ),
    ];
    for (what, op) in cases {
        refused(&ex, op, what);
        assert_eq!(budget.used(), 0, "{what}: the budget was not given back");
        still_works(&ex);
    }
}

#[test]
fn the_budget_is_shared_held_by_kept_tensors_and_given_back() {
    let budget = MemoryBudget::new(8 * MIB);
    let (a, b) = (executor(&budget), executor(&budget));
    let keep = |h: u64| ShardRequest {
        calls: vec![ShardCall {
            op: ShardOp::Identity {
                input: inline(&[1, 1 << 20]),
            },
            keep_as: Some(h),
            reply: false,
        }],
    };
    // Two sessions keep 4 MiB each: the budget is full, and a third tensor is refused in
    // either session (typed error, nothing kept).
    a.execute(&keep(1)).expect("session a keeps 4 MiB");
    b.execute(&keep(1)).expect("session b keeps 4 MiB");
    assert_eq!(budget.used(), 8 * MIB);
    assert!(matches!(
        a.execute(&keep(2)),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!((a.held_handles(), budget.used()), (1, 8 * MIB));
    // Releasing gives the bytes back; replacing a handle does not double-count it.
    let release = ShardRequest {
        calls: vec![ShardCall {
            op: ShardOp::Release { handle: 1 },
            keep_as: None,
            reply: false,
        }],
    };
    b.execute(&release).expect("release");
    assert_eq!(budget.used(), 4 * MIB);
    a.execute(&keep(1)).expect("replace a's handle");
    assert_eq!(budget.used(), 4 * MIB);
    drop(a);
    assert_eq!(budget.used(), 0, "a closed session gives its tensors back");
    drop(b);
}
