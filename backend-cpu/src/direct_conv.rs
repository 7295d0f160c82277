//! Direct stride-1 "same" convolution for AVX2 + FMA CPUs: a register block
//! of [`MR`] output pixels x [`NR`] output channels (12 ymm accumulators)
//! whose input operand is read straight from the zero-padded NHWC layout
//! ([`Padded`]) and whose weights are packed once per call into panels of
//! `NR` channels.
//!
//! Why not the sliding-window GEMMs of `dense::conv_padded` here: those
//! compute every padded position (discarding the padding's outputs), run one
//! accumulating GEMM per kernel row (the output read and written `k` times)
//! and copy the interior out; at DC-DiT-B's 3x3 192->192 they reached
//! ~114 GFLOP/s on a 2-core Zen 3 where oneDNN's direct convolution ran at
//! 143. This kernel computes only interior pixels, reads every kernel row's
//! window (`k * cin` contiguous floats of the padded input per pixel) as the
//! broadcast operand without packing, and writes each output once, bias
//! included. For every `k`-step of the reduction it issues 6 broadcasts, 2
//! weight loads and 12 FMAs: FMA-bound on two FMA ports.
//!
//! Used on x86-64 CPUs with AVX2 + FMA and no full-width AVX-512 (see
//! [`crate::microkernel::available`]); [`available`] says which. The module
//! exists on x86-64 only.

use rayon::prelude::*;

use crate::dense::Padded;
use crate::microkernel::{block, MR, NR};
use dcdit_core::backend::Grid;

/// Output pixels per parallel task (a multiple of `MR`): enough blocks to
/// reuse each packed weight panel from L2 many times.
const TASK_PIXELS: usize = MR * 32;

/// Whether convolutions take the direct kernel: AVX2 + FMA, unless `DCDIT_CONV_GEMM=1` asks for the sliding-window GEMMs (for
/// comparisons).
pub(crate) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        crate::microkernel::available() && std::env::var_os("DCDIT_CONV_GEMM").is_none()
    })
}

/// OHWI weights `(cout, kc)` packed into `ceil(cout / NR)` panels of
/// `(kc, NR)` floats, zero past `cout`.
pub(crate) fn pack_weights(wt: &[f32], cout: usize, kc: usize) -> Vec<f32> {
    let panels = cout.div_ceil(NR);
    let mut p = crate::pool::take(panels * kc * NR);
    p.par_chunks_mut(kc * NR)
        .enumerate()
        .for_each(|(blk, panel)| {
            for j in 0..NR {
                let o = blk * NR + j;
                if o < cout {
                    let src = &wt[o * kc..(o + 1) * kc];
                    for (kk, &v) in src.iter().enumerate() {
                        panel[kk * NR + j] = v;
                    }
                } else {
                    for kk in 0..kc {
                        panel[kk * NR + j] = 0.0;
                    }
                }
            }
        });
    p
}

/// Stride-1 "same" convolution of `xp` (the [`Padded`] layout of a
/// `(grid.rows(), cin)` input, padding `k / 2`) with OHWI `wt (cout, k, k,
/// cin)`, written to `out (grid.rows(), cout)` (overwritten; the bias added).
/// The caller checks [`available`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    xp: &Padded,
    grid: Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let kc = k * k * cin;
    let rows = grid.rows();
    debug_assert_eq!(wt.len(), cout * kc);
    debug_assert_eq!(out.len(), rows * cout);
    if rows == 0 || cout == 0 {
        return;
    }
    let pw = pack_weights(wt, cout, kc);
    let (h, w) = (grid.height, grid.width);
    // Interior pixel i (NHWC order): where its window starts in the buffer.
    let window = |i: usize| {
        let (b, r) = (i / (h * w), i % (h * w));
        xp.position(b, r / w, r % w) * cin
    };
    let data = xp.data.as_ptr() as usize;
    let ky_stride = xp.wp * cin;
    let kcin = k * cin;
    let panels = cout.div_ceil(NR);
    out.par_chunks_mut(TASK_PIXELS * cout)
        .enumerate()
        .for_each(|(task, oc)| {
            let i0 = task * TASK_PIXELS;
            let n = oc.len() / cout;
            let data = data as *const f32;
            for blk in 0..panels {
                let panel = &pw[blk * kc * NR..(blk + 1) * kc * NR];
                let c0 = blk * NR;
                let ncols = NR.min(cout - c0);
                let mut b16 = [0.0f32; NR];
                if let Some(bias) = bias {
                    b16[..ncols].copy_from_slice(&bias[c0..c0 + ncols]);
                }
                for p0 in (0..n).step_by(MR) {
                    let m = MR.min(n - p0);
                    // Rows past `m` repeat the last pixel (read, never stored).
                    // SAFETY: every window lies inside the padded buffer (its
                    // margins), see `Padded`.
                    let a: [*const f32; MR] = std::array::from_fn(|r| unsafe {
                        data.add(window(i0 + p0 + r.min(m - 1)))
                    });
                    let dst = oc[p0 * cout + c0..].as_mut_ptr();
                    // SAFETY: AVX2 + FMA checked by the caller (`available`);
                    // the `m` destination rows of `ncols` floats (stride
                    // `cout`) lie inside `oc`; the panel holds kc * NR floats.
                    unsafe {
                        block::<false>(
                            &a,
                            1,
                            ky_stride,
                            k,
                            kcin,
                            panel.as_ptr(),
                            NR,
                            Some(&b16),
                            dst,
                            cout,
                            m,
                            ncols,
                        );
                    }
                }
            }
        });
    crate::pool::give(pw);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{conv_case, no_avx2_fma};
    use quickcheck::{QuickCheck, TestResult};

    #[test]
    fn matches_the_definition() {
        if no_avx2_fma() {
            return;
        }
        // Odd pixel counts (blocks of fewer than MR pixels), channel counts
        // around NR (partial panels), k 1/3/5, several tasks. Called
        // directly: `available` is false on AVX-512 CPUs (they take the
        // GEMMs), but the kernel needs only AVX2 + FMA, checked above, so
        // CI machines of either kind test it.
        fn prop(seed: u64, bhw: (u8, u8, u8), cin: u8, cout: u8, k: u8, bias: bool) -> TestResult {
            let k = [1, 3, 3, 5][k as usize % 4];
            let kernel =
                |_xs: &[f32],
                 xp: &Padded,
                 g,
                 cin,
                 wt: &[f32],
                 cout,
                 k,
                 b: Option<&[f32]>,
                 out: &mut [f32]| { conv(xp, g, cin, wt, cout, k, b, out) };
            conv_case(&kernel, seed, bhw, cin, cout, k, bias)
        }
        QuickCheck::new()
            .tests(60)
            .quickcheck(prop as fn(u64, (u8, u8, u8), u8, u8, u8, bool) -> TestResult);
    }
}
