//! `xtuner train` end to end on the tiny InternLM2 fixture: training, a resumed run
//! that reproduces the uninterrupted one exactly, export to PEFT and merge, and the
//! errors of bad configs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{failed, fixtures, losses, ok, xtuner};

/// A run directory with a config training LoRA on the fixture model.
fn setup(lora: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Value> = (0..24)
        .map(|i| serde_json::json!({"instruction": format!("Say {i}."), "input": "", "output": format!("{i} {i} {i}")}))
        .collect();
    fs::write(
        dir.path().join("data.json"),
        serde_json::to_string(&records).unwrap(),
    )
    .unwrap();
    let model = fixtures().join("internlm2-tiny");
    let lora = if lora {
        "[lora]\nr = 4\nalpha = 8\ndropout = 0.1\n"
    } else {
        ""
    };
    fs::write(
        dir.path().join("run.toml"),
        format!(
            "[model]\npath = {:?}\n[data]\nfiles = [\"data.json\"]\nformat = \"alpaca\"\nmax_length = 48\n\
             [template]\nname = \"internlm2_chat\"\n{lora}[optimizer]\nlr = 1e-3\n\
             [train]\nbatch_size = 2\naccumulative_counts = 2\nmax_iters = 8\n[checkpoint]\nsave_steps = 4\nsave_total_limit = 3\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    dir
}

#[test]
fn lora_training_resumes_exactly_and_exports() {
    let dir = setup(true);
    let d = dir.path();
    ok(&xtuner(&["train", "run.toml"], d));
    let work = d.join("work_dirs/run");
    let full = losses(&work);
    assert_eq!(
        full.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![2, 4, 6, 8]
    );
    assert!(
        work.join("iter_4/adapter_model.safetensors").is_file()
            && work.join("iter_8/optimizer.bin").is_file()
    );
    assert!(work.join("loss_curve.png").is_file());

    // A run stopped after iteration 4 (as if killed) and resumed gives the same losses.
    let resumed = d.join("resumed");
    fs::create_dir_all(&resumed).unwrap();
    let status = Command::new("cp")
        .args([
            "-r",
            work.join("iter_4").to_str().unwrap(),
            resumed.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    ok(&xtuner(
        &["train", "run.toml", "--work-dir", "resumed", "--resume"],
        d,
    ));
    assert_eq!(
        losses(&resumed),
        full[2..].to_vec(),
        "resumed losses equal the uninterrupted run's, exactly"
    );
    // Both runs' curves on one chart.
    assert!(work.join("loss_curve.svg").is_file() && resumed.join("loss_curve.png").is_file());
    let out = ok(&xtuner(
        &["plot", "work_dirs/run", "resumed", "--out", "both.svg"],
        d,
    ));
    assert_eq!(out.trim(), "both.svg");
    let svg = fs::read_to_string(d.join("both.svg")).unwrap();
    assert!(svg.contains("resumed") && svg.contains("run") && svg.contains("learning rate"));

    // Export: a PEFT adapter that our loader reads back; merge it into the base.
    ok(&xtuner(
        &[
            "convert",
            "pth_to_hf",
            "run.toml",
            work.join("iter_8").to_str().unwrap(),
            "hf",
            "--fp32",
        ],
        d,
    ));
    let config: Value =
        serde_json::from_str(&fs::read_to_string(d.join("hf/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].as_u64(), config["peft_type"].as_str()),
        (Some(4), Some("LORA"))
    );
    // transformers' LLaVA layout is for LLaVA runs only.
    let err = failed(
        &xtuner(
            &[
                "convert",
                "pth_to_hf",
                "run.toml",
                work.join("iter_8").to_str().unwrap(),
                "hf_llava",
                "--save-format",
                "huggingface",
            ],
            d,
        ),
        2,
    );
    assert!(err.contains("LLaVA layouts"), "{err}");
    assert!(!d.join("hf_llava").exists());
    let model = fixtures().join("internlm2-tiny");
    let model = model.to_str().unwrap();
    ok(&xtuner(
        &["convert", "merge", model, "hf", "merged", "--fp32"],
        d,
    ));
    assert!(
        d.join("merged/model.safetensors").is_file() && d.join("merged/tokenizer.json").is_file()
    );
    // The merged model and the adapter applied at load answer alike (greedy).
    let with_adapter = ok(&xtuner(
        &[
            "chat",
            model,
            "--adapter",
            "hf",
            "--prompt",
            "Say 3.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "--no-streamer",
        ],
        d,
    ));
    let merged = ok(&xtuner(
        &[
            "chat",
            "merged",
            "--prompt",
            "Say 3.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "--no-streamer",
        ],
        d,
    ));
    assert_eq!(with_adapter, merged);
    // Evaluation runs on the same pipeline.
    let out = ok(&xtuner(
        &[
            "eval",
            model,
            "--adapter",
            "hf",
            "--data",
            "data.json",
            "--template",
            "internlm2_chat",
        ],
        d,
    ));
    assert!(out.contains("perplexity"), "{out}");
}

/// A run killed with SIGKILL as soon as its first checkpoint lands, then resumed with
/// `--resume` (auto), logs the same loss at every iteration as a run never stopped.
#[test]
fn a_killed_run_resumes_to_the_same_losses() {
    let dir = setup(true);
    let d = dir.path();
    let opts = [
        "--cfg-options",
        "train.max_iters=48",
        "checkpoint.save_steps=4",
    ];
    let mut args = vec!["train", "run.toml", "--work-dir", "whole"];
    args.extend(opts);
    ok(&xtuner(&args, d));
    let whole: std::collections::BTreeMap<u64, f64> =
        losses(&d.join("whole")).into_iter().collect();
    assert_eq!(whole.len(), 24);

    let killed = d.join("killed");
    let mut args = vec!["train", "run.toml", "--work-dir", "killed"];
    args.extend(opts);
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args(&args)
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !killed.join("last_checkpoint").is_file() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint written");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("iter_48").exists(),
        "the run was killed before its end"
    );

    let mut args = vec!["train", "run.toml", "--work-dir", "killed", "--resume"];
    args.extend(opts);
    ok(&xtuner(&args, d));
    let logged = losses(&killed);
    assert_eq!(logged.last().map(|(i, _)| *i), Some(48));
    for (iter, loss) in logged {
        assert_eq!(Some(&loss), whole.get(&iter), "iteration {iter}");
    }
}

#[test]
fn full_fine_tune_exports_a_model_that_loads() {
    let dir = setup(false);
    let d = dir.path();
    ok(&xtuner(
        &[
            "train",
            "run.toml",
            "--cfg-options",
            "train.max_iters=4",
            "optimizer.lr=1e-4",
        ],
        d,
    ));
    let ckpt = d.join("work_dirs/run/iter_4");
    assert!(ckpt.join("model.safetensors").is_file());
    ok(&xtuner(
        &[
            "convert",
            "pth_to_hf",
            "run.toml",
            ckpt.to_str().unwrap(),
            "hf",
            "--cfg-options",
            "train.max_iters=4",
            "optimizer.lr=1e-4",
        ],
        d,
    ));
    ok(&xtuner(
        &[
            "chat",
            "hf",
            "--prompt",
            "Say 1.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ],
        d,
    ));
}

#[test]
fn bad_training_setups_are_clear_errors() {
    let dir = setup(true);
    let d = dir.path();
    let err = failed(
        &xtuner(
            &[
                "train",
                "run.toml",
                "--cfg-options",
                "model.path=\"nowhere\"",
            ],
            d,
        ),
        1,
    );
    assert!(err.contains("nowhere"), "{err}");
    let err = failed(
        &xtuner(
            &[
                "train",
                "run.toml",
                "--cfg-options",
                "lora.target_modules=[\"q_proj\"]",
            ],
            d,
        ),
        2,
    );
    assert!(err.contains("q_proj") && err.contains("wqkv"), "{err}");
    // A checkpoint of another config cannot be resumed.
    ok(&xtuner(
        &["train", "run.toml", "--cfg-options", "train.max_iters=4"],
        d,
    ));
    let other = d.join("work_dirs/run/iter_4");
    let err = failed(
        &xtuner(
            &[
                "train",
                "run.toml",
                "--cfg-options",
                "lora.r=8",
                "--resume",
                other.to_str().unwrap(),
            ],
            d,
        ),
        2,
    );
    assert!(err.contains("another config"), "{err}");
    // A checkpoint that lost its AdamW moments does not resume from placeholders. A
    // damaged checkpoint is a failure of the run's files, not a config mistake: exit 1.
    fs::remove_file(other.join("optimizer_moments.safetensors")).unwrap();
    let err = failed(
        &xtuner(
            &["train", "run.toml", "--resume", other.to_str().unwrap()],
            d,
        ),
        1,
    );
    assert!(
        err.contains("optimizer_moments.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn merge_matches_peft() {
    use xtuner_model::checkpoint::Checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("internlm2-tiny");
    let out = dir.path().join("merged");
    ok(&xtuner(
        &[
            "convert",
            "merge",
            base.to_str().unwrap(),
            base.join("lora").to_str().unwrap(),
            out.to_str().unwrap(),
            "--fp32",
            "--max-shard-size",
            "40KB",
        ],
        dir.path(),
    ));
    assert!(
        out.join("model.safetensors.index.json").is_file(),
        "sharded at 40KB"
    );
    let ours = Checkpoint::open(&out).unwrap();
    let peft = Checkpoint::open(&base.join("lora/merged.safetensors")).unwrap();
    assert_eq!(ours.keys(), peft.keys());
    for key in peft.keys() {
        let (a, b) = (
            ours.float_data(&key).unwrap().to_vec::<f32>().unwrap(),
            peft.float_data(&key).unwrap().to_vec::<f32>().unwrap(),
        );
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{key}: {diff}");
    }
}

#[test]
fn qlora_trains_on_an_nf4_base() {
    let dir = setup(true);
    let d = dir.path();
    let config = fs::read_to_string(d.join("run.toml")).unwrap()
        + "[quantization]\nbits = 4\ndouble_quant = true\n";
    fs::write(d.join("qlora.toml"), config).unwrap();
    ok(&xtuner(
        &["train", "qlora.toml", "--cfg-options", "optimizer.lr=5e-3"],
        d,
    ));
    let losses = losses(&d.join("work_dirs/qlora"));
    assert_eq!(losses.len(), 4);
    assert!(
        losses[3].1 < losses[0].1,
        "the adapter learns on the 4-bit base: {losses:?}"
    );
    // The adapter exports like any LoRA adapter.
    let ckpt = d.join("work_dirs/qlora/iter_8");
    ok(&xtuner(
        &[
            "convert",
            "pth_to_hf",
            "qlora.toml",
            ckpt.to_str().unwrap(),
            "hf",
        ],
        d,
    ));
    assert!(d.join("hf/adapter_model.safetensors").is_file());
}

#[test]
fn a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = setup(true);
    let d = dir.path();
    let err = failed(
        &xtuner(
            &[
                "train",
                "run.toml",
                "--cfg-options",
                "optimizer.lr=1e30",
                "optimizer.max_norm=1e30",
                "checkpoint.save_steps=2",
            ],
            d,
        ),
        1,
    );
    assert!(
        err.contains("the loss became") && err.contains("iter_2"),
        "{err}"
    );
    let work = d.join("work_dirs/run");
    assert!(work.join("iter_2/adapter_model.safetensors").is_file());
    let last = fs::read_to_string(work.join("last_checkpoint")).unwrap();
    assert!(last.ends_with("iter_2"), "{last}");
}

/// The README's demo flow, shortened: train the preset model, export the adapter, and
/// chat with it on the saved random-init base; the merged model answers alike.
#[test]
fn demo_flow_on_a_preset_base() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let cache = dir.path().join("cache");
    let opts = [
        "--cfg-options",
        "train.max_iters=2",
        "train.batch_size=1",
        "checkpoint.save_steps=2",
        "evaluation.inputs=[]",
        &format!("data.cache_dir={:?}", cache.to_str().unwrap()),
    ];
    let mut args = vec![
        "train",
        "configs/demo_tiny_lora.toml",
        "--work-dir",
        work.to_str().unwrap(),
    ];
    args.extend(opts.iter().map(|s| -> &str { s }));
    ok(&xtuner(&args, &repo));
    let base = work.join("base_model");
    assert!(
        base.join("config.json").is_file()
            && base.join("model.safetensors").is_file()
            && base.join("tokenizer.json").is_file()
    );
    let adapter = dir.path().join("adapter");
    let mut args = vec![
        "convert",
        "pth_to_hf",
        "configs/demo_tiny_lora.toml",
        work.to_str().unwrap(),
        adapter.to_str().unwrap(),
    ];
    let ckpt = work.join("iter_2");
    args[3] = ckpt.to_str().unwrap();
    args.extend(opts.iter().map(|s| -> &str { s }));
    ok(&xtuner(&args, &repo));
    let chat = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "chat",
            model.to_str().unwrap(),
            "--prompt-template",
            "internlm2_chat",
            "--prompt",
            "Is this review positive or negative? The soup was clean and the music was clean.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--no-streamer",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        ok(&xtuner(&args, &repo))
    };
    let merged = dir.path().join("merged");
    ok(&xtuner(
        &[
            "convert",
            "merge",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            merged.to_str().unwrap(),
            "--fp32",
        ],
        &repo,
    ));
    assert_eq!(chat(&base, Some(&adapter)), chat(&merged, None));
}

/// The demo learns its task: after 150 steps (0.4 of the shipped run) the adapter
/// answers the held-out reviews of `configs/demo/eval.jsonl`, which no training record
/// repeats, with a loss far below chance (ln 2 per label token).
#[test]
fn demo_learns_held_out_reviews() {
    demo_learns(1);
}

/// The same on two data-parallel ranks (`NPROC_PER_NODE=2`, threads of one process):
/// 150 steps of twice the batch answer the held-out reviews as well.
#[test]
fn demo_learns_held_out_reviews_on_two_ranks() {
    demo_learns(2);
}

fn demo_learns(ranks: usize) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let cache = format!(
        "data.cache_dir={:?}",
        dir.path().join("cache").to_str().unwrap()
    );
    let opts = [
        "--cfg-options",
        "train.max_iters=150",
        "checkpoint.save_steps=150",
        "evaluation.inputs=[]",
        &cache,
    ];
    let mut args = vec![
        "train",
        "configs/demo_tiny_lora.toml",
        "--work-dir",
        work.to_str().unwrap(),
    ];
    args.extend(opts);
    let trained = std::process::Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args(&args)
        .env("NPROC_PER_NODE", ranks.to_string())
        .current_dir(&repo)
        .output()
        .unwrap();
    ok(&trained);
    let adapter = dir.path().join("adapter");
    let mut args = vec!["convert", "pth_to_hf", "configs/demo_tiny_lora.toml"];
    let ckpt = work.join("iter_150");
    args.extend([ckpt.to_str().unwrap(), adapter.to_str().unwrap()]);
    args.extend(opts);
    ok(&xtuner(&args, &repo));
    let base = work.join("base_model");
    let eval = |adapter: Option<&Path>| {
        let mut args = vec![
            "eval",
            base.to_str().unwrap(),
            "--data",
            "configs/demo/eval.jsonl",
            "--template",
            "internlm2_chat",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let out = ok(&xtuner(&args, &repo));
        let loss = out
            .split("loss ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap();
        loss.trim().parse::<f64>().unwrap()
    };
    let (before, after) = (eval(None), eval(Some(&adapter)));
    assert!(before > 3.0, "random init: {before}");
    assert!(
        after < 0.1,
        "held-out loss after training: {after} (chance is 0.35)"
    );
    for (prompt, label) in [
        (
            "Is this review positive or negative? The soup was clean and the music was clean.",
            "positive",
        ),
        (
            "Is this review positive or negative? The soup was boring.",
            "negative",
        ),
    ] {
        let args = [
            "chat",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt-template",
            "internlm2_chat",
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--no-streamer",
        ];
        let answer = ok(&xtuner(&args, &repo));
        assert_eq!(answer.trim(), label, "{prompt}");
    }
}

/// `xtuner bench` times real training steps and reports them as one JSON line.
#[test]
fn bench_reports_a_training_step() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "--preset",
        "internlm2-tiny",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--mode",
        "qlora",
        "--lora-r",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
    ];
    let out = ok(&xtuner(&args, dir.path()));
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["bench"]["mode"], "qlora");
    assert_eq!(report["losses"].as_array().unwrap().len(), 3);
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);
    let err = failed(
        &xtuner(&["bench", "--preset", "internlm2-huge"], dir.path()),
        2,
    );
    assert!(
        err.contains("internlm2-huge") && err.contains("internlm2-tiny"),
        "{err}"
    );
}

/// The LLaVA demo as README runs it, shortened: stage 1 trains the projector on
/// captions, stage 2 starts from it and trains LoRA on the LLM and the vision tower on
/// questions, `convert pth_to_hf` writes XTuner's layout, and `xtuner chat --image`
/// names the colour of held-out pictures (no training record shows them).
#[test]
fn llava_demo_pretrains_finetunes_and_answers_about_held_out_pictures() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let (pre, fine, out) = (
        dir.path().join("pre"),
        dir.path().join("fine"),
        dir.path().join("llava"),
    );
    let cache = format!(
        "data.cache_dir={:?}",
        dir.path().join("cache").to_str().unwrap()
    );
    let from = format!("llava.pretrained_projector={:?}", pre.to_str().unwrap());
    let first_last = |work: &Path| {
        let l = losses(work);
        (l.first().unwrap().1, l.last().unwrap().1)
    };
    let pre_opts = [
        "--cfg-options",
        "train.max_iters=40",
        "checkpoint.save_steps=40",
        "evaluation.inputs=[]",
        &cache,
    ];
    let mut args = vec![
        "train",
        "configs/demo_llava_pretrain.toml",
        "--work-dir",
        pre.to_str().unwrap(),
    ];
    args.extend(pre_opts);
    ok(&xtuner(&args, &repo));
    let (first, last) = first_last(&pre);
    assert!(last < first - 1.5, "pretrain loss {first} -> {last}");

    let fine_opts = [
        "--cfg-options",
        "train.max_iters=120",
        "checkpoint.save_steps=120",
        "evaluation.inputs=[]",
        &cache,
        &from,
    ];
    let mut args = vec![
        "train",
        "configs/demo_llava_finetune.toml",
        "--work-dir",
        fine.to_str().unwrap(),
    ];
    args.extend(fine_opts);
    ok(&xtuner(&args, &repo));
    let (first, last) = first_last(&fine);
    assert!(last < first / 2.0, "finetune loss {first} -> {last}");

    let ckpt = fine.join("iter_120");
    let mut args = vec![
        "convert",
        "pth_to_hf",
        "configs/demo_llava_finetune.toml",
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
        "--fp32",
    ];
    args.extend(fine_opts);
    ok(&xtuner(&args, &repo));
    for file in [
        "projector/config.json",
        "projector/model.safetensors",
        "llm_adapter/adapter_model.safetensors",
        "visual_encoder_adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }

    // transformers' layout and the original LLaVA's, from the same checkpoint.
    let hf = dir.path().join("llava_hf");
    let official = dir.path().join("llava_official");
    for (format, to) in [("huggingface", &hf), ("official", &official)] {
        let mut args = vec![
            "convert",
            "pth_to_hf",
            "configs/demo_llava_finetune.toml",
            ckpt.to_str().unwrap(),
            to.to_str().unwrap(),
            "--fp32",
            "--save-format",
            format,
        ];
        args.extend(fine_opts);
        ok(&xtuner(&args, &repo));
    }
    let base = fine.join("base_model");
    llava_exports_give_the_same_logits(&repo, &base, &out, &hf, &official);

    let eval: Vec<Value> = serde_json::from_str(
        &fs::read_to_string(repo.join("configs/demo_llava/eval.json")).unwrap(),
    )
    .unwrap();
    let mut right = 0;
    for (index, record) in eval.iter().enumerate() {
        let image = repo
            .join("configs/demo_llava")
            .join(record["image"].as_str().unwrap());
        let args = [
            "chat",
            base.to_str().unwrap(),
            "--llava",
            out.to_str().unwrap(),
            "--visual-encoder",
            "configs/demo_llava/clip",
            "--image",
            image.to_str().unwrap(),
            "--prompt-template",
            "internlm2_chat",
            "--prompt",
            "What colour is the shape?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--no-streamer",
        ];
        let answer = ok(&xtuner(&args, &repo));
        right +=
            usize::from(answer.trim() == record["conversations"][1]["value"].as_str().unwrap());
        // The transformers export is a chat model of its own, with the same answers.
        if index < 4 {
            let mut args = args.to_vec();
            args.splice(1..6, [hf.to_str().unwrap()]);
            assert_eq!(ok(&xtuner(&args, &repo)), answer, "{}", image.display());
        }
    }
    assert!(
        right >= 20,
        "{right} of {} held-out colours right (chance: a quarter)",
        eval.len()
    );
}

/// The transformers export (`--save-format huggingface`) read back by our loader gives
/// the logits of the XTuner-layout export (base LLM, its adapter, the tower and its
/// adapter, the projector) on an image prompt, over the original vocabulary; its
/// layout and config are transformers' `LlavaForConditionalGeneration`'s, with
/// `<image>` and `<pad>` in the tokenizer and the embeddings grown to a multiple of 64.
/// The official export has the original LLaVA's keys and settings.
fn llava_exports_give_the_same_logits(
    repo: &Path,
    base: &Path,
    xtuner_dir: &Path,
    hf: &Path,
    official: &Path,
) {
    use burn::tensor::{Int, Tensor, TensorData};
    use xtuner_engine::lora;
    use xtuner_model::checkpoint::Checkpoint;
    use xtuner_model::checkpoint::peft::PeftAdapter;
    use xtuner_model::clip_vit::ClipVisionTower;
    use xtuner_model::decoder::{Decoder, DecoderInput};
    use xtuner_model::image::ImageProcessor;
    use xtuner_model::llava::Llava;
    use xtuner_model::projector::Projector;
    type B = burn::backend::NdArray<f32>;
    let device = Default::default();

    let adapter = PeftAdapter::open(&xtuner_dir.join("llm_adapter")).unwrap();
    let (llm, llm_config) = Decoder::<B>::load(base, Some(&adapter), &device).unwrap();
    let (tower, _) =
        ClipVisionTower::<B>::load(&repo.join("configs/demo_llava/clip"), &device).unwrap();
    let tower_adapter = PeftAdapter::open(&xtuner_dir.join("visual_encoder_adapter")).unwrap();
    let tower = lora::merge(
        lora::attach_peft(tower, &(), &tower_adapter, 0.0, &device).unwrap(),
        &(),
    );
    let (projector, _) =
        Projector::<B>::load(&xtuner_dir.join("projector"), None, &device).unwrap();
    let before = Llava {
        llm,
        visual_encoder: tower,
        projector,
    };
    let (after, config) = Llava::<B>::load_hf(hf, &device).unwrap();

    let processor = ImageProcessor::from_file(
        repo.join("configs/demo_llava/clip/preprocessor_config.json"),
        true,
    )
    .unwrap();
    let pixels = processor
        .preprocess_file::<B>(
            &repo.join("configs/demo_llava/images/eval_0003.png"),
            &device,
        )
        .unwrap()
        .unsqueeze::<4>();
    let ids = [1i64, 3, 20, 30, -200, 40, 50, 4, 3, 60];
    let logits = |model: &Llava<B>| -> Vec<f32> {
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
        let spliced = model
            .prepare_inputs(input, None, None, pixels.clone(), config.select_layer)
            .unwrap();
        let [_, t, _] = spliced.inputs_embeds.dims();
        let logits = model.llm.forward_embeds(
            spliced.inputs_embeds,
            &DecoderInput::causal(1, t, &device),
            None,
        );
        let [_, _, v] = logits.dims();
        logits
            .slice([0..1, 0..t, 0..v.min(llm_config.vocab_size)])
            .into_data()
            .to_vec()
            .unwrap()
    };
    let (want, got) = (logits(&before), logits(&after));
    assert_eq!(want.len(), got.len());
    let worst = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "logits differ by up to {worst}");

    // The layout and settings transformers reads.
    let json = |path: &Path| -> Value {
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
    };
    let c = json(&hf.join("config.json"));
    assert_eq!(c["architectures"][0], "LlavaForConditionalGeneration");
    assert_eq!(c["text_config"]["model_type"], "llama");
    assert_eq!(c["vision_config"]["model_type"], "clip_vision_model");
    assert_eq!(c["vision_feature_layer"], -2);
    let vocab = c["text_config"]["vocab_size"].as_u64().unwrap() as usize;
    assert!(
        vocab > llm_config.vocab_size && vocab.is_multiple_of(64),
        "{vocab}"
    );
    let tokenizer = xtuner_dataset::Tokenizer::from_path(hf).unwrap();
    assert_eq!(
        tokenizer.token_to_id("<image>").map(u64::from),
        c["image_token_index"].as_u64()
    );
    assert_eq!(
        tokenizer.token_to_id("<pad>").map(u64::from),
        c["pad_token_id"].as_u64()
    );
    assert_eq!(
        json(&hf.join("tokenizer_config.json"))["pad_token"],
        "<pad>"
    );
    assert_eq!(json(&hf.join("processor_config.json"))["patch_size"], 8);
    let keys = Checkpoint::open(hf).unwrap().keys();
    for key in [
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.layers.0.mlp.gate_proj.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
    ] {
        assert!(keys.iter().any(|k| k == key), "no {key}");
    }
    let c = json(&official.join("config.json"));
    assert_eq!(c["architectures"][0], "LlavaLlamaForCausalLM");
    assert_eq!(c["mm_projector_type"], "mlp2x_gelu");
    assert_eq!(c["mm_vision_select_feature"], "patch");
    let keys = Checkpoint::open(official).unwrap().keys();
    for key in [
        "model.embed_tokens.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.weight",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
    ] {
        assert!(keys.iter().any(|k| k == key), "no {key}");
    }
}

/// A LLaVA record whose image is missing stops the run before the first step, naming
/// the file; with `data.skip_bad_records` the record is skipped and training goes on.
#[test]
fn a_missing_llava_image_is_an_error_or_a_skipped_record() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    let record = |image: &str| serde_json::json!({"image": image, "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": "a red circle"}]});
    let records = [
        record("images/train_0000.png"),
        record("images/no_such_picture.png"),
    ];
    fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let work = dir.path().join("work");
    let files = format!("data.files=[{:?}]", data.to_str().unwrap());
    let cache = format!(
        "data.cache_dir={:?}",
        dir.path().join("cache").to_str().unwrap()
    );
    let args = [
        "train",
        "configs/demo_llava_pretrain.toml",
        "--work-dir",
        work.to_str().unwrap(),
        "--cfg-options",
        &files,
        &cache,
        "train.max_iters=1",
        "evaluation.inputs=[]",
    ];
    let err = failed(&xtuner(&args, &repo), 1);
    assert!(
        err.contains("no_such_picture.png") && err.contains("skip_bad_records"),
        "{err}"
    );
    assert!(
        err.contains("data.json:1"),
        "the error names the record: {err}"
    );
    assert!(!work.join("iter_1").exists());
    let mut skipping = args.to_vec();
    skipping.push("data.skip_bad_records=true");
    ok(&xtuner(&skipping, &repo));
    assert!(work.join("iter_1/projector/model.safetensors").is_file());
}

/// A LLaVA run resumed from a checkpoint continues exactly as the uninterrupted one
/// (projector, adapters, optimizer state and data order all restored).
#[test]
fn a_llava_run_resumes_exactly() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let (pre, work) = (dir.path().join("pre"), dir.path().join("work"));
    let cache = format!(
        "data.cache_dir={:?}",
        dir.path().join("cache").to_str().unwrap()
    );
    let pre_args = [
        "train",
        "configs/demo_llava_pretrain.toml",
        "--work-dir",
        pre.to_str().unwrap(),
        "--cfg-options",
        "train.max_iters=1",
        "evaluation.inputs=[]",
        &cache,
    ];
    ok(&xtuner(&pre_args, &repo));
    let from = format!("llava.pretrained_projector={:?}", pre.to_str().unwrap());
    let opts = [
        "--cfg-options",
        "train.max_iters=4",
        "checkpoint.save_steps=2",
        "checkpoint.save_total_limit=-1",
        "evaluation.inputs=[]",
        &cache,
        &from,
    ];
    let mut args = vec![
        "train",
        "configs/demo_llava_finetune.toml",
        "--work-dir",
        work.to_str().unwrap(),
    ];
    args.extend(opts);
    ok(&xtuner(&args, &repo));
    let uninterrupted = losses(&work);
    assert_eq!(uninterrupted.len(), 4);
    fs::remove_dir_all(work.join("iter_4")).unwrap();
    fs::remove_file(work.join("train_log.jsonl")).unwrap();
    let resume = work.join("iter_2");
    args.extend(["--resume", resume.to_str().unwrap()]);
    ok(&xtuner(&args, &repo));
    assert_eq!(losses(&work), uninterrupted[2..].to_vec());
}

/// TensorBoard's event file beside the JSON log: every record's length and checksums
/// valid, one scalar event per logged step with the same values; `[visualizer]
/// tensorboard = false` writes none.
#[test]
fn the_run_writes_tensorboard_events_equal_to_its_log() {
    use xtuner_engine::run::tensorboard::read_events;
    let dir = setup(true);
    let d = dir.path();
    ok(&xtuner(&["train", "run.toml"], d));
    let work = d.join("work_dirs/run");
    let files: Vec<_> = fs::read_dir(work.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("events.out.tfevents.")
    );
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let steps = common::logged_steps(&work);
    let scalars: Vec<_> = events.iter().filter(|e| e.summary.is_some()).collect();
    assert_eq!(scalars.len(), steps.len());
    for (event, step) in scalars.iter().zip(&steps) {
        assert_eq!(event.step, step["iter"].as_i64().unwrap());
        let values = &event.summary.as_ref().unwrap().value;
        for (tag, key) in [
            ("train/loss", "loss"),
            ("train/lr", "lr"),
            ("train/grad_norm", "grad_norm"),
        ] {
            let v = values
                .iter()
                .find(|v| v.tag == tag)
                .unwrap()
                .simple_value
                .unwrap();
            assert_eq!(
                v,
                step[key].as_f64().unwrap() as f32,
                "{tag} at {}",
                event.step
            );
        }
    }
    ok(&xtuner(
        &[
            "train",
            "run.toml",
            "--work-dir",
            "quiet",
            "--cfg-options",
            "visualizer.tensorboard=false",
        ],
        d,
    ));
    assert!(!d.join("quiet/tensorboard").exists());
}
