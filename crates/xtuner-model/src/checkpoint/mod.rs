//! Hugging Face checkpoints in safetensors: [`Checkpoint`] reads one, [`save_safetensors`] writes
//! one.
//!
//! A checkpoint is one `.safetensors` file, a directory holding `model.safetensors`, or a
//! directory holding `model.safetensors.index.json` whose `weight_map` sends each tensor key to
//! a shard file beside it (transformers looks for them in that order). Files are memory-mapped
//! and each tensor is converted to f32 (or i64) only when asked for, so loading a model costs
//! about one copy of its weights, not two.
//!
//! Tensors keep the PyTorch layout: a `Linear` weight is `[out, in]` on disk, while Burn's
//! `Linear` holds `[in, out]`; [`Checkpoint::linear_weight`] loads it transposed.
//!
//! PyTorch pickle checkpoints (`pytorch_model.bin`, `*.pth`) are refused with
//! [`Error::PickleNotSupported`]: unpickling runs arbitrary code.

pub mod clip;
pub mod decoder;
pub mod keys;
pub mod llava;
pub mod peft;
mod safetensors;
mod save;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData};

use self::safetensors::{SafetensorsFile, ShardIndex};
pub use self::save::{SaveDtype, copy_side_files, parse_size, save_safetensors};
use crate::{Error, Result};

/// The single-file name transformers writes and looks for first.
const SINGLE_FILE: &str = "model.safetensors";
/// The index name transformers writes for a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened checkpoint: one `.safetensors` file, a directory with `model.safetensors`, or a
/// sharded one (`model.safetensors.index.json` or any `*.safetensors.index.json` path).
///
/// Files stay memory-mapped while the checkpoint is open; each tensor is converted on request.
/// The checkpoint records which keys were loaded through [`Checkpoint::tensor`],
/// [`Checkpoint::linear_weight`] or [`Checkpoint::mark_used`], so that a model loader can report
/// the ones it never used ([`Checkpoint::unused_keys`]).
pub struct Checkpoint {
    /// The path given to [`Checkpoint::open`].
    path: PathBuf,
    /// The mapped files (one, or one per shard).
    files: Vec<SafetensorsFile>,
    /// Tensor key -> index into `files`.
    keys: BTreeMap<String, usize>,
    /// Key -> the key as the file stores it, for the keys a [`Checkpoint::renamed`]
    /// view gives another name.
    stored: BTreeMap<String, String>,
    /// Keys loaded so far; a mutex so that loading takes `&self` and the checkpoint stays `Sync`.
    used: Mutex<BTreeSet<String>>,
    /// The dtype float tensors are created in ([`Checkpoint::with_dtype`]); `None` is the
    /// backend's default.
    dtype: Option<DType>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field(
                "files",
                &self
                    .files
                    .iter()
                    .map(SafetensorsFile::path)
                    .collect::<Vec<_>>(),
            )
            .field("tensors", &self.keys.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a safetensors file, a sharded index, or a directory holding either.
    ///
    /// # Errors
    /// - [`Error::Io`] when `path` does not exist or cannot be read;
    /// - [`Error::PickleNotSupported`] for a pickle file, or a directory whose only weights are
    ///   pickles (`pytorch_model.bin`, `*.bin`, `*.pth`, `*.pt`, `*.ckpt`);
    /// - [`Error::NoCheckpoint`] for a directory without weights;
    /// - [`Error::Safetensors`] for a corrupt or truncated file (naming it);
    /// - [`Error::BadIndex`] for an index that cannot be parsed, names a missing shard, or maps a
    ///   key to a shard that lacks it.
    pub fn open(path: &Path) -> Result<Self> {
        let metadata = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let target = if metadata.is_dir() {
            find_in_dir(path)?
        } else {
            path.to_path_buf()
        };
        let name = file_name(&target);
        let (files, keys) = if is_pickle_name(&name) {
            return Err(Error::PickleNotSupported { path: target });
        } else if name.ends_with(".index.json") {
            open_index(&target)?
        } else {
            let file = SafetensorsFile::open(&target)?;
            let keys = file.keys().into_iter().map(|key| (key, 0)).collect();
            (vec![file], keys)
        };
        tracing::debug!(
            path = %path.display(),
            files = files.len(),
            tensors = keys.len(),
            "opened checkpoint"
        );
        Ok(Self {
            path: path.to_path_buf(),
            files,
            keys,
            used: Mutex::new(BTreeSet::new()),
            dtype: None,
            stored: BTreeMap::new(),
        })
    }

    /// A view of the checkpoint under other names: `rename` gives each stored key the
    /// name a loader asks for, or `None` to leave it out of the view. One file can so
    /// hold several models' weights under prefixes (a transformers LLaVA holds
    /// `language_model.model.*`, `vision_tower.*` and `multi_modal_projector.*`), each
    /// read by its own loader, whose [`Checkpoint::unused_keys`] sees only its part.
    pub fn renamed(self, rename: impl Fn(&str) -> Option<String>) -> Self {
        let mut keys = BTreeMap::new();
        let mut stored = BTreeMap::new();
        for (key, file) in self.keys {
            let original = self
                .stored
                .get(&key)
                .cloned()
                .unwrap_or_else(|| key.clone());
            if let Some(name) = rename(&key) {
                if name != original {
                    stored.insert(name.clone(), original);
                }
                keys.insert(name, file);
            }
        }
        Self {
            keys,
            stored,
            used: Mutex::new(BTreeSet::new()),
            ..self
        }
    }

    /// The key as the file stores it.
    fn stored<'a>(&'a self, key: &'a str) -> &'a str {
        self.stored.get(key).map_or(key, String::as_str)
    }

    /// Float tensors loaded from this checkpoint are created in `dtype` rather than the
    /// backend's default: the f32 master weights a run resumes from stay f32 on a bf16
    /// backend instead of being rounded to bf16 on the way in.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// How float tensors of this checkpoint are created on `device` (its dtype, if set).
    pub fn options<B: Backend>(&self, device: &B::Device) -> TensorCreationOptions<B> {
        let options = TensorCreationOptions::new(device.clone());
        match self.dtype {
            Some(dtype) => options.with_dtype(dtype),
            None => options,
        }
    }

    /// The path given to [`Checkpoint::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Whether the checkpoint holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The shape of `key` as stored (PyTorch order), or `None` if absent.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.file(key)
            .ok()?
            .info(self.stored(key))
            .map(|info| info.shape.clone())
    }

    /// The tensor as f32 data, converted from F32, F16, BF16 or F64 on disk.
    ///
    /// Does not mark `key` as used.
    ///
    /// # Errors
    /// [`Error::MissingTensor`]; [`Error::UnsupportedDtype`] for integer or other dtypes (read
    /// those with [`Checkpoint::int_data`]).
    pub fn float_data(&self, key: &str) -> Result<TensorData> {
        self.file(key)?.float_data(self.stored(key))
    }

    /// The tensor as i64 data, converted from I64, I32, I16, I8, U32, U16, U8 or BOOL on disk
    /// (token ids, labels, masks).
    ///
    /// Does not mark `key` as used.
    ///
    /// # Errors
    /// [`Error::MissingTensor`]; [`Error::UnsupportedDtype`] for floating-point and other dtypes.
    pub fn int_data(&self, key: &str) -> Result<TensorData> {
        self.file(key)?.int_data(self.stored(key))
    }

    /// Loads `key` as a float tensor of shape `shape` and records it as used.
    ///
    /// # Errors
    /// [`Error::MissingTensor`]; [`Error::ShapeMismatch`] when the stored shape differs;
    /// [`Error::UnsupportedDtype`] for a non-float tensor.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        self.check_shape(key, &shape)?;
        let data = self.float_data(key)?;
        self.mark_used(key);
        Ok(Tensor::from_data(data, self.options(device)))
    }

    /// Loads a PyTorch `Linear` weight, stored `[out_features, in_features]`, transposed to
    /// Burn's `[in_features, out_features]`, and records it as used.
    ///
    /// The transpose is done on the host, so the tensor is contiguous on the device.
    ///
    /// # Shapes
    /// - on disk: `[out_features, in_features]`
    /// - returned: `[in_features, out_features]`
    ///
    /// # Errors
    /// [`Error::MissingTensor`]; [`Error::ShapeMismatch`] (reporting the on-disk order);
    /// [`Error::UnsupportedDtype`] for a non-float tensor.
    pub fn linear_weight<B: Backend>(
        &self,
        key: &str,
        out_features: usize,
        in_features: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        self.check_shape(key, &[out_features, in_features])?;
        let file = self.file(key)?;
        let (values, _) = file.f32_values(self.stored(key))?;
        // [out, in] -> [in, out]
        let transposed =
            transpose(&values, out_features, in_features).ok_or_else(|| Error::Safetensors {
                path: file.path().to_path_buf(),
                message: format!(
                    "tensor `{key}` does not hold {out_features}x{in_features} values"
                ),
            })?;
        self.mark_used(key);
        Ok(Tensor::from_data(
            TensorData::new(transposed, [in_features, out_features]),
            self.options(device),
        ))
    }

    /// Records `key` as used without loading it (for tensors a model knowingly skips, such as
    /// a CLIP checkpoint's text tower). Keys not in the checkpoint are ignored.
    pub fn mark_used(&self, key: &str) {
        if self.contains(key) {
            self.used
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.to_owned());
        }
    }

    /// The keys never loaded through [`Checkpoint::tensor`], [`Checkpoint::linear_weight`] or
    /// [`Checkpoint::mark_used`], sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        self.keys
            .keys()
            .filter(|key| !used.contains(*key))
            .cloned()
            .collect()
    }

    /// The file holding `key`.
    fn file(&self, key: &str) -> Result<&SafetensorsFile> {
        self.keys
            .get(key)
            .and_then(|&index| self.files.get(index))
            .ok_or_else(|| Error::MissingTensor {
                key: key.to_owned(),
                path: self.path.clone(),
            })
    }

    /// Checks the stored shape of `key` against `expected`.
    fn check_shape(&self, key: &str, expected: &[usize]) -> Result<()> {
        let found = self.shape(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_owned(),
            path: self.path.clone(),
        })?;
        if found == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                key: key.to_owned(),
                expected: expected.to_vec(),
                found,
            })
        }
    }
}

/// The checkpoint file inside `dir`, in transformers' order of preference.
fn find_in_dir(dir: &Path) -> Result<PathBuf> {
    for name in [SINGLE_FILE, INDEX_FILE] {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut pickles: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_file() && is_pickle_name(&file_name(path)))
        .collect();
    pickles.sort();
    match pickles.into_iter().next() {
        Some(path) => Err(Error::PickleNotSupported { path }),
        None => Err(Error::NoCheckpoint {
            path: dir.to_path_buf(),
        }),
    }
}

/// Opens every shard named by the index at `index_path`.
fn open_index(index_path: &Path) -> Result<(Vec<SafetensorsFile>, BTreeMap<String, usize>)> {
    let bad = |message: String| Error::BadIndex {
        path: index_path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index_path).map_err(|source| Error::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let dir = index_path.parent().unwrap_or(Path::new(""));

    let mut shard_of_name: BTreeMap<&str, usize> = BTreeMap::new();
    let mut files: Vec<SafetensorsFile> = Vec::new();
    let mut keys = BTreeMap::new();
    for (key, shard) in &index.weight_map {
        let position = match shard_of_name.get(shard.as_str()) {
            Some(&position) => position,
            None => {
                let relative = Path::new(shard);
                if !relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
                {
                    return Err(bad(format!(
                        "shard `{shard}` is not a file name beside the index"
                    )));
                }
                let shard_path = dir.join(relative);
                if !shard_path.is_file() {
                    return Err(bad(format!(
                        "shard {} does not exist",
                        shard_path.display()
                    )));
                }
                files.push(SafetensorsFile::open(&shard_path)?);
                shard_of_name.insert(shard, files.len() - 1);
                files.len() - 1
            }
        };
        let holds_key = files
            .get(position)
            .is_some_and(|file| file.info(key).is_some());
        if !holds_key {
            return Err(bad(format!(
                "tensor `{key}` is mapped to {shard}, which does not hold it"
            )));
        }
        keys.insert(key.clone(), position);
    }
    Ok((files, keys))
}

/// The last component of `path`, lossily as UTF-8.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a file name is one PyTorch's `torch.save` checkpoints go by.
fn is_pickle_name(name: &str) -> bool {
    [".bin", ".bin.index.json", ".pth", ".pt", ".ckpt", ".pkl"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Transposes a row-major `[rows, cols]` matrix to `[cols, rows]`, in tiles to stay in cache;
/// `None` unless `values` holds exactly `rows * cols` elements.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Option<Vec<f32>> {
    const TILE: usize = 32;
    if rows.checked_mul(cols) != Some(values.len()) {
        return None;
    }
    let mut out = vec![0.0; values.len()];
    for row_start in (0..rows).step_by(TILE) {
        for col_start in (0..cols).step_by(TILE) {
            for row in row_start..(row_start + TILE).min(rows) {
                for col in col_start..(col_start + TILE).min(cols) {
                    out[col * rows + row] = values[row * cols + col];
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;

    fn internlm2() -> Checkpoint {
        Checkpoint::open(&crate::test_support::fixture("").join("internlm2-tiny")).unwrap()
    }

    fn f32s(data: &TensorData) -> Vec<f32> {
        data.to_vec::<f32>().unwrap()
    }

    #[test]
    fn lists_fixture_keys_and_shapes() {
        let ckpt = internlm2();
        let keys = ckpt.keys();
        assert_eq!(keys.len(), 17);
        assert!(keys.is_sorted());
        assert_eq!(
            keys.first().map(String::as_str),
            Some("model.layers.0.attention.wo.weight")
        );
        assert!(ckpt.contains("output.weight"));
        assert!(!ckpt.contains("lm_head.weight"));
        assert_eq!(
            ckpt.shape("model.layers.1.attention.wqkv.weight"),
            Some(vec![128, 64])
        );
        assert_eq!(ckpt.shape("model.norm.weight"), Some(vec![64]));
        assert_eq!(
            ckpt.shape("model.tok_embeddings.weight"),
            Some(vec![512, 64])
        );
        assert_eq!(ckpt.shape("nope"), None);
        assert!(ckpt.path().ends_with("internlm2-tiny"));
        // A file path opens the same checkpoint.
        let file = Checkpoint::open(&ckpt.path().join("model.safetensors")).unwrap();
        assert_eq!(file.keys(), keys);
    }

    #[test]
    fn linear_weight_is_the_transpose_of_the_stored_weight() {
        let ckpt = internlm2();
        let device = Default::default();
        let key = "model.layers.0.feed_forward.w2.weight"; // [64, 128]: out 64, in 128
        let stored = f32s(&ckpt.float_data(key).unwrap());
        let weight = ckpt
            .linear_weight::<TestBackend>(key, 64, 128, &device)
            .unwrap();
        assert_eq!(weight.dims(), [128, 64]);
        let loaded = f32s(&weight.into_data());
        for i in 0..128 {
            for o in 0..64 {
                assert_eq!(loaded[i * 64 + o], stored[o * 128 + i], "in {i}, out {o}");
            }
        }
    }

    #[test]
    fn tensor_loads_data_and_tracks_unused_keys() {
        let ckpt = internlm2();
        let device = Default::default();
        assert_eq!(ckpt.unused_keys(), ckpt.keys());
        let norm = ckpt
            .tensor::<TestBackend, 1>("model.norm.weight", [64], &device)
            .unwrap();
        assert_eq!(
            norm.into_data(),
            ckpt.float_data("model.norm.weight").unwrap()
        );
        ckpt.linear_weight::<TestBackend>("output.weight", 512, 64, &device)
            .unwrap();
        ckpt.mark_used("model.tok_embeddings.weight");
        ckpt.mark_used("not.in.checkpoint");
        // float_data alone does not count as use.
        ckpt.float_data("model.layers.0.ffn_norm.weight").unwrap();
        let unused = ckpt.unused_keys();
        assert_eq!(unused.len(), 14);
        for used in [
            "model.norm.weight",
            "output.weight",
            "model.tok_embeddings.weight",
        ] {
            assert!(!unused.iter().any(|k| k == used), "{used}");
        }
        assert!(unused.iter().any(|k| k == "model.layers.0.ffn_norm.weight"));
    }

    #[test]
    fn shape_mismatch_and_missing_tensor_name_the_key() {
        let ckpt = internlm2();
        let device = Default::default();
        let err = ckpt
            .tensor::<TestBackend, 2>("model.norm.weight", [64, 1], &device)
            .unwrap_err();
        assert!(
            matches!(&err, Error::ShapeMismatch { key, expected, found }
                if key == "model.norm.weight" && expected == &[64, 1] && found == &[64]),
            "{err}"
        );
        assert!(err.to_string().contains("model.norm.weight"));
        // Transposed arguments are caught too: the shape is checked in on-disk order.
        let err = ckpt
            .linear_weight::<TestBackend>("model.layers.0.feed_forward.w2.weight", 128, 64, &device)
            .unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        let err = ckpt
            .float_data("model.layers.9.ffn_norm.weight")
            .unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { key, .. } if key == "model.layers.9.ffn_norm.weight")
        );
        assert!(err.to_string().contains("internlm2-tiny"), "{err}");
        assert!(ckpt.unused_keys().contains(&"model.norm.weight".to_owned()));
    }

    #[test]
    fn int_data_reads_golden_token_ids() {
        let golden = Checkpoint::open(
            &crate::test_support::fixture("").join("internlm2-tiny/golden.safetensors"),
        )
        .unwrap();
        let ids = golden.int_data("input_ids").unwrap();
        assert_eq!(ids.shape.to_vec(), vec![2, 16]);
        let ids = ids.to_vec::<i64>().unwrap();
        assert!(ids.iter().all(|&id| (0..512).contains(&id)));
        let labels = golden.int_data("labels").unwrap().to_vec::<i64>().unwrap();
        assert!(labels.iter().all(|&l| l == -100 || (0..512).contains(&l)));
        assert!(labels.contains(&-100));
        assert!(matches!(
            golden.int_data("logits"),
            Err(Error::UnsupportedDtype { .. })
        ));
        assert!(matches!(
            golden.float_data("input_ids"),
            Err(Error::UnsupportedDtype { .. })
        ));
    }

    #[test]
    fn sharded_save_reads_back_through_the_index() {
        let ckpt = internlm2();
        let tensors: Vec<_> = ckpt
            .keys()
            .into_iter()
            .map(|k| {
                let d = ckpt.float_data(&k).unwrap();
                (k, d)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let written = save_safetensors(
            dir.path(),
            "model",
            tensors.clone(),
            SaveDtype::F32,
            Some(100_000),
        )
        .unwrap();
        assert!(written.len() > 3, "{written:?}");
        assert!(written.last().unwrap().ends_with(INDEX_FILE));
        for reopened in [
            Checkpoint::open(dir.path()).unwrap(),
            Checkpoint::open(written.last().unwrap()).unwrap(),
        ] {
            assert_eq!(reopened.keys(), ckpt.keys());
            for (key, data) in &tensors {
                assert_eq!(&reopened.float_data(key).unwrap(), data, "{key}");
            }
        }
    }

    #[test]
    fn bad_indexes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![("x".to_owned(), TensorData::new(vec![1.0f32, 2.0], [2]))];
        save_safetensors(dir.path(), "part", tensors, SaveDtype::F32, None).unwrap();
        let cases = [
            (
                "missing_shard",
                r#"{"weight_map": {"x": "model-00001-of-00002.safetensors"}}"#,
            ),
            (
                "key_not_in_shard",
                r#"{"weight_map": {"y": "part.safetensors"}}"#,
            ),
            (
                "escapes_dir",
                r#"{"weight_map": {"x": "../part.safetensors"}}"#,
            ),
            ("not_json", "{weight_map"),
            ("no_weight_map", r#"{"metadata": {}}"#),
        ];
        for (name, json) in cases {
            let index = dir.path().join(format!("{name}.safetensors.index.json"));
            std::fs::write(&index, json).unwrap();
            let err = Checkpoint::open(&index).unwrap_err();
            assert!(matches!(err, Error::BadIndex { .. }), "{name}: {err}");
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        std::fs::write(
            dir.path().join("ok.safetensors.index.json"),
            r#"{"weight_map": {"x": "part.safetensors"}}"#,
        )
        .unwrap();
        let ok = Checkpoint::open(&dir.path().join("ok.safetensors.index.json")).unwrap();
        assert_eq!(f32s(&ok.float_data("x").unwrap()), [1.0, 2.0]);
    }

    #[test]
    fn pickle_only_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::NoCheckpoint { .. }), "{err}");
        std::fs::write(dir.path().join("pytorch_model.bin"), b"PK\x03\x04").unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, Error::PickleNotSupported { path } if path.ends_with("pytorch_model.bin")),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("pytorch_model.bin") && message.contains("safe_serialization=True"),
            "{message}"
        );
        let err = Checkpoint::open(&dir.path().join("pytorch_model.bin")).unwrap_err();
        assert!(matches!(err, Error::PickleNotSupported { .. }), "{err}");
    }

    #[test]
    fn missing_and_corrupt_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(&dir.path().join("absent")).unwrap_err();
        assert!(
            matches!(err, Error::Io { .. }) && err.to_string().contains("absent"),
            "{err}"
        );
        let bytes = std::fs::read(
            crate::test_support::fixture("").join("internlm2-tiny/model.safetensors"),
        )
        .unwrap();
        std::fs::write(dir.path().join(SINGLE_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Safetensors { .. }), "{err}");
        assert!(err.to_string().contains(SINGLE_FILE), "{err}");
    }

    #[test]
    fn transpose_tiles_cover_every_element() {
        let (rows, cols) = (37, 70); // not multiples of the tile
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let out = transpose(&values, rows, cols).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(out[c * rows + r], values[r * cols + c]);
            }
        }
        assert_eq!(transpose(&[1.0, 2.0, 3.0], 1, 3).unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(transpose(&[], 0, 5).unwrap(), Vec::<f32>::new());
        assert_eq!(transpose(&[1.0, 2.0, 3.0], 2, 2), None);
    }
}
