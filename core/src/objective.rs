//! The training objective (SPEC 4) on the host: the diffusion loss (MSE on
//! eps plus the variational bound in bits with the predicted mean held
//! constant) and the ratio loss, with their gradients w.r.t. the model output
//! and the boundary probabilities. The autodiff tape takes it from there.

use crate::error::{Error, Result};
use crate::ratio_loss::grouped_ratio_loss;
use crate::scheduler::Ddpm;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// One batch, NHWC on the host: `x0`, `noise`, `x_t` are `(B*L*C)`, `t` per sample.
#[derive(Debug, Clone, Copy)]
pub struct DiffusionBatch<'a> {
    /// Clean data.
    pub x0: &'a [f32],
    /// The noise added.
    pub noise: &'a [f32],
    /// `q_sample(x0, t, noise)`.
    pub x_t: &'a [f32],
    /// Timestep of each sample.
    pub t: &'a [usize],
    /// Channels C.
    pub channels: usize,
}

/// Batch means of the loss terms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossTerms {
    /// Total `mean(mse + vb) + lambda * ratio`.
    pub loss: f32,
    /// Mean MSE.
    pub mse: f32,
    /// Mean variational bound (bits).
    pub vb: f32,
    /// Ratio loss (0 without routing).
    pub ratio: f32,
}

/// Diffusion loss of the model output `out` (`(B*L, Cout)` rows, eps then v
/// channels), averaged over the batch; writes `d loss / d out` scaled by
/// `weight` into `grad_out`. Returns `(mean mse, mean vb)`.
pub fn diffusion_loss(
    sched: &Ddpm,
    batch: DiffusionBatch,
    out: &[f32],
    weight: f32,
    grad_out: &mut [f32],
) -> Result<(f32, f32)> {
    let c = batch.channels;
    let b = batch.t.len();
    let n = batch.x0.len();
    if b == 0
        || c == 0
        || !n.is_multiple_of(b * c)
        || batch.noise.len() != n
        || batch.x_t.len() != n
    {
        return Err(Error::input("diffusion loss: inconsistent batch sizes"));
    }
    let rows = n / c;
    let cout = out.len() / rows.max(1);
    if out.len() != rows * cout || (cout != c && cout != 2 * c) || grad_out.len() != out.len() {
        return Err(Error::input(format!(
            "diffusion loss: output of {} values for {rows} rows of {c} channels",
            out.len()
        )));
    }
    let learned = cout == 2 * c;
    let per = n / b; // elements per sample
    let (mut eps, mut v, mut gv) = (vec![0.0f32; per], vec![0.0f32; per], vec![0.0f32; per]);
    let (mut mse_sum, mut vb_sum) = (0.0f64, 0.0f64);
    let scale = weight / b as f32;
    for s in 0..b {
        let r0 = s * per / c;
        for i in 0..per {
            let (r, ch) = (r0 + i / c, i % c);
            eps[i] = out[r * cout + ch];
            if learned {
                v[i] = out[r * cout + c + ch];
            }
        }
        let range = s * per..(s + 1) * per;
        let noise = &batch.noise[range.clone()];
        let mut mse = 0.0f64;
        for i in 0..per {
            let d = (eps[i] - noise[i]) as f64;
            mse += d * d;
            grad_out[(r0 + i / c) * cout + i % c] = scale * 2.0 * (eps[i] - noise[i]) / per as f32;
        }
        mse /= per as f64;
        mse_sum += mse;
        let t = batch.t[s];
        if t >= sched.num_timesteps() {
            return Err(Error::input(format!("timestep {t} out of range")));
        }
        if learned {
            let vb = sched.vb_grad_v(
                &batch.x0[range.clone()],
                &batch.x_t[range],
                &eps,
                &v,
                t,
                &mut gv,
            );
            vb_sum += vb as f64;
            for i in 0..per {
                grad_out[(r0 + i / c) * cout + c + i % c] = scale * gv[i];
            }
        }
    }
    Ok(((mse_sum / b as f64) as f32, (vb_sum / b as f64) as f32))
}

/// The whole objective: diffusion loss plus `lambda` times the ratio loss of
/// the boundary probabilities `p` (`B*L`, forced ends included) with the
/// natural mask, over groups of `group` samples (None = whole batch), target N.
/// Writes the gradients w.r.t. `out` and `p`.
#[allow(clippy::too_many_arguments)]
pub fn objective(
    sched: &Ddpm,
    batch: DiffusionBatch,
    out: &[f32],
    routing: Option<(&[f32], &[bool])>,
    lambda: f32,
    group: Option<usize>,
    target_n: f32,
    grad_out: &mut [f32],
    grad_p: &mut Vec<f32>,
) -> Result<LossTerms> {
    let (mse, vb) = diffusion_loss(sched, batch, out, 1.0, grad_out)?;
    let mut ratio = 0.0;
    grad_p.clear();
    if let Some((p, natural)) = routing {
        grad_p.resize(p.len(), 0.0);
        let l = p.len() / batch.t.len();
        ratio = grouped_ratio_loss(p, natural, l, group, target_n, Some(grad_p))?;
        grad_p.iter_mut().for_each(|g| *g *= lambda);
    }
    let loss = mse + vb + lambda * ratio;
    if !loss.is_finite() {
        return Err(Error::NonFinite(format!(
            "loss (mse {mse}, vb {vb}, ratio {ratio})"
        )));
    }
    Ok(LossTerms {
        loss,
        mse,
        vb,
        ratio,
    })
}
