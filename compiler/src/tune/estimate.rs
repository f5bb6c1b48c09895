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
//! - **Caches** ([`kernel_cost_on`] with a [`Host`]): for each cache level, the data a loop
//!   touches over all its iterations (its footprint: per buffer, the bounding box of its
//!   accesses with the loop's and inner loops' variables over their ranges) is brought in
//!   once by the outermost loop whose footprint fits the level; an innermost loop (or a
//!   register tile) that does not fit streams its footprint. So a MatMul's `B` panel
//!   `tile_k × tile_n` that fits L2 is read from L3/DRAM once per row block, and one that
//!   does not is read again per row. Bytes into each level are priced at the bandwidth of the
//!   level below it (the description's GB/s at its clock) and added to the instruction cycles.
//!
//! The weights are throughputs of a modern x86-64 core (two loads, two FMAs, one store per
//! cycle); the tuner's learned model corrects them from measurements.

use kiln_ir::kernel::{BinOp, ByZero, Idx, Kernel, Mma, Stmt, UnOp, Val};

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
    /// Cycles of the instructions alone (`cycles` without the cache traffic).
    pub compute: f64,
    /// Bytes brought into each cache level of the [`Host`], fastest first (up to 3 levels).
    pub traffic: [f64; 3],
    /// Cycles of that traffic at the levels' bandwidths.
    pub memory: f64,
}

impl KernelCost {
    /// The counts as a vector: `cycles` first, `compute` second ([`KernelCost::LEN`] long).
    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![
            self.cycles,
            self.compute,
            self.flops,
            self.heavy,
            self.loads,
            self.stores,
            self.spills,
            self.iterations,
        ];
        v.extend(self.traffic);
        v.push(self.memory);
        v
    }

    /// Length of [`KernelCost::to_vec`].
    pub const LEN: usize = 12;
}

/// One cache level as the estimate sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cache {
    pub name: String,
    pub capacity_bytes: f64,
    /// Bytes per cycle the level below fills it at.
    pub fill_bytes_per_cycle: f64,
}

/// The machine the estimate prices code for: vector lanes (f32), vector registers, and its
/// caches, fastest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub lanes: usize,
    pub registers: usize,
    pub caches: Vec<Cache>,
}

impl Host {
    /// From a machine description (levels slowest first; the slowest is the backing store,
    /// software-managed levels are not caches): `lanes` f32 lanes per vector.
    pub fn from_machine(md: &kiln_ir::machine::MachineDescription, lanes: usize) -> Host {
        let mut caches = Vec::new();
        for i in (1..md.levels.len()).rev() {
            let (l, below) = (&md.levels[i], &md.levels[i - 1]);
            if l.software_managed || caches.len() == 3 {
                continue;
            }
            caches.push(Cache {
                name: l.name.clone(),
                capacity_bytes: l.capacity_bytes as f64,
                fill_bytes_per_cycle: (below.bandwidth_gbps / md.clock_ghz.max(1e-3)).max(1e-3),
            });
        }
        Host { lanes, registers: md.vector_registers as usize, caches }
    }
}

/// Stops a walk that would take too long (a huge unrolled nest).
const MAX_VISITS: u64 = 2_000_000;

struct Walk<'a> {
    shapes: &'a [Vec<usize>],
    vars: Vec<i64>,
    lanes: f64,
    registers: usize,
    caches: &'a [Cache],
    /// Per cache level: whether an enclosing loop has brought this iteration's data in.
    fitted: Vec<bool>,
    c: KernelCost,
    visits: u64,
}

/// The estimate of `k` at `shapes` (its buffers' shapes, inputs then outputs) for vectors of
/// `lanes` f32 lanes and `registers` vector registers, instructions only (no caches).
pub fn kernel_cost(k: &Kernel, shapes: &[Vec<usize>], lanes: usize, registers: usize) -> Result<KernelCost, String> {
    kernel_cost_on(k, shapes, &Host { lanes, registers, caches: Vec::new() })
}

/// The estimate of `k` at `shapes` on `host`: instructions and cache traffic.
pub fn kernel_cost_on(k: &Kernel, shapes: &[Vec<usize>], host: &Host) -> Result<KernelCost, String> {
    if shapes.len() != k.buffers.len() {
        return Err(format!("kernel {}: {} shapes for {} buffers", k.name, shapes.len(), k.buffers.len()));
    }
    let mut all = shapes.to_vec();
    for l in &k.locals {
        let w = Walk::new(&all, host);
        let size = l.size.iter().map(|i| w.idx(i).map(|v| v.max(0) as usize)).collect::<Result<Vec<_>, _>>()?;
        all.push(size);
    }
    let mut w = Walk::new(&all, host);
    w.stmts(&k.body, 1.0)?;
    let c = &mut w.c;
    c.compute = 0.5 * c.flops + 4.0 * c.heavy + 0.5 * c.loads + c.stores + c.spills + 0.5 * c.iterations;
    c.memory = c.traffic.iter().zip(host.caches.iter()).map(|(t, l)| t / l.fill_bytes_per_cycle).sum();
    c.cycles = c.compute + c.memory;
    Ok(w.c)
}

/// A closed range of an index over the loop variables' ranges.
type Range = (i64, i64);

fn set_range(r: &mut Vec<Option<Range>>, var: usize, x: Range) {
    if var >= r.len() {
        r.resize(var + 1, None);
    }
    r[var] = Some(x);
}

fn has_loop(body: &[Stmt]) -> bool {
    body.iter().any(|s| matches!(s, Stmt::For { .. } | Stmt::Mma(_)))
}

impl Walk<'_> {
    fn new<'b>(shapes: &'b [Vec<usize>], host: &'b Host) -> Walk<'b> {
        Walk {
            shapes,
            vars: vec![0; 64],
            lanes: host.lanes.max(1) as f64,
            registers: host.registers,
            caches: &host.caches,
            fitted: vec![false; host.caches.len()],
            c: KernelCost::default(),
            visits: 0,
        }
    }

    /// The range of `i` with the variables in `r` over their ranges (the others at their
    /// current values). Interval arithmetic: exact for the affine, clamped indices lowering
    /// makes, an over-approximation otherwise.
    fn range(&mut self, i: &Idx, r: &[Option<Range>]) -> Result<Range, String> {
        Ok(match i {
            Idx::Var(v) => match r.get(*v).copied().flatten() {
                Some(x) => x,
                None => {
                    let x = *self.var(*v);
                    (x, x)
                }
            },
            Idx::Const(_) | Idx::Dim { .. } => {
                let x = self.idx(i)?;
                (x, x)
            }
            Idx::Add(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                (a.0.saturating_add(b.0), a.1.saturating_add(b.1))
            }
            Idx::Sub(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                (a.0.saturating_sub(b.1), a.1.saturating_sub(b.0))
            }
            Idx::Mul(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                let p = [
                    a.0.saturating_mul(b.0),
                    a.0.saturating_mul(b.1),
                    a.1.saturating_mul(b.0),
                    a.1.saturating_mul(b.1),
                ];
                (*p.iter().min().expect("4"), *p.iter().max().expect("4"))
            }
            Idx::Div(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                if b.0 <= 0 {
                    (a.0.min(0), a.1.max(0))
                } else {
                    (a.0.div_euclid(if a.0 < 0 { b.0 } else { b.1 }), a.1.div_euclid(if a.1 < 0 { b.1 } else { b.0 }))
                }
            }
            Idx::Rem(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                if b.0 == b.1 && b.0 > 0 && a.1 - a.0 < b.0 && a.0.rem_euclid(b.0) <= a.1.rem_euclid(b.0) {
                    (a.0.rem_euclid(b.0), a.1.rem_euclid(b.0))
                } else {
                    (0, (b.1 - 1).max(0))
                }
            }
            Idx::Min(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                (a.0.min(b.0), a.1.min(b.1))
            }
            Idx::Max(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                (a.0.max(b.0), a.1.max(b.1))
            }
            Idx::ZeroIfOne(a, b) => {
                let (a, b) = (self.range(a, r)?, self.range(b, r)?);
                if a == (1, 1) {
                    (0, 0)
                } else if a.0 > 1 || a.1 < 1 {
                    b
                } else {
                    (b.0.min(0), b.1.max(0))
                }
            }
        })
    }

    /// Adds an access of `buf` at `index` (plus `extra` elements along the last axis) to the
    /// bounding boxes `boxes`.
    fn access(
        &mut self,
        buf: usize,
        index: &[Idx],
        extra: i64,
        r: &[Option<Range>],
        boxes: &mut Vec<(usize, Vec<Range>)>,
    ) -> Result<(), String> {
        let mut rs = index.iter().map(|i| self.range(i, r)).collect::<Result<Vec<_>, _>>()?;
        if let Some(last) = rs.last_mut() {
            last.1 += extra;
        }
        match boxes.iter_mut().find(|b| b.0 == buf && b.1.len() == rs.len()) {
            Some(b) => {
                for (x, y) in b.1.iter_mut().zip(rs) {
                    *x = (x.0.min(y.0), x.1.max(y.1));
                }
            }
            None => boxes.push((buf, rs)),
        }
        Ok(())
    }

    /// The accesses of `v` into `boxes`.
    fn val_boxes(
        &mut self,
        v: &Val,
        r: &mut Vec<Option<Range>>,
        boxes: &mut Vec<(usize, Vec<Range>)>,
    ) -> Result<(), String> {
        self.visit()?;
        match v {
            Val::Const(_) | Val::Scalar(_) | Val::FromIdx(_) => {}
            Val::Load { buf, index } => self.access(*buf, index, 0, r, boxes)?,
            Val::Un(_, x) => self.val_boxes(x, r, boxes)?,
            Val::Bin(_, a, b) => {
                self.val_boxes(a, r, boxes)?;
                self.val_boxes(b, r, boxes)?;
            }
            Val::Reduce { var, extent, body, .. } => {
                let n = self.range(extent, r)?.1;
                if n > 0 {
                    set_range(r, *var, (0, n - 1));
                    self.val_boxes(body, r, boxes)?;
                    r[*var] = None;
                }
            }
            Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => {
                self.val_boxes(then, r, boxes)?;
                self.val_boxes(other, r, boxes)?;
            }
            Val::Where { cond, then, other } => {
                self.val_boxes(cond, r, boxes)?;
                self.val_boxes(then, r, boxes)?;
                self.val_boxes(other, r, boxes)?;
            }
        }
        Ok(())
    }

    /// The accesses of `body` into `boxes`.
    fn stmt_boxes(
        &mut self,
        body: &[Stmt],
        r: &mut Vec<Option<Range>>,
        boxes: &mut Vec<(usize, Vec<Range>)>,
    ) -> Result<(), String> {
        for s in body {
            self.visit()?;
            match s {
                Stmt::For { var, extent, body, .. } => {
                    let n = self.range(extent, r)?.1;
                    if n > 0 {
                        set_range(r, *var, (0, n - 1));
                        self.stmt_boxes(body, r, boxes)?;
                        r[*var] = None;
                    }
                }
                Stmt::Store { buf, index, value } => {
                    self.access(*buf, index, 0, r, boxes)?;
                    self.val_boxes(value, r, boxes)?;
                }
                Stmt::Let { value, .. } => self.val_boxes(value, r, boxes)?,
                Stmt::Mma(m) => self.mma_boxes(m, r, boxes)?,
            }
        }
        Ok(())
    }

    fn mma_boxes(
        &mut self,
        m: &Mma,
        r: &mut Vec<Option<Range>>,
        boxes: &mut Vec<(usize, Vec<Range>)>,
    ) -> Result<(), String> {
        let mut set = vec![m.row];
        set_range(r, m.row, (0, m.rows.max(1) as i64 - 1));
        for (v, e) in &m.red {
            let n = self.range(e, r)?.1;
            set_range(r, *v, (0, (n - 1).max(0)));
            set.push(*v);
        }
        self.val_boxes(&m.a, r, boxes)?;
        let cols = m.cols as i64 - 1;
        self.access(m.b.0, &m.b.1, cols, r, boxes)?;
        self.access(m.c.0, &m.c.1, cols, r, boxes)?;
        for v in set {
            r[v] = None;
        }
        Ok(())
    }

    /// Bytes a loop over `var` in `0..n` running `body` touches (f32 elements).
    fn footprint(&mut self, var: usize, n: i64, body: &[Stmt]) -> Result<f64, String> {
        let mut r = vec![None; self.vars.len().max(var + 1)];
        r[var] = Some((0, n - 1));
        let mut boxes = Vec::new();
        self.stmt_boxes(body, &mut r, &mut boxes)?;
        Ok(self.bytes(&boxes))
    }

    fn bytes(&self, boxes: &[(usize, Vec<Range>)]) -> f64 {
        boxes
            .iter()
            .map(|(buf, rs)| {
                let shape = self.shapes.get(*buf);
                rs.iter()
                    .enumerate()
                    .map(|(a, (lo, hi))| {
                        let span = (hi - lo + 1).max(1) as f64;
                        match shape.and_then(|s| s.get(a)) {
                            Some(&d) => span.min(d.max(1) as f64),
                            None => span,
                        }
                    })
                    .product::<f64>()
                    * 4.0
            })
            .sum()
    }

    /// Charges the cache levels not brought in by an enclosing loop with `bytes` (a loop's
    /// footprint, run `weight` times) where it fits, or anyway when `innermost`; returns the
    /// levels charged here (to be released after the loop).
    fn charge(&mut self, bytes: f64, weight: f64, innermost: bool) -> Vec<usize> {
        let mut here = Vec::new();
        for (l, cache) in self.caches.iter().enumerate() {
            if !self.fitted[l] && (bytes <= cache.capacity_bytes || innermost) {
                if l < self.c.traffic.len() {
                    self.c.traffic[l] += weight * bytes;
                }
                self.fitted[l] = true;
                here.push(l);
            }
        }
        here
    }

    fn var(&mut self, v: usize) -> &mut i64 {
        if v >= self.vars.len() {
            self.vars.resize(v + 1, 0);
        }
        &mut self.vars[v]
    }

    fn idx(&self, i: &Idx) -> Result<i64, String> {
        // Guarded paths may divide by a zero extent: such a term counts 0.
        let var = |v: usize| Some(self.vars.get(v).copied().unwrap_or(0));
        let dim = |buf: usize, axis: usize| self.shapes.get(buf).and_then(|s| s.get(axis)).map(|&n| n as i64);
        i.eval(&var, &dim, ByZero::Zero).map_err(|e| e.to_string())
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
                    let charged = if self.fitted.iter().all(|&f| f) {
                        Vec::new()
                    } else {
                        let bytes = self.footprint(*var, n, body)?;
                        self.charge(bytes, weight, !has_loop(body))
                    };
                    *self.var(*var) = 0;
                    self.stmts(body, per * (n - 1) as f64)?;
                    *self.var(*var) = n - 1;
                    self.stmts(body, per)?;
                    for l in charged {
                        self.fitted[l] = false;
                    }
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
        if !self.fitted.iter().all(|&f| f) {
            let mut r = vec![None; self.vars.len()];
            let mut boxes = Vec::new();
            self.mma_boxes(m, &mut r, &mut boxes)?;
            let bytes = self.bytes(&boxes);
            for l in self.charge(bytes, weight, true) {
                self.fitted[l] = false;
            }
        }
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
