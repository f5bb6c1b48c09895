//! `npu`: scratchpad accelerators (Ascend DaVinci-like, Sunway CPE-like, Cambricon MLU-like) as
//! presets of one parameterized machine ([`kiln_npu::NpuConfig`]), on kiln's own ISA and
//! cycle-counting simulator (crate `kiln-npu`).
//!
//! Each kernel of the fused graph is lowered to the kernel dialect with the NPU's tile sizes
//! ([`Schedule::for_machine`] of its description), compiled at the run's concrete shapes to an
//! NPU program (cached per shape binding) and executed by the simulator, which computes the
//! outputs and counts cycles per pipe. Kernels the lowering or the NPU code generator does not
//! cover run on the reference interpreter (host kernels), as on `cpu`. A run's statistics
//! (cycles, time at the preset's clock, unit utilizations, bytes moved) are kept for
//! `kiln bench` ([`Executable::sim_report`]).
//!
//! The preset is process-wide, like the thread count: [`set_config`] (the CLI's
//! `--npu-preset` / `--npu-config`), `davinci` by default.

use crate::{Executable, HostKernel, SimReport, Target, TargetError};
use kiln_ir::interp::RunStats;
use kiln_ir::ir::OpId;
use kiln_ir::kernel::Kernel;
use kiln_ir::machine::MachineDescription;
use kiln_ir::{Data, Module, Tensor};
use kiln_npu::isa::Program;
use kiln_npu::NpuConfig;
use kiln_passes::lower::Schedule;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Mutex;

static CONFIG: Mutex<Option<NpuConfig>> = Mutex::new(None);

/// Selects the NPU the `npu` target compiles for and simulates (process-wide).
pub fn set_config(cfg: NpuConfig) {
    *CONFIG.lock().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
}

/// The NPU selected by [`set_config`], else the `davinci` preset.
pub fn config() -> NpuConfig {
    let chosen = CONFIG.lock().unwrap_or_else(|e| e.into_inner()).clone();
    chosen.unwrap_or_else(|| NpuConfig::preset("davinci").expect("the davinci preset is valid"))
}

/// The `npu` target; `tuned` holds tuned schedules per workload (`--tuning-db`).
#[derive(Default)]
pub struct Npu {
    pub tuned: crate::Tuned,
}

impl Target for Npu {
    fn name(&self) -> &'static str {
        "npu"
    }

    fn summary(&self) -> &'static str {
        "scratchpad NPU (Ascend DaVinci / Sunway CPE / Cambricon MLU presets) on kiln's ISA simulator"
    }

    fn machine(&self) -> MachineDescription {
        config().machine()
    }

    fn can_run(&self) -> bool {
        true
    }

    fn run(&self, m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        NpuModel::compile_tuned(m, config(), &self.tuned)?.run(inputs)
    }

    fn prepare(&self, m: &Module) -> Result<Option<Box<dyn Executable>>, TargetError> {
        Ok(Some(Box::new(NpuModel::compile_tuned(m, config(), &self.tuned)?)))
    }
}

/// One kernel for the NPU: its kernel-dialect form and its programs per shape binding.
struct NpuKernel {
    name: String,
    kernel: Kernel,
    programs: RefCell<HashMap<Vec<Vec<usize>>, Rc<Program>>>,
}

/// A model prepared for the NPU simulator.
pub struct NpuModel {
    module: Module,
    cfg: NpuConfig,
    kernels: HashMap<OpId, NpuKernel>,
    host: Vec<HostKernel>,
    /// The last run's statistics, per kernel run (name, stats).
    last: RefCell<Vec<(String, kiln_npu::SimStats)>>,
}

fn err(e: impl std::fmt::Display) -> TargetError {
    TargetError::Codegen(e.to_string())
}

impl NpuModel {
    /// Lowers every kernel of `m` for `cfg`; kernels of static shapes are compiled to NPU
    /// programs now (those the code generator refuses become host kernels), the others on
    /// first use at each binding.
    pub fn compile(m: &Module, cfg: NpuConfig) -> Result<NpuModel, TargetError> {
        NpuModel::compile_tuned(m, cfg, &crate::Tuned::default())
    }

    /// [`NpuModel::compile`] with tuned schedules for the kernels whose workload is in `tuned`.
    pub fn compile_tuned(m: &Module, cfg: NpuConfig, tuned: &crate::Tuned) -> Result<NpuModel, TargetError> {
        cfg.validate().map_err(|e| TargetError::Config(e.to_string()))?;
        let schedules =
            kiln_passes::lower::Schedules { default: Schedule::for_machine(&cfg.machine()), tuned: tuned.clone() };
        let mut kernels = HashMap::new();
        let mut host = Vec::new();
        for (o, name) in crate::native::launched_kernels(m) {
            let op = m.op(o);
            let refuse = |why: String| HostKernel {
                name: name.clone(),
                node: op.node_name().to_string(),
                op: op.op_type().to_string(),
                why,
            };
            let kernel = match kiln_passes::lower::lower_with(m, o, &name, &schedules.for_op(m, o)) {
                Ok(k) => k,
                Err(why) => {
                    host.push(refuse(why));
                    continue;
                }
            };
            let k = NpuKernel { name: name.clone(), kernel, programs: RefCell::new(HashMap::new()) };
            if let Some(shapes) = static_shapes(&k.kernel) {
                match kiln_npu::compile(&k.kernel, &shapes, &cfg) {
                    Ok(p) => {
                        k.programs.borrow_mut().insert(shapes, Rc::new(p));
                    }
                    Err(e) => {
                        host.push(refuse(format!("npu code generation: {e}")));
                        continue;
                    }
                }
            }
            kernels.insert(o, k);
        }
        Ok(NpuModel { module: m.clone(), cfg, kernels, host, last: RefCell::new(Vec::new()) })
    }

    /// Runs on inputs ordered as the module's inputs.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        self.run_observed(inputs, &mut |_, _| {}).map(|(o, _)| o)
    }

    /// The NPU assembly of every kernel compiled so far (static shapes at least), with the
    /// kernel's name as a comment line.
    pub fn program_text(&self) -> String {
        let mut names: Vec<(&String, String)> = Vec::new();
        for k in self.kernels.values() {
            for p in k.programs.borrow().values() {
                names.push((&k.name, p.to_asm()));
            }
        }
        names.sort();
        names.into_iter().map(|(n, asm)| format!("; kernel {n}\n{asm}\n")).collect()
    }

    fn run_kernel(&self, k: &NpuKernel, operands: &[Option<&Tensor>]) -> Result<Vec<Rc<Tensor>>, TargetError> {
        let kernel = &k.kernel;
        let mut inputs: Vec<&Tensor> = Vec::new();
        for &i in &kernel.operands {
            inputs.push(
                operands
                    .get(i)
                    .copied()
                    .flatten()
                    .ok_or_else(|| err(format!("kernel {} reads operand {i}", k.name)))?,
            );
        }
        let outputs = crate::native::output_shapes(kernel, &inputs)?;
        let mut buffers: Vec<Vec<f32>> = Vec::new();
        let mut shapes: Vec<Vec<usize>> = Vec::new();
        for t in &inputs {
            // The simulator's memories hold f32; a boolean mask reads as 0 or 1 (the kernel
            // dialect's meaning of a load from a bool buffer).
            buffers.push(match &t.data {
                Data::F32(v) => v.clone(),
                Data::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
                _ => return Err(err(format!("kernel {}: a {} buffer", k.name, t.dtype()))),
            });
            shapes.push(t.shape.clone());
        }
        for shape in outputs {
            buffers.push(vec![0.0; shape.iter().product()]);
            shapes.push(shape);
        }
        let program = {
            let cached = k.programs.borrow().get(&shapes).cloned();
            match cached {
                Some(p) => p,
                None => {
                    let p = Rc::new(kiln_npu::compile(kernel, &shapes, &self.cfg).map_err(err)?);
                    k.programs.borrow_mut().insert(shapes.clone(), p.clone());
                    p
                }
            }
        };
        let stats = kiln_npu::simulate(&program, &self.cfg, &mut buffers).map_err(err)?;
        self.last.borrow_mut().push((k.name.clone(), stats));
        let inputs = kernel.inputs;
        Ok(buffers
            .into_iter()
            .zip(shapes)
            .skip(inputs)
            .map(|(data, shape)| Rc::new(Tensor::from_f32(&shape, data)))
            .collect())
    }
}

/// Every buffer's shape when all are known.
fn static_shapes(k: &Kernel) -> Option<Vec<Vec<usize>>> {
    k.buffers.iter().map(|b| b.shape.iter().map(|d| d.known().map(|n| n as usize)).collect()).collect()
}

impl Executable for NpuModel {
    fn run_observed(
        &self,
        inputs: Vec<Tensor>,
        observe: &mut dyn FnMut(OpId, &[Rc<Tensor>]),
    ) -> Result<(Vec<Tensor>, RunStats), TargetError> {
        self.last.borrow_mut().clear();
        let over = |o: OpId, operands: &[Option<&Tensor>]| {
            let k = self.kernels.get(&o)?;
            Some(self.run_kernel(k, operands).map_err(|e| kiln_ir::graph::OpError(e.to_string())))
        };
        Ok(kiln_ir::interp::run_custom(&self.module, inputs, observe, &over)?)
    }

    fn native_kernels(&self) -> usize {
        self.kernels.len()
    }

    fn host_kernels(&self) -> &[HostKernel] {
        &self.host
    }

    fn assembly(&self) -> Option<String> {
        Some(self.program_text())
    }

    fn sim_report(&self) -> Option<SimReport> {
        let last = self.last.borrow();
        let cycles: u64 = last.iter().map(|(_, s)| s.cycles).sum();
        let weighted = |f: &dyn Fn(&kiln_npu::SimStats) -> f64| {
            if cycles == 0 {
                0.0
            } else {
                last.iter().map(|(_, s)| f(s) * s.cycles as f64).sum::<f64>() / cycles as f64
            }
        };
        Some(SimReport {
            cycles,
            ms: cycles as f64 / (self.cfg.clock_ghz * 1e6),
            matrix: weighted(&|s| s.matrix_utilization),
            vector: weighted(&|s| s.vector_utilization),
            dma: weighted(&|s| s.dma_utilization),
            gm_bytes: last.iter().map(|(_, s)| s.gm_bytes).sum(),
            kernels: last.iter().map(|(n, s)| (n.clone(), s.cycles)).collect(),
        })
    }
}
