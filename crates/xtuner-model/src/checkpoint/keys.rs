//! Checkpoint key names of each decoder family, and the layout differences between
//! them: how q/k/v and gate/up are stored, and which extra norms a layer has.
//!
//! | part | InternLM2 | Llama / Qwen2 / Qwen3 / Gemma | Gemma 2 | Phi-3 |
//! |---|---|---|---|---|
//! | embeddings | `model.tok_embeddings` | `model.embed_tokens` | same | same |
//! | pre-attention norm | `attention_norm` | `input_layernorm` | same | same |
//! | q, k, v | `attention.wqkv` (KV-group interleaved) | `self_attn.{q,k,v}_proj` | same | `self_attn.qkv_proj` (q, k, v rows) |
//! | q/k norms | — | Qwen3: `self_attn.{q,k}_norm` | — | — |
//! | attention output | `attention.wo` | `self_attn.o_proj` | same | same |
//! | post-attention norm | — | — | `post_attention_layernorm` | — |
//! | pre-MLP norm | `ffn_norm` | `post_attention_layernorm` | `pre_feedforward_layernorm` | `post_attention_layernorm` |
//! | gate, up | `feed_forward.w1, w3` | `mlp.gate_proj, up_proj` | same | `mlp.gate_up_proj` (gate, up rows) |
//! | down | `feed_forward.w2` | `mlp.down_proj` | same | same |
//! | post-MLP norm | — | — | `post_feedforward_layernorm` | — |
//! | final norm, LM head | `model.norm`, `output` | `model.norm`, `lm_head` (absent when tied) | same | same |
//!
//! InternLM2's `wqkv` rows are grouped per KV head: for KV head g, its G = H/K query
//! heads, then key head g, then value head g, each D rows. The model keeps
//! `[all q | all k | all v]`; [`internlm2_qkv_rows`] gives the permutation.

use serde::{Deserialize, Serialize};

/// The decoder families: one decoder, these key names and small differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `model_type: internlm2`.
    #[serde(rename = "internlm2")]
    InternLm2,
    /// `model_type: llama`, and `mistral` (the same keys, a sliding window at most).
    Llama,
    /// `model_type: qwen2`: q/k/v biases.
    Qwen2,
    /// `model_type: qwen3`: RMSNorm over each head's q and k.
    Qwen3,
    /// `model_type: gemma`: `(1 + w)` norms, scaled embeddings, GeGLU.
    Gemma,
    /// `model_type: gemma2`: Gemma with sandwich norms, soft caps and sliding windows.
    Gemma2,
    /// `model_type: phi3`: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
}

/// Where a layer's query/key/value weights live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QkvKeys {
    /// One tensor with KV-group-interleaved rows (InternLM2), without `.weight`.
    Interleaved(String),
    /// One tensor with all q rows, then k, then v (Phi-3), without `.weight`.
    Packed(String),
    /// Three tensors, without the `.weight`/`.bias` suffix.
    Separate {
        /// Query projection.
        q: String,
        /// Key projection.
        k: String,
        /// Value projection.
        v: String,
    },
}

/// Where a layer's gate and up projections live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateUpKeys {
    /// Two tensors.
    Separate {
        /// Gate projection (the activated half).
        gate: String,
        /// Up projection.
        up: String,
    },
    /// One tensor, gate rows then up rows (Phi-3).
    Fused(String),
}

/// The module names (without `.weight`) of one decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerKeys {
    /// Pre-attention RMSNorm.
    pub attention_norm: String,
    /// Query/key/value projection(s).
    pub qkv: QkvKeys,
    /// Per-head RMSNorms of q and k (Qwen3).
    pub qk_norms: Option<(String, String)>,
    /// Attention output projection.
    pub wo: String,
    /// RMSNorm of the attention output (Gemma 2).
    pub post_attention_norm: Option<String>,
    /// Pre-MLP RMSNorm.
    pub ffn_norm: String,
    /// Gate and up projection(s).
    pub gate_up: GateUpKeys,
    /// Down projection.
    pub w2: String,
    /// RMSNorm of the MLP output (Gemma 2).
    pub post_ffn_norm: Option<String>,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 7] = [
        Family::InternLm2,
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma,
        Family::Gemma2,
        Family::Phi3,
    ];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::InternLm2 => "internlm2",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Phi3 => "phi3",
        }
    }

    /// The family of a `model_type` (`mistral` has Llama's keys).
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "mistral" => Some(Family::Llama),
            other => Self::ALL.into_iter().find(|f| f.model_type() == other),
        }
    }

    /// The transformers class (`architectures` of `config.json`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::InternLm2 => "InternLM2ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// The token embedding module.
    pub fn embed(self) -> &'static str {
        match self {
            Family::InternLm2 => "model.tok_embeddings",
            _ => "model.embed_tokens",
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
            _ => "lm_head",
        }
    }

    /// The modules of layer `i`.
    pub fn layer(self, i: usize) -> LayerKeys {
        let p = format!("model.layers.{i}");
        if self == Family::InternLm2 {
            return LayerKeys {
                attention_norm: format!("{p}.attention_norm"),
                qkv: QkvKeys::Interleaved(format!("{p}.attention.wqkv")),
                qk_norms: None,
                wo: format!("{p}.attention.wo"),
                post_attention_norm: None,
                ffn_norm: format!("{p}.ffn_norm"),
                gate_up: GateUpKeys::Separate {
                    gate: format!("{p}.feed_forward.w1"),
                    up: format!("{p}.feed_forward.w3"),
                },
                w2: format!("{p}.feed_forward.w2"),
                post_ffn_norm: None,
            };
        }
        let (attn, mlp) = (format!("{p}.self_attn"), format!("{p}.mlp"));
        let sandwich = self == Family::Gemma2;
        LayerKeys {
            attention_norm: format!("{p}.input_layernorm"),
            qkv: if self == Family::Phi3 {
                QkvKeys::Packed(format!("{attn}.qkv_proj"))
            } else {
                QkvKeys::Separate {
                    q: format!("{attn}.q_proj"),
                    k: format!("{attn}.k_proj"),
                    v: format!("{attn}.v_proj"),
                }
            },
            qk_norms: (self == Family::Qwen3)
                .then(|| (format!("{attn}.q_norm"), format!("{attn}.k_norm"))),
            wo: format!("{attn}.o_proj"),
            post_attention_norm: sandwich.then(|| format!("{p}.post_attention_layernorm")),
            ffn_norm: if sandwich {
                format!("{p}.pre_feedforward_layernorm")
            } else {
                format!("{p}.post_attention_layernorm")
            },
            gate_up: if self == Family::Phi3 {
                GateUpKeys::Fused(format!("{mlp}.gate_up_proj"))
            } else {
                GateUpKeys::Separate {
                    gate: format!("{mlp}.gate_proj"),
                    up: format!("{mlp}.up_proj"),
                }
            },
            w2: format!("{mlp}.down_proj"),
            post_ffn_norm: sandwich.then(|| format!("{p}.post_feedforward_layernorm")),
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
        assert!(matches!(
            Family::Llama.layer(0).gate_up,
            GateUpKeys::Separate { ref gate, .. } if gate == "model.layers.0.mlp.gate_proj"
        ));
        assert!(
            matches!(Family::Qwen2.layer(1).qkv, QkvKeys::Separate { ref k, .. } if k == "model.layers.1.self_attn.k_proj")
        );
        assert_eq!(
            Family::Phi3.layer(0).qkv,
            QkvKeys::Packed("model.layers.0.self_attn.qkv_proj".into())
        );
        let gemma2 = Family::Gemma2.layer(0);
        assert_eq!(gemma2.ffn_norm, "model.layers.0.pre_feedforward_layernorm");
        assert_eq!(
            gemma2.post_attention_norm.as_deref(),
            Some("model.layers.0.post_attention_layernorm")
        );
        assert!(Family::Qwen3.layer(0).qk_norms.is_some());
        assert!(Family::Gemma.layer(0).post_ffn_norm.is_none());
    }

    #[test]
    fn model_types_name_their_family() {
        for family in Family::ALL {
            assert_eq!(Family::from_model_type(family.model_type()), Some(family));
        }
        assert_eq!(Family::from_model_type("mistral"), Some(Family::Llama));
        assert_eq!(Family::from_model_type("mixtral"), None);
    }
}
