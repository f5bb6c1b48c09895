//! Kernel builders and the compile → simulate → compare-with-the-evaluator check.
#![allow(dead_code)]

use kiln_ir::kernel::{BinOp, Buffer, Idx, Kernel, Knobs, Level, Local, RedOp, Stmt, UnOp, Val};
use kiln_ir::{DType, Dim};
use kiln_npu::codegen::{compile_with, Options};
use kiln_npu::eval::eval_kernel;
use kiln_npu::{simulate, NpuConfig, SimStats};

pub fn v(i: usize) -> Idx {
    Idx::Var(i)
}
pub fn k(c: i64) -> Idx {
    Idx::Const(c)
}
pub fn dim(buf: usize, axis: usize) -> Idx {
    Idx::Dim { buf, axis }
}
pub fn iadd(a: Idx, b: Idx) -> Idx {
    Idx::Add(Box::new(a), Box::new(b))
}
pub fn isub(a: Idx, b: Idx) -> Idx {
    Idx::Sub(Box::new(a), Box::new(b))
}
pub fn imul(a: Idx, b: Idx) -> Idx {
    Idx::Mul(Box::new(a), Box::new(b))
}
pub fn idiv(a: Idx, b: Idx) -> Idx {
    Idx::Div(Box::new(a), Box::new(b))
}
pub fn irem(a: Idx, b: Idx) -> Idx {
    Idx::Rem(Box::new(a), Box::new(b))
}
pub fn imin(a: Idx, b: Idx) -> Idx {
    Idx::Min(Box::new(a), Box::new(b))
}
pub fn ld(buf: usize, index: Vec<Idx>) -> Val {
    Val::Load { buf, index }
}
pub fn un(op: UnOp, x: Val) -> Val {
    Val::Un(op, Box::new(x))
}
pub fn bin(op: BinOp, a: Val, b: Val) -> Val {
    Val::Bin(op, Box::new(a), Box::new(b))
}
pub fn add(a: Val, b: Val) -> Val {
    bin(BinOp::Add, a, b)
}
pub fn sub(a: Val, b: Val) -> Val {
    bin(BinOp::Sub, a, b)
}
pub fn mul(a: Val, b: Val) -> Val {
    bin(BinOp::Mul, a, b)
}
pub fn div(a: Val, b: Val) -> Val {
    bin(BinOp::Div, a, b)
}
pub fn cst(c: f64) -> Val {
    Val::Const(c)
}
pub fn reduce(op: RedOp, var: usize, extent: Idx, body: Val) -> Val {
    Val::Reduce { op, var, extent, body: Box::new(body) }
}
pub fn for_(var: usize, extent: Idx, body: Vec<Stmt>) -> Stmt {
    Stmt::For { var, extent, parallel: var == 0, body }
}
pub fn store(buf: usize, index: Vec<Idx>, value: Val) -> Stmt {
    Stmt::Store { buf, index, value }
}
pub fn let_(slot: usize, value: Val) -> Stmt {
    Stmt::Let { slot, value }
}

/// A buffer with symbolic (`"N"`, ...) or known dims.
pub fn buf(name: &str, dims: &[&str]) -> Buffer {
    Buffer {
        name: name.into(),
        dtype: DType::F32,
        shape: dims.iter().map(|d| d.parse::<u64>().map(Dim::Known).unwrap_or_else(|_| Dim::sym(d))).collect(),
        level: Level::Global,
    }
}

pub fn kernel(name: &str, buffers: Vec<Buffer>, inputs: usize, locals: Vec<Local>, body: Vec<Stmt>) -> Kernel {
    Kernel {
        name: name.into(),
        operands: (0..inputs).collect(),
        buffers,
        inputs,
        locals,
        body,
        knobs: Knobs::default(),
    }
}

/// Deterministic pseudo-random inputs in [-2, 2).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

pub fn inputs(k: &Kernel, shapes: &[Vec<usize>]) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            if i < k.inputs {
                data(n, i as u64 + 1)
            } else {
                vec![f32::NAN; n]
            }
        })
        .collect()
}

/// Compiles and simulates `k` on `preset`, compares with the evaluator; returns the stats.
pub fn check_with(k: &Kernel, shapes: &[Vec<usize>], preset: &str, opts: &Options) -> SimStats {
    let cfg = NpuConfig::preset(preset).unwrap();
    let mut want = inputs(k, shapes);
    let mut got = want.clone();
    eval_kernel(k, shapes, &mut want).unwrap();
    let p = compile_with(k, shapes, &cfg, opts).unwrap_or_else(|e| panic!("{preset}: {e}\n{k}"));
    let stats = simulate(&p, &cfg, &mut got).unwrap_or_else(|e| panic!("{preset}: {e}\n{}", p.to_asm()));
    for o in k.inputs..k.buffers.len() {
        for (i, (a, b)) in got[o].iter().zip(&want[o]).enumerate() {
            let tol = 1e-4 + 1e-4 * b.abs();
            assert!(
                a == b || (a - b).abs() <= tol || (a.is_nan() && b.is_nan()),
                "{preset} kernel {}: output {o}[{i}] = {a}, expected {b}",
                k.name
            );
        }
    }
    stats
}

pub fn check(k: &Kernel, shapes: &[Vec<usize>], preset: &str) -> SimStats {
    check_with(k, shapes, preset, &Options::default())
}

pub const PRESETS: [&str; 3] = ["davinci", "sunway", "mlu"];
