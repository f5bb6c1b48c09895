//! The simulator on hand-written programs: numbers, cycles, overlap and the race checker.

use kiln_npu::isa::parse_asm;
use kiln_npu::isa::Pipe;
use kiln_npu::{simulate, NpuConfig, NpuError};

const HEAD: &str = ".levels GM L1 L0A L0B L0C UB\n";

fn run(text: &str, buffers: &mut [Vec<f32>]) -> Result<kiln_npu::SimStats, NpuError> {
    let p = parse_asm(text).unwrap();
    simulate(&p, &NpuConfig::preset("davinci").unwrap(), buffers)
}

#[test]
fn dma_in_vector_add_dma_out() {
    let text = format!(
        ".kernel add\n{HEAD}.buffer in x 0 64\n.buffer in y 64 64\n.buffer out z 128 64
    li r1, 0
    li r2, 64
    li r3, 128
    li r4, 0
    li r5, 64
    li r6, 1
    li r7, 64
    copy UB, GM, r4, r1, r6, r7, r7, r7
    copy UB, GM, r5, r2, r6, r7, r7, r7
    set_flag MTE2, V, 0
    wait_flag MTE2, V, 0
    vadd.vv r4, r4, r5, r7
    set_flag V, MTE3, 0
    wait_flag V, MTE3, 0
    copy GM, UB, r3, r4, r6, r7, r7, r7
    end
"
    );
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..64).map(|i| 1000.0 - 2.0 * i as f32).collect();
    let mut bufs = vec![x.clone(), y.clone(), vec![0.0; 64]];
    let s = run(&text, &mut bufs).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_eq!(bufs[2], want);
    // MTE2: issued at 7 (after 7 `li`), 200 + ⌈256 / 56.1⌉ = 205 cycles each: 7..212..417.
    // V: the add at 417 takes 4 + 1 = 5 cycles. MTE3: 422 + 200 + ⌈256 / 105⌉ = 625.
    assert_eq!(s.cycles, 625);
    assert_eq!(s.pipe(Pipe::Mte2).busy_cycles, 410);
    assert_eq!(s.pipe(Pipe::V).busy_cycles, 5);
    assert_eq!(s.pipe(Pipe::Mte3).busy_cycles, 203);
    assert_eq!(s.bytes["GM->UB"], 512);
    assert_eq!(s.bytes["UB->GM"], 256);
    assert_eq!(s.gm_bytes, 768);
    assert_eq!(s.instrs, 16);
}

/// `tiles` tiles of 1024 elements: z = x + y, one UB slot per operand.
fn single_buffered(sync: bool) -> String {
    let flag = if sync { "" } else { ";" };
    format!(
        ".kernel add_single\n{HEAD}.buffer in x 0 8192\n.buffer in y 8192 8192\n.buffer out z 16384 8192
    li r1, 0
    li r2, 8192
    li r3, 16384
    li r4, 0
    li r5, 1024
    li r6, 1
    li r7, 1024
    li r8, 0
    li r9, 8
loop:
    copy UB, GM, r4, r1, r6, r7, r7, r7
    copy UB, GM, r5, r2, r6, r7, r7, r7
{flag}    set_flag MTE2, V, 0
{flag}    wait_flag MTE2, V, 0
    vadd.vv r4, r4, r5, r7
    set_flag V, MTE3, 0
    wait_flag V, MTE3, 0
    copy GM, UB, r3, r4, r6, r7, r7, r7
    set_flag MTE3, MTE2, 0
    wait_flag MTE3, MTE2, 0
    addi r1, r1, 1024
    addi r2, r2, 1024
    addi r3, r3, 1024
    addi r8, r8, 1
    blt r8, r9, loop
    end
"
    )
}

/// The same with two slots per operand: counting flags let MTE2 load tile i+1 while V adds
/// tile i and MTE3 stores tile i-1.
fn double_buffered() -> String {
    format!(
        ".kernel add_double\n{HEAD}.buffer in x 0 8192\n.buffer in y 8192 8192\n.buffer out z 16384 8192
    li r1, 0
    li r2, 8192
    li r3, 16384
    li r4, 0          ; x slot (0 or 2048), y slot = x slot + 1024
    li r10, 4096      ; out slot (4096 or 5120)
    li r6, 1
    li r7, 1024
    li r8, 0
    li r9, 8
    li r11, 2048
    li r12, 9216
    set_flag V, MTE2, 1
    set_flag V, MTE2, 1
    set_flag MTE3, V, 1
    set_flag MTE3, V, 1
loop:
    addi r5, r4, 1024
    wait_flag V, MTE2, 1
    copy UB, GM, r4, r1, r6, r7, r7, r7
    copy UB, GM, r5, r2, r6, r7, r7, r7
    set_flag MTE2, V, 0
    wait_flag MTE2, V, 0
    wait_flag MTE3, V, 1
    vadd.vv r10, r4, r5, r7
    set_flag V, MTE2, 1
    set_flag V, MTE3, 0
    wait_flag V, MTE3, 0
    copy GM, UB, r3, r10, r6, r7, r7, r7
    set_flag MTE3, V, 1
    sub r4, r11, r4
    sub r10, r12, r10
    addi r1, r1, 1024
    addi r2, r2, 1024
    addi r3, r3, 1024
    addi r8, r8, 1
    blt r8, r9, loop
    wait_flag V, MTE2, 1
    wait_flag V, MTE2, 1
    wait_flag MTE3, V, 1
    wait_flag MTE3, V, 1
    end
"
    )
}

fn inputs() -> Vec<Vec<f32>> {
    let x: Vec<f32> = (0..8192).map(|i| (i % 97) as f32).collect();
    let y: Vec<f32> = (0..8192).map(|i| (i % 13) as f32 * 0.5).collect();
    vec![x, y, vec![0.0; 8192]]
}

#[test]
fn double_buffering_overlaps_dma_and_compute() {
    let mut a = inputs();
    let single = run(&single_buffered(true), &mut a).unwrap();
    let mut b = inputs();
    let double = run(&double_buffered(), &mut b).unwrap();
    let want: Vec<f32> = a[0].iter().zip(&a[1]).map(|(x, y)| x + y).collect();
    assert_eq!(a[2], want);
    assert_eq!(b[2], want);
    // The same work on every pipe...
    for p in [Pipe::V, Pipe::Mte2, Pipe::Mte3] {
        assert_eq!(single.pipe(p).busy_cycles, double.pipe(p).busy_cycles, "{p}");
    }
    // ...but MTE3 overlaps MTE2: the total approaches the busiest pipe's time.
    assert!(double.cycles * 10 < single.cycles * 8, "double {} single {}", double.cycles, single.cycles);
    let mte2 = double.pipe(Pipe::Mte2).busy_cycles;
    assert!(double.cycles < mte2 + mte2 / 4, "double {} MTE2 {mte2}", double.cycles);
    assert!(double.dma_utilization > 0.8, "{}", double.dma_utilization);
}

#[test]
fn missing_flag_is_a_race() {
    let e = run(&single_buffered(false), &mut inputs()).unwrap_err().to_string();
    assert!(
        e.starts_with("npu simulator: race on UB[0..1024]: #11 `vadd.vv r4, r4, r5, r7` on pipe V reads it"),
        "{e}"
    );
    assert!(e.contains("#9 `copy UB, GM, r4, r1, r6, r7, r7, r7` on pipe MTE2 writes it"), "{e}");
}

#[test]
fn errors_name_the_instruction() {
    let prog = |body: &str| {
        format!(".kernel k\n{HEAD}.buffer in x 0 4\n    li r1, 0\n    li r2, 1\n    li r3, 99999\n{body}    end\n")
    };
    let e = run(&prog("    copy UB, GM, r1, r3, r2, r2, r2, r2\n"), &mut [vec![0.0; 4]]).unwrap_err();
    assert_eq!(e.to_string(), "npu simulator: #3 `copy UB, GM, r1, r3, r2, r2, r2, r2`: GM[99999..100000] is out of bounds (the level has 4 elements)");
    let e = run(&prog("    div r4, r2, r1\n"), &mut [vec![0.0; 4]]).unwrap_err();
    assert_eq!(e.to_string(), "npu simulator: #3 `div r4, r2, r1`: division by zero");
    let e = run(&prog("    wait_flag MTE2, V, 0\n"), &mut [vec![0.0; 4]]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "npu simulator: deadlock at #4 `end`: pipe V waits at #3 `wait_flag MTE2, V, 0` for a flag nothing has set"
    );
    let e = run(&prog("    set_flag MTE2, V, 0\n"), &mut [vec![0.0; 4]]).unwrap_err();
    assert_eq!(e.to_string(), "npu simulator: flag MTE2->V #0 is left set 1 time(s) at `end` (a set without its wait)");
    let e = run(&format!(".kernel k\n{HEAD}.buffer in x 0 4\n    li r1, 0\n"), &mut [vec![0.0; 4]]).unwrap_err();
    assert_eq!(e.to_string(), "npu simulator: ran past the last instruction (1) without `end`");
    let e = run(&prog(""), &mut [vec![0.0; 5]]).unwrap_err();
    assert_eq!(e.to_string(), "npu simulator: buffer 'x' has 5 elements, the program expects 4");
    let sunway = NpuConfig::preset("sunway").unwrap();
    let e = simulate(&parse_asm(&prog("")).unwrap(), &sunway, &mut [vec![0.0; 4]]).unwrap_err();
    assert!(e.to_string().contains("the program was built for levels [GM, L1, L0A, L0B, L0C, UB]"), "{e}");
}

#[test]
fn matrix_unit_multiplies_tiles() {
    // C[2×3] = A[2×4]·B[4×3], staged GM -> L1 -> L0A/L0B, result L0C -> UB -> GM.
    let text = format!(
        ".kernel mm\n{HEAD}.buffer in a 0 8\n.buffer in b 8 12\n.buffer out c 20 6
    li r0, 0
    li r1, 1
    li r2, 8
    li r3, 12
    li r4, 20
    li r5, 6
    li r10, 2
    li r11, 3
    li r12, 4
    li r13, 64
    copy L1, GM, r0, r0, r1, r2, r2, r2
    copy L1, GM, r13, r2, r1, r3, r3, r3
    set_flag MTE2, MTE1, 0
    wait_flag MTE2, MTE1, 0
    copy L0A, L1, r0, r0, r1, r2, r2, r2
    copy L0B, L1, r0, r13, r1, r3, r3, r3
    set_flag MTE1, M, 0
    wait_flag MTE1, M, 0
    mmad r0, r0, r0, r10, r11, r12, 0
    set_flag M, V, 0
    wait_flag M, V, 0
    copy UB, L0C, r0, r0, r1, r5, r5, r5
    set_flag V, MTE3, 0
    wait_flag V, MTE3, 0
    copy GM, UB, r4, r0, r1, r5, r5, r5
    end
"
    );
    let a: Vec<f32> = (1..=8).map(|i| i as f32).collect();
    let b: Vec<f32> = (1..=12).map(|i| (i as f32) * 0.5).collect();
    let mut bufs = vec![a.clone(), b.clone(), vec![0.0; 6]];
    let s = run(&text, &mut bufs).unwrap();
    let mut want = vec![0f32; 6];
    for i in 0..2 {
        for j in 0..3 {
            want[i * 3 + j] = (0..4).map(|k| a[i * 4 + k] * b[k * 3 + j]).sum();
        }
    }
    assert_eq!(bufs[2], want);
    assert_eq!(s.macs, 24);
    // One native 16×16×16 tile: 4096 MACs at the f32 rate of 1024 per cycle, plus 4 cycles
    // of startup.
    assert_eq!(s.pipe(Pipe::M).busy_cycles, 8);
    assert!(s.mac_efficiency < 0.01);
}

mod fuzz {
    use kiln_npu::isa::{AluOp, BufKind, Cond, GmBuffer, Instr, Pipe, Program, Reg, VBinOp, VRedOp, VUnOp};
    use kiln_npu::{simulate_with, NpuConfig, SimOptions};
    use proptest::prelude::*;

    fn reg() -> impl Strategy<Value = Reg> {
        (0u8..8).prop_map(Reg)
    }

    fn instr(n: u32) -> impl Strategy<Value = Instr> {
        let pipe = prop::sample::select(Pipe::ALL.to_vec());
        prop_oneof![
            (reg(), -70i64..200).prop_map(|(rd, imm)| Instr::Li { rd, imm }),
            (
                prop::sample::select(vec![AluOp::Add, AluOp::Mul, AluOp::Div, AluOp::Rem, AluOp::Shl]),
                reg(),
                reg(),
                reg()
            )
                .prop_map(|(op, rd, ra, rb)| Instr::Alu { op, rd, ra, rb }),
            (reg(), reg(), 0..=n).prop_map(|(ra, rb, target)| Instr::Branch { cond: Cond::Lt, ra, rb, target }),
            (pipe.clone(), pipe, 0u8..3, any::<bool>()).prop_filter("distinct", |(s, d, _, _)| s != d).prop_map(
                |(src, dst, id, set)| if set {
                    Instr::SetFlag { src, dst, id }
                } else {
                    Instr::WaitFlag { src, dst, id }
                }
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
            (
                prop::sample::select(vec![VBinOp::Add, VBinOp::Mla, VBinOp::Pow]),
                reg(),
                reg(),
                reg(),
                reg(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(op, d, a, b, n, a_scalar, b_scalar)| Instr::VBin {
                    op,
                    d,
                    a,
                    b,
                    n,
                    a_scalar,
                    b_scalar
                }),
            (reg(), reg(), reg(), any::<bool>()).prop_map(|(d, a, n, a_scalar)| Instr::VUn {
                op: VUnOp::Exp,
                d,
                a,
                n,
                a_scalar
            }),
            (reg(), reg(), reg()).prop_map(|(d, a, n)| Instr::VRed { op: VRedOp::Sum, d, a, n }),
            (reg(), reg()).prop_map(|(d, n)| Instr::VDup { d, n, value: 1.0 }),
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Random programs end, or stop with an error: never a panic or a hang.
        #[test]
        fn random_programs_never_panic(instrs in (1u32..30).prop_flat_map(|n| prop::collection::vec(instr(n), n as usize))) {
            let p = Program {
                name: "fuzz".into(),
                levels: ["GM", "L1", "L0A", "L0B", "L0C", "UB"].iter().map(|s| s.to_string()).collect(),
                buffers: vec![GmBuffer { name: "x".into(), kind: BufKind::In, offset: 0, len: 64 }, GmBuffer { name: "y".into(), kind: BufKind::Out, offset: 64, len: 64 }],
                instrs,
            };
            let cfg = NpuConfig::preset("davinci").unwrap();
            let _ = simulate_with(&p, &cfg, &mut [vec![0.5; 64], vec![0.0; 64]], &SimOptions { max_instrs: 20_000 });
        }
    }
}
