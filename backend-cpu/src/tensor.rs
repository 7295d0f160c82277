//! The CPU tensor: a shape and a reference-counted host buffer in one of three
//! storage precisions.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use dcdit_core::backend::DType;
use dcdit_core::{Error, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use smallvec::SmallVec;

/// Shape of a [`CpuTensor`] (outermost dimension first).
pub type Shape = SmallVec<[usize; 4]>;

/// Host storage of a [`CpuTensor`]. Reduced-precision storage is real: the
/// buffer holds 16-bit values and ops convert them to f32 on read.
#[derive(Clone, PartialEq)]
pub enum Storage {
    /// IEEE single precision.
    F32(Vec<f32>),
    /// IEEE half precision.
    F16(Vec<f16>),
    /// bfloat16.
    BF16(Vec<bf16>),
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Storage::F32(v) = self {
            crate::pool::give(std::mem::take(v));
        }
    }
}

impl Storage {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Storage precision.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// The values as f32: borrowed for f32 storage, converted otherwise.
    pub fn as_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Storage::F32(v) => Cow::Borrowed(v.as_slice()),
            Storage::F16(v) => {
                let mut out = crate::pool::take(v.len());
                v.as_slice().convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
            Storage::BF16(v) => {
                let mut out = crate::pool::take(v.len());
                v.as_slice().convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Stores f32 values in the given precision (round to nearest even).
    pub fn from_f32_vec(data: Vec<f32>, dtype: DType) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(data),
            DType::F16 => {
                let mut out = vec![f16::ZERO; data.len()];
                out.as_mut_slice().convert_from_f32_slice(&data);
                Storage::F16(out)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; data.len()];
                out.as_mut_slice().convert_from_f32_slice(&data);
                Storage::BF16(out)
            }
        }
    }
}

/// A host tensor: a shape and a shared, immutable buffer. Cloning and
/// [`reshape`](dcdit_core::Backend::reshape) are O(1) (the buffer is shared).
#[derive(Clone)]
pub struct CpuTensor {
    pub(crate) shape: Shape,
    pub(crate) data: Arc<Storage>,
}

impl fmt::Debug for CpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuTensor")
            .field("shape", &self.shape.as_slice())
            .field("dtype", &self.dtype())
            .finish()
    }
}

/// Product of a shape's dimensions, or an error on overflow.
pub(crate) fn numel_of(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| Error::input(format!("shape {shape:?}: element count overflows")))
    })
}

impl CpuTensor {
    /// Wraps a storage buffer; errors when its length does not match `shape`.
    pub fn new(data: Storage, shape: &[usize]) -> Result<Self> {
        let n = numel_of(shape)?;
        if n != data.len() {
            return Err(Error::input(format!(
                "cpu tensor: shape {shape:?} holds {n} elements but the buffer has {}",
                data.len()
            )));
        }
        Ok(CpuTensor {
            shape: Shape::from_slice(shape),
            data: Arc::new(data),
        })
    }

    /// An f32 tensor from a host vector (no copy).
    pub fn from_f32_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::new(Storage::F32(data), shape)
    }

    /// An f16 tensor from a host vector (no copy).
    pub fn from_f16_vec(data: Vec<f16>, shape: &[usize]) -> Result<Self> {
        Self::new(Storage::F16(data), shape)
    }

    /// A bf16 tensor from a host vector (no copy).
    pub fn from_bf16_vec(data: Vec<bf16>, shape: &[usize]) -> Result<Self> {
        Self::new(Storage::BF16(data), shape)
    }

    /// Builds a tensor from f32 results stored in `dtype` (internal: the shape
    /// is known to match).
    pub(crate) fn from_result(data: Vec<f32>, shape: &[usize], dtype: DType) -> Self {
        debug_assert_eq!(numel_of(shape).ok(), Some(data.len()));
        CpuTensor {
            shape: Shape::from_slice(shape),
            data: Arc::new(Storage::from_f32_vec(data, dtype)),
        }
    }

    /// Shape (outermost first).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Storage precision.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The underlying storage.
    pub fn storage(&self) -> &Storage {
        &self.data
    }

    /// The buffer when stored as f32 (no copy), `None` otherwise.
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        match &*self.data {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The values as f32: borrowed for f32 storage, converted otherwise.
    pub fn to_f32_cow(&self) -> Cow<'_, [f32]> {
        self.data.as_f32()
    }

    /// The tensor seen as a row-major matrix `(rows, cols)`: `cols` is the
    /// last dimension (1 for a scalar), `rows` the product of the others.
    pub fn dims2(&self) -> (usize, usize) {
        match self.shape.split_last() {
            None => (1, 1),
            Some((&c, rest)) => (rest.iter().product(), c),
        }
    }
}
