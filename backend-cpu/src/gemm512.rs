//! Matrix products `C = A B` on an AVX-512 register block without packing:
//! the backward's products of the linear layers (`dx = dy W`, `dW = dy^T
//! x`) and the weight gradients of 1x1 convolutions.
//!
//! Why: those have a short side (64-256) and either a short reduction
//! (`dx`: 64-256) or a long one (`dW`: thousands of tokens), where the
//! `gemm` crate reached 110-160 GFLOP/s on a 2-core Zen 4 (233 peak),
//! packing both operands on every call. Here `B`'s rows are read in place
//! (`rs` = its row stride, columns contiguous) and `A`'s elements are
//! broadcast straight from memory with any strides, so `A^T` costs nothing.
//!
//! Register block: [`MR`] rows by [`NV`] zmm (64 columns), 24
//! accumulators; per reduction step 4 loads of a `B` row, 6 broadcasts and
//! 24 FMAs. Loops: reduction blocks of [`KC`] (a `KC x 64` slice of `B`,
//! 16 KiB, stays in L1 while every row block of the task passes over it),
//! then 64-column strips, then row blocks. Threads split the rows here;
//! [`crate::util::gemm_long_k`] splits a long reduction instead, each part
//! a [`serial`] product. The module exists on x86-64 only.

// The register block indexes its accumulators by row and vector.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::util::{Mat, SyncPtr};

/// Rows per register block.
const MR: usize = 6;
/// zmm vectors per block row.
const NV: usize = 4;
/// Columns per register block and strip.
const NR: usize = 16 * NV;
/// Reduction steps per block.
const KC: usize = 64;
/// Rows per parallel task (a multiple of `MR`).
const MC: usize = MR * 8;

/// Whether [`gemm`] serves an `n`-column result on this CPU: AVX-512, at
/// least one full strip of columns (narrower results waste most of the
/// block), and not `DCDIT_GEMM512=0`.
pub(crate) fn applies(n: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    n >= NR
        && crate::util::simd_level() == crate::util::Level::V4
        && !*OFF.get_or_init(|| std::env::var_os("DCDIT_GEMM512").is_some_and(|v| v == "0"))
}

/// Lane masks of the `NV` vectors of a strip with `cols` columns.
fn masks(cols: usize) -> [__mmask16; NV] {
    std::array::from_fn(|v| {
        let c = cols.saturating_sub(16 * v).min(16);
        ((1u32 << c) - 1) as __mmask16
    })
}

/// `dst[r][..] (+)= sum_{t < k} a_r[t * acs] b[t * ldb..][..]` for `r <
/// rows`, the columns of `mask`; accumulates into `dst` when `acc`.
///
/// # Safety
/// AVX-512F; `a[r]` readable at `t * acs` for `t < k` (every `r < MR`), `b`
/// at the masked columns of `k` rows, `dst` at the masked columns of `rows`
/// rows (stride `ldd`).
#[inline]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: &[*const f32; MR],
    acs: isize,
    k: usize,
    b: *const f32,
    ldb: usize,
    mask: &[__mmask16; NV],
    dst: *mut f32,
    ldd: usize,
    rows: usize,
    acc: bool,
) {
    let mut c = [[_mm512_setzero_ps(); NV]; MR];
    if acc {
        for r in 0..rows.min(MR) {
            for v in 0..NV {
                c[r][v] = _mm512_maskz_loadu_ps(mask[v], dst.add(r * ldd + 16 * v));
            }
        }
    }
    let mut pa = *a;
    let mut pb = b;
    for _ in 0..k {
        let bv: [__m512; NV] =
            std::array::from_fn(|v| _mm512_maskz_loadu_ps(mask[v], pb.add(16 * v)));
        for r in 0..MR {
            let x = _mm512_set1_ps(*pa[r]);
            for v in 0..NV {
                c[r][v] = _mm512_fmadd_ps(x, bv[v], c[r][v]);
            }
            pa[r] = pa[r].offset(acs);
        }
        pb = pb.add(ldb);
    }
    for r in 0..rows.min(MR) {
        for v in 0..NV {
            _mm512_mask_storeu_ps(dst.add(r * ldd + 16 * v), mask[v], c[r][v]);
        }
    }
}

/// One thread's product: `dst (m, n) = lhs (m, k) rhs (k, n)` (row stride
/// `ldd`, overwritten), `rhs` with contiguous columns.
///
/// # Safety
/// AVX-512F; the operands valid for their shapes, `dst` for `m` rows of
/// `n` and not touched by anyone else meanwhile.
unsafe fn serial(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, dst: *mut f32, ldd: usize) {
    let ldb = rhs.rs as usize;
    for k0 in (0..k).step_by(KC) {
        let kn = KC.min(k - k0);
        for j0 in (0..n).step_by(NR) {
            let mask = masks(n - j0);
            let b = rhs.ptr.offset(k0 as isize * rhs.rs).add(j0);
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                // Rows past `rows` repeat the last one: computed, not stored.
                let a: [*const f32; MR] = std::array::from_fn(|r| {
                    lhs.ptr
                        .offset((i0 + r.min(rows - 1)) as isize * lhs.rs + k0 as isize * lhs.cs)
                });
                block(
                    &a,
                    lhs.cs,
                    kn,
                    b,
                    ldb,
                    &mask,
                    dst.add(i0 * ldd + j0),
                    ldd,
                    rows,
                    k0 > 0,
                );
            }
        }
    }
    if k == 0 {
        for i in 0..m {
            std::slice::from_raw_parts_mut(dst.add(i * ldd), n).fill(0.0);
        }
    }
}

/// `dst (m, n) = lhs (m, k) rhs (k, n)`, overwritten (rows of `n`
/// contiguous). `lhs` takes any strides, `rhs` needs contiguous columns
/// (`cs == 1`, `rs >= n`). With `parallel`, tasks of [`MC`] rows run on the
/// pool (splitting a long reduction instead is
/// [`crate::util::gemm_long_k`]'s choice). The caller checks [`applies`].
///
/// # Safety
/// The operands must be valid for their shapes and strides and not written
/// meanwhile; `dst` holds `m * n` floats.
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) {
    debug_assert_eq!(dst.len(), m * n);
    debug_assert!(rhs.cs == 1 && rhs.rs >= n as isize);
    if m == 0 || n == 0 {
        return;
    }
    if !parallel || m <= MC {
        serial(m, n, k, lhs, rhs, dst.as_mut_ptr(), n);
        return;
    }
    let out = SyncPtr(dst.as_mut_ptr());
    let whole = lhs;
    (0..m.div_ceil(MC)).into_par_iter().for_each(|task| {
        // The whole operand captured (a field alone would not be Sync).
        let lhs = whole;
        let i0 = task * MC;
        let rows = MC.min(m - i0);
        // SAFETY: task `task` owns rows i0..i0 + rows of `dst`.
        unsafe {
            serial(
                rows,
                n,
                k,
                Mat {
                    ptr: lhs.ptr.offset(i0 as isize * lhs.rs),
                    ..lhs
                },
                rhs,
                out.get().add(i0 * n),
                n,
            )
        };
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};

    /// Against the f64 definition, `A` in both layouts (as itself and as the
    /// transpose of its buffer), `B` with a row stride wider than `n`,
    /// shapes past every block edge and both parallel splits (through
    /// `gemm_long_k`, which chooses between them).
    #[test]
    fn matches_the_f64_definition() {
        if !applies(NR) {
            eprintln!("skipped: no AVX-512");
            return;
        }
        fn case(
            m: usize,
            n: usize,
            k: usize,
            ta: bool,
            pad: usize,
            seed: u64,
        ) -> Result<(), String> {
            let a = crate::util::test_data(m * k, seed);
            let ldb = n + pad;
            let b = crate::util::test_data(k * ldb, seed + 1);
            // A (m, k) stored as itself or as its transpose (k, m).
            let at = |i: usize, t: usize| if ta { a[t * m + i] } else { a[i * k + t] };
            let lhs = Mat::dense(a.as_ptr(), if ta { m } else { k }, ta);
            let rhs = Mat {
                ptr: b.as_ptr(),
                rs: ldb as isize,
                cs: 1,
            };
            let mut out = vec![f32::NAN; m * n];
            // SAFETY: shapes as built above.
            unsafe { crate::util::gemm_long_k(m, n, k, &mut out, lhs, rhs) };
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|t| at(i, t) as f64 * b[t * ldb + j] as f64);
                    let want: f64 = terms.clone().sum();
                    let size: f64 = terms.map(f64::abs).sum();
                    let got = out[i * n + j] as f64;
                    // f32 summation error grows like sqrt(k) eps sum|a b|;
                    // a missed or doubled term is off by a whole |a b|.
                    let tol = 1e-7 + 2.0 * (k as f64).sqrt() * f32::EPSILON as f64 * size;
                    if (got - want).abs() > tol || got.is_nan() {
                        return Err(format!("{m}x{n}x{k} ta {ta}: ({i}, {j}) {got} vs {want}"));
                    }
                }
            }
            Ok(())
        }
        // The model's shapes: dx of the MLP, and the long-reduction dW.
        case(6473 / 7, 256, 64, false, 0, 1).unwrap();
        case(64, 256, 6473, true, 0, 2).unwrap();
        case(256, 64, 3001, true, 3, 3).unwrap();
        case(0, 64, 5, false, 0, 4).unwrap();
        case(5, 64, 0, true, 0, 5).unwrap();
        fn prop(m: u16, n: u16, k: u16, ta: bool, pad: u8, seed: u64) -> TestResult {
            let (m, n, k) = (m as usize % 70 + 1, n as usize % 150 + NR, k as usize % 300);
            match case(m, n, k, ta, pad as usize % 5, seed) {
                Ok(()) => TestResult::passed(),
                Err(e) => TestResult::error(e),
            }
        }
        QuickCheck::new()
            .tests(80)
            .quickcheck(prop as fn(u16, u16, u16, bool, u8, u64) -> TestResult);
    }
}
