//! Flash attention's blocked algorithm on the host, in f32 (FlashAttention-2,
//! algorithms 1 and 2), for the CPU backend's op (`cpu.rs`).
//!
//! One task per (row, KV head) walks the query heads of its group in blocks of
//! [`BLOCK`] queries. A block's scores against the keys any of its queries may see
//! (from the start of its first query's sample to its last query) are one small
//! product on the `gemm` crate; the mask is applied as index ranges, the softmax runs
//! in place with a vectorised `exp`, and only the log-sum-exp per query is kept. The
//! backward recomputes each block's probabilities from it and sums the KV head's `dK`
//! and `dV` over its query heads in a fixed order, so the result does not depend on
//! the number of threads. Where the heads' rows come from (separate `q`, `k`, `v`, or
//! the projection's output with the rotary embedding still to apply) is the caller's
//! [`Rows`].

use gemm::Parallelism;
use ndarray::{ArrayView, IxDyn};
use rayon::prelude::*;

use crate::nn::exp::exp_in_place;
use crate::nn::host::zeros;

/// Queries per block.
const BLOCK: usize = 64;

/// The `[T, D]` rows of each head, contiguous.
pub(super) trait Rows: Sync {
    /// Query head `h` of row `b`.
    fn query(&self, b: usize, h: usize) -> Vec<f32>;
    /// KV head `g` of row `b`: its keys.
    fn key(&self, b: usize, g: usize) -> Vec<f32>;
    /// KV head `g` of row `b`: its values.
    fn value(&self, b: usize, g: usize) -> Vec<f32>;
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    /// Rows B.
    pub batch: usize,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads K (divides H).
    pub kv_heads: usize,
    /// Tokens per row T.
    pub seq: usize,
    /// Head dimension D.
    pub head_dim: usize,
}

impl Dims {
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// For each token (`[B·T]`), the first token of its sample: the first key it may see.
pub(super) fn sample_starts(dims: &Dims, segments: &[i64]) -> Vec<usize> {
    let mut starts = Vec::with_capacity(dims.batch * dims.seq);
    for row in segments.chunks(dims.seq) {
        let mut start = 0;
        for (i, id) in row.iter().enumerate() {
            if i > 0 && *id != row[i - 1] {
                start = i;
            }
            starts.push(start);
        }
    }
    starts
}

/// One head's `[T, D]` rows of a `[B, N, T, D]` view, contiguous.
pub(super) fn head_rows(x: &ArrayView<'_, f32, IxDyn>, b: usize, h: usize) -> Vec<f32> {
    let (shape, strides) = (x.shape(), x.strides());
    let (t, d) = (shape[2], shape[3]);
    let mut rows = Vec::with_capacity(t * d);
    // SAFETY: every offset is that of an element `[b, h, i, j]` of the view, inside it
    // (b < B and h < N by the callers' loops).
    unsafe {
        let head = x
            .as_ptr()
            .offset(b as isize * strides[0] + h as isize * strides[1]);
        for i in 0..t {
            let row = head.offset(i as isize * strides[2]);
            if strides[3] == 1 {
                rows.extend_from_slice(std::slice::from_raw_parts(row, d));
            } else {
                rows.extend((0..d).map(|j| *row.offset(j as isize * strides[3])));
            }
        }
    }
    rows
}

/// `dst (m×n, row stride dst_rs) (+)= a·b`, with `a` `m×k` and `b` `k×n` given by
/// (row stride, column stride), on this thread.
#[allow(clippy::too_many_arguments)]
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() > last(m, dst_rs, n, 1));
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs)
                .take(m)
                .for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    assert!(a.len() > last(m, a_rs, k, a_cs) && b.len() > last(k, b_rs, n, b_cs));
    // SAFETY: the asserts above keep every element read or written inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// One query block: its queries `i0..i1` and the keys `lo..i1` any of them may see.
#[derive(Clone, Copy)]
struct Block {
    i0: usize,
    i1: usize,
    lo: usize,
}

impl Block {
    fn all(seq: usize, starts: &[usize]) -> impl Iterator<Item = Block> + '_ {
        (0..seq).step_by(BLOCK).map(move |i0| Block {
            i0,
            i1: (i0 + BLOCK).min(seq),
            lo: starts[i0],
        })
    }

    fn queries(&self) -> usize {
        self.i1 - self.i0
    }

    fn keys(&self) -> usize {
        self.i1 - self.lo
    }

    /// The block's scaled scores `q·kᵀ/√D` into `s` (`queries × keys`).
    fn scores(&self, s: &mut [f32], q: &[f32], k: &[f32], d: usize) {
        let (m, n) = (self.queries(), self.keys());
        product(
            (m, n, d),
            s,
            n,
            false,
            &q[self.i0 * d..],
            (d, 1),
            &k[self.lo * d..],
            (1, d),
        );
        let scale = 1.0 / (d as f32).sqrt();
        s[..m * n].iter_mut().for_each(|x| *x *= scale);
    }

    /// The keys query `i` sees, as columns of the block's scores.
    fn visible(&self, i: usize, starts: &[usize]) -> std::ops::Range<usize> {
        starts[i] - self.lo..i + 1 - self.lo
    }
}

/// Every (row, KV head) pair: the tasks.
fn tasks(dims: &Dims) -> Vec<(usize, usize)> {
    (0..dims.batch)
        .flat_map(|b| (0..dims.kv_heads).map(move |g| (b, g)))
        .collect()
}

/// The output in `[B, T, H, D]` memory order and the log-sum-exp `[B, H, T]`.
pub(super) fn forward(dims: &Dims, rows: &impl Rows, starts: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        seq: t,
        head_dim: d,
        ..
    } = *dims;
    let tasks = tasks(dims);
    // Per task, per query head of the group: (out [T, D], lse [T]).
    let results: Vec<Vec<(Vec<f32>, Vec<f32>)>> = tasks
        .par_iter()
        .map(|&(b, g)| {
            let starts = &starts[b * t..(b + 1) * t];
            let (keys, values) = (rows.key(b, g), rows.value(b, g));
            let mut s = vec![0.0f32; BLOCK * t];
            (g * dims.group()..(g + 1) * dims.group())
                .map(|h| {
                    let queries = rows.query(b, h);
                    let mut out = vec![0.0f32; t * d];
                    let mut lse = vec![0.0f32; t];
                    for block in Block::all(t, starts) {
                        let n = block.keys();
                        block.scores(&mut s, &queries, &keys, d);
                        for (r, row) in s.chunks_mut(n).take(block.queries()).enumerate() {
                            let i = block.i0 + r;
                            let seen = block.visible(i, starts);
                            row[..seen.start].fill(0.0);
                            row[seen.end..].fill(0.0);
                            let row = &mut row[seen];
                            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                            row.iter_mut().for_each(|x| *x -= max);
                            exp_in_place(row);
                            let sum: f32 = row.iter().sum();
                            let inv = 1.0 / sum;
                            row.iter_mut().for_each(|x| *x *= inv);
                            lse[i] = max + sum.ln();
                        }
                        product(
                            (block.queries(), d, n),
                            &mut out[block.i0 * d..],
                            d,
                            false,
                            &s,
                            (n, 1),
                            &values[block.lo * d..],
                            (d, 1),
                        );
                    }
                    (out, lse)
                })
                .collect()
        })
        .collect();
    // Head h of row b: results[task of (b, h / group)][h % group].
    let task =
        |b: usize, h: usize| &results[b * dims.kv_heads + h / dims.group()][h % dims.group()];
    let mut out = zeros(dims.batch * t * dims.heads * d);
    out.par_chunks_mut(dims.heads * d)
        .enumerate()
        .for_each(|(row, out)| {
            let (b, i) = (row / t, row % t);
            for (h, out) in out.chunks_mut(d).enumerate() {
                out.copy_from_slice(&task(b, h).0[i * d..][..d]);
            }
        });
    let mut lse = vec![0.0f32; dims.batch * dims.heads * t];
    for (bh, lse) in lse.chunks_mut(t).enumerate() {
        lse.copy_from_slice(&task(bh / dims.heads, bh % dims.heads).1);
    }
    (out, lse)
}

/// `[T, D]` rows of head `h` of row `b` into `[B, T, N, D]` memory (`n` heads).
pub(super) fn scatter(
    dst: &mut [f32],
    rows: &[f32],
    (b, h): (usize, usize),
    n: usize,
    dims: &Dims,
) {
    let (t, d) = (dims.seq, dims.head_dim);
    for (i, row) in rows.chunks(d).enumerate() {
        dst[((b * t + i) * n + h) * d..][..d].copy_from_slice(row);
    }
}

/// One task's gradients: the task, `dQ` `[T, D]` of each query head of its group, and
/// the group's `dK` and `dV`.
pub(super) struct GroupGrads {
    /// (row, KV head).
    pub task: (usize, usize),
    /// Per query head of the group.
    pub dq: Vec<Vec<f32>>,
    /// `[T, D]`.
    pub dk: Vec<f32>,
    /// `[T, D]`.
    pub dv: Vec<f32>,
}

/// The gradients of every task, from the output and its gradient (`[B, H, T, D]`
/// views) and the forward's log-sum-exp.
pub(super) fn backward(
    dims: &Dims,
    rows: &impl Rows,
    out: &ArrayView<'_, f32, IxDyn>,
    dout: &ArrayView<'_, f32, IxDyn>,
    lse: &[f32],
    starts: &[usize],
) -> Vec<GroupGrads> {
    let Dims {
        seq: t,
        head_dim: d,
        ..
    } = *dims;
    let scale = 1.0 / (d as f32).sqrt();
    tasks(dims)
        .par_iter()
        .map(|&(b, g)| {
            let starts = &starts[b * t..(b + 1) * t];
            let (keys, values) = (rows.key(b, g), rows.value(b, g));
            let mut dk = vec![0.0f32; t * d];
            let mut dv = vec![0.0f32; t * d];
            let mut s = vec![0.0f32; BLOCK * t];
            let mut dp = vec![0.0f32; BLOCK * t];
            let dq = (g * dims.group()..(g + 1) * dims.group())
                .map(|h| {
                    let queries = rows.query(b, h);
                    let o = head_rows(out, b, h);
                    let dout = head_rows(dout, b, h);
                    let lse = &lse[(b * dims.heads + h) * t..][..t];
                    // D_i = dO_i · O_i, the softmax backward's row term.
                    let delta: Vec<f32> = dout
                        .chunks(d)
                        .zip(o.chunks(d))
                        .map(|(x, y)| x.iter().zip(y).map(|(a, b)| a * b).sum())
                        .collect();
                    let mut dq = vec![0.0f32; t * d];
                    for block in Block::all(t, starts) {
                        let (m, n) = (block.queries(), block.keys());
                        block.scores(&mut s, &queries, &keys, d);
                        for (r, row) in s.chunks_mut(n).take(m).enumerate() {
                            let i = block.i0 + r;
                            let seen = block.visible(i, starts);
                            row[..seen.start].fill(0.0);
                            row[seen.end..].fill(0.0);
                            let row = &mut row[seen];
                            row.iter_mut().for_each(|x| *x -= lse[i]);
                            exp_in_place(row);
                        }
                        let dout_rows = &dout[block.i0 * d..];
                        // dV += Pᵀ·dO
                        let dv_rows = &mut dv[block.lo * d..];
                        product((n, d, m), dv_rows, d, true, &s, (1, n), dout_rows, (d, 1));
                        // dP = dO·Vᵀ
                        let v_rows = &values[block.lo * d..];
                        product(
                            (m, n, d),
                            &mut dp,
                            n,
                            false,
                            dout_rows,
                            (d, 1),
                            v_rows,
                            (1, d),
                        );
                        // dS = P ⊙ (dP − D_i) / √D
                        let ds = s.chunks_mut(n).zip(dp.chunks(n)).take(m);
                        for (r, (p, dp)) in ds.enumerate() {
                            let di = delta[block.i0 + r];
                            for (p, dp) in p.iter_mut().zip(dp) {
                                *p *= (dp - di) * scale;
                            }
                        }
                        // dQ = dS·K
                        let (dq_rows, k_rows) = (&mut dq[block.i0 * d..], &keys[block.lo * d..]);
                        product((m, d, n), dq_rows, d, false, &s, (n, 1), k_rows, (d, 1));
                        // dK += dSᵀ·Q
                        let (dk_rows, q_rows) = (&mut dk[block.lo * d..], &queries[block.i0 * d..]);
                        product((n, d, m), dk_rows, d, true, &s, (1, n), q_rows, (d, 1));
                    }
                    dq
                })
                .collect();
            GroupGrads {
                task: (b, g),
                dq,
                dk,
                dv,
            }
        })
        .collect()
}
