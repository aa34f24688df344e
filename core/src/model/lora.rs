//! LoRA adapters for the U-Net, merged into its weights at load:
//! W' = W + scale · (α / r) · up · down, where a convolution's `down` is a convolution with the
//! layer's own kernel (r output channels) and its `up` a 1×1 convolution, so the product is
//! taken over the flattened kernel. Two namings are read:
//! - diffusers / peft: `unet.<module>.lora_A.weight` (down) and `unet.<module>.lora_B.weight`
//!   (up), or the older `unet.<module>.lora.down.weight` / `lora.up.weight`, with an optional
//!   `unet.<module>.alpha`; α defaults to r (no rescaling), as diffusers does without alphas;
//! - kohya sd-scripts: `lora_unet_<module, '.' written '_'>.lora_down.weight`, `.lora_up.weight`
//!   and `.alpha`.
//!
//! `<module>` is a diffusers module path (`down_blocks.0.resnets.1.conv1`), which is also our
//! layer name. Adapters for a text encoder (`text_encoder.`, `lora_te_`) are refused rather than
//! silently ignored: merging half an adapter would change the images without saying so.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::model::unet::UNet;
use crate::vocab::error::{Error, Result};

/// One adapted layer: `down` [r, in, (kh, kw)], `up` [out, r, (1, 1)], and α.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraModule {
    /// The adapter's rank r.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// scale · (α / r) · up · down, shaped like `weight` (`[out, in]` or `[out, in, kh, kw]`).
    pub fn delta(&self, weight: &[usize], scale: f64) -> Result<Tensor> {
        let r = self.rank();
        let (out, rest) = match weight.split_first() {
            Some((&o, rest)) => (o, rest.iter().product::<usize>()),
            None => (0, 0),
        };
        let up_ok = self.up.dims().len() >= 2
            && self.up.dims()[0] == out
            && self.up.dims()[1] == r
            && self.up.dims()[2..].iter().all(|&d| d == 1);
        let down_ok = r > 0 && self.down.elem_count() == r * rest;
        if !up_ok || !down_ok || out == 0 {
            return Err(Error::InvalidArgument(format!(
                "LoRA up {:?} · down {:?} does not make a weight of shape {weight:?}",
                self.up.dims(),
                self.down.dims()
            )));
        }
        let up = self.up.to_dtype(DType::F32)?.reshape((out, r))?;
        let down = self.down.to_dtype(DType::F32)?.reshape((r, rest))?;
        let factor = scale * self.alpha.unwrap_or(r as f64) / r as f64;
        Ok((up.matmul(&down)? * factor)?.reshape(weight)?)
    }
}

/// A LoRA adapter for one U-Net, keyed by layer name.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub modules: BTreeMap<String, LoraModule>,
}

/// A module's down and up weights and α as the keys are read.
type Halves = (Option<Tensor>, Option<Tensor>, Option<f64>);

/// Which part of a module a key holds.
#[derive(Clone, Copy)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a key into (module as written in the file, part), for the namings we read.
fn split_key(key: &str) -> Option<(&str, Part, bool)> {
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(m) = key.strip_suffix(suffix) {
            if let Some(m) = m.strip_prefix("lora_unet_") {
                return Some((m, part, true));
            }
            for prefix in ["unet.", "base_model.model."] {
                if let Some(m) = m.strip_prefix(prefix) {
                    return Some((m, part, false));
                }
            }
        }
    }
    None
}

fn is_text_encoder_key(key: &str) -> bool {
    [
        "text_encoder.",
        "text_encoder_2.",
        "lora_te_",
        "lora_te1_",
        "lora_te2_",
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

impl LoraAdapter {
    /// Reads a `.safetensors` adapter for `unet`, mapping every key to one of its layers; a key
    /// of another naming, of a text encoder, or for a layer this U-Net lacks is an error naming
    /// it, as is a module missing its up or down half.
    pub fn load(path: &Path, unet: &UNet) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::InvalidArgument(format!("LoRA file {}: {e}", path.display())))?;
        let weights: HashMap<String, usize> = unet
            .parameters()
            .into_iter()
            .filter_map(|(n, s)| n.strip_suffix(".weight").map(|m| (m.to_owned(), s.len())))
            .collect();
        let kohya: HashMap<String, &str> = weights
            .keys()
            .map(|m| (m.replace('.', "_"), m.as_str()))
            .collect();
        let mut parts: BTreeMap<String, Halves> = BTreeMap::new();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        for key in keys {
            let t = &tensors[key];
            if is_text_encoder_key(key) {
                return Err(Error::Unsupported(format!(
                    "LoRA file {} adapts a text encoder (`{key}`): only U-Net adapters are \
                     supported",
                    path.display()
                )));
            }
            let (written, part, is_kohya) = split_key(key).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "LoRA file {}: key `{key}` is neither diffusers/peft (`unet.<module>.lora_A\
                     .weight`) nor kohya (`lora_unet_<module>.lora_down.weight`) naming",
                    path.display()
                ))
            })?;
            let module = match is_kohya {
                true => kohya.get(written).map(|m| m.to_string()),
                false => weights.contains_key(written).then(|| written.to_owned()),
            }
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "LoRA file {}: `{key}` names no layer of this U-Net",
                    path.display()
                ))
            })?;
            let entry = parts.entry(module).or_default();
            match part {
                Part::Down => entry.0 = Some(t.clone()),
                Part::Up => entry.1 = Some(t.clone()),
                Part::Alpha => {
                    let a = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    match a.as_slice() {
                        [a] if a.is_finite() => entry.2 = Some(*a),
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "LoRA file {}: `{key}` is not one finite number",
                                path.display()
                            )))
                        }
                    }
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (m, (down, up, alpha)) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(Error::InvalidArgument(format!(
                    "LoRA file {}: layer `{m}` lacks its up or down weight",
                    path.display()
                )));
            };
            modules.insert(m, LoraModule { down, up, alpha });
        }
        if modules.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "LoRA file {} holds no adapter weights",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            modules,
        })
    }

    /// Merges the adapter at `scale` into those of `weights` it adapts (`<layer>.weight`),
    /// each merged weight in f32; layers absent from `weights` (another party runs them) are
    /// left alone. Returns how many weights changed.
    pub fn merge_into(&self, weights: &mut HashMap<String, Tensor>, scale: f64) -> Result<usize> {
        let mut merged = 0;
        for (m, module) in &self.modules {
            let name = format!("{m}.weight");
            let Some(w) = weights.get(&name) else {
                continue;
            };
            let delta = module.delta(w.dims(), scale)?.to_device(w.device())?;
            let w2 = (w.to_dtype(DType::F32)? + delta)?;
            weights.insert(name, w2);
            merged += 1;
        }
        Ok(merged)
    }

    /// SHA-256 of the adapter as applied to `layers` at `scale` (layer names, shapes, values
    /// as f32, α), so two parties merging the same adapter into the same layers agree on it
    /// whatever file naming each was given.
    pub fn digest(&self, layers: &dyn Fn(&str) -> bool, scale: f64) -> Result<[u8; 32]> {
        let mut h = Sha256::new();
        h.update(b"veil-lora/1");
        h.update(scale.to_le_bytes());
        for (m, module) in self.modules.iter().filter(|(m, _)| layers(m)) {
            h.update(m.as_bytes());
            h.update(module.alpha.unwrap_or(module.rank() as f64).to_le_bytes());
            for t in [&module.down, &module.up] {
                for d in t.dims() {
                    h.update((*d as u64).to_le_bytes());
                }
                for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                    h.update(x.to_le_bytes());
                }
            }
        }
        Ok(h.finalize().into())
    }
}

/// The identity of a model whose shard layers carry `adapters` (their digests over the shard
/// layers, in order): the base identity and each digest, hashed.
pub fn adapted_identity(base: &[u8; 32], digests: &[[u8; 32]]) -> [u8; 32] {
    if digests.is_empty() {
        return *base;
    }
    let mut h = Sha256::new();
    h.update(b"veil-adapted-model/1");
    h.update(base);
    for d in digests {
        h.update(d);
    }
    h.finalize().into()
}

/// `FILE` or `FILE:SCALE` (scale 1 by default), as the CLI and the server take an adapter.
pub fn parse_lora_arg(s: &str) -> Result<(PathBuf, f64)> {
    if let Some((path, scale)) = s.rsplit_once(':') {
        if let Ok(v) = scale.parse::<f64>() {
            if !v.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "LoRA scale `{scale}` is not a finite number"
                )));
            }
            return Ok((PathBuf::from(path), v));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}
