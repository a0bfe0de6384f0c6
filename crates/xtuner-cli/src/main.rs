//! The `xtuner` binary: parses the command line, installs logging, runs a command and
//! maps failures to exit codes (0 ok, 1 the run failed, 2 bad usage or config).

mod args;
mod backend;
mod commands;
mod configs;
mod launch;
mod plot;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, ConvertCommand, DatasetCommand};

/// mimalloc instead of the system allocator: tokenization and CPU training allocate
/// many short-lived buffers (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the 16th of its options, in v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory mapped rather than handing it back to the OS 10 ms later: a
    // training step frees and reallocates its activations every time, and memory
    // handed back comes again as fresh pages the kernel must zero (a fifth of a CPU
    // step's time). The peak is the same; the memory stays resident at it.
    // SAFETY: setting an option has no preconditions.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // No transparent huge pages for this process: mimalloc asks for them on its
    // arenas, and the kernel then compacts memory and clears 2 MiB at a first touch;
    // a CPU step spent up to a third of its time there (see docs/BENCHMARKS.md).
    // (mimalloc's own `allow_thp` option is read when it starts, before `main`.)
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this flag.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ListCfg { pattern } => commands::cfg::list_cfg(pattern.as_deref()),
        Command::CopyCfg { name, dir } => commands::cfg::copy_cfg(&name, &dir)?,
        Command::ListDatasetFormat => commands::cfg::list_dataset_format(),
        Command::CheckCustomDataset(config) => commands::data::check_custom_dataset(&config)?,
        Command::LogDataset { config, show, num } => {
            commands::data::log_dataset(&config, show, num)?
        }
        Command::Dataset(DatasetCommand::Encode {
            tokenizer,
            format,
            template,
            max_length,
            reward_token_id,
            out,
            inputs,
        }) => commands::data::encode(
            &tokenizer,
            &format,
            template.as_deref(),
            max_length,
            reward_token_id,
            &out,
            &inputs,
        )?,
        Command::Dataset(DatasetCommand::Pack {
            max_length,
            varlen,
            out,
            encoded,
        }) => commands::data::pack_file(max_length, varlen, &out, &encoded)?,
        Command::Dataset(DatasetCommand::Build {
            config,
            threads,
            no_cache,
            json,
        }) => commands::data::build(&config, threads, no_cache, json)?,
        Command::Train {
            config,
            work_dir,
            resume,
            device,
            deepspeed,
        } => {
            let mut overrides = config.cfg_options.clone();
            if let Some(setting) = deepspeed {
                let (zero, note) = launch::zero_overrides(&setting)?;
                if let Some(note) = note {
                    eprintln!("{note}");
                }
                overrides.extend(zero);
            }
            commands::train::run_train(&config.config, &overrides, work_dir, resume, device)?
        }
        Command::CollectiveCheck { device, len } => commands::collective::check(device, len)?,
        Command::Bench {
            preset,
            vocab_size,
            seq_len,
            batch_size,
            mode,
            lora_r,
            warmup,
            steps,
            checkpointing,
            device,
            dry_run,
            nproc,
        } => {
            use xtuner_engine::bench::{BenchMode, StepBench};
            let mode = match mode {
                args::BenchModeArg::Full => BenchMode::Full,
                args::BenchModeArg::Lora => BenchMode::Lora,
                args::BenchModeArg::Qlora => BenchMode::Qlora,
            };
            let bench = StepBench {
                preset,
                vocab_size,
                seq_len,
                batch_size,
                mode,
                lora_r,
                warmup,
                steps,
                checkpointing,
            };
            if dry_run {
                commands::train::bench_dry_run(&bench, nproc)?
            } else {
                commands::train::bench(&bench, device)?
            }
        }
        Command::Convert(ConvertCommand::PthToHf {
            config,
            checkpoint,
            out,
            fp32,
            max_shard_size,
            save_format,
            cfg_options,
        }) => commands::train::pth_to_hf(
            &config,
            &cfg_options,
            &checkpoint,
            &out,
            fp32,
            &max_shard_size,
            save_format.into(),
        )?,
        Command::Convert(ConvertCommand::Merge {
            base,
            adapter,
            out,
            max_shard_size,
            fp32,
        }) => commands::train::merge(&base, &adapter, &out, &max_shard_size, fp32)?,
        Command::Eval {
            model,
            adapter,
            data,
            format,
            template,
            max_length,
        } => commands::train::eval(
            &model,
            adapter.as_deref(),
            &data,
            &format,
            template.as_deref(),
            max_length,
        )?,
        Command::Plot { work_dirs, out } => {
            let out = out.unwrap_or_else(|| match work_dirs.as_slice() {
                [one] => one.join("loss_curve.png"),
                _ => "loss_curves.png".into(),
            });
            plot::plot(&work_dirs, &out)?;
            println!("{}", out.display());
        }
        Command::Chat(c) => commands::chat::chat(&commands::chat::ChatArgs {
            model: c.model,
            adapter: c.adapter,
            prompt_template: c.prompt_template,
            system: c.system,
            system_template: c.system_template,
            stop_words: c.stop_words,
            max_new_tokens: c.max_new_tokens,
            sampling: xtuner_model::sampling::SamplingConfig {
                temperature: c.temperature,
                top_k: c.top_k,
                top_p: c.top_p,
                repetition_penalty: c.repetition_penalty,
                seed: c.seed,
            },
            no_streamer: c.no_streamer,
            prompt: c.prompt,
            device: c.device,
            bot_name: c.bot_name,
            llava: c.llava,
            visual_encoder: c.visual_encoder,
            visual_select_layer: c.visual_select_layer,
            image: c.image,
        })?,
        Command::Reward {
            model,
            prompt,
            answer,
            system,
            reward_token_id,
            template,
        } => commands::preference::reward(
            &model,
            &prompt,
            &answer,
            system.as_deref(),
            reward_token_id,
            template.as_deref(),
        )?,
        Command::Tokenize {
            tokenizer,
            json,
            text,
        } => commands::tokenize::tokenize(&tokenizer, &text.join(" "), json)?,
    }
    Ok(())
}

/// The error and its causes, joined by ": ", leaving out a cause whose text the
/// message before it already includes (our errors name their cause in their message).
fn error_chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// 2 for mistakes in what the user asked for (config, names, settings), 1 otherwise:
/// each library's error says which of its kinds are usage mistakes.
fn exit_code(error: &anyhow::Error) -> u8 {
    let usage = error.chain().any(|cause| {
        cause
            .downcast_ref::<xtuner_engine::Error>()
            .is_some_and(xtuner_engine::Error::is_usage)
            || cause
                .downcast_ref::<xtuner_template::Error>()
                .is_some_and(xtuner_template::Error::is_usage)
            || cause
                .downcast_ref::<xtuner_dataset::Error>()
                .is_some_and(xtuner_dataset::Error::is_usage)
    });
    if usage { 2 } else { 1 }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::exit_code;
    use xtuner_engine::LoadedConfig;

    /// A config mistake (an unknown key) is a usage error: exit 2.
    #[test]
    fn an_unknown_key_exits_2() {
        let err = LoadedConfig::from_text(
            "[model]\npreset = \"internlm2-tiny\"\nsurprise = 1\n",
            Path::new("run.toml"),
            "run",
            &[],
        )
        .unwrap_err();
        assert_eq!(exit_code(&anyhow::Error::from(err)), 2);
    }

    /// A failure of the run itself (a checkpoint's optimizer state that cannot be
    /// written: `run`'s tests in xtuner-engine show the loop reports it as this
    /// variant) is not the user's mistake: exit 1, even inside the CLI's context.
    #[test]
    fn a_failing_optimizer_state_write_exits_1() {
        let err = xtuner_engine::Error::Checkpoint {
            path: "work_dirs/run/iter_4/optimizer.bin".into(),
            message: "saving the optimizer state: Is a directory".into(),
        };
        let err = anyhow::Error::from(err).context("training");
        assert_eq!(exit_code(&err), 1);
    }
}
