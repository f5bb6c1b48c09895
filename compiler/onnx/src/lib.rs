//! kiln's ONNX frontend.
//!
//! - [`load_model`] reads an `.onnx` file (external data resolved next to it) and imports it
//!   into a graph-dialect [`Module`] ([`import`]).
//! - [`tensor_io`] reads and writes tensors: ONNX `TensorProto` (`.pb`) and numpy `.npy`.
//!
//! The protobuf types are generated at build time by prost from the vendored
//! `proto/onnx.proto` (onnx 1.23.2).

pub mod builder;
pub mod import;
pub mod symbolic;
pub mod tensor_io;
pub mod testcase;

/// Types generated from `onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use kiln_ir::Module;
use prost::Message;
use std::path::Path;

pub use import::import_model;
pub use tensor_io::{read_tensor_file, write_npy, write_tensor_pb};

/// Everything that can go wrong reading a model or a tensor file. Each variant names the file
/// (and the node and op where there is one).
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("{path}: not a valid ONNX model: {msg}")]
    Decode { path: String, msg: String },
    #[error("{model}: {msg}")]
    Invalid { model: String, msg: String },
    #[error("{model}: node '{node}' ({op}): {msg}")]
    Node { model: String, node: String, op: String, msg: String },
    #[error("{model}: {} unsupported op(s): {}", ops.len(), format_ops(ops))]
    Unsupported { model: String, ops: Vec<(String, String)> },
    #[error("{path}: {msg}")]
    Input { path: String, msg: String },
}

fn format_ops(ops: &[(String, String)]) -> String {
    ops.iter().map(|(n, o)| format!("node '{n}' ({o})")).collect::<Vec<_>>().join(", ")
}

impl FrontendError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> FrontendError {
        FrontendError::Io { path: path.display().to_string(), msg: e.to_string() }
    }
}

/// Decodes a `ModelProto` from bytes.
pub fn decode_model(bytes: &[u8], path: &str) -> Result<proto::ModelProto, FrontendError> {
    proto::ModelProto::decode(bytes).map_err(|e| FrontendError::Decode { path: path.to_string(), msg: e.to_string() })
}

/// Reads and imports an ONNX model file.
pub fn load_model(path: &Path) -> Result<Module, FrontendError> {
    let bytes = std::fs::read(path).map_err(|e| FrontendError::io(path, e))?;
    let name = path.display().to_string();
    let model = decode_model(&bytes, &name)?;
    drop(bytes);
    import_model(&model, &name, path.parent())
}

/// Imports a model from bytes (external data, if any, is resolved against `base_dir`).
pub fn load_model_bytes(bytes: &[u8], name: &str, base_dir: Option<&Path>) -> Result<Module, FrontendError> {
    let model = decode_model(bytes, name)?;
    import_model(&model, name, base_dir)
}
