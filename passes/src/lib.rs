//! Graph passes over the graph dialect.
//!
//! A [`Pass`] rewrites a [`Module`] in place; the [`PassManager`] runs a pipeline and verifies
//! the module after each pass (so a broken rewrite is caught where it happens, by name).
//! Today: dead-code elimination ([`dce`]) and canonicalization ([`canonicalize`]: inference-time
//! no-ops such as `Identity` and `Dropout` disappear). Constant folding of shape subgraphs runs
//! during import, where it sharpens shape inference (see `kiln-onnx`). The e-graph fusion
//! passes (egg) land here next.

pub mod canonicalize;
pub mod dce;

use kiln_ir::verify::{verify, VerifyError};
use kiln_ir::Module;

/// A transformation of a module.
pub trait Pass {
    /// A short name, for `--print-after` style diagnostics and errors.
    fn name(&self) -> &'static str;
    /// Runs the pass; returns whether anything changed.
    fn run(&self, m: &mut Module) -> bool;
}

/// A pass failed to leave a valid module.
#[derive(Debug, thiserror::Error)]
#[error("after pass '{pass}': {source}")]
pub struct PassError {
    pub pass: &'static str,
    #[source]
    pub source: VerifyError,
}

/// Runs passes in order, verifying after each.
#[derive(Default)]
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    /// The default graph pipeline.
    pub fn default_pipeline() -> PassManager {
        let mut pm = PassManager::new();
        pm.add(canonicalize::Canonicalize);
        pm.add(dce::DeadCodeElimination);
        pm
    }

    pub fn add(&mut self, p: impl Pass + 'static) {
        self.passes.push(Box::new(p));
    }

    pub fn run(&self, m: &mut Module) -> Result<(), PassError> {
        for p in &self.passes {
            p.run(m);
            verify(m).map_err(|source| PassError { pass: p.name(), source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attrs, DType, TensorType};

    /// x → Identity → Relu → y, plus an Exp nobody reads.
    fn module() -> Module {
        let mut m = Module::new("t");
        let ty = TensorType::known(DType::F32, &[2]);
        let x = m.add_arg(ty.clone(), Some("x".into()));
        m.body.args.push(x);
        let id = m.push_op("graph.Identity", vec![Some(x)], vec![ty.clone()], Attrs::new());
        let idv = m.op(id).results[0];
        let relu = m.push_op("graph.Relu", vec![Some(idv)], vec![ty.clone()], Attrs::new());
        m.push_op("graph.Exp", vec![Some(x)], vec![ty], Attrs::new());
        m.body.yields.push(m.op(relu).results[0]);
        m
    }

    #[test]
    fn pipeline_forwards_identity_and_drops_dead_ops() {
        let mut m = module();
        PassManager::default_pipeline().run(&mut m).expect("valid after each pass");
        let names: Vec<&str> = m.body.ops.iter().map(|&o| m.op(o).name.as_str()).collect();
        assert_eq!(names, ["graph.Relu"]);
        let relu = m.op(m.body.ops[0]);
        assert_eq!(relu.operands[0], Some(m.body.args[0]));
        let out = kiln_ir::interp::run(&m, vec![kiln_ir::Tensor::from_f32(&[2], vec![-1.0, 2.0])]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[0.0, 2.0]);
    }

    #[test]
    fn dce_keeps_everything_that_feeds_an_output() {
        let mut m = module();
        assert!(dce::DeadCodeElimination.run(&mut m));
        assert_eq!(m.body.ops.len(), 2);
        assert!(!dce::DeadCodeElimination.run(&mut m));
    }
}
