//! The ground truth: forward cases computed by the authors' PyTorch release
//! (`../shared/release-cases`), matched to 1e-5.

use dcdit_tests::*;

#[test]
fn release_forward_cases_match() {
    let Some(root) = release_cases() else {
        eprintln!("SKIPPED: ../shared/release-cases not found beside the checkout");
        return;
    };
    let cases = case_dirs(&root.join("forward"));
    assert!(!cases.is_empty(), "no release forward cases");
    for dir in cases {
        let exp = read_map(&dir.join("expected.safetensors"));
        let got = run_forward_case(&dir, 2);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(got.boundary_mask, exp.get("boundary_mask").unwrap().data, "{name}: boundary_mask");
        let rp = assert_close(&format!("{name}/boundary_prob"), &got.boundary_prob, &exp.get("boundary_prob").unwrap().data, 1e-5);
        let ro = assert_close(&format!("{name}/out"), &got.out, &exp.get("out").unwrap().data, 1e-5);
        eprintln!("release case {name}: boundary_prob rel err {rp:.2e}, out rel err {ro:.2e}");
    }
}
