//! ONNX `TensorProto` and numpy `.npy` ⇄ [`Tensor`].

use crate::proto::{tensor_proto::DataLocation, TensorProto};
use crate::FrontendError;
use half::{bf16, f16};
use kiln_ir::lowp;
use kiln_ir::tensor::{Data, MAX_ELEMENTS};
use kiln_ir::{DType, Tensor};
use prost::Message;
use std::path::Path;

/// Decodes a `TensorProto`. `base_dir` resolves external data files; `what` names the tensor
/// in messages.
pub fn tensor_from_proto(t: &TensorProto, base_dir: Option<&Path>, what: &str) -> Result<Tensor, String> {
    let code = t.data_type.unwrap_or(0) as i64;
    let Some(dtype) = DType::from_onnx_code(code) else {
        return Err(format!("{what}: element type {} is not supported", DType::onnx_code_name(code)));
    };
    let mut shape = Vec::with_capacity(t.dims.len());
    let mut n: u128 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("{what}: negative dimension {d} in {:?}", t.dims));
        }
        n = n.saturating_mul(d as u128);
        shape.push(d as usize);
    }
    if n > MAX_ELEMENTS {
        return Err(format!("{what}: shape {:?} has {n} elements, more than kiln's limit of 2^32", t.dims));
    }
    let n = n as usize;
    let external;
    let raw: Option<&[u8]> = if t.data_location == Some(DataLocation::External as i32) {
        external = read_external(t, base_dir, what)?;
        Some(&external)
    } else {
        t.raw_data.as_deref()
    };
    let data = match raw {
        Some(raw) if dtype != DType::String => decode_raw(dtype, raw, n, what)?,
        _ => decode_fields(t, dtype, n, what)?,
    };
    if data.len() != n {
        return Err(format!("{what}: shape {:?} needs {n} elements, the data holds {}", t.dims, data.len()));
    }
    Ok(Tensor::new(shape, data))
}

fn read_external(t: &TensorProto, base_dir: Option<&Path>, what: &str) -> Result<Vec<u8>, String> {
    let get = |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).and_then(|e| e.value.clone());
    let Some(loc) = get("location") else {
        return Err(format!("{what}: external data has no 'location'"));
    };
    if Path::new(&loc).is_absolute() || loc.split(['/', '\\']).any(|c| c == "..") {
        return Err(format!(
            "{what}: external data location '{loc}' must be a relative path inside the model's folder"
        ));
    }
    let path = base_dir.unwrap_or(Path::new(".")).join(&loc);
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("{what}: cannot read external data file '{}': {e}", path.display()))?;
    let offset: usize = get("offset").map(|s| s.parse().unwrap_or(usize::MAX)).unwrap_or(0);
    let end = match get("length") {
        Some(l) => offset.saturating_add(l.parse().unwrap_or(usize::MAX)),
        None => bytes.len(),
    };
    if offset > end || end > bytes.len() {
        return Err(format!(
            "{what}: external data range {offset}..{end} is outside '{}' ({} bytes)",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes[offset..end].to_vec())
}

fn decode_raw(dtype: DType, raw: &[u8], n: usize, what: &str) -> Result<Data, String> {
    let bits = dtype.bit_width();
    if bits < 8 {
        // 4-bit and 2-bit elements are packed, low bits first.
        let need = n.div_ceil(8 / bits);
        if raw.len() != need {
            return Err(format!("{what}: raw data has {} bytes, expected {need} ({n} packed x {dtype})", raw.len()));
        }
        let p = lowp::unpack(raw, bits as u32, n).unwrap_or_default();
        return Data::from_patterns(dtype, p).ok_or_else(|| format!("{what}: {dtype} is not a packed type"));
    }
    let size = dtype.size_bytes();
    if raw.len() != n * size {
        return Err(format!("{what}: raw data has {} bytes, expected {} ({n} x {dtype})", raw.len(), n * size));
    }
    Data::from_le_bytes(dtype, raw).ok_or_else(|| format!("{what}: {dtype} tensors cannot use raw data"))
}

fn decode_fields(t: &TensorProto, dtype: DType, n: usize, what: &str) -> Result<Data, String> {
    let i32s = &t.int32_data;
    let bits = dtype.bit_width();
    if bits < 8 {
        // int32_data holds the packed bytes, one per entry.
        let bytes: Vec<u8> = i32s.iter().map(|&v| v as u8).collect();
        let Some(p) = lowp::unpack(&bytes, bits as u32, n) else {
            return Err(format!("{what}: int32_data has {} packed bytes, too few for {n} x {dtype}", bytes.len()));
        };
        return Data::from_patterns(dtype, p).ok_or_else(|| format!("{what}: {dtype} is not a packed type"));
    }
    Ok(match dtype {
        DType::F32 => Data::F32(t.float_data.clone()),
        DType::F64 => Data::F64(t.double_data.clone()),
        DType::F16 => Data::F16(i32s.iter().map(|&v| f16::from_bits(v as u16)).collect()),
        DType::BF16 => Data::BF16(i32s.iter().map(|&v| bf16::from_bits(v as u16)).collect()),
        DType::I8 => Data::I8(i32s.iter().map(|&v| v as i8).collect()),
        DType::U8 => Data::U8(i32s.iter().map(|&v| v as u8).collect()),
        DType::I16 => Data::I16(i32s.iter().map(|&v| v as i16).collect()),
        DType::U16 => Data::U16(i32s.iter().map(|&v| v as u16).collect()),
        DType::I32 => Data::I32(i32s.clone()),
        DType::Bool => Data::Bool(i32s.iter().map(|&v| v != 0).collect()),
        DType::I64 => Data::I64(t.int64_data.clone()),
        DType::U32 => Data::U32(t.uint64_data.iter().map(|&v| v as u32).collect()),
        DType::U64 => Data::U64(t.uint64_data.clone()),
        DType::String => Data::Str(t.string_data.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()),
        // float8: one pattern per int32_data entry.
        d => Data::from_patterns(d, i32s.iter().map(|&v| v as u8).collect()).unwrap_or(Data::U8(vec![])),
    })
}

/// Encodes a tensor as a `TensorProto` (raw little-endian data; strings in `string_data`).
pub fn tensor_to_proto(t: &Tensor, name: &str) -> TensorProto {
    let mut p = TensorProto {
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().onnx_code()),
        name: Some(name.to_string()),
        ..Default::default()
    };
    if let Data::Str(v) = &t.data {
        p.string_data = v.iter().map(|s| s.as_bytes().to_vec()).collect();
        return p;
    }
    let bits = t.dtype().bit_width();
    // 4-bit and 2-bit elements are packed, low bits first; everything else one element per
    // `size_bytes`, little-endian.
    let raw =
        if bits < 8 { lowp::pack(&t.data.patterns().unwrap_or_default(), bits as u32) } else { t.data.to_le_bytes() };
    p.raw_data = Some(raw);
    p
}

/// Reads a tensor file: a serialized `TensorProto` (`.pb`) or a numpy array (`.npy`).
pub fn read_tensor_file(path: &Path) -> Result<Tensor, FrontendError> {
    let bytes = std::fs::read(path).map_err(|e| FrontendError::io(path, e))?;
    let what = path.display().to_string();
    if bytes.starts_with(b"\x93NUMPY") {
        return read_npy(&bytes).map_err(|msg| FrontendError::Input { path: what, msg });
    }
    let proto = TensorProto::decode(&bytes[..]).map_err(|e| FrontendError::Input {
        path: what.clone(),
        msg: format!("not a TensorProto (.pb) or .npy file: {e}"),
    })?;
    tensor_from_proto(&proto, path.parent(), "tensor").map_err(|msg| FrontendError::Input { path: what, msg })
}

/// Writes a tensor as a serialized `TensorProto`.
pub fn write_tensor_pb(path: &Path, t: &Tensor, name: &str) -> Result<(), FrontendError> {
    std::fs::write(path, tensor_to_proto(t, name).encode_to_vec()).map_err(|e| FrontendError::io(path, e))
}

/// Writes a tensor as a `.npy` file (strings and the types `.npy` lacks are refused); the
/// format is kiln-runtime's ([`kiln_runtime::npy::encode`]).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<(), FrontendError> {
    let raw = tensor_to_proto(t, "").raw_data.unwrap_or_default();
    let out = kiln_runtime::npy::encode(t.dtype(), &t.shape, &raw).ok_or_else(|| FrontendError::Input {
        path: path.display().to_string(),
        msg: format!("a {} tensor cannot be written as .npy", t.dtype()),
    })?;
    std::fs::write(path, out).map_err(|e| FrontendError::io(path, e))
}

/// Parses a version 1/2/3 `.npy` file (little-endian or byte-typed, C order).
pub fn read_npy(bytes: &[u8]) -> Result<Tensor, String> {
    if bytes.len() < 10 {
        return Err("truncated .npy header".into());
    }
    let major = bytes[6];
    let (hlen, start) = if major == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        if bytes.len() < 12 {
            return Err("truncated .npy header".into());
        }
        (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").and_then(|r| r.strip_prefix('\'')).and_then(|r| r.split('\'').next());
    let descr = descr.ok_or("the .npy header has no 'descr'")?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err("Fortran-ordered .npy arrays are not supported; save with C order".into());
    }
    let shape_s = field("shape").and_then(|r| r.strip_prefix('(')).and_then(|r| r.split(')').next());
    let shape_s = shape_s.ok_or("the .npy header has no 'shape'")?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad .npy shape '{shape_s}'")))
        .collect::<Result<_, _>>()?;
    let dtype = kiln_runtime::npy::descr_type(descr).ok_or_else(|| {
        format!("unsupported .npy dtype '{descr}' (big-endian, object and string arrays are not read)")
    })?;
    let mut n: u128 = 1;
    for &d in &shape {
        n = n.saturating_mul(d as u128);
    }
    if n > MAX_ELEMENTS {
        return Err(format!("shape {shape:?} is larger than kiln's limit of 2^32 elements"));
    }
    let data = decode_raw(dtype, &bytes[start + hlen..], n as usize, ".npy data")?;
    Ok(Tensor::new(shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
        let p = dir.join("a.npy");
        write_npy(&p, &t).unwrap();
        assert_eq!(read_tensor_file(&p).unwrap(), t);
        let q = dir.join("a.pb");
        write_tensor_pb(&q, &t, "a").unwrap();
        assert_eq!(read_tensor_file(&q).unwrap(), t);
    }

    #[test]
    fn packed_types_round_trip() {
        // 4-bit and 2-bit elements pack low bits first; an odd count pads the last byte.
        let t = Tensor::from_i64_as(DType::I4, &[3], vec![-8, 7, -1]);
        let p = tensor_tensor_round_trip(&t);
        assert_eq!(p, vec![0x78, 0x0F]);
        let u = Tensor::from_i64_as(DType::U2, &[5], vec![1, 2, 3, 0, 1]);
        assert_eq!(tensor_tensor_round_trip(&u), vec![0b0011_1001, 1]);
        let f = Tensor::from_f64(DType::F8E4M3FN, &[2], vec![1.0, -448.0]);
        assert_eq!(tensor_tensor_round_trip(&f), vec![0x38, 0xFE]);
        let short =
            TensorProto { dims: vec![3], data_type: Some(22), raw_data: Some(vec![0x78]), ..Default::default() };
        assert!(tensor_from_proto(&short, None, "t").is_err());
    }

    /// Encodes, decodes, checks equality; returns the raw bytes.
    fn tensor_tensor_round_trip(t: &Tensor) -> Vec<u8> {
        let p = tensor_to_proto(t, "t");
        assert_eq!(&tensor_from_proto(&p, None, "t").unwrap(), t);
        p.raw_data.unwrap_or_default()
    }
}
