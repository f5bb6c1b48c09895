//! `CumSum` and `CumProd`: running sums/products along one axis.

use super::{axis_of, int_scalar, split_at_axis, with_elems, Elem};
use crate::bail;
use crate::graph::{req, same_as_input, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::TensorType;

pub fn register(r: &mut Registry) {
    r.add_all(&[&Cumulative { name: "CumSum", prod: false }, &Cumulative { name: "CumProd", prod: true }]);
}

/// `CumSum`/`CumProd`: `y[..., j, ...] = x[..., 0, ...] (+|*) ... (+|*) x[..., j, ...]` along the
/// axis given by input 1; `exclusive` leaves out element `j` itself, `reverse` runs from the end.
struct Cumulative {
    name: &'static str,
    prod: bool,
}

impl OpDef for Cumulative {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_numeric() {
            bail!("{} expects a numeric input, found {}", self.name, x.dtype);
        }
        same_as_input(cx, 0)
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let axis_t = req(inputs, 1)?;
        if axis_t.rank() > 1 {
            bail!("axis must be a scalar, found shape {:?}", axis_t.shape);
        }
        let axis = axis_of(int_scalar(axis_t, "axis")?, x.rank())?;
        let exclusive = cx.attrs.int("exclusive", 0)? != 0;
        let reverse = cx.attrs.int("reverse", 0)? != 0;
        let (outer, n, inner) = split_at_axis(&x.shape, axis);
        let dt = x.dtype();
        let lanes = Lanes { outer, n, inner, exclusive, reverse };
        let y = if dt.is_float() {
            let v = with_elems!(&x.data, v => {
                if self.prod {
                    lanes.scan(v, 1.0, |a, e| a * e.f64())
                } else {
                    lanes.scan(v, 0.0, |a, e| a + e.f64())
                }
            }, str => vec![]);
            Tensor::from_f64(dt, &x.shape, v)
        } else if dt.is_int() {
            let v = with_elems!(&x.data, v => {
                if self.prod {
                    lanes.scan(v, 1i64, |a, e| a.wrapping_mul(e.i64()))
                } else {
                    lanes.scan(v, 0i64, |a, e| a.wrapping_add(e.i64()))
                }
            }, str => vec![]);
            Tensor::from_i64_as(dt, &x.shape, v)
        } else {
            bail!("{} expects a numeric input, found {dt}", self.name);
        };
        Ok(vec![y])
    }
}

/// The `[outer, n, inner]` layout of a scan along one axis.
struct Lanes {
    outer: usize,
    n: usize,
    inner: usize,
    exclusive: bool,
    reverse: bool,
}

impl Lanes {
    fn scan<T: Copy, A: Copy>(&self, x: &[T], init: A, f: impl Fn(A, T) -> A) -> Vec<A> {
        let (n, inner) = (self.n, self.inner);
        let mut out = vec![init; self.outer * n * inner];
        let mut acc = vec![init; inner];
        for o in 0..self.outer {
            acc.fill(init);
            for step in 0..n {
                let j = if self.reverse { n - 1 - step } else { step };
                let off = (o * n + j) * inner;
                let (xs, ys) = (&x[off..off + inner], &mut out[off..off + inner]);
                for ((a, y), &e) in acc.iter_mut().zip(ys).zip(xs) {
                    if self.exclusive {
                        *y = *a;
                        *a = f(*a, e);
                    } else {
                        *a = f(*a, e);
                        *y = *a;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::attr::Attr;
    use crate::tensor::Tensor;

    #[test]
    fn cumsum_exclusive_reverse() {
        let x = Tensor::from_f32(&[4], vec![1.0, 2.0, 3.0, 4.0]);
        let ax = Tensor::from_i64(&[], vec![0]);
        let y = eval_op("CumSum", &[], &[Some(&x), Some(&ax)], 1, 14).unwrap();
        assert_eq!(y[0].to_f64(), vec![1.0, 3.0, 6.0, 10.0]);
        let a = [("exclusive", Attr::Int(1)), ("reverse", Attr::Int(1))];
        let y = eval_op("CumSum", &a, &[Some(&x), Some(&ax)], 1, 14).unwrap();
        assert_eq!(y[0].to_f64(), vec![9.0, 7.0, 4.0, 0.0]);
        let xi = Tensor::from_i64(&[2, 2], vec![1, 2, 3, 4]);
        let ax1 = Tensor::from_i64(&[], vec![-1]);
        let y = eval_op("CumProd", &[], &[Some(&xi), Some(&ax1)], 1, 26).unwrap();
        assert_eq!(y[0].to_i64(), vec![1, 2, 3, 12]);
    }
}
