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

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use gemm::Parallelism;
use ndarray::{ArcArray, ArrayView, IxDyn};
use rayon::prelude::*;

use super::tracked::{Engine, one, tracked_gemm, transposed};
use crate::nn::host::{Cpu, add_grad};
use crate::nn::reshape::reshape;
use crate::nn::{moved, same};

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

/// `c + scale·(x·w)` on the CPU backend, as one product accumulating into `c`'s
/// buffer (a LoRA adapter's update added to the base product, with no pass of its
/// own); `Err` hands `c` and `x` back for Burn's ops otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn matmul_add<B: Backend, const D: usize>(
    c: Tensor<B, D>,
    x: Tensor<B, D>,
    w: &Tensor<B, 2>,
    scale: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    let (xd, cd) = (x.dims(), c.dims());
    let [k, n] = w.dims();
    let m: usize = xd[..D - 1].iter().product();
    let fits = xd[D - 1] == k && cd[D - 1] == n && xd[..D - 1] == cd[..D - 1];
    let dtypes = [c.dtype(), x.dtype(), w.dtype()] == [DType::F32; 3];
    if !fits || !dtypes || !applies::<B>(DType::F32) {
        return Err((c, x));
    }
    // `c` is moved, never cloned, down to the product: a second handle on its buffer
    // would make the product copy it before writing.
    let (c2, x2) = (reshape(c, [m, n]), reshape(x, [m, k]));
    let y: Result<Tensor<B, 2>, ()> = match moved::<_, Tensor<Cpu, 2>>(c2) {
        Ok(c2) => {
            let (x2, w) = (same::<_, Tensor<Cpu, 2>>(&x2), same::<_, Tensor<Cpu, 2>>(w));
            let (Some(x2), Some(w)) = (x2, w) else {
                unreachable!("the backend checked above")
            };
            let [c2, x2, w] = [c2, x2, w].map(|t| t.into_primitive().tensor());
            let y = accumulate(c2, &x2, &w, scale as f32);
            let y = y.unwrap_or_else(|| unreachable!("f32 matrices of checked shapes"));
            moved(Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(y))).map_err(drop)
        }
        Err(c2) => {
            let c2 = moved::<_, Tensor<Autodiff<Cpu>, 2>>(c2);
            let (x2, w) = (
                same::<_, Tensor<Autodiff<Cpu>, 2>>(&x2),
                same::<_, Tensor<Autodiff<Cpu>, 2>>(w),
            );
            let (Ok(c2), Some(x2), Some(w)) = (c2, x2, w) else {
                unreachable!("the backend checked above")
            };
            let y = tracked_add(c2, x2, w, scale as f32);
            moved(y.unwrap_or_else(|| unreachable!("f32 matrices of checked shapes"))).map_err(drop)
        }
    };
    match y {
        Ok(y) => Ok(reshape(y, cd)),
        Err(_) => unreachable!("B is the CPU backend or its autodiff wrapper"),
    }
}

/// `c + scale·(x·w)` into `c`'s buffer; `None` for operands `gemm` does not take.
fn accumulate(
    c: NdArrayTensor,
    x: &NdArrayTensor,
    w: &NdArrayTensor,
    scale: f32,
) -> Option<NdArrayTensor> {
    let (NdArrayTensor::F32(c), NdArrayTensor::F32(x), NdArrayTensor::F32(w)) = (c, x, w) else {
        return None;
    };
    let c = c.into_shared();
    let c = if c.is_standard_layout() {
        c
    } else {
        c.as_standard_layout().into_owned().into_shared()
    };
    product_into(x.view(), w.view(), Some(c), scale).map(NdArrayTensor::from)
}

/// [`matmul_add`] recorded for autodiff: `dc = dy`, `dx = scale·dy·wᵀ`,
/// `dw = scale·xᵀ·dy`.
fn tracked_add(
    c: Tensor<Autodiff<Cpu>, 2>,
    x: Tensor<Autodiff<Cpu>, 2>,
    w: Tensor<Autodiff<Cpu>, 2>,
    scale: f32,
) -> Option<Tensor<Autodiff<Cpu>, 2>> {
    let [c, x, w] = [c, x, w].map(|t| t.into_primitive().tensor());
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    let y = accumulate(c.primitive, &x.primitive, &w.primitive, scale)?;
    let y = match AddProductBackward
        .prepare::<NoCheckpointing>([c.node, x.node, w.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                w_tracked.then_some(x.primitive),
                x_tracked.then_some(w.primitive),
                scale,
            );
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(y)))
}

#[derive(Debug)]
struct AddProductBackward;

impl Backward<Cpu, 3> for AddProductBackward {
    /// `x` (kept when `w` needs a gradient), `w` (kept when `x` does), the scale.
    type State = (Option<NdArrayTensor>, Option<NdArrayTensor>, f32);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, w, scale) = ops.state;
        let [c_node, x_node, w_node] = ops.parents;
        let dy = grads.consume::<Cpu>(&ops.node);
        let scaled = |a: NdArrayTensor, b: NdArrayTensor| {
            match (&a, &b) {
                (NdArrayTensor::F32(sa), NdArrayTensor::F32(sb)) => {
                    product_into(sa.view(), sb.view(), None, scale).map(NdArrayTensor::from)
                }
                _ => None,
            }
            .unwrap_or_else(|| {
                let product = Cpu::float_matmul(a, b);
                Cpu::float_mul_scalar(product, scale.into())
            })
        };
        if let (Some(node), Some(w)) = (x_node, w) {
            add_grad!(grads, &node, scaled(dy.clone(), transposed::<Cpu>(w)));
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            add_grad!(grads, &node, scaled(transposed::<Cpu>(x), dy.clone()));
        }
        if let Some(node) = c_node {
            add_grad!(grads, &node, dy);
        }
    }
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
    product_into(a, b, None, 1.0)
}

/// `into + scale·(a·b)` (`scale·(a·b)` without `into`), read through the operands'
/// strides; `into` must be a standard-layout array of the product's shape (its buffer
/// is written in place when no one else holds it). `None` for other shapes.
fn product_into(
    a: ArrayView<'_, f32, IxDyn>,
    b: ArrayView<'_, f32, IxDyn>,
    into: Option<ArcArray<f32, IxDyn>>,
    scale: f32,
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
    let shape = if rank == 3 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    let accumulate = into.is_some();
    let len = batch * m * n;
    // A fresh output is left uninitialised when the products write all of it (gemm
    // does not read the destination then): zeroing it first was a pass of its own.
    let (mut into, mut fresh) = match into {
        Some(c) if c.shape() == shape.as_slice() && c.is_standard_layout() => (Some(c), None),
        Some(_) => return None,
        None if k == 0 || len == 0 => (Some(ArcArray::zeros(IxDyn(&shape))), None),
        None => (None, Some(Vec::<f32>::with_capacity(len))),
    };
    let dst = match (&mut into, &mut fresh) {
        (Some(c), _) => c
            .as_slice_mut()
            .unwrap_or_else(|| unreachable!("standard layout"))
            .as_mut_ptr(),
        (None, Some(v)) => v.as_mut_ptr(),
        (None, None) => unreachable!("one of the two"),
    };
    if len > 0 && k > 0 {
        // Raw pointers are not Send; the threads each read their own matrices and
        // write their own outputs.
        let (pd, pa, pb) = (dst as usize, a.as_ptr() as usize, b.as_ptr() as usize);
        let run = |i: usize, parallelism: Parallelism| {
            let i = i as isize;
            // SAFETY: the views hold `batch` matrices of `m×k` and `k×n` at these
            // strides; the output has room for `batch` row-major `m×n` matrices, and
            // matrix `i` is written by this call alone.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    (pd as *mut f32).offset(i * (m * n) as isize),
                    1,
                    n as isize,
                    accumulate,
                    (pa as *const f32).offset(i * a_strides.2),
                    a_strides.1,
                    a_strides.0,
                    (pb as *const f32).offset(i * b_strides.2),
                    b_strides.1,
                    b_strides.0,
                    1.0,
                    scale,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };
        let threads = rayon::current_num_threads();
        if batch > 1 {
            (0..batch)
                .into_par_iter()
                .for_each(|i| run(i, Parallelism::None));
        } else if m * n * k >= PARALLEL_WORK && threads > 1 {
            run(0, Parallelism::Rayon(threads));
        } else {
            run(0, Parallelism::None);
        }
    }
    match (into, fresh) {
        (Some(c), _) => Some(c),
        (None, Some(mut v)) => {
            // SAFETY: the products above wrote every element (k > 0, all matrices).
            unsafe { v.set_len(len) };
            ArcArray::from_shape_vec(IxDyn(&shape), v).ok()
        }
        (None, None) => None,
    }
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

    /// `c + scale·(x·w)` and its three gradients equal Burn's ops, for rows of a 3-D
    /// input, with and without autodiff.
    #[test]
    fn matmul_add_matches_burns_ops() {
        let device = Default::default();
        let data = |dims: [usize; 3]| {
            Tensor::<A, 3>::random(dims, Distribution::Default, &device).into_data()
        };
        let (c, x) = (data([2, 9, 11]), data([2, 9, 5]));
        let w = Tensor::<A, 2>::random([5, 11], Distribution::Default, &device).into_data();
        let weights = Tensor::<A, 3>::random([2, 9, 11], Distribution::Default, &device);
        let run = |ours: bool| {
            let c = Tensor::<A, 3>::from_data(c.clone(), &device).require_grad();
            let x = Tensor::<A, 3>::from_data(x.clone(), &device).require_grad();
            let w = Tensor::<A, 2>::from_data(w.clone(), &device).require_grad();
            let y = if ours {
                matmul_add(c.clone(), x.clone(), &w, 0.75).unwrap_or_else(|_| panic!("routed"))
            } else {
                c.clone() + x.clone().matmul(w.clone().unsqueeze()) * 0.75
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let grad = |t: Tensor<Cpu, 3>| t.into_data();
            (
                y.into_data(),
                grad(c.grad(&grads).unwrap()),
                grad(x.grad(&grads).unwrap()),
                w.grad(&grads).unwrap().into_data(),
            )
        };
        let (ours, theirs) = (run(true), run(false));
        let tolerance = burn::tensor::Tolerance::<f32>::absolute(1e-5);
        ours.0.assert_approx_eq::<f32>(&theirs.0, tolerance);
        ours.1.assert_approx_eq::<f32>(&theirs.1, tolerance);
        ours.2.assert_approx_eq::<f32>(&theirs.2, tolerance);
        ours.3.assert_approx_eq::<f32>(&theirs.3, tolerance);
        let plain = |d: burn::tensor::TensorData| Tensor::<Cpu, 3>::from_data(d, &device);
        let w = Tensor::<Cpu, 2>::from_data(w.clone(), &device);
        let y = matmul_add(plain(c.clone()), plain(x.clone()), &w, 0.75)
            .unwrap_or_else(|_| panic!("routed"));
        y.into_data().assert_approx_eq::<f32>(&theirs.0, tolerance);
    }

    /// An input that feeds two products (a LoRA adapter's and the base weight's) and a
    /// third op: each product's reshape adds its gradient into the one the input has
    /// already (`host::sum`), as Burn's sum of the three.
    #[test]
    fn an_input_of_two_products_sums_its_gradients() {
        let device = Default::default();
        let x = Tensor::<A, 2>::random([40, 24], Distribution::Default, &device).require_grad();
        let w1 = Tensor::<A, 2>::random([24, 16], Distribution::Default, &device);
        let w2 = Tensor::<A, 2>::random([24, 8], Distribution::Default, &device);
        // A fresh graph per side; `h` also feeds the loss directly.
        type Product<'a> = &'a dyn Fn(Tensor<A, 2>, &Tensor<A, 2>) -> Tensor<A, 2>;
        let run = |product: Product| {
            let h = x.clone() * 2.0;
            let (a, b) = (product(h.clone(), &w1), product(h.clone(), &w2));
            (a.sum() + (b * 3.0).sum() + h.sum()).backward()
        };
        let ours = run(&|h, w| matmul(h, w).unwrap_or_else(|_| panic!("routed")));
        let theirs = run(&|h, w| h.matmul(w.clone()));
        close(&x.grad(&ours).unwrap(), &x.grad(&theirs).unwrap());
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
