//! Element-wise ops, per-row reductions and scalings, per-sample broadcasts
//! over packed rows, row gathers and scatters.

use dcdit_core::backend::{Binary, Segments, Unary};
use dcdit_core::{Error, Result};

use half::bf16;
use half::slice::HalfFloatSliceExt;

use crate::tensor::{CpuTensor, Storage};
use crate::util::{check_segments, for_row_chunks, for_rows_with_sample, sum, PAR_GRAIN};

/// Row `r` (`c` wide) of row-major storage as f32: borrowed from f32
/// storage, converted into `buf` (at least `c` long) from 16-bit storage.
/// Lets per-row ops read bf16 activations a row at a time in L1 instead of
/// converting whole tensors first.
fn row_f32<'a>(s: &'a Storage, r: usize, c: usize, buf: &'a mut [f32]) -> &'a [f32] {
    let buf = &mut buf[..c];
    match s {
        Storage::F32(v) => return &v[r * c..(r + 1) * c],
        Storage::BF16(v) => crate::tensor::bf16_to_f32(&v[r * c..(r + 1) * c], buf),
        Storage::F16(v) => v[r * c..(r + 1) * c].convert_to_f32_slice(buf),
    }
    buf
}

/// Output rows of `cols` floats computed by `f(first_row, chunk)` as in
/// [`for_row_chunks`], stored as `dtype`: for bf16 each chunk is computed
/// into an f32 scratch and rounded into the output there (one pass over
/// memory rather than a whole f32 tensor converted afterwards).
fn rows_out(
    rows: usize,
    cols: usize,
    dtype: dcdit_core::backend::DType,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Storage {
    use rayon::prelude::*;
    if dtype != dcdit_core::backend::DType::BF16 || cols == 0 {
        let mut out = crate::pool::take(rows * cols);
        for_row_chunks(&mut out, cols, f);
        return Storage::from_f32_vec(out, dtype);
    }
    let mut out = crate::pool::take_bf16(rows * cols);
    let per = (PAR_GRAIN / cols).max(1);
    let run = |(i, chunk): (usize, &mut [bf16])| {
        crate::util::simd(|| {
            let mut tmp = crate::pool::take(chunk.len());
            f(i * per, &mut tmp);
            crate::tensor::f32_to_bf16(&tmp, chunk);
            crate::pool::give(tmp);
        })
    };
    if rows * cols <= PAR_GRAIN {
        run((0, &mut out));
    } else {
        out.par_chunks_mut(per * cols).enumerate().for_each(run);
    }
    Storage::BF16(out)
}

/// Applies `f` to every element.
fn map(x: &CpuTensor, f: impl Fn(f32) -> f32 + Sync + Send) -> CpuTensor {
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let mut out = crate::pool::take(xs.len());
    for_row_chunks(&mut out, 1, |i0, chunk| {
        for (o, &v) in chunk.iter_mut().zip(&xs[i0..]) {
            *o = f(v);
        }
    });
    CpuTensor::from_result(out, x.shape(), x.dtype())
}

/// Element-wise function.
pub(crate) fn unary(x: &CpuTensor, op: Unary) -> Result<CpuTensor> {
    if let Storage::BF16(xb) = x.storage() {
        return CpuTensor::new(Storage::BF16(unary_bf16(xb, op)), x.shape());
    }
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let mut out = crate::pool::take(xs.len());
    for_row_chunks(&mut out, 1, |i0, chunk| {
        crate::math::unary_slice(op, &xs[i0..i0 + chunk.len()], chunk);
    });
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

/// [`unary`] on bf16 storage, block by block through an f32 buffer that
/// stays in L1: one pass over memory instead of three (the whole tensor to
/// f32, the function, back to bf16), for the same values (the conversions
/// are the storage's: exact in, nearest even out). GELU on the MLP's hidden
/// activations is the bf16 forward's largest element-wise op.
fn unary_bf16(x: &[bf16], op: Unary) -> Vec<bf16> {
    use rayon::prelude::*;
    const BLOCK: usize = 1024;
    let mut out = crate::pool::take_bf16(x.len());
    let run = |(src, dst): (&[bf16], &mut [bf16])| {
        crate::util::simd(|| {
            let (mut a, mut b) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
            for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
                let (a, b) = (&mut a[..s.len()], &mut b[..s.len()]);
                crate::tensor::bf16_to_f32(s, a);
                crate::math::unary_slice(op, a, b);
                crate::tensor::f32_to_bf16(b, d);
            }
        })
    };
    if x.len() > PAR_GRAIN {
        x.par_chunks(PAR_GRAIN)
            .zip(out.par_chunks_mut(PAR_GRAIN))
            .for_each(run);
    } else {
        run((x, &mut out));
    }
    out
}

/// Element-wise `a op b` on equal shapes.
pub(crate) fn binary(a: &CpuTensor, b: &CpuTensor, op: Binary) -> Result<CpuTensor> {
    if a.shape() != b.shape() {
        return Err(Error::input(format!(
            "binary {op:?}: shapes differ: {:?} vs {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let av = a.to_f32_cow();
    let bv = b.to_f32_cow();
    let (av, bv) = (&*av, &*bv);
    let mut out = crate::pool::take(av.len());
    for_row_chunks(&mut out, 1, |i0, chunk| {
        let n = chunk.len();
        let (x, y) = (&av[i0..i0 + n], &bv[i0..i0 + n]);
        match op {
            Binary::Add => chunk
                .iter_mut()
                .zip(x.iter().zip(y))
                .for_each(|(o, (p, q))| *o = p + q),
            Binary::Sub => chunk
                .iter_mut()
                .zip(x.iter().zip(y))
                .for_each(|(o, (p, q))| *o = p - q),
            Binary::Mul => chunk
                .iter_mut()
                .zip(x.iter().zip(y))
                .for_each(|(o, (p, q))| *o = p * q),
        }
    });
    Ok(CpuTensor::from_result(out, a.shape(), a.dtype()))
}

/// `a * x + b` with scalars.
pub(crate) fn affine(x: &CpuTensor, a: f32, b: f32) -> Result<CpuTensor> {
    Ok(map(x, move |v| a * v + b))
}

/// Sum of each row, `(rows, 1)`.
pub(crate) fn row_sum(x: &CpuTensor) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let mut out = vec![0.0f32; rows];
    if let Some(rows_per_task) = crate::util::PAR_GRAIN.checked_div(c) {
        let rows_per_task = rows_per_task.max(1);
        if rows * c <= crate::util::PAR_GRAIN {
            for (r, o) in out.iter_mut().enumerate() {
                *o = sum(&xs[r * c..(r + 1) * c]);
            }
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each(|(t, chunk)| {
                    for (i, o) in chunk.iter_mut().enumerate() {
                        let r = t * rows_per_task + i;
                        *o = sum(&xs[r * c..(r + 1) * c]);
                    }
                });
        }
    }
    Ok(CpuTensor::from_result(out, &[rows, 1], x.dtype()))
}

/// `x[r, :] * s[r]`.
pub(crate) fn scale_rows(x: &CpuTensor, s: &CpuTensor) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    if s.numel() != rows {
        return Err(Error::input(format!(
            "scale_rows: scale shape {:?} must hold one value per row of {:?} ({rows})",
            s.shape(),
            x.shape()
        )));
    }
    let xs = x.to_f32_cow();
    let ss = s.to_f32_cow();
    let (xs, ss) = (&*xs, &*ss);
    let mut out = crate::pool::take(xs.len());
    if c > 0 {
        for_row_chunks(&mut out, c, |r0, chunk| {
            for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
                let r = r0 + i;
                let k = ss[r];
                for (o, &v) in dst.iter_mut().zip(&xs[r * c..(r + 1) * c]) {
                    *o = v * k;
                }
            }
        });
    }
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

/// Ones of the same shape and dtype.
pub(crate) fn ste(x: &CpuTensor) -> Result<CpuTensor> {
    Ok(CpuTensor::from_result(
        vec![1.0f32; x.numel()],
        x.shape(),
        x.dtype(),
    ))
}

/// Checks a per-sample matrix `v (S, width)` against segments of `x`'s rows.
fn check_per_sample(
    op: &str,
    x: &CpuTensor,
    v: &CpuTensor,
    seg: Segments,
) -> Result<(usize, usize, usize)> {
    let (rows, c) = x.dims2();
    let samples = check_segments(op, seg, rows)?;
    let (vr, vc) = v.dims2();
    if vr != samples {
        return Err(Error::input(format!(
            "{op}: per-sample tensor {:?} has {vr} rows but there are {samples} segments",
            v.shape()
        )));
    }
    Ok((rows, c, vc))
}

/// `x[r] + v[s]` for every row `r` of sample `s`.
pub(crate) fn add_segment(x: &CpuTensor, v: &CpuTensor, seg: Segments) -> Result<CpuTensor> {
    let (_, c, vc) = check_per_sample("add_segment", x, v, seg)?;
    if vc != c {
        return Err(Error::input(format!(
            "add_segment: vector width {vc} ({:?}) differs from input width {c} ({:?})",
            v.shape(),
            x.shape()
        )));
    }
    let xs = x.to_f32_cow();
    let vs = v.to_f32_cow();
    let (xs, vs) = (&*xs, &*vs);
    let mut out = crate::pool::take(xs.len());
    if c > 0 {
        for_row_chunks(&mut out, c, |r0, chunk| {
            for_rows_with_sample(seg, r0, chunk.len() / c, |r, s| {
                let dst = &mut chunk[(r - r0) * c..(r - r0 + 1) * c];
                let (src, add) = (&xs[r * c..(r + 1) * c], &vs[s * c..(s + 1) * c]);
                for ((o, &a), &b) in dst.iter_mut().zip(src).zip(add) {
                    *o = a + b;
                }
            });
        });
    }
    Ok(CpuTensor::from_result(out, x.shape(), x.dtype()))
}

use dcdit_core::backend::check_ada_block as check_block;

/// adaLN modulation `x * (1 + scale[s]) + shift[s]`.
pub(crate) fn modulate(
    x: &CpuTensor,
    ada: &CpuTensor,
    shift_at: usize,
    scale_at: usize,
    seg: Segments,
) -> Result<CpuTensor> {
    modulate_rows("modulate", x, ada, shift_at, scale_at, seg, None)
}

/// LayerNorm (no affine) then adaLN modulation, in one pass over the rows:
/// each row is read once and written once instead of twice each. The
/// per-element arithmetic is that of `layer_norm` followed by `modulate`
/// (same statistics, same rounding of the normalised value, no FMA), so the
/// result is bitwise the composition's for f32 tensors.
pub(crate) fn norm_modulate(
    x: &CpuTensor,
    ada: &CpuTensor,
    shift_at: usize,
    scale_at: usize,
    seg: Segments,
    eps: f32,
) -> Result<CpuTensor> {
    modulate_rows("norm_modulate", x, ada, shift_at, scale_at, seg, Some(eps))
}

fn modulate_rows(
    op: &str,
    x: &CpuTensor,
    ada: &CpuTensor,
    shift_at: usize,
    scale_at: usize,
    seg: Segments,
    norm_eps: Option<f32>,
) -> Result<CpuTensor> {
    let (_, c, vc) = check_per_sample(op, x, ada, seg)?;
    check_block(op, "shift", shift_at, c, vc)?;
    check_block(op, "scale", scale_at, c, vc)?;
    let av = ada.to_f32_cow();
    let av = &*av;
    let rows = x.numel() / c.max(1);
    let out = rows_out(rows, c, x.dtype(), |r0, chunk| {
        let mut buf = vec![0.0f32; c];
        for_rows_with_sample(seg, r0, chunk.len() / c, |r, s| {
            let dst = &mut chunk[(r - r0) * c..(r - r0 + 1) * c];
            let src = row_f32(x.storage(), r, c, &mut buf);
            let row = &av[s * vc..(s + 1) * vc];
            let shift = &row[shift_at * c..(shift_at + 1) * c];
            let scale = &row[scale_at * c..(scale_at + 1) * c];
            let (mean, inv) = match norm_eps {
                Some(eps) => crate::norm::layer_norm_stats(src, eps),
                None => (0.0, 1.0),
            };
            if norm_eps.is_some() {
                for (((o, &v), &sh), &sc) in dst.iter_mut().zip(src).zip(shift).zip(scale) {
                    let h = (v - mean) * inv;
                    *o = h * (1.0 + sc) + sh;
                }
            } else {
                for (((o, &v), &sh), &sc) in dst.iter_mut().zip(src).zip(shift).zip(scale) {
                    *o = v * (1.0 + sc) + sh;
                }
            }
        });
    });
    CpuTensor::new(out, x.shape())
}

/// Gated residual `x + gate[s] * y`.
pub(crate) fn gated_add(
    x: &CpuTensor,
    y: &CpuTensor,
    ada: &CpuTensor,
    gate_at: usize,
    seg: Segments,
) -> Result<CpuTensor> {
    if x.shape() != y.shape() {
        return Err(Error::input(format!(
            "gated_add: x {:?} and y {:?} must have equal shapes",
            x.shape(),
            y.shape()
        )));
    }
    let (_, c, vc) = check_per_sample("gated_add", x, ada, seg)?;
    check_block("gated_add", "gate", gate_at, c, vc)?;
    let av = ada.to_f32_cow();
    let av = &*av;
    let rows = x.numel() / c.max(1);
    let out = rows_out(rows, c, x.dtype(), |r0, chunk| {
        let (mut xb, mut yb) = (vec![0.0f32; c], vec![0.0f32; c]);
        for_rows_with_sample(seg, r0, chunk.len() / c, |r, s| {
            let dst = &mut chunk[(r - r0) * c..(r - r0 + 1) * c];
            let a = row_f32(x.storage(), r, c, &mut xb);
            let b = row_f32(y.storage(), r, c, &mut yb);
            let gate = &av[s * vc + gate_at * c..s * vc + (gate_at + 1) * c];
            for (((o, &p), &q), &g) in dst.iter_mut().zip(a).zip(b).zip(gate) {
                *o = p + g * q;
            }
        });
    });
    CpuTensor::new(out, x.shape())
}

/// Checks that every index is `< rows`.
fn check_indices(op: &str, idx: &[u32], rows: usize) -> Result<()> {
    if let Some((i, &v)) = idx.iter().enumerate().find(|(_, &v)| v as usize >= rows) {
        return Err(Error::input(format!(
            "{op}: index {v} at position {i} is out of range for {rows} rows"
        )));
    }
    Ok(())
}

/// `out[i] = x[idx[i]]`.
pub(crate) fn gather_rows(x: &CpuTensor, idx: &[u32]) -> Result<CpuTensor> {
    let (rows, c) = x.dims2();
    check_indices("gather_rows", idx, rows)?;
    let xs = x.to_f32_cow();
    let xs = &*xs;
    let mut out = crate::pool::take(idx.len() * c);
    if c > 0 {
        for_row_chunks(&mut out, c, |r0, chunk| {
            for (dst, &i) in chunk.chunks_exact_mut(c).zip(&idx[r0..]) {
                let i = i as usize;
                dst.copy_from_slice(&xs[i * c..(i + 1) * c]);
            }
        });
    }
    Ok(CpuTensor::from_result(out, &[idx.len(), c], x.dtype()))
}

/// `out[idx[i]] += x[i]` into `rows` zero rows.
pub(crate) fn scatter_add_rows(x: &CpuTensor, idx: &[u32], rows: usize) -> Result<CpuTensor> {
    let (n, c) = x.dims2();
    if n != idx.len() {
        return Err(Error::input(format!(
            "scatter_add_rows: {} indices for {n} input rows ({:?})",
            idx.len(),
            x.shape()
        )));
    }
    check_indices("scatter_add_rows", idx, rows)?;
    let xs = x.to_f32_cow();
    let mut out = crate::pool::take_zeroed(rows * c);
    if c > 0 {
        for (src, &i) in xs.chunks_exact(c).zip(idx) {
            let i = i as usize;
            for (o, &v) in out[i * c..(i + 1) * c].iter_mut().zip(src) {
                *o += v;
            }
        }
    }
    Ok(CpuTensor::from_result(out, &[rows, c], x.dtype()))
}
