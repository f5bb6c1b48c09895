//! `cpu`: the host, as native code. Each kernel of the fused graph is lowered to the kernel
//! dialect, emitted as upstream MLIR and JIT-compiled ([`crate::native`]), its parallel loop
//! split over a thread pool. Kernels the lowering does not cover yet run on the host's
//! reference implementation and are listed (`kiln inspect`, `kiln bench --json`).

use crate::native::NativeModel;
use crate::{Executable, Target, TargetError};
use kiln_ir::machine::MachineDescription;
use kiln_ir::{Module, Tensor};

/// The host CPU target; `tuned` holds tuned schedules per workload (`--tuning-db`).
#[derive(Default)]
pub struct Cpu {
    pub tuned: crate::Tuned,
}

impl Cpu {
    fn compile(&self, m: &Module) -> Result<NativeModel, TargetError> {
        NativeModel::compile_tuned(m, &self.tuned)
    }
}

impl Target for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn summary(&self) -> &'static str {
        "host CPU (x86-64 AVX2/AVX-512/FMA, aarch64) through MLIR and LLVM (JIT; kernels being extended, #5)"
    }

    fn machine(&self) -> MachineDescription {
        host_machine().clone()
    }

    fn can_run(&self) -> bool {
        true
    }

    fn run(&self, m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        self.compile(m)?.run(inputs)
    }

    fn prepare(&self, m: &Module) -> Result<Option<Box<dyn Executable>>, TargetError> {
        Ok(Some(Box::new(self.compile(m)?)))
    }
}

impl Executable for NativeModel {
    fn run_observed(
        &self,
        inputs: Vec<Tensor>,
        observe: &mut dyn FnMut(kiln_ir::ir::OpId, &[std::rc::Rc<Tensor>]),
    ) -> Result<(Vec<Tensor>, kiln_ir::interp::RunStats), TargetError> {
        NativeModel::run_observed(self, inputs, observe)
    }

    fn native_kernels(&self) -> usize {
        self.kernels()
    }

    fn host_kernels(&self) -> &[crate::HostKernel] {
        NativeModel::host_kernels(self)
    }
}

/// The host's description: the typical figures of [`crate::descriptions::Described::cpu`] with
/// the vector width and register count of the CPU this runs on (AVX-512: 32 registers of 512
/// bits; AVX2: 16 of 256; NEON: 32 of 128).
pub fn host_machine() -> &'static MachineDescription {
    static HOST: std::sync::OnceLock<MachineDescription> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let mut md = crate::descriptions::Described::cpu().machine();
        let features = inkwell::targets::TargetMachine::get_host_cpu_features().to_string();
        let has = |f: &str| features.split(',').any(|x| x == f);
        let (bits, registers) = if has("+avx512f") {
            (512, 32)
        } else if has("+avx2") || has("+avx") {
            (256, 16)
        } else if cfg!(target_arch = "aarch64") {
            (128, 32)
        } else {
            (128, 16)
        };
        md.vector_gflops *= bits as f64 / md.vector_bits.max(1) as f64;
        md.vector_bits = bits;
        md.vector_registers = registers;
        md
    })
}

/// The lowering's tile sizes for the host ([`host_machine`]).
pub fn schedule() -> &'static kiln_passes::lower::Schedule {
    static SCHEDULE: std::sync::OnceLock<kiln_passes::lower::Schedule> = std::sync::OnceLock::new();
    SCHEDULE.get_or_init(|| kiln_passes::lower::Schedule::for_machine(host_machine()))
}
