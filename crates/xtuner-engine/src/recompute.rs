//! The decoder's part of a training step, with or without activation checkpointing
//! (XTuner turns it on by default: `gradient_checkpointing_enable`).
//!
//! Without it, the decoder runs once with its graph, and the chunked LM loss
//! ([`crate::loss::chunked_lm_loss_backward`]) backpropagates through all of it: every layer's
//! activations stay alive until the backward pass.
//!
//! With it, only each layer's input is kept:
//! 1. forward, layer by layer, with the parameters untracked, so no graph is built;
//! 2. the final norm, the LM head and the loss on the last layer's output, which gives
//!    the gradient at that output;
//! 3. for each layer, last to first: run it again from its saved input, this time with
//!    its graph, and backpropagate the gradient that arrived at its output; that gives
//!    the layer's parameter gradients and the gradient at its input;
//! 4. the gradient at the first layer's input flows into whatever made the embeddings
//!    (the embedding table, LLaVA's projector).
//!
//! Peak memory is then the saved inputs (`layers × [B, T, C]`) plus one layer's graph,
//! for one extra forward pass. Dropout draws the same masks in both passes of a layer:
//! each layer's generator is reseeded from one draw per step.

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, Tensor};
use xtuner_model::decoder::{Decoder, DecoderInput};
use xtuner_model::nn::precision::scalar;

use crate::loss::{backward_from, head_loss_backward};

/// Logits computed at once by the training step's loss (128 MiB in f32).
pub const LOGITS_PER_CHUNK: usize = 1 << 25;

/// Positions of `rows` rows whose `[rows, n, vocab]` logits fit [`LOGITS_PER_CHUNK`]
/// (at least one).
pub fn positions_per_chunk(rows: usize, vocab: usize) -> usize {
    (LOGITS_PER_CHUNK / (rows * vocab).max(1)).max(1)
}

/// Forward and backward of the decoder `llm` (a part of `model`, whose parameters the
/// gradients are collected for) from input embeddings, with the token-mean loss
/// divided by `divisor`. Returns the summed loss, the trained tokens and the gradients.
///
/// # Shapes
/// `embeds`: `[B, T, C]`, with its graph (so the embedding table or a projector gets
/// its gradient); `labels`: `[B, T]`.
pub fn decoder_loss_backward<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    llm: &Decoder<B>,
    embeds: Tensor<B, 3>,
    input: &DecoderInput<B>,
    labels: &[i64],
    divisor: f64,
    recompute: bool,
) -> (f64, usize, GradientsParams) {
    let [b, _, _] = embeds.dims();
    let vocab = llm.vocab_size();
    let chunk = positions_per_chunk(b, vocab);
    let ((loss_sum, tokens), grads) =
        decoder_head_backward(model, llm, embeds, input, recompute, |hidden| {
            let (sum, tokens, accumulator, grad) = head_loss_backward(
                model,
                hidden,
                |h| llm.lm_head(h),
                labels,
                vocab,
                chunk,
                divisor,
            );
            ((sum, tokens), accumulator, grad)
        });
    (loss_sum, tokens, grads)
}

/// What a top that backpropagates itself returns: its output, the gradients it
/// collected, and the gradient at the hidden states it was given (`None`: nothing
/// below them is trained by it).
pub type TopBackward<B, M, T> = (
    T,
    GradientsAccumulator<M>,
    Option<Tensor<<B as AutodiffBackend>::InnerBackend, 3>>,
);

/// Forward and backward of the decoder `llm` (a part of `model`) from input
/// embeddings, with a `top` that runs its own backward passes on the final normed
/// hidden states (the LM head and a loss a chunk of positions at a time, so the whole
/// `[B, T, V]` logits never exist at once) and hands back the gradient at them, which
/// is carried down through the decoder: with `recompute`, each layer run again in
/// backward ([the module docs](self)). Returns `top`'s output and the gradients.
///
/// # Shapes
/// `embeds`: `[B, T, C]`; `top` gets `[B, T, C]`.
pub fn decoder_head_backward<B: AutodiffBackend, M: AutodiffModule<B>, T>(
    model: &M,
    llm: &Decoder<B>,
    embeds: Tensor<B, 3>,
    input: &DecoderInput<B>,
    recompute: bool,
    top: impl FnOnce(&Tensor<B, 3>) -> TopBackward<B, M, T>,
) -> (T, GradientsParams) {
    if !recompute {
        let hidden = llm.hidden_states(embeds, input, None);
        let (out, mut accumulator, grad) = top(&hidden);
        if let Some(grad) = grad {
            accumulator.accumulate(model, backward_from(model, hidden, grad, None).0);
        }
        return (out, accumulator.grads());
    }
    let replay = Replay::forward(llm, embeds, input);
    // The final norm, the head and the loss on the last output.
    let last = replay.top.clone().require_grad();
    let hidden = llm.norm.forward(last.clone());
    let (out, mut accumulator, hidden_grad) = top(&hidden);
    let Some(hidden_grad) = hidden_grad else {
        return (out, accumulator.grads());
    };
    let (grads, grad) = backward_from(model, hidden, hidden_grad, Some(&last));
    accumulator.accumulate(model, grads);
    replay.backward(model, llm, input, grad, &mut accumulator);
    (out, accumulator.grads())
}

/// Forward and backward of the decoder `llm` (a part of `model`) from input
/// embeddings, with the loss `top` computes from the final normed hidden states (its
/// value is backpropagated as it is: divide it for accumulation first). With
/// `recompute`, each layer is run again in backward ([the module docs](self)); the
/// loss's own graph (the head, the objective) is kept whole either way. Returns `top`'s
/// other output and the gradients.
///
/// # Shapes
/// `embeds`: `[B, T, C]`; `top` gets `[B, T, C]` and returns a `[1]` loss.
pub fn decoder_backward<B: AutodiffBackend, M: AutodiffModule<B>, T>(
    model: &M,
    llm: &Decoder<B>,
    embeds: Tensor<B, 3>,
    input: &DecoderInput<B>,
    recompute: bool,
    top: impl FnOnce(Tensor<B, 3>) -> (Tensor<B, 1>, T),
) -> (T, GradientsParams) {
    if !recompute {
        let (loss, out) = top(llm.hidden_states(embeds, input, None));
        return (out, GradientsParams::from_grads(loss.backward(), model));
    }
    let replay = Replay::forward(llm, embeds, input);
    let cut = replay.top.clone().require_grad();
    let (loss, out) = top(llm.norm.forward(cut.clone()));
    let mut grads = loss.backward();
    let grad = cut.grad_remove(&mut grads);
    let mut accumulator = GradientsAccumulator::<M>::new();
    accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    replay.backward(model, llm, input, grad, &mut accumulator);
    (out, accumulator.grads())
}

/// The checkpointed forward pass of the decoder's layers: each layer's input kept, the
/// last output cut from any graph, and what the layers need to run again.
struct Replay<B: AutodiffBackend> {
    /// The embeddings as the first layer takes them, in their graph.
    embeds: Tensor<B, 3>,
    /// Each layer's input.
    saved: Vec<Tensor<B::InnerBackend, 3>>,
    /// The last layer's output, without a graph.
    top: Tensor<B, 3>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    step_seed: f64,
}

impl<B: AutodiffBackend> Replay<B> {
    /// Step 1: forward without a graph, keeping each layer's input.
    fn forward(llm: &Decoder<B>, embeds: Tensor<B, 3>, input: &DecoderInput<B>) -> Self {
        let device = embeds.device();
        // Drawn in f32: a bf16 draw would take one of only a few hundred values.
        let step_seed = scalar(Tensor::<B::InnerBackend, 1>::random(
            [1],
            Distribution::Uniform(0.0, 1.0),
            (&device, DType::F32),
        ));
        let (cos, sin) = llm.rope.cos_sin(input.positions.clone());
        // The embeddings as the first layer takes them (Gemma scales them), in the graph.
        let embeds = llm.scale_embeds(embeds);
        let mut replay = Self {
            saved: Vec::with_capacity(llm.layers.len()),
            top: embeds.clone().detach(),
            embeds,
            cos,
            sin,
            step_seed,
        };
        for (i, layer) in llm.layers.iter().enumerate() {
            replay.saved.push(replay.top.clone().inner());
            B::seed(&device, replay.layer_seed(i));
            replay.top = layer.clone().no_grad().forward(
                replay.top.clone(),
                &replay.cos,
                &replay.sin,
                &input.mask,
                None,
            );
        }
        replay.top = replay.top.detach();
        replay
    }

    /// Each layer's dropout seed, the same in both passes.
    fn layer_seed(&self, i: usize) -> u64 {
        ((self.step_seed * f64::from(u32::MAX)) as u64).wrapping_add(i as u64)
    }

    /// Steps 3 and 4: each layer again, with its graph, last to first, from the gradient
    /// at the last output; then into the embeddings.
    fn backward<M: AutodiffModule<B>>(
        self,
        model: &M,
        llm: &Decoder<B>,
        input: &DecoderInput<B>,
        mut grad: Option<Tensor<B::InnerBackend, 3>>,
        accumulator: &mut GradientsAccumulator<M>,
    ) {
        let device = self.embeds.device();
        for (i, layer) in llm.layers.iter().enumerate().rev() {
            let Some(g) = grad.take() else { break };
            let x = Tensor::<B, 3>::from_inner(self.saved[i].clone()).require_grad();
            B::seed(&device, self.layer_seed(i));
            let y = layer.forward(x.clone(), &self.cos, &self.sin, &input.mask, None);
            let (grads, input_grad) = backward_from(model, y, g, Some(&x));
            accumulator.accumulate(model, grads);
            grad = input_grad;
        }
        if let Some(g) = grad {
            accumulator.accumulate(model, backward_from(model, self.embeds, g, None).0);
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, TensorData, Tolerance};
    use xtuner_model::decoder::DecoderConfig;
    use xtuner_model::nn::linear::LinearLayers;

    use super::*;

    type AD = Autodiff<NdArray<f32>>;

    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor<AD> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<AD, D>>) {
            if let Some(g) = self.0.get::<NdArray<f32>, D>(param.id) {
                self.1.push(g.into_data().to_vec::<f32>().unwrap());
            }
        }
    }

    fn gradients(model: &Decoder<AD>, grads: &GradientsParams) -> Vec<Vec<f32>> {
        let mut collect = Collect(grads, Vec::new());
        model.visit(&mut collect);
        collect.1
    }

    /// Recomputing each layer in backward gives the loss and every gradient of the
    /// plain backward pass, padding and all, for a fully trained model and for LoRA.
    #[test]
    fn recomputed_layers_give_the_same_loss_and_gradients() {
        let device = Default::default();
        let mut config = DecoderConfig::preset("internlm2-tiny", 40).unwrap();
        (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
            config.rope.head_dim,
            config.n_layers,
        ) = (32, 48, 8, 8, 3);
        <AD as Backend>::seed(&device, 5);
        let full = Decoder::<AD>::random(&config, &device).unwrap();
        let lora = crate::lora::attach(
            full.clone(),
            &config,
            &crate::config::LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: vec![],
            },
            5,
            &device,
        )
        .unwrap();
        // LoRA's B starts at zero; give it values so every adapter gets a gradient.
        let lora = lora.map_linear_layers(&config, |_, mut linear| -> Result<_, ()> {
            for p in linear.lora.iter_mut().flat_map(|l| l.parts.iter_mut()) {
                p.lora_b = Param::from_tensor(Tensor::random(
                    p.lora_b.dims(),
                    Distribution::Normal(0.0, 0.1),
                    &device,
                ));
            }
            Ok(linear)
        });
        let lora = lora.unwrap();
        let (b, t) = (2, 7);
        let ids: Vec<i64> = (0..b * t).map(|i| (i * 11 % 40) as i64).collect();
        let mut labels = ids.clone();
        labels[2] = -100;
        let valid: Vec<bool> = (0..b * t).map(|i| i < 12).collect(); // row 1 ends in padding
        labels[12..].fill(-100);
        let positions: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
        let input = DecoderInput {
            positions: Tensor::from_data(TensorData::new(positions, [b, t]), &device),
            mask: xtuner_model::nn::attention::AttentionMask::new(b, t, &valid, None, &device),
        };
        let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        for model in [&full, &lora] {
            let (plain_loss, plain_tokens, plain) = decoder_loss_backward(
                model,
                model,
                model.embed(ids.clone()),
                &input,
                &labels,
                2.0,
                false,
            );
            let (loss, tokens, recomputed) = decoder_loss_backward(
                model,
                model,
                model.embed(ids.clone()),
                &input,
                &labels,
                2.0,
                true,
            );
            assert_eq!(tokens, plain_tokens);
            assert!(
                (loss - plain_loss).abs() < 1e-9 * plain_loss.abs().max(1.0),
                "{loss} vs {plain_loss}"
            );
            let (plain, recomputed) = (gradients(model, &plain), gradients(model, &recomputed));
            assert!(!plain.is_empty());
            assert_eq!(
                plain.len(),
                recomputed.len(),
                "every trained parameter has a gradient"
            );
            for (p, r) in plain.iter().zip(&recomputed) {
                TensorData::from(r.as_slice()).assert_approx_eq::<f32>(
                    &TensorData::from(p.as_slice()),
                    Tolerance::absolute(1e-6),
                );
            }
        }
    }
}
