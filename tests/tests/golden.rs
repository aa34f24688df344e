//! Golden references from diffusers/PyTorch (`tools/make_golden.py`): the committed tiny
//! pipeline `models/tiny-random` is loaded through the real folder loader and every stage is
//! matched to ≤ 1e-4 relative L2.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::model::clip::ClipTokenizer;
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::ShardBackend;
use veil_core::placement::{GnVariant, Policy, Runtime, WireDtype};
use veil_tests::{golden, rel_l2, repo_root, tiny_model};

const TOL: f64 = 1e-4;
const PROMPT_A: &str = "a small red circle at the top left on a white background";

fn load() -> StableDiffusion {
    StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load tiny model")
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::I64))
        .and_then(|t| t.to_vec1::<i64>())
        .expect("ids")
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

#[test]
fn tokenizer_matches_transformers_both_loaders() {
    let g = golden();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/golden/golden.json"))
            .expect("json"),
    )
    .expect("json");
    let dir = tiny_model().join("tokenizer");
    let from_json = ClipTokenizer::from_dir(&dir, 77).expect("tokenizer.json");
    let from_bpe = ClipTokenizer::from_vocab_merges(&dir, 77).expect("vocab+merges");
    assert_eq!(
        from_json.encode(PROMPT_A).expect("enc"),
        ids(&g["input_ids_a"])
    );
    assert_eq!(
        from_bpe.encode(PROMPT_A).expect("enc"),
        ids(&g["input_ids_a"])
    );
    assert_eq!(
        from_bpe.encode("").expect("empty prompt is valid"),
        ids(&g["input_ids_b"])
    );
    let cases = meta["tokenizer_cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    for c in cases {
        let prompt = c["prompt"].as_str().expect("prompt");
        let want: Vec<u32> = c["input_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        for (name, tok) in [("tokenizer.json", &from_json), ("vocab+merges", &from_bpe)] {
            let got = tok.encode(prompt).expect("encode");
            assert_eq!(
                got.len(),
                77,
                "{name}: always 77 ids (long prompts truncated)"
            );
            assert_eq!(got, want, "{name}: {prompt:?}");
        }
    }
}

#[test]
fn text_encoder_matches_transformers() {
    let g = golden();
    let sd = load();
    for (ids_key, out_key) in [
        ("input_ids_a", "text_hidden_a"),
        ("input_ids_b", "text_hidden_b"),
    ] {
        let got = sd
            .text_encoder
            .encode_ids(&ids(&g[ids_key]), &Device::Cpu)
            .expect("encode");
        let err = rel_l2(&got, &g[out_key]);
        println!("{out_key}: rel L2 {err:.3e}");
        assert!(err <= TOL, "{out_key}: {err}");
    }
}

#[tokio::test]
async fn unet_matches_diffusers_local_and_ppidm() {
    let g = golden();
    let sd = load();
    let t = g["unet_timestep"].to_vec1::<f32>().expect("t")[0] as f64;
    for (policy, n) in [
        (Policy::Local, 0),
        (
            Policy::Ppidm {
                gn: GnVariant::Exact,
            },
            3,
        ),
    ] {
        let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = sd.in_process_backends(n);
        let mut rt = Runtime::new(
            &sd.unet_engine,
            policy.placement(),
            &backends,
            WireDtype::F32,
        )
        .expect("rt");
        let got = sd
            .unet
            .forward(&mut rt, &g["unet_sample"], t, &g["unet_context"])
            .await
            .expect("unet");
        let err = rel_l2(&got, &g["unet_out"]);
        println!(
            "unet ({}, N = {n}) vs diffusers: rel L2 {err:.3e}",
            policy.name()
        );
        assert!(err <= TOL, "{}: {err}", policy.name());
    }
}

#[test]
fn vae_decode_matches_diffusers() {
    let g = golden();
    let sd = load();
    let got = sd.vae.decode(&g["vae_latents"]).expect("decode");
    let err = rel_l2(&got, &g["vae_decoded"]);
    println!("vae decode: rel L2 {err:.3e}");
    assert!(err <= TOL);
}

#[tokio::test]
async fn ddim_trajectory_with_cfg_matches_diffusers() {
    let g = golden();
    let sd = load();
    let opts = GenerateOptions {
        prompt: PROMPT_A.into(),
        steps: 3,
        guidance: 5.0,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        latents: Some(g["ddim_latents_init"].clone()),
        ..Default::default()
    };
    let mut steps = Vec::new();
    let out = sd
        .generate(&opts, &[], &mut |p| steps.push(p.latents.clone()))
        .await
        .expect("generate");
    assert_eq!(steps.len(), 3);
    for (i, got) in steps.iter().enumerate() {
        let key = format!("ddim_latents_step{}", i + 1);
        let err = rel_l2(got, &g[&key]);
        println!("{key}: rel L2 {err:.3e}");
        assert!(err <= TOL, "{key}: {err}");
    }
    let err = rel_l2(&out.image.unsqueeze(0).expect("b"), &g["ddim_image"]);
    println!("decoded image: rel L2 {err:.3e}");
    assert!(err <= TOL);
}
