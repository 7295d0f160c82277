//! DC-DiT (SPEC 1): encoder → router → chunk → DiT blocks on the kept tokens
//! → de-chunk → gated residual → decoder → final layer.

use super::layers::{Conditioning, Conv, ConvStack, DitBlock, FinalLayer, Linear, RmsNorm};
use super::params::{ParamId, Registry};
use super::router::RouterNet;
use super::{Ctx, Routing};
use crate::backend::{uniform_segments, Backend, Binary, Grid, Unary};
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::flops::Component;
use crate::{chunk, dechunk, router};
use alloc::vec;
use alloc::vec::Vec;

/// The DC-DiT layer structure.
#[derive(Debug, Clone)]
pub struct DcDit {
    x_embed: Conv,
    cond: Conditioning,
    pos_embed: ParamId,
    encoder: ConvStack,
    residual: Linear,
    router: RouterNet,
    blocks: Vec<DitBlock>,
    main_norm: RmsNorm,
    decoder: ConvStack,
    final_layer: FinalLayer,
    height: usize,
    width: usize,
    d: usize,
    sigma: f32,
}

impl DcDit {
    /// Registers every parameter under the release's key names.
    pub fn new(s: &ModelSpec, reg: &mut Registry) -> Self {
        let (d, e) = (s.width_d, s.enc_dim);
        let x_embed = Conv::new(reg, "x_embedder.proj", s.in_channels, e, 3);
        let cond = Conditioning::new(reg, d, s.num_classes, s.null_class);
        let pos_embed = reg.buffer("pos_embed", &[1, s.tokens(), d]);
        let encoder = ConvStack::new(reg, "hnet.encoder", s.encoder.len(), e, d, d, true);
        let residual = Linear::new(reg, "hnet.residual_proj", d, d, true);
        let router = RouterNet::new(reg, s.router, d);
        let blocks = s
            .main
            .iter()
            .enumerate()
            .map(|(i, k)| {
                DitBlock::new(
                    reg,
                    &alloc::format!("hnet.main_network.main_network.layers.{i}"),
                    d,
                    s.heads,
                    s.mlp_hidden,
                    *k,
                )
            })
            .collect();
        let main_norm = RmsNorm::new(reg, "hnet.main_network.main_network.rmsnorm", d);
        let decoder = ConvStack::new(reg, "hnet.decoder", s.decoder.len(), d, e, d, false);
        let final_layer = FinalLayer::new(reg, e, d, s.out_channels);
        DcDit {
            x_embed,
            cond,
            pos_embed,
            encoder,
            residual,
            router,
            blocks,
            main_norm,
            decoder,
            final_layer,
            height: s.height,
            width: s.width,
            d,
            sigma: s.sigma,
        }
    }

    /// The forward pass; `fractions` is the tail-drop fraction per sample.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        x: &B::Tensor,
        t: &[f32],
        y: &[u32],
        fractions: &[f32],
    ) -> Result<(B::Tensor, Routing<B>)> {
        let batch = t.len();
        let l = self.height * self.width;
        let grid = Grid {
            batch,
            height: self.height,
            width: self.width,
        };
        let full_seg = uniform_segments(batch, l);

        // Embeddings and conditioning; SiLU(c) feeds every adaLN / cond projection.
        cx.enter(Component::Embeddings);
        let h = self.x_embed.forward(cx, x, grid, Component::Embeddings)?;
        let c = self.cond.forward(cx, t, y)?;
        let silu_c = cx.b.unary(&c, Unary::Silu)?;

        // Encoder and residual branch.
        cx.enter(Component::Encoder);
        let h = self
            .encoder
            .forward(cx, &h, grid, &silu_c, Component::Encoder)?;
        let r = self.residual.forward(cx, &h, Component::Encoder)?;

        // Router: scores on the device, hard decisions on the host (the one sync).
        cx.enter(Component::Routing);
        let p_raw = self.router.forward(cx, &h, grid)?;
        let mut prob = cx.b.to_f32(&p_raw)?;
        if prob.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite("router boundary probabilities".into()));
        }
        let mut natural = vec![false; batch * l];
        let mut mask = vec![false; batch * l];
        let mut scratch = vec![0u32; l];
        let mut kept = Vec::with_capacity(batch);
        for (s, &fraction) in fractions.iter().enumerate() {
            let range = s * l..(s + 1) * l;
            router::force_ends(&mut prob[range.clone()]);
            router::natural_mask(&prob[range.clone()], &mut natural[range.clone()]);
            mask[range.clone()].copy_from_slice(&natural[range.clone()]);
            router::tail_drop_with_scratch(
                &prob[range.clone()],
                &mut mask[range.clone()],
                fraction,
                &mut scratch,
            );
            kept.push(mask[range].iter().filter(|m| **m).count());
        }
        // p with the two ends replaced by the constant 1 (no gradient there).
        let mut keep_grad = vec![1.0f32; batch * l];
        let mut ends = vec![0.0f32; batch * l];
        for s in 0..batch {
            for i in [s * l, s * l + l - 1] {
                keep_grad[i] = 0.0;
                ends[i] = 1.0;
            }
        }
        let kg = cx.b.from_f32(&keep_grad, &[batch * l, 1])?;
        let en = cx.b.from_f32(&ends, &[batch * l, 1])?;
        let p = cx.b.binary(&p_raw, &kg, Binary::Mul)?;
        let p = cx.b.binary(&p, &en, Binary::Add)?;

        // Chunk: kept tokens of every sample packed into one varlen sequence.
        cx.enter(Component::Chunk);
        let mut seg = vec![0usize; batch + 1];
        let mut gather = Vec::new();
        let mut pos = Vec::new();
        let mut idx = vec![0u32; l];
        for s in 0..batch {
            let m = chunk::kept_indices(&mask[s * l..(s + 1) * l], &mut idx);
            seg[s + 1] = seg[s] + m;
            for &i in &idx[..m] {
                gather.push((s * l) as u32 + i);
                pos.push(i);
            }
        }
        let hc = cx.b.gather_rows(&h, &gather)?;
        let table = cx.b.reshape(cx.p.get(self.pos_embed), &[l, self.d])?;
        let pe = cx.b.gather_rows(&table, &pos)?;
        let mut z = cx.b.binary(&hc, &pe, Binary::Add)?;

        // Main network on the packed kept tokens. Mixed precision follows
        // the parameters: the main network computes in its own parameters'
        // dtype (e.g. bf16, where most FLOPs are), the encoder, router and
        // decoder in theirs (f32 keeps the discrete routing decisions off
        // 16-bit rounding); the activations are cast at the two borders.
        cx.enter(Component::MainNetwork);
        let outer = cx.b.dtype(&z);
        let inner = self.main_norm.dtype(cx);
        let main_c;
        let silu_main = if inner != outer {
            z = cx.b.cast(&z, inner)?;
            main_c = cx.b.cast(&silu_c, inner)?;
            &main_c
        } else {
            &silu_c
        };
        for blk in &self.blocks {
            z = blk.forward(cx, &z, silu_main, &seg)?;
        }
        let mut z = self.main_norm.forward(cx, &z)?;
        if inner != outer {
            z = cx.b.cast(&z, outer)?;
        }

        // De-chunk: smoothing among kept tokens, then nearest plug-back.
        cx.enter(Component::Dechunk);
        let pk = cx.b.gather_rows(&p, &gather)?;
        let lens = seg.windows(2).map(|w| w[1] - w[0]);
        cx.flops.add(
            Component::Dechunk,
            lens.map(|m| 2 * (m * m * self.d) as u64).sum(),
        );
        let sm =
            cx.b.dechunk_smooth(&z, &pk, &pos, self.width, self.sigma, &seg)?;
        let mut plug = vec![0u32; batch * l];
        let mut pb_scratch = vec![0u32; dechunk::plug_back_scratch_len(self.width)];
        for s in 0..batch {
            let out = &mut plug[s * l..(s + 1) * l];
            dechunk::plug_back(
                &mask[s * l..(s + 1) * l],
                self.height,
                self.width,
                out,
                &mut pb_scratch,
            )
            .ok_or_else(|| Error::input("plug-back: a sample kept no token"))?;
            for v in out.iter_mut() {
                *v += seg[s] as u32;
            }
        }
        let dch = cx.b.gather_rows(&sm, &plug)?;

        // Gated residual: h = dechunked * STE(q) + r, q the selected probability.
        let (mut sign, mut off) = (vec![0.0f32; batch * l], vec![0.0f32; batch * l]);
        for i in 0..batch * l {
            (sign[i], off[i]) = if natural[i] { (1.0, 0.0) } else { (-1.0, 1.0) };
        }
        let sg = cx.b.from_f32(&sign, &[batch * l, 1])?;
        let q = cx.b.binary(&p, &sg, Binary::Mul)?;
        let of = cx.b.from_f32(&off, &[batch * l, 1])?;
        let q = cx.b.binary(&q, &of, Binary::Add)?;
        let gate = cx.b.ste(&q)?;
        let hd = cx.b.scale_rows(&dch, &gate)?;
        let h = cx.b.binary(&hd, &r, Binary::Add)?;

        // Decoder and final layer.
        cx.enter(Component::Decoder);
        let h = self
            .decoder
            .forward(cx, &h, grid, &silu_c, Component::Decoder)?;
        cx.enter(Component::FinalLayer);
        let out = self.final_layer.forward(cx, &h, &silu_c, &full_seg)?;
        Ok((
            out,
            Routing {
                p,
                boundary_prob: prob,
                natural,
                mask,
                kept,
            },
        ))
    }
}
