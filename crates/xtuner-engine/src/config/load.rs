//! Loading a config: the TOML text, `--cfg-options` overrides, and the checks of
//! values that parse but make no sense, each naming its key and the file.

use std::path::{Path, PathBuf};

use xtuner_dataset::DataSpec;
use xtuner_dataset::preference::{PairOptions, PairSpec, RecordFormat};

use super::{TemplateConfig, TrainConfig, needs_template};
use crate::{Error, Result};

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
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                message: "a config file needs a name (it names the work dir)".into(),
            })?;
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
        config.validate().map_err(|e| bad(e.to_string()))?;
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
    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// [`Error::Setting`], naming the key and the reason.
    pub fn validate(&self) -> Result<()> {
        fn check(ok: bool, key: &str, message: &str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::setting(key, message))
            }
        }
        check(
            self.model.path().is_some() || self.tokenizer.path.is_some(),
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
        let pairs = matches!(self.data.format, RecordFormat::Pair(_));
        check(
            pairs == self.preference.is_some(),
            "preference",
            if pairs {
                "a preference data format needs a [preference] section (method = \"dpo\", \"orpo\" or \"reward\")"
            } else {
                "preference training needs a preference data format (data.format = \"intel_orca_dpo\", \"orpo_dpo_mix_40k\" or \"preference\")"
            },
        )?;
        check(
            !self.data.use_varlen_attn || self.data.pack_to_max_length || pairs,
            "data.use_varlen_attn",
            "needs data.pack_to_max_length = true",
        )?;
        if let Some(p) = &self.preference {
            p.objective()?;
            check(
                self.llava.is_none(),
                "preference",
                "preference training of LLaVA models is not built",
            )?;
            check(
                p.max_packed_length > 0,
                "preference.max_packed_length",
                "must be at least 1",
            )?;
        }
        match &self.template {
            // The tokenizer's own template: fields beside it would be ignored, so they
            // are refused.
            Some(t) if t.is_chat_template() => {
                let fields = [
                    t.system.is_some(),
                    t.instruction.is_some(),
                    t.suffix.is_some(),
                    t.suffix_as_eos.is_some(),
                    t.sep.is_some(),
                    t.stop_words.is_some(),
                ];
                check(
                    !fields.contains(&true),
                    "template",
                    "`chat_template` is the tokenizer's Jinja template: it has no fields to set",
                )?;
            }
            Some(t) => {
                let template = t.resolve().map_err(|e| match e {
                    Error::Setting { .. } => e,
                    other => Error::setting("template", other.to_string()),
                })?;
                check(
                    self.evaluation.inputs.is_empty()
                        || self.evaluation.system_prompt().is_empty()
                        || template.system.is_some(),
                    "evaluation.system",
                    "the template has no SYSTEM field to put a system prompt in",
                )?;
            }
            None => {}
        }
        check(
            self.template.is_some()
                || !matches!(self.data.format, RecordFormat::Sample(f) if needs_template(f)),
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
        check(
            self.zero.stage <= 2,
            "zero.stage",
            "must be 0, 1 or 2 (ZeRO-3 is not built)",
        )?;
        check(
            self.zero.stage > 0 || !self.zero.offload_optimizer,
            "zero.offload_optimizer",
            "offloads a ZeRO shard: needs zero.stage 1 or 2",
        )?;
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
        let RecordFormat::Sample(format) = self.data.format else {
            return Err(Error::setting(
                "data.format",
                "preference pairs are not samples: this run takes them through pair_spec",
            ));
        };
        let chat_template = self
            .template
            .as_ref()
            .is_some_and(TemplateConfig::is_chat_template);
        let template = self
            .template
            .as_ref()
            .filter(|t| !t.is_chat_template())
            .map(TemplateConfig::resolve)
            .transpose()?;
        Ok(DataSpec {
            files: self.data.files.clone(),
            format,
            columns: self.data.columns.clone(),
            template,
            chat_template,
            max_length: self.data.max_length,
            pack_to_max_length: self.data.pack_to_max_length,
            shuffle_before_pack: self.data.shuffle_before_pack,
            seed: self.train.seed,
            max_dataset_length: self.data.max_dataset_length,
            skip_bad_records: self.data.skip_bad_records,
        })
    }

    /// The data-processing part of a preference config.
    ///
    /// # Errors
    /// A config whose data are not preference pairs.
    pub fn pair_spec(&self) -> Result<PairSpec> {
        let (RecordFormat::Pair(format), Some(preference)) = (self.data.format, &self.preference)
        else {
            return Err(Error::setting(
                "preference",
                "this config has no preference data",
            ));
        };
        let reward = preference.method == super::PreferenceMethod::Reward;
        Ok(PairSpec {
            files: self.data.files.clone(),
            format,
            options: PairOptions {
                max_length: self.data.max_length,
                reward_token_id: preference.reward_token_id.filter(|_| reward),
            },
            max_packed_length: self
                .data
                .use_varlen_attn
                .then_some(preference.max_packed_length),
            shuffle_before_pack: self.data.shuffle_before_pack,
            seed: self.train.seed,
            max_dataset_length: self.data.max_dataset_length,
        })
    }

    /// The tokenizer's location: `tokenizer.path`, else the model directory.
    pub fn tokenizer_path(&self) -> Option<&Path> {
        self.tokenizer.path.as_deref().or(self.model.path())
    }
}
