//! The CLIP text side: the tokenizer (from `tokenizer.json`, or built from `vocab.json` +
//! `merges.txt` as transformers' CLIP converter does: real SD1.5/SD2.1 folders ship only the
//! latter) and the `CLIPTextModel` encoder, configured by `text_encoder/config.json`. Both run
//! on the phone: the prompt never needs to leave it.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::model::stored::{embedding, layer_norm, linear, Embedding, Linear};
use tokenizers::Tokenizer;

use crate::model::config::{read_json, ClipTextConfig};
use crate::model::weights::WeightFile;
use crate::vocab::error::{Error, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// The CLIP tokenizer with SD's conventions: BOS, at most `max_len - 2` tokens, EOS, padding.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Reads `pad_token` from a tokenizer config (a string or `{"content": ...}`).
fn pad_token_of(dir: &Path) -> Option<String> {
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        let p = dir.join(f);
        if !p.is_file() {
            continue;
        }
        let v: serde_json::Value = read_json(&p).ok()?;
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Some(s.clone());
                }
            }
            _ => {}
        }
    }
    None
}

fn build_from_vocab_merges(dir: &Path) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for (p, what) in [(&vocab, "CLIP vocabulary"), (&merges, "CLIP BPE merges")] {
        if !p.is_file() {
            return Err(Error::MissingFile {
                path: p.to_path_buf(),
                what: format!("{what} (or tokenizer.json)"),
            });
        }
    }
    let path_str = |p: &Path| {
        p.to_str()
            .map(String::from)
            .ok_or_else(|| tok_err("non-UTF-8 path"))
    };
    let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?)
        .unk_token(EOS.into())
        .end_of_word_suffix("</w>".into())
        .build()
        .map_err(tok_err)?;
    let mut tok = Tokenizer::new(bpe);
    let normalizer = NormSeq::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tok_err)?,
        ),
        NormalizerWrapper::Lowercase(Lowercase),
    ]);
    tok.with_normalizer(Some(normalizer)).map_err(tok_err)?;
    let split = Split::new(
        SplitPattern::Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+".into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tok_err)?;
    let pre = PreSeq::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]);
    tok.with_pre_tokenizer(Some(pre));
    Ok(tok)
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` if present, else builds from `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(tok_err)?
        } else {
            build_from_vocab_merges(dir)?
        };
        Self::from_tokenizer(inner, pad_token_of(dir), max_len)
    }

    /// Builds from `vocab.json` + `merges.txt` even when `tokenizer.json` exists.
    pub fn from_vocab_merges(dir: &Path, max_len: usize) -> Result<Self> {
        Self::from_tokenizer(build_from_vocab_merges(dir)?, pad_token_of(dir), max_len)
    }

    fn from_tokenizer(mut inner: Tokenizer, pad: Option<String>, max_len: usize) -> Result<Self> {
        // transformers never splits a special token, the padding one included: with SDXL's
        // second tokenizer (and SD2.1's) padding with `!`, every `!` in a prompt is that token
        // on its own, not BPE's `!</w>` — "!!" is two of them.
        if let Some(p) = pad.as_deref().filter(|p| *p != BOS && *p != EOS) {
            inner
                .add_special_tokens([tokenizers::AddedToken::from(p.to_owned(), true)])
                .map_err(tok_err)?;
        }
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| tok_err(format!("vocabulary lacks {t}")))
        };
        let bos = id(BOS)?;
        let eos = id(EOS)?;
        let pad = match pad {
            Some(p) => id(&p)?,
            None => eos,
        };
        if max_len < 2 {
            return Err(tok_err("max length below 2"));
        }
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    /// Token ids as the SD pipeline feeds them: truncated (as diffusers does, no error) and
    /// Token positions per prompt (77 for CLIP).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// padded to `max_len`. An empty prompt is valid (BOS, EOS, padding).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(prompt, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend(enc.get_ids().iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// The end-of-text token's id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln1: LayerNorm,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What SDXL reads of a text encoder: the penultimate layer's hidden states, and the pooled
/// embedding (the final LayerNorm's output at the end-of-text token), projected where the
/// encoder is a `CLIPTextModelWithProjection`.
pub struct TextEncoding {
    /// [B, T, D]: the hidden states after the second-to-last layer (no final LayerNorm).
    pub penultimate: Tensor,
    /// [B, P]: `text_projection` of the pooled state, or the pooled state [B, D] itself.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModel` (last hidden state after the final LayerNorm), or
/// `CLIPTextModelWithProjection` when the checkpoint has a `text_projection`.
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection.weight` (no bias): SDXL's second encoder projects its pooled state.
    text_projection: Option<Linear>,
    heads: usize,
    act: Activation,
    pub config: ClipTextConfig,
}

impl ClipTextEncoder {
    /// Builds from a `VarBuilder`; accepts checkpoints with or without the `text_model.` prefix.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let act = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            o => return Err(Error::Unsupported(format!("text encoder hidden_act `{o}`"))),
        };
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(Error::InvalidArgument(
                "text encoder: hidden_size not divisible by heads".into(),
            ));
        }
        let text_projection = match (
            config.projection_dim,
            vb.contains_tensor("text_projection.weight"),
        ) {
            (Some(p), true) => Some(crate::model::stored::linear_no_bias(
                config.hidden_size,
                p,
                vb.pp("text_projection"),
            )?),
            _ => None,
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            || !vb.contains_tensor("embeddings.token_embedding.weight")
        {
            vb.pp("text_model")
        } else {
            vb
        };
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        let e = vb.pp("embeddings");
        let token_embedding = embedding(config.vocab_size, d, e.pp("token_embedding"))?;
        let position_embedding = embedding(
            config.max_position_embeddings,
            d,
            e.pp("position_embedding"),
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(EncoderLayer {
                q: linear(d, d, a.pp("q_proj"))?,
                k: linear(d, d, a.pp("k_proj"))?,
                v: linear(d, d, a.pp("v_proj"))?,
                out: linear(d, d, a.pp("out_proj"))?,
                ln1: layer_norm(d, eps, l.pp("layer_norm1"))?,
                ln2: layer_norm(d, eps, l.pp("layer_norm2"))?,
                fc1: linear(d, config.intermediate_size, l.pp("mlp.fc1"))?,
                fc2: linear(config.intermediate_size, d, l.pp("mlp.fc2"))?,
            });
        }
        let final_layer_norm = layer_norm(d, eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            heads: config.num_attention_heads,
            act,
            config: config.clone(),
        })
    }

    /// Loads `text_encoder/` of a model folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: ClipTextConfig = read_json(&dir.join("config.json"))?;
        let file = Arc::new(WeightFile::open_component(dir, "model")?);
        let stored = file.storage_dtype();
        let (vb, slot) = file.var_builder(stored, device);
        Self::new(vb, &config).map_err(|e| match e {
            Error::Tensor(t) => slot.resolve(t),
            other => other,
        })
    }

    /// Hidden states [B, T, D] for token ids [B, T].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (last, _) = self.run(ids, self.layers.len())?;
        Ok(self.final_layer_norm.forward(&last)?.contiguous()?)
    }

    /// SDXL's reading of the encoder for token ids [1, T] (`TextEncoding`). The pooled state is
    /// taken at the first end-of-text token `eos`, or, for configs whose `eos_token_id` is the
    /// legacy 2, at the highest id, as transformers does.
    pub fn encode_for_xl(&self, ids: &[u32], eos: u32, device: &Device) -> Result<TextEncoding> {
        let n = self.layers.len();
        if n < 2 {
            return Err(Error::Unsupported(
                "a text encoder with fewer than 2 layers has no penultimate layer".into(),
            ));
        }
        let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device)?;
        let (last, penultimate) = self.run(&t, n)?;
        let last = self.final_layer_norm.forward(&last)?;
        let at = match self.config.eos_token_id {
            Some(2) => ids
                .iter()
                .enumerate()
                .max_by_key(|&(i, &id)| (id, std::cmp::Reverse(i)))
                .map(|(i, _)| i),
            _ => ids.iter().position(|&id| id == eos),
        }
        .ok_or_else(|| Error::Tokenizer("the token ids carry no end-of-text token".into()))?;
        let pooled = last.narrow(1, at, 1)?.squeeze(1)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(TextEncoding {
            penultimate: penultimate.ok_or_else(|| {
                Error::Unsupported("the text encoder kept no penultimate layer".into())
            })?,
            pooled,
        })
    }

    /// The hidden states after `layers` layers, and those one layer before (when `layers ≥ 1`).
    fn run(&self, ids: &Tensor, layers: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "{t} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let positions = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let d = self.config.hidden_size;
        let hd = d / self.heads;
        let scale = (hd as f64).powf(-0.5);
        // Causal mask: token i attends to tokens ≤ i.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), ids.device())?;
        let heads = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let mut before_last = None;
        for (i, l) in self.layers.iter().take(layers).enumerate() {
            if i + 1 == layers {
                before_last = Some(x.clone());
            }
            let r = x.clone();
            let h = l.ln1.forward(&x)?;
            let q = heads((l.q.forward(&h)? * scale)?)?;
            let k = heads(l.k.forward(&h)?)?;
            let v = heads(l.v.forward(&h)?)?;
            let s = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
            x = (r + l.out.forward(&o)?)?;
            let r = x.clone();
            let h = l.fc1.forward(&l.ln2.forward(&x)?)?;
            let h = match self.act {
                Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                Activation::Gelu => h.gelu_erf()?,
            };
            x = (r + l.fc2.forward(&h)?)?;
        }
        Ok((x, before_last.map(|p| p.contiguous()).transpose()?))
    }

    /// Encodes token ids given as a slice (one prompt) to [1, T, D].
    pub fn encode_ids(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device)?;
        self.forward(&t)
    }
}
