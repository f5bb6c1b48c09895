//! Linear quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.

use crate::bail;
use crate::graph::{norm_axis, opt, req, same_as_input, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&QuantizeLinear, &DequantizeLinear, &DynamicQuantizeLinear]);
}

/// Rounds an f64 to the precision of float type `t` (identity for f64 and non-float types).
pub(crate) fn round_in(t: DType, v: f64) -> f64 {
    match t {
        DType::F32 => v as f32 as f64,
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        _ => v,
    }
}

/// The integer range of a quantized type.
fn quant_range(t: DType) -> OpResult<(f64, f64)> {
    Ok(match t {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::U32 => (0.0, u32::MAX as f64),
        t => match t.small_int() {
            Some(si) => {
                let (lo, hi) = si.range();
                (lo as f64, hi as f64)
            }
            None => bail!("quantized type must be an 8/16/32-bit, 4-bit or 2-bit integer, float8 or float4, found {t}"),
        },
    })
}

/// Whether `t` is a valid QuantizeLinear output type.
fn check_quant_type(t: DType) -> OpResult<()> {
    if is_float_quant(t) {
        return Ok(());
    }
    quant_range(t).map(|_| ())
}

/// The float8 and float4 types QuantizeLinear produces (E8M0 is a scale type, not one of them).
fn is_float_quant(t: DType) -> bool {
    t.is_low_precision_float() && t != DType::F8E8M0
}

/// Integer-valued f64s clamped into `t`'s range.
pub(crate) fn saturate_to(t: DType, shape: &[usize], v: Vec<f64>) -> OpResult<Tensor> {
    let (lo, hi) = quant_range(t)?;
    let v = v.into_iter().map(|x| if x.is_nan() { 0.0 } else { x.clamp(lo, hi) }).collect();
    Ok(Tensor::from_f64(t, shape, v))
}

/// The quantized output type: the zero point's, else `output_dtype`, else `default`.
pub(crate) fn zero_point_dtype(zp: Option<DType>, attr: Option<DType>, default: DType) -> OpResult<DType> {
    if let (Some(z), Some(a)) = (zp, attr) {
        if z != a {
            bail!("output_dtype {a} differs from the zero point's type {z}");
        }
    }
    Ok(zp.or(attr).unwrap_or(default))
}

/// The `output_dtype` attribute (0 or absent: unset).
fn output_dtype(a: crate::graph::AttrView) -> OpResult<Option<DType>> {
    if matches!(a.get("output_dtype"), Some(crate::attr::Attr::Int(0)) | None) {
        return Ok(None);
    }
    a.dtype("output_dtype")
}

/// For each element of `x`, the index of its scale/zero-point element: per tensor (one
/// element), per axis (a vector along `axis`) or blocked (`block_size` elements share one).
fn param_index(x: &[usize], p: &[usize], axis: i64, block: i64) -> OpResult<Vec<usize>> {
    let n: usize = x.iter().product();
    let pn: usize = p.iter().product();
    if pn == 1 && p.len() <= 1 {
        return Ok(vec![0; n]);
    }
    let ax = norm_axis(axis, x.len())?;
    let inner: usize = x[ax + 1..].iter().product();
    if block <= 0 {
        if p.len() != 1 || p[0] != x[ax] {
            bail!("scale of shape {p:?} must be a scalar or a vector of {} (axis {ax} of {x:?})", x[ax]);
        }
        return Ok((0..n).map(|i| (i / inner) % x[ax]).collect());
    }
    let b = block as usize;
    let nb = x[ax].div_ceil(b);
    let ok = p.len() == x.len() && (0..x.len()).all(|i| if i == ax { p[i] == nb } else { p[i] == x[i] });
    if !ok {
        bail!("blocked scale of shape {p:?} does not match input {x:?} with block size {b} on axis {ax}");
    }
    let outer_stride = x[ax] * inner;
    Ok((0..n)
        .map(|i| {
            let (o, r) = (i / outer_stride, i % outer_stride);
            let (a, q) = (r / inner, r % inner);
            (o * nb + a / b) * inner + q
        })
        .collect())
}

/// `y = saturate(round(x / y_scale) + y_zero_point)`, per tensor, per axis or blocked.
struct QuantizeLinear;

impl OpDef for QuantizeLinear {
    fn name(&self) -> &'static str {
        "QuantizeLinear"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let t = zero_point_dtype(cx.opt_input(2).map(|t| t.dtype), output_dtype(cx.attrs)?, DType::U8)?;
        check_quant_type(t)?;
        Ok(vec![TensorType { dtype: t, shape: x.shape.clone() }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, s, zp) = (req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2));
        if !s.dtype().is_float() {
            bail!("y_scale must be a float tensor, found {}", s.dtype());
        }
        let t = zero_point_dtype(zp.map(|z| z.dtype()), output_dtype(cx.attrs)?, DType::U8)?;
        check_quant_type(t)?;
        let (axis, block) = (cx.attrs.int("axis", 1)?, cx.attrs.int("block_size", 0)?);
        let si = param_index(&x.shape, &s.shape, axis, block)?;
        let zi = match zp {
            Some(z) => Some(param_index(&x.shape, &z.shape, axis, block)?),
            None => None,
        };
        let (xv, sv) = (x.to_f64(), s.to_f64());
        let zv = zp.map(|z| z.to_f64());
        // Divide in the input's precision, as ONNX does.
        let xt = if x.dtype().is_float() { x.dtype() } else { DType::F32 };
        if is_float_quant(t) {
            // float8: a (saturating) cast of x / scale, the zero point only gives the type;
            // float4: the zero point is added, and the cast clamps to its range on its own.
            let saturate = cx.attrs.int("saturate", 1)? != 0;
            let v = (0..xv.len())
                .map(|i| {
                    let q = round_in(xt, xv[i] / sv[si[i]]);
                    match (&zv, &zi) {
                        (Some(z), Some(zi)) if t == DType::F4E2M1 => round_in(DType::F32, q + z[zi[i]]),
                        _ => q,
                    }
                })
                .collect();
            return Ok(vec![Tensor::from_f64_with(t, &x.shape, v, saturate, crate::lowp::E8M0Round::Up)]);
        }
        let v = (0..xv.len())
            .map(|i| {
                let q = round_in(xt, xv[i] / sv[si[i]]).round_ties_even();
                match (&zv, &zi) {
                    (Some(z), Some(zi)) => q + z[zi[i]],
                    _ => q,
                }
            })
            .collect();
        Ok(vec![saturate_to(t, &x.shape, v)?])
    }
}

/// `y = (x - x_zero_point) * x_scale`, per tensor, per axis or blocked; output in the scale's type.
struct DequantizeLinear;

impl OpDef for DequantizeLinear {
    fn name(&self) -> &'static str {
        "DequantizeLinear"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, s) = (cx.input(0)?, cx.input(1)?);
        let t = output_dtype(cx.attrs)?.unwrap_or(s.dtype);
        if !t.is_float() {
            bail!("DequantizeLinear output must be a float type, found {t}");
        }
        Ok(vec![TensorType { dtype: t, shape: x.shape.clone() }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, s, zp) = (req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2));
        let t = output_dtype(cx.attrs)?.unwrap_or(s.dtype());
        if !t.is_float() || !s.dtype().is_float() {
            bail!("DequantizeLinear needs a float scale and output, found {} and {t}", s.dtype());
        }
        if let Some(z) = zp {
            if z.dtype() != x.dtype() {
                bail!("x_zero_point type {} differs from x type {}", z.dtype(), x.dtype());
            }
        }
        let (axis, block) = (cx.attrs.int("axis", 1)?, cx.attrs.int("block_size", 0)?);
        let si = param_index(&x.shape, &s.shape, axis, block)?;
        let zi = match zp {
            Some(z) => Some(param_index(&x.shape, &z.shape, axis, block)?),
            None => None,
        };
        let (xv, sv) = (x.to_f64(), s.to_f64());
        // A float8/float4 zero point must be zero (ONNX's reference does not subtract it).
        let zv = zp.filter(|_| !x.dtype().is_low_precision_float()).map(|z| z.to_f64());
        // numpy computes in f32 (or wider if the scale is f64).
        let wt = if s.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let v = (0..xv.len())
            .map(|i| {
                let d = match (&zv, &zi) {
                    (Some(z), Some(zi)) => round_in(wt, xv[i] - z[zi[i]]),
                    _ => xv[i],
                };
                round_in(wt, d * sv[si[i]])
            })
            .collect();
        Ok(vec![Tensor::from_f64(t, &x.shape, v)])
    }
}

/// Quantizes a float tensor to uint8 with a scale and zero point computed from its range.
struct DynamicQuantizeLinear;

impl OpDef for DynamicQuantizeLinear {
    fn name(&self) -> &'static str {
        "DynamicQuantizeLinear"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = &same_as_input(cx, 0)?[0];
        Ok(vec![
            TensorType { dtype: DType::U8, shape: x.shape.clone() },
            TensorType::known(x.dtype, &[]),
            TensorType::known(DType::U8, &[]),
        ])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_float() {
            bail!("x must be a float tensor, found {}", x.dtype());
        }
        let xv: Vec<f32> = x.to_f64().into_iter().map(|v| v as f32).collect();
        let maxx = xv.iter().copied().fold(0.0f32, f32::max);
        let minx = xv.iter().copied().fold(0.0f32, f32::min);
        let scale = if maxx == minx { 1.0 } else { maxx - minx } / 255.0f32;
        let zp = (0.0f32 - minx / scale).clamp(0.0, 255.0).round_ties_even();
        let y = xv.iter().map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as f64).collect();
        Ok(vec![
            Tensor::from_f64(DType::U8, &x.shape, y),
            Tensor::from_f64(x.dtype(), &[], vec![scale as f64]),
            Tensor::from_f64(DType::U8, &[], vec![zp as f64]),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_param_index() {
        // x [2, 5], blocks of 2 along axis 1 -> scale [2, 3].
        let idx = param_index(&[2, 5], &[2, 3], 1, 2).unwrap();
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 3, 3, 4, 4, 5]);
        assert_eq!(param_index(&[2, 3], &[3], 1, 0).unwrap(), vec![0, 1, 2, 0, 1, 2]);
        assert!(param_index(&[2, 3], &[2], 1, 0).is_err());
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let v = saturate_to(DType::U8, &[3], vec![2.5f64.round_ties_even(), 300.0, -4.0]).unwrap();
        assert_eq!(v.to_i64(), vec![2, 255, 0]);
    }
}
