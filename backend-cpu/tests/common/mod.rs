//! Shared test helpers: deterministic data, naive f64 forward references of
//! the backend ops (on f64 inputs, so they can be differentiated by central
//! differences), and the finite-difference harness.
#![allow(dead_code)]

use dcdit_core::backend::{Grid, Unary};

/// SplitMix64: deterministic test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Central-difference gradient of `sum(r * f(inputs))` w.r.t. `inputs[which]`
/// at the coordinates `coords` (every coordinate when `None`), step `eps`.
pub fn fd_grad(
    f: &dyn Fn(&[Vec<f64>]) -> Vec<f64>,
    inputs: &[Vec<f64>],
    r: &[f64],
    which: usize,
    coords: Option<&[usize]>,
) -> Vec<(usize, f64)> {
    const EPS: f64 = 1e-6;
    let loss = |ins: &[Vec<f64>]| -> f64 {
        let y = f(ins);
        assert_eq!(y.len(), r.len(), "fd_grad: forward output length");
        y.iter().zip(r).map(|(a, b)| a * b).sum()
    };
    let all: Vec<usize> = (0..inputs[which].len()).collect();
    let coords = coords.unwrap_or(&all);
    let mut ins = inputs.to_vec();
    coords
        .iter()
        .map(|&i| {
            let x0 = ins[which][i];
            ins[which][i] = x0 + EPS;
            let lp = loss(&ins);
            ins[which][i] = x0 - EPS;
            let lm = loss(&ins);
            ins[which][i] = x0;
            (i, (lp - lm) / (2.0 * EPS))
        })
        .collect()
}

/// Every coordinate of `got` named in `want` within `tol` times the largest
/// `|want|` (the gradient's scale).
pub fn check_grad(what: &str, got: &[f32], want: &[(usize, f64)], tol: f64) {
    let scale = want.iter().fold(0.0f64, |a, &(_, w)| a.max(w.abs()));
    let bound = tol * scale.max(1e-6);
    for &(i, w) in want {
        let g = got[i] as f64;
        let err = (g - w).abs();
        assert!(
            err <= bound,
            "{what}: element {i}: got {g:e}, want {w:e} (err {err:e}, bound {bound:e}, scale {scale:e})"
        );
    }
}

// ------------------------------------------------------------- references

/// `op(a) op(b)` in f64.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f64],
    ar: usize,
    ac: usize,
    b: &[f64],
    br: usize,
    bc: usize,
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let n = if tb { br } else { bc };
    let at = |i: usize, kk: usize| if ta { a[kk * ac + i] } else { a[i * ac + kk] };
    let bt = |kk: usize, j: usize| if tb { b[j * bc + kk] } else { b[kk * bc + j] };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|kk| at(i, kk) * bt(kk, j)).sum();
        }
    }
    out
}

/// Direct convolution, NHWC input, OHWI weights, stride 1, same zero padding.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    x: &[f64],
    g: Grid,
    cin: usize,
    w: &[f64],
    b: &[f64],
    cout: usize,
    k: usize,
) -> Vec<f64> {
    let pad = (k / 2) as isize;
    let mut out = vec![0.0; g.rows() * cout];
    for bb in 0..g.batch {
        for y in 0..g.height as isize {
            for xx in 0..g.width as isize {
                let r = bb * g.len() + (y as usize) * g.width + xx as usize;
                for o in 0..cout {
                    let mut s = b[o];
                    for ky in 0..k as isize {
                        for kx in 0..k as isize {
                            let (sy, sx) = (y + ky - pad, xx + kx - pad);
                            if sy < 0 || sx < 0 || sy >= g.height as isize || sx >= g.width as isize
                            {
                                continue;
                            }
                            let src = bb * g.len() + sy as usize * g.width + sx as usize;
                            for c in 0..cin {
                                let wi = ((o * k + ky as usize) * k + kx as usize) * cin + c;
                                s += x[src * cin + c] * w[wi];
                            }
                        }
                    }
                    out[r * cout + o] = s;
                }
            }
        }
    }
    out
}

pub fn depthwise(x: &[f64], g: Grid, c: usize, w: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; g.rows() * c];
    for bb in 0..g.batch {
        for y in 0..g.height as isize {
            for xx in 0..g.width as isize {
                let r = bb * g.len() + y as usize * g.width + xx as usize;
                for ch in 0..c {
                    let mut s = 0.0;
                    for ky in 0..3isize {
                        for kx in 0..3isize {
                            let (sy, sx) = (y + ky - 1, xx + kx - 1);
                            if sy < 0 || sx < 0 || sy >= g.height as isize || sx >= g.width as isize
                            {
                                continue;
                            }
                            let src = bb * g.len() + sy as usize * g.width + sx as usize;
                            s += x[src * c + ch] * w[ch * 9 + (ky * 3 + kx) as usize];
                        }
                    }
                    out[r * c + ch] = s;
                }
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f64],
    g: Grid,
    c: usize,
    groups: usize,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> Vec<f64> {
    let cg = c / groups;
    let l = g.len();
    let mut out = vec![0.0; g.rows() * c];
    for b in 0..g.batch {
        for gr in 0..groups {
            let vals: Vec<f64> = (0..l)
                .flat_map(|r| (0..cg).map(move |j| (r, gr * cg + j)))
                .map(|(r, ch)| x[(b * l + r) * c + ch])
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for r in 0..l {
                for j in 0..cg {
                    let ch = gr * cg + j;
                    let i = (b * l + r) * c + ch;
                    out[i] = (x[i] - mean) / (var + eps).sqrt() * gamma[ch] + beta[ch];
                }
            }
        }
    }
    out
}

/// Applies `f(row) -> row` to each `c`-wide row.
fn rows(x: &[f64], c: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    x.chunks_exact(c).flat_map(f).collect()
}

pub fn layer_norm(x: &[f64], c: usize, eps: f64) -> Vec<f64> {
    rows(x, c, |r| {
        let n = r.len() as f64;
        let mean = r.iter().sum::<f64>() / n;
        let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        r.iter().map(|v| (v - mean) / (var + eps).sqrt()).collect()
    })
}

pub fn rms_norm(x: &[f64], c: usize, w: &[f64], eps: f64) -> Vec<f64> {
    rows(x, c, |r| {
        let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
        r.iter()
            .zip(w)
            .map(|(v, g)| v / (ms + eps).sqrt() * g)
            .collect()
    })
}

pub fn l2_normalize(x: &[f64], c: usize) -> Vec<f64> {
    rows(x, c, |r| {
        let n = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        r.iter().map(|v| v / n).collect()
    })
}

pub fn unary(op: Unary, x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| match op {
            Unary::Silu => v / (1.0 + (-v).exp()),
            Unary::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Unary::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
            }
        })
        .collect()
}

pub fn sample_of(seg: &[usize], r: usize) -> usize {
    (0..seg.len() - 1)
        .find(|&s| seg[s] <= r && r < seg[s + 1])
        .unwrap()
}

/// `x (1 + scale[s]) + shift[s]`, blocks of `ada (S, vc)`.
pub fn modulate(
    x: &[f64],
    c: usize,
    ada: &[f64],
    vc: usize,
    shift_at: usize,
    scale_at: usize,
    seg: &[usize],
) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (r, j) = (i / c, i % c);
            let s = sample_of(seg, r);
            x[i] * (1.0 + ada[s * vc + scale_at * c + j]) + ada[s * vc + shift_at * c + j]
        })
        .collect()
}

/// `x + gate[s] y`.
#[allow(clippy::too_many_arguments)]
pub fn gated_add(
    x: &[f64],
    y: &[f64],
    c: usize,
    ada: &[f64],
    vc: usize,
    gate_at: usize,
    seg: &[usize],
) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (r, j) = (i / c, i % c);
            let s = sample_of(seg, r);
            x[i] + ada[s * vc + gate_at * c + j] * y[i]
        })
        .collect()
}

/// Packed multi-head attention, `qkv (T, 3d)` → `(T, d)`.
pub fn attention(qkv: &[f64], seg: &[usize], heads: usize, d: usize) -> Vec<f64> {
    let hd = d / heads;
    let t = *seg.last().unwrap();
    let at = |r: usize, c: usize| qkv[r * 3 * d + c];
    let mut out = vec![0.0; t * d];
    for w in seg.windows(2) {
        for h in 0..heads {
            for i in w[0]..w[1] {
                let scores: Vec<f64> = (w[0]..w[1])
                    .map(|j| {
                        (0..hd)
                            .map(|c| at(i, h * hd + c) * at(j, d + h * hd + c))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    out[i * d + h * hd + c] = (w[0]..w[1])
                        .zip(&e)
                        .map(|(j, ej)| ej / z * at(j, 2 * d + h * hd + c))
                        .sum();
                }
            }
        }
    }
    out
}

/// SPEC 3 smoothing of one segment, in f64.
pub fn smooth(h: &[f64], d: usize, p: &[f64], pos: &[u32], width: usize, sigma: f64) -> Vec<f64> {
    let m = p.len();
    let pc: Vec<f64> = p.iter().map(|&v| v.clamp(1e-4, 1.0 - 1e-4)).collect();
    let rc = |i: usize| {
        (
            (pos[i] as usize / width) as f64,
            (pos[i] as usize % width) as f64,
        )
    };
    let mut out = vec![0.0; m * d];
    for i in 0..m {
        let (ri, ci) = rc(i);
        let w: Vec<f64> = (0..m)
            .map(|j| {
                let (rj, cj) = rc(j);
                (-((ri - rj).powi(2) + (ci - cj).powi(2)) / (2.0 * sigma * sigma)).exp() * pc[j]
            })
            .collect();
        let z: f64 = w.iter().sum::<f64>() + 1e-8;
        for c in 0..d {
            let sm: f64 = (0..m).map(|j| w[j] / z * h[j * d + c]).sum();
            out[i * d + c] = pc[i] * h[i * d + c] + (1.0 - pc[i]) * sm;
        }
    }
    out
}
