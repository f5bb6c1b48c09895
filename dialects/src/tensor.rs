//! Runtime tensors: a shape and a typed, row-major buffer.
//!
//! The reference interpreter computes on these. Floating-point ops usually go through
//! [`Tensor::to_f64`] / [`Tensor::from_f64`] (exact for every float type kiln holds, and
//! rounded once on the way back), integer ops through [`Tensor::to_i64`], so one op body
//! serves every element type; hot ops (Conv, MatMul, Gemm) specialize on `f32`.

use crate::lowp::{self, pattern_from_f64, pattern_to_f64, E8M0Round, Lowp};
use crate::types::{DType, Shape};
use half::{bf16, f16};

/// Typed storage of a tensor's elements, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    /// Low-precision types: one bit pattern per byte (see [`crate::lowp`]).
    F8E4M3FN(Vec<lowp::F8E4M3FN>),
    F8E4M3FNUZ(Vec<lowp::F8E4M3FNUZ>),
    F8E5M2(Vec<lowp::F8E5M2>),
    F8E5M2FNUZ(Vec<lowp::F8E5M2FNUZ>),
    F8E8M0(Vec<lowp::F8E8M0>),
    F4E2M1(Vec<lowp::F4E2M1>),
    U4(Vec<lowp::U4>),
    I4(Vec<lowp::I4>),
    U2(Vec<lowp::U2>),
    I2(Vec<lowp::I2>),
}

/// Applies `$body` to the vector inside any variant of [`Data`], binding it to `$v`.
/// With `str $s => $str`, string data binds to the pattern `$s` and evaluates `$str` instead
/// (for bodies that need numeric elements).
#[macro_export]
macro_rules! for_each_data {
    ($data:expr, $v:ident => $body:expr) => {
        $crate::for_each_data!($data, $v => $body, str $v => $body)
    };
    ($data:expr, $v:ident => $body:expr, str $s:pat => $str:expr) => {
        match $data {
            $crate::tensor::Data::F16($v) => $body,
            $crate::tensor::Data::BF16($v) => $body,
            $crate::tensor::Data::F32($v) => $body,
            $crate::tensor::Data::F64($v) => $body,
            $crate::tensor::Data::I8($v) => $body,
            $crate::tensor::Data::I16($v) => $body,
            $crate::tensor::Data::I32($v) => $body,
            $crate::tensor::Data::I64($v) => $body,
            $crate::tensor::Data::U8($v) => $body,
            $crate::tensor::Data::U16($v) => $body,
            $crate::tensor::Data::U32($v) => $body,
            $crate::tensor::Data::U64($v) => $body,
            $crate::tensor::Data::Bool($v) => $body,
            $crate::tensor::Data::F8E4M3FN($v) => $body,
            $crate::tensor::Data::F8E4M3FNUZ($v) => $body,
            $crate::tensor::Data::F8E5M2($v) => $body,
            $crate::tensor::Data::F8E5M2FNUZ($v) => $body,
            $crate::tensor::Data::F8E8M0($v) => $body,
            $crate::tensor::Data::F4E2M1($v) => $body,
            $crate::tensor::Data::U4($v) => $body,
            $crate::tensor::Data::I4($v) => $body,
            $crate::tensor::Data::U2($v) => $body,
            $crate::tensor::Data::I2($v) => $body,
            $crate::tensor::Data::Str($s) => $str,
        }
    };
}

/// Rebuilds a [`Data`] of the same variant as `$data` from `$body`, a `Vec` built from the bound
/// vector (gather, slice, transpose, ...: it may only move, copy or drop elements). With
/// `str $s => $str`, string data binds to `$s` and `$str` (a `Data`, or diverging) is used.
#[macro_export]
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        $crate::map_data!($data, $v => $body, str $v => $crate::tensor::Data::Str($body))
    };
    ($data:expr, $v:ident => $body:expr, str $s:pat => $str:expr) => {
        match $data {
            $crate::tensor::Data::F16($v) => $crate::tensor::Data::F16($body),
            $crate::tensor::Data::BF16($v) => $crate::tensor::Data::BF16($body),
            $crate::tensor::Data::F32($v) => $crate::tensor::Data::F32($body),
            $crate::tensor::Data::F64($v) => $crate::tensor::Data::F64($body),
            $crate::tensor::Data::I8($v) => $crate::tensor::Data::I8($body),
            $crate::tensor::Data::I16($v) => $crate::tensor::Data::I16($body),
            $crate::tensor::Data::I32($v) => $crate::tensor::Data::I32($body),
            $crate::tensor::Data::I64($v) => $crate::tensor::Data::I64($body),
            $crate::tensor::Data::U8($v) => $crate::tensor::Data::U8($body),
            $crate::tensor::Data::U16($v) => $crate::tensor::Data::U16($body),
            $crate::tensor::Data::U32($v) => $crate::tensor::Data::U32($body),
            $crate::tensor::Data::U64($v) => $crate::tensor::Data::U64($body),
            $crate::tensor::Data::Bool($v) => $crate::tensor::Data::Bool($body),
            $crate::tensor::Data::F8E4M3FN($v) => $crate::tensor::Data::F8E4M3FN($body),
            $crate::tensor::Data::F8E4M3FNUZ($v) => $crate::tensor::Data::F8E4M3FNUZ($body),
            $crate::tensor::Data::F8E5M2($v) => $crate::tensor::Data::F8E5M2($body),
            $crate::tensor::Data::F8E5M2FNUZ($v) => $crate::tensor::Data::F8E5M2FNUZ($body),
            $crate::tensor::Data::F8E8M0($v) => $crate::tensor::Data::F8E8M0($body),
            $crate::tensor::Data::F4E2M1($v) => $crate::tensor::Data::F4E2M1($body),
            $crate::tensor::Data::U4($v) => $crate::tensor::Data::U4($body),
            $crate::tensor::Data::I4($v) => $crate::tensor::Data::I4($body),
            $crate::tensor::Data::U2($v) => $crate::tensor::Data::U2($body),
            $crate::tensor::Data::I2($v) => $crate::tensor::Data::I2($body),
            $crate::tensor::Data::Str($s) => $str,
        }
    };
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::I8(_) => DType::I8,
            Data::I16(_) => DType::I16,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
            Data::U8(_) => DType::U8,
            Data::U16(_) => DType::U16,
            Data::U32(_) => DType::U32,
            Data::U64(_) => DType::U64,
            Data::Bool(_) => DType::Bool,
            Data::Str(_) => DType::String,
            Data::F8E4M3FN(_) => DType::F8E4M3FN,
            Data::F8E4M3FNUZ(_) => DType::F8E4M3FNUZ,
            Data::F8E5M2(_) => DType::F8E5M2,
            Data::F8E5M2FNUZ(_) => DType::F8E5M2FNUZ,
            Data::F8E8M0(_) => DType::F8E8M0,
            Data::F4E2M1(_) => DType::F4E2M1,
            Data::U4(_) => DType::U4,
            Data::I4(_) => DType::I4,
            Data::U2(_) => DType::U2,
            Data::I2(_) => DType::I2,
        }
    }

    pub fn len(&self) -> usize {
        for_each_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` zero (false, empty-string) elements of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> Data {
        match dtype {
            DType::F16 => Data::F16(vec![f16::ZERO; n]),
            DType::BF16 => Data::BF16(vec![bf16::ZERO; n]),
            DType::F32 => Data::F32(vec![0.0; n]),
            DType::F64 => Data::F64(vec![0.0; n]),
            DType::I8 => Data::I8(vec![0; n]),
            DType::I16 => Data::I16(vec![0; n]),
            DType::I32 => Data::I32(vec![0; n]),
            DType::I64 => Data::I64(vec![0; n]),
            DType::U8 => Data::U8(vec![0; n]),
            DType::U16 => Data::U16(vec![0; n]),
            DType::U32 => Data::U32(vec![0; n]),
            DType::U64 => Data::U64(vec![0; n]),
            DType::Bool => Data::Bool(vec![false; n]),
            DType::String => Data::Str(vec![String::new(); n]),
            // E8M0 has no zero: its pattern 0 is the smallest value, 2^-127.
            t => Data::from_patterns(t, vec![0; n]).unwrap_or(Data::U8(vec![0; n])),
        }
    }

    /// Builds data of a low-precision type (float8, float4, 4-bit and 2-bit integers) from
    /// bit patterns, one per byte (bits above the type's width are dropped); `None` for other
    /// types.
    pub fn from_patterns(dtype: DType, p: Vec<u8>) -> Option<Data> {
        fn conv<const K: u8>(p: Vec<u8>) -> Vec<Lowp<K>> {
            p.into_iter().map(Lowp::from_bits).collect()
        }
        Some(match dtype {
            DType::F8E4M3FN => Data::F8E4M3FN(conv(p)),
            DType::F8E4M3FNUZ => Data::F8E4M3FNUZ(conv(p)),
            DType::F8E5M2 => Data::F8E5M2(conv(p)),
            DType::F8E5M2FNUZ => Data::F8E5M2FNUZ(conv(p)),
            DType::F8E8M0 => Data::F8E8M0(conv(p)),
            DType::F4E2M1 => Data::F4E2M1(conv(p)),
            DType::U4 => Data::U4(conv(p)),
            DType::I4 => Data::I4(conv(p)),
            DType::U2 => Data::U2(conv(p)),
            DType::I2 => Data::I2(conv(p)),
            _ => return None,
        })
    }

    /// The bit patterns of low-precision data, one per byte; `None` for other types.
    pub fn patterns(&self) -> Option<Vec<u8>> {
        fn bits<const K: u8>(v: &[Lowp<K>]) -> Vec<u8> {
            v.iter().map(|x| x.0).collect()
        }
        Some(match self {
            Data::F8E4M3FN(v) => bits(v),
            Data::F8E4M3FNUZ(v) => bits(v),
            Data::F8E5M2(v) => bits(v),
            Data::F8E5M2FNUZ(v) => bits(v),
            Data::F8E8M0(v) => bits(v),
            Data::F4E2M1(v) => bits(v),
            Data::U4(v) => bits(v),
            Data::I4(v) => bits(v),
            Data::U2(v) => bits(v),
            Data::I2(v) => bits(v),
            _ => return None,
        })
    }

    /// The elements as little-endian bytes, `size_bytes()` per element (bools and
    /// low-precision types one byte each, unpacked); empty for strings.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.len() * self.dtype().size_bytes());
        macro_rules! put {
            ($v:expr) => {
                $v.iter().for_each(|x| raw.extend_from_slice(&x.to_le_bytes()))
            };
        }
        match self {
            Data::F16(v) => put!(v),
            Data::BF16(v) => put!(v),
            Data::F32(v) => put!(v),
            Data::F64(v) => put!(v),
            Data::I8(v) => put!(v),
            Data::I16(v) => put!(v),
            Data::I32(v) => put!(v),
            Data::I64(v) => put!(v),
            Data::U8(v) => raw.extend_from_slice(v),
            Data::U16(v) => put!(v),
            Data::U32(v) => put!(v),
            Data::U64(v) => put!(v),
            Data::Bool(v) => raw.extend(v.iter().map(|&b| b as u8)),
            Data::Str(_) => {}
            d => raw.extend(d.patterns().unwrap_or_default()),
        }
        raw
    }

    /// The inverse of [`Data::to_le_bytes`]: `None` for strings, or when `raw` is not a whole
    /// number of elements.
    pub fn from_le_bytes(dtype: DType, raw: &[u8]) -> Option<Data> {
        let size = dtype.size_bytes();
        if dtype == DType::String || !raw.len().is_multiple_of(size) {
            return None;
        }
        macro_rules! le {
            ($t:ty) => {
                raw.chunks_exact(size)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of size_bytes")))
                    .collect()
            };
        }
        Some(match dtype {
            DType::F16 => Data::F16(le!(f16)),
            DType::BF16 => Data::BF16(le!(bf16)),
            DType::F32 => Data::F32(le!(f32)),
            DType::F64 => Data::F64(le!(f64)),
            DType::I8 => Data::I8(le!(i8)),
            DType::I16 => Data::I16(le!(i16)),
            DType::I32 => Data::I32(le!(i32)),
            DType::I64 => Data::I64(le!(i64)),
            DType::U8 => Data::U8(raw.to_vec()),
            DType::U16 => Data::U16(le!(u16)),
            DType::U32 => Data::U32(le!(u32)),
            DType::U64 => Data::U64(le!(u64)),
            DType::Bool => Data::Bool(raw.iter().map(|&b| b != 0).collect()),
            t => Data::from_patterns(t, raw.to_vec())?,
        })
    }
}

/// A tensor value at run time.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Shape,
    pub data: Data,
}

/// Largest tensor the interpreter allocates (elements); bigger requests are reported, not attempted.
pub const MAX_ELEMENTS: u128 = 1 << 32;

impl Tensor {
    /// Builds a tensor; the caller guarantees `data.len()` equals the product of `shape`.
    pub fn new(shape: Shape, data: Data) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?}");
        Tensor { shape, data }
    }

    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor::new(shape.to_vec(), Data::zeros(dtype, shape.iter().product()))
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor::new(vec![], Data::F32(vec![v]))
    }

    pub fn from_f32(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::F32(v))
    }

    pub fn from_i64(shape: &[usize], v: Vec<i64>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::I64(v))
    }

    pub fn from_bool(shape: &[usize], v: Vec<bool>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::Bool(v))
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Same data, new shape (element count must match).
    pub fn reshaped(mut self, shape: Shape) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), self.len());
        self.shape = shape;
        self
    }

    /// Every element as f64 (bools as 0/1; strings are an error for the caller to avoid).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::I8(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I16(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U8(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U16(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
            Data::Str(v) => v.iter().map(|s| s.parse().unwrap_or(f64::NAN)).collect(),
            _ => {
                let t = self.dtype();
                self.data.patterns().unwrap_or_default().into_iter().map(|b| pattern_to_f64(t, b)).collect()
            }
        }
    }

    /// Every element as i64 (floats truncated toward zero, saturating; u64 wraps).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            Data::F16(v) => v.iter().map(|x| x.to_f64() as i64).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64() as i64).collect(),
            Data::F32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::F64(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I64(v) => v.clone(),
            Data::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U64(v) => v.iter().map(|&x| x as i64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            Data::Str(v) => v.iter().map(|s| s.parse().unwrap_or(0)).collect(),
            _ => match self.dtype().small_int() {
                Some(si) => self.data.patterns().unwrap_or_default().into_iter().map(|b| si.wrap(b as i64)).collect(),
                None => self.to_f64().into_iter().map(|x| x as i64).collect(),
            },
        }
    }

    /// Every element as bool (nonzero is true).
    pub fn to_bool(&self) -> Vec<bool> {
        match &self.data {
            Data::Bool(v) => v.clone(),
            Data::Str(v) => v.iter().map(|s| !s.is_empty()).collect(),
            _ => self.to_f64().into_iter().map(|x| x != 0.0).collect(),
        }
    }

    /// Builds a tensor of `dtype` from f64 values, rounding/saturating as a C cast would
    /// (float→int truncates toward zero; NaN becomes 0). float8 types saturate (ONNX Cast's
    /// default), E8M0 rounds up; 4-bit and 2-bit integers wrap as `ml_dtypes` does.
    pub fn from_f64(dtype: DType, shape: &[usize], v: Vec<f64>) -> Tensor {
        Tensor::from_f64_with(dtype, shape, v, true, E8M0Round::Up)
    }

    /// [`Tensor::from_f64`] with ONNX Cast's `saturate` (float8 types: clamp out-of-range
    /// values to the largest finite one, else they become Inf/NaN) and `round_mode` (E8M0).
    pub fn from_f64_with(dtype: DType, shape: &[usize], v: Vec<f64>, saturate: bool, round: E8M0Round) -> Tensor {
        if dtype.is_low_precision_float() || dtype.small_int().is_some() {
            let p = v.iter().map(|&x| pattern_from_f64(dtype, x, saturate, round)).collect();
            return Tensor::new(shape.to_vec(), Data::from_patterns(dtype, p).unwrap_or(Data::U8(vec![])));
        }
        let data = match dtype {
            DType::F16 => Data::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::BF16 => Data::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::F32 => Data::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => Data::F64(v),
            DType::I8 => Data::I8(v.iter().map(|&x| x as i8).collect()),
            DType::I16 => Data::I16(v.iter().map(|&x| x as i16).collect()),
            DType::I32 => Data::I32(v.iter().map(|&x| x as i32).collect()),
            DType::I64 => Data::I64(v.iter().map(|&x| x as i64).collect()),
            DType::U8 => Data::U8(v.iter().map(|&x| x as u8).collect()),
            DType::U16 => Data::U16(v.iter().map(|&x| x as u16).collect()),
            DType::U32 => Data::U32(v.iter().map(|&x| x as u32).collect()),
            DType::U64 => Data::U64(v.iter().map(|&x| x as u64).collect()),
            DType::Bool => Data::Bool(v.iter().map(|&x| x != 0.0).collect()),
            DType::String => Data::Str(v.iter().map(|x| format_float_string(*x)).collect()),
            _ => Data::zeros(dtype, v.len()),
        };
        Tensor::new(shape.to_vec(), data)
    }

    /// Builds a tensor of `dtype` from i64 values, wrapping as a C cast would.
    pub fn from_i64_as(dtype: DType, shape: &[usize], v: Vec<i64>) -> Tensor {
        let data = match dtype {
            DType::I8 => Data::I8(v.iter().map(|&x| x as i8).collect()),
            DType::I16 => Data::I16(v.iter().map(|&x| x as i16).collect()),
            DType::I32 => Data::I32(v.iter().map(|&x| x as i32).collect()),
            DType::I64 => Data::I64(v),
            DType::U8 => Data::U8(v.iter().map(|&x| x as u8).collect()),
            DType::U16 => Data::U16(v.iter().map(|&x| x as u16).collect()),
            DType::U32 => Data::U32(v.iter().map(|&x| x as u32).collect()),
            DType::U64 => Data::U64(v.iter().map(|&x| x as u64).collect()),
            DType::Bool => Data::Bool(v.iter().map(|&x| x != 0).collect()),
            DType::String => Data::Str(v.iter().map(|x| x.to_string()).collect()),
            t if t.small_int().is_some() => {
                Data::from_patterns(t, v.iter().map(|&x| x as u8).collect()).unwrap_or(Data::U8(vec![]))
            }
            _ => return Tensor::from_f64(dtype, shape, v.into_iter().map(|x| x as f64).collect()),
        };
        Tensor::new(shape.to_vec(), data)
    }

    /// The f32 buffer, if this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// A scalar (or single-element tensor) as f64.
    pub fn scalar_value_f64(&self) -> Option<f64> {
        (self.len() == 1).then(|| self.to_f64()[0])
    }

    /// A scalar (or single-element tensor) as i64.
    pub fn scalar_value_i64(&self) -> Option<i64> {
        (self.len() == 1).then(|| self.to_i64()[0])
    }

    /// Gathers elements by flat index into a new tensor of `shape`, for any dtype.
    #[allow(clippy::clone_on_copy)]
    pub fn gather_flat(&self, shape: Shape, idx: &[usize]) -> Tensor {
        let data = map_data!(&self.data, v => idx.iter().map(|&i| v[i].clone()).collect());
        Tensor::new(shape, data)
    }
}

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// For each element of `out_shape`, the flat index into a tensor of `in_shape` broadcast to it.
pub fn broadcast_index(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let n: usize = out_shape.iter().product();
    let rank = out_shape.len();
    let off = rank - in_shape.len();
    let in_strides = strides(in_shape);
    // Effective stride of each output axis into the input (0 where broadcast).
    let eff: Vec<usize> =
        (0..rank).map(|i| if i < off || in_shape[i - off] == 1 { 0 } else { in_strides[i - off] }).collect();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; rank];
    let mut flat = 0usize;
    for _ in 0..n {
        out.push(flat);
        for ax in (0..rank).rev() {
            idx[ax] += 1;
            flat += eff[ax];
            if idx[ax] < out_shape[ax] {
                break;
            }
            flat -= eff[ax] * idx[ax];
            idx[ax] = 0;
        }
    }
    out
}

/// Formats a float the way ONNX's Cast-to-string does for common values.
fn format_float_string(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 {
            "INF".into()
        } else {
            "-INF".into()
        }
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_index_repeats_rows() {
        assert_eq!(broadcast_index(&[3], &[2, 3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_index(&[2, 1], &[2, 3]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast_index(&[], &[2]), vec![0, 0]);
    }

    #[test]
    fn casts_round_and_saturate_like_c() {
        let t = Tensor::from_f64(DType::I32, &[3], vec![1.7, -1.7, 3.0]);
        assert_eq!(t.to_i64(), vec![1, -1, 3]);
        let h = Tensor::from_f64(DType::F16, &[1], vec![1.0 / 3.0]);
        assert!((h.to_f64()[0] - 0.33325).abs() < 1e-4);
    }
}
