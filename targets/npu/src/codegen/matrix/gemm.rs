//! Whole GEMMs: one [`Mma`] of many rows and columns (`C[r, j] += Σ_k A[r, k] · B[k, j]`,
//! what `kiln-passes` lowers a MatMul/Gemm to with [`Schedule::whole_matmul`]) blocked for the
//! matrix unit by the code generator itself.
//!
//! The product is cut into blocks of `bm × bn` outputs and chunks of `kc` reduction values.
//! One operand is **resident**: its block (a panel of `bm` rows × K of A, or K × `bn` columns of
//! B) is loaded once into the first level of its route (DaVinci L1, MLU NRAM/WRAM) and serves
//! every block of the other, **streamed** operand, whose chunks go by in a ring of slots.
//! Each chunk moves on to the matrix unit's level when that is another one (DaVinci: L1 → L0A
//! / L0B), and `mmad` accumulates all of K into the accumulator level (L0C) in reduction
//! order. A long K is cut into slices, each a blocked GEMM of its own that adds into `C` (the
//! resident panel of all of K would be too thin to be reused; the search weighs that against
//! reading and writing `C` once per slice). Per block, V adds the
//! accumulator into `C`'s tile (brought in by MTE2) and MTE3 writes it back. Every buffer is a
//! ring with counting flags between its pipes: MTE2 loads the next chunks (and the next
//! resident panel) while M multiplies, V adds and MTE3 stores the previous block.
//!
//! A Conv that `kiln-passes` lowered to im2col columns and a whole GEMM ([`Im2col`]) is the
//! same GEMM with `B` formed on chip (an implicit GEMM, see `ConvPlan`): the columns are never
//! stored.
//!
//! The code is straight-line (the sizes are known): no loop control on the scalar unit. The
//! block sizes come from a small search over the machine description: the candidate whose
//! busiest pipe (estimated from the DMA paths' bandwidths and latencies and the matrix unit's
//! tile costs) is least loaded, among those that fit every level.
//!
//! [`Schedule::whole_matmul`]: https://docs.rs/kiln-passes/latest/kiln_passes/lower/struct.Schedule.html

use super::super::affine;
use super::super::{Gen, R};
use crate::config::NpuConfig;
use crate::isa::{Instr, Pipe, VBinOp};
use kiln_ir::kernel::{Idx, Im2col, Mma, Stmt, Val};

/// `base + r·row + k·col` (elements) of an operand in global memory.
#[derive(Clone, Copy, Debug)]
struct Affine2 {
    base: i64,
    outer: i64,
    inner: i64,
}

/// A ring of `slots` buffers in `level`, passed along `chain` (writer first).
#[derive(Clone, Debug)]
struct Ring {
    level: usize,
    addrs: Vec<u64>,
    chain: Vec<Pipe>,
    ready: Vec<Option<u8>>,
    free: Option<u8>,
    uses: u64,
}

/// Where `C` starts from instead of itself: the init's row 0 (`per_row`: its column 0, one
/// value per row) at `at` in the vector level.
#[derive(Clone, Copy, Debug)]
struct Init {
    at: u64,
    per_row: bool,
}

/// Block sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Blocking {
    bm: u64,
    bn: u64,
    kc: u64,
    /// The resident operand is A (loop over row blocks outside), else B.
    a_resident: bool,
    /// Copies of the resident panel (2: the next one loads while this one is used).
    panels: u64,
    /// Slots of the streamed operand's ring in its first level.
    stream_slots: u64,
}

/// A GEMM's form and blocking (addresses in global memory include the buffers' offsets).
struct GemmPlan {
    route: Route,
    blk: Blocking,
    /// The reduction in slices of this many values, one blocked GEMM each (the later ones
    /// add into `C`): a long K would leave the resident panel too thin to be reused.
    ks: u64,
    /// An implicit-GEMM Conv: `B` formed on chip from input strips (`b` unused).
    conv: Option<ConvPlan>,
    mnk: (u64, u64, u64),
    a: Affine2,
    b: Affine2,
    c: Affine2,
}

/// Where the operands go.
#[derive(Clone, Debug)]
struct Route {
    /// First level after global memory, and the matrix unit's level, of A and of B.
    ah: usize,
    al: usize,
    bh: usize,
    bl: usize,
    /// The accumulator's level.
    lc: usize,
}

/// Scratchpad space a blocking needs, in elements per memory level (each buffer aligned as
/// its level requires), against what each level holds; the vector level (`v`) offers only
/// what the kernel's own buffers leave free.
struct Need<'c> {
    cfg: &'c NpuConfig,
    v: usize,
    free_ub: u64,
    elems: Vec<u64>,
}

impl<'c> Need<'c> {
    fn new(gen: &Gen<'c>) -> Need<'c> {
        let free_ub = gen.ub.cap.saturating_sub(gen.ub.top.next_multiple_of(gen.ub.align));
        Need { cfg: gen.cfg, v: gen.vl as usize, free_ub, elems: vec![0; gen.cfg.levels.len()] }
    }

    /// `slots` buffers of `size` elements at level `l`.
    fn put(&mut self, l: usize, slots: u64, size: u64) {
        self.elems[l] += slots * size.next_multiple_of(self.cfg.align_elems(l));
    }

    /// What every blocking of a `bm × bn` output with `kc`-deep steps holds near the matrix
    /// unit: A's double-buffered copy at the unit's level (when not staged there already),
    /// the accumulators, and their vector-level copy and results.
    fn unit_operands(&mut self, r: &Route, bm: u64, bn: u64, kc: u64) {
        let v = self.v;
        if r.al != r.ah {
            self.put(r.al, 2, bm * kc);
        }
        self.put(r.lc, 2, bm * bn);
        if r.lc != v {
            self.put(v, 1, bm * bn);
        }
        self.put(v, 2, bm * bn);
    }

    /// Whether every level holds what it needs (global memory, level 0, is never a staging place).
    fn fits(&self) -> bool {
        self.elems.iter().enumerate().all(|(l, &x)| {
            let cap = if l == self.v { self.free_ub } else { self.cfg.capacity_elems(l) };
            x == 0 || (l != 0 && x <= cap)
        })
    }
}

impl Gen<'_> {
    /// Compiles `m` as a blocked GEMM when it is one (one reduction loop, `a` a load, every
    /// access affine with unit stride along the reduction, `C`'s columns contiguous, sizes
    /// known) and the machine has a matrix unit; `None` otherwise (nothing emitted).
    pub(crate) fn try_gemm(&mut self, m: &Mma) -> R<Option<()>> {
        let Some(p) = self.gemm_plan(m) else { return Ok(None) };
        self.gemm_run(&p, None)
    }

    /// Compiles `init; mma` (what [`Schedule::whole_matmul`] lowers to: `C` set to a value
    /// that does not depend on the row, e.g. zero or a bias, or only on the row, a Conv's
    /// per-channel bias, then the GEMM into `C`) without reading `C` back: row 0 (column 0) of
    /// the init is stored, brought into the vector level once, and V adds it to every row of
    /// each accumulator block. `None` when the pair has another form.
    pub(crate) fn try_gemm_with_init(&mut self, init: &Stmt, mma: &Stmt) -> R<Option<()>> {
        let Stmt::Mma(m) = mma else { return Ok(None) };
        let Stmt::For { var: rv, extent: Idx::Const(er), body, .. } = init else { return Ok(None) };
        let [Stmt::For { var: jv, extent: Idx::Const(ej), body, .. }] = body.as_slice() else { return Ok(None) };
        let [Stmt::Store { buf, index, value }] = body.as_slice() else { return Ok(None) };
        // A value per row (a Conv's per-channel bias) instead of per column.
        let per_row = value.uses(*rv);
        if *buf != m.c.0 || (per_row && value.uses(*jv)) || val_loads(value, *buf) {
            return Ok(None);
        }
        let Some(p) = self.gemm_plan(m) else { return Ok(None) };
        if (*er as u64, *ej as u64) != (p.mnk.0, p.mnk.1) {
            return Ok(None);
        }
        let mut ranges = self.ranges.clone();
        ranges.insert(*rv, *er);
        ranges.insert(*jv, *ej);
        let l = affine::flat(index, &self.shapes[*buf], &ranges);
        let gm = self.gm[*buf] as i64;
        if !l.atoms.is_empty()
            || l.vars.len() != 2
            || l.c + gm != p.c.base
            || l.coef(*rv) != p.c.outer
            || l.coef(*jv) != 1
        {
            return Ok(None);
        }
        let snap = self.snapshot();
        let lv = self.lvl.clone();
        // Per row: the value must be a contiguous run of a kernel buffer (a bias), loaded as is.
        let bias = match value {
            Val::Load { buf: b, index: bi } if per_row && *b < self.nparams() => {
                let l = affine::flat(bi, &self.shapes[*b], &ranges);
                let only_row = l.vars.iter().all(|x| x.0 == *rv);
                (l.atoms.is_empty() && only_row && l.coef(*rv) == 1).then(|| self.gm[*b] as i64 + l.c)
            }
            _ => None,
        };
        if per_row && bias.is_none() {
            return Ok(None);
        }
        // Row 0 of the init, then that row into the vector level (per row: the bias's run).
        let row0 = Stmt::For { var: *rv, extent: Idx::Const(1), parallel: false, body: vec![init_body(init)] };
        let top = self.ub.top;
        let r = (|| -> R<Option<()>> {
            let v = self.vl as usize;
            if let Some(src) = bias {
                let at = self.ub_alloc(p.mnk.0)?;
                self.copy2(v, 0, at, src, 1, p.mnk.0, p.mnk.0, p.mnk.0 as i64)?;
                self.emit(Instr::Barrier);
                return self.gemm_run(&p, Some(Init { at, per_row: true }));
            }
            self.stmt(&row0)?;
            self.emit(Instr::Barrier);
            let at = {
                let at = self.ub_alloc(p.mnk.1)?;
                self.copy2(v, 0, at, p.c.base, 1, p.mnk.1, p.mnk.1, p.mnk.1 as i64)?;
                at
            };
            self.emit(Instr::Barrier);
            self.gemm_run(&p, Some(Init { at, per_row }))
        })();
        match r {
            Ok(Some(())) => {
                self.ub.top = top;
                Ok(Some(()))
            }
            Ok(None) | Err(crate::NpuError::DoesNotFit { .. }) | Err(crate::NpuError::Unsupported(_)) => {
                self.rollback(snap);
                self.lvl = lv;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The GEMM's form and blocking, when `m` is one.
    fn gemm_plan(&mut self, m: &Mma) -> Option<GemmPlan> {
        let mu = self.cfg.matrix.clone()?;
        if !self.opts.matrix || m.red.len() != 1 || m.rows < mu.m as usize {
            return None;
        }
        let (kv, ke) = &m.red[0];
        let (Idx::Const(kk), Idx::Const(valid), Idx::Const(1)) =
            (ke.clone().simplify(), m.valid.clone().simplify(), m.c_col.clone().simplify())
        else {
            return None;
        };
        let (rows, cols) = (m.rows as i64, valid.min(m.cols as i64));
        if kk <= 0 || cols <= 0 {
            return None;
        }
        let Val::Load { buf: abuf, index: aidx } = &m.a else { return None };
        let np = self.nparams();
        if *abuf >= np || m.b.0 >= np || m.c.0 >= np {
            return None;
        }
        let mut ranges = self.ranges.clone();
        ranges.insert(m.row, rows);
        ranges.insert(*kv, kk);
        let form = |g: &Gen, buf: usize, index: &[Idx], outer: usize, inner: Option<usize>| -> Option<Affine2> {
            let l = affine::flat(index, &g.shapes[buf], &ranges);
            let vars: Vec<usize> = l.vars.iter().map(|x| x.0).collect();
            if !l.atoms.is_empty() || vars.iter().any(|v| *v != outer && Some(*v) != inner) {
                return None;
            }
            Some(Affine2 { base: l.c, outer: l.coef(outer), inner: inner.map_or(1, |v| l.coef(v)) })
        };
        // A[r][k], B[k][j] (column run from the index), C[r][j].
        let (Some(a), Some(b), Some(c)) = (
            form(self, *abuf, aidx, m.row, Some(*kv)),
            form(self, m.b.0, &m.b.1, *kv, None),
            form(self, m.c.0, &m.c.1, m.row, None),
        ) else {
            return None;
        };
        if a.inner != 1 || b.outer <= 0 || a.outer <= 0 || c.outer <= 0 {
            return None;
        }
        let v = self.vl as usize;
        let (Some(al), Some(bl), Some(lc)) =
            (self.cfg.level_index(&mu.a_level), self.cfg.level_index(&mu.b_level), self.cfg.level_index(&mu.c_level))
        else {
            return None;
        };
        let first = |g: &Gen, l: usize| -> Option<usize> {
            let r = g.cfg.route(0, l)?;
            // At most one level between global memory and the unit's.
            (r.len() == 2 || r.len() == 3).then(|| r[1])
        };
        let (Some(ah), Some(bh)) = (first(self, al), first(self, bl)) else { return None };
        let lc_to_v = lc == v || self.cfg.path(lc, v).is_some_and(|p| p.pipe == Pipe::V);
        if !lc_to_v || self.cfg.path(0, v).is_none() || self.cfg.path(v, 0).is_none() {
            return None;
        }
        let route = Route { ah, al, bh, bl, lc };
        let (ks, blk) = self.gemm_slices(&route, rows as u64, cols as u64, kk as u64)?;
        let gm = (self.gm[*abuf] as i64, self.gm[m.b.0] as i64, self.gm[m.c.0] as i64);
        let a = Affine2 { base: a.base + gm.0, ..a };
        let b = Affine2 { base: b.base + gm.1, ..b };
        let c = Affine2 { base: c.base + gm.2, ..c };
        Some(GemmPlan { route, blk, ks, conv: None, mnk: (rows as u64, cols as u64, kk as u64), a, b, c })
    }

    /// Emits a planned GEMM (`init_row`: the vector-level address of the row every row of `C`
    /// starts from, instead of `C` itself); `None` (nothing emitted) when it does not fit.
    fn gemm_run(&mut self, p: &GemmPlan, init_row: Option<Init>) -> R<Option<()>> {
        let snap = self.snapshot();
        let lv = self.lvl.clone();
        let (m, n, k) = p.mnk;
        let ks = p.ks.clamp(1, k.max(1));
        let r = (|| -> R<()> {
            for k0 in (0..k).step_by(ks as usize) {
                let (top, lv) = (self.ub.top, self.lvl.clone());
                // Slice k0.. of A's columns and B's rows; after the first, C holds the sum so far.
                let a = Affine2 { base: p.a.base + k0 as i64 * p.a.inner, ..p.a };
                let b = Affine2 { base: p.b.base + k0 as i64 * p.b.outer, ..p.b };
                let init = if k0 == 0 { init_row } else { None };
                let mnk = (m, n, ks.min(k - k0));
                self.gemm_emit(&p.route, p.blk, mnk, a, b, p.c, init, p.conv.as_ref())?;
                if k0 + ks < k {
                    self.emit(Instr::Barrier);
                }
                self.free_flags();
                self.ub.top = top;
                self.lvl = lv;
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                self.free_flags();
                self.lvl = lv;
                Ok(Some(()))
            }
            Err(crate::NpuError::DoesNotFit { .. }) | Err(crate::NpuError::Unsupported(_)) => {
                self.rollback(snap);
                self.lvl = lv;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Cycles of a copy of `n` bursts of `len` elements on path `from → to`.
    fn dma_cycles(&self, from: usize, to: usize, n: u64, len: u64) -> f64 {
        let Some(p) = self.cfg.path(from, to) else { return f64::INFINITY };
        let g = crate::sim::DMA_GRANULE_BYTES;
        let bytes = n * (len * 4).next_multiple_of(g);
        p.latency_cycles as f64 + bytes as f64 / p.bytes_per_cycle
    }

    /// The reduction slice and the blocking with the least estimated load of the busiest pipe
    /// over all slices (all of K, or slices of whole chunks of the unit's `k`).
    fn gemm_slices(&self, r: &Route, m: u64, n: u64, k: u64) -> Option<(u64, Blocking)> {
        let tk = self.cfg.matrix.as_ref()?.k as u64;
        let mut best: Option<(f64, u64, Blocking)> = None;
        for parts in [1, 2, 3, 4, 6, 8] {
            let ks = k.div_ceil(parts).next_multiple_of(tk).min(k);
            if parts > 1 && ks >= k {
                continue;
            }
            let Some(blk) = self.gemm_blocking(r, m, n, ks) else { continue };
            // Each slice ends in a barrier (the pipes drain, the next slice's loads start cold):
            // a tenth more than its estimate.
            let drain = if parts > 1 { 1.1 } else { 1.0 };
            let cost = drain * k.div_ceil(ks) as f64 * self.gemm_cost(r, &blk, m, n, ks);
            if best.as_ref().is_none_or(|(c, ..)| cost < *c) {
                best = Some((cost, ks, blk));
            }
        }
        best.map(|(_, ks, b)| (ks, b))
    }

    /// The best blocking that fits, by the estimated load of the busiest pipe.
    fn gemm_blocking(&self, r: &Route, m: u64, n: u64, k: u64) -> Option<Blocking> {
        let mu = self.cfg.matrix.as_ref()?;
        let (tm, tn, tk) = (mu.m as u64, mu.n as u64, mu.k as u64);
        let mut best: Option<(f64, Blocking)> = None;
        for a_resident in [true, false] {
            for bm in (1..=32).map(|i| i * tm).filter(|&x| x < m + tm) {
                for bn in (1..=32).map(|i| i * tn).filter(|&x| x < n + tn) {
                    for kc in [1, 2, 4, 8, 16, 32, 64].into_iter().map(|x| x * tk).filter(|&x| x < k + tk) {
                        for panels in [2, 1] {
                            for stream_slots in [2, 3, 4] {
                                let blk = Blocking { bm, bn, kc, a_resident, panels, stream_slots };
                                let mut need = Need::new(self);
                                let nk = k.div_ceil(kc);
                                let (res_l, str_l, res_sz, str_sz) = if a_resident {
                                    (r.ah, r.bh, bm * kc, kc * bn)
                                } else {
                                    (r.bh, r.ah, kc * bn, bm * kc)
                                };
                                need.put(res_l, panels * nk, res_sz);
                                need.put(str_l, stream_slots, str_sz);
                                if r.bl != r.bh {
                                    need.put(r.bl, 2, kc * bn);
                                }
                                need.unit_operands(r, bm, bn, kc);
                                if !need.fits() {
                                    continue;
                                }
                                let cost = self.gemm_cost(r, &blk, m, n, k);
                                if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                                    best = Some((cost, blk));
                                }
                            }
                        }
                    }
                }
            }
        }
        best.map(|x| x.1)
    }

    /// The estimated time: the busiest pipe's busy cycles and a part of the next one's.
    fn gemm_cost(&self, r: &Route, b: &Blocking, m: u64, n: u64, k: u64) -> f64 {
        let Some(mu) = self.cfg.matrix.as_ref() else { return f64::INFINITY };
        let v = self.vl as usize;
        let mut pipes: std::collections::HashMap<Pipe, f64> = Default::default();
        let mut add = |p: Option<Pipe>, c: f64| *pipes.entry(p.unwrap_or(Pipe::S)).or_insert(0.0) += c;
        let pipe = |f: usize, t: usize| self.cfg.path(f, t).map(|p| p.pipe);
        let (nm, nn, nk) = (m.div_ceil(b.bm), n.div_ceil(b.bn), k.div_ceil(b.kc));
        let (bm, bn, kc) = (b.bm.min(m), b.bn.min(n), b.kc.min(k));
        // Loads from global memory: the resident operand once, the streamed once per block of
        // the resident one.
        let a_loads = if b.a_resident { 1 } else { nn } as f64;
        let b_loads = if b.a_resident { nm } else { 1 } as f64;
        add(pipe(0, r.ah), a_loads * (nm * nk) as f64 * self.dma_cycles(0, r.ah, bm, kc));
        add(pipe(0, r.bh), b_loads * (nn * nk) as f64 * self.dma_cycles(0, r.bh, kc, bn));
        let blocks = (nm * nn) as f64;
        if r.al != r.ah {
            add(pipe(r.ah, r.al), blocks * nk as f64 * self.dma_cycles(r.ah, r.al, 1, bm * kc));
        }
        if r.bl != r.bh {
            add(pipe(r.bh, r.bl), blocks * nk as f64 * self.dma_cycles(r.bh, r.bl, 1, kc * bn));
        }
        let tiles = bm.div_ceil(mu.m as u64) * bn.div_ceil(mu.n as u64) * kc.div_ceil(mu.k as u64);
        let per = mu.tile_cycles();
        add(Some(Pipe::M), blocks * nk as f64 * (mu.startup_cycles as u64 + tiles * per) as f64);
        add(pipe(0, v), blocks * self.dma_cycles(0, v, bm, bn));
        add(pipe(v, 0), blocks * self.dma_cycles(v, 0, bm, bn));
        let vec = (self.cfg.vector.startup_cycles as u64 + (bm * bn).div_ceil(self.cfg.lanes())) as f64;
        add(Some(Pipe::V), blocks * vec);
        if r.lc != v {
            add(pipe(r.lc, v), blocks * self.dma_cycles(r.lc, v, 1, bm * bn));
        }
        // Instructions issued by the scalar unit (a few registers loaded per instruction).
        add(Some(Pipe::S), blocks * nk as f64 * 24.0);
        busiest(&pipes)
    }

    fn ring(&mut self, level: usize, size: u64, slots: u64, chain: Vec<Pipe>) -> R<Ring> {
        let mut addrs = Vec::new();
        for _ in 0..slots {
            addrs.push(self.level_alloc(level, size)?);
        }
        let mut ready = Vec::new();
        for w in chain.windows(2) {
            ready.push(if w[0] == w[1] { None } else { Some(self.flag(w[0], w[1])?) });
        }
        let (f, l) = (chain[0], chain[chain.len() - 1]);
        let free = if f == l || slots == 0 { None } else { Some(self.flag(l, f)?) };
        Ok(Ring { level, addrs, chain, ready, free, uses: 0 })
    }

    /// The writer takes the next slot (waiting until it is free); returns its address.
    fn ring_acquire(&mut self, r: &mut Ring) -> u64 {
        let s = r.addrs.len() as u64;
        if r.uses >= s {
            if let Some(id) = r.free {
                self.emit(Instr::WaitFlag { src: r.chain[r.chain.len() - 1], dst: r.chain[0], id });
            }
        }
        let at = r.addrs[(r.uses % s) as usize];
        r.uses += 1;
        at
    }

    /// Stage `i` of the chain is done with the current slot.
    fn ring_signal(&mut self, r: &Ring, i: usize) {
        if let Some(Some(id)) = r.ready.get(i) {
            self.emit(Instr::SetFlag { src: r.chain[i], dst: r.chain[i + 1], id: *id });
        }
    }

    /// Stage `i` (> 0) waits for stage `i - 1`.
    fn ring_wait(&mut self, r: &Ring, i: usize) {
        if let Some(Some(id)) = r.ready.get(i - 1) {
            self.emit(Instr::WaitFlag { src: r.chain[i - 1], dst: r.chain[i], id: *id });
        }
    }

    /// The last stage hands the slot back.
    fn ring_release(&mut self, r: &Ring) {
        if let Some(id) = r.free {
            self.emit(Instr::SetFlag { src: r.chain[r.chain.len() - 1], dst: r.chain[0], id });
        }
    }

    /// Takes back every hand-back still pending (flags end at zero).
    fn ring_drain(&mut self, r: &Ring) {
        if let Some(id) = r.free {
            let pending = r.uses.min(r.addrs.len() as u64);
            for _ in 0..pending {
                self.emit(Instr::WaitFlag { src: r.chain[r.chain.len() - 1], dst: r.chain[0], id });
            }
        }
    }

    /// `copy`: `n` bursts of `len` from `src` (stride `ss`) in `from` to `dst` (stride `ds`) in `to`.
    #[allow(clippy::too_many_arguments)]
    fn copy2(&mut self, to: usize, from: usize, dst: u64, src: i64, n: u64, len: u64, ds: u64, ss: i64) -> R<()> {
        let mk = self.mark();
        let (d, s) = (self.reg()?, self.reg()?);
        self.li(d, dst as i64)?;
        self.li(s, src)?;
        let (n, len, ds, ss) =
            (self.konst(n as i64)?, self.konst(len as i64)?, self.konst(ds as i64)?, self.konst(ss)?);
        self.emit(Instr::Copy {
            dst_level: to as u8,
            src_level: from as u8,
            dst: d,
            src: s,
            n,
            len,
            dst_stride: ds,
            src_stride: ss,
        });
        self.reset(mk);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_emit(
        &mut self,
        r: &Route,
        blk: Blocking,
        mnk: (u64, u64, u64),
        a: Affine2,
        b: Affine2,
        c: Affine2,
        init_row: Option<Init>,
        conv: Option<&ConvPlan>,
    ) -> R<()> {
        let (m, n, k) = mnk;
        let v = self.vl as usize;
        let Blocking { bm, bn, kc, a_resident, panels, stream_slots } = blk;
        let nk = k.div_ceil(kc);
        let pipe = |g: &Gen, f: usize, t: usize| -> R<Pipe> {
            g.cfg.path(f, t).map(|p| p.pipe).ok_or_else(|| super::super::unsupported("internal: no DMA path"))
        };
        let into_a = pipe(self, 0, r.ah)?;
        let into_b = pipe(self, 0, r.bh)?;
        // Rings. A's and B's first level: read by the next hop or by M.
        let next_a = if r.al != r.ah { pipe(self, r.ah, r.al)? } else { Pipe::M };
        let next_b = if r.bl != r.bh { pipe(self, r.bh, r.bl)? } else { Pipe::M };
        let (a_slots, b_slots) = if a_resident { (panels * nk, stream_slots) } else { (stream_slots, panels * nk) };
        let mut ah = self.ring(r.ah, bm * kc, a_slots, vec![into_a, next_a])?;
        let mut bh = match conv {
            Some(cv) => self.ring(r.bh, cv.strip_elems(), 2, vec![into_b, next_b])?,
            None => self.ring(r.bh, kc * bn, b_slots, vec![into_b, next_b])?,
        };
        let mut al = if r.al != r.ah { Some(self.ring(r.al, bm * kc, 2, vec![next_a, Pipe::M])?) } else { None };
        let mut bl = if r.bl != r.bh { Some(self.ring(r.bl, kc * bn, 2, vec![next_b, Pipe::M])?) } else { None };
        let mut acc = self.ring(r.lc, bm * bn, 2, vec![Pipe::M, Pipe::V])?;
        let acc_v = if r.lc != v { Some(self.ub_alloc(bm * bn)?) } else { None };
        let (cin, cout) = (pipe(self, 0, v)?, pipe(self, v, 0)?);
        // C's tile: brought in by `cin`, or (from an init row) written by V.
        let mut ct = match init_row {
            None => self.ring(v, bm * bn, 2, vec![cin, Pipe::V, cout])?,
            Some(_) => self.ring(v, bm * bn, 2, vec![Pipe::V, cout])?,
        };
        let zrow = match conv {
            Some(cv) => Some(self.zero_strips(cv, r.bh, &bh.addrs.clone())?),
            None => None,
        };
        // The stage of `ct`'s chain that adds and the one that stores.
        let (add_stage, out_stage) = if init_row.is_some() { (0, 1) } else { (1, 2) };
        let (nm, nn) = (m.div_ceil(bm), n.div_ceil(bn));
        let (outer, inner) = if a_resident { (nm, nn) } else { (nn, nm) };
        for o in 0..outer {
            for i in 0..inner {
                let (rb, cb) = if a_resident { (o, i) } else { (i, o) };
                let (r0, rows) = (rb * bm, bm.min(m - rb * bm));
                let (j0, cols) = (cb * bn, bn.min(n - cb * bn));
                let (first, last) = (i == 0, i == inner - 1);
                // C's tile in.
                let ct_at = if init_row.is_none() {
                    let at = self.ring_acquire(&mut ct);
                    let csrc = c.base + r0 as i64 * c.outer + j0 as i64;
                    self.copy2(v, 0, at, csrc, rows, cols, cols, c.outer)?;
                    self.ring_signal(&ct, 0);
                    at
                } else {
                    0
                };
                let mut acc_at = 0;
                for q in 0..nk {
                    let (k0, kl) = (q * kc, kc.min(k - q * kc));
                    // A's chunk: rows × kl from A[r0.., k0..].
                    let a_new = !a_resident || first;
                    let a_at = if a_new {
                        let at = self.ring_acquire(&mut ah);
                        let src = a.base + r0 as i64 * a.outer + k0 as i64;
                        self.copy2(r.ah, 0, at, src, rows, kl, kl, a.outer)?;
                        self.ring_signal(&ah, 0);
                        at
                    } else {
                        ah.addrs[(((o % panels) * nk + q) % ah.addrs.len() as u64) as usize]
                    };
                    // B's chunk: kl × cols from B[k0.., j0..] (a Conv: this block's input strip).
                    let b_new = a_resident || first;
                    let b_at = if let Some(cv) = conv {
                        if q == 0 {
                            let at = self.ring_acquire(&mut bh);
                            self.strip_load(cv, r.bh, at, j0 / cv.g.ow as u64, cols / cv.g.ow as u64)?;
                            self.ring_signal(&bh, 0);
                            at
                        } else {
                            bh.addrs[((bh.uses - 1) % bh.addrs.len() as u64) as usize]
                        }
                    } else if b_new {
                        let at = self.ring_acquire(&mut bh);
                        let src = b.base + k0 as i64 * b.outer + j0 as i64;
                        self.copy2(r.bh, 0, at, src, kl, cols, cols, b.outer)?;
                        self.ring_signal(&bh, 0);
                        at
                    } else {
                        bh.addrs[(((o % panels) * nk + q) % bh.addrs.len() as u64) as usize]
                    };
                    // Whether this is the first (wait) and the last (release) read of each.
                    let (a_wait, a_rel) = if a_resident { (first, last) } else { (true, true) };
                    let (b_wait, b_rel) = if a_resident { (true, true) } else { (first, last) };
                    // The hops to the matrix unit's levels.
                    let hop = |g: &mut Gen,
                               home: &Ring,
                               low: &mut Option<Ring>,
                               at: u64,
                               len: u64,
                               w: bool,
                               rel: bool|
                     -> R<u64> {
                        match low {
                            Some(lr) => {
                                if w {
                                    g.ring_wait(home, 1);
                                }
                                let to = g.ring_acquire(lr);
                                g.copy2(lr.level, home.level, to, at as i64, 1, len, len, len as i64)?;
                                g.ring_signal(lr, 0);
                                if rel {
                                    g.ring_release(home);
                                }
                                Ok(to)
                            }
                            None => Ok(at),
                        }
                    };
                    let a_op = hop(self, &ah, &mut al, a_at, rows * kl, a_wait, a_rel)?;
                    let b_op = match (conv, &mut bl) {
                        (Some(cv), Some(lr)) => {
                            if q == 0 {
                                self.ring_wait(&bh, 1);
                            }
                            let to = self.ring_acquire(lr);
                            let (lo, rows_b) = (j0 / cv.g.ow as u64, cols / cv.g.ow as u64);
                            let zrow = zrow.unwrap_or(0);
                            self.strip_columns(
                                cv,
                                (r.bh, lr.level),
                                (b_at, zrow, to),
                                lo,
                                rows_b,
                                q * cv.cc,
                                kl,
                                cols,
                            )?;
                            self.ring_signal(lr, 0);
                            if q == nk - 1 {
                                self.ring_release(&bh);
                            }
                            to
                        }
                        (Some(_), None) => return Err(super::super::unsupported("internal: a Conv's B needs a hop")),
                        _ => hop(self, &bh, &mut bl, b_at, kl * cols, b_wait, b_rel)?,
                    };
                    // M.
                    match &al {
                        Some(lr) => self.ring_wait(lr, 1),
                        None if a_wait => self.ring_wait(&ah, 1),
                        None => {}
                    }
                    match &bl {
                        Some(lr) => self.ring_wait(lr, 1),
                        None if b_wait => self.ring_wait(&bh, 1),
                        None => {}
                    }
                    if q == 0 {
                        acc_at = self.ring_acquire(&mut acc);
                    }
                    let mk = self.mark();
                    let (cr, ar, br) = (self.reg()?, self.reg()?, self.reg()?);
                    self.li(cr, acc_at as i64)?;
                    self.li(ar, a_op as i64)?;
                    self.li(br, b_op as i64)?;
                    let (mr, nr, kr) = (self.konst(rows as i64)?, self.konst(cols as i64)?, self.konst(kl as i64)?);
                    self.emit(Instr::Mmad { c: cr, a: ar, b: br, m: mr, n: nr, k: kr, acc: q > 0 });
                    self.reset(mk);
                    match &al {
                        Some(lr) => self.ring_release(lr),
                        None if a_rel => self.ring_release(&ah),
                        None => {}
                    }
                    match &bl {
                        Some(lr) => self.ring_release(lr),
                        None if b_rel => self.ring_release(&bh),
                        None => {}
                    }
                }
                self.ring_signal(&acc, 0);
                // V: the accumulator into C's tile.
                self.ring_wait(&acc, 1);
                let sum_at = match acc_v {
                    Some(at) => {
                        self.copy2(v, r.lc, at, acc_at as i64, 1, rows * cols, rows * cols, (rows * cols) as i64)?;
                        at
                    }
                    None => acc_at,
                };
                let ct_at = match init_row {
                    None => {
                        self.ring_wait(&ct, 1);
                        let mk = self.mark();
                        let (d, s, nr) = (self.reg()?, self.reg()?, self.reg()?);
                        self.li(d, ct_at as i64)?;
                        self.li(s, sum_at as i64)?;
                        self.li(nr, (rows * cols) as i64)?;
                        self.emit(Instr::VBin {
                            op: VBinOp::Add,
                            d,
                            a: d,
                            b: s,
                            n: nr,
                            a_scalar: false,
                            b_scalar: false,
                        });
                        self.reset(mk);
                        ct_at
                    }
                    Some(Init { at: col, per_row: true }) => {
                        // Every row: the accumulator's row plus the row's init value.
                        let at = self.ring_acquire(&mut ct);
                        for q in 0..rows {
                            let mk = self.mark();
                            let (d, x, y) = (self.reg()?, self.reg()?, self.reg()?);
                            self.li(d, (at + q * cols) as i64)?;
                            self.li(x, (sum_at + q * cols) as i64)?;
                            self.li(y, (col + r0 + q) as i64)?;
                            let nr = self.konst(cols as i64)?;
                            self.emit(Instr::VBin {
                                op: VBinOp::Add,
                                d,
                                a: x,
                                b: y,
                                n: nr,
                                a_scalar: false,
                                b_scalar: true,
                            });
                            self.reset(mk);
                        }
                        at
                    }
                    Some(Init { at: row, .. }) => {
                        // Every row: the init row's columns plus the accumulator's row.
                        let at = self.ring_acquire(&mut ct);
                        for q in 0..rows {
                            let mk = self.mark();
                            let (d, x, y) = (self.reg()?, self.reg()?, self.reg()?);
                            self.li(d, (at + q * cols) as i64)?;
                            self.li(x, (row + j0) as i64)?;
                            self.li(y, (sum_at + q * cols) as i64)?;
                            let nr = self.konst(cols as i64)?;
                            self.emit(Instr::VBin {
                                op: VBinOp::Add,
                                d,
                                a: x,
                                b: y,
                                n: nr,
                                a_scalar: false,
                                b_scalar: false,
                            });
                            self.reset(mk);
                        }
                        at
                    }
                };
                self.ring_release(&acc);
                self.ring_signal(&ct, add_stage);
                // C back.
                self.ring_wait(&ct, out_stage);
                let cdst = c.base + r0 as i64 * c.outer + j0 as i64;
                self.copy2(0, v, cdst as u64, ct_at as i64, rows, cols, c.outer as u64, cols as i64)?;
                self.ring_release(&ct);
            }
        }
        for ring in [Some(&ah), Some(&bh), al.as_ref(), bl.as_ref(), Some(&acc), Some(&ct)].into_iter().flatten() {
            let ring = ring.clone();
            self.ring_drain(&ring);
        }
        Ok(())
    }
}

/// An implicit-GEMM Conv ([`Im2col`]): per block of `rows` output rows, the input rows it
/// reads (all channels) are loaded into a *strip* in `B`'s first level, laid out
/// `[cin][rs][wp]` with the padding columns zero; each K-chunk (`cc` input channels × all
/// taps) of `B = columns[k, pixels]` is then formed from the strip by one copy per (output
/// row, tap): `cc` bursts of `ow` values, a row in the padding read from a zero row (burst
/// stride 0). A block of one output row whose input rows are all in the image takes one copy
/// per tap column instead (`cc · kh` bursts: the strip's rows of a channel are `kh` apart
/// exactly as `B`'s rows of a channel's taps).
#[derive(Clone, Debug)]
struct ConvPlan {
    g: Im2col,
    /// Global-memory address of `X`.
    x: i64,
    /// Output rows per block.
    rows: u64,
    /// Input channels per K-chunk.
    cc: u64,
}

impl ConvPlan {
    /// Strip rows (input rows a block reads).
    fn rs(&self) -> u64 {
        self.rows + self.g.kh as u64 - 1
    }
    /// Strip row length (padded).
    fn wp(&self) -> u64 {
        (self.g.ow + self.g.kw - 1).max(self.g.w + self.g.pad_left) as u64
    }
    /// Elements per channel plane of the strip.
    fn plane(&self) -> u64 {
        self.rs() * self.wp()
    }
    fn strip_elems(&self) -> u64 {
        self.g.cin as u64 * self.plane()
    }
}

impl Gen<'_> {
    /// Compiles `pack; mma` (what `kiln-passes` lowers a Conv to with
    /// [`Schedule::whole_matmul`], see [`Im2col`]) as an implicit GEMM on the matrix unit
    /// (the columns are formed on chip, never stored); `None` (nothing emitted) when the pair
    /// has another form or does not fit.
    pub(crate) fn try_conv_gemm(&mut self, pack: &Stmt, mma: &Stmt) -> R<Option<()>> {
        let Stmt::Mma(m) = mma else { return Ok(None) };
        let Some(mu) = self.cfg.matrix.clone() else { return Ok(None) };
        if !self.opts.matrix || !matches!(pack, Stmt::For { .. }) {
            return Ok(None);
        }
        let np = self.nparams();
        let shapes = self.shapes.clone();
        let Some((g, wbuf, ybuf)) = Im2col::of(pack, m, &|b| shapes.get(b).cloned()) else { return Ok(None) };
        if g.x >= np || wbuf >= np || ybuf >= np {
            return Ok(None);
        }
        let v = self.vl as usize;
        let (Some(al), Some(bl), Some(lc)) =
            (self.cfg.level_index(&mu.a_level), self.cfg.level_index(&mu.b_level), self.cfg.level_index(&mu.c_level))
        else {
            return Ok(None);
        };
        let Some(ah) = self.cfg.route(0, al).and_then(|r| (r.len() == 2 || r.len() == 3).then(|| r[1])) else {
            return Ok(None);
        };
        // The strip's level: fed from global memory, one hop from B's level, zeroable (the
        // vector level or a copy from it); the fastest hop wins.
        let ls = (1..self.cfg.levels.len())
            .filter(|&l| l != bl && self.cfg.path(0, l).is_some() && (l == v || self.cfg.path(v, l).is_some()))
            .filter_map(|l| self.cfg.path(l, bl).map(|p| (l, p.bytes_per_cycle)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|x| x.0);
        let Some(ls) = ls else { return Ok(None) };
        let lc_to_v = lc == v || self.cfg.path(lc, v).is_some_and(|p| p.pipe == Pipe::V);
        if !lc_to_v || self.cfg.path(0, v).is_none() || self.cfg.path(v, 0).is_none() {
            return Ok(None);
        }
        let route = Route { ah, al, bh: ls, bl, lc };
        let (m_, n_, k_) = (m.rows as u64, (g.oh * g.ow) as u64, g.k() as u64);
        let x = self.gm[g.x] as i64;
        let Some((blk, cv)) = self.conv_blocking(&route, &g, x, m_) else { return Ok(None) };
        let a = Affine2 { base: self.gm[wbuf] as i64, outer: k_ as i64, inner: 1 };
        let c = Affine2 { base: self.gm[ybuf] as i64, outer: n_ as i64, inner: 1 };
        let p = GemmPlan { route, blk, ks: k_, conv: Some(cv), mnk: (m_, n_, k_), a, b: a, c };
        self.gemm_run(&p, None)
    }

    /// The best blocking of an implicit-GEMM Conv that fits (A resident per block of output
    /// channels, blocks of whole output rows, K-chunks of whole input channels).
    fn conv_blocking(&self, r: &Route, g: &Im2col, x: i64, m: u64) -> Option<(Blocking, ConvPlan)> {
        let mu = self.cfg.matrix.as_ref()?;
        let taps = (g.kh * g.kw) as u64;
        let (cin, oh, ow) = (g.cin as u64, g.oh as u64, g.ow as u64);
        let mut best: Option<(f64, Blocking, ConvPlan)> = None;
        let mut ccs: Vec<u64> = [1, 2, 4, 8, 16, 32, 64, 128, 256].into_iter().filter(|&c| c < cin).collect();
        ccs.push(cin);
        for bm in (1..=16).map(|i| i * mu.m as u64).filter(|&x| x < m + mu.m as u64) {
            for rows in (1..=16).filter(|&x| x <= oh) {
                for &cc in &ccs {
                    for panels in [2, 1] {
                        let (bn, kc) = (rows * ow, cc * taps);
                        let blk = Blocking { bm, bn, kc, a_resident: true, panels, stream_slots: 2 };
                        let cv = ConvPlan { g: g.clone(), x, rows, cc };
                        let nk = cin.div_ceil(cc);
                        let mut need = Need::new(self);
                        need.put(r.ah, panels * nk, bm * kc);
                        need.put(r.bh, 2, cv.strip_elems());
                        need.put(r.bh, 1, cv.wp());
                        need.put(r.bl, 2, kc * bn);
                        need.unit_operands(r, bm, bn, kc);
                        if !need.fits() {
                            continue;
                        }
                        let cost = self.conv_cost(r, &blk, &cv, m);
                        if best.as_ref().is_none_or(|(c, ..)| cost < *c) {
                            best = Some((cost, blk, cv));
                        }
                    }
                }
            }
        }
        best.map(|(_, b, c)| (b, c))
    }

    /// The estimated time of an implicit-GEMM Conv (as [`Gen::gemm_cost`]).
    fn conv_cost(&self, r: &Route, b: &Blocking, cv: &ConvPlan, m: u64) -> f64 {
        let Some(mu) = self.cfg.matrix.as_ref() else { return f64::INFINITY };
        let v = self.vl as usize;
        let g = &cv.g;
        let mut pipes: std::collections::HashMap<Pipe, f64> = Default::default();
        let mut add = |p: Option<Pipe>, c: f64| *pipes.entry(p.unwrap_or(Pipe::S)).or_insert(0.0) += c;
        let pipe = |f: usize, t: usize| self.cfg.path(f, t).map(|p| p.pipe);
        let (cin, oh, ow, taps) = (g.cin as u64, g.oh as u64, g.ow as u64, (g.kh * g.kw) as u64);
        let n = oh * ow;
        let (nm, nn, nk) = (m.div_ceil(b.bm), oh.div_ceil(cv.rows), cin.div_ceil(cv.cc));
        let (bm, bn, kc) = (b.bm.min(m), b.bn.min(n), b.kc);
        let blocks = (nm * nn) as f64;
        add(pipe(0, r.ah), (nm * nk) as f64 * self.dma_cycles(0, r.ah, bm, kc));
        if r.al != r.ah {
            add(pipe(r.ah, r.al), blocks * nk as f64 * self.dma_cycles(r.ah, r.al, 1, bm * kc));
        }
        add(pipe(0, r.bh), blocks * cv.rs() as f64 * self.dma_cycles(0, r.bh, cin, g.w as u64));
        let copies = if cv.rows == 1 { g.kw as u64 } else { taps * cv.rows } as f64;
        add(pipe(r.bh, r.bl), blocks * nk as f64 * copies * self.dma_cycles(r.bh, r.bl, cv.cc.min(cin), ow));
        let tiles = bm.div_ceil(mu.m as u64) * bn.div_ceil(mu.n as u64) * kc.div_ceil(mu.k as u64);
        add(Some(Pipe::M), blocks * nk as f64 * (mu.startup_cycles as u64 + tiles * mu.tile_cycles()) as f64);
        add(pipe(0, v), blocks * self.dma_cycles(0, v, bm, bn));
        add(pipe(v, 0), blocks * self.dma_cycles(v, 0, bm, bn));
        let vec = (self.cfg.vector.startup_cycles as u64 + (bm * bn).div_ceil(self.cfg.lanes())) as f64;
        add(Some(Pipe::V), blocks * vec);
        if r.lc != v {
            add(pipe(r.lc, v), blocks * self.dma_cycles(r.lc, v, 1, bm * bn));
        }
        add(Some(Pipe::S), blocks * nk as f64 * (copies * 6.0 + 24.0));
        pipes.values().copied().fold(0.0, f64::max)
    }

    /// Zeroes every strip slot once (the padding columns stay zero: loads write the rows'
    /// interiors only) and a zero row of the strips' level, fenced by barriers; returns the
    /// zero row's address.
    fn zero_strips(&mut self, cv: &ConvPlan, ls: usize, slots: &[u64]) -> R<u64> {
        let v = self.vl as usize;
        let n = cv.strip_elems();
        let zrow = self.level_alloc(ls, cv.wp())?;
        let mut slots = slots.to_vec();
        slots.push(zrow);
        self.emit(Instr::Barrier);
        if ls == v {
            for &at in &slots {
                let mk = self.mark();
                let (d, nr) = (self.reg()?, self.reg()?);
                self.li(d, at as i64)?;
                self.li(nr, if at == zrow { cv.wp() } else { n } as i64)?;
                self.emit(Instr::VDup { d, n: nr, value: 0.0 });
                self.reset(mk);
            }
        } else {
            let top = self.ub.top;
            let free = self.ub.cap.saturating_sub(self.ub.top.next_multiple_of(self.ub.align));
            let zl = n.min(free).min(16384);
            if zl == 0 {
                return Err(self.does_not_fit(v, 4));
            }
            let z = self.ub_alloc(zl)?;
            let mk = self.mark();
            let (d, nr) = (self.reg()?, self.reg()?);
            self.li(d, z as i64)?;
            self.li(nr, zl as i64)?;
            self.emit(Instr::VDup { d, n: nr, value: 0.0 });
            self.reset(mk);
            self.emit(Instr::Barrier);
            for &at in &slots {
                let n = if at == zrow { cv.wp() } else { n };
                let mut off = 0;
                while off < n {
                    let len = zl.min(n - off);
                    self.copy2(ls, v, at + off, z as i64, 1, len, len, len as i64)?;
                    off += len;
                }
            }
            self.ub.top = top;
        }
        self.emit(Instr::Barrier);
        Ok(zrow)
    }

    /// The input rows of output rows `oh0..oh0 + rows` into the strip at `at` (rows in the
    /// padding are not loaded: [`Gen::strip_columns`] reads the zero row for them).
    fn strip_load(&mut self, cv: &ConvPlan, ls: usize, at: u64, oh0: u64, rows: u64) -> R<()> {
        let g = &cv.g;
        let (h, w) = (g.h, g.w as u64);
        let (wp, plane) = (cv.wp(), cv.plane());
        for s in 0..rows + g.kh as u64 - 1 {
            let ih = oh0 as i64 - g.pad_top + s as i64;
            if (0..h).contains(&ih) {
                let dst = at + s * wp + g.pad_left as u64;
                let src = cv.x + ih * g.w;
                self.copy2(ls, 0, dst, src, g.cin as u64, w, plane, h * g.w)?;
            }
        }
        Ok(())
    }

    /// The K-chunk of input channels `ci0..` (`kl` values of K) of the columns of output rows
    /// `oh0..oh0 + rows` (`cols` pixels) from the strip at `strip` into `to` in level `lb`:
    /// `B[(c·kh + ky)·kw + kx, t·ow + ox] = strip[ci0 + c][t + ky][ox + kx]`.
    #[allow(clippy::too_many_arguments)]
    fn strip_columns(
        &mut self,
        cv: &ConvPlan,
        (ls, lb): (usize, usize),
        (strip, zrow, to): (u64, u64, u64),
        oh0: u64,
        rows: u64,
        ci0: u64,
        kl: u64,
        cols: u64,
    ) -> R<()> {
        let g = &cv.g;
        let (kh, kw, ow) = (g.kh as u64, g.kw as u64, g.ow as u64);
        let count = kl / (kh * kw);
        let (wp, plane) = (cv.wp(), cv.plane());
        let inside = |s: u64| (0..g.h).contains(&(oh0 as i64 - g.pad_top + s as i64));
        if rows == 1 && cv.rs() == kh && (0..kh).all(inside) {
            // Channel c's strip rows are `wp` apart and `kh·wp` from channel c + 1: one run of
            // `count · kh` bursts per tap column.
            for kx in 0..kw {
                let src = strip + ci0 * plane + kx;
                self.copy2(lb, ls, to + kx * cols, src as i64, count * kh, ow, kw * cols, wp as i64)?;
            }
            return Ok(());
        }
        for t in 0..rows {
            for ky in 0..kh {
                let s = t + ky;
                for kx in 0..kw {
                    let dst = to + (ky * kw + kx) * cols + t * ow;
                    if inside(s) {
                        let src = strip + ci0 * plane + s * wp + kx;
                        self.copy2(lb, ls, dst, src as i64, count, ow, kh * kw * cols, plane as i64)?;
                    } else {
                        self.copy2(lb, ls, dst, (zrow + kx) as i64, count, ow, kh * kw * cols, 0)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The estimated time of pipes with these loads: the busiest, plus a part of the next one
/// (two pipes loaded nearly alike do not overlap perfectly: each waits on the other's flags).
fn busiest(pipes: &std::collections::HashMap<Pipe, f64>) -> f64 {
    let mut v: Vec<f64> = pipes.values().copied().collect();
    v.sort_by(|a, b| b.total_cmp(a));
    v.first().copied().unwrap_or(0.0) + 0.3 * v.get(1).copied().unwrap_or(0.0)
}

/// The init nest's store (inside its column loop), as the body of a one-row loop.
fn init_body(init: &Stmt) -> Stmt {
    match init {
        Stmt::For { body, .. } => body[0].clone(),
        s => s.clone(),
    }
}

/// Whether `v` loads from buffer `buf`.
fn val_loads(v: &Val, buf: usize) -> bool {
    let mut found = false;
    visit(v, &mut |x| found |= matches!(x, Val::Load { buf: b, .. } if *b == buf));
    found
}

fn visit(v: &Val, f: &mut dyn FnMut(&Val)) {
    f(v);
    match v {
        Val::Const(_) | Val::Load { .. } | Val::FromIdx(_) | Val::Scalar(_) => {}
        Val::Un(_, x) => visit(x, f),
        Val::Bin(_, a, b) => {
            visit(a, f);
            visit(b, f);
        }
        Val::Reduce { body, .. } => visit(body, f),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => {
            visit(then, f);
            visit(other, f);
        }
        Val::Where { cond, then, other } => {
            visit(cond, f);
            visit(then, f);
            visit(other, f);
        }
    }
}
