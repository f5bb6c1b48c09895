//! Dead-code elimination: drops ops none of whose results reach a model output.
//!
//! Liveness is reachability in the use-def graph (a petgraph `DiGraph` from each op to the ops
//! it reads), walked backwards from the ops that produce the outputs. Graph ops have no side
//! effects, so an op with no live result is dead.

use crate::Pass;
use kiln_ir::ir::{Block, OpId, ValueDef};
use kiln_ir::{Module, ValueId};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::Dfs;
use std::collections::{HashMap, HashSet};

pub struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, m: &mut Module) -> bool {
        let live = live_ops(m);
        let before = m.body.ops.len();
        m.body.ops.retain(|o| live.contains(o));
        before != m.body.ops.len()
    }
}

/// Every value an op reads, regions included.
fn reads(m: &Module, o: OpId, out: &mut Vec<ValueId>) {
    let op = m.op(o);
    out.extend(op.operands.iter().flatten());
    for r in &op.regions {
        for b in &r.blocks {
            read_block(m, b, out);
        }
    }
}

fn read_block(m: &Module, b: &Block, out: &mut Vec<ValueId>) {
    for &inner in &b.ops {
        reads(m, inner, out);
    }
    out.extend(&b.yields);
}

/// Top-level ops of `main` that (transitively) feed an output.
pub fn live_ops(m: &Module) -> HashSet<OpId> {
    let mut g: DiGraph<OpId, ()> = DiGraph::new();
    let nodes: HashMap<OpId, NodeIndex> = m.body.ops.iter().map(|&o| (o, g.add_node(o))).collect();
    // Map each value to the top-level op that defines it (or whose region defines it).
    let mut producer: HashMap<ValueId, OpId> = HashMap::new();
    for &o in &m.body.ops {
        for &r in &m.op(o).results {
            producer.insert(r, o);
        }
    }
    for &o in &m.body.ops {
        let mut used = Vec::new();
        reads(m, o, &mut used);
        for v in used {
            if let (ValueDef::OpResult(..), Some(&p)) = (m.value(v).def, producer.get(&v)) {
                g.add_edge(nodes[&o], nodes[&p], ());
            }
        }
    }
    let mut live = HashSet::new();
    for y in &m.body.yields {
        if let Some(p) = producer.get(y) {
            let mut dfs = Dfs::new(&g, nodes[p]);
            while let Some(n) = dfs.next(&g) {
                live.insert(g[n]);
            }
        }
    }
    live
}
