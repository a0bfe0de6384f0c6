//! The run configuration: one TOML file describes a whole fine-tuning job (model,
//! tokenizer, data, template, LoRA, quantization, optimizer, schedule, training loop,
//! checkpoints, evaluation prompts, LLaVA parts).
//!
//! Every default equals XTuner's `internlm2_chat_1_8b_qlora_alpaca_e3` recipe, so a
//! config only states what differs. Unknown keys and bad values are errors naming the
//! key and the file. `--cfg-options key=value` overrides any key from the command line
//! (dotted paths; the value is read as TOML, or as a string when it is not valid TOML).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xtuner_dataset::DataSpec;
use xtuner_dataset::format::{ColumnMap, DataFormat};
use xtuner_template::{ChatTemplate, PromptTemplate, SystemTemplate};

use crate::{Error, Result};

/// A whole run, as read from a config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The language model.
    pub model: ModelConfig,
    /// The tokenizer (defaults to the model directory's).
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    /// The training data.
    pub data: DataConfig,
    /// The prompt template; absent for pre-training on raw text.
    #[serde(default)]
    pub template: Option<TemplateConfig>,
    /// LoRA adapters on the LLM; absent for a full fine-tune.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Quantization of the frozen base (QLoRA).
    #[serde(default)]
    pub quantization: Option<QuantizationConfig>,
    /// The optimizer.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// The training loop.
    #[serde(default)]
    pub train: LoopConfig,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Evaluate-chat prompts run during training.
    #[serde(default)]
    pub evaluation: EvaluationConfig,
    /// The vision parts of a LLaVA run.
    #[serde(default)]
    pub llava: Option<LlavaConfig>,
}

/// Where the LLM comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory (config.json + safetensors).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Or a named shape initialised at random (demos and benchmarks), e.g. `internlm2-tiny`.
    #[serde(default)]
    pub preset: Option<String>,
    /// Recompute each decoder layer in the backward pass to save memory.
    #[serde(default = "yes")]
    pub activation_checkpointing: bool,
}

/// Where the tokenizer comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// A directory (or file) with `tokenizer.json` or `tokenizer.model`; defaults to the
    /// model's directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// The training data and how it is processed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Data files or folders (JSON, JSON Lines, Parquet).
    pub files: Vec<PathBuf>,
    /// Record format: one of XTuner's map functions, `conversation` or `tokenized`.
    pub format: DataFormat,
    /// Field renames for data with other column names: format field = "column".
    #[serde(default)]
    pub columns: ColumnMap,
    /// Samples are truncated to this many tokens (LLaVA: text tokens, image excluded).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Concatenate samples into rows of exactly `max_length` tokens.
    #[serde(default = "yes")]
    pub pack_to_max_length: bool,
    /// Keep sample boundaries in packed rows (no attention across samples).
    #[serde(default)]
    pub use_varlen_attn: bool,
    /// Shuffle samples before packing.
    #[serde(default = "yes")]
    pub shuffle_before_pack: bool,
    /// Keep a random subset of this many records.
    #[serde(default)]
    pub max_dataset_length: Option<usize>,
    /// Count and skip records that do not fit the format instead of stopping.
    #[serde(default)]
    pub skip_bad_records: bool,
    /// Where processed data sets are cached (relative to the working directory).
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

/// A built-in template by name, optionally with fields overridden, or a template of
/// one's own (then `instruction` is required).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// A built-in template (XTuner's name).
    #[serde(default)]
    pub name: Option<PromptTemplate>,
    /// SYSTEM field.
    #[serde(default)]
    pub system: Option<String>,
    /// INSTRUCTION field.
    #[serde(default)]
    pub instruction: Option<String>,
    /// SUFFIX field.
    #[serde(default)]
    pub suffix: Option<String>,
    /// SUFFIX_AS_EOS field.
    #[serde(default)]
    pub suffix_as_eos: Option<bool>,
    /// SEP field.
    #[serde(default)]
    pub sep: Option<String>,
    /// STOP_WORDS field.
    #[serde(default)]
    pub stop_words: Option<Vec<String>>,
}

impl TemplateConfig {
    /// The template this section describes.
    ///
    /// # Errors
    /// Neither a name nor an instruction, or a field with a bad placeholder.
    pub fn resolve(&self) -> std::result::Result<ChatTemplate, String> {
        let mut template = match (self.name, &self.instruction) {
            (Some(name), _) => name.template(),
            (None, Some(instruction)) => ChatTemplate {
                name: "custom".into(),
                system: None,
                instruction: instruction.clone(),
                suffix: String::new(),
                suffix_as_eos: false,
                sep: String::new(),
                stop_words: Vec::new(),
            },
            (None, None) => return Err("give `name` (a built-in template) or `instruction`".into()),
        };
        if let Some(v) = &self.system {
            template.system = Some(v.clone());
        }
        if let Some(v) = &self.instruction {
            template.instruction = v.clone();
        }
        if let Some(v) = &self.suffix {
            template.suffix = v.clone();
        }
        if let Some(v) = self.suffix_as_eos {
            template.suffix_as_eos = v;
        }
        if let Some(v) = &self.sep {
            template.sep = v.clone();
        }
        if let Some(v) = &self.stop_words {
            template.stop_words = v.clone();
        }
        template.validate().map_err(|e| e.to_string())?;
        Ok(template)
    }
}

/// LoRA hyper-parameters (PEFT semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_lora_r")]
    pub r: usize,
    /// Scale numerator: the update is scaled by alpha / r.
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input.
    #[serde(default = "default_lora_dropout")]
    pub dropout: f64,
    /// Module names to adapt; empty = every linear layer of the decoder (XTuner's rule).
    #[serde(default)]
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 64,
            alpha: 16.0,
            dropout: 0.1,
            target_modules: Vec::new(),
        }
    }
}

/// Quantization of the frozen base weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationConfig {
    /// Bits per weight: 4 (NF4, QLoRA).
    #[serde(default = "default_bits")]
    pub bits: u8,
    /// Quantize the per-block absmax again (bitsandbytes' double quantization).
    #[serde(default = "yes")]
    pub double_quant: bool,
    /// Weights per quantization block.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
}

/// AdamW with PyTorch's semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Adam betas.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Adam epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global L2-norm gradient clipping threshold.
    #[serde(default = "default_max_norm")]
    pub max_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            max_norm: 1.0,
        }
    }
}

/// Linear warm-up, then cosine decay (XTuner's recipes), stepped per iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Fraction of the iterations spent warming up.
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// The warm-up starts at lr × this.
    #[serde(default = "default_start_factor")]
    pub warmup_start_factor: f64,
    /// The cosine ends at this learning rate.
    #[serde(default)]
    pub eta_min: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            warmup_ratio: 0.03,
            warmup_start_factor: 1e-5,
            eta_min: 0.0,
        }
    }
}

/// The training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Rows per micro-batch.
    #[serde(default = "default_one")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_accumulative_counts")]
    pub accumulative_counts: usize,
    /// Passes over the data.
    #[serde(default = "default_max_epochs")]
    pub max_epochs: usize,
    /// Stop after this many iterations instead (micro-batches).
    #[serde(default)]
    pub max_iters: Option<usize>,
    /// Seed of data order, dropout and initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Group unpacked rows of similar length into batches.
    #[serde(default)]
    pub group_by_length: bool,
    /// Log every this many iterations.
    #[serde(default = "default_log_interval")]
    pub log_interval: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            batch_size: 1,
            accumulative_counts: 16,
            max_epochs: 3,
            max_iters: None,
            seed: 0,
            group_by_length: false,
            log_interval: 10,
        }
    }
}

/// Checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many iterations.
    #[serde(default = "default_save_steps")]
    pub save_steps: usize,
    /// Keep this many checkpoints (-1: all).
    #[serde(default = "default_save_total_limit")]
    pub save_total_limit: i64,
    /// Where checkpoints and logs go; default `work_dirs/<config name>`.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            save_steps: 500,
            save_total_limit: 2,
            work_dir: None,
        }
    }
}

/// XTuner's evaluate-chat hook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Prompts answered before training, every `freq` iterations and at the end.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Every this many iterations.
    #[serde(default = "default_save_steps")]
    pub freq: usize,
    /// A system prompt of one's own.
    #[serde(default)]
    pub system: Option<String>,
    /// Or one of XTuner's system templates.
    #[serde(default)]
    pub system_template: Option<SystemTemplate>,
    /// Tokens generated per answer.
    #[serde(default = "default_eval_tokens")]
    pub max_new_tokens: usize,
    /// An image for LLaVA runs.
    #[serde(default)]
    pub image: Option<PathBuf>,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            freq: 500,
            system: None,
            system_template: None,
            max_new_tokens: 50,
            image: None,
        }
    }
}

impl EvaluationConfig {
    /// The system prompt the hook uses (empty for none).
    pub fn system_prompt(&self) -> String {
        match (&self.system, self.system_template) {
            (Some(system), _) => system.clone(),
            (None, Some(t)) => t.text().to_string(),
            (None, None) => String::new(),
        }
    }
}

/// The vision side of a LLaVA run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlavaConfig {
    /// A CLIP checkpoint directory (vision tower + preprocessor_config.json).
    pub visual_encoder: PathBuf,
    /// Folder the records' `image` paths are relative to.
    pub image_folder: PathBuf,
    /// Hidden state taken from the vision tower (-2: the penultimate layer).
    #[serde(default = "default_select_layer")]
    pub visual_select_layer: i64,
    /// Projector depth (2: Linear, GELU, Linear).
    #[serde(default = "default_projector_depth")]
    pub projector_depth: usize,
    /// Start the projector from this checkpoint (the pretrain stage's).
    #[serde(default)]
    pub pretrained_projector: Option<PathBuf>,
    /// Keep the LLM frozen (pretrain stage).
    #[serde(default = "yes")]
    pub freeze_llm: bool,
    /// Keep the vision tower frozen.
    #[serde(default = "yes")]
    pub freeze_visual_encoder: bool,
    /// Pad images to a square with the mean colour before resizing.
    #[serde(default)]
    pub pad_image_to_square: bool,
    /// LoRA on the vision tower.
    #[serde(default)]
    pub visual_encoder_lora: Option<LoraConfig>,
}

fn yes() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_max_length() -> usize {
    2048
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from(".xtuner-cache")
}
fn default_lora_r() -> usize {
    64
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_lora_dropout() -> f64 {
    0.1
}
fn default_bits() -> u8 {
    4
}
fn default_block_size() -> usize {
    64
}
fn default_lr() -> f64 {
    2e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_norm() -> f64 {
    1.0
}
fn default_warmup_ratio() -> f64 {
    0.03
}
fn default_start_factor() -> f64 {
    1e-5
}
fn default_accumulative_counts() -> usize {
    16
}
fn default_max_epochs() -> usize {
    3
}
fn default_log_interval() -> usize {
    10
}
fn default_save_steps() -> usize {
    500
}
fn default_save_total_limit() -> i64 {
    2
}
fn default_eval_tokens() -> usize {
    50
}
fn default_select_layer() -> i64 {
    -2
}
fn default_projector_depth() -> usize {
    2
}

/// A config file as loaded: the settings, and where they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    /// The settings. Relative paths are relative to the working directory, as in
    /// XTuner's configs.
    pub config: TrainConfig,
    /// The file.
    pub path: PathBuf,
    /// The config's name (file stem), which names its work dir.
    pub name: String,
}

impl LoadedConfig {
    /// Reads a config file, applies `key=value` overrides and checks every value.
    ///
    /// # Errors
    /// An unreadable file, TOML syntax, an unknown key, a wrong type or a bad value;
    /// the message names the file and the key.
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_text(&text, path, &name, overrides)
    }

    /// Parses config text; `path` and `name` are used for messages and the work dir.
    ///
    /// # Errors
    /// As [`LoadedConfig::from_file`].
    pub fn from_text(text: &str, path: &Path, name: &str, overrides: &[String]) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let config: TrainConfig = if overrides.is_empty() {
            // Straight from the text, so errors carry line and column.
            toml::from_str(text).map_err(|e| bad(e.to_string()))?
        } else {
            let mut table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
            for item in overrides {
                apply_override(&mut table, item)
                    .map_err(|m| bad(format!("--cfg-options {item}: {m}")))?;
            }
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    bad(format!("after --cfg-options: {}", e.message()))
                })?
        };
        config
            .validate()
            .map_err(|(key, message)| bad(format!("`{key}`: {message}")))?;
        Ok(Self {
            config,
            path: path.to_path_buf(),
            name: name.to_string(),
        })
    }

    /// The work dir: `checkpoint.work_dir`, else `work_dirs/<config name>`.
    pub fn work_dir(&self) -> PathBuf {
        self.config
            .checkpoint
            .work_dir
            .clone()
            .unwrap_or_else(|| Path::new("work_dirs").join(&self.name))
    }
}

/// Sets `a.b.c = value` in a TOML table (the value read as TOML, else as a string).
fn apply_override(table: &mut toml::Table, item: &str) -> std::result::Result<(), String> {
    let (key, raw) = item.split_once('=').ok_or("expected key=value")?;
    let key = key.trim();
    let value = parse_override_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or("empty key")?;
    let mut node = table;
    for part in parts {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

fn parse_override_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

impl TrainConfig {
    /// Checks values that parse but make no sense; returns the key and the reason.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        fn check(
            ok: bool,
            key: &'static str,
            message: &str,
        ) -> std::result::Result<(), (&'static str, String)> {
            if ok {
                Ok(())
            } else {
                Err((key, message.to_string()))
            }
        }
        check(
            self.model.path.is_some() != self.model.preset.is_some(),
            "model",
            "give exactly one of `path` (a Hugging Face model dir) and `preset` (a random-init shape)",
        )?;
        check(
            self.model.path.is_some() || self.tokenizer.path.is_some(),
            "tokenizer.path",
            "required when the model is a preset",
        )?;
        check(
            !self.data.files.is_empty(),
            "data.files",
            "at least one data file or folder",
        )?;
        check(
            self.data.max_length > 0,
            "data.max_length",
            "must be at least 1",
        )?;
        check(
            !self.data.use_varlen_attn || self.data.pack_to_max_length,
            "data.use_varlen_attn",
            "needs data.pack_to_max_length = true",
        )?;
        if let Some(t) = &self.template {
            t.resolve().map_err(|m| ("template", m))?;
        }
        check(
            self.template.is_some() || !needs_template(self.data.format),
            "template",
            "this data format needs a prompt template ([template] name = \"...\")",
        )?;
        if let Some(lora) = &self.lora {
            check(lora.r > 0, "lora.r", "must be at least 1")?;
            check(lora.alpha > 0.0, "lora.alpha", "must be positive")?;
            check(
                (0.0..1.0).contains(&lora.dropout),
                "lora.dropout",
                "must be in [0, 1)",
            )?;
        }
        if let Some(q) = &self.quantization {
            check(
                q.bits == 4,
                "quantization.bits",
                "only 4-bit NF4 is supported",
            )?;
            let frozen_llava = self.llava.as_ref().is_some_and(|l| l.freeze_llm);
            check(
                self.lora.is_some() || frozen_llava,
                "quantization",
                "a quantized base cannot be trained: add a [lora] section",
            )?;
            check(
                q.block_size > 0 && q.block_size % 2 == 0,
                "quantization.block_size",
                "must be a positive even number",
            )?;
        }
        let o = &self.optimizer;
        check(
            o.lr > 0.0 && o.lr.is_finite(),
            "optimizer.lr",
            "must be positive",
        )?;
        check(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "optimizer.betas",
            "each must be in [0, 1)",
        )?;
        check(o.eps > 0.0, "optimizer.eps", "must be positive")?;
        check(
            o.weight_decay >= 0.0,
            "optimizer.weight_decay",
            "must not be negative",
        )?;
        check(o.max_norm > 0.0, "optimizer.max_norm", "must be positive")?;
        let s = &self.schedule;
        check(
            (0.0..=1.0).contains(&s.warmup_ratio),
            "schedule.warmup_ratio",
            "must be in [0, 1]",
        )?;
        check(
            s.warmup_start_factor > 0.0 && s.warmup_start_factor <= 1.0,
            "schedule.warmup_start_factor",
            "must be in (0, 1]",
        )?;
        check(
            s.eta_min >= 0.0 && s.eta_min <= o.lr,
            "schedule.eta_min",
            "must be in [0, optimizer.lr]",
        )?;
        let t = &self.train;
        check(t.batch_size > 0, "train.batch_size", "must be at least 1")?;
        check(
            t.accumulative_counts > 0,
            "train.accumulative_counts",
            "must be at least 1",
        )?;
        check(
            t.max_epochs > 0 || t.max_iters.is_some(),
            "train.max_epochs",
            "must be at least 1",
        )?;
        check(
            t.max_iters != Some(0),
            "train.max_iters",
            "must be at least 1",
        )?;
        check(
            t.log_interval > 0,
            "train.log_interval",
            "must be at least 1",
        )?;
        check(
            !self.data.use_varlen_attn || t.batch_size == 1,
            "train.batch_size",
            "must be 1 with data.use_varlen_attn (as XTuner)",
        )?;
        let c = &self.checkpoint;
        check(
            c.save_steps > 0,
            "checkpoint.save_steps",
            "must be at least 1",
        )?;
        check(
            c.save_total_limit == -1 || c.save_total_limit > 0,
            "checkpoint.save_total_limit",
            "must be -1 (keep all) or at least 1",
        )?;
        check(
            self.evaluation.freq > 0,
            "evaluation.freq",
            "must be at least 1",
        )?;
        if let Some(llava) = &self.llava {
            check(
                llava.projector_depth > 0,
                "llava.projector_depth",
                "must be at least 1",
            )?;
            check(
                !self.data.pack_to_max_length,
                "data.pack_to_max_length",
                "LLaVA data is not packed: set it to false",
            )?;
        }
        Ok(())
    }

    /// The data-processing part of the config, with its template.
    ///
    /// # Errors
    /// A template section that does not resolve (already checked by `validate`).
    pub fn data_spec(&self) -> Result<DataSpec> {
        let template = self
            .template
            .as_ref()
            .map(TemplateConfig::resolve)
            .transpose()
            .map_err(|message| Error::Config {
                path: PathBuf::new(),
                message,
            })?;
        Ok(DataSpec {
            files: self.data.files.clone(),
            format: self.data.format,
            columns: self.data.columns.clone(),
            template,
            max_length: self.data.max_length,
            pack_to_max_length: self.data.pack_to_max_length,
            shuffle_before_pack: self.data.shuffle_before_pack,
            seed: self.train.seed,
            max_dataset_length: self.data.max_dataset_length,
            skip_bad_records: self.data.skip_bad_records,
        })
    }

    /// The tokenizer's location: `tokenizer.path`, else the model directory.
    pub fn tokenizer_path(&self) -> Option<&Path> {
        self.tokenizer
            .path
            .as_deref()
            .or(self.model.path.as_deref())
    }
}

fn needs_template(format: DataFormat) -> bool {
    !matches!(format, DataFormat::Pretrain | DataFormat::Tokenized)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "model"

[data]
files = ["data.json"]
format = "alpaca"

[template]
name = "internlm2_chat"

[lora]
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<LoadedConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my_run.toml");
        std::fs::write(&path, text).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        LoadedConfig::from_file(&path, &overrides)
    }

    #[test]
    fn defaults_are_xtuners_qlora_alpaca_recipe() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.name, "my_run");
        assert_eq!(c.work_dir(), Path::new("work_dirs/my_run"));
        let c = c.config;
        assert_eq!(
            c.optimizer,
            OptimizerConfig {
                lr: 2e-4,
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.0,
                max_norm: 1.0
            }
        );
        assert_eq!(c.schedule.warmup_ratio, 0.03);
        assert_eq!(
            (
                c.train.batch_size,
                c.train.accumulative_counts,
                c.train.max_epochs
            ),
            (1, 16, 3)
        );
        assert_eq!(c.data.max_length, 2048);
        assert!(c.data.pack_to_max_length && c.data.shuffle_before_pack && !c.data.use_varlen_attn);
        assert_eq!(
            (c.checkpoint.save_steps, c.checkpoint.save_total_limit),
            (500, 2)
        );
        assert_eq!(
            c.lora,
            Some(LoraConfig {
                r: 64,
                alpha: 16.0,
                dropout: 0.1,
                target_modules: vec![]
            })
        );
        assert!(c.model.activation_checkpointing);
        assert_eq!(c.data.files, vec![PathBuf::from("data.json")]);
    }

    #[test]
    fn unknown_keys_name_the_key_and_file() {
        let err = load(&format!("{MINIMAL}\n[train]\nbatch_sise = 2\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_sise") && err.contains("my_run.toml"),
            "{err}"
        );
        let err = load(&MINIMAL.replace("alpaca", "alpacca"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("alpacca") && err.contains("openai"), "{err}");
        let err = load(&MINIMAL.replace("internlm2_chat", "internlm9"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("internlm9"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (over, key) in [
            ("data.max_length=0", "data.max_length"),
            ("optimizer.lr=-1", "optimizer.lr"),
            ("lora.r=0", "lora.r"),
            (
                "checkpoint.save_total_limit=0",
                "checkpoint.save_total_limit",
            ),
            ("data.use_varlen_attn=true", "train.batch_size"),
        ] {
            let overrides: &[&str] = if key == "train.batch_size" {
                &[over, "train.batch_size=2"]
            } else {
                &[over]
            };
            let err = load(MINIMAL, overrides).unwrap_err().to_string();
            assert!(err.contains(key), "{over}: {err}");
        }
    }

    #[test]
    fn cfg_options_override_nested_keys() {
        let c = load(
            MINIMAL,
            &[
                "optimizer.lr=1e-3",
                "train.max_epochs=1",
                "data.format=openai",
                "evaluation.inputs=[\"hi\"]",
            ],
        )
        .unwrap()
        .config;
        assert_eq!(c.optimizer.lr, 1e-3);
        assert_eq!(c.train.max_epochs, 1);
        assert_eq!(c.data.format, DataFormat::Openai);
        assert_eq!(c.evaluation.inputs, vec!["hi".to_string()]);
        let err = load(MINIMAL, &["train.nope=1"]).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(load(MINIMAL, &["noequals"]).is_err());
    }

    #[test]
    fn custom_templates_from_the_config() {
        let text = MINIMAL.replace(
            "name = \"internlm2_chat\"",
            "instruction = \"Q: {input}\\nA: \"\nsep = \"\\n\"",
        );
        let spec = load(&text, &[]).unwrap().config.data_spec().unwrap();
        let t = spec.template.unwrap();
        assert_eq!(
            (t.instruction.as_str(), t.sep.as_str(), t.system),
            ("Q: {input}\nA: ", "\n", None)
        );
        let err = load(
            &MINIMAL.replace("name = \"internlm2_chat\"", "instruction = \"{question}\""),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("question"), "{err}");
        // A built-in with one field changed.
        let text = MINIMAL.replace(
            "name = \"internlm2_chat\"",
            "name = \"internlm2_chat\"\nsep = \"\"",
        );
        let t = load(&text, &[])
            .unwrap()
            .config
            .data_spec()
            .unwrap()
            .template
            .unwrap();
        assert_eq!((t.sep.as_str(), t.suffix.as_str()), ("", "<|im_end|>"));
    }
}
