//! What the CPU backend's own ops share (`flash/cpu.rs`, `glu`, `rms_norm/cpu.rs`,
//! `cross_entropy`, `reshape`, `gemm/cpu.rs`): the backend's type and its f32 arrays.

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use ndarray::{ArcArray, IxDyn};

/// Burn's CPU backend in f32.
pub(crate) type Cpu = NdArray<f32>;

/// The f32 array of a CPU tensor in standard layout: its own buffer when it already is,
/// a copy otherwise.
///
/// # Panics
/// A tensor of another dtype (the ops check f32 before they get here).
pub(crate) fn standard(t: NdArrayTensor) -> ArcArray<f32, IxDyn> {
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
pub(crate) fn elements(a: &ArcArray<f32, IxDyn>) -> &[f32] {
    a.as_slice()
        .unwrap_or_else(|| unreachable!("standard layout"))
}
