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
        match self {
            Storage::F32(v) => crate::pool::give(std::mem::take(v)),
            Storage::BF16(v) => crate::pool::give_bf16(std::mem::take(v)),
            Storage::F16(_) => {}
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
                bf16_to_f32(v, &mut out);
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
                let mut out = crate::pool::take_bf16(data.len());
                f32_to_bf16(&data, &mut out);
                crate::pool::give(data);
                Storage::BF16(out)
            }
        }
    }
}

/// Elements per parallel chunk of the bf16 conversions.
const CONVERT_CHUNK: usize = 1 << 15;

/// bf16 → f32 (exact: the bf16 bits are the f32's upper half). A plain
/// shift per element, which the compiler vectorises, in parallel chunks:
/// bf16 activations convert at every op, so this runs on every tensor.
pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    par_convert(src, dst, |v| f32::from_bits((v.to_bits() as u32) << 16));
}

/// `dst[i] = f(src[i])`, in parallel chunks of [`CONVERT_CHUNK`] when large.
fn par_convert<S: Copy + Sync, D: Send>(src: &[S], dst: &mut [D], f: impl Fn(S) -> D + Sync) {
    use rayon::prelude::*;
    let run = |(s, d): (&[S], &mut [D])| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = f(v);
        }
    };
    if src.len() > CONVERT_CHUNK {
        src.par_chunks(CONVERT_CHUNK)
            .zip(dst.par_chunks_mut(CONVERT_CHUNK))
            .for_each(run);
    } else {
        run((src, dst));
    }
}

/// f32 → bf16, round to nearest even, NaN kept quiet: bitwise what
/// `bf16::from_f32` does, written branch-free so it vectorises.
pub(crate) fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    par_convert(src, dst, f32_to_bf16_one);
}

/// One value of [`f32_to_bf16`] (inlined into vectorised loops).
#[inline(always)]
pub(crate) fn f32_to_bf16_one(x: f32) -> bf16 {
    let u = x.to_bits();
    let rounded = (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16;
    let nan = ((u >> 16) as u16) | 0x0040;
    let is_nan = u & 0x7FFF_FFFF > 0x7F80_0000;
    bf16::from_bits(if is_nan { nan } else { rounded })
}

/// A host tensor: a shape and a shared, immutable buffer. Cloning and
/// [`reshape`](dcdit_core::Backend::reshape) are O(1) (the buffer is shared).
#[derive(Clone)]
pub struct CpuTensor {
    pub(crate) shape: Shape,
    pub(crate) data: Arc<Storage>,
    /// Forms of `data` derived on first use, shared by clones.
    pub(crate) derived: Arc<Derived>,
}

/// Forms of a tensor's data derived on first use and kept with it. Tensors
/// are immutable (no op writes into an existing storage), so a derived form
/// stays valid for as long as the tensor's clones live, and is dropped with
/// them.
#[derive(Default)]
pub(crate) struct Derived {
    /// The data packed as a linear layer's weight for the AVX-512 register
    /// blocks (`linear512`), with the `(m, k)` it was packed as and the
    /// block kind's elements per word (1: f32, 2: bf16 pairs): a weight
    /// used at every forward is packed once instead of at every call (the
    /// packing pass over a cold 9 MB weight took ~1.5 ms of a 15 ms product
    /// on a 2-core Zen 4). Costs one more copy of each linear weight.
    #[cfg(target_arch = "x86_64")]
    pub(crate) linear_weight: std::sync::OnceLock<((usize, usize, usize), Vec<f32>)>,
}

impl Drop for Derived {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Some((_, v)) = self.linear_weight.take() {
            crate::pool::give(v);
        }
    }
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
            derived: Arc::default(),
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
            derived: Arc::default(),
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

#[cfg(test)]
mod convert_tests {
    use super::*;

    /// The fast conversions are bitwise `half`'s on every class of value.
    #[test]
    fn bf16_conversions_match_half() {
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001,
            0xFFFF_FFFF,
            0x7F7F_FFFF,
            0x0000_0001,
            0x807F_FFFF,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
        ];
        let mut s = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            bits.push((s >> 32) as u32);
        }
        let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![bf16::ZERO; xs.len()];
        f32_to_bf16(&xs, &mut got);
        for (g, &x) in got.iter().zip(&xs) {
            assert_eq!(
                g.to_bits(),
                bf16::from_f32(x).to_bits(),
                "{:#x}",
                x.to_bits()
            );
        }
        let mut back = vec![0.0f32; got.len()];
        bf16_to_f32(&got, &mut back);
        for (b, g) in back.iter().zip(&got) {
            assert_eq!(b.to_bits(), g.to_f32().to_bits());
        }
    }
}
