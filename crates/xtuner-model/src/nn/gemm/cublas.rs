//! cuBLAS behind [`super::matmul`] on the CUDA backend, forward and backward.
//!
//! Burn owns the buffers: cubecl hands out the device pointer of a tensor's memory, and
//! cubecl-cuda runs on the device's primary context, so cuBLAS (loaded at run time
//! through cudarc) reads and writes them directly. The call is ordered against Burn's
//! own stream by synchronising it before and our stream after (cubecl does not expose
//! its stream); the product itself is `cublasGemmStridedBatchedEx` (a batch of one for a
//! weight product) with f32 accumulation.
//!
//! The backends are recognised by type: Burn's CUDA backend (`CubeBackend<CudaRuntime>`
//! in bf16, f16 or f32) and its autodiff wrapper, where the product is an autodiff op of
//! its own whose backward is two more cuBLAS products, `dX = dY·Wᵀ` and `dW = Xᵀ·dY`,
//! each computed only when that input needs a gradient. Anything else (another backend,
//! mixed dtypes, an empty matrix) keeps Burn's matmul, and so does the whole process when
//! cuBLAS cannot be loaded or fails once (logged), or with `XTUNER_GEMM=burn`.

use std::any::TypeId;
use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, FloatElement};
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as driver, sys as driver_sys};

use super::tracked::{Engine, tracked_gemm};
use super::{GemmPlan, Layout};
use crate::nn::cube::same;

/// Burn's CUDA backend with float element `F` (what `burn::backend::Cuda<F, i32>` is
/// without fusion).
type Cuda<F> = CubeBackend<CudaRuntime, F, i32, u8>;
type Primitive = CubeTensor<CudaRuntime>;

/// `x·w` through cuBLAS when `B` is Burn's CUDA backend (or its autodiff wrapper) and
/// the operands suit it; `Err(x)` hands `x` back for Burn's matmul otherwise.
pub(crate) fn matmul<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: &Tensor<B, 2>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let probe = x.clone();
    super::by_rows(x, w, |extents| applies(&probe, w, extents), product::<B, 2>)
}

/// `a·b` matrix by matrix (`[N, m, k]·[N, k, n]`), like [`matmul`].
pub(crate) fn batched_matmul<B: Backend>(
    a: Tensor<B, 3>,
    b: &Tensor<B, 3>,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let [batch, m, k] = a.dims();
    let [batch_b, k_b, n] = b.dims();
    if batch != batch_b
        || k != k_b
        || batch == 0
        || batch > i32::MAX as usize
        || !applies(&a, b, [m, k, n])
    {
        return Err(a);
    }
    product::<B, 3>(a.clone(), b.clone()).ok_or(a)
}

/// Whether cuBLAS can serve this product: a CUDA backend, one supported dtype, no empty
/// or oversized extent.
fn applies<B: Backend, const R: usize, const S: usize>(
    a: &Tensor<B, R>,
    b: &Tensor<B, S>,
    extents: [usize; 3],
) -> bool {
    enabled()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && extents.iter().all(|&d| d > 0 && d <= i32::MAX as usize)
        && (is_cuda::<B, half::bf16>() || is_cuda::<B, half::f16>() || is_cuda::<B, f32>())
}

fn is_cuda<B: Backend, F: FloatElement>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Cuda<F>>()
        || TypeId::of::<B>() == TypeId::of::<Autodiff<Cuda<F>>>()
}

/// The product of two rank-`R` operands (matrices, or batches of them) on cuBLAS.
fn product<B: Backend, const R: usize>(a: Tensor<B, R>, b: Tensor<B, R>) -> Option<Tensor<B, R>> {
    route::<B, half::bf16, R>(&a, &b)
        .or_else(|| route::<B, half::f16, R>(&a, &b))
        .or_else(|| route::<B, f32, R>(&a, &b))
}

/// The product when `B` is `Cuda<F>` or `Autodiff<Cuda<F>>`.
fn route<B: Backend, F: FloatElement, const R: usize>(
    a: &Tensor<B, R>,
    b: &Tensor<B, R>,
) -> Option<Tensor<B, R>> {
    if TypeId::of::<B>() == TypeId::of::<Cuda<F>>() {
        let a: Tensor<Cuda<F>, R> = same(a)?;
        let b: Tensor<Cuda<F>, R> = same(b)?;
        let c = gemm::<F>(a.into_primitive().tensor(), b.into_primitive().tensor());
        return same(&Tensor::<Cuda<F>, R>::from_primitive(
            TensorPrimitive::Float(c),
        ));
    }
    if TypeId::of::<B>() == TypeId::of::<Autodiff<Cuda<F>>>() {
        let a: Tensor<Autodiff<Cuda<F>>, R> = same(a)?;
        let b: Tensor<Autodiff<Cuda<F>>, R> = same(b)?;
        return same(&tracked_gemm::<Cublas<F>, R>(a, b));
    }
    None
}

/// cuBLAS for the shared autodiff op.
#[derive(Debug)]
struct Cublas<F>(std::marker::PhantomData<F>);

impl<F: FloatElement> Engine for Cublas<F> {
    type B = Cuda<F>;

    fn gemms(products: Vec<(Primitive, Primitive)>) -> Vec<Primitive> {
        gemms::<F>(products)
    }
}

/// `a·b` for `a: [m, k]`, `b: [k, n]` (row-major, or transposed views), or batches of
/// them (`[N, m, k]`, `[N, k, n]`): a new contiguous `[m, n]` (`[N, m, n]`).
fn gemm<F: FloatElement>(a: Primitive, b: Primitive) -> Primitive {
    gemms::<F>(vec![(a, b)])
        .into_iter()
        .next()
        .unwrap_or_else(|| unreachable!("one product in, one out"))
}

/// Independent products, in one synchronisation of Burn's stream (a backward's `dX` and
/// `dW`). Falls back to Burn's matmul, for good, when cuBLAS fails.
fn gemms<F: FloatElement>(products: Vec<(Primitive, Primitive)>) -> Vec<Primitive> {
    if !enabled() || products.iter().any(|(a, b)| a.dtype != b.dtype) {
        return products
            .into_iter()
            .map(|(a, b)| Cuda::<F>::float_matmul(a, b))
            .collect();
    }
    match cublas_gemms(&products) {
        Ok(c) => c,
        Err(e) => {
            if !DISABLED.swap(true, Ordering::Relaxed) {
                tracing::warn!("cuBLAS unavailable, using Burn's matmul from now on: {e}");
            }
            products
                .into_iter()
                .map(|(a, b)| Cuda::<F>::float_matmul(a, b))
                .collect()
        }
    }
}

/// One product, ready to run: the plan, its dtype, the output, and the device pointers
/// of `a`, `b` and the output with the handles that keep that memory where it is until
/// our stream is done.
struct Prepared {
    plan: GemmPlan,
    data_type: blas_sys::cudaDataType,
    output: Primitive,
    pointers: [u64; 3],
    _held: [Box<dyn Send>; 3],
}

fn cublas_gemms(products: &[(Primitive, Primitive)]) -> Result<Vec<Primitive>, String> {
    let Some(device) = products.first().map(|(a, _)| a.device.clone()) else {
        return Ok(Vec::new());
    };
    let prepared = products
        .iter()
        .map(|(a, b)| prepare(a, b))
        .collect::<Result<Vec<_>, _>>()?;
    // Everything queued on Burn's stream before these products (the operands, the
    // copies `prepare` made, the reuse of the outputs' memory) must be done.
    <CubeBackend<CudaRuntime, f32, i32, u8> as Backend>::sync(&device)
        .map_err(|e| format!("synchronising Burn's stream: {e:?}"))?;
    BLAS.with(|cell| {
        let mut slot = cell.borrow_mut();
        let blas = match slot.as_mut() {
            Some(blas) if blas.device == device.index => blas,
            _ => slot.insert(Blas::new(device.index)?),
        };
        let mut queued = Ok(());
        for p in &prepared {
            let [a, b, c] = p.pointers;
            // SAFETY: the pointers are live allocations of at least the planned extents
            // (the layouts and strides were read from the tensors' own shapes and
            // strides), held by `p._held` until the stream is synchronised below.
            queued = unsafe { blas.gemm(&p.plan, p.data_type, b, a, c) };
            if queued.is_err() {
                break;
            }
        }
        // Even after a failure: products already queued must finish before `prepared`
        // releases the memory they write.
        let synchronised = blas.synchronize();
        queued.and(synchronised)
    })?;
    PRODUCTS.fetch_add(prepared.len() as u64, Ordering::Relaxed);
    Ok(prepared.into_iter().map(|p| p.output).collect())
}

/// The plan, output and device memory of `a·b`.
fn prepare(a: &Primitive, b: &Primitive) -> Result<Prepared, String> {
    let (a, ma) = matrices(a.clone());
    let (b, mb) = matrices(b.clone());
    let ([m, k], [_, n]) = (ma.shape, mb.shape);
    let batch = ma.batch.max(mb.batch);
    let plan = GemmPlan::new([m, k, n], ma.layout, mb.layout).batched(batch, ma.stride, mb.stride);
    let data_type = match a.dtype {
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        other => return Err(format!("unsupported dtype {other:?}")),
    };
    let shape: burn::tensor::Shape = if a.meta.shape().num_dims() == 3 {
        [batch, m, n].into()
    } else {
        [m, n].into()
    };
    let output = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        a.client.clone(),
        a.device.clone(),
        shape,
        a.dtype,
    );
    let resource = |t: &Primitive| {
        t.client
            .get_resource(t.handle.clone())
            .map_err(|e| format!("device pointer: {e:?}"))
    };
    let (ra, rb, rc) = (resource(&a)?, resource(&b)?, resource(&output)?);
    let pointers = [ra.resource().ptr, rb.resource().ptr, rc.resource().ptr];
    Ok(Prepared {
        plan,
        data_type,
        output,
        pointers,
        _held: [Box::new(ra), Box::new(rb), Box::new(rc)],
    })
}

/// The matrices of an operand of rank 2 (one) or 3 (a batch).
struct Matrices {
    batch: usize,
    shape: [usize; 2],
    /// Elements between consecutive matrices (0 for one matrix, or a broadcast one).
    stride: usize,
    layout: Layout,
}

/// The operand (copied to contiguous when its matrices are neither row- nor
/// column-major) and how its matrices lie.
fn matrices(t: Primitive) -> (Primitive, Matrices) {
    let describe = |t: &Primitive| {
        let (shape, strides) = (t.meta.shape(), t.meta.strides());
        let r = shape.num_dims();
        let (batch, stride) = if r == 3 {
            (shape[0], if shape[0] > 1 { strides[0] } else { 0 })
        } else {
            (1, 0)
        };
        let dims = [shape[r - 2], shape[r - 1]];
        Layout::of(dims, [strides[r - 2], strides[r - 1]]).map(|layout| Matrices {
            batch,
            shape: dims,
            stride,
            layout,
        })
    };
    if let Some(m) = describe(&t) {
        return (t, m);
    }
    let t = burn_cubecl::kernel::into_contiguous(t);
    let shape = t.meta.shape();
    let r = shape.num_dims();
    let (rows, cols) = (shape[r - 2], shape[r - 1]);
    let (batch, stride) = if r == 3 {
        (shape[0], rows * cols)
    } else {
        (1, 0)
    };
    let m = Matrices {
        batch,
        shape: [rows, cols],
        stride,
        layout: Layout::Rows { ld: cols.max(1) },
    };
    (t, m)
}

static DISABLED: AtomicBool = AtomicBool::new(false);
static PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// How many products cuBLAS has run in this process.
pub(crate) fn products() -> u64 {
    PRODUCTS.load(Ordering::Relaxed)
}

fn enabled() -> bool {
    static OFF_BY_ENV: OnceLock<bool> = OnceLock::new();
    let off = *OFF_BY_ENV
        .get_or_init(|| std::env::var("XTUNER_GEMM").is_ok_and(|v| v.eq_ignore_ascii_case("burn")));
    !off && !DISABLED.load(Ordering::Relaxed)
}

thread_local! {
    /// cuBLAS handles are not to be shared between threads: one per thread, for the
    /// device it last served.
    static BLAS: RefCell<Option<Blas>> = const { RefCell::new(None) };
}

/// A cuBLAS handle bound to a stream of its own on a device's primary context. It lives
/// as long as its thread: releasing CUDA objects from thread-exit destructors, after the
/// driver may have shut down, is worse than leaving them to the process's end.
struct Blas {
    device: usize,
    context: driver_sys::CUcontext,
    stream: driver_sys::CUstream,
    handle: blas_sys::cublasHandle_t,
}

impl Blas {
    fn new(device: usize) -> Result<Self, String> {
        // SAFETY: library probing, and driver calls whose results are checked.
        unsafe {
            if !blas_sys::is_culib_present() {
                return Err(
                    "libcublas was not found (is /usr/local/cuda/lib64 on LD_LIBRARY_PATH?)".into(),
                );
            }
            driver::init().map_err(|e| format!("cuInit: {e:?}"))?;
            let ordinal = i32::try_from(device).map_err(|_| format!("device index {device}"))?;
            let dev =
                driver::device::get(ordinal).map_err(|e| format!("device {device}: {e:?}"))?;
            let context =
                driver::primary_ctx::retain(dev).map_err(|e| format!("primary context: {e:?}"))?;
            driver::ctx::set_current(context).map_err(|e| format!("primary context: {e:?}"))?;
            let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking)
                .map_err(|e| format!("stream: {e:?}"))?;
            let handle = blas::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
            blas::set_stream(handle, stream as blas_sys::cudaStream_t)
                .map_err(|e| format!("cublasSetStream: {e:?}"))?;
            Ok(Self {
                device,
                context,
                stream,
                handle,
            })
        }
    }

    /// Queues the planned product on our stream.
    ///
    /// # Safety
    /// `first`, `second` and `c` must be device pointers of allocations that hold the
    /// plan's extents in `data_type`.
    unsafe fn gemm(
        &mut self,
        plan: &GemmPlan,
        data_type: blas_sys::cudaDataType,
        first: u64,
        second: u64,
        c: u64,
    ) -> Result<(), String> {
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| format!("GEMM extent {v} exceeds cuBLAS's 32-bit sizes"))
        };
        let wide = |v: usize| i64::try_from(v).map_err(|_| format!("GEMM stride {v}"));
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: per this function's contract; alpha and beta are host f32, as
        // CUBLAS_COMPUTE_32F with the default pointer mode reads them.
        unsafe {
            driver::ctx::set_current(self.context)
                .map_err(|e| format!("primary context: {e:?}"))?;
            blas::gemm_strided_batched_ex(
                self.handle,
                op(plan.transpose_first),
                op(plan.transpose_second),
                int(plan.m)?,
                int(plan.n)?,
                int(plan.k)?,
                (&raw const alpha).cast::<c_void>(),
                first as *const c_void,
                data_type,
                int(plan.ld_first)?,
                wide(plan.stride_first)?,
                second as *const c_void,
                data_type,
                int(plan.ld_second)?,
                wide(plan.stride_second)?,
                (&raw const beta).cast::<c_void>(),
                c as *mut c_void,
                data_type,
                int(plan.ldc)?,
                wide(plan.stride_c)?,
                int(plan.batch)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(|e| format!("cublasGemmStridedBatchedEx: {e:?}"))
        }
    }

    /// Waits for everything queued on our stream.
    fn synchronize(&self) -> Result<(), String> {
        // SAFETY: the stream was created by `new` and is never destroyed.
        unsafe { driver::stream::synchronize(self.stream) }
            .map_err(|e| format!("cuBLAS stream: {e:?}"))
    }
}
