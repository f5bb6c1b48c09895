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
