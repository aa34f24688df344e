//! The attack suite on small cases with known answers: K/V inversion recovers planted features
//! exactly, strip decode places exactly the rows received, and on real (tiny, random-weight)
//! generations a `ppidm` server inverts every self-attention and recovers the prompt while a
//! `strict` server has neither keys, values nor text, and sees only its strip plus halo.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::{GnVariant, Policy, View, ViewKind};
use veil_eval::attack::{
    self, fill_rows, invert_key_values, key_values, latent_rows, AttackConfig, Seen,
};

fn model() -> StableDiffusion {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-random");
    StableDiffusion::load(&root, &Device::Cpu).unwrap()
}

fn view(layer: &str, kind: ViewKind, res: (usize, usize), rows: std::ops::Range<usize>) -> View {
    View {
        server: 0,
        call: 0,
        layer: layer.into(),
        kind,
        resolution: Some(res),
        rows: Some(rows),
        text_indexed: false,
        class: veil_core::placement::DepClass::Raw,
        bytes: 0,
    }
}

/// Deterministic values in [-1, 1].
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn key_value_inversion_recovers_planted_features() {
    let sd = model();
    // The first self-attention of the model, with its real public weights.
    let layer = sd
        .unet_engine
        .weights()
        .keys()
        .filter(|k| k.ends_with("attn1.to_k.weight"))
        .min()
        .unwrap()
        .trim_end_matches(".to_k.weight")
        .to_string();
    let wk = &sd.unet_engine.weights()[&format!("{layer}.to_k.weight")];
    let wv = &sd.unet_engine.weights()[&format!("{layer}.to_v.weight")];
    let (dk, c) = wk.dims2().unwrap();
    let (h, w) = (4, 3);
    let x = Tensor::from_vec(values(2 * h * w * c, 5), (2, h * w, c), &Device::Cpu).unwrap();
    let k = x.broadcast_matmul(&wk.t().unwrap()).unwrap();
    let v = x.broadcast_matmul(&wv.t().unwrap()).unwrap();
    let seen = vec![
        Seen::new(view(&layer, ViewKind::KeyValue, (h, w), 0..h), &k).unwrap(),
        Seen::new(view(&layer, ViewKind::KeyValue, (h, w), 0..h), &v).unwrap(),
    ];
    let kvs = key_values(&seen);
    assert_eq!(kvs.len(), 1);
    assert!(kvs[0].v.is_some());
    let (features, channels, residual) = invert_key_values(&sd, &kvs[0]).unwrap();
    assert_eq!(channels, c);
    assert!(residual < 1e-5, "residual {residual}");
    // The last batch element's features come back.
    let truth = x
        .get(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let err = features
        .iter()
        .zip(&truth)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        dk >= c,
        "to_k is {dk}×{c}: not invertible from K alone, V helps"
    );
    assert!(err < 1e-3, "max error {err}");

    // Garbage keys (not in the range of W) leave a residual: the check can fail.
    let noise = Tensor::from_vec(values(2 * h * w * dk, 9), (2, h * w, dk), &Device::Cpu).unwrap();
    let bad = vec![
        Seen::new(view(&layer, ViewKind::KeyValue, (h, w), 0..h), &noise).unwrap(),
        Seen::new(view(&layer, ViewKind::KeyValue, (h, w), 0..h), &v).unwrap(),
    ];
    let (_, _, residual) = invert_key_values(&sd, &key_values(&bad)[0]).unwrap();
    if 2 * dk > c {
        assert!(residual > 1e-2, "residual {residual}");
    }
}

#[test]
fn strip_decode_places_exactly_the_rows_received() {
    let (c, h, w) = (4, 6, 5);
    // Rows 2..4 of the U-Net input (batch 2: the second half is the one used).
    let t = Tensor::from_vec(values(2 * c * 2 * w, 3), (2, c, 2, w), &Device::Cpu).unwrap();
    let seen = vec![Seen::new(view("conv_in", ViewKind::Latent, (h, w), 2..4), &t).unwrap()];
    let (vals, rows) = latent_rows(&seen, (c, h, w));
    assert_eq!(rows, vec![false, false, true, true, false, false]);
    let prior = vec![9f32; c * h * w];
    let filled = fill_rows(&vals, &rows, &prior, c, w);
    let second = t.get(1).unwrap();
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let got = filled[(ch * h + y) * w + x];
                if (2..4).contains(&y) {
                    let want: f32 = second
                        .get(ch)
                        .unwrap()
                        .get(y - 2)
                        .unwrap()
                        .get(x)
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    assert_eq!(got, want);
                } else {
                    assert_eq!(got, 9.0);
                }
            }
        }
    }
    // Tensors of other layers or kinds are not the latent.
    let other = vec![Seen::new(
        view(
            "down_blocks.0.resnets.0.conv1",
            ViewKind::Block,
            (h, w),
            2..4,
        ),
        &t,
    )
    .unwrap()];
    assert_eq!(latent_rows(&other, (c, h, w)).1, vec![false; h]);
}

#[test]
fn ppidm_servers_invert_keys_and_recover_prompts_strict_servers_cannot() {
    let sd = model();
    let f = sd.vae.config.downsample_factor();
    let side = sd.unet.config.sample_size.unwrap_or(8) * f;
    let (lh, _) = sd.latent_size(side, side).unwrap();
    let cfg = |policy| AttackConfig {
        policy,
        servers: 2,
        train: 4,
        test: 2,
        steps: 2,
        guidance: 5.0,
        side,
        seed: 3,
        pool_extra: 6,
    };
    let ppidm = attack::run(
        &sd,
        &cfg(Policy::Ppidm {
            gn: GnVariant::Exact,
        }),
        &mut |_, _| {},
    )
    .unwrap();
    let strict = attack::run(&sd, &cfg(Policy::Strict), &mut |_, _| {}).unwrap();
    assert_eq!(ppidm.prompt_pool, 8);
    for s in &ppidm.per_server {
        assert!(s.kv_layers > 0);
        assert!(s.kv_residual.unwrap() < 1e-3, "{:?}", s.kv_residual);
        assert!(s.kv_inversion.is_some());
        // The true caption is in the pool and its keys match exactly.
        assert_eq!(s.prompt_recovery, Some(1.0));
    }
    for s in &strict.per_server {
        assert_eq!(s.kv_layers, 0);
        assert!(s.kv_inversion.is_none());
        assert_eq!(s.prompt_recovery, None);
        // Its strip plus at most one halo row per side.
        let strip = s.strip[1] - s.strip[0];
        assert!(
            s.latent_rows_seen >= strip && s.latent_rows_seen <= strip + 2,
            "{s:?}"
        );
        assert!(s.latent_rows_seen < lh);
    }
    // Every score is a real number, and the mean-picture baseline is the same for both runs
    // (same training captions and seeds give the same pictures).
    for r in [&ppidm, &strict] {
        assert!(r.device_baseline.psnr.is_finite());
        for s in &r.per_server {
            assert!(s.strip_decode.psnr.is_finite() && s.linear_probe.psnr.is_finite());
            assert!(s.strip_decode.psnr_outside.is_some());
        }
    }
    assert!((ppidm.device_baseline.psnr - strict.device_baseline.psnr).abs() < 0.5);
}
