//! Preference commands: `check-custom-dataset`, `log-dataset` and `dataset build` of a
//! preference config, `xtuner eval` on preference pairs, `xtuner reward`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use xtuner_dataset::Tokenizer;
use xtuner_dataset::preference::{PairOptions, PreferenceFormat, encode_pair_records};
use xtuner_engine::preference::segment_logps;
use xtuner_engine::recipe::preference::pair_batch;
use xtuner_engine::step::batch_tensors;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::decoder::Decoder;
use xtuner_template::Message;

use crate::args::Show;
use crate::backend;
use crate::commands::tokens::{decode, jinja_template, masked_text, tokenizer_path};

/// DPO's β for the implicit rewards `eval` reports (XTuner's default).
const BETA: f64 = 0.1;

/// `xtuner eval MODEL --adapter A --data PAIRS --format intel_orca_dpo|...`: how often
/// the model prefers the chosen answer (higher log-probability), and DPO's implicit
/// rewards against the model without its adapter (the reference of a LoRA run):
/// accuracy and mean margin.
pub fn eval_pairs(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &[PathBuf],
    format: PreferenceFormat,
    template: Option<&str>,
    max_length: usize,
) -> Result<()> {
    type B = backend::Cpu;
    let device = Default::default();
    let template = jinja_template(model_dir, template)?;
    let tokenizer = Tokenizer::from_path(model_dir)?;
    let records = xtuner_dataset::reader::read_records(data)?;
    let options = PairOptions {
        max_length,
        reward_token_id: None,
    };
    let pairs = encode_pair_records(&records, format, &template, &tokenizer, options)?;
    if pairs.is_empty() {
        bail!("no preference pair in the data");
    }
    let peft = adapter.map(PeftAdapter::open).transpose()?;
    let (policy, _) = Decoder::<B>::load(model_dir, peft.as_ref(), &device)?;
    let reference = match peft {
        Some(_) => Some(Decoder::<B>::load(model_dir, None, &device)?.0),
        None => None,
    };
    let logps = |model: &Decoder<B>, rows: &[&xtuner_dataset::PackedRow]| -> Vec<f64> {
        let (batch, segments) = pair_batch(rows, false);
        let (ids, input) = batch_tensors::<B>(&batch, &device);
        let logps = segment_logps(
            model.forward(ids, &input, None),
            &batch.labels,
            &segments,
            false,
        );
        logps
            .into_data()
            .convert::<f64>()
            .to_vec()
            .unwrap_or_default()
    };
    let (mut prefers, mut reward_wins, mut margin) = (0usize, 0usize, 0f64);
    let n = pairs.len();
    for pair in pairs {
        let row = pair.into_row();
        let rows = [&row];
        let p = logps(&policy, &rows);
        let [chosen, rejected] = [p[0], p[1]];
        prefers += usize::from(chosen > rejected);
        if let Some(reference) = &reference {
            let r = logps(reference, &rows);
            let (rc, rr) = (BETA * (chosen - r[0]), BETA * (rejected - r[1]));
            reward_wins += usize::from(rc > rr);
            margin += rc - rr;
        }
    }
    let pct = |k: usize| 100.0 * k as f64 / n as f64;
    println!(
        "{n} pairs: the model prefers the chosen answer in {:.1}% ({prefers}/{n})",
        pct(prefers)
    );
    if reference.is_some() {
        println!(
            "rewards against the model without its adapter (beta {BETA}): accuracy {:.1}%, mean margin {:.4}",
            pct(reward_wins),
            margin / n as f64
        );
    }
    Ok(())
}

/// `xtuner reward MODEL --prompt P --answer A...`: each answer's score, the value head
/// read at the reward token that ends the conversation (rendered with the model's chat
/// template, as the reward model was trained).
pub fn reward(
    model_dir: &Path,
    prompt: &str,
    answers: &[String],
    system: Option<&str>,
    reward_token_id: Option<u32>,
    template: Option<&str>,
) -> Result<()> {
    type B = backend::Cpu;
    let device = Default::default();
    let config_path = model_dir.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    let token = reward_token_id
        .or_else(|| config["reward_token_id"].as_u64().and_then(|t| u32::try_from(t).ok()))
        .with_context(|| {
            format!(
                "{} has no reward_token_id: give the token the model was trained with, --reward-token-id N",
                config_path.display()
            )
        })?;
    let template = jinja_template(model_dir, template)?;
    let tokenizer = Tokenizer::from_path(model_dir)?;
    let (model, _) = xtuner_model::reward::RewardModel::<B>::load(model_dir, None, &device)?;
    for answer in answers {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", prompt));
        messages.push(Message::new("assistant", answer.as_str()));
        let text = template.render(&messages, false)?;
        let mut ids: Vec<i64> = tokenizer
            .encode(&text)?
            .into_iter()
            .map(i64::from)
            .collect();
        ids.push(i64::from(token));
        let n = ids.len();
        let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [1, n]),
            &device,
        );
        let input = xtuner_model::decoder::DecoderInput::causal(1, n, &device);
        let values: Vec<f32> = model
            .values(ids, &input)
            .into_data()
            .to_vec()
            .unwrap_or_default();
        let score = values.last().copied().unwrap_or(f32::NAN);
        println!("{score:.4}\t{answer}");
    }
    Ok(())
}

/// `check-custom-dataset` of a preference config: every record mapped and encoded (the
/// first bad one stops the check with its file and line), then the first record at
/// every stage.
pub fn check_pairs(config: &xtuner_engine::LoadedConfig) -> Result<()> {
    let spec = config.config.pair_spec()?;
    let tokenizer = Tokenizer::from_path(tokenizer_path(config)?)?;
    let template = tokenizer.chat_template()?;
    let records = xtuner_dataset::reader::read_records(&spec.files)?;
    let pairs = encode_pair_records(&records, spec.format, template, &tokenizer, spec.options)?;
    if let (Some(first), Some(encoded)) = (records.first(), pairs.first()) {
        let pair = spec.format.map(&first.value).map_err(anyhow::Error::msg)?;
        println!(
            "=== first record ({}:{}) ===",
            first.path.display(),
            first.line
        );
        println!("{}", serde_json::to_string_pretty(&first.value)?);
        println!("=== after the `{}` format ===", spec.format);
        println!("{}", serde_json::to_string_pretty(&pair)?);
        println!("=== the prompt, rendered by {} ===", template.origin());
        println!("{}", template.render(&pair.prompt, true)?);
        println!("=== encoded ===");
        println!("chosen_ids:      {:?}", encoded.chosen_ids);
        println!("chosen_labels:   {:?}", encoded.chosen_labels);
        println!("rejected_ids:    {:?}", encoded.rejected_ids);
        println!("rejected_labels: {:?}", encoded.rejected_labels);
    }
    println!("OK: {} records, {} pairs", records.len(), pairs.len());
    if pairs.is_empty() {
        bail!("no preference pair: the data set is empty");
    }
    Ok(())
}

/// `log-dataset` of a preference config: the first rows of the processed (cached) data
/// set, each pair's chosen and rejected sequence.
pub fn log_pairs(config: &xtuner_engine::LoadedConfig, show: Show, num: usize) -> Result<()> {
    let spec = config.config.pair_spec()?;
    let (dataset, _) = xtuner_dataset::load_or_process_pairs(
        &spec,
        tokenizer_path(config)?,
        &config.config.data.cache_dir,
    )?;
    let tokenizer = Tokenizer::from_path(tokenizer_path(config)?)?;
    let s = &dataset.stats;
    println!(
        "{} rows ({} pairs from {} records, {} tokens, {} trained)",
        s.rows, s.samples, s.records, s.tokens, s.trained_tokens
    );
    for (i, row) in dataset.rows.iter().take(num).enumerate() {
        for (k, w) in row.cumulative_len.windows(2).enumerate() {
            let side = if k % 2 == 0 { "chosen" } else { "rejected" };
            let (ids, labels) = (&row.input_ids[w[0]..w[1]], &row.labels[w[0]..w[1]]);
            println!(
                "=== row {i}, pair {}, {side} ({} tokens) ===",
                k / 2,
                ids.len()
            );
            if matches!(show, Show::Text | Show::All) {
                println!("[text]\n{}", decode(&tokenizer, ids)?);
            }
            if matches!(show, Show::MaskedText | Show::All) {
                println!("[masked_text]\n{}", masked_text(&tokenizer, labels)?);
            }
            if matches!(show, Show::InputIds | Show::All) {
                println!("[input_ids]\n{ids:?}");
            }
            if matches!(show, Show::Labels | Show::All) {
                println!("[labels]\n{labels:?}");
            }
        }
    }
    Ok(())
}

/// `dataset build` of a preference config: process (or load from the cache) and report.
pub fn build_pairs(
    config: &xtuner_engine::LoadedConfig,
    no_cache: bool,
    as_json: bool,
) -> Result<()> {
    let spec = config.config.pair_spec()?;
    let started = std::time::Instant::now();
    let path = tokenizer_path(config)?;
    let (dataset, cache) = if no_cache {
        let tokenizer = Tokenizer::from_path(path)?;
        let template = tokenizer.chat_template()?;
        (
            xtuner_dataset::preference::process_pairs(&spec, template, &tokenizer)?,
            "off",
        )
    } else {
        let (d, outcome) =
            xtuner_dataset::load_or_process_pairs(&spec, path, &config.config.data.cache_dir)?;
        let cache = match outcome {
            xtuner_dataset::CacheOutcome::Hit(_) => "hit",
            xtuner_dataset::CacheOutcome::Built(_) => "built",
        };
        (d, cache)
    };
    let seconds = started.elapsed().as_secs_f64();
    let s = &dataset.stats;
    if as_json {
        let report = serde_json::json!({
            "config": config.name,
            "cache": cache,
            "seconds": seconds,
            "records": s.records,
            "pairs": s.samples,
            "rows": s.rows,
            "tokens": s.tokens,
            "trained_tokens": s.trained_tokens,
        });
        println!("{report}");
    } else {
        println!("config      {}", config.name);
        println!("records     {}", s.records);
        println!("pairs       {}", s.samples);
        println!("tokens      {} ({} trained)", s.tokens, s.trained_tokens);
        match spec.max_packed_length {
            Some(max) => println!(
                "rows        {} (pairs packed into rows of at most {max} tokens)",
                s.rows
            ),
            None => println!("rows        {} (one pair each)", s.rows),
        }
        println!("cache       {cache}");
        println!("seconds     {seconds:.3}");
    }
    Ok(())
}
