//! `kiln inspect`: what a model holds and what kiln makes of it.

use crate::Error;
use kiln_ir::{Module, TensorType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One graph input or output.
#[derive(Debug, Default, Serialize)]
pub struct Port {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
}

/// The report (`--json` prints it; CLI.md fixes the first seven fields).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub graph_ops: usize,
    pub kernels: usize,
    pub ops_by_type: BTreeMap<String, usize>,
    pub unsupported: Vec<String>,
    pub bytes_moved_before: u64,
    pub bytes_moved_after: u64,
    pub fusion_ms: f64,
    /// Kernels by what they are built around (`graph.fused` kinds, else the op type).
    pub kernels_by_kind: BTreeMap<String, usize>,
    /// The cost model's estimate of one run, unfused and as compiled (ms; symbolic dims as 1).
    pub estimated_ms_before: f64,
    pub estimated_ms_after: f64,
    /// Rewrite rules that applied during saturation, with how often.
    pub rewrites: BTreeMap<String, usize>,
    pub egraph_nodes: usize,
    pub egraph_iterations: usize,
    /// Why saturation stopped (`Saturated`, or the iteration/node/time bound that ended it).
    pub egraph_stop: String,
    pub fusion: bool,
    pub target: String,
    pub opset: i64,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    pub constants: usize,
    pub constant_bytes: u64,
}

/// Inspects a model file. Unsupported ops are listed, all of them, rather than failing.
pub fn inspect(path: &Path, target: &str) -> Result<Report, Error> {
    inspect_with(path, target, &crate::Options::default())
}

/// [`inspect`] with compile options (`--no-fusion`).
pub fn inspect_with(path: &Path, target: &str, opts: &crate::Options) -> Result<Report, Error> {
    if kiln_targets::lookup(target).is_none() {
        return Err(Error::UnknownTarget(target.to_string()));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), msg: e.to_string() })?;
    let name = path.display().to_string();
    let proto = kiln_onnx::decode_model(&bytes, &name)?;
    let mut unsupported = Vec::new();
    if let Some(g) = &proto.graph {
        kiln_onnx::import::collect_unsupported(g, &mut unsupported);
    }
    if !unsupported.is_empty() {
        // Count what the file holds, without importing it.
        let mut ops_by_type = BTreeMap::new();
        let mut graph_ops = 0;
        for n in proto.graph.iter().flat_map(|g| &g.node) {
            let op = n.op_type.clone().unwrap_or_default();
            if op != "Constant" {
                graph_ops += 1;
                *ops_by_type.entry(op).or_insert(0) += 1;
            }
        }
        let mut names: Vec<String> = unsupported.iter().map(|(_, op)| op.clone()).collect();
        names.sort();
        names.dedup();
        return Ok(Report {
            graph_ops,
            kernels: 0,
            ops_by_type,
            unsupported: names,
            fusion: opts.fusion,
            target: target.into(),
            ..Report::default()
        });
    }
    let m = kiln_onnx::import_model(&proto, &name, path.parent())?;
    let mut r = report(&m, target);
    let compiled = crate::compile_with(m, target, opts)?;
    let o = compiled.report();
    r.kernels = o.after.kernels;
    r.bytes_moved_before = o.before.bytes_moved;
    r.bytes_moved_after = o.after.bytes_moved;
    r.estimated_ms_before = o.before.seconds * 1e3;
    r.estimated_ms_after = o.after.seconds * 1e3;
    r.fusion_ms = o.fusion_ms;
    r.rewrites = o.saturation.applied.clone();
    r.egraph_nodes = o.saturation.nodes;
    r.egraph_iterations = o.saturation.iterations;
    r.egraph_stop = o.saturation.stop_reason.clone();
    r.fusion = opts.fusion;
    r.kernels_by_kind = kernels_by_kind(compiled.module());
    Ok(r)
}

/// Kernels of a compiled module by kind: `fused:<kind>` for fused ops, else the op type.
pub fn kernels_by_kind(m: &Module) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for &o in &m.body.ops {
        let op = m.op(o);
        let t = op.op_type();
        if !kiln_passes::fusion::launches_kernel(m, o) {
            continue;
        }
        let key = match op.attrs.get("kind") {
            Some(kiln_ir::attr::Attr::Str(k)) if op.name == "graph.fused" => format!("fused:{k}"),
            _ => t.to_string(),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// Bytes kiln stores for a constant of this type (symbolic dims count 1).
fn type_bytes(t: &TensorType) -> u64 {
    let n: u64 = t.shape.as_ref().map_or(1, |s| s.iter().map(|d| d.known().unwrap_or(1)).product());
    n * t.dtype.size_bytes() as u64
}

/// The part of the report read off the imported module (ops, ports, constants); the kernel
/// and bytes figures come from compiling it.
fn report(m: &Module, target: &str) -> Report {
    let mut ops_by_type = BTreeMap::new();
    let (mut graph_ops, mut constants, mut constant_bytes) = (0, 0, 0u64);
    m.walk(&mut |_, op| {
        if op.op_type() == "Constant" {
            constants += 1;
            constant_bytes += op.results.iter().map(|&r| type_bytes(&m.value(r).ty)).sum::<u64>();
            return;
        }
        graph_ops += 1;
        *ops_by_type.entry(op.op_type().to_string()).or_insert(0) += 1;
    });
    let port = |v| Port { name: m.value_label(v), ty: m.value(v).ty.to_string() };
    Report {
        graph_ops,
        ops_by_type,
        target: target.into(),
        opset: kiln_ir::interp::module_opset(m),
        inputs: m.inputs().iter().map(|&v| port(v)).collect(),
        outputs: m.outputs().iter().map(|&v| port(v)).collect(),
        constants,
        constant_bytes,
        ..Report::default()
    }
}
