//! Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half convention of
//! InternLM2 and Hugging Face Llama: the head dimension is split in halves `(x₁, x₂)`
//! and rotated as `x·cos + (−x₂, x₁)·sin`, with `inv_freq[i] = θ^(−2i/D)` and the
//! angle table `concat(pos·inv_freq, pos·inv_freq)`. (Burn's `RotaryEncoding` pairs
//! interleaved elements instead, which checkpoints trained this way do not match.)
//!
//! Positions are an input, so packed rows whose positions restart per sample and
//! decoding with a KV cache use the same code. Scaling as in `config.json`'s
//! `rope_scaling`: `linear` divides positions by the factor; `dynamic` (NTK) enlarges θ
//! once the sequence is longer than `max_position_embeddings`; `llama3` (Llama 3.1 and
//! later) divides the low frequencies by the factor, keeps the high ones and blends
//! between them.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};

use crate::nn::precision::{compute_dtype, in_dtype};
use crate::{Error, Result};

/// `rope_scaling` of a Hugging Face config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Dynamic NTK: θ enlarged for sequences longer than the trained context.
    Dynamic {
        /// The factor.
        factor: f64,
    },
    /// Llama 3's: frequencies whose wavelength exceeds `original / low_freq_factor`
    /// divided by `factor`, those under `original / high_freq_factor` kept, a smooth
    /// blend between.
    Llama3 {
        /// The factor.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original: f64,
    },
}

/// The settings of a rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Per-head dimension D (even).
    pub head_dim: usize,
    /// Base θ (`rope_theta`).
    pub theta: f64,
    /// Trained context length (`max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// Optional scaling.
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Checks the settings.
    ///
    /// # Errors
    /// An odd or zero head dimension, a non-positive θ, or a scaling factor below 1.
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_position_embeddings: usize,
        scaling: Option<RopeScaling>,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::InvalidConfig {
                key: "head_dim",
                message: format!("must be even and positive, got {head_dim}"),
            });
        }
        if theta.is_nan() || theta <= 0.0 {
            return Err(Error::InvalidConfig {
                key: "rope_theta",
                message: format!("must be positive, got {theta}"),
            });
        }
        if let Some(
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Llama3 { factor, .. },
        ) = scaling
            && (factor.is_nan() || factor < 1.0)
        {
            return Err(Error::InvalidConfig {
                key: "rope_scaling.factor",
                message: format!("must be at least 1, got {factor}"),
            });
        }
        Ok(Self {
            head_dim,
            theta,
            max_position_embeddings,
            scaling,
        })
    }

    /// `inv_freq[i] = θ'^(−2i/D)` for a sequence of `seq_len` tokens (θ' = θ unless
    /// dynamic scaling applies).
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f64> {
        let d = self.head_dim as f64;
        let theta = match self.scaling {
            Some(RopeScaling::Dynamic { factor }) if seq_len > self.max_position_embeddings => {
                let ratio =
                    factor * seq_len as f64 / self.max_position_embeddings as f64 - (factor - 1.0);
                self.theta * ratio.powf(d / (d - 2.0))
            }
            _ => self.theta,
        };
        let inv_freq = (0..self.head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / d));
        match self.scaling {
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original,
            }) => inv_freq
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < original / high {
                        f
                    } else if wavelen > original / low {
                        f / factor
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
            _ => inv_freq.collect(),
        }
    }

    /// The cos and sin tables for the given positions, computed in f32 (as transformers
    /// does) and returned in the compute dtype. (Positions in bf16 would be exact only up
    /// to 256.)
    ///
    /// # Shapes
    /// `positions`: `[B, T]` → cos, sin: `[B, T, D]`.
    pub fn cos_sin<B: Backend>(
        &self,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [batch, seq_len] = positions.dims();
        let device = positions.device();
        // Dynamic scaling follows the sequence length so far, the largest position + 1
        // (a decoding step with a cache sees one token but the whole length, as
        // transformers passes it); other kinds do not depend on it.
        let longest = match self.scaling {
            Some(RopeScaling::Dynamic { .. }) if seq_len > 0 => {
                let max = positions.clone().max().into_data().iter::<i64>().next();
                max.map_or(seq_len, |m| usize::try_from(m).unwrap_or(0) + 1)
            }
            _ => seq_len,
        };
        let inv_freq = self.inv_freq(longest);
        let scale = match self.scaling {
            Some(RopeScaling::Linear { factor }) => 1.0 / factor,
            _ => 1.0,
        };
        let half = self.head_dim / 2;
        let inv_freq: Vec<f32> = inv_freq.iter().map(|f| (f * scale) as f32).collect();
        let inv_freq =
            Tensor::<B, 1>::from_data(TensorData::new(inv_freq, [half]), (&device, DType::F32));
        // angles[b, t, i] = pos[b, t] · inv_freq[i]
        let angles = positions.cast(FloatDType::F32).reshape([batch, seq_len, 1])
            * inv_freq.reshape([1, 1, half]);
        let emb = Tensor::cat(vec![angles.clone(), angles], 2); // [B, T, D]
        let dtype = compute_dtype::<B>();
        (
            in_dtype(emb.clone().cos(), dtype),
            in_dtype(emb.sin(), dtype),
        )
    }
}

/// Applies the rotation to queries or keys.
///
/// # Shapes
/// `x`: `[B, H, T, D]`; `cos`, `sin`: `[B, T, D]` → `[B, H, T, D]`.
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Tensor<B, 4> {
    let cos = in_dtype(cos.clone(), x.dtype()).unsqueeze_dim::<4>(1); // [B, 1, T, D]
    let sin = in_dtype(sin.clone(), x.dtype()).unsqueeze_dim::<4>(1);
    x.clone() * cos + rotate_half(x) * sin
}

/// `(x₁, x₂) → (−x₂, x₁)` over the last axis.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..t, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::Tolerance;

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
        // Llama 3.1's settings; the values are transformers'
        // `_compute_llama3_parameters` for them.
        let rope = Rope::new(
            128,
            5e5,
            131_072,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original: 8192.0,
            }),
        )
        .unwrap();
        let inv = rope.inv_freq(16);
        let plain = Rope::new(128, 5e5, 131_072, None).unwrap().inv_freq(16);
        assert_eq!(inv[0], 1.0, "the highest frequency is kept");
        assert_eq!(inv[..29], plain[..29]);
        assert!(
            (inv[63] - 3.068925988914511e-07).abs() < 1e-15,
            "divided by 8"
        );
        for (i, expected) in [
            (29, 0.002166570763503359),
            (32, 0.0005248461609929547),
            (34, 0.0001785078127679964),
        ] {
            assert!((inv[i] - expected).abs() < 1e-12, "{i}: {}", inv[i]);
        }
    }

    /// The rotation written out element by element, in f64.
    fn reference(x: &[f64], pos: f64, rope: &Rope, seq_len: usize) -> Vec<f64> {
        let d = rope.head_dim;
        let scale = match rope.scaling {
            Some(RopeScaling::Linear { factor }) => 1.0 / factor,
            _ => 1.0,
        };
        let inv = rope.inv_freq(seq_len);
        (0..d)
            .map(|j| {
                let angle = pos * scale * inv[j % (d / 2)];
                let rotated = if j < d / 2 {
                    -x[j + d / 2]
                } else {
                    x[j - d / 2]
                };
                x[j] * angle.cos() + rotated * angle.sin()
            })
            .collect()
    }

    fn check(rope: Rope, positions: [[i64; 3]; 1]) {
        let device = Default::default();
        let d = rope.head_dim;
        let values: Vec<f32> = (0..2 * 3 * d)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let x = Tensor::<TestBackend, 4>::from_data(
            TensorData::new(values.clone(), [1, 2, 3, d]),
            &device,
        );
        let pos = Tensor::<TestBackend, 2, Int>::from_ints(positions, &device);
        let (cos, sin) = rope.cos_sin(pos);
        let y = apply_rotary(x, &cos, &sin);
        let mut expected = Vec::new();
        for h in 0..2 {
            for (t, &position) in positions[0].iter().enumerate() {
                let start = (h * 3 + t) * d;
                let row: Vec<f64> = values[start..start + d]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                expected.extend(
                    reference(&row, position as f64, &rope, 3)
                        .into_iter()
                        .map(|v| v as f32),
                );
            }
        }
        y.into_data().assert_approx_eq::<f32>(
            &TensorData::new(expected, [1, 2, 3, d]),
            Tolerance::absolute(1e-5),
        );
    }

    #[test]
    fn rotate_half_matches_the_written_out_rotation() {
        check(Rope::new(8, 10_000.0, 2048, None).unwrap(), [[0, 1, 5]]);
        // Packed rows: positions restart.
        check(Rope::new(8, 1e6, 2048, None).unwrap(), [[3, 0, 1]]);
    }

    #[test]
    fn scaling() {
        check(
            Rope::new(8, 10_000.0, 2048, Some(RopeScaling::Linear { factor: 2.0 })).unwrap(),
            [[0, 4, 9]],
        );
        // Dynamic NTK only changes θ past the trained context.
        let rope = Rope::new(8, 10_000.0, 2, Some(RopeScaling::Dynamic { factor: 2.0 })).unwrap();
        assert_eq!(
            rope.inv_freq(2),
            Rope::new(8, 10_000.0, 2, None).unwrap().inv_freq(2)
        );
        assert!(rope.inv_freq(3)[1] < rope.inv_freq(2)[1]);
        check(rope, [[0, 1, 2]]);
        // A decoding step (one token at position 5) is rotated as the last row of the
        // whole sequence, not as a sequence of one token.
        let device = Default::default();
        let table = |ids: Vec<i64>| {
            let n = ids.len();
            let pos =
                Tensor::<TestBackend, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
            let (cos, sin) = rope.cos_sin(pos);
            (
                cos.slice([0..1, n - 1..n, 0..8]),
                sin.slice([0..1, n - 1..n, 0..8]),
            )
        };
        let (step_cos, step_sin) = table(vec![5]);
        let (full_cos, full_sin) = table((0..6).collect());
        step_cos
            .into_data()
            .assert_approx_eq::<f32>(&full_cos.into_data(), Tolerance::absolute(1e-6));
        step_sin
            .into_data()
            .assert_approx_eq::<f32>(&full_sin.into_data(), Tolerance::absolute(1e-6));
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Rope::new(7, 1e4, 8, None).is_err());
        assert!(Rope::new(8, 0.0, 8, None).is_err());
        assert!(Rope::new(8, 1e4, 8, Some(RopeScaling::Linear { factor: 0.5 })).is_err());
    }
}
