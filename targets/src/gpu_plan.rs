//! The whole-model program of a GPU compile (`kiln compile MODEL --target cuda|rocm -o DIR`
//! writes it as `DIR/plan.json` and `DIR/weights.bin` beside the kernels and
//! `manifest.json`): the kernel launches in program order, each buffer argument bound to a graph
//! input, a graph output, a weight (a byte offset into `weights.bin`) or an arena offset, with
//! its static shape and element type, and the arena's size. The memory plan is the cpu AOT's
//! ([`crate::aot::plan_memory`]: views alias their operand, intermediates share one arena by
//! live range, graph outputs written in place). `kiln-runtime`'s executor runs it on any
//! [`kiln_runtime::gpu::Device`]. The schema is kiln-runtime's ([`kiln_runtime::gpu::Plan`] and
//! the types in it, re-exported here): one definition for this writer and the runtime's reader.
//!
//! Host steps: every op the GPU does not run (a host kernel the kernel dialect does not cover,
//! host shape arithmetic) is a step that carries the op as a one-op kiln-ir module in MLIR
//! generic text (small constant operands inside it), its operands and results bound like
//! launch arguments; the runtime downloads the operands, runs the module on kiln-ir's
//! reference interpreter and uploads the results. Tensors of every element type with a byte
//! size may live between and at the edges (named as in MLIR: `f32`, `i64`, `i1` for bool, ...);
//! GPU kernels see only f32 and bool. Scope: static shapes; string tensors only inside host
//! steps. A plan that cannot hold a model says it is not runnable and why.

use crate::aot::{plan_memory_placing, plan_root, static_shape, Storage};
use crate::gpu::GpuProgram;
use crate::TargetError;
use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::ir::{Block, OpData, OpId, ValueDef, ValueId};
use kiln_ir::{DType, Module};
use kiln_passes::fusion::{classify, OpClass};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use kiln_runtime::gpu::{Buffer, HostStep, Launch, Place, Plan, Port, FORMAT};

/// The plan's name of an element type: MLIR's, for every type with a byte per element or more
/// (the float8 and sub-byte types one byte each, as kiln-ir's tensors hold them).
fn dtype_name(d: DType) -> Option<&'static str> {
    (d != DType::String).then(|| d.mlir_name())
}

/// `x` in the driver's 32-bit launch dimensions, if it fits.
pub fn driver_dims<const N: usize>(x: [u64; N]) -> Option<[u32; N]> {
    let mut out = [0; N];
    for (o, &n) in out.iter_mut().zip(&x) {
        *o = u32::try_from(n).ok()?;
    }
    Some(out)
}

/// Constants with at most this many elements that host steps read travel inside the step's
/// module (the larger ones are weights).
const INLINE_CONSTANT: usize = 4096;

/// The plan of `prog` (compiled from fused module `m`) and the weights it reads.
pub fn plan(m: &Module, prog: &GpuProgram) -> (Plan, Vec<u8>) {
    let mut p = Plan {
        format: FORMAT.to_string(),
        target: prog.arch.family.name().to_string(),
        arch: prog.arch.chip.clone(),
        runnable: false,
        why_not: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
        arena_bytes: 0,
        weights: "weights.bin".to_string(),
        weight_bytes: 0,
        stack_bytes: 0,
        launches: Vec::new(),
        host_steps: Vec::new(),
    };
    match fill(m, prog, &mut p) {
        Ok(weights) => {
            p.runnable = true;
            p.weight_bytes = weights.len();
            (p, weights)
        }
        Err(why) => {
            p.why_not = Some(why);
            p.launches.clear();
            p.host_steps.clear();
            (p, Vec::new())
        }
    }
}

fn fill(m: &Module, prog: &GpuProgram, p: &mut Plan) -> Result<Vec<u8>, String> {
    let text = |e: TargetError| e.to_string();
    let dtype = |v: ValueId| {
        let t = &m.value(v).ty;
        dtype_name(t.dtype)
            .ok_or_else(|| format!("{} is {} (the GPU runtime holds no string tensors)", m.value_label(v), t))
    };
    let position: HashMap<OpId, usize> = m.body.ops.iter().enumerate().map(|(i, &o)| (o, i)).collect();
    let ops: HashMap<String, OpId> =
        crate::native::launched_kernels(m).into_iter().map(|(o, name)| (name, o)).collect();
    let mut kernel_ops = Vec::new();
    for l in &prog.manifest.kernels {
        let o = *ops.get(&l.name).ok_or_else(|| format!("kernel {} is no op of the model (a kiln bug)", l.name))?;
        kernel_ops.push((position[&o], o));
    }
    // Every other op but constants and views runs on the host, in program order.
    let on_gpu: std::collections::HashSet<OpId> = kernel_ops.iter().map(|&(_, o)| o).collect();
    let names: HashMap<OpId, String> = ops.iter().map(|(n, &o)| (o, n.clone())).collect();
    let host_ops: Vec<(usize, OpId)> = m
        .body
        .ops
        .iter()
        .enumerate()
        .filter(|&(_, o)| !on_gpu.contains(o) && !matches!(classify(m, *o), OpClass::Constant | OpClass::View))
        .map(|(i, &o)| (i, o))
        .collect();
    let mut all_ops: Vec<(usize, OpId)> = kernel_ops.iter().chain(&host_ops).copied().collect();
    all_ops.sort();
    let memory = plan_memory_placing(m, &all_ops, &|d| dtype_name(d).is_some()).map_err(text)?;
    let place = |v: ValueId| -> Result<Place, String> {
        Ok(match memory.storage.get(&plan_root(&memory.storage, v)) {
            Some(Storage::Input(index)) => Place::Input { index: *index },
            Some(Storage::Output(index)) => Place::Output { index: *index },
            Some(Storage::Weight(offset)) => Place::Weight { offset: *offset },
            Some(Storage::Arena(offset)) => Place::Arena { offset: *offset },
            Some(Storage::View(_)) | None => {
                return Err(format!("{} ({}) has no place in device memory", m.value_label(v), m.value(v).ty))
            }
        })
    };
    let buffer = |v: ValueId| -> Result<Buffer, String> {
        Ok(Buffer { at: place(v)?, shape: static_shape(m, v).map_err(text)?, dtype: dtype(v)?.to_string() })
    };
    let port = |v: ValueId| -> Result<Port, String> { Ok(Port { name: m.value_label(v), buffer: buffer(v)? }) };
    p.inputs = m.inputs().iter().map(|&v| port(v)).collect::<Result<_, _>>()?;
    p.outputs = m.outputs().iter().map(|&v| port(v)).collect::<Result<_, _>>()?;
    for ((l, k), (_, o)) in prog.manifest.kernels.iter().zip(&prog.kernels).zip(&kernel_ops) {
        let op = m.op(*o);
        let grid = l.grid.ok_or_else(|| format!("kernel {}: its grid is not known at compile time", l.name))?;
        let (Some(grid), Some(block), Some([shared_bytes])) =
            (driver_dims(grid), driver_dims(l.block), driver_dims([l.shared_bytes]))
        else {
            return Err(format!(
                "kernel {}: grid {grid:?}, block {:?} or {} bytes of shared memory exceed the driver's 32-bit launch \
                 dimensions",
                l.name, l.block, l.shared_bytes
            ));
        };
        let mut args = Vec::new();
        for (bi, b) in k.buffers.iter().enumerate() {
            let v = if bi < k.inputs {
                op.operands.get(k.operands[bi]).copied().flatten()
            } else {
                op.results.get(bi - k.inputs).copied()
            }
            .ok_or_else(|| format!("kernel {}: buffer {} binds no value (a kiln bug)", l.name, b.name))?;
            let a = buffer(v)?;
            if a.shape.len() != b.shape.len() {
                return Err(format!(
                    "kernel {}: buffer {} has rank {}, its value {} (a kiln bug)",
                    l.name,
                    b.name,
                    b.shape.len(),
                    a.shape.len()
                ));
            }
            if a.dtype != "f32" && a.dtype != "i1" {
                return Err(format!(
                    "kernel {}: buffer {} is {} (GPU kernels take f32 and bool tensors)",
                    l.name, b.name, a.dtype
                ));
            }
            args.push(a);
        }
        p.stack_bytes = p.stack_bytes.max(l.local_bytes.unwrap_or(0));
        p.launches.push(Launch {
            kernel: l.name.clone(),
            node: l.node.clone(),
            op: l.op.clone(),
            function: l.function.clone(),
            file: l.file.clone(),
            grid,
            block,
            shared_bytes,
            args,
        });
    }
    for &(pos, o) in &host_ops {
        let op = m.op(o);
        let kernel = names.get(&o).cloned().unwrap_or_else(|| format!("host{pos}_{}", op.op_type()));
        let at = |e: String| format!("host step {kernel} (node '{}', {}): {e}", op.node_name(), op.op_type());
        let (module, inputs) = host_module(m, o).map_err(at)?;
        p.host_steps.push(HostStep {
            before: kernel_ops.iter().filter(|&&(kp, _)| kp < pos).count(),
            node: op.node_name().to_string(),
            op: op.op_type().to_string(),
            module,
            inputs: inputs.iter().map(|&v| buffer(v)).collect::<Result<_, _>>().map_err(at)?,
            outputs: op.results.iter().map(|&v| buffer(v)).collect::<Result<_, _>>().map_err(at)?,
            kernel,
        });
    }
    p.arena_bytes = memory.arena_bytes;
    Ok(memory.weights)
}

/// The values a block (and the regions inside it) defines, and the values it uses, in order.
fn scan_block(m: &Module, b: &Block, defined: &mut std::collections::HashSet<ValueId>, used: &mut Vec<ValueId>) {
    defined.extend(b.args.iter().copied());
    for &o in &b.ops {
        let op = m.op(o);
        used.extend(op.operands.iter().flatten().copied());
        defined.extend(op.results.iter().copied());
        for r in &op.regions {
            for inner in &r.blocks {
                scan_block(m, inner, defined, used);
            }
        }
    }
    used.extend(b.yields.iter().copied());
}

/// Top-level op `o` of `m` as a module of its own in MLIR generic text: its operands (and the
/// outer values its regions capture) become the module's inputs, in the returned order, except
/// small constants, which travel inside; its results are the outputs. The text must read back
/// to a module that prints the same (attributes and constants included).
fn host_module(m: &Module, o: OpId) -> Result<(String, Vec<ValueId>), String> {
    let op = m.op(o);
    let mut defined = std::collections::HashSet::new();
    let mut used: Vec<ValueId> = op.operands.iter().flatten().copied().collect();
    for r in &op.regions {
        for b in &r.blocks {
            scan_block(m, b, &mut defined, &mut used);
        }
    }
    let placeholder = || OpData {
        name: String::new(),
        operands: Vec::new(),
        results: Vec::new(),
        attrs: Attrs::default(),
        regions: Vec::new(),
    };
    let mut one = Module {
        name: format!("host_{}", op.op_type()),
        values: m.values.clone(),
        ops: (0..m.ops.len()).map(|_| placeholder()).collect(),
        body: Block::default(),
        attrs: m.attrs.clone(),
    };
    let mut inputs = Vec::new();
    for v in used {
        if defined.contains(&v) || inputs.contains(&v) || one.body.ops.iter().any(|c| m.op(*c).results.contains(&v)) {
            continue;
        }
        if let ValueDef::OpResult(c, _) = m.value(v).def {
            let small = matches!(m.op(c).attrs.get("value"), Some(Attr::Tensor(t)) if t.len() <= INLINE_CONSTANT);
            if classify(m, c) == OpClass::Constant && m.op(c).regions.is_empty() && small {
                one.ops[c.0 as usize] = m.op(c).clone();
                one.body.ops.push(c);
                continue;
            }
        }
        one.value_mut(v).def = ValueDef::BlockArg;
        one.body.args.push(v);
        inputs.push(v);
    }
    let mut copy = vec![o];
    while let Some(c) = copy.pop() {
        let d = m.op(c).clone();
        for r in &d.regions {
            for b in &r.blocks {
                m.walk_block(b, &mut |n, _| copy.push(n));
            }
        }
        one.ops[c.0 as usize] = d;
    }
    one.body.ops.push(o);
    one.body.yields = op.results.clone();
    let text = kiln_ir::printer::print_module(&one, Default::default());
    let back = kiln_ir::parser::parse_module(&text).map_err(|e| format!("its module text does not parse: {e}"))?;
    if kiln_ir::printer::print_module(&back, Default::default()) != text {
        return Err("its module text does not read back the same".into());
    }
    Ok((text, inputs))
}

/// Writes the plan of `prog` (compiled from fused `m`) as `dir/plan.json` and its weights as
/// `dir/weights.bin`; returns the plan and the paths written.
pub fn write(m: &Module, prog: &GpuProgram, dir: &Path) -> Result<(Plan, Vec<PathBuf>), TargetError> {
    let io = |p: &Path, e: std::io::Error| TargetError::Config(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let (plan, weights) = plan(m, prog);
    let pj = dir.join("plan.json");
    std::fs::write(&pj, plan.json()).map_err(|e| io(&pj, e))?;
    let wb = dir.join(&plan.weights);
    std::fs::write(&wb, &weights).map_err(|e| io(&wb, e))?;
    Ok((plan, vec![pj, wb]))
}

/// A GPU emulated on the host, for running plans where no GPU is: memory is host memory (every
/// allocation 64-byte aligned and filled with NaN, so that elements no kernel stores show), and
/// a launch runs the function's kernel (JIT-compiled for the host from the same kernel dialect
/// the PTX came from) once per thread of its grid, each thread on the iteration its `gpu.func`
/// computes ([`crate::native::gpu_thread_ranges`]). Every descriptor a launch gets must lie in
/// an allocation (else an error, not a stray write).
pub struct EmulatedGpu {
    backend: crate::native::JitBackend,
    /// Per function name: its index in `backend`, its kernel, its grid's columns.
    functions: HashMap<String, (usize, kiln_ir::kernel::Kernel, Option<i64>)>,
    /// Block-synchronous kernels, block-tiled GEMMs ([`crate::gpu_tile`]) and row kernels
    /// ([`crate::gpu_rows`]): their host build, run block by block, each block's threads phase
    /// by phase.
    blocked: HashMap<String, crate::native::HostBlocks>,
    loaded: std::collections::HashSet<String>,
    memory: Vec<Box<[u64]>>,
    /// Launches run and threads emulated.
    pub launches: usize,
    pub threads: u64,
}

fn device_error(e: impl std::fmt::Display) -> kiln_runtime::Error {
    kiln_runtime::Error(e.to_string())
}

impl EmulatedGpu {
    /// The functions of `prog`, compiled for the host.
    pub fn new(prog: &GpuProgram) -> Result<EmulatedGpu, TargetError> {
        let mut firsts: Vec<(String, kiln_ir::kernel::Kernel, Option<i64>)> = Vec::new();
        let mut blocked = HashMap::new();
        for (l, k) in prog.manifest.kernels.iter().zip(&prog.kernels) {
            if l.row_block.is_some() && !blocked.contains_key(&l.function) {
                let r = crate::gpu_rows::recognize(k, &prog.arch).ok_or_else(|| {
                    TargetError::Codegen(format!(
                        "kernel {}: a block per row in the manifest, not a row kernel",
                        l.name
                    ))
                })?;
                let k = kiln_ir::kernel::Kernel { name: l.function.clone(), ..k.clone() };
                blocked.insert(l.function.clone(), crate::gpu_rows::host_blocks(k, &r)?);
            }
            if l.tile.is_some() && !blocked.contains_key(&l.function) {
                let gemm = crate::gpu_tile::recognize(k, &prog.arch)?.ok_or_else(|| {
                    TargetError::Codegen(format!("kernel {}: tiled in the manifest, not a tiled GEMM", l.name))
                })?;
                let k = kiln_ir::kernel::Kernel { name: l.function.clone(), ..k.clone() };
                blocked.insert(l.function.clone(), crate::gpu_tile::host_blocks(k, &gemm)?);
            }
            if !firsts.iter().any(|(f, ..)| *f == l.function) {
                let cols = l.cols_known.map(|c| c as i64);
                firsts.push((
                    l.function.clone(),
                    kiln_ir::kernel::Kernel { name: l.function.clone(), ..k.clone() },
                    cols,
                ));
            }
        }
        let (text, function_of) =
            crate::native::module_text(firsts.iter().map(|(_, k, _)| k), crate::native::MlirOptions::default());
        let backend = crate::native::JitBackend::compile(&text, &function_of)?;
        let functions = firsts.into_iter().enumerate().map(|(i, (f, k, c))| (f, (i, k, c))).collect();
        Ok(EmulatedGpu {
            backend,
            functions,
            blocked,
            loaded: Default::default(),
            memory: Vec::new(),
            launches: 0,
            threads: 0,
        })
    }

    /// The allocation holding `len` bytes at `addr`, as a pointer.
    fn span(&self, addr: u64, len: usize) -> Result<*mut u8, kiln_runtime::Error> {
        for m in &self.memory {
            let base = m.as_ptr() as u64;
            if addr >= base && addr + len as u64 <= base + 8 * m.len() as u64 {
                return Ok(addr as *mut u8);
            }
        }
        Err(device_error(format!("{len} bytes at {addr:#x} are outside every allocation")))
    }
}

impl kiln_runtime::gpu::Device for EmulatedGpu {
    fn load(&mut self, dir: &Path, file: &str, function: &str) -> Result<(), kiln_runtime::Error> {
        if !dir.join(file).is_file() {
            return Err(device_error(format!("{}: no such code file", dir.join(file).display())));
        }
        if !self.functions.contains_key(function) {
            return Err(device_error(format!("no function {function} in the program")));
        }
        self.loaded.insert(function.to_string());
        Ok(())
    }

    fn set_stack(&mut self, _: u64) -> Result<(), kiln_runtime::Error> {
        Ok(())
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, kiln_runtime::Error> {
        // 64-byte aligned (cuMemAlloc gives 256): Box<[u64]> is 8-aligned, so the start moves
        // up to 56 bytes into a larger block, and the block is trimmed to start there.
        let words = bytes.div_ceil(8).max(1);
        let nan = u64::from(f32::NAN.to_bits()) * 0x1_0000_0001;
        let mut b: Box<[u64]> = vec![nan; words + 8].into_boxed_slice();
        let skip = (b.as_ptr() as usize).next_multiple_of(64) - b.as_ptr() as usize;
        let addr = b.as_mut_ptr() as u64 + skip as u64;
        self.memory.push(b);
        Ok(addr)
    }

    fn upload(&mut self, to: u64, data: &[u8]) -> Result<(), kiln_runtime::Error> {
        let p = self.span(to, data.len())?;
        // SAFETY: `span` checked that the range lies in one of our allocations.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    fn download(&mut self, from: u64, out: &mut [u8]) -> Result<(), kiln_runtime::Error> {
        let p = self.span(from, out.len())?;
        // SAFETY: as in `upload`.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn launch(
        &mut self,
        function: &str,
        grid: [u32; 3],
        block: [u32; 3],
        _shared: u32,
        params: &[u64],
    ) -> Result<(), kiln_runtime::Error> {
        if !self.loaded.contains(function) {
            return Err(device_error(format!("function {function} was not loaded")));
        }
        let (index, k, cols) = &self.functions[function];
        let blocked = self.blocked.get(function);
        if let Some(b) = blocked {
            let want = (b.grid().map(|x| x as u32), [b.threads() as u32, 1, 1]);
            if (grid, block) != want {
                return Err(device_error(format!(
                    "kernel {}: launched on grid {grid:?} × block {block:?}, its blocks need {:?} × {:?}",
                    k.name, want.0, want.1
                )));
            }
        } else if grid[2] != 1 || block[2] != 1 {
            return Err(device_error("a three-dimensional launch (kiln makes none)"));
        }
        let mut words: Vec<i64> = params.iter().map(|&w| w as i64).collect();
        let mut at = 0;
        let mut shapes: Vec<Vec<usize>> = Vec::new();
        let mut offsets = Vec::new();
        for b in &k.buffers {
            let r = b.shape.len();
            let d = words
                .get(at..at + 3 + 2 * r)
                .ok_or_else(|| device_error(format!("{} parameters, kernel {} takes more", params.len(), k.name)))?;
            let shape: Vec<usize> = d[3..3 + r].iter().map(|&n| n as usize).collect();
            let elem = if b.dtype == DType::Bool { 1 } else { 4 };
            let row_major = kiln_runtime::gpu::descriptor(d[0] as u64, &shape);
            if d.iter().zip(&row_major).any(|(&w, &want)| w as u64 != want) {
                return Err(device_error(format!("buffer {} of {}: not a row-major descriptor", b.name, k.name)));
            }
            self.span(d[0] as u64, shape.iter().product::<usize>() * elem)
                .map_err(|e| device_error(format!("buffer {} of {}: {e}", b.name, k.name)))?;
            offsets.push(at);
            shapes.push(shape);
            at += 3 + 2 * r;
        }
        if at != words.len() {
            return Err(device_error(format!("{} parameters, kernel {} takes {at}", params.len(), k.name)));
        }
        let base = words.as_mut_ptr();
        // SAFETY: offsets are within `words` (checked above).
        let mut descriptors: Vec<*mut i64> = offsets.iter().map(|&o| unsafe { base.add(o) }).collect();
        if let Some(b) = blocked {
            // SAFETY: as below; the function is the tiled or row kernel's host build.
            unsafe { b.call_blocks(&mut descriptors) }.map_err(device_error)?;
            self.launches += 1;
            self.threads += grid.iter().chain(&block).map(|&x| x as u64).product::<u64>();
            return Ok(());
        }
        let refs: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let extent = match crate::native::split_loop(k) {
            Some((_, _, e)) => crate::native::eval_idx(e, &refs)
                .ok_or_else(|| device_error(format!("kernel {}: the extent {e} is not computable", k.name)))?,
            None => 0,
        };
        let (g, b) = ([grid[0] as u64, grid[1] as u64], [block[0] as u64, block[1] as u64]);
        let covered = match cols {
            Some(c) => g[0] * b[0] >= *c as u64 && (g[1] * b[1]) as i64 * c >= extent,
            None => (g[0] * g[1] * b[0] * b[1]) as i64 >= extent,
        };
        if !covered {
            return Err(device_error(format!(
                "kernel {}: grid {g:?} × block {b:?} does not cover its {extent} iterations",
                k.name
            )));
        }
        let mut ranges = crate::native::gpu_thread_ranges(g, b, *cols, extent);
        // SAFETY: each descriptor is row-major over memory inside one of our allocations of its
        // size (checked above), with the buffer's rank; the function is the kernel's.
        unsafe { self.backend.call_ranges(*index, &mut descriptors, &mut ranges) }.map_err(device_error)?;
        self.launches += 1;
        self.threads += g[0] * g[1] * b[0] * b[1];
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), kiln_runtime::Error> {
        Ok(())
    }
}
