//! Models in Burn, generic over the backend.
//!
//! - [`decoder`]: the one decoder (InternLM2, Llama, Qwen2 checkpoints; families differ
//!   in key names and small settings, not in code);
//! - [`nn`]: the layers it is built from (the [`nn::linear`] matmul seam, RMSNorm,
//!   rotate-half RoPE, grouped-query attention, SwiGLU, the KV cache);
//! - [`checkpoint`]: Hugging Face safetensors I/O, key names, PEFT adapters, and each
//!   model's conversion from and to its checkpoint layout;
//! - [`clip_vit`], [`projector`], [`llava`] and [`image`]: the LLaVA parts (the CLIP
//!   vision tower, XTuner's projector, the splice of image features into the text, CLIP
//!   image preprocessing);
//! - [`reward`]: a reward model (the decoder and a value head) and its export layouts;
//! - [`generate`] and [`sampling`]: decoding with a KV cache;
//! - [`device`]: device memory figures; [`error`]: the crate's error type.

pub mod checkpoint;
pub mod clip_vit;
pub mod decoder;
pub mod device;
pub mod error;
pub mod generate;
pub mod image;
pub mod llava;
pub mod nn;
pub mod projector;
pub mod reward;
pub mod sampling;

pub use error::{Error, Result};

/// The fixture path helper of this crate's tests (one definition, shared with the
/// integration tests).
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
pub(crate) mod test_support;

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
