//! Data parallel from the CLI: `NPROC_PER_NODE=N xtuner train` on the CPU runs N ranks
//! in one process, each taking every N-th row; their steps must be those of one rank
//! accumulating the same micro-batches. Ranks in separate processes (torchrun's
//! variables, or XTuner's `NNODES`/`NODE_RANK` launcher) meet over the loopback and
//! train as the threads do (losses, gradient norms and final weights to
//! relative 1e-5, a weight tensor's relative to its largest element), for LoRA and full
//! fine-tuning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use xtuner_model::checkpoint::Checkpoint;

mod common;
use common::{fixtures, logged_steps, ok};

/// `xtuner train config` in `dir` with the environment `vars`, started.
fn start(config: &str, vars: &[(&str, String)], dir: &Path) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtuner"));
    command
        .args(["train", config])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in vars {
        command.env(k, v);
    }
    command.spawn().unwrap()
}

/// A free loopback port.
fn port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

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
    logged_steps(work_dir)
        .iter()
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

/// A work dir with the Llama fixture (and the tokenizer) as `model/`, and six records.
fn setup(d: &Path) {
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
}

#[test]
fn ranks_step_as_one_rank_accumulating_their_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
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
                tensors(&d.join(format!("work_dirs/{run}/iter_{iter}")), lora)
            };
            let (want, got) = (
                weights(&format!("{kind}_one_{world}")),
                weights(&format!("{kind}_many_{world}")),
            );
            same_weights(&got, &want, &format!("{kind}, {world} ranks"));
        }
    }
}

/// The trained tensors of checkpoint `dir` (its adapter when `lora`), by name.
fn tensors(dir: &Path, lora: bool) -> Vec<(String, Vec<f32>)> {
    let path = if lora {
        dir.join("adapter_model.safetensors")
    } else {
        dir.to_path_buf()
    };
    let ckpt = Checkpoint::open(&path).unwrap();
    ckpt.keys()
        .into_iter()
        .map(|k| {
            let values = ckpt.float_data(&k).unwrap().to_vec::<f32>().unwrap();
            (k, values)
        })
        .collect()
}

/// Each tensor within relative 1e-5 of its largest element.
fn same_weights(got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for ((key, g), (want_key, w)) in got.iter().zip(want) {
        assert_eq!(key, want_key, "{what}");
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{what} {key}: max diff {diff}, scale {scale}"
        );
    }
}

/// `xtuner train config ARGS...` on `ranks` ranks.
fn train_args(config: &str, ranks: usize, args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args(["train", config])
        .args(args)
        .env("NPROC_PER_NODE", ranks.to_string())
        .current_dir(dir)
        .output()
        .unwrap()
}

/// ZeRO-1, ZeRO-2 and ZeRO-2 with the optimizer offloaded step as one rank accumulating
/// the same micro-batches, for LoRA and full fine-tuning; the checkpoint holds each
/// rank's optimizer shard, resumes on one rank (re-sharded) where one rank that never
/// stopped goes, needs its `--deepspeed` to resume, and exports as any checkpoint.
#[test]
fn zero_stages_step_as_one_rank_and_resume_resharded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    for (lora, kind) in [(true, "lora"), (false, "full")] {
        let one = format!("{kind}_one.toml");
        write_config(d, &one, lora, 2, 8);
        train(&one, 1, d);
        let want_steps = steps(&d.join(format!("work_dirs/{kind}_one")));
        let want = tensors(&d.join(format!("work_dirs/{kind}_one/iter_8")), lora);
        for setting in [
            "deepspeed_zero1",
            "deepspeed_zero2",
            "deepspeed_zero2_offload",
        ] {
            let name = format!("{kind}_{setting}");
            write_config(d, &format!("{name}.toml"), lora, 1, 4);
            let out = train_args(&format!("{name}.toml"), 2, &["--deepspeed", setting], d);
            ok(&out);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("model state per rank (ZeRO-"), "{err}");
            assert!(err.contains("rank 1: model state per rank (ZeRO-"), "{err}");
            let work = d.join(format!("work_dirs/{name}"));
            let got = steps(&work);
            assert_eq!(got.len(), want_steps.len(), "{name}");
            for ((loss, norm), (want_loss, want_norm)) in got.iter().zip(&want_steps) {
                close(*loss, *want_loss, &format!("{name} loss"));
                close(*norm, *want_norm, &format!("{name} grad norm"));
            }
            same_weights(&tensors(&work.join("iter_4"), lora), &want, &name);
            for rank in 0..2 {
                let shard = format!("zero_optimizer_rank_{rank:05}_of_00002.safetensors");
                assert!(work.join("iter_4").join(shard).is_file(), "{name}");
            }
        }
        // Two ZeRO-2 ranks' checkpoint after two steps, resumed by one rank accumulating
        // two micro-batches, ends where the one rank that never stopped ends.
        let name = format!("{kind}_resumed");
        write_config(d, &format!("{name}.toml"), lora, 1, 2);
        let config = format!("{name}.toml");
        ok(&train_args(
            &config,
            2,
            &["--deepspeed", "deepspeed_zero2"],
            d,
        ));
        let resume = [
            "--resume",
            "--cfg-options",
            "train.accumulative_counts=2",
            "train.max_iters=8",
        ];
        let out = train_args(&config, 1, &resume, d);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("sharded by ZeRO"), "{err}");
        let zero2 = [&["--deepspeed", "deepspeed_zero2"][..], &resume].concat();
        ok(&train_args(&config, 1, &zero2, d));
        let work = d.join(format!("work_dirs/{name}"));
        same_weights(&tensors(&work.join("iter_8"), lora), &want, &name);
        let out = Command::new(env!("CARGO_BIN_EXE_xtuner"))
            .args(["convert", "pth_to_hf", &format!("{name}.toml")])
            .arg(work.join("iter_8"))
            .arg(d.join(format!("{name}_hf")))
            .arg("--fp32")
            .current_dir(d)
            .output()
            .unwrap();
        ok(&out);
        let exported = if lora {
            tensors(&d.join(format!("{name}_hf")), true)
        } else {
            tensors(&d.join(format!("{name}_hf/model.safetensors")), false)
        };
        assert_eq!(exported.len(), want.len(), "{name}");
    }
}

#[test]
fn ranks_in_separate_processes_train_as_threads_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    write_config(d, "threads.toml", true, 1, 3);
    train("threads.toml", 2, d);
    let want = steps(&d.join("work_dirs/threads"));

    // torchrun's variables: each process one rank.
    write_config(d, "torchrun.toml", true, 1, 3);
    let port = port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let vars = [
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
            ];
            start("torchrun.toml", &vars, d)
        })
        .collect();
    for child in ranks {
        ok(&child.wait_with_output().unwrap());
    }
    assert_eq!(steps(&d.join("work_dirs/torchrun")), want);

    // XTuner's launcher on two "nodes" of one rank each.
    write_config(d, "nodes.toml", true, 1, 3);
    let port = self::port();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let vars = [
                ("NPROC_PER_NODE", "1".to_string()),
                ("NNODES", "2".to_string()),
                ("NODE_RANK", node.to_string()),
                ("ADDR", "127.0.0.1".to_string()),
                ("PORT", port.clone()),
            ];
            start("nodes.toml", &vars, d)
        })
        .collect();
    for child in nodes {
        ok(&child.wait_with_output().unwrap());
    }
    assert_eq!(steps(&d.join("work_dirs/nodes")), want);
}

#[test]
fn a_rank_that_never_comes_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    write_config(d, "alone.toml", true, 1, 3);
    let vars = [
        ("RANK", "0".to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port()),
        ("XTUNER_DIST_TIMEOUT", "1".to_string()),
    ];
    let out = start("alone.toml", &vars, d).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank(s) 1 of 2 did not join"), "{err}");
}

#[test]
fn a_checkpoint_resumes_with_its_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    write_config(d, "two.toml", true, 1, 2);
    train("two.toml", 2, d);
    // One rank of one micro-batch a step cannot continue two ranks' global batch.
    let out = Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args([
            "train",
            "two.toml",
            "--resume",
            "--cfg-options",
            "train.max_iters=3",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ranks × accumulative_counts = 2"), "{err}");
    // A checkpoint of plain data parallel does not resume as ZeRO.
    let args = ["--resume", "--deepspeed", "deepspeed_zero2"];
    let args = [&args[..], &["--cfg-options", "train.max_iters=3"]].concat();
    let out = train_args("two.toml", 2, &args, d);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("written without ZeRO"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args([
            "train",
            "two.toml",
            "--resume",
            "--cfg-options",
            "train.max_iters=3",
        ])
        .env("NPROC_PER_NODE", "2")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(ok(&out).contains("after 3 iterations"));
}

#[test]
fn bench_dry_run_prints_the_state_of_each_stage() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args(["bench", "--preset", "internlm2-1.8b", "--mode", "full"])
        .args(["--dry-run", "--nproc", "8"])
        .current_dir(dir.path())
        .output()
        .unwrap());
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{out}");
    for (row, stage) in rows
        .iter()
        .zip(["data parallel", "ZeRO-1", "ZeRO-2", "ZeRO-3"])
    {
        assert!(row.trim_start().starts_with(stage), "{out}");
    }
    // 1.9B parameters in full: 16 bytes each with data parallel.
    assert!(rows[0].contains("28.") && rows[0].contains("GiB"), "{out}");
}

/// LLaVA's pretraining stage through the same loop: two ranks step as one rank
/// accumulating their micro-batches.
#[test]
fn llava_ranks_step_as_one_rank() {
    let repo = common::repo();
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, ranks: usize, accumulative_counts: usize, iters: usize| {
        let work = dir.path().join(name);
        let cache = format!("data.cache_dir={:?}", dir.path().join("cache"));
        let out = Command::new(env!("CARGO_BIN_EXE_xtuner"))
            .args(["train", "configs/demo_llava_pretrain.toml", "--work-dir"])
            .arg(&work)
            .args([
                "--cfg-options",
                "schedule.warmup_ratio=0.0",
                "schedule.eta_min=1e-3",
            ])
            .args(["evaluation.inputs=[]", "checkpoint.save_steps=1000", &cache])
            .arg(format!("train.max_iters={iters}"))
            .arg(format!("train.accumulative_counts={accumulative_counts}"))
            .env("NPROC_PER_NODE", ranks.to_string())
            .current_dir(&repo)
            .output()
            .unwrap();
        ok(&out);
        steps(&work)
    };
    let want = run("one", 1, 2, 4);
    let got = run("two", 2, 1, 2);
    assert_eq!(got.len(), 2);
    assert_eq!(got.len(), want.len());
    for ((loss, norm), (want_loss, want_norm)) in got.iter().zip(&want) {
        close(*loss, *want_loss, "LLaVA loss");
        close(*norm, *want_norm, "LLaVA grad norm");
    }
}

/// `xtuner collective-check` (what tools/gpu_check.sh runs with NCCL): one rank alone,
/// and two processes meeting over the loopback, every collective as expected.
#[test]
fn collective_check_passes_alone_and_in_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let check = |vars: &[(&str, String)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_xtuner"));
        command
            .args(["collective-check", "--len", "1001"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in vars {
            command.env(k, v);
        }
        command.spawn().unwrap()
    };
    let alone = ok(&check(&[]).wait_with_output().unwrap());
    assert!(alone.contains("1 rank(s) through host"), "{alone}");
    let port = port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            check(&[
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
            ])
        })
        .collect();
    let outputs: Vec<String> = ranks
        .into_iter()
        .map(|c| ok(&c.wait_with_output().unwrap()))
        .collect();
    for op in [
        "all_reduce_sum: ok",
        "all_reduce_sum_f64: ok",
        "reduce_scatter_sum: ok",
        "all_gather: ok",
        "broadcast: ok",
        "barrier: ok",
    ] {
        assert!(outputs[0].contains(op), "{}", outputs[0]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .arg("collective-check")
        .env("XTUNER_COLLECTIVE", "mpi")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("XTUNER_COLLECTIVE must be"), "{err}");
}
