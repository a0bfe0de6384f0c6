//! The activations of transformers' `ACT2FN` that our models use, by their config
//! names.

use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use serde::Deserialize;

/// A transformers activation (`ACT2FN` key), shared by the decoders' gated MLPs, the
/// CLIP MLP and XTuner's projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum HiddenAct {
    /// `x · sigmoid(1.702 x)`, OpenAI CLIP's.
    #[default]
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU, `x · Φ(x)` with the erf (PyTorch `nn.GELU()`).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
    /// `x · sigmoid(x)` (SwiGLU's gate).
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl HiddenAct {
    /// Applies the activation element-wise.
    ///
    /// # Shapes
    /// Any shape → same shape.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::QuickGelu => x.clone() * sigmoid(x * 1.702),
            // Written out rather than Burn's `gelu`: its backward is the derivative of
            // the tanh approximation (off by up to 1e-3), this one's is exact.
            Self::Gelu => x.clone() * ((x * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * 0.5,
            Self::GeluTanh => {
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715)
                    * (2.0 / std::f64::consts::PI).sqrt();
                x * (inner.tanh() + 1.0) * 0.5
            }
            Self::Silu => burn::tensor::activation::silu(x),
        }
    }
}
