//! The training loop: one loop for every kind of run (a [`Recipe`] says how a
//! micro-batch is formed and differentiated, how weights are written and how the
//! evaluate-chat hook answers; everything else is the loop's).
//!
//! Per iteration (one micro-batch): the learning rate of the schedule, forward, the
//! token-mean loss divided by `accumulative_counts`, backward into the accumulated
//! gradients. Every `accumulative_counts` iterations: global-norm clipping, an AdamW
//! step. The data order of epoch e is a permutation seeded by `seed + e`, and dropout
//! is reseeded per iteration, so a run resumed from a checkpoint continues exactly as
//! one that never stopped.
//!
//! Data parallel: with N ranks ([`crate::collective`]), each rank takes every N-th row
//! of the epoch's order (mmengine's `DefaultSampler`, the order padded to a multiple of
//! N from its start), each divides its losses by `accumulative_counts × N`, and at every
//! optimizer step the ranks sum their accumulated gradients and loss statistics, so
//! every rank takes the same step: that of one rank accumulating all N ranks'
//! micro-batches. Rank 0 alone logs, writes
//! checkpoints and runs the evaluate-chat hook.

mod events;
mod resume;
pub mod tensorboard;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use xtuner_dataset::sampler::{length_grouped, shuffled};
use xtuner_model::checkpoint::SaveDtype;

pub(crate) use events::JsonLog;
pub use events::{Progress, StepStats, TrainEvent};
pub use resume::{Resume, resume_point};
pub(crate) use resume::{StableIds, check_mode};

use crate::checkpoint::{self, TrainState};
use crate::collective::Collective;
use crate::config::{LoadedConfig, TrainConfig};
use crate::memory::ModelMemory;
use crate::optim::zero::{ZeroOptimizer, has_zero_state};
use crate::optim::{MASTER_DTYPE, adamw, master_weights};
use crate::schedule::LrSchedule;
use crate::step::optimizer_step;
use crate::{Error, Result};

/// What the training loop needs from a kind of run: the decoder alone (LoRA, QLoRA,
/// full, pre-training) or LLaVA. Everything else (order, accumulation, schedule,
/// clipping, checkpoints, logging, resume) is the loop's.
pub trait Recipe<B: AutodiffBackend> {
    /// The trained module.
    type Model: AutodiffModule<B>;

    /// The length of each training row, in the order the rows are numbered: negative
    /// for a text-only row of a multimodal run (XTuner's `modality_length`), which
    /// the length-grouped sampler keeps apart.
    fn lengths(&self) -> Vec<i64>;

    /// One micro-batch made of the training rows `rows`: forward, and backward of the
    /// token-mean loss divided by `divisor` (the micro-batches one step accumulates
    /// over all ranks: `accumulative_counts × ranks`).
    ///
    /// # Errors
    /// Data that cannot be turned into a batch (e.g. an unreadable image).
    fn forward_backward(
        &self,
        model: &Self::Model,
        rows: &[usize],
        divisor: usize,
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
    /// Gradients of the loss divided by the divisor.
    pub grads: GradientsParams,
    /// What else the recipe logs (DPO's rewards, ...): averaged over the step's
    /// micro-batches into the step's log line.
    pub metrics: Vec<(&'static str, f64)>,
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

/// Where a run happens and who listens: everything the loop takes besides the recipe
/// and its model.
pub struct RunContext<'a, B: AutodiffBackend> {
    /// The config (its settings and its file).
    pub loaded: &'a LoadedConfig,
    /// Checkpoints and the log go here.
    pub work_dir: &'a Path,
    /// The device the model lives on.
    pub device: &'a B::Device,
    /// Receives the loop's events.
    pub progress: &'a mut dyn Progress,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: &'a AtomicBool,
    /// The other ranks of a data-parallel run ([`crate::collective::Single`] alone).
    pub collective: &'a dyn Collective,
}

/// The rows of each epoch, in order.
/// `lengths` are the rows' (modality) lengths: negative for LLaVA's text-only rows.
/// The length-grouped order groups by the global batch: XTuner's `LengthGroupedSampler`
/// with `per_device_batch_size = batch_size × accumulative_counts`, times the ranks.
fn epoch_order(lengths: &[i64], config: &TrainConfig, epoch: usize, world: usize) -> Vec<usize> {
    let seed = config.train.seed.wrapping_add(epoch as u64);
    if config.train.group_by_length && !config.data.pack_to_max_length {
        length_grouped(
            lengths,
            config.train.batch_size * config.train.accumulative_counts * world,
            seed,
        )
    } else {
        shuffled(lengths.len(), seed)
    }
}

/// The rows rank `rank` of `world` takes from an epoch's order: every `world`-th,
/// starting at `rank`, the order padded to a multiple of `world` from its start
/// (mmengine's `DefaultSampler`).
fn rank_rows(order: Vec<usize>, world: usize, rank: usize) -> Vec<usize> {
    if world <= 1 || order.is_empty() {
        return order;
    }
    let total = order.len().div_ceil(world) * world;
    (rank..total)
        .step_by(world)
        .map(|i| order[i % order.len()])
        .collect()
}

/// Runs the evaluate-chat hook and reports its answers.
fn evaluate<B: AutodiffBackend, R: Recipe<B>>(
    recipe: &R,
    model: &<R::Model as AutodiffModule<B>>::InnerModule,
    iter: usize,
    progress: &mut dyn Progress,
    log: &mut JsonLog,
) -> Result<()> {
    let answers = recipe.evaluate(model)?;
    if !answers.is_empty() {
        let event = TrainEvent::Eval { iter, answers };
        progress.event(&event);
        log.write(&event)?;
    }
    Ok(())
}

/// The loop itself, for any [`Recipe`]: per iteration one micro-batch; every
/// `accumulative_counts` iterations clipping and an AdamW step; checkpoints, the
/// evaluate-chat hook, the log, Ctrl-C.
///
/// # Errors
/// Bad settings; a micro-batch the recipe cannot form; a loss that becomes NaN or
/// infinite (the last good checkpoint is kept); an unwritable work dir.
pub fn run<B: AutodiffBackend, R: Recipe<B>>(
    recipe: &R,
    start: Start<R::Model>,
    ctx: RunContext<'_, B>,
) -> Result<TrainSummary> {
    let RunContext {
        loaded,
        work_dir,
        device,
        progress,
        stop,
        collective,
    } = ctx;
    let (rank, world) = (collective.rank(), collective.world_size());
    let lead = rank == 0;
    let config = &loaded.config;
    let mode = config.mode();
    let fingerprint = resume::config_fingerprint(config);
    let t = &config.train;
    let mut start_iter = start.iter;
    let model = start.model.map(&mut StableIds::new());
    // With ZeRO the f32 masters are the optimizer's shard; the model keeps its own dtype.
    let mut model = if config.zero.stage > 0 {
        model
    } else {
        master_weights(model, MASTER_DTYPE)
    };
    let mut optimizer = adamw(&config.optimizer).init::<B, R::Model>();
    if let Some(dir) = &start.checkpoint {
        start_iter = resume::start_iter(&checkpoint::read_state(dir)?, dir, world, t)?;
    }
    let mut zero = match config.zero.stage {
        0 => None,
        _ => Some(ZeroOptimizer::<B>::new(
            &model,
            config.zero,
            &config.optimizer,
            collective,
            start.checkpoint.as_deref(),
            device,
        )?),
    };
    if let (Some(dir), None) = (&start.checkpoint, &zero) {
        if has_zero_state(dir) {
            return Err(Error::Checkpoint {
                path: dir.clone(),
                message: "its optimizer state is sharded by ZeRO: resume with the same --deepspeed setting".into(),
            });
        }
        optimizer = optimizer.load_record(resume::load_optimizer::<B, _>(dir, device)?);
    }

    let lengths = recipe.lengths();
    let rows = lengths.len();
    let batches_per_epoch = rows.div_ceil(world).div_ceil(t.batch_size);
    let total_iters = t.max_iters.unwrap_or(batches_per_epoch * t.max_epochs);
    let schedule = LrSchedule::new(&config.optimizer, &config.schedule, total_iters);
    let memory = ModelMemory::of(&model, recipe.nf4_bytes(&model)).partitioned(config.zero, world);
    tracing::info!(
        trainable_params = memory.trainable_params,
        model_state_bytes = memory.total_bytes(),
        "model state"
    );
    // Every rank reports the model state it holds; the rest is rank 0's.
    progress.event(&TrainEvent::Started {
        total_iters,
        start_iter,
        rows,
        memory,
    });
    let mut log = None;
    if lead {
        let tensorboard = config
            .visualizer
            .tensorboard
            .then(|| work_dir.join("tensorboard"));
        let log = log.insert(JsonLog::open(
            &work_dir.join("train_log.jsonl"),
            tensorboard.as_deref(),
        )?);
        if start_iter == 0 {
            evaluate(recipe, &model.valid(), 0, progress, log)?;
        }
    }

    let mut summary = TrainSummary {
        iters: start_iter,
        first_loss: None,
        last_loss: None,
        last_checkpoint: start.checkpoint.clone(),
        interrupted: false,
    };
    let mut accumulator = GradientsAccumulator::<R::Model>::new();
    let mut step_metrics: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
    let (mut step_loss, mut step_tokens, mut step_seen, mut micro) =
        (0.0f64, 0usize, 0usize, 0usize);
    // A rank whose loss is not finite says so at the step, so all ranks stop together.
    let mut diverged: Option<(usize, f64)> = None;
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = usize::MAX;
    for iter in start_iter..total_iters {
        let epoch = iter / batches_per_epoch.max(1);
        if epoch != order_epoch {
            order = rank_rows(epoch_order(&lengths, config, epoch, world), world, rank);
            order_epoch = epoch;
        }
        let first = (iter % batches_per_epoch.max(1)) * t.batch_size;
        let rows_of_batch: Vec<usize> = order
            .iter()
            .skip(first)
            .take(t.batch_size)
            .copied()
            .collect();
        // Rank r's micro-batch i is micro-batch i·N + r of one rank accumulating them all.
        let stream = (iter * world + rank) as u64;
        B::seed(device, t.seed.wrapping_mul(1_000_003).wrapping_add(stream));
        // Divided as one rank accumulating every rank's micro-batches divides each.
        let divisor = t.accumulative_counts * world;
        let step = recipe.forward_backward(&model, &rows_of_batch, divisor)?;
        if !step.loss.is_finite() {
            if world == 1 {
                return Err(Error::Diverged {
                    iter: iter + 1,
                    loss: step.loss,
                    checkpoint: summary.last_checkpoint.clone(),
                });
            }
            diverged.get_or_insert((iter + 1, step.loss));
        }
        match &mut zero {
            Some(z) if z.reduces_each_micro_batch() => z.reduce(&model, &step.grads, collective)?,
            _ => accumulator.accumulate(&model, step.grads),
        }
        for (name, value) in &step.metrics {
            let slot = step_metrics.entry(*name).or_insert((0.0, 0));
            *slot = (slot.0 + value, slot.1 + 1);
        }
        step_loss += step.loss * step.trained_tokens as f64;
        step_tokens += step.trained_tokens;
        step_seen += step.tokens;
        micro += 1;
        let done = iter + 1;
        let mut interrupted = false;
        if micro == t.accumulative_counts || done == total_iters {
            let lr = schedule.lr(iter);
            let mut grads = accumulator.grads();
            interrupted = stop.load(Ordering::SeqCst);
            if world > 1 {
                let mut stats = [
                    step_loss,
                    step_tokens as f64,
                    step_seen as f64,
                    f64::from(u8::from(interrupted)),
                    f64::from(u8::from(diverged.is_some())),
                ];
                collective.all_reduce_sum_f64(&mut stats)?;
                if stats[4] > 0.0 {
                    let (iter, loss) = diverged.unwrap_or((done, stats[0]));
                    return Err(Error::Diverged {
                        iter,
                        loss,
                        checkpoint: summary.last_checkpoint.clone(),
                    });
                }
                if zero.is_none() {
                    grads = crate::collective::grads::all_reduce_sum(&model, grads, collective)?;
                }
                step_loss = stats[0];
                step_tokens = stats[1] as usize;
                step_seen = stats[2] as usize;
                interrupted = stats[3] > 0.0;
            }
            tokens_seen += step_seen;
            let grad_norm;
            let max_norm = config.optimizer.max_norm;
            (model, grad_norm) = match &mut zero {
                Some(z) => {
                    if !z.reduces_each_micro_batch() {
                        z.reduce(&model, &grads, collective)?;
                    }
                    z.step(model, lr, max_norm, collective)?
                }
                None => optimizer_step(model, &mut optimizer, grads, lr, max_norm),
            };
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
                metrics: std::mem::take(&mut step_metrics)
                    .into_iter()
                    .map(|(name, (sum, n))| (name.to_string(), sum / n.max(1) as f64))
                    .collect(),
            };
            summary.first_loss.get_or_insert(loss);
            summary.last_loss = Some(loss);
            if let Some(log) = &mut log {
                let event = TrainEvent::Step(stats);
                log.write(&event)?;
                progress.event(&event);
            }
            (step_loss, step_tokens, step_seen, micro) = (0.0, 0, 0, 0);
            if world == 1 {
                // One rank reads the flag last, so a stop asked for at this step's
                // report is taken now; ranks agree on it through the statistics above.
                interrupted = stop.load(Ordering::SeqCst);
            }
        }
        summary.iters = done;
        let at_save =
            done % config.checkpoint.save_steps == 0 || done == total_iters || interrupted;
        // With ZeRO every rank writes its shard; the others' wait beside the work dir
        // until rank 0 moves them into the checkpoint it writes.
        let staging = || work_dir.join(".zero_staging").join(format!("iter_{done}"));
        if at_save
            && micro == 0
            && !lead
            && let Some(z) = &zero
        {
            z.save(&staging())?;
            collective.barrier()?;
        }
        if at_save && micro == 0 && lead {
            if zero.is_some() {
                collective.barrier()?;
            }
            let state = TrainState {
                iter: done,
                config_fingerprint: fingerprint.clone(),
                mode,
                world_size: world,
                accumulative_counts: t.accumulative_counts,
            };
            let path = checkpoint::save(
                work_dir,
                &state,
                config.checkpoint.save_total_limit,
                |dir| {
                    recipe.write_weights(&model.valid(), dir, SaveDtype::F32)?;
                    match &zero {
                        Some(z) => {
                            z.save(dir)?;
                            resume::take_staged_shards(&staging(), dir, world)
                        }
                        None => resume::save_optimizer::<B, _>(optimizer.to_record(), dir),
                    }
                },
            )?;
            progress.event(&TrainEvent::Saved {
                iter: done,
                path: path.clone(),
            });
            summary.last_checkpoint = Some(path);
        }
        if let Some(log) = &mut log
            && done % config.evaluation.freq == 0
            && done != total_iters
        {
            evaluate(recipe, &model.valid(), done, progress, log)?;
        }
        if interrupted && micro == 0 {
            summary.interrupted = true;
            return Ok(summary);
        }
    }
    if let Some(log) = &mut log {
        evaluate(recipe, &model.valid(), summary.iters, progress, log)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests;
