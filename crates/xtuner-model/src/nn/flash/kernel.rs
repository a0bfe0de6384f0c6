//! The flash attention kernels (CubeCL): forward, `dQ`, and `dK`/`dV`. Grid: (tiles
//! along T, heads, batch); cube: `block` units along x. A masked score is -1e30
//! (finite: WGSL has no infinity literal).

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
