//! `xtuner chat`: talk to a model, as XTuner's chat does. A one-shot `--prompt` prints
//! the answer and exits; otherwise an interactive multi-turn session reads input ended
//! by an empty line (`RESET` clears the history, `EXIT` quits).
//!
//! The first turn is `SYSTEM + INSTRUCTION` of the template (only INSTRUCTION later),
//! encoded with BOS; each answer is followed by the template's SEP. History is kept as
//! token ids and reset when an answer reaches `--max-new-tokens`. Generation stops at
//! the tokenizer's EOS or at a stop word (the template's STOP_WORDS plus `--stop-words`).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use xtuner_dataset::Tokenizer;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::generate::{GenerationConfig, StopReason, generate};
use xtuner_model::internlm2::InternLm2;
use xtuner_model::sampling::SamplingConfig;
use xtuner_template::{ChatTemplate, PromptTemplate, SystemTemplate};

use crate::backend::{self, Device};

/// Everything `xtuner chat` was asked for.
#[derive(Debug, Clone)]
pub struct ChatArgs {
    /// The LLM directory.
    pub model: PathBuf,
    /// A PEFT adapter to merge at load.
    pub adapter: Option<PathBuf>,
    /// Prompt template name.
    pub prompt_template: Option<String>,
    /// System prompt text.
    pub system: Option<String>,
    /// System template name.
    pub system_template: Option<String>,
    /// Extra stop words.
    pub stop_words: Vec<String>,
    /// Token budget per answer.
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingConfig,
    /// Print the answer at the end instead of token by token.
    pub no_streamer: bool,
    /// One-shot prompt.
    pub prompt: Option<String>,
    /// Where to run.
    pub device: Device,
    /// Name used for `{bot_name}` in system templates.
    pub bot_name: String,
}

/// Runs the chat on the chosen device.
pub fn chat(args: &ChatArgs) -> Result<()> {
    backend::check(args.device)?;
    match args.device {
        Device::Cpu => run::<backend::Cpu>(args, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda => run::<backend::Cuda>(args, Default::default()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => unreachable!("checked by backend::check"),
    }
}

fn run<B: Backend>(args: &ChatArgs, device: B::Device) -> Result<()> {
    let tokenizer = Tokenizer::from_path(&args.model)?;
    let template = args
        .prompt_template
        .as_deref()
        .map(|name| name.parse::<PromptTemplate>().map(PromptTemplate::template))
        .transpose()?;
    let system = system_prompt(args)?;
    if !system.is_empty() && template.as_ref().is_none_or(|t| t.system.is_none()) {
        bail!("a system prompt needs a --prompt-template with a SYSTEM field");
    }
    let adapter = args.adapter.as_deref().map(PeftAdapter::open).transpose()?;
    let (model, _) = InternLm2::<B>::load(&args.model, adapter.as_ref(), &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut stop_words: Vec<String> = template.as_ref().map(|t| t.stop_words.clone()).unwrap_or_default();
    stop_words.extend(args.stop_words.iter().cloned());
    let mut session = Session {
        model: &model,
        tokenizer: &tokenizer,
        template: template.as_ref(),
        system,
        stop_words,
        config: GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            eos_token_ids: tokenizer.eos_ids().to_vec(),
            sampling: args.sampling,
        },
        history: Vec::new(),
        stream: !args.no_streamer,
        device,
    };
    if let Some(prompt) = &args.prompt {
        let answer = session.turn(prompt)?;
        if !session.stream {
            println!("{answer}");
        }
        return Ok(());
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> ");
        let mut input = Vec::new();
        let mut eof = false;
        loop {
            match lines.next() {
                Some(line) => {
                    let line = line.context("reading standard input")?;
                    if line.is_empty() {
                        break;
                    }
                    input.push(line);
                }
                None => {
                    eof = true;
                    break;
                }
            }
        }
        let text = input.join("\n");
        match text.trim() {
            "EXIT" => return Ok(()),
            "RESET" => {
                session.history.clear();
                eprintln!("Log: History responses have been removed!");
            }
            "" if eof => return Ok(()),
            "" => {}
            _ => {
                let answer = session.turn(&text)?;
                if !session.stream {
                    println!("{answer}");
                }
            }
        }
        if eof {
            return Ok(());
        }
    }
}

fn system_prompt(args: &ChatArgs) -> Result<String> {
    Ok(match (&args.system, &args.system_template) {
        (Some(_), Some(_)) => bail!("give --system or --system-template, not both"),
        (Some(text), None) => text.clone(),
        (None, Some(name)) => name.parse::<SystemTemplate>()?.text_for_bot(&args.bot_name),
        (None, None) => String::new(),
    })
}

/// A conversation in progress.
struct Session<'a, B: Backend> {
    model: &'a InternLm2<B>,
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    system: String,
    stop_words: Vec<String>,
    config: GenerationConfig,
    /// Ids of the conversation so far (prompts, answers, separators).
    history: Vec<u32>,
    stream: bool,
    device: B::Device,
}

impl<B: Backend> Session<'_, B> {
    /// Answers one user input; returns the answer text (stop word removed).
    fn turn(&mut self, input: &str) -> Result<String> {
        let first = self.history.is_empty();
        let text = match self.template {
            Some(t) => {
                let system = if first { self.system.as_str() } else { "" };
                t.prompt(system, input, 1)?
            }
            None => input.to_string(),
        };
        if first {
            self.history.extend_from_slice(self.tokenizer.bos_ids());
        }
        self.history.extend(self.tokenizer.encode(&text)?);
        let ids: Vec<i64> = self.history.iter().map(|&i| i64::from(i)).collect();
        let embeds = self.model.embed(Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &self.device));
        let mut printed = 0;
        let mut stdout = std::io::stdout();
        let mut generated: Vec<u32> = Vec::new();
        let tokenizer = self.tokenizer;
        let stop_words = &self.stop_words;
        let stream = self.stream;
        let (new, reason) = generate(self.model, embeds, &self.history, &self.config, |id| {
            generated.push(id);
            let text = tokenizer.decode(&generated).unwrap_or_default();
            // Print what is new once it decodes to whole characters.
            if stream && !text.ends_with('\u{fffd}') && text.is_char_boundary(printed.min(text.len())) {
                let _ = write!(stdout, "{}", &text[printed.min(text.len())..]);
                let _ = stdout.flush();
                printed = text.len();
            }
            let flat: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            !stop_words.iter().any(|w| flat.ends_with(w.as_str()))
        });
        if stream {
            println!();
        }
        let mut answer = self.tokenizer.decode(&new)?;
        if reason == StopReason::Stopped
            && let Some(word) = self.stop_words.iter().find(|w| answer.trim_end().ends_with(w.as_str()))
        {
            let cut = answer.trim_end().len() - word.len();
            answer.truncate(cut);
        }
        self.history.extend(&new);
        if reason == StopReason::Eos {
            self.history.extend_from_slice(self.tokenizer.eos_ids());
        }
        if reason == StopReason::Length {
            self.history.clear();
        } else if let Some(t) = self.template {
            self.history.extend(self.tokenizer.encode(&t.sep)?);
        }
        Ok(answer)
    }
}
