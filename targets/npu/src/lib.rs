//! The core of kiln's `npu` target: scratchpad accelerators (Ascend DaVinci-like, Sunway
//! CPE-like, Cambricon MLU-like) as presets of one parameterized machine.
//!
//! - [`config`]: the machine description ([`NpuConfig`], JSON; presets `davinci`, `sunway`,
//!   `mlu`) and the plain [`kiln_ir::machine::MachineDescription`] cost models read.
//! - [`isa`]: the instruction set, its assembly text and its binary encoding.
//! - [`sim`]: a simulator that runs a program functionally on one core, counts cycles per
//!   pipe with their overlap and checks that pipes touching the same memory are ordered.
//! - [`codegen`]: [`compile`] turns a kernel-dialect kernel, at concrete shapes, into a program.
//! - [`estimate`]: a static per-pipe cost estimate of a program (the scalar unit run alone,
//!   no data, no simulation of the pipes), for autotuning's cost model.
//! - [`eval`]: a plain evaluator of the kernel dialect (the oracle the tests compare with).
//!
//! No LLVM or MLIR: this crate builds and tests in seconds.
//!
//! # Running a kernel
//!
//! ```
//! use kiln_ir::kernel::{Buffer, Idx, Kernel, Knobs, Level, Stmt, UnOp, Val};
//! use kiln_ir::{DType, Dim};
//! use kiln_npu::{compile, simulate, NpuConfig};
//!
//! let buf = |name: &str| Buffer { name: name.into(), dtype: DType::F32, shape: vec![Dim::sym("N")], level: Level::Global };
//! let relu = Kernel {
//!     name: "relu".into(),
//!     buffers: vec![buf("x"), buf("y")],
//!     inputs: 1,
//!     operands: vec![0],
//!     locals: vec![],
//!     body: vec![Stmt::For {
//!         var: 0,
//!         extent: Idx::Dim { buf: 1, axis: 0 },
//!         parallel: true,
//!         body: vec![Stmt::Store {
//!             buf: 1,
//!             index: vec![Idx::Var(0)],
//!             value: Val::Un(UnOp::Relu, Box::new(Val::Load { buf: 0, index: vec![Idx::Var(0)] })),
//!         }],
//!     }],
//!     knobs: Knobs::default(),
//! };
//! let cfg = NpuConfig::preset("davinci").unwrap();
//! let program = compile(&relu, &[vec![1000], vec![1000]], &cfg).unwrap();
//! let mut buffers = vec![(0..1000).map(|i| i as f32 - 500.0).collect(), vec![0.0; 1000]];
//! let stats = simulate(&program, &cfg, &mut buffers).unwrap();
//! assert_eq!(buffers[1][0], 0.0);
//! assert_eq!(buffers[1][999], 499.0);
//! assert!(stats.cycles > 0);
//! ```

pub mod codegen;
pub mod config;
pub mod estimate;
pub mod eval;
pub mod isa;
pub mod math;
pub mod sim;

pub use codegen::compile;
pub use config::NpuConfig;
pub use estimate::{estimate, Estimate};
pub use sim::{simulate, simulate_with, SimOptions, SimStats};

/// Errors of the NPU target.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NpuError {
    /// A machine description that cannot work (`origin`: its file or preset name).
    #[error("npu config {origin}: {msg}")]
    BadConfig { origin: String, msg: String },
    /// A kernel whose data does not fit the scratchpads.
    #[error("kernel {kernel}: needs {need} of {level}, the {config} config has {have}")]
    DoesNotFit { kernel: String, level: String, need: String, have: String, config: String },
    /// A kernel form the code generator does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Bad assembly text (`line` is 1-based).
    #[error("npu assembly line {line}: {msg}")]
    Asm { line: usize, msg: String },
    /// A bad binary program (`offset` in bytes).
    #[error("npu binary at byte {offset}: {msg}")]
    Decode { offset: usize, msg: String },
    /// The simulator stopped (out-of-bounds access, race, deadlock, ...).
    #[error("npu simulator: {0}")]
    Sim(String),
}

/// `n` bytes in the units people read (`300 KiB`).
pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 10) {
        let mib = n as f64 / (1u64 << 20) as f64;
        if mib.fract() == 0.0 {
            return format!("{mib} MiB");
        }
        return format!("{:.1} MiB", mib);
    }
    if n >= 1 << 10 {
        let kib = n as f64 / 1024.0;
        if kib.fract() == 0.0 {
            return format!("{kib} KiB");
        }
        return format!("{:.1} KiB", kib);
    }
    format!("{n} B")
}
