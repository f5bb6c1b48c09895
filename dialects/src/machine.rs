//! Machine descriptions: the plain data that cost models read (memory levels, capacities,
//! bandwidths, compute peaks, vector and matrix shapes).
//!
//! Boundary: this type lives below `passes` so that the e-graph cost model can price a plan
//! for any target without naming one; `targets` builds the descriptions and hands them down.

use serde::{Deserialize, Serialize};

/// One level of a memory hierarchy, from the largest/slowest (index 0) to the fastest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryLevel {
    /// Name as the target calls it (`dram`, `l2`, `GM`, `UB`, `shared`, ...).
    pub name: String,
    /// Capacity in bytes (per core / per block where the level is private).
    pub capacity_bytes: u64,
    /// Sustained bandwidth into the next-faster level, in GB/s.
    pub bandwidth_gbps: f64,
    /// Latency of one access or DMA transfer, in cycles.
    pub latency_cycles: u32,
    /// Software-managed (scratchpad, explicit DMA) rather than a cache.
    pub software_managed: bool,
}

/// A target's compute and memory resources.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineDescription {
    pub name: String,
    /// Clock in GHz.
    pub clock_ghz: f64,
    /// Parallel cores / compute units / SMs.
    pub cores: u32,
    /// Memory levels, slowest first.
    pub levels: Vec<MemoryLevel>,
    /// Peak vector throughput, f32 GFLOP/s over all cores.
    pub vector_gflops: f64,
    /// Vector register width in bits (0: none).
    pub vector_bits: u32,
    /// Architectural vector registers (32 for AVX-512, RVV and NEON, 16 for AVX2).
    #[serde(default = "default_vector_registers")]
    pub vector_registers: u32,
    /// Matrix unit tile shape `[m, n, k]` (empty: none).
    pub matrix_shape: Vec<u32>,
    /// Peak matrix throughput, GFLOP/s (0: no matrix unit).
    pub matrix_gflops: f64,
    /// Fixed cost of launching one kernel, in microseconds (fork-join of a thread pool on a
    /// CPU, a launch on a GPU, a task dispatch on an NPU).
    #[serde(default)]
    pub launch_us: f64,
    /// A GPU's execution limits (absent for CPUs and NPUs; descriptions without the field
    /// still load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuLimits>,
}

/// What GPU code generation needs beyond the memory levels and peaks: the SIMT width, block
/// limits and the register file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuLimits {
    /// Threads that execute in lockstep: a warp (32) or a wavefront (64).
    pub warp: u32,
    /// Most threads one block (workgroup) may have.
    pub max_threads_per_block: u32,
    /// Most shared memory (LDS) one block may use, opt-in included, in bytes.
    pub shared_bytes_per_block: u64,
    /// Most statically allocated shared memory one block may use without opting in (48 KiB
    /// on NVIDIA; the whole LDS on AMD), in bytes: the limit for kiln's static `.shared`.
    pub static_shared_bytes_per_block: u64,
    /// 32-bit registers per SM / CU.
    pub registers_per_sm: u32,
    /// Most 32-bit registers one thread may use.
    pub max_registers_per_thread: u32,
}

fn default_vector_registers() -> u32 {
    32
}

impl MachineDescription {
    /// The fastest level that a fused kernel's intermediates should stay in.
    pub fn fast_level(&self) -> Option<&MemoryLevel> {
        self.levels.last()
    }

    /// A stable hash of the description (tuning records are keyed by it).
    pub fn stable_hash(&self) -> u64 {
        // FNV-1a over the JSON form: stable across runs and platforms.
        let json = serde_json_like(self);
        // Descriptions without GPU limits hash as before the field existed (tuning records
        // keyed by them stay valid).
        let json = json.replace(", gpu: None", "");
        let mut h: u64 = 0xcbf29ce484222325;
        for b in json.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    }
}

fn serde_json_like(m: &MachineDescription) -> String {
    format!("{m:?}")
}
