//! The binary form: a header and one little-endian 64-bit word per instruction.

use super::*;
use crate::NpuError;

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
