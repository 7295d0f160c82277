//! Sampling runs the model code end to end: deterministic for a seed, every
//! option path (DDPM/DDIM, guidance on all or the first channels, tail drop,
//! Lite-CFG) produces finite samples, the step callback sees the compression
//! the options ask for, and bad options are errors.

use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::Config;
use dcdit_core::model::{self, init::init_weights, Model};
use dcdit_core::sample::{sample, Guide, Method, SampleOptions};

fn model() -> (CpuBackend, Model<CpuBackend>) {
    let cfg = Config::from_yaml_str(
        r#"
model:
  in_channels: 2
  hnet: { arch_layout: ["c1", ["D1"], "c1"], d_model: [32, 32], num_heads: [2, 2] }
data: { latent_height: 6, latent_width: 5, num_classes: 3 }
"#,
    )
    .unwrap();
    let spec = cfg.model_spec().unwrap();
    let (_, reg) = model::build(&spec);
    let mut w = init_weights(&spec, &reg, 1).unwrap();
    // Non-zero adaLN and output layers so the samples depend on the model.
    let mut rng = dcdit_core::rng::Rng::new(2);
    for (k, t) in w.tensors.iter_mut() {
        if k.contains("adaLN") || k.starts_with("final_layer.linear") {
            t.data
                .iter_mut()
                .for_each(|v| *v = (rng.normal() * 0.05) as f32);
        }
    }
    // Most tokens natural boundaries, so tail dropping has something to drop.
    w.tensors
        .get_mut("hnet.routing_module.residual_scorer.3.bias")
        .unwrap()
        .data[0] = 1.5;
    let b = CpuBackend::with_threads(2);
    let m = Model::load(&b, &cfg, &w).unwrap();
    (b, m)
}

#[test]
fn deterministic_and_every_path_runs() {
    let (b, m) = model();
    let base = SampleOptions {
        steps: 8,
        cfg_scale: 3.0,
        seed: 4,
        ..SampleOptions::default()
    };
    let a = sample(&b, &m, &[0, 2], &base, |_| {}).unwrap();
    let a2 = sample(&b, &m, &[0, 2], &base, |_| {}).unwrap();
    assert_eq!(a, a2, "same seed, same samples");
    assert_eq!(a.len(), 2 * 2 * 30);
    let other = sample(
        &b,
        &m,
        &[0, 2],
        &SampleOptions {
            seed: 5,
            ..base.clone()
        },
        |_| {},
    )
    .unwrap();
    assert_ne!(a, other);
    for opts in [
        SampleOptions {
            method: Method::Ddim { eta: 0.0 },
            ..base.clone()
        },
        SampleOptions {
            guide: Guide::First(1),
            ..base.clone()
        },
        SampleOptions {
            cfg_scale: 1.0,
            ..base.clone()
        },
        SampleOptions {
            tail_drop: 0.5,
            uncond_tail_drop: Some(0.9),
            ..base.clone()
        },
        SampleOptions {
            clip_x0: true,
            ..base.clone()
        },
    ] {
        let mut steps = Vec::new();
        let x = sample(&b, &m, &[1, 1], &opts, |s| steps.push(s.clone())).unwrap();
        assert!(x.iter().all(|v| v.is_finite()), "{opts:?}");
        assert_eq!(steps.len(), 8);
        assert_eq!(steps[0].t, 999);
        assert_eq!(steps[7].t, 0);
        let guided = opts.cfg_scale != 1.0;
        assert_eq!(steps[0].kept_uncond.is_empty(), !guided);
        if let Some(fu) = opts.uncond_tail_drop {
            // Lite-CFG: the unconditional half keeps fewer tokens.
            let kc: usize = steps
                .iter()
                .map(|s| s.kept_cond.iter().sum::<usize>())
                .sum();
            let ku: usize = steps
                .iter()
                .map(|s| s.kept_uncond.iter().sum::<usize>())
                .sum();
            assert!(ku < kc, "uncond tail drop {fu}: kept {ku} vs {kc}");
        }
    }
}

#[test]
fn bad_options_are_errors() {
    let (b, m) = model();
    let ok = SampleOptions {
        steps: 4,
        ..SampleOptions::default()
    };
    assert!(sample(&b, &m, &[], &ok, |_| {}).is_err());
    assert!(sample(
        &b,
        &m,
        &[0],
        &SampleOptions {
            steps: 0,
            ..ok.clone()
        },
        |_| {}
    )
    .is_err());
    assert!(sample(
        &b,
        &m,
        &[0],
        &SampleOptions {
            cfg_scale: f32::NAN,
            ..ok.clone()
        },
        |_| {}
    )
    .is_err());
    assert!(sample(
        &b,
        &m,
        &[0],
        &SampleOptions {
            tail_drop: 1.5,
            ..ok.clone()
        },
        |_| {}
    )
    .is_err());
    assert!(sample(&b, &m, &[7], &ok, |_| {}).is_err());
}
