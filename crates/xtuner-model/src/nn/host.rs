//! What the CPU backend's own ops share (`flash/cpu.rs`, `glu`, `rms_norm/cpu.rs`,
//! `cross_entropy`, `reshape`, `gemm/cpu.rs`, and the engine's optimizer passes): the
//! backend's type and its f32 arrays.

use std::mem::MaybeUninit;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

/// Burn's CPU backend in f32.
pub type Cpu = NdArray<f32>;

/// The f32 array of a CPU tensor in standard layout: its own buffer when it already is,
/// a copy otherwise.
///
/// # Panics
/// A tensor of another dtype (the ops check f32 before they get here).
pub fn standard(t: NdArrayTensor) -> ArcArray<f32, IxDyn> {
    let array = match t {
        NdArrayTensor::F32(s) => s.into_shared(),
        _ => unreachable!("f32 checked by the caller"),
    };
    if array.is_standard_layout() {
        array
    } else {
        array.as_standard_layout().into_owned().into_shared()
    }
}

/// The elements of a standard-layout array, in order.
pub fn elements(a: &ArcArray<f32, IxDyn>) -> &[f32] {
    a.as_slice()
        .unwrap_or_else(|| unreachable!("standard layout"))
}

/// The elements of a standard-layout array, unique (copied when shared).
pub fn elements_mut(a: &mut ArcArray<f32, IxDyn>) -> &mut [f32] {
    a.as_slice_mut()
        .unwrap_or_else(|| unreachable!("standard layout"))
}

/// `len` zeros, written over the cores: an op's fresh output, zeroed by one thread
/// while the others waited, was a tenth of a training step's serial time.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .for_each(|c: &mut [MaybeUninit<f32>]| c.fill(MaybeUninit::new(0.0)));
    // SAFETY: the tasks above wrote all `len` elements of the capacity.
    unsafe { v.set_len(len) };
    v
}

/// The gradient registered so far for autodiff node `$node` (a parent of one of our CPU
/// ops), taken out of `$grads`, as an `Option<NdArrayTensor>`: an op whose input
/// feeds other ops too adds its own gradient into that one in its own pass, where Burn
/// would add the two afterwards, allocating, on one thread. `$like` is any CPU tensor
/// primitive (Burn looks a gradient up by a tensor, of which only the node is read). A
/// macro because the node's type is not exported.
macro_rules! take_grad {
    ($grads:expr, $node:expr, $like:expr) => {{
        type Probe = burn::tensor::ops::FloatTensor<burn::backend::Autodiff<$crate::nn::host::Cpu>>;
        let node = $node;
        let probe = Probe {
            primitive: $like.clone(),
            node: node.clone(),
            rc: std::sync::Arc::new(node.id),
        };
        $grads.remove::<$crate::nn::host::Cpu>(&probe)
    }};
}
pub(crate) use take_grad;

/// Registers `$grad` (an `NdArrayTensor`) as autodiff node `$node`'s gradient, added to
/// the one it already has ([`sum`], over the cores) rather than by Burn's
/// single-threaded addition.
macro_rules! add_grad {
    ($grads:expr, $node:expr, $grad:expr) => {{
        let (node, grad) = ($node, $grad);
        let grad = match $crate::nn::host::take_grad!($grads, node, &grad) {
            Some(earlier) => $crate::nn::host::sum(grad, earlier),
            None => grad,
        };
        $grads.register::<$crate::nn::host::Cpu>(node.id, grad);
    }};
}
pub(crate) use add_grad;

/// `new + earlier` (Burn's gradient sum), in the buffer of whichever no one else holds,
/// over the cores.
pub(crate) fn sum(new: NdArrayTensor, earlier: NdArrayTensor) -> NdArrayTensor {
    use burn::tensor::ops::FloatTensorOps;
    const CHUNK: usize = 1 << 15;
    let (a, b) = match (new, earlier) {
        (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => (a.into_shared(), b.into_shared()),
        (new, earlier) => return Cpu::float_add(new, earlier),
    };
    if a.shape() != b.shape() || !a.is_standard_layout() || !b.is_standard_layout() {
        return Cpu::float_add(NdArrayTensor::from(a), NdArrayTensor::from(b));
    }
    // `x + y == y + x` in IEEE arithmetic: either buffer may take the sum.
    let add = |out: &mut [f32], other: &[f32]| {
        out.par_chunks_mut(CHUNK)
            .zip(other.par_chunks(CHUNK))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o += x));
    };
    let out = if a.is_unique() {
        let mut a = a;
        add(elements_mut(&mut a), elements(&b));
        a
    } else if b.is_unique() {
        let mut b = b;
        add(elements_mut(&mut b), elements(&a));
        b
    } else {
        let mut out = ArcArray::from_shape_vec(a.raw_dim(), zeros(a.len()))
            .unwrap_or_else(|_| unreachable!("sized"));
        let o = elements_mut(&mut out);
        o.par_chunks_mut(CHUNK)
            .zip(
                elements(&a)
                    .par_chunks(CHUNK)
                    .zip(elements(&b).par_chunks(CHUNK)),
            )
            .for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = a + b;
                }
            });
        out
    };
    NdArrayTensor::from(out)
}
