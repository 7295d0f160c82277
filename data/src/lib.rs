//! # dcdit-data
//!
//! Data and pictures for dcdit (DC-DiT, arXiv 2603.06351), on the host:
//!
//! * [`mnist`]: the bundled MNIST digits (`data/mnist/mnist.bin`, 10,000
//!   28x28 digits, checksummed), with a fixed 9,000 / 1,000 train / held-out
//!   split.
//! * [`features`]: the release's extracted ImageNet latents, one `.npy` per
//!   image under `imagenet{size}_features/` and `imagenet{size}_labels/`,
//!   read with the small [`npy`] parser.
//! * [`pictures`]: PNG sample grids, the chunking visualisation (x_t above
//!   the router's boundary probabilities) and the per-step compression,
//!   time and FLOPs plot.
//! * [`classifier`]: a small MNIST MLP (shipped weights in
//!   `data/classifier/`) and a Fréchet distance on its features, to judge
//!   generated digits.
//!
//! Errors are this crate's [`Error`], which names the file and the problem
//! and converts into `dcdit_core::Error`.
#![warn(missing_docs)]

pub mod classifier;
pub mod error;
pub mod features;
pub mod mnist;
pub mod npy;
pub mod pictures;

pub use error::{Error, Result};
