//! Index expressions on the scalar unit.

use super::{unsupported, Gen, Op, R};
use crate::isa::{AluOp, Cond, Instr};
use kiln_ir::kernel::Idx;

impl Gen<'_> {
    /// Emits `e`; the result is a constant, a loop variable's register or a temporary.
    pub fn sidx(&mut self, e: &Idx) -> R<Op> {
        Ok(match e {
            Idx::Const(c) => Op::K(*c),
            Idx::Var(v) => match self.vars.get(v) {
                Some(&r) => Op::R(r),
                None => {
                    return Err(unsupported(format!("kernel {}: loop variable i{v} is not bound here", self.k.name)))
                }
            },
            Idx::Dim { buf, axis } => {
                return Err(unsupported(format!("kernel {}: dim(%{buf}, {axis}) of no buffer", self.k.name)))
            }
            Idx::Add(a, b) => self.alu(AluOp::Add, a, b)?,
            Idx::Sub(a, b) => self.alu(AluOp::Sub, a, b)?,
            Idx::Mul(a, b) => self.alu(AluOp::Mul, a, b)?,
            Idx::Div(a, b) => self.alu(AluOp::Div, a, b)?,
            Idx::Rem(a, b) => self.alu(AluOp::Rem, a, b)?,
            Idx::Min(a, b) => self.alu(AluOp::Min, a, b)?,
            Idx::Max(a, b) => self.alu(AluOp::Max, a, b)?,
            Idx::ZeroIfOne(a, b) => {
                let (x, y) = (self.sidx(a)?, self.sidx(b)?);
                match x {
                    Op::K(1) => Op::K(0),
                    Op::K(_) => y,
                    _ => {
                        // t = b; if a == 1 { t = 0 }
                        let t = self.reg()?;
                        let yr = self.in_reg(y)?;
                        self.emit(Instr::AluI { op: AluOp::Add, rd: t, ra: yr, imm: 0 });
                        let xr = self.in_reg(x)?;
                        let one = self.konst(1)?;
                        let skip = self.label();
                        self.branch(Instr::Branch { cond: Cond::Ne, ra: xr, rb: one, target: 0 }, skip);
                        self.li(t, 0)?;
                        self.bind(skip);
                        Op::T(t)
                    }
                }
            }
        })
    }

    /// `a op b`, folding constants and using immediates where they fit.
    fn alu(&mut self, op: AluOp, a: &Idx, b: &Idx) -> R<Op> {
        let x = self.sidx(a)?;
        let y = self.sidx(b)?;
        self.alu_ops(op, x, y)
    }

    /// `x op y` on operands.
    pub fn alu_ops(&mut self, op: AluOp, x: Op, y: Op) -> R<Op> {
        if let (Op::K(p), Op::K(q)) = (x, y) {
            if let Some(v) = op.apply(p, q) {
                return Ok(Op::K(v));
            }
        }
        // Identities.
        match (op, x, y) {
            (AluOp::Add | AluOp::Sub, _, Op::K(0)) | (AluOp::Mul | AluOp::Div, _, Op::K(1)) => return Ok(x),
            (AluOp::Add, Op::K(0), _) | (AluOp::Mul, Op::K(1), _) => return Ok(y),
            (AluOp::Mul, _, Op::K(0)) | (AluOp::Mul, Op::K(0), _) | (AluOp::Rem, _, Op::K(1)) => return Ok(Op::K(0)),
            _ => {}
        }
        let commutes = matches!(op, AluOp::Add | AluOp::Mul | AluOp::Min | AluOp::Max);
        let (x, y) = if commutes && matches!(x, Op::K(_)) { (y, x) } else { (x, y) };
        let dst = match (x, y) {
            (Op::T(r), _) => r,
            (_, Op::T(r)) if commutes => r,
            _ => self.reg()?,
        };
        let xr = self.in_reg(x)?;
        match y {
            Op::K(k) if i32::try_from(k).is_ok() && !(op == AluOp::Sub && k == i32::MIN as i64) => {
                let (op, k) = if op == AluOp::Sub { (AluOp::Add, -k) } else { (op, k) };
                self.emit(Instr::AluI { op, rd: dst, ra: xr, imm: k as i32 });
            }
            _ => {
                let yr = self.in_reg(y)?;
                self.emit(Instr::Alu { op, rd: dst, ra: xr, rb: yr });
            }
        }
        // A temporary operand on top of the register stack is free again.
        if let Op::T(r) = y {
            if r != dst && r.0 + 1 == self.mark() {
                self.reset(r.0);
            }
        }
        Ok(Op::T(dst))
    }

    /// A register holding `e` (a temporary or a variable's register: read only).
    pub fn sidx_reg(&mut self, e: &Idx) -> R<crate::isa::Reg> {
        let o = self.sidx(e)?;
        self.in_reg(o)
    }

    /// A fresh temporary holding `o` (a copy the caller may overwrite).
    pub fn own(&mut self, o: Op) -> R<crate::isa::Reg> {
        match o {
            Op::T(r) => Ok(r),
            Op::K(v) => {
                let r = self.reg()?;
                self.li(r, v)?;
                Ok(r)
            }
            Op::R(s) => {
                let r = self.reg()?;
                self.emit(Instr::AluI { op: AluOp::Add, rd: r, ra: s, imm: 0 });
                Ok(r)
            }
        }
    }
}
