//! The FFI surface exactly as Swift and Kotlin see it, driven from Rust: real shard servers on
//! loopback, progress from many threads, cancel before/during/after/by drop, every error mapped
//! to its variant, concurrent generations on one client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use candle_core::Device;
use veil_ffi::{
    CancelHandle, GeneratedImage, GenerationOptions, ProgressListener, ServerConfig, StepPreview,
    VeilClient, VeilConfig, VeilError,
};
use veil_server::{spawn_local, LocalCluster, ServerLimits, ShardModel};

const PROMPT: &str = "a small red circle at the top left on a white background";

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-random")
}

fn cluster(n: usize) -> LocalCluster {
    let model = ShardModel::load(&model_dir(), &Device::Cpu).expect("shard model");
    spawn_local(n, Arc::new(model), ServerLimits::default()).expect("local servers")
}

fn servers(c: &LocalCluster) -> Vec<ServerConfig> {
    c.specs
        .iter()
        .map(|s| ServerConfig {
            address: s.address.clone(),
            fingerprint: s.fingerprint.to_string(),
            token: s.token.clone(),
            tenant: None,
        })
        .collect()
}

fn config(servers: Vec<ServerConfig>, steps: u32) -> VeilConfig {
    let mut c = VeilConfig::new(model_dir(), servers);
    c.request_timeout_seconds = 60.0;
    c.connect_timeout_seconds = 5.0;
    c.defaults.steps = steps;
    c
}

fn seed(s: u64) -> GenerationOptions {
    GenerationOptions {
        seed: Some(s),
        ..GenerationOptions::default()
    }
}

/// (generation tag, step, total, calling thread) per progress call.
type EventLog = Arc<Mutex<Vec<(usize, u32, u32, ThreadId)>>>;

/// Records every progress call; optionally cancels at a step.
#[derive(Default)]
struct Recorder {
    tag: usize,
    events: EventLog,
    cancel_at: Option<(u32, Arc<CancelHandle>)>,
}

impl ProgressListener for Recorder {
    fn on_progress(&self, step: u32, total: u32, _preview: Option<StepPreview>) {
        self.events
            .lock()
            .unwrap()
            .push((self.tag, step, total, std::thread::current().id()));
        if let Some((at, c)) = &self.cancel_at {
            if step == *at {
                c.cancel();
            }
        }
    }
}

fn is_png(img: &GeneratedImage) -> bool {
    img.png.starts_with(b"\x89PNG\r\n\x1a\n")
        && u32::from_be_bytes(img.png[16..20].try_into().unwrap()) == img.width
        && u32::from_be_bytes(img.png[20..24].try_into().unwrap()) == img.height
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generates_with_progress_from_many_threads() {
    let c = cluster(2);
    let client = VeilClient::new(config(servers(&c), 5)).unwrap();
    assert_eq!(client.policy(), veil_ffi::Policy::Strict);
    let events = Arc::new(Mutex::new(Vec::new()));
    // Four OS threads, each driving its own generation on the shared client; all report to
    // one event log.
    let handles: Vec<_> = (0..4)
        .map(|tag| {
            let client = client.clone();
            let events = events.clone();
            std::thread::spawn(move || {
                let listener = Arc::new(Recorder {
                    tag,
                    events,
                    cancel_at: None,
                });
                futures_lite_block_on(client.generate(
                    PROMPT.into(),
                    seed(tag as u64),
                    Some(listener),
                    None,
                ))
            })
        })
        .collect();
    let images: Vec<GeneratedImage> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let events = events.lock().unwrap().clone();
    let mut per: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for &(tag, step, total, thread) in events.iter() {
        assert_eq!(total, 5);
        // Progress comes from Veil's worker threads, never the caller's.
        assert_ne!(thread, std::thread::current().id());
        per.entry(tag).or_default().push(step);
    }
    assert_eq!(per.len(), 4);
    for steps in per.values() {
        assert_eq!(
            steps,
            &vec![1, 2, 3, 4, 5],
            "each generation reports every step in order"
        );
    }
    for (i, img) in images.iter().enumerate() {
        assert!(is_png(img), "image {i} is a PNG of its stated size");
        assert_eq!(img.seed, i as u64);
        assert_eq!(img.stats.steps, 5);
        assert_eq!(img.stats.per_server.len(), 2);
        for s in &img.stats.per_server {
            assert!(s.bytes_up > 0 && s.wire_bytes_sent >= s.bytes_up && s.requests > 0);
            assert!(s.busy_seconds > 0.0 && s.busy_seconds <= img.stats.wall_seconds + 1.0);
        }
    }
    c.shutdown().await;
}

/// Drives a future to completion on the calling (non-tokio) thread, as a foreign executor would.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark()
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_during_after_and_by_drop() {
    let c = cluster(2);
    let client = VeilClient::new(config(servers(&c), 12)).unwrap();

    // Before: nothing runs, no server session is opened.
    let cancel = CancelHandle::new();
    cancel.cancel();
    let rec = Arc::new(Recorder::default());
    let r = client
        .generate(PROMPT.into(), seed(1), Some(rec.clone()), Some(cancel))
        .await;
    assert_eq!(r.unwrap_err(), VeilError::Cancelled);
    assert!(rec.events.lock().unwrap().is_empty());
    assert_eq!(c.servers.iter().map(|s| s.stats().sessions).sum::<u64>(), 0);

    // During: stops before the step after the one that cancelled.
    let cancel = CancelHandle::new();
    let rec = Arc::new(Recorder {
        cancel_at: Some((4, cancel.clone())),
        ..Recorder::default()
    });
    let r = client
        .generate(PROMPT.into(), seed(1), Some(rec.clone()), Some(cancel))
        .await;
    assert_eq!(r.unwrap_err(), VeilError::Cancelled);
    let steps: Vec<u32> = rec.events.lock().unwrap().iter().map(|e| e.1).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);

    // After: the result stands; the handle just reports cancelled.
    let cancel = CancelHandle::new();
    let img = client
        .generate(PROMPT.into(), seed(1), None, Some(cancel.clone()))
        .await
        .unwrap();
    cancel.cancel();
    assert!(is_png(&img) && cancel.is_cancelled());

    // By drop: a foreign caller that abandons the future (a Swift task or Kotlin coroutine gone)
    // stops the Rust generation too.
    let rec = Arc::new(Recorder::default());
    let fut = client.generate(
        PROMPT.into(),
        GenerationOptions {
            steps: Some(400),
            ..seed(1)
        },
        Some(rec.clone()),
        None,
    );
    let abandoned = tokio::time::timeout(Duration::from_millis(300), fut).await;
    assert!(abandoned.is_err(), "400 steps take longer than 300 ms");
    let at_drop = rec.events.lock().unwrap().len();
    // The step in flight at the drop is finished (however long a loaded machine takes for it),
    // then nothing more runs.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let mut settled = at_drop;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rec.events.lock().unwrap().len();
        if now == settled {
            break;
        }
        settled = now;
        assert!(
            std::time::Instant::now() < until,
            "still running 20 s after the drop"
        );
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let later = rec.events.lock().unwrap().len();
    assert!(
        settled <= at_drop + 1 && later == settled && later < 400,
        "kept running after drop: {at_drop} at the drop, {settled} once settled, {later} later"
    );

    // The client is still fine.
    let again = client
        .generate(PROMPT.into(), seed(1), None, None)
        .await
        .unwrap();
    assert_eq!(again.png, img.png, "same seed, same image");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_generations_on_one_client() {
    let c = cluster(2);
    let client = VeilClient::new(config(servers(&c), 6)).unwrap();
    let (a, b) = tokio::join!(
        client.generate(PROMPT.into(), seed(11), None, None),
        client.generate("a blue square on the right".into(), seed(12), None, None),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    // Each equals the same request run alone: sessions never mix.
    let a1 = client
        .generate(PROMPT.into(), seed(11), None, None)
        .await
        .unwrap();
    let b1 = client
        .generate("a blue square on the right".into(), seed(12), None, None)
        .await
        .unwrap();
    assert_eq!(a.png, a1.png);
    assert_eq!(b.png, b1.png);
    assert_ne!(a.png, b.png);
    c.shutdown().await;
}

fn config_err(r: Result<Arc<VeilClient>, VeilError>) -> VeilError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_their_variants() {
    let c = cluster(2);
    let good = servers(&c);

    // Config errors, before anything is read.
    let mut cfg = config(good.clone(), 3);
    cfg.policy = veil_ffi::Policy::Ppidm;
    assert!(matches!(config_err(VeilClient::new(cfg)),
        VeilError::InvalidConfig { detail } if detail.contains("research only")));
    assert!(matches!(config_err(VeilClient::new(config(vec![], 3))),
        VeilError::InvalidConfig { detail } if detail.contains("at least one shard server")));
    let mut bad = good.clone();
    bad[1].fingerprint = "sha256:1234".into();
    assert!(matches!(config_err(VeilClient::new(config(bad, 3))),
        VeilError::InvalidConfig { detail } if detail.starts_with("server 1:")));
    // A key file that is not a key: a config error, the file left as it was; a missing one is
    // created (mode 0600) before the model loads.
    let key = std::env::temp_dir().join(format!("veil-ffi-key-{}", std::process::id()));
    std::fs::write(&key, "veil-obfuscation-key-v1\nabcd\n").unwrap();
    let mut cfg = config(good.clone(), 3);
    cfg.obfuscation_key_file = Some(key.clone());
    assert!(matches!(config_err(VeilClient::new(cfg.clone())),
        VeilError::InvalidConfig { detail } if detail.starts_with("obfuscation_key_file:")
            && detail.contains("4 hex digits")));
    assert_eq!(
        std::fs::read(&key).unwrap(),
        b"veil-obfuscation-key-v1\nabcd\n"
    );
    std::fs::remove_file(&key).unwrap();
    cfg.model_dir = "/nonexistent/veil-model".into();
    assert!(matches!(
        config_err(VeilClient::new(cfg)),
        VeilError::ModelLoad { .. }
    ));
    assert!(key.is_file(), "the key file is created on first use");
    std::fs::remove_file(&key).unwrap();

    // Model errors: a missing folder, and a folder whose U-Net weights are gone.
    let mut cfg = config(good.clone(), 3);
    cfg.model_dir = "/nonexistent/veil-model".into();
    assert!(matches!(
        config_err(VeilClient::new(cfg)),
        VeilError::ModelLoad { .. }
    ));
    let partial = std::env::temp_dir().join(format!("veil-ffi-partial-{}", std::process::id()));
    copy_dir(&model_dir(), &partial);
    std::fs::remove_file(partial.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let mut cfg = config(good.clone(), 3);
    cfg.model_dir = partial.clone();
    let e = config_err(VeilClient::new(cfg));
    assert!(
        matches!(&e, VeilError::ModelLoad { detail } if detail.contains("unet")),
        "{e:?}"
    );
    std::fs::remove_dir_all(&partial).unwrap();

    // A request the model cannot take.
    let client = VeilClient::new(config(good.clone(), 3)).unwrap();
    let r = client
        .generate(
            PROMPT.into(),
            GenerationOptions {
                width: Some(70),
                ..seed(1)
            },
            None,
            None,
        )
        .await;
    assert!(matches!(r, Err(VeilError::InvalidRequest { .. })), "{r:?}");

    // Server-side errors, each naming the server.
    let mut bad = good.clone();
    bad[1].token = "wrong".into();
    let r = VeilClient::new(config(bad, 3))
        .unwrap()
        .generate(PROMPT.into(), seed(1), None, None)
        .await;
    assert!(
        matches!(r, Err(VeilError::AuthFailed { server: 1, .. })),
        "{r:?}"
    );
    let mut bad = good.clone();
    bad[0].fingerprint = format!("sha256:{}", "00".repeat(32));
    let r = VeilClient::new(config(bad, 3))
        .unwrap()
        .generate(PROMPT.into(), seed(1), None, None)
        .await;
    assert!(
        matches!(&r, Err(VeilError::CertificateMismatch { server: 0, expected, .. }) if expected == &"00".repeat(32)),
        "{r:?}"
    );
    let mut bad = good.clone();
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    bad[1].address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut cfg = config(bad, 3);
    cfg.connect_timeout_seconds = 1.0;
    let r = VeilClient::new(cfg)
        .unwrap()
        .generate(PROMPT.into(), seed(1), None, None)
        .await;
    assert!(
        matches!(
            r,
            Err(VeilError::Unreachable { server: 1, .. } | VeilError::Timeout { server: 1, .. })
        ),
        "{r:?}"
    );

    // A server that dies mid-run: ConnectionLost for that server, and nothing hangs.
    let mut cluster2 = cluster(2);
    let client = VeilClient::new(config(servers(&cluster2), 200)).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    struct Tell(tokio::sync::mpsc::UnboundedSender<u32>);
    impl ProgressListener for Tell {
        fn on_progress(&self, step: u32, _total: u32, _preview: Option<StepPreview>) {
            let _ = self.0.send(step);
        }
    }
    let run = tokio::spawn(async move {
        client
            .generate(PROMPT.into(), seed(1), Some(Arc::new(Tell(tx))), None)
            .await
    });
    assert_eq!(rx.recv().await, Some(1));
    let victim = cluster2.servers.remove(1);
    victim.shutdown(Duration::from_secs(1)).await;
    let r = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("no hang")
        .unwrap();
    assert!(
        matches!(r, Err(VeilError::ConnectionLost { server: 1, .. })),
        "{r:?}"
    );
    cluster2.shutdown().await;
    c.shutdown().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Keeps the previews a generation hands out, by step.
#[derive(Default)]
struct Previews(Mutex<Vec<(u32, StepPreview)>>);

impl ProgressListener for Previews {
    fn on_progress(&self, step: u32, _total: u32, preview: Option<StepPreview>) {
        if let Some(p) = preview {
            self.0.lock().unwrap().push((step, p));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_and_the_privacy_report() {
    let c = cluster(2);
    let client = VeilClient::new(config(servers(&c), 5)).unwrap();
    let previews = Arc::new(Previews::default());
    let options = GenerationOptions {
        preview_every_steps: Some(2),
        ..seed(3)
    };
    let image = client
        .generate(PROMPT.into(), options, Some(previews.clone()), None)
        .await
        .unwrap();
    // Every 2nd step and the last, each a PNG of the latent's size (1/8 of the image's).
    let got = previews.0.lock().unwrap().clone();
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 4, 5]);
    for (_, p) in &got {
        assert_eq!((p.width, p.height), (image.width / 8, image.height / 8));
        let decoded = image::load_from_memory(&p.png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (p.width, p.height));
    }
    // The same seed without previews: the same image (previews only read the latents).
    let plain = client
        .generate(PROMPT.into(), seed(3), None, None)
        .await
        .unwrap();
    assert_eq!(plain.png, image.png);

    // Strict: both servers received strips, no text tokens or prompts, and rows only within
    // their strip plus the one halo row the policy claims.
    let report = &image.privacy;
    assert_eq!(report.policy, veil_ffi::Policy::Strict);
    assert_eq!(report.halo_bound, Some(1));
    assert_eq!(report.servers.len(), 2);
    for (i, s) in report.servers.iter().enumerate() {
        assert_eq!(s.server as usize, i);
        assert_eq!(s.address, image.stats.per_server[i].address);
        assert!(s.bytes > 0 && s.text_indexed_bytes == 0 && s.prompts.is_empty());
        assert_eq!(s.raw_bytes + s.whole_map_bytes + s.text_bytes, s.bytes);
        assert_eq!(s.bytes_by_kind.values().sum::<u64>(), s.bytes);
        assert_eq!(s.received_text, s.text_bytes > 0);
        assert!(!s.rows.is_empty());
        for r in &s.rows {
            let strip = r.strip.expect("a strip at every resolution it received");
            for got in &r.received {
                assert!(
                    got.start + 1 >= strip.start && got.end <= strip.end + 1,
                    "{r:?}"
                );
            }
        }
    }
}
