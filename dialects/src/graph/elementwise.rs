//! Elementwise ops: unary math, activations, binary arithmetic with numpy broadcasting.

use super::{binary_f64, binary_i64, broadcast_rule, map_float, req, same_as_input};
use super::{EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::bail;
use crate::tensor::Tensor;
use crate::types::TensorType;

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Unary { name: "Relu", f: |x| x.max(0.0) },
        &Unary { name: "Exp", f: f64::exp },
        &Binary { name: "Add", f: |a, b| a + b, i: |a, b| a.wrapping_add(b) },
        &Binary { name: "Sub", f: |a, b| a - b, i: |a, b| a.wrapping_sub(b) },
        &Binary { name: "Mul", f: |a, b| a * b, i: |a, b| a.wrapping_mul(b) },
        &Binary { name: "Div", f: |a, b| a / b, i: |a, b| if b == 0 { 0 } else { a.wrapping_div(b) } },
    ]);
}

/// A unary float op `y = f(x)` that keeps the input's type.
struct Unary {
    name: &'static str,
    f: fn(f64) -> f64,
}

impl OpDef for Unary {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        same_as_input(cx, 0)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_numeric() {
            bail!("expected a numeric input, found {}", x.dtype());
        }
        Ok(vec![map_float(x, self.f)])
    }
}

/// A broadcasting binary arithmetic op with a float rule and an integer rule.
struct Binary {
    name: &'static str,
    f: fn(f64, f64) -> f64,
    i: fn(i64, i64) -> i64,
}

impl OpDef for Binary {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        broadcast_rule(cx, None)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        if a.dtype() != b.dtype() {
            bail!("both inputs must have one type, found {} and {}", a.dtype(), b.dtype());
        }
        let t = a.dtype();
        let y = if t.is_float() { binary_f64(a, b, t, self.f)? } else { binary_i64(a, b, t, self.i)? };
        Ok(vec![y])
    }
}
