//! The trained tiny shapes model (`models/tiny-shapes`) against diffusers
//! (`tools/make_shapes_golden.py`, which loads the same folder with `StableDiffusionPipeline`):
//! text states, the server U-Net under `local` and `strict`, the smaller device U-Net (the
//! `obfuscated` policy's late steps), and a whole DDIM generation with guidance match to ≤ 1e-4
//! relative L2.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use veil_core::client::hybrid::DeviceUNet;
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::ShardBackend;
use veil_core::placement::{Policy, Runtime, WireDtype};
use veil_tests::{rel_l2, repo_root};

const TOL: f64 = 1e-4;
const PROMPT: &str = "a large red circle at the top left on a white background";

fn fixtures() -> (StableDiffusion, HashMap<String, Tensor>) {
    let sd = StableDiffusion::load(&repo_root().join("models/tiny-shapes"), &Device::Cpu)
        .expect("load models/tiny-shapes");
    let p = repo_root().join("tests/fixtures/golden/shapes.safetensors");
    let g = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (sd, g)
}

#[tokio::test]
async fn trained_model_matches_diffusers() {
    let (sd, g) = fixtures();
    let cond = sd.encode_prompt(PROMPT).expect("encode");
    let err = rel_l2(&cond, &g["text_states"]);
    println!("text states: rel L2 {err:.3e}");
    assert!(err <= TOL, "text states {err}");

    let uncond = sd.encode_prompt("").expect("encode");
    let context = Tensor::cat(&[&uncond, &cond], 0).expect("cat");
    let x = Tensor::cat(&[&g["latents_init"], &g["latents_init"]], 0).expect("cat");
    for (policy, n) in [(Policy::Local, 0), (Policy::Strict, 4)] {
        let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = sd.in_process_backends(n);
        let mut rt = Runtime::new(
            &sd.unet_engine,
            policy.placement(),
            &backends,
            WireDtype::F32,
        )
        .expect("runtime");
        let eps = sd
            .unet
            .forward(&mut rt, &x, 501.0, &context)
            .await
            .expect("unet");
        let err = rel_l2(&eps, &g["unet_eps"]);
        println!("unet ({}, N = {n}): rel L2 {err:.3e}", policy.name());
        assert!(err <= TOL, "{}: {err}", policy.name());
    }

    let device = DeviceUNet::load(
        &repo_root().join("models/tiny-shapes/device_unet"),
        &Device::Cpu,
    )
    .expect("load the device U-Net");
    assert!(
        device
            .engine
            .weights()
            .values()
            .map(|t| t.elem_count())
            .sum::<usize>()
            < sd.unet_engine
                .weights()
                .values()
                .map(|t| t.elem_count())
                .sum::<usize>(),
        "the device U-Net is the smaller one"
    );
    let mut rt = Runtime::new(
        &device.engine,
        Policy::Local.placement(),
        &[],
        WireDtype::F32,
    )
    .expect("runtime");
    let eps = device
        .unet
        .forward(&mut rt, &x, 501.0, &context)
        .await
        .expect("device unet");
    let err = rel_l2(&eps, &g["device_eps"]);
    println!("device unet: rel L2 {err:.3e}");
    assert!(err <= TOL, "device unet: {err}");

    let opts = GenerateOptions {
        prompt: PROMPT.into(),
        steps: 4,
        guidance: 5.0,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        latents: Some(g["latents_init"].clone()),
        ..Default::default()
    };
    let out = sd
        .generate(&opts, &[], &mut |_| {})
        .await
        .expect("generate");
    let err = rel_l2(&out.latents, &g["latents_final"]);
    println!("final latents: rel L2 {err:.3e}");
    assert!(err <= TOL, "final latents {err}");
    let err = rel_l2(&out.image.unsqueeze(0).expect("batch"), &g["image"]);
    println!("image: rel L2 {err:.3e}");
    assert!(err <= TOL, "image {err}");
}
