//! Flash attention on the CPU backend (burn-ndarray in f32), forward and backward, as
//! autodiff ops of their own around the blocked algorithm (`blocks.rs`).
//!
//! The materialised path costs the CPU more than its products: the `[B, H, T, T]`
//! scores, the additive mask, a softmax of five element-wise passes, and copies of the
//! heads into and out of `[B, H, T, D]` order, each kept for the backward. Two entries:
//!
//! - [`attention`] takes `q`, `k` and `v` as `[B, H, T, D]` / `[B, K, T, D]` views,
//!   read through their strides;
//! - [`packed_attention`] takes the fused projection's output `[B, T, (H + 2K)·D]` and
//!   the rotary tables, and applies the rotary embedding itself as it reads each head:
//!   the layer's three slices, its reshapes and the rotary embedding's element-wise
//!   ops (each with a backward that allocates) are gone, and the gradient of the whole
//!   projection output comes back as one tensor.
//!
//! Outputs are written in `[B, T, H, D]` memory order, which the layer's reshape to
//! `[B, T, H·D]` and the output projection read without a copy.

use std::marker::PhantomData;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use ndarray::{ArcArray, ArrayView, IxDyn};
use rayon::prelude::*;

use super::blocks::{self, Dims, Rows, head_rows, sample_starts, scatter};
use crate::nn::host::{Cpu, add_grad, elements, standard, zeros};
use crate::nn::same;

/// Causal attention on the CPU backend or its autodiff wrapper in f32; `None` for any
/// other backend or dtype.
///
/// # Shapes
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, K, T, D]`; `segments`: `[B, T]`, non-decreasing
/// along each row → `[B, H, T, D]`.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    segments: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 4>> {
    if [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
        return None;
    }
    let [batch, heads, seq, head_dim] = q.dims();
    let dims = checked(batch, heads, k.dims()[1], seq, head_dim)?;
    if let Some([q, k, v]) = plain([q, k, v]) {
        let layout = Layout::Heads([q, k, v]);
        let starts = starts(&dims, segments);
        let (out, _) = blocks::forward(&dims, &Source::new(&dims, &layout), &starts);
        let out = as_heads_first(out, dims.heads, &dims);
        return same(&Tensor::<Cpu, 4>::from_primitive(TensorPrimitive::Float(
            NdArrayTensor::from(out),
        )));
    }
    let [q, k, v] = [q, k, v].map(same::<_, Tensor<Autodiff<Cpu>, 4>>);
    let [q, k, v] = [q?, k?, v?].map(|t| t.into_primitive().tensor());
    let layout = Layout::Heads([&q, &k, &v].map(|t| t.primitive.clone()));
    let kind = HeadsBackward(PhantomData)
        .prepare::<NoCheckpointing>([q.node, k.node, v.node])
        .compute_bound()
        .stateful();
    let out = tracked(kind, dims, layout, starts(&dims, segments));
    same(&Tensor::<Autodiff<Cpu>, 4>::from_primitive(
        TensorPrimitive::Float(out),
    ))
}

/// Causal attention of the fused projection's output, the rotary embedding applied to
/// its queries and keys here, on the CPU backend or its autodiff wrapper in f32; `None`
/// for any other backend or dtype.
///
/// # Shapes
/// `qkv`: `[B, T, (H + 2K)·D]` (query heads, then key heads, then value heads);
/// `cos`, `sin`: `[B, T, D]`; `segments`: `[B, T]` → `[B, T, H·D]`.
pub(crate) fn packed_attention<B: Backend>(
    qkv: &Tensor<B, 3>,
    (cos, sin): (&Tensor<B, 3>, &Tensor<B, 3>),
    segments: &Tensor<B, 2, Int>,
    [heads, kv_heads, head_dim]: [usize; 3],
) -> Option<Tensor<B, 3>> {
    let [batch, seq, width] = qkv.dims();
    if qkv.dtype() != DType::F32 || width != (heads + 2 * kv_heads) * head_dim {
        return None;
    }
    if cos.dims() != [batch, seq, head_dim] || sin.dims() != cos.dims() || head_dim % 2 != 0 {
        return None;
    }
    let dims = checked(batch, heads, kv_heads, seq, head_dim)?;
    let (cos, sin) = (table(cos)?, table(sin)?);
    let out_dims = [batch, seq, heads * head_dim];
    if let Some(qkv) = same::<_, Tensor<Cpu, 3>>(qkv) {
        let qkv = standard(qkv.into_primitive().tensor());
        let layout = Layout::Packed { qkv, cos, sin };
        let starts = starts(&dims, segments);
        let (out, _) = blocks::forward(&dims, &Source::new(&dims, &layout), &starts);
        let out = ArcArray::from_shape_vec(IxDyn(&out_dims), out).ok()?;
        return same(&Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(
            NdArrayTensor::from(out),
        )));
    }
    let qkv = same::<_, Tensor<Autodiff<Cpu>, 3>>(qkv)?
        .into_primitive()
        .tensor();
    let layout = Layout::Packed {
        qkv: standard(qkv.primitive.clone()),
        cos,
        sin,
    };
    let starts = starts(&dims, segments);
    let kind = PackedBackward(PhantomData)
        .prepare::<NoCheckpointing>([qkv.node])
        .compute_bound()
        .stateful();
    let out = tracked(kind, dims, layout, starts);
    same(&Tensor::<Autodiff<Cpu>, 3>::from_primitive(
        TensorPrimitive::Float(out),
    ))
}

/// A rotary table's f32 array on the CPU backend (no copy when it is in standard
/// layout); `None` for another backend or dtype.
fn table<B: Backend>(t: &Tensor<B, 3>) -> Option<ArcArray<f32, IxDyn>> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let t = match same::<_, Tensor<Cpu, 3>>(t) {
        Some(t) => t,
        None => same::<_, Tensor<Autodiff<Cpu>, 3>>(t)?.inner(),
    };
    Some(standard(t.into_primitive().tensor()))
}

/// The sizes, when the op can serve them.
fn checked(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
) -> Option<Dims> {
    let served =
        kv_heads > 0 && heads.is_multiple_of(kv_heads) && ![batch, seq, head_dim].contains(&0);
    served.then_some(Dims {
        batch,
        heads,
        kv_heads,
        seq,
        head_dim,
    })
}

fn starts<B: Backend>(dims: &Dims, segments: &Tensor<B, 2, Int>) -> Vec<usize> {
    sample_starts(dims, &segments.to_data().iter::<i64>().collect::<Vec<_>>())
}

/// The primitives when `B` is the CPU backend itself.
fn plain<B: Backend>(ts: [&Tensor<B, 4>; 3]) -> Option<[NdArrayTensor; 3]> {
    let [q, k, v] = ts.map(same::<_, Tensor<Cpu, 4>>);
    Some([q?, k?, v?].map(|t| t.into_primitive().tensor()))
}

fn view(t: &NdArrayTensor) -> ArrayView<'_, f32, IxDyn> {
    match t {
        NdArrayTensor::F32(s) => s.view(),
        _ => unreachable!("f32 checked by the caller"),
    }
}

/// `[B, T, N, D]` memory as a `[B, N, T, D]` array.
fn as_heads_first(data: Vec<f32>, n: usize, dims: &Dims) -> ArcArray<f32, IxDyn> {
    ArcArray::from_shape_vec(IxDyn(&[dims.batch, dims.seq, n, dims.head_dim]), data)
        .unwrap_or_else(|_| unreachable!("sized from the dims"))
        .permuted_axes(IxDyn(&[0, 2, 1, 3]))
}

/// Where the heads' rows are read from.
#[derive(Debug, Clone)]
enum Layout {
    /// `q` `[B, H, T, D]`, `k` and `v` `[B, K, T, D]`, any strides.
    Heads([NdArrayTensor; 3]),
    /// The fused projection's output `[B, T, (H + 2K)·D]` in standard layout, and the
    /// rotary tables `[B, T, D]` its queries and keys are turned by.
    Packed {
        qkv: ArcArray<f32, IxDyn>,
        cos: ArcArray<f32, IxDyn>,
        sin: ArcArray<f32, IxDyn>,
    },
}

/// A [`Layout`] as the algorithm's [`Rows`].
struct Source<'a> {
    dims: Dims,
    views: Option<[ArrayView<'a, f32, IxDyn>; 3]>,
    layout: &'a Layout,
}

impl<'a> Source<'a> {
    fn new(dims: &Dims, layout: &'a Layout) -> Self {
        let views = match layout {
            Layout::Heads(ts) => Some([view(&ts[0]), view(&ts[1]), view(&ts[2])]),
            Layout::Packed { .. } => None,
        };
        Self {
            dims: *dims,
            views,
            layout,
        }
    }

    /// Head column `column` (of `H + 2K`) of row `b`, turned by the rotary tables when
    /// `rotate`.
    fn packed(&self, b: usize, column: usize, rotate: bool) -> Vec<f32> {
        let Layout::Packed { qkv, cos, sin } = self.layout else {
            unreachable!("called for the packed layout")
        };
        let (t, d) = (self.dims.seq, self.dims.head_dim);
        let width = qkv.shape()[2];
        let (data, cos, sin) = (elements(qkv), elements(cos), elements(sin));
        let mut rows = vec![0.0f32; t * d];
        for (i, row) in rows.chunks_mut(d).enumerate() {
            let x = &data[(b * t + i) * width + column * d..][..d];
            if rotate {
                let at = (b * t + i) * d;
                rotary(x, &cos[at..at + d], &sin[at..at + d], row);
            } else {
                row.copy_from_slice(x);
            }
        }
        rows
    }
}

impl Rows for Source<'_> {
    fn query(&self, b: usize, h: usize) -> Vec<f32> {
        match &self.views {
            Some([q, _, _]) => head_rows(q, b, h),
            None => self.packed(b, h, true),
        }
    }

    fn key(&self, b: usize, g: usize) -> Vec<f32> {
        match &self.views {
            Some([_, k, _]) => head_rows(k, b, g),
            None => self.packed(b, self.dims.heads + g, true),
        }
    }

    fn value(&self, b: usize, g: usize) -> Vec<f32> {
        match &self.views {
            Some([_, _, v]) => head_rows(v, b, g),
            None => self.packed(b, self.dims.heads + self.dims.kv_heads + g, false),
        }
    }
}

/// `y = x·cos + rotate_half(x)·sin` with `rotate_half(x₁, x₂) = (−x₂, x₁)`, as
/// `nn/rope.rs` computes it.
fn rotary(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        y[j] = x[j] * cos[j] + -x[j + half] * sin[j];
        y[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
    }
}

/// The gradient of [`rotary`]'s input from its output's, `dy`.
fn rotary_back(dy: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let half = dy.len() / 2;
    for j in 0..half {
        dx[j] = dy[j] * cos[j] + dy[j + half] * sin[j + half];
        dx[j + half] = dy[j + half] * cos[j + half] - dy[j] * sin[j];
    }
}

/// What the backward needs.
#[derive(Debug, Clone)]
struct Saved {
    dims: Dims,
    layout: Layout,
    /// The output as `[B, H, T, D]` (a view of `[B, T, H, D]` memory).
    out: ArcArray<f32, IxDyn>,
    lse: Vec<f32>,
    starts: Vec<usize>,
}

impl Saved {
    fn grads(&self, dout: NdArrayTensor) -> Vec<blocks::GroupGrads> {
        let dims = &self.dims;
        let dout = match &self.layout {
            Layout::Heads(_) => match dout {
                NdArrayTensor::F32(s) => s.into_shared(),
                _ => unreachable!("the gradient of an f32 output"),
            },
            Layout::Packed { .. } => standard(dout)
                .into_shape_with_order(IxDyn(&[dims.batch, dims.seq, dims.heads, dims.head_dim]))
                .unwrap_or_else(|_| unreachable!("the output's shape"))
                .permuted_axes(IxDyn(&[0, 2, 1, 3])),
        };
        let source = Source::new(dims, &self.layout);
        blocks::backward(
            dims,
            &source,
            &self.out.view(),
            &dout.view(),
            &self.lse,
            &self.starts,
        )
    }
}

/// The forward, recorded for autodiff when any input is tracked.
fn tracked<const N: usize, Op: Backward<Cpu, N, State = Saved>>(
    kind: OpsKind<Op, Cpu, Saved, NoCheckpointing, N>,
    dims: Dims,
    layout: Layout,
    starts: Vec<usize>,
) -> FloatTensor<Autodiff<Cpu>> {
    let packed = matches!(layout, Layout::Packed { .. });
    let (out, lse) = blocks::forward(&dims, &Source::new(&dims, &layout), &starts);
    let out = as_heads_first(out, dims.heads, &dims);
    let result = if packed {
        let flat = [dims.batch, dims.seq, dims.heads * dims.head_dim];
        out.clone()
            .permuted_axes(IxDyn(&[0, 2, 1, 3]))
            .into_shape_with_order(IxDyn(&flat))
            .unwrap_or_else(|_| unreachable!("[B, T, H, D] memory"))
    } else {
        out.clone()
    };
    match kind {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                dims,
                layout,
                out,
                lse,
                starts,
            };
            prep.finish(saved, NdArrayTensor::from(result))
        }
        OpsKind::UnTracked(prep) => prep.finish(NdArrayTensor::from(result)),
    }
}

/// The backward of [`attention`]: `dq`, `dk`, `dv`.
#[derive(Debug)]
struct HeadsBackward(PhantomData<Cpu>);

impl Backward<Cpu, 3> for HeadsBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let saved = &ops.state;
        let dims = &saved.dims;
        let group_grads = saved.grads(grads.consume::<Cpu>(&ops.node));
        let (t, d) = (dims.seq, dims.head_dim);
        let mut dq = zeros(dims.batch * t * dims.heads * d);
        let mut dk = zeros(dims.batch * t * dims.kv_heads * d);
        let mut dv = dk.clone();
        for g in group_grads {
            let (b, kv) = g.task;
            for (j, dq_h) in g.dq.iter().enumerate() {
                scatter(&mut dq, dq_h, (b, kv * dims.group() + j), dims.heads, dims);
            }
            scatter(&mut dk, &g.dk, (b, kv), dims.kv_heads, dims);
            scatter(&mut dv, &g.dv, (b, kv), dims.kv_heads, dims);
        }
        let arrays = [
            as_heads_first(dq, dims.heads, dims),
            as_heads_first(dk, dims.kv_heads, dims),
            as_heads_first(dv, dims.kv_heads, dims),
        ];
        for (node, grad) in ops.parents.into_iter().zip(arrays) {
            if let Some(node) = node {
                add_grad!(grads, &node, NdArrayTensor::from(grad));
            }
        }
    }
}

/// The backward of [`packed_attention`]: the gradient of the projection output, the
/// rotary embedding's turned back.
#[derive(Debug)]
struct PackedBackward(PhantomData<Cpu>);

impl Backward<Cpu, 1> for PackedBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let saved = &ops.state;
        let Layout::Packed { qkv, cos, sin } = &saved.layout else {
            unreachable!("recorded by packed_attention")
        };
        let dims = &saved.dims;
        let group_grads = saved.grads(grads.consume::<Cpu>(&ops.node));
        let (cos, sin) = (elements(cos), elements(sin));
        let (t, d) = (dims.seq, dims.head_dim);
        let width = dims.heads + 2 * dims.kv_heads;
        // Column c of row b: its `[T, D]` gradient, and whether it was turned.
        let column = |b: usize, c: usize| -> (&[f32], bool) {
            let (heads, kv) = (dims.heads, dims.kv_heads);
            let g = |kv_head: usize| &group_grads[b * kv + kv_head];
            if c < heads {
                (&g(c / dims.group()).dq[c % dims.group()], true)
            } else if c < heads + kv {
                (&g(c - heads).dk, true)
            } else {
                (&g(c - heads - kv).dv, false)
            }
        };
        debug_assert!(
            group_grads
                .iter()
                .enumerate()
                .all(|(i, g)| g.task == (i / dims.kv_heads, i % dims.kv_heads))
        );
        let mut dqkv = zeros(dims.batch * t * width * d);
        dqkv.par_chunks_mut(width * d)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, i) = (row / t, row % t);
                let at = row * d;
                for (c, dst) in dst.chunks_mut(d).enumerate() {
                    let (rows, rotate) = column(b, c);
                    let src = &rows[i * d..][..d];
                    if rotate {
                        rotary_back(src, &cos[at..at + d], &sin[at..at + d], dst);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            });
        let dqkv = ArcArray::from_shape_vec(IxDyn(qkv.shape()), dqkv)
            .unwrap_or_else(|_| unreachable!("the input's shape"));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            add_grad!(grads, &node, NdArrayTensor::from(dqkv));
        }
    }
}

#[cfg(test)]
mod tests;
