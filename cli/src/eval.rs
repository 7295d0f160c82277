//! `dcdit-cli eval`: sample-quality figures of an MNIST checkpoint, scored by
//! the classifier shipped in `data/classifier/`: the share of samples
//! classified as their requested class, and the Fréchet distance between
//! classifier features of the samples and of the held-out real digits.

use crate::sample::{draw, labels_of, load_model, options, SampleArgs};
use crate::util::cpu;
use anyhow::{bail, Result};
use dcdit_data::classifier::{frechet_distance, Classifier};
use dcdit_data::mnist::Mnist;

/// Runs the command.
pub fn run(args: SampleArgs) -> Result<()> {
    let backend = cpu(args.threads)?;
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
        println!(
            "compression at t = {}: {:.2}; at t = {}: {:.2}",
            steps[0].t,
            comp(0),
            steps[steps.len() - 1].t,
            comp(steps.len() - 1)
        );
    }
    Ok(())
}
