//! kiln's integration tests: one binary (each test binary links LLVM/MLIR statically).
//!
//! Data comes from `scripts/setup.sh` (ONNX node tests, the `light` CNNs and their
//! randomized-weight copies with onnxruntime outputs, GPT-2 / Llama transformer blocks) under
//! `target/onnx-data`, or `$KILN_ONNX_DATA`. Tests that need it fail with a pointer to setup
//! when it is missing: a missing data set is never a pass.

mod aot;
mod api;
mod cli;
mod common;
mod conformance;
mod fusion;
mod fuzz;
mod gpu;
mod ir_text;
mod jit;
mod light;
mod native;
mod npu;
mod rvv;
mod transformers;
mod tune;
