//! Our CubeCL kernels on a GPU backend against their reference paths: flash attention
//! (`nn::flash`), forward and backward, and NF4 dequantization (`Nf4Tensor::dequantize`);
//! `--features wgpu` (any Vulkan driver; lavapipe runs it on a CPU) or `--features cuda`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use xtuner_model::nn::attention::{AttentionMask, scaled_dot_product};
use xtuner_model::nn::flash::attention as flash_attention;
use xtuner_model::nn::flash::reference::{self as flash, FlashShape};
use xtuner_model::nn::nf4::{Nf4Tensor, Nf4Weight};

fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn host<B: AutodiffBackend>(t: Tensor<B::InnerBackend, 4>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
}

/// The first element of `got` off `want` by more than `tolerance` relative to the
/// largest reference value, as a message.
fn mismatch(got: &[f32], want: &[f32], tolerance: f32, what: &str) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let bad = got
        .iter()
        .zip(want)
        .position(|(g, w)| (g - w).abs() > tolerance * scale)?;
    let count = got
        .iter()
        .zip(want)
        .filter(|(g, w)| (*g - *w).abs() > tolerance * scale)
        .count();
    Some(format!(
        "{what}[{bad}]: {} vs {} ({count} of {} off; max |ref| {scale})",
        got[bad],
        want[bad],
        got.len()
    ))
}

/// The kernels' output and gradients equal the reference's within `tolerance` (relative
/// to the largest reference value), computing in `dtype`.
fn check<B: AutodiffBackend>(
    device: &B::Device,
    dtype: DType,
    shape: FlashShape,
    segments: Option<Vec<i64>>,
    tolerance: f32,
) {
    let FlashShape {
        batch,
        heads,
        kv_heads,
        seq,
        head_dim,
        ..
    } = shape;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seq as u64 * 31 + head_dim as u64);
    let q_dims = [batch, heads, seq, head_dim];
    let kv_dims = [batch, kv_heads, seq, head_dim];
    let (q, k, v, dout) = (
        random(&mut rng, q_dims.iter().product()),
        random(&mut rng, kv_dims.iter().product()),
        random(&mut rng, kv_dims.iter().product()),
        random(&mut rng, q_dims.iter().product()),
    );
    // The reference sees the inputs as the kernels do: rounded to `dtype`.
    let round = |x: &[f32], dims: [usize; 4]| {
        host::<B>(
            Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(x.to_vec(), dims), device)
                .cast(dtype),
        )
    };
    let (rq, rk, rv, rd) = (
        round(&q, q_dims),
        round(&k, kv_dims),
        round(&v, kv_dims),
        round(&dout, q_dims),
    );
    let (want_out, want_lse) = flash::forward(&shape, &rq, &rk, &rv, segments.as_deref());
    let want = flash::backward(
        &shape,
        &rq,
        &rk,
        &rv,
        &want_out,
        &want_lse,
        &rd,
        segments.as_deref(),
    );

    let tensor = |x: Vec<f32>, dims: [usize; 4]| {
        Tensor::<B, 4>::from_data(TensorData::new(x, dims), device)
            .cast(dtype)
            .require_grad()
    };
    let (tq, tk, tv) = (tensor(q, q_dims), tensor(k, kv_dims), tensor(v, kv_dims));
    let segments_given = segments.is_some();
    let seg = segments.unwrap_or_else(|| vec![0; batch * seq]);
    let seg = Tensor::<B, 2, Int>::from_data(TensorData::new(seg, [batch, seq]), device);
    let out = flash_attention(&tq, &tk, &tv, &seg).expect("this backend runs the flash kernels");
    assert_eq!(out.dtype(), dtype);
    let upstream = Tensor::<B, 4>::from_data(TensorData::new(dout, q_dims), device).cast(dtype);
    let grads = (out.clone() * upstream).sum().backward();
    let grad = |t: &Tensor<B, 4>| host::<B>(t.grad(&grads).expect("a gradient"));
    let failures: Vec<String> = [
        mismatch(&host::<B>(out.inner()), &want_out, tolerance, "out"),
        mismatch(&grad(&tq), &want.dq, tolerance, "dq"),
        mismatch(&grad(&tk), &want.dk, tolerance, "dk"),
        mismatch(&grad(&tv), &want.dv, tolerance, "dv"),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        failures.is_empty(),
        "{shape:?}, segments {}: {failures:#?}",
        segments_given
    );
}

fn shapes() -> Vec<(FlashShape, Option<Vec<i64>>)> {
    let shape = |batch, heads, kv_heads, seq, head_dim| FlashShape {
        batch,
        heads,
        kv_heads,
        seq,
        head_dim,
        block: 16,
    };
    // Row 0: samples of 10, 1, 20 and 9 tokens (a tile boundary inside each of the
    // first and third); row 1: one sample of 40.
    let mut packed: Vec<i64> = [(0, 10), (1, 1), (2, 20), (3, 9)]
        .iter()
        .flat_map(|&(s, n)| vec![s; n])
        .collect();
    packed.extend(vec![0; 40]);
    vec![
        (shape(2, 4, 2, 37, 8), None), // grouped heads, a partial last tile
        (shape(2, 2, 1, 40, 4), Some(packed)), // packed samples
        (shape(1, 2, 2, 5, 16), None), // shorter than one tile
        (shape(1, 4, 1, 300, 128), None), // InternLM2's head size, many tiles
    ]
}

/// A training batch's mask (packed samples, padding at a row's end) gives the same
/// attention through the kernels as through the materialised scores.
fn training_mask_matches_dense<B: AutodiffBackend>(device: &B::Device) {
    let (batch, heads, kv_heads, seq, head_dim) = (2, 4, 2, 24, 16);
    let valid: Vec<bool> = (0..batch * seq).map(|i| i < 2 * seq - 5).collect();
    let segments: Vec<i64> = (0..batch * seq)
        .map(|i| if i % seq < 9 { 0 } else { 1 })
        .collect();
    let mask = AttentionMask::<B>::new(batch, seq, &valid, Some(&segments), device);
    let Some(ids) = mask.segments() else {
        panic!("a training batch's mask is causal")
    };
    let distribution = burn::tensor::Distribution::Normal(0.0, 1.0);
    let q = Tensor::<B, 4>::random([batch, heads, seq, head_dim], distribution, device);
    let k = Tensor::<B, 4>::random([batch, kv_heads, seq, head_dim], distribution, device);
    let v = Tensor::<B, 4>::random([batch, kv_heads, seq, head_dim], distribution, device);
    let flash = flash_attention(&q, &k, &v, ids).expect("this backend runs the flash kernels");
    let dense = scaled_dot_product(q, k, v, &mask.bias(seq));
    // Rows' real tokens only: padding queries see different keys on the two paths.
    let real = |t: Tensor<B, 4>| {
        t.slice([0..1, 0..heads, 0..seq, 0..head_dim])
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    let failure = mismatch(&real(flash), &real(dense), 1e-4, "out");
    assert!(failure.is_none(), "{failure:?}");
}

/// The dequantization kernel gives the host's `NF4_LEVELS[code] · absmax` rounded once to
/// `dtype`, exactly, on `B` and on its autodiff wrapper.
fn nf4_kernel_matches_the_host<B: AutodiffBackend>(device: &B::Device, dtype: DType) {
    let cases = [
        ([96, 128], 64, false),
        ([96, 128], 64, true),
        ([3, 5], 4, false), // a partial last block, an odd count: a half-filled byte
        ([257, 33], 64, true), // a partial last word and block
        // More cubes of 256 than one grid dimension holds (65,535 on WebGPU).
        ([4100, 4096], 64, true),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (shape, block, double_quant) in cases {
        let [rows, cols] = shape;
        let nf4 = Nf4Tensor::quantize(&random(&mut rng, rows * cols), shape, block, double_quant)
            .unwrap();
        let host = nf4.dequantize();
        let transposed: Vec<f32> = (0..rows * cols)
            .map(|i| host[(i % rows) * cols + i / rows])
            .collect();
        let want = Tensor::<B::InnerBackend, 1>::from_data(
            TensorData::new(transposed, [rows * cols]),
            device,
        )
        .cast(dtype)
        .cast(DType::F32)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        let flat = |t: Tensor<B::InnerBackend, 2>| {
            assert_eq!(t.dims(), [cols, rows]);
            assert_eq!(t.dtype(), dtype);
            t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
        };
        let plain = Nf4Weight::<B::InnerBackend>::from_tensor(&nf4, device)
            .dequantize_kernel(dtype)
            .expect("this backend runs the NF4 kernel");
        let tracked = Nf4Weight::<B>::from_tensor(&nf4, device)
            .dequantize_kernel(dtype)
            .expect("this backend runs the NF4 kernel under autodiff");
        for (got, path) in [(flat(plain), "plain"), (flat(tracked.inner()), "autodiff")] {
            let bad = got.iter().zip(&want).position(|(g, w)| g != w);
            assert!(
                bad.is_none(),
                "{shape:?} block {block} double_quant {double_quant} ({path}): [{}] {} vs {}",
                bad.unwrap_or(0),
                got[bad.unwrap_or(0)],
                want[bad.unwrap_or(0)]
            );
        }
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_kernels_match_the_reference() {
    type B = burn::backend::Autodiff<burn::backend::Wgpu>;
    let device = burn::backend::wgpu::WgpuDevice::default();
    for (shape, segments) in shapes() {
        check::<B>(&device, DType::F32, shape, segments, 1e-4);
    }
    training_mask_matches_dense::<B>(&device);
    nf4_kernel_matches_the_host::<B>(&device, DType::F32);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_the_reference() {
    type F32 = burn::backend::Autodiff<burn::backend::Cuda<f32, i32>>;
    type Bf16 = burn::backend::Autodiff<burn::backend::Cuda<burn::tensor::bf16, i32>>;
    let device = burn::backend::cuda::CudaDevice::default();
    for (shape, segments) in shapes() {
        check::<F32>(&device, DType::F32, shape, segments.clone(), 1e-4);
        // bf16 inputs and outputs, f32 inside: the outputs' rounding is the error.
        check::<Bf16>(&device, DType::BF16, shape, segments, 2e-2);
    }
    // A head size whose bf16 rows are not a power of two in bytes (CUDA's allocator
    // pads such rows unless asked for packed ones).
    let odd = FlashShape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq: 50,
        head_dim: 96,
        block: 16,
    };
    check::<Bf16>(&device, DType::BF16, odd, None, 2e-2);
    training_mask_matches_dense::<F32>(&device);
    nf4_kernel_matches_the_host::<F32>(&device, DType::F32);
    nf4_kernel_matches_the_host::<Bf16>(&device, DType::BF16);
}
