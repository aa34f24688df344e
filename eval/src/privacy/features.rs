//! What the learned attacks read: fixed-length features of one server's sight of one picture,
//! and the prompt's attribute slots as one-hot targets.
//!
//! - rows (the strip-only control): the x_t rows the server holds (its strip and one halo row
//!   per side) — what any strip split reveals;
//! - view (`strict`): those rows, plus the GroupNorm moments of the first layers of every half
//!   it holds, plus the per-row channel means of the streams the phone scattered after the
//!   first transformer blocks.

use std::ops::Range;

use veil_core::placement::ViewKind;

use crate::dataset::{Background, Colour, Position, Scene, Shape, Size};

use super::calls::{Item, ServerSight};

/// Moments layers read by the view features (the first ones of the U-Net).
const MOMENT_LAYERS: usize = 8;
/// Scattered streams read by the view features (the first transformer blocks').
const STREAMS: usize = 2;

/// A server's own rows at the latent resolution widened by one halo row per side.
pub fn held_rows(strip: &Range<usize>, h: usize) -> Range<usize> {
    strip.start.saturating_sub(1)..(strip.end + 1).min(h)
}

/// The x_t rows `rows` of an item, channel-major.
pub fn rows_features(item: &Item, rows: &Range<usize>) -> Vec<f32> {
    let (c, h, w) = item.latent;
    let mut out = Vec::with_capacity(c * rows.len() * w);
    for ch in 0..c {
        for r in rows.clone() {
            let s = (ch * h + r) * w;
            out.extend_from_slice(&item.xt[s..s + w]);
        }
    }
    out
}

/// Per-row channel means of a token stream [rows·w, C] of a map `w` wide.
fn row_means(tokens: &[f32], channels: usize, w: usize) -> Vec<f32> {
    let rows = tokens.len() / (channels * w).max(1);
    let mut out = vec![0f32; rows * channels];
    for r in 0..rows {
        for x in 0..w {
            for c in 0..channels {
                out[r * channels + c] += tokens[(r * w + x) * channels + c] / w as f32;
            }
        }
    }
    out
}

/// Which parts of the view a learned attack reads (the ablation of what carries the leak).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewParts {
    /// Own rows, moments and scattered streams.
    All,
    /// Own rows and the GroupNorm moments.
    RowsMoments,
    /// Own rows and the scattered streams.
    RowsStreams,
}

impl ViewParts {
    pub const ALL: [ViewParts; 3] = [
        ViewParts::All,
        ViewParts::RowsMoments,
        ViewParts::RowsStreams,
    ];

    /// The family names of the decoder and the probe reading these parts.
    pub fn families(self) -> (&'static str, &'static str) {
        match self {
            ViewParts::All => ("view decoder", "view probe"),
            ViewParts::RowsMoments => {
                ("view decoder: rows + moments", "view probe: rows + moments")
            }
            ViewParts::RowsStreams => {
                ("view decoder: rows + streams", "view probe: rows + streams")
            }
        }
    }
}

/// The view features of a `strict` server's sight of `item`.
pub fn view_features(item: &Item, sight: &ServerSight) -> Vec<f32> {
    view_parts(item, sight, ViewParts::All)
}

/// The features of `parts` of a `strict` server's sight of `item`.
pub fn view_parts(item: &Item, sight: &ServerSight, parts: ViewParts) -> Vec<f32> {
    let mut f = rows_features(item, &held_rows(&sight.strip, item.latent.1));
    f.extend(view_extras(sight, parts));
    f
}

/// The latent rows a server received at `conv_in` in one call (its strip and halo rows,
/// channel-major): the strip-only control's features of one step of a whole generation.
pub fn sight_rows(sight: &ServerSight) -> Vec<f32> {
    let (c, h, w) = sight.latent;
    let (lat, _) = sight.latent_rows();
    let rows = held_rows(&sight.strip, h);
    let mut out = Vec::with_capacity(c * rows.len() * w);
    for ch in 0..c {
        for r in rows.clone() {
            let s = (ch * h + r) * w;
            out.extend_from_slice(lat.get(s..s + w).unwrap_or(&[]));
        }
    }
    out
}

/// The parts of a view besides the server's own rows: the first layers' GroupNorm moments
/// and the row means of the first scattered streams, as `parts` selects.
pub fn view_extras(sight: &ServerSight, parts: ViewParts) -> Vec<f32> {
    let mut f = Vec::new();
    let moments = parts != ViewParts::RowsStreams;
    for m in sight
        .all(ViewKind::Moments)
        .take(MOMENT_LAYERS * usize::from(moments))
    {
        for half in [&m.uncond, &m.cond].into_iter().flatten() {
            f.extend_from_slice(half);
        }
    }
    if parts == ViewParts::RowsMoments {
        return f;
    }
    for s in sight
        .all(ViewKind::Strip)
        .filter(|s| s.view.layer.ends_with("norm3"))
        .take(STREAMS)
    {
        let (Some(&c), Some((_, w))) = (s.dims.last(), s.view.resolution) else {
            continue;
        };
        for half in [&s.uncond, &s.cond].into_iter().flatten() {
            f.extend(row_means(half, c, w));
        }
    }
    f
}

/// One-hot targets of the main object's size, colour, shape, position and the background.
pub fn slot_targets(scene: &Scene) -> Vec<f32> {
    let o = scene.objects[0];
    let mut t = Vec::new();
    let mut one_hot = |n: usize, i: usize| t.extend((0..n).map(|k| f32::from(u8::from(k == i))));
    one_hot(
        Size::ALL.len(),
        Size::ALL.iter().position(|s| *s == o.size).unwrap_or(0),
    );
    one_hot(
        Colour::ALL.len(),
        Colour::ALL.iter().position(|c| *c == o.colour).unwrap_or(0),
    );
    one_hot(
        Shape::ALL.len(),
        Shape::ALL.iter().position(|s| *s == o.shape).unwrap_or(0),
    );
    one_hot(
        Position::ALL.len(),
        Position::ALL
            .iter()
            .position(|p| *p == o.position)
            .unwrap_or(0),
    );
    one_hot(
        Background::ALL.len(),
        Background::ALL
            .iter()
            .position(|b| *b == scene.background)
            .unwrap_or(0),
    );
    t
}

/// The scene a probe's scores name: the arg-max of each slot.
pub fn slot_scene(scores: &[f32]) -> Option<Scene> {
    let mut at = 0;
    let mut pick = |n: usize| {
        let part = scores.get(at..at + n)?;
        at += n;
        part.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let size = Size::ALL[pick(Size::ALL.len())?];
    let colour = Colour::ALL[pick(Colour::ALL.len())?];
    let shape = Shape::ALL[pick(Shape::ALL.len())?];
    let position = Position::ALL[pick(Position::ALL.len())?];
    let background = Background::ALL[pick(Background::ALL.len())?];
    Some(Scene {
        objects: vec![crate::dataset::Object {
            shape,
            colour,
            position,
            size,
        }],
        background,
    })
}
