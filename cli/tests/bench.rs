//! `dcdit-cli bench` end to end on a tiny model: it runs every workload,
//! prints its tables and writes its JSON. Nothing here depends on timings.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn bench(extra: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dcdit-cli"))
        .current_dir(root())
        .args([
            "bench",
            "--config",
            "tests/golden/forward/pred_sq8/config.yaml",
            "--train-config",
            "configs/mnist.yaml",
            "--train-batch",
            "2",
            "--batch",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--peak-sizes",
            "64",
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dcdit-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn bench_runs_every_workload_and_prints_its_table() {
    let json = tmp("bench.json");
    let (ok, out, err) = bench(&["--json", json.to_str().unwrap()]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        "forward keep0.25",
        "forward bf16",
        "train-step",
        "gemm:",
        "main_network",
        "workload",
        "forward f32, 25.00% kept",
        "forward f32, 6.25% kept",
        "train step, batch 2",
        "train-step per-op profile",
        "attention_backward",
        "forward bf16 vs PyTorch f32",
        "wall-time saving / FLOP saving",
        "GEMM at the model's shapes",
        "run with --against-pytorch",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["dcdit"]["forward"].as_array().unwrap().len(), 3);
    assert_eq!(v["table"].as_array().unwrap().len(), 7);
    // The router bias shift reaches the asked fractions on the 2 x 64 tokens.
    let kept: Vec<u64> = v["dcdit"]["forward"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["kept"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, vec![32, 16, 8]);
    assert!(v["pytorch"].is_null());
    let comps = v["dcdit"]["forward"][0]["components"].as_array().unwrap();
    assert_eq!(comps.len(), 8);
    assert!(comps.iter().all(|c| c["seconds"].as_f64().unwrap() >= 0.0));
}

/// `--rounds 2`: every workload twice, each round's table, then the median
/// rounds' table with every round's ratio; the JSON keeps both rounds.
#[test]
fn bench_rounds_repeat_the_workloads() {
    let json = tmp("bench-rounds.json");
    let (ok, out, err) = bench(&[
        "--workloads",
        "forward",
        "--keep",
        "0.5",
        "--rounds",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        "round 1 of 2",
        "round 2 of 2",
        "the round with the median ratio",
        "rounds: - -",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds
        .iter()
        .all(|r| r["dcdit"]["forward"].as_array().unwrap().len() == 1));
    assert_eq!(v["table"][0]["ratios"], serde_json::json!([null, null]));
    let (ok, _, err) = bench(&["--rounds", "0"]);
    assert!(!ok);
    assert!(err.contains("--rounds"), "{err}");
}

/// The Vulkan workload: the MNIST forward on the device next to the CPU,
/// outputs within f32 rounding. Skipped without a device unless
/// `DCDIT_REQUIRE_VULKAN=1` (as in CI, on lavapipe).
#[test]
fn bench_vulkan_forward_matches_cpu() {
    let json = tmp("bench-vk.json");
    let (ok, out, err) = bench(&["--workloads", "vulkan", "--json", json.to_str().unwrap()]);
    if !ok
        && err.contains("ulkan")
        && std::env::var("DCDIT_REQUIRE_VULKAN").map_or(true, |v| v != "1")
    {
        eprintln!("SKIPPED (no Vulkan device): {err}");
        return;
    }
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("vulkan forward (configs/mnist.yaml, batch 2)"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let d = v["dcdit"]["vulkan"]["max_rel_diff"].as_f64().unwrap();
    assert!(d < 1e-4, "Vulkan vs CPU forward: {d}");
    assert!(v["dcdit"]["vulkan"]["vulkan_s"]["median"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_without_python_says_what_to_install() {
    let (ok, out, err) = bench(&[
        "--workloads",
        "gemm",
        "--against-pytorch",
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(!ok, "{out}");
    assert!(err.contains("cannot run `/nonexistent/python3`"), "{err}");
    assert!(err.contains("pip install torch"), "{err}");
}

#[test]
fn bench_rejects_bad_arguments() {
    let (ok, _, err) = bench(&["--keep", "0"]);
    assert!(!ok);
    assert!(err.contains("--keep"), "{err}");
}

/// The PyTorch side on the tiny model (needs python3 with torch, safetensors,
/// pyyaml and numpy; about a minute): `cargo test -p dcdit-cli --test bench -- --ignored`.
#[test]
#[ignore]
fn bench_against_pytorch_tiny() {
    let json = tmp("bench-torch.json");
    let (ok, out, err) = bench(&["--against-pytorch", "--json", json.to_str().unwrap()]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for w in v["pytorch"]["forward"].as_array().unwrap() {
        assert_eq!(w["mask_agrees"], true, "{w}");
        assert!(w["rel_err_vs_rust"].as_f64().unwrap() < 1e-4, "{w}");
    }
    // Same batch on both sides: the first step's loss agrees.
    let a = v["dcdit"]["train"]["first_loss"].as_f64().unwrap();
    let b = v["pytorch"]["train"]["first_loss"].as_f64().unwrap();
    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    assert!(v["table"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| !r["pytorch"].is_null()));
    // The forward and training rows also compare the two sides' fastest runs.
    for r in v["table"].as_array().unwrap() {
        let w = r["workload"].as_str().unwrap();
        if w.starts_with("forward f32") || w.starts_with("train step") {
            assert!(r["ratio_of_minima"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
}
