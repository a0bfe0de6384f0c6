//! Reward models (`[preference] method = "reward"`), as XTuner's
//! `configs/reward_model/`: the decoder without its LM head and a value head read at the
//! reward token, trained on pairs to score the chosen answer above the rejected one.
//!
//! The decoder is trained with LoRA, QLoRA or in full; the value head always in full
//! (zero at the start, as XTuner's). A LoRA checkpoint holds the PEFT adapter and
//! `v_head.safetensors`; a full one the reward layout that `convert pth_to_hf` writes
//! ([`RewardModel`]'s: `InternLM2ForRewardModel` or `...ForSequenceClassification`),
//! with LoRA merged as XTuner's `to_hf` merges it.

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use xtuner_dataset::{ProcessedDataset, Tokenizer};
use xtuner_model::checkpoint::{Checkpoint, SaveDtype, save_safetensors};
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::nn::linear::LinearLayers;
use xtuner_model::reward::{RewardModel, head_key};

use super::preference::pair_batch;
use super::{Saved, attach_part, base_model, init_seed, prepare, rank_zero_first, start};
use crate::config::{LoadedConfig, Objective, TrainConfig};
use crate::export::hf::copy_tokenizer_files;
use crate::export::{DEFAULT_SHARD_SIZE, peft, write_json};
use crate::optim::MASTER_DTYPE;
use crate::preference::{RewardObjective, reward_loss, reward_scores};
use crate::recompute::decoder_backward;
use crate::run::{MicroStep, Recipe, RunContext, TrainSummary};
use crate::step::batch_tensors;
use crate::{Error, Result, lora, run};

/// The file of a LoRA checkpoint that holds the value head.
const V_HEAD_FILE: &str = "v_head.safetensors";

/// Runs (or resumes) a reward-model config.
///
/// # Errors
/// As [`run::run`]; bad data or model.
pub fn train<B: AutodiffBackend>(
    ctx: RunContext<'_, B>,
    resume: Option<run::Resume>,
) -> Result<TrainSummary> {
    let (loaded, work_dir, device) = (ctx.loaded, ctx.work_dir, ctx.device);
    let config = &loaded.config;
    let Some(Objective::Reward(objective)) = config
        .preference
        .as_ref()
        .map(|p| p.objective())
        .transpose()?
    else {
        return Err(Error::setting("preference.method", "not a reward model"));
    };
    let (dataset, tokenizer, base, decoder) = rank_zero_first(ctx.collective, |reuse| {
        let (dataset, tokenizer) = prepare(loaded, work_dir)?;
        let (base, decoder) = base_model::<B>(config, &tokenizer, work_dir, reuse, device)?;
        Ok((dataset, tokenizer, base, decoder))
    })?;
    let start = start::<B, _>(config, work_dir, resume, device, |checkpoint| {
        ready(config, base, &decoder, checkpoint, device)
    })?;
    let recipe = RewardRecipe {
        config,
        objective,
        dataset: &dataset,
        decoder: &decoder,
        tokenizer: &tokenizer,
        device,
    };
    run::run(&recipe, start, ctx)
}

/// The reward model of a run, ready to train or export: the decoder's adapters
/// (fresh, or the checkpoint's) or its full weights, and the value head (zero, or the
/// checkpoint's), trainable.
///
/// # Errors
/// A checkpoint that does not fit the config.
pub fn ready<B: Backend>(
    config: &TrainConfig,
    base: Decoder<B>,
    decoder: &DecoderConfig,
    checkpoint: Option<&Path>,
    device: &B::Device,
) -> Result<RewardModel<B>> {
    let model = RewardModel::from_decoder(base, decoder.hidden_size, device);
    let saved = checkpoint.map(|dir| Saved {
        adapter: dir,
        full: dir,
    });
    let mut model = attach_part(
        model,
        decoder,
        config.lora.as_ref(),
        false,
        saved,
        init_seed(config),
        device,
        |dir| {
            let ckpt = Checkpoint::open(dir)?.with_dtype(MASTER_DTYPE);
            Ok(RewardModel::load_from(&ckpt, decoder, None, device)?)
        },
    )?;
    if let (Some(dir), Some(_)) = (checkpoint, &config.lora) {
        let ckpt = Checkpoint::open(&dir.join(V_HEAD_FILE))?.with_dtype(MASTER_DTYPE);
        let key = head_key(decoder.family);
        model.v_head = Param::from_tensor(ckpt.tensor(key, [1, decoder.hidden_size], device)?);
    }
    model.v_head = model.v_head.set_require_grad(true);
    Ok(model)
}

/// Builds the reward model of a checkpoint again (the config's base, the checkpoint's
/// adapter or weights, and its value head), with its tokenizer.
///
/// # Errors
/// A checkpoint that does not fit the config.
pub fn restore<B: Backend>(
    loaded: &LoadedConfig,
    checkpoint: &Path,
    device: &B::Device,
) -> Result<(RewardModel<B>, DecoderConfig, Tokenizer)> {
    let config = &loaded.config;
    let tokenizer = Tokenizer::from_path(super::tokenizer_path(loaded)?)?;
    let (base, decoder) = super::build_model::<B>(config, &tokenizer, device)?;
    let model = ready(config, base, &decoder, Some(checkpoint), device)?;
    Ok((model, decoder, tokenizer))
}

/// Writes a reward model in XTuner's export layout (adapters merged): `config.json`,
/// the weights and the tokenizer files.
///
/// # Errors
/// An unwritable directory.
pub fn write_reward_model<B: Backend>(
    model: &RewardModel<B>,
    decoder: &DecoderConfig,
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
    dtype: SaveDtype,
    max_shard_size: u64,
) -> Result<()> {
    let model = lora::merge(model.clone(), decoder);
    let reward_token = config.preference.as_ref().and_then(|p| p.reward_token_id);
    let bos = tokenizer.bos_ids().first().copied();
    let eos = tokenizer.eos_ids().first().copied();
    write_json(
        &dir.join("config.json"),
        &RewardModel::<B>::to_hf_json(decoder, bos, eos, reward_token),
    )?;
    save_safetensors(
        dir,
        "model",
        model.to_hf_tensors(decoder)?,
        dtype,
        Some(max_shard_size),
    )?;
    copy_tokenizer_files(tokenizer, dir)
}

/// A reward model on pairs.
struct RewardRecipe<'a, B: Backend> {
    config: &'a TrainConfig,
    objective: RewardObjective,
    dataset: &'a ProcessedDataset,
    decoder: &'a DecoderConfig,
    tokenizer: &'a Tokenizer,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Recipe<B> for RewardRecipe<'_, B> {
    type Model = RewardModel<B>;

    fn lengths(&self) -> Vec<i64> {
        self.dataset.lengths()
    }

    fn nf4_bytes(&self, model: &RewardModel<B>) -> usize {
        model.nf4_bytes(self.decoder)
    }

    fn forward_backward(
        &self,
        model: &RewardModel<B>,
        rows: &[usize],
        divisor: usize,
    ) -> Result<MicroStep> {
        let rows = self.dataset.rows_at(rows);
        let (batch, segments) = pair_batch(&rows, self.config.data.use_varlen_attn);
        let (ids, input) = batch_tensors::<B>(&batch, self.device);
        let embeds = model.model.embed(ids);
        let checkpointing = self.config.model.activation_checkpointing;
        let (out, grads) = decoder_backward(
            model,
            &model.model,
            embeds,
            &input,
            checkpointing,
            |hidden| {
                let (chosen, rejected) = reward_scores(model.scores(hidden), &batch.labels);
                let out = reward_loss(chosen, rejected, &self.objective);
                (out.loss.clone().div_scalar(divisor as f64), out)
            },
        );
        let loss = xtuner_model::nn::precision::scalar(out.loss);
        Ok(MicroStep {
            loss,
            trained_tokens: segments.len() / 2,
            tokens: batch.tokens(),
            grads,
            metrics: vec![
                ("chosen_score_mean", out.chosen_rewards),
                ("rejected_score_mean", out.rejected_rewards),
                ("reward_acc", out.reward_acc),
                ("reward_margin", out.reward_margin),
            ],
        })
    }

    fn write_weights(
        &self,
        model: &RewardModel<B::InnerBackend>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> Result<()> {
        match &self.config.lora {
            Some(l) => {
                let base = self.config.model.path().map(|p| p.display().to_string());
                peft::write_adapter(dir, l, model, self.decoder, Some("SEQ_CLS"), base, dtype)?;
                let head = vec![(
                    head_key(self.decoder.family).to_string(),
                    model.v_head.val().into_data(),
                )];
                save_safetensors(dir, "v_head", head, SaveDtype::F32, None)?;
                Ok(())
            }
            None => write_reward_model(
                model,
                self.decoder,
                self.config,
                self.tokenizer,
                dir,
                dtype,
                DEFAULT_SHARD_SIZE,
            ),
        }
    }

    /// A reward model does not chat.
    fn evaluate(&self, _: &RewardModel<B::InnerBackend>) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
}
