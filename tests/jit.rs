//! The native path's foundation: MLIR of upstream dialects, lowered to LLVM and JIT-compiled
//! in process (`kiln_targets::jit`), runs on host buffers and matches the interpreter.

use kiln::Tensor;
use kiln_targets::jit::{Jit, MemRef};

/// `out = max(a + b, 0)` over a dynamically sized 1-D buffer, as a loop nest.
const ADD_RELU: &str = r#"
func.func @add_relu(%a: memref<?xf32>, %b: memref<?xf32>, %out: memref<?xf32>) attributes { llvm.emit_c_interface } {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %zero = arith.constant 0.0 : f32
  %n = memref.dim %a, %c0 : memref<?xf32>
  scf.for %i = %c0 to %n step %c1 {
    %x = memref.load %a[%i] : memref<?xf32>
    %y = memref.load %b[%i] : memref<?xf32>
    %s = arith.addf %x, %y : f32
    %r = arith.maximumf %s, %zero : f32
    memref.store %r, %out[%i] : memref<?xf32>
  }
  return
}
"#;

/// Row sums of a `[M, N]` buffer into `[M, 1]`, with `math.exp` on the way (a softmax's
/// denominator): reductions and math lower too.
const ROW_EXP_SUM: &str = r#"
func.func @row_exp_sum(%x: memref<?x?xf32>, %out: memref<?x?xf32>) attributes { llvm.emit_c_interface } {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %zero = arith.constant 0.0 : f32
  %m = memref.dim %x, %c0 : memref<?x?xf32>
  %n = memref.dim %x, %c1 : memref<?x?xf32>
  scf.for %i = %c0 to %m step %c1 {
    %acc = scf.for %j = %c0 to %n step %c1 iter_args(%s = %zero) -> (f32) {
      %v = memref.load %x[%i, %j] : memref<?x?xf32>
      %e = math.exp %v : f32
      %t = arith.addf %s, %e : f32
      scf.yield %t : f32
    }
    memref.store %acc, %out[%i, %c0] : memref<?x?xf32>
  }
  return
}
"#;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

#[test]
fn jit_elementwise_loop_matches_the_interpreter() {
    let jit = Jit::compile(ADD_RELU).unwrap_or_else(|e| panic!("{e}"));
    // Any size: the loop bound is read from the descriptor at run time.
    for n in [1usize, 7, 1000] {
        let (mut a, mut b, mut out) = (values(n, 1), values(n, 2), vec![f32::NAN; n]);
        let want = {
            let x = Tensor::from_f32(&[n], a.clone());
            let y = Tensor::from_f32(&[n], b.clone());
            let s = kiln_ir::graph::lookup("Add").unwrap();
            let r = kiln_ir::graph::lookup("Relu").unwrap();
            let attrs = kiln_ir::attr::Attrs::new();
            let cx = kiln_ir::graph::EvalCx {
                attrs: kiln_ir::graph::AttrView(&attrs),
                num_outputs: 1,
                opset: 28,
                regions: &[],
                runner: &kiln_ir::graph::NoRegions,
            };
            let sum = s.eval(&cx, &[Some(&x), Some(&y)]).unwrap().remove(0);
            r.eval(&cx, &[Some(&sum)]).unwrap().remove(0)
        };
        let mut args = [MemRef::of(&mut a, &[n]), MemRef::of(&mut b, &[n]), MemRef::of(&mut out, &[n])];
        // SAFETY: three rank-1 f32 memrefs, as the function is declared.
        unsafe { jit.call("add_relu", &mut args) }.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, want.as_f32().unwrap(), "n = {n}");
    }
}

#[test]
fn jit_reduction_with_math_matches_a_reference() {
    let jit = Jit::compile(ROW_EXP_SUM).unwrap_or_else(|e| panic!("{e}"));
    let (m, n) = (3usize, 5usize);
    let mut x = values(m * n, 3);
    let want: Vec<f32> = x.chunks(n).map(|r| r.iter().map(|v| v.exp()).sum()).collect();
    let mut out = vec![0.0f32; m];
    let mut args = [MemRef::of(&mut x, &[m, n]), MemRef::of(&mut out, &[m, 1])];
    // SAFETY: two rank-2 f32 memrefs, as the function is declared.
    unsafe { jit.call("row_exp_sum", &mut args) }.unwrap_or_else(|e| panic!("{e}"));
    for (g, w) in out.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * w.abs(), "{out:?} vs {want:?}");
    }
}

#[test]
fn bad_mlir_is_an_error_not_a_crash() {
    let e = Jit::compile("func.func @f( {").err().expect("refused");
    assert!(e.to_string().contains("does not parse"), "{e}");
}
