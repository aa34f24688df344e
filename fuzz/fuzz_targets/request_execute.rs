//! Decodes arbitrary bytes the way `veil-server` does and *executes* what decodes, against one
//! session that lives across inputs (its handles and codec references persist, as a
//! connection's do) under a memory cap: the session's shard codec end decodes the calls,
//! `calls_from_wire` builds them, a `ShardExecutor` over a small layer table admits and runs them
//! (a stride-1 and a stride-2 convolution, a GroupNorm, a LayerNorm and a GEGLU projection, named
//! as the `frame_decoder` seeds name them), and the replies are converted and coded back. Any
//! panic, abort, out-of-memory or timeout is a bug: hostile requests must come back as errors.
//! After every input the memory budget in use equals the bytes the session keeps (nothing
//! admitted is left reserved).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use veil_core::placement::admission::MemoryBudget;
use veil_core::placement::backend::ShardExecutor;
use veil_core::placement::engine::CandleEngine;
use veil_core::vocab::layers::{Conv2dSpec, GroupNormSpec, LayerNormSpec, LinearSpec, ShardLayer};
use veil_core::wire::codec::decode;
use veil_core::wire::convert::{calls_from_wire, reply_to_wire};
use veil_core::wire::references::{exact_reply, CodecEnd};
use veil_core::wire::{Limits, Message};

const MIB: u64 = 1 << 20;

struct Session {
    executor: ShardExecutor<CandleEngine>,
    codec: Mutex<CodecEnd>,
    budget: Arc<MemoryBudget>,
}

fn layers() -> Vec<ShardLayer> {
    vec![
        ShardLayer::Conv2d(Conv2dSpec::new("conv_in".into(), 4, 8, 3, 1, 1)),
        ShardLayer::Conv2d(Conv2dSpec::new(
            "down_blocks.0.downsamplers.0.conv".into(),
            8,
            8,
            3,
            2,
            0,
        )),
        ShardLayer::GroupNorm(GroupNormSpec::new(
            "down_blocks.0.resnets.0.norm1".into(),
            2,
            2,
            1e-5,
        )),
        ShardLayer::LayerNorm(LayerNormSpec::new(
            "mid_block.attentions.0.transformer_blocks.0.norm3".into(),
            8,
            1e-5,
        )),
        ShardLayer::Linear(LinearSpec::new(
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj".into(),
            8,
            32,
            true,
        )),
    ]
}

fn session() -> &'static Session {
    static SESSION: OnceLock<Session> = OnceLock::new();
    SESSION.get_or_init(|| {
        let mut weights = HashMap::new();
        let mut table = HashMap::new();
        for l in layers() {
            for (name, shape) in l.params() {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect();
                let t = Tensor::from_vec(values, shape, &Device::Cpu).expect("weight");
                weights.insert(name, t.to_dtype(DType::F32).expect("f32"));
            }
            table.insert(l.name().to_string(), l);
        }
        let budget = MemoryBudget::new(64 * MIB);
        Session {
            executor: ShardExecutor::new(CandleEngine::new(weights, Device::Cpu), table)
                .with_limits(16 * MIB, 4 * MIB, budget.clone()),
            codec: Mutex::new(CodecEnd::new(16 << 20, 64)),
            budget,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = session();
    let limits = Limits {
        max_message_bytes: 1 << 20,
        max_tensor_bytes: 1 << 20,
        ..Limits::default()
    };
    let Ok(Message::Request {
        mut calls,
        reply_dtype,
        reply_coding,
        ..
    }) = decode(data, &limits)
    else {
        return;
    };
    let Ok(mut codec) = s.codec.lock() else {
        return;
    };
    if codec.decode_calls(&mut calls).is_err() {
        return;
    }
    let exact: Vec<bool> = calls
        .iter()
        .filter(|c| c.reply)
        .map(|c| exact_reply(&c.op))
        .collect();
    if let Ok(request) = calls_from_wire(calls, &Device::Cpu) {
        if let Ok(reply) = s.executor.execute(&request) {
            if let Ok(raw) = reply_to_wire(&reply, &request, reply_dtype) {
                let _ = codec.encode_replies(raw, &exact, reply_coding);
            }
        }
    }
    assert_eq!(
        s.budget.used(),
        s.executor.held_bytes(),
        "budget reserved beyond the kept tensors"
    );
});
