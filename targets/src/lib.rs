//! Targets: one module per ISA behind the [`Target`] trait, listed in one table ([`all`]).
//!
//! A target exists first as a machine description (enough for cost models and `kiln inspect`)
//! and gains codegen and a runner as the issues land. Today `ref` (the reference
//! interpreter), `cpu` (native host code), `rvv` (riscv64 vector code under qemu) and `npu`
//! (its simulator) run; `cuda` and `rocm` compile to PTX and AMDGCN (`gpu`). Adding an ISA: a new module implementing [`Target`]
//! and one line in [`all_with`]. Options of a target (`--rvv-vlen`) travel in
//! [`TargetOptions`].

pub mod aot;
pub mod cpu;
pub mod descriptions;
pub mod gpu;
pub mod gpu_plan;
pub mod gpu_rows;
pub mod gpu_tile;
pub mod jit;
pub mod llvm;
pub mod native;
pub mod npu;
mod pool;
pub mod reference;
pub mod rvv;

use kiln_ir::machine::MachineDescription;
use kiln_ir::{Module, Tensor};

/// Why a target could not compile or run a model.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target has no code generator or runner yet.
    #[error("target '{target}' cannot {what} yet: {why}")]
    NotAvailable { target: &'static str, what: &'static str, why: &'static str },
    /// Running the model failed (node and op named inside).
    #[error(transparent)]
    Run(#[from] kiln_ir::interp::InterpError),
    /// Generating or compiling code failed.
    #[error("code generation: {0}")]
    Codegen(String),
    /// A bad machine description (file or preset), named inside.
    #[error("{0}")]
    Config(String),
    /// An external tool the target needs (a cross compiler, an emulator) is missing or failed.
    #[error("{tool}: {why}")]
    Tool { tool: String, why: String },
}

/// Options that select a variant of a target (CLI flags such as `--rvv-vlen`); each target
/// reads the ones that concern it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetOptions {
    /// `rvv`: the vector register length in bits (VLEN) code is generated and emulated for.
    pub rvv_vlen: u32,
    /// Tuned schedules by workload key (`--tuning-db`): kernels whose key is here are lowered
    /// with that schedule, the others with the target's default (cpu, rvv and npu read it).
    pub tuned: Tuned,
    /// `cuda`/`rocm`: the chip (`--gpu-arch`: sm_80, sm_90; gfx90a, gfx906, gfx942); `None`
    /// for each family's default. A chip of the other family leaves a family at its default.
    pub gpu_arch: Option<String>,
}

/// Best known schedule per workload key ([`kiln_passes::lower::workload_key`]).
pub type Tuned = std::sync::Arc<std::collections::HashMap<String, kiln_passes::lower::Schedule>>;

impl Default for TargetOptions {
    fn default() -> TargetOptions {
        TargetOptions { rvv_vlen: rvv::DEFAULT_VLEN, tuned: Tuned::default(), gpu_arch: None }
    }
}

/// One compilation target.
pub trait Target: Send + Sync {
    /// The name used on the command line (`--target NAME`).
    fn name(&self) -> &'static str;
    /// One line: what it is and which chips it stands for.
    fn summary(&self) -> &'static str;
    /// Memory hierarchy and compute resources, for cost models.
    fn machine(&self) -> MachineDescription;
    /// Whether [`Target::run`] executes models today.
    fn can_run(&self) -> bool;
    /// Runs a verified graph-dialect module on inputs ordered as [`Module::inputs`].
    fn run(&self, m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError>;
    /// Prepares `m` for repeated runs (code generation happens here); `None` when the target
    /// runs the module as it is ([`Target::run`]).
    fn prepare(&self, _m: &Module) -> Result<Option<Box<dyn Executable>>, TargetError> {
        Ok(None)
    }
    /// The machine LLVM generates this target's kernels for, if it goes through LLVM: what
    /// `kiln compile --emit llvm|asm` compiles for.
    fn code_target(&self) -> Option<jit::CodeTarget> {
        // `cpu` compiles for the host (kept here so that cpu.rs needs no change; it may move
        // there); `rvv` overrides; the others do not go through LLVM yet.
        (self.name() == "cpu").then(jit::CodeTarget::host)
    }
}

/// A model prepared by [`Target::prepare`]: compiled code and constants in place.
pub trait Executable {
    /// Runs on inputs ordered as the module's inputs, showing `observe` each top-level op's
    /// outputs as they are made; returns the outputs and the run's statistics (peak bytes of
    /// live tensors).
    fn run_observed(
        &self,
        inputs: Vec<Tensor>,
        observe: &mut dyn FnMut(kiln_ir::ir::OpId, &[std::rc::Rc<Tensor>]),
    ) -> Result<(Vec<Tensor>, kiln_ir::interp::RunStats), TargetError>;

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        self.run_observed(inputs, &mut |_, _| {}).map(|(outs, _)| outs)
    }

    /// Kernels that run as generated code.
    fn native_kernels(&self) -> usize;

    /// Kernels that run on the host's reference implementation instead (not lowered yet).
    fn host_kernels(&self) -> &[HostKernel];

    /// For a simulated target, the last run's simulated figures.
    fn sim_report(&self) -> Option<SimReport> {
        None
    }

    /// The program text, for a target whose code is not LLVM's (the NPU's assembly).
    fn assembly(&self) -> Option<String> {
        None
    }
}

/// A simulated target's figures for one run (all kernels, one after another on one core).
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// Simulated cycles of all kernels.
    pub cycles: u64,
    /// `cycles` at the machine's clock, in milliseconds.
    pub ms: f64,
    /// Busy fractions of the matrix unit, the vector unit and the busiest DMA engine,
    /// weighted by each kernel's cycles.
    pub matrix: f64,
    pub vector: f64,
    pub dma: f64,
    /// Bytes read from and written to global memory.
    pub gm_bytes: u64,
    /// Cycles per kernel run, in run order.
    pub kernels: Vec<(String, u64)>,
}

/// A kernel that a target hands back to the host's reference implementation, because its code
/// generator does not cover it yet (as an onnxruntime execution provider hands nodes back).
#[derive(Clone, Debug, PartialEq)]
pub struct HostKernel {
    /// The kernel's name (as `kiln compile --emit kernel` lists it), node and op.
    pub name: String,
    pub node: String,
    pub op: String,
    /// Why lowering refused it.
    pub why: String,
}

/// Every target with default options, in the order `kiln targets` lists them.
pub fn all() -> Vec<Box<dyn Target>> {
    all_with(&TargetOptions::default())
}

/// Every target, configured by `opts`.
pub fn all_with(opts: &TargetOptions) -> Vec<Box<dyn Target>> {
    vec![
        Box::new(reference::Reference),
        Box::new(cpu::Cpu { tuned: opts.tuned.clone() }),
        Box::new(rvv::Rvv::new(opts.rvv_vlen).with_tuned(opts.tuned.clone())),
        Box::new(npu::Npu { tuned: opts.tuned.clone() }),
        Box::new(gpu_target(gpu::Family::Cuda, opts)),
        Box::new(gpu_target(gpu::Family::Rocm, opts)),
    ]
}

/// The `cuda` or `rocm` target for `opts.gpu_arch` when it names a chip of `family`, else for
/// the family's default chip.
pub fn gpu_target(family: gpu::Family, opts: &TargetOptions) -> gpu::Gpu {
    let arch = gpu::GpuArch::new(family, opts.gpu_arch.as_deref())
        .or_else(|_| gpu::GpuArch::new(family, None))
        .expect("the default chip is known");
    gpu::Gpu::new(arch, opts.tuned.clone())
}

/// The GPU target named `name` (`cuda`, `rocm`) configured by `opts`, or `None` for another.
pub fn lookup_gpu(name: &str, opts: &TargetOptions) -> Option<gpu::Gpu> {
    match name {
        "cuda" => Some(gpu_target(gpu::Family::Cuda, opts)),
        "rocm" => Some(gpu_target(gpu::Family::Rocm, opts)),
        _ => None,
    }
}

/// Looks a target up by name (default options).
pub fn lookup(name: &str) -> Option<Box<dyn Target>> {
    lookup_with(name, &TargetOptions::default())
}

/// Looks a target up by name, configured by `opts`.
pub fn lookup_with(name: &str, opts: &TargetOptions) -> Option<Box<dyn Target>> {
    all_with(opts).into_iter().find(|t| t.name() == name)
}

/// Names of every target.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|t| t.name()).collect()
}
