//! bf16 linear layers on AVX512-BF16 (`VDPBF16PS`), for CPUs without AMX
//! (AMD Zen 4 and later, Intel Cooper Lake): `y = x w^T + b` with `x` and
//! `w` stored as bf16, products and sums in f32.
//!
//! Why: one `VDPBF16PS` on a zmm register does 32 bf16 multiply-adds (16
//! lanes, each the sum of a pair of products) in the time a zmm f32 FMA does
//! 16, so the main network's GEMMs run at up to twice the f32 rate, and the
//! operands are half the bytes.
//!
//! Layout: `w (m, k)` is packed once per call into panels of [`NR`] output
//! columns in the pair-interleaved ("VNNI") order the instruction wants: for
//! each pair `p` of the reduction, the panel holds `NR` words `(w[j][2p],
//! w[j][2p + 1])`, one zmm per 16 columns. `x` is packed once per call the
//! same way in blocks of [`MR`] rows, so the register block finds the `MR`
//! words it broadcasts for one pair side by side (an odd `k` gets a zero
//! partner). The register block is [`MR`] rows by [`NR`] columns in 24 zmm
//! accumulators; blocking and task order
//! are those of the f32 kernel ([`crate::sgemm`]): tasks of [`MC`] rows by
//! [`NC`] columns, column-major, the reduction in blocks of [`KC`] whose
//! panel slice (16 KiB) stays in L1. The first block starts from the bias,
//! the others accumulate in the task's f32 tile, which is written out once
//! (as f32, or rounded to bf16 for a bf16 activation).
//!
//! Rounding is the instruction's: bf16 products are exact in f32, each of
//! the two additions per lane rounds to nearest even, and denormal inputs
//! and results are flushed to zero (tested against an f64 reference on the
//! same bf16 values). The module exists on x86-64 only.

use half::bf16;
use rayon::prelude::*;

/// Rows per register block.
pub(crate) const MR: usize = 6;
/// Output columns per register block and per packed panel: [`NV`] zmm.
pub(crate) const NR: usize = 16 * NV;
/// zmm vectors per block row.
const NV: usize = 4;
/// Reduction block in bf16 elements: a `KC x NR` panel slice is 16 KiB.
const KC: usize = 128;
/// Rows per task (a multiple of `MR`).
const MC: usize = MR * 8;
/// Output columns per task (a multiple of `NR`).
const NC: usize = NR * 4;

/// Whether the CPU has AVX512-BF16 (with AVX512F/BW) and
/// `DCDIT_NO_DPBF16=1` does not turn the kernel off (checked once).
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::env::var_os("DCDIT_NO_DPBF16").is_none()
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
    })
}

/// `src (rows, k)` pair-interleaved in blocks of `width` rows: word
/// `(b * kp + p) * width + r` holds `(src[i][2p], src[i][2p + 1])` of row
/// `i = b * width + r`, `kp = ceil(k / 2)`, a zero past `k`. Rows past the
/// end are zero, or with `repeat_last` copies of the last row (computed by
/// the register block, never stored). The words live in a pooled f32 buffer
/// (a fresh one per call cost page faults), viewed as `u32`.
fn pack_pairs(src: &[bf16], rows: usize, k: usize, width: usize, repeat_last: bool) -> Vec<f32> {
    let kp = k.div_ceil(2);
    let mut out = crate::pool::take(rows.div_ceil(width) * kp * width);
    if kp == 0 || rows == 0 {
        return out;
    }
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut out);
    words
        .par_chunks_mut(kp * width)
        .enumerate()
        .for_each(|(b, dst)| {
            for r in 0..width {
                let i = b * width + r;
                let i = match (i < rows, repeat_last) {
                    (true, _) => i,
                    (false, true) => rows - 1,
                    (false, false) => {
                        for p in 0..kp {
                            dst[p * width + r] = 0;
                        }
                        continue;
                    }
                };
                for (p, pair) in src[i * k..(i + 1) * k].chunks(2).enumerate() {
                    let lo = pair[0].to_bits() as u32;
                    let hi = pair.get(1).map_or(0, |h| h.to_bits() as u32);
                    dst[p * width + r] = lo | hi << 16;
                }
            }
        });
    out
}

/// Where [`linear`] writes its `(n, m)` result.
pub(crate) enum Out<'a> {
    /// f32, as accumulated (the tests check the accumulation through it,
    /// before any rounding to bf16).
    #[cfg_attr(not(test), allow(dead_code))]
    F32(&'a mut [f32]),
    /// Rounded to bf16 (nearest even, NaN kept quiet: bitwise the storage
    /// conversion's), so a bf16 activation needs no f32 pass of its own.
    Bf16(&'a mut [bf16]),
}

impl Out<'_> {
    fn len(&self) -> usize {
        match self {
            Out::F32(o) => o.len(),
            Out::Bf16(o) => o.len(),
        }
    }
}

/// `out (n, m) = x (n, k) w (m, k)^T [+ bias]` on bf16 operands, accumulated
/// in f32, `out` overwritten.
///
/// Each task accumulates its `MC x NC` block in an f32 tile of its own
/// (contiguous, so it stays in L2 across the reduction blocks) and writes
/// it out once at the end, converted to bf16 for [`Out::Bf16`].
///
/// # Panics
/// If [`available`] is false or a slice is shorter than its shape says
/// (callers check shapes first).
pub(crate) fn linear(
    x: &[bf16],
    n: usize,
    k: usize,
    w: &[bf16],
    m: usize,
    bias: Option<&[f32]>,
    out: Out<'_>,
) {
    assert!(available(), "dpbf16::linear: no AVX512-BF16 on this CPU");
    assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    assert!(bias.is_none_or(|b| b.len() >= m));
    if n == 0 || m == 0 {
        return;
    }
    // w in panels of NR columns, x in blocks of MR rows, both pair-
    // interleaved once per call (an odd k gets a zero partner).
    let kp = k.div_ceil(2);
    let pw_buf = pack_pairs(w, m, k, NR, false);
    let px_buf = pack_pairs(x, n, k, MR, true);
    let (pw, px): (&[u32], &[u32]) = (bytemuck::cast_slice(&pw_buf), bytemuck::cast_slice(&px_buf));
    let row_tasks = n.div_ceil(MC);
    let col_tasks = m.div_ceil(NC);
    // The output as an address, so tasks can share it (each writes its own
    // rows r0..r1, columns c0..c1).
    let (dst, is_bf16) = match out {
        Out::F32(o) => (o.as_mut_ptr() as usize, false),
        Out::Bf16(o) => (o.as_mut_ptr() as usize, true),
    };
    (0..row_tasks * col_tasks).into_par_iter().for_each_init(
        Vec::new,
        |tile: &mut Vec<f32>, task| {
            let (rt, ct) = (task % row_tasks, task / row_tasks);
            let (r0, r1) = (rt * MC, ((rt + 1) * MC).min(n));
            let (c0, c1) = (ct * NC, ((ct + 1) * NC).min(m));
            // Every element the epilogue reads is written by a block first
            // (or by the bias fill when k == 0).
            tile.resize(MC * NC, 0.0);
            if kp == 0 {
                for row in tile.chunks_exact_mut(NC).take(r1 - r0) {
                    match bias {
                        Some(b) => row[..c1 - c0].copy_from_slice(&b[c0..c1]),
                        None => row.fill(0.0),
                    }
                }
            }
            for p0 in (0..kp).step_by(KC / 2) {
                let pc = (KC / 2).min(kp - p0);
                for j0 in (c0..c1).step_by(NR) {
                    let ncols = NR.min(c1 - j0);
                    // The first reduction block starts from the bias (zero
                    // without one), the others from the tile.
                    let b32 = (p0 == 0).then(|| {
                        let mut b32 = [0.0f32; NR];
                        if let Some(bias) = bias {
                            b32[..ncols].copy_from_slice(&bias[j0..j0 + ncols]);
                        }
                        b32
                    });
                    let init = b32.as_ref();
                    let panel = pw[((j0 / NR) * kp + p0) * NR..].as_ptr();
                    for i0 in (0..r1 - r0).step_by(MR) {
                        let rows = MR.min(r1 - r0 - i0);
                        // The block of rows r0 + i0.. (r0 is a multiple of MR).
                        let blk = &px[(((r0 + i0) / MR) * kp + p0) * MR..];
                        // SAFETY: `available` checked above; the panel slice
                        // holds pc * NR words, the row block pc * MR; the
                        // destination block (rows x ncols at stride NC) lies
                        // inside the task's tile.
                        unsafe {
                            block(
                                blk.as_ptr(),
                                pc,
                                panel,
                                init,
                                tile.as_mut_ptr().add(i0 * NC + j0 - c0),
                                NC,
                                rows,
                                ncols,
                            );
                        }
                    }
                }
            }
            // Epilogue: the tile's rows into the output.
            for (i, row) in (r0..r1).zip(tile.chunks_exact(NC)) {
                let src = &row[..c1 - c0];
                // SAFETY: row i < n, columns c0..c1 <= m: inside the output,
                // and this task's alone; the CPU has AVX-512 (`available`).
                unsafe {
                    if is_bf16 {
                        let d = (dst as *mut bf16).add(i * m + c0);
                        store_bf16(src, std::slice::from_raw_parts_mut(d, src.len()));
                    } else {
                        let d = (dst as *mut f32).add(i * m + c0);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), d, src.len());
                    }
                }
            }
        },
    );
    crate::pool::give(pw_buf);
    crate::pool::give(px_buf);
}

/// `dst = bf16(src)` by [`crate::tensor::f32_to_bf16_one`], compiled for
/// AVX-512 so the loop vectorises at full width.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_bf16(src: &[f32], dst: &mut [bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = crate::tensor::f32_to_bf16_one(s);
    }
}

/// One `MR x NR` block: `dst[r][j] = init[r][j] + sum_p a[p][r] . panel[p][j]`
/// over `pc` pairs (`a` packed `(pc, MR)` words), for `r < rows`, `j <
/// ncols`; `init` is `bias` or, with `None`, `dst`'s own value.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: *const u32,
    pc: usize,
    panel: *const u32,
    bias: Option<&[f32; NR]>,
    dst: *mut f32,
    ld: usize,
    rows: usize,
    ncols: usize,
) {
    use std::arch::x86_64::*;
    // Lanes of each 16-column vector that hold columns < ncols.
    let mask: [__mmask16; NV] = std::array::from_fn(|v| {
        let c = ncols.saturating_sub(16 * v).min(16);
        ((1u32 << c) - 1) as u16
    });
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for (r, row) in acc.iter_mut().enumerate().take(rows) {
        for (v, a) in row.iter_mut().enumerate() {
            *a = match bias {
                Some(b) => _mm512_loadu_ps(b.as_ptr().add(16 * v)),
                None => _mm512_maskz_loadu_ps(mask[v], dst.add(r * ld + 16 * v)),
            };
        }
    }
    for p in 0..pc {
        let b: [__m512bh; NV] = std::array::from_fn(|v| {
            std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16 * v).cast()))
        });
        let ap = a.add(p * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            for (c, bv) in row.iter_mut().zip(&b) {
                *c = _mm512_dpbf16_ps(*c, av, *bv);
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (v, a) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(dst.add(r * ld + 16 * v), mask[v], *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};

    /// One random case at `(n, k, m)` against an f64 definition on the same
    /// bf16 values (products exact, so the difference is f32 accumulation),
    /// within 1e-6 of the summed magnitudes.
    fn case(seed: u64, (n, k, m): (usize, usize, usize), bias: bool) -> TestResult {
        let mut rng = dcdit_core::rng::Rng::new(seed);
        let mut draw = |c: usize| -> Vec<bf16> {
            (0..c)
                .map(|_| bf16::from_f32(rng.normal() as f32))
                .collect()
        };
        let (x, w) = (draw(n * k), draw(m * k));
        let b: Vec<f32> = draw(m).into_iter().map(f32::from).collect();
        let mut out = vec![f32::NAN; n * m];
        linear(&x, n, k, &w, m, bias.then_some(&b[..]), Out::F32(&mut out));
        // The bf16 output is the f32 one rounded by the storage conversion.
        let mut out16 = vec![bf16::NAN; n * m];
        linear(
            &x,
            n,
            k,
            &w,
            m,
            bias.then_some(&b[..]),
            Out::Bf16(&mut out16),
        );
        let mut want16 = vec![bf16::ZERO; n * m];
        crate::tensor::f32_to_bf16(&out, &mut want16);
        if out16 != want16 {
            return TestResult::error(format!("n {n} k {k} m {m}: bf16 output differs"));
        }
        let f64s = |v: &[bf16]| v.iter().map(|a| a.to_f64()).collect::<Vec<_>>();
        let b: Vec<f64> = b.iter().map(|&a| a as f64).collect();
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
        if !available() {
            eprintln!("SKIPPED: no AVX512-BF16 on this CPU");
            return;
        }
        // Rows past MR / MC, columns past 16 / NR / NC, odd reductions and
        // reductions past KC (several accumulating blocks), and none.
        fn prop(seed: u64, n: u16, k: u16, m: u16, bias: bool) -> TestResult {
            let shape = (n as usize % 200 + 1, k as usize % 700, m as usize % 300 + 1);
            case(seed, shape, bias)
        }
        QuickCheck::new()
            .tests(40)
            .quickcheck(prop as fn(u64, u16, u16, u16, bool) -> TestResult);
        for shape in [(1, 1, 1), (13, 513, 33), (96, 768, 256), (97, 257, 257)] {
            assert!(!case(3, shape, true).is_failure(), "{shape:?}");
        }
    }
}
