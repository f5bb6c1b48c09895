//! GPU targets: `cuda` (PTX for sm_80, sm_90) and `rocm` (AMDGCN for gfx906, the Hygon DCU
//! stand-in, gfx90a and gfx942), from the kernel dialect.
//!
//! Each kernel the `cpu` path lowers becomes a `gpu.func` kernel in a `gpu.module`
//! ([`native::to_gpu_func`]: the same scf/memref/arith/vector body, its shared parallel loop
//! mapped to a one-dimensional grid, one iteration per thread, threads past the extent idle;
//! a flattened `rows × cols` loop to a two-dimensional one, [`grid_cols`]).
//! MLIR lowers the module with `convert-gpu-to-nvvm` or `convert-gpu-to-rocdl` to the LLVM
//! dialect; its functions are translated to LLVM IR, verified, optimized at `-O3` for the
//! chip and compiled by LLVM's NVPTX back end to PTX, or by its AMDGPU back end to AMDGCN
//! assembly and an ELF object. A [`Manifest`] describes each kernel's launch: grid, block,
//! shared memory and the argument layout (one strided memref descriptor per buffer).
//!
//! Kernels the kernel dialect does not cover yet are listed as host kernels (they run on the
//! host's reference implementation, as on `cpu`), never dropped. Running needs a GPU and a
//! driver ([`kiln_runtime`'s CUDA loader](../../kiln_runtime/index.html) where built); none is
//! needed to compile.

use crate::descriptions::Described;
use crate::gpu_rows;
use crate::gpu_tile::{self, GemmTile};
use crate::native::{self, MlirOptions};
use crate::{HostKernel, Target, TargetError};
use kiln_ir::kernel::{ByZero, Idx, Kernel, Stmt, Val};
use kiln_ir::machine::{GpuLimits, MachineDescription};
use kiln_ir::{DType, Dim, Module, Tensor};
use kiln_passes::lower::{Schedule, Schedules};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// NVIDIA chips `cuda` compiles for (the first is the default).
pub const CUDA_ARCHS: &[&str] = &["sm_80", "sm_90"];
/// AMD chips `rocm` compiles for (the first is the default; gfx906 stands in for Hygon DCU).
pub const ROCM_ARCHS: &[&str] = &["gfx90a", "gfx906", "gfx942"];

/// The GPU family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Cuda,
    Rocm,
}

/// One chip of a family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuArch {
    pub family: Family,
    pub chip: String,
}

impl GpuArch {
    /// `chip` of `family` (the family's default for `None`); an unknown chip is an error that
    /// lists the known ones.
    pub fn new(family: Family, chip: Option<&str>) -> Result<GpuArch, TargetError> {
        let known = match family {
            Family::Cuda => CUDA_ARCHS,
            Family::Rocm => ROCM_ARCHS,
        };
        let chip = chip.unwrap_or(known[0]);
        if !known.contains(&chip) {
            return Err(TargetError::Config(format!(
                "--gpu-arch {chip}: not a {} chip (known: {})",
                family.name(),
                known.join(", ")
            )));
        }
        Ok(GpuArch { family, chip: chip.to_string() })
    }

    /// LLVM's target triple.
    pub fn triple(&self) -> &'static str {
        match self.family {
            Family::Cuda => "nvptx64-nvidia-cuda",
            Family::Rocm => "amdgcn-amd-amdhsa",
        }
    }

    /// The chip's machine description ([`crate::descriptions::gpu_machine`]).
    pub fn description(&self) -> MachineDescription {
        crate::descriptions::gpu_machine(&self.chip).expect("every known chip is described")
    }

    /// The chip's GPU limits (warp, block, shared memory, registers) from its description.
    pub fn limits(&self) -> GpuLimits {
        self.description().gpu.expect("a GPU description has GPU limits")
    }

    /// Threads that execute in lockstep (a warp, a wavefront).
    pub fn warp(&self) -> u64 {
        self.limits().warp as u64
    }

    /// Threads per block of a launch larger than one block: a quarter of the most a block may
    /// have (so that several blocks share an SM/CU), in whole warps: 256 on every listed
    /// chip (8 warps, 4 wavefronts).
    pub fn block_threads(&self) -> u64 {
        block_threads(&self.limits())
    }

    /// The kernel code's file extension.
    pub fn code_ext(&self) -> &'static str {
        match self.family {
            Family::Cuda => "ptx",
            Family::Rocm => "s",
        }
    }

    /// The MLIR pipeline from the `gpu` module's upstream dialects to the LLVM dialect.
    pub fn pipeline(&self) -> String {
        let to_target = match self.family {
            Family::Cuda => "convert-gpu-to-nvvm{index-bitwidth=64}".to_string(),
            Family::Rocm => format!("convert-gpu-to-rocdl{{index-bitwidth=64 chipset={}}}", self.chip),
        };
        format!(
            "builtin.module(gpu.module(convert-vector-to-scf,lower-affine,convert-scf-to-cf,convert-vector-to-llvm,\
expand-strided-metadata,lower-affine,{to_target},reconcile-unrealized-casts))"
        )
    }

    /// LLVM's target machine for the chip, optimizing at `-O3`. PTX 7.8 (CUDA 11.8): dynamic
    /// `alloca` (a kernel's local buffers) needs 7.3, sm_90 needs 7.8.
    pub fn machine(&self) -> Result<inkwell::targets::TargetMachine, TargetError> {
        use inkwell::targets::{CodeModel, InitializationConfig, RelocMode, Target as LlvmTarget, TargetTriple};
        let cfg = InitializationConfig::default();
        let features = match self.family {
            Family::Cuda => {
                LlvmTarget::initialize_nvptx(&cfg);
                "+ptx78"
            }
            Family::Rocm => {
                LlvmTarget::initialize_amd_gpu(&cfg);
                ""
            }
        };
        let triple = TargetTriple::create(self.triple());
        let target = LlvmTarget::from_triple(&triple).map_err(|e| codegen(e.to_string()))?;
        target
            .create_target_machine(
                &triple,
                &self.chip,
                features,
                inkwell::OptimizationLevel::Aggressive,
                RelocMode::PIC,
                CodeModel::Default,
            )
            .ok_or_else(|| codegen(format!("LLVM has no target machine for {} ({})", self.triple(), self.chip)))
    }
}

/// Threads per block of a launch larger than one block, for a chip with `limits`
/// ([`GpuArch::block_threads`]).
pub fn block_threads(limits: &GpuLimits) -> u64 {
    let warp = limits.warp.max(1) as u64;
    (limits.max_threads_per_block as u64 / 4 / warp).max(1) * warp
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Cuda => "cuda",
            Family::Rocm => "rocm",
        }
    }
}

fn codegen(msg: impl std::fmt::Display) -> TargetError {
    TargetError::Codegen(msg.to_string())
}

/// The schedule GPU kernels are lowered with: each thread is a scalar core with a large
/// register file, so register tiles of 4-lane vectors (one 16-byte load each), 8 rows (Conv);
/// MatMul/Gemm and 2-D Convs (any group) as one reduction per output element
/// (`matmul_per_element`), which [`flatten`] turns into one thread per output element (and
/// [`gpu_tile`] reads back and tiles: MatMul/Gemm, one-group Convs); attention a thread per
/// query with an online softmax (`attention_per_query`).
pub fn schedule() -> Schedule {
    let mut s = Schedule::for_vectors(4, 32);
    s.matmul_row_block = s.matmul_mma_rows as i64;
    s.store_row_terms = true;
    s.whole_matmul = false;
    s.matmul_per_element = true;
    s.attention_per_query = true;
    s
}

/// Lowers kernel op `o` of `m` for a GPU: [`kiln_passes::lower::lower_with`] with `schedule`
/// (MatMul/Gemm per output element, even with a tuned schedule; the accumulate form where the
/// per-element one does not apply, e.g. a MatMul of a 1-D operand), then [`flatten`].
pub fn lower(m: &Module, o: kiln_ir::ir::OpId, name: &str, schedule: &Schedule) -> Result<Kernel, String> {
    let per_element = Schedule { matmul_per_element: true, attention_per_query: true, ..schedule.clone() };
    kiln_passes::lower::lower_with(m, o, name, &per_element)
        .or_else(|_| {
            let accumulate = Schedule { matmul_per_element: false, attention_per_query: true, ..schedule.clone() };
            kiln_passes::lower::lower_with(m, o, name, &accumulate)
        })
        .map(flatten)
}

/// More threads for a GPU: the sequential loops directly inside the kernel's shared parallel
/// loop are merged into it (`parallel i in 0..A { for j in 0..B { S } }` becomes `parallel f in
/// 0..A·B { S[i := f / B, j := f % B] }`) while that is sound: the inner loop is the parallel
/// loop's whole body, its extent depends on no loop, and its iterations are independent: its
/// body only stores into output buffers, every store's index has the inner variable alone on
/// some axis (different iterations, different elements), no register tile, and no load of an
/// output buffer (nothing read that an iteration writes). A MaxPool over channels then has a
/// thread per output element instead of one per channel. The result is a kernel like any
/// other (the cpu path compiles it too, which is how the host emulation checks it).
pub fn flatten(mut k: Kernel) -> Kernel {
    let (inputs, buffers) = (k.inputs, k.buffers.len());
    flatten_chain(&mut k.body, inputs, buffers);
    k
}

fn flatten_chain(body: &mut [Stmt], inputs: usize, buffers: usize) {
    let [only] = body else { return };
    match only {
        Stmt::For { parallel: true, var, extent, body } => {
            while let [Stmt::For { var: inner, extent: inner_extent, body: inner_body, .. }] = body.as_slice() {
                if inner_extent.has_vars() || !independent(inner_body, *inner, inputs, buffers) {
                    break;
                }
                // A variable no lowering uses, for the merged loop while substituting.
                const MERGED: usize = 1 << 20;
                let (outer, inner, e2) = (*var, *inner, inner_extent.clone());
                let by_outer = Idx::Div(Box::new(Idx::Var(MERGED)), Box::new(e2.clone()));
                let by_inner = Idx::Rem(Box::new(Idx::Var(MERGED)), Box::new(e2.clone()));
                let merged: Vec<Stmt> = inner_body
                    .iter()
                    .map(|s| subst(&subst(&subst(s, outer, &by_outer), inner, &by_inner), MERGED, &Idx::Var(outer)))
                    .collect();
                *extent = Idx::Mul(Box::new(extent.clone()), Box::new(e2)).simplify();
                *body = merged;
            }
        }
        Stmt::For { parallel: false, body, .. } => flatten_chain(body, inputs, buffers),
        _ => {}
    }
}

/// Whether iterations of loop `var` over `body` are independent (see [`flatten`]).
fn independent(body: &[Stmt], var: usize, inputs: usize, buffers: usize) -> bool {
    body.iter().all(|s| match s {
        Stmt::For { body, .. } => independent(body, var, inputs, buffers),
        Stmt::Let { value, .. } => reads_inputs_only(value, inputs),
        Stmt::Store { buf, index, value } => {
            (inputs..buffers).contains(buf) && index.contains(&Idx::Var(var)) && reads_inputs_only(value, inputs)
        }
        Stmt::Mma(_) => false,
    })
}

fn reads_inputs_only(v: &Val, inputs: usize) -> bool {
    let r = |x: &Val| reads_inputs_only(x, inputs);
    match v {
        Val::Const(_) | Val::Scalar(_) | Val::FromIdx(_) => true,
        Val::Load { buf, .. } => *buf < inputs,
        Val::Un(_, x) => r(x),
        Val::Bin(_, a, b) => r(a) && r(b),
        Val::Reduce { body, .. } => r(body),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => r(then) && r(other),
        Val::Where { cond, then, other } => r(cond) && r(then) && r(other),
    }
}

/// `s` with loop variable `var` replaced by `by` (no register tiles: [`independent`] keeps
/// them out).
fn subst(s: &Stmt, var: usize, by: &Idx) -> Stmt {
    match s {
        Stmt::For { var: v, extent, parallel, body } => Stmt::For {
            var: *v,
            extent: extent.subst(var, by),
            parallel: *parallel,
            body: body.iter().map(|s| subst(s, var, by)).collect(),
        },
        Stmt::Store { buf, index, value } => Stmt::Store {
            buf: *buf,
            index: index.iter().map(|i| i.subst(var, by)).collect(),
            value: value.subst(var, by),
        },
        Stmt::Let { slot, value } => Stmt::Let { slot: *slot, value: value.subst(var, by) },
        Stmt::Mma(_) => s.clone(),
    }
}

/// One kernel's code for one chip.
#[derive(Clone, Debug)]
pub struct GpuCode {
    /// The optimized LLVM IR.
    pub llvm_ir: String,
    /// PTX (cuda) or AMDGCN assembly (rocm).
    pub asm: String,
    /// The ELF object (rocm only).
    pub object: Option<Vec<u8>>,
}

/// Lowers `gpu_funcs` (`gpu.func` kernels, [`native::to_gpu_func`]) in a `gpu.module` for
/// `arch`: MLIR to the LLVM dialect, LLVM IR, LLVM's verifier, `-O3`, the verifier again, then
/// PTX or AMDGCN assembly and object.
pub fn compile_funcs(gpu_funcs: &str, arch: &GpuArch) -> Result<GpuCode, TargetError> {
    let ir = to_llvm_ir(gpu_funcs, arch)?;
    let tm = arch.machine()?;
    let ctx = inkwell::context::Context::create();
    let module = optimize(&ctx, &ir, &tm)?;
    let llvm_ir = module.print_to_string().to_string();
    // Code generation changes the module it compiles (AMDGPU annotates control flow with
    // intrinsics only instruction selection takes): each artifact compiles a fresh copy.
    let emit = |ft| {
        tm.write_to_memory_buffer(&module.clone(), ft)
            .map(|b| b.as_slice().to_vec())
            .map_err(|e| codegen(format!("LLVM code generation for {} failed: {e}", arch.chip)))
    };
    let asm = String::from_utf8_lossy(&emit(inkwell::targets::FileType::Assembly)?).into_owned();
    let object = match arch.family {
        Family::Rocm => Some(emit(inkwell::targets::FileType::Object)?),
        Family::Cuda => None,
    };
    Ok(GpuCode { llvm_ir, asm, object })
}

/// The LLVM IR (not optimized) of `gpu_funcs` lowered for `arch`.
pub fn to_llvm_ir(gpu_funcs: &str, arch: &GpuArch) -> Result<String, TargetError> {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    use melior::ir::Module;
    use melior::ir::RegionLike;
    use melior::pass::PassManager;
    let ctx = crate::jit::context();
    let text = format!("module attributes {{gpu.container_module}} {{\ngpu.module @kiln {{\n{gpu_funcs}}}\n}}\n");
    let mut module =
        Module::parse(&ctx, &text).ok_or_else(|| codegen("the generated GPU MLIR does not parse (a kiln bug)"))?;
    let pm = PassManager::new(&ctx);
    melior::utility::parse_pass_pipeline(pm.as_operation_pass_manager(), &arch.pipeline()).map_err(codegen)?;
    pm.run(&mut module).map_err(|e| codegen(format!("lowering the GPU module for {} failed: {e}", arch.chip)))?;
    if !module.as_operation().verify() {
        return Err(codegen("the lowered GPU module does not verify (a kiln bug)"));
    }
    // The gpu.module's functions (now in the LLVM dialect) as a module of their own, which
    // MLIR translates to LLVM IR (`nvvm.kernel`/`rocdl.kernel` become the kernel calling
    // conventions).
    let gpu_module = module.body().first_operation().ok_or_else(|| codegen("no gpu.module after lowering"))?;
    let block = gpu_module
        .region(0)
        .ok()
        .and_then(|r| r.first_block())
        .ok_or_else(|| codegen("an empty gpu.module after lowering"))?;
    let mut inner = String::from("module {\n");
    let mut op = block.first_operation();
    while let Some(o) = op {
        inner.push_str(&o.to_string());
        inner.push('\n');
        op = o.next_in_block();
    }
    inner.push_str("}\n");
    let llvm_module =
        Module::parse(&ctx, &inner).ok_or_else(|| codegen("the lowered GPU functions do not parse (a kiln bug)"))?;
    let ir = crate::jit::llvm_ir(&llvm_module)
        .ok_or_else(|| codegen("the lowered GPU module does not translate to LLVM IR (a kiln bug)"))?;
    fix_ir(&ir, arch)
}

/// Device-library calls MLIR's GPU lowerings make for `math` ops, and the LLVM intrinsics the
/// back ends implement them with (kiln links no libdevice or OCML).
const INTRINSICS: &[(&str, &str)] = &[
    ("__nv_floorf", "llvm.floor.f32"),
    ("__nv_ceilf", "llvm.ceil.f32"),
    ("__nv_fabsf", "llvm.fabs.f32"),
    ("__nv_sqrtf", "llvm.sqrt.f32"),
    ("__ocml_floor_f32", "llvm.floor.f32"),
    ("__ocml_ceil_f32", "llvm.ceil.f32"),
    ("__ocml_fabs_f32", "llvm.fabs.f32"),
    ("__ocml_sqrt_f32", "llvm.sqrt.f32"),
];

/// LLVM IR as MLIR translates it, made right for the back end: device-library calls become
/// intrinsics (any other is an error naming it), and on AMDGPU each `alloca` moves to the
/// private address space (5) with a cast back to the flat pointers the code uses.
fn fix_ir(ir: &str, arch: &GpuArch) -> Result<String, TargetError> {
    let mut out = String::with_capacity(ir.len() + 1024);
    for line in ir.lines() {
        let mut line = line.to_string();
        for (lib, intr) in INTRINSICS {
            line = line.replace(&format!("@{lib}("), &format!("@{intr}("));
        }
        if let Some(rest) = line.strip_prefix("declare ") {
            if let Some(name) = rest.split('@').nth(1).and_then(|s| s.split('(').next()) {
                if name.starts_with("__nv_") || name.starts_with("__ocml_") {
                    return Err(codegen(format!(
                        "a GPU kernel calls the device library function {name}, which kiln does not link"
                    )));
                }
            }
        }
        let trimmed = line.trim_start();
        if arch.family == Family::Rocm && trimmed.starts_with('%') && trimmed.contains(" = alloca ") {
            let indent = &line[..line.len() - trimmed.len()];
            let (name, rest) = trimmed.split_once(" = alloca ").expect("checked above");
            let private = format!("%kiln_private_{}", name.trim_start_matches('%'));
            let _ = std::fmt::Write::write_fmt(
                &mut out,
                format_args!(
                    "{indent}{private} = alloca {rest}, addrspace(5)\n{indent}{name} = addrspacecast ptr addrspace(5) {private} to ptr\n"
                ),
            );
            continue;
        }
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// Parses `ir`, stamps the chip, marks each kernel's data pointers `noalias` (a kernel's
/// outputs never overlap its inputs or each other), verifies, runs `default<O3>` and verifies
/// again.
fn optimize<'c>(
    ctx: &'c inkwell::context::Context,
    ir: &str,
    tm: &inkwell::targets::TargetMachine,
) -> Result<inkwell::module::Module<'c>, TargetError> {
    use inkwell::attributes::AttributeLoc;
    use inkwell::memory_buffer::MemoryBuffer;
    use inkwell::passes::PassBuilderOptions;
    let buf = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), "kiln_gpu");
    let module = ctx.create_module_from_ir(buf).map_err(|e| codegen(format!("GPU LLVM IR does not parse: {e}")))?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let noalias = ctx.create_enum_attribute(inkwell::attributes::Attribute::get_named_enum_kind_id("noalias"), 0);
    for f in module.get_functions().filter(|f| f.count_basic_blocks() > 0) {
        // Each memref is (allocated pointer, aligned pointer, offset, sizes, strides): the
        // aligned pointer, every second pointer, is the one accessed.
        let pointers: Vec<u32> =
            f.get_param_iter().enumerate().filter(|(_, p)| p.is_pointer_value()).map(|(i, _)| i as u32).collect();
        for &i in pointers.iter().skip(1).step_by(2) {
            f.add_attribute(AttributeLoc::Param(i), noalias);
        }
    }
    // Shared memory (address space 3) is read and written 16 bytes at a time.
    let mut global = module.get_first_global();
    while let Some(g) = global {
        if g.as_pointer_value().get_type().get_address_space() == inkwell::AddressSpace::from(3u16) {
            g.set_alignment(16);
        }
        global = g.get_next_global();
    }
    module.verify().map_err(|e| codegen(format!("the GPU LLVM module does not verify (a kiln bug): {e}")))?;
    module
        .run_passes("default<O3>", tm, PassBuilderOptions::create())
        .map_err(|e| codegen(format!("LLVM optimization failed: {e}")))?;
    module.verify().map_err(|e| codegen(format!("the optimized GPU module does not verify (a kiln bug): {e}")))?;
    Ok(module)
}

/// A kernel argument: one buffer, passed as a strided memref descriptor of `params` scalars
/// (allocated pointer, aligned pointer, offset, `rank` sizes, `rank` strides; 64-bit each).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ArgLayout {
    /// Position among the kernel's buffers (inputs first).
    pub index: usize,
    pub name: String,
    /// `input` or `output`.
    pub role: &'static str,
    /// For an input, the graph op's operand it binds.
    pub operand: Option<usize>,
    /// Element type in memory: `f32`, or `i8` for a bool tensor (one byte, 0 or 1).
    pub dtype: String,
    /// Dims: a number, or a symbol's name.
    pub shape: Vec<String>,
    /// Bytes of the buffer when its shape is known.
    pub bytes: Option<u64>,
    /// Scalar kernel parameters this buffer takes (3 + 2·rank).
    pub params: usize,
}

/// How to launch one kernel.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KernelLaunch {
    /// The kernel's name (as `kiln compile --emit kernel` lists it), node and op.
    pub name: String,
    pub node: String,
    pub op: String,
    /// The kernel function to launch (identical kernels share one) and the file it is in.
    pub function: String,
    pub file: String,
    /// The ELF object (rocm).
    pub object: Option<String>,
    /// Threads the launch needs: the shared parallel loop's extent (an expression of the
    /// buffers' dims, `dim(%b, axis)`), and its value when the shapes are known.
    pub threads: String,
    pub threads_known: Option<u64>,
    /// Whether the threads split the kernel's work (else one thread runs it whole).
    pub parallel: bool,
    /// Grid and block (x, y, z); the grid is `ceil(threads / block.x)` blocks, or with
    /// `cols` `ceil(cols / block.x) × ceil(threads / cols / block.y)`; `None` while the
    /// threads depend on a symbolic dim.
    pub grid: Option<[u64; 3]>,
    pub block: [u64; 3],
    /// For a two-dimensional grid (a flattened loop of `rows × cols` iterations, a MatMul's
    /// output elements): the columns (the expression, and its value when known); thread
    /// (`col`, `row`) with `col = block_id.x · block_dim.x + thread_id.x < cols` runs
    /// iteration `row · cols + col`.
    pub cols: Option<String>,
    pub cols_known: Option<u64>,
    /// Static shared memory per block, in bytes (a tiled GEMM's `a` and `b` tiles; checked
    /// against the description's limit).
    pub shared_bytes: u64,
    /// A block-tiled MatMul/Gemm's tile ([`gpu_tile`]): a block of `tx·ty` threads (1-D)
    /// computes `tm × tn` outputs, K in `tk` steps through shared memory.
    pub tile: Option<GemmTile>,
    /// A row kernel run a block per row ([`gpu_rows`]): the block's threads (`block.x`) share
    /// each of the row's reductions through shared memory and split its column loops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_block: Option<u64>,
    /// Each thread's local buffers (on its stack): bytes when known, else the expressions.
    pub local_bytes: Option<u64>,
    pub locals: Vec<String>,
    /// The buffers in parameter order.
    pub args: Vec<ArgLayout>,
    /// Total scalar parameters.
    pub params: usize,
}

/// What a compiled model directory holds (`manifest.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Manifest {
    pub target: &'static str,
    pub arch: String,
    pub triple: &'static str,
    /// Kernels in program order.
    pub kernels: Vec<KernelLaunch>,
    /// Kernels that run on the host's reference implementation (not lowered yet).
    pub host_kernels: Vec<HostKernelEntry>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HostKernelEntry {
    pub name: String,
    pub node: String,
    pub op: String,
    pub why: String,
}

/// The value of `i` when every dim it reads is known.
pub fn static_idx(i: &Idx, k: &Kernel) -> Option<i64> {
    let dim = |buf: usize, axis: usize| match k.buffers.get(buf)?.shape.get(axis)? {
        Dim::Known(n) => Some(*n as i64),
        Dim::Sym(_) => None,
    };
    i.eval(&|_| None, &dim, ByZero::Fail).ok()
}

/// The columns of `k`'s two-dimensional grid: the last factor of its shared parallel loop's
/// extent when that is a product (a loop [`flatten`] merged, one iteration per output
/// element: `rows × cols`, row-major) when its value is known; `None` for a
/// one-dimensional grid.
pub fn grid_cols(k: &Kernel) -> Option<&Idx> {
    match native::gpu_launch_extent(k)? {
        Idx::Mul(_, cols) if static_idx(cols, k).is_some() => Some(cols),
        _ => None,
    }
}

/// The launch of kernel `k` (compiled as `function` in `file`).
pub fn launch_of(k: &Kernel, arch: &GpuArch, function: &str, file: &str, object: Option<String>) -> KernelLaunch {
    let extent = native::gpu_launch_extent(k);
    let (threads, threads_known) = match extent {
        Some(e) => (e.to_string(), static_idx(e, k).map(|n| n.max(0) as u64)),
        None => ("1".to_string(), Some(1)),
    };
    let cols = grid_cols(k);
    let cols_known = cols.and_then(|c| static_idx(c, k)).map(|n| n.max(0) as u64);
    let block_threads = arch.block_threads();
    let (grid, block) = match (threads_known, cols, cols_known) {
        // Rows of `block.x` threads (a warp, fewer for narrow rows), `block_threads` a block.
        (_, Some(_), c) => {
            let bx = arch.warp().min(c.map_or(u64::MAX, |c| c.max(1).next_power_of_two()));
            let rows = threads_known.zip(c).map(|(n, c)| n.checked_div(c).unwrap_or(0));
            let by = (block_threads / bx).min(rows.map_or(u64::MAX, |r| r.max(1).next_power_of_two()));
            let grid = rows.zip(c).map(|(r, c)| [c.div_ceil(bx).max(1), r.div_ceil(by).max(1), 1]);
            (grid, [bx, by, 1])
        }
        (Some(n), None, _) => {
            let block = block_threads.min(n.div_ceil(arch.warp()).max(1) * arch.warp());
            (Some([n.div_ceil(block).max(1), 1, 1]), [block, 1, 1])
        }
        (None, None, _) => (None, [block_threads, 1, 1]),
    };
    let block = if extent.is_none() { [1, 1, 1] } else { block };
    let args: Vec<ArgLayout> = k
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let elem = if b.dtype == DType::Bool { 1 } else { 4 };
            let known: Option<u64> = b
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => Some(*n),
                    Dim::Sym(_) => None,
                })
                .product();
            ArgLayout {
                index: i,
                name: b.name.clone(),
                role: if i < k.inputs { "input" } else { "output" },
                operand: k.operands.get(i).copied().filter(|_| i < k.inputs),
                dtype: if b.dtype == DType::Bool { "i8".into() } else { "f32".into() },
                shape: b.shape.iter().map(|d| d.to_string()).collect(),
                bytes: known.map(|n| n * elem),
                params: 3 + 2 * b.shape.len(),
            }
        })
        .collect();
    let local_sizes: Vec<Option<i64>> =
        k.locals.iter().map(|l| l.size.iter().map(|d| static_idx(d, k)).product::<Option<i64>>()).collect();
    let launch = KernelLaunch {
        name: k.name.clone(),
        node: String::new(),
        op: String::new(),
        function: function.to_string(),
        file: file.to_string(),
        object,
        threads,
        threads_known,
        parallel: extent.is_some(),
        grid: if extent.is_none() { Some([1, 1, 1]) } else { grid },
        block,
        cols: cols.map(|c| c.to_string()),
        cols_known,
        shared_bytes: 0,
        tile: None,
        row_block: None,
        local_bytes: local_sizes.iter().map(|n| n.map(|n| 4 * n.max(0) as u64)).sum(),
        locals: k
            .locals
            .iter()
            .map(|l| {
                let dims: Vec<String> = l.size.iter().map(|d| d.to_string()).collect();
                format!("{}: f32[{}]", l.name, dims.join(", "))
            })
            .collect(),
        params: args.iter().map(|a| a.params).sum(),
        args,
    };
    match gpu_tile::recognize(k, arch) {
        Ok(Some(g)) => tiled_launch(launch, &g),
        _ => match gpu_rows::recognize(k, arch) {
            Some(r) => KernelLaunch {
                threads: (r.rows * r.threads).to_string(),
                threads_known: Some(r.rows * r.threads),
                parallel: true,
                grid: Some(r.grid()),
                block: [r.threads, 1, 1],
                cols: None,
                cols_known: None,
                shared_bytes: r.shared_bytes(),
                row_block: Some(r.threads),
                ..launch
            },
            None => launch,
        },
    }
}

/// `l` for the block-tiled GEMM `g`: its grid, a one-dimensional block of the tile's threads,
/// its shared memory.
fn tiled_launch(l: KernelLaunch, g: &gpu_tile::TiledGemm) -> KernelLaunch {
    let threads = g.blocks() * g.tile.threads();
    KernelLaunch {
        threads: threads.to_string(),
        threads_known: Some(threads),
        parallel: true,
        grid: Some(g.grid()),
        block: [g.tile.threads(), 1, 1],
        cols: None,
        cols_known: None,
        shared_bytes: g.tile.shared_bytes(),
        tile: Some(g.tile),
        ..l
    }
}

/// A model compiled for a GPU: each kernel's code and launch, the host kernels.
pub struct GpuProgram {
    pub arch: GpuArch,
    /// Unique kernel functions with their code, in first-use order.
    pub functions: Vec<(String, GpuCode)>,
    /// The lowered kernels in program order (the manifest's `kernels`, same order).
    pub kernels: Vec<Kernel>,
    pub manifest: Manifest,
}

/// Lowers every kernel of `m` (a fused graph) with the GPU [`schedule`] (tuned ones from
/// `tuned`) and compiles each distinct kernel for `arch`.
pub fn compile_model(m: &Module, arch: &GpuArch, tuned: &crate::Tuned) -> Result<GpuProgram, TargetError> {
    let schedules = Schedules { default: schedule(), tuned: tuned.clone() };
    let options = mlir_options(arch);
    let mut functions: Vec<(String, GpuCode)> = Vec::new();
    let mut by_body: HashMap<String, usize> = HashMap::new();
    let mut kernels = Vec::new();
    let mut launches = Vec::new();
    let mut host = Vec::new();
    for (o, name) in native::launched_kernels(m) {
        let op = m.op(o);
        match lower(m, o, &name, &schedules.for_op(m, o)) {
            Ok(k) => {
                let key = format!("{:?}", Kernel { name: String::new(), ..k.clone() });
                let f = match by_body.get(&key) {
                    Some(&f) => f,
                    None => {
                        let tiled = gpu_tile::recognize(&k, arch)
                            .map_err(|e| codegen(format!("kernel {name} (node '{}'): {e}", op.node_name())))?;
                        let text = match (&tiled, gpu_rows::recognize(&k, arch)) {
                            (Some(g), _) => gpu_tile::emit(&k, g, options, true),
                            (None, Some(r)) => gpu_rows::emit(&k, &r, options, true),
                            (None, None) => native::to_gpu_func(&k, options, grid_cols(&k)),
                        };
                        let code = compile_funcs(&text, arch)
                            .map_err(|e| codegen(format!("kernel {name} (node '{}'): {e}", op.node_name())))?;
                        functions.push((k.name.clone(), code));
                        by_body.insert(key, functions.len() - 1);
                        functions.len() - 1
                    }
                };
                let function = functions[f].0.clone();
                let object = (arch.family == Family::Rocm).then(|| format!("{function}.o"));
                let mut l = launch_of(&k, arch, &function, &format!("{function}.{}", arch.code_ext()), object);
                l.node = op.node_name().to_string();
                l.op = op.op_type().to_string();
                launches.push(l);
                kernels.push(k);
            }
            Err(why) => {
                host.push(HostKernelEntry { name, node: op.node_name().to_string(), op: op.op_type().to_string(), why })
            }
        }
    }
    let manifest = Manifest {
        target: arch.family.name(),
        arch: arch.chip.clone(),
        triple: arch.triple(),
        kernels: launches,
        host_kernels: host,
    };
    Ok(GpuProgram { arch: arch.clone(), functions, kernels, manifest })
}

/// The `gpu.func` kernels of `m`'s kernels for `arch` (what `kiln compile --emit mlir`
/// prints for cuda and rocm), a comment for each host kernel.
pub fn gpu_mlir(m: &Module, arch: &GpuArch, tuned: &crate::Tuned) -> String {
    stage_text(m, tuned, |k| match gpu_tile::recognize(k, arch) {
        Ok(Some(g)) => gpu_tile::emit(k, &g, mlir_options(arch), true),
        Ok(None) => match gpu_rows::recognize(k, arch) {
            Some(r) => gpu_rows::emit(k, &r, mlir_options(arch), true),
            None => native::to_gpu_func(k, mlir_options(arch), grid_cols(k)),
        },
        Err(e) => format!("// {}: {e}\n", k.name),
    })
}

/// `m`'s kernels in the kernel dialect as the GPU schedule lowers them (`kiln compile --emit
/// kernel` for cuda and rocm), a comment for each host kernel.
pub fn kernel_text(m: &Module, tuned: &crate::Tuned) -> String {
    stage_text(m, tuned, |k| k.to_string())
}

fn stage_text(m: &Module, tuned: &crate::Tuned, show: impl Fn(&Kernel) -> String) -> String {
    let schedules = Schedules { default: schedule(), tuned: tuned.clone() };
    let mut text = String::new();
    for (o, name) in native::launched_kernels(m) {
        let op = m.op(o);
        match lower(m, o, &name, &schedules.for_op(m, o)) {
            Ok(k) => text.push_str(&show(&k)),
            Err(why) => text.push_str(&format!(
                "// {name} (node '{}', {}): runs on the host: {why}\n",
                op.node_name(),
                op.op_type()
            )),
        }
    }
    text
}

/// The MLIR options of `arch`'s kernels: `ldexp` where the back end has it (AMDGPU).
fn mlir_options(arch: &GpuArch) -> MlirOptions {
    MlirOptions { ldexp: arch.family == Family::Rocm, gpu: true }
}

impl GpuProgram {
    /// Writes each function's code (`NAME.ptx`, or `NAME.s` and `NAME.o`) and `manifest.json`
    /// into `dir`; returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, TargetError> {
        let io = |p: &Path, e: std::io::Error| TargetError::Config(format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut written = Vec::new();
        for (name, code) in &self.functions {
            let p = dir.join(format!("{name}.{}", self.arch.code_ext()));
            std::fs::write(&p, &code.asm).map_err(|e| io(&p, e))?;
            written.push(p);
            if let Some(obj) = &code.object {
                let p = dir.join(format!("{name}.o"));
                std::fs::write(&p, obj).map_err(|e| io(&p, e))?;
                written.push(p);
            }
        }
        let p = dir.join("manifest.json");
        std::fs::write(&p, self.manifest_json()).map_err(|e| io(&p, e))?;
        written.push(p);
        Ok(written)
    }

    /// The manifest as pretty JSON.
    pub fn manifest_json(&self) -> String {
        serde_json::to_string_pretty(&self.manifest).expect("the manifest serializes")
    }

    /// The host kernels as [`HostKernel`]s.
    pub fn host_kernels(&self) -> Vec<HostKernel> {
        self.manifest
            .host_kernels
            .iter()
            .map(|h| HostKernel { name: h.name.clone(), node: h.node.clone(), op: h.op.clone(), why: h.why.clone() })
            .collect()
    }

    /// Every function's assembly (PTX or AMDGCN), each headed by the kernels that launch it,
    /// after a comment per host kernel: what `kiln compile --emit asm` prints.
    pub fn assembly(&self) -> String {
        let c = match self.arch.family {
            Family::Cuda => "//",
            Family::Rocm => ";",
        };
        let mut text = String::new();
        for h in &self.manifest.host_kernels {
            text.push_str(&format!(
                "{c} {} (node '{}', {}): runs on the host's reference implementation: {}\n",
                h.name, h.node, h.op, h.why
            ));
        }
        for (name, code) in &self.functions {
            let users: Vec<String> = self
                .manifest
                .kernels
                .iter()
                .filter(|l| &l.function == name)
                .map(|l| match l.grid {
                    Some(g) if l.cols.is_some() => format!(
                        "{} (grid {}x{}x{}, block {}x{}, {} columns)",
                        l.name,
                        g[0],
                        g[1],
                        g[2],
                        l.block[0],
                        l.block[1],
                        l.cols_known.unwrap_or_default()
                    ),
                    Some(g) => match l.tile {
                        Some(t) => format!(
                            "{} (grid {}x{}x{}, block {}, tile {}x{}x{}, {} shared bytes)",
                            l.name, g[0], g[1], g[2], l.block[0], t.tm, t.tn, t.tk, l.shared_bytes
                        ),
                        None if l.row_block.is_some() => format!(
                            "{} (grid {}x{}x{}, block {}, a block per row, {} shared bytes)",
                            l.name, g[0], g[1], g[2], l.block[0], l.shared_bytes
                        ),
                        None => format!("{} (grid {}x{}x{}, block {})", l.name, g[0], g[1], g[2], l.block[0]),
                    },
                    None => format!("{} (threads {}, block {}x{})", l.name, l.threads, l.block[0], l.block[1]),
                })
                .collect();
            text.push_str(&format!("{c} ==== {name}: {}\n", users.join(", ")));
            text.push_str(&code.asm);
        }
        text
    }

    /// Every function's optimized LLVM IR.
    pub fn llvm_ir(&self) -> String {
        self.functions.iter().map(|(_, c)| c.llvm_ir.as_str()).collect::<Vec<_>>().join("\n")
    }
}

/// The `cuda` or `rocm` target: compiles models to GPU code ([`compile_model`]); running needs
/// a GPU, which this build does not drive ([`Target::run`] says so).
pub struct Gpu {
    pub arch: GpuArch,
    pub tuned: crate::Tuned,
    described: Described,
    machine: MachineDescription,
}

impl Gpu {
    pub fn new(arch: GpuArch, tuned: crate::Tuned) -> Gpu {
        let described = match arch.family {
            Family::Cuda => Described::cuda(),
            Family::Rocm => Described::rocm(),
        };
        let machine = arch.description();
        Gpu { arch, tuned, described, machine }
    }

    /// Compiles a fused graph for this target's chip.
    pub fn compile(&self, m: &Module) -> Result<GpuProgram, TargetError> {
        compile_model(m, &self.arch, &self.tuned)
    }
}

impl Target for Gpu {
    fn name(&self) -> &'static str {
        self.arch.family.name()
    }

    fn summary(&self) -> &'static str {
        self.described.summary()
    }

    /// The chip's description (`--gpu-arch`): the cost model and fusion price plans with it.
    fn machine(&self) -> MachineDescription {
        self.machine.clone()
    }

    fn can_run(&self) -> bool {
        false
    }

    fn run(&self, _: &Module, _: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        Err(TargetError::NotAvailable {
            target: self.arch.family.name(),
            what: "run models",
            why: "kernels compile to GPU code (`kiln compile MODEL --target cuda|rocm -o DIR`); running them needs a GPU and its driver",
        })
    }
}
