//! Shape queries and tensor creation: Shape, Size, Constant, ConstantOfShape, Range, EyeLike,
//! Trilu.

use super::{build, const_ints, elems, kd, static_len};
use crate::bail;
use crate::graph::{checked_numel, ints_of, opt, req, same_as_input};
use crate::graph::{EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::{Data, Tensor};
use crate::types::{DType, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&Shape, &Size, &Constant, &ConstantOfShape, &Range, &EyeLike, &Trilu]);
}

/// `Shape(data)`: the input's dims `[start, end)` as a 1-D int64 tensor.
struct Shape;

/// The clamped `[start, end)` range of dims that Shape returns for a rank.
fn shape_range(cx_attrs: &crate::graph::AttrView, rank: usize) -> OpResult<(usize, usize)> {
    let r = rank as i64;
    let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = norm(cx_attrs.int("start", 0)?);
    let end = norm(cx_attrs.int("end", r)?);
    Ok((start, end.max(start)))
}

impl OpDef for Shape {
    fn name(&self) -> &'static str {
        "Shape"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let n = match cx.input(0)?.rank() {
            Some(r) => {
                let (s, e) = shape_range(&cx.attrs, r)?;
                kd(e - s)
            }
            None => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(DType::I64, vec![n])])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let (s, e) = shape_range(&cx.attrs, x.rank())?;
        let v: Vec<i64> = x.shape[s..e].iter().map(|&d| d as i64).collect();
        Ok(vec![Tensor::from_i64(&[v.len()], v)])
    }
}

/// `Size(data)`: the input's element count as an int64 scalar.
struct Size;

impl OpDef for Size {
    fn name(&self) -> &'static str {
        "Size"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        cx.input(0)?;
        Ok(vec![TensorType::known(DType::I64, &[])])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let n: usize = x.shape.iter().product();
        Ok(vec![Tensor::from_i64(&[], vec![n as i64])])
    }
}

/// `Constant()`: the tensor given by one of the attributes `value`, `value_float(s)`,
/// `value_int(s)` or `value_string(s)`.
struct Constant;

fn constant_value(a: &crate::graph::AttrView) -> OpResult<Tensor> {
    if let Some(t) = a.tensor("value")? {
        return Ok(t.clone());
    }
    if a.has("value_float") {
        return Ok(Tensor::scalar_f32(a.float("value_float", 0.0)?));
    }
    if let Some(v) = a.floats("value_floats")? {
        return Ok(Tensor::from_f32(&[v.len()], v));
    }
    if a.has("value_int") {
        return Ok(Tensor::from_i64(&[], vec![a.int("value_int", 0)?]));
    }
    if let Some(v) = a.ints("value_ints")? {
        return Ok(Tensor::from_i64(&[v.len()], v));
    }
    if a.has("value_string") {
        return Ok(Tensor::new(vec![], Data::Str(vec![a.string("value_string", "")?])));
    }
    if let Some(v) = a.strings("value_strings")? {
        return Ok(Tensor::new(vec![v.len()], Data::Str(v)));
    }
    if a.has("sparse_value") {
        bail!("Constant with a sparse_value is not supported");
    }
    bail!("Constant needs one of the attributes value, value_float(s), value_int(s), value_string(s)")
}

impl OpDef for Constant {
    fn name(&self) -> &'static str {
        "Constant"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        // The common form is read in place: weights are not copied to learn their type.
        if let Some(t) = cx.attrs.tensor("value")? {
            return Ok(vec![TensorType::known(t.dtype(), &t.shape)]);
        }
        let t = constant_value(&cx.attrs)?;
        Ok(vec![TensorType::known(t.dtype(), &t.shape)])
    }
    fn eval(&self, cx: &EvalCx, _inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        Ok(vec![constant_value(&cx.attrs)?])
    }
}

/// `ConstantOfShape(input)`: a tensor of the shape given by `input`, filled with the single
/// element of the `value` attribute (default float 0).
struct ConstantOfShape;

fn fill_value(a: &crate::graph::AttrView) -> OpResult<Tensor> {
    match a.tensor("value")? {
        Some(t) if t.len() == 1 => Ok(t.clone()),
        Some(t) => bail!("value must hold exactly one element, found shape {:?}", t.shape),
        None => Ok(Tensor::scalar_f32(0.0)),
    }
}

fn shape_from(v: &[i64]) -> OpResult<Vec<usize>> {
    if let Some(d) = v.iter().find(|&&d| d < 0) {
        bail!("shape {v:?} has a negative dim {d}");
    }
    let s: Vec<usize> = v.iter().map(|&d| d as usize).collect();
    checked_numel(&s)?;
    Ok(s)
}

impl OpDef for ConstantOfShape {
    fn name(&self) -> &'static str {
        "ConstantOfShape"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let dtype = fill_value(&cx.attrs)?.dtype();
        let shape = match (const_ints(cx, 0), cx.shape_value(0)) {
            (Some(v), _) => Some(shape_from(&v)?.into_iter().map(kd).collect()),
            (None, Some(v)) => match v.iter().map(crate::graph::SymInt::to_dim).collect::<Option<Vec<_>>>() {
                Some(dims) => Some(dims),
                None => bail!("ConstantOfShape shape {v:?} has a negative dim"),
            },
            (None, None) => static_len(cx, 0).map(|n| cx.fresh_dims(n)),
        };
        Ok(vec![TensorType { dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let v = fill_value(&cx.attrs)?;
        let shape = shape_from(&ints_of(req(inputs, 0)?)?)?;
        let n = shape.iter().product();
        with_elem!(v.dtype(), T => {
            let x = elems::<T>(&v)?;
            Ok(vec![build(shape, x.iter().cycle().take(n).cloned().collect())])
        })
    }
}

/// `Range(start, limit, delta)`: `start, start + delta, ...` up to `limit` (exclusive).
struct Range;

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> OpResult<Tensor> {
    let dt = start.dtype();
    if limit.dtype() != dt || delta.dtype() != dt {
        bail!("start, limit and delta must have one type, found {dt}, {} and {}", limit.dtype(), delta.dtype());
    }
    if !dt.is_numeric() {
        bail!("Range needs numeric inputs, found {dt}");
    }
    if start.len() != 1 || limit.len() != 1 || delta.len() != 1 {
        bail!("start, limit and delta must be scalars");
    }
    if dt.is_int() {
        let (s, l, d) = (start.to_i64()[0] as i128, limit.to_i64()[0] as i128, delta.to_i64()[0] as i128);
        if d == 0 {
            bail!("delta must not be 0");
        }
        let diff = l - s;
        let n = if d > 0 && diff > 0 {
            (diff + d - 1) / d
        } else if d < 0 && diff < 0 {
            (-diff - d - 1) / -d
        } else {
            0
        };
        checked_numel(&[n.min(u64::MAX as i128) as usize])?;
        let v = (0..n).map(|i| (s + i * d) as i64).collect();
        return Ok(Tensor::from_i64_as(dt, &[n as usize], v));
    }
    let (s, l, d) = (start.to_f64()[0], limit.to_f64()[0], delta.to_f64()[0]);
    if d == 0.0 || !(s.is_finite() && l.is_finite() && d.is_finite()) {
        bail!("Range needs finite inputs and a non-zero delta, found {s}, {l}, {d}");
    }
    let n = ((l - s) / d).ceil().max(0.0);
    if n > 1e12 {
        bail!("Range of {n} elements is larger than kiln's limit");
    }
    let n = n as usize;
    checked_numel(&[n])?;
    Ok(Tensor::from_f64(dt, &[n], (0..n).map(|i| s + i as f64 * d).collect()))
}

impl OpDef for Range {
    fn name(&self) -> &'static str {
        "Range"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let dtype = cx.input(0)?.dtype;
        let n = match (cx.const_input(0), cx.const_input(1), cx.const_input(2)) {
            (Some(s), Some(l), Some(d)) => kd(range(s, l, d)?.len()),
            _ => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(dtype, vec![n])])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        Ok(vec![range(req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?)?])
    }
}

/// `EyeLike(input)`: a 2-D tensor of the input's shape with ones on the `k`-th diagonal.
struct EyeLike;

fn eyelike_dtype(cx_attrs: &crate::graph::AttrView, input: DType) -> OpResult<DType> {
    let dt = cx_attrs.dtype("dtype")?.unwrap_or(input);
    if dt == DType::String {
        bail!("EyeLike cannot produce strings");
    }
    Ok(dt)
}

impl OpDef for EyeLike {
    fn name(&self) -> &'static str {
        "EyeLike"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = eyelike_dtype(&cx.attrs, x.dtype)?;
        let shape = match &x.shape {
            Some(d) if d.len() != 2 => bail!("EyeLike needs a 2-D input, found rank {}", d.len()),
            Some(d) => d.clone(),
            None => cx.fresh_dims(2),
        };
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let dtype = eyelike_dtype(&cx.attrs, x.dtype())?;
        let [r, c] = x.shape[..] else { bail!("EyeLike needs a 2-D input, found shape {:?}", x.shape) };
        let k = cx.attrs.int("k", 0)?;
        let mut v = vec![0.0; r * c];
        for i in 0..r {
            let j = (i as i64).saturating_add(k);
            if j >= 0 && (j as usize) < c {
                v[i * c + j as usize] = 1.0;
            }
        }
        Ok(vec![Tensor::from_f64(dtype, &[r, c], v)])
    }
}

/// `Trilu(input, k?)`: keeps the upper (`upper=1`) or lower triangle of the last two axes,
/// offset by diagonal `k`, and zeroes the rest.
struct Trilu;

impl OpDef for Trilu {
    fn name(&self) -> &'static str {
        "Trilu"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        if let Some(r) = cx.input(0)?.rank() {
            if r < 2 {
                bail!("Trilu needs an input of rank >= 2, found {r}");
            }
        }
        same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let k = match opt(inputs, 1) {
            Some(t) => match ints_of(t)?.as_slice() {
                [k] => *k,
                _ => bail!("k must be a scalar, found shape {:?}", t.shape),
            },
            None => 0,
        };
        let upper = cx.attrs.int("upper", 1)? != 0;
        let r = x.rank();
        if r < 2 {
            bail!("Trilu needs an input of rank >= 2, found {r}");
        }
        let (rows, cols) = (x.shape[r - 2], x.shape[r - 1]);
        let keep = |i: usize, j: usize| {
            let d = j as i128 - i as i128;
            if upper {
                d >= k as i128
            } else {
                d <= k as i128
            }
        };
        with_elem!(x.dtype(), T => {
            let out = mask_to_default(elems::<T>(x)?, |n| {
                keep((n / cols.max(1)) % rows.max(1), n % cols.max(1))
            });
            Ok(vec![build(x.shape.clone(), out)])
        })
    }
}

/// The elements at flat positions where `keep` holds; zero (the default) elsewhere.
fn mask_to_default<T: Clone + Default>(src: &[T], keep: impl Fn(usize) -> bool) -> Vec<T> {
    src.iter().enumerate().map(|(n, v)| if keep(n) { v.clone() } else { T::default() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_counts_like_numpy() {
        let t = |v: i64| Tensor::from_i64(&[], vec![v]);
        assert_eq!(range(&t(10), &t(4), &t(-3)).unwrap().to_i64(), vec![10, 7]);
        assert_eq!(range(&t(3), &t(9), &t(3)).unwrap().to_i64(), vec![3, 6]);
        assert_eq!(range(&t(3), &t(1), &t(3)).unwrap().len(), 0);
        let f = |v: f32| Tensor::scalar_f32(v);
        assert_eq!(range(&f(1.0), &f(2.0), &f(0.25)).unwrap().as_f32().unwrap(), &[1.0, 1.25, 1.5, 1.75]);
    }

    #[test]
    fn shape_range_clamps() {
        let attrs = crate::attr::Attrs::from([("start".to_string(), crate::attr::Attr::Int(-10))]);
        assert_eq!(shape_range(&crate::graph::AttrView(&attrs), 3).unwrap(), (0, 3));
    }
}
