//! A stream's vector part: the rows of a tile as vector ops in UB.
//!
//! Values live at the address of the tile's first lane (regions, temporaries, a store's
//! destination) or in one-element cells (scalars: broadcast operands). An evaluation covers
//! [`Lanes`]: a condition splits them, each branch running on its own.

use super::super::{affine, restore, unsupported, Gen, Op, R};
use super::pipeline::pin;
use super::{reads, Ctx, Emit, Guard, Lanes, Loc, Mode, Region};
use crate::eval::{vbinop, vunop};
use crate::isa::{AluOp, Instr, Pipe, VRedOp, VUnOp};
use kiln_ir::kernel::{Idx, RedOp, Stmt, Val};

/// The lanes of a scalar.
const ONE: Lanes = Lanes { off: Op::K(0), n: Op::K(1), lo: Op::K(0) };

impl Gen<'_> {
    /// V's part of tile `u`: every row of it.
    pub(super) fn tile_compute(&mut self, e: &mut Emit, u: Op, body: &[Stmt]) -> R<()> {
        let [full_in, empty_in, full_out, empty_out] = e.flags;
        let (ring_in, ring_out) = (e.in_size > 0, e.out_size > 0);
        if ring_in {
            self.emit(Instr::WaitFlag { src: Pipe::Mte2, dst: Pipe::V, id: full_in });
        }
        if ring_out {
            self.emit(Instr::WaitFlag { src: Pipe::Mte3, dst: Pipe::V, id: empty_out });
        }
        let m = self.mark();
        let (row0, nr) = self.tile_geometry(e, u)?;
        let in_off = self.slot_off(e, u, e.in_size)?;
        let out_off = self.slot_off(e, u, e.out_size)?;
        e.in_off = Some(self.own(in_off)?);
        e.out_off = Some(self.own(out_off)?);
        let row_var = e.plan.row.0;
        let i = usize::MAX - 3;
        let (strip, rows) = match e.mode {
            Mode::Rows { r } => (false, r),
            Mode::Strip { .. } => (true, 1),
        };
        self.loop_op(i, nr, rows, |g| {
            let ir = g.vars[&i];
            let row = if strip { row0 } else { g.alu_ops(AluOp::Add, row0, Op::R(ir))? };
            let row = pin(row);
            let old = g.vars.get(&row_var).copied();
            let rr = g.in_reg(row)?;
            g.vars.insert(row_var, rr);
            e.row_in_tile = Op::R(ir);
            e.row_cache.clear();
            for s in body {
                let (m, ub) = (g.mark(), g.ub.top);
                g.row_stmt(e, s)?;
                g.reset(m);
                g.ub.top = ub;
            }
            restore(&mut g.vars, row_var, old);
            Ok(())
        })?;
        if ring_in {
            self.emit(Instr::SetFlag { src: Pipe::V, dst: Pipe::Mte2, id: empty_in });
        }
        if ring_out {
            self.emit(Instr::SetFlag { src: Pipe::V, dst: Pipe::Mte3, id: full_out });
        }
        self.reset(m);
        Ok(())
    }

    /// The address of a region's current row.
    fn region_row(&mut self, e: &Emit, r: &Region, store: bool) -> R<Op> {
        if r.resident {
            return Ok(Op::K(r.addr as i64));
        }
        let off = if store { e.out_off } else { e.in_off };
        let off = off.map_or(Op::K(0), Op::R);
        let a = self.alu_ops(AluOp::Add, off, Op::K(r.addr as i64))?;
        let t = self.alu_ops(AluOp::Mul, e.row_in_tile, Op::K(r.pitch as i64))?;
        self.alu_ops(AluOp::Add, a, t)
    }

    /// The lanes of a vector context in this tile.
    fn ctx_lanes(&mut self, e: &Emit, ctx: &Ctx) -> R<Lanes> {
        Ok(match e.mode {
            Mode::Strip { .. } => Lanes { off: Op::K(0), n: e.xl, lo: e.x0 },
            Mode::Rows { .. } => {
                let n = pin(self.sidx(&ctx.len())?);
                Lanes { off: Op::K(0), n, lo: Op::K(0) }
            }
        })
    }

    fn row_stmt(&mut self, e: &mut Emit, s: &Stmt) -> R<()> {
        match s {
            Stmt::Let { slot, value } => {
                let at = self.slots.get(slot).copied().ok_or_else(|| unsupported("slot without a cell"))?;
                let v = self.vexpr(e, value, None, ONE, None)?;
                self.put(v, Op::K(at as i64), ONE)?;
                self.release(e, v);
            }
            Stmt::Store { buf, index, value } => {
                let dest = pin(self.dest(e, *buf, index, None)?);
                let v = self.vexpr(e, value, None, ONE, Some(dest))?;
                self.put(v, dest, ONE)?;
                self.release(e, v);
            }
            Stmt::For { .. } => {
                let (ctx, stores) = self.nest_ctx(s).ok_or_else(|| unsupported("not a loop nest"))?;
                let old = self.bind_ctx(&ctx);
                let lanes = self.ctx_lanes(e, &ctx)?;
                for st in stores {
                    let Stmt::Store { buf, index, value } = st else { continue };
                    let m = self.mark();
                    let dest = pin(self.dest(e, *buf, index, Some(&ctx))?);
                    // A value that reads the local it stores to goes through temporaries.
                    let direct = *buf < self.nparams() || !reads(value, *buf);
                    let v = self.vexpr(e, value, Some(&ctx), lanes, direct.then_some(dest))?;
                    self.put(v, dest, lanes)?;
                    self.release(e, v);
                    self.reset(m);
                }
                self.unbind(old);
            }
            Stmt::Mma(_) => return Err(unsupported("Mma in a stream")),
        }
        Ok(())
    }

    /// Where a store writes (its first lane in this tile): its region's row (global memory)
    /// or the local's elements.
    fn dest(&mut self, e: &Emit, buf: usize, index: &[Idx], ctx: Option<&Ctx>) -> R<Op> {
        if buf >= self.nparams() {
            return self.local_first(e, buf, index, ctx).map(|x| x.0);
        }
        let acc = self.classify(buf, index, ctx, &e.plan.row, &[]).ok_or_else(|| unsupported("store access"))?;
        let key = acc.key();
        if let Some(&i) = e.plan.store_keys.get(&key) {
            let r = e.plan.stores[i].clone();
            return self.region_row(e, &r, true);
        }
        // An accumulator: stored where it was loaded.
        match e.plan.load_keys.get(&key) {
            Some(&i) if e.plan.loads[i].accum => Ok(Op::K(e.plan.loads[i].addr as i64)),
            _ => Err(unsupported("a store without its region")),
        }
    }

    /// A local's element at the tile's first lane, and its stride.
    fn local_first(&mut self, e: &Emit, buf: usize, index: &[Idx], ctx: Option<&Ctx>) -> R<(Op, i64)> {
        let (base, stride) = self.local_access(buf, index, ctx).ok_or_else(|| unsupported("local access"))?;
        let b = self.sidx(&base)?;
        let a = self.alu_ops(AluOp::Add, b, Op::K(self.locals[buf - self.nparams()] as i64))?;
        let x0 = self.alu_ops(AluOp::Mul, e.x0, Op::K(stride))?;
        Ok((pin(self.alu_ops(AluOp::Add, a, x0)?), stride))
    }

    /// `a + off` for a vector location, `a` for a broadcast one.
    fn at(&mut self, l: Loc, off: Op) -> R<Op> {
        match l {
            Loc::Vec(a, _) => Ok(pin(self.alu_ops(AluOp::Add, a, off)?)),
            Loc::Scal(a, _) => Ok(a),
        }
    }

    /// Writes `v` to `dest`'s lanes unless it is there already.
    fn put(&mut self, v: Loc, dest: Op, lanes: Lanes) -> R<()> {
        let d = pin(self.alu_ops(AluOp::Add, dest, lanes.off)?);
        match v {
            Loc::Vec(a, _) if a == dest => Ok(()),
            Loc::Vec(a, _) => {
                let a = self.at(Loc::Vec(a, None), lanes.off)?;
                self.vun(VUnOp::Mov, d, a, lanes.n, false)
            }
            Loc::Scal(a, _) if a == dest && lanes.n == Op::K(1) => Ok(()),
            Loc::Scal(a, _) => self.vun(VUnOp::Mov, d, a, lanes.n, true),
        }
    }

    fn release(&mut self, e: &mut Emit, v: Loc) {
        match v {
            Loc::Vec(_, Some(t)) => e.vtemp_free[t] = true,
            Loc::Scal(_, Some(c)) => e.cell_free[c] = true,
            _ => {}
        }
    }

    fn vtemp(&mut self, e: &mut Emit) -> R<Loc> {
        let i = e.vtemp_free.iter().position(|f| *f).ok_or_else(|| unsupported("out of vector temporaries"))?;
        e.vtemp_free[i] = false;
        Ok(Loc::Vec(Op::K(e.vtemp_addr[i] as i64), Some(i)))
    }

    fn scell(&mut self, e: &mut Emit) -> R<Loc> {
        let i = e.cell_free.iter().position(|f| *f).ok_or_else(|| unsupported("out of scalar cells"))?;
        e.cell_free[i] = false;
        Ok(Loc::Scal(Op::K(e.cell_addr[i] as i64), Some(i)))
    }

    /// A result location: `dest` if given, else a temporary of an operand, else a new one.
    fn result(&mut self, e: &mut Emit, vector: bool, dest: Option<Op>, operands: &[Loc]) -> R<Loc> {
        if !vector {
            for o in operands {
                if let Loc::Scal(a, Some(c)) = *o {
                    return Ok(Loc::Scal(a, Some(c)));
                }
            }
            return self.scell(e);
        }
        if let Some(d) = dest {
            return Ok(Loc::Vec(d, None));
        }
        for o in operands {
            if let Loc::Vec(a, Some(t)) = *o {
                return Ok(Loc::Vec(a, Some(t)));
            }
        }
        self.vtemp(e)
    }

    /// The lanes of `lanes` where guard `g`'s branch runs: `base + s·x < 0` holds on a prefix
    /// of the lanes when `s ≥ 0`, on a suffix when `s < 0`.
    pub(super) fn guard_lanes(&mut self, g: &Guard, lanes: Lanes) -> R<Lanes> {
        let base = pin(self.sidx(&g.base)?);
        let lo = lanes.lo;
        let hi = pin(self.alu_ops(AluOp::Add, lo, lanes.n)?);
        let k = if g.s == 0 {
            // All lanes when base < 0, else none.
            let nb = self.alu_ops(AluOp::Sub, Op::K(0), base)?;
            let t = self.alu_ops(AluOp::Max, nb, Op::K(0))?;
            let t = self.alu_ops(AluOp::Min, t, Op::K(1))?;
            let t = self.alu_ops(AluOp::Mul, t, lanes.n)?;
            self.alu_ops(AluOp::Add, t, lo)?
        } else if g.s > 0 {
            // x < k with k = ⌊(−base − 1) / s⌋ + 1.
            let t = self.alu_ops(AluOp::Sub, Op::K(-1), base)?;
            let t = self.alu_ops(AluOp::Div, t, Op::K(g.s))?;
            self.alu_ops(AluOp::Add, t, Op::K(1))?
        } else {
            // x ≥ k with k = ⌊base / −s⌋ + 1.
            let t = self.alu_ops(AluOp::Div, base, Op::K(-g.s))?;
            self.alu_ops(AluOp::Add, t, Op::K(1))?
        };
        let k = self.alu_ops(AluOp::Max, k, lo)?;
        let k = pin(self.alu_ops(AluOp::Min, k, hi)?);
        let prefix = (g.s >= 0) == g.taken;
        let (start, end) = if prefix { (lo, k) } else { (k, hi) };
        let n = pin(self.alu_ops(AluOp::Sub, end, start)?);
        let skip = self.alu_ops(AluOp::Sub, start, lo)?;
        let off = pin(self.alu_ops(AluOp::Add, lanes.off, skip)?);
        Ok(Lanes { off, n, lo: start })
    }

    /// Evaluates `v` on `lanes` of the context `ctx` (a scalar without one), into `dest`
    /// when the root is a vector op.
    fn vexpr(&mut self, e: &mut Emit, v: &Val, ctx: Option<&Ctx>, lanes: Lanes, dest: Option<Op>) -> R<Loc> {
        // A subexpression the row computes more than once: into its region, once per row.
        if let (Some(c), true, Val::Un(..) | Val::Bin(..)) = (ctx, e.guards.is_empty(), v) {
            if let Some(&i) = e.plan.shared.get(&super::shared_key(v, c)) {
                let at = Op::K(e.shared_addr[i] as i64);
                if e.row_cache.insert(i) {
                    let m0 = self.mark();
                    let r = self.vexpr_inner(e, v, ctx, lanes, Some(at))?;
                    self.put(r, at, lanes)?;
                    self.release(e, r);
                    self.reset(m0);
                }
                return Ok(Loc::Vec(at, None));
            }
        }
        // A computed value lives at `dest` (the caller's register) or in a temporary or cell
        // (constant addresses): the registers of its evaluation can go once it is computed.
        let m0 = self.mark();
        let r = self.vexpr_inner(e, v, ctx, lanes, dest)?;
        if !matches!(v, Val::Load { .. }) {
            self.reset(m0);
        }
        Ok(r)
    }

    fn vexpr_inner(&mut self, e: &mut Emit, v: &Val, ctx: Option<&Ctx>, lanes: Lanes, dest: Option<Op>) -> R<Loc> {
        let vn = if ctx.is_some() { lanes.n } else { Op::K(1) };
        Ok(match v {
            Val::Where { .. } => return Err(unsupported("a value-conditional select (Where)")),
            Val::Const(c) => Loc::Scal(Op::K(self.const_cell(*c)? as i64), None),
            Val::Scalar(s) => {
                Loc::Scal(Op::K(self.slots.get(s).copied().ok_or_else(|| unsupported("slot"))? as i64), None)
            }
            Val::Load { buf, index } => {
                if *buf >= self.nparams() {
                    let (a, stride) = self.local_first(e, *buf, index, ctx)?;
                    return Ok(if stride == 0 { Loc::Scal(a, None) } else { Loc::Vec(a, None) });
                }
                // The region was planned under the conditions around this load: find it by
                // its access without them, then with them.
                let acc = self
                    .classify(*buf, index, ctx, &e.plan.row, &e_guards(e))
                    .ok_or_else(|| unsupported("load access"))?;
                let key = acc.key();
                let r = match e.plan.load_keys.get(&key) {
                    Some(&i) => e.plan.loads[i].clone(),
                    None => return Err(unsupported("a load without its region")),
                };
                let a = pin(self.region_row(e, &r, false)?);
                if acc.stride == 0 {
                    Loc::Scal(a, None)
                } else {
                    Loc::Vec(a, None)
                }
            }
            Val::FromIdx(i) => match ctx {
                Some(c) if c.vars.iter().any(|x| i.uses(*x)) => {
                    let l = affine::lin(i, &self.ranges);
                    let step = l.coef(c.vars[0]);
                    let start = self.sidx(&l.to_idx(&c.vars))?;
                    let t = self.alu_ops(AluOp::Mul, lanes.lo, Op::K(step))?;
                    let start = self.alu_ops(AluOp::Add, start, t)?;
                    let d = self.result(e, true, dest, &[])?;
                    let da = self.at(d, lanes.off)?;
                    let (dr, sr, st, n) =
                        (self.in_reg(da)?, self.in_reg(start)?, self.in_reg(Op::K(step))?, self.in_reg(lanes.n)?);
                    self.emit(Instr::VIota { d: dr, start: sr, step: st, n });
                    d
                }
                _ => {
                    let s = self.sidx(i)?;
                    let d = self.scell(e)?;
                    let Loc::Scal(da, _) = d else { unreachable!() };
                    let (dr, sr, one) = (self.in_reg(da)?, self.in_reg(s)?, self.konst(1)?);
                    self.emit(Instr::VDupR { d: dr, s: sr, n: one });
                    d
                }
            },
            Val::Un(op, x) => {
                let a = self.vexpr(e, x, ctx, lanes, None)?;
                let vector = matches!(a, Loc::Vec(..));
                let d = self.result(e, vector, dest, &[a])?;
                let n = if vector { vn } else { Op::K(1) };
                let (da, aa) = (self.at(d, lanes.off)?, self.at(a, lanes.off)?);
                self.vun(vunop(*op), da, aa, n, false)?;
                free_other(e, a, d);
                d
            }
            Val::Bin(op, x, y) => {
                let a = self.vexpr(e, x, ctx, lanes, None)?;
                let b = self.vexpr(e, y, ctx, lanes, None)?;
                let vector = matches!(a, Loc::Vec(..)) || matches!(b, Loc::Vec(..));
                let d = self.result(e, vector, dest, &[a, b])?;
                let n = if vector { vn } else { Op::K(1) };
                let (sa, sb) = (vector && matches!(a, Loc::Scal(..)), vector && matches!(b, Loc::Scal(..)));
                let (da, aa, ba) = (self.at(d, lanes.off)?, self.at(a, lanes.off)?, self.at(b, lanes.off)?);
                self.vbin(vbinop(*op), da, aa, ba, n, sa, sb)?;
                free_other(e, a, d);
                free_other(e, b, d);
                d
            }
            Val::IfLess { lhs, rhs, then, other } | Val::Select { lhs, rhs, then, other } => {
                let (base, s) = self.condition(lhs, rhs, ctx).ok_or_else(|| unsupported("condition"))?;
                let d = match (ctx, dest) {
                    (Some(_), Some(d)) => Loc::Vec(d, None),
                    (Some(_), None) => self.vtemp(e)?,
                    (None, _) => self.scell(e)?,
                };
                let dd = match d {
                    Loc::Vec(a, _) | Loc::Scal(a, _) => a,
                };
                let m = self.mark();
                for (taken, branch) in [(true, then), (false, other)] {
                    self.reset(m);
                    let g = Guard { base: base.clone(), s, taken };
                    let bl = self.guard_lanes(&g, lanes)?;
                    e.guards.push(g);
                    let r = self.vexpr(e, branch, ctx, bl, ctx.map(|_| dd));
                    e.guards.pop();
                    let r = r?;
                    self.put(r, dd, if ctx.is_some() { bl } else { Lanes { off: Op::K(0), ..bl } })?;
                    free_other(e, r, d);
                }
                d
            }
            Val::Reduce { op, .. } => {
                let (rctx, body) = self.reduce_ctx(v).ok_or_else(|| unsupported("reduce"))?;
                let old = self.bind_ctx(&rctx);
                let len = pin(self.sidx(&rctx.len())?);
                // Conditions around the reduction apply to all its lanes.
                let saved = e.guards.clone();
                for g in &mut e.guards {
                    g.s = 0;
                }
                let x = self.vexpr(e, body, Some(&rctx), Lanes { off: Op::K(0), n: len, lo: Op::K(0) }, None);
                e.guards = saved;
                let x = x?;
                self.unbind(old);
                let d = self.scell(e)?;
                let Loc::Scal(da, _) = d else { unreachable!() };
                match x {
                    Loc::Vec(a, _) => {
                        let (dr, ar, n) = (self.in_reg(da)?, self.in_reg(a)?, self.in_reg(len)?);
                        self.emit(Instr::VRed { op: vred(*op), d: dr, a: ar, n });
                    }
                    Loc::Scal(a, _) => {
                        // A body that does not depend on the reduction's variables.
                        let t = self.vtemp(e)?;
                        let Loc::Vec(ta, _) = t else { unreachable!() };
                        self.vun(VUnOp::Mov, ta, a, len, true)?;
                        let (dr, ar, n) = (self.in_reg(da)?, self.in_reg(ta)?, self.in_reg(len)?);
                        self.emit(Instr::VRed { op: vred(*op), d: dr, a: ar, n });
                        self.release(e, t);
                    }
                }
                self.release(e, x);
                d
            }
        })
    }
}

/// The conditions around the value being evaluated.
fn e_guards(e: &Emit) -> Vec<Guard> {
    e.guards.clone()
}

fn vred(op: RedOp) -> VRedOp {
    match op {
        RedOp::Sum => VRedOp::Sum,
        RedOp::Max => VRedOp::Max,
        RedOp::Min => VRedOp::Min,
    }
}

/// Frees `x`'s temporary unless the result `d` reuses it.
fn free_other(e: &mut Emit, x: Loc, d: Loc) {
    match (x, d) {
        (Loc::Vec(_, Some(t)), Loc::Vec(_, Some(u))) if t == u => {}
        (Loc::Scal(_, Some(t)), Loc::Scal(_, Some(u))) if t == u => {}
        (Loc::Vec(_, Some(t)), _) => e.vtemp_free[t] = true,
        (Loc::Scal(_, Some(t)), _) => e.cell_free[t] = true,
        _ => {}
    }
}
