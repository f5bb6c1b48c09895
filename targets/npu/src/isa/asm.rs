//! The assembler: text → [`Program`].

use super::*;
use crate::NpuError;
use std::collections::HashMap;

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
