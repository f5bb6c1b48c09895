//! The `kernel` dialect (first cut): a kernel is a loop nest over buffers placed at named
//! memory levels, computing scalar expressions of loads and storing them.
//!
//! It is structured (a tree of loops and stores, like TVM's TIR) rather than SSA: lowering from
//! a fused group builds an expression per output element, and each target turns the tree into
//! its own form (upstream MLIR `scf`/`memref`/`arith`/`math` for `cpu`; the NPU ISA later).
//! Sizes are run-time values ([`Idx::Dim`] reads a buffer's extent), so one kernel serves every
//! binding of a model's symbolic dims. Schedule knobs ([`Knobs`]) are data: the autotuner changes
//! them without touching lowering code.
//!
//! Today it covers elementwise (injective) kernels (element-wise math with broadcasting and
//! index maps: transpose, reshape) and row reductions (reductions over the last axis, Softmax,
//! LayerNorm, RMSNorm, with elementwise producers and consumers): per row, [`Stmt::Let`] binds
//! each reduced scalar once ([`Val::Reduce`] is an inner loop with an accumulator), then an
//! inner loop stores the row. A kernel may own local scratch buffers ([`Local`]): attention
//! keeps a row of scores in one. Contractions (Conv, MatMul, Gemm) accumulate into their output
//! buffer (stores that read the element they write), in loops whose bounds use [`Idx::Min`] and
//! [`Idx::Max`] (tiles, padded windows); their inner loops are register tiles of
//! multiply-accumulates ([`Stmt::Mma`]) where the operands allow. Explicit DMA between levels is
//! for the scratchpad targets.

use crate::types::{DType, Dim};
use std::fmt;

/// Where a buffer lives (each target maps these to its levels: DRAM, cache or scratchpad, registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Global,
    Local,
    Register,
}

/// A kernel parameter: a strided buffer of `f32`, or of `bool` for an input that steers a
/// `Where` (a mask).
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub level: Level,
}

/// An index expression (type `index`).
#[derive(Clone, Debug, PartialEq)]
pub enum Idx {
    /// Loop variable `i` (its nesting depth).
    Var(usize),
    Const(i64),
    /// The run-time extent of buffer `buf` along `axis`.
    Dim {
        buf: usize,
        axis: usize,
    },
    Add(Box<Idx>, Box<Idx>),
    Sub(Box<Idx>, Box<Idx>),
    Mul(Box<Idx>, Box<Idx>),
    /// Floor division and remainder (operands are non-negative here).
    Div(Box<Idx>, Box<Idx>),
    Rem(Box<Idx>, Box<Idx>),
    /// `if a == 1 { 0 } else { b }`: broadcasting a dim whose size is only known at run time.
    ZeroIfOne(Box<Idx>, Box<Idx>),
    /// The smaller and the larger of two indices, compared signed (a loop's clamped bounds:
    /// the last partial tile, the in-bounds range of a padded window).
    Min(Box<Idx>, Box<Idx>),
    Max(Box<Idx>, Box<Idx>),
}

impl Idx {
    /// Folds constants and identities (`x + 0`, `x * 1`, `0 * x`, `x / 1`, `x % 1`, ...).
    pub fn simplify(self) -> Idx {
        use Idx::*;
        let bx = Box::new;
        match self {
            Add(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) => Const(x + y),
                (Const(0), e) | (e, Const(0)) => e,
                (x, y) => Add(bx(x), bx(y)),
            },
            Sub(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) => Const(x - y),
                (e, Const(0)) => e,
                (x, y) => Sub(bx(x), bx(y)),
            },
            Mul(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) => Const(x * y),
                (Const(0), _) | (_, Const(0)) => Const(0),
                (Const(1), e) | (e, Const(1)) => e,
                (x, y) => Mul(bx(x), bx(y)),
            },
            Div(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) if y > 0 && x >= 0 => Const(x / y),
                (e, Const(1)) => e,
                (Const(0), _) => Const(0),
                (x, y) => Div(bx(x), bx(y)),
            },
            Rem(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) if y > 0 && x >= 0 => Const(x % y),
                (_, Const(1)) | (Const(0), _) => Const(0),
                (x, y) => Rem(bx(x), bx(y)),
            },
            ZeroIfOne(a, b) => match (a.simplify(), b.simplify()) {
                (Const(1), _) => Const(0),
                (Const(_), e) => e,
                (x, y) => ZeroIfOne(bx(x), bx(y)),
            },
            Min(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) => Const(x.min(y)),
                (x, y) if x == y => x,
                (x, y) => Min(bx(x), bx(y)),
            },
            Max(a, b) => match (a.simplify(), b.simplify()) {
                (Const(x), Const(y)) => Const(x.max(y)),
                (x, y) if x == y => x,
                (x, y) => Max(bx(x), bx(y)),
            },
            e => e,
        }
    }
}

/// Scalar functions of one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Tanh,
    Erf,
    Floor,
    Ceil,
    Recip,
    Relu,
    Sigmoid,
}

/// Scalar functions of two values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

/// How a reduction combines elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedOp {
    Sum,
    Max,
    Min,
}

/// A scalar value expression (f32).
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Const(f64),
    /// An element of a buffer; a boolean (input) buffer's element reads as 0 or 1.
    Load {
        buf: usize,
        index: Vec<Idx>,
    },
    Un(UnOp, Box<Val>),
    Bin(BinOp, Box<Val>, Box<Val>),
    /// The scalar a [`Stmt::Let`] bound.
    Scalar(usize),
    /// An index value as a float (a row length, to divide a sum by).
    FromIdx(Idx),
    /// `op` over `body` for loop variable `var` in `0..extent`.
    Reduce {
        op: RedOp,
        var: usize,
        extent: Idx,
        body: Box<Val>,
    },
    /// `if lhs < rhs { then } else { other }`, evaluating only the branch taken (a branch may
    /// load out of bounds when not taken, as Concat's inputs do).
    IfLess {
        lhs: Idx,
        rhs: Idx,
        then: Box<Val>,
        other: Box<Val>,
    },
    /// `if lhs < rhs { then } else { other }` without a branch: both values are evaluated, so
    /// both must be safe to (every load in bounds). Guards in a register tile's inner loop.
    Select {
        lhs: Idx,
        rhs: Idx,
        then: Box<Val>,
        other: Box<Val>,
    },
    /// `if cond != 0 { then } else { other }` on values (ONNX `Where`; a boolean buffer loads
    /// as 0 or 1), without a branch: both values are evaluated.
    Where {
        cond: Box<Val>,
        then: Box<Val>,
        other: Box<Val>,
    },
}

/// A statement.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `for var in 0..extent` (`var` is the loop's depth); `parallel` marks a parallel axis.
    For {
        var: usize,
        extent: Idx,
        parallel: bool,
        body: Vec<Stmt>,
    },
    Store {
        buf: usize,
        index: Vec<Idx>,
        value: Val,
    },
    /// Binds scalar `slot` to `value` for the statements after it in the same body.
    Let {
        slot: usize,
        value: Val,
    },
    /// A register tile of a matrix multiply-accumulate (a contraction's micro-kernel).
    Mma(Box<Mma>),
}

/// A matrix multiply-accumulate on a register tile of `rows × cols` accumulators:
///
/// ```text
/// for r in 0..rows, j in 0..valid:
///     C[c(r) + j·c_col] += Σ over the reduction loops  a(r) · B[b + j]
/// ```
///
/// where `C[...]` and `B[...]` are offsets into the buffers' elements in row-major order:
/// `c(r)` is the flat offset of index `c.1` with loop variable `row` = `r`, and `b` that of
/// `b.1` at the current point of the reduction loops. `a(r)` is a scalar (broadcast over the
/// tile's columns) and `B` a contiguous run of `cols` elements (vector loads); `C` is
/// contiguous when `c_col` is 1, else each column is its own element (a channel of an NCHW
/// output). The accumulators stay in registers for the whole reduction: each `B` vector
/// loaded serves `rows` rows, each `a` broadcast `cols / lanes` vectors.
///
/// `rows`, `cols` and `lanes` are the register tile's schedule knobs (the lowering picks them;
/// the autotuner may change them). `valid` columns are in bounds (fewer in a last, partial
/// tile: masked loads and stores, which need `c_col` = 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Mma {
    pub rows: usize,
    pub cols: usize,
    /// Lanes per vector (`cols` is a multiple).
    pub lanes: usize,
    pub valid: Idx,
    /// The loop variable standing for the tile's row in `a` and `c`.
    pub row: usize,
    /// The reduction loops (variable, extent), outermost first.
    pub red: Vec<(usize, Idx)>,
    pub a: Val,
    /// `B`'s buffer and the index of its element for column 0.
    pub b: (usize, Vec<Idx>),
    /// `C`'s buffer and the index of its element (row, column 0).
    pub c: (usize, Vec<Idx>),
    /// Elements between consecutive columns of `C`.
    pub c_col: Idx,
}

/// What [`Idx::eval`] makes of a zero divisor in `/` or `%`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByZero {
    /// An error ([`EvalError::ByZero`]): an evaluator that runs the kernel.
    Fail,
    /// The value 0: an estimate that walks code whose guarded paths may divide by zero.
    Zero,
}

/// Why [`Idx::eval`] has no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalError {
    /// A loop variable without a value.
    Var(usize),
    /// A dim without a value (no such buffer or axis, or a symbol).
    Dim { buf: usize, axis: usize },
    /// `/` or `%` by zero under [`ByZero::Fail`].
    ByZero(&'static str),
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EvalError::Var(v) => write!(f, "loop variable i{v} has no value"),
            EvalError::Dim { buf, axis } => write!(f, "dim({buf}, {axis}) of no buffer"),
            EvalError::ByZero(op) => write!(f, "index {op} by zero"),
        }
    }
}

impl std::error::Error for EvalError {}

impl Idx {
    /// The value of `self` given the loop variables' values (`var`) and the buffers' dims
    /// (`dim(buf, axis)`), `None` where unknown. Arithmetic wraps; `/` and `%` are Euclidean
    /// (the same as the unsigned `divui`/`remui` code generators emit, indices being
    /// non-negative); a zero divisor is handled as `by_zero` says. The one evaluator of the
    /// interpreters, estimates and launch computations.
    pub fn eval(
        &self,
        var: &dyn Fn(usize) -> Option<i64>,
        dim: &dyn Fn(usize, usize) -> Option<i64>,
        by_zero: ByZero,
    ) -> Result<i64, EvalError> {
        use Idx::*;
        let e = |x: &Idx| x.eval(var, dim, by_zero);
        let divisor = |x: &Idx, op: &'static str| -> Result<Option<i64>, EvalError> {
            match (e(x)?, by_zero) {
                (0, ByZero::Fail) => Err(EvalError::ByZero(op)),
                (0, ByZero::Zero) => Ok(None),
                (d, _) => Ok(Some(d)),
            }
        };
        Ok(match self {
            Var(v) => var(*v).ok_or(EvalError::Var(*v))?,
            Const(c) => *c,
            Dim { buf, axis } => dim(*buf, *axis).ok_or(EvalError::Dim { buf: *buf, axis: *axis })?,
            Add(a, b) => e(a)?.wrapping_add(e(b)?),
            Sub(a, b) => e(a)?.wrapping_sub(e(b)?),
            Mul(a, b) => e(a)?.wrapping_mul(e(b)?),
            Div(a, b) => match divisor(b, "division")? {
                Some(d) => e(a)?.div_euclid(d),
                None => 0,
            },
            Rem(a, b) => match divisor(b, "remainder")? {
                Some(d) => e(a)?.rem_euclid(d),
                None => 0,
            },
            Min(a, b) => e(a)?.min(e(b)?),
            Max(a, b) => e(a)?.max(e(b)?),
            ZeroIfOne(a, b) => {
                if e(a)? == 1 {
                    0
                } else {
                    e(b)?
                }
            }
        })
    }

    /// Whether loop variable `var` occurs in `self`.
    pub fn uses(&self, var: usize) -> bool {
        self.any_var(&|v| v == var)
    }

    /// Whether any loop variable occurs in `self` (else its value depends on dims only).
    pub fn has_vars(&self) -> bool {
        self.any_var(&|_| true)
    }

    /// Whether a loop variable for which `pred` holds occurs in `self`.
    pub fn any_var(&self, pred: &dyn Fn(usize) -> bool) -> bool {
        use Idx::*;
        match self {
            Var(v) => pred(*v),
            Const(_) | Dim { .. } => false,
            Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Rem(a, b) | ZeroIfOne(a, b) | Min(a, b) | Max(a, b) => {
                a.any_var(pred) || b.any_var(pred)
            }
        }
    }

    /// `base` when `self` is `base + var` with `var` not in `base` (so consecutive values of
    /// `var` are consecutive values of `self`), as far as the expression's form shows.
    pub fn offset_of(&self, var: usize) -> Option<Idx> {
        match self {
            Idx::Var(v) if *v == var => Some(Idx::Const(0)),
            Idx::Add(a, b) if **b == Idx::Var(var) && !a.uses(var) => Some((**a).clone()),
            Idx::Add(a, b) if **a == Idx::Var(var) && !b.uses(var) => Some((**b).clone()),
            Idx::Add(a, b) if !b.uses(var) => a.offset_of(var).map(|base| Idx::Add(Box::new(base), b.clone())),
            Idx::Add(a, b) if !a.uses(var) => b.offset_of(var).map(|base| Idx::Add(a.clone(), Box::new(base))),
            Idx::Sub(a, b) if !b.uses(var) => a.offset_of(var).map(|base| Idx::Sub(Box::new(base), b.clone())),
            _ => None,
        }
    }

    /// `self` with loop variable `var` replaced by `by`.
    pub fn subst(&self, var: usize, by: &Idx) -> Idx {
        self.map(&mut |i| if i == Idx::Var(var) { by.clone() } else { i })
    }

    /// `self` with each direct operand `x` replaced by `f(x)` (a leaf is cloned), `f`'s first
    /// error returned. The one node-by-node rebuild of an index: [`Idx::map`] builds on it, and
    /// so can rewrites that go top-down (replacing a node before its operands are seen).
    pub fn try_map_operands<E>(&self, f: &mut dyn FnMut(&Idx) -> Result<Idx, E>) -> Result<Idx, E> {
        use Idx::*;
        let mut two = |a: &Idx, b: &Idx| -> Result<(Box<Idx>, Box<Idx>), E> { Ok((Box::new(f(a)?), Box::new(f(b)?))) };
        Ok(match self {
            Var(_) | Const(_) | Dim { .. } => self.clone(),
            Add(a, b) => two(a, b).map(|(a, b)| Add(a, b))?,
            Sub(a, b) => two(a, b).map(|(a, b)| Sub(a, b))?,
            Mul(a, b) => two(a, b).map(|(a, b)| Mul(a, b))?,
            Div(a, b) => two(a, b).map(|(a, b)| Div(a, b))?,
            Rem(a, b) => two(a, b).map(|(a, b)| Rem(a, b))?,
            ZeroIfOne(a, b) => two(a, b).map(|(a, b)| ZeroIfOne(a, b))?,
            Min(a, b) => two(a, b).map(|(a, b)| Min(a, b))?,
            Max(a, b) => two(a, b).map(|(a, b)| Max(a, b))?,
        })
    }

    /// [`Idx::try_map_operands`] with an `f` that cannot fail.
    pub fn map_operands(&self, f: &mut dyn FnMut(&Idx) -> Idx) -> Idx {
        infallible(self.try_map_operands(&mut |x| Ok(f(x))))
    }

    /// Bottom-up map: every node rebuilt from its mapped operands, then passed to `f` (so `f`
    /// sees each node once, its operands already mapped; what `f` returns is not visited again).
    pub fn map(&self, f: &mut dyn FnMut(Idx) -> Idx) -> Idx {
        infallible(self.try_map(&mut |x| Ok(f(x))))
    }

    /// [`Idx::map`] with a fallible `f`: its first error (operands left to right).
    pub fn try_map<E>(&self, f: &mut dyn FnMut(Idx) -> Result<Idx, E>) -> Result<Idx, E> {
        let node = self.try_map_operands(&mut |x| x.try_map(f))?;
        f(node)
    }
}

fn infallible<T>(r: Result<T, std::convert::Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

impl Val {
    /// Whether loop variable `var` occurs in any index or extent of `self`.
    pub fn uses(&self, var: usize) -> bool {
        match self {
            Val::Const(_) | Val::Scalar(_) => false,
            Val::Load { index, .. } => index.iter().any(|i| i.uses(var)),
            Val::FromIdx(i) => i.uses(var),
            Val::Un(_, a) => a.uses(var),
            Val::Bin(_, a, b) => a.uses(var) || b.uses(var),
            Val::Reduce { extent, body, .. } => extent.uses(var) || body.uses(var),
            Val::IfLess { lhs, rhs, then, other } | Val::Select { lhs, rhs, then, other } => {
                lhs.uses(var) || rhs.uses(var) || then.uses(var) || other.uses(var)
            }
            Val::Where { cond, then, other } => cond.uses(var) || then.uses(var) || other.uses(var),
        }
    }

    /// `self` with loop variable `var` replaced by `by` in every index.
    pub fn subst(&self, var: usize, by: &Idx) -> Val {
        self.map_idx(&mut |i| i.subst(var, by))
    }

    /// `self` with each direct value operand `x` replaced by `fv(x)` and each index it holds (a
    /// load's indices, a reduction's extent, a comparison's sides, `FromIdx`'s) by `fi(i)`,
    /// the first error returned. Parts are visited in field order (a reduction's extent before
    /// its body, a comparison's indices before its branches). The one node-by-node rebuild of
    /// a value: [`Val::map`] and [`Val::map_idx`] build on it, and so can top-down rewrites.
    pub fn try_map_parts<E>(
        &self,
        fv: &mut dyn FnMut(&Val) -> Result<Val, E>,
        fi: &mut dyn FnMut(&Idx) -> Result<Idx, E>,
    ) -> Result<Val, E> {
        let mut b = |x: &Val| fv(x).map(Box::new);
        Ok(match self {
            Val::Const(_) | Val::Scalar(_) => self.clone(),
            Val::Load { buf, index } => Val::Load { buf: *buf, index: index.iter().map(fi).collect::<Result<_, _>>()? },
            Val::Un(op, x) => Val::Un(*op, b(x)?),
            Val::Bin(op, x, y) => Val::Bin(*op, b(x)?, b(y)?),
            Val::FromIdx(i) => Val::FromIdx(fi(i)?),
            Val::Reduce { op, var, extent, body } => {
                Val::Reduce { op: *op, var: *var, extent: fi(extent)?, body: b(body)? }
            }
            Val::IfLess { lhs, rhs, then, other } => {
                Val::IfLess { lhs: fi(lhs)?, rhs: fi(rhs)?, then: b(then)?, other: b(other)? }
            }
            Val::Select { lhs, rhs, then, other } => {
                Val::Select { lhs: fi(lhs)?, rhs: fi(rhs)?, then: b(then)?, other: b(other)? }
            }
            Val::Where { cond, then, other } => Val::Where { cond: b(cond)?, then: b(then)?, other: b(other)? },
        })
    }

    /// [`Val::try_map_parts`] with functions that cannot fail.
    pub fn map_parts(&self, fv: &mut dyn FnMut(&Val) -> Val, fi: &mut dyn FnMut(&Idx) -> Idx) -> Val {
        infallible(self.try_map_parts(&mut |x| Ok(fv(x)), &mut |i| Ok(fi(i))))
    }

    /// Bottom-up map of the value nodes (indices kept): every node rebuilt from its mapped
    /// operands, then passed to `f`; what `f` returns is not visited again.
    pub fn map(&self, f: &mut dyn FnMut(Val) -> Val) -> Val {
        let node = self.map_parts(&mut |x| x.map(f), &mut Idx::clone);
        f(node)
    }

    /// `self` with every index expression it holds, at any depth (loads' indices, extents,
    /// comparisons' sides, `FromIdx`'s), replaced by `f` of it (whole: `f` is not applied to
    /// the nodes inside an index; use [`Idx::map`] in `f` for that).
    pub fn map_idx(&self, f: &mut dyn FnMut(&Idx) -> Idx) -> Val {
        infallible(self.try_map_idx(&mut |i| Ok(f(i))))
    }

    /// [`Val::map_idx`] with a fallible `f`: its first error.
    pub fn try_map_idx<E>(&self, f: &mut dyn FnMut(&Idx) -> Result<Idx, E>) -> Result<Val, E> {
        // Both closures need `f`: the value operands reach it through the recursion.
        let f = std::cell::RefCell::new(f);
        self.try_map_parts(&mut |x| x.try_map_idx(*f.borrow_mut()), &mut |i| (f.borrow_mut())(i))
    }
}

/// Schedule knobs (read by code generation, written by the autotuner).
#[derive(Clone, Debug, PartialEq)]
pub struct Knobs {
    /// Lanes of the innermost loop's vectors (1: scalar).
    pub vector_width: u32,
    /// Unroll factor of the innermost loop.
    pub unroll: u32,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs { vector_width: 1, unroll: 1 }
    }
}

/// A scratch buffer of the kernel's own at the local level (a cache-resident row, a tile of a
/// scratchpad): f32, sized by index expressions of the parameters' extents, one per thread
/// that runs the kernel. Referenced as buffer `buffers.len() + i` for `locals[i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Local {
    pub name: String,
    pub size: Vec<Idx>,
}

/// A kernel: buffers (inputs first, then outputs), local scratch buffers and a loop nest.
///
/// Contract: the body stores every element of every output (targets need not zero them).
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub buffers: Vec<Buffer>,
    pub inputs: usize,
    /// For each input buffer, the position of the graph op's operand it binds (operands the
    /// kernel never reads, such as a Reshape's target shape, are not buffers).
    pub operands: Vec<usize>,
    pub locals: Vec<Local>,
    pub body: Vec<Stmt>,
    pub knobs: Knobs,
}

impl Kernel {
    /// The output buffers.
    pub fn outputs(&self) -> &[Buffer] {
        &self.buffers[self.inputs..]
    }
}

fn shape_text(b: &Buffer) -> String {
    let dims: Vec<String> = b.shape.iter().map(|d| d.to_string()).collect();
    format!("{}[{}]", b.dtype, dims.join(", "))
}

impl fmt::Display for Idx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Idx::Var(i) => write!(f, "i{i}"),
            Idx::Const(c) => write!(f, "{c}"),
            Idx::Dim { buf, axis } => write!(f, "dim(%{buf}, {axis})"),
            Idx::Add(a, b) => write!(f, "({a} + {b})"),
            Idx::Sub(a, b) => write!(f, "({a} - {b})"),
            Idx::Mul(a, b) => write!(f, "({a} * {b})"),
            Idx::Div(a, b) => write!(f, "({a} / {b})"),
            Idx::Rem(a, b) => write!(f, "({a} % {b})"),
            Idx::ZeroIfOne(a, b) => write!(f, "({a} == 1 ? 0 : {b})"),
            Idx::Min(a, b) => write!(f, "min({a}, {b})"),
            Idx::Max(a, b) => write!(f, "max({a}, {b})"),
        }
    }
}

fn index_text(index: &[Idx]) -> String {
    index.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Const(c) => write!(f, "{c:e}"),
            Val::Load { buf, index } => write!(f, "%{buf}[{}]", index_text(index)),
            Val::Un(op, x) => write!(f, "{}({x})", format!("{op:?}").to_lowercase()),
            Val::Bin(op, a, b) => write!(f, "{}({a}, {b})", format!("{op:?}").to_lowercase()),
            Val::Scalar(s) => write!(f, "%s{s}"),
            Val::FromIdx(i) => write!(f, "float({i})"),
            Val::Reduce { op, var, extent, body } => {
                write!(f, "reduce.{}(i{var} in 0..{extent}: {body})", format!("{op:?}").to_lowercase())
            }
            Val::IfLess { lhs, rhs, then, other } => write!(f, "({lhs} < {rhs} ? {then} : {other})"),
            Val::Select { lhs, rhs, then, other } => write!(f, "select({lhs} < {rhs}, {then}, {other})"),
            Val::Where { cond, then, other } => write!(f, "where({cond}, {then}, {other})"),
        }
    }
}

fn write_stmts(f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth + 1);
    for s in body {
        match s {
            Stmt::For { var, extent, parallel, body } => {
                writeln!(f, "{pad}kernel.for{} i{var} in 0..{extent} {{", if *parallel { ".parallel" } else { "" })?;
                write_stmts(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")?;
            }
            Stmt::Store { buf, index, value } => writeln!(f, "{pad}%{buf}[{}] = {value}", index_text(index))?,
            Stmt::Let { slot, value } => writeln!(f, "{pad}%s{slot} = {value}")?,
            Stmt::Mma(m) => {
                let red: Vec<String> = m.red.iter().map(|(v, e)| format!("i{v} in 0..{e}")).collect();
                writeln!(
                    f,
                    "{pad}kernel.mma {{rows = {}, cols = {}, lanes = {}, valid = {}}} i{} over ({}): \
                     %{}[{}] (+j·{}) += {} * %{}[{}] (+j)",
                    m.rows,
                    m.cols,
                    m.lanes,
                    m.valid,
                    m.row,
                    red.join(", "),
                    m.c.0,
                    index_text(&m.c.1),
                    m.c_col,
                    m.a,
                    m.b.0,
                    index_text(&m.b.1)
                )?
            }
        }
    }
    Ok(())
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<String> = self
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let io = if i < self.inputs { "in" } else { "out" };
                format!("%{i}: {io} {} {:?} \"{}\"", shape_text(b), b.level, b.name)
            })
            .collect();
        writeln!(
            f,
            "kernel.kernel @{}({}) {{vector_width = {}, unroll = {}}} {{",
            self.name,
            params.join(", "),
            self.knobs.vector_width,
            self.knobs.unroll
        )?;
        for (i, l) in self.locals.iter().enumerate() {
            writeln!(
                f,
                "  %{} = kernel.local float[{}] Local \"{}\"",
                self.buffers.len() + i,
                index_text(&l.size),
                l.name
            )?;
        }
        write_stmts(f, &self.body, 0)?;
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: Idx) -> Box<Idx> {
        Box::new(i)
    }

    fn var(v: usize) -> Idx {
        Idx::Var(v)
    }

    /// `(i0 + 2) * dim(%1, 0)`, and a value holding indices in every place one can be.
    fn sample() -> (Idx, Val) {
        let i = Idx::Mul(b(Idx::Add(b(var(0)), b(Idx::Const(2)))), b(Idx::Dim { buf: 1, axis: 0 }));
        let load = |ix: Vec<Idx>| Box::new(Val::Load { buf: 0, index: ix });
        let v = Val::Where {
            cond: Box::new(Val::IfLess {
                lhs: var(0),
                rhs: i.clone(),
                then: load(vec![var(0), var(1)]),
                other: Box::new(Val::Un(UnOp::Neg, Box::new(Val::Scalar(3)))),
            }),
            then: Box::new(Val::Reduce { op: RedOp::Sum, var: 1, extent: i.clone(), body: load(vec![var(1)]) }),
            other: Box::new(Val::Bin(
                BinOp::Add,
                Box::new(Val::FromIdx(var(0))),
                Box::new(Val::Select {
                    lhs: var(1),
                    rhs: Idx::Const(4),
                    then: load(vec![]),
                    other: Box::new(Val::Const(1.0)),
                }),
            )),
        };
        (i, v)
    }

    #[test]
    fn idx_map_is_bottom_up_and_visits_every_node_once() {
        let (i, _) = sample();
        let mut seen = Vec::new();
        let out = i.map(&mut |x| {
            seen.push(x.to_string());
            match x {
                Idx::Var(0) => Idx::Const(5),
                Idx::Dim { .. } => Idx::Const(3),
                x => x,
            }
        });
        // Operands before their node, each node once, the node seen with mapped operands.
        assert_eq!(seen, ["i0", "2", "(5 + 2)", "dim(%1, 0)", "((5 + 2) * 3)"]);
        assert_eq!(out.simplify(), Idx::Const(21));
        // Not visited again: a `Var(0)` that `f` introduces stays.
        assert_eq!(
            var(0).map(&mut |x| if x == var(0) { Idx::Add(b(var(0)), b(var(0))) } else { x }).to_string(),
            "(i0 + i0)"
        );
    }

    #[test]
    fn idx_try_map_returns_the_first_error() {
        let (i, _) = sample();
        let dims = |x: Idx| match x {
            Idx::Dim { buf, .. } => Err(buf),
            Idx::Var(v) if v > 0 => Err(100 + v),
            x => Ok(x),
        };
        assert_eq!(i.try_map(&mut |x| dims(x)), Err(1));
        assert_eq!(Idx::Add(b(var(2)), b(Idx::Dim { buf: 1, axis: 0 })).try_map(&mut |x| dims(x)), Err(102));
        assert_eq!(var(0).try_map(&mut |x| dims(x)), Ok(var(0)));
    }

    #[test]
    fn idx_map_operands_is_one_level() {
        let (i, _) = sample();
        let out = i.map_operands(&mut |x| Idx::Const(x.has_vars() as i64));
        assert_eq!(out, Idx::Mul(b(Idx::Const(1)), b(Idx::Const(0))));
        assert_eq!(var(3).map_operands(&mut |_| Idx::Const(0)), var(3));
    }

    #[test]
    fn idx_subst_replaces_the_variable_only() {
        let (i, _) = sample();
        assert_eq!(i.subst(0, &var(7)).to_string(), "((i7 + 2) * dim(%1, 0))");
        assert_eq!(i.subst(1, &var(7)), i);
    }

    #[test]
    fn val_map_idx_reaches_every_index_and_keeps_the_rest() {
        let (_, v) = sample();
        let mut n = 0;
        let out = v.map_idx(&mut |i| {
            n += 1;
            i.subst(0, &Idx::Const(9))
        });
        // IfLess's two, the load's two, the extent, the reduced load's one, FromIdx, Select's two.
        assert_eq!(n, 9);
        assert!(!out.uses(0) && out.uses(1), "{out}");
        assert_eq!(out, v.subst(0, &Idx::Const(9)));
        // Everything but indices is kept.
        assert_eq!(v.map_idx(&mut Idx::clone), v);
        assert_eq!(out.to_string(), v.to_string().replace("i0", "9"));
    }

    #[test]
    fn val_try_map_idx_stops_at_the_first_error() {
        let (_, v) = sample();
        let mut seen = 0;
        let r = v.try_map_idx(&mut |i| {
            seen += 1;
            if i.uses(1) {
                Err(i.to_string())
            } else {
                Ok(i.clone())
            }
        });
        // IfLess's lhs and rhs, then the load's `i0`, then its `i1`.
        assert_eq!((r, seen), (Err("i1".to_string()), 4));
    }

    #[test]
    fn val_map_is_bottom_up_over_values() {
        let (_, v) = sample();
        let mut kinds = Vec::new();
        let out = v.map(&mut |x| {
            kinds.push(match &x {
                Val::Load { .. } => "load",
                Val::Scalar(_) => "scalar",
                Val::Const(_) => "const",
                Val::Un(..) | Val::Bin(..) => "op",
                Val::FromIdx(_) => "idx",
                Val::Reduce { .. } => "reduce",
                Val::IfLess { .. } | Val::Select { .. } | Val::Where { .. } => "branch",
            });
            match x {
                Val::Scalar(3) => Val::Const(2.0),
                x => x,
            }
        });
        assert_eq!(
            kinds,
            ["load", "scalar", "op", "branch", "load", "reduce", "idx", "load", "const", "branch", "op", "branch"]
        );
        assert_eq!(out.to_string(), v.to_string().replace("%s3", "2e0"), "{v}");
    }

    #[test]
    fn val_map_parts_is_one_level_in_field_order() {
        let (_, v) = sample();
        let Val::Where { cond, .. } = &v else { panic!("{v}") };
        let order = std::cell::RefCell::new(Vec::new());
        let out = cond.map_parts(
            &mut |x| {
                order.borrow_mut().push(format!("val {x}"));
                Val::Const(0.0)
            },
            &mut |i| {
                order.borrow_mut().push(format!("idx {i}"));
                Idx::Const(1)
            },
        );
        assert_eq!(order.into_inner(), ["idx i0", "idx ((i0 + 2) * dim(%1, 0))", "val %0[i0, i1]", "val neg(%s3)"]);
        assert_eq!(
            out,
            Val::IfLess {
                lhs: Idx::Const(1),
                rhs: Idx::Const(1),
                then: Box::new(Val::Const(0.0)),
                other: Box::new(Val::Const(0.0))
            }
        );
    }

    #[test]
    fn index_arithmetic_folds_constants_and_identities() {
        use Idx::*;
        // ((0 * 1) + 0) * 128 + i1  →  i1 * ... folds to i1
        let e = Add(b(Mul(b(Add(b(Mul(b(Const(0)), b(Const(1)))), b(Const(0)))), b(Const(128)))), b(Var(1)));
        assert_eq!(e.simplify(), Var(1));
        assert_eq!(Div(b(Var(2)), b(Const(1))).simplify(), Var(2));
        assert_eq!(Rem(b(Var(2)), b(Const(1))).simplify(), Const(0));
        assert_eq!(Sub(b(Const(7)), b(Const(3))).simplify(), Const(4));
        assert_eq!(ZeroIfOne(b(Const(1)), b(Var(0))).simplify(), Const(0));
        assert_eq!(ZeroIfOne(b(Const(5)), b(Var(0))).simplify(), Var(0));
        assert_eq!(Min(b(Const(3)), b(Const(-2))).simplify(), Const(-2));
        assert_eq!(Max(b(Sub(b(Const(1)), b(Const(4)))), b(Const(0))).simplify(), Const(0));
        let dynamic = ZeroIfOne(b(Dim { buf: 0, axis: 1 }), b(Var(0)));
        assert_eq!(dynamic.clone().simplify(), dynamic);
        // Division by a run-time size stays.
        let d = Div(b(Var(0)), b(Dim { buf: 1, axis: 0 }));
        assert_eq!(d.clone().simplify(), d);
    }

    #[test]
    fn kernels_print_as_loop_nests() {
        let buf = |name: &str| Buffer {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![Dim::sym("N")],
            level: Level::Global,
        };
        let k = Kernel {
            name: "relu".into(),
            buffers: vec![buf("x"), buf("y")],
            inputs: 1,
            operands: vec![0],
            locals: vec![],
            body: vec![Stmt::For {
                var: 0,
                extent: Idx::Dim { buf: 1, axis: 0 },
                parallel: true,
                body: vec![Stmt::Store {
                    buf: 1,
                    index: vec![Idx::Var(0)],
                    value: Val::Un(UnOp::Relu, Box::new(Val::Load { buf: 0, index: vec![Idx::Var(0)] })),
                }],
            }],
            knobs: Knobs::default(),
        };
        let text = k.to_string();
        assert!(
            text.starts_with("kernel.kernel @relu(%0: in float[N] Global \"x\", %1: out float[N] Global \"y\")"),
            "{text}"
        );
        assert!(text.contains("kernel.for.parallel i0 in 0..dim(%1, 0) {"), "{text}");
        assert!(text.contains("%1[i0] = relu(%0[i0])"), "{text}");
        assert_eq!(k.outputs().len(), 1);
    }
}

/// A 2-D Conv (batch 1, one group, unit strides and dilations) lowered as im2col + one whole
/// GEMM, for code generators that block a GEMM for a matrix unit themselves (the `npu`
/// target; `kiln-passes`' `Schedule::whole_matmul`). The lowering emits [`Im2col::pack`] (the
/// columns local, `col[(ci·KH + ky)·KW + kx, oy·OW + ox] = X[0, ci, oy + ky − pt, ox + kx − pl]`,
/// zero in the padding) followed by [`Im2col::mma`] (`Y[co, p] += Σ_k W[co, k] · col[k, p]`):
/// a complete, evaluable form. A code generator that recognizes the pair ([`Im2col::of`])
/// may form the columns on chip instead of materializing them (an implicit GEMM).
#[derive(Clone, Debug, PartialEq)]
pub struct Im2col {
    /// Buffers: the input `X[1, cin, h, w]`, the columns local `[cin·kh·kw, oh·ow]`.
    pub x: usize,
    pub col: usize,
    pub cin: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i64,
    pub kw: i64,
    /// Begin padding (rows, columns).
    pub pad_top: i64,
    pub pad_left: i64,
    pub oh: i64,
    pub ow: i64,
}

impl Im2col {
    /// Reduction length `cin · kh · kw`.
    pub fn k(&self) -> i64 {
        self.cin * self.kh * self.kw
    }

    /// The packing nest (loop variables 1 to 5: ci, ky, kx, oy, ox).
    pub fn pack(&self) -> Stmt {
        let bx = Box::new;
        let v = Idx::Var;
        let add = |a: Idx, b: Idx| Idx::Add(bx(a), bx(b));
        let mul = |a: Idx, b: Idx| Idx::Mul(bx(a), bx(b));
        let ih = add(add(v(4), v(2)), Idx::Const(-self.pad_top)).simplify();
        let iw = add(add(v(5), v(3)), Idx::Const(-self.pad_left)).simplify();
        let clamp = |i: &Idx, n: i64| {
            Idx::Max(bx(Idx::Const(0)), bx(Idx::Min(bx(i.clone()), bx(Idx::Const(n - 1))))).simplify()
        };
        let load = Val::Load { buf: self.x, index: vec![Idx::Const(0), v(1), clamp(&ih, self.h), clamp(&iw, self.w)] };
        // In bounds when 0 ≤ i < n: select(i < 0, 0, select(i < n, x, 0)).
        let guard = |i: &Idx, n: i64, x: Val| Val::Select {
            lhs: i.clone(),
            rhs: Idx::Const(0),
            then: Box::new(Val::Const(0.0)),
            other: Box::new(Val::Select {
                lhs: i.clone(),
                rhs: Idx::Const(n),
                then: Box::new(x),
                other: Box::new(Val::Const(0.0)),
            }),
        };
        let value = guard(&ih, self.h, guard(&iw, self.w, load));
        let k = add(mul(add(mul(v(1), Idx::Const(self.kh)), v(2)), Idx::Const(self.kw)), v(3)).simplify();
        let p = add(mul(v(4), Idx::Const(self.ow)), v(5)).simplify();
        let mut s = Stmt::Store { buf: self.col, index: vec![k, p], value };
        for (var, e) in [(5, self.ow), (4, self.oh), (3, self.kw), (2, self.kh), (1, self.cin)] {
            s = Stmt::For { var, extent: Idx::Const(e), parallel: false, body: vec![s] };
        }
        s
    }

    /// The GEMM over the columns: `W[cout, cin, kh, kw]` (buffer `w`) as `[cout, K]`, the
    /// output `Y[1, cout, oh, ow]` (buffer `y`) as `[cout, oh·ow]`. Loop variables: 63 the
    /// tile's row, 6 the reduction.
    pub fn mma(&self, w: usize, y: usize, cout: usize, lanes: usize) -> Mma {
        let bx = Box::new;
        const ROW: usize = 63;
        let k = Idx::Var(6);
        let taps = self.kh * self.kw;
        let ci = Idx::Div(bx(k.clone()), bx(Idx::Const(taps))).simplify();
        let ky = Idx::Rem(bx(Idx::Div(bx(k.clone()), bx(Idx::Const(self.kw)))), bx(Idx::Const(self.kh))).simplify();
        let kx = Idx::Rem(bx(k.clone()), bx(Idx::Const(self.kw))).simplify();
        let p = self.oh * self.ow;
        Mma {
            rows: cout,
            cols: p as usize,
            lanes,
            valid: Idx::Const(p),
            row: ROW,
            red: vec![(6, Idx::Const(self.k()))],
            a: Val::Load { buf: w, index: vec![Idx::Var(ROW), ci, ky, kx] },
            b: (self.col, vec![k, Idx::Const(0)]),
            c: (y, vec![Idx::Const(0), Idx::Var(ROW), Idx::Const(0), Idx::Const(0)]),
            c_col: Idx::Const(1),
        }
    }

    /// The geometry of a `pack; mma` pair as [`Im2col`] emits it (`shape`: a buffer's
    /// shape), with the GEMM's weight and output buffers; `None` for any other pair.
    pub fn of(pack: &Stmt, mma: &Mma, shape: &dyn Fn(usize) -> Option<Vec<usize>>) -> Option<(Im2col, usize, usize)> {
        let mut ext = Vec::new();
        let mut s = pack;
        while let Stmt::For { extent: Idx::Const(e), body, .. } = s {
            ext.push(*e);
            let [inner] = body.as_slice() else { return None };
            s = inner;
        }
        let (Stmt::Store { buf: col, .. }, &[cin, kh, kw, oh, ow]) = (s, ext.as_slice()) else { return None };
        let Val::Load { buf: wbuf, .. } = &mma.a else { return None };
        let x = mma_input(s)?;
        let &[1, xc, h, w] = shape(x)?.as_slice() else { return None };
        if xc as i64 != cin || mma.b.0 != *col {
            return None;
        }
        let (h, w) = (h as i64, w as i64);
        // The padding: every split of the total that matches.
        for pt in 0..=(oh - h + kh - 1).max(0) {
            for pl in 0..=(ow - w + kw - 1).max(0) {
                let g = Im2col { x, col: *col, cin, h, w, kh, kw, pad_top: pt, pad_left: pl, oh, ow };
                if g.pack() == *pack && g.mma(*wbuf, mma.c.0, mma.rows, mma.lanes) == *mma {
                    return Some((g, *wbuf, mma.c.0));
                }
            }
        }
        None
    }
}

/// The buffer the packing store's value loads.
fn mma_input(s: &Stmt) -> Option<usize> {
    fn find(v: &Val) -> Option<usize> {
        match v {
            Val::Load { buf, .. } => Some(*buf),
            Val::Select { then, other, .. } => find(then).or_else(|| find(other)),
            _ => None,
        }
    }
    match s {
        Stmt::Store { value, .. } => find(value),
        _ => None,
    }
}
