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

use clap::{Parser, Subcommand};
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
        /// Backend, device and CPU threads.
        #[command(flatten)]
        dev: util::Dev,
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
        /// Backend, device and CPU threads.
        #[command(flatten)]
        dev: util::Dev,
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
        /// Backend, device and CPU threads.
        #[command(flatten)]
        dev: util::Dev,
    },
    /// Samples a class-conditional grid: sample.png, chunking_viz.png, compression.png.
    Sample(sample::SampleArgs),
    /// Class accuracy and Fréchet distance of MNIST samples (shipped classifier).
    Eval(sample::SampleArgs),
    /// Speed: forward / bf16 / training-step medians, GFLOP/s per component,
    /// GEMM vs peak; with --against-pytorch the PyTorch reference side by side.
    Bench(bench::BenchArgs),
    /// Lists the Vulkan devices (index for `--device`, name, type, API, subgroups).
    Devices,
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

/// Prints the Vulkan devices; an error when there is no Vulkan loader.
fn devices() -> anyhow::Result<()> {
    let list = dcdit_backend_vulkan::devices()?;
    if list.is_empty() {
        println!(
            "no Vulkan device (the loader found none; install a driver, e.g. mesa-vulkan-drivers)"
        );
    }
    for d in list {
        println!(
            "{}: {} ({}, Vulkan {}, subgroup size {}{}){}",
            d.index,
            d.name,
            d.kind,
            d.api,
            d.subgroup_size,
            if d.subgroup_arithmetic {
                ", subgroup arithmetic"
            } else {
                ""
            },
            d.unusable
                .map(|w| format!(" UNUSABLE: {w}"))
                .unwrap_or_default()
        );
    }
    Ok(())
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
            dev,
        } => forward::run(&config, &weights, &input, &out, &tail_drop, dev),
        Cmd::Grad {
            config,
            weights,
            batch,
            out,
            tail_drop,
            dev,
        } => grad::run(&config, &weights, &batch, &out, &tail_drop, dev),
        Cmd::Train {
            config,
            out,
            resume,
            steps,
            quiet,
            dev,
        } => train::run(train::TrainArgs {
            config,
            out,
            resume,
            steps,
            dev,
            quiet,
        }),
        Cmd::Sample(args) => sample::run(args),
        Cmd::Eval(args) => eval::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Devices => devices(),
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
