//! Talking to a model, for the evaluate-chat hook and for `xtuner chat`: a prompt in
//! the template (with `<image>` opening the first message when there is an image) →
//! token ids, with -200 where the image goes → embeddings, the image's projected
//! features spliced in there → generation with a KV cache.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use xtuner_dataset::Tokenizer;
use xtuner_model::decoder::Decoder;
use xtuner_model::generate::{GenerationConfig, StopReason, generate};
use xtuner_model::llava::prepare_inputs_labels_for_multimodal;
use xtuner_model::sampling::SamplingConfig;
use xtuner_template::tokens::{IMAGE_TOKEN, IMAGE_TOKEN_INDEX};
use xtuner_template::{ChatTemplate, JinjaTemplate, Message};

use crate::config::TrainConfig;
use crate::{Error, Result};

/// The ids of `text`: its first `images` occurrences of `<image>` become
/// [`IMAGE_TOKEN_INDEX`] (they mark where image features go); any other `<image>` is
/// plain text.
///
/// # Errors
/// A tokenizer failure.
pub fn encode_prompt(tokenizer: &Tokenizer, text: &str, images: usize) -> Result<Vec<i64>> {
    let pieces: Vec<&str> = if images > 0 {
        text.splitn(images.saturating_add(1), IMAGE_TOKEN).collect()
    } else {
        vec![text]
    };
    let mut ids = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            ids.push(IMAGE_TOKEN_INDEX);
        }
        ids.extend(tokenizer.encode(piece)?.into_iter().map(i64::from));
    }
    Ok(ids)
}

/// The embeddings `[1, T', C]` of prompt `ids`, with `image`'s features (`[1, P, C]`)
/// spliced in at [`IMAGE_TOKEN_INDEX`] when there is one.
///
/// # Errors
/// Features that do not fit the image token.
pub fn prompt_embeds<B: Backend>(
    model: &Decoder<B>,
    ids: &[i64],
    image: Option<&Tensor<B, 3>>,
    device: &B::Device,
) -> Result<Tensor<B, 3>> {
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device);
    match image {
        Some(features) if ids.contains(&IMAGE_TOKEN_INDEX) => {
            let spliced =
                prepare_inputs_labels_for_multimodal(tokens, None, None, features.clone(), |t| {
                    model.embed(t.unsqueeze::<2>()).squeeze_dim::<2>(0)
                })?;
            Ok(spliced.inputs_embeds)
        }
        _ => Ok(model.embed(tokens)),
    }
}

/// The prompt ids as generation takes them (the image's -200 left out: the cache's
/// positions come from the embeddings).
fn token_ids(ids: &[i64]) -> Vec<u32> {
    ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect()
}

/// XTuner's evaluate-chat hook: answers the config's evaluation inputs with the
/// template (temperature 0.1, top-k 40, top-p 0.75, as XTuner's hook samples). With
/// `image` (projected features `[1, P, C]`), `<image>\n` opens each prompt and the
/// features are spliced in there, as XTuner's hook does for LLaVA.
///
/// # Errors
/// A template that cannot render the system prompt, or a tokenizer failure.
pub fn evaluate_chat<B: Backend>(
    model: &Decoder<B>,
    image: Option<&Tensor<B, 3>>,
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<Vec<(String, String)>> {
    let eval = &config.evaluation;
    if config
        .template
        .as_ref()
        .is_some_and(|t| t.is_chat_template())
    {
        return evaluate_with_chat_template(model, config, tokenizer, device);
    }
    let template = config.template.as_ref().map(|t| t.resolve()).transpose()?;
    let system = eval.system_prompt();
    let mut answers = Vec::new();
    for input in &eval.inputs {
        let prompt = if image.is_some() {
            format!("{IMAGE_TOKEN}\n{input}")
        } else {
            input.clone()
        };
        let text = match &template {
            Some(t) => t.prompt(&system, &prompt, 1).map_err(|e| match e {
                // The config pairs a system prompt with a template without SYSTEM.
                xtuner_template::Error::NoSystemField { .. } => {
                    Error::setting("evaluation.system", e.to_string())
                }
                other => other.into(),
            })?,
            None => prompt,
        };
        let mut ids: Vec<i64> = tokenizer.bos_ids().iter().map(|&i| i64::from(i)).collect();
        // As XTuner's hook: every `<image>` of the prompt marks the image.
        let images = if image.is_some() { usize::MAX } else { 0 };
        ids.extend(encode_prompt(tokenizer, &text, images)?);
        let mut stop_ids = tokenizer.eos_ids().to_vec();
        if let Some(t) = &template {
            stop_ids.extend(t.stop_words.iter().filter_map(|w| tokenizer.token_to_id(w)));
        }
        let answer = hook_answer(model, image, &ids, stop_ids, config, tokenizer, device)?;
        answers.push((input.clone(), answer));
    }
    Ok(answers)
}

/// The hook's answer to a prompt's ids: sampled as XTuner's hook samples (seeded with
/// the run's seed), up to `evaluation.max_new_tokens` or a stop id.
fn hook_answer<B: Backend>(
    model: &Decoder<B>,
    image: Option<&Tensor<B, 3>>,
    ids: &[i64],
    stop_ids: Vec<u32>,
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<String> {
    let embeds = prompt_embeds(model, ids, image, device)?;
    let generation = GenerationConfig {
        max_new_tokens: config.evaluation.max_new_tokens,
        eos_token_ids: stop_ids,
        sampling: SamplingConfig {
            seed: config.train.seed,
            ..SamplingConfig::default()
        },
    };
    let (new, _) = generate(model, embeds, &token_ids(ids), &generation, |_| true)?;
    Ok(tokenizer.decode(&new)?)
}

/// The hook with the tokenizer's own chat template: each input as a user message (after
/// the system prompt, if any) with the generation prompt; generation stops at EOS or at
/// the template's end of turn.
fn evaluate_with_chat_template<B: Backend>(
    model: &Decoder<B>,
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<Vec<(String, String)>> {
    let eval = &config.evaluation;
    let template = tokenizer.chat_template()?;
    let system = eval.system_prompt();
    let mut stop_ids = tokenizer.eos_ids().to_vec();
    stop_ids.extend(
        template
            .end_of_turn()
            .and_then(|t| tokenizer.token_to_id(&t)),
    );
    let mut answers = Vec::new();
    for input in &eval.inputs {
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(Message::new("system", system.as_str()));
        }
        messages.push(Message::new("user", input.as_str()));
        let text = template.render(&messages, true)?;
        let ids = encode_prompt(tokenizer, &text, 0)?;
        let answer = hook_answer(
            model,
            None,
            &ids,
            stop_ids.clone(),
            config,
            tokenizer,
            device,
        )?;
        answers.push((input.clone(), answer));
    }
    Ok(answers)
}

/// A conversation in progress, as XTuner's chat holds it: the first turn is
/// `SYSTEM + INSTRUCTION` of the template (only INSTRUCTION later), encoded with BOS;
/// each answer is followed by the template's SEP. History is kept as token ids and
/// reset when an answer reaches the token budget. Generation stops at the tokenizer's
/// EOS or at a stop word (matched on the decoded text).
pub struct ChatSession<'a, B: Backend> {
    model: &'a Decoder<B>,
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    system: String,
    stop_words: Vec<String>,
    config: GenerationConfig,
    /// Ids of the conversation so far (prompts, answers, separators; the image as -200).
    history: Vec<i64>,
    device: B::Device,
    /// Projected image features `[1, P, C]` (LLaVA).
    image: Option<Tensor<B, 3>>,
    /// The tokenizer's own template, when it renders the prompts instead of `template`.
    jinja: Option<&'a JinjaTemplate>,
    /// The conversation as messages (with `jinja`), rendered whole at each turn.
    messages: Vec<Message>,
}

impl<'a, B: Backend> ChatSession<'a, B> {
    /// A new conversation. `stop_words` are matched at the end of the decoded answer;
    /// `image` (LLaVA's projected features) goes into the first message.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'a Decoder<B>,
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        system: String,
        stop_words: Vec<String>,
        config: GenerationConfig,
        image: Option<Tensor<B, 3>>,
        device: B::Device,
    ) -> Self {
        Self {
            model,
            tokenizer,
            template,
            system,
            stop_words,
            config,
            history: Vec::new(),
            device,
            image,
            jinja: None,
            messages: Vec::new(),
        }
    }

    /// The same session with prompts rendered by a Jinja chat template (the tokenizer's
    /// own): each turn renders the whole conversation with the generation prompt.
    pub fn with_chat_template(mut self, template: &'a JinjaTemplate) -> Self {
        self.jinja = Some(template);
        self
    }

    /// Forgets the conversation (XTuner's `RESET`).
    pub fn reset(&mut self) {
        self.history.clear();
        self.messages.clear();
    }

    /// Adds the user's input to the conversation's ids.
    fn extend_prompt(&mut self, input: &str) -> Result<()> {
        if let Some(jinja) = self.jinja {
            if self.messages.is_empty() && !self.system.is_empty() {
                let system = Message::new("system", self.system.as_str());
                self.messages.push(system);
            }
            let user = Message::new("user", input);
            self.messages.push(user);
            // The template writes the whole conversation, BOS included.
            let text = jinja.render(&self.messages, true)?;
            self.history = encode_prompt(self.tokenizer, &text, 0)?;
            return Ok(());
        }
        let first = self.history.is_empty();
        // LLaVA: the image opens the first user message, as XTuner's chat puts it.
        let with_image = first && self.image.is_some();
        let input = if with_image {
            format!("{IMAGE_TOKEN}\n{input}")
        } else {
            input.to_string()
        };
        let text = match self.template {
            Some(t) => {
                let system = if first { self.system.as_str() } else { "" };
                t.prompt(system, &input, 1)?
            }
            None => input,
        };
        if first {
            self.history
                .extend(self.tokenizer.bos_ids().iter().map(|&i| i64::from(i)));
        }
        // Only the `<image>` put before the first message marks the image (as XTuner's
        // chat); one the user types is text.
        self.history.extend(encode_prompt(
            self.tokenizer,
            &text,
            usize::from(with_image),
        )?);
        Ok(())
    }

    /// Answers one user input; returns the answer text (stop word removed). `on_text`
    /// receives the answer as it grows, a piece at a time, once it decodes to whole
    /// characters; an error it returns stops generation and is returned.
    ///
    /// # Errors
    /// A template or tokenizer failure, or `on_text`'s.
    pub fn turn(
        &mut self,
        input: &str,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<String> {
        self.extend_prompt(input)?;
        let ids = self.history.clone();
        let embeds = prompt_embeds(self.model, &ids, self.image.as_ref(), &self.device)?;
        let mut printed = 0;
        let mut generated: Vec<u32> = Vec::new();
        let mut failure: Option<Error> = None;
        let (tokenizer, stop_words) = (self.tokenizer, &self.stop_words);
        let (new, reason) = generate(self.model, embeds, &token_ids(&ids), &self.config, |id| {
            generated.push(id);
            let text = match tokenizer.decode(&generated) {
                Ok(text) => text,
                Err(e) => {
                    failure = Some(e.into());
                    return false;
                }
            };
            // Pass on what is new once it decodes to whole characters.
            if !text.ends_with('\u{fffd}') && text.is_char_boundary(printed.min(text.len())) {
                if let Err(e) = on_text(&text[printed.min(text.len())..]) {
                    failure = Some(e);
                    return false;
                }
                printed = text.len();
            }
            let flat: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            !stop_words.iter().any(|w| flat.ends_with(w.as_str()))
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut answer = self.tokenizer.decode(&new)?;
        if reason == StopReason::Stopped
            && let Some(word) = self
                .stop_words
                .iter()
                .find(|w| answer.trim_end().ends_with(w.as_str()))
        {
            let cut = answer.trim_end().len() - word.len();
            answer.truncate(cut);
        }
        self.history.extend(new.iter().map(|&i| i64::from(i)));
        if reason == StopReason::Eos {
            self.history
                .extend(self.tokenizer.eos_ids().iter().map(|&i| i64::from(i)));
        }
        if self.jinja.is_some() {
            if reason == StopReason::Length {
                self.messages.clear();
            } else {
                self.messages
                    .push(Message::new("assistant", answer.as_str()));
            }
        } else if reason == StopReason::Length {
            self.history.clear();
        } else if let Some(t) = self.template {
            let sep = self.tokenizer.encode(&t.sep)?;
            self.history.extend(sep.into_iter().map(i64::from));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the first `images` placeholders mark an image; one the user typed in a
    /// chat stays text (the splice would refuse two markers for one image).
    #[test]
    fn only_the_given_number_of_image_placeholders_mark_images() {
        let tokenizer = Tokenizer::from_path(&crate::test_support::fixture("tokenizer")).unwrap();
        let text = "<image>\nWhat is <image> in HTML?";
        let marks = |images: usize| {
            encode_prompt(&tokenizer, text, images)
                .unwrap()
                .iter()
                .filter(|&&id| id == IMAGE_TOKEN_INDEX)
                .count()
        };
        assert_eq!((marks(0), marks(1), marks(usize::MAX)), (0, 1, 2));
    }
}
