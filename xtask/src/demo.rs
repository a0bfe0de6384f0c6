//! `cargo xtask demo-data`: the demo the repository ships, generated from a fixed seed.
//!
//! The task is "Reverse the words: sun moon star" → "star moon sun" with 2–5 distinct
//! words from [`WORDS`]: small enough for a tiny randomly initialised transformer to
//! learn on a CPU, and checkable on held-out prompts (the eval word sequences never
//! occur in the training set). Writes
//! - `configs/demo/train.jsonl`, `configs/demo/eval.jsonl` (XTuner's alpaca format);
//! - `configs/demo/tokenizer/` (an InternLM2-shaped tokenizer in which each demo word
//!   is one token);
//! - `configs/demo_tiny_lora.toml` (the run config).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tokenizer;

/// The words the demo reverses: common, short, one token each.
pub const WORDS: [&str; 40] = [
    "apple", "bird", "blue", "book", "cat", "cloud", "cold", "day", "dog", "door", "fish", "green",
    "hand", "hat", "hot", "house", "king", "lamp", "milk", "moon", "night", "old", "rain", "red",
    "river", "road", "sea", "ship", "sky", "snow", "song", "star", "stone", "sun", "tree", "water",
    "wind", "wood", "year", "young",
];

/// The fixed wording of every prompt.
const INSTRUCTION: &str = "Reverse the words:";
const SEED: u64 = 20_240_601;
const TRAIN_RECORDS: usize = 2000;
const EVAL_RECORDS: usize = 100;
const MIN_WORDS: usize = 2;
const MAX_WORDS: usize = 5;
/// Upper bound on the tokenizer's size; training stops sooner, once every word is one
/// piece.
const VOCAB_SIZE: usize = 600;

const DEMO_DIR: &str = "configs/demo";
const CONFIG: &str = "configs/demo_tiny_lora.toml";

/// One demo record: the words in order.
type Sequence = Vec<&'static str>;

/// Generates every demo file under the repository root (the working directory).
///
/// # Errors
/// An unwritable file, or a tokenizer that fails its checks.
pub fn run() -> Result<()> {
    let dir = Path::new(DEMO_DIR);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let sequences = distinct_sequences(&mut rng, TRAIN_RECORDS + EVAL_RECORDS);
    // The sequences are distinct and in random order, so the first ones are a held-out set.
    let (eval, train) = sequences.split_at(EVAL_RECORDS);

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let train_file = dir.join("train.jsonl");
    let eval_file = dir.join("eval.jsonl");
    write_jsonl(&train_file, train)?;
    write_jsonl(&eval_file, eval)?;

    let texts: Vec<String> = train.iter().flat_map(tokenizer_texts).collect();
    let tokenizer = tokenizer::train(&texts, VOCAB_SIZE)?;
    let samples = [
        prompt(&train[0]),
        answer(&eval[0]),
        "Hello, wörld! 你好 🙂\n(unknown characters fall back to bytes)".to_string(),
    ];
    let samples: Vec<&str> = samples.iter().map(String::as_str).collect();
    let tokenizer_dir = dir.join("tokenizer");
    let tokenizer = tokenizer::save(&tokenizer, &tokenizer_dir, &samples)?;
    check_one_token_per_word(&tokenizer)?;

    let inputs = [prompt(&eval[0]), prompt(&eval[1])];
    fs::write(CONFIG, config_toml(&inputs)).with_context(|| format!("writing {CONFIG}"))?;

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
    println!(
        "  {} train + {} eval records (no eval word sequence is in train)",
        train.len(),
        eval.len()
    );
    println!(
        "  vocab size {} (9 special + 256 byte pieces + {} trained); each of the {} words is one token",
        tokenizer.get_vocab_size(true),
        tokenizer.get_vocab_size(true).saturating_sub(265),
        WORDS.len()
    );
    println!(
        "  sample: {:?}",
        tokenizer::pieces(&tokenizer, &prompt(&eval[0]))?
    );
    Ok(())
}

/// `n` distinct sequences of 2–5 distinct words, in the order drawn.
fn distinct_sequences(rng: &mut ChaCha8Rng, n: usize) -> Vec<Sequence> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut pool = WORDS.to_vec();
    while out.len() < n {
        let len = rng.random_range(MIN_WORDS..=MAX_WORDS);
        let (chosen, _) = pool.partial_shuffle(rng, len);
        let sequence = chosen.to_vec();
        if seen.insert(sequence.clone()) {
            out.push(sequence);
        }
    }
    out
}

fn prompt(words: &Sequence) -> String {
    format!("{INSTRUCTION} {}", words.join(" "))
}

fn answer(words: &Sequence) -> String {
    let reversed: Vec<&str> = words.iter().rev().copied().collect();
    reversed.join(" ")
}

/// The texts the tokenizer learns from for a record: the prompt turn and the answer
/// as `internlm2_chat` renders them (XTuner encodes the two separately), and the bare
/// prompt, as typed in a chat.
fn tokenizer_texts(words: &Sequence) -> [String; 3] {
    [
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            prompt(words)
        ),
        format!("{}<|im_end|>", answer(words)),
        prompt(words),
    ]
}

/// One alpaca record per line, keys in XTuner's order.
fn write_jsonl(path: &Path, sequences: &[Sequence]) -> Result<()> {
    let mut text = String::new();
    for words in sequences {
        let instruction = serde_json::to_string(&prompt(words))?;
        let output = serde_json::to_string(&answer(words))?;
        writeln!(
            text,
            r#"{{"instruction": {instruction}, "input": "", "output": {output}}}"#
        )?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn check_one_token_per_word(tokenizer: &tokenizers::Tokenizer) -> Result<()> {
    for word in WORDS {
        let pieces = tokenizer::pieces(tokenizer, word)?;
        if pieces != [format!("▁{word}")] {
            bail!("demo word {word:?} is not one token: {pieces:?}");
        }
    }
    let sentence = WORDS.join(" ");
    let pieces = tokenizer::pieces(tokenizer, &sentence)?;
    if pieces.len() != WORDS.len() {
        bail!(
            "the demo words in a row take {} tokens, not {}: {pieces:?}",
            pieces.len(),
            WORDS.len()
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
# that learns to reverse 2-5 words: "Reverse the words: sun moon star" -> "star moon sun".
# Small enough to train on a CPU in minutes and to check on prompts it has never seen:
#
#   configs/demo/train.jsonl    {TRAIN_RECORDS} alpaca records
#   configs/demo/eval.jsonl     {EVAL_RECORDS} held-out records (word sequences not in train.jsonl)
#   configs/demo/tokenizer/     an InternLM2-style BPE tokenizer; each of the {n_words} words is one token
#
# Generated with this file by `cargo xtask demo-data` (fixed seed); regenerate, do not edit.
# Look at the processed data with
#   xtuner log-dataset configs/demo_tiny_lora.toml
#   xtuner dataset build configs/demo_tiny_lora.toml

[model]
preset = "internlm2-tiny"

[tokenizer]
path = "configs/demo/tokenizer"

[data]
files = ["configs/demo/train.jsonl"]
format = "alpaca"
max_length = 256
pack_to_max_length = true

[template]
name = "internlm2_chat"

[lora]
r = 16
alpha = 32
dropout = 0.0

[optimizer]
lr = 1e-3

[train]
batch_size = 4
accumulative_counts = 1
max_epochs = 3

[checkpoint]
save_steps = 200
save_total_limit = 2

[evaluation]
freq = 200
inputs = [{inputs}]
"#,
        n_words = WORDS.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_distinct_and_deterministic() {
        let a = distinct_sequences(&mut ChaCha8Rng::seed_from_u64(SEED), 300);
        let b = distinct_sequences(&mut ChaCha8Rng::seed_from_u64(SEED), 300);
        assert_eq!(a, b);
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 300);
        for words in &a {
            assert!((MIN_WORDS..=MAX_WORDS).contains(&words.len()));
            assert_eq!(words.iter().collect::<HashSet<_>>().len(), words.len());
        }
    }

    #[test]
    fn records_reverse_the_words() {
        let words = vec!["sun", "moon", "star"];
        assert_eq!(prompt(&words), "Reverse the words: sun moon star");
        assert_eq!(answer(&words), "star moon sun");
    }
}
