//! Inpainting against diffusers' `StableDiffusionInpaintPipeline` with a 9-channel U-Net
//! (`tools/make_inpaint_golden.py`: the VAE posterior mean, given noise; a mask whose edges
//! fall between the latent cells and whose anti-aliased ring straddles the 0.5 threshold):
//! the mask and masked-image channels exactly as diffusers builds them, then DDIM and Euler at
//! strength 1 and DDIM at 0.6, every step within 1e-4 relative L2 and the image ≥ 40 dB. Then
//! the same runs under `ppidm`, `strict` (each server only its strip of the mask and the
//! masked image) and `obfuscated` (the server is sent both whole, as image content) against
//! `local`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use veil_core::client::hybrid::ObfuscationOptions;
use veil_core::client::pipeline::{
    image_from_png, mask_from_png, GenerateOptions, StableDiffusion,
};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::audit::DepClass;
use veil_core::placement::{GnVariant, Policy, ViewKind};
use veil_tests::{generate_seen, max_abs, psnr, rel_l2, repo_root, tiny_model};

const TOL: f64 = 1e-4;

struct Golden {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn dir() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/inpaint")
}

fn golden() -> Golden {
    let t = candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu)
        .expect("golden.safetensors");
    let meta = serde_json::from_str(
        &std::fs::read_to_string(dir().join("golden.json")).expect("golden.json"),
    )
    .expect("json");
    Golden { t, meta }
}

fn load() -> Arc<StableDiffusion> {
    Arc::new(StableDiffusion::load(&dir().join("model"), &Device::Cpu).expect("load"))
}

fn png(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).expect("png")
}

fn opts(g: &Golden, scheduler: SchedulerKind, steps: usize, strength: f64) -> GenerateOptions {
    GenerateOptions {
        prompt: g.meta["prompt"].as_str().expect("prompt").into(),
        steps,
        guidance: g.meta["guidance_scale"].as_f64().expect("guidance"),
        width: 64,
        height: 64,
        scheduler,
        init_image: Some(image_from_png(&png("image.png"), &Device::Cpu).expect("image")),
        mask: Some(mask_from_png(&png("mask.png"), &Device::Cpu).expect("mask")),
        strength,
        noise: Some(g.t["noise"].clone()),
        ..Default::default()
    }
}

const CASES: [(&str, SchedulerKind, usize, f64); 3] = [
    ("ddim4_s1.0", SchedulerKind::Ddim, 4, 1.0),
    ("euler4_s1.0", SchedulerKind::EulerDiscrete, 4, 1.0),
    ("ddim6_s0.6", SchedulerKind::Ddim, 6, 0.6),
];

#[test]
fn mask_and_masked_image_channels_match_diffusers() {
    let g = golden();
    let sd = load();
    assert!(sd.inpainting().expect("layout"));
    let image = image_from_png(&png("image.png"), &Device::Cpu).expect("image");
    let mask = mask_from_png(&png("mask.png"), &Device::Cpu).expect("mask");
    assert_eq!(max_abs(&image, &g.t["image"]), 0.0);
    assert_eq!(max_abs(&mask, &g.t["mask"]), 0.0);
    let c = sd
        .inpaint_condition(&image, &mask, 64, 64)
        .expect("condition");
    assert_eq!(c.dims(), &[1, 5, 8, 8]);
    // The mask on the latent grid: nearest sampling of the binarised mask, exactly.
    let grid = c.narrow(1, 0, 1).expect("mask channel");
    assert_eq!(max_abs(&grid, &g.t["mask_latent"]), 0.0);
    let lat = rel_l2(
        &c.narrow(1, 1, 4).expect("latents"),
        &g.t["masked_image_latents"],
    );
    println!("masked image latents: rel L2 {lat:.2e} vs diffusers");
    assert!(lat <= 1e-5, "{lat}");
}

#[tokio::test]
async fn inpainting_trajectories_match_diffusers() {
    let g = golden();
    let sd = load();
    for (key, scheduler, steps, strength) in CASES {
        let (out, seen) = generate_seen(&sd, &opts(&g, scheduler, steps, strength), &[]).await;
        let want = &g.t[&format!("{key}/latents")];
        assert_eq!(seen.len(), want.dim(0).expect("steps"), "{key}: steps run");
        let mut per_step = Vec::new();
        for (i, got) in seen.iter().enumerate() {
            let err = rel_l2(
                got,
                &want.narrow(0, i, 1).expect("step").squeeze(0).expect("s"),
            );
            per_step.push(format!("{err:.2e}"));
            assert!(err <= TOL, "{key} step {}: {err}", i + 1);
        }
        let img = g.t[&format!("{key}/image")]
            .permute((2, 0, 1))
            .expect("chw");
        let db = psnr(&out.image, &img);
        println!(
            "{key}: rel L2 per step [{}], image {db:.1} dB vs diffusers",
            per_step.join(", ")
        );
        assert!(db >= 40.0, "{key}: {db} dB");
    }
}

#[tokio::test]
async fn inpainting_runs_under_every_policy_like_local() {
    let g = golden();
    let sd = load();
    for (key, scheduler, steps, strength) in CASES {
        let base = |p: Policy| GenerateOptions {
            policy: p,
            ..opts(&g, scheduler, steps, strength)
        };
        let (local, _) = generate_seen(&sd, &base(Policy::Local), &[]).await;
        let ppidm = Policy::Ppidm {
            gn: GnVariant::Exact,
        };
        let cases = [
            ("ppidm", base(ppidm), 2),
            ("strict", base(Policy::Strict), 2),
            ("strict", base(Policy::Strict), 3),
            ("strict, halves apart on 4", base(Policy::Strict), 4),
        ];
        for (name, o, n) in cases {
            let (out, _) = generate_seen(&sd, &o, &sd.in_process_backends(n)).await;
            let db = psnr(&out.image, &local.image);
            println!("{key} {name} (N = {n}): {db:.1} dB vs local");
            assert!(db >= 60.0, "{key} {name} N = {n}: {db} dB");
            if !name.starts_with("strict") {
                continue;
            }
            // The 9-channel input (latent, mask, masked image) reaches each server as its strip
            // (and halo rows) only, as image content.
            let halo = Policy::Strict.halo_bound().unwrap_or(0);
            let latent_views: Vec<_> = out
                .audit
                .views
                .iter()
                .filter(|v| v.kind == ViewKind::Latent)
                .collect();
            assert!(!latent_views.is_empty());
            for v in latent_views {
                let (res, rows) = (v.resolution.expect("res"), v.rows.clone().expect("rows"));
                let strip = out.audit.strips[v.server][&res].clone();
                assert!(rows.start + halo >= strip.start && rows.end <= strip.end + halo);
                assert!(
                    rows.len() < res.0,
                    "{name}: server {} got every row",
                    v.server
                );
                assert_eq!(v.class, DepClass::Raw);
                // 9 channels per row of the batch it holds.
                assert_eq!(v.bytes % (9 * 8 * 4) as u64, 0, "{} bytes", v.bytes);
            }
        }
    }
}

#[tokio::test]
async fn obfuscated_inpainting_sends_the_server_the_mask_channels() {
    let g = golden();
    let sd = load();
    for (key, scheduler, steps, strength) in CASES {
        let o = GenerateOptions {
            // Two detected attributes: K = 4 candidates in the server's batch.
            prompt: "a photo of a young woman reading".into(),
            policy: Policy::Obfuscated,
            obfuscation: ObfuscationOptions {
                k_max: Some(4),
                ..Default::default()
            },
            ..opts(&g, scheduler, steps, strength)
        };
        let (obf, _) = generate_seen(&sd, &o, &[sd.in_process_full_server()]).await;
        let local = GenerateOptions {
            policy: Policy::Local,
            ..o.clone()
        };
        let (local, _) = generate_seen(&sd, &local, &[]).await;
        let sent: Vec<_> = obf
            .audit
            .views
            .iter()
            .filter(|v| v.layer == "early_steps condition")
            .collect();
        assert_eq!(sent.len(), 1, "{key}: the condition is sent once");
        assert_eq!(sent[0].bytes, 5 * 8 * 8 * 4);
        let r = rel_l2(&obf.latents, &local.latents);
        println!("obfuscated {key}: latents rel L2 {r:.2e} vs local");
        assert!(r <= 1e-5, "{key}: {r}");
    }
}

#[tokio::test]
async fn masks_without_an_inpainting_unet_and_the_reverse_are_refused() {
    let g = golden();
    let inpaint = load();
    let plain = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("tiny");
    let with_mask = opts(&g, SchedulerKind::Ddim, 4, 1.0);
    let e = plain.generate(&with_mask, &[], &mut |_| {}).await;
    assert!(format!("{:?}", e.err()).contains("inpainting U-Net"));
    let no_mask = GenerateOptions {
        mask: None,
        ..with_mask.clone()
    };
    let e = inpaint.generate(&no_mask, &[], &mut |_| {}).await;
    assert!(format!("{:?}", e.err()).contains("give an init image and a mask"));
    let small = GenerateOptions {
        mask: Some(Tensor::zeros((1, 32, 32), candle_core::DType::F32, &Device::Cpu).expect("z")),
        ..with_mask.clone()
    };
    let e = inpaint.generate(&small, &[], &mut |_| {}).await;
    assert!(format!("{:?}", e.err()).contains("mask of shape"));
    let out_of_range = GenerateOptions {
        mask: Some(
            (Tensor::ones((1, 64, 64), candle_core::DType::F32, &Device::Cpu).expect("o") * 2.0)
                .expect("x"),
        ),
        ..with_mask
    };
    let e = inpaint.generate(&out_of_range, &[], &mut |_| {}).await;
    assert!(format!("{:?}", e.err()).contains("mask values"));
}

/// The SDK: `GenerationOptions.mask` (PNG bytes) gives the pipeline's image, and a
/// `VeilConfig.lora` adapter the CLI's (`--lora`) — both `local`, same seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_takes_a_mask_and_lora_adapters() {
    use veil_core::sdk::{
        CancelHandle, GenerationOptions as SdkOptions, LoraConfig, Veil, VeilConfig,
    };
    let g = golden();
    let mut cfg = VeilConfig::new(dir().join("model"), vec![]);
    cfg.policy = veil_core::sdk::Policy::Local;
    cfg.defaults.steps = 4;
    let veil = Veil::new(cfg).expect("veil");
    let o = SdkOptions {
        seed: Some(1),
        init_image: Some(png("image.png")),
        mask: Some(png("mask.png")),
        strength: Some(1.0),
        ..Default::default()
    };
    let prompt = g.meta["prompt"].as_str().expect("prompt");
    let img = veil
        .generate(prompt, &o, None, &CancelHandle::new())
        .await
        .expect("sdk inpainting");
    let sd = load();
    let want = GenerateOptions {
        seed: 1,
        noise: None,
        ..opts(&g, SchedulerKind::Ddim, 4, 1.0)
    };
    let (want, _) = generate_seen(&sd, &want, &[]).await;
    assert_eq!(
        img.png,
        want.png().expect("png"),
        "the SDK's inpainting is the pipeline's"
    );
    // A mask for a model without an inpainting U-Net is an invalid request, not a crash.
    let mut cfg = VeilConfig::new(tiny_model(), vec![]);
    cfg.policy = veil_core::sdk::Policy::Local;
    cfg.defaults.steps = 2;
    cfg.lora = vec![LoraConfig {
        path: repo_root().join("tests/fixtures/lora/diffusers.safetensors"),
        scale: 0.8,
    }];
    let adapted = Veil::new(cfg.clone()).expect("veil with lora");
    let e = adapted
        .generate("a red circle", &o, None, &CancelHandle::new())
        .await;
    assert!(e.is_err());
    let plain_o = SdkOptions {
        seed: Some(1),
        ..Default::default()
    };
    let a = adapted
        .generate("a red circle", &plain_o, None, &CancelHandle::new())
        .await
        .expect("adapted");
    cfg.lora.clear();
    let b = Veil::new(cfg)
        .expect("plain")
        .generate("a red circle", &plain_o, None, &CancelHandle::new())
        .await
        .expect("plain");
    assert_ne!(a.png, b.png, "the adapter changes the image");
}

/// A server's side of `obfuscated` inpainting checks the job's condition before it runs
/// anything: a condition of the wrong shape, or one sent to a model without an inpainting
/// U-Net, or none sent to one with it, is refused.
#[test]
fn early_steps_refuse_a_condition_that_does_not_fit_the_unet() {
    use veil_core::client::hybrid::EarlySteps;
    let g = golden();
    let inpaint = load();
    let plain = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("tiny");
    let job = |condition: Option<Tensor>| EarlySteps {
        candidates: vec!["a red circle".into()],
        negative_prompt: String::new(),
        noise: g.t["noise"].clone(),
        steps: 4,
        start_step: None,
        server_steps: 1,
        condition,
        guidance: 5.0,
        scheduler: SchedulerKind::Ddim,
        accel: Default::default(),
    };
    let zeros = |c: usize, h: usize| {
        Tensor::zeros((1, c, h, 8), candle_core::DType::F32, &Device::Cpu).expect("zeros")
    };
    for (sd, cond, why) in [
        (
            &*inpaint,
            Some(zeros(4, 8)),
            "four channels where five are needed",
        ),
        (
            &*inpaint,
            Some(zeros(5, 7)),
            "a condition of another height",
        ),
        (&*inpaint, None, "no condition for an inpainting U-Net"),
        (
            &plain as &StableDiffusion,
            Some(zeros(5, 8)),
            "a condition for a plain U-Net",
        ),
    ] {
        let e = sd.early_steps(&job(cond), &mut |_, _| {});
        assert!(e.is_err(), "{why}: accepted");
    }
    assert!(inpaint
        .early_steps(&job(Some(zeros(5, 8))), &mut |_, _| {})
        .is_ok());
}
