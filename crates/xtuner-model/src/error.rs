//! The error type of xtuner-model.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when configuring or loading a model.
// Not Clone/PartialEq: `Io` carries a `std::io::Error`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value that cannot build a model.
    #[error("invalid model config `{key}`: {message}")]
    InvalidConfig {
        /// The config key.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file that cannot be parsed or written (corrupt, truncated, bad header).
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: std::path::PathBuf,
        /// What the safetensors parser reported.
        message: String,
    },
    /// A PyTorch pickle checkpoint (`pytorch_model.bin`, `*.pth`, ...), which is refused.
    #[error(
        "{}: PyTorch pickle checkpoints are not loaded, because unpickling runs arbitrary code; \
         convert it to safetensors, e.g. `model.save_pretrained(dir, safe_serialization=True)`",
        path.display()
    )]
    PickleNotSupported {
        /// The pickle file.
        path: std::path::PathBuf,
    },
    /// A directory that holds no checkpoint this crate can read.
    #[error(
        "{}: no checkpoint found (expected model.safetensors or model.safetensors.index.json)",
        path.display()
    )]
    NoCheckpoint {
        /// The directory.
        path: std::path::PathBuf,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{key}` not found in checkpoint {}", path.display())]
    MissingTensor {
        /// The tensor key.
        key: String,
        /// The checkpoint (file or directory).
        path: std::path::PathBuf,
    },
    /// A tensor whose shape differs from the one the model expects.
    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor key.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
    },
    /// A tensor stored in a dtype that cannot be read (or written) where it was asked for.
    #[error("tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor key.
        key: String,
        /// The dtype, as the file or Burn names it.
        dtype: String,
    },
    /// The same tensor key given twice to a writer.
    #[error("tensor `{key}` given more than once")]
    DuplicateTensor {
        /// The tensor key.
        key: String,
    },
    /// Checkpoint tensors that the model did not use.
    #[error("{} unexpected tensor(s) in checkpoint: {}", keys.len(), list_keys(keys))]
    UnexpectedTensors {
        /// The unused keys, sorted.
        keys: Vec<String>,
    },
    /// A model `config.json` that cannot be used.
    #[error("{}: {message}", path.display())]
    BadConfig {
        /// The config file.
        path: std::path::PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A PEFT adapter that cannot be applied.
    #[error("{}: adapter: {message}", path.display())]
    BadAdapter {
        /// The adapter directory or file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `*.safetensors.index.json` that cannot be used.
    #[error("{}: bad checkpoint index: {message}", path.display())]
    BadIndex {
        /// The index file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor's values could not be read on the host.
    #[error("reading a tensor's values on the host: {message}")]
    HostRead {
        /// What went wrong.
        message: String,
    },
    /// An image file that cannot be opened, decoded or preprocessed.
    #[error("image {}: {message}", path.display())]
    Image {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tensor or value passed to a forward or splice whose shape or content is unusable.
    #[error("invalid `{name}`: {message}")]
    InvalidInput {
        /// The argument.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A LLaVA batch whose image slots and image features disagree in number.
    #[error(
        "the batch needs {needed} image(s) (one per `<image>` token, one per text-only row) but {given} image feature block(s) were given"
    )]
    ImageCountMismatch {
        /// Image slots the batch consumes.
        needed: usize,
        /// Image feature blocks given.
        given: usize,
    },
}

/// The first ten keys, comma-separated, then how many more there are.
fn list_keys(keys: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(", ... and {} more", keys.len() - SHOWN));
    }
    text
}

/// Reads a JSON config file; a file that does not parse as `T` is a
/// [`Error::BadConfig`] naming it.
pub(crate) fn read_json_file<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A validation error of a config read from `path`, restated to name the file.
pub(crate) fn in_file(path: &std::path::Path, error: Error) -> Error {
    match error {
        Error::InvalidConfig { key, message } => Error::BadConfig {
            path: path.to_path_buf(),
            message: format!("`{key}`: {message}"),
        },
        other => other,
    }
}
