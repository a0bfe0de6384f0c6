//! `cargo xtask bench train`: our training step against PyTorch + transformers + PEFT
//! on the same GPU or the same CPU, side by side.
//!
//! For each mode (full, LoRA, QLoRA) it runs `xtuner bench --device D` and
//! `tools/bench_train.py --device D` with the same shape (a model of random weights, no
//! download), packed rows, batch and rank, each in its own process. Both sides run
//! without and with activation checkpointing. It prints a markdown table with the
//! ratios (against the reference with the same checkpointing) and writes the raw JSON
//! lines next to it.
//!
//! - `--device cuda` (the default): the release binary built with `--features cuda`,
//!   InternLM2-1.8B's shape, the card's used memory sampled with `nvidia-smi` every
//!   100 ms (peak minus the level before the process started).
//! - `--device cpu`: `internlm2-small`'s shape (hidden 512, 4 layers) with a vocabulary
//!   of 1,000, 4 × 256 tokens, LoRA r 16, both sides on `--threads` threads (all cores
//!   by default) in f32, and each process's peak resident memory (`VmHWM`, sampled
//!   every 20 ms). Without PyTorch (the Python cannot import torch) ours runs alone.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

/// Options of `cargo xtask bench train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Where both sides run: cuda or cpu.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// CPU threads of both sides (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Modes to run, comma-separated: full, lora, qlora (on the CPU: lora,full).
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Our model shape (`xtuner bench --preset`; internlm2-1.8b on a GPU,
    /// internlm2-small on the CPU).
    #[arg(long)]
    preset: Option<String>,
    /// Vocabulary size (the preset's: 92,544; 1,000 on the CPU).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Tokens per packed row (2,048; 256 on the CPU).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Rows per step (1; 4 on the CPU).
    #[arg(long)]
    batch_size: Option<usize>,
    /// LoRA rank (64; 16 on the CPU).
    #[arg(long)]
    lora_r: Option<usize>,
    /// Untimed steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// The `xtuner` binary (for a GPU, built with `--features cuda`).
    #[arg(long, default_value = "target/release/xtuner")]
    xtuner: PathBuf,
    /// The Python that has torch, transformers and peft.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Seconds each process may run.
    #[arg(long, default_value_t = 240)]
    timeout: u64,
    /// Skip the reference runs.
    #[arg(long)]
    no_reference: bool,
    /// Print the runs and stop.
    #[arg(long)]
    dry_run: bool,
    /// Also write the report (markdown, then the raw JSON lines) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One process to time.
struct Run {
    side: &'static str,
    mode: String,
    checkpointing: bool,
    program: String,
    args: Vec<String>,
    /// Environment variables set for it.
    env: Vec<(String, String)>,
}

/// The shape of a preset, as the reference script takes it: hidden, intermediate,
/// layers, heads, KV heads, vocabulary (xtuner-model's `DecoderConfig::preset`).
fn preset_shape(preset: &str) -> Option<[usize; 6]> {
    Some(match preset {
        "internlm2-tiny" => [128, 384, 4, 4, 2, 92544],
        "internlm2-small" => [512, 1536, 4, 8, 4, 92544],
        "internlm2-1.8b" => [2048, 8192, 24, 16, 8, 92544],
        _ => return None,
    })
}

impl TrainArgs {
    fn cpu(&self) -> bool {
        self.device == "cpu"
    }

    fn modes(&self) -> Vec<String> {
        self.modes.clone().unwrap_or_else(|| {
            let modes: &[&str] = if self.cpu() {
                &["lora", "full"]
            } else {
                &["lora", "full", "qlora"]
            };
            modes.iter().map(ToString::to_string).collect()
        })
    }

    fn preset(&self) -> String {
        self.preset.clone().unwrap_or_else(|| {
            if self.cpu() {
                "internlm2-small"
            } else {
                "internlm2-1.8b"
            }
            .to_string()
        })
    }

    fn vocab_size(&self) -> usize {
        let preset = preset_shape(&self.preset()).map_or(92544, |s| s[5]);
        self.vocab_size
            .unwrap_or(if self.cpu() { 1000 } else { preset })
    }

    fn seq_len(&self) -> usize {
        self.seq_len.unwrap_or(if self.cpu() { 256 } else { 2048 })
    }

    fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(if self.cpu() { 4 } else { 1 })
    }

    fn lora_r(&self) -> usize {
        self.lora_r.unwrap_or(if self.cpu() { 16 } else { 64 })
    }

    fn runs(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        let preset = self.preset();
        for mode in &self.modes() {
            let common = [
                format!("--seq-len={}", self.seq_len()),
                format!("--batch-size={}", self.batch_size()),
                format!("--lora-r={}", self.lora_r()),
                format!("--warmup={}", self.warmup),
                format!("--steps={}", self.steps),
                format!("--mode={mode}"),
                format!("--device={}", self.device),
            ];
            // Ours, then the reference, without and then with activation checkpointing.
            for checkpointing in [false, true] {
                let mut ours = vec![
                    "bench".to_string(),
                    format!("--preset={preset}"),
                    format!("--vocab-size={}", self.vocab_size()),
                ];
                ours.extend(common.iter().cloned());
                if checkpointing {
                    ours.push("--checkpointing".into());
                }
                // Our CPU threads: rayon's pool and matrixmultiply's.
                let env = if self.cpu() && self.threads > 0 {
                    ["RAYON_NUM_THREADS", "MATMUL_NUM_THREADS"]
                        .map(|k| (k.to_string(), self.threads.to_string()))
                        .to_vec()
                } else {
                    Vec::new()
                };
                runs.push(Run {
                    side: "xtuner-rs",
                    mode: mode.clone(),
                    checkpointing,
                    program: self.xtuner.display().to_string(),
                    args: ours,
                    env,
                });
                if self.no_reference {
                    continue;
                }
                let mut args = vec!["tools/bench_train.py".to_string()];
                args.extend(common.iter().cloned());
                if let Some([hidden, intermediate, layers, heads, kv_heads, _]) =
                    preset_shape(&preset)
                {
                    args.extend([
                        format!("--hidden={hidden}"),
                        format!("--intermediate={intermediate}"),
                        format!("--layers={layers}"),
                        format!("--heads={heads}"),
                        format!("--kv-heads={kv_heads}"),
                    ]);
                }
                args.push(format!("--vocab={}", self.vocab_size()));
                if self.cpu() {
                    args.push(format!("--threads={}", self.threads));
                }
                if checkpointing {
                    args.push("--checkpointing".into());
                }
                runs.push(Run {
                    side: "pytorch",
                    mode: mode.clone(),
                    checkpointing,
                    program: self.python.clone(),
                    args,
                    env: Vec::new(),
                });
            }
        }
        runs
    }
}

/// Runs the benchmark (or prints its plan).
///
/// # Errors
/// Unknown modes, a missing binary; a failed run is reported in the table, not an error.
pub fn train(args: &TrainArgs) -> Result<()> {
    if !["cuda", "cpu"].contains(&args.device.as_str()) {
        bail!("unknown device {:?}: cuda or cpu", args.device);
    }
    for mode in &args.modes() {
        if !["full", "lora", "qlora"].contains(&mode.as_str()) {
            bail!("unknown mode {mode:?}: full, lora or qlora");
        }
    }
    let mut runs = args.runs();
    if args.dry_run {
        println!(
            "bench train plan: {} on {}, vocabulary {}, {} × {} tokens per step, LoRA r {}, {} warm-up + {} timed steps",
            args.preset(),
            args.device,
            args.vocab_size(),
            args.batch_size(),
            args.seq_len(),
            args.lora_r(),
            args.warmup,
            args.steps
        );
        for run in &runs {
            println!("  {} {}", run.program, run.args.join(" "));
        }
        let memory = if args.cpu() {
            "its peak resident memory sampled every 20 ms"
        } else {
            "nvidia-smi sampling the card's memory every 100 ms"
        };
        println!("  (each with {memory}; {} s limit per run)", args.timeout);
        return Ok(());
    }
    if !args.xtuner.is_file() {
        let features = if args.cpu() { "" } else { " --features cuda" };
        bail!(
            "{} not found: build it with `cargo build --release -p xtuner-cli{features}`",
            args.xtuner.display()
        );
    }
    if args.cpu() && runs.iter().any(|r| r.side == "pytorch") && !torch_importable(&args.python) {
        eprintln!(
            "{} cannot import torch, transformers and peft: ours runs alone",
            args.python
        );
        runs.retain(|r| r.side != "pytorch");
    }
    let mut results = Vec::new();
    for run in &runs {
        eprintln!("{} {}", run.program, run.args.join(" "));
        let result = time_run(run, Duration::from_secs(args.timeout), args.cpu());
        eprintln!("  -> {result}");
        results.push((run, result));
        // Written after every run, so a run cut short still leaves its report.
        if let Some(path) = &args.out {
            let raw: Vec<String> = results.iter().map(|(_, r)| r.to_string()).collect();
            let text = format!(
                "{}\n```\n{}\n```\n",
                markdown(args, &results),
                raw.join("\n")
            );
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    println!("{}", markdown(args, &results));
    Ok(())
}

/// Whether `python` imports torch, transformers and peft.
fn torch_importable(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import torch, transformers, peft"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs one process with a memory sampler beside it: the card's (`peak_gpu_mib`
/// added to its JSON report) or, on the CPU, its own resident memory
/// (`peak_rss_bytes`). Its report; or `{"error": ...}`.
fn time_run(run: &Run, timeout: Duration, cpu: bool) -> Value {
    let before = if cpu {
        0.0
    } else {
        gpu_used_mib().unwrap_or(0.0)
    };
    let sampler = if cpu { None } else { MemorySampler::start() };
    let started = Instant::now();
    let child = Command::new(&run.program)
        .args(&run.args)
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let rss = Arc::new(Mutex::new(0u64));
    let result = match child {
        Ok(child) => {
            let rss_sampler = cpu.then(|| sample_rss(child.id(), rss.clone()));
            let result = wait_with_timeout(child, timeout);
            if let Some(handle) = rss_sampler {
                let _ = handle.join();
            }
            result
        }
        Err(e) => Err(format!("could not start {}: {e}", run.program)),
    };
    let peak = sampler.map(MemorySampler::stop);
    let wall = started.elapsed().as_secs_f64();
    let mut value = match result {
        Ok(stdout) => stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or_else(|| json!({"error": "no JSON report on stdout"})),
        Err(e) => json!({ "error": e }),
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("side".into(), json!(run.side));
        obj.insert("mode".into(), json!(run.mode));
        obj.insert("checkpointing".into(), json!(run.checkpointing));
        obj.insert("wall_s".into(), json!(wall));
        if let Some(Some(peak)) = peak {
            obj.insert("peak_gpu_mib".into(), json!(peak - before));
        }
        let rss = rss.lock().map_or(0, |r| *r);
        if cpu && rss > 0 {
            obj.insert("peak_rss_bytes".into(), json!(rss));
        }
    }
    value
}

/// Samples process `pid`'s peak resident memory (`VmHWM`, bytes) every 20 ms into
/// `peak`, until the process is gone.
fn sample_rss(pid: u32, peak: Arc<Mutex<u64>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let path = format!("/proc/{pid}/status");
        while let Ok(status) = std::fs::read_to_string(&path) {
            if status.contains("State:\tZ") {
                break;
            }
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            if let (Some(kib), Ok(mut p)) = (hwm, peak.lock()) {
                *p = (*p).max(kib * 1024);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> std::result::Result<String, String> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out = std::thread::spawn(move || read_all(stdout));
    let err = std::thread::spawn(move || read_all(stderr));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let tail: String = stderr
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ");
    match status {
        None => Err(format!(
            "timed out after {} s; stderr: {tail}",
            timeout.as_secs()
        )),
        Some(s) if !s.success() => Err(format!("exit {s}; stderr: {tail}")),
        Some(_) => Ok(stdout),
    }
}

fn read_all(pipe: Option<impl std::io::Read>) -> String {
    let mut text = String::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_string(&mut text);
    }
    text
}

/// The card's used memory in MiB, as `nvidia-smi` reports it.
fn gpu_used_mib() -> Option<f64> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `nvidia-smi -lms 100` in the background, keeping the highest reading.
struct MemorySampler {
    child: Child,
    peak: Arc<Mutex<Option<f64>>>,
    reader: std::thread::JoinHandle<()>,
}

impl MemorySampler {
    fn start() -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let peak = Arc::new(Mutex::new(None));
        let shared = peak.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if let (Ok(v), Ok(mut p)) = (line.trim().parse::<f64>(), shared.lock()) {
                    *p = Some(p.map_or(v, |old: f64| old.max(v)));
                }
            }
        });
        Some(Self {
            child,
            peak,
            reader,
        })
    }

    fn stop(mut self) -> Option<f64> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.reader.join();
        self.peak.lock().ok().and_then(|p| *p)
    }
}

fn markdown(args: &TrainArgs, results: &[(&Run, Value)]) -> String {
    let device = results
        .iter()
        .find_map(|(_, v)| v["device"].as_str())
        .unwrap_or(if args.cpu() {
            "(CPU: see lscpu)"
        } else {
            "(device name: see nvidia-smi)"
        });
    let threads = if args.cpu() {
        results
            .iter()
            .find_map(|(_, v)| v["threads"].as_u64())
            .map_or_else(String::new, |t| format!(", {t} threads"))
    } else {
        String::new()
    };
    let mut text = format!(
        "`cargo xtask bench train` — {} shape, vocabulary {}, {} × {} tokens per step, LoRA r {}, {} timed steps after {} warm-up; {device}{threads}\n\n",
        args.preset(),
        args.vocab_size(),
        args.batch_size(),
        args.seq_len(),
        args.lora_r(),
        args.steps,
        args.warmup
    );
    let memory = if args.cpu() {
        "peak RSS"
    } else {
        "peak GPU memory (nvidia-smi)"
    };
    text.push_str(&format!("| mode | side | act. ckpt | tokens/s | model TFLOP/s | {memory} | model state (counted) | vs PyTorch (same ckpt) |\n|---|---|---|---:|---:|---:|---:|---:|\n"));
    for (run, v) in results {
        let tps = v["tokens_per_s"].as_f64();
        let reference = results
            .iter()
            .find(|(r, _)| {
                r.side == "pytorch" && r.mode == run.mode && r.checkpointing == run.checkpointing
            })
            .and_then(|(_, v)| v["tokens_per_s"].as_f64());
        let ratio = match (run.side, tps, reference) {
            ("xtuner-rs", Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => String::new(),
        };
        let cell = |x: Option<f64>, digits: usize| {
            x.map_or_else(|| "—".to_string(), |x| format!("{x:.digits$}"))
        };
        let status = v["error"]
            .as_str()
            .or(v["skipped"].as_str())
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        let gib = |x: Option<f64>| x.map_or_else(|| "—".to_string(), |x| format!("{x:.1} GiB"));
        text.push_str(&format!(
            "| {} | {}{status} | {} | {} | {} | {} | {} | {ratio} |\n",
            run.mode,
            run.side,
            if run.checkpointing { "yes" } else { "no" },
            cell(tps, 0),
            // A CPU's are hundredths of a TFLOP/s.
            cell(v["tflops"].as_f64(), if args.cpu() { 3 } else { 1 }),
            gib(v["peak_gpu_mib"]
                .as_f64()
                .map(|m| m / 1024.0)
                .or_else(|| v["peak_rss_bytes"]
                    .as_f64()
                    .map(|b| b / (1u64 << 30) as f64))),
            // Parameters, gradients, AdamW moments and frozen or NF4 weights, as
            // `xtuner bench` counts them; activations and workspaces are the rest.
            gib(v["model_state_bytes"]
                .as_f64()
                .map(|b| b / (1u64 << 30) as f64)),
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn plan_runs_both_sides_per_mode() {
        let cli = Cli::parse_from(["x", "--modes", "lora,full"]);
        let runs = cli.args.runs();
        assert_eq!(runs.len(), 8);
        assert_eq!(
            (runs[0].side, runs[1].side, runs[2].side),
            ("xtuner-rs", "pytorch", "xtuner-rs")
        );
        assert!(
            runs[0].args.contains(&"--mode=lora".to_string())
                && runs[0].args.contains(&"--device=cuda".to_string())
                && runs[1].args.contains(&"--device=cuda".to_string())
        );
        assert!(!runs[1].args.contains(&"--checkpointing".to_string()));
        assert!(
            runs[2].args.contains(&"--checkpointing".to_string())
                && runs[3].args.contains(&"--checkpointing".to_string())
        );
        let cli = Cli::parse_from(["x", "--no-reference"]);
        let runs = cli.args.runs();
        assert_eq!(runs.len(), 6);
        assert!(runs.iter().all(|r| r.side == "xtuner-rs"));

        // On the CPU: the small shape on both sides, LoRA and full.
        let cli = Cli::parse_from(["x", "--device", "cpu", "--threads", "2"]);
        let runs = cli.args.runs();
        assert_eq!(runs.len(), 8);
        for want in [
            "--preset=internlm2-small",
            "--vocab-size=1000",
            "--seq-len=256",
            "--batch-size=4",
            "--lora-r=16",
            "--device=cpu",
        ] {
            assert!(
                runs[0].args.contains(&want.to_string()),
                "{want}: {:?}",
                runs[0].args
            );
        }
        for want in [
            "--hidden=512",
            "--layers=4",
            "--kv-heads=4",
            "--vocab=1000",
            "--threads=2",
            "--device=cpu",
        ] {
            assert!(
                runs[1].args.contains(&want.to_string()),
                "{want}: {:?}",
                runs[1].args
            );
        }
        assert!(runs[4].args.contains(&"--mode=full".to_string()));
    }

    #[test]
    fn table_shows_ratios_and_errors() {
        let cli = Cli::parse_from(["x", "--modes", "lora"]);
        let runs = cli.args.runs();
        let results = vec![
            (
                &runs[0],
                json!({"tokens_per_s": 5000.0, "tflops": 60.0, "peak_gpu_mib": 10240.0,
                       "model_state_bytes": 3u64 << 30}),
            ),
            (&runs[1], json!({"tokens_per_s": 10000.0, "tflops": 120.0})),
            (&runs[3], json!({"error": "timed out"})),
        ];
        let table = markdown(&cli.args, &results);
        assert!(
            table.contains("| lora | xtuner-rs | no | 5000 | 60.0 | 10.0 GiB | 3.0 GiB | 0.50× |"),
            "{table}"
        );
        assert!(table.contains("pytorch (timed out) | yes | — |"), "{table}");

        let cli = Cli::parse_from(["x", "--device", "cpu"]);
        let runs = cli.args.runs();
        let results = vec![
            (
                &runs[0],
                json!({"tokens_per_s": 1500.0, "peak_rss_bytes": 1u64 << 29, "threads": 2}),
            ),
            (
                &runs[1],
                json!({"tokens_per_s": 1000.0, "peak_rss_bytes": 1u64 << 30}),
            ),
        ];
        let table = markdown(&cli.args, &results);
        assert!(
            table.contains("peak RSS") && table.contains(", 2 threads"),
            "{table}"
        );
        assert!(
            table.contains("| lora | xtuner-rs | no | 1500 | — | 0.5 GiB |"),
            "{table}"
        );
        assert!(table.contains("1.50×"), "{table}");
    }
}
