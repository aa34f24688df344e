//! Prompt recovery from what a `ppidm` shard server receives, with no caption pool.
//!
//! Under `ppidm` every server receives the cross-attention keys and values of every transformer
//! block: `K = S·W_kᵀ` and `V = S·W_vᵀ`, where `S` [77, D] are the CLIP text states of the prompt
//! and `W_k`, `W_v` [C, D] are public, bias-free weights. Two steps give the prompt back:
//!
//! 1. [`text_states_from_kv`]: one least-squares solve `S·[W_kᵀ W_vᵀ] = [K V]` recovers `S`
//!    (exactly when `[W_kᵀ W_vᵀ]` has full row rank D: keys alone suffice where C ≥ D).
//! 2. [`invert_prompt`]: CLIP's causal mask makes the state at position `i` a function of tokens
//!    `0..=i` only, so the tokens are read off one at a time: for `i = 1, 2, …` every token of the
//!    vocabulary is appended to the prefix recovered so far (one batched text-encoder call per
//!    position) and the one whose state at `i` is nearest the target wins; the end-of-text token
//!    ends the prompt. No dictionary of captions is needed: any prompt the tokenizer can write is
//!    recoverable.
//!
//! [`word_accuracy`] and [`exact_match`] score a guess against the true prompt.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::Tensor;
use nalgebra::DMatrix;
use veil_core::client::pipeline::StableDiffusion;

use crate::attacker::{public_weight, AttackError, Result};
use crate::linalg::solve_rows;

/// Candidates per text-encoder call. The whole vocabulary of a small model (the tiny shapes
/// model: 814 tokens) is one call per position; SD's 49,408 tokens are split so a batch of
/// 77-token sequences stays within memory.
const CANDIDATES_PER_CALL: usize = 8192;

/// Solves `S · [W_kᵀ W_vᵀ] = [K V]` for the text states `S` of one prompt.
///
/// `attn2_layer` names a cross-attention, e.g. `"mid_block.attentions.0.transformer_blocks.0.attn2"`;
/// `k` (and `v` if given) are its keys (values) for one prompt, `[tokens × C]` row-major. Returns
/// `S` `[tokens × D]` row-major and the relative residual ‖S·A − B‖/‖B‖. The solution is exact
/// when the stacked weights have rank D (keys alone where C ≥ D; keys and values where 2C ≥ D);
/// otherwise it is the minimum-norm fit and the residual stays small while `S` is not recovered.
pub fn text_states_from_kv(
    sd: &StableDiffusion,
    attn2_layer: &str,
    k: &[f32],
    v: Option<&[f32]>,
    tokens: usize,
) -> Result<(Vec<f32>, f64)> {
    let mut blocks = vec![(public_weight(sd, &format!("{attn2_layer}.to_k.weight"))?, k)];
    if let Some(v) = v {
        let wv = public_weight(sd, &format!("{attn2_layer}.to_v.weight"))?;
        blocks.push((wv, v));
    }
    let d = blocks[0].0.ncols();
    let m: usize = blocks.iter().map(|(w, _)| w.nrows()).sum();
    // A = [W_kᵀ W_vᵀ] (D × m), B = [K V] (tokens × m).
    let mut a = DMatrix::<f64>::zeros(d, m);
    let mut b = DMatrix::<f64>::zeros(tokens, m);
    let mut at = 0;
    for (w, seen) in &blocks {
        let c = w.nrows();
        if w.ncols() != d {
            return Err(AttackError::Setup(format!(
                "{attn2_layer}: to_k and to_v disagree on the text width ({} vs {d})",
                w.ncols()
            )));
        }
        if seen.len() != tokens * c {
            return Err(AttackError::Setup(format!(
                "{attn2_layer}: {} values, expected {tokens}×{c}",
                seen.len()
            )));
        }
        for o in 0..c {
            for r in 0..d {
                a[(r, at + o)] = w[(o, r)];
            }
            for t in 0..tokens {
                b[(t, at + o)] = seen[t * c + o] as f64;
            }
        }
        at += c;
    }
    let (x, residual) = solve_rows(&a, &b)?;
    let states = (0..tokens)
        .flat_map(|t| (0..d).map(move |ch| (t, ch)))
        .map(|(t, ch)| x[(t, ch)] as f32)
        .collect();
    Ok((states, residual))
}

/// The tokenizer's vocabulary, id → token string, to decode recovered ids.
///
/// `ClipTokenizer` keeps its `tokenizers::Tokenizer` private and has no decode, so the strings
/// are read from the model folder: `tokenizer/tokenizer.json` (`model.vocab` and
/// `added_tokens`) or, for folders that ship only that, `tokenizer/vocab.json`.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    tokens: Vec<String>,
    special: HashSet<u32>,
}

#[derive(serde::Deserialize)]
struct TokenizerJson {
    model: TokenizerModel,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(serde::Deserialize)]
struct TokenizerModel {
    vocab: HashMap<String, u32>,
}

#[derive(serde::Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

impl Vocabulary {
    /// Reads the vocabulary of the model folder `root` (the folder `StableDiffusion::load`
    /// takes).
    pub fn load(root: &Path) -> Result<Self> {
        use veil_core::model::config::read_json;
        let dir = root.join("tokenizer");
        let json = dir.join("tokenizer.json");
        let (mut vocab, added) = if json.is_file() {
            let t: TokenizerJson = read_json(&json)?;
            (t.model.vocab, t.added_tokens)
        } else {
            (read_json(&dir.join("vocab.json"))?, Vec::new())
        };
        let mut special: HashSet<u32> = HashSet::new();
        for a in added {
            if a.special {
                special.insert(a.id);
            }
            vocab.insert(a.content, a.id);
        }
        for (s, &id) in &vocab {
            if s.starts_with("<|") && s.ends_with("|>") {
                special.insert(id);
            }
        }
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut tokens = vec![String::new(); n];
        for (s, id) in vocab {
            tokens[id as usize] = s;
        }
        Ok(Self { tokens, special })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token string of `id` (byte-level characters, `</w>` ending a word).
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Text of `ids` as CLIP's tokenizer decodes it: special tokens skipped, token strings
    /// joined, `</w>` → space, byte-level characters mapped back to bytes (invalid UTF-8
    /// replaced), trimmed.
    pub fn decode(&self, ids: &[u32]) -> String {
        let byte_of = unicode_to_byte();
        let joined: String = ids
            .iter()
            .filter(|id| !self.special.contains(id))
            .filter_map(|&id| self.token(id))
            .collect::<String>()
            .replace("</w>", " ");
        let bytes: Vec<u8> = joined
            .chars()
            .flat_map(|c| match byte_of.get(&c) {
                Some(&b) => vec![b],
                // Not a byte-level character (a plain space from `</w>`, or an unusual
                // vocabulary): keep it as UTF-8.
                None => c.to_string().into_bytes(),
            })
            .collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }
}

/// GPT-2's byte-level alphabet, inverted: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes for U+0100 onwards in byte order.
fn unicode_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    let mut map = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        let code = if printable(b) {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        if let Some(c) = char::from_u32(code) {
            map.insert(c, b);
        }
    }
    map
}

/// What [`invert_prompt`] recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct InvertedPrompt {
    /// Token ids from position 0: BOS, the recovered tokens, and EOS when one was found.
    pub ids: Vec<u32>,
    /// `ids` decoded (special tokens skipped).
    pub text: String,
    /// Per position of `ids`: ‖state of the recovered prefix − target‖ / ‖target‖.
    pub distances: Vec<f64>,
    /// Whether the end-of-text token was recovered (false: `tokens` positions ran out).
    pub ended: bool,
}

/// `(BOS, EOS)` as the tokenizer writes them: the empty prompt is BOS, EOS, padding.
fn special_ids(sd: &StableDiffusion) -> Result<(u32, u32)> {
    let empty = sd.tokenizer.encode("")?;
    match empty.as_slice() {
        [bos, eos, ..] => Ok((*bos, *eos)),
        _ => Err(AttackError::Setup(
            "tokenizer writes fewer than 2 ids".into(),
        )),
    }
}

/// Relative distances ‖state_pos(prefix + c) − target‖ / ‖target‖ for every candidate `c`,
/// batched `CANDIDATES_PER_CALL` at a time.
fn candidate_distances(
    sd: &StableDiffusion,
    prefix: &[u32],
    candidates: &[u32],
    target: &Tensor,
) -> Result<Vec<f64>> {
    let len = prefix.len() + 1;
    let norm = target
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?
        .sqrt()
        .max(1e-12) as f64;
    let mut out = Vec::with_capacity(candidates.len());
    for chunk in candidates.chunks(CANDIDATES_PER_CALL) {
        let ids: Vec<u32> = chunk
            .iter()
            .flat_map(|&c| prefix.iter().copied().chain(std::iter::once(c)))
            .collect();
        let ids = Tensor::from_vec(ids, (chunk.len(), len), &sd.device)?;
        let states = sd.text_encoder.forward(&ids)?;
        let last = states.narrow(1, len - 1, 1)?.squeeze(1)?;
        let d2 = last
            .broadcast_sub(target)?
            .sqr()?
            .sum(1)?
            .to_vec1::<f32>()?;
        out.extend(d2.into_iter().map(|d| (d.max(0.0) as f64).sqrt() / norm));
    }
    Ok(out)
}

/// Greedy token-by-token inversion of CLIP text states `states` (`[tokens × D]` row-major,
/// e.g. from [`text_states_from_kv`]) over the tokenizer's whole vocabulary.
///
/// Position 0 is BOS (its state is scored, not searched). For `i = 1 .. tokens` the token whose
/// prefix puts CLIP's state at `i` nearest `states[i]` is kept; recovering EOS ends the prompt.
/// BOS itself is never a candidate. `vocab` decodes the ids ([`Vocabulary::load`]).
pub fn invert_prompt(
    sd: &StableDiffusion,
    vocab: &Vocabulary,
    states: &[f32],
    tokens: usize,
) -> Result<InvertedPrompt> {
    let d = sd.text_encoder.config.hidden_size;
    if tokens == 0 || states.len() != tokens * d {
        return Err(AttackError::Setup(format!(
            "{} state values, expected {tokens}×{d} (tokens ≥ 1)",
            states.len()
        )));
    }
    let max_pos = sd.text_encoder.config.max_position_embeddings;
    if tokens > max_pos {
        return Err(AttackError::Setup(format!(
            "{tokens} positions exceed the text encoder's {max_pos}"
        )));
    }
    let (bos, eos) = special_ids(sd)?;
    let n_vocab = sd
        .tokenizer
        .vocab_size()
        .min(sd.text_encoder.config.vocab_size);
    let candidates: Vec<u32> = (0..n_vocab as u32).filter(|&c| c != bos).collect();
    let target = Tensor::from_slice(states, (tokens, d), &sd.device)?;

    let mut ids = vec![bos];
    let bos_state = sd
        .text_encoder
        .encode_ids(&ids, &sd.device)?
        .flatten_all()?;
    let mut distances = vec![relative_distance(&bos_state, &target.get(0)?)?];
    let mut ended = false;
    for i in 1..tokens {
        let dist = candidate_distances(sd, &ids, &candidates, &target.get(i)?)?;
        let Some((best, &best_d)) = dist.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1))
        else {
            return Err(AttackError::Setup("empty vocabulary".into()));
        };
        let token = candidates[best];
        ids.push(token);
        distances.push(best_d);
        if token == eos {
            ended = true;
            break;
        }
    }
    Ok(InvertedPrompt {
        text: vocab.decode(&ids),
        ids,
        distances,
        ended,
    })
}

/// ‖state − target‖ / ‖target‖ for one state (both `[D]`).
fn relative_distance(state: &Tensor, target: &Tensor) -> Result<f64> {
    let d2 = (state - target)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let n2 = target.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(d2.sqrt() / n2.sqrt().max(1e-12))
}

/// The words of a prompt as scored: `</w>` markers become spaces, the text is lowercased,
/// every character that is not alphanumeric (punctuation) separates words, empty words drop.
pub fn words(text: &str) -> Vec<String> {
    text.replace("</w>", " ")
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// `(matched, total)`: how many of the `total` words of `truth` the guess has at the same
/// position (word `i` of both, after [`words`]). A guess with a word inserted or dropped scores
/// only the words before the shift; extra words of the guess cost nothing but match nothing.
pub fn word_accuracy(truth: &str, guess: &str) -> (usize, usize) {
    let (t, g) = (words(truth), words(guess));
    let matched = t.iter().zip(&g).filter(|(a, b)| a == b).count();
    (matched, t.len())
}

/// Whether the guess is the true prompt word for word (after [`words`]).
pub fn exact_match(truth: &str, guess: &str) -> bool {
    words(truth) == words(guess)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_lowercased_and_stripped_of_punctuation_and_markers() {
        assert_eq!(
            words("A small, RED circle</w>at the top-left."),
            vec!["a", "small", "red", "circle", "at", "the", "top", "left"]
        );
    }

    #[test]
    fn word_accuracy_counts_words_at_the_same_position() {
        let truth = "a small red circle at the top left on a white background";
        assert_eq!(word_accuracy(truth, truth), (12, 12));
        assert_eq!(
            word_accuracy(
                truth,
                "a small blue circle at the top left on a white background"
            ),
            (11, 12)
        );
        // A dropped word shifts everything after it.
        assert_eq!(
            word_accuracy(truth, "a red circle at the top left on a white background").0,
            1
        );
        assert_eq!(word_accuracy(truth, ""), (0, 12));
        assert!(exact_match(
            truth,
            "A small red circle at the top left, on a white background."
        ));
        assert!(!exact_match(truth, "a small red circle"));
    }

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let map = unicode_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map.get(&'a'), Some(&b'a'));
        assert_eq!(map.get(&'Ġ'), Some(&b' '));
    }
}
