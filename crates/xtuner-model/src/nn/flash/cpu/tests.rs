use burn::tensor::{Distribution, TensorData, Tolerance};

use super::*;
use crate::nn::attention::{attention_bias, scaled_dot_product};
use crate::nn::rope::apply_rotary;

type A = Autodiff<Cpu>;

/// (batch, heads, KV heads, tokens, head dim, segments)
type Case = (usize, usize, usize, usize, usize, Option<Vec<i64>>);

/// Grouped heads, a row shorter than a block, rows spanning several blocks, and
/// packed rows (segments) whose samples start inside and across blocks.
fn cases() -> [Case; 4] {
    let packed: Vec<i64> = [(0, 10), (1, 1), (2, 70), (3, 59)]
        .iter()
        .flat_map(|&(s, n)| vec![s; n])
        .chain(vec![0; 140])
        .collect();
    [
        (2, 4, 2, 37, 8, None),
        (1, 2, 2, 5, 4, None),
        (2, 6, 3, 150, 16, None),
        (2, 2, 1, 140, 8, Some(packed)),
    ]
}

fn normal<const D: usize>(dims: [usize; D]) -> Tensor<A, D> {
    Tensor::random(dims, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn close<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) {
    let (a, b) = (a.into_data(), b.into_data());
    assert_eq!(a.shape, b.shape);
    a.assert_approx_eq::<f32>(&b, Tolerance::absolute(2e-5));
}

fn segment_ids(batch: usize, seq: usize, segments: &Option<Vec<i64>>) -> Tensor<A, 2, Int> {
    let ids = segments.clone().unwrap_or_else(|| vec![0; batch * seq]);
    Tensor::from_data(TensorData::new(ids, [batch, seq]), &Default::default())
}

fn bias(batch: usize, seq: usize, segments: &Option<Vec<i64>>) -> Tensor<A, 4> {
    let valid = vec![true; batch * seq];
    attention_bias::<A>(
        batch,
        seq,
        0,
        &valid,
        segments.as_deref(),
        &Default::default(),
    )
}

/// Forward and the three gradients equal the dense attention's.
#[test]
fn matches_dense_attention_and_its_gradients() {
    for (batch, heads, kv, seq, d, segments) in cases() {
        // Queries as a `[B, T, H, D]` view, as the layer hands them over.
        let q = normal([batch, seq, heads, d])
            .swap_dims(1, 2)
            .require_grad();
        let k = normal([batch, kv, seq, d]).require_grad();
        let v = normal([batch, kv, seq, d]).require_grad();
        let dout = normal([batch, heads, seq, d]);
        let seg = segment_ids(batch, seq, &segments);
        let ours = attention(&q, &k, &v, &seg).expect("served on the CPU");
        let dense = scaled_dot_product(
            q.clone(),
            k.clone(),
            v.clone(),
            &bias(batch, seq, &segments),
        );
        close(ours.clone(), dense.clone());
        let g1 = (ours * dout.clone()).sum().backward();
        let g2 = (dense * dout).sum().backward();
        for t in [&q, &k, &v] {
            close(t.grad(&g1).unwrap(), t.grad(&g2).unwrap());
        }
    }
}

/// The packed entry equals the layer's unfused path (slices, reshapes, the rotary
/// embedding, dense attention), forward and the gradient of the projection output.
#[test]
fn packed_matches_slices_rotary_and_dense_attention() {
    for (batch, heads, kv, seq, d, segments) in cases() {
        let qkv_data = normal([batch, seq, (heads + 2 * kv) * d]).into_data();
        // Rotary tables: cosines and sines of random angles.
        let angles = normal([batch, seq, d]) * 3.0;
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let dout = normal([batch, seq, heads * d]);
        let seg = segment_ids(batch, seq, &segments);
        let leaf =
            || Tensor::<A, 3>::from_data(qkv_data.clone(), &Default::default()).require_grad();
        let qkv = leaf();
        let ours = packed_attention(&qkv, (&cos, &sin), &seg, [heads, kv, d]).expect("served");
        let g1 = (ours.clone() * dout.clone()).sum().backward();
        let unfused_qkv = leaf();
        let split = |from: usize, n: usize| {
            unfused_qkv
                .clone()
                .slice([0..batch, 0..seq, from * d..(from + n) * d])
                .reshape([batch, seq, n, d])
                .swap_dims(1, 2)
        };
        let q = apply_rotary(split(0, heads), &cos, &sin);
        let k = apply_rotary(split(heads, kv), &cos, &sin);
        let v = split(heads + kv, kv);
        let dense = scaled_dot_product(q, k, v, &bias(batch, seq, &segments))
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * d]);
        let g2 = (dense.clone() * dout).sum().backward();
        close(ours, dense);
        close(qkv.grad(&g1).unwrap(), unfused_qkv.grad(&g2).unwrap());
    }
}

/// The same bits on one thread and on several.
#[test]
fn threads_do_not_change_the_result() {
    let q = normal([2, 4, 100, 8]).require_grad();
    let k = normal([2, 2, 100, 8]).require_grad();
    let v = normal([2, 2, 100, 8]).require_grad();
    let seg = Tensor::<A, 2, Int>::zeros([2, 100], &Default::default());
    let run = || {
        let out = attention(&q, &k, &v, &seg).unwrap();
        let grads = out.clone().powf_scalar(2.0).sum().backward();
        let mut bits: Vec<u32> = out.into_data().iter::<f32>().map(f32::to_bits).collect();
        for t in [&q, &k, &v] {
            let grad = t.grad(&grads).unwrap().into_data();
            bits.extend(grad.iter::<f32>().map(f32::to_bits));
        }
        bits
    };
    let many = run();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(many, pool.install(run));
}
