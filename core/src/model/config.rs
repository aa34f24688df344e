//! Component configs read from a diffusers-layout folder (`unet/config.json`,
//! `text_encoder/config.json`, `vae/config.json`, `model_index.json`). Field names and defaults
//! follow diffusers / transformers so a published `config.json` deserialises unchanged; options
//! we do not implement are rejected by `validate` with a message naming them.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::vocab::error::{Error, Result};

/// An integer given either once for all blocks or once per block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`; a list of the wrong length is a config error.
    pub fn get(&self, i: usize, n: usize, field: &str) -> Result<usize> {
        match self {
            PerBlock::One(v) => Ok(*v),
            PerBlock::Each(v) if v.len() == n => Ok(v[i]),
            PerBlock::Each(v) => Err(Error::InvalidArgument(format!(
                "`{field}` lists {} values for {n} blocks",
                v.len()
            ))),
        }
    }
}

fn default_true() -> bool {
    true
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_in_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: PerBlock,
    #[serde(default = "d_one_pb")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock,
    /// diffusers' `attention_head_dim` is really the number of heads unless this is given.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Ignored: attention always runs in f32 here. SDXL's config writes it as `null`.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// SDXL's `text_time` added conditioning: the width of each of the six size-and-crop ids'
    /// sinusoidal embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: the added embedding's input width (pooled text embedding + 6 × the ids' width).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// LCM-distilled U-Nets embed the guidance scale here (not implemented: rejected).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
}

fn d_in_channels() -> usize {
    4
}
fn d_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_one_pb() -> PerBlock {
    PerBlock::One(1)
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_cross_dim() -> PerBlock {
    PerBlock::One(1280)
}
fn d_head_dim() -> PerBlock {
    PerBlock::One(8)
}
fn d_shift() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}

impl UNetConfig {
    /// Rejects configs that use diffusers features this U-Net does not implement, naming them.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: String| Err(Error::Unsupported(format!("unet config: {what}")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return unsupported("empty block_out_channels".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::InvalidArgument(format!(
                "unet config: {} down blocks and {} up blocks for {} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            )));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported(format!("down block type `{t}`"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported(format!("up block type `{t}`"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return unsupported(format!("mid block type {other:?}")),
        }
        if self.act_fn != "silu" {
            return unsupported(format!("act_fn `{}`", self.act_fn));
        }
        if self.center_input_sample {
            return unsupported("center_input_sample".into());
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention".into());
        }
        if !matches!(self.only_cross_attention, serde_json::Value::Null)
            && self.only_cross_attention != serde_json::Value::Bool(false)
        {
            return unsupported("only_cross_attention".into());
        }
        if let Some(c) = &self.class_embed_type {
            return unsupported(format!("class_embed_type `{c}`"));
        }
        if self.num_class_embeds.is_some() {
            return unsupported("num_class_embeds".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                self.text_time()?;
            }
            Some(c) => return unsupported(format!("addition_embed_type `{c}`")),
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim (an LCM-distilled U-Net)".into());
        }
        if self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim".into());
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(format!(
                "resnet_time_scale_shift `{}`",
                self.resnet_time_scale_shift
            ));
        }
        if self.time_embedding_type != "positional" {
            return unsupported(format!(
                "time_embedding_type `{}`",
                self.time_embedding_type
            ));
        }
        if self.timestep_post_act.is_some() {
            return unsupported("timestep_post_act".into());
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return unsupported("even conv_in/conv_out kernel".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unet config: block {i} has {c} channels, not divisible by norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
            let heads = self.heads(i)?;
            if heads == 0 || c % heads != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unet config: block {i} has {c} channels, not divisible by {heads} heads"
                )));
            }
            self.cross_attention_dim.get(i, n, "cross_attention_dim")?;
            self.transformer_layers_per_block
                .get(i, n, "transformer_layers_per_block")?;
            self.layers_per_block.get(i, n, "layers_per_block")?;
        }
        Ok(())
    }

    /// SDXL's `text_time` added conditioning as (each id's embedding width, the added
    /// embedding's input width), when the config has it; a config that names it without both
    /// widths, or whose input width leaves no room for the pooled text embedding, is an error.
    pub fn text_time(&self) -> Result<Option<TextTime>> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(None);
        }
        let (Some(id_dim), Some(input_dim)) = (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) else {
            return Err(Error::InvalidArgument(
                "unet config: addition_embed_type `text_time` needs addition_time_embed_dim and \
                 projection_class_embeddings_input_dim"
                    .into(),
            ));
        };
        let ids = TextTime::IDS * id_dim;
        if input_dim <= ids || id_dim % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "unet config: projection_class_embeddings_input_dim {input_dim} leaves no room \
                 for a pooled text embedding beside {} ids of width {id_dim} (which must be even)",
                TextTime::IDS
            )));
        }
        Ok(Some(TextTime {
            id_dim,
            input_dim,
            pooled_dim: input_dim - ids,
        }))
    }

    /// Number of attention heads of block `i` (diffusers' naming quirk resolved here once).
    pub fn heads(&self, i: usize) -> Result<usize> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.get(i, n, "num_attention_heads"),
            None => self.attention_head_dim.get(i, n, "attention_head_dim"),
        }
    }

    /// Latent channels times spatial down-sampling factor of the U-Net: inputs must divide by it.
    pub fn spatial_multiple(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// SDXL's added conditioning (`addition_embed_type = "text_time"`): the pooled text embedding
/// and six ids (original height and width, crop top and left, target height and width), each
/// id embedded sinusoidally, concatenated, then projected by `add_embedding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTime {
    /// Width of each id's sinusoidal embedding (`addition_time_embed_dim`).
    pub id_dim: usize,
    /// The added embedding's input width (`projection_class_embeddings_input_dim`).
    pub input_dim: usize,
    /// The pooled text embedding's width: `input_dim − 6 × id_dim`.
    pub pooled_dim: usize,
}

impl TextTime {
    /// The number of size-and-crop ids.
    pub const IDS: usize = 6;
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

fn d_max_pos() -> usize {
    77
}
fn d_hidden_act() -> String {
    "quick_gelu".into()
}
fn d_ln_eps() -> f64 {
    1e-5
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default = "d_vae_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_in_channels")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn d_three() -> usize {
    3
}
fn d_vae_blocks() -> Vec<usize> {
    vec![64]
}
fn d_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Pixel size per latent cell.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Reads and parses one JSON config, with errors that name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            what: "config file".into(),
        },
        _ => Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The files of one diffusers-layout model folder.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub root: PathBuf,
}

impl ModelPaths {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(Error::MissingFile {
                path: root,
                what: "model folder (diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)".into(),
            });
        }
        Ok(Self { root })
    }
    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let c: UNetConfig = read_json(&self.root.join("unet/config.json"))?;
        c.validate()?;
        Ok(c)
    }
    pub fn vae_config(&self) -> Result<VaeConfig> {
        read_json(&self.root.join("vae/config.json"))
    }
    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        read_json(&self.root.join("text_encoder/config.json"))
    }
    /// `text_encoder_2/` (SDXL's second text encoder), when the folder has one.
    pub fn has_second_text_encoder(&self) -> bool {
        self.root.join("text_encoder_2/config.json").is_file()
    }
    /// `model_index.json`, or the defaults where a folder has none.
    pub fn model_index(&self) -> Result<ModelIndex> {
        let p = self.root.join("model_index.json");
        if !p.is_file() {
            return Ok(ModelIndex::default());
        }
        read_json(&p)
    }
}

/// The parts of `model_index.json` the pipeline reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// SDXL: an empty negative prompt conditions with zeros rather than the encoded "" (the
    /// pipeline's default is true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
}
