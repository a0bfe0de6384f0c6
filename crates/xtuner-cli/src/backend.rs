//! The one place a concrete Burn backend is chosen. Everything below the CLI is
//! generic over `B: Backend`; `--device` picks one of these.

use anyhow::{Result, bail};

/// The CPU backend (burn-ndarray, f32).
pub type Cpu = burn::backend::NdArray<f32>;

/// The CUDA backend (burn-cuda, bf16 weights and activations), with the `cuda` feature.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<burn::tensor::bf16, i32>;

/// Where a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Fails early when the device was not compiled in.
pub fn check(device: Device) -> Result<()> {
    if device == Device::Cuda && !cfg!(feature = "cuda") {
        bail!("this xtuner was built without CUDA: rebuild with `cargo build --release -p xtuner-cli --features cuda`");
    }
    Ok(())
}
