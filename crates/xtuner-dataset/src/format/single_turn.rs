//! The formats whose map function builds exactly one turn out of fixed fields.
//!
//! Fourteen of XTuner's map functions differ only in which fields fill the turn's system,
//! input and output, so each is one [`SingleTurn`] entry rather than a function: alpaca,
//! alpaca_zh, pretrain, code_alpaca, sql, medical, openorca, tiny_codes, stack_exchange,
//! arxiv, colors, law_reference, crime_kg_assitant and default.

use serde_json::Value;
use xtuner_template::{Conversation, SystemTemplate, Turn};

use super::FormatError;
use super::fields::{Fields, py_strip};

/// How one single-turn format fills its turn.
pub(super) struct SingleTurn {
    /// The fields it reads, in the order XTuner reads them.
    pub(super) fields: &'static [&'static str],
    system: System,
    input: Text,
    output: Text,
    need_eos_token: bool,
    /// alpaca's rule: an output of exactly `<nooutput>` makes the conversation empty.
    drop_nooutput: bool,
}

/// Where the turn's system prompt comes from.
enum System {
    /// No `system` key at all.
    None,
    /// One of XTuner's system templates.
    Template(SystemTemplate),
    /// A field of the record.
    Field(&'static str),
}

/// How a turn's input or output text is made from the record.
enum Text {
    /// The empty string.
    Empty,
    /// A field as is.
    Field(&'static str),
    /// Two fields joined by a newline: Python's `f"{a}\n{b}"`.
    Lines(&'static str, &'static str),
    /// colors' `":".join(text.split(":")[1:]).strip()`: what follows the first colon.
    AfterColon(&'static str),
    /// pretrain's `text.strip()`.
    Stripped(&'static str),
}

impl Text {
    fn read(&self, fields: &Fields<'_>) -> Result<String, FormatError> {
        Ok(match *self {
            Text::Empty => String::new(),
            Text::Field(name) => fields.str(name)?.to_string(),
            Text::Lines(first, second) => {
                format!("{}\n{}", fields.str(first)?, fields.str(second)?)
            }
            Text::AfterColon(name) => {
                let text = fields.str(name)?;
                text.split_once(':')
                    .map_or("", |(_, rest)| py_strip(rest))
                    .to_string()
            }
            Text::Stripped(name) => py_strip(fields.str(name)?).to_string(),
        })
    }
}

impl SingleTurn {
    /// Builds the one turn (or, for alpaca's `<nooutput>`, none).
    pub(super) fn map(&self, fields: &Fields<'_>) -> Result<Conversation, FormatError> {
        // XTuner checks `example.get("output")` before touching any other field.
        if self.drop_nooutput
            && fields.optional("output").and_then(Value::as_str) == Some("<nooutput>")
        {
            return Ok(Conversation::default());
        }
        let system = match self.system {
            System::None => None,
            System::Template(template) => Some(template.text().to_string()),
            System::Field(name) => Some(fields.str(name)?.to_string()),
        };
        let turn = Turn {
            system,
            input: self.input.read(fields)?,
            output: self.output.read(fields)?,
            output_with_loss: true,
            need_eos_token: self.need_eos_token,
            sep: String::new(),
        };
        Ok(Conversation::new(vec![turn]))
    }
}

const fn entry(
    fields: &'static [&'static str],
    system: System,
    input: Text,
    output: Text,
) -> SingleTurn {
    SingleTurn {
        fields,
        system,
        input,
        output,
        need_eos_token: true,
        drop_nooutput: false,
    }
}

/// `alpaca_map_fn`.
pub(super) const ALPACA: SingleTurn = SingleTurn {
    drop_nooutput: true,
    ..entry(
        &["instruction", "input", "output"],
        System::None,
        Text::Lines("instruction", "input"),
        Text::Field("output"),
    )
};

/// `alpaca_zh_map_fn`.
pub(super) const ALPACA_ZH: SingleTurn = entry(
    &["instruction_zh", "input_zh", "output_zh"],
    System::None,
    Text::Lines("instruction_zh", "input_zh"),
    Text::Field("output_zh"),
);

/// `pretrain_map_fn`: the whole text is the output, and no EOS follows it.
pub(super) const PRETRAIN: SingleTurn = SingleTurn {
    need_eos_token: false,
    ..entry(&["text"], System::None, Text::Empty, Text::Stripped("text"))
};

/// `code_alpaca_map_fn`.
pub(super) const CODE_ALPACA: SingleTurn = entry(
    &["prompt", "completion"],
    System::Template(SystemTemplate::Coder),
    Text::Field("prompt"),
    Text::Field("completion"),
);

/// `sql_map_fn`.
pub(super) const SQL: SingleTurn = entry(
    &["context", "question", "answer"],
    System::Template(SystemTemplate::Sql),
    Text::Lines("context", "question"),
    Text::Field("answer"),
);

/// `medical_map_fn`.
pub(super) const MEDICAL: SingleTurn = entry(
    &["instruction", "input", "output"],
    System::Template(SystemTemplate::Medical),
    Text::Lines("instruction", "input"),
    Text::Field("output"),
);

/// `openorca_map_fn`.
pub(super) const OPENORCA: SingleTurn = entry(
    &["system_prompt", "question", "response"],
    System::Field("system_prompt"),
    Text::Field("question"),
    Text::Field("response"),
);

/// `tiny_codes_map_fn`.
pub(super) const TINY_CODES: SingleTurn = entry(
    &["prompt", "response"],
    System::Template(SystemTemplate::Coder),
    Text::Field("prompt"),
    Text::Field("response"),
);

/// `stack_exchange_map_fn`.
pub(super) const STACK_EXCHANGE: SingleTurn = entry(
    &["question", "response"],
    System::None,
    Text::Field("question"),
    Text::Field("response"),
);

/// `arxiv_map_fn`.
pub(super) const ARXIV: SingleTurn = entry(
    &["abstract", "title"],
    System::Template(SystemTemplate::ArxivGentile),
    Text::Field("abstract"),
    Text::Field("title"),
);

/// `colors_map_fn`.
pub(super) const COLORS: SingleTurn = entry(
    &["description", "color"],
    System::Template(SystemTemplate::Colorist),
    Text::AfterColon("description"),
    Text::Field("color"),
);

/// `law_reference_map_fn`.
pub(super) const LAW_REFERENCE: SingleTurn = entry(
    &["question", "answer"],
    System::Template(SystemTemplate::Lawyer),
    Text::Field("question"),
    Text::Field("answer"),
);

/// `crime_kg_assitant_map_fn`.
pub(super) const CRIME_KG_ASSITANT: SingleTurn = entry(
    &["input", "output"],
    System::Template(SystemTemplate::Lawyer),
    Text::Field("input"),
    Text::Field("output"),
);

/// `default_map_fn`.
pub(super) const DEFAULT: SingleTurn = entry(
    &["input", "output"],
    System::None,
    Text::Field("input"),
    Text::Field("output"),
);

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use xtuner_template::{SystemTemplate as S, Turn};

    use crate::format::{ColumnMap, DataFormat as F, FormatError, Sample};

    fn turns(format: F, record: Value) -> Vec<Turn> {
        match format.map(&record, &ColumnMap::new()) {
            Ok(Sample::Conversation {
                conversation,
                image: None,
            }) => conversation.conversation,
            other => panic!("{format}: {other:?}"),
        }
    }

    #[test]
    fn single_turn_formats_build_xtuner_turns() {
        let pretrain = |output: &str| Turn {
            need_eos_token: false,
            ..Turn::new("", output)
        };
        // (format, raw record, the turns XTuner's map function returns)
        let cases: Vec<(F, Value, Vec<Turn>)> = vec![
            (
                F::Alpaca,
                json!({"instruction": "Sum.", "input": "1 2", "output": "3"}),
                vec![Turn::new("Sum.\n1 2", "3")],
            ),
            (
                F::Alpaca,
                json!({"instruction": "Hi.", "input": "", "output": "Hello"}),
                vec![Turn::new("Hi.\n", "Hello")],
            ),
            (
                F::Alpaca,
                json!({"instruction": "Poem", "input": "", "output": "<nooutput>"}),
                vec![],
            ),
            // The `<nooutput>` check comes first: nothing else is read.
            (F::Alpaca, json!({"output": "<nooutput>"}), vec![]),
            (
                F::Alpaca,
                json!({"instruction": "a", "input": "b", "output": " <nooutput>"}),
                vec![Turn::new("a\nb", " <nooutput>")],
            ),
            (
                F::AlpacaZh,
                json!({"instruction_zh": "翻译", "input_zh": "", "output_zh": "<nooutput>"}),
                vec![Turn::new("翻译\n", "<nooutput>")],
            ),
            (
                F::Pretrain,
                json!({"text": "\u{3000} doc \x1c\n"}),
                vec![pretrain("doc")],
            ),
            (F::Pretrain, json!({"text": "  "}), vec![pretrain("")]),
            (
                F::CodeAlpaca,
                json!({"prompt": "p", "completion": "c"}),
                vec![Turn::new("p", "c").with_system(S::Coder.text())],
            ),
            (
                F::Sql,
                json!({"context": "CREATE TABLE t", "question": "q?", "answer": "SELECT"}),
                vec![Turn::new("CREATE TABLE t\nq?", "SELECT").with_system(S::Sql.text())],
            ),
            (
                F::Medical,
                json!({"instruction": "i", "input": "", "output": "o"}),
                vec![Turn::new("i\n", "o").with_system(S::Medical.text())],
            ),
            (
                F::Openorca,
                json!({"system_prompt": "", "question": "q", "response": "r"}),
                vec![Turn::new("q", "r").with_system("")],
            ),
            (
                F::Openorca,
                json!({"system_prompt": "Be brief.", "question": "q", "response": "r"}),
                vec![Turn::new("q", "r").with_system("Be brief.")],
            ),
            (
                F::TinyCodes,
                json!({"prompt": "p", "response": "r"}),
                vec![Turn::new("p", "r").with_system(S::Coder.text())],
            ),
            (
                F::StackExchange,
                json!({"question": "q", "response": "r"}),
                vec![Turn::new("q", "r")],
            ),
            (
                F::Arxiv,
                json!({"abstract": "We show.", "title": "T"}),
                vec![Turn::new("We show.", "T").with_system(S::ArxivGentile.text())],
            ),
            (
                F::Colors,
                json!({"description": "Medium: a calm blue: sky ", "color": "#1e90ff"}),
                vec![Turn::new("a calm blue: sky", "#1e90ff").with_system(S::Colorist.text())],
            ),
            (
                F::Colors,
                json!({"description": "no colon", "color": "#000"}),
                vec![Turn::new("", "#000").with_system(S::Colorist.text())],
            ),
            (
                F::LawReference,
                json!({"question": "q", "answer": "a"}),
                vec![Turn::new("q", "a").with_system(S::Lawyer.text())],
            ),
            (
                F::CrimeKgAssitant,
                json!({"input": "i", "output": "o"}),
                vec![Turn::new("i", "o").with_system(S::Lawyer.text())],
            ),
            (
                F::Default,
                json!({"input": "i", "output": "o", "extra": 1}),
                vec![Turn::new("i", "o")],
            ),
        ];
        for (format, record, want) in cases {
            assert_eq!(turns(format, record.clone()), want, "{format} {record}");
        }
    }

    #[test]
    fn single_turn_errors_name_the_field() {
        // (format, raw record, the error's text)
        let cases = [
            (
                F::Alpaca,
                json!({"input": "", "output": "o"}),
                "missing field `instruction` (format alpaca)",
            ),
            (
                F::Alpaca,
                json!({"instruction": "i", "output": "o"}),
                "missing field `input` (format alpaca)",
            ),
            (
                F::Alpaca,
                json!({"instruction": 3, "input": "", "output": "o"}),
                "field `instruction` should be a string but is a number (format alpaca)",
            ),
            (
                F::Alpaca,
                json!({"instruction": "i", "input": null, "output": "o"}),
                "field `input` should be a string but is null (format alpaca)",
            ),
            (
                F::Pretrain,
                json!({"text": ["a"]}),
                "field `text` should be a string but is an array (format pretrain)",
            ),
            (
                F::Openorca,
                json!({"question": "q", "response": "r"}),
                "missing field `system_prompt` (format openorca)",
            ),
            (
                F::Sql,
                json!({"context": "c", "question": "q"}),
                "missing field `answer` (format sql)",
            ),
            (
                F::Colors,
                json!({"description": {}, "color": "c"}),
                "field `description` should be a string but is an object (format colors)",
            ),
        ];
        for (format, record, want) in cases {
            let err = format.map(&record, &ColumnMap::new()).unwrap_err();
            assert!(matches!(
                err,
                FormatError::MissingField { .. } | FormatError::WrongType { .. }
            ));
            assert_eq!(err.to_string(), want, "{format} {record}");
        }
    }

    #[test]
    fn fields_are_listed_in_read_order() {
        // The first missing field reported is the first one listed.
        for format in F::all() {
            let err = format.map(&json!({}), &ColumnMap::new()).unwrap_err();
            if let FormatError::MissingField { at, .. } = err {
                assert_eq!(at.field, format.fields()[0], "{format}");
            }
        }
    }
}
