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
    forward_case("pred_rect_drop", &[]);
}

/// Whether Vulkan device 0 opens; without one a test is skipped, unless
/// `DCDIT_REQUIRE_VULKAN=1` (then it fails).
fn vulkan_available() -> bool {
    match dcdit_backend_vulkan::VulkanBackend::new(0) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("DCDIT_REQUIRE_VULKAN").map_or(true, |v| v != "1"),
                "DCDIT_REQUIRE_VULKAN=1 but no Vulkan device: {e}"
            );
            eprintln!("SKIPPED (no Vulkan device): {e}");
            false
        }
    }
}

/// `forward --backend vulkan` on every golden case (skipped without a Vulkan
/// device unless `DCDIT_REQUIRE_VULKAN=1`).
#[test]
fn forward_on_vulkan_reproduces_golden_cases() {
    if !vulkan_available() {
        return;
    }
    let mut n = 0;
    for e in std::fs::read_dir(root().join("tests/golden/forward")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        forward_case(&name, &["--backend", "vulkan", "--device", "0"]);
        n += 1;
    }
    assert!(n >= 6);
}

fn forward_case(name: &str, extra: &[&str]) {
    let case = root().join("tests/golden/forward").join(name);
    let out = tmp(&format!("{name}{}.safetensors", extra.len()));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let case_json = std::fs::read_to_string(case.join("case.json")).unwrap();
    let i = case_json.find("\"tail_drop\"").unwrap();
    let rest = case_json[i + 11..].trim_start_matches([' ', ':']);
    let tail = match rest.strip_prefix('[') {
        Some(list) => list[..list.find(']').unwrap()].replace(' ', ""),
        None => rest[..rest.find([',', '}']).unwrap()].trim().to_string(),
    };
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
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect::<Vec<_>>());
    assert!(ok, "{err}");
    let got = TensorMap::from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
    let want =
        TensorMap::from_safetensors(&std::fs::read(case.join("expected.safetensors")).unwrap())
            .unwrap();
    if let Some(m) = want.get("boundary_mask") {
        assert_eq!(got.get("boundary_mask").unwrap().data, m.data, "{name}");
    }
    for k in ["out", "boundary_prob"] {
        if want.get(k).is_none() {
            continue; // DiT: no routing
        }
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
    let (cfg, out_s) = (s(case.join("config.yaml")), s(out.clone()));
    let run = |w: &str, i: &str, extra: &[&str]| {
        let mut a = vec![
            "forward",
            "--config",
            &cfg,
            "--weights",
            w,
            "--input",
            i,
            "--out",
            &out_s,
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

const TINY_MNIST: &str = r#"
model:
  in_channels: 1
  hnet: { arch_layout: ["c1", ["D1"], "c1"], d_model: [32, 32], num_heads: [2, 2] }
training:
  global_batch_size: 4
  learning_rate: 0.001
  ema_decay: 0.9
  ratio_batch_size: 2
  multi_budget_training: true
  multi_budget_start_step: 3
  seed: 3
  steps: 40
  log_every: 5
  ckpt_every: 2
data: { source: mnist, latent_height: 28, latent_width: 28, num_classes: 10 }
"#;

fn checkpoint_tensors(dir: &Path) -> TensorMap {
    TensorMap::from_safetensors(&std::fs::read(dir.join("checkpoint.safetensors")).unwrap())
        .unwrap()
}

#[test]
fn killed_training_resumes_to_the_same_weights() {
    let base = tmp("train-kill");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let cfg = base.join("tiny.yaml");
    std::fs::write(&cfg, TINY_MNIST).unwrap();
    let (a, b) = (base.join("a"), base.join("b"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, _, err) = cli(&["train", "--config", &s(&cfg), "--out", &s(&a), "--quiet"]);
    assert!(ok, "{err}");

    // Kill -9 a second run as soon as its first checkpoint exists, then resume.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcdit-cli"))
        .args(["train", "--config", &s(&cfg), "--out", &s(&b), "--quiet"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !b.join("checkpoint.safetensors").exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at: u64 = checkpoint_tensors(&b).metadata["step"].parse().unwrap();
    assert!(killed_at < 40, "the run finished before it could be killed");
    // A fresh run into the same directory must not overwrite it.
    let (ok, _, err) = cli(&["train", "--config", &s(&cfg), "--out", &s(&b), "--quiet"]);
    assert!(!ok && err.contains("--resume"), "{err}");
    let (ok, _, err) = cli(&["train", "--resume", &s(&b), "--quiet"]);
    assert!(ok, "{err}");
    let (ca, cb) = (checkpoint_tensors(&a), checkpoint_tensors(&b));
    assert_eq!(cb.metadata["step"], "40");
    for (k, t) in &ca.tensors {
        assert_eq!(
            t.data, cb.tensors[k].data,
            "{k} differs (killed at step {killed_at})"
        );
    }
    // Corrupt checkpoint: a clear error, and the file is left as it was.
    let ck = b.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = cli(&["train", "--resume", &s(&b), "--steps", "50", "--quiet"]);
    assert!(!ok && err.contains("invalid file"), "{err}");
    assert_eq!(std::fs::read(&ck).unwrap().len(), bytes.len() / 2);
}

#[test]
fn grad_command_matches_golden_gradients() {
    let case = root().join("tests/golden/grad/grad_pred");
    let out = tmp("grad_pred.safetensors");
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let (ok, _, err) = cli(&[
        "grad",
        "--config",
        &s(case.join("config.yaml")),
        "--weights",
        &s(case.join("weights.safetensors")),
        "--batch",
        &s(case.join("batch.safetensors")),
        "--out",
        &s(out.clone()),
    ]);
    assert!(ok, "{err}");
    let got = TensorMap::from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
    let want =
        TensorMap::from_safetensors(&std::fs::read(case.join("expected.safetensors")).unwrap())
            .unwrap();
    assert_eq!(got.tensors.len(), want.tensors.len());
    for (k, w) in &want.tensors {
        let g = &got.tensors[k];
        let scale = w.data.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = g
            .data
            .iter()
            .zip(&w.data)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale.max(1e-3), "{k}: {err} (scale {scale})");
    }
}

/// Where Debian's `vulkan-validationlayers` installs the Khronos layer.
const VALIDATION_LAYER: &str = "/usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json";

/// Runs the CLI under the Khronos validation layer with synchronisation
/// validation on; returns (success, stdout + stderr).
fn cli_validated(args: &[&str], fault: bool) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dcdit-cli"));
    c.args(args)
        .env("VK_INSTANCE_LAYERS", "VK_LAYER_KHRONOS_validation")
        .env(
            "VK_LAYER_ENABLES",
            "VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT",
        );
    if fault {
        c.env("DCDIT_VK_FAULT_NO_BARRIERS", "1");
    }
    let o = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// The Vulkan backend records a barrier only where a command depends on one
/// before it; the Khronos validation layer's synchronisation validation
/// checks every command of a forward, two gradient computations and a short
/// training run (AdamW, EMA, checkpoint reads) for read/write hazards. The
/// same run with barriers deliberately left out must be caught, so the check
/// cannot pass vacuously. Skipped without a Vulkan device or the layer unless
/// `DCDIT_REQUIRE_VULKAN=1` (then both must be there).
#[test]
fn vulkan_commands_pass_synchronization_validation() {
    if !vulkan_available() {
        return;
    }
    if !Path::new(VALIDATION_LAYER).exists() {
        let why = format!(
            "no validation layer at {VALIDATION_LAYER} (apt-get install vulkan-validationlayers)"
        );
        let required = std::env::var("DCDIT_REQUIRE_VULKAN").is_ok_and(|v| v == "1");
        assert!(!required, "DCDIT_REQUIRE_VULKAN=1 but {why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let fwd = root().join("tests/golden/forward/pred_rect_drop");
    let fwd_args = [
        "forward".to_string(),
        "--config".into(),
        s(&fwd.join("config.yaml")),
        "--weights".into(),
        s(&fwd.join("weights.safetensors")),
        "--input".into(),
        s(&fwd.join("input.safetensors")),
        "--out".into(),
        s(&tmp("sync-fwd.safetensors")),
        "--backend".into(),
        "vulkan".into(),
    ];
    let mut runs: Vec<Vec<String>> = vec![fwd_args.to_vec()];
    for case in ["grad_pred", "grad_cos_drop"] {
        let d = root().join("tests/golden/grad").join(case);
        runs.push(vec![
            "grad".into(),
            "--config".into(),
            s(&d.join("config.yaml")),
            "--weights".into(),
            s(&d.join("weights.safetensors")),
            "--batch".into(),
            s(&d.join("batch.safetensors")),
            "--out".into(),
            s(&tmp(&format!("sync-{case}.safetensors"))),
            "--backend".into(),
            "vulkan".into(),
        ]);
    }
    let base = tmp("sync-train");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let cfg = base.join("tiny.yaml");
    std::fs::write(&cfg, TINY_MNIST).unwrap();
    runs.push(vec![
        "train".into(),
        "--config".into(),
        s(&cfg),
        "--out".into(),
        s(&base.join("run")),
        "--steps".into(),
        "3".into(),
        "--quiet".into(),
        "--backend".into(),
        "vulkan".into(),
    ]);
    for args in &runs {
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let _ = std::fs::remove_dir_all(base.join("run"));
        let (ok, text) = cli_validated(&args, false);
        assert!(ok, "{args:?} failed:\n{text}");
        assert!(
            !text.contains("Validation Error") && !text.contains("SYNC-HAZARD"),
            "{args:?}: the validation layer reports:\n{}",
            &text[..text.len().min(4000)]
        );
    }
    // The negative control: the same gradient computation without barriers.
    let args: Vec<&str> = runs[1].iter().map(|a| a.as_str()).collect();
    let (_, text) = cli_validated(&args, true);
    assert!(
        text.contains("SYNC-HAZARD"),
        "without barriers the validation layer should report hazards; it printed:\n{}",
        &text[..text.len().min(4000)]
    );
}

/// Loss terms per logged step of a run's `log.txt`.
fn logged_losses(run: &Path) -> Vec<(u64, [f64; 4])> {
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    log.lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let val = |key: &str| -> f64 {
                let i = f.iter().position(|w| *w == key).unwrap();
                f[i + 1].parse().unwrap()
            };
            (
                f[1].parse().unwrap(),
                [val("loss"), val("mse"), val("vb"), val("ratio")],
            )
        })
        .collect()
}

/// `train --backend vulkan` on a small MNIST config logs the CPU run's loss
/// terms step for step (every step logged; the log prints 5 decimals, so
/// equal to that rounding up to one unit), and `sample --backend vulkan`
/// writes the three pictures. Skipped without a Vulkan device unless
/// `DCDIT_REQUIRE_VULKAN=1`.
#[test]
fn vulkan_training_matches_cpu_step_for_step_and_samples() {
    if !vulkan_available() {
        return;
    }
    let base = tmp("train-vk");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let cfg = base.join("tiny.yaml");
    std::fs::write(&cfg, TINY_MNIST.replace("log_every: 5", "log_every: 1")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |dir: &Path, backend: &str| {
        let (ok, _, err) = cli(&[
            "train",
            "--config",
            &s(&cfg),
            "--out",
            &s(dir),
            "--steps",
            "6",
            "--quiet",
            "--backend",
            backend,
        ]);
        assert!(ok, "{backend}: {err}");
        logged_losses(dir)
    };
    let cpu = run(&base.join("cpu"), "cpu");
    let vk = run(&base.join("vk"), "vulkan");
    assert_eq!(cpu.len(), 6, "one log line per step");
    assert_eq!(
        cpu.iter().map(|c| c.0).collect::<Vec<_>>(),
        vk.iter().map(|v| v.0).collect::<Vec<_>>()
    );
    for ((step, c), (_, v)) in cpu.iter().zip(&vk) {
        for (k, (a, b)) in ["loss", "mse", "vb", "ratio"].iter().zip(c.iter().zip(v)) {
            assert!(
                (a - b).abs() <= 1.01e-5 + 1e-4 * a.abs(),
                "step {step} {k}: cpu {a} vs vulkan {b}"
            );
        }
    }
    let out = base.join("samples");
    let (ok, _, err) = cli(&[
        "sample",
        "--ckpt",
        &s(&base.join("vk/ema.safetensors")),
        "--steps",
        "3",
        "--labels",
        "0,1",
        "--per-class",
        "1",
        "--out",
        &s(&out),
        "--backend",
        "vulkan",
    ]);
    assert!(ok, "{err}");
    for f in ["sample.png", "chunking_viz.png", "compression.png"] {
        let bytes = std::fs::read(out.join(f)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{f} is not a PNG");
    }
}
