//! # dcdit-autodiff
//!
//! Reverse-mode automatic differentiation for dcdit (DC-DiT, arXiv
//! 2603.06351) as a backend *decorator*, in the style of burn's
//! `Autodiff<B>`: [`Autodiff<B>`] implements [`dcdit_core::Backend`] itself,
//! so `Model<Autodiff<CpuBackend>>` runs the unchanged model code of
//! `dcdit_core::model` and records a tape as it goes. Every forward op runs on
//! the inner backend; when one of its inputs is tracked (and grad mode is on)
//! a node is pushed holding only what that op's backward needs.
//! [`Autodiff::backward`] walks the tape in reverse using the inner backend's
//! [`GradBackend`] ops, freeing each node's saved tensors and gradient as soon
//! as it is processed, and returns the gradients of the tracked leaves.
//!
//! * [`AdTensor`]: an inner tensor plus an optional tape node. `node == None`
//!   is a constant: inputs uploaded with `from_f32`, integer-derived masks,
//!   results of ops on constants only, and everything computed under
//!   [`Autodiff::no_grad`].
//! * [`Autodiff::leaf`] makes a tracked leaf (a parameter);
//!   [`track_params`] / [`track_model`] wrap a whole model's trainable
//!   parameters (fixed buffers such as `pos_embed` stay constants), and
//!   [`untrack_params`] / [`untrack_model`] take them back.
//! * [`Autodiff::backward`] takes several seeds at once: the training loss is
//!   computed on the host from the model output and from the router
//!   probabilities (`Routing::p`), and its gradients w.r.t. both are seeded
//!   together. After backward the tape is reset; leaves of that tape are then
//!   stale (using one in a recorded op is an error), so each step wraps the
//!   parameters afresh (cheap: handles are cloned, not data).
//! * [`Autodiff<B>`] implements `dcdit_core::backend_grad::AutodiffBackend`,
//!   the trait the trainer of `dcdit_core::train` is written over
//!   (`Trainer<Autodiff<CpuBackend>>`, `batch_gradients`).
//! * The straight-through estimator [`Backend::ste`] is exactly 1 forward and
//!   the identity backward, so the router receives a gradient through the
//!   gated residual `dechunked * STE(q) + r` (SPEC 9), as well as through the
//!   de-chunk smoothing and the ratio loss.
//!
//! ## One training step
//!
//! ```
//! use dcdit_autodiff::{track_model, untrack_model, take_param_grads, Autodiff};
//! use dcdit_core::model::{Model, TailDrop};
//! use dcdit_core::{Backend, GradBackend, Result};
//!
//! /// Loss = mean squared error of the output against `target` (host side),
//! /// plus a ratio-loss gradient `dp` (host side) seeded into the router's
//! /// probabilities. Returns the parameter gradients in `ParamId` order.
//! fn grads_of_step<B: GradBackend>(
//!     inner: &B,
//!     model: Model<B>,
//!     x: &[f32], t: &[f32], y: &[u32], target: &[f32],
//! ) -> Result<(Model<B>, Vec<Option<B::Tensor>>)> {
//!     let ad = Autodiff::new(inner.clone());
//!     let model = track_model(&ad, model);            // parameters become leaves
//!     let xt = model.input_from_nchw(&ad, x, t.len())?; // a constant
//!     let out = model.forward(&ad, &xt, t, y, &TailDrop::None)?;
//!
//!     // Host-side loss gradients.
//!     let pred = ad.to_f32(&out.out)?;
//!     let n = pred.len() as f32;
//!     let d_out: Vec<f32> = pred.iter().zip(target).map(|(p, q)| 2.0 * (p - q) / n).collect();
//!     let routing = out.routing.as_ref().expect("DC-DiT routes");
//!     let d_p = vec![0.0f32; routing.boundary_prob.len()]; // e.g. the ratio loss's gradient
//!
//!     let mut grads = ad.backward(&[
//!         (&out.out, inner.from_f32(&d_out, &ad.shape(&out.out))?),
//!         (&routing.p, inner.from_f32(&d_p, &ad.shape(&routing.p))?),
//!     ])?;
//!     let g = take_param_grads(&mut grads, &model.params); // None: no gradient reached it
//!     // ... clip with `inner.sum_squares`, then `inner.adamw_step` per parameter ...
//!     Ok((untrack_model(model), g))
//! }
//! ```
//!
//! Evaluation and EMA updates record nothing:
//!
//! ```
//! # use dcdit_autodiff::Autodiff;
//! # use dcdit_core::{Backend, GradBackend, Result};
//! # fn eval<B: GradBackend>(ad: &Autodiff<B>, x: &<Autodiff<B> as Backend>::Tensor) -> Result<()> {
//! let y = ad.no_grad(|| ad.affine(x, 2.0, 0.0))?;
//! assert!(!y.is_tracked());
//! # Ok(()) }
//! ```
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

mod backend;
mod params;
mod tape;

use alloc::format;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;

use dcdit_core::backend_grad::AutodiffBackend;
use dcdit_core::{Backend, Error, GradBackend, Result};

pub use params::{take_param_grads, track_model, track_params, untrack_model, untrack_params};
use tape::{accumulate, backward_op, Op, Tape};

/// A node on a tape: its index and the tape's epoch when it was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    index: usize,
    epoch: u64,
}

impl NodeId {
    /// Position on the tape.
    pub fn index(&self) -> usize {
        self.index
    }
}

/// A tensor of [`Autodiff<B>`]: the inner backend's tensor and, when it needs
/// a gradient, its node on the tape.
pub struct AdTensor<B: Backend> {
    /// The value on the inner backend.
    pub value: B::Tensor,
    /// The tape node; `None` for a constant.
    pub node: Option<NodeId>,
}

impl<B: Backend> Clone for AdTensor<B> {
    fn clone(&self) -> Self {
        AdTensor {
            value: self.value.clone(),
            node: self.node,
        }
    }
}

impl<B: Backend> fmt::Debug for AdTensor<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdTensor")
            .field("value", &self.value)
            .field("node", &self.node)
            .finish()
    }
}

impl<B: Backend> AdTensor<B> {
    /// A constant (no gradient).
    pub fn constant(value: B::Tensor) -> Self {
        AdTensor { value, node: None }
    }
    /// The inner tensor.
    pub fn value(&self) -> &B::Tensor {
        &self.value
    }
    /// Takes the inner tensor.
    pub fn into_value(self) -> B::Tensor {
        self.value
    }
    /// True when the tensor is on a tape.
    pub fn is_tracked(&self) -> bool {
        self.node.is_some()
    }
    /// The same value as a constant (gradients stop here).
    pub fn detach(&self) -> Self {
        AdTensor::constant(self.value.clone())
    }
}

/// The autodiff decorator over an inner backend `B`. Clones share the tape.
pub struct Autodiff<B: GradBackend> {
    inner: B,
    tape: Rc<RefCell<Tape<B>>>,
}

impl<B: GradBackend> Clone for Autodiff<B> {
    fn clone(&self) -> Self {
        Autodiff {
            inner: self.inner.clone(),
            tape: Rc::clone(&self.tape),
        }
    }
}

impl<B: GradBackend> fmt::Debug for Autodiff<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.tape.borrow();
        f.debug_struct("Autodiff")
            .field("inner", &self.inner.name())
            .field("nodes", &t.nodes.len())
            .field("grad_enabled", &t.grad_enabled)
            .finish()
    }
}

/// Gradients of the leaves of one backward pass.
pub struct Grads<B: Backend> {
    epoch: u64,
    grads: Vec<Option<B::Tensor>>,
}

impl<B: Backend> fmt::Debug for Grads<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grads")
            .field("epoch", &self.epoch)
            .field("count", &self.len())
            .finish()
    }
}

impl<B: Backend> Grads<B> {
    fn index(&self, t: &AdTensor<B>) -> Option<usize> {
        let n = t.node?;
        (n.epoch == self.epoch && n.index < self.grads.len()).then_some(n.index)
    }
    /// The gradient of a leaf of the tape this came from; `None` for
    /// constants, non-leaves, leaves no gradient reached, and tensors of
    /// another tape.
    pub fn get(&self, t: &AdTensor<B>) -> Option<&B::Tensor> {
        self.index(t).and_then(|i| self.grads[i].as_ref())
    }
    /// Like [`Grads::get`], moving the gradient out.
    pub fn remove(&mut self, t: &AdTensor<B>) -> Option<B::Tensor> {
        self.index(t).and_then(|i| self.grads[i].take())
    }
    /// Number of leaves holding a gradient.
    pub fn len(&self) -> usize {
        self.grads.iter().filter(|g| g.is_some()).count()
    }
    /// True when no leaf received a gradient.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Disables recording while alive (see [`Autodiff::no_grad_guard`]); restores
/// the previous mode when dropped.
pub struct NoGradGuard<B: GradBackend> {
    tape: Rc<RefCell<Tape<B>>>,
    prev: bool,
}

impl<B: GradBackend> Drop for NoGradGuard<B> {
    fn drop(&mut self) {
        self.tape.borrow_mut().grad_enabled = self.prev;
    }
}

impl<B: GradBackend> Autodiff<B> {
    /// Wraps `inner` with a new, empty tape (grad mode on).
    pub fn new(inner: B) -> Self {
        Autodiff {
            inner,
            tape: Rc::new(RefCell::new(Tape::default())),
        }
    }

    /// The inner backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The inner tensor of `t`.
    pub fn value(t: &AdTensor<B>) -> &B::Tensor {
        &t.value
    }

    /// A tracked leaf (a parameter): its gradient is returned by
    /// [`Autodiff::backward`]. Leaves are recorded even in no-grad mode.
    pub fn leaf(&self, value: B::Tensor) -> AdTensor<B> {
        let mut t = self.tape.borrow_mut();
        t.nodes.push(Op::Leaf);
        AdTensor {
            value,
            node: Some(NodeId {
                index: t.nodes.len() - 1,
                epoch: t.epoch,
            }),
        }
    }

    /// A constant (no gradient) wrapping an inner tensor.
    pub fn constant(&self, value: B::Tensor) -> AdTensor<B> {
        AdTensor::constant(value)
    }

    /// Whether ops are being recorded.
    pub fn is_grad_enabled(&self) -> bool {
        self.tape.borrow().grad_enabled
    }

    /// Runs `f` without recording (evaluation, EMA updates); restores the
    /// previous mode afterwards, also on panic.
    pub fn no_grad<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.no_grad_guard();
        f()
    }

    /// Disables recording until the guard is dropped.
    pub fn no_grad_guard(&self) -> NoGradGuard<B> {
        let prev = core::mem::replace(&mut self.tape.borrow_mut().grad_enabled, false);
        NoGradGuard {
            tape: Rc::clone(&self.tape),
            prev,
        }
    }

    /// Number of nodes on the tape (leaves included).
    pub fn tape_len(&self) -> usize {
        self.tape.borrow().nodes.len()
    }

    /// Drops the tape (every saved tensor) without a backward pass; tensors
    /// tracked so far become stale.
    pub fn clear(&self) {
        let nodes = self.tape.borrow_mut().reset();
        drop(nodes);
    }

    /// Back-propagates the seeds `(tensor, d loss / d tensor)` (each seed has
    /// its tensor's shape) through the tape and returns the gradients of the
    /// leaves. Seeds on constants are ignored. Each node's saved tensors and
    /// gradient are freed as soon as it has been processed; afterwards the
    /// tape is empty (reset), also when an error occurred.
    pub fn backward(&self, seeds: &[(&AdTensor<B>, B::Tensor)]) -> Result<Grads<B>> {
        let (mut nodes, epoch) = {
            let mut t = self.tape.borrow_mut();
            let epoch = t.epoch;
            (t.reset(), epoch)
        };
        let n = nodes.len();
        let mut grads: Vec<Option<B::Tensor>> = (0..n).map(|_| None).collect();
        for (t, g) in seeds {
            let Some(id) = t.node else { continue };
            if id.epoch != epoch || id.index >= n {
                return Err(stale("backward seed"));
            }
            let (ts, gs) = (self.inner.shape(&t.value), self.inner.shape(g));
            if ts != gs {
                return Err(Error::input(format!(
                    "autodiff: seed of shape {gs:?} for a tensor of shape {ts:?}"
                )));
            }
            accumulate(&self.inner, &mut grads, Some(id.index), g.clone())?;
        }
        let mut leaf: Vec<Option<B::Tensor>> = vec![None; n];
        // Pop node i and its gradient together: both are dropped at the end of
        // the iteration, so memory shrinks as the walk proceeds.
        while let Some(op) = nodes.pop() {
            let i = nodes.len();
            let g = grads.pop().flatten();
            let Some(g) = g else { continue };
            match op {
                Op::Leaf => leaf[i] = Some(g),
                op => backward_op(&self.inner, op, g, &mut grads)?,
            }
        }
        Ok(Grads { epoch, grads: leaf })
    }

    /// Tape indices of the tracked inputs, or `None` when nothing is to be
    /// recorded (grad mode off, or every input constant).
    fn parents<const N: usize>(
        &self,
        ts: [Option<&AdTensor<B>>; N],
    ) -> Result<Option<[Option<usize>; N]>> {
        let tape = self.tape.borrow();
        if !tape.grad_enabled {
            return Ok(None);
        }
        let mut out = [None; N];
        let mut any = false;
        for (o, t) in out.iter_mut().zip(ts) {
            if let Some(id) = t.and_then(|t| t.node) {
                if id.epoch != tape.epoch || id.index >= tape.nodes.len() {
                    return Err(stale("op input"));
                }
                *o = Some(id.index);
                any = true;
            }
        }
        Ok(any.then_some(out))
    }

    /// Pushes a node for `value` and returns the tracked tensor.
    fn push(&self, value: B::Tensor, op: Op<B>) -> AdTensor<B> {
        let mut t = self.tape.borrow_mut();
        t.nodes.push(op);
        AdTensor {
            value,
            node: Some(NodeId {
                index: t.nodes.len() - 1,
                epoch: t.epoch,
            }),
        }
    }
}

/// The trainer of `dcdit_core::train` is written over this trait.
impl<B: GradBackend> AutodiffBackend for Autodiff<B> {
    type Inner = B;
    type Grads = Grads<B>;
    fn inner(&self) -> &B {
        &self.inner
    }
    fn leaf(&self, value: B::Tensor) -> AdTensor<B> {
        Autodiff::leaf(self, value)
    }
    fn value(t: &AdTensor<B>) -> &B::Tensor {
        &t.value
    }
    fn backward(&self, seeds: &[(&AdTensor<B>, B::Tensor)]) -> Result<Grads<B>> {
        Autodiff::backward(self, seeds)
    }
    fn grad(grads: &Grads<B>, leaf: &AdTensor<B>) -> Option<B::Tensor> {
        grads.get(leaf).cloned()
    }
    fn clear(&self) {
        Autodiff::clear(self)
    }
}

fn stale(what: &str) -> Error {
    Error::backend(format!(
        "autodiff: {what} is a tracked tensor of a tape that has been reset \
         (by backward or clear); wrap the parameters again for each step"
    ))
}
