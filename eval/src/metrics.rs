//! Picture fidelity: PSNR and SSIM between two RGB pictures, over every row or only some rows
//! (the attack report scores a reconstruction outside the attacking server's own strip).
//!
//! Pictures are channel-major `[3, H, W]` f32 in [0, 1], as `veil-core` decodes them.

/// An RGB picture, channel-major, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    pub height: usize,
    pub width: usize,
    /// `3 * height * width` values, channel-major.
    pub data: Vec<f32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricError {
    #[error("pictures differ in size: {0}x{1} vs {2}x{3}")]
    Size(usize, usize, usize, usize),
    #[error("a {height}x{width} picture needs {expected} values, got {got}")]
    Data {
        height: usize,
        width: usize,
        expected: usize,
        got: usize,
    },
    #[error("row mask has {got} rows, the picture {height}")]
    Mask { got: usize, height: usize },
}

/// PSNR is reported up to this (identical pictures would be +∞).
pub const PSNR_CAP_DB: f64 = 100.0;

impl Picture {
    pub fn new(height: usize, width: usize, data: Vec<f32>) -> Result<Self, MetricError> {
        let expected = 3 * height * width;
        if data.len() != expected {
            return Err(MetricError::Data {
                height,
                width,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            height,
            width,
            data,
        })
    }

    /// From an 8-bit RGB image.
    pub fn from_rgb(img: &image::RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                data[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 255.0;
            }
        }
        Self {
            height: h,
            width: w,
            data,
        }
    }

    /// To an 8-bit RGB image (rounded, clamped).
    pub fn to_rgb(&self) -> image::RgbImage {
        let (h, w) = (self.height, self.width);
        image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let at = |c: usize| {
                let v = self.data[c * h * w + y as usize * w + x as usize];
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            };
            image::Rgb([at(0), at(1), at(2)])
        })
    }

    fn check(&self, other: &Picture, rows: Option<&[bool]>) -> Result<(), MetricError> {
        if (self.height, self.width) != (other.height, other.width) {
            return Err(MetricError::Size(
                self.height,
                self.width,
                other.height,
                other.width,
            ));
        }
        if let Some(m) = rows {
            if m.len() != self.height {
                return Err(MetricError::Mask {
                    got: m.len(),
                    height: self.height,
                });
            }
        }
        Ok(())
    }
}

/// Peak signal-to-noise ratio in dB over the rows `rows` selects (all when `None`), capped at
/// `PSNR_CAP_DB`. `None` when no row is selected.
pub fn psnr(a: &Picture, b: &Picture, rows: Option<&[bool]>) -> Result<Option<f64>, MetricError> {
    a.check(b, rows)?;
    let (h, w) = (a.height, a.width);
    let (mut sum, mut n) = (0f64, 0usize);
    for c in 0..3 {
        for y in (0..h).filter(|&y| rows.is_none_or(|m| m[y])) {
            let at = c * h * w + y * w;
            for x in 0..w {
                let d = (a.data[at + x] - b.data[at + x]) as f64;
                sum += d * d;
                n += 1;
            }
        }
    }
    if n == 0 {
        return Ok(None);
    }
    let mse = sum / n as f64;
    Ok(Some(if mse <= 0.0 {
        PSNR_CAP_DB
    } else {
        (10.0 * (1.0 / mse).log10()).min(PSNR_CAP_DB)
    }))
}

/// SSIM window: 11×11 Gaussian, σ = 1.5 (Wang et al. 2004).
const WINDOW: usize = 11;
const SIGMA: f64 = 1.5;
/// Stabilisers for a data range of 1.
const C1: f64 = 0.01 * 0.01;
const C2: f64 = 0.03 * 0.03;

fn gaussian() -> [f64; WINDOW] {
    let mut g = [0f64; WINDOW];
    let r = (WINDOW / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        let d = i as f64 - r;
        *v = (-(d * d) / (2.0 * SIGMA * SIGMA)).exp();
    }
    let s: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= s);
    g
}

/// Mean structural similarity over every channel and every full window whose centre row
/// `rows` selects (all when `None`). `None` when no window is selected.
pub fn ssim(a: &Picture, b: &Picture, rows: Option<&[bool]>) -> Result<Option<f64>, MetricError> {
    a.check(b, rows)?;
    let (h, w) = (a.height, a.width);
    if h < WINDOW || w < WINDOW {
        return Ok(None);
    }
    let g = gaussian();
    let r = WINDOW / 2;
    let (mut total, mut n) = (0f64, 0usize);
    for c in 0..3 {
        let pa = &a.data[c * h * w..(c + 1) * h * w];
        let pb = &b.data[c * h * w..(c + 1) * h * w];
        for cy in r..h - r {
            if rows.is_some_and(|m| !m[cy]) {
                continue;
            }
            for cx in r..w - r {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0f64, 0f64, 0f64, 0f64, 0f64);
                for (dy, gy) in g.iter().enumerate() {
                    let row = (cy + dy - r) * w;
                    for (dx, gx) in g.iter().enumerate() {
                        let k = gy * gx;
                        let (x, y) = (pa[row + cx + dx - r] as f64, pb[row + cx + dx - r] as f64);
                        ma += k * x;
                        mb += k * y;
                        saa += k * x * x;
                        sbb += k * y * y;
                        sab += k * x * y;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                total += ((2.0 * ma * mb + C1) * (2.0 * cov + C2))
                    / ((ma * ma + mb * mb + C1) * (va + vb + C2));
                n += 1;
            }
        }
    }
    Ok((n > 0).then(|| total / n as f64))
}

/// The per-pixel mean of pictures of one size (the "fully on device" attacker's best guess:
/// the dataset mean).
pub fn mean_picture(pictures: &[Picture]) -> Option<Picture> {
    let first = pictures.first()?;
    let mut data = vec![0f32; first.data.len()];
    for p in pictures {
        if p.data.len() != data.len() {
            return None;
        }
        data.iter_mut().zip(&p.data).for_each(|(a, b)| *a += b);
    }
    data.iter_mut().for_each(|v| *v /= pictures.len() as f32);
    Some(Picture {
        height: first.height,
        width: first.width,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(h: usize, w: usize, seed: u32) -> Picture {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        let data = (0..3 * h * w)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 1000) as f32 / 999.0
            })
            .collect();
        Picture::new(h, w, data).unwrap()
    }

    #[test]
    fn identical_pictures_score_the_cap_and_one() {
        let a = noise(16, 16, 1);
        assert_eq!(psnr(&a, &a, None).unwrap(), Some(PSNR_CAP_DB));
        assert!((ssim(&a, &a, None).unwrap().unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_a_known_offset() {
        // A uniform error of 0.1 has MSE 0.01: 20 dB.
        let a = Picture::new(4, 4, vec![0.5; 48]).unwrap();
        let b = Picture::new(4, 4, vec![0.6; 48]).unwrap();
        assert!((psnr(&a, &b, None).unwrap().unwrap() - 20.0).abs() < 1e-4);
    }

    #[test]
    fn row_masks_select_rows() {
        let a = noise(32, 16, 2);
        let mut b = a.clone();
        // Damage the top half only.
        for c in 0..3 {
            for i in 0..16 * 16 {
                b.data[c * 32 * 16 + i] = 1.0 - b.data[c * 32 * 16 + i];
            }
        }
        let bottom: Vec<bool> = (0..32).map(|y| y >= 16).collect();
        let top: Vec<bool> = (0..32).map(|y| y < 16).collect();
        assert_eq!(psnr(&a, &b, Some(&bottom)).unwrap(), Some(PSNR_CAP_DB));
        assert!(psnr(&a, &b, Some(&top)).unwrap().unwrap() < 10.0);
        // Windows centred at rows 21..27 never touch the damaged rows.
        let far: Vec<bool> = (0..32).map(|y| y >= 21).collect();
        assert!((ssim(&a, &b, Some(&far)).unwrap().unwrap() - 1.0).abs() < 1e-12);
        assert!(ssim(&a, &b, Some(&top)).unwrap().unwrap() < 0.5);
        let none = vec![false; 32];
        assert_eq!(psnr(&a, &b, Some(&none)).unwrap(), None);
        assert!(matches!(
            psnr(&a, &b, Some(&none[..3])),
            Err(MetricError::Mask { .. })
        ));
    }

    #[test]
    fn ssim_falls_with_noise_and_size_mismatch_is_an_error() {
        let a = noise(24, 24, 3);
        let mut b = a.clone();
        let n = noise(24, 24, 4);
        b.data
            .iter_mut()
            .zip(&n.data)
            .for_each(|(x, e)| *x = 0.7 * *x + 0.3 * e);
        let s = ssim(&a, &b, None).unwrap().unwrap();
        assert!(s > 0.3 && s < 0.99, "{s}");
        assert!(matches!(
            psnr(&a, &noise(24, 16, 1), None),
            Err(MetricError::Size(..))
        ));
    }

    #[test]
    fn rgb_round_trip() {
        let img =
            image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 80, 7]));
        assert_eq!(Picture::from_rgb(&img).to_rgb(), img);
    }
}
