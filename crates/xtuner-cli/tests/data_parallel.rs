//! Data parallel from the CLI: `NPROC_PER_NODE=N xtuner train` on the CPU runs N ranks
//! in one process, each taking every N-th row; their steps must be those of one rank
//! accumulating the same micro-batches (losses, gradient norms and final weights to
//! relative 1e-5, a weight tensor's relative to its largest element), for LoRA and full
//! fine-tuning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use xtuner_model::checkpoint::Checkpoint;

mod common;
use common::{fixtures, ok};

/// `xtuner train config` with `NPROC_PER_NODE` set to `ranks`.
fn train(config: &str, ranks: usize, dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args(["train", config])
        .env("NPROC_PER_NODE", ranks.to_string())
        .current_dir(dir)
        .output()
        .unwrap();
    ok(&out)
}

/// Each step's (loss, grad_norm) from a work dir's log.
fn steps(work_dir: &Path) -> Vec<(f64, f64)> {
    fs::read_to_string(work_dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
        "{what}: {a} vs {b}"
    );
}

/// Six records, batches of one, a constant learning rate, `iters` iterations.
fn write_config(dir: &Path, name: &str, lora: bool, accumulative_counts: usize, iters: usize) {
    let lora = if lora {
        "[lora]\nr = 4\nalpha = 8\ndropout = 0.0\n"
    } else {
        ""
    };
    fs::write(
        dir.join(name),
        format!(
            "[model]\npath = \"model\"\n[data]\nfiles = [\"data.json\"]\nformat = \"alpaca\"\n\
             max_length = 512\npack_to_max_length = false\n[template]\nname = \"llama2_chat\"\n\
             {lora}[optimizer]\nlr = 1e-2\n[schedule]\nwarmup_ratio = 0.0\neta_min = 1e-2\n\
             [train]\nbatch_size = 1\naccumulative_counts = {accumulative_counts}\n\
             max_iters = {iters}\nlog_interval = 1\n[checkpoint]\nsave_steps = 1000\n"
        ),
    )
    .unwrap();
}

#[test]
fn ranks_step_as_one_rank_accumulating_their_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(fixtures().join("llama-tiny").join(file), model.join(file)).unwrap();
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixtures().join("tokenizer").join(file), model.join(file)).unwrap();
    }
    let records: Vec<Value> = (0..6)
        .map(|i| serde_json::json!({"instruction": format!("Count to {i}."), "input": "", "output": format!("{i} {i}")}))
        .collect();
    fs::write(
        d.join("data.json"),
        serde_json::to_string(&records).unwrap(),
    )
    .unwrap();
    for (lora, kind) in [(true, "lora"), (false, "full")] {
        for world in [2, 3] {
            // Six rows: one epoch is 6 iterations of one rank, 6/N of N ranks.
            let one = format!("{kind}_one_{world}.toml");
            write_config(d, &one, lora, world, 6);
            train(&one, 1, d);
            let many = format!("{kind}_many_{world}.toml");
            write_config(d, &many, lora, 1, 6 / world);
            train(&many, world, d);
            let (want, got) = (
                steps(&d.join(format!("work_dirs/{kind}_one_{world}"))),
                steps(&d.join(format!("work_dirs/{kind}_many_{world}"))),
            );
            assert_eq!(got.len(), want.len(), "{kind}, {world} ranks");
            for ((loss, norm), (want_loss, want_norm)) in got.iter().zip(&want) {
                close(*loss, *want_loss, &format!("{kind} loss, {world} ranks"));
                close(
                    *norm,
                    *want_norm,
                    &format!("{kind} grad norm, {world} ranks"),
                );
            }
            let weights = |run: &str| {
                let iter = if run.contains("one") { 6 } else { 6 / world };
                let mut path = d.join(format!("work_dirs/{run}/iter_{iter}"));
                if lora {
                    path = path.join("adapter_model.safetensors");
                }
                let ckpt = Checkpoint::open(&path).unwrap();
                ckpt.keys()
                    .into_iter()
                    .map(|k| {
                        (
                            k.clone(),
                            ckpt.float_data(&k).unwrap().to_vec::<f32>().unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let (want, got) = (
                weights(&format!("{kind}_one_{world}")),
                weights(&format!("{kind}_many_{world}")),
            );
            assert_eq!(got.len(), want.len());
            for ((key, g), (_, w)) in got.iter().zip(&want) {
                // Relative to the tensor's scale.
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-5 * scale,
                    "{kind} {key}, {world} ranks: max diff {diff}, scale {scale}"
                );
            }
        }
    }
}
