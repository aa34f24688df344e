//! Coded tensors a `veil-server` must refuse without harm (docs/PROTOCOL.md §8): a residual
//! for a slot it holds no reference for, and references beyond the session's byte budget, are
//! answered `BadRequest` and the session goes on; a quantized payload of the wrong length is
//! `Malformed`.

use veil_core::placement::WireDtype;
use veil_core::vocab::precision::ShardCodec;
use veil_core::wire::codec::encode;
use veil_core::wire::references::{CodecEnd, SendAs};
use veil_core::wire::{
    Compression, ErrorCode, Message, ReplyCoding, WireCall, WireOp, WireOperand, WireTensor,
};
use veil_server::{spawn_local, ServerLimits};

mod common;
use common::{exchange, limits, load, model_id, raw_session, shard_model};

fn identity(t: WireTensor, keep: u64) -> Vec<u8> {
    let msg = Message::Request {
        calls: vec![WireCall {
            op: WireOp::Identity {
                input: WireOperand::Inline(t),
            },
            keep_as: Some(keep),
            reply: true,
        }],
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
        reply_coding: ReplyCoding {
            codec: ShardCodec::ResidualInt4,
            exact: false,
            first_slot: 0,
        },
    };
    encode(&msg, Compression::None).expect("encode")
}

fn raw(n: usize, v: f32) -> WireTensor {
    WireTensor::raw(
        WireDtype::F32,
        vec![1, n],
        (0..n).flat_map(|i| (v + i as f32).to_le_bytes()).collect(),
    )
}

fn code(end: &mut CodecEnd, t: WireTensor, slot: u32) -> WireTensor {
    let how = SendAs {
        codec: ShardCodec::ResidualInt4,
        exact: false,
        slot,
    };
    end.encode(t, how).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_coded_requests_are_refused_and_the_session_lives() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        max_session_bytes: 64 << 10,
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let (_ep, conn) = raw_session(&cluster.specs[0], id).await;
    let mut client = CodecEnd::new(usize::MAX, 1 << 16);

    // A residual before its key frame: the server holds no reference for slot 0.
    let mut other = CodecEnd::new(usize::MAX, 16);
    code(&mut other, raw(256, 0.0), 0);
    let residual = code(&mut other, raw(256, 1.0), 0);
    match exchange(&conn, &identity(residual, 1)).await {
        Some(Message::Error { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("no reference"), "{message}");
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }

    // A key frame, then a residual against it: both decode, and the replies (coded by the
    // server under residual-int4) decode at the client to the values within int4's error.
    for step in 0..2u32 {
        let t = code(&mut client, raw(256, step as f32), 0);
        match exchange(&conn, &identity(t, 2)).await {
            Some(Message::Reply { outputs }) => {
                assert_eq!(outputs.len(), 1);
                let back = client.decode(outputs[0].clone()).expect("reply decodes");
                let v = back.values().expect("values");
                let want: Vec<f32> = (0..256).map(|i| step as f32 + i as f32).collect();
                let err = v
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 255.0 / 7.0, "step {step}: error {err}");
            }
            other => panic!("step {step}: expected a reply, got {other:?}"),
        }
    }

    // References beyond the session's 64 KiB: refused before anything is kept.
    let big = code(&mut client, raw(32 << 10, 0.0), 7);
    match exchange(&conn, &identity(big, 3)).await {
        Some(Message::Error { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("budget"), "{message}");
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }

    // A quantized payload one byte short (its length field says so too): Malformed, and the
    // connection is closed. The tensor is the call's last field but keep (1 + 8 bytes) and
    // reply (1 byte).
    let t = code(&mut client, raw(256, 3.0), 0);
    let len = t.data.len();
    let good = identity(t, 4);
    let end = good.len() - 10;
    let start = end - len;
    let mut bytes = good[..start - 8].to_vec();
    bytes.extend_from_slice(&(len as u64 - 1).to_le_bytes());
    bytes.extend_from_slice(&good[start..end - 1]);
    bytes.extend_from_slice(&good[end..]);
    match exchange(&conn, &bytes).await {
        Some(Message::Error { code, .. }) => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("expected Malformed, got {other:?}"),
    }
    cluster.shutdown().await;
}
