//! De-chunking (SPEC section 3): distance-weighted smoothing of the main
//! network's outputs over the kept tokens, and the nearest-kept-token
//! plug-back that restores the full grid. One sample at a time, on
//! caller-provided slices, without allocating (except [`plug_back_brute`],
//! a test oracle).
//!
//! The arithmetic follows the release's `DeChunkLayer` in f32, in the same
//! order, so results agree with it to float rounding (~1e-6).

/// Lower clamp of the boundary probability inside de-chunking (the release's
/// `torch.clamp(p, min=1e-4, max=1 - 1e-4)`).
pub const P_CLAMP: f32 = 1e-4;

/// Upper clamp: torch converts the python double `1 - 1e-4` to f32.
pub const P_CLAMP_HI: f32 = (1.0f64 - 1e-4f64) as f32;

/// Added to every row sum of the smoothing weights before normalising.
const NORM_EPS: f32 = 1e-8;

/// Marks "no kept token" in the column pass of [`plug_back`].
const NONE: u32 = u32::MAX;

/// The boundary probability as de-chunking uses it: clamped to
/// `[P_CLAMP, P_CLAMP_HI]` (NaN propagates, like torch.clamp).
#[inline]
pub fn clamp_p(p: f32) -> f32 {
    // f32::clamp propagates NaN like torch.clamp.
    p.clamp(P_CLAMP, P_CLAMP_HI)
}

/// True where torch.clamp passes the gradient through (bounds inclusive).
#[inline]
pub fn clamp_passes(p: f32) -> bool {
    (P_CLAMP..=P_CLAMP_HI).contains(&p)
}

/// `2 sigma^2` as the release forms it: a python double, then an f32 operand.
#[inline]
fn two_sigma_sq(sigma: f32) -> f32 {
    let s = sigma as f64;
    (2.0 * (s * s)) as f32
}

/// Grid coordinates of a raster position as f32 (exact below 2^24).
#[inline]
fn row_col(pos: u32, width: usize) -> (f32, f32) {
    let pos = pos as usize;
    ((pos / width) as f32, (pos % width) as f32)
}

/// Gaussian kernel weight of squared grid distance `d2`, in f32 exactly as
/// the release: `exp(-(dr^2 + dc^2) / (2 sigma^2))` (`d2` is an exact integer).
#[inline]
fn kernel(d2: f32, denom: f32) -> f32 {
    // exp in f64, rounded once: the correctly rounded f32 exp.
    libm::exp((-d2 / denom) as f64) as f32
}

/// Kernel weights below 2^-60 are treated as 0 (pairs further apart than
/// about 9 sigma): each such term moves an output by less than 2^-60 / 1e-4
/// of a token's norm (the normaliser is at least the clamped p_i >= 1e-4), so
/// even a 4096-token sample changes by under 1e-11 relative, far below f32
/// resolution, while the smoothing skips most pairs on large grids.
const NEGLIGIBLE: f32 = 8.673_617e-19;

/// Integer square root (floor).
fn isqrt(n: usize) -> usize {
    // n is a table length (<= 1024): a short integer loop, no float (no_std).
    let mut r = 0;
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

/// True when the raster positions are non-decreasing (chunk order).
fn is_sorted(pos: &[u32]) -> bool {
    pos.windows(2).all(|w| w[0] <= w[1])
}

/// The kernel weights `exp(-d2 / (2 sigma^2))` of every integer squared
/// distance `d2`, computed once per call with [`kernel`]'s exact arithmetic
/// (the same f32 values, without an `exp` per pair). The weights fall to
/// exactly 0 in f32 beyond `d2 ~ 104 * 2 sigma^2`; larger sigmas than the
/// stack table covers fall back to computing the weight.
struct KernelTable {
    tab: [f32; 1024],
    /// Entries filled; when `zero_after` is set, every `d2 >= len` weighs 0.
    len: usize,
    zero_after: bool,
    width: usize,
    denom: f32,
}

impl KernelTable {
    fn new(width: usize, denom: f32) -> Self {
        let mut t = KernelTable {
            tab: [0.0; 1024],
            len: 0,
            zero_after: false,
            width: width.max(1),
            denom,
        };
        while t.len < t.tab.len() {
            let mut v = kernel(t.len as f32, denom);
            if v < NEGLIGIBLE {
                v = 0.0;
            }
            t.tab[t.len] = v;
            t.len += 1;
            if v == 0.0 {
                t.zero_after = true;
                break;
            }
        }
        t
    }

    /// The kept tokens that can weigh anything for token `i`: with raster
    /// positions sorted and the kernel exactly 0 from `d2 >= len`, only rows
    /// within `sqrt(len - 1)` of `i`'s row do, and they are a contiguous range
    /// of `pos`. Skipped tokens would add exact zeros, so every sum is
    /// unchanged. Unsorted positions or an unbounded kernel give `0..M`.
    fn window(&self, i: usize, pos: &[u32], sorted: bool) -> core::ops::Range<usize> {
        if !sorted || !self.zero_after {
            return 0..pos.len();
        }
        let reach = isqrt(self.len.saturating_sub(1));
        let row = pos[i] as usize / self.width;
        let lo = row.saturating_sub(reach) * self.width;
        let hi = (row + reach + 1).saturating_mul(self.width);
        pos.partition_point(|&x| (x as usize) < lo)..pos.partition_point(|&x| (x as usize) < hi)
    }

    /// Calls `f(j, K(pos_i, pos_j))` for every `j` in `js` whose kernel weight
    /// is non-zero, in increasing `j`: exactly the values of [`Self::get`] in
    /// the same order. For sorted positions the rows and columns of the `j`
    /// are tracked incrementally instead of by two integer divisions per
    /// pair, which dominated the smoothing's time.
    #[inline]
    fn for_each(
        &self,
        i: usize,
        pos: &[u32],
        js: core::ops::Range<usize>,
        sorted: bool,
        mut f: impl FnMut(usize, f32),
    ) {
        if !(sorted && self.zero_after) || js.is_empty() {
            for j in js {
                let k = self.get(pos[i], pos[j]);
                if k != 0.0 {
                    f(j, k);
                }
            }
            return;
        }
        let w = self.width;
        let (ri, ci) = ((pos[i] as usize / w) as i64, (pos[i] as usize % w) as i64);
        let mut row = pos[js.start] as usize / w;
        let mut row_start = row * w;
        for j in js {
            let pj = pos[j] as usize;
            while pj >= row_start + w {
                row += 1;
                row_start += w;
            }
            let (dr, dc) = (row as i64 - ri, (pj - row_start) as i64 - ci);
            let d2 = (dr * dr + dc * dc) as usize;
            if d2 < self.len {
                let k = self.tab[d2];
                if k != 0.0 {
                    f(j, k);
                }
            }
        }
    }

    #[inline]
    fn get(&self, a: u32, b: u32) -> f32 {
        let w = self.width;
        let (ra, ca) = ((a as usize / w) as i64, (a as usize % w) as i64);
        let (rb, cb) = ((b as usize / w) as i64, (b as usize % w) as i64);
        let d2 = ((ra - rb) * (ra - rb) + (ca - cb) * (ca - cb)) as usize;
        if d2 < self.len {
            self.tab[d2]
        } else if self.zero_after {
            0.0
        } else {
            let v = kernel(d2 as f32, self.denom);
            if v < NEGLIGIBLE {
                0.0
            } else {
                v
            }
        }
    }
}

/// Dot product with eight partial sums: vectorisable without fast-math and
/// more accurate than one running sum.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, ra) = (a.chunks_exact(8), a.chunks_exact(8).remainder());
    let rb = b.chunks_exact(8).remainder();
    for (x, y) in ca.zip(b.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a * x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Row normaliser `S_i = sum_j K_ij c_j + 1e-8` of the smoothing weights.
/// Summed in f64 and rounded once (torch's reduction order is unspecified;
/// this is the closest f32 to the exact sum of its f32 terms).
fn row_sum(
    i: usize,
    p: &[f32],
    pos: &[u32],
    tab: &KernelTable,
    js: core::ops::Range<usize>,
    sorted: bool,
) -> f32 {
    let mut s = 0f64;
    // Zero weights are skipped: adding +0.0 leaves the (non-negative) sum as is.
    tab.for_each(i, pos, js, sorted, |j, k| s += (k * clamp_p(p[j])) as f64);
    (s as f32) + NORM_EPS
}

fn check_smooth_args(h: &[f32], dim: usize, p: &[f32], pos: &[u32], width: usize, out_len: usize) {
    let m = p.len();
    assert!(
        h.len() == m * dim && pos.len() == m && out_len == m * dim,
        "dechunk::smooth: length mismatch"
    );
    assert!(m == 0 || width > 0, "dechunk::smooth: zero width");
}

/// Distance-weighted smoothing of one sample's `M = p.len()` kept tokens.
///
/// `h` holds their rows (M x dim, row-major), `pos` their raster positions on a
/// grid of `width` columns, `p` their boundary probabilities before the clamp
/// (clamped here to `[P_CLAMP, P_CLAMP_HI]`). With
/// `W_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) p_j` and
/// `h~_i = sum_j W_ij h_j / (sum_k W_ik + 1e-8)`, writes
/// `out_i = p_i h_i + (1 - p_i) h~_i`.
///
/// O(M^2 dim) time and no M x M buffer: row i's normaliser is summed first,
/// then its weights are recomputed while accumulating.
///
/// # Panics
/// If the slice lengths do not match `M` and `dim`, or `width == 0` with `M > 0`.
pub fn smooth(
    h: &[f32],
    dim: usize,
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    out: &mut [f32],
) {
    smooth_impl(h, dim, p, pos, width, sigma, out, true)
}

/// The smoothing's weights in dense form, for backends that apply them as
/// matrix products: `k[i * M + j] = K(pos_i, pos_j)`, the kernel weight
/// [`smooth`] uses (0 where it skips the pair), and `s[i] = sum_j K_ij c_j +
/// 1e-8`, its row normaliser summed the same way, with `c` = [`clamp_p`]`(p)`.
/// So `smooth`'s output is `out_i = c_i h_i + (1 - c_i) sum_j (K_ij c_j /
/// s_i) h_j`.
///
/// ```
/// use dcdit_core::dechunk::kernel_matrix;
/// let (p, pos) = ([0.9f32, 0.2, 0.5], [0u32, 1, 4]);
/// let mut k = [0.0f32; 9];
/// let mut s = [0.0f32; 3];
/// kernel_matrix(&p, &pos, 2, 1.0, &mut k, &mut s);
/// assert_eq!(k[0], 1.0); // a token's own weight: exp(0)
/// assert_eq!(k[2], (-2.0f64).exp() as f32); // (0,0) to (2,0): d2 = 4
/// ```
///
/// # Panics
/// If `pos` is not `M`, `k` not `M * M` or `s` not `M` long, or
/// `width == 0` with `M > 0`.
pub fn kernel_matrix(
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    k: &mut [f32],
    s: &mut [f32],
) {
    let m = p.len();
    assert!(
        pos.len() == m && k.len() == m * m && s.len() == m,
        "dechunk::kernel_matrix: length mismatch"
    );
    assert!(m == 0 || width > 0, "dechunk::kernel_matrix: zero width");
    let tab = KernelTable::new(width, two_sigma_sq(sigma));
    let sorted = is_sorted(pos);
    k.fill(0.0);
    for i in 0..m {
        let js = tab.window(i, pos, sorted);
        let row = &mut k[i * m..(i + 1) * m];
        // One pass for both: the same terms in the same order as row_sum.
        let mut sum = 0f64;
        tab.for_each(i, pos, js, sorted, |j, kv| {
            row[j] = kv;
            sum += (kv * clamp_p(p[j])) as f64;
        });
        s[i] = (sum as f32) + NORM_EPS;
    }
}

#[allow(clippy::too_many_arguments)]
fn smooth_impl(
    h: &[f32],
    dim: usize,
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    out: &mut [f32],
    windowed: bool,
) {
    check_smooth_args(h, dim, p, pos, width, out.len());
    if dim == 0 {
        return;
    }
    let tab = KernelTable::new(width, two_sigma_sq(sigma));
    let sorted = windowed && is_sorted(pos);
    for i in 0..p.len() {
        let js = tab.window(i, pos, sorted);
        let s = row_sum(i, p, pos, &tab, js.clone(), sorted);
        let oi = &mut out[i * dim..(i + 1) * dim];
        oi.fill(0.0);
        tab.for_each(i, pos, js, sorted, |j, k| {
            axpy(k * clamp_p(p[j]) / s, &h[j * dim..(j + 1) * dim], oi)
        });
        let ci = clamp_p(p[i]);
        let hi = &h[i * dim..(i + 1) * dim];
        for (o, &x) in oi.iter_mut().zip(hi) {
            *o = ci * x + (1.0 - ci) * *o;
        }
    }
}

/// Exact gradient of [`smooth`]: given `grad_out` (M x dim), writes the
/// gradient w.r.t. `h` into `grad_h` (M x dim) and w.r.t. the unclamped `p`
/// into `grad_p` (M), overwriting both. Where the clamp is active the
/// gradient is zero, as torch.clamp's (whose bounds pass the gradient).
///
/// With `c` the clamped p, `K` the kernel, `S_i = sum_k K_ik c_k + eps`,
/// `s_i = sum_j K_ij c_j h_j / S_i`, `u_i = (1 - c_i) g_i` and
/// `gamma_i = g_i . s_i`:
/// `dh_j = c_j g_j + c_j sum_i K_ij u_i / S_i`,
/// `dc_j = g_j . (h_j - s_j) + sum_i K_ij (1 - c_i) (g_i . h_j - gamma_i) / S_i`.
/// Computed row by row in O(M^2 dim) without heap scratch (a row's first
/// 512 products `g_i . h_j` are kept on the stack between its two passes);
/// `gamma_i` is summed before the `dc` contributions so the difference is
/// formed per term, not as two large cancelling sums.
///
/// # Panics
/// On length mismatches, as [`smooth`].
#[allow(clippy::too_many_arguments)]
pub fn smooth_backward(
    h: &[f32],
    dim: usize,
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    grad_out: &[f32],
    grad_h: &mut [f32],
    grad_p: &mut [f32],
) {
    smooth_backward_impl(h, dim, p, pos, width, sigma, grad_out, grad_h, grad_p, true)
}

/// Dot products `g_i . h_j` per row `i` that [`smooth_backward`] keeps on
/// the stack between its two passes over the window (2 KiB; a window of
/// the MNIST model holds ~200 kept tokens, of DC-DiT-B at 25% ~256).
const DOT_CACHE: usize = 512;

#[allow(clippy::too_many_arguments)]
fn smooth_backward_impl(
    h: &[f32],
    dim: usize,
    p: &[f32],
    pos: &[u32],
    width: usize,
    sigma: f32,
    grad_out: &[f32],
    grad_h: &mut [f32],
    grad_p: &mut [f32],
    windowed: bool,
) {
    let m = p.len();
    check_smooth_args(h, dim, p, pos, width, grad_h.len());
    assert!(
        grad_out.len() == m * dim && grad_p.len() == m,
        "dechunk::smooth_backward: length mismatch"
    );
    grad_p.fill(0.0);
    if dim == 0 {
        grad_h.fill(0.0);
        return;
    }
    let tab = KernelTable::new(width, two_sigma_sq(sigma));
    // Direct path out_j = c_j h_j + ...
    for j in 0..m {
        let cj = clamp_p(p[j]);
        for (gh, &g) in grad_h[j * dim..(j + 1) * dim]
            .iter_mut()
            .zip(&grad_out[j * dim..(j + 1) * dim])
        {
            *gh = cj * g;
        }
    }
    let sorted = windowed && is_sorted(pos);
    for i in 0..m {
        let js = tab.window(i, pos, sorted);
        let s = row_sum(i, p, pos, &tab, js.clone(), sorted);
        let ci = clamp_p(p[i]);
        let gi = &grad_out[i * dim..(i + 1) * dim];
        // gamma_i = g_i . s_i = sum_j a_ij (g_i . h_j), first pass; the
        // first DOT_CACHE dot products are kept for the second pass (same
        // j order, same values), the rest recomputed there.
        let mut gamma = 0f64;
        let mut dots = [0f32; DOT_CACHE];
        let mut n = 0;
        tab.for_each(i, pos, js.clone(), sorted, |j, k| {
            let a = k * clamp_p(p[j]) / s;
            let d = dot(gi, &h[j * dim..(j + 1) * dim]);
            if n < DOT_CACHE {
                dots[n] = d;
            }
            n += 1;
            gamma += (a as f64) * (d as f64);
        });
        let gamma = gamma as f32;
        let f = (1.0 - ci) / s;
        let mut n = 0;
        tab.for_each(i, pos, js, sorted, |j, k| {
            let d = if n < DOT_CACHE {
                dots[n]
            } else {
                dot(gi, &h[j * dim..(j + 1) * dim])
            };
            n += 1;
            grad_p[j] += f * k * (d - gamma);
            let cj = clamp_p(p[j]);
            axpy(cj * k * f, gi, &mut grad_h[j * dim..(j + 1) * dim]);
        });
        // dL/dc_i through the gate: g_i . (h_i - s_i).
        grad_p[i] += dot(gi, &h[i * dim..(i + 1) * dim]) - gamma;
    }
    for (g, &pj) in grad_p.iter_mut().zip(p) {
        if !clamp_passes(pj) {
            *g = 0.0;
        }
    }
}

/// Scratch length (in u32) [`plug_back`] needs for a grid of `width` columns.
pub fn plug_back_scratch_len(width: usize) -> usize {
    2 * width
}

/// First integer column at which parabola `q` beats parabola `v` (`v < q`) under
/// the total order (squared distance, then raster key of the candidate).
///
/// `F_q(c) - F_v(c) = A - D c` with `A = f_q - f_v + q^2 - v^2`, `D = 2 (q - v) > 0`,
/// decreasing in c: q wins where it is negative, or zero with the smaller key.
#[inline]
fn beats_from(v: i64, fv: i64, kv: u32, q: i64, fq: i64, kq: u32) -> i64 {
    let a = fq - fv + q * q - v * v;
    let d = 2 * (q - v);
    if kq < kv {
        // A - D c <= 0  <=>  c >= ceil(A / D)
        -((-a).div_euclid(d))
    } else {
        // A - D c < 0  <=>  c >= floor(A / D) + 1
        a.div_euclid(d) + 1
    }
}

/// Nearest-kept-token plug-back index of every grid position, in O(L).
///
/// Writes to `out` (length `L = height * width`) the kept slot (0..M, kept
/// tokens numbered in raster order) of the kept token nearest in Euclidean
/// distance, ties going to the kept token first in raster order: exactly the
/// release's `argmin` over the L x M squared-distance matrix. Returns `Some(M)`,
/// or `None` when no token is kept (the forced ends normally prevent that).
///
/// An exact Euclidean distance transform: per column, the nearest kept row
/// (ties to the upper row, which is also first in raster order); then per row a
/// Felzenszwalb-Huttenlocher lower envelope over the columns in exact i64
/// arithmetic, where a later column's parabola overtakes an earlier one at a
/// single integer threshold that already includes the raster-order tie-break.
/// `scratch` needs [`plug_back_scratch_len`]`(width)` entries (the envelope).
///
/// # Panics
/// If `mask` or `out` is not `height * width` long or `scratch` is too short.
pub fn plug_back(
    mask: &[bool],
    height: usize,
    width: usize,
    out: &mut [u32],
    scratch: &mut [u32],
) -> Option<usize> {
    let l = height * width;
    assert!(
        mask.len() == l && out.len() == l,
        "plug_back: mask/out must be height*width long"
    );
    assert!(
        scratch.len() >= plug_back_scratch_len(width),
        "plug_back: scratch too short"
    );
    assert!(l < NONE as usize, "plug_back: grid too large");
    let m = mask.iter().filter(|&&k| k).count();
    if m == 0 {
        return None;
    }
    let w = width;

    // 1. Column pass: out[r, c] = raster index of the nearest kept token in
    //    column c (ties to the upper one), or NONE if the column has none.
    for c in 0..w {
        let mut above = NONE; // row of the last kept token at or above r
        for r in 0..height {
            if mask[r * w + c] {
                above = r as u32;
            }
            out[r * w + c] = above;
        }
        let mut below = NONE; // row of the first kept token at or below r
        for r in (0..height).rev() {
            if mask[r * w + c] {
                below = r as u32;
            }
            let a = out[r * w + c];
            let best = if a == NONE {
                below
            } else if below == NONE || (r as u32 - a) <= (below - r as u32) {
                a
            } else {
                below
            };
            out[r * w + c] = if best == NONE {
                NONE
            } else {
                best * w as u32 + c as u32
            };
        }
    }

    // 2. Row pass: lower envelope of the parabolas (c - q)^2 + f_q over the
    //    columns q that have a candidate; the envelope keeps each parabola's
    //    candidate raster index and first winning column.
    let (cand, start) = scratch[..2 * w].split_at_mut(w);
    for r in 0..height {
        let row = &mut out[r * w..(r + 1) * w];
        let ri = r as i64;
        let sq_row_dist = |k: u32| {
            let d = ri - (k as usize / w) as i64;
            d * d
        };
        let mut top = 0usize;
        for (q, &kq) in row.iter().enumerate() {
            if kq == NONE {
                continue;
            }
            let fq = sq_row_dist(kq);
            loop {
                if top == 0 {
                    cand[0] = kq;
                    start[0] = 0;
                    top = 1;
                    break;
                }
                let kv = cand[top - 1];
                let v = (kv as usize % w) as i64;
                let s = beats_from(v, sq_row_dist(kv), kv, q as i64, fq, kq);
                if s <= start[top - 1] as i64 {
                    top -= 1;
                    continue;
                }
                if s < w as i64 {
                    cand[top] = kq;
                    start[top] = s as u32;
                    top += 1;
                }
                break;
            }
        }
        // Every row has a candidate in each column holding a kept token.
        debug_assert!(top > 0);
        let mut k = 0;
        for (c, o) in row.iter_mut().enumerate() {
            while k + 1 < top && start[k + 1] as usize <= c {
                k += 1;
            }
            *o = cand[k];
        }
    }

    // 3. Raster index -> kept slot. A kept token is its own nearest, so its
    //    entry can be overwritten with its slot first; the other entries then
    //    look their kept token's slot up.
    let mut slot = 0u32;
    for (o, &k) in out.iter_mut().zip(mask) {
        if k {
            *o = slot;
            slot += 1;
        }
    }
    for i in 0..l {
        if !mask[i] {
            out[i] = out[out[i] as usize];
        }
    }
    Some(m)
}

/// Brute-force plug-back, the release's definition: for each position the
/// `argmin` (first minimum) over the kept tokens in raster order of the f32
/// squared distance (exact for grids below 2896 per side). O(L M); allocates
/// the kept list. A test oracle for [`plug_back`]; same contract.
///
/// # Panics
/// If `mask` or `out` is not `height * width` long.
pub fn plug_back_brute(
    mask: &[bool],
    height: usize,
    width: usize,
    out: &mut [u32],
) -> Option<usize> {
    let l = height * width;
    assert!(
        mask.len() == l && out.len() == l,
        "plug_back_brute: bad lengths"
    );
    let kept: alloc::vec::Vec<(f32, f32)> = (0..l)
        .filter(|&i| mask[i])
        .map(|i| row_col(i as u32, width))
        .collect();
    if kept.is_empty() {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let (r, c) = row_col(i as u32, width);
        let mut best = f32::INFINITY;
        let mut arg = 0u32;
        for (j, &(kr, kc)) in kept.iter().enumerate() {
            let d = (r - kr) * (r - kr) + (c - kc) * (c - kc);
            if d < best {
                best = d;
                arg = j as u32;
            }
        }
        *o = arg;
    }
    Some(kept.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};

    // ---------- plug-back ----------

    #[derive(Clone, Debug)]
    struct Grid {
        h: usize,
        w: usize,
        mask: Vec<bool>,
    }

    fn side(g: &mut Gen) -> usize {
        // Favour small and edge sizes, up to 64.
        match u8::arbitrary(g) % 8 {
            0 | 1 => 1 + usize::arbitrary(g) % 4,
            2 => 56 + usize::arbitrary(g) % 9,
            _ => 1 + usize::arbitrary(g) % 40,
        }
    }

    impl Arbitrary for Grid {
        fn arbitrary(g: &mut Gen) -> Self {
            let h = side(g);
            let w = side(g);
            let l = h * w;
            let mode = u8::arbitrary(g) % 10;
            let dens = [1u32, 10, 100, 500, 900][usize::arbitrary(g) % 5];
            let k = 1 + usize::arbitrary(g) % 7;
            let mut mask: Vec<bool> = (0..l)
                .map(|i| {
                    let (r, c) = (i / w, i % w);
                    match mode {
                        0 => true,
                        1 => false,
                        2 => r % k == 0 && c % k == 0,
                        3 => (r + c) % k == 0,
                        4 => r % k == 0 || c % k == 0,
                        _ => u32::arbitrary(g) % 1000 < dens,
                    }
                })
                .collect();
            // Symmetrise to create many exact ties.
            if mode >= 7 {
                let snapshot = mask.clone();
                for (i, mi) in mask.iter_mut().enumerate() {
                    let (r, c) = (i / w, i % w);
                    let mirrors = [
                        r * w + (w - 1 - c),
                        (h - 1 - r) * w + c,
                        (h - 1 - r) * w + (w - 1 - c),
                    ];
                    let which = mode as usize - 7;
                    if snapshot[mirrors[which]] {
                        *mi = true;
                    }
                }
            }
            // Usually force the ends like the router does.
            if l > 0 && (mode == 1 || bool::arbitrary(g)) {
                mask[0] = true;
                mask[l - 1] = true;
            }
            Grid { h, w, mask }
        }
    }

    fn check_grid(g: &Grid) -> bool {
        let l = g.h * g.w;
        let mut a = vec![0u32; l];
        let mut b = vec![0u32; l];
        let mut scratch = vec![0u32; plug_back_scratch_len(g.w)];
        let ra = plug_back(&g.mask, g.h, g.w, &mut a, &mut scratch);
        let rb = plug_back_brute(&g.mask, g.h, g.w, &mut b);
        ra == rb && (ra.is_none() || a == b)
    }

    /// Fails with the case printed (quickcheck 1.x only prints shrunk cases).
    fn verdict<T: core::fmt::Debug>(ok: bool, case: &T) -> TestResult {
        if ok {
            TestResult::passed()
        } else {
            TestResult::error(alloc::format!("failing case: {case:?}"))
        }
    }

    fn prop_plug_back(g: Grid) -> TestResult {
        verdict(check_grid(&g), &g)
    }

    #[test]
    fn plug_back_matches_brute_random() {
        QuickCheck::new()
            .tests(2500)
            .quickcheck(prop_plug_back as fn(Grid) -> TestResult);
    }

    #[test]
    fn plug_back_adversarial_ties() {
        let mut grids = Vec::new();
        // Two or four tokens placed symmetrically: every midpoint is a tie.
        for (h, w) in [(1, 1), (1, 7), (7, 1), (8, 8), (9, 9), (5, 12), (13, 4)] {
            let l = h * w;
            let sets: Vec<Vec<usize>> = vec![
                vec![0, l - 1],
                vec![0, w - 1, (h - 1) * w, l - 1],
                vec![w - 1, (h - 1) * w],
                vec![(h / 2) * w, (h / 2) * w + w - 1],
                vec![w / 2, (h - 1) * w + w / 2],
                vec![(h / 2) * w + w / 2],
            ];
            for s in sets {
                let mut mask = vec![false; l];
                for i in s {
                    mask[i] = true;
                }
                grids.push(Grid { h, w, mask });
            }
        }
        // Rings, diamonds and knight patterns around a centre (tie-rich).
        for n in [3usize, 4, 6, 11, 17, 32] {
            for pat in 0..4 {
                let mut mask = vec![false; n * n];
                let c = (n / 2) as i64;
                for r in 0..n {
                    for q in 0..n {
                        let (dr, dq) = (r as i64 - c, q as i64 - c);
                        mask[r * n + q] = match pat {
                            0 => dr.abs() + dq.abs() == c,                          // diamond
                            1 => dr * dr + dq * dq == 5 || dr * dr + dq * dq == 25, // knight rings
                            2 => dr.abs().max(dq.abs()) == c / 2,                   // square ring
                            _ => (dr * dr + dq * dq) % 7 == 1,
                        };
                    }
                }
                grids.push(Grid { h: n, w: n, mask });
            }
        }
        for g in &grids {
            assert!(check_grid(g), "{g:?}");
        }
        // Every single-token and every two-token mask on small grids.
        for (h, w) in [(3, 3), (4, 5), (6, 2), (1, 9)] {
            let l = h * w;
            for a in 0..l {
                for b in a..l {
                    let mut mask = vec![false; l];
                    mask[a] = true;
                    mask[b] = true;
                    assert!(check_grid(&Grid { h, w, mask }));
                }
            }
        }
        // All 2^16 masks of a 4x4 grid.
        for bits in 1u32..(1 << 16) {
            let mask: Vec<bool> = (0..16).map(|i| bits >> i & 1 == 1).collect();
            assert!(check_grid(&Grid { h: 4, w: 4, mask }));
        }
    }

    #[test]
    fn plug_back_known() {
        // 1x5: kept at 0 and 4; position 2 is a tie -> token 0 (slot 0).
        let mask = [true, false, false, false, true];
        let mut out = [9u32; 5];
        let mut s = [0u32; 10];
        assert_eq!(plug_back(&mask, 1, 5, &mut out, &mut s), Some(2));
        assert_eq!(out, [0, 0, 0, 1, 1]);
        // 3x3 with kept at (0,2) and (2,0): the anti-diagonal ties go to (0,2).
        let mask = [false, false, true, false, false, false, true, false, false];
        let mut out = [9u32; 9];
        let mut s = [0u32; 6];
        assert_eq!(plug_back(&mask, 3, 3, &mut out, &mut s), Some(2));
        assert_eq!(out, [0, 0, 0, 1, 0, 0, 1, 1, 0]);
        let mask = [false; 4];
        let mut out = [0u32; 4];
        assert_eq!(plug_back(&mask, 2, 2, &mut out, &mut s), None);
        assert_eq!(plug_back_brute(&mask, 2, 2, &mut out), None);
    }

    // ---------- smoothing ----------

    /// Naive f64 reference with the explicit M x M weight matrix.
    fn smooth_ref(
        h: &[f64],
        dim: usize,
        p: &[f64],
        pos: &[u32],
        width: usize,
        sigma: f64,
    ) -> Vec<f64> {
        let m = p.len();
        let lo = P_CLAMP as f64;
        let hi = P_CLAMP_HI as f64;
        let c: Vec<f64> = p.iter().map(|&x| x.max(lo).min(hi)).collect();
        let mut wm = vec![0f64; m * m];
        for i in 0..m {
            for j in 0..m {
                let (ri, ci) = (
                    (pos[i] as usize / width) as f64,
                    (pos[i] as usize % width) as f64,
                );
                let (rj, cj) = (
                    (pos[j] as usize / width) as f64,
                    (pos[j] as usize % width) as f64,
                );
                let d = (ri - rj) * (ri - rj) + (ci - cj) * (ci - cj);
                wm[i * m + j] = libm::exp(-d / (2.0 * sigma * sigma)) * c[j];
            }
            let s: f64 = wm[i * m..(i + 1) * m].iter().sum::<f64>() + 1e-8;
            for j in 0..m {
                wm[i * m + j] /= s;
            }
        }
        let mut out = vec![0f64; m * dim];
        for i in 0..m {
            for d in 0..dim {
                let sm: f64 = (0..m).map(|j| wm[i * m + j] * h[j * dim + d]).sum();
                out[i * dim + d] = c[i] * h[i * dim + d] + (1.0 - c[i]) * sm;
            }
        }
        out
    }

    #[derive(Clone, Debug)]
    struct SmoothCase {
        width: usize,
        dim: usize,
        sigma: f32,
        h: Vec<f32>,
        p: Vec<f32>,
        pos: Vec<u32>,
    }

    fn unit(g: &mut Gen) -> f32 {
        (u32::arbitrary(g) % 2_000_001) as f32 / 1e6 - 1.0
    }

    impl SmoothCase {
        fn gen(g: &mut Gen, max_side: usize, interior_p: bool) -> Self {
            let height = 1 + usize::arbitrary(g) % max_side;
            let width = 1 + usize::arbitrary(g) % max_side;
            let l = height * width;
            let dim = 1 + usize::arbitrary(g) % 9;
            let sigma = [0.5f32, 1.0, 2.0, 1.3][usize::arbitrary(g) % 4];
            let dens = 1 + u32::arbitrary(g) % 100;
            let mut pos: Vec<u32> = (0..l as u32)
                .filter(|_| u32::arbitrary(g) % 100 < dens)
                .collect();
            if pos.is_empty() {
                pos.push(0);
            }
            let m = pos.len();
            let p = (0..m)
                .map(|_| {
                    let x = (u32::arbitrary(g) % 1_000_001) as f32 / 1e6;
                    if interior_p {
                        0.01 + 0.98 * x
                    } else {
                        match u8::arbitrary(g) % 6 {
                            0 => 1.0,
                            1 => 0.0,
                            2 => 0.5,
                            _ => x,
                        }
                    }
                })
                .collect();
            let h = (0..m * dim).map(|_| unit(g) * 3.0).collect();
            SmoothCase {
                width,
                dim,
                sigma,
                h,
                p,
                pos,
            }
        }
    }

    #[derive(Clone, Debug)]
    struct Big(SmoothCase);
    impl Arbitrary for Big {
        fn arbitrary(g: &mut Gen) -> Self {
            Big(SmoothCase::gen(g, 24, false))
        }
    }

    fn prop_smooth(c: Big) -> TestResult {
        let c = &c.0;
        let m = c.p.len();
        let mut out = vec![0f32; m * c.dim];
        smooth(&c.h, c.dim, &c.p, &c.pos, c.width, c.sigma, &mut out);
        let h64: Vec<f64> = c.h.iter().map(|&x| x as f64).collect();
        let p64: Vec<f64> = c.p.iter().map(|&x| x as f64).collect();
        let want = smooth_ref(&h64, c.dim, &p64, &c.pos, c.width, c.sigma as f64);
        let scale = h64.iter().fold(1f64, |a, &b| a.max(b.abs()));
        let ok = out
            .iter()
            .zip(&want)
            .all(|(&a, &b)| (a as f64 - b).abs() <= 2e-6 * scale);
        verdict(ok, c)
    }

    /// [`kernel_matrix`] holds exactly the weights and normalisers
    /// [`smooth`] uses: applied pair by pair in the same order they give
    /// its output bit for bit (sorted and unsorted positions).
    #[test]
    fn kernel_matrix_reproduces_smooth() {
        let mut g = Gen::new(1000);
        for case in 0..60 {
            let mut c = SmoothCase::gen(&mut g, 48, case % 2 == 0);
            if case % 3 == 0 {
                c.pos.reverse();
            }
            let (m, d) = (c.p.len(), c.dim);
            let mut want = vec![0f32; m * d];
            smooth(&c.h, d, &c.p, &c.pos, c.width, c.sigma, &mut want);
            let (mut k, mut s) = (vec![f32::NAN; m * m], vec![f32::NAN; m]);
            kernel_matrix(&c.p, &c.pos, c.width, c.sigma, &mut k, &mut s);
            let mut got = vec![0f32; m * d];
            for i in 0..m {
                let oi = &mut got[i * d..(i + 1) * d];
                for j in 0..m {
                    let kv = k[i * m + j];
                    if kv != 0.0 {
                        axpy(kv * clamp_p(c.p[j]) / s[i], &c.h[j * d..(j + 1) * d], oi);
                    }
                }
                let ci = clamp_p(c.p[i]);
                for (o, &x) in oi.iter_mut().zip(&c.h[i * d..(i + 1) * d]) {
                    *o = ci * x + (1.0 - ci) * *o;
                }
            }
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "case {case}: {c:?}"
            );
        }
    }

    /// The row window only skips exact zeros: forward and backward are
    /// bitwise equal to the full O(M^2) loops, on grids where it matters.
    #[test]
    fn smooth_window_is_exact() {
        let mut g = Gen::new(1000);
        for case in 0..40 {
            let c = SmoothCase::gen(&mut g, 48, case % 2 == 0);
            let (m, d) = (c.p.len(), c.dim);
            let (mut a, mut b) = (vec![0f32; m * d], vec![0f32; m * d]);
            smooth_impl(&c.h, d, &c.p, &c.pos, c.width, c.sigma, &mut a, true);
            smooth_impl(&c.h, d, &c.p, &c.pos, c.width, c.sigma, &mut b, false);
            assert_eq!(a, b, "forward, case {case}: {c:?}");
            let go: Vec<f32> = c.h.iter().map(|v| v * 0.7 - 0.1).collect();
            let (mut gh1, mut gp1) = (vec![0f32; m * d], vec![0f32; m]);
            let (mut gh2, mut gp2) = (vec![0f32; m * d], vec![0f32; m]);
            smooth_backward_impl(
                &c.h, d, &c.p, &c.pos, c.width, c.sigma, &go, &mut gh1, &mut gp1, true,
            );
            smooth_backward_impl(
                &c.h, d, &c.p, &c.pos, c.width, c.sigma, &go, &mut gh2, &mut gp2, false,
            );
            assert_eq!((gh1, gp1), (gh2, gp2), "backward, case {case}");
        }
    }

    #[test]
    fn smooth_matches_naive_f64() {
        QuickCheck::new()
            .tests(300)
            .quickcheck(prop_smooth as fn(Big) -> TestResult);
    }

    #[test]
    fn smooth_known_values() {
        // Two tokens at (0,0) and (0,1), sigma 1: K_01 = exp(-1/2).
        let h = [1.0f32, 3.0];
        let p = [0.5f32, 1.0];
        let pos = [0u32, 1];
        let mut out = [0f32; 2];
        smooth(&h, 1, &p, &pos, 4, 1.0, &mut out);
        let k = libm::exp(-0.5);
        let c1 = P_CLAMP_HI as f64;
        let s0 = 0.5 + k * c1;
        let sm0 = (0.5 * 1.0 + k * c1 * 3.0) / (s0 + 1e-8);
        let s1 = k * 0.5 + c1;
        let sm1 = (k * 0.5 * 1.0 + c1 * 3.0) / (s1 + 1e-8);
        let want = [0.5 * 1.0 + 0.5 * sm0, c1 * 3.0 + (1.0 - c1) * sm1];
        for (a, b) in out.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} {b}");
        }
        assert_eq!(P_CLAMP_HI, 0.9999f32);
    }

    // ---------- backward vs central finite differences (f64) ----------

    #[derive(Clone, Debug)]
    struct Small(SmoothCase, Vec<f32>);
    impl Arbitrary for Small {
        fn arbitrary(g: &mut Gen) -> Self {
            let interior = bool::arbitrary(g) || bool::arbitrary(g);
            let c = SmoothCase::gen(g, 6, interior);
            let go = (0..c.h.len()).map(|_| unit(g)).collect();
            Small(c, go)
        }
    }

    fn prop_backward(s: Small) -> TestResult {
        let Small(c, go) = &s;
        let m = c.p.len();
        let dim = c.dim;
        let mut gh = vec![7f32; m * dim];
        let mut gp = vec![7f32; m];
        smooth_backward(
            &c.h, dim, &c.p, &c.pos, c.width, c.sigma, go, &mut gh, &mut gp,
        );
        let h64: Vec<f64> = c.h.iter().map(|&x| x as f64).collect();
        let p64: Vec<f64> = c.p.iter().map(|&x| x as f64).collect();
        let go64: Vec<f64> = go.iter().map(|&x| x as f64).collect();
        let loss = |h: &[f64], p: &[f64]| -> f64 {
            smooth_ref(h, dim, p, &c.pos, c.width, c.sigma as f64)
                .iter()
                .zip(&go64)
                .map(|(a, b)| a * b)
                .sum()
        };
        let eps = 1e-6;
        let mut ok = true;
        for k in 0..m * dim {
            let mut hp = h64.clone();
            hp[k] += eps;
            let mut hm = h64.clone();
            hm[k] -= eps;
            let fd = (loss(&hp, &p64) - loss(&hm, &p64)) / (2.0 * eps);
            ok &= (gh[k] as f64 - fd).abs() <= 1e-4 * (1.0 + fd.abs());
        }
        for k in 0..m {
            let pk = p64[k];
            let lo = P_CLAMP as f64;
            let hi = P_CLAMP_HI as f64;
            if pk <= lo || pk >= hi {
                // Clamp active (or on its edge): torch gives 0 strictly outside.
                if pk < lo || pk > hi {
                    ok &= gp[k] == 0.0;
                }
                continue;
            }
            let e = eps.min((pk - lo) / 2.0).min((hi - pk) / 2.0);
            let mut pp = p64.clone();
            pp[k] += e;
            let mut pm = p64.clone();
            pm[k] -= e;
            let fd = (loss(&h64, &pp) - loss(&h64, &pm)) / (2.0 * e);
            let tol = 2e-4 * (1.0 + fd.abs());
            ok &= (gp[k] as f64 - fd).abs() <= tol;
        }
        verdict(ok, &s)
    }

    /// Windows of more than `DOT_CACHE` weighted tokens (700 tokens, sigma
    /// 8: every pair weighs): the products past the stack cache are
    /// recomputed, and sampled gradients still match finite differences.
    #[test]
    fn smooth_backward_past_the_dot_cache() {
        let (m, dim, width, sigma) = (700usize, 2usize, 30usize, 8.0f32);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        let h: Vec<f32> = (0..m * dim).map(|_| next() * 2.0 - 1.0).collect();
        let p: Vec<f32> = (0..m).map(|_| 0.1 + 0.8 * next()).collect();
        let go: Vec<f32> = (0..m * dim).map(|_| next() - 0.5).collect();
        let pos: Vec<u32> = (0..m as u32).collect();
        let tab = KernelTable::new(width, two_sigma_sq(sigma));
        let window = tab.window(m / 2, &pos, true);
        assert!(window.len() > DOT_CACHE, "window {window:?}");
        let (mut gh, mut gp) = (vec![0f32; m * dim], vec![0f32; m]);
        smooth_backward(&h, dim, &p, &pos, width, sigma, &go, &mut gh, &mut gp);
        let h64: Vec<f64> = h.iter().map(|&x| x as f64).collect();
        let p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let loss = |h: &[f64], p: &[f64]| -> f64 {
            smooth_ref(h, dim, p, &pos, width, sigma as f64)
                .iter()
                .zip(&go)
                .map(|(a, &b)| a * b as f64)
                .sum()
        };
        // Central difference of the loss in h[k] (`in_h`) or p[k].
        let eps = 1e-6;
        let fd = |k: usize, in_h: bool| {
            let (mut hp, mut pp) = (h64.clone(), p64.clone());
            let (mut hm, mut pm) = (h64.clone(), p64.clone());
            if in_h {
                hp[k] += eps;
                hm[k] -= eps;
            } else {
                pp[k] += eps;
                pm[k] -= eps;
            }
            (loss(&hp, &pp) - loss(&hm, &pm)) / (2.0 * eps)
        };
        for k in [0, 1, 2 * 351, 2 * 699 + 1] {
            let want = fd(k, true);
            let tol = 1e-4 * (1.0 + want.abs());
            assert!(
                (gh[k] as f64 - want).abs() <= tol,
                "dh[{k}] {} vs {want}",
                gh[k]
            );
        }
        for k in [0, 350, 699] {
            let want = fd(k, false);
            let tol = 2e-4 * (1.0 + want.abs());
            assert!(
                (gp[k] as f64 - want).abs() <= tol,
                "dp[{k}] {} vs {want}",
                gp[k]
            );
        }
    }

    #[test]
    fn smooth_backward_matches_finite_differences() {
        QuickCheck::new()
            .tests(300)
            .quickcheck(prop_backward as fn(Small) -> TestResult);
    }
}
