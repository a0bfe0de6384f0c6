//! Data parallelism's gradient exchange: a rank's accumulated gradients as one flat
//! host bucket (every trainable parameter, in the model's visiting order, which every
//! rank shares), summed over the ranks in rank order, and registered back. Each rank
//! divides its losses by `accumulative_counts × world` before backward, as one rank
//! accumulating all of their micro-batches divides each, so the sum is that rank's
//! accumulated gradient, added in the same order. A parameter no rank has
//! a gradient for (a part no micro-batch reached) stays without one, as on one device.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use xtuner_model::nn::precision::host_vec;

use super::Collective;
use crate::Result;

/// `grads` as one flat host bucket of `f32` over `model`'s trainable parameters in
/// visiting order (zeros where a parameter has none), and whether each has one.
///
/// # Errors
/// Gradients that cannot be read on the host.
pub(crate) fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> Result<(Vec<f32>, Vec<bool>)> {
    let mut flatten = Flatten::<B> {
        grads,
        bucket: Vec::new(),
        present: Vec::new(),
        error: None,
        _backend: std::marker::PhantomData,
    };
    model.visit(&mut flatten);
    match flatten.error {
        Some(e) => Err(e),
        None => Ok((flatten.bucket, flatten.present)),
    }
}

/// The gradients summed over every rank, in rank order. One rank's gradients come back
/// unchanged.
///
/// # Errors
/// A collective that fails, or gradients that cannot be read on the host.
pub fn all_reduce_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    collective: &dyn Collective,
) -> Result<GradientsParams> {
    if collective.world_size() == 1 {
        return Ok(grads);
    }
    let (mut bucket, present) = flatten(model, &grads)?;
    let mut presence: Vec<f64> = present.iter().map(|&p| f64::from(u8::from(p))).collect();
    collective.all_reduce_sum(&mut bucket)?;
    collective.all_reduce_sum_f64(&mut presence)?;
    let mut unflatten = Unflatten {
        grads,
        bucket: &bucket,
        presence: &presence,
        offset: 0,
        index: 0,
    };
    model.visit(&mut unflatten);
    Ok(unflatten.grads)
}

struct Flatten<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    bucket: Vec<f32>,
    present: Vec<bool>,
    error: Option<crate::Error>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() || self.error.is_some() {
            return;
        }
        let n = param.shape().num_elements();
        let grad = self.grads.get::<B::InnerBackend, D>(param.id);
        self.present.push(grad.is_some());
        match grad {
            Some(grad) => match host_vec::<f32>(grad.cast(burn::tensor::DType::F32).into_data()) {
                Ok(values) => self.bucket.extend(values),
                Err(e) => self.error = Some(e.into()),
            },
            None => self.bucket.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

struct Unflatten<'a> {
    grads: GradientsParams,
    bucket: &'a [f32],
    presence: &'a [f64],
    offset: usize,
    index: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = param.shape();
        let n = shape.num_elements();
        let values = &self.bucket[self.offset..self.offset + n];
        self.offset += n;
        let present = self.presence[self.index] > 0.0;
        self.index += 1;
        if !present {
            return;
        }
        let dtype = self
            .grads
            .remove::<B::InnerBackend, D>(param.id)
            .map_or_else(|| param.val().dtype(), |g| g.dtype());
        // Created in the gradient's dtype (not the backend's default, which would round
        // an f32 master's gradient to bf16 on the way).
        let grad = Tensor::<B::InnerBackend, D>::from_data(
            TensorData::new(values.to_vec(), shape),
            (&param.val().device(), dtype),
        );
        self.grads.register::<B::InnerBackend, D>(param.id, grad);
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::module::Module;

    use super::*;
    use crate::collective::local::Local;

    type A = Autodiff<NdArray<f32>>;

    #[derive(Module, Debug)]
    struct Two<B: burn::tensor::backend::Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
    }

    fn model() -> Two<A> {
        let device = Default::default();
        Two {
            a: Param::from_tensor(Tensor::from_floats([[1.0, 2.0], [3.0, 4.0]], &device)),
            b: Param::from_tensor(Tensor::from_floats([0.5, -1.0, 2.0], &device)),
        }
    }

    /// Rank r's gradients: of `(r+1)·Σa²` (and of `Σb` on rank 0 only).
    fn grads(model: &Two<A>, rank: usize) -> GradientsParams {
        let mut loss = model.a.val().powf_scalar(2.0).sum() * (rank + 1) as f64;
        if rank == 0 {
            loss = loss + model.b.val().sum();
        }
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn values<const D: usize>(
        grads: &GradientsParams,
        p: &Param<Tensor<A, D>>,
    ) -> Option<Vec<f32>> {
        grads
            .get::<NdArray<f32>, D>(p.id)
            .map(|g| g.into_data().to_vec().unwrap())
    }

    #[test]
    fn gradients_are_summed_over_the_ranks() {
        // Each rank builds its own model, as ranks do: autodiff graphs that share leaf
        // tensors across threads can deadlock Burn's autodiff.
        for world in [2, 3] {
            let results = std::thread::scope(|s| {
                let handles: Vec<_> = Local::group(world)
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            let m = model();
                            let g = all_reduce_sum(&m, grads(&m, c.rank()), &c).unwrap();
                            (values(&g, &m.a), values(&g, &m.b))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            // d/da of Σ_r (r+1)·Σa² = 2a · world(world+1)/2; b only from rank 0.
            let factor = (world * (world + 1)) as f32;
            let expected_a: Vec<f32> = [1.0, 2.0, 3.0, 4.0].iter().map(|a| a * factor).collect();
            let expected_b = vec![1.0; 3];
            for (a, b) in results {
                let a = a.unwrap();
                for (got, want) in a.iter().zip(&expected_a) {
                    assert!((got - want).abs() < 1e-5, "{a:?} vs {expected_a:?}");
                }
                assert_eq!(b.unwrap(), expected_b);
            }
        }
        // No rank reached `b`: it stays without a gradient.
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = Local::group(2)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let m = model();
                        let loss = m.a.val().sum();
                        let g = GradientsParams::from_grads(loss.backward(), &m);
                        values(&all_reduce_sum(&m, g, &c).unwrap(), &m.b)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(results, [None, None]);
    }
}
