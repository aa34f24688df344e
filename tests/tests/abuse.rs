//! The abuse suite against a `veil-server` *process*: the binary named by `VEIL_SERVER_BIN` (CI
//! points it at the release build, where integer overflow wraps silently and an allocation
//! failure aborts), else the workspace's debug build. Each hostile request of the server issue
//! (the exact inputs that once crashed a release server) and the others it lists — a zstd bomb,
//! 10⁴ handles, huge K/T, heads 0, wrong ranks — is answered with an error within a second, the
//! process stays alive with its resident memory within its budget, and the session goes on
//! answering honest requests where the protocol keeps it open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use veil_core::placement::backend::{Operand, ShardOp, ShardRequest};
use veil_core::placement::engine::Pad;
use veil_core::wire::{ErrorCode, Message};

mod common;
use common::hostile::{call, cases, many_handles, no_pad};
use common::process::{identity, sample_peak, Server, BUDGET, MIB};
use common::{conv_request, exchange, raw_session, request_bytes, zeros};

/// An honest request (`conv_in` on an 8 × 8 latent) answered with a reply.
async fn honest(conn: &quinn::Connection) -> bool {
    let x = veil_tests::randn(&[1, 4, 8, 8], 3);
    matches!(
        exchange(conn, &conv_request("conv_in", Operand::Inline(x))).await,
        Some(Message::Reply { .. })
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_at_once_and_the_server_lives_within_its_budget() {
    let mut server = Server::start("abuse", false);
    let id = identity();
    let (mut endpoint, mut conn) = raw_session(&server.spec, id).await;
    assert!(honest(&conn).await, "an honest request before the abuse");
    let baseline = server.rss();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(server.child.id(), stop.clone());
    for (what, bytes) in cases() {
        let t = Instant::now();
        let answer = exchange(&conn, &bytes).await;
        let took = t.elapsed();
        assert!(server.alive(), "{what}: the server process died");
        println!("{what}: {answer:?} in {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "{what}: answered after {took:?}"
        );
        match answer {
            Some(Message::Error {
                code: ErrorCode::BadRequest,
                ..
            }) => {
                assert!(honest(&conn).await, "{what}: the session no longer works");
            }
            // Broke a wire limit: answered Malformed and the connection closed.
            Some(Message::Error {
                code: ErrorCode::Malformed,
                ..
            }) => {
                assert!(!honest(&conn).await, "{what}: the session should be closed");
                (endpoint, conn) = raw_session(&server.spec, id).await;
                assert!(honest(&conn).await, "{what}: a new session does not work");
            }
            other => panic!("{what}: expected BadRequest or Malformed, got {other:?}"),
        }
    }
    let mut refused = 0;
    for (r, bytes) in many_handles().iter().enumerate() {
        match exchange(&conn, bytes).await {
            Some(Message::Reply { .. }) => assert!(r < 4, "request {r} of 10⁴ handles kept"),
            Some(Message::Error {
                code: ErrorCode::BadRequest,
                ..
            }) => refused += 1,
            other => panic!("10⁴ handles, request {r}: {other:?}"),
        }
    }
    assert!(
        refused >= 6,
        "the handle table stopped only {refused} requests"
    );
    assert!(honest(&conn).await, "the session after 10⁴ handles");
    assert!(server.alive());
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler").max(baseline);
    println!(
        "resident memory: {:.0} MiB at the start, {:.0} MiB at most (budget {} MiB)",
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        BUDGET / MIB
    );
    assert!(
        peak <= baseline + BUDGET,
        "resident memory grew by {} MiB, over the {} MiB budget",
        (peak - baseline) / MIB,
        BUDGET / MIB
    );
    drop(conn);
    endpoint.close(0u32.into(), b"done");
}

/// Honest requests over the layer table of the `request_execute` fuzz target (its seeds, with
/// the hostile ones above): a kept stride-1 convolution, the stride-2 one on its handle, a
/// GroupNorm's statistics and application, a LayerNorm and the GEGLU projection.
fn honest_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let x = veil_tests::randn(&[1, 4, 8, 8], 5);
    let tokens = veil_tests::randn(&[1, 16, 8], 6);
    let two = veil_tests::randn(&[1, 2, 8, 8], 7);
    vec![
        (
            "conv_keep_then_downsample",
            request_bytes(&ShardRequest {
                calls: vec![
                    call(
                        ShardOp::Conv2d {
                            layer: "conv_in".into(),
                            input: Operand::Inline(x),
                            pad: Pad {
                                top: 1,
                                bottom: 1,
                                left: 1,
                                right: 1,
                            },
                        },
                        Some(7),
                    ),
                    call(
                        ShardOp::Conv2d {
                            layer: "down_blocks.0.downsamplers.0.conv".into(),
                            input: Operand::Handle(7),
                            pad: no_pad(),
                        },
                        None,
                    ),
                    call(ShardOp::Release { handle: 7 }, None),
                ],
            }),
        ),
        (
            "group_norm",
            request_bytes(&ShardRequest {
                calls: vec![
                    call(
                        ShardOp::GroupNormStats {
                            layer: NORM_2.into(),
                            input: Operand::Inline(two.clone()),
                        },
                        None,
                    ),
                    call(
                        ShardOp::GroupNormApply {
                            layer: NORM_2.into(),
                            input: Operand::Inline(two),
                            moments: Operand::Inline(zeros(&[1, 2, 2])),
                        },
                        None,
                    ),
                ],
            }),
        ),
        (
            "layer_norm_and_geglu",
            request_bytes(&ShardRequest {
                calls: vec![
                    call(
                        ShardOp::LayerNorm {
                            layer: "mid_block.attentions.0.transformer_blocks.0.norm3".into(),
                            input: Operand::Inline(tokens),
                        },
                        Some(3),
                    ),
                    call(
                        ShardOp::Linear {
                            layer: "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
                                .into(),
                            input: Operand::Handle(3),
                        },
                        None,
                    ),
                ],
            }),
        ),
    ]
}

const NORM_2: &str = "down_blocks.0.resnets.0.norm1";

/// The seeds of `fuzz/fuzz_targets/request_execute.rs` (those up to 16 KiB: the fuzzer mutates
/// small inputs best): written when `VEIL_WRITE_FUZZ_SEEDS` is set, else the committed ones must
/// be exactly these requests.
#[test]
fn request_execute_fuzz_seeds() {
    let dir = veil_tests::repo_root().join("fuzz/seeds/request_execute");
    let mut seeds = honest_seeds();
    let hostile = cases();
    assert_eq!(hostile.len(), HOSTILE_NAMES.len());
    seeds.extend(
        HOSTILE_NAMES
            .into_iter()
            .zip(hostile.into_iter().map(|(_, b)| b)),
    );
    seeds.retain(|(_, b)| b.len() <= 16 << 10);
    assert!(seeds.len() >= 10, "{} seeds", seeds.len());
    for (name, bytes) in &seeds {
        let path = dir.join(name);
        if std::env::var_os("VEIL_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).expect("seed dir");
            std::fs::write(&path, bytes).expect("write seed");
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&committed, bytes, "{name}: the committed seed differs");
    }
}

const HOSTILE_NAMES: [&str; 13] = [
    "hostile_conv_1x3_stride2",
    "hostile_padding_overflow",
    "hostile_to_spatial_overflow",
    "hostile_huge_padding",
    "hostile_upsample_petabyte",
    "hostile_timestep_embedding",
    "hostile_attention_scores",
    "hostile_attention_0_heads",
    "hostile_group_norm_rank3",
    "hostile_conv_rank2",
    "hostile_cat_of_kept",
    "hostile_early_steps",
    "hostile_zstd_bomb",
];
