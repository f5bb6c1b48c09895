//! Element types, dimensions and tensor types.
//!
//! A tensor type is printed the MLIR way: `tensor<1x3x224x224xf32>`. Symbolic dimensions
//! print as `?` and keep their names in the type's encoding attribute, so that
//! `tensor<?x128xf32, ["batch"]>` is still valid builtin MLIR and round-trips through kiln's
//! parser with the name intact. A tensor of unknown rank prints as `tensor<*xf32>`.

use std::fmt;
use std::sync::Arc;

/// Every ONNX tensor element type kiln represents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    String,
    /// float8 E4M3, finite (no Inf; NaN is S.1111.111).
    F8E4M3FN,
    /// float8 E4M3, finite, unsigned zero (0x80 is NaN).
    F8E4M3FNUZ,
    /// float8 E5M2 (IEEE-like, with Inf and NaN).
    F8E5M2,
    /// float8 E5M2, finite, unsigned zero.
    F8E5M2FNUZ,
    /// float8 E8M0: an unsigned power-of-two scale (0xFF is NaN).
    F8E8M0,
    /// float4 E2M1 (no Inf, no NaN).
    F4E2M1,
    U4,
    I4,
    U2,
    I2,
}

impl DType {
    /// All element types, in a stable order.
    pub const ALL: [DType; 24] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
        DType::String,
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0,
        DType::F4E2M1,
        DType::U4,
        DType::I4,
        DType::U2,
        DType::I2,
    ];

    /// The MLIR spelling of the element type (`f32`, `ui8`, `i1`, `!kiln.string`).
    pub fn mlir_name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "ui8",
            DType::U16 => "ui16",
            DType::U32 => "ui32",
            DType::U64 => "ui64",
            DType::Bool => "i1",
            DType::String => "!kiln.string",
            DType::F8E4M3FN => "f8E4M3FN",
            DType::F8E4M3FNUZ => "f8E4M3FNUZ",
            DType::F8E5M2 => "f8E5M2",
            DType::F8E5M2FNUZ => "f8E5M2FNUZ",
            DType::F8E8M0 => "f8E8M0FNU",
            DType::F4E2M1 => "f4E2M1FN",
            DType::U4 => "ui4",
            DType::I4 => "i4",
            DType::U2 => "ui2",
            DType::I2 => "i2",
        }
    }

    /// Parses an MLIR element type spelling.
    pub fn from_mlir_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.mlir_name() == s)
    }

    /// The ONNX name (`float`, `int64`, ...), for messages.
    pub fn onnx_name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float",
            DType::F64 => "double",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
            DType::String => "string",
            DType::F8E4M3FN => "float8e4m3fn",
            DType::F8E4M3FNUZ => "float8e4m3fnuz",
            DType::F8E5M2 => "float8e5m2",
            DType::F8E5M2FNUZ => "float8e5m2fnuz",
            DType::F8E8M0 => "float8e8m0",
            DType::F4E2M1 => "float4e2m1",
            DType::U4 => "uint4",
            DType::I4 => "int4",
            DType::U2 => "uint2",
            DType::I2 => "int2",
        }
    }

    /// The ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::String => 8,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
            DType::F8E4M3FN => 17,
            DType::F8E4M3FNUZ => 18,
            DType::F8E5M2 => 19,
            DType::F8E5M2FNUZ => 20,
            DType::U4 => 21,
            DType::I4 => 22,
            DType::F4E2M1 => 23,
            DType::F8E8M0 => 24,
            DType::U2 => 25,
            DType::I2 => 26,
        }
    }

    /// The element type of an ONNX `TensorProto.DataType` code, if kiln represents it
    /// (complex and float6 types are not represented).
    pub fn from_onnx_code(code: i64) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.onnx_code() as i64 == code)
    }

    /// The ONNX name of a `TensorProto.DataType` code, including types kiln does not represent.
    pub fn onnx_code_name(code: i64) -> String {
        const OTHER: [(i64, &str); 5] =
            [(0, "undefined"), (14, "complex64"), (15, "complex128"), (27, "float6e2m3"), (28, "float6e3m2")];
        match DType::from_onnx_code(code) {
            Some(d) => d.onnx_name().to_string(),
            None => OTHER.iter().find(|(c, _)| *c == code).map_or(format!("data type {code}"), |(_, n)| n.to_string()),
        }
    }

    /// Size of one element in bytes as kiln stores it (strings count as a pointer; the 4-bit
    /// and 2-bit types take one byte each, unpacked).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 => 1,
            DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F8E8M0 => 1,
            DType::F4E2M1 | DType::U4 | DType::I4 | DType::U2 | DType::I2 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 | DType::String => 8,
        }
    }

    /// Width of one element in bits (4 and 2 for the sub-byte types; strings as a pointer).
    pub fn bit_width(self) -> usize {
        match self {
            DType::F4E2M1 | DType::U4 | DType::I4 => 4,
            DType::U2 | DType::I2 => 2,
            _ => self.size_bytes() * 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64) || self.is_low_precision_float()
    }

    /// The float8 and float4 types (stored as bit patterns, one per byte).
    pub fn is_low_precision_float(self) -> bool {
        matches!(
            self,
            DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F8E8M0 | DType::F4E2M1
        )
    }

    /// The sign/exponent/mantissa format of a float8/float4 type (not E8M0).
    pub fn minifloat(self) -> Option<crate::lowp::Minifloat> {
        use crate::lowp::Minifloat;
        Some(match self {
            DType::F8E4M3FN => Minifloat::E4M3FN,
            DType::F8E4M3FNUZ => Minifloat::E4M3FNUZ,
            DType::F8E5M2 => Minifloat::E5M2,
            DType::F8E5M2FNUZ => Minifloat::E5M2FNUZ,
            DType::F4E2M1 => Minifloat::E2M1,
            _ => return None,
        })
    }

    /// The width and signedness of a 4-bit or 2-bit integer type.
    pub fn small_int(self) -> Option<crate::lowp::SmallInt> {
        use crate::lowp::SmallInt;
        Some(match self {
            DType::I4 => SmallInt::I4,
            DType::U4 => SmallInt::U4,
            DType::I2 => SmallInt::I2,
            DType::U2 => SmallInt::U2,
            _ => return None,
        })
    }

    pub fn is_int(self) -> bool {
        self.is_signed_int() || self.is_unsigned_int()
    }

    pub fn is_signed_int(self) -> bool {
        matches!(self, DType::I8 | DType::I16 | DType::I32 | DType::I64 | DType::I4 | DType::I2)
    }

    pub fn is_unsigned_int(self) -> bool {
        matches!(self, DType::U8 | DType::U16 | DType::U32 | DType::U64 | DType::U4 | DType::U2)
    }

    /// Numeric types: everything but bool and string.
    pub fn is_numeric(self) -> bool {
        self.is_float() || self.is_int()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.onnx_name())
    }
}

/// One dimension of a tensor type: a known size or a named symbol bound at run time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(u64),
    Sym(Arc<str>),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(Arc::from(name))
    }

    pub fn known(self: &Dim) -> Option<u64> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// The type of a tensor value: element type and shape (None: rank unknown).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> TensorType {
        TensorType { dtype, shape: Some(shape) }
    }

    /// A type with every dimension known.
    pub fn known(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.iter().map(|&d| Dim::Known(d as u64)).collect())
    }

    pub fn unranked(dtype: DType) -> TensorType {
        TensorType { dtype, shape: None }
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// The shape when every dimension is known.
    pub fn static_shape(&self) -> Option<Vec<usize>> {
        self.shape.as_ref()?.iter().map(|d| d.known().map(|n| n as usize)).collect()
    }

    /// Number of elements when static.
    pub fn num_elements(&self) -> Option<u128> {
        let s = self.shape.as_ref()?;
        let mut n: u128 = 1;
        for d in s {
            n = n.checked_mul(d.known()? as u128)?;
        }
        Some(n)
    }
}

impl fmt::Display for TensorType {
    /// MLIR builtin tensor syntax, with symbolic names in the encoding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor<")?;
        match &self.shape {
            None => f.write_str("*x")?,
            Some(shape) => {
                for d in shape {
                    match d {
                        Dim::Known(n) => write!(f, "{n}x")?,
                        Dim::Sym(_) => f.write_str("?x")?,
                    }
                }
            }
        }
        f.write_str(self.dtype.mlir_name())?;
        if let Some(shape) = &self.shape {
            let syms: Vec<&str> = shape
                .iter()
                .filter_map(|d| match d {
                    Dim::Sym(s) => Some(&**s),
                    Dim::Known(_) => None,
                })
                .collect();
            if !syms.is_empty() {
                f.write_str(", [")?;
                for (i, s) in syms.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    crate::printer::write_string_literal(f, s)?;
                }
                f.write_str("]")?;
            }
        }
        f.write_str(">")
    }
}

/// Shape of a tensor value at run time.
pub type Shape = Vec<usize>;

/// Numpy-style multidirectional broadcasting of two static shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Shape> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db {
            da
        } else if da == 1 {
            db
        } else if db == 1 {
            da
        } else {
            return None;
        };
    }
    Some(out)
}

/// Broadcasting of symbolic shapes; `fresh` names a dimension that cannot be decided statically.
pub fn broadcast_dims(a: &[Dim], b: &[Dim], fresh: &mut dyn FnMut() -> Dim) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    let one = Dim::Known(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n { &a[i + a.len() - n] } else { &one };
        let db = if i + b.len() >= n { &b[i + b.len() - n] } else { &one };
        out.push(match (da, db) {
            (x, y) if x == y => x.clone(),
            (Dim::Known(1), y) => y.clone(),
            (x, Dim::Known(1)) => x.clone(),
            (Dim::Known(_), Dim::Known(_)) => return None,
            (Dim::Known(k), Dim::Sym(_)) | (Dim::Sym(_), Dim::Known(k)) => Dim::Known(*k),
            (Dim::Sym(_), Dim::Sym(_)) => fresh(),
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_mlir_tensor_types() {
        let t = TensorType::new(DType::F32, vec![Dim::sym("N"), Dim::Known(128)]);
        assert_eq!(t.to_string(), "tensor<?x128xf32, [\"N\"]>");
        assert_eq!(TensorType::known(DType::U8, &[1, 3]).to_string(), "tensor<1x3xui8>");
        assert_eq!(TensorType::known(DType::Bool, &[]).to_string(), "tensor<i1>");
        assert_eq!(TensorType::unranked(DType::F16).to_string(), "tensor<*xf16>");
    }

    #[test]
    fn broadcasts_like_numpy() {
        assert_eq!(broadcast_shapes(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shapes(&[2], &[3]), None);
        assert_eq!(broadcast_shapes(&[], &[5]), Some(vec![5]));
    }
}
