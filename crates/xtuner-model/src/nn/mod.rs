//! Layers shared by every model: the weight-product seam (the `gemm` crate on the CPU, cuBLAS on CUDA), linear layers, norms, rotary embedding, attention
//! (flash attention: CubeCL kernels for the GPU backends, and the tiled reference they are
//! checked against),
//! the gated MLP and the KV cache.

pub mod activation;
pub mod attention;
pub mod cross_entropy;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;
mod exp;
pub mod flash;
pub mod gemm;
pub mod glu;
pub mod host;
pub mod kv_cache;
pub mod layer_norm;
pub mod linear;
pub mod mlp;
pub mod nf4;
pub mod precision;
pub mod reshape;
pub mod rms_norm;
pub mod rope;

/// `value` as type `U`, when that is its type (a cheap clone: tensors are handles): how
/// backend-specific code (the GEMM engines, the CubeCL kernels) recognises its backend
/// inside generic model code.
pub(crate) fn same<T: 'static, U: Clone + 'static>(value: &T) -> Option<U> {
    (value as &dyn std::any::Any).downcast_ref::<U>().cloned()
}

/// `value` as type `U` when that is its type, moved rather than cloned (so a buffer it
/// owns keeps a single handle); `Err(value)` otherwise.
pub fn moved<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let boxed: Box<dyn std::any::Any> = Box::new(value);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(boxed) => match boxed.downcast::<T>() {
            Ok(t) => Err(*t),
            Err(_) => unreachable!("boxed as T just above"),
        },
    }
}
