//! The weight product `x·W`: every linear layer, LoRA adapter and tied lm head of the
//! models multiplies through [`matmul`], so this is the one place a backend-specific
//! GEMM plugs in.
//!
//! On the CPU backend it runs on the `gemm` crate (`cpu.rs`), reading transposed views
//! in place. A CUDA build routes it to cuBLAS (`cublas.rs`), forward and backward, on
//! the buffers Burn already owns: on an H200 Burn's CubeCL GEMM reaches 92 TFLOP/s in
//! bf16 where cuBLAS reaches 770. Both are autodiff ops of their own (`tracked.rs`).
//! Any other backend keeps Burn's matmul.
//!
//! `Layout` and `GemmPlan` describe how a row-major product is posed to a
//! column-major BLAS without copying: a matrix stored row by row is, read column by
//! column, its own transpose, so `C = A·B` is asked as `Cᵀ = Bᵀ·Aᵀ`, and a transposed
//! view (a weight's `Wᵀ` in backward) becomes a transpose flag instead of a copy.

mod cpu;
#[cfg(feature = "cuda")]
mod cublas;
mod tracked;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::nn::reshape::reshape;

/// `x·w`.
///
/// # Shapes
/// `x`: `[..., k]`, `w`: `[k, n]` → `[..., n]`.
pub fn matmul<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    #[cfg(feature = "cuda")]
    let x = match cublas::matmul(x, &w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let x = match cpu::matmul(x, &w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    x.matmul(w.unsqueeze::<D>())
}

/// `x·w` as one product of `x`'s rows (every leading dimension flattened) by `w`, run by
/// `product` when `serves([m, k, n])` says it can; `Err(x)` hands `x` back otherwise (or
/// when `product` declines) for Burn's matmul.
fn by_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: &Tensor<B, 2>,
    serves: impl FnOnce([usize; 3]) -> bool,
    product: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>) -> Option<Tensor<B, 2>>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let mut dims = x.dims();
    let [k, n] = w.dims();
    let m: usize = dims[..D - 1].iter().product();
    if dims[D - 1] != k || !serves([m, k, n]) {
        return Err(x);
    }
    dims[D - 1] = n;
    match product(reshape(x.clone(), [m, k]), w.clone()) {
        Some(y) => Ok(reshape(y, dims)),
        None => Err(x),
    }
}

/// `c + scale·(x·w)`: a LoRA adapter's update added to the base product. On the CPU
/// backend the product accumulates into `c`'s buffer (no pass of its own for the
/// scale or the sum); elsewhere it is [`matmul`], a scale and a sum.
///
/// # Shapes
/// `c`: `[..., n]`; `x`: `[..., k]` (the same leading dimensions); `w`: `[k, n]` →
/// `[..., n]`.
pub fn matmul_add<B: Backend, const D: usize>(
    c: Tensor<B, D>,
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, D> {
    match cpu::matmul_add(c, x, &w, scale) {
        Ok(y) => y,
        Err((c, x)) => c + matmul(x, w) * scale,
    }
}

/// `a·b` matrix by matrix: the attention products (`q·kᵀ`, `p·v`).
///
/// # Shapes
/// `a`: `[N, m, k]`, `b`: `[N, k, n]` → `[N, m, n]`.
pub fn batched_matmul<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    let a = match cublas::batched_matmul(a, &b) {
        Ok(c) => return c,
        Err(a) => a,
    };
    let a = match cpu::batched_matmul(a, &b) {
        Ok(c) => return c,
        Err(a) => a,
    };
    a.matmul(b)
}

/// How many products cuBLAS has run in this process (always 0 without the `cuda`
/// feature): how a benchmark or test tells which GEMM served it.
pub fn cublas_products() -> u64 {
    #[cfg(feature = "cuda")]
    return cublas::products();
    #[cfg(not(feature = "cuda"))]
    0
}

/// Where the elements of a `[rows, cols]` matrix are, as a BLAS needs to know it.
#[cfg(any(test, feature = "cuda"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Element `(i, j)` at `i·ld + j` (`ld ≥ cols`).
    Rows {
        /// Distance between consecutive rows.
        ld: usize,
    },
    /// Element `(i, j)` at `i + j·ld` (`ld ≥ rows`): a transposed row-major matrix.
    Cols {
        /// Distance between consecutive columns.
        ld: usize,
    },
}

#[cfg(any(test, feature = "cuda"))]
impl Layout {
    /// The layout of a `[rows, cols]` view with these element strides, or `None` when it
    /// is neither (the view must be copied first).
    pub(crate) fn of(shape: [usize; 2], strides: [usize; 2]) -> Option<Self> {
        let [rows, cols] = shape;
        let [s0, s1] = strides;
        if (s1 == 1 || cols <= 1) && (rows <= 1 || s0 >= cols.max(1)) {
            return Some(Self::Rows {
                ld: if rows <= 1 { cols.max(1) } else { s0 },
            });
        }
        if (s0 == 1 || rows <= 1) && (cols <= 1 || s1 >= rows.max(1)) {
            return Some(Self::Cols {
                ld: if cols <= 1 { rows.max(1) } else { s1 },
            });
        }
        None
    }

    /// Whether a column-major BLAS must transpose this operand, and its leading dimension.
    fn blas(self) -> (bool, usize) {
        match self {
            // Read column-major, a row-major matrix is its transpose, which is what the
            // swapped product `Cᵀ = Bᵀ·Aᵀ` wants: no flag.
            Self::Rows { ld } => (false, ld),
            Self::Cols { ld } => (true, ld),
        }
    }
}

/// A column-major GEMM call `C' = op(first)·op(second)` (`C'`: `[m, n]`, leading dimension
/// `ldc`) computing the row-major `C = A·B` (`[rows, cols]` = `[m_A, n_B]`): `first` is
/// `B`, `second` is `A`, `m` is `B`'s columns and `n` is `A`'s rows. Batched, matrix `i`
/// of each operand starts `i·stride` elements after the first (a stride of 0 broadcasts).
#[cfg(any(test, feature = "cuda"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GemmPlan {
    pub transpose_first: bool,
    pub transpose_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
    pub batch: usize,
    pub stride_first: usize,
    pub stride_second: usize,
    pub stride_c: usize,
}

#[cfg(any(test, feature = "cuda"))]
impl GemmPlan {
    /// The call for `A: [m, k]` laid out as `a` times `B: [k, n]` laid out as `b`, into a
    /// contiguous row-major `[m, n]`.
    pub(crate) fn new([m, k, n]: [usize; 3], a: Layout, b: Layout) -> Self {
        let (transpose_first, ld_first) = b.blas();
        let (transpose_second, ld_second) = a.blas();
        Self {
            transpose_first,
            transpose_second,
            m: n,
            n: m,
            k,
            ld_first,
            ld_second,
            ldc: n.max(1),
            batch: 1,
            stride_first: 0,
            stride_second: 0,
            stride_c: 0,
        }
    }

    /// The same product over `batch` pairs of matrices, `A`'s `stride_a` and `B`'s
    /// `stride_b` elements apart, into contiguous `[batch, m, n]`.
    pub(crate) fn batched(self, batch: usize, stride_a: usize, stride_b: usize) -> Self {
        Self {
            batch,
            stride_first: stride_b,
            stride_second: stride_a,
            stride_c: self.m * self.n,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::{Distribution, Tolerance};

    /// What a column-major BLAS computes for a plan (the reference GEMM's definition).
    fn blas_gemm(plan: &GemmPlan, first: &[f32], second: &[f32]) -> Vec<f32> {
        let op = |data: &[f32], transpose: bool, ld: usize, i: usize, j: usize| {
            if transpose {
                data[j + i * ld]
            } else {
                data[i + j * ld]
            }
        };
        let mut c = vec![0.0; plan.stride_c * (plan.batch - 1) + plan.ldc * plan.n];
        for p in 0..plan.batch {
            let (first, second) = (
                &first[p * plan.stride_first..],
                &second[p * plan.stride_second..],
            );
            for j in 0..plan.n {
                for i in 0..plan.m {
                    c[p * plan.stride_c + i + j * plan.ldc] = (0..plan.k)
                        .map(|l| {
                            op(first, plan.transpose_first, plan.ld_first, i, l)
                                * op(second, plan.transpose_second, plan.ld_second, l, j)
                        })
                        .sum();
                }
            }
        }
        c
    }

    /// `matrix` (`[rows, cols]`, row-major) stored with the given layout in a buffer
    /// padded by `pad` per line; returns the buffer and its strides.
    fn store(
        matrix: &[f32],
        [rows, cols]: [usize; 2],
        by_rows: bool,
        pad: usize,
    ) -> (Vec<f32>, [usize; 2]) {
        if by_rows {
            let ld = cols + pad;
            let mut buf = vec![f32::NAN; rows * ld];
            for i in 0..rows {
                buf[i * ld..i * ld + cols].copy_from_slice(&matrix[i * cols..(i + 1) * cols]);
            }
            (buf, [ld, 1])
        } else {
            let ld = rows + pad;
            let mut buf = vec![f32::NAN; cols * ld];
            for i in 0..rows {
                for j in 0..cols {
                    buf[i + j * ld] = matrix[i * cols + j];
                }
            }
            (buf, [1, ld])
        }
    }

    #[test]
    fn every_layout_pair_poses_the_row_major_product() {
        for [m, k, n] in [
            [3, 4, 5],
            [1, 4, 5],
            [3, 1, 5],
            [3, 4, 1],
            [1, 1, 1],
            [6, 2, 2],
        ] {
            let a: Vec<f32> = (0..m * k).map(|v| (v as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|v| (v as f32 * 0.53).cos()).collect();
            let expected: Vec<f32> = (0..m * n)
                .map(|idx| {
                    (0..k)
                        .map(|l| a[(idx / n) * k + l] * b[l * n + idx % n])
                        .sum()
                })
                .collect();
            for (a_rows, b_rows, pad) in [
                (true, true, 0),
                (true, false, 0),
                (false, true, 0),
                (false, false, 0),
                (true, false, 3),
                (false, true, 2),
            ] {
                let (a_buf, a_strides) = store(&a, [m, k], a_rows, pad);
                let (b_buf, b_strides) = store(&b, [k, n], b_rows, pad);
                let la = Layout::of([m, k], a_strides).unwrap();
                let lb = Layout::of([k, n], b_strides).unwrap();
                let plan = GemmPlan::new([m, k, n], la, lb);
                let c = blas_gemm(&plan, &b_buf, &a_buf);
                // C' column-major [n, m] with ldc = n is C row-major [m, n].
                for (got, want) in c.iter().zip(&expected) {
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{m}x{k}x{n} a_rows {a_rows} b_rows {b_rows} pad {pad}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn batched_plans_step_through_the_matrices_and_broadcast_a_zero_stride() {
        let [m, k, n] = [2, 3, 4];
        let a: Vec<f32> = (0..2 * m * k).map(|v| v as f32 - 5.0).collect(); // two A matrices
        let b: Vec<f32> = (0..k * n).map(|v| (v as f32 * 0.5).cos()).collect(); // one B, shared
        // B stored transposed (a `kᵀ` view), A row-major.
        let (b_buf, b_strides) = store(&b, [k, n], false, 0);
        let plan = GemmPlan::new(
            [m, k, n],
            Layout::Rows { ld: k },
            Layout::of([k, n], b_strides).unwrap(),
        )
        .batched(2, m * k, 0);
        let c = blas_gemm(&plan, &b_buf, &a);
        assert_eq!(c.len(), 2 * m * n);
        for p in 0..2 {
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k)
                        .map(|l| a[p * m * k + i * k + l] * b[l * n + j])
                        .sum();
                    assert!((c[p * m * n + i * n + j] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn views_that_are_neither_rows_nor_columns_need_a_copy() {
        assert_eq!(Layout::of([4, 3], [3, 1]), Some(Layout::Rows { ld: 3 }));
        assert_eq!(Layout::of([4, 3], [1, 4]), Some(Layout::Cols { ld: 4 }));
        assert_eq!(Layout::of([4, 3], [8, 1]), Some(Layout::Rows { ld: 8 }));
        assert_eq!(Layout::of([4, 3], [6, 2]), None); // every other column
        assert_eq!(Layout::of([4, 3], [2, 1]), None); // overlapping rows
        assert_eq!(Layout::of([1, 3], [0, 1]), Some(Layout::Rows { ld: 3 })); // broadcast row
    }

    #[test]
    fn batched_matmul_is_burns_on_the_cpu() {
        let device = Default::default();
        let a = Tensor::<TestBackend, 3>::random([3, 4, 8], Distribution::Default, &device);
        let b = Tensor::<TestBackend, 3>::random([3, 8, 5], Distribution::Default, &device);
        let expected = a.clone().matmul(b.clone()).into_data();
        batched_matmul(a, b)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
    }

    #[test]
    fn matmul_is_burns_on_the_cpu() {
        let device = Default::default();
        let x = Tensor::<TestBackend, 3>::random([2, 3, 8], Distribution::Default, &device);
        let w = Tensor::<TestBackend, 2>::random([8, 5], Distribution::Default, &device);
        let expected = x.clone().matmul(w.clone().unsqueeze::<3>()).into_data();
        matmul(x, w)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
    }
}
