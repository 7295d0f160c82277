//! A small reader and writer for NumPy `.npy` files (format versions 1, 2
//! and 3), enough for the release's feature files: numeric dtypes (`f2`,
//! `f4`, `f8`, `i1`..`i8`, `u1`..`u8`, `b1`), either byte order, C order.
//!
//! ```
//! use dcdit_data::npy::{read_npy, write_npy_f32};
//! let dir = std::env::temp_dir().join(format!("npy_doc_{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let p = dir.join("a.npy");
//! write_npy_f32(&p, &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
//! let a = read_npy(&p).unwrap();
//! assert_eq!(a.shape, vec![2, 3]);
//! assert_eq!(a.to_f32().unwrap()[4], 4.0);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use crate::error::{read_file, write_file, Error, Result};
use std::path::{Path, PathBuf};

const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The element kind of a `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// IEEE float (`f`).
    Float,
    /// Signed integer (`i`).
    Int,
    /// Unsigned integer (`u`).
    Uint,
    /// Boolean (`b`), one byte.
    Bool,
}

/// A `.npy` array: its shape, dtype and little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Shape, outermost first (empty for a 0-d array).
    pub shape: Vec<usize>,
    /// Element kind.
    pub kind: Kind,
    /// Bytes per element.
    pub item_size: usize,
    /// The `descr` string as written in the file (e.g. `<f4`).
    pub descr: String,
    /// Element bytes, converted to little-endian.
    pub bytes: Vec<u8>,
    /// The file, named in conversion errors.
    pub path: PathBuf,
}

impl NpyArray {
    /// Number of elements (1 for a 0-d array).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the array holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32. Only float dtypes (`f2`, `f4`, `f8`) convert;
    /// anything else is an error naming the file and dtype.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = &self.bytes;
        match (self.kind, self.item_size) {
            (Kind::Float, 4) => Ok(b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            (Kind::Float, 2) => Ok(b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            (Kind::Float, 8) => Ok(b
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_le_bytes(a) as f32
                })
                .collect()),
            _ => Err(Error::format(
                &self.path,
                format!(
                    "dtype `{}` is not a float array (want float32, also accepted: float16, float64)",
                    self.descr
                ),
            )),
        }
    }

    /// The values as i64. Only integer dtypes convert (an unsigned value above
    /// `i64::MAX` is an error); anything else is an error naming the file.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = &self.bytes;
        let s = self.item_size;
        match self.kind {
            Kind::Int | Kind::Uint if matches!(s, 1 | 2 | 4 | 8) => {
                let mut out = Vec::with_capacity(self.len());
                for c in b.chunks_exact(s) {
                    let mut a = [0u8; 8];
                    a[..s].copy_from_slice(c);
                    let v = if self.kind == Kind::Int {
                        // Sign-extend.
                        let shift = 64 - 8 * s as u32;
                        ((u64::from_le_bytes(a) << shift) as i64) >> shift
                    } else {
                        let u = u64::from_le_bytes(a);
                        i64::try_from(u).map_err(|_| {
                            Error::format(&self.path, format!("value {u} does not fit in i64"))
                        })?
                    };
                    out.push(v);
                }
                Ok(out)
            }
            _ => Err(Error::format(
                &self.path,
                format!(
                    "dtype `{}` is not an integer array (want int64, also accepted: other integer widths)",
                    self.descr
                ),
            )),
        }
    }
}

/// Reads a `.npy` file. Bad magic, an unknown version, a malformed header,
/// an unsupported dtype, Fortran order or a data section that does not match
/// the shape (truncated or too long) are errors naming the file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    parse_npy(&bytes, path)
}

/// Parses the bytes of a `.npy` file; `path` names it in errors.
pub fn parse_npy(bytes: &[u8], path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let bad = |m: String| Error::format(path, m);
    if bytes.len() < 10 || &bytes[..6] != NPY_MAGIC {
        return Err(bad(
            "not a .npy file (bad magic or shorter than its preamble)".into(),
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated .npy preamble".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => {
            return Err(bad(format!(
                ".npy format version {major}.{minor} is not supported"
            )))
        }
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad(format!("truncated .npy header (declares {hlen} bytes)")))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("the .npy header is not text".into()))?;
    let descr = dict_str(header, "descr").ok_or_else(|| {
        bad(format!(
            "no simple `descr` in the .npy header (structured dtypes are not supported): {}",
            header.trim()
        ))
    })?;
    let fortran = dict_raw(header, "fortran_order")
        .ok_or_else(|| bad("no `fortran_order` in the .npy header".into()))?;
    if fortran.starts_with("True") {
        return Err(bad(
            "Fortran-order arrays are not supported (save a C-contiguous array)".into(),
        ));
    }
    if !fortran.starts_with("False") {
        return Err(bad(format!(
            "bad `fortran_order` value in the .npy header: {fortran}"
        )));
    }
    let shape = dict_shape(header)
        .ok_or_else(|| bad(format!("bad `shape` in the .npy header: {}", header.trim())))?;

    let (order, rest) = match descr.as_bytes().first() {
        Some(b'<') | Some(b'>') | Some(b'|') | Some(b'=') => (&descr[..1], &descr[1..]),
        _ => ("=", descr.as_str()),
    };
    let mut chars = rest.chars();
    let kind = match chars.next() {
        Some('f') => Kind::Float,
        Some('i') => Kind::Int,
        Some('u') => Kind::Uint,
        Some('b') => Kind::Bool,
        _ => return Err(bad(format!("unsupported dtype `{descr}`"))),
    };
    let item_size: usize = chars
        .as_str()
        .parse()
        .map_err(|_| bad(format!("unsupported dtype `{descr}`")))?;
    let ok_size = match kind {
        Kind::Float => matches!(item_size, 2 | 4 | 8),
        Kind::Int | Kind::Uint => matches!(item_size, 1 | 2 | 4 | 8),
        Kind::Bool => item_size == 1,
    };
    if !ok_size {
        return Err(bad(format!("unsupported dtype `{descr}`")));
    }
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(item_size))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let data = &bytes[end..];
    if data.len() != n {
        return Err(bad(format!(
            "{}: shape {shape:?} of `{descr}` needs {n} data bytes, the file has {}",
            if data.len() < n {
                "truncated"
            } else {
                "trailing bytes"
            },
            data.len()
        )));
    }
    let mut data = data.to_vec();
    let big = order == ">" || (order == "=" && cfg!(target_endian = "big"));
    if big && item_size > 1 {
        for c in data.chunks_exact_mut(item_size) {
            c.reverse();
        }
    }
    Ok(NpyArray {
        shape,
        kind,
        item_size,
        descr,
        bytes: data,
        path: path.to_path_buf(),
    })
}

/// The raw text after `'key':` in a header dict.
fn dict_raw<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let after = &header[at + key.len() + 2..];
    let colon = after.find(':')?;
    Some(after[colon + 1..].trim_start())
}

/// A quoted string value in a header dict.
fn dict_str(header: &str, key: &str) -> Option<String> {
    let raw = dict_raw(header, key)?;
    let q = raw.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let end = raw[1..].find(q)?;
    Some(raw[1..1 + end].to_string())
}

/// The `shape` tuple of a header dict.
fn dict_shape(header: &str) -> Option<Vec<usize>> {
    let raw = dict_raw(header, "shape")?;
    let inner = raw.strip_prefix('(')?;
    let close = inner.find(')')?;
    inner[..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> Result<()> {
    let shape_txt = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending with '\n'.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let hlen = u16::try_from(header.len()).map_err(|_| Error::input("npy header too long"))?;
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    write_file(path, &out)
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(Error::input(format!(
            "{len} values do not fill shape {shape:?}"
        )));
    }
    Ok(())
}

/// Writes an f32 array as a version-1 `.npy` file (`<f4`, C order), as
/// `np.save` does.
pub fn write_npy_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    check_len(shape, data.len())?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path.as_ref(), "<f4", shape, &bytes)
}

/// Writes an i64 array as a version-1 `.npy` file (`<i8`, C order), as
/// `np.save` does for the release's labels.
pub fn write_npy_i64(path: impl AsRef<Path>, shape: &[usize], data: &[i64]) -> Result<()> {
    check_len(shape, data.len())?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path.as_ref(), "<i8", shape, &bytes)
}
