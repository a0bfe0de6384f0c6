//! The causal LM loss against the reference: the base model and the model with the
//! PEFT adapter, on the golden batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use xtuner_engine::loss::causal_lm_loss;
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::internlm2::{DecoderInput, InternLm2};
use xtuner_model::nn::attention::attention_bias;

type B = NdArray<f32>;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(path)
}

fn loss_of(model: &InternLm2<B>, golden: &Checkpoint) -> f32 {
    let device = Default::default();
    let data = golden.int_data("input_ids").unwrap();
    let [b, t] = [data.shape[0], data.shape[1]];
    let ids = data.convert::<i64>().to_vec::<i64>().unwrap();
    let labels = golden.int_data("labels").unwrap().convert::<i64>().to_vec::<i64>().unwrap();
    let positions: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
    let input = DecoderInput {
        positions: Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [b, t]), &device),
        bias: attention_bias(b, t, 0, &vec![true; b * t], None, &device),
    };
    let logits = model.forward(Tensor::from_data(TensorData::new(ids, [b, t]), &device), &input, None);
    causal_lm_loss(logits, &labels).mean().into_scalar()
}

fn expected(golden: &Checkpoint) -> f32 {
    golden.float_data("loss").unwrap().to_vec::<f32>().unwrap()[0]
}

#[test]
fn base_and_adapter_losses_match_the_reference() {
    let device = Default::default();
    let golden = Checkpoint::open(&fixture("internlm2-tiny/golden.safetensors")).unwrap();
    let (model, _) = InternLm2::<B>::load(&fixture("internlm2-tiny"), None, &device).unwrap();
    let (got, want) = (loss_of(&model, &golden), expected(&golden));
    assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");

    let golden = Checkpoint::open(&fixture("internlm2-tiny/lora/golden.safetensors")).unwrap();
    let adapter = PeftAdapter::open(&fixture("internlm2-tiny/lora")).unwrap();
    let (model, _) = InternLm2::<B>::load(&fixture("internlm2-tiny"), Some(&adapter), &device).unwrap();
    let (got, want) = (loss_of(&model, &golden), expected(&golden));
    assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");
}
