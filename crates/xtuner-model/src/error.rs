//! The error type of xtuner-model.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when configuring or loading a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
}
