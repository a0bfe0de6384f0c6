//! Preference objectives as training computes them (the LM head a chunk of positions
//! at a time, `preference::head_objective_backward`), against XTuner's losses and
//! gradient norms in `preference/golden.safetensors`.
//!
//! A test binary of its own: run beside the golden tests of `preference.rs` in one
//! process, its many small LM-head passes made those give wrong values in about a third
//! of the runs (found on 2026-12-04, not yet explained: the same happens with plain
//! `lm_head` forward and backward passes on `[2, 1, C]` inputs, or the SFT loss's
//! chunked path at one position a chunk, and never with one test thread).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use burn::backend::NdArray;
use burn::module::AutodiffModule;
use burn::tensor::{Tensor, Tolerance};
use xtuner_engine::lora::without_adapters;
use xtuner_engine::optim::clip_grad_norm;
use xtuner_engine::preference::{Dpo, DpoLossType, dpo_loss, row_segments};
use xtuner_model::decoder::DecoderInput;

mod common;
mod pairs;

use pairs::{B, assert_rel, batch, golden, one, policy, reference_logps};

/// The objectives computed as training computes them: the LM head a chunk of positions
/// at a time (`head_objective_backward`), with and without layers recomputed in
/// backward, give XTuner's losses and gradient norms for any chunk size.
#[test]
fn chunked_objectives_give_the_whole_logits_gradients() {
    use xtuner_engine::preference::{TokenLogps, head_objective_backward, orpo_loss_of};
    use xtuner_engine::recompute::decoder_head_backward;
    let golden = golden();
    let (ids, labels, [b, t]) = batch(&golden, "");
    let (model, config) = policy();
    let input = DecoderInput::causal(b, t, &Default::default());
    let segments = row_segments(b, t);
    let vocab = config.vocab_size;
    let values = model.valid();
    let sigmoid = Dpo {
        loss_type: DpoLossType::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let reference = reference_logps(&model, &config, &ids, &labels, false);
    // The reference's values through the chunked head equal the whole logits'.
    let bare = without_adapters(model.valid(), &config);
    let hidden = bare.hidden_states(bare.embed(ids.clone().inner()), &input_inner(b, t), None);
    let chunked = TokenLogps::chunked(hidden, |h| bare.lm_head(h), &labels, vocab, 3)
        .segment_logps(&labels, &segments, false);
    chunked.into_data().assert_approx_eq::<f32>(
        &reference.clone().inner().into_data(),
        Tolerance::absolute(1e-4),
    );
    // The loss and the gradient norm of `objective` trained as the recipe trains it.
    let train =
        |chunk: usize, recompute: bool, objective: &dyn Fn(&TokenLogps<B>) -> Tensor<B, 1>| {
            let embeds = model.embed(ids.clone());
            let (loss, mut grads) =
                decoder_head_backward(&model, &model, embeds, &input, recompute, |hidden| {
                    head_objective_backward(
                        &model,
                        hidden,
                        |h| model.lm_head(h),
                        |h| values.lm_head(h),
                        &labels,
                        vocab,
                        chunk,
                        |logps| {
                            let loss = objective(logps);
                            (loss.clone(), f64::from(loss.into_scalar()))
                        },
                    )
                });
            (loss, clip_grad_norm(&model, &mut grads, f64::INFINITY))
        };
    let dpo = |logps: &TokenLogps<B>| {
        let policy = logps.segment_logps(&labels, &segments, false);
        dpo_loss(policy, reference.clone(), &sigmoid).loss
    };
    let orpo = |logps: &TokenLogps<B>| orpo_loss_of(logps, &labels, &segments, 0.1).0.loss;
    for chunk in [1, 5, 1000] {
        for recompute in [false, true] {
            let what = format!("chunk {chunk}, recompute {recompute}");
            let (loss, norm) = train(chunk, recompute, &dpo);
            assert_rel(loss, one(&golden, "dpo_sigmoid_loss"), &what);
            assert_rel(norm, one(&golden, "dpo_sigmoid_grad_norm"), &what);
            let (loss, norm) = train(chunk, recompute, &orpo);
            assert_rel(loss, one(&golden, "orpo_loss"), &what);
            assert_rel(norm, one(&golden, "orpo_grad_norm"), &what);
        }
    }
}

fn input_inner(b: usize, t: usize) -> DecoderInput<NdArray<f32>> {
    DecoderInput::causal(b, t, &Default::default())
}
