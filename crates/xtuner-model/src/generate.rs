//! Autoregressive decoding with a KV cache: the prompt is processed once, then each step
//! feeds one token and attends to the cached keys and values. Generation stops at the
//! token budget, at an end-of-sequence id, or when the caller says so (stop words are
//! text, so the caller, who holds the tokenizer, checks them).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::Result;
use crate::decoder::{Decoder, DecoderInput};
use crate::nn::attention::AttentionMask;
use crate::nn::kv_cache::KvCache;
use crate::nn::precision::host_vec;
use crate::sampling::{Sampler, SamplingConfig};

/// What ends a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Ids that end the answer (not included in the output).
    pub eos_token_ids: Vec<u32>,
    /// How tokens are chosen.
    pub sampling: SamplingConfig,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence id was produced.
    Eos,
    /// The caller stopped it (a stop word).
    Stopped,
    /// `max_new_tokens` were produced.
    Length,
}

/// Generates from a prompt given as embeddings (`[1, T, C]`; text prompts use
/// [`Decoder::embed`], LLaVA splices image features in) whose token ids, if any, are
/// `prompt_ids` (for the repetition penalty). `on_token` sees each new id and returns
/// `false` to stop after it. Returns the new ids (without a final EOS) and the reason.
///
/// # Errors
/// Logits that cannot be read on the host.
pub fn generate<B: Backend>(
    model: &Decoder<B>,
    prompt: Tensor<B, 3>,
    prompt_ids: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, StopReason)> {
    let [batch, t, _] = prompt.dims();
    let device = prompt.device();
    let first = model.layers.first();
    let (kv_heads, head_dim) =
        first.map_or((1, 1), |l| (l.attention.n_kv_heads, l.attention.head_dim));
    let mut cache = KvCache::new(
        model.layers.len(),
        batch,
        kv_heads,
        t + config.max_new_tokens,
        head_dim,
        &device,
    );
    let mut sampler = Sampler::new(config.sampling);
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut generated = Vec::new();

    let input = DecoderInput::causal(batch, t, &device);
    let mut logits = last_logits(model.forward_embeds(prompt, &input, Some(&mut cache)))?;
    for _ in 0..config.max_new_tokens {
        let id = sampler.next(&mut logits, &history);
        if config.eos_token_ids.contains(&id) {
            return Ok((generated, StopReason::Eos));
        }
        generated.push(id);
        history.push(id);
        if !on_token(id) {
            return Ok((generated, StopReason::Stopped));
        }
        let pos = cache.len();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![i64::from(id)], [1, 1]), &device);
        let positions =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![pos as i64], [1, 1]), &device);
        let input = DecoderInput {
            positions,
            mask: AttentionMask::Bias(Tensor::zeros([1, 1, 1, pos + 1], &device)),
        };
        logits = last_logits(model.forward(ids, &input, Some(&mut cache)))?;
    }
    Ok((generated, StopReason::Length))
}

/// The logits of the last position of the first row, on the host.
fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Result<Vec<f32>> {
    let [_, t, v] = logits.dims();
    let last = logits.slice([0..1, t.saturating_sub(1)..t, 0..v]);
    host_vec(last.into_data())
}
