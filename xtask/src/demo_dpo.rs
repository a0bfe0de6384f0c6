//! `cargo xtask demo-dpo-data`: the preference demo, generated from a fixed seed.
//!
//! The demo's reviews as preference pairs: the prompt "Is this review positive or
//! negative? The soup was cold.", the right label chosen, the wrong one rejected. DPO
//! with LoRA on a tiny randomly initialised InternLM2 learns to prefer the right label,
//! and is checked on held-out pairs. Writes
//! - `configs/demo_dpo/train.jsonl`, `configs/demo_dpo/eval.jsonl` (the `preference`
//!   format: `prompt`, `chosen`, `rejected` message lists);
//! - `configs/demo_dpo/tokenizer/` (the demo's tokenizer with InternLM2-chat's Jinja
//!   `chat_template`, which renders preference data, as in XTuner);
//! - `configs/demo_tiny_dpo.toml` (the run config).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::demo::{DEMO_DIR, Review, answer, distinct_reviews, prompt};

const SEED: u64 = 20_240_602;
const TRAIN_PAIRS: usize = 1000;
const EVAL_PAIRS: usize = 100;
const DIR: &str = "configs/demo_dpo";
const CONFIG: &str = "configs/demo_tiny_dpo.toml";

/// InternLM2-chat's `chat_template` (as its `tokenizer_config.json` ships it).
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Generates every file of the preference demo under the repository root.
///
/// # Errors
/// No `configs/demo/tokenizer` (run `cargo xtask demo-data` first), or an unwritable file.
pub fn run() -> Result<()> {
    let source = Path::new(DEMO_DIR).join("tokenizer");
    if !source.join("tokenizer.json").is_file() {
        bail!(
            "{} has no tokenizer.json: run `cargo xtask demo-data` first",
            source.display()
        );
    }
    let dir = Path::new(DIR);
    let tokenizer_dir = dir.join("tokenizer");
    fs::create_dir_all(&tokenizer_dir)
        .with_context(|| format!("creating {}", tokenizer_dir.display()))?;
    fs::copy(
        source.join("tokenizer.json"),
        tokenizer_dir.join("tokenizer.json"),
    )
    .context("copying the demo tokenizer")?;
    let config_path = source.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(
        &fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )?;
    config["chat_template"] = CHAT_TEMPLATE.into();
    fs::write(
        tokenizer_dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;

    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let reviews = distinct_reviews(&mut rng, TRAIN_PAIRS + EVAL_PAIRS);
    let (eval, train) = reviews.split_at(EVAL_PAIRS);
    write_pairs(&dir.join("train.jsonl"), train)?;
    write_pairs(&dir.join("eval.jsonl"), eval)?;
    let first = |positive: bool| eval.iter().find(|r| r.positive == positive).map(prompt);
    let (Some(pos), Some(neg)) = (first(true), first(false)) else {
        bail!("the eval set lacks a label")
    };
    fs::write(CONFIG, config_toml(&pos, &neg)).with_context(|| format!("writing {CONFIG}"))?;
    println!(
        "preference demo (seed {SEED}): {} train + {} held-out pairs in {DIR}, config {CONFIG}",
        train.len(),
        eval.len()
    );
    Ok(())
}

/// One pair per line, keys in reading order: the review's question, its label chosen,
/// the other rejected.
fn write_pairs(path: &Path, reviews: &[Review]) -> Result<()> {
    let mut text = String::new();
    for review in reviews {
        let other = if review.positive {
            "negative"
        } else {
            "positive"
        };
        let message = |role: &str, content: &str| -> Result<String> {
            Ok(format!(
                r#"[{{"role": "{role}", "content": {}}}]"#,
                serde_json::to_string(content)?
            ))
        };
        writeln!(
            text,
            r#"{{"prompt": {}, "chosen": {}, "rejected": {}}}"#,
            message("user", &prompt(review))?,
            message("assistant", answer(review))?,
            message("assistant", other)?,
        )?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn config_toml(positive: &str, negative: &str) -> String {
    format!(
        r#"# The preference demo: DPO with LoRA on a tiny, randomly initialised InternLM2 (preset
# `internlm2-tiny`) that learns to prefer the right label of a review:
#   prompt   "Is this review positive or negative? The soup was cold."
#   chosen   "negative"        rejected "positive"
#
#   configs/demo_dpo/train.jsonl    {TRAIN_PAIRS} pairs (the `preference` format)
#   configs/demo_dpo/eval.jsonl     {EVAL_PAIRS} held-out pairs
#   configs/demo_dpo/tokenizer/     the demo tokenizer with InternLM2-chat's Jinja chat_template,
#                                   which renders the pairs (as XTuner renders preference data)
#
# Generated with this file by `cargo xtask demo-dpo-data` (fixed seed); regenerate, do not edit.
# Check the held-out pairs after training (the reference is the model without its adapter):
#   xtuner eval work_dirs/demo_tiny_dpo/base_model --adapter ADAPTER \
#       --data configs/demo_dpo/eval.jsonl --format preference

[model]
preset = "internlm2-tiny"
activation_checkpointing = false

[tokenizer]
path = "configs/demo_dpo/tokenizer"

[data]
files = ["configs/demo_dpo/train.jsonl"]
format = "preference"
max_length = 256

# For the evaluate-chat hook only: pairs are rendered with the tokenizer's chat_template.
[template]
name = "internlm2_chat"

[lora]
r = 16
alpha = 32
dropout = 0.0

[preference]
method = "dpo"
loss_type = "sigmoid"
beta = 0.1

[optimizer]
lr = 1e-3

[train]
batch_size = 8
accumulative_counts = 1
max_epochs = 2

[checkpoint]
save_steps = 125
save_total_limit = 2

[evaluation]
freq = 125
inputs = [{positive:?}, {negative:?}]
"#
    )
}
