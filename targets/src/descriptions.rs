//! Targets that exist as machine descriptions while their code generators are built: `cuda`
//! and `rocm`, plus the typical `cpu` figures that `cpu.rs` completes with the host's.
//! Numbers are public figures; where a value is a typical part's, the comment says so.

use crate::{Target, TargetError};
use kiln_ir::machine::{GpuLimits, MachineDescription, MemoryLevel};
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
                gpu: None,
            },
        }
    }

    pub fn cuda() -> Described {
        Described {
            name: "cuda",
            summary: "NVIDIA and CUDA-compatible GPUs: PTX for sm_80 (default) and sm_90",
            why: "GPU code generation lands with issue #9",
            machine: || gpu_machine("sm_80").expect("sm_80 is described"),
        }
    }

    pub fn rocm() -> Described {
        Described {
            name: "rocm",
            summary: "AMD and Hygon DCU GPUs: AMDGCN for gfx90a (default), gfx906 (Hygon DCU stand-in), gfx942",
            why: "GPU code generation lands with issue #9",
            machine: || gpu_machine("gfx90a").expect("gfx90a is described"),
        }
    }
}

/// NVIDIA: 32-thread warps, 1024 threads a block, 64K 32-bit registers per SM, at most 255
/// per thread; static `__shared__` memory is limited to 48 KiB a block (more needs the
/// dynamic opt-in).
fn nvidia(shared_opt_in_kib: u64) -> GpuLimits {
    GpuLimits {
        warp: 32,
        max_threads_per_block: 1024,
        shared_bytes_per_block: shared_opt_in_kib * 1024,
        static_shared_bytes_per_block: 48 * 1024,
        registers_per_sm: 65536,
        max_registers_per_thread: 255,
    }
}

/// AMD CDNA/GCN: 64-lane wavefronts, 1024 work-items a workgroup, 64 KiB LDS a workgroup;
/// `vgprs_per_lane` VGPRs (arch + accumulation) per lane of each of the CU's 4 SIMDs.
fn amd(vgprs_per_lane: u32) -> GpuLimits {
    GpuLimits {
        warp: 64,
        max_threads_per_block: 1024,
        shared_bytes_per_block: 64 * 1024,
        static_shared_bytes_per_block: 64 * 1024,
        registers_per_sm: 4 * 64 * vgprs_per_lane,
        max_registers_per_thread: vgprs_per_lane.min(512),
    }
}

/// The machine description of GPU `chip` (`sm_80`, `sm_90`, `gfx906`, `gfx90a`, `gfx942`);
/// `None` for another. Public figures of one representative part per chip (vendor data
/// sheets and whitepapers); levels are global memory (capacity, HBM bandwidth), L2, and the
/// shared memory / LDS of one block (capacity: the most a block may use; bandwidth: 128 bytes
/// a clock per SM/CU). `vector_gflops` is the f32 FMA peak (2 FLOPs), `matrix_gflops` the
/// matrix unit's rate for f32 products as kiln issues them: on NVIDIA a third of the TF32 peak
/// (3xTF32, three instructions a product, [`crate::gpu_tile::MatrixInst::MmaTf32x3`]), on AMD
/// the MFMA f32 peak.
pub fn gpu_machine(chip: &str) -> Option<MachineDescription> {
    let smem_gbps = |units: f64, ghz: f64| units * 128.0 * ghz;
    Some(match chip {
        // A100 SXM4 80 GB: 108 SMs at 1.41 GHz boost, 2039 GB/s HBM2e, 40 MB L2, up to 164 KB
        // shared per SM (163 KiB a block opt-in, 48 KiB static), 19.5 TFLOP/s f32, 156 TF32 (52 as
        // 3xTF32).
        "sm_80" => MachineDescription {
            name: "cuda-sm_80".into(),
            clock_ghz: 1.41,
            cores: 108,
            levels: vec![
                level("global", 80 << 20, 2039.0, 400, false),
                level("l2", 40 << 10, 4800.0, 200, false),
                level("shared", 163, smem_gbps(108.0, 1.41), 30, true),
            ],
            vector_gflops: 19500.0,
            vector_bits: 1024,
            vector_registers: 64,
            matrix_shape: vec![16, 8, 8],
            matrix_gflops: 52000.0,
            launch_us: 4.0,
            gpu: Some(nvidia(163)),
        },
        // H100 SXM5 80 GB: 132 SMs at 1.98 GHz boost, 3350 GB/s HBM3, 50 MB L2, 227 KiB shared
        // a block (opt-in), 67 TFLOP/s f32, 495 TF32 (dense; 165 as
        // 3xTF32).
        "sm_90" => MachineDescription {
            name: "cuda-sm_90".into(),
            clock_ghz: 1.98,
            cores: 132,
            levels: vec![
                level("global", 80 << 20, 3350.0, 450, false),
                level("l2", 50 << 10, 7300.0, 200, false),
                level("shared", 227, smem_gbps(132.0, 1.98), 30, true),
            ],
            vector_gflops: 67000.0,
            vector_bits: 1024,
            vector_registers: 64,
            matrix_shape: vec![16, 8, 8],
            matrix_gflops: 164900.0,
            launch_us: 3.0,
            gpu: Some(nvidia(227)),
        },
        // MI50 (Vega 20, gfx906; the Hygon DCU stand-in): 60 CUs at 1.725 GHz, 1024 GB/s HBM2
        // (32 GB), 4 MB L2, 64 KiB LDS, 13.4 TFLOP/s f32, no matrix unit; 256 VGPRs a lane.
        "gfx906" => MachineDescription {
            name: "rocm-gfx906".into(),
            clock_ghz: 1.725,
            cores: 60,
            levels: vec![
                level("global", 32 << 20, 1024.0, 500, false),
                level("l2", 4 << 10, 2500.0, 200, false),
                level("lds", 64, smem_gbps(60.0, 1.725), 40, true),
            ],
            vector_gflops: 13400.0,
            vector_bits: 2048,
            vector_registers: 64,
            matrix_shape: vec![],
            matrix_gflops: 0.0,
            launch_us: 6.0,
            gpu: Some(amd(256)),
        },
        // MI250X, one of its two GCDs (gfx90a): 110 CUs at 1.7 GHz, 1638 GB/s HBM2e (64 GB),
        // 8 MB L2, 64 KiB LDS, 23.9 TFLOP/s f32 vector, 47.9 MFMA f32; 512 VGPRs a lane
        // (arch + accumulation).
        "gfx90a" => MachineDescription {
            name: "rocm-gfx90a".into(),
            clock_ghz: 1.7,
            cores: 110,
            levels: vec![
                level("global", 64 << 20, 1638.0, 500, false),
                level("l2", 8 << 10, 4000.0, 200, false),
                level("lds", 64, smem_gbps(110.0, 1.7), 40, true),
            ],
            vector_gflops: 23900.0,
            vector_bits: 2048,
            vector_registers: 64,
            matrix_shape: vec![16, 16, 4],
            matrix_gflops: 47900.0,
            launch_us: 6.0,
            gpu: Some(amd(512)),
        },
        // MI300X (gfx942): 304 CUs at 2.1 GHz, 5300 GB/s HBM3 (192 GB), 4 MB L2 per XCD (32 MB;
        // the 256 MB Infinity Cache is not modelled), 64 KiB LDS, 81.7 TFLOP/s f32 vector,
        // 163.4 MFMA f32; 512 VGPRs a lane.
        "gfx942" => MachineDescription {
            name: "rocm-gfx942".into(),
            clock_ghz: 2.1,
            cores: 304,
            levels: vec![
                level("global", 192 << 20, 5300.0, 500, false),
                level("l2", 32 << 10, 14000.0, 200, false),
                level("lds", 64, smem_gbps(304.0, 2.1), 40, true),
            ],
            vector_gflops: 81700.0,
            vector_bits: 2048,
            vector_registers: 64,
            matrix_shape: vec![16, 16, 4],
            matrix_gflops: 163400.0,
            launch_us: 6.0,
            gpu: Some(amd(512)),
        },
        _ => return None,
    })
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
