//! Code generation: a kernel-dialect [`Kernel`] at concrete shapes → a [`Program`].
//!
//! Every symbolic size is bound first (each [`Idx::Dim`] becomes a constant), so the program
//! is specialized to one binding. Global memory holds the kernel's buffers one after another
//! (inputs, then outputs, each aligned to the global level's alignment). [`Local`](kiln_ir::kernel::Local) buffers
//! live in the vector unit's level (UB); a local bigger than half of it goes to global
//! memory instead, as a scratch buffer of the program (`.buffer tmp`,
//! [`Options::spill_locals`]). Every other intermediate stays in UB.
//!
//! Statements are compiled by the best form that applies, falling back to a slower one:
//!
//! 1. **Streams** (`stream`): a loop whose body is a *row* of vector work (stores in inner
//!    loops, `Let`s of reductions, stores of scalars) becomes a software pipeline over tiles
//!    of rows: MTE2 brings each tile's operands into UB (DMA with 2-D strides; a row-invariant
//!    operand once), V computes the row (inner loops and [`Val::Reduce`] as vector ops over
//!    whole rows, `Let`s as one-element cells, conditions by splitting the lanes), MTE3
//!    writes the results back; every buffer has two slots (ping-pong) and counting flags let
//!    MTE2 load tile i+1 while V computes tile i and MTE3 stores tile i-1. A loop too long for
//!    UB is strip-mined. Values computed inside the row (fusion's intermediates) never leave
//!    UB; a subexpression the row needs twice is computed once; a buffer every row
//!    accumulates into (MatMul's C over k) stays in UB for the whole stream.
//! 2. **Matrix streams** (`matrix`): a loop of [`Stmt::Mma`] tiles on the matrix unit (A and
//!    B gathered by multi-dim DMA patterns and moved along the DMA routes to the matrix unit's
//!    levels, `mmad`, then the accumulators added into C), pipelined across tiles; operands
//!    that do not depend on the tile are loaded once; a long reduction is cut into chunks
//!    accumulated in place. Without a matrix unit, V multiplies-accumulates (`vmla`).
//!    A whole GEMM (one `Mma` of many rows and columns, `kiln-passes`'
//!    `Schedule::whole_matmul`) is blocked for the matrix unit instead (`matrix/gemm.rs`): a
//!    resident panel of one operand, K-chunks of the other streamed through rings, all of K
//!    accumulated in the unit's accumulator level, the init of `C` folded in when it does not
//!    depend on the row.
//! 3. **Generic** (`generic`): any statement, one element at a time (one-element DMAs
//!    fenced by barriers, vector ops of length one): slow but exact.
//!
//! The pipes are ordered by flags inside a stream and by a `barrier` between parts, so
//! programs are race-free (the simulator checks).
//!
//! What `compile` needs: one shape per kernel buffer (inputs then outputs, symbolic dims
//! consistent), f32 buffers at the global level, and locals whose UB part fits
//! ([`NpuError::DoesNotFit`] otherwise).

mod affine;
mod generic;
mod guarded;
mod matrix;
mod scalar;
mod stream;

use crate::config::NpuConfig;
use crate::isa::{BufKind, GmBuffer, Instr, Pipe, Program, Reg, REGS};
use crate::{human_bytes, NpuError};
use kiln_ir::kernel::{Idx, Kernel, Level, Mma, Stmt, Val};
use kiln_ir::{DType, Dim};
use std::collections::HashMap;

type R<T> = Result<T, NpuError>;

/// Compiles `kernel` for `cfg` at concrete `shapes` (one per kernel buffer: inputs, then
/// outputs). The program's global-memory buffers are the kernel's, in order.
pub fn compile(kernel: &Kernel, shapes: &[Vec<usize>], cfg: &NpuConfig) -> Result<Program, NpuError> {
    compile_with(kernel, shapes, cfg, &Options::default())
}

/// Options of the code generator (tests use them to compare forms).
#[derive(Clone, Debug)]
pub struct Options {
    /// Compile streams (off: every statement takes the generic path).
    pub streams: bool,
    /// Slots per stream buffer (1: no double buffering).
    pub slots: u32,
    /// Use the matrix unit for [`Stmt::Mma`] when the machine has one.
    pub matrix: bool,
    /// Locals that do not fit half of the vector unit's level live in global memory (a
    /// scratch buffer of the program, `.buffer tmp`); off, they are [`NpuError::DoesNotFit`].
    pub spill_locals: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { streams: true, slots: 2, matrix: true, spill_locals: true }
    }
}

/// [`compile`] with explicit options.
pub fn compile_with(kernel: &Kernel, shapes: &[Vec<usize>], cfg: &NpuConfig, opts: &Options) -> R<Program> {
    cfg.validate()?;
    let mut g = Gen::new(kernel, shapes, cfg, opts)?;
    g.kernel()?;
    g.finish()
}

/// A forward reference to an instruction index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Label(usize);

/// A scalar operand: a constant or a register (`temp`: a temporary the consumer may
/// overwrite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    K(i64),
    R(Reg),
    T(Reg),
}

/// A bump allocator over one scratchpad level (elements), with stack marks.
#[derive(Clone, Debug)]
pub(crate) struct Alloc {
    pub top: u64,
    pub cap: u64,
    pub align: u64,
    pub peak: u64,
}

impl Alloc {
    pub fn alloc(&mut self, n: u64) -> Option<u64> {
        let at = self.top.next_multiple_of(self.align);
        let end = at.checked_add(n.max(1))?;
        if end > self.cap {
            return None;
        }
        self.top = end;
        self.peak = self.peak.max(end);
        Some(at)
    }
}

pub(crate) struct Gen<'a> {
    pub cfg: &'a NpuConfig,
    pub opts: Options,
    /// The kernel's own parameters (after them: locals spilled to global memory).
    kernel_params: usize,
    /// The kernel with every size bound.
    pub k: Kernel,
    /// Shapes of the parameters, then of the locals.
    pub shapes: Vec<Vec<usize>>,
    /// Global-memory offset of each parameter.
    pub gm: Vec<u64>,
    /// The vector unit's level.
    pub vl: u8,
    pub code: Vec<Instr>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
    /// Next free temporary register (a stack: `r0..next` are taken).
    next_reg: u8,
    /// Registers at the top holding constants for the whole program.
    konsts: Vec<(i64, Reg)>,
    /// Registers up to this one have been temporaries somewhere (constants stay above).
    high_reg: u8,
    /// Registers of the scalar loop variables in scope.
    pub vars: HashMap<usize, Reg>,
    /// Upper bounds (exclusive) of the loop variables in scope.
    pub ranges: HashMap<usize, i64>,
    /// Allocation in the vector level.
    pub ub: Alloc,
    /// Cells of f32 constants.
    pub consts: HashMap<u32, u64>,
    /// Cells of `Let` slots.
    pub slots: HashMap<usize, u64>,
    /// UB address of each local.
    pub locals: Vec<u64>,
    /// Flag ids in use per pipe pair.
    flag_ids: HashMap<(Pipe, Pipe), u8>,
    /// Allocations in the levels other than the vector unit's (matrix streams).
    pub lvl: HashMap<usize, Alloc>,
}

fn unsupported(msg: impl Into<String>) -> NpuError {
    NpuError::Unsupported(msg.into())
}

impl<'a> Gen<'a> {
    fn new(kernel: &Kernel, shapes: &[Vec<usize>], cfg: &'a NpuConfig, opts: &Options) -> R<Gen<'a>> {
        let k = kernel;
        if shapes.len() != k.buffers.len() {
            return Err(unsupported(format!(
                "kernel {}: {} shapes given for {} buffers",
                k.name,
                shapes.len(),
                k.buffers.len()
            )));
        }
        let mut syms: HashMap<&str, usize> = HashMap::new();
        for (b, s) in k.buffers.iter().zip(shapes) {
            if b.dtype != DType::F32 {
                return Err(unsupported(format!(
                    "kernel {}: buffer '{}' is {}, only f32 is compiled",
                    k.name, b.name, b.dtype
                )));
            }
            if b.level != Level::Global {
                return Err(unsupported(format!(
                    "kernel {}: buffer '{}' is at level {:?}, expected Global",
                    k.name, b.name, b.level
                )));
            }
            if b.shape.len() != s.len() {
                return Err(unsupported(format!(
                    "kernel {}: buffer '{}' has rank {}, its shape {:?} has {}",
                    k.name,
                    b.name,
                    b.shape.len(),
                    s,
                    s.len()
                )));
            }
            for (d, &n) in b.shape.iter().zip(s) {
                match d {
                    Dim::Known(m) if *m as usize != n => {
                        return Err(unsupported(format!(
                            "kernel {}: buffer '{}' has a dim of {m}, its shape {:?} says {n}",
                            k.name, b.name, s
                        )))
                    }
                    Dim::Sym(name) => {
                        if let Some(&m) = syms.get(&**name) {
                            if m != n {
                                return Err(unsupported(format!(
                                    "kernel {}: dim '{name}' is bound to {m} and to {n}",
                                    k.name
                                )));
                            }
                        }
                        syms.insert(name, n);
                    }
                    _ => {}
                }
            }
        }
        let mut all: Vec<Vec<usize>> = shapes.to_vec();
        for l in &k.locals {
            let mut dims = Vec::new();
            for d in &l.size {
                let v = affine::fold(d, &all).simplify();
                match v {
                    Idx::Const(c) if c >= 0 => dims.push(c as usize),
                    other => {
                        return Err(unsupported(format!(
                            "kernel {}: local '{}' has size {other}, not a constant",
                            k.name, l.name
                        )))
                    }
                }
            }
            all.push(dims);
        }
        let mut folded = affine::fold_kernel(k, &all);
        let vl = cfg.vector_level();
        // Locals that do not fit half of the vector level go to global memory: they become
        // parameters after the kernel's own (scratch buffers of the program).
        let nparams = k.buffers.len();
        let elems = |s: &Vec<usize>| s.iter().product::<usize>() as u64;
        let ub_align = cfg.align_elems(vl);
        let mut in_ub = 0u64;
        let mut spilled = Vec::new();
        for (i, s) in all[nparams..].iter().enumerate() {
            let n = elems(s).next_multiple_of(ub_align);
            if opts.spill_locals && (in_ub + n) * 4 > cfg.levels[vl].capacity_bytes / 2 {
                spilled.push(i);
            } else {
                in_ub += n;
            }
        }
        if !spilled.is_empty() {
            let kept: Vec<usize> = (0..k.locals.len()).filter(|i| !spilled.contains(i)).collect();
            let map = |b: usize| -> usize {
                if b < nparams {
                    b
                } else if let Some(p) = spilled.iter().position(|&s| s == b - nparams) {
                    nparams + p
                } else {
                    nparams + spilled.len() + kept.iter().position(|&s| s == b - nparams).unwrap_or(0)
                }
            };
            for &i in &spilled {
                let l = &k.locals[i];
                folded.buffers.push(kiln_ir::kernel::Buffer {
                    name: l.name.clone(),
                    dtype: DType::F32,
                    shape: all[nparams + i].iter().map(|&d| Dim::Known(d as u64)).collect(),
                    level: Level::Global,
                });
            }
            folded.locals = kept.iter().map(|&i| k.locals[i].clone()).collect();
            folded.body = folded.body.iter().map(|s| affine::remap_buffers(s, &map)).collect();
            let mut order: Vec<Vec<usize>> = all[..nparams].to_vec();
            order.extend(spilled.iter().map(|&i| all[nparams + i].clone()));
            order.extend(kept.iter().map(|&i| all[nparams + i].clone()));
            all = order;
        }
        let galign = cfg.align_elems(0);
        let mut gm = Vec::new();
        let mut top = 0u64;
        for s in &all[..folded.buffers.len()] {
            top = top.next_multiple_of(galign);
            gm.push(top);
            top += s.iter().product::<usize>() as u64;
        }
        let ub = Alloc { top: 0, cap: cfg.capacity_elems(vl), align: cfg.align_elems(vl), peak: 0 };
        let mut g = Gen {
            cfg,
            opts: opts.clone(),
            kernel_params: nparams,
            k: folded,
            shapes: all,
            gm,
            vl: vl as u8,
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
            next_reg: 0,
            konsts: Vec::new(),
            high_reg: 0,
            vars: HashMap::new(),
            ranges: HashMap::new(),
            ub,
            consts: HashMap::new(),
            slots: HashMap::new(),
            locals: Vec::new(),
            flag_ids: HashMap::new(),
            lvl: HashMap::new(),
        };
        // Locals first: they must fit.
        let np = g.k.buffers.len();
        let need: u64 =
            g.shapes[np..].iter().map(|s| (s.iter().product::<usize>() as u64).next_multiple_of(g.ub.align)).sum();
        if need * 4 > cfg.levels[vl].capacity_bytes {
            return Err(g.does_not_fit(vl, need * 4));
        }
        for i in 0..g.k.locals.len() {
            let n = g.shapes[np + i].iter().product::<usize>() as u64;
            let at = g.ub_alloc(n)?;
            g.locals.push(at);
        }
        Ok(g)
    }

    /// The kernel.
    fn kernel(&mut self) -> R<()> {
        // Constants and slots get cells for the whole program.
        let mut consts = Vec::new();
        let mut slots = Vec::new();
        for s in &self.k.body {
            collect_stmt(s, &mut consts, &mut slots);
        }
        for c in consts {
            let bits = (c as f32).to_bits();
            if !self.consts.contains_key(&bits) {
                let at = self.ub_alloc(1)?;
                self.consts.insert(bits, at);
            }
        }
        for s in slots {
            if !self.slots.contains_key(&s) {
                let at = self.ub_alloc(1)?;
                self.slots.insert(s, at);
            }
        }
        let mut cs: Vec<(u32, u64)> = self.consts.iter().map(|(b, a)| (*b, *a)).collect();
        cs.sort_by_key(|x| x.1);
        if !cs.is_empty() {
            let one = self.konst(1)?;
            for (bits, at) in cs {
                let d = self.konst(at as i64)?;
                self.emit(Instr::VDup { d, n: one, value: f32::from_bits(bits) });
            }
            self.emit(Instr::Barrier);
        }
        let body = std::mem::take(&mut self.k.body);
        let r = self.stmts(&body, true);
        self.k.body = body;
        r?;
        self.emit(Instr::End);
        Ok(())
    }

    /// Statements at scalar level; `top`: parts are fenced by barriers.
    pub fn stmts(&mut self, body: &[Stmt], top: bool) -> R<()> {
        let mut i = 0;
        while i < body.len() {
            // A Conv's im2col columns and their GEMM: an implicit GEMM.
            if top && i + 1 < body.len() {
                let ub = self.ub.top;
                let done = self.try_conv_gemm(&body[i], &body[i + 1])?;
                self.ub.top = ub;
                if done.is_some() {
                    self.emit(Instr::Barrier);
                    i += 2;
                    continue;
                }
            }
            // A GEMM after the init of its output: the init need not be read back.
            if top && i + 1 < body.len() {
                let ub = self.ub.top;
                let done = self.try_gemm_with_init(&body[i], &body[i + 1])?;
                self.ub.top = ub;
                if done.is_some() {
                    self.emit(Instr::Barrier);
                    i += 2;
                    continue;
                }
            }
            self.stmt(&body[i])?;
            if top {
                self.emit(Instr::Barrier);
            }
            i += 1;
        }
        Ok(())
    }

    /// One statement at scalar level: the best form that applies. Its scratchpad space is
    /// free again afterwards (the caller fences it with a barrier).
    pub fn stmt(&mut self, s: &Stmt) -> R<()> {
        let top = self.ub.top;
        let r = self.stmt_inner(s);
        self.ub.top = top;
        r
    }

    fn stmt_inner(&mut self, s: &Stmt) -> R<()> {
        if let Stmt::For { body, .. } = s {
            if matches!(body.as_slice(), [Stmt::Mma(_)]) {
                if let Some(()) = self.try_matrix(s)? {
                    return Ok(());
                }
            }
        }
        if self.opts.streams {
            if let Some(done) = self.try_stream(s)? {
                return Ok(done);
            }
        }
        match s {
            Stmt::For { var, extent, body, .. } => {
                // A loop the stream form did not take: a scalar loop over its body, each part of
                // which may be a stream.
                if self.opts.streams && body.iter().any(|b| !matches!(b, Stmt::Store { .. } | Stmt::Let { .. })) {
                    return self.scalar_loop(*var, extent, |g| {
                        for b in body {
                            g.stmt(b)?;
                            g.emit(Instr::Barrier);
                        }
                        Ok(())
                    });
                }
                self.generic_stmt(s)
            }
            Stmt::Mma(m) => self.mma(m),
            _ => self.generic_stmt(s),
        }
    }

    fn mma(&mut self, m: &Mma) -> R<()> {
        if let Some(()) = self.try_gemm(m)? {
            return Ok(());
        }
        if let Some(()) = self.try_matrix(&Stmt::Mma(Box::new(m.clone())))? {
            return Ok(());
        }
        // A tile whose taps are guarded: one plain tile per row.
        if let Some(parts) = guarded::split(m) {
            for part in parts {
                let top = self.ub.top;
                if self.try_matrix(&Stmt::Mma(Box::new(part.clone())))?.is_none() {
                    self.generic_mma(&part)?;
                }
                self.ub.top = top;
                self.emit(Instr::Barrier);
            }
            return Ok(());
        }
        self.generic_mma(m)
    }

    fn finish(mut self) -> R<Program> {
        // The constants' registers are loaded first; every branch target moves past them.
        let mut pre: Vec<Instr> = self.konsts.iter().map(|&(v, r)| Instr::Li { rd: r, imm: v }).collect();
        let shift = pre.len();
        for (at, l) in std::mem::take(&mut self.fixups) {
            let target = self.labels[l.0].ok_or_else(|| unsupported("internal: unbound label"))?;
            match &mut self.code[at] {
                Instr::Branch { target: t, .. } | Instr::Jmp { target: t } => *t = (target + shift) as u32,
                _ => return Err(unsupported("internal: a fixup on a non-branch")),
            }
        }
        pre.append(&mut self.code);
        let mut buffers = Vec::new();
        for (i, b) in self.k.buffers.iter().enumerate() {
            buffers.push(GmBuffer {
                name: b.name.clone(),
                kind: if i < self.k.inputs {
                    BufKind::In
                } else if i < self.kernel_params {
                    BufKind::Out
                } else {
                    BufKind::Tmp
                },
                offset: self.gm[i],
                len: self.shapes[i].iter().product::<usize>() as u64,
            });
        }
        Ok(Program {
            name: self.k.name.clone(),
            levels: self.cfg.levels.iter().map(|l| l.name.clone()).collect(),
            buffers,
            instrs: pre,
        })
    }

    // ---- emission -------------------------------------------------------------------------

    pub fn emit(&mut self, i: Instr) {
        self.code.push(i);
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    /// A branch to `l` (fixed up at the end).
    pub fn branch(&mut self, i: Instr, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.code.push(i);
    }

    // ---- registers ------------------------------------------------------------------------

    /// A fresh temporary register.
    pub fn reg(&mut self) -> R<Reg> {
        let limit = REGS - self.konsts.len();
        if self.next_reg as usize >= limit {
            return Err(unsupported(format!(
                "kernel {}: out of scalar registers ({} in use, {} hold constants)",
                self.k.name,
                self.next_reg,
                self.konsts.len()
            )));
        }
        self.next_reg += 1;
        self.high_reg = self.high_reg.max(self.next_reg);
        Ok(Reg(self.next_reg - 1))
    }

    pub fn mark(&self) -> u8 {
        self.next_reg
    }

    pub fn reset(&mut self, m: u8) {
        self.next_reg = m;
    }

    /// A register holding `v` for the whole program (loaded in the prologue), or a temporary
    /// loaded here when too many constants are held already.
    pub fn konst(&mut self, v: i64) -> R<Reg> {
        if let Some(&(_, r)) = self.konsts.iter().find(|(x, _)| *x == v) {
            return Ok(r);
        }
        // A constant's register is live for the whole program: never one that a temporary
        // has used anywhere (before or after in the program).
        if self.konsts.len() < 24 && (self.high_reg as usize) < REGS - self.konsts.len() - 1 {
            let r = Reg((REGS - 1 - self.konsts.len()) as u8);
            self.konsts.push((v, r));
            return Ok(r);
        }
        let r = self.reg()?;
        self.li(r, v)?;
        Ok(r)
    }

    pub fn li(&mut self, rd: Reg, v: i64) -> R<()> {
        if !(-(1i64 << 47)..(1i64 << 47)).contains(&v) {
            return Err(unsupported(format!("constant {v} does not fit in 48 bits")));
        }
        self.emit(Instr::Li { rd, imm: v });
        Ok(())
    }

    /// A register holding operand `o`.
    pub fn in_reg(&mut self, o: Op) -> R<Reg> {
        match o {
            Op::K(v) => self.konst(v),
            Op::R(r) | Op::T(r) => Ok(r),
        }
    }

    // ---- scratchpad memory ------------------------------------------------------------------

    pub fn ub_alloc(&mut self, n: u64) -> R<u64> {
        match self.ub.alloc(n) {
            Some(a) => Ok(a),
            None => {
                let need = (self.ub.top.next_multiple_of(self.ub.align) + n) * 4;
                Err(self.does_not_fit(self.vl as usize, need))
            }
        }
    }

    pub fn does_not_fit(&self, level: usize, need_bytes: u64) -> NpuError {
        NpuError::DoesNotFit {
            kernel: self.k.name.clone(),
            level: self.cfg.levels[level].name.clone(),
            need: human_bytes(need_bytes),
            have: human_bytes(self.cfg.levels[level].capacity_bytes),
            config: self.cfg.name.clone(),
        }
    }

    /// A flag id for the pipe pair (the first free; ids are reused after a barrier).
    pub fn flag(&mut self, src: Pipe, dst: Pipe) -> R<u8> {
        let n = self.flag_ids.entry((src, dst)).or_insert(0);
        if *n as u32 >= self.cfg.flags_per_pipe_pair {
            return Err(unsupported(format!(
                "kernel {}: more than {} flags between pipes {src} and {dst}",
                self.k.name, self.cfg.flags_per_pipe_pair
            )));
        }
        *n += 1;
        Ok(*n - 1)
    }

    /// Frees every flag id (after a barrier, when every flag is balanced).
    pub fn free_flags(&mut self) {
        self.flag_ids.clear();
    }

    /// The UB cell of an f32 constant.
    pub fn const_cell(&mut self, v: f64) -> R<u64> {
        let bits = (v as f32).to_bits();
        self.consts.get(&bits).copied().ok_or_else(|| unsupported(format!("internal: constant {v} has no cell")))
    }

    /// Number of parameters.
    pub fn nparams(&self) -> usize {
        self.k.buffers.len()
    }

    /// `for var in 0..extent { body }` on the scalar unit.
    pub fn scalar_loop(&mut self, var: usize, extent: &Idx, body: impl FnOnce(&mut Self) -> R<()>) -> R<()> {
        let m = self.mark();
        let n = self.sidx(extent)?;
        let max = self.upper(extent);
        self.loop_op(var, n, max, body)?;
        self.reset(m);
        Ok(())
    }

    /// `for var in 0..n { body }` on the scalar unit (`max`: an upper bound of `n`).
    pub fn loop_op(&mut self, var: usize, n: Op, max: i64, body: impl FnOnce(&mut Self) -> R<()>) -> R<()> {
        let m = self.mark();
        if let Op::K(c) = n {
            if c <= 0 {
                return Ok(());
            }
        }
        // The extent must survive the body's temporaries.
        let n = match n {
            Op::T(r) => Op::R(r),
            x => x,
        };
        let v = self.reg()?;
        self.li(v, 0)?;
        let (top, end) = (self.label(), self.label());
        if !matches!(n, Op::K(_)) {
            let nr = self.in_reg(n)?;
            self.branch(Instr::Branch { cond: crate::isa::Cond::Ge, ra: v, rb: nr, target: 0 }, end);
        }
        self.bind(top);
        let old = self.vars.insert(var, v);
        let old_range = self.ranges.insert(var, max.max(1));
        let inner = self.mark();
        body(self)?;
        self.reset(inner);
        restore(&mut self.vars, var, old);
        restore(&mut self.ranges, var, old_range);
        self.emit(Instr::AluI { op: crate::isa::AluOp::Add, rd: v, ra: v, imm: 1 });
        let nr = self.in_reg(n)?;
        self.branch(Instr::Branch { cond: crate::isa::Cond::Lt, ra: v, rb: nr, target: 0 }, top);
        self.bind(end);
        self.reset(m);
        Ok(())
    }

    /// The emission state, to roll back to when a form turns out not to apply.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            code: self.code.len(),
            labels: self.labels.len(),
            fixups: self.fixups.len(),
            konsts: self.konsts.len(),
            next_reg: self.next_reg,
            ub: self.ub.clone(),
            flag_ids: self.flag_ids.clone(),
            vars: self.vars.clone(),
            ranges: self.ranges.clone(),
        }
    }

    pub fn rollback(&mut self, s: Snapshot) {
        self.code.truncate(s.code);
        self.labels.truncate(s.labels);
        self.fixups.truncate(s.fixups);
        self.konsts.truncate(s.konsts);
        self.next_reg = s.next_reg;
        self.ub = s.ub;
        self.flag_ids = s.flag_ids;
        self.vars = s.vars;
        self.ranges = s.ranges;
    }

    /// An upper bound (exclusive) of an extent, from the ranges of the variables in scope.
    pub fn upper(&self, e: &Idx) -> i64 {
        affine::range(e, &self.ranges).map_or(i64::MAX / 4, |(_, hi)| hi)
    }
}

/// What [`Gen::rollback`] restores.
pub(crate) struct Snapshot {
    code: usize,
    labels: usize,
    fixups: usize,
    konsts: usize,
    next_reg: u8,
    ub: Alloc,
    flag_ids: HashMap<(Pipe, Pipe), u8>,
    vars: HashMap<usize, Reg>,
    ranges: HashMap<usize, i64>,
}

pub(crate) fn restore<V>(m: &mut HashMap<usize, V>, k: usize, old: Option<V>) {
    match old {
        Some(v) => {
            m.insert(k, v);
        }
        None => {
            m.remove(&k);
        }
    }
}

fn collect_val(v: &Val, consts: &mut Vec<f64>) {
    match v {
        Val::Const(c) => consts.push(*c),
        Val::Load { .. } | Val::FromIdx(_) | Val::Scalar(_) => {}
        Val::Un(_, x) => collect_val(x, consts),
        Val::Bin(_, a, b) => {
            collect_val(a, consts);
            collect_val(b, consts);
        }
        Val::Reduce { op, body, .. } => {
            consts.push(crate::eval::red_init(*op) as f64);
            collect_val(body, consts);
        }
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => {
            collect_val(then, consts);
            collect_val(other, consts);
        }
        Val::Where { cond, then, other } => {
            collect_val(cond, consts);
            collect_val(then, consts);
            collect_val(other, consts);
        }
    }
}

fn collect_stmt(s: &Stmt, consts: &mut Vec<f64>, slots: &mut Vec<usize>) {
    match s {
        Stmt::For { body, .. } => body.iter().for_each(|s| collect_stmt(s, consts, slots)),
        Stmt::Store { value, .. } => collect_val(value, consts),
        Stmt::Let { slot, value } => {
            slots.push(*slot);
            collect_val(value, consts);
        }
        Stmt::Mma(m) => {
            consts.push(0.0);
            collect_val(&m.a, consts);
        }
    }
}
