//! Training (SPEC 4), written once over an [`AutodiffBackend`]: the same
//! model code as inference records a tape, the objective is evaluated on the
//! host ([`crate::objective`]) and its gradients seeded back. AdamW, grad-norm
//! clipping, EMA, gradient accumulation, class dropout, the N curriculum and
//! multi-budget (elastic) training follow the release.
//!
//! ```no_run
//! # fn demo<A: dcdit_core::backend_grad::AutodiffBackend>(ad: A, cfg: dcdit_core::config::Config, init: dcdit_core::weights::TensorMap, data: Vec<f32>, labels: Vec<u32>) -> dcdit_core::Result<()> {
//! use dcdit_core::train::{Trainer, TrainOptions};
//! let opts = TrainOptions::from_config(&cfg)?;
//! let mut trainer = Trainer::new(ad, &cfg, &init, opts)?;
//! let mut source = |idx: &[usize]| -> dcdit_core::Result<(Vec<f32>, Vec<u32>)> {
//!     let per = data.len() / labels.len();
//!     Ok((idx.iter().flat_map(|&i| data[i * per..(i + 1) * per].to_vec()).collect(),
//!         idx.iter().map(|&i| labels[i]).collect()))
//! };
//! let stats = trainer.step(labels.len(), &mut source)?;
//! # Ok(()) }
//! ```

use crate::backend::Backend;
use crate::backend_grad::{AdamW, AutodiffBackend, GradBackend};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::params::{download, upload, Params};
use crate::model::{nchw_to_nhwc, Model, TailDrop};
use crate::objective::{objective, DiffusionBatch, LossTerms};
use crate::rng::Rng;
use crate::scheduler::Ddpm;
use crate::weights::{HostTensor, TensorMap};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

type Inner<A> = <A as AutodiffBackend>::Inner;
type InnerT<A> = <Inner<A> as Backend>::Tensor;

/// Hyper-parameters of training, from `training.*` of the config.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Samples per optimiser step (over all accumulation steps).
    pub batch: usize,
    /// Micro-batches per step.
    pub accumulation: usize,
    /// AdamW settings (step is filled in per step).
    pub adamw: AdamW,
    /// Grad-norm clip.
    pub max_grad_norm: f32,
    /// EMA decay.
    pub ema_decay: f32,
    /// Class dropout probability.
    pub class_dropout: f32,
    /// Ratio loss weight lambda.
    pub ratio_weight: f32,
    /// Ratio loss group size (None = whole micro-batch).
    pub ratio_group: Option<usize>,
    /// Target compression N.
    pub target_n: f32,
    /// Curriculum start N and length in steps.
    pub curriculum: Option<(f32, usize)>,
    /// Multi-budget drop fractions and first step.
    pub multi_budget: Option<(Vec<f32>, u64)>,
    /// Seed of data order, timesteps, noise and class dropout.
    pub seed: u64,
}

impl TrainOptions {
    /// Reads `training.*`, checking that the values make sense.
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let t = &cfg.training;
        let bad = |f: &str, m: &str| Err(Error::config(f, m.to_string()));
        if t.global_batch_size == 0 {
            return bad("training.global_batch_size", "must be > 0");
        }
        if t.gradient_accumulation_steps == 0
            || !t
                .global_batch_size
                .is_multiple_of(t.gradient_accumulation_steps)
        {
            return bad(
                "training.gradient_accumulation_steps",
                "must be > 0 and divide global_batch_size",
            );
        }
        let micro = t.global_batch_size / t.gradient_accumulation_steps;
        if let Some(g) = t.ratio_batch_size {
            if g == 0 || !micro.is_multiple_of(g) {
                return Err(Error::config(
                    "training.ratio_batch_size",
                    format!("{g} must divide the micro-batch of {micro}"),
                ));
            }
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad("training.learning_rate", "must be a positive number");
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return bad("training.ema_decay", "must be in [0, 1)");
        }
        if t.downsample_factor.partial_cmp(&1.0) != Some(core::cmp::Ordering::Greater) {
            return bad("training.downsample_factor", "must be > 1");
        }
        if !(0.0..=1.0).contains(&t.class_dropout_prob) {
            return bad("training.class_dropout_prob", "must be in [0, 1]");
        }
        if t.multi_budget_training
            && (t.multi_budget_drop_fractions.is_empty()
                || t.multi_budget_drop_fractions
                    .iter()
                    .any(|f| !(0.0..1.0).contains(f)))
        {
            return bad(
                "training.multi_budget_drop_fractions",
                "must be non-empty fractions in [0, 1)",
            );
        }
        Ok(TrainOptions {
            batch: t.global_batch_size,
            accumulation: t.gradient_accumulation_steps,
            adamw: AdamW {
                lr: t.learning_rate as f32,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: t.weight_decay as f32,
                step: 0,
            },
            max_grad_norm: t.max_grad_norm as f32,
            ema_decay: t.ema_decay as f32,
            class_dropout: t.class_dropout_prob,
            ratio_weight: t.ratio_loss_weight,
            ratio_group: t.ratio_batch_size,
            target_n: t.downsample_factor,
            curriculum: t
                .downsample_factor_start
                .filter(|_| t.downsample_factor_warmup_steps > 0)
                .map(|s| (s, t.downsample_factor_warmup_steps)),
            multi_budget: t.multi_budget_training.then(|| {
                (
                    t.multi_budget_drop_fractions.clone(),
                    t.multi_budget_start_step.unwrap_or(0) as u64,
                )
            }),
            seed: t.seed,
        })
    }

    /// Target N at `step` (linear curriculum from the start value).
    pub fn n_at(&self, step: u64) -> f32 {
        match self.curriculum {
            Some((start, len)) => {
                let f = (step as f32 / len as f32).min(1.0);
                start + (self.target_n - start) * f
            }
            None => self.target_n,
        }
    }

    /// Tail-drop fraction of `step`: drawn from the multi-budget set with an
    /// RNG seeded by the step number (so a resumed run draws the same).
    pub fn drop_at(&self, step: u64) -> f32 {
        match &self.multi_budget {
            Some((set, start)) if step >= *start => set[Rng::new(step).below(set.len())],
            _ => 0.0,
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    /// Loss terms (means over the step's micro-batches).
    pub loss: LossTerms,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Natural compression L / (natural boundaries), mean over samples.
    pub natural_compression: f32,
    /// Effective compression L / (kept tokens) after tail dropping.
    pub effective_compression: f32,
    /// Target N used.
    pub target_n: f32,
    /// Tail-drop fraction used.
    pub drop_fraction: f32,
}

/// One batch with everything the loss needs, NCHW on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Clean data `(B, C, H, W)`.
    pub x0: Vec<f32>,
    /// Timesteps.
    pub t: Vec<usize>,
    /// Labels (after class dropout).
    pub y: Vec<u32>,
    /// Noise `(B, C, H, W)`.
    pub noise: Vec<f32>,
}

/// A source of training data: `(x0 NCHW, labels)` of the given dataset entries.
pub type DataSource<'a> = dyn FnMut(&[usize]) -> Result<(Vec<f32>, Vec<u32>)> + 'a;

/// What [`loss_and_grads`] returns.
pub struct BatchGrads<A: AutodiffBackend> {
    /// Loss terms.
    pub terms: LossTerms,
    /// Gradient per parameter (`None` where nothing reached it), in `ParamId` order.
    pub grads: Vec<Option<InnerT<A>>>,
    /// Natural and effective compression of the batch (DC-DiT only).
    pub compression: Option<(f32, f32)>,
}

/// Loss terms and parameter gradients (device tensors, `None` where nothing
/// reached) of one batch: the function behind both training and `dcdit-cli grad`.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads<A: AutodiffBackend>(
    ad: &A,
    model: &Model<A>,
    sched: &Ddpm,
    batch: &Batch,
    opts: &TrainOptions,
    target_n: f32,
    tail: &TailDrop,
    seed_scale: f32,
) -> Result<BatchGrads<A>> {
    let s = &model.spec;
    let (b, c, l) = (batch.t.len(), s.in_channels, s.tokens());
    if batch.x0.len() != b * c * l || batch.noise.len() != b * c * l || batch.y.len() != b {
        return Err(Error::input(format!(
            "batch: x/noise must be {b}x{c}x{}x{}, y {b} labels",
            s.height, s.width
        )));
    }
    let x0 = nchw_to_nhwc(&batch.x0, b, c, l);
    let noise = nchw_to_nhwc(&batch.noise, b, c, l);
    let mut x_t = vec![0.0f32; x0.len()];
    let per = c * l;
    for (i, &t) in batch.t.iter().enumerate() {
        if t >= sched.num_timesteps() {
            return Err(Error::input(format!("timestep {t} out of range")));
        }
        let r = i * per..(i + 1) * per;
        sched.q_sample(&x0[r.clone()], t, &noise[r.clone()], &mut x_t[r]);
    }
    let inner = ad.inner();
    let xt = ad.from_f32(&x_t, &[b * l, c])?;
    let tf: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
    let res = model.forward(ad, &xt, &tf, &batch.y, tail)?;
    let out = inner.to_f32(A::value(&res.out))?;
    let mut grad_out = vec![0.0f32; out.len()];
    let mut grad_p = Vec::new();
    let routing = res.routing.as_ref();
    let terms = objective(
        sched,
        DiffusionBatch {
            x0: &x0,
            noise: &noise,
            x_t: &x_t,
            t: &batch.t,
            channels: c,
        },
        &out,
        routing.map(|r| (r.boundary_prob.as_slice(), r.natural.as_slice())),
        opts.ratio_weight,
        opts.ratio_group.map(|g| g.min(b)),
        target_n,
        &mut grad_out,
        &mut grad_p,
    )?;
    if seed_scale != 1.0 {
        grad_out
            .iter_mut()
            .chain(grad_p.iter_mut())
            .for_each(|g| *g *= seed_scale);
    }
    let g_out = inner.from_f32(&grad_out, &[b * l, s.out_channels])?;
    let mut seeds = vec![(&res.out, g_out)];
    let compression = routing.map(|r| {
        let nat: usize = r.natural.iter().filter(|m| **m).count();
        let kept: usize = r.kept.iter().sum();
        (
            (b * l) as f32 / nat.max(1) as f32,
            (b * l) as f32 / kept.max(1) as f32,
        )
    });
    if let Some(r) = routing {
        seeds.push((&r.p, inner.from_f32(&grad_p, &[b * l, 1])?));
    }
    let grads = ad.backward(&seeds)?;
    let grads = model
        .params
        .tensors
        .iter()
        .map(|leaf| A::grad(&grads, leaf))
        .collect();
    Ok(BatchGrads {
        terms,
        grads,
        compression,
    })
}

/// Model, optimiser state and EMA of a training run.
pub struct Trainer<A: AutodiffBackend> {
    ad: A,
    /// The model with tracked parameters (leaves re-made every step).
    pub model: Model<A>,
    /// Current parameter values.
    pub params: Vec<InnerT<A>>,
    /// AdamW first moments.
    pub m: Vec<InnerT<A>>,
    /// AdamW second moments.
    pub v: Vec<InnerT<A>>,
    /// EMA of the parameters (what sampling uses).
    pub ema: Vec<InnerT<A>>,
    /// Optimiser steps taken.
    pub step: u64,
    /// Data order, timesteps, noise and class-dropout randomness.
    pub rng: Rng,
    /// Options.
    pub opts: TrainOptions,
    sched: Ddpm,
    config: Config,
}

impl<A: AutodiffBackend> Trainer<A> {
    /// A trainer starting from `init` (release key names), EMA = `init`.
    pub fn new(ad: A, cfg: &Config, init: &TensorMap, opts: TrainOptions) -> Result<Self> {
        let model = tracked_model(&ad, cfg, init)?;
        let params: Vec<InnerT<A>> = model
            .params
            .tensors
            .iter()
            .map(|t| A::value(t).clone())
            .collect();
        let inner = ad.inner();
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for t in &params {
            m.push(inner.full(&inner.shape(t), 0.0)?);
            v.push(inner.full(&inner.shape(t), 0.0)?);
        }
        let rng = Rng::new(opts.seed);
        Ok(Trainer {
            ema: params.clone(),
            params,
            m,
            v,
            step: 0,
            rng,
            sched: training_schedule()?,
            config: cfg.clone(),
            ad,
            model,
            opts,
        })
    }

    /// The autodiff backend.
    pub fn backend(&self) -> &A {
        &self.ad
    }

    /// The config being trained.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Draws a micro-batch: `source(indices)` returns `(x0 NCHW, labels)` of
    /// the dataset entries; timesteps, noise and class dropout come from the
    /// trainer's RNG.
    fn draw(&mut self, n_data: usize, micro: usize, source: &mut DataSource) -> Result<Batch> {
        let idx: Vec<usize> = (0..micro).map(|_| self.rng.below(n_data)).collect();
        let (x0, labels) = source(&idx)?;
        let s = &self.model.spec;
        let per = s.in_channels * s.tokens();
        if x0.len() != micro * per || labels.len() != micro {
            return Err(Error::input(
                "data source returned a batch of the wrong size",
            ));
        }
        let t: Vec<usize> = (0..micro)
            .map(|_| self.rng.below(self.sched.num_timesteps()))
            .collect();
        let y = labels
            .iter()
            .map(|&l| {
                if s.null_class && (self.rng.uniform() as f32) < self.opts.class_dropout {
                    s.num_classes as u32
                } else {
                    l
                }
            })
            .collect();
        let noise = (0..micro * per).map(|_| self.rng.normal() as f32).collect();
        Ok(Batch { x0, t, y, noise })
    }

    /// One optimiser step over `opts.batch` samples drawn from a dataset of
    /// `n_data` entries.
    pub fn step(&mut self, n_data: usize, source: &mut DataSource) -> Result<StepStats> {
        if n_data == 0 {
            return Err(Error::input("empty dataset"));
        }
        let inner = self.ad.inner().clone();
        let acc = self.opts.accumulation;
        let micro = self.opts.batch / acc;
        let target_n = self.opts.n_at(self.step);
        let frac = self.opts.drop_at(self.step);
        let tail = if frac > 0.0 {
            TailDrop::Uniform(frac)
        } else {
            TailDrop::None
        };
        let mut sum: Vec<Option<InnerT<A>>> = vec![None; self.params.len()];
        let mut stats = StepStats {
            target_n,
            drop_fraction: frac,
            ..StepStats::default()
        };
        for _ in 0..acc {
            let batch = self.draw(n_data, micro, source)?;
            for (leaf, p) in self.model.params.tensors.iter_mut().zip(&self.params) {
                *leaf = self.ad.leaf(p.clone());
            }
            let BatchGrads {
                terms,
                grads,
                compression: comp,
            } = loss_and_grads(
                &self.ad,
                &self.model,
                &self.sched,
                &batch,
                &self.opts,
                target_n,
                &tail,
                1.0 / acc as f32,
            )?;
            for (s, g) in sum.iter_mut().zip(grads) {
                *s = match (s.take(), g) {
                    (Some(a), Some(b)) => {
                        Some(inner.binary(&a, &b, crate::backend::Binary::Add)?)
                    }
                    (a, b) => a.or(b),
                };
            }
            let k = 1.0 / acc as f32;
            stats.loss.loss += k * terms.loss;
            stats.loss.mse += k * terms.mse;
            stats.loss.vb += k * terms.vb;
            stats.loss.ratio += k * terms.ratio;
            if let Some((nat, eff)) = comp {
                stats.natural_compression += k * nat;
                stats.effective_compression += k * eff;
            }
        }
        // Clip by the global norm (PyTorch's clip_grad_norm_ coefficient).
        let mut sq = 0.0f64;
        for g in sum.iter().flatten() {
            sq += inner.sum_squares(g)?;
        }
        let norm = libm::sqrt(sq) as f32;
        if !norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "gradient norm at step {}",
                self.step
            )));
        }
        stats.grad_norm = norm;
        let coef = (self.opts.max_grad_norm / (norm + 1e-6)).min(1.0);
        self.step += 1;
        let hp = AdamW {
            step: self.step,
            ..self.opts.adamw
        };
        let infos = &self.model.params.registry.infos;
        for i in 0..self.params.len() {
            let Some(g) = &sum[i] else { continue };
            if !infos[i].trainable {
                continue;
            }
            let (p, m, v) =
                inner.adamw_step(&self.params[i], g, &self.m[i], &self.v[i], hp, coef)?;
            self.params[i] = p;
            self.m[i] = m;
            self.v[i] = v;
            self.ema[i] = inner.ema_update(&self.ema[i], &self.params[i], self.opts.ema_decay)?;
        }
        Ok(stats)
    }

    /// A plain (inference) model holding the EMA weights.
    pub fn ema_model(&self) -> Model<Inner<A>> {
        Model {
            spec: self.model.spec.clone(),
            net: self.model.net.clone(),
            params: Params {
                registry: self.model.params.registry.clone(),
                tensors: self.ema.clone(),
            },
        }
    }

    /// Everything needed to resume, as named host tensors: `model.*`, `ema.*`,
    /// `adam_m.*`, `adam_v.*` under the release's key names, and metadata
    /// (`step`, `rng`, `config`).
    pub fn checkpoint(&self) -> Result<TensorMap> {
        let inner = self.ad.inner();
        let mut out = TensorMap::default();
        for (i, info) in self.model.params.registry.infos.iter().enumerate() {
            for (prefix, t) in [
                ("model", &self.params[i]),
                ("ema", &self.ema[i]),
                ("adam_m", &self.m[i]),
                ("adam_v", &self.v[i]),
            ] {
                out.insert(
                    &format!("{prefix}.{}", info.name),
                    HostTensor::new(info.shape.clone(), download(inner, info, t)?)?,
                );
            }
        }
        let s = self.rng.state();
        out.metadata
            .insert("format".into(), "dcdit-train-v1".into());
        out.metadata.insert("step".into(), self.step.to_string());
        out.metadata
            .insert("rng".into(), format!("{} {} {} {}", s[0], s[1], s[2], s[3]));
        #[cfg(feature = "std")]
        out.metadata
            .insert("config".into(), self.config.to_yaml_string()?);
        Ok(out)
    }

    /// Restores a [`Trainer::checkpoint`]; errors when it belongs to another
    /// model (a missing, unexpected or misshapen tensor is named).
    pub fn restore(&mut self, ckpt: &TensorMap) -> Result<()> {
        if ckpt.metadata.get("format").map(String::as_str) != Some("dcdit-train-v1") {
            return Err(Error::Format(
                "not a dcdit training checkpoint (metadata `format`)".into(),
            ));
        }
        let step: u64 = ckpt
            .metadata
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Format("checkpoint metadata `step`".into()))?;
        let words: Vec<u64> = ckpt
            .metadata
            .get("rng")
            .map(|s| s.split(' ').filter_map(|w| w.parse().ok()).collect())
            .unwrap_or_default();
        if words.len() != 4 {
            return Err(Error::Format("checkpoint metadata `rng`".into()));
        }
        let prefixes = ["model", "ema", "adam_m", "adam_v"];
        let reg = &self.model.params.registry;
        ckpt.reject_unknown(|k| {
            k.split_once('.')
                .is_some_and(|(p, rest)| prefixes.contains(&p) && reg.find(rest).is_some())
        })?;
        let inner = self.ad.inner();
        let mut loaded: [Vec<InnerT<A>>; 4] = Default::default();
        for (slot, prefix) in loaded.iter_mut().zip(prefixes) {
            for info in &reg.infos {
                let t = ckpt.expect(&format!("{prefix}.{}", info.name), &info.shape)?;
                slot.push(upload(inner, info, &t.data)?);
            }
        }
        let [p, e, m, v] = loaded;
        (self.params, self.ema, self.m, self.v) = (p, e, m, v);
        self.step = step;
        self.rng = Rng::from_state([words[0], words[1], words[2], words[3]]);
        Ok(())
    }
}

/// The weights to sample from in a checkpoint: the `ema.*` tensors of a
/// training checkpoint, or the whole map when it holds plain release keys.
pub fn sampling_weights(ckpt: &TensorMap) -> TensorMap {
    if !ckpt.tensors.keys().any(|k| k.starts_with("ema.")) {
        return ckpt.clone();
    }
    let mut out = TensorMap::default();
    for (k, t) in &ckpt.tensors {
        if let Some(rest) = k.strip_prefix("ema.") {
            out.tensors.insert(rest.to_string(), t.clone());
        }
    }
    out.metadata = ckpt.metadata.clone();
    out
}

/// The scheduler the release trains with (`create_diffusion("")`: all 1000
/// steps, betas re-derived from the cumulative products).
pub fn training_schedule() -> Result<Ddpm> {
    Ok(Ddpm::linear(1000).respaced("1000")?.0)
}

/// Loads `weights` into a model whose trainable parameters are tracked leaves.
pub fn tracked_model<A: AutodiffBackend>(
    ad: &A,
    cfg: &Config,
    weights: &TensorMap,
) -> Result<Model<A>> {
    let plain: Model<Inner<A>> = Model::load(ad.inner(), cfg, weights)?;
    Ok(Model {
        spec: plain.spec,
        net: plain.net,
        params: Params {
            tensors: plain
                .params
                .tensors
                .into_iter()
                .map(|t| ad.leaf(t))
                .collect(),
            registry: plain.params.registry,
        },
    })
}

/// Loss terms and the gradient of every trainable parameter (release key
/// names and layouts; zeros where nothing reached) for one batch with labels
/// used as given: what `dcdit-cli grad` writes and the golden tests check.
pub fn batch_gradients<A: AutodiffBackend>(
    ad: &A,
    cfg: &Config,
    weights: &TensorMap,
    batch: &Batch,
    tail: &TailDrop,
) -> Result<(LossTerms, TensorMap)> {
    let model = tracked_model(ad, cfg, weights)?;
    let mut opts = TrainOptions::from_config(cfg)?;
    opts.ratio_group = cfg.training.ratio_batch_size;
    let sched = training_schedule()?;
    let BatchGrads { terms, grads, .. } =
        loss_and_grads(ad, &model, &sched, batch, &opts, opts.target_n, tail, 1.0)?;
    let mut out = TensorMap::default();
    for (info, g) in model.params.registry.infos.iter().zip(grads) {
        if !info.trainable {
            continue;
        }
        let data = match g {
            Some(g) => download(ad.inner(), info, &g)?,
            None => vec![0.0; info.numel()],
        };
        out.insert(
            &format!("grad.{}", info.name),
            HostTensor::new(info.shape.clone(), data)?,
        );
    }
    Ok((terms, out))
}
