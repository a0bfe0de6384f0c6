//! `xtuner convert`: a checkpoint's weights in the formats the Hugging Face world
//! loads (`pth_to_hf`), and a base model with an adapter merged in (`merge`). The
//! checkpoint's model is built again by its recipe ([`crate::recipe`]) and written by
//! [`crate::export`], the same code a run writes its checkpoints with; a checkpoint of
//! a ZeRO run gives its trainable weights from the f32 masters of its optimizer shards.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::checkpoint::{SaveDtype, copy_side_files, save_safetensors};
use xtuner_model::decoder::Decoder;

use crate::config::{LoadedConfig, PreferenceMethod, RunMode};
use crate::export::hf::{TOKENIZER_FILES, save_hf_model, write_decoder};
use crate::export::llava::write_llava;
use crate::export::llava_hf;
use crate::export::{create_dir, write_toml};
use crate::optim::zero::masters_from;
use crate::recipe::{decoder, llava, reward};
use crate::run::{StableIds, check_mode};
use crate::{Result, checkpoint};

/// The file beside an export that records the config it was made with.
pub const CONFIG_FILE: &str = "xtuner_config.toml";

/// The layout of a LLaVA export (XTuner's `--save-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveFormat {
    /// XTuner's: `projector/`, `llm_adapter/`, `visual_encoder_adapter/`, ...
    #[default]
    Xtuner,
    /// transformers' `LlavaForConditionalGeneration` with its processor.
    Huggingface,
    /// The original LLaVA repository's `LlavaLlamaForCausalLM`.
    Official,
}

/// `convert pth_to_hf`: the weights of `checkpoint` (written by a run of `loaded`)
/// in `out`: a PEFT adapter for LoRA, a model directory (sharded above
/// `max_shard_size` bytes) for a full fine-tune, a LLaVA in the layout `format` names;
/// and the config beside them.
///
/// # Errors
/// A checkpoint of another kind of run, or one that does not fit the config; a
/// `format` other than XTuner's for a model that is not a LLaVA; an unwritable `out`.
pub fn pth_to_hf<B: Backend>(
    loaded: &LoadedConfig,
    checkpoint: &Path,
    out: &Path,
    dtype: SaveDtype,
    max_shard_size: u64,
    format: SaveFormat,
    device: &B::Device,
) -> Result<()> {
    let config = &loaded.config;
    if format != SaveFormat::Xtuner && config.mode() != RunMode::Llava {
        return Err(crate::Error::Setting {
            key: "save_format".into(),
            message: "`huggingface` and `official` are LLaVA layouts; this config trains no LLaVA"
                .into(),
        });
    }
    let state = checkpoint::read_state(checkpoint)?;
    check_mode(checkpoint, state.mode, config)?;
    // `out` is made once the checkpoint's model is built: a checkpoint that does not
    // fit leaves nothing behind.
    if config
        .preference
        .as_ref()
        .is_some_and(|p| p.method == PreferenceMethod::Reward)
    {
        let (model, decoder, tokenizer) = reward::restore::<B>(loaded, checkpoint, device)?;
        let model = masters_from(model.map(&mut StableIds::new()), checkpoint)?;
        create_dir(out)?;
        reward::write_reward_model(
            &model,
            &decoder,
            config,
            &tokenizer,
            out,
            dtype,
            max_shard_size,
        )?;
        return write_toml(&out.join(CONFIG_FILE), config);
    }
    match config.mode() {
        RunMode::Llava => {
            let (model, decoder, tokenizer) = llava::restore::<B>(loaded, checkpoint, device)?;
            let model = masters_from(model.map(&mut StableIds::new()), checkpoint)?;
            let section = llava::llava_section(config)?;
            create_dir(out)?;
            let export = llava_hf::LlavaExport {
                model: &model,
                config,
                llava: section,
                decoder: &decoder,
                tokenizer: &tokenizer,
            };
            match format {
                SaveFormat::Xtuner => {
                    write_llava(&model, config, section, &decoder, &tokenizer, out, dtype)?;
                }
                SaveFormat::Huggingface => export.huggingface(out, dtype, max_shard_size)?,
                SaveFormat::Official => export.official(out, dtype, max_shard_size)?,
            }
        }
        RunMode::Lora => {
            let (model, decoder, tokenizer) = decoder::restore::<B>(loaded, checkpoint, device)?;
            let model = masters_from(model.map(&mut StableIds::new()), checkpoint)?;
            create_dir(out)?;
            write_decoder(&model, &decoder, config, out, dtype, &tokenizer)?;
        }
        RunMode::Full => {
            let (model, decoder, tokenizer) = decoder::restore::<B>(loaded, checkpoint, device)?;
            let model = masters_from(model.map(&mut StableIds::new()), checkpoint)?;
            create_dir(out)?;
            save_hf_model(&model, &decoder, &tokenizer, out, dtype, max_shard_size)?;
        }
    }
    write_toml(&out.join(CONFIG_FILE), config)
}

/// `convert merge`: the model in `base` with the PEFT adapter in `adapter` folded into
/// its weights, saved to `out` (sharded above `max_shard_size` bytes) with the base's
/// config and tokenizer files. Returns the weight files written.
///
/// # Errors
/// A base or adapter that cannot be read or do not fit; an unwritable `out`.
pub fn merge<B: Backend>(
    base: &Path,
    adapter: &Path,
    out: &Path,
    dtype: SaveDtype,
    max_shard_size: u64,
    device: &B::Device,
) -> Result<Vec<PathBuf>> {
    let adapter = PeftAdapter::open(adapter)?;
    let (model, decoder) = Decoder::<B>::load(base, Some(&adapter), device)?;
    create_dir(out)?;
    let files = save_safetensors(
        out,
        "model",
        model.to_hf_tensors(&decoder)?,
        dtype,
        Some(max_shard_size),
    )?;
    copy_side_files(base, &["config.json", "generation_config.json"], out)?;
    copy_side_files(base, &TOKENIZER_FILES, out)?;
    Ok(files)
}
