//! `dcdit-cli grad`: the loss terms and every parameter's gradient for one
//! batch, the tool to check a training port against PyTorch.

use crate::forward::{labels, parse_tail_drop};
use crate::util::{read_config, read_tensors, write_atomic};
use anyhow::{bail, Context, Result};
use dcdit_autodiff::Autodiff;
use dcdit_core::train::{batch_gradients, Batch};
use dcdit_core::weights::HostTensor;
use std::path::Path;

/// Runs the command.
pub fn run(
    config: &Path,
    weights: &Path,
    batch: &Path,
    out: &Path,
    tail: &str,
    dev: crate::util::Dev,
) -> Result<()> {
    let cfg = read_config(config)?;
    let spec = cfg.model_spec()?;
    let w = read_tensors(weights)?;
    let bt = read_tensors(batch)?;
    let get = |k: &str| {
        bt.get(k)
            .with_context(|| format!("batch {} has no tensor `{k}`", batch.display()))
    };
    let (x, t, y, noise) = (get("x")?, get("t")?, get("y")?, get("noise")?);
    let b = t.data.len();
    let want = vec![b, spec.in_channels, spec.height, spec.width];
    for (name, tensor) in [("x", x), ("noise", noise)] {
        if tensor.shape != want {
            bail!(
                "batch `{name}`: expected shape {want:?}, got {:?}",
                tensor.shape
            );
        }
    }
    let ts: Vec<usize> = labels(t, "t")?.into_iter().map(|v| v as usize).collect();
    let batch = Batch {
        x0: x.data.clone(),
        t: ts,
        y: labels(y, "y")?,
        noise: noise.data.clone(),
    };
    crate::with_backend!(dev, backend, {
        let ad = Autodiff::new(backend);
        let (terms, mut grads) = batch_gradients(&ad, &cfg, &w, &batch, &parse_tail_drop(tail)?)
            .with_context(|| format!("weights {}", weights.display()))?;
        for (k, v) in [
            ("loss", terms.loss),
            ("mse", terms.mse),
            ("vb", terms.vb),
            ("ratio", terms.ratio),
        ] {
            grads.insert(k, HostTensor::new(vec![1], vec![v])?);
        }
        eprintln!(
            "grad: loss {:.6} (mse {:.6}, vb {:.6}, ratio {:.6})",
            terms.loss, terms.mse, terms.vb, terms.ratio
        );
        write_atomic(out, &grads.to_safetensors(None)?)
    })
}
