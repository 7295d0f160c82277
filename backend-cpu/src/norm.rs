//! Normalisations: GroupNorm (per sample), LayerNorm and RMSNorm (per row),
//! L2 normalisation.

use dcdit_core::backend::Grid;
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::tensor::CpuTensor;
use crate::util::{for_row_chunks, sum, sum_sq, sum_sq_dev, PAR_GRAIN};

/// Per-(sample, channel) f64 totals of `f(sample, row, acc)` over the rows of
/// each sample of an NHWC activation (`batch * l` rows of `c`), in row chunks
/// (in parallel for large inputs) that never cross samples. Accumulating per
/// channel keeps the inner loop a straight vector loop whatever the group size.
fn channel_reduce(
    xs: &[f32],
    batch: usize,
    l: usize,
    c: usize,
    f: impl Fn(usize, &[f32], &mut [f64]) + Sync,
) -> Vec<f64> {
    let rows_per = (PAR_GRAIN / c.max(1)).max(1);
    let chunks_per_sample = l.div_ceil(rows_per).max(1);
    let partial = |t: usize| -> (usize, Vec<f64>) {
        let (b, ci) = (t / chunks_per_sample, t % chunks_per_sample);
        let mut acc = vec![0.0f64; c];
        let r0 = b * l + (ci * rows_per).min(l);
        let r1 = (b * l + l).min(r0 + rows_per);
        crate::util::simd(|| {
            for r in r0..r1 {
                f(b, &xs[r * c..(r + 1) * c], &mut acc);
            }
        });
        (b, acc)
    };
    let n_tasks = batch * chunks_per_sample;
    let parts: Vec<(usize, Vec<f64>)> = if xs.len() <= PAR_GRAIN {
        (0..n_tasks).map(partial).collect()
    } else {
        (0..n_tasks).into_par_iter().map(partial).collect()
    };
    let mut tot = vec![0.0f64; batch * c];
    for (b, p) in parts {
        for (t, v) in tot[b * c..(b + 1) * c].iter_mut().zip(p) {
            *t += v;
        }
    }
    tot
}

/// GroupNorm statistics of an NHWC activation, expanded per (sample,
/// channel): the group mean as f32 `hi + lo` (subtracted in two steps, so the
/// centred value stays accurate when |mean| >> std) and 1/std. The forward
/// and the backward both use this, so they normalise identically.
pub(crate) struct GroupStats {
    /// High part of the group mean, `(batch, c)`.
    pub m_hi: Vec<f32>,
    /// Low part (`mean - m_hi`), `(batch, c)`.
    pub m_lo: Vec<f32>,
    /// `1 / sqrt(var + eps)`, `(batch, c)`.
    pub inv: Vec<f32>,
}

pub(crate) fn group_stats(xs: &[f32], grid: Grid, c: usize, groups: usize, eps: f32) -> GroupStats {
    let (batch, l) = (grid.batch, grid.len());
    let cg = c / groups;
    let count = ((l * cg) as f64).max(1.0);
    let sums = channel_reduce(xs, batch, l, c, |_, row, acc| {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    });
    let group_total = |v: &[f64], b: usize, g: usize| -> f64 {
        v[b * c + g * cg..b * c + (g + 1) * cg].iter().sum()
    };
    let mut mean = vec![0.0f64; batch * c];
    for b in 0..batch {
        for g in 0..groups {
            let m = group_total(&sums, b, g) / count;
            mean[b * c + g * cg..b * c + (g + 1) * cg].fill(m);
        }
    }
    let m_hi: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let m_lo: Vec<f32> = mean
        .iter()
        .zip(&m_hi)
        .map(|(&m, &h)| (m - h as f64) as f32)
        .collect();
    let ssd = channel_reduce(xs, batch, l, c, |b, row, acc| {
        for ((a, &v), &m) in acc.iter_mut().zip(row).zip(&m_hi[b * c..(b + 1) * c]) {
            let d = v - m;
            *a += (d * d) as f64;
        }
    });
    let mut inv = vec![0.0f32; batch * c];
    for b in 0..batch {
        for g in 0..groups {
            let s = (1.0 / (group_total(&ssd, b, g) / count + eps as f64).sqrt()) as f32;
            inv[b * c + g * cg..b * c + (g + 1) * cg].fill(s);
        }
    }
    GroupStats { m_hi, m_lo, inv }
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
    let (gm, bt) = (&*gm, &*bt);
    let mut out = crate::pool::take(rows * c);
    // One sample at a time, statistics then output, so that the passes after
    // the first read the sample from L2 (200 KB at 784 pixels x 64
    // channels) rather than the whole activation from memory three times.
    // Per-sample statistics are those of the whole grid, bit for bit.
    per_sample(xs, &mut out, grid, c, |_, xb, ob, one| {
        let st = group_stats(xb, one, c, groups, eps);
        // y = (x - m) * a + beta with a = inv * gamma, per channel.
        let a: Vec<f32> = st.inv.iter().zip(gm).map(|(&s, &w)| s * w).collect();
        let (m, m_lo) = (&st.m_hi, &st.m_lo);
        for_row_chunks(ob, c, |r0, chunk| {
            for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
                let src = &xb[(r0 + i) * c..(r0 + i + 1) * c];
                for (((((o, &v), &hi), &lo), &s), &t) in
                    dst.iter_mut().zip(src).zip(m).zip(m_lo).zip(&a).zip(bt)
                {
                    *o = ((v - hi) - lo) * s + t;
                }
            }
        });
    });
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

/// `f(b, x_b, out_b, grid_b)` for every sample `b` of an NHWC activation
/// `xs (grid.rows(), c)`, in parallel over the samples, results in sample
/// order: `x_b` and `out_b` are the sample's rows, `grid_b` the grid of that
/// one image. For ops that pass over a sample several times (GroupNorm's
/// statistics, then its output), so that the later passes hit the cache.
pub(crate) fn per_sample<R: Send>(
    xs: &[f32],
    out: &mut [f32],
    grid: Grid,
    c: usize,
    f: impl Fn(usize, &[f32], &mut [f32], Grid) -> R + Sync + Send,
) -> Vec<R> {
    let per = grid.len() * c;
    let one = Grid { batch: 1, ..grid };
    if per == 0 {
        return Vec::new();
    }
    out.par_chunks_mut(per)
        .zip(xs.par_chunks(per))
        .enumerate()
        .with_max_len(1)
        .map(|(b, (ob, xb))| f(b, xb, ob, one))
        .collect()
}

/// Applies `f(src_row, dst_row)` to every row.
fn map_rows(x: &CpuTensor, f: impl Fn(&[f32], &mut [f32]) + Sync + Send) -> CpuTensor {
    let (_, c) = x.dims2();
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let mut out = crate::pool::take(xs.len());
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

/// A row's mean and `1 / sqrt(biased variance + eps)`: LayerNorm's
/// statistics, shared by `layer_norm` and the fused `norm_modulate`.
pub(crate) fn layer_norm_stats(src: &[f32], eps: f32) -> (f32, f32) {
    let n = src.len() as f32;
    let mean = sum(src) / n;
    let var = sum_sq_dev(src, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm over each row, no affine (biased variance).
pub(crate) fn layer_norm(x: &CpuTensor, eps: f32) -> Result<CpuTensor> {
    Ok(map_rows(x, |src, dst| {
        let (mean, inv) = layer_norm_stats(src, eps);
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
