//! Choosing the next token from logits, as Hugging Face's `generate` does:
//! repetition penalty, then temperature, top-k and top-p, then a draw from the softmax
//! (seeded, so a run can be repeated). Temperature 0 means greedy (argmax), as
//! `xtuner chat` samples only when the temperature is positive.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen (1 = off).
    pub repetition_penalty: f32,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for SamplingConfig {
    /// XTuner chat's defaults: temperature 0.1, top-k 40, top-p 0.75, no penalty, seed 0.
    fn default() -> Self {
        Self {
            temperature: 0.1,
            top_k: 40,
            top_p: 0.75,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler with its own random stream.
    pub fn new(config: SamplingConfig) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
        }
    }

    /// The next token given the last position's logits and the ids so far (prompt and
    /// generated, for the repetition penalty).
    pub fn next(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = self.config;
        if c.repetition_penalty != 1.0 {
            for &id in history {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repetition_penalty
                    } else {
                        *l * c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, most likely first.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if c.top_k > 0 {
            order.truncate(c.top_k);
        }
        let max = order.first().map_or(0.0, |&i| logits[i]);
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| ((logits[i] - max) / c.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if c.top_p < 1.0 {
            // Keep tokens until the mass before them reaches top_p (at least one).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .take_while(|&&p| {
                    let before = mass;
                    mass += p;
                    before < c.top_p
                })
                .count()
                .max(1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (&i, &p) in order.iter().zip(&probs) {
            if draw < p {
                return i as u32;
            }
            draw -= p;
        }
        order.last().map_or(0, |&i| i as u32)
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_greedy() {
        let mut s = Sampler::new(SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.next(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_penalty_applies() {
        let mut s = Sampler::new(SamplingConfig {
            top_k: 1,
            ..Default::default()
        });
        assert_eq!(s.next(&mut [0.1, 3.0, 2.0], &[]), 1);
        // Token 1 already seen: 3.0 / 2 = 1.5 < 2.0.
        let mut s = Sampler::new(SamplingConfig {
            top_k: 1,
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.next(&mut [0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn draws_follow_the_distribution_and_the_seed() {
        let config = SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 7,
        };
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(config);
        let ones = (0..4000)
            .filter(|_| s.next(&mut logits.clone(), &[]) == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
        let draws = |seed| {
            let mut s = Sampler::new(SamplingConfig { seed, ..config });
            (0..32)
                .map(|_| s.next(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p = [0.6, 0.3, 0.1]: top_p 0.5 keeps only the first.
        let mut s = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            repetition_penalty: 1.0,
            seed: 0,
        });
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        assert!((0..100).all(|_| s.next(&mut logits.clone(), &[]) == 0));
    }
}
