//! `dcdit-cli forward`: one forward pass on a safetensors input.

use crate::util::{parse_fractions, read_config, read_tensors, write_atomic};
use anyhow::{bail, Context, Result};
use dcdit_core::model::{Model, TailDrop};
use dcdit_core::weights::{HostTensor, TensorMap};
use std::path::Path;

pub fn parse_tail_drop(s: &str) -> Result<TailDrop> {
    let v = parse_fractions(s, "--tail-drop")?;
    Ok(match v.as_slice() {
        [f] if *f == 0.0 => TailDrop::None,
        [f] => TailDrop::Uniform(*f),
        _ => TailDrop::PerSample(v),
    })
}

pub fn labels(t: &HostTensor, name: &str) -> Result<Vec<u32>> {
    t.data
        .iter()
        .map(|&v| {
            if v >= 0.0 && v.fract() == 0.0 && v < u32::MAX as f32 {
                Ok(v as u32)
            } else {
                bail!("input `{name}`: {v} is not a class index")
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    config: &Path,
    weights: &Path,
    input: &Path,
    out: &Path,
    tail: &str,
    dev: crate::util::Dev,
) -> Result<()> {
    let cfg = read_config(config)?;
    let spec = cfg.model_spec()?;
    let w = read_tensors(weights)?;
    let inp = read_tensors(input)?;
    crate::with_backend!(dev, backend, {
        let model = Model::load(&backend, &cfg, &w)
            .with_context(|| format!("weights {}", weights.display()))?;
        let get = |k: &str| {
            inp.get(k)
                .with_context(|| format!("input {} has no tensor `{k}`", input.display()))
        };
        let (x, t, y) = (get("x")?, get("t")?, get("y")?);
        let b = t.data.len();
        let want = vec![b, spec.in_channels, spec.height, spec.width];
        if x.shape != want {
            bail!(
                "input `x`: expected shape {want:?} (B from `t`), got {:?}",
                x.shape
            );
        }
        if y.data.len() != b {
            bail!("input `y`: {} labels for {b} timesteps", y.data.len());
        }
        let yl = labels(y, "y")?;
        let tail = parse_tail_drop(tail)?;
        let xt = model.input_from_nchw(&backend, &x.data, b)?;
        let t0 = std::time::Instant::now();
        let res = model.forward(&backend, &xt, &t.data, &yl, &tail)?;
        let o = model.output_to_nchw(&backend, &res.out, b)?;
        let secs = t0.elapsed().as_secs_f64();
        let mut m = TensorMap::default();
        m.insert(
            "out",
            HostTensor::new(vec![b, spec.out_channels, spec.height, spec.width], o)?,
        );
        if let Some(r) = &res.routing {
            let l = spec.tokens();
            m.insert(
                "boundary_prob",
                HostTensor::new(vec![b, l], r.boundary_prob.clone())?,
            );
            let mask = r.mask.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            m.insert("boundary_mask", HostTensor::new(vec![b, l], mask)?);
            eprintln!(
                "forward: {b} samples, kept {:?} of {l} tokens, {:.3} s, {:.3} GFLOP",
                r.kept,
                secs,
                res.flops.total() as f64 / 1e9
            );
        } else {
            eprintln!(
                "forward: {b} samples, {:.3} s, {:.3} GFLOP",
                secs,
                res.flops.total() as f64 / 1e9
            );
        }
        write_atomic(out, &m.to_safetensors(None)?)
    })
}
