//! Shared helpers of the cross-crate tests: loading a forward case in the
//! release's layout, running it, and comparing with tolerances.

use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::Config;
use dcdit_core::model::{Model, TailDrop};
use dcdit_core::weights::TensorMap;
use dcdit_core::Backend;
use std::path::{Path, PathBuf};

pub mod diff;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `../shared/release-cases` beside the checkout, if present.
pub fn release_cases() -> Option<PathBuf> {
    let p = repo_root().join("../shared/release-cases");
    p.is_dir().then_some(p)
}

/// Sub-directories of `dir`, sorted.
pub fn case_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Reads a safetensors file.
pub fn read_map(p: &Path) -> TensorMap {
    TensorMap::from_safetensors(
        &std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The tail-drop setting of a case.json (`{"tail_drop": 0.3}` or a list).
pub fn tail_drop_of(case_json: &str) -> TailDrop {
    let i = case_json
        .find("\"tail_drop\"")
        .expect("case.json has tail_drop");
    let rest = case_json[i + 11..]
        .trim_start()
        .trim_start_matches(':')
        .trim_start();
    if let Some(list) = rest.strip_prefix('[') {
        let end = list.find(']').unwrap();
        let v: Vec<f32> = list[..end]
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        TailDrop::PerSample(v)
    } else {
        let end = rest.find([',', '}']).unwrap();
        let f: f32 = rest[..end].trim().parse().unwrap();
        if f == 0.0 {
            TailDrop::None
        } else {
            TailDrop::Uniform(f)
        }
    }
}

/// Outputs of a forward case.
pub struct CaseOutput {
    /// `(B, Cout, H, W)`.
    pub out: Vec<f32>,
    /// `(B, L)` or empty for DiT.
    pub boundary_prob: Vec<f32>,
    /// `(B, L)` as 0/1 or empty for DiT.
    pub boundary_mask: Vec<f32>,
}

/// Runs the forward case in `dir` (config.yaml, weights, input, case.json) on the CPU backend.
pub fn run_forward_case(dir: &Path, threads: usize) -> CaseOutput {
    run_forward_case_on(dir, &CpuBackend::with_threads(threads), None)
}

/// Runs the forward case in `dir` on any backend, with the case's tail drop
/// or `tail` when given.
pub fn run_forward_case_on<B: Backend>(
    dir: &Path,
    backend: &B,
    tail: Option<TailDrop>,
) -> CaseOutput {
    run_forward_case_with(dir, backend, tail, |_| {})
}

/// [`run_forward_case_on`] with `prepare` applied to the loaded model first
/// (e.g. casting some parameters to another dtype).
pub fn run_forward_case_with<B: Backend>(
    dir: &Path,
    backend: &B,
    tail: Option<TailDrop>,
    prepare: impl FnOnce(&mut Model<B>),
) -> CaseOutput {
    let cfg =
        Config::from_yaml_str(&std::fs::read_to_string(dir.join("config.yaml")).unwrap()).unwrap();
    let w = read_map(&dir.join("weights.safetensors"));
    let inp = read_map(&dir.join("input.safetensors"));
    let tail = tail
        .unwrap_or_else(|| tail_drop_of(&std::fs::read_to_string(dir.join("case.json")).unwrap()));
    let mut model =
        Model::load(backend, &cfg, &w).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    prepare(&mut model);
    let t = &inp.get("t").unwrap().data;
    let y: Vec<u32> = inp
        .get("y")
        .unwrap()
        .data
        .iter()
        .map(|v| *v as u32)
        .collect();
    let x = model
        .input_from_nchw(backend, &inp.get("x").unwrap().data, t.len())
        .unwrap();
    let res = model.forward(backend, &x, t, &y, &tail).unwrap();
    let out = model.output_to_nchw(backend, &res.out, t.len()).unwrap();
    let (bp, bm) = match res.routing {
        Some(r) => (
            r.boundary_prob,
            r.mask.iter().map(|&m| m as u8 as f32).collect(),
        ),
        None => (vec![], vec![]),
    };
    CaseOutput {
        out,
        boundary_prob: bp,
        boundary_mask: bm,
    }
}

/// Max absolute error, and max error relative to the expected tensor's largest magnitude.
pub fn errors(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let abs = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    (abs, abs / scale)
}

/// Asserts every element within `rel * |want| + rel * max|want| * 0.5`, and the
/// scale-relative error within `rel`; returns the scale-relative error. The
/// floor is half the scale-relative tolerance: an output element near zero is
/// a sum of terms as large as the scale, so a reordered f32 sum (another GEMM
/// kernel) moves it by a few ulps of the scale, not of the element.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], rel: f32) -> f32 {
    let (abs, r) = errors(got, want);
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let tol = rel * b.abs() + 0.5 * rel * scale;
        assert!(
            a.is_finite() && (a - b).abs() <= tol,
            "{name}[{i}]: got {a}, want {b} (tol {tol})"
        );
    }
    assert!(
        r <= rel,
        "{name}: max abs error {abs}, relative {r} > {rel}"
    );
    r
}
