//! `cargo xtask`: project chores that are not part of the `xtuner` binary.
//!
//! - `demo-data`: generate the demo data set, tokenizer and config under `configs/`;
//! - `demo-dpo-data`: generate the preference (DPO) demo under `configs/demo_dpo/`;
//! - `demo-llava-data`: generate the LLaVA demo (pictures, data, tokenizer, tower) under
//!   `configs/demo_llava/`;
//! - `bench data`: time the data pipeline through the release `xtuner` binary;
//! - `bench train`: time training steps on a GPU against PyTorch + PEFT;
//! - `check`: check the layout: the crate graph as designed, no import cycles between a
//!   crate's modules, no source file over 800 lines (tests aside).
//!
//! xtask imports no workspace crate: it drives `xtuner` as a subprocess, so it builds
//! and runs whatever state the library crates are in. Every path is relative to the
//! repository root, which becomes the working directory.

mod bench;
mod bench_train;
mod check;
mod corpus;
mod demo;
mod demo_dpo;
mod demo_llava;
mod tokenizer;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Project chores: demo data, benchmarks and checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Generate configs/demo/ (data, tokenizer) and configs/demo_tiny_lora.toml.
    DemoData,
    /// Generate configs/demo_llava/ (pictures, LLaVA data, tokenizer, a small CLIP tower).
    DemoLlavaData,
    /// Generate configs/demo_dpo/ (preference pairs, a tokenizer with a chat template)
    /// and configs/demo_tiny_dpo.toml (needs configs/demo/ from demo-data).
    DemoDpoData,
    /// Run a benchmark.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
    /// Check the layout: the crate graph, module import cycles, file lengths.
    Check,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The data pipeline (read, map, template, encode, pack) via `xtuner dataset build`.
    Data(bench::DataArgs),
    /// Training steps, ours and PyTorch's side by side, on a GPU (InternLM2-1.8B's shape) or the CPU.
    Train(Box<bench_train::TrainArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    // A copy of the built binary on another machine runs where it is started: from
    // the repository root of that machine's checkout.
    if root.is_dir() {
        std::env::set_current_dir(root).with_context(|| format!("entering {}", root.display()))?;
    }
    match &cli.command {
        Task::DemoData => demo::run(),
        Task::DemoLlavaData => demo_llava::run(),
        Task::DemoDpoData => demo_dpo::run(),
        Task::Bench {
            bench: Bench::Data(args),
        } => bench::data(args),
        Task::Bench {
            bench: Bench::Train(args),
        } => bench_train::train(args),
        Task::Check => check::run(),
    }
}
