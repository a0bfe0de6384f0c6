//! The causal language-modelling loss: cross-entropy of the logits at position t
//! against the label at t + 1, averaged over the labels that are trained (≠ -100),
//! as Hugging Face's models compute it. Computed in f32.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

/// Label of positions that are not trained.
pub const IGNORE_INDEX: i64 = -100;

/// The summed loss and the number of trained labels (so micro-batches can be
/// combined into one token mean).
#[derive(Debug, Clone)]
pub struct LossSum<B: Backend> {
    /// Σ −log p(label) over trained positions, `[1]`.
    pub sum: Tensor<B, 1>,
    /// Number of trained positions.
    pub tokens: usize,
}

impl<B: Backend> LossSum<B> {
    /// The mean over trained tokens (0 when there are none).
    pub fn mean(&self) -> Tensor<B, 1> {
        self.sum.clone() / (self.tokens.max(1) as f64)
    }
}

/// Shifted, masked cross-entropy.
///
/// # Shapes
/// `logits`: `[B, T, V]`; `labels`: `[B, T]` (host values, -100 = not trained).
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: &[i64]) -> LossSum<B> {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    if t < 2 {
        return LossSum { sum: Tensor::zeros([1], &device), tokens: 0 };
    }
    // Logits at 0..T-1 predict labels at 1..T.
    let logits = logits.slice([0..b, 0..t - 1, 0..v]).cast(DType::F32);
    let mut targets = Vec::with_capacity(b * (t - 1));
    let mut weights = Vec::with_capacity(b * (t - 1));
    for row in 0..b {
        for pos in 1..t {
            let label = labels.get(row * t + pos).copied().unwrap_or(IGNORE_INDEX);
            let trained = label >= 0 && (label as usize) < v;
            targets.push(if trained { label } else { 0 });
            weights.push(if trained { 1.0f32 } else { 0.0 });
        }
    }
    let tokens = weights.iter().filter(|&&w| w > 0.0).count();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, t - 1, 1]), &device);
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [b, t - 1]), &device);
    let log_probs = log_softmax(logits, 2).gather(2, targets).reshape([b, t - 1]);
    let sum = (log_probs * weights).sum().neg().reshape([1]);
    LossSum { sum, tokens }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn shifts_and_masks() {
        let device = Default::default();
        // Uniform logits over 4 classes: every trained token costs ln 4.
        let logits = Tensor::<B, 3>::zeros([1, 3, 4], &device);
        let loss = causal_lm_loss(logits, &[5, -100, 3]);
        assert_eq!(loss.tokens, 1);
        let mean = loss.mean().into_scalar();
        assert!((mean - 4f32.ln()).abs() < 1e-6, "{mean}");
        // Nothing trained: zero, not NaN.
        let loss = causal_lm_loss(Tensor::<B, 3>::zeros([1, 3, 4], &device), &[-100; 3]);
        assert_eq!((loss.tokens, loss.mean().into_scalar()), (0, 0.0));
    }
}
