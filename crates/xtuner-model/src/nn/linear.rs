//! The linear layer, `y = x·W + b`, with `W` stored as `[d_in, d_out]` (Burn's layout;
//! checkpoints store PyTorch's `[out, in]` and are transposed on load).
//!
//! Every matrix product of the models goes through [`Linear::forward`]: it is the one
//! seam where a backend-specific GEMM (cuBLAS on CUDA) or an adapter (LoRA, NF4) plugs
//! in without touching model code.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use crate::Result;
use crate::checkpoint::Checkpoint;

/// A linear layer. Field names are the checkpoint's key segments (`weight`, `bias`).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`, when the layer has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// A layer initialised as PyTorch's `nn.Linear` (uniform ±1/√d_in).
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let dist = Distribution::Uniform(-bound, bound);
        Self {
            weight: Param::from_tensor(Tensor::random([d_in, d_out], dist, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([d_out], dist, device))),
        }
    }

    /// Loads `{prefix}.weight` (`[out, in]` on disk) and, with `bias`, `{prefix}.bias`.
    ///
    /// # Errors
    /// A missing tensor or a shape other than `[d_out, d_in]`.
    pub fn load(ckpt: &Checkpoint, prefix: &str, d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Result<Self> {
        let weight = ckpt.linear_weight::<B>(&format!("{prefix}.weight"), d_out, d_in, device)?;
        let bias = if bias { Some(Param::from_tensor(ckpt.tensor::<B, 1>(&format!("{prefix}.bias"), [d_out], device)?)) } else { None };
        Ok(Self { weight: Param::from_tensor(weight), bias })
    }

    /// A layer from a `[d_in, d_out]` weight and optional bias.
    pub fn from_tensors(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self { weight: Param::from_tensor(weight), bias: bias.map(Param::from_tensor) }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.val().dims()
    }

    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = x.matmul(self.weight.val().unsqueeze::<D>());
        match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<D>(),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::{TensorData, Tolerance};

    #[test]
    fn forward_is_x_w_plus_b() {
        let device = Default::default();
        let w = Tensor::<TestBackend, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &device);
        let b = Tensor::<TestBackend, 1>::from_floats([0.5, 0.0, -1.0], &device);
        let linear = Linear::from_tensors(w, Some(b));
        let x = Tensor::<TestBackend, 3>::from_floats([[[1.0, 1.0]], [[2.0, -1.0]]], &device);
        let y = linear.forward(x);
        let expected = TensorData::from([[[5.5, 7.0, 8.0]], [[-1.5, -1.0, -1.0]]]);
        y.into_data().assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
        assert_eq!(linear.dims(), [2, 3]);
    }

    #[test]
    fn init_is_bounded_by_fan_in() {
        let linear = Linear::<TestBackend>::new(16, 8, true, &Default::default());
        let max = linear.weight.val().abs().max().into_scalar();
        assert!(max <= 0.25 + 1e-6, "{max}");
    }
}
