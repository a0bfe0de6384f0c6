//! The host side of NF4: quantizing an f32 matrix exactly as bitsandbytes does (see
//! the module above for the arithmetic), and reading the stored codes back.
use super::{DOUBLE_QUANT_BLOCK_SIZE, MIN_ABSMAX, NF4_LEVELS, NF4_MIDPOINTS, ZERO_CODE};
use crate::{Error, Result};

/// Host-side NF4 storage of a `[rows, cols]` weight matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// `[rows, cols]` of the quantized matrix (PyTorch's `[out, in]` for a linear layer).
    pub shape: [usize; 2],
    /// Elements per absmax block.
    pub block_size: usize,
    /// Two codes per byte, first element in the high nibble, row-major;
    /// `ceil(rows·cols / 2)` bytes.
    pub packed: Vec<u8>,
    /// The per-block scales.
    pub absmax: Absmax,
}

/// The per-block absmax of an [`Nf4Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: block `i`'s absmax is
    /// `dynamic_map_8bit()[codes[i]] · scales[i / block_size] + offset`.
    DoubleQuant {
        /// One 8-bit code per block.
        codes: Vec<u8>,
        /// The absmax of `absmax − offset` per `block_size` codes.
        scales: Vec<f32>,
        /// The mean of the absmax, subtracted before quantizing.
        offset: f32,
        /// Codes per scale ([`DOUBLE_QUANT_BLOCK_SIZE`]).
        block_size: usize,
    },
}

impl Nf4Tensor {
    /// Quantizes a row-major `[rows, cols]` matrix as bitsandbytes does, with blocks of
    /// `block_size` elements (64 for QLoRA) over the flattened matrix; the last block may
    /// be partial. With `double_quant`, the absmax are stored in 8 bits as well.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `values.len() != rows·cols`, the matrix is empty,
    /// `block_size` is 0 or odd (blocks must fill whole bytes), or a value is NaN or
    /// infinite.
    pub fn quantize(
        values: &[f32],
        shape: [usize; 2],
        block_size: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let [rows, cols] = shape;
        let numel = rows
            .checked_mul(cols)
            .ok_or_else(|| invalid("shape", format!("{shape:?} overflows")))?;
        if values.len() != numel {
            return Err(invalid(
                "values",
                format!(
                    "{} values for shape {shape:?} ({numel} elements)",
                    values.len()
                ),
            ));
        }
        if numel == 0 {
            return Err(invalid("shape", format!("{shape:?} has no elements")));
        }
        if block_size == 0 || !block_size.is_multiple_of(2) {
            return Err(invalid(
                "block_size",
                format!("{block_size}: must be even and positive"),
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(invalid("values", format!("element {i} is {}", values[i])));
        }

        let mut packed = vec![0u8; numel.div_ceil(2)];
        let mut absmax = Vec::with_capacity(numel.div_ceil(block_size));
        let full_blocks = numel / block_size;
        let blocks = values
            .chunks(block_size)
            .zip(packed.chunks_mut(block_size / 2));
        for (b, (block, out)) in blocks.enumerate() {
            let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if b < full_blocks {
                absmax.push(max);
                let inv = 1.0 / max.max(MIN_ABSMAX);
                pack_codes(block, out, |v| v * inv);
            } else {
                // bitsandbytes' remainder path divides and keeps the clamped absmax.
                let max = max.max(MIN_ABSMAX);
                absmax.push(max);
                pack_codes(block, out, |v| v / max);
            }
        }
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            shape,
            block_size,
            packed,
            absmax,
        })
    }

    /// The `[rows, cols]` matrix back, row-major: `NF4_LEVELS[code] · absmax` in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let numel = self.shape[0] * self.shape[1];
        let absmax = self.absmax_values();
        let mut out = vec![0.0f32; numel];
        for (b, block) in out.chunks_mut(self.block_size.max(1)).enumerate() {
            let scale = absmax.get(b).copied().unwrap_or(0.0);
            let start = b * self.block_size;
            for (j, v) in block.iter_mut().enumerate() {
                let i = start + j;
                let byte = self.packed.get(i / 2).copied().unwrap_or(0);
                let code = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                };
                *v = NF4_LEVELS[usize::from(code)] * scale;
            }
        }
        out
    }

    /// The per-block absmax, decoded when double-quantized (`code · scale + offset` in f32).
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(values) => values.clone(),
            Absmax::DoubleQuant {
                codes,
                scales,
                offset,
                block_size,
            } => {
                let map = dynamic_map_8bit();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let scale = scales.get(i / (*block_size).max(1)).copied().unwrap_or(0.0);
                        map[usize::from(c)] * scale + offset
                    })
                    .collect()
            }
        }
    }

    /// Resident bytes: the packed codes plus the absmax storage (the shared 8-bit code
    /// table of double quantization is not counted).
    pub fn bytes(&self) -> usize {
        let absmax = match &self.absmax {
            Absmax::Plain(values) => 4 * values.len(),
            Absmax::DoubleQuant { codes, scales, .. } => codes.len() + 4 * scales.len() + 4,
        };
        self.packed.len() + absmax
    }
}

/// Writes the codes of `block` (two per byte, first in the high nibble) into `out`,
/// padding an odd tail with the code of 0.
fn pack_codes(block: &[f32], out: &mut [u8], scale: impl Fn(f32) -> f32) {
    for (pair, byte) in block.chunks(2).zip(out.iter_mut()) {
        let hi = nf4_code(scale(pair[0]));
        let lo = pair.get(1).map_or(ZERO_CODE, |&v| nf4_code(scale(v)));
        *byte = (hi << 4) | lo;
    }
}

/// The code of a scaled value: how many midpoints lie strictly below it (after clamping
/// to ±1, which changes no code but mirrors bitsandbytes).
fn nf4_code(x: f32) -> u8 {
    let x = x.clamp(-1.0, 1.0);
    NF4_MIDPOINTS.iter().map(|&m| u8::from(m < x)).sum()
}

/// bitsandbytes' `quantize_blockwise(absmax − mean, blocksize=256)` with the dynamic
/// 8-bit code.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_mean(absmax);
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, scales) = quantize_8bit(&centred, DOUBLE_QUANT_BLOCK_SIZE);
    Absmax::DoubleQuant {
        codes,
        scales,
        offset,
        block_size: DOUBLE_QUANT_BLOCK_SIZE,
    }
}

/// Blockwise 8-bit quantization to [`dynamic_map_8bit`] as bitsandbytes' CPU kernel
/// (`quantize_cpu`) computes it: the codes and the absmax of each block.
fn quantize_8bit(values: &[f32], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let map = dynamic_map_8bit();
    let mut midpoints = [0.0f32; 255];
    for (i, m) in midpoints.iter_mut().enumerate() {
        *m = 0.5 * (map[i] + map[i + 1]);
    }
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(block_size));
    for block in values.chunks(block_size.max(1)) {
        let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(scale);
        if scale == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / scale;
        codes.extend(block.iter().map(|&v| lut_code(&midpoints, v * inv)));
    }
    (codes, scales)
}

/// The code bitsandbytes' CPU lookup table gives a normalised value: its bin is
/// `trunc(fma((v + 1)·0.5, 65535, 0.5))` (the compiled kernel fuses this multiply-add),
/// and a bin holds the first code whose upper midpoint is not below the bin's centre
/// `−1 + 2i/65535`.
fn lut_code(midpoints: &[f32; 255], v: f32) -> u8 {
    const LAST_BIN: f32 = 65535.0;
    let v = v.clamp(-1.0, 1.0);
    let bin = ((v + 1.0) * 0.5).mul_add(LAST_BIN, 0.5).trunc();
    let centre = -1.0 + (2.0 * bin) / LAST_BIN;
    // At most 255, the number of midpoints.
    midpoints.partition_point(|&m| m < centre) as u8
}

/// bitsandbytes' `create_dynamic_map(signed=True)` (the default 8-bit code, used for double
/// quantization): for each exponent `e = 0..7`, the midpoints of `linspace(0.1, 1, 2^e + 1)`
/// times `±10^(e−6)`, plus 0 and 1, sorted. Computed in f32 the way PyTorch's CPU kernels
/// do it (its `linspace` fuses `start + step·i` into one rounding).
pub fn dynamic_map_8bit() -> [f32; 256] {
    let mut data = Vec::with_capacity(256);
    for e in 0..7 {
        let steps = (1usize << e) + 1;
        let bounds = torch_linspace(0.1f64 as f32, 1.0, steps);
        // Python's `10 ** (e - 6)` (correctly rounded), then cast to f32 by the tensor op.
        let scale = (1.0 / 10f64.powi(6 - e)) as f32;
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0.0f32; 256];
    for (m, v) in map.iter_mut().zip(data) {
        *m = v;
    }
    map
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up
/// from `start`, the second half down from `end`, each a fused multiply-add.
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps.saturating_sub(1).max(1)) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// Lanes of PyTorch's `Vectorized<float>` in its AVX2 kernels.
const LANES: usize = 8;

/// `tensor.mean()` of f32 values as PyTorch's CPU kernel computes it: `sum / n`, the sum in
/// f32 over 8-lane vectors (four interleaved accumulators, cascaded every 16 or more
/// steps), the tail elements first, then the lanes in order. Exact for fewer than 32768
/// values; beyond that PyTorch splits the sum over its threads, which can move the last
/// bit.
pub(super) fn torch_mean(values: &[f32]) -> f32 {
    let n = values.len();
    if n == 0 {
        return f32::NAN;
    }
    let sum = if n >= LANES {
        let vectors = n / LANES;
        let lanes = row_sum::<LANES>(vectors, |i| {
            let mut v = [0.0; LANES];
            v.copy_from_slice(&values[i * LANES..(i + 1) * LANES]);
            v
        });
        let tail = values[vectors * LANES..]
            .iter()
            .fold(0.0f32, |acc, &v| acc + v);
        lanes.iter().fold(tail, |acc, &v| acc + v)
    } else {
        row_sum::<1>(n, |i| [values[i]])[0]
    };
    // The output starts at 0 and the sum is added to it.
    (0.0 + sum) / n as f32
}

/// PyTorch's `row_sum`: four interleaved partial sums, the leftover rows into the first,
/// then the partials added in order.
fn row_sum<const W: usize>(size: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partials = multi_row_sum::<W, ILP>(rows, |i, k| load(i * ILP + k));
    for i in rows * ILP..size {
        add(&mut partials[0], &load(i));
    }
    let mut sum = partials[0];
    for partial in &partials[1..] {
        add(&mut sum, partial);
    }
    sum
}

/// PyTorch's `multi_row_sum`: `R` running sums over `size` rows, with four cascade levels
/// that fold every `2^p` rows (`p = max(4, ceil_log2(size) / 4)`) into the next level.
fn multi_row_sum<const W: usize, const R: usize>(
    size: usize,
    load: impl Fn(usize, usize) -> [f32; W],
) -> [[f32; W]; R] {
    const LEVELS: usize = 4;
    let power = (ceil_log2(size) / 4).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0.0f32; W]; R]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, above) = acc.split_at_mut(j);
            for (lower, upper) in below[j - 1].iter_mut().zip(above[0].iter_mut()) {
                add(upper, lower);
                *lower = [0.0; W];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    for row in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &load(row, k));
        }
    }
    let mut out = acc[0];
    for level in &acc[1..] {
        for (o, l) in out.iter_mut().zip(level) {
            add(o, l);
        }
    }
    out
}

/// `ceil(log2(x))`, with 1 for `x <= 2` (PyTorch's `utils::CeilLog2`).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// Lane-wise `a += b`.
fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

fn invalid(name: &'static str, message: String) -> Error {
    Error::InvalidInput { name, message }
}
