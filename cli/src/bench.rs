//! `dcdit-cli bench`: forward time on random weights at a target kept fraction.

use crate::util::read_config;
use anyhow::{bail, Result};
use dcdit_core::model::{self, Model, TailDrop};
use dcdit_core::Backend;
use std::path::Path;

pub fn run(
    config: &Path,
    batch: usize,
    keep: f64,
    iters: usize,
    dev: crate::util::Dev,
) -> Result<()> {
    let cfg = read_config(config)?;
    let spec = cfg.model_spec()?;
    if batch == 0 || iters == 0 || !(keep > 0.0 && keep <= 1.0) {
        bail!("--batch and --iters must be > 0 and --keep in (0, 1]");
    }
    crate::with_backend!(dev, backend, {
        let (_, reg) = model::build(&spec);
        let mut w = dcdit_core::model::init::init_weights(&spec, &reg, 0)?;
        // Random (not zero) adaLN and output weights, so every layer does real work.
        let mut rng = dcdit_core::rng::Rng::new(1);
        for (k, t) in w.tensors.iter_mut() {
            if k.contains("adaLN_modulation") || k.starts_with("final_layer.linear") {
                t.data
                    .iter_mut()
                    .for_each(|v| *v = (rng.normal() * 0.02) as f32);
            }
        }
        let l = spec.tokens();
        let x: Vec<f32> = (0..batch * spec.in_channels * l)
            .map(|_| rng.normal() as f32)
            .collect();
        let t: Vec<f32> = (0..batch)
            .map(|i| (i * 997 / batch.max(1)) as f32)
            .collect();
        let y: Vec<u32> = (0..batch).map(|i| (i % spec.num_classes) as u32).collect();
        let mut model = Model::load(&backend, &cfg, &w)?;
        let xt = model.input_from_nchw(&backend, &x, batch)?;
        let bias_key = "hnet.routing_module.residual_scorer.3.bias";
        if let (Some(r), Some(id)) = (
            model
                .forward(&backend, &xt, &t, &y, &TailDrop::None)?
                .routing,
            reg.find(bias_key),
        ) {
            // Shift the logit so that `keep` of the tokens land above 0.5.
            let mut logits: Vec<f32> = r
                .boundary_prob
                .iter()
                .map(|p| (p / (1.0 - p)).ln())
                .collect();
            logits.sort_by(|a, b| a.total_cmp(b));
            let q = logits[((1.0 - keep) * (logits.len() - 1) as f64) as usize];
            let mut bias = w.get(bias_key).unwrap().clone();
            bias.data[0] -= q + 1e-4;
            w.insert(bias_key, bias);
            model = Model::load(&backend, &cfg, &w)?;
            let _ = id;
        }
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..iters + 1 {
            let t0 = std::time::Instant::now();
            let out = model.forward(&backend, &xt, &t, &y, &TailDrop::None)?;
            backend.to_f32(&out.out)?;
            times.push(t0.elapsed().as_secs_f64());
            last = Some(out);
        }
        times.remove(0); // warm-up
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[times.len() / 2];
        let out = last.unwrap();
        let kept: usize = out
            .routing
            .as_ref()
            .map(|r| r.kept.iter().sum())
            .unwrap_or(batch * l);
        println!(
        "{} | batch {batch} | kept {:.1}% of tokens | median {:.3} s (min {:.3}, max {:.3}) over {iters} | {:.1} GFLOP | {:.1} GFLOP/s",
        backend.name(),
        100.0 * kept as f64 / (batch * l) as f64,
        med,
        times[0],
        times[times.len() - 1],
        out.flops.total() as f64 / 1e9,
        out.flops.total() as f64 / 1e9 / med
    );
        println!("{}", out.flops);
        Ok(())
    })
}
