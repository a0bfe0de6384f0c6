//! The tokenizer's own Jinja chat template for supervised data, training and chat:
//! `--template chat_template` / `[template] name = "chat_template"` /
//! `--prompt-template chat_template`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;

use serde_json::Value;

mod common;
use common::{jsonl, ok, xtuner};

/// InternLM2-chat's Jinja template gives XTuner's `internlm2_chat` ids (the template's
/// `<s>` text is the BOS id), and trains the answer and its `<|im_end|>` as XTuner does;
/// it also trains the newline the template writes after each turn, which XTuner's SEP
/// leaves untrained.
#[test]
fn the_tokenizers_template_encodes_as_xtuners_internlm2_chat() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::llama_with_chat_template(d);
    let records = [
        r#"{"messages": [{"role": "system", "content": "to red birds"}, {"role": "user", "content": "the a while"}, {"role": "assistant", "content": "big sang"}]}"#,
        r#"{"messages": [{"role": "user", "content": "dog dog"}, {"role": "assistant", "content": "red sat"}, {"role": "user", "content": "on big"}, {"role": "assistant", "content": "the cat"}]}"#,
    ];
    fs::write(d.join("data.jsonl"), records.join("\n")).unwrap();
    let encode = |template: &str, out: &str| {
        ok(&xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                "model",
                "--format",
                "openai",
                "--template",
                template,
                "--max-length",
                "512",
                "--out",
                out,
                "data.jsonl",
            ],
            d,
        ));
        jsonl(&d.join(out))
    };
    let jinja = encode("chat_template", "jinja.jsonl");
    let xtuner_rows = encode("internlm2_chat", "xtuner.jsonl");
    assert_eq!(jinja.len(), 2);
    let ids_of = |text: &str| -> Vec<Value> {
        let out = ok(&xtuner(
            &["tokenize", "--tokenizer", "model", "--json", "--", text],
            d,
        ));
        let v: Value = serde_json::from_str(&out).unwrap();
        v["ids"].as_array().unwrap().clone()
    };
    let sep = ids_of("\n");
    let im_end = ids_of("<|im_end|>");
    for (j, x) in jinja.iter().zip(&xtuner_rows) {
        assert_eq!(j["input_ids"], x["input_ids"]);
        let (jl, xl) = (
            j["labels"].as_array().unwrap(),
            x["labels"].as_array().unwrap(),
        );
        let ids = j["input_ids"].as_array().unwrap();
        // Only the newline after each answer's <|im_end|> differs (trained here).
        let mut i = 0;
        let mut runs = 0;
        while i < jl.len() {
            if jl[i] == xl[i] {
                i += 1;
                continue;
            }
            assert_eq!(&ids[i - 1], &im_end[0], "position {i} follows <|im_end|>");
            assert_eq!(&ids[i..i + sep.len()], &sep[..], "position {i}");
            for k in i..i + sep.len() {
                assert_eq!((&jl[k], xl[k].as_i64()), (&ids[k], Some(-100)));
            }
            i += sep.len();
            runs += 1;
        }
        let answers = j["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| **t == im_end[0])
            .count();
        assert!(runs >= 1 && runs <= answers, "{runs} of {answers}");
        assert!(jl.iter().filter(|l| l.as_i64() != Some(-100)).count() > 2);
    }
}

#[test]
fn a_config_trains_with_it_and_chat_renders_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = common::llama_with_chat_template(d);
    let records: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"instruction": "dog {i}", "input": "", "output": "red sat {i}"}}"#))
        .collect();
    fs::write(d.join("data.jsonl"), records.join("\n")).unwrap();
    fs::write(
        d.join("run.toml"),
        format!(
            "[model]\npath = {:?}\nactivation_checkpointing = false\n[data]\nfiles = [\"data.jsonl\"]\n\
             format = \"alpaca\"\nmax_length = 64\npack_to_max_length = false\n\
             [template]\nname = \"chat_template\"\n[lora]\nr = 4\nalpha = 8\n[optimizer]\nlr = 1e-2\n\
             [train]\nbatch_size = 2\naccumulative_counts = 1\nmax_iters = 4\nlog_interval = 1\n\
             [checkpoint]\nsave_steps = 4\n[evaluation]\nfreq = 4\nmax_new_tokens = 4\ninputs = [\"dog 1\"]\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    ok(&xtuner(&["train", "run.toml"], d));
    let log = jsonl(&d.join("work_dirs/run/train_log.jsonl"));
    assert!(
        log.iter()
            .any(|e| e["event"] == "eval" && e["answers"][0][0] == "dog 1"),
        "the hook answered with the chat template: {log:?}"
    );
    let steps = common::logged_steps(&d.join("work_dirs/run"));
    assert_eq!(steps.len(), 4);
    // A field beside chat_template is refused, naming the key.
    let err = common::failed(
        &xtuner(
            &["train", "run.toml", "--cfg-options", "template.sep=\"x\""],
            d,
        ),
        2,
    );
    assert!(err.contains("template"), "{err}");

    let answer = ok(&xtuner(
        &[
            "chat",
            "model",
            "--prompt-template",
            "chat_template",
            "--system",
            "be brief",
            "--prompt",
            "dog dog",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--no-streamer",
        ],
        d,
    ));
    assert!(!answer.trim().is_empty());
}
