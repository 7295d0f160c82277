//! Fixed embeddings: the sinusoidal timestep features fed to the timestep MLP
//! (SPEC 1.2) and the 2D sin-cos position table of the main network (SPEC 1.7).

use crate::{Error, Result};

/// `-ln(10000)` as the release's python float, converted to an f32 operand.
const NEG_LN_MAX_PERIOD: f32 = -9.210_340_371_976_184_f64 as f32;

/// Sinusoidal timestep features of width `out.len()` (the release's
/// `TimestepEmbedder.timestep_embedding`, `max_period = 10000`):
/// with `half = dim / 2`, `f_k = exp(-ln(10000) * k / half)`,
/// `out = [cos(t f_0..f_{half-1}), sin(t f_0..f_{half-1})]`, and a trailing
/// zero if `dim` is odd.
///
/// Computed in f32 in torch's order: `(-ln 10000 as f32) * k` rounded, then
/// `/ half`, then `exp`; `args = t * f_k` in f32; each transcendental is
/// correctly rounded to f32.
pub fn timestep_features(t: f32, out: &mut [f32]) {
    let dim = out.len();
    let half = dim / 2;
    for k in 0..half {
        let e = NEG_LN_MAX_PERIOD * (k as f32) / (half as f32);
        // exp/cos/sin evaluated in f64 and rounded once: the correctly rounded
        // f32 result (torch's SLEEF/CUDA versions are within 1-2 ulp of it;
        // libm's f32 versions are less often exact).
        let f = libm::exp(e as f64) as f32;
        let arg = (t * f) as f64;
        out[k] = libm::cos(arg) as f32;
        out[half + k] = libm::sin(arg) as f32;
    }
    if dim % 2 == 1 {
        out[dim - 1] = 0.0;
    }
}

/// The MAE 2D sin-cos position table, `height * width` rows of `dim` (row-major
/// by raster position). The first `dim/2` channels encode the column, the
/// last `dim/2` the row; each half is `[sin(x w_k), cos(x w_k)]` for
/// `k < dim/4`, `w_k = 1 / 10000^(k / (dim/4))`, computed in f64 and rounded to
/// f32 as the release's numpy code (which is square-only; this accepts any
/// `height x width`).
///
/// Errors if `dim` is not a multiple of 4 (the release asserts the halves are
/// even) or `out` is not `height * width * dim` long.
pub fn pos_embed_2d(dim: usize, height: usize, width: usize, out: &mut [f32]) -> Result<()> {
    if !dim.is_multiple_of(4) {
        return Err(Error::input("pos_embed_2d: dim must be a multiple of 4"));
    }
    if out.len() != height * width * dim {
        return Err(Error::input(
            "pos_embed_2d: out must be height*width*dim long",
        ));
    }
    let q = dim / 4;
    for (i, row) in out.chunks_exact_mut(dim.max(1)).enumerate() {
        if dim == 0 {
            break;
        }
        let (r, c) = ((i / width) as f64, (i % width) as f64);
        for k in 0..q {
            // numpy: omega = arange(q) / (dim/2 / 2.); omega = 1. / 10000**omega
            let omega = 1.0 / libm::pow(10000.0, k as f64 / q as f64);
            let (xc, xr) = (c * omega, r * omega);
            row[k] = libm::sin(xc) as f32;
            row[q + k] = libm::cos(xc) as f32;
            row[2 * q + k] = libm::sin(xr) as f32;
            row[3 * q + k] = libm::cos(xr) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn timestep_features_known() {
        // t = 0: cos = 1, sin = 0.
        let mut out = vec![9f32; 8];
        timestep_features(0.0, &mut out);
        assert_eq!(out, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // Odd width gets a trailing zero.
        let mut out = vec![9f32; 5];
        timestep_features(3.0, &mut out);
        assert_eq!(out[4], 0.0);
        // k = 0 has frequency 1: cos(t), sin(t).
        let mut out = vec![0f32; 256];
        timestep_features(999.0, &mut out);
        assert_eq!(out[0], libm::cos(999.0) as f32);
        assert_eq!(out[128], libm::sin(999.0) as f32);
        // Compare with an f64 evaluation of the same formula (f32 rounding of
        // the frequency is amplified by t, so the tolerance scales with t * f).
        for t in [1.0f32, 17.0, 250.0, 999.0] {
            timestep_features(t, &mut out);
            for k in 0..128 {
                let f = libm::exp(-libm::log(10000.0) * k as f64 / 128.0);
                let a = t as f64 * f;
                let tol = 1e-6 + 4.0 * a * f32::EPSILON as f64;
                assert!((out[k] as f64 - libm::cos(a)).abs() <= tol, "t={t} k={k}");
                assert!((out[128 + k] as f64 - libm::sin(a)).abs() <= tol);
            }
        }
        // A value from torch 2.x (float32): timestep_embedding(t=500, dim=256)[0, 1].
        timestep_features(500.0, &mut out);
        assert!((out[1] - 0.945_945_74).abs() < 1e-6, "{}", out[1]);
    }

    #[test]
    fn pos_embed_layout_and_values() {
        assert!(pos_embed_2d(6, 2, 2, &mut [0f32; 24]).is_err());
        assert!(pos_embed_2d(8, 2, 2, &mut [0f32; 31]).is_err());
        let (dim, h, w) = (16usize, 3usize, 5usize);
        let mut out = vec![0f32; h * w * dim];
        pos_embed_2d(dim, h, w, &mut out).unwrap();
        let q = dim / 4;
        for i in 0..h * w {
            let (r, c) = ((i / w) as f64, (i % w) as f64);
            let row = &out[i * dim..(i + 1) * dim];
            for k in 0..q {
                let om = libm::pow(10000.0, -(k as f64) / q as f64);
                assert!((row[k] as f64 - libm::sin(c * om)).abs() < 1e-7);
                assert!((row[q + k] as f64 - libm::cos(c * om)).abs() < 1e-7);
                assert!((row[2 * q + k] as f64 - libm::sin(r * om)).abs() < 1e-7);
                assert!((row[3 * q + k] as f64 - libm::cos(r * om)).abs() < 1e-7);
            }
        }
        // Position (row 0, col 0): sin = 0, cos = 1 in both halves.
        assert_eq!(
            &out[..dim],
            &[0., 0., 0., 0., 1., 1., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1.]
        );
        // Position (row 2, col 1), k = 0 (frequency 1): sin(1), cos(1), sin(2), cos(2).
        let i = 2 * w + 1;
        assert_eq!(out[i * dim], libm::sin(1.0) as f32);
        assert_eq!(out[i * dim + q], libm::cos(1.0) as f32);
        assert_eq!(out[i * dim + 2 * q], libm::sin(2.0) as f32);
        assert_eq!(out[i * dim + 3 * q], libm::cos(2.0) as f32);
        assert!(pos_embed_2d(0, 2, 2, &mut []).is_ok());
    }
}
