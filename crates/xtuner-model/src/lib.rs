//! Models in Burn, generic over the backend.
//!
//! - [`internlm2`]: the InternLM2 decoder, which also serves Llama and Qwen2 checkpoints;
//! - [`nn`]: the layers it is built from (the [`nn::linear`] matmul seam, RMSNorm,
//!   rotate-half RoPE, grouped-query attention, SwiGLU, the KV cache);
//! - [`checkpoint`]: Hugging Face safetensors I/O, key names, PEFT adapters;
//! - [`generate`] and [`sampling`]: decoding with a KV cache.

pub mod checkpoint;
pub mod clip_vit;
pub mod error;
pub mod generate;
pub mod image;
pub mod internlm2;
pub mod llava;
pub mod nn;
pub mod projector;
pub mod sampling;

pub use error::{Error, Result};

/// The backend the unit tests run on.
#[cfg(test)]
pub(crate) type TestBackend = burn::backend::NdArray<f32>;
