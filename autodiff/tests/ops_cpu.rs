//! Per-op gradient checks (CPU backend): for every op of the `Backend` trait, the gradient
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
use dcdit_autodiff::Autodiff;
use dcdit_backend_cpu::CpuBackend;
use dcdit_core::backend::Backend;

/// The decorator over the CPU backend (f32) against f64 finite differences.
#[test]
fn every_op_gradient_cpu_backend() {
    check_all(&CpuBackend::with_threads(2), 1e-4, 1e-4);
}

/// Untracked everything: ops on constants record nothing and stay constants.
#[test]
fn constants_record_nothing() {
    let inner = CpuBackend::with_threads(1);
    let ad = Autodiff::new(inner.clone());
    for c in cases(5) {
        let xs: Vec<_> = c
            .inputs
            .iter()
            .map(|(s, d)| ad.from_f32(d, s).unwrap())
            .collect();
        let y = apply(&ad, &c.op, &xs).unwrap();
        assert!(!y.is_tracked(), "{}", c.name);
    }
    assert_eq!(ad.tape_len(), 0);
}
