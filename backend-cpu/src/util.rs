//! Shared helpers: parallel row loops, segment validation, the gemm wrapper,
//! vectorisable reductions.

use gemm::Parallelism;
use rayon::prelude::*;

/// Element count below which an element-wise or row-wise loop runs on the
/// calling thread (the rayon hand-off costs a few microseconds).
pub(crate) const PAR_GRAIN: usize = 1 << 15;

/// Work (`m * n * k`) below which a gemm runs single-threaded.
pub(crate) const GEMM_PAR_WORK: usize = 1 << 20;

/// Runs `f` compiled for the widest SIMD level the CPU has (AVX-512, else
/// AVX2 + FMA, else the build's baseline). The closure is inlined into a
/// `#[target_feature]` function, so the plain Rust loops of the element-wise
/// kernels are vectorised for that level without a hand-written copy each.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match simd_level() {
        // SAFETY: the level's features were detected on this CPU.
        Level::V4 => return unsafe { simd_avx512(f) },
        // SAFETY: as above.
        Level::V3 => return unsafe { simd_avx2(f) },
        Level::Base => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn simd_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn simd_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// SIMD level of this CPU, detected once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Level {
    /// AVX-512 (F, VL, BW, DQ) with FMA.
    V4,
    /// AVX2 with FMA.
    V3,
    /// The build's baseline.
    Base,
}

/// The widest SIMD level the CPU supports.
#[inline]
pub(crate) fn simd_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("fma")
        {
            return Level::V4;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Level::V3;
        }
    }
    Level::Base
}

/// Defines `fn $name(args)` that calls the `#[inline(always)]` function
/// `$generic` compiled for the CPU's SIMD level (AVX-512, AVX2 + FMA, or
/// baseline), chosen at run time, and `fn $at(level, args)` that runs a given
/// level (tests hold every level to the baseline). For hot kernels whose body
/// is too large for [`simd`]'s closure to be inlined.
macro_rules! simd_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $at:ident($($a:ident: $t:ty),*) = $generic:path;) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            $at($crate::util::simd_level(), $($a),*)
        }

        /// Runs the kernel compiled for `level`; a level the CPU lacks runs
        /// the baseline.
        #[allow(dead_code)]
        $vis fn $at(level: $crate::util::Level, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($a: $t),*) {
                    $generic($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($a: $t),*) {
                    $generic($($a),*)
                }
                let have = $crate::util::simd_level();
                match level {
                    // SAFETY: the CPU has AVX-512 (detected).
                    $crate::util::Level::V4 if have == $crate::util::Level::V4 => {
                        return unsafe { v4($($a),*) }
                    }
                    // SAFETY: the CPU has at least AVX2 + FMA (detected).
                    $crate::util::Level::V3 if have != $crate::util::Level::Base => {
                        return unsafe { v3($($a),*) }
                    }
                    _ => {}
                }
            }
            $generic($($a),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Runs `f(first_row, rows)` over chunks of whole `cols`-wide rows of `out`,
/// in parallel (on the current rayon pool) when `out` is large, each chunk
/// through [`simd`].
pub(crate) fn for_row_chunks<F>(out: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.is_empty() {
        return;
    }
    let cols = cols.max(1);
    if out.len() <= PAR_GRAIN {
        simd(|| f(0, out));
        return;
    }
    let rows_per = (PAR_GRAIN / cols).max(1);
    out.par_chunks_mut(rows_per * cols)
        .enumerate()
        .for_each(|(i, chunk)| simd(|| f(i * rows_per, chunk)));
}

pub(crate) use dcdit_core::backend::check_segments;

/// The sample owning `row` (the last `s` with `seg[s] <= row`, skipping empty
/// segments). `row` must be `< seg[last]`.
#[inline]
pub(crate) fn sample_of(seg: &[usize], row: usize) -> usize {
    seg.partition_point(|&o| o <= row) - 1
}

/// Calls `f(row, sample)` for rows `r0..r0 + n` of a segmented batch.
#[inline]
pub(crate) fn for_rows_with_sample(
    seg: &[usize],
    r0: usize,
    n: usize,
    mut f: impl FnMut(usize, usize),
) {
    if n == 0 {
        return;
    }
    let mut s = sample_of(seg, r0);
    for r in r0..r0 + n {
        while seg[s + 1] <= r {
            s += 1;
        }
        f(r, s);
    }
}

/// A raw pointer that may cross threads; users guarantee disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: only used to hand disjoint output regions to rayon tasks.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method so closures capture the whole `Send` wrapper).
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided matrix operand for [`gemm_f32`]: element `(i, j)` is at
/// `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

// SAFETY: a `Mat` is a read-only view; whoever makes one guarantees that
// its data outlives every use and is not written meanwhile, on any thread.
unsafe impl Send for Mat {}
// SAFETY: as above.
unsafe impl Sync for Mat {}

impl Mat {
    /// A row-major buffer of `cols`-wide rows viewed as itself or, when
    /// `transposed`, as its transpose.
    pub(crate) fn dense(ptr: *const f32, cols: usize, transposed: bool) -> Mat {
        let (rs, cs) = if transposed {
            (1, cols as isize)
        } else {
            (cols as isize, 1)
        };
        Mat { ptr, rs, cs }
    }

    /// The view from reduction index `k0` on: `Mat` as a left operand
    /// (`(m, k)`, `k` along `cs`) when `lhs`, else as a right one (`(k, n)`,
    /// `k` along `rs`).
    ///
    /// # Safety
    /// `k0` must lie within the operand.
    unsafe fn skip_k(self, k0: usize, lhs: bool) -> Mat {
        let step = if lhs { self.cs } else { self.rs };
        Mat {
            ptr: self.ptr.offset(k0 as isize * step),
            ..self
        }
    }
}

/// `acc += x`.
#[inline]
pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// `out = sum of run(p, buf) over p < parts`: `parts` jobs run in parallel,
/// each filling a buffer of `out.len()` floats (overwriting it), and the
/// buffers are added in part order. With one part, `run` writes `out`.
pub(crate) fn sum_of_parts(out: &mut [f32], parts: usize, run: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    if parts <= 1 {
        run(0, out);
        return;
    }
    let partial: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut acc = crate::pool::take(out.len());
            run(part, &mut acc);
            acc
        })
        .collect();
    out.copy_from_slice(&partial[0]);
    for p in &partial[1..] {
        add_into(out, p);
    }
    partial.into_iter().for_each(crate::pool::give);
}

/// `dst (m, n) = lhs (m, k) * rhs (k, n)` (overwritten; rows of `n`
/// contiguous) on the calling thread, for callers that run many products
/// in parallel: [`crate::gemm512`]'s block where it applies (AVX-512, at
/// least 64 columns, `rhs` columns contiguous), else one serial
/// [`gemm_f32`].
///
/// # Safety
/// As [`gemm_f32`].
pub(crate) unsafe fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat,
    rhs: Mat,
    dst: &mut [f32],
) {
    gemm_rows(m, n, k, dst, lhs, rhs, false)
}

/// `dst (m, n) = lhs (m, k) * rhs (k, n)` (overwritten; rows of `n`
/// contiguous), split over rows when `parallel`: [`crate::gemm512`] where it
/// applies (AVX-512, at least 64 columns, `rhs` columns contiguous), else
/// [`gemm_f32`]. The one dispatch behind [`gemm_serial`] and
/// [`gemm_long_k`].
///
/// # Safety
/// As [`gemm_f32`].
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) {
    debug_assert_eq!(dst.len(), m * n);
    #[cfg(target_arch = "x86_64")]
    if rhs.cs == 1 && rhs.rs >= n as isize && crate::gemm512::applies(n) {
        crate::gemm512::gemm(m, n, k, dst, lhs, rhs, parallel);
        return;
    }
    gemm_f32(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        n as isize,
        1,
        false,
        lhs,
        rhs,
        1.0,
        parallel,
    );
}

/// `dst (m, n) = lhs (m, k) * rhs (k, n)` (overwritten; rows of `n`
/// contiguous) for products whose reduction is long against their result,
/// such as weight gradients (`k` = tokens or pixels): the `gemm` crate
/// splits the result over the threads, which for a result of a few blocks
/// leaves one thread working, so here the reduction is split instead (one
/// part per thread, partial results added; [`sum_of_parts`]) when `k` is at
/// least 4x both `m` and `n`, each part a [`gemm_serial`]. Otherwise one
/// product split over rows ([`gemm_rows`]).
///
/// # Safety
/// As [`gemm_f32`].
pub(crate) unsafe fn gemm_long_k(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
) {
    debug_assert_eq!(dst.len(), m * n);
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && m.saturating_mul(n).saturating_mul(k) >= GEMM_PAR_WORK;
    if parallel && k >= 4 * m.max(n) {
        let per = k.div_ceil(threads);
        sum_of_parts(dst, threads, |part, acc| {
            let k0 = (part * per).min(k);
            let kn = per.min(k - k0);
            // SAFETY: k0 + kn <= k, inside both operands; `acc` holds m * n.
            unsafe { gemm_serial(m, n, kn, lhs.skip_k(k0, true), rhs.skip_k(k0, false), acc) };
        });
        return;
    }
    gemm_rows(m, n, k, dst, lhs, rhs, parallel)
}

/// `dst (m, n) = [dst +] scale * lhs (m, k) * rhs (k, n)` with f32 operands.
/// `accumulate` keeps the existing `dst` values (e.g. a pre-filled bias).
///
/// # Safety
/// The pointers must be valid for the given shapes and strides, `dst` must
/// not alias `lhs`/`rhs`, and no other thread may touch the `dst` region.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.offset(i as isize * dst_rs + j as isize * dst_cs) = 0.0;
                }
            }
        }
        return;
    }
    let par = if parallel && m.saturating_mul(n).saturating_mul(k) >= GEMM_PAR_WORK {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        par,
    );
}

/// Sum with eight independent accumulators (vectorises; also more accurate
/// than a sequential sum).
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    let mut s = rest.iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

/// Sum of squares with eight accumulators.
#[inline]
pub(crate) fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let mut s = rest.iter().map(|v| v * v).sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

/// Sum of squared deviations from `mean`, eight accumulators.
#[inline]
pub(crate) fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let d = c[l] - mean;
            acc[l] += d * d;
        }
    }
    let mut s = rest.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

/// Dot product with eight accumulators.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let ra = ca.remainder();
    let rb = cb.remainder();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>();
    for v in acc {
        s += v;
    }
    s
}

/// Checks a linear kernel's `out (n, m)` against `x (n, k) w (m, k)^T [+
/// bias]` summed in f64 from the given operand values: errors within 1e-6
/// of the summed magnitudes (plus 1). For the kernels' unit tests.
#[cfg(test)]
pub(crate) fn check_linear(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    (n, k, m): (usize, usize, usize),
    out: &[f32],
) -> quickcheck::TestResult {
    for i in 0..n {
        for j in 0..m {
            let mut want = bias.map_or(0.0, |b| b[j]);
            let mut scale = want.abs();
            for t in 0..k {
                let p = x[i * k + t] * w[j * k + t];
                want += p;
                scale += p.abs();
            }
            let got = out[i * m + j] as f64;
            if (got - want).abs() > 1e-6 * (scale + 1.0) {
                return quickcheck::TestResult::error(format!(
                    "n {n} k {k} m {m}: ({i}, {j}) {got} vs {want}"
                ));
            }
        }
    }
    quickcheck::TestResult::passed()
}

/// Deterministic test data in `[-1, 1)` (a 64-bit LCG), for unit tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The convolution's definition (a test oracle of the kernels): `out[b, y,
/// x, o] = bias[o] + sum` over the `k x k` window (zero outside the image)
/// of `x[b, y', x', c] * w[o, ky, kx, c]`, in f64.
#[cfg(test)]
pub(crate) fn conv_reference(
    xs: &[f32],
    g: dcdit_core::backend::Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f64> {
    let (h, w, pad) = (g.height as isize, g.width as isize, (k / 2) as isize);
    let mut out = vec![0.0f64; g.rows() * cout];
    for b in 0..g.batch as isize {
        for y in 0..h {
            for x in 0..w {
                for o in 0..cout {
                    let mut s = bias[o] as f64;
                    for ky in 0..k as isize {
                        for kx in 0..k as isize {
                            let (yy, xx) = (y + ky - pad, x + kx - pad);
                            if yy < 0 || yy >= h || xx < 0 || xx >= w {
                                continue;
                            }
                            for c in 0..cin {
                                let xi = (((b * h + yy) * w + xx) as usize) * cin + c;
                                let wi = ((o * k + ky as usize) * k + kx as usize) * cin + c;
                                s += xs[xi] as f64 * wt[wi] as f64;
                            }
                        }
                    }
                    out[(((b * h + y) * w + x) as usize) * cout + o] = s;
                }
            }
        }
    }
    out
}

/// A convolution kernel under test: `(xs, xp, grid, cin, wt, cout, k, bias,
/// out)`, the input both as itself and in the [`Padded`](crate::dense::Padded)
/// layout (`winograd::conv` reads the first, `direct_conv::conv` the second).
#[cfg(test)]
pub(crate) type ConvKernel<'a> = &'a dyn Fn(
    &[f32],
    &crate::dense::Padded,
    dcdit_core::backend::Grid,
    usize,
    &[f32],
    usize,
    usize,
    Option<&[f32]>,
    &mut [f32],
);

/// One random case of a convolution kernel against [`conv_reference`] (the
/// quickcheck property of the kernels' tests): batch 1-3, grids up to 17 x
/// 19 (odd sizes, partial register and Winograd tiles), `cin` 1-24, `cout`
/// 1-37 (partial channel panels), kernel size `k`, with or without bias;
/// errors within 1e-5 of the output scale.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_case(
    kernel: ConvKernel,
    seed: u64,
    (bt, h, w): (u8, u8, u8),
    cin: u8,
    cout: u8,
    k: usize,
    bias: bool,
) -> quickcheck::TestResult {
    let g = dcdit_core::backend::Grid {
        batch: bt as usize % 3 + 1,
        height: h as usize % 17 + 1,
        width: w as usize % 19 + 1,
    };
    let (cin, cout) = (cin as usize % 24 + 1, cout as usize % 37 + 1);
    let xs = test_data(g.rows() * cin, seed);
    let wt = test_data(cout * k * k * cin, seed ^ 1);
    let b = if bias {
        test_data(cout, seed ^ 2)
    } else {
        vec![0.0; cout]
    };
    let xp = crate::dense::Padded::new(&xs, g, cin, k / 2);
    let mut out = vec![f32::NAN; g.rows() * cout];
    kernel(
        &xs,
        &xp,
        g,
        cin,
        &wt,
        cout,
        k,
        bias.then_some(&b[..]),
        &mut out,
    );
    crate::pool::give(xp.data);
    let want = conv_reference(&xs, g, cin, &wt, cout, k, &b);
    match first_mismatch(&out, &want, 1e-5) {
        Some(m) => quickcheck::TestResult::error(format!("{g:?} cin {cin} cout {cout} k {k}: {m}")),
        None => quickcheck::TestResult::passed(),
    }
}

/// The first element of `got` further than `tol` times the output scale
/// (the largest `|want|`, at least 1) from `want`, or NaN, as `"[i] got vs
/// want"`.
#[cfg(test)]
pub(crate) fn first_mismatch(got: &[f32], want: &[f64], tol: f64) -> Option<String> {
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).enumerate().find_map(|(i, (&o, &r))| {
        let err = (o as f64 - r).abs();
        (err.is_nan() || err > tol * scale).then(|| format!("[{i}] {o} vs {r}"))
    })
}

/// True (after saying the test is skipped) where the CPU lacks AVX2 + FMA,
/// which the x86-64 kernels' tests call directly.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn no_avx2_fma() -> bool {
    let missing = !std::is_x86_feature_detected!("avx2") || !std::is_x86_feature_detected!("fma");
    if missing {
        eprintln!("skipped: no AVX2 + FMA");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split reduction of [`gemm_long_k`] (2 threads, 3 parts, a
    /// reduction past the split threshold) against an f64 product, with the
    /// left operand stored transposed (its `k` along `cs`, as in `g^T x`) and
    /// row-major, so that a part starting at the wrong offset of either
    /// operand fails; and the unsplit path for a short reduction.
    #[test]
    fn long_reductions_split_over_threads() {
        for (threads, m, n, k) in [(2, 5, 7, 40_001), (3, 9, 4, 50_000), (2, 40, 30, 100)] {
            let a = test_data(m * k, 1);
            let b = test_data(k * n, 2);
            for transposed in [true, false] {
                // lhs (m, k): stored (k, m) when transposed, else (m, k).
                let lhs = Mat::dense(a.as_ptr(), if transposed { m } else { k }, transposed);
                let rhs = Mat::dense(b.as_ptr(), n, false);
                let mut out = vec![f32::NAN; m * n];
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                // SAFETY: the operands hold m * k and k * n floats.
                pool.install(|| unsafe { gemm_long_k(m, n, k, &mut out, lhs, rhs) });
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| {
                                let l = if transposed {
                                    a[t * m + i]
                                } else {
                                    a[i * k + t]
                                };
                                l as f64 * b[t * n + j] as f64
                            })
                            .sum();
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-3,
                            "k {k} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
