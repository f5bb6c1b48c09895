//! The cost model: what a kernel costs on a target, from the target's machine description.
//!
//! A kernel reads its inputs from the slowest memory level and writes its outputs back; in
//! between, its intermediates live in the fastest level. Its time is a roofline:
//! `max(bytes / bandwidth, flops / peak) + launch`, plus a penalty when its working set does
//! not fit the fast level (the intermediates spill to the next level and back). The e-graph
//! extractor prices each op as its own kernel with it; the fusion partitioner prices a group.
//!
//! Symbolic dims count as their binding when one is given ([`CostModel::with_dims`]: `--dim
//! NAME=N`). Unbound ones (shape rules name run-time sizes afresh, e.g. after broadcasting
//! against a slice) count as the largest binding, since they are usually derived from a bound
//! dim; with no binding at all every symbol counts 1 (figures are then per unit of each symbol).

use kiln_ir::attr::Attrs;
use kiln_ir::graph::AttrView;
use kiln_ir::machine::MachineDescription;
use kiln_ir::{Dim, TensorType};
use std::collections::HashMap;

/// Size of a dim: known, bound, else the largest binding (1 without bindings).
fn dim_size(d: &Dim, dims: &HashMap<String, u64>) -> u64 {
    match d {
        Dim::Known(n) => *n,
        Dim::Sym(s) => dims.get(&**s).copied().unwrap_or_else(|| dims.values().copied().max().unwrap_or(1)),
    }
}

/// Ops that only reinterpret their input's shape: they alias it and cost nothing.
pub fn is_view(op_type: &str) -> bool {
    matches!(op_type, "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity")
}

/// Ops that a matrix unit runs, where a target has one.
pub fn is_contraction(op_type: &str) -> bool {
    matches!(op_type, "MatMul" | "Gemm" | "Conv" | "ConvTranspose" | "Attention" | "MatMulInteger" | "QLinearMatMul")
}

/// What one kernel does: bytes it moves to and from the slow level, floating-point work,
/// and bytes of intermediates that do not fit the fast level.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelWork {
    pub bytes: u64,
    pub flops: f64,
    /// Work done on a matrix unit (subset of `flops`).
    pub matrix_flops: f64,
    pub spill_bytes: u64,
}

/// Prices kernels for one machine.
#[derive(Clone, Debug)]
pub struct CostModel {
    /// Bytes/s between the slowest level and the core.
    slow_bw: f64,
    /// Bytes/s of the level that spilled intermediates go to.
    spill_bw: f64,
    fast_capacity: u64,
    vector_flops: f64,
    matrix_flops: f64,
    launch_s: f64,
    dims: HashMap<String, u64>,
}

impl CostModel {
    /// Binds symbolic dims for pricing (unbound ones count 1).
    pub fn with_dims(mut self, dims: impl IntoIterator<Item = (String, u64)>) -> CostModel {
        self.dims.extend(dims);
        self
    }

    /// Elements of a type (unranked counts 1).
    pub fn numel(&self, t: &TensorType) -> u64 {
        t.shape.as_ref().map_or(1, |s| s.iter().map(|d| dim_size(d, &self.dims)).product())
    }

    /// Bytes of a tensor of this type (sub-byte types round up).
    pub fn bytes(&self, t: &TensorType) -> u64 {
        (self.numel(t) * t.dtype.bit_width() as u64).div_ceil(8)
    }

    pub fn new(m: &MachineDescription) -> CostModel {
        let gb = |x: f64| x.max(1e-3) * 1e9;
        let slow = m.levels.first();
        let spill = m.levels.get(1).or(slow);
        let fast = m.levels.last();
        let vector = gb(m.vector_gflops);
        CostModel {
            slow_bw: slow.map_or(gb(10.0), |l| gb(l.bandwidth_gbps)),
            spill_bw: spill.map_or(gb(10.0), |l| gb(l.bandwidth_gbps)),
            fast_capacity: fast.map_or(32 << 10, |l| l.capacity_bytes),
            vector_flops: vector,
            matrix_flops: if m.matrix_gflops > 0.0 { gb(m.matrix_gflops) } else { vector },
            launch_s: m.launch_us.max(0.0) * 1e-6,
            dims: HashMap::new(),
        }
    }

    /// Bytes a fused kernel's working set may take before it spills.
    pub fn fast_capacity(&self) -> u64 {
        self.fast_capacity
    }

    /// Seconds one kernel takes.
    pub fn seconds(&self, w: &KernelWork) -> f64 {
        let memory = w.bytes as f64 / self.slow_bw + 2.0 * w.spill_bytes as f64 / self.spill_bw;
        let vector = (w.flops - w.matrix_flops).max(0.0) / self.vector_flops;
        let compute = vector + w.matrix_flops / self.matrix_flops;
        memory.max(compute) + self.launch_s
    }
}

impl CostModel {
    /// Floating-point work of one op, from its input and output types.
    pub fn flops(&self, op_type: &str, attrs: &Attrs, inputs: &[Option<&TensorType>], outputs: &[&TensorType]) -> f64 {
        let numel = |t: &TensorType| self.numel(t);
        let out: f64 = outputs.iter().map(|t| numel(t) as f64).sum();
        let input = |i: usize| inputs.get(i).copied().flatten();
        let dim = |t: Option<&TensorType>, i: isize| -> f64 {
            t.and_then(|t| t.shape.as_ref())
                .and_then(|s| {
                    let i = if i < 0 { s.len() as isize + i } else { i };
                    s.get(usize::try_from(i).ok()?)
                })
                .map_or(1, |d| dim_size(d, &self.dims)) as f64
        };
        let in_numel = |i: usize| input(i).map_or(0.0, |t| numel(t) as f64);
        match op_type {
            "MatMul" | "MatMulInteger" => 2.0 * out * dim(input(0), -1),
            "Gemm" => {
                let trans_a = AttrView(attrs).int("transA", 0).unwrap_or(0) != 0;
                2.0 * out * dim(input(0), if trans_a { 0 } else { 1 })
            }
            "Conv" | "ConvInteger" => {
                let w = input(1);
                let per = w
                    .and_then(|t| t.shape.as_ref())
                    .map_or(1.0, |s| s.iter().skip(1).map(|d| d.known().unwrap_or(1) as f64).product::<f64>());
                2.0 * out * per
            }
            "ConvTranspose" => {
                let w = input(1);
                let per = w
                    .and_then(|t| t.shape.as_ref())
                    .map_or(1.0, |s| s.iter().skip(1).map(|d| d.known().unwrap_or(1) as f64).product::<f64>());
                2.0 * in_numel(0) * per
            }
            // Q·Kᵀ and P·V: 4·B·H·S·T·D.
            "Attention" => 4.0 * in_numel(0) * dim(input(1), -2),
            "Exp" | "Log" | "Erf" | "Tanh" | "Sigmoid" | "Gelu" | "Swish" | "Mish" | "Softplus" | "Pow" | "Sin"
            | "Cos" | "Elu" | "Selu" | "HardSwish" => 10.0 * out,
            "LayerNormalization"
            | "RMSNormalization"
            | "Softmax"
            | "LogSoftmax"
            | "GroupNormalization"
            | "InstanceNormalization" => 8.0 * in_numel(0),
            "MaxPool" | "AveragePool" | "LpPool" => {
                let k: f64 = AttrView(attrs)
                    .ints("kernel_shape")
                    .ok()
                    .flatten()
                    .map_or(1.0, |k| k.iter().map(|&v| v.max(1) as f64).product());
                out * k
            }
            _ => out.max(in_numel(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::machine::MemoryLevel;
    use kiln_ir::DType;

    fn machine() -> MachineDescription {
        let level = |name: &str, kib: u64, gbps: f64| MemoryLevel {
            name: name.into(),
            capacity_bytes: kib << 10,
            bandwidth_gbps: gbps,
            latency_cycles: 1,
            software_managed: false,
        };
        MachineDescription {
            name: "t".into(),
            clock_ghz: 1.0,
            cores: 1,
            levels: vec![level("dram", 1 << 20, 10.0), level("l1", 32, 100.0)],
            vector_gflops: 10.0,
            vector_bits: 256,
            vector_registers: 16,
            matrix_shape: vec![],
            matrix_gflops: 0.0,
            launch_us: 1.0,
            gpu: None,
        }
    }

    #[test]
    fn a_kernel_is_a_roofline_plus_its_launch() {
        let c = CostModel::new(&machine());
        // Memory-bound: 1 GB at 10 GB/s.
        let mem = c.seconds(&KernelWork { bytes: 1_000_000_000, flops: 1.0, ..Default::default() });
        assert!((mem - (0.1 + 1e-6)).abs() < 1e-9, "{mem}");
        // Compute-bound: 1 GFLOP at 10 GFLOP/s.
        let comp = c.seconds(&KernelWork { bytes: 8, flops: 1e9, ..Default::default() });
        assert!((comp - (0.1 + 1e-6)).abs() < 1e-9, "{comp}");
        // Spilled intermediates go to the next level and back.
        let spill = c.seconds(&KernelWork { bytes: 0, spill_bytes: 1_000_000_000, ..Default::default() });
        assert!((spill - (0.02 + 1e-6)).abs() < 1e-9, "{spill}");
        assert_eq!(c.fast_capacity(), 32 << 10);
    }

    #[test]
    fn symbolic_dims_count_their_binding_else_the_largest_else_one() {
        let t = TensorType::new(DType::F32, vec![Dim::sym("B"), Dim::sym("S"), Dim::Known(8)]);
        let c = CostModel::new(&machine());
        assert_eq!(c.numel(&t), 8);
        let c = c.with_dims([("S".to_string(), 16)]);
        assert_eq!(c.numel(&t), 16 * 16 * 8, "an unbound dim counts as the largest binding");
        let c = c.with_dims([("B".to_string(), 2)]);
        assert_eq!(c.bytes(&t), 2 * 16 * 8 * 4);
        let bits = TensorType::known(DType::I4, &[3]);
        assert_eq!(c.bytes(&bits), 2, "sub-byte types round up");
    }

    #[test]
    fn flops_of_contractions_and_elementwise_ops() {
        let c = CostModel::new(&machine());
        let a = TensorType::known(DType::F32, &[4, 8]);
        let b = TensorType::known(DType::F32, &[8, 16]);
        let y = TensorType::known(DType::F32, &[4, 16]);
        assert_eq!(c.flops("MatMul", &Attrs::new(), &[Some(&a), Some(&b)], &[&y]), 2.0 * 4.0 * 16.0 * 8.0);
        let x = TensorType::known(DType::F32, &[1, 3, 8, 8]);
        let w = TensorType::known(DType::F32, &[4, 3, 3, 3]);
        let o = TensorType::known(DType::F32, &[1, 4, 8, 8]);
        assert_eq!(c.flops("Conv", &Attrs::new(), &[Some(&x), Some(&w)], &[&o]), 2.0 * 256.0 * 27.0);
        assert_eq!(c.flops("Relu", &Attrs::new(), &[Some(&y)], &[&y]), 64.0);
        assert!(c.flops("Erf", &Attrs::new(), &[Some(&y)], &[&y]) > 64.0);
    }
}
