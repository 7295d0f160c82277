//! `dcdit-cli sample`: draws a class-conditional grid from a checkpoint and
//! writes `sample.png`, `chunking_viz.png` and `compression.png`, with a
//! per-step table of compression, time and FLOPs.

use crate::util::read_tensors;
use anyhow::{bail, Context, Result};
use dcdit_core::config::Config;
use dcdit_core::model::Model;
use dcdit_core::sample::{sample, Guide, Method, SampleOptions, StepInfo};
use dcdit_core::train::sampling_weights;
use dcdit_core::Backend;
use dcdit_data::pictures::{
    save_chunking_viz, save_compression_plot, save_grid_png, ChunkFrame, StepStats,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of the command.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// Checkpoint: a training checkpoint, its `ema.safetensors`, or release-format weights.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Config (default: the one stored in the checkpoint).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Respaced steps.
    #[arg(long, default_value = "250")]
    pub steps: usize,
    /// Use DDIM (eta 0) instead of DDPM.
    #[arg(long)]
    pub ddim: bool,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long, default_value = "4.0")]
    pub cfg_scale: f32,
    /// Guide only the first N output channels (the reference's rule is 3).
    #[arg(long)]
    pub guide_first: Option<usize>,
    /// Tail-drop fraction (elastic inference).
    #[arg(long, default_value = "0")]
    pub tail_drop: f32,
    /// Lite-CFG: use --uncond-tail-drop for the unconditional pass.
    #[arg(long)]
    pub lite_cfg: bool,
    /// Tail-drop fraction of the unconditional pass under --lite-cfg.
    #[arg(long, default_value = "0.9")]
    pub uncond_tail_drop: f32,
    /// Class labels (comma separated); default: every class `--per-class` times.
    #[arg(long)]
    pub labels: Option<String>,
    /// Samples per class when --labels is not given.
    #[arg(long, default_value = "10")]
    pub per_class: usize,
    /// Seed of the noise.
    #[arg(long, default_value = "0")]
    pub seed: u64,
    /// Clip predicted x0 to [-1, 1] (pixel-space models).
    #[arg(long)]
    pub clip: bool,
    /// Output directory.
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Backend, device and CPU threads.
    #[command(flatten)]
    pub dev: crate::util::Dev,
}

/// Loads the model of a checkpoint (EMA weights when it is a training checkpoint).
pub fn load_model<B: Backend>(ckpt: &Path, config: Option<&Path>, backend: &B) -> Result<Model<B>> {
    let map = read_tensors(ckpt)?;
    let cfg = match config {
        Some(c) => crate::util::read_config(c)?,
        None => {
            let text = map
                .metadata
                .get("config")
                .with_context(|| format!("{} stores no config: pass --config", ckpt.display()))?;
            Config::from_yaml_str(text)
                .with_context(|| format!("config stored in {}", ckpt.display()))?
        }
    };
    Model::load(backend, &cfg, &sampling_weights(&map))
        .with_context(|| format!("checkpoint {}", ckpt.display()))
}

/// The labels to draw.
pub fn labels_of(args: &SampleArgs, num_classes: usize) -> Result<Vec<u32>> {
    match &args.labels {
        Some(s) => s
            .split(',')
            .map(|p| {
                let v: u32 = p
                    .trim()
                    .parse()
                    .with_context(|| format!("--labels: `{p}` is not a class"))?;
                if v as usize >= num_classes {
                    bail!("--labels: class {v} out of range (0..{num_classes})");
                }
                Ok(v)
            })
            .collect(),
        None => {
            if args.per_class == 0 {
                bail!("--per-class must be > 0");
            }
            Ok((0..num_classes as u32)
                .flat_map(|c| std::iter::repeat_n(c, args.per_class))
                .collect())
        }
    }
}

/// Sampling options from the arguments.
pub fn options(args: &SampleArgs) -> Result<SampleOptions> {
    Ok(SampleOptions {
        steps: args.steps,
        method: if args.ddim {
            Method::Ddim { eta: 0.0 }
        } else {
            Method::Ddpm
        },
        cfg_scale: args.cfg_scale,
        guide: args.guide_first.map(Guide::First).unwrap_or(Guide::All),
        tail_drop: args.tail_drop,
        uncond_tail_drop: args.lite_cfg.then_some(args.uncond_tail_drop),
        seed: args.seed,
        clip_x0: args.clip,
    })
}

/// The 8 evenly spaced step indices of the chunking visualisation.
pub fn viz_steps(steps: usize) -> Vec<usize> {
    (0..8).map(|i| i * (steps.max(1) - 1) / 7).collect()
}

/// Draws the samples and returns them (NCHW) with the per-step records.
pub fn draw<B: Backend>(
    backend: &B,
    model: &Model<B>,
    labels: &[u32],
    opts: &SampleOptions,
) -> Result<(Vec<f32>, Vec<StepInfo>, Vec<f64>)> {
    let mut steps = Vec::new();
    let mut secs = Vec::new();
    let mut last = Instant::now();
    let images = sample(backend, model, labels, opts, |info| {
        secs.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        let mut light = info.clone();
        if !viz_steps(opts.steps).contains(&info.index) {
            light.x_t.clear(); // keep only what the visualisation needs
        }
        steps.push(light);
    })?;
    Ok((images, steps, secs))
}

/// Runs the command.
pub fn run(args: SampleArgs) -> Result<()> {
    crate::with_backend!(args.dev, backend, {
        let model = load_model(&args.ckpt, args.config.as_deref(), &backend)?;
        let s = model.spec.clone();
        let labels = labels_of(&args, s.num_classes)?;
        let opts = options(&args)?;
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let t0 = Instant::now();
        let (images, steps, secs) = draw(&backend, &model, &labels, &opts)?;
        let total = t0.elapsed().as_secs_f64();
        let (c, h, w, l) = (s.in_channels, s.height, s.width, s.tokens());
        let cols = if args.labels.is_none() {
            args.per_class
        } else {
            labels.len().min(10)
        };
        save_grid_png(
            args.out.join("sample.png"),
            &images,
            labels.len(),
            c,
            h,
            w,
            cols,
            4,
        )?;

        // Chunking visualisation: 8 evenly spaced steps, first sample.
        let routed = !steps[0].boundary_prob.is_empty();
        let mean_kept = |k: &[usize]| k.iter().sum::<usize>() as f32 / k.len().max(1) as f32;
        if routed {
            let mut picks = viz_steps(steps.len());
            picks.dedup();
            let frames: Vec<ChunkFrame> = picks
                .iter()
                .filter_map(|&i| steps.get(i))
                .filter(|st| !st.x_t.is_empty())
                .map(|st| ChunkFrame {
                    t: st.t,
                    x_t: st.x_t[..c * l].to_vec(),
                    h,
                    w,
                    c,
                    prob: st.boundary_prob[..l].to_vec(),
                    kept_fraction: st.kept_cond[0] as f32 / l as f32,
                })
                .collect();
            save_chunking_viz(args.out.join("chunking_viz.png"), &frames)?;
        }
        let stats: Vec<StepStats> = steps
            .iter()
            .zip(&secs)
            .map(|(st, &sec)| StepStats {
                t: st.t,
                ratio_cond: if routed {
                    l as f32 / mean_kept(&st.kept_cond)
                } else {
                    1.0
                },
                ratio_uncond: (!st.kept_uncond.is_empty())
                    .then(|| l as f32 / mean_kept(&st.kept_uncond)),
                seconds: sec,
                gflops: st.flops.total() as f64 / 1e9,
            })
            .collect();
        save_compression_plot(args.out.join("compression.png"), &stats)?;

        println!(
            "{:>6} {:>10} {:>10} {:>9} {:>10}",
            "t", "comp_cond", "comp_unc", "ms", "GFLOP"
        );
        let every = (stats.len() / 10).max(1);
        for (i, st) in stats.iter().enumerate() {
            if i % every == 0 || i + 1 == stats.len() {
                println!(
                    "{:>6} {:>10.2} {:>10} {:>9.1} {:>10.3}",
                    st.t,
                    st.ratio_cond,
                    st.ratio_uncond
                        .map(|r| format!("{r:.2}"))
                        .unwrap_or_else(|| "-".into()),
                    st.seconds * 1e3,
                    st.gflops
                );
            }
        }
        let gflops: f64 = stats.iter().map(|s| s.gflops).sum();
        let n = labels.len() as f64;
        println!(
        "total: {} samples, {} steps, {:.1} s ({:.3} s/step), {:.2} TFLOP ({:.4} TFLOP/image), mean compression cond {:.2}{}",
        labels.len(),
        stats.len(),
        total,
        total / stats.len() as f64,
        gflops / 1e3,
        gflops / 1e3 / n,
        stats.iter().map(|s| s.ratio_cond as f64).sum::<f64>() / stats.len() as f64,
        if stats[0].ratio_uncond.is_some() {
            format!(", uncond {:.2}", stats.iter().filter_map(|s| s.ratio_uncond).map(f64::from).sum::<f64>() / stats.len() as f64)
        } else {
            String::new()
        }
    );
        println!(
            "wrote {}/{{sample,chunking_viz,compression}}.png",
            args.out.display()
        );
        Ok(())
    })
}
