//! Flash attention, reference path: causal self-attention over tiles with an online
//! softmax, forward and backward, with grouped-query heads and packed (varlen) rows, in
//! plain f32 on the host.
//!
//! It never holds the `[T × S]` score matrix: the forward keeps, per query, a running
//! maximum, a running sum of exponentials and an output accumulator while it walks the
//! key tiles, and stores the log-sum-exp (`lse`) for the backward, which recomputes
//! each tile's probabilities from it (Dao, FlashAttention-2, algorithms 1 and 2). Tiles
//! that the causal mask or the segment boundaries hide entirely are skipped.
//!
//! This is the oracle for a GPU kernel: same tiling, same arithmetic, so a kernel's
//! outputs can be compared tile for tile; tests check it against
//! the materialised attention (`scaled_dot_product` in `nn/attention.rs`) and Burn's
//! autodiff.
//!
//! Layouts (row-major): `q`, `out`, `dout`, `dq`: `[B, H, T, D]`; `k`, `v`, `dk`, `dv`:
//! `[B, K, T, D]`; `lse`: `[B, H, T]`; `segments`: `[B, T]`. Query head `h` uses KV head
//! `h / (H / K)`. Key `j` is visible to query `i` when `j ≤ i` and, with segments, both
//! are in the same segment.

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashShape {
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
    /// Tile edge: queries and keys per tile.
    pub block: usize,
}

impl FlashShape {
    fn q_index(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.heads + h) * self.seq + i) * self.head_dim
    }

    fn kv_index(&self, b: usize, h: usize, j: usize) -> usize {
        let kv = h / (self.heads / self.kv_heads);
        ((b * self.kv_heads + kv) * self.seq + j) * self.head_dim
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Which key tiles a query tile must visit, and the mask inside them.
struct Visibility<'a> {
    seq: usize,
    segments: Option<&'a [i64]>,
}

impl Visibility<'_> {
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        j <= i
            && self
                .segments
                .is_none_or(|s| s[b * self.seq + i] == s[b * self.seq + j])
    }

    /// Whether any query of `queries` sees any key of `keys` (tiles to skip otherwise).
    fn tile_visible(
        &self,
        b: usize,
        queries: std::ops::Range<usize>,
        keys: std::ops::Range<usize>,
    ) -> bool {
        if keys.start >= queries.end {
            return false; // strictly above the diagonal
        }
        match self.segments {
            None => true,
            Some(s) => {
                let row = &s[b * self.seq..(b + 1) * self.seq];
                // Segments are contiguous runs, so ranges of ids suffice.
                let (q_lo, q_hi) = (row[queries.start], row[queries.end - 1]);
                let (k_lo, k_hi) = (row[keys.start], row[keys.end - 1]);
                let (q_lo, q_hi) = (q_lo.min(q_hi), q_lo.max(q_hi));
                let (k_lo, k_hi) = (k_lo.min(k_hi), k_lo.max(k_hi));
                q_lo <= k_hi && k_lo <= q_hi
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The forward pass: `(out, lse)`.
///
/// # Panics
/// Slices whose lengths do not match `shape`, or K not dividing H (callers build these
/// from tensors of checked shapes).
pub fn forward(
    shape: &FlashShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: Option<&[i64]>,
) -> (Vec<f32>, Vec<f32>) {
    let FlashShape {
        batch,
        heads,
        seq,
        head_dim: d,
        block,
        ..
    } = *shape;
    assert_eq!(q.len(), batch * heads * seq * d);
    assert_eq!(k.len(), v.len());
    let vis = Visibility { seq, segments };
    let scale = shape.scale();
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; batch * heads * seq];
    for b in 0..batch {
        for h in 0..heads {
            for q0 in (0..seq).step_by(block) {
                let q1 = (q0 + block).min(seq);
                // Running statistics of the tile's queries.
                let mut max = vec![f32::NEG_INFINITY; q1 - q0];
                let mut sum = vec![0.0f32; q1 - q0];
                let mut acc = vec![0.0f32; (q1 - q0) * d];
                for k0 in (0..q1).step_by(block) {
                    let k1 = (k0 + block).min(seq);
                    if !vis.tile_visible(b, q0..q1, k0..k1) {
                        continue;
                    }
                    for i in q0..q1 {
                        let qi = &q[shape.q_index(b, h, i)..][..d];
                        let r = i - q0;
                        for j in k0..k1 {
                            if !vis.visible(b, i, j) {
                                continue;
                            }
                            let score = dot(qi, &k[shape.kv_index(b, h, j)..][..d]) * scale;
                            let new_max = max[r].max(score);
                            let rescale = (max[r] - new_max).exp();
                            let p = (score - new_max).exp();
                            sum[r] = sum[r] * rescale + p;
                            let vj = &v[shape.kv_index(b, h, j)..][..d];
                            for (a, x) in acc[r * d..(r + 1) * d].iter_mut().zip(vj) {
                                *a = *a * rescale + p * x;
                            }
                            max[r] = new_max;
                        }
                    }
                }
                for i in q0..q1 {
                    let r = i - q0;
                    let o = &mut out[shape.q_index(b, h, i)..][..d];
                    for (o, a) in o.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                        *o = a / sum[r];
                    }
                    lse[(b * heads + h) * seq + i] = max[r] + sum[r].ln();
                }
            }
        }
    }
    (out, lse)
}

/// Gradients of the inputs.
pub struct FlashGrads {
    /// `[B, H, T, D]`.
    pub dq: Vec<f32>,
    /// `[B, K, T, D]`, summed over the query heads that share each KV head.
    pub dk: Vec<f32>,
    /// `[B, K, T, D]`.
    pub dv: Vec<f32>,
}

/// The backward pass: recomputes each tile's probabilities from `lse`.
///
/// # Panics
/// As [`forward`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: &FlashShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    segments: Option<&[i64]>,
) -> FlashGrads {
    let FlashShape {
        batch,
        heads,
        seq,
        head_dim: d,
        block,
        ..
    } = *shape;
    assert_eq!(dout.len(), out.len());
    let vis = Visibility { seq, segments };
    let scale = shape.scale();
    let mut grads = FlashGrads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    for b in 0..batch {
        for h in 0..heads {
            // D_i = dO_i · O_i, the softmax backward's row term.
            let delta: Vec<f32> = (0..seq)
                .map(|i| {
                    dot(
                        &dout[shape.q_index(b, h, i)..][..d],
                        &out[shape.q_index(b, h, i)..][..d],
                    )
                })
                .collect();
            for k0 in (0..seq).step_by(block) {
                let k1 = (k0 + block).min(seq);
                for q0 in (k0..seq).step_by(block) {
                    let q1 = (q0 + block).min(seq);
                    if !vis.tile_visible(b, q0..q1, k0..k1) {
                        continue;
                    }
                    for i in q0..q1 {
                        let qi_at = shape.q_index(b, h, i);
                        let row_lse = lse[(b * heads + h) * seq + i];
                        for j in k0..k1 {
                            if !vis.visible(b, i, j) {
                                continue;
                            }
                            let kv_at = shape.kv_index(b, h, j);
                            let p =
                                (dot(&q[qi_at..][..d], &k[kv_at..][..d]) * scale - row_lse).exp();
                            let dp = dot(&dout[qi_at..][..d], &v[kv_at..][..d]);
                            let ds = p * (dp - delta[i]) * scale;
                            for x in 0..d {
                                grads.dv[kv_at + x] += p * dout[qi_at + x];
                                grads.dq[qi_at + x] += ds * k[kv_at + x];
                                grads.dk[kv_at + x] += ds * q[qi_at + x];
                            }
                        }
                    }
                }
            }
        }
    }
    grads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::nn::attention::{attention_bias, scaled_dot_product};
    use burn::backend::Autodiff;
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    type AD = Autodiff<TestBackend>;

    fn data(t: Tensor<AD, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        TensorData::new(a.to_vec(), [a.len()]).assert_approx_eq::<f32>(
            &TensorData::new(b.to_vec(), [b.len()]),
            Tolerance::absolute(2e-5),
        );
    }

    /// Flash forward and backward equal the dense attention and its autodiff gradients.
    fn check(shape: FlashShape, segments: Option<Vec<i64>>) {
        let device = Default::default();
        let FlashShape {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
            ..
        } = shape;
        let q = Tensor::<AD, 4>::random(
            [batch, heads, seq, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .require_grad();
        let k = Tensor::<AD, 4>::random(
            [batch, kv_heads, seq, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .require_grad();
        let v = Tensor::<AD, 4>::random(
            [batch, kv_heads, seq, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .require_grad();
        let dout = Tensor::<AD, 4>::random(
            [batch, heads, seq, head_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let bias = attention_bias::<AD>(
            batch,
            seq,
            0,
            &vec![true; batch * seq],
            segments.as_deref(),
            &device,
        );
        let dense = scaled_dot_product(q.clone(), k.clone(), v.clone(), &bias);
        let grads = (dense.clone() * dout.clone()).sum().backward();
        let (fq, fk, fv, fd) = (
            data(q.clone()),
            data(k.clone()),
            data(v.clone()),
            data(dout),
        );
        let (out, lse) = forward(&shape, &fq, &fk, &fv, segments.as_deref());
        close(&out, &data(dense), "out");
        let g = backward(&shape, &fq, &fk, &fv, &out, &lse, &fd, segments.as_deref());
        let grad = |t: &Tensor<AD, 4>| t.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        close(&g.dq, &grad(&q), "dq");
        close(&g.dk, &grad(&k), "dk");
        close(&g.dv, &grad(&v), "dv");
    }

    #[test]
    fn causal_with_grouped_heads_matches_dense_attention() {
        check(
            FlashShape {
                batch: 2,
                heads: 4,
                kv_heads: 2,
                seq: 37,
                head_dim: 8,
                block: 8,
            },
            None,
        );
    }

    #[test]
    fn packed_rows_match_dense_attention_with_segments() {
        // Row 0: samples of 10, 1, 20 and 9 tokens; row 1: one sample of 40.
        let mut segments: Vec<i64> = [(0, 10), (1, 1), (2, 20), (3, 9)]
            .iter()
            .flat_map(|&(s, n)| vec![s; n])
            .collect();
        segments.extend(vec![0; 40]);
        check(
            FlashShape {
                batch: 2,
                heads: 2,
                kv_heads: 1,
                seq: 40,
                head_dim: 4,
                block: 16,
            },
            Some(segments),
        );
    }

    #[test]
    fn a_tile_larger_than_the_row_is_one_dense_pass() {
        check(
            FlashShape {
                batch: 1,
                heads: 2,
                kv_heads: 2,
                seq: 5,
                head_dim: 4,
                block: 64,
            },
            None,
        );
    }

    #[test]
    fn hidden_tiles_are_skipped() {
        let segments: Vec<i64> = [vec![0; 8], vec![1; 8]].concat();
        let vis = Visibility {
            seq: 16,
            segments: Some(&segments),
        };
        assert!(!vis.tile_visible(0, 0..8, 8..16), "above the diagonal");
        assert!(!vis.tile_visible(0, 8..16, 0..8), "another sample");
        assert!(vis.tile_visible(0, 8..16, 8..16));
        let vis = Visibility {
            seq: 16,
            segments: None,
        };
        assert!(vis.tile_visible(0, 8..16, 0..8));
    }
}
