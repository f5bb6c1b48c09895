//! The LLVM and MLIR toolchain kiln links (LLVM/MLIR 22, statically): a probe that proves the
//! link and reports what the code generators will have. `kiln targets` prints it.

use melior::{dialect::DialectRegistry, utility::register_all_dialects, Context};

/// What the linked LLVM/MLIR provide.
#[derive(Clone, Debug)]
pub struct Toolchain {
    /// LLVM version (major, minor, patch).
    pub llvm_version: (u32, u32, u32),
    /// The host's target triple as LLVM names it.
    pub host_triple: String,
    /// The host CPU name and features LLVM detects (for `cpu` code generation).
    pub host_cpu: String,
    pub host_features: String,
    /// Number of MLIR dialects registered in a fresh context.
    pub mlir_dialects: usize,
    /// LLVM backends kiln initializes (one per ISA family).
    pub backends: Vec<&'static str>,
}

/// Probes LLVM (through inkwell) and MLIR (through melior).
pub fn probe() -> Toolchain {
    use inkwell::targets::{InitializationConfig, Target as LlvmTarget, TargetMachine};
    let cfg = InitializationConfig::default();
    LlvmTarget::initialize_x86(&cfg);
    LlvmTarget::initialize_aarch64(&cfg);
    LlvmTarget::initialize_riscv(&cfg);
    LlvmTarget::initialize_nvptx(&cfg);
    LlvmTarget::initialize_amd_gpu(&cfg);
    let backends = ["x86-64", "aarch64", "riscv64", "nvptx64", "amdgcn"]
        .into_iter()
        .zip([
            "x86_64-unknown-linux-gnu",
            "aarch64-unknown-linux-gnu",
            "riscv64-unknown-linux-gnu",
            "nvptx64-nvidia-cuda",
            "amdgcn-amd-amdhsa",
        ])
        .filter(|(_, triple)| LlvmTarget::from_triple(&inkwell::targets::TargetTriple::create(triple)).is_ok())
        .map(|(name, _)| name)
        .collect();
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let ctx = Context::new();
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    Toolchain {
        llvm_version: inkwell::support::get_llvm_version(),
        host_triple: TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned(),
        host_cpu: TargetMachine::get_host_cpu_name().to_string(),
        host_features: TargetMachine::get_host_cpu_features().to_string(),
        mlir_dialects: ctx.loaded_dialect_count(),
        backends,
    }
}
