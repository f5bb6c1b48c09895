//! The simulator: runs a [`Program`] on one core, functionally and with a timing model.
//!
//! # Timing model
//!
//! The scalar unit executes scalar instructions in order at `cycles_per_instr` each and
//! spends as long to issue any other instruction into its pipe's in-order queue (`queue_depth`
//! entries; the scalar unit stalls while the queue is full). Register operands are read at
//! issue. A pipe starts its queue's head when the pipe is free, the instruction has been
//! issued and, for `wait_flag`, a matching `set_flag` has executed. Durations:
//!
//! - `copy`: `latency + ⌈bytes / bytes_per_cycle⌉` of its DMA path, every burst rounded up to
//!   [`DMA_GRANULE_BYTES`] (bursts that are contiguous on both sides count as one);
//! - vector ops: `startup + ⌈n / lanes⌉ · c`, `c` 1, or the divide or transcendental cost;
//! - `mmad`: `startup` + whole native tiles: `⌈m/M⌉·⌈n/N⌉·⌈k/K⌉ · ⌈M·N·K / f32_macs_per_cycle⌉`
//!   (f32 operands: the unit's f32 rate, see [`crate::config::MatrixUnit::f32_rate`]);
//! - flags take no time; `barrier` waits until every pipe has drained.
//!
//! Total cycles are when the last pipe drains (or the scalar unit ends, if later). A pipe's
//! utilization is its busy cycles over the total.
//!
//! # Functional model and the race checker
//!
//! Memories are f32 arrays (global memory holds the program's buffers; each scratchpad its
//! configured capacity). An instruction's effect applies when it starts, pipes interleaved in
//! the order of their start times. Results of a program whose pipes are ordered wherever they
//! share memory do not depend on that order, and the checker proves the ordering: each pipe
//! carries a vector clock that `set_flag`/`wait_flag` pairs and `barrier`s join, and every
//! access is compared with the other pipes' accesses not known to happen before it. Two
//! unordered accesses to overlapping elements, one of them a write, are an error that names
//! both instructions. Out-of-bounds accesses, division by zero in the scalar unit, deadlocks
//! and flags left set at `end` are errors too.

use crate::config::NpuConfig;
use crate::isa::{Instr, Pipe, Program, VBinOp, VRedOp, VUnOp, REGS};
use crate::{math, NpuError};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// DMA bursts move whole granules of this many bytes (a guess, DaVinci's 32 B block).
pub const DMA_GRANULE_BYTES: u64 = 32;

/// Options of a simulation.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The most instructions the scalar unit executes before the simulator gives up (an
    /// endless loop).
    pub max_instrs: u64,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions { max_instrs: 2_000_000_000 }
    }
}

/// Per-pipe statistics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PipeStats {
    pub pipe: String,
    /// Cycles the pipe was executing something.
    pub busy_cycles: u64,
    /// Instructions it executed.
    pub instrs: u64,
    /// `busy_cycles / cycles`.
    pub utilization: f64,
}

/// What a simulated run cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SimStats {
    /// Cycles from the first instruction until every pipe has drained.
    pub cycles: u64,
    /// `cycles` at the configured clock, in microseconds.
    pub time_us: f64,
    /// Per pipe (S, V, M, MTE1, MTE2, MTE3).
    pub pipes: Vec<PipeStats>,
    /// Busy fraction of the matrix unit (pipe M).
    pub matrix_utilization: f64,
    /// Busy fraction of the vector unit (pipe V, including its DMA paths if any).
    pub vector_utilization: f64,
    /// Busy fraction of the busiest DMA pipe (MTE1, MTE2, MTE3).
    pub dma_utilization: f64,
    /// Multiply-accumulates `mmad` asked for, over what its busy cycles could have done
    /// (padding to whole native tiles and startup are the waste).
    pub mac_efficiency: f64,
    /// Multiply-accumulates done by `mmad`.
    pub macs: u64,
    /// Elements the vector unit processed, over what its busy cycles could have processed.
    pub lane_efficiency: f64,
    /// Bytes moved per DMA path, keyed `FROM->TO`.
    pub bytes: BTreeMap<String, u64>,
    /// Bytes read from and written to global memory (all paths).
    pub gm_bytes: u64,
    /// Instructions executed, by family (scalar, branch, sync, copy, vector, mmad).
    pub instr_counts: BTreeMap<String, u64>,
    /// All instructions executed.
    pub instrs: u64,
}

impl SimStats {
    /// A short multi-line report.
    pub fn report(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "cycles {} ({:.2} us), instructions {}", self.cycles, self.time_us, self.instrs);
        for p in &self.pipes {
            if p.instrs > 0 {
                let _ = writeln!(
                    s,
                    "  {:<4} busy {:>10} ({:5.1}%), {} instructions",
                    p.pipe,
                    p.busy_cycles,
                    100.0 * p.utilization,
                    p.instrs
                );
            }
        }
        for (path, b) in &self.bytes {
            let _ = writeln!(s, "  {path}: {}", crate::human_bytes(*b));
        }
        s
    }

    /// The stats of pipe `p`.
    pub fn pipe(&self, p: Pipe) -> &PipeStats {
        &self.pipes[p.index()]
    }
}

/// A run of a copy or a vector operand: `n` bursts of `len` elements, `stride` apart.
#[derive(Clone, Copy, Debug)]
struct Pattern {
    level: u8,
    start: i64,
    n: i64,
    len: i64,
    stride: i64,
}

impl Pattern {
    fn contiguous(level: u8, start: i64, len: i64) -> Pattern {
        Pattern { level, start, n: 1, len, stride: len }
    }

    fn is_empty(&self) -> bool {
        self.n <= 0 || self.len <= 0
    }

    /// Lowest and one past the highest element touched (saturating: huge patterns are out of
    /// bounds, never an overflow).
    fn bounds(&self) -> (i64, i64) {
        let last = self.start as i128 + (self.n as i128 - 1) * self.stride as i128;
        let lo = (self.start as i128).min(last);
        let hi = (self.start as i128).max(last) + self.len as i128;
        let clamp = |x: i128| x.clamp(i64::MIN as i128 / 2, i64::MAX as i128 / 2) as i64;
        (clamp(lo), clamp(hi))
    }

    /// Whether a burst of `self` covers an element of `[a, b)`.
    fn hits_range(&self, a: i64, b: i64) -> bool {
        let (lo, hi) = self.bounds();
        if hi <= a || b <= lo {
            return false;
        }
        if self.n == 1 || self.stride.abs() <= self.len {
            return true;
        }
        // Normalize to a positive stride.
        let (start, stride) = if self.stride < 0 {
            (self.start + (self.n - 1) * self.stride, -self.stride)
        } else {
            (self.start, self.stride)
        };
        // Bursts k with start + k·stride < b and start + k·stride + len > a.
        let k_lo = (a - self.len - start).div_euclid(stride) + 1;
        let k_hi = (b - 1 - start).div_euclid(stride);
        k_lo.max(0) <= k_hi.min(self.n - 1)
    }

    fn overlaps(&self, o: &Pattern) -> bool {
        if self.level != o.level || self.is_empty() || o.is_empty() {
            return false;
        }
        let (small, big) = if self.n <= o.n { (self, o) } else { (o, self) };
        (0..small.n).any(|k| {
            let s = small.start + k * small.stride;
            big.hits_range(s, s + small.len)
        })
    }
}

/// An issued instruction with its register operands read.
#[derive(Clone, Debug)]
struct Issued {
    pc: usize,
    ins: Instr,
    issue: u64,
    /// Register values (by operand position).
    ops: [i64; 7],
}

#[derive(Clone, Copy, Debug)]
struct Access {
    epoch: u64,
    pc: usize,
    pat: Pattern,
    write: bool,
}

type Clock = [u64; 6];

#[derive(Default)]
struct PipeState {
    queue: VecDeque<Issued>,
    free: u64,
    busy: u64,
    count: u64,
    clock: Clock,
    /// Accesses not yet known to happen before every other pipe's next instruction.
    hist: VecDeque<Access>,
    /// Epochs up to this one were dropped from `hist`.
    pruned: u64,
    /// Executed something since the last barrier.
    active: bool,
}

/// How many accesses a pipe's history keeps before pruning.
const HIST_PRUNE: usize = 1 << 12;
const HIST_CAP: usize = 1 << 16;

struct Sim<'a> {
    p: &'a Program,
    cfg: &'a NpuConfig,
    max_instrs: u64,
    mem: Vec<Vec<f32>>,
    regs: [i64; REGS],
    time: u64,
    pipes: Vec<PipeState>,
    flags: HashMap<(Pipe, Pipe, u8), VecDeque<(u64, Clock)>>,
    /// Pipe of each DMA path `(src level, dst level)` of the program's level numbering.
    path_pipe: HashMap<(u8, u8), (Pipe, f64, u64)>,
    stats: SimStats,
    /// Element operations the vector unit did.
    lane_ops: u64,
    lane_capacity: u64,
}

fn err(msg: impl Into<String>) -> NpuError {
    NpuError::Sim(msg.into())
}

/// Runs `p` on one core of `cfg`. `buffers` are the program's input and output buffers in
/// order (as [`crate::compile`] lays them out: the kernel's buffers); outputs are written back.
pub fn simulate(p: &Program, cfg: &NpuConfig, buffers: &mut [Vec<f32>]) -> Result<SimStats, NpuError> {
    simulate_with(p, cfg, buffers, &SimOptions::default())
}

/// [`simulate`] with options.
pub fn simulate_with(
    p: &Program,
    cfg: &NpuConfig,
    buffers: &mut [Vec<f32>],
    opts: &SimOptions,
) -> Result<SimStats, NpuError> {
    cfg.validate()?;
    // The program's levels must be the description's (the same names, in order).
    let names: Vec<&str> = cfg.levels.iter().map(|l| l.name.as_str()).collect();
    if p.levels.len() > names.len() || p.levels.iter().zip(&names).any(|(a, b)| a != b) {
        return Err(err(format!(
            "the program was built for levels [{}], the {} config has [{}]",
            p.levels.join(", "),
            cfg.name,
            names.join(", ")
        )));
    }
    let io: Vec<&crate::isa::GmBuffer> = p.buffers.iter().filter(|b| b.kind != crate::isa::BufKind::Tmp).collect();
    if io.len() != buffers.len() {
        return Err(err(format!("the program takes {} buffers, {} were given", io.len(), buffers.len())));
    }
    let mut gm_len = 0u64;
    for b in &p.buffers {
        gm_len = gm_len.max(b.offset.saturating_add(b.len));
    }
    for (b, data) in io.iter().zip(buffers.iter()) {
        if data.len() as u64 != b.len {
            return Err(err(format!("buffer '{}' has {} elements, the program expects {}", b.name, data.len(), b.len)));
        }
    }
    if gm_len > cfg.capacity_elems(0) {
        return Err(err(format!(
            "the buffers need {} of {}, the {} config has {}",
            crate::human_bytes(gm_len * 4),
            cfg.levels[0].name,
            cfg.name,
            crate::human_bytes(cfg.levels[0].capacity_bytes)
        )));
    }
    let mut mem = vec![vec![0f32; gm_len as usize]];
    for l in 1..p.levels.len() {
        mem.push(vec![0f32; cfg.capacity_elems(l) as usize]);
    }
    for (b, data) in io.iter().zip(buffers.iter()) {
        mem[0][b.offset as usize..(b.offset + b.len) as usize].copy_from_slice(data);
    }
    let mut path_pipe = HashMap::new();
    for d in &cfg.dma {
        if let (Some(f), Some(t)) = (cfg.level_index(&d.from), cfg.level_index(&d.to)) {
            path_pipe.insert((f as u8, t as u8), (d.pipe, d.bytes_per_cycle, d.latency_cycles as u64));
        }
    }
    let mut sim = Sim {
        p,
        cfg,
        max_instrs: opts.max_instrs,
        mem,
        regs: [0; REGS],
        time: 0,
        pipes: (0..6).map(|_| PipeState::default()).collect(),
        flags: HashMap::new(),
        path_pipe,
        stats: SimStats::default(),
        lane_ops: 0,
        lane_capacity: 0,
    };
    sim.run()?;
    for (b, data) in io.iter().zip(buffers.iter_mut()) {
        if b.kind == crate::isa::BufKind::Out {
            data.copy_from_slice(&sim.mem[0][b.offset as usize..(b.offset + b.len) as usize]);
        }
    }
    Ok(sim.finish())
}

impl Sim<'_> {
    fn text(&self, pc: usize) -> String {
        format!("#{pc} `{}`", self.p.line(pc))
    }

    fn run(&mut self) -> Result<(), NpuError> {
        let cpi = self.cfg.scalar.cycles_per_instr as u64;
        let mut pc = 0usize;
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > self.max_instrs {
                return Err(err(format!("gave up after {} instructions (an endless loop?)", self.max_instrs)));
            }
            let Some(&ins) = self.p.instrs.get(pc) else {
                return Err(err(format!("ran past the last instruction ({pc}) without `end`")));
            };
            self.stats.instrs += 1;
            let family = match ins {
                Instr::Li { .. } | Instr::Alu { .. } | Instr::AluI { .. } => "scalar",
                Instr::Branch { .. } | Instr::Jmp { .. } => "branch",
                Instr::SetFlag { .. } | Instr::WaitFlag { .. } | Instr::Barrier => "sync",
                Instr::End => "end",
                Instr::Copy { .. } => "copy",
                Instr::Mmad { .. } => "mmad",
                _ => "vector",
            };
            *self.stats.instr_counts.entry(family.to_string()).or_insert(0) += 1;
            let r = |x: crate::isa::Reg| self.regs[x.0 as usize];
            match ins {
                Instr::Li { rd, imm } => {
                    self.regs[rd.0 as usize] = imm;
                    self.time += cpi;
                }
                Instr::Alu { op, rd, ra, rb } => {
                    let v =
                        op.apply(r(ra), r(rb)).ok_or_else(|| err(format!("{}: division by zero", self.text(pc))))?;
                    self.regs[rd.0 as usize] = v;
                    self.time += cpi;
                }
                Instr::AluI { op, rd, ra, imm } => {
                    let v = op
                        .apply(r(ra), imm as i64)
                        .ok_or_else(|| err(format!("{}: division by zero", self.text(pc))))?;
                    self.regs[rd.0 as usize] = v;
                    self.time += cpi;
                }
                Instr::Branch { cond, ra, rb, target } => {
                    self.time += cpi;
                    if cond.holds(r(ra), r(rb)) {
                        pc = target as usize;
                        continue;
                    }
                }
                Instr::Jmp { target } => {
                    self.time += cpi;
                    pc = target as usize;
                    continue;
                }
                Instr::Barrier => {
                    self.time += cpi;
                    self.drain(pc)?;
                    self.barrier();
                }
                Instr::End => {
                    self.time += cpi;
                    self.drain(pc)?;
                    for ((s, d, id), q) in &self.flags {
                        if !q.is_empty() {
                            return Err(err(format!(
                                "flag {s}->{d} #{id} is left set {} time(s) at `end` (a set without its wait)",
                                q.len()
                            )));
                        }
                    }
                    return Ok(());
                }
                _ => {
                    let pipe = ins
                        .pipe(|s, d| self.path_pipe.get(&(s, d)).map(|x| x.0))
                        .ok_or_else(|| err(format!("{}: no DMA path between these levels", self.text(pc))))?;
                    let ops = self.operands(&ins);
                    let q = pipe.index();
                    let depth = self.cfg.queue_depth as usize;
                    while self.pipes[q].queue.len() >= depth {
                        match self.step()? {
                            Some((p, start)) if p == q => self.time = self.time.max(start),
                            Some(_) => {}
                            None => {
                                return Err(err(format!(
                                    "deadlock at {}: the scalar unit waits for room in pipe {pipe}'s queue, {}",
                                    self.text(pc),
                                    self.blocked()
                                )))
                            }
                        }
                    }
                    self.pipes[q].queue.push_back(Issued { pc, ins, issue: self.time, ops });
                    self.time += cpi;
                }
            }
            pc += 1;
        }
    }

    /// What the blocked pipes wait for.
    fn blocked(&self) -> String {
        let mut why = Vec::new();
        for (i, p) in self.pipes.iter().enumerate() {
            if let Some(h) = p.queue.front() {
                why.push(format!("pipe {} waits at {}", Pipe::ALL[i], self.text(h.pc)));
            }
        }
        if why.is_empty() {
            "and no pipe has work".into()
        } else {
            format!("{} for a flag nothing has set", why.join("; "))
        }
    }

    fn operands(&self, ins: &Instr) -> [i64; 7] {
        let r = |x: crate::isa::Reg| self.regs[x.0 as usize];
        let mut o = [0i64; 7];
        match *ins {
            Instr::Copy { dst, src, n, len, dst_stride, src_stride, .. } => {
                o[..6].copy_from_slice(&[r(dst), r(src), r(n), r(len), r(dst_stride), r(src_stride)])
            }
            Instr::VBin { d, a, b, n, .. } => o[..4].copy_from_slice(&[r(d), r(a), r(b), r(n)]),
            Instr::VUn { d, a, n, .. } | Instr::VRed { d, a, n, .. } => o[..3].copy_from_slice(&[r(d), r(a), r(n)]),
            Instr::VDup { d, n, .. } => o[..2].copy_from_slice(&[r(d), r(n)]),
            Instr::VDupR { d, s, n } => o[..3].copy_from_slice(&[r(d), r(s), r(n)]),
            Instr::VIota { d, start, step, n } => o[..4].copy_from_slice(&[r(d), r(start), r(step), r(n)]),
            Instr::Mmad { c, a, b, m, n, k, .. } => o[..6].copy_from_slice(&[r(c), r(a), r(b), r(m), r(n), r(k)]),
            _ => {}
        }
        o
    }

    /// Runs pipes until every queue is empty.
    fn drain(&mut self, pc: usize) -> Result<(), NpuError> {
        while self.pipes.iter().any(|p| !p.queue.is_empty()) {
            if self.step()?.is_none() {
                return Err(err(format!("deadlock at {}: {}", self.text(pc), self.blocked())));
            }
        }
        let last = self.pipes.iter().map(|p| p.free).max().unwrap_or(0);
        self.time = self.time.max(last);
        Ok(())
    }

    /// Every pipe's clock joins every other's; histories are cleared.
    fn barrier(&mut self) {
        let mut join = [0u64; 6];
        for p in &self.pipes {
            for i in 0..6 {
                join[i] = join[i].max(p.clock[i]);
            }
        }
        for (i, p) in self.pipes.iter_mut().enumerate() {
            p.clock = join;
            p.hist.clear();
            p.pruned = join[i];
            p.active = false;
        }
    }

    /// Starts the pipe head that can start earliest; returns the pipe and its start time, or
    /// `None` when no head can start.
    fn step(&mut self) -> Result<Option<(usize, u64)>, NpuError> {
        let mut best: Option<(u64, usize)> = None;
        for (i, p) in self.pipes.iter().enumerate() {
            let Some(h) = p.queue.front() else { continue };
            let mut t = p.free.max(h.issue);
            if let Instr::WaitFlag { src, dst, id } = h.ins {
                match self.flags.get(&(src, dst, id)).and_then(|q| q.front()) {
                    Some(&(set, _)) => t = t.max(set),
                    None => continue,
                }
            }
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, i));
            }
        }
        let Some((start, q)) = best else { return Ok(None) };
        let Some(h) = self.pipes[q].queue.pop_front() else { return Ok(None) };
        let dur = self.execute(q, &h)?;
        let p = &mut self.pipes[q];
        p.free = start + dur;
        p.busy += dur;
        p.count += 1;
        if let Instr::SetFlag { src, dst, id } = h.ins {
            let clock = self.pipes[q].clock;
            self.flags.entry((src, dst, id)).or_default().push_back((start, clock));
        }
        Ok(Some((q, start)))
    }

    /// Checks an access of pipe `q` against the other pipes' unordered accesses, then records it.
    fn access(&mut self, q: usize, pc: usize, pat: Pattern, write: bool) -> Result<(), NpuError> {
        if pat.is_empty() {
            return Ok(());
        }
        let clock = self.pipes[q].clock;
        for (p, other) in self.pipes.iter().enumerate() {
            if p == q {
                continue;
            }
            if clock[p] < other.pruned && other.hist.iter().any(|a| a.pat.level == pat.level) {
                return Err(err(format!(
                    "race checker: {} on pipe {} is not ordered after many earlier instructions of pipe {} (add a flag or a barrier)",
                    self.text(pc),
                    Pipe::ALL[q],
                    Pipe::ALL[p]
                )));
            }
            for a in other.hist.iter().rev() {
                if a.epoch <= clock[p] {
                    break;
                }
                if (write || a.write) && a.pat.overlaps(&pat) {
                    let lvl = &self.p.levels[pat.level as usize];
                    let (lo, hi) = pat.bounds();
                    return Err(err(format!(
                        "race on {lvl}[{lo}..{hi}]: {} on pipe {} {} it while {} on pipe {} {} it, and no flag or barrier orders them",
                        self.text(pc),
                        Pipe::ALL[q],
                        if write { "writes" } else { "reads" },
                        self.text(a.pc),
                        Pipe::ALL[p],
                        if a.write { "writes" } else { "reads" },
                    )));
                }
            }
        }
        let epoch = self.pipes[q].clock[q];
        self.pipes[q].hist.push_back(Access { epoch, pc, pat, write });
        if self.pipes[q].hist.len() > HIST_PRUNE {
            self.prune(q);
        }
        Ok(())
    }

    fn prune(&mut self, q: usize) {
        // Accesses every active pipe has seen (by its clock) can go.
        let seen = (0..6).filter(|&p| p != q && self.pipes[p].active).map(|p| self.pipes[p].clock[q]).min();
        let seen = seen.unwrap_or(u64::MAX);
        let st = &mut self.pipes[q];
        while st.hist.front().is_some_and(|a| a.epoch <= seen) || st.hist.len() > HIST_CAP {
            if let Some(a) = st.hist.pop_front() {
                st.pruned = st.pruned.max(a.epoch);
            }
        }
    }

    fn check(&self, pc: usize, pat: &Pattern) -> Result<(), NpuError> {
        if pat.is_empty() {
            return Ok(());
        }
        let size = self.mem[pat.level as usize].len() as i64;
        let (lo, hi) = pat.bounds();
        if lo < 0 || hi > size {
            return Err(err(format!(
                "{}: {}[{lo}..{hi}] is out of bounds (the level has {size} elements)",
                self.text(pc),
                self.p.levels[pat.level as usize]
            )));
        }
        Ok(())
    }

    /// Executes `h` on pipe `q`; returns its duration.
    fn execute(&mut self, q: usize, h: &Issued) -> Result<u64, NpuError> {
        self.pipes[q].clock[q] += 1;
        self.pipes[q].active = true;
        let o = h.ops;
        let pc = h.pc;
        let v = self.cfg.vector_level() as u8;
        let lanes = self.cfg.lanes();
        let neg = |what: &str, x: i64| -> Result<(), NpuError> {
            if x < 0 {
                return Err(err(format!("#{pc}: negative {what} {x}")));
            }
            Ok(())
        };
        match h.ins {
            Instr::SetFlag { .. } => Ok(0),
            Instr::WaitFlag { src, dst, id } => {
                let (_, clock) = self
                    .flags
                    .get_mut(&(src, dst, id))
                    .and_then(|q| q.pop_front())
                    .ok_or_else(|| err(format!("{}: no flag to take", self.text(pc))))?;
                let me = &mut self.pipes[q].clock;
                for i in 0..6 {
                    me[i] = me[i].max(clock[i]);
                }
                Ok(0)
            }
            Instr::Copy { dst_level, src_level, .. } => {
                let [dst, src, n, len, ds, ss, _] = o;
                neg("burst count", n)?;
                neg("burst length", len)?;
                let sp = Pattern { level: src_level, start: src, n, len, stride: ss };
                let dp = Pattern { level: dst_level, start: dst, n, len, stride: ds };
                self.check(pc, &sp)?;
                self.check(pc, &dp)?;
                self.access(q, pc, sp, false)?;
                self.access(q, pc, dp, true)?;
                let (s, d) = (src_level as usize, dst_level as usize);
                let bursts = if sp.is_empty() { 0 } else { n };
                for b in 0..bursts {
                    let (so, dof) = ((src + b * ss) as usize, (dst + b * ds) as usize);
                    let len = len as usize;
                    if s == d {
                        self.mem[s].copy_within(so..so + len, dof);
                    } else {
                        let (a, bm) = two(&mut self.mem, s, d);
                        bm[dof..dof + len].copy_from_slice(&a[so..so + len]);
                    }
                }
                let &(_, bw, lat) = self.path_pipe.get(&(src_level, dst_level)).ok_or_else(|| err("no path"))?;
                let bytes = (n * len) as u64 * 4;
                let key = format!("{}->{}", self.p.levels[s], self.p.levels[d]);
                *self.stats.bytes.entry(key).or_insert(0) += bytes;
                if s == 0 || d == 0 {
                    self.stats.gm_bytes += bytes;
                }
                Ok(copy_cycles(n, len, ss, ds, bw, lat))
            }
            Instr::VBin { op, a_scalar, b_scalar, .. } => {
                let [d, a, b, n, ..] = o;
                neg("length", n)?;
                let pa = Pattern::contiguous(v, a, if a_scalar { n.min(1) } else { n });
                let pb = Pattern::contiguous(v, b, if b_scalar { n.min(1) } else { n });
                let pd = Pattern::contiguous(v, d, n);
                for p in [&pa, &pb, &pd] {
                    self.check(pc, p)?;
                }
                self.access(q, pc, pa, false)?;
                self.access(q, pc, pb, false)?;
                if op == VBinOp::Mla {
                    self.access(q, pc, pd, false)?;
                }
                self.access(q, pc, pd, true)?;
                let m = &mut self.mem[v as usize];
                let (a, b, d) = (a as usize, b as usize, d as usize);
                let (sa, sb) = (!a_scalar as usize, !b_scalar as usize);
                for i in 0..n as usize {
                    m[d + i] = math::binop(op, m[a + i * sa], m[b + i * sb], m[d + i]);
                }
                Ok(self.vector_cost(n as u64, vbin_cost(self.cfg, op), lanes))
            }
            Instr::VUn { op, a_scalar, .. } => {
                let [d, a, n, ..] = o;
                neg("length", n)?;
                let pa = Pattern::contiguous(v, a, if a_scalar { n.min(1) } else { n });
                let pd = Pattern::contiguous(v, d, n);
                self.check(pc, &pa)?;
                self.check(pc, &pd)?;
                self.access(q, pc, pa, false)?;
                self.access(q, pc, pd, true)?;
                let m = &mut self.mem[v as usize];
                let (a, d, sa) = (a as usize, d as usize, !a_scalar as usize);
                if d <= a || a_scalar {
                    for i in 0..n as usize {
                        m[d + i] = math::unop(op, m[a + i * sa]);
                    }
                } else {
                    for i in (0..n as usize).rev() {
                        m[d + i] = math::unop(op, m[a + i]);
                    }
                }
                Ok(self.vector_cost(n as u64, vun_cost(self.cfg, op), lanes))
            }
            Instr::VRed { op, .. } => {
                let [d, a, n, ..] = o;
                neg("length", n)?;
                let pa = Pattern::contiguous(v, a, n);
                let pd = Pattern::contiguous(v, d, 1);
                self.check(pc, &pa)?;
                self.check(pc, &pd)?;
                self.access(q, pc, pa, false)?;
                self.access(q, pc, pd, true)?;
                let m = &mut self.mem[v as usize];
                let xs = if n == 0 { &[][..] } else { &m[a as usize..(a + n) as usize] };
                let r = match op {
                    VRedOp::Sum => xs.iter().fold(0.0f32, |s, &x| s + x),
                    VRedOp::Max => xs.iter().fold(f32::NEG_INFINITY, |s, &x| math::fmax(s, x)),
                    VRedOp::Min => xs.iter().fold(f32::INFINITY, |s, &x| math::fmin(s, x)),
                };
                m[d as usize] = r;
                Ok(self.vector_cost(n as u64, 1, lanes))
            }
            Instr::VDup { value, .. } => {
                let [d, n, ..] = o;
                neg("length", n)?;
                let pd = Pattern::contiguous(v, d, n);
                self.check(pc, &pd)?;
                self.access(q, pc, pd, true)?;
                if n > 0 {
                    self.mem[v as usize][d as usize..(d + n) as usize].fill(value);
                }
                Ok(self.vector_cost(n as u64, 1, lanes))
            }
            Instr::VDupR { .. } => {
                let [d, s, n, ..] = o;
                neg("length", n)?;
                let pd = Pattern::contiguous(v, d, n);
                self.check(pc, &pd)?;
                self.access(q, pc, pd, true)?;
                if n > 0 {
                    self.mem[v as usize][d as usize..(d + n) as usize].fill(s as f32);
                }
                Ok(self.vector_cost(n as u64, 1, lanes))
            }
            Instr::VIota { .. } => {
                let [d, start, step, n, ..] = o;
                neg("length", n)?;
                let pd = Pattern::contiguous(v, d, n);
                self.check(pc, &pd)?;
                self.access(q, pc, pd, true)?;
                let m = &mut self.mem[v as usize];
                for i in 0..n {
                    m[(d + i) as usize] = start.wrapping_add(i.wrapping_mul(step)) as f32;
                }
                Ok(self.vector_cost(n as u64, 1, lanes))
            }
            Instr::Mmad { acc, .. } => {
                let Some(mu) = self.cfg.matrix.as_ref() else {
                    return Err(err(format!("{}: the {} config has no matrix unit", self.text(pc), self.cfg.name)));
                };
                let (la, lb, lc) = (
                    self.cfg.level_index(&mu.a_level).unwrap_or(0) as u8,
                    self.cfg.level_index(&mu.b_level).unwrap_or(0) as u8,
                    self.cfg.level_index(&mu.c_level).unwrap_or(0) as u8,
                );
                let [c, a, b, m, n, k, _] = o;
                neg("m", m)?;
                neg("n", n)?;
                neg("k", k)?;
                let size = |x: i64, y: i64| {
                    x.checked_mul(y).ok_or_else(|| err(format!("#{pc}: mmad of {m}x{n}x{k} is too large")))
                };
                let (pa, pb, pc_) = (
                    Pattern::contiguous(la, a, size(m, k)?),
                    Pattern::contiguous(lb, b, size(k, n)?),
                    Pattern::contiguous(lc, c, size(m, n)?),
                );
                for p in [&pa, &pb, &pc_] {
                    self.check(pc, p)?;
                }
                self.access(q, pc, pa, false)?;
                self.access(q, pc, pb, false)?;
                if acc {
                    self.access(q, pc, pc_, false)?;
                }
                self.access(q, pc, pc_, true)?;
                if m == 0 || n == 0 {
                    return Ok(mu.startup_cycles as u64);
                }
                let (m, n, k) = (m as usize, n as usize, k as usize);
                let (a, b, c) = (a as usize, b as usize, c as usize);
                let av: Vec<f32> = if k == 0 { Vec::new() } else { self.mem[la as usize][a..a + m * k].to_vec() };
                let bv: Vec<f32> = if k == 0 { Vec::new() } else { self.mem[lb as usize][b..b + k * n].to_vec() };
                let cm = &mut self.mem[lc as usize];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = if acc { cm[c + i * n + j] } else { 0.0 };
                        for kk in 0..k {
                            s += av[i * k + kk] * bv[kk * n + j];
                        }
                        cm[c + i * n + j] = s;
                    }
                }
                self.stats.macs += (m * n * k) as u64;
                Ok(mmad_cycles(mu, m as u64, n as u64, k as u64))
            }
            _ => Err(err(format!("{}: not a pipe instruction", self.text(pc)))),
        }
    }

    fn vector_cost(&mut self, n: u64, cost: u64, lanes: u64) -> u64 {
        let repeats = n.div_ceil(lanes);
        self.lane_ops += n;
        self.lane_capacity += repeats * lanes;
        self.cfg.vector.startup_cycles as u64 + repeats * cost
    }

    fn finish(mut self) -> SimStats {
        let total = self.pipes.iter().map(|p| p.free).max().unwrap_or(0).max(self.time);
        let mut s = std::mem::take(&mut self.stats);
        s.cycles = total;
        s.time_us = total as f64 / (self.cfg.clock_ghz * 1e3);
        let util = |b: u64| if total == 0 { 0.0 } else { b as f64 / total as f64 };
        s.pipes = Pipe::ALL
            .iter()
            .map(|&p| {
                let st = &self.pipes[p.index()];
                let busy = if p == Pipe::S { self.time.min(total) } else { st.busy };
                PipeStats { pipe: p.name().into(), busy_cycles: busy, instrs: st.count, utilization: util(busy) }
            })
            .collect();
        s.matrix_utilization = util(self.pipes[Pipe::M.index()].busy);
        s.vector_utilization = util(self.pipes[Pipe::V.index()].busy);
        s.dma_utilization =
            [Pipe::Mte1, Pipe::Mte2, Pipe::Mte3].iter().map(|p| util(self.pipes[p.index()].busy)).fold(0.0, f64::max);
        if let Some(m) = &self.cfg.matrix {
            let busy = self.pipes[Pipe::M.index()].busy;
            s.mac_efficiency = if busy == 0 { 0.0 } else { s.macs as f64 / (busy as f64 * m.f32_rate() as f64) };
        }
        s.lane_efficiency =
            if self.lane_capacity == 0 { 0.0 } else { self.lane_ops as f64 / self.lane_capacity as f64 };
        s
    }
}

/// Cycles of a `copy` of `n` bursts of `len` elements (`ss`/`ds` apart at the source and the
/// destination) on a path of `bw` bytes per cycle and `lat` cycles of latency.
pub(crate) fn copy_cycles(n: i64, len: i64, ss: i64, ds: i64, bw: f64, lat: u64) -> u64 {
    if n <= 0 || len <= 0 {
        return 0;
    }
    let contiguous = n <= 1 || (ss == len && ds == len);
    let bytes = (n * len) as u64 * 4;
    let moved = if contiguous {
        bytes.div_ceil(DMA_GRANULE_BYTES) * DMA_GRANULE_BYTES
    } else {
        n as u64 * ((len as u64 * 4).div_ceil(DMA_GRANULE_BYTES) * DMA_GRANULE_BYTES)
    };
    lat + (moved as f64 / bw).ceil() as u64
}

/// Cycles of an `mmad` of `m × n × k` on matrix unit `mu` (whole native tiles).
pub(crate) fn mmad_cycles(mu: &crate::config::MatrixUnit, m: u64, n: u64, k: u64) -> u64 {
    if m * n * k == 0 {
        return mu.startup_cycles as u64;
    }
    let (tm, tn, tk) = (mu.m as u64, mu.n as u64, mu.k as u64);
    let tiles = m.div_ceil(tm) * n.div_ceil(tn) * k.div_ceil(tk);
    mu.startup_cycles as u64 + tiles * mu.tile_cycles()
}

/// Cycles of a vector op on `n` elements at `cost` cycles per repeat of `lanes`.
pub(crate) fn vector_cycles(cfg: &NpuConfig, n: u64, cost: u64) -> u64 {
    cfg.vector.startup_cycles as u64 + n.div_ceil(cfg.lanes()) * cost
}

/// Cycles per repeat of a binary vector op.
pub(crate) fn vbin_cost(cfg: &NpuConfig, op: VBinOp) -> u64 {
    (match op {
        VBinOp::Div => cfg.vector.divide_cycles,
        VBinOp::Pow => cfg.vector.transcendental_cycles,
        _ => 1,
    }) as u64
}

/// Cycles per repeat of a unary vector op.
pub(crate) fn vun_cost(cfg: &NpuConfig, op: VUnOp) -> u64 {
    (match op {
        VUnOp::Sqrt | VUnOp::Recip => cfg.vector.divide_cycles,
        VUnOp::Exp | VUnOp::Log | VUnOp::Tanh | VUnOp::Erf | VUnOp::Sigmoid => cfg.vector.transcendental_cycles,
        _ => 1,
    }) as u64
}

/// Two distinct memories, one shared and one mutable.
fn two(mem: &mut [Vec<f32>], a: usize, b: usize) -> (&[f32], &mut [f32]) {
    if a < b {
        let (x, y) = mem.split_at_mut(b);
        (&x[a], &mut y[0])
    } else {
        let (x, y) = mem.split_at_mut(a);
        (&y[0], &mut x[b])
    }
}
