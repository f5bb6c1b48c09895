//! kiln: an AI compiler for domestic accelerators.
//!
//! The library is what the `kiln` CLI is built on:
//! [`load_model`] reads an ONNX file into the graph dialect, [`compile`] runs the graph
//! pipeline for a target, and [`CompiledModel::run`] executes it.
//!
//! ```no_run
//! let model = kiln::load_model("model.onnx".as_ref())?;
//! let compiled = kiln::compile(model, "ref")?;
//! let x = kiln::Tensor::from_f32(&[1, 3], vec![1.0, 2.0, 3.0]);
//! let outputs = compiled.run(vec![x])?;
//! # Ok::<(), kiln::Error>(())
//! ```

pub mod inspect;

pub use kiln_ir::{DType, Dim, Module, Tensor, TensorType};
use kiln_onnx::FrontendError;
use kiln_passes::{PassError, PassManager};
use kiln_targets::{Target, TargetError};
use std::path::Path;

/// Every error kiln reports. Each renders as one line naming the file, node and op involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{model}: {source}")]
    Pass { model: String, source: PassError },
    #[error("{model}: {source}")]
    Verify { model: String, source: kiln_ir::verify::VerifyError },
    #[error("{model}: {source}")]
    Run { model: String, source: kiln_ir::interp::InterpError },
    #[error("unknown target '{0}' (known: {known})", known = kiln_targets::names().join(", "))]
    UnknownTarget(String),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
}

/// Reads and imports an ONNX model, then verifies it.
pub fn load_model(path: &Path) -> Result<Module, Error> {
    let m = kiln_onnx::load_model(path)?;
    kiln_ir::verify::verify(&m).map_err(|source| Error::Verify { model: path.display().to_string(), source })?;
    Ok(m)
}

/// A model compiled for one target.
pub struct CompiledModel {
    module: Module,
    target: Box<dyn Target>,
    name: String,
}

/// Runs the graph pipeline on `module` for `target`.
pub fn compile(mut module: Module, target: &str) -> Result<CompiledModel, Error> {
    let t = kiln_targets::lookup(target).ok_or_else(|| Error::UnknownTarget(target.to_string()))?;
    let name = module.name.clone();
    PassManager::default_pipeline().run(&mut module).map_err(|source| Error::Pass { model: name.clone(), source })?;
    Ok(CompiledModel { module, target: t, name })
}

impl CompiledModel {
    /// The compiled graph.
    pub fn module(&self) -> &Module {
        &self.module
    }

    pub fn target(&self) -> &dyn Target {
        &*self.target
    }

    /// Names and types of the inputs a caller provides, in order.
    pub fn inputs(&self) -> Vec<(String, TensorType)> {
        let m = &self.module;
        m.inputs().iter().map(|&v| (m.value_label(v), m.value(v).ty.clone())).collect()
    }

    /// Names and types of the outputs, in order.
    pub fn outputs(&self) -> Vec<(String, TensorType)> {
        let m = &self.module;
        m.outputs().iter().map(|&v| (m.value_label(v), m.value(v).ty.clone())).collect()
    }

    /// Runs the model on the reference interpreter and reports its peak memory (bytes of
    /// tensors alive at once). Used by `kiln bench` for `ref`.
    pub fn run_ref_with_stats(&self, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, u64), Error> {
        kiln_ir::interp::run_with_stats(&self.module, inputs, &mut |_, _| {})
            .map(|(o, s)| (o, s.peak_bytes))
            .map_err(|source| Error::Run { model: self.name.clone(), source })
    }

    /// Runs the model on inputs ordered as [`CompiledModel::inputs`].
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        self.target.run(&self.module, inputs).map_err(|e| match e {
            TargetError::Run(source) => Error::Run { model: self.name.clone(), source },
            other => Error::Target(other),
        })
    }
}
