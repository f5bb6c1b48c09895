//! Contractions (MatMul, Gemm with bias, Conv) lowered from graph ops with the NPU's schedule,
//! compiled, simulated and compared with the kernel-dialect evaluator and the reference
//! interpreter; the figures (cycles, matrix/vector/DMA utilization) are printed.
//!
//! `cargo test --release -p kiln-npu --test contraction -- --nocapture` checks small shapes;
//! `-- --ignored --nocapture` prints the figures of the shapes (MatMul 512×768·768×768,
//! Gemm with bias at the same shape, 1024³ and the GPT-2 MLP's 512×768·768×3072 and
//! 512×3072·3072×768, a 64-channel 3×3 Conv on a 56×56 image, a 1×1 256→64 Conv at 56×56).

use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::ir::Module;
use kiln_ir::kernel::Kernel;
use kiln_ir::tensor::Tensor;
use kiln_ir::{DType, TensorType};
use kiln_npu::codegen::{compile_with, Options};
use kiln_npu::eval::eval_kernel;
use kiln_npu::isa::Pipe;
use kiln_npu::{simulate, NpuConfig, SimStats};
use kiln_passes::lower::{lower_with, Schedule};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// A module of one op over graph inputs of `shapes`, with `out` the result's shape.
fn one_op(op: &str, shapes: &[Vec<usize>], out: &[usize], attrs: Attrs) -> Module {
    let mut m = Module::new(op);
    let args: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = m.add_arg(TensorType::known(DType::F32, s), Some(format!("in{i}")));
            m.body.args.push(v);
            Some(v)
        })
        .collect();
    let o = m.push_op(&format!("graph.{op}"), args, vec![TensorType::known(DType::F32, out)], attrs);
    let r = m.op(o).results[0];
    m.value_mut(r).name = Some("out".into());
    m.body.yields.push(r);
    m
}

fn matmul(m: usize, k: usize, n: usize) -> Module {
    one_op("MatMul", &[vec![m, k], vec![k, n]], &[m, n], Attrs::new())
}

fn gemm_bias(m: usize, k: usize, n: usize) -> Module {
    one_op("Gemm", &[vec![m, k], vec![k, n], vec![n]], &[m, n], Attrs::new())
}

fn conv3x3(c: usize, hw: usize) -> Module {
    conv(c, c, (hw, hw), 3, [1, 1, 1, 1], true)
}

/// A `k × k` Conv of `cin → cout` channels on an `h × w` image, `pads` [top, left, bottom,
/// right], unit strides, with or without a bias.
fn conv(cin: usize, cout: usize, (h, w): (usize, usize), k: usize, pads: [usize; 4], bias: bool) -> Module {
    let mut a = Attrs::new();
    a.insert("kernel_shape".into(), Attr::Ints(vec![k as i64, k as i64]));
    a.insert("pads".into(), Attr::Ints(pads.iter().map(|&p| p as i64).collect()));
    let (oh, ow) = (h + pads[0] + pads[2] + 1 - k, w + pads[1] + pads[3] + 1 - k);
    let mut ins = vec![vec![1, cin, h, w], vec![cout, cin, k, k]];
    if bias {
        ins.push(vec![cout]);
    }
    one_op("Conv", &ins, &[1, cout, oh, ow], a)
}

struct Figures {
    stats: SimStats,
}

/// Lowers the module's op for `preset`, compiles, simulates, and checks the output against
/// the evaluator and the interpreter.
fn run(m: &Module, preset: &str, verbose: bool) -> Figures {
    run_with(m, preset, verbose, &Options::default())
}

/// [`run`] with code generator options.
fn run_with(m: &Module, preset: &str, verbose: bool, opts: &Options) -> Figures {
    let cfg = NpuConfig::preset(preset).unwrap();
    let sched = Schedule::for_machine(&cfg.machine());
    let op = *m.body.ops.last().unwrap();
    let kernel: Kernel = lower_with(m, op, &m.name, &sched).unwrap_or_else(|e| panic!("lowering: {e}"));
    if verbose {
        eprintln!("{kernel}");
    }
    let shapes: Vec<Vec<usize>> =
        kernel.buffers.iter().map(|b| b.shape.iter().map(|d| d.known().unwrap() as usize).collect()).collect();
    let mut bufs: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            if i < kernel.inputs {
                data(n, i as u64 + 1)
            } else {
                vec![f32::NAN; n]
            }
        })
        .collect();
    let mut want = bufs.clone();
    eval_kernel(&kernel, &shapes, &mut want).unwrap();
    let ins: Vec<Tensor> = (0..kernel.inputs).map(|i| Tensor::from_f32(&shapes[i], bufs[i].clone())).collect();
    let reference = kiln_ir::interp::run(m, ins).unwrap();
    let p = compile_with(&kernel, &shapes, &cfg, opts).unwrap_or_else(|e| panic!("{preset}: {e}\n{kernel}"));
    let stats = simulate(&p, &cfg, &mut bufs).unwrap_or_else(|e| panic!("{preset}: {e}"));
    let out = kernel.inputs;
    let r = reference[0].as_f32().unwrap();
    // Sums in another order differ by rounding relative to the terms' size, not the result's
    // (a long reduction's small result): a part in 10⁵ of the largest output too.
    let scale = r.iter().fold(0f32, |x, y| x.max(y.abs()));
    for (i, ((&a, &b), &c)) in bufs[out].iter().zip(&want[out]).zip(r).enumerate() {
        for (what, b) in [("evaluator", b), ("interpreter", c)] {
            let tol = 1e-4 + 1e-4 * b.abs() + 1e-5 * scale;
            assert!(a == b || (a - b).abs() <= tol, "{preset} {}: out[{i}] = {a}, the {what} says {b}", m.name);
        }
    }
    Figures { stats }
}

fn line(name: &str, preset: &str, f: &Figures) -> String {
    let s = &f.stats;
    let pipe = |n: &str| s.pipes.iter().find(|p| p.pipe == n).map_or(0.0, |p| 100.0 * p.utilization);
    format!(
        "{name:<28} {preset:<8} cycles {:>10}  matrix {:5.1}%  vector {:5.1}%  dma {:5.1}% (MTE1 {:5.1}%, MTE2 {:5.1}%, MTE3 {:5.1}%)",
        s.cycles,
        100.0 * s.matrix_utilization,
        100.0 * s.vector_utilization,
        100.0 * s.dma_utilization,
        pipe("MTE1"),
        pipe("MTE2"),
        pipe("MTE3"),
    )
}

fn table(cases: &[(String, Module)]) -> Vec<(String, &'static str, Figures)> {
    let verbose = std::env::var("KILN_NPU_KERNELS").is_ok();
    let mut out = Vec::new();
    let mut all = Vec::new();
    for (name, m) in cases {
        for preset in ["davinci", "mlu"] {
            let f = run(m, preset, verbose);
            let l = line(name, preset, &f);
            eprintln!("{l}");
            out.push(l);
            all.push((name.clone(), preset, f));
        }
    }
    eprintln!("\n{}", out.join("\n"));
    all
}

#[test]
fn contractions_are_exact() {
    table(&[
        ("MatMul 40x48.48x56".into(), matmul(40, 48, 56)),
        ("Gemm+bias 33x20.20x50".into(), gemm_bias(33, 20, 50)),
        ("Conv 3x3 16->16 10x10".into(), conv3x3(16, 10)),
    ]);
}

/// Convs on the matrix unit (the implicit GEMM and, for 1×1, the plain one): padding on
/// every side and on some, none, odd sizes, channel counts off the unit's tile (tails), long
/// reductions cut into chunks; each checked against the evaluator and the interpreter, and
/// the matrix pipe must have done the work without the im2col columns ever reaching global
/// memory.
#[test]
fn convs_run_on_the_matrix_unit() {
    // (name, module, K = cin·k·k, output pixels)
    let cases: Vec<(String, Module, u64, u64)> = vec![
        ("3x3 5->20 7x9 pad 1".into(), conv(5, 20, (7, 9), 3, [1, 1, 1, 1], true), 45, 63),
        ("5x5 3->16 11x13 pad 2".into(), conv(3, 16, (11, 13), 5, [2, 2, 2, 2], true), 75, 143),
        ("3x3 8->24 9x9 no pad".into(), conv(8, 24, (9, 9), 3, [0, 0, 0, 0], false), 72, 49),
        ("3x3 6->17 8x7 pads 0,1,1,0".into(), conv(6, 17, (8, 7), 3, [0, 1, 1, 0], true), 54, 56),
        ("3x3 96->33 6x5 pad 1".into(), conv(96, 33, (6, 5), 3, [1, 1, 1, 1], true), 864, 30),
        ("1x1 40->48 9x9".into(), conv(40, 48, (9, 9), 1, [0, 0, 0, 0], true), 40, 81),
    ];
    let named: Vec<(String, Module)> = cases.iter().map(|(n, m, ..)| (format!("Conv {n}"), m.clone())).collect();
    let figures = table(&named);
    for ((name, preset, f), (_, _, k, pixels)) in figures.iter().zip(cases.iter().flat_map(|c| [c, c])) {
        let s = &f.stats;
        assert!(s.pipe(Pipe::M).busy_cycles > 0 && s.matrix_utilization > 0.0, "{name} {preset}: no matrix work");
        if !name.contains("1x1") {
            // The columns (K × pixels, f32) are never stored to global memory (the stores are
            // the output's: its init and the result).
            let v = NpuConfig::preset(preset).unwrap().vector.level;
            let stored = s.bytes.get(&format!("{v}->GM")).copied().unwrap_or(0);
            assert!(stored < 4 * k * pixels, "{name} {preset}: {stored} bytes stored to global memory");
        }
    }
}

/// The im2col form itself (the columns materialized, then the GEMM) is exact where the code
/// generator does not fuse the pair: here with the matrix unit switched off.
#[test]
fn im2col_form_is_exact_without_the_matrix_unit() {
    let m = conv(5, 20, (7, 9), 3, [1, 1, 1, 1], true);
    let f = run_with(&m, "davinci", false, &Options { matrix: false, ..Options::default() });
    assert_eq!(f.stats.pipe(Pipe::M).busy_cycles, 0);
}

/// The shapes (slow in debug builds: run with `--release`).
#[test]
#[ignore]
fn contraction_figures() {
    table(&[
        ("MatMul 512x768.768x768".into(), matmul(512, 768, 768)),
        ("Gemm+bias 512x768.768x768".into(), gemm_bias(512, 768, 768)),
        ("MatMul 1024x1024.1024x1024".into(), matmul(1024, 1024, 1024)),
        ("MatMul 512x768.768x3072".into(), matmul(512, 768, 3072)),
        ("MatMul 512x3072.3072x768".into(), matmul(512, 3072, 768)),
        ("Conv 3x3 64->64 56x56".into(), conv3x3(64, 56)),
        ("Conv 1x1 256->64 56x56".into(), conv(256, 64, (56, 56), 1, [0, 0, 0, 0], true)),
    ]);
}
