//! The gated feed-forward block of InternLM2 and Llama (SwiGLU):
//! `w2(silu(w1·x) ⊙ w3·x)` (`gate_proj`, `down_proj`, `up_proj` in Llama's names).

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;

use crate::nn::linear::Linear;

/// SwiGLU MLP (`feed_forward.w1|w2|w3`).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Gate projection `[C, I]`.
    pub w1: Linear<B>,
    /// Down projection `[I, C]`.
    pub w2: Linear<B>,
    /// Up projection `[C, I]`.
    pub w3: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// # Shapes
    /// `x`: `[B, T, C]` → `[B, T, C]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.w1.forward(x.clone()));
        let up = self.w3.forward(x);
        self.w2.forward(gate * up)
    }
}
