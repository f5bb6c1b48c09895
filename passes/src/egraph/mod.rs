//! Equality saturation over the graph dialect, with egg.
//!
//! - **Language** ([`Node`]): an e-node is a graph op (`Op(op_type, children)`) or a leaf
//!   ([`Leaf`]): a function input, a constant, an op's attributes, a result index, or an
//!   omitted optional operand. An op's first child is always its attributes leaf, then its
//!   operands, then (for ops with regions) the outer values its regions capture. An op with
//!   several results is a tuple class; `kiln.get(i, tuple)` projects result `i`.
//! - **Analysis** ([`GraphAnalysis`]): every e-class carries its result types (dtype and shape,
//!   symbolic dims included), its value when known at compile time (constant folding of new
//!   nodes), and the source names of the node and value it stands for.
//! - **Conversion** ([`to_egraph`]) and **extraction** ([`extract`], [`to_module`]): the
//!   extractor picks one node per class minimizing the total cost of the chosen DAG under the
//!   target's [`CostModel`] (a shared producer counts once), then rebuilds a module, keeping
//!   node names, value names and the function's signature.
//!
//! Rules live in [`rules`]; [`saturate`] runs them with bounds on iterations and nodes (no
//! time bound enters the result: the same model gives the same plan every run).

pub mod rules;

use crate::cost::{is_view, CostModel, KernelWork};
use egg::{define_language, Analysis, DidMerge, EGraph, Id, Language, Symbol};
use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::graph::{lookup, EvalCx, InferCx, NoRegions};
use kiln_ir::ir::{Block, Module, OpId, Region, ValueId, NODE_NAME_ATTR};
use kiln_ir::{Tensor, TensorType};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A leaf of the e-graph language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Leaf {
    /// Function input `i`.
    Input(u32),
    /// Constant `i` of [`GraphAnalysis::consts`].
    Const(u32),
    /// Attributes (and regions) `i` of [`GraphAnalysis::infos`].
    Attrs(u32),
    /// A result index, for `kiln.get`.
    Index(u32),
    /// An omitted optional operand.
    Absent,
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Input(i) => write!(f, "in{i}"),
            Leaf::Const(i) => write!(f, "c{i}"),
            Leaf::Attrs(i) => write!(f, "a{i}"),
            Leaf::Index(i) => write!(f, "i{i}"),
            Leaf::Absent => write!(f, "absent"),
        }
    }
}

impl FromStr for Leaf {
    type Err = String;

    fn from_str(s: &str) -> Result<Leaf, String> {
        let num = |p: &str| s.strip_prefix(p).filter(|r| !r.is_empty()).and_then(|r| r.parse::<u32>().ok());
        if s == "absent" {
            Ok(Leaf::Absent)
        } else if let Some(i) = num("in") {
            Ok(Leaf::Input(i))
        } else if let Some(i) = num("c") {
            Ok(Leaf::Const(i))
        } else if let Some(i) = num("a") {
            Ok(Leaf::Attrs(i))
        } else if let Some(i) = num("i") {
            Ok(Leaf::Index(i))
        } else {
            Err(format!("'{s}' is not a leaf"))
        }
    }
}

define_language! {
    /// The graph dialect as an egg language.
    pub enum Node {
        Leaf(Leaf),
        Op(Symbol, Vec<Id>),
    }
}

/// The projection op of multi-result ops.
pub const GET: &str = "kiln.get";

/// What an attributes leaf stands for: everything of an op but its operands.
#[derive(Clone, Debug)]
pub struct OpInfo {
    pub attrs: Attrs,
    pub regions: Vec<Region>,
    pub n_operands: usize,
    /// Outer values the regions capture (ids of the source module), in child order.
    pub captured: Vec<ValueId>,
}

/// Names to give the class a node is added to (conversion keeps the source names; rules
/// inherit the name of the class they rewrite).
#[derive(Clone, Debug, Default)]
struct Pending {
    types: Option<Vec<TensorType>>,
    node_name: Option<String>,
    value_name: Option<String>,
}

/// The e-class analysis: types, constants and names.
#[derive(Debug)]
pub struct GraphAnalysis {
    pub infos: Vec<OpInfo>,
    info_index: HashMap<String, u32>,
    pub consts: Vec<Arc<Tensor>>,
    pub input_types: Vec<TensorType>,
    pub opset: i64,
    /// Largest result (elements) that a new node is constant-folded into.
    pub fold_limit: u64,
    pending: Option<Pending>,
    next_dim: u32,
    /// Small constants rules built, by content.
    const_index: HashMap<(kiln_ir::DType, Vec<usize>, Vec<u8>), u32>,
    /// Constants that [`rules::MATMUL_MERGE`] built (never merged again).
    pub merged_weights: HashSet<u32>,
    /// Rule applications done: (rule, canonical classes of the root and the bindings).
    pub applied: HashSet<(&'static str, Vec<Id>)>,
    /// Weight sets [`rules::MATMUL_MERGE`] already merged.
    pub merges_done: HashSet<Vec<u32>>,
}

impl GraphAnalysis {
    pub fn new(input_types: Vec<TensorType>, opset: i64) -> GraphAnalysis {
        GraphAnalysis {
            infos: Vec::new(),
            info_index: HashMap::new(),
            consts: Vec::new(),
            input_types,
            opset,
            fold_limit: 1 << 22,
            pending: None,
            next_dim: 1 << 20,
            const_index: HashMap::new(),
            merged_weights: HashSet::new(),
            applied: HashSet::new(),
            merges_done: HashSet::new(),
        }
    }

    /// Interns an op's attributes; ops with regions or random results are never shared.
    pub fn intern(&mut self, op_type: &str, info: OpInfo) -> u32 {
        let unique = !info.regions.is_empty() || is_nondeterministic(op_type);
        let key = (!unique).then(|| format!("{op_type}|{}|{:?}", info.n_operands, info.attrs));
        if let Some(k) = key.as_ref().and_then(|k| self.info_index.get(k)) {
            return *k;
        }
        let id = self.infos.len() as u32;
        self.infos.push(info);
        if let Some(k) = key {
            self.info_index.insert(k, id);
        }
        id
    }
}

/// Ops whose results differ from run to run: never merged, never folded.
fn is_nondeterministic(op_type: &str) -> bool {
    op_type.starts_with("Random") || matches!(op_type, "Bernoulli" | "Multinomial")
}

/// Per-class facts.
#[derive(Clone, Debug, Default)]
pub struct Data {
    /// Result types: one per result; empty for attribute/index/absent leaves.
    pub types: Vec<TensorType>,
    /// The class's value when known at compile time.
    pub konst: Option<Arc<Tensor>>,
    /// For attribute/index/absent classes, the leaf.
    pub leaf: Option<Leaf>,
    /// False when a rule built a node whose shape rule fails (the extractor never picks it).
    pub valid: bool,
    pub node_name: Option<String>,
    pub value_name: Option<String>,
}

pub type Graph = EGraph<Node, GraphAnalysis>;

impl Analysis<Node> for GraphAnalysis {
    type Data = Data;

    fn make(eg: &mut Graph, n: &Node) -> Data {
        let pending = eg.analysis.pending.take().unwrap_or_default();
        let mut d =
            Data { node_name: pending.node_name, value_name: pending.value_name, valid: true, ..Data::default() };
        match n {
            Node::Leaf(l @ (Leaf::Attrs(_) | Leaf::Index(_) | Leaf::Absent)) => d.leaf = Some(*l),
            Node::Leaf(Leaf::Input(i)) => d.types = vec![eg.analysis.input_types[*i as usize].clone()],
            Node::Leaf(Leaf::Const(i)) => {
                let t = eg.analysis.consts[*i as usize].clone();
                d.types = vec![TensorType::known(t.dtype(), &t.shape)];
                d.konst = Some(t);
            }
            Node::Op(sym, ch) => {
                if let Some(types) = pending.types {
                    d.types = types;
                } else {
                    match infer_node(eg, sym.as_str(), ch) {
                        Some((types, konst)) => {
                            d.types = types;
                            d.konst = konst;
                        }
                        None => d.valid = false,
                    }
                }
            }
        }
        d
    }

    fn merge(&mut self, to: &mut Data, from: Data) -> DidMerge {
        let (mut a, mut b) = (false, false);
        if !to.valid && from.valid {
            to.valid = true;
            to.types = from.types;
            a = true;
        } else if to.valid && !from.valid {
            b = true;
        }
        macro_rules! take {
            ($f:ident) => {
                match (to.$f.is_some(), from.$f.is_some()) {
                    (false, true) => {
                        to.$f = from.$f;
                        a = true;
                    }
                    (true, false) => b = true,
                    _ => {}
                }
            };
        }
        take!(konst);
        take!(leaf);
        take!(node_name);
        take!(value_name);
        DidMerge(a, b)
    }

    fn modify(eg: &mut Graph, id: Id) {
        let Some(t) = eg[id].data.konst.clone() else { return };
        if eg[id].nodes.iter().any(|n| matches!(n, Node::Leaf(Leaf::Const(_)))) {
            return;
        }
        let k = eg.analysis.consts.len() as u32;
        eg.analysis.consts.push(t);
        let c = eg.add(Node::Leaf(Leaf::Const(k)));
        eg.union(id, c);
    }
}

/// Result types (and value, when every operand is constant) of a node a rule built.
fn infer_node(eg: &mut Graph, sym: &str, ch: &[Id]) -> Option<(Vec<TensorType>, Option<Arc<Tensor>>)> {
    if sym == GET {
        let Some(Leaf::Index(i)) = eg[ch[0]].data.leaf else { return None };
        let d = &eg[ch[1]].data;
        return Some((vec![d.types.get(i as usize)?.clone()], None));
    }
    let def = lookup(sym)?;
    let Some(Leaf::Attrs(k)) = eg[*ch.first()?].data.leaf else { return None };
    let info = eg.analysis.infos[k as usize].clone();
    let operands = &ch[1..1 + info.n_operands];
    let mut inputs = Vec::with_capacity(operands.len());
    let mut consts = Vec::with_capacity(operands.len());
    for &c in operands {
        let d = &eg[c].data;
        if d.leaf == Some(Leaf::Absent) {
            inputs.push(None);
            consts.push(None);
        } else {
            if !d.valid || d.types.len() != 1 {
                return None;
            }
            inputs.push(Some(d.types[0].clone()));
            consts.push(d.konst.clone());
        }
    }
    let const_refs: Vec<Option<&Tensor>> = consts.iter().map(|c| c.as_deref()).collect();
    let mut next = eg.analysis.next_dim;
    let opset = eg.analysis.opset;
    let mut types = {
        let mut cx = InferCx::new(&info.attrs, &inputs, &const_refs, 1, opset, &info.regions, &mut next);
        def.infer(&mut cx).ok()?
    };
    // Rules build single-result ops; shape rules also list optional outputs.
    types.truncate(1);
    eg.analysis.next_dim = next;
    let foldable = types.len() == 1
        && info.regions.is_empty()
        && !is_nondeterministic(sym)
        && operands.iter().zip(&consts).all(|(&c, k)| k.is_some() || eg[c].data.leaf == Some(Leaf::Absent))
        && types[0].static_shape().is_some_and(|s| (s.iter().product::<usize>() as u64) <= eg.analysis.fold_limit);
    let konst = if foldable {
        let cx = EvalCx {
            attrs: kiln_ir::graph::AttrView(&info.attrs),
            num_outputs: 1,
            opset,
            regions: &info.regions,
            runner: &NoRegions,
        };
        def.eval(&cx, &const_refs).ok().and_then(|mut v| (v.len() == 1).then(|| Arc::new(v.remove(0))))
    } else {
        None
    };
    Some((types, konst))
}

/// Adds a node, naming its class as `pending` says (when the node is new).
fn add_named(eg: &mut Graph, n: Node, pending: Pending) -> Id {
    eg.analysis.pending = Some(pending);
    let id = eg.add(n);
    eg.analysis.pending = None;
    id
}

/// Adds an op built by a rule: `operands` (`None`: omitted) with `attrs`; its types come from
/// the op's shape rule.
pub fn add_op(eg: &mut Graph, op_type: &str, operands: &[Option<Id>], attrs: Attrs) -> Id {
    let info = OpInfo { attrs, regions: vec![], n_operands: operands.len(), captured: vec![] };
    let k = eg.analysis.intern(op_type, info);
    let a = eg.add(Node::Leaf(Leaf::Attrs(k)));
    let mut ch = vec![a];
    for o in operands {
        ch.push(match o {
            Some(id) => *id,
            None => eg.add(Node::Leaf(Leaf::Absent)),
        });
    }
    eg.add(Node::Op(Symbol::from(op_type), ch))
}

/// Adds a constant. Small constants that rules build are shared: building the same one twice
/// gives the same class, so re-applying a rule adds nothing.
pub fn add_const(eg: &mut Graph, t: Tensor) -> Id {
    let key = (t.len() <= 1 << 16 && t.dtype() != kiln_ir::DType::String)
        .then(|| (t.dtype(), t.shape.clone(), t.data.to_le_bytes()));
    if let Some(&k) = key.as_ref().and_then(|k| eg.analysis.const_index.get(k)) {
        return eg.add(Node::Leaf(Leaf::Const(k)));
    }
    let k = eg.analysis.consts.len() as u32;
    eg.analysis.consts.push(Arc::new(t));
    if let Some(key) = key {
        eg.analysis.const_index.insert(key, k);
    }
    eg.add(Node::Leaf(Leaf::Const(k)))
}

/// The e-graph of a module and the classes of its outputs.
pub struct Converted {
    pub egraph: Graph,
    pub roots: Vec<Id>,
}

/// Outer values the regions of an op read (defined neither in them nor as their arguments).
pub fn captured_values(m: &Module, regions: &[Region]) -> Vec<ValueId> {
    let mut defined = HashSet::new();
    let mut used = Vec::new();
    fn walk(m: &Module, b: &Block, defined: &mut HashSet<ValueId>, used: &mut Vec<ValueId>) {
        defined.extend(b.args.iter().copied());
        for &o in &b.ops {
            let op = m.op(o);
            used.extend(op.operands.iter().flatten().copied());
            for r in &op.regions {
                for inner in &r.blocks {
                    walk(m, inner, defined, used);
                }
            }
            defined.extend(op.results.iter().copied());
        }
        used.extend(b.yields.iter().copied());
    }
    for r in regions {
        for b in &r.blocks {
            walk(m, b, &mut defined, &mut used);
        }
    }
    let mut out: Vec<ValueId> = used.into_iter().filter(|v| !defined.contains(v)).collect();
    out.sort();
    out.dedup();
    out
}

/// Builds the e-graph of `m`'s body (constants are copied into it).
pub fn to_egraph(m: &Module) -> Result<Converted, String> {
    convert(m, &mut |_, t| t.clone())
}

/// Builds the e-graph of `m`'s body; `constant(op, value)` hands over each constant's value.
fn convert(m: &Module, constant: &mut dyn FnMut(OpId, &Tensor) -> Tensor) -> Result<Converted, String> {
    let input_types = m.inputs().iter().map(|&v| m.value(v).ty.clone()).collect();
    let mut eg = Graph::new(GraphAnalysis::new(input_types, kiln_ir::interp::module_opset(m)));
    let mut class: HashMap<ValueId, Id> = HashMap::new();
    for (i, &v) in m.inputs().iter().enumerate() {
        let p = Pending { value_name: m.value(v).name.clone(), ..Pending::default() };
        class.insert(v, add_named(&mut eg, Node::Leaf(Leaf::Input(i as u32)), p));
    }
    let absent = eg.add(Node::Leaf(Leaf::Absent));
    for &o in &m.body.ops {
        let op = m.op(o);
        let Some(op_type) = op.name.strip_prefix("graph.") else {
            return Err(format!("op {} is not of the graph dialect", op.name));
        };
        let node_name = Some(op.node_name().to_string()).filter(|s| !s.is_empty());
        if op_type == "Constant" && op.results.len() == 1 {
            if let Some(Attr::Tensor(t)) = op.attrs.get("value") {
                let k = eg.analysis.consts.len() as u32;
                eg.analysis.consts.push(Arc::new(constant(o, t)));
                let r = op.results[0];
                let p = Pending { node_name, value_name: m.value(r).name.clone(), types: None };
                class.insert(r, add_named(&mut eg, Node::Leaf(Leaf::Const(k)), p));
                continue;
            }
        }
        let mut attrs = op.attrs.clone();
        attrs.remove(NODE_NAME_ATTR);
        let captured = captured_values(m, &op.regions);
        let info = OpInfo { attrs, regions: op.regions.clone(), n_operands: op.operands.len(), captured };
        let children_vals: Vec<Option<ValueId>> =
            op.operands.iter().copied().chain(info.captured.iter().map(|&v| Some(v))).collect();
        let k = eg.analysis.intern(op_type, info);
        let mut ch = vec![eg.add(Node::Leaf(Leaf::Attrs(k)))];
        for v in children_vals {
            ch.push(match v {
                None => absent,
                Some(v) => *class.get(&v).ok_or_else(|| format!("value {} is used before it is defined", v.0))?,
            });
        }
        let types: Vec<TensorType> = op.results.iter().map(|&r| m.value(r).ty.clone()).collect();
        let node = Node::Op(Symbol::from(op_type), ch);
        if op.results.len() == 1 {
            let r = op.results[0];
            let p = Pending { types: Some(types), node_name, value_name: m.value(r).name.clone() };
            class.insert(r, add_named(&mut eg, node, p));
        } else {
            let tuple = add_named(&mut eg, node, Pending { types: Some(types.clone()), node_name, value_name: None });
            for (i, &r) in op.results.iter().enumerate() {
                let idx = eg.add(Node::Leaf(Leaf::Index(i as u32)));
                let p = Pending {
                    types: Some(vec![types[i].clone()]),
                    node_name: None,
                    value_name: m.value(r).name.clone(),
                };
                class.insert(r, add_named(&mut eg, Node::Op(Symbol::from(GET), vec![idx, tuple]), p));
            }
        }
    }
    let roots = m
        .outputs()
        .iter()
        .map(|v| class.get(v).copied().ok_or_else(|| format!("output {} is not defined", m.value_label(*v))))
        .collect::<Result<Vec<_>, _>>()?;
    eg.rebuild();
    Ok(Converted { egraph: eg, roots })
}

/// The cost of running `n` (in class `c`) as its own kernel, in seconds; leaves, projections
/// and views are free. `None`: never pick it.
pub fn node_cost(eg: &Graph, cost: &CostModel, c: Id, n: &Node) -> Option<f64> {
    let d = &eg[c].data;
    if !d.valid {
        return None;
    }
    let Node::Op(sym, ch) = n else { return Some(0.0) };
    let sym = sym.as_str();
    if sym == GET {
        return Some(0.0);
    }
    if ch.iter().any(|&x| !eg[x].data.valid) {
        return None;
    }
    // Views, and index maps (Transpose, Slice, Expand, Concat) that the kernels reading them
    // absorb (see crate::fusion), are free; but not nothing: of two equal plans, the one with
    // fewer ops wins.
    if is_view(sym) || crate::fusion::is_index_map(sym) {
        return Some(1e-12);
    }
    let Some(Leaf::Attrs(k)) = eg[ch[0]].data.leaf else { return None };
    let info = &eg.analysis.infos[k as usize];
    let operands = &ch[1..1 + info.n_operands];
    let inputs: Vec<Option<&TensorType>> = operands.iter().map(|&x| eg[x].data.types.first()).collect();
    let outputs: Vec<&TensorType> = d.types.iter().collect();
    let bytes = inputs.iter().flatten().map(|t| cost.bytes(t)).sum::<u64>()
        + outputs.iter().map(|t| cost.bytes(t)).sum::<u64>();
    let flops = cost.flops(sym, &info.attrs, &inputs, &outputs);
    let matrix = if crate::cost::is_contraction(sym) { flops } else { 0.0 };
    Some(cost.seconds(&KernelWork { bytes, flops, matrix_flops: matrix, spill_bytes: 0 }))
}

/// Picks one node per class reachable from `roots`, minimizing the summed cost of the chosen
/// DAG (each class counted once, however many users it has), greedily bottom-up to a fixpoint.
/// Ties go to the earlier node, so the choice is deterministic.
pub fn extract(eg: &Graph, cost: &CostModel, roots: &[Id]) -> Result<HashMap<Id, Node>, String> {
    struct Best {
        total: f64,
        set: Arc<BTreeMap<Id, f64>>,
        node: usize,
    }
    let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
    ids.sort();
    let costs: HashMap<Id, Vec<Option<f64>>> =
        ids.iter().map(|&c| (c, eg[c].nodes.iter().map(|n| node_cost(eg, cost, c, n)).collect())).collect();
    let mut best: HashMap<Id, Best> = HashMap::new();
    let mut changed = true;
    let mut rounds = 0;
    while changed {
        changed = false;
        rounds += 1;
        if rounds > 10_000 {
            return Err("extraction did not converge".into());
        }
        for &c in &ids {
            for (i, n) in eg[c].nodes.iter().enumerate() {
                let Some(own) = costs[&c][i] else { continue };
                let kids: Vec<Id> = n.children().iter().map(|&k| eg.find(k)).collect();
                if kids.iter().any(|k| *k == c || !best.contains_key(k)) {
                    continue;
                }
                let lower = own + kids.iter().map(|k| best[k].total).fold(0.0, f64::max);
                if best.get(&c).is_some_and(|b| b.total <= lower) {
                    continue;
                }
                let mut set: BTreeMap<Id, f64> = match kids.iter().max_by_key(|k| best[k].set.len()) {
                    Some(k) => (*best[k].set).clone(),
                    None => BTreeMap::new(),
                };
                for k in &kids {
                    for (&x, &v) in best[k].set.iter() {
                        set.insert(x, v);
                    }
                }
                if set.contains_key(&c) {
                    continue;
                }
                set.insert(c, own);
                let total: f64 = set.values().sum();
                let better = match best.get(&c) {
                    None => true,
                    Some(b) => total < b.total * (1.0 - 1e-9) - 1e-18,
                };
                if better {
                    best.insert(c, Best { total, set: Arc::new(set), node: i });
                    changed = true;
                }
            }
        }
    }
    let mut pick: HashMap<Id, usize> = best.iter().map(|(&c, b)| (c, b.node)).collect();
    let roots: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    for r in &roots {
        if !pick.contains_key(r) {
            return Err(format!("no valid plan for e-class {r}"));
        }
    }
    share_subterms(eg, &costs, &roots, &mut pick);
    let mut choice = HashMap::new();
    for c in reachable(eg, &roots, &pick).unwrap_or_default() {
        choice.insert(c, eg[c].nodes[pick[&c]].clone());
    }
    Ok(choice)
}

/// Classes reachable from `roots` through the picked nodes, or `None` on a cycle.
fn reachable(eg: &Graph, roots: &[Id], pick: &HashMap<Id, usize>) -> Option<Vec<Id>> {
    // 0: unseen, 1: on the stack, 2: done.
    let mut state: HashMap<Id, u8> = HashMap::new();
    let mut out = Vec::new();
    for &r in roots {
        let mut stack: Vec<(Id, bool)> = vec![(r, false)];
        while let Some((c, leaving)) = stack.pop() {
            if leaving {
                state.insert(c, 2);
                out.push(c);
                continue;
            }
            match state.get(&c) {
                Some(2) => continue,
                Some(1) => return None,
                _ => {}
            }
            state.insert(c, 1);
            stack.push((c, true));
            let n = &eg[c].nodes[*pick.get(&c)?];
            for &k in n.children() {
                let k = eg.find(k);
                match state.get(&k) {
                    Some(2) => {}
                    Some(1) => return None,
                    _ => stack.push((k, false)),
                }
            }
        }
    }
    Some(out)
}

/// Total cost of the picked DAG, `None` when it has a cycle or an unpriced node.
fn dag_cost(eg: &Graph, costs: &HashMap<Id, Vec<Option<f64>>>, roots: &[Id], pick: &HashMap<Id, usize>) -> Option<f64> {
    reachable(eg, roots, pick)?.iter().map(|c| costs[c][pick[c]]).sum()
}

/// Greedy extraction prices each class alone, so an alternative that several classes could
/// share (one MatMul over concatenated Q, K, V weights, sliced three ways) never wins it:
/// alone, each pays for the whole shared node. This pass tries switching, together, every
/// picked class that has an alternative reading the same unpicked class, and keeps the switch
/// when the whole DAG gets cheaper.
fn share_subterms(eg: &Graph, costs: &HashMap<Id, Vec<Option<f64>>>, roots: &[Id], pick: &mut HashMap<Id, usize>) {
    let Some(mut current) = dag_cost(eg, costs, roots, pick) else { return };
    for _round in 0..4 {
        let live: HashSet<Id> = reachable(eg, roots, pick).unwrap_or_default().into_iter().collect();
        // Unpicked class → (picked class, its alternative node reading it).
        let mut sharers: BTreeMap<Id, Vec<(Id, usize)>> = BTreeMap::new();
        let mut ids: Vec<Id> = live.iter().copied().collect();
        ids.sort();
        for &c in &ids {
            for (i, n) in eg[c].nodes.iter().enumerate() {
                if i == pick[&c] || costs[&c][i].is_none() {
                    continue;
                }
                for &k in n.children() {
                    let k = eg.find(k);
                    if !live.contains(&k) && pick.contains_key(&k) {
                        let e = sharers.entry(k).or_default();
                        if !e.iter().any(|&(x, _)| x == c) {
                            e.push((c, i));
                        }
                    }
                }
            }
        }
        let mut improved = false;
        for (_, users) in sharers.into_iter().filter(|(_, u)| u.len() >= 2) {
            let mut trial = pick.clone();
            for &(c, i) in &users {
                trial.insert(c, i);
            }
            if let Some(t) = dag_cost(eg, costs, roots, &trial) {
                if t < current * (1.0 - 1e-9) {
                    *pick = trial;
                    current = t;
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
}

/// Rebuilds a module from the chosen nodes: `src` gives the name, attributes, signature and the
/// region bodies of region ops; values get their classes' names, ops their classes' node names.
pub fn to_module(src: &Module, eg: &Graph, choice: &HashMap<Id, Node>, roots: &[Id]) -> Result<Module, String> {
    build_module(src, eg, choice, roots, &mut |k| (*eg.analysis.consts[k as usize]).clone())
}

/// [`to_module`], taking each constant's value from `constant(index)`.
fn build_module(
    src: &Module,
    eg: &Graph,
    choice: &HashMap<Id, Node>,
    roots: &[Id],
    constant: &mut dyn FnMut(u32) -> Tensor,
) -> Result<Module, String> {
    let mut m = Module::new(&src.name);
    m.attrs = src.attrs.clone();
    for &v in src.inputs() {
        let vd = src.value(v);
        let a = m.add_arg(vd.ty.clone(), vd.name.clone());
        m.body.args.push(a);
    }
    let mut done: HashMap<Id, Vec<ValueId>> = HashMap::new();
    // Iterative post-order: deep chains must not overflow the stack.
    let mut stack: Vec<(Id, bool)> = roots.iter().rev().map(|&r| (eg.find(r), false)).collect();
    while let Some((c, expanded)) = stack.pop() {
        if done.contains_key(&c) {
            continue;
        }
        let n = choice.get(&c).ok_or_else(|| format!("e-class {c} has no chosen node"))?;
        if !expanded {
            stack.push((c, true));
            for &k in n.children().iter().rev() {
                let k = eg.find(k);
                if !done.contains_key(&k) {
                    stack.push((k, false));
                }
            }
            continue;
        }
        let d = &eg[c].data;
        let vals = match n {
            Node::Leaf(Leaf::Input(i)) => vec![m.body.args[*i as usize]],
            Node::Leaf(Leaf::Const(k)) => {
                let t = constant(*k);
                let mut attrs = Attrs::new();
                attrs.insert("value".into(), Attr::Tensor(t));
                if let Some(n) = &d.node_name {
                    attrs.insert(NODE_NAME_ATTR.into(), Attr::Str(n.clone()));
                }
                let ty = d.types[0].clone();
                let o = m.push_op("graph.Constant", vec![], vec![ty], attrs);
                m.op(o).results.clone()
            }
            Node::Leaf(_) => vec![],
            Node::Op(sym, ch) if sym.as_str() == GET => {
                let Some(Leaf::Index(i)) = eg[ch[0]].data.leaf else { return Err("malformed projection".into()) };
                let tuple = &done[&eg.find(ch[1])];
                vec![*tuple.get(i as usize).ok_or("projection out of range")?]
            }
            Node::Op(sym, ch) => {
                let Some(Leaf::Attrs(k)) = eg[ch[0]].data.leaf else { return Err("malformed op node".into()) };
                let info = &eg.analysis.infos[k as usize];
                let mut operands = Vec::with_capacity(info.n_operands);
                for &x in &ch[1..1 + info.n_operands] {
                    let x = eg.find(x);
                    operands.push(if eg[x].data.leaf == Some(Leaf::Absent) { None } else { Some(done[&x][0]) });
                }
                let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
                for (&old, &x) in info.captured.iter().zip(&ch[1 + info.n_operands..]) {
                    remap.insert(old, done[&eg.find(x)][0]);
                }
                let regions: Vec<Region> =
                    info.regions.iter().map(|r| copy_region(src, &mut m, r, &mut remap)).collect();
                let mut attrs = info.attrs.clone();
                if let Some(n) = &d.node_name {
                    attrs.insert(NODE_NAME_ATTR.into(), Attr::Str(n.clone()));
                }
                let o = m.create_op(&format!("graph.{sym}"), operands, d.types.clone(), attrs, regions);
                m.body.ops.push(o);
                m.op(o).results.clone()
            }
        };
        if vals.len() == 1 && d.value_name.is_some() && m.value(vals[0]).name.is_none() {
            m.value_mut(vals[0]).name = d.value_name.clone();
        }
        done.insert(c, vals);
    }
    // Outputs keep their names and positions: a value that is already another output, or is
    // named otherwise, is yielded through an Identity.
    for (&r, &old) in roots.iter().zip(src.outputs()) {
        let mut v = done[&eg.find(r)][0];
        let want = src.value(old).name.clone();
        let again = m.body.yields.contains(&v);
        if again || m.value(v).name != want {
            if !again && m.value(v).name.is_none() && !m.body.args.contains(&v) {
                m.value_mut(v).name = want;
            } else {
                let ty = m.value(v).ty.clone();
                let o = m.push_op("graph.Identity", vec![Some(v)], vec![ty], Attrs::new());
                v = m.op(o).results[0];
                m.value_mut(v).name = want;
            }
        }
        m.body.yields.push(v);
    }
    Ok(m)
}

/// Copies a region of `src` into `m`, mapping captured outer values through `remap`.
fn copy_region(src: &Module, m: &mut Module, r: &Region, remap: &mut HashMap<ValueId, ValueId>) -> Region {
    Region { blocks: r.blocks.iter().map(|b| copy_block(src, m, b, remap)).collect() }
}

fn copy_block(src: &Module, m: &mut Module, b: &Block, remap: &mut HashMap<ValueId, ValueId>) -> Block {
    let mut out = Block::default();
    for &a in &b.args {
        let vd = src.value(a);
        let na = m.add_arg(vd.ty.clone(), vd.name.clone());
        remap.insert(a, na);
        out.args.push(na);
    }
    for &o in &b.ops {
        let op = src.op(o).clone();
        let regions: Vec<Region> = op.regions.iter().map(|r| copy_region(src, m, r, remap)).collect();
        let operands = op.operands.iter().map(|v| v.map(|v| remap.get(&v).copied().unwrap_or(v))).collect();
        let types = op.results.iter().map(|&r| src.value(r).ty.clone()).collect();
        let no = m.create_op(&op.name, operands, types, op.attrs.clone(), regions);
        for (&old, &new) in op.results.iter().zip(&m.op(no).results.clone()) {
            m.value_mut(new).name = src.value(old).name.clone();
            remap.insert(old, new);
        }
        out.ops.push(no);
    }
    out.yields = b.yields.iter().map(|v| remap.get(v).copied().unwrap_or(*v)).collect();
    out
}

/// Bounds on saturation. Iterations and nodes decide the plan; the time bound is a safety net
/// far above what real models take (ResNet-50 saturates in well under a second), so plans stay
/// deterministic: when it does fire, the stop reason says so (`kiln inspect`: `egraph_stop`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub seconds: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { iterations: 12, nodes: 100_000, seconds: 30 }
    }
}

/// What saturation did.
#[derive(Clone, Debug, Default)]
pub struct SaturationStats {
    pub iterations: usize,
    pub nodes: usize,
    pub classes: usize,
    pub stop_reason: String,
    /// Rules that applied at least once, with how often.
    pub applied: BTreeMap<String, usize>,
}

/// Runs the rules on the e-graph of `m`, extracts the cheapest plan under `cost`, and returns
/// the rewritten module.
pub fn saturate(
    m: &Module,
    rules: &[egg::Rewrite<Node, GraphAnalysis>],
    cost: &CostModel,
    limits: Limits,
) -> Result<(Module, SaturationStats), String> {
    saturate_owned(m.clone(), rules, cost, limits)
}

/// [`saturate`] consuming the module: constants move into the e-graph and out again into the
/// result instead of being copied (weights are most of a model's bytes).
pub fn saturate_owned(
    mut m: Module,
    rules: &[egg::Rewrite<Node, GraphAnalysis>],
    cost: &CostModel,
    limits: Limits,
) -> Result<(Module, SaturationStats), String> {
    let mut taken: HashMap<OpId, Tensor> = HashMap::new();
    for o in m.body.ops.clone() {
        let op = m.op_mut(o);
        if op.name == "graph.Constant" && op.results.len() == 1 {
            if let Some(Attr::Tensor(t)) = op.attrs.get_mut("value") {
                let empty = Tensor::zeros(t.dtype(), &[0]);
                taken.insert(o, std::mem::replace(t, empty));
            }
        }
    }
    let Converted { egraph, roots } = convert(&m, &mut |o, t| taken.remove(&o).unwrap_or_else(|| t.clone()))?;
    let runner = egg::Runner::<Node, GraphAnalysis, ()>::new(GraphAnalysis::new(vec![], 0))
        .with_egraph(egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(std::time::Duration::from_secs(limits.seconds))
        .run(rules);
    let mut stats = SaturationStats {
        iterations: runner.iterations.len(),
        nodes: runner.egraph.total_number_of_nodes(),
        classes: runner.egraph.number_of_classes(),
        stop_reason: runner.stop_reason.as_ref().map_or_else(|| "none".into(), |r| format!("{r:?}")),
        applied: BTreeMap::new(),
    };
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *stats.applied.entry(name.to_string()).or_insert(0) += n;
        }
    }
    let choice = extract(&runner.egraph, cost, &roots)?;
    // Drop the analysis' references so each constant is handed over, not copied.
    let mut eg = runner.egraph;
    for c in eg.classes_mut() {
        c.data.konst = None;
    }
    let mut consts: Vec<Option<Arc<Tensor>>> = std::mem::take(&mut eg.analysis.consts).into_iter().map(Some).collect();
    let out = build_module(&m, &eg, &choice, &roots, &mut |k| match consts[k as usize].take() {
        Some(a) => Arc::try_unwrap(a).unwrap_or_else(|a| (*a).clone()),
        None => Tensor::zeros(kiln_ir::DType::F32, &[0]),
    })?;
    Ok((out, stats))
}

#[cfg(test)]
pub(crate) mod tests;
