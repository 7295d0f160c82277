//! The backward and optimiser operations a backend provides so that the
//! autodiff decorator (`dcdit-autodiff`) can train through it. Inference needs
//! only [`Backend`]; training needs `B: GradBackend`.
//!
//! Each `*_backward` takes the forward's inputs and the gradient `g` of the
//! forward's output, and returns the gradients of the inputs, in the same
//! layouts as the forward (see [`crate::backend`]). Gradients of parameters
//! are returned, not accumulated.

use crate::backend::{Backend, Grid, Segments, Unary};
use crate::error::Result;

/// AdamW hyper-parameters of one step (PyTorch's `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// 1-based step number (for bias correction).
    pub step: u64,
}

/// The per-step scalars of an AdamW update, formed as torch forms them
/// (python doubles, rounded to f32 where they meet an f32 tensor), so every
/// backend applies the same rounded values:
/// `p = p * decay; m += w1 (g - m); v = b2 v + w2 g^2;
/// p += neg_step * m / (sqrt(v) / bc2_sqrt + eps)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `1 - beta1` (the lerp weight of the first moment).
    pub w1: f32,
    /// `beta2`.
    pub b2: f32,
    /// `1 - beta2`.
    pub w2: f32,
    /// `-lr / (1 - beta1^step)`.
    pub neg_step: f32,
    /// `sqrt(1 - beta2^step)`.
    pub bc2_sqrt: f32,
}

impl AdamW {
    /// The update's scalars; an error for `step == 0` (steps are 1-based).
    pub fn scalars(&self) -> Result<AdamWScalars> {
        if self.step == 0 {
            return Err(crate::Error::input("adamw_step: step is 1-based, got 0"));
        }
        let lr = self.lr as f64;
        let bc1 = 1.0 - libm::pow(self.beta1 as f64, self.step as f64);
        let bc2 = 1.0 - libm::pow(self.beta2 as f64, self.step as f64);
        Ok(AdamWScalars {
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            w1: (1.0 - self.beta1 as f64) as f32,
            b2: self.beta2,
            w2: (1.0 - self.beta2 as f64) as f32,
            neg_step: (-(lr / bc1)) as f32,
            bc2_sqrt: libm::sqrt(bc2) as f32,
        })
    }
}

/// Backward and optimiser operations.
pub trait GradBackend: Backend {
    /// `op(a) op(b)` where `op` transposes when the flag is set:
    /// `a (m, k)` (or `(k, m)` with `ta`), `b (k, n)` (or `(n, k)` with `tb`) → `(m, n)`.
    fn matmul(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        ta: bool,
        tb: bool,
    ) -> Result<Self::Tensor>;
    /// Column sums `(rows, c)` → `(c)` (bias gradients).
    fn col_sum(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Per-segment row sums `(rows, c)` → `(S, c)` (gradients of per-sample vectors).
    fn segment_sum(&self, x: &Self::Tensor, seg: Segments) -> Result<Self::Tensor>;
    /// A tensor filled with `value`.
    fn full(&self, shape: &[usize], value: f32) -> Result<Self::Tensor>;
    /// Sum of squares of all entries, read back to the host (grad-norm clipping).
    fn sum_squares(&self, x: &Self::Tensor) -> Result<f64>;

    /// Gradients of [`Backend::conv2d`]: `(dx, dw, db)`; `dw` in OHWI like `w`.
    fn conv2d_backward(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        w: &Self::Tensor,
        k: usize,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// The parameter gradients of [`Backend::conv2d`] alone, `(dw, db)`, for
    /// a convolution whose input needs no gradient (the pixel embedding of
    /// the noisy image): the same values as [`conv2d_backward`](Self::conv2d_backward)'s,
    /// without the input-gradient convolution (a backend may skip it; the
    /// default computes and drops it).
    fn conv2d_weight_backward(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        w: &Self::Tensor,
        k: usize,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (_, dw, db) = self.conv2d_backward(x, grid, w, k, g)?;
        Ok((dw, db))
    }
    /// Gradients of [`Backend::depthwise_conv3x3`]: `(dx, dw)`, `dw (c, 9)`.
    fn depthwise_conv3x3_backward(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        w: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Gradients of [`Backend::group_norm`]: `(dx, dgamma, dbeta)`.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_backward(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        groups: usize,
        gamma: &Self::Tensor,
        eps: f32,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// Gradient of [`Backend::layer_norm`].
    fn layer_norm_backward(
        &self,
        x: &Self::Tensor,
        eps: f32,
        g: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Gradients of [`Backend::rms_norm`]: `(dx, dw)`.
    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Gradient of [`Backend::l2_normalize`].
    fn l2_normalize_backward(&self, x: &Self::Tensor, g: &Self::Tensor) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::unary`] (from the forward's input `x`).
    fn unary_backward(&self, x: &Self::Tensor, op: Unary, g: &Self::Tensor)
        -> Result<Self::Tensor>;
    /// Gradients of [`Backend::modulate`]: `(dx, dada)`; `dada` has `ada`'s
    /// shape and is zero outside the shift and scale blocks.
    #[allow(clippy::too_many_arguments)]
    fn modulate_backward(
        &self,
        x: &Self::Tensor,
        ada: &Self::Tensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Gradients of [`Backend::gated_add`] w.r.t. `y` and `ada`: `(dy, dada)`
    /// (the gradient of `x` is `g` itself); `dada` zero outside the gate block.
    fn gated_add_backward(
        &self,
        y: &Self::Tensor,
        ada: &Self::Tensor,
        gate_at: usize,
        seg: Segments,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Gradient of [`Backend::attention`] w.r.t. `qkv`.
    fn attention_backward(
        &self,
        qkv: &Self::Tensor,
        heads: usize,
        seg: Segments,
        g: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Gradients of [`Backend::dechunk_smooth`]: `(dh, dp)` (`dp` w.r.t. the
    /// unclamped `p`, zero where the clamp is active).
    #[allow(clippy::too_many_arguments)]
    fn dechunk_smooth_backward(
        &self,
        h: &Self::Tensor,
        p: &Self::Tensor,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    /// One AdamW step on `param` with gradient `grad` (already clipped) and
    /// moments `m`, `v`: returns the new `(param, m, v)`.
    fn adamw_step(
        &self,
        param: &Self::Tensor,
        grad: &Self::Tensor,
        m: &Self::Tensor,
        v: &Self::Tensor,
        hp: AdamW,
        grad_scale: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// `ema * decay + param * (1 - decay)`.
    fn ema_update(
        &self,
        ema: &Self::Tensor,
        param: &Self::Tensor,
        decay: f32,
    ) -> Result<Self::Tensor>;
}

/// A backend that records what it computes and differentiates it (the
/// `dcdit-autodiff` decorator implements this over any [`GradBackend`]), so
/// the trainer is written once over it, like burn's `AutodiffBackend`.
pub trait AutodiffBackend: Backend {
    /// The backend doing the arithmetic.
    type Inner: GradBackend;
    /// The gradients of one backward pass.
    type Grads;
    /// The wrapped backend.
    fn inner(&self) -> &Self::Inner;
    /// A tracked leaf (a parameter) holding `value`.
    fn leaf(&self, value: <Self::Inner as Backend>::Tensor) -> Self::Tensor;
    /// The value of a tracked or constant tensor.
    fn value(t: &Self::Tensor) -> &<Self::Inner as Backend>::Tensor;
    /// Back-propagates the given output gradients (several seeds at once) and
    /// clears the tape.
    fn backward(
        &self,
        seeds: &[(&Self::Tensor, <Self::Inner as Backend>::Tensor)],
    ) -> Result<Self::Grads>;
    /// The gradient of a leaf, if anything reached it.
    fn grad(grads: &Self::Grads, leaf: &Self::Tensor) -> Option<<Self::Inner as Backend>::Tensor>;
    /// Drops whatever the tape recorded (e.g. after an evaluation forward).
    fn clear(&self);
}
