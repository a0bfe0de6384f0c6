//! LLaVA training, XTuner's `LLaVAModel` recipes: the LLM, the CLIP vision tower and
//! the projector as one module, trained by the same loop as the decoder alone.
//!
//! Which parts learn is the config's `[llava]` section:
//! - pretrain (`freeze_llm`, `freeze_visual_encoder`): the projector only, from scratch;
//! - finetune: the projector (from `pretrained_projector`), LoRA on the LLM (`[lora]`)
//!   and optionally on the vision tower (`[llava.visual_encoder_lora]`); an LLM or
//!   tower that is neither frozen nor adapted is trained in full.
//!
//! Checkpoints and `convert pth_to_hf` write XTuner's LLaVA layout: `projector/`
//! (always), `llm_adapter/` (PEFT) or the full LLM at the top, and
//! `visual_encoder_adapter/` (PEFT) or `visual_encoder/` (full CLIP), each only when
//! that part was trained.
//!
//! Every image of the data set is checked (its header read) before the first step, so
//! a missing or unreadable file is reported with its path up front, or skipped and
//! counted when `data.skip_bad_records` is set.

use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use xtuner_dataset::collate::collate;
use xtuner_dataset::{PackedRow, ProcessedDataset, Tokenizer};
use xtuner_model::checkpoint::{Checkpoint, SaveDtype};
use xtuner_model::clip_vit::ClipVisionTower;
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::image::{ImageProcessor, probe};
use xtuner_model::llava::{Llava, image_features};
use xtuner_model::nn::activation::HiddenAct;
use xtuner_model::nn::linear::{Linear, LinearLayers};
use xtuner_model::projector::{Projector, ProjectorConfig};

use super::{
    Saved, attach_part, base_model, init_seed, load_full_weights, prepare, rank_zero_first, start,
};
use crate::chat::evaluate_chat;
use crate::config::{LlavaConfig, LoadedConfig, TrainConfig};
use crate::export::llava::write_llava;
use crate::optim::MASTER_DTYPE;
use crate::run::{self, MicroStep, Recipe, RunContext, TrainSummary};
use crate::step::llava_loss_backward;
use crate::{Error, Result, init};

/// Runs (or resumes) a LLaVA config.
///
/// # Errors
/// As [`run::run`]; a missing or unreadable image (unless skipped).
pub fn train<B: AutodiffBackend>(
    ctx: RunContext<'_, B>,
    resume: Option<run::Resume>,
) -> Result<TrainSummary> {
    let (loaded, work_dir, device) = (ctx.loaded, ctx.work_dir, ctx.device);
    let collective = ctx.collective;
    let config = &loaded.config;
    let llava = llava_section(config)?;
    let (dataset, tokenizer, images, llm, decoder) = rank_zero_first(collective, |reuse| {
        let (dataset, tokenizer) = prepare(loaded, work_dir)?;
        let images = Images::check(llava, &dataset, config.data.skip_bad_records)?;
        let (llm, decoder) = base_model::<B>(config, &tokenizer, work_dir, reuse, device)?;
        Ok((dataset, tokenizer, images, llm, decoder))
    })?;
    let start = start::<B, _>(config, work_dir, resume, device, |checkpoint| {
        assemble(config, llm, &decoder, checkpoint, device)
    })?;
    let eval_image = match &config.evaluation.image {
        Some(path) if !config.evaluation.inputs.is_empty() => {
            // XTuner's hook always pads the evaluation image to a square.
            let processor = ImageProcessor::from_file(
                llava.visual_encoder.join("preprocessor_config.json"),
                true,
            )?;
            Some(processor.preprocess_file::<B>(path, device)?.into_data())
        }
        _ => None,
    };
    let recipe = LlavaRecipe {
        config,
        llava,
        dataset: &dataset,
        images,
        decoder: &decoder,
        tokenizer: &tokenizer,
        eval_image,
        device,
    };
    run::run(&recipe, start, ctx)
}

/// Builds the model of a LLaVA checkpoint again (the parts the config names, the
/// trained ones read from the checkpoint), with its decoder config and tokenizer.
///
/// # Errors
/// A checkpoint that does not fit the config.
pub fn restore<B: Backend>(
    loaded: &LoadedConfig,
    checkpoint: &Path,
    device: &B::Device,
) -> Result<(Llava<B>, DecoderConfig, Tokenizer)> {
    let config = &loaded.config;
    let tokenizer = Tokenizer::from_path(super::tokenizer_path(loaded)?)?;
    let (llm, decoder) = super::build_model::<B>(config, &tokenizer, device)?;
    let model = assemble(config, llm, &decoder, Some(checkpoint), device)?;
    Ok((model, decoder, tokenizer))
}

/// The `[llava]` section of a LLaVA config.
///
/// # Errors
/// A config without one.
pub fn llava_section(config: &TrainConfig) -> Result<&LlavaConfig> {
    config
        .llava
        .as_ref()
        .ok_or_else(|| Error::setting("llava", "this is not a LLaVA config"))
}

/// The LLaVA module of a config: the vision tower from `llava.visual_encoder`, the
/// projector from the checkpoint, `pretrained_projector` or fresh, adapters attached and
/// frozen parts frozen. With `checkpoint`, the trained parts are read from it.
///
/// # Errors
/// Missing or mismatched parts, naming the file.
pub fn assemble<B: Backend>(
    config: &TrainConfig,
    llm: Decoder<B>,
    decoder: &DecoderConfig,
    checkpoint: Option<&Path>,
    device: &B::Device,
) -> Result<Llava<B>> {
    let llava = llava_section(config)?;
    let seed = init_seed(config);
    let llm_saved = checkpoint.map(|dir| (dir.join("llm_adapter"), dir.to_path_buf()));
    let llm = attach_part(
        llm,
        decoder,
        config.lora.as_ref(),
        llava.freeze_llm,
        llm_saved
            .as_ref()
            .map(|(adapter, full)| Saved { adapter, full }),
        seed,
        device,
        |dir| load_full_weights(dir, decoder, device),
    )?;
    let (tower, tower_config) = ClipVisionTower::<B>::load(&llava.visual_encoder, device)?;
    let tower_saved = checkpoint.map(|dir| {
        (
            dir.join("visual_encoder_adapter"),
            dir.join("visual_encoder"),
        )
    });
    let tower = attach_part(
        tower,
        &(),
        llava.visual_encoder_lora.as_ref(),
        llava.freeze_visual_encoder,
        tower_saved
            .as_ref()
            .map(|(adapter, full)| Saved { adapter, full }),
        seed,
        device,
        |dir| {
            let ckpt = Checkpoint::open(dir)?.with_dtype(MASTER_DTYPE);
            Ok(ClipVisionTower::load_from(&ckpt, &tower_config, device)?)
        },
    )?;
    let projector_config = ProjectorConfig {
        visual_hidden_size: tower_config.hidden_size,
        llm_hidden_size: decoder.hidden_size,
        depth: llava.projector_depth,
        hidden_act: HiddenAct::Gelu,
        bias: true,
    };
    let projector_dir = match (checkpoint, &llava.pretrained_projector) {
        (Some(dir), _) => Some(dir.join("projector")),
        // A work dir (its newest checkpoint), a checkpoint or export holding
        // projector/, or a projector directory.
        (None, Some(path)) if path.join(crate::checkpoint::LAST_CHECKPOINT).is_file() => {
            let latest = crate::checkpoint::latest(path)?.ok_or_else(|| Error::Config {
                path: path.clone(),
                message: "`llava.pretrained_projector`: this work dir has no checkpoint".into(),
            })?;
            Some(latest.join("projector"))
        }
        (None, Some(path)) if path.join("projector").is_dir() => Some(path.join("projector")),
        (None, Some(path)) => Some(path.clone()),
        (None, None) => None,
    };
    let projector = match projector_dir {
        Some(dir) => {
            // Trained here: its f32 weights stay f32 (the master copy) on a bf16 backend.
            let (projector, found) = Projector::load(&dir, Some(MASTER_DTYPE), device)?;
            if found.visual_hidden_size != projector_config.visual_hidden_size
                || found.llm_hidden_size != projector_config.llm_hidden_size
            {
                return Err(Error::Config {
                    path: dir,
                    message: format!(
                        "the projector maps {} → {}, but the vision tower and LLM need {} → {}",
                        found.visual_hidden_size,
                        found.llm_hidden_size,
                        projector_config.visual_hidden_size,
                        projector_config.llm_hidden_size
                    ),
                });
            }
            projector
        }
        None => fresh_projector(&projector_config, seed, device)?,
    };
    Ok(Llava {
        llm,
        visual_encoder: tower,
        projector,
    })
}

/// A new projector as PyTorch's `nn.Linear` starts it (weight and bias uniform in
/// ±1/√d_in), drawn on the host ([`crate::init`]) as `projector.model.{2i}.weight` and
/// `.bias`, so a config's pretraining starts from the same projector on every backend.
///
/// # Errors
/// A config that does not validate.
fn fresh_projector<B: Backend>(
    config: &ProjectorConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Projector<B>> {
    config.validate()?;
    let model = (0..config.depth)
        .map(|i| {
            let (d_in, d_out) = config.dims(i);
            let bound = init::kaiming_bound(d_in);
            let key = format!("projector.model.{}", 2 * i);
            let weight =
                init::uniform(&format!("{key}.weight"), [d_in, d_out], bound, seed, device);
            let bias = config
                .bias
                .then(|| init::uniform(&format!("{key}.bias"), [d_out], bound, seed, device));
            Linear::from_tensors(weight, bias)
        })
        .collect();
    Ok(Projector {
        model,
        activation: config.hidden_act,
    })
}

/// The images of the training rows: which rows train (all, or those whose image
/// could be read when bad records are skipped) and how each image is preprocessed.
struct Images {
    processor: ImageProcessor,
    /// Dataset row of each training row.
    rows: Vec<usize>,
    /// Image file of each training row (`None`: text only).
    files: Vec<Option<PathBuf>>,
}

impl Images {
    /// Reads every image's header before training.
    fn check(llava: &LlavaConfig, dataset: &ProcessedDataset, skip_bad: bool) -> Result<Self> {
        let processor = ImageProcessor::from_file(
            llava.visual_encoder.join("preprocessor_config.json"),
            llava.pad_image_to_square,
        )?;
        let (mut rows, mut files, mut skipped) = (Vec::new(), Vec::new(), 0usize);
        for row in 0..dataset.rows.len() {
            let name = dataset.images.get(row).and_then(Option::as_ref);
            let file = name.map(|name| llava.image_folder.join(name));
            if let (Some(name), Some(path)) = (name, &file)
                && let Err(e) = probe(path)
            {
                if skip_bad {
                    skipped += 1;
                    continue;
                }
                let message = match e {
                    xtuner_model::Error::Image { message, .. } => message,
                    other => other.to_string(),
                };
                return Err(Error::BadImage {
                    path: path.clone(),
                    name: name.clone(),
                    record: dataset.sources.get(row).map_or_else(
                        || format!("training sample {row}"),
                        |s| format!("the record at {s}"),
                    ),
                    message,
                });
            }
            rows.push(row);
            files.push(file);
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "samples skipped: their image is missing or unreadable"
            );
        }
        if rows.is_empty() {
            return Err(Error::Config {
                path: llava.image_folder.clone(),
                message: "no training sample has a readable image".into(),
            });
        }
        Ok(Self {
            processor,
            rows,
            files,
        })
    }

    /// XTuner's `modality_length`: the sample's length, negative for text only.
    fn modality_lengths(&self, dataset: &ProcessedDataset) -> Vec<i64> {
        self.rows
            .iter()
            .zip(&self.files)
            .map(|(&row, file)| {
                let len = dataset.rows[row].len() as i64;
                if file.is_some() { len } else { -len }
            })
            .collect()
    }

    /// `[N, 3, H, W]` for training rows `rows`; text-only rows get the blank image.
    fn pixel_values<B: Backend>(&self, rows: &[usize], device: &B::Device) -> Result<Tensor<B, 4>> {
        let files: Vec<Option<PathBuf>> = rows
            .iter()
            .map(|&i| self.files.get(i).cloned().flatten())
            .collect();
        Ok(self.processor.preprocess_batch(&files, device)?)
    }
}

struct LlavaRecipe<'a, B: Backend> {
    config: &'a TrainConfig,
    llava: &'a LlavaConfig,
    dataset: &'a ProcessedDataset,
    images: Images,
    decoder: &'a DecoderConfig,
    tokenizer: &'a Tokenizer,
    /// The evaluation image, preprocessed (`[3, H, W]`).
    eval_image: Option<TensorData>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Recipe<B> for LlavaRecipe<'_, B> {
    type Model = Llava<B>;

    fn lengths(&self) -> Vec<i64> {
        self.images.modality_lengths(self.dataset)
    }

    fn nf4_bytes(&self, model: &Llava<B>) -> usize {
        model.llm.nf4_bytes(self.decoder) + model.visual_encoder.nf4_bytes(&())
    }

    fn forward_backward(
        &self,
        model: &Llava<B>,
        rows: &[usize],
        accumulative_counts: usize,
    ) -> Result<MicroStep> {
        let data_rows: Vec<&PackedRow> = rows
            .iter()
            .filter_map(|&i| {
                self.images
                    .rows
                    .get(i)
                    .and_then(|&r| self.dataset.rows.get(r))
            })
            .collect();
        let batch = collate(&data_rows, false);
        let pixel_values = self.images.pixel_values::<B>(rows, self.device)?;
        let checkpointing = self.config.model.activation_checkpointing;
        let step = llava_loss_backward(
            model,
            &batch,
            pixel_values,
            self.llava.visual_select_layer,
            accumulative_counts as f64,
            checkpointing,
            self.device,
        )?;
        Ok(MicroStep {
            loss: step.loss,
            trained_tokens: step.trained_tokens,
            tokens: step.tokens,
            grads: step.grads,
            metrics: Vec::new(),
        })
    }

    fn write_weights(
        &self,
        model: &Llava<B::InnerBackend>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<()> {
        write_llava(
            model,
            self.config,
            self.llava,
            self.decoder,
            self.tokenizer,
            dir,
            dtype,
        )
    }

    fn evaluate(&self, model: &Llava<B::InnerBackend>) -> Result<Vec<(String, String)>> {
        let features = match &self.eval_image {
            Some(data) => {
                let pixels = Tensor::<B::InnerBackend, 3>::from_data(data.clone(), self.device)
                    .unsqueeze::<4>();
                Some(image_features(
                    &model.visual_encoder,
                    &model.projector,
                    pixels,
                    self.llava.visual_select_layer,
                )?)
            }
            None => None,
        };
        evaluate_chat(
            &model.llm,
            features.as_ref(),
            self.config,
            self.tokenizer,
            self.device,
        )
    }
}
