//! Optimizer pieces that Burn does not provide as XTuner uses them: gradient clipping
//! by the global L2 norm over all trainable parameters (PyTorch's `clip_grad_norm_`;
//! Burn's clipping works per tensor), and AdamW with PyTorch's settings.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use crate::config::OptimizerConfig;

/// AdamW as `torch.optim.AdamW`: decoupled weight decay `θ ← θ(1 − lr·λ)`, bias-corrected
/// moments, `ε` added to `√v̂`.
pub fn adamw(config: &OptimizerConfig) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(config.betas[0] as f32)
        .with_beta_2(config.betas[1] as f32)
        .with_epsilon(config.eps as f32)
        .with_weight_decay(config.weight_decay as f32)
}

struct NormVisitor<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum_squares: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NormVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = grad.square().sum();
            self.sum_squares = Some(match self.sum_squares.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

struct ScaleVisitor<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register::<B::InnerBackend, D>(param.id, grad * self.factor);
        }
    }
}

/// The L2 norm of all gradients together.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = NormVisitor::<B> { grads, sum_squares: None };
    model.visit(&mut visitor);
    visitor.sum_squares.map_or(0.0, |s| f64::from(s.into_scalar().to_f32()).sqrt())
}

/// Scales all gradients so their global norm is at most `max_norm` (factor
/// `max_norm / (norm + 1e-6)`, as PyTorch). Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(model, grads);
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        model.visit(&mut ScaleVisitor { grads, factor });
    }
    norm
}

trait ToF32 {
    fn to_f32(self) -> f32;
}

impl<E: burn::tensor::ElementConversion> ToF32 for E {
    fn to_f32(self) -> f32 {
        self.elem()
    }
}
