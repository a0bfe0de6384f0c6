//! The decoder as transformers saves it: `config.json`, `model.safetensors` (or its
//! shards with an index) and the tokenizer files; or, for a LoRA run, its PEFT adapter.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use xtuner_dataset::Tokenizer;
use xtuner_model::checkpoint::{SaveDtype, copy_side_files, save_safetensors};
use xtuner_model::decoder::{Decoder, DecoderConfig};

use super::{DEFAULT_SHARD_SIZE, peft, write_json};
use crate::Result;
use crate::config::TrainConfig;

/// The files a tokenizer is saved as, beside a model (`save_pretrained`'s).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Writes the trainable weights of a decoder run in Hugging Face formats: a PEFT
/// adapter directory for LoRA, a model directory (config + safetensors + tokenizer
/// files) for a full fine-tune.
///
/// # Errors
/// An unwritable directory.
pub fn write_decoder<B: Backend>(
    model: &Decoder<B>,
    decoder: &DecoderConfig,
    config: &TrainConfig,
    dir: &Path,
    dtype: SaveDtype,
    tokenizer: &Tokenizer,
) -> Result<Vec<PathBuf>> {
    match &config.lora {
        Some(l) => {
            let base = config.model.path().map(|p| p.display().to_string());
            peft::write_adapter(dir, l, model, decoder, Some("CAUSAL_LM"), base, dtype)
        }
        None => save_hf_model(model, decoder, tokenizer, dir, dtype, DEFAULT_SHARD_SIZE),
    }
}

/// The decoder as a Hugging Face model directory, as `save_pretrained` writes it:
/// `config.json`, the weights (sharded above `max_shard_size` bytes) and the tokenizer
/// files. Returns the weight files written.
///
/// # Errors
/// A file that cannot be written, or a tokenizer file that cannot be copied.
pub fn save_hf_model<B: Backend>(
    model: &Decoder<B>,
    decoder: &DecoderConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
    dtype: SaveDtype,
    max_shard_size: u64,
) -> Result<Vec<PathBuf>> {
    let bos = tokenizer.bos_ids().first().copied();
    let eos = tokenizer.eos_ids().first().copied();
    let mut json = decoder.to_hf_json(bos, eos);
    // The checkpoint's own config, with the dtype of the weights now written.
    if let Some(fields) = json.as_object_mut() {
        let name = match dtype {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::BF16 => "bfloat16",
        };
        for key in ["dtype", "torch_dtype"] {
            if let Some(value) = fields.get_mut(key) {
                *value = name.into();
            }
        }
    }
    write_json(&dir.join("config.json"), &json)?;
    let files = save_safetensors(
        dir,
        "model",
        model.to_hf_tensors(decoder)?,
        dtype,
        Some(max_shard_size),
    )?;
    copy_tokenizer_files(tokenizer, dir)?;
    Ok(files)
}

/// Copies the tokenizer files beside a saved model, as `save_pretrained` does.
///
/// # Errors
/// An unreadable or unwritable file.
pub fn copy_tokenizer_files(tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let source_dir = tokenizer.source().parent().unwrap_or(Path::new("."));
    Ok(copy_side_files(source_dir, &TOKENIZER_FILES, dir)?)
}
