//! The abuse suite against a `veil-server` *process*: the binary named by `VEIL_SERVER_BIN` (CI
//! points it at the release build, where integer overflow wraps silently and an allocation
//! failure aborts), else the workspace's debug build. Each hostile request of the server issue
//! (the exact inputs that once crashed a release server) and the others it lists — a zstd bomb,
//! 10⁴ handles, huge K/T, heads 0, wrong ranks — is answered with an error within a second, the
//! process stays alive with its resident memory within its budget, and the session goes on
//! answering honest requests where the protocol keeps it open.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardRequest};
use veil_core::placement::engine::{Pad, WireDtype};
use veil_core::transport::ServerSpec;
use veil_core::wire::codec::encode;
use veil_core::wire::convert::request_to_wire;
use veil_core::wire::{Compression, ErrorCode, Message, WireEarlySteps, WireTensor};

mod common;
use common::{conv_request, exchange, load, model_id, raw_session, request_bytes, zeros};

const MIB: u64 = 1 << 20;
/// What the server under test may hold for all sessions together, and one op's peak.
const BUDGET: u64 = 256 * MIB;
const MAX_OP: u64 = 128 * MIB;
/// Its largest message (the zstd bomb decodes past it).
const MAX_MESSAGE: u64 = 8 * MIB;
const TOKEN: &str = "abuse-suite-0123456789abcdef0123456789abcdef";

fn server_bin() -> PathBuf {
    let bin = match std::env::var_os("VEIL_SERVER_BIN") {
        // A relative path is taken from the repository root (tests run in tests/).
        Some(b) => veil_tests::repo_root().join(b),
        None => veil_tests::repo_root().join("target/debug/veil-server"),
    };
    assert!(
        bin.is_file(),
        "{} is missing: build veil-server (cargo build -p veil-server) or set VEIL_SERVER_BIN",
        bin.display()
    );
    bin
}

struct Server {
    child: Child,
    spec: ServerSpec,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Starts the binary on loopback with the tiny model (`--full-model`: the obfuscated
    /// policy's early steps too) and the limits above.
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("veil-abuse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let tokens = dir.join("tokens.txt");
        std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600));
        }
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "[limits]\nmemory_budget_bytes = {BUDGET}\nmax_op_bytes = {MAX_OP}\n\
                 max_session_bytes = {BUDGET}\nmax_message_bytes = {MAX_MESSAGE}\n"
            ),
        )
        .expect("config");
        let mut child = Command::new(server_bin())
            .arg("--config")
            .arg(dir.join("server.toml"))
            .arg("--model")
            .arg(veil_tests::tiny_model())
            .arg("--token-file")
            .arg(&tokens)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--full-model"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start veil-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let (mut fingerprint, mut address) = (None, None);
        while fingerprint.is_none() || address.is_none() {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the server printed its fingerprint and address");
            if let Some(f) = l.strip_prefix("fingerprint ") {
                fingerprint = Some(f.parse().expect("fingerprint"));
            } else if let Some(a) = l.strip_prefix("listening ") {
                address = Some(a.trim().to_string());
            }
        }
        let spec = ServerSpec {
            address: address.expect("address"),
            fingerprint: fingerprint.expect("fingerprint"),
            token: TOKEN.into(),
            tenant: None,
        };
        Server { child, spec, dir }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory (VmRSS) of the process.
    fn rss(&self) -> u64 {
        rss_of(self.child.id()).expect("VmRSS of a live server")
    }
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// The highest resident memory of `pid`, sampled every 5 ms until `stop` is set.
fn sample_peak(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_of(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    })
}

fn call(op: ShardOp<Tensor>, keep: Option<u64>) -> ShardCall<Tensor> {
    ShardCall {
        op,
        keep_as: keep,
        reply: keep.is_none(),
    }
}

fn one(op: ShardOp<Tensor>) -> Vec<u8> {
    request_bytes(&ShardRequest {
        calls: vec![call(op, None)],
    })
}

fn inline(d: &[usize]) -> Operand<Tensor> {
    Operand::Inline(zeros(d))
}

fn no_pad() -> Pad {
    Pad {
        top: 0,
        bottom: 0,
        left: 0,
        right: 0,
    }
}

const DOWN: &str = "down_blocks.0.downsamplers.0.conv";
const NORM: &str = "down_blocks.0.resnets.0.norm1";

/// The requests, each as it goes on the wire.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
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
fn many_handles() -> Vec<Vec<u8>> {
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
    let mut server = Server::start();
    let id = model_id(&load());
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

const HOSTILE_NAMES: [&str; 11] = [
    "hostile_conv_1x3_stride2",
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
