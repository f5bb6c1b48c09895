//! `Unique`: distinct elements (or slices along an axis) with first indices, inverse map and
//! counts, sorted or in order of first occurrence.

use super::split_at_axis;
use crate::graph::{norm_axis, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};
use crate::{bail, for_each_data};
use std::cmp::Ordering;

pub fn register(r: &mut Registry) {
    r.add(&Unique);
}

/// `Unique`: `Y` holds the distinct elements of `X` (flattened) or its distinct slices along
/// `axis`; `indices` the first occurrence of each, `inverse_indices` maps every element/slice of
/// `X` to its entry in `Y`, `counts` how often each occurs. `sorted=1` sorts `Y` ascending
/// (slices lexicographically), `sorted=0` keeps order of first occurrence.
struct Unique;

/// Orders two elements of any type; NaN sorts last and equals NaN (numpy's `equal_nan`).
#[allow(clippy::eq_op)]
fn cmp_elem<T: PartialOrd>(a: &T, b: &T) -> Ordering {
    match a.partial_cmp(b) {
        Some(o) => o,
        None => match (a != a, b != b) {
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => Ordering::Equal,
        },
    }
}

/// Distinct items of a `[outer, n, inner]` buffer (items are the `n` slices): for each group
/// of equal items in ascending order, its member item numbers in ascending order.
fn groups<T: PartialOrd>(v: &[T], outer: usize, n: usize, inner: usize) -> Vec<Vec<usize>> {
    let cmp_items = |a: usize, b: usize| -> Ordering {
        for o in 0..outer {
            let base = o * n * inner;
            for i in 0..inner {
                let c = cmp_elem(&v[base + a * inner + i], &v[base + b * inner + i]);
                if c != Ordering::Equal {
                    return c;
                }
            }
        }
        Ordering::Equal
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| cmp_items(a, b));
    let mut out: Vec<Vec<usize>> = Vec::new();
    for &item in &order {
        match out.last_mut() {
            Some(g) if cmp_items(g[0], item) == Ordering::Equal => g.push(item),
            _ => out.push(vec![item]),
        }
    }
    out
}

impl OpDef for Unique {
    fn name(&self) -> &'static str {
        "Unique"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let u = cx.fresh_dim();
        let y = match (cx.attrs.has("axis"), &x.shape) {
            (false, _) => TensorType::new(x.dtype, vec![u.clone()]),
            (true, None) => TensorType::unranked(x.dtype),
            (true, Some(s)) => {
                let axis = norm_axis(cx.attrs.int("axis", 0)?, s.len())?;
                let mut d = s.clone();
                d[axis] = u.clone();
                TensorType::new(x.dtype, d)
            }
        };
        let m = match (cx.attrs.has("axis"), &x.shape) {
            (false, _) => x.num_elements().map(|n| Dim::Known(n as u64)),
            (true, Some(s)) => Some(s[norm_axis(cx.attrs.int("axis", 0)?, s.len())?].clone()),
            (true, None) => None,
        };
        let m = match m {
            Some(m) => m,
            None => cx.fresh_dim(),
        };
        let per_u = TensorType::new(DType::I64, vec![u]);
        Ok(vec![y, per_u.clone(), TensorType::new(DType::I64, vec![m]), per_u])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let sorted = cx.attrs.int("sorted", 1)? != 0;
        let axis = if cx.attrs.has("axis") {
            if x.rank() == 0 {
                bail!("Unique with an axis expects a tensor of rank >= 1, found a scalar");
            }
            Some(norm_axis(cx.attrs.int("axis", 0)?, x.rank())?)
        } else {
            None
        };
        let (outer, n, inner) = match axis {
            Some(a) => split_at_axis(&x.shape, a),
            None => (1, x.len(), 1),
        };
        let mut gs = for_each_data!(&x.data, v => groups(v, outer, n, inner));
        if !sorted {
            gs.sort_by_key(|g| g[0]);
        }
        let u = gs.len();
        let mut inverse = vec![0i64; n];
        for (gi, g) in gs.iter().enumerate() {
            for &m in g {
                inverse[m] = gi as i64;
            }
        }
        let firsts: Vec<usize> = gs.iter().map(|g| g[0]).collect();
        let y = match axis {
            None => x.gather_flat(vec![u], &firsts),
            Some(a) => {
                let mut shape = x.shape.clone();
                shape[a] = u;
                let mut idx = Vec::with_capacity(outer * u * inner);
                for o in 0..outer {
                    for &f in &firsts {
                        idx.extend((0..inner).map(|i| (o * n + f) * inner + i));
                    }
                }
                x.gather_flat(shape, &idx)
            }
        };
        Ok(vec![
            y,
            Tensor::from_i64(&[u], firsts.iter().map(|&f| f as i64).collect()),
            Tensor::from_i64(&[n], inverse),
            Tensor::from_i64(&[u], gs.iter().map(|g| g.len() as i64).collect()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::attr::Attr;
    use crate::tensor::Tensor;

    #[test]
    fn unique_sorted_and_unsorted() {
        let x = Tensor::from_f32(&[6], vec![2.0, 1.0, 1.0, 3.0, 4.0, 3.0]);
        let y = eval_op("Unique", &[], &[Some(&x)], 4, 11).unwrap();
        assert_eq!(y[0].to_f64(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(y[1].to_i64(), vec![1, 0, 3, 4]);
        assert_eq!(y[2].to_i64(), vec![1, 0, 0, 2, 3, 2]);
        assert_eq!(y[3].to_i64(), vec![2, 1, 2, 1]);
        let y = eval_op("Unique", &[("sorted", Attr::Int(0))], &[Some(&x)], 4, 11).unwrap();
        assert_eq!(y[0].to_f64(), vec![2.0, 1.0, 3.0, 4.0]);
        assert_eq!(y[2].to_i64(), vec![0, 1, 1, 2, 3, 2]);
    }

    #[test]
    fn unique_rows() {
        let x = Tensor::from_i64(&[3, 2], vec![1, 0, 0, 1, 1, 0]);
        let y = eval_op("Unique", &[("axis", Attr::Int(0))], &[Some(&x)], 4, 11).unwrap();
        assert_eq!((y[0].shape.clone(), y[0].to_i64()), (vec![2, 2], vec![0, 1, 1, 0]));
        assert_eq!(y[2].to_i64(), vec![1, 0, 1]);
    }
}
