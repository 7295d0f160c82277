//! # dcdit-backend-vulkan
//!
//! A Vulkan compute implementation of [`dcdit_core::Backend`] and
//! [`dcdit_core::GradBackend`] for dcdit (DC-DiT, arXiv 2603.06351), so the
//! same model code runs inference and training on any Vulkan 1.1 device
//! (including Mesa's software lavapipe).
//!
//! * Raw Vulkan through [`ash`] (the loader is opened at run time: a machine
//!   without `libvulkan` gets an [`Error::Backend`], not a link error).
//! * Kernels are GLSL compute shaders compiled to SPIR-V by `glslc` at build
//!   time and embedded in the binary (`shaders/`): tiled shared-memory GEMM and
//!   implicit-GEMM convolution, fused streaming-softmax attention over packed
//!   variable-length segments (and its backward without the L x L matrix),
//!   row/group normalisations with subgroup reductions where the device has
//!   them, the de-chunk smoothing and its backward, AdamW.
//! * Tensors ([`VkTensor`]) are an `Arc`'d pooled device buffer, a shape and a
//!   dtype. Ops record dispatches into a batched command buffer; only
//!   [`Backend::to_f32`] (and [`dcdit_core::GradBackend::sum_squares`]) wait for the device.
//! * Storage is f32 on the device; f16/bf16 tensors are emulated: every
//!   result of an op whose first input is f16/bf16 is rounded to that
//!   precision in place (so values match the CPU backend's 16-bit storage),
//!   but they occupy 32 bits.
//!
//! ```no_run
//! use dcdit_backend_vulkan::VulkanBackend;
//! use dcdit_core::Backend;
//! # fn main() -> dcdit_core::Result<()> {
//! let b = VulkanBackend::new(0)?;
//! let x = b.from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2])?;
//! let w = b.from_f32(&[1.0, 0.0, 1.0, 1.0], &[2, 2])?;
//! let y = b.linear(&x, &w, None)?;
//! assert_eq!(b.to_f32(&y)?, vec![1.0, 3.0, 3.0, 7.0]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod engine;
mod grad;

use std::sync::Arc;

use dcdit_core::backend::{Backend, Binary, DType, Grid, Segments, Unary};
use dcdit_core::{Error, Result};

pub use engine::{devices, DeviceInfo};
use engine::{Buffer, Ctx};

/// The Vulkan backend: a handle to one device's engine (cheap to clone;
/// clones share the device, pipelines, buffer pool and command stream).
#[derive(Clone)]
pub struct VulkanBackend {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for VulkanBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VulkanBackend({})", self.ctx.device_name())
    }
}

/// A device tensor: a shared pooled buffer, a shape and a storage dtype.
/// f32 tensors hold one f32 per element; f16 and bf16 tensors hold two
/// elements per 32-bit word (element `2i` in the low half), so they take half
/// the device memory. Kernels compute in f32: an op widens 16-bit inputs into
/// temporary f32 buffers (`VulkanBackend::view`) and narrows its result
/// back when the result is 16-bit (`VulkanBackend::finish`).
#[derive(Clone)]
pub struct VkTensor {
    /// The storage (packed for 16-bit dtypes): read it through `view`.
    buf: Arc<Buffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for VkTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VkTensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl VkTensor {
    /// Shape (outermost first).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn dims2(&self) -> (usize, usize) {
        match self.shape.split_last() {
            None => (1, 1),
            Some((&c, rest)) => (rest.iter().product(), c),
        }
    }
}

const WG: usize = 256;
const MAX_GROUPS: usize = 65535;

/// Workgroups for a grid-stride element loop over `n` elements.
fn groups1(n: usize) -> [u32; 3] {
    [n.div_ceil(WG).clamp(1, MAX_GROUPS) as u32, 1, 1]
}

/// Workgroups for one workgroup per row (2-D when there are many rows).
fn groups_rows(rows: usize) -> [u32; 3] {
    let x = rows.clamp(1, MAX_GROUPS);
    [x as u32, rows.div_ceil(x).max(1) as u32, 1]
}

fn f(v: f32) -> u32 {
    v.to_bits()
}

fn u(v: usize) -> u32 {
    v as u32
}

/// Element-wise kernel modes (see `shaders/eltwise.comp`).
#[derive(Clone, Copy)]
pub(crate) enum Ew {
    Silu = 0,
    Gelu = 1,
    Sigmoid = 2,
    Add = 3,
    Sub = 4,
    Mul = 5,
    Affine = 6,
    Fill = 7,
    ScaleRows = 8,
    UnaryGrad = 11,
    Ema = 14,
}

/// A GEMM operand: a buffer and the format its elements are stored in (f32,
/// or f16/bf16 packed two per word), read as such by `shaders/gemm.comp`.
#[derive(Clone, Copy)]
pub(crate) struct Src<'a>(pub(crate) &'a Arc<Buffer>, pub(crate) DType);

impl<'a> Src<'a> {
    /// A tensor's storage as it is.
    pub(crate) fn of(t: &'a VkTensor) -> Self {
        Src(&t.buf, t.dtype)
    }

    /// An f32 buffer.
    pub(crate) fn f32(b: &'a Arc<Buffer>) -> Self {
        Src(b, DType::F32)
    }

    fn fmt(self) -> u32 {
        match self.1 {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        }
    }
}

/// Modes of `shaders/convert.comp` (16-bit storage).
#[derive(Clone, Copy)]
pub(crate) enum Convert {
    WidenF16 = 0,
    WidenBf16 = 1,
    NarrowF16 = 2,
    NarrowBf16 = 3,
}

pub(crate) use dcdit_core::backend::check_segments;

pub(crate) use dcdit_core::backend::check_ada_block as check_block;

pub(crate) fn check_per_sample(
    op: &str,
    x: &VkTensor,
    v: &VkTensor,
    seg: Segments,
) -> Result<(usize, usize, usize)> {
    let (rows, c) = x.dims2();
    let samples = check_segments(op, seg, rows)?;
    let (vr, vc) = v.dims2();
    if vr != samples {
        return Err(Error::input(format!(
            "{op}: per-sample tensor {:?} has {vr} rows but there are {samples} segments",
            v.shape
        )));
    }
    Ok((rows, c, vc))
}

fn check_grid(op: &str, x: &VkTensor, grid: Grid) -> Result<usize> {
    let (rows, c) = x.dims2();
    if rows != grid.rows() {
        return Err(Error::input(format!(
            "{op}: input shape {:?} has {rows} rows but the grid {}x{}x{} needs {}",
            x.shape,
            grid.batch,
            grid.height,
            grid.width,
            grid.rows()
        )));
    }
    Ok(c)
}

pub(crate) fn check_conv_args(
    op: &str,
    x: &VkTensor,
    grid: Grid,
    w: &VkTensor,
    k: usize,
) -> Result<(usize, usize)> {
    let cin = check_grid(op, x, grid)?;
    if k.is_multiple_of(2) {
        return Err(Error::input(format!(
            "{op}: kernel size must be odd for same padding, got {k}"
        )));
    }
    let ws = &w.shape;
    if ws.len() != 4 || ws[1] != k || ws[2] != k || ws[3] != cin {
        return Err(Error::input(format!(
            "{op}: weight shape {ws:?} does not match (cout, {k}, {k}, {cin})"
        )));
    }
    Ok((cin, ws[0]))
}

fn check_indices(op: &str, idx: &[u32], rows: usize) -> Result<()> {
    if let Some((i, &v)) = idx.iter().enumerate().find(|(_, &v)| v as usize >= rows) {
        return Err(Error::input(format!(
            "{op}: index {v} at position {i} is out of range for {rows} rows"
        )));
    }
    Ok(())
}

pub(crate) fn check_dechunk_args(
    op: &str,
    h: &VkTensor,
    p: &VkTensor,
    pos: &[u32],
    width: usize,
    seg: Segments,
) -> Result<(usize, usize)> {
    let (t, d) = h.dims2();
    check_segments(op, seg, t)?;
    if p.numel() != t || pos.len() != t {
        return Err(Error::input(format!(
            "{op}: h {:?} has {t} rows but p has shape {:?} and pos {} entries",
            h.shape,
            p.shape,
            pos.len()
        )));
    }
    if width == 0 && t > 0 {
        return Err(Error::input(format!("{op}: grid width must be positive")));
    }
    Ok((t, d))
}

pub(crate) fn check_attention(
    op: &str,
    qkv: &VkTensor,
    heads: usize,
    seg: Segments,
) -> Result<(usize, usize)> {
    let (t, c3) = qkv.dims2();
    check_segments(op, seg, t)?;
    if c3 % 3 != 0 {
        return Err(Error::input(format!(
            "{op}: qkv width {c3} ({:?}) is not a multiple of 3",
            qkv.shape
        )));
    }
    let d = c3 / 3;
    if heads == 0 || d % heads != 0 {
        return Err(Error::input(format!(
            "{op}: width {d} cannot be split into {heads} heads"
        )));
    }
    if d / heads > 128 {
        return Err(Error::input(format!(
            "{op}: head dimension {} exceeds the Vulkan kernel's 128",
            d / heads
        )));
    }
    Ok((t, d))
}

/// `2 sigma^2` as the reference forms it.
fn two_sigma_sq(sigma: f32) -> f32 {
    let s = sigma as f64;
    (2.0 * (s * s)) as f32
}

/// The reference's negligible-weight cut-off (see `dcdit_core::dechunk`).
const NEGLIGIBLE: f32 = 8.673_617e-19;

impl VulkanBackend {
    /// Opens Vulkan device `index` (the order of [`devices`]). Errors (not
    /// panics) when there is no loader, no such device, or the device lacks a
    /// required feature.
    pub fn new(index: usize) -> Result<Self> {
        Ok(VulkanBackend {
            ctx: Arc::new(Ctx::new(index)?),
        })
    }

    /// The device's description.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.ctx.dev.info
    }

    /// Whether kernels use their subgroup-arithmetic variants.
    pub fn uses_subgroups(&self) -> bool {
        self.ctx.subgroup
    }

    /// Submits all recorded work and waits for it (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.sync()
    }

    /// Commands (dispatches and copies) recorded so far, and how many of them
    /// needed a memory barrier before them (see the engine's hazard
    /// tracking); the rest may overlap with the commands before them.
    pub fn command_stats(&self) -> (u64, u64) {
        self.ctx.command_stats()
    }

    pub(crate) fn out(&self, n: usize) -> Result<Arc<Buffer>> {
        self.ctx.alloc(n * 4, false)
    }

    pub(crate) fn upload_u32(&self, v: &[u32]) -> Result<Arc<Buffer>> {
        self.ctx.upload(bytemuck::cast_slice(v))
    }

    pub(crate) fn seg_buf(&self, seg: &[usize]) -> Result<Arc<Buffer>> {
        let v: Vec<u32> = seg.iter().map(|&s| s as u32).collect();
        self.upload_u32(&v)
    }

    pub(crate) fn dummy(&self) -> &Arc<Buffer> {
        &self.ctx.dummy
    }

    pub(crate) fn run(
        &self,
        name: &'static str,
        bufs: &[&Arc<Buffer>],
        push: &[u32],
        groups: [u32; 3],
    ) -> Result<()> {
        self.ctx.dispatch(name, bufs, push, groups)
    }

    /// Wraps an f32 result buffer as a tensor of `dtype`: as is for f32, else
    /// narrowed on the device into a new packed 16-bit buffer (round to
    /// nearest even; the f32 buffer goes back to the pool).
    pub(crate) fn finish(
        &self,
        buf: Arc<Buffer>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<VkTensor> {
        let n: usize = shape.iter().product();
        let mode = match dtype {
            DType::F32 => {
                return Ok(VkTensor {
                    buf,
                    shape: shape.to_vec(),
                    dtype,
                })
            }
            DType::F16 => Convert::NarrowF16,
            DType::BF16 => Convert::NarrowBf16,
        };
        let packed = self.ctx.alloc(n.div_ceil(2) * 4, false)?;
        self.convert(&buf, &packed, n, mode)?;
        Ok(VkTensor {
            buf: packed,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// The tensor's values as an f32 device buffer: its own buffer for f32,
    /// else a temporary one widened from the packed 16-bit storage (exact).
    pub(crate) fn view(&self, t: &VkTensor) -> Result<Arc<Buffer>> {
        let mode = match t.dtype {
            DType::F32 => return Ok(t.buf.clone()),
            DType::F16 => Convert::WidenF16,
            DType::BF16 => Convert::WidenBf16,
        };
        let n = t.numel();
        let out = self.out(n)?;
        self.convert(&t.buf, &out, n, mode)?;
        Ok(out)
    }

    /// [`Self::view`] of an optional tensor; the dummy buffer for `None`.
    pub(crate) fn view_opt(&self, t: Option<&VkTensor>) -> Result<Arc<Buffer>> {
        match t {
            Some(t) => self.view(t),
            None => Ok(self.dummy().clone()),
        }
    }

    /// Packs or unpacks `n` elements between f32 and 16-bit storage.
    fn convert(&self, src: &Arc<Buffer>, dst: &Arc<Buffer>, n: usize, mode: Convert) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.run(
            "convert",
            &[src, dst],
            &[u(n), mode as u32],
            groups1(n.div_ceil(2)),
        )
    }

    /// Device bytes of a tensor's storage (half of f32's for 16-bit dtypes).
    pub fn storage_bytes(&self, t: &VkTensor) -> usize {
        match t.dtype {
            DType::F32 => t.numel() * 4,
            DType::F16 | DType::BF16 => t.numel().div_ceil(2) * 4,
        }
    }

    /// Element-wise kernel over `a` (and `b`), result in `a`'s dtype and `shape`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ew(
        &self,
        a: &VkTensor,
        b: Option<&VkTensor>,
        mode: u32,
        cols: usize,
        f0: f32,
        f1: f32,
        shape: &[usize],
    ) -> Result<VkTensor> {
        let n: usize = shape.iter().product();
        let out = self.out(n)?;
        let bb = &self.view_opt(b)?;
        if n > 0 {
            self.run(
                "eltwise",
                &[&self.view(a)?, bb, &out],
                &[u(n), mode, u(cols.max(1)), f(f0), f(f1)],
                groups1(n),
            )?;
        }
        self.finish(out, shape, a.dtype)
    }

    pub(crate) fn full_f32(&self, shape: &[usize], value: f32) -> Result<VkTensor> {
        let n: usize = shape.iter().product();
        let out = self.out(n)?;
        if n > 0 {
            self.run(
                "eltwise",
                &[self.dummy(), self.dummy(), &out],
                &[u(n), Ew::Fill as u32, 1, f(value), 0],
                groups1(n),
            )?;
        }
        Ok(VkTensor {
            buf: out,
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    /// `C (m, n) = alpha A B [+ bias]` with strided operands.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        a: Src<'_>,
        (a_rs, a_cs): (usize, usize),
        b: Src<'_>,
        (b_rs, b_cs): (usize, usize),
        bias: Option<&Arc<Buffer>>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<Arc<Buffer>> {
        let out = self.out(m * n)?;
        if m * n == 0 {
            return Ok(out);
        }
        self.run(
            "gemm",
            &[a.0, b.0, bias.unwrap_or(self.dummy()), &out],
            &[
                u(m),
                u(n),
                u(k),
                u(a_rs),
                u(a_cs),
                u(b_rs),
                u(b_cs),
                bias.is_some() as u32,
                f(1.0),
                a.fmt(),
                b.fmt(),
            ],
            [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1],
        )?;
        Ok(out)
    }

    /// Implicit-GEMM convolution of raw buffers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_raw(
        &self,
        x: &Arc<Buffer>,
        grid: Grid,
        cin: usize,
        w: &Arc<Buffer>,
        cout: usize,
        bias: Option<&Arc<Buffer>>,
        k: usize,
    ) -> Result<Arc<Buffer>> {
        let rows = grid.rows();
        let out = self.out(rows * cout)?;
        if rows * cout == 0 {
            return Ok(out);
        }
        let kk = k * k * cin;
        self.run(
            "conv",
            &[x, w, bias.unwrap_or(self.dummy()), &out],
            &[
                u(rows),
                u(cout),
                u(kk),
                u(grid.height),
                u(grid.width),
                u(cin),
                u(k),
                bias.is_some() as u32,
            ],
            [cout.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1],
        )?;
        Ok(out)
    }

    /// Blocks of up to 64 rows within segments: `(start, end, first row)` triples.
    pub(crate) fn attn_blocks(&self, seg: &[usize]) -> Result<(Arc<Buffer>, usize)> {
        let mut v = Vec::new();
        for w in seg.windows(2) {
            let mut r = w[0];
            while r < w[1] {
                v.extend_from_slice(&[w[0] as u32, w[1] as u32, r as u32]);
                r += 64;
            }
        }
        let n = v.len() / 3;
        if v.is_empty() {
            v.push(0);
        }
        Ok((self.upload_u32(&v)?, n))
    }

    /// Runs the attention forward; returns `(out, lse)` buffers.
    pub(crate) fn attention_raw(
        &self,
        qkv: &VkTensor,
        heads: usize,
        seg: &[usize],
        t: usize,
        d: usize,
    ) -> Result<AttnRaw> {
        let out = self.out(t * d)?;
        let lse = self.out(t * heads)?;
        let (blk, nblk) = self.attn_blocks(seg)?;
        let hd = d / heads;
        if nblk > 0 && d > 0 {
            self.run(
                attn_kernel("attention", hd),
                &[&self.view(qkv)?, &blk, &out, &lse],
                &[u(d), u(heads), u(hd), f(1.0 / (hd as f32).sqrt()), u(nblk)],
                [nblk as u32, heads as u32, 1],
            )?;
        }
        Ok((out, lse, blk, nblk))
    }

    /// The uploads the smoothing kernels need: `[seg offsets | pos]` and the
    /// kernel-weight table by squared distance.
    pub(crate) fn dechunk_inputs(
        &self,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: &[usize],
    ) -> Result<(Arc<Buffer>, Arc<Buffer>, usize)> {
        let mut v: Vec<u32> = seg.iter().map(|&s| s as u32).collect();
        v.extend_from_slice(pos);
        let w = width.max(1);
        let maxd2 = {
            let (mut rmin, mut rmax) = (usize::MAX, 0usize);
            for &p in pos {
                let r = p as usize / w;
                rmin = rmin.min(r);
                rmax = rmax.max(r);
            }
            let dr = rmax.saturating_sub(rmin.min(rmax));
            dr * dr + (w - 1) * (w - 1)
        };
        let denom = two_sigma_sq(sigma);
        let mut tab = Vec::new();
        while tab.len() <= maxd2 {
            let d2 = tab.len() as f32;
            let mut k = ((-d2 / denom) as f64).exp() as f32;
            if k < NEGLIGIBLE {
                k = 0.0;
            }
            if k == 0.0 {
                break;
            }
            tab.push(k);
        }
        let tablen = tab.len();
        if tab.is_empty() {
            tab.push(0.0);
        }
        Ok((
            self.upload_u32(&v)?,
            self.ctx.upload(bytemuck::cast_slice(&tab))?,
            tablen,
        ))
    }
}

impl Backend for VulkanBackend {
    type Tensor = VkTensor;

    fn name(&self) -> String {
        format!(
            "{}{}",
            self.ctx.device_name(),
            if self.ctx.subgroup { ", subgroups" } else { "" }
        )
    }

    fn shape(&self, t: &VkTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn dtype(&self, t: &VkTensor) -> DType {
        t.dtype
    }

    fn from_f32(&self, data: &[f32], shape: &[usize]) -> Result<VkTensor> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::input(format!("shape {shape:?}: element count overflows")))?;
        if n != data.len() {
            return Err(Error::input(format!(
                "vulkan tensor: shape {shape:?} holds {n} elements but the buffer has {}",
                data.len()
            )));
        }
        if n > u32::MAX as usize / 4 {
            return Err(Error::input(format!(
                "vulkan tensor: {n} elements exceed the 32-bit indexing of the kernels"
            )));
        }
        Ok(VkTensor {
            buf: self.ctx.upload(bytemuck::cast_slice(data))?,
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    fn to_f32(&self, t: &VkTensor) -> Result<Vec<f32>> {
        let n = t.numel();
        let bytes = self.ctx.read(&t.buf, self.storage_bytes(t))?;
        let halves = || {
            bytes
                .chunks_exact(2)
                .take(n)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
        };
        Ok(match t.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => halves().map(|h| half::f16::from_bits(h).to_f32()).collect(),
            DType::BF16 => halves()
                .map(|h| half::bf16::from_bits(h).to_f32())
                .collect(),
        })
    }

    fn cast(&self, t: &VkTensor, dtype: DType) -> Result<VkTensor> {
        if t.dtype == dtype {
            return Ok(t.clone());
        }
        self.finish(self.view(t)?, &t.shape, dtype)
    }

    fn reshape(&self, t: &VkTensor, shape: &[usize]) -> Result<VkTensor> {
        let n: usize = shape.iter().product();
        if n != t.numel() {
            return Err(Error::input(format!(
                "reshape: cannot view {:?} ({} elements) as {shape:?} ({n} elements)",
                t.shape,
                t.numel()
            )));
        }
        Ok(VkTensor {
            buf: t.buf.clone(),
            shape: shape.to_vec(),
            dtype: t.dtype,
        })
    }

    fn linear(&self, x: &VkTensor, w: &VkTensor, b: Option<&VkTensor>) -> Result<VkTensor> {
        let (n, k) = x.dims2();
        if w.shape.len() != 2 || w.shape[1] != k {
            return Err(Error::input(format!(
                "linear: weight shape {:?} does not match input shape {:?} (want (m, {k}))",
                w.shape, x.shape
            )));
        }
        let m = w.shape[0];
        if let Some(b) = b {
            if b.numel() != m {
                return Err(Error::input(format!(
                    "linear: bias has shape {:?} ({} elements), expected {m}",
                    b.shape,
                    b.numel()
                )));
            }
        }
        let out = self.gemm(
            Src::of(x),
            (k, 1),
            Src::of(w),
            (1, k),
            b.map(|t| self.view(t)).transpose()?.as_ref(),
            n,
            m,
            k,
        )?;
        let mut shape = x.shape.clone();
        match shape.last_mut() {
            Some(last) => *last = m,
            None => shape.push(m),
        }
        self.finish(out, &shape, x.dtype)
    }

    fn conv2d(
        &self,
        x: &VkTensor,
        grid: Grid,
        w: &VkTensor,
        b: Option<&VkTensor>,
        k: usize,
    ) -> Result<VkTensor> {
        let (cin, cout) = check_conv_args("conv2d", x, grid, w, k)?;
        if let Some(b) = b {
            if b.numel() != cout {
                return Err(Error::input(format!(
                    "conv2d: bias has shape {:?} ({} elements), expected {cout}",
                    b.shape,
                    b.numel()
                )));
            }
        }
        let out = self.conv_raw(
            &self.view(x)?,
            grid,
            cin,
            &self.view(w)?,
            cout,
            b.map(|t| self.view(t)).transpose()?.as_ref(),
            k,
        )?;
        self.finish(out, &[grid.rows(), cout], x.dtype)
    }

    fn depthwise_conv3x3(&self, x: &VkTensor, grid: Grid, w: &VkTensor) -> Result<VkTensor> {
        let c = check_grid("depthwise_conv3x3", x, grid)?;
        if w.numel() != c * 9 {
            return Err(Error::input(format!(
                "depthwise_conv3x3: weight shape {:?} does not match ({c}, 9)",
                w.shape
            )));
        }
        let n = grid.rows() * c;
        let out = self.out(n)?;
        if n > 0 {
            self.run(
                "dwconv",
                &[&self.view(x)?, &self.view(w)?, &out],
                &[u(n), 0, u(grid.height), u(grid.width), u(c)],
                groups1(n),
            )?;
        }
        self.finish(out, &[grid.rows(), c], x.dtype)
    }

    fn group_norm(
        &self,
        x: &VkTensor,
        grid: Grid,
        groups: usize,
        gamma: &VkTensor,
        beta: &VkTensor,
        eps: f32,
    ) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        if rows != grid.rows() {
            return Err(Error::input(format!(
                "group_norm: input shape {:?} has {rows} rows but the grid needs {}",
                x.shape,
                grid.rows()
            )));
        }
        if groups == 0 || c % groups != 0 {
            return Err(Error::input(format!(
                "group_norm: {c} channels cannot be split into {groups} groups"
            )));
        }
        if gamma.numel() != c || beta.numel() != c {
            return Err(Error::input(format!(
                "group_norm: gamma {:?} / beta {:?} must hold {c} elements",
                gamma.shape, beta.shape
            )));
        }
        let out = self.out(rows * c)?;
        if rows * c > 0 {
            self.run(
                "groupnorm",
                &[
                    &self.view(x)?,
                    self.dummy(),
                    &self.view(gamma)?,
                    &self.view(beta)?,
                    &out,
                    self.dummy(),
                ],
                &[u(grid.len()), u(c), u(groups), f(eps), 0],
                [(grid.batch * groups) as u32, 1, 1],
            )?;
        }
        self.finish(out, &x.shape, x.dtype)
    }

    fn layer_norm(&self, x: &VkTensor, eps: f32) -> Result<VkTensor> {
        self.rownorm(x, None, 0, eps)
    }

    fn rms_norm(&self, x: &VkTensor, w: &VkTensor, eps: f32) -> Result<VkTensor> {
        let (_, c) = x.dims2();
        if w.numel() != c {
            return Err(Error::input(format!(
                "rms_norm: weight shape {:?} must hold {c} elements for input {:?}",
                w.shape, x.shape
            )));
        }
        self.rownorm(x, Some(w), 1, eps)
    }

    fn l2_normalize(&self, x: &VkTensor) -> Result<VkTensor> {
        self.rownorm(x, None, 2, 0.0)
    }

    fn unary(&self, x: &VkTensor, op: Unary) -> Result<VkTensor> {
        let mode = match op {
            Unary::Silu => Ew::Silu,
            Unary::GeluTanh => Ew::Gelu,
            Unary::Sigmoid => Ew::Sigmoid,
        };
        self.ew(x, None, mode as u32, 1, 0.0, 0.0, &x.shape)
    }

    fn binary(&self, a: &VkTensor, b: &VkTensor, op: Binary) -> Result<VkTensor> {
        if a.shape != b.shape {
            return Err(Error::input(format!(
                "binary {op:?}: shapes differ: {:?} vs {:?}",
                a.shape, b.shape
            )));
        }
        let mode = match op {
            Binary::Add => Ew::Add,
            Binary::Sub => Ew::Sub,
            Binary::Mul => Ew::Mul,
        };
        self.ew(a, Some(b), mode as u32, 1, 0.0, 0.0, &a.shape)
    }

    fn affine(&self, x: &VkTensor, a: f32, b: f32) -> Result<VkTensor> {
        self.ew(x, None, Ew::Affine as u32, 1, a, b, &x.shape)
    }

    fn row_sum(&self, x: &VkTensor) -> Result<VkTensor> {
        let (rows, _) = x.dims2();
        let t = self.rownorm(x, None, 3, 0.0)?;
        Ok(VkTensor {
            shape: vec![rows, 1],
            ..t
        })
    }

    fn scale_rows(&self, x: &VkTensor, s: &VkTensor) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        if s.numel() != rows {
            return Err(Error::input(format!(
                "scale_rows: scale shape {:?} must hold one value per row of {:?} ({rows})",
                s.shape, x.shape
            )));
        }
        self.ew(x, Some(s), Ew::ScaleRows as u32, c, 0.0, 0.0, &x.shape)
    }

    fn ste(&self, x: &VkTensor) -> Result<VkTensor> {
        let t = self.full_f32(&x.shape, 1.0)?;
        self.finish(t.buf, &x.shape, x.dtype)
    }

    fn add_segment(&self, x: &VkTensor, v: &VkTensor, seg: Segments) -> Result<VkTensor> {
        let (_, c, vc) = check_per_sample("add_segment", x, v, seg)?;
        if vc != c {
            return Err(Error::input(format!(
                "add_segment: vector width {vc} ({:?}) differs from input width {c} ({:?})",
                v.shape, x.shape
            )));
        }
        self.segbcast(x, None, v, seg, 0, 0, 0)
    }

    fn modulate(
        &self,
        x: &VkTensor,
        ada: &VkTensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
    ) -> Result<VkTensor> {
        let (_, c, vc) = check_per_sample("modulate", x, ada, seg)?;
        check_block("modulate", "shift", shift_at, c, vc)?;
        check_block("modulate", "scale", scale_at, c, vc)?;
        self.segbcast(x, None, ada, seg, 1, shift_at, scale_at)
    }

    fn norm_modulate(
        &self,
        x: &VkTensor,
        ada: &VkTensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        eps: f32,
    ) -> Result<VkTensor> {
        let (rows, c, vc) = check_per_sample("norm_modulate", x, ada, seg)?;
        check_block("norm_modulate", "shift", shift_at, c, vc)?;
        check_block("norm_modulate", "scale", scale_at, c, vc)?;
        let out = self.out(rows * c)?;
        if rows > 0 && c > 0 {
            let sb = self.seg_buf(seg)?;
            self.run(
                "normmod",
                &[&self.view(x)?, &self.view(ada)?, &sb, &out],
                &[
                    u(rows),
                    u(c),
                    u(vc),
                    u(seg.len()),
                    u(shift_at),
                    u(scale_at),
                    f(eps),
                ],
                groups_rows(rows),
            )?;
        }
        self.finish(out, &x.shape, x.dtype)
    }

    fn gated_add(
        &self,
        x: &VkTensor,
        y: &VkTensor,
        ada: &VkTensor,
        gate_at: usize,
        seg: Segments,
    ) -> Result<VkTensor> {
        if x.shape != y.shape {
            return Err(Error::input(format!(
                "gated_add: x {:?} and y {:?} must have equal shapes",
                x.shape, y.shape
            )));
        }
        let (_, c, vc) = check_per_sample("gated_add", x, ada, seg)?;
        check_block("gated_add", "gate", gate_at, c, vc)?;
        self.segbcast(x, Some(y), ada, seg, 2, gate_at, 0)
    }

    fn gather_rows(&self, x: &VkTensor, idx: &[u32]) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        check_indices("gather_rows", idx, rows)?;
        let n = idx.len() * c;
        let out = self.out(n)?;
        if n > 0 {
            let ib = self.upload_u32(idx)?;
            self.run(
                "rows",
                &[&self.view(x)?, &ib, &out],
                &[u(n), u(c), 0, 0],
                groups1(n),
            )?;
        }
        self.finish(out, &[idx.len(), c], x.dtype)
    }

    fn scatter_add_rows(&self, x: &VkTensor, idx: &[u32], rows: usize) -> Result<VkTensor> {
        let (n, c) = x.dims2();
        if n != idx.len() {
            return Err(Error::input(format!(
                "scatter_add_rows: {} indices for {n} input rows ({:?})",
                idx.len(),
                x.shape
            )));
        }
        check_indices("scatter_add_rows", idx, rows)?;
        // Inverse index (CSR): starts[rows + 1], then input rows grouped by
        // output row in input order.
        let mut starts = vec![0u32; rows + 1];
        for &i in idx {
            starts[i as usize + 1] += 1;
        }
        for r in 0..rows {
            starts[r + 1] += starts[r];
        }
        let mut fill = starts.clone();
        let mut csr = starts;
        csr.resize(rows + 1 + idx.len(), 0);
        for (k, &i) in idx.iter().enumerate() {
            let slot = fill[i as usize] as usize;
            csr[rows + 1 + slot] = k as u32;
            fill[i as usize] += 1;
        }
        let total = rows * c;
        let out = self.out(total)?;
        if total > 0 {
            let ib = self.upload_u32(&csr)?;
            self.run(
                "rows",
                &[&self.view(x)?, &ib, &out],
                &[u(total), u(c), 1, u(rows)],
                groups1(total),
            )?;
        }
        self.finish(out, &[rows, c], x.dtype)
    }

    fn attention(&self, qkv: &VkTensor, heads: usize, seg: Segments) -> Result<VkTensor> {
        let (t, d) = check_attention("attention", qkv, heads, seg)?;
        let (out, _, _, _) = self.attention_raw(qkv, heads, seg, t, d)?;
        self.finish(out, &[t, d], qkv.dtype)
    }

    fn dechunk_smooth(
        &self,
        h: &VkTensor,
        p: &VkTensor,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
    ) -> Result<VkTensor> {
        let (t, d) = check_dechunk_args("dechunk_smooth", h, p, pos, width, seg)?;
        let out = self.out(t * d)?;
        if t * d > 0 {
            let (ub, tab, tablen) = self.dechunk_inputs(pos, width, sigma, seg)?;
            self.run(
                "dechunk",
                &[
                    &self.view(h)?,
                    &self.view(p)?,
                    &ub,
                    &tab,
                    self.dummy(),
                    self.dummy(),
                    &out,
                    self.dummy(),
                ],
                &dechunk_push(t, d, width, tablen, seg.len(), 0),
                groups_rows(t),
            )?;
        }
        self.finish(out, &h.shape, h.dtype)
    }
}

/// Attention forward buffers: `(out, lse, blocks, block count)`.
pub(crate) type AttnRaw = (Arc<Buffer>, Arc<Buffer>, Arc<Buffer>, usize);

/// The head-dim variant of an attention kernel (the smallest bound >= `hd`).
pub(crate) fn attn_kernel(base: &str, hd: usize) -> &'static str {
    let i = match hd {
        0..=16 => 0,
        17..=32 => 1,
        33..=64 => 2,
        _ => 3,
    };
    match base {
        "attention" => [
            "attention_h16",
            "attention_h32",
            "attention_h64",
            "attention_h128",
        ][i],
        "attn_bwd_dq" => [
            "attn_bwd_dq_h16",
            "attn_bwd_dq_h32",
            "attn_bwd_dq_h64",
            "attn_bwd_dq_h128",
        ][i],
        _ => [
            "attn_bwd_dkv_h16",
            "attn_bwd_dkv_h32",
            "attn_bwd_dkv_h64",
            "attn_bwd_dkv_h128",
        ][i],
    }
}

pub(crate) fn dechunk_push(
    t: usize,
    d: usize,
    width: usize,
    tablen: usize,
    nseg1: usize,
    mode: u32,
) -> [u32; 8] {
    [
        u(t),
        u(d),
        u(width.max(1)),
        u(tablen),
        u(nseg1),
        mode,
        f(dcdit_core::dechunk::P_CLAMP),
        f(dcdit_core::dechunk::P_CLAMP_HI),
    ]
}

impl VulkanBackend {
    fn rownorm(&self, x: &VkTensor, w: Option<&VkTensor>, mode: u32, eps: f32) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        let n = if mode == 3 { rows } else { rows * c };
        let out = self.out(n)?;
        if rows > 0 {
            if c == 0 {
                // Empty rows: sums are 0 (other modes have nothing to write).
                if mode == 3 {
                    let z = self.full_f32(&[rows], 0.0)?;
                    return self.finish(z.buf, &[rows, 1], x.dtype);
                }
            } else {
                self.run(
                    "rownorm",
                    &[&self.view(x)?, &self.view_opt(w)?, &out],
                    &[u(rows), u(c), mode, f(eps)],
                    groups_rows(rows),
                )?;
            }
        }
        let shape = if mode == 3 {
            vec![rows, 1]
        } else {
            x.shape.clone()
        };
        self.finish(out, &shape, x.dtype)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn segbcast(
        &self,
        x: &VkTensor,
        y: Option<&VkTensor>,
        ada: &VkTensor,
        seg: Segments,
        mode: u32,
        at0: usize,
        at1: usize,
    ) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        let (_, vc) = ada.dims2();
        let n = rows * c;
        let out = self.out(n)?;
        if n > 0 {
            let sb = self.seg_buf(seg)?;
            self.run(
                "segbcast",
                &[
                    &self.view(x)?,
                    &self.view_opt(y)?,
                    &self.view(ada)?,
                    &sb,
                    &out,
                ],
                &[u(n), u(c), u(vc), u(seg.len()), mode, u(at0), u(at1)],
                groups1(n),
            )?;
        }
        self.finish(out, &x.shape, x.dtype)
    }
}
