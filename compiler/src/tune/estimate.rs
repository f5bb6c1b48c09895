//! A static cost estimate of a kernel-dialect kernel for a register-tile code generator (the
//! `cpu` target): vector instructions by class, counted over the loop nest at concrete shapes,
//! without compiling or running anything.
//!
//! - A loop of `n` iterations costs `n − 1` times its body at the first iteration plus once at
//!   the last (so a clamped last tile counts as what it is), loop overhead per iteration.
//! - An innermost loop whose stores are contiguous in its variable is vectorized: its body
//!   counts once per `lanes` iterations.
//! - A register tile ([`Mma`]) of `rows × cols` costs per reduction step `rows` broadcasts of
//!   `a`, `cols / lanes` loads of `B` and `rows · cols / lanes` FMAs, and a load and a store of
//!   each accumulator vector; accumulators beyond the vector registers spill (a load and a
//!   store each per step).
//!
//! The weights are throughputs of a modern x86-64 core (two loads, two FMAs, one store per
//! cycle); the tuner's learned model corrects them from measurements.

use kiln_ir::kernel::{BinOp, Idx, Kernel, Mma, Stmt, UnOp, Val};

/// Counts by instruction class, and their weighted total ([`KernelCost::cycles`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelCost {
    pub cycles: f64,
    /// Vector arithmetic (FMAs included).
    pub flops: f64,
    /// Exponentials, logarithms, tanh, erf, sigmoid, divisions and square roots.
    pub heavy: f64,
    pub loads: f64,
    pub stores: f64,
    /// Loads and stores of accumulators that do not fit the vector registers.
    pub spills: f64,
    /// Loop iterations (after vectorization).
    pub iterations: f64,
}

impl KernelCost {
    /// The counts as a vector: `cycles` first.
    pub fn to_vec(&self) -> Vec<f64> {
        vec![self.cycles, self.flops, self.heavy, self.loads, self.stores, self.spills, self.iterations]
    }
}

/// Stops a walk that would take too long (a huge unrolled nest).
const MAX_VISITS: u64 = 2_000_000;

struct Walk<'a> {
    shapes: &'a [Vec<usize>],
    vars: Vec<i64>,
    lanes: f64,
    registers: usize,
    c: KernelCost,
    visits: u64,
}

/// The estimate of `k` at `shapes` (its buffers' shapes, inputs then outputs) for vectors of
/// `lanes` f32 lanes and `registers` vector registers.
pub fn kernel_cost(k: &Kernel, shapes: &[Vec<usize>], lanes: usize, registers: usize) -> Result<KernelCost, String> {
    if shapes.len() != k.buffers.len() {
        return Err(format!("kernel {}: {} shapes for {} buffers", k.name, shapes.len(), k.buffers.len()));
    }
    let mut all = shapes.to_vec();
    for l in &k.locals {
        let mut w = Walk::new(&all, lanes, registers);
        let size = l.size.iter().map(|i| w.idx(i).map(|v| v.max(0) as usize)).collect::<Result<Vec<_>, _>>()?;
        all.push(size);
    }
    let mut w = Walk::new(&all, lanes, registers);
    w.stmts(&k.body, 1.0)?;
    let c = &mut w.c;
    c.cycles = 0.5 * c.flops + 4.0 * c.heavy + 0.5 * c.loads + c.stores + c.spills + 0.5 * c.iterations;
    Ok(w.c)
}

fn has_loop(body: &[Stmt]) -> bool {
    body.iter().any(|s| matches!(s, Stmt::For { .. } | Stmt::Mma(_)))
}

impl Walk<'_> {
    fn new(shapes: &[Vec<usize>], lanes: usize, registers: usize) -> Walk<'_> {
        Walk { shapes, vars: vec![0; 64], lanes: lanes.max(1) as f64, registers, c: KernelCost::default(), visits: 0 }
    }

    fn var(&mut self, v: usize) -> &mut i64 {
        if v >= self.vars.len() {
            self.vars.resize(v + 1, 0);
        }
        &mut self.vars[v]
    }

    fn idx(&mut self, i: &Idx) -> Result<i64, String> {
        Ok(match i {
            Idx::Var(v) => *self.var(*v),
            Idx::Const(c) => *c,
            Idx::Dim { buf, axis } => *self
                .shapes
                .get(*buf)
                .and_then(|s| s.get(*axis))
                .ok_or_else(|| format!("dim({buf}, {axis}) of no buffer"))?
                as i64,
            Idx::Add(a, b) => self.idx(a)?.wrapping_add(self.idx(b)?),
            Idx::Sub(a, b) => self.idx(a)?.wrapping_sub(self.idx(b)?),
            Idx::Mul(a, b) => self.idx(a)?.wrapping_mul(self.idx(b)?),
            Idx::Div(a, b) => {
                let d = self.idx(b)?;
                if d == 0 {
                    0
                } else {
                    self.idx(a)?.div_euclid(d)
                }
            }
            Idx::Rem(a, b) => {
                let d = self.idx(b)?;
                if d == 0 {
                    0
                } else {
                    self.idx(a)?.rem_euclid(d)
                }
            }
            Idx::Min(a, b) => self.idx(a)?.min(self.idx(b)?),
            Idx::Max(a, b) => self.idx(a)?.max(self.idx(b)?),
            Idx::ZeroIfOne(a, b) => {
                if self.idx(a)? == 1 {
                    0
                } else {
                    self.idx(b)?
                }
            }
        })
    }

    fn visit(&mut self) -> Result<(), String> {
        self.visits += 1;
        if self.visits > MAX_VISITS {
            return Err(format!("the estimate gave up after {MAX_VISITS} steps"));
        }
        Ok(())
    }

    /// Counts `body`, run `weight` times.
    fn stmts(&mut self, body: &[Stmt], weight: f64) -> Result<(), String> {
        for s in body {
            self.visit()?;
            match s {
                Stmt::For { var, extent, body, .. } => {
                    let n = self.idx(extent)?;
                    if n <= 0 {
                        continue;
                    }
                    let contiguous = !has_loop(body)
                        && body.iter().all(|s| match s {
                            Stmt::Store { index, .. } => index.last().is_some_and(|i| i.offset_of(*var).is_some()),
                            _ => true,
                        });
                    let per = if contiguous { weight / self.lanes } else { weight };
                    self.c.iterations += per * n as f64;
                    *self.var(*var) = 0;
                    self.stmts(body, per * (n - 1) as f64)?;
                    *self.var(*var) = n - 1;
                    self.stmts(body, per)?;
                }
                Stmt::Store { value, .. } => {
                    self.c.stores += weight;
                    self.val(value, weight)?;
                }
                Stmt::Let { value, .. } => self.val(value, weight)?,
                Stmt::Mma(m) => self.mma(m, weight)?,
            }
        }
        Ok(())
    }

    fn val(&mut self, v: &Val, weight: f64) -> Result<(), String> {
        self.visit()?;
        match v {
            Val::Const(_) | Val::Scalar(_) | Val::FromIdx(_) => {}
            Val::Load { .. } => self.c.loads += weight,
            Val::Un(op, x) => {
                match op {
                    UnOp::Exp | UnOp::Log | UnOp::Tanh | UnOp::Erf | UnOp::Sigmoid | UnOp::Sqrt | UnOp::Recip => {
                        self.c.heavy += weight
                    }
                    _ => self.c.flops += weight,
                }
                self.val(x, weight)?;
            }
            Val::Bin(op, a, b) => {
                match op {
                    BinOp::Div | BinOp::Pow => self.c.heavy += weight,
                    _ => self.c.flops += weight,
                }
                self.val(a, weight)?;
                self.val(b, weight)?;
            }
            Val::Reduce { var, extent, body, .. } => {
                let n = self.idx(extent)?;
                if n > 0 {
                    self.c.iterations += weight * n as f64;
                    self.c.flops += weight * n as f64;
                    *self.var(*var) = 0;
                    self.val(body, weight * (n - 1) as f64)?;
                    *self.var(*var) = n - 1;
                    self.val(body, weight)?;
                }
            }
            Val::IfLess { lhs, rhs, then, other } => {
                let taken = if self.idx(lhs)? < self.idx(rhs)? { then } else { other };
                self.c.flops += weight;
                self.val(taken, weight)?;
            }
            Val::Select { then, other, .. } => {
                self.c.flops += weight;
                self.val(then, weight)?;
                self.val(other, weight)?;
            }
            Val::Where { cond, then, other } => {
                self.c.flops += weight;
                self.val(cond, weight)?;
                self.val(then, weight)?;
                self.val(other, weight)?;
            }
        }
        Ok(())
    }

    fn mma(&mut self, m: &Mma, weight: f64) -> Result<(), String> {
        let vecs = m.cols.div_ceil(m.lanes.max(1)) as f64;
        let rows = m.rows as f64;
        let mut steps = 1.0;
        for (v, e) in &m.red {
            let n = self.idx(e)?.max(0);
            steps *= n as f64;
            *self.var(*v) = 0;
        }
        let w = weight * steps;
        self.c.iterations += w;
        self.c.loads += w * vecs + weight * rows * vecs;
        self.c.flops += w * rows * vecs;
        self.c.stores += weight * rows * vecs;
        // `a`, broadcast per row and step.
        *self.var(m.row) = 0;
        let before = self.c.clone();
        self.val(&m.a, 1.0)?;
        let per_a = (self.c.loads - before.loads) + (self.c.flops - before.flops);
        self.c = before;
        self.c.loads += w * rows * per_a.max(1.0);
        let live = m.rows * m.cols.div_ceil(m.lanes.max(1)) + m.cols.div_ceil(m.lanes.max(1)) + 1;
        if live > self.registers {
            self.c.spills += 2.0 * w * (live - self.registers) as f64;
        }
        Ok(())
    }
}
