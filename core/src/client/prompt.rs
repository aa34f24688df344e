//! The prompt's encoding on the phone. SD1.x/2.x: one CLIP text encoder's last hidden states.
//! SDXL (`StableDiffusionXLPipeline`): two tokenizers (the second pads with `!`) and two
//! encoders; the text states are both encoders' penultimate hidden states side by side, and
//! the pooled text embedding is the second encoder's projected end-of-text state. An empty
//! negative prompt conditions with zeros where the model index says
//! `force_zeros_for_empty_prompt` (SDXL's default), as diffusers does when no negative prompt
//! is given.

use candle_core::{Device, Tensor};

use crate::model::clip::{ClipTextEncoder, ClipTokenizer};
use crate::model::config::{ClipTextConfig, ModelPaths};
use crate::vocab::error::{Error, Result};

/// SDXL's second tokenizer and text encoder, and its rule for empty negative prompts.
pub struct XlText {
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextEncoder,
    pub force_zeros_for_empty_prompt: bool,
}

impl XlText {
    /// The folder's second text side (`tokenizer_2/`, `text_encoder_2/`), if it has one.
    pub fn load(paths: &ModelPaths, device: &Device) -> Result<Option<Self>> {
        if !paths.has_second_text_encoder() {
            return Ok(None);
        }
        let dir = paths.component("text_encoder_2");
        let cfg: ClipTextConfig = crate::model::config::read_json(&dir.join("config.json"))?;
        let tokenizer_2 =
            ClipTokenizer::from_dir(&paths.component("tokenizer_2"), cfg.max_position_embeddings)?;
        let text_encoder_2 = ClipTextEncoder::load(&dir, device)?;
        let index = paths.model_index()?;
        Ok(Some(Self {
            tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
        }))
    }
}

/// One prompt, encoded: the text states [1, T, D] the U-Net's cross-attention reads, and under
/// SDXL the pooled text embedding [1, P] its added conditioning reads.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    pub states: Tensor,
    pub pooled: Option<Tensor>,
}

impl PromptEmbedding {
    /// The same shapes, all zeros (SDXL's empty negative prompt).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            states: self.states.zeros_like()?,
            pooled: self.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        })
    }
}

/// Encodes `prompt` with the first text side (`tokenizer`, `encoder`) and, for SDXL, `xl`.
pub fn encode(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextEncoder,
    xl: Option<&XlText>,
    prompt: &str,
    device: &Device,
) -> Result<PromptEmbedding> {
    let ids = tokenizer.encode(prompt)?;
    let Some(xl) = xl else {
        return Ok(PromptEmbedding {
            states: encoder.encode_ids(&ids, device)?,
            pooled: None,
        });
    };
    let first = encoder.encode_for_xl(&ids, tokenizer.eos(), device)?;
    let ids_2 = xl.tokenizer_2.encode(prompt)?;
    let second = xl
        .text_encoder_2
        .encode_for_xl(&ids_2, xl.tokenizer_2.eos(), device)?;
    if first.penultimate.dim(1)? != second.penultimate.dim(1)? {
        return Err(Error::InvalidArgument(format!(
            "the two text encoders give {} and {} tokens",
            first.penultimate.dim(1)?,
            second.penultimate.dim(1)?
        )));
    }
    Ok(PromptEmbedding {
        states: Tensor::cat(&[&first.penultimate, &second.penultimate], 2)?,
        pooled: Some(second.pooled),
    })
}

/// The negative prompt's encoding: zeros shaped like `cond` for an empty one where the model
/// forces zeros (SDXL), else its encoding.
pub fn encode_negative(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextEncoder,
    xl: Option<&XlText>,
    negative: &str,
    cond: &PromptEmbedding,
    device: &Device,
) -> Result<PromptEmbedding> {
    match xl {
        Some(x) if x.force_zeros_for_empty_prompt && negative.is_empty() => cond.zeros_like(),
        _ => encode(tokenizer, encoder, xl, negative, device),
    }
}
