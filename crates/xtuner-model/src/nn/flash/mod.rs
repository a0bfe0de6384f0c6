//! Flash attention for training's causal mask: never holding the `[T × S]` scores.
//!
//! - [`reference`]: the tiled algorithm in plain Rust on the host, forward and
//!   backward, the oracle the kernels are checked against (`tests/cube_kernels.rs`);
//! - `kernel`: the same tiling as three CubeCL kernels (forward, `dQ`, `dK`/`dV`);
//! - `cube`: their launchers on Burn's CubeCL tensors and the autodiff op that wraps
//!   them, which [`crate::nn::attention`] calls on the GPU backends.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) mod cube;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod kernel;
pub mod reference;
