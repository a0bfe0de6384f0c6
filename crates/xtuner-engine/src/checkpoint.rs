//! Training checkpoints: `work_dir/iter_<N>/`, written atomically (a temporary directory
//! renamed into place, then the `last_checkpoint` pointer replaced), so a crash leaves
//! the previous checkpoint intact. Old checkpoints beyond `save_total_limit` are removed.
//!
//! Contents: the trainable weights in Hugging Face formats (LoRA: a PEFT adapter,
//! `adapter_config.json` + `adapter_model.safetensors`; full: `config.json` +
//! `model.safetensors`), the optimizer state (AdamW's moments in f32 in
//! `optimizer_moments.safetensors`, keyed `{param id}.moment_1|2`; the rest in
//! `optimizer.bin`, Burn's record) and `state.json` (iteration, the config's
//! fingerprint).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunMode;
use crate::{Error, Result};

/// File naming the newest checkpoint (as MMEngine's `last_checkpoint`).
pub const LAST_CHECKPOINT: &str = "last_checkpoint";

/// What a checkpoint records besides weights and optimizer state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Iterations (micro-batches) done.
    pub iter: usize,
    /// Hash of the settings a resumed run must share (model, data, LoRA, schedule).
    pub config_fingerprint: String,
    /// The kind of run that wrote it.
    pub mode: RunMode,
    /// The data-parallel ranks of the run that wrote it (1 for older checkpoints):
    /// `iter` counts each rank's micro-batches, so a resume needs the same number.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Micro-batches per optimizer step of each rank (0 when not recorded): with
    /// `world_size`, the global batch a resume at another number of ranks must keep.
    #[serde(default)]
    pub accumulative_counts: usize,
}

fn one() -> usize {
    1
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a checkpoint: `fill` writes the files into a temporary directory, which is
/// then renamed to `iter_<N>`; `last_checkpoint` is updated and old ones pruned.
///
/// # Errors
/// An unwritable work dir or a full disk; the previous checkpoint stays intact.
pub fn save(
    work_dir: &Path,
    state: &TrainState,
    keep: i64,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    fs::create_dir_all(work_dir).map_err(|e| io(work_dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".iter_tmp")
        .tempdir_in(work_dir)
        .map_err(|e| io(work_dir, e))?;
    fill(tmp.path())?;
    let state_path = tmp.path().join("state.json");
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Serialize {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    fs::write(&state_path, json).map_err(|e| io(&state_path, e))?;
    let dest = work_dir.join(format!("iter_{}", state.iter));
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(|e| io(&dest, e))?;
    }
    let tmp_path = tmp.keep();
    fs::rename(&tmp_path, &dest).map_err(|e| io(&dest, e))?;
    // Point at it (atomically), then prune.
    let pointer = work_dir.join(LAST_CHECKPOINT);
    let mut file = tempfile::NamedTempFile::new_in(work_dir).map_err(|e| io(work_dir, e))?;
    std::io::Write::write_all(&mut file, dest.to_string_lossy().as_bytes())
        .map_err(|e| io(&pointer, e))?;
    file.persist(&pointer).map_err(|e| io(&pointer, e.error))?;
    if keep > 0 {
        let mut all = list(work_dir)?;
        all.sort_by_key(|(iter, _)| *iter);
        let excess = all.len().saturating_sub(keep as usize);
        for (_, old) in all.into_iter().take(excess) {
            if old != dest {
                fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
            }
        }
    }
    Ok(dest)
}

/// The checkpoints in a work dir, with their iteration.
pub fn list(work_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(work_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io(work_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(iter) = name
            .strip_prefix("iter_")
            .and_then(|n| n.parse::<usize>().ok())
            && entry.path().join("state.json").is_file()
        {
            out.push((iter, entry.path()));
        }
    }
    Ok(out)
}

/// The newest complete checkpoint of a work dir (`last_checkpoint`, else the highest
/// `iter_<N>` with a `state.json`).
pub fn latest(work_dir: &Path) -> Result<Option<PathBuf>> {
    if let Ok(text) = fs::read_to_string(work_dir.join(LAST_CHECKPOINT)) {
        let path = PathBuf::from(text.trim());
        if path.join("state.json").is_file() {
            return Ok(Some(path));
        }
    }
    Ok(list(work_dir)?
        .into_iter()
        .max_by_key(|(iter, _)| *iter)
        .map(|(_, p)| p))
}

/// Reads a checkpoint's `state.json`.
///
/// # Errors
/// A directory that is not a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path,
        message: format!("not a training checkpoint: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(iter: usize) -> TrainState {
        TrainState {
            iter,
            config_fingerprint: "x".into(),
            mode: RunMode::Lora,
            world_size: 1,
            accumulative_counts: 1,
        }
    }

    #[test]
    fn saves_atomically_points_at_the_newest_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        for iter in [10, 20, 30] {
            save(dir.path(), &state(iter), 2, |d| {
                fs::write(d.join("w"), iter.to_string()).map_err(|e| io(d, e))
            })
            .unwrap();
        }
        let mut iters: Vec<usize> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        iters.sort();
        assert_eq!(iters, vec![20, 30]);
        let last = latest(dir.path()).unwrap().unwrap();
        assert_eq!(read_state(&last).unwrap().iter, 30);
        // A failed save leaves everything as it was.
        let err = save(dir.path(), &state(40), 2, |d| {
            Err(io(d, std::io::Error::other("disk full")))
        });
        assert!(err.is_err());
        assert_eq!(
            read_state(&latest(dir.path()).unwrap().unwrap())
                .unwrap()
                .iter,
            30
        );
        assert!(!dir.path().join("iter_40").exists());
    }
}
