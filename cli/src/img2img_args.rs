//! Image-to-image and inpainting on the command line (`veil generate --init-image PNG
//! --strength S [--noise FILE] [--mask PNG]`): the init image and the mask read from PNGs, the
//! noise from a safetensors file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use veil_core::client::options::{image_from_png, mask_from_png};

/// The image-to-image settings.
#[derive(Args)]
pub struct Img2ImgArgs {
    /// Image-to-image: the init image (PNG, RGB; alpha dropped). Encoded with the VAE on this
    /// device; its size is the generation's (--width/--height, if given, must match it).
    #[arg(long, conflicts_with = "latents")]
    init_image: Option<PathBuf>,
    /// Image-to-image: how much of the schedule runs, in (0, 1]: the last ⌊steps × strength⌋
    /// of --steps, from the init image noised to the first of them (diffusers' strength).
    #[arg(long, default_value_t = veil_core::client::options::DEFAULT_STRENGTH, requires = "init_image")]
    strength: f64,
    /// Image-to-image: the noise added to the init image's latents (a safetensors file with one
    /// tensor `noise` [1, 4, H/8, W/8]); default: seeded by --seed.
    #[arg(long, requires = "init_image")]
    noise: Option<PathBuf>,
    /// Inpainting (a model whose U-Net takes 9 channels, diffusers' inpainting layout): the
    /// mask, a PNG the size of the init image, white (≥ 50% gray) where the image is repainted.
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
}

/// What the arguments give a generation.
pub struct Img2Img {
    /// RGB [3, H, W] in [0, 1].
    pub image: Option<Tensor>,
    pub strength: f64,
    pub noise: Option<Tensor>,
    /// [1, H, W] in [0, 1].
    pub mask: Option<Tensor>,
}

impl Img2ImgArgs {
    /// Reads the init image and the noise file, if given.
    pub fn load(&self, device: &Device) -> Result<Img2Img> {
        let image = match &self.init_image {
            Some(p) => {
                let bytes = std::fs::read(p)
                    .with_context(|| format!("reading init image {}", p.display()))?;
                Some(
                    image_from_png(&bytes, device)
                        .with_context(|| format!("decoding init image {}", p.display()))?,
                )
            }
            None => None,
        };
        let noise = match &self.noise {
            Some(p) => Some(read_tensor(p, "noise", device)?),
            None => None,
        };
        let mask = match &self.mask {
            Some(p) => {
                let bytes =
                    std::fs::read(p).with_context(|| format!("reading mask {}", p.display()))?;
                Some(
                    mask_from_png(&bytes, device)
                        .with_context(|| format!("decoding mask {}", p.display()))?,
                )
            }
            None => None,
        };
        Ok(Img2Img {
            image,
            strength: self.strength,
            noise,
            mask,
        })
    }
}

impl Img2Img {
    /// The generation's (width, height): the init image's, where one is given (a given
    /// `width`/`height` must match it), else the given ones or `default_side`.
    pub fn size(
        &self,
        width: Option<usize>,
        height: Option<usize>,
        default_side: usize,
    ) -> Result<(usize, usize)> {
        let Some(image) = &self.image else {
            return Ok((
                width.unwrap_or(default_side),
                height.unwrap_or(default_side),
            ));
        };
        let (_, h, w) = image.dims3()?;
        if width.is_some_and(|x| x != w) || height.is_some_and(|x| x != h) {
            bail!(
                "the init image is {w}x{h}; --width/--height ask for {}x{} (resize the image, or \
                 leave them out)",
                width.unwrap_or(w),
                height.unwrap_or(h)
            );
        }
        Ok((w, h))
    }
}

/// The tensor `name` of a safetensors file.
pub fn read_tensor(path: &Path, name: &str, device: &Device) -> Result<Tensor> {
    let mut m = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {name} {}", path.display()))?;
    m.remove(name)
        .with_context(|| format!("{} has no tensor `{name}`", path.display()))
}
