//! [`ChatTemplate`]: the fields of one prompt template, and XTuner's `template_map_fn`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result, Turn};

/// One prompt template, with XTuner's field semantics.
///
/// Turn 0 renders as `SYSTEM + INSTRUCTION`, `[output + SUFFIX]`, `SEP`; later turns as
/// `INSTRUCTION`, `[output + SUFFIX]`, `SEP` (brackets: trained). With `suffix_as_eos`
/// the suffix replaces the tokenizer's EOS. Stop words are only used when generating.
///
/// In a config file a user-defined template is a table with these keys (XTuner's field
/// names in lower case); `system`, `suffix`, `sep` and `stop_words` may be left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    /// A name for messages (the XTuner name for built-in templates).
    #[serde(default = "custom_name")]
    pub name: String,
    /// SYSTEM: wraps a turn's system prompt (`{system}`); `None` when the template has none.
    #[serde(default)]
    pub system: Option<String>,
    /// INSTRUCTION: wraps the user's input (`{input}`, and `{round}` = 1-based turn).
    pub instruction: String,
    /// SUFFIX: appended to every output and trained with it.
    #[serde(default)]
    pub suffix: String,
    /// SUFFIX_AS_EOS: the suffix stands in for the tokenizer's EOS.
    #[serde(default)]
    pub suffix_as_eos: bool,
    /// SEP: untrained text after each turn.
    #[serde(default)]
    pub sep: String,
    /// STOP_WORDS: generation stops when the text ends with one of these.
    #[serde(default)]
    pub stop_words: Vec<String>,
}

fn custom_name() -> String {
    "custom".to_string()
}

impl ChatTemplate {
    /// Checks that every field only uses the placeholders it can be given, so that a
    /// user-defined template fails when loaded rather than on the first sample.
    pub fn validate(&self) -> Result<()> {
        if let Some(system) = &self.system {
            self.check_field("SYSTEM", system, &["system"])?;
        }
        self.check_field("INSTRUCTION", &self.instruction, &["input", "round"])?;
        for (field, text) in [("SUFFIX", &self.suffix), ("SEP", &self.sep)] {
            self.check_field(field, text, &[])?;
        }
        Ok(())
    }

    fn check_field(&self, field: &'static str, text: &str, allowed: &[&str]) -> Result<()> {
        let values: Vec<(&str, &str)> = allowed.iter().map(|k| (*k, "")).collect();
        format_placeholders(text, &values)
            .map(|_| ())
            .map_err(|message| Error::BadField {
                template: self.name.clone(),
                field,
                message,
            })
    }

    /// The text that opens the first turn of a prompt: `SYSTEM` with `system` filled in
    /// (nothing when `system` is empty), then `INSTRUCTION` with `input` and `round`.
    /// This is the prompt of XTuner's chat and evaluate-chat hook.
    pub fn prompt(&self, system: &str, input: &str, round: usize) -> Result<String> {
        let mut text = String::new();
        if !system.is_empty() {
            text += &self.render_system(system, round)?;
        }
        text += &self.render_field("INSTRUCTION", &self.instruction, input, round)?;
        Ok(text)
    }

    fn render_system(&self, system: &str, turn: usize) -> Result<String> {
        let template = self.system.as_deref().ok_or_else(|| Error::NoSystemField {
            template: self.name.clone(),
            turn,
        })?;
        format_placeholders(template, &[("system", system)]).map_err(|message| Error::BadField {
            template: self.name.clone(),
            field: "SYSTEM",
            message,
        })
    }

    fn render_field(
        &self,
        field: &'static str,
        text: &str,
        input: &str,
        round: usize,
    ) -> Result<String> {
        let round = round.to_string();
        format_placeholders(text, &[("input", input), ("round", &round)]).map_err(|message| {
            Error::BadField {
                template: self.name.clone(),
                field,
                message,
            }
        })
    }

    /// XTuner's `template_map_fn`: wraps every turn with the template.
    ///
    /// For turn i (1-based round): `input = SYSTEM(system) + INSTRUCTION(input, round)`
    /// (SYSTEM only when the turn has a non-empty system prompt), `output += SUFFIX`,
    /// `need_eos_token = !SUFFIX_AS_EOS`, `sep = SEP`. The system prompt stays on the turn.
    ///
    /// # Errors
    /// A turn with a system prompt when the template has no SYSTEM field.
    pub fn render(&self, turns: &[Turn]) -> Result<Vec<Turn>> {
        turns
            .iter()
            .enumerate()
            .map(|(i, turn)| {
                let round = i + 1;
                let mut input = match turn.system_text() {
                    Some(system) => self.render_system(system, round)?,
                    None => String::new(),
                };
                input +=
                    &self.render_field("INSTRUCTION", &self.instruction, &turn.input, round)?;
                Ok(Turn {
                    system: turn.system.clone(),
                    input,
                    output: format!("{}{}", turn.output, self.suffix),
                    output_with_loss: turn.output_with_loss,
                    need_eos_token: !self.suffix_as_eos,
                    sep: self.sep.clone(),
                })
            })
            .collect()
    }
}

/// Python `str.format` with named placeholders only: `{name}` is replaced by its value,
/// `{{` and `}}` are literal braces. Values are inserted verbatim (never re-scanned).
fn format_placeholders(template: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if tail.starts_with('}') {
            return Err("single `}` (write `}}` for a literal brace)".to_string());
        } else {
            let close = tail
                .find('}')
                .ok_or("unclosed `{` (write `{{` for a literal brace)")?;
            let key = &tail[1..close];
            let value = values
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("unknown placeholder `{{{key}}}`"))?;
            out.push_str(value);
            rest = &tail[close + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PromptTemplate;

    #[test]
    fn formatting_inserts_values_verbatim() {
        let out = format_placeholders("<{input}>{{x}}", &[("input", "{system}")]).unwrap();
        assert_eq!(out, "<{system}>{x}");
        assert!(format_placeholders("{nope}", &[("input", "")]).is_err());
        assert!(format_placeholders("a}b", &[]).is_err());
        assert!(format_placeholders("a{b", &[]).is_err());
    }

    #[test]
    fn chatglm2_numbers_rounds() {
        let t = PromptTemplate::Chatglm2.template();
        let out = t
            .render(&[Turn::new("a", "b"), Turn::new("c", "d")])
            .unwrap();
        assert_eq!(out[0].input, "[Round 1]\n\n问：a\n\n答：");
        assert_eq!(out[1].input, "[Round 2]\n\n问：c\n\n答：");
        assert_eq!(out[1].sep, "\n\n");
    }

    #[test]
    fn internlm2_suffix_replaces_eos() {
        let t = PromptTemplate::Internlm2Chat.template();
        let out = t.render(&[Turn::new("Q", "A").with_system("S")]).unwrap();
        assert_eq!(
            out[0].input,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(out[0].output, "A<|im_end|>");
        assert!(!out[0].need_eos_token);
        assert_eq!(out[0].system.as_deref(), Some("S"));
    }

    #[test]
    fn system_without_system_field_is_an_error() {
        let t = PromptTemplate::Minicpm.template();
        let err = t
            .render(&[Turn::new("Q", "A").with_system("S")])
            .unwrap_err();
        assert_eq!(
            err,
            Error::NoSystemField {
                template: "minicpm".into(),
                turn: 1
            }
        );
        // An empty system prompt is no system prompt.
        assert!(t.render(&[Turn::new("Q", "A").with_system("")]).is_ok());
    }

    #[test]
    fn user_templates_are_validated() {
        let mut t = PromptTemplate::Default.template();
        t.instruction = "{question}".into();
        assert!(matches!(
            t.validate(),
            Err(Error::BadField {
                field: "INSTRUCTION",
                ..
            })
        ));
        for builtin in PromptTemplate::all() {
            builtin.template().validate().unwrap();
        }
    }

    #[test]
    fn prompt_matches_first_rendered_turn() {
        for builtin in PromptTemplate::all() {
            let t = builtin.template();
            let system = if t.system.is_some() { "S" } else { "" };
            let rendered = t
                .render(&[Turn::new("Q", "A").with_system(system)])
                .unwrap();
            assert_eq!(
                t.prompt(system, "Q", 1).unwrap(),
                rendered[0].input,
                "{}",
                t.name
            );
        }
    }
}
