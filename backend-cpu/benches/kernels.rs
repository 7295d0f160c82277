//! Criterion benches of the CPU kernels at DC-DiT-B's shapes (batch 8, 32x32
//! latent, D = 768, E = 192, 12 heads, about 25% of the tokens kept: 8
//! segments of 256 rows).
//!
//! ```text
//! cargo bench -p dcdit-backend-cpu --bench kernels            # all kernels
//! cargo bench -p dcdit-backend-cpu --bench kernels -- linear  # one group
//! DCDIT_BENCH_THREADS=1 cargo bench -p dcdit-backend-cpu --bench kernels
//! ```
//!
//! Throughput is given in FLOPs (criterion prints it as `elem/s`, so
//! `Gelem/s` reads as GFLOP/s), with the FLOP conventions of
//! `dcdit_core::flops`: a multiply-add is 2 FLOPs, attention costs
//! `heads * sum L_i^2 * (4 d_head + 3)`. Norms, modulation and the de-chunk
//! smoothing are counted in elements read instead (their FLOPs are not
//! counted by the model's FLOP counter).

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dcdit_backend_cpu::{CpuBackend, CpuTensor};
use dcdit_core::backend::{uniform_segments, Backend, DType, Grid};

const BATCH: usize = 8;
const SIDE: usize = 32;
const D: usize = 768;
const E: usize = 192;
const HEADS: usize = 12;
const MLP: usize = 3072;
/// Kept tokens per sample at about 25% (N = 4).
const KEPT: usize = 256;

fn backend() -> CpuBackend {
    let threads = std::env::var("DCDIT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    CpuBackend::with_threads(threads)
}

/// Deterministic values in [-1, 1).
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

fn tensor(b: &CpuBackend, shape: &[usize], seed: u64, scale: f32) -> CpuTensor {
    let n = shape.iter().product();
    let v: Vec<f32> = data(n, seed).into_iter().map(|x| x * scale).collect();
    b.from_f32(&v, shape).unwrap()
}

/// A shared 2-core machine: few, short samples; the figures of record come
/// from `dcdit-cli bench` (medians of whole forwards).
fn configure() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

fn linear(c: &mut Criterion) {
    let b = backend();
    let full = BATCH * SIDE * SIDE;
    let kept = BATCH * KEPT;
    // (name, rows, k, m): x (rows, k), w (m, k).
    let shapes = [
        ("qkv", kept, D, 3 * D),
        ("attn_proj", kept, D, D),
        ("mlp_fc1", kept, D, MLP),
        ("mlp_fc2", kept, MLP, D),
        ("residual_proj", full, D, D),
        ("adaLN", BATCH, D, 6 * D),
    ];
    let mut g = c.benchmark_group("linear");
    for (name, rows, k, m) in shapes {
        let x = tensor(&b, &[rows, k], 1, 1.0);
        let w = tensor(&b, &[m, k], 2, 0.03);
        let bias = tensor(&b, &[m], 3, 0.1);
        g.throughput(Throughput::Elements(2 * (rows * k * m) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{rows}x{k}x{m}")), |bn| {
            bn.iter(|| black_box(b.linear(&x, &w, Some(&bias)).unwrap()))
        });
        // The same with x and w stored as bf16 (the mixed-precision main
        // network): AMX or AVX512-BF16 where the CPU has them, else f32 math.
        let xb = b.cast(&x, DType::BF16).unwrap();
        let wb = b.cast(&w, DType::BF16).unwrap();
        g.bench_function(
            BenchmarkId::new(name, format!("bf16/{rows}x{k}x{m}")),
            |bn| bn.iter(|| black_box(b.linear(&xb, &wb, Some(&bias)).unwrap())),
        );
    }
    g.finish();
}

fn conv2d(c: &mut Criterion) {
    let b = backend();
    let grid = Grid {
        batch: BATCH,
        height: SIDE,
        width: SIDE,
    };
    // (name, cin, cout, k): the encoder / decoder conv blocks of DC-DiT-B.
    let shapes = [
        ("enc_3x3_E_E", E, E, 3),
        ("enc_3x3_E_D", E, D, 3),
        ("dec_3x3_D_E", D, E, 3),
        ("skip_1x1_E_D", E, D, 1),
    ];
    let mut g = c.benchmark_group("conv2d");
    for (name, cin, cout, k) in shapes {
        let x = tensor(&b, &[grid.rows(), cin], 4, 1.0);
        let w = tensor(&b, &[cout, k, k, cin], 5, 0.02);
        let bias = tensor(&b, &[cout], 6, 0.1);
        g.throughput(Throughput::Elements(
            2 * (grid.rows() * cin * cout * k * k) as u64,
        ));
        g.bench_function(BenchmarkId::new(name, format!("{cin}->{cout}")), |bn| {
            bn.iter(|| black_box(b.conv2d(&x, grid, &w, Some(&bias), k).unwrap()))
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let b = backend();
    let mut g = c.benchmark_group("attention");
    // Packed varlen: 8 equal segments, and 8 ragged ones with the same total.
    let ragged: Vec<usize> = {
        let lens = [64usize, 128, 192, 256, 256, 320, 384, 448];
        let mut s = vec![0];
        for l in lens {
            s.push(s.last().unwrap() + l);
        }
        s
    };
    let cases = [
        ("uniform", uniform_segments(BATCH, KEPT)),
        ("ragged", ragged),
        ("n16", uniform_segments(BATCH, SIDE * SIDE / 16)),
    ];
    for (name, seg) in cases {
        let t = *seg.last().unwrap();
        let qkv = tensor(&b, &[t, 3 * D], 7, 1.0);
        let pairs: usize = seg.windows(2).map(|w| (w[1] - w[0]).pow(2)).sum();
        g.throughput(Throughput::Elements(
            (pairs * HEADS * (4 * (D / HEADS) + 3)) as u64,
        ));
        g.bench_function(BenchmarkId::new(name, format!("T{t}")), |bn| {
            bn.iter(|| black_box(b.attention(&qkv, HEADS, &seg).unwrap()))
        });
    }
    g.finish();
}

fn norms(c: &mut Criterion) {
    let b = backend();
    let grid = Grid {
        batch: BATCH,
        height: SIDE,
        width: SIDE,
    };
    let mut g = c.benchmark_group("norm");
    for (cin, name) in [(E, "group_norm_E"), (D, "group_norm_D")] {
        let x = tensor(&b, &[grid.rows(), cin], 8, 1.0);
        let gamma = tensor(&b, &[cin], 9, 1.0);
        let beta = tensor(&b, &[cin], 10, 0.1);
        g.throughput(Throughput::Elements((grid.rows() * cin) as u64));
        g.bench_function(
            BenchmarkId::new(name, format!("{}x{cin}", grid.rows())),
            |bn| bn.iter(|| black_box(b.group_norm(&x, grid, 32, &gamma, &beta, 1e-5).unwrap())),
        );
    }
    // LayerNorm (no affine) followed by the adaLN modulation, as in every DiT block.
    let rows = BATCH * KEPT;
    let seg = uniform_segments(BATCH, KEPT);
    let x = tensor(&b, &[rows, D], 11, 1.0);
    let ada = tensor(&b, &[BATCH, 6 * D], 12, 0.1);
    g.throughput(Throughput::Elements((rows * D) as u64));
    g.bench_function(
        BenchmarkId::new("layer_norm+modulate", format!("{rows}x{D}")),
        |bn| {
            bn.iter(|| {
                let n = b.layer_norm(&x, 1e-6).unwrap();
                black_box(b.modulate(&n, &ada, 0, 1, &seg).unwrap())
            })
        },
    );
    let w = tensor(&b, &[D], 13, 1.0);
    g.bench_function(BenchmarkId::new("rms_norm", format!("{rows}x{D}")), |bn| {
        bn.iter(|| black_box(b.rms_norm(&x, &w, 1e-5).unwrap()))
    });
    g.finish();
}

fn dechunk(c: &mut Criterion) {
    let b = backend();
    let mut g = c.benchmark_group("dechunk_smooth");
    for (name, kept) in [("n4", KEPT), ("n16", SIDE * SIDE / 16)] {
        let rows = BATCH * kept;
        let seg = uniform_segments(BATCH, kept);
        let h = tensor(&b, &[rows, D], 14, 1.0);
        let p: Vec<f32> = data(rows, 15)
            .iter()
            .map(|v| 0.55 + 0.4 * v.abs())
            .collect();
        let p = b.from_f32(&p, &[rows, 1]).unwrap();
        // Kept positions: every (L / kept)-th raster position of each sample.
        let stride = SIDE * SIDE / kept;
        let pos: Vec<u32> = (0..BATCH)
            .flat_map(|_| (0..kept).map(move |i| (i * stride) as u32))
            .collect();
        // The model's FLOP count for it: 2 * m^2 * d per sample.
        g.throughput(Throughput::Elements((BATCH * 2 * kept * kept * D) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{rows}x{D}")), |bn| {
            bn.iter(|| black_box(b.dechunk_smooth(&h, &p, &pos, SIDE, 1.0, &seg).unwrap()))
        });
    }
    g.finish();
}

criterion_group! {
    name = kernels;
    config = configure();
    targets = linear, conv2d, attention, norms, dechunk
}
criterion_main!(kernels);
