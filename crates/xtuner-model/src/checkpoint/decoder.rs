//! The decoder's Hugging Face checkpoints: loading `config.json` + safetensors (with a
//! PEFT adapter merged in as they load) into [`Decoder`], and writing it back under
//! the same keys. Each family's key names and InternLM2's KV-group-interleaved `wqkv`
//! are [`super::keys`]'s; PyTorch's `[out, in]` weights become Burn's `[in, out]` here.

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorCreationOptions, TensorData};

use super::Checkpoint;
use super::keys::{GateUpKeys, QkvKeys, internlm2_qkv_rows};
use super::peft::PeftAdapter;
use crate::decoder::{Block, Decoder, DecoderConfig};
use crate::nn::attention::Attention;
use crate::nn::linear::Linear;
use crate::nn::mlp::FeedForward;
use crate::nn::precision::host_vec;
use crate::nn::rms_norm::RmsNorm;
use crate::{Error, Result};

impl<B: Backend> Decoder<B> {
    /// Loads a Hugging Face model directory (`config.json` + safetensors), optionally
    /// merging a PEFT LoRA adapter into the weights as they load.
    ///
    /// # Errors
    /// A bad config, a missing or mis-shaped tensor (named), tensors the model does not
    /// use, or an adapter for another model.
    pub fn load(
        dir: &Path,
        adapter: Option<&PeftAdapter>,
        device: &B::Device,
    ) -> Result<(Self, DecoderConfig)> {
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let model = Self::load_from(&ckpt, &config, adapter, device)?;
        Ok((model, config))
    }

    /// Loads from an opened checkpoint with a known config.
    ///
    /// # Errors
    /// See [`Decoder::load`].
    pub fn load_from(
        ckpt: &Checkpoint,
        config: &DecoderConfig,
        adapter: Option<&PeftAdapter>,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let src = Source { ckpt, adapter };
        let family = c.family;
        let (h, k, d, hidden) = (c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size);
        let inter = c.intermediate_size;
        let qkv_out = (h + 2 * k) * d;
        let norm = |module: &str, width: usize| {
            let weight = src.vector(&format!("{module}.weight"), width)?;
            norm(weight, c, ckpt.options(device))
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let keys = family.layer(i);
            let (qkv_rows, qkv_bias) = match &keys.qkv {
                QkvKeys::Interleaved(module) => {
                    let (rows, bias) = src.stacked(&[(module, qkv_out)], hidden, c.qkv_bias)?;
                    let order = internlm2_qkv_rows(h, k, d);
                    (
                        permute_rows(&rows, &order, hidden),
                        bias.map(|b| order.iter().map(|&r| b[r]).collect()),
                    )
                }
                QkvKeys::Packed(module) => src.stacked(&[(module, qkv_out)], hidden, c.qkv_bias)?,
                QkvKeys::Separate { q, k: key, v } => {
                    src.stacked(&[(q, h * d), (key, k * d), (v, k * d)], hidden, c.qkv_bias)?
                }
            };
            let (gate_up_rows, gate_up_bias) = match &keys.gate_up {
                GateUpKeys::Separate { gate, up } => {
                    src.stacked(&[(gate, inter), (up, inter)], hidden, c.mlp_bias)?
                }
                GateUpKeys::Fused(module) => {
                    src.stacked(&[(module, 2 * inter)], hidden, c.mlp_bias)?
                }
            };
            let (q_norm, k_norm) = match &keys.qk_norms {
                Some((q, key)) => (Some(norm(q, d)?), Some(norm(key, d)?)),
                None => (None, None),
            };
            layers.push(Block {
                attention_norm: norm(&keys.attention_norm, hidden)?,
                attention: Attention {
                    wqkv: linear(qkv_rows, qkv_out, hidden, qkv_bias, ckpt.options(device)),
                    wo: src.linear(&keys.wo, h * d, hidden, c.o_bias, device)?,
                    n_heads: h,
                    n_kv_heads: k,
                    head_dim: d,
                    q_norm,
                    k_norm,
                    scale: c.attention_scale,
                    softcap: c.attn_softcap,
                    window: c.windows.get(i).copied().flatten(),
                },
                post_attention_norm: keys
                    .post_attention_norm
                    .as_deref()
                    .map(|m| norm(m, hidden))
                    .transpose()?,
                ffn_norm: norm(&keys.ffn_norm, hidden)?,
                feed_forward: FeedForward {
                    w13: linear(
                        gate_up_rows,
                        2 * inter,
                        hidden,
                        gate_up_bias,
                        ckpt.options(device),
                    ),
                    w2: src.linear(&keys.w2, inter, hidden, c.mlp_bias, device)?,
                    act: c.hidden_act,
                },
                post_ffn_norm: keys
                    .post_ffn_norm
                    .as_deref()
                    .map(|m| norm(m, hidden))
                    .transpose()?,
            });
        }
        let embeddings = ckpt.tensor::<B, 2>(
            &format!("{}.weight", family.embed()),
            [c.vocab_size, hidden],
            device,
        )?;
        let output_key = format!("{}.weight", family.output());
        let output = if c.tie_word_embeddings && !ckpt.contains(&output_key) {
            None
        } else {
            Some(src.linear(family.output(), hidden, c.vocab_size, false, device)?)
        };
        let model = Self {
            tok_embeddings: Param::from_tensor(embeddings),
            layers,
            norm: norm(family.norm(), hidden)?,
            output,
            rope: c.rope,
            embed_scale: c.scale_embeddings.then(|| (hidden as f64).sqrt()),
            final_softcap: c.final_softcap,
        };
        let unused: Vec<String> = ckpt
            .unused_keys()
            .into_iter()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unused.is_empty() {
            return Err(Error::UnexpectedTensors { keys: unused });
        }
        if let Some(adapter) = adapter {
            let unused = adapter.unused_modules();
            if !unused.is_empty() {
                return Err(Error::BadAdapter {
                    path: adapter.dir().to_path_buf(),
                    message: format!(
                        "adapts modules this model does not have: {}",
                        unused.join(", ")
                    ),
                });
            }
        }
        Ok(model)
    }
}

impl<B: Backend> Decoder<B> {
    /// Every weight under its Hugging Face key, in PyTorch's `[out, in]` layout (and
    /// InternLM2's interleaved `wqkv`), ready for [`crate::checkpoint::save_safetensors`].
    /// Loading and saving round-trips a checkpoint exactly.
    ///
    /// # Errors
    /// Weights that cannot be read on the host.
    pub fn to_hf_tensors(&self, config: &DecoderConfig) -> Result<Vec<(String, TensorData)>> {
        let c = config;
        let (h, k, d, hidden) = (c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size);
        let mut out = Vec::new();
        let family = c.family;
        out.push((
            format!("{}.weight", family.embed()),
            self.tok_embeddings.val().into_data(),
        ));
        for (i, layer) in self.layers.iter().enumerate() {
            let keys = family.layer(i);
            let (rows, bias) = hf_rows(&layer.attention.wqkv)?;
            match &keys.qkv {
                QkvKeys::Interleaved(module) => {
                    let order = internlm2_qkv_rows(h, k, d);
                    let mut inverse = vec![0; order.len()];
                    for (ours, &theirs) in order.iter().enumerate() {
                        inverse[theirs] = ours;
                    }
                    let bias: Option<Vec<f32>> =
                        bias.map(|b| inverse.iter().map(|&r| b[r]).collect());
                    let rows = permute_rows(&rows, &inverse, hidden);
                    split_rows(
                        &mut out,
                        &[(module, order.len())],
                        hidden,
                        &rows,
                        bias.as_deref(),
                    );
                }
                QkvKeys::Packed(module) => {
                    split_rows(
                        &mut out,
                        &[(module, (h + 2 * k) * d)],
                        hidden,
                        &rows,
                        bias.as_deref(),
                    );
                }
                QkvKeys::Separate { q, k: key, v } => split_rows(
                    &mut out,
                    &[(q, h * d), (key, k * d), (v, k * d)],
                    hidden,
                    &rows,
                    bias.as_deref(),
                ),
            }
            let (rows, bias) = hf_rows(&layer.feed_forward.w13)?;
            let inter = c.intermediate_size;
            match &keys.gate_up {
                GateUpKeys::Separate { gate, up } => {
                    split_rows(
                        &mut out,
                        &[(gate, inter), (up, inter)],
                        hidden,
                        &rows,
                        bias.as_deref(),
                    );
                }
                GateUpKeys::Fused(module) => {
                    split_rows(
                        &mut out,
                        &[(module, 2 * inter)],
                        hidden,
                        &rows,
                        bias.as_deref(),
                    );
                }
            }
            let mut linear = |module: &str, l: &Linear<B>| -> Result<()> {
                let [d_in, d_out] = l.dims();
                let (rows, bias) = hf_rows(l)?;
                split_rows(&mut out, &[(module, d_out)], d_in, &rows, bias.as_deref());
                Ok(())
            };
            linear(&keys.wo, &layer.attention.wo)?;
            linear(&keys.w2, &layer.feed_forward.w2)?;
            let a = &layer.attention;
            let norms = [
                (
                    Some(keys.attention_norm.as_str()),
                    Some(&layer.attention_norm),
                ),
                (Some(keys.ffn_norm.as_str()), Some(&layer.ffn_norm)),
                (
                    keys.post_attention_norm.as_deref(),
                    layer.post_attention_norm.as_ref(),
                ),
                (keys.post_ffn_norm.as_deref(), layer.post_ffn_norm.as_ref()),
                (
                    keys.qk_norms.as_ref().map(|n| n.0.as_str()),
                    a.q_norm.as_ref(),
                ),
                (
                    keys.qk_norms.as_ref().map(|n| n.1.as_str()),
                    a.k_norm.as_ref(),
                ),
            ];
            for (module, norm) in norms {
                if let (Some(module), Some(norm)) = (module, norm) {
                    out.push((format!("{module}.weight"), norm.weight.val().into_data()));
                }
            }
        }
        out.push((
            format!("{}.weight", family.norm()),
            self.norm.weight.val().into_data(),
        ));
        if let Some(output) = &self.output {
            let [d_in, d_out] = output.dims();
            out.push((
                format!("{}.weight", family.output()),
                TensorData::new(hf_rows(output)?.0, [d_out, d_in]),
            ));
        }
        Ok(out)
    }
}

/// A linear layer's weight as PyTorch `[out, in]` rows, and its bias.
fn hf_rows<B: Backend>(linear: &Linear<B>) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let rows = host_vec(linear.dense_weight().transpose().into_data())?;
    let bias = match &linear.bias {
        Some(b) => Some(host_vec(b.val().into_data())?),
        None => None,
    };
    Ok((rows, bias))
}

/// Reads HF tensors as row-major `[out, in]` data, with an adapter merged in.
struct Source<'a> {
    ckpt: &'a Checkpoint,
    adapter: Option<&'a PeftAdapter>,
}

impl Source<'_> {
    fn vector(&self, key: &str, n: usize) -> Result<Vec<f32>> {
        self.data(key, vec![n])
    }

    fn data(&self, key: &str, shape: Vec<usize>) -> Result<Vec<f32>> {
        let found = self.ckpt.shape(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_string(),
            path: self.ckpt.path().to_path_buf(),
        })?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected: shape,
                found,
            });
        }
        let data = self.ckpt.float_data(key)?;
        self.ckpt.mark_used(key);
        data.to_vec::<f32>().map_err(|e| Error::Safetensors {
            path: self.ckpt.path().to_path_buf(),
            message: format!("{key}: {e:?}"),
        })
    }

    /// `module.weight` as `[out, in]` rows, plus the adapter's `scale·B·A`.
    fn linear_rows(&self, module: &str, out: usize, inp: usize) -> Result<Vec<f32>> {
        let mut rows = self.data(&format!("{module}.weight"), vec![out, inp])?;
        if let Some(delta) = self
            .adapter
            .map(|a| a.delta(module, out, inp))
            .transpose()?
            .flatten()
        {
            rows.iter_mut().zip(delta).for_each(|(w, d)| *w += d);
        }
        Ok(rows)
    }

    /// The `[out, in]` rows of `modules` (name, rows) one after another, each with the
    /// adapter's delta, and with `bias` their biases likewise.
    fn stacked(
        &self,
        modules: &[(&String, usize)],
        inp: usize,
        bias: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut rows = Vec::new();
        let mut biases = Vec::new();
        for &(module, out) in modules {
            rows.extend(self.linear_rows(module, out, inp)?);
            if bias {
                biases.extend(self.vector(&format!("{module}.bias"), out)?);
            }
        }
        Ok((rows, bias.then_some(biases)))
    }

    fn linear<B: Backend>(
        &self,
        module: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Linear<B>> {
        let rows = self.linear_rows(module, d_out, d_in)?;
        let bias = bias
            .then(|| self.vector(&format!("{module}.bias"), d_out))
            .transpose()?;
        Ok(linear(rows, d_out, d_in, bias, self.ckpt.options(device)))
    }
}

/// A linear layer from PyTorch `[out, in]` rows (transposed to Burn's `[in, out]`).
fn linear<B: Backend>(
    rows: Vec<f32>,
    out: usize,
    inp: usize,
    bias: Option<Vec<f32>>,
    options: TensorCreationOptions<B>,
) -> Linear<B> {
    let bias = bias.map(|b| Tensor::<B, 1>::from_data(TensorData::new(b, [out]), options.clone()));
    let weight = Tensor::<B, 2>::from_data(TensorData::new(rows, [out, inp]), options).transpose();
    Linear::from_tensors(weight, bias)
}

/// An RMSNorm of the config's ε and offset with the checkpoint's weight.
fn norm<B: Backend>(
    weight: Vec<f32>,
    config: &DecoderConfig,
    options: TensorCreationOptions<B>,
) -> Result<RmsNorm<B>> {
    let n = weight.len();
    let mut norm =
        RmsNorm::new(n, config.rms_norm_eps, &options.device)?.with_offset(config.norm_offset);
    norm.weight = Param::from_tensor(Tensor::from_data(TensorData::new(weight, [n]), options));
    Ok(norm)
}

/// Writes `[rows, width]` data as the tensors of `modules` (name, rows), in order, with
/// their slices of `bias`.
fn split_rows<S: AsRef<str>>(
    out: &mut Vec<(String, TensorData)>,
    modules: &[(S, usize)],
    width: usize,
    rows: &[f32],
    bias: Option<&[f32]>,
) {
    let mut start = 0;
    for (module, n) in modules {
        let (module, n) = (module.as_ref(), *n);
        out.push((
            format!("{module}.weight"),
            TensorData::new(
                rows[start * width..(start + n) * width].to_vec(),
                [n, width],
            ),
        ));
        if let Some(b) = bias {
            out.push((
                format!("{module}.bias"),
                TensorData::new(b[start..start + n].to_vec(), [n]),
            ));
        }
        start += n;
    }
}

/// Rows of a row-major `[rows, width]` matrix in the given order.
fn permute_rows(data: &[f32], order: &[usize], width: usize) -> Vec<f32> {
    order
        .iter()
        .flat_map(|&r| data[r * width..(r + 1) * width].iter().copied())
        .collect()
}
