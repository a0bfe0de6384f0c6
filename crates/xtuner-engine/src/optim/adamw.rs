//! AdamW as `torch.optim.AdamW`: decoupled weight decay `θ ← θ(1 − lr·λ)`,
//! bias-corrected moments, `ε` added to `√v̂`.
//!
//! The arithmetic is that of Burn's `AdamW`, operation for operation and in its
//! types, and the state is Burn's `AdamWState`, so checkpoints are those Burn's
//! optimizer writes and ZeRO's shards (`zero.rs`, written with Burn's ops) step to
//! the same bits. Burn takes a dozen passes per parameter, each allocating a tensor,
//! on one thread; on the CPU backend in f32 the step is one pass over the parameter,
//! its gradient and its moments, in place, over the cores in parallel (element-wise,
//! so the bits do not depend on the number of threads). Other backends and dtypes
//! take Burn's step.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use ndarray::ArcArray;
use rayon::prelude::*;
use xtuner_model::nn::moved;

use super::cpu::{CHUNK, Cpu, array, elements, elements_mut, tensor};
use crate::config::OptimizerConfig;

/// AdamW with PyTorch's settings (see the module's documentation).
#[derive(Clone)]
pub struct AdamW {
    /// Burn's optimizer, for the backends the fused step does not cover.
    burn: burn::optim::AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

/// AdamW with `config`'s betas, epsilon and weight decay.
pub fn adamw(config: &OptimizerConfig) -> AdamW {
    let (beta_1, beta_2) = (config.betas[0] as f32, config.betas[1] as f32);
    let (epsilon, weight_decay) = (config.eps as f32, config.weight_decay as f32);
    AdamW {
        burn: AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build(),
        beta_1,
        beta_2,
        epsilon,
        weight_decay,
    }
}

impl AdamW {
    /// The optimizer of module `M`'s parameters (one state per parameter).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self.clone())
    }
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let f32s = tensor.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && state.as_ref().is_none_or(|s| {
                let m = &s.momentum;
                m.moment_1.dtype() == DType::F32
                    && m.moment_2.dtype() == DType::F32
                    && m.max_moment_2.is_none()
            });
        if f32s {
            match moved::<_, (Tensor<Cpu, D>, Tensor<Cpu, D>, Option<AdamWState<Cpu, D>>)>((
                tensor, grad, state,
            )) {
                Ok((tensor, grad, state)) => {
                    let (tensor, state) = self.fused(lr, tensor, grad, state);
                    let back = moved::<_, (Tensor<B, D>, AdamWState<B, D>)>((tensor, state));
                    let (tensor, state) =
                        back.unwrap_or_else(|_| unreachable!("B is the CPU backend, moved from"));
                    (tensor, Some(state))
                }
                Err((tensor, grad, state)) => self.burn.step(lr, tensor, grad, state),
            }
        } else {
            self.burn.step(lr, tensor, grad, state)
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <burn::optim::AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

impl AdamW {
    /// The step on the CPU: one pass, in place where the buffers are the step's own.
    fn fused<const D: usize>(
        &self,
        lr: LearningRate,
        param: Tensor<Cpu, D>,
        grad: Tensor<Cpu, D>,
        state: Option<AdamWState<Cpu, D>>,
    ) -> (Tensor<Cpu, D>, AdamWState<Cpu, D>) {
        let mut p = array(param);
        let g = array(grad);
        let first = state.is_none();
        let (time, mut m, mut v) = match state {
            Some(s) => {
                let s = s.momentum;
                (s.time + 1, array(s.moment_1), array(s.moment_2))
            }
            // Written in full by the first step below (fresh zeroed pages: no copy of
            // the gradient, which sharing its buffer would have made).
            None => (
                1,
                ArcArray::zeros(g.raw_dim()),
                ArcArray::zeros(g.raw_dim()),
            ),
        };
        let step = Step::new(self, lr, time);
        {
            let (p, m, v) = (
                elements_mut(&mut p),
                elements_mut(&mut m),
                elements_mut(&mut v),
            );
            let g = elements(&g);
            if p.len() <= CHUNK {
                step.run(first, p, g, m, v);
            } else {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| step.run(first, p, g, m, v));
            }
        }
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: tensor(m),
            moment_2: tensor(v),
            max_moment_2: None,
        };
        (tensor(p), AdamWState { momentum })
    }
}

/// One step's constants, in the types Burn's `AdamW` computes them in.
struct Step {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// `1 − lr·λ`, or `None` without weight decay (no multiplication at all).
    decay: Option<f32>,
    lr: f32,
}

impl Step {
    fn new(adam: &AdamW, lr: LearningRate, time: usize) -> Self {
        let time = time as i32;
        let decay_rate = lr * f64::from(adam.weight_decay);
        Self {
            beta_1: adam.beta_1,
            beta_2: adam.beta_2,
            factor_1: 1.0 - adam.beta_1,
            factor_2: 1.0 - adam.beta_2,
            correction_1: 1f32 - adam.beta_1.powi(time),
            correction_2: 1f32 - adam.beta_2.powi(time),
            epsilon: adam.epsilon,
            decay: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: lr as f32,
        }
    }

    /// The step on one run of elements; `first`: the moments are not yet written.
    fn run(&self, first: bool, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let g = g[i];
            let (m_i, v_i) = if first {
                (g * self.factor_1, (g * g) * self.factor_2)
            } else {
                (
                    m[i] * self.beta_1 + g * self.factor_1,
                    v[i] * self.beta_2 + (g * g) * self.factor_2,
                )
            };
            m[i] = m_i;
            v[i] = v_i;
            let delta =
                (m_i / self.correction_1) / ((v_i / self.correction_2).sqrt() + self.epsilon);
            let p_i = match self.decay {
                Some(d) => p[i] * d,
                None => p[i],
            };
            p[i] = p_i - delta * self.lr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    /// Burn's AdamW and ours, three steps on tensors of both sizes (one task and many),
    /// with and without weight decay: the same bits, parameter and moments.
    #[test]
    fn fused_step_is_burns_bit_for_bit() {
        let device = Default::default();
        for n in [7, CHUNK * 2 + 5] {
            for weight_decay in [0.0, 0.05] {
                let config = OptimizerConfig {
                    weight_decay,
                    ..OptimizerConfig::default()
                };
                let ours = adamw(&config);
                let theirs = ours.burn.clone();
                let mut p = Tensor::<Cpu, 2>::random([n, 3], Distribution::Default, &device);
                let (mut a, mut b) = ((p.clone(), None), (p.clone(), None));
                for step in 0..3 {
                    let normal = Distribution::Normal(0.0, 1.0 + step as f64);
                    // Step 1's gradient is a transposed view: read in the parameter's order.
                    let g = if step == 1 {
                        Tensor::<Cpu, 2>::random([3, n], normal, &device).transpose()
                    } else {
                        Tensor::<Cpu, 2>::random([n, 3], normal, &device)
                    };
                    a = SimpleOptimizer::<Cpu>::step(&ours, 1e-2, a.0, g.clone(), a.1);
                    b = theirs.step(1e-2, b.0, g, b.1);
                }
                let data = |t: &Tensor<Cpu, 2>| t.to_data().to_vec::<f32>().unwrap();
                assert_eq!(data(&a.0), data(&b.0), "{n} elements, decay {weight_decay}");
                let (sa, sb) = (a.1.unwrap().momentum, b.1.unwrap().momentum);
                assert_eq!(sa.time, sb.time);
                assert_eq!(data(&sa.moment_1), data(&sb.moment_1));
                assert_eq!(data(&sa.moment_2), data(&sb.moment_2));
                p = a.0;
                assert_ne!(data(&p), vec![0.0; n * 3]);
            }
        }
        // f64 tensors take Burn's step.
        let p = Tensor::<Cpu, 1>::from_data(TensorData::from([1.0f64, 2.0]), (&device, DType::F64));
        let g = p.clone();
        let (q, _) =
            SimpleOptimizer::<Cpu>::step(&adamw(&OptimizerConfig::default()), 0.1, p, g, None);
        assert_eq!(q.dtype(), DType::F64);
    }
}
