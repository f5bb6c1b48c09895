//! `ReduceSum`, `ReduceMean`, `ReduceMax`, `ReduceMin`, `ReduceProd`, `ReduceL1`, `ReduceL2`,
//! `ReduceLogSum`, `ReduceLogSumExp`, `ReduceSumSquare`.
//!
//! Axes come from the `axes` attribute (older opsets) or the optional second input (newer);
//! no axes reduce everything unless `noop_with_empty_axes` is set. Empty reductions give the
//! operation's identity (0 for sums, 1 for products, -inf/lowest for max, -inf for log-sums).

use super::{fold_axes, map_elems, with_elems, Elem};
use crate::bail;
use crate::graph::{
    ints_of, norm_axes, opt, req, AttrView, EvalCx, InferCx, OpDef, OpResult, Registry,
};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Reduce {
            name: "ReduceSum",
            kind: Kind::Sum,
        },
        &Reduce {
            name: "ReduceMean",
            kind: Kind::Mean,
        },
        &Reduce {
            name: "ReduceMax",
            kind: Kind::Max,
        },
        &Reduce {
            name: "ReduceMin",
            kind: Kind::Min,
        },
        &Reduce {
            name: "ReduceProd",
            kind: Kind::Prod,
        },
        &Reduce {
            name: "ReduceL1",
            kind: Kind::L1,
        },
        &Reduce {
            name: "ReduceL2",
            kind: Kind::L2,
        },
        &Reduce {
            name: "ReduceLogSum",
            kind: Kind::LogSum,
        },
        &Reduce {
            name: "ReduceLogSumExp",
            kind: Kind::LogSumExp,
        },
        &Reduce {
            name: "ReduceSumSquare",
            kind: Kind::SumSquare,
        },
    ]);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

/// A reduction over a set of axes: `y = reduce(x, axes)` with the operation `kind`
/// (sum, mean, max, min, product, L1/L2 norm, log of sum, log-sum-exp, sum of squares).
struct Reduce {
    name: &'static str,
    kind: Kind,
}

/// The requested axes: `Some(list)` (possibly empty) or `None` when unknown at compile time.
fn requested_axes(
    attrs: AttrView,
    axes_input: Option<Option<&Tensor>>,
) -> OpResult<Option<Vec<i64>>> {
    if let Some(a) = attrs.ints("axes")? {
        return Ok(Some(a));
    }
    match axes_input {
        None => Ok(Some(vec![])),
        Some(None) => Ok(None),
        Some(Some(t)) => Ok(Some(ints_of(t)?)),
    }
}

/// Which axes of a rank-`rank` tensor are reduced.
fn reduced_mask(axes: &[i64], rank: usize, noop: bool) -> OpResult<Vec<bool>> {
    if axes.is_empty() {
        return Ok(vec![!noop; rank]);
    }
    let mut mask = vec![false; rank];
    for a in norm_axes(axes, rank)? {
        mask[a] = true;
    }
    Ok(mask)
}

fn out_shape<D: Clone>(shape: &[D], mask: &[bool], keepdims: bool, one: D) -> Vec<D> {
    shape
        .iter()
        .zip(mask)
        .filter_map(|(d, &r)| match (r, keepdims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(one.clone()),
            (true, false) => None,
        })
        .collect()
}

impl OpDef for Reduce {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        self.check_dtype(x.dtype)?;
        let keepdims = cx.attrs.int("keepdims", 1)? != 0;
        let noop = cx.attrs.int("noop_with_empty_axes", 0)? != 0;
        let axes_input = cx.opt_input(1).map(|_| cx.const_input(1));
        let axes = requested_axes(cx.attrs, axes_input)?;
        let Some(shape) = &x.shape else {
            return Ok(vec![TensorType::unranked(x.dtype)]);
        };
        let Some(axes) = axes else {
            // Axes known only at run time.
            if keepdims {
                let dims = cx.fresh_dims(shape.len());
                return Ok(vec![TensorType::new(x.dtype, dims)]);
            }
            return Ok(vec![TensorType::unranked(x.dtype)]);
        };
        let mask = reduced_mask(&axes, shape.len(), noop)?;
        Ok(vec![TensorType::new(
            x.dtype,
            out_shape(shape, &mask, keepdims, Dim::Known(1)),
        )])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        self.check_dtype(x.dtype())?;
        let keepdims = cx.attrs.int("keepdims", 1)? != 0;
        let noop = cx.attrs.int("noop_with_empty_axes", 0)? != 0;
        let axes = requested_axes(cx.attrs, Some(opt(inputs, 1)))?.unwrap_or_default();
        let mask = reduced_mask(&axes, x.rank(), noop)?;
        let shape = out_shape(&x.shape, &mask, keepdims, 1);
        let count: usize = x
            .shape
            .iter()
            .zip(&mask)
            .filter(|(_, &r)| r)
            .map(|(&d, _)| d)
            .product();
        let dt = x.dtype();
        let data = match self.kind {
            Kind::Max | Kind::Min => {
                let max = self.kind == Kind::Max;
                map_elems!(&x.data, v => extreme(v, &x.shape, &mask, max), str => bail!("{} does not support strings", self.name))
            }
            _ if dt.is_int() && !matches!(self.kind, Kind::L2 | Kind::LogSum | Kind::LogSumExp) => {
                return Ok(vec![Tensor::from_i64_as(
                    dt,
                    &shape,
                    self.int_reduce(x, &mask, count)?,
                )]);
            }
            _ => {
                return Ok(vec![Tensor::from_f64(
                    dt,
                    &shape,
                    self.float_reduce(x, &mask, count)?,
                )])
            }
        };
        Ok(vec![Tensor::new(shape, data)])
    }
}

impl Reduce {
    fn check_dtype(&self, dt: DType) -> OpResult<()> {
        let ok = match self.kind {
            Kind::Max | Kind::Min => dt != DType::String,
            _ => dt.is_numeric(),
        };
        if !ok {
            bail!("{} does not support element type {dt}", self.name);
        }
        Ok(())
    }

    /// Float semantics, accumulated in f64 (read in place from any element type).
    fn float_reduce(&self, x: &Tensor, mask: &[bool], count: usize) -> OpResult<Vec<f64>> {
        let sum = |g| sum_map(x, mask, g);
        Ok(match self.kind {
            Kind::Sum => sum(Map::Id),
            Kind::Mean => sum(Map::Id).into_iter().map(|a| a / count as f64).collect(),
            Kind::L1 => sum(Map::Abs),
            Kind::SumSquare => sum(Map::Square),
            Kind::L2 => sum(Map::Square).into_iter().map(f64::sqrt).collect(),
            Kind::LogSum => sum(Map::Id).into_iter().map(f64::ln).collect(),
            Kind::Prod => {
                with_elems!(&x.data, v => fold_axes(v, &x.shape, mask, 1.0, |a, e| a * e.f64()),
                str => bail!("{} does not support strings", self.name))
            }
            Kind::LogSumExp => {
                let init = (f64::NEG_INFINITY, 0.0);
                let acc = with_elems!(&x.data, v => fold_axes(v, &x.shape, mask, init, |a, e| {
                    lse_step(a, e.f64())
                }), str => bail!("{} does not support strings", self.name));
                acc.into_iter()
                    .map(|(m, s)| if s.is_infinite() { s } else { m + s.ln() })
                    .collect()
            }
            Kind::Max | Kind::Min => bail!("{} is computed in the input type", self.name),
        })
    }

    /// Integer semantics: wrapping i64 accumulation, cast back to the input type.
    fn int_reduce(&self, x: &Tensor, mask: &[bool], count: usize) -> OpResult<Vec<i64>> {
        let s = &x.shape;
        macro_rules! fold {
            ($init:expr, |$a:ident, $e:ident| $body:expr) => {
                with_elems!(&x.data, v => fold_axes(v, s, mask, $init, |$a: i64, e| {
                    let $e = e.i64();
                    $body
                }), str => bail!("{} does not support strings", self.name))
            };
        }
        Ok(match self.kind {
            Kind::Sum => fold!(0, |a, e| a.wrapping_add(e)),
            Kind::Mean => fold!(0, |a, e| a.wrapping_add(e))
                .into_iter()
                .map(|a| {
                    if count == 0 {
                        0
                    } else {
                        a.wrapping_div(count as i64)
                    }
                })
                .collect(),
            Kind::Prod => fold!(1, |a, e| a.wrapping_mul(e)),
            Kind::L1 => fold!(0, |a, e| a.wrapping_add(e.wrapping_abs())),
            Kind::SumSquare => fold!(0, |a, e| a.wrapping_add(e.wrapping_mul(e))),
            _ => bail!("{} of integers is computed in f64", self.name),
        })
    }
}

/// The elementwise map applied before summing.
#[derive(Clone, Copy)]
enum Map {
    Id,
    Abs,
    Square,
}

/// `sum(map(x))` over the masked axes, in f64; each map gets its own monomorphized loop.
fn sum_map(x: &Tensor, mask: &[bool], m: Map) -> Vec<f64> {
    fn go<T: Elem>(v: &[T], s: &[usize], mask: &[bool], m: Map) -> Vec<f64> {
        match m {
            Map::Id => fold_axes(v, s, mask, 0.0, |a, e| a + e.f64()),
            Map::Abs => fold_axes(v, s, mask, 0.0, |a, e| a + e.f64().abs()),
            Map::Square => fold_axes(v, s, mask, 0.0, |a, e| {
                let e = e.f64();
                a + e * e
            }),
        }
    }
    with_elems!(&x.data, v => go(v, &x.shape, mask, m), str => vec![])
}

/// One step of a streaming log-sum-exp: the accumulator is (running max, sum of exp(x - max)).
/// Infinite inputs are kept out of the max (as ONNX's reference does), so `+inf` yields `+inf`.
fn lse_step((m, s): (f64, f64), e: f64) -> (f64, f64) {
    if e == f64::NEG_INFINITY {
        (m, s)
    } else if e == f64::INFINITY || s.is_infinite() {
        (m, f64::INFINITY)
    } else if e.is_nan() || m.is_nan() {
        (f64::NAN, f64::NAN)
    } else if e > m {
        (e, s * (m - e).exp() + 1.0)
    } else {
        (m, s + (e - m).exp())
    }
}

/// Max or min over the masked axes in the input's own type (NaN propagates).
fn extreme<T: Elem>(v: &[T], shape: &[usize], mask: &[bool], max: bool) -> Vec<T> {
    #[allow(clippy::eq_op)]
    let is_nan = |e: T| e != e;
    if max {
        fold_axes(v, shape, mask, T::LOWEST, |a, e| {
            if e > a || is_nan(e) {
                e
            } else {
                a
            }
        })
    } else {
        fold_axes(v, shape, mask, T::HIGHEST, |a, e| {
            if e < a || is_nan(e) {
                e
            } else {
                a
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use super::*;
    use crate::attr::Attr;

    fn run(name: &str, attrs: &[(&str, Attr)], x: Tensor, axes: Option<Vec<i64>>) -> Tensor {
        let axes = axes.map(|v| Tensor::from_i64(&[v.len()], v));
        eval_op(name, attrs, &[Some(&x), axes.as_ref()], 1, 18)
            .unwrap()
            .remove(0)
    }

    #[test]
    fn sum_mean_max_over_axes() {
        let x = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let y = run("ReduceSum", &[], x.clone(), Some(vec![1]));
        assert_eq!((y.shape.clone(), y.to_f64()), (vec![2, 1], vec![6.0, 15.0]));
        let y = run(
            "ReduceMean",
            &[("keepdims", Attr::Int(0))],
            x.clone(),
            Some(vec![0]),
        );
        assert_eq!(
            (y.shape.clone(), y.to_f64()),
            (vec![3], vec![2.5, 3.5, 4.5])
        );
        let y = run("ReduceMax", &[("keepdims", Attr::Int(0))], x.clone(), None);
        assert_eq!((y.shape.clone(), y.to_f64()), (vec![], vec![6.0]));
        let y = run("ReduceLogSumExp", &[], x, Some(vec![1]));
        assert!((y.to_f64()[0] - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln()).abs() < 1e-5);
    }

    #[test]
    fn empty_sets_and_noop() {
        let x = Tensor::from_f32(&[2, 0, 4], vec![]);
        let y = run("ReduceProd", &[], x.clone(), Some(vec![1]));
        assert_eq!((y.shape.clone(), y.to_f64()), (vec![2, 1, 4], vec![1.0; 8]));
        let y = run("ReduceMin", &[], x, Some(vec![1]));
        assert!(y.to_f64().iter().all(|v| *v == f64::INFINITY));
        let x = Tensor::from_i64(&[2], vec![3, -4]);
        let y = run(
            "ReduceSumSquare",
            &[("noop_with_empty_axes", Attr::Int(1))],
            x,
            Some(vec![]),
        );
        assert_eq!(y.to_i64(), vec![9, 16]);
        let b = Tensor::from_bool(&[2, 2], vec![true, false, false, false]);
        let y = run("ReduceMax", &[("axes", Attr::Ints(vec![1]))], b, None);
        assert_eq!(y.to_bool(), vec![true, false]);
    }
}
