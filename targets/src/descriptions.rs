//! Targets that exist as machine descriptions while their code generators are built: `cuda`
//! and `rocm`, plus the typical `cpu` figures that `cpu.rs` completes with the host's.
//! Numbers are public figures; where a value is a typical part's, the comment says so.

use crate::{Target, TargetError};
use kiln_ir::machine::{MachineDescription, MemoryLevel};
use kiln_ir::{Module, Tensor};

/// A target known by its description only: it prices plans but runs nothing yet.
pub struct Described {
    name: &'static str,
    summary: &'static str,
    why: &'static str,
    machine: fn() -> MachineDescription,
}

fn level(name: &str, kib: u64, gbps: f64, latency: u32, scratch: bool) -> MemoryLevel {
    MemoryLevel {
        name: name.into(),
        capacity_bytes: kib * 1024,
        bandwidth_gbps: gbps,
        latency_cycles: latency,
        software_managed: scratch,
    }
}

impl Described {
    pub fn cpu() -> Described {
        Described {
            name: "cpu",
            summary: "host CPU (x86-64 AVX2/AVX-512/FMA, aarch64) through MLIR and LLVM",
            why: "native CPU code generation lands with the kernel dialect (issue #5)",
            machine: || MachineDescription {
                // A typical 2-core x86-64 server slice with AVX2+FMA.
                name: "cpu".into(),
                clock_ghz: 2.5,
                cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                levels: vec![
                    level("dram", 16 << 20, 20.0, 200, false),
                    level("l3", 32 << 10, 100.0, 40, false),
                    level("l2", 1024, 200.0, 14, false),
                    level("l1", 32, 400.0, 4, false),
                ],
                vector_gflops: 80.0,
                vector_bits: 256,
                vector_registers: 16,
                matrix_shape: vec![],
                matrix_gflops: 0.0,
                launch_us: 2.0,
            },
        }
    }

    pub fn cuda() -> Described {
        Described {
            name: "cuda",
            summary: "NVIDIA and CUDA-compatible GPUs: PTX for sm_80 (default) and sm_90",
            why: "GPU code generation lands with issue #9",
            machine: || MachineDescription {
                // A100-SXM (sm_80): 108 SMs, 40 MB L2, 164 KB shared memory per SM, HBM2e.
                name: "cuda-sm_80".into(),
                clock_ghz: 1.41,
                cores: 108,
                levels: vec![
                    level("global", 40 << 20, 1555.0, 400, false),
                    level("l2", 40 << 10, 4000.0, 200, false),
                    level("shared", 164, 19000.0, 30, true),
                ],
                vector_gflops: 19500.0,
                vector_bits: 1024,
                vector_registers: 64,
                matrix_shape: vec![16, 8, 16],
                matrix_gflops: 156000.0,
                launch_us: 4.0,
            },
        }
    }

    pub fn rocm() -> Described {
        Described {
            name: "rocm",
            summary: "AMD and Hygon DCU GPUs: AMDGCN for gfx90a (default), gfx906 (Hygon DCU stand-in), gfx942",
            why: "GPU code generation lands with issue #9",
            machine: || MachineDescription {
                // MI210 (gfx90a): 104 CUs, 8 MB L2, 64 KB LDS per CU, HBM2e.
                name: "rocm-gfx90a".into(),
                clock_ghz: 1.7,
                cores: 104,
                levels: vec![
                    level("global", 64 << 20, 1638.0, 500, false),
                    level("l2", 8 << 10, 4000.0, 200, false),
                    level("lds", 64, 12000.0, 40, true),
                ],
                vector_gflops: 22600.0,
                vector_bits: 2048,
                vector_registers: 64,
                matrix_shape: vec![16, 16, 16],
                matrix_gflops: 181000.0,
                launch_us: 6.0,
            },
        }
    }
}

impl Target for Described {
    fn name(&self) -> &'static str {
        self.name
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn machine(&self) -> MachineDescription {
        (self.machine)()
    }

    fn can_run(&self) -> bool {
        false
    }

    fn run(&self, _: &Module, _: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        Err(TargetError::NotAvailable { target: self.name, what: "run models", why: self.why })
    }
}
