"""Write tests/golden/scheduler.json: diffusion schedule tables, respacing, one sampler
step (DDPM and DDIM) and the training terms (mse, vb in bits), computed with the
reference (dcdit_ref.Diffusion), which follows the release's diffusion code:

* tables in float64 (numpy); every value used on tensors is gathered and cast to f32
  first (the release's _extract_into_tensor), so sampler steps and loss terms are f32;
* respacing with the release's space_timesteps(1000, "S") (sample.py passes "250");
  the respaced process calls the model with the ORIGINAL timestep (timestep_map[i]);
* sampling without clipping of x0 (sample.py: clip_denoised=False).

    python3 tests/reference/scheduler_golden.py
"""

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dcdit_ref as R  # noqa: E402

OUT = os.path.normpath(os.path.join(HERE, "..", "golden", "scheduler.json"))


def f64(a, idx):
    return {str(i): float(a[i]) for i in idx}


def lst(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def tables(d, idx):
    return {
        "betas": f64(d.betas, idx),
        "alphas_cumprod": f64(d.alphas_cumprod, idx),
        "alphas_cumprod_prev": f64(d.alphas_cumprod_prev, idx),
        "posterior_variance": f64(d.posterior_variance, idx),
        "posterior_log_variance_clipped": f64(d.posterior_log_variance_clipped, idx),
        "posterior_mean_coef1": f64(d.posterior_mean_coef1, idx),
        "posterior_mean_coef2": f64(d.posterior_mean_coef2, idx),
    }


def main():
    g = torch.Generator().manual_seed(31337)
    doc = {
        "note": ("Tables are float64. Sampler steps and training terms are f32, computed as the "
                 "release does: table values gathered at t and cast to f32, then f32 tensor "
                 "arithmetic. Tensors are flattened row-major from the given shape."),
    }
    base = R.Diffusion.linear(1000)
    idx = [0, 1, 2, 500, 998, 999]
    doc["linear_T1000"] = {"T": 1000, "beta_start": 1e-4, "beta_end": 0.02, "indices": idx,
                           **tables(base, idx)}

    resp = {}
    for S in (250, 50, 25):
        d = R.Diffusion.respaced(1000, str(S))
        ii = [0, 1, 2, S // 2, S - 2, S - 1]
        e = {"spacing": str(S), "timesteps": d.timestep_map, "indices": ii, **tables(d, ii)}
        if S == 25:
            e["note"] = ("999/24 = 41.625: i=4 gives 166.5 and i=20 gives 832.5; the release uses "
                         "Python round() (half to even) on an accumulated float, giving 166 and "
                         "832 (round-half-up would give 167 and 833)")
        resp[str(S)] = e
    doc["respaced"] = resp

    # ---- one sampler step on the 50-step respaced schedule, index 10 ---------------------
    d50 = R.Diffusion.respaced(1000, "50")
    shape = [1, 4, 2, 2]
    x_t = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    v = torch.tanh(torch.randn(shape, generator=g))  # learned-range values in [-1, 1]
    noise = torch.randn(shape, generator=g)
    steps = []
    for i in (10, 0):
        t = torch.tensor([i])
        mo = torch.cat([eps, v], 1)
        samp, o = d50.p_sample(mo, x_t, t, noise)
        ddim, o2 = d50.ddim_sample(mo, x_t, t, eta=0.0)
        steps.append({
            "t_index": i, "t_model": d50.timestep_map[i],
            "p_sample": {"mean": lst(o["mean"]), "log_variance": lst(o["log_variance"]),
                         "pred_xstart": lst(o["pred_xstart"]), "sample": lst(samp)},
            "ddim_eta0": {"pred_xstart": lst(o2["pred_xstart"]), "sample": lst(ddim)},
        })
    doc["sampler_step"] = {
        "schedule": "respaced 50 of 1000 (space_timesteps(1000, '50'))",
        "shape": shape, "x_t": lst(x_t), "model_eps": lst(eps), "model_v": lst(v),
        "noise": lst(noise),
        "description": ("model output = cat(eps, v) on channels (learned range); "
                        "p_sample: sample = mean + [t != 0] * exp(0.5 log_variance) * noise; "
                        "DDIM eta 0 is deterministic"),
        "steps": steps,
    }

    # ---- training terms (T=1000) ---------------------------------------------------------
    ex = []
    shape = [1, 2, 2, 2]
    for t_val in (0, 1, 500, 999):
        x0 = torch.randn(shape, generator=g) * 1.5
        x0.view(-1)[0] = 1.2     # > 0.999: the discretised likelihood's upper branch
        x0.view(-1)[1] = -1.05   # < -0.999: its lower branch
        nz = torch.randn(shape, generator=g)
        t = torch.tensor([t_val])
        xt = base.q_sample(x0, t, nz)
        out = torch.cat([nz + 0.3 * torch.randn(shape, generator=g),
                         torch.tanh(torch.randn(shape, generator=g))], 1)
        mse, vb = base.training_terms(out, x0, xt, t, nz)
        ex.append({"t": t_val, "x_start": lst(x0), "noise": lst(nz), "x_t": lst(xt),
                   "model_output": lst(out), "mse": float(mse.item()), "vb_bits": float(vb.item())})
    doc["training_terms"] = {
        "schedule": "linear T=1000", "shape_x": shape, "shape_model_output": [1, 4, 2, 2],
        "description": ("x_t = sqrt(abar_t) x_start + sqrt(1-abar_t) noise (f32); model_output = "
                        "cat(eps, v); mse = mean((noise - eps)^2); vb_bits = KL(q(x_{t-1}|x_t,x0) "
                        "|| p) / ln 2 averaged over elements for t > 0, discretised-Gaussian "
                        "decoder NLL / ln 2 for t == 0 (x_start values beyond +-0.999 use the "
                        "one-sided branches)"),
        "examples": ex,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
