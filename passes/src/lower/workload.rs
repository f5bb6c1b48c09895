//! Workload keys: what makes two kernels the same tuning problem.
//!
//! A kernel's key is a hash of its graph op's signature: op types, attributes (node names
//! left out), operand and result types, and, for a `graph.fused` kernel, the ops of its body
//! with their operands numbered locally. Repeated blocks of a network (the 16 identical
//! bottlenecks of a ResNet stage, the layers of a transformer) share keys, so each is tuned
//! once; a different shape or a different fused chain is another workload.

use kiln_ir::ir::{OpId, NODE_NAME_ATTR};
use kiln_ir::{Block, Module, ValueId};
use std::collections::HashMap;
use std::fmt::Write;

/// The workload key of kernel `o` of `m`: 16 hex digits (FNV-1a 64 of its signature).
pub fn workload_key(m: &Module, o: OpId) -> String {
    let mut sig = String::new();
    let mut local: HashMap<ValueId, usize> = HashMap::new();
    signature(m, o, &mut local, &mut sig);
    format!("{:016x}", fnv1a(sig.as_bytes()))
}

/// FNV-1a, 64 bits: a small stable hash (the same in every build and process, unlike std's
/// `DefaultHasher`), for keys written to tuning databases.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn name_of(local: &mut HashMap<ValueId, usize>, v: ValueId) -> usize {
    let n = local.len();
    *local.entry(v).or_insert(n)
}

fn signature(m: &Module, o: OpId, local: &mut HashMap<ValueId, usize>, out: &mut String) {
    let op = m.op(o);
    let _ = write!(out, "{}(", op.name);
    for v in &op.operands {
        match v {
            Some(v) => {
                let n = name_of(local, *v);
                let _ = write!(out, "%{n}:{},", m.value(*v).ty);
            }
            None => out.push_str("_,"),
        }
    }
    out.push_str(")->(");
    for &r in &op.results {
        let n = name_of(local, r);
        let _ = write!(out, "%{n}:{},", m.value(r).ty);
    }
    out.push(')');
    for (k, a) in &op.attrs {
        match a {
            _ if k == NODE_NAME_ATTR => {}
            // Weights folded into a kernel: their contents matter, not their text.
            kiln_ir::Attr::Tensor(t) => {
                let _ = write!(out, " {k}=tensor<{}:{:?}:{:x}>", t.dtype(), t.shape, fnv1a(&t.data.to_le_bytes()));
            }
            _ => {
                let _ = write!(out, " {k}={a:?}");
            }
        }
    }
    out.push('{');
    for r in &op.regions {
        for b in &r.blocks {
            block(m, b, local, out);
        }
    }
    out.push_str("};");
}

fn block(m: &Module, b: &Block, local: &mut HashMap<ValueId, usize>, out: &mut String) {
    for &a in &b.args {
        let n = name_of(local, a);
        let _ = write!(out, "^%{n}:{},", m.value(a).ty);
    }
    for &o in &b.ops {
        signature(m, o, local, out);
    }
    for &y in &b.yields {
        let n = name_of(local, y);
        let _ = write!(out, "yield %{n};");
    }
}
