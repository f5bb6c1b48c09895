//! The `kiln` command line (contract: ../shared/CLI.md, kept in the README).

use clap::{Parser, Subcommand};
use kiln::{Error, Tensor};
use kiln_targets::jit::Artifact;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "kiln", version, about = "kiln: an AI compiler for domestic AI accelerators")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a model on a target and write its outputs as TensorProto files.
    Run {
        model: PathBuf,
        #[arg(long, default_value = "ref")]
        target: String,
        /// Input file (.pb TensorProto or .npy), bound in graph-input order; `NAME=FILE` binds by name.
        #[arg(long = "input")]
        inputs: Vec<String>,
        #[arg(long, default_value = "kiln-out")]
        output_dir: PathBuf,
        /// Also write each output as `output_<i>.npy`.
        #[arg(long)]
        npy: bool,
        /// Bind a symbolic dimension: `NAME=N` (checked against the inputs).
        #[arg(long = "dim")]
        dims: Vec<String>,
        /// Turn e-graph rewriting and fusion off: every graph op is its own kernel.
        #[arg(long)]
        no_fusion: bool,
        #[command(flatten)]
        npu: NpuArgs,
        /// Also run the reference interpreter and name the first kernel whose outputs differ
        /// beyond the tolerance.
        #[arg(long)]
        check: bool,
        /// Relative tolerance of `--check`.
        #[arg(long, default_value_t = 1e-3)]
        rtol: f64,
        /// Absolute tolerance of `--check`.
        #[arg(long, default_value_t = 1e-5)]
        atol: f64,
        /// Threads for native kernels (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// rvv: the vector register length in bits (128, 256, 512 or 1024; default 256).
        #[arg(long, value_parser = parse_vlen)]
        rvv_vlen: Option<u32>,
        /// Compile each kernel with its best schedule in this tuning database (`kiln tune`);
        /// kernels it does not know keep the default. Reads the file, measures nothing.
        #[arg(long)]
        tuning_db: Option<PathBuf>,
    },
    /// Compile a model for a target and print or write each requested stage.
    Compile {
        model: PathBuf,
        #[arg(long, default_value = "ref")]
        target: String,
        /// Output directory for the emitted stages.
        #[arg(short = 'o')]
        out: Option<PathBuf>,
        /// Stage to emit: graph, fused, kernel, mlir, llvm, asm.
        #[arg(long = "emit")]
        emit: Vec<String>,
        /// Print every constant in full (large ones are elided by default).
        #[arg(long)]
        full_constants: bool,
        /// Turn e-graph rewriting and fusion off: every graph op is its own kernel.
        #[arg(long)]
        no_fusion: bool,
        #[command(flatten)]
        npu: NpuArgs,
        /// rvv: the vector register length in bits (128, 256, 512 or 1024; default 256).
        #[arg(long, value_parser = parse_vlen)]
        rvv_vlen: Option<u32>,
        /// cuda, rocm: the chip (cuda: sm_80 default, sm_90; rocm: gfx90a default, gfx906,
        /// gfx942).
        #[arg(long = "gpu-arch", visible_alias = "cuda-arch")]
        gpu_arch: Option<String>,
        /// Compile each kernel with its best schedule in this tuning database (`kiln tune`);
        /// kernels it does not know keep the default. Reads the file, measures nothing.
        #[arg(long)]
        tuning_db: Option<PathBuf>,
    },
    /// Describe a model: ops by type, inputs, outputs, unsupported ops (all at once).
    Inspect {
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        target: String,
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Turn e-graph rewriting and fusion off: every graph op is its own kernel.
        #[arg(long)]
        no_fusion: bool,
        #[command(flatten)]
        npu: NpuArgs,
        /// Size a symbolic dimension for the figures and the cost model: `NAME=N` (default 1).
        #[arg(long = "dim")]
        dims: Vec<String>,
    },
    /// Measure compile time and run latency on a target.
    Bench {
        model: PathBuf,
        #[arg(long, default_value = "ref")]
        target: String,
        #[arg(long = "input")]
        inputs: Vec<String>,
        #[arg(long = "dim")]
        dims: Vec<String>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
        /// Turn e-graph rewriting and fusion off: every graph op is its own kernel.
        #[arg(long)]
        no_fusion: bool,
        #[command(flatten)]
        npu: NpuArgs,
        /// Also print each kernel's time in one more run (to stderr), slowest first.
        #[arg(long)]
        profile: bool,
        /// rvv: the vector register length in bits (128, 256, 512 or 1024; default 256).
        #[arg(long, value_parser = parse_vlen)]
        rvv_vlen: Option<u32>,
        /// Compile each kernel with its best schedule in this tuning database (`kiln tune`);
        /// kernels it does not know keep the default. Reads the file, measures nothing.
        #[arg(long)]
        tuning_db: Option<PathBuf>,
    },
    /// Tune each kernel's schedule by measuring candidates on the target (cpu: wall time;
    /// npu: simulated cycles); every measurement is appended to the tuning database.
    Tune {
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        target: String,
        /// The tuning database (JSON lines), created or appended to.
        #[arg(long)]
        tuning_db: PathBuf,
        /// Measurements per kernel workload.
        #[arg(long, default_value_t = 32)]
        trials: usize,
        /// Stop after this many seconds (between measurements).
        #[arg(long)]
        budget_s: Option<f64>,
        /// Continue an interrupted run: the database's records count toward the trials.
        #[arg(long)]
        resume: bool,
        /// Search strategy: learned (evolutionary, ranked by a cost model fitted online) or random.
        #[arg(long, default_value = "learned")]
        strategy: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size symbolic dims for measuring: `NAME=N` (default 1).
        #[arg(long = "dim")]
        dims: Vec<String>,
        /// Turn e-graph rewriting and fusion off.
        #[arg(long)]
        no_fusion: bool,
        #[command(flatten)]
        npu: NpuArgs,
        /// rvv: the vector register length in bits the estimates are for (128, 256, 512 or
        /// 1024; default 256).
        #[arg(long, value_parser = parse_vlen)]
        rvv_vlen: Option<u32>,
        #[arg(long)]
        threads: Option<usize>,
        /// Print the report as one JSON object (kernels with best-so-far per trial).
        #[arg(long)]
        json: bool,
        /// Do not measure the whole model before and after.
        #[arg(long)]
        no_model_bench: bool,
        /// Tune nothing: measure again the schedules listed in FILE (a JSON array of
        /// `{"workload": key, "knobs": {...}}`), all of a workload together in interleaved
        /// rounds, and print `{"costs": [...], "estimates": [...]}` (median over rounds; null:
        /// failed; `--rounds 0`: estimates only).
        #[arg(long)]
        remeasure: Option<PathBuf>,
        /// Rounds of `--remeasure`.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// cpu: a candidate measured within `--confirm-margin` of the best so far is measured
        /// again with that best, interleaved, this many rounds each (0: never); a kernel's
        /// cost is the median of its measurements.
        #[arg(long, default_value_t = 2)]
        confirm_rounds: usize,
        /// The margin of `--confirm-rounds`, relative to the best so far.
        #[arg(long, default_value_t = 0.05)]
        confirm_margin: f64,
        /// Compile candidates one at a time (by default the next one compiles in parallel with
        /// the one about to be timed, before it is timed; the search is the same).
        #[arg(long)]
        no_parallel_compile: bool,
    },
    /// List the targets and the toolchain kiln links.
    Targets,
}

#[cfg(unix)]
unsafe extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

fn main() -> ExitCode {
    // Output piped into `head` and closed early ends kiln quietly, as it does other Unix
    // tools, instead of a panic in println! (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE (13) before any thread starts.
    unsafe {
        signal(13, 0);
    }
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                Error::Usage(_) | Error::UnknownTarget(_) => 2,
                _ => 1,
            })
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<(), Error> {
    match cmd {
        Cmd::Run {
            model,
            target,
            inputs,
            output_dir,
            npy,
            dims,
            no_fusion,
            npu,
            check,
            rtol,
            atol,
            threads,
            rvv_vlen,
            tuning_db,
        } => {
            npu.apply()?;
            kiln_targets::native::set_threads(threads);
            let check = check.then_some((rtol, atol));
            let opts = options(no_fusion, &dims, &target, rvv_vlen, tuning_db.as_deref())?;
            run(&model, &target, &inputs, &output_dir, npy, &dims, check, &opts)
        }
        Cmd::Compile { model, target, out, emit, full_constants, no_fusion, npu, rvv_vlen, gpu_arch, tuning_db } => {
            npu.apply()?;
            let mut opts = options(no_fusion, &[], &target, rvv_vlen, tuning_db.as_deref())?;
            if let Some(chip) = gpu_arch {
                let family = match target.as_str() {
                    "cuda" => kiln_targets::gpu::Family::Cuda,
                    "rocm" => kiln_targets::gpu::Family::Rocm,
                    _ => {
                        return Err(Error::Usage(format!(
                            "--gpu-arch applies to --target cuda or rocm, not '{target}'"
                        )))
                    }
                };
                kiln_targets::gpu::GpuArch::new(family, Some(&chip)).map_err(|e| Error::Usage(e.to_string()))?;
                opts.target.gpu_arch = Some(chip);
            }
            compile(&model, &target, out.as_deref(), &emit, full_constants, &opts)
        }
        Cmd::Inspect { model, target, json, no_fusion, npu, dims } => {
            npu.apply()?;
            inspect(&model, &target, json, &options(no_fusion, &dims, &target, None, None)?)
        }
        Cmd::Bench {
            model,
            target,
            inputs,
            dims,
            iters,
            threads,
            json,
            no_fusion,
            npu,
            profile,
            rvv_vlen,
            tuning_db,
        } => {
            npu.apply()?;
            let opts = options(no_fusion, &dims, &target, rvv_vlen, tuning_db.as_deref())?;
            bench(&model, &target, &inputs, &dims, iters, threads, json, profile, &opts)
        }
        Cmd::Tune {
            model,
            target,
            tuning_db,
            trials,
            budget_s,
            resume,
            strategy,
            seed,
            dims,
            no_fusion,
            npu,
            rvv_vlen,
            threads,
            json,
            no_model_bench,
            remeasure,
            rounds,
            confirm_rounds,
            confirm_margin,
            no_parallel_compile,
        } => {
            npu.apply()?;
            kiln_targets::native::set_threads(threads);
            if let Some(file) = remeasure {
                let opts = options(no_fusion, &dims, &target, rvv_vlen, None)?;
                return remeasure_cmd(&model, &target, &opts, &file, rounds, &parse_dims(&dims)?);
            }
            let opts = options(no_fusion, &dims, &target, rvv_vlen, None)?;
            let strategy = strategy.parse().map_err(Error::Usage)?;
            let t = kiln::tune::TuneOptions {
                db: tuning_db,
                trials,
                budget: budget_s.map(std::time::Duration::from_secs_f64),
                resume,
                strategy,
                seed,
                dims: parse_dims(&dims)?,
                confirm_rounds,
                confirm_margin,
                parallel_compile: !no_parallel_compile,
            };
            tune(&model, &target, &opts, &t, json, !no_model_bench)
        }
        Cmd::Targets => {
            targets();
            Ok(())
        }
    }
}

/// The `npu` target's machine: a preset or a description file (CLI.md).
#[derive(clap::Args, Debug)]
struct NpuArgs {
    /// NPU preset for `--target npu`: davinci (default), sunway or mlu.
    #[arg(long = "npu-preset")]
    preset: Option<String>,
    /// NPU machine description (JSON) for `--target npu`, instead of a preset.
    #[arg(long = "npu-config", conflicts_with = "preset")]
    config: Option<PathBuf>,
}

impl NpuArgs {
    /// Selects the NPU the `npu` target uses.
    fn apply(&self) -> Result<(), Error> {
        let cfg = match (&self.preset, &self.config) {
            (Some(p), _) => {
                kiln_npu::NpuConfig::preset(p).map_err(|e| Error::Usage(format!("--npu-preset {p}: {e}")))?
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
                kiln_npu::NpuConfig::from_json(&text, &path.display().to_string())
                    .map_err(|e| Error::Target(kiln_targets::TargetError::Config(e.to_string())))?
            }
            (None, None) => return Ok(()),
        };
        kiln_targets::npu::set_config(cfg);
        Ok(())
    }
}

fn options(
    no_fusion: bool,
    dims: &[String],
    target: &str,
    rvv_vlen: Option<u32>,
    tuning_db: Option<&Path>,
) -> Result<kiln::Options, Error> {
    let mut d: Vec<(String, u64)> = parse_dims(dims)?.into_iter().map(|(k, v)| (k, v as u64)).collect();
    d.sort();
    let mut t = kiln_targets::TargetOptions::default();
    if let Some(vlen) = rvv_vlen {
        if target != "rvv" {
            return Err(Error::Usage(format!("--rvv-vlen applies to --target rvv, not '{target}'")));
        }
        t.rvv_vlen = vlen;
    }
    if let Some(db) = tuning_db {
        let tt = kiln_targets::lookup_with(target, &t).ok_or_else(|| Error::UnknownTarget(target.to_string()))?;
        t.tuned = std::sync::Arc::new(kiln::tune::load_best(db, &*tt)?);
    }
    Ok(kiln::Options { fusion: !no_fusion, dims: d, target: t })
}

/// Parses `--rvv-vlen`.
fn parse_vlen(s: &str) -> Result<u32, String> {
    let vlen: u32 = s.parse().map_err(|_| format!("'{s}' is not a number of bits"))?;
    kiln_targets::rvv::check_vlen(vlen)?;
    Ok(vlen)
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), msg: e.to_string() }
}

/// Parses `NAME=N` dimension bindings.
fn parse_dims(dims: &[String]) -> Result<HashMap<String, usize>, Error> {
    dims.iter()
        .map(|d| {
            let (n, v) = d.split_once('=').ok_or_else(|| Error::Usage(format!("--dim '{d}': expected NAME=N")))?;
            let v = v.parse().map_err(|_| Error::Usage(format!("--dim '{d}': '{v}' is not a non-negative integer")))?;
            Ok((n.to_string(), v))
        })
        .collect()
}

/// Binds input files to the model's inputs: positional in order, or `NAME=FILE`.
fn bind_inputs(c: &kiln::CompiledModel, files: &[String], dims: &[String]) -> Result<Vec<Tensor>, Error> {
    let ports = c.inputs();
    let mut bound: Vec<Option<Tensor>> = vec![None; ports.len()];
    let mut next = 0;
    for f in files {
        let by_name = f.split_once('=').and_then(|(n, p)| ports.iter().position(|(pn, _)| pn == n).map(|i| (i, p)));
        let (i, path) = match by_name {
            Some((i, p)) => (i, p),
            None => {
                while next < bound.len() && bound[next].is_some() {
                    next += 1;
                }
                if next >= bound.len() {
                    return Err(Error::Usage(format!(
                        "too many inputs: the model takes {} ({})",
                        ports.len(),
                        ports.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
                (next, f.as_str())
            }
        };
        if bound[i].is_some() {
            return Err(Error::Usage(format!("input '{}' is given twice", ports[i].0)));
        }
        bound[i] = Some(kiln_onnx::read_tensor_file(Path::new(path))?);
    }
    let dims = parse_dims(dims)?;
    let mut syms: HashMap<String, usize> = HashMap::new();
    for (name, ty) in &ports {
        for d in ty.shape.iter().flatten() {
            if let kiln::Dim::Sym(s) = d {
                syms.insert(s.to_string(), 0);
            }
        }
        let _ = name;
    }
    for name in dims.keys() {
        if !syms.contains_key(name) {
            let mut known: Vec<_> = syms.keys().cloned().collect();
            known.sort();
            return Err(Error::Usage(format!(
                "--dim {name}: the model has no symbolic dim '{name}' (it has: [{}])",
                known.join(", ")
            )));
        }
    }
    let missing: Vec<&str> =
        ports.iter().zip(&bound).filter(|(_, b)| b.is_none()).map(|((n, _), _)| n.as_str()).collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "missing input(s): {} (give one --input per graph input)",
            missing.join(", ")
        )));
    }
    let tensors: Vec<Tensor> = bound.into_iter().map(|t| t.expect("checked above")).collect();
    // `--dim` bindings must agree with the input files.
    for ((name, ty), t) in ports.iter().zip(&tensors) {
        for (d, &n) in ty.shape.iter().flatten().zip(&t.shape) {
            if let kiln::Dim::Sym(s) = d {
                if let Some(&want) = dims.get(&**s) {
                    if want != n {
                        return Err(Error::Usage(format!("input '{name}': dim '{s}' is {n}, but --dim {s}={want}")));
                    }
                }
            }
        }
    }
    Ok(tensors)
}

fn run(
    model: &Path,
    target: &str,
    files: &[String],
    out: &Path,
    npy: bool,
    dims: &[String],
    check: Option<(f64, f64)>,
    opts: &kiln::Options,
) -> Result<(), Error> {
    let m = kiln::load_model(model)?;
    let c = kiln::compile_with(m, target, opts)?;
    let inputs = bind_inputs(&c, files, dims)?;
    let (outputs, report) = match check {
        Some((rtol, atol)) => {
            let (outs, report) = c.check(inputs, rtol, atol)?;
            (outs, Some((report, rtol, atol)))
        }
        None => (c.run(inputs)?, None),
    };
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    for (i, (t, (name, _))) in outputs.iter().zip(c.outputs()).enumerate() {
        let p = out.join(format!("output_{i}.pb"));
        kiln_onnx::write_tensor_pb(&p, t, &name)?;
        if npy {
            kiln_onnx::write_npy(&out.join(format!("output_{i}.npy")), t)?;
        }
        println!("{}: {name} {}{:?}", p.display(), t.dtype(), t.shape);
    }
    if let Some((report, rtol, atol)) = report {
        match report.first {
            Some(d) => {
                return Err(Error::Check(format!(
                    "--check: {} on {target} diverges from ref (rtol {rtol}, atol {atol}) first at {d}",
                    model.display()
                )))
            }
            None => eprintln!("check: {} kernels on {target} match ref (rtol {rtol}, atol {atol})", report.kernels),
        }
    }
    Ok(())
}

fn compile(
    model: &Path,
    target: &str,
    out: Option<&Path>,
    emit: &[String],
    full: bool,
    opts: &kiln::Options,
) -> Result<(), Error> {
    let stages: Vec<&str> = if emit.is_empty() { vec!["graph"] } else { emit.iter().map(String::as_str).collect() };
    for stage in &stages {
        if !["graph", "fused", "kernel", "mlir", "llvm", "asm"].contains(stage) {
            return Err(Error::Usage(format!("--emit {stage}: unknown stage (graph, fused, kernel, mlir, llvm, asm)")));
        }
        // llvm and asm come from targets that go through LLVM (cpu, rvv); npu prints its own
        // ISA's assembly.
        let gpu = kiln_targets::lookup_gpu(target, &opts.target).is_some();
        let llvm_based = kiln_targets::lookup_with(target, &opts.target).map(|t| t.code_target().is_some() || gpu);
        let own_asm = *stage == "asm" && target == "npu";
        if ["llvm", "asm"].contains(stage) && llvm_based == Some(false) && !own_asm {
            return Err(Error::Usage(format!(
                "--emit {stage}: the {target} target does not generate {stage} (cpu, rvv, cuda and rocm do)"
            )));
        }
    }
    let m = kiln::load_model(model)?;
    // `-o DIR` on cpu or rvv without --emit: ahead-of-time artifacts.
    let aot = match target {
        "cpu" => Some(kiln_targets::aot::AotTarget::host()),
        "rvv" => Some(kiln_targets::rvv::aot_target(opts.target.rvv_vlen)),
        _ => None,
    };
    if let (Some(dir), true, Some(aot)) = (out, emit.is_empty(), aot) {
        let c = kiln::compile_with(m, target, opts)?;
        let stem = model.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
        let a = kiln_targets::aot::compile_for(c.module(), &stem, dir, &aot)?;
        println!(
            "{}: {} kernels, arena {} bytes, weights {} bytes; entry point {}_run",
            model.display(),
            a.kernels,
            a.arena_bytes,
            a.weight_bytes,
            a.entry
        );
        for p in [&a.object, &a.library, &a.header, &a.driver] {
            println!("wrote {}", p.display());
        }
        return Ok(());
    }
    // cuda, rocm: `-o DIR` without --emit writes each kernel's code and the launch manifest.
    if let Some(gpu) = kiln_targets::lookup_gpu(target, &opts.target) {
        if let (Some(dir), true) = (out, emit.is_empty()) {
            let c = kiln::compile_with(m, target, opts)?;
            let program = gpu.compile(c.module())?;
            let written = program.write(dir)?;
            println!(
                "{}: {} kernels for {} ({} functions), {} on the host",
                model.display(),
                program.manifest.kernels.len(),
                program.arch.chip,
                program.functions.len(),
                program.manifest.host_kernels.len()
            );
            for h in &program.manifest.host_kernels {
                println!("host kernel {} (node '{}', {}): {}", h.name, h.node, h.op, h.why);
            }
            let (plan, plan_files) = kiln_targets::gpu_plan::write(c.module(), &program, dir)?;
            match &plan.why_not {
                None => println!(
                    "plan: {} launches, {} host steps, arena {} bytes, weights {} bytes (runnable by kiln-gpu-run)",
                    plan.launches.len(),
                    plan.host_steps.len(),
                    plan.arena_bytes,
                    plan.weight_bytes
                ),
                Some(why) => println!("plan: not runnable: {why}"),
            }
            for p in written.into_iter().chain(plan_files) {
                println!("wrote {}", p.display());
            }
            return Ok(());
        }
    }
    let graph = if stages.contains(&"graph") { Some(kiln::cleanup(m.clone())?) } else { None };
    let c = kiln::compile_with(m, target, opts)?;
    let print_opts =
        kiln_ir::printer::PrintOptions { elide_constants_over: if full || out.is_some() { None } else { Some(16) } };
    for stage in stages {
        let text = match stage {
            "graph" => kiln_ir::printer::print_module(graph.as_ref().expect("cleaned up above"), print_opts),
            "fused" => kiln_ir::printer::print_module(c.module(), print_opts),
            "asm" if target == "npu" => {
                // NPU assembly of the kernels of static shapes (symbolic ones compile per binding).
                let mut text = String::new();
                for h in c.host_kernels()? {
                    text.push_str(&format!(
                        "; {} (node '{}', {}): runs on the host: {}\n",
                        h.name, h.node, h.op, h.why
                    ));
                }
                text.push_str(&c.target_assembly().unwrap_or_default());
                text
            }
            "llvm" | "asm" | "mlir" | "kernel" if kiln_targets::lookup_gpu(target, &opts.target).is_some() => {
                let gpu = kiln_targets::lookup_gpu(target, &opts.target).expect("checked by the guard");
                if stage == "kernel" {
                    kiln_targets::gpu::kernel_text(c.module(), &opts.target.tuned)
                } else if stage == "mlir" {
                    kiln_targets::gpu::gpu_mlir(c.module(), &gpu.arch, &opts.target.tuned)
                } else {
                    let program = gpu.compile(c.module())?;
                    if stage == "asm" {
                        program.assembly()
                    } else {
                        program.llvm_ir()
                    }
                }
            }
            "llvm" | "asm" => {
                let what = if stage == "llvm" { Artifact::LlvmIr } else { Artifact::Assembly };
                let code_target = c.target().code_target().ok_or_else(|| {
                    Error::Usage(format!("--emit {stage}: target '{target}' does not go through LLVM"))
                })?;
                let options = kiln_targets::native::MlirOptions::for_code(&code_target);
                let mlir: String = c
                    .kernels()
                    .iter()
                    .filter_map(|k| k.kernel.as_ref().ok())
                    .map(|k| kiln_targets::native::to_mlir_with(k, options))
                    .collect();
                let mut text = String::new();
                for k in c.kernels().iter().filter(|k| k.kernel.is_err()) {
                    text.push_str(&format!(
                        "{} {} (node '{}', {}): runs on the host's reference implementation (not lowered yet)\n",
                        if stage == "llvm" { ";" } else { "#" },
                        k.name,
                        k.node,
                        k.op
                    ));
                }
                if !mlir.is_empty() {
                    text.push_str(&String::from_utf8_lossy(&kiln_targets::jit::emit_for(&mlir, what, &code_target)?));
                }
                text
            }
            "kernel" | "mlir" => {
                // Kernels lowering covers today; the others are named with the reason.
                let mlir_options = c
                    .target()
                    .code_target()
                    .map_or_else(Default::default, |t| kiln_targets::native::MlirOptions::for_code(&t));
                let mut text = String::new();
                for k in c.kernels() {
                    match &k.kernel {
                        Ok(kernel) if stage == "kernel" => text.push_str(&kernel.to_string()),
                        Ok(kernel) => text.push_str(&kiln_targets::native::to_mlir_with(kernel, mlir_options)),
                        Err(why) => text.push_str(&format!(
                            "// {} (node '{}', {}): not lowered to the kernel dialect yet: {why}\n",
                            k.name, k.node, k.op
                        )),
                    }
                }
                text
            }
            other => {
                return Err(Error::Usage(format!(
                    "--emit {other}: unknown stage (graph, fused, kernel, mlir, llvm, asm)"
                )))
            }
        };
        match out {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
                let stem = model.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
                let ext = match stage {
                    "llvm" => "ll",
                    "asm" if target == "cuda" => "ptx",
                    "asm" => "s",
                    _ => "mlir",
                };
                let p = dir.join(format!("{stem}.{stage}.{ext}"));
                std::fs::write(&p, text).map_err(|e| io_err(&p, e))?;
                eprintln!("wrote {}", p.display());
            }
            None => print!("{text}"),
        }
    }
    Ok(())
}

fn inspect(model: &Path, target: &str, json: bool, opts: &kiln::Options) -> Result<(), Error> {
    let r = kiln::inspect::inspect_with(model, target, opts)?;
    if json {
        println!("{}", serde_json::to_string(&r).expect("report serializes"));
        return Ok(());
    }
    println!("model: {}", model.display());
    if !r.unsupported.is_empty() {
        println!("unsupported ops ({}): {}", r.unsupported.len(), r.unsupported.join(", "));
    }
    println!("opset: {}", r.opset);
    for p in &r.inputs {
        println!("input  {}: {}", p.name, p.ty);
    }
    for p in &r.outputs {
        println!("output {}: {}", p.name, p.ty);
    }
    println!("graph ops: {} ({} constants, {} bytes)", r.graph_ops, r.constants, r.constant_bytes);
    for (op, n) in &r.ops_by_type {
        println!("  {op:<28} {n}");
    }
    println!(
        "kernels on {}: {}{}",
        r.target,
        r.kernels,
        if r.fusion { format!(" (fusion {:.1} ms)", r.fusion_ms) } else { " (fusion off)".into() }
    );
    for (kind, n) in &r.kernels_by_kind {
        println!("  {kind:<28} {n}");
    }
    println!(
        "bytes moved: {} before, {} after ({:.2}x); estimated {:.3} ms before, {:.3} ms after",
        r.bytes_moved_before,
        r.bytes_moved_after,
        r.bytes_moved_before as f64 / r.bytes_moved_after.max(1) as f64,
        r.estimated_ms_before,
        r.estimated_ms_after
    );
    if !r.rewrites.is_empty() {
        let list: Vec<String> = r.rewrites.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("rewrites: {}", list.join(", "));
    }
    Ok(())
}

/// Seeded pseudo-random input for a port (xorshift; symbolic dims bound by `--dim` or 1).
fn random_input(ty: &kiln::TensorType, dims: &HashMap<String, usize>, seed: u64) -> Result<Tensor, Error> {
    let shape: Vec<usize> = ty
        .shape
        .as_ref()
        .ok_or_else(|| Error::Usage("an input has unknown rank: give it with --input".into()))?
        .iter()
        .map(|d| match d {
            kiln::Dim::Known(n) => *n as usize,
            kiln::Dim::Sym(s) => dims.get(&**s).copied().unwrap_or(1),
        })
        .collect();
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let vals: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_f64(ty.dtype, &shape, vals))
}

#[allow(clippy::too_many_arguments)]
fn bench(
    model: &Path,
    target: &str,
    files: &[String],
    dims: &[String],
    iters: usize,
    threads: Option<usize>,
    json: bool,
    profile: bool,
    opts: &kiln::Options,
) -> Result<(), Error> {
    kiln_targets::native::set_threads(threads);
    let t0 = Instant::now();
    let m = kiln::load_model(model)?;
    let c = kiln::compile_with(m, target, opts)?;
    c.prepare()?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let inputs = if files.is_empty() {
        let d = parse_dims(dims)?;
        c.inputs()
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| random_input(ty, &d, i as u64 + 1))
            .collect::<Result<_, _>>()?
    } else {
        bind_inputs(&c, files, dims)?
    };
    // The reference interpreter is single-threaded, and so is rvv's kernel runner.
    let threads_used = if ["ref", "rvv"].contains(&target) { 1 } else { kiln_targets::native::threads() };
    // Warm-up, measuring the peak of live tensors; then at least 3 runs and 100 ms, so that
    // caches, the allocator and the thread pool are in their steady state before timing.
    let (_, peak) = c.run_observed(inputs.clone(), &mut |_, _| {})?;
    let warm = Instant::now();
    for n in 1.. {
        if n >= 3 && warm.elapsed().as_secs_f64() > 0.1 || n >= 1000 {
            break;
        }
        c.run(inputs.clone())?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        // Inputs are moved into a run: copy them before the clock starts.
        let copy = inputs.clone();
        let t = Instant::now();
        c.run(copy)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    if profile {
        print_profile(&c, inputs)?;
    }
    let median = times[times.len() / 2];
    let mut obj = serde_json::json!({
        "target": target, "compile_ms": compile_ms, "median_ms": median, "min_ms": times[0],
        "iters": times.len(), "threads": threads_used, "peak_memory_bytes": peak,
        "native_kernels": c.native_kernels()?, "host_kernels": c.host_kernels()?.len(),
    });
    // rvv's times are wall times under the emulator, not a RISC-V chip's.
    let emulated = (target == "rvv").then_some(opts.target.rvv_vlen);
    if let Some(vlen) = emulated {
        obj["rvv_vlen"] = vlen.into();
        obj["emulator"] = "qemu-riscv64".into();
    }
    // A simulated target: its cycles, time at its clock and unit utilizations (CLI.md).
    let sim = c.sim_report();
    if let Some(r) = &sim {
        obj["sim_cycles"] = r.cycles.into();
        obj["sim_ms"] = r.ms.into();
        obj["units"] = serde_json::json!({"matrix": r.matrix, "vector": r.vector, "dma": r.dma});
        obj["sim_gm_bytes"] = r.gm_bytes.into();
    }
    if json {
        println!("{obj}");
    } else {
        println!(
            "{}: compile {compile_ms:.1} ms, median {median:.3} ms, min {:.3} ms over {} runs on {target}{}",
            model.display(),
            times[0],
            times.len(),
            emulated.map_or(String::new(), |v| format!(" (VLEN {v}, wall time under qemu-riscv64)"))
        );
        if let Some(r) = &sim {
            println!(
                "simulated: {} cycles = {:.3} ms at the machine's clock; matrix {:.0}%, vector {:.0}%, DMA {:.0}% busy",
                r.cycles,
                r.ms,
                100.0 * r.matrix,
                100.0 * r.vector,
                100.0 * r.dma
            );
        }
    }
    Ok(())
}

/// One more run, timing each top-level op (ops run one after another: the time between two
/// ops' outputs is the second's), printed slowest first to stderr.
fn print_profile(c: &kiln::CompiledModel, inputs: Vec<Tensor>) -> Result<(), Error> {
    let m = c.module();
    let host = c.host_kernels()?;
    let names: HashMap<kiln_ir::ir::OpId, String> = kiln_targets::native::launched_kernels(m).into_iter().collect();
    let mut spans: Vec<(f64, kiln_ir::ir::OpId)> = Vec::new();
    let mut last = Instant::now();
    c.run_observed(inputs, &mut |o, _| {
        let now = Instant::now();
        spans.push(((now - last).as_secs_f64() * 1e3, o));
        last = now;
    })?;
    let total: f64 = spans.iter().map(|s| s.0).sum();
    spans.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!("profile: {total:.3} ms in {} ops", spans.len());
    for (ms, o) in spans.iter().take(25) {
        let op = m.op(*o);
        let kind = match op.attrs.get("kind") {
            Some(kiln_ir::attr::Attr::Str(k)) => format!("{k}:"),
            _ => String::new(),
        };
        let anchor = match op.attrs.get("anchor") {
            Some(kiln_ir::attr::Attr::Str(a)) => a.clone(),
            _ => op.op_type().to_string(),
        };
        let place = match names.get(o).and_then(|n| host.iter().find(|h| &h.name == n)) {
            Some(h) => format!(" (host: {})", h.why),
            None => String::new(),
        };
        eprintln!("  {ms:9.3} ms {:5.1}%  {kind}{anchor}  '{}'{place}", 100.0 * ms / total.max(1e-9), op.node_name());
    }
    Ok(())
}

fn targets() {
    for t in kiln_targets::all() {
        let status = if t.can_run() { "runs" } else { "description only" };
        println!("{:<5} {:<17} {}", t.name(), status, t.summary());
    }
    let tc = kiln_targets::llvm::probe();
    let (a, b, c) = tc.llvm_version;
    println!();
    println!("LLVM {a}.{b}.{c}, MLIR with {} dialects; backends: {}", tc.mlir_dialects, tc.backends.join(", "));
    println!("host: {} ({})", tc.host_triple, tc.host_cpu);
}

/// Whole-model cost on `target`: the median wall time of `iters` warm runs (ms), or on `npu`
/// the simulated cycles of one run.
fn model_cost(c: &kiln::CompiledModel, inputs: &[Tensor], iters: usize) -> Result<f64, Error> {
    c.run(inputs.to_vec())?;
    if let Some(r) = c.sim_report() {
        return Ok(r.cycles as f64);
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < iters || (start.elapsed().as_secs_f64() < 0.2 && times.len() < 1000) {
        let t = Instant::now();
        c.run(inputs.to_vec())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `kiln tune --remeasure FILE`: the listed schedules measured again together.
fn remeasure_cmd(
    model: &Path,
    target: &str,
    opts: &kiln::Options,
    file: &Path,
    rounds: usize,
    dims: &HashMap<String, usize>,
) -> Result<(), Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Io { path: file.display().to_string(), msg: e.to_string() })?;
    #[derive(serde::Deserialize)]
    struct Want {
        workload: String,
        knobs: kiln_passes::lower::Schedule,
    }
    let wanted: Vec<Want> = serde_json::from_str(&text).map_err(|e| Error::Io {
        path: file.display().to_string(),
        msg: format!("expected a JSON array of {{\"workload\": key, \"knobs\": {{...}}}}: {e}"),
    })?;
    let c = kiln::compile_with(kiln::load_model(model)?, target, opts)?;
    let pairs: Vec<(String, kiln_passes::lower::Schedule)> =
        wanted.into_iter().map(|w| (w.workload, w.knobs)).collect();
    let costs = kiln::tune::remeasure(&c, &pairs, rounds, dims)?;
    let clock = (target == "cpu").then(|| kiln::tune::Clock::for_threads(kiln_targets::native::threads()).name());
    let (costs, estimates): (Vec<Option<f64>>, Vec<Option<f64>>) = costs.into_iter().unzip();
    println!(
        "{}",
        serde_json::json!({"target": target, "rounds": rounds, "clock": clock, "costs": costs, "estimates": estimates})
    );
    Ok(())
}

/// `kiln tune`: tunes every kernel, then prints a table of per-kernel and whole-model speedups.
fn tune(
    model: &Path,
    target: &str,
    opts: &kiln::Options,
    t: &kiln::tune::TuneOptions,
    json: bool,
    bench_model: bool,
) -> Result<(), Error> {
    let m = kiln::load_model(model)?;
    let c = kiln::compile_with(m.clone(), target, opts)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut current = String::new();
    let report = kiln::tune::tune(&c, t, &mut |k, trials| {
        if k.workload != current {
            current = k.workload.clone();
            bar.set_length(trials as u64);
            bar.set_position(0);
            bar.set_prefix(k.kernel.clone());
        }
        bar.inc(1);
        let best = k.best_so_far.last().copied().unwrap_or(f64::NAN);
        bar.set_message(format!("best {best:.4} {}", k.unit));
    })?;
    bar.finish_and_clear();
    // The whole model with the default schedules and with the database's best.
    let mut whole = None;
    if target == "rvv" {
        // Estimates, not runs (qemu's time is not the chip's): the kernels' sum.
        let sum = |f: &dyn Fn(&kiln::tune::KernelReport) -> Option<f64>| -> f64 {
            report.kernels.iter().filter_map(|k| Some(f(k)? * k.instances as f64)).sum()
        };
        if report.kernels.iter().all(|k| k.default_cost.is_some()) {
            whole = Some((sum(&|k| k.default_cost), sum(&|k| k.best_cost.or(k.default_cost))));
        }
    } else if bench_model {
        let d: HashMap<String, usize> = t.dims.clone();
        let inputs: Vec<Tensor> = c
            .inputs()
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| random_input(ty, &d, i as u64 + 1))
            .collect::<Result<_, _>>()?;
        // `c` is the model with the default schedules (tuning only lowered its kernels alone).
        let default = &c;
        let mut tuned_opts = opts.clone();
        let tt = kiln_targets::lookup_with(target, &opts.target).ok_or_else(|| Error::UnknownTarget(target.into()))?;
        tuned_opts.target.tuned = std::sync::Arc::new(kiln::tune::load_best(&t.db, &*tt)?);
        let tuned = kiln::compile_with(m, target, &tuned_opts)?;
        let (a, b) = (model_cost(default, &inputs, 20)?, model_cost(&tuned, &inputs, 20)?);
        let (a2, b2) = (model_cost(default, &inputs, 20)?, model_cost(&tuned, &inputs, 20)?);
        whole = Some((a.min(a2), b.min(b2)));
    }
    let unit = match target {
        "npu" => "cycles",
        "rvv" => "est. cycles",
        _ => "ms",
    };
    if json {
        let mut v = kiln::tune::report_json(&report);
        v["strategy"] = serde_json::json!(format!("{:?}", t.strategy).to_lowercase());
        v["model"] = serde_json::json!(whole.map(|(a, b)| serde_json::json!({"default": a, "tuned": b, "unit": unit})));
        println!("{v}");
        return Ok(());
    }
    println!(
        "tuned {} workload(s) on {target}: {} new measurement(s) in {} ({} earlier record(s){})",
        report.kernels.len(),
        report.measured,
        t.db.display(),
        report.previous,
        if report.unreadable > 0 {
            format!(", {} unreadable line(s) skipped", report.unreadable)
        } else {
            String::new()
        }
    );
    if target == "rvv" {
        println!(
            "costs are ESTIMATES (est. cycles of the generated code: instructions by class and cache \
             traffic at rvv's VLEN), not measurements; each kernel's best was checked under qemu"
        );
    }
    if let Some(clock) = report.clock {
        let repeats: usize = report.kernels.iter().map(|k| k.repeats).sum();
        println!(
            "cpu times: warm median, {clock} clock; a kernel's cost is the median of its measurements \
             ({repeats} repeated to confirm candidates against the best so far)"
        );
        if report.compiled_ahead > 0 {
            println!("{} candidate(s) compiled in parallel ahead of their turn", report.compiled_ahead);
        }
    }
    println!(
        "{:<24} {:>4} {:>7} {:>7} {:>12} {:>12} {:>8}",
        "kernel", "x", "trials", "failed", "default", "best", "speedup"
    );
    for k in &report.kernels {
        if let Some(why) = &k.skipped {
            println!("{:<24} {:>4} not tuned: {why}", k.kernel, k.instances);
            continue;
        }
        let f = |x: Option<f64>| {
            x.map_or("-".into(), |v| if k.unit == "ms" { format!("{v:.4}") } else { format!("{v:.0}") })
        };
        let speedup = match (k.default_cost, k.best_cost) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "{:<24} {:>4} {:>7} {:>7} {:>12} {:>12} {:>8}",
            k.kernel,
            k.instances,
            k.trials,
            k.failed,
            f(k.default_cost),
            f(k.best_cost),
            speedup
        );
    }
    if let Some((a, b)) = whole {
        if unit == "ms" {
            println!("whole model (ms): default {a:.4}, tuned {b:.4}: {:.2}x", a / b);
        } else if target == "rvv" {
            println!(
                "whole model (estimated cycles, the kernels' sum; an estimate, not a measurement): \
                 default {a:.0}, tuned {b:.0}: {:.2}x",
                a / b
            );
        } else {
            println!("whole model (cycles): default {a:.0}, tuned {b:.0}: {:.2}x", a / b);
        }
    }
    if report.stopped_by_budget {
        println!("stopped by --budget-s; `kiln tune --resume` continues");
    }
    Ok(())
}
