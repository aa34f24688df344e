//! A tenant's `veil-server` under pressure, on loopback: silent peers that never say Hello do
//! not lock honest clients out; a full compute queue answers `Busy` and the session lives on;
//! the metrics endpoint's counters move with the traffic and its health check answers.

use std::time::{Duration, Instant};

use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardRequest};
use veil_core::placement::engine::Pad;
use veil_core::transport::quic::connect_quic;
use veil_core::transport::tls::client_config;
use veil_core::transport::TransportTuning;
use veil_core::wire::{ErrorCode, Message};
use veil_server::{spawn_local, ServerLimits};

mod common;
use common::{
    conv_request, exchange, hello_bytes, limits, load, model_id, raw_session, request_bytes,
    shard_model, zeros,
};

/// 128 peers that finish the QUIC handshake and never say Hello (the old server counted them
/// against twice its session limit and refused everyone else until they timed out) do not lock
/// an honest client out: it gets its Welcome within a second, and its session works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_do_not_lock_out_an_honest_client() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        max_sessions: 4,
        max_pending_hellos: 16,
        handshake_timeout: Duration::from_secs(30),
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let spec = &cluster.specs[0];
    let mut silent = Vec::new();
    for _ in 0..128 {
        let c = connect_quic(
            0,
            &spec.address,
            spec.fingerprint,
            &TransportTuning::default(),
        )
        .await
        .expect("a silent peer's QUIC handshake");
        silent.push(c);
    }
    let t = Instant::now();
    let (_endpoint, conn) = tokio::time::timeout(Duration::from_secs(1), raw_session(spec, id))
        .await
        .expect("Welcome within a second beside 128 silent peers");
    println!("Welcome after {:?} beside 128 silent peers", t.elapsed());
    // The session works: a convolution request is answered.
    let input = Operand::Inline(zeros(&[1, 4, 4, 4]));
    match exchange(&conn, &conv_request("conv_in", input)).await {
        Some(Message::Reply { outputs }) => assert_eq!(outputs.len(), 1),
        other => panic!("expected a Reply, got {other:?}"),
    }
    // At most `max_pending_hellos` silent peers are still open: the rest were closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = silent
        .iter()
        .filter(|(_, c)| c.close_reason().is_none())
        .count();
    assert!(open <= 16, "{open} silent peers still open");
    drop(silent);
    cluster.shutdown().await;
}

/// One address flooding the server with silent handshakes evicts only its own connections: a
/// client from another address (127.0.0.2) that connected before the flood and says its Hello
/// only after it is still open and welcomed, while the flooding address keeps at most its
/// per-IP share of pending connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_evicts_only_its_own_connections() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        max_sessions: 4,
        max_pending_hellos: 64,
        max_pending_hellos_per_ip: 8,
        handshake_timeout: Duration::from_secs(30),
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let spec = &cluster.specs[0];
    // The other address's client: QUIC handshake now, Hello after the flood.
    let tuning = TransportTuning::default();
    let (config, _) = client_config(spec.fingerprint, &tuning).expect("tls");
    let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().expect("addr"))
        .expect("an endpoint on 127.0.0.2");
    let addr: std::net::SocketAddr = spec.address.parse().expect("server address");
    let other = endpoint
        .connect_with(config, addr, "veil-shard")
        .expect("connect")
        .await
        .expect("QUIC handshake from 127.0.0.2");
    let mut silent = Vec::new();
    for _ in 0..128 {
        silent.push(
            connect_quic(0, &spec.address, spec.fingerprint, &tuning)
                .await
                .expect("a silent peer's QUIC handshake"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = silent
        .iter()
        .filter(|(_, c)| c.close_reason().is_none())
        .count();
    println!("{open} of 128 silent connections from 127.0.0.1 still open");
    assert!(open <= 8, "{open} silent peers from one address still open");
    assert!(
        other.close_reason().is_none(),
        "the flood evicted another address's connection"
    );
    match exchange(&other, &hello_bytes(spec, id)).await {
        Some(Message::Welcome { .. }) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    drop(silent);
    cluster.shutdown().await;
}

/// A client that asks for a 2 MiB reply and never reads it (its 64 KiB stream window holds the
/// server's write) is closed as a slow peer once the pace's deadline passes (1 s grace plus a
/// second per MiB here), instead of holding the reply's buffers for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_not_read_is_cut_off() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        request_grace: Duration::from_secs(1),
        min_request_rate: 1 << 20,
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let spec = &cluster.specs[0];
    let tuning = TransportTuning {
        stream_window: 64 << 10,
        connection_window: 128 << 10,
        ..TransportTuning::default()
    };
    let (_endpoint, conn) = connect_quic(0, &spec.address, spec.fingerprint, &tuning)
        .await
        .expect("quic");
    match exchange(&conn, &hello_bytes(spec, id)).await {
        Some(Message::Welcome { .. }) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    let request = request_bytes(&ShardRequest {
        calls: vec![ShardCall::reply(ShardOp::Identity {
            input: Operand::Inline(zeros(&[1, 512 << 10])),
        })],
    });
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(&request).await.expect("request");
    send.finish().expect("finish");
    let t = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed within 10 s");
    println!("closed after {:?}: {reason}", t.elapsed());
    assert!(reason.to_string().contains("too slow"), "{reason}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    // The server is fine: a new session works.
    let (_e, fresh) = raw_session(spec, id).await;
    let input = Operand::Inline(zeros(&[1, 4, 4, 4]));
    assert!(matches!(
        exchange(&fresh, &conv_request("conv_in", input)).await,
        Some(Message::Reply { .. })
    ));
    cluster.shutdown().await;
}

/// Compute turns are shared by all sessions and their queue is bounded: with one turn and one
/// waiting place, the third of three heavy requests sent at once is answered `Busy` at once,
/// and the session still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_compute_queue_answers_busy() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        max_message_bytes: 64 << 20,
        max_tensor_bytes: 64 << 20,
        max_concurrent_work: 1,
        max_queued_work: 1,
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let (_endpoint, conn) = raw_session(&cluster.specs[0], id).await;
    // A 1024 × 1024 convolution kept under a handle (about 2.4 GFLOP, no reply tensor).
    let heavy = {
        let x = zeros(&[1, 4, 1024, 1024]);
        let req = ShardRequest {
            calls: vec![ShardCall {
                op: ShardOp::Conv2d {
                    layer: "conv_in".into(),
                    input: Operand::Inline(x),
                    pad: Pad {
                        top: 1,
                        bottom: 1,
                        left: 1,
                        right: 1,
                    },
                },
                keep_as: Some(1),
                reply: false,
            }],
        };
        request_bytes(&req)
    };
    let answers = futures::future::join_all((0..3).map(|_| exchange(&conn, &heavy))).await;
    let busy = answers
        .iter()
        .filter(|a| {
            matches!(
                a,
                Some(Message::Error {
                    code: ErrorCode::Busy,
                    ..
                })
            )
        })
        .count();
    let done = answers
        .iter()
        .filter(|a| matches!(a, Some(Message::Reply { .. })))
        .count();
    println!("three heavy requests at once: {done} done, {busy} busy");
    assert!(busy >= 1 && done >= 1, "{answers:?}");
    let input = Operand::Inline(zeros(&[1, 4, 4, 4]));
    match exchange(&conn, &conv_request("conv_in", input)).await {
        Some(Message::Reply { outputs }) => assert_eq!(outputs.len(), 1),
        other => panic!("expected a Reply, got {other:?}"),
    }
    cluster.shutdown().await;
}

/// `GET path` on the metrics endpoint: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut all = String::new();
    s.read_to_string(&mut all).await.expect("read");
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of a metric line `name value` in a Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_sessions_requests_and_refusals() {
    let sd = load();
    let id = model_id(&sd);
    let token = veil_server::random_token();
    let server = veil_server::ShardServer::start(
        veil_server::ServerOptions {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: vec![token.clone()],
            limits: limits(),
            identity: veil_server::TlsIdentity::generate().expect("identity"),
            metrics_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        },
        shard_model(&sd),
    )
    .expect("server");
    let at = server.metrics_addr().expect("a metrics address");
    let spec = veil_core::transport::ServerSpec {
        address: server.local_addr().to_string(),
        fingerprint: server.fingerprint(),
        token,
        tenant: None,
    };
    assert_eq!(
        http_get(at, "/healthz").await,
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    assert!(http_get(at, "/nothing").await.0.contains("404"));
    let (status, before) = http_get(at, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric(&before, "veil_requests_total"), 0);
    assert_eq!(metric(&before, "veil_sessions_active"), 0);

    let (_endpoint, conn) = raw_session(&spec, id).await;
    let input = Operand::Inline(zeros(&[1, 4, 4, 4]));
    assert!(matches!(
        exchange(&conn, &conv_request("conv_in", input)).await,
        Some(Message::Reply { .. })
    ));
    // A request admission refuses (a 3×3 kernel over a 1×1 input without padding).
    let tiny = Operand::Inline(zeros(&[1, 4, 1, 1]));
    let bad = {
        let req = ShardRequest {
            calls: vec![ShardCall::reply(ShardOp::Conv2d {
                layer: "conv_in".into(),
                input: tiny,
                pad: Pad {
                    top: 0,
                    bottom: 0,
                    left: 0,
                    right: 0,
                },
            })],
        };
        request_bytes(&req)
    };
    assert!(matches!(
        exchange(&conn, &bad).await,
        Some(Message::Error {
            code: ErrorCode::BadRequest,
            ..
        })
    ));
    let (_, after) = http_get(at, "/metrics").await;
    println!("{after}");
    assert_eq!(metric(&after, "veil_sessions_active"), 1);
    assert_eq!(metric(&after, "veil_sessions_total"), 1);
    assert_eq!(metric(&after, "veil_requests_total"), 2);
    assert_eq!(metric(&after, "veil_replies_total"), 1);
    assert_eq!(metric(&after, "veil_bad_requests_total"), 1);
    assert_eq!(metric(&after, "veil_request_seconds_count"), 2);
    assert!(metric(&after, "veil_bytes_in_total") > metric(&before, "veil_bytes_in_total"));
    assert_eq!(metric(&after, "veil_memory_budget_used_bytes"), 0);
    server.shutdown(Duration::from_secs(2)).await;
}

/// SIGTERM's drain: new sessions are refused (`Busy`, "draining") while an open one keeps
/// working; the drain ends when the last session closes; a session still open at the deadline
/// is closed with the reason "server draining".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_sessions_and_lets_open_ones_finish() {
    let sd = load();
    let id = model_id(&sd);
    let cluster = spawn_local(1, shard_model(&sd), limits()).expect("server");
    let spec = cluster.specs[0].clone();
    let small = || Operand::Inline(zeros(&[1, 4, 4, 4]));
    let server = &cluster.servers[0];

    // An open session, then a drain that ends once it closes.
    let (endpoint, conn) = raw_session(&spec, id).await;
    let drained = async {
        let t = Instant::now();
        server.drain(Duration::from_secs(20)).await;
        t.elapsed()
    };
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A new client is refused…
        let (_e, fresh) = connect_quic(
            0,
            &spec.address,
            spec.fingerprint,
            &TransportTuning::default(),
        )
        .await
        .expect("quic");
        match exchange(&fresh, &hello_bytes(&spec, id)).await {
            Some(Message::Error {
                code: ErrorCode::Busy,
                message,
            }) => {
                assert!(message.contains("draining"), "{message}")
            }
            other => panic!("expected Busy (draining), got {other:?}"),
        }
        // …the open session still works…
        assert!(matches!(
            exchange(&conn, &conv_request("conv_in", small())).await,
            Some(Message::Reply { .. })
        ));
        // …and closes.
        conn.close(quinn::VarInt::from_u32(0), b"done");
        drop(endpoint);
    };
    let (took, ()) = tokio::join!(drained, meanwhile);
    assert!(took < Duration::from_secs(10), "the drain took {took:?}");
    assert_eq!(server.active_sessions(), 0);
    cluster.shutdown().await;

    // A session still open at the deadline is closed with the reason "server draining".
    let cluster = spawn_local(1, shard_model(&sd), limits()).expect("server");
    let (_endpoint, conn) = raw_session(&cluster.specs[0], id).await;
    cluster.servers[0].drain(Duration::from_millis(300)).await;
    cluster.shutdown().await;
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(String::from_utf8_lossy(&c.reason), "server draining")
        }
        other => panic!("closed otherwise: {other:?}"),
    }
}

/// One tenant token holds at most `max_sessions_per_token` sessions; a closed one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_its_session_cap() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        max_sessions_per_token: 2,
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let spec = cluster.specs[0].clone();
    let a = raw_session(&spec, id).await;
    let _b = raw_session(&spec, id).await;
    let hello = hello_bytes(&spec, id);
    let third = || async {
        let (e, c) = connect_quic(
            0,
            &spec.address,
            spec.fingerprint,
            &TransportTuning::default(),
        )
        .await
        .expect("quic");
        (e, exchange(&c, &hello).await)
    };
    match third().await.1 {
        Some(Message::Error {
            code: ErrorCode::Busy,
            message,
        }) => {
            assert!(message.contains("token"), "{message}")
        }
        other => panic!("expected Busy for a third session, got {other:?}"),
    }
    a.1.close(quinn::VarInt::from_u32(0), b"done");
    drop(a);
    // The server sees the close within a moment; then a new session fits.
    let t = Instant::now();
    loop {
        let (_e, answer) = third().await;
        if matches!(answer, Some(Message::Welcome { .. })) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no place freed: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.shutdown().await;
}

/// A request that trickles in (10 bytes, then nothing) is answered `Malformed` ("too slow")
/// once it falls behind `request_grace` + bytes / `min_request_rate`, not held open forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_request_is_cut_off() {
    let sd = load();
    let id = model_id(&sd);
    let l = ServerLimits {
        request_grace: Duration::from_millis(500),
        min_request_rate: 1024,
        ..limits()
    };
    let cluster = spawn_local(1, shard_model(&sd), l).expect("server");
    let (_endpoint, conn) = raw_session(&cluster.specs[0], id).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"VEIL slow").await.expect("a few bytes");
    let t = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16))
        .await
        .expect("an answer within 5 s")
        .expect("the answer");
    let msg = veil_core::wire::codec::decode(&answer, &veil_core::wire::Limits::default());
    match msg {
        Ok(Message::Error {
            code: ErrorCode::Malformed,
            message,
        }) => {
            assert!(message.contains("too slow"), "{message}")
        }
        other => panic!("expected Malformed (too slow), got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    cluster.shutdown().await;
}
