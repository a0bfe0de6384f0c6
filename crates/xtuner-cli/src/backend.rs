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
        bail!(
            "this xtuner was built without CUDA: rebuild with `cargo build --release -p xtuner-cli --features cuda`"
        );
    }
    Ok(())
}

/// Runs work on the CUDA backend, turning a failure inside it (no driver, no device, a
/// kernel that does not compile) into an error: burn-cuda reports these by panicking.
#[cfg(feature = "cuda")]
pub fn on_cuda<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        tracing::warn!("CUDA backend panic: {info}")
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    std::panic::set_hook(quiet);
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            bail!(
                "the CUDA backend failed (is there an NVIDIA GPU and driver, with CUDA_PATH and LD_LIBRARY_PATH set?): {message}"
            )
        }
    }
}
