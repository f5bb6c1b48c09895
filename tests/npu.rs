//! The `npu` target (issue #6): CNNs and a transformer block on the simulator of every preset
//! against the reference interpreter, fusion's effect on simulated cycles, and the CLI's
//! simulated figures and errors on bad machine descriptions. (The ONNX node tests on `npu` run
//! in `conformance.rs`.)

use crate::common::*;
use kiln::Tensor;
use kiln_npu::NpuConfig;
use kiln_onnx::testcase::compare;
use kiln_targets::npu::NpuModel;
use kiln_targets::Executable;
use std::path::Path;

const PRESETS: [&str; 3] = ["davinci", "sunway", "mlu"];

/// Compiles `path` for `npu` and runs it on each preset's simulator: the outputs must match the
/// interpreter's on the same fused module. Returns (preset, simulated cycles, host kernels).
fn on_presets(name: &str, path: &Path, inputs: Vec<Tensor>, presets: &[&str]) -> Vec<(String, u64, usize)> {
    let c = kiln::compile(kiln::load_model(path).unwrap(), "npu").unwrap();
    let want = kiln_ir::interp::run(c.module(), inputs.clone()).unwrap();
    let mut rows = Vec::new();
    for p in presets {
        let npu = NpuModel::compile(c.module(), NpuConfig::preset(p).unwrap()).unwrap();
        let got = npu.run(inputs.clone()).unwrap_or_else(|e| panic!("{name} on {p}: {e}"));
        for (g, w) in got.iter().zip(&want) {
            compare(g, w, 1e-3, 1e-4).unwrap_or_else(|e| panic!("{name} on {p}: npu vs interpreter: {e}"));
        }
        let r = npu.sim_report().expect("simulated figures");
        let host = npu.host_kernels().len();
        println!(
            "{name} on {p}: {} kernels on the simulator, {host} on the host; {} cycles = {:.3} ms; matrix {:.0}%, vector {:.0}%, DMA {:.0}%",
            npu.native_kernels(),
            r.cycles,
            r.ms,
            100.0 * r.matrix,
            100.0 * r.vector,
            100.0 * r.dma
        );
        assert!(npu.native_kernels() > 0 && r.cycles > 0, "{name} on {p}: nothing ran on the simulator");
        rows.push((p.to_string(), r.cycles, host));
    }
    rows
}

fn test_input(dir: &Path) -> Vec<Tensor> {
    vec![kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/input_0.pb")).expect("input")]
}

#[test]
fn npu_runs_light_cnns_and_a_transformer_block_on_every_preset() {
    let light = data_dir().join("light-random");
    let squeezenet = light.join("light_squeezenet");
    for (_, _, host) in on_presets("squeezenet", &squeezenet.join("model.onnx"), test_input(&squeezenet), &PRESETS) {
        assert_eq!(host, 0, "squeezenet: every kernel on the simulator");
    }
    let shufflenet = light.join("light_shufflenet");
    on_presets("shufflenet", &shufflenet.join("model.onnx"), test_input(&shufflenet), &PRESETS);
    let block = data_dir().join("transformers/gpt2_block");
    for (_, _, host) in on_presets("gpt2_block", &block.join("model.onnx"), test_input(&block), &PRESETS) {
        assert_eq!(host, 0, "gpt2_block: every kernel on the simulator");
    }
}

/// Memory-bound blocks: fused kernels keep intermediates on chip, so they move a fraction of
/// the global-memory bytes and take at least 2x fewer cycles than one kernel per op.
#[test]
fn npu_fusion_cuts_cycles_of_memory_bound_blocks() {
    let x = || vec![value_info("x", 1, &["128", "768"])];
    let y = || vec![value_info("y", 1, &["128", "768"])];
    let gamma = f32_tensor("g", &[768], &values(768, 3));
    let beta = f32_tensor("b", &[768], &values(768, 4));
    let half = f32_tensor("half", &[], &[0.5]);
    let one = f32_tensor("one", &[], &[1.0]);
    let rsqrt2 = f32_tensor("r", &[], &[std::f32::consts::FRAC_1_SQRT_2]);
    let eps = f32_tensor("eps", &[], &[1e-5]);
    let axes = i64_tensor("axes", &[1], &[-1]);
    // As exporters write them: LayerNorm, Softmax and GELU decomposed into elementwise ops and
    // reductions (one kernel each without fusion).
    let blocks = [
        (
            "layernorm",
            model(
                17,
                vec![
                    node("ReduceMean", "mean", &["x"], &["mu"], vec![attr_ints("axes", &[-1])]),
                    node("Sub", "center", &["x", "mu"], &["d"], vec![]),
                    node("Mul", "square", &["d", "d"], &["d2"], vec![]),
                    node("ReduceMean", "var", &["d2"], &["v"], vec![attr_ints("axes", &[-1])]),
                    node("Add", "eps", &["v", "eps"], &["ve"], vec![]),
                    node("Sqrt", "std", &["ve"], &["sd"], vec![]),
                    node("Div", "norm", &["d", "sd"], &["n"], vec![]),
                    node("Mul", "scale", &["n", "g"], &["s"], vec![]),
                    node("Add", "shift", &["s", "b"], &["y"], vec![]),
                ],
                x(),
                y(),
                vec![gamma, beta, eps],
            ),
        ),
        (
            "softmax",
            model(
                17,
                vec![
                    node("ReduceMax", "max", &["x"], &["m"], vec![attr_ints("axes", &[-1])]),
                    node("Sub", "sub", &["x", "m"], &["d"], vec![]),
                    node("Exp", "exp", &["d"], &["e"], vec![]),
                    node("ReduceSum", "sum", &["e", "axes"], &["s"], vec![]),
                    node("Div", "div", &["e", "s"], &["y"], vec![]),
                ],
                x(),
                y(),
                vec![axes],
            ),
        ),
        (
            "gelu",
            model(
                17,
                vec![
                    node("Mul", "m0", &["x", "r"], &["a"], vec![]),
                    node("Erf", "erf", &["a"], &["e"], vec![]),
                    node("Add", "a1", &["e", "one"], &["p"], vec![]),
                    node("Mul", "m1", &["x", "p"], &["q"], vec![]),
                    node("Mul", "m2", &["q", "half"], &["y"], vec![]),
                ],
                x(),
                y(),
                vec![half, one, rsqrt2],
            ),
        ),
    ];
    let input = vec![Tensor::from_f32(&[128, 768], values(128 * 768, 9))];
    println!("| block | preset | fused cycles | unfused cycles | ratio |");
    for (name, proto) in blocks {
        let dir = temp_dir(&format!("npu-fusion-{name}"));
        let path = save(&dir, "m.onnx", &proto);
        for p in PRESETS {
            let cycles = |fusion: bool| {
                let opts = kiln::Options { fusion, ..Default::default() };
                let c = kiln::compile_with(kiln::load_model(&path).unwrap(), "npu", &opts).unwrap();
                let npu = NpuModel::compile(c.module(), NpuConfig::preset(p).unwrap()).unwrap();
                let got = npu.run(input.clone()).unwrap();
                let want = kiln_ir::interp::run(c.module(), input.clone()).unwrap();
                compare(&got[0], &want[0], 1e-3, 1e-5).unwrap_or_else(|e| panic!("{name} on {p}: {e}"));
                npu.sim_report().unwrap().cycles
            };
            let (fused, unfused) = (cycles(true), cycles(false));
            println!("| {name} | {p} | {fused} | {unfused} | {:.1}x |", unfused as f64 / fused as f64);
            assert!(unfused >= 2 * fused, "{name} on {p}: fusion should halve the cycles ({fused} vs {unfused})");
        }
    }
}

#[test]
fn npu_cli_reports_simulated_figures_and_rejects_bad_descriptions() {
    let dir = temp_dir("npu-cli");
    let path = save(
        &dir,
        "m.onnx",
        &model(
            17,
            vec![node("Relu", "r", &["x"], &["y"], vec![])],
            vec![value_info("x", 1, &["4", "32"])],
            vec![value_info("y", 1, &["4", "32"])],
            vec![],
        ),
    );
    let p = path.to_str().unwrap();
    for preset in PRESETS {
        let o = kiln(&["bench", p, "--target", "npu", "--npu-preset", preset, "--iters", "1", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
        assert!(j["sim_cycles"].as_u64().unwrap() > 0, "{j}");
        assert!(j["sim_ms"].as_f64().unwrap() > 0.0, "{j}");
        for unit in ["matrix", "vector", "dma"] {
            assert!(j["units"][unit].is_number(), "{j}");
        }
    }
    // NPU assembly.
    let o = kiln(&["compile", p, "--target", "npu", "--emit", "asm"]);
    let asm = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && asm.contains(".kernel k0_relu"), "{asm}");
    // An unknown preset is a bad command line; a bad description file is bad input, named.
    let o = kiln(&["bench", p, "--target", "npu", "--npu-preset", "tpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("tpu"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&NpuConfig::preset("davinci").unwrap()).unwrap()).unwrap();
    cfg["levels"][1]["capacity_bytes"] = 0.into();
    let bad = dir.join("zero.json");
    std::fs::write(&bad, cfg.to_string()).unwrap();
    let o = kiln(&["run", p, "--target", "npu", "--npu-config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("zero.json") && err.contains("capacity"), "{err}");
}
