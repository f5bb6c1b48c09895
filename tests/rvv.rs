//! The `rvv` target: riscv64 vector code from the same MLIR/LLVM path as `cpu`, its kernels
//! linked into one static riscv64 runner executed under `qemu-riscv64` (scripts/setup.sh
//! installs qemu-user and the riscv64 cross gcc).
//!
//! - The ONNX node tests on `rvv`: every case that passes on `cpu`
//!   (`tests/expectations/node_cpu.txt`) must pass, and a subset covering every op family
//!   ([`NODE_CASES`]) must run native riscv64 kernels.
//! - Two `light` CNNs (SqueezeNet, ShuffleNet) with randomized weights match onnxruntime.
//! - `kiln compile --target rvv --emit asm` shows RVV instructions (an insta snapshot of the
//!   vector instructions of a small MatMul + Softmax) and `--emit llvm` the riscv64 triple.
//! - `kiln run --target rvv` at VLEN 128 and 256 matches `--target ref` on the GPT-2 block;
//!   bad options and missing tools are clear errors.
//! - `kiln compile --target rvv -o DIR` (AOT): the GPT-2 block as a riscv64 shared library,
//!   run by the cross-compiled C example under qemu, matches onnxruntime.
//!
//! Budget (2 cores, measured): node tests ~50 s, the two CNNs ~25 s, the CLI ~15 s. Wall times
//! under qemu are the emulator's (the vector unit is emulated in software), not a chip's.

use crate::common::*;
use kiln::Tensor;
use kiln_onnx::testcase::{compare, list_cases, run_case_on, CaseRun, TestCase};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// ONNX node tests that must pass on `rvv` running riscv64 kernels, by op family (views and
/// shape ops such as Reshape, Slice or Gather run on the host: no kernel of theirs is here;
/// the node tests' LayerNorm has extra outputs that keep it on the host, so the GPT-2 block
/// below covers it).
const NODE_CASES: &[&str] = &[
    // Elementwise: arithmetic with broadcasting, activations, math functions, selection.
    "test_add",
    "test_add_bcast",
    "test_sub_bcast",
    "test_mul_bcast",
    "test_div_bcast",
    "test_pow_bcast_array",
    "test_max_example",
    "test_min_example",
    "test_sum_example",
    "test_mean_example",
    "test_relu",
    "test_sigmoid",
    "test_tanh",
    "test_exp",
    "test_log",
    "test_sqrt",
    "test_abs",
    "test_neg",
    "test_reciprocal",
    "test_floor",
    "test_ceil",
    "test_erf",
    "test_gelu_default_2",
    "test_elu",
    "test_selu",
    "test_celu",
    "test_leakyrelu",
    "test_hardsigmoid",
    "test_hardswish",
    "test_softplus",
    "test_softsign",
    "test_mish",
    "test_swish",
    "test_prelu_broadcast",
    "test_clip_default_min",
    "test_where_example",
    // Reductions.
    "test_reduce_max_default_axes_keepdims_random",
    "test_reduce_min_default_axes_keepdims_random",
    "test_lppool_2d_default",
    "test_lrn",
    // Softmax and normalization.
    "test_softmax_example",
    "test_softmax_axis_2",
    "test_softmax_negative_axis",
    "test_softmax_large_number",
    "test_logsoftmax_axis_2",
    "test_logsoftmax_large_number",
    "test_rms_normalization_2d_axis_negative_1",
    "test_rms_normalization_3d_axis_negative_1_epsilon",
    "test_rms_normalization_4d_axis_negative_2",
    "test_batchnorm_example",
    "test_batchnorm_epsilon",
    "test_instancenorm_example",
    // MatMul and Gemm.
    "test_matmul_2d",
    "test_matmul_3d",
    "test_matmul_4d",
    "test_matmul_bcast",
    "test_gemm_default_no_bias",
    "test_gemm_all_attributes",
    "test_gemm_transposeA",
    "test_gemm_transposeB",
    "test_gemm_beta",
    // Convolution.
    "test_basic_conv_with_padding",
    "test_conv_with_strides_padding",
    "test_conv_with_strides_no_padding",
    "test_conv_with_autopad_same",
    "test_conv_with_strides_and_asymmetric_padding",
    // Pooling.
    "test_maxpool_2d_default",
    "test_maxpool_2d_pads",
    "test_maxpool_2d_strides",
    "test_maxpool_2d_same_upper",
    "test_maxpool_3d_default",
    "test_averagepool_2d_default",
    "test_averagepool_2d_pads_count_include_pad",
    "test_averagepool_2d_strides",
    "test_globalaveragepool",
    "test_globalmaxpool",
    // Attention (a boolean mask is an i8 buffer).
    "test_attention_4d",
    "test_attention_4d_causal",
    "test_attention_4d_scaled",
    "test_attention_4d_attn_mask",
    "test_attention_4d_attn_mask_bool",
    "test_attention_4d_gqa",
    "test_attention_4d_gqa_causal",
    "test_attention_4d_diff_heads_sizes",
    // Data movement.
    "test_transpose_default",
    "test_transpose_all_permutations_3",
    "test_concat_2d_axis_0",
    "test_concat_3d_axis_1",
    "test_spacetodepth_example_expanded",
    "test_depthtospace_example_expanded",
];

thread_local! {
    /// Native kernels of the case this thread compiled last.
    static NATIVE: Cell<usize> = const { Cell::new(0) };
}

/// The case compiled for rvv, as `kiln run --target rvv` does.
fn compile_for_rvv(m: kiln::Module) -> Result<CaseRun, String> {
    let c = kiln::compile(m, "rvv").map_err(|e| e.to_string())?;
    NATIVE.with(|n| n.set(c.native_kernels().unwrap_or(0)));
    Ok(Box::new(move |inputs| c.run(inputs).map_err(|e| e.to_string())))
}

/// Runs one case on rvv: whether it passed, and how many kernels ran as riscv64 code.
fn run_one(case: &TestCase) -> (Result<(), String>, usize) {
    NATIVE.with(|n| n.set(0));
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| run_case_on(case, &compile_for_rvv))).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(format!("PANIC: {}", msg.unwrap_or_default()))
    });
    (r, NATIVE.with(Cell::get))
}

#[test]
fn onnx_node_tests_on_rvv() {
    let cases = list_cases(&data_dir().join("node"));
    for name in NODE_CASES {
        assert!(cases.iter().any(|c| c.name == *name), "node test case {name} not found");
    }
    let t0 = Instant::now();
    // Two workers (the CI machine has 2 cores); each case starts its own qemu process.
    let results: Vec<(String, (Result<(), String>, usize))> = std::thread::scope(|s| {
        let chunks: Vec<&[TestCase]> = cases.chunks(cases.len().div_ceil(2)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| s.spawn(move || chunk.iter().map(|c| (c.name.clone(), run_one(c))).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("worker")).collect()
    });
    let passed = results.iter().filter(|(_, (r, _))| r.is_ok()).count();
    let native = results.iter().filter(|(_, (r, n))| r.is_ok() && *n > 0).count();
    println!(
        "ONNX node tests on rvv: {passed}/{} passed ({:.1}%) in {:.1} s; {native} of them ran riscv64 kernels",
        results.len(),
        100.0 * passed as f64 / results.len() as f64,
        t0.elapsed().as_secs_f64()
    );
    let listing: String = results
        .iter()
        .map(|(n, (r, native))| format!("{} {n} {native}\n", if r.is_ok() { "pass" } else { "fail" }))
        .collect();
    let list = std::env::temp_dir().join(format!("kiln-node-rvv-{}.txt", std::process::id()));
    if std::fs::write(&list, listing).is_ok() {
        println!("per case (pass/fail, name, riscv64 kernels): {}", list.display());
    }
    let on_cpu =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/expectations/node_cpu.txt"))
            .expect("tests/expectations/node_cpu.txt");
    let cpu: BTreeMap<&str, bool> =
        on_cpu.lines().filter_map(|l| l.split_once(' ')).map(|(s, n)| (n, s == "pass")).collect();
    let by_name: BTreeMap<&str, &(Result<(), String>, usize)> = results.iter().map(|(n, r)| (n.as_str(), r)).collect();
    let mut wrong = Vec::new();
    for (name, (r, _)) in &by_name {
        match (cpu.get(name), r) {
            (Some(true), Err(e)) => wrong.push(format!("{name}: passes on cpu, fails on rvv: {e}")),
            (Some(false) | None, Ok(())) => println!("{name}: passes on rvv, not on cpu"),
            _ => {}
        }
    }
    for name in NODE_CASES {
        match by_name.get(name) {
            Some((Ok(()), 0)) => wrong.push(format!("{name}: ran no kernel as riscv64 code")),
            Some((Err(e), _)) if cpu.get(name) != Some(&true) => wrong.push(format!("{name}: {e}")),
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "{} problem(s) on rvv:\n{}", wrong.len(), wrong.join("\n"));
}

/// A randomized-weight `light` CNN on rvv against onnxruntime's output (atol 1e-5 times the
/// output's largest magnitude, as on cpu: f32 summation orders differ); every kernel must run
/// as riscv64 code.
fn light_on_rvv(name: &str) {
    let dir = data_dir().join("light-random").join(name);
    let input = kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/input_0.pb")).expect("input");
    let want = kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/output_0.pb")).expect("onnxruntime output");
    let t0 = Instant::now();
    let m = kiln::load_model(&dir.join("model.onnx")).unwrap_or_else(|e| panic!("{e}"));
    let c = kiln::compile(m, "rvv").unwrap_or_else(|e| panic!("{e}"));
    c.prepare().unwrap_or_else(|e| panic!("{e}"));
    let compiled = t0.elapsed();
    let host = c.host_kernels().unwrap();
    assert!(host.is_empty(), "{name}: kernels on the host on rvv: {host:?}");
    let t1 = Instant::now();
    let out = c.run(vec![input]).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{name} on rvv: {} riscv64 kernels; load+compile+link {:.2} s, run under qemu {:.2} s",
        c.native_kernels().unwrap(),
        compiled.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    let scale = want.to_f64().iter().fold(1.0f64, |m, x| m.max(x.abs()));
    compare(&out[0], &want, 1e-3, 1e-5 * scale).unwrap_or_else(|e| panic!("{name} on rvv vs onnxruntime: {e}"));
}

#[test]
fn light_squeezenet_on_rvv() {
    light_on_rvv("light_squeezenet");
}

#[test]
fn light_shufflenet_on_rvv() {
    light_on_rvv("light_shufflenet");
}

/// `y = Softmax(x · W)`, x: [8, 64]: a MatMul kernel (register tiles of FMAs) and a row
/// reduction kernel.
fn matmul_softmax(dir: &Path) -> PathBuf {
    let w = values(64 * 64, 7);
    save(
        dir,
        "matmul_softmax.onnx",
        &model(
            17,
            vec![
                node("MatMul", "mm", &["x", "W"], &["h"], vec![]),
                node("Softmax", "sm", &["h"], &["y"], vec![attr_int("axis", -1)]),
            ],
            vec![value_info("x", 1, &["8", "64"])],
            vec![value_info("y", 1, &["8", "64"])],
            vec![f32_tensor("W", &[64, 64], &w)],
        ),
    )
}

/// The vector instructions of each function in RISC-V assembly: the distinct mnemonics, and
/// the element width and register grouping `vsetvli`/`vsetivli` select (registers and
/// scheduling are left out: they move with any change to LLVM or the emitter).
fn vector_summary(asm: &str) -> String {
    let mut out = String::new();
    let mut current: Option<(String, std::collections::BTreeSet<String>)> = None;
    let flush = |f: &mut Option<(String, std::collections::BTreeSet<String>)>, out: &mut String| {
        if let Some((name, set)) = f.take() {
            if !set.is_empty() {
                out.push_str(&format!("{name}:\n  {}\n", set.into_iter().collect::<Vec<_>>().join("\n  ")));
            }
        }
    };
    for line in asm.lines() {
        if !line.starts_with(['\t', ' ', '.', '#']) && line.ends_with(':') {
            flush(&mut current, &mut out);
            // Kernels only: the C-interface and packed wrappers just copy descriptors.
            let name = line.trim_end_matches(':');
            if !name.starts_with("_mlir") {
                current = Some((name.to_string(), Default::default()));
            }
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(op) = words.next() else { continue };
        let Some((_, set)) = current.as_mut() else { continue };
        if op.starts_with("vset") {
            // `vsetvli rd, avl, e32, m2, ta, ma`: keep the vector type (element width, LMUL,
            // tail and mask policies).
            let fields: Vec<&str> = line.split(',').map(str::trim).skip(2).collect();
            set.insert(format!("{op} {}", fields.join(", ")));
        } else if op.starts_with('v') && op.len() > 1 {
            set.insert(op.to_string());
        }
    }
    flush(&mut current, &mut out);
    out
}

#[test]
fn compile_emits_riscv_vector_assembly() {
    let dir = temp_dir("rvv-asm");
    let p = matmul_softmax(&dir);
    let o = kiln(&["compile", p.to_str().unwrap(), "--target", "rvv", "--emit", "asm"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let asm = String::from_utf8_lossy(&o.stdout);
    for needle in ["vsetvli", "vle32.v", "vse32.v", "vfmacc.vf"] {
        assert!(asm.contains(needle), "no {needle} in the rvv assembly:\n{asm}");
    }
    insta::assert_snapshot!("matmul_softmax_vector_instructions", vector_summary(&asm));
    // At VLEN 512 LLVM uses half the register grouping for the same fixed-width tiles.
    let o = kiln(&["compile", p.to_str().unwrap(), "--target", "rvv", "--rvv-vlen", "512", "--emit", "asm"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(vector_summary(&String::from_utf8_lossy(&o.stdout)), vector_summary(&asm));
    let o = kiln(&["compile", p.to_str().unwrap(), "--target", "rvv", "--emit", "llvm"]);
    let ir = String::from_utf8_lossy(&o.stdout);
    assert!(ir.contains("target triple = \"riscv64-unknown-linux-gnu\"") && ir.contains("+zvl256b"), "{ir}");
}

/// The GPT-2 block's output on `--target ref` and on rvv at `vlen`.
fn gpt2_on(target: &str, vlen: Option<&str>, out: &Path) -> Tensor {
    let case = data_dir().join("transformers/gpt2_block");
    let (m, x) = (case.join("model.onnx"), case.join("test_data_set_0/input_0.pb"));
    let mut args = vec!["run", m.to_str().unwrap(), "--target", target, "--input", x.to_str().unwrap()];
    args.extend(["--output-dir", out.to_str().unwrap()]);
    if let Some(v) = vlen {
        args.extend(["--rvv-vlen", v]);
    }
    let o = kiln(&args);
    assert!(o.status.success(), "kiln {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    kiln_onnx::read_tensor_file(&out.join("output_0.pb")).expect("output_0.pb")
}

#[test]
fn cli_runs_on_rvv_at_vlen_128_and_256_as_on_ref() {
    let dir = temp_dir("rvv-cli");
    let want = gpt2_on("ref", None, &dir.join("ref"));
    for vlen in ["128", "256"] {
        let got = gpt2_on("rvv", Some(vlen), &dir.join(vlen));
        compare(&got, &want, 1e-4, 1e-5).unwrap_or_else(|e| panic!("rvv at VLEN {vlen} vs ref: {e}"));
    }
}

/// `kiln compile --target rvv -o DIR`: a riscv64 shared library of the GPT-2 block, loaded by
/// the C example (`targets/aot/run_model.c`, cross-compiled) under qemu with the riscv64 libc,
/// matches onnxruntime.
#[test]
fn aot_library_for_rvv_runs_under_qemu() {
    let dir = temp_dir("rvv-aot");
    let case = TestCase::new(&data_dir().join("transformers/gpt2_block"));
    let out = dir.join("gpt2");
    let o = kiln(&[
        "compile",
        case.dir.join("model.onnx").to_str().unwrap(),
        "--target",
        "rvv",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let header = std::fs::read_to_string(out.join("model.h")).unwrap();
    assert!(header.contains("target rvv"), "{header}");
    let example = dir.join("run_model");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/aot/run_model.c");
    let o = std::process::Command::new("riscv64-linux-gnu-gcc")
        .arg("-O2")
        .arg(&src)
        .arg("-o")
        .arg(&example)
        .arg("-ldl")
        .output()
        .expect("riscv64-linux-gnu-gcc (scripts/setup.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let set = case.data_sets().unwrap().remove(0);
    let (input, result) = (dir.join("in0.bin"), dir.join("out0.bin"));
    let bytes: Vec<u8> = set.inputs[0].as_f32().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&input, bytes).unwrap();
    let o = std::process::Command::new("qemu-riscv64")
        .args(["-L", "/usr/riscv64-linux-gnu", "-cpu", "rv64,v=true,vlen=256,vext_spec=v1.0"])
        .arg(&example)
        .arg(out.join("libmodel.so"))
        .arg(&input)
        .arg("--")
        .arg(&result)
        .output()
        .expect("qemu-riscv64 (scripts/setup.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Vec<f32> =
        std::fs::read(&result).unwrap().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let got = Tensor::from_f32(&set.outputs[0].shape, got);
    compare(&got, &set.outputs[0], 1e-4, 1e-5).unwrap_or_else(|e| panic!("rvv AOT library vs onnxruntime: {e}"));
}

/// Runs kiln expecting exit `code` and an error on stderr with every needle.
fn fails_with(args: &[&str], env: &[(&str, &str)], code: i32, needles: &[&str]) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("run kiln");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "kiln {args:?}: {err}");
    assert!(!err.contains("panicked") && err.starts_with("error: "), "kiln {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr of kiln {args:?} lacks {n:?}: {err}");
    }
}

#[test]
fn rvv_errors_are_clear() {
    let case = data_dir().join("node/test_relu");
    let (m, x) = (case.join("model.onnx"), case.join("test_data_set_0/input_0.pb"));
    let (m, x) = (m.to_str().unwrap(), x.to_str().unwrap());
    let out = temp_dir("rvv-errors");
    let run = ["run", m, "--target", "rvv", "--input", x, "--output-dir", out.to_str().unwrap()];
    fails_with(&[&run[..], &["--rvv-vlen", "100"]].concat(), &[], 2, &["--rvv-vlen", "100", "power of two"]);
    fails_with(&["run", m, "--target", "cpu", "--rvv-vlen", "128", "--input", x], &[], 2, &["--rvv-vlen", "rvv"]);
    fails_with(&run, &[("KILN_QEMU_RISCV64", "/nonexistent/qemu-riscv64")], 1, &["qemu-riscv64", "not found"]);
    fails_with(&run, &[("KILN_RISCV64_CC", "/nonexistent/riscv64-gcc")], 1, &["riscv64-gcc", "not found"]);
    // An emulator that exits at once: the runner's hello never comes.
    fails_with(&run, &[("KILN_QEMU_RISCV64", "false")], 1, &["false", "did not start", "exit status: 1"]);
    fails_with(&["compile", m, "--target", "ref", "--emit", "asm"], &[], 2, &["--emit asm", "ref target does not"]);
}
