//! # dcdit-core
//!
//! The backend-independent heart of dcdit, a Rust implementation of the
//! Dynamic Chunking Diffusion Transformer (DC-DiT, arXiv 2603.06351).
//!
//! * [`backend`]: the [`Backend`] trait every device implements.
//! * Allocation-free algorithms on caller-provided slices, one file per paper term:
//!   [`router`] (boundary selection, tail dropping, cosine scores),
//!   [`chunk`] (kept-token order), [`dechunk`] (distance-weighted smoothing,
//!   plug-back), [`ratio_loss`], [`scheduler`] (DDPM/DDIM), [`embed`]
//!   (timestep features, 2D sin-cos table).
//! * [`config`], [`weights`], [`model`] (DC-DiT and the fixed-patch DiT baseline,
//!   written once over the backend trait) and [`flops`].
//!
//! The crate is `#![no_std]` with `alloc`; the `std` feature (default) adds YAML
//! config parsing.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod backend;
pub mod backend_grad;
pub mod chunk;
pub mod config;
pub mod dechunk;
pub mod embed;
pub mod error;
pub mod flops;
pub mod model;
pub mod objective;
pub mod ratio_loss;
pub mod rng;
pub mod router;
pub mod sample;
pub mod scheduler;
pub mod train;
pub mod weights;

pub use backend::{Backend, DType, Grid, Segments};
pub use backend_grad::GradBackend;
pub use error::{Error, Result};
