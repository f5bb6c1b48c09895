//! The IR core: a module owns arenas of values and operations; operations have operands,
//! results, attributes and regions; regions hold blocks; blocks hold block arguments and an
//! ordered list of operations.
//!
//! Invariant: one [`Module`] holds one function, `main`, whose body is [`Module::body`].
//! Values are numbered module-wide, so an op inside a region may use a value defined outside
//! it (ONNX subgraphs capture outer values by name; MLIR regions that are not isolated from
//! above do the same).

use crate::attr::{Attr, Attrs};
use crate::types::TensorType;

/// Index of a value in [`Module::values`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// Index of an operation in [`Module::ops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u32);

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueDef {
    /// Result `index` of an op.
    OpResult(OpId, u32),
    /// A block argument (function input or region argument).
    BlockArg,
}

/// A value: its type, an optional source name (ONNX value name), and its definition.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueData {
    pub ty: TensorType,
    pub name: Option<String>,
    pub def: ValueDef,
}

/// An operation in generic form.
#[derive(Clone, Debug, PartialEq)]
pub struct OpData {
    /// Full name, `dialect.op` (e.g. `graph.Conv`).
    pub name: String,
    /// Operands; `None` is an omitted optional input (ONNX's empty input name).
    pub operands: Vec<Option<ValueId>>,
    pub results: Vec<ValueId>,
    pub attrs: Attrs,
    pub regions: Vec<Region>,
}

impl OpData {
    /// The op's name without its dialect prefix (`Conv` for `graph.Conv`).
    pub fn op_type(&self) -> &str {
        self.name.split_once('.').map_or(&self.name, |(_, t)| t)
    }

    pub fn dialect(&self) -> &str {
        self.name.split_once('.').map_or("", |(d, _)| d)
    }

    /// The source node name, kept in the `kiln.name` attribute.
    pub fn node_name(&self) -> &str {
        match self.attrs.get(NODE_NAME_ATTR) {
            Some(Attr::Str(s)) => s,
            _ => "",
        }
    }
}

/// Attribute that keeps an op's source node name.
pub const NODE_NAME_ATTR: &str = "kiln.name";

/// A region: a list of blocks (graph ops use single-block regions).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Region {
    pub blocks: Vec<Block>,
}

/// A block: arguments, ops in order, and the values it yields (its terminator's operands).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Block {
    pub args: Vec<ValueId>,
    pub ops: Vec<OpId>,
    pub yields: Vec<ValueId>,
}

/// A module with one function, `main`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Module {
    pub name: String,
    pub values: Vec<ValueData>,
    pub ops: Vec<OpData>,
    /// The body of `main`: arguments are the model inputs, yields are the model outputs.
    pub body: Block,
    /// Module-level attributes (producer, opset, ...).
    pub attrs: Attrs,
}

impl Module {
    pub fn new(name: &str) -> Module {
        Module { name: name.to_string(), ..Default::default() }
    }

    pub fn value(&self, v: ValueId) -> &ValueData {
        &self.values[v.0 as usize]
    }

    pub fn value_mut(&mut self, v: ValueId) -> &mut ValueData {
        &mut self.values[v.0 as usize]
    }

    pub fn op(&self, o: OpId) -> &OpData {
        &self.ops[o.0 as usize]
    }

    pub fn op_mut(&mut self, o: OpId) -> &mut OpData {
        &mut self.ops[o.0 as usize]
    }

    /// Adds a block argument value.
    pub fn add_arg(&mut self, ty: TensorType, name: Option<String>) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(ValueData { ty, name, def: ValueDef::BlockArg });
        id
    }

    /// Creates an op (not yet placed in a block) with results of the given types.
    pub fn create_op(
        &mut self,
        name: &str,
        operands: Vec<Option<ValueId>>,
        result_types: Vec<TensorType>,
        attrs: Attrs,
        regions: Vec<Region>,
    ) -> OpId {
        let id = OpId(self.ops.len() as u32);
        let results = result_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| {
                let v = ValueId(self.values.len() as u32);
                self.values.push(ValueData { ty, name: None, def: ValueDef::OpResult(id, i as u32) });
                v
            })
            .collect();
        self.ops.push(OpData { name: name.to_string(), operands, results, attrs, regions });
        id
    }

    /// Creates an op and appends it to the body of `main`.
    pub fn push_op(
        &mut self,
        name: &str,
        operands: Vec<Option<ValueId>>,
        result_types: Vec<TensorType>,
        attrs: Attrs,
    ) -> OpId {
        let id = self.create_op(name, operands, result_types, attrs, vec![]);
        self.body.ops.push(id);
        id
    }

    /// Visits every op reachable from `block`, nested regions included, in order.
    pub fn walk_block(&self, block: &Block, f: &mut dyn FnMut(OpId, &OpData)) {
        for &o in &block.ops {
            let op = self.op(o);
            f(o, op);
            for r in &op.regions {
                for b in &r.blocks {
                    self.walk_block(b, f);
                }
            }
        }
    }

    /// Visits every op of the module, nested ones included.
    pub fn walk(&self, f: &mut dyn FnMut(OpId, &OpData)) {
        let body = self.body.clone();
        self.walk_block(&body, f);
    }

    /// The inputs of `main` that are not bound to initializers: what a caller must provide.
    pub fn inputs(&self) -> &[ValueId] {
        &self.body.args
    }

    pub fn outputs(&self) -> &[ValueId] {
        &self.body.yields
    }

    /// A display name for a value (its source name or `%N`).
    pub fn value_label(&self, v: ValueId) -> String {
        match &self.value(v).name {
            Some(n) => n.clone(),
            None => format!("%{}", v.0),
        }
    }
}
