//! The `graph` dialect: tensor ops with ONNX semantics.
//!
//! Each op is defined once, as a type implementing [`OpDef`]: its name, its shape/dtype rule
//! ([`OpDef::infer`]) and its reference semantics ([`OpDef::eval`]). The reference interpreter
//! ([`crate::interp`]) only walks the IR and calls `eval`; it has no per-op switch.
//! Ops implement the latest ONNX opset's semantics; where older opsets differ in a way the
//! frontend cannot rewrite away, `cx.opset` tells the op which version the model asked for.
//!
//! Families live one per file: [`elementwise`], [`nn`], [`shape`], [`reduce`], [`misc`].

pub mod elementwise;
#[cfg(test)]
mod fuzz_tests;
pub mod misc;
pub mod nn;
pub mod reduce;
pub mod shape;
mod util;

pub use util::*;

use crate::attr::{Attr, Attrs};
use crate::ir::Region;
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};
use std::collections::HashMap;
use std::sync::OnceLock;

/// An error from an op's rule or semantics. The caller adds the node name and op type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);

pub type OpResult<T> = Result<T, OpError>;

/// Returns early with an [`OpError`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::graph::OpError(format!($($t)*))) };
}

/// Read access to an op's attributes with ONNX defaults.
#[derive(Clone, Copy)]
pub struct AttrView<'a>(pub &'a Attrs);

impl<'a> AttrView<'a> {
    pub fn get(&self, name: &str) -> Option<&'a Attr> {
        self.0.get(name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn int(&self, name: &str, default: i64) -> OpResult<i64> {
        match self.0.get(name) {
            None => Ok(default),
            Some(Attr::Int(v)) => Ok(*v),
            Some(a) => bail!("attribute '{name}' must be an int, found {}", a.kind()),
        }
    }

    pub fn float(&self, name: &str, default: f32) -> OpResult<f32> {
        match self.0.get(name) {
            None => Ok(default),
            Some(Attr::Float(v)) => Ok(*v),
            Some(Attr::Int(v)) => Ok(*v as f32),
            Some(a) => bail!("attribute '{name}' must be a float, found {}", a.kind()),
        }
    }

    pub fn string(&self, name: &str, default: &str) -> OpResult<String> {
        match self.0.get(name) {
            None => Ok(default.to_string()),
            Some(Attr::Str(v)) => Ok(v.clone()),
            Some(a) => bail!("attribute '{name}' must be a string, found {}", a.kind()),
        }
    }

    /// An ints attribute; `None` when absent.
    pub fn ints(&self, name: &str) -> OpResult<Option<Vec<i64>>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v.clone())),
            Some(Attr::Int(v)) => Ok(Some(vec![*v])),
            Some(a) => bail!("attribute '{name}' must be ints, found {}", a.kind()),
        }
    }

    pub fn floats(&self, name: &str) -> OpResult<Option<Vec<f32>>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v.clone())),
            Some(Attr::Float(v)) => Ok(Some(vec![*v])),
            Some(a) => bail!("attribute '{name}' must be floats, found {}", a.kind()),
        }
    }

    pub fn strings(&self, name: &str) -> OpResult<Option<Vec<String>>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Attr::Strs(v)) => Ok(Some(v.clone())),
            Some(a) => bail!("attribute '{name}' must be strings, found {}", a.kind()),
        }
    }

    pub fn tensor(&self, name: &str) -> OpResult<Option<&'a Tensor>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Attr::Tensor(t)) => Ok(Some(t)),
            Some(a) => bail!("attribute '{name}' must be a tensor, found {}", a.kind()),
        }
    }

    /// A dtype attribute (ONNX `to`, `dtype`, `output_dtype`, ...): an [`Attr::Type`], or an
    /// [`Attr::Int`] holding an ONNX `TensorProto.DataType` code (as the frontend imports them).
    pub fn dtype(&self, name: &str) -> OpResult<Option<DType>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Attr::Type(t)) => Ok(Some(*t)),
            Some(Attr::Int(code)) => match DType::from_onnx_code(*code) {
                Some(t) => Ok(Some(t)),
                None => bail!(
                    "attribute '{name}' names element type {}, which kiln does not support",
                    DType::onnx_code_name(*code)
                ),
            },
            Some(a) => bail!("attribute '{name}' must be a type, found {}", a.kind()),
        }
    }

    /// The region index a graph attribute refers to.
    pub fn region(&self, name: &str) -> OpResult<u32> {
        match self.0.get(name) {
            Some(Attr::Region(r)) => Ok(*r),
            None => bail!("graph attribute '{name}' is missing"),
            Some(a) => bail!("attribute '{name}' must be a graph, found {}", a.kind()),
        }
    }
}

/// What a shape/dtype rule sees.
pub struct InferCx<'a> {
    pub attrs: AttrView<'a>,
    /// Input types; `None` for an omitted optional input.
    pub inputs: &'a [Option<TensorType>],
    /// Input values known at compile time (initializers, folded constants).
    pub consts: &'a [Option<&'a Tensor>],
    pub num_outputs: usize,
    pub opset: i64,
    pub regions: &'a [Region],
    /// Integer inputs known element-wise at compile time, some elements symbolic (e.g. the
    /// output of `Shape` on a value with a symbolic batch dim); see [`InferCx::shape_value`].
    pub shape_values: &'a [Option<Vec<SymInt>>],
    next_dim: &'a mut u32,
}

/// An integer known at compile time: a number, or the size of a symbolic dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SymInt {
    Int(i64),
    Sym(std::sync::Arc<str>),
}

impl SymInt {
    /// As a dimension: non-negative numbers and symbols.
    pub fn to_dim(&self) -> Option<Dim> {
        match self {
            SymInt::Int(n) if *n >= 0 => Some(Dim::Known(*n as u64)),
            SymInt::Int(_) => None,
            SymInt::Sym(s) => Some(Dim::Sym(s.clone())),
        }
    }

    pub fn from_dim(d: &Dim) -> SymInt {
        match d {
            Dim::Known(n) => SymInt::Int(*n as i64),
            Dim::Sym(s) => SymInt::Sym(s.clone()),
        }
    }
}

impl<'a> InferCx<'a> {
    pub fn new(
        attrs: &'a Attrs,
        inputs: &'a [Option<TensorType>],
        consts: &'a [Option<&'a Tensor>],
        num_outputs: usize,
        opset: i64,
        regions: &'a [Region],
        next_dim: &'a mut u32,
    ) -> InferCx<'a> {
        InferCx { attrs: AttrView(attrs), inputs, consts, num_outputs, opset, regions, shape_values: &[], next_dim }
    }

    /// Adds per-input symbolic integer values (the frontend tracks them through shape
    /// computations such as `Shape → Gather → Concat`).
    pub fn with_shape_values(mut self, v: &'a [Option<Vec<SymInt>>]) -> InferCx<'a> {
        self.shape_values = v;
        self
    }

    /// Input `i` as a list of compile-time integers, some possibly symbolic: from a constant
    /// integer input, or from the frontend's symbolic shape values.
    pub fn shape_value(&self, i: usize) -> Option<Vec<SymInt>> {
        if let Some(t) = self.const_input(i).filter(|t| t.dtype().is_int()) {
            return Some(t.to_i64().into_iter().map(SymInt::Int).collect());
        }
        self.shape_values.get(i).cloned().flatten()
    }

    /// The type of input `i`, which must be present.
    pub fn input(&self, i: usize) -> OpResult<&'a TensorType> {
        match self.inputs.get(i) {
            Some(Some(t)) => Ok(t),
            _ => bail!("expected input {i} to be present"),
        }
    }

    /// The type of input `i` if present.
    pub fn opt_input(&self, i: usize) -> Option<&'a TensorType> {
        self.inputs.get(i).and_then(|t| t.as_ref())
    }

    /// The constant value of input `i`, if known at compile time.
    pub fn const_input(&self, i: usize) -> Option<&'a Tensor> {
        self.consts.get(i).copied().flatten()
    }

    /// A fresh symbolic dimension for a size only known at run time.
    pub fn fresh_dim(&mut self) -> Dim {
        *self.next_dim += 1;
        Dim::sym(&format!("d{}", *self.next_dim))
    }

    /// `n` fresh symbolic dims.
    pub fn fresh_dims(&mut self, n: usize) -> Vec<Dim> {
        (0..n).map(|_| self.fresh_dim()).collect()
    }
}

/// Runs a region of the op being evaluated (control flow: If, Loop, Scan).
pub trait RegionRunner {
    /// Runs `region` with its block arguments bound to `args`; returns the yielded values.
    fn run_region(&self, region: &Region, args: Vec<Tensor>) -> OpResult<Vec<Tensor>>;
}

/// A [`RegionRunner`] for contexts that run no regions (constant folding, unit tests): it
/// answers every request with an error.
pub struct NoRegions;

impl RegionRunner for NoRegions {
    fn run_region(&self, _: &Region, _: Vec<Tensor>) -> OpResult<Vec<Tensor>> {
        Err(OpError("regions are not run in this context".into()))
    }
}

/// What an op's reference semantics sees besides its inputs.
pub struct EvalCx<'a> {
    pub attrs: AttrView<'a>,
    pub num_outputs: usize,
    pub opset: i64,
    pub regions: &'a [Region],
    pub runner: &'a dyn RegionRunner,
}

/// One op of the graph dialect.
pub trait OpDef: Send + Sync {
    /// The ONNX op type, which is also the op's name in the dialect (`graph.<name>`).
    fn name(&self) -> &'static str;

    /// Output types from input types (and constant inputs). Dims that depend on run-time
    /// values become fresh symbols ([`InferCx::fresh_dim`]); rank may be unknown (`None`).
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>>;

    /// Reference semantics. `inputs[i]` is `None` for an omitted optional input.
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>>;
}

/// The op table: name → definition.
pub struct Registry {
    ops: HashMap<&'static str, &'static dyn OpDef>,
    families: HashMap<&'static str, &'static str>,
    family: &'static str,
}

impl Registry {
    /// Adds an op; a second definition of the same name is a bug in the table.
    pub fn add(&mut self, op: &'static dyn OpDef) {
        let prev = self.ops.insert(op.name(), op);
        assert!(prev.is_none(), "op {} defined twice", op.name());
        self.families.insert(op.name(), self.family);
    }

    /// Adds several ops.
    pub fn add_all(&mut self, ops: &[&'static dyn OpDef]) {
        for &op in ops {
            self.add(op);
        }
    }

    pub fn get(&self, name: &str) -> Option<&'static dyn OpDef> {
        self.ops.get(name).copied()
    }

    /// The family an op is defined in (`elementwise`, `nn`, `shape`, `reduce`, `misc`).
    pub fn family(&self, name: &str) -> Option<&'static str> {
        self.families.get(name).copied()
    }

    /// All op names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.ops.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// The registry of every graph op.
pub fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut r = Registry { ops: HashMap::new(), families: HashMap::new(), family: "" };
        let families: [(&'static str, fn(&mut Registry)); 5] = [
            ("elementwise", elementwise::register),
            ("nn", nn::register),
            ("shape", shape::register),
            ("reduce", reduce::register),
            ("misc", misc::register),
        ];
        for (name, register) in families {
            r.family = name;
            register(&mut r);
        }
        r
    })
}

/// Looks up a graph op by ONNX op type.
pub fn lookup(op_type: &str) -> Option<&'static dyn OpDef> {
    registry().get(op_type)
}
