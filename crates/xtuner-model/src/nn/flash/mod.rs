//! Flash attention for training's causal mask: never holding the `[T × S]` scores.
//!
//! - [`mod@reference`]: the tiled algorithm in plain Rust on the host, forward and
//!   backward, the oracle the kernels are checked against (`tests/cube_kernels.rs`);
//! - `kernel`: the same tiling as three CubeCL kernels (forward, `dQ`, `dK`/`dV`);
//! - `cube`: their launchers on Burn's CubeCL tensors and the autodiff op that wraps
//!   them.
//!
//! [`attention`] is the dispatcher the attention layer calls: the kernels where the
//! backend has them, nothing (so the layer materialises the scores) elsewhere.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) mod cube;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod kernel;
pub mod reference;

/// Causal attention through the flash kernels, where the backend has them and
/// `XTUNER_ATTENTION=dense` does not switch them off; `None` otherwise.
///
/// # Shapes
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, K, T, D]`; `segments`: `[B, T]`, non-decreasing
/// along each row (the segment ids of a causal attention mask) → `[B, H, T, D]`.
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    segments: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 4>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        static DENSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*DENSE.get_or_init(|| std::env::var("XTUNER_ATTENTION").is_ok_and(|v| v == "dense")) {
            return cube::attention(q, k, v, segments);
        }
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    let _ = (q, k, v, segments);
    None
}
