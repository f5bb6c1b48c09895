//! Attributes of operations.

use crate::tensor::Tensor;
use crate::types::DType;
use std::collections::BTreeMap;

/// An attribute value. ONNX graph attributes become op regions; the attribute then names the
/// region's index ([`Attr::Region`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Str(String),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Strs(Vec<String>),
    Tensor(Tensor),
    Type(DType),
    Region(u32),
}

/// Attributes by name, sorted (as MLIR prints them).
pub type Attrs = BTreeMap<String, Attr>;

impl Attr {
    /// A short name of the attribute's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Attr::Int(_) => "int",
            Attr::Float(_) => "float",
            Attr::Str(_) => "string",
            Attr::Ints(_) => "ints",
            Attr::Floats(_) => "floats",
            Attr::Strs(_) => "strings",
            Attr::Tensor(_) => "tensor",
            Attr::Type(_) => "type",
            Attr::Region(_) => "graph",
        }
    }
}
