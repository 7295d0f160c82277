//! Multi-head self-attention over a packed batch (varlen, never across
//! segments). Tasks are `(segment, head, query block)` triples run in
//! parallel; each computes `softmax(q k^T / sqrt(hd)) v` for up to
//! [`Q_BLOCK`] queries with a streaming (online) softmax over blocks of
//! [`KEY_BLOCK`] keys: per key block one gemm for the scores, the running
//! max and sum updated (earlier partial outputs rescaled by
//! `exp(m_old - m_new)`), one gemm adding `exp(S - m) V`, and the division by
//! the sum at the end. The score buffer is `Q_BLOCK x KEY_BLOCK` whatever the
//! segment length (a 64x64 grid keeps up to 4096 tokens); segments up to
//! `KEY_BLOCK` tokens (every model shape so far) take a single block. Tiny
//! segments use a direct loop instead of gemm.

use dcdit_core::backend::Segments;
use dcdit_core::{Error, Result};
use rayon::prelude::*;

use crate::math::{softmax, softmax_online};
use crate::tensor::CpuTensor;
use crate::util::{check_segments, dot, gemm_f32, Mat, SyncPtr};

/// Queries per task: bounds the score buffer at `Q_BLOCK * n` floats.
const Q_BLOCK: usize = 128;

/// Keys per block of the streaming softmax (bounds the score buffer at
/// `Q_BLOCK * KEY_BLOCK` floats).
pub(crate) const KEY_BLOCK: usize = 512;

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

/// Checks `qkv (T, 3d)` against the heads and segments; returns `(T, d)`.
pub(crate) fn check_qkv(
    op: &str,
    qkv: &CpuTensor,
    heads: usize,
    seg: Segments,
) -> Result<(usize, usize)> {
    let (t, c3) = qkv.dims2();
    check_segments(op, seg, t)?;
    if c3 % 3 != 0 {
        return Err(Error::input(format!(
            "{op}: qkv width {c3} ({:?}) is not a multiple of 3",
            qkv.shape()
        )));
    }
    let d = c3 / 3;
    if heads == 0 || d % heads != 0 {
        return Err(Error::input(format!(
            "{op}: width {d} cannot be split into {heads} heads"
        )));
    }
    Ok((t, d))
}

/// Packed multi-head attention; `qkv (T, 3d)` → `(T, d)`.
/// Takes the fused AVX-512 kernels of [`crate::attention512`] where they
/// apply, else the streaming softmax over gemm products below.
pub(crate) fn attention(qkv: &CpuTensor, heads: usize, seg: Segments) -> Result<CpuTensor> {
    #[cfg(target_arch = "x86_64")]
    {
        let (t, d) = check_qkv("attention", qkv, heads, seg)?;
        if t > 0 && d > 0 && crate::attention512::applies(d / heads, longest(seg)) {
            let xs = qkv.to_f32_cow();
            let mut out = crate::pool::take(t * d);
            crate::attention512::forward(&xs, d, heads, seg, &mut out);
            return Ok(CpuTensor::from_result(out, &[t, d], qkv.dtype()));
        }
    }
    attention_blocked(qkv, heads, seg, KEY_BLOCK)
}

/// Length of the longest segment.
pub(crate) fn longest(seg: Segments) -> usize {
    seg.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// [`attention`] with key blocks of `kb` keys (tests use small blocks).
pub(crate) fn attention_blocked(
    qkv: &CpuTensor,
    heads: usize,
    seg: Segments,
    kb: usize,
) -> Result<CpuTensor> {
    let kb = kb.max(1);
    let (t, d) = check_qkv("attention", qkv, heads, seg)?;
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
    let stride = 3 * d;
    let run = |(scores, stats): &mut (Vec<f32>, Vec<f32>), task: &Task| {
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
        scores.resize(qn * n.min(kb), 0.0);
        // SAFETY (all `out` writes below): task (segment, head, q block) owns
        // output rows r0+q0 .. r0+q0+qn, columns head*hd .. (head+1)*hd.
        if n < GEMM_MIN_LEN {
            let scores = &mut scores[..qn * n];
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
        let single = n <= kb;
        // Running max and sum of every query row.
        stats.clear();
        stats.resize(qn, f32::NEG_INFINITY);
        stats.resize(2 * qn, 0.0);
        let (m, l) = stats.split_at_mut(qn);
        let out_row = |i: usize| unsafe {
            std::slice::from_raw_parts_mut(out_ptr.get().add((r0 + q0 + i) * d + qoff), hd)
        };
        for kb0 in (0..n).step_by(kb) {
            let kn = kb.min(n - kb0);
            let sc = &mut scores[..qn * kn];
            unsafe {
                // S (qn, kn) = scale * Q (qn, hd) K_blk^T (hd, kn)
                gemm_f32(
                    qn,
                    kn,
                    hd,
                    sc.as_mut_ptr(),
                    kn as isize,
                    1,
                    false,
                    Mat {
                        ptr: xs.as_ptr().add((r0 + q0) * stride + qoff),
                        rs: stride as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: xs.as_ptr().add((r0 + kb0) * stride + koff),
                        rs: 1,
                        cs: stride as isize,
                    },
                    scale,
                    false,
                );
            }
            for (i, row) in sc.chunks_exact_mut(kn).enumerate() {
                let mut alpha = 0.0;
                softmax_online(row, &mut m[i], &mut l[i], &mut alpha);
                if single {
                    // The whole row: normalise P itself, as a plain softmax.
                    let inv = 1.0 / l[i];
                    row.iter_mut().for_each(|v| *v *= inv);
                } else if kb0 > 0 && alpha != 1.0 {
                    out_row(i).iter_mut().for_each(|o| *o *= alpha);
                }
            }
            unsafe {
                // out (qn, hd) [+]= exp(S - m) (qn, kn) V_blk (kn, hd)
                gemm_f32(
                    qn,
                    hd,
                    kn,
                    out_ptr.get().add((r0 + q0) * d + qoff),
                    d as isize,
                    1,
                    kb0 > 0,
                    Mat {
                        ptr: sc.as_ptr(),
                        rs: kn as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: xs.as_ptr().add((r0 + kb0) * stride + voff),
                        rs: stride as isize,
                        cs: 1,
                    },
                    1.0,
                    false,
                );
            }
        }
        if !single {
            for (i, &li) in l.iter().enumerate() {
                let inv = 1.0 / li;
                out_row(i).iter_mut().for_each(|o| *o *= inv);
            }
        }
    };
    let work: usize = tasks.iter().map(|t| t.qn * t.n * hd).sum();
    if tasks.len() == 1 || work < (1 << 16) {
        let mut bufs = (Vec::new(), Vec::new());
        for task in &tasks {
            run(&mut bufs, task);
        }
    } else {
        tasks
            .par_iter()
            .with_max_len(1)
            .for_each_init(|| (Vec::new(), Vec::new()), run);
    }
    Ok(CpuTensor::from_result(out, &[t, d], qkv.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad::attention_backward_blocked;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::util::test_data(n, seed)
            .into_iter()
            .map(|v| 2.0 * v)
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{i}: {x} vs {y}");
        }
    }

    /// The streaming softmax over key blocks (7, 16, 64 keys, partial last
    /// blocks, segments longer than a query block) gives the one-block
    /// results, forward and backward, within f32 rounding; a segment shorter
    /// than a block takes the one-block path bit for bit.
    #[test]
    fn key_blocks_match_one_block() {
        let (heads, hd) = (2, 8);
        let d = heads * hd;
        let seg = [0, 5, 5, 150, 183, 200];
        let t = 200;
        let qkv = CpuTensor::from_f32_vec(data(t * 3 * d, 1), &[t, 3 * d]).unwrap();
        let g = CpuTensor::from_f32_vec(data(t * d, 2), &[t, d]).unwrap();
        let whole = attention_blocked(&qkv, heads, &seg, usize::MAX).unwrap();
        let whole_b = attention_backward_blocked(&qkv, heads, &seg, &g, usize::MAX).unwrap();
        for kb in [7, 16, 64] {
            let y = attention_blocked(&qkv, heads, &seg, kb).unwrap();
            close(&y.to_f32_cow(), &whole.to_f32_cow(), 1e-5);
            let dy = attention_backward_blocked(&qkv, heads, &seg, &g, kb).unwrap();
            close(&dy.to_f32_cow(), &whole_b.to_f32_cow(), 1e-5);
        }
        let y = attention_blocked(&qkv, heads, &seg, 150).unwrap();
        let (a, b) = (y.to_f32_cow(), whole.to_f32_cow());
        // Rows 5..150 (one block of 145 <= 150 keys) are bit-identical.
        assert_eq!(a[5 * d..150 * d], b[5 * d..150 * d]);
    }
}
