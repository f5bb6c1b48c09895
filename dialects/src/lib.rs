//! kiln's IR core and dialects.
//!
//! - [`ir`]: modules, ops, values, regions, blocks (an arena per module).
//! - [`types`], [`attr`], [`tensor`]: element types and tensor types, attributes, run-time tensors.
//! - [`printer`] / [`parser`]: MLIR generic syntax, so `mlir-opt --allow-unregistered-dialect`
//!   reads what kiln prints, and kiln reads it back.
//! - [`verify`]: structural checks (SSA dominance, operand/result types against op rules).
//! - [`graph`]: the graph dialect (ONNX-semantics tensor ops), each op defined once with its
//!   shape rule and reference semantics; [`interp`] runs a module with them.
//! - [`machine`]: the plain-data machine description that cost models read.

pub mod attr;
pub mod graph;
pub mod interp;
pub mod ir;
pub mod kernel;
pub mod kernel_parser;
pub mod lowp;
pub mod machine;
pub mod parser;
pub mod printer;
pub mod tensor;
pub mod types;
pub mod verify;

pub use attr::{Attr, Attrs};
pub use ir::{Block, Module, OpData, OpId, Region, ValueData, ValueDef, ValueId};
pub use tensor::{Data, Tensor};
pub use types::{DType, Dim, TensorType};
