//! Training end to end on the CPU: a short run lowers the loss, and a run
//! stopped at a checkpoint and resumed equals an uninterrupted one bit for bit.

use dcdit_autodiff::Autodiff;
use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::Config;
use dcdit_core::model::{self, init::init_weights};
use dcdit_core::train::{TrainOptions, Trainer};
use dcdit_core::weights::TensorMap;

const TINY: &str = r#"
model:
  in_channels: 1
  hnet: { arch_layout: ["c1", ["D1"], "c1"], d_model: [32, 32], num_heads: [2, 2], router: predictability }
training:
  global_batch_size: 8
  gradient_accumulation_steps: 2
  learning_rate: 0.002
  ema_decay: 0.9
  ratio_batch_size: 4
  multi_budget_training: true
  multi_budget_drop_fractions: [0.0, 0.3]
  multi_budget_start_step: 2
  downsample_factor: 3.0
  downsample_factor_start: 1.5
  downsample_factor_warmup_steps: 4
  seed: 5
data: { source: mnist, latent_height: 8, latent_width: 8, num_classes: 4 }
"#;

/// 64 fixed 8x8 "digits": a bright blob at a class-dependent place.
fn source(idx: &[usize]) -> dcdit_core::Result<(Vec<f32>, Vec<u32>)> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for &i in idx {
        let c = i % 4;
        let (cy, cx) = (2 + (c / 2) * 4, 2 + (c % 2) * 4);
        for r in 0..8 {
            for q in 0..8 {
                let d = (r as f32 - cy as f32).powi(2)
                    + (q as f32 - cx as f32).powi(2)
                    + (i % 7) as f32 * 0.1;
                x.push(if d < 3.0 { 1.0 } else { -1.0 });
            }
        }
        y.push(c as u32);
    }
    Ok((x, y))
}

fn trainer() -> Trainer<Autodiff<CpuBackend>> {
    let cfg = Config::from_yaml_str(TINY).unwrap();
    let spec = cfg.model_spec().unwrap();
    let (_, reg) = model::build(&spec);
    let init = init_weights(&spec, &reg, 5).unwrap();
    Trainer::new(
        Autodiff::new(CpuBackend::with_threads(2)),
        &cfg,
        &init,
        TrainOptions::from_config(&cfg).unwrap(),
    )
    .unwrap()
}

fn params(t: &Trainer<Autodiff<CpuBackend>>) -> TensorMap {
    t.checkpoint().unwrap()
}

#[test]
fn short_run_lowers_the_loss() {
    let mut t = trainer();
    let mut src = source;
    let losses: Vec<f32> = (0..60)
        .map(|_| t.step(64, &mut src).unwrap().loss.mse)
        .collect();
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[50..].iter().sum::<f32>() / 10.0;
    assert!(
        last < 0.7 * first,
        "mse did not fall: first {first}, last {last}"
    );
}

#[test]
fn resumed_run_equals_uninterrupted() {
    let mut src = source;
    let mut a = trainer();
    for _ in 0..6 {
        a.step(64, &mut src).unwrap();
    }
    let mut b = trainer();
    for _ in 0..3 {
        b.step(64, &mut src).unwrap();
    }
    // Through the file format, as a killed run would be resumed.
    let bytes = b.checkpoint().unwrap().to_safetensors(None).unwrap();
    drop(b);
    let mut c = trainer();
    c.restore(&TensorMap::from_safetensors(&bytes).unwrap())
        .unwrap();
    for _ in 0..3 {
        c.step(64, &mut src).unwrap();
    }
    let (pa, pc) = (params(&a), params(&c));
    assert_eq!(pa.tensors.len(), pc.tensors.len());
    for (k, ta) in &pa.tensors {
        assert_eq!(ta.data, pc.tensors[k].data, "{k} differs after resume");
    }
    assert_eq!(pa.metadata.get("rng"), pc.metadata.get("rng"));
    // And the run really moved.
    let fresh = params(&trainer());
    assert!(pa
        .tensors
        .iter()
        .any(|(k, t)| t.data != fresh.tensors[k].data));
}

#[test]
fn checkpoint_of_another_model_is_rejected() {
    let mut src = source;
    let mut a = trainer();
    a.step(64, &mut src).unwrap();
    let mut ck = a.checkpoint().unwrap();
    // Another width: a renamed key and a misshapen tensor are both named.
    let k = "model.hnet.residual_proj.weight".to_string();
    let t = ck.tensors.remove(&k).unwrap();
    let mut other = trainer();
    let e = other.restore(&ck).unwrap_err().to_string();
    assert!(e.contains("hnet.residual_proj.weight"), "{e}");
    let mut bad = t.clone();
    bad.shape = vec![16, 64];
    ck.tensors.insert(k, bad);
    assert!(other
        .restore(&ck)
        .unwrap_err()
        .to_string()
        .contains("residual_proj"));
    // Nothing was half-restored.
    assert_eq!(other.step, 0);
}
