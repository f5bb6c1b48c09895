//! Fusion: partitions a graph into kernels and wraps each kernel of several ops in a
//! `graph.fused` op whose region holds them (later lowering turns each into one loop nest).
//!
//! Ops are classed ([`OpClass`]) as views (free reinterpretations), layout ops (index maps:
//! Transpose, Slice, Expand), injective ops (elementwise), reductions, contractions
//! (MatMul, Gemm, Conv, Attention) and opaque ops. A kernel holds at most one anchor (a
//! reduction or a contraction). The partition is built by named fusion rules, in order:
//!
//! 1. [`LAYOUT_DUPLICATE`]: a layout op or view with several users is copied per user (an
//!    index map costs nothing to recompute), so each can be absorbed where it is read.
//! 2. [`LAYOUT_PROLOGUE`]: layout ops and views are absorbed into their user as index maps.
//! 3. [`EPILOGUE`]: a kernel without an anchor (an elementwise chain) joins the kernel that
//!    produces its input: elementwise chains become one kernel; bias, activation, residual
//!    and scale fuse into a MatMul/Conv/Attention or a reduction.
//! 4. [`REDUCTION_PROLOGUE`]: an elementwise kernel feeding a reduction joins it (the
//!    reduction computes it on the fly).
//! 5. [`ATTENTION_CHAIN`]: `MatMul (+ scale, mask) → Softmax → MatMul` that the e-graph did
//!    not recognize as `Attention` (a mask or bias computed at run time, say) becomes one
//!    kernel all the same: the scores never leave fast memory (online softmax).
//! 6. [`LAYOUT_EPILOGUE`]: a layout op left alone (its user is opaque or a model output) joins
//!    its producer.
//!
//! Every merge must keep the graph acyclic and must not make the kernel dearer under the
//! target's [`CostModel`] (a working set beyond the fast memory level spills).

use crate::cost::{is_contraction, is_view, CostModel, KernelWork};
use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::graph::registry;
use kiln_ir::ir::{Block, Module, OpId, Region, ValueId, NODE_NAME_ATTR};
use kiln_ir::Dim;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

/// The fusion rules, by name (the order they run in).
pub const RULES: [&str; 6] =
    ["layout-duplicate", "layout-prologue", "epilogue", "reduction-prologue", "attention-chain", "layout-epilogue"];
pub const LAYOUT_DUPLICATE: &str = RULES[0];
pub const LAYOUT_PROLOGUE: &str = RULES[1];
pub const EPILOGUE: &str = RULES[2];
pub const REDUCTION_PROLOGUE: &str = RULES[3];
pub const ATTENTION_CHAIN: &str = RULES[4];
pub const LAYOUT_EPILOGUE: &str = RULES[5];

/// How an op takes part in fusion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Constant,
    /// Shape arithmetic on a few integers (`Shape`, and small integer ops on its results): the
    /// host computes it when it binds symbolic dims; no kernel.
    Host,
    View,
    Layout,
    Injective,
    Reduction,
    Contraction,
    Opaque,
}

impl OpClass {
    fn is_anchor(self) -> bool {
        matches!(self, OpClass::Reduction | OpClass::Contraction)
    }

    fn is_layout(self) -> bool {
        matches!(self, OpClass::View | OpClass::Layout)
    }
}

/// Ops that move elements without computing on them (a kernel reading through one applies
/// its index map): Transpose, Slice, Expand, and Concat (an index map with several sources).
pub fn is_index_map(op_type: &str) -> bool {
    matches!(op_type, "Transpose" | "Slice" | "Expand" | "Concat")
}

/// The fusion class of an op.
pub fn classify(m: &Module, o: OpId) -> OpClass {
    let op = m.op(o);
    let t = op.op_type();
    if op.dialect() != "graph" || !op.regions.is_empty() {
        return OpClass::Opaque;
    }
    if t == "Constant" {
        return OpClass::Constant;
    }
    let small_int = |v: &ValueId| {
        let ty = &m.value(*v).ty;
        ty.dtype.is_int() && ty.static_shape().is_some_and(|s| s.iter().product::<usize>() <= 64)
    };
    if matches!(t, "Shape" | "Size")
        || (op.results.iter().all(small_int) && op.operands.iter().flatten().all(small_int))
    {
        return OpClass::Host;
    }
    if op.results.len() != 1 {
        return OpClass::Opaque;
    }
    if is_view(t) {
        return OpClass::View;
    }
    if is_index_map(t) {
        // A layout op whose result size is computed at run time (a Slice to a length the host
        // computes: a symbol none of its operands has) stays a kernel of its own: fused into
        // a consumer, no buffer of that kernel would carry the size.
        let operand_syms: Vec<&Dim> = op
            .operands
            .iter()
            .flatten()
            .filter_map(|&v| m.value(v).ty.shape.as_ref())
            .flatten()
            .filter(|d| matches!(d, Dim::Sym(_)))
            .collect();
        let fresh = op
            .results
            .iter()
            .filter_map(|&r| m.value(r).ty.shape.as_ref())
            .flatten()
            .any(|d| matches!(d, Dim::Sym(_)) && !operand_syms.contains(&d));
        return if fresh { OpClass::Opaque } else { OpClass::Layout };
    }
    if is_contraction(t) {
        return OpClass::Contraction;
    }
    let training = matches!(op.attrs.get("training_mode"), Some(Attr::Int(v)) if *v != 0);
    if registry().family(t) == Some("elementwise") || (t == "BatchNormalization" && !training) {
        return OpClass::Injective;
    }
    let reduction = t.starts_with("Reduce")
        || matches!(
            t,
            "Softmax"
                | "LogSoftmax"
                | "Hardmax"
                | "LayerNormalization"
                | "RMSNormalization"
                | "GroupNormalization"
                | "InstanceNormalization"
                | "LpNormalization"
                | "ArgMax"
                | "ArgMin"
                | "MaxPool"
                | "AveragePool"
                | "LpPool"
                | "GlobalAveragePool"
                | "GlobalMaxPool"
                | "GlobalLpPool"
        );
    if reduction {
        OpClass::Reduction
    } else {
        OpClass::Opaque
    }
}

/// Whether top-level op `o` launches a kernel (constants, views and host shape arithmetic do
/// not).
pub fn launches_kernel(m: &Module, o: OpId) -> bool {
    !matches!(classify(m, o), OpClass::Constant | OpClass::View | OpClass::Host)
}

/// The figures of a plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanFigures {
    /// Kernels launched: top-level ops other than constants, views and host shape arithmetic.
    pub kernels: usize,
    /// Bytes the kernels read and write at the slowest memory level.
    pub bytes_moved: u64,
    /// Estimated seconds under the cost model.
    pub seconds: f64,
}

/// Figures of `m` as it stands: each top-level op is one kernel (a `graph.fused` op counts its
/// operands and results only). With `unfused`, views and host shape arithmetic count as kernels
/// too (the unfused baseline: every graph op its own kernel).
pub fn figures(m: &Module, cost: &CostModel, unfused: bool) -> PlanFigures {
    let mut f = PlanFigures::default();
    let users = users_of(m);
    for &o in &m.body.ops {
        let counts = if unfused { classify(m, o) != OpClass::Constant } else { launches_kernel(m, o) };
        if !counts {
            continue;
        }
        let w = kernel_work(m, &[o], cost, &users);
        f.kernels += 1;
        f.bytes_moved += w.bytes;
        f.seconds += cost.seconds(&w);
    }
    f
}

/// Work of a kernel made of `ops` (ops of a `graph.fused` region count through it).
fn kernel_work(m: &Module, ops: &[OpId], cost: &CostModel, users: &HashMap<ValueId, Vec<OpId>>) -> KernelWork {
    let inside: HashSet<OpId> = ops.iter().copied().collect();
    let mut flat = Vec::new();
    for &o in ops {
        flatten(m, o, &mut flat);
    }
    // Values made inside: results of the ops (and of the ops in their fused regions), and
    // fused regions' block arguments (their operands are counted instead).
    let mut produced: HashSet<ValueId> = HashSet::new();
    for &o in &flat {
        produced.extend(m.op(o).results.iter().copied());
        if m.op(o).name == "graph.fused" {
            for b in m.op(o).regions.iter().flat_map(|r| &r.blocks) {
                produced.extend(b.args.iter().copied());
            }
        }
    }
    let mut w = KernelWork::default();
    let mut inputs: BTreeSet<ValueId> = BTreeSet::new();
    let mut internal_bytes = 0u64;
    let mut row = 0u64;
    for &o in &flat {
        let op = m.op(o);
        let is_top = inside.contains(&o);
        for v in op.operands.iter().flatten() {
            if !produced.contains(v) || (is_top && op.name == "graph.fused" && !is_result_of(m, ops, *v)) {
                inputs.insert(*v);
            }
        }
        if op.name == "graph.fused" {
            continue;
        }
        let ins: Vec<Option<&kiln_ir::TensorType>> = op.operands.iter().map(|v| v.map(|v| &m.value(v).ty)).collect();
        let outs: Vec<&kiln_ir::TensorType> = op.results.iter().map(|&r| &m.value(r).ty).collect();
        if is_view(op.op_type()) {
            continue;
        }
        let f = cost.flops(op.op_type(), &op.attrs, &ins, &outs);
        w.flops += f;
        if is_contraction(op.op_type()) {
            w.matrix_flops += f;
        }
        internal_bytes += outs.iter().map(|t| cost.bytes(t)).sum::<u64>();
        if matches!(classify(m, o), OpClass::Reduction) {
            // One reduced row of the input per element of the output stays in fast memory.
            let t = ins.first().copied().flatten();
            let last = t.and_then(|t| t.shape.as_ref()?.last()?.known()).unwrap_or(1);
            row = row.max(last * t.map_or(4, |t| t.dtype.size_bytes() as u64));
        }
    }
    let outputs = kernel_outputs(m, ops, &inside, users);
    w.bytes = inputs.iter().chain(&outputs).map(|&v| cost.bytes(&m.value(v).ty)).sum();
    if flat.len() > 1 && row * flat.len() as u64 > cost.fast_capacity() {
        w.spill_bytes = internal_bytes;
    }
    w
}

/// `v` is a result of one of `ops`.
fn is_result_of(m: &Module, ops: &[OpId], v: ValueId) -> bool {
    ops.iter().any(|&o| m.op(o).results.contains(&v))
}

fn flatten(m: &Module, o: OpId, out: &mut Vec<OpId>) {
    out.push(o);
    if m.op(o).name == "graph.fused" {
        for r in &m.op(o).regions {
            for b in &r.blocks {
                for &i in &b.ops {
                    flatten(m, i, out);
                }
            }
        }
    }
}

/// Values made by `ops` that something outside them reads (or that are model outputs).
fn kernel_outputs(
    m: &Module,
    ops: &[OpId],
    inside: &HashSet<OpId>,
    users: &HashMap<ValueId, Vec<OpId>>,
) -> Vec<ValueId> {
    let mut out = Vec::new();
    for &o in ops {
        for &r in &m.op(o).results {
            out.push(r);
        }
    }
    out.retain(|v| m.outputs().contains(v) || users.get(v).is_some_and(|us| us.iter().any(|u| !inside.contains(u))));
    out
}

/// For every value, the top-level ops that read it (an op whose regions read it counts).
fn users_of(m: &Module) -> HashMap<ValueId, Vec<OpId>> {
    let mut users: HashMap<ValueId, Vec<OpId>> = HashMap::new();
    for &o in &m.body.ops {
        let mut seen = HashSet::new();
        visit_uses(m, o, &mut |v| {
            if seen.insert(v) {
                users.entry(v).or_default().push(o);
            }
        });
    }
    users
}

fn visit_uses(m: &Module, o: OpId, f: &mut dyn FnMut(ValueId)) {
    let op = m.op(o);
    for &v in op.operands.iter().flatten() {
        f(v);
    }
    for r in &op.regions {
        for b in &r.blocks {
            for &i in &b.ops {
                visit_uses(m, i, f);
            }
            for &y in &b.yields {
                f(y);
            }
        }
    }
}

/// What fusion did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FusionReport {
    /// Merges each rule made.
    pub merges: Vec<(&'static str, usize)>,
    /// Kernels after fusion, by the kind of their `graph.fused` op (or the op type).
    pub kernels: usize,
}

struct Partition<'m> {
    m: &'m Module,
    cost: &'m CostModel,
    order: Vec<OpId>,
    index: HashMap<OpId, usize>,
    class: Vec<OpClass>,
    /// Union-find parent of each op index.
    parent: Vec<usize>,
    /// Members of each group root. A group's root is its first member.
    members: HashMap<usize, Vec<usize>>,
    /// Last member of each group root.
    last: Vec<usize>,
    /// Fenwick tree of prefix maxima: for an op index `i`, the last member of any group whose
    /// first member is at or before `i` (see [`Partition::reach_limit`]).
    last_from: Vec<usize>,
    /// Producer op index of each value defined at top level.
    producer: HashMap<ValueId, usize>,
    users: Vec<Vec<usize>>,
    value_users: HashMap<ValueId, Vec<OpId>>,
    outputs: HashSet<ValueId>,
}

impl<'m> Partition<'m> {
    fn new(m: &'m Module, cost: &'m CostModel) -> Partition<'m> {
        let order = m.body.ops.clone();
        let index: HashMap<OpId, usize> = order.iter().enumerate().map(|(i, &o)| (o, i)).collect();
        let class: Vec<OpClass> = order.iter().map(|&o| classify(m, o)).collect();
        let mut producer = HashMap::new();
        for (i, &o) in order.iter().enumerate() {
            for &r in &m.op(o).results {
                producer.insert(r, i);
            }
        }
        let mut users = vec![Vec::new(); order.len()];
        let value_users = users_of(m);
        for (v, us) in &value_users {
            if let Some(&p) = producer.get(v) {
                let mut list: Vec<usize> = us.iter().map(|u| index[u]).collect();
                list.sort();
                list.dedup();
                users[p].extend(list);
            }
        }
        for u in &mut users {
            u.sort();
            u.dedup();
        }
        let parent = (0..order.len()).collect();
        let members = (0..order.len()).map(|i| (i, vec![i])).collect();
        let last = (0..order.len()).collect();
        // Every op is its own group: the prefix maximum at `i` is `i`.
        let mut last_from = vec![0; order.len()];
        for i in 0..order.len() {
            let mut k = i + 1;
            while k <= order.len() {
                last_from[k - 1] = last_from[k - 1].max(i);
                k += k & k.wrapping_neg();
            }
        }
        Partition {
            m,
            cost,
            order,
            index,
            class,
            parent,
            members,
            last,
            last_from,
            producer,
            users,
            value_users,
            outputs: m.outputs().iter().copied().collect(),
        }
    }

    fn find(&self, mut i: usize) -> usize {
        while self.parent[i] != i {
            i = self.parent[i];
        }
        i
    }

    fn fusible(&self, i: usize) -> bool {
        !matches!(self.class[i], OpClass::Constant | OpClass::Host | OpClass::Opaque)
    }

    fn anchors(&self, g: usize) -> usize {
        self.members[&g].iter().filter(|&&i| self.class[i].is_anchor()).count()
    }

    fn group_ops(&self, g: usize) -> Vec<OpId> {
        let mut v = self.members[&g].clone();
        v.sort();
        v.into_iter().map(|i| self.order[i]).collect()
    }

    fn seconds(&self, groups: &[usize]) -> f64 {
        let mut ops: Vec<OpId> = groups.iter().flat_map(|&g| self.group_ops(g)).collect();
        ops.sort_by_key(|o| self.index[o]);
        if ops.iter().all(|&o| is_view(self.m.op(o).op_type())) {
            return 0.0;
        }
        self.cost.seconds(&kernel_work(self.m, &ops, self.cost, &self.value_users))
    }

    /// Groups whose results group `g` reads.
    fn producer_groups(&self, g: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for &i in &self.members[&g] {
            for v in self.m.op(self.order[i]).operands.iter().flatten() {
                if let Some(&p) = self.producer.get(v) {
                    let pg = self.find(p);
                    if pg != g && self.fusible(p) && !out.contains(&pg) {
                        out.push(pg);
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Whether a path leaves the union of `groups`, passes a group outside it and comes back.
    /// The walk goes group by group, not op by op: once emitted, a group is one fused op that
    /// reads all its inputs before it writes any output, so a path may enter a group at one
    /// member and leave it at another that does not depend on the first.
    fn reenters(&self, groups: &[usize]) -> bool {
        let inside = |i: usize| groups.contains(&self.find(i));
        let limit = groups.iter().map(|&g| self.reach_limit(g)).max().unwrap_or(0);
        let mut seen = HashSet::new();
        let mut queue: VecDeque<usize> = VecDeque::new();
        for &i in groups.iter().flat_map(|g| self.members[g].iter()) {
            for &u in &self.users[i] {
                if u <= limit && !inside(u) && seen.insert(self.find(u)) {
                    queue.push_back(self.find(u));
                }
            }
        }
        while let Some(g) = queue.pop_front() {
            for &i in &self.members[&g] {
                for &u in &self.users[i] {
                    if u > limit {
                        continue;
                    }
                    if inside(u) {
                        return true;
                    }
                    if seen.insert(self.find(u)) {
                        queue.push_back(self.find(u));
                    }
                }
            }
        }
        false
    }

    fn can_merge(&self, a: usize, b: usize) -> bool {
        a != b && self.anchors(a) + self.anchors(b) <= 1 && !self.reenters(&[a, b])
    }

    /// Time saved by merging `a` and `b` (positive: cheaper merged).
    fn saving(&self, a: usize, b: usize) -> f64 {
        self.seconds(&[a]) + self.seconds(&[b]) - self.seconds(&[a, b])
    }

    fn merge(&mut self, a: usize, b: usize) -> usize {
        let (keep, gone) = if a < b { (a, b) } else { (b, a) };
        self.parent[gone] = keep;
        let moved = self.members.remove(&gone).unwrap_or_default();
        self.members.get_mut(&keep).expect("group").extend(moved);
        // The merged group starts at `keep` and ends at the later of the two ends. The entry
        // of `gone` stays: it is below this one, which starts no later and ends no earlier.
        let last = self.last[keep].max(self.last[gone]);
        self.last[keep] = last;
        let mut k = keep + 1;
        while k <= self.last_from.len() {
            self.last_from[k - 1] = self.last_from[k - 1].max(last);
            k += k & k.wrapping_neg();
        }
        keep
    }

    /// The last op index a path into group `b` can pass through. A path walks whole groups
    /// (see [`Partition::reenters`]), so an op after `b`'s last member may still lead to
    /// `b` through a group that has members on both sides of it; the limit grows over every
    /// group that starts at or before it, to a fixpoint. Past it, every op is in a group that
    /// lies wholly past it, whose users come later still: none leads to `b`.
    fn reach_limit(&self, b: usize) -> usize {
        let mut limit = self.last[b];
        loop {
            let mut k = limit + 1;
            let mut next = limit;
            while k > 0 {
                next = next.max(self.last_from[k - 1]);
                k -= k & k.wrapping_neg();
            }
            if next == limit {
                return limit;
            }
            limit = next;
        }
    }

    fn roots(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.members.keys().copied().collect();
        r.sort();
        r
    }

    /// Whether group `g` may join producer group `p` as an epilogue of `p`'s contractions
    /// (Conv, MatMul, Gemm): their kernels accumulate into their own output, so an epilogue
    /// keeps that shape (a Concat of a convolution's output, a pool after it, or the Slices
    /// that split a merged Q/K/V projection stay other kernels, or prologues of their users).
    fn keeps_contraction_shape(&self, p: usize, g: usize) -> bool {
        let shape = |i: usize| self.m.op(self.order[i]).results.first().and_then(|&r| self.m.value(r).ty.shape.clone());
        let Some(ms) = self.members.get(&p) else { return true };
        let anchors: Vec<_> = ms
            .iter()
            .filter(|&&i| matches!(self.m.op(self.order[i]).op_type(), "Conv" | "MatMul" | "Gemm"))
            .map(|&i| shape(i))
            .collect();
        if anchors.is_empty() {
            return true;
        }
        // The same shape, or the same elements in the same order (a view such as Reshape, and
        // elementwise ops after it).
        let numel = |s: &Option<Vec<kiln_ir::Dim>>| -> Option<u64> { s.as_ref()?.iter().map(|d| d.known()).product() };
        let fits = |i: usize, c: &Option<Vec<kiln_ir::Dim>>| {
            let si = shape(i);
            si == *c || (self.class[i] != OpClass::Layout && numel(&si).is_some() && numel(&si) == numel(c))
        };
        self.members.get(&g).is_none_or(|gs| gs.iter().all(|&i| anchors.iter().all(|c| fits(i, c))))
    }

    /// Whether group `g` holds a layout op that rule 2 kept out of a Conv: it stays a kernel
    /// of its own (a copy), not an epilogue of its producer.
    fn kept_for_conv(&self, g: usize) -> bool {
        let kept = |i: usize| self.users[i].iter().any(|&u| stays_out_of(self.class[i], self.m.op(self.order[u])));
        self.members[&g].iter().any(|&i| kept(i))
    }

    fn only_layout(&self, g: usize) -> bool {
        self.members[&g].iter().all(|&i| self.class[i].is_layout())
    }

    fn anchorless(&self, g: usize) -> bool {
        self.anchors(g) == 0 && self.members[&g].iter().all(|&i| self.fusible(i))
    }

    /// Rule 2: layout ops and views join their only user, except that a layout op that moves
    /// elements (a Concat, a Transpose) stays out of a Conv: its register tiles read the input
    /// as a buffer (a copy costs far less than gathering each input element inside the
    /// multiply-accumulate loop). MatMuls still take them (a transposed operand; attention
    /// chains).
    fn layout_prologue(&mut self) -> usize {
        let mut n = 0;
        for i in (0..self.order.len()).rev() {
            if !self.class[i].is_layout() || self.users[i].len() != 1 {
                continue;
            }
            let r = self.m.op(self.order[i]).results[0];
            let u = self.users[i][0];
            if stays_out_of(self.class[i], self.m.op(self.order[u])) {
                continue;
            }
            if self.outputs.contains(&r) || !self.fusible(u) {
                continue;
            }
            let (a, b) = (self.find(i), self.find(u));
            if self.can_merge(a, b) {
                self.merge(a, b);
                n += 1;
            }
        }
        n
    }

    /// Rule 3: anchorless groups join a producer group, best saving first.
    fn epilogue(&mut self) -> usize {
        let mut n = 0;
        for g0 in self.roots() {
            let mut g = self.find(g0);
            if !self.members.contains_key(&g) || !self.anchorless(g) || self.kept_for_conv(g) {
                continue;
            }
            loop {
                let mut best: Option<(f64, usize)> = None;
                for p in self.producer_groups(g) {
                    if self.only_layout(p) && !self.only_layout(g) {
                        // A lone layout op is absorbed by its user (rule 2), not the reverse.
                        continue;
                    }
                    if !self.can_merge(p, g) || !self.keeps_contraction_shape(p, g) {
                        continue;
                    }
                    let s = self.saving(p, g);
                    if s > 0.0 && best.is_none_or(|(bs, _)| s > bs) {
                        best = Some((s, p));
                    }
                }
                let Some((_, p)) = best else { break };
                g = self.merge(p, g);
                n += 1;
                if self.anchors(g) > 0 {
                    // Further producers would become prologues of the anchor.
                    break;
                }
            }
        }
        n
    }

    /// Rule 4: anchorless producers of a reduction join it.
    fn reduction_prologue(&mut self) -> usize {
        let mut n = 0;
        for g0 in self.roots() {
            let mut g = self.find(g0);
            let is_reduction =
                self.members.get(&g).is_some_and(|ms| ms.iter().any(|&i| self.class[i] == OpClass::Reduction));
            if !is_reduction {
                continue;
            }
            for p in self.producer_groups(g) {
                let p = self.find(p);
                if !self.anchorless(p) || self.only_layout(p) || !self.can_merge(p, g) {
                    continue;
                }
                if self.saving(p, g) > 0.0 {
                    g = self.merge(p, g);
                    n += 1;
                }
            }
        }
        n
    }

    /// The anchor op type of group `g`, if it has one anchor.
    fn anchor_type(&self, g: usize) -> Option<&'m str> {
        let mut anchors = self.members[&g].iter().filter(|&&i| self.class[i].is_anchor());
        let a = *anchors.next()?;
        anchors.next().is_none().then(|| self.m.op(self.order[a]).op_type())
    }

    /// Whether every result of group `a` that leaves it is read only by group `b`.
    fn feeds_only(&self, a: usize, b: usize) -> bool {
        self.members[&a].iter().all(|&i| {
            let r = self.m.op(self.order[i]).results[0];
            !self.outputs.contains(&r) && self.users[i].iter().all(|&u| self.find(u) == a || self.find(u) == b)
        })
    }

    /// Rule 5: `MatMul → Softmax → MatMul` groups merge into one attention kernel.
    fn attention_chain(&mut self) -> usize {
        let mut n = 0;
        for g0 in self.roots() {
            let g = self.find(g0);
            if !self.members.contains_key(&g) || self.anchor_type(g) != Some("Softmax") {
                continue;
            }
            let qk: Vec<usize> = self
                .producer_groups(g)
                .into_iter()
                .filter(|&p| self.anchor_type(p) == Some("MatMul") && self.feeds_only(p, g))
                .collect();
            let pv: Vec<usize> = {
                let mut c: Vec<usize> = self.members[&g]
                    .iter()
                    .flat_map(|&i| self.users[i].iter().map(|&u| self.find(u)))
                    .filter(|&u| u != g)
                    .collect();
                c.sort();
                c.dedup();
                c
            };
            let ([p], [c]) = (qk.as_slice(), pv.as_slice()) else { continue };
            let (p, c) = (*p, *c);
            if self.anchor_type(c) != Some("MatMul") || !self.feeds_only(g, c) {
                continue;
            }
            // The probabilities must be the left operand of the second MatMul.
            let probs_left = self.members[&c].iter().any(|&i| {
                let op = self.m.op(self.order[i]);
                op.op_type() == "MatMul"
                    && op.operands[0].and_then(|v| self.producer.get(&v)).is_some_and(|&q| self.find(q) == g)
            });
            if !probs_left || self.reenters(&[p, g, c]) {
                continue;
            }
            let merged = self.merge(p, g);
            self.merge(merged, c);
            n += 1;
        }
        n
    }

    /// Rule 6: layout groups left alone join their producer.
    fn layout_epilogue(&mut self) -> usize {
        let mut n = 0;
        for g0 in self.roots() {
            let g = self.find(g0);
            if !self.members.contains_key(&g) || !self.only_layout(g) {
                continue;
            }
            if self.members[&g].iter().all(|&i| self.class[i] == OpClass::View) {
                continue;
            }
            if self.kept_for_conv(g) {
                continue;
            }
            let best = self
                .producer_groups(g)
                .into_iter()
                .filter(|&p| !self.only_layout(p) && self.keeps_contraction_shape(p, g) && self.can_merge(p, g))
                .max_by(|&a, &b| {
                    self.saving(a, g).partial_cmp(&self.saving(b, g)).unwrap_or(std::cmp::Ordering::Equal)
                });
            if let Some(p) = best {
                if self.saving(p, g) > 0.0 {
                    self.merge(p, g);
                    n += 1;
                }
            }
        }
        n
    }
}

/// Rule 2's exception: whether an op of class `class` stays out of its user `user` (a layout
/// op that moves elements, such as a Concat or a Transpose, stays out of a Conv, whose register
/// tiles read the input as a buffer).
fn stays_out_of(class: OpClass, user: &kiln_ir::ir::OpData) -> bool {
    class == OpClass::Layout && user.op_type() == "Conv"
}

/// Rule 1: copies layout ops and views with several users, one copy per extra user, so each
/// user can absorb its own (Convs share the original of a layout op: see rule 2).
/// Returns how many copies were made.
fn duplicate_layout(m: &mut Module) -> usize {
    let mut copies = 0;
    let mut i = m.body.ops.len();
    while i > 0 {
        i -= 1;
        let o = m.body.ops[i];
        if !classify(m, o).is_layout() {
            continue;
        }
        let r = m.op(o).results[0];
        // Users in program order; region captures are left alone.
        let mut direct: Vec<(usize, OpId)> = Vec::new();
        let mut captured = false;
        for (j, &u) in m.body.ops.iter().enumerate() {
            let op = m.op(u);
            if op.operands.iter().flatten().any(|&v| v == r) {
                direct.push((j, u));
            }
            if !op.regions.is_empty() {
                let mut hit = false;
                for reg in &op.regions {
                    for b in &reg.blocks {
                        for &inner in &b.ops {
                            visit_uses(m, inner, &mut |v| hit |= v == r);
                        }
                        hit |= b.yields.contains(&r);
                    }
                }
                captured |= hit;
            }
        }
        // A layout op that moves elements stays out of Convs (rule 2): they all read the
        // original, each other user gets a copy.
        let mut shared = m.outputs().contains(&r);
        let class = classify(m, o);
        let before = direct.len();
        direct.retain(|&(_, u)| !stays_out_of(class, m.op(u)));
        shared |= direct.len() < before;
        if captured || direct.len() + shared as usize <= 1 {
            continue;
        }
        let keep = if shared { 0 } else { 1 };
        for &(_, u) in direct.iter().skip(keep) {
            let op = m.op(o).clone();
            let ty = m.value(r).ty.clone();
            let c = m.create_op(&op.name, op.operands.clone(), vec![ty], op.attrs.clone(), vec![]);
            let nr = m.op(c).results[0];
            for x in m.op_mut(u).operands.iter_mut().flatten() {
                if *x == r {
                    *x = nr;
                }
            }
            let pos = m.body.ops.iter().position(|&x| x == o).expect("op in body") + 1;
            m.body.ops.insert(pos, c);
            copies += 1;
        }
    }
    copies
}

/// Partitions `m`'s body into kernels and wraps each kernel of several ops in `graph.fused`.
pub fn fuse(m: &mut Module, cost: &CostModel) -> Result<FusionReport, String> {
    let copies = duplicate_layout(m);
    let (groups, merges) = {
        let mut p = Partition::new(m, cost);
        let merges = vec![
            (LAYOUT_DUPLICATE, copies),
            (LAYOUT_PROLOGUE, p.layout_prologue()),
            (EPILOGUE, p.epilogue()),
            (REDUCTION_PROLOGUE, p.reduction_prologue()),
            (ATTENTION_CHAIN, p.attention_chain()),
            (LAYOUT_EPILOGUE, p.layout_epilogue()),
        ];
        let groups: Vec<Vec<OpId>> = p.roots().into_iter().map(|g| p.group_ops(g)).collect();
        (groups, merges)
    };
    emit(m, &groups)?;
    let kernels = figures(m, cost, false).kernels;
    Ok(FusionReport { merges, kernels })
}

/// The kind of a kernel: what it is built around.
fn kernel_kind(m: &Module, ops: &[OpId]) -> (&'static str, Option<String>) {
    if ops.iter().filter(|&&o| classify(m, o).is_anchor()).count() > 1 {
        // Only the attention chain puts several anchors in one kernel.
        return ("attention", Some("MatMul-Softmax-MatMul".into()));
    }
    let anchor = ops.iter().find(|&&o| classify(m, o).is_anchor());
    match anchor {
        Some(&a) => {
            let t = m.op(a).op_type();
            let kind = match (t, classify(m, a)) {
                ("Attention", _) => "attention",
                (_, OpClass::Contraction) => "contraction",
                _ => "reduction",
            };
            (kind, Some(t.to_string()))
        }
        None if ops.iter().all(|&o| classify(m, o).is_layout()) => ("layout", None),
        None => ("elementwise", None),
    }
}

/// Rewrites `m` so each group of several ops is one `graph.fused` op, in a topological order.
/// A cycle among kernels (a bug in the partition's checks) is an error, never a dropped op.
fn emit(m: &mut Module, groups: &[Vec<OpId>]) -> Result<(), String> {
    let old_order: HashMap<OpId, usize> = m.body.ops.iter().enumerate().map(|(i, &o)| (o, i)).collect();
    let users = users_of(m);
    // Each unit is one top-level op of the result: a fused op or an op left alone.
    let mut units: Vec<OpId> = Vec::new();
    let mut unit_of: HashMap<OpId, OpId> = HashMap::new();
    let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
    for g in groups {
        if g.len() < 2 || g.iter().all(|&o| classify(m, o) == OpClass::View) {
            for &o in g {
                units.push(o);
                unit_of.insert(o, o);
            }
            continue;
        }
        let inside: HashSet<OpId> = g.iter().copied().collect();
        let produced: HashSet<ValueId> = g.iter().flat_map(|&o| m.op(o).results.clone()).collect();
        let mut inputs: Vec<ValueId> = Vec::new();
        for &o in g {
            for v in m.op(o).operands.iter().flatten() {
                if !produced.contains(v) && !inputs.contains(v) {
                    inputs.push(*v);
                }
            }
        }
        let outputs = kernel_outputs(m, g, &inside, &users);
        let mut block = Block::default();
        let mut arg_of: HashMap<ValueId, ValueId> = HashMap::new();
        for &v in &inputs {
            let a = m.add_arg(m.value(v).ty.clone(), None);
            arg_of.insert(v, a);
            block.args.push(a);
        }
        for &o in g {
            for x in m.op_mut(o).operands.iter_mut().flatten() {
                if let Some(&a) = arg_of.get(x) {
                    *x = a;
                }
            }
        }
        block.ops = g.clone();
        block.yields = outputs.clone();
        let (kind, anchor) = kernel_kind(m, g);
        let mut attrs = Attrs::new();
        attrs.insert("body".into(), Attr::Region(0));
        attrs.insert("kind".into(), Attr::Str(kind.into()));
        if let Some(a) = anchor {
            attrs.insert("anchor".into(), Attr::Str(a));
        }
        let name_op = g.iter().find(|&&o| classify(m, o).is_anchor()).or(g.last()).copied().expect("non-empty group");
        let name = m.op(name_op).node_name().to_string();
        if !name.is_empty() {
            attrs.insert(NODE_NAME_ATTR.into(), Attr::Str(name));
        }
        attrs.insert(
            "kiln.result_dtypes".into(),
            Attr::Strs(outputs.iter().map(|&v| m.value(v).ty.dtype.onnx_name().to_string()).collect()),
        );
        let types = outputs.iter().map(|&v| m.value(v).ty.clone()).collect();
        let operands = inputs.iter().map(|&v| Some(v)).collect();
        let f = m.create_op("graph.fused", operands, types, attrs, vec![Region { blocks: vec![block] }]);
        for (&old, new) in outputs.iter().zip(m.op(f).results.clone()) {
            m.value_mut(new).name = m.value_mut(old).name.take();
            remap.insert(old, new);
        }
        units.push(f);
        for &o in g {
            unit_of.insert(o, f);
        }
    }
    // Rewrite uses of values that now leave through a fused op's results.
    let top: Vec<OpId> = units.clone();
    for &u in &top {
        if m.op(u).name == "graph.fused" {
            continue;
        }
        remap_uses(m, u, &remap);
    }
    for &u in &top {
        if m.op(u).name == "graph.fused" {
            for x in m.op_mut(u).operands.iter_mut().flatten() {
                if let Some(&n) = remap.get(x) {
                    *x = n;
                }
            }
        }
    }
    for y in m.body.yields.iter_mut() {
        if let Some(&n) = remap.get(y) {
            *y = n;
        }
    }
    // Topological order of the units, stable by their first op's old position.
    let first: HashMap<OpId, usize> = {
        let mut f: HashMap<OpId, usize> = HashMap::new();
        for (&o, &u) in &unit_of {
            let p = old_order[&o];
            f.entry(u).and_modify(|x| *x = (*x).min(p)).or_insert(p);
        }
        f
    };
    let producer_unit: HashMap<ValueId, OpId> =
        top.iter().flat_map(|&u| m.op(u).results.iter().map(move |&r| (r, u))).collect();
    let mut deps: HashMap<OpId, Vec<OpId>> = HashMap::new();
    let mut indeg: HashMap<OpId, usize> = top.iter().map(|&u| (u, 0)).collect();
    for &u in &top {
        let mut seen = HashSet::new();
        visit_uses(m, u, &mut |v| {
            if let Some(&p) = producer_unit.get(&v) {
                if p != u && seen.insert(p) {
                    deps.entry(p).or_default().push(u);
                }
            }
        });
        *indeg.get_mut(&u).expect("unit") = seen.len();
    }
    let mut ready: BTreeSet<(usize, u32)> = top.iter().filter(|u| indeg[u] == 0).map(|&u| (first[&u], u.0)).collect();
    let mut order = Vec::with_capacity(top.len());
    while let Some(&(k, id)) = ready.iter().next() {
        ready.remove(&(k, id));
        let u = OpId(id);
        order.push(u);
        for &d in deps.get(&u).map(|v| v.as_slice()).unwrap_or(&[]) {
            let e = indeg.get_mut(&d).expect("unit");
            *e -= 1;
            if *e == 0 {
                ready.insert((first[&d], d.0));
            }
        }
    }
    if order.len() != top.len() {
        return Err(format!("fusion left a cycle among {} kernels", top.len() - order.len()));
    }
    m.body.ops = order;
    Ok(())
}

/// Replaces uses of values through `remap` in op `o` and its regions.
fn remap_uses(m: &mut Module, o: OpId, remap: &HashMap<ValueId, ValueId>) {
    for x in m.op_mut(o).operands.iter_mut().flatten() {
        if let Some(&n) = remap.get(x) {
            *x = n;
        }
    }
    let regions = m.op(o).regions.clone();
    for r in &regions {
        for b in &r.blocks {
            for &i in &b.ops {
                remap_uses(m, i, remap);
            }
        }
    }
    let mut op = std::mem::take(&mut m.op_mut(o).regions);
    for r in &mut op {
        for b in &mut r.blocks {
            for y in b.yields.iter_mut() {
                if let Some(&n) = remap.get(y) {
                    *y = n;
                }
            }
        }
    }
    m.op_mut(o).regions = op;
}

#[cfg(test)]
#[path = "fusion_tests.rs"]
mod tests;
