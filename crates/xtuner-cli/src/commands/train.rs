//! `xtuner train`, `xtuner convert pth_to_hf|merge` and `xtuner eval`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use xtuner_dataset::Tokenizer;
use xtuner_engine::export::write_toml;
use xtuner_engine::memory::ModelMemory;
use xtuner_engine::{LoadedConfig, Progress, Resume, TrainEvent, train};
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::checkpoint::{SaveDtype, parse_size};
use xtuner_model::decoder::Decoder;

use crate::backend::{self, Device};
use crate::configs;
use crate::launch::Launch;

/// Draws a progress bar on a terminal, plain lines otherwise.
struct CliProgress {
    bar: Option<ProgressBar>,
    /// Where the loss curve is drawn at each checkpoint.
    work_dir: PathBuf,
}

impl Progress for CliProgress {
    fn event(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::Started {
                total_iters,
                start_iter,
                rows,
                memory,
            } => {
                eprintln!(
                    "{rows} training rows, {total_iters} iterations, {} trainable parameters",
                    memory.trainable_params
                );
                eprintln!("{}", model_state_line(memory));
                if *start_iter > 0 {
                    eprintln!("resuming at iteration {start_iter}");
                }
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new(*total_iters as u64);
                    bar.set_position(*start_iter as u64);
                    bar.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    self.bar = Some(bar);
                }
            }
            TrainEvent::Step(s) => {
                let mut line = format!(
                    "iter {}/{} epoch {} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s eta {:.0}s",
                    s.iter,
                    s.total_iters,
                    s.epoch,
                    s.loss,
                    s.lr,
                    s.grad_norm,
                    s.tokens_per_s,
                    s.eta_s
                );
                if let Some(mib) = s.memory_mib {
                    line.push_str(&format!(" memory {mib:.0} MiB"));
                }
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(s.iter as u64);
                        bar.set_message(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
            TrainEvent::Eval { iter, answers } => {
                for (prompt, answer) in answers {
                    self.println(&format!("[eval @ {iter}] {prompt} -> {answer}"));
                }
            }
            TrainEvent::Saved { iter, path } => {
                self.println(&format!("saved iteration {iter} to {}", path.display()));
                // The picture is a view of the log: a failure to draw it (a full disk
                // the next checkpoint reports anyway) does not stop the run.
                if let Err(e) = crate::plot::loss_curve(&self.work_dir) {
                    self.println(&format!("warning: no loss curve: {e:#}"));
                }
            }
        }
    }
}

/// The model's resident state, as the start of a run reports it: what must fit on the
/// device before activations.
fn model_state_line(m: &ModelMemory) -> String {
    let mut line = if m.zero.stage == 0 {
        format!(
            "model state {}: trainable {} + gradients {} + AdamW moments {}, frozen {}",
            size(m.total_bytes()),
            size(m.trainable_bytes),
            size(m.gradient_bytes()),
            size(m.optimizer_bytes()),
            size(m.frozen_bytes),
        )
    } else {
        let ranks = m.ranks.max(1);
        let grads = if m.zero.stage >= 2 {
            format!("gradients 1/{ranks} {}", size(m.gradient_bytes()))
        } else {
            format!("gradients {}", size(m.gradient_bytes()))
        };
        let place = if m.zero.offload_optimizer {
            " in host memory"
        } else {
            ""
        };
        format!(
            "model state per rank (ZeRO-{}) {}: trainable {} + {grads} + f32 masters and AdamW moments 1/{ranks} {}{place}, frozen {}",
            m.zero.stage,
            size(m.total_bytes()),
            size(m.trainable_bytes),
            size(m.optimizer_bytes()),
            size(m.frozen_bytes),
        )
    };
    if m.nf4_bytes > 0 {
        line.push_str(&format!(", NF4 {}", size(m.nf4_bytes)));
    }
    line.push_str(" (activations come on top)");
    line
}

/// `bytes` in the largest binary unit that keeps a leading digit (`1.5 GiB`, `380 KiB`).
fn size(bytes: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", units[unit])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

impl CliProgress {
    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// `xtuner train CONFIG`.
pub fn run_train(
    config: &str,
    overrides: &[String],
    work_dir: Option<PathBuf>,
    resume: Option<String>,
    device: Device,
) -> Result<()> {
    backend::check(device)?;
    let launch = crate::launch::from_env(|key| std::env::var(key).ok(), device)?;
    if let Launch::Spawn(node) = &launch {
        return crate::launch::spawn(node);
    }
    let loaded = configs::load(config, overrides)?;
    let work_dir = work_dir.unwrap_or_else(|| loaded.work_dir());
    let resume = resume.map(|r| {
        if r == "auto" {
            Resume::Auto
        } else {
            Resume::Path(PathBuf::from(r))
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C: finish the current step, save a checkpoint, exit.
        let handler = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: saving a checkpoint (Ctrl-C again to quit at once)");
        });
        if let Err(e) = handler {
            eprintln!("warning: Ctrl-C will not save a checkpoint ({e})");
        }
    }
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating the work dir {}", work_dir.display()))?;
    let lead = !matches!(&launch, Launch::Rank(r) if r.rank != 0);
    if lead {
        let resolved = work_dir.join(format!("{}.toml", loaded.name));
        write_toml(&resolved, &loaded.config)?;
    }
    match device {
        Device::Cpu => {
            let device = Default::default();
            train_on::<Autodiff<backend::Cpu>>(
                &loaded,
                &work_dir,
                resume,
                &stop,
                &launch,
                device,
                Device::Cpu,
            )
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => backend::on_cuda(|| {
            // One process per GPU: LOCAL_RANK picks this rank's.
            let local_rank = match &launch {
                Launch::Rank(r) => r.local_rank,
                _ => 0,
            };
            let device = burn::backend::cuda::CudaDevice::new(local_rank);
            train_on::<Autodiff<backend::Cuda>>(
                &loaded,
                &work_dir,
                resume,
                &stop,
                &launch,
                device,
                Device::Cuda,
            )
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => unreachable!("checked by backend::check"),
    }
}

/// The run as `launch` says: one rank; ranks as threads of this process (rank 0
/// reports, the others train silently; the first error of any rank is the run's); or
/// one rank of a group meeting over TCP (and NCCL between GPUs, `device_kind`). Returns
/// rank 0's summary, `None` elsewhere.
#[allow(clippy::too_many_arguments)]
fn train_ranks<B: AutodiffBackend>(
    loaded: &LoadedConfig,
    work_dir: &Path,
    resume: Option<Resume>,
    device: &B::Device,
    progress: &mut CliProgress,
    stop: &AtomicBool,
    launch: &Launch,
    device_kind: Device,
) -> Result<Option<xtuner_engine::TrainSummary>> {
    use xtuner_engine::collective::{Collective, Single, local::Local};
    let world = match launch {
        Launch::Single | Launch::Spawn(_) => {
            let summary = train::<B>(loaded, work_dir, resume, device, progress, stop, &Single)?;
            return Ok(Some(summary));
        }
        Launch::Rank(r) => {
            let group = crate::launch::rank_group(r, device_kind)?;
            let group = group.as_ref();
            if r.rank == 0 {
                let summary = train::<B>(loaded, work_dir, resume, device, progress, stop, group)?;
                return Ok(Some(summary));
            }
            let mut quiet = Quiet { rank: r.rank };
            train::<B>(loaded, work_dir, resume, device, &mut quiet, stop, group)?;
            return Ok(None);
        }
        Launch::Threads(world) => *world,
    };
    let mut ranks = Local::group_with_timeout(world, crate::launch::timeout()?).into_iter();
    let Some(lead) = ranks.next() else {
        return Err(anyhow::anyhow!("a group of {world} ranks has no rank 0"));
    };
    std::thread::scope(|s| {
        let others: Vec<_> = ranks
            .map(|rank| {
                let resume = resume.clone();
                s.spawn(move || {
                    let device = B::Device::default();
                    let mut quiet = Quiet { rank: rank.rank() };
                    train::<B>(loaded, work_dir, resume, &device, &mut quiet, stop, &rank)
                })
            })
            .collect();
        let summary = train::<B>(loaded, work_dir, resume, device, progress, stop, &lead);
        let mut first_error = summary.as_ref().err().map(ToString::to_string);
        for (i, handle) in others.into_iter().enumerate() {
            let outcome = handle
                .join()
                .map_err(|_| format!("rank {} panicked", i + 1))
                .and_then(|r| r.map(|_| ()).map_err(|e| format!("rank {}: {e}", i + 1)));
            if let (Err(e), None) = (outcome, &first_error) {
                first_error = Some(e);
            }
        }
        match (summary, first_error) {
            (Ok(summary), None) => Ok(Some(summary)),
            (Err(e), _) => Err(e.into()),
            (Ok(_), Some(e)) => Err(anyhow::anyhow!(e)),
        }
    })
}

/// The progress of a rank other than 0: the model state it holds, nothing after.
struct Quiet {
    rank: usize,
}

impl xtuner_engine::Progress for Quiet {
    fn event(&mut self, event: &xtuner_engine::TrainEvent) {
        if let TrainEvent::Started { memory, .. } = event {
            eprintln!("rank {}: {}", self.rank, model_state_line(memory));
        }
    }
}

fn train_on<B: AutodiffBackend>(
    loaded: &LoadedConfig,
    work_dir: &Path,
    resume: Option<Resume>,
    stop: &AtomicBool,
    launch: &Launch,
    device: B::Device,
    device_kind: Device,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut progress = CliProgress {
        bar: None,
        work_dir: work_dir.to_path_buf(),
    };
    let Some(summary) = train_ranks::<B>(
        loaded,
        work_dir,
        resume,
        &device,
        &mut progress,
        stop,
        launch,
        device_kind,
    )?
    else {
        return Ok(());
    };
    if let Some(bar) = &progress.bar {
        bar.finish();
    }
    if let Some(png) = crate::plot::loss_curve(work_dir)? {
        eprintln!("loss curve: {}", png.display());
    }
    println!(
        "{} after {} iterations in {:.1} s; loss {} -> {}; last checkpoint: {}",
        if summary.interrupted {
            "stopped"
        } else {
            "finished"
        },
        summary.iters,
        started.elapsed().as_secs_f64(),
        summary.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary
            .last_checkpoint
            .map_or("none".into(), |p| p.display().to_string()),
    );
    Ok(())
}

/// `xtuner convert pth_to_hf CONFIG CHECKPOINT OUT_DIR`: a checkpoint's weights in
/// Hugging Face formats (PEFT adapter for LoRA, a full model dir otherwise, XTuner's
/// layout for LLaVA), 16-bit unless `--fp32`.
pub fn pth_to_hf(
    config: &str,
    overrides: &[String],
    checkpoint: &Path,
    out: &Path,
    fp32: bool,
    max_shard_size: &str,
    format: xtuner_engine::convert::SaveFormat,
) -> Result<()> {
    let loaded = configs::load(config, overrides)?;
    let dtype = if fp32 { SaveDtype::F32 } else { SaveDtype::F16 };
    xtuner_engine::convert::pth_to_hf::<backend::Cpu>(
        &loaded,
        checkpoint,
        out,
        dtype,
        parse_size(max_shard_size)?,
        format,
        &Default::default(),
    )?;
    println!("saved to {}", out.display());
    Ok(())
}

/// `xtuner convert merge BASE ADAPTER OUT`: the base model with the adapter merged in.
pub fn merge(
    base: &Path,
    adapter: &Path,
    out: &Path,
    max_shard_size: &str,
    fp32: bool,
) -> Result<()> {
    let dtype = if fp32 { SaveDtype::F32 } else { SaveDtype::F16 };
    xtuner_engine::convert::merge::<backend::Cpu>(
        base,
        adapter,
        out,
        dtype,
        parse_size(max_shard_size)?,
        &Default::default(),
    )?;
    println!("saved to {}", out.display());
    Ok(())
}

/// `xtuner eval MODEL_DIR --data FILE --template NAME`: mean loss and perplexity.
/// Pre-tokenized data (`--format tokenized`) needs no tokenizer beside the model.
pub fn eval(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &[PathBuf],
    format: &str,
    template: Option<&str>,
    max_length: usize,
) -> Result<()> {
    if let Ok(format) = format.parse::<xtuner_dataset::preference::PreferenceFormat>() {
        return crate::commands::preference::eval_pairs(
            model_dir, adapter, data, format, template, max_length,
        );
    }
    type B = backend::Cpu;
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    let adapter = adapter.map(PeftAdapter::open).transpose()?;
    let (model, _) = Decoder::<B>::load(model_dir, adapter.as_ref(), &device)?;
    let spec = crate::commands::data::plain_spec(data, format, template, max_length)?;
    let tokenizer = match spec.format {
        xtuner_dataset::format::DataFormat::Tokenized => None,
        _ => Some(Tokenizer::from_path(model_dir)?),
    };
    let dataset = xtuner_dataset::pipeline::process(&spec, tokenizer.as_ref())?;
    let (mut sum, mut tokens) = (0f64, 0usize);
    for row in &dataset.rows {
        let batch = xtuner_dataset::collate::collate(&[row], false);
        let (ids, input) = xtuner_engine::step::batch_tensors::<B>(&batch, &device);
        let loss =
            xtuner_engine::loss::causal_lm_loss(model.forward(ids, &input, None), &batch.labels);
        sum += xtuner_model::nn::precision::scalar(loss.sum);
        tokens += loss.tokens;
    }
    let mean = sum / tokens.max(1) as f64;
    println!(
        "{} samples, {tokens} trained tokens: loss {mean:.4}, perplexity {:.3}",
        dataset.rows.len(),
        mean.exp()
    );
    Ok(())
}

/// `xtuner bench --dry-run`: the model state per rank of each way to shard it.
pub fn bench_dry_run(bench: &xtuner_engine::bench::StepBench, ranks: usize) -> Result<()> {
    let (trainable, frozen) = xtuner_engine::bench::planned_state(bench)?;
    println!(
        "{} {:?}, {trainable} trainable parameters, {ranks} ranks: model state per rank (before activations)",
        bench.preset, bench.mode
    );
    for (stage, bytes) in xtuner_engine::memory::zero_stages(trainable, frozen, ranks) {
        let note = match stage {
            "data parallel" => "  (xtuner train)",
            "ZeRO-1" => "  (--deepspeed deepspeed_zero1)",
            "ZeRO-2" => "  (--deepspeed deepspeed_zero2; ours keeps the gradient shard in f32)",
            _ => "  (not built: runs as ZeRO-2)",
        };
        println!("  {stage:<14} {:>10}{note}", size(bytes));
    }
    Ok(())
}

/// `xtuner bench`: one JSON line with the step benchmark's report.
pub fn bench(bench: &xtuner_engine::bench::StepBench, device: Device) -> Result<()> {
    backend::check(device)?;
    let report = match device {
        Device::Cpu => {
            xtuner_engine::bench::run::<Autodiff<backend::Cpu>>(bench, &Default::default())?
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => backend::on_cuda(|| {
            Ok(xtuner_engine::bench::run::<Autodiff<backend::Cuda>>(
                bench,
                &Default::default(),
            )?)
        })?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => unreachable!("checked by backend::check"),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(380 * 1024 * 1024), "380 MiB");
        assert_eq!(size(6 * 1024 * 1024 * 1024 + 512 * 1024 * 1024), "6.5 GiB");
    }
}
