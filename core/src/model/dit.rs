//! The fixed-patch DiT baseline (SPEC 8): a `P x P` stride-`P` patch
//! embedding, the same DiT blocks and final layer, then unpatchify.

use super::layers::{Conditioning, DitBlock, FinalLayer};
use super::params::{ParamId, ParamLayout, Registry};
use super::Ctx;
use crate::backend::{uniform_segments, Backend, Binary, Unary};
use crate::config::ModelSpec;
use crate::error::Result;
use crate::flops::Component;
use alloc::vec::Vec;

/// The DiT layer structure.
#[derive(Debug, Clone)]
pub struct Dit {
    patch_w: ParamId,
    patch_b: ParamId,
    cond: Conditioning,
    pos_embed: ParamId,
    blocks: Vec<DitBlock>,
    final_layer: FinalLayer,
    height: usize,
    width: usize,
    patch: usize,
    cin: usize,
    cout: usize,
    d: usize,
}

impl Dit {
    /// Registers the original DiT's keys (`x_embedder.proj`, `blocks.N.*`, ...).
    pub fn new(s: &ModelSpec, reg: &mut Registry) -> Self {
        let (d, p) = (s.width_d, s.patch);
        let patch_w = reg.param(
            "x_embedder.proj.weight",
            &[d, s.in_channels, p, p],
            ParamLayout::ConvOihw,
        );
        let patch_b = reg.param("x_embedder.proj.bias", &[d], ParamLayout::Plain);
        let cond = Conditioning::new(reg, d, s.num_classes, s.null_class);
        let n = s.tokens() / (p * p);
        let pos_embed = reg.buffer("pos_embed", &[1, n, d]);
        let blocks = s
            .main
            .iter()
            .enumerate()
            .map(|(i, k)| {
                DitBlock::new(
                    reg,
                    &alloc::format!("blocks.{i}"),
                    d,
                    s.heads,
                    s.mlp_hidden,
                    *k,
                )
            })
            .collect();
        let final_layer = FinalLayer::new(reg, d, d, p * p * s.out_channels);
        Dit {
            patch_w,
            patch_b,
            cond,
            pos_embed,
            blocks,
            final_layer,
            height: s.height,
            width: s.width,
            patch: p,
            cin: s.in_channels,
            cout: s.out_channels,
            d,
        }
    }

    /// Row of pixel `(b, y, x)`'s patch entry `(token, py, px)` in patch-major order.
    fn patch_rows(&self, batch: usize) -> Vec<u32> {
        let (p, h, w) = (self.patch, self.height, self.width);
        let (ph, pw) = (h / p, w / p);
        let mut idx = Vec::with_capacity(batch * h * w);
        for b in 0..batch {
            for i in 0..ph {
                for j in 0..pw {
                    for py in 0..p {
                        for px in 0..p {
                            idx.push((b * h * w + (i * p + py) * w + j * p + px) as u32);
                        }
                    }
                }
            }
        }
        idx
    }

    /// The forward pass.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        t: &[f32],
        y: &[u32],
    ) -> Result<B::Tensor> {
        let batch = t.len();
        let (p, l) = (self.patch, self.height * self.width);
        let n = l / (p * p);
        // Patchify: gather each patch's pixels contiguously, then one Linear.
        let fwd = self.patch_rows(batch);
        let xp = cx.b.gather_rows(x, &fwd)?;
        let xp = cx.b.reshape(&xp, &[batch * n, p * p * self.cin])?;
        let w =
            cx.b.reshape(cx.p.get(self.patch_w), &[self.d, p * p * self.cin])?;
        cx.flops
            .linear(Component::Embeddings, batch * n, p * p * self.cin, self.d);
        let h = cx.b.linear(&xp, &w, Some(cx.p.get(self.patch_b)))?;
        let table = cx.b.reshape(cx.p.get(self.pos_embed), &[n, self.d])?;
        let pos: Vec<u32> = (0..batch).flat_map(|_| 0..n as u32).collect();
        let pe = cx.b.gather_rows(&table, &pos)?;
        let mut h = cx.b.binary(&h, &pe, Binary::Add)?;

        let c = self.cond.forward(cx, t, y)?;
        let silu_c = cx.b.unary(&c, Unary::Silu)?;
        let seg = uniform_segments(batch, n);
        for blk in &self.blocks {
            h = blk.forward(cx, &h, &silu_c, &seg)?;
        }
        let out = self.final_layer.forward(cx, &h, &silu_c, &seg)?;
        // Unpatchify: rows (token, py, px) back to pixel order.
        let out = cx.b.reshape(&out, &[batch * l, self.cout])?;
        let mut inv = alloc::vec![0u32; fwd.len()];
        for (k, &r) in fwd.iter().enumerate() {
            inv[r as usize] = k as u32;
        }
        cx.b.gather_rows(&out, &inv)
    }
}
