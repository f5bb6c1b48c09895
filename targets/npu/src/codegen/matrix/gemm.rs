//! Whole GEMMs: one [`Mma`] of many rows and columns (`C[r, j] += Σ_k A[r, k] · B[k, j]`,
//! what `kiln-passes` lowers a MatMul/Gemm to with [`Schedule::whole_matmul`]) blocked for the
//! matrix unit by the code generator itself.
//!
//! The product is cut into blocks of `bm × bn` outputs and chunks of `kc` reduction values.
//! One operand is **resident**: its block (a panel of `bm` rows × K of A, or K × `bn` columns of
//! B) is loaded once into the first level of its route (DaVinci L1, MLU NRAM/WRAM) and serves
//! every block of the other, **streamed** operand, whose chunks go by in a ring of slots.
//! Each chunk moves on to the matrix unit's level when that is another one (DaVinci: L1 → L0A
//! / L0B), and `mmad` accumulates all of K into the accumulator level (L0C) — in reduction
//! order, so the sum is the evaluator's sequential one bit for bit. Per block, V adds the
//! accumulator into `C`'s tile (brought in by MTE2) and MTE3 writes it back. Every buffer is a
//! ring with counting flags between its pipes: MTE2 loads the next chunks (and the next
//! resident panel) while M multiplies, V adds and MTE3 stores the previous block.
//!
//! The code is straight-line (the sizes are known): no loop control on the scalar unit. The
//! block sizes come from a small search over the machine description: the candidate whose
//! busiest pipe (estimated from the DMA paths' bandwidths and latencies and the matrix unit's
//! tile costs) is least loaded, among those that fit every level.
//!
//! [`Schedule::whole_matmul`]: https://docs.rs/kiln-passes/latest/kiln_passes/lower/struct.Schedule.html

use super::super::affine;
use super::super::{Gen, R};
use crate::isa::{Instr, Pipe, VBinOp};
use kiln_ir::kernel::{Idx, Mma, Stmt, Val};

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

impl Gen<'_> {
    /// Compiles `m` as a blocked GEMM when it is one (one reduction loop, `a` a load, every
    /// access affine with unit stride along the reduction, `C`'s columns contiguous, sizes
    /// known) and the machine has a matrix unit; `None` otherwise (nothing emitted).
    pub(crate) fn try_gemm(&mut self, m: &Mma) -> R<Option<()>> {
        let Some(p) = self.gemm_plan(m) else { return Ok(None) };
        self.gemm_run(&p, None)
    }

    /// Compiles `init; mma` (what [`Schedule::whole_matmul`] lowers to: `C` set to a value
    /// that does not depend on the row, e.g. zero or a bias, then the GEMM into `C`) without
    /// reading `C` back: row 0 of the init is stored, brought into the vector level once, and V
    /// adds it to every row of each accumulator block. `None` when the pair has another form.
    pub(crate) fn try_gemm_with_init(&mut self, init: &Stmt, mma: &Stmt) -> R<Option<()>> {
        let Stmt::Mma(m) = mma else { return Ok(None) };
        let Stmt::For { var: rv, extent: Idx::Const(er), body, .. } = init else { return Ok(None) };
        let [Stmt::For { var: jv, extent: Idx::Const(ej), body, .. }] = body.as_slice() else { return Ok(None) };
        let [Stmt::Store { buf, index, value }] = body.as_slice() else { return Ok(None) };
        if *buf != m.c.0 || val_uses(value, *rv) || val_loads(value, *buf) {
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
        // Row 0 of the init, then that row into the vector level.
        let row0 = Stmt::For { var: *rv, extent: Idx::Const(1), parallel: false, body: vec![init_body(init)] };
        let top = self.ub.top;
        let r = (|| -> R<Option<()>> {
            self.stmt(&row0)?;
            self.emit(Instr::Barrier);
            let at = self.ub_alloc(p.mnk.1)?;
            let v = self.vl as usize;
            self.copy2(v, 0, at, p.c.base, 1, p.mnk.1, p.mnk.1, p.mnk.1 as i64)?;
            self.emit(Instr::Barrier);
            self.gemm_run(&p, Some(at))
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
        if !self.opts.matrix || m.red.len() != 1 || m.rows < 2 * mu.m as usize {
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
        let blk = self.gemm_blocking(&route, rows as u64, cols as u64, kk as u64)?;
        let gm = (self.gm[*abuf] as i64, self.gm[m.b.0] as i64, self.gm[m.c.0] as i64);
        let a = Affine2 { base: a.base + gm.0, ..a };
        let b = Affine2 { base: b.base + gm.1, ..b };
        let c = Affine2 { base: c.base + gm.2, ..c };
        Some(GemmPlan { route, blk, mnk: (rows as u64, cols as u64, kk as u64), a, b, c })
    }

    /// Emits a planned GEMM (`init_row`: the vector-level address of the row every row of `C`
    /// starts from, instead of `C` itself); `None` (nothing emitted) when it does not fit.
    fn gemm_run(&mut self, p: &GemmPlan, init_row: Option<u64>) -> R<Option<()>> {
        let snap = self.snapshot();
        let lv = self.lvl.clone();
        match self.gemm_emit(&p.route, p.blk, p.mnk, p.a, p.b, p.c, init_row) {
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

    /// The best blocking that fits, by the estimated load of the busiest pipe.
    fn gemm_blocking(&self, r: &Route, m: u64, n: u64, k: u64) -> Option<Blocking> {
        let mu = self.cfg.matrix.as_ref()?;
        let v = self.vl as usize;
        let (tm, tn, tk) = (mu.m as u64, mu.n as u64, mu.k as u64);
        let mut best: Option<(f64, Blocking)> = None;
        let free_ub = self.ub.cap.saturating_sub(self.ub.top.next_multiple_of(self.ub.align));
        for a_resident in [true, false] {
            for bm in (1..=32).map(|i| i * tm).filter(|&x| x < m + tm) {
                for bn in (1..=32).map(|i| i * tn).filter(|&x| x < n + tn) {
                    for kc in [1, 2, 4, 8, 16, 32, 64].into_iter().map(|x| x * tk).filter(|&x| x < k + tk) {
                        for panels in [2, 1] {
                            for stream_slots in [2, 3, 4] {
                                let blk = Blocking { bm, bn, kc, a_resident, panels, stream_slots };
                                // Space per level.
                                let mut need = vec![0u64; self.cfg.levels.len()];
                                let mut put = |l: usize, slots: u64, size: u64| {
                                    need[l] += slots * size.next_multiple_of(self.cfg.align_elems(l));
                                };
                                let nk = k.div_ceil(kc);
                                let (res_l, str_l, res_sz, str_sz) = if a_resident {
                                    (r.ah, r.bh, bm * kc, kc * bn)
                                } else {
                                    (r.bh, r.ah, kc * bn, bm * kc)
                                };
                                put(res_l, panels * nk, res_sz);
                                put(str_l, stream_slots, str_sz);
                                if r.al != r.ah {
                                    put(r.al, 2, bm * kc);
                                }
                                if r.bl != r.bh {
                                    put(r.bl, 2, kc * bn);
                                }
                                put(r.lc, 2, bm * bn);
                                if r.lc != v {
                                    put(v, 1, bm * bn);
                                }
                                put(v, 2, bm * bn);
                                let fits = need.iter().enumerate().all(|(l, &x)| {
                                    let cap = if l == v { free_ub } else { self.cfg.capacity_elems(l) };
                                    x == 0 || (l != 0 && x <= cap)
                                });
                                if !fits {
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

    /// The estimated busy cycles of the busiest pipe.
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
        pipes.values().copied().fold(0.0, f64::max)
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
        init_row: Option<u64>,
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
        let mut bh = self.ring(r.bh, kc * bn, b_slots, vec![into_b, next_b])?;
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
                    // B's chunk: kl × cols from B[k0.., j0..].
                    let b_new = a_resident || first;
                    let b_at = if b_new {
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
                    let b_op = hop(self, &bh, &mut bl, b_at, kl * cols, b_wait, b_rel)?;
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
                    Some(row) => {
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

/// The init nest's store (inside its column loop), as the body of a one-row loop.
fn init_body(init: &Stmt) -> Stmt {
    match init {
        Stmt::For { body, .. } => body[0].clone(),
        s => s.clone(),
    }
}

/// Whether `v` mentions loop variable `var`.
fn val_uses(v: &Val, var: usize) -> bool {
    let mut found = false;
    visit(v, &mut |x| {
        if let Val::Load { index, .. } = x {
            found |= index.iter().any(|i| i.uses(var));
        }
        if let Val::FromIdx(i) = x {
            found |= i.uses(var);
        }
        if let Val::Reduce { extent, .. } = x {
            found |= extent.uses(var);
        }
        if let Val::IfLess { lhs, rhs, .. } | Val::Select { lhs, rhs, .. } = x {
            found |= lhs.uses(var) || rhs.uses(var);
        }
    });
    found
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
