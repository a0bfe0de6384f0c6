//! `cargo xtask demo-llava-data`: the LLaVA demo the repository ships, generated from a
//! fixed seed.
//!
//! Pictures of one coloured shape (4 colours × 3 shapes, random size and place) on a
//! light background, 32×32 pixels. Stage 1 (pretrain) data are captions ("a red
//! circle"); stage 2 (finetune) data are questions about the picture ("What colour is
//! the shape?" → "red", "What shape is it?" → "circle"), with a few text-only records
//! mixed in, as LLaVA's instruction data has. The held-out pictures appear in no
//! training record. Writes under `configs/demo_llava/`:
//! - `images/train_NNNN.png`, `images/eval_NNNN.png`;
//! - `pretrain.json`, `finetune.json`, `eval.json` (LLaVA's JSON format);
//! - `tokenizer/` (an InternLM2-shaped tokenizer in which each demo word is one token);
//! - `clip/` (a small CLIP vision tower with random weights, in the Hugging Face
//!   layout: no pretrained tower can be downloaded here, and a frozen random one still
//!   passes colour and layout on to the projector).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::tokenizer;

const SEED: u64 = 20_241_128;
const DIR: &str = "configs/demo_llava";
/// Picture side in pixels (also the tower's input size).
const SIDE: u32 = 32;
const PATCH: usize = 8;
const TRAIN_IMAGES: usize = 600;
const EVAL_IMAGES: usize = 24;
/// Upper bound on the tokenizer's size; training stops once every word is one piece.
const VOCAB_SIZE: usize = 600;

/// The colours and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [235, 200, 30]),
];
/// The shapes.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

const CAPTION_PROMPT: &str = "Describe the picture.";
const COLOUR_QUESTION: &str = "What colour is the shape?";
const SHAPE_QUESTION: &str = "What shape is it?";
/// Text-only records (no image), as LLaVA's instruction mix has.
const TEXT_ONLY: [(&str, &str); 2] = [
    ("What colours do you know?", "red green blue yellow"),
    ("What shapes do you know?", "circle square triangle"),
];

/// One picture: which colour and shape, where and how big.
struct Picture {
    colour: usize,
    shape: usize,
    /// Centre and half-size in pixels.
    cx: f32,
    cy: f32,
    half: f32,
}

impl Picture {
    fn random(rng: &mut ChaCha8Rng) -> Self {
        let half = rng.random_range(6.0..11.0f32);
        let side = SIDE as f32;
        Self {
            colour: rng.random_range(0..COLOURS.len()),
            shape: rng.random_range(0..SHAPES.len()),
            cx: rng.random_range(half..side - half),
            cy: rng.random_range(half..side - half),
            half,
        }
    }

    fn caption(&self) -> String {
        format!("a {} {}", COLOURS[self.colour].0, SHAPES[self.shape])
    }

    fn covers(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        match SHAPES[self.shape] {
            "circle" => dx * dx + dy * dy <= self.half * self.half,
            "square" => dx.abs() <= self.half * 0.85 && dy.abs() <= self.half * 0.85,
            // Apex up, base at cy + half.
            _ => dy.abs() <= self.half && dx.abs() <= (dy + self.half) / 2.0,
        }
    }

    fn render(&self) -> image::RgbImage {
        image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let inside = self.covers(x as f32 + 0.5, y as f32 + 0.5);
            image::Rgb(if inside {
                COLOURS[self.colour].1
            } else {
                [245, 245, 240]
            })
        })
    }
}

/// Generates every LLaVA demo file under the repository root (the working directory).
///
/// # Errors
/// An unwritable file, or a tokenizer that fails its checks.
pub fn run() -> Result<()> {
    let dir = Path::new(DIR);
    let images = dir.join("images");
    fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut pictures = Vec::new();
    for (split, n) in [("train", TRAIN_IMAGES), ("eval", EVAL_IMAGES)] {
        for i in 0..n {
            let picture = Picture::random(&mut rng);
            let name = format!("images/{split}_{i:04}.png");
            picture
                .render()
                .save(dir.join(&name))
                .with_context(|| format!("writing {name}"))?;
            pictures.push((split, name, picture));
        }
    }

    let mut pretrain = Vec::new();
    let mut finetune = Vec::new();
    let mut eval = Vec::new();
    for (i, (split, name, picture)) in pictures.iter().enumerate() {
        let colour = COLOURS[picture.colour].0;
        let shape = SHAPES[picture.shape];
        if *split == "eval" {
            eval.push(record(
                i,
                Some(name),
                &[
                    (COLOUR_QUESTION, colour),
                    (SHAPE_QUESTION, shape),
                    (CAPTION_PROMPT, &picture.caption()),
                ],
            ));
            continue;
        }
        pretrain.push(record(
            i,
            Some(name),
            &[(CAPTION_PROMPT, &picture.caption())],
        ));
        // One or two questions per picture, in either order.
        let turns: Vec<(&str, &str)> = match rng.random_range(0..4) {
            0 => vec![(COLOUR_QUESTION, colour)],
            1 => vec![(SHAPE_QUESTION, shape)],
            2 => vec![(COLOUR_QUESTION, colour), (SHAPE_QUESTION, shape)],
            _ => vec![(SHAPE_QUESTION, shape), (COLOUR_QUESTION, colour)],
        };
        finetune.push(record(i, Some(name), &turns));
        if i % 20 == 0 {
            let (q, a) = TEXT_ONLY[(i / 20) % TEXT_ONLY.len()];
            finetune.push(record(10_000 + i, None, &[(q, a)]));
        }
    }
    for (file, records) in [
        ("pretrain.json", &pretrain),
        ("finetune.json", &finetune),
        ("eval.json", &eval),
    ] {
        let path = dir.join(file);
        // A JSON array, one record per line.
        let lines = records
            .iter()
            .map(serde_json::to_string)
            .collect::<serde_json::Result<Vec<_>>>()?;
        fs::write(&path, format!("[\n{}\n]\n", lines.join(",\n")))
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let texts = tokenizer_texts();
    let trained = tokenizer::train(&texts, VOCAB_SIZE)?;
    let samples = [
        format!("<image>\n{COLOUR_QUESTION}"),
        "a yellow triangle".to_string(),
        "Hello, wörld! 你好 🙂".to_string(),
    ];
    let samples: Vec<&str> = samples.iter().map(String::as_str).collect();
    let tokenizer = tokenizer::save(&trained, &dir.join("tokenizer"), &samples)?;
    for word in words() {
        let pieces = tokenizer::pieces(&tokenizer, word)?;
        if pieces != [format!("▁{word}")] {
            bail!("demo word {word:?} is not one token: {pieces:?}");
        }
    }
    write_clip(&dir.join("clip"), &mut rng)?;

    println!("LLaVA demo data (seed {SEED}) in {DIR}:");
    println!(
        "  {TRAIN_IMAGES} training pictures ({} pretrain captions, {} finetune records incl. text-only), {EVAL_IMAGES} held-out pictures",
        pretrain.len(),
        finetune.len()
    );
    println!(
        "  vocab size {}; each of the {} answer words is one token",
        tokenizer.get_vocab_size(true),
        words().count()
    );
    Ok(())
}

/// A LLaVA record: `<image>` opens the first human turn when there is an image.
fn record(id: usize, image: Option<&str>, turns: &[(&str, &str)]) -> Value {
    let mut conversations = Vec::new();
    for (i, (question, answer)) in turns.iter().enumerate() {
        let value = if i == 0 && image.is_some() {
            format!("<image>\n{question}")
        } else {
            (*question).to_string()
        };
        conversations.push(json!({"from": "human", "value": value}));
        conversations.push(json!({"from": "gpt", "value": answer}));
    }
    let mut record = json!({"id": format!("{id:05}"), "conversations": conversations});
    if let Some(image) = image {
        record["image"] = json!(image);
    }
    record
}

/// The words of the answers, each of which must be one token.
fn words() -> impl Iterator<Item = &'static str> {
    COLOURS.iter().map(|(c, _)| *c).chain(SHAPES).chain(["a"])
}

/// What the tokenizer learns from: each turn as `internlm2_chat` renders it.
fn tokenizer_texts() -> Vec<String> {
    let mut texts = Vec::new();
    let user = |q: &str| format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    for q in [CAPTION_PROMPT, COLOUR_QUESTION, SHAPE_QUESTION]
        .into_iter()
        .chain(TEXT_ONLY.map(|(q, _)| q))
    {
        texts.push(user(q));
        texts.push(user(&format!("<image>\n{q}")));
        texts.push(q.to_string());
    }
    for (_, a) in TEXT_ONLY {
        texts.push(format!("{a}<|im_end|>"));
    }
    for (c, _) in COLOURS {
        texts.push(format!("{c}<|im_end|>"));
        for s in SHAPES {
            texts.push(format!("a {c} {s}<|im_end|>"));
            texts.push(format!("{s}<|im_end|>"));
        }
    }
    // Repetition weighs the merges towards whole words.
    texts
        .iter()
        .cycle()
        .take(texts.len() * 20)
        .cloned()
        .collect()
}

/// A CLIP vision tower with random weights (transformers' init: N(0, 0.02), norms at
/// identity) in the Hugging Face layout: `config.json`, `preprocessor_config.json`,
/// `model.safetensors` with `vision_model.*` keys.
fn write_clip(dir: &Path, rng: &mut ChaCha8Rng) -> Result<()> {
    const HIDDEN: usize = 64;
    const INTERMEDIATE: usize = 128;
    const LAYERS: usize = 2;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = json!({
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": SIDE,
        "patch_size": PATCH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": HIDDEN,
        "torch_dtype": "float32"
    });
    let side = SIDE as usize;
    let preprocessor = json!({
        "crop_size": {"height": side, "width": side},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": side}
    });
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&preprocessor)?,
    )?;

    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut normal = |shape: Vec<usize>| -> (Vec<usize>, Vec<f32>) {
        let n = shape.iter().product();
        (shape, (0..n).map(|_| 0.02 * standard_normal(rng)).collect())
    };
    let p = |name: &str| format!("vision_model.{name}");
    let patches = (side / PATCH) * (side / PATCH);
    tensors.insert(
        p("embeddings.patch_embedding.weight"),
        normal(vec![HIDDEN, 3, PATCH, PATCH]),
    );
    tensors.insert(p("embeddings.class_embedding"), normal(vec![HIDDEN]));
    tensors.insert(
        p("embeddings.position_embedding.weight"),
        normal(vec![patches + 1, HIDDEN]),
    );
    for l in 0..LAYERS {
        for (name, d_out, d_in) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", HIDDEN, HIDDEN),
            ("self_attn.v_proj", HIDDEN, HIDDEN),
            ("self_attn.out_proj", HIDDEN, HIDDEN),
            ("mlp.fc1", INTERMEDIATE, HIDDEN),
            ("mlp.fc2", HIDDEN, INTERMEDIATE),
        ] {
            let key = p(&format!("encoder.layers.{l}.{name}"));
            tensors.insert(format!("{key}.weight"), normal(vec![d_out, d_in]));
            tensors.insert(format!("{key}.bias"), (vec![d_out], vec![0.0; d_out]));
        }
    }
    let mut norm = |name: String| {
        tensors.insert(format!("{name}.weight"), (vec![HIDDEN], vec![1.0; HIDDEN]));
        tensors.insert(format!("{name}.bias"), (vec![HIDDEN], vec![0.0; HIDDEN]));
    };
    norm(p("pre_layrnorm"));
    norm(p("post_layernorm"));
    for l in 0..LAYERS {
        norm(p(&format!("encoder.layers.{l}.layer_norm1")));
        norm(p(&format!("encoder.layers.{l}.layer_norm2")));
    }
    let bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, (shape, values))| {
            (
                k,
                (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, (shape, data))| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A standard normal sample (Box–Muller).
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
