//! The Rust library as a framework uses it: a graph built in code ([`kiln::GraphBuilder`]),
//! compiled by a [`kiln::Compiler`], run by position and by name, with every bad call a
//! [`kiln::Error`] variant the caller can match. (The C API is tested by its C and C++ examples,
//! `compiler/capi/tests`; the Python package by pytest, `compiler/python/tests`.)

use kiln::{Attr, Compiler, DType, Dim, Error, GraphBuilder, Module, Tensor, TensorType};

fn f32s(shape: &[usize], seed: u32) -> Tensor {
    let n = shape.iter().product::<usize>();
    Tensor::from_f32(shape, (0..n).map(|i| ((i as u32 * 7919 + seed) % 97) as f32 / 48.5 - 1.0).collect())
}

/// `y = LayerNorm(x @ w + b)` over the last axis, then GELU: a block a framework would hand over.
fn mlp_block(batch: Dim) -> Module {
    let mut g = GraphBuilder::new("mlp_block");
    let x = g.input("x", TensorType::new(DType::F32, vec![batch, Dim::Known(64)])).unwrap();
    let w = g.constant("w", f32s(&[64, 32], 1));
    let b = g.constant("b", f32s(&[32], 2));
    let scale = g.constant("scale", f32s(&[32], 3));
    let h = g.op("MatMul", &[x, w]).unwrap();
    let h = g.op("Add", &[h, b]).unwrap();
    let n = g.op_with("LayerNormalization", &[h, scale], [("axis", Attr::Int(-1))]).unwrap();
    let y = g.op_with("Gelu", &[n], [("approximate", Attr::Str("tanh".into()))]).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape, b.shape);
    for (x, y) in a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()) {
        assert!((x - y).abs() <= 1e-4 + 1e-3 * y.abs(), "{x} vs {y}");
    }
}

#[test]
fn a_built_graph_compiles_and_runs_natively_as_on_the_reference() {
    let model = mlp_block(Dim::sym("N"));
    let native = Compiler::new("cpu").threads(2).dim("N", 8).compile(&model).unwrap();
    let reference = Compiler::new("ref").compile(&model).unwrap();
    assert_eq!(native.inputs()[0].0, "x");
    assert_eq!(native.outputs()[0].0, "y");
    assert!(native.native_kernels().unwrap() >= 1);
    assert!(native.host_kernels().unwrap().is_empty(), "{:?}", native.host_kernels().unwrap());
    // The symbolic batch runs at any size.
    for n in [1, 5, 16] {
        let x = f32s(&[n, 64], n as u32);
        let got = native.run(vec![x.clone()]).unwrap();
        let want = reference.run(vec![x]).unwrap();
        assert_close(&got[0], &want[0]);
    }
    // Fusion off compiles more kernels, same numbers.
    let unfused = Compiler::new("cpu").fusion(false).compile(&model).unwrap();
    assert!(unfused.native_kernels().unwrap() > native.native_kernels().unwrap());
    let x = f32s(&[3, 64], 9);
    assert_close(&unfused.run(vec![x.clone()]).unwrap()[0], &native.run(vec![x]).unwrap()[0]);
}

#[test]
fn a_built_graph_is_the_imported_one() {
    // The same graph read from ONNX bytes and built in code: same module text.
    let mut g = GraphBuilder::new("relu_add");
    let x = g.input("x", TensorType::known(DType::F32, &[2, 3])).unwrap();
    let r = g.op("Relu", &[x]).unwrap();
    let y = g.op("Add", &[r, x]).unwrap();
    g.output(y, "y").unwrap();
    let built = kiln::cleanup(g.finish().unwrap()).unwrap();
    let compiled = Compiler::new("ref").compile(&built).unwrap();
    let out = compiled.run(vec![Tensor::from_f32(&[2, 3], vec![-1.0, 2.0, -3.0, 4.0, 0.5, -0.5])]).unwrap();
    assert_eq!(out[0].as_f32().unwrap(), [-1.0, 4.0, -3.0, 8.0, 1.0, -0.5]);
    let text = kiln_ir::printer::print_module(&built, Default::default());
    assert!(text.contains("graph.Relu") && text.contains("graph.Add"), "{text}");
}

#[test]
fn run_named_takes_inputs_in_any_order() {
    let mut g = GraphBuilder::new("sub");
    let a = g.input("a", TensorType::known(DType::F32, &[2])).unwrap();
    let b = g.input("b", TensorType::known(DType::F32, &[2])).unwrap();
    let d = g.op("Sub", &[a, b]).unwrap();
    g.output(d, "d").unwrap();
    g.output(a, "a_copy").unwrap(); // an input as an output: a copy under the new name
    let m = Compiler::new("cpu").compile(&g.finish().unwrap()).unwrap();
    assert_eq!(m.inputs().iter().map(|i| i.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let out = m
        .run_named(vec![
            ("b".into(), Tensor::from_f32(&[2], vec![1.0, 2.0])),
            ("a".into(), Tensor::from_f32(&[2], vec![10.0, 20.0])),
        ])
        .unwrap();
    assert_eq!(out[0].0, "d");
    assert_eq!(out[0].1.as_f32().unwrap(), [9.0, 18.0]);
    assert_eq!(out[1].0, "a_copy");
    assert_eq!(out[1].1.as_f32().unwrap(), [10.0, 20.0]);

    let one = |n: &str| (n.to_string(), Tensor::from_f32(&[2], vec![0.0, 0.0]));
    for (inputs, want) in [
        (vec![one("a")], "input 'b' is missing"),
        (vec![one("a"), one("b"), one("c")], "the model has no input 'c' (inputs: a, b)"),
        (vec![one("a"), one("a")], "input 'a' is given twice"),
    ] {
        match m.run_named(inputs) {
            Err(Error::Input { msg, .. }) => assert!(msg.contains(want), "{msg}"),
            other => panic!("expected Error::Input about {want:?}, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn bad_calls_are_error_variants_a_caller_can_match() {
    let model = mlp_block(Dim::Known(4));
    let m = Compiler::new("cpu").compile(&model).unwrap();
    let input_err = |r: Result<Vec<Tensor>, Error>| match r {
        Err(e @ Error::Input { .. }) => e.to_string(),
        other => panic!("expected Error::Input, got {:?}", other.map(|_| ())),
    };
    let msg = input_err(m.run(vec![Tensor::new(vec![4, 64], kiln::Data::I64(vec![0; 256]))]));
    assert!(msg.contains("mlp_block: input 'x': expected element type float, got int64"), "{msg}");
    let msg = input_err(m.run(vec![f32s(&[4, 63], 0)]));
    assert!(msg.contains("expected dim 1 to be 64"), "{msg}");
    let msg = input_err(m.run(vec![]));
    assert!(msg.contains("expected 1 input(s), got 0"), "{msg}");

    assert!(matches!(Compiler::new("tpu").compile(&model), Err(Error::UnknownTarget(t)) if t == "tpu"));
    let npu_on_cpu = Compiler::new("cpu").npu_config(kiln::NpuConfig::preset("mlu").unwrap()).compile(&model);
    assert!(
        matches!(npu_on_cpu, Err(Error::Usage(ref m)) if m.contains("applies to target npu")),
        "{:?}",
        npu_on_cpu.err()
    );
    assert!(matches!(Compiler::new("rvv").rvv_vlen(100).compile(&model), Err(Error::Usage(_))));
    assert!(matches!(kiln::load_model_bytes(b"\x08junk", "junk.onnx"), Err(Error::Frontend(_))));
    assert!(matches!(Compiler::new("cpu").compile_file("no/such.onnx".as_ref()), Err(Error::Frontend(_))));
}

#[test]
fn builder_errors_name_the_node_and_op() {
    let mut g = GraphBuilder::new("bad");
    let x = g.input("x", TensorType::known(DType::F32, &[2, 3])).unwrap();
    let y = g.input("y", TensorType::known(DType::F32, &[4])).unwrap();
    let e = g.op("Add", &[x, y]).unwrap_err().to_string();
    assert!(e.contains("bad: node 'Add_0' (Add)") && e.contains("cannot be broadcast"), "{e}");
    let e = g.op("NoSuchOp", &[x]).unwrap_err().to_string();
    assert!(e.contains("node 'NoSuchOp_1' (NoSuchOp): unsupported op"), "{e}");
    let e = g.input("x", TensorType::known(DType::F32, &[1])).unwrap_err().to_string();
    assert!(e.contains("input 'x': the name is already used"), "{e}");
    let e = g.op("Relu", &[kiln::ValueId(999)]).unwrap_err().to_string();
    assert!(e.contains("is not a value of this graph"), "{e}");
    let e = g.op_with("Softmax", &[x], [("axis", Attr::Int(5))]).unwrap_err().to_string();
    assert!(e.contains("(Softmax)"), "{e}");
    assert!(GraphBuilder::new("m").opset(99).is_err());
    let e = GraphBuilder::new("empty").finish().unwrap_err().to_string();
    assert!(e.contains("no outputs"), "{e}");
}

#[test]
fn the_npu_simulator_is_one_option_away() {
    let model = mlp_block(Dim::Known(16));
    let npu = Compiler::new("npu").npu_config(kiln::NpuConfig::preset("davinci").unwrap()).compile(&model).unwrap();
    let reference = Compiler::new("ref").compile(&model).unwrap();
    let x = f32s(&[16, 64], 4);
    assert_close(&npu.run(vec![x.clone()]).unwrap()[0], &reference.run(vec![x]).unwrap()[0]);
    assert!(npu.sim_report().is_some_and(|r| r.cycles > 0));
}
