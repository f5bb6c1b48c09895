//! Code generation (placeholder).
use crate::{isa::Program, NpuConfig, NpuError};
use kiln_ir::kernel::Kernel;

/// Compiles `kernel` at concrete `shapes` for `cfg`.
pub fn compile(_kernel: &Kernel, _shapes: &[Vec<usize>], _cfg: &NpuConfig) -> Result<Program, NpuError> {
    Err(NpuError::Unsupported("todo".into()))
}
