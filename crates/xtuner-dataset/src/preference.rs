//! Preference data as XTuner's `preference_dataset.py` builds it: a record becomes a
//! [`PreferencePair`] (the prompt's messages, the chosen and the rejected answer), and a
//! pair becomes two token sequences with labels ([`EncodedPair`]).
//!
//! Three record formats ([`PreferenceFormat`]): XTuner's map functions
//! `intel_orca_dpo_map_fn` (`system`, `question`, `chosen`, `rejected`: the system
//! message is kept even when empty) and `orpo_dpo_mix_40k_map_fn` (`chosen` and
//! `rejected` message lists sharing every turn but the last), and the pair itself
//! (`{"prompt": [...], "chosen": [...], "rejected": [...]}`).
//!
//! [`encode_pair`] is XTuner's `tokenize()`: the tokenizer's own chat template renders
//! the prompt (with the generation prompt) and prompt + answer (without), each is
//! encoded without added special tokens (a `<s>` the template writes is in the text),
//! answers are cut to `max_length`, and the labels are -100 over the prompt. The
//! reward-model encoding appends the reward token to both sequences and labels it 0
//! (chosen) and 1 (rejected), -100 everywhere else.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use xtuner_template::{JinjaTemplate, Message};

use std::path::PathBuf;

use crate::encode::IGNORE_INDEX;
use crate::format::{DataFormat, type_name};
use crate::pack::PackedRow;
use crate::pipeline::{DatasetStats, ProcessedDataset};
use crate::reader::{Record, read_records};
use crate::sampler::{shuffle, subset};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A preference pair: the prompt's messages and the two answers' messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencePair {
    /// The conversation before the answers.
    pub prompt: Vec<Message>,
    /// The preferred answer.
    pub chosen: Vec<Message>,
    /// The other answer.
    pub rejected: Vec<Message>,
}

/// The raw formats of preference data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceFormat {
    /// XTuner's `intel_orca_dpo_map_fn`: `system`, `question`, `chosen`, `rejected`.
    IntelOrcaDpo,
    /// XTuner's `orpo_dpo_mix_40k_map_fn`: `chosen` and `rejected` message lists whose
    /// last message is the answer and whose earlier messages (from `chosen`) the prompt.
    #[serde(rename = "orpo_dpo_mix_40k")]
    OrpoDpoMix40k,
    /// The pair as it is: `prompt`, `chosen`, `rejected` message lists.
    Preference,
}

impl PreferenceFormat {
    /// Every format.
    pub fn all() -> &'static [PreferenceFormat] {
        &[Self::IntelOrcaDpo, Self::OrpoDpoMix40k, Self::Preference]
    }

    /// Every format's name, comma separated (for error messages).
    pub fn names() -> String {
        let names: Vec<&str> = Self::all().iter().map(|f| f.name()).collect();
        names.join(", ")
    }

    /// The format's name (XTuner's map function without `_map_fn`).
    pub fn name(self) -> &'static str {
        match self {
            Self::IntelOrcaDpo => "intel_orca_dpo",
            Self::OrpoDpoMix40k => "orpo_dpo_mix_40k",
            Self::Preference => "preference",
        }
    }

    /// Maps one record to a pair.
    ///
    /// # Errors
    /// A missing field or one of the wrong type, named with its path in the record.
    pub fn map(self, record: &Value) -> std::result::Result<PreferencePair, String> {
        let err = |msg: String| format!("{msg} (format {})", self.name());
        let Value::Object(fields) = record else {
            return Err(err(format!(
                "the record is {}, not a JSON object",
                type_name(record)
            )));
        };
        let text = |key: &str| -> std::result::Result<String, String> {
            match fields.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Null) | None => Err(err(format!("missing field `{key}`"))),
                Some(v) => Err(err(format!(
                    "field `{key}` should be a string but is {}",
                    type_name(v)
                ))),
            }
        };
        let messages = |key: &str| -> std::result::Result<Vec<Message>, String> {
            let value = fields
                .get(key)
                .ok_or_else(|| err(format!("missing field `{key}`")))?;
            serde_json::from_value(value.clone()).map_err(|e| {
                err(format!(
                    "field `{key}` is not a list of {{\"role\", \"content\"}} messages: {e}"
                ))
            })
        };
        match self {
            Self::IntelOrcaDpo => Ok(PreferencePair {
                prompt: vec![
                    Message::new("system", text("system")?),
                    Message::new("user", text("question")?),
                ],
                chosen: vec![Message::new("assistant", text("chosen")?)],
                rejected: vec![Message::new("assistant", text("rejected")?)],
            }),
            Self::OrpoDpoMix40k => {
                let mut chosen = messages("chosen")?;
                let mut rejected = messages("rejected")?;
                let (Some(chosen_answer), Some(rejected_answer)) = (chosen.pop(), rejected.pop())
                else {
                    return Err(err(
                        "`chosen` and `rejected` need at least one message each".into(),
                    ));
                };
                Ok(PreferencePair {
                    prompt: chosen,
                    chosen: vec![chosen_answer],
                    rejected: vec![rejected_answer],
                })
            }
            Self::Preference => {
                for key in fields.keys() {
                    if !["prompt", "chosen", "rejected"].contains(&key.as_str()) {
                        return Err(err(format!(
                            "unknown field `{key}` (a pair has `prompt`, `chosen`, `rejected`)"
                        )));
                    }
                }
                Ok(PreferencePair {
                    prompt: messages("prompt")?,
                    chosen: messages("chosen")?,
                    rejected: messages("rejected")?,
                })
            }
        }
    }
}

impl std::str::FromStr for PreferenceFormat {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::all()
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .ok_or_else(|| Error::UnknownFormat {
                name: name.to_string(),
                valid: Self::names(),
            })
    }
}

impl std::fmt::Display for PreferenceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A pair as token ids and labels (one line of `xtuner dataset encode` for preference data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedPair {
    /// Prompt and chosen answer.
    pub chosen_ids: Vec<i64>,
    /// -100 over the prompt, the ids over the answer (reward: 0 at the reward token).
    pub chosen_labels: Vec<i64>,
    /// Prompt and rejected answer.
    pub rejected_ids: Vec<i64>,
    /// As `chosen_labels` (reward: 1 at the reward token).
    pub rejected_labels: Vec<i64>,
}

impl EncodedPair {
    /// Tokens of both sequences (what a packed row holds of the pair).
    pub fn len(&self) -> usize {
        self.chosen_ids.len() + self.rejected_ids.len()
    }

    /// True when both sequences are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pair as a training row of its own: chosen, then rejected, each a segment.
    pub fn into_row(self) -> PackedRow {
        let mut row = PackedRow {
            cumulative_len: vec![0],
            ..PackedRow::default()
        };
        row.push_pair(self);
        row
    }
}

impl PackedRow {
    /// Appends a pair's two sequences, each as a segment.
    fn push_pair(&mut self, pair: EncodedPair) {
        for (ids, labels) in [
            (pair.chosen_ids, pair.chosen_labels),
            (pair.rejected_ids, pair.rejected_labels),
        ] {
            self.input_ids.extend(ids);
            self.labels.extend(labels);
            self.cumulative_len.push(self.input_ids.len());
        }
    }
}

/// How pairs are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairOptions {
    /// Each sequence is cut to this many tokens (before the reward token).
    pub max_length: usize,
    /// The reward-model encoding, with this token appended (InternLM2's `<|reward|>`).
    pub reward_token_id: Option<u32>,
}

/// XTuner's `tokenize()` of one pair with the tokenizer's chat template.
///
/// # Errors
/// The template fails on the pair, or the tokenizer on the text.
pub fn encode_pair(
    pair: &PreferencePair,
    template: &JinjaTemplate,
    tokenizer: &Tokenizer,
    options: PairOptions,
) -> Result<EncodedPair> {
    let render = |answer: Option<&[Message]>| -> Result<Vec<i64>> {
        let text = match answer {
            None => template.render(&pair.prompt, true),
            Some(answer) => {
                let messages: Vec<&Message> = pair.prompt.iter().chain(answer).collect();
                template.render(&messages, false)
            }
        }
        .map_err(|source| Error::ChatTemplate { source })?;
        Ok(tokenizer
            .encode(&text)?
            .into_iter()
            .map(i64::from)
            .collect())
    };
    let prompt = render(None)?;
    let mut chosen = render(Some(&pair.chosen))?;
    let mut rejected = render(Some(&pair.rejected))?;
    chosen.truncate(options.max_length);
    rejected.truncate(options.max_length);
    let (chosen_labels, rejected_labels) = match options.reward_token_id {
        Some(reward) => {
            let labelled = |ids: &mut Vec<i64>, label: i64| {
                ids.push(i64::from(reward));
                let mut labels = vec![IGNORE_INDEX; ids.len() - 1];
                labels.push(label);
                labels
            };
            (labelled(&mut chosen, 0), labelled(&mut rejected, 1))
        }
        None => {
            let prompt_len = prompt.len().min(options.max_length);
            let labelled = |ids: &[i64]| -> Vec<i64> {
                let n = prompt_len.min(ids.len());
                let mut labels = vec![IGNORE_INDEX; prompt_len];
                labels.extend_from_slice(&ids[n..]);
                labels
            };
            (labelled(&chosen), labelled(&rejected))
        }
    };
    Ok(EncodedPair {
        chosen_ids: chosen,
        chosen_labels,
        rejected_ids: rejected,
        rejected_labels,
    })
}

/// Maps and encodes every record (in parallel, results in input order).
///
/// # Errors
/// The first record, in file order, that does not fit `format` or that the template
/// fails on, named by file and line; a tokenizer failure.
pub fn encode_pair_records(
    records: &[Record],
    format: PreferenceFormat,
    template: &JinjaTemplate,
    tokenizer: &Tokenizer,
    options: PairOptions,
) -> Result<Vec<EncodedPair>> {
    use rayon::prelude::*;
    let bad = |record: &Record, message: String| Error::BadPair {
        path: record.path.to_path_buf(),
        line: record.line,
        message,
    };
    let encoded: Vec<Result<EncodedPair>> = records
        .par_iter()
        .map(|record| {
            let pair = format.map(&record.value).map_err(|m| bad(record, m))?;
            encode_pair(&pair, template, tokenizer, options).map_err(|e| match e {
                Error::ChatTemplate { source } => bad(record, source.to_string()),
                other => other,
            })
        })
        .collect();
    // Sequential: the first bad record in file order is the one reported (rayon's
    // collect into a `Result` would report any).
    encoded.into_iter().collect()
}

/// XTuner's `PackedDatasetWrapper`: pairs, in the given order, fill rows of at most
/// `max_packed_length` tokens, chosen then rejected, each sequence its own varlen
/// segment; a pair is never split, and one longer than a row is left out (counted in
/// the second value).
pub fn pack_pairs(
    pairs: impl IntoIterator<Item = EncodedPair>,
    max_packed_length: usize,
) -> (Vec<PackedRow>, usize) {
    let mut rows: Vec<PackedRow> = Vec::new();
    let mut removed = 0;
    for pair in pairs {
        if pair.len() > max_packed_length {
            removed += 1;
            continue;
        }
        match rows.last_mut() {
            Some(row) if row.len() + pair.len() <= max_packed_length => row.push_pair(pair),
            _ => rows.push(pair.into_row()),
        }
    }
    (rows, removed)
}

/// A data config's `format`: a supervised format (one of XTuner's map functions, onto
/// conversations) or a preference format (onto pairs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordFormat {
    /// Samples: conversations or pre-tokenized rows.
    Sample(DataFormat),
    /// Preference pairs.
    Pair(PreferenceFormat),
}

impl std::str::FromStr for RecordFormat {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name.parse::<PreferenceFormat>() {
            Ok(pair) => Ok(Self::Pair(pair)),
            Err(_) => match name.parse::<DataFormat>() {
                Ok(sample) => Ok(Self::Sample(sample)),
                Err(Error::UnknownFormat { name, valid }) => Err(Error::UnknownFormat {
                    name,
                    valid: format!("{valid}; preference formats: {}", PreferenceFormat::names()),
                }),
                Err(other) => Err(other),
            },
        }
    }
}

impl std::fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sample(format) => format.fmt(f),
            Self::Pair(format) => format.fmt(f),
        }
    }
}

impl Serialize for RecordFormat {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RecordFormat {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything a processed preference data set depends on besides the files' content
/// and the tokenizer (the cache key is made of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSpec {
    /// Data files or folders.
    pub files: Vec<PathBuf>,
    /// The records' format.
    pub format: PreferenceFormat,
    /// How each pair is encoded.
    pub options: PairOptions,
    /// Pack pairs into varlen rows of at most this many tokens (XTuner's
    /// `PackedDatasetWrapper` under `use_varlen_attn`); `None`: one pair per row.
    pub max_packed_length: Option<usize>,
    /// Shuffle pairs (seeded) before packing.
    pub shuffle_before_pack: bool,
    /// Seed of that shuffle and of `max_dataset_length`'s subset.
    pub seed: u64,
    /// Keep only this many records (a seeded random subset).
    pub max_dataset_length: Option<usize>,
}

/// The preference data set of `spec`: one training row per pair (chosen then rejected,
/// each its own segment of `cumulative_len`), or pairs packed into varlen rows.
///
/// # Errors
/// A bad setting, unreadable files, a record that does not fit its format or that the
/// template fails on, or no pair at all.
pub fn process_pairs(
    spec: &PairSpec,
    template: &JinjaTemplate,
    tokenizer: &Tokenizer,
) -> Result<ProcessedDataset> {
    if spec.options.max_length == 0 {
        return Err(Error::InvalidSetting {
            key: "max_length",
            message: "must be positive".into(),
        });
    }
    let records = subset(
        read_records(&spec.files)?,
        spec.max_dataset_length,
        spec.seed,
    );
    let mut pairs = encode_pair_records(&records, spec.format, template, tokenizer, spec.options)?;
    if pairs.is_empty() {
        return Err(Error::EmptyDataset {
            reason: format!("{} records read, no preference pair", records.len()),
        });
    }
    let mut stats = DatasetStats {
        records: records.len(),
        samples: pairs.len(),
        tokens: pairs.iter().map(EncodedPair::len).sum(),
        trained_tokens: pairs
            .iter()
            .map(|p| {
                p.chosen_labels
                    .iter()
                    .chain(&p.rejected_labels)
                    .filter(|&&l| l >= 0)
                    .count()
            })
            .sum(),
        ..DatasetStats::default()
    };
    let rows = match spec.max_packed_length {
        Some(max) => {
            if spec.shuffle_before_pack {
                pairs = shuffle(pairs, spec.seed);
            }
            let (rows, removed) = pack_pairs(pairs, max);
            if removed > 0 {
                tracing::warn!(
                    removed,
                    max_packed_length = max,
                    "pairs longer than a packed row left out"
                );
            }
            rows
        }
        None => pairs.into_iter().map(EncodedPair::into_row).collect(),
    };
    stats.rows = rows.len();
    Ok(ProcessedDataset {
        rows,
        stats,
        ..ProcessedDataset::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(chosen: usize, rejected: usize) -> EncodedPair {
        EncodedPair {
            chosen_ids: vec![1; chosen],
            chosen_labels: vec![1; chosen],
            rejected_ids: vec![2; rejected],
            rejected_labels: vec![2; rejected],
        }
    }

    #[test]
    fn pairs_pack_whole_with_a_segment_per_sequence() {
        let (rows, removed) = pack_pairs([pair(3, 2), pair(2, 2), pair(9, 9), pair(4, 1)], 10);
        assert_eq!(removed, 1, "the 18-token pair is left out");
        let bounds: Vec<&[usize]> = rows.iter().map(|r| r.cumulative_len.as_slice()).collect();
        assert_eq!(bounds, [&[0, 3, 5, 7, 9][..], &[0, 4, 5][..]]);
        assert_eq!(rows[0].input_ids, [1, 1, 1, 2, 2, 1, 1, 2, 2]);
        assert_eq!(rows[0].position_ids(), [0, 1, 2, 0, 1, 0, 1, 0, 1]);
        assert_eq!(pack_pairs(Vec::new(), 10).0, Vec::<PackedRow>::new());
    }
}
