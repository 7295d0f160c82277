//! Multi-head self-attention over a packed batch (varlen, never across
//! segments). Tasks are `(segment, head, query block)` triples run in
//! parallel; each computes `softmax(q k^T / sqrt(hd)) v` for up to
//! [`Q_BLOCK`] queries with two single-threaded gemms (or a direct loop for
//! tiny segments).

use dcdit_core::backend::Segments;
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::math::softmax;
use crate::tensor::CpuTensor;
use crate::util::{check_segments, dot, gemm_f32, Mat, SyncPtr};

/// Queries per task: bounds the score buffer at `Q_BLOCK * n` floats.
const Q_BLOCK: usize = 128;

/// Segments shorter than this use the direct loop instead of gemm.
const GEMM_MIN_LEN: usize = 16;

/// One attention task.
#[derive(Clone, Copy)]
struct Task {
    /// First row of the segment.
    r0: usize,
    /// Segment length.
    n: usize,
    /// Head index.
    head: usize,
    /// First query (relative to `r0`).
    q0: usize,
    /// Number of queries.
    qn: usize,
}

/// Packed multi-head attention; `qkv (T, 3d)` → `(T, d)`.
pub(crate) fn attention(qkv: &CpuTensor, heads: usize, seg: Segments) -> Result<CpuTensor> {
    let (t, c3) = qkv.dims2();
    check_segments("attention", seg, t)?;
    if c3 % 3 != 0 {
        return Err(Error::input(format!(
            "attention: qkv width {c3} ({:?}) is not a multiple of 3",
            qkv.shape()
        )));
    }
    let d = c3 / 3;
    if heads == 0 || d % heads != 0 {
        return Err(Error::input(format!(
            "attention: width {d} cannot be split into {heads} heads"
        )));
    }
    let hd = d / heads;
    let mut out = crate::pool::take_zeroed(t * d);
    if t == 0 || d == 0 {
        return Ok(CpuTensor::from_result(out, &[t, d], qkv.dtype()));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let xs = qkv.to_f32_cow();
    let xs = &*xs;

    let mut tasks = Vec::new();
    for w in seg.windows(2) {
        let (r0, n) = (w[0], w[1] - w[0]);
        for head in 0..heads {
            let mut q0 = 0;
            while q0 < n {
                let qn = Q_BLOCK.min(n - q0);
                tasks.push(Task {
                    r0,
                    n,
                    head,
                    q0,
                    qn,
                });
                q0 += qn;
            }
        }
    }
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let stride = c3;
    let run = |scores: &mut Vec<f32>, task: &Task| {
        let Task {
            r0,
            n,
            head,
            q0,
            qn,
        } = *task;
        let qoff = head * hd;
        let koff = d + head * hd;
        let voff = 2 * d + head * hd;
        // Every score is written before it is read: resize keeps the old
        // contents and fills only growth, so no memset per task.
        scores.resize(qn * n, 0.0);
        // SAFETY (all `out` writes below): task (segment, head, q block) owns
        // output rows r0+q0 .. r0+q0+qn, columns head*hd .. (head+1)*hd.
        if n < GEMM_MIN_LEN {
            let mut acc = vec![0.0f32; hd];
            for i in 0..qn {
                let qi = (r0 + q0 + i) * stride + qoff;
                let q = &xs[qi..qi + hd];
                let row = &mut scores[i * n..(i + 1) * n];
                for (j, sc) in row.iter_mut().enumerate() {
                    let kj = (r0 + j) * stride + koff;
                    *sc = dot(q, &xs[kj..kj + hd]) * scale;
                }
                softmax(row);
                acc.fill(0.0);
                for (j, &p) in row.iter().enumerate() {
                    let vj = (r0 + j) * stride + voff;
                    for (a, &v) in acc.iter_mut().zip(&xs[vj..vj + hd]) {
                        *a += p * v;
                    }
                }
                unsafe {
                    let dst = out_ptr.get().add((r0 + q0 + i) * d + qoff);
                    std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, hd);
                }
            }
            return;
        }
        unsafe {
            // scores (qn, n) = scale * Q (qn, hd) K^T (hd, n)
            gemm_f32(
                qn,
                n,
                hd,
                scores.as_mut_ptr(),
                n as isize,
                1,
                false,
                Mat {
                    ptr: xs.as_ptr().add((r0 + q0) * stride + qoff),
                    rs: stride as isize,
                    cs: 1,
                },
                Mat {
                    ptr: xs.as_ptr().add(r0 * stride + koff),
                    rs: 1,
                    cs: stride as isize,
                },
                scale,
                false,
            );
        }
        for row in scores.chunks_exact_mut(n) {
            softmax(row);
        }
        unsafe {
            // out (qn, hd) = P (qn, n) V (n, hd)
            gemm_f32(
                qn,
                hd,
                n,
                out_ptr.get().add((r0 + q0) * d + qoff),
                d as isize,
                1,
                false,
                Mat {
                    ptr: scores.as_ptr(),
                    rs: n as isize,
                    cs: 1,
                },
                Mat {
                    ptr: xs.as_ptr().add(r0 * stride + voff),
                    rs: stride as isize,
                    cs: 1,
                },
                1.0,
                false,
            );
        }
    };
    let work: usize = tasks.iter().map(|t| t.qn * t.n * hd).sum();
    if tasks.len() == 1 || work < (1 << 16) {
        let mut scores = Vec::new();
        for task in &tasks {
            run(&mut scores, task);
        }
    } else {
        tasks
            .par_iter()
            .with_max_len(1)
            .for_each_init(Vec::new, |scores, task| run(scores, task));
    }
    Ok(CpuTensor::from_result(out, &[t, d], qkv.dtype()))
}
