//! Flash attention on Burn's CubeCL backends (CUDA for training; WebGPU, which runs on
//! any Vulkan driver, for tests): the kernels of [`super::flash`]'s reference path and
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

use super::cube::{Cube, CubeOp, dispatch, same};

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
// Kernels. Grid: (tiles along T, heads, batch); cube: `block` units along x. A masked
// score is -1e30 (finite: WGSL has no infinity literal).
// ---------------------------------------------------------------------------------------
mod kernel {
    use cubecl::prelude::*;

    /// Rows `r0..r0 + block` of two `[.., T, D]` tensors (from row `row0` of the
    /// flattened tensor), in f32, into two shared tiles; zeros past the row's end.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn load_rows<F: Float>(
        a: &Tensor<F>,
        b: &Tensor<F>,
        a_tile: &mut SharedMemory<f32>,
        b_tile: &mut SharedMemory<f32>,
        row0: usize,
        r0: usize,
        seq: usize,
        #[comptime] block: usize,
        #[comptime] head_dim: usize,
    ) {
        let u = UNIT_POS_X as usize;
        #[unroll]
        for r in 0..head_dim {
            let e = r * block + u;
            let row = r0 + e / head_dim;
            let mut x = 0.0f32;
            let mut y = 0.0f32;
            if row < seq {
                x = f32::cast_from(a[(row0 + row) * head_dim + e % head_dim]);
                y = f32::cast_from(b[(row0 + row) * head_dim + e % head_dim]);
            }
            a_tile[e] = x;
            b_tile[e] = y;
        }
    }

    /// The segment of token `j` of the row starting at `seg_row`; 0 past its end.
    #[cube]
    fn segment_at(segments: &Tensor<i32>, seg_row: usize, j: usize, seq: usize) -> i32 {
        let mut id = 0i32;
        if j < seq {
            id = segments[seg_row + j];
        }
        id
    }

    /// Where a unit of a query-tile cube works (grid: query tiles, heads, batch).
    #[derive(CubeType)]
    struct QueryUnit {
        /// The unit's index in its cube.
        u: usize,
        /// The tile's first query.
        q0: usize,
        /// The unit's query.
        i: usize,
        /// Whether that query exists (the last tile may be partial).
        live: bool,
        /// Row offset of this head's queries in `[B, H, T, D]` (or `[B, H, T]`).
        q_row0: usize,
        /// Row offset of its KV head's keys in `[B, K, T, D]`.
        kv_row0: usize,
        /// Offset of this row's segment ids in `[B, T]`.
        seg_row: usize,
    }

    #[cube]
    fn query_unit(seq: usize, heads: u32, kv_heads: u32, #[comptime] block: usize) -> QueryUnit {
        let b = CUBE_POS_Z as usize;
        let h = CUBE_POS_Y as usize;
        let q0 = CUBE_POS_X as usize * block;
        let u = UNIT_POS_X as usize;
        let i = q0 + u;
        let kv_head = h / (heads / kv_heads) as usize;
        QueryUnit {
            u,
            q0,
            i,
            live: i < seq,
            q_row0: (b * heads as usize + h) * seq,
            kv_row0: (b * kv_heads as usize + kv_head) * seq,
            seg_row: b * seq,
        }
    }

    /// Forward: `out = softmax(q·kᵀ·scale + mask)·v` and `lse` per query.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_kernel<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        segments: &Tensor<i32>,
        out: &mut Tensor<F>,
        lse: &mut Tensor<f32>,
        seq: u32,
        heads: u32,
        kv_heads: u32,
        scale: f32,
        #[comptime] block: usize,
        #[comptime] head_dim: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let seq = seq as usize;
        let QueryUnit {
            u,
            q0,
            i,
            live,
            q_row0,
            kv_row0,
            seg_row,
        } = query_unit(seq, heads, kv_heads, block);

        // This unit's query, pre-scaled, and its running statistics.
        let mut qi = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        let mut seg_i = 0i32;
        #[unroll]
        for x in 0..head_dim {
            qi[x] = 0.0f32;
            acc[x] = 0.0f32;
        }
        if live {
            #[unroll]
            for x in 0..head_dim {
                qi[x] = f32::cast_from(q[(q_row0 + i) * head_dim + x]) * scale;
            }
            seg_i = segments[seg_row + i];
        }
        let mut max = f32::new(-1.0e30);
        let mut sum = 0.0f32;

        let mut k_tile = SharedMemory::<f32>::new(block * head_dim);
        let mut v_tile = SharedMemory::<f32>::new(block * head_dim);
        let mut seg_tile = SharedMemory::<i32>::new(block);
        let mut scores = Array::<f32>::new(block);

        let q_last = min(q0 + block, seq) - 1;
        let first_seg = segments[seg_row + q0];
        for kt in 0..q_last / block + 1 {
            let k0 = kt * block;
            load_rows::<F>(
                k,
                v,
                &mut k_tile,
                &mut v_tile,
                kv_row0,
                k0,
                seq,
                block,
                head_dim,
            );
            seg_tile[u] = segment_at(segments, seg_row, k0 + u, seq);
            sync_cube();

            let k_last = min(k0 + block, seq) - 1;
            if live && segments[seg_row + k_last] >= first_seg {
                let mut tile_max = max;
                for j in 0..block {
                    let mut s = f32::new(-1.0e30);
                    if k0 + j <= i && seg_tile[j] == seg_i {
                        let mut dot = 0.0f32;
                        #[unroll]
                        for x in 0..head_dim {
                            dot += qi[x] * k_tile[j * head_dim + x];
                        }
                        s = dot;
                        if s > tile_max {
                            tile_max = s;
                        }
                    }
                    scores[j] = s;
                }
                let rescale = (max - tile_max).exp();
                sum *= rescale;
                #[unroll]
                for x in 0..head_dim {
                    acc[x] *= rescale;
                }
                for j in 0..block {
                    if scores[j] > -1.0e30f32 {
                        let p = (scores[j] - tile_max).exp();
                        sum += p;
                        #[unroll]
                        for x in 0..head_dim {
                            acc[x] += p * v_tile[j * head_dim + x];
                        }
                    }
                }
                max = tile_max;
            }
            sync_cube();
        }

        if live {
            #[unroll]
            for x in 0..head_dim {
                out[(q_row0 + i) * head_dim + x] = F::cast_from(acc[x] / sum);
            }
            lse[q_row0 + i] = max + sum.ln();
        }
    }

    /// Backward, queries' side: `dQ`, and `delta = rowsum(dO ∘ O)` for the keys' side.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_query_kernel<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        out: &Tensor<F>,
        dout: &Tensor<F>,
        lse: &Tensor<f32>,
        segments: &Tensor<i32>,
        dq: &mut Tensor<F>,
        delta: &mut Tensor<f32>,
        seq: u32,
        heads: u32,
        kv_heads: u32,
        scale: f32,
        #[comptime] block: usize,
        #[comptime] head_dim: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let seq = seq as usize;
        let QueryUnit {
            u,
            q0,
            i,
            live,
            q_row0,
            kv_row0,
            seg_row,
        } = query_unit(seq, heads, kv_heads, block);

        let mut qi = Array::<f32>::new(head_dim);
        let mut doi = Array::<f32>::new(head_dim);
        let mut dqi = Array::<f32>::new(head_dim);
        let mut seg_i = 0i32;
        let mut lse_i = 0.0f32;
        let mut delta_i = 0.0f32;
        #[unroll]
        for x in 0..head_dim {
            qi[x] = 0.0f32;
            doi[x] = 0.0f32;
            dqi[x] = 0.0f32;
        }
        if live {
            let at = (q_row0 + i) * head_dim;
            #[unroll]
            for x in 0..head_dim {
                qi[x] = f32::cast_from(q[at + x]) * scale;
                doi[x] = f32::cast_from(dout[at + x]);
                delta_i += doi[x] * f32::cast_from(out[at + x]);
            }
            seg_i = segments[seg_row + i];
            lse_i = lse[q_row0 + i];
            delta[q_row0 + i] = delta_i;
        }

        let mut k_tile = SharedMemory::<f32>::new(block * head_dim);
        let mut v_tile = SharedMemory::<f32>::new(block * head_dim);
        let mut seg_tile = SharedMemory::<i32>::new(block);

        let q_last = min(q0 + block, seq) - 1;
        let first_seg = segments[seg_row + q0];
        for kt in 0..q_last / block + 1 {
            let k0 = kt * block;
            load_rows::<F>(
                k,
                v,
                &mut k_tile,
                &mut v_tile,
                kv_row0,
                k0,
                seq,
                block,
                head_dim,
            );
            seg_tile[u] = segment_at(segments, seg_row, k0 + u, seq);
            sync_cube();

            let k_last = min(k0 + block, seq) - 1;
            if live && segments[seg_row + k_last] >= first_seg {
                for j in 0..block {
                    if k0 + j <= i && seg_tile[j] == seg_i {
                        let mut s = 0.0f32;
                        let mut dp = 0.0f32;
                        #[unroll]
                        for x in 0..head_dim {
                            s += qi[x] * k_tile[j * head_dim + x];
                            dp += doi[x] * v_tile[j * head_dim + x];
                        }
                        let ds = (s - lse_i).exp() * (dp - delta_i);
                        #[unroll]
                        for x in 0..head_dim {
                            dqi[x] += ds * k_tile[j * head_dim + x];
                        }
                    }
                }
            }
            sync_cube();
        }

        if live {
            #[unroll]
            for x in 0..head_dim {
                dq[(q_row0 + i) * head_dim + x] = F::cast_from(dqi[x] * scale);
            }
        }
    }

    /// Backward, keys' side: `dK` and `dV`, summed over the query heads of each KV head.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments, clippy::manual_div_ceil)] // div_ceil is not a cube op
    pub(super) fn backward_key_kernel<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        dout: &Tensor<F>,
        lse: &Tensor<f32>,
        delta: &Tensor<f32>,
        segments: &Tensor<i32>,
        dk: &mut Tensor<F>,
        dv: &mut Tensor<F>,
        seq: u32,
        heads: u32,
        kv_heads: u32,
        scale: f32,
        #[comptime] block: usize,
        #[comptime] head_dim: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let seq = seq as usize;
        let b = CUBE_POS_Z as usize;
        let kv_head = CUBE_POS_Y as usize;
        let k0 = CUBE_POS_X as usize * block;
        let u = UNIT_POS_X as usize;
        let j = k0 + u;
        let live = j < seq;
        let group = (heads / kv_heads) as usize;
        let kv_row0 = (b * kv_heads as usize + kv_head) * seq;
        let seg_row = b * seq;

        let mut kj = Array::<f32>::new(head_dim);
        let mut vj = Array::<f32>::new(head_dim);
        let mut dkj = Array::<f32>::new(head_dim);
        let mut dvj = Array::<f32>::new(head_dim);
        let mut seg_j = 0i32;
        #[unroll]
        for x in 0..head_dim {
            kj[x] = 0.0f32;
            vj[x] = 0.0f32;
            dkj[x] = 0.0f32;
            dvj[x] = 0.0f32;
        }
        if live {
            #[unroll]
            for x in 0..head_dim {
                kj[x] = f32::cast_from(k[(kv_row0 + j) * head_dim + x]) * scale;
                vj[x] = f32::cast_from(v[(kv_row0 + j) * head_dim + x]);
            }
            seg_j = segments[seg_row + j];
        }

        let mut q_tile = SharedMemory::<f32>::new(block * head_dim);
        let mut do_tile = SharedMemory::<f32>::new(block * head_dim);
        let mut lse_tile = SharedMemory::<f32>::new(block);
        let mut delta_tile = SharedMemory::<f32>::new(block);
        let mut seg_tile = SharedMemory::<i32>::new(block);

        let k_last = min(k0 + block, seq) - 1;
        let last_seg = segments[seg_row + k_last];
        let tiles = (seq + block - 1) / block;
        // One flat loop over (query head of the group, query tile from the diagonal on).
        let first_tile = k0 / block;
        let per_head = tiles - first_tile;
        for step in 0..group * per_head {
            let g = step / per_head;
            let q_row0 = (b * heads as usize + kv_head * group + g) * seq;
            let q0 = (first_tile + step % per_head) * block;
            {
                load_rows::<F>(
                    q,
                    dout,
                    &mut q_tile,
                    &mut do_tile,
                    q_row0,
                    q0,
                    seq,
                    block,
                    head_dim,
                );
                seg_tile[u] = segment_at(segments, seg_row, q0 + u, seq);
                let mut li = 0.0f32;
                let mut di = 0.0f32;
                if q0 + u < seq {
                    li = lse[q_row0 + q0 + u];
                    di = delta[q_row0 + q0 + u];
                }
                lse_tile[u] = li;
                delta_tile[u] = di;
                sync_cube();

                if live && segments[seg_row + q0] <= last_seg {
                    for r in 0..block {
                        if q0 + r < seq && j <= q0 + r && seg_tile[r] == seg_j {
                            let mut s = 0.0f32;
                            let mut dp = 0.0f32;
                            #[unroll]
                            for x in 0..head_dim {
                                s += q_tile[r * head_dim + x] * kj[x];
                                dp += do_tile[r * head_dim + x] * vj[x];
                            }
                            let p = (s - lse_tile[r]).exp();
                            let ds = p * (dp - delta_tile[r]);
                            #[unroll]
                            for x in 0..head_dim {
                                dvj[x] += p * do_tile[r * head_dim + x];
                                dkj[x] += ds * q_tile[r * head_dim + x];
                            }
                        }
                    }
                }
                sync_cube();
            }
        }

        if live {
            #[unroll]
            for x in 0..head_dim {
                dk[(kv_row0 + j) * head_dim + x] = F::cast_from(dkj[x] * scale);
                dv[(kv_row0 + j) * head_dim + x] = F::cast_from(dvj[x]);
            }
        }
    }
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
