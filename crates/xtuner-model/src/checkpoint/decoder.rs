//! The decoder's Hugging Face checkpoints: loading `config.json` + safetensors (with a
//! PEFT adapter merged in as they load) into [`Decoder`], and writing it back under
//! the same keys. Each family's key names and InternLM2's KV-group-interleaved `wqkv`
//! are [`super::keys`]'s; PyTorch's `[out, in]` weights become Burn's `[in, out]` here.

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorCreationOptions, TensorData};

use super::Checkpoint;
use super::keys::{QkvKeys, internlm2_qkv_rows};
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
        let qkv_out = (h + 2 * k) * d;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let keys = family.layer(i);
            let (qkv_rows, qkv_bias) = match &keys.qkv {
                QkvKeys::Fused(module) => {
                    let rows = src.linear_rows(module, qkv_out, hidden)?;
                    let bias = c
                        .qkv_bias
                        .then(|| src.vector(&format!("{module}.bias"), qkv_out))
                        .transpose()?;
                    let order = internlm2_qkv_rows(h, k, d);
                    (
                        permute_rows(&rows, &order, hidden),
                        bias.map(|b| order.iter().map(|&r| b[r]).collect()),
                    )
                }
                QkvKeys::Separate { q, k: key, v } => {
                    let mut rows = src.linear_rows(q, h * d, hidden)?;
                    rows.extend(src.linear_rows(key, k * d, hidden)?);
                    rows.extend(src.linear_rows(v, k * d, hidden)?);
                    let bias = if c.qkv_bias {
                        let mut b = src.vector(&format!("{q}.bias"), h * d)?;
                        b.extend(src.vector(&format!("{key}.bias"), k * d)?);
                        b.extend(src.vector(&format!("{v}.bias"), k * d)?);
                        Some(b)
                    } else {
                        None
                    };
                    (rows, bias)
                }
            };
            layers.push(Block {
                attention_norm: norm(
                    src.vector(&format!("{}.weight", keys.attention_norm), hidden)?,
                    c.rms_norm_eps,
                    ckpt.options(device),
                )?,
                attention: Attention {
                    wqkv: linear(qkv_rows, qkv_out, hidden, qkv_bias, ckpt.options(device)),
                    wo: src.linear(&keys.wo, h * d, hidden, c.o_bias, device)?,
                    n_heads: h,
                    n_kv_heads: k,
                    head_dim: d,
                },
                ffn_norm: norm(
                    src.vector(&format!("{}.weight", keys.ffn_norm), hidden)?,
                    c.rms_norm_eps,
                    ckpt.options(device),
                )?,
                feed_forward: FeedForward {
                    w1: src.linear(&keys.w1, hidden, c.intermediate_size, c.mlp_bias, device)?,
                    w2: src.linear(&keys.w2, c.intermediate_size, hidden, c.mlp_bias, device)?,
                    w3: src.linear(&keys.w3, hidden, c.intermediate_size, c.mlp_bias, device)?,
                },
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
            norm: norm(
                src.vector(&format!("{}.weight", family.norm()), hidden)?,
                c.rms_norm_eps,
                ckpt.options(device),
            )?,
            output,
            rope: c.rope,
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
                QkvKeys::Fused(module) => {
                    let order = internlm2_qkv_rows(h, k, d);
                    let mut inverse = vec![0; order.len()];
                    for (ours, &theirs) in order.iter().enumerate() {
                        inverse[theirs] = ours;
                    }
                    let n = order.len();
                    out.push((
                        format!("{module}.weight"),
                        TensorData::new(permute_rows(&rows, &inverse, hidden), [n, hidden]),
                    ));
                    if let Some(b) = bias {
                        out.push((
                            format!("{module}.bias"),
                            TensorData::new(
                                inverse.iter().map(|&r| b[r]).collect::<Vec<f32>>(),
                                [n],
                            ),
                        ));
                    }
                }
                QkvKeys::Separate { q, k: key, v } => {
                    let parts = [(q, 0, h * d), (key, h * d, k * d), (v, (h + k) * d, k * d)];
                    for (module, start, n) in parts {
                        out.push((
                            format!("{module}.weight"),
                            TensorData::new(
                                rows[start * hidden..(start + n) * hidden].to_vec(),
                                [n, hidden],
                            ),
                        ));
                        if let Some(b) = &bias {
                            out.push((
                                format!("{module}.bias"),
                                TensorData::new(b[start..start + n].to_vec(), [n]),
                            ));
                        }
                    }
                }
            }
            let mut linear = |module: &str, l: &Linear<B>| -> Result<()> {
                let [d_in, d_out] = l.dims();
                let (rows, bias) = hf_rows(l)?;
                out.push((
                    format!("{module}.weight"),
                    TensorData::new(rows, [d_out, d_in]),
                ));
                if let Some(b) = bias {
                    out.push((format!("{module}.bias"), TensorData::new(b, [d_out])));
                }
                Ok(())
            };
            linear(&keys.wo, &layer.attention.wo)?;
            linear(&keys.w1, &layer.feed_forward.w1)?;
            linear(&keys.w2, &layer.feed_forward.w2)?;
            linear(&keys.w3, &layer.feed_forward.w3)?;
            out.push((
                format!("{}.weight", keys.attention_norm),
                layer.attention_norm.weight.val().into_data(),
            ));
            out.push((
                format!("{}.weight", keys.ffn_norm),
                layer.ffn_norm.weight.val().into_data(),
            ));
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

fn norm<B: Backend>(
    weight: Vec<f32>,
    eps: f64,
    options: TensorCreationOptions<B>,
) -> Result<RmsNorm<B>> {
    let n = weight.len();
    let mut norm = RmsNorm::new(n, eps, &options.device)?;
    norm.weight = Param::from_tensor(Tensor::from_data(TensorData::new(weight, [n]), options));
    Ok(norm)
}

/// Rows of a row-major `[rows, width]` matrix in the given order.
fn permute_rows(data: &[f32], order: &[usize], width: usize) -> Vec<f32> {
    order
        .iter()
        .flat_map(|&r| data[r * width..(r + 1) * width].iter().copied())
        .collect()
}
