//! LLaVA through the training path, on the tiny fixtures (`llava-tiny`: InternLM2 +
//! CLIP + XTuner's projector): the training loss equals the reference's, and each stage
//! trains exactly the parts XTuner's recipe trains (pretrain: the projector; finetune:
//! the projector and the LoRA adapters of the LLM and the vision tower), which a
//! checkpoint then holds in XTuner's layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use xtuner_dataset::collate::Batch;
use xtuner_engine::LoadedConfig;
use xtuner_engine::config::TrainConfig;
use xtuner_engine::export::llava::write_llava;
use xtuner_engine::export::peft::peft_tensors;
use xtuner_engine::optim::adamw;
use xtuner_engine::recipe::llava::{assemble, llava_section};
use xtuner_engine::step::{llava_loss_backward, optimizer_step};
use xtuner_model::checkpoint::{Checkpoint, SaveDtype};
use xtuner_model::decoder::{Decoder, DecoderConfig};
use xtuner_model::llava::Llava;

type B = NdArray<f32>;
type A = Autodiff<B>;

mod common;

use common::fixture;

/// A LLaVA config on the fixtures; `llava` lines go into `[llava]`, `tail` after it.
fn config(llava: &str, tail: &str) -> TrainConfig {
    let text = format!(
        "[model]\npath = {:?}\n[data]\nfiles = [\"unused.json\"]\nformat = \"llava\"\npack_to_max_length = false\n\
         [template]\nname = \"internlm2_chat\"\n[optimizer]\nlr = 1e-2\n\
         [llava]\nvisual_encoder = {:?}\nimage_folder = \".\"\npretrained_projector = {:?}\n{llava}\n{tail}",
        fixture("internlm2-tiny"),
        fixture("clip-vit-tiny"),
        fixture("llava-tiny/projector"),
    );
    LoadedConfig::from_text(&text, Path::new("test.toml"), "test", &[])
        .unwrap()
        .config
}

const PRETRAIN: &str = "freeze_llm = true\nfreeze_visual_encoder = true";
const FINETUNE: (&str, &str) = (
    "freeze_llm = false\nfreeze_visual_encoder = true\n[llava.visual_encoder_lora]\nr = 4\nalpha = 8\ndropout = 0.0",
    "[lora]\nr = 4\nalpha = 8\ndropout = 0.0",
);

fn model<Bk: burn::tensor::backend::Backend>(
    config: &TrainConfig,
    checkpoint: Option<&Path>,
) -> (Llava<Bk>, DecoderConfig) {
    let device = Default::default();
    let (llm, decoder) = Decoder::<Bk>::load(&fixture("internlm2-tiny"), None, &device).unwrap();
    (
        assemble(config, llm, &decoder, checkpoint, &device).unwrap(),
        decoder,
    )
}

/// The golden batch (two rows with one image each, right-padded) and its pixels.
fn golden_batch() -> (Batch, Tensor<A, 4>, f32) {
    let golden = Checkpoint::open(&fixture("llava-tiny/golden.safetensors")).unwrap();
    let ints = |key: &str| {
        golden
            .int_data(key)
            .unwrap()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()
    };
    let shape = golden.shape("input_ids").unwrap();
    let (batch_size, seq_len) = (shape[0], shape[1]);
    let attention_mask: Vec<bool> = ints("attention_mask").into_iter().map(|m| m != 0).collect();
    let position_ids = attention_mask
        .chunks(seq_len)
        .flat_map(|row| {
            row.iter()
                .enumerate()
                .map(|(j, &m)| if m { j as i64 } else { 0 })
        })
        .collect();
    let batch = Batch {
        batch_size,
        seq_len,
        input_ids: ints("input_ids"),
        labels: ints("labels"),
        attention_mask,
        position_ids,
        cumulative_len: None,
        max_seqlen: None,
    };
    let clip = Checkpoint::open(&fixture("clip-vit-tiny/golden.safetensors")).unwrap();
    let pixels = clip
        .tensor::<A, 4>(
            "pixel_values",
            clip.shape("pixel_values").unwrap().try_into().unwrap(),
            &Default::default(),
        )
        .unwrap();
    let loss = golden.float_data("loss").unwrap().to_vec::<f32>().unwrap()[0];
    (batch, pixels, loss)
}

/// Tensor values by `part/key`.
type Snapshot = BTreeMap<String, Vec<f32>>;

/// Every tensor of the model by part: base weights, projector, and adapters.
fn snapshot<Bk: burn::tensor::backend::Backend>(
    model: &Llava<Bk>,
    decoder: &DecoderConfig,
) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut add = |part: &str, tensors: Vec<(String, burn::tensor::TensorData)>| {
        for (key, data) in tensors {
            out.insert(
                format!("{part}/{key}"),
                data.convert::<f32>().to_vec::<f32>().unwrap(),
            );
        }
    };
    add("llm", model.llm.to_hf_tensors(decoder).unwrap());
    add("visual_encoder", model.visual_encoder.to_hf_tensors());
    add("projector", model.projector.to_hf_tensors());
    add("llm_adapter", peft_tensors(&model.llm, decoder).unwrap());
    add(
        "visual_encoder_adapter",
        peft_tensors(&model.visual_encoder, &()).unwrap(),
    );
    out
}

/// Takes `steps` optimizer steps on the golden batch; returns the tensors before and
/// after, and the trained model.
fn train_steps(
    config: &TrainConfig,
    steps: usize,
) -> (Snapshot, Snapshot, Llava<A>, DecoderConfig) {
    let device = Default::default();
    let (mut llava, decoder) = model::<A>(config, None);
    let before = snapshot(&llava.valid(), &decoder);
    let mut optimizer = adamw(&config.optimizer).init::<A, Llava<A>>();
    let (batch, pixels, _) = golden_batch();
    for _ in 0..steps {
        let checkpointing = config.model.activation_checkpointing;
        let grads = llava_loss_backward(
            &llava,
            &batch,
            pixels.clone(),
            -2,
            1.0,
            checkpointing,
            &device,
        )
        .unwrap()
        .grads;
        (llava, _) = optimizer_step(llava, &mut optimizer, grads, config.optimizer.lr, 1.0);
    }
    let after = snapshot(&llava.valid(), &decoder);
    (before, after, llava, decoder)
}

fn changed(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn the_training_loss_matches_the_reference() {
    let config = config(PRETRAIN, "");
    let (llava, _) = model::<A>(&config, None);
    let (batch, pixels, want) = golden_batch();
    // With and without recomputing each layer in backward (activation checkpointing).
    for checkpointing in [false, true] {
        let step = llava_loss_backward(
            &llava,
            &batch,
            pixels.clone(),
            -2,
            1.0,
            checkpointing,
            &Default::default(),
        )
        .unwrap();
        let (loss, trained, tokens, grads) =
            (step.loss, step.trained_tokens, step.tokens, step.grads);
        assert!(
            ((loss as f32 - want) / want).abs() < 1e-4,
            "{loss} vs {want}"
        );
        assert!(trained > 0 && tokens > trained);
        // Pretrain: the two linear layers of the projector (weights and biases) only.
        assert_eq!(grads.len(), 4);
    }
}

#[test]
fn pretrain_trains_the_projector_only() {
    let config = config(PRETRAIN, "");
    let (before, after, _, _) = train_steps(&config, 2);
    let changed = changed(&before, &after);
    assert_eq!(changed.len(), 4, "{changed:?}");
    assert!(
        changed.iter().all(|k| k.starts_with("projector/")),
        "{changed:?}"
    );
}

#[test]
fn finetune_trains_the_projector_and_the_adapters_and_saves_them_in_xtuners_layout() {
    let config = config(FINETUNE.0, FINETUNE.1);
    // Two steps: LoRA's B starts at zero, so A only moves from the second step on.
    let (before, after, llava, decoder) = train_steps(&config, 2);
    let changed = changed(&before, &after);
    // The features come from the tower's layer -2, so the adapters of its last layer
    // (layer 2 of 3) get no gradient, in XTuner as here.
    let last_tower_layer = |k: &String| k.contains("vision_model.encoder.layers.2.");
    let trained = |k: &String| {
        k.starts_with("projector/")
            || k.starts_with("llm_adapter/")
            || (k.starts_with("visual_encoder_adapter/") && !last_tower_layer(k))
    };
    let untouched: Vec<&String> = before
        .keys()
        .filter(|k| !trained(k))
        .filter(|k| changed.contains(k))
        .collect();
    assert!(
        untouched.is_empty(),
        "frozen tensors changed: {untouched:?}"
    );
    let missed: Vec<&String> = before
        .keys()
        .filter(|k| trained(k))
        .filter(|k| !changed.contains(k))
        .collect();
    assert!(
        missed.is_empty(),
        "trained tensors did not change: {missed:?}"
    );
    // 2 layers x 5 linears + the head on the LLM, 3 layers x 6 linears on the tower.
    assert_eq!(
        before
            .keys()
            .filter(|k| k.starts_with("llm_adapter/"))
            .count(),
        2 * 11
    );
    assert_eq!(
        before
            .keys()
            .filter(|k| k.starts_with("visual_encoder_adapter/"))
            .count(),
        2 * 18
    );

    // A checkpoint holds XTuner's layout, and reading it back gives the trained model.
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = xtuner_dataset::Tokenizer::from_path(&fixture("internlm2-tiny")).unwrap();
    write_llava(
        &llava.valid(),
        &config,
        llava_section(&config).unwrap(),
        &decoder,
        &tokenizer,
        dir.path(),
        SaveDtype::F32,
    )
    .unwrap();
    for file in [
        "projector/config.json",
        "projector/model.safetensors",
        "llm_adapter/adapter_config.json",
        "llm_adapter/adapter_model.safetensors",
        "visual_encoder_adapter/adapter_config.json",
        "visual_encoder_adapter/adapter_model.safetensors",
    ] {
        assert!(dir.path().join(file).is_file(), "{file}");
    }
    assert!(
        !dir.path().join("model.safetensors").exists()
            && !dir.path().join("visual_encoder").exists()
    );
    let projector: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("projector/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(projector["model_type"], "projector");
    assert_eq!(
        (
            projector["visual_hidden_size"].as_u64(),
            projector["llm_hidden_size"].as_u64()
        ),
        (Some(32), Some(64))
    );
    let (reloaded, _) = model::<B>(&config, Some(dir.path()));
    assert_eq!(snapshot(&reloaded, &decoder), after);
}
