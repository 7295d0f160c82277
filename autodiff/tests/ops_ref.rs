//! Per-op gradient checks (reference backend): for every op of the `Backend` trait, the gradient
//! through `Autodiff<B>` of a random scalar projection `sum(r * op(x))`
//! w.r.t. each input, against central finite differences in f64 on the plain
//! f64 host implementation of the op (`common::RefBackend`, direct loops).
//!
//! Run over two inner backends:
//! * `dcdit_backend_cpu::CpuBackend` (f32 forward and analytic backward
//!   kernels): the real thing, tolerance 1e-4 relative (observed <= 1e-6);
//! * `common::RefBackend` (f64, numerical `*_backward`): isolates the
//!   decorator's own wiring (which gradient goes where, accumulation, the
//!   backward rules it builds from forward ops), tolerance 1e-6.
//!
//! Each case is also run with only one input tracked at a time (the others
//! constants), which exercises the paths that save only what the tracked
//! inputs need.

mod common;

use common::*;

/// The decorator over the f64 reference backend: wiring and the backward
/// rules the decorator composes itself, to f64 precision.
#[test]
fn every_op_gradient_ref_backend() {
    check_all(&RefBackend, 1e-6, 1e-6);
}
