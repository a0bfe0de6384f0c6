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
pub(crate) use resume::check_mode;
pub use resume::{Resume, resume_point};

use crate::checkpoint::{self, TrainState};
use crate::collective::Collective;
use crate::config::{LoadedConfig, TrainConfig};
use crate::memory::ModelMemory;
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
    let start_iter = start.iter;
    let model = start.model.map(&mut resume::StableIds::new());
    let mut model = master_weights(model, MASTER_DTYPE);
    let mut optimizer = adamw(&config.optimizer).init::<B, R::Model>();
    if let Some(dir) = &start.checkpoint {
        let saved = checkpoint::read_state(dir)?.world_size;
        if saved != world {
            return Err(Error::Checkpoint {
                path: dir.clone(),
                message: format!(
                    "written by a run of {saved} rank(s); resume it with {saved} (this run has {world}): its iteration count is per rank"
                ),
            });
        }
        optimizer = optimizer.load_record(resume::load_optimizer::<B, _>(dir, device)?);
    }

    let t = &config.train;
    let lengths = recipe.lengths();
    let rows = lengths.len();
    let batches_per_epoch = rows.div_ceil(world).div_ceil(t.batch_size);
    let total_iters = t.max_iters.unwrap_or(batches_per_epoch * t.max_epochs);
    let schedule = LrSchedule::new(&config.optimizer, &config.schedule, total_iters);
    let memory = ModelMemory::of(&model, recipe.nf4_bytes(&model));
    tracing::info!(
        trainable_params = memory.trainable_params,
        model_state_bytes = memory.total_bytes(),
        "model state"
    );
    let mut log = None;
    if lead {
        progress.event(&TrainEvent::Started {
            total_iters,
            start_iter,
            rows,
            memory,
        });
        let log = log.insert(JsonLog::open(&work_dir.join("train_log.jsonl"))?);
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
            order = rank_rows(epoch_order(&lengths, config, epoch), world, rank);
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
        accumulator.accumulate(&model, step.grads);
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
                grads = crate::collective::grads::all_reduce_sum(&model, grads, collective)?;
                step_loss = stats[0];
                step_tokens = stats[1] as usize;
                step_seen = stats[2] as usize;
                interrupted = stats[3] > 0.0;
            }
            tokens_seen += step_seen;
            let grad_norm;
            (model, grad_norm) =
                optimizer_step(model, &mut optimizer, grads, lr, config.optimizer.max_norm);
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
        if at_save && micro == 0 && lead {
            let state = TrainState {
                iter: done,
                config_fingerprint: fingerprint.clone(),
                mode,
                world_size: world,
            };
            let path = checkpoint::save(
                work_dir,
                &state,
                config.checkpoint.save_total_limit,
                |dir| {
                    recipe.write_weights(&model.valid(), dir, SaveDtype::F32)?;
                    resume::save_optimizer::<B, _>(optimizer.to_record(), dir)
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
mod tests {
    use std::cell::RefCell;
    use std::path::Path;

    use burn::backend::{Autodiff, NdArray};
    use burn::module::Param;
    use burn::tensor::Tensor;
    use burn::tensor::backend::Backend;
    use xtuner_model::nn::precision::scalar;

    use super::*;

    type A = Autodiff<NdArray<f32>>;

    /// The smallest trainable module: one weight.
    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        w: Param<Tensor<B, 1>>,
    }

    fn toy(w: f32) -> Toy<A> {
        let device = Default::default();
        Toy {
            w: Param::from_tensor(Tensor::from_floats([w], &device)),
        }
    }

    /// A recipe with no model behind it: row `r` pulls the weight towards `r`.
    struct Fake {
        rows: usize,
        /// Make the optimizer state unwritable (a directory where its file goes).
        block_optimizer: bool,
        /// The rows of every micro-batch, in order.
        seen: RefCell<Vec<Vec<usize>>>,
    }

    impl Recipe<A> for Fake {
        type Model = Toy<A>;

        fn lengths(&self) -> Vec<i64> {
            vec![1; self.rows]
        }

        fn forward_backward(
            &self,
            model: &Toy<A>,
            rows: &[usize],
            accumulative_counts: usize,
        ) -> Result<MicroStep> {
            self.seen.borrow_mut().push(rows.to_vec());
            let targets: Vec<f32> = rows.iter().map(|&r| r as f32).collect();
            let targets = Tensor::<A, 1>::from_floats(targets.as_slice(), &Default::default());
            let loss = (model.w.val() - targets).powf_scalar(2.0).mean();
            let value = scalar(loss.clone());
            let grads =
                GradientsParams::from_grads((loss / accumulative_counts as f64).backward(), model);
            Ok(MicroStep {
                loss: value,
                trained_tokens: rows.len(),
                tokens: rows.len(),
                grads,
            })
        }

        fn nf4_bytes(&self, _: &Toy<A>) -> usize {
            0
        }

        fn write_weights(&self, model: &Toy<NdArray<f32>>, dir: &Path, _: SaveDtype) -> Result<()> {
            if self.block_optimizer {
                std::fs::create_dir(dir.join("optimizer.bin")).map_err(|e| Error::io(dir, e))?;
            }
            let w = scalar(model.w.val());
            std::fs::write(dir.join("w"), format!("{w:?}")).map_err(|e| Error::io(dir, e))
        }

        fn evaluate(&self, model: &Toy<NdArray<f32>>) -> Result<Vec<(String, String)>> {
            Ok(vec![("w".into(), format!("{:?}", scalar(model.w.val())))])
        }
    }

    fn fake(block_optimizer: bool) -> Fake {
        Fake {
            rows: 6,
            block_optimizer,
            seen: RefCell::new(Vec::new()),
        }
    }

    /// Records the events as short strings, and each step's loss and gradient norm;
    /// asks the loop to stop after `stop_at`.
    struct Events<'a> {
        log: Vec<String>,
        steps: Vec<(f64, f64)>,
        stop_at: Option<usize>,
        stop: &'a AtomicBool,
    }

    impl Progress for Events<'_> {
        fn event(&mut self, event: &TrainEvent) {
            self.log.push(match event {
                TrainEvent::Started { start_iter, .. } => format!("start@{start_iter}"),
                TrainEvent::Step(s) => {
                    self.steps.push((s.loss, s.grad_norm));
                    if self.stop_at == Some(s.iter) {
                        self.stop.store(true, Ordering::SeqCst);
                    }
                    format!("step@{}", s.iter)
                }
                TrainEvent::Eval { iter, .. } => format!("eval@{iter}"),
                TrainEvent::Saved { iter, .. } => format!("saved@{iter}"),
            });
        }
    }

    /// Six rows, batches of two, two micro-batches a step, two epochs: six
    /// iterations, three optimizer steps.
    fn loaded() -> LoadedConfig {
        let text = r#"
            [model]
            preset = "internlm2-tiny"
            [tokenizer]
            path = "unused"
            [data]
            files = ["unused.jsonl"]
            format = "pretrain"
            [optimizer]
            lr = 0.1
            [train]
            batch_size = 2
            accumulative_counts = 2
            max_epochs = 2
            [checkpoint]
            save_steps = 4
            [evaluation]
            freq = 3
            inputs = ["w"]
        "#;
        LoadedConfig::from_text(text, Path::new("fake.toml"), "fake", &[]).unwrap()
    }

    fn train(
        recipe: &Fake,
        start: Start<Toy<A>>,
        work_dir: &Path,
        stop_at: Option<usize>,
    ) -> (Result<TrainSummary>, Vec<String>) {
        let loaded = loaded();
        let stop = AtomicBool::new(false);
        let mut events = Events {
            log: Vec::new(),
            steps: Vec::new(),
            stop_at,
            stop: &stop,
        };
        let ctx = RunContext::<A> {
            loaded: &loaded,
            work_dir,
            device: &Default::default(),
            progress: &mut events,
            stop: &stop,
            collective: &crate::collective::Single,
        };
        let summary = run(recipe, start, ctx);
        (summary, events.log)
    }

    /// A run of `config` as one rank of `collective`: its summary and, on rank 0, each
    /// step's loss and gradient norm.
    fn run_as(
        recipe: &Fake,
        config: &str,
        work_dir: &Path,
        collective: &dyn Collective,
    ) -> (Result<TrainSummary>, Vec<(f64, f64)>) {
        let loaded = LoadedConfig::from_text(config, Path::new("dp.toml"), "dp", &[]).unwrap();
        let stop = AtomicBool::new(false);
        let mut events = Events {
            log: Vec::new(),
            steps: Vec::new(),
            stop_at: None,
            stop: &stop,
        };
        let ctx = RunContext::<A> {
            loaded: &loaded,
            work_dir,
            device: &Default::default(),
            progress: &mut events,
            stop: &stop,
            collective,
        };
        (run(recipe, fresh(), ctx), events.steps)
    }

    /// Six rows, batches of one, two epochs, a constant learning rate.
    fn dp_config(accumulative_counts: usize) -> String {
        format!(
            r#"
            [model]
            preset = "internlm2-tiny"
            [tokenizer]
            path = "unused"
            [data]
            files = ["unused.jsonl"]
            format = "pretrain"
            [optimizer]
            lr = 0.1
            [schedule]
            warmup_ratio = 0.0
            eta_min = 0.1
            [train]
            batch_size = 1
            accumulative_counts = {accumulative_counts}
            max_epochs = 2
            [checkpoint]
            save_steps = 1000
            [evaluation]
            freq = 1000
            "#
        )
    }

    /// N ranks (each taking every N-th row) step exactly as one rank accumulating the
    /// same micro-batches: the same losses, gradient norms and final weight; together
    /// they see every row of each epoch once; only rank 0 writes.
    #[test]
    fn n_ranks_step_as_one_rank_accumulating_their_micro_batches() {
        for world in [2, 3] {
            let one = tempfile::tempdir().unwrap();
            let (summary, want) = run_as(
                &fake(false),
                &dp_config(world),
                one.path(),
                &crate::collective::Single,
            );
            let want_w = weight_in(&summary.unwrap().last_checkpoint.unwrap());

            let many = tempfile::tempdir().unwrap();
            let outcomes = std::thread::scope(|s| {
                let handles: Vec<_> = crate::collective::local::Local::group(world)
                    .into_iter()
                    .map(|rank| {
                        let dir = many.path();
                        s.spawn(move || {
                            let recipe = fake(false);
                            let (summary, steps) = run_as(&recipe, &dp_config(1), dir, &rank);
                            (summary.unwrap(), steps, recipe.seen.into_inner())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            let (lead, steps, _) = &outcomes[0];
            assert_eq!(steps.len(), want.len(), "{world} ranks");
            for ((loss, norm), (want_loss, want_norm)) in steps.iter().zip(&want) {
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                    "{loss} vs {want_loss}"
                );
                assert!(
                    (norm - want_norm).abs() <= 1e-5 * want_norm.abs(),
                    "{norm} vs {want_norm}"
                );
            }
            assert_eq!(weight_in(lead.last_checkpoint.as_ref().unwrap()), want_w);
            assert!(
                outcomes[1..]
                    .iter()
                    .all(|(s, steps, _)| s.last_checkpoint.is_none() && steps.is_empty())
            );
            let per_epoch = 6 / world;
            for epoch in 0..2 {
                let mut rows: Vec<usize> = outcomes
                    .iter()
                    .flat_map(|(_, _, seen)| {
                        seen[epoch * per_epoch..(epoch + 1) * per_epoch].concat()
                    })
                    .collect();
                rows.sort();
                assert_eq!(rows, [0, 1, 2, 3, 4, 5], "epoch {epoch}, {world} ranks");
            }
        }
    }

    #[test]
    fn ranks_take_every_nth_row_padded_from_the_start() {
        assert_eq!(rank_rows(vec![5, 3, 1, 0, 2], 2, 0), [5, 1, 2]);
        assert_eq!(rank_rows(vec![5, 3, 1, 0, 2], 2, 1), [3, 0, 5]);
        assert_eq!(rank_rows(vec![4, 2], 1, 0), [4, 2]);
    }

    fn fresh() -> Start<Toy<A>> {
        Start {
            model: toy(0.0),
            iter: 0,
            checkpoint: None,
        }
    }

    fn weight_in(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("w")).unwrap()
    }

    #[test]
    fn the_loop_accumulates_saves_evaluates_and_visits_every_row_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = fake(false);
        let (summary, events) = train(&recipe, fresh(), dir.path(), None);
        let summary = summary.unwrap();
        assert_eq!(
            events,
            [
                "start@0", "eval@0", "step@2", "eval@3", "step@4", "saved@4", "step@6", "saved@6",
                "eval@6"
            ]
        );
        assert_eq!((summary.iters, summary.interrupted), (6, false));
        assert_eq!(summary.last_checkpoint, Some(dir.path().join("iter_6")));
        let seen = recipe.seen.borrow();
        for epoch in seen.chunks(3) {
            let mut rows: Vec<usize> = epoch.concat();
            rows.sort();
            assert_eq!(rows, [0, 1, 2, 3, 4, 5]);
        }
        // Two epochs in their own orders.
        assert_ne!(seen[..3], seen[3..]);
        // Every step and evaluation is in the log.
        let log = std::fs::read_to_string(dir.path().join("train_log.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 3 + 3);
    }

    /// Stopped after the first step and resumed from its checkpoint, a run ends with
    /// exactly the weight of a run that never stopped (optimizer state, data order and
    /// schedule carried over).
    #[test]
    fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
        let whole = tempfile::tempdir().unwrap();
        let (summary, _) = train(&fake(false), fresh(), whole.path(), None);
        let want = weight_in(&summary.unwrap().last_checkpoint.unwrap());

        let parts = tempfile::tempdir().unwrap();
        let (first, events) = train(&fake(false), fresh(), parts.path(), Some(2));
        let first = first.unwrap();
        assert!(first.interrupted);
        assert_eq!(events.last().map(String::as_str), Some("saved@2"));
        let config = loaded().config;
        let (dir, iter) = resume_point(&config, parts.path(), Some(Resume::Auto))
            .unwrap()
            .unwrap();
        assert_eq!((dir.clone(), iter), (parts.path().join("iter_2"), 2));
        let w: f32 = weight_in(&dir).parse().unwrap();
        let start = Start {
            model: toy(w),
            iter,
            checkpoint: Some(dir),
        };
        let (rest, events) = train(&fake(false), start, parts.path(), None);
        assert_eq!(events.first().map(String::as_str), Some("start@2"));
        assert_eq!(weight_in(&rest.unwrap().last_checkpoint.unwrap()), want);
    }

    /// An optimizer state that cannot be written is a checkpoint error naming its
    /// file (a failure of the run, not of the config), and no checkpoint is left.
    #[test]
    fn an_unwritable_optimizer_state_is_a_checkpoint_error() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, _) = train(&fake(true), fresh(), dir.path(), None);
        match summary {
            Err(e @ Error::Checkpoint { .. }) => {
                assert!(e.to_string().contains("optimizer.bin"), "{e}");
                assert!(!e.is_usage());
            }
            other => panic!("{other:?}"),
        }
        assert!(crate::checkpoint::latest(dir.path()).unwrap().is_none());
    }
}
