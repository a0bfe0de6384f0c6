//! The causal LM loss against the reference: the base model and the model with the
//! PEFT adapter, on the golden batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use xtuner_engine::loss::causal_lm_loss;
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::decoder::{Decoder, DecoderInput};

type B = NdArray<f32>;

mod common;

use common::fixture;

fn loss_of(model: &Decoder<B>, golden: &Checkpoint) -> f32 {
    let device = Default::default();
    let data = golden.int_data("input_ids").unwrap();
    let [b, t] = [data.shape[0], data.shape[1]];
    let ids = data.convert::<i64>().to_vec::<i64>().unwrap();
    let labels = golden
        .int_data("labels")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let input = DecoderInput::causal(b, t, &device);
    let logits = model.forward(
        Tensor::from_data(TensorData::new(ids, [b, t]), &device),
        &input,
        None,
    );
    causal_lm_loss(logits, &labels).mean().into_scalar()
}

fn expected(golden: &Checkpoint) -> f32 {
    golden.float_data("loss").unwrap().to_vec::<f32>().unwrap()[0]
}

#[test]
fn base_and_adapter_losses_match_the_reference() {
    let device = Default::default();
    let golden = Checkpoint::open(&fixture("internlm2-tiny/golden.safetensors")).unwrap();
    let (model, _) = Decoder::<B>::load(&fixture("internlm2-tiny"), None, &device).unwrap();
    let (got, want) = (loss_of(&model, &golden), expected(&golden));
    assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");

    let golden = Checkpoint::open(&fixture("internlm2-tiny/lora/golden.safetensors")).unwrap();
    let adapter = PeftAdapter::open(&fixture("internlm2-tiny/lora")).unwrap();
    let (model, _) =
        Decoder::<B>::load(&fixture("internlm2-tiny"), Some(&adapter), &device).unwrap();
    let (got, want) = (loss_of(&model, &golden), expected(&golden));
    assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");
}

#[test]
fn llava_logits_and_loss_match_the_reference() {
    use burn::tensor::Tolerance;
    use xtuner_model::clip_vit::ClipVisionTower;
    use xtuner_model::llava::{image_features, prepare_inputs_labels_for_multimodal};
    use xtuner_model::projector::Projector;

    let device = Default::default();
    let golden = Checkpoint::open(&fixture("llava-tiny/golden.safetensors")).unwrap();
    let clip_golden = Checkpoint::open(&fixture("clip-vit-tiny/golden.safetensors")).unwrap();
    let (llm, _) = Decoder::<B>::load(&fixture("internlm2-tiny"), None, &device).unwrap();
    let (tower, _) = ClipVisionTower::<B>::load(&fixture("clip-vit-tiny"), &device).unwrap();
    let (projector, _) =
        Projector::<B>::load(&fixture("llava-tiny/projector"), None, &device).unwrap();

    let pixels = clip_golden.float_data("pixel_values").unwrap();
    let pixels = Tensor::<B, 4>::from_data(pixels, &device);
    let features = image_features(&tower, &projector, pixels, -2).unwrap();

    let ints = |key: &str| {
        let d = golden.int_data(key).unwrap();
        let shape = [d.shape[0], d.shape[1]];
        (d.convert::<i64>().to_vec::<i64>().unwrap(), shape)
    };
    let (ids, shape) = ints("input_ids");
    let (mask, _) = ints("attention_mask");
    let (labels, _) = ints("labels");
    let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(mask, shape), &device).equal_elem(1);
    let labels_t = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, shape), &device);
    let spliced = prepare_inputs_labels_for_multimodal(
        Tensor::from_data(TensorData::new(ids, shape), &device),
        Some(mask),
        Some(labels_t),
        features,
        |text| llm.embed(text.unsqueeze::<2>()).squeeze_dim::<2>(0),
    )
    .unwrap();
    let [b, t, _] = spliced.inputs_embeds.dims();
    let valid: Vec<bool> = spliced
        .attention_mask
        .clone()
        .into_data()
        .to_vec::<bool>()
        .unwrap();
    // The reference numbers every position 0..T and masks causally only (XTuner's
    // LLaVA forward passes no position ids). With right padding, real tokens never see
    // the padding either way, so only the logits of padded positions depend on this;
    // the fixture's were computed so, and so are these.
    let real_tokens = valid.iter().filter(|&&v| v).count();
    assert_eq!(real_tokens, 25, "15 + 10 real positions");
    let input = DecoderInput::causal(b, t, &device);
    let logits = llm.forward_embeds(spliced.inputs_embeds, &input, None);
    logits.clone().into_data().assert_approx_eq::<f32>(
        &golden.float_data("logits").unwrap(),
        Tolerance::absolute(1e-4),
    );
    let new_labels = spliced
        .labels
        .unwrap()
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let got = causal_lm_loss(logits, &new_labels).mean().into_scalar();
    let want = expected(&golden);
    assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");
}
