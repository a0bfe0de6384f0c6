//! The PEFT adapter layout: `adapter_config.json` and `adapter_model.safetensors` with
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`,
//! the fused q/k/v rows back in checkpoint order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use xtuner_model::checkpoint::{SaveDtype, save_safetensors};
use xtuner_model::nn::linear::LinearLayers;
use xtuner_model::nn::precision::host_vec;

use super::{create_dir, write_json};
use crate::config::LoraConfig;
use crate::lora::resolve_targets;
use crate::{Error, Result};

/// The adapters as PEFT tensors (`base_model.model.<module>.lora_A.weight` `[r, in]`,
/// `lora_B.weight` `[out, r]`), ready for `adapter_model.safetensors`.
///
/// # Errors
/// An adapter whose values cannot be read back.
pub fn peft_tensors<B: Backend, M: LinearLayers<B>>(
    model: &M,
    config: &M::Config,
) -> Result<Vec<(String, TensorData)>> {
    let mut out = Vec::new();
    for (site, linear) in model.linear_layers(config) {
        let Some(lora) = &linear.lora else { continue };
        for part in &lora.parts {
            let Some(module) = site.modules.iter().find(|m| m.offset == part.offset) else {
                return Err(Error::Model(xtuner_model::Error::InvalidInput {
                    name: "lora",
                    message: format!("an adapter at column {} of {site:?}", part.offset),
                }));
            };
            let width = module.width;
            let r = part.lora_a.dims()[1];
            let a = part.lora_a.val().transpose().into_data(); // [r, in]
            let b_ours: Vec<f32> = host_vec(part.lora_b.val().transpose().into_data())?; // [out, r]
            let b = match &site.out_rows {
                Some(order) => {
                    let mut b = vec![0f32; width * r];
                    for (ours, &theirs) in order.iter().enumerate() {
                        b[theirs * r..(theirs + 1) * r]
                            .copy_from_slice(&b_ours[ours * r..(ours + 1) * r]);
                    }
                    b
                }
                None => b_ours,
            };
            let prefix = format!("base_model.model.{}", module.module);
            out.push((format!("{prefix}.lora_A.weight"), a));
            out.push((
                format!("{prefix}.lora_B.weight"),
                TensorData::new(b, [width, r]),
            ));
        }
    }
    Ok(out)
}

/// `adapter_config.json` of a PEFT LoRA adapter with these settings.
pub fn adapter_config_json(
    lora: &LoraConfig,
    targets: &BTreeSet<String>,
    task_type: Option<&str>,
    base: Option<String>,
) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "target_modules": targets,
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "base_model_name_or_path": base,
    })
}

/// Writes a PEFT adapter directory: `adapter_config.json` and
/// `adapter_model.safetensors` with the model's adapters.
///
/// # Errors
/// An unwritable directory.
pub fn write_adapter<B: Backend, M: LinearLayers<B>>(
    dir: &Path,
    lora: &LoraConfig,
    model: &M,
    config: &M::Config,
    task_type: Option<&str>,
    base: Option<String>,
    dtype: SaveDtype,
) -> Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let targets = resolve_targets(model, config, &lora.target_modules)?;
    write_json(
        &dir.join("adapter_config.json"),
        &adapter_config_json(lora, &targets, task_type, base),
    )?;
    Ok(save_safetensors(
        dir,
        "adapter_model",
        peft_tensors(model, config)?,
        dtype,
        None,
    )?)
}
