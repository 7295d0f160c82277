//! `dcdit-cli`: run DC-DiT from the command line.
//!
//! * `forward`: one forward pass on a safetensors input, written to safetensors
//!   (the tool to check a port against the PyTorch release).
//! * `inspect`: parameters and FLOPs per component of a config.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::{Config, ModelSpec};
use dcdit_core::flops::Component;
use dcdit_core::model::{self, dry_run, Model, TailDrop};
use dcdit_core::weights::{HostTensor, TensorMap};
use dcdit_core::Backend;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "dcdit-cli", version, about = "Dynamic Chunking Diffusion Transformer (DC-DiT) in Rust")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
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
    /// Times the forward of a config on random weights at a target kept fraction (medians).
    Bench {
        /// Release-format YAML config.
        #[arg(long)]
        config: PathBuf,
        /// Batch size.
        #[arg(long, default_value = "8")]
        batch: usize,
        /// Target fraction of kept tokens (the router's last bias is shifted to reach it).
        #[arg(long, default_value = "0.25")]
        keep: f64,
        /// Timed repetitions.
        #[arg(long, default_value = "5")]
        iters: usize,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
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

fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let cfg = Config::from_yaml_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
    cfg.model_spec().with_context(|| format!("config {}", path.display()))?;
    Ok(cfg)
}

fn read_tensors(path: &Path) -> Result<TensorMap> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    TensorMap::from_safetensors(&bytes).with_context(|| format!("loading {}", path.display()))
}

fn parse_tail_drop(s: &str) -> Result<TailDrop> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>().with_context(|| format!("--tail-drop: `{p}` is not a number")))
        .collect::<Result<_>>()?;
    Ok(match v.as_slice() {
        [f] if *f == 0.0 => TailDrop::None,
        [f] => TailDrop::Uniform(*f),
        _ => TailDrop::PerSample(v),
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

fn labels(t: &HostTensor, name: &str) -> Result<Vec<u32>> {
    t.data
        .iter()
        .map(|&v| {
            if v >= 0.0 && v.fract() == 0.0 && v < u32::MAX as f32 {
                Ok(v as u32)
            } else {
                bail!("input `{name}`: {v} is not a class index")
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn forward(config: &Path, weights: &Path, input: &Path, out: &Path, tail: &str, threads: Option<usize>) -> Result<()> {
    let cfg = read_config(config)?;
    let spec = cfg.model_spec()?;
    let w = read_tensors(weights)?;
    let inp = read_tensors(input)?;
    let backend = match threads {
        Some(n) => CpuBackend::with_threads(n),
        None => CpuBackend::new(),
    };
    let model = Model::load(&backend, &cfg, &w).with_context(|| format!("weights {}", weights.display()))?;
    let get = |k: &str| inp.get(k).with_context(|| format!("input {} has no tensor `{k}`", input.display()));
    let (x, t, y) = (get("x")?, get("t")?, get("y")?);
    let b = t.data.len();
    let want = vec![b, spec.in_channels, spec.height, spec.width];
    if x.shape != want {
        bail!("input `x`: expected shape {want:?} (B from `t`), got {:?}", x.shape);
    }
    if y.data.len() != b {
        bail!("input `y`: {} labels for {b} timesteps", y.data.len());
    }
    let yl = labels(y, "y")?;
    let tail = parse_tail_drop(tail)?;
    let xt = model.input_from_nchw(&backend, &x.data, b)?;
    let t0 = std::time::Instant::now();
    let res = model.forward(&backend, &xt, &t.data, &yl, &tail)?;
    let o = model.output_to_nchw(&backend, &res.out, b)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut m = TensorMap::default();
    m.insert("out", HostTensor::new(vec![b, spec.out_channels, spec.height, spec.width], o)?);
    if let Some(r) = &res.routing {
        let l = spec.tokens();
        m.insert("boundary_prob", HostTensor::new(vec![b, l], r.boundary_prob.clone())?);
        let mask = r.mask.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        m.insert("boundary_mask", HostTensor::new(vec![b, l], mask)?);
        eprintln!(
            "forward: {b} samples, kept {:?} of {l} tokens, {:.3} s, {:.3} GFLOP",
            r.kept,
            secs,
            res.flops.total() as f64 / 1e9
        );
    } else {
        eprintln!("forward: {b} samples, {:.3} s, {:.3} GFLOP", secs, res.flops.total() as f64 / 1e9);
    }
    write_atomic(out, &m.to_safetensors(None)?)
}

fn component_of(name: &str) -> Component {
    if name.starts_with("hnet.encoder") || name.starts_with("hnet.residual_proj") {
        Component::Encoder
    } else if name.starts_with("hnet.routing_module") {
        Component::Routing
    } else if name.starts_with("hnet.main_network") || name.starts_with("blocks.") || name == "pos_embed" {
        Component::MainNetwork
    } else if name.starts_with("hnet.decoder") {
        Component::Decoder
    } else if name.starts_with("final_layer") {
        Component::FinalLayer
    } else {
        Component::Embeddings
    }
}

fn inspect(config: &Path, weights: Option<&Path>, compression: f64) -> Result<()> {
    let cfg = read_config(config)?;
    let spec: ModelSpec = cfg.model_spec()?;
    let (_, reg) = model::build(&spec);
    if let Some(w) = weights {
        let wm = read_tensors(w)?;
        let shapes = dry_run::ShapeBackend { l: 0, keep: 0 };
        dcdit_core::model::params::Params::load(&shapes, reg.clone(), &wm)
            .with_context(|| format!("weights {}", w.display()))?;
        println!("weights {}: all {} tensors match the config", w.display(), reg.infos.len());
    }
    if !(compression >= 1.0) {
        bail!("--compression must be >= 1 (got {compression})");
    }
    let l = spec.tokens();
    let keep = ((l as f64 / compression).round() as usize).clamp(2.min(l), l);
    let flops = dry_run::flops_per_image(&spec, keep)?;
    println!(
        "{:?} {}x{}x{} latent, D {} E {} heads {} blocks {}+{}+{}",
        spec.kind,
        spec.in_channels,
        spec.height,
        spec.width,
        spec.width_d,
        spec.enc_dim,
        spec.heads,
        spec.encoder.len(),
        spec.main.len(),
        spec.decoder.len()
    );
    println!("{:<14} {:>14} {:>14}", "component", "parameters", "GFLOP/image");
    for c in Component::ALL {
        let n: usize = reg
            .infos
            .iter()
            .filter(|i| i.trainable && component_of(&i.name) == c)
            .map(|i| i.numel())
            .sum();
        println!("{:<14} {:>14} {:>14.4}", c.name(), n, flops.get(c) as f64 / 1e9);
    }
    println!("{:<14} {:>14} {:>14.4}", "total", reg.trainable_count(), flops.total() as f64 / 1e9);
    println!(
        "trainable parameters: {}  fixed position table: {} entries  (kept {keep} of {l} tokens)",
        reg.trainable_count(),
        reg.buffer_count()
    );
    Ok(())
}

fn bench(config: &Path, batch: usize, keep: f64, iters: usize, threads: Option<usize>) -> Result<()> {
    let cfg = read_config(config)?;
    let spec = cfg.model_spec()?;
    if batch == 0 || iters == 0 || !(keep > 0.0 && keep <= 1.0) {
        bail!("--batch and --iters must be > 0 and --keep in (0, 1]");
    }
    let backend = match threads {
        Some(n) => CpuBackend::with_threads(n),
        None => CpuBackend::new(),
    };
    let (_, reg) = model::build(&spec);
    let mut w = dcdit_core::model::init::init_weights(&spec, &reg, 0)?;
    // Random (not zero) adaLN and output weights, so every layer does real work.
    let mut rng = dcdit_core::rng::Rng::new(1);
    for (k, t) in w.tensors.iter_mut() {
        if k.contains("adaLN_modulation") || k.starts_with("final_layer.linear") {
            t.data.iter_mut().for_each(|v| *v = (rng.normal() * 0.02) as f32);
        }
    }
    let l = spec.tokens();
    let x: Vec<f32> = (0..batch * spec.in_channels * l).map(|_| rng.normal() as f32).collect();
    let t: Vec<f32> = (0..batch).map(|i| (i * 997 / batch.max(1)) as f32).collect();
    let y: Vec<u32> = (0..batch).map(|i| (i % spec.num_classes) as u32).collect();
    let mut model = Model::load(&backend, &cfg, &w)?;
    let xt = model.input_from_nchw(&backend, &x, batch)?;
    let bias_key = "hnet.routing_module.residual_scorer.3.bias";
    if let (Some(r), Some(id)) = (model.forward(&backend, &xt, &t, &y, &TailDrop::None)?.routing, reg.find(bias_key)) {
        // Shift the logit so that `keep` of the tokens land above 0.5.
        let mut logits: Vec<f32> = r.boundary_prob.iter().map(|p| (p / (1.0 - p)).ln()).collect();
        logits.sort_by(|a, b| a.total_cmp(b));
        let q = logits[((1.0 - keep) * (logits.len() - 1) as f64) as usize];
        let mut bias = w.get(bias_key).unwrap().clone();
        bias.data[0] -= q + 1e-4;
        w.insert(bias_key, bias);
        model = Model::load(&backend, &cfg, &w)?;
        let _ = id;
    }
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..iters + 1 {
        let t0 = std::time::Instant::now();
        let out = model.forward(&backend, &xt, &t, &y, &TailDrop::None)?;
        backend.to_f32(&out.out)?;
        times.push(t0.elapsed().as_secs_f64());
        last = Some(out);
    }
    times.remove(0); // warm-up
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    let out = last.unwrap();
    let kept: usize = out.routing.as_ref().map(|r| r.kept.iter().sum()).unwrap_or(batch * l);
    println!(
        "{} | batch {batch} | kept {:.1}% of tokens | median {:.3} s (min {:.3}, max {:.3}) over {iters} | {:.1} GFLOP | {:.1} GFLOP/s",
        backend.name(),
        100.0 * kept as f64 / (batch * l) as f64,
        med,
        times[0],
        times[times.len() - 1],
        out.flops.total() as f64 / 1e9,
        out.flops.total() as f64 / 1e9 / med
    );
    println!("{}", out.flops);
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
            backend: BackendKind::Cpu,
            threads,
        } => forward(&config, &weights, &input, &out, &tail_drop, threads),
        Cmd::Bench {
            config,
            batch,
            keep,
            iters,
            threads,
        } => bench(&config, batch, keep, iters, threads),
        Cmd::Inspect {
            config,
            weights,
            compression,
        } => inspect(&config, weights.as_deref(), compression),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
