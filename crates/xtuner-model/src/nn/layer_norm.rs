//! LayerNorm (Ba et al., 2016) as PyTorch's `nn.LayerNorm` computes it, in f32
//! whatever the compute dtype (CLIP's pre- and post-norms).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// LayerNorm over the last axis, `(x − mean) / √(var + ε) · weight + bias` (biased
/// variance), computed in f32. Fields are the checkpoint key segments.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale, `[C]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift, `[C]`.
    pub bias: Param<Tensor<B, 1>>,
    /// ε.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// An identity-initialised norm (weight 1, bias 0).
    pub fn new(d_model: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d_model], device)),
            bias: Param::from_tensor(Tensor::zeros([d_model], device)),
            eps,
        }
    }

    /// # Shapes
    /// `x`: `[..., C]` → same shape.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = centered / (var + self.eps).sqrt();
        let weight = self.weight.val().cast(DType::F32).unsqueeze::<D>();
        let bias = self.bias.val().cast(DType::F32).unsqueeze::<D>();
        (normed * weight + bias).cast(dtype)
    }
}
