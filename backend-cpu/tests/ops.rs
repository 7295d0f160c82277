//! Every op of the CPU backend against a naive scalar f64 reference, with
//! quickcheck-generated sizes (1-row inputs, odd channel counts, zero-length
//! segments, grids from 1x1 to 9x13), plus a few larger fixed cases that take
//! the multi-threaded paths, reduced-precision storage and error handling.

use std::sync::OnceLock;

use dcdit_backend_cpu::{CpuBackend, CpuTensor};
use dcdit_core::backend::{Backend, Binary, DType, Grid, Unary};
use dcdit_core::Error;
use quickcheck::{QuickCheck, TestResult};

// ---------------------------------------------------------------- helpers

fn be() -> &'static CpuBackend {
    static B: OnceLock<CpuBackend> = OnceLock::new();
    B.get_or_init(|| CpuBackend::with_threads(2))
}

/// SplitMix64: deterministic test data from a quickcheck seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn t(data: &[f32], shape: &[usize]) -> CpuTensor {
    be().from_f32(data, shape).unwrap()
}

fn host(x: &CpuTensor) -> Vec<f32> {
    be().to_f32(x).unwrap()
}

/// `|got - want| <= tol * (1 + |want|)` element-wise.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} vs {}", got.len(), want.len()));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        if err.is_nan() || err > tol * (1.0 + w.abs()) {
            return Err(format!(
                "{what}: element {i}: got {g}, want {w} (err {err:e})"
            ));
        }
    }
    Ok(())
}

fn res(r: Result<(), String>) -> TestResult {
    match r {
        Ok(()) => TestResult::passed(),
        Err(e) => TestResult::error(e),
    }
}

fn qc(tests: u64) -> QuickCheck {
    QuickCheck::new().tests(tests).max_tests(tests * 10)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Random segment offsets for `n` samples (lengths 0..max_len, zero-length
/// segments are common).
fn segments(rng: &mut Rng, n: usize, max_len: usize) -> Vec<usize> {
    let mut seg = vec![0];
    for _ in 0..n {
        let len = if rng.below(4) == 0 {
            0
        } else {
            rng.below(max_len + 1)
        };
        seg.push(seg.last().unwrap() + len);
    }
    seg
}

/// LayerNorm of one row (biased variance, no affine).
fn ref_layer_norm(r: &[f64], eps: f64) -> Vec<f64> {
    let c = r.len() as f64;
    let mean = r.iter().sum::<f64>() / c;
    let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c;
    r.iter().map(|v| (v - mean) / (var + eps).sqrt()).collect()
}

fn sample_of(seg: &[usize], r: usize) -> usize {
    (0..seg.len() - 1)
        .find(|&s| seg[s] <= r && r < seg[s + 1])
        .unwrap()
}

// ------------------------------------------------------------- references

fn ref_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut s = b.map_or(0.0, |b| b[j] as f64);
            for kk in 0..k {
                s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
            }
            out[i * m + j] = s;
        }
    }
    out
}

/// Direct convolution, NHWC input, OHWI weights, stride 1, same zero padding.
#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &[f32],
    g: Grid,
    cin: usize,
    w: &[f32],
    b: Option<&[f32]>,
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
                    let mut s = b.map_or(0.0, |b| b[o] as f64);
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
                                s += x[src * cin + c] as f64 * w[wi] as f64;
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

fn ref_depthwise(x: &[f32], g: Grid, c: usize, w: &[f32]) -> Vec<f64> {
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
                            s += x[src * c + ch] as f64 * w[ch * 9 + (ky * 3 + kx) as usize] as f64;
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
fn ref_group_norm(
    x: &[f32],
    g: Grid,
    c: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Vec<f64> {
    let cg = c / groups;
    let l = g.len();
    let mut out = vec![0.0; g.rows() * c];
    for b in 0..g.batch {
        for gr in 0..groups {
            let vals: Vec<f64> = (0..l)
                .flat_map(|r| (0..cg).map(move |j| (r, gr * cg + j)))
                .map(|(r, ch)| x[(b * l + r) * c + ch] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for r in 0..l {
                for j in 0..cg {
                    let ch = gr * cg + j;
                    let i = (b * l + r) * c + ch;
                    out[i] = (x[i] as f64 - mean) / (var + eps).sqrt() * gamma[ch] as f64
                        + beta[ch] as f64;
                }
            }
        }
    }
    out
}

fn ref_attention(qkv: &[f32], seg: &[usize], heads: usize, d: usize) -> Vec<f64> {
    let hd = d / heads;
    let t = *seg.last().unwrap();
    let at = |r: usize, c: usize| qkv[r * 3 * d + c] as f64;
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
                let e: Vec<f64> = scores.iter().map(|s| s.exp()).collect();
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

/// SPEC 3 smoothing for one segment, in f64.
fn ref_smooth(h: &[f32], d: usize, p: &[f32], pos: &[u32], width: usize, sigma: f64) -> Vec<f64> {
    let m = p.len();
    let pc: Vec<f64> = p
        .iter()
        .map(|&v| (v as f64).clamp(1e-4, 1.0 - 1e-4))
        .collect();
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
            let sm: f64 = (0..m).map(|j| w[j] / z * h[j * d + c] as f64).sum();
            out[i * d + c] = pc[i] * h[i * d + c] as f64 + (1.0 - pc[i]) * sm;
        }
    }
    out
}

// ------------------------------------------------------------------ tests

#[test]
fn name_reports_threads() {
    let name = be().name();
    assert!(name.starts_with("cpu (2 threads, "), "{name}");
    assert_eq!(CpuBackend::with_threads(3).threads(), 3);
    assert!(CpuBackend::new().threads() >= 1);
}

#[test]
fn data_movement_and_reshape() {
    let b = be();
    let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    assert_eq!(b.shape(&x), vec![2, 3]);
    assert_eq!(b.dtype(&x), DType::F32);
    assert_eq!(
        CpuBackend::tensor_f32_slice(&x),
        Some(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0][..])
    );
    let y = b.reshape(&x, &[3, 2]).unwrap();
    assert_eq!(b.shape(&y), vec![3, 2]);
    assert_eq!(host(&y), host(&x));
    assert!(matches!(b.reshape(&x, &[4, 2]), Err(Error::Input(_))));
    assert!(matches!(
        b.from_f32(&[1.0; 5], &[2, 3]),
        Err(Error::Input(_))
    ));
    let e = b.from_f32(&[], &[0, 7]).unwrap();
    assert_eq!(b.shape(&e), vec![0, 7]);
    assert!(host(&e).is_empty());
}

#[test]
fn reduced_precision_round_trip() {
    let b = be();
    let mut rng = Rng(7);
    let vals = rng.vec(1000);
    let exact = [0.0f32, 1.0, -2.0, 0.5, 256.0, -0.375];
    for (dtype, rel) in [(DType::BF16, 1.0 / 256.0), (DType::F16, 1.0 / 2048.0)] {
        let x = t(&vals, &[10, 100]);
        let h = b.cast(&x, dtype).unwrap();
        assert_eq!(b.dtype(&h), dtype);
        assert_eq!(b.shape(&h), vec![10, 100]);
        assert!(
            CpuBackend::tensor_f32_slice(&h).is_none(),
            "storage must be 16-bit"
        );
        for (g, w) in host(&h).iter().zip(&vals) {
            assert!(
                (g - w).abs() <= rel * w.abs() + 1e-7,
                "{dtype:?}: {g} vs {w}"
            );
        }
        // Back to f32 keeps the rounded values exactly.
        let back = b.cast(&h, DType::F32).unwrap();
        assert_eq!(host(&back), host(&h));
        let e = b.cast(&t(&exact, &[6]), dtype).unwrap();
        assert_eq!(host(&e), exact.to_vec());
        // A reshape keeps the dtype.
        assert_eq!(b.dtype(&b.reshape(&h, &[1000]).unwrap()), dtype);
    }
}

/// bf16 input and weight (the AMX tile path where the CPU has it, the f32
/// path otherwise): against the f64 product of the same bf16 values, within
/// the output's bf16 rounding (2^-8 relative) plus f32 accumulation.
#[test]
fn linear_bf16_matches_reference() {
    fn prop(seed: u64, n: u8, k: u8, m: u8, bias: bool) -> TestResult {
        let (n, k, m) = (n as usize % 70, k as usize % 100 + 1, m as usize % 70 + 1);
        let mut rng = Rng(seed);
        let (x, w, bv) = (rng.vec(n * k), rng.vec(m * k), rng.vec(m));
        let b = be();
        let xb = b.cast(&t(&x, &[n, k]), DType::BF16).unwrap();
        let wb = b.cast(&t(&w, &[m, k]), DType::BF16).unwrap();
        let bt = bias.then(|| t(&bv, &[m]));
        let y = b.linear(&xb, &wb, bt.as_ref()).unwrap();
        if b.dtype(&y) != DType::BF16 || b.shape(&y) != vec![n, m] {
            return TestResult::error(format!("{:?} {:?}", b.dtype(&y), b.shape(&y)));
        }
        let (xr, wr) = (host(&xb), host(&wb));
        let want = ref_linear(&xr, &wr, bias.then_some(&bv[..]), n, k, m);
        // |x| |w| summed bounds the accumulation error of each output.
        let got = host(&y);
        for i in 0..n {
            for j in 0..m {
                let mag: f64 = (0..k)
                    .map(|p| (xr[i * k + p] as f64 * wr[j * k + p] as f64).abs())
                    .sum();
                let (g, w) = (got[i * m + j] as f64, want[i * m + j]);
                if (g - w).abs() > w.abs() / 256.0 + 1e-6 * (1.0 + mag) {
                    return TestResult::error(format!("({n},{k},{m}) [{i},{j}]: {g} vs {w}"));
                }
            }
        }
        TestResult::passed()
    }
    qc(60).quickcheck(prop as fn(u64, u8, u8, u8, bool) -> TestResult);
}

#[test]
fn linear_matches_reference() {
    fn prop(seed: u64, n: u8, k: u8, m: u8, bias: bool) -> TestResult {
        let (n, k, m) = (n as usize % 40, k as usize % 70 + 1, m as usize % 50 + 1);
        let mut rng = Rng(seed);
        let (x, w, bv) = (rng.vec(n * k), rng.vec(m * k), rng.vec(m));
        let bt = bias.then(|| t(&bv, &[m]));
        let y = be()
            .linear(&t(&x, &[n, k]), &t(&w, &[m, k]), bt.as_ref())
            .unwrap();
        if be().shape(&y) != vec![n, m] {
            return TestResult::error(format!("shape {:?}", be().shape(&y)));
        }
        let want = ref_linear(&x, &w, bias.then_some(&bv[..]), n, k, m);
        res(close("linear", &host(&y), &want, 1e-5))
    }
    qc(60).quickcheck(prop as fn(u64, u8, u8, u8, bool) -> TestResult);
}

#[test]
fn linear_large_parallel_and_batched_shape() {
    let (n, k, m) = (257, 300, 190);
    let mut rng = Rng(11);
    let (x, w, bv) = (rng.vec(n * k), rng.vec(m * k), rng.vec(m));
    let y = be()
        .linear(&t(&x, &[n, k]), &t(&w, &[m, k]), Some(&t(&bv, &[m])))
        .unwrap();
    close(
        "linear",
        &host(&y),
        &ref_linear(&x, &w, Some(&bv), n, k, m),
        1e-5,
    )
    .unwrap();
    // Leading dimensions are kept: (a, b, k) -> (a, b, m).
    let y3 = be()
        .linear(&t(&x[..4 * k], &[2, 2, k]), &t(&w, &[m, k]), None)
        .unwrap();
    assert_eq!(be().shape(&y3), vec![2, 2, m]);
    // Shape mismatches are errors, not panics.
    let bad = be().linear(&t(&x, &[n, k]), &t(&w[..m * (k - 1)], &[m, k - 1]), None);
    assert!(matches!(bad, Err(Error::Input(_))));
    let bad_bias = be().linear(&t(&x, &[n, k]), &t(&w, &[m, k]), Some(&t(&bv[..3], &[3])));
    assert!(matches!(bad_bias, Err(Error::Input(_))));
}

#[test]
fn conv2d_matches_direct_convolution() {
    #[allow(clippy::too_many_arguments)]
    fn prop(seed: u64, bt: u8, h: u8, w: u8, cin: u8, cout: u8, k: u8, bias: bool) -> TestResult {
        let g = Grid {
            batch: bt as usize % 3 + 1,
            height: h as usize % 9 + 1,
            width: w as usize % 13 + 1,
        };
        let (cin, cout) = (cin as usize % 9 + 1, cout as usize % 9 + 1);
        let k = [1, 3, 3, 5][k as usize % 4];
        let mut rng = Rng(seed);
        let (x, wt, bv) = (
            rng.vec(g.rows() * cin),
            rng.vec(cout * k * k * cin),
            rng.vec(cout),
        );
        let bten = bias.then(|| t(&bv, &[cout]));
        let y = be()
            .conv2d(
                &t(&x, &[g.rows(), cin]),
                g,
                &t(&wt, &[cout, k, k, cin]),
                bten.as_ref(),
                k,
            )
            .unwrap();
        let want = ref_conv(&x, g, cin, &wt, bias.then_some(&bv[..]), cout, k);
        res(close("conv2d", &host(&y), &want, 1e-5))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8, u8, u8, u8, u8, bool) -> TestResult);
}

#[test]
fn conv2d_wide_channels_and_errors() {
    let g = Grid {
        batch: 2,
        height: 9,
        width: 13,
    };
    let (cin, cout) = (48, 40);
    let mut rng = Rng(5);
    let (x, w, bv) = (
        rng.vec(g.rows() * cin),
        rng.vec(cout * 9 * cin),
        rng.vec(cout),
    );
    let y = be()
        .conv2d(
            &t(&x, &[g.rows(), cin]),
            g,
            &t(&w, &[cout, 3, 3, cin]),
            Some(&t(&bv, &[cout])),
            3,
        )
        .unwrap();
    close(
        "conv2d",
        &host(&y),
        &ref_conv(&x, g, cin, &w, Some(&bv), cout, 3),
        1e-5,
    )
    .unwrap();
    let xt = t(&x, &[g.rows(), cin]);
    let even = be().conv2d(
        &xt,
        g,
        &t(&vec![0.0; cout * 4 * cin], &[cout, 2, 2, cin]),
        None,
        2,
    );
    assert!(matches!(even, Err(Error::Input(_))));
    let wrong_cin = be().conv2d(&xt, g, &t(&w[..cout * 9 * 8], &[cout, 3, 3, 8]), None, 3);
    assert!(matches!(wrong_cin, Err(Error::Input(_))));
    let wrong_grid = be().conv2d(
        &xt,
        Grid { batch: 1, ..g },
        &t(&w, &[cout, 3, 3, cin]),
        None,
        3,
    );
    assert!(matches!(wrong_grid, Err(Error::Input(_))));
}

#[test]
fn depthwise_matches_direct_convolution() {
    fn prop(seed: u64, bt: u8, h: u8, w: u8, c: u8) -> TestResult {
        let g = Grid {
            batch: bt as usize % 3 + 1,
            height: h as usize % 9 + 1,
            width: w as usize % 13 + 1,
        };
        let c = c as usize % 11 + 1;
        let mut rng = Rng(seed);
        let (x, wt) = (rng.vec(g.rows() * c), rng.vec(c * 9));
        let y = be()
            .depthwise_conv3x3(&t(&x, &[g.rows(), c]), g, &t(&wt, &[c, 9]))
            .unwrap();
        res(close(
            "depthwise",
            &host(&y),
            &ref_depthwise(&x, g, c, &wt),
            1e-5,
        ))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8, u8, u8) -> TestResult);
    // Large enough for the parallel path.
    let g = Grid {
        batch: 3,
        height: 16,
        width: 16,
    };
    let mut rng = Rng(3);
    let (x, wt) = (rng.vec(g.rows() * 64), rng.vec(64 * 9));
    let y = be()
        .depthwise_conv3x3(&t(&x, &[g.rows(), 64]), g, &t(&wt, &[64, 9]))
        .unwrap();
    close("depthwise", &host(&y), &ref_depthwise(&x, g, 64, &wt), 1e-5).unwrap();
}

#[test]
fn group_norm_matches_reference() {
    fn prop(seed: u64, bt: u8, h: u8, w: u8, groups: u8, cg: u8, offset: bool) -> TestResult {
        let g = Grid {
            batch: bt as usize % 3 + 1,
            height: h as usize % 9 + 1,
            width: w as usize % 13 + 1,
        };
        let (groups, cg) = (groups as usize % 4 + 1, cg as usize % 5 + 1);
        let c = groups * cg;
        let mut rng = Rng(seed);
        // A large common offset checks the two-pass variance.
        let shift = if offset { 50.0 } else { 0.0 };
        let x: Vec<f32> = rng.vec(g.rows() * c).iter().map(|v| v + shift).collect();
        let (gm, bt) = (rng.vec(c), rng.vec(c));
        let y = be()
            .group_norm(
                &t(&x, &[g.rows(), c]),
                g,
                groups,
                &t(&gm, &[c]),
                &t(&bt, &[c]),
                1e-5,
            )
            .unwrap();
        let want = ref_group_norm(&x, g, c, groups, &gm, &bt, 1e-5);
        res(close("group_norm", &host(&y), &want, 2e-5))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8, u8, u8, u8, bool) -> TestResult);
}

#[test]
fn group_norm_large_parallel_and_errors() {
    let g = Grid {
        batch: 3,
        height: 16,
        width: 16,
    };
    let (c, groups) = (64, 8);
    let mut rng = Rng(9);
    let x: Vec<f32> = rng
        .vec(g.rows() * c)
        .iter()
        .map(|v| 3.0 * v + 1.0)
        .collect();
    let (gm, bt) = (rng.vec(c), rng.vec(c));
    let xt = t(&x, &[g.rows(), c]);
    let y = be()
        .group_norm(&xt, g, groups, &t(&gm, &[c]), &t(&bt, &[c]), 1e-5)
        .unwrap();
    close(
        "group_norm",
        &host(&y),
        &ref_group_norm(&x, g, c, groups, &gm, &bt, 1e-5),
        1e-5,
    )
    .unwrap();
    let bad = be().group_norm(&xt, g, 7, &t(&gm, &[c]), &t(&bt, &[c]), 1e-5);
    assert!(matches!(bad, Err(Error::Input(_))));
    let bad = be().group_norm(&xt, g, 8, &t(&gm[..8], &[8]), &t(&bt, &[c]), 1e-5);
    assert!(matches!(bad, Err(Error::Input(_))));
}

#[test]
fn row_norms_match_reference() {
    fn prop(seed: u64, rows: u8, c: u8) -> TestResult {
        let (rows, c) = (rows as usize % 20 + 1, c as usize % 70 + 1);
        let mut rng = Rng(seed);
        let mut x = rng.vec(rows * c);
        x[..c].fill(0.0); // a zero row: l2_normalize must not divide by zero
        let w = rng.vec(c);
        let xt = t(&x, &[rows, c]);
        let (mut ln, mut rms, mut l2) = (vec![], vec![], vec![]);
        for row in x.chunks(c) {
            let r = f64s(row);
            ln.extend(ref_layer_norm(&r, 1e-6));
            let ms = r.iter().map(|v| v * v).sum::<f64>() / c as f64;
            rms.extend(
                r.iter()
                    .zip(&w)
                    .map(|(v, &g)| v / (ms + 1e-5).sqrt() * g as f64),
            );
            let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            l2.extend(r.iter().map(|v| v / norm));
        }
        let b = be();
        res(close(
            "layer_norm",
            &host(&b.layer_norm(&xt, 1e-6).unwrap()),
            &ln,
            1e-5,
        )
        .and(close(
            "rms_norm",
            &host(&b.rms_norm(&xt, &t(&w, &[c]), 1e-5).unwrap()),
            &rms,
            1e-5,
        ))
        .and(close(
            "l2_normalize",
            &host(&b.l2_normalize(&xt).unwrap()),
            &l2,
            1e-5,
        )))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8) -> TestResult);
    let bad = be().rms_norm(&t(&[1.0; 6], &[2, 3]), &t(&[1.0; 2], &[2]), 1e-5);
    assert!(matches!(bad, Err(Error::Input(_))));
}

#[test]
fn elementwise_ops_match_reference() {
    fn prop(seed: u64, rows: u8, c: u8) -> TestResult {
        let (rows, c) = (rows as usize % 20 + 1, c as usize % 33 + 1);
        let mut rng = Rng(seed);
        let x: Vec<f32> = rng.vec(rows * c).iter().map(|v| 6.0 * v).collect();
        let y = rng.vec(rows * c);
        let s = rng.vec(rows);
        let (xt, yt) = (t(&x, &[rows, c]), t(&y, &[rows, c]));
        let b = be();
        let xd = f64s(&x);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let gelu = |v: f64| {
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        };
        let checks = [
            (
                "silu",
                b.unary(&xt, Unary::Silu),
                xd.iter().map(|&v| v * sig(v)).collect::<Vec<_>>(),
            ),
            (
                "gelu",
                b.unary(&xt, Unary::GeluTanh),
                xd.iter().map(|&v| gelu(v)).collect(),
            ),
            (
                "sigmoid",
                b.unary(&xt, Unary::Sigmoid),
                xd.iter().map(|&v| sig(v)).collect(),
            ),
            (
                "add",
                b.binary(&xt, &yt, Binary::Add),
                x.iter()
                    .zip(&y)
                    .map(|(a, b)| *a as f64 + *b as f64)
                    .collect(),
            ),
            (
                "sub",
                b.binary(&xt, &yt, Binary::Sub),
                x.iter()
                    .zip(&y)
                    .map(|(a, b)| *a as f64 - *b as f64)
                    .collect(),
            ),
            (
                "mul",
                b.binary(&xt, &yt, Binary::Mul),
                x.iter()
                    .zip(&y)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .collect(),
            ),
            (
                "affine",
                b.affine(&xt, 0.5, -2.0),
                xd.iter().map(|v| 0.5 * v - 2.0).collect(),
            ),
            (
                "row_sum",
                b.row_sum(&xt),
                xd.chunks(c).map(|r| r.iter().sum()).collect(),
            ),
            (
                "scale_rows",
                b.scale_rows(&xt, &t(&s, &[rows, 1])),
                (0..rows * c).map(|i| xd[i] * s[i / c] as f64).collect(),
            ),
            ("ste", b.ste(&xt), vec![1.0; rows * c]),
        ];
        for (name, got, want) in checks {
            let got = got.unwrap();
            if let Err(e) = close(name, &host(&got), &want, 1e-5) {
                return TestResult::error(e);
            }
        }
        TestResult::passed()
    }
    qc(40).quickcheck(prop as fn(u64, u8, u8) -> TestResult);
}

#[test]
fn elementwise_large_and_errors() {
    let b = be();
    let mut rng = Rng(1);
    let (rows, c) = (400, 300);
    let x = rng.vec(rows * c);
    let xt = t(&x, &[rows, c]);
    let got = host(&b.unary(&xt, Unary::Sigmoid).unwrap());
    let want: Vec<f64> = x
        .iter()
        .map(|&v| 1.0 / (1.0 + (-(v as f64)).exp()))
        .collect();
    close("sigmoid", &got, &want, 1e-6).unwrap();
    let rs = host(&b.row_sum(&xt).unwrap());
    close(
        "row_sum",
        &rs,
        &f64s(&x)
            .chunks(c)
            .map(|r| r.iter().sum())
            .collect::<Vec<_>>(),
        1e-5,
    )
    .unwrap();
    assert_eq!(b.shape(&b.row_sum(&xt).unwrap()), vec![rows, 1]);
    assert!(host(&b.ste(&xt).unwrap()).iter().all(|&v| v == 1.0));
    let other = t(&x[..rows * (c - 1)], &[rows, c - 1]);
    assert!(matches!(
        b.binary(&xt, &other, Binary::Add),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.scale_rows(&xt, &t(&[1.0; 3], &[3, 1])),
        Err(Error::Input(_))
    ));
}

#[test]
fn per_sample_broadcasts_match_reference() {
    fn prop(seed: u64, samples: u8, c: u8, n: u8) -> TestResult {
        let mut rng = Rng(seed);
        let samples = samples as usize % 5 + 1;
        let (c, n) = (c as usize % 13 + 1, n as usize % 4 + 2);
        let seg = segments(&mut rng, samples, 9);
        let rows = *seg.last().unwrap();
        let (x, y) = (rng.vec(rows * c), rng.vec(rows * c));
        let v = rng.vec(samples * c);
        let ada = rng.vec(samples * n * c);
        let (shift_at, scale_at, gate_at) = (rng.below(n), rng.below(n), rng.below(n));
        let (xt, yt) = (t(&x, &[rows, c]), t(&y, &[rows, c]));
        let adat = t(&ada, &[samples, n * c]);
        let b = be();
        let blk = |s: usize, at: usize, j: usize| ada[s * n * c + at * c + j] as f64;
        let (mut add, mut m, mut g) = (vec![], vec![], vec![]);
        for r in 0..rows {
            let s = sample_of(&seg, r);
            for j in 0..c {
                let xv = x[r * c + j] as f64;
                add.push(xv + v[s * c + j] as f64);
                m.push(xv * (1.0 + blk(s, scale_at, j)) + blk(s, shift_at, j));
                g.push(xv + blk(s, gate_at, j) * y[r * c + j] as f64);
            }
        }
        // LayerNorm then modulation, in f64.
        let ln: Vec<f64> = x
            .chunks(c)
            .flat_map(|row| ref_layer_norm(&f64s(row), 1e-6))
            .collect();
        let nm: Vec<f64> = (0..rows * c)
            .map(|i| {
                let (s, j) = (sample_of(&seg, i / c), i % c);
                ln[i] * (1.0 + blk(s, scale_at, j)) + blk(s, shift_at, j)
            })
            .collect();
        let got_add = b.add_segment(&xt, &t(&v, &[samples, c]), &seg).unwrap();
        let got_m = b.modulate(&xt, &adat, shift_at, scale_at, &seg).unwrap();
        let got_g = b.gated_add(&xt, &yt, &adat, gate_at, &seg).unwrap();
        let got_nm = b
            .norm_modulate(&xt, &adat, shift_at, scale_at, &seg, 1e-6)
            .unwrap();
        // The fused kernel does the composition's arithmetic: bitwise equal.
        let composed = b
            .modulate(
                &b.layer_norm(&xt, 1e-6).unwrap(),
                &adat,
                shift_at,
                scale_at,
                &seg,
            )
            .unwrap();
        if host(&got_nm) != host(&composed) {
            return TestResult::error("norm_modulate differs from layer_norm + modulate");
        }
        res(close("add_segment", &host(&got_add), &add, 1e-6)
            .and(close("modulate", &host(&got_m), &m, 1e-6))
            .and(close("norm_modulate", &host(&got_nm), &nm, 1e-5))
            .and(close("gated_add", &host(&got_g), &g, 1e-6)))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8, u8) -> TestResult);
}

#[test]
fn per_sample_broadcasts_large_and_errors() {
    let b = be();
    let mut rng = Rng(2);
    let seg = [0, 0, 150, 151, 400];
    let c = 128;
    let x = rng.vec(400 * c);
    let ada = rng.vec(4 * 6 * c);
    let xt = t(&x, &[400, c]);
    let adat = t(&ada, &[4, 6 * c]);
    let got = host(&b.modulate(&xt, &adat, 0, 1, &seg).unwrap());
    let want: Vec<f64> = (0..400 * c)
        .map(|i| {
            let (r, j) = (i / c, i % c);
            let s = sample_of(&seg, r);
            x[i] as f64 * (1.0 + ada[s * 6 * c + c + j] as f64) + ada[s * 6 * c + j] as f64
        })
        .collect();
    close("modulate", &got, &want, 1e-6).unwrap();
    // Bad segments, wrong sample count, block outside ada: errors.
    assert!(matches!(
        b.modulate(&xt, &adat, 0, 1, &[0, 10, 5, 400, 400]),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.modulate(&xt, &adat, 0, 1, &[0, 400]),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.modulate(&xt, &adat, 0, 6, &seg),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.norm_modulate(&xt, &adat, 0, 6, &seg, 1e-6),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.norm_modulate(&xt, &adat, 0, 1, &[0, 400], 1e-6),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.gated_add(&xt, &xt, &adat, 9, &seg),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        b.add_segment(&xt, &t(&ada[..4 * 5], &[4, 5]), &seg),
        Err(Error::Input(_))
    ));
}

#[test]
fn gather_and_scatter_match_reference() {
    fn prop(seed: u64, rows: u8, c: u8, n: u8) -> TestResult {
        let (rows, c, n) = (rows as usize % 20 + 1, c as usize % 9 + 1, n as usize % 30);
        let mut rng = Rng(seed);
        let x = rng.vec(rows * c);
        let idx: Vec<u32> = (0..n).map(|_| rng.below(rows) as u32).collect();
        let g = be().gather_rows(&t(&x, &[rows, c]), &idx).unwrap();
        let want_g: Vec<f64> = idx
            .iter()
            .flat_map(|&i| (0..c).map(move |j| (i as usize, j)))
            .map(|(i, j)| x[i * c + j] as f64)
            .collect();
        let src = rng.vec(n * c);
        let s = be()
            .scatter_add_rows(&t(&src, &[n, c]), &idx, rows)
            .unwrap();
        let mut want_s = vec![0.0f64; rows * c];
        for (k, &i) in idx.iter().enumerate() {
            for j in 0..c {
                want_s[i as usize * c + j] += src[k * c + j] as f64;
            }
        }
        if be().shape(&g) != vec![n, c] || be().shape(&s) != vec![rows, c] {
            return TestResult::error("gather/scatter shapes");
        }
        res(close("gather", &host(&g), &want_g, 0.0).and(close(
            "scatter",
            &host(&s),
            &want_s,
            1e-6,
        )))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8, u8) -> TestResult);
    let x = t(&[1.0; 6], &[3, 2]);
    assert!(matches!(
        be().gather_rows(&x, &[0, 3]),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        be().scatter_add_rows(&x, &[0, 1, 5], 4),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        be().scatter_add_rows(&x, &[0, 1], 4),
        Err(Error::Input(_))
    ));
}

#[test]
fn attention_matches_naive_softmax() {
    fn prop(seed: u64, samples: u8, heads: u8, hd: u8) -> TestResult {
        let mut rng = Rng(seed);
        let samples = samples as usize % 4 + 1;
        // Head widths of the direct and gemm paths and of the register block
        // (multiples of 16).
        let (heads, hd) = (
            heads as usize % 4 + 1,
            [1, 2, 3, 5, 8, 9, 16, 32][hd as usize % 8],
        );
        let d = heads * hd;
        // Up to 40 rows: both the direct (< 16) and the gemm path.
        let seg = segments(&mut rng, samples, 40);
        let tt = *seg.last().unwrap();
        let qkv: Vec<f32> = rng.vec(tt * 3 * d).iter().map(|v| 2.0 * v).collect();
        let y = be().attention(&t(&qkv, &[tt, 3 * d]), heads, &seg).unwrap();
        if be().shape(&y) != vec![tt, d] {
            return TestResult::error("attention shape");
        }
        res(close(
            "attention",
            &host(&y),
            &ref_attention(&qkv, &seg, heads, d),
            1e-5,
        ))
    }
    qc(50).quickcheck(prop as fn(u64, u8, u8, u8) -> TestResult);
}

#[test]
fn attention_large_segments_and_errors() {
    let mut rng = Rng(4);
    let (heads, hd) = (3, 16);
    let d = heads * hd;
    let seg = [0, 0, 300, 317, 318, 318];
    let qkv: Vec<f32> = rng.vec(318 * 3 * d).iter().map(|v| 1.5 * v).collect();
    let y = be()
        .attention(&t(&qkv, &[318, 3 * d]), heads, &seg)
        .unwrap();
    close(
        "attention",
        &host(&y),
        &ref_attention(&qkv, &seg, heads, d),
        1e-5,
    )
    .unwrap();
    // Longer than one key block of the streaming softmax (512): three blocks,
    // the last partial.
    let long = [0, 1100];
    let ql: Vec<f32> = rng.vec(1100 * 3 * d).iter().map(|v| 1.5 * v).collect();
    let y = be()
        .attention(&t(&ql, &[1100, 3 * d]), heads, &long)
        .unwrap();
    close(
        "attention (3 key blocks)",
        &host(&y),
        &ref_attention(&ql, &long, heads, d),
        1e-5,
    )
    .unwrap();
    let qt = t(&qkv, &[318, 3 * d]);
    assert!(matches!(be().attention(&qt, 5, &seg), Err(Error::Input(_))));
    assert!(matches!(
        be().attention(&qt, 3, &[0, 317]),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        be().attention(&qt, 3, &[1, 318]),
        Err(Error::Input(_))
    ));
    let empty = be()
        .attention(&t(&[], &[0, 3 * d]), heads, &[0, 0, 0])
        .unwrap();
    assert_eq!(be().shape(&empty), vec![0, d]);
}

#[test]
fn dechunk_smooth_matches_spec_formula() {
    fn prop(seed: u64, samples: u8, d: u8, width: u8, wide_sigma: bool) -> TestResult {
        let mut rng = Rng(seed);
        let samples = samples as usize % 4 + 1;
        let (d, width) = (d as usize % 7 + 1, width as usize % 13 + 1);
        let sigma = if wide_sigma { 2.0 } else { 1.0 };
        let seg = segments(&mut rng, samples, 12);
        let tt = *seg.last().unwrap();
        let h = rng.vec(tt * d);
        // Probabilities in [0, 1], including values outside the clamp range.
        let p: Vec<f32> = (0..tt)
            .map(|_| match rng.below(5) {
                0 => 0.0,
                1 => 1.0,
                _ => rng.unit() * 0.5 + 0.5,
            })
            .collect();
        // Distinct increasing raster positions per segment.
        let mut pos = Vec::with_capacity(tt);
        for w in seg.windows(2) {
            let mut at = 0u32;
            for _ in w[0]..w[1] {
                at += rng.below(4) as u32 + 1;
                pos.push(at - 1);
            }
        }
        let y = be()
            .dechunk_smooth(&t(&h, &[tt, d]), &t(&p, &[tt, 1]), &pos, width, sigma, &seg)
            .unwrap();
        let mut want = Vec::with_capacity(tt * d);
        for w in seg.windows(2) {
            let (a, b) = (w[0], w[1]);
            want.extend(ref_smooth(
                &h[a * d..b * d],
                d,
                &p[a..b],
                &pos[a..b],
                width,
                sigma as f64,
            ));
        }
        res(close("dechunk_smooth", &host(&y), &want, 1e-5))
    }
    qc(40).quickcheck(prop as fn(u64, u8, u8, u8, bool) -> TestResult);
    let bad = be().dechunk_smooth(
        &t(&[0.0; 4], &[2, 2]),
        &t(&[0.5], &[1, 1]),
        &[0, 1],
        4,
        1.0,
        &[0, 2],
    );
    assert!(matches!(bad, Err(Error::Input(_))));
}

#[test]
fn reduced_precision_ops_follow_f32() {
    let b = be();
    let (n, k, m) = (33, 64, 29);
    let mut rng = Rng(8);
    let (x, w, bv) = (rng.vec(n * k), rng.vec(m * k), rng.vec(m));
    let want = ref_linear(&x, &w, Some(&bv), n, k, m);
    for dtype in [DType::BF16, DType::F16] {
        let xh = b.cast(&t(&x, &[n, k]), dtype).unwrap();
        let wh = b.cast(&t(&w, &[m, k]), dtype).unwrap();
        let bh = b.cast(&t(&bv, &[m]), dtype).unwrap();
        let y = b.linear(&xh, &wh, Some(&bh)).unwrap();
        assert_eq!(b.dtype(&y), dtype, "output takes the first input's dtype");
        // Sums of 64 products of rounded inputs: about 1e-2 relative to the scale.
        let got = host(&y);
        let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-2 * scale,
                "{dtype:?}: {g} vs {w}"
            );
        }
        // Mixed storage: an f32 weight with a bf16 input still gives a bf16 output.
        let y2 = b.linear(&xh, &t(&w, &[m, k]), None).unwrap();
        assert_eq!(b.dtype(&y2), dtype);
        let g = b.unary(&xh, Unary::Silu).unwrap();
        assert_eq!(b.dtype(&g), dtype);
    }
}

/// `unary` on bf16 storage (converted block by block in L1) gives bitwise
/// the f32 op on the same values rounded to bf16 by `half` (nearest even),
/// serial and parallel sizes, NaN, infinities and signed zeros included.
#[test]
fn unary_bf16_is_the_f32_op_rounded() {
    let b = be();
    let mut rng = Rng(11);
    for n in [1usize, 7, 1023, 1025, (1 << 15) + 3, 3 * (1 << 15) + 1000] {
        let mut x: Vec<f32> = rng.vec(n).iter().map(|v| v * 12.0).collect();
        for (i, s) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1e-40]
            .into_iter()
            .enumerate()
        {
            if i < n {
                x[(i * 7919) % n] = s;
            }
        }
        let xb = b.cast(&t(&x, &[n]), DType::BF16).unwrap();
        let xr = host(&xb);
        for op in [Unary::Silu, Unary::GeluTanh, Unary::Sigmoid] {
            let got = b.unary(&xb, op).unwrap();
            assert_eq!(b.dtype(&got), DType::BF16);
            let want = host(&b.unary(&t(&xr, &[n]), op).unwrap());
            for (i, (g, w)) in host(&got).iter().zip(&want).enumerate() {
                let w = half::bf16::from_f32(*w).to_f32();
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{op:?} n {n} at {i} (x {}): {g} vs {w}",
                    xr[i]
                );
            }
        }
    }
}

/// The per-sample row ops on bf16 storage (read a row at a time, each
/// chunk rounded into the output) give bitwise the f32 op on the same
/// values rounded to bf16 by `half`: serial and parallel sizes, several
/// samples, a mixed bf16 / f32 pair for `gated_add`.
#[test]
fn row_ops_on_bf16_are_the_f32_ops_rounded() {
    let b = be();
    let mut rng = Rng(12);
    for (rows, c) in [(5usize, 3usize), (40, 64), (700, 96)] {
        let seg = [0, rows / 3, rows / 3, rows];
        let samples = seg.len() - 1;
        let x: Vec<f32> = rng.vec(rows * c).iter().map(|v| v * 5.0).collect();
        let y: Vec<f32> = rng.vec(rows * c).iter().map(|v| v * 3.0).collect();
        let ada = rng.vec(samples * 3 * c);
        let (xb, yb) = (
            b.cast(&t(&x, &[rows, c]), DType::BF16).unwrap(),
            b.cast(&t(&y, &[rows, c]), DType::BF16).unwrap(),
        );
        let (xr, yr) = (t(&host(&xb), &[rows, c]), t(&host(&yb), &[rows, c]));
        let at = t(&ada, &[samples, 3 * c]);
        let cases = [
            (
                "gated_add",
                b.gated_add(&xb, &yb, &at, 2, &seg),
                b.gated_add(&xr, &yr, &at, 2, &seg),
            ),
            (
                "gated_add mixed",
                b.gated_add(&xb, &yr, &at, 1, &seg),
                b.gated_add(&xr, &yr, &at, 1, &seg),
            ),
            (
                "modulate",
                b.modulate(&xb, &at, 0, 1, &seg),
                b.modulate(&xr, &at, 0, 1, &seg),
            ),
            (
                "norm_modulate",
                b.norm_modulate(&xb, &at, 2, 0, &seg, 1e-6),
                b.norm_modulate(&xr, &at, 2, 0, &seg, 1e-6),
            ),
        ];
        for (name, got, want) in cases {
            let got = got.unwrap();
            assert_eq!(b.dtype(&got), DType::BF16, "{name}");
            for (i, (g, w)) in host(&got).iter().zip(host(&want.unwrap())).enumerate() {
                let w = half::bf16::from_f32(w).to_f32();
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{name} {rows}x{c} at {i}: {g} vs {w}"
                );
            }
        }
    }
}

/// bf16 `qkv`: against the f64 attention of the same bf16 values, within
/// the bf16 output's rounding (2^-8 of the output's scale, with margin, so
/// that a kernel rounding the probabilities to bf16 would pass too),
/// segments of 1 to 300 tokens and one over several key blocks.
#[test]
fn attention_bf16_matches_reference() {
    let mut rng = Rng(9);
    for (heads, hd, seg) in [
        (3usize, 16usize, vec![0usize, 0, 300, 317, 318]),
        (12, 64, vec![0, 64, 320]),
        (2, 8, vec![0, 1100]),
    ] {
        let d = heads * hd;
        let tt = *seg.last().unwrap();
        let qkv: Vec<f32> = rng.vec(tt * 3 * d).iter().map(|v| 2.0 * v).collect();
        let qb = be().cast(&t(&qkv, &[tt, 3 * d]), DType::BF16).unwrap();
        let y = be().attention(&qb, heads, &seg).unwrap();
        assert_eq!(be().dtype(&y), DType::BF16);
        let want = ref_attention(&host(&qb), &seg, heads, d);
        let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        for (i, (g, w)) in host(&y).iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 8e-3 * scale,
                "hd {hd} at {i}: {g} vs {w} (scale {scale})"
            );
        }
    }
}
