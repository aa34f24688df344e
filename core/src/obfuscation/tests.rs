//! Detection over a table of prompts (known misses written down), and the candidate set's
//! privacy properties.

use std::collections::BTreeMap;

use super::*;

fn lex() -> Lexicon {
    Lexicon::builtin().unwrap()
}

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
    // Every other value of the template: its set holds it, and equals the set of every other
    // real value in the same block (the blocks partition the combinations, up to the wrap of
    // the last one).
    let mut seen_sets: Vec<BTreeMap<String, usize>> = Vec::new();
    for age in ["young", "middle-aged", "old"] {
        for eth in [
            "Asian",
            "Black",
            "White",
            "Hispanic",
            "Middle Eastern",
            "South Asian",
        ] {
            for g in ["woman", "man"] {
                let article = if age == "old" { "an" } else { "a" };
                let q = format!("{article} {age} {eth} {g} in a park");
                let s = candidates(&q, &lex.detect(&q), &lex, 8, &mut rng).unwrap();
                assert_eq!(s.prompts[s.real_index()], q);
                let m = multiset(&s.prompts);
                if !seen_sets.contains(&m) {
                    seen_sets.push(m);
                }
            }
        }
    }
    assert_eq!(seen_sets.len(), 36usize.div_ceil(8), "one set per block");
}

#[test]
fn order_is_shuffled_and_real_index_varies() {
    let lex = lex();
    let mut rng = rand::rng();
    let p = "an old man";
    let spans = lex.detect(p);
    let mut positions = std::collections::BTreeSet::new();
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
