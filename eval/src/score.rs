//! The prompt-adherence scorer: from the pixels alone, find each coloured object (nearest
//! named colour, largest connected region per colour), measure where it is (3×3 cell of its
//! centroid), how big (half-extent of its bounding box) and what shape (fill of the bounding
//! box; top/bottom mass for triangle vs diamond), and compare with the caption's main object.

use image::RgbImage;

use crate::dataset::{Background, Colour, Position, Scene, Shape, Size};

/// One object found in a picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub colour: Colour,
    pub shape: Shape,
    pub position: Position,
    pub size: Size,
    pub pixels: usize,
    /// Centroid in pixels (x, y).
    pub centroid: (f32, f32),
}

/// How well a picture follows its caption's main (first) object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Adherence {
    /// An object of the asked colour is there.
    pub colour: bool,
    /// … and it has the asked shape / cell / size (false when the colour is missing).
    pub shape: bool,
    pub position: bool,
    pub size: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("caption `{0}` is not of the dataset's form")]
    Caption(String),
}

/// A pixel farther than this (RGB Euclidean) from every palette colour is left unlabelled
/// (anti-aliased or blurred edges between two colours).
const MAX_COLOUR_DISTANCE: f32 = 100.0;

fn distance(a: [u8; 3], b: [u8; 3]) -> f32 {
    let d: f32 = (0..3).map(|i| (a[i] as f32 - b[i] as f32).powi(2)).sum();
    d.sqrt()
}

/// The background: the palette background nearest the mean border colour.
pub fn background_of(img: &RgbImage) -> Background {
    let (w, h) = img.dimensions();
    let mut sum = [0f64; 3];
    let mut n = 0f64;
    for (x, y, p) in img.enumerate_pixels() {
        if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
            for (s, v) in sum.iter_mut().zip(p.0) {
                *s += v as f64;
            }
            n += 1.0;
        }
    }
    let mean = sum.map(|s| (s / n.max(1.0)) as u8);
    Background::ALL
        .into_iter()
        .min_by(|a, b| distance(a.rgb(), mean).total_cmp(&distance(b.rgb(), mean)))
        .unwrap_or(Background::White)
}

/// The objects in `img`, largest first.
pub fn detect(img: &RgbImage) -> Vec<Detected> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let bg = background_of(img);
    let colours: Vec<Colour> = Colour::ALL
        .into_iter()
        .filter(|c| !bg.clashes_with(*c))
        .collect();
    // Label each pixel: Some(index into colours), or None for background / unnamed.
    let labels: Vec<Option<usize>> = img
        .pixels()
        .map(|p| {
            let mut best = (distance(bg.rgb(), p.0), None);
            for (i, c) in colours.iter().enumerate() {
                let d = distance(c.rgb(), p.0);
                if d < best.0 {
                    best = (d, Some(i));
                }
            }
            if best.0 > MAX_COLOUR_DISTANCE {
                None
            } else {
                best.1
            }
        })
        .collect();
    let min_pixels = ((w * h) / 300).max(4);
    let mut found = Vec::new();
    for (ci, &colour) in colours.iter().enumerate() {
        if let Some(region) = largest_region(&labels, w, h, ci) {
            if region.len() >= min_pixels {
                found.push(describe(colour, &region, w.min(h)));
            }
        }
    }
    found.sort_by_key(|d| std::cmp::Reverse(d.pixels));
    found
}

/// The largest 4-connected region of pixels labelled `label`, as pixel indices.
fn largest_region(
    labels: &[Option<usize>],
    w: usize,
    h: usize,
    label: usize,
) -> Option<Vec<usize>> {
    let mut seen = vec![false; labels.len()];
    let mut best: Option<Vec<usize>> = None;
    for start in 0..labels.len() {
        if seen[start] || labels[start] != Some(label) {
            continue;
        }
        let mut region = Vec::new();
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(i) = stack.pop() {
            region.push(i);
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == Some(label) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if best.as_ref().is_none_or(|b| region.len() > b.len()) {
            best = Some(region);
        }
    }
    best
}

fn describe(colour: Colour, region: &[usize], side: usize) -> Detected {
    let w = side;
    let (mut sx, mut sy) = (0f64, 0f64);
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for &i in region {
        let (x, y) = (i % w, i / w);
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let n = region.len();
    let (cx, cy) = ((sx / n as f64) as f32, (sy / n as f64) as f32);
    let s = side as f32;
    let cell = |v: f32| ((v / s * 3.0).floor().max(0.0) as usize).min(2);
    let position = Position::from_cell(cell(cx), cell(cy));
    let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let fill = n as f32 / (bw * bh);
    // Mass below vs above the bounding box's middle: 3 for an apex-up triangle, 1 for a diamond.
    let mid = (y0 + y1) as f32 / 2.0;
    let below = region.iter().filter(|&&i| (i / w) as f32 > mid).count() as f32;
    let above = region.iter().filter(|&&i| ((i / w) as f32) < mid).count() as f32;
    let shape = if fill > 0.88 {
        Shape::Square
    } else if fill > 0.66 {
        Shape::Circle
    } else if below > 1.7 * above.max(1.0) {
        Shape::Triangle
    } else {
        Shape::Diamond
    };
    // Half-extent in units of the side; a square is drawn at 0.9 of its nominal half-extent.
    let mut half = bw.max(bh) / 2.0 / s;
    if shape == Shape::Square {
        half /= 0.9;
    }
    let (a, b, c) = (
        Size::Small.half_extent(),
        Size::Medium.half_extent(),
        Size::Large.half_extent(),
    );
    let size = if half < (a + b) / 2.0 {
        Size::Small
    } else if half < (b + c) / 2.0 {
        Size::Medium
    } else {
        Size::Large
    };
    Detected {
        colour,
        shape,
        position,
        size,
        pixels: n,
        centroid: (cx, cy),
    }
}

/// Scores `img` against `caption`'s main (first) object.
pub fn score(img: &RgbImage, caption: &str) -> Result<Adherence, ScoreError> {
    let scene = Scene::parse(caption).ok_or_else(|| ScoreError::Caption(caption.to_string()))?;
    let main = scene.objects[0];
    let found = detect(img);
    Ok(match found.iter().find(|d| d.colour == main.colour) {
        None => Adherence::default(),
        Some(d) => Adherence {
            colour: true,
            shape: d.shape == main.shape,
            position: d.position == main.position,
            size: d.size == main.size,
        },
    })
}
