//! De-chunk smoothing over packed segments, segments in parallel. Up to
//! [`DENSE_MAX`] kept tokens a segment is smoothed with matrix products
//! over the weights of [`dcdit_core::dechunk::kernel_matrix`] (the ones
//! [`dcdit_core::dechunk::smooth`] uses); longer segments, where an `M x M`
//! matrix would not stay in cache, take `smooth` itself, pair by pair.
//!
//! Why: pair by pair, each of the ~26k weighted pairs of an MNIST sample
//! (196 kept tokens) costs a 64-wide multiply-add plus the weight's
//! lookup and normalisation, ~4.6 ms forward and ~8.7 ms backward per
//! training step; as products the same sums run on the GEMM kernels.
//! Results differ from `smooth`'s only in the order of the sums over a
//! row's tokens (f32 rounding).

use dcdit_core::backend::Segments;
use dcdit_core::dechunk::{clamp_p, clamp_passes, kernel_matrix};
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::tensor::CpuTensor;
use crate::util::{check_segments, gemm_serial as product, Mat};

/// Longest segment smoothed with the dense products (three `M x M`
/// matrices of scratch per thread: 3 MiB at 512).
pub(crate) const DENSE_MAX: usize = 512;

/// Per-thread scratch of the dense path.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Kernel weights, then the products' weight matrix.
    k: Vec<f32>,
    /// Row normalisers.
    s: Vec<f32>,
    /// Clamped `p`.
    c: Vec<f32>,
    /// `G H^T` (backward).
    d: Vec<f32>,
    /// `H^T` (backward).
    ht: Vec<f32>,
}

impl Scratch {
    /// Kernel weights and normalisers of a segment, and its clamped `p`.
    fn weights(&mut self, p: &[f32], pos: &[u32], width: usize, sigma: f32) {
        let m = p.len();
        self.k.resize(m * m, 0.0);
        self.s.resize(m, 0.0);
        kernel_matrix(p, pos, width, sigma, &mut self.k, &mut self.s);
        self.c.clear();
        self.c.extend(p.iter().map(|&v| clamp_p(v)));
    }
}

/// [`dcdit_core::dechunk::smooth`] of one segment (`M <= DENSE_MAX`, `d >
/// 0`) as `out = c h + (1 - c) (W h)`, `W_ij = K_ij c_j / s_i` formed as
/// `smooth` forms each weight.
#[allow(clippy::too_many_arguments)]
pub(crate) fn smooth_dense(
    h: &[f32],
    d: usize,
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    out: &mut [f32],
    sc: &mut Scratch,
) {
    let m = p.len();
    sc.weights(p, pos, width, sigma);
    crate::util::simd(|| {
        for (row, &si) in sc.k.chunks_exact_mut(m).zip(&sc.s) {
            for (w, &cj) in row.iter_mut().zip(&sc.c) {
                *w = *w * cj / si;
            }
        }
    });
    // SAFETY: W is m x m, h m x d, out m x d.
    unsafe {
        product(
            m,
            d,
            m,
            Mat::dense(sc.k.as_ptr(), m, false),
            Mat::dense(h.as_ptr(), d, false),
            out,
        )
    };
    for ((oi, hi), &ci) in out.chunks_exact_mut(d).zip(h.chunks_exact(d)).zip(&sc.c) {
        for (o, &x) in oi.iter_mut().zip(hi) {
            *o = ci * x + (1.0 - ci) * *o;
        }
    }
}

/// [`dcdit_core::dechunk::smooth_backward`] of one segment (`M <=
/// DENSE_MAX`, `d > 0`), with its formulas and per-term order for `dp`,
/// the dot products `g_i . h_j` taken from one product `D = G H^T` and
/// `dh = c g + W'^T G` (`W'_ij = c_j K_ij (1 - c_i) / s_i`) from another.
#[allow(clippy::too_many_arguments)]
pub(crate) fn smooth_backward_dense(
    h: &[f32],
    d: usize,
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    g: &[f32],
    gh: &mut [f32],
    gp: &mut [f32],
    sc: &mut Scratch,
) {
    let m = p.len();
    sc.weights(p, pos, width, sigma);
    sc.ht.resize(d * m, 0.0);
    for (j, hj) in h.chunks_exact(d).enumerate() {
        for (e, &v) in hj.iter().enumerate() {
            sc.ht[e * m + j] = v;
        }
    }
    sc.d.resize(m * m, 0.0);
    // SAFETY: g is m x d, H^T d x m, D m x m.
    unsafe {
        product(
            m,
            m,
            d,
            Mat::dense(g.as_ptr(), d, false),
            Mat::dense(sc.ht.as_ptr(), m, false),
            &mut sc.d,
        )
    };
    gp.fill(0.0);
    crate::util::simd(|| {
        for i in 0..m {
            let (si, ci) = (sc.s[i], sc.c[i]);
            let (ki, di) = (&mut sc.k[i * m..(i + 1) * m], &sc.d[i * m..(i + 1) * m]);
            // gamma_i = g_i . s_i = sum_j a_ij (g_i . h_j), in f64 as smooth_backward.
            let mut gamma = 0f64;
            for ((&kv, &dij), &cj) in ki.iter().zip(di).zip(&sc.c) {
                if kv != 0.0 {
                    gamma += ((kv * cj / si) as f64) * (dij as f64);
                }
            }
            let gamma = gamma as f32;
            let f = (1.0 - ci) / si;
            for (j, ((kv, &dij), &cj)) in ki.iter_mut().zip(di).zip(&sc.c).enumerate() {
                if *kv != 0.0 {
                    gp[j] += f * *kv * (dij - gamma);
                    *kv = cj * *kv * f;
                }
            }
            // Through the gate: g_i . (h_i - s_i).
            gp[i] += di[i] - gamma;
        }
    });
    // SAFETY: W'^T is m x m (W' read transposed), g m x d, gh m x d.
    unsafe {
        product(
            m,
            d,
            m,
            Mat::dense(sc.k.as_ptr(), m, true),
            Mat::dense(g.as_ptr(), d, false),
            gh,
        )
    };
    for ((ghj, gj), &cj) in gh.chunks_exact_mut(d).zip(g.chunks_exact(d)).zip(&sc.c) {
        for (o, &v) in ghj.iter_mut().zip(gj) {
            *o += cj * v;
        }
    }
    for (gpj, &pj) in gp.iter_mut().zip(p) {
        if !clamp_passes(pj) {
            *gpj = 0.0;
        }
    }
}

/// Checks the arguments of the smoothing and its backward; returns `(T, d)`.
pub(crate) fn check_dechunk_args(
    op: &str,
    h: &CpuTensor,
    p: &CpuTensor,
    pos: &[u32],
    width: usize,
    seg: Segments,
) -> Result<(usize, usize)> {
    let (t, d) = h.dims2();
    check_segments(op, seg, t)?;
    if p.numel() != t || pos.len() != t {
        return Err(Error::input(format!(
            "{op}: h {:?} has {t} rows but p has shape {:?} and pos {} entries",
            h.shape(),
            p.shape(),
            pos.len()
        )));
    }
    if width == 0 && t > 0 {
        return Err(Error::input(format!("{op}: grid width must be positive")));
    }
    Ok((t, d))
}

/// Distance-weighted smoothing (SPEC 3) of `h (T, d)` with `p (T, 1)`.
pub(crate) fn dechunk_smooth(
    h: &CpuTensor,
    p: &CpuTensor,
    pos: &[u32],
    width: usize,
    sigma: f32,
    seg: Segments,
) -> Result<CpuTensor> {
    let (t, d) = check_dechunk_args("dechunk_smooth", h, p, pos, width, seg)?;
    let hs = h.to_f32_cow();
    let ps = p.to_f32_cow();
    let (hs, ps) = (&*hs, &*ps);
    let mut out = crate::pool::take_zeroed(t * d);
    // Disjoint output slices, one per segment.
    let mut parts: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(seg.len());
    let mut rest: &mut [f32] = &mut out;
    for w in seg.windows(2) {
        let (a, b) = (w[0], w[1]);
        let (head, tail) = rest.split_at_mut((b - a) * d);
        rest = tail;
        if b > a {
            parts.push((a, b, head));
        }
    }
    // Lengths and `width > 0` are checked above, so `smooth` cannot panic.
    let run = |sc: &mut Scratch, (a, b, dst): &mut (usize, usize, &mut [f32])| {
        let (a, b) = (*a, *b);
        if b - a <= DENSE_MAX && d > 0 {
            let (hseg, pseg) = (&hs[a * d..b * d], &ps[a..b]);
            smooth_dense(hseg, d, pseg, &pos[a..b], width, sigma, dst, sc);
            return;
        }
        dcdit_core::dechunk::smooth(
            &hs[a * d..b * d],
            d,
            &ps[a..b],
            &pos[a..b],
            width,
            sigma,
            dst,
        );
    };
    if parts.len() <= 1 {
        let mut sc = Scratch::default();
        parts.iter_mut().for_each(|part| run(&mut sc, part));
    } else {
        parts
            .par_iter_mut()
            .with_max_len(1)
            .for_each_init(Scratch::default, run);
    }
    Ok(CpuTensor::from_result(out, h.shape(), h.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};

    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) -> std::result::Result<(), String> {
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            let err = (a - b).abs();
            if err.is_nan() || err > tol * scale {
                return Err(format!("{what}[{i}]: {a} vs {b}"));
            }
        }
        Ok(())
    }

    /// The dense path against `dcdit_core::dechunk`'s pair-by-pair
    /// `smooth` and `smooth_backward` on one segment: random kept positions
    /// (sorted, as the model keeps them, or not), `p` across and outside the
    /// clamp, widths 1-80 (the products' narrow and 64-wide paths), one to
    /// 300 tokens, sigma up to 3.
    #[test]
    fn dense_matches_the_pair_by_pair_smoothing() {
        fn prop(seed: u64, m: u16, d: u8, side: u8, sigma: u8, sorted: bool) -> TestResult {
            let (m, d) = (m as usize % 300 + 1, d as usize % 80 + 1);
            let width = side as usize % 30 + 1;
            let sigma = 0.5 + (sigma % 6) as f32 * 0.5;
            let r = crate::util::test_data(m * (2 * d + 2), seed);
            let (h, rest) = r.split_at(m * d);
            let (g, rest) = rest.split_at(m * d);
            // p in [-0.1, 1.1]: some below and above the clamp.
            let p: Vec<f32> = rest[..m].iter().map(|v| 0.5 + 0.6 * v).collect();
            let mut pos: Vec<u32> = rest[m..]
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * (width * width) as f32) as u32)
                .collect();
            if sorted {
                pos.sort_unstable();
            }
            let mut sc = Scratch::default();
            let (mut want, mut got) = (vec![0.0; m * d], vec![f32::NAN; m * d]);
            dcdit_core::dechunk::smooth(h, d, &p, &pos, width, sigma, &mut want);
            smooth_dense(h, d, &p, &pos, width, sigma, &mut got, &mut sc);
            if let Err(e) = close("forward", &got, &want, 1e-5) {
                return TestResult::error(e);
            }
            let (mut gh, mut gp) = (vec![0.0; m * d], vec![0.0; m]);
            dcdit_core::dechunk::smooth_backward(h, d, &p, &pos, width, sigma, g, &mut gh, &mut gp);
            let (mut gh2, mut gp2) = (vec![f32::NAN; m * d], vec![f32::NAN; m]);
            smooth_backward_dense(h, d, &p, &pos, width, sigma, g, &mut gh2, &mut gp2, &mut sc);
            match close("dh", &gh2, &gh, 1e-5).and(close("dp", &gp2, &gp, 1e-5)) {
                Ok(()) => TestResult::passed(),
                Err(e) => TestResult::error(e),
            }
        }
        QuickCheck::new()
            .tests(150)
            .quickcheck(prop as fn(u64, u16, u8, u8, u8, bool) -> TestResult);
    }
}
