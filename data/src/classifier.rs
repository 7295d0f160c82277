//! A small MNIST classifier to judge generated digits: an MLP
//! 784 -> 256 -> 128 -> 10 with ReLU, forward and backward written out in
//! f32 on the host, trained with Adam on the training split of the bundled
//! digits (random shifts of up to 2 pixels as augmentation). Its penultimate
//! layer (128 features after ReLU) feeds a Fréchet distance between sets of
//! digits, an MNIST analogue of FID.
//!
//! The shipped weights (`data/classifier/mnist_mlp.safetensors`, f16) are
//! written by `cargo run -p dcdit-data --example train_classifier --release`.
//!
//! ```
//! use dcdit_data::classifier::Classifier;
//! use dcdit_data::mnist::Mnist;
//! let m = Mnist::load_bundled().unwrap();
//! let clf = Classifier::load_bundled().unwrap();
//! let (x, y) = m.batch_f32(&m.heldout_indices()[..100]).unwrap();
//! let pred = clf.predict(&x).unwrap();
//! let right = pred.iter().zip(&y).filter(|(p, y)| p == y).count();
//! assert!(right >= 90);
//! ```
//!
//! Inputs are images in [-1, 1] (`pixel / 127.5 - 1`, the diffusion model's
//! scale), 784 values each, row-major; the network's first layer sees
//! `(x + 1) / 2`.

use crate::error::{read_file, write_file, Error, Result};
use crate::mnist::Mnist;
use dcdit_core::weights::{HostTensor, TensorMap};
use dcdit_core::DType;
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use std::path::{Path, PathBuf};

/// Input width (28 x 28).
pub const INPUT_DIM: usize = 784;
/// First hidden width.
pub const HIDDEN1: usize = 256;
/// Second hidden width, the width of [`Classifier::features`].
pub const FEATURE_DIM: usize = 128;
/// Number of classes.
pub const CLASSES: usize = 10;

const LAYERS: [(usize, usize); 3] = [
    (INPUT_DIM, HIDDEN1),
    (HIDDEN1, FEATURE_DIM),
    (FEATURE_DIM, CLASSES),
];
const NAMES: [&str; 3] = ["fc1", "fc2", "fc3"];
const BATCH: usize = 64;
const EVAL_CHUNK: usize = 256;
const SHIFT: i32 = 2;

/// A small deterministic random number generator (SplitMix64), used for the
/// initialisation, the data order and the augmentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// Uniform integer in `0..n` (`n > 0`; returns 0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// One dense layer, weights stored `(in, out)` row-major in memory
/// (`(out, in)` on disk, as PyTorch's `nn.Linear`).
#[derive(Debug, Clone, PartialEq)]
struct Dense {
    din: usize,
    dout: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

/// `y += a * x`.
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Dot product with eight partial sums (vectorises).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Dense {
    fn init(din: usize, dout: usize, rng: &mut SplitMix64) -> Dense {
        let std = (2.0 / din as f32).sqrt();
        Dense {
            din,
            dout,
            w: (0..din * dout).map(|_| rng.normal() * std).collect(),
            b: vec![0.0; dout],
        }
    }

    /// `(n, din) -> (n, dout)`, skipping zero inputs (sparse digits, ReLU).
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * self.dout);
        for r in 0..n {
            out.extend_from_slice(&self.b);
            let o = &mut out[r * self.dout..];
            for (i, &xi) in x[r * self.din..(r + 1) * self.din].iter().enumerate() {
                if xi != 0.0 {
                    axpy(o, xi, &self.w[i * self.dout..(i + 1) * self.dout]);
                }
            }
        }
        out
    }

    /// Accumulates `dw`, `db` for input `x` and output gradient `dy`, and
    /// returns the input gradient when `want_dx`.
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        n: usize,
        grad: &mut Dense,
        want_dx: bool,
    ) -> Option<Vec<f32>> {
        for r in 0..n {
            let dyr = &dy[r * self.dout..(r + 1) * self.dout];
            axpy(&mut grad.b, 1.0, dyr);
            for (i, &xi) in x[r * self.din..(r + 1) * self.din].iter().enumerate() {
                if xi != 0.0 {
                    axpy(&mut grad.w[i * self.dout..(i + 1) * self.dout], xi, dyr);
                }
            }
        }
        want_dx.then(|| {
            let mut dx = vec![0.0; n * self.din];
            for r in 0..n {
                let dyr = &dy[r * self.dout..(r + 1) * self.dout];
                for i in 0..self.din {
                    dx[r * self.din + i] = dot(&self.w[i * self.dout..(i + 1) * self.dout], dyr);
                }
            }
            dx
        })
    }

    fn zeros_like(&self) -> Dense {
        Dense {
            din: self.din,
            dout: self.dout,
            w: vec![0.0; self.w.len()],
            b: vec![0.0; self.b.len()],
        }
    }
}

fn relu(v: &mut [f32]) {
    for x in v {
        *x = x.max(0.0);
    }
}

/// The MNIST classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    layers: [Dense; 3],
    /// Free-form notes (architecture, seed, epochs, accuracy...), saved as
    /// the one safetensors metadata entry `about` (one entry, so the file's
    /// bytes do not depend on a hash map's order).
    pub about: String,
}

/// Activations of one batch, kept for the backward pass.
struct Trace {
    u: Vec<f32>,
    a1: Vec<f32>,
    a2: Vec<f32>,
    logits: Vec<f32>,
}

fn check_images(images: &[f32]) -> Result<usize> {
    if !images.len().is_multiple_of(INPUT_DIM) {
        return Err(Error::input(format!(
            "{} values are not a whole number of 28x28 images",
            images.len()
        )));
    }
    Ok(images.len() / INPUT_DIM)
}

impl Classifier {
    /// A freshly initialised network (He-normal weights, zero biases).
    pub fn new(seed: u64) -> Classifier {
        let mut rng = SplitMix64::new(seed);
        let layers = LAYERS.map(|(i, o)| Dense::init(i, o, &mut rng));
        Classifier {
            layers,
            about: String::new(),
        }
    }

    /// The shipped weights, `data/classifier/mnist_mlp.safetensors` in this
    /// crate's directory.
    pub fn bundled_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("classifier")
            .join("mnist_mlp.safetensors")
    }

    /// Loads the shipped weights.
    pub fn load_bundled() -> Result<Classifier> {
        Classifier::load(Classifier::bundled_path())
    }

    /// Trains a new network on the training split of `mnist` (never the
    /// held-out digits) for `epochs` passes: Adam (lr 1e-3, cosine decay to
    /// 1e-5), batches of 64, random shifts of up to 2 pixels. Deterministic
    /// for a seed (single-threaded).
    pub fn train(mnist: &Mnist, epochs: usize, seed: u64) -> Result<Classifier> {
        Classifier::train_with_progress(mnist, epochs, seed, |_, _| {})
    }

    /// [`Classifier::train`], calling `progress(epoch, mean_loss)` after each
    /// epoch (epochs counted from 1).
    pub fn train_with_progress(
        mnist: &Mnist,
        epochs: usize,
        seed: u64,
        mut progress: impl FnMut(usize, f32),
    ) -> Result<Classifier> {
        if mnist.rows * mnist.cols != INPUT_DIM {
            return Err(Error::input(format!(
                "the classifier takes 28x28 digits, these are {}x{}",
                mnist.rows, mnist.cols
            )));
        }
        let train = mnist.train_indices();
        if train.is_empty() {
            return Err(Error::input("no training digits"));
        }
        let mut rng = SplitMix64::new(seed);
        let mut net = Classifier::new(rng.next_u64());
        let mut m = net.layers.clone().map(|l| l.zeros_like());
        let mut v = net.layers.clone().map(|l| l.zeros_like());
        let steps_per_epoch = train.len().div_ceil(BATCH);
        let total = (steps_per_epoch * epochs).max(1);
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let mut step = 0usize;
        let mut order = train.clone();
        let mut batch = vec![0.0f32; BATCH * INPUT_DIM];
        for epoch in 1..=epochs {
            // Fisher-Yates with the run's generator.
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let mut loss_sum = 0.0f64;
            for chunk in order.chunks(BATCH) {
                let n = chunk.len();
                let mut labels = Vec::with_capacity(n);
                for (r, &idx) in chunk.iter().enumerate() {
                    let (px, l) = mnist
                        .get(idx)
                        .ok_or_else(|| Error::input(format!("digit {idx} out of range")))?;
                    labels.push(l as usize);
                    let dx = rng.below(2 * SHIFT as usize + 1) as i32 - SHIFT;
                    let dy = rng.below(2 * SHIFT as usize + 1) as i32 - SHIFT;
                    shifted(px, dx, dy, &mut batch[r * INPUT_DIM..(r + 1) * INPUT_DIM]);
                }
                let trace = net.trace_u(&batch[..n * INPUT_DIM], n);
                let (loss, grads) = net.backward(&trace, &labels);
                loss_sum += loss as f64 * n as f64;
                step += 1;
                let progress_frac = (step - 1) as f32 / total as f32;
                let lr = 1e-5
                    + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f32::consts::PI * progress_frac).cos());
                let bc1 = 1.0 - b1.powi(step as i32);
                let bc2 = 1.0 - b2.powi(step as i32);
                for ((layer, g), (ml, vl)) in net
                    .layers
                    .iter_mut()
                    .zip(&grads)
                    .zip(m.iter_mut().zip(v.iter_mut()))
                {
                    let upd = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
                        for k in 0..p.len() {
                            m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                            v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                            p[k] -= lr * (m[k] / bc1) / ((v[k] / bc2).sqrt() + eps);
                        }
                    };
                    upd(&mut layer.w, &g.w, &mut ml.w, &mut vl.w);
                    upd(&mut layer.b, &g.b, &mut ml.b, &mut vl.b);
                }
            }
            let mean = (loss_sum / train.len() as f64) as f32;
            if !mean.is_finite() {
                return Err(Error::input(format!(
                    "training diverged at epoch {epoch} (loss {mean})"
                )));
            }
            progress(epoch, mean);
        }
        net.about = format!(
            "MNIST MLP 784-256-128-10 (ReLU) of dcdit-data; input (x + 1) / 2 for 28x28 \
             images x in [-1, 1], row-major; trained {epochs} epochs, seed {seed}, on the {} \
             digits of the training split, Adam lr 1e-3 cosine to 1e-5, batch {BATCH}, \
             shifts up to {SHIFT} px",
            train.len()
        );
        Ok(net)
    }

    /// Forward pass on inputs already mapped to [0, 1].
    fn trace_u(&self, u: &[f32], n: usize) -> Trace {
        let mut a1 = self.layers[0].forward(u, n);
        relu(&mut a1);
        let mut a2 = self.layers[1].forward(&a1, n);
        relu(&mut a2);
        let logits = self.layers[2].forward(&a2, n);
        Trace {
            u: u.to_vec(),
            a1,
            a2,
            logits,
        }
    }

    /// Mean cross-entropy and its gradients.
    fn backward(&self, tr: &Trace, labels: &[usize]) -> (f32, [Dense; 3]) {
        let n = labels.len();
        let mut dz = tr.logits.clone();
        let mut loss = 0.0f32;
        for (r, &y) in labels.iter().enumerate() {
            let z = &mut dz[r * CLASSES..(r + 1) * CLASSES];
            let mx = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0.0;
            for v in z.iter_mut() {
                *v = (*v - mx).exp();
                s += *v;
            }
            loss += -(z[y] / s).ln();
            for v in z.iter_mut() {
                *v /= s * n as f32;
            }
            z[y] -= 1.0 / n as f32;
        }
        let mut g = self.layers.clone().map(|l| l.zeros_like());
        let [g1, g2, g3] = &mut g;
        let mut da2 = self.layers[2]
            .backward(&tr.a2, &dz, n, g3, true)
            .unwrap_or_default();
        for (d, a) in da2.iter_mut().zip(&tr.a2) {
            if *a <= 0.0 {
                *d = 0.0;
            }
        }
        let mut da1 = self.layers[1]
            .backward(&tr.a1, &da2, n, g2, true)
            .unwrap_or_default();
        for (d, a) in da1.iter_mut().zip(&tr.a1) {
            if *a <= 0.0 {
                *d = 0.0;
            }
        }
        self.layers[0].backward(&tr.u, &da1, n, g1, false);
        (loss / n as f32, g)
    }

    /// Runs `f` on the (penultimate features, logits) of each chunk of images.
    fn run(&self, images: &[f32], mut f: impl FnMut(&[f32], &[f32])) -> Result<()> {
        check_images(images)?;
        for chunk in images.chunks(EVAL_CHUNK * INPUT_DIM) {
            let n = chunk.len() / INPUT_DIM;
            let u: Vec<f32> = chunk.iter().map(|x| (x + 1.0) * 0.5).collect();
            let tr = self.trace_u(&u, n);
            f(&tr.a2, &tr.logits);
        }
        Ok(())
    }

    /// Class scores `(N, 10)` for images `(N, 784)` in [-1, 1].
    pub fn logits(&self, images: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(images.len() / INPUT_DIM * CLASSES);
        self.run(images, |_, z| out.extend_from_slice(z))?;
        Ok(out)
    }

    /// The predicted digit of each image `(N, 784)` in [-1, 1].
    pub fn predict(&self, images: &[f32]) -> Result<Vec<u8>> {
        let z = self.logits(images)?;
        Ok(z.chunks_exact(CLASSES)
            .map(|r| {
                let mut best = 0;
                for k in 1..CLASSES {
                    if r[k] > r[best] {
                        best = k;
                    }
                }
                best as u8
            })
            .collect())
    }

    /// Penultimate-layer features `(N, 128)` (after ReLU) of images
    /// `(N, 784)` in [-1, 1], for [`frechet_distance`].
    pub fn features(&self, images: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(images.len() / INPUT_DIM * FEATURE_DIM);
        self.run(images, |a, _| out.extend_from_slice(a))?;
        Ok(out)
    }

    /// Fraction of the digits `indices` of `mnist` classified right.
    pub fn accuracy(&self, mnist: &Mnist, indices: &[usize]) -> Result<f32> {
        if indices.is_empty() {
            return Err(Error::input("accuracy over no digit"));
        }
        let (x, y) = mnist.batch_f32(indices)?;
        let p = self.predict(&x)?;
        let right = p.iter().zip(&y).filter(|(a, b)| a == b).count();
        Ok(right as f32 / indices.len() as f32)
    }

    /// The weights as named tensors, PyTorch layout: `fc{1,2,3}.weight`
    /// `(out, in)` and `fc{1,2,3}.bias` `(out,)`, with [`Classifier::about`]
    /// as metadata `about` (when not empty).
    pub fn to_tensor_map(&self) -> Result<TensorMap> {
        let mut map = TensorMap::default();
        for (l, name) in self.layers.iter().zip(NAMES) {
            let mut wt = vec![0.0f32; l.w.len()];
            for i in 0..l.din {
                for o in 0..l.dout {
                    wt[o * l.din + i] = l.w[i * l.dout + o];
                }
            }
            map.insert(
                &format!("{name}.weight"),
                HostTensor::new(vec![l.dout, l.din], wt)?,
            );
            map.insert(
                &format!("{name}.bias"),
                HostTensor::new(vec![l.dout], l.b.clone())?,
            );
        }
        if !self.about.is_empty() {
            map.metadata.insert("about".into(), self.about.clone());
        }
        Ok(map)
    }

    /// Reads the tensors of [`Classifier::to_tensor_map`]; a missing tensor,
    /// a wrong shape or a non-finite value is an error.
    pub fn from_tensor_map(map: &TensorMap) -> Result<Classifier> {
        let mut layers = Vec::with_capacity(3);
        for ((din, dout), name) in LAYERS.into_iter().zip(NAMES) {
            let wname = format!("{name}.weight");
            let bname = format!("{name}.bias");
            let wt = map.expect(&wname, &[dout, din])?;
            let b = map.expect(&bname, &[dout])?;
            if wt.data.iter().chain(&b.data).any(|v| !v.is_finite()) {
                return Err(Error::input(format!("`{name}` holds non-finite values")));
            }
            let mut w = vec![0.0f32; din * dout];
            for o in 0..dout {
                for i in 0..din {
                    w[i * dout + o] = wt.data[o * din + i];
                }
            }
            layers.push(Dense {
                din,
                dout,
                w,
                b: b.data.clone(),
            });
        }
        let layers: [Dense; 3] = layers
            .try_into()
            .map_err(|_| Error::input("classifier needs three layers"))?;
        for key in map.tensors.keys() {
            if !NAMES
                .iter()
                .any(|n| key == &format!("{n}.weight") || key == &format!("{n}.bias"))
            {
                return Err(dcdit_core::Error::UnexpectedKey(key.clone()).into());
            }
        }
        Ok(Classifier {
            layers,
            about: map.metadata.get("about").cloned().unwrap_or_default(),
        })
    }

    /// Saves as safetensors with f16 storage (about 470 KB).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self
            .to_tensor_map()?
            .to_safetensors(Some(DType::F16))
            .map_err(|e| Error::Core {
                path: Some(path.to_path_buf()),
                source: e,
            })?;
        write_file(path, &bytes)
    }

    /// Loads weights written by [`Classifier::save`] (f32, f16 or bf16).
    /// Errors name the file and the problem.
    pub fn load(path: impl AsRef<Path>) -> Result<Classifier> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let wrap = |e: Error| match e {
            Error::Core { path: None, source } => Error::Core {
                path: Some(path.to_path_buf()),
                source,
            },
            Error::Input(m) => Error::format(path, m),
            e => e,
        };
        let map = TensorMap::from_safetensors(&bytes).map_err(|e| wrap(e.into()))?;
        Classifier::from_tensor_map(&map).map_err(wrap)
    }
}

/// Writes digit `px` (u8) shifted by `(dx, dy)` pixels into `out` as [0, 1]
/// values, zero-filled.
fn shifted(px: &[u8], dx: i32, dy: i32, out: &mut [f32]) {
    out.fill(0.0);
    for r in 0..28i32 {
        let sr = r - dy;
        if !(0..28).contains(&sr) {
            continue;
        }
        for c in 0..28i32 {
            let sc = c - dx;
            if (0..28).contains(&sc) {
                out[(r * 28 + c) as usize] = px[(sr * 28 + sc) as usize] as f32 / 255.0;
            }
        }
    }
}

/// Mean and covariance of a set of feature vectors, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Feature width.
    pub dim: usize,
    /// Number of vectors.
    pub count: usize,
    /// Mean, `dim` values.
    pub mean: Vec<f64>,
    /// Covariance (unbiased, divided by `count - 1`), `dim x dim` row-major.
    pub cov: Vec<f64>,
}

impl FeatureStats {
    /// Statistics of `feats`, `(N, dim)` row-major. Errors when `dim` is 0,
    /// the length is not a multiple of `dim`, there are fewer than two
    /// vectors, or a value is not finite.
    pub fn from_features(feats: &[f32], dim: usize) -> Result<FeatureStats> {
        if dim == 0 || !feats.len().is_multiple_of(dim) {
            return Err(Error::input(format!(
                "{} feature values are not rows of width {dim}",
                feats.len()
            )));
        }
        let n = feats.len() / dim;
        if n < 2 {
            return Err(Error::input(format!(
                "a covariance needs at least 2 feature vectors, got {n}"
            )));
        }
        if feats.iter().any(|v| !v.is_finite()) {
            return Err(Error::input("feature set holds non-finite values"));
        }
        let mut mean = vec![0.0f64; dim];
        for row in feats.chunks_exact(dim) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        for m in &mut mean {
            *m /= n as f64;
        }
        let mut cov = vec![0.0f64; dim * dim];
        let mut centred = vec![0.0f64; dim];
        for row in feats.chunks_exact(dim) {
            for k in 0..dim {
                centred[k] = row[k] as f64 - mean[k];
            }
            for i in 0..dim {
                let ci = centred[i];
                if ci != 0.0 {
                    for j in i..dim {
                        cov[i * dim + j] += ci * centred[j];
                    }
                }
            }
        }
        for i in 0..dim {
            for j in i..dim {
                let v = cov[i * dim + j] / (n - 1) as f64;
                cov[i * dim + j] = v;
                cov[j * dim + i] = v;
            }
        }
        Ok(FeatureStats {
            dim,
            count: n,
            mean,
            cov,
        })
    }

    /// The Fréchet distance between the Gaussians `N(mean, cov)` of `self`
    /// and `other`:
    /// `|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1^1/2 S2 S1^1/2))`,
    /// with the square roots from symmetric eigendecompositions (negative
    /// round-off eigenvalues clamped to 0). Errors when the widths differ.
    pub fn frechet_distance(&self, other: &FeatureStats) -> Result<f64> {
        if self.dim != other.dim {
            return Err(Error::input(format!(
                "feature widths differ: {} vs {}",
                self.dim, other.dim
            )));
        }
        let d = self.dim;
        let s1 = DMatrix::from_row_slice(d, d, &self.cov);
        let s2 = DMatrix::from_row_slice(d, d, &other.cov);
        let e1 = SymmetricEigen::new(s1.clone());
        let sqrt_vals = DVector::from_iterator(d, e1.eigenvalues.iter().map(|l| l.max(0.0).sqrt()));
        let s1h =
            &e1.eigenvectors * DMatrix::from_diagonal(&sqrt_vals) * e1.eigenvectors.transpose();
        let m = &s1h * &s2 * &s1h;
        let m = (&m + m.transpose()) * 0.5;
        let tr_sqrt: f64 = SymmetricEigen::new(m)
            .eigenvalues
            .iter()
            .map(|l| l.max(0.0).sqrt())
            .sum();
        let dmu: f64 = self
            .mean
            .iter()
            .zip(&other.mean)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        let fd = dmu + s1.trace() + s2.trace() - 2.0 * tr_sqrt;
        if !fd.is_finite() {
            return Err(Error::input("Fréchet distance is not finite"));
        }
        Ok(fd.max(0.0))
    }
}

/// The Fréchet distance between two sets of feature vectors `(Na, dim)` and
/// `(Nb, dim)` (e.g. [`Classifier::features`] of real and generated digits);
/// see [`FeatureStats::frechet_distance`].
///
/// ```
/// use dcdit_data::classifier::frechet_distance;
/// // 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with sample statistics.
/// let a = [0.0f32, 2.0]; // mean 1, variance 2
/// let b = [3.0f32, 5.0]; // mean 4, variance 2
/// assert!((frechet_distance(&a, &b, 1).unwrap() - 9.0).abs() < 1e-9);
/// ```
pub fn frechet_distance(feats_a: &[f32], feats_b: &[f32], dim: usize) -> Result<f64> {
    let a = FeatureStats::from_features(feats_a, dim)?;
    let b = FeatureStats::from_features(feats_b, dim)?;
    a.frechet_distance(&b)
}
