//! Training policy and the training loop: what a config asks for, turned into a run.
//!
//! A config flows one way: [`config`] (the TOML schema with XTuner's defaults) →
//! [`train`], which picks the [`recipe`] for the config's [`config::RunMode`] → the
//! recipe's set-up (data, base model, adapters, resume point) → [`run`], the one loop
//! (order, accumulation, schedule, clipping, checkpoints, the log, the hook) → the
//! recipe's [`step`] and [`export`] for each micro-batch and checkpoint. [`convert`]
//! builds a checkpoint's model again through its recipe and writes it through
//! [`export`]; [`chat`] is the prompt-to-answer path of the hook and `xtuner chat`.
//!
//! Modules:
//! - [`config`]: the run configuration, [`config::RunMode`], [`config::ModelSource`];
//! - [`run`]: the loop, its [`run::Recipe`] trait, events, the JSON Lines log, resume;
//! - [`recipe`]: the shared set-up and the recipes ([`recipe::decoder`],
//!   [`recipe::llava`], [`recipe::preference`], [`recipe::reward`]);
//! - [`step`]: batch → inputs, forward/backward, the optimizer step;
//! - [`recompute`]: the decoder's forward and backward with activation checkpointing;
//! - [`loss`]: the causal LM loss, a chunk of positions at a time;
//! - [`preference`]: the objectives of preference training (DPO and its variants,
//!   ORPO, reward models);
//! - [`optim`]: AdamW, clipping, f32 master weights and moments;
//! - [`schedule`]: warm-up + cosine; [`init`]: new weights drawn on the host;
//! - [`lora`]: LoRA policy (targets, init, freezing, QLoRA's NF4 base, merge);
//! - [`checkpoint`]: atomic `iter_N` directories and `state.json`;
//! - [`collective`]: what a rank of a data-parallel run knows of the others, and the
//!   in-process ranks of the CPU backend;
//! - [`export`]: the Hugging Face, PEFT and LLaVA layouts; [`convert`]: `pth_to_hf`
//!   and `merge`;
//! - [`chat`]: prompts, the image splice and generation;
//! - [`memory`]: the model state a run holds; [`mod@bench`]: the timed training step;
//! - [`error`]: the crate's error type.

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod convert;
pub mod error;
pub mod export;
pub mod init;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod preference;
pub mod recipe;
pub mod recompute;
pub mod run;
pub mod schedule;
pub mod step;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::tensor::backend::AutodiffBackend;

pub use config::{LoadedConfig, RunMode, TrainConfig};
pub use error::{Error, Result};
pub use run::{Progress, Resume, TrainEvent, TrainSummary};

/// The fixture path helper of this crate's tests (one definition, shared with the
/// integration tests).
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
pub(crate) mod test_support;

/// Runs (or resumes) the training a config describes, with the recipe of its
/// [`RunMode`]: preference training with a `[preference]` section, LLaVA with a
/// `[llava]` section, the decoder alone otherwise;
/// as one rank of a data-parallel run when `collective` has others
/// ([`collective::Single`] for one device).
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
    collective: &dyn collective::Collective,
) -> Result<TrainSummary> {
    let ctx = run::RunContext::<B> {
        loaded,
        work_dir,
        device,
        progress,
        stop,
        collective,
    };
    if let Some(preference) = &loaded.config.preference {
        return match preference.method {
            config::PreferenceMethod::Reward => recipe::reward::train(ctx, resume),
            _ => recipe::preference::train(ctx, resume),
        };
    }
    match loaded.config.mode() {
        RunMode::Llava => recipe::llava::train(ctx, resume),
        RunMode::Lora | RunMode::Full => recipe::decoder::train(ctx, resume),
    }
}

/// FNV-1a, 64-bit: a hash of `bytes` that stays the same across builds and platforms
/// (parameter ids, config fingerprints, random streams are named with it).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
