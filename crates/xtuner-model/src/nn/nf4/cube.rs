//! NF4 dequantization in one CubeCL kernel, for Burn's GPU backends.
//!
//! The portable path of [`Nf4Weight::dequantize`] is a chain of tensor ops (a shift and a
//! mask per nibble of a word, a gather from the code book, the absmax repeated per block,
//! a product, a cast), each a pass over the whole matrix. QLoRA dequantizes every base
//! weight in every forward, again in the recompute of activation checkpointing and again
//! for the backward's `dX`, so here it is one pass: one unit per weight reads its word and
//! its block's absmax and writes `NF4_LEVELS[code] · absmax`, computed in f32 and rounded
//! once to the compute dtype (bitsandbytes' `dequantize_4bit` does the same).

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::CubeDim;

use super::Nf4Weight;
use crate::nn::cube::{Cube, CubeOp, dispatch, same};

mod kernel {
    use cubecl::prelude::*;

    /// `out[i] = levels[code i] · absmax[i / block_size]` over the row-major `[rows, cols]`
    /// matrix; code `i` is nibble `i % codes_per_word` of word `i / codes_per_word`, the
    /// first in the most significant place.
    #[cube(launch)]
    pub(super) fn dequantize_kernel<F: Float>(
        packed: &Tensor<i32>,
        absmax: &Tensor<f32>,
        levels: &Tensor<f32>,
        out: &mut Tensor<F>,
        #[comptime] codes_per_word: usize,
        #[comptime] block_size: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let word = u32::cast_from(packed[i / codes_per_word]);
        let shift = (4 * (codes_per_word - 1 - i % codes_per_word)) as u32;
        let code = ((word >> shift) & 15u32) as usize;
        out[i] = F::cast_from(levels[code] * absmax[i / block_size]);
    }
}

/// The dense `[rows, cols]` matrix of `nf4` in `dtype` through the kernel, when `B` is a
/// backend this build serves it on; `None` otherwise.
pub(super) fn dequantize<B: Backend>(nf4: &Nf4Weight<B>, dtype: DType) -> Option<Tensor<B, 2>> {
    let served = matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && nf4.packed.dtype() == DType::I32
        && nf4.absmax.dtype() == DType::F32
        && nf4.levels.dtype() == DType::F32
        && nf4.shape.iter().all(|&d| d > 0)
        // The kernel indexes in 32 bits.
        && nf4.shape[0] * nf4.shape[1] < u32::MAX as usize;
    if !served {
        return None;
    }
    dispatch(&Dequantize { nf4, dtype })
}

struct Dequantize<'a, B: Backend> {
    nf4: &'a Nf4Weight<B>,
    dtype: DType,
}

impl<B: Backend> Dequantize<'_, B> {
    /// The kernel on the inner backend's tensors.
    fn launch<R: CubeRuntime>(
        &self,
        packed: CubeTensor<R>,
        absmax: CubeTensor<R>,
        levels: CubeTensor<R>,
    ) -> CubeTensor<R> {
        let (packed, absmax, levels) = (
            into_contiguous(packed),
            into_contiguous(absmax),
            into_contiguous(levels),
        );
        let [rows, cols] = self.nf4.shape;
        let client = packed.client.clone();
        // Packed rows, as the kernel writes them (Burn's default allocation may pad rows
        // on CUDA).
        let out = empty_device_contiguous_dtype::<R>(
            client.clone(),
            packed.device.clone(),
            Shape::from(vec![rows, cols]),
            self.dtype,
        );
        let dim = CubeDim::new_1d(256);
        let count = calculate_cube_count_elemwise(&client, rows * cols, dim);
        kernel::dequantize_kernel::launch::<R>(
            &client,
            count,
            dim,
            packed.into_tensor_arg(),
            absmax.into_tensor_arg(),
            levels.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            self.nf4.codes_per_word,
            self.nf4.block_size,
            self.dtype.into(),
        );
        out
    }
}

impl<B: Backend> CubeOp<B> for Dequantize<'_, B> {
    type Output = Tensor<B, 2>;

    fn plain<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        &self,
    ) -> Option<Tensor<B, 2>> {
        let packed: Tensor<Cube<R, F, I, BT>, 1, Int> = same(&self.nf4.packed)?;
        let absmax: Tensor<Cube<R, F, I, BT>, 1> = same(&self.nf4.absmax)?;
        let levels: Tensor<Cube<R, F, I, BT>, 1> = same(&self.nf4.levels)?;
        let out = self.launch(
            packed.into_primitive(),
            absmax.into_primitive().tensor(),
            levels.into_primitive().tensor(),
        );
        same(&Tensor::<Cube<R, F, I, BT>, 2>::from_primitive(
            TensorPrimitive::Float(out),
        ))
    }

    /// The weights are constants: the result is too (no node in the graph).
    fn autodiff<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        &self,
    ) -> Option<Tensor<B, 2>> {
        type Ad<R, F, I, BT> = Autodiff<Cube<R, F, I, BT>>;
        let packed: Tensor<Ad<R, F, I, BT>, 1, Int> = same(&self.nf4.packed)?;
        let absmax: Tensor<Ad<R, F, I, BT>, 1> = same(&self.nf4.absmax)?;
        let levels: Tensor<Ad<R, F, I, BT>, 1> = same(&self.nf4.levels)?;
        let out = self.launch(
            packed.inner().into_primitive(),
            absmax.inner().into_primitive().tensor(),
            levels.inner().into_primitive().tensor(),
        );
        same(&Tensor::<Ad<R, F, I, BT>, 2>::from_inner(
            Tensor::from_primitive(TensorPrimitive::Float(out)),
        ))
    }
}
