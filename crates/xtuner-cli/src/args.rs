//! Command-line arguments (clap only; no logic here). The commands and their flags
//! mirror XTuner's `xtuner` entry point.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Fine-tune InternLM2 and LLaVA models, XTuner-compatible, in one binary.
#[derive(Debug, Parser)]
#[command(name = "xtuner", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Every command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the built-in configs.
    ListCfg {
        /// Only names containing this (case-insensitive).
        #[arg(short, long)]
        pattern: Option<String>,
    },
    /// Copy a built-in config to DIR/<name>_copy.toml to edit it.
    #[allow(rustdoc::invalid_html_tags)] // clap help text: `<...>` is a placeholder
    CopyCfg {
        /// A built-in config name (see list-cfg).
        name: String,
        /// The destination folder.
        dir: PathBuf,
    },
    /// List the data formats (XTuner's dataset map functions).
    ListDatasetFormat,
    /// Read a config's data through every stage and report the first bad record.
    CheckCustomDataset(ConfigArgs),
    /// Print the first samples of a config's processed data set.
    LogDataset {
        /// The config.
        #[command(flatten)]
        config: ConfigArgs,
        /// What to show.
        #[arg(long, value_enum, default_value_t = Show::Text)]
        show: Show,
        /// How many rows to show.
        #[arg(short = 'n', long, default_value_t = 1)]
        num: usize,
    },
    /// Data-processing tools.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Train (LoRA, QLoRA, full fine-tune or pre-training) as a config describes.
    Train {
        /// The config.
        #[command(flatten)]
        config: ConfigArgs,
        /// Where checkpoints and logs go (default: work_dirs/<config name>).
        #[allow(rustdoc::invalid_html_tags)] // clap help text: `<...>` is a placeholder
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Resume: `auto` (the newest checkpoint of the work dir) or a checkpoint directory.
        #[arg(long, num_args = 0..=1, default_missing_value = "auto")]
        resume: Option<String>,
        /// Where to run.
        #[arg(long, value_enum, default_value_t = crate::backend::Device::Cpu)]
        device: crate::backend::Device,
        /// XTuner's DeepSpeed setting (`deepspeed_zero1`, `deepspeed_zero2`,
        /// `deepspeed_zero2_offload`, ..., or a DeepSpeed JSON file): the optimizer state
        /// sharded over the ranks (ZeRO-1/2, offloaded to host memory with `_offload`;
        /// ZeRO-3 runs as ZeRO-2). See docs/DISTRIBUTED.md.
        #[arg(long)]
        deepspeed: Option<String>,
    },
    /// Check the collectives of the group this process is a rank of (the launch
    /// variables `xtuner train` reads; NCCL between GPUs) against known results, and
    /// time an all-reduce (tools/gpu_check.sh).
    #[command(hide = true)]
    CollectiveCheck {
        /// Where the ranks are.
        #[arg(long, value_enum, default_value_t = crate::backend::Device::Cpu)]
        device: crate::backend::Device,
        /// Elements per bucket.
        #[arg(long, default_value_t = 1_000_003)]
        len: usize,
    },
    /// Time training steps of a preset shape on random data (what `cargo xtask bench
    /// train` runs): tokens/s and model TFLOP/s, as one JSON line.
    Bench {
        /// The model shape (a preset: internlm2-tiny, internlm2-small, internlm2-1.8b).
        #[arg(long, default_value = "internlm2-1.8b")]
        preset: String,
        /// Vocabulary size (InternLM2's is 92544).
        #[arg(long, default_value_t = 92_544)]
        vocab_size: usize,
        /// Tokens per packed row.
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Rows per step.
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        /// What is trained.
        #[arg(long, value_enum, default_value = "lora")]
        mode: BenchModeArg,
        /// LoRA rank.
        #[arg(long, default_value_t = 64)]
        lora_r: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Recompute each decoder layer in backward (activation checkpointing).
        #[arg(long)]
        checkpointing: bool,
        /// Where to run.
        #[arg(long, value_enum, default_value_t = crate::backend::Device::Cpu)]
        device: crate::backend::Device,
        /// Run nothing: print the model state each of `--nproc` ranks would hold, with
        /// data parallel and with each ZeRO stage (DeepSpeed's arithmetic).
        #[arg(long)]
        dry_run: bool,
        /// Ranks for `--dry-run`.
        #[arg(long, default_value_t = 8)]
        nproc: usize,
    },
    /// Draw the loss curves of one or several runs on one chart (PNG or SVG): loss
    /// against step, smoothed, with the learning rate on a second axis.
    Plot {
        /// Work dirs of runs (each holds the `train_log.jsonl` of its run).
        #[arg(required = true, num_args = 1..)]
        work_dirs: Vec<PathBuf>,
        /// The picture, `.png` or `.svg` (default: `loss_curve.png` in the work dir
        /// for one run, `loss_curves.png` here for several).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Convert checkpoints to Hugging Face formats.
    #[command(subcommand)]
    Convert(ConvertCommand),
    /// Mean loss and perplexity of a model over a data set.
    Eval {
        /// The model directory.
        model: PathBuf,
        /// A PEFT adapter merged at load.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Data files or folders.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Record format.
        #[arg(long, default_value = "alpaca")]
        format: String,
        /// Prompt template.
        #[arg(long)]
        template: Option<String>,
        /// Samples are truncated to this many tokens.
        #[arg(long, default_value_t = 2048)]
        max_length: usize,
    },
    /// Chat with a model (one-shot with --prompt, else an interactive session).
    Chat(ChatCli),
    /// Score answers with a reward model (as `convert pth_to_hf` writes it): one line per
    /// answer.
    Reward {
        /// The reward model directory.
        model: PathBuf,
        /// The user's prompt.
        #[arg(long)]
        prompt: String,
        /// An answer to score (repeat for several).
        #[arg(long, required = true)]
        answer: Vec<String>,
        /// A system message before the prompt.
        #[arg(long)]
        system: Option<String>,
        /// The reward token appended to the conversation (default: `reward_token_id` of
        /// the model's config.json).
        #[arg(long)]
        reward_token_id: Option<u32>,
        /// A .jinja chat template (default: the model's own).
        #[arg(long)]
        template: Option<String>,
    },
    /// Print the ids and pieces of a text (encoded without special tokens).
    Tokenize {
        /// Model or tokenizer directory, or a tokenizer.json / tokenizer.model file.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Print `{"ids": [...], "pieces": [...]}`.
        #[arg(long)]
        json: bool,
        /// The text (after `--`).
        #[arg(last = true, required = true)]
        text: Vec<String>,
    },
}

/// A config file (or built-in name) with overrides.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// A config file, or the name of a built-in config.
    pub config: String,
    /// Override config keys: key=value (dotted keys, TOML values), repeatable.
    #[arg(long = "cfg-options", num_args = 1.., value_name = "KEY=VALUE")]
    pub cfg_options: Vec<String>,
}

/// What log-dataset prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Show {
    /// The decoded tokens.
    Text,
    /// Untrained spans as [-100], trained spans decoded.
    #[value(name = "masked_text", alias = "masked-text")]
    MaskedText,
    /// The ids.
    #[value(name = "input_ids", alias = "input-ids")]
    InputIds,
    /// The labels.
    Labels,
    /// All of the above.
    All,
}

/// `xtuner dataset ...`
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Encode raw records into one `{"input_ids", "labels"}` JSON line per kept sample
    /// (preference data: one `{"chosen_ids", "chosen_labels", "rejected_ids",
    /// "rejected_labels"}` line per pair).
    Encode {
        /// Model or tokenizer directory, or a tokenizer file.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Record format (see list-dataset-format), or a preference format:
        /// intel_orca_dpo, orpo_dpo_mix_40k, preference.
        #[arg(long)]
        format: String,
        /// Prompt template (none: turns are encoded as they are), or `chat_template` (the
        /// tokenizer's own Jinja template, labels on the answers). Preference data is
        /// rendered with the tokenizer's own chat_template, or a .jinja file given here.
        #[arg(long)]
        template: Option<String>,
        /// Samples (each answer of a pair) are right-truncated to this many tokens.
        #[arg(long)]
        max_length: usize,
        /// Preference data: the reward-model encoding, with this token appended
        /// (InternLM2's `<|reward|>`).
        #[arg(long)]
        reward_token_id: Option<u32>,
        /// Output JSON Lines file.
        #[arg(long)]
        out: PathBuf,
        /// Data files or folders.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Pack encoded rows into rows of exactly max-length tokens (the whole file as one batch).
    Pack {
        /// Row length.
        #[arg(long)]
        max_length: usize,
        /// Also write `cumulative_len` and `position_ids` (varlen attention).
        #[arg(long)]
        varlen: bool,
        /// Output JSON Lines file.
        #[arg(long)]
        out: PathBuf,
        /// Encoded rows (`xtuner dataset encode` output).
        encoded: PathBuf,
    },
    /// Process a config's data set (or load it from the cache) and report counts and timing.
    Build {
        /// The config.
        #[command(flatten)]
        config: ConfigArgs,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Ignore the cache: always process, store nothing.
        #[arg(long)]
        no_cache: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// `xtuner chat` flags (XTuner's names and defaults).
#[derive(Debug, Clone, Args)]
pub struct ChatCli {
    /// The LLM: a Hugging Face model directory.
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory, merged into the model at load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt template (without one, the input is the raw prompt), or `chat_template`:
    /// the model's own Jinja template.
    #[arg(long)]
    pub prompt_template: Option<String>,
    /// System prompt text.
    #[arg(long, conflicts_with = "system_template")]
    pub system: Option<String>,
    /// One of XTuner's system templates (alpaca, coder, ...).
    #[arg(long)]
    pub system_template: Option<String>,
    /// Extra stop words.
    #[arg(long, num_args = 1..)]
    pub stop_words: Vec<String>,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 2048)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f32,
    /// Top-k sampling (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Top-p sampling.
    #[arg(long, default_value_t = 0.75)]
    pub top_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print each answer when complete instead of token by token.
    #[arg(long)]
    pub no_streamer: bool,
    /// Answer this prompt and exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = crate::backend::Device::Cpu)]
    pub device: crate::backend::Device,
    /// The bot's name in system templates that use it.
    #[arg(long, default_value = "BOT")]
    pub bot_name: String,
    /// A LLaVA directory from `xtuner convert pth_to_hf` (projector/, llm_adapter/, ...).
    #[arg(long, conflicts_with = "adapter")]
    pub llava: Option<PathBuf>,
    /// The CLIP vision tower (a Hugging Face CLIP directory).
    #[arg(long)]
    pub visual_encoder: Option<PathBuf>,
    /// The vision tower's hidden state fed to the projector.
    #[arg(long, default_value_t = -2, allow_hyphen_values = true)]
    pub visual_select_layer: i64,
    /// The image (LLaVA).
    #[arg(long)]
    pub image: Option<PathBuf>,
}

/// `xtuner convert ...`
#[derive(Debug, Subcommand)]
pub enum ConvertCommand {
    /// A training checkpoint to a PEFT adapter (LoRA) or a Hugging Face model (full).
    #[command(name = "pth_to_hf")]
    PthToHf {
        /// The config the checkpoint was trained with.
        config: String,
        /// The checkpoint directory (work_dirs/<config>/iter_N).
        #[allow(rustdoc::invalid_html_tags)] // clap help text: `<...>` is a placeholder
        checkpoint: PathBuf,
        /// Output directory.
        out: PathBuf,
        /// Save in f32 (default: 16-bit).
        #[arg(long)]
        fp32: bool,
        /// Largest shard of a full model.
        #[arg(long, default_value = "2GB")]
        max_shard_size: String,
        /// A LLaVA's layout: XTuner's, transformers' `LlavaForConditionalGeneration`
        /// (with its processor; a Llama-form LLM, adapters merged), or the original
        /// LLaVA repository's.
        #[arg(long, value_enum, default_value_t = SaveFormatArg::Xtuner)]
        save_format: SaveFormatArg,
        /// Override config keys.
        #[arg(long = "cfg-options", num_args = 1..)]
        cfg_options: Vec<String>,
    },
    /// Merge a PEFT LoRA adapter into its base model.
    Merge {
        /// The base model directory.
        base: PathBuf,
        /// The adapter directory.
        adapter: PathBuf,
        /// Output directory.
        out: PathBuf,
        /// Largest shard.
        #[arg(long, default_value = "2GB")]
        max_shard_size: String,
        /// Save in f32 (default: 16-bit).
        #[arg(long)]
        fp32: bool,
    },
}

/// `xtuner bench --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModeArg {
    /// Every weight trained.
    Full,
    /// LoRA on every linear layer.
    Lora,
    /// LoRA on an NF4 base.
    Qlora,
}

/// `convert pth_to_hf --save-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveFormatArg {
    /// XTuner's LLaVA layout.
    Xtuner,
    /// transformers' LlavaForConditionalGeneration + LlavaProcessor.
    Huggingface,
    /// The original LLaVA repository's LlavaLlamaForCausalLM.
    Official,
}

impl From<SaveFormatArg> for xtuner_engine::convert::SaveFormat {
    fn from(arg: SaveFormatArg) -> Self {
        match arg {
            SaveFormatArg::Xtuner => Self::Xtuner,
            SaveFormatArg::Huggingface => Self::Huggingface,
            SaveFormatArg::Official => Self::Official,
        }
    }
}
