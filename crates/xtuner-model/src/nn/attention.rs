//! Causal self-attention with grouped-query heads, rotary positions and the masks that
//! training and generation need: causal, right padding, and packed rows whose samples
//! must not see each other (varlen attention, as segment ids).
//!
//! A training step's mask is [`AttentionMask::Causal`]: on Burn's CubeCL backends it runs
//! as flash attention (`nn/flash/`), which never holds the `[T × S]` scores;
//! elsewhere, and for any other mask, the scores are materialised
//! ([`scaled_dot_product`]). `XTUNER_ATTENTION=dense` forces the latter everywhere.
//!
//! The projection is one fused `wqkv` linear whose output columns are laid out
//! `[q heads (H·D) | k heads (K·D) | v heads (K·D)]`; loaders convert InternLM2's
//! KV-group-interleaved rows and Llama's separate q/k/v into it. Query head `j` uses KV
//! head `j / (H/K)` (PyTorch's `repeat_interleave`). Softmax runs in f32; the two
//! products go through [`batched_matmul`] (cuBLAS on CUDA).
//!
//! The families' differences live here as settings: per-head RMSNorms of q and k before
//! RoPE (Qwen3), a query scale other than `1/√D` and soft-capped scores
//! `cap · tanh(s / cap)` (Gemma 2), and a sliding window (Gemma 2's alternate layers,
//! Mistral): query i sees key j only when `i - j < window`, in training and in cached
//! decoding alike. Flash attention serves the plain case; the others materialise the
//! scores.
//!
//! Dimension legend: B batch, T new tokens, S keys (cached + new), H query heads,
//! K KV heads, D head dim, C hidden.

use std::sync::{Arc, OnceLock};

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use crate::nn::gemm::batched_matmul;
use crate::nn::kv_cache::LayerCache;
use crate::nn::linear::Linear;
use crate::nn::reshape::reshape;
use crate::nn::rms_norm::{RmsNorm, optional};
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
    /// RMSNorm over each query head (Qwen3's `q_norm`), `[D]`.
    pub q_norm: Option<RmsNorm<B>>,
    /// RMSNorm over each key head (Qwen3's `k_norm`), `[D]`.
    pub k_norm: Option<RmsNorm<B>>,
    /// The scores' scale (`1/√D`, Gemma 2: `query_pre_attn_scalar^-½`).
    pub scale: f64,
    /// Scores are soft-capped at this value (Gemma 2's `attn_logit_softcapping`).
    pub softcap: Option<f64>,
    /// Keys further back than this many tokens are not seen (sliding window).
    pub window: Option<usize>,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// `x`: `[B, T, C]`; `cos`, `sin`: `[B, T, D]` → `[B, T, C]`. With a cache, the new
    /// keys and values are appended to it and S counts the cached ones too.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        mask: &AttentionMask<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, k, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = self.wqkv.forward(x); // [B, T, (H+2K)·D]
        if let (None, AttentionMask::Causal { segments, .. }) = (&cache, mask)
            && self.is_plain()
            && let Some(out) =
                crate::nn::flash::packed_attention(&qkv, (cos, sin), segments, [h, k, d])
        {
            return self.wo.forward(out);
        }
        let q = qkv.clone().slice([0..b, 0..t, 0..h * d]);
        let key = qkv.clone().slice([0..b, 0..t, h * d..(h + k) * d]);
        let value = qkv.slice([0..b, 0..t, (h + k) * d..(h + 2 * k) * d]);
        let q = optional(&self.q_norm, q.reshape([b, t, h, d])).swap_dims(1, 2); // [B, H, T, D]
        let key = optional(&self.k_norm, key.reshape([b, t, k, d])).swap_dims(1, 2); // [B, K, T, D]
        let value = value.reshape([b, t, k, d]).swap_dims(1, 2); // [B, K, T, D]
        let mut q = apply_rotary(q, cos, sin);
        let key = apply_rotary(key, cos, sin);
        // Both paths divide the scores by √D: a query scale of its own is folded in here.
        if let Some(factor) = self.query_factor() {
            q = q * factor;
        }
        let plain = self.plain_scores();
        let dense = |q, key: Tensor<B, 4>, value, bias: Tensor<B, 4>| {
            let s = key.dims()[2];
            let bias = match self.window {
                Some(window) => bias + window_bias(t, s, window, &key.device()),
                None => bias,
            };
            scaled_dot_product_capped(q, key, value, &bias, self.softcap)
        };
        let out = match (cache, mask) {
            (None, AttentionMask::Causal { segments, .. }) => {
                match plain
                    .then(|| crate::nn::flash::attention(&q, &key, &value, segments))
                    .flatten()
                {
                    Some(out) => out,
                    None => dense(q, key, value, mask.bias(t)),
                }
            }
            (Some(cache), _) => {
                let (key, value) = cache.append(key, value); // [B, K, S, D]
                let bias = mask.bias(key.dims()[2]);
                dense(q, key, value, bias)
            }
            (None, AttentionMask::Bias(bias)) => dense(q, key, value, bias.clone()),
        }; // [B, H, T, D]
        let out = reshape(out.swap_dims(1, 2), [b, t, h * d]); // [B, T, H·D]
        self.wo.forward(out)
    }
}

impl<B: Backend> Attention<B> {
    /// The factor the queries are multiplied by when the layer's scale is not the
    /// `1/√D` that every attention path applies; `None` when it is.
    fn query_factor(&self) -> Option<f64> {
        let default_scale = 1.0 / (self.head_dim as f64).sqrt();
        let differs = (self.scale - default_scale).abs() > f64::EPSILON * default_scale;
        differs.then(|| self.scale / default_scale)
    }

    /// Whether the scores are plain `q·kᵀ/√D` under the mask: no soft cap, no window.
    fn plain_scores(&self) -> bool {
        self.softcap.is_none() && self.window.is_none()
    }

    /// Whether this layer is attention as the packed flash op computes it from the
    /// projection output: plain scores, no per-head norms, the default scale.
    fn is_plain(&self) -> bool {
        self.plain_scores()
            && self.q_norm.is_none()
            && self.k_norm.is_none()
            && self.query_factor().is_none()
    }
}

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum AttentionMask<B: Backend> {
    /// Causal, with packed samples kept apart by segment ids `[B, T]`, non-decreasing
    /// along each row: a training step's mask (padding at the end of a row is a segment
    /// of its own), which flash attention serves. With cached keys, the new queries see
    /// all of them (one sample continues).
    Causal {
        /// Segment ids `[B, T]`.
        segments: Tensor<B, 2, Int>,
        /// The additive form, built when a layer first needs it (where flash attention
        /// does not serve) and shared by the other layers.
        dense: DenseBias<B>,
    },
    /// An additive mask `[B, 1, T, S]` (see [`attention_bias`]): padding anywhere.
    Bias(Tensor<B, 4>),
}

impl<B: Backend> AttentionMask<B> {
    /// The mask of rows whose tokens are valid where `key_valid` says and, with
    /// `segments`, belong to those packed samples (ids per token, any value on padding):
    /// [`Self::Causal`] when every row's padding is at its end and its samples are in
    /// order, [`Self::Bias`] otherwise.
    pub fn new(
        batch: usize,
        t: usize,
        key_valid: &[bool],
        segments: Option<&[i64]>,
        device: &B::Device,
    ) -> Self {
        match causal_segments(batch, t, key_valid, segments) {
            Some(ids) => {
                Self::causal_from(Tensor::from_data(TensorData::new(ids, [batch, t]), device))
            }
            None => Self::Bias(attention_bias(batch, t, 0, key_valid, segments, device)),
        }
    }

    /// Plain causal rows (one sample each, no padding).
    pub fn causal(batch: usize, t: usize, device: &B::Device) -> Self {
        Self::causal_from(Tensor::zeros([batch, t], device))
    }

    fn causal_from(segments: Tensor<B, 2, Int>) -> Self {
        Self::Causal {
            segments,
            dense: DenseBias::default(),
        }
    }

    /// The segment ids of a [`Self::Causal`] mask.
    pub fn segments(&self) -> Option<&Tensor<B, 2, Int>> {
        match self {
            Self::Causal { segments, .. } => Some(segments),
            Self::Bias(_) => None,
        }
    }

    /// The additive `[B, 1, T, S]` form, for `s` keys (`s - T` of them cached).
    pub fn bias(&self, s: usize) -> Tensor<B, 4> {
        match self {
            Self::Bias(bias) => bias.clone(),
            Self::Causal { segments, dense } => {
                let (built_for, bias) = dense.0.get_or_init(|| (s, causal_bias(segments, s)));
                if *built_for == s {
                    bias.clone()
                } else {
                    causal_bias(segments, s)
                }
            }
        }
    }
}

/// The additive form of a [`AttentionMask::Causal`] mask for the key count it was first
/// asked for, shared by the mask's clones. Only an empty one can be made outside, so a
/// mask never serves another mask's bias.
#[derive(Debug, Clone)]
pub struct DenseBias<B: Backend>(Arc<OnceLock<(usize, Tensor<B, 4>)>>);

impl<B: Backend> Default for DenseBias<B> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

/// The additive form of causal rows with segment ids `[B, T]`, for `s` keys.
fn causal_bias<B: Backend>(segments: &Tensor<B, 2, Int>, s: usize) -> Tensor<B, 4> {
    let [b, t] = segments.dims();
    let device = segments.device();
    let past = s.saturating_sub(t) as i64;
    let query = Tensor::<B, 1, Int>::arange(past..past + t as i64, &device).reshape([1, t, 1]);
    let key = Tensor::<B, 1, Int>::arange(0..s as i64, &device).reshape([1, 1, s]);
    let mut visible: Tensor<B, 3, Bool> =
        key.expand([b, t, s]).lower_equal(query.expand([b, t, s]));
    if s == t {
        let same = segments
            .clone()
            .reshape([b, t, 1])
            .expand([b, t, t])
            .equal(segments.clone().reshape([b, 1, t]).expand([b, t, t]));
        visible = visible.bool_and(same);
    }
    Tensor::<B, 3>::full([b, t, s], MASKED, &device)
        .mask_fill(visible, 0.0)
        .reshape([b, 1, t, s])
}

/// Segment ids that make `key_valid` and `segments` a causal mask: each row's samples
/// in order, its padding after them as one more segment. `None` when a row has padding
/// before a valid token or samples out of order.
fn causal_segments(
    batch: usize,
    t: usize,
    key_valid: &[bool],
    segments: Option<&[i64]>,
) -> Option<Vec<i32>> {
    let mut ids = Vec::with_capacity(batch * t);
    for b in 0..batch {
        let row = |j: usize| b * t + j;
        let valid = |j: usize| key_valid.get(row(j)).copied().unwrap_or(false);
        let len = (0..t).take_while(|&j| valid(j)).count();
        if (len..t).any(valid) {
            return None;
        }
        let seg = |j: usize| segments.map_or(Some(0), |s| s.get(row(j)).copied());
        let mut last = i64::MIN;
        for j in 0..len {
            let id = seg(j)?;
            if id < last || i32::try_from(id).is_err() {
                return None;
            }
            last = id;
            ids.push(id as i32);
        }
        let pad = if len == 0 {
            0
        } else {
            i32::try_from(last).ok()?.checked_add(1)?
        };
        ids.extend(std::iter::repeat_n(pad, t - len));
    }
    Some(ids)
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
    scaled_dot_product_capped(q, k, v, bias, None)
}

/// [`scaled_dot_product`] with the scores soft-capped before the mask:
/// `s ← cap · tanh(s / cap)` (Gemma 2).
///
/// # Shapes
/// As [`scaled_dot_product`]; `bias` may also be `[1, 1, T, S]`.
pub fn scaled_dot_product_capped<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: &Tensor<B, 4>,
    softcap: Option<f64>,
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
    let mut scores = batched_matmul(q, k.swap_dims(1, 2))
        .reshape([b, h, t, s])
        .cast(DType::F32)
        / (d as f64).sqrt();
    if let Some(cap) = softcap {
        scores = (scores / cap).tanh() * cap;
    }
    let probs = softmax(scores + bias.clone().cast(DType::F32), 3).cast(dtype);
    batched_matmul(probs.reshape([b * kv_heads, groups * t, s]), v).reshape([b, h, t, d])
}

/// The additive sliding-window mask `[1, 1, T, S]` of `t` queries, the last of `s`
/// positions: query i (at `s - t + i`) does not see key j when `j + window ≤ s - t + i`.
pub fn window_bias<B: Backend>(
    t: usize,
    s: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let past = s.saturating_sub(t);
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j + window <= past + i { MASKED } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, t, s]), device)
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

    fn visible(bias: Tensor<TestBackend, 4>) -> Vec<bool> {
        bias.into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&x| x == 0.0)
            .collect()
    }

    #[test]
    fn causal_mask_equals_the_bias_on_real_queries() {
        let device = Default::default();
        // Row 0: samples of 2 and 3 tokens, then one padding token; row 1: 6 tokens.
        let valid = [[true; 5].as_slice(), &[false], &[true; 6]].concat();
        let segments = [0, 0, 1, 1, 1, -1, 0, 0, 0, 0, 0, 0];
        let mask = AttentionMask::<TestBackend>::new(2, 6, &valid, Some(&segments), &device);
        let Some(ids) = mask.segments() else {
            panic!("right padding and ordered samples are causal")
        };
        assert_eq!(
            ids.to_data().convert::<i64>().to_vec::<i64>().unwrap(),
            [0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0]
        );
        let (causal, bias) = (
            visible(mask.bias(6)),
            visible(attention_bias(2, 6, 0, &valid, Some(&segments), &device)),
        );
        for (at, (c, b)) in causal.iter().zip(&bias).enumerate() {
            let query = at / 6; // row-major [B, T, S] over both rows
            if valid[query] {
                assert_eq!(c, b, "query {query}, key {}", at % 6);
            }
        }
        // The additive form is built once and shared; other key counts get their own.
        assert_eq!(visible(mask.bias(6)), causal);
        assert_eq!(
            visible(mask.bias(8))[..8],
            [true, true, true, false, false, false, false, false],
            "row 0's first query, two keys cached before it"
        );
        assert_eq!(visible(mask.bias(6)), causal);
        // With two cached keys, the new query sees all three.
        assert_eq!(
            visible(AttentionMask::<TestBackend>::causal(1, 1, &device).bias(3)),
            [true; 3]
        );
    }

    #[test]
    fn padding_first_or_samples_out_of_order_keep_the_bias() {
        assert_eq!(
            causal_segments(1, 3, &[false, true, true], None),
            None,
            "left padding"
        );
        assert_eq!(
            causal_segments(1, 3, &[true; 3], Some(&[1, 0, 0])),
            None,
            "samples out of order"
        );
        assert_eq!(
            causal_segments(2, 2, &[true, true, false, false], None),
            Some(vec![0, 0, 0, 0]),
            "an all-padding row"
        );
    }

    #[test]
    fn a_window_hides_keys_that_far_back() {
        let device = Default::default();
        // Four queries after two cached keys, window 3: query at 2 sees keys 0..=2, at 5
        // sees 3..=5.
        let seen = visible(window_bias::<TestBackend>(4, 6, 3, &device));
        assert_eq!(seen[..6], [true, true, true, true, true, true]);
        assert_eq!(seen[18..], [false, false, false, true, true, true]);
        // Soft-capping bounds the scores: with a tiny cap, every key weighs the same.
        let q = Tensor::<TestBackend, 4>::from_floats([[[[100.0, 0.0]]]], &device);
        let k = Tensor::<TestBackend, 4>::from_floats([[[[1.0, 0.0], [-1.0, 0.0]]]], &device);
        let v = Tensor::<TestBackend, 4>::from_floats([[[[1.0, 0.0], [0.0, 1.0]]]], &device);
        let bias = Tensor::<TestBackend, 4>::zeros([1, 1, 1, 2], &device);
        let out = scaled_dot_product_capped(q, k, v, &bias, Some(1e-6));
        out.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[[[0.5, 0.5]]]]),
            Tolerance::absolute(1e-4),
        );
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
