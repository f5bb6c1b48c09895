//! GPU targets (`cuda`, `rocm`): PTX and AMDGCN emitted from the kernel dialect for every chip,
//! verified by LLVM; snapshots of LayerNorm, Softmax, GEMM and attention; manifests against
//! the models; PTX assembled by NVIDIA's `ptxas` (from `scripts/setup.sh`); and the launch
//! contract (grid, bounds check, argument order) checked by running each kernel's threads on
//! the host against the reference interpreter.
//!
//! Whole-model plans (`plan.json`) run on the emulated GPU (`gpu_plan::EmulatedGpu`) and through
//! `kiln-gpu-run`. Nothing here runs on a GPU unless a CUDA driver is present: those parts print
//! `NOT RUN` otherwise.

use crate::common::*;
use kiln::{Attr, DType, Dim, GraphBuilder, Module, Tensor, TensorType};
use kiln_runtime::gpu::Executor;
use kiln_runtime::npy::{self, Array};
use kiln_targets::gpu::{self, Family, GpuArch, GpuProgram};
use kiln_targets::gpu_plan::EmulatedGpu;
use kiln_targets::gpu_rows;
use kiln_targets::gpu_tile;
use kiln_targets::native::{HostBlocks, NativeKernel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

fn f32s(shape: &[usize], seed: u32) -> Tensor {
    let n = shape.iter().product::<usize>();
    Tensor::from_f32(shape, (0..n).map(|i| ((i as u32 * 7919 + seed) % 97) as f32 / 48.5 - 1.0).collect())
}

fn f32_type(dims: &[u64]) -> TensorType {
    TensorType::new(DType::F32, dims.iter().map(|&d| Dim::Known(d)).collect())
}

fn layernorm() -> Module {
    let mut g = GraphBuilder::new("layernorm");
    let x = g.input("x", f32_type(&[64, 256])).unwrap();
    let scale = g.constant("scale", f32s(&[256], 1));
    let bias = g.constant("bias", f32s(&[256], 2));
    let y = g.op_with("LayerNormalization", &[x, scale, bias], [("axis", Attr::Int(-1))]).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

fn softmax() -> Module {
    let mut g = GraphBuilder::new("softmax");
    let x = g.input("x", f32_type(&[64, 256])).unwrap();
    let y = g.op_with("Softmax", &[x], [("axis", Attr::Int(-1))]).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

fn gemm() -> Module {
    let mut g = GraphBuilder::new("gemm");
    let x = g.input("x", f32_type(&[128, 96])).unwrap();
    let w = g.constant("w", f32s(&[96, 80], 3));
    let b = g.constant("b", f32s(&[80], 4));
    let y = g.op("Gemm", &[x, w, b]).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

fn attention() -> Module {
    let mut g = GraphBuilder::new("attention").opset(23).unwrap();
    let q = g.input("q", f32_type(&[1, 4, 64, 32])).unwrap();
    let k = g.input("k", f32_type(&[1, 4, 64, 32])).unwrap();
    let v = g.input("v", f32_type(&[1, 4, 64, 32])).unwrap();
    let y = g.op_with("Attention", &[q, k, v], [("is_causal", Attr::Int(1))]).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

/// The snapshot models, with inputs for them.
fn models() -> Vec<(&'static str, Module, Vec<Tensor>)> {
    vec![
        ("layernorm", layernorm(), vec![f32s(&[64, 256], 5)]),
        ("softmax", softmax(), vec![f32s(&[64, 256], 6)]),
        ("gemm", gemm(), vec![f32s(&[128, 96], 7)]),
        ("attention", attention(), (0..3).map(|i| f32s(&[1, 4, 64, 32], 8 + i)).collect()),
    ]
}

/// `m` optimized (fused) as `kiln compile --target cuda` does.
fn fused(m: Module, target: &str) -> Module {
    kiln::compile_with(m, target, &kiln::Options::default()).unwrap().module().clone()
}

fn program(m: &Module, family: Family, chip: &str) -> GpuProgram {
    let arch = GpuArch::new(family, Some(chip)).unwrap();
    gpu::compile_model(m, &arch, &Default::default()).unwrap_or_else(|e| panic!("{chip}: {e}"))
}

#[test]
fn gpu_snapshots_of_ptx_and_amdgcn() {
    for (name, m, _) in models() {
        let m = fused(m, "cuda");
        let ptx = program(&m, Family::Cuda, "sm_80");
        assert!(ptx.manifest.host_kernels.is_empty(), "{name}: {:?}", ptx.manifest.host_kernels);
        assert!(!ptx.manifest.kernels.is_empty(), "{name}: no kernel");
        insta::assert_snapshot!(format!("gpu_{name}_sm_80"), ptx.assembly());
        let gcn = program(&m, Family::Rocm, "gfx90a");
        assert!(gcn.manifest.host_kernels.is_empty(), "{name}: {:?}", gcn.manifest.host_kernels);
        insta::assert_snapshot!(format!("gpu_{name}_gfx90a"), gcn.assembly());
    }
}

/// Every chip: LLVM verifies the module before and after -O3 (compile_model fails otherwise),
/// PTX names its chip and has kernel entries, every AMDGCN object is an ELF for AMDGPU.
#[test]
fn gpu_every_arch_verifies_and_every_gfx_object_is_an_amdgpu_elf() {
    println!("| model | chip | functions | kernels | bytes of code |");
    for (name, m, _) in models() {
        let m = fused(m, "cuda");
        for chip in gpu::CUDA_ARCHS {
            let p = program(&m, Family::Cuda, chip);
            for (f, code) in &p.functions {
                assert!(code.asm.contains(&format!(".target {chip}")), "{name} {f}: no .target {chip}");
                assert!(code.asm.contains(&format!(".visible .entry {f}(")), "{name} {f}: no kernel entry");
                assert!(code.object.is_none());
            }
            let bytes: usize = p.functions.iter().map(|(_, c)| c.asm.len()).sum();
            println!("| {name} | {chip} | {} | {} | {bytes} |", p.functions.len(), p.manifest.kernels.len());
        }
        for chip in gpu::ROCM_ARCHS {
            let p = program(&m, Family::Rocm, chip);
            for (f, code) in &p.functions {
                assert!(code.asm.contains(&format!("amdgcn-amd-amdhsa--{chip}")), "{name} {f}: not for {chip}");
                assert!(code.asm.contains(&format!(".amdhsa_kernel {f}")), "{name} {f}: no kernel descriptor");
                let o = code.object.as_ref().expect("an object");
                assert_eq!(&o[..4], b"\x7fELF", "{name} {f}: not an ELF");
                assert_eq!(o[4], 2, "{name} {f}: not 64-bit");
                // e_machine = EM_AMDGPU (224).
                assert_eq!(u16::from_le_bytes([o[18], o[19]]), 224, "{name} {f}: not for AMDGPU");
            }
            let bytes: usize = p.functions.iter().map(|(_, c)| c.object.as_ref().unwrap().len()).sum();
            println!("| {name} | {chip} | {} | {} | {bytes} |", p.functions.len(), p.manifest.kernels.len());
        }
    }
}

/// The manifest's arguments are the model's tensors (shapes, dtypes, bytes, order: inputs as
/// the op's operands, then outputs), and its grid covers the threads.
#[test]
fn gpu_manifest_matches_the_model() {
    let m = fused(gemm(), "cuda");
    let p = program(&m, Family::Cuda, "sm_80");
    let json: serde_json::Value = serde_json::from_str(&p.manifest_json()).unwrap();
    assert_eq!(json["target"], "cuda");
    assert_eq!(json["arch"], "sm_80");
    let k = &json["kernels"][0];
    assert_eq!(k["op"], "Gemm");
    let args = k["args"].as_array().unwrap();
    let shapes: Vec<(String, Vec<String>, u64)> = args
        .iter()
        .map(|a| {
            let shape = a["shape"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
            (a["role"].as_str().unwrap().to_string(), shape, a["bytes"].as_u64().unwrap())
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    assert_eq!(
        shapes,
        vec![
            ("input".into(), s(&["128", "96"]), 128 * 96 * 4),
            ("input".into(), s(&["96", "80"]), 96 * 80 * 4),
            ("input".into(), s(&["80"]), 80 * 4),
            ("output".into(), s(&["128", "80"]), 128 * 80 * 4),
        ]
    );
    assert_eq!(args.iter().map(|a| a["operand"].as_u64()).collect::<Vec<_>>(), vec![Some(0), Some(1), Some(2), None]);
    // One memref descriptor per buffer: 3 + 2·rank parameters, as the PTX entry declares.
    assert_eq!(k["params"], 7 + 7 + 5 + 7);
    let f = k["function"].as_str().unwrap();
    let code = &p.functions.iter().find(|(n, _)| n == f).unwrap().1.asm;
    assert!(code.contains(&format!("{f}_param_25")) && !code.contains(&format!("{f}_param_26")), "{code}");
    // The Gemm: block-tiled from sm_80's description, on the tensor cores (its matrix_shape
    // 16×8×8): 2×2 warps of 32×32 outputs, made smaller while the grid has fewer blocks than
    // the 108 SMs, down to one warp and one instruction: 16×8 tiles, 10×8 blocks of 32
    // threads, the a and b tiles (16 deep, rows padded by 8 words) in shared memory.
    let l = &p.manifest.kernels[0];
    let tile = l.tile.expect("a tiled GEMM");
    assert_eq!((tile.tm, tile.tn, tile.tk, tile.rm, tile.rn), (16, 8, 16, 16, 8), "{l:?}");
    assert_eq!(tile.mma, Some(gpu_tile::MatrixInst::MmaTf32x3));
    assert_eq!((l.grid, l.block, l.cols_known), (Some([10, 8, 1]), [32, 1, 1], None), "{l:?}");
    assert_eq!(l.shared_bytes, 4 * 16 * (16 + 8 + 2 * 8));
    assert_eq!(k["shared_bytes"], 4 * 16 * (16 + 8 + 2 * 8));
    assert_eq!((&k["tile"]["tm"], &k["tile"]["mma"]), (&serde_json::json!(16), &serde_json::json!("mma_tf32x3")));
    for l in &p.manifest.kernels {
        let grid = l.grid.unwrap();
        if let Some(t) = l.tile {
            let shape: Vec<u64> = l.args.last().unwrap().shape.iter().map(|d| d.parse().unwrap()).collect();
            let (m, n) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            assert!(grid[0] * t.tn >= n && (grid[0] - 1) * t.tn < n && grid[1] * t.tm >= m, "{l:?}");
            assert_eq!(l.block, [t.threads(), 1, 1]);
            continue;
        }
        let threads = l.threads_known.unwrap();
        let (cols, rows) = match l.cols_known {
            Some(c) => (c, threads / c),
            None => (threads, 1),
        };
        assert!(grid[0] * l.block[0] >= cols && (grid[0] - 1) * l.block[0] < cols.max(1), "{l:?}");
        assert!(grid[1] * l.block[1] >= rows && (grid[1] - 1) * l.block[1] < rows.max(1), "{l:?}");
        assert_eq!(l.block[0] * l.block[1] % 32, 0, "{l:?}");
    }
    // Symbolic batch: the threads are an expression of the buffers' dims, the grid open.
    let mut g = GraphBuilder::new("sym");
    let x = g.input("x", TensorType::new(DType::F32, vec![Dim::sym("N"), Dim::Known(64)])).unwrap();
    let y = g.op("Relu", &[x]).unwrap();
    g.output(y, "y").unwrap();
    let p = program(&fused(g.finish().unwrap(), "cuda"), Family::Cuda, "sm_80");
    let l = &p.manifest.kernels[0];
    assert!(l.grid.is_none() && l.threads_known.is_none() && l.threads.contains("dim("), "{l:?}");
    assert_eq!(l.args[0].shape, vec!["N".to_string(), "64".to_string()]);
    assert_eq!(l.args[0].bytes, None);
}

/// Runs fused `m` with every kernel lowered as for the GPU and run as its launch would run it:
/// one host call per thread of `grid × block` ([`NativeKernel::run_as_gpu`]), outputs
/// pre-filled with NaN so that elements no thread stores show. Returns the outputs, the kernels
/// run that way and the largest launch (threads).
fn run_as_gpu(m: &Module, inputs: Vec<Tensor>) -> (Vec<Tensor>, usize, u64, usize) {
    let (outs, kernels, largest, tiled) = run_as_gpu_on(m, inputs, &GpuArch::new(Family::Cuda, None).unwrap());
    (outs, kernels, largest, tiled.len())
}

/// [`run_as_gpu`] for `arch`; also returns the launches of block-tiled GEMMs, which run
/// block by block, each block's threads phase by phase ([`gpu_tile::host_blocks`]), as row
/// kernels do ([`gpu_rows::host_blocks`]).
fn run_as_gpu_on(m: &Module, inputs: Vec<Tensor>, arch: &GpuArch) -> (Vec<Tensor>, usize, u64, Vec<gpu::KernelLaunch>) {
    let schedule = gpu::schedule();
    let mut launches: HashMap<kiln_ir::ir::OpId, (Rc<NativeKernel>, u64, gpu::KernelLaunch)> = HashMap::new();
    // Block-synchronous kernels' host builds; which of them are tiled GEMMs.
    let mut blocked: HashMap<kiln_ir::ir::OpId, Rc<HostBlocks>> = HashMap::new();
    let mut tiled = std::collections::HashSet::new();
    let mut compiled: HashMap<String, Rc<NativeKernel>> = HashMap::new();
    for (o, name) in kiln_targets::native::launched_kernels(m) {
        let Ok(k) = gpu::lower(m, o, &name, &schedule) else { continue };
        let launch = gpu::launch_of(&k, arch, &name, "", None);
        let grid = launch.grid.expect("known shapes");
        let threads = grid.iter().chain(&launch.block).product::<u64>();
        if let Some(g) = gpu_tile::recognize(&k, arch).unwrap() {
            assert_eq!(launch.tile, Some(g.tile));
            blocked.insert(o, Rc::new(gpu_tile::host_blocks(k.clone(), &g).unwrap()));
            tiled.insert(o);
        } else if let Some(r) = gpu_rows::recognize(&k, arch) {
            assert_eq!((launch.row_block, launch.grid), (Some(r.threads), Some(r.grid())));
            blocked.insert(o, Rc::new(gpu_rows::host_blocks(k.clone(), &r).unwrap()));
        }
        let key = format!("{:?}", kiln_ir::kernel::Kernel { name: String::new(), ..k.clone() });
        let native = compiled.entry(key).or_insert_with(|| Rc::new(NativeKernel::compile(k).unwrap())).clone();
        launches.insert(o, (native, threads, launch));
    }
    let largest = launches.values().map(|(_, t, _)| *t).max().unwrap_or(0);
    let tiled_launches: Vec<gpu::KernelLaunch> =
        launches.iter().filter(|(o, _)| tiled.contains(*o)).map(|(_, (_, _, l))| l.clone()).collect();
    let omitted = Tensor::from_f32(&[0], vec![]);
    let over = |o: kiln_ir::ir::OpId, operands: &[Option<&Tensor>]| {
        let (native, threads, launch) = launches.get(&o)?;
        let refs: Vec<&Tensor> = operands.iter().map(|t| t.unwrap_or(&omitted)).collect();
        if let Some(b) = blocked.get(&o) {
            return Some(
                b.run(&refs)
                    .map(|outs| outs.into_iter().map(Rc::new).collect())
                    .map_err(|e| kiln_ir::graph::OpError(e.to_string())),
            );
        }
        let run = match (launch.cols_known, launch.grid) {
            (Some(cols), Some(g)) => {
                native.run_as_gpu_2d(&refs, [g[0], g[1]], [launch.block[0], launch.block[1]], cols as i64)
            }
            _ => native.run_as_gpu(&refs, *threads),
        };
        Some(run.map_err(|e| kiln_ir::graph::OpError(e.to_string())).and_then(|(outs, extent)| {
            if extent > *threads as i64 {
                return Err(kiln_ir::graph::OpError(format!("grid of {threads} threads < extent {extent}")));
            }
            Ok(outs.into_iter().map(Rc::new).collect())
        }))
    };
    let (outs, _) = kiln_ir::interp::run_custom(m, inputs, &mut |_, _| {}, &over).unwrap();
    (outs, launches.len(), largest, tiled_launches)
}

fn assert_matches(name: &str, got: &[Tensor], want: &[Tensor], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.shape, w.shape, "{name}");
        for (i, (x, y)) in g.as_f32().unwrap().iter().zip(w.as_f32().unwrap()).enumerate() {
            assert!((x - y).abs() <= atol + rtol * y.abs(), "{name}: element {i}: {x} vs {y} (reference)");
        }
    }
}

/// The launch contract emulated on the host: each kernel's body run once per thread of its
/// manifest's grid (thread t on iteration t of the shared loop, threads past it idle) gives the
/// reference interpreter's outputs: the snapshot models, two light CNNs with random weights and
/// the GPT-2 block (its MatMuls a thread per output element on 2-D grids).
#[test]
fn gpu_launches_emulated_on_the_host_match_the_reference() {
    println!("| model | kernels | block-tiled GEMMs | largest launch (threads) |");
    for (name, m, inputs) in models() {
        let m = fused(m, "cuda");
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let (got, kernels, largest, tiled) = run_as_gpu(&m, inputs);
        assert!(kernels >= 1, "{name}");
        assert_matches(name, &got, &want, 1e-4, 1e-5);
        println!("| {name} | {kernels} | {tiled} | {largest} |");
    }
    for (group, name) in
        [("light-random", "light_squeezenet"), ("light-random", "light_shufflenet"), ("transformers", "gpt2_block")]
    {
        let dir = data_dir().join(group).join(name);
        let m =
            kiln::load_model(&dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e} (run scripts/setup.sh)"));
        let m = fused(m, "cuda");
        let input = vec![kiln_onnx::read_tensor_file(&dir.join("test_data_set_0/input_0.pb")).unwrap()];
        let want = kiln_ir::interp::run(&m, input.clone()).unwrap();
        let (got, kernels, largest, tiled) = run_as_gpu(&m, input);
        assert_matches(name, &got, &want, 1e-3, 1e-5);
        println!("| {name} | {kernels} | {tiled} | {largest} |");
        if name == "gpt2_block" {
            assert!(tiled >= 4, "gpt2_block: {tiled} block-tiled GEMMs");
        }
    }
}

/// NVIDIA's PTX assembler: `$KILN_PTXAS`, the one `scripts/setup.sh` installs into `.venv`
/// (PyPI `nvidia-cuda-nvcc-cu12`), or `ptxas` on the PATH.
fn ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KILN_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = root.join(".venv/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cuda_nvcc/bin/ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    std::process::Command::new("ptxas").arg("--version").output().ok().map(|_| PathBuf::from("ptxas"))
}

/// Assembles PTX file `file` for `chip` with `ptxas` ([`ptxas`]'s; NOT RUN, a failure, where
/// there is none), `what` naming it in a failure; returns ptxas's resource report (`-v`).
fn assemble(ptxas: Option<&PathBuf>, file: &std::path::Path, chip: &str, what: &str) -> String {
    let Some(ptxas) = ptxas else { panic!("NOT RUN: ptxas not found: run scripts/setup.sh") };
    let cubin = file.with_extension("cubin");
    let out = std::process::Command::new(ptxas)
        .args([&format!("-arch={chip}"), "-v", file.to_str().unwrap(), "-o", cubin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: ptxas: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every PTX kiln emits assembles with ptxas for its chip: the snapshot models on sm_80 and
/// sm_90, and every ONNX node test's kernels that lower natively on sm_80. A missing ptxas
/// fails the test with the way to install it (it never passes without having run).
#[test]
fn gpu_ptx_assembles_with_ptxas() {
    let Some(ptxas) = ptxas() else {
        panic!("NOT RUN: ptxas not found: run scripts/setup.sh (installs nvidia-cuda-nvcc-cu12 into .venv) or set KILN_PTXAS");
    };
    let dir = temp_dir("gpu-ptxas");
    let count = std::cell::Cell::new(0usize);
    let check = |what: &str, chip: &str, ptx: &str| {
        let f = dir.join(format!("k{}.ptx", count.get()));
        std::fs::write(&f, ptx).unwrap();
        assemble(Some(&ptxas), &f, chip, &format!("{what} ({chip})"));
        count.set(count.get() + 1);
    };
    for (name, m, _) in models() {
        let m = fused(m, "cuda");
        for chip in gpu::CUDA_ARCHS {
            for (f, code) in &program(&m, Family::Cuda, chip).functions {
                check(&format!("{name} {f}"), chip, &code.asm);
            }
        }
    }
    let snapshot_models = count.get();
    // The node tests: each distinct PTX once.
    let mut seen = std::collections::HashSet::new();
    let (mut cases, mut with_kernels, mut host) = (0, 0, 0);
    let arch = GpuArch::new(Family::Cuda, Some("sm_80")).unwrap();
    let cases_dir = data_dir().join("node");
    assert!(cases_dir.is_dir(), "{}: no node tests (run scripts/setup.sh)", cases_dir.display());
    for case in kiln_onnx::testcase::list_cases(&cases_dir) {
        let case = case.dir;
        let Ok(m) = kiln::load_model(&case.join("model.onnx")) else { continue };
        let Ok(c) = kiln::compile_with(m, "cuda", &kiln::Options::default()) else { continue };
        cases += 1;
        let p = gpu::compile_model(c.module(), &arch, &Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        host += p.manifest.host_kernels.len();
        with_kernels += usize::from(!p.functions.is_empty());
        for (f, code) in &p.functions {
            let body: String = code.asm.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            if seen.insert(body.replace(f.as_str(), "")) {
                check(&format!("{} {f}", case.display()), "sm_80", &code.asm);
            }
        }
    }
    let assembled = count.get();
    println!(
        "ptxas ({}): {assembled} PTX modules assembled: {snapshot_models} of the snapshot models (sm_80, sm_90), \
         {} distinct ones of {with_kernels} node tests with native kernels ({cases} cases compiled, {host} host kernels)",
        ptxas.display(),
        assembled - snapshot_models
    );
    assert!(with_kernels > 300, "only {with_kernels} node tests have GPU kernels");
}

/// Every ONNX node test's kernels that lower natively compile for gfx90a (LLVM's AMDGPU back
/// end, verified before and after -O3) into AMDGPU ELF objects.
#[test]
fn gpu_node_test_kernels_assemble_for_gfx90a() {
    let cases_dir = data_dir().join("node");
    assert!(cases_dir.is_dir(), "{}: no node tests (run scripts/setup.sh)", cases_dir.display());
    let arch = GpuArch::new(Family::Rocm, Some("gfx90a")).unwrap();
    let (mut with_kernels, mut objects) = (0, 0);
    for case in kiln_onnx::testcase::list_cases(&cases_dir) {
        let Ok(m) = kiln::load_model(&case.dir.join("model.onnx")) else { continue };
        let Ok(c) = kiln::compile_with(m, "rocm", &kiln::Options::default()) else { continue };
        let p = gpu::compile_model(c.module(), &arch, &Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", case.dir.display()));
        with_kernels += usize::from(!p.functions.is_empty());
        for (f, code) in &p.functions {
            let o = code.object.as_ref().expect("an object");
            assert!(o.starts_with(b"\x7fELF") && u16::from_le_bytes([o[18], o[19]]) == 224, "{} {f}", case.name);
            objects += 1;
        }
    }
    println!("gfx90a: {objects} AMDGPU objects from {with_kernels} node tests with GPU kernels");
    assert!(with_kernels > 300, "only {with_kernels} node tests have GPU kernels");
}

/// `kiln compile --target cuda|rocm -o DIR` writes each kernel's code and manifest.json;
/// `--emit asm` prints them; `--gpu-arch` picks the chip and refuses unknown ones.
#[test]
fn gpu_cli_compiles_to_a_directory() {
    let dir = temp_dir("gpu-cli");
    let proto = model(
        17,
        vec![node("Softmax", "sm", &["x"], &["y"], vec![attr_int("axis", -1)])],
        vec![value_info("x", 1, &["64", "256"])],
        vec![value_info("y", 1, &["64", "256"])],
        vec![],
    );
    let path = save(&dir, "softmax.onnx", &proto);
    let m = path.to_str().unwrap();
    let out = dir.join("cuda");
    let o = kiln(&["compile", m, "--target", "cuda", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let kernels = manifest["kernels"].as_array().unwrap();
    assert!(!kernels.is_empty());
    for k in kernels {
        let ptx = std::fs::read_to_string(out.join(k["file"].as_str().unwrap())).unwrap();
        assert!(ptx.contains(".target sm_80"));
    }
    let out = dir.join("rocm");
    let o = kiln(&["compile", m, "--target", "rocm", "--gpu-arch", "gfx906", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["arch"], "gfx906");
    for k in manifest["kernels"].as_array().unwrap() {
        assert!(out.join(k["file"].as_str().unwrap()).is_file());
        assert!(out.join(k["object"].as_str().unwrap()).is_file());
    }
    let o = kiln(&["compile", m, "--target", "cuda", "--gpu-arch", "sm_90", "--emit", "asm"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains(".target sm_90") && text.contains(".entry"), "{text}");
    let o = kiln(&["compile", m, "--target", "cuda", "--gpu-arch", "gfx90a", "--emit", "asm"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sm_80, sm_90"));
    let o = kiln(&["compile", m, "--target", "cpu", "--gpu-arch", "sm_80", "--emit", "asm"]);
    assert_eq!(o.status.code(), Some(2));
}

fn to_array(t: &Tensor) -> Array {
    Array::from_tensor(t)
}

fn from_array(a: &Array) -> Tensor {
    a.to_tensor().expect("whole elements")
}

/// What [`run_plan`] did.
struct PlanRun {
    outputs: Vec<Tensor>,
    launches: usize,
    threads: u64,
    arena: usize,
    weights: usize,
}

/// Runs the plan in `dir` (written by `kiln compile --target cuda -o DIR`, or by
/// [`write_program`]) whole on the emulated GPU, whose functions come from `prog` (the same
/// compile of fused `m`).
fn run_plan(prog: &GpuProgram, dir: &std::path::Path, inputs: &[Tensor]) -> Result<PlanRun, String> {
    let device = EmulatedGpu::new(prog).map_err(|e| e.to_string())?;
    let mut ex = Executor::new(device, dir).map_err(|e| e.0)?;
    let ins: Vec<Array> = inputs.iter().map(to_array).collect();
    let outs = ex.run(&ins).map_err(|e| e.0)?;
    let plan = ex.plan();
    Ok(PlanRun {
        outputs: outs.iter().map(from_array).collect(),
        launches: ex.device.launches,
        threads: ex.device.threads,
        arena: plan.arena_bytes,
        weights: plan.weight_bytes,
    })
}

/// `fused` compiled for cuda (sm_80) through the public API into `dir`: kernels, manifest, plan.
fn write_program(fused: &Module, dir: &std::path::Path) -> GpuProgram {
    let p = program(fused, Family::Cuda, "sm_80");
    p.write(dir).unwrap();
    let (plan, _) = kiln_targets::gpu_plan::write(fused, &p, dir).unwrap();
    assert!(plan.runnable, "{}: {:?}", dir.display(), plan.why_not);
    p
}

/// Whole models compiled for cuda with `-o DIR` run from their plans (every launch in order
/// over the planned arena, weights uploaded once) on the emulated GPU, each launch thread by
/// thread over its grid, and match the reference interpreter: the snapshot models (through
/// the API), SqueezeNet and the GPT-2 block (through `kiln compile`).
#[test]
fn gpu_plans_run_whole_models_on_the_emulated_gpu() {
    println!("| model | launches | threads emulated | arena bytes | weight bytes |");
    let row = |name: &str, r: &PlanRun| {
        println!("| {name} | {} | {} | {} | {} |", r.launches, r.threads, r.arena, r.weights);
    };
    for (name, m, inputs) in models() {
        let m = fused(m, "cuda");
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let dir = temp_dir(&format!("gpu-plan-{name}"));
        let p = write_program(&m, &dir);
        let r = run_plan(&p, &dir, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.launches, p.manifest.kernels.len(), "{name}");
        assert_matches(name, &r.outputs, &want, 1e-4, 1e-5);
        row(name, &r);
    }
    for (group, name) in [("light-random", "light_squeezenet"), ("transformers", "gpt2_block")] {
        let src = data_dir().join(group).join(name);
        let dir = temp_dir(&format!("gpu-plan-{name}"));
        let model = src.join("model.onnx");
        let o = kiln(&["compile", model.to_str().unwrap(), "--target", "cuda", "-o", dir.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("plan: "), "{name}");
        let m = fused(kiln::load_model(&model).unwrap(), "cuda");
        let p = program(&m, Family::Cuda, "sm_80");
        let input = vec![kiln_onnx::read_tensor_file(&src.join("test_data_set_0/input_0.pb")).unwrap()];
        let want = kiln_ir::interp::run(&m, input.clone()).unwrap();
        let r = run_plan(&p, &dir, &input).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_matches(name, &r.outputs, &want, 1e-3, 1e-5);
        row(name, &r);
    }
}

/// Every 4th ONNX node test whose cuda plan is runnable (every `$KILN_GPU_NODE_STEP`th), host
/// steps included (some plans are host steps only), run whole on the emulated GPU, against the reference interpreter (every one
/// must pass).
#[test]
fn gpu_node_test_plans_run_on_the_emulated_gpu() {
    let cases_dir = data_dir().join("node");
    assert!(cases_dir.is_dir(), "{}: no node tests (run scripts/setup.sh)", cases_dir.display());
    let (mut runnable, mut not_runnable, mut failed, mut with_host, mut host_only) = (0, 0, Vec::new(), 0, 0);
    let step = std::env::var("KILN_GPU_NODE_STEP").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    for case in kiln_onnx::testcase::list_cases(&cases_dir).iter().step_by(step) {
        let Ok(m) = case.load_model() else { continue };
        let Ok(c) = kiln::compile_with(m, "cuda", &kiln::Options::default()) else { continue };
        let m = c.module();
        let p = program(m, Family::Cuda, "sm_80");
        let (plan, _) = kiln_targets::gpu_plan::plan(m, &p);
        if !plan.runnable {
            not_runnable += 1;
            continue;
        }
        host_only += usize::from(plan.launches.is_empty());
        let Ok(sets) = case.data_sets() else { continue };
        let Some(set) = sets.first() else { continue };
        let dir = temp_dir(&format!("gpu-node-{}", case.name));
        p.write(&dir).unwrap();
        kiln_targets::gpu_plan::write(m, &p, &dir).unwrap();
        runnable += 1;
        with_host += usize::from(!plan.host_steps.is_empty());
        let want = match kiln_ir::interp::run(m, set.inputs.clone()) {
            Ok(w) => w,
            Err(e) => panic!("{}: ref: {e}", case.name),
        };
        let outcome = run_plan(&p, &dir, &set.inputs).and_then(|r| {
            r.outputs.iter().zip(&want).try_for_each(|(g, w)| kiln_onnx::testcase::compare(g, w, 1e-4, 1e-5))
        });
        if let Err(e) = outcome {
            failed.push(format!("{}: {e}", case.name));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "emulated GPU, every {step}th node test: {} of {runnable} runnable plans match ref ({with_host} with host steps, {host_only} of them without launches; {not_runnable} not runnable)",
        runnable - failed.len()
    );
    assert!(with_host * step >= 400, "only {with_host} node-test plans with host steps in the sample");
    assert!(runnable * step >= 160, "only {runnable} runnable node-test plans in the sample");
    assert!(failed.is_empty(), "{} failed:\n{}", failed.len(), failed.join("\n"));
}

/// The `kiln-gpu-run` binary built beside `kiln` (built here, a no-op when it is up to date:
/// `cargo test -p kiln` alone would leave a stale one from an older plan format).
fn gpu_run_binary() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-gpu-run");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "kiln-runtime", "--bin", "kiln-gpu-run"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok && exe.is_file(), "could not build {}", exe.display());
    exe
}

/// `kiln-gpu-run` on a compiled GEMM: a wrong input shape is refused naming the input; then,
/// without a CUDA driver, it exits 3 saying so (the test prints NOT RUN: it never passes as if a
/// GPU had run); with one, the outputs must match ref's. A model with a host kernel compiles
/// with a plan marked not runnable, which the runner refuses naming the kernel, node and op.
#[test]
fn gpu_run_cli_refuses_clearly_and_runs_where_a_driver_exists() {
    let dir = temp_dir("gpu-run-cli");
    let m = fused(gemm(), "cuda");
    let plan_dir = dir.join("gemm");
    write_program(&m, &plan_dir);
    let x = f32s(&[128, 96], 7);
    let want = kiln_ir::interp::run(&m, vec![x.clone()]).unwrap();
    npy::write(&dir.join("x.npy"), &to_array(&x)).unwrap();
    npy::write(&dir.join("want.npy"), &to_array(&want[0])).unwrap();
    npy::write(&dir.join("bad.npy"), &Array::f32(&[96, 128], vec![0.0; 96 * 128])).unwrap();
    let exe = gpu_run_binary();
    let run = |args: &[&str]| std::process::Command::new(&exe).args(args).output().unwrap();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let o = run(&[&p("gemm"), "--input", &p("bad.npy")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("input 'x'") && err.contains("[128, 96]"), "{err}");
    let o = run(&[&p("gemm"), "--input", &p("x.npy"), "--expect", &p("want.npy"), "--output-dir", &p("out"), "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(3) if err.contains(kiln_runtime::cuda::NO_DRIVER) => {
            println!("NOT RUN: kiln-gpu-run on a GPU: {}", err.trim())
        }
        Some(0) => {
            let got = npy::read(&dir.join("out/output_0.npy")).unwrap();
            assert_matches("gemm on the GPU", &[from_array(&got)], &want, 1e-4, 1e-5);
            println!("ran on the GPU: {}", String::from_utf8_lossy(&o.stdout).trim());
        }
        c => panic!("kiln-gpu-run exited {c:?}: {err}"),
    }
    // A model with string tensors: its plan says it is not runnable naming the value, and the
    // runner refuses it so.
    let model = data_dir().join("node/test_equal_string/model.onnx");
    let host_dir = dir.join("strings");
    let o = kiln(&["compile", model.to_str().unwrap(), "--target", "cuda", "-o", host_dir.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("plan: not runnable"), "{out}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(host_dir.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["runnable"], false);
    let why = plan["why_not"].as_str().unwrap();
    assert!(why.contains("is tensor<2x!kiln.string>") && why.contains("no string tensors"), "{why}");
    let o = run(&[host_dir.to_str().unwrap(), "--input", &p("x.npy")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not runnable") && err.contains("no string tensors"), "{err}");
}

/// The CUDA device itself: without a driver, opening it is the clear error (NOT RUN printed);
/// with one, the GEMM and Softmax plans run on GPU 0 and match ref.
#[test]
fn gpu_cuda_device_runs_plans_where_a_driver_exists() {
    for (name, m, inputs) in models().into_iter().filter(|(n, ..)| ["gemm", "softmax"].contains(n)) {
        let m = fused(m, "cuda");
        let dir = temp_dir(&format!("gpu-cuda-{name}"));
        write_program(&m, &dir);
        let device = match kiln_runtime::cuda::CudaDevice::open() {
            Ok(d) => d,
            Err(e) => {
                assert!(e.0.starts_with(kiln_runtime::cuda::NO_DRIVER), "{name}: {e}");
                println!("NOT RUN: {name} on a GPU: {e} (the plan was written; nothing ran on a GPU)");
                continue;
            }
        };
        let mut ex = Executor::new(device, &dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = ex.run(&inputs.iter().map(to_array).collect::<Vec<_>>()).unwrap();
        let want = kiln_ir::interp::run(&m, inputs).unwrap();
        assert_matches(name, &got.iter().map(from_array).collect::<Vec<_>>(), &want, 1e-4, 1e-5);
        println!("ran {name} on the GPU: matches ref");
    }
}

/// `dir`'s files `PREFIX_<i>.npy`, in index order.
fn numbered_npy(dir: &std::path::Path, prefix: &str) -> Vec<Array> {
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let i = p.file_name()?.to_str()?.strip_prefix(prefix)?.strip_suffix(".npy")?.parse().ok()?;
            Some((i, p))
        })
        .collect();
    files.sort();
    files.iter().map(|(_, p)| npy::read(p).unwrap_or_else(|e| panic!("{e}"))).collect()
}

/// What `scripts/gpu_prepare.sh` prepared (in `$KILN_GPU_PREPARED`), run as
/// `scripts/gpu_check.sh` runs it on a GPU but on the emulated GPU: each plan directory as
/// written, its `input_<i>.npy`, `ref`'s `expect_<i>.npy`, rtol 1e-3, atol 1e-4 (the functions
/// recompiled from the same model for the emulation).
#[test]
#[ignore = "needs a directory from scripts/gpu_prepare.sh in $KILN_GPU_PREPARED"]
fn gpu_prepared_cases_pass_on_the_emulated_gpu() {
    let prep =
        PathBuf::from(std::env::var("KILN_GPU_PREPARED").expect("KILN_GPU_PREPARED: a gpu_prepare.sh directory"));
    let (mut passed, mut failed) = (0, Vec::new());
    let node = data_dir().join("node");
    for (kind, models) in [("cnn", data_dir().join("light-random")), ("node", node.clone()), ("node-host", node)] {
        let Ok(listing) = std::fs::read_dir(prep.join(kind)) else { continue };
        let mut dirs: Vec<PathBuf> = listing.map(|e| e.unwrap().path()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let m = fused(kiln::load_model(&models.join(&name).join("model.onnx")).unwrap(), "cuda");
            let p = program(&m, Family::Cuda, "sm_80");
            let outcome = (|| {
                let mut ex = Executor::new(EmulatedGpu::new(&p).map_err(|e| e.to_string())?, &dir).map_err(|e| e.0)?;
                let outs = ex.run(&numbered_npy(&dir, "input_")).map_err(|e| e.0)?;
                for (i, (o, w)) in outs.iter().zip(numbered_npy(&dir, "expect_")).enumerate() {
                    if let Some(why) = npy::mismatch(o, &w, 1e-3, 1e-4) {
                        return Err(format!("output {i}: {why}"));
                    }
                }
                Ok(())
            })();
            match outcome {
                Ok(()) => passed += 1,
                Err(e) => failed.push(format!("{kind} {name}: {e}")),
            }
        }
    }
    println!("prepared cases on the emulated GPU: {passed} of {} pass", passed + failed.len());
    assert!(failed.is_empty(), "{} failed:\n{}", failed.len(), failed.join("\n"));
}

/// A MatMul of `a` (M×K, or batched) and a constant `b`, or a Gemm with `attrs` and a bias.
fn matmul_model(a: &[u64], b: &[u64]) -> Module {
    let mut g = GraphBuilder::new("matmul");
    let x = g.input("x", f32_type(a)).unwrap();
    let b: Vec<usize> = b.iter().map(|&d| d as usize).collect();
    let w = g.constant("w", f32s(&b, 3));
    let y = g.op("MatMul", &[x, w]).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

fn gemm_model(a: &[u64], b: &[u64], bias: &[usize], attrs: Vec<(&'static str, Attr)>) -> Module {
    let mut g = GraphBuilder::new("gemm");
    let x = g.input("x", f32_type(a)).unwrap();
    let b: Vec<usize> = b.iter().map(|&d| d as usize).collect();
    let w = g.constant("w", f32s(&b, 3));
    let c = g.constant("c", f32s(bias, 4));
    let y = g.op_with("Gemm", &[x, w, c], attrs).unwrap();
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

/// The GEMM shapes the tiled kernel is checked on: edges in every dimension (1×1×1, sizes
/// no tile divides), vector-loadable and scalar operands, batches, Gemm's transposes and bias.
fn tiled_cases() -> Vec<(&'static str, Module, Vec<Tensor>)> {
    let one = |s: &[u64], seed| f32s(&s.iter().map(|&d| d as usize).collect::<Vec<_>>(), seed);
    vec![
        ("matmul 1x1x1", matmul_model(&[1, 1], &[1, 1]), vec![one(&[1, 1], 5)]),
        ("matmul 17x45 * 45x33", matmul_model(&[17, 45], &[45, 33]), vec![one(&[17, 45], 5)]),
        ("matmul 128x96 * 96x80", matmul_model(&[128, 96], &[96, 80]), vec![one(&[128, 96], 5)]),
        ("matmul 1024 x 64 * 64x256", matmul_model(&[1024, 64], &[64, 256]), vec![one(&[1024, 64], 5)]),
        ("matmul batched 3x17x20 * 3x20x12", matmul_model(&[3, 17, 20], &[3, 20, 12]), vec![one(&[3, 17, 20], 5)]),
        ("matmul broadcast 2x3x8x16 * 16x12", matmul_model(&[2, 3, 8, 16], &[16, 12]), vec![one(&[2, 3, 8, 16], 5)]),
        (
            "gemm transB bias 37x64 * (24x64)T + 24",
            gemm_model(&[37, 64], &[24, 64], &[24], vec![("transB", Attr::Int(1))]),
            vec![one(&[37, 64], 5)],
        ),
        (
            "gemm transA alpha beta (20x9)T * 20x7 + 9x7",
            gemm_model(
                &[20, 9],
                &[20, 7],
                &[9, 7],
                vec![("transA", Attr::Int(1)), ("alpha", Attr::Float(0.5)), ("beta", Attr::Float(2.0))],
            ),
            vec![one(&[20, 9], 5)],
        ),
    ]
}

/// Each case (one contraction the GPU tiles) run as the tiled launch on the host for every
/// chip's tile (sm_80, sm_90: 3xTF32 `mma.sync` where the output holds one instruction's;
/// gfx906: none; gfx90a: `v_mfma_f32_16x16x4f32`) against the reference interpreter; prints
/// each tile.
fn check_tiled_emulation(cases: Vec<(&'static str, Module, Vec<Tensor>)>) {
    println!("| case | chip | grid | block | tile | matrix unit | shared bytes |");
    for (name, m, inputs) in cases {
        let m = fused(m, "cuda");
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        for (family, chip) in
            [(Family::Cuda, "sm_80"), (Family::Cuda, "sm_90"), (Family::Rocm, "gfx906"), (Family::Rocm, "gfx90a")]
        {
            let arch = GpuArch::new(family, Some(chip)).unwrap();
            let (got, _, _, tiled) = run_as_gpu_on(&m, inputs.clone(), &arch);
            assert_eq!(tiled.len(), 1, "{name} {chip}: not tiled");
            assert_matches(name, &got, &want, 1e-4, 1e-5);
            let l = &tiled[0];
            let t = l.tile.unwrap();
            println!(
                "| {name} | {chip} | {:?} | {} | {}x{}x{} | {:?} | {} |",
                l.grid.unwrap(),
                l.block[0],
                t.tm,
                t.tn,
                t.tk,
                t.mma,
                l.shared_bytes
            );
        }
    }
}

/// The block-tiled GEMM's schedule run on the host (blocks one after another, each phase a
/// loop over the block's threads, the barrier the boundary between phases; outputs prefilled
/// with NaN) gives the reference interpreter's results, for the tile every chip's description
/// picks.
#[test]
fn gpu_tiled_gemm_emulated_on_the_host_matches_the_reference() {
    check_tiled_emulation(tiled_cases());
}

/// The tiled kernel's code: PTX with shared memory, `bar.sync` and 16-byte global loads
/// (assembled by ptxas for sm_80 and sm_90), AMDGCN objects with LDS accesses and
/// `s_barrier` for every gfx.
#[test]
fn gpu_tiled_gemm_code_uses_shared_memory_and_barriers() {
    let ptxas = ptxas();
    let dir = temp_dir("gpu-tiled");
    for (name, m, _) in tiled_cases() {
        let m = fused(m, "cuda");
        let vector = name.contains("128x96") || name.contains("1024");
        for chip in gpu::CUDA_ARCHS {
            let p = program(&m, Family::Cuda, chip);
            assert!(p.manifest.kernels.iter().any(|l| l.tile.is_some()), "{name} {chip}: not tiled");
            let mma = p.manifest.kernels.iter().any(|l| l.tile.is_some_and(|t| t.mma.is_some()));
            for (f, code) in &p.functions {
                let ptx = &code.asm;
                let file = dir.join(format!("{f}_{chip}.ptx"));
                std::fs::write(&file, ptx).unwrap();
                assert!(ptx.contains(".shared") && ptx.contains("bar.sync"), "{name} {chip} {f}:\n{ptx}");
                assert!(ptx.contains("ld.shared."), "{name} {chip} {f}: no shared loads");
                // Three tensor-core products (3xTF32) for each of a warp's instruction tiles.
                let mmas = ptx.matches("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32").count();
                assert_eq!(mmas > 0 && mmas % 3 == 0, mma, "{name} {chip} {f}: {mmas} mma.sync");
                if vector && !mma {
                    // (Smaller shapes' micro-tiles have lanes LLVM proves dead and narrows.)
                    assert!(
                        ptx.contains("ld.shared.v4."),
                        "{name} {chip} {f}: no vector shared loads ({})",
                        file.display()
                    );
                }
                if vector {
                    assert!(
                        ptx.contains("ld.global.v4.") || ptx.contains("ld.global.nc.v4."),
                        "{name} {chip} {f}: no vector global loads"
                    );
                }
                assemble(ptxas.as_ref(), &file, chip, &format!("{name} {chip}"));
            }
        }
        for chip in gpu::ROCM_ARCHS {
            let p = program(&m, Family::Rocm, chip);
            let mma = p.manifest.kernels.iter().any(|l| l.tile.is_some_and(|t| t.mma.is_some()));
            assert!(!mma || *chip != "gfx906", "{name}: gfx906 has no matrix unit");
            for (f, code) in &p.functions {
                let s = &code.asm;
                assert_eq!(s.contains("v_mfma_f32_16x16x4"), mma, "{name} {chip} {f}");
                assert!(s.contains("s_barrier"), "{name} {chip} {f}: no s_barrier");
                assert!(s.contains("ds_write") || s.contains("ds_store"), "{name} {chip} {f}: no LDS stores");
                assert!(s.contains("ds_read") || s.contains("ds_load"), "{name} {chip} {f}: no LDS loads");
                assert!(s.contains(".amdhsa_group_segment_fixed_size"), "{name} {chip} {f}");
                let o = code.object.as_ref().unwrap();
                assert!(o.starts_with(b"\x7fELF") && u16::from_le_bytes([o[18], o[19]]) == 224);
            }
        }
    }
}

/// A Conv of input `x` (NCHW) and constant weights `w` (MCKhKw) with `attrs`, a bias when
/// `bias`, a Relu after it when `relu` (fused into the kernel's epilogue).
fn conv_model(x: &[u64], w: &[u64], bias: bool, relu: bool, attrs: Vec<(&'static str, Attr)>) -> Module {
    let mut g = GraphBuilder::new("conv");
    let xi = g.input("x", f32_type(x)).unwrap();
    let ws: Vec<usize> = w.iter().map(|&d| d as usize).collect();
    let wc = g.constant("w", f32s(&ws, 3));
    let mut ins = vec![xi, wc];
    if bias {
        ins.push(g.constant("b", f32s(&[ws[0]], 4)));
    }
    let mut y = g.op_with("Conv", &ins, attrs).unwrap();
    if relu {
        y = g.op("Relu", &[y]).unwrap();
    }
    g.output(y, "y").unwrap();
    g.finish().unwrap()
}

/// The Conv shapes the implicit-GEMM tiling is checked on: padding on all and on some sides,
/// stride 2, dilation 2, auto_pad, odd sizes, channel and pixel counts no tile divides, 1×1,
/// 3×3, 5×3 and 7×7 kernels, batches, bias and a fused Relu.
fn tiled_conv_cases() -> Vec<(&'static str, Module, Vec<Tensor>)> {
    let one = |s: &[u64], seed| f32s(&s.iter().map(|&d| d as usize).collect::<Vec<_>>(), seed);
    let ints = |v: &[i64]| Attr::Ints(v.to_vec());
    vec![
        (
            "conv 3x3 pad 1 all sides, bias, relu: 1x3x9x9 -> 5",
            conv_model(&[1, 3, 9, 9], &[5, 3, 3, 3], true, true, vec![("pads", ints(&[1, 1, 1, 1]))]),
            vec![one(&[1, 3, 9, 9], 5)],
        ),
        (
            "conv 3x3 stride 2, pads on some sides: 2x6x11x10 -> 7",
            conv_model(
                &[2, 6, 11, 10],
                &[7, 6, 3, 3],
                false,
                false,
                vec![("pads", ints(&[0, 1, 1, 0])), ("strides", ints(&[2, 2]))],
            ),
            vec![one(&[2, 6, 11, 10], 6)],
        ),
        (
            "conv 3x3 dilation 2 pad 2, bias: 1x4x13x13 -> 19",
            conv_model(
                &[1, 4, 13, 13],
                &[19, 4, 3, 3],
                true,
                false,
                vec![("pads", ints(&[2, 2, 2, 2])), ("dilations", ints(&[2, 2]))],
            ),
            vec![one(&[1, 4, 13, 13], 7)],
        ),
        (
            "conv 1x1, bias, relu: 1x37x7x7 -> 33",
            conv_model(&[1, 37, 7, 7], &[33, 37, 1, 1], true, true, vec![]),
            vec![one(&[1, 37, 7, 7], 8)],
        ),
        (
            "conv 7x7 stride 2 pad 3, bias: 1x3x23x23 -> 16",
            conv_model(
                &[1, 3, 23, 23],
                &[16, 3, 7, 7],
                true,
                false,
                vec![("pads", ints(&[3, 3, 3, 3])), ("strides", ints(&[2, 2]))],
            ),
            vec![one(&[1, 3, 23, 23], 9)],
        ),
        (
            "conv 5x3 auto_pad SAME_UPPER stride (2,1): 3x2x8x9 -> 3",
            conv_model(
                &[3, 2, 8, 9],
                &[3, 2, 5, 3],
                false,
                false,
                vec![("auto_pad", Attr::Str("SAME_UPPER".into())), ("strides", ints(&[2, 1]))],
            ),
            vec![one(&[3, 2, 8, 9], 10)],
        ),
        (
            "conv 1x1, 2 images of 6x6, bias: 2x8x6x6 -> 12 (weights and input loaded as vectors)",
            conv_model(&[2, 8, 6, 6], &[12, 8, 1, 1], true, false, vec![]),
            vec![one(&[2, 8, 6, 6], 12)],
        ),
        (
            "conv 3x3 no padding, 64 channels: 1x64x12x12 -> 64",
            conv_model(&[1, 64, 12, 12], &[64, 64, 3, 3], true, true, vec![]),
            vec![one(&[1, 64, 12, 12], 11)],
        ),
    ]
}

/// Convs the tiling does not take, still right in their per-element or accumulate form:
/// grouped, depthwise, 1-D and 3-D.
fn untiled_conv_cases() -> Vec<(&'static str, Module, Vec<Tensor>)> {
    let one = |s: &[u64], seed| f32s(&s.iter().map(|&d| d as usize).collect::<Vec<_>>(), seed);
    vec![
        (
            "conv group 2: 1x4x6x6 -> 6",
            conv_model(&[1, 4, 6, 6], &[6, 2, 3, 3], true, false, vec![("group", Attr::Int(2))]),
            vec![one(&[1, 4, 6, 6], 5)],
        ),
        (
            "conv depthwise: 1x5x7x7",
            conv_model(
                &[1, 5, 7, 7],
                &[5, 1, 3, 3],
                false,
                true,
                vec![("group", Attr::Int(5)), ("pads", Attr::Ints(vec![1, 1, 1, 1]))],
            ),
            vec![one(&[1, 5, 7, 7], 6)],
        ),
        ("conv 1-D: 1x3x17 -> 4", conv_model(&[1, 3, 17], &[4, 3, 5], true, false, vec![]), vec![one(&[1, 3, 17], 7)]),
        (
            "conv 3-D: 1x2x5x5x5 -> 3",
            conv_model(&[1, 2, 5, 5, 5], &[3, 2, 3, 3, 3], false, false, vec![]),
            vec![one(&[1, 2, 5, 5, 5], 8)],
        ),
    ]
}

/// The implicit-GEMM Conv (output channels × pixels × `C·KH·KW`, input patches gathered into
/// shared memory with the padding as zeros) run on the host block by block, phase by phase,
/// gives the reference interpreter's results for every chip's tile; Convs it does not take
/// run untiled and still match.
#[test]
fn gpu_tiled_conv_emulated_on_the_host_matches_the_reference() {
    check_tiled_emulation(tiled_conv_cases());
    for (name, m, inputs) in untiled_conv_cases() {
        let m = fused(m, "cuda");
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let (got, kernels, _, tiled) = run_as_gpu(&m, inputs);
        assert_eq!((kernels, tiled), (1, 0), "{name}: tiled");
        assert_matches(name, &got, &want, 1e-4, 1e-5);
        println!("| {name} | untiled |");
    }
}

/// The tiled Conv's code: PTX with shared-memory stores and loads and `bar.sync` (assembled by
/// ptxas where it is installed), AMDGCN with LDS accesses and `s_barrier`, for every chip; its
/// `gpu.func` (kernel IR) as a snapshot.
#[test]
fn gpu_tiled_conv_code_uses_shared_memory_and_barriers() {
    let ptxas = ptxas();
    let dir = temp_dir("gpu-tiled-conv");
    for (name, m, _) in tiled_conv_cases() {
        let m = fused(m, "cuda");
        for chip in gpu::CUDA_ARCHS {
            let p = program(&m, Family::Cuda, chip);
            assert!(p.manifest.kernels.iter().all(|l| l.tile.is_some()), "{name} {chip}: not tiled");
            let g = gpu_tile::recognize(&p.kernels[0], &p.arch).unwrap().expect("tiled");
            let want = conv_vector_operands(&p.kernels[0], &g);
            assert_eq!((g.a.vector_along.is_some(), g.b.vector_along.is_some()), want, "{name} {chip}: vector loads");
            for (f, code) in &p.functions {
                let ptx = &code.asm;
                let file = dir.join(format!("{f}_{chip}.ptx"));
                std::fs::write(&file, ptx).unwrap();
                assert!(ptx.contains(".shared") && ptx.contains("bar.sync"), "{name} {chip} {f}:\n{ptx}");
                assert!(ptx.contains("ld.shared.") && ptx.contains("st.shared."), "{name} {chip} {f}: no shared loads");
                let (_, v4) = ptx_global_loads(ptx);
                assert_eq!(v4 > 0, want.0 || want.1, "{name} {chip} {f}: {v4} vector global loads");
                assemble(ptxas.as_ref(), &file, chip, &format!("{name} {chip}"));
            }
        }
        for chip in gpu::ROCM_ARCHS {
            let p = program(&m, Family::Rocm, chip);
            assert!(p.manifest.kernels.iter().all(|l| l.tile.is_some()), "{name} {chip}: not tiled");
            for (f, code) in &p.functions {
                let s = &code.asm;
                assert!(s.contains("s_barrier"), "{name} {chip} {f}: no s_barrier");
                assert!(s.contains("ds_write") || s.contains("ds_store"), "{name} {chip} {f}: no LDS stores");
                assert!(s.contains("ds_read") || s.contains("ds_load"), "{name} {chip} {f}: no LDS loads");
                let o = code.object.as_ref().unwrap();
                assert!(o.starts_with(b"\x7fELF") && u16::from_le_bytes([o[18], o[19]]) == 224);
            }
        }
    }
    // The PTX of the 3×3 Conv with padding, bias and a fused Relu (as the GEMM's is).
    let (_, m, _) = tiled_conv_cases().swap_remove(0);
    let p = program(&fused(m, "cuda"), Family::Cuda, "sm_80");
    insta::assert_snapshot!("gpu_tiled_conv_3x3_pad1_relu_sm_80", p.functions[0].1.asm);
}

/// The test of a tiled operand's vector loads (`gpu_tile::contiguous_base`): the row-major
/// offset of an index is the variable plus a multiple of 4 (its base), read through the
/// digits a lowering splits a variable into, for a Conv's weights, a 1×1 Conv's input and
/// MatMul operands; `None` wherever it is not.
#[test]
fn gpu_tile_contiguous_offsets() {
    use gpu_tile::contiguous_base as base;
    use kiln_ir::kernel::Idx;
    let v = Idx::Var;
    let b = |x: Idx| Box::new(x);
    let (add, mul) = (|x: Idx, y: Idx| Idx::Add(b(x), b(y)), |x: Idx, c: i64| Idx::Mul(b(x), b(Idx::Const(c))));
    let (div, rem) =
        (|x: Idx, c: i64| Idx::Div(b(x), b(Idx::Const(c))), |x: Idx, c: i64| Idx::Rem(b(x), b(Idx::Const(c))));
    // Loop variables: the reduction k, the row, the column, the batch.
    let (k, row, col, batch) = (1, 2, 3, 4);
    // k % 3 + (k / 3 % 3)·3 + (k / 9)·9 is k, in any order; with (k / 9)·3 it is not.
    let parts = [rem(v(k), 3), mul(rem(div(v(k), 3), 3), 3), mul(div(v(k), 9), 9)];
    for [x, y, z] in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let i = add(add(parts[x].clone(), parts[y].clone()), parts[z].clone());
        assert_eq!(base(&[64], &[i], k), Some(Idx::Const(0)), "{x}{y}{z}");
    }
    let off = add(add(rem(v(k), 3), mul(rem(div(v(k), 3), 3), 3)), mul(div(v(k), 9), 3));
    assert_eq!(base(&[64], &[off], k), None);
    // A Conv's weights w[m, k / (KH·KW), k / KW % KH, k % KW]: rows of C·KH·KW.
    let w = |kh: i64, kw: i64| vec![v(row), div(v(k), kh * kw), rem(div(v(k), kw), kh), rem(v(k), kw)];
    assert_eq!(base(&[8, 4, 3, 3], &w(3, 3), k), Some(mul(v(row), 36)));
    assert_eq!(base(&[8, 4, 1, 3], &w(1, 3), k), Some(mul(v(row), 12)));
    let one = vec![v(row), v(k), Idx::Const(0), Idx::Const(0)];
    assert_eq!(base(&[8, 16, 1, 1], &one, k), Some(mul(v(row), 16)));
    // Rows of 27 start unaligned; along the row the weights are strided.
    assert_eq!(base(&[8, 3, 3, 3], &w(3, 3), k), None);
    assert_eq!(base(&[8, 4, 3, 3], &w(3, 3), row), None);
    // A 1×1 Conv's input x[n, k, p / OW·s, p % OW·s]: contiguous along the pixels p at stride 1
    // over 6×6 images; not along k, not at stride 2, not over 7×7 images (unaligned rows).
    let x = |ow: i64, s: i64| vec![v(batch), v(k), mul(div(v(col), ow), s), mul(rem(v(col), ow), s)];
    assert_eq!(base(&[2, 5, 6, 6], &x(6, 1), col), Some(add(mul(v(k), 36), mul(v(batch), 180))));
    assert_eq!(base(&[2, 5, 6, 6], &x(6, 1), k), None);
    assert_eq!(base(&[2, 5, 12, 12], &x(6, 2), col), None);
    assert_eq!(base(&[1, 4, 7, 7], &x(7, 1), col), None);
    // MatMul's a[batch, row, k]: along its last index where rows are whole 4-groups.
    let a = vec![v(batch), v(row), v(k)];
    assert_eq!(base(&[3, 5, 8], &a, k), Some(add(mul(v(row), 8), mul(v(batch), 40))));
    assert_eq!(base(&[3, 5, 6], &a, k), None);
    assert_eq!(base(&[3, 5, 8], &a, row), None);
    // The variable in two indices (a diagonal) is not contiguous.
    assert_eq!(base(&[8, 8], &[v(k), v(k)], k), None);
}

/// Which operands of a tiled Conv (`k` read back as `g`) are to be loaded 4 lanes at a time:
/// the weights where a row (`C·KH·KW`, the K extent) and the K step are whole 4-groups; the
/// input where the Conv is 1×1 with the output's pixels the input's (stride 1, no padding, for
/// the shapes checked here) and `H·W` and the tile's columns are whole 4-groups.
fn conv_vector_operands(k: &kiln_ir::kernel::Kernel, g: &gpu_tile::TiledGemm) -> (bool, bool) {
    let dims = |buf: usize| -> Vec<u64> { k.buffers[buf].shape.iter().map(|d| d.known().unwrap()).collect() };
    let (w, x, y) = (dims(g.a.buf), dims(g.b.buf), dims(g.out));
    let weights = (w[1] * w[2] * w[3]).is_multiple_of(4) && g.tile.tk.is_multiple_of(4);
    let input = w[2..] == [1, 1] && x[2..] == y[2..] && (x[2] * x[3]).is_multiple_of(4) && g.tile.tn.is_multiple_of(4);
    (weights, input)
}

/// The global-memory load instructions of PTX text: (scalar, 4-lane vector).
fn ptx_global_loads(ptx: &str) -> (usize, usize) {
    let loads: Vec<&str> = ptx.lines().map(str::trim).filter(|l| l.starts_with("ld.global.")).collect();
    let v4 = loads.iter().filter(|l| l.contains(".v4.")).count();
    (loads.len() - v4, v4)
}

/// Whole CNNs compiled for cuda: every Conv (all have one group) is a block-tiled launch in
/// the plan, and the plan run whole on the emulated GPU (tiled launches block by block) still
/// matches the reference interpreter. `KILN_GPU_CONV_MODELS` (comma-separated) picks the
/// models; SqueezeNet and ResNet-50 by default.
#[test]
fn gpu_tiled_convs_in_whole_models_on_the_emulated_gpu() {
    let models = std::env::var("KILN_GPU_CONV_MODELS").unwrap_or_else(|_| "light_squeezenet,light_resnet50".into());
    println!(
        "| model | Convs | tiled Conv launches | launches | Conv global loads per FMA (untiled: 2) \
         | Conv ld.global in PTX: scalar, v4 | inputs loaded as v4 | plan matches ref |"
    );
    for name in models.split(',') {
        let src = data_dir().join("light-random").join(name);
        let m =
            kiln::load_model(&src.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e} (run scripts/setup.sh)"));
        let m = fused(m, "cuda");
        let conv_nodes = conv_kernel_nodes(&m);
        let dir = temp_dir(&format!("gpu-conv-plan-{name}"));
        let p = write_program(&m, &dir);
        let tiled = p.manifest.kernels.iter().filter(|l| l.tile.is_some() && conv_nodes.contains(&l.node)).count();
        assert_eq!(tiled, conv_nodes.len(), "{name}: Convs not tiled");
        // Global-memory loads per multiply-add of the tiled Convs (each block's tiles, padding
        // included), against 2 for a thread per output element.
        // And the global load instructions of their PTX (scalar, 4-lane), the weights loaded as
        // vectors wherever a row is whole 4-groups, the input of the 1×1 stride-1 Convs over
        // whole 4-groups of pixels.
        let (mut fmas, mut loads, mut scalar, mut v4, mut vector_x) = (0u64, 0u64, 0, 0, 0);
        for (l, k) in p.manifest.kernels.iter().zip(&p.kernels) {
            if conv_nodes.contains(&l.node) {
                let g = gpu_tile::recognize(k, &p.arch).unwrap().expect("tiled");
                fmas += g.fmas();
                loads += g.global_loads();
                let want = conv_vector_operands(k, &g);
                assert_eq!((g.a.vector_along.is_some(), g.b.vector_along.is_some()), want, "{name} {}", l.name);
                vector_x += usize::from(want.1);
                let ptx = &p.functions.iter().find(|(f, _)| *f == l.function).unwrap().1.asm;
                let (s, v) = ptx_global_loads(ptx);
                (scalar, v4) = (scalar + s, v4 + v);
            }
        }
        let input = vec![kiln_onnx::read_tensor_file(&src.join("test_data_set_0/input_0.pb")).unwrap()];
        let want = kiln_ir::interp::run(&m, input.clone()).unwrap();
        let r = run_plan(&p, &dir, &input).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_matches(name, &r.outputs, &want, 1e-3, 1e-5);
        println!(
            "| {name} | {} | {tiled} | {} | {:.3} | {scalar}, {v4} | {vector_x} | yes |",
            conv_nodes.len(),
            r.launches,
            loads as f64 / fmas as f64
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Grouped and depthwise Convs (AlexNet's, ShuffleNet's) lower per output element on the GPU
/// as one-group Convs do: a thread per output element (the kernel's output elements, counted
/// from its shape), each thread's local buffers (the plan's stack) within what the chip's
/// registers hold (4 bytes × its registers per thread), where the accumulate form gave a
/// thread a whole channel block and a local panel of its weights (AlexNet: 221,184 bytes a
/// thread, 8 to 12 threads a Conv). Their numerics: `untiled_conv_cases`.
#[test]
fn gpu_grouped_convs_take_a_thread_per_output_and_no_stack() {
    println!("| model | grouped Convs | their threads | plan stack bytes (bound) |");
    for name in ["light_bvlc_alexnet", "light_shufflenet", "light_squeezenet"] {
        let src = data_dir().join("light-random").join(name);
        let m =
            kiln::load_model(&src.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e} (run scripts/setup.sh)"));
        let grouped = m
            .body
            .ops
            .iter()
            .filter(|&&o| {
                m.op(o).op_type() == "Conv" && matches!(m.op(o).attrs.get("group"), Some(Attr::Int(g)) if *g > 1)
            })
            .count();
        let m = fused(m, "cuda");
        let conv_nodes = conv_kernel_nodes(&m);
        let p = program(&m, Family::Cuda, "sm_80");
        let (plan, _) = kiln_targets::gpu_plan::plan(&m, &p);
        assert!(plan.runnable, "{name}: {:?}", plan.why_not);
        let bound = 4 * p.arch.limits().max_registers_per_thread as u64;
        let (mut launched, mut threads) = (0, 0);
        for l in p.manifest.kernels.iter() {
            assert!(l.local_bytes.unwrap_or(0) <= bound, "{name} {}: {:?} local bytes", l.name, l.locals);
            // A grouped Conv's kernel: the input's channels (operand 0) are not the weights'
            // (operand 1: `C / G`).
            if conv_nodes.contains(&l.node) && l.args[0].shape[1] != l.args[1].shape[1] {
                launched += 1;
                let outputs: u64 = l
                    .args
                    .iter()
                    .filter(|a| a.role == "output")
                    .map(|a| a.shape.iter().map(|d| d.parse::<u64>().unwrap()).product::<u64>())
                    .sum();
                assert_eq!(l.threads_known, Some(outputs), "{name} {}: threads", l.name);
                threads += outputs;
            }
        }
        assert_eq!(launched, grouped, "{name}: grouped Convs' kernels");
        assert!(plan.stack_bytes <= bound, "{name}: {} stack bytes", plan.stack_bytes);
        println!("| {name} | {grouped} | {threads} | {} ({bound}) |", plan.stack_bytes);
    }
}

/// Each chip's description: its GPU limits, the block size derived from them, and JSON
/// descriptions written before the GPU limits existed still load; a tile the description
/// cannot hold is an error.
#[test]
fn gpu_descriptions_per_chip() {
    use kiln_ir::machine::MachineDescription;
    println!("| chip | SMs/CUs | GHz | f32 TFLOP/s | GB/s | warp | block | shared/block (static) | regs/SM |");
    for chip in gpu::CUDA_ARCHS.iter().chain(gpu::ROCM_ARCHS) {
        let family = if chip.starts_with("sm_") { Family::Cuda } else { Family::Rocm };
        let arch = GpuArch::new(family, Some(chip)).unwrap();
        let d = arch.description();
        let l = d.gpu.clone().unwrap();
        assert_eq!(arch.block_threads(), 256, "{chip}");
        assert_eq!(l.warp, if family == Family::Cuda { 32 } else { 64 });
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<MachineDescription>(&json).unwrap(), d);
        println!(
            "| {chip} | {} | {} | {} | {} | {} | {} | {} ({}) | {} |",
            d.cores,
            d.clock_ghz,
            d.vector_gflops / 1000.0,
            d.levels[0].bandwidth_gbps,
            l.warp,
            l.max_threads_per_block,
            l.shared_bytes_per_block,
            l.static_shared_bytes_per_block,
            l.registers_per_sm
        );
        // The target's description is the chip's (the cost model prices fusion with it).
        let t = kiln_targets::lookup_gpu(
            family.name(),
            &kiln_targets::TargetOptions { gpu_arch: Some(chip.to_string()), ..Default::default() },
        )
        .unwrap();
        assert_eq!(kiln_targets::Target::machine(&t), d);
    }
    assert_eq!(GpuArch::new(Family::Cuda, Some("sm_90")).unwrap().description().cores, 132);
    // Without the field (a description from before it, the CPU's): loads, no GPU limits.
    let cpu = kiln_targets::descriptions::Described::cpu();
    let json = serde_json::to_string(&kiln_targets::Target::machine(&cpu)).unwrap();
    assert!(!json.contains("\"gpu\""));
    assert_eq!(serde_json::from_str::<MachineDescription>(&json).unwrap().gpu, None);
    // A description whose static shared memory cannot hold a tile: an error naming it.
    let mut d = GpuArch::new(Family::Cuda, None).unwrap().description();
    d.gpu.as_mut().unwrap().static_shared_bytes_per_block = 1024;
    let e = gpu_tile::choose_tile(1, 1024, 1024, &d).unwrap_err().to_string();
    assert!(e.contains("shared memory") && e.contains("1024"), "{e}");
    d.gpu = None;
    assert!(gpu_tile::choose_tile(1, 64, 64, &d).is_err());
}

/// The closing note's numbers (printed, not asserted): per GEMM shape and chip, global-memory
/// loads per multiply-add before (a thread per output element: 2) and after tiling, the
/// launch, shared bytes, and a roofline time from the description (f32 FMA peak; HBM
/// bandwidth for the tiles' loads, as if no cache served them, plus the output).
#[test]
#[ignore]
fn gpu_tiled_gemm_numbers() {
    println!(
        "| GEMM | chip | loads/FMA before → after | blocks × threads | warps/SM | tile | matrix unit | shared B | roofline µs (before → after) |"
    );
    for (m, k, n) in [(128u64, 768u64, 768u64), (128, 768, 3072), (1024, 1024, 1024)] {
        let model = fused(matmul_model(&[m, k], &[k, n]), "cuda");
        for (family, chip) in
            [(Family::Cuda, "sm_80"), (Family::Cuda, "sm_90"), (Family::Rocm, "gfx906"), (Family::Rocm, "gfx90a")]
        {
            let arch = GpuArch::new(family, Some(chip)).unwrap();
            let d = arch.description();
            let schedule = gpu::schedule();
            let (o, name) = kiln_targets::native::launched_kernels(&model)[0].clone();
            let kernel = gpu::lower(&model, o, &name, &schedule).unwrap();
            let g = gpu_tile::recognize(&kernel, &arch).unwrap().expect("tiled");
            let fmas = g.fmas() as f64;
            let after = g.global_loads() as f64 / fmas;
            let bw = d.levels[0].bandwidth_gbps * 1e9;
            // The matrix unit's rate for its tiles (the description's, 3xTF32 on NVIDIA).
            let compute_before = 2.0 * fmas / (d.vector_gflops * 1e9);
            let compute = match g.tile.mma {
                Some(_) => 2.0 * fmas / (d.matrix_gflops * 1e9),
                None => compute_before,
            };
            let out = (m * n * 4) as f64;
            let t_before = compute_before.max((2.0 * fmas * 4.0 + out) / bw) * 1e6;
            let t_after = compute.max((g.global_loads() as f64 * 4.0 + out) / bw) * 1e6;
            // Warps resident per SM/CU if the grid spreads evenly (the roofline assumes enough).
            let warps = (g.blocks() * g.tile.threads().div_ceil(arch.warp())) as f64 / d.cores as f64;
            println!(
                "| {m}×{k}·{k}×{n} | {chip} | 2 → {after:.3} | {} × {} | {warps:.1} | {}x{}x{} | {:?} | {} | {t_before:.1} → {t_after:.1} |",
                g.blocks(),
                g.tile.threads(),
                g.tile.tm,
                g.tile.tn,
                g.tile.tk,
                g.tile.mma,
                g.tile.shared_bytes()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host steps in GPU plans: ops the GPU does not run (host kernels, host shape arithmetic) run
// between launches on kiln-ir's reference interpreter, with tensors of any byte-sized element
// type between and at the edges.

/// Models mixing GPU kernels and host kernels: ArgMax (int64) after a MatMul, a Cast chain
/// through int32 and f16, an int64 Gather index path (an int64 graph input and an ArgMax result
/// indexing a table), with their inputs.
fn host_step_models() -> Vec<(&'static str, Module, Vec<Tensor>)> {
    let i64_type = |dims: &[u64]| TensorType::new(DType::I64, dims.iter().map(|&d| Dim::Known(d)).collect());
    let mut out = Vec::new();
    let mut g = GraphBuilder::new("matmul_argmax");
    let x = g.input("x", f32_type(&[16, 32])).unwrap();
    let w = g.constant("w", f32s(&[32, 24], 5));
    let y = g.op("MatMul", &[x, w]).unwrap();
    let r = g.op("Relu", &[y]).unwrap();
    let a = g.op_with("ArgMax", &[r], [("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))]).unwrap();
    g.output(a, "index").unwrap();
    g.output(r, "relu").unwrap();
    // (Input seed 2: every row's largest value leads the next by more than 1e-3; with seed 1
    // row 9 has an exact tie, which the summation order decides.)
    out.push(("matmul_argmax", g.finish().unwrap(), vec![f32s(&[16, 32], 2)]));

    let mut g = GraphBuilder::new("cast_chain");
    let x = g.input("x", f32_type(&[8, 40])).unwrap();
    let w = g.constant("w", f32s(&[40, 40], 6));
    let s = g.op("MatMul", &[x, w]).unwrap();
    let k = g.constant("k", Tensor::scalar_f32(5.0));
    let m = g.op("Mul", &[s, k]).unwrap();
    let i = g.op_with("Cast", &[m], [("to", Attr::Int(DType::I32.onnx_code() as i64))]).unwrap();
    let h = g.op_with("Cast", &[i], [("to", Attr::Int(DType::F16.onnx_code() as i64))]).unwrap();
    let f = g.op_with("Cast", &[h], [("to", Attr::Int(DType::F32.onnx_code() as i64))]).unwrap();
    let t = g.op_with("Softmax", &[f], [("axis", Attr::Int(-1))]).unwrap();
    g.output(t, "y").unwrap();
    g.output(h, "half").unwrap();
    out.push(("cast_chain", g.finish().unwrap(), vec![f32s(&[8, 40], 2)]));

    let mut g = GraphBuilder::new("gather_index");
    let x = g.input("x", f32_type(&[6, 10])).unwrap();
    let ids = g.input("ids", i64_type(&[5])).unwrap();
    let table = g.constant("table", f32s(&[10, 12], 3));
    let a = g.op_with("ArgMax", &[x], [("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))]).unwrap();
    let rows = g.op_with("Gather", &[table, a], [("axis", Attr::Int(0))]).unwrap();
    let more = g.op_with("Gather", &[table, ids], [("axis", Attr::Int(0))]).unwrap();
    let e = g.op("Exp", &[rows]).unwrap();
    let n = g.op("Neg", &[more]).unwrap();
    g.output(e, "rows").unwrap();
    g.output(n, "more").unwrap();
    out.push((
        "gather_index",
        g.finish().unwrap(),
        vec![f32s(&[6, 10], 4), Tensor::from_i64(&[5], vec![9, 0, 3, 3, 7])],
    ));
    out
}

#[test]
fn gpu_host_steps_run_between_launches_on_the_emulated_gpu() {
    println!("| model | launches | host steps | host ops |");
    for (name, m, inputs) in host_step_models() {
        let m = fused(m, "cuda");
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let dir = temp_dir(&format!("gpu-host-{name}"));
        let p = write_program(&m, &dir);
        let plan = kiln_runtime::gpu::read_plan(&dir).unwrap();
        assert!(!plan.launches.is_empty() && !plan.host_steps.is_empty(), "{name}: {plan:?}");
        // Each host step's module text reads back into the same text (attributes, constants).
        for h in &plan.host_steps {
            let back = kiln_ir::parser::parse_module(&h.module).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(kiln_ir::printer::print_module(&back, Default::default()), h.module, "{name}");
            assert_eq!(back.inputs().len(), h.inputs.len(), "{name} {}", h.kernel);
        }
        let r = run_plan(&p, &dir, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.launches, plan.launches.len(), "{name}");
        assert_eq!(r.outputs.len(), want.len());
        for (i, (g, w)) in r.outputs.iter().zip(&want).enumerate() {
            assert_eq!(g.dtype(), w.dtype(), "{name} output {i}");
            kiln_onnx::testcase::compare(g, w, 1e-4, 1e-5).unwrap_or_else(|e| panic!("{name} output {i}: {e}"));
        }
        let ops: Vec<&str> = plan.host_steps.iter().map(|h| h.op.as_str()).collect();
        println!("| {name} | {} | {} | {} |", r.launches, plan.host_steps.len(), ops.join(" "));
    }
    // The ArgMax step carries its attributes into its module.
    let (_, m, _) = host_step_models().remove(0);
    let m = fused(m, "cuda");
    let (plan, _) = kiln_targets::gpu_plan::plan(&m, &program(&m, Family::Cuda, "sm_80"));
    let argmax = plan.host_steps.iter().find(|h| h.op == "ArgMax").expect("an ArgMax host step");
    assert!(argmax.module.contains("axis = 1") && argmax.module.contains("keepdims = 0"), "{}", argmax.module);
    assert_eq!(argmax.outputs[0].dtype, "i64");
}

/// What the runtime still cannot hold is refused with the value named: a string tensor, and a
/// plan whose buffer has an element type this runtime does not know.
#[test]
fn gpu_plans_refuse_what_they_cannot_hold() {
    let mut g = GraphBuilder::new("strings");
    let x = g.input("x", TensorType::new(DType::String, vec![Dim::Known(2)])).unwrap();
    let y = g.op("Identity", &[x]).unwrap();
    let z = g.op_with("Cast", &[y], [("to", Attr::Int(DType::F32.onnx_code() as i64))]).unwrap();
    let r = g.op("Relu", &[z]).unwrap();
    g.output(r, "y").unwrap();
    let m = fused(g.finish().unwrap(), "cuda");
    let (plan, _) = kiln_targets::gpu_plan::plan(&m, &program(&m, Family::Cuda, "sm_80"));
    assert!(!plan.runnable);
    let why = plan.why_not.unwrap();
    assert!(why.contains("x is") && why.contains("no string tensors"), "{why}");

    let m = fused(host_step_models().remove(0).1, "cuda");
    let dir = temp_dir("gpu-host-bad-dtype");
    write_program(&m, &dir);
    let text = std::fs::read_to_string(dir.join("plan.json")).unwrap();
    std::fs::write(dir.join("plan.json"), text.replacen("\"i64\"", "\"c64\"", 1)).unwrap();
    let e = kiln_runtime::gpu::read_plan(&dir).unwrap_err().0;
    assert!(e.contains("element type c64") && e.contains("plan.json"), "{e}");
}

/// `.npy` files of the element types node tests have at their edges round-trip, and ints
/// compare exactly.
#[test]
fn gpu_npy_reads_and_writes_node_test_element_types() {
    let dir = temp_dir("gpu-npy-dtypes");
    let n = 6;
    let tensors = vec![
        Tensor::from_f64(DType::F64, &[2, 3], (0..n).map(|i| i as f64 / 3.0).collect()),
        Tensor::from_f64(DType::F16, &[2, 3], (0..n).map(|i| i as f64 / 4.0).collect()),
        Tensor::from_i64_as(DType::I8, &[n], (0..n as i64).map(|i| i - 3).collect()),
        Tensor::from_i64_as(DType::I16, &[n], (0..n as i64).map(|i| i * 1000).collect()),
        Tensor::from_i64_as(DType::I32, &[n], (0..n as i64).map(|i| -i * 100_000).collect()),
        Tensor::from_i64(&[3, 2], (0..n as i64).map(|i| i << 40).collect()),
        Tensor::from_i64_as(DType::U8, &[n], (0..n as i64).map(|i| 250 - i).collect()),
        Tensor::from_bool(&[n], (0..n).map(|i| i % 2 == 0).collect()),
        Tensor::from_f32(&[], vec![1.5]),
    ];
    for (i, t) in tensors.iter().enumerate() {
        let f = dir.join(format!("t{i}.npy"));
        npy::write(&f, &to_array(t)).unwrap();
        let back = npy::read(&f).unwrap();
        assert_eq!(from_array(&back), *t, "{}", t.dtype());
        assert_eq!(npy::mismatch(&back, &to_array(t), 0.0, 0.0), None);
    }
    let a = to_array(&Tensor::from_i64(&[2], vec![1000, 7]));
    let b = to_array(&Tensor::from_i64(&[2], vec![1001, 7]));
    assert!(npy::mismatch(&a, &b, 1e-3, 1e-4).is_some_and(|w| w.contains("1 of 2")));
}

/// Attention on the GPU runs a thread per query (batch × heads × queries) with an online
/// softmax: grouped-query heads, a boolean mask with a row masked out entirely (zeros, as the
/// reference gives), an additive mask, and causal attention with more keys than queries match
/// the reference interpreter as their launches run; the output row stays in registers (no
/// local memory in the PTX at a head dim of 64), and the PTX assembles.
#[test]
fn gpu_attention_runs_a_thread_per_query() {
    let ptxas = ptxas();
    let dir = temp_dir("gpu-attention");
    let (b, hq, hkv, s, t, d) = (2usize, 8usize, 2usize, 24usize, 40usize, 64usize);
    let mask: Vec<bool> = (0..s * t).map(|x| x / t != 5 && (x * 7) % 5 != 0).collect();
    let cases: Vec<(&str, Vec<Tensor>, Vec<(&'static str, Attr)>)> = vec![
        ("gqa bool mask", vec![Tensor::from_bool(&[s, t], mask)], vec![]),
        ("additive mask", vec![f32s(&[s, t], 4)], vec![]),
        ("causal", vec![], vec![("is_causal", Attr::Int(1))]),
    ];
    for (name, extra, attrs) in cases {
        let mut g = GraphBuilder::new("attention").opset(23).unwrap();
        let (sq, kv_heads) = if name == "causal" { (t, hq) } else { (s, hkv) };
        let q = g.input("q", f32_type(&[b as u64, hq as u64, sq as u64, d as u64])).unwrap();
        let k = g.input("k", f32_type(&[b as u64, kv_heads as u64, t as u64, d as u64])).unwrap();
        let v = g.input("v", f32_type(&[b as u64, kv_heads as u64, t as u64, d as u64])).unwrap();
        let mut ins = vec![q, k, v];
        for m in &extra {
            ins.push(g.constant("mask", m.clone()));
        }
        let y = g.op_with("Attention", &ins, attrs).unwrap();
        g.output(y, "y").unwrap();
        let m = fused(g.finish().unwrap(), "cuda");
        let inputs = vec![f32s(&[b, hq, sq, d], 1), f32s(&[b, kv_heads, t, d], 2), f32s(&[b, kv_heads, t, d], 3)];
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let arch = GpuArch::new(Family::Cuda, Some("sm_80")).unwrap();
        let (got, kernels, _, _) = run_as_gpu_on(&m, inputs, &arch);
        assert_eq!(kernels, 1, "{name}");
        assert_matches(name, &got, &want, 1e-4, 1e-5);
        let p = program(&m, Family::Cuda, "sm_80");
        let threads = p.manifest.kernels[0].threads_known;
        assert_eq!(threads, Some((b * hq * sq) as u64), "{name}: one thread per query");
        let ptx = &p.functions[0].1.asm;
        assert!(!ptx.contains(".local"), "{name}: the output row spilled to local memory");
        let file = dir.join("attention.ptx");
        std::fs::write(&file, ptx).unwrap();
        let report = assemble(ptxas.as_ref(), &file, "sm_80", name);
        assert!(report.contains("0 bytes spill stores"), "{name}: {report}");
        println!("{name}: {}", report.lines().filter(|l| l.contains("registers")).collect::<Vec<_>>().join(" "));
    }
}

// ---------------------------------------------------------------------------------------------
// The matrix unit's fragment layouts (gpu_tile::MatrixInst).

use kiln_ir::kernel::{ByZero, Idx};
use kiln_targets::gpu_tile::{choose_tile, MatrixInst};

fn frag_at(f: impl Fn(&Idx, u64) -> (Idx, Idx), lane: i64, r: u64) -> (i64, i64) {
    let (x, y) = f(&Idx::Const(lane), r);
    let ev = |i: &Idx| i.eval(&|_| None, &|_, _| None, ByZero::Fail).unwrap();
    (ev(&x), ev(&y))
}

/// Entries of the PTX ISA's m16n8k8 .tf32 fragment tables (groupID = lane >> 2,
/// threadID_in_group = lane % 4) and of CDNA's v_mfma_f32_16x16x4f32 layout.
#[test]
fn fragment_layouts_are_the_isas() {
    let i = MatrixInst::MmaTf32x3;
    // a0..a3 of lane 5 (group 1, thread 1): rows 1, 9, 1, 9; columns 1, 1, 5, 5.
    let a: Vec<_> = (0..4).map(|r| frag_at(|l, r| i.a_at(l, r), 5, r)).collect();
    assert_eq!(a, vec![(1, 1), (9, 1), (1, 5), (9, 5)]);
    // b0, b1 of lane 5: rows (k) 1 and 5, column 1.
    assert_eq!((frag_at(|l, r| i.b_at(l, r), 5, 0), frag_at(|l, r| i.b_at(l, r), 5, 1)), ((1, 1), (5, 1)));
    // c0..c3 of lane 31 (group 7, thread 3): rows 7, 7, 15, 15; columns 6, 7, 6, 7.
    let c: Vec<_> = (0..4).map(|r| frag_at(|l, r| i.c_at(l, r), 31, r)).collect();
    assert_eq!(c, vec![(7, 6), (7, 7), (15, 6), (15, 7)]);
    let i = MatrixInst::MfmaF32;
    // Lane 17: a[1][1], b[1][1]; its accumulators rows 4..8 of column 1.
    assert_eq!((frag_at(|l, r| i.a_at(l, r), 17, 0), frag_at(|l, r| i.b_at(l, r), 17, 0)), ((1, 1), (1, 1)));
    let c: Vec<_> = (0..4).map(|r| frag_at(|l, r| i.c_at(l, r), 17, r)).collect();
    assert_eq!(c, vec![(4, 1), (5, 1), (6, 1), (7, 1)]);
    assert_eq!(frag_at(|l, r| i.a_at(l, r), 63, 0), (15, 3));
}

/// Each layout puts every element of its matrix in exactly one (lane, register).
#[test]
fn fragment_layouts_cover_each_matrix_once() {
    for i in [MatrixInst::MmaTf32x3, MatrixInst::MfmaF32] {
        let [m, n, k] = i.shape().map(|x| x as i64);
        let [ar, br, cr] = i.regs();
        type At = fn(MatrixInst, &Idx, u64) -> (Idx, Idx);
        for (f, regs, rows, cols) in
            [(MatrixInst::a_at as At, ar, m, k), (MatrixInst::b_at as At, br, k, n), (MatrixInst::c_at as At, cr, m, n)]
        {
            let mut seen = std::collections::HashSet::new();
            for lane in 0..i.lanes() as i64 {
                for r in 0..regs {
                    let (x, y) = frag_at(|l, r| f(i, l, r), lane, r);
                    assert!((0..rows).contains(&x) && (0..cols).contains(&y), "{i:?} lane {lane} reg {r}");
                    assert!(seen.insert((x, y)), "{i:?}: ({x}, {y}) twice");
                }
            }
            assert_eq!(seen.len() as i64, rows * cols, "{i:?}");
        }
    }
}

/// Chips with a matrix unit kiln drives get matrix-unit tiles (when the output holds one
/// instruction's), checked against their limits; gfx906 has none.
#[test]
fn matrix_unit_tiles_follow_the_description() {
    for (chip, want) in [
        ("sm_80", Some(MatrixInst::MmaTf32x3)),
        ("sm_90", Some(MatrixInst::MmaTf32x3)),
        ("gfx906", None),
        ("gfx90a", Some(MatrixInst::MfmaF32)),
        ("gfx942", Some(MatrixInst::MfmaF32)),
    ] {
        let d = kiln_targets::descriptions::gpu_machine(chip).unwrap();
        let t = choose_tile(1, 4096, 4096, &d).unwrap();
        assert_eq!(t.mma, want, "{chip}");
        if let Some(i) = want {
            let [m, n, k] = i.shape();
            assert_eq!((t.tm, t.tn, t.rm, t.rn, t.tk % k), (64, 64, 32, 32, 0), "{chip}");
            assert_eq!(t.threads(), 4 * i.lanes(), "{chip}");
            assert_eq!(t.accumulators(), (32 / m) * (32 / n) * i.regs()[2], "{chip}");
            // Too small for one instruction: the scalar tile.
            assert_eq!(choose_tile(1, m - 1, 64, &d).unwrap().mma, None, "{chip}");
            assert_eq!(choose_tile(1, 64, n - 1, &d).unwrap().mma, None, "{chip}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels a block per row (gpu_rows).

/// Row kernels run a block per row: LayerNorm over rows wider than a block (1000 columns,
/// 256 threads: four strided columns a thread, the last partial), Softmax (a max and a sum
/// reduction, the output read back) over rows narrower than a warp, a mean over the last axis
/// (the row's result stored by one thread), LayerNorm with a fused GELU epilogue, and a 3-D
/// LayerNorm (with a batch of one, a loop around the rows' parallel loop, run by every block);
/// each is
/// a block per row in the manifest, matches the reference interpreter as its blocks run on the
/// host, and its PTX assembles (sm_80; gfx90a objects build).
#[test]
fn gpu_row_kernels_run_a_block_per_row() {
    let ptxas = ptxas();
    let dir = temp_dir("gpu-rows");
    let ln = |shape: &[u64], gelu: bool| {
        let cols = *shape.last().unwrap();
        let mut g = GraphBuilder::new("ln");
        let x = g.input("x", f32_type(shape)).unwrap();
        let s = g.constant("s", f32s(&[cols as usize], 1));
        let b = g.constant("b", f32s(&[cols as usize], 2));
        let mut y = g.op_with("LayerNormalization", &[x, s, b], [("axis", Attr::Int(-1))]).unwrap();
        if gelu {
            y = g.op("Gelu", &[y]).unwrap();
        }
        g.output(y, "y").unwrap();
        g.finish().unwrap()
    };
    let softmax = |rows: u64, cols: u64| {
        let mut g = GraphBuilder::new("softmax");
        let x = g.input("x", f32_type(&[rows, cols])).unwrap();
        let y = g.op_with("Softmax", &[x], [("axis", Attr::Int(-1))]).unwrap();
        g.output(y, "y").unwrap();
        g.finish().unwrap()
    };
    let mean = {
        let mut g = GraphBuilder::new("mean");
        let x = g.input("x", f32_type(&[6, 300])).unwrap();
        let axes = g.constant("axes", Tensor::from_i64(&[1], vec![-1]));
        let y = g.op_with("ReduceMean", &[x, axes], [("keepdims", Attr::Int(1))]).unwrap();
        g.output(y, "y").unwrap();
        g.finish().unwrap()
    };
    let cases: Vec<(&str, Module, Vec<usize>, u64)> = vec![
        ("layernorm 5x1000", ln(&[5, 1000], false), vec![5, 1000], 256),
        ("layernorm+gelu 16x768", ln(&[16, 768], true), vec![16, 768], 256),
        // A batch loop around the rows (as a 3-D LayerNorm lowers): every block runs it.
        ("layernorm 1x7x300", ln(&[1, 7, 300], false), vec![1, 7, 300], 256),
        ("layernorm 2x7x300", ln(&[2, 7, 300], false), vec![2, 7, 300], 256),
        ("softmax 3x20", softmax(3, 20), vec![3, 20], 32),
        ("reducemean 6x300", mean, vec![6, 300], 256),
    ];
    for (name, m, shape, threads) in cases {
        let m = fused(m, "cuda");
        let inputs = vec![f32s(&shape, 9)];
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        for (family, chip) in [(Family::Cuda, "sm_80"), (Family::Rocm, "gfx90a")] {
            let arch = GpuArch::new(family, Some(chip)).unwrap();
            let (got, kernels, _, _) = run_as_gpu_on(&m, inputs.clone(), &arch);
            assert_eq!(kernels, 1, "{name}: one kernel");
            assert_matches(name, &got, &want, 1e-4, 1e-5);
            let p = program(&m, family, chip);
            let l = &p.manifest.kernels[0];
            let block = if family == Family::Rocm { threads.max(64) } else { threads };
            assert_eq!(l.row_block, Some(block), "{name} {chip}: {l:?}");
            let rows = shape[..shape.len() - 1].iter().product::<usize>() as u64;
            assert_eq!((l.grid, l.block, l.shared_bytes), (Some([rows, 1, 1]), [block, 1, 1], 4 * block));
            if family == Family::Cuda {
                let file = dir.join("rows.ptx");
                std::fs::write(&file, &p.functions[0].1.asm).unwrap();
                assemble(ptxas.as_ref(), &file, "sm_80", name);
            }
        }
    }
}

/// The nodes of `m`'s kernels that are Convs (alone or anchoring a fused group).
fn conv_kernel_nodes(m: &Module) -> std::collections::HashSet<String> {
    kiln_targets::native::launched_kernels(m)
        .iter()
        .map(|(o, _)| m.op(*o))
        .filter(|op| op.op_type() == "Conv" || matches!(op.attrs.get("anchor"), Some(Attr::Str(a)) if a == "Conv"))
        .map(|op| op.node_name().to_string())
        .collect()
}

/// Launch dimensions fit the driver's 32 bits or are refused.
#[test]
fn gpu_launch_dims_fit_the_drivers_32_bits_or_are_refused() {
    use kiln_targets::gpu_plan::driver_dims;
    let max = u64::from(u32::MAX);
    assert_eq!(driver_dims([5, 4, 1]), Some([5, 4, 1]));
    assert_eq!(driver_dims([max, 1, 1]), Some([u32::MAX, 1, 1]));
    assert_eq!(driver_dims([1, max + 1, 1]), None);
    assert_eq!(driver_dims([1 << 40]), None);
}
