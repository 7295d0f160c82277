//! Sampling (SPEC 5): respaced DDPM or DDIM over the same model code as
//! training, with classifier-free guidance, elastic tail dropping and
//! Lite-CFG, reporting each step's routing and FLOPs to a callback.
//!
//! ```no_run
//! # fn demo<B: dcdit_core::Backend>(b: &B, model: &dcdit_core::model::Model<B>) -> dcdit_core::Result<()> {
//! use dcdit_core::sample::{sample, SampleOptions};
//! let opts = SampleOptions { steps: 50, cfg_scale: 4.0, ..SampleOptions::default() };
//! let images = sample(b, model, &[3, 7], &opts, |_step| {})?; // (2, C, H, W), NCHW
//! # Ok(()) }
//! ```

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flops::FlopCount;
use crate::model::{nhwc_to_nchw, Model, TailDrop};
use crate::rng::Rng;
use crate::scheduler::Ddpm;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Reverse process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Ancestral DDPM with the model's (learned) variance.
    Ddpm,
    /// DDIM with the given eta (0 = deterministic).
    Ddim {
        /// Noise scale.
        eta: f64,
    },
}

/// Which output channels classifier-free guidance mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guide {
    /// Every eps channel (the standard rule).
    All,
    /// Only the first `n` channels (the reference's rule is 3, kept from DiT).
    First(usize),
}

/// Sampling options.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// Respaced steps S.
    pub steps: usize,
    /// DDPM or DDIM.
    pub method: Method,
    /// Guidance scale; 1 disables the unconditional pass.
    pub cfg_scale: f32,
    /// Guided channels.
    pub guide: Guide,
    /// Tail-drop fraction of the conditional pass.
    pub tail_drop: f32,
    /// Lite-CFG: a larger tail-drop fraction for the unconditional pass.
    pub uncond_tail_drop: Option<f32>,
    /// Seed of the initial noise and of every step's noise.
    pub seed: u64,
    /// Clip predicted x0 to [-1, 1] (pixel space; the release does not clip latents).
    pub clip_x0: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            steps: 250,
            method: Method::Ddpm,
            cfg_scale: 1.0,
            guide: Guide::All,
            tail_drop: 0.0,
            uncond_tail_drop: None,
            seed: 0,
            clip_x0: false,
        }
    }
}

/// What one sampling step did.
#[derive(Debug, Clone)]
pub struct StepInfo {
    /// Index of the step (0 = first, noisiest).
    pub index: usize,
    /// Original timestep the model saw.
    pub t: usize,
    /// `x_t` before the step, NCHW, `(B, C, H, W)` (conditional half only).
    pub x_t: Vec<f32>,
    /// Boundary probabilities of the conditional samples, `(B, L)` (empty for DiT).
    pub boundary_prob: Vec<f32>,
    /// Kept tokens per conditional sample.
    pub kept_cond: Vec<usize>,
    /// Kept tokens per unconditional sample (empty without guidance).
    pub kept_uncond: Vec<usize>,
    /// FLOPs of the step's forward (both halves).
    pub flops: FlopCount,
}

/// Draws `labels.len()` samples; calls `on_step` after each step's forward.
/// Returns the final samples, NCHW.
pub fn sample<B: Backend>(
    backend: &B,
    model: &Model<B>,
    labels: &[u32],
    opts: &SampleOptions,
    mut on_step: impl FnMut(&StepInfo),
) -> Result<Vec<f32>> {
    let s = &model.spec;
    let n = labels.len();
    if n == 0 {
        return Err(Error::input("no labels to sample"));
    }
    if opts.steps == 0 || opts.steps > 1000 {
        return Err(Error::input(format!(
            "{} sampling steps (want 1..=1000)",
            opts.steps
        )));
    }
    if !(opts.cfg_scale.is_finite() && opts.cfg_scale >= 0.0) {
        return Err(Error::input(format!("guidance scale {}", opts.cfg_scale)));
    }
    let guided = opts.cfg_scale != 1.0;
    if guided && !s.null_class {
        return Err(Error::input(
            "guidance needs the null class (class_dropout_prob > 0)",
        ));
    }
    let (c, l) = (s.in_channels, s.tokens());
    let base = Ddpm::linear(1000);
    let (sched, map) = base.respaced_steps(opts.steps)?;
    let mut rng = Rng::new(opts.seed);
    // x_T, NHWC on the host.
    let mut x: Vec<f32> = (0..n * l * c).map(|_| rng.normal() as f32).collect();
    let batch = if guided { 2 * n } else { n };
    let mut y = labels.to_vec();
    let mut fractions = vec![opts.tail_drop; n];
    if guided {
        y.extend(core::iter::repeat_n(s.num_classes as u32, n));
        fractions.extend(core::iter::repeat_n(
            opts.uncond_tail_drop.unwrap_or(opts.tail_drop),
            n,
        ));
    }
    let tail = TailDrop::PerSample(fractions);
    tail.resolve(batch)?;
    let cout = s.out_channels;
    let learned = cout == 2 * c;
    let (mut eps, mut v) = (vec![0.0f32; n * l * c], vec![0.0f32; n * l * c]);
    let mut next = vec![0.0f32; n * l * c];
    let mut noise = vec![0.0f32; n * l * c];
    for (index, ti) in (0..opts.steps).rev().enumerate() {
        let t = map[ti];
        let input = if guided {
            [x.as_slice(), x.as_slice()].concat()
        } else {
            x.clone()
        };
        let xt = backend.from_f32(&input, &[batch * l, c])?;
        let tt = vec![t as f32; batch];
        let res = model.forward(backend, &xt, &tt, &y, &tail)?;
        let out = backend.to_f32(&res.out)?;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("model output at t = {t}")));
        }
        // Split channels (and guide) into NHWC eps / v of the conditional half.
        let guided_ch = match opts.guide {
            Guide::All => c,
            Guide::First(k) => k.min(c),
        };
        for r in 0..n * l {
            for ch in 0..c {
                let cond = out[r * cout + ch];
                eps[r * c + ch] = if guided && ch < guided_ch {
                    let unc = out[(n * l + r) * cout + ch];
                    unc + opts.cfg_scale * (cond - unc)
                } else {
                    cond
                };
                if learned {
                    v[r * c + ch] = out[r * cout + c + ch];
                }
            }
        }
        let routing = res.routing.as_ref();
        on_step(&StepInfo {
            index,
            t,
            x_t: nhwc_to_nchw(&x, n, c, l),
            boundary_prob: routing
                .map(|r| r.boundary_prob[..n * l].to_vec())
                .unwrap_or_default(),
            kept_cond: routing.map(|r| r.kept[..n].to_vec()).unwrap_or_default(),
            kept_uncond: routing
                .filter(|_| guided)
                .map(|r| r.kept[n..].to_vec())
                .unwrap_or_default(),
            flops: res.flops,
        });
        noise.iter_mut().for_each(|z| *z = rng.normal() as f32);
        match opts.method {
            Method::Ddpm => sched.ddpm_step_opt(
                &x,
                &eps,
                learned.then_some(v.as_slice()),
                ti,
                &noise,
                opts.clip_x0,
                &mut next,
            ),
            Method::Ddim { eta } => {
                sched.ddim_step_opt(&x, &eps, ti, eta, &noise, opts.clip_x0, &mut next)
            }
        }
        core::mem::swap(&mut x, &mut next);
    }
    Ok(nhwc_to_nchw(&x, n, c, l))
}
