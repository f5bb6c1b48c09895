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
//! constant (0: one element per row, broadcast). Conditions ([`Val::IfLess`],
//! [`Val::Select`]) must be affine in the vector index too: each splits the lanes into a
//! range that takes one branch and a range that takes the other, and each branch (its loads
//! included) runs on its own lanes only, so a branch that would read out of bounds never
//! does (Concat, padding). Reductions of a few constant taps inside a vector loop (pooling
//! windows) are unrolled into the loop's expression.
//!
//! Such a row is compiled once; the row loop runs over tiles of `R` rows (or, for one long
//! vector loop, over strips of `T` elements of it) through three pipes:
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

mod pipeline;
mod vexpr;

use super::affine::{self, Lin};
use super::{Gen, Op, R};
use kiln_ir::kernel::{BinOp, Idx, RedOp, Stmt, Val};
use std::collections::HashMap;

/// Scalar cells a stream keeps for intermediate scalars.
const CELLS: usize = 48;

/// Loop variables of the synthetic row loop of a single-row stream.
const ONE_ROW: usize = usize::MAX - 8;

/// Reductions inside a vector loop with at most this many taps are unrolled.
const UNROLL_TAPS: i64 = 32;

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
        let p: i64 = self.inner.iter().fold(1i64, |a, x| a.saturating_mul(*x));
        Idx::Mul(Box::new(self.outer.clone()), Box::new(Idx::Const(p))).simplify()
    }
}

/// A condition on the lanes of a context: `base + s·x < 0` for lane `x` (the branch taken
/// when it holds, or the other).
#[derive(Clone, Debug, PartialEq)]
struct Guard {
    base: Idx,
    s: i64,
    taken: bool,
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
    /// The conditions of the branches the access is in: only their lanes are moved.
    guards: Vec<Guard>,
}

impl Acc {
    fn key(&self) -> String {
        let g: Vec<String> = self.guards.iter().map(|g| format!("{}:{}:{}", g.base, g.s, g.taken)).collect();
        format!("{}|{}|{:?}|{}|{}|{}", self.buf, self.base, self.row_coef, self.stride, self.len, g.join(","))
    }
}

#[derive(Clone, Debug)]
struct Region {
    acc: Acc,
    /// Loaded once for the whole stream (does not depend on the row).
    resident: bool,
    /// An accumulator: every row loads and stores it, so it stays in UB for the whole
    /// stream (loaded before the first tile, stored after the last).
    accum: bool,
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
    /// The longest vector context (temporaries hold one).
    ctx_max: i64,
    /// Vector subexpressions the row computes more than once (keyed by [`shared_key`]): each
    /// is computed once per row into its own UB region.
    shared: HashMap<String, usize>,
}

/// Where a value is during the vector phase: the address of the tile's first lane.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// A vector (`temp`: index of the vector temporary holding it).
    Vec(Op, Option<usize>),
    /// One element, broadcast (`cell`: index of the scalar cell holding it).
    Scal(Op, Option<usize>),
}

/// The lanes an evaluation covers: `n` lanes from `off` (relative to the tile's first lane)
/// whose absolute index in the context is `lo`.
#[derive(Clone, Copy, Debug)]
struct Lanes {
    off: Op,
    n: Op,
    lo: Op,
}

struct Emit {
    plan: Plan,
    mode: Mode,
    slots: u64,
    in_size: u64,
    out_size: u64,
    vtemp_addr: Vec<u64>,
    vtemp_free: Vec<bool>,
    cell_addr: Vec<u64>,
    cell_free: Vec<bool>,
    flags: [u8; 4],
    /// Registers of the tile being computed: slot offsets in and out, the row in the tile,
    /// the strip start and length.
    in_off: Option<super::Reg>,
    out_off: Option<super::Reg>,
    row_in_tile: Op,
    x0: Op,
    xl: Op,
    /// The conditions around the value being evaluated (as planned for its loads).
    guards: Vec<Guard>,
    /// UB regions of the shared subexpressions, and those computed for the current row.
    shared_addr: Vec<u64>,
    row_cache: std::collections::HashSet<usize>,
}

impl Gen<'_> {
    /// Compiles `s` as a stream when it has that form (`None`: it does not, nothing emitted).
    pub fn try_stream(&mut self, s: &Stmt) -> R<Option<()>> {
        let s = &unroll_stmt(s);
        let (row, body): ((usize, Idx), Vec<Stmt>) = match s {
            Stmt::For { var, extent, body, .. } => {
                // A pure loop nest may collapse into one vector loop (no row loop); else the
                // loop is the row loop.
                if pure_nest(s) && !has_reduce_stmt(s) {
                    if let Some(()) = self.stream(None, std::slice::from_ref(s))? {
                        return Ok(Some(()));
                    }
                }
                ((*var, extent.clone()), body.clone())
            }
            Stmt::Let { .. } | Stmt::Store { .. } => ((ONE_ROW, Idx::Const(1)), vec![s.clone()]),
            Stmt::Mma(_) => return Ok(None),
        };
        self.stream(Some(row), &body)
    }

    /// A stream over `row` (None: one row) of `body`; rolls back and returns `None` when
    /// the body is not a row of vector work or does not fit.
    fn stream(&mut self, row: Option<(usize, Idx)>, body: &[Stmt]) -> R<Option<()>> {
        // A statement reading what an earlier one of the row wrote (Softmax's terms stored,
        // then summed back) would load global memory before the write reaches it: such a row
        // runs statement by statement, fenced.
        if rereads(body) {
            return Ok(None);
        }
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
            ctx_max: 1,
            shared: HashMap::new(),
        };
        for s in body {
            if !self.plan_stmt(&mut plan, s)? {
                return Ok(None);
            }
        }
        // Subexpressions computed twice in the row (Softmax's exp(x − max) in its sum and its
        // output, LayerNorm's x − mean): at most a few, the biggest first.
        let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
        for s in body {
            self.count_shared(s, &mut counts);
        }
        let mut shared: Vec<(String, usize)> =
            counts.into_iter().filter(|(_, (n, _))| *n >= 2).map(|(k, (_, size))| (k, size)).collect();
        shared.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (i, (k, _)) in shared.into_iter().take(4).enumerate() {
            plan.shared.insert(k, i);
        }
        // A body of one vector loop of constant length can be cut into strips.
        if let [s @ Stmt::For { .. }] = body {
            if let Some((ctx, _)) = self.nest_ctx(s) {
                if let Idx::Const(n) = ctx.len() {
                    plan.strippable = Some(n);
                }
            }
        }
        // A buffer both loaded and stored: each load matched by a store of the same elements,
        // the pairs apart from each other; each pair with rows apart, or the same elements for
        // every row (an accumulator).
        for b in plan.stored.clone() {
            let loads: Vec<String> = plan.loads.iter().filter(|r| r.acc.buf == b).map(|r| r.acc.key()).collect();
            if loads.is_empty() {
                continue;
            }
            let stores: Vec<Acc> = plan.stores.iter().filter(|r| r.acc.buf == b).map(|r| r.acc.clone()).collect();
            if loads.len() != stores.len() || stores.iter().any(|a| !loads.contains(&a.key())) {
                return Ok(None);
            }
            for (i, a) in stores.iter().enumerate() {
                for o in &stores[i + 1..] {
                    if !self.apart(a, o) {
                        return Ok(None);
                    }
                }
            }
            let (rv, _) = plan.row;
            for a in stores {
                if rv != ONE_ROW && a.row_coef == Some(0) && !a.len.uses(rv) && !a.base.uses(rv) && a.guards.is_empty()
                {
                    let key = a.key();
                    let li = plan.load_keys[&key];
                    plan.loads[li].accum = true;
                    let si = plan.store_keys.remove(&key).unwrap_or(0);
                    plan.stores.remove(si);
                    for v in plan.store_keys.values_mut() {
                        if *v > si {
                            *v -= 1;
                        }
                    }
                    plan.strippable = None;
                    continue;
                }
                let disjoint = match a.row_coef {
                    Some(c) => c.abs() >= (a.stride.abs() * a.max_len).max(1),
                    None => false,
                };
                if !disjoint && plan.row.1 != Idx::Const(1) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(plan))
    }

    /// Whether two accesses of a row never touch the same element: their bases differ by a
    /// constant at least as large as either's span.
    fn apart(&self, a: &Acc, b: &Acc) -> bool {
        let d = affine::lin(&Idx::Sub(Box::new(a.base.clone()), Box::new(b.base.clone())), &self.ranges);
        if !d.is_const() || a.row_coef != b.row_coef || a.stride != b.stride {
            return false;
        }
        let span = (a.stride.abs() * a.max_len.max(b.max_len)).max(1);
        d.c.abs() >= span
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
                    let max =
                        self.upper(&outer).saturating_mul(inner.iter().fold(1i64, |a, x| a.saturating_mul(*x)).max(1));
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
            Stmt::Let { value, .. } => self.plan_val(plan, value, None, &[]),
            Stmt::Store { buf, index, value } => {
                if !self.plan_val(plan, value, None, &[])? {
                    return Ok(false);
                }
                self.plan_store(plan, *buf, index, None)
            }
            Stmt::For { .. } => {
                let Some((ctx, stores)) = self.nest_ctx(s) else { return Ok(false) };
                plan.ctx_max = plan.ctx_max.max(ctx.max);
                let old = self.bind_ctx(&ctx);
                let mut ok = true;
                for st in stores {
                    let Stmt::Store { buf, index, value } = st else { continue };
                    ok = ok
                        && !has_reduce(value)
                        && self.plan_val(plan, value, Some(&ctx), &[])?
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
            return Ok(self.local_access(buf, index, ctx).is_some_and(|(_, s)| s == 1 || ctx.is_none()));
        }
        let Some(acc) = self.classify(buf, index, ctx, &plan.row, &[]) else { return Ok(false) };
        if ctx.is_some() && acc.stride == 0 {
            // Every element of the loop stores to one place.
            return Ok(false);
        }
        let key = acc.key();
        if !plan.store_keys.contains_key(&key) {
            plan.store_keys.insert(key, plan.stores.len());
            plan.stores.push(Region { acc, resident: false, accum: false, pitch: 0, addr: 0 });
        }
        if !plan.stored.contains(&buf) {
            plan.stored.push(buf);
        }
        Ok(true)
    }

    /// Checks a value and records its loads; `ctx`: the vector context it is evaluated in;
    /// `guards`: the conditions of the branches it is in.
    fn plan_val(&mut self, plan: &mut Plan, v: &Val, ctx: Option<&Ctx>, guards: &[Guard]) -> R<bool> {
        Ok(match v {
            Val::Where { .. } => false,
            Val::Const(_) | Val::Scalar(_) => true,
            Val::Load { buf, index } => {
                if *buf >= self.nparams() {
                    return Ok(self.local_access(*buf, index, ctx).is_some_and(|(_, s)| s <= 1));
                }
                let Some(acc) = self.classify(*buf, index, ctx, &plan.row, guards) else { return Ok(false) };
                let key = acc.key();
                if !plan.load_keys.contains_key(&key) {
                    plan.load_keys.insert(key, plan.loads.len());
                    plan.loads.push(Region { acc, resident: false, accum: false, pitch: 0, addr: 0 });
                }
                true
            }
            Val::Un(_, x) => {
                plan.vtemps = plan.vtemps.max(need(x, ctx.is_some()).max(1));
                self.plan_val(plan, x, ctx, guards)?
            }
            Val::Bin(_, a, b) => {
                plan.vtemps = plan.vtemps.max(need(v, ctx.is_some()));
                self.plan_val(plan, a, ctx, guards)? && self.plan_val(plan, b, ctx, guards)?
            }
            Val::FromIdx(i) => match ctx {
                Some(c) if c.vars.iter().any(|x| i.uses(*x)) => {
                    c.vars.len() == 1 && !affine::lin(i, &self.ranges).opaque_in(c.vars[0])
                }
                _ => true,
            },
            Val::Reduce { .. } => {
                if ctx.is_some() {
                    return Ok(false);
                }
                let Some((rctx, body)) = self.reduce_ctx(v) else { return Ok(false) };
                plan.ctx_max = plan.ctx_max.max(rctx.max);
                let old = self.bind_ctx(&rctx);
                plan.vtemps = plan.vtemps.max(need(body, true).max(1));
                // Conditions outside the reduction do not depend on its lanes.
                let outer: Vec<Guard> = guards.iter().map(|g| Guard { s: 0, ..g.clone() }).collect();
                let ok = !has_reduce(body) && self.plan_val(plan, body, Some(&rctx), &outer)?;
                self.unbind(old);
                ok
            }
            Val::IfLess { lhs, rhs, then, other } | Val::Select { lhs, rhs, then, other } => {
                let Some((base, s)) = self.condition(lhs, rhs, ctx) else { return Ok(false) };
                plan.vtemps = plan.vtemps.max(need(v, ctx.is_some()));
                let mut g = guards.to_vec();
                g.push(Guard { base: base.clone(), s, taken: true });
                let ok = self.plan_val(plan, then, ctx, &g)?;
                g.pop();
                g.push(Guard { base, s, taken: false });
                ok && self.plan_val(plan, other, ctx, &g)?
            }
        })
    }

    /// Counts the vector subexpressions of a row statement by [`shared_key`] (with their
    /// sizes in nodes).
    fn count_shared(&self, s: &Stmt, counts: &mut HashMap<String, (usize, usize)>) {
        match s {
            Stmt::Let { value, .. } | Stmt::Store { value, .. } => self.count_reduces(value, counts),
            Stmt::For { .. } => {
                if let Some((ctx, stores)) = self.nest_ctx(s) {
                    for st in stores {
                        if let Stmt::Store { value, .. } = st {
                            count_vector(value, &ctx, counts);
                        }
                    }
                }
            }
            Stmt::Mma(_) => {}
        }
    }

    fn count_reduces(&self, v: &Val, counts: &mut HashMap<String, (usize, usize)>) {
        match v {
            Val::Reduce { .. } => {
                if let Some((rctx, body)) = self.reduce_ctx(v) {
                    count_vector(body, &rctx, counts);
                }
            }
            Val::Un(_, x) => self.count_reduces(x, counts),
            Val::Bin(_, a, b) => {
                self.count_reduces(a, counts);
                self.count_reduces(b, counts);
            }
            _ => {}
        }
    }

    /// `lhs < rhs` as `base + s·x < 0` over the context's linear index `x`, when affine in it.
    fn condition(&self, lhs: &Idx, rhs: &Idx, ctx: Option<&Ctx>) -> Option<(Idx, i64)> {
        let d = affine::lin(&Idx::Sub(Box::new(lhs.clone()), Box::new(rhs.clone())), &self.ranges);
        match ctx {
            Some(c) => Some((d.to_idx(&c.vars), ctx_stride(&d, c)?)),
            None => Some((d.to_idx(&[]), 0)),
        }
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
        let max = self.upper(extent).saturating_mul(inner.iter().fold(1i64, |a, x| a.saturating_mul(*x)).max(1));
        Some((Ctx { vars, inner, outer: extent.clone(), max }, at))
    }

    /// A global-memory access, or `None` when it is not affine in the vector index.
    fn classify(
        &self,
        buf: usize,
        index: &[Idx],
        ctx: Option<&Ctx>,
        row: &(usize, Idx),
        guards: &[Guard],
    ) -> Option<Acc> {
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
        // A one-element access needs only the conditions that do not depend on the lanes.
        let guards = if stride == 0 { guards.iter().filter(|g| g.s == 0).cloned().collect() } else { guards.to_vec() };
        Some(Acc { buf, base, row_coef, stride, len, max_len, guards })
    }

    /// A local's access: its offset without the vector variables and its stride.
    fn local_access(&self, buf: usize, index: &[Idx], ctx: Option<&Ctx>) -> Option<(Idx, i64)> {
        let l = affine::flat(index, &self.shapes[buf], &self.ranges);
        let stride = match ctx {
            Some(c) => ctx_stride(&l, c)?,
            None => 0,
        };
        let vars: Vec<usize> = ctx.map_or(Vec::new(), |c| c.vars.clone());
        Some((l.to_idx(&vars), stride))
    }
}

/// Loop variables standing for a context's variables in [`shared_key`].
const CANON: usize = usize::MAX - 300;

/// A vector value's identity across contexts of the same length: the value with the
/// context's variables renamed by position, and the length.
fn shared_key(v: &Val, ctx: &Ctx) -> String {
    let mut c = v.clone();
    for (i, x) in ctx.vars.iter().enumerate() {
        c = c.subst(*x, &Idx::Var(CANON + i));
    }
    format!("{c}|{}", ctx.len())
}

/// Counts the ops of `v` that depend on the context (not those under a condition).
fn count_vector(v: &Val, ctx: &Ctx, counts: &mut HashMap<String, (usize, usize)>) {
    match v {
        Val::Un(_, x) => count_vector(x, ctx, counts),
        Val::Bin(_, a, b) => {
            count_vector(a, ctx, counts);
            count_vector(b, ctx, counts);
        }
        _ => return,
    }
    if ctx.vars.iter().any(|x| v.uses(*x)) {
        let e = counts.entry(shared_key(v, ctx)).or_insert((0, nodes(v)));
        e.0 += 1;
    }
}

fn nodes(v: &Val) -> usize {
    match v {
        Val::Un(_, x) => 1 + nodes(x),
        Val::Bin(_, a, b) => 1 + nodes(a) + nodes(b),
        _ => 1,
    }
}

/// Vector temporaries needed to evaluate `v` in a vector context (conservative).
fn need(v: &Val, vector: bool) -> usize {
    if !vector {
        return 0;
    }
    match v {
        Val::Un(_, x) => need(x, true).max(1),
        Val::Bin(_, a, b) => need(a, true).max(1 + need(b, true)).max(1),
        Val::FromIdx(_) => 1,
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => {
            1 + need(then, true).max(need(other, true))
        }
        _ => 0,
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
        Val::Where { cond, then, other } => reads(cond, buf) || reads(then, buf) || reads(other, buf),
    }
}

fn has_reduce(v: &Val) -> bool {
    match v {
        Val::Reduce { .. } => true,
        Val::Const(_) | Val::Scalar(_) | Val::Load { .. } | Val::FromIdx(_) => false,
        Val::Un(_, x) => has_reduce(x),
        Val::Bin(_, a, b) => has_reduce(a) || has_reduce(b),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => has_reduce(then) || has_reduce(other),
        Val::Where { cond, then, other } => has_reduce(cond) || has_reduce(then) || has_reduce(other),
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

/// `s` with small reductions unrolled where a stream needs them so: every reduction inside a
/// vector loop's stores, and every reduction nested in another's body.
fn unroll_stmt(s: &Stmt) -> Stmt {
    match s {
        Stmt::For { var, extent, parallel, body } => {
            // An innermost loop of lets and stores: the lets are inlined (a vector loop).
            let body = &inline_lets(body);
            let inner = body.iter().all(|b| matches!(b, Stmt::Store { .. }));
            let body = body
                .iter()
                .map(|b| match b {
                    Stmt::Store { buf, index, value } if inner => {
                        Stmt::Store { buf: *buf, index: index.clone(), value: unroll_val(value, true) }
                    }
                    other => unroll_stmt(other),
                })
                .collect();
            Stmt::For { var: *var, extent: extent.clone(), parallel: *parallel, body }
        }
        Stmt::Store { buf, index, value } => {
            Stmt::Store { buf: *buf, index: index.clone(), value: unroll_val(value, false) }
        }
        Stmt::Let { slot, value } => Stmt::Let { slot: *slot, value: unroll_val(value, false) },
        Stmt::Mma(_) => s.clone(),
    }
}

/// A loop body of `Let`s and stores only, with every `Let` substituted into the statements
/// after it (other bodies as they are).
fn inline_lets(body: &[Stmt]) -> Vec<Stmt> {
    if !body.iter().all(|b| matches!(b, Stmt::Let { .. } | Stmt::Store { .. }))
        || !body.iter().any(|b| matches!(b, Stmt::Let { .. }))
    {
        return body.to_vec();
    }
    let mut bound: Vec<(usize, Val)> = Vec::new();
    let mut out = Vec::new();
    for b in body {
        match b {
            Stmt::Let { slot, value } => {
                let v = subst_slots(value, &bound);
                bound.retain(|(s, _)| s != slot);
                bound.push((*slot, v));
            }
            Stmt::Store { buf, index, value } => {
                out.push(Stmt::Store { buf: *buf, index: index.clone(), value: subst_slots(value, &bound) })
            }
            _ => {}
        }
    }
    out
}

/// `v` with the scalars of `bound` replaced by their values.
fn subst_slots(v: &Val, bound: &[(usize, Val)]) -> Val {
    v.map(&mut |x| match x {
        Val::Scalar(s) => bound.iter().rev().find(|(b, _)| *b == s).map_or(x, |(_, by)| by.clone()),
        x => x,
    })
}

/// Unrolls the reductions of `v` with few constant taps (all of them when `inside`, else
/// those nested in another reduction).
fn unroll_val(v: &Val, inside: bool) -> Val {
    match v {
        Val::Reduce { op, var, extent, body } => {
            if inside {
                if let Idx::Const(n) = extent {
                    if (1..=UNROLL_TAPS).contains(n) && taps(body) * n <= UNROLL_TAPS {
                        let combine = match op {
                            RedOp::Sum => BinOp::Add,
                            RedOp::Max => BinOp::Max,
                            RedOp::Min => BinOp::Min,
                        };
                        let body = unroll_val(body, true);
                        let mut acc = body.subst(*var, &Idx::Const(0));
                        for i in 1..*n {
                            acc = Val::Bin(combine, Box::new(acc), Box::new(body.subst(*var, &Idx::Const(i))));
                        }
                        return acc;
                    }
                }
                return v.clone();
            }
            Val::Reduce { op: *op, var: *var, extent: extent.clone(), body: Box::new(unroll_nested(body, *op)) }
        }
        _ => v.map_parts(&mut |x| unroll_val(x, inside), &mut Idx::clone),
    }
}

/// A reduction's body: directly nested reductions of the same op stay (they collapse), any
/// other reduction inside is unrolled.
fn unroll_nested(body: &Val, op: RedOp) -> Val {
    match body {
        Val::Reduce { op: o, var, extent, body: b } if *o == op => {
            Val::Reduce { op: *o, var: *var, extent: extent.clone(), body: Box::new(unroll_nested(b, op)) }
        }
        other => unroll_val(other, true),
    }
}

/// Taps of the reductions nested in `v` (1 without any).
fn taps(v: &Val) -> i64 {
    match v {
        Val::Reduce { extent: Idx::Const(n), body, .. } => n.saturating_mul(taps(body)),
        Val::Reduce { .. } => i64::MAX / 2,
        Val::Const(_) | Val::Scalar(_) | Val::Load { .. } | Val::FromIdx(_) => 1,
        Val::Un(_, x) => taps(x),
        Val::Bin(_, a, b) => taps(a).max(taps(b)),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => taps(then).max(taps(other)),
        Val::Where { cond, then, other } => taps(cond).max(taps(then)).max(taps(other)),
    }
}

/// Whether a statement of `body` reads a buffer an earlier statement of `body` writes.
fn rereads(body: &[Stmt]) -> bool {
    fn writes(s: &Stmt, out: &mut Vec<usize>) {
        match s {
            Stmt::For { body, .. } => body.iter().for_each(|b| writes(b, out)),
            Stmt::Store { buf, .. } => out.push(*buf),
            Stmt::Mma(m) => out.push(m.c.0),
            Stmt::Let { .. } => {}
        }
    }
    fn reads_any(s: &Stmt, bufs: &[usize]) -> bool {
        let val = |v: &Val| bufs.iter().any(|&b| reads(v, b));
        match s {
            Stmt::For { body, .. } => body.iter().any(|b| reads_any(b, bufs)),
            Stmt::Store { value, .. } | Stmt::Let { value, .. } => val(value),
            Stmt::Mma(m) => val(&m.a) || bufs.contains(&m.b.0),
        }
    }
    let mut written = Vec::new();
    for s in body {
        if reads_any(s, &written) {
            return true;
        }
        writes(s, &mut written);
    }
    false
}
