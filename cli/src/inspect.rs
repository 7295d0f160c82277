//! `dcdit-cli inspect`: parameters and FLOPs per component.

use crate::util::{read_config, read_tensors};
use anyhow::{bail, Context, Result};
use dcdit_core::config::ModelSpec;
use dcdit_core::flops::Component;
use dcdit_core::model::{self, dry_run};
use std::path::Path;

pub fn component_of(name: &str) -> Component {
    if name.starts_with("hnet.encoder") || name.starts_with("hnet.residual_proj") {
        Component::Encoder
    } else if name.starts_with("hnet.routing_module") {
        Component::Routing
    } else if name.starts_with("hnet.main_network")
        || name.starts_with("blocks.")
        || name == "pos_embed"
    {
        Component::MainNetwork
    } else if name.starts_with("hnet.decoder") {
        Component::Decoder
    } else if name.starts_with("final_layer") {
        Component::FinalLayer
    } else {
        Component::Embeddings
    }
}

pub fn run(config: &Path, weights: Option<&Path>, compression: f64) -> Result<()> {
    let cfg = read_config(config)?;
    let spec: ModelSpec = cfg.model_spec()?;
    let (_, reg) = model::build(&spec);
    if let Some(w) = weights {
        let wm = read_tensors(w)?;
        let shapes = dry_run::ShapeBackend { l: 0, keep: 0 };
        dcdit_core::model::params::Params::load(&shapes, reg.clone(), &wm)
            .with_context(|| format!("weights {}", w.display()))?;
        println!(
            "weights {}: all {} tensors match the config",
            w.display(),
            reg.infos.len()
        );
    }
    if compression.is_nan() || compression < 1.0 {
        bail!("--compression must be >= 1 (got {compression})");
    }
    let l = spec.tokens();
    let keep = ((l as f64 / compression).round() as usize).clamp(2.min(l), l);
    let flops = dry_run::flops_per_image(&spec, keep)?;
    println!(
        "{:?} {}x{}x{} latent, D {} E {} heads {} blocks {}+{}+{}",
        spec.kind,
        spec.in_channels,
        spec.height,
        spec.width,
        spec.width_d,
        spec.enc_dim,
        spec.heads,
        spec.encoder.len(),
        spec.main.len(),
        spec.decoder.len()
    );
    println!(
        "{:<14} {:>14} {:>14}",
        "component", "parameters", "GFLOP/image"
    );
    for c in Component::ALL {
        let n: usize = reg
            .infos
            .iter()
            .filter(|i| i.trainable && component_of(&i.name) == c)
            .map(|i| i.numel())
            .sum();
        println!(
            "{:<14} {:>14} {:>14.4}",
            c.name(),
            n,
            flops.get(c) as f64 / 1e9
        );
    }
    println!(
        "{:<14} {:>14} {:>14.4}",
        "total",
        reg.trainable_count(),
        flops.total() as f64 / 1e9
    );
    println!(
        "trainable parameters: {}  fixed position table: {} entries  (kept {keep} of {l} tokens)",
        reg.trainable_count(),
        reg.buffer_count()
    );
    Ok(())
}
