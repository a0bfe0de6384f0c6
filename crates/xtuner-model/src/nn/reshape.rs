//! `reshape` without a copy on the CPU backend.
//!
//! burn-ndarray 0.21 copies the whole tensor at every reshape, even a contiguous one
//! (it reshapes a borrowed view and turns that into a new array), and its autodiff
//! reshapes the gradient back the same way: a tenth of a CPU training step went to
//! flattening rows for the products and back. Here a tensor in standard layout on the
//! CPU backend is reshaped in place (the array keeps its buffer, only its shape
//! changes), forward and backward; anything else takes Burn's reshape.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Shape, Tensor, TensorMetadata, TensorPrimitive};
use ndarray::IxDyn;

use crate::nn::host::{Cpu, add_grad};
use crate::nn::same;

/// `t` with the shape `dims` (the same number of elements), as Burn's `reshape`.
pub fn reshape<B: Backend, const D1: usize, const D2: usize>(
    t: Tensor<B, D1>,
    dims: [usize; D2],
) -> Tensor<B, D2> {
    if t.shape().num_elements() == dims.iter().product::<usize>()
        && let Some(out) = on_cpu(&t, dims)
    {
        return out;
    }
    t.reshape(dims)
}

/// [`reshape`] when `B` is the CPU backend or its autodiff wrapper.
fn on_cpu<B: Backend, const D1: usize, const D2: usize>(
    t: &Tensor<B, D1>,
    dims: [usize; D2],
) -> Option<Tensor<B, D2>> {
    if let Some(t) = same::<_, Tensor<Cpu, D1>>(t) {
        let out = in_place(t.into_primitive().tensor(), &dims);
        return same(&Tensor::<Cpu, D2>::from_primitive(TensorPrimitive::Float(
            out,
        )));
    }
    same(&tracked(same::<_, Tensor<Autodiff<Cpu>, D1>>(t)?, dims))
}

/// The array with a new shape: its own buffer when it is in standard layout, a copy
/// otherwise (Burn's reshape).
fn in_place(t: NdArrayTensor, dims: &[usize]) -> NdArrayTensor {
    match t {
        NdArrayTensor::F32(storage) if storage.view().is_standard_layout() => {
            let array = storage.into_shared();
            match array.into_shape_with_order(IxDyn(dims)) {
                Ok(array) => NdArrayTensor::from(array),
                Err(_) => unreachable!("a contiguous array of the same element count"),
            }
        }
        t => Cpu::float_reshape(t, Shape::from(dims.to_vec())),
    }
}

fn tracked<const D1: usize, const D2: usize>(
    t: Tensor<Autodiff<Cpu>, D1>,
    dims: [usize; D2],
) -> Tensor<Autodiff<Cpu>, D2> {
    let t = t.into_primitive().tensor();
    let from = t.primitive.shape().to_vec();
    let out = match ReshapeBackward
        .prepare::<NoCheckpointing>([t.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(from, in_place(t.primitive, &dims)),
        OpsKind::UnTracked(prep) => prep.finish(in_place(t.primitive, &dims)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct ReshapeBackward;

impl Backward<Cpu, 1> for ReshapeBackward {
    /// The input's shape.
    type State = Vec<usize>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Cpu>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            add_grad!(grads, &node, in_place(grad, &ops.state));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Int};

    use super::*;

    type A = Autodiff<Cpu>;

    /// Values and gradients as Burn's reshape, for contiguous and transposed inputs,
    /// and a contiguous input keeps its buffer.
    #[test]
    fn reshapes_like_burn_and_keeps_the_buffer() {
        let device = Default::default();
        let data = Tensor::<A, 3>::random([2, 3, 4], Distribution::Default, &device).to_data();
        for transposed in [false, true] {
            // One leaf per graph: a backward pass frees the graph it walks.
            let run = |ours: bool| {
                let x = Tensor::<A, 3>::from_data(data.clone(), &device).require_grad();
                let input = if transposed {
                    x.clone().swap_dims(1, 2)
                } else {
                    x.clone()
                };
                let [a, b, c] = input.dims();
                let y = if ours {
                    reshape(input, [a * b, c])
                } else {
                    input.reshape([a * b, c])
                };
                let w = Tensor::<A, 1, Int>::arange(0..(a * b * c) as i64, &device)
                    .float()
                    .reshape([a * b, c]);
                let grads = (y.clone() * w).sum().backward();
                (y.to_data(), x.grad(&grads).unwrap().to_data())
            };
            assert_eq!(run(true), run(false));
        }
        let plain = Tensor::<Cpu, 2>::random([6, 4], Distribution::Default, &device);
        let before = match plain.clone().into_primitive().tensor() {
            NdArrayTensor::F32(s) => s.view().as_ptr(),
            _ => unreachable!(),
        };
        let after = match reshape(plain, [2, 3, 4]).into_primitive().tensor() {
            NdArrayTensor::F32(s) => s.view().as_ptr(),
            _ => unreachable!(),
        };
        assert_eq!(before, after, "no copy");
    }
}
