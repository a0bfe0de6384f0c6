//! The error type of xtuner-engine.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while configuring or running training.
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
    /// A config file is invalid.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A model could not be built or loaded.
    #[error(transparent)]
    Model(#[from] xtuner_model::Error),
    /// The loss stopped being a number.
    #[error("the loss became {loss} at iteration {iter}; training stopped{}", match checkpoint { Some(p) => format!(" (the last good checkpoint is {})", p.display()), None => " (no checkpoint was written yet)".to_string() })]
    Diverged {
        /// The iteration (1-based).
        iter: usize,
        /// The loss value.
        loss: f64,
        /// The last good checkpoint.
        checkpoint: Option<PathBuf>,
    },
    /// A training sample's image is missing or unreadable.
    #[error("{}: the image `{name}` of {record} cannot be read ({message}); fix it, or set data.skip_bad_records = true to skip such samples", path.display())]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// The image as the record names it.
        name: String,
        /// The record: `the record at file:line`.
        record: String,
        /// What went wrong.
        message: String,
    },
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] xtuner_dataset::Error),
    /// The device failed to run the queued work.
    #[error("the device failed: {0}")]
    Device(String),
}
