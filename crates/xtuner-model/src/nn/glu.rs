//! The gated MLP's gating, `act(gate) ⊙ up`, from the gate/up product `[gate | up]`:
//! SwiGLU with SiLU, GeGLU with GELU.
//!
//! Written with Burn's ops it is two slices, a sigmoid, two products and, in backward,
//! as many passes again plus a zero tensor of the whole `[.., 2I]` per slice; on the
//! CPU that was a tenth of a training step. On the CPU backend (burn-ndarray in f32)
//! it is one pass forward and one backward, over the rows in parallel, with a
//! vectorised `exp`; other backends and activations take Burn's ops.

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

use crate::nn::activation::HiddenAct;
use crate::nn::exp::exp_in_place;
use crate::nn::host::{Cpu, add_grad, standard, zeros};
use crate::nn::same;

/// Rows per parallel task.
const ROWS: usize = 16;

/// `act(gate) ⊙ up` where `gate_up` is `[gate | up]` along its last axis.
///
/// # Shapes
/// `gate_up`: `[..., 2I]` → `[..., I]`.
pub fn gated<B: Backend, const D: usize>(gate_up: Tensor<B, D>, act: HiddenAct) -> Tensor<B, D> {
    if act == HiddenAct::Silu
        && let Some(out) = on_cpu(&gate_up)
    {
        return out;
    }
    let dims = gate_up.dims();
    let i = dims[D - 1] / 2;
    let (mut gate, mut up) = (dims.map(|n| 0..n), dims.map(|n| 0..n));
    gate[D - 1] = 0..i;
    up[D - 1] = i..2 * i;
    act.forward(gate_up.clone().slice(gate)) * gate_up.slice(up)
}

/// [`gated`] with SiLU when `B` is the CPU backend or its autodiff wrapper and `x` is f32.
fn on_cpu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    if x.dtype() != DType::F32 || !x.dims()[D - 1].is_multiple_of(2) {
        return None;
    }
    if let Some(x) = same::<_, Tensor<Cpu, D>>(x) {
        let out = forward(&standard(x.into_primitive().tensor()));
        return same(&Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(
            NdArrayTensor::from(out),
        )));
    }
    same(&tracked(same::<_, Tensor<Autodiff<Cpu>, D>>(x)?))
}

/// `sig ← sigmoid(gate)`.
fn sigmoid_into(gate: &[f32], sig: &mut [f32]) {
    for (s, &g) in sig.iter_mut().zip(gate) {
        *s = -g;
    }
    exp_in_place(sig);
    sig.iter_mut().for_each(|s| *s = 1.0 / (1.0 + *s));
}

/// `silu(g)·u` of one row (`sig` is scratch of the row's width).
fn row_forward(gate: &[f32], up: &[f32], out: &mut [f32], sig: &mut [f32]) {
    sigmoid_into(gate, sig);
    for (((o, s), &g), &u) in out.iter_mut().zip(sig.iter()).zip(gate).zip(up) {
        *o = g * *s * u;
    }
}

fn forward(x: &ArcArray<f32, IxDyn>) -> ArcArray<f32, IxDyn> {
    let two_i = x.shape()[x.ndim() - 1];
    let i = two_i / 2;
    let mut shape = x.shape().to_vec();
    shape[x.ndim() - 1] = i;
    let data = x
        .as_slice()
        .unwrap_or_else(|| unreachable!("standard layout"));
    let mut out = zeros(data.len() / 2);
    if i > 0 {
        out.par_chunks_mut(i * ROWS)
            .zip(data.par_chunks(two_i * ROWS))
            .for_each(|(out, rows)| {
                let mut sig = vec![0.0f32; i];
                for (o, row) in out.chunks_mut(i).zip(rows.chunks(two_i)) {
                    let (gate, up) = row.split_at(i);
                    row_forward(gate, up, o, &mut sig);
                }
            });
    }
    ArcArray::from_shape_vec(IxDyn(&shape), out).unwrap_or_else(|_| unreachable!("sized"))
}

/// `d[gate | up]` from `d(out)`: `dg = dy·u·s·(1 + g·(1 − s))`, `du = dy·g·s`.
fn backward(x: &ArcArray<f32, IxDyn>, dy: &ArcArray<f32, IxDyn>) -> ArcArray<f32, IxDyn> {
    let two_i = x.shape()[x.ndim() - 1];
    let i = two_i / 2;
    let data = x
        .as_slice()
        .unwrap_or_else(|| unreachable!("standard layout"));
    let dy = dy
        .as_slice()
        .unwrap_or_else(|| unreachable!("standard layout"));
    let mut dx = zeros(data.len());
    if i > 0 {
        dx.par_chunks_mut(two_i * ROWS)
            .zip(data.par_chunks(two_i * ROWS))
            .zip(dy.par_chunks(i * ROWS))
            .for_each(|((dx, rows), dy)| {
                let mut sig = vec![0.0f32; i];
                for ((dx, row), dy) in dx
                    .chunks_mut(two_i)
                    .zip(rows.chunks(two_i))
                    .zip(dy.chunks(i))
                {
                    let (gate, up) = row.split_at(i);
                    let (dgate, dup) = dx.split_at_mut(i);
                    sigmoid_into(gate, &mut sig);
                    for j in 0..i {
                        let (s, g, u, d) = (sig[j], gate[j], up[j], dy[j]);
                        dgate[j] = d * u * s * (1.0 + g * (1.0 - s));
                        dup[j] = d * g * s;
                    }
                }
            });
    }
    ArcArray::from_shape_vec(IxDyn(x.shape()), dx).unwrap_or_else(|_| unreachable!("sized"))
}

fn tracked<const D: usize>(x: Tensor<Autodiff<Cpu>, D>) -> Tensor<Autodiff<Cpu>, D> {
    let x = x.into_primitive().tensor();
    let input = standard(x.primitive);
    let out = forward(&input);
    let out = match SiluMulBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(input, NdArrayTensor::from(out)),
        OpsKind::UnTracked(prep) => prep.finish(NdArrayTensor::from(out)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Cpu, 1> for SiluMulBackward {
    /// The input `[gate | up]`, in standard layout.
    type State = ArcArray<f32, IxDyn>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dy = standard(grads.consume::<Cpu>(&ops.node));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            add_grad!(grads, &node, NdArrayTensor::from(backward(&ops.state, &dy)));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::silu;
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type A = Autodiff<Cpu>;

    /// Values and gradients equal Burn's ops, on rows of several tasks and a last
    /// partial one.
    #[test]
    fn matches_burns_silu_times_up() {
        let device = Default::default();
        let x = Tensor::<A, 3>::random([3, 13, 2 * 37], Distribution::Normal(0.0, 3.0), &device)
            .require_grad();
        let ours = gated(x.clone(), HiddenAct::Silu);
        let gate = x.clone().slice([0..3, 0..13, 0..37]);
        let up = x.clone().slice([0..3, 0..13, 37..74]);
        let theirs = silu(gate) * up;
        ours.to_data()
            .assert_approx_eq::<f32>(&theirs.to_data(), Tolerance::absolute(1e-5));
        let w = Tensor::<A, 3>::random([3, 13, 37], Distribution::Default, &device);
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (theirs * w).sum().backward();
        x.grad(&g1)
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&x.grad(&g2).unwrap().to_data(), Tolerance::absolute(1e-5));
        // Without autodiff, and on a transposed (non-standard) input.
        let y = Tensor::<Cpu, 2>::random([10, 6], Distribution::Default, &device);
        let yt = y.clone().swap_dims(0, 1);
        let plain = gated(yt.clone(), HiddenAct::Silu);
        let expected = silu(yt.clone().slice([0..6, 0..5])) * yt.slice([0..6, 5..10]);
        plain
            .to_data()
            .assert_approx_eq::<f32>(&expected.to_data(), Tolerance::absolute(1e-6));
    }
}
