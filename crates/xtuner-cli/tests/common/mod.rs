//! What the CLI's integration tests share: the fixtures' place and running the binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The shared golden fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

/// The repository root (the demo configs live under it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the `xtuner` binary with `args` in `cwd`.
pub fn xtuner(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtuner"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Its stdout, after checking that it succeeded.
#[track_caller]
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Its stderr, after checking that it exited with `code` and did not panic.
#[track_caller]
pub fn failed(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The records of a JSON-lines file.
pub fn jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `step` events of a run's log (`train_log.jsonl` in its work dir).
pub fn logged_steps(work_dir: &Path) -> Vec<Value> {
    jsonl(&work_dir.join("train_log.jsonl"))
        .into_iter()
        .filter(|v| v["event"] == "step")
        .collect()
}

/// Each logged step's iteration and loss.
pub fn losses(work_dir: &Path) -> Vec<(u64, f64)> {
    logged_steps(work_dir)
        .iter()
        .map(|v| (v["iter"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// `llama-tiny` beside the preference tokenizer (whose `chat_template` is
/// InternLM2-chat's), as `root/model`.
pub fn llama_with_chat_template(root: &Path) -> PathBuf {
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for (dir, file) in [
        ("llama-tiny", "config.json"),
        ("llama-tiny", "model.safetensors"),
        ("preference/tokenizer-internlm2", "tokenizer.json"),
        ("preference/tokenizer-internlm2", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixtures().join(dir).join(file), model.join(file)).unwrap();
    }
    model
}

/// A copy of `checkpoint` in a new work dir `root/name`, to resume from (as if the run
/// had been killed after it).
pub fn work_dir_from(root: &Path, name: &str, checkpoint: &Path) -> PathBuf {
    let work = root.join(name);
    std::fs::create_dir_all(&work).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-r", checkpoint.to_str().unwrap(), work.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    work
}
