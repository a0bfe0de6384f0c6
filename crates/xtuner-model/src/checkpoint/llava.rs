//! transformers' `LlavaForConditionalGeneration` checkpoints, as XTuner's
//! `convert pth_to_hf --save-format huggingface` writes them: one directory whose
//! `config.json` nests the LLM's (`text_config`, a Llama) and the vision tower's
//! (`vision_config`, a CLIP), and whose weights sit under three prefixes:
//!
//! | part | key |
//! |---|---|
//! | LLM | `language_model.model.*`, `language_model.lm_head.weight` (absent when tied) |
//! | vision tower | `vision_tower.vision_model.*` |
//! | projector | `multi_modal_projector.linear_1.*`, `multi_modal_projector.linear_2.*` (XTuner's `model.0`, `model.2`) |
//!
//! These are XTuner's names; transformers 5 loads them (its `conversion_mapping` renames
//! them to its own module tree), and so do transformers 4 and vLLM.

use std::path::Path;

use burn::tensor::backend::Backend;
use serde_json::Value;

use super::Checkpoint;
use crate::clip_vit::{ClipVisionConfig, ClipVisionTower, HfClipVisionConfig};
use crate::decoder::{Decoder, DecoderConfig};
use crate::llava::Llava;
use crate::nn::activation::HiddenAct;
use crate::projector::{Projector, ProjectorConfig};
use crate::{Error, Result};

use super::keys::Family;

/// The `architectures` entry of the config.
pub const ARCHITECTURE: &str = "LlavaForConditionalGeneration";

/// The LLM's key (`model.layers.0...`, `lm_head.weight`) in the LLaVA file.
pub fn llm_key(key: &str) -> String {
    format!("language_model.{key}")
}

/// The vision tower's key (`vision_model.*`) in the LLaVA file.
pub fn tower_key(key: &str) -> String {
    format!("vision_tower.{key}")
}

/// The projector's key (XTuner's `model.0.weight`, ...) in the LLaVA file; `None` for a
/// layer transformers' two-layer projector does not have.
pub fn projector_key(key: &str) -> Option<String> {
    let (layer, rest) = key.strip_prefix("model.")?.split_once('.')?;
    let linear = match layer {
        "0" => "linear_1",
        "2" => "linear_2",
        _ => return None,
    };
    Some(format!("multi_modal_projector.{linear}.{rest}"))
}

/// The decoder in Llama's form (`LlamaForCausalLM` keys and config): Llama and Mistral
/// as they are; InternLM2 and Phi-3, whose fused q/k/v and gate/up are stored split
/// (the same model under other names). Families whose arithmetic Llama cannot express
/// are refused, naming what differs.
///
/// # Errors
/// [`Error::InvalidConfig`] naming the difference.
pub fn as_llama(config: &DecoderConfig) -> Result<DecoderConfig> {
    let refuse = |what: &str| {
        Err(Error::InvalidConfig {
            key: "model_type",
            message: format!(
                "a transformers LLaVA holds a Llama LLM; this {} model {what}",
                config.family.model_type()
            ),
        })
    };
    match config.family {
        Family::Llama | Family::InternLm2 | Family::Phi3 => {}
        Family::Qwen2 => return refuse("has q/k/v biases without an o_proj bias"),
        Family::Qwen3 => return refuse("normalises q and k per head"),
        Family::Gemma | Family::Gemma2 => return refuse("has Gemma's norms and embeddings"),
    }
    if config.windows.iter().any(Option::is_some) {
        return refuse("has sliding-window attention");
    }
    if config.qkv_bias != config.o_bias {
        return refuse("has biases on q/k/v or o_proj but not both");
    }
    if config.hidden_act != HiddenAct::Silu {
        return refuse("has a gate activation other than SiLU");
    }
    let mut llama = config.clone();
    llama.family = Family::Llama;
    llama.source = None;
    Ok(llama)
}

/// A Llama `config.json` (as `text_config`) for `config` in Llama's form, with RoPE's
/// settings both where transformers 4 reads them (`rope_theta`, `rope_scaling`) and
/// where transformers 5 writes them (`rope_parameters`).
pub fn llama_json(
    config: &DecoderConfig,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
) -> Value {
    let scaling = config.rope_scaling_json();
    let mut parameters = match &scaling {
        Value::Object(fields) => fields.clone(),
        _ => serde_json::Map::from_iter([("rope_type".to_string(), "default".into())]),
    };
    if let Some(kind) = parameters.remove("type") {
        parameters.insert("rope_type".into(), kind);
    }
    parameters.insert("rope_theta".into(), config.rope.theta.into());
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.rope.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope.theta,
        "rope_scaling": scaling,
        "rope_parameters": parameters,
        "attention_bias": config.qkv_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    })
}

/// What a transformers LLaVA's `config.json` says about the model.
#[derive(Debug, Clone)]
pub struct HfLlavaConfig {
    /// The LLM (`text_config`).
    pub text: DecoderConfig,
    /// The vision tower (`vision_config`).
    pub vision: ClipVisionConfig,
    /// The projector, two layers with GELU between.
    pub projector: ProjectorConfig,
    /// The token whose positions take the image features (`image_token_index`).
    pub image_token_index: u32,
    /// The vision tower's hidden state the features come from (`vision_feature_layer`).
    pub select_layer: i64,
}

impl HfLlavaConfig {
    /// Reads a LLaVA `config.json`.
    ///
    /// # Errors
    /// An unreadable file; another architecture; settings XTuner's LLaVA does not have
    /// (`vision_feature_select_strategy` other than `default`, several feature layers).
    pub fn from_file(path: &Path) -> Result<Self> {
        let json: Value = crate::error::read_json_file(path)?;
        Self::from_json(&json).map_err(|e| crate::error::in_file(path, e))
    }

    fn from_json(json: &Value) -> Result<Self> {
        let invalid = |key: &'static str, message: String| Error::InvalidConfig { key, message };
        if json["model_type"] != "llava" {
            return Err(invalid(
                "model_type",
                format!("{} is not a LLaVA (`llava`)", json["model_type"]),
            ));
        }
        let text = DecoderConfig::from_json(json["text_config"].clone())?;
        let hf: HfClipVisionConfig = serde_json::from_value(json["vision_config"].clone())
            .map_err(|e| invalid("vision_config", e.to_string()))?;
        let vision = ClipVisionConfig::try_from(hf)?;
        let strategy = json["vision_feature_select_strategy"]
            .as_str()
            .unwrap_or("default");
        if strategy != "default" {
            return Err(invalid(
                "vision_feature_select_strategy",
                format!("`{strategy}`: only `default` (the CLS token dropped) is supported"),
            ));
        }
        let select_layer = match &json["vision_feature_layer"] {
            Value::Null => -2,
            v => v.as_i64().ok_or_else(|| {
                invalid(
                    "vision_feature_layer",
                    format!("{v}: one layer (an integer) is supported"),
                )
            })?,
        };
        let hidden_act: HiddenAct = match &json["projector_hidden_act"] {
            Value::Null => HiddenAct::Gelu,
            v => serde_json::from_value(v.clone())
                .map_err(|e| invalid("projector_hidden_act", e.to_string()))?,
        };
        let projector = ProjectorConfig {
            visual_hidden_size: vision.hidden_size,
            llm_hidden_size: text.hidden_size,
            depth: 2,
            hidden_act,
            bias: json["multimodal_projector_bias"].as_bool().unwrap_or(true),
        };
        let image_token_index = json["image_token_index"]
            .as_u64()
            .or_else(|| json["image_token_id"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| invalid("image_token_index", "missing".into()))?;
        Ok(Self {
            text,
            vision,
            projector,
            image_token_index,
            select_layer,
        })
    }
}

impl<B: Backend> Llava<B> {
    /// Loads a transformers LLaVA directory (`config.json` + safetensors) in XTuner's
    /// layout of it (see the module's table).
    ///
    /// # Errors
    /// As [`HfLlavaConfig::from_file`]; a missing or misshapen tensor, named; tensors
    /// that belong to no part ([`Error::UnexpectedTensors`]).
    pub fn load_hf(dir: &Path, device: &B::Device) -> Result<(Self, HfLlavaConfig)> {
        let config = HfLlavaConfig::from_file(&dir.join("config.json"))?;
        let view = |prefix: &'static str| -> Result<Checkpoint> {
            Ok(Checkpoint::open(dir)?.renamed(|key| key.strip_prefix(prefix).map(str::to_string)))
        };
        let whole = Checkpoint::open(dir)?;
        let strays: Vec<String> = whole
            .keys()
            .into_iter()
            .filter(|k| {
                !["language_model.", "vision_tower.", "multi_modal_projector."]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .collect();
        if !strays.is_empty() {
            return Err(Error::UnexpectedTensors { keys: strays });
        }
        let llm = Decoder::load_from(&view("language_model.")?, &config.text, None, device)?;
        let visual_encoder =
            ClipVisionTower::load_from(&view("vision_tower.")?, &config.vision, device)?;
        let projector_ckpt = whole.renamed(|key| {
            let rest = key.strip_prefix("multi_modal_projector.")?;
            let (linear, field) = rest.split_once('.')?;
            let layer = match linear {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return Some(key.to_string()),
            };
            Some(format!("model.{layer}.{field}"))
        });
        let projector = Projector::load_from(&projector_ckpt, "", &config.projector, device)?;
        let unused = projector_ckpt.unused_keys();
        if !unused.is_empty() {
            return Err(Error::UnexpectedTensors { keys: unused });
        }
        Ok((
            Self {
                llm,
                visual_encoder,
                projector,
            },
            config,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_xtuner_mapping() {
        assert_eq!(
            llm_key("model.layers.0.self_attn.q_proj.weight"),
            "language_model.model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(llm_key("lm_head.weight"), "language_model.lm_head.weight");
        assert_eq!(
            tower_key("vision_model.pre_layrnorm.bias"),
            "vision_tower.vision_model.pre_layrnorm.bias"
        );
        assert_eq!(
            projector_key("model.0.weight").as_deref(),
            Some("multi_modal_projector.linear_1.weight")
        );
        assert_eq!(
            projector_key("model.2.bias").as_deref(),
            Some("multi_modal_projector.linear_2.bias")
        );
        assert_eq!(projector_key("model.4.bias"), None);
    }

    fn family_config(name: &str) -> DecoderConfig {
        DecoderConfig::from_file(&crate::test_support::fixture(name).join("config.json")).unwrap()
    }

    /// InternLM2 and Phi-3 are Llamas under other names; Qwen2's q/k/v biases, Qwen3's
    /// q/k norms and Gemma's norms are not, and say so.
    #[test]
    fn llama_form_is_given_where_it_is_the_same_model() {
        for name in ["internlm2-tiny", "llama-tiny", "phi3-tiny"] {
            let config = family_config(name);
            let llama = as_llama(&config).unwrap();
            assert_eq!(llama.family, Family::Llama);
            let json = llama_json(&llama, Some(1), Some(2), None);
            assert_eq!(json["model_type"], "llama");
            assert_eq!(json["rope_parameters"]["rope_theta"], json["rope_theta"]);
            assert_eq!(
                DecoderConfig::from_json(json).unwrap().rope,
                config.rope,
                "{name}"
            );
        }
        for (name, why) in [
            ("qwen2-tiny", "biases"),
            ("qwen3-tiny", "per head"),
            ("gemma-tiny", "Gemma"),
        ] {
            let e = as_llama(&family_config(name)).unwrap_err().to_string();
            assert!(e.contains(why), "{name}: {e}");
        }
    }
}
