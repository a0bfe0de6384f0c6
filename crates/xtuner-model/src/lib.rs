//! Models in Burn, generic over the backend: the building blocks of InternLM2 (and the
//! Llama/Qwen2 decoders that share its arithmetic), starting with the layers every
//! decoder uses.
//!
//! [`nn::rms_norm`] is RMSNorm computed in f32; [`nn::rope`] is rotary position
//! embedding in the rotate-half convention of InternLM2 and Hugging Face Llama, with
//! linear and dynamic-NTK scaling.

pub mod error;
pub mod nn;

pub use error::{Error, Result};

/// The backend the unit tests run on.
#[cfg(test)]
pub(crate) type TestBackend = burn::backend::NdArray<f32>;
