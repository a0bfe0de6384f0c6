//! The learning-rate schedule of XTuner's recipes: a linear warm-up from
//! `lr × start_factor` to `lr` over the first `warmup_ratio` of the iterations, then a
//! cosine decay to `eta_min` over the rest (MMEngine's `LinearLR` + `CosineAnnealingLR`,
//! converted to iterations). A pure function of the iteration, so resuming is exact.

use std::f64::consts::PI;

use crate::config::{OptimizerConfig, ScheduleConfig};

/// Warm-up then cosine, by iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Iterations of linear warm-up (W).
    pub warmup_iters: usize,
    /// Iterations in the whole run (T).
    pub total_iters: usize,
    /// The warm-up starts at `base_lr × start_factor`.
    pub start_factor: f64,
    /// The cosine ends here.
    pub eta_min: f64,
}

impl LrSchedule {
    /// The schedule of a run of `total_iters` iterations; the warm-up covers
    /// `floor(warmup_ratio × total_iters)` of them, as MMEngine converts epochs.
    pub fn new(optimizer: &OptimizerConfig, schedule: &ScheduleConfig, total_iters: usize) -> Self {
        let warmup_iters = (schedule.warmup_ratio * total_iters as f64).floor() as usize;
        Self {
            base_lr: optimizer.lr,
            warmup_iters,
            total_iters,
            start_factor: schedule.warmup_start_factor,
            eta_min: schedule.eta_min,
        }
    }

    /// The learning rate at iteration `t` (0-based):
    /// `t < W`: `base·(s + (1−s)·t/W)`; else `η + ½(base−η)(1 + cos(π(t−W)/(T−W)))`.
    pub fn lr(&self, t: usize) -> f64 {
        let (base, w) = (self.base_lr, self.warmup_iters);
        if t < w {
            let s = self.start_factor;
            return base * (s + (1.0 - s) * t as f64 / w as f64);
        }
        let span = self.total_iters.saturating_sub(w).max(1) as f64;
        let progress = ((t - w) as f64 / span).min(1.0);
        self.eta_min + 0.5 * (base - self.eta_min) * (1.0 + (PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_trajectory() {
        // lora_train/trajectory.json: lr 0.01, 2 warm-up steps of 6, start factor 1e-5.
        let s = LrSchedule {
            base_lr: 0.01,
            warmup_iters: 2,
            total_iters: 6,
            start_factor: 1e-5,
            eta_min: 0.0,
        };
        let expected = [
            1.0000000000000001e-07,
            0.005000050000000001,
            0.01,
            0.008535533905932738,
            0.005,
            0.0014644660940672626,
        ];
        for (t, want) in expected.iter().enumerate() {
            assert!(
                (s.lr(t) - want).abs() < 1e-15,
                "step {t}: {} vs {want}",
                s.lr(t)
            );
        }
    }

    #[test]
    fn warmup_ratio_converts_to_iterations() {
        let s = LrSchedule::new(
            &OptimizerConfig::default(),
            &ScheduleConfig::default(),
            1000,
        );
        assert_eq!(s.warmup_iters, 30);
        assert!((s.lr(30) - 2e-4).abs() < 1e-18);
        assert!(s.lr(999) < 1e-8);
        // No warm-up at all.
        let s = LrSchedule::new(
            &OptimizerConfig::default(),
            &ScheduleConfig {
                warmup_ratio: 0.0,
                ..Default::default()
            },
            10,
        );
        assert_eq!(s.lr(0), 2e-4);
    }
}
