//! kiln's NPU instruction set: a small DaVinci-flavoured register machine.
//!
//! # Machine model
//!
//! One core has a **scalar unit** with 64 integer registers `r0..r63` (i64) that runs control
//! flow and address arithmetic, and issues every other instruction, in program order, to the
//! in-order queue of its **pipe**:
//!
//! | pipe | runs |
//! | --- | --- |
//! | `S` | scalar ALU ops, branches, `barrier`, `end` (on the scalar unit itself) |
//! | `V` | vector ops on the vector unit's level (UB on DaVinci, LDM on Sunway, NRAM on MLU) |
//! | `M` | `mmad` on the matrix unit (cube) |
//! | `MTE2`, `MTE1`, `MTE3`, `V` | `copy`: each DMA path of the machine description names its pipe (DaVinci: MTE2 brings data in from GM, MTE1 moves L1 → L0A/L0B, MTE3 takes it out) |
//!
//! Pipes run concurrently; only **flags** order them. `set_flag SRC, DST, id` executes on
//! pipe `SRC` (after everything `SRC` was given before it) and `wait_flag SRC, DST, id`
//! executes on pipe `DST`, which stalls until a matching set has happened. Flags are counting
//! semaphores (a set adds one, a wait takes one), so one id per direction serves a ring of
//! buffers; the ids per pipe pair are limited by the machine description. `barrier` stops the
//! scalar unit until every pipe has drained. A program must leave every flag at zero.
//!
//! Memories are arrays of f32 **elements**: addresses, lengths and strides are in elements
//! (4 bytes each), never bytes. Global memory holds the kernel's buffers at the offsets the
//! program's `.buffer` directives give.
//!
//! # Instructions
//!
//! | text | meaning |
//! | --- | --- |
//! | `li rd, imm` | `rd = imm` (48-bit signed immediate) |
//! | `add rd, ra, rb` (also `sub mul div rem min max and or xor shl shr`) | `rd = ra op rb`; `div`/`rem` floor toward −∞ |
//! | `addi rd, ra, imm` (also `subi muli divi remi mini maxi andi ori xori shli shri`) | `rd = ra op imm` (32-bit immediate) |
//! | `blt ra, rb, L` (also `bge beq bne`) / `jmp L` | branches to label `L` |
//! | `copy DST, SRC, rd, rs, rn, rlen, rdst, rsst` | DMA: for `b` in `0..rn`, `rlen` elements from `SRC[rs + b·rsst]` to `DST[rd + b·rdst]` |
//! | `vadd.vv rd, ra, rb, rn` (also `vsub vmul vdiv vmax vmin vpow vmla`) | `d[i] = a[i] op b[i]` for `i < rn`; `.vs`/`.sv`/`.ss`: `b`/`a`/both are one element broadcast; `vmla`: `d[i] += a[i]·b[i]` |
//! | `vexp.v rd, ra, rn` (also `vmov vneg vabs vlog vsqrt vrecip vtanh verf vrelu vsigmoid vfloor vceil`) | `d[i] = op(a[i])`; `.s`: `a` broadcast |
//! | `vredsum rd, ra, rn` (also `vredmax vredmin`) | `d[0] = reduce(a[0..rn])` |
//! | `vdup rd, rn, f32` / `vdupr rd, rs, rn` | `d[i] = f32` / `d[i] = rs as f32` |
//! | `viota rd, rs, rstep, rn` | `d[i] = (rs + i·rstep) as f32` |
//! | `mmad rc, ra, rb, rm, rn, rk, acc` | `C[rm×rn] (+)= A[rm×rk]·B[rk×rn]`, row-major, in the matrix unit's levels; `acc` 0 overwrites, 1 accumulates |
//! | `set_flag SRC, DST, id` / `wait_flag SRC, DST, id` / `barrier` / `end` | synchronization |
//!
//! Real DaVinci cubes read fp16 fractal (zZ/zN) tiles and accumulate in fp32; here operands
//! are row-major f32 and the matrix unit computes in f32.
//!
//! # Text and binary forms
//!
//! One instruction per line; `name:` defines a label; `;` or `//` starts a comment. A header
//! of directives names the kernel, the memory levels the program refers to (in the machine
//! description's order) and the buffers in global memory:
//!
//! ```text
//! .kernel scale
//! .levels GM UB
//! .buffer in x 0 64
//! .buffer out y 64 64
//!     li r1, 0            ; x in GM
//!     li r2, 64           ; y in GM
//!     li r3, 0            ; the tile in UB
//!     li r4, 1            ; one burst
//!     li r5, 64           ; of 64 elements
//!     copy UB, GM, r3, r1, r4, r5, r5, r5
//!     set_flag MTE2, V, 0
//!     wait_flag MTE2, V, 0
//!     vmul.vv r3, r3, r3, r5
//!     set_flag V, MTE3, 0
//!     wait_flag V, MTE3, 0
//!     copy GM, UB, r2, r3, r4, r5, r5, r5
//!     end
//! ```
//!
//! The binary form is a header (magic `KNPU`, version, the directives) followed by one
//! little-endian 64-bit word per instruction: byte 0 the opcode, then register numbers,
//! level/pipe numbers and immediates (see [`encode`]). [`decode`] rejects any word it would
//! not produce, so text → program → bytes → program → text is the identity.

mod asm;
mod binary;

pub use asm::parse_asm;
pub use binary::{decode, decode_instr, encode, encode_instr};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Number of scalar registers.
pub const REGS: usize = 64;

/// A scalar register `r0..r63`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg(pub u8);

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// An execution pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Pipe {
    S,
    V,
    M,
    #[serde(rename = "MTE1")]
    Mte1,
    #[serde(rename = "MTE2")]
    Mte2,
    #[serde(rename = "MTE3")]
    Mte3,
}

impl Pipe {
    /// Every pipe, in index order.
    pub const ALL: [Pipe; 6] = [Pipe::S, Pipe::V, Pipe::M, Pipe::Mte1, Pipe::Mte2, Pipe::Mte3];

    /// The pipe's index in [`Pipe::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The pipe's name in assembly (`S`, `V`, `M`, `MTE1`, `MTE2`, `MTE3`).
    pub fn name(self) -> &'static str {
        ["S", "V", "M", "MTE1", "MTE2", "MTE3"][self.index()]
    }

    fn from_name(s: &str) -> Option<Pipe> {
        Pipe::ALL.into_iter().find(|p| p.name() == s)
    }

    fn from_index(i: u8) -> Option<Pipe> {
        Pipe::ALL.get(i as usize).copied()
    }
}

impl fmt::Display for Pipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Scalar ALU operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AluOp {
    Add,
    Sub,
    Mul,
    /// Floor division (toward −∞; Euclidean for a negative divisor).
    Div,
    /// The remainder of [`AluOp::Div`] (never negative).
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    /// Arithmetic shift right.
    Shr,
}

const ALU_OPS: [(AluOp, &str); 12] = [
    (AluOp::Add, "add"),
    (AluOp::Sub, "sub"),
    (AluOp::Mul, "mul"),
    (AluOp::Div, "div"),
    (AluOp::Rem, "rem"),
    (AluOp::Min, "min"),
    (AluOp::Max, "max"),
    (AluOp::And, "and"),
    (AluOp::Or, "or"),
    (AluOp::Xor, "xor"),
    (AluOp::Shl, "shl"),
    (AluOp::Shr, "shr"),
];

impl AluOp {
    /// `a op b`, or `None` for a division by zero.
    pub fn apply(self, a: i64, b: i64) -> Option<i64> {
        Some(match self {
            AluOp::Add => a.wrapping_add(b),
            AluOp::Sub => a.wrapping_sub(b),
            AluOp::Mul => a.wrapping_mul(b),
            AluOp::Div => {
                if b == 0 {
                    return None;
                }
                a.checked_div_euclid(b).unwrap_or(i64::MIN)
            }
            AluOp::Rem => {
                if b == 0 {
                    return None;
                }
                a.checked_rem_euclid(b).unwrap_or(0)
            }
            AluOp::Min => a.min(b),
            AluOp::Max => a.max(b),
            AluOp::And => a & b,
            AluOp::Or => a | b,
            AluOp::Xor => a ^ b,
            AluOp::Shl => a.wrapping_shl((b & 63) as u32),
            AluOp::Shr => a.wrapping_shr((b & 63) as u32),
        })
    }

    fn index(self) -> u8 {
        ALU_OPS.iter().position(|(o, _)| *o == self).unwrap_or(0) as u8
    }

    fn name(self) -> &'static str {
        ALU_OPS[self.index() as usize].1
    }
}

/// Branch conditions (signed comparisons).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    Lt,
    Ge,
    Eq,
    Ne,
}

const CONDS: [(Cond, &str); 4] = [(Cond::Lt, "blt"), (Cond::Ge, "bge"), (Cond::Eq, "beq"), (Cond::Ne, "bne")];

impl Cond {
    /// Whether the branch is taken.
    pub fn holds(self, a: i64, b: i64) -> bool {
        match self {
            Cond::Lt => a < b,
            Cond::Ge => a >= b,
            Cond::Eq => a == b,
            Cond::Ne => a != b,
        }
    }

    fn index(self) -> u8 {
        CONDS.iter().position(|(c, _)| *c == self).unwrap_or(0) as u8
    }
}

/// Vector operations of two operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VBinOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    /// Multiply-accumulate: `d += a·b`.
    Mla,
}

const VBIN_OPS: [(VBinOp, &str); 8] = [
    (VBinOp::Add, "vadd"),
    (VBinOp::Sub, "vsub"),
    (VBinOp::Mul, "vmul"),
    (VBinOp::Div, "vdiv"),
    (VBinOp::Max, "vmax"),
    (VBinOp::Min, "vmin"),
    (VBinOp::Pow, "vpow"),
    (VBinOp::Mla, "vmla"),
];

impl VBinOp {
    fn index(self) -> u8 {
        VBIN_OPS.iter().position(|(o, _)| *o == self).unwrap_or(0) as u8
    }
}

/// Vector operations of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VUnOp {
    Mov,
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Recip,
    Tanh,
    Erf,
    Relu,
    Sigmoid,
    Floor,
    Ceil,
}

const VUN_OPS: [(VUnOp, &str); 13] = [
    (VUnOp::Mov, "vmov"),
    (VUnOp::Neg, "vneg"),
    (VUnOp::Abs, "vabs"),
    (VUnOp::Exp, "vexp"),
    (VUnOp::Log, "vlog"),
    (VUnOp::Sqrt, "vsqrt"),
    (VUnOp::Recip, "vrecip"),
    (VUnOp::Tanh, "vtanh"),
    (VUnOp::Erf, "verf"),
    (VUnOp::Relu, "vrelu"),
    (VUnOp::Sigmoid, "vsigmoid"),
    (VUnOp::Floor, "vfloor"),
    (VUnOp::Ceil, "vceil"),
];

impl VUnOp {
    fn index(self) -> u8 {
        VUN_OPS.iter().position(|(o, _)| *o == self).unwrap_or(0) as u8
    }
}

/// Vector reductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VRedOp {
    Sum,
    Max,
    Min,
}

const VRED_OPS: [(VRedOp, &str); 3] = [(VRedOp::Sum, "vredsum"), (VRedOp::Max, "vredmax"), (VRedOp::Min, "vredmin")];

impl VRedOp {
    fn index(self) -> u8 {
        VRED_OPS.iter().position(|(o, _)| *o == self).unwrap_or(0) as u8
    }
}

/// One instruction (see the module docs for the semantics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instr {
    /// `rd = imm` (48 bits, sign-extended).
    Li { rd: Reg, imm: i64 },
    /// `rd = ra op rb`.
    Alu { op: AluOp, rd: Reg, ra: Reg, rb: Reg },
    /// `rd = ra op imm`.
    AluI { op: AluOp, rd: Reg, ra: Reg, imm: i32 },
    /// Jump to instruction `target` when `ra cond rb`.
    Branch { cond: Cond, ra: Reg, rb: Reg, target: u32 },
    /// Jump to instruction `target`.
    Jmp { target: u32 },
    /// On pipe `src`: add one to flag (`src`, `dst`, `id`).
    SetFlag { src: Pipe, dst: Pipe, id: u8 },
    /// On pipe `dst`: wait until flag (`src`, `dst`, `id`) is set, then take one from it.
    WaitFlag { src: Pipe, dst: Pipe, id: u8 },
    /// The scalar unit waits until every pipe has drained.
    Barrier,
    /// The end of the program (after every pipe has drained).
    End,
    /// DMA: for `b < n`, `len` elements from `src_level[src + b·src_stride]` to
    /// `dst_level[dst + b·dst_stride]`.
    Copy { dst_level: u8, src_level: u8, dst: Reg, src: Reg, n: Reg, len: Reg, dst_stride: Reg, src_stride: Reg },
    /// `d[i] = a[i] op b[i]` for `i < n` (an operand flagged scalar is one element, broadcast).
    VBin { op: VBinOp, d: Reg, a: Reg, b: Reg, n: Reg, a_scalar: bool, b_scalar: bool },
    /// `d[i] = op(a[i])` for `i < n`.
    VUn { op: VUnOp, d: Reg, a: Reg, n: Reg, a_scalar: bool },
    /// `d[0] = reduce(a[0..n])`.
    VRed { op: VRedOp, d: Reg, a: Reg, n: Reg },
    /// `d[i] = value` for `i < n`.
    VDup { d: Reg, n: Reg, value: f32 },
    /// `d[i] = s as f32` for `i < n`.
    VDupR { d: Reg, s: Reg, n: Reg },
    /// `d[i] = (start + i·step) as f32` for `i < n`.
    VIota { d: Reg, start: Reg, step: Reg, n: Reg },
    /// `C[m×n] (+)= A[m×k]·B[k×n]` in the matrix unit's levels (`acc`: accumulate).
    Mmad { c: Reg, a: Reg, b: Reg, m: Reg, n: Reg, k: Reg, acc: bool },
}

impl Instr {
    /// The pipe the instruction runs on; a `copy` runs on its DMA path's pipe (`paths` gives
    /// the pipe of a `(src_level, dst_level)` pair), `None` when the path does not exist.
    pub fn pipe(&self, path_pipe: impl Fn(u8, u8) -> Option<Pipe>) -> Option<Pipe> {
        Some(match self {
            Instr::Copy { dst_level, src_level, .. } => return path_pipe(*src_level, *dst_level),
            Instr::VBin { .. }
            | Instr::VUn { .. }
            | Instr::VRed { .. }
            | Instr::VDup { .. }
            | Instr::VDupR { .. }
            | Instr::VIota { .. } => Pipe::V,
            Instr::Mmad { .. } => Pipe::M,
            Instr::SetFlag { src, .. } => *src,
            Instr::WaitFlag { dst, .. } => *dst,
            _ => Pipe::S,
        })
    }

    /// The branch target, for branches.
    pub fn target(&self) -> Option<u32> {
        match self {
            Instr::Branch { target, .. } | Instr::Jmp { target } => Some(*target),
            _ => None,
        }
    }
}

/// What a global-memory buffer of a program is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BufKind {
    /// A kernel input (read only).
    In,
    /// A kernel output.
    Out,
    /// Scratch space of the program's own.
    Tmp,
}

impl BufKind {
    fn name(self) -> &'static str {
        match self {
            BufKind::In => "in",
            BufKind::Out => "out",
            BufKind::Tmp => "tmp",
        }
    }
}

/// A buffer in global memory: `len` elements from element `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GmBuffer {
    pub name: String,
    pub kind: BufKind,
    pub offset: u64,
    pub len: u64,
}

/// A program: a header (kernel name, levels, global-memory buffers) and instructions.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub name: String,
    /// Memory level names; instructions refer to levels by index into this list.
    pub levels: Vec<String>,
    /// Global-memory buffers: the kernel's buffers (inputs, outputs) in order, then scratch.
    pub buffers: Vec<GmBuffer>,
    pub instrs: Vec<Instr>,
}

fn vbin_suffix(a: bool, b: bool) -> &'static str {
    match (a, b) {
        (false, false) => "vv",
        (false, true) => "vs",
        (true, false) => "sv",
        (true, true) => "ss",
    }
}

/// An f32 immediate as text that parses back to the same bits.
fn f32_text(v: f32) -> String {
    if v.is_finite() {
        format!("{v:?}")
    } else {
        format!("0x{:08x}", v.to_bits())
    }
}

impl Program {
    /// The program as assembly text (labels `L<index>` at branch targets).
    pub fn to_asm(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, ".kernel {}", self.name);
        let _ = writeln!(out, ".levels {}", self.levels.join(" "));
        for b in &self.buffers {
            let _ = writeln!(out, ".buffer {} {} {} {}", b.kind.name(), b.name, b.offset, b.len);
        }
        let targets: std::collections::BTreeSet<u32> = self.instrs.iter().filter_map(|i| i.target()).collect();
        let level = |l: u8| self.levels.get(l as usize).cloned().unwrap_or_else(|| format!("?{l}"));
        for (pc, ins) in self.instrs.iter().enumerate() {
            if targets.contains(&(pc as u32)) {
                let _ = writeln!(out, "L{pc}:");
            }
            let _ = writeln!(out, "    {}", self.instr_text(ins, &level));
        }
        if targets.contains(&(self.instrs.len() as u32)) {
            let _ = writeln!(out, "L{}:", self.instrs.len());
        }
        out
    }

    /// Instruction `pc` as assembly text (branch targets as `L<index>`).
    pub fn line(&self, pc: usize) -> String {
        let level = |l: u8| self.levels.get(l as usize).cloned().unwrap_or_else(|| format!("?{l}"));
        self.instrs.get(pc).map_or_else(String::new, |i| self.instr_text(i, &level))
    }

    fn instr_text(&self, ins: &Instr, level: &dyn Fn(u8) -> String) -> String {
        match *ins {
            Instr::Li { rd, imm } => format!("li {rd}, {imm}"),
            Instr::Alu { op, rd, ra, rb } => format!("{} {rd}, {ra}, {rb}", op.name()),
            Instr::AluI { op, rd, ra, imm } => format!("{}i {rd}, {ra}, {imm}", op.name()),
            Instr::Branch { cond, ra, rb, target } => {
                format!("{} {ra}, {rb}, L{target}", CONDS[cond.index() as usize].1)
            }
            Instr::Jmp { target } => format!("jmp L{target}"),
            Instr::SetFlag { src, dst, id } => format!("set_flag {src}, {dst}, {id}"),
            Instr::WaitFlag { src, dst, id } => format!("wait_flag {src}, {dst}, {id}"),
            Instr::Barrier => "barrier".into(),
            Instr::End => "end".into(),
            Instr::Copy { dst_level, src_level, dst, src, n, len, dst_stride, src_stride } => format!(
                "copy {}, {}, {dst}, {src}, {n}, {len}, {dst_stride}, {src_stride}",
                level(dst_level),
                level(src_level)
            ),
            Instr::VBin { op, d, a, b, n, a_scalar, b_scalar } => {
                format!("{}.{} {d}, {a}, {b}, {n}", VBIN_OPS[op.index() as usize].1, vbin_suffix(a_scalar, b_scalar))
            }
            Instr::VUn { op, d, a, n, a_scalar } => {
                format!("{}.{} {d}, {a}, {n}", VUN_OPS[op.index() as usize].1, if a_scalar { "s" } else { "v" })
            }
            Instr::VRed { op, d, a, n } => format!("{} {d}, {a}, {n}", VRED_OPS[op.index() as usize].1),
            Instr::VDup { d, n, value } => format!("vdup {d}, {n}, {}", f32_text(value)),
            Instr::VDupR { d, s, n } => format!("vdupr {d}, {s}, {n}"),
            Instr::VIota { d, start, step, n } => format!("viota {d}, {start}, {step}, {n}"),
            Instr::Mmad { c, a, b, m, n, k, acc } => format!("mmad {c}, {a}, {b}, {m}, {n}, {k}, {}", acc as u8),
        }
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_asm())
    }
}

/// Instruction counts by mnemonic family (for reports).
pub fn histogram(p: &Program) -> BTreeMap<&'static str, u64> {
    let mut h = BTreeMap::new();
    for i in &p.instrs {
        let k = match i {
            Instr::Li { .. } | Instr::Alu { .. } | Instr::AluI { .. } => "scalar",
            Instr::Branch { .. } | Instr::Jmp { .. } => "branch",
            Instr::SetFlag { .. } | Instr::WaitFlag { .. } | Instr::Barrier => "sync",
            Instr::End => "end",
            Instr::Copy { .. } => "copy",
            Instr::Mmad { .. } => "mmad",
            _ => "vector",
        };
        *h.entry(k).or_insert(0) += 1;
    }
    h
}
