"""Generate this project's golden cases with the plain-PyTorch reference (dcdit_ref.py).

    pip install torch safetensors pyyaml numpy
    python3 tests/reference/make_golden.py            # writes tests/golden/{forward,grad}/...
    python3 tests/reference/make_golden.py dit_p2 pred_e64   # only these cases (the others'
                                                             # files and summary entries stay)

Deterministic: every case has a fixed seed (torch.Generator on the CPU), and the search
for a router bias / cosine-router scale is a deterministic scan. The layout of every case
is that of the release cases (/work/shared/release-cases, see README.md next to this file).
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dcdit_ref as R  # noqa: E402

GOLDEN = os.path.normpath(os.path.join(HERE, "..", "golden"))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# Config / weights / inputs
# --------------------------------------------------------------------------------------


def cfg_dict(*, d=32, heads=4, factor=None, layout=("c1", "D1", "c1"), router=None, grid=(8, 8),
             num_classes=10, learn_sigma=True, name=None, patch_size=None, mlp_ratio=4.0,
             sigma=1.0, training=None):
    H, W = grid
    hnet = {
        "arch_layout": [layout[0], [layout[1]], layout[2]] if len(layout) == 3 else [layout[0]],
        "d_model": [d, d],
        "num_heads": [heads, heads],
        "enc_dec_dim_factor": factor,
        "dechunk_kernel_sigma": float(sigma),
        "fp32_router_dechunk": True,
    }
    if router is not None:
        hnet["router"] = router
    model = {"hnet": hnet, "mlp_ratio": float(mlp_ratio)}
    if name is not None:
        model["name"] = name
    if patch_size is not None:
        model["patch_size"] = patch_size
    tr = {"learn_sigma": learn_sigma, "class_dropout_prob": 0.1}
    if training:
        tr.update(training)
    data = {"image_size": 8 * max(H, W), "num_classes": num_classes}
    if H != W:
        data["latent_height"] = H
        data["latent_width"] = W
    return {"model": model, "training": tr, "data": data}


def random_state(model, g):
    """Random values for every parameter (sorted key order, so the draw is stable)."""
    sd = model.state_dict()
    out = {}
    for k in sorted(sd):
        v = sd[k]
        if k == "pos_embed":
            out[k] = v.clone()
            continue
        shape = v.shape
        is_norm = any(s in k for s in ("norm1", "norm2", "rmsnorm", "residual_scorer.1"))
        if k.endswith("bias"):
            w = 0.1 * torch.randn(shape, generator=g)
        elif is_norm:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("k_smooth.weight"):
            w = 1.0 / 9.0 + 0.05 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            w = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            w = 0.1 * torch.randn(shape, generator=g)
        out[k] = w.float()
    return out


def rounded(sd, dtype):
    """Round to the on-disk dtype (pos_embed always stays f32) and back to f32."""
    return {k: (v if k == "pos_embed" else v.to(DTYPES[dtype]).float()) for k, v in sd.items()}


def on_disk(sd, dtype):
    return {k: (v.float().contiguous() if k == "pos_embed" else v.to(DTYPES[dtype]).contiguous())
            for k, v in sd.items()}


def make_model(cfg, sd):
    m = R.build_model(cfg)
    R.load_weights(m, sd)
    m.eval()
    return m


# --------------------------------------------------------------------------------------
# Router tuning and robustness checks
# --------------------------------------------------------------------------------------


@torch.no_grad()
def router_logits(model, x, t, y):
    """Pre-sigmoid logits of the predictability router (with whatever bias is loaded)."""
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.hnet.encoder(model.x_embedder.proj(x), c)
    B, L, D = h.shape
    H, W = x.shape[2], x.shape[3]
    rm = model.hnet.routing_module
    z = rm.proj(h.transpose(1, 2).reshape(B, D, H, W))
    u = z - rm.context_predictor(z)
    return rm.residual_scorer(u).reshape(B, L)


def interior(t):
    return t[:, 1:-1]


def choose_bias(logit0, dtype, lo=0.25, hi=0.55, spread=False):
    """Candidate biases (exactly representable in the storage dtype) sorted by decreasing
    margin min|logit0 + b| over the non-forced tokens, subject to the boundary fraction.
    With spread=True, candidates with a margin >= 1e-3 come first, ordered by the spread
    of the per-sample boundary counts (max/min)."""
    li = interior(logit0).double()
    v = li.flatten()
    cands = []
    for b in np.linspace(-float(v.max()), -float(v.min()), 4001):
        bq = float(torch.tensor(b).to(DTYPES[dtype]).float())
        l = v + bq
        frac = (l > 0).double().mean().item()
        if lo <= frac <= hi:
            counts = ((li + bq) > 0).sum(1) + 2
            sp = (counts.max() / counts.min()).item()
            cands.append((l.abs().min().item(), bq, frac, sp))
    if spread:
        cands.sort(key=lambda c: (c[0] < 1e-3, -c[3], -c[0]))
    else:
        cands.sort(key=lambda c: -c[0])
    seen, out = set(), []
    for c in cands:
        if c[1] not in seen:
            seen.add(c[1])
            out.append(c)
    return out


def margins_ok(p, natural, tail, min_half=1e-4, min_gap=1e-5):
    """True when no decision of the router depends on round-off:
    every non-forced |p - 0.5| >= min_half, no non-forced p within 1e-6 of 0 or 1 (clamp
    and saturation), and the tail-drop cut never separates two nearly equal p (exact ties
    are only allowed between the two forced ends, whose p is exactly 1)."""
    B, L = p.shape
    pi = interior(p)
    if (pi - 0.5).abs().min().item() < min_half:
        return False, f"|p-0.5| = {(pi - 0.5).abs().min().item():.2e}"
    if pi.max().item() > 1 - 1e-6 or pi.min().item() < 1e-6:
        return False, "saturated p"
    fr = tail if isinstance(tail, (list, tuple)) else [tail] * B
    for b in range(B):
        idx = torch.nonzero(natural[b]).flatten()
        n = len(idx)
        n_drop = int((torch.tensor(float(n)) * torch.tensor(float(fr[b]))).floor().item())
        if n_drop <= 0 or n_drop >= n:
            continue
        vals = p[b, idx]
        order = torch.argsort(vals, stable=True)
        a, c = order[n_drop - 1], order[n_drop]
        gap = (vals[c] - vals[a]).item()
        forced = {0, L - 1}
        if gap < min_gap and not (int(idx[a]) in forced and int(idx[c]) in forced):
            return False, f"tail cut gap {gap:.2e} in sample {b}"
    return True, ""


# --------------------------------------------------------------------------------------
# Writing cases
# --------------------------------------------------------------------------------------


def write_common(d, cfgd, sd, dtype):
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        yaml.safe_dump(cfgd, f, sort_keys=False, default_flow_style=None)
    save_file(on_disk(sd, dtype), os.path.join(d, "weights.safetensors"))
    # what a loader sees: the file's values upcast to f32
    back = {k: v.float() for k, v in load_file(os.path.join(d, "weights.safetensors")).items()}
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    return back


def dir_size(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


SUMMARY = []
ONLY = set()  # case names given on the command line (empty: regenerate every case)
OLD_SUMMARY = {}


def keep_summary(kind, name):
    """A case that is not regenerated keeps its files and its entry of summary.json."""
    e = OLD_SUMMARY.get((kind, name))
    if e is None:
        raise RuntimeError(f"{kind}/{name} is not in summary.json; regenerate it too")
    SUMMARY.append((kind, name, e))


def finish(kind, name, d, info):
    info["bytes"] = dir_size(d)
    SUMMARY.append((kind, name, info))
    print(f"{kind}/{name}: {info}")


def gen_inputs(g, B, C, H, W, t_list, y_list, x_scale=None):
    x = torch.randn(B, C, H, W, generator=g)
    if x_scale is not None:
        x = x * torch.tensor(x_scale, dtype=torch.float32).view(B, 1, 1, 1)
    t = torch.tensor(t_list, dtype=torch.float32)
    y = torch.tensor(y_list, dtype=torch.float32)
    return x, t, y


def tune_weights(cfg, sd0, dtype, x, t, y, tail, lo=0.25, hi=0.55, cos_alphas=None, spread=False):
    """Return final f32 weights (already rounded to the storage dtype) whose router
    decisions are robust (see margins_ok)."""
    if cfg.name != "DC-DiT":
        return rounded(sd0, dtype)
    if cfg.router == "predictability":
        key = "hnet.routing_module.residual_scorer.3.bias"
        sd = rounded(sd0, dtype)
        sd[key] = torch.zeros_like(sd[key])
        m = make_model(cfg, sd)
        logit0 = router_logits(m, x, t.long(), y.long())
        for margin, b, frac, _ in choose_bias(logit0, dtype, lo, hi, spread):
            sd[key] = torch.full_like(sd[key], b)
            m = make_model(cfg, sd)
            with torch.no_grad():
                res = m(x, t.long(), y.long(), tail)
            ok, why = margins_ok(res["boundary_prob"], res["natural_mask"], tail)
            if ok:
                return sd
        raise RuntimeError("no robust bias found")
    # cosine router: k_proj = alpha * q_proj + (1 - alpha) * R (R random, fixed)
    rnd = sd0["hnet.routing_module.k_proj.weight"].clone()
    q = sd0["hnet.routing_module.q_proj.weight"]
    best = None
    for a in cos_alphas:
        sd1 = dict(sd0)
        sd1["hnet.routing_module.k_proj.weight"] = a * q + (1 - a) * rnd
        sd = rounded(sd1, dtype)
        m = make_model(cfg, sd)
        with torch.no_grad():
            res = m(x, t.long(), y.long(), tail)
        frac = interior(res["natural_mask"]).float().mean().item()
        ok, why = margins_ok(res["boundary_prob"], res["natural_mask"], tail)
        if ok and lo <= frac <= hi:
            return sd
        best = (a, frac, why)
    raise RuntimeError(f"no robust cosine-router scale found (last: {best})")


def rel_change(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def cond_proj_effect(cfg, sd, x, t, y, tail, res):
    """How much `out` changes when the conv blocks' cond_proj (weights and biases) is zeroed:
    in all blocks, in the encoder only and in the decoder only. Returns a dict of relative
    changes ||out' - out|| / ||out|| and whether the kept mask moved."""
    eff = {}
    for part, prefix in (("all", "hnet."), ("encoder", "hnet.encoder."), ("decoder", "hnet.decoder.")):
        keys = [k for k in sd if k.startswith(prefix) and ".cond_proj." in k]
        assert keys, part
        sdz = dict(sd)
        for k in keys:
            sdz[k] = torch.zeros_like(sd[k])
        rz = make_model(cfg, sdz)(x, t.long(), y.long(), tail)
        eff[part] = {"rel_out": rel_change(rz["out"], res["out"]),
                     "rel_p": rel_change(rz["boundary_prob"], res["boundary_prob"]),
                     "same_mask": bool(torch.equal(rz["boundary_mask"], res["boundary_mask"]))}
    return eff


def forward_case(name, cfgd, *, seed, B, dtype, tail, t_list, y_list, x_scale=None, x_fn=None,
                 cos_alphas=(0.15, 0.1, 0.2, 0.05, 0.25, 0.0, 0.3), lo=0.25, hi=0.55,
                 scale_keys=None, spread=False, check_cond_proj=False):
    if ONLY and name not in ONLY:
        return keep_summary("forward", name)
    cfg = R.config_from_dict(cfgd)
    g = torch.Generator().manual_seed(seed)
    sd0 = random_state(R.build_model(cfg), g)
    for k, f in (scale_keys or {}).items():
        sd0[k] = sd0[k] * f
    x, t, y = gen_inputs(g, B, cfg.in_channels, cfg.latent_height, cfg.latent_width, t_list, y_list,
                         x_scale)
    if x_fn is not None:
        x = x_fn(x)
    sd = tune_weights(cfg, sd0, dtype, x, t, y, tail, lo, hi, cos_alphas, spread)
    d = os.path.join(GOLDEN, "forward", name)
    sd = write_common(d, cfgd, sd, dtype)
    m = make_model(cfg, sd)
    with torch.no_grad():
        res = m(x, t.long(), y.long(), tail)
    save_file({"x": x.contiguous(), "t": t, "y": y}, os.path.join(d, "input.safetensors"))
    exp = {"out": res["out"].float().contiguous()}
    info = {"weights": dtype, "B": B, "grid": [cfg.latent_height, cfg.latent_width]}
    if cfg.name == "DC-DiT":
        exp["boundary_prob"] = res["boundary_prob"].float().contiguous()
        exp["boundary_mask"] = res["boundary_mask"].float().contiguous()
        L = cfg.latent_height * cfg.latent_width
        info["natural_kept"] = res["natural_mask"].sum(1).tolist()
        info["kept"] = res["boundary_mask"].sum(1).tolist()
        info["kept_frac"] = [round(k / L, 3) for k in info["kept"]]
        ok, why = margins_ok(res["boundary_prob"], res["natural_mask"], tail)
        assert ok, why
        info["min|p-0.5|"] = float((interior(res["boundary_prob"]) - 0.5).abs().min())
    if check_cond_proj:
        # The case must really test cond_proj: zeroing it (everywhere, and in the encoder or
        # the decoder alone) has to move `out` by more than 1e-3 relative. The decoder's
        # cond_proj does not reach the router, so its check is free of mask effects; the
        # encoder's also has to move the router's p (before any masking) by more than 1e-3.
        eff = cond_proj_effect(cfg, sd, x, t, y, tail, res)
        for part, e in eff.items():
            assert e["rel_out"] > 1e-3, (name, part, e)
        assert eff["decoder"]["same_mask"], eff
        assert eff["encoder"]["rel_p"] > 1e-3, eff
        info["cond_proj_rel_out"] = {part: float(f"{e['rel_out']:.3g}") for part, e in eff.items()}
    save_file(exp, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump({"tail_drop": tail, "seed": seed, "weights_dtype": dtype}, f)
    finish("forward", name, d, info)


def grad_case(name, cfgd, *, seed, B, dtype, tail, t_list, y_list,
              cos_alphas=(0.15, 0.1, 0.2, 0.05, 0.25, 0.0, 0.3)):
    if ONLY and name not in ONLY:
        return keep_summary("grad", name)
    cfg = R.config_from_dict(cfgd)
    g = torch.Generator().manual_seed(seed)
    sd0 = random_state(R.build_model(cfg), g)
    x, t, y = gen_inputs(g, B, cfg.in_channels, cfg.latent_height, cfg.latent_width, t_list, y_list)
    noise = torch.randn(x.shape, generator=g)
    diff = R.Diffusion.linear(cfg.diffusion_steps)
    xt = diff.q_sample(x, t.long(), noise)  # the router sees x_t
    sd = tune_weights(cfg, sd0, dtype, xt, t, y, tail, 0.25, 0.55, cos_alphas)
    d = os.path.join(GOLDEN, "grad", name)
    sd = write_common(d, cfgd, sd, dtype)
    m = make_model(cfg, sd)
    m.zero_grad()
    # Loss terms in float64 (the model stays f32): PyTorch's f32 decoder NLL at
    # t = 0 is off by ~1e-3 in its gradient, more than the 1e-4 the tests hold.
    res = R.training_loss(m, diff, x, t, y.long(), noise, tail, loss_dtype=torch.float64)
    res["loss"].backward()
    ok, why = margins_ok(res["model"]["boundary_prob"].detach(), res["model"]["natural_mask"], tail)
    assert ok, why
    save_file({"x": x.contiguous(), "t": t, "y": y, "noise": noise.contiguous()},
              os.path.join(d, "batch.safetensors"))
    exp = {k: res[k].detach().float().reshape(1) for k in ("loss", "mse", "vb", "ratio")}
    for k, p in m.named_parameters():
        if not p.requires_grad:
            continue
        gr = p.grad if p.grad is not None else torch.zeros_like(p)
        exp["grad." + k] = gr.float().contiguous()
    save_file(exp, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump({"tail_drop": tail, "seed": seed, "weights_dtype": dtype}, f)
    L = cfg.latent_height * cfg.latent_width
    mm = res["model"]
    finish("grad", name, d, {
        "weights": dtype, "B": B, "grid": [cfg.latent_height, cfg.latent_width],
        "kept": mm["boundary_mask"].sum(1).tolist(),
        "kept_frac": [round(int(k) / L, 3) for k in mm["boundary_mask"].sum(1)],
        "loss": round(res["loss"].item(), 6), "mse": round(res["mse"].item(), 6),
        "vb": round(res["vb"].item(), 6), "ratio": round(res["ratio"].item(), 6)})


def textures(x):
    """Four very different latents: white noise, a checkerboard, a step edge, a ramp (the
    last three with a little noise), so that the router keeps different numbers of tokens.
    (Scaling an input does not do it: GroupNorm / RMSNorm make the router scale-invariant.)"""
    B, C, H, W = x.shape
    rr = torch.arange(H).float()[:, None].expand(H, W)
    cc = torch.arange(W).float()[None].expand(H, W)
    pats = [
        x[0] * 1.5,
        torch.stack([((rr + cc) % 2 * 2 - 1) * (1 + 0.1 * k) for k in range(C)]) + 0.05 * x[1],
        torch.stack([(cc >= W // 2).float() * 3 * (1 if k % 2 else -1) for k in range(C)]) + 0.05 * x[2],
        torch.stack([(cc * 0.5 - rr * 0.3) * (1 + k) for k in range(C)]) + 0.05 * x[3],
    ]
    return torch.stack(pats[:B]).contiguous()


# --------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------


def main():
    os.makedirs(GOLDEN, exist_ok=True)
    ONLY.update(sys.argv[1:])
    if ONLY:
        with open(os.path.join(GOLDEN, "summary.json")) as f:
            for e in json.load(f):
                e = dict(e)
                kind, name = e.pop("kind"), e.pop("case")
                OLD_SUMMARY[(kind, name)] = e
    train = {"downsample_factor": 4.0, "ratio_loss_weight": 0.03, "ratio_batch_size": None}

    forward_case("pred_sq8", cfg_dict(d=32, heads=4, factor=[1, None], grid=(8, 8)),
                 seed=1001, B=3, dtype="f16", tail=0.0, t_list=[999, 417, 3], y_list=[7, 2, 10])
    forward_case("pred_rect_drop", cfg_dict(d=32, heads=2, factor=None, grid=(6, 10)),
                 seed=1002, B=4, dtype="bf16", tail=0.3, t_list=[10, 250, 600, 900],
                 y_list=[0, 5, 9, 10], x_fn=textures, lo=0.2, hi=0.6, spread=True,
                 scale_keys={"hnet.routing_module.residual_scorer.0.weight": 0.003})
    forward_case("pred_perSample", cfg_dict(d=32, heads=4, factor=None, grid=(7, 5), sigma=2.0),
                 seed=1003, B=3, dtype="f16", tail=[0.0, 0.5, 0.9], t_list=[100, 500, 900],
                 y_list=[1, 10, 4])
    forward_case("cos_sq8", cfg_dict(d=32, heads=4, factor=None, grid=(8, 8), router="cosine"),
                 seed=1004, B=3, dtype="f16", tail=0.0, t_list=[0, 333, 999], y_list=[3, 8, 10])
    forward_case("cos_rect_drop", cfg_dict(d=32, heads=2, factor=None, grid=(9, 7), router="cosine",
                                           learn_sigma=False, mlp_ratio=2.0),
                 seed=1005, B=3, dtype="f16", tail=0.3, t_list=[50, 500, 950], y_list=[6, 10, 1],
                 x_scale=[0.3, 1.0, 3.0])
    forward_case("dit_p2", cfg_dict(d=32, heads=4, grid=(8, 8), name="DiT", patch_size=2,
                                    layout=("D2",), mlp_ratio=2.0),
                 seed=1006, B=2, dtype="f16", tail=0.0, t_list=[20, 700], y_list=[4, 10])
    # E = D = 64: GroupNorm(32, 64) has 2 channels per group, so the conv blocks' cond_proj
    # matters (with E = 32 it has no effect at all).
    forward_case("pred_e64", cfg_dict(d=64, heads=4, factor=[1, None], grid=(6, 5)),
                 seed=1007, B=2, dtype="f16", tail=0.2, t_list=[150, 800], y_list=[3, 10],
                 lo=0.3, hi=0.55, check_cond_proj=True)

    grad_case("grad_pred", cfg_dict(d=32, heads=4, factor=None, grid=(8, 8), training=train),
              seed=2001, B=3, dtype="f16", tail=0.0, t_list=[0, 640, 37], y_list=[1, 10, 6])
    grad_case("grad_cos_drop", cfg_dict(d=32, heads=2, factor=None, grid=(7, 6), router="cosine",
                                        training=train),
              seed=2002, B=3, dtype="f16", tail=0.25, t_list=[0, 300, 875], y_list=[9, 2, 10])

    unknown = ONLY - {n for _, n, _ in SUMMARY}
    assert not unknown, f"unknown cases: {sorted(unknown)}"
    with open(os.path.join(GOLDEN, "summary.json"), "w") as f:
        json.dump([{"kind": k, "case": n, **i} for k, n, i in SUMMARY], f, indent=1)
    print(f"total bytes under {GOLDEN}: {dir_size(GOLDEN)}")


if __name__ == "__main__":
    main()
