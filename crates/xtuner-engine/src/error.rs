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
    /// A setting of the run's config is invalid (the key names it; the file is added
    /// where the config was loaded).
    #[error("`{key}`: {message}")]
    Setting {
        /// The config key (`model.preset`, `lora.target_modules`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint could not be written or read back (optimizer state, `state.json`).
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A prompt template could not render a prompt.
    #[error(transparent)]
    Template(#[from] xtuner_template::Error),
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
    /// A value could not be serialized (a JSON or TOML file the run writes).
    #[error("{}: {message}", path.display())]
    Serialize {
        /// The file it was for.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The device failed to run the queued work.
    #[error("the device failed: {0}")]
    Device(String),
    /// The ranks of a data-parallel run could not complete an operation together.
    #[error("data parallel: {0}")]
    Collective(String),
}

impl Error {
    /// Whether the error is a mistake in what the user asked for (a config or setting),
    /// rather than a failure of the run: the CLI exits with 2 for these, 1 otherwise.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Config { .. } | Self::Setting { .. } => true,
            Self::Template(e) => e.is_usage(),
            Self::Data(e) => e.is_usage(),
            _ => false,
        }
    }

    /// A setting error for `key`.
    pub(crate) fn setting(key: &str, message: impl Into<String>) -> Self {
        Self::Setting {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
