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
//! merged into the LLM and the tower when present. A transformers LLaVA (`convert
//! pth_to_hf --save-format huggingface`) is a model directory of its own: `xtuner chat
//! DIR --image FILE` reads the LLM, tower, projector and image settings from it.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use xtuner_dataset::Tokenizer;
use xtuner_engine::chat::ChatSession;
use xtuner_engine::lora;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::clip_vit::ClipVisionTower;
use xtuner_model::decoder::Decoder;
use xtuner_model::generate::GenerationConfig;
use xtuner_model::image::ImageProcessor;
use xtuner_model::llava::{Llava, image_features};
use xtuner_model::projector::Projector;
use xtuner_model::sampling::SamplingConfig;
use xtuner_template::{PromptTemplate, SystemTemplate};

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
    // `chat_template`: the model's own Jinja template renders the conversation.
    let jinja = match args.prompt_template.as_deref() {
        Some("chat_template") => Some(tokenizer.chat_template()?),
        _ => None,
    };
    let template = args
        .prompt_template
        .as_deref()
        .filter(|_| jinja.is_none())
        .map(|name| name.parse::<PromptTemplate>().map(PromptTemplate::template))
        .transpose()?;
    let system = system_prompt(args)?;
    if jinja.is_some() && args.llava.is_some() {
        bail!("--prompt-template chat_template is for text models, not with --llava");
    }
    if !system.is_empty() && jinja.is_none() && template.as_ref().is_none_or(|t| t.system.is_none())
    {
        bail!("a system prompt needs a --prompt-template with a SYSTEM field");
    }
    if is_hf_llava(&args.model) && (args.adapter.is_some() || args.llava.is_some()) {
        bail!(
            "{} is a transformers LLaVA (adapters merged, projector and tower inside): \
             give it alone, with --image",
            args.model.display()
        );
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
    let (model, image) = if is_hf_llava(&args.model) {
        let (llava, config) = Llava::<B>::load_hf(&args.model, &device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let image = match &args.image {
            Some(file) => {
                let processor =
                    ImageProcessor::from_file(args.model.join("preprocessor_config.json"), true)?;
                let pixels = processor.preprocess_file::<B>(file, &device)?;
                Some(image_features(
                    &llava.visual_encoder,
                    &llava.projector,
                    pixels.unsqueeze::<4>(),
                    config.select_layer,
                )?)
            }
            None => None,
        };
        (llava.llm, image)
    } else {
        let (model, _) = Decoder::<B>::load(&args.model, adapter.as_ref(), &device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let image = match &args.llava {
            Some(llava) => Some(load_image_features::<B>(args, llava, &device)?),
            None if args.image.is_some() => bail!("--image needs --llava DIR (the projector)"),
            None => None,
        };
        (model, image)
    };
    let mut stop_words: Vec<String> = template
        .as_ref()
        .map(|t| t.stop_words.clone())
        .unwrap_or_default();
    stop_words.extend(args.stop_words.iter().cloned());
    stop_words.extend(jinja.and_then(|t| t.end_of_turn()));
    let session = ChatSession::new(
        &model,
        &tokenizer,
        template.as_ref(),
        system,
        stop_words,
        GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            eos_token_ids: tokenizer.eos_ids().to_vec(),
            sampling: args.sampling,
        },
        image,
        device,
    );
    let mut session = match jinja {
        Some(t) => session.with_chat_template(t),
        None => session,
    };
    let stream = !args.no_streamer;
    if let Some(prompt) = &args.prompt {
        return answer(&mut session, prompt, stream);
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
                session.reset();
                eprintln!("Log: History responses have been removed!");
            }
            "" if eof => return Ok(()),
            "" => {}
            _ => answer(&mut session, &text, stream)?,
        }
        if eof {
            return Ok(());
        }
    }
}

/// One turn: the answer printed as it is generated (`stream`), or at the end.
fn answer<B: Backend>(session: &mut ChatSession<'_, B>, input: &str, stream: bool) -> Result<()> {
    let mut stdout = std::io::stdout();
    let answer = session.turn(input, |piece| {
        if stream {
            write!(stdout, "{piece}")
                .and_then(|()| stdout.flush())
                .map_err(|e| xtuner_engine::Error::Io {
                    path: "standard output".into(),
                    source: e,
                })?;
        }
        Ok(())
    })?;
    if stream {
        println!();
    } else {
        println!("{answer}");
    }
    Ok(())
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

/// Whether `dir` holds a transformers LLaVA (`convert pth_to_hf --save-format
/// huggingface`): its `config.json` says `model_type: llava`.
fn is_hf_llava(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|config| config["model_type"] == "llava")
}

fn system_prompt(args: &ChatArgs) -> Result<String> {
    Ok(match (&args.system, &args.system_template) {
        (Some(_), Some(_)) => bail!("give --system or --system-template, not both"),
        (Some(text), None) => text.clone(),
        (None, Some(name)) => name.parse::<SystemTemplate>()?.text_for_bot(&args.bot_name),
        (None, None) => String::new(),
    })
}
