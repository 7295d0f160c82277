//! The DDPM scheduler, respacing, one DDPM and one DDIM step, and the
//! training terms (MSE, variational bound in bits, t = 0 decoder NLL) against
//! `tests/golden/scheduler.json`, written by the repository's PyTorch
//! reference from the release's diffusion code.

use dcdit_core::model::nchw_to_nhwc;
use dcdit_core::objective::{diffusion_loss, DiffusionBatch};
use dcdit_core::scheduler::Ddpm;
use dcdit_tests::repo_root;
use serde_json::Value;

fn golden() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/golden/scheduler.json")).unwrap(),
    )
    .unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(name: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-12),
        "{name}: {got} vs {want}"
    );
}

fn check_tables(name: &str, d: &Ddpm, g: &Value) {
    for key in [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ] {
        let table: &Vec<f64> = match key {
            "betas" => &d.betas,
            "alphas_cumprod" => &d.alphas_cumprod,
            "alphas_cumprod_prev" => &d.alphas_cumprod_prev,
            "posterior_variance" => &d.posterior_variance,
            "posterior_log_variance_clipped" => &d.posterior_log_variance_clipped,
            "posterior_mean_coef1" => &d.posterior_mean_coef1,
            _ => &d.posterior_mean_coef2,
        };
        for (i, want) in g[key].as_object().unwrap() {
            let i: usize = i.parse().unwrap();
            close(
                &format!("{name}.{key}[{i}]"),
                table[i],
                want.as_f64().unwrap(),
                1e-9,
            );
        }
    }
}

#[test]
fn tables_and_respacing_match() {
    let g = golden();
    let base = Ddpm::linear(1000);
    check_tables("linear", &base, &g["linear_T1000"]);
    for s in ["250", "50", "25"] {
        let (d, map) = base.respaced(s).unwrap();
        let want: Vec<usize> = g["respaced"][s]["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(map, want, "respaced {s}: kept timesteps");
        check_tables(&format!("respaced {s}"), &d, &g["respaced"][s]);
    }
}

#[test]
fn one_ddpm_and_one_ddim_step_match() {
    let g = &golden()["sampler_step"];
    let (d, map) = Ddpm::linear(1000).respaced("50").unwrap();
    let (x, eps, v, noise) = (
        f32s(&g["x_t"]),
        f32s(&g["model_eps"]),
        f32s(&g["model_v"]),
        f32s(&g["noise"]),
    );
    for step in g["steps"].as_array().unwrap() {
        let ti = step["t_index"].as_u64().unwrap() as usize;
        assert_eq!(map[ti] as u64, step["t_model"].as_u64().unwrap());
        let mut out = vec![0.0; x.len()];
        d.ddpm_step(&x, &eps, Some(&v), ti, &noise, &mut out);
        for (i, (a, b)) in out
            .iter()
            .zip(f32s(&step["p_sample"]["sample"]))
            .enumerate()
        {
            close(
                &format!("ddpm t_index {ti} [{i}]"),
                *a as f64,
                b as f64,
                1e-5,
            );
        }
        d.ddim_step(&x, &eps, ti, 0.0, &noise, &mut out);
        for (i, (a, b)) in out
            .iter()
            .zip(f32s(&step["ddim_eta0"]["sample"]))
            .enumerate()
        {
            close(
                &format!("ddim t_index {ti} [{i}]"),
                *a as f64,
                b as f64,
                1e-5,
            );
        }
    }
}

#[test]
fn training_terms_match() {
    let g = &golden()["training_terms"];
    let d = dcdit_core::train::training_schedule().unwrap();
    let sx: Vec<usize> = g["shape_x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (c, l) = (sx[1], sx[2] * sx[3]);
    for ex in g["examples"].as_array().unwrap() {
        let t = ex["t"].as_u64().unwrap() as usize;
        let x0 = nchw_to_nhwc(&f32s(&ex["x_start"]), 1, c, l);
        let noise = nchw_to_nhwc(&f32s(&ex["noise"]), 1, c, l);
        let x_t = nchw_to_nhwc(&f32s(&ex["x_t"]), 1, c, l);
        let out = nchw_to_nhwc(&f32s(&ex["model_output"]), 1, 2 * c, l);
        let mut grad = vec![0.0; out.len()];
        let batch = DiffusionBatch {
            x0: &x0,
            noise: &noise,
            x_t: &x_t,
            t: &[t],
            channels: c,
        };
        let (mse, vb) = diffusion_loss(&d, batch, &out, 1.0, &mut grad).unwrap();
        close(
            &format!("mse t={t}"),
            mse as f64,
            ex["mse"].as_f64().unwrap(),
            1e-5,
        );
        close(
            &format!("vb t={t}"),
            vb as f64,
            ex["vb_bits"].as_f64().unwrap(),
            1e-4,
        );
    }
}
