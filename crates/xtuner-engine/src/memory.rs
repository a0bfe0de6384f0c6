//! The device memory a run's model state takes, counted from the model itself before the
//! first step: the question "does it fit my card?" answered up front, minus activations.
//!
//! Trainable parameters are counted in the dtype they are stored in (f32 masters on a
//! bf16 backend), each with a gradient of the same dtype and AdamW's two moments; frozen
//! weights in theirs; QLoRA's NF4 base by its packed codes and absmax.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::Serialize;

/// A model's resident state, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModelMemory {
    /// Trainable parameters.
    pub trainable_params: usize,
    /// The trainable parameters' values.
    pub trainable_bytes: usize,
    /// Frozen float weights (a LoRA run's base, a frozen vision tower, embeddings).
    pub frozen_bytes: usize,
    /// NF4 weights (codes, absmax and levels).
    pub nf4_bytes: usize,
    /// How the optimizer state is partitioned (stage 0: not at all).
    pub zero: crate::config::ZeroConfig,
    /// The data-parallel ranks it is partitioned over (0 or 1: one).
    pub ranks: usize,
}

impl ModelMemory {
    /// Counts `model`'s parameters; `nf4_bytes` are its NF4 weights, which Burn's module
    /// visitors do not see ([`xtuner_model::nn::linear::LinearLayers::nf4_bytes`]).
    pub fn of<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, nf4_bytes: usize) -> Self {
        struct Count(ModelMemory);
        impl<B: Backend> ModuleVisitor<B> for Count {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let n = param.shape().num_elements();
                let bytes = n * param.val().dtype().size();
                if param.is_require_grad() {
                    self.0.trainable_params += n;
                    self.0.trainable_bytes += bytes;
                } else {
                    self.0.frozen_bytes += bytes;
                }
            }
        }
        let mut count = Count(ModelMemory {
            nf4_bytes,
            ..Self::default()
        });
        model.visit(&mut count);
        count.0
    }

    /// The same state held by one of `ranks` ranks partitioning it as `zero` says.
    pub fn partitioned(self, zero: crate::config::ZeroConfig, ranks: usize) -> Self {
        Self {
            zero,
            ranks,
            ..self
        }
    }

    /// One gradient per trainable parameter, in its dtype; with ZeRO-2 this rank's f32
    /// shard of them.
    pub fn gradient_bytes(&self) -> usize {
        if self.zero.stage >= 2 {
            (4 * self.trainable_params).div_ceil(self.ranks.max(1))
        } else {
            self.trainable_bytes
        }
    }

    /// AdamW's first and second moments, in the parameters' dtype; with ZeRO this
    /// rank's shard of the f32 masters and both moments.
    pub fn optimizer_bytes(&self) -> usize {
        if self.zero.stage >= 1 {
            (12 * self.trainable_params).div_ceil(self.ranks.max(1))
        } else {
            2 * self.trainable_bytes
        }
    }

    /// Everything above that lives on the device: what stays resident through a step,
    /// before activations (an offloaded optimizer shard lives in host memory).
    pub fn total_bytes(&self) -> usize {
        let optimizer = if self.zero.offload_optimizer {
            0
        } else {
            self.optimizer_bytes()
        };
        self.trainable_bytes
            + self.gradient_bytes()
            + optimizer
            + self.frozen_bytes
            + self.nf4_bytes
    }
}

/// Model-state bytes per rank when `trainable` parameters train over `ranks` ranks, by
/// how the state is sharded: DeepSpeed's arithmetic for mixed precision (each trainable
/// parameter: 2 bytes of half-precision weight, 2 of gradient, 12 of f32 master and
/// AdamW moments), plus `frozen_bytes` of weights that do not train (sharded only by
/// ZeRO-3). `xtuner train` runs data parallel, ZeRO-1 and ZeRO-2 (whose gradient shard
/// it keeps in f32: 2 bytes more per parameter over N, see [`ModelMemory`]); ZeRO-3 is
/// not built.
pub fn zero_stages(
    trainable: usize,
    frozen_bytes: usize,
    ranks: usize,
) -> [(&'static str, usize); 4] {
    let (p, n) = (trainable, ranks.max(1));
    [
        ("data parallel", frozen_bytes + 16 * p),
        ("ZeRO-1", frozen_bytes + 4 * p + (12 * p).div_ceil(n)),
        ("ZeRO-2", frozen_bytes + 2 * p + (14 * p).div_ceil(n)),
        ("ZeRO-3", frozen_bytes.div_ceil(n) + (16 * p).div_ceil(n)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoraConfig;
    use crate::lora;
    use burn::backend::{Autodiff, NdArray};
    use xtuner_model::decoder::{Decoder, DecoderConfig};
    use xtuner_model::nn::linear::LinearLayers;

    type B = Autodiff<NdArray<f32>>;

    /// The counts follow from the shapes: LoRA r on every linear layer, everything else
    /// frozen; QLoRA moves the decoder layers' weights (not the head's) to 4.x bits.
    #[test]
    fn zero_stages_follow_deepspeeds_arithmetic() {
        // The ZeRO paper's example: 7.5B parameters on 64 GPUs.
        let gb = |b: usize| (b as f64 / 1e9 * 10.0).round() / 10.0;
        let rows = zero_stages(7_500_000_000, 0, 64);
        let got: Vec<f64> = rows.iter().map(|&(_, b)| gb(b)).collect();
        assert_eq!(got, [120.0, 31.4, 16.6, 1.9]);
        assert_eq!(
            zero_stages(10, 8, 1)[3],
            ("ZeRO-3", 168),
            "one rank shards nothing"
        );
    }

    #[test]
    fn counts_follow_from_the_shapes() {
        let device = Default::default();
        let decoder = DecoderConfig::preset("internlm2-tiny", 1000).unwrap();
        let (h, f, v) = (
            decoder.hidden_size,
            decoder.intermediate_size,
            decoder.vocab_size,
        );
        let qkv = (decoder.n_heads + 2 * decoder.n_kv_heads) * decoder.head_dim;
        let r = 4;
        // Per checkpoint module (LoRA adapts each), and per product (gate and up are one).
        let per_layer = [(h, qkv), (h, h), (h, f), (f, h), (h, f)];
        let products = [(h, qkv), (h, h), (h, 2 * f), (f, h)];
        let layers = decoder.n_layers;
        // XTuner's all-linear default adapts InternLM2's `output` head too (it leaves out
        // only heads named `lm_head` and `output_layer`).
        let head = usize::from(!decoder.tie_word_embeddings);
        let adapted: usize = per_layer.iter().map(|&(i, o)| r * (i + o)).sum::<usize>() * layers
            + head * r * (h + v);
        let dense: usize = per_layer.iter().map(|&(i, o)| i * o).sum::<usize>() * layers;
        let norms = (2 * layers + 1) * h;
        let embeddings = v * h
            + if decoder.tie_word_embeddings {
                0
            } else {
                h * v
            };
        let config = LoraConfig {
            r,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: Vec::new(),
        };

        let model = Decoder::<B>::random(&decoder, &device).unwrap();
        let lora = lora::attach(model.clone(), &decoder, &config, 0, &device).unwrap();
        let memory = ModelMemory::of(&lora, lora.nf4_bytes(&decoder));
        assert_eq!(memory.trainable_params, adapted);
        assert_eq!(memory.trainable_bytes, 4 * adapted);
        assert_eq!(memory.frozen_bytes, 4 * (dense + norms + embeddings));
        assert_eq!(memory.nf4_bytes, 0);
        assert_eq!(memory.total_bytes(), 16 * adapted + memory.frozen_bytes);

        let quantized = lora::quantize_base(model, &decoder, 64, true).unwrap();
        let qlora = lora::attach(quantized, &decoder, &config, 0, &device).unwrap();
        let memory = ModelMemory::of(&qlora, qlora.nf4_bytes(&decoder));
        assert_eq!(memory.trainable_params, adapted);
        // The quantized layers keep a 1×1 placeholder weight.
        assert_eq!(
            memory.frozen_bytes,
            4 * (norms + embeddings + products.len() * layers)
        );
        // NdArray's i64 words hold 15 codes; one f32 absmax per 64 weights; 16 levels.
        let nf4: usize = products
            .iter()
            .map(|&(i, o)| 8 * (i * o).div_ceil(15) + 4 * (i * o).div_ceil(64) + 4 * 16)
            .sum::<usize>()
            * layers;
        assert_eq!(memory.nf4_bytes, nf4);
    }
}
