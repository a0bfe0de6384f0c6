//! Flash attention on Burn's CubeCL backends (CUDA for training; WebGPU, which runs on
//! any Vulkan driver, for tests): the kernels (`kernel.rs`) of the reference path (`reference.rs`) and
//! the autodiff op that wraps them.
//!
//! One cube serves one tile of `block` queries (forward, `dQ`) or keys (`dK`, `dV`) of
//! one head, one unit per row. The other side is walked tile by tile through shared
//! memory in f32, so no `[T × S]` matrix exists anywhere; the forward keeps the online
//! softmax statistics per query and stores the log-sum-exp, which the backward uses to
//! recompute each tile's probabilities (FlashAttention-2, algorithms 1 and 2). The
//! backward needs no atomics: `dQ` is one kernel over query tiles, `dK` and `dV` another
//! over key tiles that also sums the query heads sharing each KV head.
//!
//! The mask is causal with packed samples kept apart by segment ids `[B, T]` (i32),
//! non-decreasing along each row; key tiles that lie wholly in earlier samples or above
//! the diagonal are skipped. Inputs are `[B, H, T, D]` queries and `[B, K, T, D]` keys
//! and values in the backend's float dtype; arithmetic is f32.

use std::marker::PhantomData;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::{CubeCount, CubeDim};

use super::kernel;
use crate::nn::cube::{Cube, CubeOp, dispatch, same};

/// Query or key rows per cube, from the head dimension and the device's shared memory:
/// two f32 tiles of `block × D` must fit, and 64 rows at most.
fn block_for(head_dim: usize, shared_bytes: usize) -> usize {
    let mut block = 64;
    while block > 8 && 2 * block * head_dim * 4 + 4 * block * 4 > shared_bytes {
        block /= 2;
    }
    block
}

// ---------------------------------------------------------------------------------------
// Launchers on Burn's tensors.
// ---------------------------------------------------------------------------------------

/// Sizes of one call, read from the operands.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    block: usize,
}

impl Sizes {
    fn of<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>) -> Self {
        let [batch, heads, seq, head_dim] = q.meta.shape().dims::<4>();
        let kv_heads = k.meta.shape().dims::<4>()[1];
        let shared = q.client.properties().hardware.max_shared_memory_size;
        Self {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
            block: block_for(head_dim, shared),
        }
    }

    fn grid(&self, heads: usize) -> (CubeCount, CubeDim) {
        let tiles = self.seq.div_ceil(self.block);
        (
            CubeCount::Static(tiles as u32, heads as u32, self.batch as u32),
            CubeDim::new_1d(self.block as u32),
        )
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// A new tensor with packed rows, as the kernels index it (Burn's default allocation
    /// may pad rows on CUDA).
    fn empty<R: CubeRuntime>(
        &self,
        like: &CubeTensor<R>,
        dims: Vec<usize>,
        dtype: DType,
    ) -> CubeTensor<R> {
        empty_device_contiguous_dtype::<R>(
            like.client.clone(),
            like.device.clone(),
            Shape::from(dims),
            dtype,
        )
    }
}

/// `(out, lse)`: `out` `[B, H, T, D]` in the inputs' dtype, `lse` `[B, H, T]` in f32.
fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    segments: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v, segments) = (
        into_contiguous(q),
        into_contiguous(k),
        into_contiguous(v),
        into_contiguous(segments),
    );
    let n = Sizes::of(&q, &k);
    let out = n.empty(&q, vec![n.batch, n.heads, n.seq, n.head_dim], q.dtype);
    let lse = n.empty(&q, vec![n.batch, n.heads, n.seq], DType::F32);
    let (count, dim) = n.grid(n.heads);
    let dtype = q.dtype;
    kernel::forward_kernel::launch::<R>(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        segments.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        n.seq as u32,
        n.heads as u32,
        n.kv_heads as u32,
        n.scale(),
        n.block,
        n.head_dim,
        dtype.into(),
    );
    (out, lse)
}

/// What the backward keeps from the forward.
#[derive(Debug, Clone)]
struct Saved<R: CubeRuntime> {
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    segments: CubeTensor<R>,
}

/// `(dq, dk, dv)` for the upstream gradient `dout`.
fn backward<R: CubeRuntime>(
    saved: Saved<R>,
    dout: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let Saved {
        q,
        k,
        v,
        out,
        lse,
        segments,
    } = saved;
    // The upstream gradient arrives in whatever dtype the graph produced it in; it is
    // cast before it is made contiguous, as a cast's output may have padded rows.
    let dout = if dout.dtype == q.dtype {
        dout
    } else {
        burn_cubecl::kernel::cast(dout, q.dtype)
    };
    let (q, k, v, out, dout) = (
        into_contiguous(q),
        into_contiguous(k),
        into_contiguous(v),
        into_contiguous(out),
        into_contiguous(dout),
    );
    let (lse, segments) = (into_contiguous(lse), into_contiguous(segments));
    let n = Sizes::of(&q, &k);
    let client = q.client.clone();
    let dtype = q.dtype;
    let dq = n.empty(&q, vec![n.batch, n.heads, n.seq, n.head_dim], dtype);
    let dk = n.empty(&q, vec![n.batch, n.kv_heads, n.seq, n.head_dim], dtype);
    let dv = n.empty(&q, vec![n.batch, n.kv_heads, n.seq, n.head_dim], dtype);
    let delta = n.empty(&q, vec![n.batch, n.heads, n.seq], DType::F32);

    let (count, dim) = n.grid(n.heads);
    kernel::backward_query_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        dout.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        segments.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        n.seq as u32,
        n.heads as u32,
        n.kv_heads as u32,
        n.scale(),
        n.block,
        n.head_dim,
        dtype.into(),
    );
    let (count, dim) = n.grid(n.kv_heads);
    kernel::backward_key_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        dout.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        segments.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        n.seq as u32,
        n.heads as u32,
        n.kv_heads as u32,
        n.scale(),
        n.block,
        n.head_dim,
        dtype.into(),
    );
    (dq, dk, dv)
}

// ---------------------------------------------------------------------------------------
// The Burn op: recognised by type, tracked under autodiff.
// ---------------------------------------------------------------------------------------

/// Causal attention through the kernels when `B` is one of Burn's CubeCL backends this
/// build serves (or its autodiff wrapper); `None` otherwise.
///
/// # Shapes
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, K, T, D]`; `segments`: `[B, T]` non-decreasing
/// along each row → `[B, H, T, D]`.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    segments: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 4>> {
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || q.dtype() != k.dtype()
        || q.dtype() != v.dtype()
    {
        return None;
    }
    let [batch, heads, seq, head_dim] = q.dims();
    let kv_heads = k.dims()[1];
    // An empty grid is a launch error on CUDA; the kernels index in 32 bits.
    let fits = [q.shape().num_elements(), k.shape().num_elements()]
        .iter()
        .all(|&n| n < u32::MAX as usize);
    if [batch, heads, seq, head_dim, kv_heads].contains(&0) || heads % kv_heads != 0 || !fits {
        return None;
    }
    dispatch(&Flash { q, k, v, segments })
}

/// The operands of one [`attention`] call.
struct Flash<'a, B: Backend> {
    q: &'a Tensor<B, 4>,
    k: &'a Tensor<B, 4>,
    v: &'a Tensor<B, 4>,
    segments: &'a Tensor<B, 2, Int>,
}

impl<B: Backend> CubeOp<B> for Flash<'_, B> {
    type Output = Tensor<B, 4>;

    fn plain<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        &self,
    ) -> Option<Tensor<B, 4>> {
        let [q, k, v] = [self.q, self.k, self.v].map(|t| {
            same::<_, Tensor<Cube<R, F, I, BT>, 4>>(t).map(|t| t.into_primitive().tensor())
        });
        let segments: Tensor<Cube<R, F, I, BT>, 2, Int> = same(self.segments)?;
        let segments = burn_cubecl::kernel::cast(segments.into_primitive(), DType::I32);
        let (out, _) = forward(q?, k?, v?, segments);
        same(&Tensor::<Cube<R, F, I, BT>, 4>::from_primitive(
            TensorPrimitive::Float(out),
        ))
    }

    fn autodiff<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        &self,
    ) -> Option<Tensor<B, 4>> {
        let [q, k, v] =
            [self.q, self.k, self.v].map(same::<_, Tensor<Autodiff<Cube<R, F, I, BT>>, 4>>);
        let segments: Tensor<Autodiff<Cube<R, F, I, BT>>, 2, Int> = same(self.segments)?;
        // Autodiff's int tensors are its inner backend's.
        let segments = burn_cubecl::kernel::cast(segments.into_primitive(), DType::I32);
        same(&tracked::<R, F, I, BT>(q?, k?, v?, segments))
    }
}

fn tracked<R, F, I, BT>(
    q: Tensor<Autodiff<Cube<R, F, I, BT>>, 4>,
    k: Tensor<Autodiff<Cube<R, F, I, BT>>, 4>,
    v: Tensor<Autodiff<Cube<R, F, I, BT>>, 4>,
    segments: CubeTensor<R>,
) -> Tensor<Autodiff<Cube<R, F, I, BT>>, 4>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
    let op = FlashBackward::<R, F, I, BT>(PhantomData);
    let out = match op
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = forward(
                q.primitive.clone(),
                k.primitive.clone(),
                v.primitive.clone(),
                segments.clone(),
            );
            let saved = Saved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
                lse,
                segments,
            };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(q.primitive, k.primitive, v.primitive, segments).0)
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct FlashBackward<R, F, I, BT>(PhantomData<(R, F, I, BT)>);

impl<R, F, I, BT> Backward<Cube<R, F, I, BT>, 3> for FlashBackward<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type State = Saved<R>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dout = grads.consume::<Cube<R, F, I, BT>>(&ops.node);
        let (dq, dk, dv) = backward(ops.state, dout);
        for (node, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<Cube<R, F, I, BT>>(node.id, grad);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::block_for;

    #[test]
    fn tiles_fit_the_shared_memory() {
        assert_eq!(block_for(128, 48 * 1024), 32);
        assert_eq!(block_for(128, 228 * 1024), 64);
        assert_eq!(block_for(64, 16 * 1024), 16);
        assert_eq!(block_for(4096, 1024), 8, "never below 8 rows");
    }
}
