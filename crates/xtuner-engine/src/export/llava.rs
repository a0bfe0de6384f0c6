//! XTuner's LLaVA layout, for checkpoints and `convert pth_to_hf`: `projector/`
//! (always), `llm_adapter/` (PEFT) or the full LLM at the top, and
//! `visual_encoder_adapter/` (PEFT) or `visual_encoder/` (full CLIP), each only when
//! that part was trained.

use std::path::Path;

use burn::tensor::backend::Backend;
use xtuner_dataset::Tokenizer;
use xtuner_model::checkpoint::{SaveDtype, copy_side_files, save_safetensors};
use xtuner_model::decoder::DecoderConfig;
use xtuner_model::llava::Llava;
use xtuner_model::projector::ProjectorConfig;

use super::{create_dir, hf, peft, write_json};
use crate::Result;
use crate::config::{LlavaConfig, TrainConfig};

/// Writes the trained parts of `model` into `dir` in XTuner's LLaVA layout.
///
/// # Errors
/// An unwritable directory.
pub fn write_llava<B: Backend>(
    model: &Llava<B>,
    config: &TrainConfig,
    llava: &LlavaConfig,
    decoder: &DecoderConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    let projector_dir = dir.join("projector");
    create_dir(&projector_dir)?;
    let projector_config = ProjectorConfig {
        visual_hidden_size: model.visual_encoder.embeddings.patch_embedding.dims()[1],
        llm_hidden_size: decoder.hidden_size,
        depth: model.projector.model.len(),
        hidden_act: model.projector.activation,
        bias: model
            .projector
            .model
            .first()
            .is_some_and(|l| l.bias.is_some()),
    };
    write_json(
        &projector_dir.join("config.json"),
        &projector_config.to_json(),
    )?;
    save_safetensors(
        &projector_dir,
        "model",
        model.projector.to_hf_tensors(),
        dtype,
        None,
    )?;
    if config.lora.is_some() {
        let llm_dir = dir.join("llm_adapter");
        create_dir(&llm_dir)?;
        hf::write_decoder(&model.llm, decoder, config, &llm_dir, dtype, tokenizer)?;
    } else if !llava.freeze_llm {
        hf::write_decoder(&model.llm, decoder, config, dir, dtype, tokenizer)?;
    }
    let source = &llava.visual_encoder;
    if let Some(l) = &llava.visual_encoder_lora {
        peft::write_adapter(
            &dir.join("visual_encoder_adapter"),
            l,
            &model.visual_encoder,
            &(),
            None,
            Some(source.display().to_string()),
            dtype,
        )?;
    } else if !llava.freeze_visual_encoder {
        let tower_dir = dir.join("visual_encoder");
        create_dir(&tower_dir)?;
        save_safetensors(
            &tower_dir,
            "model",
            model.visual_encoder.to_hf_tensors(),
            dtype,
            None,
        )?;
        copy_side_files(
            source,
            &["config.json", "preprocessor_config.json"],
            &tower_dir,
        )?;
    }
    Ok(())
}
