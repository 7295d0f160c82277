//! `y = x w^T + b` where the AVX2 register block serves
//! ([`crate::microkernel::available`]): at many rows the linear layers' GEMM
//! on the shared [`block`] register block, cache-blocked the BLIS way
//! ([`linear`]), unless the AVX-512 one ([`crate::linear512`], weights
//! packed once per tensor) takes the layer first; at a few rows a kernel
//! that streams the weights once ([`linear_few_rows`]).
//!
//! Why not the `gemm` crate here (it serves every other GEMM): at DC-DiT-B's
//! linear shapes over 2048 tokens on a 2-core Zen 3, this kernel's median time
//! was 3-10% lower for the qkv and MLP-in products (2048 x 768 -> 2304 / 3072),
//! 15-25% lower for the MLP-out one (3072 -> 768) and the 8192-row 768 -> 768
//! projection (25 interleaved pairs per shape, several runs), and the main
//! network is ~75% linear layers by time. It packs `w` once per call into
//! panels of [`NR`] output columns (the direct convolution's packing: a 1x1
//! convolution is a linear layer), reads `x`'s rows in place as the broadcast
//! operand, and walks the reduction in blocks of [`KC`]. A task is [`MC`] rows
//! by [`NC`] columns; for each `KC` block, each `KC x NR` panel slice (16 KiB)
//! stays in L1 while the task's rows sweep past it. Tasks are ordered
//! column-major, so a thread's consecutive tasks reuse the same packed columns
//! from L2 while `x`'s rows stream (row-major order, re-reading all of `w` per
//! row block, was 10-20% slower at 2304 and 3072 columns). The first block
//! starts from the bias, the others accumulate. The module exists on x86-64
//! only.

use rayon::prelude::*;

use crate::direct_conv::pack_weights;
use crate::microkernel::{block, MR, NR};
use crate::util::SyncPtr;

/// Reduction block: a `KC x NR` panel slice is 16 KiB, half of L1.
const KC: usize = 256;
/// Rows per task (a multiple of `MR`).
const MC: usize = MR * 16;
/// Output columns per task (a multiple of `NR`): 8 panels, 384 KiB of packed
/// weights at a reduction of 768, so consecutive tasks on a thread (the same
/// columns, the next rows) find them in L2.
const NC: usize = NR * 8;
/// Fewest rows for which the packing pays: below, the `gemm` crate (which
/// skips packing `w` for few rows) was as fast or faster (2-core Zen 3,
/// reduction 768: level at 1024 rows, 5-25% slower for this kernel at 512
/// and below, 5-20% faster at 2048 and above).
pub(crate) const MIN_ROWS: usize = 1536;

/// Whether this module's kernels serve: where the register block does, unless
/// `DCDIT_LINEAR_GEMM=1` asks for the `gemm` crate (for comparisons).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        crate::microkernel::available() && std::env::var_os("DCDIT_LINEAR_GEMM").is_none()
    })
}

/// Whether a linear layer over `n` rows takes [`linear`]: at least
/// [`MIN_ROWS`] rows where the module serves.
pub(crate) fn applies(n: usize) -> bool {
    n >= MIN_ROWS && enabled()
}

/// `out (n, m) = x (n, k) w (m, k)^T [+ bias]`, `out` overwritten. The caller
/// checks [`applies`] (or AVX2 + FMA alone) and the shapes.
pub(crate) fn linear(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), m * k);
    debug_assert_eq!(out.len(), n * m);
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        for row in out.chunks_exact_mut(m) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return;
    }
    let pw = pack_weights(w, m, k);
    let row_tasks = n.div_ceil(MC);
    let col_tasks = m.div_ceil(NC);
    let dst = SyncPtr(out.as_mut_ptr());
    let xp = x.as_ptr() as usize;
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (rt, ct) = (task % row_tasks, task / row_tasks);
        let (r0, r1) = (rt * MC, ((rt + 1) * MC).min(n));
        let (c0, c1) = (ct * NC, ((ct + 1) * NC).min(m));
        let xp = xp as *const f32;
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            for j0 in (c0..c1).step_by(NR) {
                let ncols = NR.min(c1 - j0);
                let mut b16 = [0.0f32; NR];
                if let Some(bias) = bias {
                    b16[..ncols].copy_from_slice(&bias[j0..j0 + ncols]);
                }
                let init = (p0 == 0).then_some(&b16);
                let panel = pw[(j0 / NR) * k * NR + p0 * NR..].as_ptr();
                for i0 in (r0..r1).step_by(MR) {
                    let rows = MR.min(r1 - i0);
                    // Rows past `rows` repeat the last one (read, never stored).
                    // SAFETY: every row index is < n, its k-slice inside x.
                    let a: [*const f32; MR] =
                        std::array::from_fn(|r| unsafe { xp.add((i0 + r.min(rows - 1)) * k + p0) });
                    // SAFETY: AVX2 + FMA checked by the caller; the panel
                    // slice holds kc * NR floats; the destination block
                    // (rows x ncols at stride m) lies inside `out` and
                    // belongs to this task alone.
                    unsafe {
                        block::<false>(
                            &a,
                            1,
                            0,
                            1,
                            kc,
                            panel,
                            NR,
                            init,
                            dst.get().add(i0 * m + j0),
                            m,
                            rows,
                            ncols,
                        );
                    }
                }
            }
        }
    });
    crate::pool::give(pw);
}

/// Most rows for which [`linear_few_rows`] serves (a per-sample projection
/// such as adaLN's over a batch of 8, 16 with guidance).
pub(crate) const FEW_ROWS: usize = 16;

/// Whether a linear layer over `n` rows takes [`linear_few_rows`]: at most
/// [`FEW_ROWS`] rows where the module serves.
pub(crate) fn few_rows_apply(n: usize) -> bool {
    n <= FEW_ROWS && enabled()
}

/// Output columns (rows of `w`) per parallel task of [`linear_few_rows`].
const FEW_COLS: usize = 64;

/// `out (n, m) = x (n, k) w (m, k)^T [+ bias]` for a few rows: each row of
/// `w` is read once, straight from the weights (no packing), and multiplied
/// into up to 8 rows of `x` at a time (kept in L1), with 8 independent FMA
/// chains. A product this flat is bound by reading `w` (DC-DiT-B's adaLN
/// projection, 8 x 768 -> 4608, reads 14 MB for 57 MFLOP), which the `gemm`
/// crate did at 5.6 GB/s. The caller checks [`few_rows_apply`].
pub(crate) fn linear_few_rows(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), m * k);
    debug_assert_eq!(out.len(), n * m);
    let dst = SyncPtr(out.as_mut_ptr());
    (0..m.div_ceil(FEW_COLS)).into_par_iter().for_each(|task| {
        let (j0, j1) = (task * FEW_COLS, ((task + 1) * FEW_COLS).min(m));
        for r0 in (0..n).step_by(8) {
            let rows = 8.min(n - r0);
            // SAFETY: AVX2 + FMA checked by the caller; rows r0..r0+rows of x
            // and columns j0..j1 of those output rows (this task's alone).
            unsafe {
                match rows {
                    1 => few_rows_block::<1>(x, k, w, bias, dst, m, r0, j0, j1),
                    2 => few_rows_block::<2>(x, k, w, bias, dst, m, r0, j0, j1),
                    3 => few_rows_block::<3>(x, k, w, bias, dst, m, r0, j0, j1),
                    4 => few_rows_block::<4>(x, k, w, bias, dst, m, r0, j0, j1),
                    5 => few_rows_block::<5>(x, k, w, bias, dst, m, r0, j0, j1),
                    6 => few_rows_block::<6>(x, k, w, bias, dst, m, r0, j0, j1),
                    7 => few_rows_block::<7>(x, k, w, bias, dst, m, r0, j0, j1),
                    _ => few_rows_block::<8>(x, k, w, bias, dst, m, r0, j0, j1),
                }
            }
        }
    });
}

/// Rows `r0..r0 + R` of [`linear_few_rows`], output columns `j0..j1`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_block<const R: usize>(
    x: &[f32],
    k: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    dst: SyncPtr,
    m: usize,
    r0: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    let k8 = k / 8 * 8;
    let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((r0 + r) * k));
    for j in j0..j1 {
        let wj = w.as_ptr().add(j * k);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut t = 0;
        while t < k8 {
            let wv = _mm256_loadu_ps(wj.add(t));
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r].add(t)), wv, acc[r]);
            }
            t += 8;
        }
        let b = bias.map_or(0.0, |b| b[j]);
        for r in 0..R {
            // Horizontal sum of the 8 lanes, then the tail.
            let v = acc[r];
            let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            let mut s = _mm_cvtss_f32(s1);
            for tt in k8..k {
                s += *xr[r].add(tt) * *wj.add(tt);
            }
            *dst.get().add((r0 + r) * m + j) = s + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::no_avx2_fma;
    use quickcheck::{QuickCheck, TestResult};

    /// A linear kernel under test (`linear` or `linear_few_rows`).
    type Kernel = fn(&[f32], usize, usize, &[f32], usize, Option<&[f32]>, &mut [f32]);

    /// One random case of `kernel` at `(n, k, m)` against an f64 definition,
    /// errors within 1e-6 of the summed magnitudes.
    fn linear_case(
        kernel: Kernel,
        seed: u64,
        (n, k, m): (usize, usize, usize),
        bias: bool,
    ) -> TestResult {
        let mut rng = dcdit_core::rng::Rng::new(seed);
        let mut draw = |c: usize| -> Vec<f32> { (0..c).map(|_| rng.normal() as f32).collect() };
        let (x, w, b) = (draw(n * k), draw(m * k), draw(m));
        let mut out = vec![f32::NAN; n * m];
        kernel(&x, n, k, &w, m, bias.then_some(&b[..]), &mut out);
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let b = f64s(&b);
        crate::util::check_linear(
            &f64s(&x),
            &f64s(&w),
            bias.then_some(&b[..]),
            (n, k, m),
            &out,
        )
    }

    #[test]
    fn matches_the_definition() {
        if no_avx2_fma() {
            return;
        }
        // Shapes around the blocks: rows past MR / MC, columns past NR / NC,
        // reductions past KC (several accumulating blocks) and below it.
        fn prop(seed: u64, n: u16, k: u16, m: u16, bias: bool) -> TestResult {
            let shape = (n as usize % 200 + 1, k as usize % 600, m as usize % 300 + 1);
            linear_case(linear, seed, shape, bias)
        }
        QuickCheck::new()
            .tests(40)
            .quickcheck(prop as fn(u64, u16, u16, u16, bool) -> TestResult);
    }

    #[test]
    fn the_backend_dispatches_here_at_many_rows() {
        // Through `Backend::linear` (3-D input, bias) at MIN_ROWS + 4 rows,
        // where this kernel serves on AVX2 machines and the `gemm` crate
        // elsewhere: either must match the definition.
        use dcdit_core::backend::Backend;
        let (rows, k, m) = (MIN_ROWS + 4, 300, 37);
        let mut rng = dcdit_core::rng::Rng::new(7);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
        let (x, w, b) = (draw(rows * k), draw(m * k), draw(m));
        let be = crate::CpuBackend::with_threads(2);
        let y = be
            .linear(
                &be.from_f32(&x, &[4, rows / 4, k]).unwrap(),
                &be.from_f32(&w, &[m, k]).unwrap(),
                Some(&be.from_f32(&b, &[m]).unwrap()),
            )
            .unwrap();
        assert_eq!(y.shape(), &[4, rows / 4, m]);
        let y = be.to_f32(&y).unwrap();
        for i in 0..rows {
            for j in 0..m {
                let want: f64 = b[j] as f64
                    + (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum::<f64>();
                assert!((y[i * m + j] as f64 - want).abs() < 1e-4, "({i}, {j})");
            }
        }
    }

    #[test]
    fn few_rows_match_the_definition() {
        if no_avx2_fma() {
            return;
        }
        // 1..=20 rows (groups of 8 and partial ones), reductions around the
        // 8-wide steps (tails), columns past a task.
        fn prop(seed: u64, n: u8, k: u16, m: u16, bias: bool) -> TestResult {
            let shape = (n as usize % 20 + 1, k as usize % 300, m as usize % 150 + 1);
            linear_case(linear_few_rows, seed, shape, bias)
        }
        QuickCheck::new()
            .tests(60)
            .quickcheck(prop as fn(u64, u8, u16, u16, bool) -> TestResult);
    }
}
