//! Checkpoint key names of each decoder family, and the one real layout difference
//! between them: InternLM2's fused `wqkv`.
//!
//! | part | InternLM2 | Llama / Qwen2 |
//! |---|---|---|
//! | embeddings | `model.tok_embeddings` | `model.embed_tokens` |
//! | pre-attention norm | `attention_norm` | `input_layernorm` |
//! | q, k, v | `attention.wqkv` (fused, KV-group interleaved) | `self_attn.{q,k,v}_proj` |
//! | attention output | `attention.wo` | `self_attn.o_proj` |
//! | pre-MLP norm | `ffn_norm` | `post_attention_layernorm` |
//! | gate, down, up | `feed_forward.w1, w2, w3` | `mlp.gate_proj, down_proj, up_proj` |
//! | final norm | `model.norm` | `model.norm` |
//! | LM head | `output` | `lm_head` (absent when tied) |
//!
//! InternLM2's `wqkv` rows are grouped per KV head: for KV head g, its G = H/K query
//! heads, then key head g, then value head g, each D rows. The model keeps
//! `[all q | all k | all v]`; [`internlm2_qkv_rows`] gives the permutation.

use serde::{Deserialize, Serialize};

/// The decoder families that share InternLM2's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `model_type: internlm2`.
    #[serde(rename = "internlm2")]
    InternLm2,
    /// `model_type: llama` (also Mistral-style checkpoints without sliding windows).
    Llama,
    /// `model_type: qwen2`.
    Qwen2,
}

/// Where a layer's query/key/value weights live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QkvKeys {
    /// One fused tensor (InternLM2), without the `.weight` suffix.
    Fused(String),
    /// Three tensors (Llama, Qwen2), without the `.weight`/`.bias` suffix.
    Separate {
        /// Query projection.
        q: String,
        /// Key projection.
        k: String,
        /// Value projection.
        v: String,
    },
}

/// The module names (without `.weight`) of one decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerKeys {
    /// Pre-attention RMSNorm.
    pub attention_norm: String,
    /// Query/key/value projection(s).
    pub qkv: QkvKeys,
    /// Attention output projection.
    pub wo: String,
    /// Pre-MLP RMSNorm.
    pub ffn_norm: String,
    /// Gate projection.
    pub w1: String,
    /// Down projection.
    pub w2: String,
    /// Up projection.
    pub w3: String,
}

impl Family {
    /// The token embedding module.
    pub fn embed(self) -> &'static str {
        match self {
            Family::InternLm2 => "model.tok_embeddings",
            Family::Llama | Family::Qwen2 => "model.embed_tokens",
        }
    }

    /// The final norm module.
    pub fn norm(self) -> &'static str {
        "model.norm"
    }

    /// The LM head module.
    pub fn output(self) -> &'static str {
        match self {
            Family::InternLm2 => "output",
            Family::Llama | Family::Qwen2 => "lm_head",
        }
    }

    /// The modules of layer `i`.
    pub fn layer(self, i: usize) -> LayerKeys {
        let p = format!("model.layers.{i}");
        match self {
            Family::InternLm2 => LayerKeys {
                attention_norm: format!("{p}.attention_norm"),
                qkv: QkvKeys::Fused(format!("{p}.attention.wqkv")),
                wo: format!("{p}.attention.wo"),
                ffn_norm: format!("{p}.ffn_norm"),
                w1: format!("{p}.feed_forward.w1"),
                w2: format!("{p}.feed_forward.w2"),
                w3: format!("{p}.feed_forward.w3"),
            },
            Family::Llama | Family::Qwen2 => LayerKeys {
                attention_norm: format!("{p}.input_layernorm"),
                qkv: QkvKeys::Separate {
                    q: format!("{p}.self_attn.q_proj"),
                    k: format!("{p}.self_attn.k_proj"),
                    v: format!("{p}.self_attn.v_proj"),
                },
                wo: format!("{p}.self_attn.o_proj"),
                ffn_norm: format!("{p}.post_attention_layernorm"),
                w1: format!("{p}.mlp.gate_proj"),
                w2: format!("{p}.mlp.down_proj"),
                w3: format!("{p}.mlp.up_proj"),
            },
        }
    }
}

/// For each row of the `[q | k | v]` layout, the row of InternLM2's interleaved `wqkv`
/// it comes from (a permutation of `0..(H + 2K)·D`).
pub fn internlm2_qkv_rows(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Vec<usize> {
    let groups = n_heads / n_kv_heads.max(1);
    let block = |g: usize, slot: usize| (g * (groups + 2) + slot) * head_dim;
    let q = (0..n_heads).map(|j| block(j / groups, j % groups));
    let k = (0..n_kv_heads).map(|g| block(g, groups));
    let v = (0..n_kv_heads).map(|g| block(g, groups + 1));
    q.chain(k)
        .chain(v)
        .flat_map(|start| start..start + head_dim)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qkv_rows_follow_the_kv_groups() {
        // 4 query heads, 2 KV heads, head_dim 1: HF rows are
        // [q0 q1 k0 v0 | q2 q3 k1 v1] → ours [q0 q1 q2 q3 | k0 k1 | v0 v1].
        assert_eq!(internlm2_qkv_rows(4, 2, 1), vec![0, 1, 4, 5, 2, 6, 3, 7]);
        // 1.8B: 16 heads, 8 KV heads, 128 dims; a permutation of 4096 rows.
        let mut rows = internlm2_qkv_rows(16, 8, 128);
        assert_eq!(rows[..3], [0, 1, 2]);
        assert_eq!(rows[128], 128, "q1 is the second block of group 0");
        assert_eq!(rows[2 * 128], 512, "q2 opens group 1");
        assert_eq!(rows[16 * 128], 256, "k0 follows q0, q1");
        rows.sort_unstable();
        assert_eq!(rows, (0..4096).collect::<Vec<_>>());
    }

    #[test]
    fn families_name_their_modules() {
        assert_eq!(
            Family::InternLm2.layer(3).w2,
            "model.layers.3.feed_forward.w2"
        );
        assert_eq!(Family::Llama.layer(0).w1, "model.layers.0.mlp.gate_proj");
        assert!(
            matches!(Family::Qwen2.layer(1).qkv, QkvKeys::Separate { ref k, .. } if k == "model.layers.1.self_attn.k_proj")
        );
    }
}
