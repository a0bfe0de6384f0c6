//! The training loop of `xtuner train`: one loop for LoRA, full fine-tuning and
//! incremental pre-training (the data decides: pre-training records have no template
//! and every token trained).
//!
//! Per iteration (one micro-batch): the learning rate of the schedule, forward, the
//! token-mean loss divided by `accumulative_counts`, backward into the accumulated
//! gradients. Every `accumulative_counts` iterations: global-norm clipping, an AdamW
//! step. The data order of epoch e is a permutation seeded by `seed + e`, and dropout
//! is reseeded per iteration, so a run resumed from a checkpoint continues exactly as
//! one that never stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;
use xtuner_dataset::collate::{Batch, collate};
use xtuner_dataset::encode::IMAGE_TOKEN;
use xtuner_dataset::sampler::{length_grouped, shuffled};
use xtuner_dataset::{PackedRow, Tokenizer, load_or_process};
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::checkpoint::{Checkpoint, SaveDtype, copy_side_files, save_safetensors};
use xtuner_model::generate::{GenerationConfig, generate};
use xtuner_model::internlm2::{DecoderConfig, DecoderInput, InternLm2};
use xtuner_model::llava::{IMAGE_TOKEN_INDEX, prepare_inputs_labels_for_multimodal};
use xtuner_model::nn::attention::AttentionMask;
use xtuner_model::nn::linear::LinearLayers;
use xtuner_model::sampling::SamplingConfig;

use crate::checkpoint::{self, TrainState};
use crate::config::{LoadedConfig, TrainConfig};
use crate::lora;
use crate::memory::ModelMemory;
use crate::optim::{
    MASTER_DTYPE, adamw, adamw_state_in, clip_grad_norm, holds_adamw_moments, join_adamw_state,
    master_weights, split_adamw_state,
};
use crate::recompute::decoder_loss_backward;
use crate::schedule::LrSchedule;
use crate::{Error, Result};

/// Where a run resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest checkpoint of the work dir, if any.
    Auto,
    /// This checkpoint directory.
    Path(PathBuf),
}

/// What the loop reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// The run starts (or resumes at `start_iter`).
    Started {
        /// Iterations in the whole run.
        total_iters: usize,
        /// The first iteration this process runs.
        start_iter: usize,
        /// Training rows.
        rows: usize,
        /// The model's resident state (trainable parameters among it).
        memory: ModelMemory,
    },
    /// An optimizer step was taken.
    Step(StepStats),
    /// The evaluate-chat hook ran.
    Eval {
        /// Iteration.
        iter: usize,
        /// (prompt, answer) pairs.
        answers: Vec<(String, String)>,
    },
    /// A checkpoint was written.
    Saved {
        /// Iteration.
        iter: usize,
        /// Its directory.
        path: PathBuf,
    },
}

/// Numbers of one optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// Iterations done (1-based).
    pub iter: usize,
    /// Iterations in the run.
    pub total_iters: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Token-mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second (real tokens, this process).
    pub tokens_per_s: f64,
    /// Estimated seconds left.
    pub eta_s: f64,
    /// Device memory the allocator holds, in MiB (GPU runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<f64>,
}

/// Receives [`TrainEvent`]s (the CLI draws a progress bar from them).
pub trait Progress {
    /// One event.
    fn event(&mut self, event: &TrainEvent);
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Iterations done.
    pub iters: usize,
    /// The loss of the first and the last step.
    pub first_loss: Option<f64>,
    /// See `first_loss`.
    pub last_loss: Option<f64>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Stopped early by the caller (Ctrl-C).
    pub interrupted: bool,
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
) -> Result<(InternLm2<B>, DecoderConfig)> {
    match (&config.model.path, &config.model.preset) {
        (Some(path), _) => {
            if !path.join("config.json").is_file() {
                return Err(Error::Config {
                    path: path.clone(),
                    message:
                        "`model.path`: no config.json here (not a Hugging Face model directory)"
                            .into(),
                });
            }
            Ok(InternLm2::load(path, None, device)?)
        }
        (None, Some(name)) => {
            let decoder = DecoderConfig::preset(name, tokenizer.vocab_size()).ok_or_else(|| {
                Error::Config {
                    path: PathBuf::new(),
                    message: format!(
                        "`model.preset`: unknown preset `{name}`; known: {}",
                        DecoderConfig::PRESETS.join(", ")
                    ),
                }
            })?;
            B::seed(device, config.train.seed);
            Ok((InternLm2::random(&decoder, device)?, decoder))
        }
        (None, None) => Err(Error::Config {
            path: PathBuf::new(),
            message: "`model`: give `path` or `preset`".into(),
        }),
    }
}

/// Gives every parameter an id derived from its module path, so that optimizer state
/// saved by one process finds its parameters in the next.
struct StableIds {
    path: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        let id = ParamId::from(crate::fnv1a(self.path.join(".").as_bytes()));
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// A fingerprint of the settings a resumed run must share with the checkpoint.
fn config_fingerprint(config: &TrainConfig) -> String {
    let relevant = serde_json::json!({
        "model": config.model, "data": config.data, "template": config.template,
        "lora": config.lora, "llava": config.llava,
        "train": { "batch_size": config.train.batch_size, "seed": config.train.seed },
    });
    format!("{:016x}", crate::fnv1a(relevant.to_string().as_bytes()))
}

/// The rows of each epoch, in order.
/// `lengths` are the rows' (modality) lengths: negative for LLaVA's text-only rows.
fn epoch_order(lengths: &[i64], config: &TrainConfig, epoch: usize) -> Vec<usize> {
    let seed = config.train.seed.wrapping_add(epoch as u64);
    if config.train.group_by_length && !config.data.pack_to_max_length {
        length_grouped(
            lengths,
            config.train.batch_size * config.train.accumulative_counts,
            seed,
        )
    } else {
        shuffled(lengths.len(), seed)
    }
}

/// Token ids and decoder inputs (positions, attention mask) of a collated batch.
pub fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, DecoderInput<B>) {
    let shape = [batch.batch_size, batch.seq_len];
    let ids = Tensor::from_data(TensorData::new(batch.input_ids.clone(), shape), device);
    let positions = Tensor::from_data(TensorData::new(batch.position_ids.clone(), shape), device);
    // Packed rows with varlen attention keep their samples apart.
    let segments: Option<Vec<i64>> = batch.cumulative_len.as_ref().map(|rows| {
        rows.iter()
            .flat_map(|cu| {
                let mut seg = vec![-1i64; batch.seq_len];
                for (s, w) in cu.windows(2).enumerate() {
                    for slot in seg.iter_mut().take(w[1]).skip(w[0]) {
                        *slot = s as i64;
                    }
                }
                seg
            })
            .collect()
    });
    let mask = AttentionMask::new(
        batch.batch_size,
        batch.seq_len,
        &batch.attention_mask,
        segments.as_deref(),
        device,
    );
    (ids, DecoderInput { positions, mask })
}

/// One micro-batch: forward, the token-mean loss, and the backward pass of the loss
/// divided by `accumulative_counts`, recomputing each layer in backward when
/// `checkpointing` (see [`decoder_loss_backward`]). Returns the loss and the gradients.
pub fn forward_backward<B: AutodiffBackend>(
    model: &InternLm2<B>,
    batch: &Batch,
    accumulative_counts: usize,
    checkpointing: bool,
    device: &B::Device,
) -> (f64, GradientsParams) {
    let (ids, input) = batch_tensors::<B>(batch, device);
    let (sum, tokens, grads) = decoder_loss_backward(
        model,
        model,
        model.embed(ids),
        &input,
        &batch.labels,
        accumulative_counts as f64,
        checkpointing,
    );
    (sum / tokens.max(1) as f64, grads)
}

/// The optimizer step: global-norm clipping, then AdamW at `lr`. Returns the updated
/// model and the gradient norm before clipping.
pub fn optimizer_step<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>>(
    model: M,
    optimizer: &mut O,
    mut grads: GradientsParams,
    lr: f64,
    max_norm: f64,
) -> (M, f64) {
    let grad_norm = clip_grad_norm(&model, &mut grads, max_norm);
    (optimizer.step(lr, model, grads), grad_norm)
}

/// What the training loop needs from a kind of run: the decoder alone (LoRA, QLoRA,
/// full, pre-training) or LLaVA. Everything else (order, accumulation, schedule,
/// clipping, checkpoints, logging, resume) is the loop's.
pub trait Recipe<B: AutodiffBackend> {
    /// The trained module.
    type Model: AutodiffModule<B>;

    /// One micro-batch made of the dataset rows `rows`: forward, and backward of the
    /// token-mean loss divided by `accumulative_counts`.
    ///
    /// # Errors
    /// Data that cannot be turned into a batch (e.g. an unreadable image).
    fn forward_backward(
        &self,
        model: &Self::Model,
        rows: &[usize],
        accumulative_counts: usize,
    ) -> Result<MicroStep>;

    /// The device memory of the model's NF4 weights (QLoRA), which parameter visitors
    /// do not see.
    fn nf4_bytes(&self, model: &Self::Model) -> usize;

    /// Writes the trained weights into `dir` in Hugging Face formats.
    ///
    /// # Errors
    /// An unwritable directory.
    fn write_weights(
        &self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<()>;

    /// The evaluate-chat hook's (prompt, answer) pairs.
    ///
    /// # Errors
    /// A template or tokenizer failure.
    fn evaluate(
        &self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
    ) -> Result<Vec<(String, String)>>;
}

/// What one micro-batch gave.
pub struct MicroStep {
    /// Token-mean loss.
    pub loss: f64,
    /// Trained labels.
    pub trained_tokens: usize,
    /// Real (unpadded) tokens.
    pub tokens: usize,
    /// Gradients of the loss divided by `accumulative_counts`.
    pub grads: GradientsParams,
}

/// A run's model, and where it starts.
pub struct Start<M> {
    /// The model, adapters attached and frozen parts frozen.
    pub model: M,
    /// The first iteration to run (0, or the resumed checkpoint's).
    pub iter: usize,
    /// The checkpoint resumed from.
    pub checkpoint: Option<PathBuf>,
}

/// The checkpoint a run resumes from, checked against the config; `None` for a fresh run.
///
/// # Errors
/// An unreadable checkpoint, or one written by another config or mode.
pub fn resume_point(
    config: &TrainConfig,
    work_dir: &Path,
    resume: Option<Resume>,
    mode: &str,
) -> Result<Option<(PathBuf, usize)>> {
    let dir = match resume {
        None => return Ok(None),
        Some(Resume::Auto) => match checkpoint::latest(work_dir)? {
            Some(dir) => dir,
            None => return Ok(None),
        },
        Some(Resume::Path(path)) => path,
    };
    let state = checkpoint::read_state(&dir)?;
    if state.config_fingerprint != config_fingerprint(config) || state.mode != mode {
        return Err(Error::Config {
            path: dir,
            message: "this checkpoint comes from another config (model, data, LoRA or batch settings differ)".into(),
        });
    }
    Ok(Some((dir, state.iter)))
}

/// The data set and tokenizer a config names, and the work dir created.
///
/// # Errors
/// Bad data, a missing tokenizer, an unwritable work dir.
pub fn prepare(
    loaded: &LoadedConfig,
    work_dir: &Path,
) -> Result<(xtuner_dataset::ProcessedDataset, Tokenizer)> {
    let config = &loaded.config;
    let spec = config.data_spec()?;
    let tokenizer_path = config.tokenizer_path().ok_or_else(|| Error::Config {
        path: loaded.path.clone(),
        message: "`tokenizer.path`: required".into(),
    })?;
    let (dataset, _) = load_or_process(&spec, tokenizer_path, &config.data.cache_dir)?;
    let tokenizer = Tokenizer::from_path(tokenizer_path)?;
    std::fs::create_dir_all(work_dir).map_err(|e| Error::Io {
        path: work_dir.to_path_buf(),
        source: e,
    })?;
    Ok((dataset, tokenizer))
}

/// The base decoder of a run, NF4-quantized when the config asks; a preset (random)
/// base is saved once to `work_dir/base_model`.
///
/// # Errors
/// As [`build_model`]; an unwritable work dir.
pub fn base_model<B: Backend>(
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    work_dir: &Path,
    device: &B::Device,
) -> Result<(InternLm2<B>, DecoderConfig)> {
    let (base, decoder) = build_model::<B>(config, tokenizer, device)?;
    if config.model.path.is_none() {
        save_base_model(&base, &decoder, tokenizer, &work_dir.join("base_model"))?;
    }
    let base = match &config.quantization {
        Some(q) => lora::quantize_base(base, &decoder, q.block_size, q.double_quant)?,
        None => base,
    };
    Ok((base, decoder))
}

/// Runs (or resumes) the training a config describes: LLaVA when it has a `[llava]`
/// section, the decoder alone otherwise.
///
/// # Errors
/// Bad settings, data or model; a loss that becomes NaN or infinite (the last good
/// checkpoint is kept); an unwritable work dir.
pub fn train<B: AutodiffBackend>(
    loaded: &LoadedConfig,
    work_dir: &Path,
    resume: Option<Resume>,
    device: &B::Device,
    progress: &mut dyn Progress,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    if loaded.config.llava.is_some() {
        return crate::llava::train::<B>(loaded, work_dir, resume, device, progress, stop);
    }
    let config = &loaded.config;
    let (dataset, tokenizer) = prepare(loaded, work_dir)?;
    let (base, decoder) = base_model::<B>(config, &tokenizer, work_dir, device)?;
    let mode = if config.lora.is_some() {
        "lora"
    } else {
        "full"
    };
    let start = match resume_point(config, work_dir, resume, mode)? {
        Some((dir, iter)) => {
            let model = match &config.lora {
                Some(l) => {
                    lora::attach_peft(base, &decoder, &PeftAdapter::open(&dir)?, l.dropout, device)?
                }
                None => {
                    // The checkpoint holds every weight; the base is not needed alongside.
                    drop(base);
                    load_full_weights(&dir, &decoder, device)?
                }
            };
            Start {
                model,
                iter,
                checkpoint: Some(dir),
            }
        }
        None => {
            // Fresh adapters are drawn from the run's seed (on the host, so the same on
            // every backend), so two runs of a config are the same run.
            let seed = init_seed(config);
            B::seed(device, seed);
            let model = match &config.lora {
                Some(l) => lora::attach(base, &decoder, l, seed, device)?,
                None => base,
            };
            Start {
                model,
                iter: 0,
                checkpoint: None,
            }
        }
    };
    let recipe = DecoderRecipe {
        config,
        dataset: &dataset,
        decoder: &decoder,
        tokenizer: &tokenizer,
        device,
    };
    let lengths: Vec<i64> = dataset.rows.iter().map(|r| r.len() as i64).collect();
    run(
        &recipe, start, &lengths, mode, loaded, work_dir, device, progress, stop,
    )
}

/// The decoder alone: text batches, PEFT adapter or full weights.
struct DecoderRecipe<'a, B: Backend> {
    config: &'a TrainConfig,
    dataset: &'a xtuner_dataset::ProcessedDataset,
    decoder: &'a DecoderConfig,
    tokenizer: &'a Tokenizer,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Recipe<B> for DecoderRecipe<'_, B> {
    type Model = InternLm2<B>;

    fn nf4_bytes(&self, model: &InternLm2<B>) -> usize {
        model.nf4_bytes(self.decoder)
    }

    fn forward_backward(
        &self,
        model: &InternLm2<B>,
        rows: &[usize],
        accumulative_counts: usize,
    ) -> Result<MicroStep> {
        let rows: Vec<&PackedRow> = rows
            .iter()
            .filter_map(|&i| self.dataset.rows.get(i))
            .collect();
        let batch = collate(&rows, self.config.data.use_varlen_attn);
        let (loss, grads) = forward_backward(
            model,
            &batch,
            accumulative_counts,
            self.config.model.activation_checkpointing,
            self.device,
        );
        Ok(MicroStep {
            loss,
            trained_tokens: batch.trained_tokens(),
            tokens: batch.tokens(),
            grads,
        })
    }

    fn write_weights(
        &self,
        model: &InternLm2<B::InnerBackend>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<()> {
        write_weights(model, self.decoder, self.config, dir, dtype, self.tokenizer).map(|_| ())
    }

    fn evaluate(&self, model: &InternLm2<B::InnerBackend>) -> Result<Vec<(String, String)>> {
        evaluate_chat(model, None, self.config, self.tokenizer, self.device)
    }
}

/// The loop itself, for any [`Recipe`]: per iteration one micro-batch; every
/// `accumulative_counts` iterations clipping and an AdamW step; checkpoints, the
/// evaluate-chat hook, the log, Ctrl-C.
///
/// # Errors
/// As [`train`].
#[allow(clippy::too_many_arguments)]
pub fn run<B: AutodiffBackend, R: Recipe<B>>(
    recipe: &R,
    start: Start<R::Model>,
    lengths: &[i64],
    mode: &str,
    loaded: &LoadedConfig,
    work_dir: &Path,
    device: &B::Device,
    progress: &mut dyn Progress,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    let config = &loaded.config;
    let fingerprint = config_fingerprint(config);
    let start_iter = start.iter;
    let model = start.model.map(&mut StableIds { path: Vec::new() });
    let mut model = master_weights(model, MASTER_DTYPE);
    let mut optimizer = adamw(&config.optimizer).init::<B, R::Model>();
    if let Some(dir) = &start.checkpoint {
        let record = BinFileRecorder::<FullPrecisionSettings>::new()
            .load(dir.join("optimizer"), device)
            .map_err(|e| Error::Config {
                path: dir.clone(),
                message: format!("optimizer state: {e}"),
            })?;
        optimizer = optimizer.load_record(load_adamw_moments(record, dir, device)?);
    }

    let t = &config.train;
    let rows = lengths.len();
    let batches_per_epoch = rows.div_ceil(t.batch_size);
    let total_iters = t.max_iters.unwrap_or(batches_per_epoch * t.max_epochs);
    let schedule = LrSchedule::new(&config.optimizer, &config.schedule, total_iters);
    let memory = ModelMemory::of(&model, recipe.nf4_bytes(&model));
    tracing::info!(
        trainable_params = memory.trainable_params,
        model_state_bytes = memory.total_bytes(),
        "model state"
    );
    progress.event(&TrainEvent::Started {
        total_iters,
        start_iter,
        rows,
        memory,
    });
    let mut log = JsonLog::open(&work_dir.join("train_log.jsonl"))?;

    let eval = |model: &<R::Model as AutodiffModule<B>>::InnerModule,
                iter: usize,
                progress: &mut dyn Progress,
                log: &mut JsonLog|
     -> Result<()> {
        let answers = recipe.evaluate(model)?;
        if !answers.is_empty() {
            let event = TrainEvent::Eval { iter, answers };
            progress.event(&event);
            log.write(&event);
        }
        Ok(())
    };
    if start_iter == 0 {
        eval(&model.valid(), 0, progress, &mut log)?;
    }

    let mut summary = TrainSummary {
        iters: start_iter,
        first_loss: None,
        last_loss: None,
        last_checkpoint: start.checkpoint.clone(),
        interrupted: false,
    };
    let mut accumulator = GradientsAccumulator::<R::Model>::new();
    let (mut step_loss, mut step_tokens, mut micro) = (0.0f64, 0usize, 0usize);
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = usize::MAX;
    for iter in start_iter..total_iters {
        let epoch = iter / batches_per_epoch.max(1);
        if epoch != order_epoch {
            order = epoch_order(lengths, config, epoch);
            order_epoch = epoch;
        }
        let first = (iter % batches_per_epoch.max(1)) * t.batch_size;
        let rows_of_batch: Vec<usize> = order
            .iter()
            .skip(first)
            .take(t.batch_size)
            .copied()
            .collect();
        B::seed(
            device,
            t.seed.wrapping_mul(1_000_003).wrapping_add(iter as u64),
        );
        let step = recipe.forward_backward(&model, &rows_of_batch, t.accumulative_counts)?;
        if !step.loss.is_finite() {
            return Err(Error::Diverged {
                iter: iter + 1,
                loss: step.loss,
                checkpoint: summary.last_checkpoint.clone(),
            });
        }
        accumulator.accumulate(&model, step.grads);
        step_loss += step.loss * step.trained_tokens as f64;
        step_tokens += step.trained_tokens;
        tokens_seen += step.tokens;
        micro += 1;
        let done = iter + 1;
        if micro == t.accumulative_counts || done == total_iters {
            let lr = schedule.lr(iter);
            let grad_norm;
            (model, grad_norm) = optimizer_step(
                model,
                &mut optimizer,
                accumulator.grads(),
                lr,
                config.optimizer.max_norm,
            );
            let loss = step_loss / step_tokens.max(1) as f64;
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let per_iter = elapsed / (done - start_iter) as f64;
            let stats = StepStats {
                iter: done,
                total_iters,
                epoch,
                loss,
                lr,
                grad_norm,
                tokens_per_s: tokens_seen as f64 / elapsed,
                eta_s: per_iter * (total_iters - done) as f64,
                memory_mib: xtuner_model::device::memory_reserved_mib::<B>(device),
            };
            summary.first_loss.get_or_insert(loss);
            summary.last_loss = Some(loss);
            let event = TrainEvent::Step(stats);
            log.write(&event);
            progress.event(&event);
            (step_loss, step_tokens, micro) = (0.0, 0, 0);
        }
        summary.iters = done;
        let interrupted = stop.load(Ordering::SeqCst);
        let at_save =
            done % config.checkpoint.save_steps == 0 || done == total_iters || interrupted;
        if at_save && micro == 0 {
            let state = TrainState {
                iter: done,
                config_fingerprint: fingerprint.clone(),
                mode: mode.to_string(),
            };
            let path = checkpoint::save(
                work_dir,
                &state,
                config.checkpoint.save_total_limit,
                |dir| {
                    recipe.write_weights(&model.valid(), dir, SaveDtype::F32)?;
                    let (record, moments) = split_adamw_state(optimizer.to_record());
                    save_safetensors(
                        dir,
                        OPTIMIZER_MOMENTS,
                        moments,
                        SaveDtype::F32,
                        Some(DEFAULT_SHARD_SIZE),
                    )?;
                    BinFileRecorder::<FullPrecisionSettings>::new()
                        .record(record, dir.join("optimizer"))
                        .map_err(|e| Error::Config {
                            path: dir.to_path_buf(),
                            message: format!("saving the optimizer state: {e}"),
                        })
                },
            )?;
            progress.event(&TrainEvent::Saved {
                iter: done,
                path: path.clone(),
            });
            summary.last_checkpoint = Some(path);
        }
        if done % config.evaluation.freq == 0 && done != total_iters {
            eval(&model.valid(), done, progress, &mut log)?;
        }
        if interrupted && micro == 0 {
            summary.interrupted = true;
            return Ok(summary);
        }
    }
    eval(&model.valid(), summary.iters, progress, &mut log)?;
    Ok(summary)
}

/// Writes the trainable weights in Hugging Face formats: a PEFT adapter directory for
/// LoRA, a model directory (config + safetensors + tokenizer files) for a full fine-tune.
///
/// # Errors
/// An unwritable directory.
pub fn write_weights<B: Backend>(
    model: &InternLm2<B>,
    decoder: &DecoderConfig,
    config: &TrainConfig,
    dir: &Path,
    dtype: SaveDtype,
    tokenizer: &Tokenizer,
) -> Result<Vec<PathBuf>> {
    match &config.lora {
        Some(l) => {
            let base = config.model.path.as_ref().map(|p| p.display().to_string());
            lora::write_adapter(dir, l, model, decoder, Some("CAUSAL_LM"), base, dtype)
        }
        None => save_hf_model(model, decoder, tokenizer, dir, dtype, DEFAULT_SHARD_SIZE),
    }
}

/// transformers' default `max_shard_size` for the checkpoints a run writes.
pub const DEFAULT_SHARD_SIZE: u64 = 2_000_000_000;

/// The decoder as a Hugging Face model directory, as `save_pretrained` writes it:
/// `config.json`, the weights (sharded above `max_shard_size` bytes) and the tokenizer
/// files. Returns the weight files written.
///
/// # Errors
/// A file that cannot be written, or a tokenizer file that cannot be copied.
pub fn save_hf_model<B: Backend>(
    model: &InternLm2<B>,
    decoder: &DecoderConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
    dtype: SaveDtype,
    max_shard_size: u64,
) -> Result<Vec<PathBuf>> {
    let bos = tokenizer.bos_ids().first().copied();
    let eos = tokenizer.eos_ids().first().copied();
    write_json(&dir.join("config.json"), &decoder.to_hf_json(bos, eos))?;
    let files = save_safetensors(
        dir,
        "model",
        model.to_hf_tensors(decoder),
        dtype,
        Some(max_shard_size),
    )?;
    copy_tokenizer_files(tokenizer, dir)?;
    Ok(files)
}

/// The seed that a fresh run's new weights (adapters, a projector) are drawn with: the
/// config's seed plus one (a preset base is drawn with the seed itself).
pub fn init_seed(config: &TrainConfig) -> u64 {
    config.train.seed.wrapping_add(1)
}

/// The stem of the safetensors file (or shards) holding AdamW's moments in a checkpoint.
const OPTIMIZER_MOMENTS: &str = "optimizer_moments";

/// A saved AdamW record with its moments restored in the masters' dtype: read from the
/// checkpoint's `optimizer_moments` safetensors exactly as they were saved, or, for a
/// checkpoint written before they were kept apart, taken from the record (rounded to the
/// backend's default dtype on the way in) and widened.
///
/// # Errors
/// The moments file missing from a checkpoint whose record keeps only placeholders, or
/// a moment missing from it.
fn load_adamw_moments<B, R>(record: R, dir: &Path, device: &B::Device) -> Result<R>
where
    B: AutodiffBackend,
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>,
{
    let single = dir.join(format!("{OPTIMIZER_MOMENTS}.safetensors"));
    let index = dir.join(format!("{OPTIMIZER_MOMENTS}.safetensors.index.json"));
    let Some(path) = [single.clone(), index].into_iter().find(|p| p.is_file()) else {
        let (record, holds_moments) = holds_adamw_moments(record);
        if !holds_moments {
            return Err(Error::Config {
                path: single,
                message: "missing: the optimizer state beside it keeps AdamW's moments \
                          in this file"
                    .into(),
            });
        }
        return Ok(adamw_state_in(record, MASTER_DTYPE));
    };
    let moments = Checkpoint::open(&path)?.with_dtype(MASTER_DTYPE);
    Ok(join_adamw_state(record, &moments, device)?)
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
) -> Result<InternLm2<B>> {
    let ckpt = Checkpoint::open(dir)?.with_dtype(MASTER_DTYPE);
    Ok(InternLm2::load_from(&ckpt, decoder, None, device)?)
}

/// A randomly initialised (preset) base is written once to `work_dir/base_model` as a
/// Hugging Face model directory, so that its adapters can be chatted with, evaluated
/// and merged like those of a downloaded model.
fn save_base_model<B: Backend>(
    model: &InternLm2<B>,
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
        .map_err(|e| Error::Io {
            path: tmp_parent.to_path_buf(),
            source: e,
        })?;
    save_hf_model(
        model,
        decoder,
        tokenizer,
        tmp.path(),
        SaveDtype::F32,
        DEFAULT_SHARD_SIZE,
    )?;
    let kept = tmp.keep();
    std::fs::rename(&kept, dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    Ok(())
}

/// The files a tokenizer is saved as, beside a model (`save_pretrained`'s).
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Copies the tokenizer files beside a saved model, as `save_pretrained` does.
///
/// # Errors
/// An unreadable or unwritable file.
pub fn copy_tokenizer_files(tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let source_dir = tokenizer.source().parent().unwrap_or(Path::new("."));
    Ok(copy_side_files(source_dir, &TOKENIZER_FILES, dir)?)
}

/// XTuner's evaluate-chat hook: answers the config's evaluation inputs with the
/// template (temperature 0.1, top-k 40, top-p 0.75, as XTuner's hook samples). With
/// `image` (projected features `[1, P, C]`), `<image>\n` opens each prompt and the
/// features are spliced in there, as XTuner's hook does for LLaVA.
///
/// # Errors
/// A template that cannot render the system prompt, or a tokenizer failure.
pub fn evaluate_chat<B: Backend>(
    model: &InternLm2<B>,
    image: Option<&Tensor<B, 3>>,
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<Vec<(String, String)>> {
    let eval = &config.evaluation;
    let template = config
        .template
        .as_ref()
        .map(|t| t.resolve())
        .transpose()
        .map_err(|message| Error::Config {
            path: PathBuf::new(),
            message,
        })?;
    let system = eval.system_prompt();
    let mut answers = Vec::new();
    for input in &eval.inputs {
        let prompt = if image.is_some() {
            format!("{IMAGE_TOKEN}\n{input}")
        } else {
            input.clone()
        };
        let text = match &template {
            Some(t) => t.prompt(&system, &prompt, 1).map_err(|e| Error::Config {
                path: PathBuf::new(),
                message: e.to_string(),
            })?,
            None => prompt,
        };
        let mut ids: Vec<i64> = tokenizer.bos_ids().iter().map(|&i| i64::from(i)).collect();
        // With an image, `<image>` marks where its features go; otherwise it is text.
        let pieces: Vec<&str> = if image.is_some() {
            text.split(IMAGE_TOKEN).collect()
        } else {
            vec![text.as_str()]
        };
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                ids.push(IMAGE_TOKEN_INDEX);
            }
            ids.extend(tokenizer.encode(piece)?.into_iter().map(i64::from));
        }
        let tensor =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), device);
        let embeds = match image {
            Some(features) => {
                prepare_inputs_labels_for_multimodal(tensor, None, None, features.clone(), |t| {
                    model.embed(t.unsqueeze::<2>()).squeeze_dim::<2>(0)
                })?
                .inputs_embeds
            }
            None => model.embed(tensor),
        };
        let mut stop_ids = tokenizer.eos_ids().to_vec();
        if let Some(t) = &template {
            stop_ids.extend(t.stop_words.iter().filter_map(|w| tokenizer.token_to_id(w)));
        }
        let generation = GenerationConfig {
            max_new_tokens: eval.max_new_tokens,
            eos_token_ids: stop_ids,
            sampling: SamplingConfig {
                seed: config.train.seed,
                ..SamplingConfig::default()
            },
        };
        let prompt_ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let (new, _) = generate(model, embeds, &prompt_ids, &generation, |_| true);
        answers.push((input.clone(), tokenizer.decode(&new)?));
    }
    Ok(answers)
}

/// Writes a JSON file (pretty-printed).
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The JSON Lines log in the work dir (one object per step/eval).
struct JsonLog {
    file: Option<std::fs::File>,
}

impl JsonLog {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(Self { file: Some(file) })
    }

    fn write(&mut self, event: &TrainEvent) {
        if let (Some(file), Ok(line)) = (self.file.as_mut(), serde_json::to_string(event)) {
            let _ = std::io::Write::write_all(file, format!("{line}\n").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// A model larger than the shard limit is saved in shards; resuming and converting
    /// read them through the index.
    #[test]
    fn full_weights_load_from_shards() {
        type B = NdArray<f32>;
        let device = Default::default();
        let decoder = DecoderConfig::preset("internlm2-tiny", 300).unwrap();
        let model = InternLm2::<B>::random(&decoder, &device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = save_safetensors(
            dir.path(),
            "model",
            model.to_hf_tensors(&decoder),
            SaveDtype::F32,
            Some(100_000),
        )
        .unwrap();
        assert!(files.len() > 2, "{files:?}");
        assert!(!dir.path().join("model.safetensors").exists());
        let loaded = load_full_weights::<B>(dir.path(), &decoder, &device).unwrap();
        for ((key, want), (_, got)) in model
            .to_hf_tensors(&decoder)
            .into_iter()
            .zip(loaded.to_hf_tensors(&decoder))
        {
            assert_eq!(got, want, "{key}");
        }
    }
}
