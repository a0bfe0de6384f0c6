//! Preference training of the decoder: DPO (against a reference model) and ORPO,
//! with LoRA, QLoRA or in full, as XTuner's `configs/dpo/` and `configs/orpo/`.
//!
//! The data are pairs rendered with the tokenizer's own chat template
//! ([`xtuner_dataset::preference`]); each training row holds one pair (chosen, then
//! rejected) or, with `data.use_varlen_attn`, several pairs packed with their
//! boundaries. A micro-batch becomes XTuner's batch: padded rows chosen₀, rejected₀,
//! ... (`preference_collate_fn`), or the packed rows with varlen attention.
//!
//! DPO's reference under LoRA is the same model with its adapters switched off (no
//! second copy); in full fine-tuning it is the starting weights (or
//! `preference.ref_model`), kept frozen; either runs without a graph. Checkpoints,
//! resume, export and the evaluate-chat hook are the decoder recipe's.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use xtuner_dataset::collate::{Batch, collate};
use xtuner_dataset::{PackedRow, ProcessedDataset, Tokenizer};
use xtuner_model::checkpoint::SaveDtype;
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::nn::linear::LinearLayers;

use super::decoder::ready;
use super::{base_model, prepare, rank_zero_first, start};
use crate::chat::evaluate_chat;
use crate::config::{Objective, TrainConfig};
use crate::export::hf::write_decoder;
use crate::lora::without_adapters;
use crate::preference::{
    Segment, TokenLogps, dpo_loss, head_objective_backward, orpo_loss_of, row_segments,
};
use crate::recompute::{decoder_head_backward, positions_per_chunk};
use crate::run::{MicroStep, Recipe, RunContext, TrainSummary};
use crate::step::batch_tensors;
use crate::{Error, Result, run};

/// Runs (or resumes) a DPO or ORPO config.
///
/// # Errors
/// As [`run::run`]; bad data or model; a reward-model config (its own recipe).
pub fn train<B: AutodiffBackend>(
    ctx: RunContext<'_, B>,
    resume: Option<run::Resume>,
) -> Result<TrainSummary> {
    let (loaded, work_dir, device) = (ctx.loaded, ctx.work_dir, ctx.device);
    let config = &loaded.config;
    let preference = config
        .preference
        .as_ref()
        .ok_or_else(|| Error::setting("preference", "missing"))?;
    let objective = preference.objective()?;
    let (dataset, tokenizer, base, decoder) = rank_zero_first(ctx.collective, |reuse| {
        let (dataset, tokenizer) = prepare(loaded, work_dir)?;
        let (base, decoder) = base_model::<B>(config, &tokenizer, work_dir, reuse, device)?;
        Ok((dataset, tokenizer, base, decoder))
    })?;
    // Full DPO: a frozen reference, the starting weights unless another is named.
    let reference = match (objective, &config.lora) {
        (Objective::Dpo(_), None) => Some(match &preference.ref_model {
            Some(path) => Decoder::<B::InnerBackend>::load(path, None, device)?.0,
            None => base.valid(),
        }),
        _ => None,
    };
    let start = start::<B, _>(config, work_dir, resume, device, |checkpoint| {
        ready(config, base, &decoder, checkpoint, device)
    })?;
    let recipe = PreferenceRecipe {
        config,
        objective,
        dataset: &dataset,
        decoder: &decoder,
        tokenizer: &tokenizer,
        reference,
        device,
    };
    run::run(&recipe, start, ctx)
}

/// A micro-batch of pairs as XTuner batches them, with where each sequence lies.
pub fn pair_batch(rows: &[&PackedRow], varlen: bool) -> (Batch, Vec<Segment>) {
    if varlen {
        let segments = rows
            .iter()
            .enumerate()
            .flat_map(|(r, row)| row.cumulative_len.windows(2).map(move |w| (r, w[0], w[1])))
            .collect();
        (collate(rows, true), segments)
    } else {
        let sequences: Vec<PackedRow> = rows
            .iter()
            .flat_map(|row| {
                row.cumulative_len.windows(2).map(|w| PackedRow {
                    input_ids: row.input_ids[w[0]..w[1]].to_vec(),
                    labels: row.labels[w[0]..w[1]].to_vec(),
                    cumulative_len: vec![0, w[1] - w[0]],
                })
            })
            .collect();
        let refs: Vec<&PackedRow> = sequences.iter().collect();
        let batch = collate(&refs, false);
        let segments = row_segments(batch.batch_size, batch.seq_len);
        (batch, segments)
    }
}

/// DPO or ORPO on the decoder.
struct PreferenceRecipe<'a, B: AutodiffBackend> {
    config: &'a TrainConfig,
    objective: Objective,
    dataset: &'a ProcessedDataset,
    decoder: &'a DecoderConfig,
    tokenizer: &'a Tokenizer,
    /// Full DPO's frozen reference (LoRA's is the policy with adapters off).
    reference: Option<Decoder<B::InnerBackend>>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Recipe<B> for PreferenceRecipe<'_, B> {
    type Model = Decoder<B>;

    fn lengths(&self) -> Vec<i64> {
        self.dataset.lengths()
    }

    fn nf4_bytes(&self, model: &Decoder<B>) -> usize {
        model.nf4_bytes(self.decoder)
    }

    fn forward_backward(
        &self,
        model: &Decoder<B>,
        rows: &[usize],
        divisor: usize,
    ) -> Result<MicroStep> {
        let rows = self.dataset.rows_at(rows);
        let (batch, segments) = pair_batch(&rows, self.config.data.use_varlen_attn);
        let (ids, input) = batch_tensors::<B>(&batch, self.device);
        // DPO's reference first, without a graph: the frozen copy, or (LoRA) the policy
        // with its adapters off.
        let vocab = self.decoder.vocab_size;
        let chunk = positions_per_chunk(batch.batch_size, vocab);
        let labels = &batch.labels;
        // DPO's reference first, without a graph: the frozen copy, or (LoRA) the policy
        // with its adapters off.
        let reference = match self.objective {
            Objective::Dpo(dpo) => {
                let (ids, input) = batch_tensors::<B::InnerBackend>(&batch, self.device);
                let bare;
                let reference = match &self.reference {
                    Some(reference) => reference,
                    None => {
                        bare = without_adapters(model.valid(), self.decoder);
                        &bare
                    }
                };
                let hidden = reference.hidden_states(reference.embed(ids), &input, None);
                let logps =
                    TokenLogps::chunked(hidden, |h| reference.lm_head(h), labels, vocab, chunk);
                let average = dpo.loss_type.averages_logps();
                Some(logps.segment_logps(labels, &segments, average))
            }
            _ => None,
        };
        let embeds = model.embed(ids);
        let checkpointing = self.config.model.activation_checkpointing;
        let objective = self.objective;
        let values = model.valid();
        let (out, grads) =
            decoder_head_backward(model, model, embeds, &input, checkpointing, |hidden| {
                head_objective_backward(
                    model,
                    hidden,
                    |h| model.lm_head(h),
                    |h| values.lm_head(h),
                    labels,
                    vocab,
                    chunk,
                    |logps| {
                        let (out, metrics) = match (objective, reference) {
                            (Objective::Dpo(dpo), Some(reference)) => {
                                let average = dpo.loss_type.averages_logps();
                                let policy = logps.segment_logps(labels, &segments, average);
                                (
                                    dpo_loss(policy, Tensor::from_inner(reference), &dpo),
                                    Vec::new(),
                                )
                            }
                            (Objective::Orpo { beta }, _) => {
                                let (out, terms) = orpo_loss_of(logps, labels, &segments, beta);
                                let metrics = vec![
                                    ("nll_loss", terms.nll_loss),
                                    ("log_odds_ratio", terms.log_odds_ratio),
                                    ("log_odds_chosen", terms.log_odds_chosen),
                                ];
                                (out, metrics)
                            }
                            _ => unreachable!(
                                "train() refuses reward models and DPO has its reference"
                            ),
                        };
                        (out.loss.clone().div_scalar(divisor as f64), (out, metrics))
                    },
                )
            });
        let (out, mut metrics) = out;
        metrics.extend([
            ("chosen_rewards", out.chosen_rewards),
            ("rejected_rewards", out.rejected_rewards),
            ("reward_acc", out.reward_acc),
            ("reward_margin", out.reward_margin),
        ]);
        let loss = xtuner_model::nn::precision::scalar(out.loss);
        Ok(MicroStep {
            loss,
            // The loss is a mean over pairs: each pair weighs the same in the step's.
            trained_tokens: segments.len() / 2,
            tokens: batch.tokens(),
            grads,
            metrics,
        })
    }

    fn write_weights(
        &self,
        model: &Decoder<B::InnerBackend>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<()> {
        write_decoder(model, self.decoder, self.config, dir, dtype, self.tokenizer).map(|_| ())
    }

    fn evaluate(&self, model: &Decoder<B::InnerBackend>) -> Result<Vec<(String, String)>> {
        evaluate_chat(model, None, self.config, self.tokenizer, self.device)
    }
}
