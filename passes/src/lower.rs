//! Lowering graph → kernel: elementwise, row-reduction, window, attention and contraction kernels.
//!
//! A `graph.fused` kernel of kind `elementwise`, `layout` or `reduction`, or a single such op,
//! becomes one [`Kernel`]: a loop nest over the (first) output's dims, and per output a store of
//! an expression built by walking the kernel's ops backwards from the output element. Index
//! maps become index arithmetic, never copies: broadcasting (a dim of 1, known or only at run
//! time), Transpose (permuted indices) and the views (linearize, then delinearize). Sizes stay
//! symbolic: a symbolic dim reads the extent of a buffer that carries it. Elementwise ops
//! include the activations (LeakyRelu, PRelu, Elu, Selu, HardSigmoid, Clip, ...: piecewise
//! forms as max/min of their pieces), variadic Sum/Mean/Max/Min, and BatchNormalization in
//! inference (per-channel parameters).
//!
//! Row reductions (ReduceSum/Mean/Max/Min with kept dims, Softmax, LogSoftmax,
//! LayerNormalization, RMSNormalization, InstanceNormalization) reduce the trailing axes
//! `rows..` of the kernel's loop nest: the row loops (the leading axes) bind each reduced
//! scalar once ([`Stmt::Let`] of a [`Val::Reduce`] nest), then inner loops store the row, so a
//! fused `residual add → LayerNorm → scale` kernel reads its inputs once per pass over the row.
//! All row reductions of a kernel must reduce the same axes.
//!
//! Window ops (pooling: MaxPool, AveragePool, LpPool and their Global forms; LRN) reduce inside
//! each output element's expression instead ([`window`]), so kernels anchored by them keep the
//! elementwise loop nest, with their producers and consumers fused in; a window reduction that
//! an element's stores use twice (a pooled value stored and fed to an epilogue) is bound once
//! per element.
//!
//! Contractions (Conv, MatMul, Gemm), alone or as the anchor of a `contraction` kernel with an
//! elementwise epilogue, accumulate into their output in a cache- and vector-friendly loop
//! order, then run the epilogue in place (see [`contraction`]); a MatMul whose accumulate form
//! does not apply falls back to an inline reduction per output element.
//!
//! Anything else (other reductions, non-f32 types) is refused with a reason; issue #5's next
//! steps extend this.

use kiln_ir::attr::Attr;
use kiln_ir::graph::AttrView;
use kiln_ir::ir::{Module, OpId, ValueDef, ValueId};
use kiln_ir::kernel::{BinOp, Buffer, Idx, Kernel, Knobs, Level, RedOp, Stmt, UnOp, Val};
use kiln_ir::{DType, Dim, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

mod attention;
pub mod contraction;
mod schedule;
mod window;

pub use schedule::{Schedule, Schedules};
mod workload;
pub use workload::{fnv1a, workload_key};

/// Why an op was not lowered.
pub type LowerResult<T> = Result<T, String>;

struct Lowering<'m> {
    m: &'m Module,
    /// Buffer index of each kernel input value.
    arg: HashMap<ValueId, usize>,
    /// Ops of the kernel, by the value they define.
    inside: HashMap<ValueId, OpId>,
    /// A buffer and axis that carries each symbolic dim.
    syms: HashMap<String, (usize, usize)>,
    /// Rank of the kernel's loop nest (its full output's rank).
    rank: usize,
    /// Row dims of the kernel (the leading output dims its reductions keep; all but the last
    /// by default): reductions run per row over the trailing dims `rows..rank`.
    rows: usize,
    /// Per-row scalars (reductions), in the order they must be bound.
    slots: RefCell<Vec<Val>>,
    /// Slots already built, by op and part.
    memo: RefCell<HashMap<(OpId, usize), usize>>,
    /// Reduction loop variables handed out (numbered from 64, above any loop depth).
    next_var: std::cell::Cell<usize>,
    /// For a fused kernel, the outer operand each block argument stands for.
    outer: HashMap<ValueId, ValueId>,
    /// Window ops' element expressions already built, by op and element index (built once, so
    /// that an element's stores can share one evaluation: see [`share_reductions`]).
    windows: RefCell<Vec<(OpId, Vec<Idx>, Val)>>,
    /// Tile sizes (register tiles, cache tiles).
    sched: Schedule,
}

fn b(i: Idx) -> Box<Idx> {
    Box::new(i)
}

fn add(x: Val, y: Val) -> Val {
    Val::Bin(BinOp::Add, Box::new(x), Box::new(y))
}

fn mul(x: Val, y: Val) -> Val {
    Val::Bin(BinOp::Mul, Box::new(x), Box::new(y))
}

/// `max(x, 0)` (NaN stays NaN).
fn max0(x: Val) -> Val {
    Val::Bin(BinOp::Max, Box::new(x), Box::new(Val::Const(0.0)))
}

/// `min(x, 0)` (NaN stays NaN).
fn min0(x: Val) -> Val {
    Val::Bin(BinOp::Min, Box::new(x), Box::new(Val::Const(0.0)))
}

/// `x` clamped to `[0, 1]` (NaN stays NaN).
fn clamp01(x: Val) -> Val {
    Val::Bin(BinOp::Min, Box::new(max0(x)), Box::new(Val::Const(1.0)))
}

/// `log(1 + exp(x))` without overflow: `max(x, 0) + log(1 + exp(-|x|))`.
fn softplus(x: Val) -> Val {
    let e = Val::Un(UnOp::Exp, Box::new(Val::Un(UnOp::Neg, Box::new(Val::Un(UnOp::Abs, Box::new(x.clone()))))));
    add(max0(x), Val::Un(UnOp::Log, Box::new(add(Val::Const(1.0), e))))
}

impl Lowering<'_> {
    fn shape(&self, v: ValueId) -> LowerResult<&[Dim]> {
        self.m.value(v).ty.shape.as_deref().ok_or_else(|| format!("{} has an unknown rank", self.m.value_label(v)))
    }

    fn dim(&self, d: &Dim) -> LowerResult<Idx> {
        match d {
            Dim::Known(n) => Ok(Idx::Const(*n as i64)),
            Dim::Sym(s) => match self.syms.get(&**s) {
                Some(&(buf, axis)) => Ok(Idx::Dim { buf, axis }),
                None => Err(format!("symbolic dim '{s}' is carried by no buffer of the kernel")),
            },
        }
    }

    /// The index into a value of shape `inp` read by an element `idx` of shape `out` under
    /// numpy broadcasting.
    fn broadcast(&self, idx: &[Idx], out: &[Dim], inp: &[Dim]) -> LowerResult<Vec<Idx>> {
        let offset = out.len().checked_sub(inp.len()).ok_or("an operand has a higher rank than the result")?;
        inp.iter()
            .enumerate()
            .map(|(j, d)| {
                let i = idx[offset + j].clone();
                Ok(match (d, &out[offset + j]) {
                    (Dim::Known(1), _) => Idx::Const(0),
                    (Dim::Known(_), _) => i,
                    (Dim::Sym(a), Dim::Sym(o)) if a == o => i,
                    (d, _) => Idx::ZeroIfOne(b(self.dim(d)?), b(i)),
                })
            })
            .collect()
    }

    /// Row-major linear offset of `idx` in `shape`.
    fn linearize(&self, idx: &[Idx], shape: &[Dim]) -> LowerResult<Idx> {
        let mut lin = Idx::Const(0);
        for (i, d) in idx.iter().zip(shape) {
            lin = Idx::Add(b(Idx::Mul(b(lin), b(self.dim(d)?))), b(i.clone()));
        }
        Ok(lin)
    }

    /// The index in `shape` of linear offset `lin`.
    fn delinearize(&self, lin: Idx, shape: &[Dim]) -> LowerResult<Vec<Idx>> {
        let mut out = vec![Idx::Const(0); shape.len()];
        let mut rest = lin;
        for (k, d) in shape.iter().enumerate().rev() {
            let size = self.dim(d)?;
            if k == 0 {
                out[k] = rest.clone();
            } else {
                out[k] = Idx::Rem(b(rest.clone()), b(size.clone()));
                rest = Idx::Div(b(rest), b(size));
            }
        }
        Ok(out)
    }

    /// The index into a value of shape `inp` that a reshape to `out` reads at `idx`. Dims are
    /// matched in groups of equal size (a dim of 1 on its own, a symbol with itself, runs of
    /// known dims with equal products), so a head split `[S, 256] → [S, 4, 64]` reads
    /// `[s, h·64 + d]`: division and remainder only where a group splits one dim into several.
    fn reshape_index(&self, idx: &[Idx], out: &[Dim], inp: &[Dim]) -> LowerResult<Vec<Idx>> {
        let general = || -> LowerResult<Vec<Idx>> {
            let lin = self.linearize(idx, out)?;
            self.delinearize(lin, inp)
        };
        let mut res = Vec::with_capacity(inp.len());
        let (mut i, mut j) = (0, 0);
        loop {
            while i < out.len() && out[i] == Dim::Known(1) {
                i += 1;
            }
            while j < inp.len() && inp[j] == Dim::Known(1) {
                res.push(Idx::Const(0));
                j += 1;
            }
            if i == out.len() || j == inp.len() {
                break;
            }
            if let (Dim::Sym(a), Dim::Sym(c)) = (&out[i], &inp[j]) {
                if a != c {
                    return general();
                }
                res.push(idx[i].clone());
                (i, j) = (i + 1, j + 1);
                continue;
            }
            let (i0, j0) = (i, j);
            let (mut po, mut pi) = (1u64, 1u64);
            let mut known = true;
            loop {
                let from_out = po <= pi && i < out.len();
                let d = if from_out {
                    &out[i]
                } else if j < inp.len() {
                    &inp[j]
                } else {
                    break;
                };
                let Some(n) = d.known() else {
                    known = false;
                    break;
                };
                if from_out {
                    (po, i) = (po * n, i + 1);
                } else {
                    (pi, j) = (pi * n, j + 1);
                }
                if po == pi {
                    break;
                }
            }
            if !known {
                return general();
            }
            if po != pi {
                return general();
            }
            let lin = self.linearize(&idx[i0..i], &out[i0..i])?;
            res.extend(self.delinearize(lin, &inp[j0..j])?);
        }
        if i != out.len() || j != inp.len() {
            return general();
        }
        Ok(res)
    }

    /// Slot `part` of op `o` for the current row, built by `make` the first time.
    fn slot(&self, o: OpId, part: usize, make: impl FnOnce() -> LowerResult<Val>) -> LowerResult<Val> {
        if let Some(&s) = self.memo.borrow().get(&(o, part)) {
            return Ok(Val::Scalar(s));
        }
        let v = make()?;
        let mut slots = self.slots.borrow_mut();
        slots.push(v);
        let s = slots.len() - 1;
        self.memo.borrow_mut().insert((o, part), s);
        Ok(Val::Scalar(s))
    }

    /// For a reduction over the trailing axes `rows..` of `x` read at row `idx[..rows]`: checks
    /// the row is the kernel's current row, and returns a reduction loop variable and extent
    /// per reduced axis (but those of size 1) and the element index of `x` they read.
    fn row_access(&self, x: ValueId, idx: &[Idx]) -> LowerResult<(Vec<(usize, Idx)>, Vec<Idx>)> {
        let shape = self.shape(x)?;
        let r = shape.len();
        if r != self.rank || self.rows >= r || idx.len() != r {
            return Err("a reduction whose rows are not the kernel's rows".into());
        }
        if (0..self.rows).any(|i| idx[i] != Idx::Var(i)) {
            return Err("a reduction read at another row than the kernel's current one".into());
        }
        let mut at: Vec<Idx> = idx[..self.rows].to_vec();
        let mut loops = Vec::new();
        for d in &shape[self.rows..] {
            if *d == Dim::Known(1) {
                at.push(Idx::Const(0));
                continue;
            }
            let var = self.fresh_var();
            loops.push((var, self.dim(d)?));
            at.push(Idx::Var(var));
        }
        Ok((loops, at))
    }

    /// A loop variable for a reduction (numbered from 64, above any loop depth).
    fn fresh_var(&self) -> usize {
        let v = 64 + self.next_var.get();
        self.next_var.set(self.next_var.get() + 1);
        v
    }

    /// `op` over the trailing axes `rows..` of `x`'s row, of `f(x[row, k...])`; also returns
    /// the number of elements reduced.
    fn reduce(&self, op: RedOp, x: ValueId, idx: &[Idx], f: impl Fn(Val) -> Val) -> LowerResult<(Val, Idx)> {
        let (loops, at) = self.row_access(x, idx)?;
        let mut body = f(self.value(x, &at)?);
        let mut n = Idx::Const(1);
        for (var, extent) in loops.into_iter().rev() {
            n = Idx::Mul(b(extent.clone()), b(n));
            body = Val::Reduce { op, var, extent, body: Box::new(body) };
        }
        Ok((body, n.simplify()))
    }

    /// For an op that reduces per row (Reduce* with kept dims, Softmax, LogSoftmax, the norms):
    /// the first axis it reduces, when the axes it reduces are the trailing ones (up to axes of
    /// size 1); an error for other reductions; `None` for other ops.
    fn reduced_from(&self, o: OpId) -> LowerResult<Option<usize>> {
        let op = self.m.op(o);
        let t = op.op_type();
        let attrs = AttrView(&op.attrs);
        let reduces = t.starts_with("Reduce")
            || matches!(
                t,
                "Softmax" | "LogSoftmax" | "LayerNormalization" | "RMSNormalization" | "InstanceNormalization"
            );
        let Some(Some(xv)) = op.operands.first().copied().filter(|_| reduces) else { return Ok(None) };
        let r = self.shape(xv)?.len() as i64;
        let norm = |a: i64| -> LowerResult<usize> {
            let n = if a < 0 { a + r } else { a };
            if (0..r).contains(&n) {
                Ok(n as usize)
            } else {
                Err(format!("{t}: axis {a} is out of range for rank {r}"))
            }
        };
        let (axes, all_after): (Vec<usize>, bool) = match t {
            "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" => {
                if attrs.int("keepdims", 1).map_err(|e| e.0)? != 1 {
                    return Err(format!("{t} without kept dims is not lowered yet"));
                }
                let axes = self.reduce_axes(o)?;
                if axes.is_empty() {
                    if attrs.int("noop_with_empty_axes", 0).map_err(|e| e.0)? != 0 {
                        return Err(format!("{t} with noop_with_empty_axes is not lowered yet"));
                    }
                    ((0..r as usize).collect(), false)
                } else {
                    (axes.into_iter().map(norm).collect::<LowerResult<_>>()?, false)
                }
            }
            "Softmax" | "LogSoftmax" => {
                let opset = kiln_ir::interp::module_opset(self.m);
                let axis = norm(attrs.int("axis", if opset < 13 { 1 } else { -1 }).map_err(|e| e.0)?)?;
                (vec![axis], opset < 13)
            }
            "LayerNormalization" | "RMSNormalization" => (vec![norm(attrs.int("axis", -1).map_err(|e| e.0)?)?], true),
            "InstanceNormalization" if r >= 3 => (vec![2], true),
            "InstanceNormalization" => return Err("InstanceNormalization without spatial dims".into()),
            _ => return Ok(None),
        };
        let Some(&first) = axes.iter().min() else { return Ok(None) };
        let shape = self.shape(xv)?;
        for (a, d) in shape.iter().enumerate().skip(first) {
            if !(all_after || axes.contains(&a) || *d == Dim::Known(1)) {
                return Err(format!(
                    "{t} over axes {axes:?} of a rank-{r} value is not lowered yet (trailing axes only)"
                ));
            }
        }
        Ok(Some(first))
    }

    /// The axes a Reduce* op reduces (attribute before opset 18, or the constant input).
    fn reduce_axes(&self, o: OpId) -> LowerResult<Vec<i64>> {
        let op = self.m.op(o);
        if let Some(Some(a)) = op.operands.get(1) {
            return self.const_ints(Some(*a)).ok_or_else(|| "reduction axes given at run time".into());
        }
        Ok(AttrView(&op.attrs).ints("axes").map_err(|e| e.0)?.unwrap_or_default())
    }

    /// The tensor of a constant operand (through the fused op's operand for a block argument).
    fn const_tensor(&self, v: Option<ValueId>) -> Option<&Tensor> {
        let v = v?;
        let v = self.outer.get(&v).copied().unwrap_or(v);
        let ValueDef::OpResult(c, _) = self.m.value(v).def else { return None };
        let op = self.m.op(c);
        match op.attrs.get("value") {
            Some(Attr::Tensor(t)) if op.op_type() == "Constant" => Some(t),
            _ => None,
        }
    }

    /// A per-channel parameter `p` (shape `[C]`) of an `[N, C, ...]` op at element `idx`.
    fn channel_param(&self, p: ValueId, idx: &[Idx]) -> LowerResult<Val> {
        if self.shape(p)?.len() != 1 || idx.len() < 2 {
            return Err("per-activation (not per-channel) parameters are not lowered yet".into());
        }
        self.value(p, &[idx[1].clone()])
    }

    /// A one-element operand (a Clip bound): its value when constant, else a load of it.
    fn scalar_operand(&self, v: Option<ValueId>) -> LowerResult<Option<Val>> {
        let Some(v) = v else { return Ok(None) };
        if let Some(t) = self.const_tensor(Some(v)).filter(|t| t.dtype() == DType::F32 && t.len() == 1) {
            return Ok(Some(Val::Const(t.to_f64()[0])));
        }
        let shape = self.shape(v)?;
        if shape.iter().any(|d| *d != Dim::Known(1)) {
            return Err(format!("{} is not a one-element value", self.m.value_label(v)));
        }
        Ok(Some(self.value(v, &vec![Idx::Const(0); shape.len()])?))
    }

    /// The integers of a constant operand.
    fn const_ints(&self, v: Option<ValueId>) -> Option<Vec<i64>> {
        self.const_tensor(v).filter(|t| t.dtype().is_int()).map(|t| t.to_i64())
    }

    /// The scalar value of `v` at element `idx`.
    fn value(&self, v: ValueId, idx: &[Idx]) -> LowerResult<Val> {
        if let Some(&buf) = self.arg.get(&v) {
            return Ok(Val::Load { buf, index: idx.iter().map(|i| i.clone().simplify()).collect() });
        }
        if self.m.value(v).ty.dtype != DType::F32 {
            return Err(format!("{} values are not lowered yet (f32 only)", self.m.value(v).ty.dtype));
        }
        let o = *self.inside.get(&v).ok_or_else(|| format!("value {} is not in the kernel", self.m.value_label(v)))?;
        let op = self.m.op(o);
        let t = op.op_type();
        if op.results.len() != 1 {
            return Err(format!("{t} with {} results is not lowered yet", op.results.len()));
        }
        if let Some(first) = self.reduced_from(o)? {
            if first != self.rows {
                return Err(format!("{t} reduces from axis {first}, the kernel's rows end at axis {}", self.rows));
            }
        }
        // A MatMul, Gemm or Conv element a kernel reads twice (an epilogue such as GELU) is the same
        // reduction each time, which `share_reductions` then binds once.
        let at: Vec<Idx> = idx.iter().map(|i| i.clone().simplify()).collect();
        if matches!(t, "MatMul" | "Gemm" | "Conv") {
            if let Some((.., v)) = self.windows.borrow().iter().find(|(p, i, _)| *p == o && *i == at) {
                return Ok(v.clone());
            }
        }
        let remember = |v: Val| -> LowerResult<Val> {
            self.windows.borrow_mut().push((o, at.clone(), v.clone()));
            Ok(v)
        };
        let out = self.shape(v)?.to_vec();
        let x = |i: usize| op.operands.get(i).copied().flatten().ok_or_else(|| format!("{t}: operand {i} is missing"));
        let operand = |i: usize| -> LowerResult<Val> {
            let a = x(i)?;
            let ix = self.broadcast(idx, &out, self.shape(a)?)?;
            self.value(a, &ix)
        };
        let un = |u: UnOp| -> LowerResult<Val> { Ok(Val::Un(u, Box::new(operand(0)?))) };
        let bin = |op: BinOp| -> LowerResult<Val> { Ok(Val::Bin(op, Box::new(operand(0)?), Box::new(operand(1)?))) };
        let attrs = AttrView(&op.attrs);
        match t {
            "Neg" => un(UnOp::Neg),
            "Abs" => un(UnOp::Abs),
            "Exp" => un(UnOp::Exp),
            "Log" => un(UnOp::Log),
            "Sqrt" => un(UnOp::Sqrt),
            "Tanh" => un(UnOp::Tanh),
            "Erf" => un(UnOp::Erf),
            "Floor" => un(UnOp::Floor),
            "Ceil" => un(UnOp::Ceil),
            "Reciprocal" => un(UnOp::Recip),
            "Relu" => un(UnOp::Relu),
            "Sigmoid" => un(UnOp::Sigmoid),
            "Where" => Ok(Val::Where {
                cond: Box::new(operand(0)?),
                then: Box::new(operand(1)?),
                other: Box::new(operand(2)?),
            }),
            "Add" => bin(BinOp::Add),
            "Sub" => bin(BinOp::Sub),
            "Mul" => bin(BinOp::Mul),
            "Div" => bin(BinOp::Div),
            "Pow" => bin(BinOp::Pow),
            "Sum" | "Mean" | "Max" | "Min" => {
                // A left fold over the inputs (broadcast), as the interpreter computes it.
                let f = match t {
                    "Max" => BinOp::Max,
                    "Min" => BinOp::Min,
                    _ => BinOp::Add,
                };
                let mut acc = operand(0)?;
                for i in 1..op.operands.len() {
                    acc = Val::Bin(f, Box::new(acc), Box::new(operand(i)?));
                }
                if t == "Mean" && op.operands.len() > 1 {
                    acc = Val::Bin(BinOp::Div, Box::new(acc), Box::new(Val::Const(op.operands.len() as f64)));
                }
                Ok(acc)
            }
            "LeakyRelu" | "PRelu" => {
                // x < 0 ? slope·x : x, as max(x, 0) + slope·min(x, 0).
                let xv = operand(0)?;
                let slope = if t == "PRelu" {
                    operand(1)?
                } else {
                    Val::Const(attrs.float("alpha", 0.01).map_err(|e| e.0)? as f64)
                };
                Ok(add(max0(xv.clone()), mul(slope, min0(xv))))
            }
            "Elu" | "Celu" | "Selu" => {
                // x > 0 ? γ·x : γ·α·(exp(x/α) - 1) (γ = 1; the α divisor is Celu's), as
                // γ·max(x, 0) + γ·α·(exp(min(x, 0)/α) - 1).
                let default_alpha = if t == "Selu" { 1.673_263_2 } else { 1.0 };
                let alpha = attrs.float("alpha", default_alpha).map_err(|e| e.0)? as f64;
                let xv = operand(0)?;
                let mut neg = min0(xv.clone());
                if t == "Celu" {
                    neg = Val::Bin(BinOp::Div, Box::new(neg), Box::new(Val::Const(alpha)));
                }
                let em1 = Val::Bin(BinOp::Sub, Box::new(Val::Un(UnOp::Exp, Box::new(neg))), Box::new(Val::Const(1.0)));
                if t == "Selu" {
                    let gamma = Val::Const(attrs.float("gamma", 1.050_701).map_err(|e| e.0)? as f64);
                    let ga = mul(gamma.clone(), Val::Const(alpha));
                    Ok(add(mul(gamma, max0(xv)), mul(ga, em1)))
                } else {
                    Ok(add(max0(xv), mul(Val::Const(alpha), em1)))
                }
            }
            "HardSigmoid" => {
                let alpha = attrs.float("alpha", 0.2).map_err(|e| e.0)? as f64;
                let beta = attrs.float("beta", 0.5).map_err(|e| e.0)? as f64;
                Ok(clamp01(add(mul(Val::Const(alpha), operand(0)?), Val::Const(beta))))
            }
            "HardSwish" => {
                // x · clamp01(x / 6 + 1/2)
                let xv = operand(0)?;
                let r = add(Val::Bin(BinOp::Div, Box::new(xv.clone()), Box::new(Val::Const(6.0))), Val::Const(0.5));
                Ok(mul(xv, clamp01(r)))
            }
            "Softplus" => Ok(softplus(operand(0)?)),
            "Mish" => {
                let xv = operand(0)?;
                Ok(mul(xv.clone(), Val::Un(UnOp::Tanh, Box::new(softplus(xv)))))
            }
            "Softsign" => {
                let xv = operand(0)?;
                let d = add(Val::Const(1.0), Val::Un(UnOp::Abs, Box::new(xv.clone())));
                Ok(Val::Bin(BinOp::Div, Box::new(xv), Box::new(d)))
            }
            "Clip" => {
                // min(max(x, lo), hi): NaN stays NaN and lo > hi gives hi, as the interpreter's.
                let (lo, hi) = if attrs.has("min") || attrs.has("max") {
                    let bound = |n: &str| -> LowerResult<Option<Val>> {
                        Ok(if attrs.has(n) {
                            Some(Val::Const(attrs.float(n, 0.0).map_err(|e| e.0)? as f64))
                        } else {
                            None
                        })
                    };
                    (bound("min")?, bound("max")?)
                } else {
                    (
                        self.scalar_operand(op.operands.get(1).copied().flatten())?,
                        self.scalar_operand(op.operands.get(2).copied().flatten())?,
                    )
                };
                let mut y = operand(0)?;
                if let Some(lo) = lo {
                    y = Val::Bin(BinOp::Max, Box::new(y), Box::new(lo));
                }
                if let Some(hi) = hi {
                    y = Val::Bin(BinOp::Min, Box::new(y), Box::new(hi));
                }
                Ok(y)
            }
            "Dropout" => {
                // Inference: the identity (a training_mode input must be a constant false).
                if let Some(tm) = op.operands.get(2).copied().flatten() {
                    match self.const_tensor(Some(tm)) {
                        Some(c) if c.to_bool().iter().all(|&b| !b) => {}
                        _ => return Err("Dropout in training mode is not lowered".into()),
                    }
                }
                self.value(x(0)?, idx)
            }
            "BatchNormalization" => {
                // Inference: x · a + (B - mean · a) with a = scale / sqrt(var + ε), per channel.
                if attrs.int("training_mode", 0).map_err(|e| e.0)? != 0 {
                    return Err("BatchNormalization in training mode is not lowered".into());
                }
                let eps = attrs.float("epsilon", 1e-5).map_err(|e| e.0)? as f64;
                let p = |i: usize| self.channel_param(x(i)?, idx);
                let (scale, bias, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
                let std = Val::Un(UnOp::Sqrt, Box::new(add(var, Val::Const(eps))));
                let a = Val::Bin(BinOp::Div, Box::new(scale), Box::new(std));
                let shift = Val::Bin(BinOp::Sub, Box::new(bias), Box::new(mul(mean, a.clone())));
                Ok(add(mul(self.value(x(0)?, idx)?, a), shift))
            }
            "ConstantOfShape" => {
                let c = match attrs.tensor("value").map_err(|e| e.0)? {
                    Some(t) if t.len() == 1 => t.to_f64()[0],
                    Some(_) => return Err("ConstantOfShape with a value of several elements".into()),
                    None => 0.0,
                };
                Ok(Val::Const(c))
            }
            "MaxPool" | "AveragePool" | "LpPool" | "GlobalMaxPool" | "GlobalAveragePool" | "GlobalLpPool" | "LRN" => {
                // Index 0 along dims of size 1, however the consumer wrote it.
                let idx: Vec<Idx> = idx
                    .iter()
                    .zip(&out)
                    .map(|(i, d)| if *d == Dim::Known(1) { Idx::Const(0) } else { i.clone().simplify() })
                    .collect();
                if let Some((.., v)) = self.windows.borrow().iter().find(|(p, at, _)| *p == o && *at == idx) {
                    return Ok(v.clone());
                }
                let v = if t == "LRN" { self.lrn(o, &idx)? } else { self.pool(o, &idx)? };
                self.windows.borrow_mut().push((o, idx, v.clone()));
                Ok(v)
            }
            "Gelu" if attrs.string("approximate", "none").map_err(|e| e.0)? == "none" => {
                // 0.5·x·(1 + erf(x/√2))
                let xv = operand(0)?;
                let scaled =
                    Val::Bin(BinOp::Mul, Box::new(xv.clone()), Box::new(Val::Const(std::f64::consts::FRAC_1_SQRT_2)));
                let erf1 =
                    Val::Bin(BinOp::Add, Box::new(Val::Const(1.0)), Box::new(Val::Un(UnOp::Erf, Box::new(scaled))));
                let half_x = Val::Bin(BinOp::Mul, Box::new(Val::Const(0.5)), Box::new(xv));
                Ok(Val::Bin(BinOp::Mul, Box::new(half_x), Box::new(erf1)))
            }
            "Gelu" if attrs.string("approximate", "none").map_err(|e| e.0)? == "tanh" => {
                // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
                let xv = operand(0)?;
                let x3 = mul(xv.clone(), mul(xv.clone(), xv.clone()));
                let inner = mul(
                    Val::Const((2.0 / std::f64::consts::PI).sqrt()),
                    add(xv.clone(), mul(Val::Const(0.044715), x3)),
                );
                let t1 = add(Val::Const(1.0), Val::Un(UnOp::Tanh, Box::new(inner)));
                Ok(mul(mul(Val::Const(0.5), xv), t1))
            }
            "Swish" => {
                let alpha = attrs.float("alpha", 1.0).map_err(|e| e.0)? as f64;
                let xv = operand(0)?;
                let ax = Val::Bin(BinOp::Mul, Box::new(Val::Const(alpha)), Box::new(xv.clone()));
                Ok(Val::Bin(BinOp::Mul, Box::new(xv), Box::new(Val::Un(UnOp::Sigmoid, Box::new(ax)))))
            }
            "Identity" => self.value(x(0)?, idx),
            "Transpose" => {
                let a = x(0)?;
                let r = idx.len();
                let perm: Vec<usize> = match attrs.ints("perm").map_err(|e| e.0)? {
                    Some(p) => p.iter().map(|&p| if p < 0 { (p + r as i64) as usize } else { p as usize }).collect(),
                    None => (0..r).rev().collect(),
                };
                let mut inner = vec![Idx::Const(0); r];
                for (i, &p) in perm.iter().enumerate() {
                    *inner.get_mut(p).ok_or("Transpose: bad perm")? = idx[i].clone();
                }
                self.value(a, &inner)
            }
            "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" => {
                let xv = x(0)?;
                let red = match t {
                    "ReduceMax" => RedOp::Max,
                    "ReduceMin" => RedOp::Min,
                    _ => RedOp::Sum,
                };
                self.slot(o, 0, || {
                    let (sum, n) = self.reduce(red, xv, idx, |e| e)?;
                    Ok(if t == "ReduceMean" {
                        Val::Bin(BinOp::Div, Box::new(sum), Box::new(Val::FromIdx(n)))
                    } else {
                        sum
                    })
                })
            }
            "Softmax" | "LogSoftmax" => {
                let xv = x(0)?;
                let max = self.slot(o, 0, || Ok(self.reduce(RedOp::Max, xv, idx, |e| e)?.0))?;
                let centred = |e: Val| Val::Bin(BinOp::Sub, Box::new(e), Box::new(max.clone()));
                let shifted = |e: Val| Val::Un(UnOp::Exp, Box::new(centred(e)));
                let sum = self.slot(o, 1, || Ok(self.reduce(RedOp::Sum, xv, idx, shifted)?.0))?;
                if t == "LogSoftmax" {
                    // x - max - log(sum)
                    let ls = self.slot(o, 2, || Ok(Val::Un(UnOp::Log, Box::new(sum.clone()))))?;
                    return Ok(Val::Bin(BinOp::Sub, Box::new(centred(self.value(xv, idx)?)), Box::new(ls)));
                }
                Ok(Val::Bin(BinOp::Div, Box::new(shifted(self.value(xv, idx)?)), Box::new(sum)))
            }
            "LayerNormalization" | "RMSNormalization" | "InstanceNormalization" => {
                let xv = x(0)?;
                let eps = attrs.float("epsilon", 1e-5).map_err(|e| e.0)? as f64;
                let rms = t == "RMSNormalization";
                let mean = if rms {
                    Val::Const(0.0)
                } else {
                    self.slot(o, 0, || {
                        let (sum, n) = self.reduce(RedOp::Sum, xv, idx, |e| e)?;
                        Ok(Val::Bin(BinOp::Div, Box::new(sum), Box::new(Val::FromIdx(n))))
                    })?
                };
                let centred = |e: Val| if rms { e } else { Val::Bin(BinOp::Sub, Box::new(e), Box::new(mean.clone())) };
                let rstd = self.slot(o, 1, || {
                    let sq = |e: Val| {
                        let c = centred(e);
                        Val::Bin(BinOp::Mul, Box::new(c.clone()), Box::new(c))
                    };
                    let (sum, n) = self.reduce(RedOp::Sum, xv, idx, sq)?;
                    let var = Val::Bin(BinOp::Div, Box::new(sum), Box::new(Val::FromIdx(n)));
                    let std =
                        Val::Un(UnOp::Sqrt, Box::new(Val::Bin(BinOp::Add, Box::new(var), Box::new(Val::Const(eps)))));
                    Ok(Val::Un(UnOp::Recip, Box::new(std)))
                })?;
                let normed = Val::Bin(BinOp::Mul, Box::new(centred(self.value(xv, idx)?)), Box::new(rstd));
                // Scale and bias: [C] per channel (InstanceNormalization), else broadcast
                // against the normalized axes.
                let param = |i: usize| -> LowerResult<Val> {
                    if t == "InstanceNormalization" {
                        self.channel_param(x(i)?, idx)
                    } else {
                        operand(i)
                    }
                };
                let scaled = Val::Bin(BinOp::Mul, Box::new(normed), Box::new(param(1)?));
                match op.operands.get(2).copied().flatten() {
                    Some(_) if !rms => Ok(Val::Bin(BinOp::Add, Box::new(scaled), Box::new(param(2)?))),
                    _ => Ok(scaled),
                }
            }
            "MatMul" => {
                // out[..., i, j] = Σ_k a[..., i, k] · b[..., k, j] (batch dims broadcast).
                let (a, bm) = (x(0)?, x(1)?);
                let (sa, sb) = (self.shape(a)?.to_vec(), self.shape(bm)?.to_vec());
                let r = out.len();
                if sa.len() < 2 || sb.len() < 2 || r < 2 {
                    return Err("MatMul of vectors is not lowered yet".into());
                }
                let k = self.fresh_var();
                let (batch, i, j) = (&idx[..r - 2], idx[r - 2].clone(), idx[r - 1].clone());
                let mut ia = self.broadcast(batch, &out[..r - 2], &sa[..sa.len() - 2])?;
                ia.extend([i, Idx::Var(k)]);
                let mut ib = self.broadcast(batch, &out[..r - 2], &sb[..sb.len() - 2])?;
                ib.extend([Idx::Var(k), j]);
                let body = Val::Bin(BinOp::Mul, Box::new(self.value(a, &ia)?), Box::new(self.value(bm, &ib)?));
                remember(Val::Reduce {
                    op: RedOp::Sum,
                    var: k,
                    extent: self.dim(&sa[sa.len() - 1])?,
                    body: Box::new(body),
                })
            }
            "Conv" => remember(self.conv_element(o, &at)?),
            "Gemm" => {
                // alpha · op(A)·op(B) + beta · C, A and B 2-D.
                let (a, bm) = (x(0)?, x(1)?);
                let (ta, tb) =
                    (attrs.int("transA", 0).map_err(|e| e.0)? != 0, attrs.int("transB", 0).map_err(|e| e.0)? != 0);
                let (alpha, beta) = (
                    attrs.float("alpha", 1.0).map_err(|e| e.0)? as f64,
                    attrs.float("beta", 1.0).map_err(|e| e.0)? as f64,
                );
                let sa = self.shape(a)?.to_vec();
                let k = self.fresh_var();
                let (i, j) = (idx[0].clone(), idx[1].clone());
                let ia = if ta { vec![Idx::Var(k), i] } else { vec![i, Idx::Var(k)] };
                let ib = if tb { vec![j, Idx::Var(k)] } else { vec![Idx::Var(k), j] };
                let body = Val::Bin(BinOp::Mul, Box::new(self.value(a, &ia)?), Box::new(self.value(bm, &ib)?));
                let kdim = &sa[if ta { 0 } else { 1 }];
                let sum = Val::Reduce { op: RedOp::Sum, var: k, extent: self.dim(kdim)?, body: Box::new(body) };
                let mut y = Val::Bin(BinOp::Mul, Box::new(Val::Const(alpha)), Box::new(sum));
                if op.operands.get(2).copied().flatten().is_some() {
                    let c = Val::Bin(BinOp::Mul, Box::new(Val::Const(beta)), Box::new(operand(2)?));
                    y = Val::Bin(BinOp::Add, Box::new(y), Box::new(c));
                }
                remember(y)
            }
            "Expand" => {
                let a = x(0)?;
                let ix = self.broadcast(idx, &out, self.shape(a)?)?;
                self.value(a, &ix)
            }
            "Slice" => {
                // in[axis] = start + out[axis] · step, with constant starts/steps on known dims.
                let a = x(0)?;
                let sa = self.shape(a)?.to_vec();
                let r = sa.len() as i64;
                let operand = |i: usize| op.operands.get(i).copied().flatten();
                let starts = self.const_ints(operand(1)).ok_or("Slice with run-time starts")?;
                let axes = match operand(3) {
                    Some(_) => self.const_ints(operand(3)).ok_or("Slice with run-time axes")?,
                    None => (0..starts.len() as i64).collect(),
                };
                let steps = match operand(4) {
                    Some(_) => self.const_ints(operand(4)).ok_or("Slice with run-time steps")?,
                    None => vec![1; starts.len()],
                };
                let mut inner = idx.to_vec();
                for ((&s0, &ax), &st) in starts.iter().zip(&axes).zip(&steps) {
                    let ax = if ax < 0 { ax + r } else { ax } as usize;
                    let n = sa.get(ax).and_then(|d| d.known()).ok_or("Slice of a symbolic dim")? as i64;
                    if st == 0 {
                        return Err("Slice with step 0".into());
                    }
                    let mut s = if s0 < 0 { s0 + n } else { s0 };
                    s = if st > 0 { s.clamp(0, n) } else { s.clamp(-1, n - 1) };
                    inner[ax] = Idx::Add(b(Idx::Const(s)), b(Idx::Mul(b(idx[ax].clone()), b(Idx::Const(st)))));
                }
                self.value(a, &inner)
            }
            "Concat" => {
                // Input p holds positions [offset_p, offset_p + size_p) of the axis.
                let r = out.len() as i64;
                let axis = attrs.int("axis", 0).map_err(|e| e.0)?;
                let axis = if axis < 0 { axis + r } else { axis } as usize;
                let parts: Vec<ValueId> = op.operands.iter().flatten().copied().collect();
                let mut offsets = Vec::new();
                let mut off = Idx::Const(0);
                for &p in &parts {
                    offsets.push(off.clone());
                    off = Idx::Add(b(off), b(self.dim(&self.shape(p)?[axis])?));
                }
                let at = |k: usize| -> LowerResult<Val> {
                    let mut ix = idx.to_vec();
                    ix[axis] = Idx::Sub(b(idx[axis].clone()), b(offsets[k].clone()));
                    self.value(parts[k], &ix)
                };
                let last = parts.len().checked_sub(1).ok_or("Concat of nothing")?;
                let mut v = at(last)?;
                for k in (0..last).rev() {
                    v = Val::IfLess {
                        lhs: idx[axis].clone(),
                        rhs: offsets[k + 1].clone(),
                        then: Box::new(at(k)?),
                        other: Box::new(v),
                    };
                }
                Ok(v)
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                let a = x(0)?;
                let inner = self.reshape_index(idx, &out, self.shape(a)?)?;
                self.value(a, &inner)
            }
            other => Err(format!("{other} is not lowered to the kernel dialect yet")),
        }
    }
}

/// Reductions an element's stores all evaluate (outside conditional branches and other
/// reductions' bodies), each once per occurrence.
fn unconditional_reductions<'v>(v: &'v Val, found: &mut Vec<&'v Val>) {
    match v {
        Val::Reduce { .. } => found.push(v),
        Val::Un(_, x) => unconditional_reductions(x, found),
        Val::Bin(_, x, y) => {
            unconditional_reductions(x, found);
            unconditional_reductions(y, found);
        }
        _ => {}
    }
}

/// `v` with every unconditional occurrence of `r` replaced by scalar `slot`.
fn replace_reduction(v: Val, r: &Val, slot: usize) -> Val {
    match v {
        v if v == *r => Val::Scalar(slot),
        Val::Un(op, x) => Val::Un(op, Box::new(replace_reduction(*x, r, slot))),
        Val::Bin(op, x, y) => {
            Val::Bin(op, Box::new(replace_reduction(*x, r, slot)), Box::new(replace_reduction(*y, r, slot)))
        }
        v => v,
    }
}

/// Whether `v` calls a function that costs far more than a load (an exp, log, tanh, erf, ...).
fn expensive(v: &Val) -> bool {
    match v {
        Val::Un(op, x) => matches!(op, UnOp::Exp | UnOp::Log | UnOp::Tanh | UnOp::Erf | UnOp::Sigmoid) || expensive(x),
        Val::Bin(op, x, y) => *op == BinOp::Pow || expensive(x) || expensive(y),
        Val::Where { cond, then, other } => expensive(cond) || expensive(then) || expensive(other),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => expensive(then) || expensive(other),
        Val::Reduce { .. } | Val::Const(_) | Val::Load { .. } | Val::Scalar(_) | Val::FromIdx(_) => false,
    }
}

/// `v` with every occurrence of `from` (outside reduction bodies) replaced by `to`; whether
/// there was one.
fn replace_val(v: &Val, from: &Val, to: &Val) -> (Val, bool) {
    if v == from {
        return (to.clone(), true);
    }
    let r = |x: &Val| {
        let (y, hit) = replace_val(x, from, to);
        (Box::new(y), hit)
    };
    match v {
        Val::Un(op, x) => {
            let (x, h) = r(x);
            (Val::Un(*op, x), h)
        }
        Val::Bin(op, x, y) => {
            let ((x, h1), (y, h2)) = (r(x), r(y));
            (Val::Bin(*op, x, y), h1 || h2)
        }
        Val::Where { cond, then, other } => {
            let ((cond, h1), (then, h2), (other, h3)) = (r(cond), r(then), r(other));
            (Val::Where { cond, then, other }, h1 || h2 || h3)
        }
        _ => (v.clone(), false),
    }
}

/// Softmax's exponentials computed once per element instead of twice. When a row's last
/// reduction (`lets`' last) is a sum of an expensive term `t(k)` that the row's one store (to
/// an output, at element `vars`) also evaluates at its own element, the row first stores `t`
/// into that output (a loop of `extent`), the sum reads it back, and the store reads `t` from
/// the output instead of evaluating it again. The output's row stays in L1 between the passes.
fn store_row_terms(
    lets: &mut Vec<Stmt>,
    stores: &mut [Stmt],
    vars: &[Idx],
    extent: Idx,
    same_extent: impl Fn(&Idx) -> bool,
) {
    let (
        [Stmt::Store { buf, index, value }],
        Some(Stmt::Let { slot, value: Val::Reduce { op: RedOp::Sum, var, extent: e, body } }),
    ) = (&mut *stores, lets.last())
    else {
        return;
    };
    let axis = vars.len() - 1;
    if index.as_slice() != vars || !same_extent(e) || !expensive(body) || reads(body, *buf) {
        return;
    }
    let term = body.subst(*var, &Idx::Var(axis));
    let at = Val::Load { buf: *buf, index: index.clone() };
    let (stored, hit) = replace_val(value, &term, &at);
    if !hit {
        return;
    }
    let mut back = index.clone();
    back[axis] = Idx::Var(*var);
    let sum = Stmt::Let {
        slot: *slot,
        value: Val::Reduce {
            op: RedOp::Sum,
            var: *var,
            extent: e.clone(),
            body: Box::new(Val::Load { buf: *buf, index: back }),
        },
    };
    let fill = Stmt::For {
        var: axis,
        extent,
        parallel: false,
        body: vec![Stmt::Store { buf: *buf, index: index.clone(), value: term }],
    };
    *value = stored;
    lets.pop();
    lets.push(fill);
    lets.push(sum);
}

/// Whether `v` loads from buffer `buf`.
fn reads(v: &Val, buf: usize) -> bool {
    match v {
        Val::Load { buf: b, .. } => *b == buf,
        Val::Un(_, x) => reads(x, buf),
        Val::Bin(_, x, y) => reads(x, buf) || reads(y, buf),
        Val::Where { cond, then, other } => reads(cond, buf) || reads(then, buf) || reads(other, buf),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => reads(then, buf) || reads(other, buf),
        Val::Reduce { body, .. } => reads(body, buf),
        Val::Const(_) | Val::Scalar(_) | Val::FromIdx(_) => false,
    }
}

/// Binds each reduction that an element's stores evaluate more than once (a pooled value
/// stored and also fed to an epilogue) to a scalar once per element (slots from `first_slot`).
fn share_reductions(mut stores: Vec<Stmt>, first_slot: usize) -> Vec<Stmt> {
    let mut shared: Vec<Val> = Vec::new();
    {
        let mut found = Vec::new();
        for s in &stores {
            if let Stmt::Store { value, .. } = s {
                unconditional_reductions(value, &mut found);
            }
        }
        for (i, r) in found.iter().enumerate() {
            if found[i + 1..].contains(r) && !shared.contains(r) {
                shared.push((*r).clone());
            }
        }
    }
    let mut lets = Vec::new();
    for (k, r) in shared.into_iter().enumerate() {
        let slot = first_slot + k;
        for s in &mut stores {
            if let Stmt::Store { value, .. } = s {
                *value = replace_reduction(std::mem::replace(value, Val::Const(0.0)), &r, slot);
            }
        }
        lets.push(Stmt::Let { slot, value: r });
    }
    lets.extend(stores);
    lets
}

/// Lowers top-level op `o` of `m` (a `graph.fused` kernel or one op: elementwise, layout,
/// row reduction or contraction) to a kernel named `name`.
pub fn lower(m: &Module, o: OpId, name: &str) -> LowerResult<Kernel> {
    lower_with(m, o, name, &Schedule::default())
}

/// [`lower`] with the tile sizes of `sched` (from the target's machine description,
/// [`Schedule::for_machine`]).
pub fn lower_with(m: &Module, o: OpId, name: &str, sched: &Schedule) -> LowerResult<Kernel> {
    let op = m.op(o);
    let mut outer: HashMap<ValueId, ValueId> = HashMap::new();
    // The kernel's operands (`None` where omitted: such an operand is no buffer).
    let (args, ops, yields): (Vec<Option<ValueId>>, Vec<OpId>, Vec<ValueId>) = if op.name == "graph.fused" {
        let kind = match op.attrs.get("kind") {
            Some(Attr::Str(k)) => k.as_str(),
            _ => "",
        };
        let anchor = match op.attrs.get("anchor") {
            Some(Attr::Str(a)) => a.as_str(),
            _ => "",
        };
        let contraction = kind == "contraction" && matches!(anchor, "MatMul" | "Gemm" | "Conv")
            || kind == "attention" && anchor == "Attention";
        if !matches!(kind, "elementwise" | "layout" | "reduction") && !contraction {
            return Err(format!("kernels of kind '{kind}' (anchor {anchor}) are not lowered yet"));
        }
        let blk = op.regions.first().and_then(|r| r.blocks.first()).ok_or("a fused op without a body")?;
        for (&a, v) in blk.args.iter().zip(&op.operands) {
            if let Some(v) = v {
                outer.insert(a, *v);
            }
        }
        let args = blk.args.iter().zip(&op.operands).map(|(&a, v)| v.map(|_| a)).collect();
        (args, blk.ops.clone(), blk.yields.clone())
    } else {
        (op.operands.clone(), vec![o], op.results.clone())
    };
    // Buffers: the f32 and bool operands (others, e.g. shape operands, only steer index maps),
    // then the results.
    let mut buffers = Vec::new();
    let mut operand_of = Vec::new();
    let mut arg: HashMap<ValueId, usize> = HashMap::new();
    for (i, &v) in args.iter().enumerate() {
        let Some(v) = v else { continue };
        let vd = m.value(v);
        if !matches!(vd.ty.dtype, DType::F32 | DType::Bool) {
            continue;
        }
        let shape = vd.ty.shape.clone().ok_or("a value of unknown rank")?;
        arg.insert(v, buffers.len());
        operand_of.push(i);
        buffers.push(Buffer { name: format!("in{i}"), dtype: vd.ty.dtype, shape, level: Level::Global });
    }
    let inputs = buffers.len();
    // An attention kernel: one Attention op computes its one output.
    let attention = match (yields.as_slice(), ops.last()) {
        ([y], Some(&last)) if m.op(last).op_type() == "Attention" && m.op(last).results.first() == Some(y) => {
            Some(last)
        }
        _ => None,
    };
    for (k, &v) in yields.iter().enumerate() {
        let vd = m.value(v);
        if vd.ty.dtype != DType::F32 {
            return Err(format!("{} results are not lowered yet (f32 only)", vd.ty.dtype));
        }
        let mut shape = vd.ty.shape.clone().ok_or("a value of unknown rank")?;
        if let Some(att) = attention {
            shape = attention::output_shape(m, att)?;
        }
        buffers.push(Buffer { name: format!("out{k}"), dtype: DType::F32, shape, level: Level::Global });
    }
    // Output sizes must follow from the inputs' (a run-time shape operand would need the
    // host to compute them first).
    for buf in &buffers[inputs..] {
        for d in &buf.shape {
            if let Dim::Sym(s) = d {
                if !buffers[..inputs].iter().any(|b| b.shape.contains(d)) {
                    return Err(format!("output dim '{s}' is known only at run time"));
                }
            }
        }
    }
    let mut syms = HashMap::new();
    for (bi, buf) in buffers.iter().enumerate() {
        for (axis, d) in buf.shape.iter().enumerate() {
            if let Dim::Sym(s) = d {
                syms.entry(s.to_string()).or_insert((bi, axis));
            }
        }
    }
    let inside: HashMap<ValueId, OpId> =
        ops.iter().flat_map(|&i| m.op(i).results.iter().map(move |&r| (r, i))).collect();
    // Contractions accumulate into their output (see `contraction`).
    let parts = contraction::Parts {
        m,
        name,
        ops: &ops,
        yields: &yields,
        buffers: &buffers,
        inputs,
        operands: &operand_of,
        arg: &arg,
        syms: &syms,
        inside: &inside,
        outer: &outer,
        sched,
    };
    if let Some(k) = contraction::lower(&parts)? {
        return Ok(k);
    }
    // The full-size output sets the loop nest; reduced outputs ([rows..., 1]) store once a row.
    let full = (0..yields.len())
        .max_by_key(|&k| buffers[inputs + k].shape.last().map_or(0, |d| d.known().map_or(u64::MAX, |n| n)))
        .ok_or("a kernel without outputs")?;
    let out_shape = buffers[inputs + full].shape.clone();
    let rank = out_shape.len();
    let mut lw = Lowering {
        m,
        arg,
        inside,
        syms,
        rank,
        rows: rank.saturating_sub(1),
        slots: RefCell::new(Vec::new()),
        memo: RefCell::new(HashMap::new()),
        next_var: Default::default(),
        outer,
        windows: RefCell::new(Vec::new()),
        sched: sched.clone(),
    };
    if let Some(att) = attention {
        let (locals, body) = attention::body(&lw, att, inputs, buffers.len())?;
        return Ok(Kernel {
            name: name.to_string(),
            buffers,
            inputs,
            operands: operand_of,
            locals,
            body,
            knobs: Knobs::default(),
        });
    }
    // The row dims: those before the axes the kernel's row reductions reduce (all of them
    // must reduce the same trailing axes); pooling and other window ops reduce inside each
    // element's expression instead, and leave the elementwise loop nest.
    let mut from = None;
    for &o in &ops {
        if let Some(first) = lw.reduced_from(o)? {
            if from.is_some_and(|f| f != first) {
                return Err("reductions over different axes in one kernel are not lowered yet".into());
            }
            from = Some(first);
        }
    }
    if let Some(first) = from {
        lw.rows = first;
    }
    let rows = lw.rows;
    let vars: Vec<Idx> = (0..rank).map(Idx::Var).collect();
    let row_vars: Vec<Idx> = (0..rank).map(|i| if i < rows { Idx::Var(i) } else { Idx::Const(0) }).collect();
    let reduced_like = |shape: &[Dim]| {
        rank > 0
            && shape.len() == rank
            && shape[..rows] == out_shape[..rows]
            && shape[rows..].iter().all(|d| *d == Dim::Known(1))
    };
    let mut full_stores = Vec::new();
    let mut row_stores = Vec::new();
    for (k, &y) in yields.iter().enumerate() {
        if matches!(m.value(y).def, ValueDef::BlockArg) {
            return Err("a kernel output that is one of its inputs".into());
        }
        let shape = lw.shape(y)?;
        let reduced = reduced_like(shape);
        if shape == out_shape.as_slice() && !(reduced && reduced_like(&out_shape) && k != full) {
            full_stores.push(Stmt::Store { buf: inputs + k, index: vars.clone(), value: lw.value(y, &vars)? });
        } else if reduced {
            row_stores.push(Stmt::Store { buf: inputs + k, index: row_vars.clone(), value: lw.value(y, &row_vars)? });
        } else {
            return Err(format!("kernel output {k} has another shape than the kernel's rows"));
        }
    }
    let slots = lw.slots.into_inner();
    let full_stores = share_reductions(full_stores, slots.len());
    let out_buf = inputs + full;
    // The parallel loop: the outermost row axis not known to be 1 (a batch of 1 leaves the
    // channels or rows to the threads).
    let par_axis = (0..rows.max(1).min(rank)).find(|&a| out_shape[a] != Dim::Known(1)).unwrap_or(0);
    let nest = |from: usize, to: usize, mut body: Vec<Stmt>| {
        for axis in (from..to).rev() {
            body = vec![Stmt::For {
                var: axis,
                extent: Idx::Dim { buf: out_buf, axis },
                parallel: axis == par_axis,
                body,
            }];
        }
        body
    };
    let body = if slots.is_empty() && row_stores.is_empty() {
        nest(0, rank, full_stores)
    } else {
        // Per row: bind the reductions, store the reduced outputs, then the row.
        let mut full_stores = full_stores;
        let mut lets: Vec<Stmt> =
            slots.into_iter().enumerate().map(|(slot, value)| Stmt::Let { slot, value }).collect();
        let same_extent = |e: &Idx| match e {
            Idx::Const(n) => out_shape.get(rows) == Some(&Dim::Known(*n as u64)),
            Idx::Dim { buf, axis } => buffers[*buf].shape.get(*axis) == out_shape.get(rows),
            _ => false,
        };
        if rank == rows + 1 && sched.store_row_terms {
            let extent = Idx::Dim { buf: out_buf, axis: rows };
            store_row_terms(&mut lets, &mut full_stores, &vars, extent, same_extent);
        }
        let mut row = lets;
        row.extend(row_stores);
        if !full_stores.is_empty() {
            row.extend(nest(rows, rank, full_stores));
        }
        nest(0, rows, row)
    };
    Ok(Kernel {
        name: name.to_string(),
        buffers,
        inputs,
        operands: operand_of,
        locals: Vec::new(),
        body,
        knobs: Knobs::default(),
    })
}
