//! The tape: recorded operations in execution order, and the reverse walk.

use alloc::vec::Vec;
use dcdit_core::backend::{Binary, DType, Grid, Unary};
use dcdit_core::{Error, GradBackend, Result};

/// Index of a node on the current tape, or `None` for a constant input.
pub(crate) type Ix = Option<usize>;

/// One recorded operation: what its backward needs, and the tape indices of
/// its tracked inputs (`None` = constant input, no gradient computed).
///
/// Saved tensors are `Option`s where only some input gradients need them
/// (e.g. `linear` keeps `w` only if `x` needs a gradient and `x` only if `w`
/// does).
pub(crate) enum Op<B: GradBackend> {
    /// A tracked leaf (a parameter): its gradient is returned by backward.
    Leaf,
    Linear {
        x: Option<B::Tensor>,
        w: Option<B::Tensor>,
        px: Ix,
        pw: Ix,
        pb: Ix,
    },
    Conv2d {
        x: B::Tensor,
        w: B::Tensor,
        grid: Grid,
        k: usize,
        px: Ix,
        pw: Ix,
        pb: Ix,
    },
    Depthwise {
        x: B::Tensor,
        w: B::Tensor,
        grid: Grid,
        px: Ix,
        pw: Ix,
    },
    GroupNorm {
        x: B::Tensor,
        gamma: B::Tensor,
        grid: Grid,
        groups: usize,
        eps: f32,
        px: Ix,
        pg: Ix,
        pb: Ix,
    },
    LayerNorm {
        x: B::Tensor,
        eps: f32,
        px: Ix,
    },
    RmsNorm {
        x: B::Tensor,
        w: B::Tensor,
        eps: f32,
        px: Ix,
        pw: Ix,
    },
    L2Normalize {
        x: B::Tensor,
        px: Ix,
    },
    Unary {
        x: B::Tensor,
        op: Unary,
        px: Ix,
    },
    Add {
        pa: Ix,
        pb: Ix,
    },
    Sub {
        pa: Ix,
        pb: Ix,
    },
    Mul {
        /// Saved when `b` needs a gradient.
        a: Option<B::Tensor>,
        /// Saved when `a` needs a gradient.
        b: Option<B::Tensor>,
        pa: Ix,
        pb: Ix,
    },
    Affine {
        a: f32,
        px: Ix,
    },
    RowSum {
        shape: Vec<usize>,
        px: Ix,
    },
    ScaleRows {
        /// Saved when `s` needs a gradient.
        x: Option<B::Tensor>,
        /// Saved when `x` needs a gradient.
        s: Option<B::Tensor>,
        px: Ix,
        ps: Ix,
    },
    Ste {
        px: Ix,
    },
    AddSegment {
        seg: Vec<usize>,
        px: Ix,
        pv: Ix,
    },
    Modulate {
        x: B::Tensor,
        ada: B::Tensor,
        shift_at: usize,
        scale_at: usize,
        seg: Vec<usize>,
        px: Ix,
        pada: Ix,
    },
    GatedAdd {
        /// `(y, ada)`, saved when `y` or `ada` needs a gradient.
        y_ada: Option<(B::Tensor, B::Tensor)>,
        gate_at: usize,
        seg: Vec<usize>,
        px: Ix,
        py: Ix,
        pada: Ix,
    },
    Gather {
        idx: Vec<u32>,
        rows: usize,
        px: Ix,
    },
    ScatterAdd {
        idx: Vec<u32>,
        px: Ix,
    },
    Reshape {
        shape: Vec<usize>,
        px: Ix,
    },
    Cast {
        dtype: DType,
        px: Ix,
    },
    Attention {
        qkv: B::Tensor,
        heads: usize,
        seg: Vec<usize>,
        px: Ix,
    },
    DechunkSmooth {
        h: B::Tensor,
        p: B::Tensor,
        pos: Vec<u32>,
        width: usize,
        sigma: f32,
        seg: Vec<usize>,
        ph: Ix,
        pp: Ix,
    },
}

/// The recorded graph of the current step.
pub(crate) struct Tape<B: GradBackend> {
    pub(crate) nodes: Vec<Op<B>>,
    /// Incremented on every reset, so tensors of an earlier tape are detected.
    pub(crate) epoch: u64,
    pub(crate) grad_enabled: bool,
}

impl<B: GradBackend> Default for Tape<B> {
    fn default() -> Self {
        Tape {
            nodes: Vec::new(),
            epoch: 0,
            grad_enabled: true,
        }
    }
}

impl<B: GradBackend> Tape<B> {
    /// Drops every node and starts a new epoch.
    pub(crate) fn reset(&mut self) -> Vec<Op<B>> {
        self.epoch += 1;
        core::mem::take(&mut self.nodes)
    }
}

/// Adds `g` into the gradient slot of `ix` (no-op for constants).
#[inline]
pub(crate) fn accumulate<B: GradBackend>(
    b: &B,
    grads: &mut [Option<B::Tensor>],
    ix: Ix,
    g: B::Tensor,
) -> Result<()> {
    let Some(i) = ix else { return Ok(()) };
    let slot = grads
        .get_mut(i)
        .ok_or_else(|| Error::backend("autodiff: gradient for a node past the tape"))?;
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => b.binary(&prev, &g, Binary::Add)?,
    });
    Ok(())
}

fn need(ix: Ix) -> bool {
    ix.is_some()
}

fn missing() -> Error {
    Error::backend("autodiff: a saved tensor the backward needs was not recorded")
}

/// Runs the backward of one node: maps its output gradient `g` to its inputs'
/// gradients and accumulates them. Consumes the node (its saved tensors are
/// dropped on return).
pub(crate) fn backward_op<B: GradBackend>(
    b: &B,
    op: Op<B>,
    g: B::Tensor,
    grads: &mut [Option<B::Tensor>],
) -> Result<()> {
    match op {
        Op::Leaf => Ok(()),
        Op::Linear { x, w, px, pw, pb } => {
            if need(pb) {
                let db = b.col_sum(&g)?;
                accumulate(b, grads, pb, db)?;
            }
            if need(pw) {
                let x = x.as_ref().ok_or_else(missing)?;
                let dw = b.matmul(&g, x, true, false)?;
                accumulate(b, grads, pw, dw)?;
            }
            if need(px) {
                let w = w.as_ref().ok_or_else(missing)?;
                let dx = b.matmul(&g, w, false, false)?;
                accumulate(b, grads, px, dx)?;
            }
            Ok(())
        }
        Op::Conv2d {
            x,
            w,
            grid,
            k,
            px,
            pw,
            pb,
        } => {
            if !need(px) {
                // The input is a constant (the noisy image): no dx to compute.
                let (dw, db) = b.conv2d_weight_backward(&x, grid, &w, k, &g)?;
                drop((x, w));
                accumulate(b, grads, pb, db)?;
                return accumulate(b, grads, pw, dw);
            }
            let (dx, dw, db) = b.conv2d_backward(&x, grid, &w, k, &g)?;
            drop((x, w));
            accumulate(b, grads, pb, db)?;
            accumulate(b, grads, pw, dw)?;
            accumulate(b, grads, px, dx)
        }
        Op::Depthwise { x, w, grid, px, pw } => {
            let (dx, dw) = b.depthwise_conv3x3_backward(&x, grid, &w, &g)?;
            accumulate(b, grads, pw, dw)?;
            accumulate(b, grads, px, dx)
        }
        Op::GroupNorm {
            x,
            gamma,
            grid,
            groups,
            eps,
            px,
            pg,
            pb,
        } => {
            let (dx, dg, db) = b.group_norm_backward(&x, grid, groups, &gamma, eps, &g)?;
            accumulate(b, grads, pb, db)?;
            accumulate(b, grads, pg, dg)?;
            accumulate(b, grads, px, dx)
        }
        Op::LayerNorm { x, eps, px } => {
            let dx = b.layer_norm_backward(&x, eps, &g)?;
            accumulate(b, grads, px, dx)
        }
        Op::RmsNorm { x, w, eps, px, pw } => {
            let (dx, dw) = b.rms_norm_backward(&x, &w, eps, &g)?;
            accumulate(b, grads, pw, dw)?;
            accumulate(b, grads, px, dx)
        }
        Op::L2Normalize { x, px } => {
            let dx = b.l2_normalize_backward(&x, &g)?;
            accumulate(b, grads, px, dx)
        }
        Op::Unary { x, op, px } => {
            let dx = b.unary_backward(&x, op, &g)?;
            accumulate(b, grads, px, dx)
        }
        Op::Add { pa, pb } => {
            if need(pb) {
                accumulate(b, grads, pb, g.clone())?;
            }
            accumulate(b, grads, pa, g)
        }
        Op::Sub { pa, pb } => {
            if need(pb) {
                let n = b.affine(&g, -1.0, 0.0)?;
                accumulate(b, grads, pb, n)?;
            }
            accumulate(b, grads, pa, g)
        }
        Op::Mul { a, b: bt, pa, pb } => {
            if need(pb) {
                let a = a.as_ref().ok_or_else(missing)?;
                let db = b.binary(&g, a, Binary::Mul)?;
                accumulate(b, grads, pb, db)?;
            }
            if need(pa) {
                let bt = bt.as_ref().ok_or_else(missing)?;
                let da = b.binary(&g, bt, Binary::Mul)?;
                accumulate(b, grads, pa, da)?;
            }
            Ok(())
        }
        Op::Affine { a, px } => {
            let dx = if a == 1.0 { g } else { b.affine(&g, a, 0.0)? };
            accumulate(b, grads, px, dx)
        }
        Op::RowSum { shape, px } => {
            let ones = b.full(&shape, 1.0)?;
            let dx = b.scale_rows(&ones, &g)?;
            accumulate(b, grads, px, dx)
        }
        Op::ScaleRows { x, s, px, ps } => {
            if need(ps) {
                let x = x.as_ref().ok_or_else(missing)?;
                let gx = b.binary(&g, x, Binary::Mul)?;
                let ds = b.row_sum(&gx)?;
                accumulate(b, grads, ps, ds)?;
            }
            if need(px) {
                let s = s.as_ref().ok_or_else(missing)?;
                let dx = b.scale_rows(&g, s)?;
                accumulate(b, grads, px, dx)?;
            }
            Ok(())
        }
        // Straight-through: the forward is exactly 1, the backward is the identity.
        Op::Ste { px } => accumulate(b, grads, px, g),
        Op::AddSegment { seg, px, pv } => {
            if need(pv) {
                let dv = b.segment_sum(&g, &seg)?;
                accumulate(b, grads, pv, dv)?;
            }
            accumulate(b, grads, px, g)
        }
        Op::Modulate {
            x,
            ada,
            shift_at,
            scale_at,
            seg,
            px,
            pada,
        } => {
            let (dx, dada) = b.modulate_backward(&x, &ada, shift_at, scale_at, &seg, &g)?;
            drop((x, ada));
            accumulate(b, grads, pada, dada)?;
            accumulate(b, grads, px, dx)
        }
        Op::GatedAdd {
            y_ada,
            gate_at,
            seg,
            px,
            py,
            pada,
        } => {
            if need(py) || need(pada) {
                let (y, ada) = y_ada.as_ref().ok_or_else(missing)?;
                let (dy, dada) = b.gated_add_backward(y, ada, gate_at, &seg, &g)?;
                accumulate(b, grads, pada, dada)?;
                accumulate(b, grads, py, dy)?;
            }
            accumulate(b, grads, px, g)
        }
        Op::Gather { idx, rows, px } => {
            let dx = b.scatter_add_rows(&g, &idx, rows)?;
            accumulate(b, grads, px, dx)
        }
        Op::ScatterAdd { idx, px } => {
            let dx = b.gather_rows(&g, &idx)?;
            accumulate(b, grads, px, dx)
        }
        Op::Reshape { shape, px } => {
            let dx = b.reshape(&g, &shape)?;
            accumulate(b, grads, px, dx)
        }
        Op::Cast { dtype, px } => {
            let dx = if b.dtype(&g) == dtype {
                g
            } else {
                b.cast(&g, dtype)?
            };
            accumulate(b, grads, px, dx)
        }
        Op::Attention {
            qkv,
            heads,
            seg,
            px,
        } => {
            let dx = b.attention_backward(&qkv, heads, &seg, &g)?;
            accumulate(b, grads, px, dx)
        }
        Op::DechunkSmooth {
            h,
            p,
            pos,
            width,
            sigma,
            seg,
            ph,
            pp,
        } => {
            let (dh, dp) = b.dechunk_smooth_backward(&h, &p, &pos, width, sigma, &seg, &g)?;
            drop((h, p));
            accumulate(b, grads, pp, dp)?;
            accumulate(b, grads, ph, dh)
        }
    }
}
