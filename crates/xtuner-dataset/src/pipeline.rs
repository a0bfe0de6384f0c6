//! The whole data pipeline of XTuner's `process_hf_dataset`, on all cores:
//! read → map (format) → template → encode → drop untrainable → shuffle → pack.
//!
//! Records are processed in parallel and collected in input order, so the result is the
//! same with one thread or many. A bad record stops the run with its file and line,
//! unless [`DataSpec::skip_bad_records`] is set; then it is counted and logged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use xtuner_template::{ChatTemplate, Conversation, Turn};

use crate::encode::{EncodeOptions, EncodedSample, encode, encode_pieces};
use crate::format::{ColumnMap, DataFormat, Sample};
use crate::pack::{PackedRow, pack};
use crate::reader::{Record, read_records};
use crate::sampler::{shuffle, subset};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Everything that decides what the processed data set holds (and so keys the cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    /// Data files or folders.
    pub files: Vec<PathBuf>,
    /// The records' format (XTuner's map function).
    pub format: DataFormat,
    /// Field renames: format field → column in the data.
    pub columns: ColumnMap,
    /// The prompt template; `None` for pre-training text and pre-tokenized rows.
    pub template: Option<ChatTemplate>,
    /// Render conversations with the tokenizer's own Jinja chat template instead
    /// (`template` is then `None`): the answers trained, the rest not
    /// ([`xtuner_template::JinjaTemplate::split_turns`]).
    #[serde(default)]
    pub chat_template: bool,
    /// Samples are truncated to this many tokens; packed rows have this length.
    pub max_length: usize,
    /// Concatenate samples into rows of `max_length` tokens.
    pub pack_to_max_length: bool,
    /// Shuffle samples (seeded) before packing.
    pub shuffle_before_pack: bool,
    /// Seed of that shuffle.
    pub seed: u64,
    /// Keep only this many records (a seeded random subset, as XTuner's option).
    pub max_dataset_length: Option<usize>,
    /// Count and skip records that do not fit the format instead of stopping.
    pub skip_bad_records: bool,
}

impl DataSpec {
    /// Checks the settings that do not need the data.
    ///
    /// # Errors
    /// `max_length` 0, or no data file given.
    pub fn validate(&self) -> Result<()> {
        if self.max_length == 0 {
            return Err(Error::InvalidSetting {
                key: "max_length",
                message: "must be at least 1".into(),
            });
        }
        if self.files.is_empty() {
            return Err(Error::InvalidSetting {
                key: "files",
                message: "no data file given".into(),
            });
        }
        if let Some(template) = &self.template {
            template.validate().map_err(|e| Error::InvalidSetting {
                key: "template",
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn encode_options(&self) -> EncodeOptions {
        EncodeOptions {
            max_length: self.max_length,
            with_image_token: matches!(self.format, DataFormat::Llava | DataFormat::LlavaImageOnly),
        }
    }
}

/// Counts of what happened to the records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Records read from the files.
    pub records: usize,
    /// Records skipped as bad (only with `skip_bad_records`).
    pub bad_records: usize,
    /// Records whose conversation was empty (e.g. alpaca's `<nooutput>`).
    pub dropped_empty: usize,
    /// Samples with no trained label after truncation.
    pub dropped_untrained: usize,
    /// Samples kept.
    pub samples: usize,
    /// Tokens in the kept samples.
    pub tokens: usize,
    /// Trained labels in the kept samples.
    pub trained_tokens: usize,
    /// Rows of the training set (packed rows, or samples when not packing).
    pub rows: usize,
}

/// The processed data set: training rows (packed or one sample each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessedDataset {
    /// The rows, in training-set order.
    pub rows: Vec<PackedRow>,
    /// Image file of each row (unpacked LLaVA data; empty otherwise).
    pub images: Vec<Option<String>>,
    /// The record each row came from, as `file:line` (unpacked data; empty otherwise),
    /// for errors about a row that show up after processing (an unreadable image).
    pub sources: Vec<String>,
    /// What happened on the way.
    pub stats: DatasetStats,
}

impl ProcessedDataset {
    /// Each row's length, in row order (what the length-grouped sampler orders).
    pub fn lengths(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.len() as i64).collect()
    }

    /// The rows at `indices` (indices past the end are skipped).
    pub fn rows_at(&self, indices: &[usize]) -> Vec<&PackedRow> {
        indices.iter().filter_map(|&i| self.rows.get(i)).collect()
    }
}

/// One record through every stage, for inspection tools.
#[derive(Debug, Clone)]
pub struct SampleTrace {
    /// Where the record came from.
    pub record: Record,
    /// After the format's map function.
    pub conversation: Conversation,
    /// After the template.
    pub templated: Vec<Turn>,
    /// The encoded sample (dropped samples have no trained label).
    pub encoded: EncodedSample,
    /// The record's image, if any.
    pub image: Option<String>,
}

/// What became of one record.
enum Outcome {
    Kept(KeptSample),
    Empty,
    Untrained,
    Bad,
}

/// Runs one record through map → template → encode. Pre-tokenized records need no
/// tokenizer (`None`); text does.
///
/// # Errors
/// A record that does not fit the format or the template (naming its file and line),
/// a text record without a tokenizer, or a tokenizer failure.
pub fn trace_record<'t>(
    spec: &DataSpec,
    tokenizer: impl Into<Option<&'t Tokenizer>>,
    record: Record,
) -> Result<SampleTrace> {
    let tokenizer = tokenizer.into();
    let bad = |source| Error::BadRecord {
        path: record.path.to_path_buf(),
        line: record.line,
        source,
    };
    let (conversation, image, encoded, templated) =
        match spec.format.map(&record.value, &spec.columns).map_err(bad)? {
            Sample::Tokenized { input_ids, labels } => {
                let mut encoded = EncodedSample { input_ids, labels };
                encoded.input_ids.truncate(spec.max_length);
                encoded.labels.truncate(spec.max_length);
                (Conversation::default(), None, encoded, Vec::new())
            }
            Sample::Conversation {
                conversation,
                image,
            } => {
                let tokenizer = tokenizer.ok_or_else(|| Error::NoTokenizer {
                    path: record.path.to_path_buf(),
                    line: record.line,
                })?;
                if spec.chat_template {
                    let pieces = tokenizer
                        .chat_template()?
                        .split_turns(&conversation.conversation)
                        .map_err(|source| Error::Template {
                            path: record.path.to_path_buf(),
                            line: record.line,
                            source,
                        })?;
                    let encoded = encode_pieces(tokenizer, &pieces, spec.max_length)?;
                    let templated = pieces
                        .into_iter()
                        .map(|(text, trained)| {
                            let mut turn = Turn::new("", "");
                            turn.need_eos_token = false;
                            if trained {
                                turn.output = text;
                            } else {
                                turn.input = text;
                            }
                            turn
                        })
                        .collect();
                    return Ok(SampleTrace {
                        record,
                        conversation,
                        templated,
                        encoded,
                        image,
                    });
                }
                let templated = match &spec.template {
                    Some(t) => {
                        t.render(&conversation.conversation)
                            .map_err(|source| Error::Template {
                                path: record.path.to_path_buf(),
                                line: record.line,
                                source,
                            })?
                    }
                    None => conversation.conversation.clone(),
                };
                let encoded = encode(tokenizer, &templated, spec.encode_options())?;
                (conversation, image, encoded, templated)
            }
        };
    Ok(SampleTrace {
        record,
        conversation,
        templated,
        encoded,
        image,
    })
}

fn process_record(
    spec: &DataSpec,
    tokenizer: Option<&Tokenizer>,
    record: &Record,
) -> Result<Outcome> {
    let trace = match trace_record(spec, tokenizer, record.clone()) {
        Ok(trace) => trace,
        Err(e @ (Error::BadRecord { .. } | Error::Template { .. })) if spec.skip_bad_records => {
            tracing::warn!("skipping bad record: {e}");
            return Ok(Outcome::Bad);
        }
        Err(e) => return Err(e),
    };
    let is_tokenized = matches!(spec.format, DataFormat::Tokenized);
    Ok(if !is_tokenized && trace.templated.is_empty() {
        Outcome::Empty
    } else if !trace.encoded.has_trained_label() {
        Outcome::Untrained
    } else {
        Outcome::Kept(KeptSample {
            sample: trace.encoded,
            image: trace.image,
            source: format!("{}:{}", record.path.display(), record.line),
        })
    })
}

/// A kept sample, its record's image (if any) and the record's `file:line`.
#[derive(Debug, Clone)]
pub struct KeptSample {
    /// The encoded sample.
    pub sample: EncodedSample,
    /// The record's image file, as the record names it.
    pub image: Option<String>,
    /// Where the record is: `file:line`.
    pub source: String,
}

/// Reads and encodes every record (no shuffling or packing): the kept samples in input
/// order, with their images, and the counts.
///
/// # Errors
/// See [`trace_record`]; also unreadable files.
pub fn encode_records<'t>(
    spec: &DataSpec,
    tokenizer: impl Into<Option<&'t Tokenizer>>,
    records: &[Record],
) -> Result<(Vec<KeptSample>, DatasetStats)> {
    use rayon::prelude::*;
    let tokenizer = tokenizer.into();
    let outcomes: Vec<Result<Outcome>> = records
        .par_iter()
        .map(|r| process_record(spec, tokenizer, r))
        .collect();
    let mut stats = DatasetStats {
        records: records.len(),
        ..DatasetStats::default()
    };
    let mut kept = Vec::with_capacity(records.len());
    // Sequential scan: the first bad record in file order is the one reported.
    for outcome in outcomes {
        match outcome? {
            Outcome::Kept(k) => {
                stats.tokens += k.sample.len();
                stats.trained_tokens += k.sample.trained_tokens();
                kept.push(k);
            }
            Outcome::Empty => stats.dropped_empty += 1,
            Outcome::Untrained => stats.dropped_untrained += 1,
            Outcome::Bad => stats.bad_records += 1,
        }
    }
    stats.samples = kept.len();
    Ok((kept, stats))
}

/// Reads the records of a spec, subsampled to `max_dataset_length` if set.
///
/// # Errors
/// Unreadable or malformed files.
pub fn load_records(spec: &DataSpec) -> Result<Vec<Record>> {
    Ok(subset(
        read_records(&spec.files)?,
        spec.max_dataset_length,
        spec.seed,
    ))
}

/// Runs the whole pipeline (no cache); `None` for a tokenizer serves pre-tokenized data.
///
/// # Errors
/// Bad settings, unreadable files, bad records, a text record without a tokenizer, or
/// an empty result.
pub fn process<'t>(
    spec: &DataSpec,
    tokenizer: impl Into<Option<&'t Tokenizer>>,
) -> Result<ProcessedDataset> {
    spec.validate()?;
    let records = load_records(spec)?;
    let (mut kept, mut stats) = encode_records(spec, tokenizer, &records)?;
    drop(records); // before packing, which briefly holds the samples and the rows
    if kept.is_empty() {
        return Err(Error::EmptyDataset {
            reason: format!(
                "{} records read; {} empty after the format, {} with nothing to train, {} bad",
                stats.records, stats.dropped_empty, stats.dropped_untrained, stats.bad_records
            ),
        });
    }
    let dataset = if spec.pack_to_max_length {
        if spec.shuffle_before_pack {
            kept = shuffle(kept, spec.seed);
        }
        let rows = pack(kept.into_iter().map(|k| k.sample), spec.max_length);
        ProcessedDataset {
            rows,
            ..ProcessedDataset::default()
        }
    } else {
        let mut dataset = ProcessedDataset::default();
        for k in kept {
            let len = k.sample.len();
            dataset.rows.push(PackedRow {
                input_ids: k.sample.input_ids,
                labels: k.sample.labels,
                cumulative_len: vec![0, len],
            });
            dataset.images.push(k.image);
            dataset.sources.push(k.source);
        }
        dataset
    };
    stats.rows = dataset.rows.len();
    tracing::info!(
        records = stats.records,
        samples = stats.samples,
        rows = stats.rows,
        tokens = stats.tokens,
        "dataset processed"
    );
    Ok(ProcessedDataset { stats, ..dataset })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;
    use xtuner_template::PromptTemplate;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_path(&crate::test_support::fixture("tokenizer")).unwrap()
    }

    fn spec(dir: &Path, lines: &[String]) -> DataSpec {
        let data = dir.join("data.jsonl");
        fs::write(&data, lines.join("\n")).unwrap();
        DataSpec {
            files: vec![data],
            format: DataFormat::Alpaca,
            columns: Default::default(),
            template: Some(PromptTemplate::Internlm2Chat.template()),
            chat_template: false,
            max_length: 48,
            pack_to_max_length: true,
            shuffle_before_pack: true,
            seed: 3,
            max_dataset_length: None,
            skip_bad_records: false,
        }
    }

    fn alpaca(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let output = if i % 7 == 0 {
                    "<nooutput>".to_string()
                } else {
                    format!("answer {i}")
                };
                format!(r#"{{"instruction": "question {i}", "input": "", "output": "{output}"}}"#)
            })
            .collect()
    }

    #[test]
    fn tokenized_data_needs_no_tokenizer_and_text_names_the_record_that_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(
            dir.path(),
            &[r#"{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}"#.to_string()],
        );
        spec.format = DataFormat::Tokenized;
        spec.pack_to_max_length = false;
        let data = process(&spec, None).unwrap();
        assert_eq!(data.rows.len(), 1);
        assert_eq!(data, process(&spec, &tokenizer()).unwrap());
        let spec = self::spec(dir.path(), &alpaca(2));
        let err = process(&spec, None).unwrap_err();
        assert!(matches!(&err, Error::NoTokenizer { line: 1, .. }), "{err}");
        assert!(err.to_string().contains("data.jsonl:1:"), "{err}");
    }

    #[test]
    fn one_thread_and_many_give_the_same_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), &alpaca(300));
        let tok = tokenizer();
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| process(&spec, &tok).unwrap())
        };
        let one = run(1);
        assert_eq!(one, run(4));
        assert_eq!(one.stats.records, 300);
        assert_eq!(one.stats.dropped_empty, 43);
        assert_eq!(one.stats.samples, 257);
        assert!(one.rows.iter().all(|r| r.len() == 48));
        // The seed decides the order; the same seed gives the same rows.
        let other = process(
            &DataSpec {
                seed: 4,
                ..spec.clone()
            },
            &tok,
        )
        .unwrap();
        assert_ne!(one.rows, other.rows);
    }

    #[test]
    fn unpacked_rows_keep_sample_order_and_untrainable_samples_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let base = spec(dir.path(), &alpaca(20));
        let spec = DataSpec {
            pack_to_max_length: false,
            max_length: 4096,
            ..base.clone()
        };
        let data = process(&spec, &tokenizer()).unwrap();
        assert_eq!(data.rows.len(), 17);
        assert_eq!(data.images.len(), 17);
        assert!(
            data.rows
                .iter()
                .all(|r| r.cumulative_len == vec![0, r.len()])
        );
        // So short that the answer is cut away: nothing to train, dropped.
        let spec = DataSpec {
            pack_to_max_length: false,
            max_length: 5,
            ..base
        };
        let err = process(&spec, &tokenizer()).unwrap_err().to_string();
        assert!(
            err.contains("empty") && err.contains("17 with nothing to train"),
            "{err}"
        );
    }

    #[test]
    fn bad_records_stop_the_run_unless_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = alpaca(5);
        lines.insert(2, r#"{"instruction": "q"}"#.to_string());
        let spec = spec(dir.path(), &lines);
        let err = process(&spec, &tokenizer()).unwrap_err().to_string();
        assert!(err.contains("data.jsonl:3"), "{err}");
        let skipped = process(
            &DataSpec {
                skip_bad_records: true,
                ..spec
            },
            &tokenizer(),
        )
        .unwrap();
        assert_eq!(skipped.stats.bad_records, 1);
        assert_eq!(skipped.stats.records, 6);
    }

    #[test]
    fn max_dataset_length_takes_a_seeded_subset() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DataSpec {
            max_dataset_length: Some(10),
            ..spec(dir.path(), &alpaca(50))
        };
        let records = load_records(&spec).unwrap();
        assert_eq!(records.len(), 10);
        assert!(
            records.windows(2).all(|w| w[0].line < w[1].line),
            "file order kept"
        );
        assert_eq!(records, load_records(&spec).unwrap());
    }

    #[test]
    fn zero_max_length_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DataSpec {
            max_length: 0,
            ..spec(dir.path(), &alpaca(3))
        };
        assert!(matches!(
            process(&spec, &tokenizer()),
            Err(Error::InvalidSetting {
                key: "max_length",
                ..
            })
        ));
    }
}
