//! ONNX `ModelProto` → graph-dialect [`Module`].
//!
//! Each node becomes one `graph.<OpType>` op whose result types come from the op's shape rule;
//! initializers become `graph.Constant` ops; graph attributes (If/Loop/Scan bodies) become
//! regions. Nodes whose inputs are all constants are evaluated at import (constant folding of
//! shape subgraphs: `Shape → Gather → Concat → Reshape` chains collapse to constants), and
//! `Shape`/`Size` of statically shaped values fold too, so later shape rules see exact shapes.

use crate::proto::{
    attribute_proto::AttributeType, type_proto, GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto,
};
use crate::tensor_io::tensor_from_proto;
use crate::FrontendError;
use kiln_ir::graph::{lookup, EvalCx, InferCx, OpResult, SymInt};
use kiln_ir::ir::NODE_NAME_ATTR;
use kiln_ir::tensor::MAX_ELEMENTS;
use kiln_ir::{Attr, Attrs, Block, DType, Dim, Module, Region, Tensor, TensorType, ValueId};
use std::collections::HashMap;
use std::path::Path;

/// Ops that are never folded: their result is not a function of their inputs alone.
const NONDETERMINISTIC: &[&str] =
    &["RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"];

/// Folded constants larger than this many elements stay as ops (evaluated at run time).
const MAX_FOLD_ELEMENTS: usize = 1 << 26;

/// The newest default-domain opset kiln knows (onnx 1.23.2 writes up to 28).
pub const MAX_OPSET: i64 = 28;
/// The oldest default-domain opset kiln accepts.
pub const MIN_OPSET: i64 = 1;

/// Imports a decoded model. `model_name` is used in messages; `base_dir` resolves external data.
pub fn import_model(model: &ModelProto, model_name: &str, base_dir: Option<&Path>) -> Result<Module, FrontendError> {
    let invalid = |msg: String| FrontendError::Invalid { model: model_name.to_string(), msg };
    let Some(graph) = &model.graph else { return Err(invalid("the model has no graph".into())) };
    let mut opset = None;
    for o in &model.opset_import {
        match o.domain.as_deref() {
            None | Some("") | Some("ai.onnx") => opset = o.version,
            _ => {}
        }
    }
    // IR version 3 and older models may omit opset_import; ONNX then means opset 1.
    let opset = opset.unwrap_or(1);
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        return Err(invalid(format!(
            "default-domain opset {opset} is not supported (kiln reads {MIN_OPSET} to {MAX_OPSET})"
        )));
    }
    let mut unsupported = Vec::new();
    collect_unsupported(graph, &mut unsupported);
    if !unsupported.is_empty() {
        return Err(FrontendError::Unsupported { model: model_name.to_string(), ops: unsupported });
    }
    let mut m = Module::new(model_name);
    if let Some(g) = graph.name.as_deref().filter(|n| !n.is_empty()) {
        m.attrs.insert("kiln.graph_name".into(), Attr::Str(g.to_string()));
    }
    m.attrs.insert("kiln.opset".into(), Attr::Int(opset));
    if let Some(p) = &model.producer_name {
        m.attrs.insert("kiln.producer".into(), Attr::Str(p.clone()));
    }
    let mut imp = Importer {
        m,
        model_name: model_name.to_string(),
        base_dir,
        opset,
        sym_values: HashMap::new(),
        next_dim: 0,
        scopes: vec![HashMap::new()],
    };
    let body = imp.import_graph(graph, true, &[])?;
    imp.m.body = body;
    Ok(imp.m)
}

/// Lists every node (subgraphs included) whose op kiln cannot represent.
pub fn collect_unsupported(g: &GraphProto, out: &mut Vec<(String, String)>) {
    for n in &g.node {
        let op = n.op_type.clone().unwrap_or_default();
        let domain = n.domain.as_deref().unwrap_or("");
        let known = matches!(domain, "" | "ai.onnx") && lookup(&op).is_some();
        if !known {
            let full = if matches!(domain, "" | "ai.onnx") { op } else { format!("{domain}.{op}") };
            out.push((n.name.clone().unwrap_or_default(), full));
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                collect_unsupported(sub, out);
            }
        }
    }
}

pub(crate) struct Importer<'a> {
    pub(crate) m: Module,
    pub(crate) model_name: String,
    pub(crate) base_dir: Option<&'a Path>,
    pub(crate) opset: i64,
    /// Integer values known element-wise, some elements symbolic dims (see [`crate::symbolic`]).
    pub(crate) sym_values: HashMap<ValueId, Vec<SymInt>>,
    pub(crate) next_dim: u32,
    /// Name → value, innermost scope last (subgraphs see outer names).
    pub(crate) scopes: Vec<HashMap<String, ValueId>>,
}

impl Importer<'_> {
    fn node_err(&self, n: &NodeProto, msg: impl Into<String>) -> FrontendError {
        self.node_error(n.name.as_deref().unwrap_or_default(), n.op_type.as_deref().unwrap_or_default(), msg)
    }

    pub(crate) fn node_error(&self, node: &str, op: &str, msg: impl Into<String>) -> FrontendError {
        FrontendError::Node {
            model: self.model_name.clone(),
            node: node.to_string(),
            op: op.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(&self, msg: String) -> FrontendError {
        FrontendError::Invalid { model: self.model_name.clone(), msg }
    }

    /// The contents of a value known at compile time: the `value` of the `graph.Constant`
    /// that defines it (initializers and folded nodes are such constants).
    fn const_value(&self, v: ValueId) -> Option<&Tensor> {
        let kiln_ir::ValueDef::OpResult(o, 0) = self.m.value(v).def else { return None };
        let op = self.m.op(o);
        match op.attrs.get("value") {
            Some(Attr::Tensor(t)) if op.name == "graph.Constant" => Some(t),
            _ => None,
        }
    }

    pub(crate) fn lookup_name(&self, name: &str) -> Option<ValueId> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }

    pub(crate) fn define(&mut self, name: &str, v: ValueId) {
        if !name.is_empty() {
            self.m.value_mut(v).name = Some(name.to_string());
            self.scopes.last_mut().expect("scope").insert(name.to_string(), v);
        }
    }

    fn fresh_dim(&mut self) -> Dim {
        self.next_dim += 1;
        Dim::sym(&format!("unk{}", self.next_dim))
    }

    /// A value's type from its declared `TypeProto`.
    fn type_of(&mut self, vi: &ValueInfoProto, what: &str) -> Result<TensorType, FrontendError> {
        let name = vi.name.as_deref().unwrap_or("");
        let tp: Option<&TypeProto> = vi.r#type.as_ref();
        let Some(type_proto::Value::TensorType(tt)) = tp.and_then(|t| t.value.as_ref()) else {
            let kind = match tp.and_then(|t| t.value.as_ref()) {
                Some(type_proto::Value::SequenceType(_)) => "a sequence",
                Some(type_proto::Value::OptionalType(_)) => "an optional",
                Some(type_proto::Value::MapType(_)) => "a map",
                Some(type_proto::Value::SparseTensorType(_)) => "a sparse tensor",
                _ => "an untyped value",
            };
            return Err(self.invalid(format!("{what} '{name}' is {kind}; kiln supports tensors only")));
        };
        let code = tt.elem_type.unwrap_or(0) as i64;
        let Some(dtype) = DType::from_onnx_code(code) else {
            return Err(self.invalid(format!(
                "{what} '{name}' has element type {}, which kiln does not support",
                DType::onnx_code_name(code)
            )));
        };
        let Some(shape) = &tt.shape else { return Ok(TensorType::unranked(dtype)) };
        let mut dims = Vec::new();
        for d in &shape.dim {
            use crate::proto::tensor_shape_proto::dimension::Value;
            dims.push(match &d.value {
                Some(Value::DimValue(v)) if *v >= 0 => Dim::Known(*v as u64),
                Some(Value::DimValue(v)) => {
                    return Err(self.invalid(format!("{what} '{name}' has negative dimension {v}")));
                }
                Some(Value::DimParam(p)) if !p.is_empty() => Dim::sym(p),
                _ => self.fresh_dim(),
            });
        }
        let ty = TensorType::new(dtype, dims);
        check_size(&ty).map_err(|e| self.invalid(format!("{what} '{name}': {e}")))?;
        Ok(ty)
    }

    /// Adds a `graph.Constant` op holding `t` to `block`.
    pub(crate) fn add_const(&mut self, block: &mut Block, t: Tensor, node_name: &str) -> ValueId {
        let mut attrs = Attrs::new();
        let ty = TensorType::known(t.dtype(), &t.shape);
        attrs.insert("value".into(), Attr::Tensor(t));
        if !node_name.is_empty() {
            attrs.insert(NODE_NAME_ATTR.into(), Attr::Str(node_name.to_string()));
        }
        let op = self.m.create_op("graph.Constant", vec![], vec![ty], attrs, vec![]);
        block.ops.push(op);
        self.m.op(op).results[0]
    }

    /// Imports a graph into a block: the main function body or a subgraph region.
    /// `hints` types the subgraph inputs that the model leaves untyped (ONNX allows that for
    /// Loop and Scan bodies: their types follow from the op's operands).
    fn import_graph(&mut self, g: &GraphProto, is_main: bool, hints: &[TensorType]) -> Result<Block, FrontendError> {
        let mut block = Block::default();
        let mut init_names = std::collections::HashSet::new();
        for init in &g.initializer {
            let name = init.name.clone().unwrap_or_default();
            let t = tensor_from_proto(init, self.base_dir, &format!("initializer '{name}'"))
                .map_err(|msg| self.invalid(msg))?;
            let v = self.add_const(&mut block, t, &name);
            self.define(&name, v);
            init_names.insert(name);
        }
        for inp in &g.input {
            let name = inp.name.clone().unwrap_or_default();
            // IR v3 and older list initializers among the inputs: they are weights, not inputs.
            if is_main && init_names.contains(&name) {
                continue;
            }
            let untyped = inp.r#type.as_ref().and_then(|t| t.value.as_ref()).is_none();
            let hint = hints.get(block.args.len());
            let ty = match (untyped, hint) {
                (true, Some(h)) => h.clone(),
                _ => self.type_of(inp, if is_main { "input" } else { "subgraph input" })?,
            };
            let v = self.m.add_arg(ty, Some(name.clone()));
            block.args.push(v);
            self.define(&name, v);
        }
        for n in &g.node {
            self.import_node(n, &mut block)?;
        }
        for out in &g.output {
            let name = out.name.clone().unwrap_or_default();
            let Some(v) = self.lookup_name(&name) else {
                return Err(self.invalid(format!("graph output '{name}' is not produced by any node")));
            };
            block.yields.push(v);
        }
        Ok(block)
    }

    fn import_node(&mut self, n: &NodeProto, block: &mut Block) -> Result<(), FrontendError> {
        let op_type = n.op_type.clone().unwrap_or_default();
        if lookup(&op_type).is_none() {
            return Err(self.node_err(n, "unsupported op"));
        }
        if op_type == "If" && self.inline_constant_if(n, block)? {
            return Ok(());
        }
        let mut operands = Vec::new();
        for name in &n.input {
            if name.is_empty() {
                operands.push(None);
                continue;
            }
            match self.lookup_name(name) {
                Some(v) => operands.push(Some(v)),
                None => {
                    return Err(self.node_err(
                        n,
                        format!("input '{name}' is not a graph input, an initializer or an earlier node's output"),
                    ))
                }
            }
        }
        // Trailing omitted optional inputs carry no meaning.
        while operands.last() == Some(&None) {
            operands.pop();
        }
        let mut attrs = Attrs::new();
        let mut regions = Vec::new();
        for a in &n.attribute {
            let name = a.name.clone().unwrap_or_default();
            let attr = self.convert_attr(n, a, &mut regions)?;
            attrs.insert(name, attr);
        }
        let node = n.name.clone().unwrap_or_default();
        if op_type == "PRelu" && self.opset < 7 {
            self.legacy_prelu_slope(block, &node, &mut operands);
        }
        self.add_node(block, &node, &op_type, operands, attrs, regions, &n.output)
    }

    /// Before opset 7, a 1-D PRelu slope of the input's channel count applied per channel
    /// (axis 1), not by trailing-axis broadcasting: a constant slope is reshaped to `[C, 1, ...]`.
    fn legacy_prelu_slope(&mut self, block: &mut Block, node: &str, operands: &mut [Option<ValueId>]) {
        let (Some(Some(x)), Some(Some(slope))) = (operands.first(), operands.get(1)) else { return };
        let Some(x_shape) = self.m.value(*x).ty.shape.clone() else { return };
        let Some(t) = self.const_value(*slope).cloned() else { return };
        let channels = x_shape.get(1).and_then(|d| d.known());
        if x_shape.len() > 2 && t.rank() == 1 && t.len() > 1 && channels == Some(t.len() as u64) {
            let mut shape = vec![t.len()];
            shape.resize(x_shape.len() - 1, 1);
            operands[1] = Some(self.add_const(block, t.reshaped(shape), &format!("{node}.slope")));
        }
    }

    /// Adds one node (its operands resolved, attributes converted): infers its result types
    /// with the op's shape rule, folds it when its result is known, and names its outputs.
    /// Shared by the ONNX importer and [`crate::builder::GraphBuilder`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_node(
        &mut self,
        block: &mut Block,
        node: &str,
        op_type: &str,
        operands: Vec<Option<ValueId>>,
        mut attrs: Attrs,
        regions: Vec<Region>,
        outputs: &[String],
    ) -> Result<(), FrontendError> {
        let def = lookup(op_type).ok_or_else(|| self.node_error(node, op_type, "unsupported op"))?;
        if !node.is_empty() {
            attrs.insert(NODE_NAME_ATTR.into(), Attr::Str(node.to_string()));
        }
        if !regions.is_empty() {
            // Control-flow result dtypes come from the body's yields (the shape rule cannot see them).
            let skip = usize::from(op_type == "Loop");
            let dtypes: Vec<String> = regions[0]
                .blocks
                .first()
                .map(|b: &Block| {
                    b.yields.iter().skip(skip).map(|&v| self.m.value(v).ty.dtype.onnx_name().to_string()).collect()
                })
                .unwrap_or_default();
            attrs.insert("kiln.result_dtypes".into(), Attr::Strs(dtypes));
        }
        let in_types: Vec<Option<TensorType>> =
            operands.iter().map(|o| o.map(|v| self.m.value(v).ty.clone())).collect();
        let const_vals: Vec<Option<&Tensor>> = operands.iter().map(|o| o.and_then(|v| self.const_value(v))).collect();
        let shape_vals: Vec<Option<Vec<SymInt>>> = operands
            .iter()
            .map(|o| {
                let v = (*o)?;
                match self.const_value(v) {
                    Some(t) if t.dtype().is_int() && t.len() <= 64 => {
                        Some(t.to_i64().into_iter().map(SymInt::Int).collect())
                    }
                    _ => self.sym_values.get(&v).cloned(),
                }
            })
            .collect();
        let num_outputs = outputs.len();
        let mut next_dim = self.next_dim;
        let types = {
            let cx = InferCx::new(&attrs, &in_types, &const_vals, num_outputs, self.opset, &regions, &mut next_dim);
            def.infer(&mut cx.with_shape_values(&shape_vals))
        };
        self.next_dim = next_dim;
        let mut types = types.map_err(|e| self.node_error(node, op_type, e.0))?;
        if types.len() < num_outputs {
            return Err(self.node_error(
                node,
                op_type,
                format!("the op has {} outputs, the node names {num_outputs}", types.len()),
            ));
        }
        types.truncate(num_outputs);
        for t in &types {
            check_size(t).map_err(|e| self.node_error(node, op_type, e))?;
        }

        // Constant folding.
        if let Some(folded) = self.try_fold(def, op_type, &attrs, &operands, &types, num_outputs) {
            let outs = folded.map_err(|e| self.node_error(node, op_type, e.0))?;
            for (i, (name, t)) in outputs.iter().zip(outs).enumerate() {
                if t.dtype() != types[i].dtype {
                    return Err(self.node_error(
                        node,
                        op_type,
                        format!("output {i} is {}, its shape rule says {}", t.dtype(), types[i].dtype),
                    ));
                }
                let v = self.add_const(block, t, node);
                self.define(name, v);
            }
            return Ok(());
        }
        let sym = crate::symbolic::propagate(op_type, &attrs, self.opset, &shape_vals, &in_types);
        let op = self.m.create_op(&format!("graph.{op_type}"), operands, types, attrs, regions);
        block.ops.push(op);
        let results = self.m.op(op).results.clone();
        if let (Some(sym), Some(&r)) = (sym, results.first()) {
            self.sym_values.insert(r, sym);
        }
        for (name, v) in outputs.iter().zip(results) {
            self.define(name, v);
        }
        Ok(())
    }

    /// An `If` whose condition is a constant is replaced by the branch it takes: that branch's
    /// nodes are imported in place (the other branch, which may not even be valid for these
    /// shapes, is dropped). Returns whether it inlined.
    fn inline_constant_if(&mut self, n: &NodeProto, block: &mut Block) -> Result<bool, FrontendError> {
        let cond = n.input.first().and_then(|c| self.lookup_name(c));
        let Some(taken) = cond.and_then(|v| self.const_value(v)).and_then(|t| t.to_bool().first().copied()) else {
            return Ok(false);
        };
        let want = if taken { "then_branch" } else { "else_branch" };
        let Some(g) = n.attribute.iter().find(|a| a.name.as_deref() == Some(want)).and_then(|a| a.g.as_ref()) else {
            return Ok(false);
        };
        if g.output.len() != n.output.len() {
            return Err(self.node_err(n, format!("{want} has {} outputs, the node {}", g.output.len(), n.output.len())));
        }
        self.scopes.push(HashMap::new());
        let inner = (|| {
            let mut b = Block::default();
            for init in &g.initializer {
                let name = init.name.clone().unwrap_or_default();
                let t = tensor_from_proto(init, self.base_dir, &format!("initializer '{name}'"))
                    .map_err(|msg| self.invalid(msg))?;
                let v = self.add_const(&mut b, t, &name);
                self.define(&name, v);
            }
            for inner in &g.node {
                self.import_node(inner, &mut b)?;
            }
            g.output
                .iter()
                .map(|o| {
                    let name = o.name.clone().unwrap_or_default();
                    self.lookup_name(&name)
                        .ok_or_else(|| self.node_err(n, format!("{want} output '{name}' is not produced by any node")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|outs| (b, outs))
        })();
        self.scopes.pop();
        let (b, outs) = inner?;
        block.ops.extend(b.ops);
        for (name, v) in n.output.iter().zip(outs) {
            if !name.is_empty() {
                // The If's output is the branch's value; the first name given to a value is kept.
                self.scopes.last_mut().expect("scope").insert(name.clone(), v);
                if self.m.value(v).name.is_none() {
                    self.m.value_mut(v).name = Some(name.clone());
                }
            }
        }
        Ok(true)
    }

    /// Evaluates a node at import when its result is known: all inputs constant, or a
    /// `Shape`/`Size` of a statically shaped value. `None`: not foldable.
    fn try_fold(
        &self,
        def: &'static dyn kiln_ir::graph::OpDef,
        op_type: &str,
        attrs: &Attrs,
        operands: &[Option<ValueId>],
        types: &[TensorType],
        num_outputs: usize,
    ) -> Option<OpResult<Vec<Tensor>>> {
        if NONDETERMINISTIC.contains(&op_type) {
            return None;
        }
        let has_regions = attrs.values().any(|a| matches!(a, Attr::Region(_)));
        if has_regions {
            return None;
        }
        let small = types.iter().all(|t| t.num_elements().is_some_and(|n| n as usize <= MAX_FOLD_ELEMENTS));
        if !small {
            return None;
        }
        let inputs: Vec<Option<&Tensor>> = operands.iter().map(|o| o.and_then(|v| self.const_value(v))).collect();
        let all_const = operands.iter().zip(&inputs).all(|(o, t)| o.is_none() || t.is_some());
        let cx = EvalCx {
            attrs: kiln_ir::graph::AttrView(attrs),
            num_outputs,
            opset: self.opset,
            regions: &[],
            runner: &kiln_ir::graph::NoRegions,
        };
        if all_const {
            return Some(def.eval(&cx, &inputs));
        }
        if matches!(op_type, "Shape" | "Size") {
            let v = operands.first().copied().flatten()?;
            let shape = self.m.value(v).ty.static_shape()?;
            // Shape and Size read only the shape: evaluate them on an empty stand-in of that rank.
            let dummy = Tensor { shape: shape.clone(), data: kiln_ir::Data::zeros(DType::Bool, 0) };
            return Some(def.eval(&cx, &[Some(&dummy)]));
        }
        None
    }

    /// Types of a control-flow body's inputs implied by the op's operands.
    fn subgraph_hints(&self, n: &NodeProto) -> Vec<TensorType> {
        let operand = |name: &String| {
            self.lookup_name(name).map(|v| self.m.value(v).ty.clone()).unwrap_or(TensorType::unranked(DType::F32))
        };
        match n.op_type.as_deref() {
            // Loop body: (iteration_num: i64 scalar, cond: bool scalar, loop-carried values...).
            Some("Loop") => {
                let mut h = vec![TensorType::known(DType::I64, &[]), TensorType::known(DType::Bool, &[])];
                h.extend(n.input.iter().skip(2).map(operand));
                h
            }
            // Scan body: (state values..., one slice of each scan input): element types carry over.
            Some("Scan") => {
                n.input.iter().filter(|i| !i.is_empty()).map(|i| TensorType::unranked(operand(i).dtype)).collect()
            }
            _ => vec![],
        }
    }

    fn convert_attr(
        &mut self,
        n: &NodeProto,
        a: &crate::proto::AttributeProto,
        regions: &mut Vec<Region>,
    ) -> Result<Attr, FrontendError> {
        let name = a.name.clone().unwrap_or_default();
        let ty = a.r#type.and_then(|t| AttributeType::try_from(t).ok());
        let ty = match ty {
            Some(t) if t != AttributeType::Undefined => t,
            // Old models may omit the type: infer it from the field that is set.
            _ => {
                if a.g.is_some() {
                    AttributeType::Graph
                } else if a.t.is_some() {
                    AttributeType::Tensor
                } else if a.s.is_some() {
                    AttributeType::String
                } else if a.f.is_some() {
                    AttributeType::Float
                } else if a.i.is_some() {
                    AttributeType::Int
                } else if !a.ints.is_empty() {
                    AttributeType::Ints
                } else if !a.floats.is_empty() {
                    AttributeType::Floats
                } else if !a.strings.is_empty() {
                    AttributeType::Strings
                } else {
                    AttributeType::Ints
                }
            }
        };
        Ok(match ty {
            AttributeType::Int => Attr::Int(a.i.unwrap_or(0)),
            AttributeType::Float => Attr::Float(a.f.unwrap_or(0.0)),
            AttributeType::String => Attr::Str(String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into_owned()),
            AttributeType::Ints => Attr::Ints(a.ints.clone()),
            AttributeType::Floats => Attr::Floats(a.floats.clone()),
            AttributeType::Strings => {
                Attr::Strs(a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
            }
            AttributeType::Tensor => {
                let t = a.t.as_ref().ok_or_else(|| self.node_err(n, format!("attribute '{name}' has no tensor")))?;
                let t = tensor_from_proto(t, self.base_dir, &format!("attribute '{name}'"))
                    .map_err(|msg| self.node_err(n, msg))?;
                Attr::Tensor(t)
            }
            AttributeType::Graph => {
                let g = a.g.as_ref().ok_or_else(|| self.node_err(n, format!("attribute '{name}' has no graph")))?;
                self.scopes.push(HashMap::new());
                let hints = self.subgraph_hints(n);
                let block = self.import_graph(g, false, &hints);
                self.scopes.pop();
                regions.push(Region { blocks: vec![block?] });
                Attr::Region(regions.len() as u32 - 1)
            }
            other => {
                return Err(self.node_err(n, format!("attribute '{name}' of kind {other:?} is not supported")));
            }
        })
    }
}

/// Refuses types whose static element count is beyond what kiln can hold.
fn check_size(t: &TensorType) -> Result<(), String> {
    if let Some(shape) = &t.shape {
        let mut n: u128 = 1;
        for d in shape {
            if let Dim::Known(k) = d {
                n = n.saturating_mul(*k as u128);
            }
        }
        if n > MAX_ELEMENTS {
            return Err(format!("type {t} has {n} elements, more than kiln's limit of 2^32"));
        }
    }
    Ok(())
}
