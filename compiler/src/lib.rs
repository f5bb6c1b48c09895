//! kiln: an AI compiler for domestic accelerators.
//!
//! The library is what the `kiln` CLI, the C API (`kiln-capi`) and the Python package are
//! built on. A model comes from an ONNX file or bytes ([`load_model`], [`load_model_bytes`]) or
//! from code ([`GraphBuilder`]); a [`Compiler`] (target, fusion, threads, target options)
//! compiles it into a [`CompiledModel`], which describes its inputs and outputs and runs.
//!
//! ```
//! use kiln::{Attr, Compiler, DType, Dim, GraphBuilder, Tensor, TensorType};
//!
//! // y = softmax(x * w + b) over the last axis, for any batch size N.
//! let mut g = GraphBuilder::new("classifier");
//! let x = g.input("x", TensorType::new(DType::F32, vec![Dim::sym("N"), Dim::Known(3)]))?;
//! let w = g.constant("w", Tensor::from_f32(&[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]));
//! let b = g.constant("b", Tensor::from_f32(&[2], vec![0.0, -1.0]));
//! let h = g.op("MatMul", &[x, w])?;
//! let h = g.op("Add", &[h, b])?;
//! let y = g.op_with("Softmax", &[h], [("axis", Attr::Int(-1))])?;
//! g.output(y, "y")?;
//! let model = g.finish()?;
//!
//! let compiled = Compiler::new("cpu").threads(1).compile(&model)?;
//! assert_eq!(compiled.inputs()[0].0, "x");
//! let out = compiled.run(vec![Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0])])?;
//! assert_eq!(out[0].shape, vec![2, 2]);
//! let p = out[0].as_f32().unwrap();
//! assert!((p[0] + p[1] - 1.0).abs() < 1e-6);
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! Every failure is one [`Error`], whose variants a caller can match, and renders as one line
//! naming the file, node and op involved:
//!
//! ```
//! let model = kiln::load_model_bytes(b"not a model", "bad.onnx");
//! assert!(matches!(model, Err(kiln::Error::Frontend(_))));
//! ```

pub mod check;
pub mod inspect;
pub mod tune;

pub use kiln_ir::{Attr, Attrs, DType, Data, Dim, Module, Tensor, TensorType, ValueId};
pub use kiln_npu::NpuConfig;
pub use kiln_onnx::builder::GraphBuilder;
use kiln_onnx::FrontendError;
use kiln_passes::{OptimizeReport, PassError, PassManager};
pub use kiln_targets::HostKernel;
use kiln_targets::{Target, TargetError};
use std::path::Path;

/// Every error kiln reports. Each renders as one line naming the file, node and op involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{model}: {source}")]
    Pass { model: String, source: PassError },
    #[error("{model}: {source}")]
    Verify { model: String, source: kiln_ir::verify::VerifyError },
    #[error("{model}: {source}")]
    Run { model: String, source: kiln_ir::interp::InterpError },
    /// Run-time inputs that do not match the model's signature: their number, a name, an
    /// element type or a dim.
    #[error("{model}: {msg}")]
    Input { model: String, msg: String },
    #[error("unknown target '{0}' (known: {known})", known = kiln_targets::names().join(", "))]
    UnknownTarget(String),
    #[error("{0}")]
    Usage(String),
    /// `--check` found a kernel whose outputs differ from the reference's.
    #[error("{0}")]
    Check(String),
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
}

/// Reads and imports an ONNX model, then verifies it.
pub fn load_model(path: &Path) -> Result<Module, Error> {
    let m = kiln_onnx::load_model(path)?;
    kiln_ir::verify::verify(&m).map_err(|source| Error::Verify { model: path.display().to_string(), source })?;
    Ok(m)
}

/// Reads and imports an ONNX model from bytes (`name` is used in messages), then verifies it.
pub fn load_model_bytes(bytes: &[u8], name: &str) -> Result<Module, Error> {
    let m = kiln_onnx::load_model_bytes(bytes, name, None)?;
    kiln_ir::verify::verify(&m).map_err(|source| Error::Verify { model: name.to_string(), source })?;
    Ok(m)
}

/// Compiles models: a target and its options. A builder; [`Compiler::compile`] may be called
/// for any number of models.
///
/// ```
/// # fn main() -> Result<(), kiln::Error> {
/// let compiler = kiln::Compiler::new("ref").fusion(false).dim("N", 8);
/// # let mut g = kiln::GraphBuilder::new("m");
/// # let x = g.input("x", kiln::TensorType::known(kiln::DType::F32, &[2]))?;
/// # let y = g.op("Relu", &[x])?;
/// # g.output(y, "y")?;
/// # let model = g.finish()?;
/// let compiled = compiler.compile(&model)?;
/// assert_eq!(compiled.target().name(), "ref");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Compiler {
    target: String,
    opts: Options,
    threads: Option<usize>,
    npu: Option<NpuConfig>,
    tuning_db: Option<std::path::PathBuf>,
}

impl Compiler {
    /// A compiler for `target` (see [`targets`]), fusion on, every core.
    pub fn new(target: &str) -> Compiler {
        Compiler { target: target.to_string(), opts: Options::default(), threads: None, npu: None, tuning_db: None }
    }

    /// Compile each kernel with its best schedule in this tuning database ([`tune`]); the
    /// others keep the target's default. Reads the file at compile time; measures nothing.
    pub fn tuning_db(mut self, path: &Path) -> Compiler {
        self.tuning_db = Some(path.to_path_buf());
        self
    }

    /// The graph pipeline for this compiler's target and options, without the target's code
    /// generation: what [`tune::tune`] takes.
    pub fn lower(&self, model: &Module) -> Result<CompiledModel, Error> {
        if let Some(cfg) = &self.npu {
            if self.target != "npu" {
                return Err(Error::Usage(format!("an NPU description applies to target npu, not '{}'", self.target)));
            }
            kiln_targets::npu::set_config(cfg.clone());
        }
        let mut opts = self.opts.clone();
        if let Some(db) = &self.tuning_db {
            let t = kiln_targets::lookup_with(&self.target, &opts.target)
                .ok_or_else(|| Error::UnknownTarget(self.target.clone()))?;
            opts.target.tuned = std::sync::Arc::new(tune::load_best(db, &*t)?);
        }
        let mut c = compile_with(model.clone(), &self.target, &opts)?;
        c.threads = self.threads;
        Ok(c)
    }

    /// E-graph rewriting and kernel fusion (on by default).
    pub fn fusion(mut self, on: bool) -> Compiler {
        self.opts.fusion = on;
        self
    }

    /// A size for symbolic dim `name` to price fusion plans with; the compiled model still
    /// runs at any size.
    pub fn dim(mut self, name: &str, size: u64) -> Compiler {
        self.opts.dims.retain(|(n, _)| n != name);
        self.opts.dims.push((name.to_string(), size));
        self
    }

    /// Threads native kernels run on (default: every core). Set for the process when the
    /// model runs, like onnxruntime's intra-op thread count.
    pub fn threads(mut self, n: usize) -> Compiler {
        self.threads = (n > 0).then_some(n);
        self
    }

    /// `rvv`: the vector register length in bits (a power of two, 64 to 65536).
    pub fn rvv_vlen(mut self, bits: u32) -> Compiler {
        self.opts.target.rvv_vlen = bits;
        self
    }

    /// `npu`: the machine simulated (default: the `davinci` preset); see
    /// [`NpuConfig::preset`] and [`NpuConfig::from_json`].
    pub fn npu_config(mut self, cfg: NpuConfig) -> Compiler {
        self.npu = Some(cfg);
        self
    }

    /// Compiles `model` (left unchanged): the graph pipeline, then the target's code
    /// generation, so that a model that cannot be compiled fails here, not on its first run.
    pub fn compile(&self, model: &Module) -> Result<CompiledModel, Error> {
        if self.target == "rvv" {
            kiln_targets::rvv::check_vlen(self.opts.target.rvv_vlen)
                .map_err(|e| Error::Usage(format!("rvv vector length: {e}")))?;
        }
        let c = self.lower(model)?;
        c.prepare()?;
        Ok(c)
    }

    /// Reads an ONNX file and compiles it.
    pub fn compile_file(&self, path: &Path) -> Result<CompiledModel, Error> {
        self.compile(&load_model(path)?)
    }
}

/// Names of the targets kiln compiles for.
pub fn targets() -> Vec<&'static str> {
    kiln_targets::names()
}

/// A model compiled for one target.
pub struct CompiledModel {
    module: Module,
    target: Box<dyn Target>,
    name: String,
    report: OptimizeReport,
    /// The target's code for the module, made on first use ([`CompiledModel::prepare`]).
    prepared: std::cell::OnceCell<Option<Box<dyn kiln_targets::Executable>>>,
    /// Threads to run native kernels on ([`Compiler::threads`]); `None`: as set for the process.
    threads: Option<usize>,
    /// Tuned schedules per workload (`--tuning-db`), which the target lowers kernels with.
    tuned: kiln_targets::Tuned,
}

/// How to compile.
#[derive(Clone, Debug)]
pub struct Options {
    /// E-graph rewriting and kernel fusion (on by default; `--no-fusion` turns it off: every
    /// graph op is then its own kernel).
    pub fusion: bool,
    /// Sizes of symbolic dims to price plans with (`--dim NAME=N`); unbound ones count 1.
    /// They guide fusion decisions only: the compiled model still runs at any size.
    pub dims: Vec<(String, u64)>,
    /// Options of the target (`--rvv-vlen`).
    pub target: kiln_targets::TargetOptions,
}

impl Default for Options {
    fn default() -> Options {
        Options { fusion: true, dims: Vec::new(), target: kiln_targets::TargetOptions::default() }
    }
}

/// Runs the graph pipeline on `module` for `target` with default [`Options`].
pub fn compile(module: Module, target: &str) -> Result<CompiledModel, Error> {
    compile_with(module, target, &Options::default())
}

/// Runs the graph pipeline on `module` for `target`: cleanup, then (unless disabled) e-graph
/// rewriting and fusion priced by the target's machine description.
pub fn compile_with(mut module: Module, target: &str, opts: &Options) -> Result<CompiledModel, Error> {
    let t = kiln_targets::lookup_with(target, &opts.target).ok_or_else(|| Error::UnknownTarget(target.to_string()))?;
    let name = module.name.clone();
    let cost = kiln_passes::cost::CostModel::new(&t.machine()).with_dims(opts.dims.iter().cloned());
    let report = kiln_passes::optimize_with(&mut module, &cost, opts.fusion)
        .map_err(|source| Error::Pass { model: name.clone(), source })?;
    Ok(CompiledModel {
        module,
        target: t,
        name,
        report,
        prepared: std::cell::OnceCell::new(),
        threads: None,
        tuned: opts.target.tuned.clone(),
    })
}

/// Cleans up an imported module (canonicalization, dead code) without optimizing it: the
/// `graph` stage of `kiln compile --emit`.
pub fn cleanup(mut module: Module) -> Result<Module, Error> {
    let name = module.name.clone();
    PassManager::default_pipeline().run(&mut module).map_err(|source| Error::Pass { model: name, source })?;
    Ok(module)
}

/// One top-level kernel of a compiled model in the kernel dialect, or why it is not lowered yet.
pub struct KernelStage {
    /// Kernel name (`k<index>_<op>`), the node it comes from, and its op (`fused` or an op type).
    pub name: String,
    pub node: String,
    pub op: String,
    pub kernel: Result<kiln_ir::kernel::Kernel, String>,
}

impl CompiledModel {
    /// The kernels of the compiled graph (constants, views and host shape arithmetic launch
    /// none), each lowered to the kernel dialect, with the target's tile sizes, where lowering
    /// covers it.
    pub fn kernels(&self) -> Vec<KernelStage> {
        let m = &self.module;
        let schedules = kiln_passes::lower::Schedules {
            default: kiln_passes::lower::Schedule::for_machine(&self.target.machine()),
            tuned: self.tuned.clone(),
        };
        kiln_targets::native::launched_kernels(m)
            .into_iter()
            .map(|(o, name)| {
                let op = m.op(o);
                KernelStage {
                    kernel: kiln_passes::lower::lower_with(m, o, &name, &schedules.for_op(m, o)),
                    name,
                    node: op.node_name().to_string(),
                    op: op.op_type().to_string(),
                }
            })
            .collect()
    }

    /// The compiled graph (with `graph.fused` kernels when fusion is on).
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// What optimization did: kernels and bytes moved before and after, saturation and
    /// fusion statistics, time taken.
    pub fn report(&self) -> &OptimizeReport {
        &self.report
    }

    pub fn target(&self) -> &dyn Target {
        &*self.target
    }

    /// Names and types of the inputs a caller provides, in order.
    pub fn inputs(&self) -> Vec<(String, TensorType)> {
        let m = &self.module;
        m.inputs().iter().map(|&v| (m.value_label(v), m.value(v).ty.clone())).collect()
    }

    /// Names and types of the outputs, in order.
    pub fn outputs(&self) -> Vec<(String, TensorType)> {
        let m = &self.module;
        m.outputs().iter().map(|&v| (m.value_label(v), m.value(v).ty.clone())).collect()
    }

    /// Runs the model on the reference interpreter and reports its peak memory (bytes of
    /// tensors alive at once). Used by `kiln bench` for `ref`.
    pub fn run_ref_with_stats(&self, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, u64), Error> {
        kiln_ir::interp::run_with_stats(&self.module, inputs, &mut |_, _| {})
            .map(|(o, s)| (o, s.peak_bytes))
            .map_err(|source| Error::Run { model: self.name.clone(), source })
    }

    fn target_error(&self, e: TargetError) -> Error {
        match e {
            TargetError::Run(source) => Error::Run { model: self.name.clone(), source },
            other => Error::Target(other),
        }
    }

    /// Generates the target's code for the model (native code for `cpu`), once; `run` calls it
    /// on first use, `kiln bench` before timing so that code generation counts as compile time.
    pub fn prepare(&self) -> Result<(), Error> {
        if self.prepared.get().is_none() {
            let p = self.target.prepare(&self.module).map_err(|e| self.target_error(e))?;
            let _ = self.prepared.set(p);
        }
        Ok(())
    }

    /// Runs the model on inputs ordered as [`CompiledModel::inputs`]. The inputs are moved,
    /// not copied: native kernels read their buffers in place.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        kiln_ir::interp::check_inputs(&self.module, &inputs)
            .map_err(|e| Error::Input { model: self.name.clone(), msg: e.to_string() })?;
        self.prepare()?;
        if self.threads.is_some() {
            kiln_targets::native::set_threads(self.threads);
        }
        let r = match self.executable() {
            Some(exe) => exe.run(inputs),
            None => self.target.run(&self.module, inputs),
        };
        r.map_err(|e| self.target_error(e))
    }

    /// Runs the model on inputs given by name (every input once, in any order); returns the
    /// outputs by name, in the order of [`CompiledModel::outputs`].
    pub fn run_named(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, Error> {
        let names: Vec<String> = self.inputs().into_iter().map(|(n, _)| n).collect();
        let err = |msg: String| Error::Input { model: self.name.clone(), msg };
        let mut slots: Vec<Option<Tensor>> = names.iter().map(|_| None).collect();
        for (n, t) in inputs {
            let Some(i) = names.iter().position(|k| *k == n) else {
                return Err(err(format!("the model has no input '{n}' (inputs: {})", names.join(", "))));
            };
            if slots[i].replace(t).is_some() {
                return Err(err(format!("input '{n}' is given twice")));
            }
        }
        let mut ordered = Vec::with_capacity(slots.len());
        for (slot, n) in slots.into_iter().zip(&names) {
            ordered.push(slot.ok_or_else(|| err(format!("input '{n}' is missing")))?);
        }
        let outs = self.run(ordered)?;
        Ok(self.outputs().into_iter().map(|(n, _)| n).zip(outs).collect())
    }

    /// The target's prepared code, if it has any ([`CompiledModel::prepare`] first).
    fn executable(&self) -> Option<&dyn kiln_targets::Executable> {
        self.prepared.get().and_then(|p| p.as_deref())
    }

    /// [`CompiledModel::run`], showing `observe` each top-level op's outputs as they are made,
    /// and reporting the run's peak memory (bytes of tensors alive at once).
    pub fn run_observed(
        &self,
        inputs: Vec<Tensor>,
        observe: &mut dyn FnMut(kiln_ir::ir::OpId, &[std::rc::Rc<Tensor>]),
    ) -> Result<(Vec<Tensor>, u64), Error> {
        self.prepare()?;
        match self.executable() {
            Some(exe) => {
                exe.run_observed(inputs, observe).map(|(o, s)| (o, s.peak_bytes)).map_err(|e| self.target_error(e))
            }
            None => kiln_ir::interp::run_with_stats(&self.module, inputs, observe)
                .map(|(o, s)| (o, s.peak_bytes))
                .map_err(|source| Error::Run { model: self.name.clone(), source }),
        }
    }

    /// Kernels that run as generated code on the target (0 for `ref`).
    pub fn native_kernels(&self) -> Result<usize, Error> {
        self.prepare()?;
        Ok(self.executable().map_or(0, |e| e.native_kernels()))
    }

    /// Kernels the target hands back to the host's reference implementation because its code
    /// generator does not cover them yet.
    pub fn host_kernels(&self) -> Result<Vec<HostKernel>, Error> {
        self.prepare()?;
        Ok(self.executable().map_or_else(Vec::new, |e| e.host_kernels().to_vec()))
    }

    /// For a simulated target (`npu`), the last run's simulated cycles, time and unit
    /// utilizations.
    pub fn sim_report(&self) -> Option<kiln_targets::SimReport> {
        self.executable().and_then(|e| e.sim_report())
    }

    /// The assembly of a target whose code is not LLVM's (the `npu` target's ISA), for the
    /// kernels compiled so far.
    pub fn target_assembly(&self) -> Option<String> {
        self.prepare().ok()?;
        self.executable()?.assembly()
    }
}
