//! QLoRA's 4-bit NormalFloat (NF4) weight storage (Dettmers et al. 2023,
//! <https://arxiv.org/abs/2305.14314>), bit-exact with bitsandbytes 0.50's
//! `bnb.functional.quantize_4bit(w, blocksize, compress_statistics, quant_type="nf4")`.
//!
//! A weight matrix `[rows, cols]` (PyTorch's `[out, in]`) is flattened row-major and cut
//! into blocks of `block_size` elements; each block stores its absolute maximum and,
//! for every element, the index of the nearest of 16 levels ([`NF4_LEVELS`]) to
//! `w / absmax`. Two indices share a byte, the first element in the high nibble.
//! Dequantization is `NF4_LEVELS[code] · absmax`.
//!
//! Double quantization (`compress_statistics=True`) stores the per-block absmax
//! themselves in 8 bits: their mean is subtracted (the `offset`), and the centred
//! values are quantized to the signed dynamic 8-bit code ([`dynamic_map_8bit`]) in
//! blocks of 256, each with its own f32 absmax (`scales`).
//!
//! The arithmetic follows the code paths bitsandbytes 0.50 takes on the CPU, where the
//! reference fixture was made (the CUDA kernels agree except where noted):
//! - 4-bit (`backends/default/ops.py`): full blocks scale by the f32 reciprocal,
//!   `w · (1 / max(absmax, 1e-38))`; a partial last block divides, `w / max(absmax, 1e-38)`
//!   and stores the clamped absmax; full blocks store it unclamped. (The CUDA kernel uses
//!   the reciprocal for every block, and codes an all-zero block 0, as 0·∞ is NaN.)
//!   The scaled value is clamped to ±1 and gets the number of f32 midpoints
//!   `(l[i] + l[i+1]) / 2` strictly below it (`torch.bucketize`, so a value on a midpoint
//!   takes the lower level, as in the CUDA kernel's decision tree). An odd element count
//!   pads the last byte's low nibble with the code of 0.
//! - offset: `torch.mean` in f32, summed in the order of PyTorch's AVX2 CPU kernel
//!   (8-lane vectors, four interleaved accumulators, cascaded levels).
//! - 8-bit (`csrc/cpu_ops.cpp`, `quantize_cpu`): absmax per 256 block, `x · (1/absmax)`,
//!   clamped, mapped to one of 65536 bins by `trunc(fma((v + 1)·0.5, 65535, 0.5))`, each
//!   bin holding the code whose midpoint interval contains the bin's centre; an all-zero
//!   block gets code 0. (CUDA searches the code table directly, which differs on a few
//!   values.)

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;
mod quantize;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};

use crate::nn::precision::in_dtype;

#[cfg(test)]
use quantize::torch_mean;
pub use quantize::{Absmax, Nf4Tensor, dynamic_map_8bit};

/// The 16 NF4 levels (bitsandbytes' `get_4bit_type("nf4")`: quantiles of N(0, 1) scaled to
/// ±1, with an exact zero), in code order.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The f32 midpoints between consecutive levels: the decision boundaries.
const NF4_MIDPOINTS: [f32; 15] = {
    let mut mids = [0.0; 15];
    let mut i = 0;
    while i < 15 {
        mids[i] = (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) / 2.0;
        i += 1;
    }
    mids
};

/// The block size bitsandbytes uses to double-quantize the absmax.
pub const DOUBLE_QUANT_BLOCK_SIZE: usize = 256;

/// The code of 0.0, which pads an odd element count.
const ZERO_CODE: u8 = 7;

/// The smallest absmax a block is scaled by (bitsandbytes' `clamp(min=1e-38)`).
const MIN_ABSMAX: f32 = 1e-38;

/// An [`Nf4Tensor`] on a Burn device, dequantized on the fly: the only resident copy of
/// the base weight is the 4-bit codes, packed into the backend's integer tensor (as many
/// as fit below its sign bit: 7 per i32, 4.6 bits a weight; 15 per i64, 4.3 bits), plus
/// the decoded f32 absmax per block. Its tensors are constants, not parameters: they
/// take no gradient, optimizers never see them, and module records do not persist them.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// The codes, `codes_per_word` per element, the first in the most significant
    /// nibble, the tail padded with the code of 0; never negative.
    pub(super) packed: Tensor<B, 1, Int>,
    /// The per-block absmax (decoded when double-quantized), `[n_blocks]`, in f32.
    pub(super) absmax: Tensor<B, 1>,
    /// [`NF4_LEVELS`], `[16]`, in f32.
    pub(super) levels: Tensor<B, 1>,
    /// `[rows, cols]` of the quantized matrix (`[d_out, d_in]`).
    pub(super) shape: [usize; 2],
    /// Elements per absmax block.
    pub(super) block_size: usize,
    /// Codes per element of `packed`.
    pub(super) codes_per_word: usize,
}

impl<B: Backend> Nf4Weight<B> {
    /// Uploads `nf4` to `device`.
    pub fn from_tensor(nf4: &Nf4Tensor, device: &B::Device) -> Self {
        let int_bits = 8 * Tensor::<B, 1, Int>::zeros([1], device).dtype().size();
        let codes_per_word = (int_bits.saturating_sub(1) / 4).clamp(1, 15);
        let numel = nf4.shape[0] * nf4.shape[1];
        let code = |i: usize| match nf4.packed.get(i / 2) {
            Some(&byte) if i < numel => {
                if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                }
            }
            _ => ZERO_CODE,
        };
        let n_words = numel.div_ceil(codes_per_word);
        let words: Vec<i64> = (0..n_words)
            .map(|w| {
                let first = w * codes_per_word;
                (first..first + codes_per_word)
                    .fold(0i64, |word, i| (word << 4) | i64::from(code(i)))
            })
            .collect();
        let absmax = nf4.absmax_values();
        let n_blocks = absmax.len();
        Self {
            packed: Tensor::from_data(TensorData::new(words, [n_words]), device),
            // f32 whatever the backend computes in: a bf16 absmax or level would round
            // each weight twice before the product.
            absmax: Tensor::from_data(TensorData::new(absmax, [n_blocks]), (device, DType::F32)),
            levels: Tensor::from_data(
                TensorData::new(NF4_LEVELS.to_vec(), [16]),
                (device, DType::F32),
            ),
            shape: nf4.shape,
            block_size: nf4.block_size,
            codes_per_word,
        }
    }

    /// The device memory this weight holds: its packed codes, absmax and levels.
    pub fn device_bytes(&self) -> usize {
        let bytes = |n: usize, dtype: DType| n * dtype.size();
        bytes(self.packed.dims()[0], self.packed.dtype())
            + bytes(self.absmax.dims()[0], self.absmax.dtype())
            + bytes(self.levels.dims()[0], self.levels.dtype())
    }

    /// `[d_in, d_out]`: Burn's Linear layout, the transpose of the quantized matrix.
    pub fn dims(&self) -> [usize; 2] {
        [self.shape[1], self.shape[0]]
    }

    /// Elements per absmax block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The dense weight in `dtype`: `NF4_LEVELS[code] · absmax` computed in f32, rounded
    /// once. On the GPU backends that is one kernel (`cube.rs`).
    ///
    /// # Shapes
    /// → `[d_in, d_out]` (Burn's Linear layout: the transpose of the PyTorch `[out, in]`
    /// matrix that was quantized).
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        self.dequantize_kernel(dtype)
            .unwrap_or_else(|| in_dtype(self.dequantize_f32(), dtype))
    }

    /// [`Nf4Weight::dequantize`] through the GPU kernel; `None` where this build has none
    /// for `B` (the CPU backends, or a build without the `cuda` and `wgpu` features).
    pub fn dequantize_kernel(&self, dtype: DType) -> Option<Tensor<B, 2>> {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        {
            // [rows, cols] → [cols, rows] = [d_in, d_out], a view.
            cube::dequantize(self, dtype).map(Tensor::transpose)
        }
        #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
        {
            let _ = dtype;
            None
        }
    }

    /// [`Nf4Weight::dequantize`] in f32 through Burn's tensor ops (any backend).
    fn dequantize_f32(&self) -> Tensor<B, 2> {
        let [rows, cols] = self.shape;
        let numel = rows * cols;
        let [n_words] = self.packed.dims();
        let per_word = self.codes_per_word;
        let nibbles: Vec<Tensor<B, 2, Int>> = (0..per_word)
            .map(|s| {
                let shift = (4 * (per_word - 1 - s)) as i32;
                self.packed
                    .clone()
                    .bitwise_right_shift_scalar(shift.elem())
                    .bitwise_and_scalar(0x0f.elem())
                    .unsqueeze_dim(1) // [n_words, 1]
            })
            .collect();
        let codes = Tensor::cat(nibbles, 1) // [n_words, per_word]
            .reshape([n_words * per_word])
            .narrow(0, 0, numel);
        let values = self.levels.clone().select(0, codes); // [numel]
        let [n_blocks] = self.absmax.dims();
        let scales = self
            .absmax
            .clone()
            .unsqueeze_dim::<2>(1) // [n_blocks, 1]
            .repeat_dim(1, self.block_size) // [n_blocks, block_size]
            .reshape([n_blocks * self.block_size])
            .narrow(0, 0, numel);
        (values * scales).reshape([rows, cols]).transpose() // [cols, rows] = [d_in, d_out]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::checkpoint::Checkpoint;
    use crate::test_util::max_abs_diff;

    struct Golden {
        ckpt: Checkpoint,
    }

    impl Golden {
        fn open() -> Self {
            Self {
                ckpt: Checkpoint::open(&crate::test_support::fixture("nf4/golden.safetensors"))
                    .unwrap(),
            }
        }
        fn f32s(&self, key: &str) -> Vec<f32> {
            self.ckpt.float_data(key).unwrap().to_vec::<f32>().unwrap()
        }
        fn u8s(&self, key: &str) -> Vec<u8> {
            let ints = self.ckpt.int_data(key).unwrap().to_vec::<i64>().unwrap();
            ints.into_iter().map(|v| u8::try_from(v).unwrap()).collect()
        }
    }

    #[test]
    fn levels_and_dynamic_map_match_bitsandbytes() {
        let golden = Golden::open();
        assert_eq!(golden.f32s("nf4_code"), NF4_LEVELS.to_vec());
        assert_eq!(golden.f32s("dq_state2_code"), dynamic_map_8bit().to_vec());
    }

    #[test]
    fn quantize_matches_bitsandbytes_exactly() {
        let golden = Golden::open();
        let weight = golden.f32s("weight");
        let nf4 = Nf4Tensor::quantize(&weight, [96, 128], 64, false).unwrap();
        assert_eq!(nf4.packed, golden.u8s("packed"));
        assert_eq!(nf4.absmax, Absmax::Plain(golden.f32s("absmax")));
        let deq = nf4.dequantize();
        assert!(max_abs_diff(&deq, &golden.f32s("dequantized")) <= 1e-6);
        assert_eq!(nf4.bytes(), 96 * 128 / 2 + 4 * 192);
    }

    #[test]
    fn double_quant_matches_bitsandbytes_exactly() {
        let golden = Golden::open();
        let weight = golden.f32s("weight");
        let nf4 = Nf4Tensor::quantize(&weight, [96, 128], 64, true).unwrap();
        assert_eq!(nf4.packed, golden.u8s("dq_packed"));
        let Absmax::DoubleQuant {
            codes,
            scales,
            offset,
            block_size,
        } = &nf4.absmax
        else {
            panic!("expected double quantization");
        };
        assert_eq!(*codes, golden.u8s("dq_absmax_codes"));
        assert_eq!(*scales, golden.f32s("dq_state2_absmax"));
        assert_eq!(*offset, golden.f32s("dq_absmax_offset")[0]);
        assert_eq!(*block_size, 256);
        let deq = nf4.dequantize();
        assert!(max_abs_diff(&deq, &golden.f32s("dq_dequantized")) <= 1e-6);
        assert_eq!(nf4.bytes(), 96 * 128 / 2 + 192 + 4 + 4);
    }

    #[test]
    fn dequantized_linear_matches_the_reference_output() {
        let golden = Golden::open();
        let nf4 = Nf4Tensor::quantize(&golden.f32s("weight"), [96, 128], 64, false).unwrap();
        let device = Default::default();
        let x = Tensor::<TestBackend, 2>::from_data(
            TensorData::new(golden.f32s("x"), [5, 128]),
            &device,
        );
        let w = Nf4Weight::<TestBackend>::from_tensor(&nf4, &device);
        assert_eq!(w.dims(), [128, 96]);
        let y = x
            .matmul(w.dequantize(DType::F32))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(max_abs_diff(&y, &golden.f32s("y_dequantized_linear")) <= 1e-4);
    }

    #[test]
    fn device_dequantize_is_the_host_dequantize_transposed() {
        let golden = Golden::open();
        let device = Default::default();
        for double_quant in [false, true] {
            let nf4 =
                Nf4Tensor::quantize(&golden.f32s("weight"), [96, 128], 64, double_quant).unwrap();
            let host = Tensor::<TestBackend, 2>::from_data(
                TensorData::new(nf4.dequantize(), [96, 128]),
                &device,
            );
            let weight = Nf4Weight::<TestBackend>::from_tensor(&nf4, &device);
            // NdArray's i64 holds 15 codes: 4.3 bits a weight.
            assert_eq!(weight.packed.dims(), [(96 * 128usize).div_ceil(15)]);
            let device_w = weight.dequantize(DType::F32);
            assert_eq!(
                device_w.into_data().to_vec::<f32>().unwrap(),
                host.transpose().into_data().to_vec::<f32>().unwrap()
            );
        }
        // A partial last block and an odd element count (3·5 = 15, blocks of 4).
        let values: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.37).collect();
        let nf4 = Nf4Tensor::quantize(&values, [3, 5], 4, false).unwrap();
        let host =
            Tensor::<TestBackend, 2>::from_data(TensorData::new(nf4.dequantize(), [3, 5]), &device);
        let device_w = Nf4Weight::<TestBackend>::from_tensor(&nf4, &device).dequantize(DType::F32);
        assert_eq!(
            device_w.into_data().to_vec::<f32>().unwrap(),
            host.transpose().into_data().to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn a_value_on_a_midpoint_takes_the_lower_level() {
        // With absmax 1 the scaled value is the value itself.
        let mid = NF4_MIDPOINTS[7]; // between 0 and 0.0796
        let above = f32::from_bits(mid.to_bits() + 1);
        let nf4 = Nf4Tensor::quantize(&[1.0, mid, above, -1.0], [1, 4], 4, false).unwrap();
        assert_eq!(nf4.packed, vec![0xf7, 0x80]);
    }

    #[test]
    fn a_partial_last_block_divides_where_full_blocks_multiply_by_the_reciprocal() {
        // x / 3 lands exactly on the 0 | 0.0796 midpoint (code 7); x · (1/3) rounds above
        // it (code 8). bitsandbytes scales full blocks by the reciprocal and the remainder
        // block by division.
        let x = f32::from_bits(1_039_431_807); // 0.11937045
        assert_eq!(x / 3.0, NF4_MIDPOINTS[7]);
        assert!(x * (1.0 / 3.0) > NF4_MIDPOINTS[7]);
        let nf4 = Nf4Tensor::quantize(&[3.0, x, 0.0, 0.0, 3.0, x], [1, 6], 4, false).unwrap();
        assert_eq!(nf4.packed, vec![0xf8, 0x77, 0xf7]);
        assert_eq!(nf4.absmax, Absmax::Plain(vec![3.0, 3.0]));
    }

    #[test]
    fn zero_blocks_keep_a_zero_absmax_and_dequantize_to_zero() {
        let nf4 = Nf4Tensor::quantize(&[0.0; 6], [2, 3], 4, false).unwrap();
        assert_eq!(nf4.packed, vec![0x77; 3]);
        // The full block stores 0; the partial one the clamp 1e-38.
        assert_eq!(nf4.absmax, Absmax::Plain(vec![0.0, MIN_ABSMAX]));
        assert_eq!(nf4.dequantize(), vec![0.0; 6]);
    }

    #[test]
    fn double_quant_of_equal_absmax_gives_zero_scale_and_code_zero() {
        let nf4 = Nf4Tensor::quantize(&[2.0, -1.0, -2.0, 1.0], [2, 2], 2, true).unwrap();
        let Absmax::DoubleQuant {
            codes,
            scales,
            offset,
            ..
        } = &nf4.absmax
        else {
            panic!()
        };
        assert_eq!(
            (codes.as_slice(), scales.as_slice(), *offset),
            (&[0u8, 0][..], &[0.0f32][..], 2.0)
        );
        assert_eq!(nf4.absmax_values(), vec![2.0, 2.0]);
        let plain = Nf4Tensor::quantize(&[2.0, -1.0, -2.0, 1.0], [2, 2], 2, false).unwrap();
        assert_eq!(nf4.packed, plain.packed);
        assert_eq!(nf4.dequantize(), plain.dequantize());
    }

    #[test]
    fn torch_mean_follows_the_cascade_order() {
        // Eight lanes: [1e8, 1, 1, ..., -1e8, ...]; a running sum would lose the ones.
        let mut values = vec![1.0f32; 16];
        values[0] = 1e8;
        values[8] = -1e8;
        // Lane 0 holds 1e8 + (-1e8) = 0; the other lanes 2 each: 14 / 16.
        assert_eq!(torch_mean(&values), 14.0 / 16.0);
        assert_eq!(torch_mean(&[1.0, 2.0, 4.0]), 7.0 / 3.0);
        // Enough rows for the cascade levels to fold: still the mean.
        let values: Vec<f32> = (0..100_003)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let exact = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
        assert!((f64::from(torch_mean(&values)) - exact).abs() < 1e-6 * exact);
    }

    #[test]
    fn bad_shapes_and_block_sizes_are_errors() {
        let values = vec![0.5f32; 12];
        assert!(Nf4Tensor::quantize(&values, [3, 5], 4, false).is_err());
        assert!(Nf4Tensor::quantize(&values, [0, 12], 4, false).is_err());
        assert!(Nf4Tensor::quantize(&[], [0, 0], 4, false).is_err());
        assert!(Nf4Tensor::quantize(&values, [3, 4], 0, false).is_err());
        assert!(Nf4Tensor::quantize(&values, [3, 4], 3, false).is_err());
        assert!(Nf4Tensor::quantize(&values, [usize::MAX, 2], 4, false).is_err());
        let mut bad = values.clone();
        bad[5] = f32::NAN;
        assert!(Nf4Tensor::quantize(&bad, [3, 4], 4, false).is_err());
        assert!(Nf4Tensor::quantize(&values, [3, 4], 4, true).is_ok());
    }
}
