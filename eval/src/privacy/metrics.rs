//! How a reconstruction is scored: PSNR of the mean squared error over object pixels outside
//! the server's strip and halo rows, pooled over all test pictures (one PSNR of one MSE, so a
//! few perfect pictures cannot dominate); attribute accuracy of objects lying wholly outside
//! the strip; prompt recovery per attribute slot of the caption.

use std::ops::Range;

use crate::dataset::{Object, Scene};
use crate::metrics::Picture;
use crate::score::detect;

use super::calls::Item;

/// Pixel rows a server knows: its strip's latent rows widened by one halo row per side.
pub fn known_pixel_rows(strip: &Range<usize>, latent_rows: usize, per_row: usize) -> Range<usize> {
    let lo = strip.start.saturating_sub(1);
    let hi = (strip.end + 1).min(latent_rows);
    lo * per_row..hi * per_row
}

/// Squared error and pixel count over the item's object pixels outside `known` rows.
pub fn outside_object_error(item: &Item, guess: &Picture, known: &Range<usize>) -> (f64, usize) {
    let (h, w) = (item.truth.height, item.truth.width);
    let plane = h * w;
    let mut se = 0f64;
    let mut n = 0usize;
    for y in (0..h).filter(|y| !known.contains(y)) {
        for x in 0..w {
            let p = y * w + x;
            if !item.object_pixels.get(p).copied().unwrap_or(false) {
                continue;
            }
            for c in 0..3 {
                let i = c * plane + p;
                if let (Some(a), Some(b)) = (item.truth.data.get(i), guess.data.get(i)) {
                    se += (*a as f64 - *b as f64).powi(2);
                }
            }
            n += 3;
        }
    }
    (se, n)
}

/// PSNR (dB, peak 1) of a pooled squared error; None without pixels.
pub fn pooled_psnr(se: f64, n: usize) -> Option<f64> {
    (n > 0).then(|| {
        let mse = (se / n as f64).max(1e-10);
        -10.0 * mse.log10()
    })
}

/// The pixel rows an object may cover (its cell centre ± half-extent ± the render's jitter).
fn object_rows(o: &Object, side: usize) -> Range<usize> {
    let s = side as f32;
    let (_, row) = o.position.cell();
    let cy = (row as f32 + 0.5) / 3.0 * s;
    let r = o.size.half_extent() * s + 0.03 * s + 1.0;
    let lo = (cy - r).floor().max(0.0) as usize;
    let hi = ((cy + r).ceil() as usize).min(side);
    lo..hi
}

/// Objects of `scene` lying wholly outside the `known` pixel rows.
pub fn objects_outside(scene: &Scene, side: usize, known: &Range<usize>) -> Vec<Object> {
    scene
        .objects
        .iter()
        .filter(|o| {
            let r = object_rows(o, side);
            r.end <= known.start || r.start >= known.end
        })
        .copied()
        .collect()
}

/// Attributes right (of 4 per object: colour, shape, position, size) among `objects`, read
/// from a reconstruction by the adherence scorer's detector.
pub fn attributes_right(guess: &Picture, objects: &[Object]) -> (usize, usize) {
    let found = detect(&guess.to_rgb());
    let mut right = 0;
    for o in objects {
        if let Some(d) = found.iter().find(|d| d.colour == o.colour) {
            right += 1
                + usize::from(d.shape == o.shape)
                + usize::from(d.position == o.position)
                + usize::from(d.size == o.size);
        }
    }
    (right, 4 * objects.len())
}

/// The attribute slots of a caption a prompt attack is scored on: the main object's size,
/// colour, shape and position, and the background.
pub fn slots(scene: &Scene) -> [String; 5] {
    let o = scene.objects[0];
    [
        o.size.name().to_string(),
        o.colour.name().to_string(),
        o.shape.name().to_string(),
        o.position.phrase().to_string(),
        scene.background.name().to_string(),
    ]
}

/// Slots of `guess` equal to those of `truth` (a guess that does not parse scores 0).
pub fn slots_right(truth: &Scene, guess: Option<&Scene>) -> usize {
    let Some(g) = guess else { return 0 };
    slots(truth)
        .iter()
        .zip(slots(g).iter())
        .filter(|(a, b)| a == b)
        .count()
}
