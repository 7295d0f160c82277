//! Shared test helpers: a plain f64 host implementation of every op of the
//! `Backend` trait written with direct loops ([`RefBackend`]), the finite
//! difference oracle built on it, and an op description ([`OpKind`]) that can
//! be applied on any backend.
//!
//! `RefBackend` also implements `GradBackend`: `matmul`, `col_sum`,
//! `segment_sum`, `full` directly, and every `*_backward` as a numerical
//! vector-Jacobian product of its own f64 forward (central differences). It
//! lets the decorator's wiring be tested independently of any device
//! backend's analytic backward kernels.
#![allow(dead_code, clippy::type_complexity)]

use std::rc::Rc;

use dcdit_core::backend::{Backend, Binary, DType, Grid, Segments, Unary};
use dcdit_core::backend_grad::AdamW;
use dcdit_core::rng::Rng;
use dcdit_core::{Error, GradBackend, Result};

// ---------------------------------------------------------------------------
// The f64 host tensor and backend.

/// An f64 host tensor (dtype is a tag only).
#[derive(Clone, Debug)]
pub struct RT {
    pub shape: Vec<usize>,
    pub data: Rc<Vec<f64>>,
    pub dtype: DType,
}

impl RT {
    pub fn new(data: Vec<f64>, shape: &[usize]) -> RT {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "RT::new {shape:?}"
        );
        RT {
            shape: shape.to_vec(),
            data: Rc::new(data),
            dtype: DType::F32,
        }
    }
    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.len() {
            0 => (1, 1),
            1 => (1, self.shape[0]),
            _ => (self.shape[0], self.shape[1..].iter().product()),
        }
    }
}

/// Direct-loop f64 reference backend.
#[derive(Clone, Debug, Default)]
pub struct RefBackend;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

fn unary_f(x: f64, op: Unary) -> f64 {
    match op {
        Unary::Silu => x * sigmoid(x),
        Unary::Sigmoid => sigmoid(x),
        Unary::GeluTanh => 0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh()),
    }
}

fn seg_of_rows(seg: &[usize]) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
    seg.windows(2).enumerate().map(|(s, w)| (s, w[0]..w[1]))
}

/// The clamp of the de-chunk probabilities.
pub const P_LO: f64 = 1e-4;
pub const P_HI: f64 = 1.0 - 1e-4;

impl RefBackend {
    pub fn t(&self, data: Vec<f64>, shape: &[usize]) -> RT {
        RT::new(data, shape)
    }
}

impl Backend for RefBackend {
    type Tensor = RT;

    fn name(&self) -> String {
        "ref-f64".into()
    }
    fn shape(&self, t: &RT) -> Vec<usize> {
        t.shape.clone()
    }
    fn dtype(&self, t: &RT) -> DType {
        t.dtype
    }
    fn from_f32(&self, data: &[f32], shape: &[usize]) -> Result<RT> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::input("ref: from_f32 size"));
        }
        Ok(RT::new(data.iter().map(|&v| v as f64).collect(), shape))
    }
    fn to_f32(&self, t: &RT) -> Result<Vec<f32>> {
        Ok(t.data.iter().map(|&v| v as f32).collect())
    }
    fn cast(&self, t: &RT, dtype: DType) -> Result<RT> {
        Ok(RT { dtype, ..t.clone() })
    }
    fn reshape(&self, t: &RT, shape: &[usize]) -> Result<RT> {
        if t.data.len() != shape.iter().product::<usize>() {
            return Err(Error::input("ref: reshape size"));
        }
        Ok(RT {
            shape: shape.to_vec(),
            ..t.clone()
        })
    }

    fn linear(&self, x: &RT, w: &RT, b: Option<&RT>) -> Result<RT> {
        let (n, k) = x.rows_cols();
        let (m, k2) = w.rows_cols();
        assert_eq!(k, k2);
        let mut o = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                let mut s = b.map_or(0.0, |b| b.data[j]);
                for l in 0..k {
                    s += x.data[i * k + l] * w.data[j * k + l];
                }
                o[i * m + j] = s;
            }
        }
        Ok(RT::new(o, &[n, m]))
    }

    fn conv2d(&self, x: &RT, g: Grid, w: &RT, b: Option<&RT>, k: usize) -> Result<RT> {
        let cin = x.rows_cols().1;
        let cout = w.shape[0];
        assert_eq!(w.shape, vec![cout, k, k, cin]);
        let pad = (k / 2) as isize;
        let (hh, ww) = (g.height as isize, g.width as isize);
        let mut o = vec![0.0; g.rows() * cout];
        for bi in 0..g.batch {
            for y in 0..hh {
                for xx in 0..ww {
                    let r = bi * g.len() + (y * ww + xx) as usize;
                    for oc in 0..cout {
                        let mut s = b.map_or(0.0, |b| b.data[oc]);
                        for dy in 0..k as isize {
                            for dx in 0..k as isize {
                                let (sy, sx) = (y + dy - pad, xx + dx - pad);
                                if sy < 0 || sy >= hh || sx < 0 || sx >= ww {
                                    continue;
                                }
                                let sr = bi * g.len() + (sy * ww + sx) as usize;
                                for ic in 0..cin {
                                    s += x.data[sr * cin + ic]
                                        * w.data
                                            [((oc * k + dy as usize) * k + dx as usize) * cin + ic];
                                }
                            }
                        }
                        o[r * cout + oc] = s;
                    }
                }
            }
        }
        Ok(RT::new(o, &[g.rows(), cout]))
    }

    fn depthwise_conv3x3(&self, x: &RT, g: Grid, w: &RT) -> Result<RT> {
        let c = x.rows_cols().1;
        assert_eq!(w.data.len(), c * 9);
        let (hh, ww) = (g.height as isize, g.width as isize);
        let mut o = vec![0.0; g.rows() * c];
        for bi in 0..g.batch {
            for y in 0..hh {
                for xx in 0..ww {
                    let r = bi * g.len() + (y * ww + xx) as usize;
                    for ch in 0..c {
                        let mut s = 0.0;
                        for dy in 0..3isize {
                            for dx in 0..3isize {
                                let (sy, sx) = (y + dy - 1, xx + dx - 1);
                                if sy < 0 || sy >= hh || sx < 0 || sx >= ww {
                                    continue;
                                }
                                let sr = bi * g.len() + (sy * ww + sx) as usize;
                                s += x.data[sr * c + ch] * w.data[ch * 9 + (dy * 3 + dx) as usize];
                            }
                        }
                        o[r * c + ch] = s;
                    }
                }
            }
        }
        Ok(RT::new(o, &[g.rows(), c]))
    }

    fn group_norm(
        &self,
        x: &RT,
        g: Grid,
        groups: usize,
        gamma: &RT,
        beta: &RT,
        eps: f32,
    ) -> Result<RT> {
        let c = x.rows_cols().1;
        let cg = c / groups;
        let l = g.len();
        let mut o = vec![0.0; x.data.len()];
        for bi in 0..g.batch {
            for gi in 0..groups {
                let idx = |r: usize, j: usize| (bi * l + r) * c + gi * cg + j;
                let n = (l * cg) as f64;
                let mut mean = 0.0;
                for r in 0..l {
                    for j in 0..cg {
                        mean += x.data[idx(r, j)];
                    }
                }
                mean /= n;
                let mut var = 0.0;
                for r in 0..l {
                    for j in 0..cg {
                        var += (x.data[idx(r, j)] - mean).powi(2);
                    }
                }
                var /= n;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for r in 0..l {
                    for j in 0..cg {
                        let ch = gi * cg + j;
                        o[idx(r, j)] =
                            (x.data[idx(r, j)] - mean) * inv * gamma.data[ch] + beta.data[ch];
                    }
                }
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn layer_norm(&self, x: &RT, eps: f32) -> Result<RT> {
        let (rows, c) = x.rows_cols();
        let mut o = vec![0.0; x.data.len()];
        for r in 0..rows {
            let row = &x.data[r * c..(r + 1) * c];
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for j in 0..c {
                o[r * c + j] = (row[j] - mean) * inv;
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn rms_norm(&self, x: &RT, w: &RT, eps: f32) -> Result<RT> {
        let (rows, c) = x.rows_cols();
        let mut o = vec![0.0; x.data.len()];
        for r in 0..rows {
            let row = &x.data[r * c..(r + 1) * c];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..c {
                o[r * c + j] = row[j] * inv * w.data[j];
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn l2_normalize(&self, x: &RT) -> Result<RT> {
        let (rows, c) = x.rows_cols();
        let mut o = vec![0.0; x.data.len()];
        for r in 0..rows {
            let row = &x.data[r * c..(r + 1) * c];
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            for j in 0..c {
                o[r * c + j] = row[j] / n;
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn unary(&self, x: &RT, op: Unary) -> Result<RT> {
        Ok(RT::new(
            x.data.iter().map(|&v| unary_f(v, op)).collect(),
            &x.shape,
        ))
    }

    fn binary(&self, a: &RT, b: &RT, op: Binary) -> Result<RT> {
        assert_eq!(a.data.len(), b.data.len());
        let f = |x: f64, y: f64| match op {
            Binary::Add => x + y,
            Binary::Sub => x - y,
            Binary::Mul => x * y,
        };
        Ok(RT::new(
            a.data
                .iter()
                .zip(b.data.iter())
                .map(|(&x, &y)| f(x, y))
                .collect(),
            &a.shape,
        ))
    }

    fn affine(&self, x: &RT, a: f32, b: f32) -> Result<RT> {
        Ok(RT::new(
            x.data.iter().map(|&v| a as f64 * v + b as f64).collect(),
            &x.shape,
        ))
    }

    fn row_sum(&self, x: &RT) -> Result<RT> {
        let (rows, c) = x.rows_cols();
        Ok(RT::new(
            (0..rows)
                .map(|r| x.data[r * c..(r + 1) * c].iter().sum())
                .collect(),
            &[rows, 1],
        ))
    }

    fn scale_rows(&self, x: &RT, s: &RT) -> Result<RT> {
        let (rows, c) = x.rows_cols();
        assert_eq!(s.data.len(), rows);
        Ok(RT::new(
            (0..rows * c)
                .map(|i| x.data[i] * s.data[i / c.max(1)])
                .collect(),
            &x.shape,
        ))
    }

    fn ste(&self, x: &RT) -> Result<RT> {
        Ok(RT::new(vec![1.0; x.data.len()], &x.shape))
    }

    fn add_segment(&self, x: &RT, v: &RT, seg: Segments) -> Result<RT> {
        let c = x.rows_cols().1;
        let mut o = (*x.data).clone();
        for (s, rows) in seg_of_rows(seg) {
            for r in rows {
                for j in 0..c {
                    o[r * c + j] += v.data[s * c + j];
                }
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn modulate(
        &self,
        x: &RT,
        ada: &RT,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
    ) -> Result<RT> {
        let c = x.rows_cols().1;
        let vc = ada.rows_cols().1;
        let mut o = vec![0.0; x.data.len()];
        for (s, rows) in seg_of_rows(seg) {
            for r in rows {
                for j in 0..c {
                    let shift = ada.data[s * vc + shift_at * c + j];
                    let scale = ada.data[s * vc + scale_at * c + j];
                    o[r * c + j] = x.data[r * c + j] * (1.0 + scale) + shift;
                }
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn gated_add(&self, x: &RT, y: &RT, ada: &RT, gate_at: usize, seg: Segments) -> Result<RT> {
        let c = x.rows_cols().1;
        let vc = ada.rows_cols().1;
        let mut o = vec![0.0; x.data.len()];
        for (s, rows) in seg_of_rows(seg) {
            for r in rows {
                for j in 0..c {
                    let gate = ada.data[s * vc + gate_at * c + j];
                    o[r * c + j] = x.data[r * c + j] + gate * y.data[r * c + j];
                }
            }
        }
        Ok(RT::new(o, &x.shape))
    }

    fn gather_rows(&self, x: &RT, idx: &[u32]) -> Result<RT> {
        let c = x.rows_cols().1;
        let mut o = Vec::with_capacity(idx.len() * c);
        for &i in idx {
            o.extend_from_slice(&x.data[i as usize * c..(i as usize + 1) * c]);
        }
        Ok(RT::new(o, &[idx.len(), c]))
    }

    fn scatter_add_rows(&self, x: &RT, idx: &[u32], rows: usize) -> Result<RT> {
        let c = x.rows_cols().1;
        let mut o = vec![0.0; rows * c];
        for (k, &i) in idx.iter().enumerate() {
            for j in 0..c {
                o[i as usize * c + j] += x.data[k * c + j];
            }
        }
        Ok(RT::new(o, &[rows, c]))
    }

    fn attention(&self, qkv: &RT, heads: usize, seg: Segments) -> Result<RT> {
        let (t, c3) = qkv.rows_cols();
        let d = c3 / 3;
        let hd = d / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let at =
            |r: usize, part: usize, h: usize, j: usize| qkv.data[r * c3 + part * d + h * hd + j];
        let mut o = vec![0.0; t * d];
        for (_, rows) in seg_of_rows(seg) {
            for h in 0..heads {
                for i in rows.clone() {
                    let logits: Vec<f64> = rows
                        .clone()
                        .map(|j| {
                            (0..hd)
                                .map(|e| at(i, 0, h, e) * at(j, 1, h, e))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
                    let z: f64 = ex.iter().sum();
                    for (k, j) in rows.clone().enumerate() {
                        for e in 0..hd {
                            o[i * d + h * hd + e] += ex[k] / z * at(j, 2, h, e);
                        }
                    }
                }
            }
        }
        Ok(RT::new(o, &[t, d]))
    }

    fn dechunk_smooth(
        &self,
        h: &RT,
        p: &RT,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
    ) -> Result<RT> {
        let (t, d) = h.rows_cols();
        assert_eq!(p.data.len(), t);
        let denom = 2.0 * (sigma as f64).powi(2);
        let rc = |q: u32| ((q as usize / width) as f64, (q as usize % width) as f64);
        let c = |i: usize| p.data[i].clamp(P_LO, P_HI);
        let mut o = vec![0.0; t * d];
        for (_, rows) in seg_of_rows(seg) {
            for i in rows.clone() {
                let (yi, xi) = rc(pos[i]);
                let kern = |j: usize| {
                    let (yj, xj) = rc(pos[j]);
                    (-((yi - yj).powi(2) + (xi - xj).powi(2)) / denom).exp()
                };
                let s: f64 = rows.clone().map(|j| kern(j) * c(j)).sum::<f64>() + 1e-8;
                for e in 0..d {
                    let sm: f64 = rows
                        .clone()
                        .map(|j| kern(j) * c(j) * h.data[j * d + e])
                        .sum::<f64>()
                        / s;
                    o[i * d + e] = c(i) * h.data[i * d + e] + (1.0 - c(i)) * sm;
                }
            }
        }
        Ok(RT::new(o, &[t, d]))
    }
}

thread_local! {
    /// Called by `RefBackend`'s `*_backward` ops with the op's name and the
    /// incoming gradient (lets tests observe the tape during backward).
    pub static BACKWARD_HOOK: std::cell::RefCell<Option<Box<dyn FnMut(&str, &RT)>>> =
        std::cell::RefCell::new(None);
}

fn hook(name: &str, g: &RT) {
    BACKWARD_HOOK.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(name, g)
        }
    })
}

/// Numerical vector-Jacobian product of `f` at `xs` with cotangent `g`
/// (central differences in f64).
pub fn vjp(f: impl Fn(&[RT]) -> RT, xs: &[RT], g: &[f64]) -> Vec<RT> {
    let h = 1e-6;
    let mut out = Vec::new();
    for i in 0..xs.len() {
        let mut grad = vec![0.0; xs[i].data.len()];
        for j in 0..grad.len() {
            let eval = |delta: f64| {
                let mut ys: Vec<RT> = xs.to_vec();
                let mut v = (*ys[i].data).clone();
                v[j] += delta;
                ys[i] = RT::new(v, &xs[i].shape);
                let y = f(&ys);
                y.data.iter().zip(g).map(|(a, b)| a * b).sum::<f64>()
            };
            grad[j] = (eval(h) - eval(-h)) / (2.0 * h);
        }
        out.push(RT::new(grad, &xs[i].shape));
    }
    out
}

impl GradBackend for RefBackend {
    fn matmul(&self, a: &RT, b: &RT, ta: bool, tb: bool) -> Result<RT> {
        let (ar, ac) = a.rows_cols();
        let (br, bc) = b.rows_cols();
        let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if tb { (bc, br) } else { (br, bc) };
        assert_eq!(k, k2, "ref matmul inner dims");
        let ga = |i: usize, l: usize| {
            if ta {
                a.data[l * ac + i]
            } else {
                a.data[i * ac + l]
            }
        };
        let gb = |l: usize, j: usize| {
            if tb {
                b.data[j * bc + l]
            } else {
                b.data[l * bc + j]
            }
        };
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|l| ga(i, l) * gb(l, j)).sum();
            }
        }
        Ok(RT::new(o, &[m, n]))
    }
    fn col_sum(&self, x: &RT) -> Result<RT> {
        let (rows, c) = x.rows_cols();
        Ok(RT::new(
            (0..c)
                .map(|j| (0..rows).map(|r| x.data[r * c + j]).sum())
                .collect(),
            &[c],
        ))
    }
    fn segment_sum(&self, x: &RT, seg: Segments) -> Result<RT> {
        let c = x.rows_cols().1;
        let s = seg.len() - 1;
        let mut o = vec![0.0; s * c];
        for (si, rows) in seg_of_rows(seg) {
            for r in rows {
                for j in 0..c {
                    o[si * c + j] += x.data[r * c + j];
                }
            }
        }
        Ok(RT::new(o, &[s, c]))
    }
    fn full(&self, shape: &[usize], value: f32) -> Result<RT> {
        Ok(RT::new(vec![value as f64; shape.iter().product()], shape))
    }
    fn sum_squares(&self, x: &RT) -> Result<f64> {
        Ok(x.data.iter().map(|v| v * v).sum())
    }
    fn conv2d_backward(
        &self,
        x: &RT,
        grid: Grid,
        w: &RT,
        k: usize,
        g: &RT,
    ) -> Result<(RT, RT, RT)> {
        hook("conv2d", g);
        let b0 = RT::new(vec![0.0; w.shape[0]], &[w.shape[0]]);
        let mut v = vjp(
            |a| self.conv2d(&a[0], grid, &a[1], Some(&a[2]), k).unwrap(),
            &[x.clone(), w.clone(), b0],
            &g.data,
        );
        let db = v.pop().unwrap();
        let dw = v.pop().unwrap();
        Ok((v.pop().unwrap(), dw, db))
    }
    fn depthwise_conv3x3_backward(&self, x: &RT, grid: Grid, w: &RT, g: &RT) -> Result<(RT, RT)> {
        hook("depthwise_conv3x3", g);
        let mut v = vjp(
            |a| self.depthwise_conv3x3(&a[0], grid, &a[1]).unwrap(),
            &[x.clone(), w.clone()],
            &g.data,
        );
        let dw = v.pop().unwrap();
        Ok((v.pop().unwrap(), dw))
    }
    fn group_norm_backward(
        &self,
        x: &RT,
        grid: Grid,
        groups: usize,
        gamma: &RT,
        eps: f32,
        g: &RT,
    ) -> Result<(RT, RT, RT)> {
        hook("group_norm", g);
        let c = gamma.data.len();
        let beta = RT::new(vec![0.0; c], &[c]);
        let mut v = vjp(
            |a| {
                self.group_norm(&a[0], grid, groups, &a[1], &a[2], eps)
                    .unwrap()
            },
            &[x.clone(), gamma.clone(), beta],
            &g.data,
        );
        let db = v.pop().unwrap();
        let dg = v.pop().unwrap();
        Ok((v.pop().unwrap(), dg, db))
    }
    fn layer_norm_backward(&self, x: &RT, eps: f32, g: &RT) -> Result<RT> {
        hook("layer_norm", g);
        Ok(vjp(
            |a| self.layer_norm(&a[0], eps).unwrap(),
            std::slice::from_ref(x),
            &g.data,
        )
        .remove(0))
    }
    fn rms_norm_backward(&self, x: &RT, w: &RT, eps: f32, g: &RT) -> Result<(RT, RT)> {
        hook("rms_norm", g);
        let mut v = vjp(
            |a| self.rms_norm(&a[0], &a[1], eps).unwrap(),
            &[x.clone(), w.clone()],
            &g.data,
        );
        let dw = v.pop().unwrap();
        Ok((v.pop().unwrap(), dw))
    }
    fn l2_normalize_backward(&self, x: &RT, g: &RT) -> Result<RT> {
        hook("l2_normalize", g);
        Ok(vjp(
            |a| self.l2_normalize(&a[0]).unwrap(),
            std::slice::from_ref(x),
            &g.data,
        )
        .remove(0))
    }
    fn unary_backward(&self, x: &RT, op: Unary, g: &RT) -> Result<RT> {
        hook("unary", g);
        Ok(vjp(
            |a| self.unary(&a[0], op).unwrap(),
            std::slice::from_ref(x),
            &g.data,
        )
        .remove(0))
    }
    fn modulate_backward(
        &self,
        x: &RT,
        ada: &RT,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        g: &RT,
    ) -> Result<(RT, RT)> {
        hook("modulate", g);
        let mut v = vjp(
            |a| {
                self.modulate(&a[0], &a[1], shift_at, scale_at, seg)
                    .unwrap()
            },
            &[x.clone(), ada.clone()],
            &g.data,
        );
        let da = v.pop().unwrap();
        Ok((v.pop().unwrap(), da))
    }
    fn gated_add_backward(
        &self,
        y: &RT,
        ada: &RT,
        gate_at: usize,
        seg: Segments,
        g: &RT,
    ) -> Result<(RT, RT)> {
        hook("gated_add", g);
        let x0 = RT::new(vec![0.0; y.data.len()], &y.shape);
        let mut v = vjp(
            |a| self.gated_add(&x0, &a[0], &a[1], gate_at, seg).unwrap(),
            &[y.clone(), ada.clone()],
            &g.data,
        );
        let da = v.pop().unwrap();
        Ok((v.pop().unwrap(), da))
    }
    fn attention_backward(&self, qkv: &RT, heads: usize, seg: Segments, g: &RT) -> Result<RT> {
        hook("attention", g);
        Ok(vjp(
            |a| self.attention(&a[0], heads, seg).unwrap(),
            std::slice::from_ref(qkv),
            &g.data,
        )
        .remove(0))
    }
    fn dechunk_smooth_backward(
        &self,
        h: &RT,
        p: &RT,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
        g: &RT,
    ) -> Result<(RT, RT)> {
        hook("dechunk_smooth", g);
        let mut v = vjp(
            |a| {
                self.dechunk_smooth(&a[0], &a[1], pos, width, sigma, seg)
                    .unwrap()
            },
            &[h.clone(), p.clone()],
            &g.data,
        );
        let dp = v.pop().unwrap();
        Ok((v.pop().unwrap(), dp))
    }
    fn adamw_step(
        &self,
        param: &RT,
        grad: &RT,
        m: &RT,
        v: &RT,
        hp: AdamW,
        grad_scale: f32,
    ) -> Result<(RT, RT, RT)> {
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let n = param.data.len();
        let (mut p2, mut m2, mut v2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for i in 0..n {
            let g = grad.data[i] * grad_scale as f64;
            m2[i] = b1 * m.data[i] + (1.0 - b1) * g;
            v2[i] = b2 * v.data[i] + (1.0 - b2) * g * g;
            let mh = m2[i] / (1.0 - b1.powi(hp.step as i32));
            let vh = v2[i] / (1.0 - b2.powi(hp.step as i32));
            let p = param.data[i] * (1.0 - hp.lr as f64 * hp.weight_decay as f64);
            p2[i] = p - hp.lr as f64 * mh / (vh.sqrt() + hp.eps as f64);
        }
        Ok((
            RT::new(p2, &param.shape),
            RT::new(m2, &param.shape),
            RT::new(v2, &param.shape),
        ))
    }
    fn ema_update(&self, ema: &RT, param: &RT, decay: f32) -> Result<RT> {
        let d = decay as f64;
        Ok(RT::new(
            ema.data
                .iter()
                .zip(param.data.iter())
                .map(|(e, p)| e * d + p * (1.0 - d))
                .collect(),
            &ema.shape,
        ))
    }
}

// ---------------------------------------------------------------------------
// Ops as data, applicable on any backend.

/// One op of the `Backend` trait with its non-tensor arguments.
#[derive(Clone, Debug)]
pub enum OpKind {
    Linear {
        bias: bool,
    },
    Conv2d {
        grid: Grid,
        k: usize,
        bias: bool,
    },
    Depthwise {
        grid: Grid,
    },
    GroupNorm {
        grid: Grid,
        groups: usize,
        eps: f32,
    },
    LayerNorm {
        eps: f32,
    },
    RmsNorm {
        eps: f32,
    },
    L2Normalize,
    Unary(Unary),
    Binary(Binary),
    Affine {
        a: f32,
        b: f32,
    },
    RowSum,
    ScaleRows,
    Ste,
    AddSegment {
        seg: Vec<usize>,
    },
    Modulate {
        shift_at: usize,
        scale_at: usize,
        seg: Vec<usize>,
    },
    GatedAdd {
        gate_at: usize,
        seg: Vec<usize>,
    },
    Gather {
        idx: Vec<u32>,
    },
    ScatterAdd {
        idx: Vec<u32>,
        rows: usize,
    },
    Reshape {
        shape: Vec<usize>,
    },
    Cast {
        dtype: DType,
    },
    Attention {
        heads: usize,
        seg: Vec<usize>,
    },
    Dechunk {
        pos: Vec<u32>,
        width: usize,
        sigma: f32,
        seg: Vec<usize>,
    },
}

/// Applies `op` on backend `b` to the tensor inputs `x`.
pub fn apply<B: Backend>(b: &B, op: &OpKind, x: &[B::Tensor]) -> Result<B::Tensor> {
    match op {
        OpKind::Linear { bias } => b.linear(&x[0], &x[1], bias.then(|| &x[2])),
        OpKind::Conv2d { grid, k, bias } => b.conv2d(&x[0], *grid, &x[1], bias.then(|| &x[2]), *k),
        OpKind::Depthwise { grid } => b.depthwise_conv3x3(&x[0], *grid, &x[1]),
        OpKind::GroupNorm { grid, groups, eps } => {
            b.group_norm(&x[0], *grid, *groups, &x[1], &x[2], *eps)
        }
        OpKind::LayerNorm { eps } => b.layer_norm(&x[0], *eps),
        OpKind::RmsNorm { eps } => b.rms_norm(&x[0], &x[1], *eps),
        OpKind::L2Normalize => b.l2_normalize(&x[0]),
        OpKind::Unary(u) => b.unary(&x[0], *u),
        OpKind::Binary(o) => b.binary(&x[0], &x[1], *o),
        OpKind::Affine { a, b: c } => b.affine(&x[0], *a, *c),
        OpKind::RowSum => b.row_sum(&x[0]),
        OpKind::ScaleRows => b.scale_rows(&x[0], &x[1]),
        OpKind::Ste => b.ste(&x[0]),
        OpKind::AddSegment { seg } => b.add_segment(&x[0], &x[1], seg),
        OpKind::Modulate {
            shift_at,
            scale_at,
            seg,
        } => b.modulate(&x[0], &x[1], *shift_at, *scale_at, seg),
        OpKind::GatedAdd { gate_at, seg } => b.gated_add(&x[0], &x[1], &x[2], *gate_at, seg),
        OpKind::Gather { idx } => b.gather_rows(&x[0], idx),
        OpKind::ScatterAdd { idx, rows } => b.scatter_add_rows(&x[0], idx, *rows),
        OpKind::Reshape { shape } => b.reshape(&x[0], shape),
        OpKind::Cast { dtype } => b.cast(&x[0], *dtype),
        OpKind::Attention { heads, seg } => b.attention(&x[0], *heads, seg),
        OpKind::Dechunk {
            pos,
            width,
            sigma,
            seg,
        } => b.dechunk_smooth(&x[0], &x[1], pos, *width, *sigma, seg),
    }
}

/// The function whose derivative the autodiff must return: the op itself,
/// except the straight-through estimator, whose surrogate is the identity.
pub fn surrogate(op: &OpKind, x: &[RT]) -> RT {
    match op {
        OpKind::Ste => x[0].clone(),
        _ => apply(&RefBackend, op, x).unwrap(),
    }
}

/// Central finite differences in f64 of `sum(r * surrogate(op, x))` w.r.t.
/// every entry of every input.
pub fn fd_grads(op: &OpKind, x: &[RT], r: &[f64]) -> Vec<Vec<f64>> {
    let h = 1e-5;
    let loss = |xs: &[RT]| -> f64 {
        let y = surrogate(op, xs);
        assert_eq!(y.data.len(), r.len());
        y.data.iter().zip(r).map(|(a, b)| a * b).sum()
    };
    (0..x.len())
        .map(|i| {
            (0..x[i].data.len())
                .map(|j| {
                    let at = |d: f64| {
                        let mut xs = x.to_vec();
                        let mut v = (*xs[i].data).clone();
                        v[j] += d;
                        xs[i] = RT::new(v, &x[i].shape);
                        loss(&xs)
                    };
                    (at(h) - at(-h)) / (2.0 * h)
                })
                .collect()
        })
        .collect()
}

/// Max over entries of `|a - b| / (|b| + floor * max|b| + 1e-6)`.
pub fn rel_err(a: &[f32], b: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    let mx = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = (0.0, 0);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let e = (x as f64 - y).abs() / (y.abs() + floor * mx + 1e-6);
        if e > worst.0 {
            worst = (e, i);
        }
    }
    worst
}

/// Uniform values in `[lo, hi)`.
pub fn uniform(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| lo + (hi - lo) * rng.uniform() as f32)
        .collect()
}

/// Standard-normal values times `std`.
pub fn normal(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() as f32) * std).collect()
}

/// A test case: an op and its random inputs `(shape, values)`.
pub struct Case {
    pub name: String,
    pub op: OpKind,
    pub inputs: Vec<(Vec<usize>, Vec<f32>)>,
}

/// Packed segments used by the per-sample ops: lengths 3, 0 and 5.
pub const SEG: [usize; 4] = [0, 3, 3, 8];

/// Every op of the trait on small random inputs.
pub fn cases(seed: u64) -> Vec<Case> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::new();
    let seg = SEG.to_vec();
    let t = *SEG.last().unwrap();
    let grid = Grid {
        batch: 2,
        height: 3,
        width: 4,
    };
    let rows = grid.rows();
    let mut case = |name: &str, op: OpKind, inputs: Vec<(Vec<usize>, Vec<f32>)>| {
        v.push(Case {
            name: name.into(),
            op,
            inputs,
        })
    };
    let r = &mut rng;

    case(
        "linear",
        OpKind::Linear { bias: true },
        vec![
            (vec![5, 4], normal(r, 20, 1.0)),
            (vec![3, 4], normal(r, 12, 0.5)),
            (vec![3], normal(r, 3, 0.5)),
        ],
    );
    case(
        "linear_nobias",
        OpKind::Linear { bias: false },
        vec![
            (vec![5, 4], normal(r, 20, 1.0)),
            (vec![3, 4], normal(r, 12, 0.5)),
        ],
    );
    case(
        "conv2d_k3",
        OpKind::Conv2d {
            grid,
            k: 3,
            bias: true,
        },
        vec![
            (vec![rows, 3], normal(r, rows * 3, 1.0)),
            (vec![4, 3, 3, 3], normal(r, 108, 0.3)),
            (vec![4], normal(r, 4, 0.3)),
        ],
    );
    case(
        "conv2d_k1",
        OpKind::Conv2d {
            grid,
            k: 1,
            bias: true,
        },
        vec![
            (vec![rows, 3], normal(r, rows * 3, 1.0)),
            (vec![2, 1, 1, 3], normal(r, 6, 0.3)),
            (vec![2], normal(r, 2, 0.3)),
        ],
    );
    case(
        "conv2d_nobias",
        OpKind::Conv2d {
            grid,
            k: 3,
            bias: false,
        },
        vec![
            (vec![rows, 2], normal(r, rows * 2, 1.0)),
            (vec![3, 3, 3, 2], normal(r, 54, 0.3)),
        ],
    );
    case(
        "depthwise_conv3x3",
        OpKind::Depthwise { grid },
        vec![
            (vec![rows, 3], normal(r, rows * 3, 1.0)),
            (vec![3, 9], normal(r, 27, 0.3)),
        ],
    );
    case(
        "group_norm",
        OpKind::GroupNorm {
            grid,
            groups: 3,
            eps: 1e-5,
        },
        vec![
            (vec![rows, 6], normal(r, rows * 6, 1.0)),
            (vec![6], uniform(r, 6, 0.5, 1.5)),
            (vec![6], normal(r, 6, 0.3)),
        ],
    );
    case(
        "layer_norm",
        OpKind::LayerNorm { eps: 1e-6 },
        vec![(vec![5, 6], normal(r, 30, 1.0))],
    );
    case(
        "rms_norm",
        OpKind::RmsNorm { eps: 1e-5 },
        vec![
            (vec![5, 6], normal(r, 30, 1.0)),
            (vec![6], uniform(r, 6, 0.5, 1.5)),
        ],
    );
    case(
        "l2_normalize",
        OpKind::L2Normalize,
        vec![(vec![5, 6], normal(r, 30, 1.0))],
    );
    for u in [Unary::Silu, Unary::GeluTanh, Unary::Sigmoid] {
        case(
            &format!("unary_{u:?}"),
            OpKind::Unary(u),
            vec![(vec![4, 5], normal(r, 20, 2.0))],
        );
    }
    for o in [Binary::Add, Binary::Sub, Binary::Mul] {
        case(
            &format!("binary_{o:?}"),
            OpKind::Binary(o),
            vec![
                (vec![4, 5], normal(r, 20, 1.0)),
                (vec![4, 5], normal(r, 20, 1.0)),
            ],
        );
    }
    case(
        "affine",
        OpKind::Affine { a: -0.7, b: 0.3 },
        vec![(vec![4, 5], normal(r, 20, 1.0))],
    );
    case(
        "row_sum",
        OpKind::RowSum,
        vec![(vec![4, 5], normal(r, 20, 1.0))],
    );
    case(
        "scale_rows",
        OpKind::ScaleRows,
        vec![
            (vec![4, 5], normal(r, 20, 1.0)),
            (vec![4, 1], normal(r, 4, 1.0)),
        ],
    );
    case(
        "ste",
        OpKind::Ste,
        vec![(vec![6, 1], uniform(r, 6, 0.0, 1.0))],
    );
    case(
        "add_segment",
        OpKind::AddSegment { seg: seg.clone() },
        vec![
            (vec![t, 4], normal(r, t * 4, 1.0)),
            (vec![3, 4], normal(r, 12, 1.0)),
        ],
    );
    case(
        "modulate",
        OpKind::Modulate {
            shift_at: 1,
            scale_at: 3,
            seg: seg.clone(),
        },
        vec![
            (vec![t, 4], normal(r, t * 4, 1.0)),
            (vec![3, 16], normal(r, 48, 0.5)),
        ],
    );
    case(
        "gated_add",
        OpKind::GatedAdd {
            gate_at: 2,
            seg: seg.clone(),
        },
        vec![
            (vec![t, 4], normal(r, t * 4, 1.0)),
            (vec![t, 4], normal(r, t * 4, 1.0)),
            (vec![3, 12], normal(r, 36, 0.5)),
        ],
    );
    // Repeated and unused source rows.
    case(
        "gather_rows",
        OpKind::Gather {
            idx: vec![4, 0, 2, 2, 4, 4, 1],
        },
        vec![(vec![6, 3], normal(r, 18, 1.0))],
    );
    case(
        "scatter_add_rows",
        OpKind::ScatterAdd {
            idx: vec![3, 0, 3, 5, 1],
            rows: 7,
        },
        vec![(vec![5, 3], normal(r, 15, 1.0))],
    );
    case(
        "reshape",
        OpKind::Reshape { shape: vec![3, 8] },
        vec![(vec![6, 4], normal(r, 24, 1.0))],
    );
    case(
        "cast_f16",
        OpKind::Cast { dtype: DType::F16 },
        vec![(vec![4, 3], normal(r, 12, 1.0))],
    );
    case(
        "attention",
        OpKind::Attention {
            heads: 2,
            seg: seg.clone(),
        },
        vec![(vec![t, 12], normal(r, t * 12, 1.0))],
    );
    case(
        "attention_1head",
        OpKind::Attention {
            heads: 1,
            seg: vec![0, 1, 6, 6],
        },
        vec![(vec![6, 9], normal(r, 54, 1.0))],
    );
    // De-chunk: raster positions on a 3x4 grid per segment (kept tokens in raster order).
    let pos = vec![0, 5, 11, 1, 2, 6, 9, 10];
    case(
        "dechunk_smooth",
        OpKind::Dechunk {
            pos: pos.clone(),
            width: 4,
            sigma: 1.0,
            seg: seg.clone(),
        },
        vec![
            (vec![t, 3], normal(r, t * 3, 1.0)),
            (vec![t, 1], uniform(r, t, 0.05, 0.95)),
        ],
    );
    // Clamped probabilities (above and below the clamp): no gradient there.
    let mut p = uniform(r, t, 0.05, 0.95);
    p[0] = 1.3;
    p[4] = -0.2;
    case(
        "dechunk_smooth_clamped",
        OpKind::Dechunk {
            pos,
            width: 4,
            sigma: 0.8,
            seg,
        },
        vec![(vec![t, 3], normal(r, t * 3, 1.0)), (vec![t, 1], p)],
    );
    v
}

// ---------------------------------------------------------------------------
// The per-op gradient check, generic over the inner backend.

use dcdit_autodiff::Autodiff;

pub fn to_rt(c: &Case) -> Vec<RT> {
    c.inputs
        .iter()
        .map(|(s, d)| RT::new(d.iter().map(|&v| v as f64).collect(), s))
        .collect()
}

/// Runs one case on `Autodiff<B>` with the inputs in `tracked` as leaves and
/// the rest constants; returns the forward output and each tracked input's
/// gradient.
pub fn run<B: GradBackend>(
    inner: &B,
    c: &Case,
    r: &[f32],
    tracked: &[bool],
) -> (Vec<f32>, Vec<Option<(Vec<usize>, Vec<f32>)>>) {
    let ad = Autodiff::new(inner.clone());
    let xs: Vec<_> = c
        .inputs
        .iter()
        .zip(tracked)
        .map(|((s, d), &t)| {
            let v = inner.from_f32(d, s).unwrap();
            if t {
                ad.leaf(v)
            } else {
                ad.constant(v)
            }
        })
        .collect();
    let out = apply(&ad, &c.op, &xs).unwrap_or_else(|e| panic!("{}: forward: {e}", c.name));
    assert!(
        out.is_tracked(),
        "{}: output of tracked inputs is untracked",
        c.name
    );
    let y = ad.to_f32(&out).unwrap();
    let shape = ad.shape(&out);
    let grads = ad
        .backward(&[(&out, inner.from_f32(r, &shape).unwrap())])
        .unwrap_or_else(|e| panic!("{}: backward: {e}", c.name));
    assert_eq!(
        ad.tape_len(),
        0,
        "{}: tape not reset after backward",
        c.name
    );
    let g = xs
        .iter()
        .map(|x| {
            grads
                .get(x)
                .map(|g| (inner.shape(g), inner.to_f32(g).unwrap()))
        })
        .collect();
    (y, g)
}

pub fn check_all<B: GradBackend>(inner: &B, tol: f64, fwd_tol: f64) {
    let mut failures = Vec::new();
    for (k, c) in cases(11).iter().enumerate() {
        let xs = to_rt(c);
        let want = apply(&RefBackend, &c.op, &xs).unwrap();
        let mut rng = Rng::new(1000 + k as u64);
        let r = normal(&mut rng, want.data.len(), 1.0);
        let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
        let fd = fd_grads(&c.op, &xs, &r64);
        let n = c.inputs.len();

        // All inputs tracked.
        let (y, grads) = run(inner, c, &r, &vec![true; n]);
        let ftol = if matches!(c.op, OpKind::Cast { dtype: DType::F16 }) {
            1e-3
        } else {
            fwd_tol
        };
        let (fe, fi) = rel_err(&y, &want.data, 0.05);
        if fe > ftol {
            failures.push(format!(
                "{}: forward rel err {fe:.2e} at {fi}: {} vs {}",
                c.name, y[fi], want.data[fi]
            ));
        }
        for i in 0..n {
            let Some((shape, g)) = &grads[i] else {
                failures.push(format!("{}: input {i}: no gradient", c.name));
                continue;
            };
            if shape != &c.inputs[i].0 {
                failures.push(format!(
                    "{}: input {i}: gradient shape {shape:?}, input shape {:?}",
                    c.name, c.inputs[i].0
                ));
            }
            let (e, at) = rel_err(g, &fd[i], 0.05);
            if std::env::var("AD_REPORT").is_ok() {
                eprintln!("{:<24} input {i}: max rel err {e:.1e}", c.name);
            }
            if e > tol {
                failures.push(format!(
                    "{}: input {i}: rel err {e:.2e} at {at}: autodiff {} vs fd {}",
                    c.name, g[at], fd[i][at]
                ));
            }
        }

        // One input tracked at a time.
        for i in 0..n {
            let mut tracked = vec![false; n];
            tracked[i] = true;
            let (_, grads) = run(inner, c, &r, &tracked);
            for (j, g) in grads.iter().enumerate() {
                match (j == i, g) {
                    (true, Some((_, g))) => {
                        let (e, at) = rel_err(g, &fd[i], 0.05);
                        if e > tol {
                            failures.push(format!(
                                "{}: only input {i} tracked: rel err {e:.2e} at {at}",
                                c.name
                            ));
                        }
                    }
                    (true, None) => {
                        failures.push(format!("{}: only input {i} tracked: no gradient", c.name))
                    }
                    (false, Some(_)) => {
                        failures.push(format!("{}: constant input {j} got a gradient", c.name))
                    }
                    (false, None) => {}
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
