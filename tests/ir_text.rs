//! Printed IR: insta snapshots of the graph dialect for small models, print → parse → print
//! round trips, and `mlir-opt-22 --allow-unregistered-dialect` parsing what kiln prints.

use crate::common::{data_dir, save, symbolic_mlp, temp_dir};
use kiln_ir::printer::{print_module, PrintOptions};
use kiln_ir::Module;
use std::path::Path;
use std::process::Command;

fn load(path: &Path) -> Module {
    kiln::load_model(path).unwrap_or_else(|e| panic!("{e}"))
}

fn node_model(case: &str) -> Module {
    load(&data_dir().join("node").join(case).join("model.onnx"))
}

fn printed(m: &Module) -> String {
    print_module(m, PrintOptions::default())
}

/// Prints, parses back, prints again: the two texts must be equal, and the parsed module equal.
fn round_trip(m: &Module) {
    let text = printed(m);
    let back = kiln_ir::parser::parse_module(&text).unwrap_or_else(|e| panic!("parse error {e} in:\n{text}"));
    assert_eq!(printed(&back), text);
    kiln_ir::verify::verify(&back).unwrap_or_else(|e| panic!("parsed module does not verify: {e}"));
}

fn mlir_opt() -> &'static str {
    if Path::new("/usr/bin/mlir-opt-22").exists() {
        "/usr/bin/mlir-opt-22"
    } else {
        "/usr/lib/llvm-22/bin/mlir-opt"
    }
}

/// Runs mlir-opt on printed IR; it must parse and verify it.
fn mlir_opt_parses(text: &str, dir: &Path, name: &str) {
    let p = dir.join(format!("{name}.mlir"));
    std::fs::write(&p, text).expect("write");
    let out = Command::new(mlir_opt())
        .args(["--allow-unregistered-dialect", "--mlir-print-op-generic", "-o", "/dev/null"])
        .arg(&p)
        .output()
        .expect("mlir-opt-22 runs (installed by scripts/setup.sh)");
    assert!(out.status.success(), "mlir-opt rejected {name}:\n{}\n{text}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn snapshot_symbolic_mlp() {
    let dir = temp_dir("snap-mlp");
    let m = load(&save(&dir, "mlp.onnx", &symbolic_mlp()));
    insta::assert_snapshot!("symbolic_mlp", printed(&m));
}

/// Shape computations on symbolic dims keep the symbols: the Reshape gives `[B, S, 2, 4]`.
#[test]
fn snapshot_dynamic_head_split() {
    let dir = temp_dir("snap-heads");
    let m = load(&save(&dir, "heads.onnx", &crate::common::dynamic_head_split()));
    let y = m.value(m.outputs()[0]).ty.to_string();
    assert_eq!(y, "tensor<?x2x?x4xf32, [\"B\", \"S\"]>");
    insta::assert_snapshot!("dynamic_head_split", printed(&m));
    // And it runs at any binding of B and S.
    for (b, sq) in [(1usize, 1usize), (2, 3)] {
        let x = kiln::Tensor::from_f32(&[b, sq, 8], (0..b * sq * 8).map(|i| i as f32).collect());
        let y = kiln_ir::interp::run(&m, vec![x]).expect("runs");
        assert_eq!(y[0].shape, vec![b, 2, sq, 4]);
        // y[0, h, s, d] = x[0, s, h * 4 + d]
        assert_eq!(y[0].as_f32().unwrap()[4 * sq + 1], 4.0 + 1.0);
    }
}

#[test]
fn snapshot_node_models() {
    for case in [
        "test_add_bcast",
        "test_conv_with_strides_padding",
        "test_split_variable_parts_2d_opset18",
        "test_if",
        "test_dropout_default_mask",
        "test_layer_normalization_2d_axis0",
    ] {
        insta::assert_snapshot!(case, printed(&node_model(case)));
    }
}

#[test]
fn snapshot_light_model_with_elided_weights() {
    let m = load(&data_dir().join("light/light_squeezenet.onnx"));
    let g = kiln::cleanup(m).expect("cleanup");
    insta::assert_snapshot!("light_squeezenet", print_module(&g, PrintOptions { elide_constants_over: Some(16) }));
}

/// Every node-test model kiln imports round-trips through the printer and parser; a spread
/// of them (every 5th, plus control flow, strings and omitted operands) also passes mlir-opt.
#[test]
fn printed_ir_round_trips_and_mlir_opt_parses_it() {
    let dir = temp_dir("mlir-opt");
    let mut imported = 0;
    let mut checked = 0;
    let special = [
        "test_if",
        "test_loop11",
        "test_scan_sum",
        "test_cast_FLOAT_to_STRING",
        "test_clip_default_inbounds",
        "test_dropout_default_mask",
    ];
    for (i, case) in kiln_onnx::testcase::list_cases(&data_dir().join("node")).iter().enumerate() {
        let Ok(m) = case.load_model() else { continue };
        imported += 1;
        round_trip(&m);
        if i % 5 == 0 || special.contains(&case.name.as_str()) {
            mlir_opt_parses(&printed(&m), &dir, &case.name);
            checked += 1;
        }
    }
    let mlp = load(&save(&dir, "mlp.onnx", &symbolic_mlp()));
    round_trip(&mlp);
    mlir_opt_parses(&printed(&mlp), &dir, "symbolic_mlp");
    println!("round-tripped {imported} models; mlir-opt parsed {checked}");
    assert!(imported > 1000, "only {imported} node-test models imported");
}

/// Large constants print as hex blobs that mlir-opt reads; elided ones as dense_resource.
#[test]
fn light_models_print_for_mlir_opt() {
    let dir = temp_dir("mlir-opt-light");
    let m = load(&data_dir().join("light/light_bvlc_alexnet.onnx"));
    let c = kiln::compile(m, "ref").expect("compile");
    mlir_opt_parses(&print_module(c.module(), PrintOptions { elide_constants_over: Some(16) }), &dir, "alexnet_elided");
    let small = load(&data_dir().join("node/test_conv_with_strides_padding/model.onnx"));
    let text = printed(&small);
    mlir_opt_parses(&text, &dir, "conv_full");
}
