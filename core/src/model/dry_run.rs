//! A backend that computes shapes only, so the model code itself can count
//! FLOPs for any config and compression without weights or compute.

use crate::backend::{Backend, Binary, DType, Grid, Segments, Unary};
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::flops::FlopCount;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Shape-only backend: every op returns a tensor of the right shape and no data.
/// Reading a `(n, 1)` tensor back gives boundary probabilities that keep
/// `keep` of every `l` tokens (evenly spread), which steers the routing.
#[derive(Debug, Clone)]
pub struct ShapeBackend {
    /// Tokens per sample.
    pub l: usize,
    /// Natural boundaries per sample.
    pub keep: usize,
}

/// A tensor of [`ShapeBackend`]: its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape(pub Vec<usize>);

fn rows(t: &Shape) -> usize {
    t.0.first().copied().unwrap_or(1)
}

impl Backend for ShapeBackend {
    type Tensor = Shape;
    fn name(&self) -> String {
        "shape-only".into()
    }
    fn shape(&self, t: &Shape) -> Vec<usize> {
        t.0.clone()
    }
    fn dtype(&self, _: &Shape) -> DType {
        DType::F32
    }
    fn from_f32(&self, _: &[f32], shape: &[usize]) -> Result<Shape> {
        Ok(Shape(shape.to_vec()))
    }
    fn to_f32(&self, t: &Shape) -> Result<Vec<f32>> {
        let n: usize = t.0.iter().product();
        let l = self.l.max(1);
        // Forced ends count as two of the kept tokens.
        let inner = self.keep.saturating_sub(2);
        Ok((0..n)
            .map(|i| {
                let j = i % l;
                let keep = l > 2
                    && j > 0
                    && j < l - 1
                    && (j * inner) / (l - 2) != ((j - 1) * inner) / (l - 2);
                if keep {
                    0.9
                } else {
                    0.1
                }
            })
            .collect())
    }
    fn cast(&self, t: &Shape, _: DType) -> Result<Shape> {
        Ok(t.clone())
    }
    fn reshape(&self, t: &Shape, shape: &[usize]) -> Result<Shape> {
        if t.0.iter().product::<usize>() != shape.iter().product::<usize>() {
            return Err(Error::backend("reshape changes the element count"));
        }
        Ok(Shape(shape.to_vec()))
    }
    fn linear(&self, x: &Shape, w: &Shape, _: Option<&Shape>) -> Result<Shape> {
        Ok(Shape(vec![rows(x), rows(w)]))
    }
    fn conv2d(
        &self,
        _: &Shape,
        grid: Grid,
        w: &Shape,
        _: Option<&Shape>,
        _: usize,
    ) -> Result<Shape> {
        Ok(Shape(vec![grid.rows(), rows(w)]))
    }
    fn depthwise_conv3x3(&self, x: &Shape, _: Grid, _: &Shape) -> Result<Shape> {
        Ok(x.clone())
    }
    fn group_norm(
        &self,
        x: &Shape,
        _: Grid,
        _: usize,
        _: &Shape,
        _: &Shape,
        _: f32,
    ) -> Result<Shape> {
        Ok(x.clone())
    }
    fn layer_norm(&self, x: &Shape, _: f32) -> Result<Shape> {
        Ok(x.clone())
    }
    fn rms_norm(&self, x: &Shape, _: &Shape, _: f32) -> Result<Shape> {
        Ok(x.clone())
    }
    fn l2_normalize(&self, x: &Shape) -> Result<Shape> {
        Ok(x.clone())
    }
    fn unary(&self, x: &Shape, _: Unary) -> Result<Shape> {
        Ok(x.clone())
    }
    fn binary(&self, a: &Shape, _: &Shape, _: Binary) -> Result<Shape> {
        Ok(a.clone())
    }
    fn affine(&self, x: &Shape, _: f32, _: f32) -> Result<Shape> {
        Ok(x.clone())
    }
    fn row_sum(&self, x: &Shape) -> Result<Shape> {
        Ok(Shape(vec![rows(x), 1]))
    }
    fn scale_rows(&self, x: &Shape, _: &Shape) -> Result<Shape> {
        Ok(x.clone())
    }
    fn ste(&self, x: &Shape) -> Result<Shape> {
        Ok(x.clone())
    }
    fn add_segment(&self, x: &Shape, _: &Shape, _: Segments) -> Result<Shape> {
        Ok(x.clone())
    }
    fn modulate(&self, x: &Shape, _: &Shape, _: usize, _: usize, _: Segments) -> Result<Shape> {
        Ok(x.clone())
    }
    fn gated_add(&self, x: &Shape, _: &Shape, _: &Shape, _: usize, _: Segments) -> Result<Shape> {
        Ok(x.clone())
    }
    fn gather_rows(&self, x: &Shape, idx: &[u32]) -> Result<Shape> {
        let mut s = x.0.clone();
        s[0] = idx.len();
        Ok(Shape(s))
    }
    fn scatter_add_rows(&self, x: &Shape, _: &[u32], rows: usize) -> Result<Shape> {
        let mut s = x.0.clone();
        s[0] = rows;
        Ok(Shape(s))
    }
    fn attention(&self, qkv: &Shape, _: usize, _: Segments) -> Result<Shape> {
        Ok(Shape(vec![rows(qkv), qkv.0[1] / 3]))
    }
    fn dechunk_smooth(
        &self,
        h: &Shape,
        _: &Shape,
        _: &[u32],
        _: usize,
        _: f32,
        _: Segments,
    ) -> Result<Shape> {
        Ok(h.clone())
    }
}

/// FLOPs of one forward of one image keeping `keep` of the `L` tokens
/// (ignored by the DiT baseline), counted by running the model code itself.
pub fn flops_per_image(spec: &ModelSpec, keep: usize) -> Result<FlopCount> {
    let l = spec.tokens();
    let b = ShapeBackend {
        l,
        keep: keep.clamp(2.min(l), l),
    };
    let (net, reg) = super::build(spec);
    let tensors = reg.infos.iter().map(|i| Shape(i.shape.clone())).collect();
    let model = super::Model {
        spec: spec.clone(),
        net,
        params: super::params::Params {
            registry: reg,
            tensors,
        },
    };
    let x = Shape(vec![l, spec.in_channels]);
    let out = model.forward(&b, &x, &[0.0], &[0], &super::TailDrop::None)?;
    Ok(out.flops)
}
