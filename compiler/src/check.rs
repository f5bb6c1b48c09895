//! Numerical bisection (`kiln run --check`): the model runs on its target and on the reference
//! interpreter side by side, and every kernel's outputs are compared in program order. The
//! first kernel whose output differs beyond the tolerance is named with the graph nodes it
//! computes, so a wrong result is traced to its kernel instead of chased by hand.

use crate::{CompiledModel, Error, Tensor};
use kiln_ir::ir::OpId;
use std::collections::HashMap;
use std::rc::Rc;

/// Where a target's outputs first left the reference's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Divergence {
    /// The kernel's node name and op (`fused` for a fused kernel).
    pub node: String,
    pub op: String,
    /// For a fused kernel, the graph nodes inside it, in order.
    pub nodes: Vec<String>,
    /// Which of the kernel's outputs, and its name.
    pub output: usize,
    pub value: String,
    /// Largest absolute and relative errors over the output, and the flat index of the element
    /// furthest outside the tolerance.
    pub max_abs: f64,
    pub max_rel: f64,
    pub index: usize,
    /// What was compared (values) or why they could not be (shape or dtype mismatch).
    pub detail: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node '{}' ({}) output {} '{}': ", self.node, self.op, self.output, self.value)?;
        if self.detail.is_empty() {
            write!(
                f,
                "max abs error {:.3e}, max rel error {:.3e} (worst at element {})",
                self.max_abs, self.max_rel, self.index
            )?;
        } else {
            write!(f, "{}", self.detail)?;
        }
        if !self.nodes.is_empty() {
            write!(f, "; the kernel fuses nodes {}", self.nodes.join(", "))?;
        }
        Ok(())
    }
}

/// What a checked run compared.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckReport {
    /// Kernels whose outputs were compared.
    pub kernels: usize,
    /// The first kernel (in program order) beyond the tolerance, if any.
    pub first: Option<Divergence>,
}

/// Compares `got` with `want`: `None` when every element is within `atol + rtol·|want|`
/// (NaN matches NaN, infinities must be equal); otherwise the errors.
fn diverges(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Option<(f64, f64, usize, String)> {
    if got.dtype() != want.dtype() || got.shape != want.shape {
        return Some((
            f64::INFINITY,
            f64::INFINITY,
            0,
            format!("{}{:?} where the reference has {}{:?}", got.dtype(), got.shape, want.dtype(), want.shape),
        ));
    }
    if !got.dtype().is_float() && !got.dtype().is_int() && got.dtype() != kiln_ir::DType::Bool {
        return None;
    }
    let (a, b) = (got.to_f64(), want.to_f64());
    let (mut max_abs, mut max_rel, mut worst, mut worst_excess, mut bad) = (0.0f64, 0.0f64, 0, 0.0f64, false);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let ok = kiln_onnx::testcase::within(x, y, rtol, atol);
        let err = if x.is_finite() && y.is_finite() {
            (x - y).abs()
        } else if ok {
            0.0
        } else {
            f64::INFINITY
        };
        max_abs = max_abs.max(err);
        if y != 0.0 {
            max_rel = max_rel.max(err / y.abs());
        }
        if !ok {
            let excess = err - (atol + rtol * y.abs());
            if !bad || excess > worst_excess {
                (worst, worst_excess, bad) = (i, excess, true);
            }
        }
    }
    bad.then_some((max_abs, max_rel, worst, String::new()))
}

impl CompiledModel {
    /// Runs the model on its target and on the reference interpreter, comparing every kernel's
    /// outputs (`rtol`, `atol` as in [`diverges`]); returns the target's outputs and what the
    /// comparison found.
    pub fn check(&self, inputs: Vec<Tensor>, rtol: f64, atol: f64) -> Result<(Vec<Tensor>, CheckReport), Error> {
        let m = self.module();
        let mut reference: HashMap<OpId, Vec<Rc<Tensor>>> = HashMap::new();
        kiln_ir::interp::run_observed(m, inputs.clone(), &mut |o, outs| {
            if kiln_passes::fusion::launches_kernel(m, o) {
                reference.insert(o, outs.to_vec());
            }
        })
        .map_err(|source| Error::Run { model: self.name.clone(), source })?;
        let mut report = CheckReport { kernels: 0, first: None };
        let (outs, _) = self.run_observed(inputs, &mut |o, outs| {
            let Some(want) = reference.get(&o) else { return };
            report.kernels += 1;
            if report.first.is_some() {
                return;
            }
            let op = m.op(o);
            for (k, (g, w)) in outs.iter().zip(want).enumerate() {
                if let Some((max_abs, max_rel, index, detail)) = diverges(g, w, rtol, atol) {
                    let nodes = op
                        .regions
                        .iter()
                        .flat_map(|r| &r.blocks)
                        .flat_map(|b| &b.ops)
                        .map(|&i| m.op(i).node_name().to_string())
                        .filter(|n| !n.is_empty())
                        .collect();
                    report.first = Some(Divergence {
                        node: op.node_name().to_string(),
                        op: op.op_type().to_string(),
                        nodes,
                        output: k,
                        value: m.value_label(op.results[k]),
                        max_abs,
                        max_rel,
                        index,
                        detail,
                    });
                    break;
                }
            }
        })?;
        Ok((outs, report))
    }
}
