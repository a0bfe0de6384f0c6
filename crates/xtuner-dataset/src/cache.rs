//! The processed-dataset cache: the second run on the same inputs loads the training
//! rows instead of re-reading and re-tokenizing.
//!
//! The key is a hash of everything the result depends on: the content of every data
//! file, the [`DataSpec`] (format, columns, template, max_length, packing, seed...), the
//! tokenizer's fingerprint and this cache's format version. Any change gives a new key,
//! so a stale entry is never read. Entries are written to a temporary file and renamed,
//! and carry a checksum: a torn or corrupt entry is rebuilt, never trusted.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::pack::PackedRow;
use xtuner_template::JinjaTemplate;

use crate::pipeline::{DataSpec, DatasetStats, ProcessedDataset, process};
use crate::preference::{PairSpec, process_pairs};
use crate::reader::data_files;
use crate::tokenizer::{self, Tokenizer};
use crate::{Error, Result};

/// Bumped whenever the pipeline's output or this file layout changes.
const CACHE_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"XTRSDSC\0";

/// Whether a dataset came from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from this entry.
    Hit(PathBuf),
    /// Processed and stored in this entry.
    Built(PathBuf),
}

/// The cache key of a spec with a tokenizer (given by its [`tokenizer::fingerprint`]):
/// a hex digest.
///
/// # Errors
/// A data file that cannot be read.
pub fn cache_key(spec: &DataSpec, tokenizer_fingerprint: &str) -> Result<String> {
    key_of(spec, &spec.files, tokenizer_fingerprint)
}

/// The key of any spec: the version, the spec as JSON, the tokenizer's fingerprint and
/// every data file's name and content.
fn key_of<S: serde::Serialize>(
    spec: &S,
    files: &[PathBuf],
    tokenizer_fingerprint: &str,
) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&CACHE_VERSION.to_le_bytes());
    let spec_json = serde_json::to_vec(spec).map_err(|e| Error::Cache {
        path: PathBuf::new(),
        message: format!("cannot serialise the data spec: {e}"),
    })?;
    hasher.update(&spec_json);
    hasher.update(tokenizer_fingerprint.as_bytes());
    for file in data_files(files)? {
        hasher.update(file.to_string_lossy().as_bytes());
        // Memory-mapped and hashed on all cores: the whole cost of a cache hit is this.
        hasher
            .update_mmap_rayon(&file)
            .map_err(|e| Error::io(&file, e))?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Loads the processed dataset from `cache_dir` when an entry for these exact inputs
/// exists, else loads the tokenizer at `tokenizer_path`, processes the data and stores
/// the result there (a hit never parses the tokenizer).
///
/// # Errors
/// Those of [`process`], and a cache directory that cannot be written.
pub fn load_or_process(
    spec: &DataSpec,
    tokenizer_path: &Path,
    cache_dir: &Path,
) -> Result<(ProcessedDataset, CacheOutcome)> {
    spec.validate()?;
    let key = cache_key(spec, &tokenizer::fingerprint(tokenizer_path)?)?;
    load_or_build(&cache_dir.join(format!("{key}.bin")), || {
        process(spec, &Tokenizer::from_path(tokenizer_path)?)
    })
}

/// [`load_or_process`] for preference data: the pairs of `spec`, rendered with the
/// tokenizer's own chat template (which its fingerprint covers).
///
/// # Errors
/// Those of [`process_pairs`]; a tokenizer without a chat template; a cache directory
/// that cannot be written.
pub fn load_or_process_pairs(
    spec: &PairSpec,
    tokenizer_path: &Path,
    cache_dir: &Path,
) -> Result<(ProcessedDataset, CacheOutcome)> {
    // "pairs" keeps these entries apart from supervised ones of the same files.
    let key = key_of(
        &("pairs", spec),
        &spec.files,
        &tokenizer::fingerprint(tokenizer_path)?,
    )?;
    load_or_build(&cache_dir.join(format!("{key}.bin")), || {
        let template = JinjaTemplate::from_tokenizer_dir(tokenizer_path)
            .map_err(|source| Error::ChatTemplate { source })?
            .ok_or_else(|| Error::Tokenizer {
                path: tokenizer_path.to_path_buf(),
                message: "no chat_template (tokenizer_config.json or chat_template.jinja): \
                          preference data is rendered with the tokenizer's own template"
                    .into(),
            })?;
        process_pairs(spec, &template, &Tokenizer::from_path(tokenizer_path)?)
    })
}

/// The entry at `path` if it is whole, else `build`'s result, stored there.
fn load_or_build(
    path: &Path,
    build: impl FnOnce() -> Result<ProcessedDataset>,
) -> Result<(ProcessedDataset, CacheOutcome)> {
    let path = path.to_path_buf();
    match read_entry(&path) {
        Ok(Some(dataset)) => {
            tracing::info!(path = %path.display(), rows = dataset.rows.len(), "dataset cache hit");
            return Ok((dataset, CacheOutcome::Hit(path)));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("ignoring unreadable dataset cache entry: {e}"),
    }
    let dataset = build()?;
    write_entry(&path, &dataset)?;
    tracing::info!(path = %path.display(), "dataset cached");
    Ok((dataset, CacheOutcome::Built(path)))
}

/// A temporary file beside the entry, readable as any file the user creates is (mode
/// 0666 less the umask, 0644 usually: a cache a team shares on one machine), where
/// `tempfile` would make it private to its writer.
fn shared_temp_file(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))
}

fn cache_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Cache {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Layout: MAGIC, version u32, payload length u64, blake3(payload) [32], payload.
/// Payload: stats JSON (u64 length + bytes), rows u64, then per-row lengths (u32),
/// per-row boundary counts (u32), all ids (i32), all labels (i32), all boundaries (u32),
/// images JSON (u64 length + bytes). Little-endian throughout.
fn write_entry(path: &Path, dataset: &ProcessedDataset) -> Result<()> {
    let mut payload = Vec::new();
    let put_json = |payload: &mut Vec<u8>, bytes: Vec<u8>| {
        payload.extend((bytes.len() as u64).to_le_bytes());
        payload.extend(bytes);
    };
    let stats = serde_json::to_vec(&dataset.stats).map_err(|e| cache_error(path, e.to_string()))?;
    put_json(&mut payload, stats);
    payload.extend((dataset.rows.len() as u64).to_le_bytes());
    for row in &dataset.rows {
        payload.extend((row.input_ids.len() as u32).to_le_bytes());
    }
    for row in &dataset.rows {
        payload.extend((row.cumulative_len.len() as u32).to_le_bytes());
    }
    for row in &dataset.rows {
        let ids = i32_values(&row.input_ids)
            .ok_or_else(|| cache_error(path, "token id out of i32 range"))?;
        payload.extend(ids);
    }
    for row in &dataset.rows {
        let labels =
            i32_values(&row.labels).ok_or_else(|| cache_error(path, "label out of i32 range"))?;
        payload.extend(labels);
    }
    for row in &dataset.rows {
        payload.extend(
            row.cumulative_len
                .iter()
                .flat_map(|&c| (c as u32).to_le_bytes()),
        );
    }
    let images =
        serde_json::to_vec(&dataset.images).map_err(|e| cache_error(path, e.to_string()))?;
    put_json(&mut payload, images);
    let sources =
        serde_json::to_vec(&dataset.sources).map_err(|e| cache_error(path, e.to_string()))?;
    put_json(&mut payload, sources);

    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = shared_temp_file(dir)?;
    let mut header = Vec::with_capacity(52);
    header.extend(MAGIC);
    header.extend(CACHE_VERSION.to_le_bytes());
    header.extend((payload.len() as u64).to_le_bytes());
    header.extend(blake3::hash(&payload).as_bytes());
    tmp.write_all(&header)
        .and_then(|()| tmp.write_all(&payload))
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

fn i32_values(values: &[i64]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for &v in values {
        out.extend(i32::try_from(v).ok()?.to_le_bytes());
    }
    Some(out)
}

/// A cursor over the payload that fails (instead of panicking) past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32s(&mut self, n: usize) -> Option<impl Iterator<Item = u32> + 'a> {
        let bytes = self.take(n.checked_mul(4)?)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        )
    }

    fn i64s_from_i32(&mut self, n: usize) -> Option<Vec<i64>> {
        let bytes = self.take(n.checked_mul(4)?)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        )
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        let len = usize::try_from(self.u64()?).ok()?;
        serde_json::from_slice(self.take(len)?).ok()
    }
}

/// `Ok(None)` when there is no entry; `Err` when the entry is there but unusable.
fn read_entry(path: &Path) -> Result<Option<ProcessedDataset>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let corrupt = || cache_error(path, "truncated or corrupt entry");
    let mut cur = Cursor { bytes: &bytes };
    if cur.take(8) != Some(MAGIC.as_slice()) {
        return Err(corrupt());
    }
    let version = cur
        .take(4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if version != Some(CACHE_VERSION) {
        return Err(cache_error(path, "written by another version"));
    }
    let len = cur
        .u64()
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(corrupt)?;
    let checksum = cur.take(32).ok_or_else(corrupt)?;
    let payload = cur.take(len).ok_or_else(corrupt)?;
    if blake3::hash(payload).as_bytes().as_slice() != checksum {
        return Err(cache_error(path, "checksum mismatch"));
    }
    decode_payload(payload).ok_or_else(corrupt).map(Some)
}

fn decode_payload(payload: &[u8]) -> Option<ProcessedDataset> {
    let mut cur = Cursor { bytes: payload };
    let stats: DatasetStats = cur.json()?;
    let n = usize::try_from(cur.u64()?).ok()?;
    let lens: Vec<usize> = cur.u32s(n)?.map(|l| l as usize).collect();
    let cu_lens: Vec<usize> = cur.u32s(n)?.map(|l| l as usize).collect();
    let mut rows: Vec<PackedRow> = Vec::with_capacity(n);
    for &len in &lens {
        rows.push(PackedRow {
            input_ids: cur.i64s_from_i32(len)?,
            ..PackedRow::default()
        });
    }
    for (row, &len) in rows.iter_mut().zip(&lens) {
        row.labels = cur.i64s_from_i32(len)?;
    }
    for (row, &len) in rows.iter_mut().zip(&cu_lens) {
        row.cumulative_len = cur.u32s(len)?.map(|c| c as usize).collect();
    }
    let images: Vec<Option<String>> = cur.json()?;
    let sources: Vec<String> = cur.json()?;
    Some(ProcessedDataset {
        rows,
        images,
        sources,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::DataFormat;
    use xtuner_template::PromptTemplate;

    fn tokenizer_path() -> std::path::PathBuf {
        crate::test_support::fixture("tokenizer")
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_path(&tokenizer_path()).unwrap()
    }

    fn spec(dir: &Path) -> DataSpec {
        let data = dir.join("data.jsonl");
        let mut text = String::new();
        for i in 0..50 {
            text += &format!(
                "{{\"instruction\": \"Add {i} and 1.\", \"input\": \"\", \"output\": \"{}\"}}\n",
                i + 1
            );
        }
        fs::write(&data, text).unwrap();
        DataSpec {
            files: vec![data],
            format: DataFormat::Alpaca,
            columns: Default::default(),
            template: Some(PromptTemplate::Internlm2Chat.template()),
            chat_template: false,
            max_length: 64,
            pack_to_max_length: true,
            shuffle_before_pack: true,
            seed: 0,
            max_dataset_length: None,
            skip_bad_records: false,
        }
    }

    #[test]
    fn second_run_hits_and_equals_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let cache = dir.path().join("cache");
        let (first, outcome) = load_or_process(&spec, &tokenizer_path(), &cache).unwrap();
        assert!(matches!(outcome, CacheOutcome::Built(_)));
        let (second, outcome) = load_or_process(&spec, &tokenizer_path(), &cache).unwrap();
        assert!(matches!(outcome, CacheOutcome::Hit(_)));
        assert_eq!(first, second);
        assert_eq!(first, process(&spec, &tokenizer()).unwrap());
        assert_eq!(
            tokenizer().fingerprint(),
            tokenizer::fingerprint(&tokenizer_path()).unwrap()
        );
    }

    #[test]
    fn any_input_change_rebuilds() {
        let dir = tempfile::tempdir().unwrap();
        let base = spec(dir.path());
        let tok = tokenizer::fingerprint(&tokenizer_path()).unwrap();
        let key = cache_key(&base, &tok).unwrap();
        let variants = [
            DataSpec {
                max_length: 65,
                ..base.clone()
            },
            DataSpec {
                pack_to_max_length: false,
                ..base.clone()
            },
            DataSpec {
                seed: 1,
                ..base.clone()
            },
            DataSpec {
                template: Some(PromptTemplate::QwenChat.template()),
                ..base.clone()
            },
        ];
        for v in &variants {
            assert_ne!(cache_key(v, &tok).unwrap(), key);
        }
        // Same spec, edited data file.
        let mut text = fs::read_to_string(&base.files[0]).unwrap();
        text = text.replacen("Add 0", "Add 00", 1);
        fs::write(&base.files[0], text).unwrap();
        assert_ne!(cache_key(&base, &tok).unwrap(), key);
    }

    /// An entry is as readable as a file the user creates (0644 with the usual umask),
    /// not private to its writer.
    #[cfg(unix)]
    #[test]
    fn entries_are_readable_as_other_files_are() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (_, outcome) = load_or_process(
            &spec(dir.path()),
            &tokenizer_path(),
            &dir.path().join("cache"),
        )
        .unwrap();
        let CacheOutcome::Built(entry) = outcome else {
            panic!("a first run builds")
        };
        let plain = dir.path().join("plain");
        fs::File::create(&plain).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&entry), mode(&plain));
    }

    #[test]
    fn corrupt_entries_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let cache = dir.path().join("cache");
        let (first, outcome) = load_or_process(&spec, &tokenizer_path(), &cache).unwrap();
        let CacheOutcome::Built(path) = outcome else {
            panic!("expected a build")
        };
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let (again, outcome) = load_or_process(&spec, &tokenizer_path(), &cache).unwrap();
        assert!(matches!(outcome, CacheOutcome::Built(_)));
        assert_eq!(first, again);
        fs::write(&path, &bytes[..20]).unwrap();
        assert!(read_entry(&path).is_err());
    }
}
