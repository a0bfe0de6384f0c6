//! `list-cfg`, `copy-cfg`, `list-dataset-format`.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use xtuner_dataset::format::DataFormat;

use crate::configs::{BUILTIN, builtin};

/// Prints the built-in config names containing `pattern` (case-insensitive).
pub fn list_cfg(pattern: Option<&str>) {
    let pattern = pattern.map(str::to_lowercase);
    println!("==========================CONFIGS===========================");
    for (name, _) in BUILTIN {
        if pattern
            .as_ref()
            .is_none_or(|p| name.to_lowercase().contains(p))
        {
            println!("{name}");
        }
    }
    println!("=============================================================");
}

/// Writes a built-in config to `dir/<name>_copy.toml`.
pub fn copy_cfg(name: &str, dir: &Path) -> Result<()> {
    let text = builtin(name)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = name.strip_suffix(".toml").unwrap_or(name);
    let out = dir.join(format!("{name}_copy.toml"));
    fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!("Copy to {}", out.display());
    Ok(())
}

/// Prints every data format with the fields it reads.
pub fn list_dataset_format() {
    for format in DataFormat::all() {
        println!("{:<20} {}", format.name(), format.fields().join(", "));
    }
}
