//! Golden forward cases produced by the repository's PyTorch reference
//! (`tests/reference/make_golden.py`): both routers, odd and non-square
//! grids, per-sample and uniform tail dropping, the null class, f16/bf16
//! weights on disk, the DiT baseline. Outputs within 1e-4, masks identical.

use dcdit_tests::*;

#[test]
fn golden_forward_cases_match() {
    let root = repo_root().join("tests/golden/forward");
    let cases = case_dirs(&root);
    assert!(
        cases.len() >= 6,
        "expected the golden cases in {}",
        root.display()
    );
    for dir in cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let exp = read_map(&dir.join("expected.safetensors"));
        let got = run_forward_case(&dir, 2);
        if let Some(m) = exp.get("boundary_mask") {
            assert_eq!(got.boundary_mask, m.data, "{name}: boundary_mask");
            let rp = assert_close(
                &format!("{name}/boundary_prob"),
                &got.boundary_prob,
                &exp.get("boundary_prob").unwrap().data,
                1e-4,
            );
            eprintln!("golden {name}: boundary_prob rel err {rp:.2e}");
        }
        let ro = assert_close(
            &format!("{name}/out"),
            &got.out,
            &exp.get("out").unwrap().data,
            1e-4,
        );
        eprintln!("golden {name}: out rel err {ro:.2e}");
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let dir = repo_root().join("tests/golden/forward/pred_rect_drop");
    let a = run_forward_case(&dir, 1);
    let b = run_forward_case(&dir, 2);
    assert_eq!(a.boundary_mask, b.boundary_mask);
    let (abs, _) = errors(&a.out, &b.out);
    assert!(abs < 1e-5, "1 vs 2 threads differ by {abs}");
}

/// Mixed precision: with the main network's parameters in bf16 the model
/// casts the packed tokens at the main network's borders, so the encoder
/// and router run in f32 exactly as before (boundary probabilities bitwise
/// equal, same mask) and only the main network's rounding reaches the
/// output (it must, or bf16 did not run).
#[test]
fn main_network_in_bf16_keeps_routing_exact() {
    use dcdit_backend_cpu::CpuBackend;
    use dcdit_core::backend::DType;
    use dcdit_core::Backend;
    let dir = repo_root().join("tests/golden/forward/pred_sq8");
    let b = CpuBackend::with_threads(2);
    let f32_run = run_forward_case_on(&dir, &b, None);
    let mut cast = 0;
    let mixed = run_forward_case_with(&dir, &b, None, |model| {
        let infos = model.params.registry.infos.clone();
        for (p, info) in model.params.tensors.iter_mut().zip(&infos) {
            if info.name.starts_with("hnet.main_network.") {
                *p = b.cast(p, DType::BF16).unwrap();
                cast += 1;
            }
        }
    });
    assert!(cast > 0);
    assert_eq!(mixed.boundary_prob, f32_run.boundary_prob);
    assert_eq!(mixed.boundary_mask, f32_run.boundary_mask);
    let (_, rel) = errors(&mixed.out, &f32_run.out);
    assert!(rel > 0.0 && rel < 2e-2, "bf16 main network: rel err {rel}");
    eprintln!("bf16 main network: output rel err {rel:.2e} vs f32");
}
