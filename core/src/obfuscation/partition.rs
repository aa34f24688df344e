//! Which candidates a request sends: the partition of the plausible combinations.
//!
//! **The server's view.** The server sees the K candidate texts of each request in a shuffled
//! order. It knows this algorithm, the lexicon (its values, rules and so every slot's plausible
//! values) and the public order below; it may link the requests of one user and a persistent
//! attribute (the user's own gender, used in many prompts of different templates). It does not
//! know the device's `ObfuscationKey`.
//!
//! **Slots.** Each detected span is a slot ranging over its plausible values
//! (`Lexicon::plausible_values`: the values of its slot rule, else of its category); the spans
//! of a `distinct` category together form one slot ranging over the tuples of pairwise
//! distinct values. Slot i has n_i values in a *public cyclic order*: sorted by SHA-256 of the
//! slot's id (its category and roles — never the template) and the value. If the n_1⋯n_m
//! combinations are at most `k_max`, all of them are sent. Otherwise K = `k_max` are sent:
//!
//! 1. **Block of each slot.** k_i is the largest divisor of K that is ≤ n_i; if the k_i
//!    multiply to less than K (possible only when every n_i < K), k_i = n_i instead. The block
//!    B_i is the k_i consecutive values of the cycle that start o_i places before the real
//!    value, o_i = PRF_key(slot id, k_i, real value) mod k_i. It depends on the key, the slot's
//!    category and roles, K and the real value of that slot only.
//! 2. **Pattern.** P0 is a public set of K distinct cells of the grid ∏[0, k_i) (depending only
//!    on the k_i and K) whose every column takes every symbol, as evenly as possible (exactly
//!    K/k_i times each when k_i divides K): `pattern`.
//! 3. **Translate.** The real combination is the cell u = (o_1, …, o_m). A cell p of P0 is
//!    picked by PRF_key(slot ids, real combination) mod K and the set sent is the translate
//!    P0 + (u − p) (each coordinate mod k_i), read through the blocks: cell c names the values
//!    B_i[c_i].
//!
//! **Exactly K distinct.** P0 has K distinct cells, a translate of the torus is a bijection and
//! each block names k_i distinct values, so the set has K distinct plausible combinations, the
//! real one among them; every combination count ≥ K gives blocks of exactly K (no short last
//! block, no wrap-around repeat).
//!
//! **The real one is uniform over its set.** Take a set S and two of its members s, s'. Every
//! draw (offsets o, picked cell p) that sends S for real s has a twin that sends S for real
//! s': o' = the cell of s' in the same blocks (so every block starts where it did), p' = p +
//! (o' − o), which lies in P0 because o' is in P0 + (o − p). The map is a bijection and every
//! draw has probability ∏(1/k_i) · 1/K to someone without the key, so P(S | s) = P(S | s'):
//! the server's posterior over S is its prior restricted to S — uniform where its prior is.
//! Slot rules make that prior flat in practice: every candidate is a combination a real user
//! could have written, not an implausible one (a red background) the server can rule out.
//!
//! **Why a secret key.** With a public rule the sets are the fibres of a function; blocks of
//! exactly K then exist only when K divides the combination count, and any overlap leaves
//! some set with fewer real values that produce it (the former last block: 4 of 8 with 36
//! combinations). Fresh randomness per request fails the other way: repeats of one prompt would
//! send different sets whose intersection is the real one. A persistent secret makes the choice
//! random to the server and the same at every repeat. `candidates` uses one key per process;
//! an app should keep one per user (`ObfuscationKey::to_bytes`) and call `candidates_with_key`.
//!
//! **A persistent attribute is not narrowed.** A slot's block depends on the key, the slot's id,
//! k_i (a function of n_i and K) and its own real value — not on the template or the other
//! slots — and every sent set shows the whole block in that slot. So across any number of
//! requests with any templates the values seen for the attribute never shrink below B_i
//! (below K values when n_i ≥ K). When k_i divides K every value of the block appears equally
//! often (K/k_i times), so the counts do not point at the real value across requests either.
//!
//! **Limits.** Keep `k_max` fixed (blocks depend on it) and the key persistent. When the k_i
//! cannot divide K (the fallback of step 1, e.g. two 3-valued slots with K = 8), counts differ
//! by one between values, a small bias that accumulates over many linked requests. Two
//! persistent attributes with a third slot varying: each alone is balanced, their pairs need
//! not be. The joint slot of a `distinct` category ties its spans' values together. A prior that
//! is not flat over plausible values still shows, in proportion (posterior ∝ prior).

use std::collections::BTreeSet;
use std::sync::OnceLock;

use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng};
use sha2::{Digest, Sha256};

use super::{render, Lexicon, Span};
use crate::vocab::error::{Error, Result};

/// Most values one slot may range over (a joint slot of a `distinct` category multiplies).
const MAX_SLOT_VALUES: usize = 1 << 20;

/// The device's secret for choosing blocks (module docs): the same key gives the same set for
/// the same real values, so keep it for as long as the user's requests can be linked.
#[derive(Clone, PartialEq, Eq)]
pub struct ObfuscationKey([u8; 32]);

impl std::fmt::Debug for ObfuscationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObfuscationKey(…)")
    }
}

impl ObfuscationKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A fresh key from a CSPRNG.
    pub fn generate<R: Rng + CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; 32];
        rng.fill(&mut b);
        Self(b)
    }

    /// This process's key, drawn once from the OS-seeded thread RNG.
    pub fn process() -> &'static Self {
        static KEY: OnceLock<ObfuscationKey> = OnceLock::new();
        KEY.get_or_init(|| Self::generate(&mut rand::rng()))
    }

    /// A keyed pseudo-random u64 of the length-prefixed `parts`.
    fn prf(&self, parts: &[&[u8]]) -> u64 {
        let mut outer = Sha256::new();
        outer.update(b"veil-obfuscation-prf-v1");
        outer.update(self.0);
        outer.update(digest(parts));
        let d = outer.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_le_bytes(b)
    }

    /// A keyed choice in [0, n) (n ≥ 1; the modulo bias is below n / 2⁶⁴).
    fn pick(&self, parts: &[&[u8]], n: usize) -> usize {
        (self.prf(parts) % n.max(1) as u64) as usize
    }
}

/// SHA-256 of length-prefixed parts (so no two part lists collide by concatenation).
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The candidate prompts of one request, in the order they are sent.
#[derive(Debug, Clone)]
pub struct CandidateSet {
    pub prompts: Vec<String>,
    /// Index of the real prompt in `prompts`: stays on the device.
    real: usize,
    /// All plausible combinations of the detected slots' values (before the `k_max` cut).
    pub combinations: usize,
}

impl CandidateSet {
    /// The real prompt's index (the device keeps its own latent with it).
    pub fn real_index(&self) -> usize {
        self.real
    }
}

/// One slot: the spans it fills and its plausible values (tuples over those spans).
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) spans: Vec<usize>,
    /// Category and roles: seeds the public order and the key's choices; never the template.
    pub(super) id: String,
    /// Plausible values, in the public cyclic order.
    pub(super) values: Vec<Vec<String>>,
    /// Position of the real value in `values`.
    pub(super) real: usize,
}

impl Slot {
    fn text(&self, pos: usize) -> String {
        self.values
            .get(pos)
            .map_or(String::new(), |v| v.join("\u{1f}"))
    }
}

/// Every tuple of `per_span` values (one list per span), pairwise distinct if `distinct`.
fn tuples(per_span: &[Vec<String>], distinct: bool) -> Result<Vec<Vec<String>>> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for vals in per_span {
        let mut next = Vec::new();
        for t in &out {
            for v in vals {
                if distinct && t.contains(v) {
                    continue;
                }
                let mut t2 = t.clone();
                t2.push(v.clone());
                next.push(t2);
            }
        }
        if next.len() > MAX_SLOT_VALUES {
            return Err(Error::InvalidArgument(
                "too many attribute combinations in one slot".into(),
            ));
        }
        out = next;
    }
    Ok(out)
}

/// The slots of `spans` in `prompt`, ordered by their first span.
pub(super) fn slots(prompt: &str, spans: &[Span], lex: &Lexicon) -> Result<Vec<Slot>> {
    // Groups of span indices: one per span, or one per `distinct` category.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        let joint = lex.is_distinct(&s.category).then(|| {
            groups
                .iter()
                .position(|g| g.first().is_some_and(|&j| spans[j].category == s.category))
        });
        match joint.flatten() {
            Some(g) => groups[g].push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
        .into_iter()
        .map(|g| slot(prompt, spans, lex, g))
        .collect()
}

fn slot(prompt: &str, spans: &[Span], lex: &Lexicon, group: Vec<usize>) -> Result<Slot> {
    let category = group.first().map_or("", |&i| spans[i].category.as_str());
    let mut roles = Vec::new();
    let mut per_span = Vec::new();
    for &i in &group {
        let (role, vals) = lex.plausible_values(prompt, &spans[i]);
        if !vals.contains(&spans[i].value) {
            return Err(Error::InvalidArgument(format!(
                "`{}` is not a plausible {category}{} in the lexicon, so no candidate could hide \
                 it: add it to the slot rule's values",
                spans[i].value,
                if role.is_empty() {
                    String::new()
                } else {
                    format!(" ({role})")
                }
            )));
        }
        roles.push(role);
        per_span.push(vals);
    }
    let id = format!("{category}/{}", roles.join(","));
    let mut values = tuples(&per_span, lex.is_distinct(category))?;
    values.sort_by_cached_key(|t| {
        let text = t.join("\u{1f}");
        digest(&[b"veil-obfuscation-order-v1", id.as_bytes(), text.as_bytes()])
    });
    let want: Vec<String> = group.iter().map(|&i| spans[i].value.clone()).collect();
    let real = values.iter().position(|t| *t == want).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "the {category} values {want:?} are not plausible together (the category is \
             `distinct`: its slots name different values)"
        ))
    })?;
    Ok(Slot {
        spans: group,
        id,
        values,
        real,
    })
}

/// The largest divisor of `k` that is at most `n` (≥ 1).
pub(super) fn largest_divisor_at_most(k: usize, n: usize) -> usize {
    (1..=n.min(k))
        .rev()
        .find(|&d| k.is_multiple_of(d))
        .unwrap_or(1)
}

/// Block sizes k_i for `ns` values per slot and K = `k` (needs ∏ ns > k): divisors of K when
/// they multiply to at least K, else the whole range of every slot.
pub(super) fn block_sizes(ns: &[usize], k: usize) -> Vec<usize> {
    let divisors: Vec<usize> = ns.iter().map(|&n| largest_divisor_at_most(k, n)).collect();
    let product = divisors.iter().fold(1usize, |a, &d| a.saturating_mul(d));
    if product >= k {
        divisors
    } else {
        ns.to_vec()
    }
}

/// P0: `k` distinct cells of ∏[0, ks_i) (needs ∏ ks ≥ k ≥ max ks), each column taking every
/// symbol ⌊k/ks_i⌋ or ⌈k/ks_i⌉ times. Column by column, rows sorted by their cells so far get
/// symbols round-robin: a group of s equal rows splits into groups of at most ⌈s/ks_i⌉, so
/// after the last column every group has ⌈k/∏ks⌉ = 1 row.
pub(super) fn pattern(ks: &[usize], k: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = vec![Vec::with_capacity(ks.len()); k];
    for &ki in ks {
        rows.sort();
        for (rho, row) in rows.iter_mut().enumerate() {
            row.push(rho % ki.max(1));
        }
    }
    rows
}

/// The chosen combinations (per candidate, the position of each slot's value), the real one
/// included: all of them up to `k`, else the keyed translate of the pattern (module docs).
pub(super) fn choose(slots: &[Slot], k: usize, key: &ObfuscationKey) -> Result<Vec<Vec<usize>>> {
    let ns: Vec<usize> = slots.iter().map(|s| s.values.len()).collect();
    let total = ns
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n.max(1)));
    if let Some(total) = total.filter(|&t| t <= k) {
        return Ok((0..total)
            .map(|mut idx| {
                let mut c = vec![0; ns.len()];
                for (i, &n) in ns.iter().enumerate().rev() {
                    c[i] = idx % n.max(1);
                    idx /= n.max(1);
                }
                c
            })
            .collect());
    }
    let ks = block_sizes(&ns, k);
    let kb = k.to_le_bytes();
    let offsets: Vec<usize> = slots
        .iter()
        .zip(&ks)
        .map(|(s, &ki)| {
            let text = s.text(s.real);
            let kib = ki.to_le_bytes();
            key.pick(
                &[b"offset", s.id.as_bytes(), &kb, &kib, text.as_bytes()],
                ki,
            )
        })
        .collect();
    let p0 = pattern(&ks, k);
    let mut parts: Vec<Vec<u8>> = vec![b"pattern".to_vec(), kb.to_vec()];
    for (s, ki) in slots.iter().zip(&ks) {
        parts.push(s.id.as_bytes().to_vec());
        parts.push(ki.to_le_bytes().to_vec());
        parts.push(s.text(s.real).into_bytes());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let picked = p0
        .get(key.pick(&refs, k))
        .ok_or_else(|| Error::InvalidArgument("empty candidate pattern".into()))?;
    Ok(p0
        .iter()
        .map(|cell| {
            (0..slots.len())
                .map(|i| {
                    let (n, ki, o) = (ns[i], ks[i], offsets[i]);
                    // The translate puts the picked cell on the real one's (o_i); the block
                    // starts o_i places before the real value.
                    let c = (cell[i] + ki - picked[i] + o) % ki;
                    (slots[i].real + n - o + c) % n
                })
                .collect()
        })
        .collect())
}

/// Builds the candidate set of `prompt` with its detected `spans`, with this process's key
/// (`ObfuscationKey::process`). At most `k_max` candidates (≥ 1); `rng` (a CSPRNG) only
/// shuffles the order.
pub fn candidates<R: Rng + CryptoRng>(
    prompt: &str,
    spans: &[Span],
    lex: &Lexicon,
    k_max: usize,
    rng: &mut R,
) -> Result<CandidateSet> {
    candidates_with_key(prompt, spans, lex, k_max, ObfuscationKey::process(), rng)
}

/// Builds the candidate set with the device's persistent `key` (module docs): exactly
/// min(`k_max`, plausible combinations) distinct candidates, the real one among them, the same
/// set at every repeat of the same real values; `rng` (a CSPRNG) only shuffles the order.
pub fn candidates_with_key<R: Rng + CryptoRng>(
    prompt: &str,
    spans: &[Span],
    lex: &Lexicon,
    k_max: usize,
    key: &ObfuscationKey,
    rng: &mut R,
) -> Result<CandidateSet> {
    if k_max == 0 {
        return Err(Error::InvalidArgument("k_max must be at least 1".into()));
    }
    let slots = slots(prompt, spans, lex)?;
    let combinations = slots
        .iter()
        .try_fold(1usize, |acc, s| acc.checked_mul(s.values.len().max(1)))
        .ok_or_else(|| Error::InvalidArgument("too many attribute combinations".into()))?;
    let mut order = choose(&slots, k_max, key)?;
    let real_cell: Vec<usize> = slots.iter().map(|s| s.real).collect();
    order.shuffle(rng);
    let real = order
        .iter()
        .position(|c| *c == real_cell)
        .ok_or_else(|| Error::InvalidArgument("real combination missing from its block".into()))?;
    let prompts: Vec<String> = order
        .iter()
        .map(|cell| {
            let mut choice = vec![String::new(); spans.len()];
            for (s, &pos) in slots.iter().zip(cell) {
                for (j, &span) in s.spans.iter().enumerate() {
                    if let Some(v) = s.values.get(pos).and_then(|t| t.get(j)) {
                        choice[span] = v.clone();
                    }
                }
            }
            render(prompt, spans, &choice, lex)
        })
        .collect();
    let unique: BTreeSet<&String> = prompts.iter().collect();
    if unique.len() != prompts.len() {
        return Err(Error::InvalidArgument(
            "two candidates render identically (a lexicon value repeats)".into(),
        ));
    }
    Ok(CandidateSet {
        prompts,
        real,
        combinations,
    })
}
