//! Sensitive-attribute obfuscation (ObCLIP): find the spans of a prompt that name a sensitive
//! attribute (gender, age, ethnicity out of the box; any category from a lexicon file), and
//! build the candidate prompts that differ only in those attributes, so a server that sees all
//! of them cannot tell which one is real.
//!
//! - `Lexicon`: categories → values → phrases, from the built-in TOML or user TOML/JSON files.
//! - `Lexicon::detect`: the spans, case- and plural-insensitive, with numeric ages
//!   ("18-year-old", "aged 70", "in her 40s") mapped onto the age values' ranges.
//! - `candidates`: every combination of the detected slots' values, formatted identically; above
//!   `k_max`, the block of a partition of the combinations that holds the real one, where the
//!   partition depends only on the prompt with its sensitive spans masked; order shuffled with a
//!   CSPRNG. The real index stays in `CandidateSet` on the device.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vocab::error::{Error, Result};

const BUILTIN: &str = include_str!("lexicon.toml");

/// One value of a category: the text candidates use for it and the phrases that detect it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LexValue {
    pub name: String,
    /// What every candidate prompt writes for this value (singular).
    pub canonical: String,
    /// The plural form, where the category distinguishes number ("women").
    #[serde(default)]
    pub plural: Option<String>,
    #[serde(default)]
    pub phrases: Vec<String>,
    /// Only when a person word follows within three words ("a black woman", not "a black cat").
    #[serde(default)]
    pub needs_person: bool,
    /// Numeric ages in [min_age, max_age] map to this value.
    #[serde(default)]
    pub min_age: Option<u32>,
    #[serde(default)]
    pub max_age: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Category {
    pub name: String,
    #[serde(rename = "value", alias = "values", default)]
    pub values: Vec<LexValue>,
}

/// Categories of sensitive attributes and how to find them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Lexicon {
    #[serde(default)]
    pub person_words: Vec<String>,
    #[serde(rename = "category", alias = "categories", default)]
    pub categories: Vec<Category>,
}

/// One detected sensitive span.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Span {
    pub category: String,
    /// The canonical value it names.
    pub value: String,
    /// The prompt's own text of the span.
    pub text: String,
    /// Byte offsets into the prompt, half-open.
    pub start: usize,
    pub end: usize,
    /// The span is plural ("women").
    #[serde(skip)]
    pub plural: bool,
}

/// A word of the prompt: lowercase text and byte range.
#[derive(Debug, Clone)]
struct Word {
    lower: String,
    start: usize,
    end: usize,
}

/// Words are runs of letters, digits, apostrophes and inner hyphens.
fn words(prompt: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let chars: Vec<(usize, char)> = prompt.char_indices().collect();
    for (i, &(at, c)) in chars.iter().enumerate() {
        let inner_hyphen = c == '-'
            && start.is_some()
            && chars.get(i + 1).is_some_and(|(_, n)| n.is_alphanumeric());
        let part = c.is_alphanumeric() || c == '\'' || inner_hyphen;
        match (part, start) {
            (true, None) => start = Some(at),
            (false, Some(s)) => {
                out.push(Word {
                    lower: prompt[s..at].to_lowercase(),
                    start: s,
                    end: at,
                });
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(Word {
            lower: prompt[s..].to_lowercase(),
            start: s,
            end: prompt.len(),
        });
    }
    out
}

/// A phrase as lowercase word tokens ("middle-aged" is one token, "middle aged" two).
fn tokens(phrase: &str) -> Vec<String> {
    words(phrase).into_iter().map(|w| w.lower).collect()
}

/// `word` equals `want`, or is its plural ("s"/"es"). Returns Some(plural?) on a match.
fn matches_word(word: &str, want: &str) -> Option<bool> {
    if word == want {
        return Some(false);
    }
    for suffix in ["s", "es"] {
        if word.strip_suffix(suffix) == Some(want) {
            return Some(true);
        }
    }
    None
}

/// Irregular plurals we know are plural although they do not end in s.
const IRREGULAR_PLURALS: [&str; 4] = ["men", "women", "gentlemen", "businessmen"];

impl Lexicon {
    /// The built-in lexicon: gender, age, ethnicity.
    pub fn builtin() -> Result<Self> {
        Self::from_toml(BUILTIN)
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let lex: Lexicon =
            toml::from_str(text).map_err(|e| Error::InvalidArgument(format!("lexicon: {e}")))?;
        lex.validate()?;
        Ok(lex)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let lex: Lexicon = serde_json::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("lexicon: {e}")))?;
        lex.validate()?;
        Ok(lex)
    }

    /// Reads a `.json` or `.toml` lexicon file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("lexicon {}: {e}", path.display())))?;
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        }
    }

    fn validate(&self) -> Result<()> {
        for c in &self.categories {
            if c.name.trim().is_empty() {
                return Err(Error::InvalidArgument(
                    "lexicon: a category has no name".into(),
                ));
            }
            if c.values.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "lexicon: category `{}` has no values",
                    c.name
                )));
            }
            for v in &c.values {
                if v.canonical.trim().is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "lexicon: value `{}` of `{}` has no canonical text",
                        v.name, c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Adds `other`'s categories: values of a category with the same name are appended, new
    /// categories are added, person words are merged.
    pub fn extend(&mut self, other: Lexicon) {
        for w in other.person_words {
            if !self.person_words.contains(&w) {
                self.person_words.push(w);
            }
        }
        for c in other.categories {
            match self.categories.iter_mut().find(|m| m.name == c.name) {
                Some(mine) => mine.values.extend(c.values),
                None => self.categories.push(c),
            }
        }
    }

    /// The distinct canonical values of a category, in lexicon order (what candidates range over).
    pub fn values_of(&self, category: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in self.categories.iter().filter(|c| c.name == category) {
            for v in &c.values {
                if !out.contains(&v.canonical) {
                    out.push(v.canonical.clone());
                }
            }
        }
        out
    }

    fn plural_of(&self, category: &str, canonical: &str) -> Option<String> {
        self.categories
            .iter()
            .filter(|c| c.name == category)
            .flat_map(|c| &c.values)
            .find(|v| v.canonical == canonical)
            .and_then(|v| v.plural.clone())
    }

    fn person_follows(&self, ws: &[Word], after: usize) -> bool {
        ws.iter()
            .skip(after)
            .take(3)
            .any(|w| self.person_words.iter().any(|p| p == &w.lower))
    }

    /// A numeric age starting at word `i`: (words used, age).
    fn numeric_age(ws: &[Word], i: usize) -> Option<(usize, u32)> {
        let w = |k: usize| ws.get(i + k).map(|w| w.lower.as_str());
        let first = w(0)?;
        // "25-year-old", "25-years-old", "25-yo"
        let parts: Vec<&str> = first.split('-').collect();
        if parts.len() >= 2 {
            if let Ok(n) = parts[0].parse::<u32>() {
                let rest = parts[1..].join("-");
                if ["year-old", "years-old", "yo", "yr-old", "yrs-old"].contains(&rest.as_str()) {
                    return Some((1, n));
                }
                // "25-year old"
                if ["year", "years"].contains(&rest.as_str()) && w(1) == Some("old") {
                    return Some((2, n));
                }
            }
        }
        // "25 year old", "25 years old", "25 yo"
        if let Ok(n) = first.parse::<u32>() {
            match (w(1), w(2)) {
                (Some("year-old" | "years-old" | "yo"), _) => return Some((2, n)),
                (Some("year" | "years"), Some("old")) => return Some((3, n)),
                _ => {}
            }
        }
        // "aged 70", "age 70"
        if matches!(first, "aged" | "age") {
            if let Some(n) = w(1).and_then(|s| s.parse::<u32>().ok()) {
                return Some((2, n));
            }
        }
        // "in her 40s", "in his 70s", "in their 20s"
        if first == "in" && matches!(w(1), Some("her" | "his" | "their" | "my" | "the")) {
            if let Some(n) = w(2)
                .and_then(|s| s.strip_suffix('s'))
                .and_then(|s| s.strip_suffix('\'').or(Some(s)))
                .and_then(|s| s.parse::<u32>().ok())
            {
                if n % 10 == 0 {
                    return Some((3, n + 5));
                }
            }
        }
        None
    }

    fn age_value(&self, age: u32) -> Option<(String, String)> {
        self.categories.iter().find_map(|c| {
            c.values
                .iter()
                .find(|v| matches!((v.min_age, v.max_age), (Some(lo), Some(hi)) if (lo..=hi).contains(&age)))
                .map(|v| (c.name.clone(), v.canonical.clone()))
        })
    }

    /// The sensitive spans of `prompt`, left to right, never overlapping (longest match wins).
    pub fn detect(&self, prompt: &str) -> Vec<Span> {
        let ws = words(prompt);
        // (category, value, phrase tokens, needs_person), longest phrases first.
        let mut phrases: Vec<(&str, &LexValue, Vec<String>)> = self
            .categories
            .iter()
            .flat_map(|c| {
                c.values.iter().flat_map(move |v| {
                    v.phrases
                        .iter()
                        .map(move |p| (c.name.as_str(), v, tokens(p)))
                })
            })
            .filter(|(_, _, t)| !t.is_empty())
            .collect();
        phrases.sort_by_key(|(_, _, t)| std::cmp::Reverse(t.len()));
        let mut spans = Vec::new();
        let mut i = 0;
        while i < ws.len() {
            if let Some((used, age)) = Self::numeric_age(&ws, i) {
                if let Some((category, value)) = self.age_value(age) {
                    let (start, end) = (ws[i].start, ws[i + used - 1].end);
                    spans.push(Span {
                        category,
                        value,
                        text: prompt[start..end].to_string(),
                        start,
                        end,
                        plural: false,
                    });
                    i += used;
                    continue;
                }
            }
            let mut found = None;
            for (category, value, toks) in &phrases {
                if i + toks.len() > ws.len() {
                    continue;
                }
                let head_ok = toks[..toks.len() - 1]
                    .iter()
                    .zip(&ws[i..])
                    .all(|(t, w)| &w.lower == t);
                let last = &ws[i + toks.len() - 1].lower;
                let Some(plural) = head_ok
                    .then(|| matches_word(last, &toks[toks.len() - 1]))
                    .flatten()
                else {
                    continue;
                };
                if value.needs_person && !self.person_follows(&ws, i + toks.len()) {
                    continue;
                }
                let plural = plural || IRREGULAR_PLURALS.contains(&last.as_str());
                found = Some((*category, *value, toks.len(), plural));
                break;
            }
            match found {
                Some((category, value, n, plural)) => {
                    let (start, end) = (ws[i].start, ws[i + n - 1].end);
                    spans.push(Span {
                        category: category.to_string(),
                        value: value.canonical.clone(),
                        text: prompt[start..end].to_string(),
                        start,
                        end,
                        plural,
                    });
                    i += n;
                }
                None => i += 1,
            }
        }
        spans
    }
}

/// The candidate prompts of one request, in the order they are sent.
#[derive(Debug, Clone)]
pub struct CandidateSet {
    pub prompts: Vec<String>,
    /// Index of the real prompt in `prompts`: stays on the device.
    real: usize,
    /// All combinations of the detected slots' values (before the `k_max` cut).
    pub combinations: usize,
}

impl CandidateSet {
    /// The real prompt's index (the device keeps its own latent with it).
    pub fn real_index(&self) -> usize {
        self.real
    }
}

/// The article ("a"/"an") right before byte `start`, if any: its byte range and whether it is
/// capitalised. It agrees with the attribute that follows, so it belongs to the slot, not the
/// template ("an old man" must not tell the server the age starts with a vowel).
fn article_before(prompt: &str, start: usize) -> Option<(usize, usize, bool)> {
    let before = &prompt[..start];
    let trimmed = before.trim_end_matches(' ');
    if trimmed.len() == before.len() {
        return None;
    }
    for art in ["an", "a"] {
        if trimmed.len() >= art.len() {
            let a0 = trimmed.len() - art.len();
            let word = &trimmed[a0..];
            let boundary = trimmed[..a0]
                .chars()
                .next_back()
                .is_none_or(|c| !c.is_alphanumeric());
            if boundary && word.eq_ignore_ascii_case(art) {
                let upper = word.starts_with('A');
                return Some((a0, trimmed.len(), upper));
            }
        }
    }
    None
}

/// Writes `prompt[at..span_start]`, with an article right before the span replaced by
/// `article(upper)`.
fn push_gap(
    out: &mut String,
    prompt: &str,
    at: usize,
    span_start: usize,
    article: &dyn Fn(bool) -> String,
) {
    match article_before(prompt, span_start).filter(|(a0, _, _)| *a0 >= at) {
        Some((a0, a1, upper)) => {
            out.push_str(&prompt[at..a0]);
            out.push_str(&article(upper));
            out.push_str(&prompt[a1..span_start]);
        }
        None => out.push_str(&prompt[at..span_start]),
    }
}

/// The prompt with every span replaced by `<category>` (and an article before it by `<a>`):
/// all a server may link requests by.
pub fn masked(prompt: &str, spans: &[Span]) -> String {
    let mut out = String::new();
    let mut at = 0;
    for s in spans {
        push_gap(&mut out, prompt, at, s.start, &|_| "<a>".to_string());
        out.push('<');
        out.push_str(&s.category);
        out.push('>');
        at = s.end;
    }
    out.push_str(&prompt[at..]);
    out
}

fn render(prompt: &str, spans: &[Span], choice: &[String], lex: &Lexicon) -> String {
    let mut out = String::new();
    let mut at = 0;
    for (s, v) in spans.iter().zip(choice) {
        let text = if s.plural {
            lex.plural_of(&s.category, v).unwrap_or_else(|| v.clone())
        } else {
            v.clone()
        };
        let vowel = text
            .chars()
            .next()
            .is_some_and(|c| "aeiouAEIOU".contains(c));
        push_gap(&mut out, prompt, at, s.start, &|upper| {
            match (vowel, upper) {
                (true, true) => "An",
                (true, false) => "an",
                (false, true) => "A",
                (false, false) => "a",
            }
            .to_string()
        });
        // Keep the prompt's capitalisation of the first letter.
        if s.text.chars().next().is_some_and(|c| c.is_uppercase()) {
            let mut cs = text.chars();
            if let Some(f) = cs.next() {
                out.extend(f.to_uppercase());
                out.push_str(cs.as_str());
            }
        } else {
            out.push_str(&text);
        }
        at = s.end;
    }
    out.push_str(&prompt[at..]);
    out
}

/// Builds the candidate set of `prompt` with its detected `spans`. At most `k_max` candidates
/// (≥ 1); `rng` (a CSPRNG) only shuffles the order.
pub fn candidates<R: Rng + CryptoRng>(
    prompt: &str,
    spans: &[Span],
    lex: &Lexicon,
    k_max: usize,
    rng: &mut R,
) -> Result<CandidateSet> {
    if k_max == 0 {
        return Err(Error::InvalidArgument("k_max must be at least 1".into()));
    }
    // Each span is a slot ranging over its category's values.
    let slots: Vec<Vec<String>> = spans.iter().map(|s| lex.values_of(&s.category)).collect();
    let real: Vec<usize> = spans
        .iter()
        .zip(&slots)
        .map(|(s, vals)| {
            vals.iter().position(|v| v == &s.value).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "value `{}` not in category `{}`",
                    s.value, s.category
                ))
            })
        })
        .collect::<Result<_>>()?;
    let total = slots
        .iter()
        .try_fold(1usize, |acc, s| acc.checked_mul(s.len().max(1)))
        .ok_or_else(|| Error::InvalidArgument("too many attribute combinations".into()))?;
    // Mixed-radix index of a combination (first slot most significant).
    let index_of = |combo: &[usize]| {
        combo
            .iter()
            .zip(&slots)
            .fold(0usize, |acc, (&c, s)| acc * s.len() + c)
    };
    let combo_of = |mut idx: usize| -> Vec<String> {
        let mut c = vec![String::new(); slots.len()];
        for (k, s) in slots.iter().enumerate().rev() {
            c[k] = s[idx % s.len()].clone();
            idx /= s.len();
        }
        c
    };
    let real_idx = index_of(&real);
    let chosen: Vec<usize> = if total <= k_max {
        (0..total).collect()
    } else {
        // A permutation of all combinations seeded by the masked prompt, cut into blocks of
        // k_max (the last block wraps around); send the block holding the real combination.
        // Prompts of one template with values in one block send the same set, and repeating
        // a request sends the same set again, so nothing narrows by intersection.
        let seed: [u8; 32] = Sha256::digest(masked(prompt, spans).as_bytes()).into();
        let mut perm: Vec<usize> = (0..total).collect();
        perm.shuffle(&mut rand::rngs::StdRng::from_seed(seed));
        let pos = perm.iter().position(|&c| c == real_idx).unwrap_or(0);
        let blocks = total.div_ceil(k_max);
        let block = (pos / k_max).min(blocks - 1);
        let start = if block == blocks - 1 {
            total - k_max
        } else {
            block * k_max
        };
        perm[start..start + k_max].to_vec()
    };
    let mut order: Vec<usize> = chosen.clone();
    order.shuffle(rng);
    let prompts: Vec<String> = order
        .iter()
        .map(|&c| render(prompt, spans, &combo_of(c), lex))
        .collect();
    let real = order
        .iter()
        .position(|&c| c == real_idx)
        .ok_or_else(|| Error::InvalidArgument("real combination missing from its block".into()))?;
    let unique: BTreeSet<&String> = prompts.iter().collect();
    if unique.len() != prompts.len() {
        return Err(Error::InvalidArgument(
            "two candidates render identically (a lexicon value repeats)".into(),
        ));
    }
    Ok(CandidateSet {
        prompts,
        real,
        combinations: total,
    })
}

#[cfg(test)]
mod tests;
