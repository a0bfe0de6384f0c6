//! A reward model, as XTuner's `RewardModel` builds it: the decoder without its LM head
//! and a value head, one linear map from the hidden state to a score, read at the
//! reward token that ends each sequence.
//!
//! Its Hugging Face layouts are XTuner's export: for InternLM2, `InternLM2ForRewardModel`
//! (the head is `v_head.weight`, `reward_token_id` in `config.json`); for every other
//! family transformers' `...ForSequenceClassification` (the head is `score.weight`,
//! `num_labels` 1). The decoder's keys are the causal LM's (`model.*`), without the LM
//! head.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::checkpoint::keys::Family;
use crate::checkpoint::peft::PeftAdapter;
use crate::decoder::{Decoder, DecoderConfig, DecoderInput};
use crate::nn::linear::{Linear, LinearLayers, LinearSite};
use crate::nn::precision::in_dtype;
use crate::{Error, Result};

/// The decoder and its value head.
#[derive(Module, Debug)]
pub struct RewardModel<B: Backend> {
    /// The decoder (its LM head dropped).
    pub model: Decoder<B>,
    /// The value head, `[1, hidden]` as PyTorch stores it.
    pub v_head: Param<Tensor<B, 2>>,
}

/// The value head's key in a family's reward checkpoint.
pub fn head_key(family: Family) -> &'static str {
    match family {
        Family::InternLm2 => "v_head.weight",
        _ => "score.weight",
    }
}

impl<B: Backend> RewardModel<B> {
    /// A reward model from a causal LM: its LM head dropped, the value head zero (as
    /// XTuner initialises it).
    pub fn from_decoder(mut model: Decoder<B>, hidden: usize, device: &B::Device) -> Self {
        model.output = None;
        Self {
            model,
            v_head: Param::from_tensor(Tensor::zeros([1, hidden], device)),
        }
    }

    /// The score of every position.
    ///
    /// # Shapes
    /// `ids`: `[B, T]` → `[B, T]`.
    pub fn values(&self, ids: Tensor<B, 2, Int>, input: &DecoderInput<B>) -> Tensor<B, 2> {
        self.scores(self.model.hidden_states(self.model.embed(ids), input, None))
    }

    /// The value head on the decoder's final (normed) hidden states.
    ///
    /// # Shapes
    /// `hidden`: `[B, T, C]` → `[B, T]`.
    pub fn scores(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, t, c] = hidden.dims();
        let head = in_dtype(self.v_head.val(), hidden.dtype());
        hidden
            .reshape([b * t, c])
            .matmul(head.transpose())
            .reshape([b, t])
    }

    /// Loads a reward model directory as XTuner exports it (see the module docs),
    /// optionally with a PEFT adapter merged into the decoder.
    ///
    /// # Errors
    /// A bad config, no value head, or tensors the model does not use.
    pub fn load(
        dir: &Path,
        adapter: Option<&PeftAdapter>,
        device: &B::Device,
    ) -> Result<(Self, DecoderConfig)> {
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let model = Self::load_from(&ckpt, &config, adapter, device)?;
        Ok((model, config))
    }

    /// Loads from an opened checkpoint in the reward layout.
    ///
    /// # Errors
    /// See [`RewardModel::load`].
    pub fn load_from(
        ckpt: &Checkpoint,
        config: &DecoderConfig,
        adapter: Option<&PeftAdapter>,
        device: &B::Device,
    ) -> Result<Self> {
        let key = head_key(config.family);
        if !ckpt.contains(key) {
            return Err(Error::InvalidConfig {
                key: "v_head",
                message: format!("no `{key}`: not a reward model of this family"),
            });
        }
        let v_head = ckpt.tensor::<B, 2>(key, [1, config.hidden_size], device)?;
        // The decoder's keys without an LM head: read as a model with tied embeddings.
        let mut headless = config.clone();
        headless.tie_word_embeddings = true;
        let model = Decoder::load_from(ckpt, &headless, adapter, device)?;
        Ok(Self {
            model,
            v_head: Param::from_tensor(v_head),
        })
    }

    /// Every weight under its key in the reward layout of `config`'s family.
    ///
    /// # Errors
    /// Weights that cannot be read on the host.
    pub fn to_hf_tensors(&self, config: &DecoderConfig) -> Result<Vec<(String, TensorData)>> {
        let mut out = self.model.to_hf_tensors(config)?;
        out.push((
            head_key(config.family).to_string(),
            self.v_head.val().into_data(),
        ));
        Ok(out)
    }

    /// The `config.json` of the export: the decoder's, as XTuner's `to_hf` rewrites it.
    pub fn to_hf_json(
        config: &DecoderConfig,
        bos: Option<u32>,
        eos: Option<u32>,
        reward_token_id: Option<u32>,
    ) -> serde_json::Value {
        let mut json = config.to_hf_json(bos, eos);
        if let Some(fields) = json.as_object_mut() {
            match config.family {
                Family::InternLm2 => {
                    fields.insert(
                        "architectures".into(),
                        serde_json::json!(["InternLM2ForRewardModel"]),
                    );
                    if let Some(id) = reward_token_id {
                        fields.insert("reward_token_id".into(), id.into());
                    }
                    if let Some(map) = fields.get_mut("auto_map").and_then(|m| m.as_object_mut()) {
                        map.insert(
                            "AutoModel".into(),
                            "modeling_internlm2.InternLM2ForRewardModel".into(),
                        );
                        map.remove("AutoModelForCausalLM");
                    }
                }
                _ => {
                    let arch = fields
                        .get("architectures")
                        .and_then(|a| a.get(0))
                        .and_then(|a| a.as_str())
                        .map(|a| a.replace("ForCausalLM", "ForSequenceClassification"))
                        .unwrap_or_else(|| {
                            format!("{}ForSequenceClassification", family_class(config.family))
                        });
                    fields.insert("architectures".into(), serde_json::json!([arch]));
                    fields.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
                    fields.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
                }
            }
        }
        json
    }
}

/// The class-name prefix transformers uses for a family.
fn family_class(family: Family) -> &'static str {
    match family {
        Family::InternLm2 => "InternLM2",
        Family::Llama => "Llama",
        Family::Qwen2 => "Qwen2",
        Family::Qwen3 => "Qwen3",
        Family::Gemma => "Gemma",
        Family::Gemma2 => "Gemma2",
        Family::Phi3 => "Phi3",
    }
}

impl<B: Backend> LinearLayers<B> for RewardModel<B> {
    type Config = DecoderConfig;

    /// The decoder's layers (the value head is trained whole, as in XTuner).
    fn map_linear_layers<E>(
        mut self,
        config: &DecoderConfig,
        f: impl FnMut(&LinearSite, Linear<B>) -> std::result::Result<Linear<B>, E>,
    ) -> std::result::Result<Self, E> {
        self.model = self.model.map_linear_layers(config, f)?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::checkpoint::SaveDtype;
    use crate::checkpoint::save_safetensors;

    #[test]
    fn the_export_loads_back_with_the_same_scores() {
        let device = Default::default();
        for family in [Family::InternLm2, Family::Llama] {
            let mut c = DecoderConfig::preset("internlm2-tiny", 300).unwrap();
            c.family = family;
            let preset = family.model_type();
            let decoder = Decoder::<TestBackend>::random(&c, &device).unwrap();
            let mut model = RewardModel::from_decoder(decoder, c.hidden_size, &device);
            model.v_head = Param::from_tensor(Tensor::random(
                [1, c.hidden_size],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            ));
            let dir = tempfile::tempdir().unwrap();
            let json = RewardModel::<TestBackend>::to_hf_json(&c, Some(1), Some(2), Some(4));
            std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
            save_safetensors(
                dir.path(),
                "model",
                model.to_hf_tensors(&c).unwrap(),
                SaveDtype::F32,
                None,
            )
            .unwrap();
            let (back, _) = RewardModel::<TestBackend>::load(dir.path(), None, &device).unwrap();
            let ids = Tensor::<TestBackend, 2, Int>::from_data(
                TensorData::new(vec![1i64, 5, 9, 4], [1, 4]),
                &device,
            );
            let input = DecoderInput::causal(1, 4, &device);
            let a: Vec<f32> = model
                .values(ids.clone(), &input)
                .into_data()
                .to_vec()
                .unwrap();
            let b: Vec<f32> = back.values(ids, &input).into_data().to_vec().unwrap();
            assert_eq!(a, b, "{preset}");
            let keys: Vec<String> = model
                .to_hf_tensors(&c)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert!(keys.contains(&head_key(c.family).to_string()), "{preset}");
            assert!(
                !keys
                    .iter()
                    .any(|k| k.starts_with("lm_head") || k == "output.weight"),
                "{preset}: no LM head"
            );
        }
    }
}
