//! Contractions (MatMul, Gemm with bias, Conv) lowered from graph ops with the NPU's schedule,
//! compiled, simulated and compared with the kernel-dialect evaluator and the reference
//! interpreter; the figures (cycles, matrix/vector/DMA utilization) are printed.
//!
//! `cargo test --release -p kiln-npu --test contraction -- --nocapture` checks small shapes;
//! `-- --ignored --nocapture` prints the figures of the shapes (MatMul 512×768·768×768,
//! Gemm with bias at the same shape, a 64-channel 3×3 Conv on a 56×56 image).

use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::ir::Module;
use kiln_ir::kernel::Kernel;
use kiln_ir::tensor::Tensor;
use kiln_ir::{DType, TensorType};
use kiln_npu::eval::eval_kernel;
use kiln_npu::{compile, simulate, NpuConfig, SimStats};
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
    let mut a = Attrs::new();
    a.insert("kernel_shape".into(), Attr::Ints(vec![3, 3]));
    a.insert("pads".into(), Attr::Ints(vec![1, 1, 1, 1]));
    one_op("Conv", &[vec![1, c, hw, hw], vec![c, c, 3, 3], vec![c]], &[1, c, hw, hw], a)
}

struct Figures {
    stats: SimStats,
}

/// Lowers the module's op for `preset`, compiles, simulates, and checks the output against
/// the evaluator and the interpreter.
fn run(m: &Module, preset: &str, verbose: bool) -> Figures {
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
    let p = compile(&kernel, &shapes, &cfg).unwrap_or_else(|e| panic!("{preset}: {e}\n{kernel}"));
    let stats = simulate(&p, &cfg, &mut bufs).unwrap_or_else(|e| panic!("{preset}: {e}"));
    let out = kernel.inputs;
    let r = reference[0].as_f32().unwrap();
    for (i, ((&a, &b), &c)) in bufs[out].iter().zip(&want[out]).zip(r).enumerate() {
        for (what, b) in [("evaluator", b), ("interpreter", c)] {
            let tol = 1e-4 + 1e-4 * b.abs();
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

fn table(cases: &[(String, Module)]) {
    let verbose = std::env::var("KILN_NPU_KERNELS").is_ok();
    let mut out = Vec::new();
    for (name, m) in cases {
        for preset in ["davinci", "mlu"] {
            let f = run(m, preset, verbose);
            let l = line(name, preset, &f);
            eprintln!("{l}");
            out.push(l);
        }
    }
    eprintln!("\n{}", out.join("\n"));
}

#[test]
fn contractions_are_exact() {
    table(&[
        ("MatMul 40x48.48x56".into(), matmul(40, 48, 56)),
        ("Gemm+bias 33x20.20x50".into(), gemm_bias(33, 20, 50)),
        ("Conv 3x3 16->16 10x10".into(), conv3x3(16, 10)),
    ]);
}

/// The shapes (slow in debug builds: run with `--release`).
#[test]
#[ignore]
fn contraction_figures() {
    table(&[
        ("MatMul 512x768.768x768".into(), matmul(512, 768, 768)),
        ("Gemm+bias 512x768.768x768".into(), gemm_bias(512, 768, 768)),
        ("Conv 3x3 64->64 56x56".into(), conv3x3(64, 56)),
    ]);
}
