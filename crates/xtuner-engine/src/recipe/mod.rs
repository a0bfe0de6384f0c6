//! The recipes of the one training loop, and the set-up they share.
//!
//! A recipe ([`crate::run::Recipe`]) is a kind of run: [`decoder`] (LoRA, QLoRA, full
//! fine-tuning, incremental pre-training), [`llava`] (XTuner's two LLaVA stages) and
//! [`preference`] (DPO and ORPO on preference pairs) and [`reward`] (reward models).
//! Every recipe starts the same way: [`prepare`] the data and tokenizer, build the
//! [`base_model`], find the resume point, then give each part of the model its
//! adapters, freezing or saved weights through one policy, [`attach_part`].

pub mod decoder;
pub mod llava;
pub mod preference;
pub mod reward;

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use xtuner_dataset::preference::RecordFormat;
use xtuner_dataset::{ProcessedDataset, Tokenizer, load_or_process, load_or_process_pairs};
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::checkpoint::{Checkpoint, SaveDtype};
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::nn::linear::LinearLayers;

use crate::collective::Collective;
use crate::config::{LoadedConfig, LoraConfig, ModelSource, TrainConfig};
use crate::export::DEFAULT_SHARD_SIZE;
use crate::export::hf::save_hf_model;
use crate::optim::MASTER_DTYPE;
use crate::run::{Resume, Start, resume_point};
use crate::{Error, Result, lora};

/// Runs a run's set-up on rank 0 first: the other ranks of a data-parallel run wait
/// until it is done, then run it themselves (`true`: reuse what rank 0 built, the
/// processed data set from the cache and a preset base from `base_model/`), so that
/// only rank 0 processes the data and draws a random base.
///
/// # Errors
/// The set-up's own, or ranks that do not meet.
pub fn rank_zero_first<T>(
    collective: &dyn Collective,
    setup: impl FnOnce(bool) -> Result<T>,
) -> Result<T> {
    if collective.world_size() == 1 {
        return setup(false);
    }
    let lead = collective.rank() == 0;
    if !lead {
        collective.barrier()?;
    }
    let out = setup(!lead)?;
    if lead {
        collective.barrier()?;
    }
    Ok(out)
}

/// The data set and tokenizer a config names, and the work dir created.
///
/// # Errors
/// Bad data, a missing tokenizer, an unwritable work dir.
pub fn prepare(loaded: &LoadedConfig, work_dir: &Path) -> Result<(ProcessedDataset, Tokenizer)> {
    let config = &loaded.config;
    let tokenizer = tokenizer_path(loaded)?;
    let cache = &config.data.cache_dir;
    let (dataset, _) = match config.data.format {
        RecordFormat::Sample(_) => load_or_process(&config.data_spec()?, tokenizer, cache)?,
        RecordFormat::Pair(_) => load_or_process_pairs(&config.pair_spec()?, tokenizer, cache)?,
    };
    let tokenizer = Tokenizer::from_path(tokenizer)?;
    std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
    Ok((dataset, tokenizer))
}

/// The tokenizer a config names: `tokenizer.path`, else the model directory.
///
/// # Errors
/// Neither is given (a preset model with no tokenizer).
pub fn tokenizer_path(loaded: &LoadedConfig) -> Result<&Path> {
    loaded.config.tokenizer_path().ok_or_else(|| Error::Config {
        path: loaded.path.clone(),
        message: "`tokenizer.path`: required".into(),
    })
}

/// The model a config describes, before adapters: a Hugging Face directory, or a
/// preset shape with random weights seeded by `train.seed`.
///
/// # Errors
/// A missing or bad model directory, an unknown preset.
pub fn build_model<B: Backend>(
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<(Decoder<B>, DecoderConfig)> {
    match &config.model.source {
        ModelSource::Path(path) => {
            if !path.join("config.json").is_file() {
                return Err(Error::Config {
                    path: path.clone(),
                    message:
                        "`model.path`: no config.json here (not a Hugging Face model directory)"
                            .into(),
                });
            }
            Ok(Decoder::load(path, None, device)?)
        }
        ModelSource::Preset(name) => {
            let decoder = DecoderConfig::preset(name, tokenizer.vocab_size()).ok_or_else(|| {
                Error::setting(
                    "model.preset",
                    format!(
                        "unknown preset `{name}`; known: {}",
                        DecoderConfig::PRESETS.join(", ")
                    ),
                )
            })?;
            B::seed(device, config.train.seed);
            Ok((Decoder::random(&decoder, device)?, decoder))
        }
    }
}

/// The base decoder of a run, NF4-quantized when the config asks; a preset (random)
/// base is saved once to `work_dir/base_model`, and read from there with `reuse_saved`
/// (the other ranks of a data-parallel run take rank 0's).
///
/// # Errors
/// As [`build_model`]; an unwritable work dir.
pub fn base_model<B: Backend>(
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    work_dir: &Path,
    reuse_saved: bool,
    device: &B::Device,
) -> Result<(Decoder<B>, DecoderConfig)> {
    let saved = work_dir.join("base_model");
    let (base, decoder) = match &config.model.source {
        ModelSource::Preset(_) if reuse_saved && saved.join("config.json").is_file() => {
            Decoder::load(&saved, None, device)?
        }
        _ => build_model::<B>(config, tokenizer, device)?,
    };
    if config.model.path().is_none() && !reuse_saved {
        save_base_model(&base, &decoder, tokenizer, &saved)?;
    }
    let base = match &config.quantization {
        Some(q) => lora::quantize_base(base, &decoder, q.block_size, q.double_quant)?,
        None => base,
    };
    Ok((base, decoder))
}

/// A randomly initialised (preset) base is written once to `work_dir/base_model` as a
/// Hugging Face model directory, so that its adapters can be chatted with, evaluated
/// and merged like those of a downloaded model.
fn save_base_model<B: Backend>(
    model: &Decoder<B>,
    decoder: &DecoderConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
) -> Result<()> {
    if dir.join("config.json").is_file() {
        return Ok(());
    }
    let tmp_parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".base_model")
        .tempdir_in(tmp_parent)
        .map_err(|e| Error::io(tmp_parent, e))?;
    save_hf_model(
        model,
        decoder,
        tokenizer,
        tmp.path(),
        SaveDtype::F32,
        DEFAULT_SHARD_SIZE,
    )?;
    let kept = tmp.keep();
    std::fs::rename(&kept, dir).map_err(|e| Error::io(dir, e))
}

/// Where a run starts: resumed from the checkpoint the config's resume point names,
/// with the model `ready` builds from it; or fresh, with the model `ready` builds from
/// nothing (new adapters and projectors are drawn on the host from the run's seed, the
/// same on every backend; the backend's generator is seeded with it too).
///
/// # Errors
/// A checkpoint of another config; whatever `ready` returns.
pub fn start<B: Backend, M>(
    config: &TrainConfig,
    work_dir: &Path,
    resume: Option<Resume>,
    device: &B::Device,
    ready: impl FnOnce(Option<&Path>) -> Result<M>,
) -> Result<Start<M>> {
    match resume_point(config, work_dir, resume)? {
        Some((dir, iter)) => Ok(Start {
            model: ready(Some(&dir))?,
            iter,
            checkpoint: Some(dir),
        }),
        None => {
            B::seed(device, init_seed(config));
            Ok(Start {
                model: ready(None)?,
                iter: 0,
                checkpoint: None,
            })
        }
    }
}

/// The seed that a fresh run's new weights (adapters, a projector) are drawn with: the
/// config's seed plus one (a preset base is drawn with the seed itself).
pub fn init_seed(config: &TrainConfig) -> u64 {
    config.train.seed.wrapping_add(1)
}

/// Where a part of the model was saved in a checkpoint: its PEFT adapter directory
/// (a LoRA run) and the directory holding its full weights (a part trained in full).
#[derive(Debug, Clone, Copy)]
pub struct Saved<'a> {
    /// The PEFT adapter directory.
    pub adapter: &'a Path,
    /// The directory of the full weights.
    pub full: &'a Path,
}

/// The one policy that readies a part of the model (the decoder, the vision tower)
/// for a run or an export:
/// - with `lora`: adapters attached to a frozen base, read from `saved.adapter` when
///   resuming or converting, fresh (seeded with `seed`) otherwise;
/// - without, `frozen`: the part as it is, frozen;
/// - without, trained in full: the weights from `saved.full` (`load_full`), or the
///   part as it is for a fresh run.
///
/// # Errors
/// An adapter or checkpoint that does not fit the part; an unknown LoRA target.
#[allow(clippy::too_many_arguments)]
pub fn attach_part<B: Backend, M: LinearLayers<B> + Module<B>>(
    part: M,
    config: &M::Config,
    lora: Option<&LoraConfig>,
    frozen: bool,
    saved: Option<Saved<'_>>,
    seed: u64,
    device: &B::Device,
    load_full: impl FnOnce(&Path) -> Result<M>,
) -> Result<M> {
    match (lora, saved) {
        (Some(l), Some(saved)) => lora::attach_peft(
            part,
            config,
            &PeftAdapter::open(saved.adapter)?,
            l.dropout,
            device,
        ),
        (Some(l), None) => lora::attach(part, config, l, seed, device),
        (None, _) if frozen => Ok(part.no_grad()),
        (None, Some(saved)) => {
            // The checkpoint holds every weight; the part is not needed alongside.
            drop(part);
            load_full(saved.full)
        }
        (None, None) => Ok(part),
    }
}

/// The whole decoder as a full fine-tune's checkpoint or export directory holds it
/// (`model.safetensors`, or the shards of a large model), its weights in f32: a run's
/// master weights, not rounded to a bf16 backend's default on the way in.
///
/// # Errors
/// A missing or unreadable checkpoint, or weights that do not fit `decoder`.
pub fn load_full_weights<B: Backend>(
    dir: &Path,
    decoder: &DecoderConfig,
    device: &B::Device,
) -> Result<Decoder<B>> {
    let ckpt = Checkpoint::open(dir)?.with_dtype(MASTER_DTYPE);
    Ok(Decoder::load_from(&ckpt, decoder, None, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use xtuner_model::checkpoint::save_safetensors;

    /// A model larger than the shard limit is saved in shards; resuming and converting
    /// read them through the index.
    #[test]
    fn full_weights_load_from_shards() {
        type B = NdArray<f32>;
        let device = Default::default();
        let decoder = DecoderConfig::preset("internlm2-tiny", 300).unwrap();
        let model = Decoder::<B>::random(&decoder, &device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = save_safetensors(
            dir.path(),
            "model",
            model.to_hf_tensors(&decoder).unwrap(),
            SaveDtype::F32,
            Some(100_000),
        )
        .unwrap();
        assert!(files.len() > 2, "{files:?}");
        assert!(!dir.path().join("model.safetensors").exists());
        let loaded = load_full_weights::<B>(dir.path(), &decoder, &device).unwrap();
        for ((key, want), (_, got)) in model
            .to_hf_tensors(&decoder)
            .unwrap()
            .into_iter()
            .zip(loaded.to_hf_tensors(&decoder).unwrap())
        {
            assert_eq!(got, want, "{key}");
        }
    }
}
