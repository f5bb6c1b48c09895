//! Canonicalization: inference-time no-ops are removed by forwarding their input, and a Gemm
//! whose `B` is a constant stored transposed (`transB = 1`, as linear layers export) gets the
//! constant transposed once at compile time instead (`transB = 0`): kernels then read `B` along
//! its rows.
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
        let transposed = pretranspose_gemm_weights(m);
        if forward.is_empty() {
            return transposed;
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

/// `Gemm(A, B, C, transB = 1)` with a constant f32 `B` becomes `Gemm(A, Bᵀ, C)` with `Bᵀ` a new
/// constant. Returns whether anything changed.
fn pretranspose_gemm_weights(m: &mut Module) -> bool {
    use kiln_ir::attr::Attr;
    use kiln_ir::ir::ValueDef;
    let mut changed = false;
    let ops: Vec<OpId> = m.body.ops.clone();
    for o in ops {
        let op = m.op(o);
        if op.op_type() != "Gemm" || !matches!(op.attrs.get("transB"), Some(Attr::Int(1))) {
            continue;
        }
        let Some(Some(b)) = op.operands.get(1).copied() else { continue };
        let ValueDef::OpResult(c, _) = m.value(b).def else { continue };
        let cop = m.op(c);
        let t = match (cop.op_type(), cop.attrs.get("value")) {
            ("Constant", Some(Attr::Tensor(t))) if t.shape.len() == 2 && t.as_f32().is_some() => t,
            _ => continue,
        };
        let (n, k) = (t.shape[0], t.shape[1]);
        let src = t.as_f32().expect("checked");
        let mut data = vec![0.0f32; n * k];
        for i in 0..n {
            for j in 0..k {
                data[j * n + i] = src[i * k + j];
            }
        }
        let tt = kiln_ir::Tensor::from_f32(&[k, n], data);
        let ty = kiln_ir::TensorType::new(
            kiln_ir::DType::F32,
            vec![kiln_ir::Dim::Known(k as u64), kiln_ir::Dim::Known(n as u64)],
        );
        let mut attrs = kiln_ir::attr::Attrs::new();
        attrs.insert("value".into(), Attr::Tensor(tt));
        if !cop.node_name().is_empty() {
            attrs.insert(kiln_ir::ir::NODE_NAME_ATTR.into(), Attr::Str(format!("{}_transposed", cop.node_name())));
        }
        let name = cop.name.clone();
        let nc = m.create_op(&name, vec![], vec![ty], attrs, vec![]);
        let nb = m.op(nc).results[0];
        let pos = m.body.ops.iter().position(|&x| x == o).expect("op in body");
        m.body.ops.insert(pos, nc);
        let gemm = m.op_mut(o);
        gemm.operands[1] = Some(nb);
        gemm.attrs.insert("transB".into(), Attr::Int(0));
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use crate::egraph::tests::Builder;
    use crate::Pass;
    use kiln_ir::attr::{Attr, Attrs};
    use kiln_ir::Tensor;

    #[test]
    fn gemm_with_a_constant_transposed_weight_gets_it_transposed_once() {
        let mut b = Builder::new("linear");
        let x = b.input("x", &[3, 4]);
        let w = b.random_const(&[5, 4], 7, -1.0, 1.0);
        let bias = b.random_const(&[5], 8, -1.0, 1.0);
        let mut attrs = Attrs::new();
        attrs.insert("transB".into(), Attr::Int(1));
        let y = b.op("Gemm", &[x, w, bias], attrs);
        b.output(y, "y");
        let input = Tensor::from_f32(&[3, 4], (0..12).map(|i| i as f32 * 0.25 - 1.0).collect());
        let before = kiln_ir::interp::run(&b.m, vec![input.clone()]).unwrap();
        assert!(super::Canonicalize.run(&mut b.m));
        let m = &b.m;
        let gemm = m.body.ops.iter().map(|&o| m.op(o)).find(|op| op.op_type() == "Gemm").unwrap();
        assert_eq!(gemm.attrs.get("transB"), Some(&Attr::Int(0)));
        let wt = m.value(gemm.operands[1].unwrap()).ty.static_shape();
        assert_eq!(wt, Some(vec![4, 5]));
        let after = kiln_ir::interp::run(m, vec![input]).unwrap();
        assert_eq!(before[0].as_f32(), after[0].as_f32());
    }
}
