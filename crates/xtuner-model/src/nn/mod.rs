//! Layers shared by every model: the weight-product seam (cuBLAS on CUDA), linear layers, norms, rotary embedding, attention
//! (and the tiled flash-attention reference a GPU kernel is checked against),
//! the gated MLP and the KV cache.

pub mod attention;
#[cfg(feature = "cuda")]
mod cublas;
pub mod flash;
pub mod gemm;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod nf4;
pub mod precision;
pub mod rms_norm;
pub mod rope;
