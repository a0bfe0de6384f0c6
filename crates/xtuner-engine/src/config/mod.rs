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
use xtuner_dataset::format::{ColumnMap, DataFormat};
use xtuner_dataset::preference::RecordFormat;
use xtuner_template::{ChatTemplate, PromptTemplate, SystemTemplate};

mod load;
mod preference;

pub use load::LoadedConfig;
pub use preference::{Objective, PreferenceConfig, PreferenceMethod};

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
    /// How the optimizer state is partitioned over data-parallel ranks (DeepSpeed's
    /// `zero_optimization`; `xtuner train --deepspeed` sets it).
    #[serde(default)]
    pub zero: ZeroConfig,
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
    /// Training on preference pairs (DPO, ORPO, reward models).
    #[serde(default)]
    pub preference: Option<PreferenceConfig>,
    /// What the run writes for dashboards.
    #[serde(default)]
    pub visualizer: VisualizerConfig,
}

/// `[visualizer]`: what the run writes for dashboards besides `train_log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisualizerConfig {
    /// TensorBoard event files in `work_dir/tensorboard/` (`tensorboard --logdir
    /// work_dirs`): loss, learning rate, gradient norm, tokens/s, memory, the recipe's
    /// numbers, and the evaluate-chat answers as text.
    #[serde(default = "yes")]
    pub tensorboard: bool,
}

impl Default for VisualizerConfig {
    fn default() -> Self {
        Self { tensorboard: true }
    }
}

/// Where the LLM comes from, and how its layers are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawModelConfig", into = "RawModelConfig")]
pub struct ModelConfig {
    /// The weights: a Hugging Face directory or a random-init preset.
    pub source: ModelSource,
    /// Recompute each decoder layer in the backward pass to save memory.
    pub activation_checkpointing: bool,
}

/// Where a run's LLM comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model directory (config.json + safetensors): `model.path`.
    Path(PathBuf),
    /// A named shape initialised at random, seeded by `train.seed` (demos and
    /// benchmarks): `model.preset`, e.g. `internlm2-tiny`.
    Preset(String),
}

impl ModelConfig {
    /// The model directory, when the model is one.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            ModelSource::Path(path) => Some(path),
            ModelSource::Preset(_) => None,
        }
    }
}

/// `[model]` as the file spells it: exactly one of `path` and `preset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelConfig {
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    preset: Option<String>,
    #[serde(default = "yes")]
    activation_checkpointing: bool,
}

impl TryFrom<RawModelConfig> for ModelConfig {
    type Error = String;

    fn try_from(raw: RawModelConfig) -> std::result::Result<Self, String> {
        let source = match (raw.path, raw.preset) {
            (Some(path), None) => ModelSource::Path(path),
            (None, Some(preset)) => ModelSource::Preset(preset),
            _ => {
                return Err(
                    "`model`: give exactly one of `path` (a Hugging Face model dir) \
                            and `preset` (a random-init shape)"
                        .into(),
                );
            }
        };
        Ok(Self {
            source,
            activation_checkpointing: raw.activation_checkpointing,
        })
    }
}

impl From<ModelConfig> for RawModelConfig {
    fn from(model: ModelConfig) -> Self {
        let (path, preset) = match model.source {
            ModelSource::Path(path) => (Some(path), None),
            ModelSource::Preset(name) => (None, Some(name)),
        };
        Self {
            path,
            preset,
            activation_checkpointing: model.activation_checkpointing,
        }
    }
}

/// The kind of run a config describes, recorded in every checkpoint's `state.json`:
/// a checkpoint resumes and converts only under a config of its own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// LoRA (or QLoRA) adapters on the decoder.
    Lora,
    /// Every weight of the decoder (fine-tuning or incremental pre-training).
    Full,
    /// LLaVA: the decoder, the vision tower and the projector.
    Llava,
}

impl std::fmt::Display for RunMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lora => "lora",
            Self::Full => "full",
            Self::Llava => "llava",
        })
    }
}

impl TrainConfig {
    /// The kind of run: LLaVA with a `[llava]` section, else LoRA with a `[lora]`
    /// section, else full.
    pub fn mode(&self) -> RunMode {
        if self.llava.is_some() {
            RunMode::Llava
        } else if self.lora.is_some() {
            RunMode::Lora
        } else {
            RunMode::Full
        }
    }
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
    /// Record format: one of XTuner's map functions, `conversation` or `tokenized`; or
    /// a preference format (`intel_orca_dpo`, `orpo_dpo_mix_40k`, `preference`) with a
    /// `[preference]` section.
    pub format: RecordFormat,
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
    /// A built-in template (XTuner's name), or `chat_template`: the tokenizer's own
    /// Jinja template.
    #[serde(default)]
    pub name: Option<TemplateName>,
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

/// A `[template] name`: one of XTuner's templates, or the tokenizer's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateName {
    /// A built-in template.
    Builtin(PromptTemplate),
    /// `chat_template`: the tokenizer's Jinja `chat_template`, labels on the answers.
    ChatTemplate,
}

/// The name that picks the tokenizer's own template.
pub const CHAT_TEMPLATE: &str = "chat_template";

impl Serialize for TemplateName {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Builtin(t) => t.serialize(serializer),
            Self::ChatTemplate => serializer.serialize_str(CHAT_TEMPLATE),
        }
    }
}

impl<'de> Deserialize<'de> for TemplateName {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name == CHAT_TEMPLATE {
            return Ok(Self::ChatTemplate);
        }
        name.parse::<PromptTemplate>()
            .map(Self::Builtin)
            .map_err(|e| {
                serde::de::Error::custom(format!("{e}, or `{CHAT_TEMPLATE}` (the tokenizer's own)"))
            })
    }
}

impl TemplateConfig {
    /// Whether the section picks the tokenizer's own Jinja template.
    pub fn is_chat_template(&self) -> bool {
        self.name == Some(TemplateName::ChatTemplate)
    }

    /// The template this section describes.
    ///
    /// # Errors
    /// Neither a name nor an instruction ([`Error::Setting`]), or a field with a bad
    /// placeholder ([`Error::Template`]).
    pub fn resolve(&self) -> Result<ChatTemplate> {
        let mut template = match (self.name, &self.instruction) {
            (Some(TemplateName::ChatTemplate), _) => {
                return Err(Error::setting(
                    "template",
                    "`chat_template` is the tokenizer's Jinja template: it has no fields to set",
                ));
            }
            (Some(TemplateName::Builtin(name)), _) => name.template(),
            (None, Some(instruction)) => ChatTemplate {
                name: "custom".into(),
                system: None,
                instruction: instruction.clone(),
                suffix: String::new(),
                suffix_as_eos: false,
                sep: String::new(),
                stop_words: Vec::new(),
            },
            (None, None) => {
                return Err(Error::setting(
                    "template",
                    "give `name` (a built-in template) or `instruction`",
                ));
            }
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
        template.validate()?;
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

/// ZeRO: the optimizer state partitioned over the data-parallel ranks, as DeepSpeed's
/// `zero_optimization` (the optimizer's `zero` module does the sharding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroConfig {
    /// 0: every rank holds the whole optimizer state (plain data parallel); 1: each
    /// rank holds 1/N of the f32 master weights and AdamW's moments; 2: the gradients
    /// are reduce-scattered into 1/N shards too.
    #[serde(default)]
    pub stage: u8,
    /// Keep the optimizer shard in host memory (`offload_optimizer.device = "cpu"`).
    #[serde(default)]
    pub offload_optimizer: bool,
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
        assert_eq!(c.data.format, RecordFormat::Sample(DataFormat::Openai));
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

    /// The evaluate hook's system prompt needs a template with a SYSTEM field: a config
    /// mistake found when the config is read, not at the first evaluation.
    #[test]
    fn an_evaluation_system_prompt_needs_a_system_field() {
        let bad = [
            "template.name=\"minicpm\"",
            "evaluation.inputs=[\"hi\"]",
            "evaluation.system=\"Be brief.\"",
        ];
        let err = load(MINIMAL, &bad).unwrap_err();
        assert!(
            err.is_usage() && err.to_string().contains("evaluation.system"),
            "{err}"
        );
        // Without inputs there is no evaluation, and with SYSTEM it fits.
        load(MINIMAL, &bad[..1]).unwrap();
        load(MINIMAL, &bad[1..]).unwrap();
    }
}
