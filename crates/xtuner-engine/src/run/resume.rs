//! What makes a resumed run continue exactly as one that never stopped: parameter ids
//! that do not depend on the process ([`StableIds`]), the config fingerprint a
//! checkpoint must match, and the optimizer state, saved and restored with AdamW's
//! moments in f32 whatever the backend computes in.

use std::path::{Path, PathBuf};

use burn::module::ModuleMapper;
use burn::module::{Param, ParamId};
use burn::optim::record::AdaptorRecord;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use xtuner_model::checkpoint::{Checkpoint, SaveDtype, save_safetensors};

use crate::checkpoint;
use crate::config::{RunMode, TrainConfig};
use crate::export::DEFAULT_SHARD_SIZE;
use crate::optim::{
    AdamW, MASTER_DTYPE, adamw_state_in, holds_adamw_moments, join_adamw_state, split_adamw_state,
};
use crate::{Error, Result};

/// Where a run resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest checkpoint of the work dir, if any.
    Auto,
    /// This checkpoint directory.
    Path(PathBuf),
}

/// Gives every parameter an id derived from its module path, so that optimizer state
/// saved by one process finds its parameters in the next.
pub(crate) struct StableIds {
    path: Vec<String>,
}

impl StableIds {
    pub(crate) fn new() -> Self {
        Self { path: Vec::new() }
    }
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        let id = ParamId::from(crate::fnv1a(self.path.join(".").as_bytes()));
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// A fingerprint of the settings a resumed run must share with the checkpoint.
pub(crate) fn config_fingerprint(config: &TrainConfig) -> String {
    let relevant = serde_json::json!({
        "model": config.model, "data": config.data, "template": config.template,
        "lora": config.lora, "llava": config.llava,
        "train": { "batch_size": config.train.batch_size, "seed": config.train.seed },
    });
    format!("{:016x}", crate::fnv1a(relevant.to_string().as_bytes()))
}

/// The first iteration of a run of `world` ranks resuming from `state`. Each rank's
/// iteration count is its micro-batches, so at another number of ranks it is converted
/// through the optimizer steps done; the global batch (ranks × `accumulative_counts`,
/// the batch size being the config's) must stay, so that every later step takes the
/// rows it would have taken.
///
/// # Errors
/// Another number of ranks with another global batch, or a checkpoint that does not
/// record its accumulation.
pub(crate) fn start_iter(
    state: &checkpoint::TrainState,
    dir: &Path,
    world: usize,
    train: &crate::config::LoopConfig,
) -> Result<usize> {
    if state.world_size == world {
        return Ok(state.iter);
    }
    let (saved, now) = (
        state.world_size * state.accumulative_counts,
        world * train.accumulative_counts,
    );
    if saved != now || state.accumulative_counts == 0 {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "written by {} rank(s) of {} micro-batches a step; at {world} rank(s), resume with ranks × accumulative_counts = {saved} (now {now}) to keep its global batch",
                state.world_size, state.accumulative_counts
            ),
        });
    }
    Ok(state.iter / state.accumulative_counts * train.accumulative_counts)
}

/// The checkpoint a run resumes from, checked against the config; `None` for a fresh run.
///
/// # Errors
/// An unreadable checkpoint, or one written by another config or mode.
pub fn resume_point(
    config: &TrainConfig,
    work_dir: &Path,
    resume: Option<Resume>,
) -> Result<Option<(PathBuf, usize)>> {
    let dir = match resume {
        None => return Ok(None),
        Some(Resume::Auto) => match checkpoint::latest(work_dir)? {
            Some(dir) => dir,
            None => return Ok(None),
        },
        Some(Resume::Path(path)) => path,
    };
    let state = checkpoint::read_state(&dir)?;
    if state.config_fingerprint != config_fingerprint(config) || state.mode != config.mode() {
        return Err(Error::Config {
            path: dir,
            message: "this checkpoint comes from another config (model, data, LoRA or batch settings differ)".into(),
        });
    }
    Ok(Some((dir, state.iter)))
}

/// The stem of the safetensors file (or shards) holding AdamW's moments in a checkpoint.
const OPTIMIZER_MOMENTS: &str = "optimizer_moments";

/// The file of Burn's optimizer record in a checkpoint (`.bin` is added).
const OPTIMIZER_RECORD: &str = "optimizer";

/// The record's type: AdamW's state per parameter.
pub(crate) trait AdamWRecord<B: AutodiffBackend>:
    IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
    + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>
{
}

impl<B: AutodiffBackend, R> AdamWRecord<B> for R where
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>
{
}

/// Writes the optimizer state into checkpoint directory `dir`: AdamW's moments as f32
/// safetensors, the rest as Burn's record.
///
/// # Errors
/// A file that cannot be written, naming it.
pub(crate) fn save_optimizer<B, R>(record: R, dir: &Path) -> Result<()>
where
    B: AutodiffBackend,
    R: AdamWRecord<B> + burn::record::Record<B>,
{
    let (record, moments) = split_adamw_state(record);
    save_safetensors(
        dir,
        OPTIMIZER_MOMENTS,
        moments,
        SaveDtype::F32,
        Some(DEFAULT_SHARD_SIZE),
    )?;
    let path = dir.join(OPTIMIZER_RECORD);
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(record, path.clone())
        .map_err(|e| Error::Checkpoint {
            path: path.with_extension("bin"),
            message: format!("saving the optimizer state: {e}"),
        })
}

/// Reads the optimizer state of checkpoint directory `dir`, its moments in the
/// masters' dtype (see [`load_adamw_moments`]).
///
/// # Errors
/// A missing or unreadable optimizer state, naming the file.
pub(crate) fn load_optimizer<B, R>(dir: &Path, device: &B::Device) -> Result<R>
where
    B: AutodiffBackend,
    R: AdamWRecord<B> + burn::record::Record<B>,
{
    let path = dir.join(OPTIMIZER_RECORD);
    let record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(path.clone(), device)
        .map_err(|e| Error::Checkpoint {
            path: path.with_extension("bin"),
            message: format!("optimizer state: {e}"),
        })?;
    load_adamw_moments(record, dir, device)
}

/// A saved AdamW record with its moments restored in the masters' dtype: read from the
/// checkpoint's `optimizer_moments` safetensors exactly as they were saved, or, for a
/// checkpoint written before they were kept apart, taken from the record (rounded to the
/// backend's default dtype on the way in) and widened.
///
/// # Errors
/// The moments file missing from a checkpoint whose record keeps only placeholders, or
/// a moment missing from it.
fn load_adamw_moments<B, R>(record: R, dir: &Path, device: &B::Device) -> Result<R>
where
    B: AutodiffBackend,
    R: AdamWRecord<B>,
{
    let single = dir.join(format!("{OPTIMIZER_MOMENTS}.safetensors"));
    let index = dir.join(format!("{OPTIMIZER_MOMENTS}.safetensors.index.json"));
    let Some(path) = [single.clone(), index].into_iter().find(|p| p.is_file()) else {
        let (record, holds_moments) = holds_adamw_moments(record);
        if !holds_moments {
            return Err(Error::Checkpoint {
                path: single,
                message: "missing: the optimizer state beside it keeps AdamW's moments \
                          in this file"
                    .into(),
            });
        }
        return Ok(adamw_state_in(record, MASTER_DTYPE));
    };
    let moments = Checkpoint::open(&path)?.with_dtype(MASTER_DTYPE);
    Ok(join_adamw_state(record, &moments, device)?)
}

/// Whether a checkpoint of `mode` fits a config of another mode.
pub(crate) fn check_mode(dir: &Path, found: RunMode, config: &TrainConfig) -> Result<()> {
    if found == config.mode() {
        return Ok(());
    }
    Err(Error::Config {
        path: dir.to_path_buf(),
        message: format!(
            "a `{found}` checkpoint does not fit this config (a `{}` run)",
            config.mode()
        ),
    })
}

/// Moves the ZeRO shards of ranks 1.. that `staging` holds into checkpoint `dir`, and
/// removes `staging`.
///
/// # Errors
/// A shard missing from `staging` (its rank did not write it), naming it.
pub(crate) fn take_staged_shards(staging: &Path, dir: &Path, world: usize) -> Result<()> {
    for rank in 1..world {
        let name = crate::optim::zero::shard_file(rank, world);
        let from = staging.join(&name);
        std::fs::rename(&from, dir.join(&name)).map_err(|e| Error::Checkpoint {
            path: from.clone(),
            message: format!("rank {rank}'s optimizer shard: {e}"),
        })?;
    }
    let _ = std::fs::remove_dir(staging);
    if let Some(parent) = staging.parent() {
        // Only when empty: another checkpoint's shards may be on their way.
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}
