//! Writing tensors as safetensors in the Hugging Face layout: one file, or numbered shards
//! plus an index.
//!
//! Writing follows transformers' `save_pretrained(safe_serialization=True)`, which shards with
//! huggingface_hub's `split_state_dict_into_shards_factory`: the same file names
//! (`model.safetensors`, `model-00001-of-00003.safetensors`, `model.safetensors.index.json`), the
//! same greedy split in the order the tensors are given, the same index JSON and the
//! `{"format": "pt"}` metadata.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use ::safetensors::{Dtype, SafeTensorError, View};
use burn::tensor::{DType, TensorData};
use half::{bf16, f16};

use super::safetensors::{ShardIndex, safetensors_error};
use crate::{Error, Result};

/// The dtype floating-point tensors are written in; integer and bool tensors keep their own.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    /// 32-bit float: exact for f32 data.
    #[default]
    F32,
    /// IEEE half precision (round to nearest even).
    F16,
    /// bfloat16 (round to nearest even, as PyTorch's `.to(torch.bfloat16)`).
    BF16,
}

impl SaveDtype {
    /// The safetensors dtype written.
    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }
}

/// One tensor to write, converted to its file dtype only when the writer asks for its bytes.
struct Encoded<'a> {
    data: &'a TensorData,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl<'a> Encoded<'a> {
    /// Checks `data` and picks its file dtype.
    fn new(key: &str, data: &'a TensorData, save: SaveDtype) -> Result<Self> {
        let dtype = match data.dtype {
            DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16 => save.dtype(),
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            DType::I16 => Dtype::I16,
            DType::I8 => Dtype::I8,
            DType::U64 => Dtype::U64,
            DType::U32 => Dtype::U32,
            DType::U16 => Dtype::U16,
            DType::U8 => Dtype::U8,
            DType::Bool(_) => Dtype::BOOL,
            DType::QFloat(_) => {
                return Err(Error::UnsupportedDtype {
                    key: key.to_owned(),
                    dtype: format!("{:?}", data.dtype),
                });
            }
        };
        let numel = data.num_elements();
        // Encoding reads exactly `numel` elements; malformed data would write a corrupt file.
        if data.as_bytes().len() != numel.saturating_mul(data.dtype.size()) {
            return Err(Error::UnsupportedDtype {
                key: key.to_owned(),
                dtype: format!(
                    "{:?} with {} bytes for shape {:?}",
                    data.dtype,
                    data.as_bytes().len(),
                    data.shape
                ),
            });
        }
        let len = numel.saturating_mul(dtype.bitsize() / 8);
        Ok(Self {
            data,
            dtype,
            shape: data.shape.to_vec(),
            len,
        })
    }

    /// The little-endian bytes in the file dtype.
    fn encode(&self) -> Cow<'_, [u8]> {
        let data = self.data;
        if self.dtype == Dtype::F32 && data.dtype == DType::F32 && cfg!(target_endian = "little") {
            return Cow::Borrowed(data.as_bytes());
        }
        let mut out = Vec::with_capacity(self.len);
        match self.dtype {
            Dtype::F32 => data.iter::<f32>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::F16 => data
                .iter::<f32>()
                .for_each(|v| out.extend(f16::from_f32(v).to_le_bytes())),
            Dtype::BF16 => {
                data.iter::<f32>()
                    .for_each(|v| out.extend(bf16::from_f32(v).to_le_bytes()));
            }
            Dtype::I64 => data.iter::<i64>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::I32 => data.iter::<i32>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::I16 => data.iter::<i16>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::I8 => data.iter::<i8>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::U64 => data.iter::<u64>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::U32 => data.iter::<u32>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::U16 => data.iter::<u16>().for_each(|v| out.extend(v.to_le_bytes())),
            Dtype::U8 => out.extend(data.iter::<u8>()),
            _ => out.extend(data.iter::<u8>().map(|v| u8::from(v != 0))),
        }
        Cow::Owned(out)
    }
}

impl View for &Encoded<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        self.encode()
    }

    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes `tensors` into `dir` in the Hugging Face layout and returns the files written.
///
/// The files are `{file_stem}.safetensors` or, when the data exceeds `max_shard_bytes`,
/// `{file_stem}-00001-of-0000N.safetensors`... plus `{file_stem}.safetensors.index.json`
/// (`{"metadata": {"total_size": N}, "weight_map": {...}}`, keys sorted, indent 2), exactly as
/// transformers names them; `file_stem` is `"model"` for a model and `"adapter_model"` for a PEFT
/// adapter. Shards are filled greedily in the order given; a tensor larger than the limit gets
/// a shard of its own. Floating-point tensors are written in `dtype`, integer and bool tensors in
/// their own dtype. Each file carries the `{"format": "pt"}` metadata and is written to a
/// temporary file in `dir`, synced, then renamed over the target. Afterwards, files of an
/// earlier save with the same stem that this save supersedes (other shards, or the single file
/// or index of the other layout) are deleted, so that a reader never picks up stale weights.
/// `dir` is created if missing. Tensors are converted one at a time.
///
/// # Errors
/// [`Error::InvalidConfig`] for an empty `file_stem` or one with a path separator;
/// [`Error::DuplicateTensor`]; [`Error::UnsupportedDtype`] for quantized data; [`Error::Io`] or
/// [`Error::Safetensors`] (naming the file) when writing fails.
pub fn save_safetensors(
    dir: &Path,
    file_stem: &str,
    tensors: Vec<(String, TensorData)>,
    dtype: SaveDtype,
    max_shard_bytes: Option<u64>,
) -> Result<Vec<PathBuf>> {
    if file_stem.is_empty() || file_stem.contains(['/', '\\']) || file_stem.starts_with('.') {
        return Err(Error::InvalidConfig {
            key: "file_stem",
            message: format!("`{file_stem}` is not a plain file name"),
        });
    }
    let mut seen = BTreeSet::new();
    let mut encoded = Vec::with_capacity(tensors.len());
    for (key, data) in &tensors {
        if !seen.insert(key.as_str()) {
            return Err(Error::DuplicateTensor { key: key.clone() });
        }
        encoded.push((key.as_str(), Encoded::new(key, data, dtype)?));
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let total_size: u64 = encoded.iter().map(|(_, e)| e.len as u64).sum();
    let shards = split_into_shards(encoded, max_shard_bytes);
    let single_name = format!("{file_stem}.safetensors");
    let index_name = format!("{file_stem}.safetensors.index.json");
    let mut written = Vec::with_capacity(shards.len() + 1);
    if shards.len() <= 1 {
        let tensors = shards.into_iter().next().unwrap_or_default();
        written.push(write_file(dir, &single_name, &tensors)?);
        remove_stale(dir, file_stem, &[single_name.as_str()], &index_name)?;
    } else {
        let count = shards.len();
        let mut names = Vec::with_capacity(count);
        let mut weight_map = BTreeMap::new();
        for (i, tensors) in shards.iter().enumerate() {
            let name = format!("{file_stem}-{:05}-of-{count:05}.safetensors", i + 1);
            weight_map.extend(
                tensors
                    .iter()
                    .map(|(key, _)| ((*key).to_owned(), name.clone())),
            );
            written.push(write_file(dir, &name, tensors)?);
            names.push(name);
        }
        let index = ShardIndex {
            metadata: Some(serde_json::json!({ "total_size": total_size })),
            weight_map,
        };
        let index_path = dir.join(&index_name);
        let mut json = serde_json::to_string_pretty(&index).map_err(|e| Error::Safetensors {
            path: index_path.clone(),
            message: e.to_string(),
        })?;
        json.push('\n');
        write_atomic(&index_path, |tmp| {
            std::fs::write(tmp, &json).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })
        })?;
        written.push(index_path);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        remove_stale(dir, file_stem, &names, &single_name)?;
    }
    tracing::info!(
        dir = %dir.display(),
        tensors = tensors.len(),
        files = written.len(),
        bytes = total_size,
        "saved safetensors checkpoint"
    );
    Ok(written)
}

/// huggingface_hub's greedy split: in the given order, start a new shard when the next tensor
/// would push the current one past `max_bytes`; a tensor larger than `max_bytes` is put in a
/// shard of its own right away (so it can land before the shard being filled).
fn split_into_shards<'a>(
    tensors: Vec<(&'a str, Encoded<'a>)>,
    max_bytes: Option<u64>,
) -> Vec<Vec<(&'a str, Encoded<'a>)>> {
    let Some(max_bytes) = max_bytes else {
        return vec![tensors];
    };
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0u64;
    for (key, tensor) in tensors {
        let bytes = tensor.len as u64;
        if bytes > max_bytes {
            shards.push(vec![(key, tensor)]);
            continue;
        }
        if current_bytes + bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push((key, tensor));
        current_bytes += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes one safetensors file atomically and returns its path.
fn write_file(dir: &Path, name: &str, tensors: &[(&str, Encoded<'_>)]) -> Result<PathBuf> {
    let path = dir.join(name);
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    write_atomic(&path, |tmp| {
        let views = tensors.iter().map(|(key, tensor)| (*key, tensor));
        ::safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|error| match error {
            SafeTensorError::IoError(source) => Error::Io {
                path: tmp.to_path_buf(),
                source,
            },
            error => safetensors_error(tmp, &error),
        })
    })?;
    Ok(path)
}

/// Copies the files a saved model carries beside its weights (configs, tokenizer) from
/// `from` to `to`: each of `names` that `from` holds, each atomically. Absent names are
/// skipped.
///
/// # Errors
/// A file that cannot be read or written, named.
pub fn copy_side_files(from: &Path, names: &[&str], to: &Path) -> Result<()> {
    for name in names {
        let source = from.join(name);
        if source.is_file() {
            let target = to.join(name);
            write_atomic(&target, |tmp| {
                std::fs::copy(&source, tmp).map(drop).map_err(|e| {
                    // Name the side that failed: the file read, or the one written.
                    let unreadable = File::open(&source).is_err();
                    Error::Io {
                        path: if unreadable {
                            source.clone()
                        } else {
                            target.clone()
                        },
                        source: e,
                    }
                })
            })?;
        }
    }
    Ok(())
}

/// Runs `write` on a temporary path beside `path`, syncs it and renames it over `path`.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = write(&tmp)
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|file| file.sync_all())
                .map_err(|source| Error::Io {
                    path: tmp.clone(),
                    source,
                })
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        });
    if result.is_err() {
        // Best effort: the error being returned matters more than a leftover temp file.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Deletes `{stem}-NNNNN-of-NNNNN.safetensors` files not in `keep`, and `other_layout` (the
/// single file or the index of the layout not written this time).
fn remove_stale(dir: &Path, stem: &str, keep: &[&str], other_layout: &str) -> Result<()> {
    let io_error = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = (name == other_layout || is_shard_name(name, stem)) && !keep.contains(&name);
        if stale && entry.path().is_file() {
            tracing::debug!(file = %entry.path().display(), "removing file of an earlier save");
            std::fs::remove_file(entry.path()).map_err(|source| Error::Io {
                path: entry.path(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Whether `name` is `{stem}-NNNNN-of-NNNNN.safetensors` (transformers' shard pattern).
fn is_shard_name(name: &str, stem: &str) -> bool {
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix(stem)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.strip_suffix(".safetensors"))
        .and_then(|rest| rest.split_once("-of-"))
        .is_some_and(|(index, count)| five_digits(index) && five_digits(count))
}

/// Parses a size such as `"2GB"`, `"500MB"`, `"5GiB"`, `"1.5GB"` or `"1000"` into bytes.
///
/// As transformers' `max_shard_size`: KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of
/// 2; units are case-insensitive; a bare number (or a `B` suffix) is bytes. Fractions are
/// truncated to whole bytes.
///
/// # Errors
/// [`Error::InvalidConfig`] (key `max_shard_size`) for anything else.
pub fn parse_size(text: &str) -> Result<u64> {
    let invalid = || Error::InvalidConfig {
        key: "max_shard_size",
        message: format!("`{text}` is not a size such as 5GB, 500MB or 2GiB"),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => return Err(invalid()),
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(invalid);
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let bytes = value * multiplier as f64;
    if bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64 {
        Ok(bytes as u64)
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::safetensors::tests::{f32s, read, sample_tensors};

    #[test]
    #[allow(clippy::approx_constant, reason = "test data, not π")]
    fn half_precision_round_trips_within_dtype_precision() {
        // Exactly representable in both f16 and bf16, then values that must round.
        let exact = [1.0f32, -2.5, 0.15625, 96.0, -0.0, 0.0078125];
        let inexact = [0.1f32, 3.14159, -1234.567, 1e-2];
        let mut values = exact.to_vec();
        values.extend(inexact);
        let tensors = vec![(
            "w".to_owned(),
            TensorData::new(values.clone(), [values.len()]),
        )];
        for (dtype, relative) in [
            (SaveDtype::F16, 2f32.powi(-11)),
            (SaveDtype::BF16, 2f32.powi(-8)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let written =
                save_safetensors(dir.path(), "model", tensors.clone(), dtype, None).unwrap();
            let file = read(&written[0]);
            assert_eq!(file.info("w").unwrap().dtype, dtype.dtype());
            let back = f32s(&file.float_data("w").unwrap());
            assert_eq!(&back[..exact.len()], &exact, "{dtype:?}");
            for (got, want) in back.iter().zip(&values) {
                assert!(
                    (got - want).abs() <= want.abs() * relative,
                    "{dtype:?}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn shards_like_huggingface_hub() {
        // 24 + 12 + 4 + 24 bytes of data with a 30-byte limit: [b.weight], [a.bias, scalar], [ids].
        let dir = tempfile::tempdir().unwrap();
        let written = save_safetensors(
            dir.path(),
            "model",
            sample_tensors(),
            SaveDtype::F32,
            Some(30),
        )
        .unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json",
            ]
        );
        let text = std::fs::read_to_string(&written[3]).unwrap();
        let expected = r#"{
  "metadata": {
    "total_size": 64
  },
  "weight_map": {
    "a.bias": "model-00002-of-00003.safetensors",
    "b.weight": "model-00001-of-00003.safetensors",
    "ids": "model-00003-of-00003.safetensors",
    "scalar": "model-00002-of-00003.safetensors"
  }
}
"#;
        assert_eq!(text, expected);
        assert_eq!(read(&written[1]).keys(), ["a.bias", "scalar"]);
    }

    #[test]
    fn oversized_tensor_gets_its_own_shard_before_the_current_one() {
        let tensors = vec![
            ("small".to_owned(), TensorData::new(vec![1.0f32], [1])),
            ("big".to_owned(), TensorData::new(vec![0.0f32; 10], [10])),
            ("small2".to_owned(), TensorData::new(vec![2.0f32], [1])),
        ];
        let dir = tempfile::tempdir().unwrap();
        let written = save_safetensors(
            dir.path(),
            "adapter_model",
            tensors,
            SaveDtype::F32,
            Some(8),
        )
        .unwrap();
        assert_eq!(read(&written[0]).keys(), ["big"]);
        assert_eq!(read(&written[1]).keys(), ["small", "small2"]);
        assert!(written[2].ends_with("adapter_model.safetensors.index.json"));
    }

    #[test]
    fn resaving_removes_superseded_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model-00007-of-00009.safetensors"), b"old").unwrap();
        std::fs::write(
            dir.path().join("keep-00001-of-00002.safetensors"),
            b"other stem",
        )
        .unwrap();
        save_safetensors(
            dir.path(),
            "model",
            sample_tensors(),
            SaveDtype::F32,
            Some(30),
        )
        .unwrap();
        assert!(!dir.path().join("model-00007-of-00009.safetensors").exists());
        assert!(dir.path().join("keep-00001-of-00002.safetensors").exists());
        save_safetensors(dir.path(), "model", sample_tensors(), SaveDtype::F32, None).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["keep-00001-of-00002.safetensors", "model.safetensors"]
        );
    }

    #[test]
    fn rejects_bad_writes() {
        let dir = tempfile::tempdir().unwrap();
        let twice = vec![
            ("x".to_owned(), TensorData::new(vec![1.0f32], [1])),
            ("x".to_owned(), TensorData::new(vec![2.0f32], [1])),
        ];
        let err = save_safetensors(dir.path(), "model", twice, SaveDtype::F32, None).unwrap_err();
        assert!(
            matches!(&err, Error::DuplicateTensor { key } if key == "x"),
            "{err}"
        );
        let err =
            save_safetensors(dir.path(), "../model", vec![], SaveDtype::F32, None).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidConfig {
                key: "file_stem",
                ..
            }
        ));
    }

    #[test]
    fn parses_sizes_like_transformers() {
        let cases = [
            ("5GB", Some(5_000_000_000)),
            ("500MB", Some(500_000_000)),
            ("2GiB", Some(2 << 30)),
            ("10kb", Some(10_000)),
            ("1.5GB", Some(1_500_000_000)),
            (" 64 MiB ", Some(64 << 20)),
            ("1000", Some(1000)),
            ("12B", Some(12)),
            ("5 GB", Some(5_000_000_000)),
            ("", None),
            ("GB", None),
            ("5XB", None),
            ("-1GB", None),
            ("1.2.3MB", None),
            ("99999999999999999999TB", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text).ok(), want, "{text:?}");
        }
    }

    #[test]
    fn shard_names() {
        assert!(is_shard_name("model-00001-of-00002.safetensors", "model"));
        assert!(!is_shard_name("model-1-of-2.safetensors", "model"));
        assert!(!is_shard_name("model.safetensors", "model"));
        assert!(!is_shard_name(
            "adapter_model-00001-of-00002.safetensors",
            "model"
        ));
    }
}
