//! The linear layer, `y = x·W + b`, with `W` stored as `[d_in, d_out]` (Burn's layout;
//! checkpoints store PyTorch's `[out, in]` and are transposed on load).
//!
//! Every matrix product of the models goes through [`Linear::forward`]: it is the one
//! seam where a backend-specific GEMM (cuBLAS on CUDA) or an adapter plugs in without
//! touching model code. A [`Lora`] adapter adds `scale·dropout(x)·A·B` (PEFT's LoRA,
//! Hu et al. 2021) without ever forming the merged weight, so its cost is proportional
//! to the rank.

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
    /// A low-rank adapter, when one is attached.
    pub lora: Option<Lora<B>>,
}

/// A LoRA adapter: `ΔW = scale · A·B` with `A: [d_in, r]`, `B: [r, d_out]` (PEFT stores
/// their transposes as `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Down projection `[d_in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// Up projection `[r, d_out]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    /// PEFT's initialisation: A kaiming-uniform with a = √5 (bound 1/√d_in), B zeros, so
    /// the adapted layer starts equal to the base.
    pub fn init(d_in: usize, d_out: usize, r: usize, alpha: f64, dropout: f64, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        Self {
            lora_a: Param::from_tensor(Tensor::random([d_in, r], Distribution::Uniform(-bound, bound), device)),
            lora_b: Param::from_tensor(Tensor::zeros([r, d_out], device)),
            scale: alpha / r.max(1) as f64,
            dropout,
        }
    }

    /// An adapter from `A: [d_in, r]` and `B: [r, d_out]`.
    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self { lora_a: Param::from_tensor(a), lora_b: Param::from_tensor(b), scale, dropout }
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[1]
    }

    /// `scale · dropout(x)·A·B`.
    ///
    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // Burn's dropout is active only while gradients are tracked (training).
        let x = if self.dropout > 0.0 {
            burn::nn::Dropout { prob: self.dropout }.forward(x)
        } else {
            x
        };
        x.matmul(self.lora_a.val().unsqueeze::<D>()).matmul(self.lora_b.val().unsqueeze::<D>()) * self.scale
    }

    /// `scale · A·B` as a `[d_in, d_out]` matrix (for merging).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scale
    }
}

impl<B: Backend> Linear<B> {
    /// A layer initialised as PyTorch's `nn.Linear` (uniform ±1/√d_in).
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let dist = Distribution::Uniform(-bound, bound);
        Self {
            weight: Param::from_tensor(Tensor::random([d_in, d_out], dist, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([d_out], dist, device))),
            lora: None,
        }
    }

    /// Loads `{prefix}.weight` (`[out, in]` on disk) and, with `bias`, `{prefix}.bias`.
    ///
    /// # Errors
    /// A missing tensor or a shape other than `[d_out, d_in]`.
    pub fn load(ckpt: &Checkpoint, prefix: &str, d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Result<Self> {
        let weight = ckpt.linear_weight::<B>(&format!("{prefix}.weight"), d_out, d_in, device)?;
        let bias = if bias { Some(Param::from_tensor(ckpt.tensor::<B, 1>(&format!("{prefix}.bias"), [d_out], device)?)) } else { None };
        Ok(Self { weight: Param::from_tensor(weight), bias, lora: None })
    }

    /// A layer from a `[d_in, d_out]` weight and optional bias.
    pub fn from_tensors(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self { weight: Param::from_tensor(weight), bias: bias.map(Param::from_tensor), lora: None }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.val().dims()
    }

    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut y = x.clone().matmul(self.weight.val().unsqueeze::<D>());
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze::<D>();
        }
        match &self.lora {
            Some(lora) => y + lora.forward(x),
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
    fn lora_adds_the_low_rank_update_and_starts_at_zero() {
        let device = Default::default();
        let w = Tensor::<TestBackend, 2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        let mut linear = Linear::from_tensors(w, None);
        linear.lora = Some(Lora::init(2, 2, 1, 2.0, 0.0, &device));
        let x = Tensor::<TestBackend, 2>::from_floats([[3.0, 4.0]], &device);
        linear.forward(x.clone()).into_data().assert_approx_eq::<f32>(&TensorData::from([[3.0, 4.0]]), Tolerance::absolute(1e-6));
        let a = Tensor::<TestBackend, 2>::from_floats([[1.0], [1.0]], &device);
        let b = Tensor::<TestBackend, 2>::from_floats([[0.5, -1.0]], &device);
        let lora = Lora::from_tensors(a, b, 2.0, 0.0);
        // x·A = 7; ·B = [3.5, -7]; ·2 = [7, -14].
        lora.delta().into_data().assert_approx_eq::<f32>(&TensorData::from([[1.0, -2.0], [1.0, -2.0]]), Tolerance::absolute(1e-6));
        linear.lora = Some(lora);
        linear.forward(x).into_data().assert_approx_eq::<f32>(&TensorData::from([[10.0, -10.0]]), Tolerance::absolute(1e-5));
    }

    #[test]
    fn init_is_bounded_by_fan_in() {
        let linear = Linear::<TestBackend>::new(16, 8, true, &Default::default());
        let max = linear.weight.val().abs().max().into_scalar();
        assert!(max <= 0.25 + 1e-6, "{max}");
    }
}
