//! The linear layer, `y = x·W + b`, with `W` stored as `[d_in, d_out]` (Burn's layout;
//! checkpoints store PyTorch's `[out, in]` and are transposed on load).
//!
//! Every weight product of the models goes through [`Linear::forward`], which multiplies
//! through [`crate::nn::gemm::matmul`] (cuBLAS on CUDA); adapters and quantized storage
//! plug in here without touching model code. A [`Lora`] adapter adds `scale·dropout(x)·A·B` (PEFT's LoRA,
//! Hu et al. 2021) without ever forming the merged weight, so its cost is proportional
//! to the rank.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};

use crate::Result;
use crate::checkpoint::Checkpoint;
use crate::nn::gemm::{matmul, matmul_add};
use crate::nn::nf4::{Nf4Tensor, Nf4Weight};
use crate::nn::precision::{compute_dtype, in_dtype};

/// Where a linear layer of a model sits: what adapters, quantization and export
/// need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// The checkpoint modules whose products this layer computes, in the order of its
    /// output columns: one for most layers; `q_proj`, `k_proj`, `v_proj` for the q/k/v
    /// product fused from a Llama-style checkpoint. LoRA adapts each module on its own.
    pub modules: Vec<SiteModule>,
    /// For a layer of one module whose columns are not in checkpoint row order, the
    /// checkpoint row of each of our output columns (InternLM2's interleaved `wqkv`);
    /// `None` when they are in order.
    pub out_rows: Option<Vec<usize>>,
}

/// One checkpoint module of a [`LinearSite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteModule {
    /// The Hugging Face module name (`model.layers.0.attention.wqkv`,
    /// `vision_model.encoder.layers.0.self_attn.q_proj`), which PEFT keys use.
    pub module: String,
    /// The last name component (`wqkv`, `q_proj`, `output`, ...), which LoRA
    /// `target_modules` match.
    pub name: String,
    /// Its first output column in the layer.
    pub offset: usize,
    /// Its number of output columns (the module's `out_features`).
    pub width: usize,
}

impl LinearSite {
    /// The site of a layer that is checkpoint module `module`, `width` columns wide.
    pub fn new(module: &str, width: usize) -> Self {
        Self::fused([(module.to_string(), width)])
    }

    /// The site of a layer fusing `modules` (name, width), their columns side by side
    /// in this order.
    pub fn fused(modules: impl IntoIterator<Item = (String, usize)>) -> Self {
        let mut offset = 0;
        let modules = modules
            .into_iter()
            .map(|(module, width)| {
                let name = module.rsplit('.').next().unwrap_or(&module).to_string();
                let part = SiteModule {
                    module,
                    name,
                    offset,
                    width,
                };
                offset += width;
                part
            })
            .collect();
        Self {
            modules,
            out_rows: None,
        }
    }

    /// This site with its columns taken from the checkpoint rows `rows` (a layer of one
    /// module).
    pub fn with_out_rows(mut self, rows: Vec<usize>) -> Self {
        debug_assert_eq!(self.modules.len(), 1);
        self.out_rows = Some(rows);
        self
    }

    /// Whether the layer computes checkpoint module `module`.
    pub fn holds(&self, module: &str) -> bool {
        self.modules.iter().any(|m| m.module == module)
    }
}

/// A model whose linear layers can be listed and rebuilt by site: what LoRA,
/// quantization and adapter export work on, whatever the model.
///
/// A model names its layers once, in [`LinearLayers::map_linear_layers`], each site
/// next to the field it rebuilds; the listing is derived from it, so the two cannot
/// disagree.
pub trait LinearLayers<B: Backend>: Sized + Clone {
    /// What the sites are derived from (the model's config).
    type Config;

    /// Rebuilds every linear layer through `f`, each with its site.
    ///
    /// # Errors
    /// Whatever `f` returns.
    fn map_linear_layers<E>(
        self,
        config: &Self::Config,
        f: impl FnMut(&LinearSite, Linear<B>) -> std::result::Result<Linear<B>, E>,
    ) -> std::result::Result<Self, E>;

    /// Every linear layer with its site, in the order of
    /// [`LinearLayers::map_linear_layers`] (the layers are shared, not copied: Burn's
    /// tensors are reference-counted).
    fn linear_layers(&self, config: &Self::Config) -> Vec<(LinearSite, Linear<B>)> {
        let mut out = Vec::new();
        let listed: std::result::Result<Self, std::convert::Infallible> =
            self.clone().map_linear_layers(config, |site, linear| {
                out.push((site.clone(), linear.clone()));
                Ok(linear)
            });
        drop(listed);
        out
    }

    /// The device memory of the NF4 weights (QLoRA's base): constants, which Burn's
    /// module visitors do not see.
    fn nf4_bytes(&self, config: &Self::Config) -> usize {
        self.linear_layers(config)
            .iter()
            .filter_map(|(_, linear)| linear.nf4.as_ref())
            .map(Nf4Weight::device_bytes)
            .sum()
    }
}

/// A linear layer. Field names are the checkpoint's key segments (`weight`, `bias`).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`, when the layer has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A low-rank adapter, when one is attached.
    pub lora: Option<Lora<B>>,
    /// QLoRA's 4-bit storage of the base weight, when quantized
    /// ([`Linear::quantize_nf4`]); `weight` is then a `[1, 1]` placeholder.
    pub nf4: Option<Nf4Weight<B>>,
}

/// A LoRA adapter (PEFT's LoRA, Hu et al. 2021) on a linear layer: one low-rank pair
/// per adapted checkpoint module of the layer ([`LinearSite::modules`]), each adding
/// `scale · dropout(x)·A·B` to its own output columns.
///
/// For a layer fused from several modules (Llama's q/k/v) the pairs run as one product:
/// the A's side by side, the B's block-diagonal, so the arithmetic is PEFT's three
/// adapters and the cost one adapter of rank `parts · r`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// One pair per adapted module, in column order.
    pub parts: Vec<LoraPart<B>>,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the adapter's input (training only), drawn per module.
    pub dropout: f64,
}

/// The low-rank pair of one checkpoint module: `ΔW = scale · A·B` with `A: [d_in, r]`,
/// `B: [r, width]` (PEFT stores their transposes as `lora_A.weight` `[r, in]` and
/// `lora_B.weight` `[out, r]`).
#[derive(Module, Debug)]
pub struct LoraPart<B: Backend> {
    /// Down projection `[d_in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// Up projection `[r, width]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// The first output column of the layer that the module writes.
    pub offset: usize,
}

impl<B: Backend> LoraPart<B> {
    /// A pair from `A: [d_in, r]` and `B: [r, width]` writing columns from `offset`.
    pub fn new(a: Tensor<B, 2>, b: Tensor<B, 2>, offset: usize) -> Self {
        Self {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            offset,
        }
    }

    /// The number of output columns the pair writes.
    pub fn width(&self) -> usize {
        self.lora_b.dims()[1]
    }
}

impl<B: Backend> Lora<B> {
    /// An adapter of one pair covering the whole layer, from `A: [d_in, r]` and
    /// `B: [r, d_out]`.
    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self::new(vec![LoraPart::new(a, b, 0)], scale, dropout)
    }

    /// An adapter of these pairs (in column order, not overlapping).
    pub fn new(parts: Vec<LoraPart<B>>, scale: f64, dropout: f64) -> Self {
        Self {
            parts,
            scale,
            dropout,
        }
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.parts.first().map_or(0, |p| p.lora_a.dims()[1])
    }

    /// `scale · dropout(x)·A·B` over the layer's `d_out` columns.
    ///
    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, d_out: usize) -> Tensor<B, D> {
        let dtype = x.dtype();
        matmul(self.down(x), self.block_b(d_out, dtype)) * self.scale
    }

    /// `y + forward(x)`, the update accumulated into `y` (one product on the CPU).
    ///
    /// # Shapes
    /// `y`: `[..., d_out]`; `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn add_to<const D: usize>(&self, y: Tensor<B, D>, x: Tensor<B, D>) -> Tensor<B, D> {
        let (dtype, d_out) = (x.dtype(), y.dims()[D - 1]);
        matmul_add(y, self.down(x), self.block_b(d_out, dtype), self.scale)
    }

    /// `dropout(x)·A` for every pair, side by side: `[..., parts·r]`.
    fn down<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        // Burn's dropout is active only while gradients are tracked (training); each
        // module draws its own mask, as PEFT's per-module dropout does.
        let drop = |x: Tensor<B, D>| {
            if self.dropout > 0.0 {
                burn::nn::Dropout { prob: self.dropout }.forward(x)
            } else {
                x
            }
        };
        let a = |p: &LoraPart<B>| in_dtype(p.lora_a.val(), dtype);
        if self.dropout > 0.0 && self.parts.len() > 1 {
            let pieces = self.parts.iter().map(|p| matmul(drop(x.clone()), a(p)));
            Tensor::cat(pieces.collect(), D - 1)
        } else {
            matmul(drop(x), self.stacked_a(dtype))
        }
    }

    /// `scale · A·B` as a `[d_in, d_out]` matrix (for merging).
    pub fn delta(&self, d_out: usize) -> Tensor<B, 2> {
        let dtype = self
            .parts
            .first()
            .map_or(DType::F32, |p| p.lora_a.val().dtype());
        self.stacked_a(dtype).matmul(self.block_b(d_out, dtype)) * self.scale
    }

    /// The A's side by side, `[d_in, parts·r]`.
    fn stacked_a(&self, dtype: DType) -> Tensor<B, 2> {
        let a: Vec<_> = self
            .parts
            .iter()
            .map(|p| in_dtype(p.lora_a.val(), dtype))
            .collect();
        cat(a, 1)
    }

    /// The B's block-diagonal, `[parts·r, d_out]`: pair i's rows are zero outside its
    /// columns (constant zeros, so only the pairs' own entries train).
    fn block_b(&self, d_out: usize, dtype: DType) -> Tensor<B, 2> {
        let rows: Vec<_> = self
            .parts
            .iter()
            .map(|p| {
                let b = in_dtype(p.lora_b.val(), dtype);
                let [r, width] = b.dims();
                let device = b.device();
                let after = d_out.saturating_sub(p.offset + width);
                let mut row = Vec::with_capacity(3);
                if p.offset > 0 {
                    row.push(Tensor::zeros([r, p.offset], (&device, dtype)));
                }
                row.push(b);
                if after > 0 {
                    row.push(Tensor::zeros([r, after], (&device, dtype)));
                }
                cat(row, 1)
            })
            .collect();
        cat(rows, 0)
    }
}

/// `parts` concatenated along `dim`; a single part as it is (no copy).
fn cat<B: Backend>(mut parts: Vec<Tensor<B, 2>>, dim: usize) -> Tensor<B, 2> {
    match (parts.len(), parts.pop()) {
        (1, Some(only)) => only,
        (_, Some(last)) => {
            parts.push(last);
            Tensor::cat(parts, dim)
        }
        (_, None) => Tensor::cat(parts, dim),
    }
}

impl<B: Backend> Linear<B> {
    /// A layer initialised as PyTorch's `nn.Linear` (uniform ±1/√d_in).
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let dist = Distribution::Uniform(-bound, bound);
        Self {
            weight: Param::from_tensor(Tensor::random([d_in, d_out], dist, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([d_out], dist, device))),
            lora: None,
            nf4: None,
        }
    }

    /// Loads `{prefix}.weight` (`[out, in]` on disk) and, with `bias`, `{prefix}.bias`.
    ///
    /// # Errors
    /// A missing tensor or a shape other than `[d_out, d_in]`.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let weight = ckpt.linear_weight::<B>(&format!("{prefix}.weight"), d_out, d_in, device)?;
        let bias = if bias {
            Some(Param::from_tensor(ckpt.tensor::<B, 1>(
                &format!("{prefix}.bias"),
                [d_out],
                device,
            )?))
        } else {
            None
        };
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias,
            lora: None,
            nf4: None,
        })
    }

    /// A layer from a `[d_in, d_out]` weight and optional bias.
    pub fn from_tensors(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            lora: None,
            nf4: None,
        }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.nf4 {
            Some(nf4) => nf4.dims(),
            None => self.weight.val().dims(),
        }
    }

    /// The base weight as a dense `[d_in, d_out]` matrix: `weight`, or the NF4 storage
    /// dequantized. Code that reads or rewrites the base weight (export, merging) must
    /// use this, not `weight`, which is a 1×1 placeholder for an NF4 layer.
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match &self.nf4 {
            Some(nf4) => nf4.dequantize(compute_dtype::<B>()),
            None => self.weight.val(),
        }
    }

    /// The base weight in `dtype`, as a forward reads it: an NF4 weight dequantized
    /// straight into it, a dense one cast when stored wider (master weights).
    fn weight_in(&self, dtype: DType) -> Tensor<B, 2> {
        match &self.nf4 {
            Some(nf4) => nf4.dequantize(dtype),
            None => in_dtype(self.weight.val(), dtype),
        }
    }

    /// The base weight and bias as PyTorch tensors under `module` (`{module}.weight`
    /// `[out, in]`, `{module}.bias`), as `state_dict` names them. An adapter is not
    /// merged in.
    pub fn to_hf_tensors(&self, module: &str) -> Vec<(String, burn::tensor::TensorData)> {
        let mut out = vec![(
            format!("{module}.weight"),
            self.dense_weight().transpose().into_data(),
        )];
        if let Some(bias) = &self.bias {
            out.push((format!("{module}.bias"), bias.val().into_data()));
        }
        out
    }

    /// Replaces the dense base weight by QLoRA's NF4 storage (bitsandbytes'
    /// `quantize_4bit` of the PyTorch `[out, in]` matrix, blocks of `block_size`, with
    /// `double_quant` compressing the absmax); forward dequantizes it on the fly. Bias
    /// and adapter are kept.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for a layer that is already NF4, an empty weight,
    /// a block size that is 0 or odd, or a non-finite weight.
    pub fn quantize_nf4(self, block_size: usize, double_quant: bool) -> Result<Self> {
        if self.nf4.is_some() {
            return Err(crate::Error::InvalidInput {
                name: "linear",
                message: "the layer is already NF4-quantized".into(),
            });
        }
        let weight = self.weight.val();
        let device = weight.device();
        let [d_in, d_out] = weight.dims();
        let rows = weight
            .transpose()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>(); // [out, in]
        let rows = rows.map_err(|e| crate::Error::InvalidInput {
            name: "linear",
            message: format!("weight data: {e:?}"),
        })?;
        let nf4 = Nf4Tensor::quantize(&rows, [d_out, d_in], block_size, double_quant)?;
        Ok(Self {
            // Not `[0, 0]`: filling an empty tensor is a zero-size kernel launch, which
            // CUDA rejects (cubecl 0.10 does not skip it).
            weight: Param::from_tensor(Tensor::zeros([1, 1], &device)).set_require_grad(false),
            bias: self.bias,
            lora: self.lora,
            nf4: Some(Nf4Weight::from_tensor(&nf4, &device)),
        })
    }

    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // Weights stored wider than the input (master weights) are read in its dtype.
        let dtype = x.dtype();
        let mut y = matmul(x.clone(), self.weight_in(dtype));
        if let Some(bias) = &self.bias {
            y = y + in_dtype(bias.val(), dtype).unsqueeze::<D>();
        }
        match &self.lora {
            Some(lora) => lora.add_to(y, x),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::{TensorData, Tolerance};

    #[test]
    fn forward_is_x_w_plus_b() {
        let device = Default::default();
        let w = Tensor::<TestBackend, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &device);
        let b = Tensor::<TestBackend, 1>::from_floats([0.5, 0.0, -1.0], &device);
        let linear = Linear::from_tensors(w, Some(b));
        let x = Tensor::<TestBackend, 3>::from_floats([[[1.0, 1.0]], [[2.0, -1.0]]], &device);
        let y = linear.forward(x);
        let expected = TensorData::from([[[5.5, 7.0, 8.0]], [[-1.5, -1.0, -1.0]]]);
        y.into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
        assert_eq!(linear.dims(), [2, 3]);
    }

    #[test]
    fn lora_adds_the_low_rank_update_and_starts_at_zero() {
        let device = Default::default();
        let w = Tensor::<TestBackend, 2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        let mut linear = Linear::from_tensors(w, None);
        let a = Tensor::<TestBackend, 2>::from_floats([[0.3], [-0.2]], &device);
        linear.lora = Some(Lora::from_tensors(
            a,
            Tensor::zeros([1, 2], &device),
            2.0,
            0.0,
        ));
        let x = Tensor::<TestBackend, 2>::from_floats([[3.0, 4.0]], &device);
        linear
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[3.0, 4.0]]), Tolerance::absolute(1e-6));
        let a = Tensor::<TestBackend, 2>::from_floats([[1.0], [1.0]], &device);
        let b = Tensor::<TestBackend, 2>::from_floats([[0.5, -1.0]], &device);
        let lora = Lora::from_tensors(a, b, 2.0, 0.0);
        // x·A = 7; ·B = [3.5, -7]; ·2 = [7, -14].
        lora.delta(2).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[1.0, -2.0], [1.0, -2.0]]),
            Tolerance::absolute(1e-6),
        );
        linear.lora = Some(lora);
        linear.forward(x).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[10.0, -10.0]]),
            Tolerance::absolute(1e-5),
        );
    }

    /// A layer fused from three modules with an adapter on the first and the last is
    /// the three layers side by side, each with its own adapter (PEFT's arithmetic),
    /// forward and merged; the middle module's columns are the base's alone.
    #[test]
    fn a_fused_layer_adapts_each_module_on_its_own() {
        let device = Default::default();
        let uniform = Distribution::Uniform(-0.5, 0.5);
        let widths = [6, 2, 3];
        let parts: Vec<Linear<TestBackend>> = widths
            .iter()
            .map(|&w| Linear::new(5, w, true, &device))
            .collect();
        let pair = |w: usize| {
            (
                Tensor::<TestBackend, 2>::random([5, 2], uniform, &device),
                Tensor::<TestBackend, 2>::random([2, w], uniform, &device),
            )
        };
        let (a0, b0) = pair(6);
        let (a2, b2) = pair(3);
        let weights: Vec<_> = parts.iter().map(|p| p.weight.val()).collect();
        let biases: Vec<_> = parts
            .iter()
            .map(|p| p.bias.as_ref().unwrap().val())
            .collect();
        let mut fused = Linear::from_tensors(Tensor::cat(weights, 1), Some(Tensor::cat(biases, 0)));
        fused.lora = Some(Lora::new(
            vec![
                LoraPart::new(a0.clone(), b0.clone(), 0),
                LoraPart::new(a2.clone(), b2.clone(), 8),
            ],
            1.5,
            0.0,
        ));
        let mut separate = parts;
        separate[0].lora = Some(Lora::from_tensors(a0, b0, 1.5, 0.0));
        separate[2].lora = Some(Lora::from_tensors(a2, b2, 1.5, 0.0));
        let x = Tensor::<TestBackend, 3>::random([2, 3, 5], uniform, &device);
        let expected = Tensor::cat(separate.iter().map(|l| l.forward(x.clone())).collect(), 2);
        fused
            .forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
        let lora = fused.lora.as_ref().unwrap();
        let delta = lora.delta(11);
        assert_eq!(delta.dims(), [5, 11]);
        let middle = delta.clone().slice([0..5, 6..8]);
        assert_eq!(middle.abs().max().into_scalar(), 0.0);
        let want = separate[2].lora.as_ref().unwrap().delta(3);
        delta
            .slice([0..5, 8..11])
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-6));
    }

    #[test]
    fn nf4_layer_with_lora_is_the_dequantized_dense_layer_plus_the_adapter() {
        let device = Default::default();
        let base = Linear::<TestBackend>::new(64, 24, true, &device);
        let a =
            Tensor::<TestBackend, 2>::random([64, 4], Distribution::Uniform(-0.1, 0.1), &device);
        let b =
            Tensor::<TestBackend, 2>::random([4, 24], Distribution::Uniform(-0.1, 0.1), &device);
        let mut linear = base.clone();
        linear.lora = Some(Lora::from_tensors(a.clone(), b.clone(), 2.0, 0.0));
        for double_quant in [false, true] {
            let q = linear.clone().quantize_nf4(64, double_quant).unwrap();
            assert_eq!(q.dims(), [64, 24]);
            assert_eq!(q.weight.val().dims(), [1, 1]);
            assert!(q.clone().quantize_nf4(64, double_quant).is_err());
            // The reference: a dense layer holding the dequantized weight, plus the adapter.
            let rows = base
                .weight
                .val()
                .transpose()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let deq = Nf4Tensor::quantize(&rows, [24, 64], 64, double_quant)
                .unwrap()
                .dequantize();
            let w = Tensor::<TestBackend, 2>::from_data(TensorData::new(deq, [24, 64]), &device)
                .transpose();
            let mut dense = Linear::from_tensors(w, base.bias.as_ref().map(|b| b.val()));
            dense.lora = Some(Lora::from_tensors(a.clone(), b.clone(), 2.0, 0.0));
            let x = Tensor::<TestBackend, 3>::random(
                [2, 3, 64],
                Distribution::Uniform(-1.0, 1.0),
                &device,
            );
            let expected = dense.forward(x.clone()).into_data();
            q.forward(x)
                .into_data()
                .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
            let dequantized = q.dense_weight().into_data().to_vec::<f32>().unwrap();
            assert_eq!(
                dequantized,
                dense.weight.val().into_data().to_vec::<f32>().unwrap()
            );
        }
        assert!(
            Linear::<TestBackend>::new(4, 4, false, &device)
                .quantize_nf4(3, false)
                .is_err()
        );
    }

    #[test]
    fn nf4_layer_trains_only_its_adapter() {
        type Ad = burn::backend::Autodiff<TestBackend>;
        let device = Default::default();
        let mut linear = Linear::<Ad>::new(8, 4, false, &device)
            .quantize_nf4(4, true)
            .unwrap();
        let a = Tensor::<Ad, 2>::ones([8, 2], &device);
        linear.lora = Some(Lora::from_tensors(
            a,
            Tensor::ones([2, 4], &device),
            1.0,
            0.0,
        ));
        let x = Tensor::<Ad, 2>::ones([3, 8], &device).require_grad();
        let grads = linear.forward(x.clone()).sum().backward();
        let lora = linear.lora.as_ref().unwrap();
        let part = &lora.parts[0];
        assert!(part.lora_a.grad(&grads).is_some() && part.lora_b.grad(&grads).is_some());
        assert!(x.grad(&grads).is_some());
        assert!(linear.weight.grad(&grads).is_none());
        // The NF4 tensors are constants: the only parameters left are the placeholder and the adapter.
        assert_eq!(linear.num_params(), 1 + 8 * 2 + 2 * 4);
    }

    #[test]
    fn init_is_bounded_by_fan_in() {
        let linear = Linear::<TestBackend>::new(16, 8, true, &Default::default());
        let max = linear.weight.val().abs().max().into_scalar();
        assert!(max <= 0.25 + 1e-6, "{max}");
    }
}
