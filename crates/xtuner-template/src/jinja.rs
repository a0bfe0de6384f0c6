//! [`JinjaTemplate`]: a tokenizer's own Jinja `chat_template`, rendered as transformers'
//! `apply_chat_template` renders it.
//!
//! transformers compiles the template in a sandboxed jinja2 environment with
//! `trim_blocks` and `lstrip_blocks` on and the loop-controls extension, defines
//! `raise_exception(message)` and `strftime_now(format)`, replaces `tojson` by Python's
//! `json.dumps` (`ensure_ascii=False`: non-ASCII text kept, `", "` and `": "` between
//! items, key order kept) and renders with `messages`, `add_generation_prompt` and the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...). The same environment is
//! built here on minijinja, with Python's string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`, ...) through minijinja-contrib's `pycompat`.
//!
//! A template is found in a model directory the way transformers finds it: a
//! `chat_template.jinja` file, else the `chat_template` key of `tokenizer_config.json`
//! (a string, or a list of named templates of which `default` is taken).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::Serialize;

use crate::{Error, Message, Result};

/// The template's name inside its environment (what minijinja's messages call it).
const NAME: &str = "chat_template";

/// A compiled chat template with the special tokens it is rendered with.
pub struct JinjaTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from (a file, or a name for messages).
    origin: String,
    /// The tokenizer's special tokens by their template names (`bos_token`, ...).
    special_tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl Clone for JinjaTemplate {
    fn clone(&self) -> Self {
        // Compiling a template that compiled once cannot fail.
        Self::new(&self.source, &self.origin)
            .map(|t| t.with_special_tokens(self.special_tokens.clone()))
            .unwrap_or_else(|_| unreachable!("a compiled template recompiles"))
    }
}

impl JinjaTemplate {
    /// Compiles `source`; `origin` names it in error messages (a file path, or a name).
    ///
    /// # Errors
    /// A syntax error, with its line.
    pub fn new(source: &str, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| jinja_error(origin, None, &e))?,
        );
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| jinja_error(origin, None, &e))?;
        Ok(Self {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
            special_tokens: Vec::new(),
        })
    }

    /// The same template rendered with these special tokens (`("bos_token", "<s>")`, ...).
    pub fn with_special_tokens(mut self, tokens: Vec<(String, String)>) -> Self {
        self.special_tokens = tokens;
        self
    }

    /// The template of a model or tokenizer directory (or of the directory holding a
    /// `tokenizer.json`/`tokenizer_config.json` file given directly): `chat_template.jinja`
    /// if present, else `tokenizer_config.json`'s `chat_template`; the special tokens from
    /// `tokenizer_config.json`. `Ok(None)` when the tokenizer has no chat template.
    ///
    /// # Errors
    /// An unreadable or malformed file, or a template that does not compile.
    pub fn from_tokenizer_dir(path: &Path) -> Result<Option<Self>> {
        let dir = dir_of(path);
        Self::from_tokenizer_config(&dir, tokenizer_config(&dir)?.as_ref())
    }

    /// A template file of one's own (`FILE.jinja`), rendered with the special tokens of
    /// the tokenizer in `tokenizer_dir`.
    ///
    /// # Errors
    /// An unreadable file or `tokenizer_config.json`, or a template that does not compile.
    pub fn from_file(file: &Path, tokenizer_dir: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(file).map_err(|e| file_error(file, e))?;
        let tokens = tokenizer_config(&dir_of(tokenizer_dir))?
            .as_ref()
            .map(special_tokens)
            .unwrap_or_default();
        Ok(Self::new(&source, &file.display().to_string())?.with_special_tokens(tokens))
    }

    /// [`Self::from_tokenizer_dir`] with the directory's `tokenizer_config.json` already
    /// read (`None`: it has none), as a tokenizer loading it for its special tokens has.
    ///
    /// # Errors
    /// An unreadable `chat_template.jinja`, a malformed `chat_template`, or a template
    /// that does not compile.
    pub fn from_tokenizer_config(
        dir: &Path,
        config: Option<&serde_json::Value>,
    ) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => (text, jinja_path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match config.and_then(|c| c.get("chat_template")) {
                    Some(value) => (
                        template_of(value).ok_or_else(|| {
                            file_error(
                                &config_path,
                                "`chat_template` is neither a string nor a list of \
                                 {\"name\", \"template\"} with a `default` one",
                            )
                        })?,
                        format!("{} (chat_template)", config_path.display()),
                    ),
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(file_error(&jinja_path, e)),
        };
        let tokens = config.map(special_tokens).unwrap_or_default();
        Ok(Some(
            Self::new(&source, &origin)?.with_special_tokens(tokens),
        ))
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`:
    /// `messages` is anything that serializes to a list of message objects
    /// (`{"role", "content", ...}`).
    ///
    /// # Errors
    /// The template raised (`raise_exception`) or failed: the message and the line.
    pub fn render<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_value(Value::from(Serde(messages)), add_generation_prompt)
    }

    /// [`Self::render`] with messages given as JSON text, keeping each object's key
    /// order (which `tojson` shows).
    ///
    /// # Errors
    /// Malformed JSON, or as [`Self::render`].
    pub fn render_json(&self, messages: &str, add_generation_prompt: bool) -> Result<String> {
        let messages: Value = serde_json::from_str(messages).map_err(|e| Error::Jinja {
            origin: self.origin.clone(),
            line: None,
            message: format!("messages are not valid JSON: {e}"),
        })?;
        self.render_value(messages, add_generation_prompt)
    }

    fn render_value(&self, messages: Value, add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| jinja_error(&self.origin, None, &e))?;
        let mut context: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.push(("messages".into(), messages));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let context = Value::from_pairs(context);
        template
            .render(context)
            .map_err(|e| jinja_error(&self.origin, Some(&self.source), &e))
    }
}

impl JinjaTemplate {
    /// What the template writes right after an answer, up to the first white space
    /// (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...): where generation stops. `None`
    /// when it writes nothing there, or fails on a plain exchange.
    pub fn end_of_turn(&self) -> Option<String> {
        const ANSWER: &str = "\u{1}answer\u{1}";
        let messages = [
            Message::new("user", "question"),
            Message::new("assistant", ANSWER),
        ];
        let text = self.render(&messages, false).ok()?;
        let after = &text[text.find(ANSWER)? + ANSWER.len()..];
        let marker: String = after
            .trim_start()
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        (!marker.is_empty()).then_some(marker)
    }

    /// A conversation in XTuner's standard format rendered with this template, cut into
    /// pieces: `(text, trained)`. Each turn's system prompt (if any) and input become
    /// `system` and `user` messages, its output an `assistant` message; the labels go
    /// where the rendering with the answer extends the rendering with the generation
    /// prompt (the way XTuner's preference `tokenize()` finds the prompt), trained when
    /// the turn's `output_with_loss` is.
    ///
    /// # Errors
    /// The template fails, or renders a turn's prompt that is not a prefix of the turn
    /// with its answer (the answer's place cannot be found).
    pub fn split_turns(&self, turns: &[crate::Turn]) -> Result<Vec<(String, bool)>> {
        let mut messages = Vec::new();
        let mut pieces = Vec::with_capacity(2 * turns.len());
        let mut done = String::new();
        for (i, turn) in turns.iter().enumerate() {
            if let Some(system) = turn.system_text() {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", turn.input.as_str()));
            let prompt = self.render(&messages, true)?;
            messages.push(Message::new("assistant", turn.output.as_str()));
            let full = self.render(&messages, false)?;
            let not_prefix = |what: &str| Error::Jinja {
                origin: self.origin.clone(),
                line: None,
                message: format!(
                    "turn {}: {what}, so the answer's labels cannot be placed",
                    i + 1
                ),
            };
            let before = prompt.strip_prefix(done.as_str()).ok_or_else(|| {
                not_prefix("the prompt does not start with the turns before it as rendered")
            })?;
            let answer = full.strip_prefix(prompt.as_str()).ok_or_else(|| {
                not_prefix("the rendering with the answer does not start with the prompt")
            })?;
            pieces.push((before.to_string(), false));
            pieces.push((answer.to_string(), turn.output_with_loss));
            done = full;
        }
        Ok(pieces)
    }
}

/// A tokenizer's directory: `path`, or the folder of a tokenizer file given directly.
fn dir_of(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    }
}

/// The directory's `tokenizer_config.json`, `None` when it has none.
fn tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("tokenizer_config.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).map_err(|e| file_error(&path, e))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(&path, e)),
    }
}

/// `chat_template` as a string, or the `default` one of a list of named templates.
fn template_of(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The special tokens of `tokenizer_config.json` that templates read, as text (a token
/// is a string or an added-token object with `content`).
fn special_tokens(config: &serde_json::Value) -> Vec<(String, String)> {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    };
    [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
    ]
    .iter()
    .filter_map(|k| Some((k.to_string(), text(config.get(*k)?)?)))
    .collect()
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::TemplateFile {
        path: PathBuf::from(path),
        message: e.to_string(),
    }
}

/// A minijinja error as ours: `raise_exception`'s message as it was raised, anything
/// else with minijinja's description; the template line where it happened.
fn jinja_error(origin: &str, source: Option<&str>, e: &minijinja::Error) -> Error {
    let message = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    let line = e.line();
    let text = line
        .zip(source)
        .and_then(|(n, s)| s.lines().nth(n.checked_sub(1)?))
        .map(|l| l.trim().chars().take(120).collect::<String>());
    Error::Jinja {
        origin: origin.to_string(),
        line: line.map(|n| (n, text.unwrap_or_default())),
        message,
    }
}

/// transformers' `raise_exception(message)`: the template fails with this message.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now(format)`: the local time, formatted as Python's `strftime`.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(&format).any(|item| matches!(item, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format `{format}`"),
        ));
    }
    Ok(Value::from(
        chrono::Local::now().format(&format).to_string(),
    ))
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=...,
/// separators=..., sort_keys=...)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => Some(" ".repeat(usize::try_from(v)?)),
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item, key)",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys,
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

/// The layout of Python's `json.dumps`.
struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(
        &self,
        out: &mut String,
        value: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::String => write_py_string(out, value.as_str().unwrap_or_default()),
            ValueKind::Number => {
                if let Some(i) = value.as_i64() {
                    let _ = write!(out, "{i}");
                } else if let Ok(f) = f64::try_from(value.clone()) {
                    out.push_str(&py_float(f));
                } else {
                    let _ = write!(out, "{value}");
                }
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, depth, '[', ']', items.len(), |out, i| {
                    self.write(out, &items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.write_container(out, depth, '{', '}', keys.len(), |out, i| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => write_py_string(out, s),
                        None => write_py_string(out, &key.to_string()),
                    }
                    out.push_str(&self.key);
                    self.write(out, &value.get_item(key)?, depth + 1)
                })?;
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("Object of type {} is not JSON serializable", value.kind()),
                ));
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        len: usize,
        mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, depth: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                for _ in 0..depth {
                    out.push_str(indent);
                }
            }
        };
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            item(out, i)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn write_py_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it: the shortest digits that read back, in fixed
/// notation for exponents -4 to 15, else as `1e+16`; `NaN` and `Infinity` as `json` does.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') { s } else { s + ".0" }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_as_python_writes_them() {
        for (f, py) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789.0, "123456789.0"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
        ] {
            assert_eq!(py_float(f), py, "{f}");
        }
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let ctx = r#"[{"z": "é\n\"", "a": [1, 2.5, null, true], "e": {}}]"#;
        let t = JinjaTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true) }}",
            "test",
        )
        .unwrap();
        let out = t.render_json(ctx, false).unwrap();
        assert_eq!(
            out,
            "{\"z\": \"é\\n\\\"\", \"a\": [1, 2.5, null, true], \"e\": {}}|{\n  \"z\": \"é\\n\\\"\",\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"e\": {}\n}|{\"a\": [1, 2.5, null, true], \"e\": {}, \"z\": \"é\\n\\\"\"}"
        );
    }

    #[test]
    fn conversations_split_where_the_answers_go() {
        let t = JinjaTemplate::new(
            "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "T",
        )
        .unwrap()
        .with_special_tokens(vec![("bos_token".into(), "<s>".into())]);
        let mut second = crate::Turn::new("b", "B");
        second.output_with_loss = false;
        let pieces = t
            .split_turns(&[crate::Turn::new("a", "A").with_system("S"), second])
            .unwrap();
        assert_eq!(
            pieces,
            [
                (
                    "<s><system>S</>\n<user>a</>\n<assistant>".to_string(),
                    false
                ),
                ("A</>\n".to_string(), true),
                ("<user>b</>\n<assistant>".to_string(), false),
                ("B</>\n".to_string(), false),
            ]
        );
        assert_eq!(t.end_of_turn().as_deref(), Some("</>"));
        // A template whose generation prompt is not where the answer goes.
        let odd = JinjaTemplate::new(
            "{% if add_generation_prompt %}X{% endif %}{{ messages | length }}",
            "T",
        )
        .unwrap();
        assert!(odd.split_turns(&[crate::Turn::new("a", "A")]).is_err());
    }

    #[test]
    fn errors_name_the_origin_and_line() {
        let t = JinjaTemplate::new("a\n{{ raise_exception('no') }}", "T").unwrap();
        let err = t.render(&Vec::<()>::new(), false).unwrap_err();
        match &err {
            Error::Jinja {
                origin,
                line,
                message,
            } => {
                assert_eq!((origin.as_str(), message.as_str()), ("T", "no"));
                assert_eq!(line.as_ref().map(|l| l.0), Some(2));
            }
            other => panic!("{other:?}"),
        }
        assert!(JinjaTemplate::new("{% for %}", "T").is_err());
    }

    #[test]
    fn templates_are_found_beside_the_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            JinjaTemplate::from_tokenizer_dir(dir.path())
                .unwrap()
                .is_none()
        );
        // A template file of one's own takes the tokenizer's special tokens, whether or
        // not the tokenizer has a template.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>"}"#,
        )
        .unwrap();
        assert!(
            JinjaTemplate::from_tokenizer_dir(dir.path())
                .unwrap()
                .is_none()
        );
        let own = dir.path().join("own.jinja");
        std::fs::write(&own, "{{ bos_token }}C").unwrap();
        let t = JinjaTemplate::from_file(&own, dir.path()).unwrap();
        assert_eq!(t.render(&Vec::<()>::new(), false).unwrap(), "<s>C");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}A"}]}"#,
        )
        .unwrap();
        let t = JinjaTemplate::from_tokenizer_dir(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&Vec::<()>::new(), false).unwrap(), "<s>A");
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}B\n").unwrap();
        let t = JinjaTemplate::from_tokenizer_dir(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&Vec::<()>::new(), false).unwrap(), "<s>B");
    }
}
