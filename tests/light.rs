//! The 9 `light` CNNs from the onnx package on `--target ref` and on `--target cpu` (where every
//! kernel must run as native code, none on the host's reference):
//! - as shipped (constant-filled weights): all-ones input, compared with the shipped output
//!   (rtol 1e-3, atol 1e-5; CLI.md);
//! - with seeded random weights (scripts/make_light_random.py): compared with onnxruntime's
//!   output for a seeded random input (rtol 1e-3, atol 1e-5; on cpu atol 1e-5 times the
//!   output's largest magnitude, as f32 summation orders differ).

use crate::common::data_dir;
use kiln::Tensor;
use kiln_onnx::testcase::compare;
use std::time::Instant;

/// The model's outputs on `ref` and on `cpu`.
fn run_model(path: &std::path::Path, input: Tensor) -> [Vec<Tensor>; 2] {
    ["ref", "cpu"].map(|target| {
        let t0 = Instant::now();
        let m = kiln::load_model(path).unwrap_or_else(|e| panic!("{e}"));
        let c = kiln::compile(m, target).unwrap_or_else(|e| panic!("{e}"));
        c.prepare().unwrap_or_else(|e| panic!("{e}"));
        let load = t0.elapsed();
        if target == "cpu" {
            let host = c.host_kernels().unwrap();
            assert!(host.is_empty(), "{}: kernels on the host on cpu: {host:?}", path.display());
        }
        let t1 = Instant::now();
        let out = c.run(vec![input.clone()]).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{} on {target}: load+compile {:.2} s, run {:.3} s",
            path.display(),
            load.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        out
    })
}

fn shipped(name: &str) {
    let dir = data_dir().join("light");
    let path = dir.join(format!("{name}.onnx"));
    let m = kiln::load_model(&path).unwrap_or_else(|e| panic!("{e}"));
    let ty = m.value(m.inputs()[0]).ty.clone();
    let shape = ty.static_shape().expect("light models have static inputs");
    let ones = Tensor::from_f32(&shape, vec![1.0; shape.iter().product()]);
    let want = kiln_onnx::read_tensor_file(&dir.join(format!("{name}_output_0.pb"))).expect("shipped output");
    for (out, target) in run_model(&path, ones).iter().zip(["ref", "cpu"]) {
        compare(&out[0], &want, 1e-3, 1e-5).unwrap_or_else(|e| panic!("{name} on {target}: {e}"));
    }
}

fn randomized(name: &str) {
    let dir = data_dir().join("light-random").join(name);
    let input = kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/input_0.pb")).expect("input");
    let want = kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/output_0.pb")).expect("onnxruntime output");
    // Native f32 kernels sum in another order than onnxruntime's: an element near zero in an
    // output of magnitude M is compared with atol 1e-5·M (M = 13 for vgg19's logits).
    let scale = want.to_f64().iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (out, target) in run_model(&dir.join("model.onnx"), input).iter().zip(["ref", "cpu"]) {
        let atol = if target == "ref" { 1e-5 } else { 1e-5 * scale };
        compare(&out[0], &want, 1e-3, atol).unwrap_or_else(|e| panic!("{name} on {target} vs onnxruntime: {e}"));
    }
}

macro_rules! light_tests {
    ($($name:ident),*) => {
        mod shipped {
            $(#[test] fn $name() { super::shipped(concat!("light_", stringify!($name))); })*
        }
        mod randomized_vs_onnxruntime {
            $(#[test] fn $name() { super::randomized(concat!("light_", stringify!($name))); })*
        }
    };
}

light_tests!(bvlc_alexnet, densenet121, inception_v1, inception_v2, resnet50, shufflenet, squeezenet, vgg19, zfnet512);
