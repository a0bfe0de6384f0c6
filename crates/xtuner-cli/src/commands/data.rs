//! Data commands: `check-custom-dataset`, `log-dataset`, `dataset encode|pack|build`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use xtuner_dataset::format::DataFormat;
use xtuner_dataset::pack::pack;
use xtuner_dataset::pipeline::{DataSpec, encode_records, load_records, process, trace_record};
use xtuner_dataset::preference::{PairOptions, PreferenceFormat, encode_pair_records};
use xtuner_dataset::{CacheOutcome, EncodedSample, PackedRow, Tokenizer, load_or_process};
use xtuner_engine::LoadedConfig;
use xtuner_template::PromptTemplate;

use crate::args::{ConfigArgs, Show};
use crate::commands::tokens::{decode, jinja_template, masked_text, tokenizer_path};
use crate::configs;

fn load_config(args: &ConfigArgs) -> Result<LoadedConfig> {
    configs::load(&args.config, &args.cfg_options)
}

fn tokenizer_of(config: &LoadedConfig) -> Result<Tokenizer> {
    Ok(Tokenizer::from_path(tokenizer_path(config)?)?)
}

/// Reads every record through map → template → encode; the first bad record stops the
/// check with its file and line. Then prints the first sample at every stage.
pub fn check_custom_dataset(args: &ConfigArgs) -> Result<()> {
    let config = load_config(args)?;
    if config.config.preference.is_some() {
        return crate::commands::preference::check_pairs(&config);
    }
    let spec = config.config.data_spec()?;
    let tokenizer = tokenizer_of(&config)?;
    let records = load_records(&spec)?;
    let (kept, stats) = encode_records(&spec, &tokenizer, &records)?;
    if let Some(first) = records.first() {
        let trace = trace_record(&spec, &tokenizer, first.clone())?;
        println!(
            "=== first record ({}:{}) ===",
            first.path.display(),
            first.line
        );
        println!("{}", serde_json::to_string_pretty(&first.value)?);
        println!("=== after the `{}` format ===", spec.format);
        println!("{}", serde_json::to_string_pretty(&trace.conversation)?);
        println!("=== after the template ===");
        println!("{}", serde_json::to_string_pretty(&trace.templated)?);
        println!("=== encoded ===");
        println!("input_ids: {:?}", trace.encoded.input_ids);
        println!("labels:    {:?}", trace.encoded.labels);
    }
    if spec.pack_to_max_length {
        let rows = pack(kept.into_iter().map(|k| k.sample), spec.max_length);
        println!(
            "=== packed: {} rows of {} tokens ===",
            rows.len(),
            spec.max_length
        );
    }
    println!(
        "OK: {} records; {} kept, {} empty after the format, {} with nothing to train, {} bad (skipped)",
        stats.records,
        stats.samples,
        stats.dropped_empty,
        stats.dropped_untrained,
        stats.bad_records
    );
    if stats.samples == 0 {
        bail!("no sample has a trained label: the data set is empty");
    }
    Ok(())
}

/// Prints the first rows of the processed (cached) data set.
pub fn log_dataset(args: &ConfigArgs, show: Show, num: usize) -> Result<()> {
    let config = load_config(args)?;
    if config.config.preference.is_some() {
        return crate::commands::preference::log_pairs(&config, show, num);
    }
    let spec = config.config.data_spec()?;
    let (dataset, _) = load_or_process(
        &spec,
        tokenizer_path(&config)?,
        &config.config.data.cache_dir,
    )?;
    let tokenizer = tokenizer_of(&config)?;
    let s = &dataset.stats;
    println!(
        "{} rows ({} samples from {} records, {} tokens, {} trained)",
        s.rows, s.samples, s.records, s.tokens, s.trained_tokens
    );
    for (i, row) in dataset.rows.iter().take(num).enumerate() {
        println!("=== row {i} ({} tokens) ===", row.len());
        if matches!(show, Show::Text | Show::All) {
            println!("[text]\n{}", decode(&tokenizer, &row.input_ids)?);
        }
        if matches!(show, Show::MaskedText | Show::All) {
            println!("[masked_text]\n{}", masked_text(&tokenizer, &row.labels)?);
        }
        if matches!(show, Show::InputIds | Show::All) {
            println!("[input_ids]\n{:?}", row.input_ids);
        }
        if matches!(show, Show::Labels | Show::All) {
            println!("[labels]\n{:?}", row.labels);
        }
    }
    Ok(())
}

/// `xtuner dataset encode`.
pub fn encode(
    tokenizer: &Path,
    format: &str,
    template: Option<&str>,
    max_length: usize,
    reward_token_id: Option<u32>,
    out: &Path,
    inputs: &[PathBuf],
) -> Result<()> {
    if let Ok(format) = format.parse::<PreferenceFormat>() {
        let options = PairOptions {
            max_length,
            reward_token_id,
        };
        return encode_pairs(tokenizer, format, template, options, out, inputs);
    }
    if reward_token_id.is_some() {
        bail!(
            "--reward-token-id is for preference data (formats {})",
            PreferenceFormat::names()
        );
    }
    let spec = plain_spec(inputs, format, template, max_length)?;
    spec.validate()?;
    let tokenizer = Tokenizer::from_path(tokenizer)?;
    let records = load_records(&spec)?;
    let (kept, stats) = encode_records(&spec, &tokenizer, &records)?;
    let mut writer = create(out)?;
    for k in &kept {
        serde_json::to_writer(&mut writer, &k.sample)?;
        writer.write_all(b"\n")?;
    }
    writer
        .flush()
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "{} records: {} written, {} dropped (empty conversation), {} dropped (nothing to train)",
        stats.records, stats.samples, stats.dropped_empty, stats.dropped_untrained
    );
    Ok(())
}

/// `xtuner dataset encode` for preference data: one `{"chosen_ids", "chosen_labels",
/// "rejected_ids", "rejected_labels"}` line per pair.
fn encode_pairs(
    tokenizer_path: &Path,
    format: PreferenceFormat,
    template: Option<&str>,
    options: PairOptions,
    out: &Path,
    inputs: &[PathBuf],
) -> Result<()> {
    if options.max_length == 0 {
        bail!("--max-length must be positive");
    }
    let template = jinja_template(tokenizer_path, template)?;
    let tokenizer = Tokenizer::from_path(tokenizer_path)?;
    let records = xtuner_dataset::reader::read_records(inputs)?;
    let pairs = encode_pair_records(&records, format, &template, &tokenizer, options)?;
    let mut writer = create(out)?;
    for pair in &pairs {
        serde_json::to_writer(&mut writer, pair)?;
        writer.write_all(b"\n")?;
    }
    writer
        .flush()
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("{} records: {} pairs written", records.len(), pairs.len());
    Ok(())
}

/// The data spec of the command-line tools: files in a format, with an optional
/// template, encoded sample by sample in input order (no packing, no shuffling).
pub fn plain_spec(
    inputs: &[PathBuf],
    format: &str,
    template: Option<&str>,
    max_length: usize,
) -> Result<DataSpec> {
    let format: DataFormat = format.parse()?;
    let chat_template = template == Some("chat_template");
    let template = template
        .filter(|_| !chat_template)
        .map(|t| t.parse::<PromptTemplate>().map(PromptTemplate::template))
        .transpose()?;
    Ok(DataSpec {
        files: inputs.to_vec(),
        format,
        columns: Default::default(),
        template,
        chat_template,
        max_length,
        pack_to_max_length: false,
        shuffle_before_pack: false,
        seed: 0,
        max_dataset_length: None,
        skip_bad_records: false,
    })
}

/// `xtuner dataset pack`.
pub fn pack_file(max_length: usize, varlen: bool, out: &Path, encoded: &Path) -> Result<()> {
    if max_length == 0 {
        bail!("--max-length must be at least 1");
    }
    let file = File::open(encoded).with_context(|| format!("opening {}", encoded.display()))?;
    let mut samples = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", encoded.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let sample: EncodedSample = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: expected {{\"input_ids\": [...], \"labels\": [...]}}",
                encoded.display(),
                i + 1
            )
        })?;
        if sample.input_ids.len() != sample.labels.len() {
            bail!(
                "{}:{}: input_ids and labels differ in length",
                encoded.display(),
                i + 1
            );
        }
        samples.push(sample);
    }
    let n_samples = samples.len();
    let rows = pack(samples, max_length);
    let mut writer = create(out)?;
    for row in &rows {
        serde_json::to_writer(&mut writer, &packed_json(row, varlen))?;
        writer.write_all(b"\n")?;
    }
    writer
        .flush()
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("{n_samples} samples packed into {} rows", rows.len());
    Ok(())
}

fn packed_json(row: &PackedRow, varlen: bool) -> serde_json::Value {
    if varlen {
        json!({
            "input_ids": row.input_ids,
            "labels": row.labels,
            "cumulative_len": row.cumulative_len,
            "position_ids": row.position_ids(),
        })
    } else {
        json!({ "input_ids": row.input_ids, "labels": row.labels })
    }
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(BufWriter::new(file))
}

/// `xtuner dataset build`: process (or load from the cache) and report.
pub fn build(
    args: &ConfigArgs,
    threads: Option<usize>,
    no_cache: bool,
    as_json: bool,
) -> Result<()> {
    let config = load_config(args)?;
    if config.config.preference.is_some() {
        return crate::commands::preference::build_pairs(&config, no_cache, as_json);
    }
    let spec = config.config.data_spec()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()?;
    let started = Instant::now();
    let (dataset, outcome) = pool.install(|| -> Result<_> {
        Ok(if no_cache {
            (process(&spec, &tokenizer_of(&config)?)?, None)
        } else {
            let (d, o) = load_or_process(
                &spec,
                tokenizer_path(&config)?,
                &config.config.data.cache_dir,
            )?;
            (d, Some(o))
        })
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let s = &dataset.stats;
    let (cache, cache_path) = match &outcome {
        None => ("off", None),
        Some(CacheOutcome::Hit(p)) => ("hit", Some(p)),
        Some(CacheOutcome::Built(p)) => ("built", Some(p)),
    };
    if as_json {
        let report = json!({
            "config": config.name,
            "threads": pool.current_num_threads(),
            "cache": cache,
            "seconds": seconds,
            "records": s.records,
            "samples": s.samples,
            "rows": s.rows,
            "tokens": s.tokens,
            "trained_tokens": s.trained_tokens,
            "dropped_empty": s.dropped_empty,
            "dropped_untrained": s.dropped_untrained,
            "bad_records": s.bad_records,
        });
        println!("{report}");
    } else {
        println!("config      {}", config.name);
        println!("records     {}", s.records);
        println!(
            "samples     {} kept ({} empty, {} nothing to train, {} bad)",
            s.samples, s.dropped_empty, s.dropped_untrained, s.bad_records
        );
        println!("tokens      {} ({} trained)", s.tokens, s.trained_tokens);
        let packing = if spec.pack_to_max_length {
            "packed"
        } else {
            "one sample each"
        };
        println!(
            "rows        {} ({packing}, max_length {})",
            s.rows, spec.max_length
        );
        match cache_path {
            Some(p) => println!("cache       {cache} ({})", p.display()),
            None => println!("cache       off"),
        }
        println!(
            "time        {seconds:.3} s on {} threads",
            pool.current_num_threads()
        );
    }
    Ok(())
}
