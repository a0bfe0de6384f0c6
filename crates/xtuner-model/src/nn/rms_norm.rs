//! RMSNorm: `y = x / sqrt(mean(x²) + ε) · (offset + weight)`, computed in f32 whatever
//! the activation dtype (as InternLM2's and Llama's reference code do), then cast back.
//! The offset is 0, or 1 for Gemma, whose checkpoints store `w` and scale by `1 + w`.
//! On the CPU backend it runs as one op of its own (`cpu.rs`).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::{Error, Result};

mod cpu;

/// Root-mean-square layer norm with a learned scale. The field is named `weight`, as
/// the checkpoint key (`attention_norm.weight`, `model.norm.weight`).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale, `[d_model]`.
    pub weight: Param<Tensor<B, 1>>,
    /// ε added to the mean square.
    pub eps: f64,
    /// Added to the weight before scaling (Gemma: 1).
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm of `d_model` channels with unit scale.
    ///
    /// # Errors
    /// `d_model` 0 or a non-positive ε.
    pub fn new(d_model: usize, eps: f64, device: &B::Device) -> Result<Self> {
        if d_model == 0 {
            return Err(Error::InvalidConfig {
                key: "hidden_size",
                message: "must be positive".into(),
            });
        }
        if eps.is_nan() || eps <= 0.0 {
            return Err(Error::InvalidConfig {
                key: "rms_norm_eps",
                message: format!("must be positive, got {eps}"),
            });
        }
        Ok(Self {
            weight: Param::from_tensor(Tensor::ones([d_model], device)),
            eps,
            offset: 0.0,
        })
    }

    /// The same norm scaling by `offset + weight` (Gemma's `1 + w` with 1); a new
    /// Gemma norm starts at `w = 0`, the identity scale.
    pub fn with_offset(mut self, offset: f64) -> Self {
        if offset != 0.0 {
            self.weight = Param::from_tensor(self.weight.val().zeros_like());
        }
        self.offset = offset;
        self
    }

    /// # Shapes
    /// `x`: `[..., d_model]` → same shape.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let Some(y) = cpu::rms_norm(&x, &self.weight.val(), self.eps, self.offset) {
            return y;
        }
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let mean_square = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = x * (mean_square + self.eps).sqrt().recip();
        let mut weight = self.weight.val().cast(DType::F32);
        if self.offset != 0.0 {
            weight = weight + self.offset;
        }
        (normed * weight.unsqueeze::<D>()).cast(dtype)
    }
}

/// `norm(x)` where a family has the norm, `x` where it has none (Qwen3's q/k norms,
/// Gemma 2's norms after attention and MLP).
pub fn optional<B: Backend, const D: usize>(
    norm: &Option<RmsNorm<B>>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match norm {
        Some(norm) => norm.forward(x),
        None => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::{TensorData, Tolerance};

    #[test]
    fn normalises_the_last_axis_and_scales() {
        let device = Default::default();
        let mut norm = RmsNorm::<TestBackend>::new(4, 1e-6, &device).unwrap();
        norm.weight = Param::from_tensor(Tensor::from_floats([1.0, 2.0, 1.0, 0.5], &device));
        let x = Tensor::<TestBackend, 2>::from_floats(
            [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]],
            &device,
        );
        let y = norm.forward(x);
        // Row 0: rms = sqrt(7.5); row 1: rms = 1.
        let r0 = 7.5f32.sqrt();
        let expected = TensorData::from([
            [1.0 / r0, 4.0 / r0, 3.0 / r0, 2.0 / r0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        y.into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
    }

    #[test]
    fn gemma_scales_by_one_plus_the_weight() {
        let device = Default::default();
        let mut norm = RmsNorm::<TestBackend>::new(2, 1e-6, &device)
            .unwrap()
            .with_offset(1.0);
        assert_eq!(
            norm.weight.val().into_data().to_vec::<f32>().unwrap(),
            [0.0; 2]
        );
        norm.weight = Param::from_tensor(Tensor::from_floats([1.0, -0.5], &device));
        let y = norm.forward(Tensor::<TestBackend, 1>::from_floats([3.0, 4.0], &device));
        let rms = 12.5f32.sqrt();
        y.into_data().assert_approx_eq::<f32>(
            &TensorData::from([2.0 * 3.0 / rms, 0.5 * 4.0 / rms]),
            Tolerance::absolute(1e-5),
        );
    }

    #[test]
    fn rejects_bad_settings() {
        let device = Default::default();
        assert!(RmsNorm::<TestBackend>::new(0, 1e-6, &device).is_err());
        assert!(RmsNorm::<TestBackend>::new(4, 0.0, &device).is_err());
        assert!(RmsNorm::<TestBackend>::new(4, f64::NAN, &device).is_err());
    }
}
