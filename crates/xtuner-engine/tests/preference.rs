//! Preference objectives against XTuner's own (`preference/golden.safetensors`): on one
//! batch of two pairs, every DPO loss type's loss and gradient norm (policy
//! `llama-tiny` + `llama-tiny/lora`, reference the same model with the adapter off),
//! the sigmoid type's log-probabilities and rewards, ORPO's loss, gradient norm and
//! terms, and a reward model's scores, losses and gradient norms (the same decoder
//! without its head, every parameter trained, and a value head); then three AdamW
//! steps of sigmoid DPO against the reference trajectory and adapter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, Tolerance};
use serde_json::Value;
use xtuner_engine::config::OptimizerConfig;
use xtuner_engine::export::peft::peft_tensors;
use xtuner_engine::optim::{adamw, clip_grad_norm};
use xtuner_engine::preference::{
    Dpo, DpoLossType, RankingLoss, RewardObjective, RewardPenalty, dpo_loss, orpo_loss,
    reward_loss, reward_scores, row_segments, sequence_logps,
};
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::decoder::{Decoder, DecoderInput};

mod common;
mod pairs;

use common::fixture;
use pairs::{B, assert_rel, batch, floats, golden, one, policy, reference_logps};

/// Every parameter a fresh trained leaf.
struct Trainable;

impl<Bk: Backend> ModuleMapper<Bk> for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        let (id, tensor, _) = param.consume();
        let device = tensor.device();
        Param::initialized(
            id,
            Tensor::from_data(tensor.into_data(), &device).require_grad(),
        )
    }
}

fn grad_norm(model: &Decoder<B>, loss: Tensor<B, 1>) -> f64 {
    let mut grads = GradientsParams::from_grads(loss.backward(), model);
    clip_grad_norm(model, &mut grads, f64::INFINITY)
}

#[test]
fn every_dpo_loss_type_matches_xtuner() {
    let golden = golden();
    let (ids, labels, [b, t]) = batch(&golden, "");
    let (model, config) = policy();
    let input = DecoderInput::causal(b, t, &Default::default());
    for loss_type in DpoLossType::ALL {
        let name = loss_type.name();
        let average = loss_type.averages_logps();
        let dpo = Dpo {
            loss_type,
            beta: 0.1,
            label_smoothing: if loss_type == DpoLossType::Robust {
                0.1
            } else {
                0.0
            },
        };
        let policy = sequence_logps(model.forward(ids.clone(), &input, None), &labels, average);
        let reference = reference_logps(&model, &config, &ids, &labels, average);
        if loss_type == DpoLossType::Sigmoid {
            let want = floats(&golden, "dpo_policy_logps");
            let got: Vec<f32> = policy.clone().into_data().to_vec().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert_rel(f64::from(*g), f64::from(*w), "policy logp");
            }
            let want = floats(&golden, "dpo_reference_logps");
            let got: Vec<f32> = reference.clone().into_data().to_vec().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert_rel(f64::from(*g), f64::from(*w), "reference logp");
            }
        }
        let out = dpo_loss(policy, reference, &dpo);
        let loss: f64 = out.loss.clone().into_scalar().into();
        assert_rel(loss, one(&golden, &format!("dpo_{name}_loss")), name);
        if loss_type == DpoLossType::Sigmoid {
            // Rewards are differences of log-probabilities near -90: absolute 1e-4.
            for (got, key) in [
                (out.chosen_rewards, "dpo_chosen_rewards"),
                (out.rejected_rewards, "dpo_rejected_rewards"),
                (out.reward_acc, "dpo_reward_acc"),
                (out.reward_margin, "dpo_reward_margin"),
            ] {
                assert!((got - one(&golden, key)).abs() < 1e-4, "{key}: {got}");
            }
        }
        let norm = grad_norm(&model, out.loss);
        assert_rel(norm, one(&golden, &format!("dpo_{name}_grad_norm")), name);
    }
}

/// The golden pairs as training rows: one pair a row (padded batches) and both pairs in
/// one varlen row give the reference's log-probabilities.
#[test]
fn pairs_in_padded_and_in_varlen_batches_score_alike() {
    use xtuner_dataset::PackedRow;
    use xtuner_engine::preference::segment_logps;
    use xtuner_engine::recipe::preference::pair_batch;
    use xtuner_engine::step::batch_tensors;
    let golden = golden();
    let (ids, labels, [b, t]) = batch(&golden, "");
    let ids: Vec<i64> = ids.into_data().to_vec().unwrap();
    let mask = golden
        .int_data("attention_mask")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let seq = |r: usize| {
        let len = mask[r * t..(r + 1) * t].iter().filter(|&&m| m == 1).count();
        (
            ids[r * t..r * t + len].to_vec(),
            labels[r * t..r * t + len].to_vec(),
        )
    };
    let row = |seqs: &[usize]| {
        let mut row = PackedRow {
            cumulative_len: vec![0],
            ..PackedRow::default()
        };
        for &r in seqs {
            let (i, l) = seq(r);
            row.input_ids.extend(i);
            row.labels.extend(l);
            row.cumulative_len.push(row.input_ids.len());
        }
        row
    };
    assert_eq!(b, 4);
    let (model, _) = policy();
    let want = floats(&golden, "dpo_policy_logps");
    let one_pair_a_row = [row(&[0, 1]), row(&[2, 3])];
    let packed = [row(&[0, 1, 2, 3])];
    for (rows, varlen) in [(&one_pair_a_row[..], false), (&packed[..], true)] {
        let refs: Vec<&PackedRow> = rows.iter().collect();
        let (batch, segments) = pair_batch(&refs, varlen);
        let (ids, input) = batch_tensors::<B>(&batch, &Default::default());
        let logps = segment_logps(
            model.forward(ids, &input, None),
            &batch.labels,
            &segments,
            false,
        );
        let got: Vec<f32> = logps.into_data().to_vec().unwrap();
        assert_eq!(got.len(), 4);
        for (g, w) in got.iter().zip(&want) {
            assert_rel(f64::from(*g), f64::from(*w), &format!("varlen {varlen}"));
        }
    }
}

#[test]
fn orpo_matches_xtuner() {
    let golden = golden();
    let (ids, labels, [b, t]) = batch(&golden, "");
    let (model, _) = policy();
    let input = DecoderInput::causal(b, t, &Default::default());
    let logits = model.forward(ids, &input, None);
    let logps: Vec<f32> = sequence_logps(logits.clone().inner(), &labels, true)
        .into_data()
        .to_vec()
        .unwrap();
    for (g, w) in logps.iter().zip(floats(&golden, "orpo_logps")) {
        assert_rel(f64::from(*g), f64::from(w), "orpo logp");
    }
    let (out, terms) = orpo_loss(logits, &labels, &row_segments(b, t), 0.1);
    assert_rel(
        out.loss.clone().into_scalar().into(),
        one(&golden, "orpo_loss"),
        "loss",
    );
    assert_rel(terms.nll_loss, one(&golden, "orpo_nll_loss"), "nll");
    assert_rel(
        terms.log_odds_ratio,
        one(&golden, "orpo_log_odds_ratio"),
        "ratio",
    );
    assert_rel(
        terms.log_odds_chosen,
        one(&golden, "orpo_log_odds_chosen"),
        "odds",
    );
    assert_rel(
        grad_norm(&model, out.loss),
        one(&golden, "orpo_grad_norm"),
        "grad norm",
    );
}

#[test]
fn reward_model_scores_and_losses_match_xtuner() {
    let golden = golden();
    let (ids, labels, [b, t]) = batch(&golden, "reward_");
    let device = Default::default();
    // The reference's reward model: `llama-tiny` with `llama-tiny/lora` attached and
    // every parameter trained (base weights and adapters), and a value head.
    let decoder = policy().0.map(&mut Trainable);
    let head = golden.float_data("reward_v_head_weight").unwrap();
    let input = DecoderInput::causal(b, t, &device);
    for (loss_type, penalty_type, key) in [
        (
            RankingLoss::Ranking,
            RewardPenalty::LogBarrier,
            "ranking_log_barrier",
        ),
        (
            RankingLoss::Focal,
            RewardPenalty::LogBarrier,
            "focal_log_barrier",
        ),
        (RankingLoss::Ranking, RewardPenalty::L2, "ranking_l2"),
    ] {
        let v_head = Param::from_tensor(Tensor::<B, 2>::from_data(head.clone(), &device));
        let hidden = decoder.hidden_states(decoder.embed(ids.clone()), &input, None);
        let c = hidden.dims()[2];
        let values = hidden
            .reshape([b * t, c])
            .matmul(v_head.val().transpose())
            .reshape([b, t]);
        let (chosen, rejected) = reward_scores(values, &labels);
        for (scores, want) in [
            (chosen.clone(), "reward_chosen_scores"),
            (rejected.clone(), "reward_rejected_scores"),
        ] {
            let got: Vec<f32> = scores.into_data().to_vec().unwrap();
            for (g, w) in got.iter().zip(floats(&golden, want)) {
                assert_rel(f64::from(*g), f64::from(w), want);
            }
        }
        let objective = RewardObjective {
            loss_type,
            penalty_type,
            penalty_weight: 0.01,
        };
        let out = reward_loss(chosen, rejected, &objective);
        let loss: f64 = out.loss.clone().into_scalar().into();
        assert_rel(loss, one(&golden, &format!("reward_{key}_loss")), key);
        let grads = out.loss.backward();
        let head_grad = v_head.val().grad(&grads).unwrap();
        let head_sq: f64 = f64::from(head_grad.powi_scalar(2).sum().into_scalar());
        let mut params = GradientsParams::from_grads(grads, &decoder);
        let decoder_norm = clip_grad_norm(&decoder, &mut params, f64::INFINITY);
        let norm = (decoder_norm * decoder_norm + head_sq).sqrt();
        assert_rel(norm, one(&golden, &format!("reward_{key}_grad_norm")), key);
    }
}

#[test]
fn three_sigmoid_dpo_steps_follow_the_reference_trajectory() {
    let trajectory: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("preference/dpo_train/trajectory.json")).unwrap(),
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
    let golden = golden();
    let (ids, labels, [b, t]) = batch(&golden, "");
    let (mut model, config) = policy();
    let input = DecoderInput::causal(b, t, &Default::default());
    let dpo = Dpo {
        loss_type: DpoLossType::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let mut optimizer = adamw(&optimizer_config).init::<B, Decoder<B>>();
    for (step, expected) in trajectory["history"].as_array().unwrap().iter().enumerate() {
        let policy = sequence_logps(model.forward(ids.clone(), &input, None), &labels, false);
        let reference = reference_logps(&model, &config, &ids, &labels, false);
        let out = dpo_loss(policy, reference, &dpo);
        let loss: f64 = out.loss.clone().into_scalar().into();
        assert_rel(
            loss,
            expected["loss"].as_f64().unwrap(),
            &format!("step {step} loss"),
        );
        let mut grads = GradientsParams::from_grads(out.loss.backward(), &model);
        let norm = clip_grad_norm(&model, &mut grads, optimizer_config.max_norm);
        let want = expected["grad_norm_before_clip"].as_f64().unwrap();
        assert_rel(norm, want, &format!("step {step} grad norm"));
        model = optimizer.step(expected["lr"].as_f64().unwrap(), model, grads);
    }
    let trained =
        Checkpoint::open(&fixture("preference/dpo_train/adapter_model.safetensors")).unwrap();
    let ours = peft_tensors(&model.valid(), &config).unwrap();
    assert_eq!(ours.len(), trained.keys().len());
    for (key, data) in ours {
        let want = trained
            .float_data(&key)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        data.assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-4));
    }
}
