//! `exp` over a slice of f32, vectorised, for the CPU kernels (flash attention, the
//! gated activation, the loss): libm's `expf` is a scalar call per element, and it was
//! a tenth of a CPU training step.
//!
//! Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (ln 2 in two parts, so `r` is
//! exact), a degree-7 polynomial for `eʳ`, and `2ⁿ` built in the exponent bits; within
//! 2 ulp of the true value over the whole range. Written as plain arithmetic on each
//! element (rounding by the 1.5·2²³ trick, no branches), so the compiler vectorises the
//! loop; it is compiled once more for AVX-512 and once for AVX2 + FMA, picked at run
//! time. The result depends only on the input, never on the path taken, up to the FMA
//! contraction the compiler does not make: the three builds give the same bits.

/// Below this, `eˣ` is under f32's smallest normal number: 0 is returned.
const LOW: f32 = -87.336_55;
/// Above this, `2ⁿ` would overflow the exponent: inputs are clamped here.
const HIGH: f32 = 88.0;

/// `xs[i] ← e^xs[i]`.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { exp_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { exp_avx2(xs) };
        }
    }
    exp_slice(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_avx512(xs: &mut [f32]) {
    exp_slice(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_avx2(xs: &mut [f32]) {
    exp_slice(xs);
}

#[inline(always)]
fn exp_slice(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp(*x);
    }
}

/// `eˣ` (0 below [`LOW`], NaN for NaN).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x > HIGH { HIGH } else { x };
    let clamped = if clamped < LOW { LOW } else { clamped };
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let k = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = clamped - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((k + 127) as u32) << 23);
    let out = y * scale;
    if x < LOW {
        0.0
    } else if x.is_nan() {
        x
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of libm over the range, at the edges, and the same bits on every
    /// path.
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -100.0 + 190.0 * i as f32 / 200_000.0)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            LOW,
            HIGH,
            -1e30,
            f32::NEG_INFINITY,
            1e-30,
        ]);
        let mut ours = xs.clone();
        exp_in_place(&mut ours);
        for (&x, &y) in xs.iter().zip(&ours) {
            let want = x.exp();
            if x < LOW {
                assert_eq!(y, 0.0, "exp({x})");
            } else if x > HIGH {
                assert!(
                    y.is_finite() && y >= HIGH.exp() * 0.999_99,
                    "exp({x}) = {y}"
                );
            } else {
                let ulp = (want.to_bits() as i64 - y.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {y}, libm {want} ({ulp} ulp)");
            }
        }
        assert!(exp(f32::NAN).is_nan());
        let mut plain = xs.clone();
        exp_slice(&mut plain);
        assert_eq!(
            plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
