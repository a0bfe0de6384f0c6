//! The multi-turn formats: OpenAI `messages`, ShareGPT-style `conversations` (wizardlm,
//! llava, llava_image_only) and oasst1's `### Human: / ### Assistant:` text.
//!
//! They share XTuner's way of folding a message list into turns: assistant messages before
//! the first user message are skipped, user text accumulates (concatenated with nothing in
//! between) until an assistant message closes the turn, and user text after the last
//! assistant message is dropped.

use xtuner_template::tokens::IMAGE_TOKEN;
use xtuner_template::{Conversation, Turn};

use super::fields::{Element, Fields, py_strip};
use super::{FormatError, Sample};

/// `openai_map_fn`: `messages` with roles system, user and assistant.
///
/// A system message sets the system prompt of the next turn (the last one wins); each
/// assistant message closes a turn whose `output_with_loss` is its `loss` key read the way
/// XTuner reads it: `str(loss).lower() == "true"`, absent meaning true. So `false`, `"False"`,
/// `null` and any number turn the loss off.
pub(super) fn openai(fields: &Fields<'_>) -> Result<Conversation, FormatError> {
    let messages = fields.array("messages")?;
    let mut turns = Vec::new();
    let mut system = String::new();
    let mut input = String::new();
    let mut leading = true;
    for (index, message) in messages.iter().enumerate() {
        let message = fields.element("messages", index, message)?;
        let role = message.str("role")?;
        if leading && role == "assistant" {
            continue;
        }
        leading = false;
        match role {
            "system" => system = message.str("content")?.to_string(),
            "user" => input.push_str(message.str("content")?),
            "assistant" => turns.push(Turn {
                system: Some(std::mem::take(&mut system)),
                input: std::mem::take(&mut input),
                output: message.str("content")?.to_string(),
                output_with_loss: loss_flag(message.get("loss")),
                need_eos_token: true,
                sep: String::new(),
            }),
            other => {
                return Err(unknown_role(
                    fields,
                    &message,
                    "role",
                    other,
                    "system, user, assistant",
                ));
            }
        }
    }
    Ok(Conversation::new(turns))
}

/// Python's `str(value).lower() == "true"` on a message's `loss` (default `"True"`).
fn loss_flag(value: Option<&serde_json::Value>) -> bool {
    match value {
        None | Some(serde_json::Value::Bool(true)) => true,
        Some(serde_json::Value::String(text)) => text.to_lowercase() == "true",
        Some(_) => false,
    }
}

/// `wizardlm_map_fn`: `conversations` with `from` human/gpt, the human text as is.
pub(super) fn wizardlm(fields: &Fields<'_>) -> Result<Conversation, FormatError> {
    share_gpt(fields, |_, text| Ok(text.to_string()))
}

/// `llava_map_fn`: like wizardlm, but a human message holding `<image>` has every token
/// removed, the rest stripped, and one token put in front: `"<image>\n" + text`.
pub(super) fn llava(fields: &Fields<'_>) -> Result<Sample, FormatError> {
    let conversation = share_gpt(fields, |_, text| {
        if !text.contains(IMAGE_TOKEN) {
            return Ok(text.to_string());
        }
        let text = text.replace(IMAGE_TOKEN, "");
        Ok(py_strip(&format!("{IMAGE_TOKEN}\n{}", py_strip(&text))).to_string())
    })?;
    with_image(fields, conversation)
}

/// `llava_image_only_map_fn`: every human message must hold `<image>` and is replaced by
/// the bare token (its text is dropped).
pub(super) fn llava_image_only(fields: &Fields<'_>) -> Result<Sample, FormatError> {
    let conversation = share_gpt(fields, |message, text| {
        if text.contains(IMAGE_TOKEN) {
            Ok(IMAGE_TOKEN.to_string())
        } else {
            Err(FormatError::MissingImageToken {
                format: fields.format(),
                at: message.path("value"),
            })
        }
    })?;
    with_image(fields, conversation)
}

/// A LLaVA sample: the conversation and the record's optional `image`.
fn with_image(fields: &Fields<'_>, conversation: Conversation) -> Result<Sample, FormatError> {
    let image = fields.optional_str("image")?.map(str::to_string);
    Ok(Sample::Conversation {
        conversation,
        image,
    })
}

/// The loop XTuner's wizardlm and llava map functions share; `human` rewrites a human
/// message's text before it joins the input.
fn share_gpt<'a>(
    fields: &Fields<'a>,
    human: impl Fn(&Element<'a>, &'a str) -> Result<String, FormatError>,
) -> Result<Conversation, FormatError> {
    let messages = fields.array("conversations")?;
    let mut turns = Vec::new();
    let mut input = String::new();
    let mut leading = true;
    for (index, message) in messages.iter().enumerate() {
        let message = fields.element("conversations", index, message)?;
        let from = message.str("from")?;
        if leading && from == "gpt" {
            continue;
        }
        leading = false;
        match from {
            "human" => input.push_str(&human(&message, message.str("value")?)?),
            "gpt" => turns.push(Turn::new(std::mem::take(&mut input), message.str("value")?)),
            other => return Err(unknown_role(fields, &message, "from", other, "human, gpt")),
        }
    }
    Ok(Conversation::new(turns))
}

fn unknown_role(
    fields: &Fields<'_>,
    message: &Element<'_>,
    key: &str,
    role: &str,
    expected: &'static str,
) -> FormatError {
    FormatError::UnknownRole {
        format: fields.format(),
        at: message.path(key),
        role: role.to_string(),
        expected,
    }
}

/// `oasst1_map_fn`: `text` is split at every `###`; pieces starting `Human:` or
/// `Assistant:` lose that prefix and are stripped, others are ignored. The pieces are then
/// paired in order (first with second, third with fourth, ...) whatever their roles, and an
/// odd one out at the end is dropped.
pub(super) fn oasst1(fields: &Fields<'_>) -> Result<Conversation, FormatError> {
    let text = fields.str("text")?;
    let pieces: Vec<&str> = py_strip(text)
        .split("###")
        .map(py_strip)
        .filter_map(|piece| {
            piece
                .strip_prefix("Human:")
                .or_else(|| piece.strip_prefix("Assistant:"))
        })
        .map(py_strip)
        .collect();
    let inputs = pieces.iter().step_by(2);
    let outputs = pieces.iter().skip(1).step_by(2);
    let turns = inputs
        .zip(outputs)
        .map(|(input, output)| Turn::new(*input, *output));
    Ok(Conversation::new(turns.collect()))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use xtuner_template::Turn;

    use crate::format::{ColumnMap, DataFormat as F, FormatError, Sample};

    fn map(format: F, record: &Value) -> (Vec<Turn>, Option<String>) {
        match format.map(record, &ColumnMap::new()) {
            Ok(Sample::Conversation {
                conversation,
                image,
            }) => (conversation.conversation, image),
            other => panic!("{format}: {other:?}"),
        }
    }

    fn openai_turn(system: &str, input: &str, output: &str, loss: bool) -> Turn {
        Turn {
            output_with_loss: loss,
            ..Turn::new(input, output).with_system(system)
        }
    }

    #[test]
    fn openai_folds_messages_into_turns() {
        let msg = |role: &str, content: &str| json!({"role": role, "content": content});
        // (messages, the turns XTuner's openai_map_fn returns)
        let cases: Vec<(Value, Vec<Turn>)> = vec![
            (
                json!([msg("system", "S"), msg("user", "u"), msg("assistant", "a")]),
                vec![openai_turn("S", "u", "a", true)],
            ),
            // Leading assistant messages are skipped, later system prompts apply to the next turn only.
            (
                json!([
                    msg("assistant", "hi"),
                    msg("assistant", "again"),
                    msg("user", "u1"),
                    msg("assistant", "a1"),
                    msg("system", "S2"),
                    msg("user", "u2"),
                    msg("assistant", "a2"),
                    msg("user", "a dangling question")
                ]),
                vec![
                    openai_turn("", "u1", "a1", true),
                    openai_turn("S2", "u2", "a2", true),
                ],
            ),
            // Consecutive user messages are concatenated without a separator; the last system wins.
            (
                json!([
                    msg("system", "S1"),
                    msg("system", "S2"),
                    msg("user", "a"),
                    msg("user", "b"),
                    msg("assistant", "c")
                ]),
                vec![openai_turn("S2", "ab", "c", true)],
            ),
            // Two assistant messages in a row: the second has empty input.
            (
                json!([
                    msg("user", "u"),
                    msg("assistant", "a"),
                    msg("assistant", "b")
                ]),
                vec![
                    openai_turn("", "u", "a", true),
                    openai_turn("", "", "b", true),
                ],
            ),
            (json!([]), vec![]),
            (json!([msg("assistant", "only")]), vec![]),
            // A skipped leading assistant message is not read beyond its role.
            (
                json!([{"role": "assistant"}, msg("user", "u"), msg("assistant", "a")]),
                vec![openai_turn("", "u", "a", true)],
            ),
        ];
        for (messages, want) in cases {
            let (got, image) = map(F::Openai, &json!({"messages": messages}));
            assert_eq!(got, want, "{messages}");
            assert_eq!(image, None);
        }
    }

    #[test]
    fn openai_reads_loss_like_python_str_lower() {
        // (loss value or absent, output_with_loss)
        let cases = [
            (None, true),
            (Some(json!(true)), true),
            (Some(json!(false)), false),
            (Some(json!("True")), true),
            (Some(json!("TRUE")), true),
            (Some(json!("false")), false),
            (Some(json!("yes")), false),
            (Some(json!(1)), false),
            (Some(json!(0)), false),
            (Some(Value::Null), false),
        ];
        for (loss, want) in cases {
            let mut assistant = json!({"role": "assistant", "content": "a"});
            if let Some(loss) = &loss {
                assistant["loss"] = loss.clone();
            }
            let record = json!({"messages": [{"role": "user", "content": "u"}, assistant]});
            let (turns, _) = map(F::Openai, &record);
            assert_eq!(turns[0].output_with_loss, want, "{loss:?}");
        }
    }

    #[test]
    fn chat_errors_name_the_message() {
        // (format, record, the error's text)
        let cases = [
            (
                F::Openai,
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "unknown role `tool` at `messages[0].role`; format openai knows system, user, assistant",
            ),
            (
                F::Openai,
                json!({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": null}]}),
                "field `messages[1].content` should be a string but is null (format openai)",
            ),
            (
                F::Openai,
                json!({"messages": [{"role": "user"}]}),
                "missing field `messages[0].content` (format openai)",
            ),
            (
                F::Openai,
                json!({"messages": ["hello"]}),
                "field `messages[0]` should be an object but is a string (format openai)",
            ),
            (
                F::Openai,
                json!({"messages": {"role": "user"}}),
                "field `messages` should be an array but is an object (format openai)",
            ),
            (
                F::Openai,
                json!({"messages": [{"role": 1, "content": "x"}]}),
                "field `messages[0].role` should be a string but is a number (format openai)",
            ),
            (
                F::Wizardlm,
                json!({"conversations": [{"from": "system", "value": "x"}]}),
                "unknown role `system` at `conversations[0].from`; format wizardlm knows human, gpt",
            ),
            (
                F::Wizardlm,
                json!({"conversations": [{"value": "x"}]}),
                "missing field `conversations[0].from` (format wizardlm)",
            ),
            (
                F::Llava,
                json!({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}),
                "unknown role `bot` at `conversations[1].from`; format llava knows human, gpt",
            ),
            (
                F::Llava,
                json!({"conversations": [], "image": 5}),
                "field `image` should be a string but is a number (format llava)",
            ),
            (
                F::LlavaImageOnly,
                json!({"conversations": [{"from": "human", "value": "no token"}]}),
                "`conversations[0].value` has no `<image>` token (format llava_image_only needs one in every human message)",
            ),
            (
                F::Oasst1,
                json!({"text": null}),
                "field `text` should be a string but is null (format oasst1)",
            ),
        ];
        for (format, record, want) in cases {
            let err = format.map(&record, &ColumnMap::new()).unwrap_err();
            assert_eq!(err.to_string(), want, "{format} {record}");
        }
        let err = F::Openai
            .map(
                &json!({"messages": [{"role": "tool", "content": "x"}]}),
                &ColumnMap::new(),
            )
            .unwrap_err();
        assert!(matches!(err, FormatError::UnknownRole { ref role, .. } if role == "tool"));
    }

    #[test]
    fn share_gpt_formats_fold_conversations() {
        let m = |from: &str, value: &str| json!({"from": from, "value": value});
        // (format, conversations, image, the turns XTuner returns)
        let cases: Vec<(F, Value, Option<&str>, Vec<Turn>)> = vec![
            (
                F::Wizardlm,
                json!([
                    m("gpt", "skip"),
                    m("human", "a"),
                    m("human", "b"),
                    m("gpt", "c"),
                    m("human", "dangling")
                ]),
                None,
                vec![Turn::new("ab", "c")],
            ),
            // wizardlm keeps `<image>` where it is.
            (
                F::Wizardlm,
                json!([m("human", "see <image>"), m("gpt", "ok")]),
                None,
                vec![Turn::new("see <image>", "ok")],
            ),
            (
                F::Llava,
                json!([
                    m("human", "What is this?\n<image>"),
                    m("gpt", "A cat."),
                    m("human", " Sure? "),
                    m("gpt", "Yes.")
                ]),
                Some("cat.jpg"),
                vec![
                    Turn::new("<image>\nWhat is this?", "A cat."),
                    Turn::new(" Sure? ", "Yes."),
                ],
            ),
            // Every token goes, one comes back in front; a lone token keeps no newline.
            (
                F::Llava,
                json!([m("human", "<image> a <image> b "), m("gpt", "x")]),
                None,
                vec![Turn::new("<image>\na  b", "x")],
            ),
            (
                F::Llava,
                json!([m("human", " <image>\n"), m("gpt", "x")]),
                Some("a.png"),
                vec![Turn::new("<image>", "x")],
            ),
            (
                F::Llava,
                json!([m("gpt", "first"), m("human", "q<image>"), m("gpt", "r")]),
                None,
                vec![Turn::new("<image>\nq", "r")],
            ),
            (
                F::LlavaImageOnly,
                json!([
                    m("human", "Describe <image> please"),
                    m("gpt", "A dog."),
                    m("human", "<image>"),
                    m("human", "<image>"),
                    m("gpt", "Two.")
                ]),
                Some("d.jpg"),
                vec![
                    Turn::new("<image>", "A dog."),
                    Turn::new("<image><image>", "Two."),
                ],
            ),
        ];
        for (format, conversations, image, want) in cases {
            let mut record = json!({"conversations": conversations});
            if let Some(image) = image {
                record["image"] = json!(image);
            }
            let (got, got_image) = map(format, &record);
            assert_eq!(got, want, "{format} {conversations}");
            assert_eq!(
                got_image.as_deref(),
                if format == F::Wizardlm { None } else { image }
            );
        }
        // A null image is no image.
        let (_, image) = map(F::Llava, &json!({"conversations": [], "image": null}));
        assert_eq!(image, None);
    }

    #[test]
    fn oasst1_pairs_pieces_in_order() {
        // (text, the turns XTuner's oasst1_map_fn returns)
        let cases: Vec<(&str, Vec<Turn>)> = vec![
            (
                "### Human: Can you explain X?### Assistant: Sure! X is Y.### Human: Why?### Assistant: Because.",
                vec![
                    Turn::new("Can you explain X?", "Sure! X is Y."),
                    Turn::new("Why?", "Because."),
                ],
            ),
            // A trailing human message without an answer is dropped.
            (
                "### Human: a### Assistant: b### Human: c",
                vec![Turn::new("a", "b")],
            ),
            // Pieces without a known prefix are ignored, and pairing ignores roles.
            (
                "intro ### Note: x ### Human:  h1 ### Human: h2 \n### Assistant:a1### Assistant: a2",
                vec![Turn::new("h1", "h2"), Turn::new("a1", "a2")],
            ),
            ("", vec![]),
            ("### Human:### Assistant:", vec![Turn::new("", "")]),
        ];
        for (text, want) in cases {
            let (got, _) = map(F::Oasst1, &json!({"text": text}));
            assert_eq!(got, want, "{text:?}");
        }
    }
}
