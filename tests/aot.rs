//! Ahead-of-time compilation for `cpu`: `kiln compile MODEL --target cpu -o DIR` writes an
//! object, a shared library and a C header. The library runs with no LLVM or MLIR: from the C
//! example (`targets/aot/run_model.c`, built here with the system C compiler) and from the
//! `kiln-runtime` crate; both must match onnxruntime's outputs for the GPT-2 and Llama blocks.
//! A model with a kernel not lowered to native code yet is refused, naming it.

use crate::common::*;
use kiln_onnx::testcase::{compare, TestCase};
use std::path::Path;
use std::process::Command;

fn write_f32(path: &Path, t: &kiln::Tensor) {
    let bytes: Vec<u8> = t.as_f32().expect("f32 input").iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn aot_library_runs_from_c_and_from_the_runtime_crate() {
    let dir = temp_dir("aot");
    let example = dir.join("run_model");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/aot/run_model.c");
    let o = Command::new("cc").arg("-O2").arg(&src).arg("-o").arg(&example).arg("-ldl").output().expect("cc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for block in ["gpt2_block", "llama_block"] {
        let case = TestCase::new(&crate::transformers::blocks_dir().join(block));
        let out = dir.join(block);
        let o = kiln(&[
            "compile",
            case.dir.join("model.onnx").to_str().unwrap(),
            "--target",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ]);
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            // A block whose every kernel does not lower yet is refused with the kernels named.
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("not lowered yet") && err.contains("node '"), "{block}: {err}");
            println!("{block}: AOT refused: {err}");
            continue;
        }
        println!("{block}: {text}");
        for f in ["model.o", "libmodel.so", "model.h", "model.c"] {
            assert!(out.join(f).exists(), "{block}: {f} missing");
        }
        let header = std::fs::read_to_string(out.join("model.h")).unwrap();
        assert!(header.contains("int model_run(const float *const *inputs, float *const *outputs, void *arena);"));
        let set = case.data_sets().unwrap().remove(0);
        // From C.
        let input = out.join("in0.bin");
        write_f32(&input, &set.inputs[0]);
        let result = out.join("out0.bin");
        let o =
            Command::new(&example).arg(out.join("libmodel.so")).arg(&input).arg("--").arg(&result).output().unwrap();
        assert!(o.status.success(), "{block}: {}", String::from_utf8_lossy(&o.stderr));
        let got: Vec<f32> =
            std::fs::read(&result).unwrap().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let got = kiln::Tensor::from_f32(&set.outputs[0].shape, got);
        compare(&got, &set.outputs[0], 1e-4, 1e-5).unwrap_or_else(|e| panic!("{block} from C vs onnxruntime: {e}"));
        // From Rust, without LLVM.
        let model = kiln_runtime::Model::open(&out.join("libmodel.so")).unwrap();
        assert_eq!(model.inputs()[0].shape, set.inputs[0].shape);
        let outs = model.run(&[set.inputs[0].as_f32().unwrap()]).unwrap();
        let got = kiln::Tensor::from_f32(&set.outputs[0].shape, outs[0].clone());
        compare(&got, &set.outputs[0], 1e-4, 1e-5).unwrap_or_else(|e| panic!("{block} from kiln-runtime: {e}"));
        let err = model.run(&[&[1.0, 2.0]]).unwrap_err();
        assert!(err.to_string().contains("floats), got 2"), "{err}");
    }
    // A kernel not lowered to native code (TopK's int64 indices): refused, naming it.
    let topk = data_dir().join("node/test_top_k/model.onnx");
    let o = kiln(&["compile", topk.to_str().unwrap(), "--target", "cpu", "-o", dir.join("topk").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("AOT") && err.contains("TopK"), "{err}");
}
