//! A decoder's architecture: `config.json` as transformers writes it for each family
//! ([`HfDecoderConfig`]), read into the settings the arithmetic needs
//! ([`DecoderConfig`]), and written back for an export.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::checkpoint::keys::Family;
use crate::nn::activation::HiddenAct;
use crate::nn::rope::{Rope, RopeScaling};
use crate::{Error, Result};

/// `config.json` as Hugging Face writes it (only the fields the arithmetic needs).
#[derive(Debug, Clone, Deserialize)]
pub struct HfDecoderConfig {
    /// `internlm2`, `llama`, `mistral`, `qwen2`, `qwen3`, `gemma`, `gemma2` or `phi3`.
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
    /// transformers 5's RoPE settings (`rope_theta`, `rope_type`, `factor`, ...).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Older RoPE scaling: `{"type"|"rope_type": "linear"|"dynamic", "factor": f}`.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Trained context length.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// InternLM2: biases on every linear layer.
    #[serde(default)]
    pub bias: Option<bool>,
    /// Llama, Qwen3, Gemma: biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Llama: biases on the MLP.
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// The LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// The MLP gate's activation (`silu`; Gemma: `gelu_pytorch_tanh`).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma's name for it, which transformers prefers.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Gemma 2: queries scaled by `query_pre_attn_scalar^-½` instead of `D^-½`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores soft-capped at this value.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits soft-capped at this value.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// The sliding window, on the layers `layer_types` (or the family) says.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Qwen2/Qwen3: the window is used at all (on layers from `max_window_layers`).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3: the first layer with a window.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
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
    /// Which key names and layout the checkpoint uses.
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
    /// The MLP gate's activation.
    pub hidden_act: HiddenAct,
    /// RMSNorms scale by `norm_offset + w` (Gemma: 1).
    pub norm_offset: f64,
    /// Embeddings are multiplied by `√C` (Gemma).
    pub scale_embeddings: bool,
    /// The attention scores' scale (`D^-½`; Gemma 2: `query_pre_attn_scalar^-½`).
    pub attention_scale: f64,
    /// Attention scores soft-capped at this value (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped at this value (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Each layer's sliding window (`None`: it sees every earlier token).
    pub windows: Vec<Option<usize>>,
    /// The `config.json` this was read from, written back as it was by an export.
    pub source: Option<Value>,
}

impl DecoderConfig {
    /// Reads and validates a `config.json`.
    ///
    /// # Errors
    /// An unreadable file, an unsupported `model_type` or activation, or shapes that do
    /// not fit together.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json: Value = crate::error::read_json_file(path)?;
        Self::from_json(json).map_err(|e| crate::error::in_file(path, e))
    }

    /// Validates a parsed `config.json`, keeping it to write back.
    ///
    /// # Errors
    /// See [`DecoderConfig::from_file`].
    pub fn from_json(json: Value) -> Result<Self> {
        let hf: HfDecoderConfig =
            serde_json::from_value(json.clone()).map_err(|e| Error::InvalidConfig {
                key: "config.json",
                message: e.to_string(),
            })?;
        let mut config = Self::try_from(hf)?;
        config.source = Some(json);
        Ok(config)
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
            hidden_act: HiddenAct::Silu,
            norm_offset: 0.0,
            scale_embeddings: false,
            attention_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            windows: vec![None; layers],
            source: None,
        })
    }

    /// The names [`DecoderConfig::preset`] knows.
    pub const PRESETS: &'static [&'static str] =
        &["internlm2-tiny", "internlm2-small", "internlm2-1.8b"];

    /// The `config.json` of this model: the one it was read from, as it was (so an
    /// export has the checkpoint's own keys), or, for a preset, what `save_pretrained`
    /// writes for InternLM2.
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>) -> Value {
        if let Some(source) = &self.source {
            return source.clone();
        }
        let scaling = self.rope_scaling_json();
        serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
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

    /// The RoPE scaling as `config.json`'s `rope_scaling` gives it (`null` for none).
    pub fn rope_scaling_json(&self) -> Value {
        match self.rope.scaling {
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic { factor }) => {
                serde_json::json!({"type": "dynamic", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original,
            }),
            None => Value::Null,
        }
    }
}

/// The RoPE scaling of `rope_scaling` or transformers 5's `rope_parameters`.
fn rope_scaling(hf: &HfDecoderConfig) -> Result<Option<RopeScaling>> {
    let settings = match (&hf.rope_scaling, &hf.rope_parameters) {
        (Some(s), _) if !s.is_null() => s,
        (_, Some(p)) => p,
        _ => return Ok(None),
    };
    let kind = settings
        .get("rope_type")
        .or_else(|| settings.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let factor = settings
        .get("factor")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let number = |key: &str| {
        settings
            .get(key)
            .and_then(Value::as_f64)
            .filter(|v| *v > 0.0)
            .ok_or_else(|| Error::InvalidConfig {
                key: "rope_scaling",
                message: format!("`llama3` needs a positive `{key}`"),
            })
    };
    match kind {
        "linear" => Ok(Some(RopeScaling::Linear { factor })),
        "dynamic" => Ok(Some(RopeScaling::Dynamic { factor })),
        "llama3" => {
            let (low_freq_factor, high_freq_factor) =
                (number("low_freq_factor")?, number("high_freq_factor")?);
            if high_freq_factor <= low_freq_factor {
                return Err(Error::InvalidConfig {
                    key: "rope_scaling",
                    message: format!(
                        "high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ),
                });
            }
            Ok(Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original: number("original_max_position_embeddings")?,
            }))
        }
        "default" | "" => Ok(None),
        other => Err(Error::InvalidConfig {
            key: "rope_scaling",
            message: format!("type `{other}` is not supported (linear, dynamic, llama3)"),
        }),
    }
}

/// Each layer's sliding window: `layer_types` where the file has it, else the family's
/// rule as transformers applies it (Gemma 2: even layers; Qwen: from
/// `max_window_layers` when `use_sliding_window`; Mistral, Phi-3: every layer).
fn layer_windows(hf: &HfDecoderConfig, family: Family) -> Result<Vec<Option<usize>>> {
    let n = hf.num_hidden_layers;
    let Some(window) = hf.sliding_window.filter(|&w| w > 0) else {
        if hf
            .layer_types
            .iter()
            .flatten()
            .any(|t| t == "sliding_attention")
        {
            return Err(Error::InvalidConfig {
                key: "sliding_window",
                message: "layer_types has sliding_attention layers but no window size".into(),
            });
        }
        return Ok(vec![None; n]);
    };
    if let Some(types) = &hf.layer_types {
        if types.len() != n {
            return Err(Error::InvalidConfig {
                key: "layer_types",
                message: format!("{} entries for {n} layers", types.len()),
            });
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => Ok(Some(window)),
                other => Err(Error::InvalidConfig {
                    key: "layer_types",
                    message: format!(
                        "`{other}` is not supported (full_attention, sliding_attention)"
                    ),
                }),
            })
            .collect();
    }
    Ok((0..n)
        .map(|i| {
            let sliding = match family {
                Family::Gemma2 => i % 2 == 0,
                Family::Qwen2 | Family::Qwen3 => {
                    hf.use_sliding_window == Some(true) && i >= hf.max_window_layers.unwrap_or(0)
                }
                Family::Gemma | Family::InternLm2 => false,
                Family::Llama | Family::Phi3 => true,
            };
            sliding.then_some(window)
        })
        .collect())
}

impl TryFrom<HfDecoderConfig> for DecoderConfig {
    type Error = Error;

    fn try_from(hf: HfDecoderConfig) -> Result<Self> {
        let invalid = |key: &'static str, message: String| Error::InvalidConfig { key, message };
        let family = Family::from_model_type(&hf.model_type).ok_or_else(|| {
            let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
            invalid(
                "model_type",
                format!(
                    "`{}` is not supported ({}, mistral)",
                    hf.model_type,
                    known.join(", ")
                ),
            )
        })?;
        let act_name = hf
            .hidden_activation
            .as_deref()
            .or(hf.hidden_act.as_deref())
            .unwrap_or("silu");
        let hidden_act = match serde_json::from_value::<HiddenAct>(Value::from(act_name)) {
            Ok(act @ (HiddenAct::Silu | HiddenAct::Gelu | HiddenAct::GeluTanh)) => act,
            _ => {
                return Err(invalid(
                    "hidden_act",
                    format!("`{act_name}` is not supported (silu, gelu, gelu_pytorch_tanh)"),
                ));
            }
        };
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
        let parameter = |key: &str| {
            hf.rope_parameters
                .as_ref()
                .and_then(|p| p.get(key))
                .and_then(Value::as_f64)
        };
        if let Some(partial) = parameter("partial_rotary_factor").filter(|&f| f != 1.0) {
            return Err(invalid(
                "partial_rotary_factor",
                format!("{partial} is not supported (RoPE over the whole head: 1.0)"),
            ));
        }
        let theta = parameter("rope_theta")
            .or(hf.rope_theta)
            .unwrap_or(10_000.0);
        let rope = Rope::new(
            head_dim,
            theta,
            hf.max_position_embeddings,
            rope_scaling(&hf)?,
        )?;
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
            Family::Qwen3 | Family::Gemma | Family::Gemma2 => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, false)
            }
            Family::Phi3 => (false, false, false),
        };
        let gemma = matches!(family, Family::Gemma | Family::Gemma2);
        let gemma2 = family == Family::Gemma2;
        let positive = |key: &'static str, value: Option<f64>| match value {
            Some(v) if v.is_nan() || v <= 0.0 => {
                Err(invalid(key, format!("must be positive, got {v}")))
            }
            other => Ok(other),
        };
        let query_scalar = positive("query_pre_attn_scalar", hf.query_pre_attn_scalar)?;
        let attention_scale = match query_scalar.filter(|_| gemma2) {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (head_dim as f64).sqrt(),
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
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(gemma),
            hidden_act,
            norm_offset: if gemma { 1.0 } else { 0.0 },
            scale_embeddings: gemma,
            attention_scale,
            attn_softcap: positive("attn_logit_softcapping", hf.attn_logit_softcapping)?
                .filter(|_| gemma2),
            final_softcap: positive("final_logit_softcapping", hf.final_logit_softcapping)?
                .filter(|_| gemma2),
            windows: layer_windows(&hf, family)?,
            source: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: Value) -> Result<DecoderConfig> {
        DecoderConfig::from_json(json)
    }

    fn base(model_type: &str) -> Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 2,
        })
    }

    #[test]
    fn gemma2_reads_its_differences() {
        let mut json = base("gemma2");
        json["hidden_activation"] = "gelu_pytorch_tanh".into();
        json["query_pre_attn_scalar"] = 64.into();
        json["attn_logit_softcapping"] = 50.0.into();
        json["final_logit_softcapping"] = 30.0.into();
        json["sliding_window"] = 6.into();
        json["rope_parameters"] = serde_json::json!({"rope_theta": 1e4, "rope_type": "default"});
        let c = config(json.clone()).unwrap();
        assert_eq!(c.family, Family::Gemma2);
        assert_eq!(c.hidden_act, HiddenAct::GeluTanh);
        assert_eq!((c.norm_offset, c.scale_embeddings), (1.0, true));
        assert_eq!(c.attention_scale, 0.125);
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(
            c.windows,
            [Some(6), None, Some(6), None],
            "even layers slide"
        );
        assert!(c.tie_word_embeddings, "Gemma ties by default");
        assert_eq!(c.to_hf_json(None, None), json, "written back as read");
        json["layer_types"] = Value::from(vec!["full_attention"; 4]);
        assert_eq!(config(json).unwrap().windows, [None; 4]);
    }

    #[test]
    fn llama3_rope_scaling_is_read_from_either_place() {
        let scaling = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        });
        let expected = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original: 8192.0,
        });
        let mut json = base("llama");
        json["rope_scaling"] = scaling.clone();
        assert_eq!(config(json).unwrap().rope.scaling, expected);
        let mut json = base("llama");
        let mut parameters = scaling;
        parameters["rope_theta"] = 5e5.into();
        json["rope_parameters"] = parameters.clone();
        let c = config(json).unwrap();
        assert_eq!((c.rope.scaling, c.rope.theta), (expected, 5e5));
        parameters["high_freq_factor"] = 0.5.into();
        let mut json = base("llama");
        json["rope_parameters"] = parameters;
        assert!(
            config(json)
                .unwrap_err()
                .to_string()
                .contains("high_freq_factor")
        );
    }

    #[test]
    fn unsupported_settings_are_named() {
        let err = |json: Value| config(json).unwrap_err().to_string();
        assert!(err(base("mixtral")).contains("`mixtral` is not supported"));
        let mut json = base("phi3");
        json["rope_parameters"] =
            serde_json::json!({"rope_theta": 1e4, "partial_rotary_factor": 0.5});
        assert!(err(json).contains("partial_rotary_factor"));
        let mut json = base("llama");
        json["hidden_act"] = "relu".into();
        assert!(err(json).contains("`relu`"));
        let mut json = base("mistral");
        json["sliding_window"] = 3.into();
        let c = config(json).unwrap();
        assert_eq!((c.family, c.windows), (Family::Llama, vec![Some(3); 4]));
    }
}
