//! The error type of xtuner-template.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when choosing or applying a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A prompt template name that XTuner does not define.
    #[error("unknown prompt template `{name}`; valid templates: {valid}")]
    UnknownTemplate {
        /// The name given.
        name: String,
        /// Every valid name, comma separated.
        valid: String,
    },
    /// A system template name that XTuner does not define.
    #[error("unknown system template `{name}`; valid system templates: {valid}")]
    UnknownSystemTemplate {
        /// The name given.
        name: String,
        /// Every valid name, comma separated.
        valid: String,
    },
    /// A turn carries a system prompt but the template has no SYSTEM field
    /// (XTuner raises here too).
    #[error("template `{template}` has no SYSTEM field, but turn {turn} has a system prompt")]
    NoSystemField {
        /// The template's name.
        template: String,
        /// 1-based turn number.
        turn: usize,
    },
    /// A template field uses a placeholder it cannot be given, or has an unbalanced brace.
    #[error("template `{template}` field {field}: {message}")]
    BadField {
        /// The template's name.
        template: String,
        /// The field (SYSTEM, INSTRUCTION, ...).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A Jinja chat template failed to compile or to render (`raise_exception` included).
    #[error("chat template {origin}{}: {message}", line_text(.line))]
    Jinja {
        /// The template's file (or name).
        origin: String,
        /// The template line where it failed, with the line's text.
        line: Option<(usize, String)>,
        /// What failed (a raised exception's own message).
        message: String,
    },
    /// A tokenizer file holding the chat template could not be read.
    #[error("{}: {message}", path.display())]
    TemplateFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn line_text(line: &Option<(usize, String)>) -> String {
    match line {
        Some((n, text)) if !text.is_empty() => format!(", line {n} (`{text}`)"),
        Some((n, _)) => format!(", line {n}"),
        None => String::new(),
    }
}

impl Error {
    /// Whether the error is a mistake in what the user asked for (a template name or
    /// field), rather than in the data a template was applied to.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::NoSystemField { .. } | Self::Jinja { .. })
    }
}
