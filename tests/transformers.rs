//! GPT-2 and Llama transformer blocks as exporters write them (decomposed LayerNorm / RMSNorm,
//! erf-GELU, SwiGLU, rotary embedding, causal masks; scripts/make_transformer_blocks.py), static
//! `[1,128,256]` and with symbolic `["B","S",256]` inputs, on `--target ref`: every data set is
//! compared with onnxruntime's output (rtol 1e-4, atol 1e-5), fused (the default) and with
//! `--no-fusion`, and fused against unfused (rtol 1e-4, atol 1e-5, CLI.md); and on `--target
//! cpu`, compiled once per block: the symbolic blocks run their three data sets, (B, S) =
//! (1, 16), (2, 64), (1, 128), from that one compilation. The fusion figures
//! (`kiln inspect`) must show fewer than one kernel per four graph ops and, for the static
//! blocks, at least halved bytes moved.

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
    let unfused = kiln::compile_with(m.clone(), "ref", &kiln::Options { fusion: false, ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    let c = kiln::compile(m.clone(), "ref").unwrap_or_else(|e| panic!("{e}"));
    // The cpu target, compiled once: symbolic blocks then run every (B, S) of their data sets.
    let cpu = kiln::compile(m, "cpu").unwrap_or_else(|e| panic!("{e}"));
    let host: Vec<String> =
        cpu.host_kernels().unwrap().into_iter().map(|h| format!("{} ({})", h.name, h.why)).collect();
    println!("{name} on cpu: {} native kernels, {} on the host: {host:?}", cpu.native_kernels().unwrap(), host.len());
    let load = t0.elapsed();
    let fused_ops = c.module().body.ops.iter().filter(|&&o| c.module().op(o).name == "graph.fused").count();
    assert!(fused_ops > 0, "{name}: nothing was fused");
    assert!(!unfused.module().body.ops.iter().any(|&o| unfused.module().op(o).name == "graph.fused"));
    let sets = case.data_sets().unwrap_or_else(|e| panic!("{e}"));
    assert!(!sets.is_empty(), "{name}: no test data sets");
    for (si, set) in sets.into_iter().enumerate() {
        let shape = set.inputs[0].shape.clone();
        let t1 = Instant::now();
        let plain = unfused.run(set.inputs.clone()).unwrap_or_else(|e| panic!("{name}, data set {si}, unfused: {e}"));
        let native = cpu.run(set.inputs.clone()).unwrap_or_else(|e| panic!("{name}, data set {si}, cpu: {e}"));
        let got = c.run(set.inputs).unwrap_or_else(|e| panic!("{name}, data set {si}: {e}"));
        println!(
            "{name} set {si} {shape:?}: load {:.2} s, run {:.3} s",
            load.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        assert_eq!(got.len(), set.outputs.len(), "{name}, data set {si}: output count");
        for (i, (n, w)) in native.iter().zip(&set.outputs).enumerate() {
            compare(n, w, 1e-4, 1e-5)
                .unwrap_or_else(|e| panic!("{name}, data set {si} {shape:?}, output {i} on cpu vs onnxruntime: {e}"));
        }
        for (i, ((g, p), w)) in got.iter().zip(&plain).zip(&set.outputs).enumerate() {
            compare(g, w, 1e-4, 1e-5)
                .unwrap_or_else(|e| panic!("{name}, data set {si}, output {i} vs onnxruntime: {e}"));
            compare(p, w, 1e-4, 1e-5)
                .unwrap_or_else(|e| panic!("{name}, data set {si}, output {i} unfused vs onnxruntime: {e}"));
            compare(g, p, 1e-4, 1e-5)
                .unwrap_or_else(|e| panic!("{name}, data set {si}, output {i} fused vs unfused: {e}"));
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

/// Fusion figures of every block on the `cpu` description (symbolic dims count 1 in bytes, so
/// only the static blocks are held to the bytes figure).
#[test]
fn fusion_figures() {
    for (name, path) in BLOCKS.iter().zip(block_paths()) {
        let r = kiln::inspect::inspect(&path, "cpu").unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{name}: {} graph ops -> {} kernels ({:.1} ops/kernel), bytes moved {} -> {} ({:.2}x), fusion {:.1} ms, kernels {:?}",
            r.graph_ops,
            r.kernels,
            r.graph_ops as f64 / r.kernels as f64,
            r.bytes_moved_before,
            r.bytes_moved_after,
            r.bytes_moved_before as f64 / r.bytes_moved_after as f64,
            r.fusion_ms,
            r.kernels_by_kind
        );
        // (The merged Q/K/V projection's slices and bias adds are kernels of their own: a
        // contraction's epilogue keeps its shape, which keeps the projection on the fast
        // accumulate-into-output path.)
        assert!(r.kernels * 4 < r.graph_ops, "{name}: {} kernels for {} graph ops", r.kernels, r.graph_ops);
        assert_eq!(r.kernels_by_kind.get("fused:attention"), Some(&1), "{name}: attention is one kernel");
        // Symbolic dims count 1 unless bound (`--dim`); bound at the static blocks' sizes, the
        // symbolic blocks get the same plan and figures.
        let r = if name.ends_with("_dyn") {
            let bound = kiln::Options { dims: vec![("B".into(), 1), ("S".into(), 128)], ..Default::default() };
            let b = kiln::inspect::inspect_with(&path, "cpu", &bound).unwrap();
            println!(
                "{name} with B=1, S=128: {} kernels, bytes moved {} -> {} ({:.2}x)",
                b.kernels,
                b.bytes_moved_before,
                b.bytes_moved_after,
                b.bytes_moved_before as f64 / b.bytes_moved_after as f64
            );
            assert!(b.kernels * 5 < b.graph_ops, "{name}: {} kernels for {} graph ops", b.kernels, b.graph_ops);
            assert_eq!(b.kernels_by_kind.get("fused:attention"), Some(&1), "{name}: attention is one kernel");
            b
        } else {
            r
        };
        assert!(
            r.bytes_moved_after * 2 <= r.bytes_moved_before,
            "{name}: bytes moved {} -> {}",
            r.bytes_moved_before,
            r.bytes_moved_after
        );
        let off =
            kiln::inspect::inspect_with(&path, "cpu", &kiln::Options { fusion: false, ..Default::default() }).unwrap();
        assert_eq!(off.kernels, off.graph_ops, "{name}: --no-fusion runs every graph op as a kernel");
    }
}
