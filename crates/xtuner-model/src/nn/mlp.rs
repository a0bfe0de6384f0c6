//! The gated feed-forward block of every decoder family: `w2(act(gate·x) ⊙ up·x)`,
//! SwiGLU with SiLU (InternLM2, Llama, Qwen, Phi-3) and GeGLU with tanh-GELU (Gemma).
//! Gate and up are one product `w13` whose columns are `[gate (I) | up (I)]`: Phi-3's
//! `gate_up_proj` as stored, the others' two projections side by side.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::nn::activation::HiddenAct;
use crate::nn::glu::gated;
use crate::nn::linear::Linear;

/// Gated MLP.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Gate and up projections side by side, `[C, 2I]`.
    pub w13: Linear<B>,
    /// Down projection `[I, C]`.
    pub w2: Linear<B>,
    /// The gate's activation.
    pub act: HiddenAct,
}

impl<B: Backend> FeedForward<B> {
    /// # Shapes
    /// `x`: `[B, T, C]` → `[B, T, C]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate_up = self.w13.forward(x); // [B, T, 2I]
        self.w2.forward(gated(gate_up, self.act))
    }
}
