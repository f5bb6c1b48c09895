//! Softmax, LogSoftmax, Hardmax and Dropout.

use super::{uses_f32, Real};
use crate::bail;
use crate::graph::{norm_axis, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &SoftmaxLike { name: "Softmax", kind: Kind::Softmax },
        &SoftmaxLike { name: "LogSoftmax", kind: Kind::LogSoftmax },
        &SoftmaxLike { name: "Hardmax", kind: Kind::Hardmax },
        &Dropout,
    ]);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Softmax,
    LogSoftmax,
    Hardmax,
}

/// Softmax / LogSoftmax / Hardmax along `axis`. Before opset 13 the input is viewed as the 2-D
/// matrix `[prod(shape[..axis]), prod(shape[axis..])]` (default axis 1) and the op runs along its rows;
/// from opset 13 it runs along the single axis (default -1).
struct SoftmaxLike {
    name: &'static str,
    kind: Kind,
}

/// `(outer, n, inner)`: the op runs over `n` elements with stride `inner`.
fn layout(shape: &[usize], axis: i64, opset: i64) -> OpResult<(usize, usize, usize)> {
    if shape.is_empty() {
        return Ok((1, 1, 1));
    }
    let a = norm_axis(axis, shape.len())?;
    let outer: usize = shape[..a].iter().product();
    if opset < 13 {
        Ok((outer, shape[a..].iter().product(), 1))
    } else {
        Ok((outer, shape[a], shape[a + 1..].iter().product()))
    }
}

fn run<T: Real>(kind: Kind, x: &[T], (outer, n, inner): (usize, usize, usize)) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let mut buf = vec![T::ZERO; n];
    for o in 0..outer {
        for q in 0..inner {
            let base = o * n * inner + q;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = x[base + i * inner];
            }
            let mut mx = T::NEG_INF;
            let mut arg = 0;
            for (i, &v) in buf.iter().enumerate() {
                if v > mx || (i == 0 && v.f64().is_nan()) {
                    mx = v;
                    arg = i;
                }
            }
            match kind {
                Kind::Hardmax => {
                    if n > 0 {
                        buf.iter_mut().for_each(|b| *b = T::ZERO);
                        buf[arg] = T::ONE;
                    }
                }
                Kind::Softmax | Kind::LogSoftmax => {
                    let mut sum = T::ZERO;
                    for b in buf.iter_mut() {
                        let e = (*b - mx).exp();
                        sum += e;
                        if kind == Kind::Softmax {
                            *b = e;
                        }
                    }
                    if kind == Kind::Softmax {
                        buf.iter_mut().for_each(|b| *b = *b / sum);
                    } else {
                        let ls = T::of(sum.f64().ln());
                        buf.iter_mut().for_each(|b| *b = *b - mx - ls);
                    }
                }
            }
            for (i, &b) in buf.iter().enumerate() {
                y[base + i * inner] = b;
            }
        }
    }
    y
}

impl OpDef for SoftmaxLike {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("{} needs a float input, found {}", self.name, x.dtype);
        }
        if let Some(rank) = x.rank().filter(|&r| r > 0) {
            norm_axis(cx.attrs.int("axis", if cx.opset < 13 { 1 } else { -1 })?, rank)?;
        }
        Ok(vec![x.clone()])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let t = x.dtype();
        if !t.is_float() {
            bail!("{} needs a float input, found {t}", self.name);
        }
        let axis = cx.attrs.int("axis", if cx.opset < 13 { 1 } else { -1 })?;
        let l = layout(&x.shape, axis, cx.opset)?;
        let y = if uses_f32(t) {
            f32::tensor(t, &x.shape, run(self.kind, &f32::values(x), l))
        } else {
            f64::tensor(t, &x.shape, run(self.kind, &f64::values(x), l))
        };
        Ok(vec![y])
    }
}

/// Dropout. In inference (the default) it is the identity and the optional mask is all true;
/// in training mode it zeroes elements with probability `ratio` and scales the rest by `1/(1-ratio)`.
/// `ratio` is an attribute before opset 12 and an input after; before opset 10 the mask has the data's type.
struct Dropout;

impl OpDef for Dropout {
    fn name(&self) -> &'static str {
        "Dropout"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?.clone();
        let mask_t = if cx.opset < 10 { x.dtype } else { DType::Bool };
        let mask = TensorType { dtype: mask_t, shape: x.shape.clone() };
        Ok(vec![x, mask])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let ratio = match opt(inputs, 1) {
            Some(r) => match r.scalar_value_f64() {
                Some(v) => v,
                None => bail!("ratio must be a scalar, found shape {:?}", r.shape),
            },
            None => cx.attrs.float("ratio", 0.5)? as f64,
        };
        let training = match opt(inputs, 2) {
            Some(t) => t.to_bool().first().copied().unwrap_or(false),
            // Before opset 7 `is_test` chose the mode; kiln runs such models for inference.
            None => false,
        };
        let mask_t = if cx.opset < 10 { x.dtype() } else { DType::Bool };
        if !training || ratio == 0.0 {
            let mask = Tensor::from_f64(mask_t, &x.shape, vec![1.0; x.len()]);
            return Ok(vec![x.clone(), mask]);
        }
        if !(0.0..1.0).contains(&ratio) || !x.dtype().is_float() {
            bail!("training Dropout needs a float input and a ratio in [0, 1), found {} and {ratio}", x.dtype());
        }
        // A deterministic xorshift stream seeded by the `seed` attribute.
        let mut state = (cx.attrs.int("seed", 0)? as u64) ^ 0x9E37_79B9_7F4A_7C15;
        let scale = 1.0 / (1.0 - ratio);
        let xv = x.to_f64();
        let mut keep = Vec::with_capacity(xv.len());
        let y = xv
            .iter()
            .map(|&v| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let k = (state >> 11) as f64 / (1u64 << 53) as f64 >= ratio;
                keep.push(if k { 1.0 } else { 0.0 });
                if k {
                    v * scale
                } else {
                    0.0
                }
            })
            .collect();
        Ok(vec![Tensor::from_f64(x.dtype(), &x.shape, y), Tensor::from_f64(mask_t, &x.shape, keep)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one_and_old_opsets_flatten() {
        let x = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let y = run(Kind::Softmax, &x, layout(&[2, 3], -1, 13).unwrap());
        assert!((y[0] + y[1] + y[2] - 1.0).abs() < 1e-12);
        assert_eq!(layout(&[2, 3, 4], 1, 11).unwrap(), (2, 12, 1));
        assert_eq!(layout(&[2, 3, 4], 1, 13).unwrap(), (2, 3, 4));
        let h = run(Kind::Hardmax, &[1.0f32, 3.0, 3.0], (1, 3, 1));
        assert_eq!(h, vec![0.0, 1.0, 0.0]);
    }
}
