//! LLaVA for the rest of the world, XTuner's two other `--save-format`s:
//!
//! - `huggingface`: a transformers `LlavaForConditionalGeneration` and its
//!   `LlavaProcessor` (loaded by transformers and vLLM). Adapters merged; the LLM in
//!   Llama's form; `<image>` and `<pad>` added to the tokenizer, the embeddings (and an
//!   untied LM head) grown to a multiple of 64 rows, the new rows drawn from a normal
//!   with the old rows' mean and 1e-5 times their covariance (XTuner's
//!   `to_huggingface_llava`).
//! - `official`: the original LLaVA repository's `LlavaLlamaForCausalLM`
//!   (`model.mm_projector.{0,2}`, `mm_*` settings in the config; the vision tower's
//!   weights only when they were trained, else it is loaded from `mm_vision_tower`).

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{Value, json};
use xtuner_dataset::Tokenizer;
use xtuner_model::checkpoint::llava::{
    ARCHITECTURE, as_llama, llama_json, llm_key, projector_key, tower_key,
};
use xtuner_model::checkpoint::{SaveDtype, copy_side_files, save_safetensors};
use xtuner_model::decoder::DecoderConfig;
use xtuner_model::llava::Llava;
use xtuner_model::nn::precision::host_vec;

use super::hf::TOKENIZER_FILES;
use super::write_json;
use crate::config::{LlavaConfig, TrainConfig};
use crate::{Error, Result, lora};

/// The image token of LLaVA's prompts.
pub const IMAGE_TOKEN: &str = "<image>";
/// The padding token the export adds.
pub const PAD_TOKEN: &str = "<pad>";
/// Embedding rows are grown to a multiple of this (XTuner's `pad_shape`).
const PAD_ROWS_TO: usize = 64;

/// The model with every adapter folded into its weights.
fn merged<B: Backend>(model: &Llava<B>, decoder: &DecoderConfig) -> Llava<B> {
    Llava {
        llm: lora::merge(model.llm.clone(), decoder),
        visual_encoder: lora::merge(model.visual_encoder.clone(), &()),
        projector: model.projector.clone(),
    }
}

/// A LLaVA run's model and what describes it, to export.
pub struct LlavaExport<'a, B: Backend> {
    /// The model as trained (adapters attached).
    pub model: &'a Llava<B>,
    /// The run's config.
    pub config: &'a TrainConfig,
    /// Its `[llava]` section.
    pub llava: &'a LlavaConfig,
    /// The LLM's architecture.
    pub decoder: &'a DecoderConfig,
    /// The LLM's tokenizer.
    pub tokenizer: &'a Tokenizer,
}

impl<B: Backend> LlavaExport<'_, B> {
    /// `convert pth_to_hf --save-format huggingface`: see the module's doc.
    ///
    /// # Errors
    /// An LLM that is not a Llama in another form ([`as_llama`]), a projector that is not
    /// two layers, an unreadable tokenizer or vision-tower config, an unwritable `dir`.
    pub fn huggingface(&self, dir: &Path, dtype: SaveDtype, max_shard_size: u64) -> Result<()> {
        let Self {
            model,
            config,
            llava,
            decoder,
            tokenizer,
        } = *self;
        let llama = as_llama(decoder).map_err(|e| setting("llava.save_format", e))?;
        if model.projector.model.len() != 2 {
            return Err(Error::Setting {
                key: "llava.projector_depth".into(),
                message: format!(
                    "{}: transformers' LLaVA projector has two layers",
                    model.projector.model.len()
                ),
            });
        }
        let model = merged(model, decoder);
        let (image_id, pad_id) = write_tokenizer(tokenizer, dir)?;

        // The LLM, its vocabulary grown to hold the new tokens.
        let needed = (image_id.max(pad_id) as usize + 1).max(llama.vocab_size);
        let vocab = if needed > llama.vocab_size {
            needed.div_ceil(PAD_ROWS_TO) * PAD_ROWS_TO
        } else {
            llama.vocab_size
        };
        let mut tensors = model.llm.to_hf_tensors(&llama)?;
        if vocab > llama.vocab_size {
            grow_vocabulary::<B>(&mut tensors, llama.vocab_size, vocab, config.train.seed)?;
        }
        let mut text = llama.clone();
        text.vocab_size = vocab;
        let mut all: Vec<(String, TensorData)> =
            tensors.into_iter().map(|(k, v)| (llm_key(&k), v)).collect();
        all.extend(
            model
                .visual_encoder
                .to_hf_tensors()
                .into_iter()
                .map(|(k, v)| (tower_key(&k), v)),
        );
        for (key, value) in model.projector.to_hf_tensors() {
            let key = projector_key(&key).ok_or_else(|| Error::Setting {
                key: "llava.projector_depth".into(),
                message: format!("no transformers name for the projector's `{key}`"),
            })?;
            all.push((key, value));
        }

        let bos = tokenizer.bos_ids().first().copied();
        let eos = tokenizer.eos_ids().first().copied();
        let tower = tower_config(&llava.visual_encoder)?;
        let patches = {
            let image = tower["image_size"].as_u64().unwrap_or(224);
            let patch = tower["patch_size"].as_u64().unwrap_or(32).max(1);
            (image / patch) * (image / patch)
        };
        write_json(
            &dir.join("config.json"),
            &json!({
                "architectures": [ARCHITECTURE],
                "model_type": "llava",
                "text_config": llama_json(&text, bos, eos, Some(pad_id)),
                "vision_config": tower,
                "image_token_index": image_id,
                "image_seq_length": patches,
                "pad_token_id": pad_id,
                "projector_hidden_act": model.projector.activation,
                "multimodal_projector_bias": model.projector.model[0].bias.is_some(),
                "vision_feature_layer": llava.visual_select_layer,
                "vision_feature_select_strategy": "default",
                "tie_word_embeddings": text.tie_word_embeddings,
                "dtype": dtype_name(dtype),
            }),
        )?;
        write_json(
            &dir.join("generation_config.json"),
            &json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad_id}),
        )?;
        save_safetensors(dir, "model", all, dtype, Some(max_shard_size))?;

        // The processor: the image processor's settings, and how prompts are expanded
        // (one `<image>` becomes one token per patch: CLIP's CLS token is dropped).
        let processor = image_processor(&llava.visual_encoder)?;
        write_json(&dir.join("preprocessor_config.json"), &processor)?;
        write_json(
            &dir.join("processor_config.json"),
            &json!({
                "processor_class": "LlavaProcessor",
                "image_processor": processor,
                "image_token": IMAGE_TOKEN,
                "patch_size": tower["patch_size"],
                "num_additional_image_tokens": 1,
                "vision_feature_select_strategy": "default",
            }),
        )
    }

    /// `convert pth_to_hf --save-format official`: see the module's doc.
    ///
    /// # Errors
    /// As [`LlavaExport::huggingface`].
    pub fn official(&self, dir: &Path, dtype: SaveDtype, max_shard_size: u64) -> Result<()> {
        let Self {
            model,
            llava,
            decoder,
            tokenizer,
            ..
        } = *self;
        let llama = as_llama(decoder).map_err(|e| setting("llava.save_format", e))?;
        let model = merged(model, decoder);
        let mut all = model.llm.to_hf_tensors(&llama)?;
        for (key, value) in model.projector.to_hf_tensors() {
            all.push((
                format!("model.mm_projector.{}", &key["model.".len()..]),
                value,
            ));
        }
        let tower_trained = llava.visual_encoder_lora.is_some() || !llava.freeze_visual_encoder;
        if tower_trained {
            all.extend(
                model
                    .visual_encoder
                    .to_hf_tensors()
                    .into_iter()
                    .map(|(k, v)| (format!("model.vision_tower.vision_tower.{k}"), v)),
            );
        }
        let bos = tokenizer.bos_ids().first().copied();
        let eos = tokenizer.eos_ids().first().copied();
        let mut config = llama_json(&llama, bos, eos, None);
        let tower = tower_config(&llava.visual_encoder)?;
        if let Some(fields) = config.as_object_mut() {
            let depth = model.projector.model.len();
            for (key, value) in [
                ("architectures", json!(["LlavaLlamaForCausalLM"])),
                ("model_type", json!("llava")),
                ("image_aspect_ratio", json!("pad")),
                ("mm_hidden_size", tower["hidden_size"].clone()),
                ("mm_projector_type", json!(format!("mlp{depth}x_gelu"))),
                ("mm_use_im_patch_token", json!(false)),
                ("mm_use_im_start_end", json!(false)),
                ("mm_vision_select_feature", json!("patch")),
                ("mm_vision_select_layer", json!(llava.visual_select_layer)),
                (
                    "mm_vision_tower",
                    json!(llava.visual_encoder.display().to_string()),
                ),
                ("unfreeze_mm_vision_tower", json!(tower_trained)),
                ("use_mm_proj", json!(true)),
                ("dtype", json!(dtype_name(dtype))),
            ] {
                fields.insert(key.to_string(), value);
            }
        }
        write_json(&dir.join("config.json"), &config)?;
        save_safetensors(dir, "model", all, dtype, Some(max_shard_size))?;
        write_json(
            &dir.join("preprocessor_config.json"),
            &image_processor(&llava.visual_encoder)?,
        )?;
        let source = tokenizer.source().parent().unwrap_or(Path::new("."));
        Ok(copy_side_files(source, &TOKENIZER_FILES, dir)?)
    }
}

/// The config's name for a weight dtype.
fn dtype_name(dtype: SaveDtype) -> &'static str {
    match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::F16 => "float16",
        SaveDtype::BF16 => "bfloat16",
    }
}

/// A model error as a setting of the run's config.
fn setting(key: &str, e: xtuner_model::Error) -> Error {
    Error::Setting {
        key: key.into(),
        message: e.to_string(),
    }
}

/// Reads a JSON file of the vision tower's directory.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The vision tower's `CLIPVisionConfig` (a whole CLIP's `vision_config`), as a LLaVA's
/// `vision_config`.
fn tower_config(dir: &Path) -> Result<Value> {
    let mut json = read_json(&dir.join("config.json"))?;
    let mut tower = match json.get_mut("vision_config") {
        Some(v) => v.take(),
        None => json,
    };
    if let Some(fields) = tower.as_object_mut() {
        for key in ["architectures", "torch_dtype", "dtype", "_name_or_path"] {
            fields.remove(key);
        }
        fields.insert("model_type".into(), "clip_vision_model".into());
    }
    Ok(tower)
}

/// The vision tower's image processor settings.
fn image_processor(dir: &Path) -> Result<Value> {
    read_json(&dir.join("preprocessor_config.json"))
}

/// Writes the tokenizer files with `<image>` and `<pad>` as special tokens (at their
/// ids where the vocabulary has them, else after it), as `add_tokens` and
/// `add_special_tokens` save them. Returns their ids.
///
/// # Errors
/// An unreadable or unwritable tokenizer file.
fn write_tokenizer(tokenizer: &Tokenizer, dir: &Path) -> Result<(u32, u32)> {
    let mut next = u32::try_from(tokenizer.vocab_size()).unwrap_or(u32::MAX);
    let mut id_of = |token: &str| {
        tokenizer.token_to_id(token).unwrap_or_else(|| {
            next += 1;
            next - 1
        })
    };
    let (image_id, pad_id) = (id_of(IMAGE_TOKEN), id_of(PAD_TOKEN));
    let added = |id: u32, content: &str| {
        json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        })
    };
    let source = tokenizer.source().parent().unwrap_or(Path::new("."));
    let others: Vec<&str> = TOKENIZER_FILES
        .iter()
        .copied()
        .filter(|f| !matches!(*f, "tokenizer.json" | "tokenizer_config.json"))
        .collect();
    copy_side_files(source, &others, dir)?;

    let fast = source.join("tokenizer.json");
    let has_fast = fast.is_file();
    if has_fast {
        let mut json = read_json(&fast)?;
        if let Some(list) = json["added_tokens"].as_array_mut() {
            for (id, token) in [(image_id, IMAGE_TOKEN), (pad_id, PAD_TOKEN)] {
                if !list.iter().any(|t| t["content"] == token) {
                    list.push(added(id, token));
                }
            }
        }
        write_json(&dir.join("tokenizer.json"), &json)?;
    }
    let config_path = source.join("tokenizer_config.json");
    let mut config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        json!({})
    };
    if let Some(fields) = config.as_object_mut() {
        fields.insert("pad_token".into(), PAD_TOKEN.into());
        fields.insert("processor_class".into(), "LlavaProcessor".into());
        // The LLM is a Llama now, and the export carries no remote code: a tokenizer
        // class of the checkpoint's own (InternLM2's, through `auto_map`) becomes
        // Llama's, which reads the same tokenizer.model or tokenizer.json (XTuner
        // loads it as LlamaTokenizerFast for this export).
        let remote = fields
            .remove("auto_map")
            .is_some_and(|m| m.get("AutoTokenizer").is_some());
        let own_class = fields
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .is_some_and(|c| c.starts_with("InternLM"));
        if remote || own_class {
            fields.insert("tokenizer_class".into(), "LlamaTokenizer".into());
        }
        // Without tokenizer.json, the added tokens live here (as a slow tokenizer
        // saves them); with it, they are kept here too where the file lists them.
        if !has_fast || fields.contains_key("added_tokens_decoder") {
            let decoder = fields
                .entry("added_tokens_decoder")
                .or_insert_with(|| json!({}));
            if let Some(map) = decoder.as_object_mut() {
                for (id, token) in [(image_id, IMAGE_TOKEN), (pad_id, PAD_TOKEN)] {
                    let mut entry = added(id, token);
                    if let Some(e) = entry.as_object_mut() {
                        e.remove("id");
                    }
                    map.entry(id.to_string()).or_insert(entry);
                }
            }
        }
    }
    write_json(&dir.join("tokenizer_config.json"), &config)?;
    Ok((image_id, pad_id))
}

/// Grows `model.embed_tokens.weight` (and an untied `lm_head.weight`) from `old` to
/// `new` rows, each new row a draw from N(μ, 1e-5·Σ), μ and Σ the mean and covariance
/// of the old embedding rows (XTuner's `to_huggingface_llava`). A draw is
/// `μ + √(1e-5/n)·gᵀ(E − μ)` with g ~ N(0, I_n): its covariance is exactly 1e-5·Σ,
/// with no factorisation of Σ (singular whenever n < hidden).
fn grow_vocabulary<B: Backend>(
    tensors: &mut [(String, TensorData)],
    old: usize,
    new: usize,
    seed: u64,
) -> Result<()> {
    let device = Default::default();
    let embed = tensors
        .iter()
        .find(|(k, _)| k == "model.embed_tokens.weight")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| Error::Setting {
            key: "model".into(),
            message: "the LLM has no model.embed_tokens.weight".into(),
        })?;
    let hidden = embed.shape[1];
    let e = Tensor::<B, 2>::from_data(
        TensorData::new(host_vec::<f32>(embed)?, [old, hidden]),
        &device,
    );
    let mean = e.clone().mean_dim(0);
    let centred = e - mean.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = new - old;
    let scale = (1e-5 / old as f64).sqrt();
    for (key, value) in tensors.iter_mut() {
        if key != "model.embed_tokens.weight" && key != "lm_head.weight" {
            continue;
        }
        let g: Vec<f32> = (0..rows * old)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let g = Tensor::<B, 2>::from_data(TensorData::new(g, [rows, old]), &device);
        let drawn = g.matmul(centred.clone()).mul_scalar(scale) + mean.clone();
        let mut values: Vec<f32> = host_vec(value.clone())?;
        values.extend(host_vec::<f32>(drawn.into_data())?);
        *value = TensorData::new(values, [new, hidden]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    /// InternLM2's SentencePiece tokenizer (no tokenizer.json): the added tokens go to
    /// `added_tokens_decoder` after the vocabulary, and the class becomes Llama's
    /// (transformers 5 then reads `<image>` = 600 and `<pad>` = 601 from these files).
    #[test]
    fn a_sentencepiece_tokenizer_gets_its_tokens_in_its_config() {
        let tokenizer =
            Tokenizer::from_path(&crate::test_support::fixture("spm-bpe-tiny")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (image, pad) = write_tokenizer(&tokenizer, dir.path()).unwrap();
        assert_eq!((image, pad), (600, 601));
        assert!(dir.path().join("tokenizer.model").is_file());
        assert!(!dir.path().join("tokenizer.json").exists());
        let config = read_json(&dir.path().join("tokenizer_config.json")).unwrap();
        assert_eq!(config["tokenizer_class"], "LlamaTokenizer");
        assert_eq!(config["pad_token"], PAD_TOKEN);
        assert_eq!(
            config["added_tokens_decoder"]["600"]["content"],
            IMAGE_TOKEN
        );
        assert_eq!(config["added_tokens_decoder"]["601"]["content"], PAD_TOKEN);
        assert_eq!(config["added_tokens_decoder"]["601"]["special"], true);
    }

    /// New rows sit at the old rows' mean, spread by 1e-5 of their covariance: drawn
    /// (no two alike), seeded, the old rows kept.
    #[test]
    fn new_embedding_rows_are_drawn_around_the_old_rows_mean() {
        let (old, new, hidden) = (50, 64, 8);
        let values: Vec<f32> = (0..old * hidden)
            .map(|i| ((i * 37) % 17) as f32 / 4.0 - 2.0)
            .collect();
        let embed = TensorData::new(values.clone(), [old, hidden]);
        let grown = |seed| {
            let mut tensors = vec![
                ("model.embed_tokens.weight".to_string(), embed.clone()),
                (
                    "model.norm.weight".to_string(),
                    TensorData::new(vec![1.0f32; hidden], [hidden]),
                ),
            ];
            grow_vocabulary::<B>(&mut tensors, old, new, seed).unwrap();
            assert_eq!(tensors[1].1.shape.to_vec(), vec![hidden]);
            tensors.remove(0).1
        };
        let a = grown(7);
        assert_eq!(a.shape.to_vec(), vec![new, hidden]);
        let a: Vec<f32> = a.to_vec().unwrap();
        assert_eq!(&a[..old * hidden], &values[..]);
        let mean: Vec<f32> = (0..hidden)
            .map(|j| (0..old).map(|i| values[i * hidden + j]).sum::<f32>() / old as f32)
            .collect();
        // The old rows spread by about 1.2 per column; 1e-5 of the covariance gives
        // draws within a few 1e-3 of the mean.
        for row in a[old * hidden..].chunks(hidden) {
            for (x, m) in row.iter().zip(&mean) {
                assert!((x - m).abs() < 0.02, "{x} vs mean {m}");
            }
        }
        let rows: Vec<&[f32]> = a[old * hidden..].chunks(hidden).collect();
        assert!(rows.windows(2).all(|w| w[0] != w[1]));
        let b: Vec<f32> = grown(7).to_vec().unwrap();
        assert_eq!(a, b);
        let c: Vec<f32> = grown(8).to_vec().unwrap();
        assert_ne!(a, c);
    }
}
