//! The AVX2 + FMA register block shared by the direct convolution
//! ([`crate::direct_conv`]), the Winograd convolution ([`crate::winograd`])
//! and the packed linear GEMM ([`crate::sgemm`]): `MR x NR` outputs in 12 ymm
//! accumulators, each reduction step 6 broadcasts of the left operand, 2
//! loads of the right one and 12 FMAs, so it runs at the FMA ports' rate
//! whatever the operands' strides. The callers arrange their operands as
//! rows of the left operand and `NR`-wide rows of the right one; no packing
//! is needed when those exist in place. The module exists on x86-64 only.

/// Rows (left-operand rows, e.g. output pixels) per register block.
pub(crate) const MR: usize = 6;
/// Columns (e.g. output channels) per register block: two 8-lane vectors.
pub(crate) const NR: usize = 16;

/// Whether the kernels built on [`block`] are used: AVX2 + FMA CPUs without
/// AVX-512, and AVX-512 CPUs that execute 512-bit operations as two 256-bit
/// halves (AMD Zen 4, family 25), where ymm FMAs reach the same peak.
/// `DCDIT_AVX2_KERNELS=1` or `=0` forces the choice (for comparisons).
///
/// On a 2-core Zen 4 they made the DC-DiT-B forward at 25% kept 6-11%
/// faster than the `gemm` crate's AVX-512 kernels with the sliding-window
/// convolutions (2479/2561 ms against 2785/2731 ms, encoder + decoder
/// 315-345 ms against 525-535 ms, the linear layers level). On cores with
/// full-width 512-bit FMA units (Intel server parts, Zen 5) the `gemm`
/// crate's AVX-512 kernels keep serving: those were not measured against
/// these, and at half the vector width these could lose up to 2x there.
pub(crate) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        use crate::util::Level;
        let level = crate::util::simd_level();
        match std::env::var("DCDIT_AVX2_KERNELS").as_deref() {
            Ok("0") => false,
            Ok("1") => matches!(level, Level::V3 | Level::V4),
            _ => level == Level::V3 || (level == Level::V4 && half_width_avx512()),
        }
    })
}

/// Whether this is an AMD family-25 CPU (Zen 3 has no AVX-512, so with it:
/// Zen 4, whose AVX-512 units are 256 bits wide).
fn half_width_avx512() -> bool {
    use std::arch::x86_64::__cpuid;
    let (l0, l1) = (__cpuid(0), __cpuid(1));
    let amd = (l0.ebx, l0.edx, l0.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
    let base = (l1.eax >> 8) & 0xf;
    let family = if base == 0xf {
        base + ((l1.eax >> 20) & 0xff)
    } else {
        base
    };
    amd && family == 25
}

/// One `MR x NR` output block: `dst[r][j] = init[r][j] + sum_{ky, t}
/// a[r][ky * ky_stride + t * sa] * w[(ky * kcin + t) * ldw + j]` for `r <
/// m`, `j < ncols`, where `sa` is 1 unless `STRIDED` (then `a_stride`) and
/// `init` is `bias[j]` or, with `bias` `None`, `dst`'s own value
/// (accumulation). Columns `ncols..NR` of `w` are read but only affect the
/// unstored columns.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block<const STRIDED: bool>(
    a: &[*const f32; MR],
    a_stride: usize,
    ky_stride: usize,
    k: usize,
    kcin: usize,
    w: *const f32,
    ldw: usize,
    bias: Option<&[f32; NR]>,
    dst: *mut f32,
    ld: usize,
    m: usize,
    ncols: usize,
) {
    use std::arch::x86_64::*;
    let sa = if STRIDED { a_stride } else { 1 };
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for (r, v) in acc.iter_mut().enumerate().take(m) {
        *v = match bias {
            Some(b) => [
                _mm256_loadu_ps(b.as_ptr()),
                _mm256_loadu_ps(b.as_ptr().add(8)),
            ],
            None if ncols == NR => [
                _mm256_loadu_ps(dst.add(r * ld)),
                _mm256_loadu_ps(dst.add(r * ld + 8)),
            ],
            None => {
                let mut tmp = [0.0f32; NR];
                for (j, t) in tmp.iter_mut().enumerate().take(ncols) {
                    *t = *dst.add(r * ld + j);
                }
                [
                    _mm256_loadu_ps(tmp.as_ptr()),
                    _mm256_loadu_ps(tmp.as_ptr().add(8)),
                ]
            }
        };
    }
    let mut wp = w;
    for ky in 0..k {
        let off = ky * ky_stride;
        let p: [*const f32; MR] = std::array::from_fn(|r| a[r].add(off));
        for t in 0..kcin {
            let w0 = _mm256_loadu_ps(wp);
            let w1 = _mm256_loadu_ps(wp.add(8));
            for r in 0..MR {
                let x = _mm256_broadcast_ss(&*p[r].add(t * sa));
                acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
            }
            wp = wp.add(ldw);
        }
    }
    for (r, v) in acc.iter().enumerate().take(m) {
        let d = dst.add(r * ld);
        if ncols == NR {
            _mm256_storeu_ps(d, v[0]);
            _mm256_storeu_ps(d.add(8), v[1]);
        } else {
            let mut tmp = [0.0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v[1]);
            for (j, &t) in tmp.iter().enumerate().take(ncols) {
                *d.add(j) = t;
            }
        }
    }
}
