//! Loss terms and every parameter's gradient of a training batch, against
//! PyTorch autograd: the release's own case (`../shared/release-cases/grad`)
//! and the repository's goldens (both routers, with and without tail
//! dropping, loss terms evaluated in f64 by the reference), within 1e-4
//! relative to each gradient tensor's scale.

use dcdit_autodiff::Autodiff;
use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::Config;
use dcdit_core::train::{batch_gradients, Batch};
use dcdit_tests::*;
use std::path::Path;

/// `terms_tol` for loss/mse/vb/ratio, `tol` for the gradients.
fn check_case(dir: &Path, terms_tol: f32, tol: f32) {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let cfg =
        Config::from_yaml_str(&std::fs::read_to_string(dir.join("config.yaml")).unwrap()).unwrap();
    let w = read_map(&dir.join("weights.safetensors"));
    let b = read_map(&dir.join("batch.safetensors"));
    let exp = read_map(&dir.join("expected.safetensors"));
    let tail = tail_drop_of(&std::fs::read_to_string(dir.join("case.json")).unwrap());
    let ints = |k: &str| {
        b.get(k)
            .unwrap()
            .data
            .iter()
            .map(|v| *v as u32)
            .collect::<Vec<u32>>()
    };
    let batch = Batch {
        x0: b.get("x").unwrap().data.clone(),
        t: ints("t").into_iter().map(|v| v as usize).collect(),
        y: ints("y"),
        noise: b.get("noise").unwrap().data.clone(),
    };
    let ad = Autodiff::new(CpuBackend::with_threads(2));
    let (terms, grads) =
        batch_gradients(&ad, &cfg, &w, &batch, &tail).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (k, v) in [
        ("loss", terms.loss),
        ("mse", terms.mse),
        ("vb", terms.vb),
        ("ratio", terms.ratio),
    ] {
        let want = exp.get(k).unwrap().data[0];
        assert!(
            (v - want).abs() <= terms_tol * want.abs().max(1e-3),
            "{name}/{k}: {v} vs {want}"
        );
    }
    let mut worst = (0.0f32, String::new());
    let mut compared = 0;
    for (k, want) in exp.tensors.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let got = grads.get(k).unwrap_or_else(|| panic!("{name}: no {k}"));
        assert_eq!(got.shape, want.shape, "{name}/{k}");
        let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if scale < 1e-6 {
            // Mathematically zero (e.g. a bias right before a GroupNorm): round-off only.
            let (abs, _) = errors(&got.data, &want.data);
            assert!(abs < 1e-5, "{name}/{k}: expected ~0, got max {abs}");
            continue;
        }
        let (_, rel) = errors(&got.data, &want.data);
        if rel > worst.0 {
            worst = (rel, k.clone());
        }
        assert!(rel <= tol, "{name}/{k}: relative error {rel} > {tol}");
        compared += 1;
    }
    assert_eq!(
        grads.tensors.len(),
        exp.tensors
            .keys()
            .filter(|k| k.starts_with("grad."))
            .count(),
        "{name}: gradient count"
    );
    eprintln!(
        "grad case {name}: loss {:.6}, {compared} gradients, worst {:.2e} ({})",
        terms.loss, worst.0, worst.1
    );
}

#[test]
fn golden_gradients_match_pytorch() {
    let cases = case_dirs(&repo_root().join("tests/golden/grad"));
    assert!(cases.len() >= 2);
    for dir in cases {
        check_case(&dir, 1e-5, 1e-4);
    }
}

#[test]
fn release_gradient_case_matches() {
    let Some(root) = release_cases() else {
        eprintln!("SKIPPED: ../shared/release-cases not found beside the checkout");
        return;
    };
    // The release evaluates the loss in f32. At t = 0 its discretised-Gaussian
    // NLL takes the log of a difference of two nearly equal cdf values, and its
    // gradient w.r.t. that sample's output is 1.35e-3 (relative) away from the
    // f64 value (measured with the reference script: f32 vs f64 autograd of the
    // same output). dcdit evaluates the loss in f64, so on this case (t[0] = 0)
    // gradients agree to that round-off, not to 1e-4; the repository's goldens,
    // whose loss the reference evaluates in f64, hold 1e-4.
    for dir in case_dirs(&root.join("grad")) {
        check_case(&dir, 1e-4, 1e-3);
    }
}
