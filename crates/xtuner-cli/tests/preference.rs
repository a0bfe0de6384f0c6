//! Preference data from the command line: `xtuner dataset encode` with a preference
//! format reproduces XTuner's `tokenize()` (the fixture), rendering the tokenizer
//! directory's own chat template; a record the template fails on is named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;

use serde_json::Value;

mod common;
use common::{failed, fixtures, jsonl, ok, xtuner};

/// The fixture's cases grouped by (format, template, max_length, reward): each group's
/// raw records go through the command as one file, and the pairs come out in order.
#[test]
fn dataset_encode_writes_xtuners_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(fixtures().join("preference/encode_cases.jsonl")).unwrap();
    let mut groups: BTreeMap<(String, String, u64, bool), Vec<Value>> = BTreeMap::new();
    for line in text.lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let key = (
            case["format"].as_str().unwrap().to_string(),
            case["template"].as_str().unwrap().to_string(),
            case["max_length"].as_u64().unwrap(),
            case["reward"].as_bool().unwrap_or(false),
        );
        groups.entry(key).or_default().push(case);
    }
    let mut compared = 0;
    for ((format, template, max_length, reward), cases) in &groups {
        let name = format!("{format}-{template}-{max_length}-{reward}");
        let input = dir.path().join(format!("{name}.jsonl"));
        let raw: Vec<String> = cases.iter().map(|c| c["raw"].to_string()).collect();
        fs::write(&input, raw.join("\n")).unwrap();
        let out = dir.path().join(format!("{name}.out.jsonl"));
        let tokenizer = fixtures().join(format!("preference/tokenizer-{template}"));
        let max_length = max_length.to_string();
        let mut args = vec![
            "dataset",
            "encode",
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--format",
            format,
            "--max-length",
            &max_length,
            "--out",
            out.to_str().unwrap(),
        ];
        if *reward {
            args.extend(["--reward-token-id", "4"]);
        }
        args.push(input.to_str().unwrap());
        ok(&xtuner(&args, dir.path()));
        let got = jsonl(&out);
        assert_eq!(got.len(), cases.len(), "{name}: pairs");
        for (g, e) in got.iter().zip(cases) {
            for key in [
                "chosen_ids",
                "chosen_labels",
                "rejected_ids",
                "rejected_labels",
            ] {
                assert_eq!(g[key], e[key], "{name}: {key}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 56);
}

#[test]
fn a_record_the_chat_template_rejects_is_named_with_the_template_line() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("no_system.jinja");
    fs::write(
        &template,
        "{% for m in messages %}\n{% if m.role == 'system' and m.content %}{{ raise_exception('System role not supported') }}{% endif %}\n{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let data = fixtures().join("preference/intel_orca.jsonl");
    let tokenizer = fixtures().join("preference/tokenizer-internlm2");
    let out = xtuner(
        &[
            "dataset",
            "encode",
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--format",
            "intel_orca_dpo",
            "--template",
            template.to_str().unwrap(),
            "--max-length",
            "64",
            "--out",
            "o.jsonl",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = failed(&out, 1);
    assert!(
        err.contains("intel_orca.jsonl:1:")
            && err.contains("line 2")
            && err.contains("System role not supported"),
        "{err}"
    );
    // A tokenizer without a chat template, and no template given.
    let plain = fixtures().join("tokenizer");
    let out = xtuner(
        &[
            "dataset",
            "encode",
            "--tokenizer",
            plain.to_str().unwrap(),
            "--format",
            "intel_orca_dpo",
            "--max-length",
            "64",
            "--out",
            "o.jsonl",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(failed(&out, 1).contains("has no chat_template"));
}
