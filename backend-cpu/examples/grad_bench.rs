//! Timings of the heavy backward ops at DC-DiT-B-like sizes, next to their
//! forwards: `cargo run --release -p dcdit-backend-cpu --example grad_bench [threads]`.

use std::time::Instant;

use dcdit_backend_cpu::{CpuBackend, CpuTensor};
use dcdit_core::backend::{uniform_segments, Backend, Grid};
use dcdit_core::backend_grad::GradBackend;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Best wall time of `reps` runs (after one warm-up), in milliseconds (the
/// minimum is the robust statistic on a shared machine). With `FLUSH=1`,
/// 128 MiB are written before every run, so each starts with cold caches (as
/// in a training step, whose backward reads activations written long before).
fn time<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    std::hint::black_box(f());
    let flush = std::env::var("FLUSH").is_ok();
    let mut junk = vec![1.0f32; if flush { 1 << 25 } else { 0 }];
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            for v in junk.iter_mut() {
                *v += 1.0;
            }
            std::hint::black_box(&junk);
            let t0 = Instant::now();
            std::hint::black_box(f());
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[0]
}

fn main() -> dcdit_core::Result<()> {
    let threads = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let b = CpuBackend::with_threads(threads);
    println!("{}", b.name());

    // DCDIT_GRAD_BENCH=mnist runs only the MNIST shapes, =conv only the
    // convolutions.
    let only = std::env::var("DCDIT_GRAD_BENCH").unwrap_or_default();
    if only != "mnist" {
        dcdit_b_shapes(&b, only == "conv")?;
    }
    mnist_shapes(&b, only == "conv")
}

/// Times `conv2d` and `conv2d_backward` at each `(cin, cout)` and kernel size.
fn conv_shapes(
    b: &CpuBackend,
    label: &str,
    grid: Grid,
    channels: &[(usize, usize)],
    ks: &[usize],
) -> dcdit_core::Result<()> {
    let rows = grid.rows();
    for &(cin, cout) in channels {
        for &k in ks {
            let x = b.from_f32(&data(rows * cin, 17), &[rows, cin])?;
            let w = b.from_f32(&data(cout * k * k * cin, 18), &[cout, k, k, cin])?;
            let bias = b.from_f32(&data(cout, 19), &[cout])?;
            let g = b.from_f32(&data(rows * cout, 20), &[rows, cout])?;
            let fwd = time(9, || b.conv2d(&x, grid, &w, Some(&bias), k).unwrap());
            let bwd = time(9, || b.conv2d_backward(&x, grid, &w, k, &g).unwrap());
            let wbwd = time(9, || b.conv2d_weight_backward(&x, grid, &w, k, &g).unwrap());
            let gf = 2.0 * (rows * k * k * cin * cout) as f64 * 1e-6;
            println!(
                "{label}conv2d k={k} {cin}->{cout} at {}x{}x{}: forward {fwd:.2} ms ({:.1} GFLOP/s), backward {bwd:.2} ms ({:.1}), weights only {wbwd:.2} ms",
                grid.batch,
                grid.height,
                grid.width,
                gf / fwd,
                2.0 * gf / bwd
            );
        }
    }
    Ok(())
}

/// DC-DiT-B's shapes (batch 8, 32x32, E 192, D 768, 12 heads, 256 kept).
fn dcdit_b_shapes(b: &CpuBackend, conv_only: bool) -> dcdit_core::Result<()> {
    let t =
        |v: Vec<f32>, shape: &[usize]| -> dcdit_core::Result<CpuTensor> { b.from_f32(&v, shape) };
    let grid = Grid {
        batch: 8,
        height: 32,
        width: 32,
    };
    conv_shapes(b, "", grid, &[(192, 192)], &[1, 3])?;
    if conv_only {
        return Ok(());
    }
    let (segs, len, d, heads) = (8, 256, 768, 12);
    let seg = uniform_segments(segs, len);
    let tt = segs * len;
    let qkv = t(data(tt * 3 * d, 5), &[tt, 3 * d])?;
    let go = t(data(tt * d, 6), &[tt, d])?;
    let fwd = time(7, || b.attention(&qkv, heads, &seg).unwrap());
    let bwd = time(7, || b.attention_backward(&qkv, heads, &seg, &go).unwrap());
    // Forward: 2 gemms of 2 n^2 d flops per segment; backward: 5.
    let gflop = (segs * 2 * len * len * d) as f64 * 1e-9;
    println!(
        "attention ({segs} x {len} rows, d {d}, {heads} heads): forward {fwd:.1} ms ({:.1} GFLOP/s), backward {bwd:.1} ms ({:.1} GFLOP/s)",
        2.0 * gflop / fwd * 1e3,
        5.0 * gflop / bwd * 1e3
    );

    let a = t(data(tt * d, 7), &[tt, d])?;
    let wl = t(data(d * d, 8), &[d, d])?;
    let mm = time(7, || b.matmul(&a, &wl, false, false).unwrap());
    let mmt = time(7, || b.matmul(&a, &a, true, false).unwrap());
    println!(
        "matmul ({tt}x{d})·({d}x{d}): {mm:.1} ms; ({tt}x{d})^T·({tt}x{d}): {mmt:.1} ms ({:.1} / {:.1} GFLOP/s)",
        2.0 * (tt * d * d) as f64 * 1e-6 / mm,
        2.0 * (tt * d * d) as f64 * 1e-6 / mmt
    );
    Ok(())
}

/// The shipped MNIST training config's shapes.
fn mnist_shapes(b: &CpuBackend, conv_only: bool) -> dcdit_core::Result<()> {
    let t =
        |v: Vec<f32>, shape: &[usize]| -> dcdit_core::Result<CpuTensor> { b.from_f32(&v, shape) };
    // The shipped MNIST training config: 32 samples of 28x28, D 64 (4 heads of
    // 16), ~196 kept tokens per sample, encoder width 128.
    let (segs, len, d, heads, side) = (32, 196, 64, 4, 28);
    let grid = Grid {
        batch: segs,
        height: side,
        width: side,
    };
    // Every convolution of the MNIST model at 28x28: 3x3 embedding,
    // encoder/decoder blocks and router; 1x1 skips and router projections.
    let convs3 = [(1, 32), (32, 32), (32, 64), (64, 32), (16, 16)];
    let convs1 = [(32, 64), (64, 32), (64, 16), (16, 1)];
    let convs = || -> dcdit_core::Result<()> {
        conv_shapes(b, "mnist ", grid, &convs3, &[3])?;
        conv_shapes(b, "mnist ", grid, &convs1, &[1])
    };
    if conv_only {
        return convs();
    }
    let seg = uniform_segments(segs, len);
    let tt = segs * len;
    let qkv = t(data(tt * 3 * d, 9), &[tt, 3 * d])?;
    let go = t(data(tt * d, 10), &[tt, d])?;
    let fwd = time(15, || b.attention(&qkv, heads, &seg).unwrap());
    let bwd = time(15, || b.attention_backward(&qkv, heads, &seg, &go).unwrap());
    let gflop = (segs * 2 * len * len * d) as f64 * 1e-9;
    println!(
        "mnist attention ({segs} x {len} rows, d {d}, {heads} heads): forward {fwd:.2} ms ({:.1} GFLOP/s), backward {bwd:.2} ms ({:.1} GFLOP/s)",
        2.0 * gflop / fwd * 1e3,
        5.0 * gflop / bwd * 1e3
    );
    // Kept positions: every 4th raster position, so windows span many rows.
    let pos: Vec<u32> = (0..segs)
        .flat_map(|_| (0..len).map(|i| (i * side * side / len) as u32))
        .collect();
    let h = t(data(tt * d, 11), &[tt, d])?;
    let p = t(
        data(tt, 12).iter().map(|v| 0.5 + 0.45 * v).collect(),
        &[tt, 1],
    )?;
    let fwd = time(15, || {
        b.dechunk_smooth(&h, &p, &pos, side, 1.0, &seg).unwrap()
    });
    let bwd = time(15, || {
        b.dechunk_smooth_backward(&h, &p, &pos, side, 1.0, &seg, &go)
            .unwrap()
    });
    println!("mnist dechunk_smooth ({segs} x {len} rows, d {d}): forward {fwd:.2} ms, backward {bwd:.2} ms");
    // The DiT blocks' linear layers (K = 64 or 256) and their backward GEMMs.
    for (k, m) in [(d, 4 * d), (d, 3 * d), (4 * d, d)] {
        let x = t(data(tt * k, 13), &[tt, k])?;
        let w = t(data(m * k, 14), &[m, k])?;
        let bias = t(data(m, 15), &[m])?;
        let g = t(data(tt * m, 16), &[tt, m])?;
        let fwd = time(15, || b.linear(&x, &w, Some(&bias)).unwrap());
        let dx = time(15, || b.matmul(&g, &w, false, false).unwrap());
        let dw = time(15, || b.matmul(&g, &x, true, false).unwrap());
        let gf = 2.0 * (tt * k * m) as f64 * 1e-6;
        println!(
            "mnist linear {tt}x{k}x{m}: forward {fwd:.2} ms ({:.1} GFLOP/s), dx {dx:.2} ms ({:.1}), dw {dw:.2} ms ({:.1})",
            gf / fwd,
            gf / dx,
            gf / dw
        );
    }
    convs()
}
