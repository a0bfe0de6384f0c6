//! Layers shared by every model: the linear seam, norms, rotary embedding, attention,
//! the gated MLP and the KV cache.

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod nf4;
pub mod rms_norm;
pub mod rope;
