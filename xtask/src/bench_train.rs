//! `cargo xtask bench train`: our training step against PyTorch + transformers + PEFT
//! on the same GPU, side by side.
//!
//! For each mode (full, LoRA, QLoRA) it runs `xtuner bench --device cuda` (the release
//! binary built with `--features cuda`) and `tools/bench_train.py` with the same shape
//! (InternLM2-1.8B's by default: a model of random weights, no download), packed rows,
//! batch and rank, each in its own process, while sampling the card's used memory with
//! `nvidia-smi` every 100 ms (peak minus the level before the process started). Both
//! sides run without and with activation checkpointing. It prints a markdown table with
//! the ratios (against the reference with the same checkpointing) and writes the raw
//! JSON lines next to it.

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
    /// Modes to run, comma-separated: full, lora, qlora.
    #[arg(long, default_value = "lora,full,qlora", value_delimiter = ',')]
    modes: Vec<String>,
    /// Our model shape (`xtuner bench --preset`).
    #[arg(long, default_value = "internlm2-1.8b")]
    preset: String,
    /// Tokens per packed row.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 64)]
    lora_r: usize,
    /// Untimed steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// The `xtuner` binary (built with `--features cuda`).
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
}

impl TrainArgs {
    fn runs(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        for mode in &self.modes {
            let common = [
                format!("--seq-len={}", self.seq_len),
                format!("--batch-size={}", self.batch_size),
                format!("--lora-r={}", self.lora_r),
                format!("--warmup={}", self.warmup),
                format!("--steps={}", self.steps),
                format!("--mode={mode}"),
            ];
            // Ours, then the reference, without and then with activation checkpointing.
            for checkpointing in [false, true] {
                let mut ours = vec![
                    "bench".to_string(),
                    "--device=cuda".into(),
                    format!("--preset={}", self.preset),
                ];
                ours.extend(common.iter().cloned());
                if checkpointing {
                    ours.push("--checkpointing".into());
                }
                runs.push(Run {
                    side: "xtuner-rs",
                    mode: mode.clone(),
                    checkpointing,
                    program: self.xtuner.display().to_string(),
                    args: ours,
                });
                if self.no_reference {
                    continue;
                }
                let mut args = vec!["tools/bench_train.py".to_string()];
                args.extend(common.iter().cloned());
                if checkpointing {
                    args.push("--checkpointing".into());
                }
                runs.push(Run {
                    side: "pytorch",
                    mode: mode.clone(),
                    checkpointing,
                    program: self.python.clone(),
                    args,
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
    for mode in &args.modes {
        if !["full", "lora", "qlora"].contains(&mode.as_str()) {
            bail!("unknown mode {mode:?}: full, lora or qlora");
        }
    }
    let runs = args.runs();
    if args.dry_run {
        println!(
            "bench train plan: preset {}, {} × {} tokens per step, LoRA r {}, {} warm-up + {} timed steps",
            args.preset, args.batch_size, args.seq_len, args.lora_r, args.warmup, args.steps
        );
        for run in &runs {
            println!("  {} {}", run.program, run.args.join(" "));
        }
        println!(
            "  (each with nvidia-smi sampling the card's memory every 100 ms; {} s limit per run)",
            args.timeout
        );
        return Ok(());
    }
    if !args.xtuner.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p xtuner-cli --features cuda`",
            args.xtuner.display()
        );
    }
    let mut results = Vec::new();
    for run in &runs {
        eprintln!("{} {}", run.program, run.args.join(" "));
        let result = time_run(run, Duration::from_secs(args.timeout));
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

/// Runs one process with a memory sampler beside it. Its JSON report, with
/// `peak_gpu_mib` added; or `{"error": ...}`.
fn time_run(run: &Run, timeout: Duration) -> Value {
    let before = gpu_used_mib().unwrap_or(0.0);
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let child = Command::new(&run.program)
        .args(&run.args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let result = match child {
        Ok(child) => wait_with_timeout(child, timeout),
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
    }
    value
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
        .unwrap_or("(device name: see nvidia-smi)");
    let mut text = format!(
        "`cargo xtask bench train` — {} shape, {} × {} tokens per step, LoRA r {}, {} timed steps after {} warm-up; {device}\n\n",
        args.preset, args.batch_size, args.seq_len, args.lora_r, args.steps, args.warmup
    );
    text.push_str("| mode | side | act. ckpt | tokens/s | model TFLOP/s | peak GPU memory (nvidia-smi) | model state (counted) | vs PyTorch (same ckpt) |\n|---|---|---|---:|---:|---:|---:|---:|\n");
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
            cell(v["tflops"].as_f64(), 1),
            gib(v["peak_gpu_mib"].as_f64().map(|m| m / 1024.0)),
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
    }
}
