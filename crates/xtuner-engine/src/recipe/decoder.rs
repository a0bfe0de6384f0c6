//! The decoder alone: LoRA, QLoRA, full fine-tuning and incremental pre-training (the
//! data decides: pre-training records have no template and every token trained). Text
//! batches; a PEFT adapter or the full weights in each checkpoint.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use xtuner_dataset::collate::collate;
use xtuner_dataset::{ProcessedDataset, Tokenizer};
use xtuner_model::checkpoint::SaveDtype;
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::nn::linear::LinearLayers;

use super::{
    Saved, attach_part, base_model, init_seed, load_full_weights, prepare, rank_zero_first, start,
};
use crate::chat::evaluate_chat;
use crate::config::{LoadedConfig, TrainConfig};
use crate::export::hf::write_decoder;
use crate::run::{MicroStep, Recipe, RunContext, TrainSummary};
use crate::step::forward_backward;
use crate::{Result, run};

/// Runs (or resumes) a decoder config.
///
/// # Errors
/// As [`run::run`]; bad data or model.
pub fn train<B: AutodiffBackend>(
    ctx: RunContext<'_, B>,
    resume: Option<run::Resume>,
) -> Result<TrainSummary> {
    let (loaded, work_dir, device) = (ctx.loaded, ctx.work_dir, ctx.device);
    let collective = ctx.collective;
    let config = &loaded.config;
    let (dataset, tokenizer, base, decoder) = rank_zero_first(collective, |reuse| {
        let (dataset, tokenizer) = prepare(loaded, work_dir)?;
        let (base, decoder) = base_model::<B>(config, &tokenizer, work_dir, reuse, device)?;
        Ok((dataset, tokenizer, base, decoder))
    })?;
    let start = start::<B, _>(config, work_dir, resume, device, |checkpoint| {
        ready(config, base, &decoder, checkpoint, device)
    })?;
    let recipe = DecoderRecipe {
        config,
        dataset: &dataset,
        decoder: &decoder,
        tokenizer: &tokenizer,
        device,
    };
    run::run(&recipe, start, ctx)
}

/// The decoder of a run, ready to train or export: adapters attached (fresh, or read
/// from `checkpoint`) or, for a full fine-tune, the checkpoint's weights.
///
/// # Errors
/// As [`attach_part`].
pub fn ready<B: Backend>(
    config: &TrainConfig,
    base: Decoder<B>,
    decoder: &DecoderConfig,
    checkpoint: Option<&Path>,
    device: &B::Device,
) -> Result<Decoder<B>> {
    let saved = checkpoint.map(|dir| Saved {
        adapter: dir,
        full: dir,
    });
    attach_part(
        base,
        decoder,
        config.lora.as_ref(),
        false,
        saved,
        init_seed(config),
        device,
        |dir| load_full_weights(dir, decoder, device),
    )
}

/// Builds the model of a decoder checkpoint again: the base the config names with the
/// checkpoint's adapter, or the checkpoint's full weights; with its tokenizer.
///
/// # Errors
/// A checkpoint that does not fit the config.
pub fn restore<B: Backend>(
    loaded: &LoadedConfig,
    checkpoint: &Path,
    device: &B::Device,
) -> Result<(Decoder<B>, DecoderConfig, Tokenizer)> {
    let config = &loaded.config;
    let tokenizer = Tokenizer::from_path(super::tokenizer_path(loaded)?)?;
    let (base, decoder) = super::build_model::<B>(config, &tokenizer, device)?;
    let model = ready(config, base, &decoder, Some(checkpoint), device)?;
    Ok((model, decoder, tokenizer))
}

/// The decoder alone: text batches, PEFT adapter or full weights.
struct DecoderRecipe<'a, B: Backend> {
    config: &'a TrainConfig,
    dataset: &'a ProcessedDataset,
    decoder: &'a DecoderConfig,
    tokenizer: &'a Tokenizer,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Recipe<B> for DecoderRecipe<'_, B> {
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
        accumulative_counts: usize,
    ) -> Result<MicroStep> {
        let rows = self.dataset.rows_at(rows);
        let batch = collate(&rows, self.config.data.use_varlen_attn);
        let (loss, grads) = forward_backward(
            model,
            &batch,
            accumulative_counts,
            self.config.model.activation_checkpointing,
            self.device,
        );
        Ok(MicroStep {
            loss,
            trained_tokens: batch.trained_tokens(),
            tokens: batch.tokens(),
            grads,
            metrics: Vec::new(),
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
