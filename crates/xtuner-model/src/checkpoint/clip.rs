//! The CLIP vision tower's Hugging Face checkpoints: the `vision_model.*` tensors of a
//! `CLIPModel` or `CLIPVisionModel` directory loaded into [`ClipVisionTower`], and
//! written back under the same keys (PyTorch's `[out, in]` weights, the patch
//! embedding as its `[C, channels, P, P]` convolution).

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;

use super::Checkpoint;
use crate::clip_vit::{
    ClipAttention, ClipEncoder, ClipEncoderLayer, ClipMlp, ClipVisionConfig, ClipVisionEmbeddings,
    ClipVisionTower, PREFIX, layer_linears,
};
use crate::nn::layer_norm::LayerNorm;
use crate::nn::linear::Linear;
use crate::{Error, Result};

impl<B: Backend> ClipVisionTower<B> {
    /// Loads a CLIP model directory (`config.json` + safetensors).
    ///
    /// # Errors
    /// As [`ClipVisionConfig::from_file`] and [`ClipVisionTower::load_from`].
    pub fn load(dir: &Path, device: &B::Device) -> Result<(Self, ClipVisionConfig)> {
        let config = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let tower = Self::load_from(&ckpt, &config, device)?;
        Ok((tower, config))
    }

    /// Loads the `vision_model.*` tensors of an opened CLIP checkpoint. The text tower
    /// (`text_model.*`, `text_projection`, `visual_projection`, `logit_scale`) and the
    /// `position_ids` buffer of older checkpoints are skipped.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor;
    /// [`Error::UnexpectedTensors`] for any other key the tower does not use.
    pub fn load_from(
        ckpt: &Checkpoint,
        config: &ClipVisionConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let (hidden, p) = (c.hidden_size, c.patch_size);
        let key = |name: &str| format!("{PREFIX}.{name}");
        let linear = |name: &str, d_in: usize, d_out: usize| {
            Linear::load(ckpt, &key(name), d_in, d_out, true, device)
        };
        let layer_norm = |name: &str| -> Result<LayerNorm<B>> {
            Ok(LayerNorm {
                weight: Param::from_tensor(ckpt.tensor::<B, 1>(
                    &key(&format!("{name}.weight")),
                    [hidden],
                    device,
                )?),
                bias: Param::from_tensor(ckpt.tensor::<B, 1>(
                    &key(&format!("{name}.bias")),
                    [hidden],
                    device,
                )?),
                eps: c.layer_norm_eps,
            })
        };

        // [C, channels, P, P] → [C, channels·P·P] → [channels·P·P, C]
        let patch_weight = ckpt
            .tensor::<B, 4>(
                &key("embeddings.patch_embedding.weight"),
                [hidden, c.num_channels, p, p],
                device,
            )?
            .reshape([hidden, c.num_channels * p * p])
            .transpose();
        let embeddings = ClipVisionEmbeddings {
            patch_embedding: Linear::from_tensors(patch_weight, None),
            class_embedding: Param::from_tensor(ckpt.tensor::<B, 1>(
                &key("embeddings.class_embedding"),
                [hidden],
                device,
            )?),
            position_embedding: Param::from_tensor(ckpt.tensor::<B, 2>(
                &key("embeddings.position_embedding.weight"),
                [c.num_patches + 1, hidden],
                device,
            )?),
            num_channels: c.num_channels,
            image_size: c.image_size,
            patch_size: p,
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let l = format!("encoder.layers.{i}");
            layers.push(ClipEncoderLayer {
                layer_norm1: layer_norm(&format!("{l}.layer_norm1"))?,
                self_attn: ClipAttention {
                    q_proj: linear(&format!("{l}.self_attn.q_proj"), hidden, hidden)?,
                    k_proj: linear(&format!("{l}.self_attn.k_proj"), hidden, hidden)?,
                    v_proj: linear(&format!("{l}.self_attn.v_proj"), hidden, hidden)?,
                    out_proj: linear(&format!("{l}.self_attn.out_proj"), hidden, hidden)?,
                    n_heads: c.n_heads,
                },
                layer_norm2: layer_norm(&format!("{l}.layer_norm2"))?,
                mlp: ClipMlp {
                    fc1: linear(&format!("{l}.mlp.fc1"), hidden, c.intermediate_size)?,
                    fc2: linear(&format!("{l}.mlp.fc2"), c.intermediate_size, hidden)?,
                    activation: c.hidden_act,
                },
            });
        }
        let tower = Self {
            embeddings,
            pre_layrnorm: layer_norm("pre_layrnorm")?,
            encoder: ClipEncoder { layers },
            post_layernorm: layer_norm("post_layernorm")?,
        };
        let unexpected: Vec<String> = ckpt
            .unused_keys()
            .into_iter()
            .filter(|k| !is_skipped_key(k))
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors { keys: unexpected });
        }
        Ok(tower)
    }
}

impl<B: Backend> ClipVisionTower<B> {
    /// The tower's tensors under transformers' `CLIPVisionModel` names
    /// (`vision_model.*`, PyTorch layouts), for `model.safetensors`.
    pub fn to_hf_tensors(&self) -> Vec<(String, burn::tensor::TensorData)> {
        let key = |name: &str| format!("{PREFIX}.{name}");
        let e = &self.embeddings;
        let [patch_dim, hidden] = e.patch_embedding.dims();
        let p = e.patch_size;
        let mut out = vec![
            (
                key("embeddings.patch_embedding.weight"),
                e.patch_embedding
                    .dense_weight()
                    .transpose()
                    .reshape([hidden, patch_dim / (p * p), p, p])
                    .into_data(),
            ),
            (
                key("embeddings.class_embedding"),
                e.class_embedding.val().into_data(),
            ),
            (
                key("embeddings.position_embedding.weight"),
                e.position_embedding.val().into_data(),
            ),
        ];
        let norm = |name: &str, n: &LayerNorm<B>| {
            [
                (key(&format!("{name}.weight")), n.weight.val().into_data()),
                (key(&format!("{name}.bias")), n.bias.val().into_data()),
            ]
        };
        out.extend(norm("pre_layrnorm", &self.pre_layrnorm));
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            let l = format!("encoder.layers.{i}");
            out.extend(norm(&format!("{l}.layer_norm1"), &layer.layer_norm1));
            out.extend(norm(&format!("{l}.layer_norm2"), &layer.layer_norm2));
            let mut layer = layer.clone();
            for (name, linear) in layer_linears(&mut layer) {
                out.extend(linear.to_hf_tensors(&key(&format!("{l}.{name}"))));
            }
        }
        out.extend(norm("post_layernorm", &self.post_layernorm));
        out
    }
}

/// Keys of a `CLIPModel` checkpoint that the vision tower does not use by design.
fn is_skipped_key(key: &str) -> bool {
    key.starts_with("text_model.")
        || key.starts_with("text_projection.")
        || key.starts_with("visual_projection.")
        || key == "logit_scale"
        || key == "vision_model.embeddings.position_ids"
}
