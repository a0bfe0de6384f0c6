//! TensorBoard's event files, as TensorFlow's `EventFileWriter` writes them, so that
//! `tensorboard --logdir work_dirs` shows a run while it trains.
//!
//! A file `events.out.tfevents.<seconds>.<host>` is a sequence of TFRecords: the data's
//! length (u64, little-endian), the masked CRC-32C of those 8 bytes, the data, the
//! masked CRC-32C of the data. Each record is one protobuf `Event` (TensorFlow's
//! `event.proto`): the first holds `file_version = "brain.Event:2"`, the others a
//! `Summary` of scalars (`simple_value`) or of text (a string tensor tagged with the
//! `text` plugin). The messages below are those protos' fields that are written.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::{Error, Result};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The training step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The first event of a file: `brain.Event:2`.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// Values at this step.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The series' name (`train/loss`, ...).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// A scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    /// A tensor (text: a string tensor).
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    /// Which plugin shows the tensor.
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `tensorflow.TensorProto`, for strings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DT_STRING` is 7.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// The shape.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    /// The strings.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    /// The dimensions.
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    /// Its size.
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    /// The plugin.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    /// `text` for text summaries.
    #[prost(string, tag = "1")]
    pub plugin_name: String,
}

const DT_STRING: i32 = 7;

/// TFRecord's checksum: CRC-32C, rotated and offset.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One event file, appended to record by record.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created), opened with its version record. A resumed
    /// run starts another file in the same folder, as TensorFlow's writers do.
    ///
    /// # Errors
    /// An unwritable folder.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "xtuner".into());
        let seconds = now() as u64;
        let mut path = dir.join(format!("events.out.tfevents.{seconds}.{host}"));
        // Two writers in one second (a run and its resume in a test) get two files.
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{seconds}.{host}.{n}"));
            n += 1;
        }
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        writer.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars at `step`, one series per tag.
    ///
    /// # Errors
    /// A failed write.
    pub fn scalars(&mut self, step: usize, values: &[(String, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                simple_value: Some(*v as f32),
                ..SummaryValue::default()
            })
            .collect();
        self.summary(step, Summary { value })
    }

    /// Text at `step` (markdown, as TensorBoard's text plugin shows it).
    ///
    /// # Errors
    /// A failed write.
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        let value = SummaryValue {
            tag: tag.into(),
            tensor: Some(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape {
                    dim: vec![Dim { size: 1 }],
                }),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                }),
            }),
            ..SummaryValue::default()
        };
        self.summary(step, Summary { value: vec![value] })
    }

    fn summary(&mut self, step: usize, summary: Summary) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            file_version: None,
            summary: Some(summary),
        })
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend(len);
        record.extend(masked_crc(&len).to_le_bytes());
        record.extend(&data);
        record.extend(masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&record)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes what is buffered, so that TensorBoard sees it.
    ///
    /// # Errors
    /// A failed write.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Every event of a file, each record's length and checksums verified.
///
/// # Errors
/// An unreadable file, a torn record, a checksum that does not match, or data that is
/// not an `Event`, naming the file and the record's offset.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    let bad = |offset: usize, what: &str| Error::Serialize {
        path: path.to_path_buf(),
        message: format!("record at byte {offset}: {what}"),
    };
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad(at, "torn header"))?;
        let (len, crc) = header.split_at(8);
        if masked_crc(len).to_le_bytes() != crc {
            return Err(bad(at, "length checksum does not match"));
        }
        let n = usize::try_from(u64::from_le_bytes(len.try_into().unwrap_or_default()))
            .map_err(|_| bad(at, "length too large"))?;
        let data = bytes
            .get(at + 12..at + 12 + n)
            .ok_or_else(|| bad(at, "torn data"))?;
        let crc = bytes
            .get(at + 12 + n..at + 16 + n)
            .ok_or_else(|| bad(at, "torn data checksum"))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad(at, "data checksum does not match"));
        }
        events.push(Event::decode(data).map_err(|e| bad(at, &e.to_string()))?);
        at += 16 + n;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TFRecord's masked CRC of known bytes (TensorFlow's `crc32c` test vectors: the
    /// CRC-32C of 32 zero bytes is 0x8a9136aa).
    #[test]
    fn checksums_are_tfrecords() {
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        // Rotated right by 15 and offset by 0xa282ead8, worked out by hand.
        assert_eq!(masked_crc(&[0u8; 32]), 0xfd7fffa);
    }

    #[test]
    fn events_read_back_and_torn_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("train/loss".into(), 1.5), ("train/lr".into(), 0.0)])
            .unwrap();
        w.text(3, "eval/answers", "**hi** -> yo").unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let values = &events[1].summary.as_ref().unwrap().value;
        assert_eq!((events[1].step, values[0].simple_value), (3, Some(1.5)));
        assert_eq!(
            values[1].simple_value,
            Some(0.0),
            "a zero is written, not skipped"
        );
        let text = events[2].summary.as_ref().unwrap().value[0]
            .tensor
            .clone()
            .unwrap();
        assert_eq!(text.string_val, vec![b"**hi** -> yo".to_vec()]);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_events(&path).is_err());
    }
}
