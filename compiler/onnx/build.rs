//! Generates Rust types for the vendored `onnx.proto` (onnx 1.23.2) with prost.
fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    prost_build::Config::new()
        .compile_protos(&["proto/onnx.proto"], &["proto/"])
        .expect("compiling proto/onnx.proto (is protoc installed? run scripts/setup.sh)");
}
