//! Dense layers: `linear` (one gemm), `conv2d` (sliding-window gemms over a
//! zero-padded copy)
//! and the direct depthwise 3x3 convolution.

use dcdit_core::backend::Grid;
use dcdit_core::{Error, Result};

#[cfg(target_arch = "x86_64")]
use crate::linear512::{self, pack_weight, Bf16, Kind, F32};
use crate::tensor::{CpuTensor, Storage};
use crate::util::{for_row_chunks, gemm_f32, Mat};

/// Checks that an optional bias holds `m` elements and returns it as f32.
fn bias_of<'a>(
    op: &str,
    b: Option<&'a CpuTensor>,
    m: usize,
) -> Result<Option<std::borrow::Cow<'a, [f32]>>> {
    match b {
        None => Ok(None),
        Some(b) if b.numel() == m => Ok(Some(b.to_f32_cow())),
        Some(b) => Err(Error::input(format!(
            "{op}: bias has shape {:?} ({} elements), expected {m}",
            b.shape(),
            b.numel()
        ))),
    }
}

/// Fills every `m`-wide row of `out` with the bias (or zeros).
fn prefill_bias(out: &mut [f32], m: usize, bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for_row_chunks(out, m, |_, rows| {
            for row in rows.chunks_exact_mut(m) {
                row.copy_from_slice(bias);
            }
        });
    }
}

/// `w (m, k)` (the tensor `w`, its values `src`) packed for the register
/// block of kind `K`, from the tensor's cache ([`crate::tensor::Derived`])
/// or made now and cached. A cache made for another `(m, k)` (a view of the
/// same data) or the other kind (a bf16 weight met by an f32 input before)
/// is left alone and the packing made for this call only.
#[cfg(target_arch = "x86_64")]
fn packed_weight<'a, K: Kind>(
    w: &'a CpuTensor,
    src: &[K::Elem],
    m: usize,
    k: usize,
) -> std::borrow::Cow<'a, [f32]> {
    let key = (m, k, K::PER_WORD);
    let (made_for, pw) = w
        .derived
        .linear_weight
        .get_or_init(|| (key, pack_weight::<K>(src, m, k)));
    if *made_for == key {
        std::borrow::Cow::Borrowed(pw)
    } else {
        std::borrow::Cow::Owned(pack_weight::<K>(src, m, k))
    }
}

/// Fewest output columns for which an f32 linear layer takes the AVX-512
/// register block: its panels are 64 columns wide, so narrower outputs
/// compute padding. On the 2-core Zen 4 (25088 rows, the MNIST model's 1x1
/// convolutions) it took 2.18 / 2.07 / 0.66 ms for 32 / 16 / 1 output
/// columns against 0.80 / 0.43 / 0.14 on the AVX2 GEMM, and 2.04 against
/// 1.38 ms at 6272 x 256 -> 64; at 6272 x 64 -> 192 it took 1.00 against
/// 1.37 ms.
#[cfg(target_arch = "x86_64")]
const LINEAR512_MIN_COLS: usize = 128;

/// Whether an f32 linear layer over `n` rows and `m` output columns takes
/// the AVX-512 register block ([`linear512::linear`] with `F32`);
/// `DCDIT_LINEAR512=0` turns it off (for comparisons).
#[cfg(target_arch = "x86_64")]
fn linear512_applies(n: usize, m: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON
        .get_or_init(|| F32::available() && std::env::var("DCDIT_LINEAR512").as_deref() != Ok("0"));
    on && n > crate::sgemm::FEW_ROWS && m >= LINEAR512_MIN_COLS
}

/// `y = x w^T + b`; `x (.., k)`, `w (m, k)`.
pub(crate) fn linear(x: &CpuTensor, w: &CpuTensor, b: Option<&CpuTensor>) -> Result<CpuTensor> {
    let (n, k) = x.dims2();
    if w.shape().len() != 2 || w.shape()[1] != k {
        return Err(Error::input(format!(
            "linear: weight shape {:?} does not match input shape {:?} (want (m, {k}))",
            w.shape(),
            x.shape()
        )));
    }
    let m = w.shape()[0];
    let bias = bias_of("linear", b, m)?;
    let mut shape = x.shape().to_vec();
    match shape.last_mut() {
        Some(last) => *last = m,
        None => shape.push(m),
    }
    // bf16 input and weight: AMX tiles or AVX512-BF16 dot products where
    // the CPU has them (f32 accumulation; see `amx`, `linear512`), no
    // conversion of either operand to f32.
    if let (Storage::BF16(xb), Storage::BF16(wb)) = (x.storage(), w.storage()) {
        if crate::amx::available() {
            let mut out = crate::pool::take(n * m);
            crate::amx::gemm_bf16(n, m, k, xb, wb, &mut out);
            if let Some(bias) = bias.as_deref() {
                for row in out.chunks_exact_mut(m) {
                    for (o, &b) in row.iter_mut().zip(bias) {
                        *o += b;
                    }
                }
            }
            return Ok(CpuTensor::from_result(out, &shape, x.dtype()));
        }
        #[cfg(target_arch = "x86_64")]
        if Bf16::available() {
            let pw = packed_weight::<Bf16>(w, wb, m, k);
            // Written as bf16 straight from the kernel's f32 tiles.
            let mut out = crate::pool::take_bf16(n * m);
            let o = linear512::Out::Bf16(&mut out);
            linear512::linear::<Bf16>(xb, n, k, &pw, m, bias.as_deref(), o);
            return CpuTensor::new(Storage::BF16(out), &shape);
        }
    }
    let xs = x.to_f32_cow();
    let ws = w.to_f32_cow();
    let mut out = crate::pool::take(n * m);
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::few_rows_apply(n) {
        crate::sgemm::linear_few_rows(&xs, n, k, &ws, m, bias.as_deref(), &mut out);
        return Ok(CpuTensor::from_result(out, &shape, x.dtype()));
    }
    #[cfg(target_arch = "x86_64")]
    if linear512_applies(n, m) {
        let pw = packed_weight::<F32>(w, &ws, m, k);
        let o = linear512::Out::F32(&mut out);
        linear512::linear::<F32>(&xs, n, k, &pw, m, bias.as_deref(), o);
        return Ok(CpuTensor::from_result(out, &shape, x.dtype()));
    }
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::applies(n) {
        crate::sgemm::linear(&xs, n, k, &ws, m, bias.as_deref(), &mut out);
        return Ok(CpuTensor::from_result(out, &shape, x.dtype()));
    }
    prefill_bias(&mut out, m, bias.as_deref());
    // SAFETY: shapes checked above; `out` is exclusively borrowed.
    unsafe {
        gemm_f32(
            n,
            m,
            k,
            out.as_mut_ptr(),
            m as isize,
            1,
            bias.is_some(),
            Mat {
                ptr: xs.as_ptr(),
                rs: k as isize,
                cs: 1,
            },
            // w^T (k, m): element (kk, j) = w[j * k + kk].
            Mat {
                ptr: ws.as_ptr(),
                rs: 1,
                cs: k as isize,
            },
            1.0,
            true,
        );
    }
    Ok(CpuTensor::from_result(out, &shape, x.dtype()))
}

/// Checks that `x` is an NHWC activation over `grid` and returns its channels.
pub(crate) fn check_grid(op: &str, x: &CpuTensor, grid: Grid) -> Result<usize> {
    let (rows, c) = x.dims2();
    if rows != grid.rows() {
        return Err(Error::input(format!(
            "{op}: input shape {:?} has {rows} rows but the grid {}x{}x{} needs {}",
            x.shape(),
            grid.batch,
            grid.height,
            grid.width,
            grid.rows()
        )));
    }
    Ok(c)
}

/// A batch of NHWC images copied into a zero-padded layout for the
/// convolution as sliding-window GEMMs: each image row is preceded by `pad`
/// zero pixels and each image by `pad` zero rows (`hp = h + pad` rows of
/// `wp = w + pad` pixels). Neighbours share their padding: a window that runs
/// off a row's right end reads the next row's leading zeros, one that runs off
/// an image's bottom the next image's top zero rows, so the GEMMs compute
/// `(h + pad)(w + pad)` positions an image instead of `(h + 2 pad)(w + 2 pad)`
/// (32x32, 3x3 kernel: 6.3% instead of 12.9% discarded). A margin of
/// `pad * wp + pad` zero pixels before and after the batch keeps every window
/// of every padded position in bounds (the last image's bottom padding is the
/// trailing margin). Padded position `q` (in `0..batch * hp * wp`) is pixel
/// `margin + q` of the buffer; interior pixel `(b, y, x)` is position
/// `(b * hp + y + pad) * wp + x + pad`.
pub(crate) struct Padded {
    /// The padded pixels, `(2 * margin + batch * hp * wp, c)`.
    pub data: Vec<f32>,
    /// Padded image height.
    pub hp: usize,
    /// Padded image width.
    pub wp: usize,
    /// Zero pixels before each row and zero rows before each image.
    pub pad: usize,
    /// Zero pixels before (and after) the images.
    pub margin: usize,
}

impl Padded {
    /// Copies `xs (grid.rows(), c)` into the padded layout.
    pub(crate) fn new(xs: &[f32], grid: Grid, c: usize, pad: usize) -> Padded {
        let (h, w) = (grid.height, grid.width);
        let (hp, wp) = (h + pad, w + pad);
        let margin = pad * wp + pad;
        let q = grid.batch * hp * wp;
        // Every element is written below: the margins and borders zeroed,
        // the interior copied, one padded image row per task.
        let mut data = crate::pool::take((2 * margin + q) * c);
        let (head, rest) = data.split_at_mut(margin * c);
        let (body, tail) = rest.split_at_mut(q * c);
        head.fill(0.0);
        tail.fill(0.0);
        let row = wp * c;
        if row > 0 {
            for_row_chunks(body, row, |r0, chunk| {
                for (i, dst) in chunk.chunks_exact_mut(row).enumerate() {
                    let (b, yp) = ((r0 + i) / hp, (r0 + i) % hp);
                    if yp < pad || yp >= pad + h {
                        dst.fill(0.0);
                        continue;
                    }
                    let y = yp - pad;
                    let src = &xs[(b * h + y) * w * c..(b * h + y + 1) * w * c];
                    dst[..pad * c].fill(0.0);
                    dst[pad * c..(pad + w) * c].copy_from_slice(src);
                    dst[(pad + w) * c..].fill(0.0);
                }
            });
        }
        Padded {
            data,
            hp,
            wp,
            pad,
            margin,
        }
    }

    /// Padded position of interior pixel `(b, y, x)`; its window for kernel
    /// row `ky` starts at buffer pixel `position + ky * wp` (the margin is
    /// `pad * wp + pad`).
    #[inline]
    pub(crate) fn position(&self, b: usize, y: usize, x: usize) -> usize {
        (b * self.hp + y + self.pad) * self.wp + x + self.pad
    }

    /// Number of padded positions (`batch * hp * wp`).
    pub(crate) fn positions(&self, grid: Grid) -> usize {
        grid.batch * self.hp * self.wp
    }

    /// The `(positions, k * c)` matrix whose row `q` is the window of kernel
    /// row `ky` centred on padded position `q`: in NHWC the `k` pixels of one
    /// kernel row are adjacent, so the window is `k * c` contiguous floats and
    /// consecutive rows overlap (row stride `c`). No im2col copy is needed.
    pub(crate) fn window_row(&self, ky: usize, k: usize, c: usize) -> Mat {
        let pad = k / 2;
        let first = self.margin + ky * self.wp - pad * self.wp - pad;
        Mat {
            ptr: self.data[first * c..].as_ptr(),
            rs: c as isize,
            cs: 1,
        }
    }
}

/// Stride-1 "same" convolution, OHWI weights, odd `k`.
/// Checks a convolution's input, odd kernel size and OHWI weight (forward
/// and backward); returns `(cin, cout)`.
pub(crate) fn check_conv_args(
    op: &str,
    x: &CpuTensor,
    grid: Grid,
    w: &CpuTensor,
    k: usize,
) -> Result<(usize, usize)> {
    let cin = check_grid(op, x, grid)?;
    if k.is_multiple_of(2) {
        return Err(Error::input(format!(
            "{op}: kernel size must be odd for same padding, got {k}"
        )));
    }
    let ws = w.shape();
    if ws.len() != 4 || ws[1] != k || ws[2] != k || ws[3] != cin {
        return Err(Error::input(format!(
            "{op}: weight shape {ws:?} does not match (cout, {k}, {k}, {cin})"
        )));
    }
    Ok((cin, ws[0]))
}

pub(crate) fn conv2d(
    x: &CpuTensor,
    grid: Grid,
    w: &CpuTensor,
    b: Option<&CpuTensor>,
    k: usize,
) -> Result<CpuTensor> {
    let (cin, cout) = check_conv_args("conv2d", x, grid, w, k)?;
    if k == 1 {
        let x2 = CpuTensor {
            shape: [grid.rows(), cin].into_iter().collect(),
            data: x.data.clone(),
            derived: x.derived.clone(),
        };
        let w2 = CpuTensor {
            shape: [cout, cin].into_iter().collect(),
            data: w.data.clone(),
            derived: w.derived.clone(),
        };
        return linear(&x2, &w2, b);
    }
    let bias = bias_of("conv2d", b, cout)?;
    let rows = grid.rows();
    let xs = x.to_f32_cow();
    let wt = w.to_f32_cow();
    let mut out = crate::pool::take(rows * cout);
    conv_f32(&xs, grid, cin, &wt, cout, k, bias.as_deref(), &mut out);
    Ok(CpuTensor::from_result(out, &[rows, cout], x.dtype()))
}

/// Stride-1 "same" convolution (odd `k > 1`) on f32 slices as `k`
/// sliding-window GEMMs over the zero-padded input (one per kernel row, each
/// of depth `k * cin`), accumulated over every padded position and then the
/// interior copied out: `xs (grid.rows(), cin)`, OHWI `wt (cout, k, k, cin)`,
/// `out (grid.rows(), cout)` (overwritten; starts from the bias if given).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_f32(
    xs: &[f32],
    grid: Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let rows = grid.rows();
    let kc = k * k * cin;
    debug_assert_eq!(xs.len(), rows * cin);
    debug_assert_eq!(wt.len(), cout * kc);
    debug_assert_eq!(out.len(), rows * cout);
    if rows == 0 || cout == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::winograd::applies(k, cin, cout) {
        crate::winograd::conv(xs, grid, cin, wt, cout, bias, out);
        return;
    }
    let xp = Padded::new(xs, grid, cin, k / 2);
    conv_padded(&xp, grid, cin, wt, cout, k, bias, out);
    crate::pool::give(xp.data);
}

/// Whether [`conv_f32`] takes the Winograd kernels (which read the input in
/// place) for this shape, so that callers skip the [`Padded`] copy.
pub(crate) fn winograd_applies(k: usize, cin: usize, cout: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::winograd::applies(k, cin, cout)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, cin, cout);
        false
    }
}

/// [`conv_f32`] on an input already in the [`Padded`] layout (padding
/// `k / 2`), so a backward pass pads the output gradient once for both the
/// input and the weight gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_padded(
    xp: &Padded,
    grid: Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let kc = k * k * cin;
    debug_assert_eq!(wt.len(), cout * kc);
    debug_assert_eq!(out.len(), grid.rows() * cout);
    if grid.rows() == 0 || cout == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::direct_conv::available() {
        crate::direct_conv::conv(xp, grid, cin, wt, cout, k, bias, out);
        return;
    }
    let q = xp.positions(grid);
    let mut op = crate::pool::take(q * cout);
    for ky in 0..k {
        // SAFETY: every window row lies inside `xp.data` (margins), `op`
        // holds q * cout floats, the weight slice kernel row `ky`.
        unsafe {
            gemm_f32(
                q,
                cout,
                k * cin,
                op.as_mut_ptr(),
                cout as isize,
                1,
                ky > 0,
                xp.window_row(ky, k, cin),
                // w_ky^T (k*cin, cout): element (j, o) = wt[o * kc + ky * k * cin + j].
                Mat {
                    ptr: wt[ky * k * cin..].as_ptr(),
                    rs: 1,
                    cs: kc as isize,
                },
                1.0,
                true,
            );
        }
    }
    let (h, w) = (grid.height, grid.width);
    for_row_chunks(out, w * cout, |r0, chunk| {
        for (i, dst) in chunk.chunks_exact_mut(w * cout).enumerate() {
            let (b, y) = ((r0 + i) / h, (r0 + i) % h);
            let at = xp.position(b, y, 0) * cout;
            dst.copy_from_slice(&op[at..at + w * cout]);
            if let Some(bias) = bias {
                for px in dst.chunks_exact_mut(cout) {
                    for (o, &v) in px.iter_mut().zip(bias) {
                        *o += v;
                    }
                }
            }
        }
    });
    crate::pool::give(op);
}

/// Depthwise 3x3 "same" convolution without bias, `w (c, 9)`.
pub(crate) fn depthwise_conv3x3(x: &CpuTensor, grid: Grid, w: &CpuTensor) -> Result<CpuTensor> {
    let c = check_grid("depthwise_conv3x3", x, grid)?;
    if w.numel() != c * 9 {
        return Err(Error::input(format!(
            "depthwise_conv3x3: weight shape {:?} does not match ({c}, 9)",
            w.shape()
        )));
    }
    let ws = w.to_f32_cow();
    // Tap-major copy (9, c) so the inner loop runs over contiguous channels.
    let mut taps = vec![0.0f32; 9 * c];
    for ch in 0..c {
        for t in 0..9 {
            taps[t * c + ch] = ws[ch * 9 + t];
        }
    }
    let xs = x.to_f32_cow();
    let rows = grid.rows();
    let mut out = crate::pool::take(rows * c);
    depthwise_f32(&xs, grid, c, &taps, &mut out);
    Ok(CpuTensor::from_result(out, &[rows, c], x.dtype()))
}

/// Depthwise 3x3 "same" convolution on f32 slices with tap-major weights
/// `taps (9, c)`: `out[r] = sum_t taps[t] * xs[r + offset(t)]` (overwritten).
pub(crate) fn depthwise_f32(xs: &[f32], grid: Grid, c: usize, taps: &[f32], out: &mut [f32]) {
    debug_assert_eq!(taps.len(), 9 * c);
    out.fill(0.0);
    let (h, wd, l) = (grid.height as isize, grid.width as isize, grid.len());
    for_row_chunks(out, c, |r0, chunk| {
        for (i, dst) in chunk.chunks_exact_mut(c).enumerate() {
            let r = r0 + i;
            let b = r / l;
            let rem = r % l;
            let y = (rem / grid.width) as isize;
            let xx = (rem % grid.width) as isize;
            for ky in 0..3isize {
                let sy = y + ky - 1;
                if sy < 0 || sy >= h {
                    continue;
                }
                for kx in 0..3isize {
                    let sx = xx + kx - 1;
                    if sx < 0 || sx >= wd {
                        continue;
                    }
                    let src = b * l + (sy * wd + sx) as usize;
                    let src = &xs[src * c..(src + 1) * c];
                    let t = (ky * 3 + kx) as usize;
                    let tw = &taps[t * c..(t + 1) * c];
                    for ((o, &s), &wv) in dst.iter_mut().zip(src).zip(tw) {
                        *o += s * wv;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcdit_core::Backend;

    /// The packed-weight cache: a second call (from the cache) gives the
    /// first call's output bitwise, and a view of the same data as another
    /// `(m, k)` (which finds a cache made for the first shape) is still the
    /// definition's product, in either order of first use.
    #[test]
    fn cached_weight_packing_matches_the_definition() {
        let be = crate::CpuBackend::new();
        let (n, k, m) = (40, 12, 144);
        let wd = crate::util::test_data(m * k, 7);
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        for view_first in [false, true] {
            let w = CpuTensor::from_f32_vec(wd.clone(), &[m, k]).unwrap();
            let view = be.reshape(&w, &[m * k / 8, 8]).unwrap();
            let x = CpuTensor::from_f32_vec(crate::util::test_data(n * k, 1), &[n, k]).unwrap();
            let xv = CpuTensor::from_f32_vec(crate::util::test_data(n * 8, 2), &[n, 8]).unwrap();
            let run_view = || linear(&xv, &view, None).unwrap().to_f32_cow().into_owned();
            let first_view = view_first.then(run_view);
            let a = linear(&x, &w, None).unwrap().to_f32_cow().into_owned();
            let b = linear(&x, &w, None).unwrap().to_f32_cow().into_owned();
            assert_eq!(a, b);
            let r =
                crate::util::check_linear(&f64s(&x.to_f32_cow()), &f64s(&wd), None, (n, k, m), &a);
            assert!(!r.is_failure(), "{r:?}");
            let v = first_view.unwrap_or_else(run_view);
            let r = crate::util::check_linear(
                &f64s(&xv.to_f32_cow()),
                &f64s(&wd),
                None,
                (n, 8, m * k / 8),
                &v,
            );
            assert!(!r.is_failure(), "{r:?}");
        }
    }

    /// A bf16 weight met first by an f32 input (the f32 block's packing
    /// cached), then by a bf16 input: the bf16 product is still the f32 one
    /// within bf16 output rounding (a cache not keyed by the block kind
    /// would feed f32 words to `VDPBF16PS`).
    #[test]
    fn cached_weight_packing_is_per_block_kind() {
        use half::bf16;
        let (n, k, m) = (40, 12, 144);
        let to16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let (w16, x16) = (
            to16(crate::util::test_data(m * k, 7)),
            to16(crate::util::test_data(n * k, 1)),
        );
        let w = CpuTensor::from_bf16_vec(w16, &[m, k]).unwrap();
        let xf =
            CpuTensor::from_f32_vec(x16.iter().map(|v| v.to_f32()).collect(), &[n, k]).unwrap();
        let xb = CpuTensor::from_bf16_vec(x16, &[n, k]).unwrap();
        let a = linear(&xf, &w, None).unwrap().to_f32_cow().into_owned();
        let b = linear(&xb, &w, None).unwrap().to_f32_cow().into_owned();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= p.abs() / 128.0 + 1e-6, "{p} vs {q}");
        }
    }
}
