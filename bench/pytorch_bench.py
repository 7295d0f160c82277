#!/usr/bin/env python3
"""PyTorch side of `dcdit-cli bench --against-pytorch`.

    pip install torch safetensors pyyaml numpy
    python3 bench/pytorch_bench.py MANIFEST.json > result.json

`dcdit-cli bench` writes MANIFEST.json into a temporary folder together with the
weights and inputs of every workload (safetensors, the same files its own timings
used) and runs this script; you normally do not call it by hand. The manifest:

    {"threads": 2, "iters": 5, "warmup": 1, "reference_loop": false,
     "forward": [{"name": "keep0.25", "config": "...yaml", "weights": "...", "inputs": "...",
                  "bf16": false}],
     "train":   {"config": "...yaml", "weights": "...", "batch": "...", "steps": 5},
     "gemm":    {"shapes": [[rows, k, m], ...], "peak": [n, ...]}}

Forward inputs hold x (B, C, H, W), t (B), y (B) and mask (B, L): the kept tokens of
the Rust forward, checked against this model's. The training batch holds x0, t, y
(labels after class dropout) and noise.

The model is the repo's reference (tests/reference/dcdit_ref.py), eager, f32, with
`torch.set_num_threads(threads)`. Its main network runs on the packed kept tokens
(every linear layer once over all samples' tokens, adaLN broadcast per sample); the
attention runs either per sample with `F.scaled_dot_product_attention`
("per_sample_sdpa") or once over the zero-padded batch with a key-padding mask
("masked_sdpa"); both are timed and the faster one is the baseline. The reference's
own per-sample loop with an explicit softmax ("reference") is timed too when the
manifest asks ("reference_loop": true; `dcdit-cli bench --pytorch-reference-loop`), for
the record. Encoder, router, de-chunk and decoder are the reference's own code.

Prints one JSON object on stdout; timings are in seconds (median of `iters` runs after
`warmup` runs).
"""

import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import dcdit_ref as R  # noqa: E402


# --------------------------------------------------------------------------------------
# The forward with a packed main network
# --------------------------------------------------------------------------------------


def attention_packed(attn, x, seg, mode):
    """attn: the reference Attention module; x (T, D) packed rows; seg: cumulative offsets."""
    T, D = x.shape
    H = attn.heads
    hd = D // H
    qkv = attn.qkv(x).reshape(T, 3, H, hd)
    B = len(seg) - 1
    if mode == "per_sample_sdpa":
        outs = []
        for b in range(B):
            s = qkv[seg[b]:seg[b + 1]].permute(1, 2, 0, 3)  # (3, H, m, hd)
            o = F.scaled_dot_product_attention(s[0:1], s[1:2], s[2:3])  # (1, H, m, hd)
            outs.append(o[0].permute(1, 0, 2).reshape(-1, D))
        o = torch.cat(outs, 0)
    elif mode == "masked_sdpa":
        lens = [seg[b + 1] - seg[b] for b in range(B)]
        mmax = max(lens)
        pad = qkv.new_zeros(B, mmax, 3, H, hd)
        valid = torch.zeros(B, mmax, dtype=torch.bool)
        for b in range(B):
            pad[b, :lens[b]] = qkv[seg[b]:seg[b + 1]]
            valid[b, :lens[b]] = True
        p = pad.permute(2, 0, 3, 1, 4)  # (3, B, H, mmax, hd)
        o = F.scaled_dot_product_attention(p[0], p[1], p[2], attn_mask=valid[:, None, None, :])
        o = o.permute(0, 2, 1, 3).reshape(B, mmax, D)
        o = o[valid]  # (T, D), rows in packed order
    else:
        raise ValueError(mode)
    return attn.proj(o)


def main_network_packed(stack, z, c, seg, mode):
    """stack: DiTStack; z (T, D) packed; c (B, Dc); per-sample adaLN broadcast by segment."""
    lens = torch.tensor([seg[b + 1] - seg[b] for b in range(len(seg) - 1)])
    D = z.shape[-1]
    for blk in stack.layers:
        ada = blk.adaLN_modulation(c).repeat_interleave(lens, dim=0)  # (T, 6D)
        sa, ca, ga, sm, cm, gm = ada.chunk(6, dim=-1)
        z = z + ga * attention_packed(blk.attn, R.modulate(F.layer_norm(z, (D,), eps=1e-6), sa, ca),
                                      seg, mode)
        if blk.mlp is not None:
            z = z + gm * blk.mlp(R.modulate(F.layer_norm(z, (D,), eps=1e-6), sm, cm))
    return stack.rmsnorm(z)


def dcdit_forward(model, x, t, y, mode):
    """DCDiT.forward (tail drop 0) with the main network on the packed kept tokens."""
    if mode == "reference":
        return model(x, t, y, 0.0)
    cfg = model.cfg
    B, C, H, W = x.shape
    L = H * W
    sigma = cfg.dechunk_kernel_sigma
    hn = model.hnet
    dt = model.pos_embed.dtype  # bf16 for the bf16 variant
    te = model.t_embedder
    c = te.mlp(R.timestep_features(t, te.freq_dim).to(dt)) + model.y_embedder(y)
    e = model.x_embedder.proj(x)
    h = hn.encoder(e, c)
    D = h.shape[-1]
    r = hn.residual_proj(h)
    p_raw = hn.routing_module(h, H, W)
    ones = torch.ones(B, 1, dtype=p_raw.dtype)
    p = torch.cat([ones, p_raw[:, 1:L - 1], ones], dim=1) if L > 1 else ones
    natural = p > 0.5
    selected = torch.where(natural, p, 1 - p)
    keep = natural
    pos = model.pos_embed[0]
    idxs = [torch.nonzero(keep[b]).flatten() for b in range(B)]
    seg = [0]
    for idx in idxs:
        seg.append(seg[-1] + len(idx))
    z = torch.cat([h[b, idx] + pos[idx] for b, idx in enumerate(idxs)], 0)
    z = main_network_packed(hn.main_network.main_network, z, c, seg, mode)
    pclamp = torch.clamp(p, 1e-4, 1 - 1e-4)
    grid_r = (torch.arange(L) // W).float()
    grid_c = (torch.arange(L) % W).float()
    outs = []
    for b, idx in enumerate(idxs):
        zb = z[seg[b]:seg[b + 1]]
        pk = pclamp[b, idx]
        rr, cc = grid_r[idx], grid_c[idx]
        d2 = (rr[:, None] - rr[None]) ** 2 + (cc[:, None] - cc[None]) ** 2
        wts = torch.exp(-d2 / (2 * sigma ** 2)) * pk[None, :].to(zb.dtype)
        wts = (wts / (wts.sum(-1, keepdim=True) + 1e-8)).to(zb.dtype)
        sm = wts @ zb
        pk = pk.to(zb.dtype)
        o = pk[:, None] * zb + (1 - pk[:, None]) * sm
        outs.append(o[R.nearest_kept(idx, H, W)])
    dech = torch.stack(outs, 0)
    hh = dech * R._STE.apply(selected)[..., None].to(dech.dtype) + r
    hh = hh.transpose(1, 2).reshape(B, D, H, W)
    d = hn.decoder(hh, c)
    out = model.final_layer(d, c)
    out = out.transpose(1, 2).reshape(B, cfg.out_channels, H, W)
    return dict(out=out, boundary_prob=p, boundary_mask=keep, natural_mask=natural,
                selected_probs=selected)


class Packed(torch.nn.Module):
    """The reference model behind the packed forward (what training_loss calls)."""

    def __init__(self, model, mode):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.mode = mode

    def forward(self, x, t, y, tail_drop_frac=0.0):
        assert float(tail_drop_frac) == 0.0
        return dcdit_forward(self.model, x, t, y, self.mode)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def log(msg):
    """Progress on stderr (stdout carries the JSON)."""
    print(f"  [pytorch] {msg}", file=sys.stderr, flush=True)


def timed(fn, iters, warmup, what=None):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    if what:
        log(f"{what}: median {statistics.median(ts) * 1e3:.1f} ms over {iters}")
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": ts}


def load_model(cfg_path, weights_path, dtype=torch.float32):
    cfg = R.load_config(cfg_path)
    model = R.build_model(cfg)
    R.load_weights(model, load_file(weights_path))
    model.eval()
    return model.to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def forward_workload(w, iters, warmup, reference_loop):
    model = load_model(w["config"], w["weights"])
    inp = load_file(w["inputs"])
    x, t, y = inp["x"].float(), inp["t"].long(), inp["y"].long()
    B, _, H, W = x.shape
    res = {"name": w["name"], "batch": B, "tokens": B * H * W}
    with torch.no_grad():
        ref = dcdit_forward(model, x, t, y, "per_sample_sdpa")
        keep = ref["boundary_mask"]
        res["kept"] = int(keep.sum())
        res["kept_fraction"] = res["kept"] / (B * H * W)
        if "mask" in inp:
            rust = inp["mask"].reshape(B, H * W) > 0.5
            res["mask_agrees"] = bool(torch.equal(rust, keep))
            res["mask_differences"] = int((rust != keep).sum())
        outs = {}
        variants = {}
        modes = ["per_sample_sdpa", "masked_sdpa"] + (["reference"] if reference_loop else [])
        for mode in modes:
            r = timed(lambda m=mode: outs.__setitem__(m, dcdit_forward(model, x, t, y, m)["out"]),
                      iters, warmup, f"forward {w['name']} {mode}")
            variants[mode] = r
        base = outs["per_sample_sdpa"]
        for mode, o in outs.items():
            variants[mode]["rel_err_vs_per_sample"] = rel(o, base)
        res["variants"] = variants
        fast = [m for m in variants if m != "reference"]
        best = min(fast, key=lambda m: variants[m]["median"])
        res["best"] = best
        res["median"] = variants[best]["median"]
        if "expected_out" in inp:
            res["rel_err_vs_rust"] = rel(base, inp["expected_out"].reshape(base.shape))
        if w.get("bf16") and not native_bf16():
            res["bf16_skipped"] = "no native bf16 on this CPU"
        elif w.get("bf16"):
            mb = load_model(w["config"], w["weights"], torch.bfloat16)
            xb = x.to(torch.bfloat16)
            ob = {}
            r = timed(lambda: ob.__setitem__("o", dcdit_forward(mb, xb, t, y, best)), iters, warmup,
                      f"forward {w['name']} bf16 {best}")
            r["rel_err_vs_f32"] = rel(ob["o"]["out"].float(), base)
            r["mask_agrees_with_f32"] = bool(torch.equal(ob["o"]["boundary_mask"], keep))
            r["attention"] = best
            res["bf16"] = r
    return res


@functools.cache
def native_bf16():
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX on x86-64, BF16 on
    aarch64). Without it PyTorch emulates bf16 GEMMs at well under 1 GFLOP/s (a
    2048^3 product took 61 s on a Zen 3 EPYC), so those timings are skipped."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def train_workload(w, iters, warmup):
    model = load_model(w["config"], w["weights"])
    model.train()
    cfg = model.cfg
    import yaml

    with open(w["config"]) as f:
        tr = (yaml.safe_load(f) or {}).get("training", {})
    lr = float(tr.get("learning_rate", 1e-4))
    wd = float(tr.get("weight_decay", 0.0))
    ema_decay = float(tr.get("ema_decay", 0.9999))
    max_norm = float(tr.get("max_grad_norm", 1.0))
    b = load_file(w["batch"])
    x0, t, y, noise = b["x0"].float(), b["t"].long(), b["y"].long(), b["noise"].float()
    diff = R.Diffusion.linear(cfg.diffusion_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    out = {"batch": int(x0.shape[0]), "lr": lr, "weight_decay": wd, "ema_decay": ema_decay,
           "max_grad_norm": max_norm, "variants": {}}
    first = {}

    for mode in w.get("variants", ["per_sample_sdpa", "masked_sdpa"]):
        # Same starting point for each variant.
        state = {k: v.clone() for k, v in model.state_dict().items()}
        wrapped = Packed(model, mode)
        log = []

        def step():
            opt.zero_grad(set_to_none=True)
            res = R.training_loss(wrapped, diff, x0, t, y, noise, 0.0)
            res["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
            log.append((res["loss"].item(), norm.item(),
                        int(res["model"]["boundary_mask"].sum())))

        r = timed(step, iters, warmup, f"train step {mode}")
        r["first_loss"], r["first_grad_norm"], r["first_kept"] = log[0]
        r["kept_per_step"] = [k for _, _, k in log]
        out["variants"][mode] = r
        first.setdefault("loss", log[0][0])
        model.load_state_dict(state)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        ema = [p.detach().clone() for p in params]
    best = min(out["variants"], key=lambda m: out["variants"][m]["median"])
    out["best"] = best
    out["median"] = out["variants"][best]["median"]
    out["first_loss"] = first["loss"]
    out["tokens"] = int(x0.shape[0] * x0.shape[2] * x0.shape[3])
    return out


def gemm_workload(w, iters, warmup):
    res = {"shapes": [], "peak": []}
    g = torch.Generator().manual_seed(0)
    for rows, k, m in w["shapes"]:
        x = torch.randn(rows, k, generator=g)
        wt = torch.randn(m, k, generator=g) * 0.03
        r = timed(lambda: F.linear(x, wt), iters, warmup, f"F.linear {rows}x{k}x{m}")
        r["shape"] = [rows, k, m]
        r["gflops"] = 2 * rows * k * m / r["median"] / 1e9
        res["shapes"].append(r)
    for n in w["peak"]:
        for dt in (torch.float32, torch.bfloat16) if native_bf16() else (torch.float32,):
            a = torch.randn(n, n, generator=g).to(dt)
            b = torch.randn(n, n, generator=g).to(dt)
            r = timed(lambda: torch.mm(a, b), iters, warmup, f"torch.mm {n}^3 {dt}")
            r["n"] = n
            r["dtype"] = str(dt).replace("torch.", "")
            r["gflops"] = 2 * n ** 3 / r["median"] / 1e9
            res["peak"].append(r)
    return res


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    with open(sys.argv[1]) as f:
        man = json.load(f)
    threads = int(man.get("threads", 2))
    torch.set_num_threads(threads)
    iters = int(man.get("iters", 5))
    warmup = int(man.get("warmup", 1))
    out = {
        "torch": torch.__version__,
        "threads": threads,
        "get_num_threads": torch.get_num_threads(),
        "parallel_info": torch.__config__.parallel_info(),
        "mkldnn_bf16": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()),
        "native_bf16": native_bf16(),
    }
    if man.get("forward"):
        ref = bool(man.get("reference_loop", False))
        out["forward"] = [forward_workload(w, iters, warmup, ref) for w in man["forward"]]
    if man.get("train"):
        out["train"] = train_workload(man["train"], int(man["train"].get("steps", iters)), warmup)
    if man.get("gemm"):
        out["gemm"] = gemm_workload(man["gemm"], iters, warmup)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
