"""Plain-PyTorch reference of DC-DiT (arXiv 2603.06351) and of the fixed-patch DiT baseline.

Written for this project's golden tests. It follows the semantics of the authors'
release (AMD-AGI/DynamicChunkingDiT) and of /work/shared/SPEC.md, but it is an
independent, deliberately simple implementation:

* f32 on the CPU, no flash-attn, no timm;
* attention is an explicit per-sample softmax(Q K^T / sqrt(d)) V (so samples never
  cross-attend, equivalent to the release's varlen packing);
* the chunk / de-chunk steps loop over samples, working only on real tokens
  (no padding), which gives the same values and gradients as the release's padded,
  batch-packed tensors.

State-dict key names are exactly the release's (SPEC section 9), so release
checkpoints (and weights.safetensors of the release cases) load with strict=True.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str = "DC-DiT"  # "DC-DiT" or "DiT" (fixed-patch baseline)
    arch_layout: list = field(default_factory=lambda: ["c2", ["D12"], "c2"])
    d_model: List[int] = field(default_factory=lambda: [768, 768])
    num_heads: List[int] = field(default_factory=lambda: [12, 12])
    enc_dec_dim_factor: Optional[List[Optional[int]]] = None
    dechunk_kernel_sigma: float = 1.0
    router: str = "predictability"  # or "cosine"
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch_size: int = 2  # DiT baseline only
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    image_size: int = 256
    latent_height: int = 32
    latent_width: int = 32
    # training
    downsample_factor: float = 4.0
    ratio_loss_weight: float = 0.03
    ratio_batch_size: Optional[int] = 16
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"

    # ---- derived -------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def hidden(self) -> int:
        return self.d_model[0]

    @property
    def enc_dim(self) -> int:
        f = self.enc_dec_dim_factor[0] if self.enc_dec_dim_factor else None
        return self.d_model[0] // f if f else self.d_model[0]

    @property
    def routing_dim(self) -> int:
        f = None
        if self.enc_dec_dim_factor and len(self.enc_dec_dim_factor) > 1:
            f = self.enc_dec_dim_factor[1]
        d1 = self.d_model[1] if len(self.d_model) > 1 else self.d_model[0]
        return d1 // f if f else d1

    @property
    def inner_d_model(self) -> int:
        return self.d_model[-1]

    @property
    def inner_heads(self) -> int:
        return self.num_heads[-1]


def parse_blocks(s: str):
    """'c2D1' -> [('c', 2), ('D', 1)] (the release's regex)."""
    return [(a, int(n)) for a, n in re.findall(r"([tTdDcC])(\d+)", s)]


def innermost_layout(layout) -> str:
    while isinstance(layout, list) and len(layout) == 3:
        layout = layout[1]
    if isinstance(layout, list):
        layout = layout[0]
    return layout


def config_from_dict(d: dict) -> Config:
    d = d or {}
    m = d.get("model") or {}
    h = m.get("hnet") or {}
    tr = d.get("training") or {}
    da = d.get("data") or {}
    di = d.get("diffusion") or {}
    c = Config()
    c.name = m.get("name", c.name)
    c.arch_layout = h.get("arch_layout", c.arch_layout)
    c.d_model = list(h.get("d_model", c.d_model))
    c.num_heads = list(h.get("num_heads", c.num_heads))
    c.enc_dec_dim_factor = h.get("enc_dec_dim_factor", c.enc_dec_dim_factor)
    c.dechunk_kernel_sigma = float(h.get("dechunk_kernel_sigma", c.dechunk_kernel_sigma))
    c.router = h.get("router", c.router)
    c.mlp_ratio = float(m.get("mlp_ratio", c.mlp_ratio))
    c.in_channels = int(m.get("in_channels", c.in_channels))
    c.patch_size = int(m.get("patch_size", c.patch_size))
    c.learn_sigma = bool(tr.get("learn_sigma", c.learn_sigma))
    c.class_dropout_prob = float(tr.get("class_dropout_prob", c.class_dropout_prob))
    c.downsample_factor = tr.get("downsample_factor", c.downsample_factor)
    c.ratio_loss_weight = float(tr.get("ratio_loss_weight", c.ratio_loss_weight))
    c.ratio_batch_size = tr.get("ratio_batch_size", c.ratio_batch_size)
    c.num_classes = int(da.get("num_classes", c.num_classes))
    c.image_size = int(da.get("image_size", c.image_size))
    side = c.image_size // 8
    c.latent_height = int(da.get("latent_height", side))
    c.latent_width = int(da.get("latent_width", side))
    c.diffusion_steps = int(di.get("diffusion_steps", c.diffusion_steps))
    c.noise_schedule = di.get("noise_schedule", c.noise_schedule)
    assert c.router in ("predictability", "cosine"), c.router
    assert c.name in ("DC-DiT", "DiT"), c.name
    return c


def load_config(path: str) -> Config:
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


# --------------------------------------------------------------------------------------
# Positional embedding
# --------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, dim) table in raster order. First half of the channels encodes the
    column, second half the row; each half is [sin(pos*w_k), cos(pos*w_k)] with
    w_k = 1/10000^(k/(dim/4)). Computed in float64, returned as f32."""
    assert dim % 4 == 0
    q = dim // 4
    omega = np.arange(q, dtype=np.float64) / q
    omega = 1.0 / 10000.0 ** omega
    idx = np.arange(rows * cols)
    col = (idx % cols).astype(np.float64)
    row = (idx // cols).astype(np.float64)

    def one(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(col), one(row)], axis=1)
    return torch.from_numpy(emb).float()


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_features(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), hidden)

    def forward(self, y):  # no label dropout: the reference is always evaluated as in eval mode
        return self.embedding_table(y.long())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ConvBlock(nn.Module):
    """SD-style residual block on (B, Cin, H, W)."""

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        ci = min(cin, cout)
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, ci, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, ci, eps=1e-5)
        self.conv2 = nn.Conv2d(ci, cout, 3, padding=1)
        self.skip_proj = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, ci))

    def forward(self, x, c):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond_proj(c)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.skip_proj(x) if self.skip_proj is not None else x
        return h + skip


class ConvStack(nn.Module):
    """Encoder / decoder: conv blocks, then RMSNorm over channels."""

    def __init__(self, dims, cond_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([ConvBlock(a, b, cond_dim) for a, b in dims])
        self.rmsnorm = RMSNorm(dims[-1][1])

    def forward(self, x, c):  # x: (B, C, H, W) -> tokens (B, L, Cout) after RMSNorm
        for layer in self.layers:
            x = layer(x, c)
        tok = x.flatten(2).transpose(1, 2)
        return self.rmsnorm(tok)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (M, D), one sample
        M, D = x.shape
        hd = D // self.heads
        qkv = self.qkv(x).reshape(M, 3, self.heads, hd).permute(1, 2, 0, 3)  # (3, H, M, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (att @ v).permute(1, 0, 2).reshape(M, D)
        return self.proj(o)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, has_mlp: bool = True):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if has_mlp else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):  # x: (M, D) one sample, c: (Dc,)
        D = x.shape[-1]
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + ga * self.attn(modulate(F.layer_norm(x, (D,), eps=1e-6), sa, ca))
        if self.mlp is not None:
            x = x + gm * self.mlp(modulate(F.layer_norm(x, (D,), eps=1e-6), sm, cm))
        return x


class DiTStack(nn.Module):
    def __init__(self, blocks_spec, dim, heads, mlp_ratio):
        super().__init__()
        self.layers = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio, a == "D") for a in blocks_spec])
        self.rmsnorm = RMSNorm(dim)

    def forward(self, x, c):
        for layer in self.layers:
            x = layer(x, c)
        return self.rmsnorm(x)


class InnerStage(nn.Module):
    """Holds `main_network` so the keys read hnet.main_network.main_network.*"""

    def __init__(self, blocks_spec, dim, heads, mlp_ratio):
        super().__init__()
        self.main_network = DiTStack(blocks_spec, dim, heads, mlp_ratio)


class PredictabilityRouter(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        b = d // 4
        self.proj = nn.Conv2d(d, b, 1)
        self.context_predictor = nn.Conv2d(b, b, 3, padding=1)
        self.residual_scorer = nn.Sequential(
            nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(), nn.Conv2d(b, 1, 1)
        )

    def forward(self, h, H, W):  # h (B, L, D) -> p (B, L)
        B, L, D = h.shape
        x = h.transpose(1, 2).reshape(B, D, H, W)
        z = self.proj(x)
        u = z - self.context_predictor(z)
        return torch.sigmoid(self.residual_scorer(u).reshape(B, L))


class CosineRouter(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.k_smooth = nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False)

    def forward(self, h, H, W):
        B, L, D = h.shape
        q = F.normalize(self.q_proj(h), dim=-1, eps=1e-12)
        k = F.normalize(self.k_proj(h), dim=-1, eps=1e-12)
        kg = k.transpose(1, 2).reshape(B, D, H, W)
        kb = self.k_smooth(kg).reshape(B, D, L).transpose(1, 2)
        kb = F.normalize(kb, dim=-1, eps=1e-12)
        s = (q * kb).sum(-1)
        return (1 - s) / 2


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, g):
        return g


class HNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        lay = cfg.arch_layout
        assert isinstance(lay, list) and len(lay) == 3, "only one-stage layouts are supported"
        inner = lay[1]
        assert isinstance(inner, list) and len(inner) == 1 and isinstance(inner[0], str), \
            "only one-stage layouts are supported"
        assert cfg.d_model[0] == cfg.d_model[-1], "d_model must be equal across the two stages"
        E, D, Dc = cfg.enc_dim, cfg.routing_dim, cfg.hidden
        assert D == cfg.inner_d_model
        enc = parse_blocks(lay[0])
        dec = parse_blocks(lay[2])
        assert all(a in "cC" for a, _ in enc + dec)
        n_enc = sum(n for _, n in enc)
        n_dec = sum(n for _, n in dec)
        enc_dims = [(E, D if i == n_enc - 1 else E) for i in range(n_enc)]
        dec_dims = [(D, E) if i == 0 else (E, E) for i in range(n_dec)]
        self.encoder = ConvStack(enc_dims, Dc)
        spec = []
        for a, n in parse_blocks(inner[0]):
            assert a in "dD"
            spec += [a] * n
        self.main_network = InnerStage(spec, D, cfg.inner_heads, cfg.mlp_ratio)
        self.decoder = ConvStack(dec_dims, Dc)
        self.routing_module = PredictabilityRouter(D) if cfg.router == "predictability" else CosineRouter(D)
        self.residual_proj = nn.Linear(D, D)


class PatchEmbed(nn.Module):
    def __init__(self, cin, cout, k, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, cond_dim):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):  # x (B, L, dim), c (B, cond)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift[:, None], scale[:, None])
        return self.linear(x)


# --------------------------------------------------------------------------------------
# Routing helpers (shared by both routers)
# --------------------------------------------------------------------------------------


def tail_drop(p: torch.Tensor, natural: torch.Tensor, frac) -> torch.Tensor:
    """Among each sample's natural boundaries drop floor(f * n) with the lowest p (ties:
    lower raster index dropped first). frac: float, or a sequence/tensor with one per sample."""
    B, L = p.shape
    if isinstance(frac, (list, tuple)) or torch.is_tensor(frac):
        fr = torch.as_tensor(frac, dtype=torch.float32).reshape(-1)
        assert fr.numel() == B
    else:
        if float(frac) <= 0.0:
            return natural.clone()
        fr = torch.full((B,), float(frac), dtype=torch.float32)
    keep = natural.clone()
    for b in range(B):
        n = int(natural[b].sum())
        # the release: (n_boundary.float() * frac).long() in f32
        n_drop = int((torch.tensor(float(n), dtype=torch.float32) * fr[b]).floor().item())
        if n_drop <= 0:
            continue
        idx = torch.nonzero(natural[b]).flatten()  # raster order
        vals = p[b, idx].detach()
        order = torch.argsort(vals, stable=True)
        keep[b, idx[order[:n_drop]]] = False
    return keep


def nearest_kept(kept_idx: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """For every grid position, the index (into kept_idx) of the nearest kept token by
    Euclidean distance, first in raster order on ties."""
    L = H * W
    pos = torch.arange(L)
    r, c = (pos // W).float(), (pos % W).float()
    kr, kc = r[kept_idx], c[kept_idx]
    d2 = (r[:, None] - kr[None]) ** 2 + (c[:, None] - kc[None]) ** 2
    return torch.argmin(d2, dim=1)  # argmin returns the first minimum


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class DCDiT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        Dc = cfg.hidden
        E = cfg.enc_dim
        H, W = cfg.latent_height, cfg.latent_width
        self.x_embedder = PatchEmbed(cfg.in_channels, E, 3, 1, 1)
        self.t_embedder = TimestepEmbedder(Dc)
        self.y_embedder = LabelEmbedder(cfg.num_classes, Dc, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(cfg.inner_d_model, H, W).unsqueeze(0), requires_grad=False
        )
        self.hnet = HNet(cfg)
        self.final_layer = FinalLayer(E, cfg.out_channels, Dc)

    def forward(self, x, t, y, tail_drop_frac=0.0, mask_override=None):
        """mask_override (diagnostics only): a (B, L) bool mask used as both the natural
        and the kept mask instead of the router's decision (p itself is unchanged)."""
        cfg = self.cfg
        B, C, H, W = x.shape
        L = H * W
        sigma = cfg.dechunk_kernel_sigma
        hn = self.hnet
        c = self.t_embedder(t) + self.y_embedder(y)
        e = self.x_embedder.proj(x)  # (B, E, H, W)
        h = hn.encoder(e, c)  # (B, L, D)
        D = h.shape[-1]
        r = hn.residual_proj(h)

        p_raw = hn.routing_module(h, H, W)  # (B, L)
        ones = torch.ones(B, 1, dtype=p_raw.dtype)
        p = torch.cat([ones, p_raw[:, 1:L - 1], ones], dim=1) if L > 1 else ones
        natural = p > 0.5
        if mask_override is not None:
            natural = mask_override.bool()
        selected = torch.where(natural, p, 1 - p)
        keep = tail_drop(p, natural, tail_drop_frac) if mask_override is None else natural.clone()

        pos = self.pos_embed[0]
        pclamp = torch.clamp(p, 1e-4, 1 - 1e-4)
        grid_r = (torch.arange(L) // W).float()
        grid_c = (torch.arange(L) % W).float()
        outs = []
        for b in range(B):
            idx = torch.nonzero(keep[b]).flatten()  # raster order
            z = h[b, idx] + pos[idx]
            z = hn.main_network.main_network(z, c[b])  # (M, D)
            pk = pclamp[b, idx]
            rr, cc = grid_r[idx], grid_c[idx]
            d2 = (rr[:, None] - rr[None]) ** 2 + (cc[:, None] - cc[None]) ** 2
            wts = torch.exp(-d2 / (2 * sigma ** 2)) * pk[None, :]
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-8)
            sm = wts @ z
            o = pk[:, None] * z + (1 - pk[:, None]) * sm
            outs.append(o[nearest_kept(idx, H, W)])
        dech = torch.stack(outs, 0)  # (B, L, D)
        hh = dech * _STE.apply(selected)[..., None] + r
        hh = hh.transpose(1, 2).reshape(B, D, H, W)
        d = hn.decoder(hh, c)  # (B, L, E)
        out = self.final_layer(d, c)  # (B, L, Cout)
        out = out.transpose(1, 2).reshape(B, cfg.out_channels, H, W)
        return dict(out=out, boundary_prob=p, boundary_mask=keep, natural_mask=natural,
                     selected_probs=selected)


class DiT(nn.Module):
    """Fixed-patch DiT baseline (SPEC 8), original DiT key names."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        P = cfg.patch_size
        Dm = cfg.hidden
        H, W = cfg.latent_height, cfg.latent_width
        assert H % P == 0 and W % P == 0
        self.x_embedder = PatchEmbed(cfg.in_channels, Dm, P, P, 0)
        self.t_embedder = TimestepEmbedder(Dm)
        self.y_embedder = LabelEmbedder(cfg.num_classes, Dm, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(Dm, H // P, W // P).unsqueeze(0), requires_grad=False
        )
        spec = []
        for a, n in parse_blocks(innermost_layout(cfg.arch_layout)):
            if a in "dD":
                spec += ["D"] * n
        self.blocks = nn.ModuleList([DiTBlock(Dm, cfg.num_heads[0], cfg.mlp_ratio, True) for _ in spec])
        self.final_layer = FinalLayer(Dm, P * P * cfg.out_channels, Dm)

    def forward(self, x, t, y, tail_drop_frac=0.0):
        cfg = self.cfg
        P, Co = cfg.patch_size, cfg.out_channels
        B = x.shape[0]
        h, w = x.shape[2] // P, x.shape[3] // P
        c = self.t_embedder(t) + self.y_embedder(y)
        z = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        zs = []
        for b in range(B):
            zb = z[b]
            for blk in self.blocks:
                zb = blk(zb, c[b])
            zs.append(zb)
        z = torch.stack(zs, 0)
        z = self.final_layer(z, c)  # (B, h*w, P*P*Co)
        z = z.reshape(B, h, w, P, P, Co)
        z = torch.einsum("nhwpqc->nchpwq", z)
        return dict(out=z.reshape(B, Co, h * P, w * P))


def build_model(cfg: Config) -> nn.Module:
    return DCDiT(cfg) if cfg.name == "DC-DiT" else DiT(cfg)


def load_weights(model: nn.Module, sd: dict):
    sd = {k: v.float() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model


# --------------------------------------------------------------------------------------
# Diffusion (release semantics: float64 tables, gathered then cast to f32)
# --------------------------------------------------------------------------------------


def linear_betas(T: int) -> np.ndarray:
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> List[int]:
    """The release's (IDDPM) respacing rule; returns the sorted kept timesteps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == want:
                    return list(range(0, num_timesteps, i))
            raise ValueError("no integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    steps = []
    for i, cnt in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < cnt:
            raise ValueError("section too small")
        stride = 1 if cnt <= 1 else (size - 1) / (cnt - 1)
        cur = 0.0
        for _ in range(cnt):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class Diffusion:
    def __init__(self, betas: np.ndarray, timestep_map: Optional[List[int]] = None):
        b = np.asarray(betas, dtype=np.float64)
        self.betas = b
        self.T = len(b)
        self.timestep_map = list(range(self.T)) if timestep_map is None else list(timestep_map)
        a = 1.0 - b
        self.alphas_cumprod = np.cumprod(a)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(a) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(b)

    @staticmethod
    def linear(T: int = 1000) -> "Diffusion":
        return Diffusion(linear_betas(T))

    @staticmethod
    def respaced(T: int, spacing) -> "Diffusion":
        base = Diffusion.linear(T)
        keep = space_timesteps(T, spacing)
        last = 1.0
        nb = []
        for i, ac in enumerate(base.alphas_cumprod):
            if i in keep:
                nb.append(1 - ac / last)
                last = ac
        return Diffusion(np.array(nb), keep)

    # Precision of the loss terms: float32 as the release; float64 for the
    # golden gradients (PyTorch's f32 t = 0 decoder NLL has ~1e-3 relative
    # round-off in its gradient, from the cdf difference).
    dtype = torch.float32

    def ext(self, arr, t, shape):
        res = torch.from_numpy(arr)[t.long()].to(self.dtype)
        while res.dim() < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape, dtype=self.dtype)

    def q_sample(self, x0, t, noise):
        return self.ext(self.sqrt_alphas_cumprod, t, x0.shape) * x0 + \
            self.ext(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise

    def q_posterior(self, x0, xt, t):
        mean = self.ext(self.posterior_mean_coef1, t, xt.shape) * x0 + \
            self.ext(self.posterior_mean_coef2, t, xt.shape) * xt
        return mean, self.ext(self.posterior_log_variance_clipped, t, xt.shape)

    def p_mean_variance(self, model_output, xt, t, clip_denoised=False):
        """model_output: (B, 2C, ...) for learned range, else (B, C, ...) (fixed large)."""
        B, C = xt.shape[:2]
        if model_output.shape[1] == 2 * C:
            eps, v = torch.split(model_output, C, dim=1)
            min_log = self.ext(self.posterior_log_variance_clipped, t, xt.shape)
            max_log = self.ext(self.log_betas, t, xt.shape)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            fl = np.append(self.posterior_variance[1], self.betas[1:])
            log_var = self.ext(np.log(fl), t, xt.shape)
        x0 = self.ext(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - \
            self.ext(self.sqrt_recipm1_alphas_cumprod, t, xt.shape) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, t)
        return dict(mean=mean, log_variance=log_var, pred_xstart=x0)

    def p_sample(self, model_output, xt, t, noise):
        o = self.p_mean_variance(model_output, xt, t)
        nz = (t != 0).float().view(-1, *([1] * (xt.dim() - 1)))
        return o["mean"] + nz * torch.exp(0.5 * o["log_variance"]) * noise, o

    def ddim_sample(self, model_output, xt, t, eta=0.0, noise=None):
        o = self.p_mean_variance(model_output, xt, t)
        x0 = o["pred_xstart"]
        eps = (self.ext(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - x0) / \
            self.ext(self.sqrt_recipm1_alphas_cumprod, t, xt.shape)
        ab = self.ext(self.alphas_cumprod, t, xt.shape)
        abp = self.ext(self.alphas_cumprod_prev, t, xt.shape)
        sig = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        mean = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sig ** 2) * eps
        if noise is None:
            noise = torch.zeros_like(xt)
        nz = (t != 0).float().view(-1, *([1] * (xt.dim() - 1)))
        return mean + nz * sig * noise, o

    def vb_terms_bits(self, x0, xt, t, frozen_out):
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        o = self.p_mean_variance(frozen_out, xt, t)
        kl = normal_kl(true_mean, true_logvar, o["mean"], o["log_variance"])
        kl = kl.flatten(1).mean(1) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, o["mean"], 0.5 * o["log_variance"])
        nll = nll.flatten(1).mean(1) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_terms(self, model_output, x0, xt, t, noise):
        """mse and vb per sample (vb is None without learned sigma)."""
        C = x0.shape[1]
        if model_output.shape[1] == 2 * C:
            eps, v = torch.split(model_output, C, dim=1)
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bits(x0, xt, t, frozen)
        else:
            eps, vb = model_output, None
        mse = ((noise - eps) ** 2).flatten(1).mean(1)
        return mse, vb


def normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + ((m1 - m2) ** 2) * torch.exp(-lv2))


def approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    cx = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = approx_std_normal_cdf(inv * (cx + 1.0 / 255.0))
    cdf_min = approx_std_normal_cdf(inv * (cx - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_1m_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_1m_cdf_min, torch.log(delta.clamp(min=1e-12))))


# --------------------------------------------------------------------------------------
# Training loss (SPEC 4, as the release's train.py computes it)
# --------------------------------------------------------------------------------------


def ratio_loss(p: torch.Tensor, natural: torch.Tensor, N: float, ratio_batch_size=None):
    def sw(avg_p, r):
        return ((1 - r) * (1 - avg_p) + r * avg_p * (N - 1)) * N / (N - 1)

    B = p.shape[0]
    if ratio_batch_size is None:
        return sw(p.float().mean(), natural.float().mean())
    g = B // ratio_batch_size
    assert g * ratio_batch_size == B, "batch must be a multiple of ratio_batch_size"
    avg = p.float().reshape(g, -1).mean(-1)
    tr = natural.float().reshape(g, -1).mean(-1)
    return sw(avg, tr).mean()


def training_loss(model, diffusion: Diffusion, x0, t, y, noise, tail_drop_frac=0.0,
                  loss_dtype=torch.float32):
    cfg = model.cfg
    t = t.long()
    xt = diffusion.q_sample(x0, t, noise)
    res = model(xt, t, y, tail_drop_frac)
    diffusion.dtype = loss_dtype
    try:
        mse, vb = diffusion.training_terms(res["out"].to(loss_dtype), x0.to(loss_dtype),
                                           xt.to(loss_dtype), t, noise.to(loss_dtype))
    finally:
        diffusion.dtype = torch.float32
    per = mse + vb if vb is not None else mse
    diff_loss = per.mean().float()
    mse = mse.float()
    vb = vb.float() if vb is not None else None
    if cfg.name == "DC-DiT" and cfg.ratio_loss_weight > 0:
        N = cfg.downsample_factor
        N = N[0] if isinstance(N, list) else N
        rl = ratio_loss(res["boundary_prob"], res["natural_mask"], float(N), cfg.ratio_batch_size)
    else:
        rl = torch.zeros(())
    loss = diff_loss + cfg.ratio_loss_weight * rl
    return dict(loss=loss, mse=mse.mean(), vb=(vb.mean() if vb is not None else torch.zeros(())),
                ratio=rl, model=res)
