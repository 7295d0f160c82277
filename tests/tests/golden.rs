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
