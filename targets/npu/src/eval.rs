//! A plain evaluator of the kernel dialect at concrete shapes: the oracle that the tests
//! compare the simulator's results with.
//!
//! Arithmetic is f32 with the same scalar functions as the simulator ([`crate::math`]);
//! reductions and [`Stmt::Mma`] accumulate sequentially. Buffers are addressed by their
//! row-major flat offset (bounds are checked on that offset).

use crate::isa::{VBinOp, VUnOp};
use crate::{math, NpuError};
use kiln_ir::kernel::{BinOp, ByZero, Idx, Kernel, Mma, RedOp, Stmt, UnOp, Val};

/// The most loop variables a kernel may number.
const MAX_VARS: usize = 4096;

struct Ev {
    /// Shapes of the parameters then the locals.
    shapes: Vec<Vec<usize>>,
    vars: Vec<i64>,
    slots: Vec<f32>,
}

fn bad(msg: impl Into<String>) -> NpuError {
    NpuError::Unsupported(msg.into())
}

/// Evaluates `k` on `buffers` (inputs then outputs, row-major f32 at `shapes`), writing the
/// outputs.
pub fn eval_kernel(k: &Kernel, shapes: &[Vec<usize>], buffers: &mut [Vec<f32>]) -> Result<(), NpuError> {
    if shapes.len() != k.buffers.len() || buffers.len() != k.buffers.len() {
        return Err(bad(format!(
            "kernel {} has {} buffers; {} shapes and {} buffers given",
            k.name,
            k.buffers.len(),
            shapes.len(),
            buffers.len()
        )));
    }
    let mut ev = Ev { shapes: shapes.to_vec(), vars: vec![0; 128], slots: Vec::new() };
    let mut locals = Vec::new();
    for l in &k.locals {
        let dims: Vec<usize> = l
            .size
            .iter()
            .map(|d| ev.idx(d).and_then(|v| usize::try_from(v).map_err(|_| bad(format!("local size {v}")))))
            .collect::<Result<_, _>>()?;
        locals.push(vec![0f32; dims.iter().product()]);
        ev.shapes.push(dims);
    }
    let mut mem: Vec<&mut Vec<f32>> = buffers.iter_mut().chain(locals.iter_mut()).collect();
    ev.stmts(&k.body, &mut mem)
}

impl Ev {
    fn var(&self, v: usize) -> i64 {
        self.vars.get(v).copied().unwrap_or(0)
    }

    fn set(&mut self, v: usize, x: i64) -> Result<(), NpuError> {
        if v >= MAX_VARS {
            return Err(bad(format!("loop variable i{v} (at most {MAX_VARS})")));
        }
        if v >= self.vars.len() {
            self.vars.resize(v + 1, 0);
        }
        self.vars[v] = x;
        Ok(())
    }

    fn idx(&self, i: &Idx) -> Result<i64, NpuError> {
        let dim = |buf: usize, axis: usize| self.shapes.get(buf).and_then(|s| s.get(axis)).map(|&n| n as i64);
        i.eval(&|v| Some(self.var(v)), &dim, ByZero::Fail).map_err(|e| bad(e.to_string()))
    }

    /// The row-major flat offset of `index` in buffer `buf`, checked against its size.
    fn offset(&self, buf: usize, index: &[Idx]) -> Result<usize, NpuError> {
        let shape = self.shapes.get(buf).ok_or_else(|| bad(format!("buffer %{buf} does not exist")))?;
        if index.len() != shape.len() {
            return Err(bad(format!("buffer %{buf} has rank {}, indexed with {}", shape.len(), index.len())));
        }
        let mut off = 0i64;
        for (i, d) in index.iter().zip(shape) {
            off = off * *d as i64 + self.idx(i)?;
        }
        let size: usize = shape.iter().product();
        if off < 0 || off as usize >= size {
            return Err(bad(format!("%{buf}[{off}] is out of bounds (size {size})")));
        }
        Ok(off as usize)
    }

    fn val(&mut self, v: &Val, mem: &[&mut Vec<f32>]) -> Result<f32, NpuError> {
        Ok(match v {
            Val::Const(c) => *c as f32,
            Val::Load { buf, index } => mem[*buf][self.offset(*buf, index)?],
            Val::Un(op, x) => unop(*op, self.val(x, mem)?),
            Val::Bin(op, a, b) => binop(*op, self.val(a, mem)?, self.val(b, mem)?),
            Val::Scalar(s) => {
                *self.slots.get(*s).ok_or_else(|| bad(format!("scalar %s{s} read before it is bound")))?
            }
            Val::FromIdx(i) => self.idx(i)? as f32,
            Val::Reduce { op, var, extent, body } => {
                let n = self.idx(extent)?;
                let mut acc = red_init(*op);
                for i in 0..n {
                    self.set(*var, i)?;
                    acc = red(*op, acc, self.val(body, mem)?);
                }
                acc
            }
            Val::IfLess { lhs, rhs, then, other } | Val::Select { lhs, rhs, then, other } => {
                if self.idx(lhs)? < self.idx(rhs)? {
                    self.val(then, mem)?
                } else {
                    self.val(other, mem)?
                }
            }
            Val::Where { cond, then, other } => {
                if self.val(cond, mem)? != 0.0 {
                    self.val(then, mem)?
                } else {
                    self.val(other, mem)?
                }
            }
        })
    }

    fn stmts(&mut self, body: &[Stmt], mem: &mut [&mut Vec<f32>]) -> Result<(), NpuError> {
        for s in body {
            match s {
                Stmt::For { var, extent, body, .. } => {
                    let n = self.idx(extent)?;
                    for i in 0..n {
                        self.set(*var, i)?;
                        self.stmts(body, mem)?;
                    }
                }
                Stmt::Store { buf, index, value } => {
                    let x = self.val(value, mem)?;
                    let off = self.offset(*buf, index)?;
                    mem[*buf][off] = x;
                }
                Stmt::Let { slot, value } => {
                    let x = self.val(value, mem)?;
                    if *slot >= self.slots.len() {
                        self.slots.resize(slot + 1, 0.0);
                    }
                    self.slots[*slot] = x;
                }
                Stmt::Mma(m) => self.mma(m, mem)?,
            }
        }
        Ok(())
    }

    fn mma(&mut self, m: &Mma, mem: &mut [&mut Vec<f32>]) -> Result<(), NpuError> {
        let valid = self.idx(&m.valid)?.clamp(0, m.cols as i64) as usize;
        let mut acc = vec![0f32; m.rows * m.cols];
        self.mma_points(m, 0, valid, &mut acc, mem)?;
        let step = self.idx(&m.c_col)?;
        for r in 0..m.rows {
            self.set(m.row, r as i64)?;
            let coff = self.flat(m.c.0, &m.c.1)?;
            for j in 0..valid {
                let at = coff + j as i64 * step;
                let old = self.at(mem, m.c.0, at)?;
                mem[m.c.0][at as usize] = old + acc[r * m.cols + j];
            }
        }
        Ok(())
    }

    /// Accumulates the products of the reduction loops from `level` inward.
    fn mma_points(
        &mut self,
        m: &Mma,
        level: usize,
        valid: usize,
        acc: &mut [f32],
        mem: &[&mut Vec<f32>],
    ) -> Result<(), NpuError> {
        if let Some((v, e)) = m.red.get(level) {
            let n = self.idx(e)?;
            for i in 0..n {
                self.set(*v, i)?;
                self.mma_points(m, level + 1, valid, acc, mem)?;
            }
            return Ok(());
        }
        let boff = self.flat(m.b.0, &m.b.1)?;
        for r in 0..m.rows {
            self.set(m.row, r as i64)?;
            let a = self.val(&m.a, mem)?;
            for j in 0..valid {
                let b = self.at(mem, m.b.0, boff + j as i64)?;
                acc[r * m.cols + j] += a * b;
            }
        }
        Ok(())
    }

    /// The flat offset of `index` without a bounds check (an Mma tile's first element).
    fn flat(&self, buf: usize, index: &[Idx]) -> Result<i64, NpuError> {
        let shape = self.shapes.get(buf).ok_or_else(|| bad(format!("buffer %{buf} does not exist")))?;
        let mut off = 0i64;
        for (i, d) in index.iter().zip(shape) {
            off = off * *d as i64 + self.idx(i)?;
        }
        Ok(off)
    }

    fn at(&self, mem: &[&mut Vec<f32>], buf: usize, off: i64) -> Result<f32, NpuError> {
        if off < 0 || off as usize >= mem[buf].len() {
            return Err(bad(format!("%{buf}[{off}] is out of bounds (size {})", mem[buf].len())));
        }
        Ok(mem[buf][off as usize])
    }
}

/// The vector unit's op for a kernel-dialect unary op.
pub fn vunop(op: UnOp) -> VUnOp {
    match op {
        UnOp::Neg => VUnOp::Neg,
        UnOp::Abs => VUnOp::Abs,
        UnOp::Exp => VUnOp::Exp,
        UnOp::Log => VUnOp::Log,
        UnOp::Sqrt => VUnOp::Sqrt,
        UnOp::Tanh => VUnOp::Tanh,
        UnOp::Erf => VUnOp::Erf,
        UnOp::Floor => VUnOp::Floor,
        UnOp::Ceil => VUnOp::Ceil,
        UnOp::Recip => VUnOp::Recip,
        UnOp::Relu => VUnOp::Relu,
        UnOp::Sigmoid => VUnOp::Sigmoid,
    }
}

/// The vector unit's op for a kernel-dialect binary op.
pub fn vbinop(op: BinOp) -> VBinOp {
    match op {
        BinOp::Add => VBinOp::Add,
        BinOp::Sub => VBinOp::Sub,
        BinOp::Mul => VBinOp::Mul,
        BinOp::Div => VBinOp::Div,
        BinOp::Max => VBinOp::Max,
        BinOp::Min => VBinOp::Min,
        BinOp::Pow => VBinOp::Pow,
    }
}

fn unop(op: UnOp, x: f32) -> f32 {
    math::unop(vunop(op), x)
}

fn binop(op: BinOp, a: f32, b: f32) -> f32 {
    math::binop(vbinop(op), a, b, 0.0)
}

/// A reduction's identity.
pub fn red_init(op: RedOp) -> f32 {
    match op {
        RedOp::Sum => 0.0,
        RedOp::Max => f32::NEG_INFINITY,
        RedOp::Min => f32::INFINITY,
    }
}

fn red(op: RedOp, acc: f32, x: f32) -> f32 {
    match op {
        RedOp::Sum => acc + x,
        RedOp::Max => math::fmax(acc, x),
        RedOp::Min => math::fmin(acc, x),
    }
}
