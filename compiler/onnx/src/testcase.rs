//! ONNX backend test cases (`model.onnx` + `test_data_set_*/{input,output}_<i>.pb`) and the
//! output comparison that conformance counting uses (../shared/CLI.md: rtol 1e-3, atol 1e-7;
//! integers, bools and strings exactly; shape and dtype must match).

use crate::{load_model, read_tensor_file, FrontendError};
use kiln_ir::tensor::Data;
use kiln_ir::{Module, Tensor};
use std::path::{Path, PathBuf};

/// One case directory.
pub struct TestCase {
    pub dir: PathBuf,
    pub name: String,
}

/// One data set of a case: inputs and expected outputs.
pub struct DataSet {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

impl TestCase {
    pub fn new(dir: &Path) -> TestCase {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        TestCase { dir: dir.to_path_buf(), name }
    }

    pub fn load_model(&self) -> Result<Module, FrontendError> {
        load_model(&self.dir.join("model.onnx"))
    }

    /// Every `test_data_set_*` of the case, in order.
    pub fn data_sets(&self) -> Result<Vec<DataSet>, FrontendError> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|e| FrontendError::io(&self.dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_")))
            .collect();
        dirs.sort();
        dirs.iter()
            .map(|d| Ok(DataSet { inputs: read_numbered(d, "input")?, outputs: read_numbered(d, "output")? }))
            .collect()
    }
}

fn read_numbered(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, FrontendError> {
    let mut out = Vec::new();
    loop {
        let p = dir.join(format!("{prefix}_{}.pb", out.len()));
        if !p.exists() {
            return Ok(out);
        }
        out.push(read_tensor_file(&p)?);
    }
}

/// Lists the case directories under `root` (sorted by name).
pub fn list_cases(root: &Path) -> Vec<TestCase> {
    let mut v: Vec<TestCase> = std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| TestCase::new(&e.path())).collect())
        .unwrap_or_default();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Whether `got` matches `want` within `atol + rtol·|want|` (NaN matches NaN; infinities must be
/// equal).
pub fn within(got: f64, want: f64, rtol: f64, atol: f64) -> bool {
    if want.is_nan() {
        got.is_nan()
    } else if want.is_infinite() {
        got == want
    } else {
        (got - want).abs() <= atol + rtol * want.abs()
    }
}

/// Compares one output against its expected value; `Err` says how it differs.
pub fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != expected {}", got.dtype(), want.dtype()));
    }
    if got.shape != want.shape {
        return Err(format!("shape {:?} != expected {:?}", got.shape, want.shape));
    }
    match (&got.data, &want.data) {
        (Data::Str(a), Data::Str(b)) => {
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                return Err(format!("element {i}: {:?} != expected {:?}", a[i], b[i]));
            }
        }
        _ if got.dtype().is_float() => {
            let (a, b) = (got.to_f64(), want.to_f64());
            let mut worst: Option<(usize, f64)> = None;
            for i in 0..a.len() {
                let (x, y) = (a[i], b[i]);
                let ok = within(x, y, rtol, atol);
                if !ok {
                    let err = if x.is_finite() && y.is_finite() { (x - y).abs() } else { f64::INFINITY };
                    if worst.is_none_or(|(_, e)| err > e) {
                        worst = Some((i, err));
                    }
                }
            }
            if let Some((i, e)) = worst {
                return Err(format!("element {i}: {} != expected {} (abs err {e:.3e})", a[i], b[i]));
            }
        }
        _ => {
            let (a, b) = (got.to_i64(), want.to_i64());
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                return Err(format!("element {i}: {} != expected {}", a[i], b[i]));
            }
        }
    }
    Ok(())
}

/// Runs a case on the reference interpreter; `Err` is the reason it fails.
pub fn run_case_ref(case: &TestCase) -> Result<(), String> {
    run_case_with(case, &|m| Ok(m))
}

/// Runs a case on the reference interpreter after `prepare` rewrote the imported module (a
/// pass pipeline, e.g. fusion); `Err` is the reason it fails.
pub fn run_case_with(case: &TestCase, prepare: &dyn Fn(Module) -> Result<Module, String>) -> Result<(), String> {
    run_case_on(case, &|m| {
        let m = prepare(m)?;
        Ok(Box::new(move |inputs| kiln_ir::interp::run(&m, inputs).map_err(|e| e.to_string())))
    })
}

/// Runs one data set's inputs (a compiled model's run).
pub type CaseRun = Box<dyn FnMut(Vec<Tensor>) -> Result<Vec<Tensor>, String>>;

/// Runs a case with what `make` builds from the imported module (a target's compiled model),
/// comparing every data set's outputs with the node tests' tolerance; `Err` is the reason it
/// fails.
pub fn run_case_on(case: &TestCase, make: &dyn Fn(Module) -> Result<CaseRun, String>) -> Result<(), String> {
    let mut run = make(case.load_model().map_err(|e| e.to_string())?)?;
    let sets = case.data_sets().map_err(|e| e.to_string())?;
    for (si, set) in sets.into_iter().enumerate() {
        let got = run(set.inputs)?;
        if got.len() != set.outputs.len() {
            return Err(format!("data set {si}: {} outputs, expected {}", got.len(), set.outputs.len()));
        }
        for (i, (g, w)) in got.iter().zip(&set.outputs).enumerate() {
            compare(g, w, 1e-3, 1e-7).map_err(|e| format!("data set {si}, output {i}: {e}"))?;
        }
    }
    Ok(())
}
