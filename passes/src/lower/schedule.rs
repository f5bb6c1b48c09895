//! The lowering's schedule knobs: register-tile shapes and cache tile sizes, chosen from the
//! target's [`MachineDescription`] (its vector width and register count) instead of being
//! fixed for one ISA. The autotuner (`kiln tune`) searches them per kernel; [`Schedules`]
//! carries its results (best schedule per workload) into compilation.

use kiln_ir::ir::OpId;
use kiln_ir::machine::MachineDescription;
use kiln_ir::Module;
use std::collections::HashMap;
use std::sync::Arc;

/// Tile sizes the contraction and attention lowerings use. Serialized as the `knobs` of a
/// tuning record.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// f32 lanes per vector register (a register tile's vectors).
    pub lanes: usize,
    /// Columns of a register tile (two vectors).
    pub mma_cols: usize,
    /// Rows of a MatMul's register tile.
    pub matmul_mma_rows: usize,
    /// Rows of a 1×1 Conv's register tile (output channels), at most.
    pub conv_channel_rows: usize,
    /// Rows of a direct Conv's register tile (output pixels of a row), at most.
    pub conv_pixel_rows: usize,
    /// Query rows of an attention block.
    pub attention_rows: usize,
    /// Rows of a MatMul's output per parallel iteration (the rows sharing a `B` panel).
    pub matmul_row_block: i64,
    /// Columns of a MatMul's output per cache tile.
    pub matmul_tile_n: i64,
    /// Values of a MatMul's reduction dim per cache tile.
    pub matmul_tile_k: i64,
    /// Softmax's exponentials stored into the output and summed back (one exp per element;
    /// the row is re-read from the cache). Off for scratchpad machines, whose kernels stream a
    /// row through on-chip buffers once.
    pub store_row_terms: bool,
    /// MatMul/Gemm of known sizes as one whole-matrix [`kiln_ir::kernel::Mma`] (`rows` = M,
    /// `cols` = N, the reduction all of K) for a target whose code generator blocks it for a
    /// matrix unit itself (the `npu` target: operands resident in its scratchpads across
    /// tiles and reduction steps). On for machines with a matrix unit and software-managed
    /// memory; never for register-tile code generators (cpu, rvv).
    pub whole_matmul: bool,
    /// MatMul/Gemm, and 2-D Convs (any group), as one reduction per output element (the
    /// inline form, every output element independent) instead of the accumulate form: for GPUs, whose threads are many
    /// and each a scalar core (`targets::gpu` maps one output element to a thread).
    #[serde(default)]
    pub matmul_per_element: bool,
    /// Attention with one parallel iteration per query (batch × heads × queries), its keys
    /// walked once with an online softmax (a running max and sum, the output row rescaled as
    /// the max grows), instead of one per head over query blocks on register tiles: for GPUs,
    /// where a head per thread leaves the chip idle.
    #[serde(default)]
    pub attention_per_query: bool,
}

impl Default for Schedule {
    /// The x86-64 AVX-512 schedule (32 registers of 16 lanes), tuned on one Zen 4 core on a
    /// 512×768·768×768 MatMul, a 256×4096·4096×4096 one and a 64-channel 56×56 3×3 Conv.
    fn default() -> Schedule {
        Schedule::for_vectors(16, 32)
    }
}

impl Schedule {
    /// The schedule for vector registers of `lanes` f32 lanes, `registers` of them: a tile of
    /// `rows × 2` vectors of accumulators keeps two registers for `B` and one for a broadcast.
    pub fn for_vectors(lanes: usize, registers: usize) -> Schedule {
        let lanes = lanes.max(1);
        let rows = ((registers.saturating_sub(3)) / 2).clamp(1, 8);
        Schedule {
            lanes,
            mma_cols: 2 * lanes,
            matmul_mma_rows: rows,
            conv_channel_rows: rows,
            conv_pixel_rows: rows,
            attention_rows: rows,
            matmul_row_block: 64,
            matmul_tile_n: 1024,
            matmul_tile_k: 128,
            store_row_terms: true,
            whole_matmul: false,
            matmul_per_element: false,
            attention_per_query: false,
        }
    }

    /// The schedule for a target: its vector width (at least 128 bits) and vector registers.
    pub fn for_machine(md: &MachineDescription) -> Schedule {
        let lanes = (md.vector_bits.max(128) / 32) as usize;
        let mut s = Schedule::for_vectors(lanes, md.vector_registers as usize);
        let scratchpad = md.levels.iter().any(|l| l.software_managed);
        s.store_row_terms = !scratchpad;
        s.whole_matmul = scratchpad && !md.matrix_shape.is_empty();
        s
    }
}

/// The schedule of each kernel of a model: tuned ones by workload key (from a tuning
/// database, see [`super::workload_key`]), the target's default for the rest.
#[derive(Clone, Debug, Default)]
pub struct Schedules {
    pub default: Schedule,
    /// Best known schedule per workload key.
    pub tuned: Arc<HashMap<String, Schedule>>,
}

impl Schedules {
    /// The target's default for every kernel.
    pub fn uniform(default: Schedule) -> Schedules {
        Schedules { default, tuned: Arc::default() }
    }

    /// The schedule kernel `o` of `m` is lowered with.
    pub fn for_op(&self, m: &Module, o: OpId) -> Schedule {
        if self.tuned.is_empty() {
            return self.default.clone();
        }
        self.tuned.get(&super::workload_key(m, o)).cloned().unwrap_or_else(|| self.default.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn tiles_fit_the_register_file() {
        // AVX-512: 8 rows × 2 vectors of 16 lanes = 16 accumulators of 32 registers.
        assert_eq!(Schedule::default().matmul_mma_rows, 8);
        assert_eq!(Schedule::default().mma_cols, 32);
        // AVX2: 16 registers of 8 lanes → 6 rows × 2 vectors (12 + 2 + 1 registers).
        let avx2 = Schedule::for_vectors(8, 16);
        assert_eq!((avx2.matmul_mma_rows, avx2.mma_cols), (6, 16));
        // Two registers are not a tile: one row, never zero.
        assert_eq!(Schedule::for_vectors(4, 2).matmul_mma_rows, 1);
    }
}
