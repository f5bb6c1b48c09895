//! `cpu`: the host, as native code. Each kernel of the fused graph is lowered to the kernel
//! dialect, emitted as upstream MLIR and JIT-compiled ([`crate::native`]), its parallel loop
//! split over a thread pool. Kernels the lowering does not cover yet run on the host's
//! reference implementation and are listed (`kiln inspect`, `kiln bench --json`).

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
