//! Initialisation from scratch (SPEC 10), as host tensors under the release's
//! key names, so a fresh model goes through the same loading path as a
//! checkpoint.

use super::params::Registry;
use crate::config::{ModelSpec, RouterKind};
use crate::embed;
use crate::error::Result;
use crate::rng::Rng;
use crate::weights::{HostTensor, TensorMap};
use alloc::vec;
use alloc::vec::Vec;

fn uniform(rng: &mut Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// SPEC 10 initial values of every registered parameter. Linear weights are
/// Xavier-uniform with zero bias, the patch embedding Xavier on its flattened
/// weight, other convolutions Kaiming-uniform (a = sqrt 5) with PyTorch's
/// default bias, the class table N(0, `model.class_embed_init_std`, 0.02 by default) and
/// timestep MLP N(0, 0.02), adaLN and the
/// final Linear zero, norms identity, the router's scorer bias -1.1, the
/// cosine router's projections identity and its smoothing 1/9, the position
/// table 2D sin-cos.
pub fn init_weights(spec: &ModelSpec, reg: &Registry, seed: u64) -> Result<TensorMap> {
    let mut rng = Rng::new(seed);
    let mut m = TensorMap::default();
    for info in &reg.infos {
        let name = info.name.as_str();
        let n = info.numel();
        let sh = &info.shape;
        let zero = || vec![0.0f32; n];
        let is_bias = name.ends_with(".bias");
        let data = if name == "pos_embed" {
            let (h, w) = (spec.height / spec.patch, spec.width / spec.patch);
            let mut v = vec![0.0; n];
            embed::pos_embed_2d(sh[2], h, w, &mut v)?;
            v
        } else if name.contains("adaLN_modulation") || name.starts_with("final_layer.linear") {
            zero()
        } else if name.contains("norm") || name.contains("residual_scorer.1") {
            // GroupNorm / RMSNorm: scale 1, shift 0.
            if is_bias {
                zero()
            } else {
                vec![1.0; n]
            }
        } else if name == "y_embedder.embedding_table.weight" {
            let std = spec.class_embed_init_std;
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        } else if name.starts_with("t_embedder") && !is_bias {
            (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
        } else if name == "hnet.routing_module.residual_scorer.3.bias" {
            vec![-1.1; n]
        } else if spec.router == RouterKind::Cosine
            && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight"))
        {
            let d = sh[0];
            (0..n)
                .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
                .collect()
        } else if name.ends_with("k_smooth.weight") {
            vec![1.0 / 9.0; n]
        } else if sh.len() == 4 {
            // Convolutions (out, in, k, k).
            let fan_in = sh[1] * sh[2] * sh[3];
            if name.starts_with("x_embedder") {
                let fan_out = sh[0];
                uniform(&mut rng, n, libm::sqrt(6.0 / (fan_in + fan_out) as f64))
            } else {
                uniform(&mut rng, n, 1.0 / libm::sqrt(fan_in as f64))
            }
        } else if is_bias {
            let w = name.trim_end_matches(".bias");
            let conv = reg.infos.iter().find(|i| {
                i.name.len() == w.len() + 7 && i.name.starts_with(w) && i.name.ends_with(".weight")
            });
            match conv {
                Some(c) if c.shape.len() == 4 && !name.starts_with("x_embedder") => uniform(
                    &mut rng,
                    n,
                    1.0 / libm::sqrt((c.shape[1] * c.shape[2] * c.shape[3]) as f64),
                ),
                _ => zero(),
            }
        } else if sh.len() == 2 {
            let (fan_out, fan_in) = (sh[0], sh[1]);
            uniform(&mut rng, n, libm::sqrt(6.0 / (fan_in + fan_out) as f64))
        } else {
            zero()
        };
        m.insert(name, HostTensor::new(sh.clone(), data)?);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The class table's spread follows `model.class_embed_init_std`; the
    /// rest of the initial weights do not depend on it.
    #[test]
    fn class_table_std_follows_config() {
        let mut stds = Vec::new();
        let mut others = Vec::new();
        for std in [0.02, 1.0] {
            let mut cfg = Config::default();
            cfg.model.class_embed_init_std = std;
            let spec = cfg.model_spec().unwrap();
            let (_, reg) = crate::model::build(&spec);
            let w = init_weights(&spec, &reg, 7).unwrap();
            let t = w.get("y_embedder.embedding_table.weight").unwrap();
            let v = &t.data;
            let ms = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / v.len() as f64;
            stds.push(libm::sqrt(ms) / std);
            others.push(w.get("t_embedder.mlp.0.weight").unwrap().data.clone());
        }
        for r in stds {
            assert!((0.9..1.1).contains(&r), "sample std / requested = {r}");
        }
        assert_eq!(others[0], others[1]);
    }
}
