//! Rewrite rules over the graph e-graph. Each rule is small and named: a matcher that walks
//! e-classes in Rust (so it can read attributes, constants and types from the analysis, and
//! try both operand orders of commutative ops) and a builder that adds the equivalent form.
//! Saturation keeps both forms; extraction picks by cost.
//!
//! - algebraic: [`TRANSPOSE_TRANSPOSE`], [`TRANSPOSE_SINK`], [`EXPAND_INTO_BROADCAST`], [`VIEW_NOOP`], [`VIEW_CHAIN`], [`BN_INTO_CONV`],
//!   [`SCALE_INTO_CONV`], [`BIAS_INTO_CONV`], [`SCALAR_CHAIN`], [`MATMUL_ASSOC`],
//!   [`MATMUL_MERGE`] (QKV merging);
//! - recognition of decomposed ops: [`LAYERNORM`], [`LAYERNORM_AFFINE`], [`RMSNORM`],
//!   [`RMSNORM_SCALE`], [`GELU_ERF`], [`SILU`], [`SOFTMAX`], [`ATTENTION`].

use super::{add_const, add_op, Graph, Leaf, Node, OpInfo};
use egg::{Applier, Id, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::graph::AttrView;
use kiln_ir::{DType, Tensor, TensorType};

/// A rule: `search` lists the bindings (e-class ids) of each match in a class; `apply` builds
/// the rewritten form and returns the classes it changed.
#[derive(Clone, Copy)]
pub struct Rule {
    pub name: &'static str,
    pub search: fn(&Graph, Id) -> Vec<Vec<Id>>,
    pub apply: fn(&mut Graph, Id, &[Id]) -> Vec<Id>,
}

const MAX_BINDINGS: usize = 12;

fn var(i: usize) -> Var {
    format!("?v{i}").parse().expect("valid variable")
}

impl Searcher<Node, super::GraphAnalysis> for Rule {
    fn search_eclass_with_limit(&self, eg: &Graph, eclass: Id, limit: usize) -> Option<SearchMatches<'_, Node>> {
        let found = (self.search)(eg, eclass);
        let substs: Vec<Subst> = found
            .into_iter()
            .take(limit)
            .map(|ids| {
                let mut s = Subst::with_capacity(ids.len());
                for (i, id) in ids.into_iter().enumerate().take(MAX_BINDINGS) {
                    s.insert(var(i), id);
                }
                s
            })
            .collect();
        (!substs.is_empty()).then_some(SearchMatches { eclass, substs, ast: None })
    }

    fn vars(&self) -> Vec<Var> {
        (0..MAX_BINDINGS).map(var).collect()
    }
}

impl Applier<Node, super::GraphAnalysis> for Rule {
    fn apply_one(&self, eg: &mut Graph, eclass: Id, subst: &Subst, _: Option<&PatternAst<Node>>, _: Symbol) -> Vec<Id> {
        let ids: Vec<Id> = (0..MAX_BINDINGS).map_while(|i| subst.get(var(i)).copied()).collect();
        // A rule applies once per binding: re-applying would rebuild the same nodes (and, for
        // folded weights, new constants) every iteration.
        let mut key = vec![eg.find(eclass)];
        key.extend(ids.iter().map(|&i| eg.find(i)));
        if !eg.analysis.applied.insert((self.name, key)) {
            return vec![];
        }
        (self.apply)(eg, eclass, &ids)
    }
}

impl Rule {
    pub fn rewrite(self) -> Rewrite<Node, super::GraphAnalysis> {
        Rewrite::new(self.name, self, self).expect("a rule's searcher binds what its applier reads")
    }
}

/// Every rule, in a fixed order.
pub fn all() -> Vec<Rule> {
    vec![
        TRANSPOSE_TRANSPOSE,
        TRANSPOSE_SINK,
        EXPAND_INTO_BROADCAST,
        VIEW_NOOP,
        VIEW_CHAIN,
        BN_INTO_CONV,
        SCALE_INTO_CONV,
        BIAS_INTO_CONV,
        SCALAR_CHAIN,
        MATMUL_ASSOC,
        MATMUL_MERGE,
        LAYERNORM,
        LAYERNORM_AFFINE,
        RMSNORM,
        RMSNORM_SCALE,
        GELU_ERF,
        SILU,
        SOFTMAX,
        ATTENTION,
    ]
}

/// The rules as egg rewrites.
pub fn rewrites() -> Vec<Rewrite<Node, super::GraphAnalysis>> {
    all().into_iter().map(Rule::rewrite).collect()
}

// ---------------------------------------------------------------------------------------
// Matching helpers.

/// Children (attributes leaf first) of every `sym` node in class `c`.
fn ops<'a>(eg: &'a Graph, c: Id, sym: &'static str) -> impl Iterator<Item = &'a [Id]> + 'a {
    eg[c].nodes.iter().filter_map(move |n| match n {
        Node::Op(s, ch) if s.as_str() == sym => Some(ch.as_slice()),
        _ => None,
    })
}

/// The op info of a node's children list.
fn info<'a>(eg: &'a Graph, ch: &[Id]) -> Option<&'a OpInfo> {
    match eg[ch[0]].data.leaf {
        Some(Leaf::Attrs(k)) => eg.analysis.infos.get(k as usize),
        _ => None,
    }
}

fn attrs<'a>(eg: &'a Graph, ch: &[Id]) -> AttrView<'a> {
    static EMPTY: std::sync::OnceLock<Attrs> = std::sync::OnceLock::new();
    AttrView(info(eg, ch).map_or_else(|| EMPTY.get_or_init(Attrs::new), |i| &i.attrs))
}

fn same(eg: &Graph, a: Id, b: Id) -> bool {
    eg.find(a) == eg.find(b)
}

fn konst(eg: &Graph, c: Id) -> Option<&Tensor> {
    eg[c].data.konst.as_deref()
}

fn scalar(eg: &Graph, c: Id) -> Option<f64> {
    konst(eg, c).and_then(|t| t.dtype().is_float().then(|| t.scalar_value_f64()).flatten())
}

fn ty(eg: &Graph, c: Id) -> Option<&TensorType> {
    let d = &eg[c].data;
    if d.valid && d.types.len() == 1 {
        d.types.first()
    } else {
        None
    }
}

/// Class `new` can stand for class `old`: same dtype and rank, equal known dims (symbols may
/// differ: shape rules name run-time sizes afresh, e.g. after a broadcast against a slice).
fn fits(eg: &Graph, new: Id, old: Id) -> bool {
    let (Some(a), Some(b)) = (ty(eg, new), ty(eg, old)) else { return false };
    if a.dtype != b.dtype {
        return false;
    }
    match (&a.shape, &b.shape) {
        (Some(x), Some(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(p, q)| match (p.known(), q.known()) {
                    (Some(p), Some(q)) => p == q,
                    _ => true,
                })
        }
        (None, None) => true,
        _ => false,
    }
}

/// Class `c` is a floating-point tensor.
fn is_float(eg: &Graph, c: Id) -> bool {
    ty(eg, c).is_some_and(|t| t.dtype.is_float())
}

fn rank(eg: &Graph, c: Id) -> Option<usize> {
    ty(eg, c).and_then(|t| t.rank())
}

fn is_absent(eg: &Graph, c: Id) -> bool {
    eg[c].data.leaf == Some(Leaf::Absent)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

/// Both operand orders of a commutative binary op.
fn pairs(ch: &[Id]) -> [(Id, Id); 2] {
    [(ch[1], ch[2]), (ch[2], ch[1])]
}

/// Inputs of `sym` reductions in class `c` that reduce exactly the last axis, keeping it.
fn reduce_last(eg: &Graph, c: Id, sym: &'static str) -> Vec<Id> {
    ops(eg, c, sym)
        .filter_map(|ch| {
            let a = attrs(eg, ch);
            if a.int("keepdims", 1).ok()? != 1 {
                return None;
            }
            let axes = match ch.get(2) {
                Some(&ax) if !is_absent(eg, ax) => konst(eg, ax)?.to_i64(),
                _ => a.ints("axes").ok()??,
            };
            let r = rank(eg, ch[1])? as i64;
            let [axis] = axes.as_slice() else { return None };
            (r > 0 && (*axis == r - 1 || *axis == -1)).then_some(ch[1])
        })
        .collect()
}

/// A constant tensor of `n` values equal to `v`, of `dt`.
fn filled(dt: DType, n: usize, v: f64) -> Tensor {
    Tensor::from_f64(dt, &[n], vec![v; n])
}

/// The known size of the last dim of class `c`.
fn last_dim(eg: &Graph, c: Id) -> Option<usize> {
    ty(eg, c)?.shape.as_ref()?.last()?.known().map(|d| d as usize)
}

/// `t` is all `v`.
fn all_equal(t: &Tensor, v: f64) -> bool {
    t.to_f64().iter().all(|&x| x == v)
}

/// The first constant leaf of class `c`.
fn const_index(eg: &Graph, c: Id) -> Option<u32> {
    eg[c].nodes.iter().find_map(|n| match n {
        Node::Leaf(Leaf::Const(k)) => Some(*k),
        _ => None,
    })
}

/// Unions `new` with `root` when it can stand for it ([`fits`]: a rule whose result has another
/// type, or none, changes nothing); returns the classes changed.
fn union_with(eg: &mut Graph, root: Id, new: Id) -> Vec<Id> {
    if fits(eg, new, root) && eg.union(root, new) {
        vec![new]
    } else {
        vec![]
    }
}

fn float_attr(v: f64) -> Attr {
    Attr::Float(v as f32)
}

// ---------------------------------------------------------------------------------------
// Algebraic rules.

/// Normalized permutation of a Transpose of rank `r` (default: reversed).
fn perm(a: AttrView, r: usize) -> Option<Vec<usize>> {
    match a.ints("perm").ok()? {
        Some(p) if p.len() == r => {
            p.iter().map(|&x| usize::try_from(if x < 0 { x + r as i64 } else { x }).ok()).collect()
        }
        Some(_) => None,
        None => Some((0..r).rev().collect()),
    }
}

/// `Transpose(Transpose(x, p2), p1)` → `Transpose(x, p2∘p1)`, or `x` when that is the identity.
pub const TRANSPOSE_TRANSPOSE: Rule = Rule {
    name: "transpose-transpose",
    search: |eg, c| {
        let mut out = vec![];
        for t1 in ops(eg, c, "Transpose") {
            for t2 in ops(eg, t1[1], "Transpose") {
                out.push(vec![t1[0], t2[0], t2[1]]);
            }
        }
        out
    },
    apply: |eg, root, b| {
        let Some(r) = rank(eg, b[2]) else { return vec![] };
        let (Some(p1), Some(p2)) = (perm(attrs(eg, &b[0..1]), r), perm(attrs(eg, &b[1..2]), r)) else { return vec![] };
        let p: Vec<usize> = p1.iter().map(|&j| p2[j]).collect();
        let new = if p.iter().enumerate().all(|(i, &x)| i == x) {
            b[2]
        } else {
            let mut a = Attrs::new();
            a.insert("perm".into(), Attr::Ints(p.iter().map(|&x| x as i64).collect()));
            add_op(eg, "Transpose", &[Some(b[2])], a)
        };
        union_with(eg, root, new)
    },
};

/// Elementwise ops of one operand, or of one operand and a scalar constant.
fn elementwise_of_one(eg: &Graph, ch: &[Id], sym: &str) -> Option<Id> {
    if kiln_ir::graph::registry().family(sym) != Some("elementwise") || matches!(sym, "Identity" | "Cast" | "CastLike")
    {
        return None;
    }
    match ch.len() {
        2 => Some(ch[1]),
        3 if konst(eg, ch[2]).is_some_and(|t| t.len() == 1 && t.rank() == 0) => Some(ch[1]),
        _ => None,
    }
}

/// `f(Transpose(x))` → `Transpose(f(x))` for elementwise `f` of one tensor (a scalar constant
/// second operand allowed): transposes move toward each other and cancel
/// ([`TRANSPOSE_TRANSPOSE`]), e.g. around an activation between two layout changes.
pub const TRANSPOSE_SINK: Rule = Rule {
    name: "transpose-sink",
    search: |eg, c| {
        let mut out = vec![];
        for n in &eg[c].nodes {
            let Node::Op(sym, ch) = n else { continue };
            let Some(x) = elementwise_of_one(eg, ch, sym.as_str()) else { continue };
            for t in ops(eg, x, "Transpose") {
                out.push(vec![t[0], t[1], ch[0], x]);
            }
        }
        out
    },
    apply: |eg, root, b| {
        let (ta, x, attrs_class, arg) = (b[0], b[1], b[2], b[3]);
        let found = eg[root].nodes.iter().find_map(|n| match n {
            Node::Op(sym, ch) if same(eg, ch[0], attrs_class) && ch.len() >= 2 && same(eg, ch[1], arg) => {
                Some((*sym, ch.clone()))
            }
            _ => None,
        });
        let Some((sym, ch)) = found else { return vec![] };
        let Some(a) = info(eg, &ch).map(|i| i.attrs.clone()) else { return vec![] };
        let mut operands = vec![Some(x)];
        operands.extend(ch[2..].iter().map(|&c| Some(c)));
        let inner = add_op(eg, sym.as_str(), &operands, a);
        let Some(t) = info(eg, &[ta]).map(|i| i.attrs.clone()) else { return vec![] };
        let new = add_op(eg, "Transpose", &[Some(inner)], t);
        union_with(eg, root, new)
    },
};

/// Broadcasting binary elementwise ops (numpy rules on both operands).
const BROADCASTING: [&str; 8] = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"];

/// Broadcast normalization: an explicit `Expand` feeding a broadcasting elementwise op is
/// dropped when the op's implicit broadcasting gives the same result type.
pub const EXPAND_INTO_BROADCAST: Rule = Rule {
    name: "expand-into-broadcast",
    search: |eg, c| {
        let mut out = vec![];
        for n in &eg[c].nodes {
            let Node::Op(sym, ch) = n else { continue };
            if !BROADCASTING.contains(&sym.as_str()) || ch.len() < 3 {
                continue;
            }
            for (pos, &operand) in ch.iter().enumerate().skip(1) {
                for e in ops(eg, operand, "Expand") {
                    out.push(vec![ch[0], ch[1], Id::from(pos), e[1]]);
                }
            }
        }
        out
    },
    apply: |eg, root, b| {
        let (attrs_class, first, pos, x) = (b[0], b[1], usize::from(b[2]), b[3]);
        let found = eg[root].nodes.iter().find_map(|n| match n {
            Node::Op(sym, ch) if same(eg, ch[0], attrs_class) && same(eg, ch[1], first) && ch.len() > pos => {
                Some((*sym, ch.clone()))
            }
            _ => None,
        });
        let Some((sym, mut ch)) = found else { return vec![] };
        ch[pos] = x;
        let Some(a) = info(eg, &ch).map(|i| i.attrs.clone()) else { return vec![] };
        let operands: Vec<Option<Id>> = ch[1..].iter().map(|&c| Some(c)).collect();
        let new = add_op(eg, sym.as_str(), &operands, a);
        // Only where the implicit broadcast reaches the same shape exactly.
        if ty(eg, new).is_none() || ty(eg, new) != ty(eg, root) {
            return vec![];
        }
        union_with(eg, root, new)
    },
};

const VIEWS: [&str; 5] = ["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"];

/// A view whose result has its input's type is its input.
pub const VIEW_NOOP: Rule = Rule {
    name: "view-noop",
    search: |eg, c| {
        let Some(t) = ty(eg, c) else { return vec![] };
        VIEWS
            .iter()
            .flat_map(|v| ops(eg, c, v))
            .filter(|ch| ty(eg, ch[1]) == Some(t) && t.shape.is_some())
            .map(|ch| vec![ch[1]])
            .collect()
    },
    apply: |eg, root, b| union_with(eg, root, b[0]),
};

/// A view of a view is one `Reshape` to the (static) final shape.
pub const VIEW_CHAIN: Rule = Rule {
    name: "view-chain",
    search: |eg, c| {
        if ty(eg, c).and_then(|t| t.static_shape()).is_none() {
            return vec![];
        }
        let mut out = vec![];
        for v in VIEWS {
            for ch in ops(eg, c, v) {
                for v2 in VIEWS {
                    for ch2 in ops(eg, ch[1], v2) {
                        out.push(vec![ch2[1]]);
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| {
        let Some(shape) = ty(eg, root).and_then(|t| t.static_shape()) else { return vec![] };
        if ty(eg, b[0]) == ty(eg, root) {
            return union_with(eg, root, b[0]);
        }
        let s = add_const(eg, Tensor::from_i64(&[shape.len()], shape.iter().map(|&d| d as i64).collect()));
        let new = add_op(eg, "Reshape", &[Some(b[0]), Some(s)], Attrs::new());
        union_with(eg, root, new)
    },
};

/// `[x, w, bias (absent class allowed)]` of every Conv in class `c` with constant weights.
fn conv_with_const_weights(eg: &Graph, c: Id) -> Vec<(Id, Id, Id, Id)> {
    ops(eg, c, "Conv")
        .filter(|ch| ch.len() >= 3 && konst(eg, ch[2]).is_some())
        .filter(|ch| ch.get(3).is_none_or(|&b| is_absent(eg, b) || konst(eg, b).is_some()))
        .filter_map(|ch| {
            let bias = match ch.get(3) {
                Some(&b) => b,
                None => eg.lookup(Node::Leaf(Leaf::Absent))?,
            };
            Some((ch[0], ch[1], ch[2], bias))
        })
        .collect()
}

/// Builds `Conv(x, w·k[o], (bias - shift)·k[o] + add)` with per-output-channel `k`.
fn rescaled_conv(eg: &mut Graph, b: &[Id], k: &[f64], sub: &[f64], add: &[f64]) -> Option<Id> {
    let (ca, x, w, bias) = (b[0], b[1], b[2], b[3]);
    let wt = konst(eg, w)?.clone();
    let o = *wt.shape.first()?;
    if k.len() != o || sub.len() != o || add.len() != o || !wt.dtype().is_float() {
        return None;
    }
    let per = wt.len() / o.max(1);
    let wv: Vec<f64> = wt.to_f64().iter().enumerate().map(|(i, &v)| v * k[i / per.max(1)]).collect();
    let b0: Vec<f64> = match konst(eg, bias) {
        Some(t) if t.len() == o => t.to_f64(),
        Some(_) => return None,
        None => vec![0.0; o],
    };
    let bv: Vec<f64> = (0..o).map(|i| (b0[i] - sub[i]) * k[i] + add[i]).collect();
    let w2 = add_const(eg, Tensor::from_f64(wt.dtype(), &wt.shape, wv));
    let b2 = add_const(eg, Tensor::from_f64(wt.dtype(), &[o], bv));
    let conv_attrs = info(eg, &[ca])?.attrs.clone();
    Some(add_op(eg, "Conv", &[Some(x), Some(w2), Some(b2)], conv_attrs))
}

/// Inference BatchNormalization of a Conv with constant weights folds into the Conv.
pub const BN_INTO_CONV: Rule = Rule {
    name: "bn-into-conv",
    search: |eg, c| {
        let mut out = vec![];
        for bn in ops(eg, c, "BatchNormalization") {
            if bn.len() != 6 || bn[2..].iter().any(|&p| konst(eg, p).is_none()) {
                continue;
            }
            if attrs(eg, bn).int("training_mode", 0).unwrap_or(1) != 0 {
                continue;
            }
            for (ca, x, w, bias) in conv_with_const_weights(eg, bn[1]) {
                out.push(vec![ca, x, w, bias, bn[0], bn[2], bn[3], bn[4], bn[5]]);
            }
        }
        out
    },
    apply: |eg, root, b| {
        let eps = attrs(eg, &b[4..5]).float("epsilon", 1e-5).unwrap_or(1e-5) as f64;
        let [s, beta, mean, var] =
            [b[5], b[6], b[7], b[8]].map(|p| konst(eg, p).map(|t| t.to_f64()).unwrap_or_default());
        let k: Vec<f64> = s.iter().zip(&var).map(|(s, v)| s / (v + eps).sqrt()).collect();
        match rescaled_conv(eg, b, &k, &mean, &beta) {
            Some(new) => union_with(eg, root, new),
            None => vec![],
        }
    },
};

/// A per-output-channel constant `c` for a Conv result of class `y`: its values by channel.
fn per_channel(eg: &Graph, y: Id, c: Id) -> Option<Vec<f64>> {
    let t = konst(eg, c)?;
    let out = ty(eg, y)?.static_shape()?;
    let o = *out.get(1)?;
    if t.len() == 1 {
        return Some(vec![t.to_f64()[0]; o]);
    }
    // Right-aligned against [N, O, spatial...]: every dim 1 except the channel dim.
    let r = out.len();
    if t.rank() > r || t.len() != o {
        return None;
    }
    let chan = t.rank() as isize - (r as isize - 1);
    let ok = t.shape.iter().enumerate().all(|(i, &d)| d == 1 || i as isize == chan);
    ok.then(|| t.to_f64())
}

/// `Mul(Conv(x, w, b), c)` with a per-channel constant folds into the weights and bias.
pub const SCALE_INTO_CONV: Rule = Rule {
    name: "scale-into-conv",
    search: |eg, c| conv_affine_matches(eg, c, "Mul"),
    apply: |eg, root, b| {
        let Some(k) = per_channel(eg, b[5], b[4]) else { return vec![] };
        let z = vec![0.0; k.len()];
        match rescaled_conv(eg, b, &k, &z, &z) {
            Some(new) => union_with(eg, root, new),
            None => vec![],
        }
    },
};

/// `Add(Conv(x, w, b), c)` with a per-channel constant folds into the bias.
pub const BIAS_INTO_CONV: Rule = Rule {
    name: "bias-into-conv",
    search: |eg, c| conv_affine_matches(eg, c, "Add"),
    apply: |eg, root, b| {
        let Some(add) = per_channel(eg, b[5], b[4]) else { return vec![] };
        let (one, z) = (vec![1.0; add.len()], vec![0.0; add.len()]);
        match rescaled_conv(eg, b, &one, &z, &add) {
            Some(new) => union_with(eg, root, new),
            None => vec![],
        }
    },
};

fn conv_affine_matches(eg: &Graph, c: Id, sym: &'static str) -> Vec<Vec<Id>> {
    let mut out = vec![];
    for ch in ops(eg, c, sym) {
        for (y, k) in pairs(ch) {
            if konst(eg, k).is_none() || ty(eg, y) != ty(eg, c) {
                continue;
            }
            for (ca, x, w, bias) in conv_with_const_weights(eg, y) {
                out.push(vec![ca, x, w, bias, k, y]);
            }
        }
    }
    out
}

/// `(x ∘ c1) ∘ c2` → `x ∘ (c1 ∘ c2)` for ∘ in {Add, Mul} and scalar constants (the inner
/// product folds).
pub const SCALAR_CHAIN: Rule = Rule {
    name: "scalar-chain",
    search: |eg, c| {
        let mut out = vec![];
        for sym in ["Add", "Mul"] {
            for ch in ops(eg, c, sym) {
                for (inner, c2) in pairs(ch) {
                    if scalar(eg, c2).is_none() {
                        continue;
                    }
                    for ich in ops(eg, inner, sym) {
                        for (x, c1) in pairs(ich) {
                            if scalar(eg, c1).is_some() && konst(eg, x).is_none() {
                                out.push(vec![ch[0], x, c1, c2]);
                            }
                        }
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| {
        let sym = match eg[root].nodes.iter().find_map(|n| match n {
            Node::Op(s, ch) if ["Add", "Mul"].contains(&s.as_str()) && ch[0] == b[0] => Some(s.as_str()),
            _ => None,
        }) {
            Some(s) => s,
            None => return vec![],
        };
        let (Some(t1), Some(t2)) = (konst(eg, b[2]), konst(eg, b[3])) else { return vec![] };
        if t1.dtype() != t2.dtype() {
            return vec![];
        }
        let folded = add_op(eg, sym, &[Some(b[2]), Some(b[3])], Attrs::new());
        if konst(eg, folded).is_none() || ty(eg, folded).is_none() {
            return vec![];
        }
        let new = add_op(eg, sym, &[Some(b[1]), Some(folded)], Attrs::new());
        union_with(eg, root, new)
    },
};

/// `(a·b)·c` ↔ `a·(b·c)` for 2-D matrices: extraction keeps the order with fewer FLOPs.
pub const MATMUL_ASSOC: Rule = Rule {
    name: "matmul-assoc",
    search: |eg, c| {
        let mut out = vec![];
        for ch in ops(eg, c, "MatMul") {
            for l in ops(eg, ch[1], "MatMul") {
                out.push(vec![l[1], l[2], ch[2], 0.into()]);
            }
            for r in ops(eg, ch[2], "MatMul") {
                out.push(vec![ch[1], r[1], r[2], 1.into()]);
            }
        }
        out.retain(|b| b[..3].iter().all(|&x| rank(eg, x) == Some(2)));
        out
    },
    apply: |eg, root, b| {
        let (a, bb, c) = (b[0], b[1], b[2]);
        let new = if usize::from(b[3]) == 0 {
            let r = add_op(eg, "MatMul", &[Some(bb), Some(c)], Attrs::new());
            add_op(eg, "MatMul", &[Some(a), Some(r)], Attrs::new())
        } else {
            let l = add_op(eg, "MatMul", &[Some(a), Some(bb)], Attrs::new());
            add_op(eg, "MatMul", &[Some(l), Some(c)], Attrs::new())
        };
        union_with(eg, root, new)
    },
};

/// MatMuls that share their left operand and have constant 2-D weights of the same height
/// (Q, K and V projections) become one MatMul over the concatenated weights, sliced back.
pub const MATMUL_MERGE: Rule = Rule {
    name: "matmul-merge",
    search: |eg, x| {
        if rank(eg, x).is_none_or(|r| r < 2) {
            return vec![];
        }
        let mut found: Vec<(Id, Id)> = vec![];
        for p in eg[x].parents() {
            let Node::Op(s, ch) = eg.id_to_node(p) else { continue };
            if s.as_str() != "MatMul" || !same(eg, ch[1], x) {
                continue;
            }
            let (w, m) = (eg.find(ch[2]), eg.find(p));
            let Some(wt) = konst(eg, w) else { continue };
            let made_here = const_index(eg, w).is_some_and(|k| eg.analysis.merged_weights.contains(&k));
            if wt.rank() != 2 || made_here || found.iter().any(|&(_, m2)| m2 == m) {
                continue;
            }
            found.push((w, m));
        }
        found.sort_by_key(|&(_, m)| m);
        found.dedup();
        let Some(&(w0, _)) = found.first() else { return vec![] };
        let k = konst(eg, w0).map(|t| (t.shape[0], t.dtype()));
        found.retain(|&(w, _)| konst(eg, w).map(|t| (t.shape[0], t.dtype())) == k);
        found.truncate((MAX_BINDINGS - 1) / 2);
        if found.len() < 2 {
            return vec![];
        }
        let mut b = vec![x];
        for (w, m) in found {
            b.extend([w, m]);
        }
        vec![b]
    },
    apply: |eg, _, b| {
        let x = b[0];
        let pairs: Vec<(Id, Id)> = b[1..].chunks(2).map(|p| (p[0], p[1])).collect();
        let key: Vec<u32> = pairs.iter().filter_map(|&(w, _)| const_index(eg, w)).collect();
        if key.len() != pairs.len() || !eg.analysis.merges_done.insert(key) {
            return vec![];
        }
        let ws: Vec<Tensor> = pairs.iter().filter_map(|&(w, _)| konst(eg, w).cloned()).collect();
        if ws.len() != pairs.len() {
            return vec![];
        }
        let k = ws[0].shape[0];
        let n: Vec<usize> = ws.iter().map(|w| w.shape[1]).collect();
        let total: usize = n.iter().sum();
        let cols: Vec<Vec<f64>> = ws.iter().map(|w| w.to_f64()).collect();
        let mut cat = Vec::with_capacity(k * total);
        for r in 0..k {
            for (w, &nw) in cols.iter().zip(&n) {
                cat.extend_from_slice(&w[r * nw..(r + 1) * nw]);
            }
        }
        let wc = add_const(eg, Tensor::from_f64(ws[0].dtype(), &[k, total], cat));
        eg.analysis.merged_weights.insert(eg.analysis.consts.len() as u32 - 1);
        let merged = add_op(eg, "MatMul", &[Some(x), Some(wc)], Attrs::new());
        let mut changed = vec![];
        let mut off = 0i64;
        let axes = add_const(eg, Tensor::from_i64(&[1], vec![-1]));
        for (&(_, m), &nw) in pairs.iter().zip(&n) {
            let starts = add_const(eg, Tensor::from_i64(&[1], vec![off]));
            let ends = add_const(eg, Tensor::from_i64(&[1], vec![off + nw as i64]));
            off += nw as i64;
            let s = add_op(eg, "Slice", &[Some(merged), Some(starts), Some(ends), Some(axes)], Attrs::new());
            changed.extend(union_with(eg, m, s));
        }
        changed
    },
};

// ---------------------------------------------------------------------------------------
// Recognition of decomposed ops.

/// `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps)` over the last axis →
/// `LayerNormalization(x, 1, 0)`.
pub const LAYERNORM: Rule = Rule {
    name: "layernorm",
    search: |eg, c| {
        let mut out = vec![];
        for div in ops(eg, c, "Div") {
            let (d, den) = (div[1], div[2]);
            for sub in ops(eg, d, "Sub") {
                let x = sub[1];
                if !reduce_last(eg, sub[2], "ReduceMean").iter().any(|&i| same(eg, i, x)) {
                    continue;
                }
                for sq in ops(eg, den, "Sqrt") {
                    for add in ops(eg, sq[1], "Add") {
                        for (var, eps) in pairs(add) {
                            if scalar(eg, eps).is_none() {
                                continue;
                            }
                            for p in reduce_last(eg, var, "ReduceMean") {
                                let squares = ops(eg, p, "Pow")
                                    .any(|pw| same(eg, pw[1], d) && scalar(eg, pw[2]) == Some(2.0))
                                    || ops(eg, p, "Mul").any(|m| same(eg, m[1], d) && same(eg, m[2], d));
                                if squares {
                                    out.push(vec![x, eps]);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| normalization(eg, root, "LayerNormalization", b[0], scalar(eg, b[1]).unwrap_or(1e-5)),
};

/// Builds `op(x, 1[, 0])` (LayerNormalization with a bias, RMSNormalization without) over the
/// last axis with `epsilon`, and unions it with `root`.
fn normalization(eg: &mut Graph, root: Id, op: &str, x: Id, eps: f64) -> Vec<Id> {
    let (Some(n), Some(dt)) = (last_dim(eg, x), ty(eg, x).map(|t| t.dtype)) else { return vec![] };
    if !dt.is_float() {
        return vec![];
    }
    let mut operands = vec![Some(x), Some(add_const(eg, filled(dt, n, 1.0)))];
    if op == "LayerNormalization" {
        operands.push(Some(add_const(eg, filled(dt, n, 0.0))));
    }
    let mut a = Attrs::new();
    a.insert("axis".into(), Attr::Int(-1));
    a.insert("epsilon".into(), float_attr(eps));
    let new = add_op(eg, op, &operands, a);
    union_with(eg, root, new)
}

/// A constant of the last-dim size `n` (shape `[n]`, or `[1, .., n]`), as a 1-D tensor.
fn last_axis_const(eg: &Graph, c: Id, n: usize) -> Option<Tensor> {
    let t = konst(eg, c)?;
    (t.len() == n && t.shape.last() == Some(&n)).then(|| t.clone().reshaped(vec![n]))
}

/// `LayerNormalization(x, 1, 0)·g + b` with constant `g`, `b` over the last axis →
/// `LayerNormalization(x, g, b)`.
pub const LAYERNORM_AFFINE: Rule = Rule {
    name: "layernorm-affine",
    search: |eg, c| {
        let mut out = vec![];
        for add in ops(eg, c, "Add") {
            for (scaled, beta) in pairs(add) {
                for mul in ops(eg, scaled, "Mul") {
                    for (ln, g) in pairs(mul) {
                        for l in ops(eg, ln, "LayerNormalization") {
                            let plain = l.len() == 4
                                && konst(eg, l[2]).is_some_and(|t| all_equal(t, 1.0))
                                && konst(eg, l[3]).is_some_and(|t| all_equal(t, 0.0));
                            if plain {
                                out.push(vec![l[0], l[1], g, beta]);
                            }
                        }
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| {
        let Some(n) = last_dim(eg, b[1]) else { return vec![] };
        let (Some(g), Some(beta)) = (last_axis_const(eg, b[2], n), last_axis_const(eg, b[3], n)) else { return vec![] };
        if ty(eg, b[1]).map(|t| t.dtype) != Some(g.dtype()) || g.dtype() != beta.dtype() {
            return vec![];
        }
        let (g, beta) = (add_const(eg, g), add_const(eg, beta));
        let a = info(eg, &b[0..1]).map(|i| i.attrs.clone()).unwrap_or_default();
        let new = add_op(eg, "LayerNormalization", &[Some(b[1]), Some(g), Some(beta)], a);
        union_with(eg, root, new)
    },
};

/// `sqrt(mean(x²) + eps)` over the last axis in class `c`: the matching `(x, eps)`.
fn rms_denominators(eg: &Graph, c: Id) -> Vec<(Id, Id)> {
    let mut out = vec![];
    for sq in ops(eg, c, "Sqrt") {
        for add in ops(eg, sq[1], "Add") {
            for (ms, eps) in pairs(add) {
                if scalar(eg, eps).is_none() {
                    continue;
                }
                for p in reduce_last(eg, ms, "ReduceMean") {
                    for pw in ops(eg, p, "Pow") {
                        if scalar(eg, pw[2]) == Some(2.0) {
                            out.push((pw[1], eps));
                        }
                    }
                    for m in ops(eg, p, "Mul") {
                        if same(eg, m[1], m[2]) {
                            out.push((m[1], eps));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `x / sqrt(mean(x²) + eps)` (or `x · 1/sqrt(..)`) over the last axis →
/// `RMSNormalization(x, 1)`.
pub const RMSNORM: Rule = Rule {
    name: "rmsnorm",
    search: |eg, c| {
        let mut out = vec![];
        for div in ops(eg, c, "Div") {
            for (x, eps) in rms_denominators(eg, div[2]) {
                if same(eg, x, div[1]) {
                    out.push(vec![x, eps]);
                }
            }
        }
        for mul in ops(eg, c, "Mul") {
            for (x, r) in pairs(mul) {
                for rec in ops(eg, r, "Reciprocal") {
                    for (x2, eps) in rms_denominators(eg, rec[1]) {
                        if same(eg, x, x2) {
                            out.push(vec![x, eps]);
                        }
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| normalization(eg, root, "RMSNormalization", b[0], scalar(eg, b[1]).unwrap_or(1e-6)),
};

/// `RMSNormalization(x, 1)·w` with a constant `w` over the last axis → `RMSNormalization(x, w)`.
pub const RMSNORM_SCALE: Rule = Rule {
    name: "rmsnorm-scale",
    search: |eg, c| {
        let mut out = vec![];
        for mul in ops(eg, c, "Mul") {
            for (r, w) in pairs(mul) {
                for l in ops(eg, r, "RMSNormalization") {
                    if konst(eg, l[2]).is_some_and(|t| all_equal(t, 1.0)) {
                        out.push(vec![l[0], l[1], w]);
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| {
        let Some(n) = last_dim(eg, b[1]) else { return vec![] };
        let Some(w) = last_axis_const(eg, b[2], n) else { return vec![] };
        if ty(eg, b[1]).map(|t| t.dtype) != Some(w.dtype()) {
            return vec![];
        }
        let w = add_const(eg, w);
        let a = info(eg, &b[0..1]).map(|i| i.attrs.clone()).unwrap_or_default();
        let new = add_op(eg, "RMSNormalization", &[Some(b[1]), Some(w)], a);
        union_with(eg, root, new)
    },
};

/// Classes `x` such that class `c` is `x/√2` or `x·(1/√2)`.
fn over_sqrt2(eg: &Graph, c: Id) -> Vec<Id> {
    let mut out = vec![];
    for d in ops(eg, c, "Div") {
        if scalar(eg, d[2]).is_some_and(|v| close(v, std::f64::consts::SQRT_2)) {
            out.push(d[1]);
        }
    }
    for m in ops(eg, c, "Mul") {
        for (x, k) in pairs(m) {
            if scalar(eg, k).is_some_and(|v| close(v, std::f64::consts::FRAC_1_SQRT_2)) {
                out.push(x);
            }
        }
    }
    out
}

/// Classes `x` such that class `c` is `1 + erf(x/√2)`.
fn one_plus_erf(eg: &Graph, c: Id) -> Vec<Id> {
    let mut out = vec![];
    for add in ops(eg, c, "Add") {
        for (e, one) in pairs(add) {
            if scalar(eg, one) != Some(1.0) {
                continue;
            }
            for erf in ops(eg, e, "Erf") {
                out.extend(over_sqrt2(eg, erf[1]));
            }
        }
    }
    out
}

/// `x·(1 + erf(x/√2))·0.5` in its usual export orders → `Gelu(x)`.
pub const GELU_ERF: Rule = Rule {
    name: "gelu-erf",
    search: |eg, c| {
        let mut out = vec![];
        for outer in ops(eg, c, "Mul") {
            for (p, q) in pairs(outer) {
                // (x·(1+erf)) · 0.5
                if scalar(eg, q) == Some(0.5) {
                    for inner in ops(eg, p, "Mul") {
                        for (x, e) in pairs(inner) {
                            if one_plus_erf(eg, e).iter().any(|&x2| same(eg, x, x2)) {
                                out.push(vec![x]);
                            }
                        }
                    }
                }
                // (x·0.5) · (1+erf)
                for inner in ops(eg, p, "Mul") {
                    for (x, h) in pairs(inner) {
                        if scalar(eg, h) == Some(0.5) && one_plus_erf(eg, q).iter().any(|&x2| same(eg, x, x2)) {
                            out.push(vec![x]);
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    },
    apply: |eg, root, b| {
        if !is_float(eg, b[0]) {
            return vec![];
        }
        let new = add_op(eg, "Gelu", &[Some(b[0])], Attrs::new());
        union_with(eg, root, new)
    },
};

/// `x·sigmoid(x)` → `Swish(x)` (SiLU).
pub const SILU: Rule = Rule {
    name: "silu",
    search: |eg, c| {
        let mut out = vec![];
        for m in ops(eg, c, "Mul") {
            for (x, s) in pairs(m) {
                if ops(eg, s, "Sigmoid").any(|sg| same(eg, sg[1], x)) {
                    out.push(vec![x]);
                }
            }
        }
        out.sort();
        out.dedup();
        out
    },
    apply: |eg, root, b| {
        if !is_float(eg, b[0]) {
            return vec![];
        }
        let new = add_op(eg, "Swish", &[Some(b[0])], Attrs::new());
        union_with(eg, root, new)
    },
};

/// `exp(x - max(x)) / sum(exp(x - max(x)))` (or without the max) over the last axis →
/// `Softmax(x, axis=-1)`.
pub const SOFTMAX: Rule = Rule {
    name: "softmax",
    search: |eg, c| {
        let mut out = vec![];
        for div in ops(eg, c, "Div") {
            let (e, s) = (div[1], div[2]);
            if !reduce_last(eg, s, "ReduceSum").iter().any(|&i| same(eg, i, e)) {
                continue;
            }
            for exp in ops(eg, e, "Exp") {
                let arg = exp[1];
                let mut xs = vec![arg];
                for sub in ops(eg, arg, "Sub") {
                    if reduce_last(eg, sub[2], "ReduceMax").iter().any(|&i| same(eg, i, sub[1])) {
                        xs.push(sub[1]);
                    }
                }
                out.extend(xs.into_iter().map(|x| vec![x]));
            }
        }
        out
    },
    apply: |eg, root, b| {
        if !is_float(eg, b[0]) {
            return vec![];
        }
        let mut a = Attrs::new();
        a.insert("axis".into(), Attr::Int(-1));
        let new = add_op(eg, "Softmax", &[Some(b[0])], a);
        union_with(eg, root, new)
    },
};

/// Softmax over the last axis in class `c`: its input.
fn softmax_last(eg: &Graph, c: Id) -> Vec<Id> {
    ops(eg, c, "Softmax")
        .filter_map(|ch| {
            let r = rank(eg, ch[1])? as i64;
            let default = if eg.analysis.opset >= 13 { -1 } else { 1 };
            let axis = attrs(eg, ch).int("axis", default).ok()?;
            (axis == -1 || axis == r - 1 || (r == 2 && axis == 1)).then_some(ch[1])
        })
        .collect()
}

/// Attention pads a mask shorter than the key length with -inf, where `Where` and `Add`
/// broadcast it: a mask stands for itself only if it has a last dim (rank 1 or more) that is
/// not 1 broadcast over several keys (`kt` is `Kᵀ`, keys last).
fn spans_keys(eg: &Graph, mask: Id, kt: Id) -> bool {
    let (Some(m), Some(k)) = (ty(eg, mask), ty(eg, kt)) else { return false };
    match (m.shape.as_ref().and_then(|s| s.last()), k.shape.as_ref().and_then(|s| s.last())) {
        (Some(ml), Some(t)) => ml.known() != Some(1) || t.known() == Some(1),
        _ => false,
    }
}

/// `softmax(mask(scale(Q·Kᵀ)))·V` on 4-D `[B, H, S, D]` operands → `Attention(Q, K, V, mask)`.
/// The mask is `Where(m, s, -inf)` (boolean) or `s + m` (additive) with a constant `m`; the
/// scale is a constant divisor or factor. `Kᵀ` becomes a Transpose of the given operand,
/// which composes with the head-split transposes (see [`TRANSPOSE_TRANSPOSE`]).
pub const ATTENTION: Rule = Rule {
    name: "attention",
    search: |eg, c| {
        let mut out = vec![];
        for pv in ops(eg, c, "MatMul") {
            let v = pv[2];
            for masked in softmax_last(eg, pv[1]) {
                // (scores, mask or absent marker, kind: 0 none / 1 bool / 2 additive, the
                // bool mask's fill or the absent marker)
                let mut cands: Vec<(Id, Option<Id>, usize, Id)> = vec![(masked, None, 0, c)];
                let same_ty = |x: Id| fits(eg, x, masked);
                for w in ops(eg, masked, "Where") {
                    let neg = scalar(eg, w[3]).is_some_and(|x| x <= -1e9);
                    if neg && ty(eg, w[1]).is_some_and(|t| t.dtype == DType::Bool) && same_ty(w[2]) {
                        cands.push((w[2], Some(w[1]), 1, w[3]));
                    }
                }
                for add in ops(eg, masked, "Add") {
                    for (s, m) in pairs(add) {
                        if same_ty(s) && rank(eg, m).is_some_and(|r| r >= 2) {
                            cands.push((s, Some(m), 2, c));
                        }
                    }
                }
                for (scores, mask, kind, fill) in cands {
                    // (qk, scale class or qk itself, 0 none / 1 div / 2 mul)
                    let mut scaled: Vec<(Id, Id, usize)> = vec![(scores, scores, 0)];
                    for d in ops(eg, scores, "Div") {
                        if scalar(eg, d[2]).is_some() {
                            scaled.push((d[1], d[2], 1));
                        }
                    }
                    for m in ops(eg, scores, "Mul") {
                        for (s, k) in pairs(m) {
                            if scalar(eg, k).is_some() {
                                scaled.push((s, k, 2));
                            }
                        }
                    }
                    for (qk, sc, how) in scaled {
                        for mm in ops(eg, qk, "MatMul") {
                            let (q, kt) = (mm[1], mm[2]);
                            if [q, kt, v].iter().all(|&t| rank(eg, t) == Some(4)) {
                                let m = mask.unwrap_or(c);
                                out.push(vec![q, kt, v, m, kind.into(), sc, how.into(), fill]);
                            }
                        }
                    }
                }
            }
        }
        out
    },
    apply: |eg, root, b| {
        let (q, kt, v, mask, kind, sc, how, fill) =
            (b[0], b[1], b[2], b[3], usize::from(b[4]), b[5], usize::from(b[6]), b[7]);
        let dt = ty(eg, q).map(|t| t.dtype);
        if !dt.is_some_and(|d| d.is_float()) || ty(eg, kt).map(|t| t.dtype) != dt || ty(eg, v).map(|t| t.dtype) != dt {
            return vec![];
        }
        let scale = match how {
            0 => 1.0,
            1 => 1.0 / scalar(eg, sc).unwrap_or(1.0),
            _ => scalar(eg, sc).unwrap_or(1.0),
        };
        if !scale.is_finite() {
            return vec![];
        }
        let mut ta = Attrs::new();
        ta.insert("perm".into(), Attr::Ints(vec![0, 1, 3, 2]));
        let k = add_op(eg, "Transpose", &[Some(kt)], ta);
        let mut a = Attrs::new();
        a.insert("scale".into(), float_attr(scale));
        let m = match kind {
            1 | 2 => {
                let want = if kind == 1 { Some(DType::Bool) } else { dt };
                if ty(eg, mask).map(|t| t.dtype) != want || !spans_keys(eg, mask, kt) {
                    return vec![];
                }
                // A constant boolean mask becomes the additive one it stands for (0 where
                // kept, the fill elsewhere), folded at compile time: kernels then add it.
                match (kind, dt, konst(eg, mask).is_some()) {
                    (1, Some(dt), true) => {
                        let zero = add_const(eg, Tensor::from_f64(dt, &[], vec![0.0]));
                        Some(add_op(eg, "Where", &[Some(mask), Some(zero), Some(fill)], Attrs::new()))
                    }
                    _ => Some(mask),
                }
            }
            _ => None,
        };
        let mut operands = vec![Some(q), Some(k), Some(v)];
        if m.is_some() {
            operands.push(m);
        }
        let new = add_op(eg, "Attention", &operands, a);
        union_with(eg, root, new)
    },
};
