//! Moving a model's parameters onto and off the tape.

use alloc::vec::Vec;
use dcdit_core::model::params::Params;
use dcdit_core::model::Model;
use dcdit_core::GradBackend;

use crate::{AdTensor, Autodiff, Grads};

/// Wraps every trainable parameter as a tracked leaf of `ad`'s tape; fixed
/// buffers (`ParamInfo::trainable == false`, e.g. `pos_embed`) become
/// constants. No data is copied.
pub fn track_params<B: GradBackend>(ad: &Autodiff<B>, p: Params<B>) -> Params<Autodiff<B>> {
    let Params { registry, tensors } = p;
    let tensors = registry
        .infos
        .iter()
        .zip(tensors)
        .map(|(info, t)| {
            if info.trainable {
                ad.leaf(t)
            } else {
                AdTensor::constant(t)
            }
        })
        .collect();
    Params { registry, tensors }
}

/// The inverse of [`track_params`]: the inner tensors.
pub fn untrack_params<B: GradBackend>(p: Params<Autodiff<B>>) -> Params<B> {
    let Params { registry, tensors } = p;
    Params {
        registry,
        tensors: tensors.into_iter().map(AdTensor::into_value).collect(),
    }
}

/// [`track_params`] on a model's parameters.
pub fn track_model<B: GradBackend>(ad: &Autodiff<B>, m: Model<B>) -> Model<Autodiff<B>> {
    Model {
        spec: m.spec,
        net: m.net,
        params: track_params(ad, m.params),
    }
}

/// [`untrack_params`] on a model's parameters.
pub fn untrack_model<B: GradBackend>(m: Model<Autodiff<B>>) -> Model<B> {
    Model {
        spec: m.spec,
        net: m.net,
        params: untrack_params(m.params),
    }
}

/// Moves the gradient of every parameter out of `grads`, in `ParamId` order
/// (device layout, like the parameters). `None` for fixed buffers and for
/// parameters no gradient reached (treat as zero).
pub fn take_param_grads<B: GradBackend>(
    grads: &mut Grads<B>,
    p: &Params<Autodiff<B>>,
) -> Vec<Option<B::Tensor>> {
    p.tensors.iter().map(|t| grads.remove(t)).collect()
}
