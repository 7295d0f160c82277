//! The building blocks shared by DC-DiT and the DiT baseline, each written
//! once over the backend trait: embeddings, the conv residual block of the
//! encoder/decoder, the adaLN-Zero DiT block and the final layer.

use super::params::{ParamId, ParamLayout, Registry};
use super::Ctx;
use crate::backend::{Backend, Binary, Grid, Segments, Unary};
use crate::config::BlockKind;
use crate::embed;
use crate::error::{Error, Result};
use crate::flops::Component;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// A `Linear(in, out)` with bias.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    w: ParamId,
    b: Option<ParamId>,
    /// Input width.
    pub inp: usize,
    /// Output width.
    pub out: usize,
}

impl Linear {
    /// Registers `{prefix}.weight` `(out, inp)` and, with `bias`, `{prefix}.bias`.
    pub fn new(reg: &mut Registry, prefix: &str, inp: usize, out: usize, bias: bool) -> Self {
        let w = reg.param(&format!("{prefix}.weight"), &[out, inp], ParamLayout::Plain);
        let b = bias.then(|| reg.param(&format!("{prefix}.bias"), &[out], ParamLayout::Plain));
        Linear { w, b, inp, out }
    }
    /// `x w^T + b` over `rows` rows.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        comp: Component,
    ) -> Result<B::Tensor> {
        let rows = cx.b.shape(x)[0];
        cx.flops.linear(comp, rows, self.inp, self.out);
        cx.b.linear(x, cx.p.get(self.w), self.b.map(|b| cx.p.get(b)))
    }
}

/// A `k x k` stride-1 "same" convolution with bias (NHWC on the device).
#[derive(Debug, Clone, Copy)]
pub struct Conv {
    w: ParamId,
    b: ParamId,
    cin: usize,
    cout: usize,
    k: usize,
}

impl Conv {
    /// Registers `{prefix}.weight` `(cout, cin, k, k)` and `{prefix}.bias`.
    pub fn new(reg: &mut Registry, prefix: &str, cin: usize, cout: usize, k: usize) -> Self {
        let w = reg.param(
            &format!("{prefix}.weight"),
            &[cout, cin, k, k],
            ParamLayout::ConvOihw,
        );
        let b = reg.param(&format!("{prefix}.bias"), &[cout], ParamLayout::Plain);
        Conv { w, b, cin, cout, k }
    }
    /// Applies the convolution.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        grid: Grid,
        comp: Component,
    ) -> Result<B::Tensor> {
        cx.flops
            .conv(comp, grid.rows(), self.cin, self.cout, self.k);
        cx.b.conv2d(x, grid, cx.p.get(self.w), Some(cx.p.get(self.b)), self.k)
    }
}

/// GroupNorm with affine parameters.
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm {
    w: ParamId,
    b: ParamId,
    groups: usize,
}

impl GroupNorm {
    /// Registers `{prefix}.{weight,bias}` of width `c`.
    pub fn new(reg: &mut Registry, prefix: &str, groups: usize, c: usize) -> Self {
        let w = reg.param(&format!("{prefix}.weight"), &[c], ParamLayout::Plain);
        let b = reg.param(&format!("{prefix}.bias"), &[c], ParamLayout::Plain);
        GroupNorm { w, b, groups }
    }
    /// Normalises with eps 1e-5 (PyTorch's default).
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        grid: Grid,
    ) -> Result<B::Tensor> {
        cx.b.group_norm(
            x,
            grid,
            self.groups,
            cx.p.get(self.w),
            cx.p.get(self.b),
            1e-5,
        )
    }
}

/// RMSNorm with a learned scale, eps 1e-5.
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    w: ParamId,
}

impl RmsNorm {
    /// Registers `{prefix}.weight`.
    pub fn new(reg: &mut Registry, prefix: &str, c: usize) -> Self {
        RmsNorm {
            w: reg.param(&format!("{prefix}.weight"), &[c], ParamLayout::Plain),
        }
    }
    /// The dtype of the weight (the main network's compute dtype).
    pub fn dtype<B: Backend>(&self, cx: &Ctx<B>) -> crate::backend::DType {
        cx.b.dtype(cx.p.get(self.w))
    }
    /// Normalises each row.
    pub fn forward<B: Backend>(&self, cx: &mut Ctx<B>, x: &B::Tensor) -> Result<B::Tensor> {
        cx.b.rms_norm(x, cx.p.get(self.w), 1e-5)
    }
}

/// Timestep and class embeddings: `c = t_emb(t) + y_emb(y)`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    t0: Linear,
    t2: Linear,
    table: ParamId,
    num_classes: usize,
    null_class: bool,
}

/// Width of the sinusoidal timestep features.
pub const FREQ_DIM: usize = 256;

impl Conditioning {
    /// Registers `t_embedder.mlp.{0,2}` and `y_embedder.embedding_table`
    /// (`num_classes` rows, plus the null class when `null_class`).
    pub fn new(reg: &mut Registry, d: usize, num_classes: usize, null_class: bool) -> Self {
        Conditioning {
            t0: Linear::new(reg, "t_embedder.mlp.0", FREQ_DIM, d, true),
            t2: Linear::new(reg, "t_embedder.mlp.2", d, d, true),
            table: reg.param(
                "y_embedder.embedding_table.weight",
                &[num_classes + null_class as usize, d],
                ParamLayout::Plain,
            ),
            num_classes,
            null_class,
        }
    }

    /// `(B, D)` conditioning for timesteps `t` and labels `y` (the null class is `num_classes`).
    pub fn forward<B: Backend>(&self, cx: &mut Ctx<B>, t: &[f32], y: &[u32]) -> Result<B::Tensor> {
        let rows = self.num_classes + self.null_class as usize;
        if let Some(bad) = y.iter().find(|&&l| l as usize >= rows) {
            return Err(Error::input(match self.null_class {
                true => format!("label {bad} out of range: {} classes plus the null class {}", self.num_classes, self.num_classes),
                false => format!("label {bad} out of range: {} classes and no null class (class_dropout_prob is 0)", self.num_classes),
            }));
        }
        let mut feats = vec![0.0f32; t.len() * FREQ_DIM];
        for (row, &tt) in feats.chunks_exact_mut(FREQ_DIM).zip(t) {
            embed::timestep_features(tt, row);
        }
        let f = cx.b.from_f32(&feats, &[t.len(), FREQ_DIM])?;
        let h = self.t0.forward(cx, &f, Component::Embeddings)?;
        let h = cx.b.unary(&h, Unary::Silu)?;
        let temb = self.t2.forward(cx, &h, Component::Embeddings)?;
        let yemb = cx.b.gather_rows(cx.p.get(self.table), y)?;
        cx.b.binary(&temb, &yemb, Binary::Add)
    }
}

/// The Stable-Diffusion-style conv residual block of the encoder/decoder (SPEC 1.3).
#[derive(Debug, Clone)]
pub struct ConvBlock {
    norm1: GroupNorm,
    conv1: Conv,
    cond: Linear,
    norm2: GroupNorm,
    conv2: Conv,
    skip: Option<Conv>,
}

impl ConvBlock {
    /// Registers `{prefix}.{norm1,conv1,cond_proj.1,norm2,conv2,skip_proj}`.
    pub fn new(reg: &mut Registry, prefix: &str, cin: usize, cout: usize, cond_dim: usize) -> Self {
        let ci = cin.min(cout);
        ConvBlock {
            norm1: GroupNorm::new(reg, &format!("{prefix}.norm1"), 32, cin),
            norm2: GroupNorm::new(reg, &format!("{prefix}.norm2"), 32, ci),
            conv1: Conv::new(reg, &format!("{prefix}.conv1"), cin, ci, 3),
            conv2: Conv::new(reg, &format!("{prefix}.conv2"), ci, cout, 3),
            skip: (cin != cout)
                .then(|| Conv::new(reg, &format!("{prefix}.skip_proj"), cin, cout, 1)),
            cond: Linear::new(reg, &format!("{prefix}.cond_proj.1"), cond_dim, ci, true),
        }
    }

    /// `x (B*H*W, cin)` → `(B*H*W, cout)`; `silu_c` is `SiLU(c)`, `(B, D)`.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        grid: Grid,
        silu_c: &B::Tensor,
        seg: Segments,
        comp: Component,
    ) -> Result<B::Tensor> {
        let h = self.norm1.forward(cx, x, grid)?;
        let h = cx.b.unary(&h, Unary::Silu)?;
        let h = self.conv1.forward(cx, &h, grid, comp)?;
        let temb = self.cond.forward(cx, silu_c, comp)?;
        let h = cx.b.add_segment(&h, &temb, seg)?;
        let h = self.norm2.forward(cx, &h, grid)?;
        let h = cx.b.unary(&h, Unary::Silu)?;
        let h = self.conv2.forward(cx, &h, grid, comp)?;
        let skip = match &self.skip {
            Some(s) => s.forward(cx, x, grid, comp)?,
            None => x.clone(),
        };
        cx.b.binary(&h, &skip, Binary::Add)
    }
}

/// A stack of conv blocks followed by RMSNorm: the encoder or the decoder.
#[derive(Debug, Clone)]
pub struct ConvStack {
    blocks: Vec<ConvBlock>,
    norm: RmsNorm,
}

impl ConvStack {
    /// The encoder (`is_encoder`: all blocks at `inp`, the last maps to `out`)
    /// or decoder (the first maps `inp` to `out`, the rest at `out`), as the release.
    pub fn new(
        reg: &mut Registry,
        prefix: &str,
        n: usize,
        inp: usize,
        out: usize,
        cond_dim: usize,
        is_encoder: bool,
    ) -> Self {
        let blocks = (0..n)
            .map(|i| {
                let (a, b) = if inp == out {
                    (inp, out)
                } else if is_encoder {
                    if i == n - 1 {
                        (inp, out)
                    } else {
                        (inp, inp)
                    }
                } else if i == 0 {
                    (inp, out)
                } else {
                    (out, out)
                };
                ConvBlock::new(reg, &format!("{prefix}.layers.{i}"), a, b, cond_dim)
            })
            .collect();
        ConvStack {
            blocks,
            norm: RmsNorm::new(reg, &format!("{prefix}.rmsnorm"), out),
        }
    }

    /// Runs every block, then the RMSNorm.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        grid: Grid,
        silu_c: &B::Tensor,
        comp: Component,
    ) -> Result<B::Tensor> {
        let seg = crate::backend::uniform_segments(grid.batch, grid.len());
        let mut h = x.clone();
        for b in &self.blocks {
            h = b.forward(cx, &h, grid, silu_c, &seg, comp)?;
        }
        self.norm.forward(cx, &h)
    }
}

/// A DiT block with adaLN-Zero conditioning, over packed variable-length rows.
#[derive(Debug, Clone)]
pub struct DitBlock {
    ada: Linear,
    qkv: Linear,
    proj: Linear,
    mlp: Option<(Linear, Linear)>,
    d: usize,
    heads: usize,
}

impl DitBlock {
    /// Registers `{prefix}.{adaLN_modulation.1,attn.qkv,attn.proj,mlp.fc1,mlp.fc2}`.
    pub fn new(
        reg: &mut Registry,
        prefix: &str,
        d: usize,
        heads: usize,
        mlp_hidden: usize,
        kind: BlockKind,
    ) -> Self {
        DitBlock {
            ada: Linear::new(reg, &format!("{prefix}.adaLN_modulation.1"), d, 6 * d, true),
            qkv: Linear::new(reg, &format!("{prefix}.attn.qkv"), d, 3 * d, true),
            proj: Linear::new(reg, &format!("{prefix}.attn.proj"), d, d, true),
            mlp: (kind == BlockKind::Dit).then(|| {
                (
                    Linear::new(reg, &format!("{prefix}.mlp.fc1"), d, mlp_hidden, true),
                    Linear::new(reg, &format!("{prefix}.mlp.fc2"), mlp_hidden, d, true),
                )
            }),
            d,
            heads,
        }
    }

    /// `x (T, D)` packed rows of the samples in `seg`; `silu_c (B, D)`.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        silu_c: &B::Tensor,
        seg: Segments,
    ) -> Result<B::Tensor> {
        let comp = Component::MainNetwork;
        let ada = self.ada.forward(cx, silu_c, comp)?;
        let h = cx.b.norm_modulate(x, &ada, 0, 1, seg, 1e-6)?;
        let qkv = self.qkv.forward(cx, &h, comp)?;
        let hd = self.d / self.heads;
        cx.flops
            .attention(comp, seg.windows(2).map(|w| w[1] - w[0]), self.heads, hd);
        let a = cx.b.attention(&qkv, self.heads, seg)?;
        let a = self.proj.forward(cx, &a, comp)?;
        let mut x = cx.b.gated_add(x, &a, &ada, 2, seg)?;
        if let Some((fc1, fc2)) = &self.mlp {
            let h = cx.b.norm_modulate(&x, &ada, 3, 4, seg, 1e-6)?;
            let h = fc1.forward(cx, &h, comp)?;
            let h = cx.b.unary(&h, Unary::GeluTanh)?;
            let h = fc2.forward(cx, &h, comp)?;
            x = cx.b.gated_add(&x, &h, &ada, 5, seg)?;
        }
        Ok(x)
    }
}

/// The final layer: adaLN-modulated LayerNorm and a Linear to the output channels.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    ada: Linear,
    linear: Linear,
}

impl FinalLayer {
    /// Registers `final_layer.{adaLN_modulation.1,linear}`.
    pub fn new(reg: &mut Registry, width: usize, cond_dim: usize, out: usize) -> Self {
        FinalLayer {
            ada: Linear::new(
                reg,
                "final_layer.adaLN_modulation.1",
                cond_dim,
                2 * width,
                true,
            ),
            linear: Linear::new(reg, "final_layer.linear", width, out, true),
        }
    }
    /// `x (rows, width)` → `(rows, out)`.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        silu_c: &B::Tensor,
        seg: Segments,
    ) -> Result<B::Tensor> {
        let comp = Component::FinalLayer;
        let ada = self.ada.forward(cx, silu_c, comp)?;
        let h = cx.b.norm_modulate(x, &ada, 0, 1, seg, 1e-6)?;
        self.linear.forward(cx, &h, comp)
    }
}
