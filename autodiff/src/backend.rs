//! `Backend` for `Autodiff<B>`: forward on the inner backend, then record.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use dcdit_core::backend::{Backend, Binary, DType, Grid, Segments, Unary};
use dcdit_core::{GradBackend, Result};

use crate::tape::Op;
use crate::{AdTensor, Autodiff};

impl<B: GradBackend> Autodiff<B> {
    /// Wraps `value`: recorded with `op` (built lazily from the parents) when
    /// `parents` says so, a constant otherwise.
    #[inline]
    fn out<const N: usize>(
        &self,
        value: B::Tensor,
        parents: Option<[Option<usize>; N]>,
        op: impl FnOnce([Option<usize>; N]) -> Op<B>,
    ) -> AdTensor<B> {
        match parents {
            Some(p) => self.push(value, op(p)),
            None => AdTensor::constant(value),
        }
    }
}

impl<B: GradBackend> Backend for Autodiff<B> {
    type Tensor = AdTensor<B>;

    fn name(&self) -> String {
        format!("autodiff<{}>", self.inner.name())
    }

    fn shape(&self, t: &AdTensor<B>) -> Vec<usize> {
        self.inner.shape(&t.value)
    }

    fn dtype(&self, t: &AdTensor<B>) -> DType {
        self.inner.dtype(&t.value)
    }

    fn from_f32(&self, data: &[f32], shape: &[usize]) -> Result<AdTensor<B>> {
        Ok(AdTensor::constant(self.inner.from_f32(data, shape)?))
    }

    fn to_f32(&self, t: &AdTensor<B>) -> Result<Vec<f32>> {
        self.inner.to_f32(&t.value)
    }

    fn cast(&self, t: &AdTensor<B>, dtype: DType) -> Result<AdTensor<B>> {
        let v = self.inner.cast(&t.value, dtype)?;
        let p = self.parents([Some(t)])?;
        Ok(self.out(v, p, |[px]| Op::Cast {
            dtype: self.inner.dtype(&t.value),
            px,
        }))
    }

    fn reshape(&self, t: &AdTensor<B>, shape: &[usize]) -> Result<AdTensor<B>> {
        let v = self.inner.reshape(&t.value, shape)?;
        let p = self.parents([Some(t)])?;
        Ok(self.out(v, p, |[px]| Op::Reshape {
            shape: self.inner.shape(&t.value),
            px,
        }))
    }

    fn linear(
        &self,
        x: &AdTensor<B>,
        w: &AdTensor<B>,
        b: Option<&AdTensor<B>>,
    ) -> Result<AdTensor<B>> {
        let v = self.inner.linear(&x.value, &w.value, b.map(|b| &b.value))?;
        let p = self.parents([Some(x), Some(w), b])?;
        Ok(self.out(v, p, |[px, pw, pb]| Op::Linear {
            x: pw.map(|_| x.value.clone()),
            w: px.map(|_| w.value.clone()),
            px,
            pw,
            pb,
        }))
    }

    fn conv2d(
        &self,
        x: &AdTensor<B>,
        grid: Grid,
        w: &AdTensor<B>,
        b: Option<&AdTensor<B>>,
        k: usize,
    ) -> Result<AdTensor<B>> {
        let v = self
            .inner
            .conv2d(&x.value, grid, &w.value, b.map(|b| &b.value), k)?;
        let p = self.parents([Some(x), Some(w), b])?;
        Ok(self.out(v, p, |[px, pw, pb]| Op::Conv2d {
            x: x.value.clone(),
            w: w.value.clone(),
            grid,
            k,
            px,
            pw,
            pb,
        }))
    }

    fn depthwise_conv3x3(
        &self,
        x: &AdTensor<B>,
        grid: Grid,
        w: &AdTensor<B>,
    ) -> Result<AdTensor<B>> {
        let v = self.inner.depthwise_conv3x3(&x.value, grid, &w.value)?;
        let p = self.parents([Some(x), Some(w)])?;
        Ok(self.out(v, p, |[px, pw]| Op::Depthwise {
            x: x.value.clone(),
            w: w.value.clone(),
            grid,
            px,
            pw,
        }))
    }

    fn group_norm(
        &self,
        x: &AdTensor<B>,
        grid: Grid,
        groups: usize,
        gamma: &AdTensor<B>,
        beta: &AdTensor<B>,
        eps: f32,
    ) -> Result<AdTensor<B>> {
        let v = self
            .inner
            .group_norm(&x.value, grid, groups, &gamma.value, &beta.value, eps)?;
        let p = self.parents([Some(x), Some(gamma), Some(beta)])?;
        Ok(self.out(v, p, |[px, pg, pb]| Op::GroupNorm {
            x: x.value.clone(),
            gamma: gamma.value.clone(),
            grid,
            groups,
            eps,
            px,
            pg,
            pb,
        }))
    }

    fn layer_norm(&self, x: &AdTensor<B>, eps: f32) -> Result<AdTensor<B>> {
        let v = self.inner.layer_norm(&x.value, eps)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::LayerNorm {
            x: x.value.clone(),
            eps,
            px,
        }))
    }

    fn rms_norm(&self, x: &AdTensor<B>, w: &AdTensor<B>, eps: f32) -> Result<AdTensor<B>> {
        let v = self.inner.rms_norm(&x.value, &w.value, eps)?;
        let p = self.parents([Some(x), Some(w)])?;
        Ok(self.out(v, p, |[px, pw]| Op::RmsNorm {
            x: x.value.clone(),
            w: w.value.clone(),
            eps,
            px,
            pw,
        }))
    }

    fn l2_normalize(&self, x: &AdTensor<B>) -> Result<AdTensor<B>> {
        let v = self.inner.l2_normalize(&x.value)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::L2Normalize {
            x: x.value.clone(),
            px,
        }))
    }

    fn unary(&self, x: &AdTensor<B>, op: Unary) -> Result<AdTensor<B>> {
        let v = self.inner.unary(&x.value, op)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::Unary {
            x: x.value.clone(),
            op,
            px,
        }))
    }

    fn binary(&self, a: &AdTensor<B>, b: &AdTensor<B>, op: Binary) -> Result<AdTensor<B>> {
        let v = self.inner.binary(&a.value, &b.value, op)?;
        let p = self.parents([Some(a), Some(b)])?;
        Ok(self.out(v, p, |[pa, pb]| match op {
            Binary::Add => Op::Add { pa, pb },
            Binary::Sub => Op::Sub { pa, pb },
            Binary::Mul => Op::Mul {
                a: pb.map(|_| a.value.clone()),
                b: pa.map(|_| b.value.clone()),
                pa,
                pb,
            },
        }))
    }

    fn affine(&self, x: &AdTensor<B>, a: f32, b: f32) -> Result<AdTensor<B>> {
        let v = self.inner.affine(&x.value, a, b)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::Affine { a, px }))
    }

    fn row_sum(&self, x: &AdTensor<B>) -> Result<AdTensor<B>> {
        let v = self.inner.row_sum(&x.value)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::RowSum {
            shape: self.inner.shape(&x.value),
            px,
        }))
    }

    fn scale_rows(&self, x: &AdTensor<B>, s: &AdTensor<B>) -> Result<AdTensor<B>> {
        let v = self.inner.scale_rows(&x.value, &s.value)?;
        let p = self.parents([Some(x), Some(s)])?;
        Ok(self.out(v, p, |[px, ps]| Op::ScaleRows {
            x: ps.map(|_| x.value.clone()),
            s: px.map(|_| s.value.clone()),
            px,
            ps,
        }))
    }

    fn ste(&self, x: &AdTensor<B>) -> Result<AdTensor<B>> {
        let v = self.inner.ste(&x.value)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::Ste { px }))
    }

    fn add_segment(&self, x: &AdTensor<B>, v: &AdTensor<B>, seg: Segments) -> Result<AdTensor<B>> {
        let o = self.inner.add_segment(&x.value, &v.value, seg)?;
        let p = self.parents([Some(x), Some(v)])?;
        Ok(self.out(o, p, |[px, pv]| Op::AddSegment {
            seg: seg.to_vec(),
            px,
            pv,
        }))
    }

    fn modulate(
        &self,
        x: &AdTensor<B>,
        ada: &AdTensor<B>,
        shift_at: usize,
        scale_at: usize,
        seg: Segments,
    ) -> Result<AdTensor<B>> {
        let v = self
            .inner
            .modulate(&x.value, &ada.value, shift_at, scale_at, seg)?;
        let p = self.parents([Some(x), Some(ada)])?;
        Ok(self.out(v, p, |[px, pada]| Op::Modulate {
            x: x.value.clone(),
            ada: ada.value.clone(),
            shift_at,
            scale_at,
            seg: seg.to_vec(),
            px,
            pada,
        }))
    }

    fn gated_add(
        &self,
        x: &AdTensor<B>,
        y: &AdTensor<B>,
        ada: &AdTensor<B>,
        gate_at: usize,
        seg: Segments,
    ) -> Result<AdTensor<B>> {
        let v = self
            .inner
            .gated_add(&x.value, &y.value, &ada.value, gate_at, seg)?;
        let p = self.parents([Some(x), Some(y), Some(ada)])?;
        Ok(self.out(v, p, |[px, py, pada]| Op::GatedAdd {
            y_ada: (py.is_some() || pada.is_some()).then(|| (y.value.clone(), ada.value.clone())),
            gate_at,
            seg: seg.to_vec(),
            px,
            py,
            pada,
        }))
    }

    fn gather_rows(&self, x: &AdTensor<B>, idx: &[u32]) -> Result<AdTensor<B>> {
        let v = self.inner.gather_rows(&x.value, idx)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::Gather {
            idx: idx.to_vec(),
            rows: self.inner.shape(&x.value).first().copied().unwrap_or(0),
            px,
        }))
    }

    fn scatter_add_rows(&self, x: &AdTensor<B>, idx: &[u32], rows: usize) -> Result<AdTensor<B>> {
        let v = self.inner.scatter_add_rows(&x.value, idx, rows)?;
        let p = self.parents([Some(x)])?;
        Ok(self.out(v, p, |[px]| Op::ScatterAdd {
            idx: idx.to_vec(),
            px,
        }))
    }

    fn attention(&self, qkv: &AdTensor<B>, heads: usize, seg: Segments) -> Result<AdTensor<B>> {
        let v = self.inner.attention(&qkv.value, heads, seg)?;
        let p = self.parents([Some(qkv)])?;
        Ok(self.out(v, p, |[px]| Op::Attention {
            qkv: qkv.value.clone(),
            heads,
            seg: seg.to_vec(),
            px,
        }))
    }

    fn dechunk_smooth(
        &self,
        h: &AdTensor<B>,
        p: &AdTensor<B>,
        pos: &[u32],
        width: usize,
        sigma: f32,
        seg: Segments,
    ) -> Result<AdTensor<B>> {
        let v = self
            .inner
            .dechunk_smooth(&h.value, &p.value, pos, width, sigma, seg)?;
        let par = self.parents([Some(h), Some(p)])?;
        Ok(self.out(v, par, |[ph, pp]| Op::DechunkSmooth {
            h: h.value.clone(),
            p: p.value.clone(),
            pos: pos.to_vec(),
            width,
            sigma,
            seg: seg.to_vec(),
            ph,
            pp,
        }))
    }
}
