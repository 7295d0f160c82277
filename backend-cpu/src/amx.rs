//! bf16 matrix multiply on Intel AMX tiles (`TDPBF16PS`), for linear layers
//! whose input and weight are both stored as bf16.
//!
//! Why AMX: on the CPUs that have it (Sapphire Rapids and later) one tile
//! instruction does a 16x16x32 bf16 product with f32 accumulation, an order
//! of magnitude more multiply-adds per cycle than AVX-512 FMAs (and than
//! `VDPBF16PS`, which on these cores issues at the f32 FMA rate). Stable Rust
//! has no AMX intrinsics, so the handful of tile instructions are inline
//! assembly; everything else (packing, blocking, threads) is plain Rust.
//!
//! `C (m, n) = A (m, k) · Wᵀ` with `W (n, k)`, both row-major bf16, C in f32:
//! * A is copied into a zero-padded `(⌈m/32⌉·32, ⌈k/32⌉·32)` buffer, so tile
//!   loads never read past a row (tiles are 16 rows x 32 bf16).
//! * W is packed into the tiles' pair-interleaved ("VNNI") layout: row `p`
//!   of the packed B holds, for every output column `j`, the two bf16
//!   `W[j][2p], W[j][2p+1]` as one 32-bit word. Since W's rows are contiguous
//!   along k, this is a transpose of 32-bit words.
//! * Each task owns a block of `MC` rows by `NC` columns; within it a
//!   32x32 output block is 4 accumulator tiles (tmm4-7) fed by 2 A tiles
//!   (tmm0-1) and 2 B tiles (tmm2-3) per 32-wide slice of k. The A block
//!   (`MC x k`) and B panel (`k x NC`) stay in the core's L2 across the block.
//! * The f32 accumulation is AMX's: products of bf16 are exact in f32, sums
//!   are rounded to nearest even, denormals flush to zero (tested against an
//!   f64 reference on bf16 inputs).
//!
//! The kernel runs only when the CPU reports `amx_tile` and `amx_bf16` and the
//! kernel grants the process the tile state (`arch_prctl`); otherwise, or
//! with `DCDIT_NO_AMX=1`, [`available`] is false and callers use the f32 path.

use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of a task's block (a multiple of 32).
const MC: usize = 128;
/// Columns of a task's block (a multiple of 32).
const NC: usize = 128;

/// Whether the AMX bf16 kernel can run in this process (checked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var("DCDIT_NO_AMX").is_ok_and(|v| v == "1") {
            return false;
        }
        detect()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7 sub-leaf 0, EDX bit 22 (AMX-BF16) and 24 (AMX-TILE);
    // OSXSAVE must be on for the tile state to exist.
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let has = l7.edx & (1 << 22) != 0 && l7.edx & (1 << 24) != 0;
    if !has {
        return false;
    }
    // Linux hands out the 8 KiB tile-data state only on request:
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18).
    let ret: i64;
    // SAFETY: the arch_prctl system call (158) with these arguments only
    // changes the process's permitted xsave features; rcx and r11 are
    // clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") 0x1023i64,
            in("rsi") 18i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `c (m, n) = a (m, k) · wᵀ` (`w (n, k)`), overwriting `c`. `threads`
/// bounds the parallelism (the caller's rayon pool runs the tasks).
///
/// # Panics
/// If [`available`] is false or a slice is shorter than its shape.
pub fn gemm_bf16(m: usize, n: usize, k: usize, a: &[bf16], w: &[bf16], c: &mut [f32]) {
    assert!(available(), "gemm_bf16: AMX is not available");
    assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let kt = k.div_ceil(32); // 32-wide slices of k
    let mt = m.div_ceil(32) * 2; // 16-row tiles of A (an even count)
    let nt = n.div_ceil(32) * 2; // 16-column tiles of B (an even count)
                                 // A in tile order: tile (i, s) holds rows 16i.. and k 32s.. as 16 rows of
                                 // 32 bf16, 1 KiB contiguous, zero-padded. Contiguous tiles make every
                                 // tile load one streaming 1 KiB read (with row-major operands each of the
                                 // 16 rows sits on its own page: TLB misses dominated).
    let mut ap = vec![bf16::ZERO; mt * kt * 512];
    ap.par_chunks_mut(kt * 512)
        .enumerate()
        .for_each(|(i, dst)| {
            for (sl, tile) in dst.chunks_exact_mut(512).enumerate() {
                for r in 0..16 {
                    let row = i * 16 + r;
                    if row >= m {
                        break;
                    }
                    let k0 = sl * 32;
                    let len = 32.min(k - k0);
                    tile[r * 32..r * 32 + len]
                        .copy_from_slice(&a[row * k + k0..row * k + k0 + len]);
                }
            }
        });
    // W in tile order and pair-interleaved: tile (j, s) holds, for k pairs
    // p = 0..16 of slice s and columns 16j + c, the word
    // (w[16j + c][32s + 2p], w[16j + c][32s + 2p + 1]).
    let mut bp = vec![0u32; nt * kt * 256];
    bp.par_chunks_mut(kt * 256)
        .enumerate()
        .for_each(|(j, dst)| {
            for (sl, tile) in dst.chunks_exact_mut(256).enumerate() {
                for c in 0..16 {
                    let col = j * 16 + c;
                    if col >= n {
                        break;
                    }
                    let wr = &w[col * k..(col + 1) * k];
                    for p in 0..16 {
                        let e = sl * 32 + 2 * p;
                        let lo = if e < k { wr[e].to_bits() } else { 0 };
                        let hi = if e + 1 < k { wr[e + 1].to_bits() } else { 0 };
                        tile[p * 16 + c] = lo as u32 | (hi as u32) << 16;
                    }
                }
            }
        });
    let (mp, np) = (mt * 16, nt * 16);
    let tasks: Vec<(usize, usize)> = (0..mp)
        .step_by(MC)
        .flat_map(|m0| (0..np).step_by(NC).map(move |n0| (m0, n0)))
        .collect();
    let cptr = crate::util::SyncPtr(c.as_mut_ptr());
    let (ap, bp) = (&ap[..], &bp[..]);
    tasks.par_iter().with_max_len(1).for_each(|&(m0, n0)| {
        let m1 = (m0 + MC).min(mp);
        let n1 = (n0 + NC).min(np);
        let mut tile = [0.0f32; 32 * 32];
        // SAFETY: the tile configuration below describes 16x64-byte tiles;
        // every tile load reads one whole 1 KiB tile of `ap` / `bp` (tile
        // counts are even, so the second tile of a pair exists), every store
        // writes 16 rows of 64 bytes inside `tile`.
        unsafe {
            configure();
            for mb in (m0..m1).step_by(32) {
                for nb in (n0..n1).step_by(32) {
                    let a0 = ap.as_ptr().add((mb / 16) * kt * 512);
                    let b0 = bp.as_ptr().add((nb / 16) * kt * 256);
                    block(a0, b0, kt, &mut tile);
                    // Copy the valid part of the 32x32 block out; this task
                    // owns rows m0..m1 and columns n0..n1 of c.
                    for i in 0..32.min(m.saturating_sub(mb)) {
                        let cols = 32.min(n.saturating_sub(nb));
                        let dst = cptr.get().add((mb + i) * n + nb);
                        std::ptr::copy_nonoverlapping(tile.as_ptr().add(i * 32), dst, cols);
                    }
                }
            }
            std::arch::asm!("tilerelease", options(nostack));
        }
    });
}

/// Loads the tile configuration: palette 1, tmm0-7 all 16 rows x 64 bytes.
///
/// # Safety
/// The CPU must support AMX and the process must hold the tile state.
unsafe fn configure() {
    #[repr(C, align(64))]
    struct Cfg([u8; 64]);
    let mut cfg = Cfg([0; 64]);
    cfg.0[0] = 1; // palette
    for t in 0..8 {
        cfg.0[16 + 2 * t] = 64; // bytes per row (u16, little endian)
        cfg.0[48 + t] = 16; // rows
    }
    std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
}

/// One 32x32 output block over all `kt` slices of k, stored row-major
/// (stride 32) into `tile`. `a0` points at the first of the block's two
/// 16-row A tile rows (`kt` tiles each, the second row `kt` tiles later),
/// `b0` at the first of its two 16-column B tile columns.
///
/// # Safety
/// [`configure`] has run on this thread; `a0` / `b0` have `2 * kt` tiles
/// (1 KiB each) behind them.
unsafe fn block(a0: *const bf16, b0: *const u32, kt: usize, tile: &mut [f32; 1024]) {
    use std::arch::asm;
    asm!(
        "tilezero tmm4",
        "tilezero tmm5",
        "tilezero tmm6",
        "tilezero tmm7",
        options(nostack)
    );
    let (a1, b1) = (a0.add(kt * 512), b0.add(kt * 256));
    for s in 0..kt {
        asm!(
            "tileloadd tmm0, [{a0} + {st}*1]",
            "tileloadd tmm1, [{a1} + {st}*1]",
            "tileloadd tmm2, [{b0} + {st}*1]",
            "tileloadd tmm3, [{b1} + {st}*1]",
            "tdpbf16ps tmm4, tmm0, tmm2",
            "tdpbf16ps tmm5, tmm0, tmm3",
            "tdpbf16ps tmm6, tmm1, tmm2",
            "tdpbf16ps tmm7, tmm1, tmm3",
            a0 = in(reg) a0.add(s * 512),
            a1 = in(reg) a1.add(s * 512),
            b0 = in(reg) b0.add(s * 256),
            b1 = in(reg) b1.add(s * 256),
            st = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    let t = tile.as_mut_ptr() as *mut u8;
    let s = 32 * 4usize;
    asm!(
        "tilestored [{p0} + {s}*1], tmm4",
        "tilestored [{p1} + {s}*1], tmm5",
        "tilestored [{p2} + {s}*1], tmm6",
        "tilestored [{p3} + {s}*1], tmm7",
        p0 = in(reg) t,
        p1 = in(reg) t.add(64),
        p2 = in(reg) t.add(16 * s),
        p3 = in(reg) t.add(16 * s + 64),
        s = in(reg) s,
        options(nostack)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<bf16> {
        crate::util::test_data(n, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// Against an f64 reference on the same bf16 values (products exact, so
    /// the difference is only f32 accumulation), on shapes that are not
    /// multiples of the tiles and span several tasks.
    #[test]
    fn matches_f64_reference() {
        if !available() {
            eprintln!("SKIPPED: no AMX on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 3),
            (33, 17, 31),
            (16, 16, 32),
            (130, 70, 65),
            (257, 129, 96),
            (64, 300, 1000),
        ] {
            let a = data(m * k, 1 + m as u64);
            let w = data(n * k, 2 + n as u64);
            let mut c = vec![f32::NAN; m * n];
            gemm_bf16(m, n, k, &a, &w, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| a[i * k + p].to_f64() * w[j * k + p].to_f64())
                        .sum();
                    let mag: f64 = (0..k)
                        .map(|p| (a[i * k + p].to_f64() * w[j * k + p].to_f64()).abs())
                        .sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + mag),
                        "({m},{n},{k}) at ({i},{j}): got {got}, want {want}"
                    );
                }
            }
        }
    }
}
