//! Unary ops: math functions, activations, predicates (IsNaN, IsInf), Not, BitwiseNot, Clip.

use super::kernels::{f32_to_half, half_to_f32, map_int_data, IntElem, Real};
use crate::bail;
use crate::graph::{opt, req, same_as_input, AttrView, EvalCx, InferCx, OpDef, OpResult};
use crate::tensor::{Data, Tensor};
use crate::types::{DType, TensorType};

/// Which unary function a [`Unary`] op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Un {
    Abs,
    Neg,
    Floor,
    Ceil,
    Round,
    Sqrt,
    Reciprocal,
    Exp,
    Log,
    Sin,
    Cos,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Asinh,
    Acosh,
    Atanh,
    Tanh,
    Sign,
    Erf,
    Relu,
    LeakyRelu,
    Elu,
    Selu,
    Celu,
    Sigmoid,
    HardSigmoid,
    HardSwish,
    Softplus,
    Softsign,
    ThresholdedRelu,
    Gelu,
    /// Gelu with `approximate="tanh"` (chosen at run time; not registered by itself).
    GeluTanh,
    Mish,
    Shrink,
    Swish,
}

impl Un {
    /// Every registered unary op with its ONNX op type.
    pub(super) const TABLE: [(Un, &'static str); 38] = [
        (Un::Abs, "Abs"),
        (Un::Neg, "Neg"),
        (Un::Floor, "Floor"),
        (Un::Ceil, "Ceil"),
        (Un::Round, "Round"),
        (Un::Sqrt, "Sqrt"),
        (Un::Reciprocal, "Reciprocal"),
        (Un::Exp, "Exp"),
        (Un::Log, "Log"),
        (Un::Sin, "Sin"),
        (Un::Cos, "Cos"),
        (Un::Tan, "Tan"),
        (Un::Asin, "Asin"),
        (Un::Acos, "Acos"),
        (Un::Atan, "Atan"),
        (Un::Sinh, "Sinh"),
        (Un::Cosh, "Cosh"),
        (Un::Asinh, "Asinh"),
        (Un::Acosh, "Acosh"),
        (Un::Atanh, "Atanh"),
        (Un::Tanh, "Tanh"),
        (Un::Sign, "Sign"),
        (Un::Erf, "Erf"),
        (Un::Relu, "Relu"),
        (Un::LeakyRelu, "LeakyRelu"),
        (Un::Elu, "Elu"),
        (Un::Selu, "Selu"),
        (Un::Celu, "Celu"),
        (Un::Sigmoid, "Sigmoid"),
        (Un::HardSigmoid, "HardSigmoid"),
        (Un::HardSwish, "HardSwish"),
        (Un::Softplus, "Softplus"),
        (Un::Softsign, "Softsign"),
        (Un::ThresholdedRelu, "ThresholdedRelu"),
        (Un::Gelu, "Gelu"),
        (Un::Mish, "Mish"),
        (Un::Shrink, "Shrink"),
        (Un::Swish, "Swish"),
    ];

    fn name(self) -> &'static str {
        // GeluTanh is the only variant not in the table.
        Un::TABLE.iter().find(|e| e.0 == self).map_or("Gelu", |e| e.1)
    }

    /// Ops ONNX also defines on integer tensors.
    fn takes_ints(self) -> bool {
        matches!(self, Un::Abs | Un::Neg | Un::Sign | Un::Relu | Un::Shrink)
    }
}

/// The attribute parameters of an activation (alpha, beta, gamma), already defaulted.
#[derive(Clone, Copy)]
struct Params<T> {
    a: T,
    b: T,
    g: T,
}

impl Params<f64> {
    /// Reads the op's attributes; also resolves Gelu's `approximate` into [`Un::GeluTanh`].
    fn read(op: Un, attrs: &AttrView) -> OpResult<(Un, Params<f64>)> {
        let f = |name: &str, d: f32| attrs.float(name, d).map(f64::from);
        let mut p = Params { a: 0.0, b: 0.0, g: 0.0 };
        let mut op = op;
        match op {
            Un::LeakyRelu => p.a = f("alpha", 0.01)?,
            Un::Elu | Un::Celu | Un::ThresholdedRelu | Un::Swish => p.a = f("alpha", 1.0)?,
            Un::Selu => {
                p.a = f("alpha", 1.673_263_2)?;
                p.g = f("gamma", 1.050_701)?;
            }
            Un::HardSigmoid => {
                p.a = f("alpha", 0.2)?;
                p.b = f("beta", 0.5)?;
            }
            Un::Shrink => {
                p.a = f("lambd", 0.5)?;
                p.b = f("bias", 0.0)?;
            }
            Un::Gelu => match attrs.string("approximate", "none")?.as_str() {
                "none" => {}
                "tanh" => op = Un::GeluTanh,
                other => {
                    bail!("attribute 'approximate' must be \"none\" or \"tanh\", found {other:?}")
                }
            },
            _ => {}
        }
        Ok((op, p))
    }

    fn cast<T: Real>(self) -> Params<T> {
        Params { a: T::c(self.a), b: T::c(self.b), g: T::c(self.g) }
    }
}

fn clamp01<T: Real>(t: T) -> T {
    if t < T::ZERO {
        T::ZERO
    } else if t > T::ONE {
        T::ONE
    } else {
        t
    }
}

fn sigmoid<T: Real>(v: T) -> T {
    // exp of a non-positive number never overflows; both branches are cheap selects.
    let e = (-v.abs()).exp();
    let r = T::ONE / (T::ONE + e);
    if v >= T::ZERO {
        r
    } else {
        e * r
    }
}

fn softplus<T: Real>(v: T) -> T {
    if v > T::ZERO {
        v + (-v).exp().ln_1p()
    } else {
        v.exp().ln_1p()
    }
}

/// `op` on every element of a float slice (one monomorphic loop per op).
fn real_kernel<T: Real>(op: Un, p: Params<T>, x: &[T]) -> Vec<T> {
    let (zero, one, half) = (T::ZERO, T::ONE, T::c(0.5));
    let Params { a, b, g } = p;
    macro_rules! each {
        ($($k:ident => |$v:ident| $e:expr),* $(,)?) => {
            match op { $(Un::$k => x.iter().map(|&$v| $e).collect(),)* }
        };
    }
    each! {
        Abs => |v| v.abs(),
        Neg => |v| -v,
        Floor => |v| v.floor(),
        Ceil => |v| v.ceil(),
        Round => |v| v.round_even(),
        Sqrt => |v| v.sqrt(),
        Reciprocal => |v| one / v,
        Exp => |v| v.exp(),
        Log => |v| v.ln(),
        Sin => |v| v.sin(),
        Cos => |v| v.cos(),
        Tan => |v| v.tan(),
        Asin => |v| v.asin(),
        Acos => |v| v.acos(),
        Atan => |v| v.atan(),
        Sinh => |v| v.sinh(),
        Cosh => |v| v.cosh(),
        Asinh => |v| v.asinh(),
        Acosh => |v| v.acosh(),
        Atanh => |v| v.atanh(),
        Tanh => |v| v.tanh(),
        Sign => |v| if v > zero { one } else if v < zero { -one } else { v },
        Erf => |v| v.erf(),
        Relu => |v| if v < zero { zero } else { v },
        LeakyRelu => |v| if v < zero { a * v } else { v },
        Elu => |v| if v < zero { a * v.exp_m1() } else { v },
        Selu => |v| if v > zero { g * v } else { g * a * v.exp_m1() },
        Celu => |v| if v > zero { v } else { a * (v / a).exp_m1() },
        Sigmoid => |v| sigmoid(v),
        HardSigmoid => |v| clamp01(a * v + b),
        HardSwish => |v| v * clamp01(v / T::c(6.0) + half),
        Softplus => |v| softplus(v),
        Softsign => |v| v / (one + v.abs()),
        ThresholdedRelu => |v| if v > a { v } else { zero },
        Gelu => |v| half * v * (one + (v * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf()),
        GeluTanh => |v| {
            let k = T::c((2.0 / std::f64::consts::PI).sqrt());
            half * v * (one + (k * (v + T::c(0.044715) * v * v * v)).tanh())
        },
        Mish => |v| v * softplus(v).tanh(),
        Shrink => |v| if v < -a { v + b } else if v > a { v - b } else { zero },
        Swish => |v| v * sigmoid(a * v),
    }
}

/// `op` on an integer slice (only for [`Un::takes_ints`] ops).
fn int_kernel<T: IntElem>(op: Un, p: Params<f64>, x: &[T]) -> Vec<T> {
    match op {
        Un::Abs => x.iter().map(|v| v.wabs()).collect(),
        Un::Neg => x.iter().map(|v| v.wneg()).collect(),
        Un::Sign => {
            x.iter().map(|&v| T::from_i64(if v.is_neg() { -1 } else { i64::from(v != T::default()) })).collect()
        }
        Un::Relu => x.iter().map(|&v| if v.is_neg() { T::default() } else { v }).collect(),
        _ => x
            .iter()
            .map(|&v| {
                let f = v.as_f64();
                T::from_f64(if f < -p.a {
                    f + p.b
                } else if f > p.a {
                    f - p.b
                } else {
                    0.0
                })
            })
            .collect(),
    }
}

/// A unary elementwise op `y = f(x)` of the same type and shape: math functions (Abs, Exp,
/// Sin, Erf, Round half-to-even, ...) and activations (Relu, Sigmoid, Gelu, Selu, ...), with
/// their ONNX attribute defaults. Floats compute natively (f16/bf16 in f32); Abs, Neg, Sign,
/// Relu and Shrink also take integers.
pub(super) struct Unary(pub(super) Un);

impl OpDef for Unary {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let t = cx.input(0)?;
        if !(t.dtype.is_float() || t.dtype.is_int() && self.0.takes_ints()) {
            bail!("{} is not defined on {} tensors", self.0.name(), t.dtype);
        }
        same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let (op, p) = Params::read(self.0, &cx.attrs)?;
        let data = match &x.data {
            Data::F32(v) => Data::F32(real_kernel(op, p.cast(), v)),
            Data::F64(v) => Data::F64(real_kernel(op, p, v)),
            d => match half_to_f32(d) {
                Some(v) => f32_to_half(d, real_kernel(op, p.cast(), &v)),
                None if op.takes_ints() => {
                    map_int_data!(d, v => int_kernel(op, p, v), else bail!("{} is not defined on {} tensors", op.name(), d.dtype()))
                }
                None => bail!("{} is not defined on {} tensors", op.name(), d.dtype()),
            },
        };
        Ok(vec![Tensor::new(x.shape.clone(), data)])
    }
}

fn expect_float(t: &TensorType, op: &str) -> OpResult<()> {
    if !t.dtype.is_float() {
        bail!("{op} expects a float tensor, found {}", t.dtype);
    }
    Ok(())
}

fn bool_like(cx: &InferCx) -> OpResult<Vec<TensorType>> {
    let t = cx.input(0)?;
    Ok(vec![TensorType { dtype: DType::Bool, shape: t.shape.clone() }])
}

/// IsNaN: a bool tensor, true where the float input is NaN.
pub(super) struct IsNaN;

impl OpDef for IsNaN {
    fn name(&self) -> &'static str {
        "IsNaN"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float(cx.input(0)?, "IsNaN")?;
        bool_like(cx)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let v = match &x.data {
            Data::F32(v) => v.iter().map(|x| x.is_nan()).collect(),
            d if d.dtype().is_float() => x.to_f64().into_iter().map(f64::is_nan).collect(),
            d => bail!("IsNaN expects a float tensor, found {}", d.dtype()),
        };
        Ok(vec![Tensor::from_bool(&x.shape, v)])
    }
}

/// IsInf: a bool tensor, true where the float input is +inf (if `detect_positive`, default 1)
/// or -inf (if `detect_negative`, default 1).
pub(super) struct IsInf;

impl OpDef for IsInf {
    fn name(&self) -> &'static str {
        "IsInf"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float(cx.input(0)?, "IsInf")?;
        bool_like(cx)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_float() {
            bail!("IsInf expects a float tensor, found {}", x.dtype());
        }
        let pos = cx.attrs.int("detect_positive", 1)? != 0;
        let neg = cx.attrs.int("detect_negative", 1)? != 0;
        let v = x.to_f64().into_iter().map(|v| v.is_infinite() && if v > 0.0 { pos } else { neg }).collect();
        Ok(vec![Tensor::from_bool(&x.shape, v)])
    }
}

/// Not: logical negation of a bool tensor.
pub(super) struct NotOp;

impl OpDef for NotOp {
    fn name(&self) -> &'static str {
        "Not"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        if cx.input(0)?.dtype != DType::Bool {
            bail!("Not expects a bool tensor, found {}", cx.input(0)?.dtype);
        }
        same_as_input(cx, 0)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let Data::Bool(v) = &x.data else { bail!("Not expects a bool tensor, found {}", x.dtype()) };
        Ok(vec![Tensor::from_bool(&x.shape, v.iter().map(|b| !b).collect())])
    }
}

/// BitwiseNot: flips every bit of an integer tensor.
pub(super) struct BitwiseNot;

impl OpDef for BitwiseNot {
    fn name(&self) -> &'static str {
        "BitwiseNot"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        if !cx.input(0)?.dtype.is_int() {
            bail!("BitwiseNot expects an integer tensor, found {}", cx.input(0)?.dtype);
        }
        same_as_input(cx, 0)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let data = map_int_data!(&x.data, v => v.iter().map(|&b| !b).collect(),
            else bail!("BitwiseNot expects an integer tensor, found {}", x.dtype()));
        Ok(vec![Tensor::new(x.shape.clone(), data)])
    }
}

/// Clip: `min(max(x, lo), hi)` with the bounds as optional scalar inputs 1 and 2 (opset >= 11)
/// or float attributes `min`/`max` (older opsets); an absent bound does not clip. NaN stays NaN;
/// when `lo > hi` every element becomes `hi` (as numpy's clip does).
pub(super) struct Clip;

fn clip_slice<T: PartialOrd + Copy>(x: &[T], lo: Option<T>, hi: Option<T>) -> Vec<T> {
    match (lo, hi) {
        (Some(l), Some(h)) => x
            .iter()
            .map(|&v| {
                let v = if v < l { l } else { v };
                if v > h {
                    h
                } else {
                    v
                }
            })
            .collect(),
        (Some(l), None) => x.iter().map(|&v| if v < l { l } else { v }).collect(),
        (None, Some(h)) => x.iter().map(|&v| if v > h { h } else { v }).collect(),
        (None, None) => x.to_vec(),
    }
}

/// A clip bound from input `i`: a one-element tensor of the data's type.
fn clip_bound<'a>(inputs: &[Option<&'a Tensor>], i: usize, dtype: DType) -> OpResult<Option<&'a Tensor>> {
    let Some(t) = opt(inputs, i) else {
        return Ok(None);
    };
    if t.len() != 1 {
        bail!("Clip bound (input {i}) must be a scalar, found shape {:?}", t.shape);
    }
    if t.dtype() != dtype {
        bail!("Clip bound (input {i}) must have the input's type {dtype}, found {}", t.dtype());
    }
    Ok(Some(t))
}

impl OpDef for Clip {
    fn name(&self) -> &'static str {
        "Clip"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let t = cx.input(0)?;
        if !t.dtype.is_numeric() {
            bail!("Clip expects a numeric tensor, found {}", t.dtype);
        }
        same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let dt = x.dtype();
        // Bounds as f64 (floats) and i64 (integers); attributes only in the old form.
        let (lo, hi): (Option<f64>, Option<f64>);
        let (mut ilo, mut ihi): (Option<i64>, Option<i64>) = (None, None);
        if cx.attrs.has("min") || cx.attrs.has("max") || cx.opset < 11 {
            lo = cx.attrs.has("min").then(|| cx.attrs.float("min", 0.0)).transpose()?.map(f64::from);
            hi = cx.attrs.has("max").then(|| cx.attrs.float("max", 0.0)).transpose()?.map(f64::from);
            // Float bounds on integers: ceil/floor so that the comparison is exact.
            ilo = lo.map(|v| IntElem::from_f64(v.ceil()));
            ihi = hi.map(|v| IntElem::from_f64(v.floor()));
        } else {
            let (l, h) = (clip_bound(inputs, 1, dt)?, clip_bound(inputs, 2, dt)?);
            lo = l.and_then(Tensor::scalar_value_f64);
            hi = h.and_then(Tensor::scalar_value_f64);
            if dt.is_int() {
                ilo = l.and_then(Tensor::scalar_value_i64);
                ihi = h.and_then(Tensor::scalar_value_i64);
            }
        }
        let c32 = |v: f64| v as f32;
        let data = match &x.data {
            Data::F32(v) => Data::F32(clip_slice(v, lo.map(c32), hi.map(c32))),
            Data::F64(v) => Data::F64(clip_slice(v, lo, hi)),
            d => match half_to_f32(d) {
                Some(v) => f32_to_half(d, clip_slice(&v, lo.map(c32), hi.map(c32))),
                None => map_int_data!(d, v => {
                    // i64 bounds wrap back to the element type exactly (same dtype).
                    let cv = |b: i64| IntElem::from_i64(b);
                    clip_slice(v, ilo.map(cv), ihi.map(cv))
                }, else bail!("Clip expects a numeric tensor, found {}", d.dtype())),
            },
        };
        Ok(vec![Tensor::new(x.shape.clone(), data)])
    }
}
