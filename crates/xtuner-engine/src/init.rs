//! Fresh trainable weights (LoRA's A, a new projector), drawn on the host: ChaCha8
//! seeded with the run's seed, on a stream named by the weight's key. A config starts
//! from the same weights on every backend (Burn's generators differ between the CPU and
//! the GPU), and a weight's start does not depend on which others are drawn. The
//! values are created in the masters' dtype, f32, as PyTorch draws them.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::optim::MASTER_DTYPE;

/// The weight `key` of shape `shape`, uniform in `±bound`.
pub fn uniform<B: Backend, const D: usize>(
    key: &str,
    shape: [usize; D],
    bound: f32,
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(crate::fnv1a(key.as_bytes()));
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            if bound > 0.0 {
                rng.random_range(-bound..bound)
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), (device, MASTER_DTYPE))
}

/// PyTorch's default bound for a layer of fan-in `d_in` (`kaiming_uniform_` with
/// a = √5, as `nn.Linear` weights and PEFT's `lora_A` start): `1/√d_in`.
pub fn kaiming_bound(d_in: usize) -> f32 {
    1.0 / (d_in.max(1) as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    fn values(t: Tensor<B, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// The draw depends on the seed and the key only: not on the backend's generator.
    #[test]
    fn draws_depend_on_the_seed_and_the_key_only() {
        let device = Default::default();
        let draw = |key: &str, seed: u64, backend_seed: u64| {
            B::seed(&device, backend_seed);
            uniform::<B, 2>(key, [64, 4], 0.125, seed, &device)
        };
        let a = values(draw("model.layers.0.attention.wqkv.lora_A", 7, 1));
        assert_eq!(a.len(), 256);
        assert!(a.iter().all(|v| v.abs() <= 0.125), "{a:?}");
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
        // Uniform(±1/8): mean 0, variance (1/8)²/3.
        assert!(
            mean.abs() < 0.02 && (var * 192.0 - 1.0).abs() < 0.2,
            "{mean} {var}"
        );
        assert_eq!(
            values(draw("model.layers.0.attention.wqkv.lora_A", 7, 2)),
            a
        );
        assert_ne!(
            values(draw("model.layers.1.attention.wqkv.lora_A", 7, 1)),
            a
        );
        assert_ne!(
            values(draw("model.layers.0.attention.wqkv.lora_A", 8, 1)),
            a
        );
        assert_eq!(kaiming_bound(64), 0.125);
    }
}
