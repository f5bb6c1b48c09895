//! Fusion through the public surface: small models as exporters write them (decomposed
//! LayerNorm, Softmax, erf-GELU, attention, Conv-BN-ReLU), compiled for the `cpu` description:
//! insta snapshots of the fused IR (`kiln compile --emit fused`), outputs fused vs unfused
//! (rtol 1e-4, atol 1e-5), the `light` CNNs' Conv+BN+ReLU(+residual) as one kernel each, and
//! determinism (the same model gives the same plan every run).

use crate::common::*;
use kiln::Tensor;
use kiln_ir::printer::{print_module, PrintOptions};
use kiln_onnx::proto::ModelProto;
use kiln_onnx::testcase::compare;

fn f32s(name: &str, dims: &[i64], seed: u64) -> kiln_onnx::proto::TensorProto {
    let n = dims.iter().product::<i64>() as usize;
    f32_tensor(name, dims, &values(n, seed))
}

fn scalar(name: &str, v: f32) -> kiln_onnx::proto::TensorProto {
    f32_tensor(name, &[], &[v])
}

/// Decomposed LayerNorm over the last axis of `[4, 16]`, with scale and bias (opset 17).
fn layernorm() -> ModelProto {
    let axes = || vec![attr_ints("axes", &[-1])];
    model(
        17,
        vec![
            node("ReduceMean", "ln/mean", &["x"], &["mu"], axes()),
            node("Sub", "ln/sub", &["x", "mu"], &["d"], vec![]),
            node("Pow", "ln/pow", &["d", "two"], &["d2"], vec![]),
            node("ReduceMean", "ln/var", &["d2"], &["var"], axes()),
            node("Add", "ln/add_eps", &["var", "eps"], &["ve"], vec![]),
            node("Sqrt", "ln/sqrt", &["ve"], &["sd"], vec![]),
            node("Div", "ln/div", &["d", "sd"], &["n"], vec![]),
            node("Mul", "ln/scale", &["n", "gamma"], &["ns"], vec![]),
            node("Add", "ln/shift", &["ns", "beta"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["4", "16"])],
        vec![value_info("y", 1, &["4", "16"])],
        vec![scalar("two", 2.0), scalar("eps", 1e-5), f32s("gamma", &[16], 1), f32s("beta", &[16], 2)],
    )
}

/// Softmax as `exp(x - max) / sum(exp(x - max))` over the last axis of `[4, 16]` (opset 17).
fn softmax() -> ModelProto {
    model(
        17,
        vec![
            node("ReduceMax", "sm/max", &["x"], &["m"], vec![attr_ints("axes", &[-1])]),
            node("Sub", "sm/sub", &["x", "m"], &["d"], vec![]),
            node("Exp", "sm/exp", &["d"], &["e"], vec![]),
            node("ReduceSum", "sm/sum", &["e", "last"], &["s"], vec![]),
            node("Div", "sm/div", &["e", "s"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["4", "16"])],
        vec![value_info("y", 1, &["4", "16"])],
        vec![i64_tensor("last", &[1], &[-1])],
    )
}

/// `gelu(x·W + b)` with erf-GELU as torch exports it.
fn gelu() -> ModelProto {
    model(
        17,
        vec![
            node("MatMul", "fc/matmul", &["x", "W"], &["h0"], vec![]),
            node("Add", "fc/bias", &["h0", "b"], &["h"], vec![]),
            node("Div", "gelu/div", &["h", "sqrt2"], &["hd"], vec![]),
            node("Erf", "gelu/erf", &["hd"], &["he"], vec![]),
            node("Add", "gelu/add", &["he", "one"], &["h1"], vec![]),
            node("Mul", "gelu/mul", &["h", "h1"], &["hm"], vec![]),
            node("Mul", "gelu/half", &["hm", "half"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["4", "16"])],
        vec![value_info("y", 1, &["4", "16"])],
        vec![
            f32s("W", &[16, 16], 3),
            f32s("b", &[16], 4),
            scalar("sqrt2", std::f32::consts::SQRT_2),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ],
    )
}

/// Causal attention on `[1, 2, 8, 4]` heads: `softmax(where(mask, q·kᵀ/2, -inf))·v`.
fn attention() -> ModelProto {
    let mask: Vec<bool> = (0..64).map(|i| i % 8 <= i / 8).collect();
    let mask = kiln_onnx::proto::TensorProto {
        name: Some("causal".into()),
        dims: vec![8, 8],
        data_type: Some(9),
        int32_data: mask.iter().map(|&b| b as i32).collect(),
        ..Default::default()
    };
    let qkv = |n: &str| value_info(n, 1, &["1", "2", "8", "4"]);
    model(
        17,
        vec![
            node("Transpose", "attn/kt", &["k"], &["kt"], vec![attr_ints("perm", &[0, 1, 3, 2])]),
            node("MatMul", "attn/qk", &["q", "kt"], &["s0"], vec![]),
            node("Div", "attn/scale", &["s0", "two"], &["s1"], vec![]),
            node("Where", "attn/mask", &["causal", "s1", "neg_inf"], &["s2"], vec![]),
            node("Softmax", "attn/softmax", &["s2"], &["p"], vec![attr_int("axis", -1)]),
            node("MatMul", "attn/pv", &["p", "v"], &["y"], vec![]),
        ],
        vec![qkv("q"), qkv("k"), qkv("v")],
        vec![qkv("y")],
        vec![mask, scalar("two", 2.0), scalar("neg_inf", f32::NEG_INFINITY)],
    )
}

/// Attention with a tanh soft-cap on the scores (`30·tanh(s/30)`, as Gemma does), which the
/// e-graph does not recognize as `Attention`: fusion still makes the chain one kernel.
fn softcapped_attention() -> ModelProto {
    let qkv = |n: &str| value_info(n, 1, &["1", "2", "8", "4"]);
    model(
        17,
        vec![
            node("Transpose", "attn/kt", &["k"], &["kt"], vec![attr_ints("perm", &[0, 1, 3, 2])]),
            node("MatMul", "attn/qk", &["q", "kt"], &["s0"], vec![]),
            node("Div", "attn/cap_in", &["s0", "cap"], &["s1"], vec![]),
            node("Tanh", "attn/tanh", &["s1"], &["s2"], vec![]),
            node("Mul", "attn/cap_out", &["s2", "cap"], &["s3"], vec![]),
            node("Softmax", "attn/softmax", &["s3"], &["p"], vec![attr_int("axis", -1)]),
            node("MatMul", "attn/pv", &["p", "v"], &["y"], vec![]),
        ],
        vec![qkv("q"), qkv("k"), qkv("v")],
        vec![qkv("y")],
        vec![scalar("cap", 30.0)],
    )
}

/// `relu(batchnorm(conv(x)))` on `[1, 3, 8, 8]`, 4 filters 3×3, pad 1, plus a residual
/// `relu(. + conv2(.))` as ResNet blocks have.
fn conv_bn_relu() -> ModelProto {
    let bn = |p: &str, seed: u64| {
        let pos: Vec<f32> = values(4, seed).iter().map(|v| 1.0 + 0.25 * v).collect();
        vec![
            f32_tensor(&format!("{p}_scale"), &[4], &pos),
            f32s(&format!("{p}_bias"), &[4], seed + 1),
            f32s(&format!("{p}_mean"), &[4], seed + 2),
            f32_tensor(&format!("{p}_var"), &[4], &pos),
        ]
    };
    let mut inits = vec![f32s("w1", &[4, 3, 3, 3], 10), f32s("w2", &[4, 4, 3, 3], 11)];
    inits.extend(bn("bn1", 20));
    inits.extend(bn("bn2", 30));
    let pads = || vec![attr_ints("pads", &[1, 1, 1, 1])];
    let bn_in = |p: &str, x: &str| {
        [x.to_string(), format!("{p}_scale"), format!("{p}_bias"), format!("{p}_mean"), format!("{p}_var")]
    };
    let b1 = bn_in("bn1", "c1");
    let b2 = bn_in("bn2", "c2");
    fn r(v: &[String; 5]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    model(
        17,
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"], pads()),
            node("BatchNormalization", "bn1", &r(&b1), &["n1"], vec![]),
            node("Relu", "relu1", &["n1"], &["a1"], vec![]),
            node("Conv", "conv2", &["a1", "w2"], &["c2"], pads()),
            node("BatchNormalization", "bn2", &r(&b2), &["n2"], vec![]),
            node("Add", "residual", &["n2", "a1"], &["s"], vec![]),
            node("Relu", "relu2", &["s"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["1", "3", "8", "8"])],
        vec![value_info("y", 1, &["1", "4", "8", "8"])],
        inits,
    )
}

/// Saves and loads a model, compiles it fused and unfused for `cpu`, checks the outputs agree
/// on seeded inputs, and returns the fused IR.
fn fused_ir(name: &str, proto: &ModelProto) -> String {
    let dir = temp_dir(&format!("fusion-{name}"));
    let path = save(&dir, &format!("{name}.onnx"), proto);
    let m = kiln::load_model(&path).unwrap_or_else(|e| panic!("{e}"));
    let fused = kiln::compile(m.clone(), "cpu").unwrap_or_else(|e| panic!("{e}"));
    let plain = kiln::compile_with(m, "cpu", &kiln::Options { fusion: false, ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    let inputs: Vec<Tensor> = fused
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| {
            let shape = ty.static_shape().expect("static inputs");
            Tensor::from_f32(&shape, values(shape.iter().product(), 100 + i as u64))
        })
        .collect();
    let a = kiln_ir::interp::run(fused.module(), inputs.clone()).unwrap_or_else(|e| panic!("{name} fused: {e}"));
    let b = kiln_ir::interp::run(plain.module(), inputs).unwrap_or_else(|e| panic!("{name} unfused: {e}"));
    for (x, y) in a.iter().zip(&b) {
        compare(x, y, 1e-4, 1e-5).unwrap_or_else(|e| panic!("{name}: fused vs unfused: {e}"));
    }
    print_module(fused.module(), PrintOptions { elide_constants_over: Some(16) })
}

fn top_level_ops(text: &str) -> Vec<String> {
    // Ops printed at the function body's indentation.
    text.lines()
        .filter(|l| l.starts_with("    %") || l.starts_with("    \"graph"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .filter(|op| op != "graph.Constant")
        .collect()
}

#[test]
fn layernorm_becomes_one_op() {
    let ir = fused_ir("layernorm", &layernorm());
    assert_eq!(top_level_ops(&ir), ["graph.LayerNormalization"], "{ir}");
    insta::assert_snapshot!("fused_layernorm", ir);
}

#[test]
fn softmax_becomes_one_op() {
    let ir = fused_ir("softmax", &softmax());
    assert_eq!(top_level_ops(&ir), ["graph.Softmax"], "{ir}");
    insta::assert_snapshot!("fused_softmax", ir);
}

#[test]
fn gelu_fuses_into_its_matmul() {
    let ir = fused_ir("gelu", &gelu());
    assert_eq!(top_level_ops(&ir), ["graph.fused"], "{ir}");
    assert!(ir.contains("graph.Gelu") && ir.contains("kind = \"contraction\""), "{ir}");
    insta::assert_snapshot!("fused_gelu", ir);
}

#[test]
fn attention_is_one_kernel() {
    let ir = fused_ir("attention", &attention());
    // Kᵀ of the recognized op composes with the model's own transpose: nothing else is left.
    assert_eq!(top_level_ops(&ir), ["graph.Attention"], "{ir}");
    insta::assert_snapshot!("fused_attention", ir);
}

/// NCHW → NHWC, an activation and a scale, then back: the transposes move past the
/// elementwise ops, meet and cancel, leaving one elementwise kernel.
#[test]
fn transposes_around_elementwise_ops_cancel() {
    let m = model(
        17,
        vec![
            node("Transpose", "to_nhwc", &["x"], &["t"], vec![attr_ints("perm", &[0, 2, 3, 1])]),
            node("Relu", "relu", &["t"], &["r"], vec![]),
            node("Mul", "scale", &["r", "half"], &["s"], vec![]),
            node("Transpose", "to_nchw", &["s"], &["y"], vec![attr_ints("perm", &[0, 3, 1, 2])]),
        ],
        vec![value_info("x", 1, &["1", "3", "4", "5"])],
        vec![value_info("y", 1, &["1", "3", "4", "5"])],
        vec![scalar("half", 0.5)],
    );
    let ir = fused_ir("transposes", &m);
    assert!(!ir.contains("graph.Transpose"), "{ir}");
    assert_eq!(top_level_ops(&ir), ["graph.fused"], "{ir}");
}

/// An explicit Expand before a broadcasting Add is dropped (the Add broadcasts by itself).
#[test]
fn explicit_expand_before_broadcast_is_dropped() {
    let m = model(
        17,
        vec![
            node("Expand", "expand", &["b", "shape"], &["be"], vec![]),
            node("Add", "add", &["x", "be"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["2", "3", "4"])],
        vec![value_info("y", 1, &["2", "3", "4"])],
        vec![f32s("b", &[4], 7), i64_tensor("shape", &[3], &[2, 3, 4])],
    );
    let ir = fused_ir("expand", &m);
    assert!(!ir.contains("graph.Expand"), "{ir}");
    assert_eq!(top_level_ops(&ir), ["graph.Add"], "{ir}");
}

#[test]
fn unrecognized_attention_chain_is_still_one_kernel() {
    let ir = fused_ir("softcapped_attention", &softcapped_attention());
    assert_eq!(top_level_ops(&ir), ["graph.fused"], "{ir}");
    assert!(ir.contains("kind = \"attention\"") && ir.contains("graph.Tanh"), "{ir}");
}

#[test]
fn conv_bn_relu_residual_is_one_kernel_per_conv() {
    let ir = fused_ir("conv_bn_relu", &conv_bn_relu());
    assert_eq!(top_level_ops(&ir), ["graph.fused", "graph.fused"], "{ir}");
    assert!(!ir.contains("BatchNormalization"), "BatchNormalization folds into the convolutions:\n{ir}");
    insta::assert_snapshot!("fused_conv_bn_relu", ir);
}

/// In ResNet-50 every Conv is one kernel with its BatchNormalization, Relu and residual Add:
/// none of those is left at the top level, and there are no more kernels than convolutions
/// plus the pooling, classifier and softmax ops.
#[test]
fn resnet50_collapses_conv_bn_relu_residual() {
    let path = data_dir().join("light/light_resnet50.onnx");
    let r = kiln::inspect::inspect(&path, "cpu").unwrap_or_else(|e| panic!("{e}"));
    println!(
        "resnet50: {} graph ops -> {} kernels, bytes {} -> {}, fusion {:.0} ms, {:?}",
        r.graph_ops, r.kernels, r.bytes_moved_before, r.bytes_moved_after, r.fusion_ms, r.kernels_by_kind
    );
    for op in ["BatchNormalization", "Relu", "Add", "Sum"] {
        assert!(!r.kernels_by_kind.contains_key(op), "a {op} is its own kernel: {:?}", r.kernels_by_kind);
    }
    let convs = r.ops_by_type["Conv"];
    assert!(r.kernels <= convs + 5, "{} kernels for {convs} convolutions", r.kernels);
    assert!(r.bytes_moved_after * 3 < r.bytes_moved_before * 2);
}

/// Every `light` CNN: BatchNormalization never survives as a kernel, and fusion never adds
/// kernels. (Numerics with fusion on: tests/light.rs compiles with fusion, the default.)
#[test]
fn light_models_fuse() {
    for name in
        ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19", "zfnet512"]
    {
        let path = data_dir().join(format!("light/light_{name}.onnx"));
        let r = kiln::inspect::inspect(&path, "cpu").unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{name}: {} graph ops -> {} kernels, bytes {} -> {} ({:.2}x), fusion {:.0} ms",
            r.graph_ops,
            r.kernels,
            r.bytes_moved_before,
            r.bytes_moved_after,
            r.bytes_moved_before as f64 / r.bytes_moved_after as f64,
            r.fusion_ms
        );
        assert!(!r.kernels_by_kind.contains_key("BatchNormalization"), "{name}: {:?}", r.kernels_by_kind);
        assert!(!r.kernels_by_kind.contains_key("Relu"), "{name}: {:?}", r.kernels_by_kind);
        assert!(r.kernels < r.graph_ops && r.bytes_moved_after < r.bytes_moved_before, "{name}");
    }
}

/// The same model gives the same plan every run.
#[test]
fn plans_are_deterministic() {
    let path = crate::transformers::block_paths()[0].clone();
    let print = || {
        let m = kiln::load_model(&path).unwrap();
        let c = kiln::compile(m, "cpu").unwrap();
        print_module(c.module(), PrintOptions { elide_constants_over: Some(16) })
    };
    let first = print();
    for _ in 0..2 {
        assert!(first == print(), "two compiles of the same model gave different plans");
    }
}

/// Fusion is priced per target: the same model gets a plan on every target description.
#[test]
fn every_target_gets_a_plan() {
    let dir = temp_dir("fusion-targets");
    let path = save(&dir, "ln.onnx", &layernorm());
    for t in ["ref", "cpu", "rvv", "npu", "cuda", "rocm"] {
        let r = kiln::inspect::inspect(&path, t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(r.kernels, 1, "{t}: {:?}", r.kernels_by_kind);
    }
}
