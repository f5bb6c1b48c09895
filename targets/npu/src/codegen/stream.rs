//! Streams: loops of vector work, software-pipelined over tiles.
//!
//! A stream is a *row loop* (or a single row) whose body is a row of vector work:
//!
//! - `Let`s of scalars (one-element cells), possibly of reductions ([`Val::Reduce`], nested
//!   reductions collapsed into one when their accesses allow);
//! - stores of scalars (one element per row);
//! - vector loops: stores in perfectly nested loops, collapsed into one linear index when
//!   every access walks them with one stride.
//!
//! Every access to global memory must be affine in its vector index; its stride may be any
//! constant (0: one element per row, broadcast). Such a row is compiled once; the row loop
//! runs over tiles of `R` rows (or, for one long vector loop, over strips of `T` elements of
//! it) through three pipes:
//!
//! ```text
//! MTE2: wait(V→MTE2 empty)  DMA in tile u+1's operands (2-D: one copy for R rows)  set(MTE2→V full)
//! V:    wait(MTE2→V full) wait(MTE3→V empty)  rows of tile u  set(V→MTE2 empty) set(V→MTE3 full)
//! MTE3: wait(V→MTE3 full)   DMA out tile u's results                                set(MTE3→V empty)
//! ```
//!
//! Each operand has `slots` (two) copies in UB; the flags count, so MTE2 runs up to two tiles
//! ahead of V and MTE3 up to two behind. The scalar unit issues tile u+1's loads before tile
//! u's vector work, so the loads are not held up behind a full V queue. Operands that do not
//! depend on the row are loaded once for the whole stream; identical accesses share one copy
//! (a LayerNorm row is read from global memory once for its mean, its variance and its
//! output). Nothing computed inside a row goes back to global memory unless stored.

use super::affine::{self, Lin};
use super::{Gen, Op, R};
use crate::eval::{vbinop, vunop};
use crate::isa::{AluOp, Cond, Instr, Pipe, Reg, VRedOp, VUnOp};
use kiln_ir::kernel::{Idx, RedOp, Stmt, Val};
use std::collections::HashMap;

/// Scalar cells a stream keeps for intermediate scalars.
const CELLS: usize = 48;

/// Loop variables of the synthetic row loop of a single-row stream.
const ONE_ROW: usize = usize::MAX - 8;

/// A vector context: loop variables collapsed into one linear index (outermost first).
#[derive(Clone, Debug)]
struct Ctx {
    vars: Vec<usize>,
    /// Extents of `vars[1..]`.
    inner: Vec<i64>,
    /// Extent of `vars[0]`.
    outer: Idx,
    /// Upper bound of the length.
    max: i64,
}

impl Ctx {
    fn len(&self) -> Idx {
        let p: i64 = self.inner.iter().product();
        Idx::Mul(Box::new(self.outer.clone()), Box::new(Idx::Const(p))).simplify()
    }
}

/// A global-memory access of a row.
#[derive(Clone, Debug)]
struct Acc {
    buf: usize,
    /// The flat offset without the vector variables (and without the row variable when
    /// `row_coef` is known).
    base: Idx,
    /// Elements between consecutive rows, when affine in the row variable.
    row_coef: Option<i64>,
    /// Elements between consecutive vector elements (0: one element per row).
    stride: i64,
    /// Elements per row (the context's length, 1 when `stride` is 0).
    len: Idx,
    max_len: i64,
}

impl Acc {
    fn key(&self) -> String {
        format!("{}|{}|{:?}|{}|{}", self.buf, self.base, self.row_coef, self.stride, self.len)
    }
}

#[derive(Clone, Debug)]
struct Region {
    acc: Acc,
    /// Loaded once for the whole stream (does not depend on the row).
    resident: bool,
    /// Elements per row in UB.
    pitch: u64,
    /// UB address (in slot 0 for ring regions).
    addr: u64,
}

/// How a stream walks its rows.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Tiles of `r` rows.
    Rows { r: i64 },
    /// One row per tile and strips of `t` elements of its single vector loop, `nt` strips
    /// per row.
    Strip { t: i64, nt: i64 },
}

struct Plan {
    row: (usize, Idx),
    loads: Vec<Region>,
    stores: Vec<Region>,
    load_keys: HashMap<String, usize>,
    store_keys: HashMap<String, usize>,
    /// Vector temporaries the row needs.
    vtemps: usize,
    /// Buffers the row stores to.
    stored: Vec<usize>,
    /// The body is one vector loop over a context of constant length (strips allowed).
    strippable: Option<i64>,
    has_local: bool,
}

/// Where a value is during the vector phase.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// A vector at an address (`temp`: index of the vector temporary holding it).
    Vec(Op, Option<usize>),
    /// One element, broadcast (`cell`: index of the scalar cell holding it).
    Scal(Op, Option<usize>),
}

struct Emit {
    plan: Plan,
    mode: Mode,
    slots: u64,
    in_size: u64,
    out_size: u64,
    /// Offsets of the ring regions within a slot.
    vtemp_addr: Vec<u64>,
    vtemp_free: Vec<bool>,
    cell_addr: Vec<u64>,
    cell_free: Vec<bool>,
    flags: [u8; 4],
    /// Registers of the tile being computed: slot offsets in and out, the row in the tile,
    /// the strip start and length.
    in_off: Option<Reg>,
    out_off: Option<Reg>,
    row_in_tile: Op,
    x0: Op,
    xl: Op,
}

fn no() -> R<Option<()>> {
    Ok(None)
}

impl Gen<'_> {
    /// Compiles `s` as a stream when it has that form (`None`: it does not, nothing emitted).
    pub fn try_stream(&mut self, s: &Stmt) -> R<Option<()>> {
        let (row, body): ((usize, Idx), Vec<Stmt>) = match s {
            Stmt::For { var, extent, body, .. } => {
                // A loop whose body is one pure loop nest: the row loop may be collapsed into the
                // vector loop (no row), else the loop is the row loop.
                if pure_nest(s) && !has_reduce_stmt(s) {
                    if let Some(()) = self.stream(None, std::slice::from_ref(s))? {
                        return Ok(Some(()));
                    }
                }
                ((*var, extent.clone()), body.clone())
            }
            Stmt::Let { .. } | Stmt::Store { .. } => ((ONE_ROW, Idx::Const(1)), vec![s.clone()]),
            Stmt::Mma(_) => return no(),
        };
        self.stream(Some(row), &body)
    }

    /// A stream over `row` (None: one row) of `body`; rolls back and returns `None` when
    /// the body is not a row of vector work or does not fit.
    fn stream(&mut self, row: Option<(usize, Idx)>, body: &[Stmt]) -> R<Option<()>> {
        let snap = self.snapshot();
        let row = row.unwrap_or((ONE_ROW, Idx::Const(1)));
        match self.stream_inner(row, body) {
            Ok(Some(())) => Ok(Some(())),
            Ok(None) | Err(crate::NpuError::Unsupported(_)) | Err(crate::NpuError::DoesNotFit { .. }) => {
                self.rollback(snap);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn stream_inner(&mut self, row: (usize, Idx), body: &[Stmt]) -> R<Option<()>> {
        let old_range = self.ranges.insert(row.0, self.upper(&row.1).max(1));
        let plan = self.plan(row.clone(), body);
        let r = match plan? {
            Some(plan) => self.emit_stream(plan, body),
            None => Ok(None),
        };
        super::restore(&mut self.ranges, row.0, old_range);
        r
    }

    // ---- analysis ---------------------------------------------------------------------------

    fn plan(&mut self, row: (usize, Idx), body: &[Stmt]) -> R<Option<Plan>> {
        let mut plan = Plan {
            row,
            loads: Vec::new(),
            stores: Vec::new(),
            load_keys: HashMap::new(),
            store_keys: HashMap::new(),
            vtemps: 1,
            stored: Vec::new(),
            strippable: None,
            has_local: false,
        };
        for s in body {
            if !self.plan_stmt(&mut plan, s)? {
                return Ok(None);
            }
        }
        // A body of one vector loop of constant length can be cut into strips.
        if let [s @ Stmt::For { .. }] = body {
            let ctx = self.nest_ctx(s);
            if let Some((ctx, _)) = ctx {
                if let Idx::Const(n) = ctx.len() {
                    plan.strippable = Some(n);
                }
            }
        }
        // A buffer both loaded and stored: every access the same, and rows disjoint.
        for &b in &plan.stored {
            let loads: Vec<&Region> = plan.loads.iter().filter(|r| r.acc.buf == b).collect();
            if loads.is_empty() {
                continue;
            }
            let stores: Vec<&Region> = plan.stores.iter().filter(|r| r.acc.buf == b).collect();
            if stores.len() != 1 || loads.len() != 1 || loads[0].acc.key() != stores[0].acc.key() {
                return Ok(None);
            }
            let a = &stores[0].acc;
            let disjoint = match a.row_coef {
                Some(c) => c.abs() >= (a.stride.abs() * a.max_len).max(1),
                None => false,
            };
            if !disjoint && !plan.row.1.eq(&Idx::Const(1)) {
                return Ok(None);
            }
        }
        Ok(Some(plan))
    }

    /// The vector context of a pure loop nest and its innermost body (the stores).
    fn nest_ctx<'s>(&self, s: &'s Stmt) -> Option<(Ctx, &'s [Stmt])> {
        let mut vars = Vec::new();
        let mut extents = Vec::new();
        let mut at = s;
        loop {
            let Stmt::For { var, extent, body, .. } = at else { return None };
            vars.push(*var);
            extents.push(extent.clone());
            match body.as_slice() {
                [inner @ Stmt::For { .. }] => at = inner,
                stores if stores.iter().all(|b| matches!(b, Stmt::Store { .. })) => {
                    let mut inner = Vec::new();
                    for e in &extents[1..] {
                        match e {
                            Idx::Const(c) => inner.push(*c),
                            _ => return None,
                        }
                    }
                    let outer = extents[0].clone();
                    let max = self.upper(&outer).saturating_mul(inner.iter().product::<i64>().max(1));
                    return Some((Ctx { vars, inner, outer, max }, stores));
                }
                _ => return None,
            }
        }
    }

    /// Binds the context's variables' ranges; returns the previous ones.
    fn bind_ctx(&mut self, ctx: &Ctx) -> Vec<(usize, Option<i64>)> {
        let mut old = Vec::new();
        for (k, v) in ctx.vars.iter().enumerate() {
            let hi = if k == 0 { self.upper(&ctx.outer) } else { ctx.inner[k - 1] };
            old.push((*v, self.ranges.insert(*v, hi.max(1))));
        }
        old
    }

    fn unbind(&mut self, old: Vec<(usize, Option<i64>)>) {
        for (v, o) in old.into_iter().rev() {
            super::restore(&mut self.ranges, v, o);
        }
    }

    fn plan_stmt(&mut self, plan: &mut Plan, s: &Stmt) -> R<bool> {
        match s {
            Stmt::Let { value, .. } => self.plan_val(plan, value, None),
            Stmt::Store { buf, index, value } => {
                if !self.plan_val(plan, value, None)? {
                    return Ok(false);
                }
                self.plan_store(plan, *buf, index, None)
            }
            Stmt::For { .. } => {
                let Some((ctx, stores)) = self.nest_ctx(s) else { return Ok(false) };
                let old = self.bind_ctx(&ctx);
                let mut ok = true;
                for st in stores {
                    let Stmt::Store { buf, index, value } = st else { continue };
                    ok = ok
                        && !has_reduce(value)
                        && self.plan_val(plan, value, Some(&ctx))?
                        && self.plan_store(plan, *buf, index, Some(&ctx))?;
                }
                self.unbind(old);
                Ok(ok)
            }
            Stmt::Mma(_) => Ok(false),
        }
    }

    fn plan_store(&mut self, plan: &mut Plan, buf: usize, index: &[Idx], ctx: Option<&Ctx>) -> R<bool> {
        if buf >= self.nparams() {
            plan.has_local = true;
            return Ok(self.local_access(buf, index, ctx, &plan.row).is_some_and(|(_, s)| s == 1 || ctx.is_none()));
        }
        let Some(acc) = self.classify(buf, index, ctx, &plan.row) else { return Ok(false) };
        if ctx.is_some() && acc.stride == 0 {
            // Every element of the loop stores to one place.
            return Ok(false);
        }
        let key = acc.key();
        if !plan.store_keys.contains_key(&key) {
            plan.store_keys.insert(key, plan.stores.len());
            plan.stores.push(Region { acc, resident: false, pitch: 0, addr: 0 });
        }
        if !plan.stored.contains(&buf) {
            plan.stored.push(buf);
        }
        Ok(true)
    }

    /// Checks a value and records its loads; `ctx`: the vector context it is evaluated in.
    fn plan_val(&mut self, plan: &mut Plan, v: &Val, ctx: Option<&Ctx>) -> R<bool> {
        Ok(match v {
            Val::Const(_) | Val::Scalar(_) => true,
            Val::Load { buf, index } => {
                if *buf >= self.nparams() {
                    plan.has_local = true;
                    return Ok(self.local_access(*buf, index, ctx, &plan.row).is_some_and(|(_, s)| s <= 1));
                }
                let Some(acc) = self.classify(*buf, index, ctx, &plan.row) else { return Ok(false) };
                let key = acc.key();
                if !plan.load_keys.contains_key(&key) {
                    plan.load_keys.insert(key, plan.loads.len());
                    plan.loads.push(Region { acc, resident: false, pitch: 0, addr: 0 });
                }
                true
            }
            Val::Un(_, x) => {
                plan.vtemps = plan.vtemps.max(self.need(x, ctx).max(1));
                self.plan_val(plan, x, ctx)?
            }
            Val::Bin(_, a, b) => {
                plan.vtemps = plan.vtemps.max(self.need(v, ctx));
                self.plan_val(plan, a, ctx)? && self.plan_val(plan, b, ctx)?
            }
            Val::FromIdx(i) => match ctx {
                Some(c) if c.vars.iter().any(|x| affine::mentions(i, *x)) => {
                    c.vars.len() == 1 && !affine::lin(i, &self.ranges).opaque_in(c.vars[0])
                }
                _ => true,
            },
            Val::Reduce { .. } => {
                if ctx.is_some() {
                    return Ok(false);
                }
                let Some((rctx, body)) = self.reduce_ctx(v) else { return Ok(false) };
                let old = self.bind_ctx(&rctx);
                plan.vtemps = plan.vtemps.max(self.need(body, Some(&rctx)).max(1));
                let ok = !has_reduce(body) && self.plan_val(plan, body, Some(&rctx))?;
                // Every access of the body must walk the collapsed variables with one stride.
                self.unbind(old);
                ok
            }
            Val::IfLess { .. } | Val::Select { .. } => false,
        })
    }

    /// The context of a reduction (nested reductions of the same op collapsed) and its body.
    fn reduce_ctx<'v>(&self, v: &'v Val) -> Option<(Ctx, &'v Val)> {
        let Val::Reduce { op, var, extent, body } = v else { return None };
        let mut vars = vec![*var];
        let mut inner = Vec::new();
        let mut at: &Val = body;
        while let Val::Reduce { op: o, var, extent: Idx::Const(e), body } = at {
            if o != op {
                break;
            }
            vars.push(*var);
            inner.push(*e);
            at = body;
        }
        let max = self.upper(extent).saturating_mul(inner.iter().product::<i64>().max(1));
        Some((Ctx { vars, inner, outer: extent.clone(), max }, at))
    }

    /// Vector temporaries needed to evaluate `v` (conservative).
    fn need(&self, v: &Val, ctx: Option<&Ctx>) -> usize {
        if ctx.is_none() {
            return 0;
        }
        match v {
            Val::Un(_, x) => self.need(x, ctx).max(1),
            Val::Bin(_, a, b) => self.need(a, ctx).max(1 + self.need(b, ctx)).max(1),
            Val::FromIdx(_) => 1,
            _ => 0,
        }
    }

    /// A global-memory access, or `None` when it is not affine in the vector index.
    fn classify(&self, buf: usize, index: &[Idx], ctx: Option<&Ctx>, row: &(usize, Idx)) -> Option<Acc> {
        let l = affine::flat(index, &self.shapes[buf], &self.ranges);
        let stride = match ctx {
            Some(c) => ctx_stride(&l, c)?,
            None => 0,
        };
        let ctx_vars: Vec<usize> = ctx.map_or(Vec::new(), |c| c.vars.clone());
        let (len, max_len) = match (ctx, stride) {
            (Some(c), s) if s != 0 => (c.len(), c.max),
            _ => (Idx::Const(1), 1),
        };
        let (rv, _) = row;
        let (base, row_coef) = if l.opaque_in(*rv) {
            (l.to_idx(&ctx_vars), None)
        } else {
            let mut skip = ctx_vars.clone();
            skip.push(*rv);
            (l.to_idx(&skip), Some(l.coef(*rv)))
        };
        Some(Acc { buf, base, row_coef, stride, len, max_len })
    }

    /// A local's access: its offset without the vector variables and its stride.
    fn local_access(&self, buf: usize, index: &[Idx], ctx: Option<&Ctx>, _row: &(usize, Idx)) -> Option<(Idx, i64)> {
        let l = affine::flat(index, &self.shapes[buf], &self.ranges);
        let stride = match ctx {
            Some(c) => ctx_stride(&l, c)?,
            None => 0,
        };
        let vars: Vec<usize> = ctx.map_or(Vec::new(), |c| c.vars.clone());
        Some((l.to_idx(&vars), stride))
    }

    // ---- sizing and emission ----------------------------------------------------------------

    fn emit_stream(&mut self, mut plan: Plan, body: &[Stmt]) -> R<Option<()>> {
        let vl = self.vl as usize;
        let align = self.ub.align;
        let slots = self.opts.slots.max(1) as u64;
        let (row_var, row_extent) = plan.row.clone();
        let nrows_max = self.upper(&row_extent).max(1);
        // Loads that do not depend on the row are resident (in strips, only those that do not
        // depend on the strip either).
        let uniform = |r: &Region| r.acc.row_coef == Some(0) && !affine::mentions(&r.acc.len, row_var);
        for r in &mut plan.loads {
            r.resident = uniform(r);
        }
        let path_in = self.cfg.path(0, vl).ok_or_else(|| super::unsupported("no DMA path into the vector level"))?;
        let (lat, bw) = (path_in.latency_cycles as f64, path_in.bytes_per_cycle);
        let free = self.ub.cap.saturating_sub(self.ub.top.next_multiple_of(align));
        let cells = CELLS as u64;
        // Try whole rows first.
        let pitch_of = |r: &Region| if r.acc.max_len <= 1 { 1 } else { (r.acc.max_len as u64).next_multiple_of(align) };
        let max_len = plan.loads.iter().chain(&plan.stores).map(|r| r.acc.max_len).max().unwrap_or(1).max(1);
        let resident: u64 = plan.loads.iter().filter(|r| r.resident).map(|r| pitch_of(r) + align).sum();
        let per_row: u64 = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident).map(pitch_of).sum();
        let regions = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident).count() as u64;
        let temps = plan.vtemps as u64 * (max_len as u64).next_multiple_of(align);
        let fixed = resident + temps + cells + 4 * align + 2 * slots * regions * align;
        let rows_fit = if per_row == 0 { nrows_max } else { (free.saturating_sub(fixed) / (slots * per_row)) as i64 };
        let bytes_row: u64 =
            plan.loads.iter().filter(|r| !r.resident).map(|r| r.acc.max_len.max(1) as u64 * 4).sum::<u64>().max(1);
        let target = ((4.0 * lat * bw) / bytes_row as f64).ceil().max(1.0) as i64;
        let mode = match plan.strippable {
            Some(n) if rows_fit < 1 || nrows_max == 1 => {
                for r in &mut plan.loads {
                    r.resident = uniform(r) && r.acc.stride == 0;
                }
                let resident: u64 = plan.loads.iter().filter(|r| r.resident).map(|r| pitch_of(r) + align).sum();
                let regions = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident).count() as u64;
                // Strips of T elements: every ring region holds T per slot.
                let vec_regions = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident && r.acc.max_len > 1);
                let per_elem = slots * vec_regions.count() as u64 + plan.vtemps as u64;
                let scal = plan.loads.iter().chain(&plan.stores).filter(|r| !r.resident && r.acc.max_len <= 1).count();
                let fixed = resident
                    + cells
                    + 4 * align
                    + 2 * slots * (regions + plan.vtemps as u64) * align
                    + slots * scal as u64;
                let fit = free.saturating_sub(fixed) / per_elem.max(1);
                let in_vec = plan.loads.iter().filter(|r| !r.resident && r.acc.max_len > 1).count().max(1);
                let want = ((4.0 * lat * bw) / (4.0 * in_vec as f64)).ceil() as u64;
                let lanes = self.cfg.lanes();
                let mut t = fit.min(want.max(lanes * 16)).min(n.max(1) as u64);
                if t < n as u64 {
                    t = t / lanes.max(1) * lanes;
                }
                if t == 0 {
                    return Err(self.does_not_fit(vl, (fixed + per_elem * lanes) * 4));
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
            Some(t) if r.acc.max_len > 1 => t.next_multiple_of(align),
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
        let mut cell_addr = Vec::new();
        let cells_at = self.ub_alloc(cells)?;
        for i in 0..cells {
            cell_addr.push(cells_at + i);
        }
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
        };
        self.pipeline(&mut e, body)?;
        // Every flag is balanced once the epilogue's waits have run; the next part starts
        // after a barrier.
        self.free_flags();
        Ok(Some(()))
    }

    /// The tile loop with its prologue and epilogue.
    fn pipeline(&mut self, e: &mut Emit, body: &[Stmt]) -> R<()> {
        let [full_in, empty_in, full_out, empty_out] = e.flags;
        let ring_in = e.in_size > 0;
        let ring_out = e.out_size > 0;
        let has_resident = e.plan.loads.iter().any(|r| r.resident);
        let m = self.mark();
        // Tiles.
        let nrows = self.sidx(&e.plan.row.1.clone())?;
        let ntiles = match e.mode {
            Mode::Rows { r } => {
                let t = self.alu_ops(AluOp::Add, nrows, Op::K(r - 1))?;
                self.alu_ops(AluOp::Div, t, Op::K(r))?
            }
            Mode::Strip { nt, .. } => self.alu_ops(AluOp::Mul, nrows, Op::K(nt))?,
        };
        let ntiles = match ntiles {
            Op::T(r) => Op::R(r),
            x => x,
        };
        if let Op::K(n) = ntiles {
            if n <= 0 {
                self.reset(m);
                return Ok(());
            }
        }
        let end = self.label();
        let nt_reg = self.in_reg(ntiles)?;
        let zero = self.konst(0)?;
        if !matches!(ntiles, Op::K(_)) {
            self.branch(Instr::Branch { cond: Cond::Ge, ra: zero, rb: nt_reg, target: 0 }, end);
        }
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
        let u = self.reg()?;
        self.li(u, 0)?;
        if ring_in {
            self.tile_loads(e, Op::R(u))?;
        }
        let top = self.label();
        self.bind(top);
        if ring_in {
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
        for _ in 0..e.slots {
            if ring_in {
                self.emit(Instr::WaitFlag { src: Pipe::V, dst: Pipe::Mte2, id: empty_in });
            }
            if ring_out {
                self.emit(Instr::WaitFlag { src: Pipe::Mte3, dst: Pipe::V, id: empty_out });
            }
        }
        let _ = full_out;
        self.reset(m);
        Ok(())
    }

    /// Binds the tile's rows: returns (first row, rows in the tile) for row tiles, or sets
    /// the strip start and length and binds the row variable for strips.
    fn tile_geometry(&mut self, e: &mut Emit, u: Op) -> R<(Op, Op)> {
        let nrows = self.sidx(&e.plan.row.1.clone())?;
        match e.mode {
            Mode::Rows { r } => {
                let row0 = self.alu_ops(AluOp::Mul, u, Op::K(r))?;
                let row0 = pin(row0);
                let left = self.alu_ops(AluOp::Sub, nrows, row0)?;
                let nr = self.alu_ops(AluOp::Min, left, Op::K(r))?;
                Ok((row0, pin(nr)))
            }
            Mode::Strip { t, nt } => {
                let n = nt * t;
                let _ = n;
                let row = self.alu_ops(AluOp::Div, u, Op::K(nt))?;
                let row = pin(row);
                let strip = self.alu_ops(AluOp::Rem, u, Op::K(nt))?;
                let x0 = self.alu_ops(AluOp::Mul, strip, Op::K(t))?;
                let x0 = pin(x0);
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
    fn slot_off(&mut self, e: &Emit, u: Op, size: u64) -> R<Op> {
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
            self.region_dma(e, r, true, row0, nr, off)?;
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
            self.region_dma(e, r, false, row0, nr, off)?;
        }
        self.emit(Instr::SetFlag { src: Pipe::Mte3, dst: Pipe::V, id: empty_out });
        self.reset(m);
        Ok(())
    }

    /// The DMA of one ring region for a tile (`row0`, `nr` rows; or the strip).
    fn region_dma(&mut self, e: &mut Emit, r: &Region, to_ub: bool, row0: Op, nr: Op, off: Op) -> R<()> {
        let (row_var, _) = e.plan.row.clone();
        let gm = self.gm[r.acc.buf] as i64;
        let ub = self.alu_ops(AluOp::Add, off, Op::K(r.addr as i64))?;
        let ub = pin(ub);
        if let Mode::Strip { .. } = e.mode {
            // One row (`row0` is the row), elements [x0, x0 + xl).
            let old = self.vars.get(&row_var).copied();
            let rr = self.in_reg(row0)?;
            self.vars.insert(row_var, rr);
            let base = self.sidx(&r.acc.base)?;
            let mut src = self.alu_ops(AluOp::Add, base, Op::K(gm))?;
            if let Some(c) = r.acc.row_coef {
                let t = self.alu_ops(AluOp::Mul, row0, Op::K(c))?;
                src = self.alu_ops(AluOp::Add, src, t)?;
            }
            let len = if r.acc.max_len > 1 {
                let t = self.alu_ops(AluOp::Mul, e.x0, Op::K(r.acc.stride))?;
                src = self.alu_ops(AluOp::Add, src, t)?;
                e.xl
            } else {
                Op::K(1)
            };
            self.dma_run(to_ub, src, ub, len, r.acc.stride)?;
            super::restore(&mut self.vars, row_var, old);
            return Ok(());
        }
        let uniform = !affine::mentions(&r.acc.len, row_var);
        match r.acc.row_coef {
            Some(c) if uniform && (r.acc.stride == 1 || r.acc.max_len <= 1) => {
                // One 2-D copy: `nr` bursts of `len`, `c` apart in global memory, `pitch` in UB.
                let base = self.sidx(&r.acc.base)?;
                let src = self.alu_ops(AluOp::Add, base, Op::K(gm))?;
                let t = self.alu_ops(AluOp::Mul, row0, Op::K(c))?;
                let src = self.alu_ops(AluOp::Add, src, t)?;
                let len = self.sidx(&r.acc.len)?;
                let (len, pitch) = if r.acc.max_len <= 1 { (Op::K(1), 1) } else { (len, r.pitch as i64) };
                let (src, ub, n, len, gs, us) = (
                    self.in_reg(src)?,
                    self.in_reg(ub)?,
                    self.in_reg(nr)?,
                    self.in_reg(len)?,
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
            }
            _ => {
                // Row by row.
                let i = usize::MAX - 2;
                let pitch = r.pitch as i64;
                let acc = r.acc.clone();
                let rows = match e.mode {
                    Mode::Rows { r } => r,
                    Mode::Strip { .. } => 1,
                };
                self.loop_op(i, nr, rows, |g| {
                    let ir = g.vars[&i];
                    let row = g.alu_ops(AluOp::Add, row0, Op::R(ir))?;
                    let row = pin(row);
                    let old = g.vars.get(&row_var).copied();
                    let rr = g.in_reg(row)?;
                    g.vars.insert(row_var, rr);
                    let base = g.sidx(&acc.base)?;
                    let mut src = g.alu_ops(AluOp::Add, base, Op::K(gm))?;
                    if let Some(c) = acc.row_coef {
                        let t = g.alu_ops(AluOp::Mul, row, Op::K(c))?;
                        src = g.alu_ops(AluOp::Add, src, t)?;
                    }
                    let len = if acc.max_len > 1 { g.sidx(&acc.len)? } else { Op::K(1) };
                    let t = g.alu_ops(AluOp::Mul, Op::R(ir), Op::K(pitch))?;
                    let at = g.alu_ops(AluOp::Add, t, ub)?;
                    g.dma_run(to_ub, src, at, len, acc.stride)?;
                    super::restore(&mut g.vars, row_var, old);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// V's part of tile `u`: every row of it.
    fn tile_compute(&mut self, e: &mut Emit, u: Op, body: &[Stmt]) -> R<()> {
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
        let (row_var, _) = e.plan.row.clone();
        let i = usize::MAX - 3;
        let strip = matches!(e.mode, Mode::Strip { .. });
        let rows = match e.mode {
            Mode::Rows { r } => r,
            Mode::Strip { .. } => 1,
        };
        self.loop_op(i, nr, rows, |g| {
            let ir = g.vars[&i];
            let row = if strip { row0 } else { g.alu_ops(AluOp::Add, row0, Op::R(ir))? };
            let row = pin(row);
            let old = g.vars.get(&row_var).copied();
            let rr = g.in_reg(row)?;
            g.vars.insert(row_var, rr);
            e.row_in_tile = Op::R(ir);
            for s in body {
                let (m, ub) = (g.mark(), g.ub.top);
                g.row_stmt(e, s)?;
                g.reset(m);
                g.ub.top = ub;
            }
            super::restore(&mut g.vars, row_var, old);
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

    fn row_stmt(&mut self, e: &mut Emit, s: &Stmt) -> R<()> {
        match s {
            Stmt::Let { slot, value } => {
                let at = self.slots.get(slot).copied().ok_or_else(|| super::unsupported("slot without a cell"))?;
                let v = self.vexpr(e, value, None, None)?;
                self.put(e, v, Op::K(at as i64), Op::K(1))?;
                self.release(e, v);
            }
            Stmt::Store { buf, index, value } => {
                let dest = self.dest(e, *buf, index, None)?;
                let dest = pin(dest);
                let v = self.vexpr(e, value, None, Some(dest))?;
                self.put(e, v, dest, Op::K(1))?;
                self.release(e, v);
            }
            Stmt::For { .. } => {
                let (ctx, stores) = self.nest_ctx(s).ok_or_else(|| super::unsupported("not a loop nest"))?;
                let old = self.bind_ctx(&ctx);
                let len = match e.mode {
                    Mode::Strip { .. } => e.xl,
                    Mode::Rows { .. } => {
                        let l = self.sidx(&ctx.len())?;
                        pin(l)
                    }
                };
                for st in stores {
                    let Stmt::Store { buf, index, value } = st else { continue };
                    let m = self.mark();
                    let dest = self.dest(e, *buf, index, Some(&ctx))?;
                    let dest = pin(dest);
                    let direct = *buf < self.nparams() || !reads(value, *buf);
                    let v = self.vexpr(e, value, Some((&ctx, len)), direct.then_some(dest))?;
                    self.put(e, v, dest, len)?;
                    self.release(e, v);
                    self.reset(m);
                }
                self.unbind(old);
            }
            Stmt::Mma(_) => return Err(super::unsupported("Mma in a stream")),
        }
        Ok(())
    }

    /// Where a store writes: its region's row (global memory) or the local's elements.
    fn dest(&mut self, e: &Emit, buf: usize, index: &[Idx], ctx: Option<&Ctx>) -> R<Op> {
        if buf >= self.nparams() {
            let (base, _) =
                self.local_access(buf, index, ctx, &e.plan.row).ok_or_else(|| super::unsupported("local access"))?;
            let b = self.sidx(&base)?;
            let b = self.alu_ops(AluOp::Add, b, Op::K(self.locals[buf - self.nparams()] as i64))?;
            return self.alu_ops(AluOp::Add, b, e.x0);
        }
        let acc = self.classify(buf, index, ctx, &e.plan.row).ok_or_else(|| super::unsupported("store access"))?;
        let r = e.plan.stores[e.plan.store_keys[&acc.key()]].clone();
        self.region_row(e, &r, true)
    }

    /// Writes `v` to `dest` (`n` elements) unless it is there already.
    fn put(&mut self, _e: &Emit, v: Loc, dest: Op, n: Op) -> R<()> {
        match v {
            Loc::Vec(a, _) if a == dest => Ok(()),
            Loc::Vec(a, _) => self.vun(VUnOp::Mov, dest, a, n, false),
            Loc::Scal(a, _) if a == dest && n == Op::K(1) => Ok(()),
            Loc::Scal(a, _) => self.vun(VUnOp::Mov, dest, a, n, true),
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
        let i = e.vtemp_free.iter().position(|f| *f).ok_or_else(|| super::unsupported("out of vector temporaries"))?;
        e.vtemp_free[i] = false;
        Ok(Loc::Vec(Op::K(e.vtemp_addr[i] as i64), Some(i)))
    }

    fn scell(&mut self, e: &mut Emit) -> R<Loc> {
        let i = e.cell_free.iter().position(|f| *f).ok_or_else(|| super::unsupported("out of scalar cells"))?;
        e.cell_free[i] = false;
        Ok(Loc::Scal(Op::K(e.cell_addr[i] as i64), Some(i)))
    }

    /// A result location for an op on `a` (and `b`): `dest` if given, else a temporary it
    /// may reuse.
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

    /// Evaluates `v` in the context `ctx` (with its length), into `dest` when it is a vector
    /// op at the root.
    fn vexpr(&mut self, e: &mut Emit, v: &Val, ctx: Option<(&Ctx, Op)>, dest: Option<Op>) -> R<Loc> {
        Ok(match v {
            Val::Const(c) => Loc::Scal(Op::K(self.const_cell(*c)? as i64), None),
            Val::Scalar(s) => {
                Loc::Scal(Op::K(self.slots.get(s).copied().ok_or_else(|| super::unsupported("slot"))? as i64), None)
            }
            Val::Load { buf, index } => {
                let c = ctx.map(|c| c.0);
                if *buf >= self.nparams() {
                    let (base, stride) = self
                        .local_access(*buf, index, c, &e.plan.row)
                        .ok_or_else(|| super::unsupported("local access"))?;
                    let b = self.sidx(&base)?;
                    let a = self.alu_ops(AluOp::Add, b, Op::K(self.locals[buf - self.nparams()] as i64))?;
                    if stride == 0 {
                        return Ok(Loc::Scal(pin(a), None));
                    }
                    let a = self.alu_ops(AluOp::Add, a, e.x0)?;
                    return Ok(Loc::Vec(pin(a), None));
                }
                let acc =
                    self.classify(*buf, index, c, &e.plan.row).ok_or_else(|| super::unsupported("load access"))?;
                let r = e.plan.loads[e.plan.load_keys[&acc.key()]].clone();
                let a = self.region_row(e, &r, false)?;
                if acc.stride == 0 {
                    Loc::Scal(pin(a), None)
                } else {
                    Loc::Vec(pin(a), None)
                }
            }
            Val::FromIdx(i) => match ctx {
                Some((c, len)) if c.vars.iter().any(|x| affine::mentions(i, *x)) => {
                    let l: Lin = affine::lin(i, &self.ranges);
                    let step = l.coef(c.vars[0]);
                    let start = self.sidx(&l.to_idx(&c.vars))?;
                    let t = self.alu_ops(AluOp::Mul, e.x0, Op::K(step))?;
                    let start = self.alu_ops(AluOp::Add, start, t)?;
                    let d = self.result(e, true, dest, &[])?;
                    let Loc::Vec(da, _) = d else { unreachable!() };
                    let (dr, sr, st, n) =
                        (self.in_reg(da)?, self.in_reg(start)?, self.in_reg(Op::K(step))?, self.in_reg(len)?);
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
                let a = self.vexpr(e, x, ctx, None)?;
                let vector = matches!(a, Loc::Vec(..));
                let d = self.result(e, vector, dest, &[a])?;
                let (da, n) = match d {
                    Loc::Vec(a, _) => (a, ctx.map_or(Op::K(1), |c| c.1)),
                    Loc::Scal(a, _) => (a, Op::K(1)),
                };
                let aa = loc_addr(a);
                self.vun(vunop(*op), da, aa, n, false)?;
                free_other(e, a, d);
                d
            }
            Val::Bin(op, x, y) => {
                let a = self.vexpr(e, x, ctx, None)?;
                let b = self.vexpr(e, y, ctx, None)?;
                let vector = matches!(a, Loc::Vec(..)) || matches!(b, Loc::Vec(..));
                let d = self.result(e, vector, dest, &[a, b])?;
                let (da, n) = match d {
                    Loc::Vec(a, _) => (a, ctx.map_or(Op::K(1), |c| c.1)),
                    Loc::Scal(a, _) => (a, Op::K(1)),
                };
                let (sa, sb) = (vector && matches!(a, Loc::Scal(..)), vector && matches!(b, Loc::Scal(..)));
                self.vbin(vbinop(*op), da, loc_addr(a), loc_addr(b), n, sa, sb)?;
                free_other(e, a, d);
                free_other(e, b, d);
                d
            }
            Val::Reduce { op, .. } => {
                let (rctx, body) = self.reduce_ctx(v).ok_or_else(|| super::unsupported("reduce"))?;
                let old = self.bind_ctx(&rctx);
                let len = self.sidx(&rctx.len())?;
                let len = pin(len);
                let x = self.vexpr(e, body, Some((&rctx, len)), None)?;
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
            Val::IfLess { .. } | Val::Select { .. } => return Err(super::unsupported("a condition in a stream")),
        })
    }
}

fn vred(op: RedOp) -> VRedOp {
    match op {
        RedOp::Sum => VRedOp::Sum,
        RedOp::Max => VRedOp::Max,
        RedOp::Min => VRedOp::Min,
    }
}

fn loc_addr(l: Loc) -> Op {
    match l {
        Loc::Vec(a, _) | Loc::Scal(a, _) => a,
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

/// A temporary operand made read-only (it must survive later temporaries).
fn pin(o: Op) -> Op {
    match o {
        Op::T(r) => Op::R(r),
        x => x,
    }
}

/// The stride of an access along a context's linear index, when the context's variables
/// collapse for it.
fn ctx_stride(l: &Lin, ctx: &Ctx) -> Option<i64> {
    if ctx.vars.iter().any(|v| l.opaque_in(*v)) {
        return None;
    }
    let c: Vec<i64> = ctx.vars.iter().map(|v| l.coef(*v)).collect();
    for k in 0..c.len() - 1 {
        if c[k] != c[k + 1] * ctx.inner[k] {
            return None;
        }
    }
    c.last().copied()
}

/// Whether `v` loads from buffer `buf`.
fn reads(v: &Val, buf: usize) -> bool {
    match v {
        Val::Load { buf: b, .. } => *b == buf,
        Val::Const(_) | Val::Scalar(_) | Val::FromIdx(_) => false,
        Val::Un(_, x) => reads(x, buf),
        Val::Bin(_, a, b) => reads(a, buf) || reads(b, buf),
        Val::Reduce { body, .. } => reads(body, buf),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => reads(then, buf) || reads(other, buf),
    }
}

fn has_reduce(v: &Val) -> bool {
    match v {
        Val::Reduce { .. } => true,
        Val::Const(_) | Val::Scalar(_) | Val::Load { .. } | Val::FromIdx(_) => false,
        Val::Un(_, x) => has_reduce(x),
        Val::Bin(_, a, b) => has_reduce(a) || has_reduce(b),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => has_reduce(then) || has_reduce(other),
    }
}

fn has_reduce_stmt(s: &Stmt) -> bool {
    match s {
        Stmt::For { body, .. } => body.iter().any(has_reduce_stmt),
        Stmt::Store { value, .. } | Stmt::Let { value, .. } => has_reduce(value),
        Stmt::Mma(_) => true,
    }
}

/// Whether `s` is a perfect nest of loops around stores only.
fn pure_nest(s: &Stmt) -> bool {
    match s {
        Stmt::For { body, .. } => match body.as_slice() {
            [inner @ Stmt::For { .. }] => pure_nest(inner),
            stores => !stores.is_empty() && stores.iter().all(|b| matches!(b, Stmt::Store { .. })),
        },
        _ => false,
    }
}

impl Emit {
    #[allow(dead_code)]
    fn describe(&self) -> String {
        format!("{:?}", self.mode)
    }
}
