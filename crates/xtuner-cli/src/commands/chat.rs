//! `xtuner chat`: talk to a model, as XTuner's chat does. A one-shot `--prompt` prints
//! the answer and exits; otherwise an interactive multi-turn session reads input ended
//! by an empty line (`RESET` clears the history, `EXIT` quits).
//!
//! The first turn is `SYSTEM + INSTRUCTION` of the template (only INSTRUCTION later),
//! encoded with BOS; each answer is followed by the template's SEP. History is kept as
//! token ids and reset when an answer reaches `--max-new-tokens`. Generation stops at
//! the tokenizer's EOS or at a stop word (the template's STOP_WORDS plus `--stop-words`).
//!
//! With `--llava DIR --image FILE` the image (padded to square, preprocessed as CLIP
//! wants) goes through the vision tower (`DIR/visual_encoder` or `--visual-encoder`)
//! and `DIR/projector`; `<image>\n` opens the first user message and its features are
//! spliced in at that token. `DIR/llm_adapter` and `DIR/visual_encoder_adapter` are
//! merged into the LLM and the tower when present.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use xtuner_dataset::Tokenizer;
use xtuner_engine::lora;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::clip_vit::ClipVisionTower;
use xtuner_model::generate::{GenerationConfig, StopReason, generate};
use xtuner_model::image::ImageProcessor;
use xtuner_model::internlm2::InternLm2;
use xtuner_model::llava::{
    IMAGE_TOKEN_INDEX, image_features, prepare_inputs_labels_for_multimodal,
};
use xtuner_model::projector::Projector;
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
    /// A LLaVA directory (projector/, optional llm_adapter/ and visual_encoder/).
    pub llava: Option<PathBuf>,
    /// The CLIP vision tower directory (when `llava/visual_encoder` is absent).
    pub visual_encoder: Option<PathBuf>,
    /// Which hidden state of the vision tower feeds the projector.
    pub visual_select_layer: i64,
    /// The image to talk about.
    pub image: Option<PathBuf>,
}

/// Runs the chat on the chosen device.
pub fn chat(args: &ChatArgs) -> Result<()> {
    backend::check(args.device)?;
    match args.device {
        Device::Cpu => run::<backend::Cpu>(args, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda => backend::on_cuda(|| run::<backend::Cuda>(args, Default::default())),
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
    let adapter_dir = match (&args.adapter, &args.llava) {
        (Some(_), Some(_)) => {
            bail!("--adapter and --llava are exclusive (a LLaVA dir brings its llm_adapter/)")
        }
        (Some(dir), None) => Some(dir.clone()),
        (None, Some(llava)) => Some(llava.join("llm_adapter")).filter(|d| d.is_dir()),
        (None, None) => None,
    };
    let adapter = adapter_dir.as_deref().map(PeftAdapter::open).transpose()?;
    let (model, _) = InternLm2::<B>::load(&args.model, adapter.as_ref(), &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let image = match &args.llava {
        Some(llava) => Some(load_image_features::<B>(args, llava, &device)?),
        None if args.image.is_some() => bail!("--image needs --llava DIR (the projector)"),
        None => None,
    };
    let mut stop_words: Vec<String> = template
        .as_ref()
        .map(|t| t.stop_words.clone())
        .unwrap_or_default();
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
        image,
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

/// Runs the image through the vision tower and projector: `[1, P, C]` features.
fn load_image_features<B: Backend>(
    args: &ChatArgs,
    llava: &std::path::Path,
    device: &B::Device,
) -> Result<Tensor<B, 3>> {
    let image = args
        .image
        .as_deref()
        .context("--llava needs --image FILE")?;
    let tower_dir = Some(llava.join("visual_encoder"))
        .filter(|d| d.is_dir())
        .or_else(|| args.visual_encoder.clone())
        .context(
            "no visual encoder: give --visual-encoder DIR (or put one in LLAVA_DIR/visual_encoder)",
        )?;
    let (tower, _) = ClipVisionTower::<B>::load(&tower_dir, device)
        .with_context(|| format!("loading {}", tower_dir.display()))?;
    // A LoRA adapter trained on the vision tower is merged in.
    let adapter_dir = llava.join("visual_encoder_adapter");
    let tower = if adapter_dir.is_dir() {
        let adapter = PeftAdapter::open(&adapter_dir)?;
        lora::merge(lora::attach_peft(tower, &(), &adapter, 0.0, device)?, &())
    } else {
        tower
    };
    let (projector, _) = Projector::<B>::load(&llava.join("projector"), None, device)?;
    // XTuner's chat always pads the image to a square.
    let processor = ImageProcessor::from_file(tower_dir.join("preprocessor_config.json"), true)?;
    let pixels = processor.preprocess_file::<B>(image, device)?;
    Ok(image_features(
        &tower,
        &projector,
        pixels.unsqueeze::<4>(),
        args.visual_select_layer,
    )?)
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
    /// Ids of the conversation so far (prompts, answers, separators; the image as -200).
    history: Vec<i64>,
    stream: bool,
    device: B::Device,
    /// Projected image features `[1, P, C]` (LLaVA).
    image: Option<Tensor<B, 3>>,
}

impl<B: Backend> Session<'_, B> {
    /// Answers one user input; returns the answer text (stop word removed).
    fn turn(&mut self, input: &str) -> Result<String> {
        let first = self.history.is_empty();
        // LLaVA: the image opens the first user message, as XTuner's chat puts it.
        let with_image = first && self.image.is_some();
        let input = if with_image {
            format!("<image>\n{input}")
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
        if with_image {
            self.push_image_prompt(&text)?;
        } else {
            self.push_text(&text)?;
        }
        let ids = self.history.clone();
        let embeds = self.embeds(&ids)?;
        let prompt_ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let mut printed = 0;
        let mut stdout = std::io::stdout();
        let mut generated: Vec<u32> = Vec::new();
        let tokenizer = self.tokenizer;
        let stop_words = &self.stop_words;
        let stream = self.stream;
        let (new, reason) = generate(self.model, embeds, &prompt_ids, &self.config, |id| {
            generated.push(id);
            let text = tokenizer.decode(&generated).unwrap_or_default();
            // Print what is new once it decodes to whole characters.
            if stream
                && !text.ends_with('\u{fffd}')
                && text.is_char_boundary(printed.min(text.len()))
            {
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
        if reason == StopReason::Length {
            self.history.clear();
        } else if let Some(t) = self.template {
            self.push_text(&t.sep)?;
        }
        Ok(answer)
    }

    fn push_text(&mut self, text: &str) -> Result<()> {
        self.history
            .extend(self.tokenizer.encode(text)?.into_iter().map(i64::from));
        Ok(())
    }

    /// The first prompt of a LLaVA chat: `<image>` marks where the features go.
    fn push_image_prompt(&mut self, text: &str) -> Result<()> {
        let (before, after) = text.split_once("<image>").unwrap_or(("", text));
        self.push_text(before)?;
        self.history.push(IMAGE_TOKEN_INDEX);
        self.push_text(after)
    }

    /// Embeddings of the history, with the image's features spliced in.
    fn embeds(&self, ids: &[i64]) -> Result<Tensor<B, 3>> {
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.to_vec(), [1, ids.len()]),
            &self.device,
        );
        match &self.image {
            Some(features) if ids.contains(&IMAGE_TOKEN_INDEX) => {
                let spliced = prepare_inputs_labels_for_multimodal(
                    tokens,
                    None,
                    None,
                    features.clone(),
                    |text| self.model.embed(text.unsqueeze::<2>()).squeeze_dim::<2>(0),
                )?;
                Ok(spliced.inputs_embeds)
            }
            _ => Ok(self.model.embed(tokens)),
        }
    }
}
