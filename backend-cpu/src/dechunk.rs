//! De-chunk smoothing over packed segments: each segment is handed to
//! [`dcdit_core::dechunk::smooth`], segments run in parallel.

use dcdit_core::backend::Segments;
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::tensor::CpuTensor;
use crate::util::check_segments;

/// Checks the arguments of the smoothing and its backward; returns `(T, d)`.
pub(crate) fn check_dechunk_args(
    op: &str,
    h: &CpuTensor,
    p: &CpuTensor,
    pos: &[u32],
    width: usize,
    seg: Segments,
) -> Result<(usize, usize)> {
    let (t, d) = h.dims2();
    check_segments(op, seg, t)?;
    if p.numel() != t || pos.len() != t {
        return Err(Error::input(format!(
            "{op}: h {:?} has {t} rows but p has shape {:?} and pos {} entries",
            h.shape(),
            p.shape(),
            pos.len()
        )));
    }
    if width == 0 && t > 0 {
        return Err(Error::input(format!("{op}: grid width must be positive")));
    }
    Ok((t, d))
}

/// Distance-weighted smoothing (SPEC 3) of `h (T, d)` with `p (T, 1)`.
pub(crate) fn dechunk_smooth(
    h: &CpuTensor,
    p: &CpuTensor,
    pos: &[u32],
    width: usize,
    sigma: f32,
    seg: Segments,
) -> Result<CpuTensor> {
    let (t, d) = check_dechunk_args("dechunk_smooth", h, p, pos, width, seg)?;
    let hs = h.to_f32_cow();
    let ps = p.to_f32_cow();
    let (hs, ps) = (&*hs, &*ps);
    let mut out = crate::pool::take_zeroed(t * d);
    // Disjoint output slices, one per segment.
    let mut parts: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(seg.len());
    let mut rest: &mut [f32] = &mut out;
    for w in seg.windows(2) {
        let (a, b) = (w[0], w[1]);
        let (head, tail) = rest.split_at_mut((b - a) * d);
        rest = tail;
        if b > a {
            parts.push((a, b, head));
        }
    }
    // Lengths and `width > 0` are checked above, so `smooth` cannot panic.
    let run = |(a, b, dst): &mut (usize, usize, &mut [f32])| {
        let (a, b) = (*a, *b);
        dcdit_core::dechunk::smooth(
            &hs[a * d..b * d],
            d,
            &ps[a..b],
            &pos[a..b],
            width,
            sigma,
            dst,
        );
    };
    if parts.len() <= 1 {
        parts.iter_mut().for_each(run);
    } else {
        parts.par_iter_mut().with_max_len(1).for_each(run);
    }
    Ok(CpuTensor::from_result(out, h.shape(), h.dtype()))
}
