//! Our CubeCL kernels' way onto Burn's backends. Model code is generic over `B`; an op
//! with a kernel asks [`dispatch`] whether `B` is one of the CubeCL backends this build
//! serves (CUDA in bf16, f16 or f32 with the `cuda` feature; WebGPU in f32 with `wgpu`),
//! or Burn's autodiff wrapper of one, and runs there. Anything else gets `None` and takes
//! the op's portable path.

pub(crate) use super::same;
use std::any::TypeId;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

/// Burn's CubeCL backend on runtime `R` with float, int and bool elements `F`, `I`, `BT`
/// (`burn::backend::Cuda<F, I>` is this without fusion).
pub(crate) type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// An operation on `B`'s tensors that has a CubeCL implementation.
pub(crate) trait CubeOp<B: Backend> {
    type Output;

    /// The op when `B` is `Cube<R, F, I, BT>`; `None` when it cannot serve these operands.
    fn plain<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        &self,
    ) -> Option<Self::Output>;

    /// The op when `B` is `Autodiff<Cube<R, F, I, BT>>`.
    fn autodiff<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        &self,
    ) -> Option<Self::Output>;
}

/// `op` on the backend `B` is, when this build serves it; `None` otherwise.
pub(crate) fn dispatch<B: Backend, Op: CubeOp<B>>(op: &Op) -> Option<Op::Output> {
    #[cfg(feature = "cuda")]
    {
        use cubecl::cuda::CudaRuntime;
        let served = on::<B, Op, CudaRuntime, half::bf16, i32, u8>(op)
            .or_else(|| on::<B, Op, CudaRuntime, half::f16, i32, u8>(op))
            .or_else(|| on::<B, Op, CudaRuntime, f32, i32, u8>(op));
        if served.is_some() {
            return served;
        }
    }
    #[cfg(feature = "wgpu")]
    {
        use cubecl::wgpu::WgpuRuntime;
        let served = on::<B, Op, WgpuRuntime, f32, i32, u32>(op);
        if served.is_some() {
            return served;
        }
    }
    None
}

fn on<B, Op, R, F, I, BT>(op: &Op) -> Option<Op::Output>
where
    B: Backend,
    Op: CubeOp<B>,
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if TypeId::of::<B>() == TypeId::of::<Cube<R, F, I, BT>>() {
        op.plain::<R, F, I, BT>()
    } else if TypeId::of::<B>() == TypeId::of::<Autodiff<Cube<R, F, I, BT>>>() {
        op.autodiff::<R, F, I, BT>()
    } else {
        None
    }
}
