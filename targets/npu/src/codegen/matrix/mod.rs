//! Matrix tiles: [`Mma`] statements as a software pipeline over instances.
//!
//! One [`Mma`] instance is a small GEMM: `A[rows × K]` (the values `a(r)` at each point of the
//! reduction loops), `B[K × valid]` (the runs `B[b + j]`), and `C[r, j] += (A·B)[r, j]`. A
//! loop whose body is one `Mma` (a row of tiles) is a *matrix stream*; each instance is a
//! tile and every buffer has two slots, so the pipes overlap across instances:
//!
//! ```text
//! MTE2  gather A and B (multi-dim DMA patterns) into the first level of their routes; gather C
//! MTE1  move A and B along their routes (DaVinci: L1 → L0A / L0B)
//! M     mmad C' = A·B into the accumulator level (L0C)
//! V     (copy C' to UB when the accumulator is elsewhere) C += C'
//! MTE3  scatter C back
//! ```
//!
//! Each buffer has a chain of pipes (its writer, then its readers in order); consecutive
//! pipes of a chain are ordered by a "ready" flag, and the last pipe hands the slot back to
//! the first with a "free" flag. Where the machine has no matrix unit (Sunway) A and B go to
//! the vector level and V computes the product with multiply-accumulates (`vmla`), one per
//! row and reduction point. A reduction longer than the operand levels allow is split into
//! chunks (a loop around the instances, each chunk adding its part to C).
//!
//! `a` must be a load (of a parameter or a local) affine in the tile's row and reduction
//! variables; other forms take the generic path.

mod gemm;
mod ops;

use super::affine::{self, Lin};
use super::{restore, unsupported, Alloc, Gen, Op, R};
use crate::isa::{AluOp, Instr, Pipe, VBinOp};
use kiln_ir::kernel::{Idx, Mma, Stmt, Val};

/// The loop variable of a single-instance matrix stream.
const ONE: usize = usize::MAX - 16;
/// Fresh loop variables of chunked reductions.
const CHUNK: usize = usize::MAX - 32;

/// A buffer of the pipeline: `slots` copies of `size` elements at `base` in `level`, written
/// by `chain[0]` and read in order by the rest.
#[derive(Clone, Debug)]
struct Buf {
    level: usize,
    base: u64,
    size: u64,
    /// Copies (1 for an operand loaded once for the whole stream).
    slots: u64,
    chain: Vec<Pipe>,
    /// Flag of each edge `chain[i] → chain[i + 1]` (none between equal pipes).
    ready: Vec<Option<u8>>,
    /// Flag `chain[last] → chain[0]`.
    free: Option<u8>,
}

/// A multi-dim access: `(count, source stride)` per dim, outermost first, from `base`.
#[derive(Clone, Debug)]
struct Pattern {
    buf: usize,
    base: Idx,
    dims: Vec<(Idx, i64)>,
}

struct Plan<'m> {
    m: &'m Mma,
    row: (usize, Idx),
    a: Pattern,
    b: Pattern,
    c: Pattern,
    /// Upper bound of K (of one chunk).
    kmax: u64,
    /// The reduction in chunks of this many values of the first reduction loop, each chunk
    /// accumulated into the same accumulator.
    chunk: Option<i64>,
}

impl Gen<'_> {
    /// Compiles `s` (a loop whose body is one `Mma`, or an `Mma`) as a matrix stream; `None`
    /// when it does not have that form (nothing emitted).
    pub fn try_matrix(&mut self, s: &Stmt) -> R<Option<()>> {
        let (row, m) = match s {
            Stmt::For { var, extent, body, .. } => match body.as_slice() {
                [Stmt::Mma(m)] => ((*var, extent.clone()), &**m),
                _ => return Ok(None),
            },
            Stmt::Mma(m) => ((ONE, Idx::Const(1)), &**m),
            _ => return Ok(None),
        };
        let snap = self.snapshot();
        let lv = self.levels_snapshot();
        match self.matrix_stream(row.clone(), m) {
            Ok(Some(())) => Ok(Some(())),
            Err(crate::NpuError::DoesNotFit { .. }) if self.opts.slots > 1 => {
                // Without double buffering the tiles may fit.
                self.rollback(snap);
                self.levels_restore(lv);
                let slots = std::mem::replace(&mut self.opts.slots, 1);
                let r = self.try_matrix(s);
                self.opts.slots = slots;
                r
            }
            Ok(None) | Err(crate::NpuError::Unsupported(_)) | Err(crate::NpuError::DoesNotFit { .. }) => {
                self.rollback(snap);
                self.levels_restore(lv);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn levels_snapshot(&self) -> std::collections::HashMap<usize, Alloc> {
        self.lvl.clone()
    }

    fn levels_restore(&mut self, s: std::collections::HashMap<usize, Alloc>) {
        self.lvl = s;
    }

    /// An allocation of `n` elements in level `l` (the vector level through [`Gen::ub_alloc`]).
    fn level_alloc(&mut self, l: usize, n: u64) -> R<u64> {
        if l == self.vl as usize {
            return self.ub_alloc(n);
        }
        let (cap, align) = (self.cfg.capacity_elems(l), self.cfg.align_elems(l));
        let a = self.lvl.entry(l).or_insert(Alloc { top: 0, cap, align, peak: 0 });
        match a.alloc(n) {
            Some(x) => Ok(x),
            None => {
                let need = (a.top.next_multiple_of(a.align) + n) * 4;
                Err(self.does_not_fit(l, need))
            }
        }
    }

    fn matrix_stream(&mut self, row: (usize, Idx), m: &Mma) -> R<Option<()>> {
        let old_row = self.ranges.insert(row.0, self.upper(&row.1).max(1));
        let old_mrow = self.ranges.insert(m.row, m.rows as i64);
        let mut olds = Vec::new();
        for (v, e) in &m.red {
            let hi = self.upper(e).max(1);
            olds.push((*v, self.ranges.insert(*v, hi)));
        }
        let limit = self.k_limit(m);
        let rest: i64 = m.red.iter().skip(1).fold(1i64, |a, (_, e)| a.saturating_mul(self.upper(e).max(1)));
        let mut planned = false;
        let r = self.matrix_plan(row.clone(), m).and_then(|p| match p {
            Some(p) if p.kmax <= limit => self.matrix_emit(p),
            Some(mut p) if !m.red.is_empty() && limit as i64 / rest >= 1 => {
                planned = true;
                let c1 = limit as i64 / rest;
                p.chunk = Some(c1);
                p.kmax = (c1 * rest) as u64;
                self.matrix_emit(p)
            }
            Some(_) => {
                planned = true;
                Ok(None)
            }
            None => Ok(None),
        });
        for (v, o) in olds.into_iter().rev() {
            restore(&mut self.ranges, v, o);
        }
        restore(&mut self.ranges, m.row, old_mrow);
        restore(&mut self.ranges, row.0, old_row);
        match r {
            // Too long a reduction for one instance: instances per chunk.
            Ok(None) if planned => self.matrix_chunked(row, m),
            r => r,
        }
    }

    /// Splits the outermost reduction loop into chunks when the operands are too big.
    fn matrix_chunked(&mut self, row: (usize, Idx), m: &Mma) -> R<Option<()>> {
        let Some((v1, e1)) = m.red.first() else { return Ok(None) };
        if *v1 >= CHUNK - 64 {
            return Ok(None);
        }
        let rest: i64 = m.red[1..].iter().fold(1i64, |a, (_, e)| a.saturating_mul(self.upper(e).max(1)));
        let c1 = (self.k_limit(m) / rest.max(1) as u64) as i64;
        let e1max = self.upper(e1);
        if c1 < 1 || c1 >= e1max {
            return Ok(None);
        }
        // for ch in 0..⌈E1 / c1⌉ { for row { Mma with v1 = ch·c1 + v1', v1' < min(c1, E1 − ch·c1) } }
        let ch = CHUNK - self.chunk_vars();
        let v1n = ch - 1;
        let by =
            Idx::Add(Box::new(Idx::Mul(Box::new(Idx::Var(ch)), Box::new(Idx::Const(c1)))), Box::new(Idx::Var(v1n)));
        let sub = |i: &Idx| i.subst(*v1, &by).simplify();
        let left = Idx::Sub(Box::new(e1.clone()), Box::new(Idx::Mul(Box::new(Idx::Var(ch)), Box::new(Idx::Const(c1)))));
        let mut red = m.red.clone();
        red[0] = (v1n, Idx::Min(Box::new(Idx::Const(c1)), Box::new(left)).simplify());
        let m2 = Mma { red, a: affine::map_val(&m.a, &sub), b: (m.b.0, m.b.1.iter().map(sub).collect()), ..m.clone() };
        let inner = if row.0 == ONE {
            Stmt::Mma(Box::new(m2))
        } else {
            Stmt::For { var: row.0, extent: row.1.clone(), parallel: false, body: vec![Stmt::Mma(Box::new(m2))] }
        };
        let chunks =
            Idx::Div(Box::new(Idx::Add(Box::new(e1.clone()), Box::new(Idx::Const(c1 - 1)))), Box::new(Idx::Const(c1)))
                .simplify();
        self.scalar_loop(ch, &chunks, |g| {
            match g.try_matrix(&inner)? {
                Some(()) => {}
                None => g.generic_stmt(&inner)?,
            }
            g.emit(Instr::Barrier);
            Ok(())
        })?;
        Ok(Some(()))
    }

    /// The longest reduction an instance may have: both operands, double-buffered, in half of
    /// each level they pass through.
    fn k_limit(&self, m: &Mma) -> u64 {
        let (rows, cols) = (m.rows as u64, m.cols as u64);
        let slots = self.opts.slots.max(1) as u64;
        let free_ub = self.ub.cap.saturating_sub(self.ub.top);
        self.operand_levels()
            .into_iter()
            .map(|l| {
                let cap = if l == self.vl as usize { free_ub } else { self.cfg.capacity_elems(l) };
                cap / (2 * slots * (rows + cols)).max(1)
            })
            .min()
            .unwrap_or(0)
    }

    fn chunk_vars(&self) -> usize {
        self.vars.keys().filter(|&&v| (CHUNK - 64..=CHUNK).contains(&v)).count() * 2
    }

    /// Levels an instance's operands occupy.
    fn operand_levels(&self) -> Vec<usize> {
        let v = self.vl as usize;
        match (&self.cfg.matrix, self.opts.matrix) {
            (Some(mu), true) => {
                let mut ls = vec![v];
                for name in [&mu.a_level, &mu.b_level] {
                    let l = self.cfg.level_index(name).unwrap_or(v);
                    ls.extend(self.cfg.route(0, l).unwrap_or_default().into_iter().skip(1));
                }
                ls
            }
            _ => vec![v],
        }
    }

    fn matrix_plan<'m>(&mut self, row: (usize, Idx), m: &'m Mma) -> R<Option<Plan<'m>>> {
        let Val::Load { buf: abuf, index: aidx } = &m.a else { return Ok(None) };
        let red: Vec<usize> = m.red.iter().map(|(v, _)| *v).collect();
        let pat = |g: &Gen, buf: usize, index: &[Idx], dims: &[(usize, Idx)]| -> Option<Pattern> {
            let l: Lin = affine::flat(index, &g.shapes[buf], &g.ranges);
            if dims.iter().any(|(v, _)| l.opaque_in(*v)) {
                return None;
            }
            let skip: Vec<usize> = dims.iter().map(|(v, _)| *v).collect();
            Some(Pattern {
                buf,
                base: l.to_idx(&skip),
                dims: dims.iter().map(|(v, e)| (e.clone(), l.coef(*v))).collect(),
            })
        };
        // A[r][k]: the row, then the reduction loops.
        let mut adims = vec![(m.row, Idx::Const(m.rows as i64))];
        adims.extend(m.red.iter().cloned());
        let Some(a) = pat(self, *abuf, aidx, &adims) else { return Ok(None) };
        // B[k][j]: the reduction loops, then the run of columns; B does not depend on the row.
        let Some(mut b) = pat(self, m.b.0, &m.b.1, &m.red) else { return Ok(None) };
        if b.base.uses(m.row) || a.base.uses(m.row) {
            return Ok(None);
        }
        b.dims.push((m.valid.clone(), 1));
        // C[r][j].
        let Some(mut c) = pat(self, m.c.0, &m.c.1, &[(m.row, Idx::Const(m.rows as i64))]) else { return Ok(None) };
        if red.iter().any(|v| c.base.uses(*v)) || c.base.uses(m.row) {
            return Ok(None);
        }
        let Idx::Const(ccol) = m.c_col else { return Ok(None) };
        c.dims.push((m.valid.clone(), ccol));
        let kmax: u64 = m.red.iter().fold(1u64, |a, (_, e)| a.saturating_mul(self.upper(e).max(0) as u64));
        Ok(Some(Plan { m, row, a, b, c, kmax, chunk: None }))
    }

    fn matrix_emit(&mut self, p: Plan) -> R<Option<()>> {
        let v = self.vl as usize;
        let (rows, cols) = (p.m.rows as u64, p.m.cols as u64);
        let k = p.kmax.max(1);
        let slots = self.opts.slots.max(1) as u64;
        let unit = match (&self.cfg.matrix, self.opts.matrix) {
            (Some(mu), true) => Some((
                self.cfg.level_index(&mu.a_level).unwrap_or(v),
                self.cfg.level_index(&mu.b_level).unwrap_or(v),
                self.cfg.level_index(&mu.c_level).unwrap_or(v),
            )),
            _ => None,
        };
        let src_level = |g: &Gen, buf: usize| if buf < g.nparams() { 0 } else { v };
        // Routes of A and B (levels after the source), and of the accumulator to V.
        let (ra, rb, rc) = match unit {
            Some((al, bl, cl)) => {
                let route = |from: usize, to: usize| -> Option<Vec<usize>> {
                    if from == to {
                        Some(Vec::new())
                    } else {
                        self.cfg.route(from, to).map(|r| r[1..].to_vec())
                    }
                };
                let (Some(ra), Some(rb), Some(rc)) =
                    (route(src_level(self, p.a.buf), al), route(src_level(self, p.b.buf), bl), route(cl, v))
                else {
                    return Ok(None);
                };
                if ra.is_empty() || rb.is_empty() {
                    // An operand already in place would need a dense layout: not handled.
                    return Ok(None);
                }
                if p.chunk.is_some() && (ra.is_empty() || rb.is_empty()) {
                    return Ok(None);
                }
                (ra, rb, rc)
            }
            None => {
                let ra = if src_level(self, p.a.buf) == v { vec![] } else { vec![v] };
                let rb = if src_level(self, p.b.buf) == v { vec![] } else { vec![v] };
                if p.chunk.is_some() && (ra.is_empty() || rb.is_empty()) {
                    return Ok(None);
                }
                (ra, rb, vec![])
            }
        };
        let pipe_of = |g: &Gen, from: usize, to: usize| g.cfg.path(from, to).map(|x| x.pipe);
        // Buffers: one per hop of A and B, the accumulator, its copy in V's level, C's tile.
        let mut bufs: Vec<Buf> = Vec::new();
        // An operand that does not depend on the instance is loaded once, before the loop (the
        // weights of a 1×1 Conv, the packed panel of a direct one).
        let rv = p.row.0;
        let invariant = |pat: &Pattern| {
            rv != ONE
                && !pat.base.uses(rv)
                && pat.dims.iter().all(|(e, _)| !e.uses(rv))
                && p.m.red.iter().all(|(_, e)| !e.uses(rv))
        };
        let (a_inv, b_inv) = (invariant(&p.a), invariant(&p.b) && !p.m.valid.uses(rv));
        let (a_res, b_res) = if p.chunk.is_some() { (false, false) } else { (a_inv, b_inv) };
        // In chunks, an invariant operand may still stay whole in the first level of its route
        // (L1), each chunk moving on from there.
        let kfull: u64 = p.m.red.iter().fold(1u64, |a, (_, e)| a.saturating_mul(self.upper(e).max(1) as u64));
        let first_fits = |g: &Gen, route: &[usize], size: u64| {
            route.len() >= 2 && size.saturating_mul(4) <= g.cfg.levels[route[0]].capacity_bytes / 2
        };
        let a_res1 = p.chunk.is_some() && a_inv && first_fits(self, &ra, rows * kfull);
        let b_res1 = p.chunk.is_some() && b_inv && first_fits(self, &rb, kfull * cols);
        let mut hops =
            |g: &mut Gen, route: &[usize], src: usize, size: u64, last: Pipe, res: bool, res1: Option<u64>| {
                let mut ids = Vec::new();
                let mut from = src;
                for (i, &l) in route.iter().enumerate() {
                    let wp = pipe_of(g, from, l).ok_or_else(|| unsupported("no DMA path"))?;
                    let rp = match route.get(i + 1) {
                        Some(&n) => pipe_of(g, l, n).ok_or_else(|| unsupported("no DMA path"))?,
                        None => last,
                    };
                    // A resident operand (or its whole first hop) is fenced by barriers: no flags.
                    let whole = res1.filter(|_| i == 0);
                    let (size, n) = match whole {
                        Some(full) => (full, 1),
                        None if res => (size, 1),
                        None => (size, slots),
                    };
                    let base = g.level_alloc(l, size * n)?;
                    ids.push(bufs.len());
                    let chain = if res || whole.is_some() { vec![wp, wp] } else { vec![wp, rp] };
                    bufs.push(Buf { level: l, base, size, slots: n, chain, ready: vec![], free: None });
                    from = l;
                }
                Ok::<Vec<usize>, crate::NpuError>(ids)
            };
        let consumer = if unit.is_some() { Pipe::M } else { Pipe::V };
        let a_ids =
            hops(self, &ra, src_level(self, p.a.buf), rows * k, consumer, a_res, a_res1.then_some(rows * kfull))?;
        let b_ids =
            hops(self, &rb, src_level(self, p.b.buf), k * cols, consumer, b_res, b_res1.then_some(kfull * cols))?;
        // The accumulator: written by M (or V), then copied to V's level if elsewhere.
        let acc_level = unit.map_or(v, |u| u.2);
        let acc_base = self.level_alloc(acc_level, rows * cols * slots)?;
        let acc_id = bufs.len();
        let mut acc_chain = vec![consumer];
        let mut copy_id = None;
        if let Some(&l) = rc.first() {
            let cp = pipe_of(self, acc_level, l).ok_or_else(|| unsupported("no DMA path"))?;
            acc_chain.push(cp);
            bufs.push(Buf {
                level: acc_level,
                base: acc_base,
                size: rows * cols,
                slots,
                chain: acc_chain,
                ready: vec![],
                free: None,
            });
            if rc.len() > 1 {
                return Ok(None);
            }
            let base = self.level_alloc(v, rows * cols * slots)?;
            copy_id = Some(bufs.len());
            bufs.push(Buf {
                level: v,
                base,
                size: rows * cols,
                slots,
                chain: vec![cp, Pipe::V],
                ready: vec![],
                free: None,
            });
        } else {
            acc_chain.push(Pipe::V);
            bufs.push(Buf {
                level: acc_level,
                base: acc_base,
                size: rows * cols,
                slots,
                chain: acc_chain,
                ready: vec![],
                free: None,
            });
        }
        // C's tile in V's level (global-memory C only): MTE2 gathers, V adds, MTE3 scatters.
        let c_gm = p.c.buf < self.nparams();
        let c_id = if c_gm {
            let base = self.ub_alloc(rows * cols * slots)?;
            bufs.push(Buf {
                level: v,
                base,
                size: rows * cols,
                slots,
                chain: vec![Pipe::Mte2, Pipe::V, Pipe::Mte3],
                ready: vec![],
                free: None,
            });
            Some(bufs.len() - 1)
        } else {
            None
        };
        // Flags.
        for b in &mut bufs {
            for i in 0..b.chain.len() - 1 {
                let (s, d) = (b.chain[i], b.chain[i + 1]);
                b.ready.push(if s == d { None } else { Some(self.flag(s, d)?) });
            }
            let (l, f) = (b.chain[b.chain.len() - 1], b.chain[0]);
            b.free = if l == f { None } else { Some(self.flag(l, f)?) };
        }
        let ctx = MCtx {
            bufs,
            a_ids,
            b_ids,
            acc_id,
            copy_id,
            c_id,
            slots,
            unit: unit.is_some(),
            a_res,
            b_res,
            a_res1,
            b_res1,
        };
        self.matrix_pipeline(&p, &ctx)?;
        self.free_flags();
        self.lvl.clear();
        Ok(Some(()))
    }

    /// The instance loop with its prologue and epilogue.
    fn matrix_pipeline(&mut self, p: &Plan, c: &MCtx) -> R<()> {
        let m0 = self.mark();
        if c.a_res || c.b_res || c.a_res1 || c.b_res1 {
            let (kk, valid) = self.sizes(p.m)?;
            for (ids, pat, what, res) in [(&c.a_ids, &p.a, 'A', c.a_res), (&c.b_ids, &p.b, 'B', c.b_res)] {
                if res {
                    self.operand_hops(c, ids, pat, what, Op::K(0), kk, valid, p.m.rows as i64, true, None)?;
                }
            }
            for (ids, pat, what, res1) in [(&c.a_ids, &p.a, 'A', c.a_res1), (&c.b_ids, &p.b, 'B', c.b_res1)] {
                if res1 {
                    self.operand_hops(c, &ids[..1], pat, what, Op::K(0), kk, valid, p.m.rows as i64, true, None)?;
                }
            }
            self.reset(m0);
        }
        for b in &c.bufs {
            if let Some(f) = b.free {
                let (l, first) = (b.chain[b.chain.len() - 1], b.chain[0]);
                for _ in 0..c.slots {
                    self.emit(Instr::SetFlag { src: l, dst: first, id: f });
                }
            }
        }
        // Uses of A's and B's slots (one per chunk).
        let uses = self.reg()?;
        self.li(uses, 0)?;
        let (rv, extent) = p.row.clone();
        self.scalar_loop(rv, &extent, |g| {
            let u = g.vars[&rv];
            g.instance(p, c, Op::R(u), uses)
        })?;
        for b in &c.bufs {
            if let Some(f) = b.free {
                let (l, first) = (b.chain[b.chain.len() - 1], b.chain[0]);
                for _ in 0..c.slots {
                    self.emit(Instr::WaitFlag { src: l, dst: first, id: f });
                }
            }
        }
        self.reset(m0);
        Ok(())
    }

    /// Waits before stage `i` of buffer `b`'s chain.
    fn stage_wait(&mut self, b: &Buf, i: usize) {
        if i == 0 {
            if let Some(f) = b.free {
                self.emit(Instr::WaitFlag { src: b.chain[b.chain.len() - 1], dst: b.chain[0], id: f });
            }
        } else if let Some(f) = b.ready[i - 1] {
            self.emit(Instr::WaitFlag { src: b.chain[i - 1], dst: b.chain[i], id: f });
        }
    }

    /// Signals after stage `i` of buffer `b`'s chain.
    fn stage_signal(&mut self, b: &Buf, i: usize) {
        if i + 1 < b.chain.len() {
            if let Some(f) = b.ready[i] {
                self.emit(Instr::SetFlag { src: b.chain[i], dst: b.chain[i + 1], id: f });
            }
        } else if let Some(f) = b.free {
            self.emit(Instr::SetFlag { src: b.chain[i], dst: b.chain[0], id: f });
        }
    }

    /// The address of buffer `b`'s slot for instance `u`.
    fn slot_addr(&mut self, b: &Buf, u: Op, _slots: u64) -> R<Op> {
        let slots = b.slots;
        if slots == 1 {
            return Ok(Op::K(b.base as i64));
        }
        let s = self.alu_ops(AluOp::Rem, u, Op::K(slots as i64))?;
        let o = self.alu_ops(AluOp::Mul, s, Op::K(b.size as i64))?;
        let a = self.alu_ops(AluOp::Add, o, Op::K(b.base as i64))?;
        Ok(pin(a))
    }

    /// One instance (`u`: its index in the stream; `uses`: uses of A's and B's slots so far).
    fn instance(&mut self, p: &Plan, c: &MCtx, u: Op, uses: crate::isa::Reg) -> R<()> {
        let m = p.m;
        let v = self.vl;
        let mark = self.mark();
        let (kk, valid) = self.sizes(m)?;
        // C's tile from global memory (independent of the product: early).
        if let Some(cid) = c.c_id {
            let b = c.bufs[cid].clone();
            let m2 = self.mark();
            self.stage_wait(&b, 0);
            let dst = self.slot_addr(&b, u, c.slots)?;
            let (src, dims) = self.c_pattern(p, valid)?;
            self.gather(0, v, src, dst, &dims)?;
            self.stage_signal(&b, 0);
            self.reset(m2);
        }
        // The product, whole or in chunks of the first reduction loop accumulated in place.
        let acc = c.bufs[c.acc_id].clone();
        self.stage_wait(&acc, 0);
        match p.chunk {
            None => self.chunk_product(p, c, u, uses, kk, valid, None, false)?,
            Some(c1) => {
                let e1 = pin(self.sidx(&m.red[0].1)?);
                let e1 = pin(self.alu_ops(AluOp::Max, e1, Op::K(0))?);
                let mut rest = Op::K(1);
                for (_, e) in &m.red[1..] {
                    let x = self.sidx(e)?;
                    let x = self.alu_ops(AluOp::Max, x, Op::K(0))?;
                    rest = pin(self.alu_ops(AluOp::Mul, rest, x)?);
                }
                let t = self.alu_ops(AluOp::Add, e1, Op::K(c1 - 1))?;
                let nch = pin(self.alu_ops(AluOp::Div, t, Op::K(c1))?);
                let one = |g: &mut Gen, ci: Op, accumulate: bool| -> R<()> {
                    let first = pin(g.alu_ops(AluOp::Mul, ci, Op::K(c1))?);
                    let left = g.alu_ops(AluOp::Sub, e1, first)?;
                    let count = pin(g.alu_ops(AluOp::Min, left, Op::K(c1))?);
                    let kc = pin(g.alu_ops(AluOp::Mul, count, rest)?);
                    g.chunk_product(p, c, u, uses, kc, valid, Some((first, count)), accumulate)
                };
                // The first chunk overwrites the accumulator, the others add to it.
                let m2 = self.mark();
                one(self, Op::K(0), false)?;
                self.reset(m2);
                let ch = usize::MAX - 56;
                let max = (self.upper(&m.red[0].1) + c1 - 1) / c1;
                let nch1 = pin(self.alu_ops(AluOp::Sub, nch, Op::K(1))?);
                self.loop_op(ch, nch1, max, |g| {
                    let ci = pin(g.alu_ops(AluOp::Add, Op::R(g.vars[&ch]), Op::K(1))?);
                    one(g, ci, true)
                })?;
            }
        }
        self.stage_signal(&acc, 0);
        self.instance_rest(p, c, u, valid)?;
        self.reset(mark);
        Ok(())
    }

    /// A and B of one chunk (all of K without chunks) to the matrix unit's levels and their
    /// product into the accumulator (`accumulate`: added to it).
    fn chunk_product(
        &mut self,
        p: &Plan,
        c: &MCtx,
        u: Op,
        uses: crate::isa::Reg,
        kk: Op,
        valid: Op,
        chunk: Option<(Op, Op)>,
        accumulate: bool,
    ) -> R<()> {
        let rows = p.m.rows as i64;
        let slot = Op::R(uses);
        for (ids, pat, what, res) in [(&c.a_ids, &p.a, 'A', c.a_res), (&c.b_ids, &p.b, 'B', c.b_res)] {
            if !res {
                self.operand_hops(c, ids, pat, what, slot, kk, valid, rows, false, chunk)?;
            }
        }
        let operand = |g: &mut Gen, ids: &[usize], pat: &Pattern| -> R<Op> {
            match ids.last() {
                Some(&id) => {
                    let b = g.bufs_clone(c, id);
                    let last = b.chain.len() - 1;
                    g.stage_wait(&b, last);
                    g.slot_addr(&b, slot, c.slots)
                }
                None => {
                    // In place (a local in V's level).
                    let src = g.sidx(&pat.base)?;
                    let a = g.alu_ops(AluOp::Add, src, Op::K(g.locals[pat.buf - g.nparams()] as i64))?;
                    Ok(pin(a))
                }
            }
        };
        let m2 = self.mark();
        let a_at = operand(self, &c.a_ids, &p.a)?;
        let b_at = operand(self, &c.b_ids, &p.b)?;
        let acc = c.bufs[c.acc_id].clone();
        let acc_at = self.slot_addr(&acc, u, c.slots)?;
        if c.unit {
            let (cr, ar, br, mr, nr, kr) = (
                self.in_reg(acc_at)?,
                self.in_reg(a_at)?,
                self.in_reg(b_at)?,
                self.konst(rows)?,
                self.in_reg(valid)?,
                self.in_reg(kk)?,
            );
            self.emit(Instr::Mmad { c: cr, a: ar, b: br, m: mr, n: nr, k: kr, acc: accumulate });
        } else {
            self.vector_product(p, c, a_at, b_at, acc_at, kk, valid, accumulate)?;
        }
        for ids in [&c.a_ids, &c.b_ids] {
            if let Some(&id) = ids.last() {
                let b = c.bufs[id].clone();
                let last = b.chain.len() - 1;
                self.stage_signal(&b, last);
            }
        }
        self.emit(Instr::AluI { op: AluOp::Add, rd: uses, ra: uses, imm: 1 });
        self.reset(m2);
        Ok(())
    }

    /// The reduction length and the valid columns of the current instance.
    fn sizes(&mut self, m: &Mma) -> R<(Op, Op)> {
        let mut kk = Op::K(1);
        for (_, e) in &m.red {
            let x = self.sidx(e)?;
            let x = self.alu_ops(AluOp::Max, x, Op::K(0))?;
            kk = self.alu_ops(AluOp::Mul, kk, x)?;
        }
        let kk = pin(kk);
        let valid = self.sidx(&m.valid)?;
        let valid = self.alu_ops(AluOp::Max, valid, Op::K(0))?;
        let valid = pin(self.alu_ops(AluOp::Min, valid, Op::K(m.cols as i64))?);
        Ok((kk, valid))
    }

    /// Moves an operand along its route (`fenced`: once, before the loop, with barriers
    /// instead of flags).
    fn operand_hops(
        &mut self,
        c: &MCtx,
        ids: &[usize],
        pat: &Pattern,
        what: char,
        u: Op,
        kk: Op,
        valid: Op,
        rows: i64,
        fenced: bool,
        chunk: Option<(Op, Op)>,
    ) -> R<()> {
        let src_level = |g: &Gen, buf: usize| if buf < g.nparams() { 0u8 } else { g.vl };
        let whole = chunk.is_some() && if what == 'A' { c.a_res1 } else { c.b_res1 };
        {
            let mut from = src_level(self, pat.buf);
            for (h, &id) in ids.iter().enumerate() {
                let b = c.bufs[id].clone();
                if whole && h == 0 {
                    // Resident: loaded before the loop.
                    from = b.level as u8;
                    continue;
                }
                if whole && h == 1 {
                    // This chunk out of the whole operand in the first level.
                    let (first, count) = chunk.unwrap_or((Op::K(0), Op::K(0)));
                    let prev = c.bufs[ids[0]].clone();
                    let m2 = self.mark();
                    self.stage_wait(&b, 0);
                    let dst = self.slot_addr(&b, u, c.slots)?;
                    // Values of the reduction per value of its first loop, and K in all.
                    let rest = pin(self.alu_ops(AluOp::Div, kk, count)?);
                    let e1 = pin(self.sidx(&pat.dims[if what == 'A' { 1 } else { 0 }].0)?);
                    let e1 = pin(self.alu_ops(AluOp::Max, e1, Op::K(0))?);
                    let kfull = pin(self.alu_ops(AluOp::Mul, e1, rest)?);
                    let k0 = pin(self.alu_ops(AluOp::Mul, first, rest)?);
                    if what == 'A' {
                        // Rows of A: `kk` values from `k0`, `kfull` apart.
                        let src = pin(self.alu_ops(AluOp::Add, k0, Op::K(prev.base as i64))?);
                        let (s, d, n, l, ss, ds) = (
                            self.in_reg(src)?,
                            self.in_reg(dst)?,
                            self.konst(rows)?,
                            self.in_reg(kk)?,
                            self.in_reg(kfull)?,
                            self.in_reg(kk)?,
                        );
                        let (fl, tl) = (from, b.level as u8);
                        self.emit(Instr::Copy {
                            dst_level: tl,
                            src_level: fl,
                            dst: d,
                            src: s,
                            n,
                            len: l,
                            dst_stride: ds,
                            src_stride: ss,
                        });
                    } else {
                        // Rows `k0..k0 + kk` of B, contiguous.
                        let off = self.alu_ops(AluOp::Mul, k0, valid)?;
                        let src = pin(self.alu_ops(AluOp::Add, off, Op::K(prev.base as i64))?);
                        let n = pin(self.alu_ops(AluOp::Mul, kk, valid)?);
                        self.copy_run(from, b.level as u8, src, dst, n)?;
                    }
                    self.stage_signal(&b, 0);
                    self.reset(m2);
                    from = b.level as u8;
                    continue;
                }
                let m2 = self.mark();
                self.stage_wait(&b, 0);
                let dst = self.slot_addr(&b, u, c.slots)?;
                if h == 0 {
                    // The pattern, dense at the destination: A[rows][K], B[K][valid].
                    let src = self.sidx(&pat.base)?;
                    let base =
                        if pat.buf < self.nparams() { self.gm[pat.buf] } else { self.locals[pat.buf - self.nparams()] };
                    let src = pin(self.alu_ops(AluOp::Add, src, Op::K(base as i64))?);
                    let mut dims = Vec::new();
                    for (e, s) in &pat.dims {
                        let n = self.sidx(e)?;
                        let n = pin(self.alu_ops(AluOp::Max, n, Op::K(0))?);
                        dims.push((n, *s));
                    }
                    if what == 'B' {
                        let last = dims.len() - 1;
                        dims[last].0 = valid;
                    }
                    // A chunk: `count` values of the first reduction loop from `first`.
                    let mut src = src;
                    if let Some((first, count)) = chunk {
                        let d = if what == 'A' { 1 } else { 0 };
                        let t = self.alu_ops(AluOp::Mul, first, Op::K(dims[d].1))?;
                        src = pin(self.alu_ops(AluOp::Add, src, t)?);
                        dims[d].0 = count;
                    }
                    self.gather(from, b.level as u8, src, dst, &dims)?;
                } else {
                    let prev = c.bufs[ids[h - 1]].clone();
                    self.stage_wait(&prev, 1);
                    let src = self.slot_addr(&prev, u, c.slots)?;
                    let n = if what == 'A' {
                        self.alu_ops(AluOp::Mul, kk, Op::K(rows))?
                    } else {
                        self.alu_ops(AluOp::Mul, kk, valid)?
                    };
                    self.copy_run(from, b.level as u8, src, dst, pin(n))?;
                    self.stage_signal(&prev, 1);
                }
                self.stage_signal(&b, 0);
                if fenced {
                    self.emit(Instr::Barrier);
                }
                self.reset(m2);
                from = b.level as u8;
            }
        }
        Ok(())
    }

    /// The rest of an instance: the sum into C's tile and C back.
    fn instance_rest(&mut self, p: &Plan, c: &MCtx, u: Op, valid: Op) -> R<()> {
        let m = p.m;
        let rows = m.rows as i64;
        let v = self.vl;
        let mark = self.mark();
        let acc = c.bufs[c.acc_id].clone();
        // V: the accumulator (or its copy) added into C.
        let m2 = self.mark();
        let mut sum_at = {
            let a = c.bufs[c.acc_id].clone();
            self.slot_addr(&a, u, c.slots)?
        };
        if let Some(cp) = c.copy_id {
            let cb = c.bufs[cp].clone();
            self.stage_wait(&acc, 1);
            self.stage_wait(&cb, 0);
            let dst = self.slot_addr(&cb, u, c.slots)?;
            let n = pin(self.alu_ops(AluOp::Mul, valid, Op::K(rows))?);
            self.copy_run(acc.level as u8, v, sum_at, dst, n)?;
            self.stage_signal(&acc, 1);
            self.stage_signal(&cb, 0);
            self.stage_wait(&cb, 1);
            sum_at = dst;
        } else {
            self.stage_wait(&acc, 1);
        }
        let n = pin(self.alu_ops(AluOp::Mul, valid, Op::K(rows))?);
        match c.c_id {
            Some(cid) => {
                let cb = c.bufs[cid].clone();
                self.stage_wait(&cb, 1);
                let at = self.slot_addr(&cb, u, c.slots)?;
                self.vbin(VBinOp::Add, at, at, sum_at, n, false, false)?;
                self.stage_signal(&cb, 1);
            }
            None => self.local_c_add(p, sum_at, valid)?,
        }
        match c.copy_id {
            Some(cp) => {
                let cb = c.bufs[cp].clone();
                self.stage_signal(&cb, 1);
            }
            None => self.stage_signal(&acc, 1),
        }
        self.reset(m2);
        // MTE3: C back.
        if let Some(cid) = c.c_id {
            let b = c.bufs[cid].clone();
            let m2 = self.mark();
            self.stage_wait(&b, 2);
            let at = self.slot_addr(&b, u, c.slots)?;
            let (dst, dims) = self.c_pattern(p, valid)?;
            self.scatter(at, dst, &dims)?;
            self.stage_signal(&b, 2);
            self.reset(m2);
        }
        self.reset(mark);
        Ok(())
    }

    fn bufs_clone(&self, c: &MCtx, id: usize) -> Buf {
        c.bufs[id].clone()
    }
}

struct MCtx {
    bufs: Vec<Buf>,
    /// A and B are loaded once for the whole stream.
    a_res: bool,
    b_res: bool,
    /// A and B (in chunks) stay whole in the first level of their routes for the whole stream.
    a_res1: bool,
    b_res1: bool,
    a_ids: Vec<usize>,
    b_ids: Vec<usize>,
    acc_id: usize,
    copy_id: Option<usize>,
    c_id: Option<usize>,
    slots: u64,
    unit: bool,
}

fn pin(o: Op) -> Op {
    match o {
        Op::T(r) => Op::R(r),
        x => x,
    }
}
