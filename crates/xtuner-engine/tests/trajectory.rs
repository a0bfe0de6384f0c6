//! Six LoRA training steps against PyTorch + PEFT (`<family>-tiny/lora_train`) for every
//! decoder family: AdamW with decoupled weight decay, warm-up + cosine schedule,
//! global-norm clipping. Every step's learning rate, loss and gradient norm, and the
//! final adapter (PEFT's tensor names and shapes, one adapter per checkpoint module),
//! must match.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData, Tolerance};
use serde_json::Value;
use xtuner_engine::config::OptimizerConfig;
use xtuner_engine::export::peft::peft_tensors;
use xtuner_engine::lora::attach_peft;
use xtuner_engine::loss::causal_lm_loss;
use xtuner_engine::optim::{adamw, clip_grad_norm};
use xtuner_engine::schedule::LrSchedule;
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::decoder::{Decoder, DecoderInput};

type B = Autodiff<NdArray<f32>>;

mod common;

use common::fixture;

#[test]
fn internlm2_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("internlm2-tiny");
}

#[test]
fn llama_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("llama-tiny");
}

#[test]
fn qwen2_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("qwen2-tiny");
}

#[test]
fn qwen3_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("qwen3-tiny");
}

#[test]
fn gemma_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("gemma-tiny");
}

#[test]
fn gemma2_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("gemma2-tiny");
}

#[test]
fn phi3_six_lora_steps_follow_the_reference_trajectory() {
    six_lora_steps("phi3-tiny");
}

fn six_lora_steps(dir: &str) {
    let device = Default::default();
    let trajectory: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/lora_train/trajectory.json"))).unwrap(),
    )
    .unwrap();
    let opt = &trajectory["optimizer"];
    let optimizer_config = OptimizerConfig {
        lr: opt["lr"].as_f64().unwrap(),
        betas: [
            opt["betas"][0].as_f64().unwrap(),
            opt["betas"][1].as_f64().unwrap(),
        ],
        eps: opt["eps"].as_f64().unwrap(),
        weight_decay: opt["weight_decay"].as_f64().unwrap(),
        max_norm: opt["clip_grad_max_norm"].as_f64().unwrap(),
    };
    let history = trajectory["history"].as_array().unwrap();
    let schedule = LrSchedule {
        base_lr: optimizer_config.lr,
        warmup_iters: trajectory["schedule"]["warmup_steps"].as_u64().unwrap() as usize,
        total_iters: history.len(),
        start_factor: trajectory["schedule"]["start_factor"].as_f64().unwrap(),
        eta_min: 0.0,
    };

    let (base, config) = Decoder::<B>::load(&fixture(dir), None, &device).unwrap();
    let adapter = PeftAdapter::open(&fixture(&format!("{dir}/lora"))).unwrap();
    let mut model = attach_peft(base, &config, &adapter, 0.0, &device).unwrap();

    // "golden.safetensors input_ids/labels, ...": the batch's file, under the family's dir.
    let data_file = trajectory["data"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let golden = Checkpoint::open(&fixture(&format!("{dir}/{data_file}"))).unwrap();
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
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);

    let mut optimizer = adamw(&optimizer_config).init::<B, Decoder<B>>();
    for (step, expected) in history.iter().enumerate() {
        let lr = schedule.lr(step);
        let want_lr = expected["lr"].as_f64().unwrap();
        assert!(
            (lr - want_lr).abs() <= 1e-12 * want_lr.max(1e-12),
            "{dir} step {step}: lr {lr} vs {want_lr}"
        );
        let logits = model.forward(ids.clone(), &input, None);
        let loss = causal_lm_loss(logits, &labels).mean();
        let loss_value = f64::from(loss.clone().into_scalar());
        let want_loss = expected["loss"].as_f64().unwrap();
        assert!(
            ((loss_value - want_loss) / want_loss).abs() < 1e-4,
            "{dir} step {step}: loss {loss_value} vs {want_loss}"
        );
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = clip_grad_norm(&model, &mut grads, optimizer_config.max_norm);
        let want_norm = expected["grad_norm_before_clip"].as_f64().unwrap();
        assert!(
            ((norm - want_norm) / want_norm).abs() < 1e-4,
            "{dir} step {step}: grad norm {norm} vs {want_norm}"
        );
        model = optimizer.step(lr, model, grads);
    }

    let trained = Checkpoint::open(&fixture(&format!(
        "{dir}/lora_train/adapter_model.safetensors"
    )))
    .unwrap();
    let ours = peft_tensors(&model.valid(), &config).unwrap();
    let mut names: Vec<&String> = ours.iter().map(|(k, _)| k).collect();
    names.sort();
    assert_eq!(names, trained.keys().iter().collect::<Vec<_>>(), "{dir}");
    for (key, data) in ours {
        assert_eq!(
            Some(data.shape.to_vec()),
            trained.shape(&key),
            "{dir} {key}"
        );
        let want = trained
            .float_data(&key)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        data.assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-4));
    }
}
