//! The `dcdit-cli` binary end to end: `forward` reproduces a golden case,
//! `inspect` reports the paper's parameter count, and bad input fails with a
//! clear message, a non-zero exit and no output file.

use dcdit_core::weights::TensorMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dcdit-cli"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dcdit-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn forward_reproduces_golden_case() {
    let case = root().join("tests/golden/forward/pred_rect_drop");
    let out = tmp("pred_rect_drop.safetensors");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let case_json = std::fs::read_to_string(case.join("case.json")).unwrap();
    let i = case_json.find("\"tail_drop\"").unwrap();
    let rest = case_json[i + 11..].trim_start_matches([' ', ':']);
    let tail = rest[..rest.find([',', '}']).unwrap()].trim().to_string();
    let (ok, _, err) = cli(&[
        "forward",
        "--config",
        &s(&case.join("config.yaml")),
        "--weights",
        &s(&case.join("weights.safetensors")),
        "--input",
        &s(&case.join("input.safetensors")),
        "--out",
        &s(&out),
        "--tail-drop",
        &tail,
    ]);
    assert!(ok, "{err}");
    let got = TensorMap::from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
    let want =
        TensorMap::from_safetensors(&std::fs::read(case.join("expected.safetensors")).unwrap())
            .unwrap();
    assert_eq!(
        got.get("boundary_mask").unwrap().data,
        want.get("boundary_mask").unwrap().data
    );
    for k in ["out", "boundary_prob"] {
        let (g, w) = (&got.get(k).unwrap().data, &want.get(k).unwrap().data);
        assert_eq!(got.get(k).unwrap().shape, want.get(k).unwrap().shape, "{k}");
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{k}: max error {err} (scale {scale})");
    }
}

#[test]
fn inspect_reports_dcdit_b_parameter_count() {
    let (ok, out, err) = cli(&[
        "inspect",
        "--config",
        root().join("configs/DCDiT-B-N4.yaml").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("trainable parameters: 136343049"), "{out}");
    assert!(out.contains("fixed position table: 786432"), "{out}");
}

#[test]
fn bad_input_fails_cleanly_without_output() {
    let case = root().join("tests/golden/forward/pred_sq8");
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    // Truncated weights.
    let bytes = std::fs::read(case.join("weights.safetensors")).unwrap();
    let trunc = tmp("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    let out = tmp("never.safetensors");
    let _ = std::fs::remove_file(&out);
    let run = |w: &str, i: &str, extra: &[&str]| {
        let mut a = vec![
            "forward",
            "--config",
            &*Box::leak(s(case.join("config.yaml")).into_boxed_str()),
            "--weights",
            w,
            "--input",
            i,
            "--out",
            &*Box::leak(s(out.clone()).into_boxed_str()),
        ];
        a.extend_from_slice(extra);
        cli(&a)
    };
    let inp = s(case.join("input.safetensors"));
    let w = s(case.join("weights.safetensors"));
    for (weights, input, extra, needle) in [
        (s(trunc.clone()), inp.clone(), vec![], "invalid file"),
        (
            w.clone(),
            s(case.join("config.yaml")),
            vec![],
            "invalid file",
        ),
        (
            w.clone(),
            s(case.join("missing.safetensors")),
            vec![],
            "reading",
        ),
        (
            w.clone(),
            inp.clone(),
            vec!["--tail-drop", "abc"],
            "not a number",
        ),
        (
            w.clone(),
            inp.clone(),
            vec!["--tail-drop", "0.1,0.2"],
            "tail-drop fractions",
        ),
        (
            w.clone(),
            inp.clone(),
            vec!["--tail-drop", "2"],
            "not in [0, 1]",
        ),
    ] {
        let (ok, _, err) = run(&weights, &input, &extra);
        assert!(!ok, "accepted {weights} {input} {extra:?}");
        assert!(err.contains("error:") && err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "a failed run left {}", out.display());
    }
}
