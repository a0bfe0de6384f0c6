//! The decoder: InternLM2 (Cai et al., 2024, "InternLM2 Technical Report"), mirroring
//! Hugging Face's `modeling_internlm2.py`; the same decoder serves every family whose
//! arithmetic is the same pre-norm residual stack (RMSNorm, rotate-half RoPE,
//! grouped-query attention, a gated MLP), through their own key names ([`Family`]) and
//! a few settings of [`DecoderConfig`]: Llama, Mistral and Qwen2 as they are; Qwen3
//! with q/k norms; Gemma with `(1 + w)` norms, `√C`-scaled embeddings and GeGLU;
//! Gemma 2 with norms after attention and MLP too, soft caps and sliding windows;
//! Phi-3 with its fused projections. Loading and saving checkpoints is
//! `checkpoint/decoder.rs`'s.
//!
//! ```text
//! h = embed(ids) · (√C for Gemma)
//! for each layer:  h = h + post_attention_norm?(wo(attention(attention_norm(h))))
//!                  h = h + post_ffn_norm?(w2(act(gate(z)) ⊙ up(z))),  z = ffn_norm(h)
//! logits = softcap?(output(norm(h)))
//! ```
//!
//! Checkpoint keys: `model.tok_embeddings`, `model.layers.N.{attention_norm,
//! attention.wqkv, attention.wo, ffn_norm, feed_forward.w1|w2|w3}`, `model.norm`,
//! `output` (see [`crate::checkpoint::keys`] for the other families).
//!
//! Dimension legend: B batch, T tokens, C hidden, H heads, K KV heads, D head dim,
//! I intermediate, V vocabulary.

mod config;

pub use self::config::{DecoderConfig, HfDecoderConfig};
use crate::Result;
use crate::checkpoint::keys::{Family, GateUpKeys, QkvKeys, internlm2_qkv_rows};
use crate::nn::attention::{Attention, AttentionMask};
use crate::nn::kv_cache::KvCache;
pub use crate::nn::linear::LinearSite;
use crate::nn::linear::{Linear, LinearLayers};
use crate::nn::mlp::FeedForward;
use crate::nn::precision::{compute_dtype, in_dtype};
use crate::nn::rms_norm::{RmsNorm, optional};
use crate::nn::rope::Rope;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// The decoder.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Token embeddings `[V, C]`.
    pub tok_embeddings: Param<Tensor<B, 2>>,
    /// The decoder layers.
    pub layers: Vec<Block<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
    /// LM head `[C, V]`; `None` when tied to the embeddings.
    pub output: Option<Linear<B>>,
    /// Rotary embedding settings.
    pub rope: Rope,
    /// Embeddings are multiplied by this (Gemma: `√C`, in the compute dtype).
    pub embed_scale: Option<f64>,
    /// Logits soft-capped at this value (Gemma 2).
    pub final_softcap: Option<f64>,
}

/// Inputs besides the embeddings: positions and the attention mask.
#[derive(Debug, Clone)]
pub struct DecoderInput<B: Backend> {
    /// Position of each token `[B, T]` (restarting per packed sample).
    pub positions: Tensor<B, 2, Int>,
    /// Which keys each query sees.
    pub mask: AttentionMask<B>,
}

impl<B: Backend> DecoderInput<B> {
    /// Rows of `t` tokens at positions `0..t` with a plain causal mask (no padding, no
    /// packed samples): a prompt, or right-padded rows whose padding is never attended
    /// by real tokens.
    pub fn causal(batch: usize, t: usize, device: &B::Device) -> Self {
        let positions: Vec<i64> = (0..batch).flat_map(|_| 0..t as i64).collect();
        Self {
            positions: Tensor::from_data(TensorData::new(positions, [batch, t]), device),
            mask: AttentionMask::causal(batch, t, device),
        }
    }
}

impl<B: Backend> Decoder<B> {
    /// Embeds token ids.
    ///
    /// # Shapes
    /// `ids`: `[B, T]` → `[B, T, C]`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        // Gathered from the table as stored, then cast: casting an f32 master table
        // first would copy it whole and sum its gradient in bf16.
        let rows = burn::tensor::module::embedding(self.tok_embeddings.val(), ids);
        in_dtype(rows, compute_dtype::<B>())
    }

    /// Logits for every position of token ids.
    ///
    /// # Shapes
    /// `ids`: `[B, T]` → `[B, T, V]`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        input: &DecoderInput<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_embeds(self.embed(ids), input, cache)
    }

    /// Logits for every position of input embeddings (LLaVA splices image features
    /// into them).
    ///
    /// # Shapes
    /// `embeds`: `[B, T, C]` → `[B, T, V]`.
    pub fn forward_embeds(
        &self,
        embeds: Tensor<B, 3>,
        input: &DecoderInput<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let h = self.hidden_states(embeds, input, cache);
        self.lm_head(h)
    }

    /// The final normed hidden states (before the LM head).
    ///
    /// # Shapes
    /// `embeds`: `[B, T, C]` → `[B, T, C]`.
    pub fn hidden_states(
        &self,
        embeds: Tensor<B, 3>,
        input: &DecoderInput<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let (cos, sin) = self.rope.cos_sin(input.positions.clone());
        let mut h = self.scale_embeds(embeds);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.layers.get_mut(i));
            h = layer.forward(h, &cos, &sin, &input.mask, layer_cache);
        }
        self.norm.forward(h)
    }

    /// The first layer's input from input embeddings: Gemma's `√C` scale (a scalar of
    /// the embeddings' dtype, as transformers' `normalizer`), nothing for the others.
    /// Every path into the layers goes through it (the plain forward and training's
    /// recompute).
    pub fn scale_embeds(&self, embeds: Tensor<B, 3>) -> Tensor<B, 3> {
        match self.embed_scale {
            Some(scale) => embeds.mul_scalar(scale),
            None => embeds,
        }
    }

    /// Rows of the embedding table (the logits' width).
    pub fn vocab_size(&self) -> usize {
        self.tok_embeddings.dims()[0]
    }

    /// Logits from normed hidden states.
    ///
    /// # Shapes
    /// `h`: `[B, T, C]` → `[B, T, V]`.
    pub fn lm_head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.output {
            Some(output) => output.forward(h),
            None => {
                let table = in_dtype(self.tok_embeddings.val(), h.dtype());
                crate::nn::gemm::matmul(h, table.transpose())
            }
        };
        match self.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }
}

/// One pre-norm decoder layer (Gemma 2: norms after attention and MLP as well).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// RMSNorm before attention.
    pub attention_norm: RmsNorm<B>,
    /// Self-attention.
    pub attention: Attention<B>,
    /// RMSNorm of the attention output (Gemma 2).
    pub post_attention_norm: Option<RmsNorm<B>>,
    /// RMSNorm before the MLP.
    pub ffn_norm: RmsNorm<B>,
    /// Gated MLP.
    pub feed_forward: FeedForward<B>,
    /// RMSNorm of the MLP output (Gemma 2).
    pub post_ffn_norm: Option<RmsNorm<B>>,
}

impl<B: Backend> Block<B> {
    /// # Shapes
    /// `x`: `[B, T, C]` → `[B, T, C]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        mask: &AttentionMask<B>,
        cache: Option<&mut crate::nn::kv_cache::LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let attended = self.attention.forward(
            self.attention_norm.forward(x.clone()),
            cos,
            sin,
            mask,
            cache,
        );
        let h = x + optional(&self.post_attention_norm, attended);
        let mlp = self.feed_forward.forward(self.ffn_norm.forward(h.clone()));
        h + optional(&self.post_ffn_norm, mlp)
    }
}

// ---------------------------------------------------------------------------------
// Construction: random init (demos, benchmarks) and loading a Hugging Face checkpoint.

impl<B: Backend> Decoder<B> {
    /// A model of the given shape with random weights (embeddings N(0, 0.02²), linear
    /// layers as PyTorch initialises them).
    ///
    /// # Errors
    /// A config that cannot build layers.
    pub fn random(config: &DecoderConfig, device: &B::Device) -> Result<Self> {
        let c = config;
        let qkv_out = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
        let norm = |width: usize| {
            Ok::<_, crate::Error>(
                RmsNorm::new(width, c.rms_norm_eps, device)?.with_offset(c.norm_offset),
            )
        };
        let sandwich = c.family == Family::Gemma2;
        let layers = (0..c.n_layers)
            .map(|i| {
                let qk_norm = || {
                    (c.family == Family::Qwen3)
                        .then(|| norm(c.head_dim))
                        .transpose()
                };
                Ok(Block {
                    attention_norm: norm(c.hidden_size)?,
                    attention: Attention {
                        wqkv: Linear::new(c.hidden_size, qkv_out, c.qkv_bias, device),
                        wo: Linear::new(c.n_heads * c.head_dim, c.hidden_size, c.o_bias, device),
                        n_heads: c.n_heads,
                        n_kv_heads: c.n_kv_heads,
                        head_dim: c.head_dim,
                        q_norm: qk_norm()?,
                        k_norm: qk_norm()?,
                        scale: c.attention_scale,
                        softcap: c.attn_softcap,
                        window: c.windows.get(i).copied().flatten(),
                    },
                    post_attention_norm: sandwich.then(|| norm(c.hidden_size)).transpose()?,
                    ffn_norm: norm(c.hidden_size)?,
                    feed_forward: FeedForward {
                        // Gate and up side by side, each initialised as its own layer
                        // (the bound depends only on the input width).
                        w13: Linear::new(
                            c.hidden_size,
                            2 * c.intermediate_size,
                            c.mlp_bias,
                            device,
                        ),
                        w2: Linear::new(c.intermediate_size, c.hidden_size, c.mlp_bias, device),
                        act: c.hidden_act,
                    },
                    post_ffn_norm: sandwich.then(|| norm(c.hidden_size)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embeddings = Tensor::random(
            [c.vocab_size, c.hidden_size],
            burn::tensor::Distribution::Normal(0.0, 0.02),
            device,
        );
        Ok(Self {
            tok_embeddings: Param::from_tensor(embeddings),
            layers,
            norm: norm(c.hidden_size)?,
            output: (!c.tie_word_embeddings)
                .then(|| Linear::new(c.hidden_size, c.vocab_size, false, device)),
            rope: c.rope,
            embed_scale: c.scale_embeddings.then(|| (c.hidden_size as f64).sqrt()),
            final_softcap: c.final_softcap,
        })
    }
}

/// The decoder's linear layers, each named where it is rebuilt: per block the fused
/// q/k/v product, `wo`, the fused gate/up product, `w2`, then the LM head (absent when
/// tied). A fused product of separate checkpoint modules names each of them.
impl<B: Backend> LinearLayers<B> for Decoder<B> {
    type Config = DecoderConfig;

    fn map_linear_layers<E>(
        mut self,
        config: &DecoderConfig,
        mut f: impl FnMut(&LinearSite, Linear<B>) -> std::result::Result<Linear<B>, E>,
    ) -> std::result::Result<Self, E> {
        let c = config;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, mut layer) in std::mem::take(&mut self.layers).into_iter().enumerate() {
            let keys = c.family.layer(i);
            let (h, k, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
            let qkv = match &keys.qkv {
                QkvKeys::Interleaved(module) => LinearSite::new(module, (h + 2 * k) * d)
                    .with_out_rows(internlm2_qkv_rows(h, k, d)),
                QkvKeys::Packed(module) => LinearSite::new(module, (h + 2 * k) * d),
                // Fused here from three checkpoint modules, each adapted on its own.
                QkvKeys::Separate { q, k: key, v } => LinearSite::fused([
                    (q.clone(), h * d),
                    (key.clone(), k * d),
                    (v.clone(), k * d),
                ]),
            };
            let i_size = c.intermediate_size;
            let gate_up = match &keys.gate_up {
                GateUpKeys::Separate { gate, up } => {
                    LinearSite::fused([(gate.clone(), i_size), (up.clone(), i_size)])
                }
                GateUpKeys::Fused(module) => LinearSite::new(module, 2 * i_size),
            };
            let site = |module: &str, l: &Linear<B>| LinearSite::new(module, l.dims()[1]);
            let (a, m) = (&mut layer.attention, &mut layer.feed_forward);
            a.wqkv = f(&qkv, a.wqkv.clone())?;
            a.wo = f(&site(&keys.wo, &a.wo), a.wo.clone())?;
            m.w13 = f(&gate_up, m.w13.clone())?;
            m.w2 = f(&site(&keys.w2, &m.w2), m.w2.clone())?;
            layers.push(layer);
        }
        self.layers = layers;
        if let Some(output) = self.output.take() {
            let site = LinearSite::new(c.family.output(), output.dims()[1]);
            self.output = Some(f(&site, output)?);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::TestBackend;

    /// Every linear layer of the decoder is listed, once: the listed layers with the
    /// embeddings and norms are all of the model's parameters.
    #[test]
    fn every_linear_layer_is_listed_once() {
        let device = Default::default();
        let c = DecoderConfig::preset("internlm2-tiny", 300).unwrap();
        let model = Decoder::<TestBackend>::random(&c, &device).unwrap();
        let layers = model.linear_layers(&c);
        let listed: usize = layers
            .iter()
            .map(|(_, l)| {
                let [d_in, d_out] = l.dims();
                d_in * d_out + l.bias.as_ref().map_or(0, |_| d_out)
            })
            .sum();
        let embeddings_and_norms =
            c.vocab_size * c.hidden_size + (2 * c.n_layers + 1) * c.hidden_size;
        assert_eq!(listed + embeddings_and_norms, model.num_params());
        let modules: BTreeSet<&str> = layers
            .iter()
            .flat_map(|(s, _)| s.modules.iter().map(|m| m.module.as_str()))
            .collect();
        let head = usize::from(model.output.is_some());
        assert_eq!(
            layers.len(),
            4 * c.n_layers + head,
            "gate and up are one product"
        );
        assert_eq!(
            modules.len(),
            5 * c.n_layers + head,
            "InternLM2's modules: wqkv, wo, w1, w3, w2 and the head"
        );
        for (site, linear) in &layers {
            let width: usize = site.modules.iter().map(|m| m.width).sum();
            assert_eq!(width, linear.dims()[1], "{site:?}");
        }
    }
}
