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
use crate::nn::gemm::matmul;
use crate::nn::nf4::{Nf4Tensor, Nf4Weight};
use crate::nn::precision::{compute_dtype, in_dtype};

/// Where a linear layer of a model sits: what adapters, quantization and export
/// need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// The Hugging Face module name (`model.layers.0.attention.wqkv`,
    /// `vision_model.encoder.layers.0.self_attn.q_proj`), which PEFT keys use.
    pub module: String,
    /// The last name component (`wqkv`, `wo`, `w1`, `w2`, `w3`, `output`; Llama names
    /// for the other families), which LoRA `target_modules` match.
    pub name: String,
    /// For the fused q/k/v layer, the checkpoint row of each of our output columns
    /// (InternLM2's interleaved layout); `None` when they are in checkpoint order.
    pub out_rows: Option<Vec<usize>>,
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

/// A LoRA adapter: `ΔW = scale · A·B` with `A: [d_in, r]`, `B: [r, d_out]` (PEFT stores
/// their transposes as `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Down projection `[d_in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// Up projection `[r, d_out]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    /// An adapter from `A: [d_in, r]` and `B: [r, d_out]`.
    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scale,
            dropout,
        }
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[1]
    }

    /// `scale · dropout(x)·A·B`.
    ///
    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // Burn's dropout is active only while gradients are tracked (training).
        let x = if self.dropout > 0.0 {
            burn::nn::Dropout { prob: self.dropout }.forward(x)
        } else {
            x
        };
        let dtype = x.dtype();
        matmul(
            matmul(x, in_dtype(self.lora_a.val(), dtype)),
            in_dtype(self.lora_b.val(), dtype),
        ) * self.scale
    }

    /// `scale · A·B` as a `[d_in, d_out]` matrix (for merging).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scale
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
            Some(lora) => y + lora.forward(x),
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
        lora.delta().into_data().assert_approx_eq::<f32>(
            &TensorData::from([[1.0, -2.0], [1.0, -2.0]]),
            Tolerance::absolute(1e-6),
        );
        linear.lora = Some(lora);
        linear.forward(x).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[10.0, -10.0]]),
            Tolerance::absolute(1e-5),
        );
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
        assert!(lora.lora_a.grad(&grads).is_some() && lora.lora_b.grad(&grads).is_some());
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
