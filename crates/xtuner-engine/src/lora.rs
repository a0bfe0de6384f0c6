//! LoRA policy: which layers get adapters (XTuner's rule), how they start (PEFT's
//! initialisation, or a PEFT adapter directory), freezing the base, QLoRA's NF4 base
//! and merging. The same policy serves every model with [`LinearLayers`]: the decoder
//! and, for LLaVA, the CLIP vision tower. Writing adapters is the PEFT layout's, in
//! `export/peft.rs`.

use std::collections::BTreeSet;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::decoder::{Decoder, DecoderConfig, LinearSite};
use xtuner_model::nn::linear::{Linear, LinearLayers, Lora, LoraPart};

use crate::config::LoraConfig;
use crate::init;
use crate::{Error, Result};

/// Module names XTuner's `find_all_linear_names` leaves out of the default targets:
/// the LM head as most families name it (InternLM2's head, `output`, stays a target).
pub const NOT_DEFAULT_TARGETS: [&str; 2] = ["lm_head", "output_layer"];

/// The module names that LoRA targets: the given ones (checked), or XTuner's default,
/// the last name of every linear module of the model (`find_all_linear_names`) minus
/// [`NOT_DEFAULT_TARGETS`]. Names are the checkpoint's: `q_proj`, `k_proj` and
/// `v_proj` of a Llama-style model are three targets, though they run as one product.
///
/// # Errors
/// A target that names no linear module of the model (the valid names are listed).
pub fn resolve_targets<B: Backend, M: LinearLayers<B>>(
    model: &M,
    config: &M::Config,
    targets: &[String],
) -> Result<BTreeSet<String>> {
    let names: BTreeSet<String> = model
        .linear_layers(config)
        .into_iter()
        .flat_map(|(site, _)| site.modules.into_iter().map(|m| m.name))
        .collect();
    if targets.is_empty() {
        return Ok(names
            .into_iter()
            .filter(|n| !NOT_DEFAULT_TARGETS.contains(&n.as_str()))
            .collect());
    }
    for target in targets {
        if !names.contains(target) {
            return Err(Error::setting(
                "target_modules",
                format!(
                    "`{target}` is not a linear module of this model; valid: {}",
                    names.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(targets.iter().cloned().collect())
}

/// QLoRA: stores the frozen base weight of every decoder linear layer in NF4
/// (bitsandbytes' 4-bit NormalFloat, optionally double-quantized), dequantized on the
/// fly in forward; embeddings and the LM head stay dense, as in QLoRA.
///
/// # Errors
/// A block size the quantizer refuses.
pub fn quantize_base<B: Backend>(
    model: Decoder<B>,
    config: &DecoderConfig,
    block_size: usize,
    double_quant: bool,
) -> Result<Decoder<B>> {
    let head = config.family.output();
    model.map_linear_layers(config, |site, linear: Linear<B>| -> Result<Linear<B>> {
        if site.holds(head) {
            Ok(linear)
        } else {
            Ok(linear.quantize_nf4(block_size, double_quant)?)
        }
    })
}

/// Freezes the whole model and attaches fresh adapters (PEFT's init, [`fresh_lora`]
/// seeded with `seed`) to the targets.
///
/// # Errors
/// An unknown target.
pub fn attach<B: Backend, M: LinearLayers<B> + Module<B>>(
    model: M,
    config: &M::Config,
    lora: &LoraConfig,
    seed: u64,
    device: &B::Device,
) -> Result<M> {
    let targets = resolve_targets(&model, config, &lora.target_modules)?;
    let scale = lora.alpha / lora.r.max(1) as f64;
    model
        .no_grad()
        .map_linear_layers(config, |site, mut linear: Linear<B>| {
            let [d_in, _] = linear.dims();
            let parts: Vec<_> = site
                .modules
                .iter()
                .filter(|m| targets.contains(&m.name))
                .map(|m| fresh_lora(&m.module, [d_in, m.width], lora.r, seed, device, m.offset))
                .collect();
            if !parts.is_empty() {
                linear.lora = Some(Lora::new(parts, scale, lora.dropout));
            }
            Ok(linear)
        })
}

/// PEFT's initialisation of the adapter of checkpoint module `module` (`[d_in, d_out]`,
/// written from column `offset` of its layer): A kaiming-uniform with a = √5, i.e.
/// uniform in ±1/√d_in, B zeros, so the adapted layer starts equal to the base. Both
/// are f32 (the masters' dtype) whatever the backend computes in; A is drawn on the
/// host ([`crate::init`]) as `{module}.lora_A`, so a config starts from the same
/// adapters on the CPU and the GPU.
pub fn fresh_lora<B: Backend>(
    module: &str,
    [d_in, d_out]: [usize; 2],
    r: usize,
    seed: u64,
    device: &B::Device,
    offset: usize,
) -> LoraPart<B> {
    let key = format!("{module}.lora_A");
    let a = init::uniform(&key, [d_in, r], init::kaiming_bound(d_in), seed, device);
    LoraPart::new(
        a,
        Tensor::zeros([r, d_out], (device, crate::optim::MASTER_DTYPE)),
        offset,
    )
}

/// Freezes the model and attaches the adapters of a PEFT directory (trainable), to
/// continue training them.
///
/// # Errors
/// An adapter whose shapes or modules do not fit the model.
pub fn attach_peft<B: Backend, M: LinearLayers<B> + Module<B>>(
    model: M,
    config: &M::Config,
    adapter: &PeftAdapter,
    dropout: f64,
    device: &B::Device,
) -> Result<M> {
    let scale = adapter.scale();
    let model = model.no_grad().map_linear_layers(
        config,
        |site, mut linear: Linear<B>| -> Result<Linear<B>> {
            let [d_in, _] = linear.dims();
            let mut parts = Vec::new();
            for m in &site.modules {
                let Some((a, b)) = adapter.pair(&m.module, m.width, d_in)? else {
                    continue;
                };
                let r = a.len() / d_in.max(1);
                // In the masters' dtype, so a resumed bf16 run continues from the exact f32
                // values it saved.
                let options = (device, crate::optim::MASTER_DTYPE);
                let a =
                    Tensor::<B, 2>::from_data(TensorData::new(a, [r, d_in]), options).transpose(); // [in, r]
                let b = permute_out_rows(b, site, r); // [out, r] in our column order
                let b = Tensor::<B, 2>::from_data(TensorData::new(b, [m.width, r]), options)
                    .transpose(); // [r, out]
                parts.push(LoraPart::new(a, b, m.offset));
            }
            if !parts.is_empty() {
                linear.lora = Some(Lora::new(parts, scale, dropout));
            }
            Ok(linear)
        },
    )?;
    let unused = adapter.unused_modules();
    if !unused.is_empty() {
        return Err(Error::Model(xtuner_model::Error::BadAdapter {
            path: adapter.dir().to_path_buf(),
            message: format!(
                "adapts modules this model does not have: {}",
                unused.join(", ")
            ),
        }));
    }
    Ok(model)
}

/// `B`'s rows (`[out, r]`, checkpoint order) rearranged into the layer's column order
/// (a site of one module whose rows are permuted).
fn permute_out_rows(b: Vec<f32>, site: &LinearSite, r: usize) -> Vec<f32> {
    match &site.out_rows {
        Some(order) => order
            .iter()
            .flat_map(|&row| b[row * r..(row + 1) * r].iter().copied())
            .collect(),
        None => b,
    }
}

/// The model with every adapter switched off (PEFT's `disable_adapter()`): the base
/// weights are shared, not copied (Burn's tensors are reference-counted). DPO's
/// reference under LoRA.
pub fn without_adapters<B: Backend, M: LinearLayers<B>>(model: M, config: &M::Config) -> M {
    let bare: std::result::Result<_, std::convert::Infallible> =
        model.map_linear_layers(config, |_, mut linear: Linear<B>| {
            linear.lora = None;
            Ok(linear)
        });
    match bare {
        Ok(model) => model,
        Err(never) => match never {},
    }
}

/// Folds every adapter into its base weight (`W + scale·A·B`) and removes it.
pub fn merge<B: Backend, M: LinearLayers<B>>(model: M, config: &M::Config) -> M {
    let merged: std::result::Result<_, std::convert::Infallible> =
        model.map_linear_layers(config, |_, mut linear: Linear<B>| {
            if let Some(lora) = linear.lora.take() {
                let base = linear.dense_weight();
                let d_out = base.dims()[1];
                let delta = xtuner_model::nn::precision::in_dtype(lora.delta(d_out), base.dtype());
                linear.weight = Param::from_tensor(base + delta);
                linear.nf4 = None;
            }
            Ok(linear)
        });
    match merged {
        Ok(model) => model,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;

    type B = burn::backend::NdArray<f32>;

    /// PEFT's init: A uniform in ±1/√d_in, `[d_in, r]`, f32 and the same for the same
    /// seed and module; B zeros.
    #[test]
    fn fresh_adapters_start_as_pefts() {
        let device = Default::default();
        let lora = fresh_lora::<B>("model.layers.0.attention.wqkv", [64, 24], 4, 7, &device, 0);
        let a = lora.lora_a.val();
        assert_eq!((a.dims(), a.dtype()), ([64, 4], DType::F32));
        let values: Vec<f32> = a.into_data().to_vec().unwrap();
        assert!(values.iter().all(|v| v.abs() <= 0.125) && values.iter().any(|&v| v != 0.0));
        let again = fresh_lora::<B>("model.layers.0.attention.wqkv", [64, 24], 4, 7, &device, 0);
        assert_eq!(
            again.lora_a.val().into_data().to_vec::<f32>().unwrap(),
            values
        );
        let b = lora.lora_b.val();
        assert_eq!(b.dims(), [4, 24]);
        assert!(
            b.into_data()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .all(|&v| v == 0.0)
        );
    }
}
