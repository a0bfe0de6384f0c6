//! One training step's arithmetic: a collated batch turned into the model's inputs,
//! forward and backward of the token-mean loss (the decoder alone, or LLaVA with its
//! images spliced in), and the optimizer step.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use xtuner_dataset::collate::Batch;
use xtuner_model::decoder::{Decoder, DecoderInput};
use xtuner_model::llava::Llava;
use xtuner_model::nn::attention::AttentionMask;
use xtuner_model::nn::precision::host_vec;

use crate::Result;
use crate::optim::clip_grad_norm;
use crate::recompute::decoder_loss_backward;

/// Token ids and decoder inputs (positions, attention mask) of a collated batch.
pub fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, DecoderInput<B>) {
    let shape = [batch.batch_size, batch.seq_len];
    let ids = Tensor::from_data(TensorData::new(batch.input_ids.clone(), shape), device);
    let positions = Tensor::from_data(TensorData::new(batch.position_ids.clone(), shape), device);
    // Packed rows with varlen attention keep their samples apart.
    let segments: Option<Vec<i64>> = batch.cumulative_len.as_ref().map(|rows| {
        rows.iter()
            .flat_map(|cu| {
                let mut seg = vec![-1i64; batch.seq_len];
                for (s, w) in cu.windows(2).enumerate() {
                    for slot in seg.iter_mut().take(w[1]).skip(w[0]) {
                        *slot = s as i64;
                    }
                }
                seg
            })
            .collect()
    });
    let mask = AttentionMask::new(
        batch.batch_size,
        batch.seq_len,
        &batch.attention_mask,
        segments.as_deref(),
        device,
    );
    (ids, DecoderInput { positions, mask })
}

/// One micro-batch: forward, the token-mean loss, and the backward pass of the loss
/// divided by `accumulative_counts`, recomputing each layer in backward when
/// `checkpointing` (see [`decoder_loss_backward`]). Returns the loss and the gradients.
pub fn forward_backward<B: AutodiffBackend>(
    model: &Decoder<B>,
    batch: &Batch,
    accumulative_counts: usize,
    checkpointing: bool,
    device: &B::Device,
) -> (f64, GradientsParams) {
    let (ids, input) = batch_tensors::<B>(batch, device);
    let (sum, tokens, grads) = decoder_loss_backward(
        model,
        model,
        model.embed(ids),
        &input,
        &batch.labels,
        accumulative_counts as f64,
        checkpointing,
    );
    (sum / tokens.max(1) as f64, grads)
}

/// What a LLaVA micro-batch gave: the token-mean loss, the trained and the real
/// tokens, and the gradients.
pub struct LlavaStep {
    /// Token-mean loss.
    pub loss: f64,
    /// Trained labels.
    pub trained_tokens: usize,
    /// Real (unpadded) tokens.
    pub tokens: usize,
    /// Gradients of the loss divided by the divisor.
    pub grads: GradientsParams,
}

/// One LLaVA micro-batch: image features spliced into the embeddings, the decoder
/// (recomputing each layer in backward when `checkpointing`) and the chunked LM loss's
/// backward (divided by `divisor`).
///
/// # Shapes
/// `batch`: `[B, T]` rows with -200 where the image goes; `pixel_values`: `[B, 3, H, W]`.
///
/// # Errors
/// A batch whose images do not match its `<image>` tokens.
pub fn llava_loss_backward<B: AutodiffBackend>(
    model: &Llava<B>,
    batch: &Batch,
    pixel_values: Tensor<B, 4>,
    select_layer: i64,
    divisor: f64,
    checkpointing: bool,
    device: &B::Device,
) -> Result<LlavaStep> {
    let shape = [batch.batch_size, batch.seq_len];
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input_ids.clone(), shape), device);
    let mask = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(batch.attention_mask.clone(), shape),
        device,
    );
    let labels =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.labels.clone(), shape), device);
    let inputs = model.prepare_inputs(ids, Some(mask), Some(labels), pixel_values, select_layer)?;
    let [b, t, _] = inputs.inputs_embeds.dims();
    // The splice always returns labels when it is given them.
    let labels: Vec<i64> = match inputs.labels {
        Some(labels) => host_vec(labels.into_data())?,
        None => Vec::new(),
    };
    let key_valid: Vec<bool> = host_vec::<i64>(inputs.attention_mask.int().into_data())?
        .into_iter()
        .map(|v| v != 0)
        .collect();
    let tokens = key_valid.iter().filter(|&&v| v).count();
    let input = DecoderInput {
        positions: inputs.position_ids,
        mask: AttentionMask::new(b, t, &key_valid, None, device),
    };
    let (sum, trained, grads) = decoder_loss_backward(
        model,
        &model.llm,
        inputs.inputs_embeds,
        &input,
        &labels,
        divisor,
        checkpointing,
    );
    Ok(LlavaStep {
        loss: sum / trained.max(1) as f64,
        trained_tokens: trained,
        tokens,
        grads,
    })
}

/// The optimizer step: global-norm clipping, then AdamW at `lr`. Returns the updated
/// model and the gradient norm before clipping.
pub fn optimizer_step<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>>(
    model: M,
    optimizer: &mut O,
    mut grads: GradientsParams,
    lr: f64,
    max_norm: f64,
) -> (M, f64) {
    let grad_norm = clip_grad_norm(&model, &mut grads, max_norm);
    (optimizer.step(lr, model, grads), grad_norm)
}
