//! Parity with XTuner's own data pipeline: every case of the reference fixtures.
//!
//! - `tokenizer/encode_cases.jsonl`: raw record → map function → template → encode_fn,
//!   including the samples XTuner drops and the templates that cannot render a system.
//! - `tokenizer/pack_cases.json`: the Packer at several chunk sizes, with and without
//!   varlen boundaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use serde_json::Value;
use xtuner_dataset::encode::{EncodeOptions, encode};
use xtuner_dataset::format::{DataFormat, Sample};
use xtuner_dataset::pack::pack;
use xtuner_dataset::{EncodedSample, Tokenizer};
use xtuner_template::{PromptTemplate, Turn};

mod common;

fn fixtures() -> PathBuf {
    common::fixture("")
}

fn ids(v: &Value) -> Vec<i64> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn every_encode_case_matches_xtuner() {
    let tok = Tokenizer::from_path(&fixtures().join("tokenizer")).unwrap();
    let text = std::fs::read_to_string(fixtures().join("tokenizer/encode_cases.jsonl")).unwrap();
    let mut checked = 0;
    let (mut kept, mut dropped, mut errors, mut untrained) = (0, 0, 0, 0);
    for (n, line) in text.lines().enumerate() {
        let case: Value = serde_json::from_str(line).unwrap();
        let at = format!("case {} ({} / {})", n + 1, case["format"], case["template"]);
        let format: DataFormat = case["format"].as_str().unwrap().parse().unwrap();
        let Sample::Conversation { conversation, .. } =
            format.map(&case["raw"], &Default::default()).unwrap()
        else {
            panic!("{at}: not a conversation")
        };
        let expected_conv: Vec<Turn> =
            serde_json::from_value(case["conversation"].clone()).unwrap();
        assert_eq!(
            conversation.conversation, expected_conv,
            "{at}: map function"
        );

        let templated = match case["template"].as_str() {
            Some(name) => {
                let template = name.parse::<PromptTemplate>().unwrap().template();
                match template.render(&conversation.conversation) {
                    Ok(t) => t,
                    Err(e) => {
                        assert!(case.get("error").is_some(), "{at}: unexpected error {e}");
                        errors += 1;
                        checked += 1;
                        continue;
                    }
                }
            }
            None => conversation.conversation.clone(),
        };
        assert!(
            case.get("error").is_none(),
            "{at}: XTuner raised, we did not"
        );
        let expected_templated: Vec<Turn> =
            serde_json::from_value(case["templated"].clone()).unwrap();
        assert_eq!(templated, expected_templated, "{at}: template");
        if case.get("dropped").is_some() {
            assert!(templated.is_empty(), "{at}: XTuner drops it");
            dropped += 1;
            checked += 1;
            continue;
        }
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let with_image_token = case["format"] == "llava";
        let sample = encode(
            &tok,
            &templated,
            EncodeOptions {
                max_length,
                with_image_token,
            },
        )
        .unwrap();
        assert_eq!(sample.input_ids, ids(&case["input_ids"]), "{at}: input_ids");
        assert_eq!(sample.labels, ids(&case["labels"]), "{at}: labels");
        // `kept` is absent on pretrain rows (always kept).
        let xtuner_keeps = case.get("kept").and_then(Value::as_bool).unwrap_or(true);
        assert_eq!(sample.has_trained_label(), xtuner_keeps, "{at}: kept");
        if xtuner_keeps {
            kept += 1
        } else {
            untrained += 1
        }
        checked += 1;
    }
    assert_eq!(checked, 164, "every case checked");
    assert!(
        kept > 0 && dropped > 0 && errors > 0,
        "kept {kept} dropped {dropped} errors {errors} untrained {untrained}"
    );
}

#[test]
fn every_pack_case_matches_xtuner() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer/pack_cases.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let chunk = case["chunk_size"].as_u64().unwrap() as usize;
        let varlen = case["use_varlen_attn"].as_bool().unwrap();
        let at = format!("chunk {chunk} varlen {varlen}");
        let inputs = &case["inputs"];
        let samples: Vec<EncodedSample> = inputs["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(inputs["labels"].as_array().unwrap())
            .map(|(i, l)| EncodedSample {
                input_ids: ids(i),
                labels: ids(l),
            })
            .collect();
        let rows = pack(samples, chunk);
        let result = &case["result"];
        let expected_ids: Vec<Vec<i64>> =
            serde_json::from_value(result["input_ids"].clone()).unwrap();
        let expected_labels: Vec<Vec<i64>> =
            serde_json::from_value(result["labels"].clone()).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.input_ids.clone()).collect::<Vec<_>>(),
            expected_ids,
            "{at}"
        );
        assert_eq!(
            rows.iter().map(|r| r.labels.clone()).collect::<Vec<_>>(),
            expected_labels,
            "{at}"
        );
        if varlen {
            let cu: Vec<Vec<usize>> =
                serde_json::from_value(result["cumulative_len"].clone()).unwrap();
            let pos: Vec<Vec<usize>> =
                serde_json::from_value(result["position_ids"].clone()).unwrap();
            assert_eq!(
                rows.iter()
                    .map(|r| r.cumulative_len.clone())
                    .collect::<Vec<_>>(),
                cu,
                "{at}"
            );
            assert_eq!(
                rows.iter().map(|r| r.position_ids()).collect::<Vec<_>>(),
                pos,
                "{at}"
            );
        } else {
            assert!(result.get("cumulative_len").is_none());
        }
    }
}
