//! `cargo xtask bench data`: times the whole data pipeline (read → map → template →
//! encode → pack) through the release `xtuner` binary.
//!
//! Under `target/bench-data/` it writes N seeded alpaca records of realistic length
//! (one JSON array), a 32k InternLM2-style tokenizer (trained once, then reused) and a
//! config, then runs `xtuner dataset build --json` four times: without the cache on one
//! thread and on all cores, then with the cache twice (the first run builds it, the
//! second loads it). It prints a markdown table with the binary's own timing and the
//! wall clock seen from here (process start-up included), and the machine it ran on.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::corpus::TextGen;
use crate::tokenizer;

const DIR: &str = "target/bench-data";
const LEXICON_SEED: u64 = 1;
const RECORD_SEED: u64 = 2;
const EXTRA_TEXT_SEED: u64 = 3;
/// Records whose text trains the tokenizer (whatever N is, so the tokenizer is reused).
const TOKENIZER_RECORDS: usize = 10_000;
/// Extra texts of [`EXTRA_TEXT_WORDS`] words each that the tokenizer also trains on.
const EXTRA_TEXTS: usize = 4000;
const EXTRA_TEXT_WORDS: usize = 300;
const VOCAB_SIZE: usize = 32_000;
/// Bump when the generator or the tokenizer recipe changes, to retrain the cached one.
const TOKENIZER_STAMP: &str = "bench tokenizer v1: vocab 32000, lexicon seed 1, records 10000 (seed 2), extra 4000x300 (seed 3)";

/// Options of `cargo xtask bench data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Alpaca records to generate and process.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Print what would be generated and run, and stop.
    #[arg(long)]
    dry_run: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Where everything goes, and the runs to make.
struct Plan {
    records: usize,
    data_file: PathBuf,
    tokenizer_dir: PathBuf,
    config_file: PathBuf,
    cache_dir: PathBuf,
    binary: PathBuf,
    cores: usize,
}

/// One `xtuner dataset build` invocation.
struct Run {
    name: &'static str,
    threads: usize,
    no_cache: bool,
}

/// What one run reported, and how long it took from here.
struct Outcome {
    name: &'static str,
    report: Value,
    wall_seconds: f64,
}

impl Plan {
    fn new(records: usize) -> Self {
        let dir = Path::new(DIR);
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| PathBuf::from("target"), PathBuf::from);
        Self {
            records,
            data_file: dir.join(format!("alpaca_{records}.json")),
            tokenizer_dir: dir.join("tokenizer"),
            config_file: dir.join(format!("bench_alpaca_{records}.toml")),
            cache_dir: dir.join("cache"),
            binary: target.join("release").join("xtuner"),
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        }
    }

    fn runs(&self) -> [Run; 4] {
        [
            Run {
                name: "no cache, 1 thread",
                threads: 1,
                no_cache: true,
            },
            Run {
                name: "no cache, all cores",
                threads: self.cores,
                no_cache: true,
            },
            Run {
                name: "cache build",
                threads: self.cores,
                no_cache: false,
            },
            Run {
                name: "cache hit",
                threads: self.cores,
                no_cache: false,
            },
        ]
    }

    fn args(&self, run: &Run) -> Vec<String> {
        let mut args = vec![
            "dataset".to_string(),
            "build".to_string(),
            self.config_file.display().to_string(),
            "--json".to_string(),
            "--threads".to_string(),
            run.threads.to_string(),
        ];
        if run.no_cache {
            args.push("--no-cache".to_string());
        }
        args
    }

    fn print(&self) {
        println!(
            "bench data plan ({} records, {} cores):",
            self.records, self.cores
        );
        println!(
            "  1. write {} (seeded alpaca records, one JSON array)",
            self.data_file.display()
        );
        println!(
            "  2. tokenizer {}: reuse if its stamp matches, else train a {VOCAB_SIZE}-entry BPE",
            self.tokenizer_dir.display()
        );
        println!(
            "  3. write {} (alpaca, internlm2_chat, max_length 2048, packed)",
            self.config_file.display()
        );
        println!("  4. cargo build --release -p xtuner-cli");
        for (i, run) in self.runs().iter().enumerate() {
            if i == 2 {
                println!("     rm -r {}", self.cache_dir.display());
            }
            println!(
                "     {} {}    # {}",
                self.binary.display(),
                self.args(run).join(" "),
                run.name
            );
        }
        println!("  5. print a markdown table of the runs");
    }
}

/// Runs the benchmark (or prints its plan).
///
/// # Errors
/// A file that cannot be written, a failed build, or a run that fails or prints no
/// report.
pub fn data(args: &DataArgs) -> Result<()> {
    if args.records == 0 {
        bail!("--records must be at least 1");
    }
    let plan = Plan::new(args.records);
    if args.dry_run {
        plan.print();
        return Ok(());
    }
    let generator = TextGen::new(LEXICON_SEED);
    fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;

    let started = Instant::now();
    write_records(&generator, &plan)?;
    eprintln!(
        "wrote {} ({:.1} s)",
        plan.data_file.display(),
        started.elapsed().as_secs_f64()
    );
    prepare_tokenizer(&generator, &plan.tokenizer_dir)?;
    write_config(&plan)?;
    build_binary()?;

    let mut outcomes = Vec::new();
    for (i, run) in plan.runs().iter().enumerate() {
        if i == 2 && plan.cache_dir.exists() {
            fs::remove_dir_all(&plan.cache_dir)
                .with_context(|| format!("removing {}", plan.cache_dir.display()))?;
        }
        outcomes.push(time_run(&plan, run)?);
    }
    let report = markdown(&plan, &outcomes);
    println!("{report}");
    if let Some(out) = &args.out {
        fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// One alpaca record: instruction 20–60 words, input in 3 of 10 records, output
/// 50–300 words.
fn record(generator: &TextGen, rng: &mut ChaCha8Rng) -> Value {
    let n = rng.random_range(20..=60);
    let instruction = generator.text(rng, n);
    let input = if rng.random_bool(0.3) {
        let n = rng.random_range(10..=80);
        generator.text(rng, n)
    } else {
        String::new()
    };
    let n = rng.random_range(50..=300);
    let output = generator.text(rng, n);
    json!({ "instruction": instruction, "input": input, "output": output })
}

/// The first `n` records; record i is the same for every `n`.
fn records(generator: &TextGen, n: usize) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(RECORD_SEED);
    (0..n).map(|_| record(generator, &mut rng)).collect()
}

fn write_records(generator: &TextGen, plan: &Plan) -> Result<()> {
    let records = Value::Array(records(generator, plan.records));
    let text = serde_json::to_string(&records)?;
    fs::write(&plan.data_file, text)
        .with_context(|| format!("writing {}", plan.data_file.display()))
}

/// Reuses the tokenizer in `dir` when its stamp matches, else trains and saves one.
fn prepare_tokenizer(generator: &TextGen, dir: &Path) -> Result<()> {
    let stamp_file = dir.join("stamp.txt");
    if fs::read_to_string(&stamp_file).is_ok_and(|s| s.trim() == TOKENIZER_STAMP)
        && tokenizer::load(dir).is_ok()
    {
        eprintln!("reusing the tokenizer in {}", dir.display());
        return Ok(());
    }
    let started = Instant::now();
    let mut texts: Vec<String> = Vec::new();
    for record in records(generator, TOKENIZER_RECORDS) {
        for key in ["instruction", "input", "output"] {
            if let Some(text) = record[key].as_str().filter(|s| !s.is_empty()) {
                texts.push(text.to_string());
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(EXTRA_TEXT_SEED);
    texts.extend((0..EXTRA_TEXTS).map(|_| generator.text(&mut rng, EXTRA_TEXT_WORDS)));
    // Template turns, so role names and line breaks are pieces too.
    texts.extend(
        ["system", "user", "assistant"].map(|role| format!("<|im_start|>{role}\nHi<|im_end|>\n")),
    );
    eprintln!(
        "training a {VOCAB_SIZE}-entry tokenizer on {} texts ...",
        texts.len()
    );
    let trained = tokenizer::train(&texts, VOCAB_SIZE)?;
    let samples = texts
        .iter()
        .take(20)
        .map(String::as_str)
        .chain(["Hello, wörld! 你好 🙂"])
        .collect::<Vec<_>>();
    let loaded = tokenizer::save(&trained, dir, &samples)?;
    fs::write(&stamp_file, TOKENIZER_STAMP)
        .with_context(|| format!("writing {}", stamp_file.display()))?;
    eprintln!(
        "tokenizer: {} entries, trained in {:.1} s",
        loaded.get_vocab_size(true),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn write_config(plan: &Plan) -> Result<()> {
    let text = format!(
        r#"# Written by `cargo xtask bench data`: the data pipeline benchmark's config.

[model]
preset = "internlm2-tiny"

[tokenizer]
path = "{tokenizer}"

[data]
files = ["{data}"]
format = "alpaca"
max_length = 2048
pack_to_max_length = true
cache_dir = "{cache}"

[template]
name = "internlm2_chat"
"#,
        tokenizer = plan.tokenizer_dir.display(),
        data = plan.data_file.display(),
        cache = plan.cache_dir.display(),
    );
    fs::write(&plan.config_file, text)
        .with_context(|| format!("writing {}", plan.config_file.display()))
}

fn build_binary() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "xtuner-cli"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p xtuner-cli failed ({status})");
    }
    Ok(())
}

fn time_run(plan: &Plan, run: &Run) -> Result<Outcome> {
    let args = plan.args(run);
    eprintln!("{} {}", plan.binary.display(), args.join(" "));
    let started = Instant::now();
    let output = Command::new(&plan.binary)
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", plan.binary.display()))?;
    let wall_seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("`{}` failed ({})", run.name, output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON report on stdout")?;
    let report: Value =
        serde_json::from_str(line).with_context(|| format!("parsing the report {line:?}"))?;
    eprintln!("  {report}");
    Ok(Outcome {
        name: run.name,
        report,
        wall_seconds,
    })
}

fn markdown(plan: &Plan, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let number = |o: &Outcome, key: &str| o.report[key].as_f64().unwrap_or(f64::NAN);
    if let Some(first) = outcomes.first() {
        out += &format!(
            "Data: {} alpaca records → {} samples → {} packed rows of 2048 tokens; {} tokens ({} trained), \
             tokenizer {VOCAB_SIZE} entries.\n\n",
            first.report["records"],
            first.report["samples"],
            first.report["rows"],
            first.report["tokens"],
            first.report["trained_tokens"],
        );
    }
    out += "| run | threads | cache | seconds | wall s | records/s | tokens/s |\n";
    out += "|---|---:|---|---:|---:|---:|---:|\n";
    for o in outcomes {
        let seconds = number(o, "seconds");
        out += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {} | {} |\n",
            o.name,
            o.report["threads"],
            o.report["cache"].as_str().unwrap_or("?"),
            seconds,
            o.wall_seconds,
            grouped(number(o, "records") / seconds),
            grouped(number(o, "tokens") / seconds),
        );
    }
    out += &format!(
        "\n`seconds`: the binary's own timing (tokenizer load + processing); `wall s`: the process as seen \
         from xtask, start-up included.\n\nMachine: {} ({} cores), {}.\nCommand: `cargo xtask bench data --records {}`\n",
        cpu_model(),
        plan.cores,
        date(),
        plan.records
    );
    out
}

/// `1234567.8` → `1,234,568`.
fn grouped(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_string();
    }
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown date".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(grouped(1_234_567.8), "1,234,568");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(f64::INFINITY), "-");
    }

    #[test]
    fn records_are_a_prefix_of_longer_runs() {
        let generator = TextGen::new(LEXICON_SEED);
        let few = records(&generator, 3);
        let more = records(&generator, 5);
        assert_eq!(few[..], more[..3]);
        let output = few[0]["output"].as_str().unwrap();
        assert!(output.split_whitespace().count() >= 25, "{output}");
    }
}
