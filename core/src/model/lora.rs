//! LoRA adapters for the U-Net, merged into its weights at load:
//! W' = W + scale · (α / r) · up · down, where a convolution's `down` is a convolution with the
//! layer's own kernel (r output channels) and its `up` a 1×1 convolution, so the product is
//! taken over the flattened kernel. Two namings are read:
//! - diffusers / peft: `unet.<module>.lora_A.weight` (down) and `unet.<module>.lora_B.weight`
//!   (up), or the older `unet.<module>.lora.down.weight` / `lora.up.weight`; α from the header's
//!   `lora_adapter_metadata` (peft's LoraConfig as diffusers' `save_lora_weights` writes it:
//!   `unet.lora_alpha`, `unet.alpha_pattern` by module-path suffix, `unet.use_rslora`) or an
//!   `unet.<module>.alpha` tensor, or for a raw peft save (`base_model.model.` keys) the
//!   `adapter_config.json` beside it; else each module's own rank r, no rescaling (diffusers
//!   may rescale modules of a file without α whose ranks differ);
//! - kohya sd-scripts: `lora_unet_<module, '.' written '_'>.lora_down.weight`, `.lora_up.weight`
//!   and `.alpha`.
//!
//! `<module>` is a diffusers module path (`down_blocks.0.resnets.1.conv1`), which is also our
//! layer name (kohya files that use the original LDM names, `input_blocks_…`, as sd-scripts
//! writes for SDXL, are refused with the key named). Adapters for a text encoder (`text_encoder.`, `lora_te_`) are refused rather than
//! silently ignored: merging half an adapter would change the images without saying so.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::model::unet::UNet;
use crate::vocab::error::{Error, Result};

/// One adapted layer: `down` [r, in, (kh, kw)], `up` [out, r, (1, 1)], α, and whether the
/// scale is α/√r (rank-stabilised LoRA) rather than α/r.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
    pub rslora: bool,
}

impl LoraModule {
    /// The adapter's rank r.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// α / r, or α / √r for a rank-stabilised adapter: what `scale` multiplies.
    pub fn factor(&self) -> f64 {
        let r = self.rank() as f64;
        let alpha = self.alpha.unwrap_or(r);
        match self.rslora {
            true => alpha / r.sqrt(),
            false => alpha / r,
        }
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
        let down_ok = r > 0 && r.checked_mul(rest) == Some(self.down.elem_count());
        if !up_ok || !down_ok || out == 0 {
            return Err(Error::InvalidArgument(format!(
                "LoRA up {:?} · down {:?} does not make a weight of shape {weight:?}",
                self.up.dims(),
                self.down.dims()
            )));
        }
        let up = self.up.to_dtype(DType::F32)?.reshape((out, r))?;
        let down = self.down.to_dtype(DType::F32)?.reshape((r, rest))?;
        let factor = scale * self.factor();
        Ok((up.matmul(&down)? * factor)?.reshape(weight)?)
    }
}

/// A LoRA adapter for one U-Net, keyed by layer name.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub modules: BTreeMap<String, LoraModule>,
}

/// peft's LoraConfig from a diffusers file's header (`lora_adapter_metadata`, keys prefixed
/// `unet.`): the default α, α per module pattern, and rank-stabilised scaling.
#[derive(Debug, Default)]
struct PeftMetadata {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftMetadata {
    /// From the file's header (read alone: the tensors are not read twice), or for a raw peft
    /// save (`raw_peft`: `base_model.model.` keys) from the `adapter_config.json` beside it,
    /// without which α is unknown and the file is refused.
    fn read(path: &Path, raw_peft: bool) -> Result<Self> {
        let bad = |m: String| Error::InvalidArgument(format!("LoRA file {}: {m}", path.display()));
        let header = read_header(path)?;
        let json = header
            .get("__metadata__")
            .and_then(|m| m.get("lora_adapter_metadata"))
            .and_then(|j| j.as_str())
            .map(str::to_owned);
        let json = match (json, raw_peft) {
            (Some(j), _) => j,
            (None, false) => return Ok(Self::default()),
            (None, true) => {
                let cfg = path.with_file_name("adapter_config.json");
                std::fs::read_to_string(&cfg).map_err(|_| {
                    bad(format!(
                        "a raw peft adapter (`base_model.model.` keys) keeps its α in \
                         adapter_config.json, which is not at {}",
                        cfg.display()
                    ))
                })?
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| bad(format!("adapter metadata: {e}")))?;
        let get = |k: &str| v.get(format!("unet.{k}")).or_else(|| v.get(k));
        if get("use_dora").and_then(|d| d.as_bool()) == Some(true) {
            return Err(Error::Unsupported(format!(
                "LoRA file {} is a DoRA adapter",
                path.display()
            )));
        }
        let mut alpha_pattern: Vec<(String, f64)> = get("alpha_pattern")
            .and_then(|p| p.as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(k, a)| a.as_f64().map(|a| (k.clone(), a)))
                    .collect()
            })
            .unwrap_or_default();
        // The most specific (longest) pattern first.
        alpha_pattern.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        Ok(Self {
            lora_alpha: get("lora_alpha").and_then(|a| a.as_f64()),
            alpha_pattern,
            rslora: get("use_rslora").and_then(|a| a.as_bool()) == Some(true),
        })
    }

    /// α of `module`: the pattern naming it (the whole path, or a suffix after a dot), else
    /// the default.
    fn alpha(&self, module: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
    }
}

/// Most header bytes a LoRA file may declare (its JSON: names, shapes, metadata).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// A safetensors file's JSON header, read without its tensors.
fn read_header(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let bad = |m: String| Error::InvalidArgument(format!("LoRA file {}: {m}", path.display()));
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "a header of {n} bytes (at most {MAX_HEADER_BYTES})"
        )));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io)?;
    serde_json::from_slice(&buf).map_err(|e| bad(format!("header: {e}")))
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
        let raw_peft = tensors.keys().any(|k| k.starts_with("base_model.model."));
        let meta = PeftMetadata::read(path, raw_peft)?;
        let mut modules = BTreeMap::new();
        for (m, (down, up, alpha)) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(Error::InvalidArgument(format!(
                    "LoRA file {}: layer `{m}` lacks its up or down weight",
                    path.display()
                )));
            };
            let alpha = alpha.or_else(|| meta.alpha(&m));
            let rslora = meta.rslora;
            modules.insert(
                m,
                LoraModule {
                    down,
                    up,
                    alpha,
                    rslora,
                },
            );
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

    /// The modules of `layers` only (a shard server's part: what an operator needs, and all a
    /// server then learns of the adapter), or an error when none is left.
    pub fn part(&self, layers: &dyn Fn(&str) -> bool) -> Result<Self> {
        let modules: BTreeMap<String, LoraModule> = self
            .modules
            .iter()
            .filter(|(m, _)| layers(m))
            .map(|(m, v)| (m.clone(), v.clone()))
            .collect();
        if modules.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "LoRA file {}: no adapted layer in that part",
                self.path.display()
            )));
        }
        Ok(Self {
            path: self.path.clone(),
            modules,
        })
    }

    /// Writes the adapter in diffusers naming with an explicit α per module
    /// (`unet.<module>.alpha`, f64, read back by `load`; a rank-stabilised module's α/√r is
    /// written as the α that gives it over r).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (m, module) in &self.modules {
            let alpha = module.factor() * module.rank() as f64;
            out.insert(format!("unet.{m}.lora_A.weight"), module.down.clone());
            out.insert(format!("unet.{m}.lora_B.weight"), module.up.clone());
            out.insert(format!("unet.{m}.alpha"), Tensor::new(alpha, &Device::Cpu)?);
        }
        candle_core::safetensors::save(&out, path)?;
        Ok(())
    }

    /// SHA-256 of the adapter as applied to `layers` at `scale` (layer names, shapes, values
    /// as f32, each module's factor α/r as f32), so two parties merging the same adapter into
    /// the same layers agree on it whatever file naming each was given (`veil lora-split`'s
    /// output included); None when it adapts none of `layers`.
    pub fn digest(&self, layers: &dyn Fn(&str) -> bool, scale: f64) -> Result<Option<[u8; 32]>> {
        let mut h = Sha256::new();
        h.update(b"veil-lora/2");
        h.update(scale.to_le_bytes());
        let mut any = false;
        for (m, module) in self.modules.iter().filter(|(m, _)| layers(m)) {
            any = true;
            h.update(m.as_bytes());
            h.update((module.factor() as f32).to_le_bytes());
            for t in [&module.down, &module.up] {
                for d in t.dims() {
                    h.update((*d as u64).to_le_bytes());
                }
                for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                    h.update(x.to_le_bytes());
                }
            }
        }
        Ok(any.then(|| h.finalize().into()))
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
    if let Some(path) = s.strip_suffix(':') {
        return Err(Error::InvalidArgument(format!(
            "LoRA `{s}`: an empty scale after `:` (give FILE or FILE:SCALE, e.g. {path}:0.8)"
        )));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::UNetConfig;

    fn tiny_unet() -> UNet {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"block_out_channels":[8,16],"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
                "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":1,
                "attention_head_dim":2,"cross_attention_dim":8,"norm_num_groups":4,
                "in_channels":4,"out_channels":4}"#,
        )
        .expect("config");
        UNet::new(&cfg).expect("unet")
    }

    fn randn(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn save(tensors: &[(&str, Tensor)], tag: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "veil-lora-{tag}-{}.safetensors",
            std::process::id()
        ));
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).expect("save");
        path
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// The same adapter in both namings merges to the same weights, which equal W + scale ·
    /// (α/r) · up · down computed by hand; a conv adapter is taken over the flattened kernel.
    #[test]
    fn both_namings_merge_to_the_hand_computed_weights() {
        let unet = tiny_unet();
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let conv = "down_blocks.0.resnets.0.conv1";
        let (qd, qu) = (randn(&[2, 8], 1.0), randn(&[8, 2], 2.0));
        let (cd, cu) = (randn(&[2, 8, 3, 3], 3.0), randn(&[8, 2, 1, 1], 4.0));
        let alpha = Tensor::new(&[4f32], &Device::Cpu).expect("alpha");
        let diffusers = save(
            &[
                (&format!("unet.{q}.lora_A.weight"), qd.clone()),
                (&format!("unet.{q}.lora_B.weight"), qu.clone()),
                (&format!("unet.{q}.alpha"), alpha.clone()),
                (&format!("unet.{conv}.lora_A.weight"), cd.clone()),
                (&format!("unet.{conv}.lora_B.weight"), cu.clone()),
            ],
            "diffusers",
        );
        let k = |m: &str| format!("lora_unet_{}", m.replace('.', "_"));
        let kohya = save(
            &[
                (&format!("{}.lora_down.weight", k(q)), qd.clone()),
                (&format!("{}.lora_up.weight", k(q)), qu.clone()),
                (&format!("{}.alpha", k(q)), alpha.squeeze(0).expect("0-d")),
                (&format!("{}.lora_down.weight", k(conv)), cd.clone()),
                (&format!("{}.lora_up.weight", k(conv)), cu.clone()),
            ],
            "kohya",
        );
        let base: HashMap<String, Tensor> = [
            (format!("{q}.weight"), randn(&[8, 8], 5.0)),
            (format!("{conv}.weight"), randn(&[8, 8, 3, 3], 6.0)),
        ]
        .into_iter()
        .collect();
        let scale = 0.5;
        let mut merged = Vec::new();
        for p in [&diffusers, &kohya] {
            let a = LoraAdapter::load(p, &unet).expect("load");
            let mut w = base.clone();
            assert_eq!(a.merge_into(&mut w, scale).expect("merge"), 2);
            merged.push(w);
            let _ = std::fs::remove_file(p);
        }
        // to_q: α = 4, r = 2; conv1: no α (= r).
        let want_q = (&base[&format!("{q}.weight")]
            + (qu.matmul(&qd).expect("mm") * (scale * 4.0 / 2.0)).expect("s"))
        .expect("q");
        let conv_delta = cu
            .reshape((8, 2))
            .and_then(|u| u.matmul(&cd.reshape((2, 72))?))
            .and_then(|d| d.reshape((8, 8, 3, 3)))
            .expect("conv delta");
        let want_c =
            (&base[&format!("{conv}.weight")] + (conv_delta * scale).expect("s")).expect("conv");
        for w in &merged {
            assert!(max_abs(&w[&format!("{q}.weight")], &want_q) < 1e-6);
            assert!(max_abs(&w[&format!("{conv}.weight")], &want_c) < 1e-6);
        }
        // Only the layers a party holds are merged.
        let a = LoraAdapter::load(
            &save(
                &[
                    (&format!("unet.{q}.lora_A.weight"), qd.clone()),
                    (&format!("unet.{q}.lora_B.weight"), qu.clone()),
                ],
                "partial",
            ),
            &unet,
        )
        .expect("load");
        let mut only_conv: HashMap<String, Tensor> = [(
            format!("{conv}.weight"),
            base[&format!("{conv}.weight")].clone(),
        )]
        .into();
        assert_eq!(a.merge_into(&mut only_conv, 1.0).expect("merge"), 0);
    }

    #[test]
    fn bad_adapters_are_refused_with_the_key_named() {
        let unet = tiny_unet();
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let cases = [
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "text encoder",
            ),
            (
                "unet.down_blocks.9.resnets.0.conv1.lora_A.weight",
                "names no layer",
            ),
            (
                "model.diffusion_model.input_blocks.1.lora_A.weight",
                "neither",
            ),
        ];
        for (key, why) in cases {
            let p = save(&[(key, randn(&[2, 8], 1.0))], "bad");
            let e = LoraAdapter::load(&p, &unet).expect_err(key).to_string();
            assert!(e.contains(why), "{key}: {e}");
            let _ = std::fs::remove_file(p);
        }
        // Half a module.
        let p = save(
            &[(&format!("unet.{q}.lora_A.weight"), randn(&[2, 8], 1.0))],
            "half",
        );
        let e = LoraAdapter::load(&p, &unet).expect_err("half").to_string();
        assert!(e.contains("lacks its up or down"), "{e}");
        // A rank that does not make the weight's shape.
        let p = save(
            &[
                (&format!("unet.{q}.lora_A.weight"), randn(&[2, 7], 1.0)),
                (&format!("unet.{q}.lora_B.weight"), randn(&[8, 2], 1.0)),
            ],
            "shape",
        );
        let a = LoraAdapter::load(&p, &unet).expect("keys are fine");
        let mut w: HashMap<String, Tensor> = [(format!("{q}.weight"), randn(&[8, 8], 1.0))].into();
        assert!(a.merge_into(&mut w, 1.0).is_err());
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn lora_arguments_parse_with_and_without_scale() {
        assert_eq!(
            parse_lora_arg("a.safetensors").expect("p"),
            (PathBuf::from("a.safetensors"), 1.0)
        );
        assert_eq!(
            parse_lora_arg("x/a.safetensors:0.75").expect("p"),
            (PathBuf::from("x/a.safetensors"), 0.75)
        );
        assert!(parse_lora_arg("a.safetensors:inf").is_err());
        assert!(parse_lora_arg("a.safetensors:").is_err());
        let id = [7u8; 32];
        assert_eq!(adapted_identity(&id, &[]), id);
        assert_ne!(
            adapted_identity(&id, &[[1; 32]]),
            adapted_identity(&id, &[[2; 32]])
        );
    }
}
