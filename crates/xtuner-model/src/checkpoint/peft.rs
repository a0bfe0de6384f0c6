//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), applied to
//! a base checkpoint's weights as they are loaded: `W' = W + scale·B·A`, with
//! `scale = lora_alpha / r` (`lora_alpha / √r` with rsLoRA). Merging at load gives the
//! adapted model's logits for chat and evaluation at no per-token cost.
//!
//! Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `.lora_B.weight` (`[out, r]`), `<module>` being the base checkpoint's module name
//! (e.g. `model.layers.0.attention.wqkv`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::{Error, Result};

/// The fields of `adapter_config.json` that decide the arithmetic.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// `LORA` (other PEFT types are refused).
    #[serde(default)]
    pub peft_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// rsLoRA: scale by `alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weights stored transposed (GPT-2 Conv1D style): not supported here.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// DoRA: not supported here.
    #[serde(default)]
    pub use_dora: bool,
    /// Target module names (last name components or full names).
    #[serde(default)]
    pub target_modules: serde_json::Value,
}

/// A loaded LoRA adapter.
#[derive(Debug)]
pub struct PeftAdapter {
    /// The adapter's settings.
    pub config: AdapterConfig,
    dir: PathBuf,
    weights: Checkpoint,
    /// Module name → (A key, B key).
    modules: BTreeMap<String, (String, String)>,
}

const PREFIX: &str = "base_model.model.";

impl PeftAdapter {
    /// Opens an adapter directory.
    ///
    /// # Errors
    /// Missing files, a non-LoRA or unsupported (DoRA, fan_in_fan_out) adapter, or
    /// tensors that are not PEFT LoRA pairs.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::Io {
            path: config_path.clone(),
            source: e,
        })?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::BadAdapter {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let bad = |message: String| Error::BadAdapter {
            path: dir.to_path_buf(),
            message,
        };
        if config.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(bad(format!("peft_type {:?} is not LORA", config.peft_type)));
        }
        if config.r == 0 {
            return Err(bad("r is 0".into()));
        }
        if config.use_dora || config.fan_in_fan_out {
            return Err(bad(
                "DoRA and fan_in_fan_out adapters are not supported".into()
            ));
        }
        let file = dir.join("adapter_model.safetensors");
        if !file.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(Error::PickleNotSupported {
                path: dir.join("adapter_model.bin"),
            });
        }
        let weights = Checkpoint::open(&file)?;
        let mut halves: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
        for key in weights.keys() {
            let Some(rest) = key.strip_prefix(PREFIX) else {
                return Err(bad(format!(
                    "tensor `{key}` does not start with `{PREFIX}`"
                )));
            };
            let rest = rest.replace(".default.", ".");
            let (module, half) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m.to_string(), 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m.to_string(), 1)
            } else {
                return Err(bad(format!(
                    "tensor `{key}` is not a LoRA A/B weight (only LoRA weights are supported)"
                )));
            };
            let entry = halves.entry(module).or_default();
            if half == 0 {
                entry.0 = Some(key.clone())
            } else {
                entry.1 = Some(key.clone())
            }
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    modules.insert(module, (a, b));
                }
                _ => {
                    return Err(bad(format!(
                        "module `{module}` has only one of lora_A / lora_B"
                    )));
                }
            }
        }
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            weights,
            modules,
        })
    }

    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub fn scale(&self) -> f64 {
        let r = self.config.r as f64;
        if self.config.use_rslora {
            self.config.lora_alpha / r.sqrt()
        } else {
            self.config.lora_alpha / r
        }
    }

    /// The adapted module names.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `scale·B·A` for `module`, row-major `[out, in]`, or `None` if not adapted.
    ///
    /// # Errors
    /// A/B shapes that do not fit `[out, in]` with the adapter's rank.
    pub fn delta(&self, module: &str, out: usize, inp: usize) -> Result<Option<Vec<f32>>> {
        let Some((a, b)) = self.pair(module, out, inp)? else {
            return Ok(None);
        };
        let r = self.config.r;
        let scale = self.scale() as f32;
        let mut delta = vec![0f32; out * inp];
        for (o, row) in delta.chunks_exact_mut(inp).enumerate() {
            for k in 0..r {
                let coeff = scale * b[o * r + k];
                if coeff == 0.0 {
                    continue;
                }
                for (d, a) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                    *d += coeff * a;
                }
            }
        }
        Ok(Some(delta))
    }

    /// The raw pair for `module`: `A` as `[r, in]` and `B` as `[out, r]` row-major data
    /// (PEFT's layout), or `None` if the module is not adapted.
    ///
    /// # Errors
    /// Shapes that do not fit `[out, in]` with the adapter's rank.
    pub fn pair(
        &self,
        module: &str,
        out: usize,
        inp: usize,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let Some((a_key, b_key)) = self.modules.get(module) else {
            return Ok(None);
        };
        let r = self.config.r;
        for (key, expected) in [(a_key, vec![r, inp]), (b_key, vec![out, r])] {
            let Some(found) = self.weights.shape(key) else {
                return Err(Error::MissingTensor {
                    key: key.clone(),
                    path: self.dir.clone(),
                });
            };
            if found != expected {
                return Err(Error::ShapeMismatch {
                    key: key.clone(),
                    expected,
                    found,
                });
            }
        }
        let read = |key: &str| -> Result<Vec<f32>> {
            self.weights.mark_used(key);
            self.weights
                .float_data(key)?
                .to_vec::<f32>()
                .map_err(|e| Error::BadAdapter {
                    path: self.dir.clone(),
                    message: format!("{key}: {e:?}"),
                })
        };
        Ok(Some((read(a_key)?, read(b_key)?)))
    }

    /// Adapted modules that the base model never asked for (an adapter for another
    /// model shape or family).
    pub fn unused_modules(&self) -> Vec<String> {
        let unused = self.weights.unused_keys();
        self.modules
            .iter()
            .filter(|(_, (a, _))| unused.contains(a))
            .map(|(m, _)| m.clone())
            .collect()
    }
}
