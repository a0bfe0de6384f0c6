//! Preference data against XTuner's own map functions and `tokenize()`
//! (`preference/encode_cases.jsonl`): the mapped pair, the ids and the labels of every
//! case, both chat templates, both map functions, truncation and the reward encoding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde::Deserialize;
use serde_json::Value;
use xtuner_dataset::Tokenizer;
use xtuner_dataset::preference::{PairOptions, PreferenceFormat, PreferencePair, encode_pair};
use xtuner_template::JinjaTemplate;

#[derive(Deserialize)]
struct Case {
    format: String,
    index: usize,
    template: String,
    max_length: usize,
    #[serde(default)]
    reward: bool,
    reward_token_id: Option<u32>,
    raw: Value,
    pair: PreferencePair,
    chosen_ids: Vec<i64>,
    rejected_ids: Vec<i64>,
    chosen_labels: Vec<i64>,
    rejected_labels: Vec<i64>,
}

#[test]
fn every_case_encodes_as_xtuner_does() {
    let text = std::fs::read_to_string(common::fixture("preference/encode_cases.jsonl")).unwrap();
    let mut checked = 0;
    for (i, line) in text.lines().enumerate() {
        let case: Case = serde_json::from_str(line).unwrap();
        let what = format!(
            "line {} ({} #{}, {}, max_length {}, reward {})",
            i + 1,
            case.format,
            case.index,
            case.template,
            case.max_length,
            case.reward
        );
        let dir = common::fixture(&format!("preference/tokenizer-{}", case.template));
        let tokenizer = Tokenizer::from_path(&dir).unwrap();
        let template = JinjaTemplate::from_tokenizer_dir(&dir).unwrap().unwrap();
        let format: PreferenceFormat = case.format.parse().unwrap();
        let pair = format.map(&case.raw).unwrap();
        assert_eq!(pair, case.pair, "{what}: the mapped pair");
        let options = PairOptions {
            max_length: case.max_length,
            reward_token_id: if case.reward {
                Some(case.reward_token_id.unwrap())
            } else {
                None
            },
        };
        let got = encode_pair(&pair, &template, &tokenizer, options).unwrap();
        assert_eq!(got.chosen_ids, case.chosen_ids, "{what}: chosen_ids");
        assert_eq!(got.rejected_ids, case.rejected_ids, "{what}: rejected_ids");
        assert_eq!(
            got.chosen_labels, case.chosen_labels,
            "{what}: chosen_labels"
        );
        assert_eq!(
            got.rejected_labels, case.rejected_labels,
            "{what}: rejected_labels"
        );
        checked += 1;
    }
    assert_eq!(checked, 56);
}

#[test]
fn a_pair_is_taken_as_it_is_and_bad_records_are_named() {
    let record = serde_json::json!({
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    });
    let pair = PreferenceFormat::Preference.map(&record).unwrap();
    assert_eq!(pair.prompt[0].content, "q");
    let err = PreferenceFormat::IntelOrcaDpo
        .map(&serde_json::json!({"system": "", "question": "q", "chosen": 3}))
        .unwrap_err();
    assert!(
        err.contains("`chosen`") && err.contains("intel_orca_dpo"),
        "{err}"
    );
    let err = PreferenceFormat::OrpoDpoMix40k
        .map(&serde_json::json!({"chosen": [], "rejected": []}))
        .unwrap_err();
    assert!(err.contains("at least one message"), "{err}");
    let err = PreferenceFormat::Preference
        .map(&serde_json::json!({"prompt": [], "chosen": [], "rejected": [], "extra": 1}))
        .unwrap_err();
    assert!(err.contains("`extra`"), "{err}");
}

#[test]
fn a_preference_data_set_is_a_row_per_pair_or_packed_and_cached() {
    use xtuner_dataset::preference::PairSpec;
    use xtuner_dataset::{CacheOutcome, load_or_process_pairs};
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = common::fixture("preference/tokenizer-internlm2");
    let mut spec = PairSpec {
        files: vec![common::fixture("preference/intel_orca.jsonl")],
        format: PreferenceFormat::IntelOrcaDpo,
        options: PairOptions {
            max_length: 512,
            reward_token_id: None,
        },
        max_packed_length: None,
        shuffle_before_pack: false,
        seed: 0,
        max_dataset_length: None,
    };
    let (rows, outcome) = load_or_process_pairs(&spec, &tokenizer, dir.path()).unwrap();
    assert!(matches!(outcome, CacheOutcome::Built(_)));
    assert_eq!(rows.rows.len(), 4);
    let text = std::fs::read_to_string(common::fixture("preference/encode_cases.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let chosen = first["chosen_ids"].as_array().unwrap().len();
    let rejected = first["rejected_ids"].as_array().unwrap().len();
    assert_eq!(rows.rows[0].cumulative_len, [0, chosen, chosen + rejected]);
    let (again, outcome) = load_or_process_pairs(&spec, &tokenizer, dir.path()).unwrap();
    assert!(matches!(outcome, CacheOutcome::Hit(_)));
    assert_eq!(again, rows);
    spec.max_packed_length = Some(300);
    let (packed, outcome) = load_or_process_pairs(&spec, &tokenizer, dir.path()).unwrap();
    assert!(matches!(outcome, CacheOutcome::Built(_)), "another key");
    assert!(packed.rows.len() < 4 && packed.rows.iter().all(|r| r.len() <= 300));
    let segments: usize = packed.rows.iter().map(|r| r.cumulative_len.len() - 1).sum();
    assert_eq!(segments, 8, "every pair whole, two segments each");
}
