//! XTuner's dataset map functions: one raw record in, one sample in the standard
//! conversation format out.
//!
//! Each [`DataFormat`] is one entry of XTuner's `DATASET_FORMAT_MAPPING` (named as there)
//! and reproduces its map function's output turn for turn, quirks included: alpaca joins
//! instruction and input with a `\n` even when the input is empty, `pretrain` turns off the
//! EOS token, `openai` compares `loss` as the string `"true"`. Two formats are our own:
//! [`DataFormat::Conversation`] takes data already in the standard format, and
//! [`DataFormat::Tokenized`] takes rows that already hold `input_ids` and `labels`.
//!
//! A [`ColumnMap`] lets a format read data whose columns are named differently, and every
//! failure is a [`FormatError`] naming the field (and the column it was read from).
//!
//! The families live in submodules: `single_turn` (fixed field → turn mappings),
//! `chat` (message lists and oasst1's text) and `standard` (the two formats above).

mod chat;
mod fields;
mod single_turn;
mod standard;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use xtuner_template::Conversation;

use fields::Fields;
pub(crate) use fields::type_name;

/// Renames a format's fields for data whose columns are named differently:
/// format field → column in the data.
///
/// With `{"instruction": "prompt"}`, [`DataFormat::Alpaca`] reads its `instruction` from the
/// record's `prompt` column. Only a format's top-level fields ([`DataFormat::fields`]) can
/// be mapped, not keys inside messages.
pub type ColumnMap = BTreeMap<String, String>;

/// A raw data format: which of XTuner's map functions turns a record into a conversation.
///
/// Names (for [`FromStr`], serde and [`Display`](fmt::Display)) are XTuner's
/// `DATASET_FORMAT_MAPPING` keys, e.g. `"alpaca"`, `"llava_image_only"`, `"crime_kg_assitant"`;
/// `"sharegpt"` is accepted for [`DataFormat::Wizardlm`] and XTuner's own key
/// `"crime_kg_assitan"` for [`DataFormat::CrimeKgAssitant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataFormat {
    /// `instruction`, `input`, `output` → one turn with input `"{instruction}\n{input}"`;
    /// a record whose output is `"<nooutput>"` maps to an empty conversation (dropped).
    Alpaca,
    /// `instruction_zh`, `input_zh`, `output_zh` → one turn like alpaca (no `<nooutput>` check).
    AlpacaZh,
    /// `messages` (`role` system/user/assistant, `content`, optional `loss`) → one turn per
    /// assistant message.
    Openai,
    /// `conversations` (`from` human/gpt, `value`) with `<image>` moved to the front of the
    /// human text; `image` names the picture.
    Llava,
    /// Like [`DataFormat::Llava`], but every human message must hold `<image>` and only the
    /// token is kept of it.
    LlavaImageOnly,
    /// `text` → one turn with empty input, the stripped text as output and no EOS token.
    Pretrain,
    /// `text` as `### Human: ... ### Assistant: ...` → one turn per human/assistant pair.
    Oasst1,
    /// `conversations` (`from` human/gpt, `value`) → one turn per gpt message (ShareGPT).
    Wizardlm,
    /// `prompt`, `completion` with the `coder` system prompt.
    CodeAlpaca,
    /// `context`, `question`, `answer` → input `"{context}\n{question}"`, `sql` system prompt.
    Sql,
    /// `instruction`, `input`, `output` → input `"{instruction}\n{input}"`, `medical` system prompt.
    Medical,
    /// `system_prompt`, `question`, `response`.
    Openorca,
    /// `prompt`, `response` with the `coder` system prompt.
    TinyCodes,
    /// `question`, `response`.
    StackExchange,
    /// `abstract` → `title` with the `arxiv_gentile` system prompt.
    Arxiv,
    /// `description` (text after its first `:`) → `color`, `colorist` system prompt.
    Colors,
    /// `question`, `answer` with the `lawyer` system prompt.
    LawReference,
    /// `input`, `output` with the `lawyer` system prompt (XTuner's spelling).
    CrimeKgAssitant,
    /// `input`, `output` → one turn.
    Default,
    /// Already in the standard format: `{"conversation": [turn, ...]}`.
    Conversation,
    /// Already tokenized: `input_ids` and `labels` (integer arrays of equal length); without
    /// `labels` every token is trained (labels = input_ids).
    Tokenized,
}

/// Every format, in the order of the documentation.
const ALL: [DataFormat; 21] = [
    DataFormat::Alpaca,
    DataFormat::AlpacaZh,
    DataFormat::Openai,
    DataFormat::Llava,
    DataFormat::LlavaImageOnly,
    DataFormat::Pretrain,
    DataFormat::Oasst1,
    DataFormat::Wizardlm,
    DataFormat::CodeAlpaca,
    DataFormat::Sql,
    DataFormat::Medical,
    DataFormat::Openorca,
    DataFormat::TinyCodes,
    DataFormat::StackExchange,
    DataFormat::Arxiv,
    DataFormat::Colors,
    DataFormat::LawReference,
    DataFormat::CrimeKgAssitant,
    DataFormat::Default,
    DataFormat::Conversation,
    DataFormat::Tokenized,
];

/// Other names accepted for a format.
const ALIASES: [(&str, DataFormat); 2] = [
    ("sharegpt", DataFormat::Wizardlm),
    ("crime_kg_assitan", DataFormat::CrimeKgAssitant),
];

impl DataFormat {
    /// Every format.
    pub fn all() -> &'static [DataFormat] {
        &ALL
    }

    /// The format's name (XTuner's key in `DATASET_FORMAT_MAPPING`).
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Alpaca => "alpaca",
            DataFormat::AlpacaZh => "alpaca_zh",
            DataFormat::Openai => "openai",
            DataFormat::Llava => "llava",
            DataFormat::LlavaImageOnly => "llava_image_only",
            DataFormat::Pretrain => "pretrain",
            DataFormat::Oasst1 => "oasst1",
            DataFormat::Wizardlm => "wizardlm",
            DataFormat::CodeAlpaca => "code_alpaca",
            DataFormat::Sql => "sql",
            DataFormat::Medical => "medical",
            DataFormat::Openorca => "openorca",
            DataFormat::TinyCodes => "tiny_codes",
            DataFormat::StackExchange => "stack_exchange",
            DataFormat::Arxiv => "arxiv",
            DataFormat::Colors => "colors",
            DataFormat::LawReference => "law_reference",
            DataFormat::CrimeKgAssitant => "crime_kg_assitant",
            DataFormat::Default => "default",
            DataFormat::Conversation => "conversation",
            DataFormat::Tokenized => "tokenized",
        }
    }

    /// The top-level fields the format reads, in the order it reads them; these are the
    /// keys a [`ColumnMap`] may rename.
    ///
    /// All are required except `image` ([`DataFormat::Llava`],
    /// [`DataFormat::LlavaImageOnly`]) and `labels` ([`DataFormat::Tokenized`]).
    pub fn fields(&self) -> &'static [&'static str] {
        match self.family() {
            Family::SingleTurn(spec) => spec.fields,
            Family::Openai => &["messages"],
            Family::Llava | Family::LlavaImageOnly => &["conversations", "image"],
            Family::Oasst1 => &["text"],
            Family::Wizardlm => &["conversations"],
            Family::Conversation => &["conversation"],
            Family::Tokenized => &["input_ids", "labels"],
        }
    }

    /// Maps one raw record onto a sample, as XTuner's map function for this format does.
    ///
    /// `columns` renames the format's fields (see [`ColumnMap`]); keys it does not know are
    /// ignored here, so check them once with [`DataFormat::check_columns`].
    ///
    /// # Errors
    /// [`FormatError`] when the record is not an object, a field is missing or has the wrong
    /// type, a message has an unknown role, or the record breaks a format's own rule.
    pub fn map(&self, record: &Value, columns: &ColumnMap) -> Result<Sample, FormatError> {
        let fields = Fields::new(*self, record, columns)?;
        match self.family() {
            Family::SingleTurn(spec) => spec.map(&fields).map(Sample::text),
            Family::Openai => chat::openai(&fields).map(Sample::text),
            Family::Wizardlm => chat::wizardlm(&fields).map(Sample::text),
            Family::Llava => chat::llava(&fields),
            Family::LlavaImageOnly => chat::llava_image_only(&fields),
            Family::Oasst1 => chat::oasst1(&fields).map(Sample::text),
            Family::Conversation => standard::conversation(&fields).map(Sample::text),
            Family::Tokenized => standard::tokenized(&fields),
        }
    }

    /// Checks that every key of `columns` is one of [`DataFormat::fields`].
    ///
    /// # Errors
    /// [`FormatError::UnknownColumn`] for the first key the format does not read.
    pub fn check_columns(&self, columns: &ColumnMap) -> Result<(), FormatError> {
        match columns
            .keys()
            .find(|key| !self.fields().contains(&key.as_str()))
        {
            None => Ok(()),
            Some(key) => Err(FormatError::UnknownColumn {
                format: *self,
                field: key.clone(),
                valid: self.fields().join(", "),
            }),
        }
    }
}

impl DataFormat {
    /// Which code maps the format.
    fn family(self) -> Family {
        use single_turn as st;
        match self {
            DataFormat::Alpaca => Family::SingleTurn(&st::ALPACA),
            DataFormat::AlpacaZh => Family::SingleTurn(&st::ALPACA_ZH),
            DataFormat::Pretrain => Family::SingleTurn(&st::PRETRAIN),
            DataFormat::CodeAlpaca => Family::SingleTurn(&st::CODE_ALPACA),
            DataFormat::Sql => Family::SingleTurn(&st::SQL),
            DataFormat::Medical => Family::SingleTurn(&st::MEDICAL),
            DataFormat::Openorca => Family::SingleTurn(&st::OPENORCA),
            DataFormat::TinyCodes => Family::SingleTurn(&st::TINY_CODES),
            DataFormat::StackExchange => Family::SingleTurn(&st::STACK_EXCHANGE),
            DataFormat::Arxiv => Family::SingleTurn(&st::ARXIV),
            DataFormat::Colors => Family::SingleTurn(&st::COLORS),
            DataFormat::LawReference => Family::SingleTurn(&st::LAW_REFERENCE),
            DataFormat::CrimeKgAssitant => Family::SingleTurn(&st::CRIME_KG_ASSITANT),
            DataFormat::Default => Family::SingleTurn(&st::DEFAULT),
            DataFormat::Openai => Family::Openai,
            DataFormat::Llava => Family::Llava,
            DataFormat::LlavaImageOnly => Family::LlavaImageOnly,
            DataFormat::Oasst1 => Family::Oasst1,
            DataFormat::Wizardlm => Family::Wizardlm,
            DataFormat::Conversation => Family::Conversation,
            DataFormat::Tokenized => Family::Tokenized,
        }
    }
}

/// The code behind a format: a single-turn table entry or a function of its own.
enum Family {
    SingleTurn(&'static single_turn::SingleTurn),
    Openai,
    Llava,
    LlavaImageOnly,
    Oasst1,
    Wizardlm,
    Conversation,
    Tokenized,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataFormat {
    type Err = crate::Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ALL.iter()
            .copied()
            .find(|format| format.name() == name)
            .or_else(|| {
                ALIASES
                    .iter()
                    .find(|(alias, _)| *alias == name)
                    .map(|(_, format)| *format)
            })
            .ok_or_else(|| crate::Error::UnknownFormat {
                name: name.to_string(),
                valid: valid_names(),
            })
    }
}

/// Every accepted name, comma separated, aliases last.
fn valid_names() -> String {
    let names = ALL.iter().map(|format| format.name().to_string());
    let aliases = ALIASES
        .iter()
        .map(|(alias, format)| format!("{alias} (= {format})"));
    names.chain(aliases).collect::<Vec<_>>().join(", ")
}

impl Serialize for DataFormat {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for DataFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// What a record becomes: a conversation to template and tokenize, or ready token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// A sample in the standard conversation format (possibly empty: XTuner drops those).
    Conversation {
        /// The turns.
        conversation: Conversation,
        /// The record's image file (LLaVA formats), relative to the image folder.
        image: Option<String>,
    },
    /// A pre-tokenized row, used as is.
    Tokenized {
        /// Token ids.
        input_ids: Vec<i64>,
        /// One label per id; -100 means "not trained".
        labels: Vec<i64>,
    },
}

impl Sample {
    /// A text-only conversation sample.
    fn text(conversation: Conversation) -> Self {
        Sample::Conversation {
            conversation,
            image: None,
        }
    }
}

/// Where a value sits in a record: the format's field and the path in the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// The format's name for the top-level field (`instruction`, `messages`, ...).
    pub field: &'static str,
    /// The path in the record, through the column map: `prompt`, `messages[2].role`, ...
    pub path: String,
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.path)?;
        let root = self.path.split('[').next().unwrap_or_default();
        if root != self.field {
            write!(f, " (the column for `{}`)", self.field)?;
        }
        Ok(())
    }
}

/// Why a record does not fit its format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The record is not a JSON object.
    #[error("the record is {found}, not a JSON object")]
    NotAnObject {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// A field the format needs is absent.
    #[error("missing field {at} (format {format})")]
    MissingField {
        /// The format.
        format: DataFormat,
        /// The missing field.
        at: FieldPath,
    },
    /// A field holds the wrong JSON type.
    #[error("field {at} should be {expected} but is {found} (format {format})")]
    WrongType {
        /// The format.
        format: DataFormat,
        /// The field.
        at: FieldPath,
        /// The type the format needs.
        expected: &'static str,
        /// The type found.
        found: &'static str,
    },
    /// A message's role (`role` or `from`) is not one the format knows.
    #[error("unknown role `{role}` at {at}; format {format} knows {expected}")]
    UnknownRole {
        /// The format.
        format: DataFormat,
        /// The role key of the message.
        at: FieldPath,
        /// The role found.
        role: String,
        /// The roles the format knows.
        expected: &'static str,
    },
    /// A human message without the `<image>` token ([`DataFormat::LlavaImageOnly`]).
    #[error("{at} has no `<image>` token (format {format} needs one in every human message)")]
    MissingImageToken {
        /// The format.
        format: DataFormat,
        /// The message's text.
        at: FieldPath,
    },
    /// `input_ids` and `labels` differ in length ([`DataFormat::Tokenized`]).
    #[error("`input_ids` has {input_ids} ids but `labels` has {labels} (format {format})")]
    LengthMismatch {
        /// The format.
        format: DataFormat,
        /// Number of ids.
        input_ids: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A turn of a standard-format conversation does not deserialize.
    #[error("{at}: {message} (format {format})")]
    BadTurn {
        /// The format.
        format: DataFormat,
        /// The turn.
        at: FieldPath,
        /// What the deserializer said.
        message: String,
    },
    /// A column map renames a field the format does not read.
    #[error(
        "the column map renames `{field}`, which format {format} does not read (it reads: {valid})"
    )]
    UnknownColumn {
        /// The format.
        format: DataFormat,
        /// The key of the column map.
        field: String,
        /// The fields the format reads, comma separated.
        valid: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use xtuner_template::{SystemTemplate, Turn};

    fn conversation_of(sample: Sample) -> (Vec<Turn>, Option<String>) {
        match sample {
            Sample::Conversation {
                conversation,
                image,
            } => (conversation.conversation, image),
            Sample::Tokenized { .. } => panic!("expected a conversation, got {sample:?}"),
        }
    }

    #[test]
    fn every_fixture_record_maps_like_xtuner() {
        let text =
            std::fs::read_to_string(crate::test_support::fixture("tokenizer/encode_cases.jsonl"))
                .unwrap();
        let mut seen = std::collections::HashSet::new();
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
        {
            let case: Value = serde_json::from_str(line).unwrap();
            let format: DataFormat = case["format"].as_str().unwrap().parse().unwrap();
            let want: Vec<Turn> = serde_json::from_value(case["conversation"].clone()).unwrap();
            let sample = format.map(&case["raw"], &ColumnMap::new()).unwrap();
            let (got, image) = conversation_of(sample);
            assert_eq!(got, want, "line {} ({format})", number + 1);
            let want_image = case["raw"]
                .get("image")
                .and_then(Value::as_str)
                .map(str::to_string);
            assert_eq!(image, want_image, "line {}", number + 1);
            if case.get("dropped").and_then(Value::as_bool) == Some(true) {
                assert!(got.is_empty(), "line {}", number + 1);
            }
            seen.insert(format);
        }
        // The fixture covers these four formats; the others are checked against XTuner's
        // source in their own modules.
        let want = [
            DataFormat::Alpaca,
            DataFormat::Openai,
            DataFormat::Llava,
            DataFormat::Pretrain,
        ];
        assert_eq!(seen, want.into_iter().collect(), "formats in the fixture");
    }

    #[test]
    fn names_round_trip() {
        for format in DataFormat::all() {
            assert_eq!(format.name().parse::<DataFormat>().unwrap(), *format);
            assert_eq!(format.to_string(), format.name());
            let json = serde_json::to_string(format).unwrap();
            assert_eq!(serde_json::from_str::<DataFormat>(&json).unwrap(), *format);
        }
        assert_eq!(DataFormat::all().len(), 21);
    }

    #[test]
    fn aliases_are_accepted() {
        let cases = [
            ("sharegpt", DataFormat::Wizardlm),
            ("crime_kg_assitan", DataFormat::CrimeKgAssitant),
            ("crime_kg_assitant", DataFormat::CrimeKgAssitant),
        ];
        for (name, want) in cases {
            assert_eq!(name.parse::<DataFormat>().unwrap(), want, "{name}");
            assert_eq!(
                serde_json::from_value::<DataFormat>(json!(name)).unwrap(),
                want
            );
        }
    }

    #[test]
    fn unknown_names_list_every_valid_one() {
        for name in ["Alpaca", "alpaca-zh", "", "msagent_react"] {
            let err = name.parse::<DataFormat>().unwrap_err();
            let crate::Error::UnknownFormat { name: got, valid } = &err else {
                panic!("wrong error {err:?}");
            };
            assert_eq!(got, name);
            for format in DataFormat::all() {
                assert!(valid.split(", ").any(|v| v == format.name()), "{valid}");
            }
            assert!(valid.contains("sharegpt (= wizardlm)"), "{valid}");
        }
        let err = serde_json::from_value::<DataFormat>(json!("alpacca")).unwrap_err();
        assert!(
            err.to_string().contains("unknown data format `alpacca`"),
            "{err}"
        );
    }

    #[test]
    fn column_map_renames_fields() {
        let columns: ColumnMap = [("instruction", "prompt"), ("output", "answer")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let record =
            json!({"prompt": "Add 2 and 3.", "input": "", "answer": "5", "instruction": "ignored"});
        let (turns, _) = conversation_of(DataFormat::Alpaca.map(&record, &columns).unwrap());
        assert_eq!(turns, vec![Turn::new("Add 2 and 3.\n", "5")]);

        let columns: ColumnMap = [("messages".to_string(), "chat".to_string())].into();
        let record = json!({"chat": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]});
        let (turns, _) = conversation_of(DataFormat::Openai.map(&record, &columns).unwrap());
        assert_eq!(turns, vec![Turn::new("hi", "yo").with_system("")]);

        let columns: ColumnMap = [("image".to_string(), "picture".to_string())].into();
        let record = json!({"picture": "a.jpg", "conversations": []});
        let (_, image) = conversation_of(DataFormat::Llava.map(&record, &columns).unwrap());
        assert_eq!(image.as_deref(), Some("a.jpg"));
    }

    #[test]
    fn errors_name_the_mapped_column() {
        let columns: ColumnMap = [("instruction".to_string(), "prompt".to_string())].into();
        let err = DataFormat::Alpaca
            .map(&json!({"input": "", "output": "x"}), &columns)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing field `prompt` (the column for `instruction`) (format alpaca)"
        );
        let columns: ColumnMap = [("messages".to_string(), "chat".to_string())].into();
        let err = DataFormat::Openai
            .map(&json!({"chat": [{"content": "x"}]}), &columns)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing field `chat[0].role` (the column for `messages`) (format openai)"
        );
    }

    #[test]
    fn check_columns_rejects_fields_the_format_does_not_read() {
        let cases: [(DataFormat, &[&str], bool); 5] = [
            (DataFormat::Alpaca, &["instruction", "output"], true),
            (DataFormat::Alpaca, &["messages"], false),
            (DataFormat::Llava, &["image"], true),
            (DataFormat::Tokenized, &["labels"], true),
            (DataFormat::Pretrain, &["content"], false),
        ];
        for (format, keys, ok) in cases {
            let columns: ColumnMap = keys
                .iter()
                .map(|k| (k.to_string(), "x".to_string()))
                .collect();
            let result = format.check_columns(&columns);
            assert_eq!(result.is_ok(), ok, "{format} {keys:?}: {result:?}");
            if let Err(err) = result {
                assert!(err.to_string().contains(format.fields()[0]), "{err}");
            }
        }
    }

    #[test]
    fn every_format_rejects_records_that_are_not_objects() {
        for format in DataFormat::all() {
            for record in [json!([1]), json!("text"), Value::Null] {
                let err = format.map(&record, &ColumnMap::new()).unwrap_err();
                assert!(
                    matches!(err, FormatError::NotAnObject { .. }),
                    "{format}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn every_format_names_a_missing_field() {
        for format in DataFormat::all() {
            let err = format
                .map(&json!({"unrelated": 1}), &ColumnMap::new())
                .unwrap_err();
            let FormatError::MissingField { format: got, at } = &err else {
                panic!("{format}: {err:?}");
            };
            assert_eq!(got, format);
            assert!(format.fields().contains(&at.field), "{format}: {err}");
            assert!(err.to_string().starts_with("missing field `"), "{err}");
        }
    }

    #[test]
    fn every_format_documents_its_fields() {
        for format in DataFormat::all() {
            assert!(!format.fields().is_empty(), "{format}");
        }
    }

    #[test]
    fn system_prompts_come_from_the_templates() {
        let record = json!({"prompt": "p", "completion": "c", "response": "r", "abstract": "a",
            "title": "t", "question": "q", "answer": "s", "input": "i", "output": "o",
            "instruction": "n", "context": "x", "description": "d: blue", "color": "#00f"});
        let cases = [
            (DataFormat::CodeAlpaca, SystemTemplate::Coder),
            (DataFormat::TinyCodes, SystemTemplate::Coder),
            (DataFormat::Arxiv, SystemTemplate::ArxivGentile),
            (DataFormat::Colors, SystemTemplate::Colorist),
            (DataFormat::LawReference, SystemTemplate::Lawyer),
            (DataFormat::CrimeKgAssitant, SystemTemplate::Lawyer),
            (DataFormat::Medical, SystemTemplate::Medical),
            (DataFormat::Sql, SystemTemplate::Sql),
        ];
        for (format, system) in cases {
            let (turns, _) = conversation_of(format.map(&record, &ColumnMap::new()).unwrap());
            assert_eq!(turns.len(), 1, "{format}");
            assert_eq!(turns[0].system.as_deref(), Some(system.text()), "{format}");
        }
    }
}
