//! Every decoder family from the CLI, as a user brings it: a checkpoint transformers
//! saved (`<family>-tiny`, with the fixture tokenizer beside it), LoRA-trained with
//! XTuner's default targets, exported with `convert pth_to_hf`, and read back by
//! `eval --adapter` (the loss training logged) and `chat --adapter` (the answer of the
//! merged model); and fully fine-tuned, exported as the family's own checkpoint layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use serde_json::Value;
use xtuner_model::checkpoint::Checkpoint;

mod common;
use common::{fixtures, losses, ok, xtuner};

/// The families, their fixture, a template of theirs and the default LoRA targets
/// (XTuner's rule: every linear module's last name but `lm_head`).
const FAMILIES: &[(&str, &str, &[&str])] = &[
    ("llama-tiny", "llama3_chat", LLAMA_TARGETS),
    ("qwen2-tiny", "qwen_chat", LLAMA_TARGETS),
    ("qwen3-tiny", "qwen_chat", LLAMA_TARGETS),
    ("gemma-tiny", "gemma", LLAMA_TARGETS),
    ("gemma2-tiny", "gemma", LLAMA_TARGETS),
    (
        "phi3-tiny",
        "phi3_chat",
        &["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    ),
];

/// Llama-style modules: separate q/k/v and gate/up.
const LLAMA_TARGETS: &[&str] = &[
    "down_proj",
    "gate_proj",
    "k_proj",
    "o_proj",
    "q_proj",
    "up_proj",
    "v_proj",
];

/// A model directory: the family's checkpoint and the fixture tokenizer.
fn model_dir(dir: &Path, family: &str) -> std::path::PathBuf {
    let model = dir.join(family);
    fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(fixtures().join(family).join(file), model.join(file)).unwrap();
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixtures().join("tokenizer").join(file), model.join(file)).unwrap();
    }
    model
}

/// A config training `model` on four records in one batch (so a step's loss is the
/// mean over all of them, as `xtuner eval` computes it).
fn write_config(dir: &Path, name: &str, model: &Path, template: &str, lora: bool, iters: usize) {
    let lora = if lora {
        "[lora]\nr = 4\nalpha = 8\ndropout = 0.0\n"
    } else {
        ""
    };
    fs::write(
        dir.join(name),
        format!(
            "[model]\npath = {:?}\n[data]\nfiles = [\"data.json\"]\nformat = \"alpaca\"\nmax_length = 512\n\
             pack_to_max_length = false\n[template]\nname = \"{template}\"\n{lora}[optimizer]\nlr = 1e-2\n\
             [train]\nbatch_size = 4\naccumulative_counts = 1\nmax_iters = {iters}\n[checkpoint]\nsave_steps = 2\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
}

fn chat(model: &str, adapter: Option<&str>, dir: &Path) -> String {
    let mut args = vec!["chat", model];
    if let Some(adapter) = adapter {
        args.extend(["--adapter", adapter]);
    }
    args.extend([
        "--prompt",
        "Say 3.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--no-streamer",
    ]);
    ok(&xtuner(&args, dir))
}

/// Names and shapes of every tensor of a checkpoint file or directory.
fn layout(path: &Path) -> Vec<(String, Option<Vec<usize>>)> {
    let ckpt = Checkpoint::open(path).unwrap();
    ckpt.keys()
        .into_iter()
        .map(|k| {
            let shape = ckpt.shape(&k);
            (k, shape)
        })
        .collect()
}

#[test]
fn every_family_trains_exports_and_reloads() {
    let records: Vec<Value> = (0..4)
        .map(|i| serde_json::json!({"instruction": format!("Say {i}."), "input": "", "output": format!("{i} {i} {i}")}))
        .collect();
    for &(family, template, targets) in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(
            d.join("data.json"),
            serde_json::to_string(&records).unwrap(),
        )
        .unwrap();
        let model = model_dir(d, family);
        let model_str = model.to_str().unwrap();

        // LoRA: three steps on the one batch; the third logs the loss of the adapter
        // saved after the second.
        write_config(d, "lora.toml", &model, template, true, 3);
        ok(&xtuner(&["train", "lora.toml"], d));
        let logged = losses(&d.join("work_dirs/lora"));
        assert_eq!(logged.len(), 3, "{family}: {logged:?}");
        ok(&xtuner(
            &[
                "convert",
                "pth_to_hf",
                "lora.toml",
                "work_dirs/lora/iter_2",
                "adapter",
                "--fp32",
            ],
            d,
        ));
        let config: Value = serde_json::from_str(
            &fs::read_to_string(d.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        let written: BTreeSet<&str> = config["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(written, targets.iter().copied().collect(), "{family}");
        assert_eq!(
            layout(&d.join("adapter/adapter_model.safetensors")),
            layout(
                &fixtures()
                    .join(family)
                    .join("lora/adapter_model.safetensors")
            ),
            "{family}: the adapter has PEFT's names and shapes"
        );

        let out = ok(&xtuner(
            &[
                "eval",
                model_str,
                "--adapter",
                "adapter",
                "--data",
                "data.json",
                "--template",
                template,
                "--max-length",
                "512",
            ],
            d,
        ));
        let loss: f64 = out
            .split("loss ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (loss - logged[2].1).abs() < 2e-4,
            "{family}: eval --adapter {loss} vs the logged {}",
            logged[2].1
        );

        ok(&xtuner(
            &["convert", "merge", model_str, "adapter", "merged", "--fp32"],
            d,
        ));
        assert_eq!(
            chat(model_str, Some("adapter"), d),
            chat("merged", None, d),
            "{family}: chat --adapter answers as the merged model"
        );

        // Full fine-tune: the export is the family's checkpoint layout and config.
        write_config(d, "full.toml", &model, template, false, 2);
        ok(&xtuner(&["train", "full.toml"], d));
        ok(&xtuner(
            &[
                "convert",
                "pth_to_hf",
                "full.toml",
                "work_dirs/full/iter_2",
                "full_hf",
                "--fp32",
            ],
            d,
        ));
        assert_eq!(
            layout(&d.join("full_hf")),
            layout(&fixtures().join(family).join("model.safetensors")),
            "{family}: full export tensor names and shapes"
        );
        let keys = |p: &Path| -> BTreeSet<String> {
            let v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&d.join("full_hf/config.json")),
            keys(&fixtures().join(family).join("config.json")),
            "{family}: config keys"
        );
        let reloaded = ok(&xtuner(
            &[
                "eval",
                "full_hf",
                "--data",
                "data.json",
                "--template",
                template,
            ],
            d,
        ));
        assert!(reloaded.contains("perplexity"), "{family}: {reloaded}");

        // QLoRA incremental pre-training: NF4 base, packed raw text, and the adapter
        // exported in PEFT's layout.
        let text: String = (0..8)
            .map(|i| format!("{{\"text\": \"Counting {i}: {i} {i} {i} and then more.\"}}\n"))
            .collect();
        fs::write(d.join("text.jsonl"), text).unwrap();
        fs::write(
            d.join("qlora.toml"),
            format!(
                "[model]\npath = {model_str:?}\n[data]\nfiles = [\"text.jsonl\"]\n\
                 format = \"pretrain\"\nmax_length = 32\npack_to_max_length = true\n\
                 [lora]\nr = 4\nalpha = 8\n[quantization]\nbits = 4\n[optimizer]\nlr = 1e-2\n\
                 [train]\nbatch_size = 2\naccumulative_counts = 1\nmax_iters = 3\n[checkpoint]\nsave_steps = 3\n"
            ),
        )
        .unwrap();
        ok(&xtuner(&["train", "qlora.toml"], d));
        let logged = losses(&d.join("work_dirs/qlora"));
        assert_eq!(logged.len(), 3, "{family}: {logged:?}");
        assert!(
            logged.iter().all(|(_, l)| l.is_finite()) && logged[2].1 < logged[0].1,
            "{family}: QLoRA pre-training learns: {logged:?}"
        );
        ok(&xtuner(
            &[
                "convert",
                "pth_to_hf",
                "qlora.toml",
                "work_dirs/qlora/iter_3",
                "qlora_adapter",
            ],
            d,
        ));
        assert_eq!(
            layout(&d.join("qlora_adapter/adapter_model.safetensors")),
            layout(
                &fixtures()
                    .join(family)
                    .join("lora/adapter_model.safetensors")
            ),
            "{family}: the QLoRA adapter has PEFT's names and shapes"
        );
    }
}

#[test]
fn eval_of_tokenized_data_needs_no_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("bare");
    fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(fixtures().join("llama-tiny").join(file), model.join(file)).unwrap();
    }
    fs::write(
        d.join("tokens.jsonl"),
        "{\"input_ids\": [1, 40, 41, 42, 43], \"labels\": [-100, -100, 41, 42, 43]}\n",
    )
    .unwrap();
    let out = ok(&xtuner(
        &[
            "eval",
            "bare",
            "--data",
            "tokens.jsonl",
            "--format",
            "tokenized",
        ],
        d,
    ));
    assert!(out.contains("1 samples, 3 trained tokens"), "{out}");
    // Text does need one, and the error says which is missing.
    let text = xtuner(
        &[
            "eval",
            "bare",
            "--data",
            "tokens.jsonl",
            "--format",
            "alpaca",
        ],
        d,
    );
    assert!(!text.status.success());
    let err = String::from_utf8_lossy(&text.stderr);
    assert!(err.contains("tokenizer"), "{err}");
}
