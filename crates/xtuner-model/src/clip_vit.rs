//! The CLIP vision tower (Radford et al., 2021, "Learning Transferable Visual Models
//! From Natural Language Supervision"), mirroring Hugging Face's `modeling_clip.py`
//! (`CLIPVisionTransformer`), as XTuner's LLaVA uses it: run with
//! `output_hidden_states=True`, take `hidden_states[visual_select_layer]` (-2) and drop
//! the CLS token.
//!
//! ```text
//! x = [class_embedding; patch_embedding(patches)] + position_embedding    [B, N+1, C]
//! hidden_states[0] = x = pre_layrnorm(x)
//! for each layer i:  x = x + out_proj(attention(layer_norm1(x)))
//!                    x = x + fc2(act(fc1(layer_norm2(x))))
//!                    hidden_states[i + 1] = x
//! last_hidden_state = x            (post_layernorm only feeds the pooled CLS output)
//! ```
//!
//! Checkpoint keys (under `vision_model.`): `embeddings.{patch_embedding.weight,
//! class_embedding, position_embedding.weight}`, `pre_layrnorm` (sic, HF's spelling),
//! `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
//! mlp.{fc1,fc2}}`, `post_layernorm`. A whole `CLIPModel` checkpoint also holds the text
//! tower (`text_model.*`, `text_projection`, `visual_projection`, `logit_scale`), which
//! the loader skips. The convolutional patch embedding (kernel = stride = P, no bias) is
//! a linear layer over flattened `(channel, y, x)` patches.
//!
//! Dimension legend: B batch, N patches (`(image_size / P)²`), C hidden, H heads,
//! D head dim, I intermediate, P patch size.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::nn::activation::HiddenAct;
use crate::nn::attention::scaled_dot_product;
use crate::nn::layer_norm::LayerNorm;
use crate::nn::linear::{Linear, LinearLayers, LinearSite};
use crate::nn::precision::in_dtype;
use crate::{Error, Result};

/// The key prefix of the vision tower in CLIP checkpoints.
pub(crate) const PREFIX: &str = "vision_model";

/// `CLIPVisionConfig` as written in `config.json` (the `vision_config` object of a
/// `CLIPModel` config, or a bare vision config). Defaults are transformers' class
/// defaults (ViT-B/32).
#[derive(Debug, Clone, Deserialize)]
pub struct HfClipVisionConfig {
    /// C.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// I.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Number of encoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// H.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Input side in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// P.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// The MLP activation (`quick_gelu` for OpenAI CLIP).
    #[serde(default)]
    pub hidden_act: HiddenAct,
    /// LayerNorm ε.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}

/// The validated vision-tower architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// C.
    pub hidden_size: usize,
    /// I.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub n_layers: usize,
    /// H.
    pub n_heads: usize,
    /// D = C / H.
    pub head_dim: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Input side in pixels (inputs must be `image_size × image_size`).
    pub image_size: usize,
    /// P.
    pub patch_size: usize,
    /// N = `(image_size / P)²`.
    pub num_patches: usize,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// LayerNorm ε.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Reads a CLIP `config.json`: its `vision_config` object when there is one (a whole
    /// `CLIPModel`), else the file itself (a bare `CLIPVisionConfig`).
    ///
    /// # Errors
    /// [`Error::Io`] when unreadable; [`Error::BadConfig`] naming the file and key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut json: serde_json::Value = crate::error::read_json_file(path)?;
        let vision = match json.get_mut("vision_config") {
            Some(v) => v.take(),
            None => json,
        };
        let hf: HfClipVisionConfig =
            serde_json::from_value(vision).map_err(|e| Error::BadConfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::try_from(hf).map_err(|e| crate::error::in_file(path, e))
    }
}

impl TryFrom<HfClipVisionConfig> for ClipVisionConfig {
    type Error = Error;

    fn try_from(hf: HfClipVisionConfig) -> Result<Self> {
        let invalid =
            |key: &'static str, message: String| Err(Error::InvalidConfig { key, message });
        let positive = [
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_attention_heads", hf.num_attention_heads),
            ("num_channels", hf.num_channels),
            ("patch_size", hf.patch_size),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, "must be positive".into());
            }
        }
        if !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return invalid(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    hf.hidden_size, hf.num_attention_heads
                ),
            );
        }
        if hf.image_size < hf.patch_size {
            return invalid(
                "image_size",
                format!(
                    "{} is smaller than patch_size {}",
                    hf.image_size, hf.patch_size
                ),
            );
        }
        if hf.layer_norm_eps.is_nan() || hf.layer_norm_eps <= 0.0 {
            return invalid(
                "layer_norm_eps",
                format!("must be positive, got {}", hf.layer_norm_eps),
            );
        }
        let grid = hf.image_size / hf.patch_size;
        Ok(Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads: hf.num_attention_heads,
            head_dim: hf.hidden_size / hf.num_attention_heads,
            num_channels: hf.num_channels,
            image_size: hf.image_size,
            patch_size: hf.patch_size,
            num_patches: grid * grid,
            hidden_act: hf.hidden_act,
            layer_norm_eps: hf.layer_norm_eps,
        })
    }
}

/// CLIP's vision transformer (`CLIPVisionModel.vision_model`). Field names are the key
/// segments under `vision_model.`.
#[derive(Module, Debug)]
pub struct ClipVisionTower<B: Backend> {
    /// Patch, class and position embeddings.
    pub embeddings: ClipVisionEmbeddings<B>,
    /// LayerNorm before the encoder (HF spells it `pre_layrnorm`).
    pub pre_layrnorm: LayerNorm<B>,
    /// The transformer layers.
    pub encoder: ClipEncoder<B>,
    /// LayerNorm of the pooled CLS output (not applied to the hidden states).
    pub post_layernorm: LayerNorm<B>,
}

impl<B: Backend> ClipVisionTower<B> {
    /// A randomly initialised tower (norms at identity), for tests and training from
    /// scratch.
    pub fn new(config: &ClipVisionConfig, device: &B::Device) -> Self {
        let c = config;
        let patch_dim = c.num_channels * c.patch_size * c.patch_size;
        let normal = burn::tensor::Distribution::Normal(0.0, 0.02);
        let layers = (0..c.n_layers)
            .map(|_| ClipEncoderLayer {
                layer_norm1: LayerNorm::new(c.hidden_size, c.layer_norm_eps, device),
                self_attn: ClipAttention {
                    q_proj: Linear::new(c.hidden_size, c.hidden_size, true, device),
                    k_proj: Linear::new(c.hidden_size, c.hidden_size, true, device),
                    v_proj: Linear::new(c.hidden_size, c.hidden_size, true, device),
                    out_proj: Linear::new(c.hidden_size, c.hidden_size, true, device),
                    n_heads: c.n_heads,
                },
                layer_norm2: LayerNorm::new(c.hidden_size, c.layer_norm_eps, device),
                mlp: ClipMlp {
                    fc1: Linear::new(c.hidden_size, c.intermediate_size, true, device),
                    fc2: Linear::new(c.intermediate_size, c.hidden_size, true, device),
                    activation: c.hidden_act,
                },
            })
            .collect();
        Self {
            embeddings: ClipVisionEmbeddings {
                patch_embedding: Linear::new(patch_dim, c.hidden_size, false, device),
                class_embedding: Param::from_tensor(Tensor::random(
                    [c.hidden_size],
                    normal,
                    device,
                )),
                position_embedding: Param::from_tensor(Tensor::random(
                    [c.num_patches + 1, c.hidden_size],
                    normal,
                    device,
                )),
                num_channels: c.num_channels,
                image_size: c.image_size,
                patch_size: c.patch_size,
            },
            pre_layrnorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, device),
            encoder: ClipEncoder { layers },
            post_layernorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, device),
        }
    }

    /// All hidden states, as HF's `output_hidden_states=True`: index 0 is the embeddings
    /// after `pre_layrnorm`, index `i` the output of layer `i`; the last one is
    /// `last_hidden_state`.
    ///
    /// # Shapes
    /// `pixel_values`: `[B, channels, image_size, image_size]` → `n_layers + 1` ×
    /// `[B, N + 1, C]` (CLS first).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the image size or channel count does not match.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<Vec<Tensor<B, 3>>> {
        let mut x = self
            .pre_layrnorm
            .forward(self.embeddings.forward(pixel_values)?);
        let mut hidden_states = Vec::with_capacity(self.encoder.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.encoder.layers {
            x = layer.forward(x);
            hidden_states.push(x.clone());
        }
        Ok(hidden_states)
    }

    /// XTuner's LLaVA features: `hidden_states[layer]` (negative counts from the end,
    /// -2 = the penultimate layer) without the CLS token. Only the layers needed are
    /// run.
    ///
    /// # Shapes
    /// `pixel_values`: `[B, channels, image_size, image_size]` → `[B, N, C]`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad image size or a layer out of range.
    pub fn forward_features(&self, pixel_values: Tensor<B, 4>, layer: i64) -> Result<Tensor<B, 3>> {
        let index = hidden_state_index(self.encoder.layers.len() + 1, layer)?;
        let mut x = self
            .pre_layrnorm
            .forward(self.embeddings.forward(pixel_values)?);
        for block in self.encoder.layers.iter().take(index) {
            x = block.forward(x);
        }
        Ok(drop_cls(x))
    }

    /// HF's `pooler_output`: `post_layernorm` of the CLS token of `last_hidden_state`.
    ///
    /// # Shapes
    /// `last_hidden_state`: `[B, N + 1, C]` → `[B, C]`.
    pub fn pooled_output(&self, last_hidden_state: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, c] = last_hidden_state.dims();
        let cls = last_hidden_state.narrow(1, 0, 1).reshape([b, c]); // [B, 1, C] → [B, C]
        self.post_layernorm.forward(cls)
    }
}

/// The projection layers of an encoder layer, in checkpoint order, with their names:
/// the one list of the tower's linear layers (adapters, export and loading use it).
pub(crate) fn layer_linears<B: Backend>(
    layer: &mut ClipEncoderLayer<B>,
) -> [(&'static str, &mut Linear<B>); 6] {
    let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
    [
        ("self_attn.q_proj", &mut a.q_proj),
        ("self_attn.k_proj", &mut a.k_proj),
        ("self_attn.v_proj", &mut a.v_proj),
        ("self_attn.out_proj", &mut a.out_proj),
        ("mlp.fc1", &mut m.fc1),
        ("mlp.fc2", &mut m.fc2),
    ]
}

fn clip_site(layer: usize, name: &str, width: usize) -> LinearSite {
    LinearSite::new(&format!("{PREFIX}.encoder.layers.{layer}.{name}"), width)
}

/// The `nn.Linear` layers of the encoder (what PEFT's all-linear LoRA targets: the
/// patch embedding is a convolution in PyTorch and is not one of them).
impl<B: Backend> LinearLayers<B> for ClipVisionTower<B> {
    type Config = ();

    fn map_linear_layers<E>(
        mut self,
        _: &(),
        mut f: impl FnMut(&LinearSite, Linear<B>) -> std::result::Result<Linear<B>, E>,
    ) -> std::result::Result<Self, E> {
        let mut layers = Vec::with_capacity(self.encoder.layers.len());
        for (i, mut layer) in std::mem::take(&mut self.encoder.layers)
            .into_iter()
            .enumerate()
        {
            for (name, slot) in layer_linears(&mut layer) {
                let site = clip_site(i, name, slot.dims()[1]);
                *slot = f(&site, slot.clone())?;
            }
            layers.push(layer);
        }
        self.encoder.layers = layers;
        Ok(self)
    }
}

/// Python-style index into `len` hidden states.
fn hidden_state_index(len: usize, layer: i64) -> Result<usize> {
    let len_i = i64::try_from(len).unwrap_or(i64::MAX);
    let index = if layer < 0 { len_i + layer } else { layer };
    if index < 0 || index >= len_i {
        return Err(Error::InvalidInput {
            name: "visual_select_layer",
            message: format!("{layer} is out of range for {len} hidden states"),
        });
    }
    Ok(index as usize)
}

/// Drops the CLS token (position 0).
fn drop_cls<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let n = x.dims()[1];
    x.narrow(1, 1, n.saturating_sub(1))
}

/// XTuner's LLaVA feature selection on precomputed hidden states:
/// `hidden_states[layer][:, 1:]` (negative `layer` counts from the end).
///
/// # Shapes
/// `hidden_states`: L × `[B, N + 1, C]` → `[B, N, C]`.
///
/// # Errors
/// [`Error::InvalidInput`] when `layer` is out of range.
pub fn select_features<B: Backend>(
    hidden_states: &[Tensor<B, 3>],
    layer: i64,
) -> Result<Tensor<B, 3>> {
    let index = hidden_state_index(hidden_states.len(), layer)?;
    hidden_states
        .get(index)
        .cloned()
        .map(drop_cls)
        .ok_or_else(|| Error::InvalidInput {
            name: "visual_select_layer",
            message: format!("{layer} is out of range"),
        })
}

/// `CLIPVisionEmbeddings`.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    /// The P×P stride-P convolution as a linear layer over flattened patches,
    /// `[channels·P·P, C]` (key `patch_embedding.weight`, `[C, channels, P, P]`).
    pub patch_embedding: Linear<B>,
    /// The CLS token embedding, `[C]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// Learned positions, `[N + 1, C]` (key `position_embedding.weight`).
    pub position_embedding: Param<Tensor<B, 2>>,
    /// Input channels.
    pub num_channels: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// P.
    pub patch_size: usize,
}

impl<B: Backend> ClipVisionEmbeddings<B> {
    /// # Shapes
    /// `pixel_values`: `[B, channels, image_size, image_size]` → `[B, N + 1, C]`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the channels or size differ from the config.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        let [b, ch, h, w] = pixel_values.dims();
        let (p, size) = (self.patch_size, self.image_size);
        if ch != self.num_channels || h != size || w != size {
            return Err(Error::InvalidInput {
                name: "pixel_values",
                message: format!(
                    "got [{b}, {ch}, {h}, {w}], the tower takes [B, {}, {size}, {size}]",
                    self.num_channels
                ),
            });
        }
        let g = size / p;
        // The stride-P convolution ignores trailing pixels when P does not divide the size.
        let x = pixel_values.narrow(2, 0, g * p).narrow(3, 0, g * p);
        let patches = x
            .reshape([b, ch, g, p, g, p]) // [B, ch, gy, P, gx, P]
            .permute([0, 2, 4, 1, 3, 5]) // [B, gy, gx, ch, P, P]
            .reshape([b, g * g, ch * p * p]); // [B, N, ch·P·P]
        let patch_embeds = self.patch_embedding.forward(patches); // [B, N, C]
        let c = patch_embeds.dims()[2];
        let dtype = patch_embeds.dtype();
        let class_embeds = in_dtype(self.class_embedding.val(), dtype)
            .reshape([1, 1, c])
            .expand([b, 1, c]); // [B, 1, C]
        let embeddings = Tensor::cat(vec![class_embeds, patch_embeds], 1); // [B, N + 1, C]
        Ok(embeddings + in_dtype(self.position_embedding.val(), dtype).unsqueeze::<3>())
    }
}

/// `CLIPEncoder`: the stack of layers (key segment `encoder.layers`).
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    /// The layers, key `encoder.layers.N`.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP residual blocks.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Norm before attention.
    pub layer_norm1: LayerNorm<B>,
    /// Bidirectional multi-head self-attention.
    pub self_attn: ClipAttention<B>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<B>,
    /// The two-layer MLP.
    pub mlp: ClipMlp<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// # Shapes
    /// `x`: `[B, T, C]` → `[B, T, C]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        h.clone() + self.mlp.forward(self.layer_norm2.forward(h))
    }
}

/// `CLIPAttention`: plain softmax attention over all tokens (no mask), biased
/// projections.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// Query projection, `[C, C]`.
    pub q_proj: Linear<B>,
    /// Key projection, `[C, C]`.
    pub k_proj: Linear<B>,
    /// Value projection, `[C, C]`.
    pub v_proj: Linear<B>,
    /// Output projection, `[C, C]`.
    pub out_proj: Linear<B>,
    /// H.
    pub n_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    /// # Shapes
    /// `x`: `[B, T, C]` → `[B, T, C]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, c] = x.dims();
        let h = self.n_heads;
        let d = c / h.max(1);
        let heads = |y: Tensor<B, 3>| y.reshape([b, t, h, d]).swap_dims(1, 2); // [B, H, T, D]
        let q = heads(self.q_proj.forward(x.clone()));
        let k = heads(self.k_proj.forward(x.clone()));
        let v = heads(self.v_proj.forward(x));
        let no_mask = Tensor::<B, 4>::zeros([1, 1, t, t], &q.device()); // broadcast over B and H
        let out = scaled_dot_product(q, k, v, &no_mask); // [B, H, T, D]
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, c])) // [B, T, C]
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// `[C, I]`.
    pub fc1: Linear<B>,
    /// `[I, C]`.
    pub fc2: Linear<B>,
    /// The activation between them.
    pub activation: HiddenAct,
}

impl<B: Backend> ClipMlp<B> {
    /// # Shapes
    /// `x`: `[B, T, C]` → `[B, T, C]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(self.activation.forward(self.fc1.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::checkpoint::Checkpoint;
    use crate::test_util::max_abs_tensor;
    use burn::tensor::TensorData;
    use std::path::PathBuf;

    fn fixture_dir() -> PathBuf {
        crate::test_support::fixture("clip-vit-tiny")
    }

    fn golden<const D: usize>(key: &str) -> Tensor<TestBackend, D> {
        let ckpt = Checkpoint::open(&fixture_dir().join("golden.safetensors")).unwrap();
        let shape = ckpt.shape(key).unwrap();
        ckpt.tensor::<TestBackend, D>(key, shape.try_into().unwrap(), &Default::default())
            .unwrap()
    }

    #[test]
    fn reads_the_vision_config_of_a_clip_model() {
        let config = ClipVisionConfig::from_file(&fixture_dir().join("config.json")).unwrap();
        assert_eq!(
            (
                config.hidden_size,
                config.n_layers,
                config.n_heads,
                config.head_dim
            ),
            (32, 3, 4, 8)
        );
        assert_eq!(
            (config.image_size, config.patch_size, config.num_patches),
            (28, 14, 4)
        );
        assert_eq!(config.hidden_act, HiddenAct::QuickGelu);
        let bare: HfClipVisionConfig = serde_json::from_str(
            r#"{"hidden_act": "gelu", "hidden_size": 10, "num_attention_heads": 3}"#,
        )
        .unwrap();
        assert!(ClipVisionConfig::try_from(bare).is_err());
        assert!(serde_json::from_str::<HfClipVisionConfig>(r#"{"hidden_act": "relu6"}"#).is_err());
    }

    #[test]
    fn matches_the_reference_hidden_states() {
        let device = Default::default();
        let (tower, config) =
            ClipVisionTower::<TestBackend>::load(&fixture_dir(), &device).unwrap();
        let pixel_values = golden::<4>("pixel_values");
        let hidden_states = tower.forward(pixel_values.clone()).unwrap();
        assert_eq!(hidden_states.len(), config.n_layers + 1);
        let last = hidden_states.last().unwrap().clone();
        let err_last = max_abs_tensor(last, golden::<3>("last_hidden_state"));
        let select = hidden_states[hidden_states.len() - 2].clone();
        let err_select = max_abs_tensor(select, golden::<3>("hidden_states_select_-2"));
        assert!(
            err_last < 1e-4 && err_select < 1e-4,
            "last {err_last}, select -2 {err_select}"
        );

        let features = tower.forward_features(pixel_values, -2).unwrap();
        let expected = golden::<3>("hidden_states_select_-2").narrow(1, 1, config.num_patches);
        assert!(max_abs_tensor(features, expected.clone()) < 1e-4);
        assert!(max_abs_tensor(select_features(&hidden_states, -2).unwrap(), expected) < 1e-4);
    }

    #[test]
    fn rejects_bad_inputs_and_layers() {
        let device = Default::default();
        let (tower, _) = ClipVisionTower::<TestBackend>::load(&fixture_dir(), &device).unwrap();
        let wrong = Tensor::<TestBackend, 4>::zeros([1, 3, 14, 28], &device);
        assert!(matches!(
            tower.forward(wrong),
            Err(Error::InvalidInput { .. })
        ));
        let pixels = Tensor::<TestBackend, 4>::zeros([1, 3, 28, 28], &device);
        assert!(tower.forward_features(pixels.clone(), -5).is_err());
        assert!(tower.forward_features(pixels.clone(), 4).is_err());
        assert_eq!(
            tower.forward_features(pixels.clone(), 0).unwrap().dims(),
            [1, 4, 32]
        );
        assert_eq!(
            tower
                .pooled_output(tower.forward(pixels).unwrap().pop().unwrap())
                .dims(),
            [1, 32]
        );
    }

    #[test]
    fn unexpected_vision_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&src).unwrap();
        let extra = [0u8; 4];
        let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st
            .tensors()
            .into_iter()
            .filter(|(k, _)| k != "vision_model.post_layernorm.bias")
            .collect();
        tensors.push((
            "vision_model.extra".into(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &extra).unwrap(),
        ));
        let config = ClipVisionConfig::from_file(&fixture_dir().join("config.json")).unwrap();
        let device = Default::default();

        let path = dir.path().join("model.safetensors");
        safetensors::serialize_to_file(tensors.clone(), None, &path).unwrap();
        let err = ClipVisionTower::<TestBackend>::load_from(
            &Checkpoint::open(&path).unwrap(),
            &config,
            &device,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("vision_model.post_layernorm.bias"),
            "{err}"
        );

        let src_bias = st.tensor("vision_model.post_layernorm.bias").unwrap();
        tensors.push(("vision_model.post_layernorm.bias".into(), src_bias));
        safetensors::serialize_to_file(tensors, None, &path).unwrap();
        let err = ClipVisionTower::<TestBackend>::load_from(
            &Checkpoint::open(&path).unwrap(),
            &config,
            &device,
        )
        .unwrap_err();
        let expected = vec!["vision_model.extra".to_string()];
        assert!(
            matches!(&err, Error::UnexpectedTensors { keys } if *keys == expected),
            "{err}"
        );
    }

    #[test]
    fn activations_and_layer_norm() {
        let device = Default::default();
        let x = Tensor::<TestBackend, 1>::from_floats([-1.0, 0.0, 2.0], &device);
        let quick = HiddenAct::QuickGelu.forward(x.clone());
        let expected: Vec<f32> = [-1.0f32, 0.0, 2.0]
            .iter()
            .map(|v| v / (1.0 + (-1.702 * v).exp()))
            .collect();
        quick.into_data().assert_approx_eq::<f32>(
            &TensorData::new(expected, [3]),
            burn::tensor::Tolerance::absolute(1e-6),
        );
        let exact = HiddenAct::Gelu
            .forward(x.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let tanh = HiddenAct::GeluTanh
            .forward(x)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(
            (exact[2] - 1.9544997).abs() < 1e-5 && (tanh[2] - 1.9545977).abs() < 1e-5,
            "{exact:?} {tanh:?}"
        );

        // Exact GELU's gradient is Φ(x) + x·φ(x), not the tanh approximation's.
        type Ad = burn::backend::Autodiff<TestBackend>;
        let x = Tensor::<Ad, 1>::from_floats([-3.0, -1.0, 0.5, 2.0], &device).require_grad();
        let grads = HiddenAct::Gelu.forward(x.clone()).sum().backward();
        let expected = [-0.011945647f32, -0.08331547, 0.8674951, 1.0852318];
        x.grad(&grads).unwrap().into_data().assert_approx_eq::<f32>(
            &TensorData::new(expected.to_vec(), [4]),
            burn::tensor::Tolerance::absolute(1e-5),
        );

        let norm = LayerNorm::<TestBackend>::new(4, 1e-5, &device);
        let y = norm.forward(Tensor::<TestBackend, 2>::from_floats(
            [[1.0, 2.0, 3.0, 4.0]],
            &device,
        ));
        let s = (1.25f32 + 1e-5).sqrt();
        let expected = TensorData::from([[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]]);
        y.into_data()
            .assert_approx_eq::<f32>(&expected, burn::tensor::Tolerance::absolute(1e-5));
    }

    /// Every linear layer of the encoder is listed, once: with the embeddings and the
    /// norms they are all of the tower's parameters.
    #[test]
    fn every_linear_layer_is_listed_once() {
        let device = Default::default();
        let (tower, _) = ClipVisionTower::<TestBackend>::load(&fixture_dir(), &device).unwrap();
        let layers = tower.linear_layers(&());
        let size = |l: &Linear<TestBackend>| {
            let [d_in, d_out] = l.dims();
            d_in * d_out + l.bias.as_ref().map_or(0, |_| d_out)
        };
        let listed: usize = layers.iter().map(|(_, l)| size(l)).sum();
        let e = &tower.embeddings;
        let hidden = e.class_embedding.dims()[0];
        let norms = (2 + 2 * tower.encoder.layers.len()) * 2 * hidden;
        let embeddings =
            size(&e.patch_embedding) + hidden + e.position_embedding.val().shape().num_elements();
        assert_eq!(listed + norms + embeddings, tower.num_params());
        let modules: std::collections::BTreeSet<&str> = layers
            .iter()
            .map(|(s, _)| s.modules[0].module.as_str())
            .collect();
        assert_eq!(modules.len(), 6 * tower.encoder.layers.len());
    }
}
