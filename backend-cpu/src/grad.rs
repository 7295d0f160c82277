//! [`GradBackend`] for the CPU backend: the backward of every forward op and
//! the optimiser updates.
//!
//! Conventions (shared with the forward ops):
//! * every gradient is stored in the dtype of the tensor it is the gradient
//!   of (`dx` like `x`, `dw` like `w`, ...), arithmetic in f32;
//! * reductions over rows (bias, per-sample and norm-parameter gradients) sum
//!   blocks of rows in f32 and combine the blocks in f64, in parallel;
//! * dense products go through [`gemm_f32`] with strided (transposed) operands,
//!   never copying a transpose.

use dcdit_core::backend::{Grid, Segments, Unary};
use dcdit_core::backend_grad::{AdamW, AdamWScalars, GradBackend};
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::dense::{check_grid, conv_f32, conv_padded, depthwise_f32, winograd_applies, Padded};
use crate::math::{softmax_online, softmax_probs, unary_backward_slice};
use crate::norm::{group_stats, per_sample, GroupStats};
use crate::tensor::{numel_of, CpuTensor};
use crate::util::{
    add_into, check_segments, dot, for_row_chunks, for_rows_with_sample, gemm_f32, gemm_long_k,
    sum, sum_of_parts, sum_sq, sum_sq_dev, Mat, SyncPtr, GEMM_PAR_WORK, PAR_GRAIN,
};
use crate::CpuBackend;

// ------------------------------------------------------------------ helpers

/// Checks that the output gradient `g` is a `(rows, cols)` matrix.
fn check_g(op: &str, g: &CpuTensor, rows: usize, cols: usize) -> Result<()> {
    if g.dims2() != (rows, cols) {
        return Err(Error::input(format!(
            "{op}: output gradient shape {:?} does not match the output ({rows}, {cols})",
            g.shape()
        )));
    }
    Ok(())
}

/// Checks that two tensors have the same shape.
fn check_same(op: &str, a_name: &str, a: &CpuTensor, b_name: &str, b: &CpuTensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::input(format!(
            "{op}: {a_name} {:?} and {b_name} {:?} must have equal shapes",
            a.shape(),
            b.shape()
        )));
    }
    Ok(())
}

/// Rows per block of the row reductions: at least 64 (few partials to
/// combine), at most 1024 (short f32 sums).
fn reduce_block(width: usize) -> usize {
    (PAR_GRAIN / width.max(1)).clamp(64, 1024)
}

/// Per-segment reduction: for every segment `s`, `out[s] = sum_r f(r)` over
/// its rows, where `f(r, acc)` adds row `r`'s `width`-wide contribution into
/// `acc`. Blocks of rows are summed in f32 (in parallel for large inputs),
/// the blocks combined in f64. Returns `(S, width)` row-major.
fn segment_reduce<F>(seg: &[usize], width: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let samples = seg.len().saturating_sub(1);
    if width == 0 || samples == 0 {
        return vec![0.0; samples * width];
    }
    let block = reduce_block(width);
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for (s, w) in seg.windows(2).enumerate() {
        let mut a = w[0];
        while a < w[1] {
            let b = (a + block).min(w[1]);
            tasks.push((s, a, b));
            a = b;
        }
    }
    let run = |&(s, a, b): &(usize, usize, usize)| {
        let mut acc = vec![0.0f32; width];
        crate::util::simd(|| {
            for r in a..b {
                f(r, &mut acc);
            }
        });
        (s, acc)
    };
    let rows = seg[samples];
    let parts: Vec<(usize, Vec<f32>)> =
        if rows.saturating_mul(width) <= PAR_GRAIN || tasks.len() < 2 {
            tasks.iter().map(run).collect()
        } else {
            tasks.par_iter().with_max_len(1).map(run).collect()
        };
    let mut tot = vec![0.0f64; samples * width];
    for (s, p) in parts {
        for (t, v) in tot[s * width..(s + 1) * width].iter_mut().zip(p) {
            *t += v as f64;
        }
    }
    tot.into_iter().map(|v| v as f32).collect()
}

/// `acc += x * y`.
#[inline]
fn add_prod_into(acc: &mut [f32], x: &[f32], y: &[f32]) {
    for ((a, &u), &v) in acc.iter_mut().zip(x).zip(y) {
        *a += u * v;
    }
}

/// Work (`m * n * k`) up to which [`mm`] uses a direct loop instead of gemm.
const NAIVE_WORK: usize = 4096;

/// `dst (m, n) = [dst +] scale * lhs (m, k) rhs (k, n)` with strided
/// operands: [`gemm_f32`], or a direct loop for tiny products.
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    if m.saturating_mul(n).saturating_mul(k) > NAIVE_WORK {
        gemm_f32(
            m, n, k, dst, dst_rs, 1, accumulate, lhs, rhs, scale, parallel,
        );
        return;
    }
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for kk in 0..k {
                s += *lhs.ptr.offset(i as isize * lhs.rs + kk as isize * lhs.cs)
                    * *rhs.ptr.offset(kk as isize * rhs.rs + j as isize * rhs.cs);
            }
            let d = dst.offset(i as isize * dst_rs + j as isize);
            *d = if accumulate {
                *d + scale * s
            } else {
                scale * s
            };
        }
    }
}

/// A segment's first row, end row and its mutable rows.
type RowsMut<'a> = (usize, usize, &'a mut [f32]);

/// Disjoint mutable row ranges `seg[s]..seg[s + 1]` (each `width` wide) of
/// `out`, with their first row, skipping empty segments.
fn split_segments<'a>(seg: &[usize], width: usize, mut out: &'a mut [f32]) -> Vec<RowsMut<'a>> {
    let mut parts = Vec::with_capacity(seg.len());
    for w in seg.windows(2) {
        let (a, b) = (w[0], w[1]);
        let (head, tail) = out.split_at_mut((b - a) * width);
        out = tail;
        if b > a {
            parts.push((a, b, head));
        }
    }
    parts
}

// --------------------------------------------------------------- dense ops

/// `op(a) op(b)`; operands seen as row-major matrices (`dims2`).
fn matmul(a: &CpuTensor, b: &CpuTensor, ta: bool, tb: bool) -> Result<CpuTensor> {
    let (ar, ac) = a.dims2();
    let (br, bc) = b.dims2();
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if tb { (bc, br) } else { (br, bc) };
    if k != k2 {
        return Err(Error::input(format!(
            "matmul: inner dimensions differ: a {:?}{} vs b {:?}{}",
            a.shape(),
            if ta { "^T" } else { "" },
            b.shape(),
            if tb { "^T" } else { "" }
        )));
    }
    let av = a.to_f32_cow();
    let bv = b.to_f32_cow();
    let mut out = crate::pool::take(m * n);
    let lhs = Mat::dense(av.as_ptr(), ac, ta);
    let rhs = Mat::dense(bv.as_ptr(), bc, tb);
    // SAFETY: shapes checked; `out` is exclusively owned.
    unsafe { gemm_long_k(m, n, k, &mut out, lhs, rhs) };
    Ok(CpuTensor::from_result(out, &[m, n], a.dtype()))
}

/// Column sums of an f32 matrix `(rows, c)`.
fn col_sum_f32(xs: &[f32], rows: usize, c: usize) -> Vec<f32> {
    segment_reduce(&[0, rows], c, |r, acc| {
        add_into(acc, &xs[r * c..(r + 1) * c])
    })
}

/// `(rows, c)` → `(c)`.
fn col_sum(x: &CpuTensor) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    let xs = x.to_f32_cow();
    let out = col_sum_f32(&xs, rows, c);
    Ok(CpuTensor::from_result(out, &[c], x.dtype()))
}

/// `(rows, c)` → `(S, c)`.
fn segment_sum(x: &CpuTensor, seg: Segments) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    let samples = check_segments("segment_sum", seg, rows)?;
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let out = segment_reduce(seg, c, |r, acc| add_into(acc, &xs[r * c..(r + 1) * c]));
    Ok(CpuTensor::from_result(out, &[samples, c], x.dtype()))
}

/// Sum of squares in f64.
fn sum_squares(x: &CpuTensor) -> Result<f64> {
    let xs = x.to_f32_cow();
    let part = |c: &[f32]| -> f64 {
        let mut acc = [0.0f64; 4];
        let chunks = c.chunks_exact(4);
        let rest = chunks.remainder();
        for q in chunks {
            for l in 0..4 {
                let v = q[l] as f64;
                acc[l] += v * v;
            }
        }
        let r: f64 = rest.iter().map(|&v| (v as f64) * (v as f64)).sum();
        (acc[0] + acc[1]) + (acc[2] + acc[3]) + r
    };
    if xs.len() <= PAR_GRAIN {
        Ok(part(&xs))
    } else {
        Ok(xs.par_chunks(PAR_GRAIN).map(part).sum())
    }
}

/// Gradients of the stride-1 "same" convolution: `(dx, dw, db)`, `dx` only
/// when `need_dx` (its convolution is as costly as the forward's, and at
/// the 1-channel pixel embedding ~2 ms of a 2.3 ms backward).
fn conv2d_backward(
    x: &CpuTensor,
    grid: Grid,
    w: &CpuTensor,
    k: usize,
    g: &CpuTensor,
    need_dx: bool,
) -> Result<(Option<CpuTensor>, CpuTensor, CpuTensor)> {
    let (cin, cout) = crate::dense::check_conv_args("conv2d_backward", x, grid, w, k)?;
    let rows = grid.rows();
    check_g("conv2d_backward", g, rows, cout)?;
    let kc = k * k * cin;
    let xs = x.to_f32_cow();
    let wv = w.to_f32_cow();
    let gs = g.to_f32_cow();
    let (xs, wv, gs) = (&*xs, &*wv, &*gs);

    let db = col_sum_f32(gs, rows, cout);
    let mut dx = crate::pool::take(if need_dx { rows * cin } else { 0 });
    let mut dw = vec![0.0f32; cout * kc];
    if rows > 0 && cout > 0 && cin > 0 {
        if k == 1 {
            // SAFETY: shapes checked; outputs exclusively owned.
            unsafe {
                // dw (cout, cin) = g^T (cout, rows) x (rows, cin)
                gemm_long_k(
                    cout,
                    cin,
                    rows,
                    &mut dw,
                    Mat {
                        ptr: gs.as_ptr(),
                        rs: 1,
                        cs: cout as isize,
                    },
                    Mat {
                        ptr: xs.as_ptr(),
                        rs: cin as isize,
                        cs: 1,
                    },
                );
                // dx (rows, cin) = g (rows, cout) w (cout, cin)
                if need_dx {
                    gemm_f32(
                        rows,
                        cin,
                        cout,
                        dx.as_mut_ptr(),
                        cin as isize,
                        1,
                        false,
                        Mat {
                            ptr: gs.as_ptr(),
                            rs: cout as isize,
                            cs: 1,
                        },
                        Mat {
                            ptr: wv.as_ptr(),
                            rs: cin as isize,
                            cs: 1,
                        },
                        1.0,
                        true,
                    );
                }
            }
        } else {
            // The Winograd kernels read x and g in place; the others take
            // zero-padded copies (g's shared by dw and dx).
            let wino_dw = winograd_applies(k, cin, cout);
            let wino_dx = winograd_applies(k, cout, cin);
            let gp =
                (!wino_dw || (need_dx && !wino_dx)).then(|| Padded::new(gs, grid, cout, k / 2));
            if wino_dw {
                #[cfg(target_arch = "x86_64")]
                crate::winograd::weight_grad(xs, grid, cin, gs, cout, &mut dw);
            } else if let Some(gp) = &gp {
                let xp = Padded::new(xs, grid, cin, k / 2);
                conv_weight_grad(&xp, grid, cin, k, gp, cout, &mut dw);
                crate::pool::give(xp.data);
            }
            // dx is the "same" convolution of g with the spatially flipped,
            // in/out-transposed kernel: w'[ci, ky, kx, co] = w[co, k-1-ky, k-1-kx, ci].
            if need_dx {
                let mut wf = vec![0.0f32; cin * k * k * cout];
                for co in 0..cout {
                    for ky in 0..k {
                        for kx in 0..k {
                            let src = &wv[((co * k + ky) * k + kx) * cin..][..cin];
                            let (fy, fx) = (k - 1 - ky, k - 1 - kx);
                            for (ci, &v) in src.iter().enumerate() {
                                wf[((ci * k + fy) * k + fx) * cout + co] = v;
                            }
                        }
                    }
                }
                match &gp {
                    Some(gp) if !wino_dx => conv_padded(gp, grid, cout, &wf, cin, k, None, &mut dx),
                    _ => conv_f32(gs, grid, cout, &wf, cin, k, None, &mut dx),
                }
            }
            if let Some(gp) = gp {
                crate::pool::give(gp.data);
            }
        }
    }
    Ok((
        need_dx.then(|| CpuTensor::from_result(dx, x.shape(), x.dtype())),
        CpuTensor::from_result(dw, w.shape(), w.dtype()),
        CpuTensor::from_result(db, &[cout], w.dtype()),
    ))
}

/// `dw (cout, k*k*cin) = g^T cols(x)` for odd `k > 1`, as one GEMM per kernel
/// row between `g` and `x` in the zero-padded layout of the forward (the
/// window rows of [`Padded`]; border positions of `g` are zero, so they add
/// nothing). The positions are split over the threads, each accumulating its
/// own `dw`, and the partial sums added.
fn conv_weight_grad(
    xp: &Padded,
    grid: Grid,
    cin: usize,
    k: usize,
    gp: &Padded,
    cout: usize,
    dw: &mut [f32],
) {
    let kc = k * k * cin;
    let q = xp.positions(grid);
    let threads = rayon::current_num_threads().max(1);
    let parts = if q * kc * cout >= GEMM_PAR_WORK {
        threads
    } else {
        1
    };
    let per = q.div_ceil(parts).max(1);
    let run = |part: usize, acc: &mut [f32]| {
        let q0 = part * per;
        let n = per.min(q.saturating_sub(q0));
        if n == 0 {
            acc.fill(0.0);
            return;
        }
        for ky in 0..k {
            let win = xp.window_row(ky, k, cin);
            // SAFETY: rows q0..q0+n of the window and of g lie inside the
            // padded buffers; `acc` holds cout * kc floats.
            unsafe {
                gemm_f32(
                    cout,
                    k * cin,
                    n,
                    acc[ky * k * cin..].as_mut_ptr(),
                    kc as isize,
                    1,
                    false,
                    // g^T (cout, n): element (o, i) = gp[(margin + q0 + i) * cout + o].
                    Mat {
                        ptr: gp.data[(gp.margin + q0) * cout..].as_ptr(),
                        rs: 1,
                        cs: cout as isize,
                    },
                    Mat {
                        ptr: win.ptr.add(q0 * cin),
                        rs: win.rs,
                        cs: win.cs,
                    },
                    1.0,
                    false,
                );
            }
        }
    };
    sum_of_parts(dw, parts, run);
}

/// Gradients of the depthwise 3x3 convolution: `(dx, dw)`.
fn depthwise_conv3x3_backward(
    x: &CpuTensor,
    grid: Grid,
    w: &CpuTensor,
    g: &CpuTensor,
) -> Result<(CpuTensor, CpuTensor)> {
    let c = check_grid("depthwise_conv3x3_backward", x, grid)?;
    if w.numel() != c * 9 {
        return Err(Error::input(format!(
            "depthwise_conv3x3_backward: weight shape {:?} does not match ({c}, 9)",
            w.shape()
        )));
    }
    let rows = grid.rows();
    check_g("depthwise_conv3x3_backward", g, rows, c)?;
    let ws = w.to_f32_cow();
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let (xs, gs) = (&*xs, &*gs);
    // dx: depthwise convolution of g with the flipped taps, tap-major.
    let mut taps = vec![0.0f32; 9 * c];
    for ch in 0..c {
        for t in 0..9 {
            taps[t * c + ch] = ws[ch * 9 + 8 - t];
        }
    }
    let mut dx = vec![0.0f32; rows * c];
    depthwise_f32(gs, grid, c, &taps, &mut dx);
    // dw[ch, t] = sum_r g[r, ch] x[r + offset(t), ch], accumulated tap-major.
    let (h, wd, l) = (grid.height as isize, grid.width as isize, grid.len());
    let acc = segment_reduce(&[0, rows], 9 * c, |r, acc| {
        let b = r / l;
        let rem = r % l;
        let y = (rem / grid.width) as isize;
        let xx = (rem % grid.width) as isize;
        let gr = &gs[r * c..(r + 1) * c];
        for ky in 0..3isize {
            let sy = y + ky - 1;
            if sy < 0 || sy >= h {
                continue;
            }
            for kx in 0..3isize {
                let sx = xx + kx - 1;
                if sx < 0 || sx >= wd {
                    continue;
                }
                let src = b * l + (sy * wd + sx) as usize;
                let t = (ky * 3 + kx) as usize;
                add_prod_into(
                    &mut acc[t * c..(t + 1) * c],
                    gr,
                    &xs[src * c..(src + 1) * c],
                );
            }
        }
    });
    let mut dw = vec![0.0f32; c * 9];
    for ch in 0..c {
        for t in 0..9 {
            dw[ch * 9 + t] = acc[t * c + ch];
        }
    }
    Ok((
        CpuTensor::from_result(dx, x.shape(), x.dtype()),
        CpuTensor::from_result(dw, w.shape(), w.dtype()),
    ))
}

// ---------------------------------------------------------- normalisation

/// Gradients of GroupNorm with affine: `(dx, dgamma, dbeta)`.
fn group_norm_backward(
    x: &CpuTensor,
    grid: Grid,
    groups: usize,
    gamma: &CpuTensor,
    eps: f32,
    g: &CpuTensor,
) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
    let (rows, c) = x.dims2();
    if rows != grid.rows() {
        return Err(Error::input(format!(
            "group_norm_backward: input shape {:?} has {rows} rows but the grid needs {}",
            x.shape(),
            grid.rows()
        )));
    }
    if groups == 0 || c % groups != 0 {
        return Err(Error::input(format!(
            "group_norm_backward: {c} channels cannot be split into {groups} groups"
        )));
    }
    if gamma.numel() != c {
        return Err(Error::input(format!(
            "group_norm_backward: gamma {:?} must hold {c} elements",
            gamma.shape()
        )));
    }
    check_g("group_norm_backward", g, rows, c)?;
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let gm = gamma.to_f32_cow();
    let (xs, gs, gm) = (&*xs, &*gs, &*gm);
    let l = grid.len();
    let cg = c / groups;
    let count = ((l * cg) as f64).max(1.0);
    let mut dx = crate::pool::take(rows * c);
    // One sample at a time (statistics, sums, dx), so that the passes after
    // the first read the sample's x and g from L2; see `norm::per_sample`.
    // Returns the sample's per-channel [sum g, sum g * xhat].
    let sums = per_sample(xs, &mut dx, grid, c, |b, xb, dxb, one| {
        let gb = &gs[b * l * c..(b + 1) * l * c];
        // Statistics exactly as the forward.
        let GroupStats {
            m_hi,
            m_lo,
            inv: iv,
        } = group_stats(xb, one, c, groups, eps);
        let xhat_row = |r: usize, out: &mut [f32]| {
            let src = &xb[r * c..(r + 1) * c];
            for ((((o, &v), &hi), &lo), &s) in
                out.iter_mut().zip(src).zip(&m_hi).zip(&m_lo).zip(&iv)
            {
                *o = ((v - hi) - lo) * s;
            }
        };
        let sums = segment_reduce(&[0, l], 2 * c, |r, acc| {
            let mut xh = [0.0f32; 256];
            let gr = &gb[r * c..(r + 1) * c];
            let (a_g, a_gx) = acc.split_at_mut(c);
            add_into(a_g, gr);
            // Normalised row in stack chunks of 256 channels.
            let mut c0 = 0;
            while c0 < c {
                let n = (c - c0).min(256);
                let src = &xb[r * c + c0..r * c + c0 + n];
                for ((((o, &v), &hi), &lo), &s) in xh[..n]
                    .iter_mut()
                    .zip(src)
                    .zip(&m_hi[c0..c0 + n])
                    .zip(&m_lo[c0..c0 + n])
                    .zip(&iv[c0..c0 + n])
                {
                    *o = ((v - hi) - lo) * s;
                }
                add_prod_into(&mut a_gx[c0..c0 + n], &gr[c0..c0 + n], &xh[..n]);
                c0 += n;
            }
        });
        // Per channel: the group means of gamma*g and gamma*g*xhat.
        let mut k1 = vec![0.0f32; c];
        let mut k2 = vec![0.0f32; c];
        for gr in 0..groups {
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for ch in gr * cg..(gr + 1) * cg {
                s1 += gm[ch] as f64 * sums[ch] as f64;
                s2 += gm[ch] as f64 * sums[c + ch] as f64;
            }
            k1[gr * cg..(gr + 1) * cg].fill((s1 / count) as f32);
            k2[gr * cg..(gr + 1) * cg].fill((s2 / count) as f32);
        }
        // dx = inv * (gamma g - mean(gamma g) - xhat mean(gamma g xhat)).
        for_row_chunks(dxb, c, |r0, chunk| {
            let mut xh = vec![0.0f32; c];
            for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
                let r = r0 + i;
                xhat_row(r, &mut xh);
                let gr = &gb[r * c..(r + 1) * c];
                for (((((o, &xv), &gv), &w), &a1), (&a2, &s)) in dst
                    .iter_mut()
                    .zip(&xh)
                    .zip(gr)
                    .zip(gm)
                    .zip(&k1)
                    .zip(k2.iter().zip(&iv))
                {
                    *o = s * (w * gv - a1 - xv * a2);
                }
            }
        });
        sums
    });
    let mut dgamma = vec![0.0f64; c];
    let mut dbeta = vec![0.0f64; c];
    for row in &sums {
        for ch in 0..c {
            dbeta[ch] += row[ch] as f64;
            dgamma[ch] += row[c + ch] as f64;
        }
    }
    let dgamma: Vec<f32> = dgamma.into_iter().map(|v| v as f32).collect();
    let dbeta: Vec<f32> = dbeta.into_iter().map(|v| v as f32).collect();
    Ok((
        CpuTensor::from_result(dx, x.shape(), x.dtype()),
        CpuTensor::from_result(dgamma, gamma.shape(), gamma.dtype()),
        CpuTensor::from_result(dbeta, gamma.shape(), gamma.dtype()),
    ))
}

/// Applies `f(x_row, g_row, dst_row)` to every row of `x` (and `g`).
fn map_rows2(
    x: &[f32],
    g: &[f32],
    c: usize,
    f: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = crate::pool::take(x.len());
    if c > 0 {
        for_row_chunks(&mut out, c, |r0, chunk| {
            for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
                let r = r0 + i;
                f(r, &x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c], dst);
            }
        });
    }
    out
}

/// Gradient of the per-row LayerNorm without affine.
fn layer_norm_backward(x: &CpuTensor, eps: f32, g: &CpuTensor) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    check_g("layer_norm_backward", g, rows, c)?;
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let out = map_rows2(&xs, &gs, c, |_, src, gr, dst| {
        let n = src.len() as f32;
        let mean = sum(src) / n;
        let var = sum_sq_dev(src, mean) / n;
        let inv = 1.0 / (var + eps).sqrt();
        // dst <- xhat first, then the gradient.
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = (v - mean) * inv;
        }
        let mg = sum(gr) / n;
        let mgx = dot(gr, dst) / n;
        for (o, &gv) in dst.iter_mut().zip(gr) {
            *o = inv * (gv - mg - *o * mgx);
        }
    });
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

/// Gradients of RMSNorm: `(dx, dw)`.
fn rms_norm_backward(
    x: &CpuTensor,
    w: &CpuTensor,
    eps: f32,
    g: &CpuTensor,
) -> Result<(CpuTensor, CpuTensor)> {
    let (rows, c) = x.dims2();
    if w.numel() != c {
        return Err(Error::input(format!(
            "rms_norm_backward: weight shape {:?} must hold {c} elements for input {:?}",
            w.shape(),
            x.shape()
        )));
    }
    check_g("rms_norm_backward", g, rows, c)?;
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let ws = w.to_f32_cow();
    let (xs, gs, ws) = (&*xs, &*gs, &*ws);
    let inv_of = |src: &[f32]| 1.0 / (sum_sq(src) / src.len() as f32 + eps).sqrt();
    let mut inv = vec![0.0f32; rows];
    if c > 0 {
        for_row_chunks(&mut inv, 1, |r0, chunk| {
            for (i, o) in chunk.iter_mut().enumerate() {
                let r = r0 + i;
                *o = inv_of(&xs[r * c..(r + 1) * c]);
            }
        });
    }
    let inv = &inv;
    // dx = inv (g w) - x inv^3 mean(g w x).
    let dx = map_rows2(xs, gs, c, |r, src, gr, dst| {
        let s = inv[r];
        for ((o, &gv), &wv) in dst.iter_mut().zip(gr).zip(ws) {
            *o = gv * wv;
        }
        let m = dot(dst, src) / c as f32;
        let k = s * s * s * m;
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = s * *o - v * k;
        }
    });
    let dw = segment_reduce(&[0, rows], c, |r, acc| {
        let s = inv[r];
        for ((a, &gv), &v) in acc
            .iter_mut()
            .zip(&gs[r * c..(r + 1) * c])
            .zip(&xs[r * c..(r + 1) * c])
        {
            *a += gv * v * s;
        }
    });
    Ok((
        CpuTensor::from_result(dx, x.shape(), x.dtype()),
        CpuTensor::from_result(dw, w.shape(), w.dtype()),
    ))
}

/// Gradient of `x / max(||x||, 1e-12)` per row.
fn l2_normalize_backward(x: &CpuTensor, g: &CpuTensor) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    check_g("l2_normalize_backward", g, rows, c)?;
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let out = map_rows2(&xs, &gs, c, |_, src, gr, dst| {
        let norm = sum_sq(src).sqrt();
        if norm >= 1e-12 {
            // (g - y (y . g)) / n with y = x / n.
            let inv = 1.0 / norm;
            let yg = dot(src, gr) * inv;
            for ((o, &v), &gv) in dst.iter_mut().zip(src).zip(gr) {
                *o = (gv - v * inv * yg) * inv;
            }
        } else {
            // The clamp is active: y = x / 1e-12 is linear in x.
            let inv = 1.0 / 1e-12f32;
            for (o, &gv) in dst.iter_mut().zip(gr) {
                *o = gv * inv;
            }
        }
    });
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

// ------------------------------------------------------------- element-wise

/// `g * op'(x)`.
fn unary_backward(x: &CpuTensor, op: Unary, g: &CpuTensor) -> Result<CpuTensor> {
    check_same("unary_backward", "x", x, "g", g)?;
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let (xs, gs) = (&*xs, &*gs);
    let mut out = crate::pool::take(xs.len());
    for_row_chunks(&mut out, 1, |i0, chunk| {
        let n = chunk.len();
        unary_backward_slice(op, &xs[i0..i0 + n], &gs[i0..i0 + n], chunk);
    });
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

/// Checks a per-sample `ada (S, vc)` with column block(s) of width `c`.
fn check_ada(
    op: &str,
    rows: usize,
    c: usize,
    ada: &CpuTensor,
    blocks: &[(&str, usize)],
    seg: Segments,
) -> Result<(usize, usize)> {
    let samples = check_segments(op, seg, rows)?;
    let (ar, vc) = ada.dims2();
    if ar != samples {
        return Err(Error::input(format!(
            "{op}: per-sample tensor {:?} has {ar} rows but there are {samples} segments",
            ada.shape()
        )));
    }
    for &(what, at) in blocks {
        if c == 0 && vc == 0 {
            continue;
        }
        if c == 0 || !vc.is_multiple_of(c) || at >= vc / c {
            return Err(Error::input(format!(
                "{op}: {what} block {at} of width {c} is not inside ada of width {vc}"
            )));
        }
    }
    Ok((samples, vc))
}

/// Gradients of `x (1 + scale[s]) + shift[s]`: `(dx, dada)`.
fn modulate_backward(
    x: &CpuTensor,
    ada: &CpuTensor,
    shift_at: usize,
    scale_at: usize,
    seg: Segments,
    g: &CpuTensor,
) -> Result<(CpuTensor, CpuTensor)> {
    let (rows, c) = x.dims2();
    let (samples, vc) = check_ada(
        "modulate_backward",
        rows,
        c,
        ada,
        &[("shift", shift_at), ("scale", scale_at)],
        seg,
    )?;
    check_g("modulate_backward", g, rows, c)?;
    let xs = x.to_f32_cow();
    let gs = g.to_f32_cow();
    let av = ada.to_f32_cow();
    let (xs, gs, av) = (&*xs, &*gs, &*av);
    let mut dx = crate::pool::take(rows * c);
    let mut dada = vec![0.0f32; samples * vc];
    if c > 0 {
        for_row_chunks(&mut dx, c, |r0, chunk| {
            for_rows_with_sample(seg, r0, chunk.len() / c, |r, s| {
                let dst = &mut chunk[(r - r0) * c..(r - r0 + 1) * c];
                let scale = &av[s * vc + scale_at * c..s * vc + (scale_at + 1) * c];
                for ((o, &gv), &sc) in dst.iter_mut().zip(&gs[r * c..(r + 1) * c]).zip(scale) {
                    *o = gv * (1.0 + sc);
                }
            });
        });
        let sums = segment_reduce(seg, 2 * c, |r, acc| {
            let (a_g, a_gx) = acc.split_at_mut(c);
            let gr = &gs[r * c..(r + 1) * c];
            add_into(a_g, gr);
            add_prod_into(a_gx, gr, &xs[r * c..(r + 1) * c]);
        });
        for s in 0..samples {
            let src = &sums[s * 2 * c..(s + 1) * 2 * c];
            let row = &mut dada[s * vc..(s + 1) * vc];
            add_into(&mut row[shift_at * c..(shift_at + 1) * c], &src[..c]);
            add_into(&mut row[scale_at * c..(scale_at + 1) * c], &src[c..]);
        }
    }
    Ok((
        CpuTensor::from_result(dx, x.shape(), x.dtype()),
        CpuTensor::from_result(dada, ada.shape(), ada.dtype()),
    ))
}

/// Gradients of `x + gate[s] y` w.r.t. `y` and `ada`: `(dy, dada)`.
fn gated_add_backward(
    y: &CpuTensor,
    ada: &CpuTensor,
    gate_at: usize,
    seg: Segments,
    g: &CpuTensor,
) -> Result<(CpuTensor, CpuTensor)> {
    let (rows, c) = y.dims2();
    let (samples, vc) = check_ada(
        "gated_add_backward",
        rows,
        c,
        ada,
        &[("gate", gate_at)],
        seg,
    )?;
    check_g("gated_add_backward", g, rows, c)?;
    let ys = y.to_f32_cow();
    let gs = g.to_f32_cow();
    let av = ada.to_f32_cow();
    let (ys, gs, av) = (&*ys, &*gs, &*av);
    let mut dy = crate::pool::take(rows * c);
    let mut dada = vec![0.0f32; samples * vc];
    if c > 0 {
        for_row_chunks(&mut dy, c, |r0, chunk| {
            for_rows_with_sample(seg, r0, chunk.len() / c, |r, s| {
                let dst = &mut chunk[(r - r0) * c..(r - r0 + 1) * c];
                let gate = &av[s * vc + gate_at * c..s * vc + (gate_at + 1) * c];
                for ((o, &gv), &k) in dst.iter_mut().zip(&gs[r * c..(r + 1) * c]).zip(gate) {
                    *o = gv * k;
                }
            });
        });
        let sums = segment_reduce(seg, c, |r, acc| {
            add_prod_into(acc, &gs[r * c..(r + 1) * c], &ys[r * c..(r + 1) * c]);
        });
        for s in 0..samples {
            dada[s * vc + gate_at * c..s * vc + (gate_at + 1) * c]
                .copy_from_slice(&sums[s * c..(s + 1) * c]);
        }
    }
    Ok((
        CpuTensor::from_result(dy, y.shape(), y.dtype()),
        CpuTensor::from_result(dada, ada.shape(), ada.dtype()),
    ))
}

// ---------------------------------------------------------------- attention

/// Queries per block of the attention backward (bounds the two score
/// buffers at `Q_BLOCK * KEY_BLOCK` floats each).
const Q_BLOCK: usize = 128;

/// Gradient of packed multi-head attention w.r.t. `qkv (T, 3d)`.
fn attention_backward(
    qkv: &CpuTensor,
    heads: usize,
    seg: Segments,
    g: &CpuTensor,
) -> Result<CpuTensor> {
    #[cfg(target_arch = "x86_64")]
    {
        let (t, d) = crate::attention::check_qkv("attention_backward", qkv, heads, seg)?;
        check_g("attention_backward", g, t, d)?;
        let pairs = heads * seg.windows(2).filter(|w| w[1] > w[0]).count();
        // One task per (segment, head): with fewer than the pool's threads
        // the blocked path's parallel products win.
        if t > 0
            && d > 0
            && pairs >= rayon::current_num_threads()
            && crate::attention512::applies(d / heads, crate::attention::longest(seg))
        {
            let xs = qkv.to_f32_cow();
            let gs = g.to_f32_cow();
            let mut out = crate::pool::take_zeroed(t * 3 * d);
            crate::attention512::backward(&xs, &gs, d, heads, seg, &mut out);
            return Ok(CpuTensor::from_result(out, qkv.shape(), qkv.dtype()));
        }
    }
    attention_backward_blocked(qkv, heads, seg, g, crate::attention::KEY_BLOCK)
}

/// [`attention_backward`] with key blocks of `kb` keys.
///
/// One task per `(segment, head)` (it owns that segment's rows of the head's
/// q, k and v column blocks). Per block of queries, with `P = softmax(scale Q
/// K^T)` taken a block of keys at a time: the row statistics (max, sum) of
/// the streaming softmax first, then per key block `dV += P^T dO`,
/// `dP = dO V^T`, `dS = P * (dP - D)` with `D = rowsum(dP * P)`,
/// `dQ += scale dS K`, `dK += scale dS^T Q`. `D` needs every key block, so a
/// segment longer than one block makes one more sweep for it first (and
/// recomputes `S` per sweep); a single block keeps `P` from the statistics
/// sweep, the same five products as the unblocked formulation.
pub(crate) fn attention_backward_blocked(
    qkv: &CpuTensor,
    heads: usize,
    seg: Segments,
    g: &CpuTensor,
    kb: usize,
) -> Result<CpuTensor> {
    let kb = kb.max(1);
    let (t, d) = crate::attention::check_qkv("attention_backward", qkv, heads, seg)?;
    let c3 = 3 * d;
    check_g("attention_backward", g, t, d)?;
    let hd = d / heads;
    let mut out = crate::pool::take_zeroed(t * c3);
    if t == 0 || d == 0 {
        return Ok(CpuTensor::from_result(out, qkv.shape(), qkv.dtype()));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let xs = qkv.to_f32_cow();
    let gs = g.to_f32_cow();
    let (xs, gs) = (&*xs, &*gs);
    let mut tasks = Vec::new();
    for w in seg.windows(2) {
        if w[1] > w[0] {
            for head in 0..heads {
                tasks.push((w[0], w[1] - w[0], head));
            }
        }
    }
    let par_gemm = tasks.len() < rayon::current_num_threads();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let ld = c3 as isize;
    type Bufs = (Vec<f32>, Vec<f32>, Vec<f32>);
    let run = |bufs: &mut Bufs, &(r0, n, head): &(usize, usize, usize)| {
        let (p, dp, stats) = bufs;
        let (qoff, koff, voff) = (head * hd, d + head * hd, 2 * d + head * hd);
        let single = n <= kb;
        let mut q0 = 0;
        while q0 < n {
            let qn = Q_BLOCK.min(n - q0);
            // Both are overwritten by their first GEMM: resize keeps the old
            // contents and fills only growth, so no memset per block.
            p.resize(qn * n.min(kb), 0.0);
            dp.resize(qn * n.min(kb), 0.0);
            stats.clear();
            stats.resize(qn, f32::NEG_INFINITY);
            stats.resize(3 * qn, 0.0);
            let (m, rest) = stats.split_at_mut(qn);
            let (l, dsum) = rest.split_at_mut(qn);
            let q_mat = Mat {
                ptr: xs[(r0 + q0) * c3 + qoff..].as_ptr(),
                rs: ld,
                cs: 1,
            };
            let do_mat = Mat {
                ptr: gs[(r0 + q0) * d + qoff..].as_ptr(),
                rs: d as isize,
                cs: 1,
            };
            let k_at = |kb0: usize| Mat {
                ptr: xs[(r0 + kb0) * c3 + koff..].as_ptr(),
                rs: ld,
                cs: 1,
            };
            let vt_at = |kb0: usize| Mat {
                ptr: xs[(r0 + kb0) * c3 + voff..].as_ptr(),
                rs: 1,
                cs: ld,
            };
            // S (qn, kn) = scale Q K_blk^T into `p`.
            let scores = |p: &mut [f32], kb0: usize, kn: usize| unsafe {
                let k = k_at(kb0);
                mm(
                    qn,
                    kn,
                    hd,
                    p.as_mut_ptr(),
                    kn as isize,
                    false,
                    q_mat,
                    Mat {
                        ptr: k.ptr,
                        rs: 1,
                        cs: ld,
                    },
                    scale,
                    par_gemm,
                );
            };
            // dP (qn, kn) = dO V_blk^T into `dp`.
            let dprobs = |dp: &mut [f32], kb0: usize, kn: usize| unsafe {
                mm(
                    qn,
                    kn,
                    hd,
                    dp.as_mut_ptr(),
                    kn as isize,
                    false,
                    do_mat,
                    vt_at(kb0),
                    1.0,
                    par_gemm,
                );
            };
            // P of a key block from the final row statistics.
            let probs = |p: &mut [f32], m: &[f32], l: &[f32], kb0: usize, kn: usize| {
                scores(p, kb0, kn);
                for ((row, &mi), &li) in p.chunks_exact_mut(kn).zip(m).zip(l) {
                    softmax_probs(row, mi, 1.0 / li);
                }
            };
            // SAFETY (all `out` writes): this task owns rows r0..r0+n of the
            // head's q, k and v column blocks; `p`/`dp` are its own buffers.
            // Sweep 1: the row statistics m, l.
            for kb0 in (0..n).step_by(kb) {
                let kn = kb.min(n - kb0);
                let pb = &mut p[..qn * kn];
                scores(pb, kb0, kn);
                for ((row, mi), li) in pb.chunks_exact_mut(kn).zip(m.iter_mut()).zip(l.iter_mut()) {
                    let mut alpha = 0.0;
                    softmax_online(row, mi, li, &mut alpha);
                }
            }
            if single {
                // P = exp(S - m) / l, from the sweep's block.
                for (row, &li) in p[..qn * n].chunks_exact_mut(n).zip(l.iter()) {
                    let inv = 1.0 / li;
                    row.iter_mut().for_each(|v| *v *= inv);
                }
            } else {
                // Sweep 2: D = rowsum(dP * P) over every key block.
                for kb0 in (0..n).step_by(kb) {
                    let kn = kb.min(n - kb0);
                    let (pb, dpb) = (&mut p[..qn * kn], &mut dp[..qn * kn]);
                    probs(pb, m, l, kb0, kn);
                    dprobs(dpb, kb0, kn);
                    for ((pr, dr), ds) in pb
                        .chunks_exact(kn)
                        .zip(dpb.chunks_exact(kn))
                        .zip(dsum.iter_mut())
                    {
                        *ds += dot(pr, dr);
                    }
                }
            }
            // Sweep 3: the gradients, a key block at a time.
            for kb0 in (0..n).step_by(kb) {
                let kn = kb.min(n - kb0);
                let (pb, dpb) = (&mut p[..qn * kn], &mut dp[..qn * kn]);
                if !single {
                    probs(pb, m, l, kb0, kn);
                }
                unsafe {
                    // dV_blk (kn, hd) += P^T dO
                    mm(
                        kn,
                        hd,
                        qn,
                        out_ptr.get().add((r0 + kb0) * c3 + voff),
                        ld,
                        true,
                        Mat {
                            ptr: pb.as_ptr(),
                            rs: 1,
                            cs: kn as isize,
                        },
                        do_mat,
                        1.0,
                        par_gemm,
                    );
                }
                dprobs(dpb, kb0, kn);
                // dS = P * (dP - D), in place in dp.
                for ((pr, dr), ds) in pb
                    .chunks_exact(kn)
                    .zip(dpb.chunks_exact_mut(kn))
                    .zip(dsum.iter())
                {
                    let s = if single { dot(pr, dr) } else { *ds };
                    for (o, &pv) in dr.iter_mut().zip(pr) {
                        *o = pv * (*o - s);
                    }
                }
                unsafe {
                    // dQ (qn, hd) += scale dS K_blk
                    mm(
                        qn,
                        hd,
                        kn,
                        out_ptr.get().add((r0 + q0) * c3 + qoff),
                        ld,
                        true,
                        Mat {
                            ptr: dpb.as_ptr(),
                            rs: kn as isize,
                            cs: 1,
                        },
                        k_at(kb0),
                        scale,
                        par_gemm,
                    );
                    // dK_blk (kn, hd) += scale dS^T Q
                    mm(
                        kn,
                        hd,
                        qn,
                        out_ptr.get().add((r0 + kb0) * c3 + koff),
                        ld,
                        true,
                        Mat {
                            ptr: dpb.as_ptr(),
                            rs: 1,
                            cs: kn as isize,
                        },
                        q_mat,
                        scale,
                        par_gemm,
                    );
                }
            }
            q0 += qn;
        }
    };
    let work: usize = tasks.iter().map(|&(_, n, _)| n * n * hd).sum();
    if tasks.len() <= 1 || work < (1 << 16) || par_gemm {
        let mut bufs = Bufs::default();
        for task in &tasks {
            run(&mut bufs, task);
        }
    } else {
        tasks
            .par_iter()
            .with_max_len(1)
            .for_each_init(Bufs::default, run);
    }
    Ok(CpuTensor::from_result(out, qkv.shape(), qkv.dtype()))
}

// ---------------------------------------------------------------- de-chunk

/// Gradients of the de-chunk smoothing: `(dh, dp)`.
fn dechunk_smooth_backward(
    h: &CpuTensor,
    p: &CpuTensor,
    pos: &[u32],
    width: usize,
    sigma: f32,
    seg: Segments,
    g: &CpuTensor,
) -> Result<(CpuTensor, CpuTensor)> {
    let (t, d) =
        crate::dechunk::check_dechunk_args("dechunk_smooth_backward", h, p, pos, width, seg)?;
    check_g("dechunk_smooth_backward", g, t, d)?;
    let hs = h.to_f32_cow();
    let ps = p.to_f32_cow();
    let gs = g.to_f32_cow();
    let (hs, ps, gs) = (&*hs, &*ps, &*gs);
    let mut dh = crate::pool::take_zeroed(t * d);
    let mut dp = vec![0.0f32; t];
    let parts: Vec<_> = split_segments(seg, d, &mut dh)
        .into_iter()
        .zip(split_segments(seg, 1, &mut dp))
        .collect();
    // Lengths and `width > 0` are checked above, so the call cannot panic.
    let run = |sc: &mut crate::dechunk::Scratch, ((a, b, gh), (_, _, gp)): (RowsMut, RowsMut)| {
        if b - a <= crate::dechunk::DENSE_MAX && d > 0 {
            let (hseg, pseg, gseg) = (&hs[a * d..b * d], &ps[a..b], &gs[a * d..b * d]);
            let pos = &pos[a..b];
            crate::dechunk::smooth_backward_dense(
                hseg, d, pseg, pos, width, sigma, gseg, gh, gp, sc,
            );
            return;
        }
        dcdit_core::dechunk::smooth_backward(
            &hs[a * d..b * d],
            d,
            &ps[a..b],
            &pos[a..b],
            width,
            sigma,
            &gs[a * d..b * d],
            gh,
            gp,
        );
    };
    if parts.len() <= 1 {
        let mut sc = crate::dechunk::Scratch::default();
        parts.into_iter().for_each(|part| run(&mut sc, part));
    } else {
        parts
            .into_par_iter()
            .with_max_len(1)
            .for_each_init(crate::dechunk::Scratch::default, run);
    }
    Ok((
        CpuTensor::from_result(dh, h.shape(), h.dtype()),
        CpuTensor::from_result(dp, p.shape(), p.dtype()),
    ))
}

// ---------------------------------------------------------------- optimiser

/// One AdamW step as PyTorch's single-tensor `torch.optim.AdamW`.
fn adamw_step(
    param: &CpuTensor,
    grad: &CpuTensor,
    m: &CpuTensor,
    v: &CpuTensor,
    hp: AdamW,
    grad_scale: f32,
) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
    check_same("adamw_step", "param", param, "grad", grad)?;
    check_same("adamw_step", "param", param, "m", m)?;
    check_same("adamw_step", "param", param, "v", v)?;
    let AdamWScalars {
        decay,
        w1,
        b2,
        w2,
        neg_step,
        bc2_sqrt,
    } = hp.scalars()?;
    let eps = hp.eps;
    let ps = param.to_f32_cow();
    let gs = grad.to_f32_cow();
    let ms = m.to_f32_cow();
    let vs = v.to_f32_cow();
    let (ps, gs, ms, vs) = (&*ps, &*gs, &*ms, &*vs);
    let n = ps.len();
    let mut po = crate::pool::take(n);
    let mut mo = crate::pool::take(n);
    let mut vo = crate::pool::take(n);
    let kernel = |i0: usize, pc: &mut [f32], mc: &mut [f32], vc: &mut [f32]| {
        for (i, ((po, mo), vo)) in pc.iter_mut().zip(mc).zip(vc).enumerate() {
            let j = i0 + i;
            let g = gs[j] * grad_scale;
            let p = ps[j] * decay;
            // exp_avg.lerp_(grad, 1 - beta1)
            let m0 = ms[j];
            let m1 = if w1 < 0.5 {
                m0 + w1 * (g - m0)
            } else {
                g - (g - m0) * (1.0 - w1)
            };
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            let v1 = vs[j] * b2 + w2 * g * g;
            // denom = exp_avg_sq.sqrt() / sqrt(bc2) + eps; p += -step * m / denom
            let denom = v1.sqrt() / bc2_sqrt + eps;
            *po = p + neg_step * m1 / denom;
            *mo = m1;
            *vo = v1;
        }
    };
    if n <= PAR_GRAIN {
        kernel(0, &mut po, &mut mo, &mut vo);
    } else {
        po.par_chunks_mut(PAR_GRAIN)
            .zip(mo.par_chunks_mut(PAR_GRAIN))
            .zip(vo.par_chunks_mut(PAR_GRAIN))
            .enumerate()
            .for_each(|(ci, ((pc, mc), vc))| kernel(ci * PAR_GRAIN, pc, mc, vc));
    }
    Ok((
        CpuTensor::from_result(po, param.shape(), param.dtype()),
        CpuTensor::from_result(mo, m.shape(), m.dtype()),
        CpuTensor::from_result(vo, v.shape(), v.dtype()),
    ))
}

/// `ema * decay + param * (1 - decay)` (torch: `ema.mul_(d).add_(p, alpha=1-d)`).
fn ema_update(ema: &CpuTensor, param: &CpuTensor, decay: f32) -> Result<CpuTensor> {
    check_same("ema_update", "ema", ema, "param", param)?;
    let alpha = (1.0 - decay as f64) as f32;
    let es = ema.to_f32_cow();
    let ps = param.to_f32_cow();
    let (es, ps) = (&*es, &*ps);
    let mut out = crate::pool::take(es.len());
    for_row_chunks(&mut out, 1, |i0, chunk| {
        let n = chunk.len();
        for ((o, &e), &p) in chunk.iter_mut().zip(&es[i0..i0 + n]).zip(&ps[i0..i0 + n]) {
            *o = e * decay + alpha * p;
        }
    });
    Ok(CpuTensor::from_result(out, ema.shape(), ema.dtype()))
}

// ------------------------------------------------------------------- trait

impl GradBackend for CpuBackend {
    fn matmul(&self, a: &CpuTensor, b: &CpuTensor, ta: bool, tb: bool) -> Result<CpuTensor> {
        self.run("matmul", || matmul(a, b, ta, tb))
    }

    fn col_sum(&self, x: &CpuTensor) -> Result<CpuTensor> {
        self.run("col_sum", || col_sum(x))
    }

    fn segment_sum(&self, x: &CpuTensor, seg: Segments) -> Result<CpuTensor> {
        self.run("segment_sum", || segment_sum(x, seg))
    }

    fn full(&self, shape: &[usize], value: f32) -> Result<CpuTensor> {
        let n = numel_of(shape)?;
        CpuTensor::from_f32_vec(vec![value; n], shape)
    }

    fn sum_squares(&self, x: &CpuTensor) -> Result<f64> {
        self.run("sum_squares", || sum_squares(x))
    }

    fn conv2d_backward(
        &self,
        x: &CpuTensor,
        grid: Grid,
        w: &CpuTensor,
        k: usize,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        self.run("conv2d_backward", || {
            let (dx, dw, db) = conv2d_backward(x, grid, w, k, g, true)?;
            let dx = dx.ok_or_else(|| Error::backend("conv2d_backward: dx not computed"))?;
            Ok((dx, dw, db))
        })
    }

    fn conv2d_weight_backward(
        &self,
        x: &CpuTensor,
        grid: Grid,
        w: &CpuTensor,
        k: usize,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        self.run("conv2d_backward", || {
            let (_, dw, db) = conv2d_backward(x, grid, w, k, g, false)?;
            Ok((dw, db))
        })
    }

    fn depthwise_conv3x3_backward(
        &self,
        x: &CpuTensor,
        grid: Grid,
        w: &CpuTensor,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        self.run("depthwise_conv3x3_backward", || {
            depthwise_conv3x3_backward(x, grid, w, g)
        })
    }

    fn group_norm_backward(
        &self,
        x: &CpuTensor,
        grid: Grid,
        groups: usize,
        gamma: &CpuTensor,
        eps: f32,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        self.run("group_norm_backward", || {
            group_norm_backward(x, grid, groups, gamma, eps, g)
        })
    }

    fn layer_norm_backward(&self, x: &CpuTensor, eps: f32, g: &CpuTensor) -> Result<CpuTensor> {
        self.run("layer_norm_backward", || layer_norm_backward(x, eps, g))
    }

    fn rms_norm_backward(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        eps: f32,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        self.run("rms_norm_backward", || rms_norm_backward(x, w, eps, g))
    }

    fn l2_normalize_backward(&self, x: &CpuTensor, g: &CpuTensor) -> Result<CpuTensor> {
        self.run("l2_normalize_backward", || l2_normalize_backward(x, g))
    }

    fn unary_backward(&self, x: &CpuTensor, op: Unary, g: &CpuTensor) -> Result<CpuTensor> {
        self.run("unary_backward", || unary_backward(x, op, g))
    }

    fn modulate_backward(
        &self,
        x: &CpuTensor,
        ada: &CpuTensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        self.run("modulate_backward", || {
            modulate_backward(x, ada, shift_at, scale_at, seg, g)
        })
    }

    fn gated_add_backward(
        &self,
        y: &CpuTensor,
        ada: &CpuTensor,
        gate_at: usize,
        seg: Segments,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        self.run("gated_add_backward", || {
            gated_add_backward(y, ada, gate_at, seg, g)
        })
    }

    fn attention_backward(
        &self,
        qkv: &CpuTensor,
        heads: usize,
        seg: Segments,
        g: &CpuTensor,
    ) -> Result<CpuTensor> {
        self.run("attention_backward", || {
            attention_backward(qkv, heads, seg, g)
        })
    }

    fn dechunk_smooth_backward(
        &self,
        h: &CpuTensor,
        p: &CpuTensor,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
        g: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        self.run("dechunk_smooth_backward", || {
            dechunk_smooth_backward(h, p, pos, width, sigma, seg, g)
        })
    }

    fn adamw_step(
        &self,
        param: &CpuTensor,
        grad: &CpuTensor,
        m: &CpuTensor,
        v: &CpuTensor,
        hp: AdamW,
        grad_scale: f32,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        self.run("adamw_step", || {
            adamw_step(param, grad, m, v, hp, grad_scale)
        })
    }

    fn ema_update(&self, ema: &CpuTensor, param: &CpuTensor, decay: f32) -> Result<CpuTensor> {
        self.run("ema_update", || ema_update(ema, param, decay))
    }
}
