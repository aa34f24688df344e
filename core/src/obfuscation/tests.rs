//! Detection over a table of prompts (known misses written down), and the candidate set's
//! privacy properties.

use std::collections::{BTreeMap, BTreeSet};

use super::partition::{block_sizes, choose, largest_divisor_at_most, pattern, slots};
use super::*;

fn lex() -> Lexicon {
    Lexicon::builtin().unwrap()
}

const AGES: [&str; 3] = ["young", "middle-aged", "old"];
const ETHNICITIES: [&str; 6] = [
    "Asian",
    "Black",
    "White",
    "Hispanic",
    "Middle Eastern",
    "South Asian",
];

/// (prompt, expected spans as (category, value, text)).
#[allow(clippy::type_complexity)]
const TABLE: &[(&str, &[(&str, &str, &str)])] = &[
    ("a portrait of a woman", &[("gender", "woman", "woman")]),
    ("A Man reading", &[("gender", "man", "Man")]),
    ("two WOMEN talking", &[("gender", "woman", "WOMEN")]),
    (
        "three girls and two boys",
        &[("gender", "woman", "girls"), ("gender", "man", "boys")],
    ),
    (
        "an elderly man",
        &[("age", "old", "elderly"), ("gender", "man", "man")],
    ),
    (
        "a 25-year-old woman",
        &[
            ("age", "young", "25-year-old"),
            ("gender", "woman", "woman"),
        ],
    ),
    (
        "a 47 year old man",
        &[
            ("age", "middle-aged", "47 year old"),
            ("gender", "man", "man"),
        ],
    ),
    (
        "a man aged 70 smiling",
        &[("gender", "man", "man"), ("age", "old", "aged 70")],
    ),
    (
        "a woman in her 40s",
        &[
            ("gender", "woman", "woman"),
            ("age", "middle-aged", "in her 40s"),
        ],
    ),
    ("an 18-year-old", &[("age", "young", "18-year-old")]),
    ("a 36-yo doctor", &[("age", "middle-aged", "36-yo")]),
    ("a 60-year-old", &[("age", "old", "60-year-old")]),
    (
        "a middle-aged Asian woman",
        &[
            ("age", "middle-aged", "middle-aged"),
            ("ethnicity", "Asian", "Asian"),
            ("gender", "woman", "woman"),
        ],
    ),
    (
        "a middle aged man",
        &[
            ("age", "middle-aged", "middle aged"),
            ("gender", "man", "man"),
        ],
    ),
    (
        "a young Black man",
        &[
            ("age", "young", "young"),
            ("ethnicity", "Black", "Black"),
            ("gender", "man", "man"),
        ],
    ),
    ("a black cat on a white sofa", &[]),
    (
        "a white woman and an African American man",
        &[
            ("ethnicity", "White", "white"),
            ("gender", "woman", "woman"),
            ("ethnicity", "Black", "African American"),
            ("gender", "man", "man"),
        ],
    ),
    ("Latina nurses", &[("ethnicity", "Hispanic", "Latina")]),
    (
        "a Middle Eastern family",
        &[("ethnicity", "Middle Eastern", "Middle Eastern")],
    ),
    (
        "an Indian grandmother",
        &[
            ("ethnicity", "South Asian", "Indian"),
            ("gender", "woman", "grandmother"),
        ],
    ),
    ("a red circle on the left", &[]),
];

/// Known misses of the built-in lexicon, kept here so they stay visible: each prompt names a
/// sensitive attribute the detector does not find (or finds wrongly).
const KNOWN_MISSES: &[(&str, &str)] = &[
    (
        "she is reading a book",
        "pronouns are not resolved (gender)",
    ),
    (
        "a person of colour",
        "descriptions outside the phrase list (ethnicity)",
    ),
    (
        "a retiree on a bench",
        "age implied by a role word, not listed",
    ),
    (
        "an old house",
        "'old' of a thing is taken as an age (false positive)",
    ),
    (
        "a nonbinary person",
        "genders beyond the two values are not a category value",
    ),
];

#[test]
fn detection_table() {
    let lex = lex();
    for (prompt, want) in TABLE {
        let got: Vec<(String, String, String)> = lex
            .detect(prompt)
            .into_iter()
            .map(|s| {
                assert_eq!(&prompt[s.start..s.end], s.text, "offsets of {prompt:?}");
                (s.category, s.value, s.text)
            })
            .collect();
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(c, v, t)| (c.to_string(), v.to_string(), t.to_string()))
            .collect();
        assert_eq!(got, want, "{prompt:?}");
    }
}

#[test]
fn known_misses_are_still_misses() {
    // If one of these starts working, move it to the table above.
    let lex = lex();
    for (prompt, why) in KNOWN_MISSES {
        let spans = lex.detect(prompt);
        let right = match *prompt {
            "an old house" => spans.is_empty(),
            _ => !spans.is_empty(),
        };
        assert!(
            !right,
            "{prompt:?} ({why}) is detected correctly now: {spans:?}"
        );
    }
}

fn multiset(v: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in v {
        *m.entry(s.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn prompts_differing_only_in_a_value_send_the_same_multiset() {
    let lex = lex();
    let mut rng = rand::rng();
    let a = "a young woman reading";
    // The article agrees with the attribute, so it is part of the slot, not the template.
    let b = "an old man reading";
    let c = "a 70-year-old woman reading";
    let sets: Vec<CandidateSet> = [a, b, c]
        .iter()
        .map(|p| candidates(p, &lex.detect(p), &lex, 16, &mut rng).unwrap())
        .collect();
    // age (3) × gender (2) = 6 ≤ 16: every combination, canonically formatted.
    assert_eq!(sets[0].prompts.len(), 6);
    assert_eq!(multiset(&sets[0].prompts), multiset(&sets[1].prompts));
    assert_eq!(multiset(&sets[0].prompts), multiset(&sets[2].prompts));
    for (p, s) in [a, b, c].iter().zip(&sets) {
        let real = &s.prompts[s.real_index()];
        assert!(real.contains("reading"));
        let spans = lex.detect(p);
        for sp in &spans {
            assert!(real.contains(&sp.value), "{real} lacks {}", sp.value);
        }
    }
    assert!(sets[0]
        .prompts
        .contains(&"a young woman reading".to_string()));
    assert!(sets[0]
        .prompts
        .contains(&"a middle-aged man reading".to_string()));
}

#[test]
fn above_k_max_repeated_requests_send_the_same_set_and_it_holds_the_real_one() {
    let lex = lex();
    let mut rng = rand::rng();
    // age 3 × ethnicity 6 × gender 2 = 36 combinations, 8 sent.
    let p = "a young Asian woman in a park";
    let spans = lex.detect(p);
    let first = candidates(p, &spans, &lex, 8, &mut rng).unwrap();
    assert_eq!(first.combinations, 36);
    assert_eq!(first.prompts.len(), 8);
    for _ in 0..20 {
        let again = candidates(p, &spans, &lex, 8, &mut rng).unwrap();
        assert_eq!(multiset(&again.prompts), multiset(&first.prompts));
        assert_eq!(
            again.prompts[again.real_index()],
            "a young Asian woman in a park"
        );
    }
    // Every real value of the template: 8 distinct candidates, the real one among them.
    for age in AGES {
        for eth in ETHNICITIES {
            for g in ["woman", "man"] {
                let article = if age == "old" { "an" } else { "a" };
                let q = format!("{article} {age} {eth} {g} in a park");
                let s = candidates(&q, &lex.detect(&q), &lex, 8, &mut rng).unwrap();
                assert_eq!(s.prompts[s.real_index()], q);
                assert_eq!(multiset(&s.prompts).len(), 8, "{q}: {:?}", s.prompts);
            }
        }
    }
}

#[test]
fn order_is_shuffled_and_real_index_varies() {
    let lex = lex();
    let mut rng = rand::rng();
    let p = "an old man";
    let spans = lex.detect(p);
    let mut positions = BTreeSet::new();
    for _ in 0..64 {
        positions.insert(
            candidates(p, &spans, &lex, 16, &mut rng)
                .unwrap()
                .real_index(),
        );
    }
    assert!(positions.len() > 3, "real index took only {positions:?}");
}

#[test]
fn a_prompt_without_attributes_is_its_only_candidate() {
    let lex = lex();
    let p = "a red circle on the left";
    let s = candidates(p, &lex.detect(p), &lex, 8, &mut rand::rng()).unwrap();
    assert_eq!(s.prompts, vec![p.to_string()]);
    assert_eq!(s.real_index(), 0);
    assert!(candidates(p, &[], &lex, 0, &mut rand::rng()).is_err());
}

#[test]
fn lexicons_extend_from_toml_and_json() {
    let mut lex = lex();
    lex.extend(
        Lexicon::from_toml(
            r#"
[[category]]
name = "colour"
[[category.value]]
name = "red"
canonical = "red"
phrases = ["red", "crimson"]
[[category.value]]
name = "blue"
canonical = "blue"
phrases = ["blue"]
"#,
        )
        .unwrap(),
    );
    lex.extend(
        Lexicon::from_json(
            r#"{"categories": [{"name": "condition", "values": [
                {"name": "diabetes", "canonical": "diabetic", "phrases": ["diabetic"]},
                {"name": "asthma", "canonical": "asthmatic", "phrases": ["asthmatic"]}]}]}"#,
        )
        .unwrap(),
    );
    let p = "a crimson circle held by a diabetic woman";
    let spans = lex.detect(p);
    let cats: Vec<&str> = spans.iter().map(|s| s.category.as_str()).collect();
    assert_eq!(cats, ["colour", "condition", "gender"]);
    let s = candidates(p, &spans, &lex, 64, &mut rand::rng()).unwrap();
    assert_eq!(s.prompts.len(), 8);
    assert_eq!(
        s.prompts[s.real_index()],
        "a red circle held by a diabetic woman"
    );
    assert!(
        Lexicon::from_toml("[[category]]\nname = \"x\"\n").is_err(),
        "a category needs values"
    );
    assert!(Lexicon::from_json("{").is_err());
}

#[test]
fn masking_hides_values_only() {
    let lex = lex();
    let p = "a 25-year-old woman";
    assert_eq!(masked(p, &lex.detect(p)), "<a> <age> <gender>");
    let q = "An elderly man";
    assert_eq!(masked(q, &lex.detect(q)), "<a> <age> <gender>");
    let s = candidates(q, &lex.detect(q), &lex, 16, &mut rand::rng()).unwrap();
    assert!(
        s.prompts.contains(&"A young man".to_string()),
        "{:?}",
        s.prompts
    );
    assert!(
        s.prompts.contains(&"An old woman".to_string()),
        "{:?}",
        s.prompts
    );
}

// ---- The partition (partition.rs): exact blocks, a uniform real one, persistent slots. ----

/// A lexicon of `sizes.len()` categories `c0, c1, …`, category `ci` with values `ci_v0, …`.
fn synthetic(sizes: &[usize]) -> Lexicon {
    let mut toml = String::new();
    for (c, &n) in sizes.iter().enumerate() {
        toml.push_str(&format!("[[category]]\nname = \"c{c}\"\n"));
        for v in 0..n {
            toml.push_str(&format!(
                "[[category.value]]\nname = \"c{c}_v{v}\"\ncanonical = \"c{c}_v{v}\"\nphrases = [\"c{c}_v{v}\"]\n"
            ));
        }
    }
    Lexicon::from_toml(&toml).unwrap()
}

/// The prompt naming value `real[i]` of category `ci`, in a template `tail`.
fn synthetic_prompt(real: &[usize], tail: &str) -> String {
    let names: Vec<String> = real
        .iter()
        .enumerate()
        .map(|(c, v)| format!("c{c}_v{v}"))
        .collect();
    format!("{} {tail}", names.join(" and "))
}

/// Every real value of every combination of `sizes`, odometer order.
fn all_reals(sizes: &[usize]) -> Vec<Vec<usize>> {
    let total: usize = sizes.iter().product();
    (0..total)
        .map(|mut i| {
            let mut r = vec![0; sizes.len()];
            for (c, &n) in sizes.iter().enumerate().rev() {
                r[c] = i % n;
                i /= n;
            }
            r
        })
        .collect()
}

fn key(i: u64) -> ObfuscationKey {
    use rand::SeedableRng;
    ObfuscationKey::generate(&mut rand::rngs::StdRng::seed_from_u64(i))
}

#[test]
fn every_block_holds_exactly_k_distinct_candidates_for_every_count() {
    let mut rng = rand::rng();
    let mut shapes: Vec<Vec<usize>> = (1..=28).map(|n| vec![n]).collect();
    for a in [2, 3, 4, 5, 7] {
        for b in [2, 3, 5, 6] {
            shapes.push(vec![a, b]);
        }
    }
    shapes.extend([vec![3, 3, 2], vec![2, 3, 6], vec![3, 3, 3, 2]]);
    for sizes in &shapes {
        let lex = synthetic(sizes);
        let total: usize = sizes.iter().product();
        for k in 1..=9 {
            let want = total.min(k);
            for real in all_reals(sizes) {
                let p = synthetic_prompt(&real, "in a room");
                let s =
                    candidates_with_key(p.as_str(), &lex.detect(&p), &lex, k, &key(7), &mut rng)
                        .unwrap();
                assert_eq!(s.combinations, total);
                assert_eq!(s.prompts.len(), want, "{sizes:?} K={k} {p}");
                assert_eq!(
                    multiset(&s.prompts).len(),
                    want,
                    "{sizes:?} K={k}: a repeat"
                );
                assert_eq!(s.prompts[s.real_index()], p);
            }
        }
    }
}

#[test]
fn the_pattern_has_k_distinct_cells_and_balanced_columns() {
    for ks in [
        vec![2, 2, 4],
        vec![3, 3],
        vec![8],
        vec![2, 3, 6],
        vec![4, 4, 4],
        vec![5, 7],
    ] {
        let grid: usize = ks.iter().product();
        for k in ks.iter().copied().max().unwrap_or(1)..=grid.min(24) {
            let p0 = pattern(&ks, k);
            assert_eq!(p0.len(), k);
            assert_eq!(p0.iter().collect::<BTreeSet<_>>().len(), k, "{ks:?} K={k}");
            for (i, &ki) in ks.iter().enumerate() {
                let mut counts = vec![0usize; ki];
                for cell in &p0 {
                    counts[cell[i]] += 1;
                }
                let (lo, hi) = (counts.iter().min(), counts.iter().max());
                assert_eq!(lo, Some(&(k / ki)), "{ks:?} K={k} column {i}: {counts:?}");
                assert_eq!(
                    hi,
                    Some(&k.div_ceil(ki)),
                    "{ks:?} K={k} column {i}: {counts:?}"
                );
            }
        }
    }
    // Divisors of K where they reach K; every slot's whole range where they cannot.
    assert_eq!(block_sizes(&[3, 6, 2], 8), [2, 4, 2]);
    assert_eq!(block_sizes(&[184], 8), [8]);
    assert_eq!(block_sizes(&[3, 3], 8), [3, 3]);
    assert_eq!(block_sizes(&[3, 6], 16), [3, 6]);
    assert_eq!(block_sizes(&[3, 6, 2], 6), [3, 6, 2]);
}

/// Draws `keys` keys for every real value of `sizes` (K = `k`) and returns, per sent set, how
/// often each of its members was the real one.
fn sent_sets(
    sizes: &[usize],
    k: usize,
    keys: u64,
) -> BTreeMap<Vec<Vec<usize>>, BTreeMap<Vec<usize>, usize>> {
    let lex = synthetic(sizes);
    let mut seen: BTreeMap<Vec<Vec<usize>>, BTreeMap<Vec<usize>, usize>> = BTreeMap::new();
    for real in all_reals(sizes) {
        let p = synthetic_prompt(&real, "here");
        let sl = slots(&p, &lex.detect(&p), &lex).unwrap();
        let real_cell: Vec<usize> = sl.iter().map(|s| s.real).collect();
        for i in 0..keys {
            let mut set = choose(&sl, k, &key(i)).unwrap();
            set.sort();
            assert!(set.contains(&real_cell));
            *seen
                .entry(set)
                .or_default()
                .entry(real_cell.clone())
                .or_default() += 1;
        }
    }
    seen
}

#[test]
fn the_real_value_is_uniform_over_its_set() {
    // Single slots (10 values, K = 4: 10 is no multiple of 4; 7 values, K = 3) and two slots
    // (3 × 5, K = 4). For every set the server can see, each member was the real one equally
    // often over random keys: a chi-square per set, pooled.
    for (sizes, k, keys) in [
        (vec![10], 4, 1200),
        (vec![7], 3, 1200),
        (vec![3, 5], 4, 2000),
    ] {
        let seen = sent_sets(&sizes, k, keys);
        let (mut chi2, mut dof) = (0.0, 0usize);
        for (set, by_real) in &seen {
            let n: usize = by_real.values().sum();
            let mean = n as f64 / set.len() as f64;
            for member in set {
                let c = by_real.get(member).copied().unwrap_or(0) as f64;
                chi2 += (c - mean).powi(2) / mean;
            }
            dof += set.len() - 1;
        }
        let ratio = chi2 / dof as f64;
        assert!(
            ratio < 2.0,
            "{sizes:?} K={k}: chi-square/dof {ratio:.2} over {} sets",
            seen.len()
        );
    }
}

#[test]
fn the_real_value_takes_every_place_of_its_block() {
    // One slot of 10 values, K = 4: over random keys the real value sits at each of the 4
    // places of its block (in the public order) about equally often.
    let lex = synthetic(&[10]);
    let p = synthetic_prompt(&[3], "here");
    let sl = slots(&p, &lex.detect(&p), &lex).unwrap();
    let n = sl[0].values.len();
    let mut places = [0usize; 4];
    for i in 0..4000 {
        let set = choose(&sl, 4, &key(i)).unwrap();
        let pos: BTreeSet<usize> = set.iter().map(|c| c[0]).collect();
        // The block is 4 cyclically consecutive positions; the real one's place in it.
        let start = (0..n)
            .find(|&s| (0..4).all(|j| pos.contains(&((s + j) % n))))
            .unwrap();
        places[(sl[0].real + n - start) % n] += 1;
    }
    for c in places {
        assert!((850..1150).contains(&c), "{places:?}");
    }
}

/// The ethnicity values a set of candidate prompts shows.
fn ethnicities(prompts: &[String]) -> BTreeSet<String> {
    let lex = lex();
    prompts
        .iter()
        .flat_map(|p| lex.detect(p))
        .filter(|s| s.category == "ethnicity")
        .map(|s| s.value)
        .collect()
}

#[test]
fn a_persistent_attribute_keeps_its_block_across_templates() {
    // The user is an Asian woman; her prompts vary in template, in the other attributes and
    // in which attributes they name. The ethnicities the server sees never narrow: the same
    // block every time, so the intersection over all requests is that block.
    let lex = lex();
    let tails = [
        "in a park",
        "at the beach",
        "reading a book",
        "on a bus",
        "cooking",
    ];
    let mut rng = rand::rng();
    for k in [4, 8] {
        let mut inter: Option<BTreeSet<String>> = None;
        let mut single: Vec<BTreeSet<String>> = Vec::new();
        for (t, tail) in tails.iter().enumerate() {
            for age in AGES {
                let article = if age == "old" { "an" } else { "a" };
                for p in [
                    format!("{article} {age} Asian woman {tail}"),
                    format!("a photo of an Asian woman {tail}"),
                    format!("an Asian doctor {tail}, {article} {age} one"),
                    format!("Asian women {tail} with {article} {age} man number {t}"),
                ] {
                    let set = candidates(&p, &lex.detect(&p), &lex, k, &mut rng).unwrap();
                    assert_eq!(
                        lex.detect(&set.prompts[set.real_index()]).len(),
                        lex.detect(&p).len()
                    );
                    let e = ethnicities(&set.prompts);
                    assert!(e.contains("Asian"), "{p}: {e:?}");
                    inter = Some(match inter {
                        None => e,
                        Some(i) => i.intersection(&e).cloned().collect(),
                    });
                }
                // A template naming only the ethnicity: exactly its block, never narrower.
                let q = format!("an Asian person {tail}");
                let set = candidates(&q, &lex.detect(&q), &lex, k, &mut rng).unwrap();
                single.push(ethnicities(&set.prompts));
            }
        }
        let block = largest_divisor_at_most(k, 6);
        let inter = inter.unwrap_or_default();
        assert_eq!(inter.len(), block, "K={k}: {inter:?}");
        // Single-slot templates: the same K values (6 ≥ K) or all 6 (6 < K) every time.
        assert!(single.iter().all(|s| *s == single[0]), "{single:?}");
        assert_eq!(single[0].len(), k.min(6));
        assert!(inter.is_subset(&single[0]));
    }
}

#[test]
fn each_value_of_a_block_appears_equally_often() {
    // K = 8 over age × ethnicity × gender: blocks of 2 ages, 4 ethnicities, 2 genders, each
    // value 4, 2 and 4 times, so counting does not point at the real one.
    let lex = lex();
    let mut rng = rand::rng();
    for p in [
        "a young Asian woman",
        "an old Black man",
        "a middle-aged White woman",
    ] {
        let set = candidates(p, &lex.detect(p), &lex, 8, &mut rng).unwrap();
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for c in &set.prompts {
            for s in lex.detect(c) {
                *counts.entry((s.category, s.value)).or_default() += 1;
            }
        }
        for ((cat, v), n) in &counts {
            let want = match cat.as_str() {
                "ethnicity" => 2,
                _ => 4,
            };
            assert_eq!(*n, want, "{p}: {cat} {v} in {:?}", set.prompts);
        }
    }
}

#[test]
fn same_real_values_send_the_same_set_whatever_the_template() {
    let lex = lex();
    let k = key(3);
    let mut rng = rand::rng();
    let mut values = |p: &str| -> BTreeSet<Vec<String>> {
        let s = candidates_with_key(p, &lex.detect(p), &lex, 4, &k, &mut rng).unwrap();
        s.prompts
            .iter()
            .map(|c| lex.detect(c).into_iter().map(|s| s.value).collect())
            .collect()
    };
    let a = values("a young Hispanic woman in a park");
    for p in [
        "a young Hispanic woman cooking",
        "portrait of a young Hispanic woman, studio light",
    ] {
        assert_eq!(values(p), a, "{p}");
    }
    // Another key: another block (the choice is the key's, not the template's).
    let other = candidates_with_key(
        "a young Hispanic woman in a park",
        &lex.detect("a young Hispanic woman in a park"),
        &lex,
        4,
        &key(4),
        &mut rand::rng(),
    )
    .unwrap();
    assert_eq!(other.prompts.len(), 4);
}

fn colours() -> Lexicon {
    Lexicon::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../eval/lexicons/colours.toml"
    )))
    .unwrap()
}

#[test]
fn slot_rules_keep_every_candidate_plausible() {
    let lex = colours();
    let mut rng = rand::rng();
    let object = [
        "red", "green", "blue", "yellow", "purple", "orange", "cyan", "black", "white",
    ];
    for (p, combos) in [
        ("a small red circle at the top left on a white background", 25),
        ("a large white diamond on the left on a black background", 25),
        ("a small red circle at the top and a large blue square on the right on a gray background", 184),
    ] {
        let set = candidates(p, &lex.detect(p), &lex, 8, &mut rng).unwrap();
        assert_eq!(set.combinations, combos, "{p}");
        assert_eq!(multiset(&set.prompts).len(), 8);
        assert_eq!(set.prompts[set.real_index()], p);
        for c in &set.prompts {
            let spans = lex.detect(c);
            let (bg, objects) = spans.split_last().unwrap();
            let roles: Vec<String> = spans
                .iter()
                .map(|s| lex.rule_for(c, s).map(|r| r.role.clone()).unwrap_or_default())
                .collect();
            assert_eq!(roles.last().map(String::as_str), Some("background"), "{c}");
            assert!(["white", "black", "gray"].contains(&bg.value.as_str()), "{c}");
            let mut seen = BTreeSet::from([bg.value.clone()]);
            for o in objects {
                assert!(object.contains(&o.value.as_str()), "{c}");
                assert!(seen.insert(o.value.clone()), "{c}: a colour repeats");
            }
        }
    }
    // A real prompt outside the declared values cannot be hidden: refused, not leaked.
    for p in [
        "a small gray circle at the top on a white background",
        "a small white circle at the top on a white background",
        "a small red circle at the top on a blue background",
    ] {
        assert!(
            candidates(p, &lex.detect(p), &lex, 8, &mut rng).is_err(),
            "{p}"
        );
    }
    // A rule may name only values of its category.
    let bad = "[[category]]\nname = \"c\"\n[[category.slot]]\nrole = \"r\"\nvalues = [\"x\"]\n\
               [[category.value]]\nname = \"y\"\ncanonical = \"y\"\n";
    assert!(Lexicon::from_toml(bad).is_err());
}
