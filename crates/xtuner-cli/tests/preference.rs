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

/// A run directory with a preference config on `llama-tiny` (whose vocabulary is the
/// preference tokenizer's): `method` and the rest of the `[preference]` section.
fn preference_run(preference: &str, lora: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let lora = if lora {
        "[lora]\nr = 8\nalpha = 16\ndropout = 0.0\n"
    } else {
        ""
    };
    fs::write(
        dir.path().join("run.toml"),
        format!(
            "[model]\npath = {:?}\nactivation_checkpointing = false\n[tokenizer]\npath = {:?}\n\
             [data]\nfiles = [{:?}]\nformat = \"intel_orca_dpo\"\nmax_length = 128\n\
             {lora}[preference]\n{preference}\n[optimizer]\nlr = 1e-2\n\
             [train]\nbatch_size = 2\naccumulative_counts = 1\nmax_iters = 6\nlog_interval = 1\n[checkpoint]\nsave_steps = 3\n",
            fixtures().join("llama-tiny").to_str().unwrap(),
            fixtures().join("preference/tokenizer-internlm2").to_str().unwrap(),
            fixtures().join("preference/intel_orca.jsonl").to_str().unwrap(),
        ),
    )
    .unwrap();
    dir
}

#[test]
fn dpo_trains_logs_its_rewards_resumes_and_exports() {
    let dir = preference_run("method = \"dpo\"\nbeta = 0.1", true);
    let d = dir.path();
    ok(&xtuner(&["train", "run.toml"], d));
    let work = d.join("work_dirs/run");
    let steps = common::logged_steps(&work);
    assert_eq!(steps.len(), 6);
    for key in [
        "chosen_rewards",
        "rejected_rewards",
        "reward_acc",
        "reward_margin",
    ] {
        assert!(
            steps.iter().all(|s| s[key].is_f64()),
            "{key} logged: {:?}",
            steps[0]
        );
    }
    // The policy moves away from its reference towards the chosen answers.
    let margin = |s: &Value| s["reward_margin"].as_f64().unwrap();
    assert_eq!(margin(&steps[0]), 0.0, "the policy starts as the reference");
    assert!(
        margin(&steps[5]) > 0.0,
        "{:?}",
        steps.iter().map(margin).collect::<Vec<_>>()
    );
    // Resumed from the middle: the same last steps.
    let resumed = common::work_dir_from(d, "resumed", &work.join("iter_3"));
    ok(&xtuner(
        &["train", "run.toml", "--work-dir", "resumed", "--resume"],
        d,
    ));
    assert_eq!(
        common::losses(&resumed),
        common::losses(&work)[3..].to_vec()
    );
    // With activation checkpointing (each layer run again in backward): the same steps.
    ok(&xtuner(
        &[
            "train",
            "run.toml",
            "--work-dir",
            "recomputed",
            "--cfg-options",
            "model.activation_checkpointing=true",
        ],
        d,
    ));
    for ((_, a), (_, b)) in common::losses(&d.join("recomputed"))
        .iter()
        .zip(common::losses(&work))
    {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // The adapter exports as PEFT's.
    ok(&xtuner(
        &[
            "convert",
            "pth_to_hf",
            "run.toml",
            "work_dirs/run/iter_6",
            "adapter",
        ],
        d,
    ));
    assert!(d.join("adapter/adapter_model.safetensors").is_file());

    // Held-out pairs (here the training pairs): the model beside its tokenizer and
    // chat template; the reference is the model without the adapter.
    common::llama_with_chat_template(d);
    let data = fixtures().join("preference/intel_orca.jsonl");
    let eval = |adapter: bool| {
        let mut args = vec![
            "eval",
            "model",
            "--data",
            data.to_str().unwrap(),
            "--format",
            "intel_orca_dpo",
        ];
        if adapter {
            args.extend(["--adapter", "adapter"]);
        }
        ok(&xtuner(&args, d))
    };
    let trained = eval(true);
    assert!(
        trained.contains("4 pairs: the model prefers the chosen answer in")
            && trained
                .contains("rewards against the model without its adapter (beta 0.1): accuracy"),
        "{trained}"
    );
    let percent = |text: &str, after: &str| -> f64 {
        let rest = &text[text.find(after).unwrap() + after.len()..];
        rest.trim_start()
            .split('%')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(percent(&trained, "accuracy") > 50.0, "{trained}");
    assert!(!eval(false).contains("rewards"), "no adapter, no reference");
}

#[test]
fn full_dpo_and_orpo_train() {
    let dir = preference_run("method = \"dpo\"\nloss_type = \"ipo\"", false);
    ok(&xtuner(&["train", "run.toml"], dir.path()));
    let steps = common::logged_steps(&dir.path().join("work_dirs/run"));
    assert!(
        steps
            .iter()
            .all(|s| s["loss"].as_f64().unwrap().is_finite())
    );
    assert!(steps[5]["reward_margin"].as_f64().unwrap() > 0.0);

    let dir = preference_run("method = \"orpo\"", true);
    ok(&xtuner(&["train", "run.toml"], dir.path()));
    let steps = common::logged_steps(&dir.path().join("work_dirs/run"));
    assert!(
        steps
            .iter()
            .all(|s| s["nll_loss"].is_f64() && s["log_odds_ratio"].is_f64())
    );
    let loss = |s: &Value| s["loss"].as_f64().unwrap();
    assert!(loss(&steps[5]) < loss(&steps[0]));

    // QLoRA: the reference is the NF4 base with the adapters off.
    let dir = preference_run("method = \"dpo\"", true);
    ok(&xtuner(
        &["train", "run.toml", "--cfg-options", "quantization.bits=4"],
        dir.path(),
    ));
    let steps = common::logged_steps(&dir.path().join("work_dirs/run"));
    assert_eq!(steps[0]["reward_margin"].as_f64(), Some(0.0));
    assert!(steps[5]["reward_margin"].as_f64().unwrap() > 0.0);

    // Pairs packed into varlen rows (XTuner's PackedDatasetWrapper), a row at a time.
    let dir = preference_run("method = \"dpo\"", true);
    ok(&xtuner(
        &[
            "train",
            "run.toml",
            "--cfg-options",
            "data.use_varlen_attn=true",
            "preference.max_packed_length=300",
            "train.batch_size=1",
        ],
        dir.path(),
    ));
    let packed = common::logged_steps(&dir.path().join("work_dirs/run"));
    assert!(packed.iter().all(|s| loss(s).is_finite()));
    assert!(packed[5]["reward_margin"].as_f64().unwrap() > 0.0);
}

#[test]
fn preference_configs_that_do_not_fit_are_errors_naming_the_key() {
    for (preference, key) in [
        (
            "method = \"dpo\"\nloss_type = \"focal\"",
            "preference.loss_type",
        ),
        ("method = \"reward\"", "preference.reward_token_id"),
        ("method = \"dpo\"\nbeta = 0.0", "preference.beta"),
    ] {
        let dir = preference_run(preference, true);
        let err = failed(&xtuner(&["train", "run.toml"], dir.path()), 2);
        assert!(err.contains(key), "{preference}: {err}");
    }
}

/// The safetensors keys of a model directory's single weight file.
fn weight_keys(dir: &std::path::Path) -> Vec<String> {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut keys: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[test]
fn a_reward_model_trains_resumes_exports_and_scores() {
    for lora in [true, false] {
        let dir = preference_run(
            "method = \"reward\"\nreward_token_id = 4\nloss_type = \"ranking\"\npenalty_type = \"log_barrier\"",
            lora,
        );
        let d = dir.path();
        ok(&xtuner(&["train", "run.toml"], d));
        let work = d.join("work_dirs/run");
        let steps = common::logged_steps(&work);
        assert_eq!(steps.len(), 6);
        assert!(
            steps
                .iter()
                .all(|s| s["reward_acc"].is_f64() && s["chosen_score_mean"].is_f64())
        );
        // The value head starts at zero: every score 0, the ranking loss log 2, and the
        // log barrier -2·log 5 per score (4 scores over 2 pairs, weight 0.01).
        let first = std::f64::consts::LN_2 - 0.01 * 4.0 * 5f64.ln();
        assert!(
            (steps[0]["loss"].as_f64().unwrap() - first).abs() < 1e-5,
            "{:?}",
            steps[0]
        );
        assert!(
            steps[5]["reward_margin"].as_f64().unwrap() > 0.0,
            "lora {lora}: {steps:?}"
        );
        if lora {
            assert!(work.join("iter_3/v_head.safetensors").is_file());
        }
        // Resumed from the middle: the same last steps.
        let resumed = common::work_dir_from(d, "resumed", &work.join("iter_3"));
        ok(&xtuner(
            &["train", "run.toml", "--work-dir", "resumed", "--resume"],
            d,
        ));
        assert_eq!(
            common::losses(&resumed),
            common::losses(&work)[3..].to_vec(),
            "lora {lora}"
        );

        // With activation checkpointing: the same steps.
        ok(&xtuner(
            &[
                "train",
                "run.toml",
                "--work-dir",
                "recomputed",
                "--cfg-options",
                "model.activation_checkpointing=true",
            ],
            d,
        ));
        let recomputed = common::losses(&d.join("recomputed"));
        assert_eq!(recomputed.len(), 6);
        for ((_, a), (_, b)) in recomputed.iter().zip(common::losses(&work)) {
            assert!((a - b).abs() < 1e-5, "lora {lora}: {a} vs {b}");
        }
        // XTuner's export for a Llama: LlamaForSequenceClassification, LoRA merged.
        ok(&xtuner(
            &[
                "convert",
                "pth_to_hf",
                "run.toml",
                "work_dirs/run/iter_6",
                "rm",
            ],
            d,
        ));
        let rm = d.join("rm");
        let config: Value =
            serde_json::from_str(&fs::read_to_string(rm.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
        assert_eq!(config["id2label"]["0"], "LABEL_0");
        let keys = weight_keys(&rm);
        assert!(keys.contains(&"score.weight".to_string()));
        assert!(
            !keys
                .iter()
                .any(|k| k.starts_with("lm_head") || k.contains("lora")),
            "{keys:?}"
        );
        assert!(
            keys.iter()
                .all(|k| k == "score.weight" || k.starts_with("model."))
        );

        // Scores: the first pair's chosen answer above its rejected one after training.
        let scored = ok(&xtuner(
            &[
                "reward",
                "rm",
                "--system",
                "to red birds",
                "--prompt",
                "the a while big sang",
                "--answer",
                "while and cat the",
                "--answer",
                "sang while big",
                "--reward-token-id",
                "4",
            ],
            d,
        ));
        let scores: Vec<f64> = scored
            .lines()
            .map(|l| l.split('\t').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(scores.len(), 2, "{scored}");
        assert!(scores[0] > scores[1], "lora {lora}: {scored}");
        let err = failed(
            &xtuner(&["reward", "rm", "--prompt", "p", "--answer", "a"], d),
            1,
        );
        assert!(err.contains("reward_token_id"), "{err}");
    }
}

#[test]
fn the_data_tools_show_the_pairs() {
    let dir = preference_run("method = \"dpo\"", true);
    let d = dir.path();
    let out = ok(&xtuner(&["check-custom-dataset", "run.toml"], d));
    assert!(out.contains("OK: 4 records, 4 pairs"), "{out}");
    assert!(
        out.contains("<|im_start|>user\nthe a while big sang<|im_end|>"),
        "{out}"
    );
    let out = ok(&xtuner(&["log-dataset", "run.toml", "--show", "all"], d));
    assert!(out.contains("4 rows (4 pairs from 4 records"), "{out}");
    assert!(out.contains("=== row 0, pair 0, rejected"), "{out}");
    let out = ok(&xtuner(&["dataset", "build", "run.toml", "--json"], d));
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (report["pairs"].as_u64(), report["cache"].as_str()),
        (Some(4), Some("hit"))
    );
}
