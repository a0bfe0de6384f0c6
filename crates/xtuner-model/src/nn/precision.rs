//! Mixed precision: a trainable weight may be stored wider than the model computes (the
//! f32 master weights of a bf16 run, which the optimizer updates without losing small
//! steps to bf16 rounding). Each layer reads its weights in the dtype of its input; the
//! cast's backward brings the gradient back to the stored dtype. On the CPU everything
//! is f32 and every cast here is skipped.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element, Tensor, TensorData};

use crate::{Error, Result};

/// The dtype the backend computes in (bf16 for `Cuda<bf16>`, f32 on the CPU).
pub fn compute_dtype<B: Backend>() -> DType {
    <B::FloatElem as Element>::dtype()
}

/// The first value of `t` on the host, read in the tensor's own dtype. (`into_scalar`
/// reads in the backend's default float type, which rounds an f32 loss or norm to bf16
/// on a bf16 backend.)
pub fn scalar<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

/// A tensor's values on the host as `E`, converted from whatever dtype they have.
///
/// # Errors
/// Values that cannot be read as `E` (never for a numeric tensor), named rather than
/// read as an empty vector.
pub fn host_vec<E: Element>(data: TensorData) -> Result<Vec<E>> {
    data.convert::<E>()
        .into_vec::<E>()
        .map_err(|e| Error::HostRead {
            message: format!("{e:?}"),
        })
}

/// `t` in `dtype`: a cast only when it is in another one.
pub fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;

    #[test]
    fn casts_only_across_dtypes() {
        assert_eq!(compute_dtype::<TestBackend>(), DType::F32);
        let t = Tensor::<TestBackend, 1>::from_floats([1.5, -2.0], &Default::default());
        let wide = in_dtype(t, DType::F64);
        assert_eq!(wide.dtype(), DType::F64);
        assert_eq!(scalar(wide.clone()), 1.5);
        let back = in_dtype(wide, DType::F32);
        assert_eq!(back.dtype(), DType::F32);
        assert_eq!(back.into_data().to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
    }
}
