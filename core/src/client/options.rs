//! What a generation is asked and what it returns: `GenerateOptions` (with the `obfuscated`
//! policy's `ObfuscationOptions` and its `DeviceUNet`), `Generation`, `RunStats`, and the PNG
//! encoding of a result. Every strategy of the client reads and writes these; none of them is
//! imported back from here.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::Serialize;

pub use crate::client::guidance::GuidanceHalves;
use crate::model::config::{read_json, UNetConfig};
use crate::model::scheduler::SchedulerKind;
use crate::model::unet::UNet;
use crate::model::weights::load_unet_weights;
use crate::obfuscation::{Lexicon, ObfuscationKey, Span};
use crate::placement::accounting::Accounting;
use crate::placement::audit::Audit;
use crate::placement::engine::CandleEngine;
use crate::placement::policy::Policy;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::Accelerations;
use crate::vocab::precision::WireDtype;

/// Image-to-image's strength when none is given (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// What to generate and how.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; at ≤ 1 there is no unconditional branch, so every U-Net
    /// call runs at batch 1 (SD-Turbo / SDXL-Turbo run at 0).
    pub guidance: f64,
    /// Seeds the initial noise when `latents` is not given.
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub scheduler: SchedulerKind,
    /// Text-to-image: the initial noise [1, C, h, w] (before `init_noise_sigma`) instead of
    /// seeded noise: diffusers' `latents=`. The step noise of a stochastic scheduler (euler-a,
    /// lcm) is keyed by the initial noise either way (`model::scheduler::noise`), so a run
    /// reproduces from it alone. Not with `init_image`.
    pub latents: Option<Tensor>,
    /// Image-to-image: the init image, RGB [3, `height`, `width`] in [0, 1] (`image_from_png`
    /// reads one). The phone encodes it with the VAE's posterior mean, noises it to the first
    /// step the strength keeps and denoises from there (`client::img2img`). None: text-to-image.
    pub init_image: Option<Tensor>,
    /// Image-to-image: how much of the schedule runs, in (0, 1] (diffusers' `strength`): the
    /// last ⌊steps × strength⌋ of the `steps` steps, from the init image noised to the first of
    /// them. Ignored without `init_image`.
    pub strength: f64,
    /// Image-to-image: the noise [1, C, h, w] added to the init image's latents instead of
    /// seeded noise (`--noise`; what makes a run comparable with diffusers'). Only with
    /// `init_image`.
    pub noise: Option<Tensor>,
    /// Inpainting (a U-Net with 9 input channels, diffusers' SD inpainting layout): the mask,
    /// [1, `height`, `width`] in [0, 1] (`mask_from_png`), ≥ 0.5 where the image is repainted.
    /// Needs `init_image`; at strength 1 the run starts from pure noise (`noise`, or seeded).
    pub mask: Option<Tensor>,
    pub policy: Policy,
    pub wire: WireDtype,
    /// T-GATE-style reducer: from this step on, every transformer block reuses the attention
    /// output of the step before instead of recomputing it (None: always recompute).
    pub attention_reuse_from: Option<usize>,
    /// Stale synchronisation (DistriFusion): from this step on, GroupNorm moments and halo rows
    /// on the strips are the previous step's, and this step's ride along with the next round
    /// trip (None: exact every step).
    pub stale_sync_from: Option<usize>,
    /// Which servers a guided step's two halves go to; None: the policy's own choice
    /// (`GuidanceHalves::default_for`: apart under `strict`).
    pub guidance_halves: Option<GuidanceHalves>,
    /// Evaluation only: from this step on, keep every tensor the servers receive
    /// (`Generation::captured`).
    #[cfg(feature = "eval-capture")]
    pub capture_from_step: Option<usize>,
    /// The `obfuscated` policy's settings (ignored by the other policies).
    pub obfuscation: ObfuscationOptions,
}

impl GenerateOptions {
    /// Whether a guided step's halves run on disjoint server groups in this generation.
    pub fn halves_apart(&self) -> bool {
        crate::client::guidance::halves_apart(
            self.policy,
            self.guidance_halves,
            self.guidance > 1.0,
        )
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            guidance: 5.0,
            seed: 1,
            width: 512,
            height: 512,
            scheduler: SchedulerKind::Ddim,
            latents: None,
            init_image: None,
            strength: DEFAULT_STRENGTH,
            noise: None,
            mask: None,
            policy: Policy::Local,
            wire: WireDtype::F32,
            attention_reuse_from: None,
            stale_sync_from: None,
            guidance_halves: None,
            #[cfg(feature = "eval-capture")]
            capture_from_step: None,
            obfuscation: ObfuscationOptions::default(),
        }
    }
}

/// Traffic of one shard backend.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStats {
    pub server: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub server_flops: u64,
}

/// The `--stats` JSON of a generation.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    pub wall_seconds: f64,
    pub steps: usize,
    pub unet_calls: u64,
    /// Tensor payload bytes as they travelled (after the shard codec and compression).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The same tensors in the wire dtype before any codec or compression.
    pub raw_bytes_up: u64,
    pub raw_bytes_down: u64,
    pub round_trips: u64,
    pub device_flops: u64,
    pub server_flops: u64,
    pub per_server: Vec<ServerStats>,
}

impl RunStats {
    pub fn new(a: &Accounting, steps: usize, wall_seconds: f64) -> Self {
        Self {
            wall_seconds,
            steps,
            unet_calls: a.unet_calls,
            bytes_up: a.bytes_up(),
            bytes_down: a.bytes_down(),
            raw_bytes_up: a.raw_bytes_up(),
            raw_bytes_down: a.raw_bytes_down(),
            round_trips: a.round_trips,
            device_flops: a.device_flops,
            server_flops: a.server_flops_total(),
            per_server: (0..a.backends)
                .map(|i| ServerStats {
                    server: i,
                    bytes_up: a.bytes_up_of(i),
                    bytes_down: a.bytes_down_of(i),
                    server_flops: a.server_flops[i],
                })
                .collect(),
        }
    }
}

/// The result of a generation.
pub struct Generation {
    /// RGB [3, H, W] in [0, 1].
    pub image: Tensor,
    /// Final latents [1, 4, h, w].
    pub latents: Tensor,
    pub accounting: Accounting,
    /// Every tensor each server received (empty for `local`).
    pub audit: Audit,
    /// With `capture_from_step`: each tensor a server received from that step on, with its
    /// view, in send order.
    #[cfg(feature = "eval-capture")]
    pub captured: Vec<(crate::placement::audit::View, Tensor)>,
    pub stats: RunStats,
    /// What an `obfuscated` generation sent (None for the other policies).
    pub obfuscation: Option<ObfuscationReport>,
}

impl Generation {
    /// The image as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        image_to_png(&self.image)
    }
}

/// Encodes an RGB [3, H, W] tensor in [0, 1] as PNG.
pub fn image_to_png(image: &Tensor) -> Result<Vec<u8>> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        return Err(Error::InvalidArgument(format!(
            "image has {c} channels, expected 3"
        )));
    }
    let bytes = (image.permute((1, 2, 0))? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    rgb8_to_png(w as u32, h as u32, bytes)
}

/// Encodes row-major 8-bit RGB of `width` × `height` as PNG (the image and the previews).
pub fn rgb8_to_png(width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>> {
    let buf = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::InvalidArgument("image buffer size mismatch".into()))?;
    let mut out = Vec::new();
    buf.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::InvalidArgument(format!("PNG encoding: {e}")))?;
    Ok(out)
}

/// Decodes a PNG (or any format the `image` crate reads) to an RGB [3, H, W] tensor in [0, 1]
/// on `device`: the `init_image` of an image-to-image generation. Alpha is dropped.
pub fn image_from_png(bytes: &[u8], device: &candle_core::Device) -> Result<Tensor> {
    let rgb = image::load_from_memory(bytes)
        .map_err(|e| Error::InvalidArgument(format!("init image: {e}")))?
        .to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let t = Tensor::from_vec(rgb.into_raw(), (h, w, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    // A true division, as numpy's `/ 255.0` (candle's `t / 255.0` multiplies by 1/255).
    Ok(t.broadcast_div(&Tensor::new(255f32, device)?)?)
}

/// An inpainting mask from a PNG, [1, H, W] in [0, 1]: its 8-bit gray value / 255, colour
/// converted as PIL's `convert("L")` does (diffusers' mask processor): ITU-R 601 luma in 16-bit
/// fixed point, alpha ignored; a grayscale PNG is read as it is.
pub fn mask_from_png(bytes: &[u8], device: &candle_core::Device) -> Result<Tensor> {
    let rgb = image::load_from_memory(bytes)
        .map_err(|e| Error::InvalidArgument(format!("mask: {e}")))?
        .to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let l: Vec<u8> = rgb
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    let t = Tensor::from_vec(l, (1, h, w), device)?.to_dtype(DType::F32)?;
    Ok(t.broadcast_div(&Tensor::new(255f32, device)?)?)
}

/// A device U-Net for the late steps: any diffusers U-Net with the same latent space.
pub struct DeviceUNet {
    pub unet: UNet,
    pub engine: CandleEngine,
}

impl DeviceUNet {
    /// Loads `dir/unet` (a diffusers model folder) or `dir` itself when it holds the U-Net's
    /// `config.json` directly.
    pub fn load(dir: &std::path::Path, device: &candle_core::Device) -> Result<Self> {
        let unet_dir = if dir.join("unet").join("config.json").is_file() {
            dir.join("unet")
        } else {
            dir.to_path_buf()
        };
        let cfg: UNetConfig = read_json(&unet_dir.join("config.json"))?;
        cfg.validate()?;
        let unet = UNet::new(&cfg)?;
        let weights = load_unet_weights(&unet_dir, &unet, device)?;
        Ok(Self {
            unet,
            engine: CandleEngine::new(weights, device.clone()),
        })
    }
}

/// The phone's settings of an `obfuscated` generation.
#[derive(Clone, Default)]
pub struct ObfuscationOptions {
    /// k: steps run on the server (default: half of T).
    pub server_steps: Option<usize>,
    /// Most candidates sent (default 8).
    pub k_max: Option<usize>,
    /// The attribute lexicon (default: the built-in one).
    pub lexicon: Option<Arc<Lexicon>>,
    /// What the server is asked to accelerate.
    pub accel: Accelerations,
    /// The U-Net of the late steps (default: the model's own).
    pub device_unet: Option<Arc<DeviceUNet>>,
    /// The user's persistent key, which picks the K candidates sent when there are more
    /// plausible combinations than K (`crate::obfuscation`, `partition.rs`): keep one per user
    /// for as long as a server may link their requests (`sdk::load_or_create_obfuscation_key`
    /// keeps it in a file). `None`: this process's key (`ObfuscationKey::process`), which is
    /// weaker — a new one at every start, so a server that links a user's requests across
    /// restarts can intersect the sets sent under two keys and narrow an attribute the user
    /// keeps across prompts (their own gender).
    pub key: Option<Arc<ObfuscationKey>>,
}

impl std::fmt::Debug for ObfuscationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObfuscationOptions")
            .field("server_steps", &self.server_steps)
            .field("k_max", &self.k_max)
            .field("custom_lexicon", &self.lexicon.is_some())
            .field("accel", &self.accel)
            .field("device_unet", &self.device_unet.is_some())
            .field(
                "key",
                &self.key.as_ref().map_or("per-process", |_| "user's"),
            )
            .finish()
    }
}

/// Default K_max.
pub const DEFAULT_K_MAX: usize = 8;

/// What an `obfuscated` generation sent, for its caller (the real index is not in it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObfuscationReport {
    /// The sensitive spans found in the prompt.
    pub spans: Vec<Span>,
    /// K: candidate prompts sent (0 when k = 0: nothing leaves the phone).
    pub candidates: usize,
    /// Every combination of the detected values (before the K_max cut).
    pub combinations: usize,
    /// k: steps the server ran.
    pub server_steps: usize,
    /// T − k: steps this device ran.
    pub device_steps: usize,
    /// U-Net batch rows the server ran (summed over its steps).
    pub server_unet_rows: u64,
}
