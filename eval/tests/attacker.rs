//! The attacker's shared primitives on small cases with known answers: the K/V least-squares
//! inversion recovers planted features exactly (and leaves a residual on keys no features
//! produce), and the latent rows a server received are placed exactly where they belong.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::{View, ViewKind};
use veil_eval::attacker::{invert_key_values, key_values, latent_rows, Seen};

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
fn latent_rows_are_exactly_the_rows_received() {
    let (c, h, w) = (4, 6, 5);
    // Rows 2..4 of the U-Net input (batch 2: the second half is the one used).
    let t = Tensor::from_vec(values(2 * c * 2 * w, 3), (2, c, 2, w), &Device::Cpu).unwrap();
    let seen = vec![Seen::new(view("conv_in", ViewKind::Latent, (h, w), 2..4), &t).unwrap()];
    let (vals, rows) = latent_rows(&seen, (c, h, w));
    assert_eq!(rows, vec![false, false, true, true, false, false]);
    let second = t.get(1).unwrap();
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let got = vals[(ch * h + y) * w + x];
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
                    assert_eq!(got, 0.0, "rows not received are zero");
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
