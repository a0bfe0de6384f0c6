//! Training policy and the run configuration.
//!
//! [`config`] is the TOML schema of a run, with XTuner's defaults. [`schedule`] is the
//! learning-rate schedule of XTuner's recipes; [`loss`] the causal LM loss. The engine's other parts (LoRA policy,
//! optimizer, training loop, checkpoints, export) build on these.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod llava;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod recompute;
pub mod schedule;
pub mod train;

pub use config::{LoadedConfig, TrainConfig};
pub use error::{Error, Result};
