//! [`GradBackend`] on Vulkan: every backward op and the optimiser on the device.

use std::sync::Arc;

use dcdit_core::backend::{Backend, Grid, Segments, Unary};
use dcdit_core::backend_grad::{AdamW, AdamWScalars, GradBackend};
use dcdit_core::{Error, Result};

use crate::engine::Buffer;
use crate::{
    check_attention, check_block, check_conv_args, check_dechunk_args, check_per_sample,
    check_segments, dechunk_push, f, groups1, groups_rows, u, Ew, Src, VkTensor, VulkanBackend,
};

fn check_g(op: &str, g: &VkTensor, rows: usize, cols: usize) -> Result<()> {
    if g.dims2() != (rows, cols) || g.numel() != rows * cols {
        return Err(Error::input(format!(
            "{op}: gradient shape {:?} does not match the forward output ({rows}, {cols})",
            g.shape
        )));
    }
    Ok(())
}

fn check_same(op: &str, a_name: &str, a: &VkTensor, b_name: &str, b: &VkTensor) -> Result<()> {
    if a.shape != b.shape {
        return Err(Error::input(format!(
            "{op}: {a_name} {:?} and {b_name} {:?} must have equal shapes",
            a.shape, b.shape
        )));
    }
    Ok(())
}

impl VulkanBackend {
    /// Column sums over segment rows into `out[s * ostride + ooff + j]`.
    #[allow(clippy::too_many_arguments)]
    fn colred(
        &self,
        x: &Arc<Buffer>,
        y: Option<&Arc<Buffer>>,
        seg_buf: &Arc<Buffer>,
        nseg: usize,
        c: usize,
        out: &Arc<Buffer>,
        ostride: usize,
        ooff: usize,
        accum: bool,
    ) -> Result<()> {
        if c == 0 || nseg == 0 {
            return Ok(());
        }
        self.run(
            "colred",
            &[x, y.unwrap_or(self.dummy()), seg_buf, out],
            &[u(c), y.is_some() as u32, u(ostride), u(ooff), accum as u32],
            [c.div_ceil(64) as u32, nseg as u32, 1],
        )
    }

    fn col_sum_buf(
        &self,
        x: &Arc<Buffer>,
        y: Option<&Arc<Buffer>>,
        rows: usize,
        c: usize,
    ) -> Result<Arc<Buffer>> {
        let out = self.out(c)?;
        if rows == 0 {
            let z = self.full_f32(&[c], 0.0)?;
            return Ok(z.buf);
        }
        let sb = self.seg_buf(&[0, rows])?;
        self.colred(x, y, &sb, 1, c, &out, c, 0, false)?;
        Ok(out)
    }

    fn wrap(&self, buf: Arc<Buffer>, shape: &[usize], like: &VkTensor) -> Result<VkTensor> {
        self.finish(buf, shape, like.dtype)
    }
}

impl GradBackend for VulkanBackend {
    fn matmul(&self, a: &VkTensor, b: &VkTensor, ta: bool, tb: bool) -> Result<VkTensor> {
        if a.shape.len() != 2 || b.shape.len() != 2 {
            return Err(Error::input(format!(
                "matmul: operands must be 2-D, got {:?} and {:?}",
                a.shape, b.shape
            )));
        }
        let (m, k) = if ta {
            (a.shape[1], a.shape[0])
        } else {
            (a.shape[0], a.shape[1])
        };
        let (k2, n) = if tb {
            (b.shape[1], b.shape[0])
        } else {
            (b.shape[0], b.shape[1])
        };
        if k != k2 {
            return Err(Error::input(format!(
                "matmul: inner dimensions differ: {:?}{} x {:?}{}",
                a.shape,
                if ta { "^T" } else { "" },
                b.shape,
                if tb { "^T" } else { "" }
            )));
        }
        let ast = if ta { (1, m) } else { (k, 1) };
        let bst = if tb { (1, k) } else { (n, 1) };
        let out = if k == 0 {
            self.full_f32(&[m, n], 0.0)?.buf
        } else {
            self.gemm(Src::of(a), ast, Src::of(b), bst, None, m, n, k)?
        };
        self.wrap(out, &[m, n], a)
    }

    fn col_sum(&self, x: &VkTensor) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        let out = self.col_sum_buf(&self.view(x)?, None, rows, c)?;
        self.wrap(out, &[c], x)
    }

    fn segment_sum(&self, x: &VkTensor, seg: Segments) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        let s = check_segments("segment_sum", seg, rows)?;
        let out = self.full_f32(&[s, c], 0.0)?.buf;
        let sb = self.seg_buf(seg)?;
        self.colred(&self.view(x)?, None, &sb, s, c, &out, c, 0, false)?;
        self.wrap(out, &[s, c], x)
    }

    fn full(&self, shape: &[usize], value: f32) -> Result<VkTensor> {
        self.full_f32(shape, value)
    }

    fn sum_squares(&self, x: &VkTensor) -> Result<f64> {
        let n = x.numel();
        if n == 0 {
            return Ok(0.0);
        }
        let groups = n.div_ceil(256).min(1024);
        let out = self.out(groups)?;
        self.run(
            "sumsq",
            &[&self.view(x)?, &out],
            &[u(n)],
            [groups as u32, 1, 1],
        )?;
        let t = VkTensor {
            buf: out,
            shape: vec![groups],
            dtype: dcdit_core::DType::F32,
        };
        Ok(self.to_f32(&t)?.iter().map(|&v| v as f64).sum())
    }

    fn conv2d_backward(
        &self,
        x: &VkTensor,
        grid: Grid,
        w: &VkTensor,
        k: usize,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor, VkTensor)> {
        let (cin, cout) = check_conv_args("conv2d_backward", x, grid, w, k)?;
        let rows = grid.rows();
        check_g("conv2d_backward", g, rows, cout)?;
        let kk = k * k * cin;
        // dx: convolution of g with the flipped, transposed weight.
        let wn = cout * kk;
        let wf = self.out(wn)?;
        if wn > 0 {
            self.run(
                "convaux",
                &[&self.view(w)?, &wf],
                &[
                    u(wn),
                    1,
                    u(grid.height),
                    u(grid.width),
                    u(cin),
                    u(k),
                    u(cout),
                ],
                groups1(wn),
            )?;
        }
        // Widened once (16-bit storage), used twice.
        let gv = self.view(g)?;
        let dx = self.conv_raw(&gv, grid, cout, &wf, cin, None, k)?;
        // dw (cout, kk) = g^T (cout, rows) x im2col(x) (rows, kk).
        let dw = if rows == 0 {
            self.full_f32(&[cout, kk], 0.0)?.buf
        } else if k == 1 {
            self.gemm(
                Src::of(g),
                (1, cout),
                Src::of(x),
                (cin, 1),
                None,
                cout,
                kk,
                rows,
            )?
        } else {
            let cn = rows * kk;
            let cols = self.out(cn)?;
            self.run(
                "convaux",
                &[&self.view(x)?, &cols],
                &[
                    u(cn),
                    0,
                    u(grid.height),
                    u(grid.width),
                    u(cin),
                    u(k),
                    u(cout),
                ],
                groups1(cn),
            )?;
            self.gemm(
                Src::of(g),
                (1, cout),
                Src::f32(&cols),
                (kk, 1),
                None,
                cout,
                kk,
                rows,
            )?
        };
        let db = self.col_sum_buf(&gv, None, rows, cout)?;
        Ok((
            self.wrap(dx, &x.shape, x)?,
            self.wrap(dw, &w.shape, w)?,
            self.wrap(db, &[cout], w)?,
        ))
    }

    fn depthwise_conv3x3_backward(
        &self,
        x: &VkTensor,
        grid: Grid,
        w: &VkTensor,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor)> {
        let (rows, c) = x.dims2();
        if rows != grid.rows() || w.numel() != c * 9 {
            return Err(Error::input(format!(
                "depthwise_conv3x3_backward: input {:?} / weight {:?} do not match the grid ({} rows) and ({c}, 9)",
                x.shape,
                w.shape,
                grid.rows()
            )));
        }
        check_g("depthwise_conv3x3_backward", g, rows, c)?;
        let n = rows * c;
        // Widened once (16-bit storage), used twice.
        let gv = self.view(g)?;
        let dx = self.out(n)?;
        let dw = self.out(9 * c)?;
        if n > 0 {
            self.run(
                "dwconv",
                &[&gv, &self.view(w)?, &dx],
                &[u(n), 1, u(grid.height), u(grid.width), u(c)],
                groups1(n),
            )?;
        }
        if c > 0 {
            self.run(
                "dwconv_dw",
                &[&self.view(x)?, &gv, &dw],
                &[u(rows), u(grid.height), u(grid.width), u(c)],
                [c.div_ceil(64) as u32, 9, 1],
            )?;
        }
        Ok((self.wrap(dx, &x.shape, x)?, self.wrap(dw, &w.shape, w)?))
    }

    fn group_norm_backward(
        &self,
        x: &VkTensor,
        grid: Grid,
        groups: usize,
        gamma: &VkTensor,
        eps: f32,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor, VkTensor)> {
        let (rows, c) = x.dims2();
        if rows != grid.rows() {
            return Err(Error::input(format!(
                "group_norm_backward: input shape {:?} has {rows} rows but the grid needs {}",
                x.shape,
                grid.rows()
            )));
        }
        if groups == 0 || c % groups != 0 {
            return Err(Error::input(format!(
                "group_norm_backward: {c} channels cannot be split into {groups} groups"
            )));
        }
        if gamma.numel() != c {
            return Err(Error::input(format!(
                "group_norm_backward: gamma {:?} must hold {c} elements",
                gamma.shape
            )));
        }
        check_g("group_norm_backward", g, rows, c)?;
        let n = rows * c;
        // Widened once (16-bit storage), used twice.
        let gv = self.view(g)?;
        let dx = self.out(n)?;
        let t = self.out(n)?;
        if n > 0 {
            self.run(
                "groupnorm",
                &[
                    &self.view(x)?,
                    &gv,
                    &self.view(gamma)?,
                    self.dummy(),
                    &dx,
                    &t,
                ],
                &[u(grid.len()), u(c), u(groups), f(eps), 1],
                [(grid.batch * groups) as u32, 1, 1],
            )?;
        }
        let dgamma = self.col_sum_buf(&t, None, rows, c)?;
        let dbeta = self.col_sum_buf(&gv, None, rows, c)?;
        Ok((
            self.wrap(dx, &x.shape, x)?,
            self.wrap(dgamma, &gamma.shape, gamma)?,
            self.wrap(dbeta, &gamma.shape, gamma)?,
        ))
    }

    fn layer_norm_backward(&self, x: &VkTensor, eps: f32, g: &VkTensor) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        check_g("layer_norm_backward", g, rows, c)?;
        let out = self.rownorm_bwd(x, g, None, 0, eps)?;
        self.wrap(out, &x.shape, x)
    }

    fn rms_norm_backward(
        &self,
        x: &VkTensor,
        w: &VkTensor,
        eps: f32,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor)> {
        let (rows, c) = x.dims2();
        if w.numel() != c {
            return Err(Error::input(format!(
                "rms_norm_backward: weight shape {:?} must hold {c} elements for input {:?}",
                w.shape, x.shape
            )));
        }
        check_g("rms_norm_backward", g, rows, c)?;
        let dx = self.rownorm_bwd(x, g, Some(w), 1, eps)?;
        let terms = self.rownorm_bwd(x, g, Some(w), 3, eps)?;
        let dw = self.col_sum_buf(&terms, None, rows, c)?;
        Ok((self.wrap(dx, &x.shape, x)?, self.wrap(dw, &w.shape, w)?))
    }

    fn l2_normalize_backward(&self, x: &VkTensor, g: &VkTensor) -> Result<VkTensor> {
        let (rows, c) = x.dims2();
        check_g("l2_normalize_backward", g, rows, c)?;
        let out = self.rownorm_bwd(x, g, None, 2, 0.0)?;
        self.wrap(out, &x.shape, x)
    }

    fn unary_backward(&self, x: &VkTensor, op: Unary, g: &VkTensor) -> Result<VkTensor> {
        check_same("unary_backward", "x", x, "g", g)?;
        let mode = Ew::UnaryGrad as u32
            + match op {
                Unary::Silu => 0,
                Unary::GeluTanh => 1,
                Unary::Sigmoid => 2,
            };
        self.ew(x, Some(g), mode, 1, 0.0, 0.0, &x.shape)
    }

    fn modulate_backward(
        &self,
        x: &VkTensor,
        ada: &VkTensor,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor)> {
        let (rows, c, vc) = check_per_sample("modulate_backward", x, ada, seg)?;
        check_block("modulate_backward", "shift", shift_at, c, vc)?;
        check_block("modulate_backward", "scale", scale_at, c, vc)?;
        check_g("modulate_backward", g, rows, c)?;
        let dx = self.segbcast(g, None, ada, seg, 3, shift_at, scale_at)?;
        let s = seg.len() - 1;
        let dada = self.full_f32(&ada.shape, 0.0)?.buf;
        let sb = self.seg_buf(seg)?;
        // Widened once (16-bit storage), used twice.
        let gv = self.view(g)?;
        self.colred(&gv, None, &sb, s, c, &dada, vc, shift_at * c, false)?;
        self.colred(
            &gv,
            Some(&self.view(x)?),
            &sb,
            s,
            c,
            &dada,
            vc,
            scale_at * c,
            shift_at == scale_at,
        )?;
        Ok((self.cast(&dx, x.dtype)?, self.wrap(dada, &ada.shape, ada)?))
    }

    fn gated_add_backward(
        &self,
        y: &VkTensor,
        ada: &VkTensor,
        gate_at: usize,
        seg: Segments,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor)> {
        let (rows, c, vc) = check_per_sample("gated_add_backward", y, ada, seg)?;
        check_block("gated_add_backward", "gate", gate_at, c, vc)?;
        check_g("gated_add_backward", g, rows, c)?;
        let dy = self.segbcast(g, None, ada, seg, 4, gate_at, 0)?;
        let s = seg.len() - 1;
        let dada = self.full_f32(&ada.shape, 0.0)?.buf;
        let sb = self.seg_buf(seg)?;
        self.colred(
            &self.view(g)?,
            Some(&self.view(y)?),
            &sb,
            s,
            c,
            &dada,
            vc,
            gate_at * c,
            false,
        )?;
        Ok((self.cast(&dy, y.dtype)?, self.wrap(dada, &ada.shape, ada)?))
    }

    fn attention_backward(
        &self,
        qkv: &VkTensor,
        heads: usize,
        seg: Segments,
        g: &VkTensor,
    ) -> Result<VkTensor> {
        let (t, d) = check_attention("attention_backward", qkv, heads, seg)?;
        check_g("attention_backward", g, t, d)?;
        let dqkv = self.out(t * 3 * d)?;
        if t > 0 && d > 0 {
            let (out, lse, blk, nblk) = self.attention_raw(qkv, heads, seg, t, d)?;
            // Widened once (16-bit storage), used twice.
            let (qkvv, gv) = (self.view(qkv)?, self.view(g)?);
            let dd = self.out(t * heads)?;
            let hd = d / heads;
            let push = [u(d), u(heads), u(hd), f(1.0 / (hd as f32).sqrt()), u(nblk)];
            let grid = [nblk as u32, heads as u32, 1];
            self.run(
                crate::attn_kernel("attn_bwd_dq", hd),
                &[&qkvv, &blk, &out, &gv, &lse, &dd, &dqkv],
                &push,
                grid,
            )?;
            self.run(
                crate::attn_kernel("attn_bwd_dkv", hd),
                &[&qkvv, &blk, &gv, &lse, &dd, &dqkv],
                &push,
                grid,
            )?;
        }
        self.wrap(dqkv, &qkv.shape, qkv)
    }

    fn dechunk_smooth_backward(
        &self,
        h: &VkTensor,
        p: &VkTensor,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
        g: &VkTensor,
    ) -> Result<(VkTensor, VkTensor)> {
        let (t, d) = check_dechunk_args("dechunk_smooth_backward", h, p, pos, width, seg)?;
        check_g("dechunk_smooth_backward", g, t, d)?;
        let dh = self.out(t * d)?;
        let dp = self.out(t)?;
        if t > 0 {
            if d == 0 {
                let z = self.full_f32(&[t], 0.0)?;
                return Ok((self.wrap(dh, &h.shape, h)?, self.wrap(z.buf, &p.shape, p)?));
            }
            let (ub, tab, tablen) = self.dechunk_inputs(pos, width, sigma, seg)?;
            let aux = self.out(2 * t)?;
            let (hb, pb, gb) = (self.view(h)?, self.view(p)?, self.view(g)?);
            let bufs = |o: &Arc<Buffer>, op: &Arc<Buffer>| {
                [
                    hb.clone(),
                    pb.clone(),
                    ub.clone(),
                    tab.clone(),
                    gb.clone(),
                    aux.clone(),
                    o.clone(),
                    op.clone(),
                ]
            };
            let b1 = bufs(self.dummy(), self.dummy());
            let r1: Vec<&Arc<Buffer>> = b1.iter().collect();
            self.run(
                "dechunk",
                &r1,
                &dechunk_push(t, d, width, tablen, seg.len(), 1),
                groups_rows(t),
            )?;
            let b2 = bufs(&dh, &dp);
            let r2: Vec<&Arc<Buffer>> = b2.iter().collect();
            self.run(
                "dechunk",
                &r2,
                &dechunk_push(t, d, width, tablen, seg.len(), 2),
                groups_rows(t),
            )?;
        }
        Ok((self.wrap(dh, &h.shape, h)?, self.wrap(dp, &p.shape, p)?))
    }

    fn adamw_step(
        &self,
        param: &VkTensor,
        grad: &VkTensor,
        m: &VkTensor,
        v: &VkTensor,
        hp: AdamW,
        grad_scale: f32,
    ) -> Result<(VkTensor, VkTensor, VkTensor)> {
        check_same("adamw_step", "param", param, "grad", grad)?;
        check_same("adamw_step", "param", param, "m", m)?;
        check_same("adamw_step", "param", param, "v", v)?;
        let AdamWScalars {
            decay,
            w1,
            b2,
            w2,
            neg_step,
            bc2_sqrt,
        } = hp.scalars()?;
        let n = param.numel();
        let (po, mo, vo) = (self.out(n)?, self.out(n)?, self.out(n)?);
        if n > 0 {
            self.run(
                "adamw",
                &[
                    &self.view(param)?,
                    &self.view(grad)?,
                    &self.view(m)?,
                    &self.view(v)?,
                    &po,
                    &mo,
                    &vo,
                ],
                &[
                    u(n),
                    f(decay),
                    f(w1),
                    f(b2),
                    f(w2),
                    f(neg_step),
                    f(bc2_sqrt),
                    f(hp.eps),
                    f(grad_scale),
                ],
                groups1(n),
            )?;
        }
        Ok((
            self.wrap(po, &param.shape, param)?,
            self.wrap(mo, &m.shape, m)?,
            self.wrap(vo, &v.shape, v)?,
        ))
    }

    fn ema_update(&self, ema: &VkTensor, param: &VkTensor, decay: f32) -> Result<VkTensor> {
        check_same("ema_update", "ema", ema, "param", param)?;
        let alpha = (1.0 - decay as f64) as f32;
        self.ew(
            ema,
            Some(param),
            Ew::Ema as u32,
            1,
            decay,
            alpha,
            &ema.shape,
        )
    }
}

impl VulkanBackend {
    fn rownorm_bwd(
        &self,
        x: &VkTensor,
        g: &VkTensor,
        w: Option<&VkTensor>,
        mode: u32,
        eps: f32,
    ) -> Result<Arc<Buffer>> {
        let (rows, c) = x.dims2();
        let out = self.out(rows * c)?;
        if rows * c > 0 {
            self.run(
                "rownorm_bwd",
                &[&self.view(x)?, &self.view(g)?, &self.view_opt(w)?, &out],
                &[u(rows), u(c), mode, f(eps)],
                groups_rows(rows),
            )?;
        }
        Ok(out)
    }
}
