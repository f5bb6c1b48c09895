//! Graph passes over the graph dialect.
//!
//! A [`Pass`] rewrites a [`Module`] in place; the [`PassManager`] runs a pipeline and verifies
//! the module after each pass (so a broken rewrite is caught where it happens, by name).
//! Cleanup: dead-code elimination ([`dce`]) and canonicalization ([`canonicalize`]:
//! inference-time no-ops such as `Identity` and `Dropout` disappear). Constant folding of shape
//! subgraphs runs during import, where it sharpens shape inference (see `kiln-onnx`).
//!
//! Optimization ([`optimize`]) for a target: equality saturation over the graph ([`egraph`]:
//! algebraic rewrites and recognition of decomposed ops, extraction by the target's
//! [`cost::CostModel`]), then kernel fusion ([`fusion`]: `graph.fused` ops).

pub mod canonicalize;
pub mod cost;
pub mod dce;
pub mod egraph;
pub mod fusion;
pub mod lower;

use kiln_ir::verify::{verify, VerifyError};
use kiln_ir::Module;

/// A transformation of a module.
pub trait Pass {
    /// A short name, for `--print-after` style diagnostics and errors.
    fn name(&self) -> &'static str;
    /// Runs the pass; returns whether anything changed.
    fn run(&self, m: &mut Module) -> bool;
}

/// A pass failed, or left an invalid module.
#[derive(Debug, thiserror::Error)]
#[error("after pass '{pass}': {msg}")]
pub struct PassError {
    pub pass: &'static str,
    pub msg: String,
}

impl PassError {
    fn verify(pass: &'static str, e: VerifyError) -> PassError {
        PassError { pass, msg: e.to_string() }
    }
}

/// What [`optimize`] did, with the plan's figures before and after.
#[derive(Clone, Debug, Default)]
pub struct OptimizeReport {
    /// Every graph op its own kernel (views included): the unfused baseline.
    pub before: fusion::PlanFigures,
    pub after: fusion::PlanFigures,
    /// Wall time of saturation, extraction and fusion, in milliseconds.
    pub fusion_ms: f64,
    pub saturation: egraph::SaturationStats,
    pub fusion: fusion::FusionReport,
}

/// Cleans up `m`, then (with `fuse`) rewrites it by equality saturation and fuses it into
/// kernels for the machine `machine` describes. Without `fuse`, every graph op stays its own
/// kernel.
pub fn optimize(
    m: &mut Module,
    machine: &kiln_ir::machine::MachineDescription,
    fuse: bool,
) -> Result<OptimizeReport, PassError> {
    optimize_with(m, &cost::CostModel::new(machine), fuse)
}

/// [`optimize`] with a given cost model (e.g. with symbolic dims bound).
pub fn optimize_with(m: &mut Module, cost: &cost::CostModel, fuse: bool) -> Result<OptimizeReport, PassError> {
    PassManager::default_pipeline().run(m)?;
    let before = fusion::figures(m, cost, true);
    let mut report = OptimizeReport { before: before.clone(), after: before, ..Default::default() };
    if !fuse {
        return Ok(report);
    }
    let t0 = std::time::Instant::now();
    let rules = egraph::rules::rewrites();
    let (rewritten, sat) = egraph::saturate_owned(std::mem::take(m), &rules, cost, egraph::Limits::default())
        .map_err(|msg| PassError { pass: "egraph", msg })?;
    verify(&rewritten).map_err(|e| PassError::verify("egraph", e))?;
    *m = rewritten;
    report.saturation = sat;
    report.fusion = fusion::fuse(m, cost).map_err(|msg| PassError { pass: "fusion", msg })?;
    verify(m).map_err(|e| PassError::verify("fusion", e))?;
    report.fusion_ms = t0.elapsed().as_secs_f64() * 1e3;
    report.after = fusion::figures(m, cost, false);
    Ok(report)
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
            verify(m).map_err(|e| PassError::verify(p.name(), e))?;
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
