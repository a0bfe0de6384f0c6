//! The decoder: InternLM2 (Cai et al., 2024, "InternLM2 Technical Report"), mirroring
//! Hugging Face's `modeling_internlm2.py`; the same decoder serves Llama and Qwen2
//! checkpoints, whose arithmetic is identical (pre-norm residual blocks, RMSNorm,
//! rotate-half RoPE, grouped-query attention, SwiGLU), through their own key names
//! ([`Family`]). Loading and saving checkpoints is `checkpoint/decoder.rs`'s.
//!
//! ```text
//! h = embed(ids)
//! for each layer:  h = h + wo(attention(attention_norm(h)))
//!                  h = h + w2(silu(w1(z)) ⊙ w3(z)),  z = ffn_norm(h)
//! logits = output(norm(h))
//! ```
//!
//! Checkpoint keys: `model.tok_embeddings`, `model.layers.N.{attention_norm,
//! attention.wqkv, attention.wo, ffn_norm, feed_forward.w1|w2|w3}`, `model.norm`,
//! `output` (see [`crate::checkpoint::keys`] for the other families).
//!
//! Dimension legend: B batch, T tokens, C hidden, H heads, K KV heads, D head dim,
//! I intermediate, V vocabulary.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use crate::checkpoint::keys::{Family, QkvKeys, internlm2_qkv_rows};
use crate::nn::attention::{Attention, AttentionMask};
use crate::nn::kv_cache::KvCache;
pub use crate::nn::linear::LinearSite;
use crate::nn::linear::{Linear, LinearLayers};
use crate::nn::mlp::FeedForward;
use crate::nn::precision::{compute_dtype, in_dtype};
use crate::nn::rms_norm::RmsNorm;
use crate::nn::rope::{Rope, RopeScaling};
use crate::{Error, Result};

/// `config.json` as Hugging Face writes it for InternLM2, Llama and Qwen2 (only the
/// fields the arithmetic needs).
#[derive(Debug, Clone, Deserialize)]
pub struct HfDecoderConfig {
    /// `internlm2`, `llama` or `qwen2`.
    pub model_type: String,
    /// V.
    pub vocab_size: usize,
    /// C.
    pub hidden_size: usize,
    /// I.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// H.
    pub num_attention_heads: usize,
    /// K (defaults to H).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// D (defaults to C / H).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm ε.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE θ (older configs; transformers 5 writes it in `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5's RoPE settings.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// `{"type"|"rope_type": "linear"|"dynamic", "factor": f}`.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Trained context length.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// InternLM2: biases on every linear layer.
    #[serde(default)]
    pub bias: Option<bool>,
    /// Llama: biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Llama: biases on the MLP.
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// The LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// `silu` for every supported family.
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

/// The validated architecture of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Which key names the checkpoint uses.
    pub family: Family,
    /// V.
    pub vocab_size: usize,
    /// C.
    pub hidden_size: usize,
    /// I.
    pub intermediate_size: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// H.
    pub n_heads: usize,
    /// K.
    pub n_kv_heads: usize,
    /// D.
    pub head_dim: usize,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: Rope,
    /// Biases on q/k/v.
    pub qkv_bias: bool,
    /// Bias on the attention output.
    pub o_bias: bool,
    /// Biases on the MLP.
    pub mlp_bias: bool,
    /// The LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl DecoderConfig {
    /// Reads and validates a `config.json`.
    ///
    /// # Errors
    /// An unreadable file, an unsupported `model_type` or activation, or shapes that do
    /// not fit together.
    pub fn from_file(path: &Path) -> Result<Self> {
        let hf: HfDecoderConfig = crate::error::read_json_file(path)?;
        Self::try_from(hf).map_err(|e| crate::error::in_file(path, e))
    }

    /// Parameters of the matrix products (embeddings excluded, LM head included).
    pub fn matmul_params(&self) -> usize {
        let (c, h, k, d, i) = (
            self.hidden_size,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.intermediate_size,
        );
        self.n_layers * (c * (h + 2 * k) * d + h * d * c + 3 * c * i) + c * self.vocab_size
    }
}

impl DecoderConfig {
    /// Named shapes for random initialisation (demos and benchmarks); the vocabulary
    /// comes from the tokenizer. `internlm2-tiny`: 4 layers × hidden 128 (trains on a
    /// CPU in minutes); `internlm2-1.8b`: InternLM2-Chat-1.8B's shape.
    pub fn preset(name: &str, vocab_size: usize) -> Option<Self> {
        let (hidden, intermediate, layers, heads, kv_heads) = match name {
            "internlm2-tiny" => (128, 384, 4, 4, 2),
            "internlm2-small" => (512, 1536, 4, 8, 4),
            "internlm2-1.8b" => (2048, 8192, 24, 16, 8),
            _ => return None,
        };
        let head_dim = hidden / heads;
        Some(Self {
            family: Family::InternLm2,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: intermediate,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: 1e-5,
            rope: Rope {
                head_dim,
                theta: 1e6,
                max_position_embeddings: 32768,
                scaling: None,
            },
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
        })
    }

    /// The names [`DecoderConfig::preset`] knows.
    pub const PRESETS: &'static [&'static str] =
        &["internlm2-tiny", "internlm2-small", "internlm2-1.8b"];

    /// A `config.json` for this shape (what `save_pretrained` writes for InternLM2).
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        let model_type = match self.family {
            Family::InternLm2 => "internlm2",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        };
        let architectures = match self.family {
            Family::InternLm2 => "InternLM2ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        };
        let scaling = match self.rope.scaling {
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic { factor }) => {
                serde_json::json!({"type": "dynamic", "factor": factor})
            }
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "architectures": [architectures],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.rope.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": scaling,
            "bias": self.qkv_bias,
            "attention_bias": self.qkv_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}

impl TryFrom<HfDecoderConfig> for DecoderConfig {
    type Error = Error;

    fn try_from(hf: HfDecoderConfig) -> Result<Self> {
        let invalid = |key: &'static str, message: String| Error::InvalidConfig { key, message };
        let family = match hf.model_type.as_str() {
            "internlm2" => Family::InternLm2,
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            other => {
                return Err(invalid(
                    "model_type",
                    format!("`{other}` is not supported (internlm2, llama, qwen2)"),
                ));
            }
        };
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(invalid(
                "hidden_act",
                format!("`{act}` is not supported (silu)"),
            ));
        }
        let n_heads = hf.num_attention_heads;
        let n_kv_heads = hf.num_key_value_heads.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!("{n_kv_heads} must divide num_attention_heads {n_heads}"),
            ));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hf.hidden_size.is_multiple_of(n_heads) => hf.hidden_size / n_heads,
            None => {
                return Err(invalid(
                    "hidden_size",
                    format!("{} is not a multiple of {n_heads} heads", hf.hidden_size),
                ));
            }
        };
        for (key, value) in [
            ("vocab_size", hf.vocab_size),
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive".into()));
            }
        }
        let theta = hf
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .or(hf.rope_theta)
            .unwrap_or(10_000.0);
        let scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => {
                let kind = s
                    .get("type")
                    .or_else(|| s.get("rope_type"))
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("");
                let factor = s
                    .get("factor")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(1.0);
                match kind {
                    "linear" => Some(RopeScaling::Linear { factor }),
                    "dynamic" => Some(RopeScaling::Dynamic { factor }),
                    "default" | "" => None,
                    other => {
                        return Err(invalid(
                            "rope_scaling",
                            format!("type `{other}` is not supported (linear, dynamic)"),
                        ));
                    }
                }
            }
        };
        let rope = Rope::new(head_dim, theta, hf.max_position_embeddings, scaling)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::InternLm2 => {
                let b = hf.bias.unwrap_or(true);
                (b, b, b)
            }
            Family::Llama => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, hf.mlp_bias.unwrap_or(false))
            }
            Family::Qwen2 => (true, false, false),
        };
        Ok(Self {
            family,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        })
    }
}

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
        let mut h = embeds;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.layers.get_mut(i));
            h = layer.forward(h, &cos, &sin, &input.mask, layer_cache);
        }
        self.norm.forward(h)
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
        match &self.output {
            Some(output) => output.forward(h),
            None => {
                let table = in_dtype(self.tok_embeddings.val(), h.dtype());
                crate::nn::gemm::matmul(h, table.transpose())
            }
        }
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// RMSNorm before attention.
    pub attention_norm: RmsNorm<B>,
    /// Self-attention.
    pub attention: Attention<B>,
    /// RMSNorm before the MLP.
    pub ffn_norm: RmsNorm<B>,
    /// SwiGLU MLP.
    pub feed_forward: FeedForward<B>,
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
        let h = x.clone()
            + self
                .attention
                .forward(self.attention_norm.forward(x), cos, sin, mask, cache);
        h.clone() + self.feed_forward.forward(self.ffn_norm.forward(h))
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
        let layers = (0..c.n_layers)
            .map(|_| {
                Ok(Block {
                    attention_norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device)?,
                    attention: Attention {
                        wqkv: Linear::new(c.hidden_size, qkv_out, c.qkv_bias, device),
                        wo: Linear::new(c.n_heads * c.head_dim, c.hidden_size, c.o_bias, device),
                        n_heads: c.n_heads,
                        n_kv_heads: c.n_kv_heads,
                        head_dim: c.head_dim,
                    },
                    ffn_norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device)?,
                    feed_forward: FeedForward {
                        w1: Linear::new(c.hidden_size, c.intermediate_size, c.mlp_bias, device),
                        w2: Linear::new(c.intermediate_size, c.hidden_size, c.mlp_bias, device),
                        w3: Linear::new(c.hidden_size, c.intermediate_size, c.mlp_bias, device),
                    },
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
            norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device)?,
            output: (!c.tie_word_embeddings)
                .then(|| Linear::new(c.hidden_size, c.vocab_size, false, device)),
            rope: c.rope,
        })
    }
}

/// The decoder's linear layers, each named where it is rebuilt: per block the fused
/// q/k/v product, `wo`, `w1`, `w2`, `w3`, then the LM head (absent when tied).
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
                QkvKeys::Fused(module) => LinearSite::new(module, (h + 2 * k) * d)
                    .with_out_rows(internlm2_qkv_rows(h, k, d)),
                // Fused here from three checkpoint modules, each adapted on its own.
                QkvKeys::Separate { q, k: key, v } => LinearSite::fused([
                    (q.clone(), h * d),
                    (key.clone(), k * d),
                    (v.clone(), k * d),
                ]),
            };
            let site = |module: &str, l: &Linear<B>| LinearSite::new(module, l.dims()[1]);
            let (a, m) = (&mut layer.attention, &mut layer.feed_forward);
            a.wqkv = f(&qkv, a.wqkv.clone())?;
            a.wo = f(&site(&keys.wo, &a.wo), a.wo.clone())?;
            m.w1 = f(&site(&keys.w1, &m.w1), m.w1.clone())?;
            m.w2 = f(&site(&keys.w2, &m.w2), m.w2.clone())?;
            m.w3 = f(&site(&keys.w3, &m.w3), m.w3.clone())?;
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
        assert_eq!(layers.len(), 5 * c.n_layers + usize::from(model.output.is_some()));
        assert_eq!(modules.len(), layers.len(), "InternLM2: one module per layer");
        for (site, linear) in &layers {
            let width: usize = site.modules.iter().map(|m| m.width).sum();
            assert_eq!(width, linear.dims()[1], "{site:?}");
        }
    }
}
