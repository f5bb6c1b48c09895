//! The reference interpreter: runs a module of graph ops with each op's [`OpDef::eval`].
//!
//! It is the numerics oracle for every target. It checks inputs against the function's
//! signature (dtype, rank, known dims, consistent bindings of symbolic dims), frees each
//! intermediate after its last use, and reports failures with the node name and op type.

use crate::attr::Attr;
use crate::graph::{lookup, EvalCx, OpError, OpResult, RegionRunner};
use crate::ir::{Block, Module, OpId, Region, ValueId};
use crate::tensor::Tensor;
use crate::types::Dim;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A failure while running a model, with where it happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterpError {
    #[error("expected {expected} input(s), got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("input '{name}': {msg}")]
    Input { name: String, msg: String },
    #[error("node '{node}' ({op}): {msg}")]
    Node { node: String, op: String, msg: String },
}

/// The opset a module was imported at (attribute `kiln.opset`), default the latest.
pub fn module_opset(m: &Module) -> i64 {
    match m.attrs.get("kiln.opset") {
        Some(Attr::Int(v)) => *v,
        _ => 28,
    }
}

/// Checks run-time inputs against the module signature and binds symbolic dims.
pub fn check_inputs(m: &Module, inputs: &[Tensor]) -> Result<HashMap<String, usize>, InterpError> {
    let args = m.inputs();
    if inputs.len() != args.len() {
        return Err(InterpError::InputCount { expected: args.len(), got: inputs.len() });
    }
    let mut bindings: HashMap<String, usize> = HashMap::new();
    for (&v, t) in args.iter().zip(inputs) {
        let vd = m.value(v);
        let name = m.value_label(v);
        let err = |msg: String| InterpError::Input { name: name.clone(), msg };
        if t.dtype() != vd.ty.dtype {
            return Err(err(format!("expected element type {}, got {}", vd.ty.dtype, t.dtype())));
        }
        let Some(shape) = &vd.ty.shape else { continue };
        if shape.len() != t.rank() {
            return Err(err(format!("expected shape {}, got rank {} shape {:?}", vd.ty, t.rank(), t.shape)));
        }
        for (i, (d, &n)) in shape.iter().zip(&t.shape).enumerate() {
            match d {
                Dim::Known(k) if *k as usize != n => {
                    return Err(err(format!("expected dim {i} to be {k} (type {}), got {n}", vd.ty)));
                }
                Dim::Sym(s) => {
                    if let Some(&prev) = bindings.get(&**s) {
                        if prev != n {
                            return Err(err(format!(
                                "symbolic dim '{s}' is bound to {prev} by an earlier input, got {n}"
                            )));
                        }
                    } else {
                        bindings.insert(s.to_string(), n);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(bindings)
}

/// Runs `m` on `inputs` (in the order of [`Module::inputs`]) and returns its outputs.
pub fn run(m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InterpError> {
    run_observed(m, inputs, &mut |_, _| {})
}

/// Statistics of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Most bytes of tensors alive at once (inputs, intermediates, outputs; constants count
    /// while they are live).
    pub peak_bytes: u64,
}

/// Like [`run`], calling `observe` with every top-level op's outputs as they are produced.
pub fn run_observed(
    m: &Module,
    inputs: Vec<Tensor>,
    observe: &mut dyn FnMut(OpId, &[Rc<Tensor>]),
) -> Result<Vec<Tensor>, InterpError> {
    run_with_stats(m, inputs, observe).map(|(outs, _)| outs)
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.len() * t.dtype().size_bytes()) as u64
}

/// Like [`run_observed`], also returning [`RunStats`].
pub fn run_with_stats(
    m: &Module,
    inputs: Vec<Tensor>,
    observe: &mut dyn FnMut(OpId, &[Rc<Tensor>]),
) -> Result<(Vec<Tensor>, RunStats), InterpError> {
    run_custom(m, inputs, observe, &|_, _| None)
}

/// Computes an op in place of its reference semantics: `Some` with its results (native code,
/// a constant shared across runs), `None` to evaluate the op as the interpreter does.
pub type OpOverride<'a> = &'a dyn Fn(OpId, &[Option<&Tensor>]) -> Option<OpResult<Vec<Rc<Tensor>>>>;

/// [`run_with_stats`] with some ops computed by `over` (a target's executor reuses the
/// interpreter's input checks, lifetimes and error reporting this way).
pub fn run_custom(
    m: &Module,
    inputs: Vec<Tensor>,
    observe: &mut dyn FnMut(OpId, &[Rc<Tensor>]),
    over: OpOverride,
) -> Result<(Vec<Tensor>, RunStats), InterpError> {
    check_inputs(m, &inputs)?;
    let interp = Interp { m, opset: module_opset(m), env: RefCell::new(vec![None; m.values.len()]), over };
    let mut live: u64 = inputs.iter().map(tensor_bytes).sum();
    let mut stats = RunStats { peak_bytes: live };
    for (&v, t) in m.inputs().iter().zip(inputs) {
        interp.set(v, Rc::new(t));
    }
    // Values to free after each top-level op: those it reads last (uses inside regions count
    // for their op), and results nothing reads. Model outputs are kept.
    let mut last_use: HashMap<ValueId, usize> = HashMap::new();
    for (i, &o) in m.body.ops.iter().enumerate() {
        collect_uses(m, o, &mut |v| {
            last_use.insert(v, i);
        });
        for &r in &m.op(o).results {
            last_use.entry(r).or_insert(i);
        }
    }
    let top_level: std::collections::HashSet<ValueId> =
        m.body.args.iter().copied().chain(m.body.ops.iter().flat_map(|&o| m.op(o).results.iter().copied())).collect();
    let mut frees: Vec<Vec<ValueId>> = vec![Vec::new(); m.body.ops.len()];
    for (&v, &i) in &last_use {
        if top_level.contains(&v) && !m.outputs().contains(&v) {
            frees[i].push(v);
        }
    }
    for (i, &o) in m.body.ops.iter().enumerate() {
        interp.exec(o).map_err(|e| interp.node_error(o, e))?;
        let outs: Vec<Rc<Tensor>> = {
            let env = interp.env.borrow();
            m.op(o).results.iter().filter_map(|&r| env[r.0 as usize].clone()).collect()
        };
        live += outs.iter().map(|t| tensor_bytes(t)).sum::<u64>();
        stats.peak_bytes = stats.peak_bytes.max(live);
        observe(o, &outs);
        let mut env = interp.env.borrow_mut();
        for &v in &frees[i] {
            if let Some(t) = env[v.0 as usize].take() {
                live = live.saturating_sub(tensor_bytes(&t));
            }
        }
    }
    let mut env = interp.env.borrow_mut();
    let outputs = m.outputs();
    let outs = outputs
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            // The last use of a value moves it out (no copy unless an observer kept it).
            let slot = &mut env[v.0 as usize];
            let last = !outputs[i + 1..].contains(&v);
            match if last { slot.take() } else { slot.clone() } {
                Some(t) => Ok(Rc::try_unwrap(t).unwrap_or_else(|t| (*t).clone())),
                None => Err(InterpError::Node {
                    node: m.value_label(v),
                    op: "output".into(),
                    msg: "the model output was never computed".into(),
                }),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((outs, stats))
}

/// Calls `f` on every value op `o` reads, including values captured by its regions.
fn collect_uses(m: &Module, o: OpId, f: &mut dyn FnMut(ValueId)) {
    let op = m.op(o);
    for &v in op.operands.iter().flatten() {
        f(v);
    }
    for r in &op.regions {
        for b in &r.blocks {
            for &inner in &b.ops {
                collect_uses(m, inner, f);
            }
            for &y in &b.yields {
                f(y);
            }
        }
    }
}

struct Interp<'m> {
    m: &'m Module,
    opset: i64,
    env: RefCell<Vec<Option<Rc<Tensor>>>>,
    over: OpOverride<'m>,
}

impl Interp<'_> {
    fn set(&self, v: ValueId, t: Rc<Tensor>) {
        self.env.borrow_mut()[v.0 as usize] = Some(t);
    }

    fn get(&self, v: ValueId) -> OpResult<Rc<Tensor>> {
        match &self.env.borrow()[v.0 as usize] {
            Some(t) => Ok(t.clone()),
            None => Err(OpError(format!("value {} is used before it is computed", self.m.value_label(v)))),
        }
    }

    fn node_error(&self, o: OpId, e: OpError) -> InterpError {
        let op = self.m.op(o);
        InterpError::Node { node: op.node_name().to_string(), op: op.op_type().to_string(), msg: e.0 }
    }

    fn exec(&self, o: OpId) -> OpResult<()> {
        let op = self.m.op(o);
        let Some(def) = lookup(op.op_type()) else {
            return Err(OpError(format!("op '{}' has no reference semantics", op.name)));
        };
        let inputs: Vec<Option<Rc<Tensor>>> =
            op.operands.iter().map(|v| v.map(|v| self.get(v)).transpose()).collect::<OpResult<_>>()?;
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_deref()).collect();
        let outs: Vec<Rc<Tensor>> = match (self.over)(o, &refs) {
            Some(outs) => outs?,
            None => {
                let cx = EvalCx {
                    attrs: crate::graph::AttrView(&op.attrs),
                    num_outputs: op.results.len(),
                    opset: self.opset,
                    regions: &op.regions,
                    runner: self,
                };
                def.eval(&cx, &refs)?.into_iter().map(Rc::new).collect()
            }
        };
        if outs.len() < op.results.len() {
            return Err(OpError(format!("produced {} outputs, the op has {}", outs.len(), op.results.len())));
        }
        for (&r, t) in op.results.iter().zip(outs) {
            let want = self.m.value(r).ty.dtype;
            if t.dtype() != want {
                return Err(OpError(format!(
                    "produced an output of type {}, its declared type is {}",
                    t.dtype(),
                    want
                )));
            }
            self.set(r, t);
        }
        Ok(())
    }

    fn run_block(&self, b: &Block, args: Vec<Tensor>) -> OpResult<Vec<Tensor>> {
        if args.len() != b.args.len() {
            return Err(OpError(format!("region expects {} arguments, got {}", b.args.len(), args.len())));
        }
        for (&v, t) in b.args.iter().zip(args) {
            self.set(v, Rc::new(t));
        }
        for &o in &b.ops {
            self.exec(o).map_err(|e| {
                let op = self.m.op(o);
                OpError(format!("in subgraph node '{}' ({}): {}", op.node_name(), op.op_type(), e.0))
            })?;
        }
        let outs = b.yields.iter().map(|&v| self.get(v).map(|t| (*t).clone())).collect();
        // The block's own values die with it (a fused kernel's intermediates, a loop body's).
        let mut env = self.env.borrow_mut();
        for &v in b.args.iter().chain(b.ops.iter().flat_map(|&o| self.m.op(o).results.iter())) {
            env[v.0 as usize] = None;
        }
        outs
    }
}

impl RegionRunner for Interp<'_> {
    fn run_region(&self, region: &Region, args: Vec<Tensor>) -> OpResult<Vec<Tensor>> {
        match region.blocks.first() {
            Some(b) => self.run_block(b, args),
            None => Err(OpError("empty region".into())),
        }
    }
}
