//! Helpers of the QUIC test files: the tiny model and its shard model, test server limits, a raw
//! session (a pinned connection and a hand-made Hello), one raw exchange, encoded requests.

// Each test file that includes this module uses a subset of it.
#![allow(dead_code)]

pub mod hostile;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use veil_core::client::pipeline::StableDiffusion;
use veil_core::wire::identity::model_identity;
use veil_server::{spawn_local, ServerLimits, ShardModel};
use veil_tests::tiny_model;

use candle_core::Tensor;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardRequest};
use veil_core::placement::engine::{Pad, WireDtype};
use veil_core::transport::quic::connect_quic;
use veil_core::transport::{ServerSpec, TransportTuning};
use veil_core::wire::codec::{decode, encode};
use veil_core::wire::convert::request_to_wire;
use veil_core::wire::{Compression, Limits, Message, ModelId, PROTOCOL_VERSION};

/// A raw session: pinned QUIC connection plus a hand-made Hello.
pub async fn raw_session(spec: &ServerSpec, id: ModelId) -> (quinn::Endpoint, quinn::Connection) {
    let (endpoint, conn) = connect_quic(
        0,
        &spec.address,
        spec.fingerprint,
        &TransportTuning::default(),
    )
    .await
    .expect("quic");
    match exchange(&conn, &hello_bytes(spec, id)).await {
        Some(Message::Welcome { .. }) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    (endpoint, conn)
}

/// Sends raw bytes on a new stream; the decoded answer, or None when the stream/connection
/// died without one.
pub async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Option<Message> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(bytes).await.ok()?;
    send.finish().ok()?;
    let buf = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(64 << 20))
        .await
        .ok()?
        .ok()?;
    decode(&buf, &Limits::default()).ok()
}

pub fn conv_request(layer: &str, input: Operand<Tensor>) -> Vec<u8> {
    request_bytes(&ShardRequest {
        calls: vec![ShardCall::reply(ShardOp::Conv2d {
            layer: layer.into(),
            input,
            pad: Pad {
                top: 1,
                bottom: 1,
                left: 1,
                right: 1,
            },
        })],
    })
}

/// The encoded Hello of `spec`'s token for model `id`.
pub fn hello_bytes(spec: &ServerSpec, id: ModelId) -> Vec<u8> {
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        token: spec.token.clone(),
        model_id: id,
    };
    encode(&hello, Compression::None).expect("hello")
}

/// An encoded Request of `req` (f32 both ways, no compression).
pub fn request_bytes(req: &ShardRequest<Tensor>) -> Vec<u8> {
    let calls = request_to_wire(req, WireDtype::F32).expect("to wire");
    encode(
        &Message::Request {
            calls,
            reply_dtype: WireDtype::F32,
            compression: Compression::None,
            reply_coding: Default::default(),
        },
        Compression::None,
    )
    .expect("encode")
}

/// An f32 tensor of zeros on the CPU.
pub fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, candle_core::DType::F32, &candle_core::Device::Cpu).expect("zeros")
}

pub fn load() -> StableDiffusion {
    StableDiffusion::load(&tiny_model(), &candle_core::Device::Cpu).expect("load tiny model")
}

pub fn model_id(sd: &StableDiffusion) -> ModelId {
    model_identity(&sd.unet, sd.unet_engine.weights())
}

pub fn shard_model(sd: &StableDiffusion) -> Arc<ShardModel> {
    Arc::new(ShardModel::from_engine(&sd.unet, &sd.unet_engine))
}

/// Small enough that an oversized message is cheap to send, far above what a 64 px request
/// needs.
pub fn limits() -> ServerLimits {
    ServerLimits {
        max_message_bytes: 4 << 20,
        max_tensor_bytes: 4 << 20,
        idle_timeout: Duration::from_secs(10),
        ..ServerLimits::default()
    }
}

/// A server on its own runtime thread that can be killed like a crashed process: its runtime is
/// torn down without closing the endpoint, so clients get no CONNECTION_CLOSE — only silence.
pub struct Killable {
    pub spec: ServerSpec,
    pub kill: std::sync::mpsc::Sender<()>,
}

pub fn spawn_killable(model: Arc<ShardModel>) -> Killable {
    let (spec_tx, spec_rx) = std::sync::mpsc::channel();
    let (kill, kill_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let cluster = rt
            .block_on(async { spawn_local(1, model, limits()) })
            .expect("server");
        spec_tx.send(cluster.specs[0].clone()).expect("spec");
        let _ = kill_rx.recv();
        // No graceful close: forget the handles (their Drop would send CONNECTION_CLOSE) and
        // drop every task of the runtime, sockets' readers included.
        std::mem::forget(cluster);
        rt.shutdown_background();
    });
    Killable {
        spec: spec_rx.recv().expect("killable server started"),
        kill,
    }
}

/// A `strict` generation of the tiny model at 64 px with DDIM over `steps` steps, f32 wire.
pub fn strict_64px(steps: usize, seed: u64) -> veil_core::client::pipeline::GenerateOptions {
    veil_core::client::pipeline::GenerateOptions {
        prompt: "a small red circle at the top left on a white background".into(),
        steps,
        guidance: 5.0,
        seed,
        width: 64,
        height: 64,
        scheduler: veil_core::model::scheduler::SchedulerKind::Ddim,
        policy: veil_core::placement::Policy::Strict,
        wire: veil_core::placement::WireDtype::F32,
        ..Default::default()
    }
}
