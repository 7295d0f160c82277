//! The backend trait: the tensor operations DC-DiT needs, over buffers that
//! live on a device.
//!
//! Design rules, so that a GPU backend and the autodiff decorator can implement
//! it:
//! * Tensors are opaque handles ([`Backend::Tensor`]); the only ways to move data
//!   across the host/device boundary are [`Backend::from_f32`] and
//!   [`Backend::to_f32`]. Everything else stays on the device.
//! * Every activation is a 2D row-major matrix `(rows, cols)`. Image-like maps
//!   are stored channel-last (NHWC): row `b*H*W + y*W + x`, so a token sequence
//!   `(B, L, C)` and a feature map `(B, C, H, W)` are the same buffer and no
//!   transposes are needed between convolutions and token ops. The [`Grid`]
//!   argument gives convolutions their spatial meaning.
//! * A packed batch of variable-length sequences is described by [`Segments`]
//!   (cumulative row offsets, like flash-attn's `cu_seqlens`); per-sample
//!   vectors (conditioning, adaLN modulation) are `(S, C)` matrices broadcast
//!   over each sample's rows, so no compute is spent on padding.
//! * Integer index arguments (gathers, positions, segments) are host slices: a
//!   GPU backend uploads them with the launch.
//! * Storage precision is a property of the tensor ([`DType`]); the ops are the
//!   same for f32 and reduced-precision storage and accumulate in f32.
//!
//! ```
//! # use dcdit_core::backend::{Backend, Unary};
//! fn silu_twice<B: Backend>(b: &B, x: &B::Tensor) -> dcdit_core::Result<B::Tensor> {
//!     let y = b.unary(x, Unary::Silu)?;
//!     b.unary(&y, Unary::Silu)
//! }
//! ```

use crate::error::{Error, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Storage precision of a tensor. Arithmetic always accumulates in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

/// Spatial layout of an NHWC activation: `batch * height * width` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grid {
    /// Number of samples.
    pub batch: usize,
    /// Rows of the grid.
    pub height: usize,
    /// Columns of the grid.
    pub width: usize,
}

impl Grid {
    /// Tokens per sample (`height * width`).
    pub fn len(&self) -> usize {
        self.height * self.width
    }
    /// True when the grid has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows of an activation over this grid (`batch * height * width`).
    pub fn rows(&self) -> usize {
        self.batch * self.len()
    }
}

/// Cumulative row offsets of a packed batch: sample `s` owns rows
/// `offsets[s]..offsets[s + 1]`. `offsets[0] == 0`, non-decreasing.
pub type Segments<'a> = &'a [usize];

/// Uniform segments `[0, len, 2 len, ...]` for `batch` samples of `len` rows.
pub fn uniform_segments(batch: usize, len: usize) -> Vec<usize> {
    (0..=batch).map(|s| s * len).collect()
}

/// Validates packed-batch offsets against a row count: `seg[0] == 0`,
/// non-decreasing, `seg[last] == rows`. Returns the number of samples. The
/// backends check their `Segments` arguments with this, so all report the
/// same errors.
pub fn check_segments(op: &str, seg: &[usize], rows: usize) -> Result<usize> {
    if seg.is_empty() {
        return Err(Error::input(format!(
            "{op}: segments must hold at least one offset (got an empty slice)"
        )));
    }
    if seg[0] != 0 {
        return Err(Error::input(format!(
            "{op}: segments must start at 0, got {}",
            seg[0]
        )));
    }
    if let Some(w) = seg.windows(2).find(|w| w[1] < w[0]) {
        return Err(Error::input(format!(
            "{op}: segment offsets must be non-decreasing, found {} after {}",
            w[1], w[0]
        )));
    }
    let last = seg[seg.len() - 1];
    if last != rows {
        return Err(Error::input(format!(
            "{op}: segments cover {last} rows but the tensor has {rows}"
        )));
    }
    Ok(seg.len() - 1)
}

/// Checks that column block `at` (width `c`) lies inside a per-sample adaLN
/// vector of width `vc` (`modulate`, `gated_add` and their backwards).
pub fn check_ada_block(op: &str, what: &str, at: usize, c: usize, vc: usize) -> Result<()> {
    if c == 0 && vc == 0 {
        return Ok(());
    }
    if c == 0 || !vc.is_multiple_of(c) || at >= vc / c {
        return Err(Error::input(format!(
            "{op}: {what} block {at} of width {c} is not inside ada of width {vc}"
        )));
    }
    Ok(())
}

/// Element-wise functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unary {
    /// `x * sigmoid(x)`.
    Silu,
    /// GELU with the tanh approximation (as `nn.GELU(approximate="tanh")`).
    GeluTanh,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
}

/// Element-wise binary operations on tensors of equal shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binary {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
}

/// The tensor operations of DC-DiT. See the module docs for the conventions.
///
/// Shapes are validated by the model before calling; a backend may still return
/// [`crate::Error::Backend`] for device failures (out of memory, lost device).
pub trait Backend: Clone {
    /// A device tensor handle (cheap to clone).
    type Tensor: Clone + core::fmt::Debug;

    /// Human-readable backend and device name.
    fn name(&self) -> String;

    // ---- data movement -------------------------------------------------
    /// Shape of a tensor (outermost first).
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;
    /// Storage precision of a tensor.
    fn dtype(&self, t: &Self::Tensor) -> DType;
    /// Uploads host data as a tensor of the given shape, stored as f32.
    #[allow(clippy::wrong_self_convention)] // a device method, like candle's `Device::from_slice`
    fn from_f32(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    /// Reads a tensor back to the host (an explicit synchronisation point).
    fn to_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Converts storage precision.
    fn cast(&self, t: &Self::Tensor, dtype: DType) -> Result<Self::Tensor>;
    /// Reinterprets the shape (same element count, row-major).
    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    // ---- dense layers --------------------------------------------------
    /// `y = x w^T + b`: `x (n, k)`, `w (m, k)`, `b (m)` → `(n, m)`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// 2D convolution with stride 1 and "same" zero padding (odd `k`) on an
    /// NHWC activation `x (grid.rows(), cin)`. `w` is `(cout, k, k, cin)`
    /// (OHWI), `b (cout)`. Output `(grid.rows(), cout)`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        k: usize,
    ) -> Result<Self::Tensor>;
    /// Depthwise 3x3 convolution ("same" zero padding, no bias):
    /// `w (c, 9)`, output `(grid.rows(), c)`.
    fn depthwise_conv3x3(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        w: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    // ---- normalisation -------------------------------------------------
    /// GroupNorm over each sample's rows and the channels of each group, with
    /// affine `gamma (c)`, `beta (c)`. `x (grid.rows(), c)`.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        grid: Grid,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// LayerNorm over each row, no affine.
    fn layer_norm(&self, x: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// RMSNorm over each row: `x / sqrt(mean(x^2) + eps) * w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// Each row divided by `max(||row||_2, 1e-12)`.
    fn l2_normalize(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- element-wise --------------------------------------------------
    /// Element-wise function.
    fn unary(&self, x: &Self::Tensor, op: Unary) -> Result<Self::Tensor>;
    /// Element-wise `a op b` on equal shapes.
    fn binary(&self, a: &Self::Tensor, b: &Self::Tensor, op: Binary) -> Result<Self::Tensor>;
    /// `a * x + b` with scalars.
    fn affine(&self, x: &Self::Tensor, a: f32, b: f32) -> Result<Self::Tensor>;
    /// Sum of each row: `(rows, c)` → `(rows, 1)`.
    fn row_sum(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x[r, :] * s[r]`: `x (rows, c)`, `s (rows, 1)`.
    fn scale_rows(&self, x: &Self::Tensor, s: &Self::Tensor) -> Result<Self::Tensor>;
    /// Straight-through estimator: forward is exactly 1 everywhere; the
    /// backward (in the autodiff decorator) passes the gradient through.
    fn ste(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- per-sample broadcasts over packed rows ---------------------------
    /// `x[r] + v[s]` for every row `r` of sample `s`: `x (rows, c)`, `v (S, c)`.
    fn add_segment(
        &self,
        x: &Self::Tensor,
        v: &Self::Tensor,
        seg: Segments,
    ) -> Result<Self::Tensor>;
    /// adaLN modulation `x[r] * (1 + scale[s]) + shift[s]`, where `shift` and
    /// `scale` are the column blocks `shift_at` and `scale_at` (each `c` wide)
    /// of `ada (S, n*c)`.
    fn modulate(
        &self,
        x: &Self::Tensor,
        ada: &Self::Tensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
    ) -> Result<Self::Tensor>;
    /// LayerNorm (no affine) of each row followed by the adaLN modulation:
    /// `layer_norm(x)[r] * (1 + scale[s]) + shift[s]`, as [`Backend::layer_norm`]
    /// then [`Backend::modulate`]. The default composes the two; a backend
    /// overrides it with a fused kernel that reads `x` once and writes once
    /// (the pair is memory-bound and runs twice per DiT block). Overrides
    /// must agree with the composition to rounding.
    #[allow(clippy::too_many_arguments)]
    fn norm_modulate(
        &self,
        x: &Self::Tensor,
        ada: &Self::Tensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let h = self.layer_norm(x, eps)?;
        self.modulate(&h, ada, shift_at, scale_at, seg)
    }
    /// Gated residual `x[r] + gate[s] * y[r]`, `gate` the column block
    /// `gate_at` of `ada (S, n*c)`.
    fn gated_add(
        &self,
        x: &Self::Tensor,
        y: &Self::Tensor,
        ada: &Self::Tensor,
        gate_at: usize,
        seg: Segments,
    ) -> Result<Self::Tensor>;

    // ---- indexing ------------------------------------------------------
    /// `out[i] = x[idx[i]]` (rows).
    fn gather_rows(&self, x: &Self::Tensor, idx: &[u32]) -> Result<Self::Tensor>;
    /// `out[idx[i]] += x[i]` into `rows` zero rows (the adjoint of
    /// [`Backend::gather_rows`]).
    fn scatter_add_rows(&self, x: &Self::Tensor, idx: &[u32], rows: usize) -> Result<Self::Tensor>;

    // ---- DC-DiT specific -------------------------------------------------
    /// Multi-head self-attention over a packed batch: `qkv (T, 3 d)` holding
    /// q, k, v (each `heads` x `d/heads`, head-major), attention confined to
    /// each segment, softmax scale `1/sqrt(d/heads)`. Output `(T, d)`.
    fn attention(&self, qkv: &Self::Tensor, heads: usize, seg: Segments) -> Result<Self::Tensor>;
    /// Distance-weighted smoothing of the de-chunk (SPEC 3) on packed kept
    /// tokens: `h (T, d)`, `p (T, 1)` their boundary probabilities
    /// (unclamped), `pos[i]` the raster position of row `i` on a grid of
    /// `width` columns. See [`crate::dechunk::smooth`].
    fn dechunk_smooth(
        &self,
        h: &Self::Tensor,
        p: &Self::Tensor,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
    ) -> Result<Self::Tensor>;
}
