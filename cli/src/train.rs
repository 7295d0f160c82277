//! `dcdit-cli train`: trains a config end to end with a progress bar, a log
//! file and atomic checkpoints; `--resume` continues bit for bit.

use crate::util::{read_config, read_tensors, write_atomic};
use anyhow::{bail, Context, Result};
use dcdit_autodiff::Autodiff;
use dcdit_core::config::Config;
use dcdit_core::model::{self, init::init_weights};
use dcdit_core::train::{TrainOptions, Trainer};
use dcdit_core::DType;
use dcdit_data::mnist::Mnist;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The checkpoint a run directory resumes from.
pub const LATEST: &str = "checkpoint.safetensors";
/// The EMA weights for sampling (bf16), written next to it.
pub const EMA: &str = "ema.safetensors";

/// Options of the command.
pub struct TrainArgs {
    /// Config (required unless resuming).
    pub config: Option<PathBuf>,
    /// Run directory.
    pub out: Option<PathBuf>,
    /// Resume from this run directory.
    pub resume: Option<PathBuf>,
    /// Override `training.steps`.
    pub steps: Option<u64>,
    /// Backend, device and CPU threads.
    pub dev: crate::util::Dev,
    /// No progress bar (log lines only).
    pub quiet: bool,
}

type Data = Box<dyn FnMut(&[usize]) -> dcdit_core::Result<(Vec<f32>, Vec<u32>)>>;

fn open_data(cfg: &Config) -> Result<(usize, Data)> {
    match cfg.data.source.as_str() {
        "mnist" => {
            let m = Mnist::load_bundled()?;
            let spec = cfg.model_spec()?;
            if (spec.in_channels, spec.height, spec.width) != (1, 28, 28) {
                bail!("data.source mnist needs model.in_channels 1 and a 28x28 grid (data.latent_height/latent_width)");
            }
            let train = m.train_indices();
            let n = train.len();
            Ok((
                n,
                Box::new(move |idx: &[usize]| {
                    let sel: Vec<usize> = idx.iter().map(|&i| train[i]).collect();
                    let (x, y) = m
                        .batch_f32(&sel)
                        .map_err(|e| dcdit_core::Error::Input(e.to_string()))?;
                    Ok((x, y.into_iter().map(u32::from).collect()))
                }),
            ))
        }
        "features" => {
            let ds = dcdit_data::features::FeatureDataset::open(
                &cfg.data.feature_path,
                cfg.data.image_size,
            )?;
            let n = ds.len();
            Ok((
                n,
                Box::new(move |idx: &[usize]| {
                    let mut x = Vec::new();
                    let mut y = Vec::new();
                    for &i in idx {
                        let (v, _, label) = ds
                            .get(i)
                            .map_err(|e| dcdit_core::Error::Input(e.to_string()))?;
                        x.extend_from_slice(&v);
                        y.push(label as u32);
                    }
                    Ok((x, y))
                }),
            ))
        }
        other => bail!("data.source `{other}`: expected mnist or features"),
    }
}

/// Runs the command.
pub fn run(args: TrainArgs) -> Result<()> {
    let (cfg, dir) = match (&args.resume, &args.config) {
        (Some(dir), cfg) => {
            let saved = read_config(&dir.join("config.yaml"))?;
            if let Some(c) = cfg {
                let given = read_config(c)?;
                if given.model_spec()? != saved.model_spec()? {
                    bail!(
                        "--config {} describes another model than the run in {}",
                        c.display(),
                        dir.display()
                    );
                }
            }
            (saved, dir.clone())
        }
        (None, Some(c)) => {
            let cfg = read_config(c)?;
            let stem = c.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
            (
                cfg,
                args.out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("runs").join(stem)),
            )
        }
        (None, None) => bail!("give --config (a new run) or --resume RUN_DIR"),
    };
    let mut cfg = cfg;
    if let Some(s) = args.steps {
        cfg.training.steps = s;
    }
    let spec = cfg.model_spec()?;
    let opts = TrainOptions::from_config(&cfg)?;
    if args.resume.is_none() && dir.join(LATEST).exists() {
        bail!(
            "{} already holds a run: continue it with --resume {}, or choose another --out",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    remove_stale_temporaries(&dir);
    crate::with_backend!(args.dev, backend, {
        let ad = Autodiff::new(backend);
        let (_, reg) = model::build(&spec);
        let init = init_weights(&spec, &reg, cfg.training.seed)?;
        let mut trainer = Trainer::new(ad, &cfg, &init, opts)?;
        if args.resume.is_some() {
            let ckpt = read_tensors(&dir.join(LATEST))?;
            trainer
                .restore(&ckpt)
                .with_context(|| format!("checkpoint in {}", dir.display()))?;
        } else {
            write_atomic(&dir.join("config.yaml"), cfg.to_yaml_string()?.as_bytes())?;
        }
        let (n_data, mut data) = open_data(&cfg)?;
        let total = cfg.training.steps;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log.txt"))?;
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total)
        };
        bar.set_style(ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?);
        bar.set_position(trainer.step);
        let start = Instant::now();
        let first = trainer.step;
        let log_every = cfg.training.log_every.max(1);
        let ckpt_every = cfg.training.ckpt_every.max(1);
        while trainer.step < total {
            let s = trainer.step(n_data, &mut data)?;
            let done = trainer.step - first;
            let rate = done as f64 / start.elapsed().as_secs_f64();
            let msg = format!(
                "loss {:.4} (diff {:.4} ratio {:.4}) comp {:.2}/{:.2} {:.2} it/s",
                s.loss.loss,
                s.loss.mse + s.loss.vb,
                s.loss.ratio,
                s.natural_compression,
                s.effective_compression,
                rate
            );
            bar.set_message(msg.clone());
            bar.set_position(trainer.step);
            if trainer.step % log_every == 0 || trainer.step == total {
                let line = format!(
                "step {} loss {:.5} mse {:.5} vb {:.5} ratio {:.5} N {:.2} drop {:.2} grad_norm {:.3} natural_compression {:.3} effective_compression {:.3} steps_per_s {:.3} elapsed_s {:.1}",
                trainer.step, s.loss.loss, s.loss.mse, s.loss.vb, s.loss.ratio, s.target_n, s.drop_fraction, s.grad_norm,
                s.natural_compression, s.effective_compression, rate, start.elapsed().as_secs_f64()
            );
                writeln!(log, "{line}")?;
                if args.quiet {
                    eprintln!("{line}");
                } else {
                    bar.println(&line);
                }
            }
            if trainer.step % ckpt_every == 0 || trainer.step == total {
                save(&trainer, &dir)?;
            }
        }
        bar.finish();
        eprintln!(
            "trained {} steps in {:.1} s; checkpoint {}",
            total - first,
            start.elapsed().as_secs_f64(),
            dir.join(LATEST).display()
        );
        Ok(())
    })
}

/// Removes the temporary files of a run killed while writing a checkpoint
/// (the checkpoint itself is only ever replaced by a rename, so it is whole).
fn remove_stale_temporaries(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".safetensors.tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn save<B: dcdit_core::GradBackend>(trainer: &Trainer<Autodiff<B>>, dir: &Path) -> Result<()> {
    let ckpt = trainer.checkpoint()?;
    write_atomic(&dir.join(LATEST), &ckpt.to_safetensors(None)?)?;
    let mut ema = dcdit_core::train::sampling_weights(&ckpt);
    ema.metadata.retain(|k, _| k == "config" || k == "step");
    write_atomic(&dir.join(EMA), &ema.to_safetensors(Some(DType::BF16))?)
}
