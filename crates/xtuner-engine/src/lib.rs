//! Training policy and the run configuration.
//!
//! [`config`] is the TOML schema of a run, with XTuner's defaults. [`schedule`] is the
//! learning-rate schedule of XTuner's recipes; [`loss`] the causal LM loss. The engine's other parts (LoRA policy,
//! optimizer, training loop, checkpoints, export) build on these.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod init;
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

/// FNV-1a, 64-bit: a hash of `bytes` that stays the same across builds and platforms
/// (parameter ids, config fingerprints, random streams are named with it).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
