//! Canonicalization: inference-time no-ops are removed by forwarding their input.
//!
//! `Identity`, and `Dropout` in inference (no `training_mode` input, or a constant false one,
//! and no mask output in use) return their input unchanged; uses of their output are
//! redirected to the input. Model outputs that would become model inputs are left alone so
//! that output names are kept.

use crate::Pass;
use kiln_ir::ir::{Block, OpId};
use kiln_ir::{Module, ValueId};
use std::collections::HashMap;

pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, m: &mut Module) -> bool {
        let mut forward: HashMap<ValueId, ValueId> = HashMap::new();
        let outputs = m.body.yields.clone();
        for &o in &m.body.ops {
            let op = m.op(o);
            let is_noop = match op.op_type() {
                "Identity" => op.operands.len() == 1,
                "Dropout" => op.operands.len() == 1 && (op.results.len() == 1 || !used(m, op.results[1])),
                _ => false,
            };
            if let (true, Some(Some(src))) = (is_noop, op.operands.first()) {
                let res = op.results[0];
                if !outputs.contains(&res) && m.value(res).ty.dtype == m.value(*src).ty.dtype {
                    let src = *forward.get(src).unwrap_or(src);
                    forward.insert(res, src);
                }
            }
        }
        if forward.is_empty() {
            return false;
        }
        let ops: Vec<OpId> = m.body.ops.clone();
        for o in ops {
            rewrite_op(m, o, &forward);
        }
        true
    }
}

fn used(m: &Module, v: ValueId) -> bool {
    let mut found = m.body.yields.contains(&v);
    m.walk(&mut |_, op| found |= op.operands.contains(&Some(v)));
    found
}

fn rewrite_op(m: &mut Module, o: OpId, fwd: &HashMap<ValueId, ValueId>) {
    let op = m.op_mut(o);
    for v in op.operands.iter_mut().flatten() {
        if let Some(&s) = fwd.get(v) {
            *v = s;
        }
    }
    // Regions are taken out while their ops are rewritten (they live in the same arena).
    let mut regions = std::mem::take(&mut op.regions);
    for r in &mut regions {
        for b in &mut r.blocks {
            rewrite_block(m, b, fwd);
        }
    }
    m.op_mut(o).regions = regions;
}

fn rewrite_block(m: &mut Module, b: &mut Block, fwd: &HashMap<ValueId, ValueId>) {
    for &o in &b.ops {
        rewrite_op(m, o, fwd);
    }
    for y in &mut b.yields {
        if let Some(&s) = fwd.get(y) {
            *y = s;
        }
    }
}
