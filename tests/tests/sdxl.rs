//! SDXL against diffusers' `StableDiffusionXLPipeline` (`tools/make_sdxl_golden.py`: a tiny
//! random SDXL with two text encoders of different widths, the second padding with `!` and
//! projecting its pooled state; `text_time` added conditioning; a first level without
//! attention and 1/1/2 transformer layers per level; a 48×64 image, non-square 12×16 latents).
//! The text side, one U-Net call and Euler/DDIM trajectories from given latents must match
//! diffusers; then `strict` (N = 2, 3, halves apart and together) and `ppidm` must equal
//! `local`, and no `strict` server may receive the pooled text embedding or anything computed
//! from it except as strips of the feature map (the audit's views).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::hybrid::ObfuscationOptions;
use veil_core::client::pipeline::{GenerateOptions, Generation, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::audit::DepClass;
use veil_core::placement::engine::WireDtype;
use veil_core::placement::runtime::Runtime;
use veil_core::placement::{GnVariant, Policy, ViewKind};
use veil_tests::{generate_seen, psnr, rel_l2, repo_root};

/// Per-step trajectories and single calls, relative L2 against diffusers.
const TOL: f64 = 1e-4;

struct Golden {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn golden() -> Golden {
    let dir = repo_root().join("tests/fixtures/sdxl");
    let t = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
        .expect("golden.safetensors");
    let meta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
    )
    .expect("json");
    Golden { t, meta }
}

fn load() -> Arc<StableDiffusion> {
    let dir = repo_root().join("tests/fixtures/sdxl/model");
    Arc::new(StableDiffusion::load(&dir, &Device::Cpu).expect("load tiny SDXL"))
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::U32))
        .and_then(|t| t.to_vec1())
        .expect("ids")
}

#[test]
fn sdxl_text_side_matches_diffusers() {
    let g = golden();
    let sd = load();
    let xl = sd
        .xl
        .as_ref()
        .expect("an SDXL folder has a second text side");
    assert!(xl.force_zeros_for_empty_prompt);
    // Both tokenizers on every case the generator recorded (the second pads with `!`).
    for case in g.meta["tokenizer_cases"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect()
        };
        assert_eq!(
            sd.tokenizer.encode(prompt).expect("ids"),
            want("input_ids"),
            "{prompt:?}"
        );
        assert_eq!(
            xl.tokenizer_2.encode(prompt).expect("ids"),
            want("input_ids_2"),
            "tokenizer_2 on {prompt:?}"
        );
    }
    for p in ["a", "b"] {
        let prompt = g.meta["params"][format!("prompt_{p}")]
            .as_str()
            .expect("prompt");
        assert_eq!(
            sd.tokenizer.encode(prompt).expect("ids"),
            ids(&g.t[&format!("prompt_{p}_input_ids")])
        );
        let e = sd.encode_text(prompt).expect("encode");
        let states = rel_l2(&e.states, &g.t[&format!("prompt_{p}_prompt_embeds")]);
        let pooled = rel_l2(
            e.pooled.as_ref().expect("pooled"),
            &g.t[&format!("prompt_{p}_pooled_prompt_embeds")],
        );
        println!("prompt {p}: states rel L2 {states:.2e}, pooled {pooled:.2e} vs diffusers");
        assert!(states <= 1e-5 && pooled <= 1e-5, "{states} {pooled}");
    }
}

#[tokio::test]
async fn sdxl_unet_call_matches_diffusers() {
    let g = golden();
    let sd = load();
    let tt = sd.unet.text_time().expect("text_time");
    let c = &sd.unet.config;
    let ids: Vec<f64> = ids(&g.t["unet_time_ids"].narrow(0, 0, 1).expect("row"))
        .into_iter()
        .map(f64::from)
        .collect();
    let ids: [f64; 6] = ids.try_into().expect("six ids");
    assert_eq!(ids, veil_core::model::unet::default_time_ids(48, 64));
    let added = veil_core::model::unet::text_time_input(
        &tt,
        &g.t["unet_text_embeds"],
        &ids,
        c.flip_sin_to_cos,
        c.freq_shift,
    )
    .expect("added");
    let mut rt = Runtime::new(
        &sd.unet_engine,
        Policy::Local.placement(),
        &[],
        WireDtype::F32,
    )
    .expect("runtime");
    let out = sd
        .unet
        .forward_added(
            &mut rt,
            &g.t["unet_sample"],
            501.0,
            &g.t["unet_encoder_hidden_states"],
            Some(&added),
        )
        .await
        .expect("forward");
    let err = rel_l2(&out, &g.t["unet_out"]);
    println!("U-Net call: rel L2 {err:.2e} vs diffusers");
    assert!(err <= TOL, "{err}");
    // Without its added conditioning an SDXL U-Net refuses to run.
    let refused = sd
        .unet
        .forward(
            &mut rt,
            &g.t["unet_sample"],
            501.0,
            &g.t["unet_encoder_hidden_states"],
        )
        .await;
    assert!(refused.is_err());
}

fn opts(g: &Golden, scheduler: SchedulerKind, steps: usize, guidance: f64) -> GenerateOptions {
    GenerateOptions {
        prompt: g.meta["params"]["prompt_a"]
            .as_str()
            .expect("prompt")
            .into(),
        steps,
        guidance,
        width: 64,
        height: 48,
        scheduler,
        latents: Some(g.t["latents_init"].clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn sdxl_trajectories_match_diffusers() {
    let g = golden();
    let sd = load();
    for (key, scheduler, steps, guidance) in [
        ("euler", SchedulerKind::EulerDiscrete, 3, 5.0),
        ("ddim", SchedulerKind::Ddim, 3, 5.0),
        ("nocfg_euler", SchedulerKind::EulerDiscrete, 2, 0.0),
    ] {
        let (out, seen) = generate_seen(&sd, &opts(&g, scheduler, steps, guidance), &[]).await;
        let mut per_step = Vec::new();
        for (i, got) in seen.iter().enumerate() {
            if let Some(want) = g.t.get(&format!("{key}_latents_step{}", i + 1)) {
                let err = rel_l2(got, want);
                per_step.push(format!("{err:.2e}"));
                assert!(err <= TOL, "{key} step {}: {err}", i + 1);
            }
        }
        let fin = rel_l2(&out.latents, &g.t[&format!("{key}_latents_final")]);
        assert!(fin <= TOL, "{key} final: {fin}");
        let db = match g.t.get(&format!("{key}_image")) {
            Some(want) => {
                let want = want.permute((2, 0, 1)).expect("chw");
                let db = psnr(&out.image, &want);
                assert!(db >= 40.0, "{key}: {db} dB");
                format!("image {db:.1} dB")
            }
            None => "no image golden".into(),
        };
        println!(
            "{key}: {steps} steps, rel L2 per step [{}], final {fin:.2e}, {db} vs diffusers",
            per_step.join(", ")
        );
    }
}

/// What `strict` servers received on SDXL: strips and halo rows of the latent and the
/// feature maps, GroupNorm moments — never the pooled embedding, the time embedding it is
/// added to, a resnet's projection of it, the text states or their keys and values.
fn strict_views_hold_no_text_vector(out: &Generation, what: &str) {
    let mut kinds: HashMap<ViewKind, u64> = HashMap::new();
    for v in &out.audit.views {
        *kinds.entry(v.kind).or_default() += v.bytes;
        assert!(
            matches!(
                v.kind,
                ViewKind::Latent | ViewKind::Strip | ViewKind::Halo | ViewKind::Moments
            ),
            "{what}: server {} received a {:?} for {} ({:?})",
            v.server,
            v.kind,
            v.layer,
            v.class
        );
        if v.kind == ViewKind::Latent {
            assert_eq!(v.class, DepClass::Raw, "{what}: {}", v.layer);
        }
        // Every row a server received lies in its strip of that map, widened by the halo bound.
        if let (Some(res), Some(rows)) = (v.resolution, v.rows.clone()) {
            let strip = out.audit.strips[v.server][&res].clone();
            let halo = Policy::Strict.halo_bound().unwrap_or(0);
            assert!(
                rows.start + halo >= strip.start && rows.end <= strip.end + halo,
                "{what}: server {} got rows {rows:?} of {res:?} for {}, strip {strip:?}",
                v.server,
                v.layer
            );
        }
        if v.kind == ViewKind::Moments {
            // The moments are statistics of the map; the map may already be text-conditioned.
            assert!(v.class >= DepClass::WholeMap);
        }
    }
    assert!(out.audit.texts.is_empty(), "{what}: a prompt was sent");
    println!("{what}: bytes per view kind {kinds:?}");
}

#[tokio::test]
async fn sdxl_runs_under_ppidm_and_strict_like_local() {
    let g = golden();
    let sd = load();
    for (scheduler, guidance) in [
        (SchedulerKind::EulerDiscrete, 5.0),
        (SchedulerKind::Ddim, 5.0),
        (SchedulerKind::EulerDiscrete, 0.0),
    ] {
        let base = |p: Policy| GenerateOptions {
            policy: p,
            ..opts(&g, scheduler, 3, guidance)
        };
        let (local, _) = generate_seen(&sd, &base(Policy::Local), &[]).await;
        let ppidm = Policy::Ppidm {
            gn: GnVariant::Exact,
        };
        let mut cases = vec![("ppidm", base(ppidm), 2)];
        for n in [2, 3] {
            cases.push(("strict", base(Policy::Strict), n));
        }
        if guidance > 1.0 {
            let together = GenerateOptions {
                guidance_halves: Some(GuidanceHalves::Together),
                ..base(Policy::Strict)
            };
            cases.push(("strict, halves together", together, 3));
            cases.push(("strict, halves apart on 4", base(Policy::Strict), 4));
        }
        for (name, o, n) in cases {
            let (out, _) = generate_seen(&sd, &o, &sd.in_process_backends(n)).await;
            let db = psnr(&out.image, &local.image);
            let lat = rel_l2(&out.latents, &local.latents);
            println!(
                "{scheduler} g{guidance} {name} (N = {n}): latents rel L2 {lat:.2e}, image \
                 {db:.1} dB vs local"
            );
            assert!(db >= 60.0, "{name} N = {n}: {db} dB");
            if name.starts_with("strict") {
                strict_views_hold_no_text_vector(&out, name);
            }
        }
    }
}

/// `obfuscated` on SDXL: the server encodes the K candidate prompts with both text encoders
/// and runs their first steps with each one's pooled embedding and the image's size ids (taken
/// from the latent it was sent); the phone finishes the real one. With the model's own U-Net
/// on the phone the result is `local`'s.
#[tokio::test]
async fn sdxl_runs_under_obfuscated_like_local() {
    let g = golden();
    let sd = load();
    let o = GenerateOptions {
        // Two detected attributes: K = 4 candidates in the server's batch.
        prompt: "a photo of a young woman reading".into(),
        policy: Policy::Obfuscated,
        obfuscation: ObfuscationOptions {
            k_max: Some(4),
            ..Default::default()
        },
        ..opts(&g, SchedulerKind::EulerDiscrete, 4, 5.0)
    };
    let (obf, _) = generate_seen(&sd, &o, &[sd.in_process_full_server()]).await;
    let report = obf.obfuscation.as_ref().expect("obfuscation report");
    assert_eq!(report.candidates, 4);
    assert!(report.server_steps > 0 && report.device_steps > 0);
    let local = GenerateOptions {
        policy: Policy::Local,
        ..o.clone()
    };
    let (local, _) = generate_seen(&sd, &local, &[]).await;
    let r = rel_l2(&obf.latents, &local.latents);
    let db = psnr(&obf.image, &local.image);
    println!(
        "obfuscated SDXL ({} server + {} phone steps, K = 4): latents rel L2 {r:.2e}, {db:.1} dB \
         vs local",
        report.server_steps, report.device_steps
    );
    assert!(r <= 1e-5 && db >= 60.0, "{r}, {db} dB");
}

/// A `strict` phone with 4 servers holds only its own layers — and, on SDXL, every resnet's
/// `norm2`, which it applies after adding the pooled embedding's bias — and generates what
/// `local` does.
#[tokio::test]
async fn an_sdxl_strict_phone_loads_its_layers_and_the_norms_it_applies() {
    use veil_core::client::pipeline::LoadRole;
    let g = golden();
    let full = load();
    let role = LoadRole::Phone {
        policy: Policy::Strict,
        servers: 4,
    };
    let dir = repo_root().join("tests/fixtures/sdxl/model");
    let phone = StableDiffusion::load_for(&dir, &Device::Cpu, role).expect("phone");
    let held = phone.unet_engine.weights();
    assert!(held.len() < full.unet_engine.weights().len());
    assert!(held.keys().any(|k| k.ends_with("resnets.0.norm2.weight")));
    assert!(
        !held.keys().any(|k| k.ends_with("conv1.weight")),
        "no server weight"
    );
    let o = GenerateOptions {
        policy: Policy::Strict,
        ..opts(&g, SchedulerKind::EulerDiscrete, 3, 5.0)
    };
    let (strict, _) = generate_seen(&phone, &o, &full.in_process_backends(4)).await;
    let local = GenerateOptions {
        policy: Policy::Local,
        ..o.clone()
    };
    let (local, _) = generate_seen(&full, &local, &[]).await;
    let db = psnr(&strict.image, &local.image);
    println!("SDXL strict phone (own layers only, 4 servers): {db:.1} dB vs local");
    assert!(db >= 60.0, "{db}");
}
