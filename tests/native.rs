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
    /// Checked contraction kernels (a Conv, MatMul or Gemm, alone or anchoring a fused kernel).
    contractions: usize,
    /// Checked kernels with register tiles (their text mentions `kernel.mma`).
    tiled: usize,
    refused: HashMap<String, usize>,
    /// Compiled kernels, by their full description.
    compiled: HashMap<String, Rc<NativeKernel>>,
    /// Leave contraction kernels (Conv, MatMul, Gemm and fused kernels around them) unchecked.
    skip_contractions: bool,
}

/// Whether top-level op `o` is a contraction kernel (one op, or a fused kernel of that kind).
fn is_contraction(m: &kiln::Module, o: kiln_ir::ir::OpId) -> bool {
    let op = m.op(o);
    kiln_passes::fusion::classify(m, o) == kiln_passes::fusion::OpClass::Contraction
        || matches!(op.attrs.get("kind"), Some(kiln_ir::attr::Attr::Str(k)) if k == "contraction")
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
        if tally.skip_contractions && is_contraction(m, o) {
            continue;
        }
        let Ok(kernel) = kiln_passes::lower::lower(m, o, "k") else {
            if op.op_type() != "Constant" {
                *tally.refused.entry(op.op_type().to_string()).or_default() += 1;
            }
            continue;
        };
        let text = kernel.to_string();
        // The text form reads back into the same kernel.
        let parsed = kiln_ir::kernel_parser::parse_kernel(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        assert_eq!(parsed, kernel, "{name}: the kernel text does not read back\n{text}");
        let mlir = to_mlir(&kernel);
        // Omitted operands are no buffer of the kernel: an empty stand-in keeps the positions.
        let operands: Vec<Rc<Tensor>> = op
            .operands
            .iter()
            .map(|v| v.map_or_else(|| Rc::new(Tensor::from_f32(&[0], vec![])), |v| env[&v].clone()))
            .collect();
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
        tally.contractions += is_contraction(m, o) as usize;
        tally.tiled += text.contains("kernel.mma") as usize;
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
    let Tally { checked, reductions, contractions, refused, compiled, .. } = tally;
    let mut refused: Vec<_> = refused.into_iter().collect();
    refused.sort_by_key(|r| std::cmp::Reverse(r.1));
    println!(
        "native kernels: {checked} checked against the interpreter ({reductions} with reductions, {contractions} contractions; {} distinct kernels compiled); not lowered yet (top 10): {:?}",
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

/// Softmax (the op, and the decomposed chain fusion rebuilds) evaluates each exponential once:
/// the row's terms go to the output, the sum reads them back, the division scales in place.
#[test]
fn softmax_evaluates_each_exponential_once() {
    let op = model(
        17,
        vec![node("Softmax", "sm", &["x"], &["y"], vec![attr_int("axis", -1)])],
        vec![value_info("x", 1, &["N", "40"])],
        vec![value_info("y", 1, &["N", "40"])],
        vec![],
    );
    let chain = model(
        17,
        vec![
            node("ReduceMax", "max", &["x"], &["m"], vec![attr_int("keepdims", 1), attr_ints("axes", &[-1])]),
            node("Sub", "sub", &["x", "m"], &["d"], vec![]),
            node("Exp", "exp", &["d"], &["e"], vec![]),
            node("ReduceSum", "sum", &["e", "axes"], &["s"], vec![attr_int("keepdims", 1)]),
            node("Div", "div", &["e", "s"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["N", "40"])],
        vec![value_info("y", 1, &["N", "40"])],
        vec![i64_tensor("axes", &[1], &[-1])],
    );
    for (name, proto) in [("softmax_op_once", op), ("softmax_chain_once", chain)] {
        let mut tally = Tally::default();
        check_proto(name, &proto, &[vec![3, 40]], &mut tally);
        let dir = temp_dir(name);
        let c = kiln::compile(kiln::load_model(&save(&dir, "m.onnx", &proto)).unwrap(), "cpu").unwrap();
        let m = c.module();
        let o = *m.body.ops.iter().find(|&&o| m.op(o).op_type() != "Constant").expect("a kernel");
        let text = kiln_passes::lower::lower(m, o, "k").unwrap().to_string();
        assert_eq!(text.matches("exp(").count(), 1, "{name}: {text}");
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

/// The pooling, normalization and activation ops of CNNs run natively on their node tests:
/// every top-level kernel of these cases lowers (none is refused) and matches the interpreter.
#[test]
fn cnn_ops_run_natively_on_their_node_tests() {
    let machine = kiln_targets::lookup("cpu").expect("cpu").machine();
    // Cases left out: MaxPool's Indices output, integer and f16/f64 data, training-mode
    // BatchNormalization and Dropout, the `_expanded` forms (other ops).
    let prefixes = [
        "test_maxpool_",
        "test_averagepool_",
        "test_lppool_",
        "test_globalaveragepool",
        "test_globalmaxpool",
        "test_lrn",
        "test_batchnorm_e",
        "test_instancenorm_",
        "test_sum_",
        "test_mean_",
        "test_max_",
        "test_min_",
        "test_clip",
        "test_leakyrelu",
        "test_elu",
        "test_selu",
        "test_celu",
        "test_hardsigmoid",
        "test_hardswish",
        "test_softplus",
        "test_softsign",
        "test_prelu_",
        "test_dropout_default",
        "test_logsoftmax_",
        "test_softmax_",
    ];
    let skip = ["argmax", "uint8", "int", "float16", "float64", "bfloat16", "training", "expanded", "mask"];
    let (mut cases, mut checked) = (0, 0);
    let mut refused = Vec::new();
    for case in list_cases(&data_dir().join("node")) {
        if !prefixes.iter().any(|p| case.name.starts_with(p)) || skip.iter().any(|s| case.name.contains(s)) {
            continue;
        }
        let Ok(mut m) = case.load_model() else { continue };
        kiln_passes::optimize(&mut m, &machine, true).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let set = case.data_sets().unwrap().remove(0);
        let mut tally = Tally::default();
        check_model(&case.name, &m, set.inputs, &mut tally);
        if !tally.refused.is_empty() {
            refused.push(format!("{}: {:?}", case.name, tally.refused));
        }
        cases += 1;
        checked += tally.checked;
    }
    println!("CNN-op node tests: {cases} cases, {checked} kernels checked natively; refused: {refused:#?}");
    assert!(cases >= 100, "only {cases} cases");
    // Left to other work: Softmax/LogSoftmax over leading axes (opset 13, axis 0 or 1 of 3-D
    // data) reduce non-trailing axes.
    let unexpected: Vec<_> =
        refused.iter().filter(|r| !(r.contains("softmax_axis_0") || r.contains("softmax_axis_1"))).collect();
    assert!(unexpected.is_empty(), "kernels not lowered: {unexpected:#?}");
}

/// The 9 `light` CNNs (as shipped, and with randomized weights) compiled for cpu: how many of
/// their kernels lower to the kernel dialect, by op type refused (only kernels with a Conv may
/// be: those are lowered elsewhere); the lowered ones other than contractions (checked by their
/// own tests) run natively and must match the interpreter kernel by kernel (on an all-ones
/// input, and on the randomized models' input).
#[test]
fn light_cnn_kernels_lower() {
    let names = [
        "bvlc_alexnet",
        "densenet121",
        "inception_v1",
        "inception_v2",
        "resnet50",
        "shufflenet",
        "squeezenet",
        "vgg19",
        "zfnet512",
    ];
    let mut table = vec![format!(
        "{:<14} {:<8} {:>7} {:>7}  not lowered (kernels by op type or fused kind/anchor)",
        "model", "weights", "kernels", "lowered"
    )];
    let mut non_conv_refusals = Vec::new();
    for name in names {
        let random = data_dir().join("light-random").join(format!("light_{name}"));
        for (set, path) in [
            ("shipped", data_dir().join("light").join(format!("light_{name}.onnx"))),
            ("random", random.join("model.onnx")),
        ] {
            let c = kiln::compile(kiln::load_model(&path).unwrap(), "cpu").unwrap();
            let m = c.module();
            let (mut kernels, mut lowered, mut contractions) = (0, 0, 0);
            let mut refused: std::collections::BTreeMap<String, usize> = Default::default();
            for (i, &o) in m.body.ops.iter().enumerate() {
                if !kiln_passes::fusion::launches_kernel(m, o) {
                    continue;
                }
                kernels += 1;
                let op = m.op(o);
                match kiln_passes::lower::lower(m, o, &format!("k{i}")) {
                    Ok(_) => {
                        lowered += 1;
                        contractions += is_contraction(m, o) as usize;
                    }
                    Err(why) => {
                        let what = match (op.attrs.get("kind"), op.attrs.get("anchor")) {
                            (Some(kiln_ir::attr::Attr::Str(k)), Some(kiln_ir::attr::Attr::Str(a))) => {
                                format!("{k}/{a}")
                            }
                            _ => op.op_type().to_string(),
                        };
                        if !why.contains("Conv") && what != "Conv" {
                            non_conv_refusals.push(format!("{name} ({set}): {what}: {why}"));
                        }
                        *refused.entry(what).or_default() += 1;
                    }
                }
            }
            let input = if set == "random" {
                kiln_onnx::read_tensor_file(&random.join("test_data_set_0/input_0.pb")).expect("input")
            } else {
                let shape = m.value(m.inputs()[0]).ty.static_shape().expect("a static input");
                Tensor::from_f32(&shape, vec![1.0; shape.iter().product()])
            };
            let mut tally = Tally { skip_contractions: true, ..Tally::default() };
            check_model(name, m, vec![input], &mut tally);
            assert_eq!(tally.checked, lowered - contractions, "{name} ({set}): every lowered kernel is checked");
            let refused: Vec<String> = refused.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            table.push(format!("{name:<14} {set:<8} {kernels:>7} {lowered:>7}  {}", refused.join(", ")));
        }
    }
    println!("{}", table.join("\n"));
    assert!(non_conv_refusals.is_empty(), "kernels without a Conv refused: {non_conv_refusals:#?}");
}

/// A fused reduction kernel anchored by a padded MaxPool, with an elementwise prologue
/// (bias, Relu) and epilogue (scale), lowers with the batch dim symbolic and runs at several
/// batch sizes, as does a padded, ceil-mode AveragePool counting its pads.
#[test]
fn fused_pooling_kernels_run_at_any_batch_size() {
    let pool = |op: &str, extra: Vec<kiln_onnx::proto::AttributeProto>, out: [&str; 2]| {
        let mut attrs =
            vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])];
        attrs.extend(extra);
        model(
            17,
            vec![
                node("Add", "bias", &["x", "b"], &["s"], vec![]),
                node("Relu", "relu", &["s"], &["r"], vec![]),
                node(op, "pool", &["r"], &["p"], attrs),
                node("Mul", "scale", &["p", "two"], &["y"], vec![]),
            ],
            vec![value_info("x", 1, &["N", "2", "7", "8"])],
            vec![value_info("y", 1, &["N", "2", out[0], out[1]])],
            vec![f32_tensor("b", &[2, 1, 1], &[0.5, -0.25]), f32_tensor("two", &[], &[2.0])],
        )
    };
    let cases = [
        ("MaxPool", pool("MaxPool", vec![], ["4", "4"])),
        (
            "AveragePool",
            pool("AveragePool", vec![attr_int("count_include_pad", 1), attr_int("ceil_mode", 1)], ["4", "5"]),
        ),
    ];
    for (name, proto) in cases {
        let dir = temp_dir(&format!("native-{name}"));
        let path = save(&dir, "m.onnx", &proto);
        let c = kiln::compile(kiln::load_model(&path).unwrap(), "cpu").unwrap();
        let m = c.module();
        let kernels: Vec<_> =
            m.body.ops.iter().copied().filter(|&o| kiln_passes::fusion::launches_kernel(m, o)).collect();
        assert_eq!(kernels.len(), 1, "{name}: one fused kernel");
        let op = m.op(kernels[0]);
        assert_eq!(op.attrs.get("kind"), Some(&kiln_ir::attr::Attr::Str("reduction".into())), "{name}");
        let kernel = kiln_passes::lower::lower(m, kernels[0], "pool").unwrap();
        let text = kernel.to_string();
        assert!(text.contains("reduce.") && text.contains(" < "), "{name}: a window with padding checks\n{text}");
        c.prepare().unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in [1usize, 3] {
            let x =
                Tensor::from_f32(&[n, 2, 7, 8], (0..n * 112).map(|i| ((i * 37) % 23) as f32 * 0.25 - 2.5).collect());
            let got = c.run(vec![x.clone()]).unwrap();
            let want = kiln_ir::interp::run(m, vec![x]).unwrap();
            compare(&got[0], &want[0], 1e-6, 1e-6).unwrap_or_else(|e| panic!("{name}, N = {n}: {e}\n{text}"));
        }
    }
}

fn attr_string(name: &str, v: &str) -> kiln_onnx::proto::AttributeProto {
    kiln_onnx::proto::AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(kiln_onnx::proto::attribute_proto::AttributeType::String as i32),
        ..Default::default()
    }
}

/// Compiles `proto` for `cpu` and checks every kernel natively against the interpreter on
/// inputs of `shapes` (one per graph input); every kernel must lower. Returns the tally.
fn check_proto(name: &str, proto: &kiln_onnx::proto::ModelProto, shapes: &[Vec<usize>], tally: &mut Tally) {
    let dir = temp_dir(name);
    let path = save(&dir, "m.onnx", proto);
    let c = kiln::compile(kiln::load_model(&path).unwrap(), "cpu").unwrap();
    let inputs: Vec<Tensor> =
        shapes.iter().enumerate().map(|(i, s)| Tensor::from_f32(s, values(s.iter().product(), 7 + i as u64))).collect();
    let before = tally.checked;
    check_model(name, c.module(), inputs.clone(), tally);
    assert!(tally.refused.is_empty(), "{name}: kernels not lowered: {:?}", tally.refused);
    assert!(tally.checked > before, "{name}: no kernel was checked");
    // The whole model through the public API, as `kiln run` does.
    let got = c.run(inputs.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = kiln_ir::interp::run(c.module(), inputs).unwrap();
    for (g, w) in got.iter().zip(&want) {
        compare(g, w, 1e-4, 1e-5).unwrap_or_else(|e| panic!("{name}: native model vs interpreter: {e}"));
    }
}

/// A `Conv (+ bias) → Relu` model (plus a residual `Add` of the input when `residual`).
fn conv_model(
    x: &[&str],
    w: &[i64],
    attrs: Vec<kiln_onnx::proto::AttributeProto>,
    bias: bool,
    residual: bool,
    out: &[&str],
) -> kiln_onnx::proto::ModelProto {
    let wn: i64 = w.iter().product();
    let mut inits = vec![f32_tensor("W", w, &values(wn as usize, 1))];
    let mut conv_in = vec!["x", "W"];
    if bias {
        inits.push(f32_tensor("B", &[w[0]], &values(w[0] as usize, 2)));
        conv_in.push("B");
    }
    let mut nodes = vec![node("Conv", "conv", &conv_in, &["c"], attrs)];
    let mut last = "c";
    if residual {
        nodes.push(node("Add", "residual", &["c", "x"], &["s"], vec![]));
        last = "s";
    }
    nodes.push(node("Relu", "relu", &[last], &["y"], vec![]));
    model(17, nodes, vec![value_info("x", 1, x)], vec![value_info("y", 1, out)], inits)
}

/// Conv kernels (single and fused with bias, residual and Relu) over the attribute space:
/// groups (and depthwise), strides, pads (asymmetric), dilations, every auto_pad, 1-D to 3-D,
/// long kernels, taps that never touch the input, a symbolic batch.
#[test]
fn native_conv_kernels_match_the_interpreter() {
    let ints = |n: &str, v: &[i64]| attr_ints(n, v);
    let cases: Vec<(&str, Vec<&str>, Vec<i64>, Vec<kiln_onnx::proto::AttributeProto>, bool, bool, Vec<&str>)> = vec![
        (
            "conv2d_pad_residual",
            vec!["2", "8", "9", "11"],
            vec![8, 8, 3, 3],
            vec![ints("pads", &[1, 1, 1, 1])],
            true,
            true,
            vec!["2", "8", "9", "11"],
        ),
        ("conv2d_no_bias", vec!["1", "3", "6", "5"], vec![5, 3, 3, 2], vec![], false, false, vec!["1", "5", "4", "4"]),
        (
            "conv2d_groups_strides",
            vec!["1", "8", "7", "7"],
            vec![6, 4, 3, 3],
            vec![attr_int("group", 2), ints("strides", &[2, 2]), ints("pads", &[1, 0, 2, 1])],
            true,
            false,
            vec!["1", "6", "4", "3"],
        ),
        (
            "conv2d_depthwise_dilated",
            vec!["1", "6", "8", "8"],
            vec![6, 1, 3, 3],
            vec![attr_int("group", 6), ints("dilations", &[2, 2]), ints("pads", &[2, 2, 2, 2])],
            true,
            true,
            vec!["1", "6", "8", "8"],
        ),
        (
            "conv2d_same_upper_stride2",
            vec!["1", "3", "7", "8"],
            vec![4, 3, 3, 3],
            vec![attr_string("auto_pad", "SAME_UPPER"), ints("strides", &[2, 2])],
            true,
            false,
            vec!["1", "4", "4", "4"],
        ),
        (
            "conv2d_same_lower_even_kernel",
            vec!["1", "2", "6", "6"],
            vec![4, 2, 4, 4],
            vec![attr_string("auto_pad", "SAME_LOWER")],
            false,
            false,
            vec!["1", "4", "6", "6"],
        ),
        (
            "conv2d_valid",
            vec!["1", "3", "9", "7"],
            vec![5, 3, 2, 3],
            vec![attr_string("auto_pad", "VALID"), ints("strides", &[2, 1])],
            true,
            false,
            vec!["1", "5", "4", "5"],
        ),
        (
            "conv1d_dilated",
            vec!["2", "4", "20"],
            vec![8, 4, 5],
            vec![ints("pads", &[2, 2]), ints("dilations", &[2])],
            true,
            false,
            vec!["2", "8", "16"],
        ),
        (
            "conv1d_long_kernel",
            vec!["1", "3", "30"],
            vec![4, 3, 11],
            vec![ints("pads", &[5, 4])],
            true,
            false,
            vec!["1", "4", "29"],
        ),
        // More edge columns than are unrolled: bounds-checked edge loops.
        (
            "conv1d_wide_pads",
            vec!["1", "2", "6"],
            vec![3, 2, 3],
            vec![ints("pads", &[10, 9])],
            true,
            false,
            vec!["1", "3", "23"],
        ),
        (
            "conv3d",
            vec!["1", "2", "5", "6", "7"],
            vec![4, 2, 3, 3, 3],
            vec![ints("pads", &[1, 1, 1, 1, 1, 1]), ints("strides", &[1, 2, 1])],
            true,
            false,
            vec!["1", "4", "5", "3", "7"],
        ),
        (
            "conv2d_taps_outside",
            vec!["1", "1", "2", "2"],
            vec![1, 1, 3, 3],
            vec![ints("pads", &[2, 2, 2, 2]), ints("dilations", &[2, 2])],
            false,
            true,
            vec!["1", "1", "2", "2"],
        ),
        ("conv2d_1x1", vec!["1", "16", "5", "5"], vec![8, 16, 1, 1], vec![], true, false, vec!["1", "8", "5", "5"]),
        // Register tiles (kernel.mma): output channels in vectors (groups of 16 or 32 channels) ...
        (
            "conv2d_tiled_pad_residual",
            vec!["2", "32", "9", "11"],
            vec![32, 32, 3, 3],
            vec![ints("pads", &[1, 1, 1, 1])],
            true,
            true,
            vec!["2", "32", "9", "11"],
        ),
        (
            "conv2d_tiled_groups_strides_dilations",
            vec!["1", "8", "13", "12"],
            vec![32, 4, 3, 3],
            vec![
                attr_int("group", 2),
                ints("strides", &[2, 2]),
                ints("pads", &[1, 0, 2, 1]),
                ints("dilations", &[1, 2]),
            ],
            true,
            false,
            vec!["1", "32", "7", "5"],
        ),
        (
            "conv2d_tiled_7x7_stride2",
            vec!["1", "3", "20", "20"],
            vec![32, 3, 7, 7],
            vec![ints("strides", &[2, 2]), ints("pads", &[3, 3, 3, 3])],
            false,
            false,
            vec!["1", "32", "10", "10"],
        ),
        (
            "conv2d_tiled_taps_outside",
            vec!["1", "16", "2", "2"],
            vec![16, 16, 3, 3],
            vec![ints("pads", &[2, 2, 2, 2]), ints("dilations", &[2, 2])],
            true,
            true,
            vec!["1", "16", "2", "2"],
        ),
        // Dilation far above the stride: the first pixel whose taps are all in bounds is
        // ⌈p / s⌉ = 12; a tile of 8 pixels starts at 8, inside the padding.
        (
            "conv2d_tiled_wide_dilation",
            vec!["1", "16", "4", "60"],
            vec![16, 16, 3, 3],
            vec![ints("pads", &[12, 12, 12, 12]), ints("dilations", &[12, 12])],
            true,
            false,
            vec!["1", "16", "4", "60"],
        ),
        (
            "conv2d_tiled_1x1_stride2",
            vec!["1", "16", "9", "9"],
            vec![32, 16, 1, 1],
            vec![ints("strides", &[2, 2])],
            true,
            false,
            vec!["1", "32", "5", "5"],
        ),
        (
            "conv2d_tiled_1x1_end_pads",
            vec!["1", "4", "5", "5"],
            vec![16, 4, 1, 1],
            vec![ints("pads", &[0, 0, 1, 1])],
            true,
            false,
            vec!["1", "16", "6", "6"],
        ),
        // ... and 1×1 Convs as GEMMs: output pixels in vectors (a masked last tile).
        (
            "conv2d_gemm_1x1",
            vec!["2", "48", "9", "9"],
            vec![48, 48, 1, 1],
            vec![],
            true,
            true,
            vec!["2", "48", "9", "9"],
        ),
        (
            "conv2d_gemm_1x1_groups",
            vec!["1", "16", "8", "8"],
            vec![12, 8, 1, 1],
            vec![attr_int("group", 2)],
            false,
            false,
            vec!["1", "12", "8", "8"],
        ),
    ];
    let mut tally = Tally::default();
    for (name, x, w, attrs, bias, residual, out) in cases {
        let proto = conv_model(&x, &w, attrs, bias, residual, &out);
        let shape: Vec<usize> = x.iter().map(|d| d.parse().unwrap()).collect();
        check_proto(name, &proto, &[shape], &mut tally);
    }
    // A symbolic batch: one kernel at several sizes.
    let proto = conv_model(
        &["N", "3", "8", "8"],
        &[8, 3, 3, 3],
        vec![ints("pads", &[1, 1, 1, 1])],
        true,
        false,
        &["N", "8", "8", "8"],
    );
    for n in [1, 3] {
        check_proto(&format!("conv2d_batch_{n}"), &proto, &[vec![n, 3, 8, 8]], &mut tally);
    }
    for (kernel, pads) in [(3, 1), (1, 0)] {
        let proto = conv_model(
            &["N", "32", "6", "7"],
            &[32, 32, kernel, kernel],
            vec![ints("pads", &[pads; 4])],
            true,
            true,
            &["N", "32", "6", "7"],
        );
        for n in [1, 2] {
            check_proto(&format!("conv2d_tiled_{kernel}x{kernel}_batch_{n}"), &proto, &[vec![n, 32, 6, 7]], &mut tally);
        }
    }
    println!("conv: {} kernels checked ({} contractions)", tally.checked, tally.contractions);
    assert!(tally.contractions >= 28, "{} conv kernels checked", tally.contractions);
    assert!(tally.tiled >= 13, "{} conv kernels on register tiles", tally.tiled);
}

/// MatMul and Gemm kernels, single and fused (bias, Relu, residual), with a symbolic batch,
/// batched and broadcast operands, row counts across blocks and columns across tiles,
/// transposes, alpha/beta and broadcast C, 1-D operands.
#[test]
fn native_matmul_kernels_match_the_interpreter() {
    let mut tally = Tally::default();
    // MatMul + bias + Relu over [N, 37, 24] · [24, 300]: rows N·37 (blocks of 64 and a tail),
    // 300 columns (a full tile and a partial one).
    let mlp = model(
        17,
        vec![
            node("MatMul", "mm", &["x", "W"], &["h"], vec![]),
            node("Add", "bias", &["h", "b"], &["z"], vec![]),
            node("Relu", "act", &["z"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["N", "37", "24"])],
        vec![value_info("y", 1, &["N", "37", "300"])],
        vec![f32_tensor("W", &[24, 300], &values(24 * 300, 3)), f32_tensor("b", &[300], &values(300, 4))],
    );
    for n in [1, 2, 5] {
        check_proto(&format!("matmul_bias_relu_n{n}"), &mlp, &[vec![n, 37, 24]], &mut tally);
    }
    // Reduction and column tiles with tails: K = 300, N = 1030.
    let tiles = model(
        17,
        vec![node("MatMul", "mm", &["x", "W"], &["h"], vec![]), node("Relu", "act", &["h"], &["y"], vec![])],
        vec![value_info("x", 1, &["70", "300"])],
        vec![value_info("y", 1, &["70", "1030"])],
        vec![f32_tensor("W", &[300, 1030], &values(300 * 1030, 8))],
    );
    check_proto("matmul_k_and_column_tiles", &tiles, &[vec![70, 300]], &mut tally);
    // Batched operands (both inputs) with a residual epilogue; broadcast batch dims.
    let batched = model(
        17,
        vec![node("MatMul", "mm", &["a", "b"], &["h"], vec![]), node("Add", "res", &["h", "r"], &["y"], vec![])],
        vec![
            value_info("a", 1, &["2", "3", "13", "10"]),
            value_info("b", 1, &["2", "3", "10", "9"]),
            value_info("r", 1, &["2", "3", "13", "9"]),
        ],
        vec![value_info("y", 1, &["2", "3", "13", "9"])],
        vec![],
    );
    check_proto(
        "matmul_batched_residual",
        &batched,
        &[vec![2, 3, 13, 10], vec![2, 3, 10, 9], vec![2, 3, 13, 9]],
        &mut tally,
    );
    // Register tiles: batched B packed per batch; a transposed B (an input, not a constant).
    let batched_tiles = model(
        17,
        vec![node("MatMul", "mm", &["a", "b"], &["y"], vec![])],
        vec![value_info("a", 1, &["2", "3", "20", "10"]), value_info("b", 1, &["2", "3", "10", "33"])],
        vec![value_info("y", 1, &["2", "3", "20", "33"])],
        vec![],
    );
    check_proto("matmul_batched_tiles", &batched_tiles, &[vec![2, 3, 20, 10], vec![2, 3, 10, 33]], &mut tally);
    let trans_b = model(
        17,
        vec![node("Gemm", "gemm", &["a", "b"], &["y"], vec![attr_int("transB", 1)])],
        vec![value_info("a", 1, &["40", "24"]), value_info("b", 1, &["70", "24"])],
        vec![value_info("y", 1, &["40", "70"])],
        vec![],
    );
    check_proto("gemm_trans_b_tiles", &trans_b, &[vec![40, 24], vec![70, 24]], &mut tally);
    let bcast = model(
        17,
        vec![node("MatMul", "mm", &["a", "b"], &["y"], vec![])],
        vec![value_info("a", 1, &["3", "1", "5", "6"]), value_info("b", 1, &["4", "6", "7"])],
        vec![value_info("y", 1, &["3", "4", "5", "7"])],
        vec![],
    );
    check_proto("matmul_broadcast_batch", &bcast, &[vec![3, 1, 5, 6], vec![4, 6, 7]], &mut tally);
    let vec_mat = model(
        17,
        vec![node("MatMul", "mm", &["a", "b"], &["y"], vec![])],
        vec![value_info("a", 1, &["6"]), value_info("b", 1, &["2", "6", "5"])],
        vec![value_info("y", 1, &["2", "5"])],
        vec![],
    );
    check_proto("matmul_1d_3d", &vec_mat, &[vec![6], vec![2, 6, 5]], &mut tally);
    let mat_vec = model(
        17,
        vec![node("MatMul", "mm", &["a", "b"], &["y"], vec![])],
        vec![value_info("a", 1, &["2", "3", "5", "6"]), value_info("b", 1, &["6"])],
        vec![value_info("y", 1, &["2", "3", "5"])],
        vec![],
    );
    check_proto("matmul_4d_1d", &mat_vec, &[vec![2, 3, 5, 6], vec![6]], &mut tally);
    // Gemm: transposes, alpha and beta, C broadcast ([N], [M, 1]), fused Relu.
    for (name, ta, tb, alpha, beta, c) in [
        ("gemm_ta_tb_alpha_beta", 1, 1, 0.5, 2.0, vec![8i64]),
        ("gemm_column_c", 0, 0, 1.0, 1.0, vec![10, 1]),
        ("gemm_tb_no_c", 0, 1, 1.0, 1.0, vec![]),
    ] {
        let a_shape: Vec<i64> = if ta == 1 { vec![6, 10] } else { vec![10, 6] };
        let b_shape: Vec<i64> = if tb == 1 { vec![8, 6] } else { vec![6, 8] };
        let mut inputs = vec!["a", "B"];
        let mut inits = vec![f32_tensor("B", &b_shape, &values(48, 5))];
        if !c.is_empty() {
            inputs.push("C");
            inits.push(f32_tensor("C", &c, &values(c.iter().product::<i64>() as usize, 6)));
        }
        let attrs =
            vec![attr_int("transA", ta), attr_int("transB", tb), attr_float("alpha", alpha), attr_float("beta", beta)];
        let dims: Vec<String> = a_shape.iter().map(|d| d.to_string()).collect();
        let dims: Vec<&str> = dims.iter().map(|s| s.as_str()).collect();
        let g = model(
            17,
            vec![node("Gemm", "gemm", &inputs, &["h"], attrs), node("Relu", "act", &["h"], &["y"], vec![])],
            vec![value_info("a", 1, &dims)],
            vec![value_info("y", 1, &["10", "8"])],
            inits,
        );
        check_proto(name, &g, &[a_shape.iter().map(|&d| d as usize).collect()], &mut tally);
    }
    println!(
        "matmul/gemm: {} kernels checked ({} contractions, {} on register tiles)",
        tally.checked, tally.contractions, tally.tiled
    );
    assert!(tally.contractions >= 13, "{} matmul kernels checked", tally.contractions);
    // Register tiles wherever 16 rows or more (or a symbolic number) share the packed B.
    assert!(tally.tiled >= 6, "{} matmul kernels on register tiles", tally.tiled);
}

/// Single-thread timings of the two benchmark contractions (run with `--ignored`).
#[test]
#[ignore]
fn native_contraction_timings() {
    let time = |name: &str, proto: &kiln_onnx::proto::ModelProto, shapes: &[Vec<usize>]| {
        let dir = temp_dir(name);
        let c = kiln::compile(kiln::load_model(&save(&dir, "m.onnx", proto)).unwrap(), "cpu").unwrap();
        let m = c.module();
        let o = *m.body.ops.iter().find(|&&o| is_contraction(m, o)).expect("a contraction kernel");
        let kernel = kiln_passes::lower::lower(m, o, "k").unwrap();
        let native = NativeKernel::compile(kernel).unwrap();
        let mut operands: Vec<Tensor> = Vec::new();
        let mut inputs =
            shapes.iter().enumerate().map(|(i, s)| Tensor::from_f32(s, values(s.iter().product(), i as u64)));
        for v in &m.op(o).operands {
            let v = v.unwrap();
            operands.push(match m.value(v).def {
                kiln_ir::ir::ValueDef::OpResult(p, _) => match m.op(p).attrs.get("value") {
                    Some(kiln_ir::attr::Attr::Tensor(t)) => t.clone(),
                    _ => panic!("constant operand"),
                },
                _ => inputs.next().unwrap(),
            });
        }
        let refs: Vec<&Tensor> = operands.iter().collect();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            native.run(&refs).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{name}: best of 20: {:.3} ms", best * 1e3);
    };
    let conv = conv_model(
        &["1", "64", "56", "56"],
        &[64, 64, 3, 3],
        vec![attr_ints("pads", &[1, 1, 1, 1])],
        true,
        false,
        &["1", "64", "56", "56"],
    );
    time("conv 1x64x56x56, 64 3x3 filters, pad 1, + bias + Relu", &conv, &[vec![1, 64, 56, 56]]);
    let mlp = model(
        17,
        vec![
            node("MatMul", "mm", &["x", "W"], &["h"], vec![]),
            node("Add", "bias", &["h", "b"], &["z"], vec![]),
            node("Relu", "act", &["z"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["N", "768"])],
        vec![value_info("y", 1, &["N", "768"])],
        vec![f32_tensor("W", &[768, 768], &values(768 * 768, 3)), f32_tensor("b", &[768], &values(768, 4))],
    );
    time("MatMul 512x768 · 768x768 + bias + Relu", &mlp, &[vec![512, 768]]);
}
