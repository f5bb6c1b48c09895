//! GPT-2 and Llama transformer blocks as exporters write them (decomposed LayerNorm / RMSNorm,
//! erf-GELU, SwiGLU, rotary embedding, causal masks; scripts/make_transformer_blocks.py), static
//! `[1,128,256]` and with symbolic `["B","S",256]` inputs, on `--target ref`: every data set is
//! compared with onnxruntime's output (rtol 1e-4, atol 1e-5).

use crate::common::data_dir;
use kiln_onnx::testcase::{compare, TestCase};
use std::path::PathBuf;
use std::time::Instant;

/// The blocks, in the order of [`block_paths`].
pub const BLOCKS: [&str; 4] = ["gpt2_block", "llama_block", "gpt2_block_dyn", "llama_block_dyn"];

/// Directory of the generated blocks (`<data>/transformers`); fails with a pointer to setup when
/// they are missing.
pub fn blocks_dir() -> PathBuf {
    let d = data_dir().join("transformers");
    assert!(d.join(".done-v1").exists(), "transformer blocks missing at {}: run `bash scripts/setup.sh`", d.display());
    d
}

/// `model.onnx` of every block, in [`BLOCKS`] order.
pub fn block_paths() -> Vec<PathBuf> {
    let d = blocks_dir();
    BLOCKS.iter().map(|b| d.join(b).join("model.onnx")).collect()
}

fn run_block(name: &str) {
    let case = TestCase::new(&blocks_dir().join(name));
    let t0 = Instant::now();
    let m = kiln::load_model(&case.dir.join("model.onnx")).unwrap_or_else(|e| panic!("{e}"));
    let c = kiln::compile(m, "ref").unwrap_or_else(|e| panic!("{e}"));
    let load = t0.elapsed();
    let sets = case.data_sets().unwrap_or_else(|e| panic!("{e}"));
    assert!(!sets.is_empty(), "{name}: no test data sets");
    for (si, set) in sets.into_iter().enumerate() {
        let shape = set.inputs[0].shape.clone();
        let t1 = Instant::now();
        let got = c.run(set.inputs).unwrap_or_else(|e| panic!("{name}, data set {si}: {e}"));
        println!(
            "{name} set {si} {shape:?}: load {:.2} s, run {:.3} s",
            load.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        assert_eq!(got.len(), set.outputs.len(), "{name}, data set {si}: output count");
        for (i, (g, w)) in got.iter().zip(&set.outputs).enumerate() {
            compare(g, w, 1e-4, 1e-5)
                .unwrap_or_else(|e| panic!("{name}, data set {si}, output {i} vs onnxruntime: {e}"));
        }
    }
}

#[test]
fn gpt2_block() {
    run_block("gpt2_block");
}

#[test]
fn llama_block() {
    run_block("llama_block");
}

#[test]
fn gpt2_block_dyn() {
    run_block("gpt2_block_dyn");
}

#[test]
fn llama_block_dyn() {
    run_block("llama_block_dyn");
}

#[test]
fn block_paths_exist() {
    for p in block_paths() {
        assert!(p.exists(), "{} missing", p.display());
    }
}
