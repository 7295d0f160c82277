//! Named host tensors and their safetensors encoding (f32, f16 or bf16 on
//! disk; f32 in memory).
//!
//! ```
//! use dcdit_core::weights::{HostTensor, TensorMap};
//! let mut m = TensorMap::default();
//! m.insert("w", HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
//! let bytes = m.to_safetensors(None).unwrap();
//! let back = TensorMap::from_safetensors(&bytes).unwrap();
//! assert_eq!(back.get("w").unwrap().data, vec![1.0, 2.0, 3.0, 4.0]);
//! ```

use crate::backend::DType;
use crate::error::{Error, Result};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A tensor in host memory, f32, with the dtype it was stored in.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
    /// Storage dtype on disk.
    pub stored: DType,
}

impl HostTensor {
    /// A new f32 tensor; errors when `data` does not fill `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::input(format!(
                "{} values do not fill shape {:?}",
                data.len(),
                shape
            )));
        }
        Ok(HostTensor {
            shape,
            data,
            stored: DType::F32,
        })
    }
}

/// Tensors by name, in key order, plus free-form string metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorMap {
    /// The tensors.
    pub tensors: BTreeMap<String, HostTensor>,
    /// safetensors `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
}

impl TensorMap {
    /// Parses a safetensors file's bytes. Truncated or corrupt files, and
    /// dtypes other than F32/F16/BF16, give an error naming the problem.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Format(format!("safetensors: {e:?}")))?;
        let mut out = TensorMap::default();
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Format(format!("safetensors: {e:?}")))?;
        if let Some(md) = meta.metadata() {
            for (k, v) in md {
                out.metadata.insert(k.clone(), v.clone());
            }
        }
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let raw = view.data();
            let (data, stored) = match view.dtype() {
                Dtype::F32 => (
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    DType::F32,
                ),
                Dtype::F16 => (
                    raw.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    DType::F16,
                ),
                Dtype::BF16 => (
                    raw.chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    DType::BF16,
                ),
                // Integer tensors (labels, timesteps) are accepted as values.
                Dtype::I64 => (
                    raw.chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                                as f32
                        })
                        .collect(),
                    DType::F32,
                ),
                Dtype::I32 => (
                    raw.chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                        .collect(),
                    DType::F32,
                ),
                other => {
                    return Err(Error::DType {
                        name,
                        got: format!("{other:?}"),
                    })
                }
            };
            out.tensors.insert(
                name,
                HostTensor {
                    shape,
                    data,
                    stored,
                },
            );
        }
        Ok(out)
    }

    /// Encodes as safetensors, every tensor in `dtype` (default f32).
    pub fn to_safetensors(&self, dtype: Option<DType>) -> Result<Vec<u8>> {
        let dtype = dtype.unwrap_or(DType::F32);
        let bufs: Vec<(&String, &HostTensor, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let bytes: Vec<u8> = match dtype {
                    DType::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    DType::F16 => t
                        .data
                        .iter()
                        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    DType::BF16 => t
                        .data
                        .iter()
                        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                (k, t, bytes)
            })
            .collect();
        let st_dtype = match dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        };
        let mut views = Vec::with_capacity(bufs.len());
        for (k, t, b) in &bufs {
            let v = TensorView::new(st_dtype, t.shape.clone(), b)
                .map_err(|e| Error::Format(format!("tensor `{k}`: {e:?}")))?;
            views.push(((*k).clone(), v));
        }
        // The map type is safetensors' own (std or hashbrown), so let inference pick it.
        let meta = (!self.metadata.is_empty()).then(|| {
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        safetensors::tensor::serialize(views, meta)
            .map_err(|e| Error::Format(format!("safetensors: {e:?}")))
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: &str, t: HostTensor) {
        self.tensors.insert(name.to_string(), t);
    }

    /// Looks a tensor up.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// The tensor `name`, checked against `shape`: a missing key or another
    /// shape is an error naming the key.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingKey(name.to_string()))?;
        if t.shape != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Errors on the first key not in `known` (checkpoints from another model).
    pub fn reject_unknown<'a>(&self, known: impl Fn(&str) -> bool + 'a) -> Result<()> {
        for k in self.tensors.keys() {
            if !known(k) {
                return Err(Error::UnexpectedKey(k.clone()));
            }
        }
        Ok(())
    }
}
