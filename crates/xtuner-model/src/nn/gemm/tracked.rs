//! The weight product as an autodiff op of its own, for a backend whose products we
//! run ourselves ([`Engine`]: cuBLAS on the GPU, the `gemm` crate on the CPU). Forward
//! `Y = X·W`; backward `dX = dY·Wᵀ` and `dW = Xᵀ·dY`, each computed only when that
//! input needs a gradient, on transposed views (swapped strides, which the engines read
//! without a copy). Both operands are matrices, or batches of the same number of
//! matrices; [`super::matmul`] flattens a batch of rows against one weight into one
//! matrix first, so the weight's gradient is one product over every row rather than a
//! product per matrix summed afterwards.

use std::fmt::Debug;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

/// Products to run: `(a, b)` pairs of a backend's float primitives.
pub(crate) type Products<B> = Vec<(FloatTensor<B>, FloatTensor<B>)>;

/// A backend's own products.
pub(crate) trait Engine: Debug + Send + Sync + 'static {
    /// The backend whose tensors the products read and write.
    type B: Backend;

    /// Independent products `a·b` (`[m, k]·[k, n]`, or batches `[N, m, k]·[N, k, n]`,
    /// either operand possibly a transposed view), each a new contiguous tensor.
    fn gemms(products: Products<Self::B>) -> Vec<FloatTensor<Self::B>>;
}

/// `x·w` through `E`, recorded for autodiff.
pub(crate) fn tracked_gemm<E: Engine, const R: usize>(
    x: Tensor<Autodiff<E::B>, R>,
    w: Tensor<Autodiff<E::B>, R>,
) -> Tensor<Autodiff<E::B>, R> {
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    let op = GemmBackward::<E>(std::marker::PhantomData);
    let gemm = |a, b| one::<E>(a, b);
    let y = match op
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            // dX needs W and dW needs X: keep only what a tracked input needs.
            let state = (
                w_tracked.then(|| x.primitive.clone()),
                x_tracked.then(|| w.primitive.clone()),
            );
            prep.finish(state, gemm(x.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(gemm(x.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// One product through `E`.
pub(crate) fn one<E: Engine>(a: FloatTensor<E::B>, b: FloatTensor<E::B>) -> FloatTensor<E::B> {
    E::gemms(vec![(a, b)])
        .into_iter()
        .next()
        .unwrap_or_else(|| unreachable!("one product in, one out"))
}

#[derive(Debug)]
struct GemmBackward<E>(std::marker::PhantomData<E>);

impl<E: Engine> Backward<E::B, 2> for GemmBackward<E> {
    /// `X` (kept when `W` needs a gradient) and `W` (kept when `X` does).
    type State = (Option<FloatTensor<E::B>>, Option<FloatTensor<E::B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, w) = ops.state;
        let [x_node, w_node] = ops.parents;
        let dy = grads.consume::<E::B>(&ops.node);
        let mut nodes = Vec::with_capacity(2);
        let mut products = Vec::with_capacity(2);
        if let (Some(node), Some(w)) = (x_node, w) {
            nodes.push(node.id);
            products.push((dy.clone(), transposed::<E::B>(w))); // dX = dY·Wᵀ
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            nodes.push(node.id);
            products.push((transposed::<E::B>(x), dy)); // dW = Xᵀ·dY
        }
        for (id, grad) in nodes.into_iter().zip(E::gemms(products)) {
            grads.register::<E::B>(id, grad);
        }
    }
}

/// The matrices of `t` transposed: a view (swapped strides).
pub(crate) fn transposed<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let rank = t.shape().num_dims();
    B::float_swap_dims(t, rank - 2, rank - 1)
}
