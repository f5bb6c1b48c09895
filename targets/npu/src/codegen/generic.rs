//! The generic form: any statement, one element at a time.
//!
//! Scalar loops run on the scalar unit; every value is a one-element cell in UB computed by a
//! vector op of length one; a load or store of global memory is a one-element DMA fenced by
//! barriers on both sides (so no flag is needed: every pipe has drained around it). Slow
//! (each access pays the DMA latency) but exact, and it covers every kernel the dialect can
//! express whose locals fit UB. An [`Mma`] tile keeps its accumulators in UB and loads each
//! `B` run with one DMA.

use super::{affine, Gen, Op, R};
use crate::eval::{vbinop, vunop};
use crate::isa::{AluOp, Cond, Instr, VBinOp, VUnOp};
use kiln_ir::kernel::{Idx, Mma, RedOp, Stmt, Val};

impl Gen<'_> {
    /// One statement in the generic form.
    pub fn generic_stmt(&mut self, s: &Stmt) -> R<()> {
        let (m, ub) = (self.mark(), self.ub.top);
        match s {
            Stmt::For { var, extent, body, .. } => {
                self.scalar_loop(*var, extent, |g| {
                    for b in body {
                        g.generic_stmt(b)?;
                    }
                    Ok(())
                })?;
            }
            Stmt::Store { buf, index, value } => {
                let cell = self.gval(value)?;
                self.gstore(*buf, index, cell)?;
            }
            Stmt::Let { slot, value } => {
                let cell = self.gval(value)?;
                let at = self.slots.get(slot).copied().unwrap_or(0);
                self.vun(VUnOp::Mov, Op::K(at as i64), cell, Op::K(1), false)?;
            }
            Stmt::Mma(mma) => self.generic_mma(mma)?,
        }
        self.reset(m);
        self.ub.top = ub;
        Ok(())
    }

    /// A one-element cell in UB.
    fn cell(&mut self) -> R<Op> {
        Ok(Op::K(self.ub_alloc(1)? as i64))
    }

    /// The global-memory address (or UB address for a local) of `buf[index]`.
    pub fn elem_addr(&mut self, buf: usize, index: &[Idx]) -> R<Op> {
        let base = if buf < self.nparams() { self.gm[buf] } else { self.locals[buf - self.nparams()] };
        let off = affine::flat_idx(index, &self.shapes[buf]);
        let o = self.sidx(&off)?;
        self.alu_ops(AluOp::Add, o, Op::K(base as i64))
    }

    /// A DMA of `n` elements between global memory and UB, fenced by barriers.
    pub fn fenced_copy(&mut self, to_ub: bool, gm: Op, ub: Op, n: Op, gm_stride: Op) -> R<()> {
        let (gm, ub, n, one, gs) =
            (self.in_reg(gm)?, self.in_reg(ub)?, self.in_reg(n)?, self.konst(1)?, self.in_reg(gm_stride)?);
        self.emit(Instr::Barrier);
        let (dl, sl) = if to_ub { (self.vl, 0) } else { (0, self.vl) };
        let (dst, src, ds, ss) = if to_ub { (ub, gm, one, gs) } else { (gm, ub, gs, one) };
        self.emit(Instr::Copy { dst_level: dl, src_level: sl, dst, src, n, len: one, dst_stride: ds, src_stride: ss });
        self.emit(Instr::Barrier);
        Ok(())
    }

    fn gstore(&mut self, buf: usize, index: &[Idx], cell: Op) -> R<()> {
        let addr = self.elem_addr(buf, index)?;
        if buf < self.nparams() {
            self.fenced_copy(false, addr, cell, Op::K(1), Op::K(1))
        } else {
            self.vun(VUnOp::Mov, addr, cell, Op::K(1), false)
        }
    }

    pub fn vun(&mut self, op: VUnOp, d: Op, a: Op, n: Op, a_scalar: bool) -> R<()> {
        let (d, a, n) = (self.in_reg(d)?, self.in_reg(a)?, self.in_reg(n)?);
        self.emit(Instr::VUn { op, d, a, n, a_scalar });
        Ok(())
    }

    pub fn vbin(&mut self, op: VBinOp, d: Op, a: Op, b: Op, n: Op, a_scalar: bool, b_scalar: bool) -> R<()> {
        let (d, a, b, n) = (self.in_reg(d)?, self.in_reg(a)?, self.in_reg(b)?, self.in_reg(n)?);
        self.emit(Instr::VBin { op, d, a, b, n, a_scalar, b_scalar });
        Ok(())
    }

    /// The cell holding `v`.
    fn gval(&mut self, v: &Val) -> R<Op> {
        Ok(match v {
            Val::Where { .. } => return Err(crate::NpuError::Unsupported("a value-conditional select (Where)".into())),
            Val::Const(c) => Op::K(self.const_cell(*c)? as i64),
            Val::Scalar(s) => Op::K(self.slots.get(s).copied().unwrap_or(0) as i64),
            Val::Load { buf, index } => {
                let m = self.mark();
                let addr = self.elem_addr(*buf, index)?;
                if *buf < self.nparams() {
                    let c = self.cell()?;
                    self.fenced_copy(true, addr, c, Op::K(1), Op::K(1))?;
                    self.reset(m);
                    c
                } else {
                    addr
                }
            }
            Val::Un(op, x) => {
                let a = self.gval(x)?;
                let d = self.cell()?;
                self.vun(vunop(*op), d, a, Op::K(1), false)?;
                d
            }
            Val::Bin(op, x, y) => {
                let a = self.gval(x)?;
                let b = self.gval(y)?;
                let d = self.cell()?;
                self.vbin(vbinop(*op), d, a, b, Op::K(1), false, false)?;
                d
            }
            Val::FromIdx(i) => {
                let s = self.sidx_reg(i)?;
                let d = self.cell()?;
                let (dr, one) = (self.in_reg(d)?, self.konst(1)?);
                self.emit(Instr::VDupR { d: dr, s, n: one });
                d
            }
            Val::Reduce { op, var, extent, body } => {
                let acc = self.cell()?;
                let (ar, one) = (self.in_reg(acc)?, self.konst(1)?);
                self.emit(Instr::VDup { d: ar, n: one, value: crate::eval::red_init(*op) });
                let op = red_op(*op);
                self.scalar_loop(*var, extent, |g| {
                    let (m, ub) = (g.mark(), g.ub.top);
                    let x = g.gval(body)?;
                    g.vbin(op, acc, acc, x, Op::K(1), false, false)?;
                    g.reset(m);
                    g.ub.top = ub;
                    Ok(())
                })?;
                acc
            }
            Val::IfLess { lhs, rhs, then, other } | Val::Select { lhs, rhs, then, other } => {
                let d = self.cell()?;
                let l = self.sidx(lhs)?;
                let r = self.sidx(rhs)?;
                let (lr, rr) = (self.in_reg(l)?, self.in_reg(r)?);
                let (otherwise, end) = (self.label(), self.label());
                self.branch(Instr::Branch { cond: Cond::Ge, ra: lr, rb: rr, target: 0 }, otherwise);
                let m = self.mark();
                let t = self.gval(then)?;
                self.vun(VUnOp::Mov, d, t, Op::K(1), false)?;
                self.reset(m);
                self.branch(Instr::Jmp { target: 0 }, end);
                self.bind(otherwise);
                let o = self.gval(other)?;
                self.vun(VUnOp::Mov, d, o, Op::K(1), false)?;
                self.reset(m);
                self.bind(end);
                d
            }
        })
    }

    /// An [`Mma`] tile with its accumulators in UB: per reduction point, one DMA of the `B`
    /// run and a multiply-accumulate per row; then `C` += the accumulators, row by row.
    pub fn generic_mma(&mut self, mma: &Mma) -> R<()> {
        let (rows, cols) = (mma.rows as u64, mma.cols as u64);
        let acc = self.ub_alloc(rows * cols)?;
        let btile = self.ub_alloc(cols)?;
        let ctile = self.ub_alloc(cols)?;
        let n = self.konst((rows * cols) as i64)?;
        let d = self.konst(acc as i64)?;
        self.emit(Instr::VDup { d, n, value: 0.0 });
        let valid = self.sidx(&mma.valid)?;
        let valid = self.alu_ops(AluOp::Max, valid, Op::K(0))?;
        let valid = self.alu_ops(AluOp::Min, valid, Op::K(cols as i64))?;
        let valid = match valid {
            Op::T(r) => Op::R(r),
            v => v,
        };
        self.mma_points(mma, 0, acc, btile, valid)?;
        // C += the accumulators.
        for r in 0..rows {
            let m = self.mark();
            let index: Vec<Idx> = mma.c.1.iter().map(|i| i.subst(mma.row, &Idx::Const(r as i64)).simplify()).collect();
            let addr = self.elem_addr(mma.c.0, &index)?;
            let row = Op::K((acc + r * cols) as i64);
            let step = self.sidx(&mma.c_col)?;
            if mma.c.0 < self.nparams() {
                let c = Op::K(ctile as i64);
                self.fenced_copy(true, addr, c, valid, step)?;
                self.vbin(VBinOp::Add, c, c, row, valid, false, false)?;
                self.fenced_copy(false, addr, c, valid, step)?;
            } else if step == Op::K(1) {
                self.vbin(VBinOp::Add, addr, addr, row, valid, false, false)?;
            } else {
                // Strided columns of a local: one element at a time.
                let j = usize::MAX - 1;
                let a0 = self.own(addr)?;
                let step = match step {
                    Op::T(s) => Op::R(s),
                    s => s,
                };
                self.scalar_loop(j, &Idx::Const(cols as i64), |g| {
                    let jr = *g.vars.get(&j).unwrap_or(&a0);
                    let vr = g.in_reg(valid)?;
                    let skip = g.label();
                    g.branch(Instr::Branch { cond: Cond::Ge, ra: jr, rb: vr, target: 0 }, skip);
                    let off = g.alu_ops(AluOp::Mul, Op::R(jr), step)?;
                    let at = g.alu_ops(AluOp::Add, off, Op::R(a0))?;
                    let src = g.alu_ops(AluOp::Add, Op::R(jr), row)?;
                    g.vbin(VBinOp::Add, at, at, src, Op::K(1), false, false)?;
                    g.bind(skip);
                    Ok(())
                })?;
            }
            self.reset(m);
        }
        Ok(())
    }

    fn mma_points(&mut self, mma: &Mma, level: usize, acc: u64, btile: u64, valid: Op) -> R<()> {
        if let Some((var, extent)) = mma.red.get(level) {
            return self.scalar_loop(*var, extent, |g| g.mma_points(mma, level + 1, acc, btile, valid));
        }
        let m = self.mark();
        let b = self.elem_addr(mma.b.0, &mma.b.1)?;
        let b = if mma.b.0 < self.nparams() {
            let t = Op::K(btile as i64);
            self.fenced_copy(true, b, t, valid, Op::K(1))?;
            t
        } else {
            b
        };
        let b = match b {
            Op::T(r) => Op::R(r),
            b => b,
        };
        for r in 0..mma.rows as u64 {
            let m2 = self.mark();
            let ub = self.ub.top;
            let a = self.gval(&mma.a.subst(mma.row, &Idx::Const(r as i64)))?;
            let row = Op::K((acc + r * mma.cols as u64) as i64);
            self.vbin(VBinOp::Mla, row, a, b, valid, true, false)?;
            self.reset(m2);
            self.ub.top = ub;
        }
        self.reset(m);
        Ok(())
    }
}

/// The vector op that combines a reduction's elements.
pub fn red_op(op: RedOp) -> VBinOp {
    match op {
        RedOp::Sum => VBinOp::Add,
        RedOp::Max => VBinOp::Max,
        RedOp::Min => VBinOp::Min,
    }
}
