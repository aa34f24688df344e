//! The dataset generator is deterministic and keeps its held-out captions out of training; the
//! scorer recovers what was drawn from ground-truth pictures (clean and degraded the way a
//! generator degrades them) and fails when the caption asks for something else.

use std::collections::HashSet;

use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use veil_eval::dataset::is_held_out;
use veil_eval::{detect, score, Background, Colour, Dataset, Object, Position, Scene, Shape, Size};

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

#[test]
fn samples_are_a_function_of_seed_and_index() {
    let d = Dataset::new(7, 64);
    for i in [0u64, 1, 17, 999] {
        let (s1, c1, a) = d.sample(i);
        let (s2, c2, b) = d.sample(i);
        assert_eq!((s1, c1, a.as_raw()), (s2, c2, b.as_raw()));
    }
    let (_, c0, a0) = d.sample(0);
    let (_, c1, a1) = Dataset::new(8, 64).sample(0);
    assert!(
        c0 != c1 || a0.as_raw() != a1.as_raw(),
        "another seed, another sample"
    );
    // Pinned: the pictures must not drift with a dependency update (training data would).
    let all: Vec<u8> = (0..8).flat_map(|i| d.sample(i).2.into_raw()).collect();
    let captions: String = (0..8).map(|i| d.sample(i).1 + "\n").collect();
    println!(
        "fnv pixels {:#x} captions {:#x}",
        fnv(&all),
        fnv(captions.as_bytes())
    );
    assert_eq!(fnv(captions.as_bytes()), CAPTIONS_FNV, "{captions}");
    assert_eq!(fnv(&all), PIXELS_FNV);
}

const CAPTIONS_FNV: u64 = 0x4062f6d24e6a0823;
const PIXELS_FNV: u64 = 0xd19c80b192973bfd;

#[test]
fn held_out_captions_never_train() {
    let d = Dataset::new(1, 32);
    let train: HashSet<String> = (0..3000).map(|i| d.sample(i).1).collect();
    let held: HashSet<String> = (0..300).map(|i| d.held_out(i).1).collect();
    assert!(train.iter().all(|c| !is_held_out(c)));
    assert!(held.iter().all(|c| is_held_out(c)));
    assert!(train.is_disjoint(&held));
    assert!(
        held.len() > 200,
        "held-out prompts are varied: {}",
        held.len()
    );
}

#[test]
fn captions_parse_back() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..2000 {
        let s = Scene::random(&mut rng);
        assert_eq!(
            Scene::parse(&s.caption()).as_ref(),
            Some(&s),
            "{}",
            s.caption()
        );
    }
    assert_eq!(
        Scene::parse("a small red circle at the top left on a white background"),
        Some(Scene {
            objects: vec![Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                position: Position::TopLeft,
                size: Size::Small
            }],
            background: Background::White
        })
    );
    assert_eq!(Scene::parse("a red circle somewhere"), None);
}

/// 3×3 box blur plus uniform noise of ±`noise`: roughly what a small generator's output looks
/// like next to the crisp training pictures.
fn degrade(img: &RgbImage, noise: i32, rng: &mut StdRng) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let mut acc = [0i32; 3];
        let mut n = 0;
        for dy in -1i32..=1 {
            for dx in -1i32..=1 {
                let (xx, yy) = (x as i32 + dx, y as i32 + dy);
                if xx >= 0 && yy >= 0 && xx < w as i32 && yy < h as i32 {
                    let p = img.get_pixel(xx as u32, yy as u32);
                    for (a, v) in acc.iter_mut().zip(p.0) {
                        *a += v as i32;
                    }
                    n += 1;
                }
            }
        }
        image::Rgb(acc.map(|a| (a / n + rng.random_range(-noise..=noise)).clamp(0, 255) as u8))
    })
}

/// Fractions of (colour, shape, position, size) right over `n` held-out pictures.
fn accuracy(side: usize, n: u64, noise: Option<i32>) -> [f64; 4] {
    let d = Dataset::new(11, side);
    let mut rng = StdRng::seed_from_u64(5);
    let mut hits = [0u32; 4];
    for i in 0..n {
        let (_, caption, img) = d.held_out(i);
        let img = match noise {
            Some(k) => degrade(&img, k, &mut rng),
            None => img,
        };
        let a = score(&img, &caption).unwrap();
        for (h, ok) in hits.iter_mut().zip([a.colour, a.shape, a.position, a.size]) {
            *h += ok as u32;
        }
    }
    hits.map(|h| h as f64 / n as f64)
}

#[test]
fn scorer_recovers_ground_truth() {
    for (side, noise, floor) in [
        (64, None, [1.0, 0.97, 1.0, 0.97]),
        (128, None, [1.0, 0.97, 1.0, 0.97]),
        (64, Some(20), [0.99, 0.7, 0.99, 0.88]),
    ] {
        let acc = accuracy(side, 400, noise);
        println!("side {side} noise {noise:?}: colour/shape/position/size = {acc:?}");
        for (k, (a, f)) in acc.iter().zip(floor).enumerate() {
            assert!(
                *a >= f,
                "side {side} noise {noise:?} attribute {k}: {a} < {f}"
            );
        }
    }
}

#[test]
fn scorer_fails_what_is_not_there() {
    let scene = Scene::parse("a large blue square in the center on a white background").unwrap();
    let img = scene.render(64, &[(0.0, 0.0)]);
    let ok = score(&img, &scene.caption()).unwrap();
    assert!(ok.colour && ok.shape && ok.position && ok.size, "{ok:?}");
    let wrong_colour = score(
        &img,
        "a large red square in the center on a white background",
    )
    .unwrap();
    assert!(!wrong_colour.colour && !wrong_colour.position);
    let wrong_place = score(
        &img,
        "a large blue square at the top left on a white background",
    )
    .unwrap();
    assert!(wrong_place.colour && !wrong_place.position && wrong_place.shape);
    let wrong_shape = score(
        &img,
        "a large blue triangle in the center on a white background",
    )
    .unwrap();
    assert!(wrong_shape.colour && !wrong_shape.shape);
    let blank = RgbImage::from_pixel(64, 64, image::Rgb(Background::Gray.rgb()));
    assert!(detect(&blank).is_empty());
    assert_eq!(score(&blank, &scene.caption()).unwrap(), Default::default());
    assert!(score(&img, "not a caption").is_err());
}
