//! Building a graph-dialect model in code, without ONNX: what a framework uses to hand kiln its
//! own graph.
//!
//! A [`GraphBuilder`] takes the same ops, attributes and opset semantics as ONNX nodes, and
//! adds each node through the importer's own path: the op's shape rule gives the result types
//! (symbolic dims included), nodes whose inputs are known are folded, and every error names the
//! node and op. So a built graph and the same graph read from an ONNX file are the same module.
//!
//! ```
//! use kiln_onnx::builder::GraphBuilder;
//! use kiln_ir::{Attr, DType, Dim, Tensor, TensorType};
//!
//! let mut g = GraphBuilder::new("scaled_softmax");
//! let x = g.input("x", TensorType::new(DType::F32, vec![Dim::sym("N"), Dim::Known(4)]))?;
//! let s = g.constant("scale", Tensor::from_f32(&[], vec![0.5]));
//! let y = g.op("Mul", &[x, s])?;
//! let z = g.op_with("Softmax", &[y], [("axis", Attr::Int(-1))])?;
//! g.output(z, "probs")?;
//! let model = g.finish()?;
//! assert_eq!(model.outputs().len(), 1);
//! # Ok::<(), kiln_onnx::FrontendError>(())
//! ```

use crate::import::{Importer, MAX_OPSET, MIN_OPSET};
use crate::FrontendError;
use kiln_ir::{Attr, Attrs, Block, Module, Tensor, TensorType, ValueId};
use std::collections::HashMap;

/// Builds a model node by node (see the [module docs](self)).
pub struct GraphBuilder {
    imp: Importer<'static>,
    block: Block,
    /// Nodes added so far (names the next node and its unnamed outputs).
    nodes: usize,
}

impl GraphBuilder {
    /// A builder for a model named `name` with the newest default-domain opset kiln reads.
    pub fn new(name: &str) -> GraphBuilder {
        let imp = Importer {
            m: Module::new(name),
            model_name: name.to_string(),
            base_dir: None,
            opset: MAX_OPSET,
            sym_values: HashMap::new(),
            next_dim: 0,
            scopes: vec![HashMap::new()],
        };
        let mut b = GraphBuilder { imp, block: Block::default(), nodes: 0 };
        b.imp.m.attrs.insert("kiln.opset".into(), Attr::Int(MAX_OPSET));
        b.imp.m.attrs.insert("kiln.producer".into(), Attr::Str("kiln::GraphBuilder".into()));
        b
    }

    /// Sets the default-domain opset whose op semantics the nodes follow (before adding any).
    pub fn opset(mut self, opset: i64) -> Result<GraphBuilder, FrontendError> {
        if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
            return Err(self.imp.invalid(format!(
                "default-domain opset {opset} is not supported (kiln reads {MIN_OPSET} to {MAX_OPSET})"
            )));
        }
        self.imp.opset = opset;
        self.imp.m.attrs.insert("kiln.opset".into(), Attr::Int(opset));
        Ok(self)
    }

    fn check_new_name(&self, name: &str, what: &str) -> Result<(), FrontendError> {
        if name.is_empty() {
            return Err(self.imp.invalid(format!("{what} needs a name")));
        }
        if self.imp.lookup_name(name).is_some() {
            return Err(self.imp.invalid(format!("{what} '{name}': the name is already used in this graph")));
        }
        Ok(())
    }

    /// Declares a model input (what a caller provides at run time). Dims may be symbolic
    /// (`Dim::sym("N")`): the compiled model then runs at any size.
    pub fn input(&mut self, name: &str, ty: TensorType) -> Result<ValueId, FrontendError> {
        self.check_new_name(name, "input")?;
        let v = self.imp.m.add_arg(ty, Some(name.to_string()));
        self.block.args.push(v);
        self.imp.define(name, v);
        Ok(v)
    }

    /// A constant (weights, shapes): an initializer in ONNX terms.
    pub fn constant(&mut self, name: &str, t: Tensor) -> ValueId {
        let name = if name.is_empty() || self.imp.lookup_name(name).is_some() {
            format!("const_{}", self.imp.m.values.len())
        } else {
            name.to_string()
        };
        let v = self.imp.add_const(&mut self.block, t, &name);
        self.imp.define(&name, v);
        v
    }

    /// Adds a node of `op_type` with no attributes and one output; returns that output.
    pub fn op(&mut self, op_type: &str, inputs: &[ValueId]) -> Result<ValueId, FrontendError> {
        self.op_with(op_type, inputs, [])
    }

    /// Adds a node of `op_type` with attributes and one output; returns that output.
    pub fn op_with<'a>(
        &mut self,
        op_type: &str,
        inputs: &[ValueId],
        attrs: impl IntoIterator<Item = (&'a str, Attr)>,
    ) -> Result<ValueId, FrontendError> {
        let inputs: Vec<Option<ValueId>> = inputs.iter().copied().map(Some).collect();
        let attrs = attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Ok(self.node(op_type, &inputs, attrs, 1)?[0])
    }

    /// Adds a node in full: optional inputs may be omitted (`None`), and it has `outputs`
    /// results (ops such as `Split` or `LayerNormalization` have several). Returns them.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[Option<ValueId>],
        attrs: Attrs,
        outputs: usize,
    ) -> Result<Vec<ValueId>, FrontendError> {
        let node = format!("{op_type}_{}", self.nodes);
        self.nodes += 1;
        let known = self.imp.m.values.len();
        if let Some(bad) = inputs.iter().flatten().find(|v| v.0 as usize >= known) {
            return Err(self.imp.node_error(&node, op_type, format!("input %{} is not a value of this graph", bad.0)));
        }
        if outputs == 0 {
            return Err(self.imp.node_error(&node, op_type, "a node needs at least one output"));
        }
        let mut operands = inputs.to_vec();
        while operands.last() == Some(&None) {
            operands.pop();
        }
        let names: Vec<String> = (0..outputs).map(|i| format!("{node}:{i}")).collect();
        let mut block = std::mem::take(&mut self.block);
        let r = self.imp.add_node(&mut block, &node, op_type, operands, attrs, vec![], &names);
        self.block = block;
        r?;
        Ok(names.iter().map(|n| self.imp.lookup_name(n).expect("node outputs are defined")).collect())
    }

    /// Marks `v` as a model output named `name`.
    pub fn output(&mut self, v: ValueId, name: &str) -> Result<(), FrontendError> {
        if v.0 as usize >= self.imp.m.values.len() {
            return Err(self.imp.invalid(format!("output '{name}': %{} is not a value of this graph", v.0)));
        }
        // An input or an output already named keeps its name: the new output is a copy.
        let v =
            if self.block.args.contains(&v) || self.block.yields.contains(&v) { self.op("Identity", &[v])? } else { v };
        if self.imp.lookup_name(name).is_some_and(|w| w != v) {
            return Err(self.imp.invalid(format!("output '{name}': the name is already used in this graph")));
        }
        if name.is_empty() {
            return Err(self.imp.invalid("an output needs a name".into()));
        }
        self.imp.define(name, v);
        self.block.yields.push(v);
        Ok(())
    }

    /// The finished model (verified: every op's operands and types are consistent).
    pub fn finish(mut self) -> Result<Module, FrontendError> {
        if self.block.yields.is_empty() {
            return Err(self.imp.invalid("the graph has no outputs (GraphBuilder::output)".into()));
        }
        self.imp.m.body = self.block;
        let m = self.imp.m;
        kiln_ir::verify::verify(&m)
            .map_err(|e| FrontendError::Invalid { model: m.name.clone(), msg: e.to_string() })?;
        Ok(m)
    }
}
