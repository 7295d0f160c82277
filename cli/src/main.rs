//! `dcdit-cli`: run DC-DiT from the command line.
//!
//! * `forward`: one forward pass on a safetensors input (check a port against PyTorch).
//! * `grad`: loss terms and every parameter's gradient for one batch.
//! * `train`: train a config (bundled MNIST or the release's latents).
//! * `sample`: draw samples with the chunking visualisation and compression plot.
//! * `eval`: class accuracy and Fréchet distance of MNIST samples.
//! * `inspect`: parameters and FLOPs per component.
//! * `bench`: speed of the CPU backend, optionally against PyTorch.

mod bench;
mod eval;
mod forward;
mod grad;
mod inspect;
mod sample;
mod train;
mod util;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dcdit-cli",
    version,
    about = "Dynamic Chunking Diffusion Transformer (DC-DiT) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Compute backends.
#[derive(Clone, Copy, ValueEnum, Debug)]
enum BackendKind {
    /// Multi-threaded CPU backend.
    Cpu,
}

#[derive(Subcommand)]
enum Cmd {
    /// One forward pass: reads x (B,C,H,W), t (B), y (B); writes out, boundary_prob, boundary_mask.
    Forward {
        /// Release-format YAML config.
        #[arg(long)]
        config: PathBuf,
        /// safetensors weights with the release's key names.
        #[arg(long)]
        weights: PathBuf,
        /// safetensors input holding x, t, y.
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Tail-drop fraction, or one per sample (comma separated).
        #[arg(long, default_value = "0")]
        tail_drop: String,
        /// Compute backend.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Loss terms and gradients of one batch (x, t, y, noise): writes loss, mse, vb, ratio, grad.KEY.
    Grad {
        /// Release-format YAML config.
        #[arg(long)]
        config: PathBuf,
        /// safetensors weights with the release's key names.
        #[arg(long)]
        weights: PathBuf,
        /// safetensors batch holding x, t, y, noise.
        #[arg(long)]
        batch: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Tail-drop fraction, or one per sample.
        #[arg(long, default_value = "0")]
        tail_drop: String,
        /// Compute backend.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Trains a config; checkpoints, log.txt and config.yaml go to the run directory.
    Train {
        /// Config of a new run.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run directory (default runs/CONFIG_NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in this directory from its latest checkpoint.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Total optimiser steps (overrides training.steps).
        #[arg(long)]
        steps: Option<u64>,
        /// Log lines instead of a progress bar.
        #[arg(long)]
        quiet: bool,
        /// Compute backend.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Samples a class-conditional grid: sample.png, chunking_viz.png, compression.png.
    Sample(sample::SampleArgs),
    /// Class accuracy and Fréchet distance of MNIST samples (shipped classifier).
    Eval(sample::SampleArgs),
    /// Speed: forward / bf16 / training-step medians, GFLOP/s per component,
    /// GEMM vs peak; with --against-pytorch the PyTorch reference side by side.
    Bench(bench::BenchArgs),
    /// Parameter count and FLOPs per image, per component.
    Inspect {
        /// Release-format YAML config.
        #[arg(long)]
        config: PathBuf,
        /// Optional weights to check against the config.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Target compression N (kept fraction 1/N) for the FLOP count.
        #[arg(long, default_value = "4")]
        compression: f64,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Forward {
            config,
            weights,
            input,
            out,
            tail_drop,
            backend: BackendKind::Cpu,
            threads,
        } => forward::run(&config, &weights, &input, &out, &tail_drop, threads),
        Cmd::Grad {
            config,
            weights,
            batch,
            out,
            tail_drop,
            backend: BackendKind::Cpu,
            threads,
        } => grad::run(&config, &weights, &batch, &out, &tail_drop, threads),
        Cmd::Train {
            config,
            out,
            resume,
            steps,
            quiet,
            backend: BackendKind::Cpu,
            threads,
        } => train::run(train::TrainArgs {
            config,
            out,
            resume,
            steps,
            threads,
            quiet,
        }),
        Cmd::Sample(args) => sample::run(args),
        Cmd::Eval(args) => eval::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Inspect {
            config,
            weights,
            compression,
        } => inspect::run(&config, weights.as_deref(), compression),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
