//! The networks, written once over [`Backend`]: DC-DiT ([`dcdit`]) and the
//! fixed-patch DiT baseline ([`dit`]). Training and inference run the same
//! code; training instantiates it over the autodiff decorator.
//!
//! ```no_run
//! # fn demo<B: dcdit_core::Backend>(backend: B, weights: dcdit_core::weights::TensorMap) -> dcdit_core::Result<()> {
//! use dcdit_core::{config::Config, model::{Model, TailDrop}};
//! let cfg = Config::default();
//! let model = Model::load(&backend, &cfg, &weights)?;
//! let (b, c, h, w) = (1, 4, 32, 32);
//! let x = model.input_from_nchw(&backend, &vec![0.0; b * c * h * w], b)?;
//! let out = model.forward(&backend, &x, &[999.0], &[1000], &TailDrop::None)?;
//! let nchw = model.output_to_nchw(&backend, &out.out, b)?;
//! # Ok(()) }
//! ```

pub mod dcdit;
pub mod dit;
pub mod dry_run;
pub mod init;
pub mod layers;
pub mod params;
pub mod router;

use crate::backend::Backend;
use crate::config::{Config, ModelKind, ModelSpec};
use crate::error::{Error, Result};
use crate::flops::{Component, FlopCount};
use crate::weights::TensorMap;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use params::{Params, Registry};

/// What a layer's forward needs: the backend, the parameters, and the FLOP
/// tally of this forward.
pub struct Ctx<'a, B: Backend> {
    /// The backend.
    pub b: &'a B,
    /// The model's parameters.
    pub p: &'a Params<B>,
    /// FLOPs counted so far.
    pub flops: FlopCount,
    /// Called when the forward enters a component (profiling; see
    /// [`Model::forward_hooked`]).
    pub on_component: Option<&'a mut (dyn FnMut(Component) + 'a)>,
}

impl<B: Backend> Ctx<'_, B> {
    /// Marks the start of a component's work (a no-op without a hook).
    pub fn enter(&mut self, c: Component) {
        if let Some(f) = self.on_component.as_mut() {
            f(c);
        }
    }
}

/// Elastic inference: which fraction of each sample's boundaries to drop.
#[derive(Debug, Clone, PartialEq)]
pub enum TailDrop {
    /// Keep every natural boundary.
    None,
    /// One fraction for the whole batch.
    Uniform(f32),
    /// One fraction per sample (Lite-CFG).
    PerSample(Vec<f32>),
}

impl TailDrop {
    /// The fraction for sample `s` of `batch`; errors on a wrong count or a value outside `[0, 1]`.
    pub fn resolve(&self, batch: usize) -> Result<Vec<f32>> {
        let v = match self {
            TailDrop::None => vec![0.0; batch],
            TailDrop::Uniform(f) => vec![*f; batch],
            TailDrop::PerSample(v) if v.len() == batch => v.clone(),
            TailDrop::PerSample(v) => {
                return Err(Error::input(format!(
                    "{} tail-drop fractions for a batch of {batch}",
                    v.len()
                )))
            }
        };
        if let Some(f) = v.iter().find(|f| !(0.0..=1.0).contains(*f)) {
            return Err(Error::input(format!(
                "tail-drop fraction {f} is not in [0, 1]"
            )));
        }
        Ok(v)
    }
}

/// Routing decisions of one forward (DC-DiT only).
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// Boundary probabilities after the forced ends, `(B*L, 1)` on the device
    /// (the tensor the ratio loss and the STE gate differentiate).
    pub p: B::Tensor,
    /// The same values on the host, `B*L`.
    pub boundary_prob: Vec<f32>,
    /// Natural boundaries (`p > 0.5`), before tail dropping.
    pub natural: Vec<bool>,
    /// Kept tokens after tail dropping.
    pub mask: Vec<bool>,
    /// Kept tokens per sample.
    pub kept: Vec<usize>,
}

/// The result of a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput<B: Backend> {
    /// Model output, NHWC rows `(B*H*W, out_channels)`.
    pub out: B::Tensor,
    /// Routing decisions (None for the DiT baseline).
    pub routing: Option<Routing<B>>,
    /// FLOPs per component of this forward.
    pub flops: FlopCount,
}

/// The two networks.
#[derive(Debug, Clone)]
pub enum Network {
    /// DC-DiT.
    DcDit(alloc::boxed::Box<dcdit::DcDit>),
    /// Fixed-patch DiT.
    Dit(alloc::boxed::Box<dit::Dit>),
}

/// A network with its parameters on a backend.
#[derive(Debug, Clone)]
pub struct Model<B: Backend> {
    /// Every size.
    pub spec: ModelSpec,
    /// The layer structure.
    pub net: Network,
    /// The parameters.
    pub params: Params<B>,
}

/// Builds the layer structure of a spec and the list of parameters it needs.
pub fn build(spec: &ModelSpec) -> (Network, Registry) {
    let mut reg = Registry::default();
    let net = match spec.kind {
        ModelKind::DcDit => {
            Network::DcDit(alloc::boxed::Box::new(dcdit::DcDit::new(spec, &mut reg)))
        }
        ModelKind::Dit => Network::Dit(alloc::boxed::Box::new(dit::Dit::new(spec, &mut reg))),
    };
    (net, reg)
}

impl<B: Backend> Model<B> {
    /// Validates `cfg`, then loads `weights` (release key names and shapes).
    pub fn load(backend: &B, cfg: &Config, weights: &TensorMap) -> Result<Self> {
        let spec = cfg.model_spec()?;
        let (net, reg) = build(&spec);
        let params = Params::load(backend, reg, weights)?;
        Ok(Model { spec, net, params })
    }

    /// Runs the network on `x` (`(B*H*W, C)` NHWC rows), timesteps `t` and labels `y`
    /// (the null class is `num_classes`).
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        t: &[f32],
        y: &[u32],
        tail: &TailDrop,
    ) -> Result<ForwardOutput<B>> {
        self.forward_inner(backend, x, t, y, tail, None)
    }

    /// [`Model::forward`], calling `on_component(c)` each time the forward
    /// enters component `c` (DC-DiT only; in forward order, each once). With a
    /// synchronous backend (the CPU one) the time between two calls is the
    /// time spent in the component; `dcdit-cli bench` uses it for its
    /// per-component profile.
    pub fn forward_hooked(
        &self,
        backend: &B,
        x: &B::Tensor,
        t: &[f32],
        y: &[u32],
        tail: &TailDrop,
        on_component: &mut dyn FnMut(Component),
    ) -> Result<ForwardOutput<B>> {
        self.forward_inner(backend, x, t, y, tail, Some(on_component))
    }

    fn forward_inner<'a>(
        &'a self,
        backend: &'a B,
        x: &B::Tensor,
        t: &[f32],
        y: &[u32],
        tail: &TailDrop,
        on_component: Option<&'a mut (dyn FnMut(Component) + 'a)>,
    ) -> Result<ForwardOutput<B>> {
        let s = &self.spec;
        let batch = t.len();
        if y.len() != batch {
            return Err(Error::input(format!(
                "{} timesteps but {} labels",
                batch,
                y.len()
            )));
        }
        if batch == 0 {
            return Err(Error::input("empty batch"));
        }
        let shape = backend.shape(x);
        let want = [batch * s.tokens(), s.in_channels];
        if shape != want {
            return Err(Error::Shape {
                name: "x".into(),
                expected: vec![batch, s.in_channels, s.height, s.width],
                got: shape,
            });
        }
        if let Some(v) = t.iter().find(|v| !v.is_finite()) {
            return Err(Error::input(format!("timestep {v} is not finite")));
        }
        let mut cx = Ctx {
            b: backend,
            p: &self.params,
            flops: FlopCount::default(),
            on_component,
        };
        let (out, routing) = match &self.net {
            Network::DcDit(n) => {
                let fractions = tail.resolve(batch)?;
                let (o, r) = n.forward(&mut cx, x, t, y, &fractions)?;
                (o, Some(r))
            }
            Network::Dit(n) => (n.forward(&mut cx, x, t, y)?, None),
        };
        Ok(ForwardOutput {
            out,
            routing,
            flops: cx.flops,
        })
    }

    /// Uploads an NCHW host batch as NHWC rows.
    pub fn input_from_nchw(&self, backend: &B, x: &[f32], batch: usize) -> Result<B::Tensor> {
        let s = &self.spec;
        let (c, l) = (s.in_channels, s.tokens());
        if x.len() != batch * c * l {
            return Err(Error::input(format!(
                "input has {} values, expected {batch}x{c}x{}x{}",
                x.len(),
                s.height,
                s.width
            )));
        }
        backend.from_f32(&nchw_to_nhwc(x, batch, c, l), &[batch * l, c])
    }

    /// Reads NHWC output rows back as an NCHW host batch.
    pub fn output_to_nchw(&self, backend: &B, out: &B::Tensor, batch: usize) -> Result<Vec<f32>> {
        let v = backend.to_f32(out)?;
        Ok(nhwc_to_nchw(
            &v,
            batch,
            self.spec.out_channels,
            self.spec.tokens(),
        ))
    }
}

/// `(B, C, L)` → `(B, L, C)`.
pub fn nchw_to_nhwc(x: &[f32], b: usize, c: usize, l: usize) -> Vec<f32> {
    let mut o = vec![0.0; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for i in 0..l {
                o[(bi * l + i) * c + ci] = x[(bi * c + ci) * l + i];
            }
        }
    }
    o
}

/// `(B, L, C)` → `(B, C, L)`.
pub fn nhwc_to_nchw(x: &[f32], b: usize, c: usize, l: usize) -> Vec<f32> {
    let mut o = vec![0.0; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for i in 0..l {
                o[(bi * c + ci) * l + i] = x[(bi * l + i) * c + ci];
            }
        }
    }
    o
}
