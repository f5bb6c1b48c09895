//! `cpu`: the host, as native code. Each kernel of the fused graph is lowered to the kernel
//! dialect, emitted as upstream MLIR and JIT-compiled ([`crate::native`]). Issue #5 in
//! progress: models run when every kernel lowers (elementwise, row reductions, MatMul/Gemm
//! with epilogues); others are refused with the list of kernels not lowered yet.

use crate::native::NativeModel;
use crate::{Executable, Target, TargetError};
use kiln_ir::machine::MachineDescription;
use kiln_ir::{Module, Tensor};

pub struct Cpu;

impl Target for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn summary(&self) -> &'static str {
        "host CPU (x86-64 AVX2/AVX-512/FMA, aarch64) through MLIR and LLVM (JIT; kernels being extended, #5)"
    }

    fn machine(&self) -> MachineDescription {
        crate::descriptions::Described::cpu().machine()
    }

    fn can_run(&self) -> bool {
        true
    }

    fn run(&self, m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        NativeModel::compile(m)?.run(inputs)
    }

    fn prepare(&self, m: &Module) -> Result<Option<Box<dyn Executable>>, TargetError> {
        Ok(Some(Box::new(NativeModel::compile(m)?)))
    }
}

impl Executable for NativeModel {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        NativeModel::run(self, inputs)
    }
}
