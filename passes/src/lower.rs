//! Lowering graph → kernel (first cut: elementwise, row-reduction and contraction kernels).
//!
//! A `graph.fused` kernel of kind `elementwise`, `layout` or `reduction`, or a single such op,
//! becomes one [`Kernel`]: a loop nest over the (first) output's dims, and per output a store of
//! an expression built by walking the kernel's ops backwards from the output element. Index
//! maps become index arithmetic, never copies: broadcasting (a dim of 1, known or only at run
//! time), Transpose (permuted indices) and the views (linearize, then delinearize). Sizes stay
//! symbolic: a symbolic dim reads the extent of a buffer that carries it.
//!
//! Reductions over the last axis (ReduceSum/Mean/Max/Min with kept dims, Softmax,
//! LayerNormalization, RMSNormalization) become per-row scalars: the row loops bind each once
//! ([`Stmt::Let`] of a [`Val::Reduce`]), then an inner loop stores the row, so a fused
//! `residual add → LayerNorm → scale` kernel reads its inputs once per pass over the row.
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
use kiln_ir::{DType, Dim};
use std::cell::RefCell;
use std::collections::HashMap;

pub mod contraction;

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
    /// Row dims of the kernel (all but the last output dim); reductions are per row.
    rows: usize,
    /// Per-row scalars (reductions), in the order they must be bound.
    slots: RefCell<Vec<Val>>,
    /// Slots already built, by op and part.
    memo: RefCell<HashMap<(OpId, usize), usize>>,
    /// Reduction loop variables handed out (numbered from 64, above any loop depth).
    next_var: std::cell::Cell<usize>,
    /// For a fused kernel, the outer operand each block argument stands for.
    outer: HashMap<ValueId, ValueId>,
}

fn b(i: Idx) -> Box<Idx> {
    Box::new(i)
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

    /// For a reduction over the last axis of `x` read at row `idx[..rank-1]`: checks the row is
    /// the kernel's current row, and returns the reduction loop's variable, its extent and
    /// the element index of `x` it reads.
    fn row_access(&self, x: ValueId, idx: &[Idx]) -> LowerResult<(usize, Idx, Vec<Idx>)> {
        let shape = self.shape(x)?;
        let r = shape.len();
        if r == 0 || r - 1 != self.rows || idx.len() != r {
            return Err("a reduction whose rows are not the kernel's rows".into());
        }
        if (0..self.rows).any(|i| idx[i] != Idx::Var(i)) {
            return Err("a reduction read at another row than the kernel's current one".into());
        }
        let var = self.fresh_var();
        let mut at: Vec<Idx> = idx[..self.rows].to_vec();
        at.push(Idx::Var(var));
        Ok((var, self.dim(&shape[r - 1])?, at))
    }

    /// A loop variable for a reduction (numbered from 64, above any loop depth).
    fn fresh_var(&self) -> usize {
        let v = 64 + self.next_var.get();
        self.next_var.set(self.next_var.get() + 1);
        v
    }

    /// `op` over the last axis of `x`'s row, of `f(x[row, k])`.
    fn reduce(&self, op: RedOp, x: ValueId, idx: &[Idx], f: impl Fn(Val) -> Val) -> LowerResult<(Val, Idx)> {
        let (var, extent, at) = self.row_access(x, idx)?;
        let body = f(self.value(x, &at)?);
        Ok((Val::Reduce { op, var, extent: extent.clone(), body: Box::new(body) }, extent))
    }

    /// The axes a Reduce* op reduces (attribute before opset 18, or the constant input).
    fn reduce_axes(&self, o: OpId) -> LowerResult<Vec<i64>> {
        let op = self.m.op(o);
        if let Some(Some(a)) = op.operands.get(1) {
            return self.const_ints(Some(*a)).ok_or_else(|| "reduction axes given at run time".into());
        }
        Ok(AttrView(&op.attrs).ints("axes").map_err(|e| e.0)?.unwrap_or_default())
    }

    /// The integers of a constant operand (through the fused op's operand for a block argument).
    fn const_ints(&self, v: Option<ValueId>) -> Option<Vec<i64>> {
        let v = v?;
        let v = self.outer.get(&v).copied().unwrap_or(v);
        let ValueDef::OpResult(c, _) = self.m.value(v).def else { return None };
        let op = self.m.op(c);
        match op.attrs.get("value") {
            Some(Attr::Tensor(t)) if op.op_type() == "Constant" && t.dtype().is_int() => Some(t.to_i64()),
            _ => None,
        }
    }

    /// The scalar value of `v` at element `idx`.
    fn value(&self, v: ValueId, idx: &[Idx]) -> LowerResult<Val> {
        if let Some(&buf) = self.arg.get(&v) {
            return Ok(Val::Load { buf, index: idx.iter().map(|i| i.clone().simplify()).collect() });
        }
        if !self.inside.contains_key(&v) && self.m.value(v).ty.dtype != DType::F32 {
            return Err(format!("{} operands are not lowered yet (f32 only)", self.m.value(v).ty.dtype));
        }
        let o = *self.inside.get(&v).ok_or_else(|| format!("value {} is not in the kernel", self.m.value_label(v)))?;
        let op = self.m.op(o);
        let t = op.op_type();
        if op.results.len() != 1 {
            return Err(format!("{t} with {} results is not lowered yet", op.results.len()));
        }
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
            "Add" => bin(BinOp::Add),
            "Sub" => bin(BinOp::Sub),
            "Mul" => bin(BinOp::Mul),
            "Div" => bin(BinOp::Div),
            "Pow" => bin(BinOp::Pow),
            "Max" | "Min" if op.operands.len() == 2 => bin(if t == "Max" { BinOp::Max } else { BinOp::Min }),
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
                let r = self.shape(xv)?.len() as i64;
                let axes = self.reduce_axes(o)?;
                if attrs.int("keepdims", 1).map_err(|e| e.0)? != 1 || !(axes == [-1] || axes == [r - 1]) {
                    return Err(format!("{t} over axes {axes:?} is not lowered yet (last axis, kept)"));
                }
                let mut row = idx.to_vec();
                *row.last_mut().ok_or("a reduction of a scalar")? = Idx::Const(0);
                let red = match t {
                    "ReduceMax" => RedOp::Max,
                    "ReduceMin" => RedOp::Min,
                    _ => RedOp::Sum,
                };
                self.slot(o, 0, || {
                    let (sum, n) = self.reduce(red, xv, &row, |e| e)?;
                    Ok(if t == "ReduceMean" {
                        Val::Bin(BinOp::Div, Box::new(sum), Box::new(Val::FromIdx(n)))
                    } else {
                        sum
                    })
                })
            }
            "Softmax" => {
                let xv = x(0)?;
                let r = self.shape(xv)?.len() as i64;
                let axis = attrs.int("axis", -1).map_err(|e| e.0)?;
                if axis != -1 && axis != r - 1 {
                    return Err("Softmax over another axis than the last is not lowered yet".into());
                }
                let max = self.slot(o, 0, || Ok(self.reduce(RedOp::Max, xv, idx, |e| e)?.0))?;
                let shifted =
                    |e: Val| Val::Un(UnOp::Exp, Box::new(Val::Bin(BinOp::Sub, Box::new(e), Box::new(max.clone()))));
                let sum = self.slot(o, 1, || Ok(self.reduce(RedOp::Sum, xv, idx, shifted)?.0))?;
                Ok(Val::Bin(BinOp::Div, Box::new(shifted(self.value(xv, idx)?)), Box::new(sum)))
            }
            "LayerNormalization" | "RMSNormalization" => {
                let xv = x(0)?;
                let r = self.shape(xv)?.len() as i64;
                let axis = attrs.int("axis", -1).map_err(|e| e.0)?;
                if axis != -1 && axis != r - 1 {
                    return Err(format!("{t} over several axes is not lowered yet"));
                }
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
                let scaled = Val::Bin(BinOp::Mul, Box::new(normed), Box::new(operand(1)?));
                match op.operands.get(2).copied().flatten() {
                    Some(_) if !rms => Ok(Val::Bin(BinOp::Add, Box::new(scaled), Box::new(operand(2)?))),
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
                Ok(Val::Reduce { op: RedOp::Sum, var: k, extent: self.dim(&sa[sa.len() - 1])?, body: Box::new(body) })
            }
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
                Ok(y)
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
                let lin = self.linearize(idx, &out)?;
                let inner = self.delinearize(lin, self.shape(a)?)?;
                self.value(a, &inner)
            }
            other => Err(format!("{other} is not lowered to the kernel dialect yet")),
        }
    }
}

/// Lowers top-level op `o` of `m` (a `graph.fused` kernel or one op: elementwise, layout,
/// row reduction or contraction) to a kernel named `name`.
pub fn lower(m: &Module, o: OpId, name: &str) -> LowerResult<Kernel> {
    let op = m.op(o);
    let mut outer: HashMap<ValueId, ValueId> = HashMap::new();
    let (args, ops, yields): (Vec<ValueId>, Vec<OpId>, Vec<ValueId>) = if op.name == "graph.fused" {
        let kind = match op.attrs.get("kind") {
            Some(Attr::Str(k)) => k.as_str(),
            _ => "",
        };
        let anchor = match op.attrs.get("anchor") {
            Some(Attr::Str(a)) => a.as_str(),
            _ => "",
        };
        let contraction = kind == "contraction" && matches!(anchor, "MatMul" | "Gemm" | "Conv");
        if !matches!(kind, "elementwise" | "layout" | "reduction") && !contraction {
            return Err(format!("kernels of kind '{kind}' (anchor {anchor}) are not lowered yet"));
        }
        let blk = op.regions.first().and_then(|r| r.blocks.first()).ok_or("a fused op without a body")?;
        for (&a, v) in blk.args.iter().zip(&op.operands) {
            if let Some(v) = v {
                outer.insert(a, *v);
            }
        }
        (blk.args.clone(), blk.ops.clone(), blk.yields.clone())
    } else {
        let args = op.operands.iter().map(|v| v.ok_or("an omitted operand")).collect::<Result<Vec<_>, _>>()?;
        (args, vec![o], op.results.clone())
    };
    // Buffers: the f32 operands (others, e.g. shape operands, only steer index maps), then the
    // results.
    let mut buffers = Vec::new();
    let mut operand_of = Vec::new();
    let mut arg: HashMap<ValueId, usize> = HashMap::new();
    for (i, &v) in args.iter().enumerate() {
        let vd = m.value(v);
        if vd.ty.dtype != DType::F32 {
            continue;
        }
        let shape = vd.ty.shape.clone().ok_or("a value of unknown rank")?;
        arg.insert(v, buffers.len());
        operand_of.push(i);
        buffers.push(Buffer { name: format!("in{i}"), dtype: DType::F32, shape, level: Level::Global });
    }
    let inputs = buffers.len();
    for (k, &v) in yields.iter().enumerate() {
        let vd = m.value(v);
        if vd.ty.dtype != DType::F32 {
            return Err(format!("{} results are not lowered yet (f32 only)", vd.ty.dtype));
        }
        let shape = vd.ty.shape.clone().ok_or("a value of unknown rank")?;
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
    let rows = rank.saturating_sub(1);
    let lw = Lowering {
        m,
        arg,
        inside,
        syms,
        rows,
        slots: RefCell::new(Vec::new()),
        memo: RefCell::new(HashMap::new()),
        next_var: Default::default(),
        outer,
    };
    let vars: Vec<Idx> = (0..rank).map(Idx::Var).collect();
    let mut row_vars: Vec<Idx> = (0..rows).map(Idx::Var).collect();
    if rank > 0 {
        row_vars.push(Idx::Const(0));
    }
    let mut full_stores = Vec::new();
    let mut row_stores = Vec::new();
    for (k, &y) in yields.iter().enumerate() {
        if matches!(m.value(y).def, ValueDef::BlockArg) {
            return Err("a kernel output that is one of its inputs".into());
        }
        let shape = lw.shape(y)?;
        let reduced =
            rank > 0 && shape.len() == rank && shape[..rows] == out_shape[..rows] && shape[rows] == Dim::Known(1);
        if shape == out_shape.as_slice() && !(reduced && out_shape[rows] == Dim::Known(1) && k != full) {
            full_stores.push(Stmt::Store { buf: inputs + k, index: vars.clone(), value: lw.value(y, &vars)? });
        } else if reduced {
            row_stores.push(Stmt::Store { buf: inputs + k, index: row_vars.clone(), value: lw.value(y, &row_vars)? });
        } else {
            return Err(format!("kernel output {k} has another shape than the kernel's rows"));
        }
    }
    let slots = lw.slots.into_inner();
    let out_buf = inputs + full;
    let body = if slots.is_empty() && row_stores.is_empty() {
        let mut body = full_stores;
        for axis in (0..rank).rev() {
            body = vec![Stmt::For { var: axis, extent: Idx::Dim { buf: out_buf, axis }, parallel: axis == 0, body }];
        }
        body
    } else {
        // Per row: bind the reductions, store the reduced outputs, then the row.
        let mut row: Vec<Stmt> = slots.into_iter().enumerate().map(|(slot, value)| Stmt::Let { slot, value }).collect();
        row.extend(row_stores);
        if !full_stores.is_empty() {
            row.push(Stmt::For {
                var: rows,
                extent: Idx::Dim { buf: out_buf, axis: rows },
                parallel: false,
                body: full_stores,
            });
        }
        let mut body = row;
        for axis in (0..rows).rev() {
            body = vec![Stmt::For { var: axis, extent: Idx::Dim { buf: out_buf, axis }, parallel: axis == 0, body }];
        }
        body
    };
    Ok(Kernel { name: name.to_string(), buffers, inputs, operands: operand_of, body, knobs: Knobs::default() })
}
