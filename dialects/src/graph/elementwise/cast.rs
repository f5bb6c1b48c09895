//! Type conversions: Cast, CastLike, BitCast, and Identity.

use crate::bail;
use crate::graph::{req, same_as_input, AttrView, EvalCx, InferCx, OpDef, OpResult};
use crate::lowp::E8M0Round;
use crate::tensor::{Data, Tensor};
use crate::types::{DType, TensorType};
use crate::Attr;
use half::{bf16, f16};

/// The `to` attribute: a type (or ONNX code); opset 1 spelled it as a name like "FLOAT".
fn target(attrs: &AttrView) -> OpResult<DType> {
    if let Some(Attr::Str(name)) = attrs.get("to") {
        let up = name.to_ascii_uppercase();
        let t = match up.as_str() {
            "FLOAT" => DType::F32,
            "DOUBLE" => DType::F64,
            "FLOAT16" => DType::F16,
            "BFLOAT16" => DType::BF16,
            "BOOL" => DType::Bool,
            "STRING" => DType::String,
            _ => match DType::ALL.into_iter().find(|d| d.onnx_name().eq_ignore_ascii_case(&up)) {
                Some(d) => d,
                None => {
                    bail!("attribute 'to' names element type {name:?}, which kiln does not support")
                }
            },
        };
        return Ok(t);
    }
    match attrs.dtype("to")? {
        Some(t) => Ok(t),
        None => bail!("attribute 'to' is missing"),
    }
}

/// Formats a float the way numpy's `astype(str)` does: the shortest digits that round-trip
/// in the source type (`sci` is its exponent/digits form, as Rust's `{:e}` prints it),
/// positional for `1e-4 <= |v| < cutoff`, else scientific with a two-digit exponent.
fn numpy_float_str(v: f64, sci: &str, cutoff: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let (neg, body) = match sci.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, sci),
    };
    let (mant, exp) = body.split_once('e').unwrap_or((body, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if v == 0.0 {
        return format!("{sign}0.0");
    }
    let a = v.abs();
    if (1e-4..cutoff).contains(&a) {
        if exp >= 0 {
            let point = exp as usize + 1;
            let (int, frac) = if digits.len() > point {
                (digits[..point].to_string(), digits[point..].to_string())
            } else {
                (format!("{digits:0<point$}"), "0".to_string())
            };
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// Shortest `{:e}` form of a half value that reads back as the same value.
fn half_sci(x: f32, same: impl Fn(f32) -> bool) -> String {
    (0..9).map(|p| format!("{x:.p$e}")).find(|s| s.parse::<f32>().is_ok_and(&same)).unwrap_or_else(|| format!("{x:e}"))
}

fn to_strings(x: &Tensor) -> Vec<String> {
    match &x.data {
        Data::Str(v) => v.clone(),
        Data::Bool(v) => v.iter().map(|&b| if b { "True" } else { "False" }.to_string()).collect(),
        Data::F64(v) => v.iter().map(|&f| numpy_float_str(f, &format!("{f:e}"), 1e16)).collect(),
        Data::F32(v) => v.iter().map(|&f| numpy_float_str(f as f64, &format!("{f:e}"), 1e6)).collect(),
        Data::F16(v) => v
            .iter()
            .map(|&h| numpy_float_str(h.to_f64(), &half_sci(h.to_f32(), |r| f16::from_f32(r) == h), 1e3))
            .collect(),
        Data::BF16(v) => v
            .iter()
            .map(|&h| numpy_float_str(h.to_f64(), &half_sci(h.to_f32(), |r| bf16::from_f32(r) == h), 1e3))
            .collect(),
        Data::U64(v) => v.iter().map(|n| n.to_string()).collect(),
        _ if x.dtype().is_float() => {
            x.to_f64().into_iter().map(|f| numpy_float_str(f, &format!("{:e}", f as f32), 1e16)).collect()
        }
        _ => x.to_i64().iter().map(|n| n.to_string()).collect(),
    }
}

fn from_strings(v: &[String], to: DType, shape: &[usize]) -> OpResult<Tensor> {
    let bad = |s: &str| -> OpResult<Tensor> { bail!("Cast cannot read {s:?} as {to}") };
    let t = match to {
        DType::String => Tensor::new(shape.to_vec(), Data::Str(v.to_vec())),
        DType::Bool => Tensor::from_bool(shape, v.iter().map(|s| !s.is_empty()).collect()),
        DType::F32 => {
            let mut out = Vec::with_capacity(v.len());
            for s in v {
                match s.trim().parse::<f32>() {
                    Ok(f) => out.push(f),
                    Err(_) => return bad(s),
                }
            }
            Tensor::from_f32(shape, out)
        }
        DType::U64 => {
            let mut out = Vec::with_capacity(v.len());
            for s in v {
                let s = s.trim();
                match s.parse::<u64>() {
                    Ok(n) => out.push(n),
                    Err(_) => match s.parse::<f64>() {
                        Ok(f) => out.push(f as u64),
                        Err(_) => return bad(s),
                    },
                }
            }
            Tensor::new(shape.to_vec(), Data::U64(out))
        }
        t if t.is_int() => {
            let mut out = Vec::with_capacity(v.len());
            for s in v {
                let s = s.trim();
                match s.parse::<i64>() {
                    Ok(n) => out.push(n),
                    Err(_) => match s.parse::<f64>() {
                        Ok(f) => out.push(f as i64),
                        Err(_) => return bad(s),
                    },
                }
            }
            Tensor::from_i64_as(t, shape, out)
        }
        t => {
            let mut out = Vec::with_capacity(v.len());
            for s in v {
                match s.trim().parse::<f64>() {
                    Ok(f) => out.push(f),
                    Err(_) => return bad(s),
                }
            }
            Tensor::from_f64(t, shape, out)
        }
    };
    Ok(t)
}

/// How a cast treats values out of a float8 type's range (`saturate`) and rounds to E8M0
/// (`round_mode`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CastMode {
    pub saturate: bool,
    pub round: E8M0Round,
}

impl CastMode {
    /// ONNX's defaults: saturate, round E8M0 up.
    #[cfg(test)]
    pub const DEFAULT: CastMode = CastMode { saturate: true, round: E8M0Round::Up };

    /// The `saturate` and `round_mode` attributes.
    pub fn from_attrs(a: &AttrView) -> OpResult<CastMode> {
        let saturate = a.int("saturate", 1)? != 0;
        let mode = a.string("round_mode", "up")?;
        let Some(round) = E8M0Round::parse(&mode) else {
            bail!("round_mode must be \"up\", \"down\" or \"nearest\", found {mode:?}")
        };
        Ok(CastMode { saturate, round })
    }
}

/// Converts `x` to `to` like numpy's `astype`: floats to integers truncate toward zero
/// (saturating), integers wrap, anything nonzero is true, strings parse and print.
#[cfg(test)]
pub(super) fn cast_tensor(x: &Tensor, to: DType) -> OpResult<Tensor> {
    cast_tensor_with(x, to, CastMode::DEFAULT)
}

/// [`cast_tensor`] with float8 saturation and E8M0 rounding as `mode` says (ONNX Cast).
pub(crate) fn cast_tensor_with(x: &Tensor, to: DType, mode: CastMode) -> OpResult<Tensor> {
    let from = x.dtype();
    let shape = &x.shape;
    if from == to {
        return Ok(x.clone());
    }
    if to == DType::String {
        return Ok(Tensor::new(shape.clone(), Data::Str(to_strings(x))));
    }
    let t = match (&x.data, to) {
        (Data::Str(v), _) => return from_strings(v, to, shape),
        (Data::F32(v), DType::F16) => {
            Tensor::new(shape.clone(), Data::F16(v.iter().map(|&f| f16::from_f32(f)).collect()))
        }
        (Data::F32(v), DType::BF16) => {
            Tensor::new(shape.clone(), Data::BF16(v.iter().map(|&f| bf16::from_f32(f)).collect()))
        }
        (Data::F16(v), DType::F32) => Tensor::from_f32(shape, v.iter().map(|h| h.to_f32()).collect()),
        (Data::BF16(v), DType::F32) => Tensor::from_f32(shape, v.iter().map(|h| h.to_f32()).collect()),
        (Data::I64(v), DType::F32) => Tensor::from_f32(shape, v.iter().map(|&n| n as f32).collect()),
        (Data::U64(v), DType::F32) => Tensor::from_f32(shape, v.iter().map(|&n| n as f32).collect()),
        _ if to.is_float() || from.is_float() => {
            Tensor::from_f64_with(to, shape, x.to_f64(), mode.saturate, mode.round)
        }
        _ => Tensor::from_i64_as(to, shape, x.to_i64()),
    };
    Ok(t)
}

/// Cast: converts the input to the element type `to` (every kiln type, strings both ways).
/// `saturate` (default 1) clamps values out of a float8 type's range to its largest finite
/// value instead of Inf/NaN; `round_mode` (up, down, nearest) rounds to float8 E8M0.
pub(super) struct Cast;

impl OpDef for Cast {
    fn name(&self) -> &'static str {
        "Cast"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let to = target(&cx.attrs)?;
        Ok(vec![TensorType { dtype: to, shape: cx.input(0)?.shape.clone() }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        Ok(vec![cast_tensor_with(req(inputs, 0)?, target(&cx.attrs)?, CastMode::from_attrs(&cx.attrs)?)?])
    }
}

/// CastLike: Cast to the element type of the second input (with Cast's `saturate` and
/// `round_mode`).
pub(super) struct CastLike;

impl OpDef for CastLike {
    fn name(&self) -> &'static str {
        "CastLike"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let to = cx.input(1)?.dtype;
        Ok(vec![TensorType { dtype: to, shape: cx.input(0)?.shape.clone() }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let mode = CastMode::from_attrs(&cx.attrs)?;
        Ok(vec![cast_tensor_with(req(inputs, 0)?, req(inputs, 1)?.dtype(), mode)?])
    }
}

/// Identity: the input, unchanged.
pub(super) struct Identity;

impl OpDef for Identity {
    fn name(&self) -> &'static str {
        "Identity"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        same_as_input(cx, 0)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        Ok(vec![req(inputs, 0)?.clone()])
    }
}

/// The elements' little-endian bytes (bools as one byte each, float8 as their patterns);
/// `None` for strings and sub-byte types.
fn le_bytes(d: &Data) -> Option<Vec<u8>> {
    if d.dtype().bit_width() < 8 {
        return None;
    }
    if let Some(p) = d.patterns() {
        return Some(p);
    }
    Some(match d {
        Data::Str(_) => return None,
        Data::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        Data::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::I8(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::U8(v) => v.clone(),
        Data::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => return None,
    })
}

/// Reads elements of `to` from little-endian bytes (whole elements only).
fn from_le_bytes(to: DType, b: &[u8]) -> Data {
    macro_rules! read {
        ($t:ty, $n:literal) => {
            b.chunks_exact($n).map(|c| <$t>::from_le_bytes(<[u8; $n]>::try_from(c).unwrap_or([0; $n]))).collect()
        };
    }
    match to {
        DType::Bool => Data::Bool(b.iter().map(|&x| x != 0).collect()),
        DType::U8 => Data::U8(b.to_vec()),
        DType::I8 => Data::I8(read!(i8, 1)),
        DType::F16 => Data::F16(read!(f16, 2)),
        DType::BF16 => Data::BF16(read!(bf16, 2)),
        DType::I16 => Data::I16(read!(i16, 2)),
        DType::U16 => Data::U16(read!(u16, 2)),
        DType::F32 => Data::F32(read!(f32, 4)),
        DType::I32 => Data::I32(read!(i32, 4)),
        DType::U32 => Data::U32(read!(u32, 4)),
        DType::F64 => Data::F64(read!(f64, 8)),
        DType::I64 => Data::I64(read!(i64, 8)),
        DType::U64 => Data::U64(read!(u64, 8)),
        DType::String => Data::Str(Vec::new()),
        t => Data::from_patterns(t, b.to_vec()).unwrap_or(Data::U8(Vec::new())),
    }
}

fn check_bitcast(from: DType, to: DType) -> OpResult<()> {
    if from == DType::String || to == DType::String {
        bail!("BitCast does not take strings (from {from} to {to})");
    }
    if from.bit_width() < 8 || to.bit_width() < 8 {
        bail!("BitCast does not take 4-bit or 2-bit types (from {from} to {to})");
    }
    if from.size_bytes() != to.size_bytes() {
        bail!(
            "BitCast needs types of one width, found {from} ({} bits) and {to} ({} bits)",
            from.size_bytes() * 8,
            to.size_bytes() * 8
        );
    }
    Ok(())
}

/// BitCast: reinterprets each element's bits as the same-width type `to`.
pub(super) struct BitCast;

impl OpDef for BitCast {
    fn name(&self) -> &'static str {
        "BitCast"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let to = target(&cx.attrs)?;
        let t = cx.input(0)?;
        check_bitcast(t.dtype, to)?;
        Ok(vec![TensorType { dtype: to, shape: t.shape.clone() }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let to = target(&cx.attrs)?;
        check_bitcast(x.dtype(), to)?;
        let Some(bytes) = le_bytes(&x.data) else { bail!("BitCast does not take strings") };
        Ok(vec![Tensor::new(x.shape.clone(), from_le_bytes(to, &bytes))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_numpy() {
        let t = Tensor::from_f32(&[6], vec![0.1, 1.0, 1e6, 1e-5, -2.5, f32::NEG_INFINITY]);
        let s = cast_tensor(&t, DType::String).unwrap();
        let want = ["0.1", "1.0", "1e+06", "1e-05", "-2.5", "-inf"];
        assert_eq!(s.data, Data::Str(want.iter().map(|s| s.to_string()).collect()));
        let h = Tensor::from_f64(DType::F16, &[2], vec![0.1, 65504.0]);
        let s = cast_tensor(&h, DType::String).unwrap();
        assert_eq!(s.data, Data::Str(vec!["0.1".into(), "6.55e+04".into()]));
        let back = cast_tensor(&cast_tensor(&t, DType::String).unwrap(), DType::F32).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn casts_between_numbers() {
        let t = Tensor::from_f32(&[3], vec![-1.7, 2.5, 0.0]);
        assert_eq!(cast_tensor(&t, DType::I32).unwrap().to_i64(), vec![-1, 2, 0]);
        assert_eq!(cast_tensor(&t, DType::Bool).unwrap().to_bool(), vec![true, true, false]);
        let i = Tensor::from_i64(&[2], vec![-1, 300]);
        assert_eq!(cast_tensor(&i, DType::U8).unwrap().data, Data::U8(vec![255, 44]));
    }

    #[test]
    fn float8_casts_saturate_unless_told_not_to() {
        let t = Tensor::from_f32(&[3], vec![1e6, f32::NEG_INFINITY, 0.3]);
        let sat = cast_tensor(&t, DType::F8E4M3FN).unwrap();
        assert_eq!(sat.to_f64(), vec![448.0, -448.0, 0.3125]);
        let raw = cast_tensor_with(&t, DType::F8E5M2, CastMode { saturate: false, round: E8M0Round::Up }).unwrap();
        assert_eq!(raw.to_f64()[..2], [f64::INFINITY, f64::NEG_INFINITY]);
        let i4 = cast_tensor(&Tensor::from_f32(&[2], vec![-9.0, 8.5]), DType::I4).unwrap();
        assert_eq!(i4.to_i64(), vec![7, -8]);
        assert!(check_bitcast(DType::I4, DType::U4).is_err());
    }

    #[test]
    fn bitcast_reinterprets() {
        let t = Tensor::from_f32(&[2], vec![1.0, -0.0]);
        let r = Tensor::new(vec![2], from_le_bytes(DType::I32, &le_bytes(&t.data).unwrap()));
        assert_eq!(r.data, Data::I32(vec![0x3f80_0000, i32::MIN]));
        assert!(check_bitcast(DType::F32, DType::I64).is_err());
    }
}
