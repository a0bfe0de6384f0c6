//! Reading raw records from data files: JSON, JSON Lines and Parquet.
//!
//! Inputs are files or folders; a folder stands for every `.json`, `.jsonl` and `.parquet`
//! file under it. Every record keeps the file and line it came from, so that a record the
//! format rejects can be reported as `file:line`. What a record *means* is the business of
//! [`crate::format`]; here a record is any JSON object.
//!
//! - `.json`: a JSON array of objects, or, when the file starts with `{`, JSON Lines
//!   (many "JSON" data sets are really line-delimited).
//! - `.jsonl`: one object per line; blank lines are skipped.
//! - `.parquet`: a table as Hugging Face `datasets` saves it (`to_parquet`, or a Hub
//!   snapshot); each row becomes an object, nested lists and structs included, and its
//!   "line" is its 1-based row number.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::file::reader::SerializedFileReader;
use parquet::record::Field;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use crate::format::FormatError;
use crate::{Error, Result};

/// One raw record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The file it was read from (shared by all records of the file).
    pub path: Arc<Path>,
    /// 1-based line where the record starts; for Parquet, the 1-based row number.
    pub line: usize,
    /// The record: always a JSON object.
    pub value: Value,
}

/// The kinds of data file, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Json,
    JsonLines,
    Parquet,
}

impl FileKind {
    fn of(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "json" => Some(FileKind::Json),
            "jsonl" => Some(FileKind::JsonLines),
            "parquet" => Some(FileKind::Parquet),
            _ => None,
        }
    }
}

/// Reads every record of every input, inputs in the given order and records in file order.
///
/// An input is a data file or a folder; a folder is searched recursively for `.json`,
/// `.jsonl` and `.parquet` files (see [`data_files`]).
///
/// # Errors
/// [`Error::NoDataFiles`] when an input is neither a folder nor a data file, or a folder
/// holds none (and when `inputs` is empty), [`Error::Io`] when a path cannot be read,
/// [`Error::MalformedJson`] with the line of a JSON syntax error, [`Error::Parquet`] for an
/// unreadable Parquet file and [`Error::BadRecord`] for a record that is not an object.
pub fn read_records(inputs: &[PathBuf]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for file in data_files(inputs)? {
        records.extend(read_file(&file)?);
    }
    Ok(records)
}

/// The data files the inputs stand for, in reading order: each input in turn, a folder
/// expanded to the `.json`, `.jsonl` and `.parquet` files under it, sorted by path.
///
/// Folder search follows symbolic links (Hugging Face Hub snapshots are links into a blob
/// store) and skips hidden entries (names starting with `.`, like `.cache` or `.git`).
///
/// # Errors
/// [`Error::Io`] for a path that cannot be read, [`Error::NoDataFiles`] for an input that
/// is not a data file or a folder holding one (or when `inputs` is empty).
pub fn data_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let metadata = fs::metadata(input).map_err(|err| Error::io(input, err))?;
        if metadata.is_dir() {
            let mut found = Vec::new();
            let mut visited = HashSet::new();
            collect_data_files(input, &mut found, &mut visited)?;
            if found.is_empty() {
                return Err(Error::NoDataFiles {
                    path: input.clone(),
                });
            }
            found.sort();
            files.extend(found);
        } else if FileKind::of(input).is_some() {
            files.push(input.clone());
        } else {
            return Err(Error::NoDataFiles {
                path: input.clone(),
            });
        }
    }
    if files.is_empty() {
        return Err(Error::NoDataFiles {
            path: PathBuf::new(),
        });
    }
    Ok(files)
}

fn collect_data_files(
    folder: &Path,
    found: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
) -> Result<()> {
    // A link back up the tree would otherwise recurse forever.
    let canonical = fs::canonicalize(folder).map_err(|err| Error::io(folder, err))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    for entry in fs::read_dir(folder).map_err(|err| Error::io(folder, err))? {
        let entry = entry.map_err(|err| Error::io(folder, err))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let metadata = fs::metadata(&path).map_err(|err| Error::io(&path, err))?;
        if metadata.is_dir() {
            collect_data_files(&path, found, visited)?;
        } else if FileKind::of(&path).is_some() {
            found.push(path);
        }
    }
    Ok(())
}

/// Reads one data file, its kind told by its extension (`.json`, `.jsonl`, `.parquet`).
///
/// # Errors
/// As [`read_records`]; [`Error::NoDataFiles`] for any other extension.
pub fn read_file(path: &Path) -> Result<Vec<Record>> {
    let kind = FileKind::of(path).ok_or_else(|| Error::NoDataFiles {
        path: path.to_path_buf(),
    })?;
    let shared: Arc<Path> = Arc::from(path);
    match kind {
        FileKind::Parquet => read_parquet(&shared),
        FileKind::Json | FileKind::JsonLines => {
            let bytes = fs::read(path).map_err(|err| Error::io(path, err))?;
            read_json_bytes(&shared, &bytes, kind)
        }
    }
}

/// Parses a JSON or JSON Lines file's bytes.
fn read_json_bytes(path: &Arc<Path>, bytes: &[u8], kind: FileKind) -> Result<Vec<Record>> {
    let text = std::str::from_utf8(bytes).map_err(|err| Error::MalformedJson {
        path: path.to_path_buf(),
        line: line_at(bytes, err.valid_up_to()),
        message: format!("invalid UTF-8 after byte {}", err.valid_up_to()),
    })?;
    // Editors on Windows like to start files with a byte-order mark; JSON forbids it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let body = text.trim_start_matches(is_json_space);
    if body.is_empty() {
        Ok(Vec::new())
    } else if kind == FileKind::Json && !body.starts_with('{') {
        read_json_array(path, text)
    } else {
        read_json_lines(path, text)
    }
}

/// A JSON array of objects; each record's line is the line of its opening brace.
fn read_json_array(path: &Arc<Path>, text: &str) -> Result<Vec<Record>> {
    let elements: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|err| malformed(path, err.line(), &err))?;
    let mut records = Vec::with_capacity(elements.len());
    let mut lines = LineCounter::new(text);
    for element in elements {
        let line = lines.line_of(offset_in(text, element.get()));
        let value: Value =
            serde_json::from_str(element.get()).map_err(|err| malformed(path, line, &err))?;
        records.push(record(path, line, value)?);
    }
    Ok(records)
}

/// JSON Lines: one value per line, blank lines skipped.
fn read_json_lines(path: &Arc<Path>, text: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        if line.trim_matches(is_json_space).is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|err| malformed(path, index + 1, &err))?;
        records.push(record(path, index + 1, value)?);
    }
    Ok(records)
}

/// Wraps a value as a record, refusing anything but an object.
fn record(path: &Arc<Path>, line: usize, value: Value) -> Result<Record> {
    if value.is_object() {
        Ok(Record {
            path: Arc::clone(path),
            line,
            value,
        })
    } else {
        let found = crate::format::type_name(&value);
        Err(Error::BadRecord {
            path: path.to_path_buf(),
            line,
            source: FormatError::NotAnObject { found },
        })
    }
}

/// A serde_json syntax error at `line`, worded without serde_json's own "at line L column C"
/// (which, for JSON Lines, counts from the start of the line rather than of the file).
fn malformed(path: &Arc<Path>, line: usize, err: &serde_json::Error) -> Error {
    let text = err.to_string();
    let location = format!(" at line {} column {}", err.line(), err.column());
    let message = match text.strip_suffix(&location) {
        Some(message) if err.line() > 0 => format!("{message} (column {})", err.column()),
        _ => text,
    };
    Error::MalformedJson {
        path: path.to_path_buf(),
        line: line.max(1),
        message,
    }
}

/// JSON's whitespace (RFC 8259): space, tab, line feed, carriage return.
fn is_json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The byte offset of `part` inside `whole`, which it borrows from.
fn offset_in(whole: &str, part: &str) -> usize {
    (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize)
}

/// 1-based line of a byte offset.
fn line_at(bytes: &[u8], offset: usize) -> usize {
    1 + bytes.iter().take(offset).filter(|&&b| b == b'\n').count()
}

/// Turns increasing byte offsets into line numbers without rescanning from the start.
struct LineCounter<'a> {
    text: &'a str,
    offset: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            offset: 0,
            line: 1,
        }
    }

    fn line_of(&mut self, offset: usize) -> usize {
        if offset < self.offset {
            *self = Self::new(self.text);
        }
        let skipped = self
            .text
            .as_bytes()
            .get(self.offset..offset)
            .unwrap_or_default();
        self.line += skipped.iter().filter(|&&b| b == b'\n').count();
        self.offset = offset;
        self.line
    }
}

/// Every row of a Parquet file as a JSON object.
fn read_parquet(path: &Arc<Path>) -> Result<Vec<Record>> {
    let parquet_error = |err: parquet::errors::ParquetError| Error::Parquet {
        path: path.to_path_buf(),
        message: err.to_string(),
    };
    let file = fs::File::open(path).map_err(|err| Error::io(path.to_path_buf(), err))?;
    let reader = SerializedFileReader::new(file).map_err(parquet_error)?;
    let mut records = Vec::new();
    for (index, row) in reader.into_iter().enumerate() {
        let row = row.map_err(parquet_error)?;
        let value = Value::Object(group_to_json(row.into_columns()));
        records.push(Record {
            path: Arc::clone(path),
            line: index + 1,
            value,
        });
    }
    Ok(records)
}

fn group_to_json(columns: Vec<(String, Field)>) -> Map<String, Value> {
    columns
        .into_iter()
        .map(|(name, field)| (name, field_to_json(field)))
        .collect()
}

/// One Parquet value as JSON: strings, numbers, booleans and nulls as such, lists as arrays,
/// structs and maps as objects. Binary that is valid UTF-8 becomes a string, other binary an
/// array of bytes; decimals, dates and times become the strings Parquet prints for them.
fn field_to_json(field: Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(value) => Value::Bool(value),
        Field::Byte(value) => Value::from(value),
        Field::Short(value) => Value::from(value),
        Field::Int(value) => Value::from(value),
        Field::Long(value) => Value::from(value),
        Field::UByte(value) => Value::from(value),
        Field::UShort(value) => Value::from(value),
        Field::UInt(value) => Value::from(value),
        Field::ULong(value) => Value::from(value),
        Field::Float16(value) => float(f64::from(value)),
        Field::Float(value) => float(f64::from(value)),
        Field::Double(value) => float(value),
        Field::Str(text) => Value::String(text),
        Field::Bytes(bytes) => match std::str::from_utf8(bytes.data()) {
            Ok(text) => Value::String(text.to_string()),
            Err(_) => Value::Array(bytes.data().iter().map(|&b| Value::from(b)).collect()),
        },
        Field::Group(row) => Value::Object(group_to_json(row.into_columns())),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().cloned().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(key, value)| {
                    let key = match field_to_json(key.clone()) {
                        Value::String(key) => key,
                        other => other.to_string(),
                    };
                    (key, field_to_json(value.clone()))
                })
                .collect(),
        ),
        other @ (Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_)) => Value::String(other.to_string()),
    }
}

/// A float as a JSON number; NaN and infinities (which JSON cannot hold) become null.
fn float(value: f64) -> Value {
    Number::from_f64(value).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PARQUET_FIXTURE: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llava_rows.parquet");

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, content).unwrap();
        path
    }

    fn lines_and_values(records: &[Record]) -> Vec<(usize, Value)> {
        records.iter().map(|r| (r.line, r.value.clone())).collect()
    }

    #[test]
    fn json_files_give_each_record_its_line() {
        // (file name, content, (line, record) for every record)
        type Case = (&'static str, &'static str, Vec<(usize, Value)>);
        let cases: Vec<Case> = vec![
            (
                "array.json",
                "[\n  {\"a\": 1},\n  {\"a\": 2,\n   \"b\": [3]},\n\n  {\"a\": \"x\\ny\"}, {\"a\": 4}\n]\n",
                vec![
                    (2, json!({"a": 1})),
                    (3, json!({"a": 2, "b": [3]})),
                    (6, json!({"a": "x\ny"})),
                    (6, json!({"a": 4})),
                ],
            ),
            (
                "compact.json",
                "[{\"a\":1},{\"a\":2}]",
                vec![(1, json!({"a": 1})), (1, json!({"a": 2}))],
            ),
            ("empty_array.json", " [ ] ", vec![]),
            ("empty.json", "", vec![]),
            ("blank.jsonl", "\n \r\n", vec![]),
            // A .json file that starts with `{` is JSON Lines.
            (
                "lines.json",
                "{\"a\": 1}\n{\"a\": 2}\n",
                vec![(1, json!({"a": 1})), (2, json!({"a": 2}))],
            ),
            (
                "lines.jsonl",
                "\n{\"a\": 1}\r\n\n   \n{\"a\": [1, {\"b\": null}]}\n\n",
                vec![(2, json!({"a": 1})), (5, json!({"a": [1, {"b": null}]}))],
            ),
            (
                "bom.jsonl",
                "\u{feff}{\"a\": 1}\n",
                vec![(1, json!({"a": 1}))],
            ),
            (
                "bom.json",
                "\u{feff}\n[{\"a\": 1}]",
                vec![(2, json!({"a": 1}))],
            ),
            ("UPPER.JSONL", "{\"a\": 1}", vec![(1, json!({"a": 1}))]),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (name, content, want) in cases {
            let path = write(dir.path(), name, content.as_bytes());
            let records = read_records(std::slice::from_ref(&path)).unwrap();
            assert_eq!(lines_and_values(&records), want, "{name}");
            assert!(records.iter().all(|r| *r.path == *path), "{name}");
        }
    }

    #[test]
    fn malformed_json_is_reported_with_its_line() {
        // (file name, content, line of the error, text in the message)
        let cases = [
            (
                "array.json",
                "[\n  {\"a\": 1},\n  {\"a\": 2,,}\n]",
                3,
                "key must be a string (column 11)",
            ),
            (
                "unclosed.json",
                "[\n  {\"a\": 1}\n",
                3,
                "EOF while parsing a list",
            ),
            (
                "trailing.json",
                "[{\"a\": 1}]\n\nx",
                3,
                "trailing characters",
            ),
            (
                "lines.jsonl",
                "{\"a\": 1}\n\n{\"a\": }\n",
                3,
                "expected value (column 7)",
            ),
            (
                "truncated.jsonl",
                "{\"a\": 1\n{\"a\": 2}\n",
                1,
                "EOF while parsing an object",
            ),
            ("lines.json", "{\"a\": 1}\n[", 2, "EOF while parsing a list"),
            ("scalar.json", "\n\"text\"", 2, "expected a sequence"),
            (
                "utf8.jsonl",
                "{\"a\": 1}\n{\"a\": \"\u{0}\"}",
                2,
                "control character",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (name, content, line, text) in cases {
            let path = write(dir.path(), name, content.as_bytes());
            let err = read_records(std::slice::from_ref(&path)).unwrap_err();
            let Error::MalformedJson {
                path: got_path,
                line: got_line,
                message,
            } = &err
            else {
                panic!("{name}: {err:?}");
            };
            assert_eq!((got_path, *got_line), (&path, line), "{name}: {err}");
            assert!(message.contains(text), "{name}: {message}");
            assert!(!message.contains(" at line "), "{name}: {message}");
            assert!(
                err.to_string()
                    .starts_with(&format!("{}:{line}: malformed JSON: ", path.display()))
            );
        }
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "bad.jsonl", b"{\"a\": 1}\n{\"a\": \"\xff\"}\n");
        let err = read_records(&[path]).unwrap_err();
        assert!(
            matches!(err, Error::MalformedJson { line: 2, ref message, .. } if message.contains("UTF-8")),
            "{err}"
        );
    }

    #[test]
    fn records_that_are_not_objects_are_bad_records() {
        // (file name, content, line of the bad record, what it is)
        let cases = [
            ("array.json", "[\n {\"a\": 1},\n 5\n]", 3, "a number"),
            ("nested.json", "[[{\"a\": 1}]]", 1, "an array"),
            ("lines.jsonl", "{\"a\": 1}\n\"text\"\n", 2, "a string"),
            ("null.jsonl", "null", 1, "null"),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (name, content, line, found) in cases {
            let path = write(dir.path(), name, content.as_bytes());
            let err = read_records(std::slice::from_ref(&path)).unwrap_err();
            let Error::BadRecord {
                path: got,
                line: got_line,
                source,
            } = &err
            else {
                panic!("{name}: {err:?}")
            };
            assert_eq!((got, *got_line), (&path, line), "{name}");
            assert_eq!(source, &FormatError::NotAnObject { found }, "{name}");
            assert_eq!(
                err.to_string(),
                format!(
                    "{}:{line}: the record is {found}, not a JSON object",
                    path.display()
                )
            );
        }
    }

    #[test]
    fn folders_are_searched_recursively_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        write(&root, "b.jsonl", b"{\"n\": \"b\"}");
        write(&root, "a/z.json", b"[{\"n\": \"a/z\"}]");
        write(&root, "a/c.jsonl", b"{\"n\": \"a/c\"}");
        write(&root, "README.md", b"# not data");
        write(&root, "dataset_script.py", b"print()");
        write(&root, ".cache/x.json", b"not even json");
        write(&root, ".hidden.jsonl", b"not even json");
        let single = write(dir.path(), "single.jsonl", b"{\"n\": \"single\"}");

        let files = data_files(&[single.clone(), root.clone()]).unwrap();
        assert_eq!(
            files,
            vec![
                single.clone(),
                root.join("a/c.jsonl"),
                root.join("a/z.json"),
                root.join("b.jsonl")
            ]
        );

        // Inputs keep their order; a folder's files are sorted.
        let records = read_records(&[root.clone(), single.clone()]).unwrap();
        let names: Vec<&str> = records
            .iter()
            .map(|r| r.value["n"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a/c", "a/z", "b", "single"]);
        assert_eq!(*records[0].path, *root.join("a/c.jsonl"));
    }

    #[cfg(unix)]
    #[test]
    fn folder_search_follows_links_without_looping() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        let blob = write(&blobs, "1234abcd", b"{\"n\": 1}");
        let snapshot = dir.path().join("snapshot");
        fs::create_dir_all(snapshot.join("data")).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join("data/train.jsonl")).unwrap();
        std::os::unix::fs::symlink(&snapshot, snapshot.join("data/loop")).unwrap();
        let records = read_records(std::slice::from_ref(&snapshot)).unwrap();
        assert_eq!(lines_and_values(&records), vec![(1, json!({"n": 1}))]);
    }

    #[test]
    fn inputs_without_data_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        fs::create_dir_all(empty.join("sub")).unwrap();
        write(&empty, "notes.txt", b"x");
        let csv = write(dir.path(), "data.csv", b"a,b\n1,2\n");
        for (inputs, culprit) in [
            (vec![empty.clone()], empty.clone()),
            (vec![csv.clone()], csv.clone()),
            (vec![], PathBuf::new()),
        ] {
            let err = read_records(&inputs).unwrap_err();
            assert!(
                matches!(&err, Error::NoDataFiles { path } if *path == culprit),
                "{inputs:?}: {err:?}"
            );
        }
        let missing = dir.path().join("missing.jsonl");
        let err = read_records(std::slice::from_ref(&missing)).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, source } if *path == missing && source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
    }

    #[test]
    fn parquet_rows_become_objects_with_nested_lists() {
        // Written by tests/data/make_llava_rows_parquet.py (pyarrow, two row groups).
        let records = read_records(&[PathBuf::from(PARQUET_FIXTURE)]).unwrap();
        let want = vec![
            (
                1,
                json!({
                    "id": 1, "image": "coco/0001.jpg",
                    "conversations": [
                        {"from": "human", "value": "What is in the picture?\n<image>"},
                        {"from": "gpt", "value": "Two cats on a sofa."},
                    ],
                    "input_ids": [1, 2, 3], "score": 0.5, "ok": true,
                }),
            ),
            (
                2,
                json!({
                    "id": 2, "image": null,
                    "conversations": [
                        {"from": "human", "value": "Say hi."},
                        {"from": "gpt", "value": "Hi!"},
                        {"from": "human", "value": "Again, in Chinese."},
                        {"from": "gpt", "value": "你好！"},
                    ],
                    "input_ids": [], "score": null, "ok": false,
                }),
            ),
            (
                3,
                json!({
                    "id": 3, "image": "coco/0003.jpg", "conversations": [],
                    "input_ids": null, "score": -1.25, "ok": null,
                }),
            ),
        ];
        assert_eq!(lines_and_values(&records), want);
    }

    #[test]
    fn parquet_rows_map_through_a_format() {
        use crate::format::{ColumnMap, DataFormat, Sample};
        use xtuner_template::Turn;
        let records = read_records(&[PathBuf::from(PARQUET_FIXTURE)]).unwrap();
        let sample = DataFormat::Llava
            .map(&records[0].value, &ColumnMap::new())
            .unwrap();
        let Sample::Conversation {
            conversation,
            image,
        } = sample
        else {
            panic!("{sample:?}")
        };
        assert_eq!(
            conversation.conversation,
            vec![Turn::new(
                "<image>\nWhat is in the picture?",
                "Two cats on a sofa."
            )]
        );
        assert_eq!(image.as_deref(), Some("coco/0001.jpg"));
    }

    #[test]
    fn broken_parquet_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8]); 2] = [
            ("garbage.parquet", b"PAR1 this is not parquet"),
            ("empty.parquet", b""),
        ];
        for (name, content) in cases {
            let path = write(dir.path(), name, content);
            let err = read_records(std::slice::from_ref(&path)).unwrap_err();
            assert!(
                matches!(&err, Error::Parquet { path: got, .. } if *got == path),
                "{name}: {err:?}"
            );
        }
        // A truncated copy of a real file.
        let bytes = fs::read(PARQUET_FIXTURE).unwrap();
        let path = write(dir.path(), "truncated.parquet", &bytes[..bytes.len() / 2]);
        assert!(matches!(
            read_records(&[path]).unwrap_err(),
            Error::Parquet { .. }
        ));
    }

    #[test]
    fn parquet_values_convert_to_json() {
        use parquet::data_type::ByteArray;
        use parquet::record::Row;
        // (parquet field, JSON value)
        let cases = [
            (Field::Null, Value::Null),
            (Field::Byte(-3), json!(-3)),
            (Field::ULong(u64::MAX), json!(u64::MAX)),
            (Field::Float(1.5), json!(1.5)),
            (Field::Double(f64::NAN), Value::Null),
            (
                Field::Bytes(ByteArray::from("héllo".as_bytes().to_vec())),
                json!("héllo"),
            ),
            (
                Field::Bytes(ByteArray::from(vec![0xff_u8, 0])),
                json!([255, 0]),
            ),
            (
                Field::Group(Row::new(vec![("k".into(), Field::Str("v".into()))])),
                json!({"k": "v"}),
            ),
        ];
        for (field, want) in cases {
            assert_eq!(field_to_json(field.clone()), want, "{field:?}");
        }
    }
}
