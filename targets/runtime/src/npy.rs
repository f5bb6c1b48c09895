//! A minimal `.npy` reader and writer: little-endian float (f2, f4, f8), signed and unsigned
//! integer (1 to 8 bytes) and bool arrays, C order, format versions 1 to 3.

use crate::Error;
use kiln_ir::{DType, Data, Tensor};
use std::path::Path;

/// Elements of an array: f32, bools as one byte each (0 or 1), or any other element type as
/// kiln-ir's little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum Elements {
    F32(Vec<f32>),
    Bool(Vec<u8>),
    Raw(DType, Vec<u8>),
}

/// A row-major array.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Elements,
}

/// `.npy` element types and kiln's names of them (MLIR's, as plans name them).
const DESCRS: [(&str, DType); 12] = [
    ("<f4", DType::F32),
    ("<f8", DType::F64),
    ("<f2", DType::F16),
    ("|i1", DType::I8),
    ("<i2", DType::I16),
    ("<i4", DType::I32),
    ("<i8", DType::I64),
    ("|u1", DType::U8),
    ("<u2", DType::U16),
    ("<u4", DType::U32),
    ("<u8", DType::U64),
    ("|b1", DType::Bool),
];

impl Array {
    pub fn f32(shape: &[usize], v: Vec<f32>) -> Array {
        Array { shape: shape.to_vec(), data: Elements::F32(v) }
    }

    /// The element type as kiln's plans name it (MLIR's name: `f32`, `i64`, `i1` for bool).
    pub fn dtype(&self) -> &'static str {
        self.element_type().mlir_name()
    }

    pub fn element_type(&self) -> DType {
        match &self.data {
            Elements::F32(_) => DType::F32,
            Elements::Bool(_) => DType::Bool,
            Elements::Raw(d, _) => *d,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as little-endian bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match &self.data {
            Elements::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Elements::Bool(v) => v.clone(),
            Elements::Raw(_, v) => v.clone(),
        }
    }

    /// An array of `shape` and element type `dtype` (a plan's name: `f32`, `i1`, `i64`, ...)
    /// from little-endian bytes.
    pub fn from_bytes(shape: &[usize], dtype: &str, raw: &[u8]) -> Array {
        let data = match DType::from_mlir_name(dtype) {
            Some(DType::F32) | None => {
                Elements::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Some(DType::Bool) => Elements::Bool(raw.to_vec()),
            Some(d) => Elements::Raw(d, raw.to_vec()),
        };
        Array { shape: shape.to_vec(), data }
    }

    /// The array as a kiln-ir tensor (`None` when its bytes are not whole elements).
    pub fn to_tensor(&self) -> Option<Tensor> {
        let data = Data::from_le_bytes(self.element_type(), &self.bytes())?;
        (data.len() == self.len()).then(|| Tensor::new(self.shape.clone(), data))
    }

    /// A kiln-ir tensor as an array (strings have no bytes: an empty array of their shape).
    pub fn from_tensor(t: &Tensor) -> Array {
        Array::from_bytes(&t.shape, t.dtype().mlir_name(), &t.data.to_le_bytes())
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error(format!("{}: not a .npy file kiln reads: {why}", path.display()))
}

/// The value of `key` in the header dict's text (`'key': value`), up to the next top-level comma.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
    Some(rest[..end].trim())
}

/// Reads an `.npy` array of one of the element types in [`DESCRS`].
pub fn read(path: &Path) -> Result<Array, Error> {
    let raw = std::fs::read(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
    if raw.len() < 10 || &raw[..6] != b"\x93NUMPY" {
        return Err(bad(path, "no .npy magic"));
    }
    let (len, start) = match raw[6] {
        1 => (u16::from_le_bytes([raw[8], raw[9]]) as usize, 10),
        2 | 3 if raw.len() >= 12 => (u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize, 12),
        v => return Err(bad(path, format!("format version {v}"))),
    };
    let header = raw.get(start..start + len).ok_or_else(|| bad(path, "truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad(path, "header is not text"))?;
    let descr = field(header, "descr").ok_or_else(|| bad(path, "no descr"))?.trim_matches(['\'', '"']);
    if field(header, "fortran_order") != Some("False") {
        return Err(bad(path, "Fortran order (write it C-contiguous)"));
    }
    let shape_text = field(header, "shape").ok_or_else(|| bad(path, "no shape"))?;
    let shape: Vec<usize> = shape_text
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(path, format!("shape {shape_text}"))))
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let body = &raw[start + len..];
    let Some(dtype) = descr_type(descr) else {
        let known: Vec<&str> = DESCRS.iter().map(|(d, _)| *d).collect();
        return Err(bad(path, format!("element type {descr} (kiln-gpu-run reads {})", known.join(" "))));
    };
    let size = dtype.size_bytes();
    if body.len() != n * size {
        return Err(bad(path, format!("{} data bytes for shape {shape:?}, expected {}", body.len(), n * size)));
    }
    Ok(Array::from_bytes(&shape, dtype.mlir_name(), body))
}

/// The `.npy` type descriptor of element type `t` (`<f4`, `|b1`, ...), if `.npy` has one that
/// kiln reads and writes.
pub fn descr(t: DType) -> Option<&'static str> {
    DESCRS.iter().find(|(_, d)| *d == t).map(|(descr, _)| *descr)
}

/// The element type of `.npy` type descriptor `descr`; a one-byte type may carry either byte
/// order mark (`<i1` is `|i1`).
pub fn descr_type(descr: &str) -> Option<DType> {
    let descr = if descr.len() == 3 && descr.ends_with('1') { format!("|{}", &descr[1..]) } else { descr.to_string() };
    DESCRS.iter().find(|(d, _)| *d == descr).map(|&(_, t)| t)
}

/// An `.npy` file (version 1, C order) of element type `t`, `shape` and the elements' `data`
/// (little-endian bytes, row-major); `None` when `.npy` has no element type `t` ([`descr`]).
pub fn encode(t: DType, shape: &[usize], data: &[u8]) -> Option<Vec<u8>> {
    let descr = descr(t)?;
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    Some(out)
}

/// Writes `a` as an `.npy` file (version 1).
pub fn write(path: &Path, a: &Array) -> Result<(), Error> {
    let t = a.element_type();
    let out = encode(t, &a.shape, &a.bytes())
        .ok_or_else(|| Error(format!("{}: .npy has no element type {t}", path.display())))?;
    std::fs::write(path, out).map_err(|e| Error(format!("{}: {e}", path.display())))
}

/// Where `got` and `want` differ most: `None` when every element is within `atol + rtol ·
/// |want|` (NaN matches NaN, infinities match themselves); else a message naming the worst
/// element (its index), both values and how many differ.
pub fn mismatch(got: &Array, want: &Array, rtol: f32, atol: f32) -> Option<String> {
    if got.shape != want.shape {
        return Some(format!("shape {:?}, expected {:?}", got.shape, want.shape));
    }
    if got.element_type() != want.element_type() {
        return Some(format!("element type {}, expected {}", got.dtype(), want.dtype()));
    }
    let values = |a: &Array| a.to_tensor().map(|t| t.to_f64());
    let (Some(g), Some(w)) = (values(got), values(want)) else {
        return Some(format!("{} bytes do not hold {:?} {} elements", got.bytes().len(), got.shape, got.dtype()));
    };
    // Integers and bools match exactly.
    let exact = !got.element_type().is_float();
    let (rtol, atol) = if exact { (0.0, 0.0) } else { (f64::from(rtol), f64::from(atol)) };
    let mut worst: Option<(usize, f64)> = None;
    let mut bad = 0;
    for (i, (x, y)) in g.iter().zip(&w).enumerate() {
        let excess = if x.is_nan() && y.is_nan() || x == y {
            0.0
        } else if x.is_nan() || y.is_nan() || x.is_infinite() || y.is_infinite() {
            f64::INFINITY
        } else {
            (x - y).abs() - (atol + rtol * y.abs())
        };
        if excess > 0.0 {
            bad += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    let (i, _) = worst?;
    let mut index = vec![0; got.shape.len()];
    let mut rest = i;
    for d in (0..index.len()).rev() {
        index[d] = rest % got.shape[d].max(1);
        rest /= got.shape[d].max(1);
    }
    Some(format!(
        "{bad} of {} elements differ beyond atol {atol} + rtol {rtol}; worst at {index:?}: {} vs {} expected",
        g.len(),
        g[i],
        w[i]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips_f32_and_bool_and_names_the_worst_element() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Array::f32(&[2, 3], vec![0.0, 1.5, -2.0, 3.25, f32::NAN, 1e-9]);
        write(&dir.join("a.npy"), &a).unwrap();
        let back = read(&dir.join("a.npy")).unwrap();
        assert_eq!(back.shape, a.shape);
        assert_eq!(mismatch(&back, &a, 0.0, 0.0), None);
        let b = Array { shape: vec![4], data: Elements::Bool(vec![1, 0, 0, 1]) };
        write(&dir.join("b.npy"), &b).unwrap();
        assert_eq!(read(&dir.join("b.npy")).unwrap(), b);
        let mut c = a.clone();
        if let Elements::F32(v) = &mut c.data {
            v[3] = 3.5;
            v[1] = 1.5001;
        }
        let why = mismatch(&c, &a, 1e-3, 1e-4).expect("a mismatch");
        assert!(why.contains("1 of 6") && why.contains("[1, 0]") && why.contains("3.5 vs 3.25"), "{why}");
        assert!(mismatch(&b, &a, 1e-3, 1e-4).unwrap().contains("shape"));
        std::fs::write(dir.join("bad.npy"), b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f8'}").unwrap();
        assert!(read(&dir.join("bad.npy")).unwrap_err().0.contains("bad.npy"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
