//! The privacy evaluation on a small case of the trained tiny model: each attack family beats
//! the strip-only control under `ppidm` and under `strict` with the guidance halves together
//! (the layout `strict` first shipped with), and falls back to the control under the default
//! `strict` — by stated margins, so the test fails if the attacks weaken or the leak returns.

use std::path::Path;

use candle_core::Device;
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::Policy;
use veil_eval::privacy::calls::Setting;
use veil_eval::privacy::report::SettingRow;
use veil_eval::privacy::{run, PrivacyConfig};

fn model() -> std::path::PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-shapes"
    ))
    .to_path_buf()
}

fn family(r: &SettingRow, f: &str) -> Option<f64> {
    r.prompt.families.get(f).copied().flatten()
}

#[test]
fn attacks_beat_their_control_where_a_server_sees_more_than_its_strip() {
    let dir = model();
    let sd = StableDiffusion::load(&dir, &Device::Cpu).expect("load");
    let ppidm = Policy::Ppidm {
        gn: Default::default(),
    };
    let mut together = Setting::new(Policy::Strict, 4);
    together.halves = GuidanceHalves::Together;
    let cfg = PrivacyConfig {
        train: 60,
        test: 8,
        batch: 34,
        dictionary_extra: 40,
        settings: vec![
            Setting::new(ppidm, 2),
            Setting::new(Policy::Strict, 2),
            together,
        ],
        ..PrivacyConfig::full()
    };
    let f = run(&sd, &dir, &cfg, &mut |_, _, _| {}).expect("privacy run");
    assert_eq!(f.test_pictures, 8);
    assert_eq!(f.settings.len(), 2 + 2 + 4);
    for r in &f.settings {
        let img = (r.image.attack_psnr_outside, r.image.control_psnr_outside);
        let words = (
            r.prompt.attack_word_accuracy,
            r.prompt.control_word_accuracy,
        );
        println!(
            "{} N = {} server {} ({}): image {:?} dB vs control {:?}; prompt {:?} vs {:?}, exact {:?}; families {:?} / {:?}",
            r.policy, r.servers, r.server, r.holds, img.0, img.1, words.0, words.1,
            r.prompt.attack_exact, r.image.families, r.prompt.families
        );
        match (r.policy.as_str(), r.guidance_halves.as_str()) {
            ("ppidm", _) => {
                // The latent inverted through the weights and finished: far above the control.
                let (Some(a), Some(c)) = img else {
                    panic!("ppidm image attack did not run")
                };
                assert!(a >= c + 6.0, "ppidm image {a} vs control {c}");
                // The prompt inverted token by token from the text keys and values.
                let t = family(r, "text inversion").expect("text inversion ran");
                assert!(t >= 0.9, "ppidm prompt slots {t}");
                assert!(r.prompt.attack_exact.is_some_and(|e| e >= 0.75));
            }
            ("strict", "together") => {
                // Both halves of a strip on one server: the CFG-difference test is exact.
                let c = family(r, "cfg difference").expect("cfg difference ran");
                assert!(c >= 0.9, "together: cfg difference {c}");
                assert!(r.prompt.attack_exact.is_some_and(|e| e >= 0.75));
            }
            ("strict", "apart") => {
                // One half per server, with the shared stream estimated from the server's own
                // tokens. On the first tiny model (which barely used its captions) this did no
                // better than the strip-only control; on the retrained one (issue 16) it names
                // the caption as the exact test does (measured: every slot and 8 of 8 captions
                // on both servers). So guidance halves apart do not hide the prompt from a
                // server: README and docs/AUDIT.md say so. These assertions pin that finding;
                // a placement that closes the leak turns them around.
                let cfg = family(r, "cfg difference").expect("cfg difference ran");
                let ctrl = words.1.expect("control ran");
                assert!(
                    cfg >= ctrl + 0.3,
                    "apart: cfg difference {cfg} vs control {ctrl}"
                );
                let exact = r.prompt.attack_exact.unwrap_or(0.0);
                assert!(exact >= 0.75, "apart: exact captions {exact}");
            }
            other => panic!("unexpected setting {other:?}"),
        }
    }
}
