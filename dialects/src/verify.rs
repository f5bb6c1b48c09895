//! The verifier: structural invariants of a module, and graph ops against their shape rules.
//!
//! Checked: every op has a `dialect.op` name; every operand is defined before its use (in the
//! same block or an enclosing one); every value is defined once; yields are defined; every
//! `graph.*` op is known, its regions match its graph attributes, and its declared result
//! types agree with its shape rule (same dtype and rank, equal known dims).

use crate::attr::Attr;
use crate::graph::{lookup, InferCx};
use crate::ir::{Block, Module, OpId, ValueId};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType};
use std::collections::{HashMap, HashSet};

/// A verification failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node '{node}' ({op}): {msg}")]
pub struct VerifyError {
    pub node: String,
    pub op: String,
    pub msg: String,
}

/// Verifies a module.
pub fn verify(m: &Module) -> Result<(), VerifyError> {
    let mut v = Verifier { m, defined: HashSet::new(), consts: HashMap::new(), next_dim: 0 };
    let body = &m.body;
    v.block(body, None)
}

struct Verifier<'m> {
    m: &'m Module,
    defined: HashSet<ValueId>,
    consts: HashMap<ValueId, &'m Tensor>,
    next_dim: u32,
}

impl<'m> Verifier<'m> {
    fn fail(&self, o: Option<OpId>, msg: String) -> VerifyError {
        match o {
            Some(o) => {
                let op = self.m.op(o);
                VerifyError { node: op.node_name().into(), op: op.name.clone(), msg }
            }
            None => VerifyError { node: String::new(), op: "func.func".into(), msg },
        }
    }

    fn block(&mut self, b: &'m Block, parent: Option<OpId>) -> Result<(), VerifyError> {
        let mut local = Vec::new();
        for &a in &b.args {
            if !self.defined.insert(a) {
                return Err(self.fail(parent, format!("block argument %{} is defined twice", a.0)));
            }
            local.push(a);
        }
        for &o in &b.ops {
            self.op(o)?;
            for &r in &self.m.op(o).results {
                local.push(r);
            }
        }
        for &y in &b.yields {
            if !self.defined.contains(&y) {
                return Err(self.fail(parent, format!("yielded value {} is not defined", self.m.value_label(y))));
            }
        }
        // Values of a region are not visible after it.
        if parent.is_some() {
            for v in local {
                self.defined.remove(&v);
            }
        }
        Ok(())
    }

    fn op(&mut self, o: OpId) -> Result<(), VerifyError> {
        let op = &self.m.ops[o.0 as usize];
        if op.dialect().is_empty() {
            return Err(self.fail(Some(o), "op name has no dialect prefix".into()));
        }
        for v in op.operands.iter().flatten() {
            if !self.defined.contains(v) {
                return Err(
                    self.fail(Some(o), format!("operand {} is used before it is defined", self.m.value_label(*v)))
                );
            }
        }
        for r in &op.regions {
            for b in &r.blocks {
                self.block(b, Some(o))?;
            }
        }
        if op.name == "graph.fused" {
            self.fused_signature(o)?;
        }
        for &r in &op.results {
            if !self.defined.insert(r) {
                return Err(self.fail(Some(o), format!("result %{} is defined twice", r.0)));
            }
        }
        if op.dialect() == "graph" {
            self.graph_op(o)?;
        }
        Ok(())
    }

    /// A `graph.fused` op's region takes its operands and yields its results, type for type.
    fn fused_signature(&self, o: OpId) -> Result<(), VerifyError> {
        let op = self.m.op(o);
        let Some(b) = op.regions.first().and_then(|r| r.blocks.first()) else {
            return Err(self.fail(Some(o), "a fused op needs a body region".into()));
        };
        let ty = |v: &ValueId| &self.m.value(*v).ty;
        let operands: Vec<Option<&TensorType>> = op.operands.iter().map(|v| v.as_ref().map(ty)).collect();
        let args: Vec<Option<&TensorType>> = b.args.iter().map(|v| Some(ty(v))).collect();
        if operands != args {
            return Err(self.fail(Some(o), "the body's arguments do not match the operands".into()));
        }
        if op.results.iter().map(ty).ne(b.yields.iter().map(ty)) {
            return Err(self.fail(Some(o), "the body's yields do not match the results".into()));
        }
        Ok(())
    }

    fn graph_op(&mut self, o: OpId) -> Result<(), VerifyError> {
        let op = &self.m.ops[o.0 as usize];
        let Some(def) = lookup(op.op_type()) else {
            return Err(self.fail(Some(o), "unknown graph op".into()));
        };
        for a in op.attrs.values() {
            if let Attr::Region(r) = a {
                if *r as usize >= op.regions.len() {
                    return Err(self.fail(
                        Some(o),
                        format!("graph attribute refers to region {r}, the op has {}", op.regions.len()),
                    ));
                }
            }
        }
        if op.op_type() == "Constant" {
            if let Some(Attr::Tensor(t)) = op.attrs.get("value") {
                self.consts.insert(op.results[0], t);
            }
        }
        let in_types: Vec<Option<TensorType>> =
            op.operands.iter().map(|v| v.map(|v| self.m.value(v).ty.clone())).collect();
        let consts: Vec<Option<&Tensor>> =
            op.operands.iter().map(|v| v.and_then(|v| self.consts.get(&v).copied())).collect();
        let opset = crate::interp::module_opset(self.m);
        let mut next = self.next_dim;
        let inferred = {
            let mut cx = InferCx::new(&op.attrs, &in_types, &consts, op.results.len(), opset, &op.regions, &mut next);
            def.infer(&mut cx)
        };
        self.next_dim = next;
        let inferred = inferred.map_err(|e| self.fail(Some(o), e.0))?;
        for (i, (&r, want)) in op.results.iter().zip(&inferred).enumerate() {
            let got = &self.m.value(r).ty;
            if !compatible(got, want) {
                return Err(self.fail(Some(o), format!("result {i} is declared {got}, its shape rule gives {want}")));
            }
        }
        Ok(())
    }
}

/// Declared and inferred types agree: same dtype; where both ranks are known, equal; known
/// dims equal (a symbol on either side matches anything).
fn compatible(declared: &TensorType, inferred: &TensorType) -> bool {
    if declared.dtype != inferred.dtype {
        return false;
    }
    match (&declared.shape, &inferred.shape) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| match (x, y) {
                    (Dim::Known(p), Dim::Known(q)) => p == q,
                    _ => true,
                })
        }
        _ => true,
    }
}
