//! Image-to-image against diffusers' `StableDiffusionImg2ImgPipeline`
//! (`tools/make_img2img_golden.py`: the posterior mean, given noise, DDIM and Euler at strength
//! 0.6 and 0.3 on the committed tiny model): every step within 1e-4 relative L2, the image
//! ≥ 40 dB. Then the same generation under every policy: `ppidm` and `strict` (N = 2, 3)
//! against `local`, each strict server receiving only its strip (and halo) of the noised
//! latent; a phone that loaded the VAE decoder only; and `obfuscated`, whose server starts its
//! steps from the noised init latents the phone sends (in process and over QUIC).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::hybrid::{BatchRedundancy, EarlySteps, ObfuscationOptions};
use veil_core::client::pipeline::{
    image_from_png, GenerateOptions, Generation, LoadRole, StableDiffusion,
};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::{ShardReply, ShardRequest};
use veil_core::placement::{GnVariant, Policy, ShardBackend, ViewKind};
use veil_core::transport::{connect_backends, ClientOptions};
use veil_core::wire::identity::model_identity;
use veil_server::{spawn_local, ServerLimits, ShardModel};
use veil_tests::{max_abs, psnr, rel_l2, repo_root, tiny_model};

const TOL: f64 = 1e-4;
const STEPS: usize = 10;

struct Golden {
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn golden() -> Golden {
    let dir = repo_root().join("tests/fixtures/golden");
    let tensors = candle_core::safetensors::load(dir.join("img2img.safetensors"), &Device::Cpu)
        .expect("img2img.safetensors");
    let meta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("img2img.json")).expect("img2img.json"),
    )
    .expect("json");
    Golden { tensors, meta }
}

/// The init image as the CLI reads it: the fixture's PNG.
fn init_image() -> Tensor {
    let bytes = std::fs::read(repo_root().join("tests/fixtures/golden/img2img_init.png"))
        .expect("init png");
    image_from_png(&bytes, &Device::Cpu).expect("decode png")
}

fn opts(g: &Golden, scheduler: SchedulerKind, strength: f64, policy: Policy) -> GenerateOptions {
    GenerateOptions {
        prompt: g.meta["prompt"].as_str().expect("prompt").into(),
        steps: STEPS,
        guidance: g.meta["guidance_scale"].as_f64().expect("guidance"),
        width: 64,
        height: 64,
        scheduler,
        init_image: Some(init_image()),
        strength,
        noise: Some(g.tensors["noise"].clone()),
        policy,
        ..Default::default()
    }
}

fn load() -> Arc<StableDiffusion> {
    Arc::new(StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load tiny model"))
}

async fn run(
    sd: &StableDiffusion,
    o: &GenerateOptions,
    b: &[Arc<dyn ShardBackend<Tensor>>],
) -> Generation {
    sd.generate(o, b, &mut |_| {}).await.expect("generate")
}

#[tokio::test]
async fn img2img_trajectories_match_diffusers() {
    let g = golden();
    let sd = load();
    // The PNG decodes to the pixels diffusers read (PIL / 255, bit for bit).
    assert_eq!(max_abs(&init_image(), &g.tensors["init_image"]), 0.0);
    let init = sd.encode_image(&init_image(), 64, 64).expect("encode");
    let enc = rel_l2(&init, &g.tensors["init_latents"]);
    println!("VAE posterior mean × scaling_factor: rel L2 {enc:.3e} vs diffusers");
    assert!(enc <= TOL, "{enc}");
    for case in g.meta["cases"].as_array().expect("cases") {
        let key = case["key"].as_str().expect("key");
        let scheduler: SchedulerKind = case["scheduler"].as_str().expect("s").parse().expect("s");
        let strength = case["strength"].as_f64().expect("strength");
        let run_steps = case["steps_run"].as_u64().expect("steps") as usize;
        let mut seen = Vec::new();
        let out = sd
            .generate(
                &opts(&g, scheduler, strength, Policy::Local),
                &[],
                &mut |p| seen.push((p.step, p.total, p.latents.clone())),
            )
            .await
            .expect("generate");
        // Progress counts the steps that run.
        let counted: Vec<(usize, usize)> = seen.iter().map(|(s, t, _)| (*s, *t)).collect();
        let want: Vec<(usize, usize)> = (1..=run_steps).map(|s| (s, run_steps)).collect();
        assert_eq!(counted, want, "{key}");
        assert_eq!(out.stats.steps, run_steps, "{key}");
        let golden_steps = &g.tensors[&format!("{key}/latents")];
        let mut worst: f64 = 0.0;
        let mut per_step = Vec::new();
        for (i, (_, _, got)) in seen.iter().enumerate() {
            let want = golden_steps.narrow(0, i, 1).expect("step");
            let err = rel_l2(got, &want);
            per_step.push(format!("{err:.2e}"));
            worst = worst.max(err);
        }
        let image = &g.tensors[&format!("{key}/image")];
        let db = psnr(&out.image, image);
        println!(
            "{key}: {run_steps} steps, rel L2 per step [{}] (max {worst:.3e}), image {db:.1} dB \
             vs diffusers",
            per_step.join(", ")
        );
        assert!(worst <= TOL, "{key}: {worst}");
        assert!(db >= 40.0, "{key}: {db} dB");
    }
}

/// Every `Latent` view server `i` received lies within its strip widened by the halo bound, and
/// none covers the whole map.
fn latent_views_within_strips(out: &Generation, n: usize, what: &str) {
    for i in 0..n {
        let views: Vec<_> = out
            .audit
            .views
            .iter()
            .filter(|v| v.server == i && v.kind == ViewKind::Latent)
            .collect();
        assert!(
            !views.is_empty(),
            "{what}: server {i} received no latent rows"
        );
        for v in views {
            let (res, rows) = (v.resolution.expect("res"), v.rows.clone().expect("rows"));
            let strip = out.audit.strips[i][&res].clone();
            let halo = Policy::Strict.halo_bound().unwrap_or(0);
            assert!(
                rows.start + halo >= strip.start && rows.end <= strip.end + halo,
                "{what}: server {i} got latent rows {rows:?}, strip {strip:?}"
            );
            assert!(
                rows.len() < res.0,
                "{what}: server {i} got the whole latent"
            );
        }
    }
}

#[tokio::test]
async fn img2img_runs_under_every_policy_like_local() {
    let g = golden();
    let sd = load();
    for (scheduler, strength) in [
        (SchedulerKind::Ddim, 0.6),
        (SchedulerKind::EulerDiscrete, 0.3),
    ] {
        let local = run(&sd, &opts(&g, scheduler, strength, Policy::Local), &[]).await;
        let ppidm = Policy::Ppidm {
            gn: GnVariant::Exact,
        };
        let mut cases = vec![("ppidm N = 2", opts(&g, scheduler, strength, ppidm), 2)];
        for n in [2, 3] {
            cases.push(("strict", opts(&g, scheduler, strength, Policy::Strict), n));
        }
        // Halves together on 4 servers: both guided halves cut into 4 strips.
        let together = GenerateOptions {
            guidance_halves: Some(GuidanceHalves::Together),
            ..opts(&g, scheduler, strength, Policy::Strict)
        };
        cases.push(("strict, halves together", together, 4));
        for (name, o, n) in cases {
            let out = run(&sd, &o, &sd.in_process_backends(n)).await;
            let d = max_abs(&out.image, &local.image);
            let db = psnr(&out.image, &local.image);
            println!(
                "{scheduler} s{strength} {name} (N = {n}): max |Δ| {d:.2e}, {db:.1} dB vs local"
            );
            assert!(d == 0.0 || db >= 60.0, "{name} N = {n}: {db} dB");
            if name.starts_with("strict") {
                latent_views_within_strips(&out, n, name);
            }
        }
    }
}

#[tokio::test]
async fn a_phone_without_the_vae_encoder_reads_it_for_img2img() {
    let g = golden();
    let full = load();
    let role = LoadRole::Phone {
        policy: Policy::Strict,
        servers: 2,
    };
    let phone = StableDiffusion::load_for(&tiny_model(), &Device::Cpu, role).expect("phone");
    assert!(phone.vae.encoder().is_none() && full.vae.encoder().is_some());
    let o = opts(&g, SchedulerKind::Ddim, 0.6, Policy::Strict);
    let backends = full.in_process_backends(2);
    let a = run(&full, &o, &backends).await;
    let b = run(&phone, &o, &backends).await;
    assert_eq!(max_abs(&a.image, &b.image), 0.0);
    // Still no encoder resident after the generation.
    assert!(phone.vae.encoder().is_none());
}

/// Passes everything through to an in-process full-model server, keeping the early-steps jobs.
struct JobProbe {
    inner: Arc<dyn ShardBackend<Tensor>>,
    jobs: Arc<Mutex<Vec<EarlySteps<Tensor>>>>,
}

#[async_trait]
impl ShardBackend<Tensor> for JobProbe {
    async fn execute(
        &self,
        request: ShardRequest<Tensor>,
    ) -> veil_core::Result<ShardReply<Tensor>> {
        self.inner.execute(request).await
    }

    fn begin_step(&self, step: u64) {
        self.inner.begin_step(step);
    }

    async fn early_steps(&self, job: EarlySteps<Tensor>) -> veil_core::Result<Tensor> {
        self.jobs.lock().expect("probe").push(job.clone());
        self.inner.early_steps(job).await
    }
}

fn obfuscated(g: &Golden, scheduler: SchedulerKind, strength: f64) -> GenerateOptions {
    GenerateOptions {
        // Two detected attributes: K = 4 candidates in the server's batch.
        prompt: "a photo of a young woman reading".into(),
        obfuscation: ObfuscationOptions {
            k_max: Some(4),
            ..Default::default()
        },
        ..opts(g, scheduler, strength, Policy::Obfuscated)
    }
}

#[tokio::test]
async fn obfuscated_img2img_starts_the_server_from_the_noised_init_latents() {
    let g = golden();
    let sd = load();
    for (scheduler, strength, seeded) in [
        (SchedulerKind::Ddim, 0.6, false),
        // Stochastic: the server and the phone key the step noise by the tensor sent.
        (SchedulerKind::EulerAncestral, 0.6, true),
    ] {
        let mut o = obfuscated(&g, scheduler, strength);
        if seeded {
            o.noise = None;
            // Exact redundancy: the K latents are identical at the server's first step (the
            // schedule's step 4), which batches K + 1 rows there.
            o.obfuscation.accel.batch_redundancy = BatchRedundancy::Exact;
        }
        let jobs = Arc::new(Mutex::new(Vec::new()));
        let probe = Arc::new(JobProbe {
            inner: sd.in_process_full_server(),
            jobs: jobs.clone(),
        }) as Arc<dyn ShardBackend<Tensor>>;
        let mut steps = Vec::new();
        let obf = sd
            .generate(&o, &[probe], &mut |p| steps.push((p.step, p.total)))
            .await
            .expect("obfuscated");
        let local = GenerateOptions {
            policy: Policy::Local,
            ..o.clone()
        };
        let local = run(&sd, &local, &[]).await;
        let report = obf.obfuscation.as_ref().expect("report");
        let jobs = jobs.lock().expect("probe").clone();
        let job = jobs.first().expect("one job");
        // 6 of 10 steps run (t_start = 4): 3 on the server, 3 on the phone.
        assert_eq!(
            (report.server_steps, report.device_steps, report.candidates),
            (3, 3, 4)
        );
        assert_eq!(
            (job.steps, job.start_step, job.server_steps),
            (STEPS, Some(4), 3)
        );
        assert_eq!(steps, vec![(3, 6), (4, 6), (5, 6), (6, 6)]);
        assert_eq!(obf.stats.steps, 6);
        // The server batches the rows the phone accounted (2K per guided step; K + 1 at the
        // first under exact redundancy).
        let replay = sd.early_steps(job, &mut |_, _| {}).expect("replay");
        let rows = if seeded { 5 + 2 * 8 } else { 3 * 8 };
        assert_eq!((replay.unet_rows, report.server_unet_rows), (rows, rows));
        if !seeded {
            // What the server saw is diffusers' own img2img start: the noised image latent.
            let start = rel_l2(&job.noise, &g.tensors["ddim/s0.6/start"]);
            println!(
                "obfuscated job's start vs diffusers' noised init latents: rel L2 {start:.2e}"
            );
            assert!(start <= TOL, "{start}");
        }
        let latent = obf
            .audit
            .views
            .iter()
            .find(|v| v.kind == ViewKind::Latent)
            .expect("latent view");
        assert_eq!(latent.rows, Some(0..8));
        let r = rel_l2(&obf.latents, &local.latents);
        let db = psnr(&obf.image, &local.image);
        println!(
            "obfuscated {scheduler} s{strength}: rel L2 {r:.2e} (latents), {db:.1} dB vs local"
        );
        assert!(r <= 1e-5 && db >= 60.0, "{scheduler}: {r}, {db} dB");
    }
}

#[tokio::test]
async fn obfuscated_img2img_over_quic_matches_in_process() {
    let g = golden();
    let sd = load();
    let o = obfuscated(&g, SchedulerKind::EulerDiscrete, 0.3);
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
    let over_quic = run(&sd, &o, &backends).await;
    let in_process = run(&sd, &o, &[sd.in_process_full_server()]).await;
    let r = rel_l2(&over_quic.latents, &in_process.latents);
    println!("obfuscated img2img over QUIC vs in process: rel L2 {r:.2e}");
    assert!(r <= 1e-5, "relative L2 {r}");
    for q in &b {
        q.close().await;
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn bad_img2img_options_are_refused() {
    let g = golden();
    let sd = load();
    let base = opts(&g, SchedulerKind::Ddim, 0.6, Policy::Local);
    let t2i = GenerateOptions {
        init_image: None,
        noise: None,
        ..base.clone()
    };
    let zeros = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu);
    let cases: Vec<(&str, GenerateOptions)> = vec![
        (
            "strength 0",
            GenerateOptions {
                strength: 0.0,
                ..base.clone()
            },
        ),
        (
            "strength 1.5",
            GenerateOptions {
                strength: 1.5,
                ..base.clone()
            },
        ),
        (
            "strength NaN",
            GenerateOptions {
                strength: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "no step kept",
            GenerateOptions {
                strength: 0.05,
                ..base.clone()
            },
        ),
        (
            "noise without an init image",
            GenerateOptions {
                noise: Some(g.tensors["noise"].clone()),
                ..t2i.clone()
            },
        ),
        (
            "latents with an init image",
            GenerateOptions {
                latents: Some(g.tensors["noise"].clone()),
                ..base.clone()
            },
        ),
        (
            "image of another size",
            GenerateOptions {
                width: 128,
                height: 128,
                ..base.clone()
            },
        ),
        (
            "noise of another shape",
            GenerateOptions {
                noise: Some(zeros(&[1, 4, 4, 4]).expect("z")),
                ..base.clone()
            },
        ),
        (
            "pixels outside [0, 1]",
            GenerateOptions {
                init_image: Some((init_image() * 2.0).expect("x2")),
                ..base.clone()
            },
        ),
    ];
    for (what, o) in cases {
        match sd.generate(&o, &[], &mut |_| {}).await {
            Err(veil_core::Error::InvalidArgument(m)) => println!("{what}: {m}"),
            Err(e) => panic!("{what}: another error: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
}
