//! XTuner's standard conversation format: a sample is a list of turns.
//!
//! Every dataset format is mapped onto this shape before templating, and a data file
//! already in this shape (`{"conversation": [...]}`) is used as is. A turn's `system` and
//! `input` are context and never trained; its `output` is trained unless
//! `output_with_loss` is false.

use serde::{Deserialize, Deserializer, Serialize};

/// One turn: optional system text, the user's input, the assistant's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    /// System prompt for this turn (usually only on the first); empty or absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The user's text (`null` in a data file reads as empty).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub input: String,
    /// The assistant's text.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub output: String,
    /// Whether the output (and its EOS) is trained.
    #[serde(default = "default_true")]
    pub output_with_loss: bool,
    /// Whether the tokenizer's EOS follows the output; templates overwrite it.
    #[serde(default = "default_true")]
    pub need_eos_token: bool,
    /// Text appended after the turn (never trained); templates overwrite it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sep: String,
}

impl Turn {
    /// A trained turn with no system prompt and XTuner's defaults for the control keys.
    pub fn new(input: impl Into<String>, output: impl Into<String>) -> Self {
        Self {
            system: None,
            input: input.into(),
            output: output.into(),
            output_with_loss: true,
            need_eos_token: true,
            sep: String::new(),
        }
    }

    /// The same turn with a system prompt.
    pub fn with_system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }

    /// The system prompt if it is present and non-empty.
    pub fn system_text(&self) -> Option<&str> {
        self.system.as_deref().filter(|s| !s.is_empty())
    }
}

/// One chat message as chat templates (Jinja's `messages`) and preference data take
/// it: `{"role": "system" | "user" | "assistant", "content": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message of `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A whole sample in the standard format: `{"conversation": [turn, ...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversation {
    /// The turns, in order.
    pub conversation: Vec<Turn>,
}

impl Conversation {
    /// Wraps a list of turns.
    pub fn new(turns: Vec<Turn>) -> Self {
        Self {
            conversation: turns,
        }
    }

    /// True when there is no turn (XTuner drops such samples after templating).
    pub fn is_empty(&self) -> bool {
        self.conversation.is_empty()
    }
}

fn default_true() -> bool {
    true
}

fn null_as_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_input_reads_as_empty_and_flags_default_to_true() {
        let turn: Turn = serde_json::from_str(r#"{"input": null, "output": "x"}"#).unwrap();
        assert_eq!(turn, Turn::new("", "x"));
        assert!(turn.output_with_loss && turn.need_eos_token);
    }

    #[test]
    fn unknown_turn_keys_are_rejected() {
        let err = serde_json::from_str::<Turn>(r#"{"input": "a", "outptu": "b"}"#).unwrap_err();
        assert!(err.to_string().contains("outptu"), "{err}");
    }

    #[test]
    fn empty_system_is_no_system() {
        assert_eq!(Turn::new("a", "b").with_system("").system_text(), None);
        assert_eq!(
            Turn::new("a", "b").with_system("S").system_text(),
            Some("S")
        );
    }
}
