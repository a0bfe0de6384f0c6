//! Turning raw data into trained tokens exactly as XTuner (v0.2) does.
//!
//! The pipeline, one module per stage:
//! [`reader`] (JSON, JSON Lines, Parquet) → [`mod@format`] (XTuner's dataset map functions, onto
//! the standard conversation format) → template ([`xtuner_template`]) → [`encode`]
//! (ids and labels) → [`pack`] (packing to `max_length`) → [`collate`] (batches).
//! [`tokenizer`] loads `tokenizer.json` or SentencePiece `tokenizer.model`; [`pipeline`]
//! runs the stages on every core (results in input order), [`cache`] keeps processed
//! data sets so that a second run skips all of it, and [`sampler`] orders the rows of
//! an epoch (seeded shuffle, XTuner's length-grouped sampler). [`preference`] is the
//! same path for preference pairs (DPO, ORPO, reward models), rendered with the
//! tokenizer's own Jinja chat template. [`error`] is the crate's error type.

pub mod cache;
pub mod collate;
pub mod encode;
pub mod error;
pub mod format;
pub mod pack;
pub mod pipeline;
pub mod preference;
pub mod reader;
pub mod sampler;
pub mod tokenizer;

pub use cache::{CacheOutcome, load_or_process, load_or_process_pairs};
pub use encode::{EncodedSample, IGNORE_INDEX, IMAGE_TOKEN_INDEX};
pub use error::{Error, Result};
pub use pack::PackedRow;
pub use pipeline::{DataSpec, DatasetStats, ProcessedDataset};
pub use tokenizer::Tokenizer;

/// The fixture path helper of this crate's tests (one definition, shared with the
/// integration tests).
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
pub(crate) mod test_support;
