//! What a run writes for the Hugging Face world, in the layouts transformers, PEFT and
//! XTuner write: a model directory ([`hf`]), a PEFT adapter ([`peft`]) and XTuner's
//! LLaVA layout ([`llava`]) and its transformers and original-LLaVA layouts ([`llava_hf`]). Checkpoints and `convert` both write through here.

pub mod hf;
pub mod llava;
pub mod llava_hf;
pub mod peft;

use std::path::Path;

use serde::Serialize;

use crate::{Error, Result};

/// transformers' default `max_shard_size` for the checkpoints a run writes.
pub const DEFAULT_SHARD_SIZE: u64 = 2_000_000_000;

/// Writes a JSON file, pretty-printed with its keys sorted (as transformers writes
/// its JSON files, `sort_keys=True`), whatever order the value's fields have.
///
/// # Errors
/// A value that does not serialize, or a file that cannot be written; both name it.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let failed = |e: serde_json::Error| Error::Serialize {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // A `Value`'s objects are sorted maps.
    let sorted = serde_json::to_value(value).map_err(failed)?;
    let text = serde_json::to_string_pretty(&sorted).map_err(failed)?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes a TOML file (the resolved config beside a run or an export).
///
/// # Errors
/// As [`write_json`].
pub fn write_toml(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = toml::to_string_pretty(value).map_err(|e| Error::Serialize {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Creates `dir` and its parents.
///
/// # Errors
/// An unwritable location, naming it.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON files come out with sorted keys, as transformers writes them, whatever
    /// order a struct declares its fields in.
    #[test]
    fn json_files_have_sorted_keys() {
        #[derive(Serialize)]
        struct Unsorted {
            model_type: &'static str,
            architectures: [&'static str; 1],
            bias: bool,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let value = Unsorted {
            model_type: "projector",
            architectures: ["ProjectorModel"],
            bias: true,
        };
        write_json(&path, &value).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let at = |key: &str| text.find(key).unwrap();
        assert!(
            at("architectures") < at("bias") && at("bias") < at("model_type"),
            "{text}"
        );
    }
}
