//! Helpers shared by op definitions: input access, axes, common shape rules, broadcasting.

use super::{InferCx, OpError, OpResult};
use crate::bail;
use crate::tensor::{broadcast_index, Tensor};
use crate::types::{broadcast_dims, broadcast_shapes, DType, TensorType};

/// Input `i`, which must be present.
pub fn req<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> OpResult<&'a Tensor> {
    match inputs.get(i) {
        Some(Some(t)) => Ok(t),
        _ => bail!("expected input {i} to be present"),
    }
}

/// Input `i` if present.
pub fn opt<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// Normalizes a possibly negative axis against `rank`: valid axes are `-rank..rank`, so a
/// scalar has none (callers index the shape with the result).
pub fn norm_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}

/// Normalizes a list of axes; duplicates are an error.
pub fn norm_axes(axes: &[i64], rank: usize) -> OpResult<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = norm_axis(a, rank)?;
        if out.contains(&n) {
            bail!("axis {a} is repeated");
        }
        out.push(n);
    }
    Ok(out)
}

/// Shape rule: every output has input `i`'s type.
pub fn same_as_input(cx: &InferCx, i: usize) -> OpResult<Vec<TensorType>> {
    let t = cx.input(i)?.clone();
    Ok(vec![t; cx.num_outputs.max(1)])
}

/// Shape rule: numpy broadcasting of all present inputs, output of `dtype` (or input 0's).
pub fn broadcast_rule(cx: &mut InferCx, dtype: Option<DType>) -> OpResult<Vec<TensorType>> {
    let first = cx.input(0)?;
    let dtype = dtype.unwrap_or(first.dtype);
    let mut shape = first.shape.clone();
    for t in cx.inputs.iter().skip(1).flatten() {
        shape = match (shape, &t.shape) {
            (Some(a), Some(b)) => {
                let mut fresh_counter = Vec::new();
                let r = broadcast_dims(&a, b, &mut || {
                    fresh_counter.push(());
                    crate::types::Dim::sym("?")
                });
                match r {
                    None => bail!(
                        "shapes {} and {} cannot be broadcast together",
                        TensorType::new(dtype, a),
                        TensorType::new(dtype, b.clone())
                    ),
                    Some(mut s) => {
                        for d in s.iter_mut() {
                            if *d == crate::types::Dim::sym("?") {
                                *d = cx.fresh_dim();
                            }
                        }
                        Some(s)
                    }
                }
            }
            _ => None,
        };
    }
    Ok(vec![TensorType { dtype, shape }])
}

/// Checks that input `i` has one of `allowed` element types.
pub fn expect_dtype(t: &TensorType, what: &str, allowed: &[DType]) -> OpResult<()> {
    if allowed.contains(&t.dtype) {
        Ok(())
    } else {
        let names: Vec<_> = allowed.iter().map(|d| d.onnx_name()).collect();
        bail!("{what} must be one of [{}], found {}", names.join(", "), t.dtype)
    }
}

/// Applies `f` to every element of a float tensor (computing in f64), keeping its dtype.
pub fn map_float(t: &Tensor, f: impl Fn(f64) -> f64) -> Tensor {
    if let Some(v) = t.as_f32() {
        return Tensor::from_f32(&t.shape, v.iter().map(|&x| f(x as f64) as f32).collect());
    }
    Tensor::from_f64(t.dtype(), &t.shape, t.to_f64().into_iter().map(f).collect())
}

/// Broadcasts two tensors' element indices to their common shape.
pub fn broadcast2(a: &Tensor, b: &Tensor) -> OpResult<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    let Some(shape) = broadcast_shapes(&a.shape, &b.shape) else {
        bail!("shapes {:?} and {:?} cannot be broadcast together", a.shape, b.shape)
    };
    let ia = broadcast_index(&a.shape, &shape);
    let ib = broadcast_index(&b.shape, &shape);
    Ok((shape, ia, ib))
}

/// Elementwise binary op with broadcasting, computed in f64 and rounded to `out` dtype.
pub fn binary_f64(a: &Tensor, b: &Tensor, out: DType, f: impl Fn(f64, f64) -> f64) -> OpResult<Tensor> {
    if a.shape == b.shape {
        if let (Some(x), Some(y)) = (a.as_f32(), b.as_f32()) {
            if out == DType::F32 {
                let v = x.iter().zip(y).map(|(&p, &q)| f(p as f64, q as f64) as f32).collect();
                return Ok(Tensor::from_f32(&a.shape, v));
            }
        }
    }
    let (shape, ia, ib) = broadcast2(a, b)?;
    let (va, vb) = (a.to_f64(), b.to_f64());
    let v = ia.iter().zip(&ib).map(|(&i, &j)| f(va[i], vb[j])).collect();
    Ok(Tensor::from_f64(out, &shape, v))
}

/// Elementwise binary op with broadcasting on integers, computed in i64 and wrapped to `out`.
pub fn binary_i64(a: &Tensor, b: &Tensor, out: DType, f: impl Fn(i64, i64) -> i64) -> OpResult<Tensor> {
    let (shape, ia, ib) = broadcast2(a, b)?;
    let (va, vb) = (a.to_i64(), b.to_i64());
    let v = ia.iter().zip(&ib).map(|(&i, &j)| f(va[i], vb[j])).collect();
    Ok(Tensor::from_i64_as(out, &shape, v))
}

/// Reads a 1-D integer tensor (shape, axes, pads, ...) as i64s.
pub fn ints_of(t: &Tensor) -> OpResult<Vec<i64>> {
    if !t.dtype().is_int() {
        bail!("expected an integer tensor, found {}", t.dtype());
    }
    Ok(t.to_i64())
}

/// Turns a run-time size into usize, rejecting negatives and absurd totals. A single dim over
/// the limit is absurd too, even when another dim is 0 (ops build per-axis index maps).
pub fn checked_numel(shape: &[usize]) -> OpResult<usize> {
    let mut n: u128 = 1;
    for &d in shape {
        n = n.saturating_mul(d as u128);
    }
    if n > crate::tensor::MAX_ELEMENTS || shape.iter().any(|&d| d as u128 > crate::tensor::MAX_ELEMENTS) {
        bail!("a tensor of shape {shape:?} ({n} elements) is larger than kiln's limit of 2^32 elements");
    }
    Ok(n as usize)
}

impl From<String> for OpError {
    fn from(s: String) -> OpError {
        OpError(s)
    }
}

/// `out[o] = src[base + Σ o_k·strides_k]` for every index `o` of `out_shape`, row-major.
/// The caller guarantees every addressed element is in range.
pub fn strided_copy<T: Clone>(src: &[T], out_shape: &[usize], strides: &[isize], base: isize) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let r = out_shape.len();
    if r == 0 {
        out.push(src[base as usize].clone());
        return out;
    }
    let (inner, istride) = (out_shape[r - 1], strides[r - 1]);
    let mut idx = vec![0usize; r - 1];
    let mut off = base;
    loop {
        if istride == 1 {
            let s = off as usize;
            out.extend_from_slice(&src[s..s + inner]);
        } else {
            let mut p = off;
            for _ in 0..inner {
                out.push(src[p as usize].clone());
                p += istride;
            }
        }
        let mut ax = r - 1;
        loop {
            if ax == 0 {
                return out;
            }
            ax -= 1;
            idx[ax] += 1;
            off += strides[ax];
            if idx[ax] < out_shape[ax] {
                break;
            }
            off -= strides[ax] * out_shape[ax] as isize;
            idx[ax] = 0;
        }
    }
}
