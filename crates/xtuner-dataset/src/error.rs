//! The error type of xtuner-dataset. Every variant names the culprit: a file, a line,
//! a field, a template.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while turning raw data into trained tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A data file is not valid JSON / JSON Lines.
    #[error("{}:{line}: malformed JSON: {message}", path.display())]
    MalformedJson {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A Parquet file could not be read.
    #[error("{}: cannot read Parquet: {message}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// A record does not fit its declared format.
    #[error("{}:{line}: {source}", path.display())]
    BadRecord {
        /// The file holding the record.
        path: PathBuf,
        /// 1-based line where the record starts (row number for Parquet).
        line: usize,
        /// What is wrong with it.
        source: crate::format::FormatError,
    },
    /// A text record met a pipeline without a tokenizer (only pre-tokenized data needs
    /// none).
    #[error(
        "{}:{line}: this record is text, which needs the model's tokenizer, and none was found (only the `tokenized` format needs none)",
        path.display()
    )]
    NoTokenizer {
        /// The file holding the record.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
    },
    /// A record could not be rendered with the chosen template.
    #[error("{}:{line}: {source}", path.display())]
    Template {
        /// The file holding the record.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// What the template said.
        source: xtuner_template::Error,
    },
    /// The tokenizer's Jinja chat template failed (on a record, or to load).
    #[error("{source}")]
    ChatTemplate {
        /// What the template said.
        source: xtuner_template::Error,
    },
    /// A preference record does not fit its format.
    #[error("{}:{line}: {message}", path.display())]
    BadPair {
        /// The file holding the record.
        path: PathBuf,
        /// 1-based line where the record starts (row number for Parquet).
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// No data file was found where the config points.
    #[error("no data files (.json, .jsonl, .parquet) found at {}", path.display())]
    NoDataFiles {
        /// The path given.
        path: PathBuf,
    },
    /// The inputs produced no trainable sample.
    #[error("the data set is empty: {reason}")]
    EmptyDataset {
        /// Why (how many records were read and dropped).
        reason: String,
    },
    /// An unknown data format name.
    #[error("unknown data format `{name}`; valid formats: {valid}")]
    UnknownFormat {
        /// The name given.
        name: String,
        /// Every valid name, comma separated.
        valid: String,
    },
    /// A tokenizer could not be loaded.
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Tokenizer {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer failed on a text.
    #[error("tokenizer failed: {message}")]
    Encode {
        /// What the tokenizer said.
        message: String,
    },
    /// A bad setting (max_length 0, varlen without packing, ...).
    #[error("invalid setting `{key}`: {message}")]
    InvalidSetting {
        /// The setting.
        key: &'static str,
        /// Why it is invalid.
        message: String,
    },
    /// The processed-dataset cache could not be read or written.
    #[error("{}: dataset cache: {message}", path.display())]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// Whether the error is a mistake in what the user asked for (an unknown format, a
    /// bad setting) rather than in the data or the files.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::UnknownFormat { .. } | Self::InvalidSetting { .. }
        )
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
