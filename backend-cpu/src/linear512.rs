//! Linear layers on AVX-512 register blocks: `y = x w^T + b` in f32
//! ([`F32`], FMAs) and with bf16 operands ([`Bf16`],
//! AVX512-BF16's `VDPBF16PS`, for CPUs without AMX: AMD Zen 4 and later,
//! Intel Cooper Lake), both accumulating in f32.
//!
//! Why: a 2-core Zen 4 reaches 233 GFLOP/s on zmm FMAs and 460 on
//! `VDPBF16PS` (a register-only loop on both cores). The f32 block runs at
//! 208-225 GFLOP/s hot in L1, level with the AVX2 one of [`crate::sgemm`]
//! on whole products (~190-200) and ahead of the `gemm` crate at a few
//! hundred rows; what it adds is a weight packing made once per weight
//! tensor (the caller's cache) instead of once per call. The bf16 block runs
//! at ~390: one `VDPBF16PS` does 32 bf16 multiply-adds (16 lanes, each the
//! sum of a pair of products) in the time a zmm FMA does 16, and its
//! operands are half the bytes.
//!
//! Layout: `w (m, k)` is packed (once per weight, by the caller through
//! [`pack_weight`]) into panels of [`NR`] output
//! columns, `x` once per call in blocks of [`MR`] rows, both reduction-major, in 32-bit
//! words: one f32, or for bf16 the pair `(v[2p], v[2p + 1])` in the
//! interleaved ("VNNI") order the instruction wants (an odd `k` gets a zero
//! partner). So the register block loads [`NV`] zmm of the panel and
//! broadcasts [`MR`] words side by side per reduction step, into 24 zmm
//! accumulators. Tasks are [`MC`] rows by [`NC`] columns, column-major (a
//! thread's consecutive tasks reuse the same packed columns from L2), the
//! reduction in blocks of [`KW`] words whose panel slice (16 KiB) stays in
//! L1. The first block starts from the bias, the others accumulate in the
//! task's f32 tile, which is written out once (as f32, or rounded to bf16
//! for a bf16 activation).
//!
//! bf16 rounding is the instruction's: bf16 products are exact in f32, each
//! of the two additions per lane rounds to nearest even, and denormal inputs
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
/// Reduction block in words: a `KW x NR` panel slice is 16 KiB.
const KW: usize = 64;
/// Rows per task (a multiple of `MR`).
const MC: usize = MR * 8;
/// Output columns per task (a multiple of `NR`).
const NC: usize = NR * 4;

/// The operand types: how a row's reduction packs into 32-bit words, and
/// the register block that consumes them.
pub(crate) trait Kind {
    /// The stored element.
    type Elem: Copy + Sync;
    /// Whether this CPU has the block's instructions (and the block is not
    /// switched off); where it serves is `dense::linear`'s choice.
    fn available() -> bool;
    /// Elements per word.
    const PER_WORD: usize;
    /// Word `p` of a row: its elements `PER_WORD * p..`, zero past the end.
    fn word(row: &[Self::Elem], p: usize) -> u32;
    /// [`block_f32`] or [`block_bf16`].
    const BLOCK: Block;
}

/// A register block (`block_f32`, `block_bf16`): `(a, pc, panel, bias, dst,
/// ld, rows, ncols)` as documented on the `register_block!` macro.
type Block =
    unsafe fn(*const u32, usize, *const u32, Option<&[f32; NR]>, *mut f32, usize, usize, usize);

/// f32 operands, FMAs.
pub(crate) struct F32;
/// bf16 operands in pairs, `VDPBF16PS`.
pub(crate) struct Bf16;

impl Kind for F32 {
    type Elem = f32;
    /// AVX-512 (F, VL, BW, DQ) with FMA.
    fn available() -> bool {
        crate::util::simd_level() == crate::util::Level::V4
    }
    const PER_WORD: usize = 1;
    fn word(row: &[f32], p: usize) -> u32 {
        row[p].to_bits()
    }
    const BLOCK: Block = block_f32;
}

impl Kind for Bf16 {
    type Elem = bf16;
    /// AVX512-BF16 (with AVX512F/BW), unless `DCDIT_NO_DPBF16=1` (checked
    /// once).
    fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("DCDIT_NO_DPBF16").is_none()
                && std::is_x86_feature_detected!("avx512bf16")
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
        })
    }
    const PER_WORD: usize = 2;
    fn word(row: &[bf16], p: usize) -> u32 {
        let lo = row[2 * p].to_bits() as u32;
        let hi = row.get(2 * p + 1).map_or(0, |h| h.to_bits() as u32);
        lo | hi << 16
    }
    const BLOCK: Block = block_bf16;
}

/// `src (rows, k)` packed in blocks of `width` rows, reduction-major: word
/// `(b * kw + p) * width + r` is [`Kind::word`] `p` of row `i = b * width +
/// r`, `kw = ceil(k / PER_WORD)`. Rows past the end are zero, or with
/// `repeat_last` copies of the last row (computed by the register block,
/// never stored). The words live in a pooled f32 buffer (a fresh one per
/// call cost page faults), viewed as `u32`.
fn pack<K: Kind>(
    src: &[K::Elem],
    rows: usize,
    k: usize,
    width: usize,
    repeat_last: bool,
) -> Vec<f32> {
    let kw = k.div_ceil(K::PER_WORD);
    let mut out = crate::pool::take(rows.div_ceil(width) * kw * width);
    if kw == 0 || rows == 0 {
        return out;
    }
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut out);
    words
        .par_chunks_mut(kw * width)
        .enumerate()
        .for_each(|(b, dst)| {
            for r in 0..width {
                let i = b * width + r;
                let i = match (i < rows, repeat_last) {
                    (true, _) => i,
                    (false, true) => rows - 1,
                    (false, false) => {
                        for p in 0..kw {
                            dst[p * width + r] = 0;
                        }
                        continue;
                    }
                };
                let row = &src[i * k..(i + 1) * k];
                for p in 0..kw {
                    dst[p * width + r] = K::word(row, p);
                }
            }
        });
    out
}

/// Where a linear layer writes its `(n, m)` result.
pub(crate) enum Out<'a> {
    /// f32, as accumulated.
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

/// `w (m, k)` packed for [`linear`] with kind `K`: panels of [`NR`] rows of
/// `w`, reduction-major. Made once per weight and kept with it
/// (`tensor::Derived`).
pub(crate) fn pack_weight<K: Kind>(w: &[K::Elem], m: usize, k: usize) -> Vec<f32> {
    pack::<K>(w, m, k, NR, false)
}

/// `out (n, m) = x (n, k) w (m, k)^T [+ bias]` on the register block of kind
/// `K` ([`F32`]: f32 FMAs; [`Bf16`]: bf16 operands, f32 accumulation), `out`
/// overwritten; `pw` is `w` packed by [`pack_weight`].
///
/// Each task accumulates its `MC x NC` block in an f32 tile of its own
/// (contiguous, so it stays in L2 across the reduction blocks) and writes it
/// out once at the end, converted to bf16 for [`Out::Bf16`].
///
/// # Panics
/// If the CPU lacks the kind's instructions ([`Kind::available`]) or a
/// slice is shorter than its shape says (callers check shapes first).
pub(crate) fn linear<K: Kind>(
    x: &[K::Elem],
    n: usize,
    k: usize,
    pw: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: Out<'_>,
) {
    assert!(
        K::available(),
        "linear512: the CPU lacks this register block's instructions"
    );
    let kw = k.div_ceil(K::PER_WORD);
    assert!(x.len() >= n * k && pw.len() >= m.div_ceil(NR) * NR * kw && out.len() >= n * m);
    assert!(bias.is_none_or(|b| b.len() >= m));
    if n == 0 || m == 0 {
        return;
    }
    // x in blocks of MR rows, packed once per call (w comes packed).
    let px_buf = pack::<K>(x, n, k, MR, true);
    let (pw, px): (&[u32], &[u32]) = (bytemuck::cast_slice(pw), bytemuck::cast_slice(&px_buf));
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
            if kw == 0 {
                for row in tile.chunks_exact_mut(NC).take(r1 - r0) {
                    match bias {
                        Some(b) => row[..c1 - c0].copy_from_slice(&b[c0..c1]),
                        None => row.fill(0.0),
                    }
                }
            }
            for p0 in (0..kw).step_by(KW) {
                let pc = KW.min(kw - p0);
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
                    let panel = pw[((j0 / NR) * kw + p0) * NR..].as_ptr();
                    for i0 in (0..r1 - r0).step_by(MR) {
                        let rows = MR.min(r1 - r0 - i0);
                        // The block of rows r0 + i0.. (r0 is a multiple of MR).
                        let blk = &px[(((r0 + i0) / MR) * kw + p0) * MR..];
                        // SAFETY: the caller checked the CPU; the panel
                        // slice holds pc * NR words, the row block pc * MR;
                        // the destination block (rows x ncols at stride NC)
                        // lies inside the task's tile.
                        unsafe {
                            (K::BLOCK)(
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
                // and this task's alone; the CPU has AVX-512 (checked by the
                // caller).
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

/// Defines one `MR x NR` register block: `dst[r][j] = init[r][j] + sum_p
/// a[p][r] . panel[p][j]` over `pc` words (`a` packed `(pc, MR)`), for `r <
/// rows`, `j < ncols`; `init` is `bias` or, with `None`, `dst`'s own value.
/// `|acc, a word, panel vector| step` is one reduction step of one
/// accumulator, expanded in place. A macro rather than a generic function so that each block
/// is compiled with its own target features and its step inlined.
macro_rules! register_block {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$c:ident, $a:ident, $b:ident| $step:expr) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
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
                let b: [__m512i; NV] =
                    std::array::from_fn(|v| _mm512_loadu_si512(panel.add(p * NR + 16 * v).cast()));
                let ap = a.add(p * MR);
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(*ap.add(r) as i32);
                    for (c, bv) in row.iter_mut().zip(&b) {
                        let ($c, $a, $b) = (*c, av, *bv);
                        *c = $step;
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(rows) {
                for (v, a) in row.iter().enumerate() {
                    _mm512_mask_storeu_ps(dst.add(r * ld + 16 * v), mask[v], *a);
                }
            }
        }
    };
}

register_block!(
    /// The f32 register block: one FMA per accumulator and word.
    block_f32,
    "avx512f",
    |c, a, b| _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), c)
);

register_block!(
    /// The bf16 register block: one `VDPBF16PS` (a pair of products) per
    /// accumulator and word.
    block_bf16,
    "avx512f,avx512bw,avx512bf16",
    |c, a, b| _mm512_dpbf16_ps(c, std::mem::transmute::<__m512i, __m512bh>(a), std::mem::transmute::<__m512i, __m512bh>(b))
);

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};

    /// One random case of `K` at `(n, k, m)` against an f64 definition on
    /// the same values (bf16 products are exact, so the difference is f32
    /// accumulation), within 1e-6 of the summed magnitudes.
    fn case<K: Kind>(
        seed: u64,
        (n, k, m): (usize, usize, usize),
        bias: bool,
        elem: fn(f32) -> K::Elem,
        to_f64: fn(K::Elem) -> f64,
    ) -> TestResult {
        let mut rng = dcdit_core::rng::Rng::new(seed);
        let mut draw =
            |c: usize| -> Vec<K::Elem> { (0..c).map(|_| elem(rng.normal() as f32)).collect() };
        let (x, w) = (draw(n * k), draw(m * k));
        let b: Vec<f32> = draw(m).into_iter().map(|v| to_f64(v) as f32).collect();
        let pw = pack::<K>(&w, m, k, NR, false);
        let mut out = vec![f32::NAN; n * m];
        linear::<K>(&x, n, k, &pw, m, bias.then_some(&b[..]), Out::F32(&mut out));
        // The bf16 output is the f32 one rounded by the storage conversion.
        let mut out16 = vec![bf16::NAN; n * m];
        linear::<K>(
            &x,
            n,
            k,
            &pw,
            m,
            bias.then_some(&b[..]),
            Out::Bf16(&mut out16),
        );
        let mut want16 = vec![bf16::ZERO; n * m];
        crate::tensor::f32_to_bf16(&out, &mut want16);
        if out16 != want16 {
            return TestResult::error(format!("n {n} k {k} m {m}: bf16 output differs"));
        }
        let f64s = |v: &[K::Elem]| v.iter().map(|&a| to_f64(a)).collect::<Vec<_>>();
        let b: Vec<f64> = b.iter().map(|&a| a as f64).collect();
        crate::util::check_linear(
            &f64s(&x),
            &f64s(&w),
            bias.then_some(&b[..]),
            (n, k, m),
            &out,
        )
    }

    /// A quickcheck shape: rows past MR / MC, columns past 16 / NR / NC, odd
    /// reductions and reductions past KW (several accumulating blocks), and
    /// none.
    fn shape(n: u16, k: u16, m: u16) -> (usize, usize, usize) {
        (n as usize % 200 + 1, k as usize % 700, m as usize % 300 + 1)
    }

    /// Fixed shapes past every block size.
    const SHAPES: [(usize, usize, usize); 4] =
        [(1, 1, 1), (13, 513, 33), (96, 768, 256), (97, 257, 257)];

    fn f32_case(seed: u64, shape: (usize, usize, usize), bias: bool) -> TestResult {
        case::<F32>(seed, shape, bias, |v| v, |v| v as f64)
    }

    fn bf16_case(seed: u64, shape: (usize, usize, usize), bias: bool) -> TestResult {
        case::<Bf16>(seed, shape, bias, bf16::from_f32, |v| v.to_f64())
    }

    type Case = fn(u64, (usize, usize, usize), bool) -> TestResult;
    type Prop = fn(u64, u16, u16, u16, bool) -> TestResult;

    /// Runs `prop` under quickcheck and `case` on [`SHAPES`], or says why
    /// not when the CPU lacks the kind's instructions.
    fn check(available: bool, what: &str, prop: Prop, case: Case) {
        if !available {
            eprintln!("SKIPPED: no {what} on this CPU");
            return;
        }
        QuickCheck::new().tests(40).quickcheck(prop);
        for s in SHAPES {
            assert!(!case(3, s, true).is_failure(), "{s:?}");
        }
    }

    #[test]
    fn f32_matches_the_definition() {
        fn prop(seed: u64, n: u16, k: u16, m: u16, bias: bool) -> TestResult {
            f32_case(seed, shape(n, k, m), bias)
        }
        check(F32::available(), "AVX-512", prop, f32_case);
    }

    #[test]
    fn bf16_matches_the_definition() {
        fn prop(seed: u64, n: u16, k: u16, m: u16, bias: bool) -> TestResult {
            bf16_case(seed, shape(n, k, m), bias)
        }
        check(Bf16::available(), "AVX512-BF16", prop, bf16_case);
    }
}
