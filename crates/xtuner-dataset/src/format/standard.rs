//! The two formats that need no mapping: data already in XTuner's standard conversation
//! format, and rows that are already tokenized.
//!
//! XTuner reaches the first with `dataset_map_fn=None` and the second with a pre-processed
//! data set (`input_ids`/`labels` columns). Both are checked strictly here, since a typo in
//! a turn's key or a label list of the wrong length would otherwise train silently wrong.

use serde::Deserialize;
use serde_json::Value;
use xtuner_template::{Conversation, Turn};

use super::fields::Fields;
use super::{FormatError, Sample};

/// `{"conversation": [turn, ...]}`, each turn exactly an [`xtuner_template::Turn`].
///
/// Other columns of the record (an `id`, say) are ignored, as XTuner ignores them; a
/// turn may hold no key a turn does not have, since a misspelt key would otherwise
/// train silently wrong.
pub(super) fn conversation(fields: &Fields<'_>) -> Result<Conversation, FormatError> {
    let turns = fields.array("conversation")?;
    let turns = turns.iter().enumerate().map(|(index, turn)| {
        Turn::deserialize(turn).map_err(|err| FormatError::BadTurn {
            format: fields.format(),
            at: fields.element_path("conversation", index, None),
            message: err.to_string(),
        })
    });
    Ok(Conversation::new(turns.collect::<Result<_, _>>()?))
}

/// `{"input_ids": [...], "labels": [...]}`: integers, one label per id. Without `labels`
/// (absent or `null`) every token is trained: labels = input_ids. Other keys (a `length`
/// column, say) are ignored.
pub(super) fn tokenized(fields: &Fields<'_>) -> Result<Sample, FormatError> {
    let input_ids = integers(fields, "input_ids", fields.array("input_ids")?)?;
    let labels = match fields.optional("labels") {
        None => input_ids.clone(),
        Some(Value::Array(labels)) => integers(fields, "labels", labels)?,
        Some(other) => return Err(fields.wrong_type(fields.path("labels"), "an array", other)),
    };
    if labels.len() != input_ids.len() {
        return Err(FormatError::LengthMismatch {
            format: fields.format(),
            input_ids: input_ids.len(),
            labels: labels.len(),
        });
    }
    Ok(Sample::Tokenized { input_ids, labels })
}

fn integers(
    fields: &Fields<'_>,
    field: &'static str,
    values: &[Value],
) -> Result<Vec<i64>, FormatError> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            value.as_i64().ok_or_else(|| FormatError::WrongType {
                format: fields.format(),
                at: fields.element_path(field, index, None),
                expected: "an integer",
                found: match value {
                    Value::Number(number) if number.is_f64() => "a floating-point number",
                    Value::Number(_) => "an integer beyond the i64 range",
                    other => super::fields::type_name(other),
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use xtuner_template::Turn;

    use crate::format::{ColumnMap, DataFormat as F, FormatError, Sample};

    #[test]
    fn conversation_records_are_taken_as_they_are() {
        let trained_off = Turn {
            output_with_loss: false,
            need_eos_token: false,
            ..Turn::new("q", "a")
        };
        // (record, the turns)
        let cases: Vec<(Value, Vec<Turn>)> = vec![
            (json!({"conversation": []}), vec![]),
            (
                json!({"conversation": [{"system": "S", "input": "q", "output": "a"}]}),
                vec![Turn::new("q", "a").with_system("S")],
            ),
            (
                json!({"conversation": [{"input": null, "output": "a"}, {"output": "b"}]}),
                vec![Turn::new("", "a"), Turn::new("", "b")],
            ),
            (
                json!({"conversation": [{"input": "q", "output": "a", "output_with_loss": false, "need_eos_token": false}]}),
                vec![trained_off],
            ),
        ];
        for (record, want) in cases {
            let got = F::Conversation.map(&record, &ColumnMap::new()).unwrap();
            let Sample::Conversation {
                conversation,
                image: None,
            } = got
            else {
                panic!("{got:?}")
            };
            assert_eq!(conversation.conversation, want, "{record}");
        }
        let columns: ColumnMap = [("conversation".to_string(), "dialog".to_string())].into();
        let got = F::Conversation
            .map(
                &json!({"dialog": [{"input": "q", "output": "a"}]}),
                &columns,
            )
            .unwrap();
        assert!(
            matches!(got, Sample::Conversation { ref conversation, .. } if conversation.conversation == vec![Turn::new("q", "a")])
        );
    }

    #[test]
    fn conversation_records_are_checked_strictly() {
        // Other columns are ignored, as XTuner does.
        assert!(
            F::Conversation
                .map(&json!({"conversation": [], "id": 7}), &ColumnMap::new())
                .is_ok()
        );
        // (record, the start of the error's text)
        let cases = [
            (
                json!({"conversation": [{"input": "q", "outptu": "a"}]}),
                "`conversation[0]`: unknown field `outptu`",
            ),
            (
                json!({"conversation": [{"input": "q", "output": "a"}, "text"]}),
                "`conversation[1]`: invalid type: string",
            ),
            (
                json!({"conversation": [{"input": 1, "output": "a"}]}),
                "`conversation[0]`: invalid type: integer",
            ),
            (
                json!({"conversation": {"input": "q"}}),
                "field `conversation` should be an array but is an object",
            ),
            (
                json!({"messages": []}),
                "missing field `conversation` (format conversation)",
            ),
        ];
        for (record, want) in cases {
            let err = F::Conversation.map(&record, &ColumnMap::new()).unwrap_err();
            assert!(err.to_string().starts_with(want), "{record}: {err}");
        }
    }

    #[test]
    fn tokenized_rows_keep_their_ids() {
        // (record, input_ids, labels)
        let cases: Vec<(Value, Vec<i64>, Vec<i64>)> = vec![
            (
                json!({"input_ids": [1, 5, 2], "labels": [-100, 5, 2]}),
                vec![1, 5, 2],
                vec![-100, 5, 2],
            ),
            (
                json!({"input_ids": [1, 5], "length": 2}),
                vec![1, 5],
                vec![1, 5],
            ),
            (
                json!({"input_ids": [1, 5], "labels": null}),
                vec![1, 5],
                vec![1, 5],
            ),
            (json!({"input_ids": [], "labels": []}), vec![], vec![]),
            (
                json!({"input_ids": [-200, 9_007_199_254_740_993_i64]}),
                vec![-200, 9_007_199_254_740_993],
                vec![-200, 9_007_199_254_740_993],
            ),
        ];
        for (record, ids, labels) in cases {
            let got = F::Tokenized.map(&record, &ColumnMap::new()).unwrap();
            assert_eq!(
                got,
                Sample::Tokenized {
                    input_ids: ids,
                    labels
                },
                "{record}"
            );
        }
    }

    #[test]
    fn tokenized_rows_are_checked() {
        // (record, the error's text)
        let cases = [
            (
                json!({"input_ids": [1, 2], "labels": [1]}),
                "`input_ids` has 2 ids but `labels` has 1 (format tokenized)",
            ),
            (
                json!({"input_ids": [1, 2.5]}),
                "field `input_ids[1]` should be an integer but is a floating-point number (format tokenized)",
            ),
            (
                json!({"input_ids": [1], "labels": ["1"]}),
                "field `labels[0]` should be an integer but is a string (format tokenized)",
            ),
            (
                json!({"input_ids": [18_446_744_073_709_551_615_u64]}),
                "field `input_ids[0]` should be an integer but is an integer beyond the i64 range (format tokenized)",
            ),
            (
                json!({"input_ids": [1], "labels": 1}),
                "field `labels` should be an array but is a number (format tokenized)",
            ),
            (
                json!({"input_ids": "1 2"}),
                "field `input_ids` should be an array but is a string (format tokenized)",
            ),
            (
                json!({"labels": [1]}),
                "missing field `input_ids` (format tokenized)",
            ),
        ];
        for (record, want) in cases {
            let err = F::Tokenized.map(&record, &ColumnMap::new()).unwrap_err();
            assert_eq!(err.to_string(), want, "{record}");
        }
        let err = F::Tokenized
            .map(&json!({"input_ids": [1], "labels": []}), &ColumnMap::new())
            .unwrap_err();
        assert!(matches!(
            err,
            FormatError::LengthMismatch {
                input_ids: 1,
                labels: 0,
                ..
            }
        ));
    }
}
