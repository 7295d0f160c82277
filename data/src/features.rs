//! The release's extracted ImageNet latents: `root/imagenet{size}_features/`
//! and `root/imagenet{size}_labels/`, one `.npy` per image, paired by file
//! name.
//!
//! The release's `extract_features.py` saves, for image number `k`,
//! `imagenet{size}_features/{k}.npy` = the SD-VAE latent times 0.18215 as
//! float32 of shape `(1, 4, size/8, size/8)`, and
//! `imagenet{size}_labels/{k}.npy` = the class as int64 of shape `(1,)`.
//! Its `train.py` lists both directories, sorts the names as strings and
//! squeezes the leading 1. [`FeatureDataset`] keeps that order (so `10.npy`
//! comes before `2.npy`, and index `i` means the same image as in the
//! release) and also accepts features of shape `(C, H, W)`, labels of shape
//! `()`, float16/float64 features and other integer label widths.
//!
//! ```
//! use dcdit_data::features::FeatureDataset;
//! use dcdit_data::npy::{write_npy_f32, write_npy_i64};
//! let root = std::env::temp_dir().join(format!("feat_doc_{}", std::process::id()));
//! for d in ["imagenet64_features", "imagenet64_labels"] {
//!     std::fs::create_dir_all(root.join(d)).unwrap();
//! }
//! write_npy_f32(root.join("imagenet64_features/0.npy"), &[1, 4, 8, 8], &[0.5; 256]).unwrap();
//! write_npy_i64(root.join("imagenet64_labels/0.npy"), &[1], &[207]).unwrap();
//! let ds = FeatureDataset::open(&root, 64).unwrap();
//! let (x, shape, y) = ds.get(0).unwrap();
//! assert_eq!((x.len(), shape, y), (256, [4, 8, 8], 207));
//! # std::fs::remove_dir_all(&root).unwrap();
//! ```

use crate::error::{Error, Result};
use crate::npy::read_npy;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One image's latent: values `(C, H, W)` row-major, the shape, the class.
pub type FeatureItem = (Vec<f32>, [usize; 3], usize);

/// An index of a feature directory pair; files are read on [`FeatureDataset::get`].
#[derive(Debug, Clone)]
pub struct FeatureDataset {
    features_dir: PathBuf,
    labels_dir: PathBuf,
    names: Vec<String>,
}

fn list_npy(dir: &Path) -> Result<BTreeSet<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list the directory", e))?;
    let mut out = BTreeSet::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, "list the directory", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Error::format(entry.path(), "file name is not valid UTF-8"));
        };
        if name.ends_with(".npy") {
            out.insert(name.to_string());
        }
    }
    Ok(out)
}

impl FeatureDataset {
    /// Opens `root/imagenet{size}_features` and `root/imagenet{size}_labels`.
    /// Errors when a directory is missing or unreadable, when it holds no
    /// `.npy` file, or when a feature file has no label file of the same
    /// name (or the other way round); each error names the file.
    pub fn open(root: impl AsRef<Path>, size: usize) -> Result<FeatureDataset> {
        let root = root.as_ref();
        let features_dir = root.join(format!("imagenet{size}_features"));
        let labels_dir = root.join(format!("imagenet{size}_labels"));
        let feats = list_npy(&features_dir)?;
        let labels = list_npy(&labels_dir)?;
        if let Some(missing) = feats.difference(&labels).next() {
            return Err(Error::format(
                labels_dir.join(missing),
                format!(
                    "missing: the feature file {} has no label file",
                    features_dir.join(missing).display()
                ),
            ));
        }
        if let Some(extra) = labels.difference(&feats).next() {
            return Err(Error::format(
                features_dir.join(extra),
                format!(
                    "missing: the label file {} has no feature file",
                    labels_dir.join(extra).display()
                ),
            ));
        }
        if feats.is_empty() {
            return Err(Error::format(&features_dir, "holds no .npy file"));
        }
        Ok(FeatureDataset {
            features_dir,
            labels_dir,
            // BTreeSet iterates in byte order, the order of Python's sorted().
            names: feats.into_iter().collect(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there is no image (never, for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// File names (`"{k}.npy"`) in index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The features directory.
    pub fn features_dir(&self) -> &Path {
        &self.features_dir
    }

    /// The labels directory.
    pub fn labels_dir(&self) -> &Path {
        &self.labels_dir
    }

    /// Reads image `i`: the latent as f32 `(C, H, W)`, its shape and its
    /// class. Errors (naming the file) on an index out of range, a non-float
    /// feature file, a feature shape other than `(1, C, H, W)` or `(C, H, W)`,
    /// a non-integer label, a label file with more than one value, a negative
    /// label, or a truncated/corrupt file.
    pub fn get(&self, i: usize) -> Result<FeatureItem> {
        let name = self.names.get(i).ok_or_else(|| {
            Error::input(format!(
                "feature index {i} out of range ({} images in {})",
                self.len(),
                self.features_dir.display()
            ))
        })?;
        let fpath = self.features_dir.join(name);
        let feat = read_npy(&fpath)?;
        let shape = match feat.shape.as_slice() {
            [1, c, h, w] | [c, h, w] => [*c, *h, *w],
            s => {
                return Err(Error::format(
                    &fpath,
                    format!("feature shape {s:?}, want (1, C, H, W) or (C, H, W)"),
                ))
            }
        };
        let x = feat.to_f32()?;
        let lpath = self.labels_dir.join(name);
        let lab = read_npy(&lpath)?;
        if lab.len() != 1 {
            return Err(Error::format(
                &lpath,
                format!("label shape {:?}, want (1,) or ()", lab.shape),
            ));
        }
        let y = lab.to_i64()?[0];
        let y =
            usize::try_from(y).map_err(|_| Error::format(&lpath, format!("negative label {y}")))?;
        Ok((x, shape, y))
    }
}
