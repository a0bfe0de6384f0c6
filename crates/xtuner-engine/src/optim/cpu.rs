//! The optimizer's passes over every trainable parameter on the CPU backend in f32
//! (AdamW's step, the gradients' global norm and their clipping): Burn's ops run
//! them one single-threaded pass per operation, while the model's products wait.
//! Here each is one pass over the cores, in chunks of fixed size, so the results do
//! not depend on the number of threads.

use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;
use xtuner_model::nn::host::standard;
pub(super) use xtuner_model::nn::host::{elements, elements_mut};
use xtuner_model::nn::moved;

pub(super) use xtuner_model::nn::host::Cpu;

/// Elements per parallel task; a tensor no larger is done on the calling thread.
pub(super) const CHUNK: usize = 1 << 15;

/// `t` as an f32 CPU tensor, when it is one (moved, not cloned); `Err(t)` otherwise.
pub(super) fn on_cpu<T: 'static, const D: usize>(t: T) -> Result<Tensor<Cpu, D>, T> {
    match moved::<T, Tensor<Cpu, D>>(t) {
        Ok(t) if t.dtype() == DType::F32 => Ok(t),
        Ok(t) => Err(moved(t).unwrap_or_else(|_| unreachable!("moved from T"))),
        Err(t) => Err(t),
    }
}

/// The array of an f32 CPU tensor, in standard layout (copied when it is not).
pub(super) fn array<const D: usize>(t: Tensor<Cpu, D>) -> ArcArray<f32, IxDyn> {
    standard(t.into_primitive().tensor())
}

/// The tensor of an array (of the tensor's rank).
pub(super) fn tensor<const D: usize>(a: ArcArray<f32, IxDyn>) -> Tensor<Cpu, D> {
    Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(a)))
}

/// `Σ x²` in f64: per chunk sixteen running sums (so the pass vectorises), added in a
/// fixed order.
pub(super) fn sum_squares(xs: &[f32]) -> f64 {
    fn chunk(xs: &[f32]) -> f64 {
        let mut lanes = [0f64; 16];
        let mut rows = xs.chunks_exact(16);
        for row in &mut rows {
            for (l, &x) in lanes.iter_mut().zip(row) {
                *l += f64::from(x) * f64::from(x);
            }
        }
        let tail: f64 = rows
            .remainder()
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        lanes.iter().sum::<f64>() + tail
    }
    if xs.len() <= CHUNK {
        return chunk(xs);
    }
    let sums: Vec<f64> = xs.par_chunks(CHUNK).map(chunk).collect();
    sums.iter().sum()
}

/// `x ← x·factor` for every element.
pub(super) fn scale(xs: &mut [f32], factor: f32) {
    if xs.len() <= CHUNK {
        xs.iter_mut().for_each(|x| *x *= factor);
    } else {
        xs.par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x *= factor));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked sum is the plain one to f64 precision, and the scaling is
    /// Burn's `mul_scalar` bit for bit, on one chunk and on many.
    #[test]
    fn sums_and_scales_as_burn() {
        let device = Default::default();
        for n in [5, 37, CHUNK * 3 + 11] {
            let t = Tensor::<Cpu, 1>::random([n], burn::tensor::Distribution::Default, &device);
            let xs = t.to_data().to_vec::<f32>().unwrap();
            let want: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let got = sum_squares(&xs);
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
            let mut a = array(t.clone());
            scale(elements_mut(&mut a), 0.37f64 as f32);
            let theirs = (t * 0.37f64).to_data().to_vec::<f32>().unwrap();
            assert_eq!(a.as_slice().unwrap(), theirs.as_slice());
        }
    }
}
