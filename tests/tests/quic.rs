//! Real `veil-server`s on loopback, driven over QUIC by the placement runtime: the image through
//! the wire equals the in-process split bit for bit (f32), stays ≥ 40 dB with f16, and zstd is
//! lossless; every handshake failure has its typed error (token, pinned certificate, model);
//! a server killed mid-generation fails the generation within the configured timeout; malformed
//! frames close only their own connection while a good client completes; eight concurrent
//! clients on one server all get correct images.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use quinn::VarInt;
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::Operand;
use veil_core::placement::{GnVariant, Policy, ShardBackend, WireDtype};
use veil_core::transport::quic::{close_code, connect_quic};
use veil_core::transport::{
    connect_all, load_server_list, ClientOptions, Fingerprint, ServerSpec, TransportError,
    TransportTuning,
};
use veil_core::wire::identity::shard_parameters;
use veil_core::wire::{Compression, ErrorCode, Message, ModelId};
use veil_core::Error;
use veil_server::{spawn_local, ServerLimits, ShardModel};
use veil_tests::{psnr, random_weights};

mod common;
use common::{
    conv_request, exchange, limits, load, model_id, raw_session, shard_model, spawn_killable,
};

const PROMPT: &str = "a small red circle at the top left on a white background";

/// 64 px (latent 8×8: the U-Net's lower level has 4 rows, one per server at N = 4), few steps.
fn opts(policy: Policy, wire: WireDtype, seed: u64) -> GenerateOptions {
    GenerateOptions {
        prompt: PROMPT.into(),
        steps: 3,
        guidance: 5.0,
        seed,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        policy,
        wire,
        ..Default::default()
    }
}

fn ppidm() -> Policy {
    Policy::Ppidm {
        gn: GnVariant::Exact,
    }
}

fn client(wire: WireDtype, compression: Compression) -> ClientOptions {
    ClientOptions {
        wire,
        compression,
        request_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

async fn generate(
    sd: &StableDiffusion,
    o: &GenerateOptions,
    backends: &[Arc<dyn ShardBackend<Tensor>>],
) -> veil_core::Result<veil_core::client::pipeline::Generation> {
    sd.generate(o, backends, &mut |_| {}).await
}

fn transport_error<T>(r: Result<T, Error>) -> TransportError {
    match r {
        Err(Error::Transport(t)) => t,
        Err(other) => panic!("expected a transport error, got {other}"),
        Ok(_) => panic!("expected a transport error, got success"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_wire_is_bit_identical_to_the_in_process_split_and_zstd_is_lossless() {
    let sd = load();
    let reference = generate(
        &sd,
        &opts(ppidm(), WireDtype::F32, 7),
        &sd.in_process_backends(4),
    )
    .await
    .expect("in-process");
    let cluster = spawn_local(4, shard_model(&sd), limits()).expect("servers");
    for compression in [
        Compression::None,
        Compression::Zstd(3),
        Compression::ZstdByteSplit(3),
    ] {
        let backends = connect_all(
            &cluster.specs,
            model_id(&sd),
            &client(WireDtype::F32, compression),
        )
        .await
        .expect("connect");
        let out = generate(&sd, &opts(ppidm(), WireDtype::F32, 7), &backends)
            .await
            .expect("quic");
        assert_eq!(
            max_abs_diff(&out.latents, &reference.latents),
            0.0,
            "{compression:?}: latents differ from the in-process split"
        );
        assert_eq!(max_abs_diff(&out.image, &reference.image), 0.0);
        // The same tensors; what travelled is smaller only where zstd compressed it.
        assert_eq!(out.stats.raw_bytes_up, reference.stats.bytes_up);
        assert_eq!(out.stats.raw_bytes_down, reference.stats.bytes_down);
        if compression == Compression::None {
            assert_eq!(out.stats.bytes_up, reference.stats.bytes_up);
            assert_eq!(out.stats.bytes_down, reference.stats.bytes_down);
        } else {
            assert!(
                out.stats.bytes_up < out.stats.raw_bytes_up,
                "{compression:?}"
            );
            assert!(
                out.stats.bytes_down < out.stats.raw_bytes_down,
                "{compression:?}"
            );
        }
        assert_eq!(out.stats.round_trips, reference.stats.round_trips);
    }
    for s in &cluster.servers {
        let st = s.stats();
        assert_eq!(st.sessions, 3);
        assert!(
            st.replies > 0 && st.malformed == 0 && st.bad_requests == 0,
            "{st:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_wire_keeps_40_db_and_zstd_byte_split_changes_nothing() {
    let sd = load();
    let local = generate(&sd, &opts(Policy::Local, WireDtype::F32, 5), &[])
        .await
        .expect("local");
    let cluster = spawn_local(4, shard_model(&sd), limits()).expect("servers");
    let mut images = Vec::new();
    for compression in [Compression::None, Compression::ZstdByteSplit(3)] {
        let backends = connect_all(
            &cluster.specs,
            model_id(&sd),
            &client(WireDtype::F16, compression),
        )
        .await
        .expect("connect");
        let out = generate(&sd, &opts(ppidm(), WireDtype::F16, 5), &backends)
            .await
            .expect("quic f16");
        let db = psnr(&out.image, &local.image);
        println!("ppidm exact, N = 4, f16 wire, {compression:?}: {db:.1} dB vs local");
        assert!(db >= 40.0, "{db} dB");
        images.push(out.image);
    }
    assert_eq!(
        max_abs_diff(&images[0], &images[1]),
        0.0,
        "zstd is lossless"
    );
    // The same f16 rounding in-process: the wire adds nothing beyond the dtype.
    let in_process = generate(
        &sd,
        &opts(ppidm(), WireDtype::F16, 5),
        &sd.in_process_backends(4),
    )
    .await
    .expect("in-process f16");
    assert_eq!(max_abs_diff(&images[0], &in_process.image), 0.0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_failures_are_typed() {
    let sd = load();
    let id = model_id(&sd);
    let cluster = spawn_local(2, shard_model(&sd), limits()).expect("servers");
    let options = client(WireDtype::F32, Compression::None);

    // Wrong token on server 1.
    let mut specs = cluster.specs.clone();
    specs[1].token = "not-the-token".into();
    match connect_all(&specs, id, &options).await {
        Err(TransportError::AuthFailed { server, .. }) => assert_eq!(server, 1),
        other => panic!("expected AuthFailed, got {:?}", other.map(|v| v.len())),
    }
    let st = cluster.servers[1].stats();
    assert_eq!((st.refused, st.sessions, st.requests), (1, 0, 0), "{st:?}");

    // Wrong pinned fingerprint on server 0: refused during TLS, before any Veil message.
    let before = cluster.servers[0].stats();
    let mut specs = cluster.specs.clone();
    let pinned = Fingerprint::of_der(b"some other certificate");
    specs[0].fingerprint = pinned;
    match connect_all(&specs, id, &options).await {
        Err(TransportError::CertificateMismatch {
            server,
            expected,
            actual,
            ..
        }) => {
            assert_eq!(server, 0);
            assert_eq!(expected, pinned.hex());
            assert_eq!(actual, cluster.servers[0].fingerprint().hex());
        }
        other => panic!(
            "expected CertificateMismatch, got {:?}",
            other.map(|v| v.len())
        ),
    }
    // The server never saw a Hello (so no token) nor any request, let alone a tensor.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = cluster.servers[0].stats();
    assert_eq!(after.hellos, before.hellos, "{after:?}");
    assert_eq!(after.requests, before.requests);
    assert_eq!(after.bytes_in, before.bytes_in);
    assert_eq!(after.sessions, before.sessions);

    // A server holding different weights.
    let other = {
        let params = shard_parameters(&sd.unet);
        ShardModel::from_weights(&sd.unet, random_weights(&params, 99), &Device::Cpu)
    };
    let other_id = other.id();
    assert_ne!(other_id, id);
    let stranger = spawn_local(1, Arc::new(other), limits()).expect("server");
    let specs = vec![cluster.specs[0].clone(), stranger.specs[0].clone()];
    match connect_all(&specs, id, &options).await {
        Err(TransportError::ModelMismatch {
            server,
            expected,
            actual,
            ..
        }) => {
            assert_eq!(server, 1);
            assert_eq!(expected, hex(&id));
            assert_eq!(actual, hex(&other_id));
        }
        other => panic!("expected ModelMismatch, got {:?}", other.map(|v| v.len())),
    }
    assert_eq!(stranger.servers[0].stats().requests, 0);

    // Nobody listening: Unreachable within the connect timeout.
    let dead = {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let addr = sock.local_addr().expect("addr");
        drop(sock);
        ServerSpec {
            address: addr.to_string(),
            ..cluster.specs[0].clone()
        }
    };
    let quick = ClientOptions {
        connect_timeout: Duration::from_millis(800),
        ..options.clone()
    };
    let t = Instant::now();
    match connect_all(&[dead], id, &quick).await {
        Err(TransportError::Unreachable { server: 0, .. }) => {}
        other => panic!("expected Unreachable, got {:?}", other.map(|v| v.len())),
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    // The right specs, written as servers.toml, still work after all that.
    let dir = std::env::temp_dir().join(format!("veil-quic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("b.token"), format!("{}\n", cluster.specs[1].token)).expect("token");
    let toml = format!(
        "[[server]]\naddress = \"{}\"\nfingerprint = \"{}\"\ntoken = \"{}\"\n\n\
         [[server]]\naddress = \"{}\"\nfingerprint = \"{}\"\ntoken_file = \"b.token\"\n",
        cluster.specs[0].address,
        cluster.specs[0].fingerprint,
        cluster.specs[0].token,
        cluster.specs[1].address,
        cluster.specs[1].fingerprint,
    );
    std::fs::write(dir.join("servers.toml"), toml).expect("servers.toml");
    let specs = load_server_list(&dir.join("servers.toml")).expect("server list");
    assert_eq!(specs, cluster.specs);
    let backends = connect_all(&specs, id, &options).await.expect("connect");
    assert_eq!(backends.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);

    // At the session limit: Busy.
    let busy = spawn_local(
        1,
        shard_model(&sd),
        ServerLimits {
            max_sessions: 1,
            ..limits()
        },
    )
    .expect("server");
    let first = connect_all(&busy.specs, id, &options)
        .await
        .expect("first session");
    match connect_all(&busy.specs, id, &options).await {
        Err(TransportError::ServerError { message, .. }) => {
            assert!(message.contains("Busy"), "{message}")
        }
        other => panic!("expected Busy, got {:?}", other.map(|v| v.len())),
    }
    drop(first);
    busy.shutdown().await;
    stranger.shutdown().await;
    cluster.shutdown().await;
}

fn hex(id: &ModelId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_generation_fails_within_the_timeout() {
    let sd = load();
    let healthy = spawn_local(1, shard_model(&sd), limits()).expect("server");
    let victim = spawn_killable(shard_model(&sd));
    let timeout = Duration::from_secs(2);
    let options = ClientOptions {
        request_timeout: timeout,
        ..client(WireDtype::F32, Compression::None)
    };
    let specs = vec![healthy.specs[0].clone(), victim.spec.clone()];
    let backends = connect_all(&specs, model_id(&sd), &options)
        .await
        .expect("connect");
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut o = opts(ppidm(), WireDtype::F32, 11);
    o.steps = 6;
    let (kill, k) = (victim.kill.clone(), killed_at.clone());
    let mut steps = 0;
    let result = sd
        .generate(&o, &backends, &mut |p| {
            steps = p.step;
            if p.step == 1 {
                let _ = kill.send(());
                if let Ok(mut g) = k.lock() {
                    *g = Some(Instant::now());
                }
            }
        })
        .await;
    let waited = killed_at
        .lock()
        .ok()
        .and_then(|g| *g)
        .map(|t| t.elapsed())
        .expect("the kill happened");
    assert!(steps < o.steps, "the generation went on after the kill");
    let e = transport_error(result.map(|g| g.image));
    println!("after the kill: {e} ({waited:?})");
    assert!(
        matches!(
            e,
            TransportError::Timeout { server: 1, .. }
                | TransportError::ConnectionLost { server: 1, .. }
        ),
        "{e}"
    );
    assert!(
        waited < timeout + Duration::from_millis(1500),
        "failed after {waited:?}, the timeout is {timeout:?}"
    );
    // The failed session is closed: later requests fail at once.
    let t = Instant::now();
    let again = generate(&sd, &o, &backends).await;
    assert!(again.is_err() && t.elapsed() < Duration::from_secs(1));
    healthy.shutdown().await;
}

async fn expect_error(conn: &quinn::Connection, bytes: &[u8], want: ErrorCode, case: &str) {
    match exchange(conn, bytes).await {
        Some(Message::Error { code, message }) => {
            assert_eq!(code, want, "{case}: {message}");
            println!("{case}: {code:?} ({message})");
        }
        other => panic!("{case}: expected an Error {want:?}, got {other:?}"),
    }
}

/// The server closes a connection that sent a malformed message.
async fn expect_closed(conn: &quinn::Connection, case: &str) {
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{case}: the connection stayed open"));
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                VarInt::from_u32(close_code::MALFORMED),
                "{case}"
            )
        }
        other => panic!("{case}: closed with {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let sd = load();
    let id = model_id(&sd);
    let cluster = spawn_local(1, shard_model(&sd), limits()).expect("server");
    let spec = cluster.specs[0].clone();
    let reference = generate(
        &sd,
        &opts(ppidm(), WireDtype::F32, 13),
        &sd.in_process_backends(1),
    )
    .await
    .expect("in-process");

    let good = async {
        let backends = connect_all(
            std::slice::from_ref(&spec),
            id,
            &client(WireDtype::F32, Compression::None),
        )
        .await
        .expect("good client connects");
        let out = generate(&sd, &opts(ppidm(), WireDtype::F32, 13), &backends)
            .await
            .expect("good client completes");
        assert_eq!(max_abs_diff(&out.image, &reference.image), 0.0);
        "done"
    };

    let bad = async {
        let conv = sd.unet.convolutions()[0].name.clone(); // conv_in: 4 → C channels
        let x = veil_tests::randn(&[1, 4, 6, 8], 1);
        let valid = conv_request(&conv, Operand::Inline(x.clone()));
        let data_len = 4 * 6 * 8 * 4;
        // Layout tail of a one-conv request: … u64 payload length, payload, 4 × u32 padding,
        // keep flag, reply flag.
        let len_at = valid.len() - 18 - data_len - 8;
        assert_eq!(
            valid[len_at..len_at + 8],
            (data_len as u64).to_le_bytes(),
            "payload length field located"
        );
        let dims_at = len_at - 4 * 4;
        let dtype_at = dims_at - 3;

        // Each malformed case on its own session: the server answers Malformed and closes it.
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        cases.push(("truncated", valid[..valid.len() / 2].to_vec()));
        let mut v = valid.clone();
        v[len_at..len_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        cases.push(("oversized payload length", v));
        let mut v = valid.clone();
        v[dtype_at] = 9;
        cases.push(("unknown dtype", v));
        let mut v = valid.clone();
        for d in 0..4 {
            v[dims_at + 4 * d..dims_at + 4 * d + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        cases.push(("shape product overflow", v));
        cases.push(("garbage", vec![0xA5; 300]));
        cases.push(("message over max_message_bytes", vec![0u8; 5 << 20]));
        let mut v = valid.clone();
        v.push(0);
        cases.push(("trailing byte", v));
        for (case, bytes) in &cases {
            let (_ep, conn) = raw_session(&spec, id).await;
            expect_error(&conn, bytes, ErrorCode::Malformed, case).await;
            expect_closed(&conn, case).await;
        }

        // A request before the handshake.
        let (_ep, conn) = connect_quic(
            0,
            &spec.address,
            spec.fingerprint,
            &TransportTuning::default(),
        )
        .await
        .expect("quic");
        expect_error(&conn, &valid, ErrorCode::WrongState, "request before Hello").await;

        // Wrong ops for the session: answered BadRequest, and the session goes on.
        let (_ep, conn) = raw_session(&spec, id).await;
        let gn = sd.unet.group_norms()[0].name.clone();
        let wrong: Vec<(&str, Vec<u8>)> = vec![
            (
                "conv on an unknown layer",
                conv_request("down_blocks.9.nope", Operand::Inline(x.clone())),
            ),
            (
                "conv on a GroupNorm layer",
                conv_request(&gn, Operand::Inline(x.clone())),
            ),
            (
                "unknown handle",
                conv_request(&conv, Operand::Handle(424_242)),
            ),
            (
                "wrong channel count",
                conv_request(&conv, Operand::Inline(veil_tests::randn(&[1, 3, 6, 8], 2))),
            ),
        ];
        for (case, bytes) in &wrong {
            expect_error(&conn, bytes, ErrorCode::BadRequest, case).await;
        }
        match exchange(&conn, &valid).await {
            Some(Message::Reply { outputs }) => assert_eq!(outputs.len(), 1),
            other => panic!("the session should survive bad requests, got {other:?}"),
        }
        cases.len()
    };

    let (good, malformed) = tokio::join!(good, bad);
    assert_eq!(good, "done");
    let st = cluster.servers[0].stats();
    println!("server stats: {st:?}");
    assert!(st.malformed >= malformed as u64, "{st:?}");
    assert!(st.bad_requests >= 4, "{st:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clients_on_one_server_all_get_correct_images() {
    let sd = load();
    let cluster = spawn_local(1, shard_model(&sd), limits()).expect("server");
    let mut references = Vec::new();
    for seed in 0..8u64 {
        let r = generate(
            &sd,
            &opts(ppidm(), WireDtype::F32, seed),
            &sd.in_process_backends(1),
        )
        .await
        .expect("in-process");
        references.push(r.image);
    }
    let id = model_id(&sd);
    let spec = cluster.specs[0].clone();
    let clients = (0..8u64).map(|seed| {
        let (sd, spec) = (&sd, spec.clone());
        async move {
            let backends = connect_all(&[spec], id, &client(WireDtype::F32, Compression::None))
                .await
                .expect("connect");
            generate(sd, &opts(ppidm(), WireDtype::F32, seed), &backends)
                .await
                .expect("generation")
                .image
        }
    });
    let images = futures::future::join_all(clients).await;
    for (seed, (img, reference)) in images.iter().zip(&references).enumerate() {
        assert_eq!(max_abs_diff(img, reference), 0.0, "client {seed}");
    }
    let st = cluster.servers[0].stats();
    assert_eq!(st.sessions, 8, "{st:?}");
    cluster.shutdown().await;
}
