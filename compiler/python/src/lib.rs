//! `kiln._kiln`: the native half of kiln's Python package (the Python half, `python/kiln`,
//! accepts paths, bytes and `onnx.ModelProto`, and inputs by name or position).
//!
//! Compiling and running release the GIL. A compiled model may be used from any Python thread;
//! runs of one model take turns (a lock), runs of different models go in parallel.

use half::f16;
use kiln::{DType, Data, Dim, Error, Tensor};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3::IntoPyObjectExt;

create_exception!(kiln, KilnError, PyException, "Every error kiln raises derives from this.");
create_exception!(kiln, ModelError, KilnError, "The model cannot be read, decoded or imported.");
create_exception!(kiln, CompileError, KilnError, "Unknown target, or the model cannot be compiled for it.");
create_exception!(kiln, InputError, KilnError, "Inputs that do not match the model (count, name, dtype, shape).");
create_exception!(kiln, RunError, KilnError, "Running the model failed.");

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Frontend(_) | Error::Verify { .. } | Error::Io { .. } => ModelError::new_err(msg),
        Error::Input { .. } => InputError::new_err(msg),
        Error::Run { .. } | Error::Check(_) => RunError::new_err(msg),
        Error::Target(_) | Error::Pass { .. } | Error::UnknownTarget(_) | Error::Usage(_) => CompileError::new_err(msg),
    }
}

/// A compiled model behind a lock, so that Python threads can share it.
///
/// `kiln::CompiledModel` is not `Send`: its JIT-compiled code and prepared state hold `Rc`s and
/// `OnceCell`s. Every one of those is owned by the model alone (no clone outlives a call or is
/// shared with another object), and nothing in it is tied to the thread that made it, so moving
/// it between threads is sound; the mutex makes every use exclusive, so no two threads touch
/// it at once.
struct Shared(std::sync::Mutex<kiln::CompiledModel>);
// SAFETY: see the type's docs: exclusive access through the mutex, no shared `Rc` clones.
unsafe impl Send for Shared {}
// SAFETY: as above: `&Shared` only gives access through the mutex.
unsafe impl Sync for Shared {}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, kiln::CompiledModel> {
        // A run that panicked left nothing half-written that a later run reads.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A model compiled for one target.
#[pyclass(frozen, module = "kiln")]
struct CompiledModel {
    inner: Shared,
}

fn io_list(py: Python<'_>, list: Vec<(String, kiln::TensorType)>) -> PyResult<Py<PyList>> {
    let items: Vec<(String, String, Vec<Py<PyAny>>)> = list
        .into_iter()
        .map(|(name, ty)| {
            let dims = ty
                .shape
                .unwrap_or_default()
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => n.into_py_any(py),
                    other => other.to_string().into_py_any(py),
                })
                .collect::<PyResult<Vec<_>>>()?;
            Ok((name, numpy_dtype_name(ty.dtype).to_string(), dims))
        })
        .collect::<PyResult<_>>()?;
    Ok(PyList::new(py, items)?.unbind())
}

/// numpy's name for a kiln element type (`str` for kiln's `string`, kiln's own name where numpy
/// has none).
fn numpy_dtype_name(d: DType) -> String {
    match d {
        DType::F16 => "float16".into(),
        DType::F32 => "float32".into(),
        DType::F64 => "float64".into(),
        DType::I8 => "int8".into(),
        DType::I16 => "int16".into(),
        DType::I32 => "int32".into(),
        DType::I64 => "int64".into(),
        DType::U8 => "uint8".into(),
        DType::U16 => "uint16".into(),
        DType::U32 => "uint32".into(),
        DType::U64 => "uint64".into(),
        DType::Bool => "bool".into(),
        DType::String => "str".into(),
        other => other.to_string(),
    }
}

/// A numpy array → a kiln tensor (one copy into kiln's buffer). Element types numpy lacks come
/// as `(onnx_code, raw little-endian bytes, shape)`, strings as `("str", [str], shape)`.
fn tensor_from_array(i: usize, a: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    if let Ok((code, raw, shape)) = a.extract::<(i64, Bound<'_, pyo3::types::PyBytes>, Vec<usize>)>() {
        let raw = raw.as_bytes();
        let dt = DType::from_onnx_code(code).ok_or_else(|| {
            InputError::new_err(format!(
                "input {i}: kiln does not support element type {}",
                DType::onnx_code_name(code)
            ))
        })?;
        let data =
            Data::from_le_bytes(dt, raw).filter(|d| d.len() == shape.iter().product::<usize>()).ok_or_else(|| {
                InputError::new_err(format!(
                    "input {i}: {} bytes do not make a {dt} tensor of shape {shape:?}",
                    raw.len()
                ))
            })?;
        return Ok(Tensor::new(shape, data));
    }
    if let Ok((tag, strings, shape)) = a.extract::<(String, Vec<String>, Vec<usize>)>() {
        if tag == "str" && strings.len() == shape.iter().product::<usize>() {
            return Ok(Tensor::new(shape, Data::Str(strings)));
        }
    }
    macro_rules! try_dtype {
        ($t:ty, $variant:ident) => {
            if let Ok(arr) = a.cast::<PyArrayDyn<$t>>() {
                let ro = arr.try_readonly().map_err(|e| InputError::new_err(format!("input {i}: {e}")))?;
                let shape = ro.shape().to_vec();
                let data: Vec<$t> = match ro.as_slice() {
                    Ok(s) => s.to_vec(),
                    Err(_) => ro.as_array().iter().cloned().collect(),
                };
                return Ok(Tensor::new(shape, Data::$variant(data)));
            }
        };
    }
    try_dtype!(f32, F32);
    try_dtype!(f64, F64);
    try_dtype!(i64, I64);
    try_dtype!(i32, I32);
    try_dtype!(bool, Bool);
    try_dtype!(u8, U8);
    try_dtype!(i8, I8);
    try_dtype!(i16, I16);
    try_dtype!(u16, U16);
    try_dtype!(u32, U32);
    try_dtype!(u64, U64);
    try_dtype!(f16, F16);
    let what = match a.getattr("dtype") {
        Ok(d) => format!("a numpy array of dtype {d}"),
        Err(_) => format!("a {}", a.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "value".into())),
    };
    Err(InputError::new_err(format!("input {i}: expected a numpy array of a numeric or bool dtype, got {what}")))
}

/// A kiln tensor → a numpy array (the buffer is handed over, not copied).
fn array_from_tensor(py: Python<'_>, t: Tensor) -> PyResult<Py<PyAny>> {
    let shape = t.shape.clone();
    macro_rules! arr {
        ($v:expr) => {
            $v.into_pyarray(py).reshape(shape)?.into_any().unbind()
        };
    }
    Ok(match t.data {
        Data::F32(v) => arr!(v),
        Data::F64(v) => arr!(v),
        Data::I64(v) => arr!(v),
        Data::I32(v) => arr!(v),
        Data::Bool(v) => arr!(v),
        Data::U8(v) => arr!(v),
        Data::I8(v) => arr!(v),
        Data::I16(v) => arr!(v),
        Data::U16(v) => arr!(v),
        Data::U32(v) => arr!(v),
        Data::U64(v) => arr!(v),
        Data::F16(v) => arr!(v),
        Data::Str(v) => ("str", v, shape).into_py_any(py)?,
        // Types numpy lacks (bfloat16, float8, int4, ...): the Python side views the bytes
        // with ml_dtypes' type.
        other => {
            (other.dtype().onnx_code(), pyo3::types::PyBytes::new(py, &other.to_le_bytes()), shape).into_py_any(py)?
        }
    })
}

#[pymethods]
impl CompiledModel {
    /// The inputs a caller provides, in order: `(name, dtype, shape)`, where a symbolic dim is
    /// its name (a str) and any size runs.
    #[getter]
    fn inputs(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        io_list(py, self.inner.lock().inputs())
    }

    /// The outputs, in order: `(name, dtype, shape)`.
    #[getter]
    fn outputs(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        io_list(py, self.inner.lock().outputs())
    }

    /// The target's name.
    #[getter]
    fn target(&self) -> &'static str {
        self.inner.lock().target().name()
    }

    /// Kernels compiled to the target's code, and kernels handed back to the host's reference
    /// implementation.
    fn kernel_counts(&self) -> PyResult<(usize, usize)> {
        let m = self.inner.lock();
        Ok((m.native_kernels().map_err(to_py)?, m.host_kernels().map_err(to_py)?.len()))
    }

    /// Runs on numpy arrays in input order; returns numpy arrays in output order. The GIL is
    /// released while the model runs.
    fn run_list(&self, py: Python<'_>, inputs: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<Py<PyAny>>> {
        let tensors = inputs.iter().enumerate().map(|(i, a)| tensor_from_array(i, a)).collect::<PyResult<Vec<_>>>()?;
        // The lock is taken with the GIL released: a thread waiting for it blocks no other.
        let outs = py.detach(|| self.inner.lock().run(tensors)).map_err(to_py)?;
        outs.into_iter().map(|t| array_from_tensor(py, t)).collect()
    }
}

fn compiler(
    target: &str,
    fusion: bool,
    threads: usize,
    dims: Option<Vec<(String, u64)>>,
    tuning_db: Option<std::path::PathBuf>,
) -> kiln::Compiler {
    let mut c = kiln::Compiler::new(target).fusion(fusion).threads(threads);
    for (d, n) in dims.unwrap_or_default() {
        c = c.dim(&d, n);
    }
    if let Some(db) = tuning_db {
        c = c.tuning_db(&db);
    }
    c
}

/// Compiles an ONNX model (its serialized bytes; `name` is used in messages) for `target`; the
/// GIL is released meanwhile.
#[pyfunction]
#[pyo3(signature = (model_bytes, name, target="cpu", fusion=true, threads=0, dims=None, tuning_db=None))]
fn compile_bytes(
    py: Python<'_>,
    model_bytes: Vec<u8>,
    name: String,
    target: &str,
    fusion: bool,
    threads: usize,
    dims: Option<Vec<(String, u64)>>,
    tuning_db: Option<std::path::PathBuf>,
) -> PyResult<CompiledModel> {
    let c = compiler(target, fusion, threads, dims, tuning_db);
    let compiled = py.detach(move || {
        kiln::load_model_bytes(&model_bytes, &name).and_then(|m| c.compile(&m)).map(|m| Shared(m.into()))
    });
    Ok(CompiledModel { inner: compiled.map_err(to_py)? })
}

/// Compiles the ONNX model at `path` (external data resolved beside it) for `target`; the GIL
/// is released meanwhile.
#[pyfunction]
#[pyo3(signature = (path, target="cpu", fusion=true, threads=0, dims=None, tuning_db=None))]
fn compile_file(
    py: Python<'_>,
    path: std::path::PathBuf,
    target: &str,
    fusion: bool,
    threads: usize,
    dims: Option<Vec<(String, u64)>>,
    tuning_db: Option<std::path::PathBuf>,
) -> PyResult<CompiledModel> {
    let c = compiler(target, fusion, threads, dims, tuning_db);
    let compiled = py.detach(move || c.compile_file(&path).map(|m| Shared(m.into())));
    Ok(CompiledModel { inner: compiled.map_err(to_py)? })
}

/// Tunes every kernel of an ONNX model (its bytes) on `target`, appending to `tuning_db`;
/// returns the report as a JSON string. The GIL is released meanwhile.
#[pyfunction]
#[pyo3(signature = (model_bytes, name, tuning_db, target="cpu", trials=32, budget_s=None, resume=false, strategy="learned", seed=0, dims=None))]
fn tune_bytes(
    py: Python<'_>,
    model_bytes: Vec<u8>,
    name: String,
    tuning_db: std::path::PathBuf,
    target: &str,
    trials: usize,
    budget_s: Option<f64>,
    resume: bool,
    strategy: &str,
    seed: u64,
    dims: Option<Vec<(String, usize)>>,
) -> PyResult<String> {
    let strategy = strategy.parse().map_err(CompileError::new_err)?;
    let dims = dims.unwrap_or_default();
    let mut c = kiln::Compiler::new(target);
    for (d, n) in &dims {
        c = c.dim(d, *n as u64);
    }
    let opts = kiln::tune::TuneOptions {
        db: tuning_db,
        trials,
        budget: budget_s.map(std::time::Duration::from_secs_f64),
        resume,
        strategy,
        seed,
        dims: dims.into_iter().collect(),
        ..Default::default()
    };
    py.detach(move || {
        let m = kiln::load_model_bytes(&model_bytes, &name)?;
        let compiled = c.lower(&m)?;
        let r = kiln::tune::tune(&compiled, &opts, &mut |_, _| {})?;
        Ok(kiln::tune::report_json(&r).to_string())
    })
    .map_err(to_py)
}

/// Names of the targets kiln compiles for.
#[pyfunction]
fn targets() -> Vec<&'static str> {
    kiln::targets()
}

#[pymodule]
fn _kiln(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<CompiledModel>()?;
    m.add_function(wrap_pyfunction!(compile_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(compile_file, m)?)?;
    m.add_function(wrap_pyfunction!(tune_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(targets, m)?)?;
    m.add("KilnError", py.get_type::<KilnError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("CompileError", py.get_type::<CompileError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("RunError", py.get_type::<RunError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
