//! The `xtuner` binary end to end: the data tools reproduce XTuner's fixtures, the
//! config commands work, and bad input is a clear error with a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{failed, fixtures, jsonl, ok, repo, xtuner};

/// Every fixture case, grouped by (format, template, max_length): the raw records go
/// through `xtuner dataset encode` as one file, and the kept samples come out in order.
#[test]
fn dataset_encode_reproduces_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(fixtures().join("tokenizer/encode_cases.jsonl")).unwrap();
    let mut groups: BTreeMap<(String, String, u64), Vec<Value>> = BTreeMap::new();
    for line in text.lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        if case.get("error").is_some() {
            continue; // a template that cannot render a system prompt: checked below
        }
        let key = (
            case["format"].as_str().unwrap().to_string(),
            case["template"].as_str().unwrap_or("").to_string(),
            // Dropped cases carry no max_length; they produce no output either way.
            case["max_length"].as_u64().unwrap_or(96),
        );
        groups.entry(key).or_default().push(case);
    }
    let tokenizer = fixtures().join("tokenizer");
    let mut compared = 0;
    for ((format, template, max_length), cases) in &groups {
        let input = dir.path().join(format!("{format}-{template}.jsonl"));
        let raw: Vec<String> = cases.iter().map(|c| c["raw"].to_string()).collect();
        fs::write(&input, raw.join("\n")).unwrap();
        let out = dir.path().join(format!("{format}-{template}.out.jsonl"));
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
        if !template.is_empty() {
            args.extend(["--template", template]);
        }
        args.push(input.to_str().unwrap());
        ok(&xtuner(&args, dir.path()));
        let expected: Vec<&Value> = cases
            .iter()
            .filter(|c| {
                c.get("dropped").is_none() && c.get("kept").and_then(Value::as_bool).unwrap_or(true)
            })
            .collect();
        let got = jsonl(&out);
        assert_eq!(
            got.len(),
            expected.len(),
            "{format}/{template}: kept samples"
        );
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g["input_ids"], e["input_ids"], "{format}/{template}");
            assert_eq!(g["labels"], e["labels"], "{format}/{template}");
            compared += 1;
        }
    }
    assert!(compared > 100, "{compared}");
}

#[test]
fn a_system_prompt_the_template_cannot_render_is_an_error_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chat.jsonl");
    fs::write(
        &input,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n\
         {\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let tok = fixtures().join("tokenizer");
    let out = xtuner(
        &[
            "dataset",
            "encode",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--format",
            "openai",
            "--template",
            "minicpm",
            "--max-length",
            "64",
            "--out",
            "o.jsonl",
            input.to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = failed(&out, 1);
    assert!(
        err.contains("chat.jsonl:2") && err.contains("SYSTEM"),
        "{err}"
    );
}

#[test]
fn dataset_pack_reproduces_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<Value> = serde_json::from_str(
        &fs::read_to_string(fixtures().join("tokenizer/pack_cases.json")).unwrap(),
    )
    .unwrap();
    for (i, case) in cases.iter().enumerate() {
        let encoded = dir.path().join(format!("enc{i}.jsonl"));
        let inputs = &case["inputs"];
        let lines: Vec<String> = inputs["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(inputs["labels"].as_array().unwrap())
            .map(|(ids, labels)| {
                serde_json::json!({"input_ids": ids, "labels": labels}).to_string()
            })
            .collect();
        fs::write(&encoded, lines.join("\n")).unwrap();
        let out = dir.path().join(format!("packed{i}.jsonl"));
        let chunk = case["chunk_size"].to_string();
        let varlen = case["use_varlen_attn"].as_bool().unwrap();
        let mut args = vec![
            "dataset",
            "pack",
            "--max-length",
            &chunk,
            "--out",
            out.to_str().unwrap(),
        ];
        if varlen {
            args.push("--varlen");
        }
        args.push(encoded.to_str().unwrap());
        ok(&xtuner(&args, dir.path()));
        let rows = jsonl(&out);
        let result = &case["result"];
        let n = result["input_ids"].as_array().unwrap().len();
        assert_eq!(rows.len(), n);
        for (r, row) in rows.iter().enumerate() {
            let keys: &[&str] = if varlen {
                &["input_ids", "labels", "cumulative_len", "position_ids"]
            } else {
                &["input_ids", "labels"]
            };
            for key in keys {
                assert_eq!(row[key], result[key][r], "case {i} row {r} {key}");
            }
            assert_eq!(row.get("cumulative_len").is_some(), varlen);
        }
    }
}

#[test]
fn tokenize_prints_ids_and_pieces() {
    let tok = fixtures().join("spm-bpe-tiny");
    let out = ok(&xtuner(
        &[
            "tokenize",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--json",
            "--",
            "Hello world",
        ],
        &repo(),
    ));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ids"], serde_json::json!([498, 81, 291, 333, 274, 435]));
    assert_eq!(v["pieces"][1], "<0x48>");
}

#[test]
fn config_commands() {
    let out = ok(&xtuner(&["list-cfg", "-p", "QLORA_ALPACA"], &repo()));
    assert!(out.contains("internlm2_chat_1_8b_qlora_alpaca_e3"), "{out}");
    assert!(!out.contains("full_alpaca"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    ok(&xtuner(
        &[
            "copy-cfg",
            "internlm2_chat_1_8b_qlora_alpaca_e3",
            dir.path().to_str().unwrap(),
        ],
        &repo(),
    ));
    let copied = dir
        .path()
        .join("internlm2_chat_1_8b_qlora_alpaca_e3_copy.toml");
    assert_eq!(
        fs::read_to_string(&copied).unwrap(),
        fs::read_to_string(repo().join("configs/internlm2_chat_1_8b_qlora_alpaca_e3.toml"))
            .unwrap()
    );
    let out = ok(&xtuner(&["list-dataset-format"], &repo()));
    for name in [
        "alpaca",
        "openai",
        "llava",
        "pretrain",
        "conversation",
        "tokenized",
    ] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name}: {out}");
    }
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixtures().join("tokenizer");
    let tok = tok.to_str().unwrap();
    let good = dir.path().join("good.jsonl");
    fs::write(
        &good,
        "{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}\n",
    )
    .unwrap();
    let good = good.to_str().unwrap();

    // Malformed JSON: file and line.
    let bad = dir.path().join("bad.jsonl");
    fs::write(
        &bad,
        "{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}\n{\"instruction\": \n",
    )
    .unwrap();
    let err = failed(
        &xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                tok,
                "--format",
                "alpaca",
                "--max-length",
                "64",
                "--out",
                "o.jsonl",
                bad.to_str().unwrap(),
            ],
            dir.path(),
        ),
        1,
    );
    assert!(err.contains("bad.jsonl:2"), "{err}");

    // Missing field: file, line and field.
    let missing = dir.path().join("missing.jsonl");
    fs::write(&missing, "{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"input\": \"\"}\n").unwrap();
    let err = failed(
        &xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                tok,
                "--format",
                "alpaca",
                "--max-length",
                "64",
                "--out",
                "o.jsonl",
                missing.to_str().unwrap(),
            ],
            dir.path(),
        ),
        1,
    );
    assert!(
        err.contains("missing.jsonl:2") && err.contains("output"),
        "{err}"
    );

    // Unknown format / template: the valid names are listed; exit 2.
    let err = failed(
        &xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                tok,
                "--format",
                "alpacca",
                "--max-length",
                "64",
                "--out",
                "o.jsonl",
                good,
            ],
            dir.path(),
        ),
        2,
    );
    assert!(err.contains("alpacca") && err.contains("openai"), "{err}");
    let err = failed(
        &xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                tok,
                "--format",
                "alpaca",
                "--template",
                "nope",
                "--max-length",
                "64",
                "--out",
                "o.jsonl",
                good,
            ],
            dir.path(),
        ),
        2,
    );
    assert!(
        err.contains("nope") && err.contains("internlm2_chat"),
        "{err}"
    );

    // max_length 0.
    let err = failed(
        &xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                tok,
                "--format",
                "alpaca",
                "--max-length",
                "0",
                "--out",
                "o.jsonl",
                good,
            ],
            dir.path(),
        ),
        2,
    );
    assert!(err.contains("max_length"), "{err}");

    // Missing and corrupt tokenizers.
    let err = failed(
        &xtuner(
            &[
                "dataset",
                "encode",
                "--tokenizer",
                "nowhere",
                "--format",
                "alpaca",
                "--max-length",
                "8",
                "--out",
                "o.jsonl",
                good,
            ],
            dir.path(),
        ),
        1,
    );
    assert!(err.contains("nowhere"), "{err}");
    let corrupt = dir.path().join("corrupt");
    fs::create_dir(&corrupt).unwrap();
    fs::write(corrupt.join("tokenizer.json"), "{\"version\": ").unwrap();
    let err = failed(
        &xtuner(
            &[
                "tokenize",
                "--tokenizer",
                corrupt.to_str().unwrap(),
                "--",
                "x",
            ],
            dir.path(),
        ),
        1,
    );
    assert!(err.contains("tokenizer.json"), "{err}");

    // Empty data set.
    let empty = dir.path().join("empty.json");
    fs::write(&empty, "[]").unwrap();
    let config = dir.path().join("cfg.toml");
    fs::write(
        &config,
        format!("[model]\npath = {tok:?}\n[data]\nfiles = [{:?}]\nformat = \"alpaca\"\n[template]\nname = \"internlm2_chat\"\n", empty.to_str().unwrap()),
    )
    .unwrap();
    let err = failed(
        &xtuner(&["dataset", "build", config.to_str().unwrap()], dir.path()),
        1,
    );
    assert!(err.contains("empty"), "{err}");

    // A config with an unknown key: the key and file; exit 2.
    fs::write(
        &config,
        format!(
            "[model]\npath = {tok:?}\nbatch = 1\n[data]\nfiles = [{good:?}]\nformat = \"alpaca\"\n"
        ),
    )
    .unwrap();
    let err = failed(
        &xtuner(&["log-dataset", config.to_str().unwrap()], dir.path()),
        2,
    );
    assert!(err.contains("batch") && err.contains("cfg.toml"), "{err}");
    let err = failed(&xtuner(&["log-dataset", "no_such_config"], dir.path()), 1);
    assert!(err.contains("no_such_config"), "{err}");
}

#[test]
fn dataset_build_caches_and_check_custom_dataset_reports() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixtures().join("tokenizer");
    let data = dir.path().join("data.json");
    let records: Vec<Value> = (0..40)
        .map(|i| serde_json::json!({"instruction": format!("Count to {i}."), "input": "", "output": format!("{i}")}))
        .collect();
    fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let config = dir.path().join("run.toml");
    fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[data]\nfiles = [\"data.json\"]\nformat = \"alpaca\"\nmax_length = 32\n[template]\nname = \"internlm2_chat\"\n",
            tok.to_str().unwrap()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let first: Value =
        serde_json::from_str(ok(&xtuner(&["dataset", "build", cfg, "--json"], dir.path())).trim())
            .unwrap();
    assert_eq!(first["cache"], "built");
    assert_eq!(first["records"], 40);
    let second: Value =
        serde_json::from_str(ok(&xtuner(&["dataset", "build", cfg, "--json"], dir.path())).trim())
            .unwrap();
    assert_eq!(second["cache"], "hit");
    assert_eq!(second["rows"], first["rows"]);
    let other: Value = serde_json::from_str(
        ok(&xtuner(
            &[
                "dataset",
                "build",
                cfg,
                "--json",
                "--cfg-options",
                "data.max_length=48",
            ],
            dir.path(),
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(other["cache"], "built");

    let out = ok(&xtuner(&["check-custom-dataset", cfg], dir.path()));
    assert!(
        out.contains("OK: 40 records") && out.contains("<|im_start|>user"),
        "{out}"
    );
    let out = ok(&xtuner(
        &["log-dataset", cfg, "--show", "masked_text"],
        dir.path(),
    ));
    assert!(
        out.contains("[masked_text]") && !out.contains("[text]"),
        "XTuner's spelling: {out}"
    );
    let out = ok(&xtuner(&["log-dataset", cfg, "--show", "all"], dir.path()));
    assert!(
        out.contains("[masked_text]") && out.contains("[-100]") && out.contains("Count to"),
        "{out}"
    );
}

#[test]
fn chat_one_shot_prints_the_golden_greedy_continuation() {
    use xtuner_model::checkpoint::Checkpoint;
    let model = fixtures().join("internlm2-tiny");
    let golden = Checkpoint::open(&model.join("golden.safetensors")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        golden
            .int_data(key)
            .unwrap()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect()
    };
    let (prompt, greedy) = (ids("generate_prompt"), ids("generate_greedy"));
    let tokenizer = xtuner_dataset::Tokenizer::from_path(&model).unwrap();
    // The prompt text is the golden prompt without its BOS; chat adds the BOS back.
    let text = tokenizer.decode(&prompt[1..]).unwrap();
    assert_eq!(tokenizer.encode(&text).unwrap(), prompt[1..]);
    let continuation: Vec<u32> = greedy[prompt.len()..]
        .iter()
        .copied()
        .filter(|&id| id != 2)
        .collect();
    let expected = tokenizer.decode(&continuation).unwrap();
    let out = ok(&xtuner(
        &[
            "chat",
            model.to_str().unwrap(),
            "--prompt",
            &text,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--no-streamer",
        ],
        &repo(),
    ));
    assert_eq!(out, format!("{expected}\n"));
    // Streaming prints the same text.
    let out = ok(&xtuner(
        &[
            "chat",
            model.to_str().unwrap(),
            "--prompt",
            &text,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ],
        &repo(),
    ));
    assert_eq!(out, format!("{expected}\n"));
}

#[test]
fn chat_session_reads_turns_until_exit_and_applies_the_adapter() {
    use std::io::Write;
    let model = fixtures().join("internlm2-tiny");
    let adapter = model.join("lora");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args([
            "chat",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt-template",
            "internlm2_chat",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "4",
            "--no-streamer",
            "--seed",
            "3",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello\n\nRESET\n\nHi again\nsecond line\n\nEXIT\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = ok(&out);
    assert_eq!(stdout.lines().count(), 2, "two answers: {stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("History responses have been removed"));
    // A missing adapter directory is an error naming it.
    let err = failed(
        &xtuner(
            &[
                "chat",
                model.to_str().unwrap(),
                "--adapter",
                "no_adapter",
                "--prompt",
                "x",
            ],
            &repo(),
        ),
        1,
    );
    assert!(err.contains("no_adapter"), "{err}");
    // A system prompt needs a template that has a SYSTEM field.
    let err = failed(
        &xtuner(
            &[
                "chat",
                model.to_str().unwrap(),
                "--system",
                "x",
                "--prompt",
                "x",
            ],
            &repo(),
        ),
        1,
    );
    assert!(err.contains("--prompt-template"), "{err}");
}

#[test]
fn llava_chat_about_an_image() {
    let f = fixtures();
    let (llm, llava, clip) = (
        f.join("internlm2-tiny"),
        f.join("llava-tiny"),
        f.join("clip-vit-tiny"),
    );
    let image = clip.join("image.png");
    let args = [
        "chat",
        llm.to_str().unwrap(),
        "--llava",
        llava.to_str().unwrap(),
        "--visual-encoder",
        clip.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt-template",
        "internlm2_chat",
        "--prompt",
        "What is this?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--no-streamer",
    ];
    let first = ok(&xtuner(&args, &repo()));
    assert!(!first.trim().is_empty());
    assert_eq!(
        first,
        ok(&xtuner(&args, &repo())),
        "greedy decoding is deterministic"
    );
    // A missing image, projector or vision tower is a clear error.
    let mut missing = args.to_vec();
    missing[7] = "missing.png";
    let err = failed(&xtuner(&missing, &repo()), 1);
    assert!(err.contains("missing.png"), "{err}");
    let err = failed(
        &xtuner(
            &[
                "chat",
                llm.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
                "--prompt",
                "x",
            ],
            &repo(),
        ),
        1,
    );
    assert!(err.contains("--llava"), "{err}");
    let err = failed(
        &xtuner(
            &[
                "chat",
                llm.to_str().unwrap(),
                "--llava",
                llava.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
                "--prompt",
                "x",
            ],
            &repo(),
        ),
        1,
    );
    assert!(err.contains("--visual-encoder"), "{err}");
}
