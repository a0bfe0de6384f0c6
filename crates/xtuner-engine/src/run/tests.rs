//! The loop driven by a recipe with no model behind it: accumulation, checkpoints,
//! the hook, resume, and data-parallel ranks stepping as one.

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
            metrics: Vec::new(),
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

/// Runs the loop on `recipe` as one rank of `collective`: its summary, its events as
/// short strings and each step's loss and gradient norm (on rank 0).
fn drive(
    recipe: &Fake,
    start: Start<Toy<A>>,
    loaded: &LoadedConfig,
    work_dir: &Path,
    stop_at: Option<usize>,
    collective: &dyn Collective,
) -> (Result<TrainSummary>, Vec<String>, Vec<(f64, f64)>) {
    let stop = AtomicBool::new(false);
    let mut events = Events {
        log: Vec::new(),
        steps: Vec::new(),
        stop_at,
        stop: &stop,
    };
    let ctx = RunContext::<A> {
        loaded,
        work_dir,
        device: &Default::default(),
        progress: &mut events,
        stop: &stop,
        collective,
    };
    let summary = run(recipe, start, ctx);
    (summary, events.log, events.steps)
}

fn train(
    recipe: &Fake,
    start: Start<Toy<A>>,
    work_dir: &Path,
    stop_at: Option<usize>,
) -> (Result<TrainSummary>, Vec<String>) {
    let single = crate::collective::Single;
    let (summary, log, _) = drive(recipe, start, &loaded(), work_dir, stop_at, &single);
    (summary, log)
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
    let (summary, _, steps) = drive(recipe, fresh(), &loaded, work_dir, None, collective);
    (summary, steps)
}

/// Six rows, batches of one, two epochs, a constant learning rate.
fn dp_config(accumulative_counts: usize) -> String {
    dp_config_saving(accumulative_counts, 1000)
}

/// [`dp_config`] with a checkpoint every `save_steps` iterations.
fn dp_config_saving(accumulative_counts: usize, save_steps: usize) -> String {
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
        save_steps = {save_steps}
        save_total_limit = -1
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
                .flat_map(|(_, _, seen)| seen[epoch * per_epoch..(epoch + 1) * per_epoch].concat())
                .collect();
            rows.sort();
            assert_eq!(rows, [0, 1, 2, 3, 4, 5], "epoch {epoch}, {world} ranks");
        }
    }
}

/// Two ranks' checkpoint after their first step, resumed by one rank accumulating two
/// micro-batches (the same global batch), ends where the two ranks end; another global
/// batch is refused.
#[test]
fn a_run_resumed_at_another_number_of_ranks_continues_its_trajectory() {
    let two = tempfile::tempdir().unwrap();
    let finals = std::thread::scope(|s| {
        let handles: Vec<_> = crate::collective::local::Local::group(2)
            .into_iter()
            .map(|rank| {
                let dir = two.path();
                s.spawn(move || {
                    let (summary, _) = run_as(&fake(false), &dp_config_saving(1, 1), dir, &rank);
                    summary.unwrap().last_checkpoint
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let want = weight_in(finals[0].as_ref().unwrap());

    let first = two.path().join("iter_1");
    let resumed_from = |accumulative_counts: usize| {
        let one = tempfile::tempdir().unwrap();
        let loaded = LoadedConfig::from_text(
            &dp_config(accumulative_counts),
            Path::new("dp.toml"),
            "dp",
            &[],
        )
        .unwrap();
        let start = Start {
            model: toy(weight_in(&first).parse().unwrap()),
            iter: 1,
            checkpoint: Some(first.clone()),
        };
        let single = crate::collective::Single;
        let (summary, _, _) = drive(&fake(false), start, &loaded, one.path(), None, &single);
        summary.map(|s| weight_in(&s.last_checkpoint.unwrap()))
    };
    assert_eq!(resumed_from(2).unwrap(), want);
    let err = resumed_from(1).unwrap_err().to_string();
    assert!(err.contains("ranks × accumulative_counts = 2"), "{err}");
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
