//! The `gemm` crate behind [`super::matmul`] on the CPU backend (burn-ndarray in f32),
//! forward and backward.
//!
//! Burn's own CPU product copies every operand that is not in standard layout (the
//! transposed views of backward: `Wᵀ`, `Xᵀ`) and splits a batch of rows against one
//! weight into a product per matrix, whose weight gradients autodiff then sums. Here
//! each operand is read where it is, through its strides, and the products run on
//! `gemm`'s kernels (AVX-512, AVX2 or NEON, picked at run time) on rayon's threads:
//! one large product spread over the threads, a batch of small ones (attention's) one
//! per thread. `gemm` splits the output, never the inner dimension, so every element is
//! summed in the same order whatever the threads: runs stay exactly repeatable.
//!
//! Anything else (another backend or dtype, broadcast batches) keeps Burn's matmul, and
//! so does `XTUNER_GEMM=burn`.

use std::any::TypeId;
use std::sync::OnceLock;

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use gemm::Parallelism;
use ndarray::{ArcArray, ArrayView, IxDyn};
use rayon::prelude::*;

use super::tracked::{Engine, one, tracked_gemm};
use crate::nn::same;

/// Burn's CPU backend in f32.
type Cpu = NdArray<f32>;

/// Products below this many multiply-adds run on one thread.
const PARALLEL_WORK: usize = 1 << 21;

/// Whether the products here are on (`XTUNER_GEMM=burn` turns them off).
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("XTUNER_GEMM").map_or(true, |v| v != "burn"))
}

fn applies<B: Backend>(dtype: DType) -> bool {
    enabled()
        && dtype == DType::F32
        && (TypeId::of::<B>() == TypeId::of::<Cpu>()
            || TypeId::of::<B>() == TypeId::of::<Autodiff<Cpu>>())
}

/// `x·w` on the CPU backend; `Err(x)` hands `x` back for Burn's matmul otherwise.
pub(crate) fn matmul<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: &Tensor<B, 2>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let serves = x.dtype() == w.dtype() && applies::<B>(x.dtype());
    super::by_rows(x, w, |_| serves, product::<B, 2>)
}

/// `a·b` matrix by matrix (`[N, m, k]·[N, k, n]`), like [`matmul`].
pub(crate) fn batched_matmul<B: Backend>(
    a: Tensor<B, 3>,
    b: &Tensor<B, 3>,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let [batch, _, k] = a.dims();
    let [batch_b, k_b, _] = b.dims();
    if batch != batch_b || k != k_b || a.dtype() != b.dtype() || !applies::<B>(a.dtype()) {
        return Err(a);
    }
    product::<B, 3>(a.clone(), b.clone()).ok_or(a)
}

/// The product when `B` is the CPU backend or its autodiff wrapper.
fn product<B: Backend, const R: usize>(a: Tensor<B, R>, b: Tensor<B, R>) -> Option<Tensor<B, R>> {
    if TypeId::of::<B>() == TypeId::of::<Cpu>() {
        let a: Tensor<Cpu, R> = same(&a)?;
        let b: Tensor<Cpu, R> = same(&b)?;
        let c = one::<CpuGemm>(a.into_primitive().tensor(), b.into_primitive().tensor());
        return same(&Tensor::<Cpu, R>::from_primitive(TensorPrimitive::Float(c)));
    }
    if TypeId::of::<B>() == TypeId::of::<Autodiff<Cpu>>() {
        let a: Tensor<Autodiff<Cpu>, R> = same(&a)?;
        let b: Tensor<Autodiff<Cpu>, R> = same(&b)?;
        return same(&tracked_gemm::<CpuGemm, R>(a, b));
    }
    None
}

/// The `gemm` crate on burn-ndarray's f32 arrays.
#[derive(Debug)]
pub(crate) struct CpuGemm;

impl Engine for CpuGemm {
    type B = Cpu;

    fn gemms(products: Vec<(NdArrayTensor, NdArrayTensor)>) -> Vec<NdArrayTensor> {
        products.into_iter().map(|(a, b)| gemm_f32(a, b)).collect()
    }
}

/// `a·b` through `gemm` when both are f32 matrices or equal batches of them, through
/// Burn's matmul otherwise.
fn gemm_f32(a: NdArrayTensor, b: NdArrayTensor) -> NdArrayTensor {
    let strided = match (&a, &b) {
        (NdArrayTensor::F32(sa), NdArrayTensor::F32(sb)) => strided_product(sa.view(), sb.view()),
        _ => None,
    };
    match strided {
        Some(c) => NdArrayTensor::from(c),
        None => Cpu::float_matmul(a, b),
    }
}

/// The product of two views of rank 2 or 3 (equal batches), read through their
/// strides; `None` for other shapes.
fn strided_product(
    a: ArrayView<'_, f32, IxDyn>,
    b: ArrayView<'_, f32, IxDyn>,
) -> Option<ArcArray<f32, IxDyn>> {
    let rank = a.ndim();
    if rank != b.ndim() || !(2..=3).contains(&rank) {
        return None;
    }
    let (sa, sb) = (a.shape(), b.shape());
    let (m, k, n) = (sa[rank - 2], sa[rank - 1], sb[rank - 1]);
    let batch = if rank == 3 { sa[0] } else { 1 };
    if sb[rank - 2] != k || (rank == 3 && sb[0] != batch) {
        return None;
    }
    let (ta, tb) = (a.strides(), b.strides());
    // Row stride, column stride, matrix stride (elements).
    let a_strides = (
        ta[rank - 2],
        ta[rank - 1],
        if rank == 3 { ta[0] } else { 0 },
    );
    let b_strides = (
        tb[rank - 2],
        tb[rank - 1],
        if rank == 3 { tb[0] } else { 0 },
    );
    let mut out = vec![0.0f32; batch * m * n];
    if m * n > 0 && k > 0 {
        // Raw pointers are not Send; the threads each read their own matrices.
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        let run = |i: usize, dst: &mut [f32], parallelism: Parallelism| {
            let i = i as isize;
            // SAFETY: the views hold `batch` matrices of `m×k` and `k×n` at these
            // strides; `dst` is the `m×n` row-major output of matrix `i`.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    (pa as *const f32).offset(i * a_strides.2),
                    a_strides.1,
                    a_strides.0,
                    (pb as *const f32).offset(i * b_strides.2),
                    b_strides.1,
                    b_strides.0,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };
        let threads = rayon::current_num_threads();
        if batch > 1 {
            out.par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, dst)| run(i, dst, Parallelism::None));
        } else if m * n * k >= PARALLEL_WORK && threads > 1 {
            run(0, &mut out, Parallelism::Rayon(threads));
        } else {
            run(0, &mut out, Parallelism::None);
        }
    }
    let shape = if rank == 3 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    ArcArray::from_shape_vec(IxDyn(&shape), out).ok()
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;

    type A = Autodiff<Cpu>;

    /// Forward and both gradients against Burn's matmul, for plain and transposed
    /// operands, one matrix and a batch, on one and several threads' sizes.
    #[test]
    fn products_and_gradients_match_burns() {
        let device = Default::default();
        for (m, k, n) in [(3, 5, 4), (130, 70, 90), (1, 1, 1), (64, 300, 257)] {
            let x = Tensor::<A, 2>::random([m, k], Distribution::Default, &device).require_grad();
            let w = Tensor::<A, 2>::random([k, n], Distribution::Default, &device).require_grad();
            let ours = matmul(x.clone(), &w).unwrap_or_else(|_| panic!("routed"));
            let theirs = x.clone().matmul(w.clone());
            close(&ours, &theirs);
            let weights = Tensor::<A, 2>::random([m, n], Distribution::Default, &device);
            let g1 = (ours * weights.clone()).sum().backward();
            let g2 = (theirs * weights).sum().backward();
            close(&x.grad(&g1).unwrap(), &x.grad(&g2).unwrap());
            close(&w.grad(&g1).unwrap(), &w.grad(&g2).unwrap());
        }
        // A batch of products with a transposed right operand (attention's q·kᵀ).
        let q = Tensor::<A, 3>::random([6, 17, 8], Distribution::Default, &device).require_grad();
        let kt = Tensor::<A, 3>::random([6, 19, 8], Distribution::Default, &device).require_grad();
        let ours = batched_matmul(q.clone(), &kt.clone().swap_dims(1, 2))
            .unwrap_or_else(|_| panic!("routed"));
        let theirs = q.clone().matmul(kt.clone().swap_dims(1, 2));
        close(&ours, &theirs);
        let g1 = ours.powf_scalar(2.0).sum().backward();
        let g2 = theirs.powf_scalar(2.0).sum().backward();
        close(&q.grad(&g1).unwrap(), &q.grad(&g2).unwrap());
        close(&kt.grad(&g1).unwrap(), &kt.grad(&g2).unwrap());
        // Rows of a 3-D input against one weight.
        let x = Tensor::<Cpu, 3>::random([2, 5, 7], Distribution::Default, &device);
        let w = Tensor::<Cpu, 2>::random([7, 3], Distribution::Default, &device);
        let ours = matmul(x.clone(), &w).unwrap_or_else(|_| panic!("routed"));
        close(&ours, &x.matmul(w.unsqueeze()));
    }

    /// The same bits on one thread and on several.
    #[test]
    fn threads_do_not_change_the_result() {
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::random([300, 200], Distribution::Default, &device);
        let w = Tensor::<Cpu, 2>::random([200, 150], Distribution::Default, &device);
        let many = matmul(x.clone(), &w).unwrap_or_else(|_| panic!("routed"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let single = pool.install(|| matmul(x, &w).unwrap_or_else(|_| panic!("routed")));
        assert_eq!(
            many.into_data().to_vec::<f32>().unwrap(),
            single.into_data().to_vec::<f32>().unwrap()
        );
    }

    fn close<B: Backend, const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) {
        let (a, b) = (
            a.clone().into_data().to_vec::<f32>().unwrap(),
            b.clone().into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
