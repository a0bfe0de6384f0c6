//! What the two preference test binaries share: the golden batch of
//! `preference/golden.safetensors`, the policy (`llama-tiny` + `llama-tiny/lora`) and
//! its reference's log-probabilities.

#![allow(dead_code)]

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::tensor::{Int, Tensor, TensorData};
use xtuner_engine::lora::{attach_peft, without_adapters};
use xtuner_engine::preference::sequence_logps;
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::decoder::{Decoder, DecoderConfig, DecoderInput};

use crate::common::fixture;

/// The autodiff backend the tests train on.
pub type B = Autodiff<NdArray<f32>>;

pub fn golden() -> Checkpoint {
    Checkpoint::open(&fixture("preference/golden.safetensors")).unwrap()
}

pub fn floats(golden: &Checkpoint, key: &str) -> Vec<f32> {
    golden
        .float_data(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .to_vec::<f32>()
        .unwrap()
}

pub fn one(golden: &Checkpoint, key: &str) -> f64 {
    f64::from(floats(golden, key)[0])
}

/// `input_ids` (as a tensor), `labels` (host values) and the batch shape of `prefix`.
pub fn batch(golden: &Checkpoint, prefix: &str) -> (Tensor<B, 2, Int>, Vec<i64>, [usize; 2]) {
    let data = golden.int_data(&format!("{prefix}input_ids")).unwrap();
    let shape = [data.shape[0], data.shape[1]];
    let ids = data.convert::<i64>().to_vec::<i64>().unwrap();
    let labels = golden
        .int_data(&format!("{prefix}labels"))
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let ids = Tensor::from_data(TensorData::new(ids, shape), &Default::default());
    (ids, labels, shape)
}

pub fn assert_rel(got: f64, want: f64, what: &str) {
    assert!(
        ((got - want) / want.abs().max(1e-12)).abs() < 1e-4 || (got - want).abs() < 1e-4,
        "{what}: {got} vs {want}"
    );
}

pub fn policy() -> (Decoder<B>, DecoderConfig) {
    let device = Default::default();
    let (base, config) = Decoder::<B>::load(&fixture("llama-tiny"), None, &device).unwrap();
    let adapter = PeftAdapter::open(&fixture("llama-tiny/lora")).unwrap();
    (
        attach_peft(base, &config, &adapter, 0.0, &device).unwrap(),
        config,
    )
}

/// The reference's log-probabilities: the policy with its adapter off, without a graph.
pub fn reference_logps(
    model: &Decoder<B>,
    config: &DecoderConfig,
    ids: &Tensor<B, 2, Int>,
    labels: &[i64],
    average: bool,
) -> Tensor<B, 1> {
    let reference = without_adapters(model.valid(), config);
    let [b, t] = ids.dims();
    let input = DecoderInput::causal(b, t, &Default::default());
    let logits = reference.forward(ids.clone().inner(), &input, None);
    Tensor::from_inner(sequence_logps(logits, labels, average))
}
