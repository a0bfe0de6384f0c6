//! Every template field against XTuner's own definitions (the reference fixture).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::Value;
use xtuner_template::{PromptTemplate, SystemTemplate};

fn fixture(name: &str) -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/tokenizer/"
    );
    serde_json::from_str(&std::fs::read_to_string(format!("{path}{name}")).unwrap()).unwrap()
}

#[test]
fn every_prompt_template_matches_xtuner_field_by_field() {
    let reference = fixture("templates.json");
    let reference = reference.as_object().unwrap();
    let ours: BTreeSet<&str> = PromptTemplate::all().map(|t| t.name()).collect();
    let theirs: BTreeSet<&str> = reference.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs, "the same set of templates");
    for (name, fields) in reference {
        let t: PromptTemplate = name.parse().unwrap();
        let t = t.template();
        let known = [
            "SYSTEM",
            "INSTRUCTION",
            "SUFFIX",
            "SUFFIX_AS_EOS",
            "SEP",
            "STOP_WORDS",
        ];
        for key in fields.as_object().unwrap().keys() {
            assert!(
                known.contains(&key.as_str()),
                "{name}: field {key} not modelled"
            );
        }
        let text = |k: &str| fields.get(k).and_then(Value::as_str).map(str::to_string);
        assert_eq!(t.system, text("SYSTEM"), "{name} SYSTEM");
        assert_eq!(
            Some(t.instruction.clone()),
            text("INSTRUCTION"),
            "{name} INSTRUCTION"
        );
        assert_eq!(
            t.suffix,
            text("SUFFIX").unwrap_or_default(),
            "{name} SUFFIX"
        );
        assert_eq!(t.sep, text("SEP").unwrap_or_default(), "{name} SEP");
        let suffix_as_eos = fields
            .get("SUFFIX_AS_EOS")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        assert_eq!(t.suffix_as_eos, suffix_as_eos, "{name} SUFFIX_AS_EOS");
        let stop: Vec<String> = fields
            .get("STOP_WORDS")
            .map(|v| serde_json::from_value(v.clone()).unwrap())
            .unwrap_or_default();
        assert_eq!(t.stop_words, stop, "{name} STOP_WORDS");
    }
}

#[test]
fn every_system_template_matches_xtuner() {
    let reference = fixture("system_templates.json");
    let reference = reference.as_object().unwrap();
    assert_eq!(SystemTemplate::all().count(), reference.len());
    for (name, text) in reference {
        let t: SystemTemplate = name.parse().unwrap();
        assert_eq!(t.text(), text.as_str().unwrap(), "{name}");
    }
}
