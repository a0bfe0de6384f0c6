//! Layers shared by every model: the weight-product seam (cuBLAS on CUDA), linear layers, norms, rotary embedding, attention
//! (flash attention: CubeCL kernels for the GPU backends, and the tiled reference they are
//! checked against),
//! the gated MLP and the KV cache.

pub mod attention;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;
#[cfg(feature = "cuda")]
mod cublas;
pub mod flash;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod flash_cube;
pub mod gemm;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod nf4;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod nf4_cube;
pub mod precision;
pub mod rms_norm;
pub mod rope;
