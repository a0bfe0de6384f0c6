//! A decoder's architecture: `config.json` as transformers writes it for each family
//! ([`HfDecoderConfig`]), read into the settings the arithmetic needs
//! ([`DecoderConfig`]), and written back for an export.

use std::path::Path;

use serde::Deserialize;

use crate::checkpoint::keys::Family;
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
