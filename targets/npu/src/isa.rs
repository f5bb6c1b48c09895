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

use crate::NpuError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
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
    Li {
        rd: Reg,
        imm: i64,
    },
    Alu {
        op: AluOp,
        rd: Reg,
        ra: Reg,
        rb: Reg,
    },
    AluI {
        op: AluOp,
        rd: Reg,
        ra: Reg,
        imm: i32,
    },
    Branch {
        cond: Cond,
        ra: Reg,
        rb: Reg,
        target: u32,
    },
    Jmp {
        target: u32,
    },
    SetFlag {
        src: Pipe,
        dst: Pipe,
        id: u8,
    },
    WaitFlag {
        src: Pipe,
        dst: Pipe,
        id: u8,
    },
    Barrier,
    End,
    /// DMA: for `b < n`, `len` elements from `src_level[src + b·src_stride]` to
    /// `dst_level[dst + b·dst_stride]`.
    Copy {
        dst_level: u8,
        src_level: u8,
        dst: Reg,
        src: Reg,
        n: Reg,
        len: Reg,
        dst_stride: Reg,
        src_stride: Reg,
    },
    VBin {
        op: VBinOp,
        d: Reg,
        a: Reg,
        b: Reg,
        n: Reg,
        a_scalar: bool,
        b_scalar: bool,
    },
    VUn {
        op: VUnOp,
        d: Reg,
        a: Reg,
        n: Reg,
        a_scalar: bool,
    },
    VRed {
        op: VRedOp,
        d: Reg,
        a: Reg,
        n: Reg,
    },
    VDup {
        d: Reg,
        n: Reg,
        value: f32,
    },
    VDupR {
        d: Reg,
        s: Reg,
        n: Reg,
    },
    VIota {
        d: Reg,
        start: Reg,
        step: Reg,
        n: Reg,
    },
    Mmad {
        c: Reg,
        a: Reg,
        b: Reg,
        m: Reg,
        n: Reg,
        k: Reg,
        acc: bool,
    },
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

// ---------------------------------------------------------------------------------------
// Assembler.

fn asm_err(line: usize, msg: impl Into<String>) -> NpuError {
    NpuError::Asm { line, msg: msg.into() }
}

/// Strips a comment (`;` or `//`) from a line.
fn strip_comment(line: &str) -> &str {
    let mut end = line.len();
    if let Some(i) = line.find(';') {
        end = end.min(i);
    }
    if let Some(i) = line.find("//") {
        end = end.min(i);
    }
    line[..end].trim()
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else {
        if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        body.parse::<i64>().ok()?
    };
    Some(if neg { v.checked_neg()? } else { v })
}

fn parse_f32(s: &str) -> Option<f32> {
    if let Some(h) = s.strip_prefix("0x") {
        return u32::from_str_radix(h, 16).ok().map(f32::from_bits);
    }
    s.parse::<f32>().ok()
}

/// Parses assembly text (see the module docs); errors name the line (1-based).
pub fn parse_asm(text: &str) -> Result<Program, NpuError> {
    let mut name = None;
    let mut levels: Option<Vec<String>> = None;
    let mut buffers = Vec::new();
    let mut labels: HashMap<String, u32> = HashMap::new();
    // First pass: directives and labels; the instruction lines.
    let mut lines: Vec<(usize, &str)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let ln = i + 1;
        let mut line = strip_comment(raw);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('.') {
            if !lines.is_empty() {
                return Err(asm_err(ln, "directives must come before the first instruction"));
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["kernel", n] => {
                    if name.replace(n.to_string()).is_some() {
                        return Err(asm_err(ln, "a second .kernel directive"));
                    }
                }
                ["levels", ls @ ..] => {
                    if ls.is_empty() || ls.len() > crate::config::MAX_LEVELS {
                        return Err(asm_err(ln, format!("expected 1 to {} level names", crate::config::MAX_LEVELS)));
                    }
                    if levels.replace(ls.iter().map(|s| s.to_string()).collect()).is_some() {
                        return Err(asm_err(ln, "a second .levels directive"));
                    }
                }
                ["buffer", kind, n, off, len] => {
                    let kind = match *kind {
                        "in" => BufKind::In,
                        "out" => BufKind::Out,
                        "tmp" => BufKind::Tmp,
                        k => return Err(asm_err(ln, format!("buffer kind '{k}', expected in, out or tmp"))),
                    };
                    let num = |s: &str| {
                        s.parse::<u64>().map_err(|_| asm_err(ln, format!("'{s}' is not a non-negative integer")))
                    };
                    buffers.push(GmBuffer { name: n.to_string(), kind, offset: num(off)?, len: num(len)? });
                }
                _ => {
                    return Err(asm_err(
                        ln,
                        format!(
                            "unknown directive '.{rest}' (expected .kernel NAME, .levels L..., .buffer in|out|tmp NAME OFFSET LEN)"
                        ),
                    ))
                }
            }
            continue;
        }
        while let Some(colon) = line.find(':') {
            let label = line[..colon].trim();
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                return Err(asm_err(ln, format!("bad label '{label}'")));
            }
            if labels.insert(label.to_string(), lines.len() as u32).is_some() {
                return Err(asm_err(ln, format!("label '{label}' defined twice")));
            }
            line = line[colon + 1..].trim();
        }
        if !line.is_empty() {
            lines.push((ln, line));
        }
    }
    let levels = levels.ok_or_else(|| asm_err(1, "missing .levels directive"))?;
    let mut instrs = Vec::with_capacity(lines.len());
    for (ln, line) in lines {
        instrs.push(parse_instr(ln, line, &levels, &labels)?);
    }
    Ok(Program { name: name.unwrap_or_else(|| "kernel".into()), levels, buffers, instrs })
}

fn parse_instr(ln: usize, line: &str, levels: &[String], labels: &HashMap<String, u32>) -> Result<Instr, NpuError> {
    let (mnemonic, rest) = match line.find(char::is_whitespace) {
        Some(i) => (&line[..i], line[i..].trim()),
        None => (line, ""),
    };
    let ops: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split(',').map(str::trim).collect() };
    let want = |n: usize| -> Result<(), NpuError> {
        if ops.len() != n {
            return Err(asm_err(ln, format!("'{mnemonic}' takes {n} operand(s), found {}", ops.len())));
        }
        Ok(())
    };
    let reg = |s: &str| -> Result<Reg, NpuError> {
        s.strip_prefix('r')
            .and_then(|n| if n.bytes().all(|b| b.is_ascii_digit()) { n.parse::<u8>().ok() } else { None })
            .filter(|&n| (n as usize) < REGS)
            .map(Reg)
            .ok_or_else(|| asm_err(ln, format!("'{s}' is not a register (r0..r{})", REGS - 1)))
    };
    let pipe = |s: &str| {
        Pipe::from_name(s).ok_or_else(|| asm_err(ln, format!("'{s}' is not a pipe (S, V, M, MTE1, MTE2, MTE3)")))
    };
    let level = |s: &str| -> Result<u8, NpuError> {
        levels
            .iter()
            .position(|l| l == s)
            .map(|i| i as u8)
            .ok_or_else(|| asm_err(ln, format!("'{s}' is not one of the levels ({})", levels.join(", "))))
    };
    let label = |s: &str| labels.get(s).copied().ok_or_else(|| asm_err(ln, format!("undefined label '{s}'")));
    let int = |s: &str| parse_int(s).ok_or_else(|| asm_err(ln, format!("'{s}' is not an integer")));
    let imm32 = |s: &str| -> Result<i32, NpuError> {
        int(s)?.try_into().map_err(|_| asm_err(ln, format!("immediate {s} does not fit in 32 bits")))
    };
    if let Some((op, _)) = ALU_OPS.iter().find(|(_, n)| *n == mnemonic) {
        want(3)?;
        return Ok(Instr::Alu { op: *op, rd: reg(ops[0])?, ra: reg(ops[1])?, rb: reg(ops[2])? });
    }
    if let Some((op, _)) = ALU_OPS.iter().find(|(_, n)| mnemonic.strip_suffix('i') == Some(*n)) {
        want(3)?;
        return Ok(Instr::AluI { op: *op, rd: reg(ops[0])?, ra: reg(ops[1])?, imm: imm32(ops[2])? });
    }
    if let Some((cond, _)) = CONDS.iter().find(|(_, n)| *n == mnemonic) {
        want(3)?;
        return Ok(Instr::Branch { cond: *cond, ra: reg(ops[0])?, rb: reg(ops[1])?, target: label(ops[2])? });
    }
    if let Some((base, suffix)) = mnemonic.split_once('.') {
        if let Some((op, _)) = VBIN_OPS.iter().find(|(_, n)| *n == base) {
            want(4)?;
            let (a_scalar, b_scalar) = match suffix {
                "vv" => (false, false),
                "vs" => (false, true),
                "sv" => (true, false),
                "ss" => (true, true),
                s => return Err(asm_err(ln, format!("'.{s}': expected .vv, .vs, .sv or .ss"))),
            };
            return Ok(Instr::VBin {
                op: *op,
                d: reg(ops[0])?,
                a: reg(ops[1])?,
                b: reg(ops[2])?,
                n: reg(ops[3])?,
                a_scalar,
                b_scalar,
            });
        }
        if let Some((op, _)) = VUN_OPS.iter().find(|(_, n)| *n == base) {
            want(3)?;
            let a_scalar = match suffix {
                "v" => false,
                "s" => true,
                s => return Err(asm_err(ln, format!("'.{s}': expected .v or .s"))),
            };
            return Ok(Instr::VUn { op: *op, d: reg(ops[0])?, a: reg(ops[1])?, n: reg(ops[2])?, a_scalar });
        }
    }
    if let Some((op, _)) = VRED_OPS.iter().find(|(_, n)| *n == mnemonic) {
        want(3)?;
        return Ok(Instr::VRed { op: *op, d: reg(ops[0])?, a: reg(ops[1])?, n: reg(ops[2])? });
    }
    Ok(match mnemonic {
        "li" => {
            want(2)?;
            let imm = int(ops[1])?;
            if !(-(1i64 << 47)..(1i64 << 47)).contains(&imm) {
                return Err(asm_err(ln, format!("immediate {imm} does not fit in 48 bits")));
            }
            Instr::Li { rd: reg(ops[0])?, imm }
        }
        "jmp" => {
            want(1)?;
            Instr::Jmp { target: label(ops[0])? }
        }
        "set_flag" | "wait_flag" => {
            want(3)?;
            let (src, dst) = (pipe(ops[0])?, pipe(ops[1])?);
            let id: u8 =
                int(ops[2])?.try_into().map_err(|_| asm_err(ln, format!("flag id {} out of 0..255", ops[2])))?;
            if src == dst {
                return Err(asm_err(ln, format!("a flag from pipe {src} to itself")));
            }
            if mnemonic == "set_flag" {
                Instr::SetFlag { src, dst, id }
            } else {
                Instr::WaitFlag { src, dst, id }
            }
        }
        "barrier" => {
            want(0)?;
            Instr::Barrier
        }
        "end" => {
            want(0)?;
            Instr::End
        }
        "copy" => {
            want(8)?;
            Instr::Copy {
                dst_level: level(ops[0])?,
                src_level: level(ops[1])?,
                dst: reg(ops[2])?,
                src: reg(ops[3])?,
                n: reg(ops[4])?,
                len: reg(ops[5])?,
                dst_stride: reg(ops[6])?,
                src_stride: reg(ops[7])?,
            }
        }
        "vdup" => {
            want(3)?;
            let value = parse_f32(ops[2]).ok_or_else(|| asm_err(ln, format!("'{}' is not an f32", ops[2])))?;
            Instr::VDup { d: reg(ops[0])?, n: reg(ops[1])?, value }
        }
        "vdupr" => {
            want(3)?;
            Instr::VDupR { d: reg(ops[0])?, s: reg(ops[1])?, n: reg(ops[2])? }
        }
        "viota" => {
            want(4)?;
            Instr::VIota { d: reg(ops[0])?, start: reg(ops[1])?, step: reg(ops[2])?, n: reg(ops[3])? }
        }
        "mmad" => {
            want(7)?;
            let acc = match ops[6] {
                "0" => false,
                "1" => true,
                s => return Err(asm_err(ln, format!("mmad accumulate flag '{s}', expected 0 or 1"))),
            };
            Instr::Mmad {
                c: reg(ops[0])?,
                a: reg(ops[1])?,
                b: reg(ops[2])?,
                m: reg(ops[3])?,
                n: reg(ops[4])?,
                k: reg(ops[5])?,
                acc,
            }
        }
        other => return Err(asm_err(ln, format!("unknown instruction '{other}'"))),
    })
}

// ---------------------------------------------------------------------------------------
// Binary encoding.

const MAGIC: &[u8; 4] = b"KNPU";
const VERSION: u8 = 1;

mod op {
    pub const LI: u8 = 0x01;
    pub const ALU: u8 = 0x10;
    pub const ALUI: u8 = 0x20;
    pub const BRANCH: u8 = 0x30;
    pub const JMP: u8 = 0x38;
    pub const SET_FLAG: u8 = 0x40;
    pub const WAIT_FLAG: u8 = 0x41;
    pub const BARRIER: u8 = 0x42;
    pub const END: u8 = 0x43;
    pub const COPY: u8 = 0x50;
    pub const VBIN: u8 = 0x60;
    pub const VUN: u8 = 0x70;
    pub const VRED: u8 = 0x80;
    pub const VDUP: u8 = 0x88;
    pub const VDUPR: u8 = 0x89;
    pub const VIOTA: u8 = 0x8A;
    pub const MMAD: u8 = 0x90;
}

/// One instruction as its 64-bit word.
pub fn encode_instr(ins: &Instr) -> u64 {
    let mut b = [0u8; 8];
    let r = |x: Reg| x.0;
    match *ins {
        Instr::Li { rd, imm } => {
            b[0] = op::LI;
            b[1] = r(rd);
            b[2..8].copy_from_slice(&imm.to_le_bytes()[..6]);
        }
        Instr::Alu { op, rd, ra, rb } => b[..4].copy_from_slice(&[op::ALU + op.index(), r(rd), r(ra), r(rb)]),
        Instr::AluI { op, rd, ra, imm } => {
            b[..3].copy_from_slice(&[op::ALUI + op.index(), r(rd), r(ra)]);
            b[4..8].copy_from_slice(&imm.to_le_bytes());
        }
        Instr::Branch { cond, ra, rb, target } => {
            b[..3].copy_from_slice(&[op::BRANCH + cond.index(), r(ra), r(rb)]);
            b[4..8].copy_from_slice(&target.to_le_bytes());
        }
        Instr::Jmp { target } => {
            b[0] = op::JMP;
            b[4..8].copy_from_slice(&target.to_le_bytes());
        }
        Instr::SetFlag { src, dst, id } => b[..4].copy_from_slice(&[op::SET_FLAG, src as u8, dst as u8, id]),
        Instr::WaitFlag { src, dst, id } => b[..4].copy_from_slice(&[op::WAIT_FLAG, src as u8, dst as u8, id]),
        Instr::Barrier => b[0] = op::BARRIER,
        Instr::End => b[0] = op::END,
        Instr::Copy { dst_level, src_level, dst, src, n, len, dst_stride, src_stride } => b.copy_from_slice(&[
            op::COPY,
            (dst_level << 4) | (src_level & 15),
            r(dst),
            r(src),
            r(n),
            r(len),
            r(dst_stride),
            r(src_stride),
        ]),
        Instr::VBin { op, d, a, b: rb, n, a_scalar, b_scalar } => b[..6].copy_from_slice(&[
            op::VBIN + op.index(),
            r(d),
            r(a),
            r(rb),
            r(n),
            a_scalar as u8 | (b_scalar as u8) << 1,
        ]),
        Instr::VUn { op, d, a, n, a_scalar } => {
            b[..5].copy_from_slice(&[op::VUN + op.index(), r(d), r(a), r(n), a_scalar as u8])
        }
        Instr::VRed { op, d, a, n } => b[..4].copy_from_slice(&[op::VRED + op.index(), r(d), r(a), r(n)]),
        Instr::VDup { d, n, value } => {
            b[..3].copy_from_slice(&[op::VDUP, r(d), r(n)]);
            b[4..8].copy_from_slice(&value.to_bits().to_le_bytes());
        }
        Instr::VDupR { d, s, n } => b[..4].copy_from_slice(&[op::VDUPR, r(d), r(s), r(n)]),
        Instr::VIota { d, start, step, n } => b[..5].copy_from_slice(&[op::VIOTA, r(d), r(start), r(step), r(n)]),
        Instr::Mmad { c, a, b: rb, m, n, k, acc } => {
            b.copy_from_slice(&[op::MMAD, r(c), r(a), r(rb), r(m), r(n), r(k), acc as u8])
        }
    }
    u64::from_le_bytes(b)
}

/// Decodes one 64-bit word; `levels` is the number of levels the program names.
pub fn decode_instr(word: u64, levels: usize) -> Result<Instr, String> {
    let b = word.to_le_bytes();
    let reg = |i: usize| -> Result<Reg, String> {
        if (b[i] as usize) < REGS {
            Ok(Reg(b[i]))
        } else {
            Err(format!("register number {} in byte {i}", b[i]))
        }
    };
    // Bytes an instruction does not use must be zero.
    let zero = |from: usize, to: usize| -> Result<(), String> {
        match (from..to).find(|&i| b[i] != 0) {
            Some(i) => Err(format!("byte {i} is {:#04x}, expected 0", b[i])),
            None => Ok(()),
        }
    };
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let code = b[0];
    Ok(match code {
        op::LI => {
            let mut x = [0u8; 8];
            x[..6].copy_from_slice(&b[2..8]);
            // Sign-extend the 48-bit immediate.
            let imm = (i64::from_le_bytes(x) << 16) >> 16;
            Instr::Li { rd: reg(1)?, imm }
        }
        c if (op::ALU..op::ALU + ALU_OPS.len() as u8).contains(&c) => {
            zero(4, 8)?;
            Instr::Alu { op: ALU_OPS[(c - op::ALU) as usize].0, rd: reg(1)?, ra: reg(2)?, rb: reg(3)? }
        }
        c if (op::ALUI..op::ALUI + ALU_OPS.len() as u8).contains(&c) => {
            zero(3, 4)?;
            Instr::AluI { op: ALU_OPS[(c - op::ALUI) as usize].0, rd: reg(1)?, ra: reg(2)?, imm: u32_at(4) as i32 }
        }
        c if (op::BRANCH..op::BRANCH + CONDS.len() as u8).contains(&c) => {
            zero(3, 4)?;
            Instr::Branch { cond: CONDS[(c - op::BRANCH) as usize].0, ra: reg(1)?, rb: reg(2)?, target: u32_at(4) }
        }
        op::JMP => {
            zero(1, 4)?;
            Instr::Jmp { target: u32_at(4) }
        }
        op::SET_FLAG | op::WAIT_FLAG => {
            zero(4, 8)?;
            let pipe = |i: usize| Pipe::from_index(b[i]).ok_or_else(|| format!("pipe number {} in byte {i}", b[i]));
            let (src, dst, id) = (pipe(1)?, pipe(2)?, b[3]);
            if src == dst {
                return Err(format!("a flag from pipe {src} to itself"));
            }
            if code == op::SET_FLAG {
                Instr::SetFlag { src, dst, id }
            } else {
                Instr::WaitFlag { src, dst, id }
            }
        }
        op::BARRIER => {
            zero(1, 8)?;
            Instr::Barrier
        }
        op::END => {
            zero(1, 8)?;
            Instr::End
        }
        op::COPY => {
            let (dst_level, src_level) = (b[1] >> 4, b[1] & 15);
            for l in [dst_level, src_level] {
                if l as usize >= levels {
                    return Err(format!("level number {l}, the program names {levels} level(s)"));
                }
            }
            Instr::Copy {
                dst_level,
                src_level,
                dst: reg(2)?,
                src: reg(3)?,
                n: reg(4)?,
                len: reg(5)?,
                dst_stride: reg(6)?,
                src_stride: reg(7)?,
            }
        }
        c if (op::VBIN..op::VBIN + VBIN_OPS.len() as u8).contains(&c) => {
            zero(6, 8)?;
            if b[5] > 3 {
                return Err(format!("vector operand flags {:#04x}", b[5]));
            }
            Instr::VBin {
                op: VBIN_OPS[(c - op::VBIN) as usize].0,
                d: reg(1)?,
                a: reg(2)?,
                b: reg(3)?,
                n: reg(4)?,
                a_scalar: b[5] & 1 != 0,
                b_scalar: b[5] & 2 != 0,
            }
        }
        c if (op::VUN..op::VUN + VUN_OPS.len() as u8).contains(&c) => {
            zero(5, 8)?;
            if b[4] > 1 {
                return Err(format!("vector operand flags {:#04x}", b[4]));
            }
            Instr::VUn {
                op: VUN_OPS[(c - op::VUN) as usize].0,
                d: reg(1)?,
                a: reg(2)?,
                n: reg(3)?,
                a_scalar: b[4] != 0,
            }
        }
        c if (op::VRED..op::VRED + VRED_OPS.len() as u8).contains(&c) => {
            zero(4, 8)?;
            Instr::VRed { op: VRED_OPS[(c - op::VRED) as usize].0, d: reg(1)?, a: reg(2)?, n: reg(3)? }
        }
        op::VDUP => {
            zero(3, 4)?;
            Instr::VDup { d: reg(1)?, n: reg(2)?, value: f32::from_bits(u32_at(4)) }
        }
        op::VDUPR => {
            zero(4, 8)?;
            Instr::VDupR { d: reg(1)?, s: reg(2)?, n: reg(3)? }
        }
        op::VIOTA => {
            zero(5, 8)?;
            Instr::VIota { d: reg(1)?, start: reg(2)?, step: reg(3)?, n: reg(4)? }
        }
        op::MMAD => {
            if b[7] > 1 {
                return Err(format!("mmad accumulate flag {}", b[7]));
            }
            Instr::Mmad { c: reg(1)?, a: reg(2)?, b: reg(3)?, m: reg(4)?, n: reg(5)?, k: reg(6)?, acc: b[7] == 1 }
        }
        c => return Err(format!("unknown opcode {c:#04x}")),
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..s.len().min(u16::MAX as usize)]);
}

impl Program {
    /// The binary form: `KNPU`, version, header, then one 64-bit word per instruction.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 8 * self.instrs.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_str(&mut out, &self.name);
        out.push(self.levels.len() as u8);
        for l in &self.levels {
            put_str(&mut out, l);
        }
        out.extend_from_slice(&(self.buffers.len() as u32).to_le_bytes());
        for b in &self.buffers {
            out.push(match b.kind {
                BufKind::In => 0,
                BufKind::Out => 1,
                BufKind::Tmp => 2,
            });
            put_str(&mut out, &b.name);
            out.extend_from_slice(&b.offset.to_le_bytes());
            out.extend_from_slice(&b.len.to_le_bytes());
        }
        out.extend_from_slice(&(self.instrs.len() as u32).to_le_bytes());
        for i in &self.instrs {
            out.extend_from_slice(&encode_instr(i).to_le_bytes());
        }
        out
    }
}

/// Shorthand for [`Program::encode`].
pub fn encode(p: &Program) -> Vec<u8> {
    p.encode()
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn err(&self, msg: impl Into<String>) -> NpuError {
        NpuError::Decode { offset: self.at, msg: msg.into() }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], NpuError> {
        match self.bytes.get(self.at..self.at.saturating_add(n)) {
            Some(s) if self.at.checked_add(n).is_some() => {
                self.at += n;
                Ok(s)
            }
            _ => Err(self.err(format!("truncated: {what} needs {n} byte(s), {} left", self.bytes.len() - self.at))),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8, NpuError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, NpuError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, NpuError> {
        let s = self.take(8, what)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(s);
        Ok(u64::from_le_bytes(x))
    }

    fn string(&mut self, what: &str) -> Result<String, NpuError> {
        let n = self.take(2, what)?;
        let n = u16::from_le_bytes([n[0], n[1]]) as usize;
        let at = self.at;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| NpuError::Decode { offset: at, msg: format!("{what} is not UTF-8") })
    }
}

/// Decodes the binary form; errors give the byte offset. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Program, NpuError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4, "the magic number")? != MAGIC {
        return Err(NpuError::Decode { offset: 0, msg: "not a kiln NPU program (magic 'KNPU' missing)".into() });
    }
    let v = r.u8("the version")?;
    if v != VERSION {
        return Err(r.err(format!("version {v}, expected {VERSION}")));
    }
    let name = r.string("the kernel name")?;
    let nlevels = r.u8("the level count")? as usize;
    if nlevels == 0 || nlevels > crate::config::MAX_LEVELS {
        return Err(r.err(format!("{nlevels} levels, expected 1 to {}", crate::config::MAX_LEVELS)));
    }
    let mut levels = Vec::new();
    for _ in 0..nlevels {
        levels.push(r.string("a level name")?);
    }
    let nbuf = r.u32("the buffer count")? as usize;
    let mut buffers = Vec::new();
    for _ in 0..nbuf {
        let kind = match r.u8("a buffer kind")? {
            0 => BufKind::In,
            1 => BufKind::Out,
            2 => BufKind::Tmp,
            k => return Err(r.err(format!("buffer kind {k}, expected 0, 1 or 2"))),
        };
        let name = r.string("a buffer name")?;
        buffers.push(GmBuffer { name, kind, offset: r.u64("a buffer offset")?, len: r.u64("a buffer length")? });
    }
    let n = r.u32("the instruction count")? as usize;
    if bytes.len().saturating_sub(r.at) != n.saturating_mul(8) {
        return Err(r.err(format!("{n} instructions need {} bytes, {} left", n * 8, bytes.len() - r.at)));
    }
    let mut instrs = Vec::with_capacity(n);
    for _ in 0..n {
        let at = r.at;
        let w = r.u64("an instruction")?;
        let ins = decode_instr(w, nlevels).map_err(|msg| NpuError::Decode { offset: at, msg })?;
        if let Some(t) = ins.target() {
            if t as usize > n {
                return Err(NpuError::Decode { offset: at, msg: format!("branch to {t}, past the end ({n})") });
            }
        }
        instrs.push(ins);
    }
    Ok(Program { name, levels, buffers, instrs })
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
