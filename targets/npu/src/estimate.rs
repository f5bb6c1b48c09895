//! A static cost estimate of a program: per-pipe work without simulating the machine.
//!
//! The estimate runs the scalar unit only (registers, branches: the loop trip counts and the
//! operands every instruction is issued with) and, for each instruction issued to a pipe, adds
//! the simulator's duration formula for it ([`crate::sim`]: DMA latency plus bytes over the
//! path's bandwidth in whole granules, vector startup plus repeats, matrix startup plus whole
//! native tiles) to that pipe's work. No memory is touched, no queue, flag or race is modelled,
//! so it costs a fraction of [`crate::simulate`] and needs no data.
//!
//! Overlap model: between two barriers the pipes run concurrently, so a segment costs its
//! busiest pipe (the scalar unit's issue time included) — [`Estimate::cycles`], a lower bound
//! of what the simulator counts. [`Estimate::serial`] is the other end: no overlap at all (the
//! sum of the pipes' work per segment). The simulated cycles of a program lie between the two,
//! nearer the first the better its pipes overlap (double buffering).

use crate::config::NpuConfig;
use crate::isa::{Instr, Pipe, Program, REGS};
use crate::sim::{copy_cycles, mmad_cycles, vbin_cost, vector_cycles, vun_cost};
use crate::NpuError;
use serde::Serialize;

/// What [`estimate`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    /// Overlap model: per barrier-delimited segment, the busiest pipe (cycles).
    pub cycles: u64,
    /// No overlap: per segment, the sum of every pipe's work (cycles).
    pub serial: u64,
    /// Work per pipe over the whole program, in [`Pipe::ALL`] order; `S` is the scalar unit's
    /// execute and issue time.
    pub busy: [u64; 6],
    /// Instructions issued to each pipe (`S`: executed by the scalar unit).
    pub instrs: [u64; 6],
    /// Bytes moved from and to global memory.
    pub gm_bytes: u64,
    /// Multiply-accumulates asked of the matrix unit.
    pub macs: u64,
}

impl Estimate {
    /// The work of pipe `p`.
    pub fn pipe(&self, p: Pipe) -> u64 {
        self.busy[p.index()]
    }
}

fn err(msg: impl Into<String>) -> NpuError {
    NpuError::Sim(format!("estimate: {}", msg.into()))
}

/// Estimates program `p` on `cfg` (see the module docs). Fails on what the scalar unit cannot
/// run (division by zero, a jump past the end, a copy on no DMA path, no matrix unit) or after
/// `2·10⁹` instructions.
pub fn estimate(p: &Program, cfg: &NpuConfig) -> Result<Estimate, NpuError> {
    estimate_with(p, cfg, 2_000_000_000)
}

/// [`estimate`] giving up after `max_instrs` scalar-unit steps.
pub fn estimate_with(p: &Program, cfg: &NpuConfig, max_instrs: u64) -> Result<Estimate, NpuError> {
    let names: Vec<&str> = cfg.levels.iter().map(|l| l.name.as_str()).collect();
    if p.levels.len() > names.len() || p.levels.iter().zip(&names).any(|(a, b)| a != b) {
        return Err(err(format!(
            "the program was built for levels [{}], not the {} config's",
            p.levels.join(", "),
            cfg.name
        )));
    }
    let mut path = std::collections::HashMap::new();
    for d in &cfg.dma {
        if let (Some(f), Some(t)) = (cfg.level_index(&d.from), cfg.level_index(&d.to)) {
            path.insert((f as u8, t as u8), (d.pipe, d.bytes_per_cycle, d.latency_cycles as u64));
        }
    }
    let cpi = cfg.scalar.cycles_per_instr as u64;
    let mut e = Estimate::default();
    let mut seg = [0u64; 6];
    let close = |e: &mut Estimate, seg: &mut [u64; 6]| {
        e.cycles += seg.iter().copied().max().unwrap_or(0);
        e.serial += seg.iter().sum::<u64>();
        for (b, s) in e.busy.iter_mut().zip(seg.iter()) {
            *b += s;
        }
        *seg = [0; 6];
    };
    let mut regs = [0i64; REGS];
    let mut pc = 0usize;
    let mut steps = 0u64;
    let s = Pipe::S.index();
    loop {
        steps += 1;
        if steps > max_instrs {
            return Err(err(format!("gave up after {max_instrs} instructions (an endless loop?)")));
        }
        let Some(&ins) = p.instrs.get(pc) else {
            return Err(err(format!("ran past the last instruction ({pc}) without `end`")));
        };
        let r = |x: crate::isa::Reg| regs[x.0 as usize];
        seg[s] += cpi;
        let zero = || err(format!("#{pc} `{}`: division by zero", p.line(pc)));
        let (pipe, work) = match ins {
            Instr::Li { rd, imm } => {
                regs[rd.0 as usize] = imm;
                (Pipe::S, 0)
            }
            Instr::Alu { op, rd, ra, rb } => {
                regs[rd.0 as usize] = op.apply(r(ra), r(rb)).ok_or_else(zero)?;
                (Pipe::S, 0)
            }
            Instr::AluI { op, rd, ra, imm } => {
                regs[rd.0 as usize] = op.apply(r(ra), imm as i64).ok_or_else(zero)?;
                (Pipe::S, 0)
            }
            Instr::Branch { cond, ra, rb, target } => {
                e.instrs[s] += 1;
                if cond.holds(r(ra), r(rb)) {
                    pc = target as usize;
                    continue;
                }
                (Pipe::S, 0)
            }
            Instr::Jmp { target } => {
                e.instrs[s] += 1;
                pc = target as usize;
                continue;
            }
            Instr::Barrier => {
                e.instrs[s] += 1;
                close(&mut e, &mut seg);
                pc += 1;
                continue;
            }
            Instr::End => {
                e.instrs[s] += 1;
                close(&mut e, &mut seg);
                return Ok(e);
            }
            Instr::SetFlag { src, .. } => (src, 0),
            Instr::WaitFlag { dst, .. } => (dst, 0),
            Instr::Copy { dst_level, src_level, dst: _, src: _, n, len, dst_stride, src_stride } => {
                let &(pipe, bw, lat) = path
                    .get(&(src_level, dst_level))
                    .ok_or_else(|| err(format!("#{pc} `{}`: no DMA path between these levels", p.line(pc))))?;
                let (n, len) = (r(n), r(len));
                if src_level == 0 || dst_level == 0 {
                    e.gm_bytes += (n.max(0) * len.max(0)) as u64 * 4;
                }
                (pipe, copy_cycles(n, len, r(src_stride), r(dst_stride), bw, lat))
            }
            Instr::VBin { op, n, .. } => (Pipe::V, vector_cycles(cfg, r(n).max(0) as u64, vbin_cost(cfg, op))),
            Instr::VUn { op, n, .. } => (Pipe::V, vector_cycles(cfg, r(n).max(0) as u64, vun_cost(cfg, op))),
            Instr::VRed { n, .. } | Instr::VDup { n, .. } | Instr::VDupR { n, .. } | Instr::VIota { n, .. } => {
                (Pipe::V, vector_cycles(cfg, r(n).max(0) as u64, 1))
            }
            Instr::Mmad { m, n, k, .. } => {
                let mu = cfg.matrix.as_ref().ok_or_else(|| {
                    err(format!("#{pc} `{}`: the {} config has no matrix unit", p.line(pc), cfg.name))
                })?;
                let (m, n, k) = (r(m).max(0) as u64, r(n).max(0) as u64, r(k).max(0) as u64);
                e.macs += m * n * k;
                (Pipe::M, mmad_cycles(mu, m, n, k))
            }
        };
        e.instrs[pipe.index()] += 1;
        if pipe != Pipe::S {
            seg[pipe.index()] += work;
        }
        pc += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::parse_asm;

    fn program(body: &str) -> Program {
        parse_asm(&format!(".kernel t\n.levels GM LDM\n.buffer in x 0 4096\n.buffer out y 4096 4096\n{body}")).unwrap()
    }

    #[test]
    fn a_copy_a_vector_op_and_a_copy_back_add_up_per_pipe() {
        let cfg = NpuConfig::preset("sunway").unwrap();
        let p = program(
            "li r1, 0\nli r2, 4096\nli r3, 0\nli r4, 1\nli r5, 1024\n\
             copy LDM, GM, r3, r1, r4, r5, r5, r5\nset_flag MTE2, V, 0\nwait_flag MTE2, V, 0\n\
             vexp.v r3, r3, r5\nset_flag V, MTE3, 0\nwait_flag V, MTE3, 0\n\
             copy GM, LDM, r2, r3, r4, r5, r5, r5\nend\n",
        );
        let e = estimate(&p, &cfg).unwrap();
        let path = |f: &str, t: &str| cfg.dma.iter().find(|d| d.from == f && d.to == t).unwrap();
        let (i, o) = (path("GM", "LDM"), path("LDM", "GM"));
        let dma = |d: &crate::config::DmaPath| d.latency_cycles as u64 + (4096.0 / d.bytes_per_cycle).ceil() as u64;
        let vec =
            cfg.vector.startup_cycles as u64 + 1024u64.div_ceil(cfg.lanes()) * cfg.vector.transcendental_cycles as u64;
        assert_eq!(e.pipe(i.pipe) + if i.pipe == o.pipe { 0 } else { e.pipe(o.pipe) }, dma(i) + dma(o));
        assert_eq!(e.pipe(Pipe::V), vec);
        assert_eq!(e.pipe(Pipe::S), 13 * cfg.scalar.cycles_per_instr as u64);
        assert_eq!(e.gm_bytes, 8192);
        assert_eq!(e.instrs[Pipe::V.index()], 3); // the op and a set and a wait
        assert!(e.cycles <= e.serial);
        assert_eq!(e.cycles, *e.busy.iter().max().unwrap());
        // The simulator, which runs the pipes in order here, takes at least the busiest pipe's
        // work and at most the sum of them all.
        let mut bufs = vec![vec![0.5f32; 4096], vec![0.0; 4096]];
        let sim = crate::simulate(&p, &cfg, &mut bufs).unwrap();
        assert!(e.cycles <= sim.cycles && sim.cycles <= e.serial, "{e:?} vs {}", sim.cycles);
    }

    #[test]
    fn loops_count_their_trips_and_barriers_split_segments() {
        let cfg = NpuConfig::preset("sunway").unwrap();
        // Ten vector ops, a barrier, ten more.
        let once = |label: &str| {
            format!(
                "li r1, 0\nli r2, 10\nli r3, 64\nli r4, 0\n{label}:\nvadd.vv r4, r4, r4, r3\naddi r1, r1, 1\nblt r1, r2, {label}\n"
            )
        };
        let p = program(&format!("{}barrier\n{}end\n", once("A"), once("B")));
        let e = estimate(&p, &cfg).unwrap();
        let one = cfg.vector.startup_cycles as u64 + 64u64.div_ceil(cfg.lanes());
        assert_eq!(e.pipe(Pipe::V), 20 * one);
        assert_eq!(e.instrs[Pipe::V.index()], 20);
        // Per segment: the busier of the scalar unit and the vector unit.
        let cpi = cfg.scalar.cycles_per_instr as u64;
        let seg_s = (4 + 30 + 1) * cpi; // the barrier and `end` close their segments
        assert_eq!(e.cycles, 2 * seg_s.max(10 * one));
        assert_eq!(e.serial, 2 * (seg_s + 10 * one));
        let mut bufs = vec![vec![0.0f32; 4096], vec![0.0; 4096]];
        let sim = crate::simulate(&p, &cfg, &mut bufs).unwrap();
        assert!(e.cycles <= sim.cycles && sim.cycles <= e.serial, "{e:?} vs {}", sim.cycles);
    }

    #[test]
    fn a_compiled_kernel_is_bounded_below_by_its_estimate_on_every_preset() {
        use kiln_ir::kernel::{Buffer, Idx, Kernel, Knobs, Level, Stmt, UnOp, Val};
        use kiln_ir::{DType, Dim};
        let buf = |name: &str| Buffer {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![Dim::sym("N")],
            level: Level::Global,
        };
        let k = Kernel {
            name: "tanh".into(),
            buffers: vec![buf("x"), buf("y")],
            inputs: 1,
            operands: vec![0],
            locals: vec![],
            body: vec![Stmt::For {
                var: 0,
                extent: Idx::Dim { buf: 1, axis: 0 },
                parallel: true,
                body: vec![Stmt::Store {
                    buf: 1,
                    index: vec![Idx::Var(0)],
                    value: Val::Un(UnOp::Tanh, Box::new(Val::Load { buf: 0, index: vec![Idx::Var(0)] })),
                }],
            }],
            knobs: Knobs::default(),
        };
        for preset in NpuConfig::preset_names() {
            let cfg = NpuConfig::preset(preset).unwrap();
            let n = 100_000;
            let p = crate::compile(&k, &[vec![n], vec![n]], &cfg).unwrap();
            let e = estimate(&p, &cfg).unwrap();
            let mut bufs = vec![vec![0.25f32; n], vec![0.0; n]];
            let sim = crate::simulate(&p, &cfg, &mut bufs).unwrap();
            assert!(e.cycles <= sim.cycles, "{preset}: {e:?} vs {}", sim.cycles);
            assert_eq!(e.gm_bytes, sim.gm_bytes, "{preset}");
            assert_eq!(e.pipe(Pipe::V), sim.pipe(Pipe::V).busy_cycles, "{preset}");
            assert!(e.serial as f64 >= 0.5 * sim.cycles as f64, "{preset}: {e:?} vs {}", sim.cycles);
        }
    }

    #[test]
    fn endless_loops_and_bad_programs_are_errors() {
        let cfg = NpuConfig::preset("sunway").unwrap();
        let e = estimate_with(&program("L:\njmp L\n"), &cfg, 1000).unwrap_err();
        assert!(e.to_string().contains("gave up after 1000"), "{e}");
        let e = estimate(&program("li r1, 1\nli r2, 0\ndiv r3, r1, r2\nend\n"), &cfg).unwrap_err();
        assert!(e.to_string().contains("division by zero"), "{e}");
        let e = estimate(&program("li r1, 1\n"), &cfg).unwrap_err();
        assert!(e.to_string().contains("without `end`"), "{e}");
        let p = program("li r1, 1\nmmad r1, r1, r1, r1, r1, r1, 0\nend\n");
        assert!(estimate(&p, &cfg).unwrap_err().to_string().contains("no matrix unit"));
    }
}
