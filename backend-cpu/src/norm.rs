//! Normalisations: GroupNorm (per sample), LayerNorm and RMSNorm (per row),
//! L2 normalisation.

use dcdit_core::backend::Grid;
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::tensor::CpuTensor;
use crate::util::{for_row_chunks, sum, sum_sq, sum_sq_dev, PAR_GRAIN};

/// Per-sample, per-group sums over row chunks that never cross samples:
/// returns `batch * groups` f64 totals of `f(group_slice)`.
pub(crate) fn group_reduce(
    xs: &[f32],
    grid: Grid,
    c: usize,
    groups: usize,
    f: impl Fn(usize, usize, &[f32]) -> f32 + Sync,
) -> Vec<f64> {
    let l = grid.len();
    let cg = c / groups;
    let rows_per = (PAR_GRAIN / c.max(1)).max(1);
    let chunks_per_sample = l.div_ceil(rows_per);
    let partial = |b: usize, ci: usize| -> Vec<f64> {
        let mut acc = vec![0.0f64; groups];
        let r0 = b * l + ci * rows_per;
        let r1 = (b * l + l).min(r0 + rows_per);
        for r in r0..r1 {
            let row = &xs[r * c..(r + 1) * c];
            for (g, a) in acc.iter_mut().enumerate() {
                *a += f(b, g, &row[g * cg..(g + 1) * cg]) as f64;
            }
        }
        acc
    };
    let n_tasks = grid.batch * chunks_per_sample;
    let parts: Vec<(usize, Vec<f64>)> = if xs.len() <= PAR_GRAIN {
        (0..n_tasks)
            .map(|t| {
                (
                    t / chunks_per_sample,
                    partial(t / chunks_per_sample, t % chunks_per_sample),
                )
            })
            .collect()
    } else {
        (0..n_tasks)
            .into_par_iter()
            .map(|t| {
                (
                    t / chunks_per_sample,
                    partial(t / chunks_per_sample, t % chunks_per_sample),
                )
            })
            .collect()
    };
    let mut tot = vec![0.0f64; grid.batch * groups];
    for (b, p) in parts {
        for (g, v) in p.into_iter().enumerate() {
            tot[b * groups + g] += v;
        }
    }
    tot
}

/// GroupNorm with affine over each sample of an NHWC activation.
pub(crate) fn group_norm(
    x: &CpuTensor,
    grid: Grid,
    groups: usize,
    gamma: &CpuTensor,
    beta: &CpuTensor,
    eps: f32,
) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    if rows != grid.rows() {
        return Err(Error::input(format!(
            "group_norm: input shape {:?} has {rows} rows but the grid needs {}",
            x.shape(),
            grid.rows()
        )));
    }
    if groups == 0 || c % groups != 0 {
        return Err(Error::input(format!(
            "group_norm: {c} channels cannot be split into {groups} groups"
        )));
    }
    if gamma.numel() != c || beta.numel() != c {
        return Err(Error::input(format!(
            "group_norm: gamma {:?} / beta {:?} must hold {c} elements",
            gamma.shape(),
            beta.shape()
        )));
    }
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let gm = gamma.to_f32_cow();
    let bt = beta.to_f32_cow();
    let l = grid.len();
    let cg = c / groups;
    let count = (l * cg) as f64;
    let sums = group_reduce(xs, grid, c, groups, |_, _, v| sum(v));
    let mean: Vec<f64> = sums.iter().map(|s| s / count.max(1.0)).collect();
    let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let ssd = group_reduce(xs, grid, c, groups, |b, g, v| {
        sum_sq_dev(v, mean32[b * groups + g])
    });
    let inv: Vec<f32> = ssd
        .iter()
        .map(|s| (1.0 / (s / count.max(1.0) + eps as f64).sqrt()) as f32)
        .collect();
    // Per (sample, channel) mean, scale and shift: y = (x - m) * a + beta,
    // with the f64 mean split into f32 `hi + lo` and subtracted in two steps,
    // so the centred value is accurate even when |mean| >> std.
    let mut m = vec![0.0f32; grid.batch * c];
    let mut m_lo = vec![0.0f32; grid.batch * c];
    let mut a = vec![0.0f32; grid.batch * c];
    for b in 0..grid.batch {
        for ch in 0..c {
            let g = b * groups + ch / cg.max(1);
            m[b * c + ch] = mean32[g];
            m_lo[b * c + ch] = (mean[g] - mean32[g] as f64) as f32;
            a[b * c + ch] = inv[g] * gm[ch];
        }
    }
    let bt = &*bt;
    let mut out = vec![0.0f32; rows * c];
    for_row_chunks(&mut out, c, |r0, chunk| {
        for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
            let r = r0 + i;
            let b = r / l;
            let src = &xs[r * c..(r + 1) * c];
            let span = b * c..(b + 1) * c;
            let (mb, lb, ab) = (&m[span.clone()], &m_lo[span.clone()], &a[span]);
            for (((((o, &v), &hi), &lo), &s), &t) in
                dst.iter_mut().zip(src).zip(mb).zip(lb).zip(ab).zip(bt)
            {
                *o = ((v - hi) - lo) * s + t;
            }
        }
    });
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

/// Applies `f(src_row, dst_row)` to every row.
fn map_rows(x: &CpuTensor, f: impl Fn(&[f32], &mut [f32]) + Sync + Send) -> CpuTensor {
    let (_, c) = x.dims2();
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let mut out = vec![0.0f32; xs.len()];
    if c > 0 {
        for_row_chunks(&mut out, c, |r0, chunk| {
            for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
                let r = r0 + i;
                f(&xs[r * c..(r + 1) * c], dst);
            }
        });
    }
    CpuTensor::from_result(out, x.shape(), x.dtype())
}

/// LayerNorm over each row, no affine (biased variance).
pub(crate) fn layer_norm(x: &CpuTensor, eps: f32) -> Result<CpuTensor> {
    Ok(map_rows(x, |src, dst| {
        let n = src.len() as f32;
        let mean = sum(src) / n;
        let var = sum_sq_dev(src, mean) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = (v - mean) * inv;
        }
    }))
}

/// RMSNorm over each row with weight `w (c)`.
pub(crate) fn rms_norm(x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
    let (_, c) = x.dims2();
    if w.numel() != c {
        return Err(Error::input(format!(
            "rms_norm: weight shape {:?} must hold {c} elements for input {:?}",
            w.shape(),
            x.shape()
        )));
    }
    let ws = w.to_f32_cow();
    let ws = &*ws;
    Ok(map_rows(x, |src, dst| {
        let inv = 1.0 / (sum_sq(src) / src.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in dst.iter_mut().zip(src).zip(ws) {
            *o = v * inv * g;
        }
    }))
}

/// Each row divided by `max(||row||, 1e-12)`.
pub(crate) fn l2_normalize(x: &CpuTensor) -> Result<CpuTensor> {
    Ok(map_rows(x, |src, dst| {
        let inv = 1.0 / sum_sq(src).sqrt().max(1e-12);
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v * inv;
        }
    }))
}
