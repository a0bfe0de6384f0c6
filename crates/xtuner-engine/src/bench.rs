//! The training-step benchmark behind `xtuner bench` (and `cargo xtask bench train`):
//! a preset shape with random weights, random packed rows, and the same forward,
//! backward and optimizer step as `xtuner train`, timed after a warm-up.
//!
//! Model FLOPs per token follow PaLM (appendix B): `6N + 12·L·H·Q·T` for full
//! training, `4N + 12·L·H·Q·T` with a frozen base (LoRA, QLoRA: no weight gradients),
//! with `N` the matmul parameters (LM head included, embeddings excluded), `L` layers,
//! `H` heads, `Q` head size and `T` the sequence length.

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use xtuner_dataset::PackedRow;
use xtuner_dataset::collate::collate;
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::nn::linear::LinearLayers;

use crate::config::{LoraConfig, OptimizerConfig};
use crate::lora;
use crate::optim::adamw;
use crate::step::{forward_backward, optimizer_step};
use crate::{Error, Result};

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Every weight.
    Full,
    /// LoRA on every linear layer; the base frozen.
    Lora,
    /// LoRA on an NF4 base (double-quantized, block 64).
    Qlora,
}

/// One benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    /// A [`DecoderConfig::preset`] name.
    pub preset: String,
    /// Vocabulary size (InternLM2: 92,544).
    pub vocab_size: usize,
    /// Tokens per packed row.
    pub seq_len: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// Full, LoRA or QLoRA.
    pub mode: BenchMode,
    /// LoRA rank (alpha = rank / 4, as XTuner's 1.8B recipes: r 64, alpha 16).
    pub lora_r: usize,
    /// Untimed steps first (kernel compilation, autotuning, allocator growth).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Recompute each decoder layer in backward (activation checkpointing).
    pub checkpointing: bool,
}

/// What one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The run.
    pub bench: StepBench,
    /// Matmul parameters `N`.
    pub matmul_params: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// The model's resident state before activations: trainable parameters with their
    /// gradients and AdamW moments, frozen weights, NF4 weights (see [`crate::memory`]).
    pub model_state_bytes: usize,
    /// Model FLOPs per token (PaLM).
    pub flops_per_token: f64,
    /// Seconds per step: mean over the timed steps.
    pub step_s: f64,
    /// Tokens per second over the timed steps.
    pub tokens_per_s: f64,
    /// Model FLOP/s in TFLOP/s.
    pub tflops: f64,
    /// Loss of every step, warm-up included (it should fall a little: the step trains).
    pub losses: Vec<f64>,
    /// Seconds to build the model (and quantize it, for QLoRA).
    pub setup_s: f64,
    /// Matrix products per timed step that ran on cuBLAS (0 on the CPU, or when a CUDA
    /// build fell back to Burn's matmul).
    pub cublas_gemms_per_step: f64,
}

/// Model FLOPs per token (PaLM): `6N` (`4N` with a frozen base) plus attention.
pub fn flops_per_token(decoder: &DecoderConfig, seq_len: usize, frozen_base: bool) -> f64 {
    let n = decoder.matmul_params() as f64;
    let weights = if frozen_base { 4.0 } else { 6.0 } * n;
    let attention = 12.0 * (decoder.n_layers * decoder.n_heads * decoder.head_dim * seq_len) as f64;
    weights + attention
}

/// The trainable parameters and the frozen bytes (bf16 base, or NF4 for QLoRA) a
/// run of `bench`'s shape holds, counted from the shape alone (nothing is built): what
/// [`crate::memory::zero_stages`] spreads over the ranks.
///
/// # Errors
/// An unknown preset.
pub fn planned_state(bench: &StepBench) -> Result<(usize, usize)> {
    let c = preset(bench)?;
    let (h, k, d, hidden, inter) = (
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.hidden_size,
        c.intermediate_size,
    );
    // Per layer: wqkv, wo, w1, w3, w2 (each a LoRA module of InternLM2); the head.
    let per_layer = [
        (hidden, (h + 2 * k) * d),
        (h * d, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ];
    let head = (!c.tie_word_embeddings).then_some((hidden, c.vocab_size));
    let modules: Vec<(usize, usize)> = (0..c.n_layers)
        .flat_map(|_| per_layer)
        .chain(head)
        .collect();
    let linear: usize = modules.iter().map(|(i, o)| i * o).sum();
    let other = c.vocab_size * hidden + (2 * c.n_layers + 1) * hidden;
    let adapters: usize = modules.iter().map(|(i, o)| bench.lora_r * (i + o)).sum();
    Ok(match bench.mode {
        BenchMode::Full => (linear + other, 0),
        BenchMode::Lora => (adapters, 2 * (linear + other)),
        // 4-bit codes, an 8-bit absmax per 64 weights and an f32 one per 256 of those.
        BenchMode::Qlora => (
            adapters,
            linear / 2 + linear / 64 + linear / 4096 + 2 * other,
        ),
    })
}

/// The decoder shape of `bench`'s preset.
fn preset(bench: &StepBench) -> Result<DecoderConfig> {
    DecoderConfig::preset(&bench.preset, bench.vocab_size).ok_or_else(|| {
        Error::setting(
            "--preset",
            format!(
                "unknown preset `{}`; known: {}",
                bench.preset,
                DecoderConfig::PRESETS.join(", ")
            ),
        )
    })
}

/// Waits for the device's queued work, so the clock sees it.
fn sync<B: AutodiffBackend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| Error::Device(format!("{e:?}")))
}

/// Builds the model of `bench`, trains it for `warmup + steps` steps on random rows and
/// times the last `steps`.
///
/// # Errors
/// An unknown preset; a quantizer that refuses the shape.
pub fn run<B: AutodiffBackend>(bench: &StepBench, device: &B::Device) -> Result<StepReport> {
    let decoder = preset(bench)?;
    let setup = Instant::now();
    B::seed(device, 0);
    let mut model = Decoder::<B>::random(&decoder, device)?;
    if bench.mode == BenchMode::Qlora {
        model = lora::quantize_base(model, &decoder, 64, true)?;
    }
    if bench.mode != BenchMode::Full {
        let config = LoraConfig {
            r: bench.lora_r,
            alpha: bench.lora_r as f64 / 4.0,
            dropout: 0.0,
            target_modules: Vec::new(),
        };
        model = lora::attach(model, &decoder, &config, 0, device)?;
    }
    // As a training run: trainable parameters (and so AdamW's moments) in f32.
    let mut model = crate::optim::master_weights(model, crate::optim::MASTER_DTYPE);
    let memory = crate::memory::ModelMemory::of(&model, model.nf4_bytes(&decoder));
    sync::<B>(device)?;
    let setup_s = setup.elapsed().as_secs_f64();

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<PackedRow> = (0..bench.batch_size)
        .map(|_| {
            let ids: Vec<i64> = (0..bench.seq_len)
                .map(|_| rng.random_range(0..bench.vocab_size as i64))
                .collect();
            PackedRow {
                labels: ids.clone(),
                input_ids: ids,
                cumulative_len: vec![0, bench.seq_len],
            }
        })
        .collect();
    let batch = collate(&rows.iter().collect::<Vec<_>>(), false);

    let mut optimizer = adamw(&OptimizerConfig::default()).init::<B, Decoder<B>>();
    let mut losses = Vec::with_capacity(bench.warmup + bench.steps);
    let mut timed = None;
    let mut gemms_before = 0;
    for step in 0..bench.warmup + bench.steps {
        if step == bench.warmup {
            sync::<B>(device)?;
            timed = Some(Instant::now());
            gemms_before = xtuner_model::nn::gemm::cublas_products();
        }
        let (loss, grads) = forward_backward(&model, &batch, 1, bench.checkpointing, device);
        losses.push(loss);
        (model, _) = optimizer_step(model, &mut optimizer, grads, 1e-5, 1.0);
    }
    sync::<B>(device)?;
    let elapsed = timed.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let step_s = elapsed / bench.steps.max(1) as f64;
    let tokens = (bench.batch_size * bench.seq_len) as f64;
    let flops = flops_per_token(&decoder, bench.seq_len, bench.mode != BenchMode::Full);
    let tokens_per_s = if step_s > 0.0 { tokens / step_s } else { 0.0 };
    Ok(StepReport {
        bench: bench.clone(),
        matmul_params: decoder.matmul_params(),
        trainable_params: memory.trainable_params,
        model_state_bytes: memory.total_bytes(),
        flops_per_token: flops,
        step_s,
        tokens_per_s,
        tflops: tokens_per_s * flops / 1e12,
        losses,
        setup_s,
        cublas_gemms_per_step: (xtuner_model::nn::gemm::cublas_products() - gemms_before) as f64
            / bench.steps.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

    #[test]
    fn palm_flops_of_the_1_8b_shape() {
        let d = DecoderConfig::preset("internlm2-1.8b", 92_544).unwrap();
        // 24 × (2048·(16+16)·128 + 16·128·2048 + 3·2048·8192) + 2048·92544
        assert_eq!(
            d.matmul_params(),
            24 * (2048 * 32 * 128 + 16 * 128 * 2048 + 3 * 2048 * 8192) + 2048 * 92_544
        );
        let full = flops_per_token(&d, 2048, false);
        let lora = flops_per_token(&d, 2048, true);
        assert!((full - lora - 2.0 * d.matmul_params() as f64).abs() < 1.0);
        assert_eq!(
            full,
            6.0 * d.matmul_params() as f64 + 12.0 * (24 * 16 * 128 * 2048) as f64
        );
    }

    #[test]
    fn every_mode_trains_on_the_cpu() {
        for mode in [BenchMode::Full, BenchMode::Lora, BenchMode::Qlora] {
            let bench = StepBench {
                preset: "internlm2-tiny".into(),
                vocab_size: 300,
                seq_len: 64,
                batch_size: 2,
                mode,
                lora_r: 8,
                warmup: 1,
                steps: 3,
                checkpointing: mode != BenchMode::Full,
            };
            let report = run::<B>(&bench, &Default::default()).unwrap();
            assert_eq!(report.losses.len(), 4);
            assert!(report.losses.iter().all(|l| l.is_finite()));
            assert!(report.tokens_per_s > 0.0 && report.tflops > 0.0);
            assert_eq!(report.cublas_gemms_per_step, 0.0);
            match mode {
                BenchMode::Full => assert!(report.trainable_params > report.matmul_params),
                _ => assert!(
                    report.trainable_params < report.matmul_params / 4,
                    "{}",
                    report.trainable_params
                ),
            }
        }
    }
}
