//! XTuner's prompt templates and system templates, and the step that applies them.
//!
//! A [`ChatTemplate`] holds the fields XTuner defines (SYSTEM, INSTRUCTION, SUFFIX,
//! SUFFIX_AS_EOS, SEP, STOP_WORDS). [`PromptTemplate`] names every template XTuner ships,
//! [`SystemTemplate`] every system prompt. [`ChatTemplate::render`] is XTuner's
//! `template_map_fn`: it wraps each [`Turn`] of a [`Conversation`] with the template.
//! [`JinjaTemplate`] is the other kind: a tokenizer's own Jinja `chat_template`, rendered
//! as transformers' `apply_chat_template` renders it.
//! [`tokens`] holds the special values (`<image>`, -200, -100) every stage shares.

pub mod builtin;
pub mod error;
pub mod jinja;
pub mod message;
pub mod template;
pub mod tokens;

pub use builtin::{PromptTemplate, SystemTemplate};
pub use error::{Error, Result};
pub use jinja::JinjaTemplate;
pub use message::{Conversation, Message, Turn};
pub use template::ChatTemplate;
