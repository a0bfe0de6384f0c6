//! The causal language-modelling loss: cross-entropy of the logits at position t
//! against the label at t + 1, averaged over the labels that are trained (≠ -100),
//! as Hugging Face's models compute it. Computed in f32.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use xtuner_model::nn::cross_entropy::cross_entropy_sum;
use xtuner_model::nn::precision::scalar;
pub use xtuner_template::tokens::IGNORE_INDEX;

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
    if t < 2 {
        return LossSum {
            sum: Tensor::zeros([1], (&logits.device(), DType::F32)),
            tokens: 0,
        };
    }
    // Logits at 0..T-1 predict labels at 1..T.
    shifted_loss(logits.slice([0..b, 0..t - 1, 0..v]), labels, t, 0)
}

/// Trained labels of a batch (what the token mean divides by): labels after the first
/// position of each row that are ids of the vocabulary.
pub fn trained_tokens(labels: &[i64], seq_len: usize, vocab: usize) -> usize {
    let trained = |l: &&i64| **l >= 0 && (**l as usize) < vocab;
    labels
        .chunks(seq_len.max(1))
        .map(|row| row.iter().skip(1).filter(trained).count())
        .sum()
}

/// The loss of the logits at positions `from..from + n` of rows of `seq_len`
/// tokens, each against the label one position later.
///
/// # Shapes
/// `logits`: `[B, n, V]`; `labels`: `[B, seq_len]`.
fn shifted_loss<B: Backend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
    seq_len: usize,
    from: usize,
) -> LossSum<B> {
    let [b, n, v] = logits.dims();
    let logits = logits.cast(DType::F32);
    let (targets, weights) = shifted_targets(labels, b, seq_len, from, n, v);
    let tokens = weights.iter().filter(|&&w| w > 0.0).count();
    let sum = cross_entropy_sum(logits, &targets, &weights);
    LossSum { sum, tokens }
}

/// The targets of the logits at positions `from..from + n` of `rows` rows of `seq_len`
/// (each the label one position later; 0 where it is no id of the vocabulary) and their
/// weights (1 for an id of the vocabulary, else 0).
pub(crate) fn shifted_targets(
    labels: &[i64],
    rows: usize,
    seq_len: usize,
    from: usize,
    n: usize,
    vocab: usize,
) -> (Vec<i64>, Vec<f32>) {
    let mut targets = Vec::with_capacity(rows * n);
    let mut weights = Vec::with_capacity(rows * n);
    for row in 0..rows {
        for pos in from + 1..from + 1 + n {
            let label = labels
                .get(row * seq_len + pos)
                .copied()
                .unwrap_or(IGNORE_INDEX);
            let trained = label >= 0 && (label as usize) < vocab;
            targets.push(if trained { label } else { 0 });
            weights.push(f32::from(u8::from(trained)));
        }
    }
    (targets, weights)
}

/// The chunks of `chunk` positions (the last shorter) that cover the `seq_len - 1`
/// positions whose logits predict a label.
pub(crate) fn position_chunks(
    seq_len: usize,
    chunk: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let positions = seq_len.saturating_sub(1);
    let chunk = chunk.max(1);
    (0..positions)
        .step_by(chunk)
        .map(move |from| from..(from + chunk).min(positions))
}

/// Forward and backward of the causal LM loss with the LM head applied `chunk`
/// positions at a time, so only one chunk's `[B, chunk, V]` logits (and their f32
/// softmax) exist at once; InternLM2's vocabulary is 92,544, so the whole logits of a
/// 2,048-token row would take 0.76 GB in f32, twice over with their gradient.
///
/// The decoder runs once; its output is cut from the graph, each chunk's loss is
/// backpropagated into the head and into that cut point, and one last backward pass
/// carries the collected gradient of the hidden states through the decoder. The loss
/// and the gradients are those of `token mean / divisor`. Returns the summed loss, the
/// trained tokens and the gradients.
///
/// # Shapes
/// `hidden`: `[B, T, C]`, the decoder's normed output; `labels`: `[B, T]`; `lm_head`
/// maps `[B, n, C]` to `[B, n, vocab]`.
#[allow(clippy::too_many_arguments)]
pub fn chunked_lm_loss_backward<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    hidden: Tensor<B, 3>,
    lm_head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    labels: &[i64],
    vocab: usize,
    chunk: usize,
    divisor: f64,
) -> (f64, usize, GradientsParams) {
    let (loss_sum, tokens, mut accumulator, hidden_grad) =
        head_loss_backward(model, &hidden, lm_head, labels, vocab, chunk, divisor);
    if let Some(g) = hidden_grad {
        accumulator.accumulate(model, backward_from(model, hidden, g, None).0);
    }
    (loss_sum, tokens, accumulator.grads())
}

/// The LM head and the loss on `hidden`'s values, a chunk of positions at a time, cut
/// from `hidden`'s graph: the summed loss, the trained tokens, the gradients of the
/// head's parameters, and the gradient of the loss with respect to `hidden`.
#[allow(clippy::type_complexity)]
pub(crate) fn head_loss_backward<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    hidden: &Tensor<B, 3>,
    lm_head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    labels: &[i64],
    vocab: usize,
    chunk: usize,
    divisor: f64,
) -> (
    f64,
    usize,
    GradientsAccumulator<M>,
    Option<Tensor<B::InnerBackend, 3>>,
) {
    let [b, t, c] = hidden.dims();
    let tokens = trained_tokens(labels, t, vocab);
    let scale = 1.0 / (tokens.max(1) as f64 * divisor);
    let cut = hidden.clone().detach().require_grad();
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut hidden_grad: Option<Tensor<B::InnerBackend, 3>> = None;
    let mut loss_sum = 0.0;
    for range in position_chunks(t, chunk) {
        let from = range.start;
        let logits = lm_head(cut.clone().slice([0..b, range, 0..c]));
        let loss = shifted_loss(logits, labels, t, from);
        loss_sum += scalar(loss.sum.clone());
        let mut grads = (loss.sum * scale).backward();
        if let Some(g) = cut.grad_remove(&mut grads) {
            hidden_grad = Some(match hidden_grad.take() {
                Some(acc) => acc + g,
                None => g,
            });
        }
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    (loss_sum, tokens, accumulator, hidden_grad)
}

/// Backpropagates a gradient that arrived at `output` from outside its graph: the
/// backward pass of `Σ output ∘ grad` (whose gradient with respect to `output` is
/// `grad`). Returns the parameters' gradients and, for a `leaf` of the graph (a
/// detached tensor that requires grad), its gradient.
pub(crate) fn backward_from<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    output: Tensor<B, 3>,
    grad: Tensor<B::InnerBackend, 3>,
    leaf: Option<&Tensor<B, 3>>,
) -> (GradientsParams, Option<Tensor<B::InnerBackend, 3>>) {
    let mut grads = (output * Tensor::from_inner(grad)).sum().backward();
    let leaf_grad = leaf.and_then(|leaf| leaf.grad_remove(&mut grads));
    (GradientsParams::from_grads(grads, model), leaf_grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Int, TensorData};

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

    /// The chunked loss is the whole-logits loss: same value, same gradients, for any
    /// chunk size, with the head trained (full fine-tune, tied or not) or adapted.
    #[test]
    fn chunked_loss_and_gradients_equal_the_whole_logits_ones() {
        use burn::backend::Autodiff;
        use burn::module::{Module, ModuleVisitor, Param};
        use xtuner_model::decoder::{Decoder, DecoderConfig, DecoderInput};

        type AD = Autodiff<B>;
        struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
        impl ModuleVisitor<AD> for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
                if let Some(g) = self.0.get::<B, D>(param.id) {
                    self.1.push(g.into_data().to_vec::<f32>().unwrap());
                }
            }
        }
        let device = Default::default();
        let mut config = DecoderConfig::preset("internlm2-tiny", 50).unwrap();
        config.hidden_size = 32;
        config.intermediate_size = 48;
        config.head_dim = 8;
        config.rope.head_dim = 8;
        config.n_layers = 2;
        for tie in [false, true] {
            config.tie_word_embeddings = tie;
            <AD as burn::tensor::backend::Backend>::seed(&device, 3);
            let model = Decoder::<AD>::random(&config, &device).unwrap();
            let (b, t) = (2, 9);
            let ids: Vec<i64> = (0..b * t).map(|i| (i * 7 % 50) as i64).collect();
            let mut labels = ids.clone();
            labels[3] = IGNORE_INDEX;
            labels[12] = IGNORE_INDEX;
            let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
            let input = DecoderInput::causal(b, t, &device);
            let whole = causal_lm_loss(model.forward(ids.clone(), &input, None), &labels);
            let expected_loss = f64::from(whole.mean().into_scalar());
            let grads = GradientsParams::from_grads((whole.mean() / 2.0).backward(), &model);
            let mut expected = Collect(&grads, Vec::new());
            model.visit(&mut expected);
            for chunk in [1, 3, 8, 64] {
                let hidden = model.hidden_states(model.embed(ids.clone()), &input, None);
                let (sum, tokens, grads) = chunked_lm_loss_backward(
                    &model,
                    hidden,
                    |h| model.lm_head(h),
                    &labels,
                    50,
                    chunk,
                    2.0,
                );
                assert_eq!(tokens, whole.tokens);
                assert!(
                    (sum / tokens as f64 - expected_loss).abs() < 1e-5,
                    "chunk {chunk}"
                );
                let mut got = Collect(&grads, Vec::new());
                model.visit(&mut got);
                assert_eq!(
                    got.1.len(),
                    expected.1.len(),
                    "chunk {chunk}: every parameter has a gradient"
                );
                for (g, e) in got.1.iter().zip(&expected.1) {
                    TensorData::from(g.as_slice()).assert_approx_eq::<f32>(
                        &TensorData::from(e.as_slice()),
                        burn::tensor::Tolerance::absolute(1e-6),
                    );
                }
            }
        }
    }
}
