//! Causal self-attention with grouped-query heads, rotary positions and the masks that
//! training and generation need: causal, right padding, and packed rows whose samples
//! must not see each other (varlen attention, as segment ids).
//!
//! The projection is one fused `wqkv` linear whose output columns are laid out
//! `[q heads (H·D) | k heads (K·D) | v heads (K·D)]`; loaders convert InternLM2's
//! KV-group-interleaved rows and Llama's separate q/k/v into it. Query head `j` uses KV
//! head `j / (H/K)` (PyTorch's `repeat_interleave`). Softmax runs in f32; the two
//! products go through [`batched_matmul`] (cuBLAS on CUDA).
//!
//! Dimension legend: B batch, T new tokens, S keys (cached + new), H query heads,
//! K KV heads, D head dim, C hidden.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::nn::gemm::batched_matmul;
use crate::nn::kv_cache::LayerCache;
use crate::nn::linear::Linear;
use crate::nn::rope::apply_rotary;

/// Added to the scores of masked positions (finite, so a fully masked padding row
/// gives a harmless uniform distribution instead of NaN).
const MASKED: f32 = -1e30;

/// Grouped-query self-attention (`attention.wqkv`, `attention.wo`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Fused query/key/value projection, `[C, (H + 2K)·D]`.
    pub wqkv: Linear<B>,
    /// Output projection, `[H·D, C]`.
    pub wo: Linear<B>,
    /// Query heads H.
    pub n_heads: usize,
    /// Key/value heads K.
    pub n_kv_heads: usize,
    /// Head dimension D.
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// `x`: `[B, T, C]`; `cos`, `sin`: `[B, T, D]`; `bias`: `[B, 1, T, S]` additive mask
    /// (see [`attention_bias`]) → `[B, T, C]`. With a cache, the new keys and values are
    /// appended to it and S counts the cached ones too.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        bias: &Tensor<B, 4>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, k, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = self.wqkv.forward(x); // [B, T, (H+2K)·D]
        let q = qkv.clone().slice([0..b, 0..t, 0..h * d]);
        let key = qkv.clone().slice([0..b, 0..t, h * d..(h + k) * d]);
        let value = qkv.slice([0..b, 0..t, (h + k) * d..(h + 2 * k) * d]);
        let q = q.reshape([b, t, h, d]).swap_dims(1, 2); // [B, H, T, D]
        let key = key.reshape([b, t, k, d]).swap_dims(1, 2); // [B, K, T, D]
        let value = value.reshape([b, t, k, d]).swap_dims(1, 2); // [B, K, T, D]
        let q = apply_rotary(q, cos, sin);
        let key = apply_rotary(key, cos, sin);
        let (key, value) = match cache {
            Some(cache) => cache.append(key, value), // [B, K, S, D]
            None => (key, value),
        };
        let out = scaled_dot_product(q, key, value, bias); // [B, H, T, D]
        let out = out.swap_dims(1, 2).reshape([b, t, h * d]); // [B, T, H·D]
        self.wo.forward(out)
    }
}

/// `softmax(q·kᵀ/√D + bias)·v` with K key/value heads shared by groups of query heads.
///
/// # Shapes
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, K, S, D]`; `bias`: `[B, 1, T, S]` → `[B, H, T, D]`.
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    let [_, kv_heads, s, _] = k.dims();
    let groups = h / kv_heads.max(1);
    // The query heads of one KV group are consecutive, so stacking them along T gives
    // each KV head G·T queries to answer at once: K and V are never repeated.
    let q = q.reshape([b * kv_heads, groups * t, d]);
    let k = k.reshape([b * kv_heads, s, d]);
    let v = v.reshape([b * kv_heads, s, d]);
    let dtype = q.dtype();
    let scores = batched_matmul(q, k.swap_dims(1, 2))
        .reshape([b, h, t, s])
        .cast(DType::F32)
        / (d as f64).sqrt();
    let probs = softmax(scores + bias.clone().cast(DType::F32), 3).cast(dtype);
    batched_matmul(probs.reshape([b * kv_heads, groups * t, s]), v).reshape([b, h, t, d])
}

/// The additive attention mask `[B, 1, T, S]`: 0 where query `i` (at absolute position
/// `past + i`) may attend key `j`, a large negative number elsewhere.
///
/// Key `j` is visible when `j ≤ past + i` (causal), `key_valid[b][j]` (not padding),
/// and, with `segments`, it belongs to the query's segment (packed samples are kept
/// apart). `key_valid` and `segments` cover all S keys of each row.
pub fn attention_bias<B: Backend>(
    batch: usize,
    t: usize,
    past: usize,
    key_valid: &[bool],
    segments: Option<&[i64]>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let s = past + t;
    let mut values = vec![MASKED; batch * t * s];
    for b in 0..batch {
        for i in 0..t {
            let query = past + i;
            for j in 0..=query.min(s - 1) {
                let visible = key_valid.get(b * s + j).copied().unwrap_or(false)
                    && segments.is_none_or(|seg| seg.get(b * s + j) == seg.get(b * s + query));
                if visible {
                    values[(b * t + i) * s + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [batch, 1, t, s]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::Tolerance;

    #[test]
    fn bias_is_causal_and_respects_padding_and_segments() {
        let device = Default::default();
        let bias = attention_bias::<TestBackend>(
            1,
            4,
            0,
            &[true, true, true, false],
            Some(&[0, 0, 1, 1]),
            &device,
        );
        let v: Vec<f32> = bias.into_data().to_vec().unwrap();
        let visible: Vec<bool> = v.iter().map(|&x| x == 0.0).collect();
        #[rustfmt::skip]
        let expected = [
            true,  false, false, false,
            true,  true,  false, false,
            false, false, true,  false,
            false, false, true,  false, // key 3 is padding
        ];
        assert_eq!(visible, expected);
        // With two cached keys, the single new query sees all three.
        let bias = attention_bias::<TestBackend>(1, 1, 2, &[true; 3], None, &device);
        assert_eq!(bias.into_data().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    }

    #[test]
    fn grouped_heads_share_keys_and_values() {
        let device = Default::default();
        // 2 query heads, 1 KV head: both heads must see the same keys.
        let q = Tensor::<TestBackend, 4>::from_floats([[[[1.0, 0.0]], [[0.0, 1.0]]]], &device);
        let k = Tensor::<TestBackend, 4>::from_floats([[[[1.0, 0.0], [0.0, 1.0]]]], &device);
        let v = Tensor::<TestBackend, 4>::from_floats([[[[10.0, 0.0], [0.0, 10.0]]]], &device);
        let bias = Tensor::<TestBackend, 4>::zeros([1, 1, 1, 2], &device);
        let out = scaled_dot_product(q, k, v, &bias);
        let w = 1.0 / (1.0 + (-1.0f32 / 2f32.sqrt()).exp());
        let expected = TensorData::from([[
            [[10.0 * w, 10.0 * (1.0 - w)]],
            [[10.0 * (1.0 - w), 10.0 * w]],
        ]]);
        out.into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-4));
    }
}
