//! The `obfuscated` policy (ObCLIP) on the committed tiny model: what the server receives does
//! not depend on which candidate is real, the switch point's ends equal the single-party
//! generations, exact batch redundancy equals none, the user's key file picks the same
//! candidates at every start, and the early steps travel over QUIC.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use veil_core::client::hybrid::{
    early_steps_flops, Accelerations, BatchRedundancy, DeviceUNet, EarlySteps, ObfuscationOptions,
};
use veil_core::client::pipeline::{seeded_normal, GenerateOptions, Generation, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::obfuscation::{Lexicon, ObfuscationKey};
use veil_core::placement::{Policy, ShardBackend, ViewKind, WireDtype};
use veil_core::sdk::load_or_create_obfuscation_key;
use veil_core::transport::{connect_backends, ClientOptions};
use veil_core::wire::codec::{decode, encode};
use veil_core::wire::identity::model_identity;
use veil_core::wire::{Compression, Limits, Message, WireEarlySteps, WireTensor};
use veil_server::{spawn_local, ServerLimits, ShardModel};
use veil_tests::tiny_model;

fn opts(prompt: &str, steps: usize, server_steps: Option<usize>) -> GenerateOptions {
    GenerateOptions {
        prompt: prompt.into(),
        steps,
        guidance: 5.0,
        seed: 11,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        policy: Policy::Obfuscated,
        obfuscation: ObfuscationOptions {
            server_steps,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn load() -> Arc<StableDiffusion> {
    Arc::new(StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load"))
}

async fn run(sd: &Arc<StableDiffusion>, o: &GenerateOptions) -> Generation {
    let server = sd.in_process_full_server();
    sd.generate(o, &[server], &mut |_| {})
        .await
        .expect("generate")
}

/// ‖a − b‖ / ‖b‖.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() as f64).sqrt() / (n.to_scalar::<f32>().unwrap() as f64).sqrt()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[tokio::test]
async fn prompts_differing_only_in_attributes_send_the_same_candidate_multiset() {
    let sd = load();
    let a = run(&sd, &opts("a photo of a young woman reading", 2, Some(1))).await;
    let b = run(&sd, &opts("a photo of an old man reading", 2, Some(1))).await;
    let ma = a.audit.prompt_multiset(0);
    let mb = b.audit.prompt_multiset(0);
    assert_eq!(ma, mb, "the server's view depends on the real prompt");
    // Gender (2 values) × age (3 values), plus the negative prompt (empty).
    let rep = a.obfuscation.as_ref().expect("report");
    assert_eq!(rep.candidates, 6);
    assert_eq!(ma.len(), 7);
    assert!(ma.iter().any(|p| p == "a photo of a young woman reading"));
    assert!(ma.iter().any(|p| p == "a photo of an old man reading"));
    // Besides the texts, the server got only the shared noise: no image, no text embedding.
    for g in [&a, &b] {
        let kinds: Vec<ViewKind> = g.audit.views.iter().map(|v| v.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == ViewKind::Latent).count(), 1);
        assert!(kinds
            .iter()
            .all(|k| matches!(k, ViewKind::Latent | ViewKind::Prompt)));
        assert!(g.audit.views.iter().all(|v| v.server == 0 && v.call == 0));
    }
}

#[tokio::test]
async fn repeated_requests_of_one_template_send_the_same_multiset() {
    let sd = load();
    // 2 genders × 3 ages × 5 ethnicities = 30 combinations, cut to K_max = 4.
    let prompt = "a portrait of a young asian woman";
    let mut o = opts(prompt, 2, Some(1));
    o.obfuscation.k_max = Some(4);
    let first = run(&sd, &o).await;
    let want = first.audit.prompt_multiset(0);
    assert_eq!(want.len(), 5);
    // Every candidate is written with the values' canonical text, the real one too.
    assert!(want
        .iter()
        .any(|p| p == "a portrait of a young Asian woman"));
    for _ in 0..3 {
        assert_eq!(run(&sd, &o).await.audit.prompt_multiset(0), want);
    }
}

#[tokio::test]
async fn the_users_key_file_sends_the_same_set_after_a_restart_and_another_key_another() {
    let sd = load();
    // 30 combinations, 4 sent: which 4 is the key's choice.
    let prompt = "a portrait of a young asian woman";
    let with = |key: ObfuscationKey| {
        let mut o = opts(prompt, 2, Some(1));
        o.obfuscation.k_max = Some(4);
        o.obfuscation.key = Some(Arc::new(key));
        o
    };
    let dir = std::env::temp_dir().join(format!("veil-obf-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("user.key");
    // The first start creates the file, the next reads it back: the same set is sent.
    let created = load_or_create_obfuscation_key(&path).expect("create");
    let first = run(&sd, &with(created)).await.audit.prompt_multiset(0);
    let reread = load_or_create_obfuscation_key(&path).expect("read");
    assert_eq!(
        run(&sd, &with(reread)).await.audit.prompt_multiset(0),
        first
    );
    assert_eq!(first.len(), 5, "4 candidates and the negative prompt");
    // Two other users' keys choose two different sets of the same prompt.
    let a = run(&sd, &with(ObfuscationKey::from_bytes([1; 32]))).await;
    let b = run(&sd, &with(ObfuscationKey::from_bytes([2; 32]))).await;
    assert_ne!(a.audit.prompt_multiset(0), b.audit.prompt_multiset(0));
    for g in [&a, &b] {
        assert!(g
            .audit
            .prompt_multiset(0)
            .iter()
            .any(|p| p == "a portrait of a young Asian woman"));
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn zero_server_steps_equals_local_and_sends_nothing() {
    let sd = load();
    let o = opts("a photo of a young woman reading", 4, Some(0));
    let obf = run(&sd, &o).await;
    let local = sd
        .generate(
            &GenerateOptions {
                policy: Policy::Local,
                ..o.clone()
            },
            &[],
            &mut |_| {},
        )
        .await
        .expect("local");
    assert_eq!(max_abs(&obf.latents, &local.latents), 0.0);
    assert!(obf.audit.views.is_empty() && obf.audit.texts.is_empty());
    assert_eq!(obf.stats.bytes_up, 0);
}

#[tokio::test]
async fn one_candidate_with_all_steps_on_the_server_equals_server_only_generation() {
    let sd = load();
    // No sensitive attribute: K = 1; and a detected one with K_max = 1.
    let plain = opts("a red circle on the left", 4, Some(4));
    let mut capped = opts("a photo of an old man reading", 4, Some(4));
    capped.obfuscation.k_max = Some(1);
    for o in [plain, capped] {
        let obf = run(&sd, &o).await;
        assert_eq!(obf.obfuscation.as_ref().expect("report").candidates, 1);
        assert_eq!(
            obf.audit.prompt_multiset(0),
            vec![String::new(), o.prompt.clone()]
        );
        let server_only = sd
            .generate(
                &GenerateOptions {
                    policy: Policy::Local,
                    ..o.clone()
                },
                &[],
                &mut |_| {},
            )
            .await
            .expect("server-only");
        let r = rel_l2(&obf.latents, &server_only.latents);
        assert!(r <= 1e-5, "relative L2 {r}");
    }
}

fn job(sd: &StableDiffusion, k: usize, accel: Accelerations, steps: usize) -> EarlySteps<Tensor> {
    let lex = Lexicon::builtin().expect("lexicon");
    let prompt = "a portrait of an old black man";
    let spans = lex.detect(prompt);
    let set = veil_core::obfuscation::candidates(prompt, &spans, &lex, k, &mut rand::rng())
        .expect("candidates");
    assert_eq!(set.prompts.len(), k);
    EarlySteps {
        candidates: set.prompts,
        negative_prompt: String::new(),
        noise: seeded_normal(4, &[1, sd.unet.config.in_channels, 8, 8], &sd.device).expect("noise"),
        steps,
        server_steps: steps,
        start_step: None,
        condition: None,
        guidance: 5.0,
        scheduler: SchedulerKind::Ddim,
        accel,
    }
}

fn trajectory(sd: &StableDiffusion, j: &EarlySteps<Tensor>) -> (Vec<Tensor>, u64) {
    let mut steps = Vec::new();
    let r = sd
        .early_steps(j, &mut |_, l| steps.push(l.clone()))
        .expect("early steps");
    (steps, r.unet_rows)
}

#[test]
fn exact_batch_redundancy_equals_off_at_every_step() {
    let sd = load();
    let off = Accelerations::default();
    let exact = Accelerations {
        batch_redundancy: BatchRedundancy::Exact,
        attention_gate: None,
    };
    let k = 4;
    let j = job(&sd, k, off, 5);
    let (a, rows_off) = trajectory(&sd, &j);
    let (b, rows_exact) = trajectory(
        &sd,
        &EarlySteps {
            accel: exact,
            ..j.clone()
        },
    );
    assert_eq!(a.len(), 5);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let r = rel_l2(y, x);
        assert!(r <= 1e-5, "step {i}: relative L2 {r}");
    }
    assert_eq!(rows_off, 5 * 2 * k as u64);
    // The first step shares one unconditional row; the K latents differ after it.
    assert_eq!(rows_exact, rows_off - (k as u64 - 1));
    // The same count from shapes alone (what the phone reports).
    let u = &sd.unet;
    let f_off = early_steps_flops(u, (8, 8), 77, k, 5, true, &off).expect("flops");
    let f_exact = early_steps_flops(u, (8, 8), 77, k, 5, true, &exact).expect("flops");
    assert_eq!(f_off * rows_exact, f_exact * rows_off);
}

#[test]
fn shared_uncond_and_attention_gate_cut_rows_and_flops_and_stay_close() {
    let sd = load();
    let k = 4;
    let base = job(&sd, k, Accelerations::default(), 6);
    let (reference, _) = trajectory(&sd, &base);
    let shared = Accelerations {
        batch_redundancy: BatchRedundancy::Shared,
        attention_gate: None,
    };
    let (s, rows) = trajectory(
        &sd,
        &EarlySteps {
            accel: shared,
            ..base.clone()
        },
    );
    assert_eq!(rows, 6 * (k as u64 + 1));
    let gated = Accelerations {
        batch_redundancy: BatchRedundancy::Off,
        attention_gate: Some(3),
    };
    let (g, _) = trajectory(
        &sd,
        &EarlySteps {
            accel: gated,
            ..base.clone()
        },
    );
    // Approximations: not equal, but the same picture (reported, with their utility, in
    // docs/BENCHMARKS.md).
    for t in [&s, &g] {
        let r = rel_l2(&t[5], &reference[5]);
        assert!(r > 0.0 && r < 0.5, "relative L2 {r}");
    }
    // Before the gate the gated run is the ordinary one.
    assert!(rel_l2(&g[2], &reference[2]) <= 1e-6);
    let u = &sd.unet;
    let f = |a: &Accelerations| early_steps_flops(u, (8, 8), 77, k, 6, true, a).expect("flops");
    assert!(f(&shared) < f(&Accelerations::default()));
    assert!(f(&gated) < f(&Accelerations::default()));
}

#[tokio::test]
async fn device_model_and_bad_settings() {
    let sd = load();
    // The device model loaded from a folder is the model's own U-Net: same result.
    let mut o = opts("a photo of a young woman reading", 4, Some(2));
    let plain = run(&sd, &o).await;
    o.obfuscation.device_unet = Some(Arc::new(
        DeviceUNet::load(&tiny_model(), &Device::Cpu).expect("device model"),
    ));
    let with_device = run(&sd, &o).await;
    // (The candidates' order is shuffled per request, so the server's batch rows differ.)
    let r = rel_l2(&with_device.latents, &plain.latents);
    assert!(r <= 1e-5, "relative L2 {r}");

    let server = sd.in_process_full_server();
    let too_many = opts("a photo of a young woman reading", 4, Some(5));
    let e = sd
        .generate(&too_many, std::slice::from_ref(&server), &mut |_| {})
        .await;
    assert!(e
        .err()
        .expect("k > T")
        .to_string()
        .contains("5 server steps of 4"));
    let mut dpm = opts("a photo of a young woman reading", 4, Some(2));
    dpm.scheduler = SchedulerKind::DpmSolverMultistep;
    let e = sd.generate(&dpm, &[server], &mut |_| {}).await;
    assert!(e
        .err()
        .expect("dpm mid-schedule")
        .to_string()
        .contains("DPM-Solver++"));
    let e = sd
        .generate(&opts("a young woman", 4, Some(2)), &[], &mut |_| {})
        .await;
    assert!(e
        .err()
        .expect("no server")
        .to_string()
        .contains("needs one server"));
    // A shard-only server refuses the job with a reason.
    let shard_only = sd.in_process_backends(1);
    let e = sd
        .generate(&opts("a young woman", 4, Some(2)), &shard_only, &mut |_| {})
        .await;
    assert!(e
        .err()
        .expect("shard-only")
        .to_string()
        .contains("--full-model"));
}

#[test]
fn early_steps_codec_round_trips_and_checks_its_bounds() {
    let noise = WireTensor {
        dtype: WireDtype::F32,
        shape: vec![1, 4, 2, 2],
        data: vec![0u8; 64],
        coding: Default::default(),
    };
    let job = |n: usize, scheduler: u8| WireEarlySteps {
        candidates: (0..n).map(|i| format!("candidate {i}")).collect(),
        negative_prompt: "blurry".into(),
        noise: noise.clone(),
        steps: 20,
        server_steps: 10,
        guidance: 5.0,
        scheduler,
        batch_redundancy: 1,
        attention_gate: 6,
        start_step: None,
        condition: None,
    };
    // Its own message (protocol 2), not a call of a shard request.
    let msg = |j: WireEarlySteps| Message::EarlySteps {
        job: j,
        reply_dtype: WireDtype::F32,
        compression: Compression::None,
    };
    let m = msg(job(8, 0));
    let bytes = encode(&m, Compression::None).expect("encode");
    assert_eq!(decode(&bytes, &Limits::default()).expect("decode"), m);
    // More candidates than a job may carry: refused when encoding.
    assert!(encode(&msg(job(65, 0)), Compression::None).is_err());
    // An unknown scheduler decodes (the codec is syntax) but the server refuses it.
    let bad = msg(job(2, 9));
    let Message::EarlySteps { job: decoded, .. } = decode(
        &encode(&bad, Compression::None).expect("encode"),
        &Limits::default(),
    )
    .expect("decode") else {
        panic!("not an early-steps message")
    };
    let e = veil_core::wire::convert::early_steps_from_wire(decoded, &Device::Cpu);
    assert!(e
        .expect_err("unknown scheduler")
        .to_string()
        .contains("unknown scheduler"));
    // Truncated anywhere: an error, never a panic.
    for cut in 0..bytes.len() {
        assert!(decode(&bytes[..cut], &Limits::default()).is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obfuscated_over_quic_matches_in_process() {
    let sd = load();
    let o = opts("a photo of a young woman reading", 4, Some(2));
    let model =
        Arc::new(ShardModel::from_engine(&sd.unet, &sd.unet_engine).with_denoiser(sd.clone()));
    let limits = ServerLimits {
        idle_timeout: Duration::from_secs(20),
        ..ServerLimits::default()
    };
    let cluster = spawn_local(1, model, limits).expect("server");
    let options = ClientOptions {
        request_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let id = model_identity(&sd.unet, sd.unet_engine.weights());
    let b = connect_backends(&cluster.specs, id, &options)
        .await
        .expect("connect");
    let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = b
        .iter()
        .map(|q| q.clone() as Arc<dyn ShardBackend<Tensor>>)
        .collect();
    let over_quic = sd.generate(&o, &backends, &mut |_| {}).await.expect("quic");
    let in_process = run(&sd, &o).await;
    let r = rel_l2(&over_quic.latents, &in_process.latents);
    assert!(r <= 1e-5, "relative L2 {r}");
    assert_eq!(
        over_quic.audit.prompt_multiset(0),
        in_process.audit.prompt_multiset(0)
    );
    for q in &b {
        q.close().await;
    }
    cluster.shutdown().await;
}

/// A job is priced from its shapes before the server runs anything: K = 64 candidates over
/// T = k = 1000 steps of a 256×256 latent is refused with a typed error, at once.
#[test]
fn an_overpriced_early_steps_job_is_refused_before_running() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let job = EarlySteps {
        candidates: (0..64).map(|i| format!("a red circle {i}")).collect(),
        negative_prompt: String::new(),
        noise: seeded_normal(4, &[1, sd.unet.config.in_channels, 256, 256], &sd.device)
            .expect("noise"),
        steps: 1000,
        server_steps: 1000,
        start_step: None,
        condition: None,
        guidance: 5.0,
        scheduler: SchedulerKind::Ddim,
        accel: Accelerations::default(),
    };
    let started = std::time::Instant::now();
    match sd.early_steps(&job, &mut |_, _| {}) {
        Err(veil_core::Error::InvalidArgument(m)) => assert!(m.contains("refused"), "{m}"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("the job ran"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A full-model server presents the identity of its U-Net *and* of its text encoder, tokenizer
/// and scheduler files: the phone's (from the manifest) matches the server's (hashed from the
/// files), and a server whose scheduler differs by one value presents another one.
#[test]
fn a_full_model_identity_covers_the_text_encoder_tokenizer_and_scheduler() {
    use veil_core::wire::manifest::{hash_components, resolve_full_model_identity};
    let phone = resolve_full_model_identity(&tiny_model()).expect("phone identity");
    let server = ShardModel::load_full(&tiny_model(), &Device::Cpu).expect("full model");
    assert_eq!(server.id(), phone);
    let names: Vec<String> = hash_components(&tiny_model())
        .expect("hashes")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for c in ["text_encoder/", "tokenizer/", "scheduler/"] {
        assert!(names.iter().any(|n| n.starts_with(c)), "{c} in {names:?}");
    }
    // The same folder with another scheduler setting.
    let copy = std::env::temp_dir().join(format!("veil-full-id-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    for entry in walk(&tiny_model()) {
        let rel = entry.strip_prefix(tiny_model()).expect("relative");
        let to = copy.join(rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("dir");
        std::fs::copy(&entry, &to).expect("copy");
    }
    let cfg = copy.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg).expect("scheduler config");
    let changed = text.replacen("\"steps_offset\": 1", "\"steps_offset\": 0", 1);
    assert_ne!(
        changed, text,
        "the tiny model's scheduler has steps_offset 1"
    );
    std::fs::write(&cfg, changed).expect("write");
    let other = ShardModel::load_full(&copy, &Device::Cpu).expect("full model copy");
    assert_ne!(
        other.id(),
        phone,
        "a different scheduler, the same identity"
    );
    let _ = std::fs::remove_dir_all(&copy);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A job's working memory is reserved from the server's process-wide budget before it runs: a
/// budget one byte short refuses it at once (a typed error, nothing run), one that holds it runs
/// it and has everything back afterwards.
#[test]
fn an_early_steps_job_reserves_its_working_memory_from_the_budget() {
    use std::collections::HashMap;
    use veil_core::client::hybrid::EarlyStepsRunner;
    use veil_core::placement::admission::MemoryBudget;
    use veil_core::placement::backend::ShardExecutor;
    use veil_core::placement::engine::CandleEngine;
    let sd = load();
    let j = job(&sd, 4, Accelerations::default(), 2);
    let need = sd.working_bytes(&j).expect("priced");
    let executor = |budget: &Arc<MemoryBudget>| {
        ShardExecutor::new(
            CandleEngine::new(HashMap::new(), Device::Cpu),
            HashMap::new(),
        )
        .with_denoiser(sd.clone())
        .with_limits(1 << 30, 1 << 30, budget.clone())
    };
    let short = MemoryBudget::new(need - 1);
    match executor(&short).early_steps(&j) {
        Err(veil_core::Error::InvalidArgument(m)) => assert!(m.contains("memory budget"), "{m}"),
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    }
    let enough = MemoryBudget::new(need);
    let latents = executor(&enough).early_steps(&j).expect("runs");
    assert_eq!(latents.dims()[0], 4);
    assert_eq!(short.used(), 0);
    assert_eq!(enough.used(), 0);
}
