//! (Re)trains the MNIST classifier on the training split of the bundled
//! digits and writes the shipped weights, then reports the held-out accuracy
//! and Fréchet distances.
//!
//! ```sh
//! cargo run -p dcdit-data --example train_classifier --release -- [--epochs 30] [--seed 1] [--out PATH]
//! ```
//!
//! Deterministic for a seed; the default output is
//! `data/classifier/mnist_mlp.safetensors`.

use dcdit_data::classifier::{frechet_distance, Classifier, SplitMix64, FEATURE_DIM};
use dcdit_data::mnist::Mnist;
use std::path::PathBuf;

/// Default epochs and seed of the shipped weights.
const EPOCHS: usize = 30;
const SEED: u64 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut epochs = EPOCHS;
    let mut seed = SEED;
    let mut out = Classifier::bundled_path();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--epochs" => epochs = val()?.parse()?,
            "--seed" => seed = val()?.parse()?,
            "--out" => out = PathBuf::from(val()?),
            _ => {
                return Err(
                    format!("unknown argument {a} (--epochs N, --seed S, --out PATH)").into(),
                )
            }
        }
    }
    let mnist = Mnist::load_bundled()?;
    println!(
        "training on {} digits, {} held out, {epochs} epochs, seed {seed}",
        mnist.train_indices().len(),
        mnist.heldout_indices().len()
    );
    let start = std::time::Instant::now();
    let mut clf = Classifier::train_with_progress(&mnist, epochs, seed, |e, loss| {
        println!(
            "epoch {e:3}  loss {loss:.4}  ({:.1} s)",
            start.elapsed().as_secs_f32()
        );
    })?;
    let heldout = mnist.heldout_indices();
    let train_acc = clf.accuracy(&mnist, &mnist.train_indices())?;
    let acc = clf.accuracy(&mnist, &heldout)?;
    clf.about
        .push_str(&format!("; held-out accuracy {:.2}% (f32)", 100.0 * acc));
    clf.save(&out)?;
    // Report with the weights as stored (f16).
    let clf = Classifier::load(&out)?;
    let acc16 = clf.accuracy(&mnist, &heldout)?;
    let size = std::fs::metadata(&out)?.len();
    println!("wrote {} ({size} bytes)", out.display());
    println!("train accuracy {:.2}%", 100.0 * train_acc);
    println!(
        "held-out accuracy {:.2}% (f32 {:.2}%)",
        100.0 * acc16,
        100.0 * acc
    );

    let (x, _) = mnist.batch_f32(&heldout)?;
    let feats = clf.features(&x)?;
    let half = feats.len() / 2;
    let fd_halves = frechet_distance(&feats[..half], &feats[half..], FEATURE_DIM)?;
    let mut rng = SplitMix64::new(7);
    let noise: Vec<f32> = (0..x.len()).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let fd_noise = frechet_distance(&feats, &clf.features(&noise)?, FEATURE_DIM)?;
    let (train_x, _) = mnist.batch_f32(&mnist.train_indices()[..heldout.len()])?;
    let fd_train = frechet_distance(&feats, &clf.features(&train_x)?, FEATURE_DIM)?;
    println!("Fréchet distance, held-out halves (500 vs 500): {fd_halves:.3}");
    println!("Fréchet distance, held-out vs 1000 training digits: {fd_train:.3}");
    println!("Fréchet distance, held-out vs uniform noise images: {fd_noise:.3}");
    Ok(())
}
