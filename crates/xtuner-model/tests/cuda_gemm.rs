//! The cuBLAS seam on a real GPU: `nn::gemm::matmul` against Burn's own CUDA matmul,
//! forward and backward, in f32 and bf16, with transposed weight views. Built only with
//! `--features cuda` and run on a GPU machine (tools/gpu_check.sh).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)] // helpers of tests: a missing gradient is a failure

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use xtuner_model::nn::gemm::{batched_matmul, cublas_products, matmul};

type C32 = burn::backend::Cuda<f32, i32>;
type Bf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;

fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b)
        .abs()
        .max()
        .into_scalar()
        .to_string()
        .parse::<f32>()
        .unwrap_or(f32::INFINITY)
}

fn max_abs<B: Backend, const D: usize>(a: Tensor<B, D>) -> f32 {
    a.abs()
        .max()
        .into_scalar()
        .to_string()
        .parse::<f32>()
        .unwrap_or(f32::INFINITY)
}

/// One test, so no other test's products run in between the counts.
#[test]
fn cublas_products_match_burns_matmul() {
    forward_matches_burns_matmul_in_f32_and_bf16();
    gradients_match_burns_matmul();
    batched_products_match_burns_matmul();
}

fn forward_matches_burns_matmul_in_f32_and_bf16() {
    let device = Default::default();
    let before = cublas_products();
    let x = Tensor::<C32, 3>::random([2, 37, 64], Distribution::Uniform(-1.0, 1.0), &device);
    let w = Tensor::<C32, 2>::random([64, 48], Distribution::Uniform(-1.0, 1.0), &device);
    let expected = x.clone().matmul(w.clone().unsqueeze::<3>());
    let diff = max_abs_diff(matmul(x.clone(), w.clone()), expected.clone());
    assert!(diff < 1e-4, "f32 row-major weight: {diff}");
    // A weight that is a transposed view (as a checkpoint's [out, in] becomes [in, out]).
    let wt = w.clone().transpose().into_data();
    let w_view = Tensor::<C32, 2>::from_data(wt, &device).transpose();
    let diff = max_abs_diff(matmul(x.clone(), w_view), expected);
    assert!(diff < 1e-4, "f32 transposed weight: {diff}");
    assert_eq!(
        cublas_products() - before,
        2,
        "the products did not run on cuBLAS"
    );

    let xb = Tensor::<Bf16, 3>::from_data(x.into_data().convert::<burn::tensor::bf16>(), &device);
    let wb = Tensor::<Bf16, 2>::from_data(w.into_data().convert::<burn::tensor::bf16>(), &device);
    let expected = xb
        .clone()
        .matmul(wb.clone().unsqueeze::<3>())
        .cast(burn::tensor::DType::F32);
    let got = matmul(xb, wb).cast(burn::tensor::DType::F32);
    let diff = max_abs_diff(got, expected.clone());
    assert!(diff <= 0.02 * max_abs(expected).max(1.0), "bf16: {diff}");
    assert_eq!(cublas_products() - before, 3);
}

fn gradients_match_burns_matmul() {
    type Ad = Autodiff<C32>;
    let device = Default::default();
    let x0 = Tensor::<Ad, 3>::random([3, 19, 32], Distribution::Uniform(-1.0, 1.0), &device);
    let w0 = Tensor::<Ad, 2>::random([32, 24], Distribution::Uniform(-1.0, 1.0), &device);
    let g = Tensor::<Ad, 3>::random([3, 19, 24], Distribution::Uniform(-1.0, 1.0), &device);
    for (x_grad, w_grad) in [(true, true), (true, false), (false, true)] {
        let leaf = |t: &Tensor<Ad, 3>, on: bool| {
            if on {
                t.clone().detach().require_grad()
            } else {
                t.clone().detach()
            }
        };
        let (x, xr) = (leaf(&x0, x_grad), leaf(&x0, x_grad));
        let w = if w_grad {
            w0.clone().detach().require_grad()
        } else {
            w0.clone().detach()
        };
        let wr = if w_grad {
            w0.clone().detach().require_grad()
        } else {
            w0.clone().detach()
        };
        let before = cublas_products();
        let grads = (matmul(x.clone(), w.clone()) * g.clone()).sum().backward();
        // Forward, plus one product per input that needs a gradient.
        assert_eq!(
            cublas_products() - before,
            1 + x_grad as u64 + w_grad as u64
        );
        let ref_grads = (xr.clone().matmul(wr.clone().unsqueeze::<3>()) * g.clone())
            .sum()
            .backward();
        if x_grad {
            let diff = max_abs_diff(x.grad(&grads).unwrap(), xr.grad(&ref_grads).unwrap());
            assert!(diff < 1e-4, "dX: {diff}");
        }
        if w_grad {
            let diff = max_abs_diff(w.grad(&grads).unwrap(), wr.grad(&ref_grads).unwrap());
            assert!(diff < 1e-3, "dW: {diff}");
        }
    }
}

/// The attention products: `q·kᵀ` with `kᵀ` a transposed view, then `p·v`, with
/// gradients for all three.
fn batched_products_match_burns_matmul() {
    type Ad = Autodiff<C32>;
    let device = Default::default();
    let leaf = |dims: [usize; 3]| {
        Tensor::<Ad, 3>::random(dims, Distribution::Uniform(-1.0, 1.0), &device).require_grad()
    };
    let (q, k, v) = (leaf([6, 40, 16]), leaf([6, 33, 16]), leaf([6, 33, 16]));
    let (qr, kr, vr) = (
        q.clone().detach().require_grad(),
        k.clone().detach().require_grad(),
        v.clone().detach().require_grad(),
    );
    let before = cublas_products();
    let out = batched_matmul(
        batched_matmul(q.clone(), k.clone().swap_dims(1, 2)),
        v.clone(),
    );
    let grads = out.clone().sum().backward();
    // Two forward products; backward: two for the second product, two for the first.
    assert_eq!(cublas_products() - before, 6);
    let reference = qr
        .clone()
        .matmul(kr.clone().swap_dims(1, 2))
        .matmul(vr.clone());
    let ref_grads = reference.clone().sum().backward();
    let diff = max_abs_diff(out, reference);
    assert!(diff < 1e-3, "forward: {diff}");
    for (name, got, want) in [
        ("dq", q.grad(&grads), qr.grad(&ref_grads)),
        ("dk", k.grad(&grads), kr.grad(&ref_grads)),
        ("dv", v.grad(&grads), vr.grad(&ref_grads)),
    ] {
        let diff = max_abs_diff(got.unwrap(), want.unwrap());
        assert!(diff < 1e-3, "{name}: {diff}");
    }
}
