//! The 9 `light` CNNs from the onnx package on `--target ref`:
//! - as shipped (constant-filled weights): all-ones input, compared with the shipped output
//!   (rtol 1e-3, atol 1e-5; CLI.md);
//! - with seeded random weights (scripts/make_light_random.py): compared with onnxruntime's
//!   output for a seeded random input (rtol 1e-3, atol 1e-5).

use crate::common::data_dir;
use kiln::Tensor;
use kiln_onnx::testcase::compare;
use std::time::Instant;

fn run_model(path: &std::path::Path, input: Tensor) -> Vec<Tensor> {
    let t0 = Instant::now();
    let m = kiln::load_model(path).unwrap_or_else(|e| panic!("{e}"));
    let c = kiln::compile(m, "ref").unwrap_or_else(|e| panic!("{e}"));
    let load = t0.elapsed();
    let t1 = Instant::now();
    let out = c.run(vec![input]).unwrap_or_else(|e| panic!("{e}"));
    println!("{}: load {:.2} s, run {:.2} s", path.display(), load.as_secs_f64(), t1.elapsed().as_secs_f64());
    out
}

fn shipped(name: &str) {
    let dir = data_dir().join("light");
    let path = dir.join(format!("{name}.onnx"));
    let m = kiln::load_model(&path).unwrap_or_else(|e| panic!("{e}"));
    let ty = m.value(m.inputs()[0]).ty.clone();
    let shape = ty.static_shape().expect("light models have static inputs");
    let ones = Tensor::from_f32(&shape, vec![1.0; shape.iter().product()]);
    let out = run_model(&path, ones);
    let want = kiln_onnx::read_tensor_file(&dir.join(format!("{name}_output_0.pb"))).expect("shipped output");
    compare(&out[0], &want, 1e-3, 1e-5).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn randomized(name: &str) {
    let dir = data_dir().join("light-random").join(name);
    let input = kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/input_0.pb")).expect("input");
    let want = kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/output_0.pb")).expect("onnxruntime output");
    let out = run_model(&dir.join("model.onnx"), input);
    compare(&out[0], &want, 1e-3, 1e-5).unwrap_or_else(|e| panic!("{name} vs onnxruntime: {e}"));
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
