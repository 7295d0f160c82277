//! Vectorisable transcendental kernels over slices: a branch-free `exp`
//! (Cephes `expf` polynomial, within ~2 ulp of the correctly rounded value
//! on the normal range) used by softmax, SiLU, sigmoid and tanh-GELU. The
//! slice loops are compiled twice on x86-64 (baseline SSE2 and AVX2) and
//! picked at run time.

use dcdit_core::backend::Unary;

use crate::util::simd_kernel;

/// Below this, `exp` returns 0 (`exp(LO)` is the smallest normal f32).
pub(crate) const EXP_LO: f32 = -87.336_55;
/// Above this, `exp` saturates at `exp(EXP_HI)` (~2.4e38).
pub(crate) const EXP_HI: f32 = 88.376_26;

/// Branch-free `exp` for f32 (NaN propagates; below `EXP_LO` gives 0).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(EXP_LO, EXP_HI); // NaN stays NaN
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * C1 - n * C2;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 0.166_666_65;
    y = y * r + 0.5;
    y = y * r * r + r + 1.0;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let pow2 = f32::from_bits(((ni + 127) << 23) as u32);
    if x < EXP_LO {
        0.0
    } else {
        y * pow2
    }
}

/// `1 / (1 + exp(-x))`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, with
/// `1 + tanh(z) = 2 - 2 / (exp(2z) + 1)`.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2 / pi)
    let z = K * (x + 0.044715 * x * x * x);
    let e = exp(2.0 * z);
    // 1 + tanh(z); exact limits when e over/underflows.
    let one_plus_tanh = 2.0 - 2.0 / (e + 1.0);
    0.5 * x * one_plus_tanh
}

#[inline(always)]
fn unary_generic(op: Unary, src: &[f32], dst: &mut [f32]) {
    match op {
        Unary::Silu => {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = v * sigmoid(v);
            }
        }
        Unary::Sigmoid => {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = sigmoid(v);
            }
        }
        Unary::GeluTanh => {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = gelu_tanh(v);
            }
        }
    }
}

/// `d op(x) / dx`, from the forward input.
#[inline(always)]
fn unary_grad(op: Unary, x: f32) -> f32 {
    match op {
        Unary::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Unary::Sigmoid => {
            let s = sigmoid(x);
            s * (1.0 - s)
        }
        Unary::GeluTanh => {
            const K: f32 = 0.797_884_6; // sqrt(2 / pi)
            let z = K * (x + 0.044715 * x * x * x);
            let e = exp(2.0 * z);
            let r = 2.0 / (e + 1.0);
            // 1 + tanh(z) = 2 - r and 1 - tanh(z)^2 = r (2 - r), both exact
            // in the limits (r = 0 or 2).
            let one_plus_tanh = 2.0 - r;
            let sech2 = r * one_plus_tanh;
            0.5 * one_plus_tanh + 0.5 * x * sech2 * K * (1.0 + 3.0 * 0.044715 * x * x)
        }
    }
}

#[inline(always)]
fn unary_backward_generic(op: Unary, x: &[f32], g: &[f32], dst: &mut [f32]) {
    match op {
        Unary::Silu => {
            for ((o, &v), &gv) in dst.iter_mut().zip(x).zip(g) {
                *o = gv * unary_grad(Unary::Silu, v);
            }
        }
        Unary::Sigmoid => {
            for ((o, &v), &gv) in dst.iter_mut().zip(x).zip(g) {
                *o = gv * unary_grad(Unary::Sigmoid, v);
            }
        }
        Unary::GeluTanh => {
            for ((o, &v), &gv) in dst.iter_mut().zip(x).zip(g) {
                *o = gv * unary_grad(Unary::GeluTanh, v);
            }
        }
    }
}

/// Largest element of a row (NaN ignored; -inf when empty or all -inf).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        if v > max {
            max = v;
        }
    }
    max
}

/// The shift subtracted before `exp`: the running max, or 0 while every score
/// so far is -inf (then `exp(x - 0)` is 0, or NaN for NaN, like torch).
#[inline(always)]
fn shift_of(m: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        0.0
    } else {
        m
    }
}

/// One step of the streaming (online) softmax over a block of a row's
/// scores: with `m` and `l` the running max and sum of `exp(s - m)` over the
/// blocks before, sets `m` to the max including this block, turns the block
/// into `exp(s - m)`, rescales `l` and adds the block's sum; `alpha =
/// exp(m_old - m_new)` is what earlier partial results must be scaled by.
#[inline(always)]
fn softmax_online_generic(row: &mut [f32], m: &mut f32, l: &mut f32, alpha: &mut f32) {
    let mx = row_max(row);
    let m_new = if mx > *m { mx } else { *m };
    let shift = shift_of(m_new);
    *alpha = exp(*m - shift);
    for v in row.iter_mut() {
        *v = exp(*v - shift);
    }
    *l = *l * *alpha + crate::util::sum(row);
    *m = m_new;
}

/// Softmax probabilities of a block of a row from its final statistics:
/// `exp(s - m) * inv_l`.
#[inline(always)]
fn softmax_probs_generic(row: &mut [f32], m: f32, inv_l: f32) {
    let shift = shift_of(m);
    for v in row.iter_mut() {
        *v = exp(*v - shift) * inv_l;
    }
}

/// A whole row's softmax: one online step from empty statistics, then the
/// normalisation (so a one-block streaming softmax gives the same bits).
#[inline(always)]
fn softmax_generic(row: &mut [f32]) {
    let (mut m, mut l, mut alpha) = (f32::NEG_INFINITY, 0.0, 0.0);
    softmax_online_generic(row, &mut m, &mut l, &mut alpha);
    let inv = 1.0 / l;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

simd_kernel! {
    /// `dst[i] = op(src[i])` (equal lengths).
    pub(crate) fn unary_slice / unary_slice_at(op: Unary, src: &[f32], dst: &mut [f32]) = unary_generic;
}

simd_kernel! {
    /// `dst[i] = g[i] * op'(x[i])` (equal lengths): the gradient of
    /// [`unary_slice`] from its input.
    pub(crate) fn unary_backward_slice / unary_backward_slice_at(op: Unary, x: &[f32], g: &[f32], dst: &mut [f32]) = unary_backward_generic;
}

simd_kernel! {
    /// In-place numerically stable softmax of a row (subtracts the row max).
    pub(crate) fn softmax / softmax_at(row: &mut [f32]) = softmax_generic;
}

simd_kernel! {
    /// One streaming-softmax step over a block of a row's scores (see
    /// `softmax_online_generic`).
    pub(crate) fn softmax_online / softmax_online_at(row: &mut [f32], m: &mut f32, l: &mut f32, alpha: &mut f32) = softmax_online_generic;
}

simd_kernel! {
    /// `exp(s - m) * inv_l` over a block of a row (see `softmax_probs_generic`).
    pub(crate) fn softmax_probs / softmax_probs_at(row: &mut [f32], m: f32, inv_l: f32) = softmax_probs_generic;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0) > 1e38);
    }

    #[test]
    fn gelu_and_sigmoid_limits() {
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert_eq!(gelu_tanh(100.0), 100.0);
        assert_eq!(gelu_tanh(-100.0), 0.0);
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(200.0), 1.0);
        assert!(sigmoid(-200.0) < 1e-37);
        assert!(gelu_tanh(f32::NAN).is_nan());
    }

    /// Every SIMD level gives the baseline's bits (NaN's sign aside): the
    /// kernels are one Rust body compiled per level, without fast-math or FMA
    /// contraction.
    #[test]
    fn simd_levels_match_the_baseline() {
        use crate::util::Level;
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0
        };
        let mut x: Vec<f32> = (0..1037).map(|_| next()).collect();
        x.extend([
            0.0,
            -0.0,
            88.5,
            -90.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        let g: Vec<f32> = x.iter().map(|v| v * 0.37 - 1.0).collect();
        for op in [Unary::Silu, Unary::GeluTanh, Unary::Sigmoid] {
            let mut base = vec![0.0; x.len()];
            unary_slice_at(Level::Base, op, &x, &mut base);
            let mut base_b = vec![0.0; x.len()];
            unary_backward_slice_at(Level::Base, op, &x, &g, &mut base_b);
            for level in [Level::V3, Level::V4] {
                let mut y = vec![0.0; x.len()];
                unary_slice_at(level, op, &x, &mut y);
                let mut yb = vec![0.0; x.len()];
                unary_backward_slice_at(level, op, &x, &g, &mut yb);
                for i in 0..x.len() {
                    assert!(same(y[i], base[i]), "{op:?} {level:?} x={}", x[i]);
                    assert!(same(yb[i], base_b[i]), "{op:?}' {level:?} x={}", x[i]);
                }
            }
        }
        let row: Vec<f32> = x[..1037].to_vec();
        let mut base = row.clone();
        softmax_at(Level::Base, &mut base);
        for level in [Level::V3, Level::V4] {
            let mut r = row.clone();
            softmax_at(level, &mut r);
            assert!(
                r.iter().zip(&base).all(|(&a, &b)| same(a, b)),
                "softmax {level:?}"
            );
        }
    }

    #[test]
    fn softmax_rows() {
        let mut r = vec![1.0f32, 2.0, 3.0, -1e30, 0.5, 0.25, 7.0, 1.0, 2.0, 3.0];
        softmax(&mut r);
        let z: f32 = r.iter().sum();
        assert!((z - 1.0).abs() < 1e-6);
        assert_eq!(r[3], 0.0);
        let mut nan = vec![1.0f32, f32::NAN];
        softmax(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
    }
}
