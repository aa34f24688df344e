//! Real checkpoints load: our models ask for exactly the parameter names and shapes of the
//! published SD1.5, SD2.1 and SDXL base 1.0 components (dumped from diffusers/transformers with random init,
//! `tools/dump_names_shapes.py`), f16 weights load, and bad folders give typed errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use veil_core::client::pipeline::{load_unet_weights, GenerateOptions, StableDiffusion};
use veil_core::model::clip::ClipTextEncoder;
use veil_core::model::config::{read_json, ClipTextConfig, UNetConfig};
use veil_core::model::unet::UNet;
use veil_core::model::weights::RecordingBackend;
use veil_core::Error;
use veil_tests::{golden, reference_params, rel_l2, repo_root, tiny_model};

fn unet_names_match(model: &str) {
    let cfg: UNetConfig =
        read_json(&repo_root().join(format!("models/configs/{model}/unet/config.json")))
            .expect("config");
    let unet = UNet::new(&cfg).expect("unet");
    let want = reference_params(&format!("models/configs/{model}/unet.params.json"));
    let got = unet.parameters();
    assert_eq!(got.len(), want.len(), "{model}: parameter count");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "{model}: first difference");
    }
    let n: usize = got.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    println!("{model} U-Net: {} tensors, {n} parameters", got.len());
}

fn text_encoder_names_match(model: &str) {
    component_names_match(model, "text_encoder");
}

fn component_names_match(model: &str, component: &str) {
    let cfg: ClipTextConfig =
        read_json(&repo_root().join(format!("models/configs/{model}/{component}/config.json")))
            .expect("config");
    let want = reference_params(&format!("models/configs/{model}/{component}.params.json"));
    let reference: HashMap<String, Vec<usize>> = want.iter().cloned().collect();
    let rec = RecordingBackend::new(Some(reference));
    ClipTextEncoder::new(rec.var_builder(), &cfg).expect("text encoder");
    assert_eq!(
        rec.requested(),
        want,
        "{model}: {component} names and shapes"
    );
}

#[test]
fn sd15_unet_names_and_shapes() {
    unet_names_match("sd15");
}

#[test]
fn sd21_unet_names_and_shapes() {
    unet_names_match("sd21");
}

#[test]
fn sd15_text_encoder_names_and_shapes() {
    text_encoder_names_match("sd15");
}

#[test]
fn sd21_text_encoder_names_and_shapes() {
    text_encoder_names_match("sd21");
}

/// SDXL base 1.0: the U-Net (added `text_time` conditioning, blocks without attention, 1/2/10
/// transformer layers per block), CLIP ViT-L, and OpenCLIP bigG with its `text_projection`.
#[test]
fn sdxl_unet_names_and_shapes() {
    unet_names_match("sdxl");
}

#[test]
fn sdxl_text_encoders_names_and_shapes() {
    component_names_match("sdxl", "text_encoder");
    component_names_match("sdxl", "text_encoder_2");
}

/// Copies the tiny model to a fresh temp folder so a test can break it.
fn scratch_copy(tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("veil-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&tiny_model(), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).expect("copy");
        }
    }
}

#[test]
fn f16_unet_weights_load_and_match() {
    let dir = scratch_copy("f16");
    let src = dir.join("unet/diffusion_pytorch_model.safetensors");
    let f32w = candle_core::safetensors::load(&src, &Device::Cpu).expect("load");
    let f16w: HashMap<String, Tensor> = f32w
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).expect("f16")))
        .collect();
    std::fs::remove_file(&src).expect("rm");
    // diffusers' fp16 variant file name.
    candle_core::safetensors::save(
        &f16w,
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .expect("save");
    let cfg: UNetConfig = read_json(&dir.join("unet/config.json")).expect("cfg");
    let unet = UNet::new(&cfg).expect("unet");
    let loaded = load_unet_weights(&dir.join("unet"), &unet, &Device::Cpu).expect("load f16");
    for (k, v) in &loaded {
        assert_eq!(v.dtype(), DType::F32, "computed in f32");
        let err = rel_l2(v, &f32w[k]);
        assert!(err < 1e-3, "{k}: f16 round trip {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_weight_file_is_named() {
    let dir = scratch_copy("missing");
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).expect("rm");
    match StableDiffusion::load(&dir, &Device::Cpu) {
        Err(Error::MissingFile { path, .. }) => assert!(
            path.ends_with("unet/diffusion_pytorch_model.safetensors"),
            "{path:?}"
        ),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded without U-Net weights"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    match StableDiffusion::load(Path::new("/nonexistent/veil-model"), &Device::Cpu) {
        Err(Error::MissingFile { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded a missing folder"),
    }
}

#[test]
fn wrong_tensor_shape_is_named() {
    let dir = scratch_copy("shape");
    let p = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut w = candle_core::safetensors::load(&p, &Device::Cpu).expect("load");
    w.insert(
        "conv_in.weight".into(),
        Tensor::zeros((32, 4, 1, 1), DType::F32, &Device::Cpu).expect("z"),
    );
    candle_core::safetensors::save(&w, &p).expect("save");
    match StableDiffusion::load(&dir, &Device::Cpu) {
        Err(Error::TensorShape {
            name,
            expected,
            actual,
        }) => {
            assert_eq!(name, "conv_in.weight");
            assert_eq!(expected, vec![32, 4, 3, 3]);
            assert_eq!(actual, vec![32, 4, 1, 1]);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded a wrong shape"),
    }
    w.remove("conv_in.weight");
    candle_core::safetensors::save(&w, &p).expect("save");
    match StableDiffusion::load(&dir, &Device::Cpu) {
        Err(e @ Error::MissingTensor { .. }) => assert!(e.to_string().contains("conv_in.weight")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded a missing tensor"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_generation_inputs_are_typed_errors() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let opts = GenerateOptions {
        width: 60,
        height: 64,
        steps: 1,
        ..Default::default()
    };
    match sd.generate(&opts, &[], &mut |_| {}).await {
        Err(Error::Resolution {
            width: 60,
            height: 64,
            multiple: 8,
        }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("60 px accepted"),
    }
    let g = golden();
    let opts = GenerateOptions {
        width: 128,
        height: 64,
        steps: 1,
        latents: Some(g["ddim_latents_init"].clone()),
        ..Default::default()
    };
    assert!(
        matches!(
            sd.generate(&opts, &[], &mut |_| {}).await,
            Err(Error::InvalidArgument(_))
        ),
        "latents of the wrong size"
    );
    // ppidm without backends is refused up front.
    let opts = GenerateOptions {
        width: 64,
        height: 64,
        steps: 1,
        policy: veil_core::placement::Policy::Ppidm {
            gn: Default::default(),
        },
        ..Default::default()
    };
    assert!(matches!(
        sd.generate(&opts, &[], &mut |_| {}).await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn long_and_empty_prompts_are_valid() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("load");
    let long = "a small red circle at the top left on a white background ".repeat(20);
    let ids = sd.tokenizer.encode(&long).expect("long prompt");
    assert_eq!(ids.len(), 77);
    assert_eq!(
        ids[76], 813,
        "truncated prompts end with EOS, as transformers does"
    );
    for prompt in [long.as_str(), ""] {
        let opts = GenerateOptions {
            prompt: prompt.into(),
            width: 64,
            height: 64,
            steps: 1,
            ..Default::default()
        };
        let out = sd
            .generate(&opts, &[], &mut |_| {})
            .await
            .expect("generate");
        assert_eq!(out.image.dims(), &[3, 64, 64]);
    }
}
