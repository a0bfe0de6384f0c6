//! Models in Burn, generic over the backend.
//!
//! - [`internlm2`]: the InternLM2 decoder, which also serves Llama and Qwen2 checkpoints;
//! - [`nn`]: the layers it is built from (the [`nn::linear`] matmul seam, RMSNorm,
//!   rotate-half RoPE, grouped-query attention, SwiGLU, the KV cache);
//! - [`checkpoint`]: Hugging Face safetensors I/O, key names, PEFT adapters;
//! - [`generate`] and [`sampling`]: decoding with a KV cache.

pub mod checkpoint;
pub mod clip_vit;
pub mod device;
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

/// Comparisons shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use burn::tensor::Tensor;

    use crate::TestBackend;

    /// The largest absolute difference between two equally long slices.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The largest absolute difference between two tensors of one shape.
    pub fn max_abs_tensor<const D: usize>(
        a: Tensor<TestBackend, D>,
        b: Tensor<TestBackend, D>,
    ) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).abs().max().into_scalar()
    }
}
