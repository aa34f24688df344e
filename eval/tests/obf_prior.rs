//! The slot-aware prior attacker against the `obfuscated` candidates of held-out shapes
//! captions (colours as the sensitive category, K = 8): on the partition with the colour
//! lexicon's slot rules it stays within 5 points of 1/K; on the former behaviour (every slot
//! over the whole category, the last block overlapping the one before) it is far above, so the
//! bound can fail.
//!
//! `cargo test -p veil-eval --test obf_prior -- --nocapture` prints the accuracies.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use veil_core::obfuscation::{candidates_with_key, masked, render, Lexicon, ObfuscationKey};
use veil_eval::obf_prior::{measure, PriorAttackReport, ServerView, SlotPrior};
use veil_eval::Dataset;

const K: usize = 8;
const PROMPTS: usize = 1000;
const TRAINING: u64 = 20_000;
const SEED: u64 = 15;

fn colours() -> Lexicon {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/lexicons/colours.toml");
    Lexicon::from_file(std::path::Path::new(path)).unwrap()
}

/// The colour lexicon without its slot rules: every slot over all ten colours.
fn without_rules(lex: &Lexicon) -> Lexicon {
    let mut bare = lex.clone();
    for c in &mut bare.categories {
        c.slots.clear();
        c.distinct = false;
    }
    bare
}

fn data() -> Dataset {
    Dataset::new(SEED, 8)
}

/// The device of the current partition: a key per user (one user per caption here, none
/// known to the attacker), candidates in shuffled order. The attacker cannot compute the
/// keyed choice, so its likelihood is flat.
fn partition(lex: &Lexicon) -> impl FnMut(&str) -> veil_core::Result<ServerView> + '_ {
    let mut rng = StdRng::seed_from_u64(SEED + 1);
    move |caption| {
        let key = ObfuscationKey::generate(&mut rng);
        let set = candidates_with_key(caption, &lex.detect(caption), lex, K, &key, &mut rng)?;
        Ok(ServerView {
            candidates: set.prompts,
            likelihood: Vec::new(),
        })
    }
}

/// The former block choice, as it was: a permutation of all combinations seeded by the
/// masked prompt (public), cut into blocks of K whose last one overlaps the one before.
fn legacy_block(masked: &str, total: usize, real: usize) -> Vec<usize> {
    if total <= K {
        return (0..total).collect();
    }
    let seed = masked.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let mut perm: Vec<usize> = (0..total).collect();
    perm.shuffle(&mut StdRng::seed_from_u64(seed));
    let pos = perm.iter().position(|&c| c == real).unwrap_or(0);
    let blocks = total.div_ceil(K);
    let block = (pos / K).min(blocks - 1);
    let start = if block == blocks - 1 {
        total - K
    } else {
        block * K
    };
    perm[start..start + K].to_vec()
}

/// The former device: every slot over its whole category, `legacy_block`. With
/// `aware`, the attacker also replays the block choice for each candidate (the algorithm and
/// the masked prompt are public) and keeps only those that would send this very set.
fn legacy(lex: &Lexicon, aware: bool) -> impl FnMut(&str) -> veil_core::Result<ServerView> + '_ {
    let mut rng = StdRng::seed_from_u64(SEED + 2);
    move |caption| {
        let spans = lex.detect(caption);
        let slots: Vec<Vec<String>> = spans.iter().map(|s| lex.values_of(&s.category)).collect();
        let total: usize = slots.iter().map(Vec::len).product();
        let combo = |mut idx: usize| -> Vec<String> {
            let mut c = vec![String::new(); slots.len()];
            for (k, s) in slots.iter().enumerate().rev() {
                c[k] = s[idx % s.len()].clone();
                idx /= s.len();
            }
            c
        };
        let real = spans.iter().zip(&slots).fold(0, |acc, (sp, s)| {
            acc * s.len() + s.iter().position(|v| *v == sp.value).unwrap_or(0)
        });
        let template = masked(caption, &spans);
        let mut sent = legacy_block(&template, total, real);
        sent.shuffle(&mut rng);
        let as_set: BTreeSet<usize> = sent.iter().copied().collect();
        let likelihood = if aware {
            sent.iter()
                .map(|&c| {
                    let again: BTreeSet<usize> =
                        legacy_block(&template, total, c).into_iter().collect();
                    if again == as_set {
                        1.0
                    } else {
                        1e-12
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(ServerView {
            candidates: sent
                .iter()
                .map(|&c| render(caption, &spans, &combo(c), lex))
                .collect(),
            likelihood,
        })
    }
}

fn run(
    name: &str,
    prior: &SlotPrior,
    send: &mut dyn FnMut(&str) -> veil_core::Result<ServerView>,
) -> PriorAttackReport {
    let r = measure(prior, &data(), PROMPTS, SEED, send).unwrap();
    assert_eq!(r.real_sent, 1.0, "{name}: the real caption is always sent");
    eprintln!(
        "{name}: accuracy {:.1}% over {} held-out captions, mean K {:.2}, 1/K {:.1}%",
        100.0 * r.accuracy,
        r.prompts,
        r.mean_k,
        100.0 * r.chance
    );
    r
}

#[test]
fn the_prior_attacker_stays_near_chance_on_the_partition_and_not_on_the_former_one() {
    let lex = colours();
    let bare = without_rules(&lex);
    // The attacker reads slots with the rules (it knows the domain) whatever the device used.
    let prior = SlotPrior::estimate(&lex, &data(), TRAINING);
    let bound = 1.0 / K as f64 + 0.05;

    let new = run("partition, slot rules", &prior, &mut partition(&lex));
    assert_eq!(new.prompts, PROMPTS);
    assert!(
        (new.mean_k - K as f64).abs() < 1e-9,
        "every request sends K"
    );
    assert!(
        new.accuracy <= bound,
        "the prior attacker guesses {:.1}% > 1/K + 5 points",
        100.0 * new.accuracy
    );

    // The same attacker where candidates ignore plausibility (the new partition without the
    // rules), and on the former behaviour, with and without replaying its block choice.
    let ignored = run("partition, rules ignored", &prior, &mut partition(&bare));
    let old = run("former, prior only", &prior, &mut legacy(&bare, false));
    let old_aware = run(
        "former, prior + block replay",
        &prior,
        &mut legacy(&bare, true),
    );
    for r in [ignored, old, old_aware] {
        assert!(
            r.accuracy > bound,
            "the attacker should beat the bound here: {r:?}"
        );
    }
    assert!(old_aware.accuracy >= old.accuracy);
}

#[test]
fn the_prior_knows_what_the_dataset_draws() {
    let lex = colours();
    let prior = SlotPrior::estimate(&lex, &data(), 4000);
    let plausible = prior.score("a small red circle at the top on a white background");
    for implausible in [
        "a small red circle at the top on a red background",
        "a small gray circle at the top on a white background",
        "a small white circle at the top on a white background",
    ] {
        assert!(
            prior.score(implausible) < plausible - 3.0,
            "{implausible}: {} vs {plausible}",
            prior.score(implausible)
        );
    }
}
