//! A stream's sizing, layout in UB, and its tile loop: the DMA parts (MTE2 in, MTE3 out) and
//! the flags around the vector part.

use super::super::{restore, unsupported, Gen, Op, R};
use super::{Emit, Lanes, Mode, Plan, Region, CELLS};
use crate::isa::{AluOp, Cond, Instr, Pipe};
use kiln_ir::kernel::Stmt;

impl Gen<'_> {
    /// Sizes the tiles, lays the stream out in UB and emits it.
    pub(super) fn emit_stream(&mut self, mut plan: Plan, body: &[Stmt]) -> R<Option<()>> {
        let vl = self.vl as usize;
        let align = self.ub.align;
        let slots = self.opts.slots.max(1) as u64;
        let (row_var, row_extent) = plan.row.clone();
        let nrows_max = self.upper(&row_extent).max(1);
        // Loads that do not depend on the row are resident (in strips, only those that do not
        // depend on the strip either).
        let uniform = |r: &Region| r.acc.row_coef == Some(0) && !r.acc.len.uses(row_var) && r.acc.guards.is_empty();
        for r in &mut plan.loads {
            r.resident = uniform(r);
        }
        let path_in = self.cfg.path(0, vl).ok_or_else(|| unsupported("no DMA path into the vector level"))?;
        let (lat, bw) = (path_in.latency_cycles as f64, path_in.bytes_per_cycle);
        let free = self.ub.cap.saturating_sub(self.ub.top.next_multiple_of(align));
        let cells = CELLS as u64;
        let pitch_of =
            |r: &Region| if r.acc.stride == 0 { 1 } else { (r.acc.max_len.max(1) as u64).next_multiple_of(align) };
        let max_len = plan.loads.iter().chain(&plan.stores).map(|r| r.acc.max_len).max().unwrap_or(1).max(1);
        let max_len = max_len.max(plan.ctx_max);
        let resident: u64 = plan.loads.iter().filter(|r| r.resident).map(|r| pitch_of(r) + align).sum();
        let per_row: u64 = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident).map(pitch_of).sum();
        let regions = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident).count() as u64;
        let temps = (plan.vtemps + plan.shared.len()) as u64 * (max_len as u64).next_multiple_of(align);
        let fixed = resident + temps + cells + 4 * align + 2 * slots * regions * align;
        let rows_fit = if per_row == 0 { nrows_max } else { (free.saturating_sub(fixed) / (slots * per_row)) as i64 };
        let bytes_row: u64 =
            plan.loads.iter().filter(|r| !r.resident).map(|r| r.acc.max_len.max(1) as u64 * 4).sum::<u64>().max(1);
        // Enough rows per tile that each copy moves several latencies' worth of bytes.
        let target = ((4.0 * lat * bw) / bytes_row as f64).ceil().max(1.0) as i64;
        let mode = match plan.strippable {
            Some(n) if rows_fit < 1 || nrows_max == 1 => {
                for r in &mut plan.loads {
                    r.resident = uniform(r) && r.acc.stride == 0;
                }
                let resident: u64 = plan.loads.iter().filter(|r| r.resident).map(|r| pitch_of(r) + align).sum();
                let regions = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident).count() as u64;
                // Strips of T elements: every ring region holds T per slot.
                let vec_regions = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident && r.acc.stride != 0);
                let per_elem = slots * vec_regions.count() as u64 + (plan.vtemps + plan.shared.len()) as u64;
                let scal = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident && r.acc.stride == 0).count();
                let fixed = resident
                    + cells
                    + 4 * align
                    + 2 * slots * (regions + plan.vtemps as u64) * align
                    + slots * scal as u64;
                let fit = free.saturating_sub(fixed) / per_elem.max(1);
                let in_vec = plan.loads.iter().filter(|r| !r.resident && r.acc.stride != 0).count().max(1);
                let want = ((4.0 * lat * bw) / (4.0 * in_vec as f64)).ceil() as u64;
                let lanes = self.cfg.lanes();
                let mut t = fit.min(want.max(lanes * 16)).min(n.max(1) as u64);
                if t < n as u64 {
                    t = t / lanes.max(1) * lanes;
                }
                if t == 0 {
                    return Err(self.does_not_fit(vl, (self.ub.top + fixed + per_elem * lanes) * 4));
                }
                Mode::Strip { t: t as i64, nt: (n.max(1) + t as i64 - 1) / t as i64 }
            }
            _ => {
                if rows_fit < 1 {
                    return Err(self.does_not_fit(vl, (self.ub.top + fixed + slots * per_row) * 4));
                }
                Mode::Rows { r: target.min(rows_fit).min(nrows_max).max(1) }
            }
        };
        let (rows_per_tile, elems) = match mode {
            Mode::Rows { r } => (r as u64, None),
            Mode::Strip { t, .. } => (1, Some(t as u64)),
        };
        // Lay out: resident regions, then the in ring (slots × regions), the out ring, temps, cells.
        let pitch = |r: &Region| match elems {
            Some(t) if r.acc.stride != 0 => t.next_multiple_of(align),
            _ => pitch_of(r),
        };
        for r in plan.loads.iter_mut().filter(|r| r.resident) {
            r.pitch = pitch(r);
            r.addr = self.ub_alloc(r.pitch)?;
        }
        let lay = |regs: &mut Vec<Region>| -> u64 {
            let mut off = 0u64;
            for r in regs.iter_mut().filter(|r| !r.resident) {
                r.pitch = pitch(r);
                off = off.next_multiple_of(align);
                r.addr = off;
                off += r.pitch * rows_per_tile;
            }
            off.next_multiple_of(align)
        };
        let in_size = lay(&mut plan.loads);
        let out_size = lay(&mut plan.stores);
        let in_base = if in_size > 0 { self.ub_alloc(in_size * slots)? } else { 0 };
        let out_base = if out_size > 0 { self.ub_alloc(out_size * slots)? } else { 0 };
        for r in plan.loads.iter_mut().filter(|r| !r.resident) {
            r.addr += in_base;
        }
        for r in plan.stores.iter_mut() {
            r.addr += out_base;
        }
        let vlen = match elems {
            Some(t) => t.next_multiple_of(align),
            None => (max_len as u64).next_multiple_of(align),
        };
        let mut vtemp_addr = Vec::new();
        for _ in 0..plan.vtemps {
            vtemp_addr.push(self.ub_alloc(vlen)?);
        }
        let mut shared_addr = vec![0; plan.shared.len()];
        for i in 0..plan.shared.len() {
            shared_addr[i] = self.ub_alloc(vlen)?;
        }
        let cells_at = self.ub_alloc(cells)?;
        let cell_addr: Vec<u64> = (0..cells).map(|i| cells_at + i).collect();
        let flags = [
            self.flag(Pipe::Mte2, Pipe::V)?,
            self.flag(Pipe::V, Pipe::Mte2)?,
            self.flag(Pipe::V, Pipe::Mte3)?,
            self.flag(Pipe::Mte3, Pipe::V)?,
        ];
        let mut e = Emit {
            vtemp_free: vec![true; vtemp_addr.len()],
            vtemp_addr,
            cell_free: vec![true; cell_addr.len()],
            cell_addr,
            plan,
            mode,
            slots,
            in_size,
            out_size,
            flags,
            in_off: None,
            out_off: None,
            row_in_tile: Op::K(0),
            x0: Op::K(0),
            xl: Op::K(0),
            guards: Vec::new(),
            shared_addr,
            row_cache: Default::default(),
        };
        self.pipeline(&mut e, body)?;
        // Every flag is balanced once the epilogue's waits have run; the next part starts
        // after a barrier.
        self.free_flags();
        Ok(Some(()))
    }

    /// The tile loop with its prologue and epilogue.
    fn pipeline(&mut self, e: &mut Emit, body: &[Stmt]) -> R<()> {
        let [full_in, empty_in, _, empty_out] = e.flags;
        let ring_in = e.in_size > 0;
        let ring_out = e.out_size > 0;
        let has_resident = e.plan.loads.iter().any(|r| r.resident);
        let m = self.mark();
        let nrows = self.sidx(&e.plan.row.1.clone())?;
        let ntiles = match e.mode {
            Mode::Rows { r } => {
                let t = self.alu_ops(AluOp::Add, nrows, Op::K(r - 1))?;
                self.alu_ops(AluOp::Div, t, Op::K(r))?
            }
            Mode::Strip { nt, .. } => self.alu_ops(AluOp::Mul, nrows, Op::K(nt))?,
        };
        let ntiles = pin(ntiles);
        if let Op::K(n) = ntiles {
            if n <= 0 {
                self.reset(m);
                return Ok(());
            }
        }
        // The slots start free (before the check for no tiles: the epilogue takes them back).
        for _ in 0..e.slots {
            if ring_in {
                self.emit(Instr::SetFlag { src: Pipe::V, dst: Pipe::Mte2, id: empty_in });
            }
            if ring_out {
                self.emit(Instr::SetFlag { src: Pipe::Mte3, dst: Pipe::V, id: empty_out });
            }
        }
        if has_resident {
            self.resident_loads(e)?;
            if !ring_in {
                self.emit(Instr::SetFlag { src: Pipe::Mte2, dst: Pipe::V, id: full_in });
                self.emit(Instr::WaitFlag { src: Pipe::Mte2, dst: Pipe::V, id: full_in });
            }
        }
        let end = self.label();
        let nt_reg = self.in_reg(ntiles)?;
        let zero = self.konst(0)?;
        if !matches!(ntiles, Op::K(_)) {
            self.branch(Instr::Branch { cond: Cond::Ge, ra: zero, rb: nt_reg, target: 0 }, end);
        }
        let u = self.reg()?;
        self.li(u, 0)?;
        if ring_in {
            self.tile_loads(e, Op::R(u))?;
        }
        let top = self.label();
        self.bind(top);
        if ring_in {
            // Tile u+1's loads go first: they are not held up behind tile u's vector work.
            let next = self.reg()?;
            self.emit(Instr::AluI { op: AluOp::Add, rd: next, ra: u, imm: 1 });
            let skip = self.label();
            let nt_reg = self.in_reg(ntiles)?;
            self.branch(Instr::Branch { cond: Cond::Ge, ra: next, rb: nt_reg, target: 0 }, skip);
            self.tile_loads(e, Op::R(next))?;
            self.bind(skip);
            self.reset(next.0);
        }
        self.tile_compute(e, Op::R(u), body)?;
        if ring_out {
            self.tile_stores(e, Op::R(u))?;
        }
        self.emit(Instr::AluI { op: AluOp::Add, rd: u, ra: u, imm: 1 });
        let nt_reg = self.in_reg(ntiles)?;
        self.branch(Instr::Branch { cond: Cond::Lt, ra: u, rb: nt_reg, target: 0 }, top);
        self.bind(end);
        self.accum_stores(e)?;
        for _ in 0..e.slots {
            if ring_in {
                self.emit(Instr::WaitFlag { src: Pipe::V, dst: Pipe::Mte2, id: empty_in });
            }
            if ring_out {
                self.emit(Instr::WaitFlag { src: Pipe::Mte3, dst: Pipe::V, id: empty_out });
            }
        }
        self.reset(m);
        Ok(())
    }

    /// Accumulators back to global memory after the last tile.
    fn accum_stores(&mut self, e: &mut Emit) -> R<()> {
        let [_, _, full_out, _] = e.flags;
        let regions: Vec<Region> = e.plan.loads.iter().filter(|r| r.accum).cloned().collect();
        if regions.is_empty() {
            return Ok(());
        }
        let _ = full_out;
        // Every tile is done (and with no tile, MTE2's load of the accumulator is too).
        self.emit(Instr::Barrier);
        for r in regions {
            let m = self.mark();
            let dst = self.sidx(&r.acc.base)?;
            let dst = self.alu_ops(AluOp::Add, dst, Op::K(self.gm[r.acc.buf] as i64))?;
            let len = self.sidx(&r.acc.len)?;
            self.dma_run(false, dst, Op::K(r.addr as i64), len, r.acc.stride)?;
            self.reset(m);
        }
        Ok(())
    }

    /// The tile's rows: (first row, rows in the tile); for strips, (the row, 1) and the strip
    /// start and length in `e`.
    pub(super) fn tile_geometry(&mut self, e: &mut Emit, u: Op) -> R<(Op, Op)> {
        let nrows = self.sidx(&e.plan.row.1.clone())?;
        match e.mode {
            Mode::Rows { r } => {
                let row0 = pin(self.alu_ops(AluOp::Mul, u, Op::K(r))?);
                let left = self.alu_ops(AluOp::Sub, nrows, row0)?;
                let nr = self.alu_ops(AluOp::Min, left, Op::K(r))?;
                Ok((row0, pin(nr)))
            }
            Mode::Strip { t, nt } => {
                let row = pin(self.alu_ops(AluOp::Div, u, Op::K(nt))?);
                let strip = self.alu_ops(AluOp::Rem, u, Op::K(nt))?;
                let x0 = pin(self.alu_ops(AluOp::Mul, strip, Op::K(t))?);
                let len = e.plan.strippable.unwrap_or(0);
                let left = self.alu_ops(AluOp::Sub, Op::K(len), x0)?;
                let xl = self.alu_ops(AluOp::Min, left, Op::K(t))?;
                e.x0 = x0;
                e.xl = pin(xl);
                Ok((row, Op::K(1)))
            }
        }
    }

    /// The slot offset of tile `u` in a ring of `size` elements per slot.
    pub(super) fn slot_off(&mut self, e: &Emit, u: Op, size: u64) -> R<Op> {
        if e.slots == 1 {
            return Ok(Op::K(0));
        }
        let s = self.alu_ops(AluOp::Rem, u, Op::K(e.slots as i64))?;
        let o = self.alu_ops(AluOp::Mul, s, Op::K(size as i64))?;
        Ok(pin(o))
    }

    fn resident_loads(&mut self, e: &mut Emit) -> R<()> {
        let m = self.mark();
        let regions: Vec<Region> = e.plan.loads.iter().filter(|r| r.resident).cloned().collect();
        for r in regions {
            let m2 = self.mark();
            let src = self.sidx(&r.acc.base)?;
            let src = self.alu_ops(AluOp::Add, src, Op::K(self.gm[r.acc.buf] as i64))?;
            let len = self.sidx(&r.acc.len)?;
            self.dma_run(true, src, Op::K(r.addr as i64), len, r.acc.stride)?;
            self.reset(m2);
        }
        self.reset(m);
        Ok(())
    }

    /// One run of `len` elements between global memory (`stride` apart; 0 is one element)
    /// and UB (contiguous).
    fn dma_run(&mut self, to_ub: bool, gm: Op, ub: Op, len: Op, stride: i64) -> R<()> {
        let (n, l, gs) =
            if stride == 1 || stride == 0 { (Op::K(1), len, Op::K(1)) } else { (len, Op::K(1), Op::K(stride)) };
        let (gm, ub, n, l, gs, one) =
            (self.in_reg(gm)?, self.in_reg(ub)?, self.in_reg(n)?, self.in_reg(l)?, self.in_reg(gs)?, self.konst(1)?);
        let vl = self.vl;
        self.emit(if to_ub {
            Instr::Copy { dst_level: vl, src_level: 0, dst: ub, src: gm, n, len: l, dst_stride: one, src_stride: gs }
        } else {
            Instr::Copy { dst_level: 0, src_level: vl, dst: gm, src: ub, n, len: l, dst_stride: gs, src_stride: one }
        });
        Ok(())
    }

    /// MTE2's part of tile `u`.
    fn tile_loads(&mut self, e: &mut Emit, u: Op) -> R<()> {
        let [full_in, empty_in, _, _] = e.flags;
        self.emit(Instr::WaitFlag { src: Pipe::V, dst: Pipe::Mte2, id: empty_in });
        let m = self.mark();
        let (row0, nr) = self.tile_geometry(e, u)?;
        let off = self.slot_off(e, u, e.in_size)?;
        let regions: Vec<Region> = e.plan.loads.iter().filter(|r| !r.resident).cloned().collect();
        for r in &regions {
            let m = self.mark();
            self.region_dma(e, r, true, row0, nr, off)?;
            self.reset(m);
        }
        self.emit(Instr::SetFlag { src: Pipe::Mte2, dst: Pipe::V, id: full_in });
        self.reset(m);
        Ok(())
    }

    /// MTE3's part of tile `u`.
    fn tile_stores(&mut self, e: &mut Emit, u: Op) -> R<()> {
        let [_, _, full_out, empty_out] = e.flags;
        self.emit(Instr::WaitFlag { src: Pipe::V, dst: Pipe::Mte3, id: full_out });
        let m = self.mark();
        let (row0, nr) = self.tile_geometry(e, u)?;
        let off = self.slot_off(e, u, e.out_size)?;
        let regions = e.plan.stores.clone();
        for r in &regions {
            let m = self.mark();
            self.region_dma(e, r, false, row0, nr, off)?;
            self.reset(m);
        }
        self.emit(Instr::SetFlag { src: Pipe::Mte3, dst: Pipe::V, id: empty_out });
        self.reset(m);
        Ok(())
    }

    /// The DMA of one ring region for a tile (`row0`, `nr` rows; or the strip).
    fn region_dma(&mut self, e: &mut Emit, r: &Region, to_ub: bool, row0: Op, nr: Op, off: Op) -> R<()> {
        let row_var = e.plan.row.0;
        let ub = pin(self.alu_ops(AluOp::Add, off, Op::K(r.addr as i64))?);
        let uniform = !r.acc.len.uses(row_var) && r.acc.guards.iter().all(|g| !g.base.uses(row_var));
        if let (Mode::Rows { .. }, Some(c), true) = (e.mode, r.acc.row_coef, uniform) {
            if r.acc.stride == 1 || r.acc.stride == 0 {
                // One 2-D copy: `nr` bursts of the row's lanes, `c` apart in global memory,
                // `pitch` in UB.
                let gm = self.gm[r.acc.buf] as i64;
                let base = self.sidx(&r.acc.base)?;
                let src = self.alu_ops(AluOp::Add, base, Op::K(gm))?;
                let t = self.alu_ops(AluOp::Mul, row0, Op::K(c))?;
                let src = pin(self.alu_ops(AluOp::Add, src, t)?);
                let (n, pitch) =
                    if r.acc.stride == 0 { (Op::K(1), 1) } else { (pin(self.sidx(&r.acc.len)?), r.pitch as i64) };
                let mut lanes = Lanes { off: Op::K(0), n, lo: Op::K(0) };
                for g in &r.acc.guards {
                    lanes = self.guard_lanes(g, lanes)?;
                }
                let src = self.alu_ops(AluOp::Add, src, lanes.lo)?;
                let ub = self.alu_ops(AluOp::Add, ub, lanes.off)?;
                let (src, ub, n, len, gs, us) = (
                    self.in_reg(src)?,
                    self.in_reg(ub)?,
                    self.in_reg(nr)?,
                    self.in_reg(lanes.n)?,
                    self.in_reg(Op::K(c))?,
                    self.in_reg(Op::K(pitch))?,
                );
                let vl = self.vl;
                self.emit(if to_ub {
                    Instr::Copy { dst_level: vl, src_level: 0, dst: ub, src, n, len, dst_stride: us, src_stride: gs }
                } else {
                    Instr::Copy {
                        dst_level: 0,
                        src_level: vl,
                        dst: src,
                        src: ub,
                        n,
                        len,
                        dst_stride: gs,
                        src_stride: us,
                    }
                });
                return Ok(());
            }
        }
        if let Mode::Strip { .. } = e.mode {
            return self.row_dma(e, r, to_ub, row0, ub);
        }
        // Row by row.
        let i = usize::MAX - 2;
        let rows = match e.mode {
            Mode::Rows { r } => r,
            Mode::Strip { .. } => 1,
        };
        let pitch = r.pitch as i64;
        self.loop_op(i, nr, rows, |g| {
            let ir = g.vars[&i];
            let row = pin(g.alu_ops(AluOp::Add, row0, Op::R(ir))?);
            let t = g.alu_ops(AluOp::Mul, Op::R(ir), Op::K(pitch))?;
            let at = pin(g.alu_ops(AluOp::Add, t, ub)?);
            g.row_dma(e, r, to_ub, row, at)
        })
    }

    /// The DMA of one row of a region (the row's elements at `ub`; for strips, the strip's).
    fn row_dma(&mut self, e: &mut Emit, r: &Region, to_ub: bool, row: Op, ub: Op) -> R<()> {
        let row_var = e.plan.row.0;
        let old = self.vars.get(&row_var).copied();
        let rr = self.in_reg(row)?;
        self.vars.insert(row_var, rr);
        let gm = self.gm[r.acc.buf] as i64;
        let base = self.sidx(&r.acc.base)?;
        let mut src = self.alu_ops(AluOp::Add, base, Op::K(gm))?;
        if let Some(c) = r.acc.row_coef {
            let t = self.alu_ops(AluOp::Mul, row, Op::K(c))?;
            src = self.alu_ops(AluOp::Add, src, t)?;
        }
        let src = pin(src);
        let mut lanes = if r.acc.stride == 0 {
            Lanes { off: Op::K(0), n: Op::K(1), lo: Op::K(0) }
        } else {
            match e.mode {
                Mode::Strip { .. } => Lanes { off: Op::K(0), n: e.xl, lo: e.x0 },
                Mode::Rows { .. } => {
                    let n = pin(self.sidx(&r.acc.len)?);
                    Lanes { off: Op::K(0), n, lo: Op::K(0) }
                }
            }
        };
        for g in &r.acc.guards {
            lanes = self.guard_lanes(g, lanes)?;
        }
        let t = self.alu_ops(AluOp::Mul, lanes.lo, Op::K(r.acc.stride))?;
        let src = self.alu_ops(AluOp::Add, src, t)?;
        let dst = self.alu_ops(AluOp::Add, ub, lanes.off)?;
        self.dma_run(to_ub, src, dst, lanes.n, r.acc.stride)?;
        restore(&mut self.vars, row_var, old);
        Ok(())
    }
}

/// A temporary operand made read-only (it must survive later temporaries).
pub(super) fn pin(o: Op) -> Op {
    match o {
        Op::T(r) => Op::R(r),
        x => x,
    }
}
