//! The whole-generation attack on a small case of the trained tiny model: every step of every
//! generation reaches the attacker's features, and the learned maps read them (where one
//! server holds every row, its own rows alone beat the mean picture by a stated margin).

use std::path::Path;

use candle_core::Device;
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::Policy;
use veil_eval::privacy::calls::Setting;
use veil_eval::privacy::generations::{run, GenerationsConfig};

#[test]
fn whole_generations_are_read_at_every_step() {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-shapes"
    ));
    let sd = StableDiffusion::load(dir, &Device::Cpu).expect("load");
    let steps = 4;
    let cfg = GenerationsConfig {
        train: 40,
        test: 6,
        batch: 23,
        steps,
        settings: vec![
            Setting::new(Policy::Strict, 1),
            Setting::new(Policy::Strict, 2),
        ],
        ..GenerationsConfig::full()
    };
    let f = run(&sd, &cfg, &mut |_, _, _| {}).expect("whole-generation run");
    assert_eq!((f.training_generations, f.test_generations), (40, 6));
    assert_eq!(f.settings.len(), 1 + 2);
    let (c, h, w) = (4, 16, 16);
    for r in &f.settings {
        println!("{r:?}");
        // Own rows (strip and one halo row per side) at every one of the steps.
        let held = r.strip[0].saturating_sub(1)..(r.strip[1] + 1).min(h);
        assert_eq!(r.control_features, steps * c * held.len() * w, "{r:?}");
        assert!(r.view_features > r.control_features, "{r:?}");
        for v in [
            r.mean_picture_psnr_outside,
            r.control_psnr_outside,
            r.attack_psnr_outside,
        ] {
            assert!(v.is_some_and(f64::is_finite), "{r:?}");
        }
        for v in [r.control_word_accuracy, r.attack_word_accuracy] {
            assert!(v.is_some_and(|v| (0.0..=1.0).contains(&v)), "{r:?}");
        }
    }
    // One server (N = 1, conditional half; the phone runs the other) holds every latent row at
    // every step, so its decoders see the last step's input, nearly the final picture: they
    // reach the privacy gate's ceiling (35 dB), far above the mean picture.
    let one = &f.settings[0];
    assert_eq!((one.strip, one.servers), ([0, h], 1));
    let mean = one.mean_picture_psnr_outside.unwrap_or(f64::INFINITY);
    for v in [one.control_psnr_outside, one.attack_psnr_outside] {
        let v = v.unwrap_or(0.0);
        assert!(
            v >= 35.0 && v >= mean + 20.0,
            "N = 1: {v:.2} dB against the mean picture's {mean:.2} dB"
        );
    }
}
