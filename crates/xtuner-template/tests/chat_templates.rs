//! Jinja chat templates against transformers' `apply_chat_template` (the reference
//! fixture `chat_templates/cases.jsonl`): every case renders to exactly its string, or
//! fails with exactly the message the template raised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde::Deserialize;
use serde_json::value::RawValue;
use xtuner_template::{Error, JinjaTemplate};

#[derive(Deserialize)]
struct Case {
    template_name: String,
    chat_template: String,
    bos_token: String,
    eos_token: String,
    /// Kept as text: `tojson` shows the key order.
    messages: Box<RawValue>,
    add_generation_prompt: bool,
    rendered: Option<String>,
    error: Option<String>,
}

#[test]
fn every_case_renders_as_transformers_renders_it() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/chat_templates/cases.jsonl"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut checked = 0;
    for (i, line) in text.lines().enumerate() {
        let case: Case = serde_json::from_str(line).unwrap();
        let tokens = vec![
            ("bos_token".to_string(), case.bos_token.clone()),
            ("eos_token".to_string(), case.eos_token.clone()),
        ];
        let template = JinjaTemplate::new(&case.chat_template, &case.template_name)
            .unwrap()
            .with_special_tokens(tokens);
        let out = template.render_json(case.messages.get(), case.add_generation_prompt);
        let what = format!("line {} ({})", i + 1, case.template_name);
        match (&case.rendered, &case.error, out) {
            (Some(expected), None, Ok(got)) => assert_eq!(&got, expected, "{what}"),
            (None, Some(expected), Err(Error::Jinja { message, .. })) => {
                assert_eq!(&message, expected, "{what}")
            }
            (_, _, got) => panic!(
                "{what}: expected {:?}/{:?}, got {got:?}",
                case.rendered, case.error
            ),
        }
        checked += 1;
    }
    assert_eq!(checked, 70);
}
