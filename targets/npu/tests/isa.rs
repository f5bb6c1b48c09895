//! The ISA: text → program → bytes → program → text is the identity; bad input errors.

use kiln_npu::isa::{self, AluOp, BufKind, Cond, GmBuffer, Instr, Pipe, Program, Reg, VBinOp, VRedOp, VUnOp};
use kiln_npu::NpuError;
use proptest::prelude::*;

const SAMPLE: &str = "\
.kernel sample
.levels GM L1 L0A L0B L0C UB
.buffer in x 0 64
.buffer out y 64 64
.buffer tmp t 128 32
    li r1, -140737488355328
    li r2, 140737488355327
L2:
    add r3, r1, r2
    divi r4, r3, -7
    shri r5, r63, 3
    blt r1, r2, L2
    bne r1, r2, L11
    jmp L26
    set_flag MTE2, V, 0
    wait_flag MTE2, V, 7
    copy UB, GM, r1, r2, r3, r4, r5, r6
L11:
    vadd.vv r1, r2, r3, r4
    vsub.vs r1, r2, r3, r4
    vdiv.sv r1, r2, r3, r4
    vmla.ss r1, r2, r3, r4
    vexp.v r1, r2, r3
    vmov.s r1, r2, r3
    vredmax r1, r2, r3
    vdup r1, r2, -0.1
    vdup r1, r2, 0x7fc00001
    vdup r1, r2, 0xff800000
    vdupr r1, r2, r3
    viota r1, r2, r3, r4
    mmad r1, r2, r3, r4, r5, r6, 1
    barrier
    end
L26:
";

#[test]
fn sample_round_trips_through_bytes() {
    let p = isa::parse_asm(SAMPLE).unwrap();
    assert_eq!(p.to_asm(), SAMPLE);
    let bytes = p.encode();
    let q = isa::decode(&bytes).unwrap();
    assert_eq!(q.to_asm(), SAMPLE);
    assert_eq!(q.encode(), bytes);
}

fn reg() -> impl Strategy<Value = Reg> {
    (0u8..64).prop_map(Reg)
}

fn pipe() -> impl Strategy<Value = Pipe> {
    prop::sample::select(Pipe::ALL.to_vec())
}

fn instr(n: u32) -> impl Strategy<Value = Instr> {
    let alu = prop::sample::select(vec![
        AluOp::Add,
        AluOp::Sub,
        AluOp::Mul,
        AluOp::Div,
        AluOp::Rem,
        AluOp::Min,
        AluOp::Max,
        AluOp::And,
        AluOp::Or,
        AluOp::Xor,
        AluOp::Shl,
        AluOp::Shr,
    ]);
    let vbin = prop::sample::select(vec![
        VBinOp::Add,
        VBinOp::Sub,
        VBinOp::Mul,
        VBinOp::Div,
        VBinOp::Max,
        VBinOp::Min,
        VBinOp::Pow,
        VBinOp::Mla,
    ]);
    let vun = prop::sample::select(vec![
        VUnOp::Mov,
        VUnOp::Neg,
        VUnOp::Abs,
        VUnOp::Exp,
        VUnOp::Log,
        VUnOp::Sqrt,
        VUnOp::Recip,
        VUnOp::Tanh,
        VUnOp::Erf,
        VUnOp::Relu,
        VUnOp::Sigmoid,
        VUnOp::Floor,
        VUnOp::Ceil,
    ]);
    let cond = prop::sample::select(vec![Cond::Lt, Cond::Ge, Cond::Eq, Cond::Ne]);
    let red = prop::sample::select(vec![VRedOp::Sum, VRedOp::Max, VRedOp::Min]);
    prop_oneof![
        (reg(), -(1i64 << 47)..(1i64 << 47)).prop_map(|(rd, imm)| Instr::Li { rd, imm }),
        (alu.clone(), reg(), reg(), reg()).prop_map(|(op, rd, ra, rb)| Instr::Alu { op, rd, ra, rb }),
        (alu, reg(), reg(), any::<i32>()).prop_map(|(op, rd, ra, imm)| Instr::AluI { op, rd, ra, imm }),
        (cond, reg(), reg(), 0..=n).prop_map(|(cond, ra, rb, target)| Instr::Branch { cond, ra, rb, target }),
        (0..=n).prop_map(|target| Instr::Jmp { target }),
        (pipe(), pipe(), any::<u8>(), any::<bool>()).prop_filter("distinct pipes", |(s, d, _, _)| s != d).prop_map(
            |(src, dst, id, set)| if set { Instr::SetFlag { src, dst, id } } else { Instr::WaitFlag { src, dst, id } }
        ),
        Just(Instr::Barrier),
        Just(Instr::End),
        (0u8..6, 0u8..6, [reg(), reg(), reg(), reg(), reg(), reg()]).prop_map(|(dl, sl, r)| Instr::Copy {
            dst_level: dl,
            src_level: sl,
            dst: r[0],
            src: r[1],
            n: r[2],
            len: r[3],
            dst_stride: r[4],
            src_stride: r[5]
        }),
        (vbin, reg(), reg(), reg(), reg(), any::<bool>(), any::<bool>())
            .prop_map(|(op, d, a, b, n, a_scalar, b_scalar)| Instr::VBin { op, d, a, b, n, a_scalar, b_scalar }),
        (vun, reg(), reg(), reg(), any::<bool>()).prop_map(|(op, d, a, n, a_scalar)| Instr::VUn {
            op,
            d,
            a,
            n,
            a_scalar
        }),
        (red, reg(), reg(), reg()).prop_map(|(op, d, a, n)| Instr::VRed { op, d, a, n }),
        (reg(), reg(), any::<u32>()).prop_map(|(d, n, bits)| Instr::VDup { d, n, value: f32::from_bits(bits) }),
        (reg(), reg(), reg()).prop_map(|(d, s, n)| Instr::VDupR { d, s, n }),
        (reg(), reg(), reg(), reg()).prop_map(|(d, start, step, n)| Instr::VIota { d, start, step, n }),
        ([reg(), reg(), reg(), reg(), reg(), reg()], any::<bool>()).prop_map(|(r, acc)| Instr::Mmad {
            c: r[0],
            a: r[1],
            b: r[2],
            m: r[3],
            n: r[4],
            k: r[5],
            acc
        }),
    ]
}

fn program() -> impl Strategy<Value = Program> {
    (1u32..40).prop_flat_map(|n| {
        prop::collection::vec(instr(n), n as usize).prop_map(|instrs| Program {
            name: "p".into(),
            levels: ["GM", "L1", "L0A", "L0B", "L0C", "UB"].iter().map(|s| s.to_string()).collect(),
            buffers: vec![GmBuffer { name: "x".into(), kind: BufKind::In, offset: 0, len: 4 }],
            instrs,
        })
    })
}

/// Bit-exact equality (NaN immediates compare by bits).
fn same(a: &Program, b: &Program) -> bool {
    a.encode() == b.encode() && a.to_asm() == b.to_asm()
}

proptest! {
    #[test]
    fn every_instruction_round_trips(p in program()) {
        let text = p.to_asm();
        let parsed = isa::parse_asm(&text).unwrap();
        prop_assert!(same(&parsed, &p), "{text}");
        let decoded = isa::decode(&parsed.encode()).unwrap();
        prop_assert_eq!(decoded.to_asm(), text);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = isa::decode(&bytes);
    }

    #[test]
    fn corrupted_programs_never_panic(p in program(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = p.encode();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(q) = isa::decode(&bytes) {
            // Whatever decodes re-encodes to the same bytes.
            prop_assert_eq!(q.encode(), bytes);
        }
    }

    #[test]
    fn random_text_never_panics(text in "[ -~\n]{0,200}") {
        let _ = isa::parse_asm(&text);
    }
}

#[test]
fn every_opcode_byte_decodes_or_errors() {
    for op in 0..=255u8 {
        for fill in [0u8, 1, 0x3f, 0x40, 0xff] {
            let mut w = [fill; 8];
            w[0] = op;
            if let Ok(i) = isa::decode_instr(u64::from_le_bytes(w), 6) {
                assert_eq!(isa::encode_instr(&i), u64::from_le_bytes(w), "{i:?}");
            }
        }
    }
}

fn asm_error(text: &str) -> (usize, String) {
    match isa::parse_asm(text) {
        Err(NpuError::Asm { line, msg }) => (line, msg),
        other => panic!("expected an assembly error, got {other:?}"),
    }
}

#[test]
fn bad_text_names_the_line() {
    let head = ".kernel k\n.levels GM UB\n";
    assert_eq!(asm_error(&format!("{head}    li r1, 1\n    lx r2, 3\n")), (4, "unknown instruction 'lx'".into()));
    assert_eq!(asm_error(&format!("{head}\n    add r1, r2\n")), (4, "'add' takes 3 operand(s), found 2".into()));
    assert_eq!(asm_error(&format!("{head}    add r1, r2, r64\n")), (3, "'r64' is not a register (r0..r63)".into()));
    assert_eq!(asm_error(&format!("{head}    jmp nowhere\n")), (3, "undefined label 'nowhere'".into()));
    assert_eq!(
        asm_error(&format!("{head}    copy UB, L1, r1, r1, r1, r1, r1, r1\n")),
        (3, "'L1' is not one of the levels (GM, UB)".into())
    );
    assert_eq!(asm_error(&format!("{head}    set_flag V, V, 0\n")), (3, "a flag from pipe V to itself".into()));
    assert_eq!(
        asm_error(&format!("{head}    addi r1, r1, 4294967296\n")),
        (3, "immediate 4294967296 does not fit in 32 bits".into())
    );
    assert_eq!(
        asm_error(&format!("{head}    vadd.xx r1, r1, r1, r1\n")),
        (3, "'.xx': expected .vv, .vs, .sv or .ss".into())
    );
    assert_eq!(asm_error(&format!("{head}a:\na:\n")), (4, "label 'a' defined twice".into()));
    assert_eq!(asm_error("    end\n"), (1, "missing .levels directive".into()));
    assert_eq!(
        asm_error(".levels GM\n    end\n.kernel late\n"),
        (3, "directives must come before the first instruction".into())
    );
}

#[test]
fn bad_bytes_error() {
    let p = isa::parse_asm(SAMPLE).unwrap();
    let bytes = p.encode();
    assert!(matches!(isa::decode(b"ELF\x7f"), Err(NpuError::Decode { offset: 0, .. })));
    assert!(matches!(isa::decode(&bytes[..bytes.len() - 3]), Err(NpuError::Decode { .. })));
    let mut bad = bytes.clone();
    let last = bad.len() - 8;
    bad[last] = 0xff;
    let e = isa::decode(&bad).unwrap_err().to_string();
    assert_eq!(e, format!("npu binary at byte {last}: unknown opcode 0xff"));
}
