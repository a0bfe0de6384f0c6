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
use std::sync::atomic::AtomicBool;

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use xtuner_dataset::collate::collate;
use xtuner_dataset::{PackedRow, ProcessedDataset, Tokenizer};
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::checkpoint::{Checkpoint, SaveDtype, copy_side_files, save_safetensors};
use xtuner_model::clip_vit::{ClipVisionTower, HiddenAct};
use xtuner_model::image::{ImageProcessor, probe};
use xtuner_model::internlm2::{DecoderConfig, DecoderInput, InternLm2};
use xtuner_model::llava::{Llava, image_features};
use xtuner_model::nn::attention::AttentionMask;
use xtuner_model::nn::linear::{Linear, LinearLayers};
use xtuner_model::projector::{Projector, ProjectorConfig};

use crate::config::{LlavaConfig, LoadedConfig, TrainConfig};
use crate::optim::MASTER_DTYPE;
use crate::recompute::decoder_loss_backward;
use crate::train::{self, MicroStep, Progress, Recipe, Resume, Start, TrainSummary, write_json};
use crate::{Error, Result, init, lora};

/// The checkpoint mode of LLaVA runs.
pub const MODE: &str = "llava";

/// Runs (or resumes) a LLaVA config.
///
/// # Errors
/// As [`train::train`]; a missing or unreadable image (unless skipped).
pub fn train<B: AutodiffBackend>(
    loaded: &LoadedConfig,
    work_dir: &Path,
    resume: Option<Resume>,
    device: &B::Device,
    progress: &mut dyn Progress,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    let config = &loaded.config;
    let llava = llava_section(config)?;
    let (dataset, tokenizer) = train::prepare(loaded, work_dir)?;
    let images = Images::check(llava, &dataset, config.data.skip_bad_records)?;
    let (llm, decoder) = train::base_model::<B>(config, &tokenizer, work_dir, device)?;
    let start = match train::resume_point(config, work_dir, resume, MODE)? {
        Some((dir, iter)) => Start {
            model: assemble(config, llm, &decoder, Some(&dir), device)?,
            iter,
            checkpoint: Some(dir),
        },
        None => {
            // A fresh projector and fresh adapters are drawn on the host from the run's
            // seed (the same on every backend); the backend's generator is seeded too.
            B::seed(device, train::init_seed(config));
            Start {
                model: assemble(config, llm, &decoder, None, device)?,
                iter: 0,
                checkpoint: None,
            }
        }
    };
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
    let lengths = images.modality_lengths(&dataset);
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
    train::run(
        &recipe, start, &lengths, MODE, loaded, work_dir, device, progress, stop,
    )
}

/// `convert pth_to_hf` of a LLaVA checkpoint: XTuner's layout in `out`.
///
/// # Errors
/// A checkpoint of another mode, or one that does not fit the config.
pub fn export<B: Backend>(
    config: &TrainConfig,
    checkpoint: &Path,
    out: &Path,
    dtype: SaveDtype,
    device: &B::Device,
) -> Result<()> {
    let state = crate::checkpoint::read_state(checkpoint)?;
    if state.mode != MODE {
        return Err(Error::Config {
            path: checkpoint.to_path_buf(),
            message: format!("a `{}` checkpoint, not a LLaVA one", state.mode),
        });
    }
    let tokenizer_path = config.tokenizer_path().ok_or_else(|| Error::Config {
        path: PathBuf::new(),
        message: "`tokenizer.path`: required".into(),
    })?;
    let tokenizer = Tokenizer::from_path(tokenizer_path)?;
    let (llm, decoder) = train::build_model::<B>(config, &tokenizer, device)?;
    let model = assemble(config, llm, &decoder, Some(checkpoint), device)?;
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    write_llava(&model, config, &decoder, &tokenizer, out, dtype)
}

fn llava_section(config: &TrainConfig) -> Result<&LlavaConfig> {
    config.llava.as_ref().ok_or_else(|| Error::Config {
        path: PathBuf::new(),
        message: "`[llava]`: this is not a LLaVA config".into(),
    })
}

/// The LLaVA module of a config: the vision tower from `llava.visual_encoder`, the
/// projector from the checkpoint, `pretrained_projector` or fresh, adapters attached and
/// frozen parts frozen. With `checkpoint`, the trained parts are read from it.
///
/// # Errors
/// Missing or mismatched parts, naming the file.
pub fn assemble<B: Backend>(
    config: &TrainConfig,
    llm: InternLm2<B>,
    decoder: &DecoderConfig,
    checkpoint: Option<&Path>,
    device: &B::Device,
) -> Result<Llava<B>> {
    let llava = llava_section(config)?;
    let llm = match (&config.lora, checkpoint) {
        (Some(l), Some(dir)) => lora::attach_peft(
            llm,
            decoder,
            &PeftAdapter::open(&dir.join("llm_adapter"))?,
            l.dropout,
            device,
        )?,
        (Some(l), None) => lora::attach(llm, decoder, l, train::init_seed(config), device)?,
        (None, _) if llava.freeze_llm => llm.no_grad(),
        (None, Some(dir)) => {
            // The checkpoint holds every weight.
            drop(llm);
            train::load_full_weights(dir, decoder, device)?
        }
        (None, None) => llm,
    };
    let (tower, tower_config) = ClipVisionTower::<B>::load(&llava.visual_encoder, device)?;
    let tower = match (&llava.visual_encoder_lora, checkpoint) {
        (Some(l), Some(dir)) => lora::attach_peft(
            tower,
            &(),
            &PeftAdapter::open(&dir.join("visual_encoder_adapter"))?,
            l.dropout,
            device,
        )?,
        (Some(l), None) => lora::attach(tower, &(), l, train::init_seed(config), device)?,
        (None, _) if llava.freeze_visual_encoder => tower.no_grad(),
        (None, Some(dir)) => {
            drop(tower);
            let ckpt = Checkpoint::open(&dir.join("visual_encoder"))?.with_dtype(MASTER_DTYPE);
            ClipVisionTower::load_from(&ckpt, &tower_config, device)?
        }
        (None, None) => tower,
    };
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
        None => fresh_projector(&projector_config, train::init_seed(config), device)?,
    };
    Ok(Llava {
        llm,
        visual_encoder: tower,
        projector,
    })
}

/// Writes the trained parts in XTuner's LLaVA layout (see the module docs).
///
/// # Errors
/// An unwritable directory.
pub fn write_llava<B: Backend>(
    model: &Llava<B>,
    config: &TrainConfig,
    decoder: &DecoderConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    let llava = llava_section(config)?;
    let projector_dir = dir.join("projector");
    create_dir(&projector_dir)?;
    let projector_config = ProjectorConfig {
        visual_hidden_size: model.visual_encoder.embeddings.patch_embedding.dims()[1],
        llm_hidden_size: decoder.hidden_size,
        depth: model.projector.model.len(),
        hidden_act: model.projector.activation,
        bias: model
            .projector
            .model
            .first()
            .is_some_and(|l| l.bias.is_some()),
    };
    write_json(
        &projector_dir.join("config.json"),
        &projector_config.to_json(),
    )?;
    save_safetensors(
        &projector_dir,
        "model",
        model.projector.to_hf_tensors(),
        dtype,
        None,
    )?;
    if config.lora.is_some() {
        let llm_dir = dir.join("llm_adapter");
        create_dir(&llm_dir)?;
        train::write_weights(&model.llm, decoder, config, &llm_dir, dtype, tokenizer)?;
    } else if !llava.freeze_llm {
        train::write_weights(&model.llm, decoder, config, dir, dtype, tokenizer)?;
    }
    let source = &llava.visual_encoder;
    if let Some(l) = &llava.visual_encoder_lora {
        lora::write_adapter(
            &dir.join("visual_encoder_adapter"),
            l,
            &model.visual_encoder,
            &(),
            None,
            Some(source.display().to_string()),
            dtype,
        )?;
    } else if !llava.freeze_visual_encoder {
        let tower_dir = dir.join("visual_encoder");
        create_dir(&tower_dir)?;
        save_safetensors(
            &tower_dir,
            "model",
            model.visual_encoder.to_hf_tensors(),
            dtype,
            None,
        )?;
        copy_side_files(
            source,
            &["config.json", "preprocessor_config.json"],
            &tower_dir,
        )?;
    }
    Ok(())
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

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
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
            let file = dataset
                .images
                .get(row)
                .cloned()
                .flatten()
                .map(|name| llava.image_folder.join(name));
            if let Some(path) = &file
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
                    name: dataset.images[row].clone().unwrap_or_default(),
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
        let (loss, trained_tokens, tokens, grads) = llava_loss_backward(
            model,
            &batch,
            pixel_values,
            self.llava.visual_select_layer,
            accumulative_counts as f64,
            checkpointing,
            self.device,
        )?;
        Ok(MicroStep {
            loss,
            trained_tokens,
            tokens,
            grads,
        })
    }

    fn write_weights(
        &self,
        model: &Llava<B::InnerBackend>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<()> {
        write_llava(model, self.config, self.decoder, self.tokenizer, dir, dtype)
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
        train::evaluate_chat(
            &model.llm,
            features.as_ref(),
            self.config,
            self.tokenizer,
            self.device,
        )
    }
}

/// One LLaVA micro-batch: image features spliced into the embeddings, the decoder
/// (recomputing each layer in backward when `checkpointing`) and the chunked LM loss's
/// backward (divided by `divisor`). Returns the token-mean loss, the trained and the
/// real tokens, and the gradients.
///
/// # Shapes
/// `batch`: `[B, T]` rows with -200 where the image goes; `pixel_values`: `[B, 3, H, W]`.
///
/// # Errors
/// A batch whose images do not match its `<image>` tokens.
pub fn llava_loss_backward<B: AutodiffBackend>(
    model: &Llava<B>,
    batch: &xtuner_dataset::collate::Batch,
    pixel_values: Tensor<B, 4>,
    select_layer: i64,
    divisor: f64,
    checkpointing: bool,
    device: &B::Device,
) -> Result<(f64, usize, usize, burn::optim::GradientsParams)> {
    let shape = [batch.batch_size, batch.seq_len];
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input_ids.clone(), shape), device);
    let mask = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(batch.attention_mask.clone(), shape),
        device,
    );
    let labels =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.labels.clone(), shape), device);
    let inputs = model.prepare_inputs(ids, Some(mask), Some(labels), pixel_values, select_layer)?;
    let [b, t, _] = inputs.inputs_embeds.dims();
    let host = |x: Tensor<B, 2, Int>| {
        x.into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default()
    };
    let labels = inputs.labels.map(host).unwrap_or_default();
    let key_valid: Vec<bool> = host(inputs.attention_mask.int())
        .into_iter()
        .map(|v| v != 0)
        .collect();
    let tokens = key_valid.iter().filter(|&&v| v).count();
    let input = DecoderInput {
        positions: inputs.position_ids,
        mask: AttentionMask::new(b, t, &key_valid, None, device),
    };
    let (sum, trained, grads) = decoder_loss_backward(
        model,
        &model.llm,
        inputs.inputs_embeds,
        &input,
        &labels,
        divisor,
        checkpointing,
    );
    Ok((sum / trained.max(1) as f64, trained, tokens, grads))
}
