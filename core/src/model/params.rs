//! Parameters by name: the model registers every tensor it needs (release
//! key, release shape, how it is laid out on the device) and keeps a
//! [`ParamId`]; loading, saving, counting and (later) optimising all walk
//! the one list.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::weights::{HostTensor, TensorMap};
use alloc::string::String;
use alloc::vec::Vec;

/// Index of a parameter in a [`Registry`] / [`Params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// How a parameter's release layout maps onto the device layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamLayout {
    /// Same row-major order (linear weights, biases, norm scales, tables).
    Plain,
    /// Convolution `(out, in, k, k)` on disk, `(out, k, k, in)` (OHWI) on the device.
    ConvOihw,
}

/// What the model expects of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// The release's state-dict key.
    pub name: String,
    /// Shape as in the release's checkpoints.
    pub shape: Vec<usize>,
    /// Device layout.
    pub layout: ParamLayout,
    /// False for fixed buffers (the position table).
    pub trainable: bool,
}

impl ParamInfo {
    /// Number of entries.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The list of parameters a model registers while it is built.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    /// Parameters in registration order.
    pub infos: Vec<ParamInfo>,
}

impl Registry {
    /// Registers a trainable parameter.
    pub fn param(&mut self, name: &str, shape: &[usize], layout: ParamLayout) -> ParamId {
        self.push(name, shape, layout, true)
    }
    /// Registers a fixed buffer (loaded and saved, never trained).
    pub fn buffer(&mut self, name: &str, shape: &[usize]) -> ParamId {
        self.push(name, shape, ParamLayout::Plain, false)
    }
    fn push(
        &mut self,
        name: &str,
        shape: &[usize],
        layout: ParamLayout,
        trainable: bool,
    ) -> ParamId {
        self.infos.push(ParamInfo {
            name: name.into(),
            shape: shape.to_vec(),
            layout,
            trainable,
        });
        ParamId(self.infos.len() - 1)
    }
    /// Trainable entries.
    pub fn trainable_count(&self) -> usize {
        self.infos
            .iter()
            .filter(|i| i.trainable)
            .map(|i| i.numel())
            .sum()
    }
    /// Fixed-buffer entries.
    pub fn buffer_count(&self) -> usize {
        self.infos
            .iter()
            .filter(|i| !i.trainable)
            .map(|i| i.numel())
            .sum()
    }
    /// Looks a parameter up by key.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.infos.iter().position(|i| i.name == name).map(ParamId)
    }
}

/// Converts `(o, i, k, k)` to `(o, k, k, i)`.
pub fn oihw_to_ohwi(src: &[f32], o: usize, i: usize, k: usize) -> Vec<f32> {
    let mut dst = alloc::vec![0.0; src.len()];
    for oc in 0..o {
        for ic in 0..i {
            for kk in 0..k * k {
                dst[(oc * k * k + kk) * i + ic] = src[(oc * i + ic) * k * k + kk];
            }
        }
    }
    dst
}

/// Converts `(o, k, k, i)` back to `(o, i, k, k)`.
pub fn ohwi_to_oihw(src: &[f32], o: usize, i: usize, k: usize) -> Vec<f32> {
    let mut dst = alloc::vec![0.0; src.len()];
    for oc in 0..o {
        for ic in 0..i {
            for kk in 0..k * k {
                dst[(oc * i + ic) * k * k + kk] = src[(oc * k * k + kk) * i + ic];
            }
        }
    }
    dst
}

/// Device tensors for every registered parameter.
#[derive(Debug, Clone)]
pub struct Params<B: Backend> {
    /// What each tensor is.
    pub registry: Registry,
    /// The tensors, indexed by [`ParamId`].
    pub tensors: Vec<B::Tensor>,
}

impl<B: Backend> Params<B> {
    /// The tensor of a parameter.
    pub fn get(&self, id: ParamId) -> &B::Tensor {
        &self.tensors[id.0]
    }

    /// Host values in the device layout, checked against the registry:
    /// missing key, unexpected key and shape mismatch are errors naming the key.
    pub fn load(backend: &B, registry: Registry, weights: &TensorMap) -> Result<Self> {
        weights.reject_unknown(|k| registry.find(k).is_some())?;
        let mut tensors = Vec::with_capacity(registry.infos.len());
        for info in &registry.infos {
            let t = weights.expect(&info.name, &info.shape)?;
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(alloc::format!(
                    "weights: tensor `{}`",
                    info.name
                )));
            }
            tensors.push(upload(backend, info, &t.data)?);
        }
        Ok(Params { registry, tensors })
    }

    /// Reads every parameter back in the release's layout.
    pub fn to_host(&self, backend: &B) -> Result<TensorMap> {
        let mut m = TensorMap::default();
        for (info, t) in self.registry.infos.iter().zip(&self.tensors) {
            let data = download(backend, info, t)?;
            m.insert(&info.name, HostTensor::new(info.shape.clone(), data)?);
        }
        Ok(m)
    }
}

/// Uploads release-layout values of one parameter into its device layout.
pub fn upload<B: Backend>(backend: &B, info: &ParamInfo, data: &[f32]) -> Result<B::Tensor> {
    match info.layout {
        ParamLayout::Plain => backend.from_f32(data, &info.shape),
        ParamLayout::ConvOihw => {
            let (o, i, k) = (info.shape[0], info.shape[1], info.shape[2]);
            backend.from_f32(&oihw_to_ohwi(data, o, i, k), &[o, k, k, i])
        }
    }
}

/// Reads one parameter (or a gradient of one) back in the release layout.
pub fn download<B: Backend>(backend: &B, info: &ParamInfo, t: &B::Tensor) -> Result<Vec<f32>> {
    let data = backend.to_f32(t)?;
    Ok(match info.layout {
        ParamLayout::Plain => data,
        ParamLayout::ConvOihw => {
            let (o, i, k) = (info.shape[0], info.shape[1], info.shape[2]);
            ohwi_to_oihw(&data, o, i, k)
        }
    })
}
