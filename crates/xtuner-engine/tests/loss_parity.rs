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

/// Every family's PEFT adapter (one adapter per checkpoint module: Llama's q/k/v each
/// their own): the adapted model's logits and loss, attached and trained-on
/// ([`attach_peft`]) or merged as it loads, `merge` equal to the fixture's
/// `merged.safetensors` (PEFT's `merge_and_unload`), and the adapter written back with
/// PEFT's tensor names, shapes and values.
#[test]
fn every_familys_adapter_matches_peft() {
    use burn::tensor::Tolerance;
    use xtuner_engine::export::peft::peft_tensors;
    use xtuner_engine::lora::attach_peft;
    let device = Default::default();
    for dir in [
        "internlm2-tiny",
        "llama-tiny",
        "qwen2-tiny",
        "qwen3-tiny",
        "gemma-tiny",
        "gemma2-tiny",
        "phi3-tiny",
    ] {
        let golden = Checkpoint::open(&fixture(&format!("{dir}/lora/golden.safetensors"))).unwrap();
        let adapter = PeftAdapter::open(&fixture(&format!("{dir}/lora"))).unwrap();
        let want_logits = golden.float_data("logits").unwrap();
        let (base, config) = Decoder::<B>::load(&fixture(dir), None, &device).unwrap();
        let attached = attach_peft(base, &config, &adapter, 0.0, &device).unwrap();
        let (merged, _) = Decoder::<B>::load(&fixture(dir), Some(&adapter), &device).unwrap();
        for (how, model) in [("attached", &attached), ("merged at load", &merged)] {
            let data = golden.int_data("input_ids").unwrap();
            let [b, t] = [data.shape[0], data.shape[1]];
            let ids = data.convert::<i64>().to_vec::<i64>().unwrap();
            let logits = model.forward(
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device),
                &DecoderInput::causal(b, t, &device),
                None,
            );
            logits
                .into_data()
                .assert_approx_eq::<f32>(&want_logits, Tolerance::absolute(1e-4));
            let (got, want) = (loss_of(model, &golden), expected(&golden));
            assert!(
                ((got - want) / want).abs() < 1e-4,
                "{dir} {how}: {got} vs {want}"
            );
        }

        let written =
            Checkpoint::open(&fixture(&format!("{dir}/lora/adapter_model.safetensors"))).unwrap();
        let ours = peft_tensors(&attached, &config).unwrap();
        let mut names: Vec<&String> = ours.iter().map(|(k, _)| k).collect();
        names.sort();
        assert_eq!(names, written.keys().iter().collect::<Vec<_>>(), "{dir}");
        for (key, data) in ours {
            assert_eq!(
                Some(data.shape.to_vec()),
                written.shape(&key),
                "{dir} {key}"
            );
            data.assert_approx_eq::<f32>(
                &written.float_data(&key).unwrap(),
                Tolerance::absolute(1e-6),
            );
        }

        let out = tempfile::tempdir().unwrap();
        xtuner_engine::convert::merge::<B>(
            &fixture(dir),
            &fixture(&format!("{dir}/lora")),
            out.path(),
            xtuner_model::checkpoint::SaveDtype::F32,
            u64::MAX,
            &device,
        )
        .unwrap();
        let ours = Checkpoint::open(out.path()).unwrap();
        let reference =
            Checkpoint::open(&fixture(&format!("{dir}/lora/merged.safetensors"))).unwrap();
        assert_eq!(ours.keys(), reference.keys(), "{dir}: merged tensor names");
        for key in reference.keys() {
            assert_eq!(ours.shape(&key), reference.shape(&key), "{dir} {key}");
            ours.float_data(&key).unwrap().assert_approx_eq::<f32>(
                &reference.float_data(&key).unwrap(),
                Tolerance::absolute(1e-5),
            );
        }
    }
}
