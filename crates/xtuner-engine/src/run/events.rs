//! What the loop reports as it goes: [`TrainEvent`]s to a [`Progress`] sink (the CLI
//! draws a progress bar from them) and, one JSON object a line, to the work dir's
//! `train_log.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::tensorboard::EventWriter;
use crate::memory::ModelMemory;
use crate::{Error, Result};

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
    /// The recipe's own numbers (DPO's `chosen_rewards`, `reward_acc`, ...), each a
    /// key of the log line.
    #[serde(flatten)]
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// Receives [`TrainEvent`]s (the CLI draws a progress bar from them).
pub trait Progress {
    /// One event.
    fn event(&mut self, event: &TrainEvent);
}

/// The JSON Lines log in the work dir (one object per step and evaluation), appended
/// to across resumes; and, when on, the same steps and answers as TensorBoard events.
pub(crate) struct JsonLog {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: Option<EventWriter>,
}

impl JsonLog {
    /// Opens (or creates) the log for appending.
    ///
    /// # Errors
    /// An unwritable work dir.
    pub(crate) fn open(path: &Path, tensorboard: Option<&Path>) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensorboard: tensorboard.map(EventWriter::create).transpose()?,
        })
    }

    /// Appends one event as a line.
    ///
    /// # Errors
    /// A failed write (a full disk), naming the log.
    pub(crate) fn write(&mut self, event: &TrainEvent) -> Result<()> {
        let line = serde_json::to_string(event).map_err(|e| Error::Serialize {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))?;
        if let Some(tb) = &mut self.tensorboard {
            match event {
                TrainEvent::Step(s) => {
                    let mut values = vec![
                        ("train/loss".to_string(), s.loss),
                        ("train/lr".to_string(), s.lr),
                        ("train/grad_norm".to_string(), s.grad_norm),
                        ("train/tokens_per_s".to_string(), s.tokens_per_s),
                    ];
                    values.extend(s.memory_mib.map(|m| ("train/memory_mib".to_string(), m)));
                    values.extend(s.metrics.iter().map(|(k, v)| (format!("train/{k}"), *v)));
                    tb.scalars(s.iter, &values)?;
                }
                TrainEvent::Eval { iter, answers } => {
                    let text: Vec<String> = answers
                        .iter()
                        .map(|(prompt, answer)| format!("**{prompt}**\n\n{answer}"))
                        .collect();
                    tb.text(*iter, "eval/answers", &text.join("\n\n---\n\n"))?;
                }
                TrainEvent::Started { .. } | TrainEvent::Saved { .. } => return Ok(()),
            }
            tb.flush()?;
        }
        Ok(())
    }
}
