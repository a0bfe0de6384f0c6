//! Training where the backend's default float dtype is not f32, as on CUDA in bf16.
//!
//! Burn's CubeCL binary ops do not check that their operands share a dtype, and every
//! tensor made from host data without a dtype takes the backend's default; so a tensor
//! meant to stay f32 that meets one made in the default dtype is silently misread on a
//! GPU. NdArray<f64> has the same hazard but refuses mixed dtypes outright, so every mode
//! trained on it shows that no such pair meets.
//!
//! This is its own test binary on purpose: Burn keys a device's default dtypes by the
//! device type, which NdArray<f32> and NdArray<f64> share, and the first backend to touch
//! the device in a process sets them for both.
#![allow(clippy::unwrap_used)]

use xtuner_engine::bench::{BenchMode, StepBench, run};

type Wide = burn::backend::Autodiff<burn::backend::NdArray<f64>>;

#[test]
fn every_mode_trains_where_the_default_dtype_is_not_f32() {
    let device = Default::default();
    assert_eq!(
        burn::tensor::Tensor::<Wide, 1>::zeros([1], &device).dtype(),
        burn::tensor::DType::F64,
        "this process's NdArray device must default to f64"
    );
    for mode in [BenchMode::Full, BenchMode::Lora, BenchMode::Qlora] {
        for checkpointing in [false, true] {
            let bench = StepBench {
                preset: "internlm2-tiny".into(),
                vocab_size: 300,
                seq_len: 32,
                batch_size: 1,
                mode,
                lora_r: 4,
                warmup: 0,
                steps: 2,
                checkpointing,
            };
            let report = run::<Wide>(&bench, &device).unwrap();
            assert!(report.losses.iter().all(|l| l.is_finite()), "{mode:?}");
        }
    }
}
