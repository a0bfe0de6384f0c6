//! The summed, weighted cross-entropy of logits against target ids, in f32:
//! `Σ_rows −w·log softmax(logits)[target]`, the language-modelling loss's core.
//!
//! With Burn's ops this is a log-softmax of five element-wise passes (libm's `expf`
//! and `logf` on every logit), a gather and a weighted sum, and as many passes again
//! in backward. On the CPU backend (burn-ndarray in f32) it is one op: forward keeps
//! only each row's log-sum-exp (a vectorised `exp`), and backward writes
//! `g·w·(softmax − onehot)` in one pass. Rows run in parallel; the loss is summed over
//! fixed blocks of rows and then over the blocks in order, so it does not depend on
//! the number of threads.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

use crate::nn::exp::exp_in_place;
use crate::nn::host::{Cpu, add_grad, elements, standard, zeros};
use crate::nn::same;

/// Rows per parallel task.
const ROWS: usize = 8;

/// `Σ_i −weights[i]·log softmax(logits[i])[targets[i]]` over the rows of `logits`
/// (every leading axis flattened), as a `[1]` tensor in f32. Targets must be ids of
/// the vocabulary (give a weight of 0 to rows that are not trained).
///
/// # Shapes
/// `logits`: `[..., V]`; `targets`, `weights`: one per row.
pub fn cross_entropy_sum<B: Backend, const D: usize>(
    logits: Tensor<B, D>,
    targets: &[i64],
    weights: &[f32],
) -> Tensor<B, 1> {
    let dims = logits.dims();
    let vocab = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let ids_fit = targets.iter().all(|&t| t >= 0 && (t as usize) < vocab);
    if targets.len() == rows
        && weights.len() == rows
        && ids_fit
        && let Some(loss) = on_cpu(&logits, targets, weights)
    {
        return loss;
    }
    let device = logits.device();
    let logits = logits.cast(DType::F32);
    let mut shape = dims;
    shape[D - 1] = 1;
    let targets = Tensor::<B, D, Int>::from_data(TensorData::new(targets.to_vec(), shape), &device);
    let weights = Tensor::<B, D>::from_data(
        TensorData::new(weights.to_vec(), shape),
        (&device, DType::F32),
    );
    let log_probs = log_softmax(logits, D - 1).gather(D - 1, targets);
    (log_probs * weights).sum().neg().reshape([1])
}

/// `log softmax(logits[i])[targets[i]]` of each row, `[B, n]` for `[B, n, V]` logits,
/// in f32: the values only (a preference objective's per-token log-probabilities,
/// computed without a graph). On the CPU backend, each row's log-sum-exp as
/// [`cross_entropy_sum`] computes it (the same bits on any number of threads).
///
/// # Shapes
/// `logits`: `[B, n, V]`; `targets`: `B·n` ids of the vocabulary → `[B, n]`.
pub fn label_log_probs<B: Backend>(logits: Tensor<B, 3>, targets: &[i64]) -> Tensor<B, 2> {
    let [b, n, v] = logits.dims();
    let device = logits.device();
    if logits.dtype() == DType::F32
        && targets.len() == b * n
        && targets.iter().all(|&t| t >= 0 && (t as usize) < v)
        && let Some(plain) = same::<_, Tensor<Cpu, 3>>(&logits)
    {
        let rows = standard(plain.into_primitive().tensor());
        let (_, lse) = forward(&rows, targets, &vec![0.0; targets.len()]);
        let values: Vec<f32> = elements(&rows)
            .chunks(v.max(1))
            .zip(targets)
            .zip(&lse)
            .map(|((row, &t), lse)| row[t as usize] - lse)
            .collect();
        let out = Tensor::<Cpu, 2>::from_data(TensorData::new(values, [b, n]), &Default::default());
        if let Some(out) = same(&out) {
            return out;
        }
    }
    let targets =
        Tensor::<B, 3, Int>::from_data(TensorData::new(targets.to_vec(), [b, n, 1]), &device);
    log_softmax(logits.cast(DType::F32), 2)
        .gather(2, targets)
        .reshape([b, n])
}

fn on_cpu<B: Backend, const D: usize>(
    logits: &Tensor<B, D>,
    targets: &[i64],
    weights: &[f32],
) -> Option<Tensor<B, 1>> {
    if logits.dtype() != DType::F32 {
        return None;
    }
    if let Some(logits) = same::<_, Tensor<Cpu, D>>(logits) {
        let logits = standard(logits.into_primitive().tensor());
        let (sum, _) = forward(&logits, targets, weights);
        return same(&Tensor::<Cpu, 1>::from_data(
            TensorData::new(vec![sum], [1]),
            &Default::default(),
        ));
    }
    let logits = same::<_, Tensor<Autodiff<Cpu>, D>>(logits)?
        .into_primitive()
        .tensor();
    let input = standard(logits.primitive);
    let (sum, lse) = forward(&input, targets, weights);
    let out = NdArrayTensor::from(
        ArcArray::from_shape_vec(IxDyn(&[1]), vec![sum])
            .unwrap_or_else(|_| unreachable!("one value")),
    );
    let out = match LossBackward
        .prepare::<NoCheckpointing>([logits.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                logits: input,
                lse,
                targets: targets.to_vec(),
                weights: weights.to_vec(),
            };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    same(&Tensor::<Autodiff<Cpu>, 1>::from_primitive(
        TensorPrimitive::Float(out),
    ))
}

/// The summed loss and each row's log-sum-exp.
fn forward(logits: &ArcArray<f32, IxDyn>, targets: &[i64], weights: &[f32]) -> (f32, Vec<f32>) {
    let vocab = logits.shape()[logits.ndim() - 1];
    let mut lse = vec![0.0f32; targets.len()];
    if vocab == 0 {
        return (0.0, lse);
    }
    let partials: Vec<f32> = lse
        .par_chunks_mut(ROWS)
        .zip(elements(logits).par_chunks(vocab * ROWS))
        .zip(targets.par_chunks(ROWS).zip(weights.par_chunks(ROWS)))
        .map(|((lse, rows), (targets, weights))| {
            let mut shifted = vec![0.0f32; vocab];
            let mut loss = 0.0f32;
            for (((lse, row), &t), &w) in lse
                .iter_mut()
                .zip(rows.chunks(vocab))
                .zip(targets)
                .zip(weights)
            {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                shifted.iter_mut().zip(row).for_each(|(s, &x)| *s = x - max);
                exp_in_place(&mut shifted);
                *lse = max + shifted.iter().sum::<f32>().ln();
                if w != 0.0 {
                    loss -= w * (row[t as usize] - *lse);
                }
            }
            loss
        })
        .collect();
    (partials.iter().sum(), lse)
}

#[derive(Debug, Clone)]
struct Saved {
    logits: ArcArray<f32, IxDyn>,
    lse: Vec<f32>,
    targets: Vec<i64>,
    weights: Vec<f32>,
}

/// `d logits = g·w·(softmax − onehot(target))`.
fn backward(s: &Saved, g: f32) -> ArcArray<f32, IxDyn> {
    let vocab = s.logits.shape()[s.logits.ndim() - 1];
    let logits = elements(&s.logits);
    let mut grad = zeros(logits.len());
    if vocab > 0 {
        grad.par_chunks_mut(vocab * ROWS)
            .zip(logits.par_chunks(vocab * ROWS))
            .zip(s.lse.par_chunks(ROWS))
            .zip(s.targets.par_chunks(ROWS).zip(s.weights.par_chunks(ROWS)))
            .for_each(|(((grad, rows), lse), (targets, weights))| {
                let rows = grad.chunks_mut(vocab).zip(rows.chunks(vocab));
                for (((grad, row), &lse), (&t, &w)) in
                    rows.zip(lse).zip(targets.iter().zip(weights))
                {
                    if w == 0.0 {
                        continue;
                    }
                    grad.iter_mut().zip(row).for_each(|(d, &x)| *d = x - lse);
                    exp_in_place(grad);
                    let scale = g * w;
                    grad.iter_mut().for_each(|d| *d *= scale);
                    grad[t as usize] -= scale;
                }
            });
    }
    ArcArray::from_shape_vec(IxDyn(s.logits.shape()), grad)
        .unwrap_or_else(|_| unreachable!("sized"))
}

#[derive(Debug)]
struct LossBackward;

impl Backward<Cpu, 1> for LossBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let g = standard(grads.consume::<Cpu>(&ops.node));
        let g = elements(&g).first().copied().unwrap_or(0.0);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            add_grad!(grads, &node, NdArrayTensor::from(backward(&ops.state, g)));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type A = Autodiff<Cpu>;

    /// The loss and the logits' gradient equal Burn's log-softmax path, with rows
    /// weighted 0, 1 and 0.5, over rows of several tasks.
    #[test]
    fn matches_burns_log_softmax() {
        let device = Default::default();
        let data =
            Tensor::<A, 3>::random([3, 7, 50], Distribution::Normal(0.0, 4.0), &device).into_data();
        let targets: Vec<i64> = (0..21).map(|i| (i * 13 % 50) as i64).collect();
        let weights: Vec<f32> = (0..21).map(|i| [0.0, 1.0, 0.5][i % 3]).collect();
        let leaf = || Tensor::<A, 3>::from_data(data.clone(), &device).require_grad();
        let (x1, x2) = (leaf(), leaf());
        let ours = cross_entropy_sum(x1.clone(), &targets, &weights);
        let t =
            Tensor::<A, 3, Int>::from_data(TensorData::new(targets.clone(), [3, 7, 1]), &device);
        let w = Tensor::<A, 3>::from_data(TensorData::new(weights.clone(), [3, 7, 1]), &device);
        let theirs = (log_softmax(x2.clone(), 2).gather(2, t) * w).sum().neg();
        let g1 = (ours.clone() * 0.25).backward();
        let g2 = (theirs.clone() * 0.25).backward();
        ours.into_data()
            .assert_approx_eq::<f32>(&theirs.reshape([1]).into_data(), Tolerance::absolute(1e-4));
        x1.grad(&g1).unwrap().into_data().assert_approx_eq::<f32>(
            &x2.grad(&g2).unwrap().into_data(),
            Tolerance::absolute(1e-6),
        );
        // Without autodiff.
        let plain = Tensor::<Cpu, 3>::from_data(data.clone(), &device);
        let loss = cross_entropy_sum(plain, &targets, &weights).into_scalar();
        assert!((loss - theirs_value(&targets, &weights, &leaf())).abs() < 1e-3);
    }

    fn theirs_value(targets: &[i64], weights: &[f32], x: &Tensor<A, 3>) -> f32 {
        let device = Default::default();
        let t =
            Tensor::<A, 3, Int>::from_data(TensorData::new(targets.to_vec(), [3, 7, 1]), &device);
        let w = Tensor::<A, 3>::from_data(TensorData::new(weights.to_vec(), [3, 7, 1]), &device);
        (log_softmax(x.clone(), 2).gather(2, t) * w)
            .sum()
            .neg()
            .into_scalar()
    }
}
