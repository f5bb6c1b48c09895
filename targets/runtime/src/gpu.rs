//! Runs a whole model compiled for a GPU (`kiln compile MODEL --target cuda -o DIR`): reads
//! `DIR/plan.json` ([`Plan`]: the kernel launches in program order, each buffer a graph
//! input, a graph output, a weight in `DIR/weights.bin` or an arena offset) and executes it on
//! a [`Device`]: the CUDA driver ([`crate::cuda::CudaDevice`]) or, in kiln's tests, the host
//! emulation of GPU launches. The weights are uploaded once; a run uploads the inputs, launches
//! every kernel, synchronizes and downloads the outputs. Host steps (ops the GPU does not run)
//! run between launches on kiln-ir's reference interpreter: their operands downloaded, their
//! results uploaded.

use crate::npy::Array;
use crate::Error;
use kiln_ir::{DType, Module, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The plan format: kiln writes it (`kiln_targets::gpu_plan`) and this runtime reads it.
pub const FORMAT: &str = "kiln-gpu-plan/2";

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Place {
    Input {
        index: usize,
    },
    Output {
        index: usize,
    },
    /// Byte offset into `weights.bin`.
    Weight {
        offset: usize,
    },
    /// Byte offset into the arena.
    Arena {
        offset: usize,
    },
}

/// A buffer: where, its static shape and element type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub at: Place,
    pub shape: Vec<usize>,
    /// MLIR's name of the element type: `f32`, `i64`, `i1` (bool, one byte per element), ...
    pub dtype: String,
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.element_type().map_or(4, DType::size_bytes)
    }

    pub fn element_type(&self) -> Option<DType> {
        DType::from_mlir_name(&self.dtype).filter(|&d| d != DType::String)
    }
}

/// A graph input or output: its name and buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    #[serde(flatten)]
    pub buffer: Buffer,
}

/// One kernel launch: the manifest's kernel, its function and file, grid and block (the
/// driver's 32-bit widths), and one buffer per kernel parameter descriptor (the manifest's
/// `args`, in order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: String,
    pub node: String,
    pub op: String,
    pub function: String,
    pub file: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub args: Vec<Buffer>,
}

/// An op run on the host between launches: kiln-ir's reference interpreter runs `module` (one
/// op in MLIR generic text, small constant operands inside) on the `inputs` downloaded from the
/// device, in the module's input order, and its results are uploaded to `outputs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostStep {
    pub kernel: String,
    pub node: String,
    pub op: String,
    /// Runs before launch `before` (after every launch when it is the launch count), after the
    /// host steps listed earlier.
    pub before: usize,
    pub module: String,
    pub inputs: Vec<Buffer>,
    pub outputs: Vec<Buffer>,
}

/// `plan.json`: one definition for kiln's writer and this runtime's reader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`FORMAT`].
    pub format: String,
    pub target: String,
    pub arch: String,
    /// Whether the runtime can run the whole model; else `why_not` says why.
    pub runnable: bool,
    pub why_not: Option<String>,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    pub arena_bytes: usize,
    /// The weights' file (in the plan's directory) and its size.
    pub weights: String,
    pub weight_bytes: usize,
    /// The largest per-thread local memory of any launch (the stack the driver must give).
    pub stack_bytes: u64,
    pub launches: Vec<Launch>,
    /// Host steps in program order.
    #[serde(default)]
    pub host_steps: Vec<HostStep>,
}

impl Plan {
    /// `plan.json`'s text.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a plan serializes")
    }
}

/// Reads `dir/plan.json`; a plan of another format, or one kiln marked not runnable, is an
/// error saying so (the latter with kiln's reason: the host kernels, named).
pub fn read_plan(dir: &Path) -> Result<Plan, Error> {
    let path = dir.join("plan.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error(format!("{}: {e} (compile the model with `kiln compile MODEL --target cuda -o DIR`)", path.display()))
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error(format!("{}: not JSON: {e}", path.display())))?;
    if v["format"] != FORMAT {
        return Err(Error(format!("{}: format {}, this runtime reads {FORMAT}", path.display(), v["format"])));
    }
    let plan: Plan = serde_json::from_value(v).map_err(|e| Error(format!("{}: a bad plan: {e}", path.display())))?;
    if !plan.runnable {
        return Err(Error(format!(
            "{}: the model is not runnable on the GPU: {}",
            path.display(),
            plan.why_not.as_deref().unwrap_or("(no reason given)")
        )));
    }
    let bad = |what: String| Error(format!("{}: {what}", path.display()));
    let ports = plan.inputs.iter().chain(&plan.outputs).map(|p| (p.name.as_str(), &p.buffer));
    let args = plan.launches.iter().flat_map(|l| l.args.iter().map(|a| (l.kernel.as_str(), a)));
    let steps = plan.host_steps.iter().flat_map(|h| h.inputs.iter().chain(&h.outputs).map(|a| (h.kernel.as_str(), a)));
    for (owner, a) in ports.chain(args).chain(steps) {
        if a.element_type().is_none() {
            return Err(bad(format!("{owner}: element type {} (this runtime holds no such tensors)", a.dtype)));
        }
        let inside = match a.at {
            Place::Input { index } => plan.inputs.get(index).is_some_and(|p| a.bytes() <= p.buffer.bytes()),
            Place::Output { index } => plan.outputs.get(index).is_some_and(|p| a.bytes() <= p.buffer.bytes()),
            Place::Weight { offset } => offset + a.bytes() <= plan.weight_bytes,
            Place::Arena { offset } => offset + a.bytes() <= plan.arena_bytes,
        };
        if !inside {
            return Err(bad(format!("{owner}: a buffer of {} bytes at {:?} outside its memory", a.bytes(), a.at)));
        }
    }
    for h in &plan.host_steps {
        if h.before > plan.launches.len() {
            return Err(bad(format!("host step {}: before launch {}, of {}", h.kernel, h.before, plan.launches.len())));
        }
    }
    Ok(plan)
}

/// What the executor needs of a GPU. Addresses are the device's (64-bit); allocations live as
/// long as the device.
pub trait Device {
    /// Makes `function` from the code file `file` in `dir` launchable.
    fn load(&mut self, dir: &Path, file: &str, function: &str) -> Result<(), Error>;
    /// Gives each thread at least `bytes` of stack (local buffers).
    fn set_stack(&mut self, bytes: u64) -> Result<(), Error>;
    fn alloc(&mut self, bytes: usize) -> Result<u64, Error>;
    fn upload(&mut self, to: u64, data: &[u8]) -> Result<(), Error>;
    fn download(&mut self, from: u64, out: &mut [u8]) -> Result<(), Error>;
    /// Launches `function` on `grid` × `block` threads; `params` are its 64-bit parameters (per
    /// buffer a strided memref descriptor: pointer, pointer, offset 0, sizes, row-major strides).
    fn launch(
        &mut self,
        function: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        params: &[u64],
    ) -> Result<(), Error>;
    /// Waits for every launch.
    fn synchronize(&mut self) -> Result<(), Error>;
}

/// The memref descriptor words of a buffer at `address` of `shape`.
pub fn descriptor(address: u64, shape: &[usize]) -> Vec<u64> {
    let mut w = vec![address, address, 0];
    w.extend(shape.iter().map(|&d| d as u64));
    let mut strides = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for d in (0..shape.len()).rev() {
        strides[d] = acc;
        acc *= shape[d] as u64;
    }
    w.extend(strides);
    w
}

/// A plan loaded on a device: weights uploaded, buffers allocated, each launch's parameters
/// computed.
pub struct Executor<D: Device> {
    pub device: D,
    plan: Plan,
    inputs: Vec<u64>,
    outputs: Vec<u64>,
    params: Vec<Vec<u64>>,
    /// Each host step's module, parsed.
    host: Vec<Module>,
    weights: u64,
    arena: u64,
}

impl<D: Device> Executor<D> {
    /// Loads the plan of `dir` onto `device`.
    pub fn new(mut device: D, dir: &Path) -> Result<Executor<D>, Error> {
        let plan = read_plan(dir)?;
        let mut loaded = std::collections::HashSet::new();
        for l in &plan.launches {
            if loaded.insert(l.function.clone()) {
                device
                    .load(dir, &l.file, &l.function)
                    .map_err(|e| Error(format!("kernel {} ({}): {e}", l.kernel, l.file)))?;
            }
        }
        if plan.stack_bytes > 0 {
            device.set_stack(plan.stack_bytes)?;
        }
        let wpath: PathBuf = dir.join(&plan.weights);
        let weights_data = std::fs::read(&wpath).map_err(|e| Error(format!("{}: {e}", wpath.display())))?;
        if weights_data.len() != plan.weight_bytes {
            return Err(Error(format!(
                "{}: {} bytes, the plan says {}",
                wpath.display(),
                weights_data.len(),
                plan.weight_bytes
            )));
        }
        let weights = device.alloc(weights_data.len().max(64))?;
        device.upload(weights, &weights_data)?;
        let arena = device.alloc(plan.arena_bytes.max(64))?;
        let inputs =
            plan.inputs.iter().map(|p| device.alloc(p.buffer.bytes().max(64))).collect::<Result<Vec<_>, _>>()?;
        let outputs =
            plan.outputs.iter().map(|p| device.alloc(p.buffer.bytes().max(64))).collect::<Result<Vec<_>, _>>()?;
        let host = plan
            .host_steps
            .iter()
            .map(|h| {
                kiln_ir::parser::parse_module(&h.module)
                    .map_err(|e| Error(format!("host step {} (node '{}', {}): {e}", h.kernel, h.node, h.op)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut me = Executor { device, plan, inputs, outputs, params: Vec::new(), host, weights, arena };
        me.params = me
            .plan
            .launches
            .iter()
            .map(|l| l.args.iter().flat_map(|a| descriptor(me.address(a.at), &a.shape)).collect())
            .collect();
        Ok(me)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn address(&self, at: Place) -> u64 {
        match at {
            Place::Input { index } => self.inputs[index],
            Place::Output { index } => self.outputs[index],
            Place::Weight { offset } => self.weights + offset as u64,
            Place::Arena { offset } => self.arena + offset as u64,
        }
    }

    /// Uploads the inputs.
    pub fn upload(&mut self, inputs: &[Array]) -> Result<(), Error> {
        check_inputs(&self.plan, inputs)?;
        for (i, x) in inputs.iter().enumerate() {
            self.device.upload(self.inputs[i], &x.bytes())?;
        }
        Ok(())
    }

    /// Launches every kernel in order, running the host steps between them, and waits for them.
    pub fn launch_all(&mut self) -> Result<(), Error> {
        let mut step = 0;
        for i in 0..=self.plan.launches.len() {
            while step < self.plan.host_steps.len() && self.plan.host_steps[step].before <= i {
                if let Err(e) = self.host_step(step) {
                    let h = &self.plan.host_steps[step];
                    return Err(Error(format!("host step {} (node '{}', {}): {}", h.kernel, h.node, h.op, e.0)));
                }
                step += 1;
            }
            if let (Some(l), Some(p)) = (self.plan.launches.get(i), self.params.get(i)) {
                self.device
                    .launch(&l.function, l.grid, l.block, l.shared_bytes, p)
                    .map_err(|e| Error(format!("kernel {} (node '{}', {}): {e}", l.kernel, l.node, l.op)))?;
            }
        }
        self.device.synchronize()
    }

    /// Runs host step `i`: waits for the launches before it, downloads its inputs, runs its
    /// module on kiln-ir's interpreter and uploads the results.
    fn host_step(&mut self, i: usize) -> Result<(), Error> {
        self.device.synchronize()?;
        let h = &self.plan.host_steps[i];
        let mut inputs = Vec::new();
        for b in &h.inputs {
            let mut raw = vec![0u8; b.bytes()];
            self.device.download(self.address(b.at), &mut raw)?;
            let a = Array::from_bytes(&b.shape, &b.dtype, &raw);
            inputs.push(a.to_tensor().ok_or_else(|| Error(format!("a {} input of {} bytes", b.dtype, raw.len())))?);
        }
        let results: Vec<Tensor> = kiln_ir::interp::run(&self.host[i], inputs).map_err(|e| Error(e.to_string()))?;
        if results.len() != h.outputs.len() {
            return Err(Error(format!("{} results, the plan binds {}", results.len(), h.outputs.len())));
        }
        for (j, (t, b)) in results.iter().zip(&h.outputs).enumerate() {
            if t.shape != b.shape || t.dtype().mlir_name() != b.dtype {
                return Err(Error(format!(
                    "result {j} is {} {:?}, the plan says {} {:?}",
                    t.dtype().mlir_name(),
                    t.shape,
                    b.dtype,
                    b.shape
                )));
            }
            self.device.upload(self.address(b.at), &t.data.to_le_bytes())?;
        }
        Ok(())
    }

    /// Downloads the outputs.
    pub fn download(&mut self) -> Result<Vec<Array>, Error> {
        let mut outs = Vec::new();
        for p in &self.plan.outputs {
            let mut raw = vec![0u8; p.buffer.bytes()];
            self.device.download(self.address(p.buffer.at), &mut raw)?;
            outs.push(Array::from_bytes(&p.buffer.shape, &p.buffer.dtype, &raw));
        }
        Ok(outs)
    }

    /// One whole run: inputs up, every kernel, outputs down.
    pub fn run(&mut self, inputs: &[Array]) -> Result<Vec<Array>, Error> {
        self.upload(inputs)?;
        self.launch_all()?;
        self.download()
    }

    /// Runs the launches `repeat` times (inputs already uploaded); the wall time of each run
    /// (launches and a synchronize), in milliseconds.
    pub fn time(&mut self, repeat: usize) -> Result<Vec<f64>, Error> {
        (0..repeat)
            .map(|_| {
                let t = std::time::Instant::now();
                self.launch_all()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect()
    }
}

/// Checks `inputs` against the plan's (count, shape, element type), naming the input.
pub fn check_inputs(plan: &Plan, inputs: &[Array]) -> Result<(), Error> {
    if inputs.len() != plan.inputs.len() {
        let names: Vec<&str> = plan.inputs.iter().map(|p| p.name.as_str()).collect();
        return Err(Error(format!(
            "the model takes {} inputs ({}), got {}",
            names.len(),
            names.join(", "),
            inputs.len()
        )));
    }
    for (p, x) in plan.inputs.iter().zip(inputs) {
        if x.shape != p.buffer.shape || x.dtype() != p.buffer.dtype {
            return Err(Error(format!(
                "input '{}': expected {} {:?}, got {} {:?}",
                p.name,
                p.buffer.dtype,
                p.buffer.shape,
                x.dtype(),
                x.shape
            )));
        }
    }
    Ok(())
}
