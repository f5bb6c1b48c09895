//! The whole-model program of a GPU compile (`kiln compile MODEL --target cuda|rocm -o DIR`
//! writes it as `DIR/plan.json` and `DIR/weights.bin` beside the kernels and
//! `manifest.json`): the kernel launches in program order, each buffer argument bound to a graph
//! input, a graph output, a weight (a byte offset into `weights.bin`) or an arena offset, with
//! its static shape and element type, and the arena's size. The memory plan is the cpu AOT's
//! ([`crate::aot::plan_memory`]: views alias their operand, intermediates share one arena by
//! live range, graph outputs written in place). `kiln-runtime`'s executor runs it on any
//! [`kiln_runtime::gpu::Device`].
//!
//! Scope as the cpu AOT: static shapes, f32 and bool tensors. A model with host kernels (or
//! symbolic shapes, or other dtypes at its edges) still compiles its kernels; its plan says it
//! is not runnable and why, naming each host kernel with its node and op, and runners refuse it
//! with that message.

use crate::aot::{plan_memory, plan_root, static_shape, Storage};
use crate::gpu::GpuProgram;
use crate::TargetError;
use kiln_ir::ir::{OpId, ValueId};
use kiln_ir::{DType, Module};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The plan's format tag (`kiln-runtime` checks it).
pub const FORMAT: &str = "kiln-gpu-plan/1";

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
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

/// A buffer: where, its shape and element type (`f32`, or `i8` for a bool tensor).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanBuffer {
    pub at: Place,
    pub shape: Vec<usize>,
    pub dtype: &'static str,
}

/// A graph input or output: its name and buffer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanPort {
    pub name: String,
    #[serde(flatten)]
    pub buffer: PlanBuffer,
}

/// One kernel launch: the manifest's kernel, its function and file, grid and block, and one
/// buffer per kernel parameter descriptor (the manifest's `args`, in order).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanLaunch {
    pub kernel: String,
    pub node: String,
    pub op: String,
    pub function: String,
    pub file: String,
    pub grid: [u64; 3],
    pub block: [u64; 3],
    pub shared_bytes: u64,
    pub args: Vec<PlanBuffer>,
}

/// `plan.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub format: &'static str,
    pub target: &'static str,
    pub arch: String,
    /// Whether the runtime can run the whole model; else `why_not` says why.
    pub runnable: bool,
    pub why_not: Option<String>,
    pub inputs: Vec<PlanPort>,
    pub outputs: Vec<PlanPort>,
    pub arena_bytes: usize,
    /// The weights' file (in the plan's directory) and its size.
    pub weights: &'static str,
    pub weight_bytes: usize,
    /// The largest per-thread local memory of any launch (the stack the driver must give).
    pub stack_bytes: u64,
    pub launches: Vec<PlanLaunch>,
}

fn dtype_name(d: DType) -> Option<&'static str> {
    match d {
        DType::F32 => Some("f32"),
        DType::Bool => Some("i8"),
        _ => None,
    }
}

/// The plan of `prog` (compiled from fused module `m`) and the weights it reads.
pub fn plan(m: &Module, prog: &GpuProgram) -> (Plan, Vec<u8>) {
    let mut p = Plan {
        format: FORMAT,
        target: prog.arch.family.name(),
        arch: prog.arch.chip.clone(),
        runnable: false,
        why_not: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
        arena_bytes: 0,
        weights: "weights.bin",
        weight_bytes: 0,
        stack_bytes: 0,
        launches: Vec::new(),
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
            (p, Vec::new())
        }
    }
}

fn fill(m: &Module, prog: &GpuProgram, p: &mut Plan) -> Result<Vec<u8>, String> {
    let host = &prog.manifest.host_kernels;
    if !host.is_empty() {
        let list: Vec<String> =
            host.iter().map(|h| format!("{} (node '{}', {}): {}", h.name, h.node, h.op, h.why)).collect();
        return Err(format!(
            "{} kernels run on the host (not lowered for the GPU yet): {}",
            host.len(),
            list.join("; ")
        ));
    }
    let text = |e: TargetError| e.to_string();
    let dtype = |v: ValueId| {
        let t = &m.value(v).ty;
        dtype_name(t.dtype)
            .ok_or_else(|| format!("{} is {} (the GPU runtime passes f32 and bool tensors)", m.value_label(v), t))
    };
    let position: HashMap<OpId, usize> = m.body.ops.iter().enumerate().map(|(i, &o)| (o, i)).collect();
    let ops: HashMap<String, OpId> =
        crate::native::launched_kernels(m).into_iter().map(|(o, name)| (name, o)).collect();
    let mut kernel_ops = Vec::new();
    for l in &prog.manifest.kernels {
        let o = *ops.get(&l.name).ok_or_else(|| format!("kernel {} is no op of the model (a kiln bug)", l.name))?;
        kernel_ops.push((position[&o], o));
    }
    let memory = plan_memory(m, &kernel_ops).map_err(text)?;
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
    let buffer = |v: ValueId| -> Result<PlanBuffer, String> {
        Ok(PlanBuffer { at: place(v)?, shape: static_shape(m, v).map_err(text)?, dtype: dtype(v)? })
    };
    let port = |v: ValueId| -> Result<PlanPort, String> { Ok(PlanPort { name: m.value_label(v), buffer: buffer(v)? }) };
    p.inputs = m.inputs().iter().map(|&v| port(v)).collect::<Result<_, _>>()?;
    p.outputs = m.outputs().iter().map(|&v| port(v)).collect::<Result<_, _>>()?;
    for ((l, k), (_, o)) in prog.manifest.kernels.iter().zip(&prog.kernels).zip(&kernel_ops) {
        let op = m.op(*o);
        let grid = l.grid.ok_or_else(|| format!("kernel {}: its grid is not known at compile time", l.name))?;
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
            args.push(a);
        }
        p.stack_bytes = p.stack_bytes.max(l.local_bytes.unwrap_or(0));
        p.launches.push(PlanLaunch {
            kernel: l.name.clone(),
            node: l.node.clone(),
            op: l.op.clone(),
            function: l.function.clone(),
            file: l.file.clone(),
            grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
            args,
        });
    }
    p.arena_bytes = memory.arena_bytes;
    Ok(memory.weights)
}

impl Plan {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the plan serializes")
    }
}

/// Writes the plan of `prog` (compiled from fused `m`) as `dir/plan.json` and its weights as
/// `dir/weights.bin`; returns the plan and the paths written.
pub fn write(m: &Module, prog: &GpuProgram, dir: &Path) -> Result<(Plan, Vec<PathBuf>), TargetError> {
    let io = |p: &Path, e: std::io::Error| TargetError::Config(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let (plan, weights) = plan(m, prog);
    let pj = dir.join("plan.json");
    std::fs::write(&pj, plan.json()).map_err(|e| io(&pj, e))?;
    let wb = dir.join(plan.weights);
    std::fs::write(&wb, &weights).map_err(|e| io(&wb, e))?;
    Ok((plan, vec![pj, wb]))
}
