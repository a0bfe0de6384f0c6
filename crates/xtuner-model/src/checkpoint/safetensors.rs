//! Reading the safetensors file format: one memory-mapped file, its header and its tensors,
//! plus the JSON index that sends each key of a sharded checkpoint to its file.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header
//! (`{key: {dtype, shape, data_offsets}}` plus an optional `__metadata__` map of strings), then
//! the raw little-endian, row-major tensor bytes. Reading maps the file and converts one tensor
//! at a time, so the extra memory is one tensor, not the checkpoint.
//!
//! Writing lives in `save.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Metadata, TensorInfo};
use ::safetensors::{Dtype, SafeTensorError, SafeTensors};
use burn::tensor::TensorData;
use half::{bf16, f16};
use memmap2::Mmap;

use crate::{Error, Result};

/// Length of the header-size prefix of a safetensors file.
const N_LEN: usize = 8;

/// One memory-mapped `.safetensors` file with its parsed header.
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the tensor bytes: after the length prefix and the JSON header.
    data_start: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header, checking that the offsets cover the file exactly.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened; [`Error::PickleNotSupported`] when it is a
    /// PyTorch pickle; [`Error::Safetensors`] when the header is corrupt or the file truncated.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let io_error = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the map is read-only and owned by `self`, so no slice outlives it. Another
        // process truncating the file while it is mapped could fault a read; every mmap-based
        // loader (safetensors' `safe_open`, candle) accepts that to avoid copying the weights.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let (header_len, metadata) = match SafeTensors::read_metadata(&mmap) {
            Ok(parsed) => parsed,
            Err(_) if looks_like_pickle(&mmap) => {
                return Err(Error::PickleNotSupported {
                    path: path.to_path_buf(),
                });
            }
            Err(error) => return Err(safetensors_error(path, &error)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: N_LEN + header_len,
            metadata,
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor keys, in file order.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// The header entry of `key`.
    pub(crate) fn info(&self, key: &str) -> Option<&TensorInfo> {
        self.metadata.info(key)
    }

    /// `key` converted to f32 values (from F32, F16, BF16 or F64), with its shape.
    pub(crate) fn f32_values(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (info, bytes) = self.tensor_bytes(key)?;
        let values = match info.dtype {
            Dtype::F32 => decode(bytes, f32::from_le_bytes),
            Dtype::F16 => decode(bytes, |b| f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => decode(bytes, |b| bf16::from_le_bytes(b).to_f32()),
            // Narrowing is the point: the models compute in f32.
            Dtype::F64 => decode(bytes, |b| f64::from_le_bytes(b) as f32),
            dtype => return Err(unsupported(key, dtype)),
        };
        self.check_len(key, values.len(), &info.shape)?;
        Ok((values, info.shape.clone()))
    }

    /// `key` as f32 [`TensorData`].
    pub(crate) fn float_data(&self, key: &str) -> Result<TensorData> {
        let (values, shape) = self.f32_values(key)?;
        Ok(TensorData::new(values, shape))
    }

    /// `key` as i64 [`TensorData`] (from I64, I32, I16, I8, U32, U16, U8 or BOOL).
    pub(crate) fn int_data(&self, key: &str) -> Result<TensorData> {
        let (info, bytes) = self.tensor_bytes(key)?;
        let values: Vec<i64> = match info.dtype {
            Dtype::I64 => decode(bytes, i64::from_le_bytes),
            Dtype::I32 => decode(bytes, |b| i64::from(i32::from_le_bytes(b))),
            Dtype::I16 => decode(bytes, |b| i64::from(i16::from_le_bytes(b))),
            Dtype::I8 => decode(bytes, |b| i64::from(i8::from_le_bytes(b))),
            Dtype::U32 => decode(bytes, |b| i64::from(u32::from_le_bytes(b))),
            Dtype::U16 => decode(bytes, |b| i64::from(u16::from_le_bytes(b))),
            Dtype::U8 => decode(bytes, |[b]: [u8; 1]| i64::from(b)),
            Dtype::BOOL => decode(bytes, |[b]: [u8; 1]| i64::from(b != 0)),
            dtype => return Err(unsupported(key, dtype)),
        };
        self.check_len(key, values.len(), &info.shape)?;
        Ok(TensorData::new(values, info.shape.clone()))
    }

    /// The header entry and the bytes of `key`.
    fn tensor_bytes(&self, key: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.info(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_owned(),
            path: self.path.clone(),
        })?;
        let (begin, end) = info.data_offsets;
        let bytes = self
            .data_start
            .checked_add(begin)
            .zip(self.data_start.checked_add(end))
            .and_then(|(begin, end)| self.mmap.get(begin..end))
            .ok_or_else(|| Error::Safetensors {
                path: self.path.clone(),
                message: format!("tensor `{key}` lies outside the file"),
            })?;
        Ok((info, bytes))
    }

    /// Guards `TensorData::new`, which panics when the element count and shape disagree.
    fn check_len(&self, key: &str, len: usize, shape: &[usize]) -> Result<()> {
        if shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) == Some(len) {
            Ok(())
        } else {
            Err(Error::Safetensors {
                path: self.path.clone(),
                message: format!(
                    "tensor `{key}` has {len} elements, its shape {shape:?} says otherwise"
                ),
            })
        }
    }
}

/// Decodes little-endian elements of `N` bytes each.
fn decode<const N: usize, T>(bytes: &[u8], element: impl Fn([u8; N]) -> T) -> Vec<T> {
    let (chunks, _) = bytes.as_chunks::<N>();
    chunks.iter().map(|&chunk| element(chunk)).collect()
}

/// Whether `bytes` start like a `torch.save` file: a zip archive (PyTorch >= 1.6) or a raw
/// pickle (protocol 2 to 5).
fn looks_like_pickle(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || matches!(bytes, [0x80, 2..=5, ..])
}

/// [`Error::Safetensors`] for `path`.
pub(super) fn safetensors_error(path: &Path, error: &SafeTensorError) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

/// [`Error::UnsupportedDtype`] for a safetensors dtype.
fn unsupported(key: &str, dtype: Dtype) -> Error {
    Error::UnsupportedDtype {
        key: key.to_owned(),
        dtype: dtype.to_string(),
    }
}

/// The JSON index of a sharded checkpoint, as transformers writes and reads it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ShardIndex {
    /// `{"total_size": bytes}`; not needed for reading.
    #[serde(default)]
    pub(crate) metadata: Option<serde_json::Value>,
    /// Tensor key -> shard file name, relative to the index.
    pub(crate) weight_map: BTreeMap<String, String>,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::checkpoint::{SaveDtype, save_safetensors};

    /// The file written by `tests/data/make_half_dtypes.py` (Python safetensors 0.8 + numpy).
    const PYTHON_FILE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/half_dtypes.safetensors"
    );

    pub(crate) fn f32s(data: &TensorData) -> Vec<f32> {
        data.as_slice::<f32>().unwrap().to_vec()
    }

    pub(crate) fn sample_tensors() -> Vec<(String, TensorData)> {
        vec![
            (
                "b.weight".into(),
                TensorData::new(vec![1.0f32, -2.5, 3.25, 1e-3, 7.0, -0.1], [2, 3]),
            ),
            (
                "a.bias".into(),
                TensorData::new(vec![0.1f32, 1e30, -1e-30], [3]),
            ),
            (
                "scalar".into(),
                TensorData::new(vec![42.0f32], Vec::<usize>::new()),
            ),
            ("ids".into(), TensorData::new(vec![1i64, -100, 5], [3])),
        ]
    }

    pub(crate) fn read(path: &Path) -> SafetensorsFile {
        SafetensorsFile::open(path).unwrap()
    }

    #[test]
    fn f32_round_trip_is_exact_and_keeps_integers() {
        let dir = tempfile::tempdir().unwrap();
        let written =
            save_safetensors(dir.path(), "model", sample_tensors(), SaveDtype::F32, None).unwrap();
        assert_eq!(written, vec![dir.path().join("model.safetensors")]);
        let file = read(&written[0]);
        for (key, data) in sample_tensors() {
            if key == "ids" {
                assert_eq!(file.info(&key).unwrap().dtype, Dtype::I64);
                assert_eq!(file.int_data(&key).unwrap(), data);
            } else {
                let back = file.float_data(&key).unwrap();
                assert_eq!(back.shape, data.shape, "{key}");
                assert_eq!(f32s(&back), f32s(&data), "{key}");
            }
        }
        assert!(matches!(
            file.int_data("b.weight"),
            Err(Error::UnsupportedDtype { .. })
        ));
        assert!(matches!(
            file.float_data("ids"),
            Err(Error::UnsupportedDtype { .. })
        ));
        // Metadata as transformers writes it.
        let header = SafeTensors::read_metadata(&file.mmap).unwrap().1;
        assert_eq!(
            header
                .metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
    }

    #[test]
    fn reads_half_dtypes_written_by_python() {
        let file = read(Path::new(PYTHON_FILE));
        assert_eq!(file.info("f16").unwrap().dtype, Dtype::F16);
        assert_eq!(file.info("bf16").unwrap().dtype, Dtype::BF16);
        assert_eq!(
            file.float_data("f16").unwrap(),
            file.float_data("f16_as_f32").unwrap()
        );
        assert_eq!(
            file.float_data("bf16").unwrap(),
            file.float_data("bf16_as_f32").unwrap()
        );
        let f64s = f32s(&file.float_data("f64").unwrap());
        assert_eq!(f64s, vec![0.1f32, -2.0, f32::INFINITY]);
        let ints = |key| file.int_data(key).unwrap().to_vec::<i64>().unwrap();
        assert_eq!(ints("i32"), vec![-7, 0, 1, 2_147_483_647]);
        assert_eq!(ints("u8"), vec![0, 1, 255]);
        assert_eq!(ints("mask"), vec![1, 0, 1]);
    }

    #[test]
    fn bf16_rounding_matches_python() {
        let python = read(Path::new(PYTHON_FILE));
        let source = python.float_data("bf16_source").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let written = save_safetensors(
            dir.path(),
            "model",
            vec![("x".into(), source)],
            SaveDtype::BF16,
            None,
        )
        .unwrap();
        let ours = read(&written[0]);
        assert_eq!(
            ours.tensor_bytes("x").unwrap().1,
            python.tensor_bytes("bf16").unwrap().1
        );
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let written =
            save_safetensors(dir.path(), "model", sample_tensors(), SaveDtype::F32, None).unwrap();
        let bytes = std::fs::read(&written[0]).unwrap();
        let cases: [(&str, &[u8]); 5] = [
            ("truncated", &bytes[..bytes.len() - 3]),
            ("header_only", &bytes[..40]),
            ("empty", b""),
            ("garbage", b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header"),
            ("bad_json", b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"),
        ];
        for (name, content) in cases {
            let path = dir.path().join(format!("{name}.safetensors"));
            std::fs::write(&path, content).unwrap();
            let err = SafetensorsFile::open(&path).err().unwrap();
            assert!(
                matches!(err, Error::Safetensors { .. } | Error::Io { .. }),
                "{name}: {err}"
            );
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn pickle_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("zip.safetensors", &b"PK\x03\x04rest of a zip"[..]),
            ("raw", b"\x80\x02}q\x00."),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let err = SafetensorsFile::open(&path).err().unwrap();
            assert!(
                matches!(err, Error::PickleNotSupported { .. }),
                "{name}: {err}"
            );
        }
    }
}
