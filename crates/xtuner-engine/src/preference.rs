//! The objectives of preference training, as XTuner computes them (`xtuner/model/dpo.py`,
//! `orpo.py`, `reward.py`).
//!
//! A batch holds pairs as rows chosen₀, rejected₀, chosen₁, rejected₁, ... A sequence's
//! log-probability ([`sequence_logps`]) sums `log p(label)` over the positions whose
//! label, shifted one left, is trained (neither -100 nor 0: XTuner turns -100 into 0 and
//! masks 0); IPO and ORPO take the mean instead.
//!
//! - [`dpo_loss`]: DPO and its variants (`sigmoid`, `robust`, `hinge`, `ipo`,
//!   `kto_pair`, `sppo_hard`, `nca_pair`) from the policy's and the reference's
//!   log-probabilities; the loss is averaged over its terms (MMEngine's reduction).
//! - [`orpo_loss`]: the chosen answers' language-modelling loss minus β × the mean
//!   log-sigmoid of the log odds ratio; no reference model.
//! - [`reward_loss`]: a reward model's scores (a value head read at the reward token)
//!   ranked pairwise (`ranking`, or InternLM2's `focal`), plus a penalty keeping them in
//!   range (`log_barrier`, `L2`, `none`).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use xtuner_model::nn::cross_entropy::{cross_entropy_sum, label_log_probs};
use xtuner_model::nn::precision::scalar;

use crate::loss::{position_chunks, shifted_targets};
use crate::recompute::TopBackward;

/// Where one sequence lies in a batch: its row and its positions `start..end`.
pub type Segment = (usize, usize, usize);

/// One segment per row, the whole row: XTuner's padded (not varlen) batches.
pub fn row_segments(rows: usize, seq_len: usize) -> Vec<Segment> {
    (0..rows).map(|r| (r, 0, seq_len)).collect()
}

/// `Σ log p(labels[i+1] | ..i)` over a segment's trained positions (label neither
/// -100 nor 0, XTuner's mask), and their count.
fn segment_logp<B: Backend>(
    logits: &Tensor<B, 3>,
    labels: &[i64],
    seq_len: usize,
    (row, start, end): Segment,
) -> (Tensor<B, 1>, usize) {
    if end < start + 2 {
        return (Tensor::zeros([1], (&logits.device(), DType::F32)), 0);
    }
    let shifted = &labels[row * seq_len + start + 1..row * seq_len + end];
    // XTuner turns -100 into 0 and masks 0.
    let (sum, count) = shifted_nll(logits, shifted, (row, start, end), |l| l > 0);
    (sum.neg(), count)
}

/// `Σ −log p(label)` of a segment's logits against its labels shifted one left, over
/// the positions `trained` keeps (and whose label is an id of the vocabulary), and
/// their count.
fn shifted_nll<B: Backend>(
    logits: &Tensor<B, 3>,
    shifted: &[i64],
    (row, start, end): Segment,
    trained: impl Fn(i64) -> bool,
) -> (Tensor<B, 1>, usize) {
    let v = logits.dims()[2];
    let trained = |l: i64| trained(l) && l >= 0 && (l as usize) < v;
    let targets: Vec<i64> = shifted
        .iter()
        .map(|&l| if trained(l) { l } else { 0 })
        .collect();
    let weights: Vec<f32> = shifted
        .iter()
        .map(|&l| f32::from(u8::from(trained(l))))
        .collect();
    let count = weights.iter().filter(|&&w| w > 0.0).count();
    let logits = logits.clone().slice([row..row + 1, start..end - 1, 0..v]);
    (cross_entropy_sum(logits, &targets, &weights), count)
}

/// Each segment's log-probability of its labels (see the module docs), divided by the
/// count of its trained positions when `average`.
///
/// # Shapes
/// `logits`: `[B, T, V]`; `labels`: `[B, T]` (host values) → `[segments]`.
pub fn segment_logps<B: Backend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
    segments: &[Segment],
    average: bool,
) -> Tensor<B, 1> {
    let t = logits.dims()[1];
    per_segment(segments, &logits.device(), average, |seg| {
        segment_logp(&logits, labels, t, seg)
    })
}

/// Each position's log-probability of its label, without a graph: entry `(b, p)` is
/// `log p(labels[b, p] | ..p - 1)`, 0 at `p = 0` and where the label is no id of the
/// vocabulary. Every preference objective depends on the logits only through these, so
/// training computes them from the LM head a chunk of positions at a time
/// ([`head_objective_backward`]) and differentiates the objective with respect to them.
#[derive(Debug, Clone)]
pub struct TokenLogps<B: Backend> {
    /// `[B, T]`, f32.
    pub values: Tensor<B, 2>,
    /// The vocabulary's size.
    pub vocab: usize,
}

impl<B: Backend> TokenLogps<B> {
    /// From the final hidden states, through `lm_head` a chunk of `chunk` positions at
    /// a time (the policy's values, or a reference model's).
    ///
    /// # Shapes
    /// `hidden`: `[B, T, C]`; `lm_head`: `[B, n, C]` → `[B, n, V]`.
    pub fn chunked(
        hidden: Tensor<B, 3>,
        lm_head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
        labels: &[i64],
        vocab: usize,
        chunk: usize,
    ) -> Self {
        let [b, t, c] = hidden.dims();
        let device = hidden.device();
        // Position 0 predicts nothing.
        let mut parts = vec![Tensor::zeros([b, t.min(1)], (&device, DType::F32))];
        for range in position_chunks(t, chunk) {
            let (from, n) = (range.start, range.len());
            let logits = lm_head(hidden.clone().slice([0..b, range, 0..c]));
            let (targets, known) = shifted_targets(labels, b, t, from, n, vocab);
            let known =
                Tensor::<B, 2>::from_data(TensorData::new(known, [b, n]), (&device, DType::F32));
            parts.push(label_log_probs(logits, &targets) * known);
        }
        Self {
            values: Tensor::cat(parts, 1),
            vocab,
        }
    }

    /// `Σ` of a segment's values at the positions after its first whose label
    /// `trained` keeps (and is an id of the vocabulary), and their count.
    fn segment_sum(
        &self,
        labels: &[i64],
        (row, start, end): Segment,
        trained: impl Fn(i64) -> bool,
    ) -> (Tensor<B, 1>, usize) {
        let t = self.values.dims()[1];
        let device = self.values.device();
        if end < start + 2 {
            return (Tensor::zeros([1], (&device, DType::F32)), 0);
        }
        let weights: Vec<f32> = labels[row * t + start + 1..row * t + end]
            .iter()
            .map(|&l| f32::from(u8::from(trained(l) && l >= 0 && (l as usize) < self.vocab)))
            .collect();
        let count = weights.iter().filter(|&&w| w > 0.0).count();
        let n = weights.len();
        let weights =
            Tensor::<B, 2>::from_data(TensorData::new(weights, [1, n]), (&device, DType::F32));
        let values = self.values.clone().slice([row..row + 1, start + 1..end]);
        ((values * weights).sum(), count)
    }

    /// Each segment's log-probability of its labels (see the module docs), divided by
    /// the count of its trained positions when `average`: `[segments]`.
    pub fn segment_logps(
        &self,
        labels: &[i64],
        segments: &[Segment],
        average: bool,
    ) -> Tensor<B, 1> {
        per_segment(segments, &self.values.device(), average, |seg| {
            // XTuner turns -100 into 0 and masks 0.
            self.segment_sum(labels, seg, |l| l > 0)
        })
    }
}

/// One value per segment from `segment` (a sum and its count), each divided by its
/// count when `average`.
fn per_segment<B: Backend>(
    segments: &[Segment],
    device: &B::Device,
    average: bool,
    segment: impl Fn(Segment) -> (Tensor<B, 1>, usize),
) -> Tensor<B, 1> {
    if segments.is_empty() {
        return Tensor::zeros([0], (device, DType::F32));
    }
    let values: Vec<Tensor<B, 1>> = segments
        .iter()
        .map(|&seg| {
            let (logp, count) = segment(seg);
            if average {
                // XTuner divides by the count even when it is 0 (a NaN it then skips).
                logp.div_scalar(count as f64)
            } else {
                logp
            }
        })
        .collect();
    Tensor::cat(values, 0)
}

/// Forward and backward of a preference objective on the final hidden states, with the
/// LM head applied a chunk of `chunk` positions at a time, so only one chunk's
/// `[B, chunk, V]` logits exist at once (the whole of a long row's are the biggest
/// tensor of the step with InternLM2's 92,544-token vocabulary):
/// 1. every label's log-probability, without a graph (`lm_head_values` is the head on
///    the inner backend);
/// 2. the objective on them, and its gradient with respect to each;
/// 3. each chunk again with its graph, `Σ logps ∘ gradient` backpropagated into the
///    head's parameters and the hidden states.
///
/// The gradients are those of the objective on whole logits. Returns the objective's
/// output, the head's gradients and the gradient at `hidden`, for
/// [`crate::recompute::decoder_head_backward`].
#[allow(clippy::too_many_arguments)] // the head twice, the labels, the chunking, the objective
pub fn head_objective_backward<B: AutodiffBackend, M: AutodiffModule<B>, T>(
    model: &M,
    hidden: &Tensor<B, 3>,
    lm_head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    lm_head_values: impl Fn(Tensor<B::InnerBackend, 3>) -> Tensor<B::InnerBackend, 3>,
    labels: &[i64],
    vocab: usize,
    chunk: usize,
    objective: impl FnOnce(&TokenLogps<B>) -> (Tensor<B, 1>, T),
) -> TopBackward<B, M, T> {
    let [b, t, c] = hidden.dims();
    let values = TokenLogps::chunked(hidden.clone().inner(), lm_head_values, labels, vocab, chunk);
    let leaf = Tensor::<B, 2>::from_inner(values.values).require_grad();
    let (loss, out) = objective(&TokenLogps {
        values: leaf.clone(),
        vocab,
    });
    let mut grads = loss.backward();
    let mut accumulator = GradientsAccumulator::<M>::new();
    let Some(upstream) = leaf.grad_remove(&mut grads) else {
        return (out, accumulator, None);
    };
    let Ok(upstream) = upstream.into_data().convert::<f32>().into_vec::<f32>() else {
        unreachable!("f32 host data")
    };
    let cut = hidden.clone().detach().require_grad();
    let mut hidden_grad: Option<Tensor<B::InnerBackend, 3>> = None;
    for range in position_chunks(t, chunk) {
        let (from, to) = (range.start, range.end);
        let logits = lm_head(cut.clone().slice([0..b, range, 0..c]));
        let (targets, known) = shifted_targets(labels, b, t, from, to - from, vocab);
        // Σ logps ∘ upstream is the cross-entropy sum weighted by −upstream.
        let weights: Vec<f32> = upstream[..]
            .chunks(t)
            .flat_map(|row| &row[from + 1..to + 1])
            .zip(&known)
            .map(|(g, k)| -g * k)
            .collect();
        let mut grads = cross_entropy_sum(logits, &targets, &weights).backward();
        if let Some(g) = cut.grad_remove(&mut grads) {
            hidden_grad = Some(match hidden_grad.take() {
                Some(acc) => acc + g,
                None => g,
            });
        }
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    (out, accumulator, hidden_grad)
}

/// [`segment_logps`] of whole rows.
pub fn sequence_logps<B: Backend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
    average: bool,
) -> Tensor<B, 1> {
    let [b, t, _] = logits.dims();
    segment_logps(logits, labels, &row_segments(b, t), average)
}

/// The even rows (chosen) and the odd rows (rejected) of per-row values.
pub fn split_pairs<B: Backend>(values: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let n = values.dims()[0];
    let device = values.device();
    let index = |start: usize| {
        let ids: Vec<i64> = (start..n).step_by(2).map(|i| i as i64).collect();
        let len = ids.len();
        Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [len]), &device)
    };
    (
        values.clone().select(0, index(0)),
        values.select(0, index(1)),
    )
}

/// DPO's loss types (XTuner's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLossType {
    /// `-log σ(β·h)`, with label smoothing ε: `(1-ε)·-log σ(β·h) + ε·-log σ(-β·h)`.
    Sigmoid,
    /// Robust DPO: `((1-ε)·-log σ(β·h) + ε·log σ(-β·h)) / (1-2ε)`.
    Robust,
    /// `relu(1 - β·h)`.
    Hinge,
    /// IPO: `(h - 1/(2β))²` on mean log-probabilities.
    Ipo,
    /// KTO on pairs: `1 - σ(β·(chosen ratio - rejected KL))` and
    /// `1 - σ(β·(chosen KL - rejected ratio))`.
    KtoPair,
    /// SPPO with hard probabilities: `(a - 1/(2β))² + (b + 1/(2β))²`.
    SppoHard,
    /// NCA on pairs: `-log σ(r_c) - ½ log σ(-r_c) - ½ log σ(-r_r)`.
    NcaPair,
}

impl DpoLossType {
    /// Every type, in XTuner's order.
    pub const ALL: [DpoLossType; 7] = [
        Self::Sigmoid,
        Self::Robust,
        Self::Hinge,
        Self::Ipo,
        Self::KtoPair,
        Self::SppoHard,
        Self::NcaPair,
    ];

    /// XTuner's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Robust => "robust",
            Self::Hinge => "hinge",
            Self::Ipo => "ipo",
            Self::KtoPair => "kto_pair",
            Self::SppoHard => "sppo_hard",
            Self::NcaPair => "nca_pair",
        }
    }

    /// Whether sequences are scored by their mean log-probability (IPO).
    pub fn averages_logps(self) -> bool {
        self == Self::Ipo
    }
}

/// DPO's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dpo {
    /// The loss type.
    pub loss_type: DpoLossType,
    /// β: how far the policy may move from the reference.
    pub beta: f64,
    /// ε of `sigmoid` and `robust`.
    pub label_smoothing: f64,
}

/// A preference objective's loss with what XTuner logs beside it.
#[derive(Debug, Clone)]
pub struct PreferenceLoss<B: Backend> {
    /// The loss, `[1]`.
    pub loss: Tensor<B, 1>,
    /// Mean reward of the chosen answers (DPO: `β·(policy - reference)`; ORPO:
    /// `β·logp`; reward models: the mean score).
    pub chosen_rewards: f64,
    /// The same for the rejected answers.
    pub rejected_rewards: f64,
    /// Fraction of pairs whose chosen reward is the higher.
    pub reward_acc: f64,
    /// Mean of chosen minus rejected reward.
    pub reward_margin: f64,
}

fn values<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// The logged rewards of `chosen` and `rejected` (per pair).
fn rewards<B: Backend>(
    loss: Tensor<B, 1>,
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
) -> PreferenceLoss<B> {
    let (c, r) = (values(chosen), values(rejected));
    let n = c.len().max(1) as f64;
    PreferenceLoss {
        loss,
        chosen_rewards: c.iter().sum::<f64>() / n,
        rejected_rewards: r.iter().sum::<f64>() / n,
        reward_acc: c.iter().zip(&r).filter(|(c, r)| c > r).count() as f64 / n,
        reward_margin: c.iter().zip(&r).map(|(c, r)| c - r).sum::<f64>() / n,
    }
}

/// XTuner's DPO loss from per-row log-probabilities of the policy and of the
/// reference (the reference's carry no graph).
///
/// # Shapes
/// `policy`, `reference`: `[2N]`, rows chosen₀, rejected₀, ...
pub fn dpo_loss<B: Backend>(
    policy: Tensor<B, 1>,
    reference: Tensor<B, 1>,
    dpo: &Dpo,
) -> PreferenceLoss<B> {
    let (pc, pr) = split_pairs(policy);
    let (rc, rr) = split_pairs(reference);
    let beta = dpo.beta;
    let eps = dpo.label_smoothing;
    let chosen_ratio = pc.clone() - rc.clone();
    let rejected_ratio = pr.clone() - rr.clone();
    let h = (pc - pr) - (rc - rr);
    let loss = match dpo.loss_type {
        DpoLossType::Sigmoid => {
            log_sigmoid(h.clone().mul_scalar(beta)).mul_scalar(-(1.0 - eps))
                - log_sigmoid(h.mul_scalar(-beta)).mul_scalar(eps)
        }
        DpoLossType::Robust => (log_sigmoid(h.clone().mul_scalar(beta)).mul_scalar(-(1.0 - eps))
            + log_sigmoid(h.mul_scalar(-beta)).mul_scalar(eps))
        .div_scalar(1.0 - 2.0 * eps),
        DpoLossType::Hinge => relu(h.mul_scalar(-beta).add_scalar(1.0)),
        DpoLossType::Ipo => h.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
        DpoLossType::KtoPair => {
            let chosen_kl = chosen_ratio.clone().mean().clamp_min(0.0);
            let rejected_kl = rejected_ratio.clone().mean().clamp_min(0.0);
            let n = chosen_ratio.dims()[0];
            let a = sigmoid((chosen_ratio.clone() - rejected_kl.expand([n])).mul_scalar(beta))
                .neg()
                .add_scalar(1.0);
            let b = sigmoid((chosen_kl.expand([n]) - rejected_ratio.clone()).mul_scalar(beta))
                .neg()
                .add_scalar(1.0);
            Tensor::cat(vec![a, b], 0)
        }
        DpoLossType::SppoHard => {
            chosen_ratio.clone().sub_scalar(0.5 / beta).powi_scalar(2)
                + rejected_ratio.clone().add_scalar(0.5 / beta).powi_scalar(2)
        }
        DpoLossType::NcaPair => {
            let c = chosen_ratio.clone().mul_scalar(beta);
            let r = rejected_ratio.clone().mul_scalar(beta);
            log_sigmoid(c.clone()).neg()
                - log_sigmoid(c.neg()).mul_scalar(0.5)
                - log_sigmoid(r.neg()).mul_scalar(0.5)
        }
    };
    rewards(
        loss.mean(),
        chosen_ratio.mul_scalar(beta),
        rejected_ratio.mul_scalar(beta),
    )
}

/// What ORPO logs besides [`PreferenceLoss`].
#[derive(Debug, Clone)]
pub struct OrpoTerms {
    /// The chosen answers' language-modelling loss (token mean).
    pub nll_loss: f64,
    /// Mean log-sigmoid of the log odds ratio.
    pub log_odds_ratio: f64,
    /// Mean log odds ratio.
    pub log_odds_chosen: f64,
}

/// XTuner's ORPO loss: `nll(chosen) - β·mean(log σ(log odds ratio))`, from the policy's
/// logits; `segments` alternate chosen and rejected.
///
/// # Shapes
/// `logits`: `[B, T, V]`; `labels`: `[B, T]`.
pub fn orpo_loss<B: Backend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
    segments: &[Segment],
    beta: f64,
) -> (PreferenceLoss<B>, OrpoTerms) {
    let t = logits.dims()[1];
    // The chosen answers' language-modelling loss (labels -100 only are left out, as
    // PyTorch's cross-entropy does).
    let chosen = segments
        .iter()
        .step_by(2)
        .filter(|s| s.2 >= s.1 + 2)
        .map(|&(row, start, end)| {
            let shifted = &labels[row * t + start + 1..row * t + end];
            shifted_nll(&logits, shifted, (row, start, end), |_| true)
        });
    let nll = token_mean(chosen, &logits.device());
    orpo_terms(nll, segment_logps(logits, labels, segments, true), beta)
}

/// [`orpo_loss`] from the policy's label log-probabilities.
pub fn orpo_loss_of<B: Backend>(
    logps: &TokenLogps<B>,
    labels: &[i64],
    segments: &[Segment],
    beta: f64,
) -> (PreferenceLoss<B>, OrpoTerms) {
    let chosen = segments.iter().step_by(2).map(|&segment| {
        let (sum, count) = logps.segment_sum(labels, segment, |_| true);
        (sum.neg(), count)
    });
    let nll = token_mean(chosen, &logps.values.device());
    orpo_terms(nll, logps.segment_logps(labels, segments, true), beta)
}

/// The token mean of segments' summed losses (and counts); empty segments (fewer than
/// two positions) count for nothing.
fn token_mean<B: Backend>(
    sums: impl Iterator<Item = (Tensor<B, 1>, usize)>,
    device: &B::Device,
) -> Tensor<B, 1> {
    let (mut nll, mut tokens) = (Vec::new(), 0usize);
    for (sum, count) in sums {
        tokens += count;
        nll.push(sum);
    }
    if nll.is_empty() {
        Tensor::zeros([1], (device, DType::F32))
    } else {
        Tensor::cat(nll, 0).sum().div_scalar(tokens.max(1) as f64)
    }
}

/// ORPO from the chosen answers' token-mean NLL and every segment's mean log-probability.
fn orpo_terms<B: Backend>(
    nll: Tensor<B, 1>,
    logps: Tensor<B, 1>,
    beta: f64,
) -> (PreferenceLoss<B>, OrpoTerms) {
    let (c, r) = split_pairs(logps);
    // log(p/(1-p)) of chosen minus rejected: (c - r) - (log1p(-e^c) - log1p(-e^r)).
    let log_odds =
        (c.clone() - r.clone()) - (c.clone().exp().neg().log1p() - r.clone().exp().neg().log1p());
    let ratio = log_sigmoid(log_odds.clone());
    let terms = OrpoTerms {
        nll_loss: scalar(nll.clone()),
        log_odds_ratio: scalar(ratio.clone().mean()),
        log_odds_chosen: scalar(log_odds.mean()),
    };
    let loss = nll - ratio.mean().mul_scalar(beta);
    (rewards(loss, c.mul_scalar(beta), r.mul_scalar(beta)), terms)
}

/// How a reward model ranks a pair (XTuner's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankingLoss {
    /// `-log σ(chosen - rejected)`.
    Ranking,
    /// InternLM2's focal ranking loss: the ranking loss × `(1 - 2·relu(σ(c - r) - ½))²`.
    Focal,
}

/// The penalty that keeps reward scores in range (XTuner's `penalty_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RewardPenalty {
    /// `-log(5 - s) - log(s + 5)`, scores clamped to (-5 + 1e-3, 5 - 1e-3).
    #[default]
    #[serde(rename = "log_barrier")]
    LogBarrier,
    /// `s²`.
    #[serde(rename = "L2", alias = "l2")]
    L2,
    /// No penalty.
    #[serde(rename = "none")]
    None,
}

/// A reward model's loss settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardObjective {
    /// How pairs are ranked.
    pub loss_type: RankingLoss,
    /// The range penalty.
    pub penalty_type: RewardPenalty,
    /// The penalty's weight.
    pub penalty_weight: f64,
}

/// The scores a value head gives each row at its labelled position (label 0: the
/// chosen answer's reward token, 1: the rejected one's), in row order.
///
/// # Shapes
/// `values`: `[B, T]` (the head's output); `labels`: `[B, T]` → (`[N]`, `[N]`).
pub fn reward_scores<B: Backend>(
    values: Tensor<B, 2>,
    labels: &[i64],
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, t] = values.dims();
    let device = values.device();
    let flat = values.reshape([b * t]);
    let pick = |label: i64| {
        let ids: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l == label)
            .map(|(i, _)| i as i64)
            .collect();
        let n = ids.len();
        flat.clone().select(
            0,
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &device),
        )
    };
    (pick(0), pick(1))
}

/// XTuner's reward-model loss from the chosen and rejected scores (one per pair).
pub fn reward_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    objective: &RewardObjective,
) -> PreferenceLoss<B> {
    let n = chosen.dims()[0].max(1) as f64;
    let diff = chosen.clone() - rejected.clone();
    let rank = log_sigmoid(diff.clone()).neg();
    let rank = match objective.loss_type {
        RankingLoss::Ranking => rank,
        RankingLoss::Focal => {
            let p = relu(sigmoid(diff).sub_scalar(0.5)).mul_scalar(2.0);
            rank * p.neg().add_scalar(1.0).powi_scalar(2)
        }
    };
    let rank = rank.sum().div_scalar(n);
    let scores = Tensor::cat(vec![chosen.clone(), rejected.clone()], 0).cast(DType::F32);
    let penalty = match objective.penalty_type {
        RewardPenalty::LogBarrier => {
            let (lower, upper, eps) = (-5.0, 5.0, 1e-3);
            let s = scores.clamp(lower + eps, upper - eps);
            let p = s.clone().neg().add_scalar(upper).log().neg() - s.sub_scalar(lower).log();
            Some(p.sum().div_scalar(n))
        }
        RewardPenalty::L2 => Some(scores.powi_scalar(2).sum().div_scalar(n)),
        RewardPenalty::None => None,
    };
    let loss = match penalty {
        Some(p) => rank + p.mul_scalar(objective.penalty_weight),
        None => rank,
    };
    rewards(loss, chosen, rejected)
}
