//! Native kernels (graph → kernel dialect → MLIR → LLVM JIT) checked kernel by
//! kernel against the reference interpreter: every ONNX node test is optimized as `kiln run`
//! would (fusion for `cpu`), run on the interpreter, and every top-level kernel that lowers to
//! the kernel dialect is compiled and run natively on the very inputs the interpreter gave it;
//! its outputs must match (rtol 1e-4, atol 1e-5, CLI.md's target-vs-ref tolerance). The same for
//! the transformer blocks' norm kernels; and one compiled kernel runs at several sizes of a
//! symbolic dim.

use crate::common::*;
use kiln::Tensor;
use kiln_onnx::testcase::{compare, list_cases};
use kiln_targets::native::{to_mlir, NativeKernel};
use std::collections::HashMap;
use std::rc::Rc;

/// What [`check_model`] found.
#[derive(Default)]
struct Tally {
    checked: usize,
    /// Checked kernels with a reduction (their text mentions `reduce.`).
    reductions: usize,
    refused: HashMap<String, usize>,
    /// Compiled kernels, by their full description.
    compiled: HashMap<String, Rc<NativeKernel>>,
}

/// Runs optimized `m` on the interpreter, and every top-level kernel that lowers natively on
/// the inputs the interpreter gave it; panics on a mismatch.
fn check_model(name: &str, m: &kiln::Module, inputs: Vec<Tensor>, tally: &mut Tally) {
    let mut env: HashMap<kiln_ir::ir::ValueId, Rc<Tensor>> = HashMap::new();
    for (&v, t) in m.inputs().iter().zip(&inputs) {
        env.insert(v, Rc::new(t.clone()));
    }
    let mut seen: Vec<(kiln_ir::ir::OpId, Vec<Rc<Tensor>>)> = Vec::new();
    if kiln_ir::interp::run_observed(m, inputs, &mut |o, outs| seen.push((o, outs.to_vec()))).is_err() {
        return;
    }
    for (o, outs) in seen {
        let op = m.op(o);
        for (&r, t) in op.results.iter().zip(&outs) {
            env.insert(r, t.clone());
        }
        let Ok(kernel) = kiln_passes::lower::lower(m, o, "k") else {
            if op.op_type() != "Constant" {
                *tally.refused.entry(op.op_type().to_string()).or_default() += 1;
            }
            continue;
        };
        let text = kernel.to_string();
        let mlir = to_mlir(&kernel);
        let operands: Vec<Rc<Tensor>> =
            op.operands.iter().map(|v| env[&v.expect("lowered ops have all operands")].clone()).collect();
        let refs: Vec<&Tensor> = operands.iter().map(|t| &**t).collect();
        // Many cases share a kernel: compile each distinct one once.
        let key = format!("{kernel:?}");
        let native = match tally.compiled.get(&key) {
            Some(n) => n.clone(),
            None => {
                let n = Rc::new(
                    NativeKernel::compile(kernel)
                        .unwrap_or_else(|e| panic!("{name}: node '{}': {e}\n{mlir}", op.node_name())),
                );
                tally.compiled.insert(key, n.clone());
                n
            }
        };
        let got = native.run(&refs).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (g, w) in got.iter().zip(&outs) {
            compare(g, w, 1e-4, 1e-5).unwrap_or_else(|e| {
                panic!("{name}: node '{}' ({}): native vs interpreter: {e}\n{text}", op.node_name(), op.op_type())
            });
        }
        tally.checked += 1;
        tally.reductions += text.contains("reduce.") as usize;
    }
}

#[test]
fn native_kernels_match_the_interpreter_on_node_tests() {
    let machine = kiln_targets::lookup("cpu").expect("cpu").machine();
    let mut tally = Tally::default();
    for case in list_cases(&data_dir().join("node")) {
        let Ok(mut m) = case.load_model() else { continue };
        if kiln_passes::optimize(&mut m, &machine, true).is_err() {
            continue;
        }
        let Ok(sets) = case.data_sets() else { continue };
        let Some(set) = sets.into_iter().next() else { continue };
        check_model(&case.name, &m, set.inputs, &mut tally);
    }
    let Tally { checked, reductions, refused, compiled } = tally;
    let mut refused: Vec<_> = refused.into_iter().collect();
    refused.sort_by_key(|r| std::cmp::Reverse(r.1));
    println!(
        "native kernels: {checked} checked against the interpreter ({reductions} with reductions; {} distinct kernels compiled); not lowered yet (top 10): {:?}",
        compiled.len(),
        &refused[..refused.len().min(10)]
    );
    assert!(checked >= 200 && reductions >= 10, "only {checked} kernels ({reductions} with reductions) were checked");
}

/// The transformer blocks' norm kernels (LayerNorm with scale and bias, RMSNorm) and the
/// elementwise ones run natively and match.
#[test]
fn native_norm_kernels_of_transformer_blocks() {
    for path in crate::transformers::block_paths() {
        let dir = path.parent().expect("block dir").to_path_buf();
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let set = kiln_onnx::testcase::TestCase::new(&dir).data_sets().unwrap().remove(0);
        let c = kiln::compile(kiln::load_model(&path).unwrap(), "cpu").unwrap();
        let mut tally = Tally::default();
        check_model(&name, c.module(), set.inputs, &mut tally);
        println!("{name}: {} kernels run natively ({} with reductions)", tally.checked, tally.reductions);
        assert!(tally.reductions >= 2, "{name}: the two norms run natively");
    }
}

#[test]
fn one_native_kernel_runs_at_any_size_of_a_symbolic_dim() {
    // relu(x + b) · 2 over [N, 8]: one fused elementwise kernel with a broadcast bias.
    let proto = model(
        17,
        vec![
            node("Add", "add", &["x", "b"], &["s"], vec![]),
            node("Relu", "relu", &["s"], &["r"], vec![]),
            node("Mul", "twice", &["r", "two"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["N", "8"])],
        vec![value_info("y", 1, &["N", "8"])],
        vec![f32_tensor("b", &[8], &[0.5, -0.5, 1.0, -1.0, 0.0, 2.0, -2.0, 0.25]), f32_tensor("two", &[], &[2.0])],
    );
    let dir = temp_dir("native-sym");
    let path = save(&dir, "m.onnx", &proto);
    let c = kiln::compile(kiln::load_model(&path).unwrap(), "cpu").unwrap();
    let m = c.module();
    let fused: Vec<_> = m.body.ops.iter().copied().filter(|&o| m.op(o).name == "graph.fused").collect();
    assert_eq!(fused.len(), 1);
    let kernel = kiln_passes::lower::lower(m, fused[0], "bias_relu_scale").unwrap();
    let text = kernel.to_string();
    assert!(text.contains("kernel.for.parallel i0 in 0..dim(%3, 0)"), "{text}");
    let native = NativeKernel::compile(kernel).unwrap();
    let consts: Vec<Tensor> = m.op(fused[0]).operands[1..]
        .iter()
        .map(|v| {
            let def = m.value(v.unwrap()).def;
            let kiln_ir::ir::ValueDef::OpResult(o, _) = def else { panic!("constant operand") };
            match m.op(o).attrs.get("value") {
                Some(kiln_ir::attr::Attr::Tensor(t)) => t.clone(),
                _ => panic!("constant"),
            }
        })
        .collect();
    for n in [1usize, 3, 64] {
        let x = Tensor::from_f32(&[n, 8], (0..n * 8).map(|i| i as f32 * 0.1 - 3.0).collect());
        let mut refs = vec![&x];
        refs.extend(consts.iter());
        let got = native.run(&refs).unwrap();
        let want = kiln_ir::interp::run(m, vec![x.clone()]).unwrap();
        compare(&got[0], &want[0], 0.0, 0.0).unwrap_or_else(|e| panic!("N = {n}: {e}"));
    }
}
