//! `ref`: the reference interpreter, the numerics oracle for every other target.

use crate::{Target, TargetError};
use kiln_ir::machine::{MachineDescription, MemoryLevel};
use kiln_ir::{Module, Tensor};

pub struct Reference;

impl Target for Reference {
    fn name(&self) -> &'static str {
        "ref"
    }

    fn summary(&self) -> &'static str {
        "reference interpreter (graph-dialect semantics); the numerics oracle"
    }

    fn machine(&self) -> MachineDescription {
        // The interpreter runs on the host; it is priced as one scalar core.
        MachineDescription {
            name: "ref".into(),
            clock_ghz: 1.0,
            cores: 1,
            levels: vec![MemoryLevel {
                name: "host".into(),
                capacity_bytes: 1 << 34,
                bandwidth_gbps: 10.0,
                latency_cycles: 100,
                software_managed: false,
            }],
            vector_gflops: 1.0,
            vector_bits: 0,
            vector_registers: 0,
            matrix_shape: vec![],
            matrix_gflops: 0.0,
            launch_us: 0.5,
            gpu: None,
        }
    }

    fn can_run(&self) -> bool {
        true
    }

    fn run(&self, m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        Ok(kiln_ir::interp::run(m, inputs)?)
    }
}
