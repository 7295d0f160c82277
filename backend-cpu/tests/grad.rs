//! Every backward op of the CPU backend against central finite differences of
//! a naive f64 forward (`common`): the gradient of `sum(r * op(inputs))` for
//! random `r`, within 1e-4 of the gradient's scale. Plus the dense helpers
//! (`matmul`, `col_sum`, `segment_sum`, ...), AdamW against a hand-computed
//! f64 step, EMA, dtypes and shape errors.

mod common;

use std::sync::OnceLock;

use common::{check_grad, f64s, fd_grad, Rng};
use dcdit_backend_cpu::{CpuBackend, CpuTensor};
use dcdit_core::backend::{Backend, DType, Grid, Unary};
use dcdit_core::backend_grad::{AdamW, GradBackend};
use dcdit_core::Error;

/// Gradient tolerance relative to the gradient's largest entry.
const TOL: f64 = 1e-4;

fn be() -> &'static CpuBackend {
    static B: OnceLock<CpuBackend> = OnceLock::new();
    B.get_or_init(|| CpuBackend::with_threads(2))
}

fn t(data: &[f32], shape: &[usize]) -> CpuTensor {
    be().from_f32(data, shape).unwrap()
}

fn host(x: &CpuTensor) -> Vec<f32> {
    be().to_f32(x).unwrap()
}

type Forward<'a> = &'a dyn Fn(&[Vec<f64>]) -> Vec<f64>;

/// Checks the backend's gradients `grads[i]` (of `inputs[i]`; `None` to
/// skip) against finite differences of `f`, at `coords[i]` (all if `None`).
fn fd_check(
    what: &str,
    f: Forward,
    inputs: &[&[f32]],
    r: &[f32],
    grads: &[Option<&CpuTensor>],
    coords: &[Option<&[usize]>],
) {
    let ins: Vec<Vec<f64>> = inputs.iter().map(|x| f64s(x)).collect();
    let r = f64s(r);
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let got = host(g);
        assert_eq!(got.len(), ins[i].len(), "{what}: gradient {i} length");
        let want = fd_grad(f, &ins, &r, i, coords.get(i).copied().flatten());
        check_grad(&format!("{what} d/input{i}"), &got, &want, TOL);
    }
}

fn is_input_err<T: std::fmt::Debug>(r: dcdit_core::Result<T>) -> bool {
    matches!(r, Err(Error::Input(_)))
}

// ------------------------------------------------------------ dense helpers

#[test]
fn matmul_all_transposes() {
    let b = be();
    let mut rng = Rng(1);
    for &(m, k, n) in &[(5, 7, 3), (1, 1, 1), (70, 130, 90), (3, 0, 4)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (av, bv) = (rng.vec(ar * ac), rng.vec(br * bc));
                let y = b
                    .matmul(&t(&av, &[ar, ac]), &t(&bv, &[br, bc]), ta, tb)
                    .unwrap();
                assert_eq!(b.shape(&y), vec![m, n]);
                let want = common::matmul(&f64s(&av), ar, ac, &f64s(&bv), br, bc, ta, tb);
                let got = host(&y);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() <= 1e-5 * (k as f64).sqrt().max(1.0));
                }
            }
        }
    }
    assert!(is_input_err(b.matmul(
        &t(&[0.0; 6], &[2, 3]),
        &t(&[0.0; 6], &[2, 3]),
        false,
        false
    )));
    assert!(b
        .matmul(&t(&[0.0; 6], &[2, 3]), &t(&[0.0; 6], &[2, 3]), false, true)
        .is_ok());
}

#[test]
fn col_sum_segment_sum_full_sum_squares() {
    let b = be();
    let mut rng = Rng(2);
    // Large enough for the parallel blocked reduction.
    let (rows, c) = (3001, 37);
    let x = rng.vec(rows * c);
    let xt = t(&x, &[rows, c]);
    let cs = host(&b.col_sum(&xt).unwrap());
    assert_eq!(b.shape(&b.col_sum(&xt).unwrap()), vec![c]);
    for j in 0..c {
        let want: f64 = (0..rows).map(|r| x[r * c + j] as f64).sum();
        assert!((cs[j] as f64 - want).abs() < 1e-4, "col {j}");
    }
    let seg = [0, 5, 5, 1500, 3000, 3001];
    let ss = b.segment_sum(&xt, &seg).unwrap();
    assert_eq!(b.shape(&ss), vec![5, c]);
    let ss = host(&ss);
    for s in 0..5 {
        for j in 0..c {
            let want: f64 = (seg[s]..seg[s + 1]).map(|r| x[r * c + j] as f64).sum();
            assert!((ss[s * c + j] as f64 - want).abs() < 1e-4);
        }
    }
    assert!(ss[c..2 * c].iter().all(|&v| v == 0.0), "empty segment");
    assert!(is_input_err(b.segment_sum(&xt, &[0, 5, 3001, 3000])));
    assert!(is_input_err(b.segment_sum(&xt, &[0, 3000])));

    let f = b.full(&[3, 4], 2.5).unwrap();
    assert_eq!(b.shape(&f), vec![3, 4]);
    assert_eq!(b.dtype(&f), DType::F32);
    assert_eq!(host(&f), vec![2.5; 12]);

    let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let got = b.sum_squares(&xt).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    assert_eq!(b.sum_squares(&t(&[], &[0, 3])).unwrap(), 0.0);
}

// ------------------------------------------------------------- convolutions

fn conv_case(seed: u64, grid: Grid, cin: usize, cout: usize, k: usize, subset: bool) {
    let b = be();
    let mut rng = Rng(seed);
    let rows = grid.rows();
    let (x, w, bias) = (
        rng.vec(rows * cin),
        rng.vec(cout * k * k * cin),
        rng.vec(cout),
    );
    let r = rng.vec(rows * cout);
    let (xt, wt, rt) = (
        t(&x, &[rows, cin]),
        t(&w, &[cout, k, k, cin]),
        t(&r, &[rows, cout]),
    );
    let (dx, dw, db) = b.conv2d_backward(&xt, grid, &wt, k, &rt).unwrap();
    assert_eq!(b.shape(&dx), vec![rows, cin]);
    assert_eq!(b.shape(&dw), vec![cout, k, k, cin]);
    assert_eq!(b.shape(&db), vec![cout]);
    // Without the input gradient: the same dw and db, bit for bit.
    let (dw1, db1) = b.conv2d_weight_backward(&xt, grid, &wt, k, &rt).unwrap();
    assert_eq!(b.shape(&dw1), b.shape(&dw));
    assert_eq!(host(&dw1), host(&dw), "conv2d_weight_backward dw");
    assert_eq!(host(&db1), host(&db), "conv2d_weight_backward db");
    let f = |ins: &[Vec<f64>]| common::conv(&ins[0], grid, cin, &ins[1], &ins[2], cout, k);
    let pick = |n: usize, rng: &mut Rng| -> Vec<usize> { (0..40).map(|_| rng.below(n)).collect() };
    let (cx, cw) = (pick(x.len(), &mut rng), pick(w.len(), &mut rng));
    let coords: [Option<&[usize]>; 3] = if subset {
        [Some(&cx), Some(&cw), None]
    } else {
        [None, None, None]
    };
    fd_check(
        &format!("conv2d k={k} {grid:?} {cin}->{cout}"),
        &f,
        &[&x, &w, &bias],
        &r,
        &[Some(&dx), Some(&dw), Some(&db)],
        &coords,
    );
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    let g = |batch, height, width| Grid {
        batch,
        height,
        width,
    };
    conv_case(10, g(2, 3, 5), 3, 4, 1, false);
    conv_case(11, g(2, 3, 5), 3, 4, 3, false);
    conv_case(12, g(1, 4, 2), 2, 3, 5, false);
    conv_case(13, g(1, 1, 1), 2, 2, 3, false);
    conv_case(14, g(3, 2, 1), 1, 1, 3, false);
    // Few input channels (the MNIST pixel embedding is 1 -> 32), several
    // images.
    conv_case(18, g(3, 6, 5), 1, 32, 3, true);
    conv_case(19, g(2, 4, 3), 3, 16, 3, false);
    conv_case(20, g(1, 5, 6), 2, 16, 5, true);
    // Wider channels and several row chunks, sampled coordinates.
    conv_case(15, g(2, 9, 7), 16, 24, 3, true);
    conv_case(16, g(2, 9, 7), 16, 24, 1, true);
    // 32+ channels: the Winograd input and weight gradients on AVX2 CPUs
    // without AVX-512 (odd grid: tiles half outside the image).
    conv_case(17, g(2, 9, 7), 32, 40, 3, true);
}

#[test]
fn conv2d_backward_errors() {
    let b = be();
    let grid = Grid {
        batch: 1,
        height: 2,
        width: 2,
    };
    let x = t(&[0.0; 12], &[4, 3]);
    let w = t(&[0.0; 2 * 9 * 3], &[2, 3, 3, 3]);
    let g = t(&[0.0; 8], &[4, 2]);
    assert!(b.conv2d_backward(&x, grid, &w, 3, &g).is_ok());
    assert!(is_input_err(b.conv2d_backward(&x, grid, &w, 1, &g)));
    assert!(is_input_err(b.conv2d_backward(&x, grid, &w, 2, &g)));
    assert!(is_input_err(b.conv2d_backward(
        &x,
        grid,
        &w,
        3,
        &t(&[0.0; 12], &[4, 3])
    )));
    let grid5 = Grid {
        batch: 1,
        height: 5,
        width: 1,
    };
    assert!(is_input_err(b.conv2d_backward(&x, grid5, &w, 3, &g)));
    assert!(b.conv2d_weight_backward(&x, grid, &w, 3, &g).is_ok());
    assert!(is_input_err(b.conv2d_weight_backward(&x, grid, &w, 2, &g)));
    assert!(is_input_err(b.conv2d_weight_backward(&x, grid5, &w, 3, &g)));
}

#[test]
fn depthwise_backward_matches_finite_differences() {
    let b = be();
    for (seed, grid, c) in [
        (
            20,
            Grid {
                batch: 2,
                height: 4,
                width: 3,
            },
            5,
        ),
        (
            21,
            Grid {
                batch: 1,
                height: 1,
                width: 6,
            },
            2,
        ),
        (
            22,
            Grid {
                batch: 1,
                height: 1,
                width: 1,
            },
            3,
        ),
    ] {
        let mut rng = Rng(seed);
        let rows = grid.rows();
        let (x, w, r) = (rng.vec(rows * c), rng.vec(c * 9), rng.vec(rows * c));
        let (dx, dw) = b
            .depthwise_conv3x3_backward(
                &t(&x, &[rows, c]),
                grid,
                &t(&w, &[c, 9]),
                &t(&r, &[rows, c]),
            )
            .unwrap();
        assert_eq!(b.shape(&dw), vec![c, 9]);
        let f = |ins: &[Vec<f64>]| common::depthwise(&ins[0], grid, c, &ins[1]);
        fd_check(
            &format!("depthwise {grid:?}"),
            &f,
            &[&x, &w],
            &r,
            &[Some(&dx), Some(&dw)],
            &[],
        );
    }
    let grid = Grid {
        batch: 1,
        height: 2,
        width: 2,
    };
    let x = t(&[0.0; 8], &[4, 2]);
    assert!(is_input_err(b.depthwise_conv3x3_backward(
        &x,
        grid,
        &t(&[0.0; 9], &[1, 9]),
        &x
    )));
    assert!(is_input_err(b.depthwise_conv3x3_backward(
        &x,
        grid,
        &t(&[0.0; 18], &[2, 9]),
        &t(&[0.0; 6], &[3, 2])
    )));
}

// ----------------------------------------------------------- normalisation

#[test]
fn group_norm_backward_matches_finite_differences() {
    let b = be();
    for (seed, grid, c, groups) in [
        (
            30,
            Grid {
                batch: 2,
                height: 3,
                width: 4,
            },
            6,
            3,
        ),
        (
            31,
            Grid {
                batch: 1,
                height: 2,
                width: 5,
            },
            6,
            1,
        ),
        (
            32,
            Grid {
                batch: 3,
                height: 2,
                width: 2,
            },
            4,
            4,
        ),
        (
            33,
            Grid {
                batch: 2,
                height: 1,
                width: 3,
            },
            8,
            2,
        ),
    ] {
        let mut rng = Rng(seed);
        let rows = grid.rows();
        // An offset mean so the centring matters.
        let x: Vec<f32> = rng.vec(rows * c).iter().map(|v| v * 2.0 + 0.5).collect();
        let (gamma, beta, r) = (rng.vec(c), rng.vec(c), rng.vec(rows * c));
        let eps = 1e-5f32;
        let (dx, dgamma, dbeta) = b
            .group_norm_backward(
                &t(&x, &[rows, c]),
                grid,
                groups,
                &t(&gamma, &[c]),
                eps,
                &t(&r, &[rows, c]),
            )
            .unwrap();
        assert_eq!(b.shape(&dgamma), vec![c]);
        let f = |ins: &[Vec<f64>]| {
            common::group_norm(&ins[0], grid, c, groups, &ins[1], &ins[2], eps as f64)
        };
        fd_check(
            &format!("group_norm {grid:?} groups {groups}"),
            &f,
            &[&x, &gamma, &beta],
            &r,
            &[Some(&dx), Some(&dgamma), Some(&dbeta)],
            &[],
        );
    }
    let grid = Grid {
        batch: 1,
        height: 2,
        width: 2,
    };
    let x = t(&[0.0; 24], &[4, 6]);
    let gm = t(&[1.0; 6], &[6]);
    assert!(b.group_norm_backward(&x, grid, 3, &gm, 1e-5, &x).is_ok());
    assert!(is_input_err(
        b.group_norm_backward(&x, grid, 4, &gm, 1e-5, &x)
    ));
    assert!(is_input_err(b.group_norm_backward(
        &x,
        grid,
        3,
        &t(&[1.0; 3], &[3]),
        1e-5,
        &x
    )));
    assert!(is_input_err(b.group_norm_backward(
        &x,
        grid,
        3,
        &gm,
        1e-5,
        &t(&[0.0; 20], &[4, 5])
    )));
}

#[test]
fn group_norm_backward_large_parallel() {
    // Enough rows for the parallel reductions; sampled coordinates.
    let b = be();
    let grid = Grid {
        batch: 2,
        height: 16,
        width: 12,
    };
    let (c, groups) = (64, 8);
    let rows = grid.rows();
    let mut rng = Rng(34);
    let (x, gamma, beta, r) = (rng.vec(rows * c), rng.vec(c), rng.vec(c), rng.vec(rows * c));
    let (dx, dgamma, dbeta) = b
        .group_norm_backward(
            &t(&x, &[rows, c]),
            grid,
            groups,
            &t(&gamma, &[c]),
            1e-6,
            &t(&r, &[rows, c]),
        )
        .unwrap();
    let f = |ins: &[Vec<f64>]| common::group_norm(&ins[0], grid, c, groups, &ins[1], &ins[2], 1e-6);
    let cx: Vec<usize> = (0..25).map(|_| rng.below(rows * c)).collect();
    let cg: Vec<usize> = (0..8).map(|_| rng.below(c)).collect();
    fd_check(
        "group_norm large",
        &f,
        &[&x, &gamma, &beta],
        &r,
        &[Some(&dx), Some(&dgamma), Some(&dbeta)],
        &[Some(&cx), Some(&cg), Some(&cg)],
    );
}

#[test]
fn row_norm_backwards_match_finite_differences() {
    let b = be();
    let mut rng = Rng(40);
    for (rows, c) in [(4, 7), (1, 3), (3, 33)] {
        let x: Vec<f32> = rng.vec(rows * c).iter().map(|v| v * 3.0 + 0.2).collect();
        let (w, r) = (rng.vec(c), rng.vec(rows * c));
        let (xt, rt) = (t(&x, &[rows, c]), t(&r, &[rows, c]));
        let eps = 1e-5f32;

        let dx = b.layer_norm_backward(&xt, eps, &rt).unwrap();
        let f = |ins: &[Vec<f64>]| common::layer_norm(&ins[0], c, eps as f64);
        if c > 1 {
            fd_check("layer_norm", &f, &[&x], &r, &[Some(&dx)], &[]);
        }

        let (dx, dw) = b.rms_norm_backward(&xt, &t(&w, &[c]), eps, &rt).unwrap();
        let f = |ins: &[Vec<f64>]| common::rms_norm(&ins[0], c, &ins[1], eps as f64);
        fd_check("rms_norm", &f, &[&x, &w], &r, &[Some(&dx), Some(&dw)], &[]);

        let dx = b.l2_normalize_backward(&xt, &rt).unwrap();
        let f = |ins: &[Vec<f64>]| common::l2_normalize(&ins[0], c);
        fd_check("l2_normalize", &f, &[&x], &r, &[Some(&dx)], &[]);
    }
    // A row below the clamp: the map is x / 1e-12, gradient g / 1e-12.
    let x = [0.0f32, 3e-13, -2e-13, 1.0, 2.0, 2.0];
    let g = [1.0f32, -2.0, 0.5, 1.0, 0.0, 0.0];
    let dx = host(
        &b.l2_normalize_backward(&t(&x, &[2, 3]), &t(&g, &[2, 3]))
            .unwrap(),
    );
    for i in 0..3 {
        assert!((dx[i] as f64 - g[i] as f64 * 1e12).abs() <= 1e-6 * 1e12 * g[i].abs() as f64);
    }
    // Second row: ||x|| = 3, dx = (g - y (y.g)) / 3 with y = x / 3.
    let want = [
        (1.0 - 1.0 / 3.0 * (1.0 / 3.0)) / 3.0,
        (0.0 - 2.0 / 3.0 * (1.0 / 3.0)) / 3.0,
        (0.0 - 2.0 / 3.0 * (1.0 / 3.0)) / 3.0,
    ];
    for i in 0..3 {
        assert!((dx[3 + i] as f64 - want[i]).abs() < 1e-6);
    }
    let xt = t(&[1.0; 6], &[2, 3]);
    let bad = t(&[1.0; 6], &[3, 2]);
    assert!(is_input_err(b.layer_norm_backward(&xt, 1e-5, &bad)));
    assert!(is_input_err(b.rms_norm_backward(
        &xt,
        &t(&[1.0; 2], &[2]),
        1e-5,
        &xt
    )));
    assert!(is_input_err(b.l2_normalize_backward(&xt, &bad)));
}

// ------------------------------------------------------------ element-wise

#[test]
fn unary_backward_matches_finite_differences() {
    let b = be();
    let mut rng = Rng(50);
    let mut x: Vec<f32> = rng.vec(200).iter().map(|v| v * 6.0).collect();
    x.extend([0.0, 12.0, -12.0, 30.0, -30.0]);
    let r = rng.vec(x.len());
    for op in [Unary::Silu, Unary::GeluTanh, Unary::Sigmoid] {
        let dx = b
            .unary_backward(&t(&x, &[x.len()]), op, &t(&r, &[x.len()]))
            .unwrap();
        let f = |ins: &[Vec<f64>]| common::unary(op, &ins[0]);
        fd_check(&format!("{op:?}"), &f, &[&x], &r, &[Some(&dx)], &[]);
    }
    // Large parallel input, checked against the closed form at a few points.
    let n = 100_003;
    let xl: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 20.0).collect();
    let gl = vec![1.0f32; n];
    let d = host(
        &b.unary_backward(&t(&xl, &[n]), Unary::Silu, &t(&gl, &[n]))
            .unwrap(),
    );
    for i in (0..n).step_by(997) {
        let v = xl[i] as f64;
        let s = 1.0 / (1.0 + (-v).exp());
        let want = s * (1.0 + v * (1.0 - s));
        assert!((d[i] as f64 - want).abs() < 1e-6, "silu' at {v}");
    }
    assert!(is_input_err(b.unary_backward(
        &t(&[0.0; 4], &[4]),
        Unary::Silu,
        &t(&[0.0; 4], &[2, 2])
    )));
}

#[test]
fn modulate_and_gated_add_backward_match_finite_differences() {
    let b = be();
    let mut rng = Rng(60);
    let (c, nblk) = (4, 3);
    let vc = c * nblk;
    for seg in [vec![0, 3, 3, 7], vec![0, 0, 5], vec![0, 1]] {
        let rows = *seg.last().unwrap();
        let samples = seg.len() - 1;
        let (x, y, ada, r) = (
            rng.vec(rows * c),
            rng.vec(rows * c),
            rng.vec(samples * vc),
            rng.vec(rows * c),
        );
        let (xt, yt, at, rt) = (
            t(&x, &[rows, c]),
            t(&y, &[rows, c]),
            t(&ada, &[samples, vc]),
            t(&r, &[rows, c]),
        );
        let (shift_at, scale_at) = (2, 0);
        let (dx, dada) = b
            .modulate_backward(&xt, &at, shift_at, scale_at, &seg, &rt)
            .unwrap();
        assert_eq!(b.shape(&dada), vec![samples, vc]);
        let f =
            |ins: &[Vec<f64>]| common::modulate(&ins[0], c, &ins[1], vc, shift_at, scale_at, &seg);
        fd_check(
            "modulate",
            &f,
            &[&x, &ada],
            &r,
            &[Some(&dx), Some(&dada)],
            &[],
        );
        // dada is exactly zero outside the shift and scale blocks.
        let da = host(&dada);
        for s in 0..samples {
            assert!(da[s * vc + c..s * vc + 2 * c].iter().all(|&v| v == 0.0));
        }

        let gate_at = 1;
        let (dy, dada) = b.gated_add_backward(&yt, &at, gate_at, &seg, &rt).unwrap();
        let x64 = f64s(&x);
        let f = |ins: &[Vec<f64>]| common::gated_add(&x64, &ins[0], c, &ins[1], vc, gate_at, &seg);
        fd_check(
            "gated_add",
            &f,
            &[&y, &ada],
            &r,
            &[Some(&dy), Some(&dada)],
            &[],
        );
    }
    let xt = t(&[0.0; 8], &[2, 4]);
    let at = t(&[0.0; 12], &[1, 12]);
    assert!(is_input_err(b.modulate_backward(
        &xt,
        &at,
        0,
        3,
        &[0, 2],
        &xt
    )));
    assert!(is_input_err(b.modulate_backward(
        &xt,
        &at,
        0,
        1,
        &[0, 1, 2],
        &xt
    )));
    assert!(is_input_err(b.modulate_backward(
        &xt,
        &at,
        0,
        1,
        &[0, 2],
        &t(&[0.0; 8], &[4, 2])
    )));
    assert!(is_input_err(b.gated_add_backward(
        &xt,
        &at,
        3,
        &[0, 2],
        &xt
    )));
    assert!(is_input_err(b.gated_add_backward(
        &xt,
        &at,
        0,
        &[0, 3],
        &xt
    )));
}

#[test]
fn per_sample_backward_large_parallel() {
    // Many rows: the parallel row loops and blocked segment reductions.
    let b = be();
    let mut rng = Rng(61);
    let c = 48;
    let seg = [0, 1000, 1000, 2500, 2501];
    let rows = 2501;
    let (x, ada, g) = (rng.vec(rows * c), rng.vec(4 * 2 * c), rng.vec(rows * c));
    let (dx, dada) = b
        .modulate_backward(
            &t(&x, &[rows, c]),
            &t(&ada, &[4, 2 * c]),
            1,
            0,
            &seg,
            &t(&g, &[rows, c]),
        )
        .unwrap();
    let (dx, dada) = (host(&dx), host(&dada));
    for i in (0..rows * c).step_by(101) {
        let s = common::sample_of(&seg, i / c);
        let want = g[i] as f64 * (1.0 + ada[s * 2 * c + i % c] as f64);
        assert!((dx[i] as f64 - want).abs() < 1e-6);
    }
    for s in 0..4 {
        for j in 0..c {
            let sh: f64 = (seg[s]..seg[s + 1]).map(|r| g[r * c + j] as f64).sum();
            let sc: f64 = (seg[s]..seg[s + 1])
                .map(|r| g[r * c + j] as f64 * x[r * c + j] as f64)
                .sum();
            assert!((dada[s * 2 * c + c + j] as f64 - sh).abs() < 1e-4);
            assert!((dada[s * 2 * c + j] as f64 - sc).abs() < 1e-4);
        }
    }
}

// ---------------------------------------------------------------- attention

fn attention_case(seed: u64, seg: &[usize], heads: usize, hd: usize, subset: Option<usize>) {
    let b = be();
    let mut rng = Rng(seed);
    let d = heads * hd;
    let rows = *seg.last().unwrap();
    // Spread-out scores so the softmax is far from uniform.
    let qkv: Vec<f32> = rng.vec(rows * 3 * d).iter().map(|v| v * 1.5).collect();
    let r = rng.vec(rows * d);
    let dqkv = b
        .attention_backward(&t(&qkv, &[rows, 3 * d]), heads, seg, &t(&r, &[rows, d]))
        .unwrap();
    assert_eq!(b.shape(&dqkv), vec![rows, 3 * d]);
    let f = |ins: &[Vec<f64>]| common::attention(&ins[0], seg, heads, d);
    let coords: Option<Vec<usize>> = subset.map(|n| (0..n).map(|_| rng.below(qkv.len())).collect());
    fd_check(
        &format!("attention seg {seg:?} heads {heads} hd {hd}"),
        &f,
        &[&qkv],
        &r,
        &[Some(&dqkv)],
        &[coords.as_deref()],
    );
}

#[test]
fn attention_backward_matches_finite_differences() {
    attention_case(70, &[0, 5, 5, 25, 26], 1, 4, None);
    attention_case(71, &[0, 3, 20, 20], 2, 3, None);
    attention_case(72, &[0, 1, 7, 40], 3, 2, None);
    attention_case(73, &[0, 12], 3, 8, None);
    // Over one query block (128), with the gemm paths; sampled coordinates.
    attention_case(74, &[0, 150, 170], 2, 16, Some(60));
    // A single task (parallel gemm inside).
    attention_case(75, &[0, 140], 1, 32, Some(40));
    // Longer than one key block (512): the three-sweep streaming backward.
    attention_case(76, &[0, 700], 1, 8, Some(30));
}

#[test]
fn attention_backward_errors() {
    let b = be();
    let qkv = t(&[0.0; 24], &[2, 12]);
    let g = t(&[0.0; 8], &[2, 4]);
    assert!(b.attention_backward(&qkv, 2, &[0, 2], &g).is_ok());
    assert!(is_input_err(b.attention_backward(&qkv, 3, &[0, 2], &g)));
    assert!(is_input_err(b.attention_backward(&qkv, 0, &[0, 2], &g)));
    assert!(is_input_err(b.attention_backward(&qkv, 2, &[0, 1], &g)));
    assert!(is_input_err(b.attention_backward(
        &qkv,
        2,
        &[0, 2],
        &t(&[0.0; 6], &[2, 3])
    )));
    assert!(is_input_err(b.attention_backward(
        &t(&[0.0; 20], &[2, 10]),
        2,
        &[0, 2],
        &g
    )));
}

// ----------------------------------------------------------------- dechunk

#[test]
fn dechunk_smooth_backward_matches_finite_differences() {
    let b = be();
    for (seed, seg, d, width, sigma) in [
        (80u64, vec![0usize, 4, 4, 11], 3usize, 5usize, 1.0f32),
        (81, vec![0, 1, 6], 2, 3, 2.0),
        (82, vec![0, 9, 15], 4, 7, 0.7),
    ] {
        let mut rng = Rng(seed);
        let tt = *seg.last().unwrap();
        let h = rng.vec(tt * d);
        // Mostly interior probabilities, some on the clamped ends.
        let p: Vec<f32> = (0..tt)
            .map(|i| match i % 5 {
                3 => 0.0,
                4 => 1.0,
                _ => rng.unit() * 0.45 + 0.5,
            })
            .collect();
        let mut pos = Vec::with_capacity(tt);
        for w in seg.windows(2) {
            let mut at = 0u32;
            for _ in w[0]..w[1] {
                at += rng.below(3) as u32 + 1;
                pos.push(at - 1);
            }
        }
        let r = rng.vec(tt * d);
        let (dh, dp) = b
            .dechunk_smooth_backward(
                &t(&h, &[tt, d]),
                &t(&p, &[tt, 1]),
                &pos,
                width,
                sigma,
                &seg,
                &t(&r, &[tt, d]),
            )
            .unwrap();
        assert_eq!(b.shape(&dp), vec![tt, 1]);
        let f = |ins: &[Vec<f64>]| {
            let mut out = Vec::with_capacity(tt * d);
            for w in seg.windows(2) {
                let (a, bb) = (w[0], w[1]);
                out.extend(common::smooth(
                    &ins[0][a * d..bb * d],
                    d,
                    &ins[1][a..bb],
                    &pos[a..bb],
                    width,
                    sigma as f64,
                ));
            }
            out
        };
        fd_check(
            &format!("dechunk seg {seg:?}"),
            &f,
            &[&h, &p],
            &r,
            &[Some(&dh), Some(&dp)],
            &[],
        );
        // Exactly zero where the clamp is active.
        let dpv = host(&dp);
        for (i, &pv) in p.iter().enumerate() {
            if pv == 0.0 || pv == 1.0 {
                assert_eq!(dpv[i], 0.0);
            }
        }
    }
    let bad = b.dechunk_smooth_backward(
        &t(&[0.0; 4], &[2, 2]),
        &t(&[0.5, 0.5], &[2, 1]),
        &[0, 1],
        4,
        1.0,
        &[0, 2],
        &t(&[0.0; 2], &[2, 1]),
    );
    assert!(is_input_err(bad));
    let bad = b.dechunk_smooth_backward(
        &t(&[0.0; 4], &[2, 2]),
        &t(&[0.5], &[1, 1]),
        &[0, 1],
        4,
        1.0,
        &[0, 2],
        &t(&[0.0; 4], &[2, 2]),
    );
    assert!(is_input_err(bad));
}

// --------------------------------------------------------------- optimiser

#[test]
fn adamw_matches_hand_computed_steps() {
    let b = be();
    let mut rng = Rng(90);
    let n = 40_000; // parallel path
    let p0 = rng.vec(n);
    let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n)).collect();
    let scales = [0.5f32, 1.0, 0.25];
    let (lr, b1, b2, eps, wd) = (1e-2f32, 0.9f32, 0.999f32, 1e-8f32, 0.1f32);
    let mut p = t(&p0, &[200, 200]);
    let mut m = b.full(&[200, 200], 0.0).unwrap();
    let mut v = b.full(&[200, 200], 0.0).unwrap();
    let mut pw = f64s(&p0);
    let mut mw = vec![0.0f64; n];
    let mut vw = vec![0.0f64; n];
    for step in 1..=3u64 {
        let hp = AdamW {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            step,
        };
        let gs = scales[step as usize - 1];
        let g = t(&grads[step as usize - 1], &[200, 200]);
        (p, m, v) = b.adamw_step(&p, &g, &m, &v, hp, gs).unwrap();
        let (lr, b1, b2, eps, wd) = (lr as f64, b1 as f64, b2 as f64, eps as f64, wd as f64);
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        for i in 0..n {
            let gv = grads[step as usize - 1][i] as f64 * gs as f64;
            pw[i] *= 1.0 - lr * wd;
            mw[i] = b1 * mw[i] + (1.0 - b1) * gv;
            vw[i] = b2 * vw[i] + (1.0 - b2) * gv * gv;
            pw[i] -= lr / bc1 * mw[i] / (vw[i].sqrt() / bc2.sqrt() + eps);
        }
    }
    let (ph, mh, vh) = (host(&p), host(&m), host(&v));
    for i in 0..n {
        assert!(
            (ph[i] as f64 - pw[i]).abs() <= 2e-6 * (1.0 + pw[i].abs()),
            "p[{i}]"
        );
        assert!(
            (mh[i] as f64 - mw[i]).abs() <= 1e-6 * (0.05 + mw[i].abs()),
            "m[{i}]: {} vs {}",
            mh[i],
            mw[i]
        );
        assert!(
            (vh[i] as f64 - vw[i]).abs() <= 1e-6 * (1e-6 + vw[i].abs()),
            "v[{i}]: {} vs {}",
            vh[i],
            vw[i]
        );
    }
    // A zero gradient with weight decay only shrinks the parameter.
    let hp = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.5,
        step: 1,
    };
    let z = t(&[0.0; 2], &[2]);
    let (p1, _, _) = b
        .adamw_step(&t(&[2.0, -4.0], &[2]), &z, &z, &z, hp, 1.0)
        .unwrap();
    assert_eq!(host(&p1), vec![2.0 * 0.95, -4.0 * 0.95]);
    assert!(is_input_err(b.adamw_step(
        &t(&[0.0; 2], &[2]),
        &t(&[0.0; 2], &[1, 2]),
        &z,
        &z,
        hp,
        1.0
    )));
    assert!(is_input_err(b.adamw_step(
        &z,
        &z,
        &z,
        &z,
        AdamW { step: 0, ..hp },
        1.0
    )));
}

#[test]
fn ema_update_matches_formula() {
    let b = be();
    let mut rng = Rng(91);
    let (e, p) = (rng.vec(50_000), rng.vec(50_000));
    let out = host(
        &b.ema_update(&t(&e, &[50_000]), &t(&p, &[50_000]), 0.9999)
            .unwrap(),
    );
    for i in 0..e.len() {
        let want = e[i] as f64 * 0.9999 + p[i] as f64 * (1.0 - 0.9999);
        assert!((out[i] as f64 - want).abs() < 2e-7, "{i}");
    }
    assert!(is_input_err(b.ema_update(
        &t(&e[..4], &[4]),
        &t(&p[..4], &[2, 2]),
        0.5
    )));
}

// ------------------------------------------------------------------ dtypes

#[test]
fn gradients_take_their_inputs_dtype() {
    let b = be();
    let mut rng = Rng(95);
    let grid = Grid {
        batch: 1,
        height: 3,
        width: 3,
    };
    let (x, w, g) = (rng.vec(9 * 4), rng.vec(5 * 9 * 4), rng.vec(9 * 5));
    let xf = t(&x, &[9, 4]);
    let wf = t(&w, &[5, 3, 3, 4]);
    let gf = t(&g, &[9, 5]);
    let (dx32, dw32, _) = b.conv2d_backward(&xf, grid, &wf, 3, &gf).unwrap();
    let xb = b.cast(&xf, DType::BF16).unwrap();
    let gb = b.cast(&gf, DType::BF16).unwrap();
    let (dx, dw, db) = b.conv2d_backward(&xb, grid, &wf, 3, &gb).unwrap();
    assert_eq!(b.dtype(&dx), DType::BF16);
    assert_eq!(b.dtype(&dw), DType::F32);
    assert_eq!(b.dtype(&db), DType::F32);
    // bf16 rounding of the inputs: within ~1e-2 of the f32 gradients.
    for (got, want) in [(host(&dx), host(&dx32)), (host(&dw), host(&dw32))] {
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 2e-2 * scale);
        }
    }
    let h16 = b.cast(&t(&x, &[9, 4]), DType::F16).unwrap();
    let d = b.unary_backward(&h16, Unary::Silu, &h16).unwrap();
    assert_eq!(b.dtype(&d), DType::F16);
    let mm = b.matmul(&h16, &xf, true, false).unwrap();
    assert_eq!(b.dtype(&mm), DType::F16);
    assert_eq!(b.shape(&mm), vec![4, 4]);
}
