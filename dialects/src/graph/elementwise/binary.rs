//! Broadcasting binary ops: arithmetic (Add, Sub, Mul, Div, Pow, Mod), PRelu, bit shifts and
//! bitwise ops, logical ops (And, Or, Xor) and comparisons.

use super::kernels::{f32_to_half, half_to_f32, ipow, zip_int_data, zip_map, IntElem, Real};
use crate::bail;
use crate::graph::{norm_axis, req, AttrView, EvalCx, InferCx, OpDef, OpResult};
use crate::tensor::{Data, Tensor};
use crate::types::{broadcast_dims, DType, Dim, Shape, TensorType};

/// A binary elementwise function, shared by the binary and variadic ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bin {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// Python-style remainder (sign of the divisor): Mod with `fmod=0`.
    Mod,
    /// C-style remainder (sign of the dividend): Mod with `fmod=1`.
    Fmod,
    Max,
    Min,
    PRelu,
    BitAnd,
    BitOr,
    BitXor,
    Shl,
    Shr,
}

impl Bin {
    fn int_only(self) -> bool {
        matches!(self, Bin::BitAnd | Bin::BitOr | Bin::BitXor | Bin::Shl | Bin::Shr)
    }
}

/// Python's float `%`: the remainder takes the divisor's sign (a zero remainder too).
fn py_mod<T: Real>(x: T, y: T) -> T {
    let r = x.fmod(y);
    if r == T::ZERO {
        T::ZERO.copysign(y)
    } else if (r < T::ZERO) != (y < T::ZERO) {
        r + y
    } else {
        r
    }
}

/// NaN-propagating maximum/minimum (numpy's `maximum`/`minimum`).
fn nan_max<T: Real>(x: T, y: T) -> T {
    if x > y || x.is_nan() {
        x
    } else {
        y
    }
}

fn nan_min<T: Real>(x: T, y: T) -> T {
    if x < y || x.is_nan() {
        x
    } else {
        y
    }
}

fn real_bin<T: Real>(op: Bin, a: &[T], sa: &[usize], b: &[T], sb: &[usize]) -> OpResult<(Shape, Vec<T>)> {
    let zero = T::ZERO;
    macro_rules! each {
        ($($k:ident => |$x:ident, $y:ident| $e:expr),* $(,)?) => {
            match op {
                $(Bin::$k => zip_map(a, sa, b, sb, |&$x, &$y| $e),)*
                _ => bail!("{op:?} is not defined on float tensors"),
            }
        };
    }
    each! {
        Add => |x, y| x + y,
        Sub => |x, y| x - y,
        Mul => |x, y| x * y,
        Div => |x, y| x / y,
        Pow => |x, y| x.powf(y),
        Mod => |x, y| py_mod(x, y),
        Fmod => |x, y| x.fmod(y),
        Max => |x, y| nan_max(x, y),
        Min => |x, y| nan_min(x, y),
        PRelu => |x, y| if x < zero { x * y } else { x },
    }
}

/// Bit shift following the ONNX reference: shifts outside `[0, bits)` give 0 (left) or the
/// sign fill (right); signed left shifts move bits like unsigned ones.
fn shift<T: IntElem>(x: T, s: T, left: bool) -> T {
    let out_of_range = s.is_neg() || (s.as_i64() as u64) >= u64::from(T::BITS);
    match (left, out_of_range) {
        (true, true) => T::default(),
        (true, false) => x.shl_bits(s.as_i64() as u32),
        (false, true) => T::from_i64(if x.is_neg() { -1 } else { 0 }),
        (false, false) => x.shr_bits(s.as_i64() as u32),
    }
}

fn int_bin<T: IntElem>(op: Bin, a: &[T], sa: &[usize], b: &[T], sb: &[usize]) -> OpResult<(Shape, Vec<T>)> {
    macro_rules! each {
        ($($k:ident => |$x:ident, $y:ident| $e:expr),* $(,)?) => {
            match op { $(Bin::$k => zip_map(a, sa, b, sb, |&$x, &$y| $e),)* }
        };
    }
    each! {
        Add => |x, y| x.wadd(y),
        Sub => |x, y| x.wsub(y),
        Mul => |x, y| x.wmul(y),
        Div => |x, y| x.cdiv(y),
        Pow => |x, y| ipow(x, y),
        Mod => |x, y| {
            let r = x.crem(y);
            if r != T::default() && r.is_neg() != y.is_neg() { r.wadd(y) } else { r }
        },
        Fmod => |x, y| x.crem(y),
        Max => |x, y| x.max(y),
        Min => |x, y| x.min(y),
        PRelu => |x, y| if x.is_neg() { x.wmul(y) } else { x },
        BitAnd => |x, y| x & y,
        BitOr => |x, y| x | y,
        BitXor => |x, y| x ^ y,
        Shl => |x, y| shift(x, y, true),
        Shr => |x, y| shift(x, y, false),
    }
}

/// `op(a, b)` with numpy broadcasting, `b` read with shape `sb` (its own, or the legacy
/// broadcast form of it). Both operands must have one type.
pub(super) fn binary(op: Bin, a: &Tensor, b: &Tensor, sb: &[usize]) -> OpResult<Tensor> {
    let sa = &a.shape[..];
    if a.dtype() != b.dtype() {
        bail!("both inputs must have one type, found {} and {}", a.dtype(), b.dtype());
    }
    let (shape, data) = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => {
            let (s, v) = real_bin(op, x, sa, y, sb)?;
            (s, Data::F32(v))
        }
        (Data::F64(x), Data::F64(y)) => {
            let (s, v) = real_bin(op, x, sa, y, sb)?;
            (s, Data::F64(v))
        }
        (d, e) => match (half_to_f32(d), half_to_f32(e)) {
            (Some(x), Some(y)) => {
                let (s, v) = real_bin(op, &x, sa, &y, sb)?;
                (s, f32_to_half(d, v))
            }
            _ => {
                let shape: Shape;
                let data = zip_int_data!(d, e, (x, y) => {
                    let (s, v) = int_bin(op, x, sa, y, sb)?;
                    shape = s;
                    v
                }, else bail!("{op:?} is not defined on {} tensors", d.dtype()));
                (shape, data)
            }
        },
    };
    Ok(Tensor::new(shape, data))
}

/// Pow with a base and exponent of different types: the result has the base's type.
fn pow_mixed(a: &Tensor, b: &Tensor, sb: &[usize]) -> OpResult<Tensor> {
    if !b.dtype().is_numeric() {
        bail!("Pow exponent must be numeric, found {}", b.dtype());
    }
    let t = a.dtype();
    if t.is_int() && b.dtype().is_int() {
        let (s, v) = zip_map(&a.to_i64(), &a.shape, &b.to_i64(), sb, |&x, &y| ipow(x, y))?;
        return Ok(Tensor::from_i64_as(t, &s, v));
    }
    if let (Some(x), Data::I32(y)) = (a.as_f32(), &b.data) {
        let (s, v) = zip_map(x, &a.shape, y, sb, |&x, &y| x.powi(y))?;
        return Ok(Tensor::from_f32(&s, v));
    }
    let (s, v) = zip_map(&a.to_f64(), &a.shape, &b.to_f64(), sb, |&x, &y| x.powf(y))?;
    Ok(Tensor::from_f64(t, &s, v))
}

/// `x^2` and `x^0.5` of an f32 tensor without calling `powf` per element (LayerNorm
/// decompositions square and take roots of whole activations).
fn square_or_sqrt(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let (x, e) = (a.as_f32()?, b.as_f32()?.first()?);
    let v = if *e == 2.0 {
        x.iter().map(|v| v * v).collect()
    } else if *e == 0.5 {
        x.iter().map(|v| v.sqrt()).collect()
    } else {
        return None;
    };
    Some(Tensor::from_f32(&a.shape, v))
}

/// The shape `b` is read with: before opset 7, `broadcast=1` with `axis` aligns `b` to `a`'s
/// axes starting at `axis` (trailing ones are appended); otherwise `b`'s own shape.
fn legacy_ones(attrs: &AttrView, opset: i64, a_rank: usize, b_rank: usize) -> OpResult<usize> {
    if opset >= 7 || attrs.int("broadcast", 0)? == 0 || !attrs.has("axis") {
        return Ok(0);
    }
    let axis = norm_axis(attrs.int("axis", 0)?, a_rank)?;
    match a_rank.checked_sub(axis + b_rank) {
        Some(n) => Ok(n),
        None => bail!("legacy broadcast of rank {b_rank} at axis {axis} exceeds rank {a_rank}"),
    }
}

/// Numpy broadcasting of symbolic shapes (unknown rank gives an unranked result).
pub(super) fn infer_broadcast(
    cx: &mut InferCx,
    shapes: &[Option<Vec<Dim>>],
    dtype: DType,
) -> OpResult<Vec<TensorType>> {
    let mut out: Option<Vec<Dim>> = Some(Vec::new());
    for s in shapes {
        out = match (out, s) {
            (Some(a), Some(b)) => match broadcast_dims(&a, b, &mut || cx.fresh_dim()) {
                Some(r) => Some(r),
                None => bail!(
                    "shapes {} and {} cannot be broadcast together",
                    TensorType::new(dtype, a),
                    TensorType::new(dtype, b.clone())
                ),
            },
            _ => None,
        };
    }
    Ok(vec![TensorType { dtype, shape: out }])
}

/// Input shapes of a binary op for its shape rule, with the legacy broadcast applied to `b`.
fn binary_shapes(cx: &InferCx) -> OpResult<Vec<Option<Vec<Dim>>>> {
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    let mut sb = b.shape.clone();
    if let (Some(ra), Some(s)) = (a.rank(), sb.as_mut()) {
        let n = legacy_ones(&cx.attrs, cx.opset, ra, s.len())?;
        s.extend(std::iter::repeat_n(Dim::Known(1), n));
    }
    Ok(vec![a.shape.clone(), sb])
}

/// `b`'s shape for evaluation, with the legacy broadcast applied.
fn eval_b_shape(cx: &EvalCx, a: &Tensor, b: &Tensor) -> OpResult<Shape> {
    let mut s = b.shape.clone();
    s.extend(std::iter::repeat_n(1, legacy_ones(&cx.attrs, cx.opset, a.rank(), b.rank())?));
    Ok(s)
}

/// A broadcasting binary op whose output has the inputs' type: Add, Sub, Mul, Div (integer
/// division truncates toward zero; dividing by zero gives 0), Pow (exponent of any numeric
/// type; result of the base's type), Mod (`fmod` attribute: 0 is Python's sign-of-divisor
/// remainder, 1 is C's), BitShift (`direction`), PRelu (slope broadcast to the input) and
/// BitwiseAnd/Or/Xor. Integer arithmetic wraps.
pub(super) struct Arith {
    pub(super) name: &'static str,
    pub(super) op: Bin,
}

impl Arith {
    /// The function this node computes (Mod and BitShift depend on an attribute).
    fn resolve(&self, attrs: &AttrView) -> OpResult<Bin> {
        Ok(match self.op {
            Bin::Mod if attrs.int("fmod", 0)? != 0 => Bin::Fmod,
            Bin::Shl => match attrs.string("direction", "")?.as_str() {
                "LEFT" => Bin::Shl,
                "RIGHT" => Bin::Shr,
                d => bail!("attribute 'direction' must be \"LEFT\" or \"RIGHT\", found {d:?}"),
            },
            op => op,
        })
    }

    fn check_dtype(&self, op: Bin, t: DType) -> OpResult<()> {
        let ok = if op.int_only() { t.is_int() } else { t.is_numeric() };
        if !ok {
            bail!("{} is not defined on {t} tensors", self.name);
        }
        Ok(())
    }
}

impl OpDef for Arith {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let op = self.resolve(&cx.attrs)?;
        let (a, b) = (cx.input(0)?.dtype, cx.input(1)?.dtype);
        self.check_dtype(op, a)?;
        if a != b && op != Bin::Pow {
            bail!("both inputs must have one type, found {a} and {b}");
        }
        let shapes = binary_shapes(cx)?;
        infer_broadcast(cx, &shapes, a)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        let op = self.resolve(&cx.attrs)?;
        self.check_dtype(op, a.dtype())?;
        let sb = eval_b_shape(cx, a, b)?;
        if op == Bin::Pow && a.dtype() != b.dtype() {
            return Ok(vec![pow_mixed(a, b, &sb)?]);
        }
        if op == Bin::Pow && a.dtype() == DType::F32 && b.len() == 1 && sb.len() <= a.rank() {
            if let Some(y) = square_or_sqrt(a, b) {
                return Ok(vec![y]);
            }
        }
        Ok(vec![binary(op, a, b, &sb)?])
    }
}

/// Which logical function a [`Logical`] op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Logic {
    And,
    Or,
    Xor,
}

/// And, Or, Xor: broadcasting logical ops on bool tensors.
pub(super) struct Logical {
    pub(super) name: &'static str,
    pub(super) op: Logic,
}

impl OpDef for Logical {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        for i in 0..2 {
            if cx.input(i)?.dtype != DType::Bool {
                bail!("{} expects bool inputs, input {i} is {}", self.name, cx.input(i)?.dtype);
            }
        }
        let shapes = binary_shapes(cx)?;
        infer_broadcast(cx, &shapes, DType::Bool)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        let sb = eval_b_shape(cx, a, b)?;
        let (Data::Bool(x), Data::Bool(y)) = (&a.data, &b.data) else {
            bail!("{} expects bool inputs, found {} and {}", self.name, a.dtype(), b.dtype())
        };
        let (s, v) = match self.op {
            Logic::And => zip_map(x, &a.shape, y, &sb, |&p, &q| p & q)?,
            Logic::Or => zip_map(x, &a.shape, y, &sb, |&p, &q| p | q)?,
            Logic::Xor => zip_map(x, &a.shape, y, &sb, |&p, &q| p ^ q)?,
        };
        Ok(vec![Tensor::from_bool(&s, v)])
    }
}

/// Which relation a [`Compare`] op tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Applies `$body` with `$x`, `$y` bound to the slices of two [`Data`] of the same variant
/// (any element type, strings included); `$mode` is `raw` (the body's value as is) or `same`
/// (wrapped back into the variant).
macro_rules! zip_all_data {
    ($mode:ident, $a:expr, $b:expr, ($x:ident, $y:ident) => $body:expr, else $other:expr) => {
        zip_all_data!(@go $mode, $a, $b, ($x, $y) => $body, else $other;
            F16 BF16 F32 F64 I8 I16 I32 I64 U8 U16 U32 U64 Bool Str)
    };
    (@go $mode:ident, $a:expr, $b:expr, ($x:ident, $y:ident) => $body:expr, else $other:expr; $($v:ident)*) => {
        match ($a, $b) {
            $(($crate::tensor::Data::$v($x), $crate::tensor::Data::$v($y)) => zip_all_data!(@wrap $mode $v $body),)*
            _ => $other,
        }
    };
    (@wrap raw $v:ident $e:expr) => { $e };
    (@wrap same $v:ident $e:expr) => { $crate::tensor::Data::$v($e) };
}

pub(super) use zip_all_data;

fn compare_slices<T: PartialOrd>(k: Cmp, a: &[T], sa: &[usize], b: &[T], sb: &[usize]) -> OpResult<(Shape, Vec<bool>)> {
    match k {
        Cmp::Eq => zip_map(a, sa, b, sb, |x, y| x == y),
        Cmp::Lt => zip_map(a, sa, b, sb, |x, y| x < y),
        Cmp::Le => zip_map(a, sa, b, sb, |x, y| x <= y),
        Cmp::Gt => zip_map(a, sa, b, sb, |x, y| x > y),
        Cmp::Ge => zip_map(a, sa, b, sb, |x, y| x >= y),
    }
}

/// Equal, Less, LessOrEqual, Greater, GreaterOrEqual: broadcasting comparisons with a bool
/// output (Equal also on bools and strings). NaN compares false.
pub(super) struct Compare {
    pub(super) name: &'static str,
    pub(super) op: Cmp,
}

impl OpDef for Compare {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (a, b) = (cx.input(0)?.dtype, cx.input(1)?.dtype);
        if a != b {
            bail!("both inputs must have one type, found {a} and {b}");
        }
        if self.op != Cmp::Eq && !a.is_numeric() {
            bail!("{} is not defined on {a} tensors", self.name);
        }
        let shapes = binary_shapes(cx)?;
        infer_broadcast(cx, &shapes, DType::Bool)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        let sb = eval_b_shape(cx, a, b)?;
        let (s, v) = zip_all_data!(raw, &a.data, &b.data, (x, y) => compare_slices(self.op, x, &a.shape, y, &sb)?,
            else bail!("both inputs must have one type, found {} and {}", a.dtype(), b.dtype()));
        Ok(vec![Tensor::from_bool(&s, v)])
    }
}
