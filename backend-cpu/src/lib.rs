//! # dcdit-backend-cpu
//!
//! A multi-threaded CPU implementation of [`dcdit_core::Backend`] for dcdit
//! (DC-DiT, arXiv 2603.06351).
//!
//! * Tensors ([`CpuTensor`]) are a shape plus a shared host buffer stored as
//!   f32, f16 or bf16 ([`Storage`]). Reduced-precision storage is real: ops read
//!   their inputs converting to f32, compute in f32, and store the result in
//!   the dtype of their first tensor argument.
//! * Dense layers go through the [`gemm`] crate (its AVX-512 kernels are
//!   chosen at run time where the CPU has them): `linear` is a single gemm
//!   (weights used transposed through strides, no copy); a k x k `conv2d` is
//!   k sliding-window gemms over a zero-padded copy of the input (in NHWC a
//!   kernel row's pixels are adjacent, so no im2col buffer). On AVX2 + FMA
//!   CPUs without full-width AVX-512 (see `microkernel::available`: AVX2-only
//!   CPUs and AMD Zen 4) convolutions take our own kernels instead:
//!   Winograd F(2x2, 3x3) for 3x3 kernels of 32 or more channels (forward,
//!   input and weight gradients, 2.25x fewer multiply-adds), a direct
//!   register-blocked kernel for the rest, and linear layers over 1536 or
//!   more rows a packed, cache-blocked GEMM on the same register block
//!   (`sgemm`), those over 16 or fewer rows a kernel that streams the weights
//!   once. Weight gradients whose reduction (tokens, pixels) is long
//!   against their size split the reduction over the threads. On AVX-512
//!   CPUs linear layers of 128 or more outputs run a 6x64 register block on
//!   weights packed once per tensor (`linear512`, f32 FMA or bf16
//!   `VDPBF16PS`), and the backward's products of 64 or more columns an
//!   unpacked one (`gemm512`).
//! * Attention: on AVX-512 CPUs, for head widths 16-64 and segments up to
//!   512 tokens, fused kernels that keep a whole row of scores in L1
//!   (`attention512`); otherwise a streaming (online) softmax over blocks of
//!   512 keys, two gemms per block of a `(segment, head, query block)` task.
//! * De-chunk smoothing of segments up to 512 kept tokens runs as matrix
//!   products over core's dense kernel weights (`dechunk`), longer ones
//!   pair by pair in core.
//! * Element-wise, norm and reduction loops are plain Rust compiled per SIMD
//!   level (AVX-512, AVX2 + FMA, baseline) and picked at run time.
//! * Output buffers are recycled through a pool ([`pool`]) kept by size
//!   class, so a steady-state training or sampling step reuses the previous
//!   step's buffers even when the number of kept tokens changes; large fresh
//!   buffers are backed by transparent huge pages on Linux
//!   (`DCDIT_NO_HUGE_PAGES=1` turns that off).
//! * All work runs on a private rayon pool ([`CpuBackend::with_threads`]), so
//!   the backend does not fight other pools in the process. An op called
//!   from outside the pool is handed to a worker and the caller sleeps until
//!   it is done (~20 us per op back to back on a 2-core VM, ~70 us after a
//!   pause); a loop run inside [`CpuBackend::install`] runs every op inline
//!   on the pool's first thread instead (0.1 us for a small op), which is
//!   how the CLI trains and samples.
//! * [`CpuBackend::set_op_profiling`] times every op ([`profile`]); the CLI's
//!   `train` prints the table when `DCDIT_PROFILE_OPS=1` is set.
//!
//! ```
//! use dcdit_backend_cpu::CpuBackend;
//! use dcdit_core::Backend;
//! # fn main() -> dcdit_core::Result<()> {
//! let b = CpuBackend::with_threads(1);
//! let x = b.from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2])?;
//! let w = b.from_f32(&[1.0, 0.0, 1.0, 1.0], &[2, 2])?;
//! let y = b.linear(&x, &w, None)?;
//! assert_eq!(b.to_f32(&y)?, vec![1.0, 3.0, 3.0, 7.0]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod amx;
mod attention;
#[cfg(target_arch = "x86_64")]
mod attention512;
mod dechunk;
mod dense;
#[cfg(target_arch = "x86_64")]
mod direct_conv;
mod elementwise;
#[cfg(target_arch = "x86_64")]
mod gemm512;
mod grad;
#[cfg(target_arch = "x86_64")]
mod linear512;
mod math;
#[cfg(target_arch = "x86_64")]
mod microkernel;
mod norm;
pub mod pool;
pub mod profile;
#[cfg(target_arch = "x86_64")]
mod sgemm;
mod tensor;
mod util;
#[cfg(target_arch = "x86_64")]
mod winograd;

use std::sync::Arc;

use dcdit_core::backend::{Backend, Binary, DType, Grid, Segments, Unary};
use dcdit_core::{Error, Result};

pub use tensor::{CpuTensor, Shape, Storage};

/// The CPU backend: a handle to a rayon thread pool (cheap to clone; clones
/// share the pool).
#[derive(Clone)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
    profile: Arc<profile::OpProfile>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend using every available core.
    pub fn new() -> Self {
        Self::with_threads(0)
    }

    /// A backend with `threads` worker threads (`0` = available cores).
    ///
    /// # Panics
    /// Panics if the operating system refuses to spawn the threads.
    pub fn with_threads(threads: usize) -> Self {
        Self::try_with_threads(threads).expect("dcdit-backend-cpu: cannot build the thread pool")
    }

    /// Like [`CpuBackend::with_threads`], reporting thread-spawn failures as
    /// [`Error::Backend`].
    pub fn try_with_threads(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("dcdit-cpu-{i}"))
            .build()
            .map_err(|e| {
                Error::backend(format!("cpu: cannot build a {threads}-thread pool: {e}"))
            })?;
        Ok(CpuBackend {
            pool: Arc::new(pool),
            profile: Arc::default(),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The buffer of an f32 tensor (no copy); `None` for f16/bf16 storage.
    pub fn tensor_f32_slice(t: &CpuTensor) -> Option<&[f32]> {
        t.as_f32_slice()
    }

    /// Runs `f` on this backend's thread pool: ops called inside run inline
    /// on the calling worker (no hand-off and wake-up per op, which a
    /// training step of a few hundred small ops notices: the MNIST step went
    /// from ~270 to ~245 ms on a 2-core VM), and the caller's own rayon code
    /// uses the same threads. Everything `f` captures must be `Sync`, so build
    /// an [`Autodiff`](https://docs.rs/dcdit-autodiff) tape or a trainer
    /// inside `f`.
    ///
    /// ```
    /// use dcdit_backend_cpu::CpuBackend;
    /// use dcdit_core::{Backend, Result};
    /// let b = CpuBackend::with_threads(2);
    /// let y = b.install(|| -> Result<Vec<f32>> {
    ///     let x = b.from_f32(&[1.0, -2.0], &[2])?;
    ///     b.to_f32(&b.unary(&x, dcdit_core::backend::Unary::Silu)?)
    /// })?;
    /// assert_eq!(y.len(), 2);
    /// # Ok::<(), dcdit_core::Error>(())
    /// ```
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Runs op `name` on the pool, timing it when op profiling is on.
    #[inline]
    fn run<R: Send>(&self, name: &'static str, f: impl FnOnce() -> R + Send) -> R {
        if !self.profile.enabled() {
            return self.pool.install(f);
        }
        let t0 = std::time::Instant::now();
        let r = self.pool.install(f);
        self.profile.record(name, t0.elapsed());
        r
    }

    /// Turns per-op wall-time profiling on or off (off by default; clones of
    /// this backend share the table). Off, an op pays one relaxed atomic load.
    ///
    /// ```
    /// use dcdit_backend_cpu::CpuBackend;
    /// use dcdit_core::backend::{Backend, Unary};
    /// let b = CpuBackend::try_with_threads(1).unwrap();
    /// b.set_op_profiling(true);
    /// let x = b.from_f32(&[1.0, 2.0], &[2]).unwrap();
    /// b.unary(&x, Unary::Silu).unwrap();
    /// let prof = b.op_profile();
    /// assert_eq!(prof[0].name, "unary");
    /// assert_eq!(prof[0].calls, 1);
    /// ```
    pub fn set_op_profiling(&self, on: bool) {
        self.profile.set_enabled(on);
    }

    /// Accumulated per-op times since profiling started (or the last
    /// [`reset_op_profile`](Self::reset_op_profile)), largest total first.
    pub fn op_profile(&self) -> Vec<profile::OpTime> {
        self.profile.snapshot()
    }

    /// Clears the per-op table.
    pub fn reset_op_profile(&self) {
        self.profile.reset();
    }

    /// Runs `f` with per-op profiling on, from an empty table, and returns
    /// its result with the ops' times (largest first); profiling is off
    /// afterwards.
    ///
    /// ```
    /// use dcdit_backend_cpu::CpuBackend;
    /// use dcdit_core::backend::{Backend, Unary};
    /// let b = CpuBackend::try_with_threads(1).unwrap();
    /// let x = b.from_f32(&[1.0, 2.0], &[2]).unwrap();
    /// let (y, ops) = b.with_op_profile(|| b.unary(&x, Unary::Silu));
    /// assert!(y.is_ok());
    /// assert_eq!(ops[0].name, "unary");
    /// ```
    pub fn with_op_profile<R>(&self, f: impl FnOnce() -> R) -> (R, Vec<profile::OpTime>) {
        self.reset_op_profile();
        self.set_op_profiling(true);
        let r = f();
        self.set_op_profiling(false);
        (r, self.op_profile())
    }
}

/// The widest SIMD extension the CPU offers (for [`Backend::name`]).
fn simd_features() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
        if std::is_x86_feature_detected!("avx") {
            return "avx";
        }
        if std::is_x86_feature_detected!("sse4.1") {
            return "sse4.1";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        let n = self.threads();
        format!(
            "cpu ({n} thread{}, {})",
            if n == 1 { "" } else { "s" },
            simd_features()
        )
    }

    fn shape(&self, t: &CpuTensor) -> Vec<usize> {
        t.shape().to_vec()
    }

    fn dtype(&self, t: &CpuTensor) -> DType {
        t.dtype()
    }

    fn from_f32(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        CpuTensor::from_f32_vec(data.to_vec(), shape)
    }

    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.to_f32_cow().into_owned())
    }

    fn cast(&self, t: &CpuTensor, dtype: DType) -> Result<CpuTensor> {
        if t.dtype() == dtype {
            return Ok(t.clone());
        }
        Ok(CpuTensor::from_result(
            t.to_f32_cow().into_owned(),
            t.shape(),
            dtype,
        ))
    }

    fn reshape(&self, t: &CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        let n = tensor::numel_of(shape)?;
        if n != t.numel() {
            return Err(Error::input(format!(
                "reshape: cannot view {:?} ({} elements) as {shape:?} ({n} elements)",
                t.shape(),
                t.numel()
            )));
        }
        Ok(CpuTensor {
            shape: Shape::from_slice(shape),
            data: t.data.clone(),
            // Keyed by the (m, k) they were made for: valid for any view.
            derived: t.derived.clone(),
        })
    }

    fn linear(&self, x: &CpuTensor, w: &CpuTensor, b: Option<&CpuTensor>) -> Result<CpuTensor> {
        self.run("linear", || dense::linear(x, w, b))
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        grid: Grid,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        k: usize,
    ) -> Result<CpuTensor> {
        self.run("conv2d", || dense::conv2d(x, grid, w, b, k))
    }

    fn depthwise_conv3x3(&self, x: &CpuTensor, grid: Grid, w: &CpuTensor) -> Result<CpuTensor> {
        self.run("depthwise_conv3x3", || dense::depthwise_conv3x3(x, grid, w))
    }

    fn group_norm(
        &self,
        x: &CpuTensor,
        grid: Grid,
        groups: usize,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.run("group_norm", || {
            norm::group_norm(x, grid, groups, gamma, beta, eps)
        })
    }

    fn layer_norm(&self, x: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        self.run("layer_norm", || norm::layer_norm(x, eps))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        self.run("rms_norm", || norm::rms_norm(x, w, eps))
    }

    fn l2_normalize(&self, x: &CpuTensor) -> Result<CpuTensor> {
        self.run("l2_normalize", || norm::l2_normalize(x))
    }

    fn unary(&self, x: &CpuTensor, op: Unary) -> Result<CpuTensor> {
        self.run("unary", || elementwise::unary(x, op))
    }

    fn binary(&self, a: &CpuTensor, b: &CpuTensor, op: Binary) -> Result<CpuTensor> {
        self.run("binary", || elementwise::binary(a, b, op))
    }

    fn affine(&self, x: &CpuTensor, a: f32, b: f32) -> Result<CpuTensor> {
        self.run("affine", || elementwise::affine(x, a, b))
    }

    fn row_sum(&self, x: &CpuTensor) -> Result<CpuTensor> {
        self.run("row_sum", || elementwise::row_sum(x))
    }

    fn scale_rows(&self, x: &CpuTensor, s: &CpuTensor) -> Result<CpuTensor> {
        self.run("scale_rows", || elementwise::scale_rows(x, s))
    }

    fn ste(&self, x: &CpuTensor) -> Result<CpuTensor> {
        self.run("ste", || elementwise::ste(x))
    }

    fn add_segment(&self, x: &CpuTensor, v: &CpuTensor, seg: Segments) -> Result<CpuTensor> {
        self.run("add_segment", || elementwise::add_segment(x, v, seg))
    }

    fn modulate(
        &self,
        x: &CpuTensor,
        ada: &CpuTensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
    ) -> Result<CpuTensor> {
        self.run("modulate", || {
            elementwise::modulate(x, ada, shift_at, scale_at, seg)
        })
    }

    fn norm_modulate(
        &self,
        x: &CpuTensor,
        ada: &CpuTensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.run("norm_modulate", || {
            elementwise::norm_modulate(x, ada, shift_at, scale_at, seg, eps)
        })
    }

    fn gated_add(
        &self,
        x: &CpuTensor,
        y: &CpuTensor,
        ada: &CpuTensor,
        gate_at: usize,
        seg: Segments,
    ) -> Result<CpuTensor> {
        self.run("gated_add", || {
            elementwise::gated_add(x, y, ada, gate_at, seg)
        })
    }

    fn gather_rows(&self, x: &CpuTensor, idx: &[u32]) -> Result<CpuTensor> {
        self.run("gather_rows", || elementwise::gather_rows(x, idx))
    }

    fn scatter_add_rows(&self, x: &CpuTensor, idx: &[u32], rows: usize) -> Result<CpuTensor> {
        self.run("scatter_add_rows", || {
            elementwise::scatter_add_rows(x, idx, rows)
        })
    }

    fn attention(&self, qkv: &CpuTensor, heads: usize, seg: Segments) -> Result<CpuTensor> {
        self.run("attention", || attention::attention(qkv, heads, seg))
    }

    fn dechunk_smooth(
        &self,
        h: &CpuTensor,
        p: &CpuTensor,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
    ) -> Result<CpuTensor> {
        self.run("dechunk_smooth", || {
            dechunk::dechunk_smooth(h, p, pos, width, sigma, seg)
        })
    }
}
