//! The procedural shapes dataset. Every sample is a pure function of (seed, index), so a
//! training run, its evaluation and a test all see the same pictures without storing them.

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Named object colours. The palette is spread out in RGB so the scorer can name a pixel's
/// colour by nearest neighbour even after a generator blurs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    Cyan,
    Black,
    White,
}

impl Colour {
    pub const ALL: [Colour; 9] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::Cyan,
        Colour::Black,
        Colour::White,
    ];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 60, 220],
            Colour::Yellow => [245, 225, 30],
            Colour::Purple => [140, 40, 180],
            Colour::Orange => [250, 140, 20],
            Colour::Cyan => [30, 200, 220],
            Colour::Black => [15, 15, 15],
            Colour::White => [245, 245, 245],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::Cyan => "cyan",
            Colour::Black => "black",
            Colour::White => "white",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Backgrounds: white, black or gray (gray is a background only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Background {
    White,
    Black,
    Gray,
}

impl Background {
    pub const ALL: [Background; 3] = [Background::White, Background::Black, Background::Gray];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => Colour::White.rgb(),
            Background::Black => Colour::Black.rgb(),
            Background::Gray => [128, 128, 128],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Background::White => "white",
            Background::Black => "black",
            Background::Gray => "gray",
        }
    }

    /// The object colour that would vanish on this background.
    pub fn clashes_with(self, c: Colour) -> bool {
        matches!(
            (self, c),
            (Background::White, Colour::White) | (Background::Black, Colour::Black)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
        }
    }

    /// Whether (dx, dy), relative to the centre in units of the half-extent, is inside.
    fn contains(self, dx: f32, dy: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= 1.0,
            Shape::Square => dx.abs() <= 0.9 && dy.abs() <= 0.9,
            // Apex up, base down: half-width grows from 0 at dy = -1 to 1 at dy = 1.
            Shape::Triangle => (-1.0..=1.0).contains(&dy) && dx.abs() <= (dy + 1.0) / 2.0,
            Shape::Diamond => dx.abs() + dy.abs() <= 1.0,
        }
    }
}

/// How far an object's centre may move from its cell's centre, as a fraction of the side.
const JITTER: f32 = 0.03;

/// A cell of the 3×3 grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    TopLeft,
    Top,
    TopRight,
    Left,
    Center,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Position {
    pub const ALL: [Position; 9] = [
        Position::TopLeft,
        Position::Top,
        Position::TopRight,
        Position::Left,
        Position::Center,
        Position::Right,
        Position::BottomLeft,
        Position::Bottom,
        Position::BottomRight,
    ];

    /// (column, row), each 0..3.
    pub fn cell(self) -> (usize, usize) {
        let i = Self::ALL.iter().position(|p| *p == self).unwrap_or(4);
        (i % 3, i / 3)
    }

    pub fn from_cell(col: usize, row: usize) -> Self {
        Self::ALL[row.min(2) * 3 + col.min(2)]
    }

    /// The caption phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::TopLeft => "at the top left",
            Position::Top => "at the top",
            Position::TopRight => "at the top right",
            Position::Left => "on the left",
            Position::Center => "in the center",
            Position::Right => "on the right",
            Position::BottomLeft => "at the bottom left",
            Position::Bottom => "at the bottom",
            Position::BottomRight => "at the bottom right",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    /// Half-extent as a fraction of the image side.
    pub fn half_extent(self) -> f32 {
        match self {
            Size::Small => 0.07,
            Size::Medium => 0.10,
            Size::Large => 0.13,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub position: Position,
    pub size: Size,
}

impl Object {
    fn phrase(&self) -> String {
        format!(
            "a {} {} {} {}",
            self.size.name(),
            self.colour.name(),
            self.shape.name(),
            self.position.phrase()
        )
    }
}

/// One picture: one or two objects (the first is the main one, drawn on top) on a background.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub background: Background,
}

impl Scene {
    /// "a small red circle at the top left [and a …] on a white background".
    pub fn caption(&self) -> String {
        let objects: Vec<String> = self.objects.iter().map(Object::phrase).collect();
        format!(
            "{} on a {} background",
            objects.join(" and "),
            self.background.name()
        )
    }

    /// Parses a caption of exactly the form `caption` writes.
    pub fn parse(caption: &str) -> Option<Scene> {
        let caption = caption.trim().to_lowercase();
        let (objects, background) = caption.rsplit_once(" on a ")?;
        let background = background.strip_suffix(" background")?;
        let background = Background::ALL
            .into_iter()
            .find(|b| b.name() == background)?;
        let objects = objects
            .split(" and ")
            .map(|o| {
                let rest = o.strip_prefix("a ")?;
                let mut words = rest.splitn(4, ' ');
                let (size, colour, shape, phrase) =
                    (words.next()?, words.next()?, words.next()?, words.next()?);
                let size = Size::ALL.into_iter().find(|s| s.name() == size)?;
                let colour = Colour::from_name(colour)?;
                let shape = Shape::ALL.into_iter().find(|s| s.name() == shape)?;
                let position = Position::ALL.into_iter().find(|p| p.phrase() == phrase)?;
                Some(Object {
                    shape,
                    colour,
                    position,
                    size,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!objects.is_empty()).then_some(Scene {
            objects,
            background,
        })
    }

    /// A random scene: one object (70%) or two with distinct colours and cells.
    pub fn random(rng: &mut impl Rng) -> Scene {
        let background = Background::ALL[rng.random_range(0..3)];
        let n = if rng.random_bool(0.7) { 1 } else { 2 };
        let mut objects: Vec<Object> = Vec::with_capacity(n);
        while objects.len() < n {
            let o = Object {
                shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
                colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
                position: Position::ALL[rng.random_range(0..Position::ALL.len())],
                size: Size::ALL[rng.random_range(0..Size::ALL.len())],
            };
            let clash = background.clashes_with(o.colour)
                || objects
                    .iter()
                    .any(|p| p.colour == o.colour || p.position == o.position);
            if !clash {
                objects.push(o);
            }
        }
        Scene {
            objects,
            background,
        }
    }

    /// Renders the scene at `side`×`side`, 4×4 supersampled (soft edges), with the object
    /// centres jittered by `jitter` (each in [-1, 1], times 0.03 of the side): even a
    /// large object in a corner cell stays inside the picture.
    pub fn render(&self, side: usize, jitter: &[(f32, f32)]) -> RgbImage {
        let side_u = side as u32;
        let bg = self.background.rgb();
        let mut img = RgbImage::from_pixel(side_u, side_u, Rgb(bg));
        const SS: usize = 4;
        let s = side as f32;
        for (k, o) in self.objects.iter().enumerate().rev() {
            let (col, row) = o.position.cell();
            let (jx, jy) = jitter.get(k).copied().unwrap_or((0.0, 0.0));
            let cx = ((col as f32 + 0.5) / 3.0 + JITTER * jx) * s;
            let cy = ((row as f32 + 0.5) / 3.0 + JITTER * jy) * s;
            let r = o.size.half_extent() * s;
            let rgb = o.colour.rgb();
            let (x0, x1) = (
                (cx - r - 1.0).max(0.0) as u32,
                ((cx + r + 1.0) as u32).min(side_u - 1),
            );
            let (y0, y1) = (
                (cy - r - 1.0).max(0.0) as u32,
                ((cy + r + 1.0) as u32).min(side_u - 1),
            );
            for y in y0..=y1 {
                for x in x0..=x1 {
                    let mut inside = 0;
                    for sy in 0..SS {
                        for sx in 0..SS {
                            let px = x as f32 + (sx as f32 + 0.5) / SS as f32;
                            let py = y as f32 + (sy as f32 + 0.5) / SS as f32;
                            if o.shape.contains((px - cx) / r, (py - cy) / r) {
                                inside += 1;
                            }
                        }
                    }
                    if inside > 0 {
                        let a = inside as f32 / (SS * SS) as f32;
                        let p = img.get_pixel_mut(x, y);
                        for (dst, src) in p.0.iter_mut().zip(rgb) {
                            *dst = (a * src as f32 + (1.0 - a) * *dst as f32).round() as u8;
                        }
                    }
                }
            }
        }
        img
    }
}

/// The dataset: sample `i` of seed `s` is always the same scene and picture. Captions whose
/// hash falls in the held-out tenth never appear in training samples.
#[derive(Debug, Clone, Copy)]
pub struct Dataset {
    pub seed: u64,
    pub side: usize,
}

/// FNV-1a: a stable hash (std's is not stable across releases).
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Whether a caption belongs to the held-out evaluation split.
pub fn is_held_out(caption: &str) -> bool {
    stable_hash(caption).is_multiple_of(10)
}

impl Dataset {
    pub fn new(seed: u64, side: usize) -> Self {
        Self { seed, side }
    }

    fn rng(&self, stream: u64, i: u64) -> StdRng {
        StdRng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9E3779B97F4A7C15)
                .wrapping_add(stream.wrapping_mul(0xD1B54A32D192ED03))
                .wrapping_add(i),
        )
    }

    fn draw(&self, rng: &mut StdRng, held_out: bool) -> (Scene, String, RgbImage) {
        loop {
            let scene = Scene::random(rng);
            let caption = scene.caption();
            if is_held_out(&caption) == held_out {
                let jitter: Vec<(f32, f32)> = (0..scene.objects.len())
                    .map(|_| (rng.random_range(-1.0..=1.0), rng.random_range(-1.0..=1.0)))
                    .collect();
                let img = scene.render(self.side, &jitter);
                return (scene, caption, img);
            }
        }
    }

    /// Training sample `i`.
    pub fn sample(&self, i: u64) -> (Scene, String, RgbImage) {
        self.draw(&mut self.rng(1, i), false)
    }

    /// Held-out evaluation sample `i` (its caption is never a training caption).
    pub fn held_out(&self, i: u64) -> (Scene, String, RgbImage) {
        self.draw(&mut self.rng(2, i), true)
    }
}
