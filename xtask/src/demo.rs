//! `cargo xtask demo-data`: the demo the repository ships, generated from a fixed seed.
//!
//! The task is sentiment: "Is this review positive or negative? The soup was cold and
//! the waiter was rude." → "negative". A review is 1–3 clauses "the NOUN was ADJECTIVE",
//! all of one polarity. Small enough for a tiny randomly initialised transformer to
//! learn with LoRA on a CPU in minutes, and checkable on held-out prompts (no eval
//! review occurs in the training set). Writes
//! - `configs/demo/train.jsonl`, `configs/demo/eval.jsonl` (XTuner's alpaca format);
//! - `configs/demo/tokenizer/` (an InternLM2-shaped tokenizer in which each demo word
//!   is one token);
//! - `configs/demo_tiny_lora.toml` (the run config).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::seq::IndexedRandom as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tokenizer;

/// What the reviews are about.
pub const NOUNS: [&str; 16] = [
    "food", "soup", "bread", "coffee", "tea", "cake", "service", "waiter", "room", "bed", "view",
    "music", "film", "book", "show", "price",
];
/// Words that make a clause positive.
pub const POSITIVE: [&str; 10] = [
    "great",
    "lovely",
    "delicious",
    "friendly",
    "clean",
    "fresh",
    "perfect",
    "wonderful",
    "kind",
    "excellent",
];
/// Words that make a clause negative.
pub const NEGATIVE: [&str; 10] = [
    "awful", "cold", "rude", "dirty", "stale", "slow", "bland", "noisy", "terrible", "boring",
];

/// The fixed question every prompt starts with.
const QUESTION: &str = "Is this review positive or negative?";
const SEED: u64 = 20_240_601;
const TRAIN_RECORDS: usize = 2000;
const EVAL_RECORDS: usize = 100;
const MAX_CLAUSES: usize = 3;
/// Upper bound on the tokenizer's size; training stops sooner, once every word is one
/// piece.
const VOCAB_SIZE: usize = 600;

pub const DEMO_DIR: &str = "configs/demo";
const CONFIG: &str = "configs/demo_tiny_lora.toml";

/// One demo record: its clauses (noun, adjective) and its label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Review {
    pub clauses: Vec<(&'static str, &'static str)>,
    pub positive: bool,
}

/// Generates every demo file under the repository root (the working directory).
///
/// # Errors
/// An unwritable file, or a tokenizer that fails its checks.
pub fn run() -> Result<()> {
    let dir = Path::new(DEMO_DIR);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let reviews = distinct_reviews(&mut rng, TRAIN_RECORDS + EVAL_RECORDS);
    // The reviews are distinct and in random order, so the first ones are a held-out set.
    let (eval, train) = reviews.split_at(EVAL_RECORDS);

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let train_file = dir.join("train.jsonl");
    let eval_file = dir.join("eval.jsonl");
    write_jsonl(&train_file, train)?;
    write_jsonl(&eval_file, eval)?;

    let texts: Vec<String> = train.iter().flat_map(tokenizer_texts).collect();
    let tokenizer = tokenizer::train(&texts, VOCAB_SIZE)?;
    let samples = [
        prompt(&train[0]),
        answer(&eval[0]).to_string(),
        "Hello, wörld! 你好 🙂\n(unknown characters fall back to bytes)".to_string(),
    ];
    let samples: Vec<&str> = samples.iter().map(String::as_str).collect();
    let tokenizer_dir = dir.join("tokenizer");
    let tokenizer = tokenizer::save(&tokenizer, &tokenizer_dir, &samples)?;
    check_one_token_per_word(&tokenizer)?;

    // One held-out prompt of each label for the evaluate-chat hook.
    let first = |positive: bool| eval.iter().find(|r| r.positive == positive).map(prompt);
    let inputs = [first(true), first(false)];
    let [Some(pos), Some(neg)] = inputs else {
        bail!("the eval set lacks a label")
    };
    fs::write(CONFIG, config_toml(&[pos, neg])).with_context(|| format!("writing {CONFIG}"))?;

    println!("demo data (seed {SEED}):");
    for path in [
        train_file,
        eval_file,
        tokenizer_dir.join("tokenizer.json"),
        tokenizer_dir.join("tokenizer_config.json"),
    ]
    .iter()
    .chain([Path::new(CONFIG).to_path_buf()].iter())
    {
        let size = fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        println!("  {:<45} {size:>9} bytes", path.display());
    }
    let positives = train.iter().filter(|r| r.positive).count();
    println!(
        "  {} train ({positives} positive) + {} eval records (no eval review is in train)",
        train.len(),
        eval.len()
    );
    println!(
        "  vocab size {} (9 special + 256 byte pieces + {} trained); each of the {} words is one token",
        tokenizer.get_vocab_size(true),
        tokenizer.get_vocab_size(true).saturating_sub(265),
        words().count()
    );
    println!(
        "  sample: {:?}",
        tokenizer::pieces(&tokenizer, &prompt(&eval[0]))?
    );
    Ok(())
}

/// Every word a review is built from.
fn words() -> impl Iterator<Item = &'static str> {
    NOUNS.iter().chain(&POSITIVE).chain(&NEGATIVE).copied()
}

/// `n` distinct reviews of 1–3 clauses about distinct nouns, half of each label on
/// average, in the order drawn.
pub fn distinct_reviews(rng: &mut ChaCha8Rng, n: usize) -> Vec<Review> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let positive = rng.random_bool(0.5);
        let adjectives: &[&'static str] = if positive { &POSITIVE } else { &NEGATIVE };
        let len = rng.random_range(1..=MAX_CLAUSES);
        let nouns: Vec<&'static str> = NOUNS.choose_multiple(rng, len).copied().collect();
        let clauses = nouns
            .into_iter()
            .map(|noun| (noun, adjectives[rng.random_range(0..adjectives.len())]))
            .collect();
        let review = Review { clauses, positive };
        if seen.insert(review.clone()) {
            out.push(review);
        }
    }
    out
}

/// "Is this review positive or negative? The soup was cold and the bread was stale."
pub fn prompt(review: &Review) -> String {
    let clauses: Vec<String> = review
        .clauses
        .iter()
        .map(|(noun, adjective)| format!("the {noun} was {adjective}"))
        .collect();
    let mut text = clauses.join(" and ");
    text[..1].make_ascii_uppercase();
    format!("{QUESTION} {text}.")
}

pub fn answer(review: &Review) -> &'static str {
    if review.positive {
        "positive"
    } else {
        "negative"
    }
}

/// The texts the tokenizer learns from for a record: the prompt turn and the answer
/// as `internlm2_chat` renders them (XTuner encodes the two separately), and the bare
/// prompt, as typed in a chat.
fn tokenizer_texts(review: &Review) -> [String; 3] {
    [
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            prompt(review)
        ),
        format!("{}<|im_end|>", answer(review)),
        prompt(review),
    ]
}

/// One alpaca record per line, keys in XTuner's order.
fn write_jsonl(path: &Path, reviews: &[Review]) -> Result<()> {
    let mut text = String::new();
    for review in reviews {
        let instruction = serde_json::to_string(&prompt(review))?;
        let output = serde_json::to_string(answer(review))?;
        writeln!(
            text,
            r#"{{"instruction": {instruction}, "input": "", "output": {output}}}"#
        )?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn check_one_token_per_word(tokenizer: &tokenizers::Tokenizer) -> Result<()> {
    for word in words() {
        let pieces = tokenizer::pieces(tokenizer, word)?;
        if pieces != [format!("▁{word}")] {
            bail!("demo word {word:?} is not one token: {pieces:?}");
        }
    }
    let sentence: Vec<&str> = words().collect();
    let pieces = tokenizer::pieces(tokenizer, &sentence.join(" "))?;
    if pieces.len() != sentence.len() {
        bail!(
            "the demo words in a row take {} tokens, not {}: {pieces:?}",
            pieces.len(),
            sentence.len()
        );
    }
    Ok(())
}

fn config_toml(inputs: &[String; 2]) -> String {
    let inputs = inputs
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# The demo: LoRA on a tiny, randomly initialised InternLM2 (preset `internlm2-tiny`)
# that learns to tell positive reviews from negative ones:
#   "Is this review positive or negative? The soup was cold." -> "negative"
# Small enough to train on a CPU in minutes and to check on prompts it has never seen:
#
#   configs/demo/train.jsonl    {TRAIN_RECORDS} alpaca records
#   configs/demo/eval.jsonl     {EVAL_RECORDS} held-out records (reviews not in train.jsonl)
#   configs/demo/tokenizer/     an InternLM2-style BPE tokenizer; each of the {n_words} words is one token
#
# Generated with this file by `cargo xtask demo-data` (fixed seed); regenerate, do not edit.
# Look at the processed data with
#   xtuner log-dataset configs/demo_tiny_lora.toml
#   xtuner dataset build configs/demo_tiny_lora.toml

[model]
preset = "internlm2-tiny"
# A tiny model needs no activation checkpointing (XTuner's default, on): recomputing
# every layer in backward would cost a third more time to save memory it does not need.
activation_checkpointing = false

[tokenizer]
path = "configs/demo/tokenizer"

[data]
files = ["configs/demo/train.jsonl"]
format = "alpaca"
max_length = 256
# One review per row. Packed rows would put ~6 reviews side by side, and a randomly
# initialised model attends evenly over the whole row at first, so the label's signal
# is diluted by the neighbours' words (XTuner's use_varlen_attn is the other cure).
pack_to_max_length = false

[template]
name = "internlm2_chat"

[lora]
r = 16
alpha = 32
dropout = 0.0

[optimizer]
lr = 1e-3

[train]
batch_size = 16
accumulative_counts = 1
max_epochs = 3

[checkpoint]
save_steps = 200
save_total_limit = 2

[evaluation]
freq = 200
inputs = [{inputs}]
"#,
        n_words = words().count(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reviews_are_distinct_and_deterministic() {
        let a = distinct_reviews(&mut ChaCha8Rng::seed_from_u64(SEED), 300);
        let b = distinct_reviews(&mut ChaCha8Rng::seed_from_u64(SEED), 300);
        assert_eq!(a, b);
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 300);
        for review in &a {
            assert!((1..=MAX_CLAUSES).contains(&review.clauses.len()));
            let adjectives: &[&str] = if review.positive {
                &POSITIVE
            } else {
                &NEGATIVE
            };
            assert!(
                review
                    .clauses
                    .iter()
                    .all(|(_, adj)| adjectives.contains(adj))
            );
        }
        let positives = a.iter().filter(|r| r.positive).count();
        assert!((100..200).contains(&positives), "{positives}");
    }

    #[test]
    fn records_read_as_reviews() {
        let review = Review {
            clauses: vec![("soup", "cold"), ("waiter", "rude")],
            positive: false,
        };
        assert_eq!(
            prompt(&review),
            "Is this review positive or negative? The soup was cold and the waiter was rude."
        );
        assert_eq!(answer(&review), "negative");
    }
}
