//! `dcdit-cli bench`: speed of the CPU backend, and (with `--against-pytorch`)
//! the same workloads run by the PyTorch reference in the same invocation.
//!
//! Workloads (see `bench/README.md` for what each number means):
//! * `forward`: the forward of `--config` (DC-DiT-B by default) on random
//!   weights (SPEC-10 init plus random adaLN / final layer) at each `--keep`
//!   fraction, reached by shifting the router's last bias; median time, GFLOP/s
//!   and a per-component profile (through [`Model::forward_hooked`]).
//! * `bf16`: the first forward again with every weight and the input stored
//!   as bf16 (f32 accumulation), and its error against the f32 output.
//! * `train-step`: one real optimiser step of the [`Trainer`] on
//!   `--train-config` (forward, backward, clip, AdamW, EMA), on a fixed batch
//!   of random data (the trainer's RNG is reset before every step, so every
//!   step sees the same batch, which the PyTorch side replays).
//! * `gemm`: `linear` at the model's shapes, and a large square product for
//!   the machine's peak.

use crate::util::{cpu, read_config};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use dcdit_autodiff::Autodiff;
use dcdit_backend_cpu::{CpuBackend, CpuTensor};
use dcdit_core::backend::DType;
use dcdit_core::config::{Config, ModelSpec};
use dcdit_core::flops::{Component, FlopCount};
use dcdit_core::model::{self, init::init_weights, Model, TailDrop};
use dcdit_core::rng::Rng;
use dcdit_core::train::{TrainOptions, Trainer};
use dcdit_core::weights::{HostTensor, TensorMap};
use dcdit_core::Backend;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const ROUTER_BIAS: &str = "hnet.routing_module.residual_scorer.3.bias";

/// What `dcdit-cli bench` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Forward of `--config` at every `--keep` fraction, f32.
    Forward,
    /// The first forward with bf16 weights and activations.
    Bf16,
    /// One training step of `--train-config`.
    TrainStep,
    /// Matrix multiply at the model's shapes and the machine peak.
    Gemm,
    /// Forward of `--train-config` (the MNIST model, `--train-weights`) at
    /// batch `--batch` on the Vulkan device `--device` next to the CPU
    /// backend, with the largest output difference. Not in the default set:
    /// without a GPU it runs on a software driver, where the figure only
    /// shows the path works end to end.
    Vulkan,
}

/// Arguments of `dcdit-cli bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model of the forward, bf16 and gemm workloads.
    #[arg(long, default_value = "configs/DCDiT-B-N4.yaml")]
    pub config: PathBuf,
    /// Model and hyper-parameters of the train-step workload.
    #[arg(long, default_value = "configs/mnist.yaml")]
    pub train_config: PathBuf,
    /// Batch size of the forwards.
    #[arg(long, default_value = "8")]
    pub batch: usize,
    /// Target kept fractions of the forwards (the router's last bias is
    /// shifted to reach each); the first is also the bf16 and gemm one.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.125,0.0625")]
    pub keep: Vec<f64>,
    /// Starting weights of the train-step workload: a checkpoint (the shipped
    /// MNIST model by default, so that the router keeps a trained share of
    /// tokens), or `init` for the SPEC-10 initialisation.
    #[arg(long, default_value = "checkpoints/mnist-ema.safetensors")]
    pub train_weights: String,
    /// Samples per training step (default: the config's global_batch_size).
    #[arg(long)]
    pub train_batch: Option<usize>,
    /// Workloads to run (comma separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "forward,bf16,train-step,gemm"
    )]
    pub workloads: Vec<Workload>,
    /// Timed repetitions of every measurement (the median is reported).
    #[arg(long, default_value = "5")]
    pub iters: usize,
    /// Runs every workload pair (dcdit, then PyTorch) this many times in
    /// turn and reports the round with the median ratio per row, next to
    /// every round's ratio: on a host whose speed drifts over minutes, one
    /// round can catch the two sides in different minutes.
    #[arg(long, default_value = "1")]
    pub rounds: usize,
    /// Untimed warm-up runs before the timed ones.
    #[arg(long, default_value = "2")]
    pub warmup: usize,
    /// Sizes n of the square n x n x n products that measure the peak.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    pub peak_sizes: Vec<usize>,
    /// CPU threads, for dcdit and PyTorch alike (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also run the PyTorch reference (bench/pytorch_bench.py) on the same
    /// weights and inputs, and print the ratio table.
    #[arg(long)]
    pub against_pytorch: bool,
    /// Also time the reference's own per-sample loop with an explicit softmax
    /// (slow; for the record, never the baseline).
    #[arg(long)]
    pub pytorch_reference_loop: bool,
    /// Python interpreter with torch, safetensors, pyyaml and numpy.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The PyTorch bench script (default: bench/pytorch_bench.py of this repo).
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Vulkan device of the `vulkan` workload (see `dcdit-cli devices`).
    #[arg(long, default_value = "0")]
    pub device: usize,
    /// Writes every figure (both sides, all runs) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keeps the weights / inputs given to PyTorch in this folder (default: a
    /// temporary folder, removed afterwards).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// Median, min and max of a list of seconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    };
    Stats {
        median,
        min: s[0],
        max: s[n - 1],
    }
}

fn stats_json(v: &[f64]) -> Value {
    let s = stats(v);
    json!({"median": s.median, "min": s.min, "max": s.max, "runs": v})
}

/// Times `f` `iters` times after `warmup` untimed runs; seconds per run.
fn time_runs(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        out.push(t0.elapsed().as_secs_f64());
    }
    Ok(out)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.batch == 0 || a.iters == 0 || a.rounds == 0 {
        bail!("--batch, --iters and --rounds must be > 0");
    }
    if a.keep.is_empty() || a.keep.iter().any(|k| !(*k > 0.0 && *k <= 1.0)) {
        bail!("--keep fractions must be in (0, 1]");
    }
    if a.workloads.contains(&Workload::Gemm) && a.peak_sizes.contains(&0) {
        bail!("--peak-sizes must be > 0");
    }
    // Fail before the long Rust runs when the PyTorch side cannot run.
    let script = if a.against_pytorch {
        Some(check_python(&a)?)
    } else {
        None
    };
    // Likewise when the results file's folder cannot be made.
    if let Some(dir) = a.json.as_deref().and_then(Path::parent) {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let backend = cpu(a.threads)?;
    let machine = machine_info(&backend);
    println!(
        "dcdit bench: {} | {} | iters {} (+{} warm-up), medians | rounds {} | load average {}",
        machine["cpu"].as_str().unwrap_or("?"),
        backend.name(),
        a.iters,
        a.warmup,
        a.rounds,
        loadavg()
    );

    let tmp_owned = a.workdir.is_none();
    let dir = match &a.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("dcdit-bench-{}", std::process::id())),
    };
    if a.against_pytorch {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let files = a.against_pytorch.then_some(dir.as_path());

    let rounds = (0..a.rounds)
        .map(|round| -> Result<Value> {
            if a.rounds > 1 {
                println!("\n=== round {} of {} ===", round + 1, a.rounds);
            }
            // On the pool's own thread, so that every op runs inline instead of
            // being handed to a worker while this thread sleeps.
            let (rust, torch) =
                backend.install(|| run_round(&a, &backend, script.as_deref(), &dir, files))?;
            if let Some(t) = &torch {
                print_torch(t);
            }
            let table = ratio_table(&rust, torch.as_ref());
            print_table(&table, torch.is_some());
            Ok(json!({ "dcdit": rust, "pytorch": torch, "table": table }))
        })
        .collect::<Result<Vec<_>>>();
    if tmp_owned && a.against_pytorch {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let rounds = rounds?;
    let table = if rounds.len() > 1 {
        let t = median_rounds(&rounds);
        println!(
            "\n=== the round with the median ratio, per row, of {} rounds ===",
            rounds.len()
        );
        print_table(&t, rounds[0]["pytorch"].is_object());
        t
    } else {
        rounds[0]["table"].clone()
    };
    let load_end = loadavg();
    println!("load average at the end: {load_end} (figures taken under load are not valid: PyTorch's OpenMP threads suffer far more from it than dcdit's pool)");
    if let Some(path) = &a.json {
        let mut machine = machine;
        machine["loadavg_end"] = json!(load_end);
        let mut all = json!({
            "machine": machine,
            "args": format!("{a:?}"),
            "table": table,
        });
        if rounds.len() == 1 {
            all["dcdit"] = rounds[0]["dcdit"].clone();
            all["pytorch"] = rounds[0]["pytorch"].clone();
        } else {
            all["rounds"] = Value::Array(rounds);
        }
        crate::util::write_atomic(path, serde_json::to_string_pretty(&all)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One round: every asked workload on dcdit, each followed at once by its
/// PyTorch counterpart (with `script`), so that a change of load during the
/// run hits both sides of a ratio alike. Returns dcdit's and PyTorch's
/// figures.
fn run_round(
    a: &BenchArgs,
    backend: &CpuBackend,
    script: Option<&Path>,
    dir: &Path,
    files: Option<&Path>,
) -> Result<(Value, Option<Value>)> {
    let threads = backend.threads();
    let mut rust = serde_json::Map::new();
    let mut torch: Option<Value> = None;
    let mut pytorch = |piece: Value| -> Result<()> {
        let Some(script) = script else {
            return Ok(());
        };
        let mut man = json!({
            "threads": threads, "iters": a.iters, "warmup": a.warmup,
            "reference_loop": a.pytorch_reference_loop,
        });
        for (k, v) in piece.as_object().into_iter().flatten() {
            man[k] = v.clone();
        }
        let v = run_pytorch(a, script, dir, &man)?;
        let t = torch.get_or_insert_with(|| json!({}));
        for (k, x) in v.as_object().into_iter().flatten() {
            match (k.as_str(), t.get_mut(k)) {
                ("forward", Some(Value::Array(list))) => {
                    list.extend(x.as_array().into_iter().flatten().cloned())
                }
                _ => t[k] = x.clone(),
            }
        }
        Ok(())
    };
    let wants = |w| a.workloads.contains(&w);
    if wants(Workload::Forward) || wants(Workload::Bf16) || wants(Workload::Gemm) {
        let cfg = read_config(&a.config)?;
        if wants(Workload::Forward) || wants(Workload::Bf16) {
            let fwd = forward_workloads(a, backend, &cfg, files, &mut |entry| {
                pytorch(json!({ "forward": [entry] }))
            })?;
            rust.insert("forward".into(), fwd);
        }
        if wants(Workload::Gemm) {
            let (g, man) = gemm_workload(a, backend, &cfg.model_spec()?)?;
            rust.insert("gemm".into(), g);
            pytorch(json!({ "gemm": man }))?;
        }
    }
    if wants(Workload::Vulkan) {
        rust.insert("vulkan".into(), vulkan_workload(a, backend)?);
    }
    if wants(Workload::TrainStep) {
        let (t, man) = train_workload(a, backend, files)?;
        rust.insert("train".into(), t);
        pytorch(json!({ "train": man }))?;
    }
    Ok((Value::Object(rust), torch))
}

/// Per row of the ratio table, the row of the round whose ratio is the
/// median (the upper middle for an even count), with every round's ratio
/// added as `ratios` in round order. Rows without a ratio come from the
/// first round. Rows are matched by position: every round runs the same
/// workloads.
fn median_rounds(rounds: &[Value]) -> Value {
    let first = rounds[0]["table"].as_array().cloned().unwrap_or_default();
    let rows = first
        .iter()
        .enumerate()
        .map(|(i, r0)| {
            // Same arguments, same rows in the same order (a row's name
            // may carry a measured figure, such as the GEMM peak).
            let same: Vec<&Value> = rounds.iter().filter_map(|r| r["table"].get(i)).collect();
            let ratios: Vec<Option<f64>> = same.iter().map(|r| r["ratio"].as_f64()).collect();
            let mut by_ratio: Vec<(f64, &Value)> = same
                .iter()
                .filter_map(|r| Some((r["ratio"].as_f64()?, *r)))
                .collect();
            by_ratio.sort_by(|x, y| x.0.total_cmp(&y.0));
            let mut row = match by_ratio.get(by_ratio.len() / 2) {
                Some((_, r)) => (*r).clone(),
                None => r0.clone(),
            };
            row["ratios"] = json!(ratios);
            row
        })
        .collect();
    Value::Array(rows)
}

// ---------------------------------------------------------------------------
// Forward workloads
// ---------------------------------------------------------------------------

/// Random weights in which every layer does real work.
fn random_weights(spec: &ModelSpec) -> Result<TensorMap> {
    let (_, reg) = model::build(spec);
    let mut w = init_weights(spec, &reg, 0)?;
    let mut rng = Rng::new(1);
    for (k, t) in w.tensors.iter_mut() {
        if k.contains("adaLN_modulation") || k.starts_with("final_layer.linear") {
            t.data
                .iter_mut()
                .for_each(|v| *v = (rng.normal() * 0.02) as f32);
        }
    }
    Ok(w)
}

/// The router bias that keeps `keep` of the tokens, given the boundary
/// probabilities of all tokens (samples of `l` tokens, both ends forced to 1)
/// under `bias0`: the threshold sits half-way between two neighbouring
/// logits, so that f32 round-off (here or in PyTorch) is unlikely to flip a
/// decision (the PyTorch side compares the masks).
fn bias_for(prob: &[f32], l: usize, bias0: f32, keep: f64) -> f32 {
    let mut lg: Vec<f32> = prob
        .iter()
        .enumerate()
        .filter(|(i, _)| i % l != 0 && i % l != l - 1)
        .map(|(_, &p)| {
            let p = (p as f64).clamp(1e-30, 1.0 - 1e-12);
            (p / (1.0 - p)).ln() as f32
        })
        .collect();
    lg.sort_by(|a, b| a.total_cmp(b));
    let n = prob.len();
    let forced = n - lg.len();
    let want = ((keep * n as f64).round() as usize).clamp(forced, n);
    let k = lg.len() - (want - forced); // first kept index among the free tokens
    let thr = match k {
        _ if lg.is_empty() => 0.0,
        0 => lg[0] - 1.0,
        k if k >= lg.len() => lg[lg.len() - 1] + 1.0,
        k => 0.5 * (lg[k - 1] + lg[k]),
    };
    bias0 - thr
}

/// One timed forward: per-run seconds, per-component seconds of every run,
/// FLOPs, kept mask and output (NCHW).
struct ForwardRun {
    times: Vec<f64>,
    components: Vec<[f64; 8]>,
    flops: FlopCount,
    mask: Vec<bool>,
    kept: usize,
    out: Vec<f32>,
    /// Per-op times of one profiled forward.
    ops: Vec<dcdit_backend_cpu::profile::OpTime>,
}

fn time_forward(
    a: &BenchArgs,
    backend: &CpuBackend,
    model: &Model<CpuBackend>,
    x: &CpuTensor,
    t: &[f32],
    y: &[u32],
) -> Result<ForwardRun> {
    let batch = t.len();
    let mut times = Vec::new();
    let mut components = Vec::new();
    let mut last = None;
    for i in 0..a.warmup + a.iters {
        let mut marks: Vec<(Component, Instant)> = Vec::with_capacity(8);
        let t0 = Instant::now();
        let out = model.forward_hooked(backend, x, t, y, &TailDrop::None, &mut |c| {
            marks.push((c, Instant::now()))
        })?;
        let host = model.output_to_nchw(backend, &out.out, batch)?;
        let end = Instant::now();
        if i >= a.warmup {
            times.push((end - t0).as_secs_f64());
            let mut per = [0.0f64; 8];
            for (j, (c, at)) in marks.iter().enumerate() {
                let next = marks.get(j + 1).map(|m| m.1).unwrap_or(end);
                per[*c as usize] += (next - *at).as_secs_f64();
            }
            components.push(per);
        }
        last = Some((out, host));
    }
    let (out, host) = last.expect("iters > 0");
    // Where the time goes by backend op: one more (untimed) forward with the
    // per-op profiler on.
    let (profiled, ops) =
        backend.with_op_profile(|| model.forward(backend, x, t, y, &TailDrop::None));
    profiled?;
    let r = out.routing.as_ref();
    let mask = r
        .map(|r| r.mask.clone())
        .unwrap_or_else(|| vec![true; batch * model.spec.tokens()]);
    Ok(ForwardRun {
        times,
        components,
        flops: out.flops,
        kept: mask.iter().filter(|m| **m).count(),
        mask,
        out: host,
        ops,
    })
}

fn profile_json(run: &ForwardRun) -> Value {
    let mut comps = Vec::new();
    for c in Component::ALL {
        let v: Vec<f64> = run.components.iter().map(|p| p[c as usize]).collect();
        let s = stats(&v);
        let f = run.flops.get(c) as f64;
        comps.push(json!({
            "component": c.name(), "gflop": f / 1e9, "seconds": s.median,
            "gflops": if s.median > 0.0 { f / 1e9 / s.median } else { 0.0 },
        }));
    }
    Value::Array(comps)
}

fn print_profile(name: &str, run: &ForwardRun) {
    let total = stats(&run.times).median;
    println!(
        "  {name}: per component (medians; time between the model's component marks)\n  {:<14} {:>9} {:>10} {:>9} {:>7}",
        "component", "GFLOP", "ms", "GFLOP/s", "time%"
    );
    for c in Component::ALL {
        let v: Vec<f64> = run.components.iter().map(|p| p[c as usize]).collect();
        let s = stats(&v).median;
        let f = run.flops.get(c) as f64 / 1e9;
        println!(
            "  {:<14} {:>9.3} {:>10.2} {:>9.1} {:>6.1}%",
            c.name(),
            f,
            s * 1e3,
            if s > 0.0 { f / s } else { 0.0 },
            100.0 * s / total
        );
    }
    let f = run.flops.total() as f64 / 1e9;
    println!(
        "  {:<14} {:>9.3} {:>10.2} {:>9.1} {:>6.1}%",
        "total",
        f,
        total * 1e3,
        f / total,
        100.0
    );
    println!(
        "  {name}: per op (one profiled forward)\n{}",
        dcdit_backend_cpu::profile::format_table(&run.ops)
    );
}

/// NCHW (B, C, L) host inputs.
fn random_inputs(spec: &ModelSpec, batch: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let mut rng = Rng::new(2);
    let x = (0..batch * spec.in_channels * spec.tokens())
        .map(|_| rng.normal() as f32)
        .collect();
    let t = (0..batch).map(|i| (i * 997 / batch) as f32).collect();
    let y = (0..batch).map(|i| (i % spec.num_classes) as u32).collect();
    (x, t, y)
}

fn write_tensors(path: &Path, m: &TensorMap) -> Result<()> {
    std::fs::write(path, m.to_safetensors(None)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn host(shape: &[usize], data: Vec<f32>) -> Result<HostTensor> {
    Ok(HostTensor::new(shape.to_vec(), data)?)
}

fn forward_workloads(
    a: &BenchArgs,
    backend: &CpuBackend,
    cfg: &Config,
    files: Option<&Path>,
    after_each: &mut dyn FnMut(Value) -> Result<()>,
) -> Result<Value> {
    let spec = cfg.model_spec()?;
    let batch = a.batch;
    let l = spec.tokens();
    let mut w = random_weights(&spec)?;
    let (xh, t, y) = random_inputs(&spec, batch);
    let model = Model::load(backend, cfg, &w)?;
    let x = model.input_from_nchw(backend, &xh, batch)?;
    let probe = model.forward(backend, &x, &t, &y, &TailDrop::None)?;
    let prob: Option<Vec<f32>> = probe.routing.map(|r| r.boundary_prob);
    let bias0 = w.get(ROUTER_BIAS).map(|b| b.data[0]);
    let mut results = Vec::new();
    let keeps: Vec<f64> = if a.workloads.contains(&Workload::Forward) {
        a.keep.clone()
    } else {
        a.keep[..1].to_vec()
    };
    for (i, &keep) in keeps.iter().enumerate() {
        if let (Some(p), Some(b0)) = (&prob, bias0) {
            let mut bias = w.get(ROUTER_BIAS).expect("router bias").clone();
            bias.data[0] = bias_for(p, l, b0, keep);
            w.insert(ROUTER_BIAS, bias);
        }
        let model = Model::load(backend, cfg, &w)?;
        let run = time_forward(a, backend, &model, &x, &t, &y)?;
        let s = stats(&run.times);
        let gflop = run.flops.total() as f64 / 1e9;
        let name = format!("keep{keep}");
        println!(
            "forward {name} | batch {batch} | kept {} of {} tokens ({:.2}%) | median {:.1} ms (min {:.1}, max {:.1}) | {:.2} GFLOP | {:.1} GFLOP/s",
            run.kept,
            batch * l,
            100.0 * run.kept as f64 / (batch * l) as f64,
            s.median * 1e3,
            s.min * 1e3,
            s.max * 1e3,
            gflop,
            gflop / s.median
        );
        print_profile(&name, &run);
        let mut r = json!({
            "name": name, "target_keep": keep, "batch": batch, "tokens": batch * l,
            "kept": run.kept, "kept_fraction": run.kept as f64 / (batch * l) as f64,
            "gflop": gflop, "gflops": gflop / s.median, "time": stats_json(&run.times),
            "median": s.median, "components": profile_json(&run),
        });
        let bf16 = i == 0 && a.workloads.contains(&Workload::Bf16);
        if bf16 {
            r["bf16"] = bf16_forward(a, backend, cfg, &w, &xh, &t, &y, &run)?;
        }
        if let Some(dir) = files {
            let wp = dir.join(format!("{name}.weights.safetensors"));
            let ip = dir.join(format!("{name}.inputs.safetensors"));
            write_tensors(&wp, &w)?;
            let mut inp = TensorMap::default();
            let (c, h, wd) = (spec.in_channels, spec.height, spec.width);
            inp.insert("x", host(&[batch, c, h, wd], xh.clone())?);
            inp.insert("t", host(&[batch], t.clone())?);
            inp.insert("y", host(&[batch], y.iter().map(|&v| v as f32).collect())?);
            let mask = run.mask.iter().map(|&m| m as u8 as f32).collect();
            inp.insert("mask", host(&[batch, l], mask)?);
            inp.insert(
                "expected_out",
                host(&[batch, spec.out_channels, h, wd], run.out.clone())?,
            );
            write_tensors(&ip, &inp)?;
            results.push(r);
            after_each(json!({
                "name": name, "config": abs(&a.config)?, "weights": wp, "inputs": ip, "bf16": bf16,
            }))?;
        } else {
            results.push(r);
        }
    }
    Ok(Value::Array(results))
}

#[allow(clippy::too_many_arguments)]
fn bf16_forward(
    a: &BenchArgs,
    backend: &CpuBackend,
    cfg: &Config,
    w: &TensorMap,
    xh: &[f32],
    t: &[f32],
    y: &[u32],
    f32_run: &ForwardRun,
) -> Result<Value> {
    let mut model = Model::load(backend, cfg, w)?;
    // Mixed precision: the main network (the DiT blocks between chunk and
    // de-chunk, ~78% of the FLOPs) in bf16; the encoder, router and decoder
    // in f32, so the discrete boundary decisions see no bf16 rounding (the
    // release likewise keeps its router and de-chunk in f32). The model casts
    // the activations at the main network's borders (see `DcDit::forward`).
    let infos = model.params.registry.infos.clone();
    for (p, info) in model.params.tensors.iter_mut().zip(&infos) {
        if info.name.starts_with("hnet.main_network.") {
            *p = backend.cast(p, DType::BF16)?;
        }
    }
    let x = model.input_from_nchw(backend, xh, t.len())?;
    let run = time_forward(a, backend, &model, &x, t, y)?;
    let s = stats(&run.times);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (o, r) in run.out.iter().zip(&f32_run.out) {
        num += ((o - r) as f64).powi(2);
        den += (*r as f64).powi(2);
    }
    let rel = (num / den.max(1e-300)).sqrt();
    let same = run.mask == f32_run.mask;
    let differ = run
        .mask
        .iter()
        .zip(&f32_run.mask)
        .filter(|(a, b)| a != b)
        .count();
    let gflop = run.flops.total() as f64 / 1e9;
    println!(
        "forward bf16 (main network bf16 weights + activations, f32 accumulation; encoder, router, decoder f32) | kept {} | median {:.1} ms (min {:.1}, max {:.1}) | {:.1} GFLOP/s | rel. error vs f32 {:.2e} | mask {}",
        run.kept,
        s.median * 1e3,
        s.min * 1e3,
        s.max * 1e3,
        gflop / s.median,
        rel,
        if same {
            "same as f32".to_string()
        } else {
            format!("differs from f32 in {differ} tokens")
        }
    );
    print_profile("bf16", &run);
    Ok(json!({
        "time": stats_json(&run.times), "median": s.median, "gflops": gflop / s.median,
        "rel_err_vs_f32": rel, "mask_agrees_with_f32": same, "mask_differences": differ, "kept": run.kept,
        "components": profile_json(&run),
    }))
}

fn abs(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))
}

// ---------------------------------------------------------------------------
// Training step
// ---------------------------------------------------------------------------

const TRAIN_SEED: u64 = 7;

/// The `vulkan` workload: the same forward (weights, inputs, kept tokens
/// chosen by the router) on the CPU backend and on the Vulkan device.
fn vulkan_workload(a: &BenchArgs, cpu_backend: &CpuBackend) -> Result<Value> {
    let cfg = read_config(&a.train_config)?;
    let spec = cfg.model_spec()?;
    let weights = if a.train_weights == "init" {
        let (_, reg) = model::build(&spec);
        init_weights(&spec, &reg, cfg.training.seed)?
    } else {
        let ckpt = crate::util::read_tensors(Path::new(&a.train_weights))?;
        dcdit_core::train::sampling_weights(&ckpt)
    };
    let vk = crate::util::vulkan(a.device)?;
    let (x, t, y) = random_inputs(&spec, a.batch);
    let batch = a.batch;
    fn timed<B: Backend>(
        a: &BenchArgs,
        b: &B,
        cfg: &Config,
        w: &TensorMap,
        (x, t, y): (&[f32], &[f32], &[u32]),
        batch: usize,
    ) -> Result<(Vec<f64>, Vec<f32>)> {
        let m = Model::load(b, cfg, w)?;
        let xt = m.input_from_nchw(b, x, batch)?;
        let mut out = Vec::new();
        let times = time_runs(a.warmup, a.iters, || {
            let o = m.forward(b, &xt, t, y, &TailDrop::None)?;
            out = m.output_to_nchw(b, &o.out, batch)?;
            Ok(())
        })?;
        Ok((times, out))
    }
    let inputs = (&x[..], &t[..], &y[..]);
    let (tc, oc) = timed(a, cpu_backend, &cfg, &weights, inputs, batch)?;
    let before = vk.command_stats();
    let (tv, ov) = timed(a, &vk, &cfg, &weights, inputs, batch)?;
    // Commands and barriers per forward (the timed runs include loading once).
    let (after, runs) = (vk.command_stats(), (a.warmup + a.iters).max(1) as u64);
    let (cmds, bars) = ((after.0 - before.0) / runs, (after.1 - before.1) / runs);
    let scale = oc
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = oc
        .iter()
        .zip(&ov)
        .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()))
        / scale;
    let (sc, sv) = (stats(&tc), stats(&tv));
    println!(
        "vulkan forward ({}, batch {batch}): {} {:.1} ms vs {} {:.1} ms (medians), ratio {:.2}; largest output difference {diff:.2e} of the output's scale",
        a.train_config.display(),
        vk.name(),
        sv.median * 1e3,
        cpu_backend.name(),
        sc.median * 1e3,
        sv.median / sc.median
    );
    println!(
        "vulkan commands per forward (weights upload amortised over the runs): {cmds}, of which {bars} need a barrier before them"
    );
    Ok(json!({
        "commands_per_forward": cmds,
        "barriers_per_forward": bars,
        "config": a.train_config.display().to_string(),
        "batch": batch,
        "device": vk.name(),
        "vulkan_s": stats_json(&tv),
        "cpu_s": stats_json(&tc),
        "ratio": sv.median / sc.median,
        "max_rel_diff": diff,
    }))
}

fn train_workload(
    a: &BenchArgs,
    backend: &CpuBackend,
    files: Option<&Path>,
) -> Result<(Value, Value)> {
    let mut cfg = read_config(&a.train_config)?;
    if let Some(b) = a.train_batch {
        if b == 0 {
            bail!("--train-batch must be > 0");
        }
        cfg.training.global_batch_size = b;
        cfg.training.gradient_accumulation_steps = 1;
        if let Some(g) = cfg.training.ratio_batch_size {
            if !b.is_multiple_of(g) {
                cfg.training.ratio_batch_size = None;
            }
        }
    }
    let spec = cfg.model_spec()?;
    let opts = TrainOptions::from_config(&cfg)?;
    if opts.accumulation != 1 {
        bail!("train-step: gradient accumulation is not supported by the bench (the PyTorch side does one micro-batch)");
    }
    if opts.multi_budget.is_some() || opts.curriculum.is_some() {
        bail!("train-step: use a config without multi-budget training or an N curriculum");
    }
    let batch = opts.batch;
    let (_, reg) = model::build(&spec);
    let init = if a.train_weights == "init" {
        init_weights(&spec, &reg, cfg.training.seed)?
    } else {
        let ckpt = crate::util::read_tensors(Path::new(&a.train_weights))?;
        dcdit_core::train::sampling_weights(&ckpt)
    };
    let ad = Autodiff::new(backend.clone());
    let mut trainer = Trainer::new(ad, &cfg, &init, opts.clone())
        .with_context(|| format!("train-step weights {}", a.train_weights))?;

    // The data: the bundled MNIST digits for an MNIST config, else a fixed set
    // of random images in [-1, 1]; held on the host so both sides see them.
    let per = spec.in_channels * spec.tokens();
    let mut rng = Rng::new(3);
    let (data, labels, data_name): (Vec<f32>, Vec<u32>, &str) = if cfg.data.source == "mnist" {
        let m = dcdit_data::mnist::Mnist::load_bundled()?;
        let sel: Vec<usize> = m.train_indices().into_iter().take(4 * batch).collect();
        let (x, y) = m.batch_f32(&sel)?;
        if x.len() != sel.len() * per {
            bail!("train-step: MNIST images do not fit the config's grid");
        }
        (x, y.into_iter().map(u32::from).collect(), "MNIST")
    } else {
        let n = 4 * batch;
        (
            (0..n * per)
                .map(|_| (2.0 * rng.uniform() - 1.0) as f32)
                .collect(),
            (0..n).map(|_| rng.below(spec.num_classes) as u32).collect(),
            "random data",
        )
    };
    let n_data = labels.len();
    let mut source = |idx: &[usize]| -> dcdit_core::Result<(Vec<f32>, Vec<u32>)> {
        Ok((
            idx.iter()
                .flat_map(|&i| data[i * per..(i + 1) * per].iter().copied())
                .collect(),
            idx.iter().map(|&i| labels[i]).collect(),
        ))
    };

    // The batch every step draws (the trainer's draw, replayed for PyTorch).
    let mut r = Rng::new(TRAIN_SEED);
    let idx: Vec<usize> = (0..batch).map(|_| r.below(n_data)).collect();
    let tsteps: Vec<usize> = (0..batch).map(|_| r.below(1000)).collect();
    let ys: Vec<u32> = idx
        .iter()
        .map(|&i| {
            if spec.null_class && (r.uniform() as f32) < opts.class_dropout {
                spec.num_classes as u32
            } else {
                labels[i]
            }
        })
        .collect();
    let noise: Vec<f32> = (0..batch * per).map(|_| r.normal() as f32).collect();

    let mut first = None;
    let mut kept = Vec::new();
    let times = time_runs(a.warmup, a.iters, || {
        trainer.rng = Rng::new(TRAIN_SEED);
        let s = trainer.step(n_data, &mut source)?;
        if first.is_none() {
            first = Some(s);
        }
        kept.push(
            ((batch * spec.tokens()) as f64 / s.effective_compression.max(1e-9) as f64).round()
                as usize,
        );
        Ok(())
    })?;
    let first = first.expect("at least one step");
    // Where a step's time goes, by backend op: one more (untimed) step with
    // the per-op profiler on.
    trainer.rng = Rng::new(TRAIN_SEED);
    let (profiled, ops) = backend.with_op_profile(|| trainer.step(n_data, &mut source));
    profiled?;
    println!(
        "train-step per-op profile (one step):\n{}",
        dcdit_backend_cpu::profile::format_table(&ops)
    );
    let s = stats(&times);
    println!(
        "train-step {} ({}, {data_name}) | batch {batch} | {} steps/s | median {:.1} ms (min {:.1}, max {:.1}) | first step: loss {:.6}, grad norm {:.4}, kept {} of {} tokens",
        a.train_config.display(),
        a.train_weights,
        format_args!("{:.2}", 1.0 / s.median),
        s.median * 1e3,
        s.min * 1e3,
        s.max * 1e3,
        first.loss.loss,
        first.grad_norm,
        kept[0],
        batch * spec.tokens()
    );
    let res = json!({
        "config": a.train_config, "weights": a.train_weights, "data": data_name, "batch": batch, "time": stats_json(&times), "median": s.median,
        "first_loss": first.loss.loss, "first_grad_norm": first.grad_norm,
        "kept_per_step": kept, "tokens": batch * spec.tokens(),
    });
    let mut man = Value::Null;
    if let Some(dir) = files {
        let wp = dir.join("train.weights.safetensors");
        let bp = dir.join("train.batch.safetensors");
        write_tensors(&wp, &init)?;
        let x0: Vec<f32> = idx
            .iter()
            .flat_map(|&i| data[i * per..(i + 1) * per].iter().copied())
            .collect();
        let shape = [batch, spec.in_channels, spec.height, spec.width];
        let mut b = TensorMap::default();
        b.insert("x0", host(&shape, x0)?);
        b.insert(
            "t",
            host(&[batch], tsteps.iter().map(|&v| v as f32).collect())?,
        );
        b.insert("y", host(&[batch], ys.iter().map(|&v| v as f32).collect())?);
        b.insert("noise", host(&shape, noise)?);
        write_tensors(&bp, &b)?;
        // The config PyTorch reads: with the batch override applied.
        let cp = dir.join("train.config.yaml");
        std::fs::write(&cp, cfg.to_yaml_string()?)?;
        man = json!({"config": cp, "weights": wp, "batch": bp, "steps": a.iters});
    }
    Ok((res, man))
}

// ---------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------

/// `(name, rows, k, m)` of the model's linear layers at the first kept fraction.
fn gemm_shapes(a: &BenchArgs, spec: &ModelSpec) -> Vec<(String, usize, usize, usize)> {
    let full = a.batch * spec.tokens();
    let kept = ((full as f64 * a.keep[0]).round() as usize).max(1);
    let (d, m) = (spec.width_d, spec.mlp_hidden);
    vec![
        ("qkv".into(), kept, d, 3 * d),
        ("attn_proj".into(), kept, d, d),
        ("mlp_fc1".into(), kept, d, m),
        ("mlp_fc2".into(), kept, m, d),
        ("residual_proj".into(), full, d, d),
    ]
}

fn gemm_workload(a: &BenchArgs, backend: &CpuBackend, spec: &ModelSpec) -> Result<(Value, Value)> {
    let mut rng = Rng::new(4);
    let mut rand =
        |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (rng.normal() * s) as f32).collect() };
    let mut shapes = Vec::new();
    let (mut flops, mut secs) = (0.0f64, 0.0f64);
    println!("gemm: linear x (rows, k) w (m, k)^T, medians");
    for (name, rows, k, m) in gemm_shapes(a, spec) {
        let x = backend.from_f32(&rand(rows * k, 1.0), &[rows, k])?;
        let w = backend.from_f32(&rand(m * k, 0.03), &[m, k])?;
        let times = time_runs(a.warmup, a.iters, || {
            backend.linear(&x, &w, None)?;
            Ok(())
        })?;
        let s = stats(&times);
        let f = 2.0 * (rows * k * m) as f64;
        flops += f;
        secs += s.median;
        println!(
            "  {name:<14} {rows:>6} x {k:>5} x {m:>5}  {:>8.2} ms  {:>7.1} GFLOP/s",
            s.median * 1e3,
            f / s.median / 1e9
        );
        shapes.push(
            json!({"name": name, "shape": [rows, k, m], "time": stats_json(&times),
                           "median": s.median, "gflops": f / s.median / 1e9}),
        );
    }
    let mut peak = Vec::new();
    let mut best: f64 = 0.0;
    for &n in &a.peak_sizes {
        let x = backend.from_f32(&rand(n * n, 1.0), &[n, n])?;
        let w = backend.from_f32(&rand(n * n, 1.0), &[n, n])?;
        let times = time_runs(a.warmup, a.iters, || {
            backend.linear(&x, &w, None)?;
            Ok(())
        })?;
        let s = stats(&times);
        let g = 2.0 * (n as f64).powi(3) / s.median / 1e9;
        best = best.max(g);
        println!(
            "  square {n:>5}^3{:<9} {:>8.2} ms  {g:>7.1} GFLOP/s",
            "",
            s.median * 1e3
        );
        peak.push(json!({"n": n, "time": stats_json(&times), "median": s.median, "gflops": g}));
    }
    let model = flops / secs / 1e9;
    println!("  model shapes together: {model:.1} GFLOP/s; best square: {best:.1} GFLOP/s");
    let man = json!({
        "shapes": gemm_shapes(a, spec).iter().map(|(_, r, k, m)| json!([r, k, m])).collect::<Vec<_>>(),
        "peak": a.peak_sizes,
    });
    Ok((
        json!({"shapes": shapes, "peak": peak, "model_gflops": model, "peak_gflops": best}),
        man,
    ))
}

// ---------------------------------------------------------------------------
// PyTorch
// ---------------------------------------------------------------------------

const TORCH_INSTALL: &str = "pip install torch safetensors pyyaml numpy";

fn script_path(a: &BenchArgs) -> Result<PathBuf> {
    if let Some(s) = &a.script {
        return Ok(s.clone());
    }
    let local = PathBuf::from("bench/pytorch_bench.py");
    if local.is_file() {
        return Ok(local);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/pytorch_bench.py");
    if repo.is_file() {
        return Ok(repo);
    }
    bail!("bench/pytorch_bench.py not found (run from the repository root, or pass --script)")
}

/// The script's path, once python and torch are known to import.
fn check_python(a: &BenchArgs) -> Result<PathBuf> {
    let script = script_path(a)?;
    let out = Command::new(&a.python)
        .args(["-c", "import torch, safetensors, yaml, numpy"])
        .output();
    match out {
        Err(e) => bail!(
            "--against-pytorch: cannot run `{}` ({e}). Install Python 3, then: {TORCH_INSTALL}",
            a.python
        ),
        Ok(o) if !o.status.success() => bail!(
            "--against-pytorch: `{}` cannot import torch / safetensors / yaml / numpy:\n{}\nInstall them with: {TORCH_INSTALL}",
            a.python,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => Ok(script),
    }
}

fn run_pytorch(a: &BenchArgs, script: &Path, dir: &Path, manifest: &Value) -> Result<Value> {
    let mp = dir.join("manifest.json");
    std::fs::write(&mp, serde_json::to_string_pretty(manifest)?)?;
    println!(
        "running the PyTorch baseline: {} {} {}",
        a.python,
        script.display(),
        mp.display()
    );
    let o = Command::new(&a.python)
        .arg(script)
        .arg(&mp)
        .env("OMP_NUM_THREADS", manifest["threads"].to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", a.python))?;
    if !o.status.success() {
        bail!("the PyTorch bench failed ({})", o.status);
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("reading the PyTorch bench's JSON output:\n{text}"))?;
    Ok(v)
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn print_torch(v: &Value) {
    println!(
        "PyTorch {} | torch.get_num_threads() = {} | parallel_info:",
        v["torch"].as_str().unwrap_or("?"),
        v["get_num_threads"]
    );
    for l in v["parallel_info"].as_str().unwrap_or("").lines() {
        if !l.trim().is_empty() {
            println!("    {l}");
        }
    }
    for w in v["forward"].as_array().into_iter().flatten() {
        let mut parts = Vec::new();
        for (m, r) in w["variants"].as_object().into_iter().flatten() {
            parts.push(format!(
                "{m} {:.1} ms",
                f(&r["median"]).unwrap_or(0.0) * 1e3
            ));
        }
        println!(
            "  torch forward {} | kept {} | {} | best {} | masks agree with dcdit: {} | rel. diff of outputs {:.1e}",
            w["name"].as_str().unwrap_or("?"),
            w["kept"],
            parts.join(", "),
            w["best"].as_str().unwrap_or("?"),
            w["mask_agrees"],
            f(&w["rel_err_vs_rust"]).unwrap_or(f64::NAN)
        );
        if let Some(why) = w.get("bf16_skipped").and_then(|s| s.as_str()) {
            println!("  torch forward bf16 skipped: {why}");
        }
        if let Some(b) = w.get("bf16") {
            println!(
                "  torch forward bf16 {:.1} ms | rel. error vs f32 {:.1e} | mask same as f32: {}",
                f(&b["median"]).unwrap_or(0.0) * 1e3,
                f(&b["rel_err_vs_f32"]).unwrap_or(f64::NAN),
                b["mask_agrees_with_f32"]
            );
        }
    }
    if let Some(t) = v.get("train") {
        let mut parts = Vec::new();
        for (m, r) in t["variants"].as_object().into_iter().flatten() {
            parts.push(format!(
                "{m} {:.1} ms",
                f(&r["median"]).unwrap_or(0.0) * 1e3
            ));
        }
        println!(
            "  torch train-step | {} | first loss {:.6}",
            parts.join(", "),
            f(&t["first_loss"]).unwrap_or(f64::NAN)
        );
    }
    if let Some(g) = v.get("gemm") {
        let shapes: Vec<String> = g["shapes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| format!("{:.0}", f(&s["gflops"]).unwrap_or(0.0)))
            .collect();
        let peaks: Vec<String> = g["peak"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{} {}^3 {:.0}",
                    s["dtype"].as_str().unwrap_or("?"),
                    s["n"],
                    f(&s["gflops"]).unwrap_or(0.0)
                )
            })
            .collect();
        println!(
            "  torch gemm GFLOP/s at the model's shapes: {} | square: {}",
            shapes.join(", "),
            peaks.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------
// The ratio table
// ---------------------------------------------------------------------------

/// One row: workload, dcdit figure, PyTorch figure, ratio, target, met.
fn row(
    workload: String,
    dcdit: Option<f64>,
    torch: Option<f64>,
    unit: &str,
    ratio: Option<f64>,
    target: &str,
    met: Option<bool>,
) -> Value {
    json!({"workload": workload, "dcdit": dcdit, "pytorch": torch, "unit": unit,
           "ratio": ratio, "target": target, "met": met})
}

/// Adds the ratio of the two sides' fastest runs (dcdit's workload `ours`,
/// the fastest variant of PyTorch's `theirs`) to the last row: on a host
/// whose speed drifts, noise only ever adds time, so the minima are the
/// steadier comparison next to the medians the targets are judged on.
fn with_min_ratio(rows: &mut [Value], ours: &Value, theirs: Option<&Value>) {
    let torch_min = theirs.and_then(|t| f(&t["variants"][t["best"].as_str()?]["min"]));
    if let (Some(r), Some((d, t))) = (rows.last_mut(), f(&ours["time"]["min"]).zip(torch_min)) {
        r["ratio_of_minima"] = json!(d / t);
    }
}

fn forward_by_keep(v: &Value, keep: f64) -> Option<&Value> {
    v.as_array()?
        .iter()
        .find(|w| w["target_keep"].as_f64() == Some(keep))
}

fn torch_forward<'a>(t: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    t?["forward"]
        .as_array()?
        .iter()
        .find(|w| w["name"].as_str() == Some(name))
}

fn ratio_table(rust: &Value, torch: Option<&Value>) -> Value {
    let mut rows = Vec::new();
    let fw = &rust["forward"];
    let keeps: Vec<f64> = fw
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["target_keep"].as_f64())
        .collect();
    // Forward rows: every kept fraction, target 0.8 at ~25% and ~6%.
    for &k in &keeps {
        let w = forward_by_keep(fw, k).expect("listed");
        let name = w["name"].as_str().unwrap_or("");
        let d = f(&w["median"]);
        let tw = torch_forward(torch, name);
        let t = tw.and_then(|t| f(&t["median"]));
        let ratio = d.zip(t).map(|(d, t)| d / t);
        let targeted = (k - 0.25).abs() < 1e-9 || (k - 0.0625).abs() < 1e-9;
        let agree = tw.map(|t| t["mask_agrees"].as_bool() == Some(true));
        let label = format!(
            "forward f32, {:.2}% kept ({} tokens){}",
            100.0 * f(&w["kept_fraction"]).unwrap_or(0.0),
            w["kept"],
            match agree {
                Some(false) => " MASKS DIFFER",
                _ => "",
            }
        );
        rows.push(row(
            label,
            d,
            t,
            "s",
            ratio,
            if targeted { "<= 0.8" } else { "-" },
            if targeted {
                ratio.map(|r| r <= 0.8 && agree != Some(false))
            } else {
                None
            },
        ));
        with_min_ratio(&mut rows, w, tw);
    }
    if let Some(t) = rust.get("train") {
        let d = f(&t["median"]);
        let tt = torch.and_then(|v| f(&v["train"]["median"]));
        let ratio = d.zip(tt).map(|(d, t)| d / t);
        rows.push(row(
            format!("train step, batch {}", t["batch"]),
            d,
            tt,
            "s",
            ratio,
            "<= 0.5",
            ratio.map(|r| r <= 0.5),
        ));
        with_min_ratio(&mut rows, t, torch.map(|v| &v["train"]));
    }
    if let Some(b) = keeps
        .first()
        .and_then(|&k| forward_by_keep(fw, k))
        .and_then(|w| w.get("bf16"))
    {
        let d = f(&b["median"]);
        let name = forward_by_keep(fw, keeps[0]).unwrap()["name"]
            .as_str()
            .unwrap_or("");
        let t = torch_forward(torch, name).and_then(|t| f(&t["median"]));
        let ratio = d.zip(t).map(|(d, t)| d / t);
        let err = f(&b["rel_err_vs_f32"]).unwrap_or(f64::INFINITY);
        rows.push(row(
            format!("forward bf16 vs PyTorch f32 (rel. err {err:.1e})"),
            d,
            t,
            "s",
            ratio,
            "<= 0.5, err <= 1e-2",
            ratio.map(|r| r <= 0.5 && err <= 1e-2),
        ));
    }
    // Wall time vs kept tokens: 25% -> 12.5%.
    if let (Some(w25), Some(w12)) = (forward_by_keep(fw, 0.25), forward_by_keep(fw, 0.125)) {
        let eff = |t25: f64, t12: f64| {
            let f25 = f(&w25["gflop"]).unwrap_or(0.0);
            let f12 = f(&w12["gflop"]).unwrap_or(0.0);
            (1.0 - t12 / t25) / (1.0 - f12 / f25)
        };
        let d = f(&w25["median"])
            .zip(f(&w12["median"]))
            .map(|(a, b)| eff(a, b));
        let t = torch_forward(torch, "keep0.25")
            .and_then(|t| f(&t["median"]))
            .zip(torch_forward(torch, "keep0.125").and_then(|t| f(&t["median"])))
            .map(|(a, b)| eff(a, b));
        rows.push(row(
            "wall-time saving / FLOP saving, 25% -> 12.5% kept".into(),
            d,
            t,
            "",
            d,
            ">= 0.8",
            d.map(|r| r >= 0.8),
        ));
    }
    if let Some(g) = rust.get("gemm") {
        let d = f(&g["model_gflops"]);
        let torch_peak = torch.and_then(|v| {
            v["gemm"]["peak"]
                .as_array()?
                .iter()
                .filter(|p| p["dtype"].as_str() == Some("float32"))
                .filter_map(|p| f(&p["gflops"]))
                .reduce(f64::max)
        });
        let peak = f(&g["peak_gflops"])
            .unwrap_or(0.0)
            .max(torch_peak.unwrap_or(0.0));
        // PyTorch's model-shape figure, FLOP-weighted like dcdit's.
        let t = torch.and_then(|v| {
            let s = v["gemm"]["shapes"].as_array()?;
            let (mut fl, mut se) = (0.0, 0.0);
            for x in s {
                let sh = x["shape"].as_array()?;
                let n: f64 = sh.iter().filter_map(|v| v.as_f64()).product();
                fl += 2.0 * n;
                se += f(&x["median"])?;
            }
            Some(fl / se / 1e9)
        });
        let ratio = d.map(|d| d / peak);
        rows.push(row(
            format!("GEMM at the model's shapes vs peak {peak:.0} GFLOP/s"),
            d,
            t,
            "GFLOP/s",
            ratio,
            ">= 0.8",
            ratio.map(|r| r >= 0.8),
        ));
    }
    Value::Array(rows)
}

fn print_table(table: &Value, with_pytorch: bool) {
    println!();
    println!(
        "{:<58} {:>12} {:>12} {:>7} {:>20} {:>5} {:>9}",
        "workload", "dcdit", "PyTorch", "ratio", "target", "met", "min ratio"
    );
    let num = |v: &Value, unit: &str| match v.as_f64() {
        Some(x) if unit == "s" => format!("{:.1} ms", x * 1e3),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    };
    let ratio = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.3}"));
    for r in table.as_array().into_iter().flatten() {
        let unit = r["unit"].as_str().unwrap_or("");
        // With --rounds, every round's ratio after the columns.
        let rounds = match r["ratios"].as_array() {
            Some(v) => format!(
                "  rounds: {}",
                v.iter().map(ratio).collect::<Vec<_>>().join(" ")
            ),
            None => String::new(),
        };
        println!(
            "{:<58} {:>12} {:>12} {:>7} {:>20} {:>5} {:>9}{rounds}",
            r["workload"].as_str().unwrap_or(""),
            num(&r["dcdit"], unit),
            num(&r["pytorch"], unit),
            ratio(&r["ratio"]),
            r["target"].as_str().unwrap_or(""),
            match r["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            },
            ratio(&r["ratio_of_minima"]),
        );
    }
    if !with_pytorch {
        println!("(PyTorch columns empty: run with --against-pytorch)");
    }
}

/// The 1, 5 and 15 minute load averages (Linux), or `?`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn machine_info(b: &CpuBackend) -> Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    json!({
        "cpu": field("model name").unwrap_or_else(|| "unknown CPU".into()),
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "backend": b.name(),
        "loadavg_start": loadavg(),
        "avx512f": has("avx512f"), "avx512_bf16": has("avx512_bf16"), "amx_bf16": has("amx_bf16"),
        "avx2": has("avx2"), "fma": has("fma"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_for_keeps_the_asked_fraction_with_a_margin() {
        // Two samples of 6 tokens; ends forced to 1.
        let p = [
            1.0, 0.1, 0.6, 0.3, 0.9, 1.0, //
            1.0, 0.45, 0.2, 0.7, 0.55, 1.0,
        ];
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        for (keep, want) in [(0.5, 6), (0.75, 9), (1.0 / 3.0, 4), (1.0, 12)] {
            let b = bias_for(&p, 6, 0.0, keep) as f64;
            let kept = p
                .iter()
                .enumerate()
                .filter(|(i, &q)| {
                    i % 6 == 0 || i % 6 == 5 || {
                        let q = q as f64;
                        sig((q / (1.0 - q)).ln() + b) > 0.5 + 1e-3
                    }
                })
                .count();
            assert_eq!(kept, want, "keep {keep}");
        }
    }

    /// The median round's row per workload (the upper middle for an even
    /// count), every round's ratio in round order, rows without a ratio from
    /// the first round.
    #[test]
    fn rounds_give_the_median_rounds_row() {
        let round = |r: f64, ms: f64| {
            json!({ "table": [
                { "workload": "forward", "dcdit": ms, "pytorch": 1.0, "ratio": r, "met": r <= 0.8 },
                { "workload": "bf16", "dcdit": ms, "pytorch": null, "ratio": null },
            ]})
        };
        let t = median_rounds(&[round(0.9, 9.0), round(0.7, 7.0), round(0.8, 8.0)]);
        assert_eq!(t[0]["ratio"], json!(0.8));
        assert_eq!(t[0]["dcdit"], json!(8.0));
        assert_eq!(t[0]["met"], json!(true));
        assert_eq!(t[0]["ratios"], json!([0.9, 0.7, 0.8]));
        assert_eq!(t[1]["dcdit"], json!(9.0));
        assert_eq!(t[1]["ratios"], json!([null, null, null]));
        let t = median_rounds(&[round(0.7, 7.0), round(0.9, 9.0)]);
        assert_eq!(t[0]["ratio"], json!(0.9));
    }

    #[test]
    fn stats_are_medians() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(stats(&[5.0, 1.0, 2.0]).median, 2.0);
    }
}
