//! Winograd F(2x2, 3x3) convolution for AVX2 + FMA CPUs: each 2x2 block of
//! output pixels (a tile) is computed from the 4x4 input window around it
//! with 16 multiplications per input/output channel pair instead of 36, so
//! a 3x3 convolution does 2.25x fewer multiply-adds than the direct kernel
//! ([`crate::direct_conv`]) or PyTorch's oneDNN direct convolution.
//!
//! For `Y = A^T [(G g G^T) . (B^T d B)] A` (Lavin & Gray, 2015), with
//!
//! ```text
//! B^T = | 1  0 -1  0 |    G = | 1    0    0  |    A^T = | 1  1  1  0 |
//!       | 0  1  1  0 |        | 1/2  1/2  1/2|          | 0  1 -1 -1 |
//!       | 0 -1  1  0 |        | 1/2 -1/2  1/2|
//!       | 0  1  0 -1 |        | 0    0    1  |
//! ```
//!
//! every entry is 0, +-1 or +-1/2, so the transforms are exact in f32 up to
//! the rounding of their additions: the results stay within a few ulp of
//! the direct convolution's (checked against the f64 definition below).
//!
//! Work is split into tasks of [`TILES`] tiles. A task transforms its input
//! windows into `V (16, tiles, cin)`, runs the 16 products `M_xi = V_xi U_xi`
//! (`U (16, cin, cout)`, the transformed weights, packed into 16-channel
//! panels once per call) with the direct kernel's 6x16 register block, and
//! transforms `M (16, tiles, cout)` back into output pixels, bias added.
//!
//! Used for 3x3 kernels with at least [`MIN_CHANNELS`] input and output
//! channels wherever the direct kernel is (see
//! [`crate::microkernel::available`]);
//! `DCDIT_CONV_DIRECT=1` selects the direct kernel instead (for
//! comparisons). The module exists on x86-64 only.

use rayon::prelude::*;

use crate::microkernel::{block, MR, NR};
use crate::util::sum_of_parts;
use dcdit_core::backend::Grid;

/// Tiles (2x2 output pixels) per parallel task, a multiple of [`MR`]: the
/// task's `V` and `M` (`16 * xi_stride(channels)` floats each) stay in L2 at
/// 192 channels, and each transformed-weight panel is reused by
/// `TILES / MR` register blocks.
const TILES: usize = MR * 8;

/// Distance in floats between the 16 transformed matrices of a task's `V`
/// (or `M`, `Yh`) of `c` channels: `TILES * c` plus one cache line, because
/// a tile's transform writes (and the output transform reads) one row in
/// each of the 16, and at 64 channels `TILES * c` floats is 12 KiB, a
/// multiple of 4 KiB, so all 16 rows fell in the same L1 set (8 ways).
fn xi_stride(c: usize) -> usize {
    TILES * c + 16
}

/// Fewest input and output channels for which the transforms pay off: at
/// 16 channels the per-tile work (window pointers, transforms of two
/// vectors per pixel) made the forward 1.4-2x slower than the direct kernel
/// on a 2-core Zen 3; at 32 the two were level and the weight gradient gained.
const MIN_CHANNELS: usize = 32;

/// Whether [`conv`] and [`weight_grad`] handle this convolution: where the
/// direct kernel is used ([`crate::direct_conv::available`]), 3x3, enough
/// channels, and not `DCDIT_CONV_DIRECT=1`.
pub(crate) fn applies(k: usize, cin: usize, cout: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    k == 3
        && cin >= MIN_CHANNELS
        && cout >= MIN_CHANNELS
        && crate::direct_conv::available()
        && !*OFF.get_or_init(|| std::env::var_os("DCDIT_CONV_DIRECT").is_some())
}

/// `U = G g G^T` for every `(cout, cin)` pair of OHWI `wt (cout, 3, 3, cin)`,
/// laid out `(16, panels, cin, NR)`: element `xi = 4 i + j` of the 4x4
/// transform of output channel `p * NR + l` and input channel `c` at
/// `((xi * panels + p) * cin + c) * NR + l`, zero past `cout`.
fn transform_weights(wt: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let panels = cout.div_ceil(NR);
    let mut u = crate::pool::take(16 * panels * cin * NR);
    u.fill(0.0);
    for o in 0..cout {
        let (p, l) = (o / NR, o % NR);
        for c in 0..cin {
            let g = |ky: usize, kx: usize| wt[((o * 3 + ky) * 3 + kx) * cin + c];
            // G g: 4 rows of 3.
            let [g0, g1, g2]: [[f32; 3]; 3] =
                std::array::from_fn(|ky| std::array::from_fn(|kx| g(ky, kx)));
            let gg = [
                g0,
                std::array::from_fn(|x| 0.5 * (g0[x] + g1[x] + g2[x])),
                std::array::from_fn(|x| 0.5 * (g0[x] - g1[x] + g2[x])),
                g2,
            ];
            // (G g) G^T: 4 x 4.
            for (i, r) in gg.iter().enumerate() {
                let row = [
                    r[0],
                    0.5 * (r[0] + r[1] + r[2]),
                    0.5 * (r[0] - r[1] + r[2]),
                    r[2],
                ];
                for (j, &v) in row.iter().enumerate() {
                    u[(((4 * i + j) * panels + p) * cin + c) * NR + l] = v;
                }
            }
        }
    }
    u
}

/// The 2x2 output tiles of a grid, in (image, tile row, tile column) order.
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    count: usize,
}

impl Tiles {
    fn new(grid: Grid) -> Tiles {
        let (h, w) = (grid.height, grid.width);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        Tiles {
            h,
            w,
            th,
            tw,
            count: grid.batch * th * tw,
        }
    }

    /// Image and top-left output pixel of tile `t`.
    fn origin(&self, t: usize) -> (usize, usize, usize) {
        let (b, rest) = (t / (self.th * self.tw), t % (self.th * self.tw));
        (b, 2 * (rest / self.tw), 2 * (rest % self.tw))
    }

    /// Row index (NHWC) of pixel `(b, y, x)`, `None` outside the image.
    fn pixel(&self, b: usize, y: isize, x: isize) -> Option<usize> {
        (y >= 0 && x >= 0 && (y as usize) < self.h && (x as usize) < self.w)
            .then(|| (b * self.h + y as usize) * self.w + x as usize)
    }

    /// The 4x4 input window of tile `t` (row-major pixels of `c` channels of
    /// `xs`, the unpadded `(rows, c)` input); pixels outside the image are
    /// `zeros`, so no zero-padded copy of the input is needed.
    fn window<'a>(&self, xs: &'a [f32], c: usize, zeros: &'a [f32], t: usize) -> [&'a [f32]; 16] {
        let (b, y0, x0) = self.origin(t);
        std::array::from_fn(|i| {
            let (y, x) = ((y0 + i / 4) as isize - 1, (x0 + i % 4) as isize - 1);
            match self.pixel(b, y, x) {
                None => zeros,
                Some(p) => &xs[p * c..(p + 1) * c],
            }
        })
    }
}

/// Stride-1 "same" 3x3 convolution of `xs (grid.rows(), cin)` (read in
/// place: no zero-padded copy) with OHWI `wt (cout, 3, 3, cin)`,
/// written to `out (grid.rows(), cout)` (overwritten; the bias added). The
/// caller checks [`applies`].
pub(crate) fn conv(
    xs: &[f32],
    grid: Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(wt.len(), cout * 9 * cin);
    debug_assert_eq!(out.len(), grid.rows() * cout);
    debug_assert_eq!(xs.len(), grid.rows() * cin);
    if grid.rows() == 0 || cout == 0 {
        return;
    }
    let u = transform_weights(wt, cin, cout);
    let tiles = Tiles::new(grid);
    let panels = cout.div_ceil(NR);
    let zeros = vec![0.0f32; cin];
    let outp = out.as_mut_ptr() as usize;
    (0..tiles.count.div_ceil(TILES))
        .into_par_iter()
        .for_each(|task| {
            let t0 = task * TILES;
            let n = TILES.min(tiles.count - t0);
            let (vs, ms) = (xi_stride(cin), xi_stride(cout));
            let mut v = crate::pool::take(16 * vs);
            let mut m = crate::pool::take(16 * ms);
            // Input transform: V[xi][t] = (B^T d B)[xi] per channel.
            for t in 0..n {
                let d = tiles.window(xs, cin, &zeros, t0 + t);
                // SAFETY: AVX2 checked by the caller; `v` holds 16 * vs.
                unsafe { input_tile(&d, &mut v, t * cin, vs) };
            }
            // The 16 products, one transformed-weight panel at a time.
            for xi in 0..16 {
                for p in 0..panels {
                    let panel = &u[(xi * panels + p) * cin * NR..][..cin * NR];
                    let c0 = p * NR;
                    let ncols = NR.min(cout - c0);
                    for r0 in (0..n).step_by(MR) {
                        let rows = MR.min(n - r0);
                        let a: [*const f32; MR] = std::array::from_fn(|r| {
                            v[xi * vs + (r0 + r.min(rows - 1)) * cin..].as_ptr()
                        });
                        let dst = m[xi * ms + r0 * cout + c0..].as_mut_ptr();
                        // SAFETY: AVX2 + FMA checked by the caller; each `a`
                        // row holds `cin` floats, the panel `cin * NR`, and the
                        // `rows` destination rows of `ncols` floats (stride
                        // `cout`) lie inside `m`.
                        unsafe {
                            block::<false>(
                                &a,
                                1,
                                0,
                                1,
                                cin,
                                panel.as_ptr(),
                                NR,
                                Some(&[0.0; NR]),
                                dst,
                                cout,
                                rows,
                                ncols,
                            );
                        }
                    }
                }
            }
            // Output transform: Y = A^T M A + bias, the pixels inside the image.
            for t in 0..n {
                let (b, y0, x0) = tiles.origin(t0 + t);
                let px = |dy: usize, dx: usize| -> Option<*mut f32> {
                    let i = tiles.pixel(b, (y0 + dy) as isize, (x0 + dx) as isize)?;
                    // SAFETY (of the pointer arithmetic): pixel i of `out`,
                    // which holds grid.rows() * cout floats.
                    Some(unsafe { (outp as *mut f32).add(i * cout) })
                };
                let dst = [px(0, 0), px(0, 1), px(1, 0), px(1, 1)];
                // SAFETY: AVX2 checked by the caller; tiles are disjoint, so no
                // other task writes these pixels; `m` holds 16 * ms.
                unsafe { output_tile(&m, t * cout, ms, cout, bias, &dst) };
            }
            crate::pool::give(v);
            crate::pool::give(m);
        });
    crate::pool::give(u);
}

/// Weight gradient of the 3x3 convolution, `dw (cout, 3, 3, cin)` (OHWI,
/// overwritten) from the input `xs (grid.rows(), cin)` and the output
/// gradient `g (grid.rows(), cout)`. The forward is linear in `U = G w G^T`,
/// so `dU_xi = sum over tiles of (A dY A^T)_xi (B^T d B)_xi^T` (16 products
/// of depth "tiles", 2.25x fewer multiply-adds than the direct weight
/// gradient) and `dw = G^T dU G`. The tiles are split over the threads, each
/// accumulating its own `dU`. The caller checks [`applies`].
pub(crate) fn weight_grad(
    xs: &[f32],
    grid: Grid,
    cin: usize,
    g: &[f32],
    cout: usize,
    dw: &mut [f32],
) {
    debug_assert_eq!(dw.len(), cout * 9 * cin);
    debug_assert_eq!(g.len(), grid.rows() * cout);
    debug_assert_eq!(xs.len(), grid.rows() * cin);
    let tiles = Tiles::new(grid);
    if tiles.count == 0 || cout == 0 || cin == 0 {
        dw.fill(0.0);
        return;
    }
    let parts = rayon::current_num_threads().clamp(1, tiles.count.div_ceil(TILES));
    let per = tiles.count.div_ceil(parts);
    let zeros = vec![0.0f32; cin.max(cout)];
    // Each part accumulates its tiles' dU; the parts' dU are then added.
    let mut du = crate::pool::take(16 * cout * cin);
    sum_of_parts(&mut du, parts, |part, du| {
        du.fill(0.0);
        // `V (16, TILES, cin)` plus NR floats: a partial channel panel
        // reads (but never stores) past the last row.
        let (vs, ys) = (xi_stride(cin), xi_stride(cout));
        let mut v = crate::pool::take(16 * vs + NR);
        let mut yh = crate::pool::take(16 * ys);
        let end = tiles.count.min((part + 1) * per);
        for t0 in (part * per..end).step_by(TILES) {
            let n = TILES.min(end - t0);
            for t in 0..n {
                let d = tiles.window(xs, cin, &zeros[..cin], t0 + t);
                // SAFETY: AVX2 checked by the caller; `v` holds 16 * vs.
                unsafe { input_tile(&d, &mut v, t * cin, vs) };
                let (b, y0, x0) = tiles.origin(t0 + t);
                let dy: [&[f32]; 4] = std::array::from_fn(|i| {
                    match tiles.pixel(b, (y0 + i / 2) as isize, (x0 + i % 2) as isize) {
                        Some(p) => &g[p * cout..(p + 1) * cout],
                        None => &zeros[..cout],
                    }
                });
                // SAFETY: AVX2 checked by the caller; `yh` holds
                // 16 * ys floats.
                unsafe { grad_tile(&dy, &mut yh, t * cout, ys) };
            }
            // dU_xi (cout, cin) += Yh_xi^T (cout, n) V_xi (n, cin).
            for xi in 0..16 {
                for o0 in (0..cout).step_by(MR) {
                    let rows = MR.min(cout - o0);
                    let a: [*const f32; MR] =
                        std::array::from_fn(|r| yh[xi * ys + o0 + r.min(rows - 1)..].as_ptr());
                    for c0 in (0..cin).step_by(NR) {
                        let dst = du[(xi * cout + o0) * cin + c0..].as_mut_ptr();
                        // SAFETY: AVX2 + FMA checked by the caller; each
                        // `a` column has n elements (stride cout); `v`'s n rows of `cin`
                        // floats (stride cin) from c0 are followed by at
                        // least NR floats; the `rows` destination rows
                        // of `ncols` floats (stride cin) lie inside `du`.
                        unsafe {
                            block::<true>(
                                &a,
                                cout,
                                0,
                                1,
                                n,
                                v[xi * vs + c0..].as_ptr(),
                                cin,
                                None,
                                dst,
                                cin,
                                rows,
                                NR.min(cin - c0),
                            );
                        }
                    }
                }
            }
        }
        crate::pool::give(v);
        crate::pool::give(yh);
    });
    // dw = G^T dU G per (cout, cin) pair.
    for o in 0..cout {
        for c in 0..cin {
            let e = |xi: usize| du[(xi * cout + o) * cin + c];
            let [u0, u1, u2, u3]: [[f32; 4]; 4] =
                std::array::from_fn(|i| std::array::from_fn(|j| e(4 * i + j)));
            let q: [[f32; 4]; 3] = [
                std::array::from_fn(|j| u0[j] + 0.5 * (u1[j] + u2[j])),
                std::array::from_fn(|j| 0.5 * (u1[j] - u2[j])),
                std::array::from_fn(|j| 0.5 * (u1[j] + u2[j]) + u3[j]),
            ];
            for (ky, r) in q.iter().enumerate() {
                let row = [
                    r[0] + 0.5 * (r[1] + r[2]),
                    0.5 * (r[1] - r[2]),
                    0.5 * (r[1] + r[2]) + r[3],
                ];
                for (kx, &val) in row.iter().enumerate() {
                    dw[((o * 3 + ky) * 3 + kx) * cin + c] = val;
                }
            }
        }
    }
    crate::pool::give(du);
}

/// `V = B^T d B` per channel for the 4x4 window `d` (row-major pixels of
/// `c` channels each), element `xi` written at `v[at + xi * stride..][..c]`.
#[target_feature(enable = "avx2,fma")]
unsafe fn input_tile(d: &[&[f32]; 16], v: &mut [f32], at: usize, stride: usize) {
    let c = d[0].len();
    for ch in 0..c {
        let e = |i: usize| *d[i].get_unchecked(ch);
        // B^T d: rows combined.
        let [d0, d1, d2, d3]: [[f32; 4]; 4] =
            std::array::from_fn(|r| std::array::from_fn(|col| e(4 * r + col)));
        let t: [[f32; 4]; 4] = [
            std::array::from_fn(|col| d0[col] - d2[col]),
            std::array::from_fn(|col| d1[col] + d2[col]),
            std::array::from_fn(|col| d2[col] - d1[col]),
            std::array::from_fn(|col| d1[col] - d3[col]),
        ];
        // (B^T d) B: columns combined.
        for (i, r) in t.iter().enumerate() {
            let row = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]];
            for (j, &x) in row.iter().enumerate() {
                *v.get_unchecked_mut(at + (4 * i + j) * stride + ch) = x;
            }
        }
    }
}

/// `Y = A^T M A (+ bias)` per output channel, `M`'s element `xi` at
/// `m[at + xi * stride..][..c]`; the 2x2 results go to `dst` (row-major,
/// `None` for pixels outside the image).
#[target_feature(enable = "avx2,fma")]
unsafe fn output_tile(
    m: &[f32],
    at: usize,
    stride: usize,
    c: usize,
    bias: Option<&[f32]>,
    dst: &[Option<*mut f32>; 4],
) {
    for ch in 0..c {
        let e = |xi: usize| *m.get_unchecked(at + xi * stride + ch);
        // A^T M: 2 rows of 4.
        let [m0, m1, m2, m3]: [[f32; 4]; 4] =
            std::array::from_fn(|r| std::array::from_fn(|col| e(4 * r + col)));
        let s: [[f32; 4]; 2] = [
            std::array::from_fn(|col| m0[col] + m1[col] + m2[col]),
            std::array::from_fn(|col| m1[col] - m2[col] - m3[col]),
        ];
        let b = bias.map_or(0.0, |b| *b.get_unchecked(ch));
        // (A^T M) A: 2 x 2.
        for (i, r) in s.iter().enumerate() {
            let y = [r[0] + r[1] + r[2] + b, r[1] - r[2] - r[3] + b];
            for (j, &val) in y.iter().enumerate() {
                if let Some(p) = dst[2 * i + j] {
                    *p.add(ch) = val;
                }
            }
        }
    }
}

/// `Yh = A dY A^T` per output channel for the 2x2 gradient tile `dy`
/// (row-major pixels of `c` channels each), element `xi` written at
/// `yh[at + xi * stride..][..c]`.
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_tile(dy: &[&[f32]; 4], yh: &mut [f32], at: usize, stride: usize) {
    let c = dy[0].len();
    for o in 0..c {
        let e = |i: usize| *dy[i].get_unchecked(o);
        // A dY: 4 rows of 2, then (A dY) A^T: 4 x 4.
        let (r0, r1) = ([e(0), e(1)], [e(2), e(3)]);
        let rows = [
            r0,
            [r0[0] + r1[0], r0[1] + r1[1]],
            [r0[0] - r1[0], r0[1] - r1[1]],
            [-r1[0], -r1[1]],
        ];
        for (i, r) in rows.iter().enumerate() {
            for (j, val) in [r[0], r[0] + r[1], r[0] - r[1], -r[1]]
                .into_iter()
                .enumerate()
            {
                *yh.get_unchecked_mut(at + (4 * i + j) * stride + o) = val;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{conv_case, conv_reference, first_mismatch, no_avx2_fma, test_data};
    use quickcheck::{QuickCheck, TestResult};

    #[test]
    fn matches_the_definition() {
        if no_avx2_fma() {
            return;
        }
        // Odd heights and widths (tiles half outside the image), channel
        // counts around NR (partial panels), tile counts around TILES.
        // Called directly (not through `applies`), so AVX-512 CI machines
        // and small channel counts test it too.
        fn prop(seed: u64, bhw: (u8, u8, u8), cin: u8, cout: u8, bias: bool) -> TestResult {
            let kernel =
                |xs: &[f32],
                 _xp: &crate::dense::Padded,
                 g,
                 cin,
                 wt: &[f32],
                 cout,
                 _k,
                 b: Option<&[f32]>,
                 out: &mut [f32]| { conv(xs, g, cin, wt, cout, b, out) };
            conv_case(&kernel, seed, bhw, cin, cout, 3, bias)
        }
        QuickCheck::new()
            .tests(60)
            .quickcheck(prop as fn(u64, (u8, u8, u8), u8, u8, bool) -> TestResult);
    }

    /// The weight gradient's definition in f64: `dw[o, ky, kx, c] = sum over
    /// pixels of g[b, y, x, o] * x[b, y + ky - 1, x + kx - 1, c]` (zero
    /// outside the image).
    fn weight_grad_reference(xs: &[f32], g: Grid, cin: usize, gs: &[f32], cout: usize) -> Vec<f64> {
        let (h, w) = (g.height as isize, g.width as isize);
        let mut dw = vec![0.0f64; cout * 9 * cin];
        for b in 0..g.batch as isize {
            for y in 0..h {
                for x in 0..w {
                    let p = ((b * h + y) * w + x) as usize;
                    for ky in 0..3isize {
                        for kx in 0..3isize {
                            let (yy, xx) = (y + ky - 1, x + kx - 1);
                            if yy < 0 || yy >= h || xx < 0 || xx >= w {
                                continue;
                            }
                            let q = ((b * h + yy) * w + xx) as usize;
                            for o in 0..cout {
                                for c in 0..cin {
                                    dw[((o * 3 + ky as usize) * 3 + kx as usize) * cin + c] +=
                                        gs[p * cout + o] as f64 * xs[q * cin + c] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        dw
    }

    #[test]
    fn weight_grad_matches_the_definition() {
        if no_avx2_fma() {
            return;
        }
        // Odd grids (tiles half outside), channel counts around MR and NR,
        // more tiles than one task, one and several parts.
        fn prop(seed: u64, bt: u8, h: u8, w: u8, cin: u8, cout: u8) -> TestResult {
            let g = Grid {
                batch: bt as usize % 3 + 1,
                height: h as usize % 23 + 1,
                width: w as usize % 19 + 1,
            };
            let (cin, cout) = (cin as usize % 37 + 1, cout as usize % 20 + 1);
            let xs = test_data(g.rows() * cin, seed);
            let gs = test_data(g.rows() * cout, seed ^ 3);
            let mut dw = vec![f32::NAN; cout * 9 * cin];
            weight_grad(&xs, g, cin, &gs, cout, &mut dw);
            let want = weight_grad_reference(&xs, g, cin, &gs, cout);
            match first_mismatch(&dw, &want, 1e-5) {
                Some(m) => TestResult::error(format!("{g:?} cin {cin} cout {cout}: dw{m}")),
                None => TestResult::passed(),
            }
        }
        QuickCheck::new()
            .tests(60)
            .quickcheck(prop as fn(u64, u8, u8, u8, u8, u8) -> TestResult);
    }

    /// DC-DiT-B's width (192 channels, a reduction of 1728 products per
    /// output): the rounding of the transforms stays at the direct
    /// kernel's level.
    #[test]
    fn wide_channels_match_the_definition() {
        if no_avx2_fma() {
            return;
        }
        let (g, c) = (
            Grid {
                batch: 2,
                height: 7,
                width: 10,
            },
            192,
        );
        let xs = test_data(g.rows() * c, 7);
        let wt = test_data(c * 9 * c, 8);
        let b = test_data(c, 9);
        let mut out = vec![f32::NAN; g.rows() * c];
        conv(&xs, g, c, &wt, c, Some(&b), &mut out);
        let want = conv_reference(&xs, g, c, &wt, c, 3, &b);
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let worst = out
            .iter()
            .zip(&want)
            .map(|(&o, &r)| (o as f64 - r).abs())
            .fold(0.0f64, f64::max);
        assert!(worst <= 2e-6 * scale, "max error {worst} of {scale}");
    }
}
