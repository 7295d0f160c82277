//! `dcdit-cli eval`: sample-quality figures of an MNIST checkpoint, scored by
//! the classifier shipped in `data/classifier/`: the share of samples
//! classified as their requested class, and the Fréchet distance between
//! classifier features of the samples and of the held-out real digits.

use crate::sample::{draw, labels_of, load_model, options, SampleArgs};
use anyhow::{bail, Result};
use dcdit_data::classifier::{frechet_distance, Classifier};
use dcdit_data::mnist::Mnist;

/// Share of kept tokens on stroke pixels (> 0.5 in [-1, 1]) and on background
/// pixels (< -0.9) of the held-out digits noised to timestep `t`.
fn kept_on_strokes<B: dcdit_core::Backend>(
    backend: &B,
    model: &dcdit_core::model::Model<B>,
    mnist: &Mnist,
    t: usize,
) -> Result<(f64, f64)> {
    let sched = dcdit_core::train::training_schedule()?;
    let mut rng = dcdit_core::rng::Rng::new(7);
    let idx = mnist.heldout_indices();
    let (mut ks, mut ns, mut kb, mut nb) = (0usize, 0usize, 0usize, 0usize);
    for chunk in idx.chunks(100) {
        let (x0, labels) = mnist.batch_f32(chunk)?;
        let noise: Vec<f32> = (0..x0.len()).map(|_| rng.normal() as f32).collect();
        let mut xt = vec![0.0f32; x0.len()];
        for (i, _) in chunk.iter().enumerate() {
            let r = i * 784..(i + 1) * 784;
            sched.q_sample(&x0[r.clone()], t, &noise[r.clone()], &mut xt[r]);
        }
        let input = model.input_from_nchw(backend, &xt, chunk.len())?;
        let y: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
        let tt = vec![t as f32; chunk.len()];
        let out = model.forward(backend, &input, &tt, &y, &dcdit_core::model::TailDrop::None)?;
        let mask = out.routing.map(|r| r.mask).unwrap_or_default();
        for (v, &m) in x0.iter().zip(&mask) {
            if *v > 0.5 {
                ns += 1;
                ks += m as usize;
            } else if *v < -0.9 {
                nb += 1;
                kb += m as usize;
            }
        }
    }
    Ok((ks as f64 / ns.max(1) as f64, kb as f64 / nb.max(1) as f64))
}

/// Runs the command.
pub fn run(args: SampleArgs) -> Result<()> {
    crate::with_backend!(args.dev, backend, {
        let model = load_model(&args.ckpt, args.config.as_deref(), &backend)?;
        let s = &model.spec;
        if (s.in_channels, s.height, s.width, s.num_classes) != (1, 28, 28, 10) {
            bail!("eval scores MNIST models (1x28x28, 10 classes)");
        }
        let labels = labels_of(&args, s.num_classes)?;
        let (images, steps, _) = draw(&backend, &model, &labels, &options(&args)?)?;
        let clf = Classifier::load_bundled()?;
        let pred = clf.predict(&images)?;
        let hits = pred
            .iter()
            .zip(&labels)
            .filter(|(p, l)| u32::from(**p) == **l)
            .count();
        let mnist = Mnist::load_bundled()?;
        let (real, _) = mnist.batch_f32(&mnist.heldout_indices())?;
        let fa = clf.features(&images)?;
        let fb = clf.features(&real)?;
        let fd = frechet_distance(&fa, &fb, dcdit_data::classifier::FEATURE_DIM)?;
        let l = s.tokens() as f32;
        let comp =
            |i: usize| l / (steps[i].kept_cond.iter().sum::<usize>() as f32 / labels.len() as f32);
        println!(
            "samples: {} ({} steps, seed {})",
            labels.len(),
            steps.len(),
            args.seed
        );
        println!(
            "class accuracy: {:.1}% ({hits}/{})",
            100.0 * hits as f64 / labels.len() as f64,
            labels.len()
        );
        println!(
            "Frechet distance (classifier features) to {} held-out digits: {fd:.3}",
            real.len() / 784
        );
        if !steps[0].kept_cond.is_empty() {
            for t in [0usize, 250, 500] {
                let (stroke, background) = kept_on_strokes(&backend, &model, &mnist, t)?;
                println!(
                "real held-out digits at t = {t}: kept {:.1}% of stroke pixels, {:.1}% of background pixels",
                100.0 * stroke,
                100.0 * background
            );
            }
            println!(
                "compression at t = {}: {:.2}; at t = {}: {:.2}",
                steps[0].t,
                comp(0),
                steps[steps.len() - 1].t,
                comp(steps.len() - 1)
            );
        }
        Ok(())
    })
}
