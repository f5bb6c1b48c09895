//! `ArgMax`, `ArgMin` and `TopK`: positions and values of extremes along one axis.

use super::{axis_of, int_scalar, map_elems, split_at_axis, to_size, with_elems, Elem};
use crate::bail;
use crate::graph::{opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};
use std::cmp::Ordering;

pub fn register(r: &mut Registry) {
    r.add_all(&[&ArgExtreme { name: "ArgMax", max: true }, &ArgExtreme { name: "ArgMin", max: false }, &TopK]);
}

/// Orders two elements, NaN above everything (as numpy's sorts do).
#[allow(clippy::eq_op)]
fn total_cmp<T: Elem>(a: T, b: T) -> Ordering {
    match a.partial_cmp(&b) {
        Some(o) => o,
        None => match (a != a, b != b) {
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => Ordering::Equal,
        },
    }
}

/// `ArgMax`/`ArgMin`: the int64 index of the largest/smallest element along `axis` (the first
/// one, or the last with `select_last_index`); `keepdims` keeps the axis with size 1.
struct ArgExtreme {
    name: &'static str,
    max: bool,
}

impl OpDef for ArgExtreme {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_numeric() {
            bail!("{} expects a numeric input, found {}", self.name, x.dtype);
        }
        let keepdims = cx.attrs.int("keepdims", 1)? != 0;
        let Some(shape) = &x.shape else {
            return Ok(vec![TensorType::unranked(DType::I64)]);
        };
        let axis = axis_of(cx.attrs.int("axis", 0)?, shape.len())?;
        let mut dims = shape.clone();
        if keepdims {
            dims[axis] = Dim::Known(1);
        } else {
            dims.remove(axis);
        }
        Ok(vec![TensorType::new(DType::I64, dims)])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_numeric() {
            bail!("{} expects a numeric input, found {}", self.name, x.dtype());
        }
        let axis = axis_of(cx.attrs.int("axis", 0)?, x.rank())?;
        let keepdims = cx.attrs.int("keepdims", 1)? != 0;
        let last = cx.attrs.int("select_last_index", 0)? != 0;
        let (outer, n, inner) = split_at_axis(&x.shape, axis);
        if n == 0 {
            bail!("{} over axis {axis} of length 0 has no answer", self.name);
        }
        let idx = with_elems!(&x.data, v => arg_extreme(v, outer, n, inner, self.max, last),
            str => bail!("{} does not support strings", self.name));
        let mut shape = x.shape.clone();
        if keepdims {
            shape[axis] = 1;
        } else {
            shape.remove(axis);
        }
        Ok(vec![Tensor::from_i64(&shape, idx)])
    }
}

/// Index of the extreme of each lane of a `[outer, n, inner]` buffer; NaN wins (the first NaN,
/// or the last with `last`), like numpy.
#[allow(clippy::eq_op)]
fn arg_extreme<T: Elem>(v: &[T], outer: usize, n: usize, inner: usize, max: bool, last: bool) -> Vec<i64> {
    let mut out = vec![0i64; outer * inner];
    let mut best: Vec<T> = Vec::with_capacity(inner);
    for o in 0..outer {
        let base = o * n * inner;
        best.clear();
        best.extend_from_slice(&v[base..base + inner]);
        let best_idx = &mut out[o * inner..(o + 1) * inner];
        for j in 1..n {
            let row = &v[base + j * inner..base + (j + 1) * inner];
            for i in 0..inner {
                let (e, b) = (row[i], best[i]);
                let better = if b != b {
                    last && e != e
                } else if e != e {
                    true
                } else if max {
                    e > b || (last && e == b)
                } else {
                    e < b || (last && e == b)
                };
                if better {
                    best[i] = e;
                    best_idx[i] = j as i64;
                }
            }
        }
    }
    out
}

/// `TopK`: the `k` largest (or smallest, `largest=0`) elements along `axis` and their int64
/// indices, sorted; equal values keep ascending index order (as ONNX's reference does).
struct TopK;

impl TopK {
    fn k_value(cx_opset: i64, attr_k: Option<i64>, k_input: Option<&Tensor>) -> OpResult<i64> {
        if let Some(t) = k_input {
            return int_scalar(t, "K");
        }
        match attr_k {
            Some(k) => Ok(k),
            None if cx_opset < 10 => bail!("attribute 'k' is missing"),
            None => bail!("expected input 1 (K) to be present"),
        }
    }
}

impl OpDef for TopK {
    fn name(&self) -> &'static str {
        "TopK"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_numeric() {
            bail!("TopK expects a numeric input, found {}", x.dtype);
        }
        let Some(shape) = &x.shape else {
            return Ok(vec![TensorType::unranked(x.dtype), TensorType::unranked(DType::I64)]);
        };
        let axis = axis_of(cx.attrs.int("axis", -1)?, shape.len())?;
        let attr_k = cx.attrs.has("k").then(|| cx.attrs.int("k", 0)).transpose()?;
        let k = match (cx.opt_input(1), cx.const_input(1)) {
            (Some(_), Some(t)) => Some(int_scalar(t, "K")?),
            (Some(_), None) => None,
            (None, _) => attr_k,
        };
        let mut dims = shape.clone();
        dims[axis] = match k {
            Some(k) => Dim::Known(to_size(k, "K")? as u64),
            None => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(x.dtype, dims.clone()), TensorType::new(DType::I64, dims)])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_numeric() {
            bail!("TopK expects a numeric input, found {}", x.dtype());
        }
        let axis = axis_of(cx.attrs.int("axis", -1)?, x.rank())?;
        let largest = cx.attrs.int("largest", 1)? != 0;
        let attr_k = cx.attrs.has("k").then(|| cx.attrs.int("k", 0)).transpose()?;
        let k = to_size(Self::k_value(cx.opset, attr_k, opt(inputs, 1))?, "K")?;
        let (outer, n, inner) = split_at_axis(&x.shape, axis);
        if k > n {
            bail!("K ({k}) is larger than axis {axis} of length {n}");
        }
        // Flat source index of every output element.
        let mut src = vec![0usize; outer * k * inner];
        let mut lane: Vec<usize> = Vec::with_capacity(n);
        with_elems!(&x.data, v => {
            for o in 0..outer {
                for i in 0..inner {
                    let base = o * n * inner + i;
                    lane.clear();
                    lane.extend(0..n);
                    let key = |j: usize| v[base + j * inner];
                    if largest {
                        lane.sort_by(|&a, &b| total_cmp(key(b), key(a)));
                    } else {
                        lane.sort_by(|&a, &b| total_cmp(key(a), key(b)));
                    }
                    for (j, &l) in lane[..k].iter().enumerate() {
                        src[o * k * inner + j * inner + i] = l;
                    }
                }
            }
        }, str => bail!("TopK does not support strings"));
        let mut shape = x.shape.clone();
        shape[axis] = k;
        let flat: Vec<usize> = src
            .iter()
            .enumerate()
            .map(|(p, &l)| {
                let (o, i) = (p / (k * inner), p % inner);
                o * n * inner + l * inner + i
            })
            .collect();
        let values = Tensor::new(
            shape.clone(),
            map_elems!(&x.data, v => flat.iter().map(|&f| v[f]).collect(),
            str => bail!("TopK does not support strings")),
        );
        let indices = Tensor::from_i64(&shape, src.iter().map(|&l| l as i64).collect());
        Ok(vec![values, indices])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::attr::Attr;
    use crate::tensor::Tensor;

    #[test]
    fn argmax_select_last_and_keepdims() {
        let x = Tensor::from_f32(&[2, 3], vec![1.0, 3.0, 3.0, 5.0, 2.0, 5.0]);
        let y = eval_op("ArgMax", &[("axis", Attr::Int(1))], &[Some(&x)], 1, 13).unwrap();
        assert_eq!((y[0].shape.clone(), y[0].to_i64()), (vec![2, 1], vec![1, 0]));
        let a = [("axis", Attr::Int(1)), ("keepdims", Attr::Int(0)), ("select_last_index", Attr::Int(1))];
        let y = eval_op("ArgMax", &a, &[Some(&x)], 1, 13).unwrap();
        assert_eq!((y[0].shape.clone(), y[0].to_i64()), (vec![2], vec![2, 2]));
        let y = eval_op("ArgMin", &[], &[Some(&x)], 1, 13).unwrap();
        assert_eq!(y[0].to_i64(), vec![0, 1, 0]);
    }

    #[test]
    fn topk_keeps_index_order_on_ties() {
        let x = Tensor::from_f32(&[5], vec![2.0, 7.0, 2.0, 7.0, 1.0]);
        let k = Tensor::from_i64(&[1], vec![3]);
        let y = eval_op("TopK", &[], &[Some(&x), Some(&k)], 2, 11).unwrap();
        assert_eq!(y[0].to_f64(), vec![7.0, 7.0, 2.0]);
        assert_eq!(y[1].to_i64(), vec![1, 3, 0]);
        let y = eval_op("TopK", &[("largest", Attr::Int(0))], &[Some(&x), Some(&k)], 2, 11).unwrap();
        assert_eq!(y[1].to_i64(), vec![4, 0, 2]);
        let y = eval_op("TopK", &[("k", Attr::Int(1))], &[Some(&x)], 2, 1).unwrap();
        assert_eq!(y[1].to_i64(), vec![1]);
    }
}
