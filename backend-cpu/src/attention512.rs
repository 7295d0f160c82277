//! Fused attention on AVX-512 register blocks for head widths of 16, 32, 48
//! or 64 (one to four zmm per row) and segments of up to [`MAX_KEYS`]
//! tokens: the forward and the backward of [`crate::attention`] for the
//! shapes both models use.
//!
//! Why: at the MNIST model's head width (16) a (segment, head) is two
//! 195x195x16 products, which the `gemm` crate ran at 60-85 GFLOP/s (it
//! packs both operands per call, and a reduction of 16 leaves its register
//! block mostly loading and storing). Here a task packs `K^T` (and `V^T` in
//! the backward) once, and blocks of `R` query rows run every product from
//! registers, a whole row of scores staying in L1:
//!
//! * scores `S = scale Q K^T`: `R x 32` accumulators, one step per head
//!   column (two zmm of `K^T`, `R` broadcasts of `Q`);
//! * `P V`, `dS K`: `R x hd` accumulators, one step per key (the key's row of
//!   `V` or `K`, `R` broadcasts of `P`);
//! * `dV += P^T dO`, `dK += dS^T Q` (backward): the `R` rows of `dO` / `Q` held
//!   in registers, each key's row of `dV` / `dK` loaded, updated by `R` FMAs
//!   and stored.
//!
//! The softmax runs over whole rows with [`crate::math`]'s `exp` in 16
//! lanes (the same NaN and `-inf` handling). The module exists on x86-64 only.

// The register blocks index several arrays in lockstep by row and vector.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::util::SyncPtr;

/// Longest segment handled (scores of a block of rows: `R x MAX_KEYS`
/// floats, 16 KiB at `R = 8`); longer ones take the streaming softmax of
/// [`crate::attention`].
pub(crate) const MAX_KEYS: usize = 512;

/// Whether the fused kernels serve head width `hd` and segments of up to
/// `longest` tokens on this CPU (AVX-512, and not `DCDIT_ATTENTION512=0`).
pub(crate) fn applies(hd: usize, longest: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    hd.is_multiple_of(16)
        && (16..=64).contains(&hd)
        && longest <= MAX_KEYS
        && crate::util::simd_level() == crate::util::Level::V4
        && !*OFF.get_or_init(|| std::env::var_os("DCDIT_ATTENTION512").is_some_and(|v| v == "0"))
}

/// The packed operands of one `(segment, head)`.
struct Seg {
    /// Row of `qkv` where the segment starts.
    r0: usize,
    /// Tokens.
    n: usize,
    /// Column offsets of the head's q, k and v in a `qkv` row.
    qoff: usize,
    koff: usize,
    voff: usize,
}

/// Per-thread scratch: `K^T`, `V^T` (`hd x np`) and two `R x np` row blocks.
#[derive(Default)]
struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
}

/// `n` rounded up to whole zmm.
fn padded(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// `dst[c * np + j] = src[j * ld + c]` for `c < hd`, `j < n`; zero for
/// `n <= j < np`.
///
/// # Safety
/// `src` must be readable at `j * ld + c` for those `j`, `c`.
unsafe fn transpose(
    src: *const f32,
    ld: usize,
    n: usize,
    hd: usize,
    np: usize,
    dst: &mut Vec<f32>,
) {
    dst.clear();
    dst.resize(hd * np, 0.0);
    for j in 0..n {
        let row = std::slice::from_raw_parts(src.add(j * ld), hd);
        for (c, &v) in row.iter().enumerate() {
            dst[c * np + j] = v;
        }
    }
}

/// `s[r * np + j] = scale * sum_c a_r[c] kt[c * np + j]` for `r < R`,
/// `j < np` (`np` a multiple of 16).
///
/// # Safety
/// AVX-512F; each `a[r]` readable for `hd` floats, `kt` for `hd * np`, `s`
/// writable for `R * np`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores<const R: usize>(
    a: &[*const f32; R],
    hd: usize,
    kt: *const f32,
    np: usize,
    scale: f32,
    s: *mut f32,
) {
    let sc = _mm512_set1_ps(scale);
    let mut j = 0;
    while j + 32 <= np {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for c in 0..hd {
            let k0 = _mm512_loadu_ps(kt.add(c * np + j));
            let k1 = _mm512_loadu_ps(kt.add(c * np + j + 16));
            for r in 0..R {
                let b = _mm512_set1_ps(*a[r].add(c));
                lo[r] = _mm512_fmadd_ps(b, k0, lo[r]);
                hi[r] = _mm512_fmadd_ps(b, k1, hi[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(s.add(r * np + j), _mm512_mul_ps(lo[r], sc));
            _mm512_storeu_ps(s.add(r * np + j + 16), _mm512_mul_ps(hi[r], sc));
        }
        j += 32;
    }
    if j < np {
        let mut lo = [_mm512_setzero_ps(); R];
        for c in 0..hd {
            let k0 = _mm512_loadu_ps(kt.add(c * np + j));
            for r in 0..R {
                lo[r] = _mm512_fmadd_ps(_mm512_set1_ps(*a[r].add(c)), k0, lo[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(s.add(r * np + j), _mm512_mul_ps(lo[r], sc));
        }
    }
}

/// `dst[r][..16 HV] = f[r] * sum_{j < n} p[r * np + j] v[j * ldv..][..16 HV]`
/// for `r < rows` (rows `rows..R` of `p` are read but not stored).
///
/// # Safety
/// AVX-512F; `p` readable for `R * np`, `v` for `n` rows of `16 HV` at
/// stride `ldv`, `dst[r]` writable for `16 HV` floats (`r < rows`).
#[inline]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_times<const HV: usize, const R: usize>(
    p: *const f32,
    np: usize,
    n: usize,
    v: *const f32,
    ldv: usize,
    dst: &[*mut f32; R],
    rows: usize,
    f: &[f32; R],
) {
    let mut acc = [[_mm512_setzero_ps(); HV]; R];
    for j in 0..n {
        let vj: [__m512; HV] = std::array::from_fn(|h| _mm512_loadu_ps(v.add(j * ldv + 16 * h)));
        for r in 0..R {
            let b = _mm512_set1_ps(*p.add(r * np + j));
            for h in 0..HV {
                acc[r][h] = _mm512_fmadd_ps(b, vj[h], acc[r][h]);
            }
        }
    }
    for r in 0..rows.min(R) {
        let fr = _mm512_set1_ps(f[r]);
        for h in 0..HV {
            _mm512_storeu_ps(dst[r].add(16 * h), _mm512_mul_ps(acc[r][h], fr));
        }
    }
}

/// `dst[j * ldd..][..16 HV] += sum_{r < rows} p[r * np + j] x_r` for
/// `j < n`: a rank-`R` update of `n` rows (`dV += P^T dO`, `dK += dS^T Q`).
///
/// # Safety
/// AVX-512F; `p` readable for `R * np`, `x[r]` for `16 HV` floats
/// (`r < rows`), `dst` readable and writable for `n` rows at stride `ldd`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn add_rank<const HV: usize, const R: usize>(
    p: *const f32,
    np: usize,
    n: usize,
    x: &[*const f32; R],
    rows: usize,
    dst: *mut f32,
    ldd: usize,
) {
    // Rows past `rows` are zero: they add nothing whatever `p` holds there
    // (the callers zero those rows of `p` too, so no 0 * inf).
    let xr: [[__m512; HV]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|h| {
            if r < rows {
                _mm512_loadu_ps(x[r].add(16 * h))
            } else {
                _mm512_setzero_ps()
            }
        })
    });
    for j in 0..n {
        let d = dst.add(j * ldd);
        let mut acc: [__m512; HV] = std::array::from_fn(|h| _mm512_loadu_ps(d.add(16 * h)));
        for r in 0..R {
            let b = _mm512_set1_ps(*p.add(r * np + j));
            for h in 0..HV {
                acc[h] = _mm512_fmadd_ps(b, xr[r][h], acc[h]);
            }
        }
        for h in 0..HV {
            _mm512_storeu_ps(d.add(16 * h), acc[h]);
        }
    }
}

/// `exp` of 16 lanes: [`crate::math::exp`]'s range reduction and Cephes
/// polynomial (FMAs instead of separate roundings: within the same ~2 ulp),
/// 0 below `EXP_LO`, NaN kept.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp16(x: __m512) -> __m512 {
    use crate::math::{EXP_HI, EXP_LO};
    // NaN is the second operand of min / max, which they return.
    let xc = _mm512_min_ps(
        _mm512_set1_ps(EXP_HI),
        _mm512_max_ps(_mm512_set1_ps(EXP_LO), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    y = _mm512_fmadd_ps(
        _mm512_mul_ps(y, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
    _mm512_maskz_mov_ps(!below, _mm512_scalef_ps(y, n))
}

/// Mask of the first `k < 16` lanes.
#[inline(always)]
fn tail(k: usize) -> __mmask16 {
    ((1u32 << k) - 1) as __mmask16
}

/// Turns a row of `n` scores into `exp(s - max)` and returns the sum, as
/// [`crate::math::softmax_online_generic`] from empty statistics: NaN is
/// left out of the max, a row of `-inf` gives zeros.
///
/// # Safety
/// AVX-512F; `row` readable and writable for `n` floats.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_row(row: *mut f32, n: usize) -> f32 {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut mx = ninf;
    let mut j = 0;
    while j + 16 <= n {
        // max(v, acc) keeps acc where v is NaN.
        mx = _mm512_max_ps(_mm512_loadu_ps(row.add(j)), mx);
        j += 16;
    }
    if j < n {
        mx = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, tail(n - j), row.add(j)), mx);
    }
    let m = _mm512_reduce_max_ps(mx);
    let shift = _mm512_set1_ps(if m == f32::NEG_INFINITY { 0.0 } else { m });
    let mut sum = _mm512_setzero_ps();
    let mut j = 0;
    while j + 16 <= n {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(j)), shift));
        _mm512_storeu_ps(row.add(j), e);
        sum = _mm512_add_ps(sum, e);
        j += 16;
    }
    if j < n {
        let k = tail(n - j);
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row.add(j)), shift));
        _mm512_mask_storeu_ps(row.add(j), k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    _mm512_reduce_add_ps(sum)
}

/// `row[j] *= f` for `j < n`.
///
/// # Safety
/// AVX-512F; `row` readable and writable for `n` floats.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scale_row(row: *mut f32, n: usize, f: f32) {
    let fv = _mm512_set1_ps(f);
    let mut j = 0;
    while j < n {
        let k = if n - j >= 16 { !0 } else { tail(n - j) };
        let v = _mm512_maskz_loadu_ps(k, row.add(j));
        _mm512_mask_storeu_ps(row.add(j), k, _mm512_mul_ps(v, fv));
        j += 16;
    }
}

/// `sum_{j < n} a[j] b[j]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut j = 0;
    while j + 16 <= n {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(j)), _mm512_loadu_ps(b.add(j)), acc);
        j += 16;
    }
    if j < n {
        let m = tail(n - j);
        acc = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(m, a.add(j)),
            _mm512_maskz_loadu_ps(m, b.add(j)),
            acc,
        );
    }
    _mm512_reduce_add_ps(acc)
}

/// Pointers to `R` rows starting at `base` (stride `ld`), rows past `rows`
/// repeating the last one (computed, never stored).
fn row_ptrs<const R: usize>(base: *const f32, ld: usize, rows: usize) -> [*const f32; R] {
    std::array::from_fn(|r| base.wrapping_add(r.min(rows - 1) * ld))
}

/// Forward of queries `q0..q1` of one `(segment, head)`: `out` rows
/// `r0 + q0..r0 + q1`, the head's columns.
///
/// # Safety
/// AVX-512F; `xs` holds the segment's rows of `qkv (T, 3d)`, `out` (row
/// stride `d`) is writable at those rows and columns and no other task
/// writes them.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_task<const HV: usize, const R: usize>(
    xs: *const f32,
    d: usize,
    sg: &Seg,
    q0: usize,
    q1: usize,
    scale: f32,
    out: *mut f32,
    buf: &mut Scratch,
) {
    let (hd, c3, n) = (16 * HV, 3 * d, sg.n);
    let np = padded(n);
    let seg = xs.add(sg.r0 * c3);
    transpose(seg.add(sg.koff), c3, n, hd, np, &mut buf.kt);
    buf.s.resize(R * np, 0.0);
    let s = buf.s.as_mut_ptr();
    let mut i = q0;
    while i < q1 {
        let rows = R.min(q1 - i);
        let q = row_ptrs::<R>(seg.add(i * c3 + sg.qoff), c3, rows);
        scores::<R>(&q, hd, buf.kt.as_ptr(), np, scale, s);
        let mut inv = [0.0f32; R];
        for (r, f) in inv.iter_mut().enumerate().take(rows) {
            *f = 1.0 / exp_row(s.add(r * np), n);
        }
        let dst: [*mut f32; R] =
            std::array::from_fn(|r| out.wrapping_add((sg.r0 + i + r) * d + sg.qoff));
        rows_times::<HV, R>(s, np, n, seg.add(sg.voff), c3, &dst, rows, &inv);
        i += rows;
    }
}

/// Backward of one `(segment, head)`: the head's columns of `dqkv` at the
/// segment's rows (q overwritten, k and v accumulated: they must start at
/// zero).
///
/// # Safety
/// AVX-512F; `xs` (`qkv`, row stride `3d`) and `gs` (`dO`, row stride `d`)
/// hold the segment's rows; `dqkv` (row stride `3d`) is writable there and
/// no other task touches the head's columns of those rows.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,fma")]
unsafe fn backward_task<const HV: usize, const R: usize>(
    xs: *const f32,
    gs: *const f32,
    d: usize,
    sg: &Seg,
    scale: f32,
    dqkv: *mut f32,
    buf: &mut Scratch,
) {
    let (hd, c3, n) = (16 * HV, 3 * d, sg.n);
    let np = padded(n);
    let seg = xs.add(sg.r0 * c3);
    let gseg = gs.add(sg.r0 * d + sg.qoff);
    let dseg = dqkv.add(sg.r0 * c3);
    transpose(seg.add(sg.koff), c3, n, hd, np, &mut buf.kt);
    transpose(seg.add(sg.voff), c3, n, hd, np, &mut buf.vt);
    buf.s.resize(R * np, 0.0);
    buf.dp.resize(R * np, 0.0);
    let (p, dp) = (buf.s.as_mut_ptr(), buf.dp.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let rows = R.min(n - i);
        let q = row_ptrs::<R>(seg.add(i * c3 + sg.qoff), c3, rows);
        let g = row_ptrs::<R>(gseg.add(i * d), d, rows);
        // P = softmax(scale Q K^T), dP = dO V^T.
        scores::<R>(&q, hd, buf.kt.as_ptr(), np, scale, p);
        scores::<R>(&g, hd, buf.vt.as_ptr(), np, 1.0, dp);
        for r in 0..R {
            let pr = std::slice::from_raw_parts_mut(p.add(r * np), n);
            let dr = std::slice::from_raw_parts_mut(dp.add(r * np), n);
            if r < rows {
                scale_row(pr.as_mut_ptr(), n, 1.0 / exp_row(pr.as_mut_ptr(), n));
                // dS = scale P (dP - rowsum(P dP)).
                let dsum = dot(pr.as_ptr(), dr.as_ptr(), n);
                for (o, &pv) in dr.iter_mut().zip(pr.iter()) {
                    *o = scale * (pv * (*o - dsum));
                }
            } else {
                pr.fill(0.0);
                dr.fill(0.0);
            }
        }
        // dV += P^T dO, dK += dS^T Q, dQ = dS K.
        add_rank::<HV, R>(p, np, n, &g, rows, dseg.add(sg.voff), c3);
        add_rank::<HV, R>(dp, np, n, &q, rows, dseg.add(sg.koff), c3);
        let dq: [*mut f32; R] = std::array::from_fn(|r| dseg.wrapping_add((i + r) * c3 + sg.qoff));
        rows_times::<HV, R>(dp, np, n, seg.add(sg.koff), c3, &dq, rows, &[1.0; R]);
        i += rows;
    }
}

/// The `(segment, head)` pairs of a packed batch, empty segments left out.
fn segs(seg: &[usize], heads: usize, d: usize) -> Vec<Seg> {
    let hd = d / heads;
    let mut v = Vec::with_capacity(seg.len() * heads);
    for w in seg.windows(2) {
        if w[1] > w[0] {
            for h in 0..heads {
                v.push(Seg {
                    r0: w[0],
                    n: w[1] - w[0],
                    qoff: h * hd,
                    koff: d + h * hd,
                    voff: 2 * d + h * hd,
                });
            }
        }
    }
    v
}

/// Packed multi-head attention of `xs = qkv (T, 3d)` into `out (T, d)`
/// (every row of a non-empty segment written). Callers check
/// [`applies`] and the shapes.
pub(crate) fn forward(xs: &[f32], d: usize, heads: usize, seg: &[usize], out: &mut [f32]) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let pairs = segs(seg, heads, d);
    // Enough tasks for the pool: a pair's queries split in blocks when pairs
    // are few (each block packs K^T again, ~1/R of its work).
    let threads = rayon::current_num_threads().max(1);
    let split = (4 * threads).div_ceil(pairs.len().max(1)).max(1);
    let mut tasks = Vec::new();
    for (k, sg) in pairs.iter().enumerate() {
        let per = sg.n.div_ceil(split).div_ceil(8) * 8;
        let mut q0 = 0;
        while q0 < sg.n {
            let q1 = (q0 + per).min(sg.n);
            tasks.push((k, q0, q1));
            q0 = q1;
        }
    }
    let (xp, op) = (xs.as_ptr() as usize, SyncPtr(out.as_mut_ptr()));
    let run = |buf: &mut Scratch, &(k, q0, q1): &(usize, usize, usize)| {
        let xs = xp as *const f32;
        let sg = &pairs[k];
        // SAFETY: `applies` checked AVX-512; rows and columns of the task
        // are inside `xs` / `out` (shapes checked by the caller) and owned
        // by it alone.
        unsafe {
            match hd / 16 {
                1 => forward_task::<1, 8>(xs, d, sg, q0, q1, scale, op.get(), buf),
                2 => forward_task::<2, 8>(xs, d, sg, q0, q1, scale, op.get(), buf),
                3 => forward_task::<3, 6>(xs, d, sg, q0, q1, scale, op.get(), buf),
                _ => forward_task::<4, 6>(xs, d, sg, q0, q1, scale, op.get(), buf),
            }
        }
    };
    tasks
        .par_iter()
        .with_max_len(1)
        .for_each_init(Scratch::default, run);
}

/// Gradient of [`forward`] w.r.t. `qkv`: `dqkv (T, 3d)`, which must be zero
/// on entry, from `gs = dO (T, d)`. One task per `(segment, head)`.
pub(crate) fn backward(
    xs: &[f32],
    gs: &[f32],
    d: usize,
    heads: usize,
    seg: &[usize],
    dqkv: &mut [f32],
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let pairs = segs(seg, heads, d);
    let (xp, gp, op) = (
        xs.as_ptr() as usize,
        gs.as_ptr() as usize,
        SyncPtr(dqkv.as_mut_ptr()),
    );
    let run = |buf: &mut Scratch, sg: &Seg| {
        let (xs, gs) = (xp as *const f32, gp as *const f32);
        // SAFETY: as in `forward`; a task owns its head's columns of its
        // segment's rows.
        unsafe {
            match hd / 16 {
                1 => backward_task::<1, 8>(xs, gs, d, sg, scale, op.get(), buf),
                2 => backward_task::<2, 8>(xs, gs, d, sg, scale, op.get(), buf),
                3 => backward_task::<3, 6>(xs, gs, d, sg, scale, op.get(), buf),
                _ => backward_task::<4, 6>(xs, gs, d, sg, scale, op.get(), buf),
            }
        }
    };
    pairs
        .par_iter()
        .with_max_len(1)
        .for_each_init(Scratch::default, run);
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};

    /// f64 definition of the forward and of the gradient w.r.t. `qkv` of
    /// one `(segment, head)`, added into `out (T, d)` / `dqkv (T, 3d)`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        g: &[f32],
        d: usize,
        r0: usize,
        n: usize,
        h: usize,
        hd: usize,
        out: &mut [f64],
        dqkv: &mut [f64],
    ) {
        let c3 = 3 * d;
        let at = |r: usize, c: usize| x[(r0 + r) * c3 + c] as f64;
        let go = |r: usize, c: usize| g[(r0 + r) * d + h * hd + c] as f64;
        let (q, k, v) = (h * hd, d + h * hd, 2 * d + h * hd);
        let scale = 1.0 / (hd as f64).sqrt();
        for i in 0..n {
            let s: Vec<f64> = (0..n)
                .map(|j| scale * (0..hd).map(|c| at(i, q + c) * at(j, k + c)).sum::<f64>())
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / z).collect();
            for c in 0..hd {
                out[(r0 + i) * d + h * hd + c] = (0..n).map(|j| p[j] * at(j, v + c)).sum();
            }
            let dp: Vec<f64> = (0..n)
                .map(|j| (0..hd).map(|c| go(i, c) * at(j, v + c)).sum())
                .collect();
            let dsum: f64 = (0..n).map(|j| p[j] * dp[j]).sum();
            for j in 0..n {
                let ds = p[j] * (dp[j] - dsum) * scale;
                for c in 0..hd {
                    dqkv[(r0 + i) * c3 + q + c] += ds * at(j, k + c);
                    dqkv[(r0 + j) * c3 + k + c] += ds * at(i, q + c);
                    dqkv[(r0 + j) * c3 + v + c] += p[j] * go(i, c);
                }
            }
        }
    }

    fn close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            let err = (a as f64 - b).abs();
            if err.is_nan() || err > tol * scale {
                return Err(format!("{what}[{i}]: {a} vs {b} (scale {scale})"));
            }
        }
        Ok(())
    }

    /// Forward and backward against the f64 definition, over every head
    /// width, segment lengths from 1 to [`MAX_KEYS`] (tails of the 32- and
    /// 16-key steps and of the row blocks) and several segments per batch.
    fn case(seed: u64, hv: usize, heads: usize, lens: &[usize]) -> Result<(), String> {
        let hd = 16 * hv;
        let d = heads * hd;
        let mut seg = vec![0];
        for &l in lens {
            seg.push(seg.last().unwrap() + l);
        }
        let t = *seg.last().unwrap();
        let x: Vec<f32> = crate::util::test_data(t * 3 * d, seed)
            .iter()
            .map(|v| 1.5 * v)
            .collect();
        let g = crate::util::test_data(t * d, seed + 1);
        let (mut want, mut dwant) = (vec![0.0; t * d], vec![0.0; t * 3 * d]);
        for w in seg.windows(2) {
            for h in 0..heads {
                reference(&x, &g, d, w[0], w[1] - w[0], h, hd, &mut want, &mut dwant);
            }
        }
        let mut out = vec![f32::NAN; t * d];
        forward(&x, d, heads, &seg, &mut out);
        close("forward", &out, &want, 1e-5)?;
        let mut dx = vec![0.0; t * 3 * d];
        backward(&x, &g, d, heads, &seg, &mut dx);
        close("backward", &dx, &dwant, 1e-5)
    }

    /// `exp16` against the f64 `exp` (within 2 ulp on the normal range) and
    /// [`crate::math::exp`] on the special values: 0 below `EXP_LO` and at
    /// `-inf`, NaN kept, saturation above `EXP_HI`.
    #[test]
    fn exp16_is_accurate() {
        if !applies(16, 1) {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut xs: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * 0.00875).collect();
        xs.extend([0.0, -0.0, -1e-30, 1e-30, -87.4, -100.0, 88.5, 1e6]);
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        for c in xs.chunks(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512 checked above; 16 lanes in and out.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (&x, &y) in c.iter().zip(&got) {
                let want = crate::math::exp(x);
                if x.is_nan() || !(-87.0..=88.0).contains(&x) {
                    assert!(
                        y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                        "exp16({x}) = {y}, math::exp {want}"
                    );
                } else {
                    let exact = (x as f64).exp();
                    let ulp = (exact as f32).abs() * f32::EPSILON;
                    assert!(
                        ((y as f64) - exact).abs() <= 2.0 * ulp as f64,
                        "exp16({x}) = {y} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_the_f64_definition() {
        if !applies(16, 1) {
            eprintln!("skipped: no AVX-512");
            return;
        }
        // The MNIST shape (hd 16, ~195 tokens), DC-DiT-B's (hd 64, 256) and
        // the longest segment.
        case(1, 1, 4, &[195, 190, 1, 16, 17]).unwrap();
        case(2, 4, 2, &[256, 33]).unwrap();
        case(3, 2, 1, &[MAX_KEYS, 7]).unwrap();
        fn prop(seed: u64, hv: u8, heads: u8, lens: Vec<u16>) -> TestResult {
            let hv = hv as usize % 4 + 1;
            let heads = heads as usize % 3 + 1;
            let lens: Vec<usize> = lens.iter().take(4).map(|&l| l as usize % 80 + 1).collect();
            if lens.is_empty() {
                return TestResult::discard();
            }
            match case(seed, hv, heads, &lens) {
                Ok(()) => TestResult::passed(),
                Err(e) => TestResult::error(format!("hd {} heads {heads} {lens:?}: {e}", 16 * hv)),
            }
        }
        QuickCheck::new()
            .tests(60)
            .quickcheck(prop as fn(u64, u8, u8, Vec<u16>) -> TestResult);
    }
}
