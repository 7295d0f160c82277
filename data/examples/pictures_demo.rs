//! Draws the three pictures of [`dcdit_data::pictures`] from bundled digits
//! and made-up router statistics, to see what they look like.
//!
//! ```sh
//! cargo run -p dcdit-data --example pictures_demo --release -- [OUT_DIR]
//! ```
//!
//! Writes `grid.png`, `chunking.png` and `compression.png` into `OUT_DIR`
//! (default: the system temp directory).

use dcdit_data::classifier::SplitMix64;
use dcdit_data::mnist::Mnist;
use dcdit_data::pictures::{
    save_chunking_viz, save_compression_plot, save_grid_png, ChunkFrame, StepStats,
};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&out)?;
    let mnist = Mnist::load_bundled()?;
    let idx: Vec<usize> = mnist.heldout_indices()[..32].to_vec();
    let (x, _) = mnist.batch_f32(&idx)?;
    save_grid_png(out.join("grid.png"), &x, 32, 1, 28, 28, 8, 3)?;

    // DDPM linear schedule; x_t of one digit and a made-up boundary map
    // (high where x_t changes, more so at low noise).
    let abar: Vec<f64> = (0..1000)
        .scan(1.0f64, |a, i| {
            *a *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
            Some(*a)
        })
        .collect();
    let x0 = mnist.image_f32(idx[3]);
    let mut rng = SplitMix64::new(3);
    let eps: Vec<f32> = (0..784).map(|_| rng.normal()).collect();
    let mut frames = Vec::new();
    let mut steps = Vec::new();
    for k in 0..8 {
        let t = 999 - k * 999 / 7;
        let a = abar[t] as f32;
        let xt: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(x, e)| a.sqrt() * x + (1.0 - a).sqrt() * e)
            .collect();
        let prob: Vec<f32> = (0..784)
            .map(|i| {
                let (r, c) = (i / 28, i % 28);
                let right = if c + 1 < 28 { xt[i + 1] } else { xt[i] };
                let down = if r + 1 < 28 { xt[i + 28] } else { xt[i] };
                let g = (right - xt[i]).abs() + (down - xt[i]).abs();
                1.0 / (1.0 + (-(4.0 * g * a.sqrt().max(0.15) - 1.5)).exp())
            })
            .collect();
        let kept = prob.iter().filter(|p| **p >= 0.5).count() as f32 / 784.0;
        frames.push(ChunkFrame {
            t,
            x_t: xt,
            h: 28,
            w: 28,
            c: 1,
            prob,
            kept_fraction: kept,
        });
    }
    save_chunking_viz(out.join("chunking.png"), &frames)?;

    for s in 0..250 {
        let t = ((249 - s) as f64 * 999.0 / 249.0).round() as usize;
        let noise = t as f32 / 999.0;
        let ratio_cond = 2.0 + 4.0 * noise + 0.2 * rng.uniform();
        steps.push(StepStats {
            t,
            ratio_cond,
            ratio_uncond: Some(ratio_cond * 1.6),
            seconds: 0.02 + 0.01 / ratio_cond as f64 + 0.002 * rng.uniform() as f64,
            gflops: 1.2 / ratio_cond as f64 + 0.15,
        });
    }
    save_compression_plot(out.join("compression.png"), &steps)?;
    println!(
        "wrote grid.png, chunking.png, compression.png in {}",
        out.display()
    );
    Ok(())
}
