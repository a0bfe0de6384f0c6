//! Flash attention for training's causal mask: never holding the `[T × S]` scores.
//!
//! - [`mod@reference`]: the tiled algorithm in plain Rust on the host, forward and
//!   backward, the oracle the kernels are checked against (`tests/cube_kernels.rs`);
//! - `kernel`: the same tiling as three CubeCL kernels (forward, `dQ`, `dK`/`dV`);
//! - `cube`: their launchers on Burn's CubeCL tensors and the autodiff op that wraps
//!   them;
//! - `blocks` and `cpu`: the same algorithm on the CPU backend, its blocks' products
//!   on the `gemm` crate, with a second entry that reads the heads straight from the
//!   fused projection's output and applies the rotary embedding itself.
//!
//! [`attention`] is the dispatcher the attention layer calls: the kernels where the
//! backend has them, nothing (so the layer materialises the scores) elsewhere.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

mod blocks;
mod cpu;
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
    if dense() {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if let Some(out) = cube::attention(q, k, v, segments) {
        return Some(out);
    }
    cpu::attention(q, k, v, segments)
}

/// Causal attention of the fused projection's output `qkv` (query heads, key heads,
/// value heads), the rotary embedding applied to its queries and keys inside the op,
/// where the backend has such an op (the CPU backend) and `XTUNER_ATTENTION=dense` does
/// not switch it off; `None` otherwise.
///
/// # Shapes
/// `qkv`: `[B, T, (H + 2K)·D]`; `cos`, `sin`: `[B, T, D]`; `segments`: `[B, T]`,
/// non-decreasing along each row; `heads`: `[H, K, D]` → `[B, T, H·D]`.
pub fn packed_attention<B: Backend>(
    qkv: &Tensor<B, 3>,
    rotary: (&Tensor<B, 3>, &Tensor<B, 3>),
    segments: &Tensor<B, 2, Int>,
    heads: [usize; 3],
) -> Option<Tensor<B, 3>> {
    if dense() {
        return None;
    }
    cpu::packed_attention(qkv, rotary, segments, heads)
}

/// Whether `XTUNER_ATTENTION=dense` keeps the materialised scores everywhere.
fn dense() -> bool {
    static DENSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DENSE.get_or_init(|| std::env::var("XTUNER_ATTENTION").is_ok_and(|v| v == "dense"))
}
