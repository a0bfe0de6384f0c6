//! RMSNorm on the CPU backend (burn-ndarray in f32) as one autodiff op: one pass over
//! the rows forward and one backward, in parallel, where Burn's ops take six passes
//! each way with an allocation per pass.
//!
//! Forward, per row: `r = 1/√(mean(x²) + ε)`, `y = (x·r)·w` with `w` the weight plus
//! the offset. Backward, with `g = dy·w`: `dx = r·(g − x·r²·mean(g·x))` and
//! `dw = Σ_rows dy·x·r`, the weight's sum taken over fixed blocks of rows and then over
//! the blocks in order, so it does not depend on the number of threads.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

use crate::nn::host::{Cpu, add_grad, elements, standard, take_grad, zeros};
use crate::nn::same;

/// Rows per parallel task (and per partial sum of the weight's gradient).
const ROWS: usize = 32;

/// The norm of `x` (`[..., C]`) with `weight` (`[C]`) when both are f32 tensors of the
/// CPU backend or its autodiff wrapper; `None` otherwise.
pub(super) fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
    offset: f64,
) -> Option<Tensor<B, D>> {
    if x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || x.dims()[D - 1] != weight.dims()[0]
    {
        return None;
    }
    let settings = (eps as f32, offset as f32);
    if let (Some(x), Some(w)) = (
        same::<_, Tensor<Cpu, D>>(x),
        same::<_, Tensor<Cpu, 1>>(weight),
    ) {
        let x = standard(x.into_primitive().tensor());
        let w = scale(&standard(w.into_primitive().tensor()), settings.1);
        let (y, _) = forward(&x, &w, settings.0);
        return same(&Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(
            NdArrayTensor::from(y),
        )));
    }
    let x = same::<_, Tensor<Autodiff<Cpu>, D>>(x)?
        .into_primitive()
        .tensor();
    let w = same::<_, Tensor<Autodiff<Cpu>, 1>>(weight)?
        .into_primitive()
        .tensor();
    let input = standard(x.primitive);
    let w_eff = scale(&standard(w.primitive), settings.1);
    let (y, r) = forward(&input, &w_eff, settings.0);
    let y = match NormBackward
        .prepare::<NoCheckpointing>([x.node, w.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((input, r, w_eff), NdArrayTensor::from(y)),
        OpsKind::UnTracked(prep) => prep.finish(NdArrayTensor::from(y)),
    };
    same(&Tensor::<Autodiff<Cpu>, D>::from_primitive(
        TensorPrimitive::Float(y),
    ))
}

/// The weight plus the offset.
fn scale(w: &ArcArray<f32, IxDyn>, offset: f32) -> Vec<f32> {
    w.iter()
        .map(|&w| if offset != 0.0 { w + offset } else { w })
        .collect()
}

/// `y` and `r` per row.
fn forward(x: &ArcArray<f32, IxDyn>, w: &[f32], eps: f32) -> (ArcArray<f32, IxDyn>, Vec<f32>) {
    let c = w.len();
    let xs = elements(x);
    let rows = xs.len() / c.max(1);
    let mut y = zeros(xs.len());
    let mut r = vec![0.0f32; rows];
    if c > 0 {
        y.par_chunks_mut(c * ROWS)
            .zip(r.par_chunks_mut(ROWS))
            .zip(xs.par_chunks(c * ROWS))
            .for_each(|((y, r), xs)| {
                for ((y, r), x) in y.chunks_mut(c).zip(r.iter_mut()).zip(xs.chunks(c)) {
                    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
                    *r = 1.0 / (mean_square + eps).sqrt();
                    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                        *y = (x * *r) * w;
                    }
                }
            });
    }
    let y = ArcArray::from_shape_vec(IxDyn(x.shape()), y).unwrap_or_else(|_| unreachable!("sized"));
    (y, r)
}

/// `(dx, dw)`, `dx` plus `earlier` (the gradient `x` already has from its other
/// uses) when given.
fn backward(
    x: &ArcArray<f32, IxDyn>,
    r: &[f32],
    w: &[f32],
    dy: &[f32],
    earlier: Option<&[f32]>,
) -> (ArcArray<f32, IxDyn>, Vec<f32>) {
    let c = w.len();
    let xs = elements(x);
    let mut dx = zeros(xs.len());
    let partials: Vec<Vec<f32>> = if c == 0 {
        Vec::new()
    } else {
        dx.par_chunks_mut(c * ROWS)
            .zip(xs.par_chunks(c * ROWS))
            .zip(dy.par_chunks(c * ROWS))
            .zip(r.par_chunks(ROWS))
            .enumerate()
            .map(|(task, (((dx, xs), dy), r))| {
                let earlier = earlier.map(|e| &e[task * c * ROWS..][..dx.len()]);
                let mut dw = vec![0.0f32; c];
                let mut g = vec![0.0f32; c];
                for (((dx, x), dy), &r) in
                    dx.chunks_mut(c).zip(xs.chunks(c)).zip(dy.chunks(c)).zip(r)
                {
                    for j in 0..c {
                        g[j] = dy[j] * w[j];
                        dw[j] += dy[j] * (x[j] * r);
                    }
                    let mean_gx = g.iter().zip(x).map(|(g, x)| g * x).sum::<f32>() / c as f32;
                    let k = r * r * mean_gx;
                    for j in 0..c {
                        dx[j] = r * (g[j] - x[j] * k);
                    }
                }
                if let Some(earlier) = earlier {
                    dx.iter_mut().zip(earlier).for_each(|(d, e)| *d += e);
                }
                dw
            })
            .collect()
    };
    let mut dw = vec![0.0f32; c];
    for part in partials {
        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    let dx =
        ArcArray::from_shape_vec(IxDyn(x.shape()), dx).unwrap_or_else(|_| unreachable!("sized"));
    (dx, dw)
}

#[derive(Debug)]
struct NormBackward;

impl Backward<Cpu, 2> for NormBackward {
    /// The input (standard layout), `r` per row, and the weight plus the offset.
    type State = (ArcArray<f32, IxDyn>, Vec<f32>, Vec<f32>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, r, w) = &ops.state;
        let dy = grads.consume::<Cpu>(&ops.node);
        let [x_node, w_node] = ops.parents;
        let earlier = x_node
            .as_ref()
            .and_then(|node| take_grad!(grads, node, &dy))
            .map(standard);
        let dy = standard(dy);
        let (dx, dw) = backward(x, r, w, elements(&dy), earlier.as_ref().map(elements));
        if let Some(node) = x_node {
            grads.register::<Cpu>(node.id, NdArrayTensor::from(dx));
        }
        if let Some(node) = w_node {
            let dw = ArcArray::from_shape_vec(IxDyn(&[w.len()]), dw)
                .unwrap_or_else(|_| unreachable!("sized"));
            add_grad!(grads, &node, NdArrayTensor::from(dw));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type A = Autodiff<Cpu>;

    /// Values and both gradients equal Burn's ops (`nn/rms_norm.rs`'s formula), with
    /// and without Gemma's offset, over rows of several tasks, for an input that also
    /// feeds another op.
    #[test]
    fn matches_burns_ops() {
        let device = Default::default();
        let x_data = Tensor::<A, 3>::random([3, 50, 24], Distribution::Normal(0.0, 2.0), &device)
            .into_data();
        let w_data =
            Tensor::<A, 1>::random([24], Distribution::Normal(1.0, 0.3), &device).into_data();
        let dy = Tensor::<A, 3>::random([3, 50, 24], Distribution::Default, &device);
        for offset in [0.0, 1.0] {
            let leaves = || {
                (
                    Tensor::<A, 3>::from_data(x_data.clone(), &device).require_grad(),
                    Tensor::<A, 1>::from_data(w_data.clone(), &device).require_grad(),
                )
            };
            // The normalised tensor also feeds a residual, as in a decoder: the norm's
            // gradient is added to the one the residual gave it first.
            let loss = |y: Tensor<A, 3>, h: Tensor<A, 3>| (y * dy.clone() + h * 0.5).sum();
            let (x, w) = leaves();
            let h = x.clone() * 1.5;
            let ours = rms_norm(&h, &w, 1e-6, offset).expect("served");
            let g1 = loss(ours.clone(), h).backward();
            let (x2, w2) = leaves();
            let h2 = x2.clone() * 1.5;
            let mean_square = h2.clone().powi_scalar(2).mean_dim(2);
            let theirs = h2.clone()
                * (mean_square + 1e-6).sqrt().recip()
                * (w2.clone() + offset).unsqueeze::<3>();
            let g2 = loss(theirs.clone(), h2).backward();
            let close = |a: burn::tensor::TensorData, b: burn::tensor::TensorData| {
                a.assert_approx_eq::<f32>(&b, Tolerance::absolute(2e-5))
            };
            close(ours.into_data(), theirs.into_data());
            close(
                x.grad(&g1).unwrap().into_data(),
                x2.grad(&g2).unwrap().into_data(),
            );
            close(
                w.grad(&g1).unwrap().into_data(),
                w2.grad(&g2).unwrap().into_data(),
            );
        }
    }
}
