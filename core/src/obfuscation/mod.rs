//! Sensitive-attribute obfuscation (ObCLIP): find the spans of a prompt that name a sensitive
//! attribute (gender, age, ethnicity out of the box; any category from a lexicon file), and
//! build the candidate prompts that differ only in those attributes, so a server that sees all
//! of them cannot tell which one is real.
//!
//! - `Lexicon`: categories → values → phrases, from the built-in TOML or user TOML/JSON files.
//!   A category may declare where its values are plausible: slot rules (`[[category.slot]]`,
//!   "a colour followed by `background` is one of black, white, gray") and `distinct = true`
//!   (two slots of the category in one prompt never name the same value).
//! - `Lexicon::detect`: the spans, case- and plural-insensitive, with numeric ages
//!   ("18-year-old", "aged 70", "in her 40s") mapped onto the age values' ranges.
//! - `candidates` / `candidates_with_key`: the plausible combinations of the detected slots'
//!   values, formatted identically; above `k_max`, exactly `k_max` of them chosen by the
//!   partition of `partition.rs` (its docs say why the real one stays hidden among them);
//!   order shuffled with a CSPRNG. The real index stays in `CandidateSet` on the device.

use serde::{Deserialize, Serialize};

use crate::vocab::error::{Error, Result};

mod partition;

pub use partition::{candidates, candidates_with_key, CandidateSet, ObfuscationKey};

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
    /// Where the values are plausible: the first rule whose context matches a span decides the
    /// values its slot ranges over; without rules every slot ranges over every value.
    #[serde(rename = "slot", alias = "slots", default)]
    pub slots: Vec<SlotRule>,
    /// Two slots of this category in one prompt never name the same value (two objects of one
    /// picture, an object and its background): candidates keep them distinct too.
    #[serde(default)]
    pub distinct: bool,
}

/// The plausible values of a slot in a context: a span of the category is this slot (this
/// role) when one of `followed_by` is among the `within` words after it, or one of
/// `preceded_by` among the `within` words before it; a rule with neither is the category's
/// default. Candidates for the slot range over `values` only, so each is a value a real user
/// could have written there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlotRule {
    pub role: String,
    #[serde(default)]
    pub followed_by: Vec<String>,
    #[serde(default)]
    pub preceded_by: Vec<String>,
    #[serde(default = "default_within")]
    pub within: usize,
    /// Canonical values of the category.
    pub values: Vec<String>,
}

fn default_within() -> usize {
    2
}

impl SlotRule {
    fn is_default(&self) -> bool {
        self.followed_by.is_empty() && self.preceded_by.is_empty()
    }

    /// Whether the rule's context words surround `span` in `ws` (the prompt's words).
    fn matches(&self, ws: &[Word], span: &Span) -> bool {
        let after = ws.iter().filter(|w| w.start >= span.end).take(self.within);
        let before: Vec<&Word> = ws.iter().filter(|w| w.end <= span.start).collect();
        let before = before.iter().rev().take(self.within);
        let hit = |w: &Word, list: &[String]| {
            list.iter()
                .any(|want| matches_word(&w.lower, &want.to_lowercase()).is_some())
        };
        after.into_iter().any(|w| hit(w, &self.followed_by))
            || before.into_iter().any(|w| hit(w, &self.preceded_by))
    }
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
            for r in &c.slots {
                if r.values.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "lexicon: slot `{}` of `{}` has no values",
                        r.role, c.name
                    )));
                }
                if let Some(v) = r
                    .values
                    .iter()
                    .find(|v| !c.values.iter().any(|x| &x.canonical == *v))
                {
                    return Err(Error::InvalidArgument(format!(
                        "lexicon: slot `{}` of `{}` names `{v}`, not a canonical value of it",
                        r.role, c.name
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
                Some(mine) => {
                    mine.values.extend(c.values);
                    mine.slots.extend(c.slots);
                    mine.distinct |= c.distinct;
                }
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

    /// The slot rule that decides `span`'s plausible values in `prompt`: the first rule of its
    /// category whose context words surround it, else the category's default rule; None when
    /// the category has neither (its slots range over all its values).
    pub fn rule_for(&self, prompt: &str, span: &Span) -> Option<&SlotRule> {
        let rules = || {
            self.categories
                .iter()
                .filter(|c| c.name == span.category)
                .flat_map(|c| &c.slots)
        };
        let ws = words(prompt);
        rules()
            .find(|r| !r.is_default() && r.matches(&ws, span))
            .or_else(|| rules().find(|r| r.is_default()))
    }

    /// The values `span` may take in `prompt` (its rule's, else its category's), in lexicon
    /// order, and the rule's role ("" without a rule).
    pub fn plausible_values(&self, prompt: &str, span: &Span) -> (String, Vec<String>) {
        match self.rule_for(prompt, span) {
            Some(r) => {
                let all = self.values_of(&span.category);
                let vals = all.into_iter().filter(|v| r.values.contains(v)).collect();
                (r.role.clone(), vals)
            }
            None => (String::new(), self.values_of(&span.category)),
        }
    }

    /// Whether slots of `category` in one prompt must name distinct values.
    pub fn is_distinct(&self, category: &str) -> bool {
        self.categories
            .iter()
            .any(|c| c.name == category && c.distinct)
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

/// `prompt` with each span's value replaced by `choice` (canonical text, in span order): the
/// span's number and first-letter case kept, an article right before it agreeing with it.
pub fn render(prompt: &str, spans: &[Span], choice: &[String], lex: &Lexicon) -> String {
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

#[cfg(test)]
mod tests;
