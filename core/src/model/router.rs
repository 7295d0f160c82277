//! The router networks that score each token's boundary probability (SPEC 2).
//! The hard decisions made from the scores (threshold, forced ends, tail
//! dropping) are in [`crate::router`].

use super::layers::{Conv, GroupNorm, Linear};
use super::params::{ParamId, ParamLayout, Registry};
use super::Ctx;
use crate::backend::{Backend, Binary, Grid, Unary};
use crate::config::RouterKind;
use crate::error::Result;
use crate::flops::Component;

/// A router network: `h (B*L, D)` → `p (B*L, 1)`.
#[derive(Debug, Clone)]
pub enum RouterNet {
    /// The release's predictability router: local prediction residuals scored by a small conv net.
    Predictability {
        /// `Conv1x1(D -> D/4)`.
        proj: Conv,
        /// `Conv3x3(D/4 -> D/4)` predicting each token from its neighbours.
        context: Conv,
        /// `Conv3x3` of the residual.
        score0: Conv,
        /// `GroupNorm(8, D/4)`.
        score_norm: GroupNorm,
        /// `Conv1x1(D/4 -> 1)`, bias initialised to -1.1.
        score_out: Conv,
    },
    /// The paper's cosine router: `p = (1 - cos(q_i, k̄_i)) / 2`.
    Cosine {
        /// `W_Q`, no bias.
        q: Linear,
        /// `W_K`, no bias.
        k: Linear,
        /// Depthwise 3x3 smoothing of `k`, `(D, 1, 3, 3)`.
        smooth: ParamId,
        /// Width D.
        d: usize,
    },
}

impl RouterNet {
    /// Registers `hnet.routing_module.*`.
    pub fn new(reg: &mut Registry, kind: RouterKind, d: usize) -> Self {
        let p = "hnet.routing_module";
        match kind {
            RouterKind::Predictability => {
                let b = d / 4;
                RouterNet::Predictability {
                    proj: Conv::new(reg, &alloc::format!("{p}.proj"), d, b, 1),
                    context: Conv::new(reg, &alloc::format!("{p}.context_predictor"), b, b, 3),
                    score0: Conv::new(reg, &alloc::format!("{p}.residual_scorer.0"), b, b, 3),
                    score_norm: GroupNorm::new(reg, &alloc::format!("{p}.residual_scorer.1"), 8, b),
                    score_out: Conv::new(reg, &alloc::format!("{p}.residual_scorer.3"), b, 1, 1),
                }
            }
            RouterKind::Cosine => RouterNet::Cosine {
                q: Linear::new(reg, &alloc::format!("{p}.q_proj"), d, d, false),
                k: Linear::new(reg, &alloc::format!("{p}.k_proj"), d, d, false),
                smooth: reg.param(
                    &alloc::format!("{p}.k_smooth.weight"),
                    &[d, 1, 3, 3],
                    ParamLayout::Plain,
                ),
                d,
            },
        }
    }

    /// Boundary probabilities `(B*L, 1)` before the forced ends.
    pub fn forward<B: Backend>(
        &self,
        cx: &mut Ctx<B>,
        h: &B::Tensor,
        grid: Grid,
    ) -> Result<B::Tensor> {
        let comp = Component::Routing;
        match self {
            RouterNet::Predictability {
                proj,
                context,
                score0,
                score_norm,
                score_out,
            } => {
                let z = proj.forward(cx, h, grid, comp)?;
                let zh = context.forward(cx, &z, grid, comp)?;
                let u = cx.b.binary(&z, &zh, Binary::Sub)?;
                let s = score0.forward(cx, &u, grid, comp)?;
                let s = score_norm.forward(cx, &s, grid)?;
                let s = cx.b.unary(&s, Unary::Silu)?;
                let logit = score_out.forward(cx, &s, grid, comp)?;
                cx.b.unary(&logit, Unary::Sigmoid)
            }
            RouterNet::Cosine { q, k, smooth, d } => {
                let qv = q.forward(cx, h, comp)?;
                let qv = cx.b.l2_normalize(&qv)?;
                let kv = k.forward(cx, h, comp)?;
                let kv = cx.b.l2_normalize(&kv)?;
                let w = cx.b.reshape(cx.p.get(*smooth), &[*d, 9])?;
                cx.flops.add(comp, 2 * (grid.rows() * d * 9) as u64);
                let kb = cx.b.depthwise_conv3x3(&kv, grid, &w)?;
                let kb = cx.b.l2_normalize(&kb)?;
                let s = cx.b.binary(&qv, &kb, Binary::Mul)?;
                let s = cx.b.row_sum(&s)?;
                cx.b.affine(&s, -0.5, 0.5)
            }
        }
    }
}
