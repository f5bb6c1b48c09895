//! kiln's C API: compile an ONNX model for a target and run it, from C or C++.
//!
//! The header, `include/kiln.h`, is generated from this file by cbindgen at build time.
//!
//! Contract:
//! - Every function returns a [`KilnStatus`]; on failure [`kiln_last_error`] gives a one-line
//!   message naming the file, node and op involved (per thread, valid until the next call).
//! - Handles ([`KilnModel`], [`KilnTensor`]) are opaque. Every handle passed in is checked
//!   against the set of live handles: a freed ("closed") or foreign pointer is reported as
//!   [`KilnStatus::KILN_ERR_INVALID_HANDLE`] (NULL as `KILN_ERR_NULL_ARGUMENT`), never
//!   dereferenced.
//! - No panic crosses the boundary: one is caught and reported as
//!   [`KilnStatus::KILN_ERR_INTERNAL`].
//! - A model is not thread-safe: use each from one thread at a time.

use kiln::{DType, Dim, Error, Tensor};
use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

/// What a call did. `KILN_OK` is 0; every other value is an error, described by
/// `kiln_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)] // C names: the header spells them as C code does.
pub enum KilnStatus {
    KILN_OK = 0,
    /// A required pointer argument is null.
    KILN_ERR_NULL_ARGUMENT = 1,
    /// A handle that is not live: already freed ("closed"), or not made by kiln.
    KILN_ERR_INVALID_HANDLE = 2,
    /// An argument is out of range or malformed (an index, a string that is not UTF-8, an
    /// unknown element type, a data size that does not match the shape).
    KILN_ERR_INVALID_ARGUMENT = 3,
    /// The model file cannot be read, decoded or imported.
    KILN_ERR_MODEL = 4,
    /// The target is unknown, or the model cannot be compiled for it.
    KILN_ERR_COMPILE = 5,
    /// The inputs do not match the model: their number, an element type or a shape.
    KILN_ERR_INPUT = 6,
    /// Running the model failed.
    KILN_ERR_RUN = 7,
    /// A bug in kiln (a caught panic).
    KILN_ERR_INTERNAL = 8,
}

use KilnStatus::*;

/// Element types: ONNX's `TensorProto.DataType` codes, for the types the C API exchanges.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KilnDType {
    KILN_FLOAT = 1,
    KILN_UINT8 = 2,
    KILN_INT8 = 3,
    KILN_UINT16 = 4,
    KILN_INT16 = 5,
    KILN_INT32 = 6,
    KILN_INT64 = 7,
    KILN_BOOL = 9,
    KILN_FLOAT16 = 10,
    KILN_DOUBLE = 11,
    KILN_UINT32 = 12,
    KILN_UINT64 = 13,
    KILN_BFLOAT16 = 16,
}

impl KilnDType {
    fn from_code(code: i32) -> Option<KilnDType> {
        use KilnDType::*;
        Some(match code {
            1 => KILN_FLOAT,
            2 => KILN_UINT8,
            3 => KILN_INT8,
            4 => KILN_UINT16,
            5 => KILN_INT16,
            6 => KILN_INT32,
            7 => KILN_INT64,
            9 => KILN_BOOL,
            10 => KILN_FLOAT16,
            11 => KILN_DOUBLE,
            12 => KILN_UINT32,
            13 => KILN_UINT64,
            16 => KILN_BFLOAT16,
            _ => return None,
        })
    }

    fn dtype(self) -> DType {
        DType::from_onnx_code(self as i64).expect("every KilnDType is an ONNX type kiln has")
    }
}

/// How to compile: start from `kiln_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnOptions {
    /// Target name (`"cpu"`, `"ref"`, `"npu"`, `"rvv"`; see `kiln_targets`). NULL: `"cpu"`.
    pub target: *const c_char,
    /// E-graph rewriting and kernel fusion.
    pub fusion: bool,
    /// Threads native kernels run on; 0: every core.
    pub threads: u32,
}

/// A compiled model (opaque).
pub struct KilnModel {
    compiled: kiln::CompiledModel,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
}

struct IoInfo {
    name: CString,
    dtype: i32,
    /// -1 for a symbolic dim (its size is known when the model runs).
    dims: Vec<i64>,
}

/// A tensor kiln made (a model output; opaque): read it with `kiln_tensor_*`, free it with
/// `kiln_tensor_free`.
pub struct KilnTensor {
    dtype: i32,
    shape: Vec<i64>,
    bytes: Vec<u8>,
}

/// An input tensor, borrowed for the duration of `kiln_run`: `data` holds the elements in
/// row-major order, little-endian (bool: one byte each).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnTensorView {
    pub dtype: KilnDType,
    pub shape: *const i64,
    pub rank: usize,
    pub data: *const c_void,
    /// Size of `data` in bytes (checked against the shape).
    pub nbytes: usize,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The live handles: address and type (a tensor handle passed as a model is not live).
static LIVE: Mutex<Option<HashSet<(usize, std::any::TypeId)>>> = Mutex::new(None);

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<(usize, std::any::TypeId)>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn key<T: 'static>(p: *const T) -> (usize, std::any::TypeId) {
    (p as usize, std::any::TypeId::of::<T>())
}

fn register<T: 'static>(b: Box<T>) -> *mut T {
    let p = Box::into_raw(b);
    live().get_or_insert_with(HashSet::new).insert(key(p));
    p
}

fn is_live<T: 'static>(p: *const T) -> bool {
    !p.is_null() && live().as_ref().is_some_and(|s| s.contains(&key(p)))
}

/// Takes `p` out of the live set; `true` when it was live (and may now be freed).
fn unregister<T: 'static>(p: *const T) -> bool {
    !p.is_null() && live().as_mut().is_some_and(|s| s.remove(&key(p)))
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

type Failure = (KilnStatus, String);

fn fail(status: KilnStatus, msg: impl Into<String>) -> Failure {
    (status, msg.into())
}

/// Runs `f`, catching panics, and turns its result into a status (setting the last error).
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> KilnStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            KILN_OK
        }
        Ok(Err((status, msg))) => {
            set_error(&msg);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error in kiln (please report): {what}"));
            KILN_ERR_INTERNAL
        }
    }
}

fn status_of(e: &Error) -> KilnStatus {
    match e {
        Error::Frontend(_) | Error::Verify { .. } | Error::Io { .. } => KILN_ERR_MODEL,
        Error::Input { .. } => KILN_ERR_INPUT,
        Error::Run { .. } | Error::Check(_) => KILN_ERR_RUN,
        Error::Target(_) | Error::Pass { .. } | Error::UnknownTarget(_) | Error::Usage(_) => KILN_ERR_COMPILE,
    }
}

fn kiln_err(e: Error) -> Failure {
    (status_of(&e), e.to_string())
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(fail(KILN_ERR_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| fail(KILN_ERR_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

fn out_arg<T>(p: *mut T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(fail(KILN_ERR_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    Ok(())
}

fn model_ref<'a>(m: *const KilnModel) -> Result<&'a KilnModel, Failure> {
    if m.is_null() {
        return Err(fail(KILN_ERR_NULL_ARGUMENT, "the model handle is NULL"));
    }
    if !is_live(m) {
        return Err(fail(KILN_ERR_INVALID_HANDLE, "the model handle is not live (freed, or not made by kiln)"));
    }
    // SAFETY: live handles point to models made by `register` and not yet freed.
    Ok(unsafe { &*m })
}

fn tensor_ref<'a>(t: *const KilnTensor) -> Result<&'a KilnTensor, Failure> {
    if t.is_null() {
        return Err(fail(KILN_ERR_NULL_ARGUMENT, "the tensor handle is NULL"));
    }
    if !is_live(t) {
        return Err(fail(KILN_ERR_INVALID_HANDLE, "the tensor handle is not live (freed, or not made by kiln)"));
    }
    // SAFETY: as in `model_ref`.
    Ok(unsafe { &*t })
}

fn io_info(list: Vec<(String, kiln::TensorType)>) -> Vec<IoInfo> {
    list.into_iter()
        .map(|(name, ty)| IoInfo {
            name: CString::new(name.replace('\0', " ")).unwrap_or_default(),
            dtype: ty.dtype.onnx_code(),
            dims: ty
                .shape
                .unwrap_or_default()
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => *n as i64,
                    _ => -1,
                })
                .collect(),
        })
        .collect()
}

/// The default options: target `"cpu"`, fusion on, every core.
#[no_mangle]
pub extern "C" fn kiln_options_default() -> KilnOptions {
    KilnOptions { target: std::ptr::null(), fusion: true, threads: 0 }
}

/// kiln's version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn kiln_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of this thread's last failed call ("" after a successful one). Valid until the
/// thread's next kiln call; never NULL.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// # Safety
/// `opts` is null or points to a `KilnOptions`.
unsafe fn compile(
    load: impl FnOnce() -> Result<kiln::Module, Failure>,
    opts: *const KilnOptions,
    out: *mut *mut KilnModel,
) -> KilnStatus {
    guard(|| {
        out_arg(out, "out")?;
        // SAFETY: the caller passes null or a valid `KilnOptions`.
        let o = if opts.is_null() { kiln_options_default() } else { unsafe { *opts } };
        let target = if o.target.is_null() { "cpu" } else { unsafe { str_arg(o.target, "options.target") }? };
        let module = load()?;
        let compiled = kiln::Compiler::new(target)
            .fusion(o.fusion)
            .threads(o.threads as usize)
            .compile(&module)
            .map_err(kiln_err)?;
        let m = KilnModel { inputs: io_info(compiled.inputs()), outputs: io_info(compiled.outputs()), compiled };
        // SAFETY: `out` is not null (checked) and points to writable storage.
        unsafe { *out = register(Box::new(m)) };
        Ok(())
    })
}

/// Reads the ONNX model at `path` and compiles it with `opts` (NULL: the defaults). On success
/// `*out` is a model handle, to be freed with `kiln_model_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `opts` is NULL or valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_compile_file(
    path: *const c_char,
    opts: *const KilnOptions,
    out: *mut *mut KilnModel,
) -> KilnStatus {
    if !out.is_null() {
        // SAFETY: `out` is writable.
        unsafe { *out = std::ptr::null_mut() };
    }
    // SAFETY: forwarded contract.
    unsafe { compile(|| kiln::load_model(str_arg(path, "path")?.as_ref()).map_err(kiln_err), opts, out) }
}

/// Compiles an ONNX model held in memory (`len` bytes at `data`); `name` (NULL: "model") is used
/// in messages.
///
/// # Safety
/// `data` points to `len` readable bytes; `name` is NULL or NUL-terminated; `opts` is NULL or
/// valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_compile_bytes(
    data: *const u8,
    len: usize,
    name: *const c_char,
    opts: *const KilnOptions,
    out: *mut *mut KilnModel,
) -> KilnStatus {
    if !out.is_null() {
        // SAFETY: `out` is writable.
        unsafe { *out = std::ptr::null_mut() };
    }
    if data.is_null() {
        set_error("data is NULL");
        return KILN_ERR_NULL_ARGUMENT;
    }
    // SAFETY: the caller passes `len` readable bytes at `data`.
    let bytes = unsafe { std::slice::from_raw_parts(data, len) };
    // SAFETY: forwarded contract.
    unsafe {
        compile(
            || {
                let n = if name.is_null() { "model" } else { str_arg(name, "name")? };
                kiln::load_model_bytes(bytes, n).map_err(kiln_err)
            },
            opts,
            out,
        )
    }
}

/// Frees a model. NULL returns `KILN_ERR_NULL_ARGUMENT`, a handle that is not live (freed
/// already) `KILN_ERR_INVALID_HANDLE`; neither frees anything.
///
/// # Safety
/// `model` is any pointer; only live model handles are dereferenced.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_free(model: *mut KilnModel) -> KilnStatus {
    guard(|| {
        model_ref(model)?;
        if unregister(model) {
            // SAFETY: it was live, so it came from `Box::into_raw` and is freed once.
            drop(unsafe { Box::from_raw(model) });
        }
        Ok(())
    })
}

/// Numbers of inputs and outputs of a model.
///
/// # Safety
/// Output pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_io_count(
    model: *const KilnModel,
    num_inputs: *mut usize,
    num_outputs: *mut usize,
) -> KilnStatus {
    guard(|| {
        let m = model_ref(model)?;
        out_arg(num_inputs, "num_inputs")?;
        out_arg(num_outputs, "num_outputs")?;
        // SAFETY: checked not null; the caller passes writable storage.
        unsafe {
            *num_inputs = m.inputs.len();
            *num_outputs = m.outputs.len();
        }
        Ok(())
    })
}

/// Describes input (`is_output` false) or output `index`: its name (valid while the model
/// lives), element type (ONNX code), rank, and dims (-1 where symbolic). `dims` may be NULL;
/// otherwise it has room for `max_dims` values, and the first `min(rank, max_dims)` are written.
///
/// # Safety
/// Output pointers are NULL or writable; `dims` has room for `max_dims` values.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_io(
    model: *const KilnModel,
    is_output: bool,
    index: usize,
    name: *mut *const c_char,
    dtype: *mut i32,
    rank: *mut usize,
    dims: *mut i64,
    max_dims: usize,
) -> KilnStatus {
    guard(|| {
        let m = model_ref(model)?;
        let list = if is_output { &m.outputs } else { &m.inputs };
        let what = if is_output { "output" } else { "input" };
        let info = list.get(index).ok_or_else(|| {
            fail(
                KILN_ERR_INVALID_ARGUMENT,
                format!("{what} index {index} is out of range (the model has {})", list.len()),
            )
        })?;
        out_arg(name, "name")?;
        out_arg(dtype, "dtype")?;
        out_arg(rank, "rank")?;
        // SAFETY: checked not null; the caller passes writable storage (`max_dims` at `dims`).
        unsafe {
            *name = info.name.as_ptr();
            *dtype = info.dtype;
            *rank = info.dims.len();
            if !dims.is_null() {
                for (i, &d) in info.dims.iter().take(max_dims).enumerate() {
                    *dims.add(i) = d;
                }
            }
        }
        Ok(())
    })
}

/// # Safety
/// `v` points to a valid view whose pointers cover what it declares.
unsafe fn tensor_from_view(v: &KilnTensorView, i: usize) -> Result<Tensor, Failure> {
    let bad = |msg: String| fail(KILN_ERR_INVALID_ARGUMENT, format!("input {i}: {msg}"));
    let dtype =
        KilnDType::from_code(v.dtype as i32).ok_or_else(|| bad(format!("unknown element type {}", v.dtype as i32)))?;
    if v.rank > 0 && v.shape.is_null() {
        return Err(fail(KILN_ERR_NULL_ARGUMENT, format!("input {i}: shape is NULL for rank {}", v.rank)));
    }
    let shape: &[i64] = if v.rank == 0 {
        &[]
    } else {
        // SAFETY: `shape` has `rank` values (caller contract).
        unsafe { std::slice::from_raw_parts(v.shape, v.rank) }
    };
    if let Some(d) = shape.iter().find(|&&d| d < 0) {
        return Err(bad(format!("negative dim {d} in shape {shape:?}")));
    }
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let dt = dtype.dtype();
    let want = shape.iter().try_fold(dt.size_bytes(), |a, &d| a.checked_mul(d));
    if want != Some(v.nbytes) {
        return Err(bad(format!(
            "{} bytes of data for a {dt} tensor of shape {shape:?}, which needs {}",
            v.nbytes,
            want.map_or("more than memory holds".to_string(), |w| w.to_string())
        )));
    }
    if v.nbytes > 0 && v.data.is_null() {
        return Err(fail(KILN_ERR_NULL_ARGUMENT, format!("input {i}: data is NULL")));
    }
    let raw: &[u8] = if v.nbytes == 0 {
        &[]
    } else {
        // SAFETY: `data` has `nbytes` readable bytes (caller contract).
        unsafe { std::slice::from_raw_parts(v.data.cast::<u8>(), v.nbytes) }
    };
    let data =
        kiln::Data::from_le_bytes(dt, raw).ok_or_else(|| bad("the data is not a whole number of elements".into()))?;
    Ok(Tensor::new(shape, data))
}

/// Runs a model. `inputs` are `num_inputs` views in the model's input order; on success
/// `outputs[0..num_outputs]` receive new tensor handles (free each with `kiln_tensor_free`).
/// `num_outputs` must be the model's number of outputs.
///
/// # Safety
/// `inputs` has `num_inputs` valid views; `outputs` has room for `num_outputs` handles.
#[no_mangle]
pub unsafe extern "C" fn kiln_run(
    model: *mut KilnModel,
    inputs: *const KilnTensorView,
    num_inputs: usize,
    outputs: *mut *mut KilnTensor,
    num_outputs: usize,
) -> KilnStatus {
    guard(|| {
        let m = model_ref(model)?;
        if num_inputs > 0 && inputs.is_null() {
            return Err(fail(KILN_ERR_NULL_ARGUMENT, "inputs is NULL"));
        }
        out_arg(outputs, "outputs")?;
        if num_outputs != m.outputs.len() {
            return Err(fail(
                KILN_ERR_INVALID_ARGUMENT,
                format!("num_outputs is {num_outputs}, the model has {} outputs", m.outputs.len()),
            ));
        }
        let views: &[KilnTensorView] = if num_inputs == 0 {
            &[]
        } else {
            // SAFETY: `inputs` has `num_inputs` views (caller contract).
            unsafe { std::slice::from_raw_parts(inputs, num_inputs) }
        };
        let mut ts = Vec::with_capacity(views.len());
        for (i, v) in views.iter().enumerate() {
            // SAFETY: each view is valid (caller contract).
            ts.push(unsafe { tensor_from_view(v, i) }?);
        }
        let outs = m.compiled.run(ts).map_err(kiln_err)?;
        for (i, t) in outs.into_iter().enumerate() {
            let h = KilnTensor {
                dtype: t.dtype().onnx_code(),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                bytes: t.data.to_le_bytes(),
            };
            // SAFETY: `outputs` has room for `num_outputs` handles (caller contract).
            unsafe { *outputs.add(i) = register(Box::new(h)) };
        }
        Ok(())
    })
}

/// A tensor's element type (ONNX code), rank and shape (valid while the tensor lives).
///
/// # Safety
/// Output pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_tensor_shape(
    tensor: *const KilnTensor,
    dtype: *mut i32,
    rank: *mut usize,
    shape: *mut *const i64,
) -> KilnStatus {
    guard(|| {
        let t = tensor_ref(tensor)?;
        out_arg(dtype, "dtype")?;
        out_arg(rank, "rank")?;
        out_arg(shape, "shape")?;
        // SAFETY: checked not null; writable (caller contract).
        unsafe {
            *dtype = t.dtype;
            *rank = t.shape.len();
            *shape = t.shape.as_ptr();
        }
        Ok(())
    })
}

/// A tensor's elements, row-major and little-endian, and their size in bytes (valid while the
/// tensor lives).
///
/// # Safety
/// Output pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_tensor_data(
    tensor: *const KilnTensor,
    data: *mut *const c_void,
    nbytes: *mut usize,
) -> KilnStatus {
    guard(|| {
        let t = tensor_ref(tensor)?;
        out_arg(data, "data")?;
        out_arg(nbytes, "nbytes")?;
        // SAFETY: checked not null; writable (caller contract).
        unsafe {
            *data = t.bytes.as_ptr().cast();
            *nbytes = t.bytes.len();
        }
        Ok(())
    })
}

/// Frees a tensor made by `kiln_run`. NULL returns `KILN_ERR_NULL_ARGUMENT`, a handle that is
/// not live `KILN_ERR_INVALID_HANDLE`; neither frees anything.
///
/// # Safety
/// `tensor` is any pointer; only live tensor handles are dereferenced.
#[no_mangle]
pub unsafe extern "C" fn kiln_tensor_free(tensor: *mut KilnTensor) -> KilnStatus {
    guard(|| {
        tensor_ref(tensor)?;
        if unregister(tensor) {
            // SAFETY: it was live, so it came from `Box::into_raw` and is freed once.
            drop(unsafe { Box::from_raw(tensor) });
        }
        Ok(())
    })
}

/// The targets kiln compiles for, comma-separated (a static string).
#[no_mangle]
pub extern "C" fn kiln_targets() -> *const c_char {
    static NAMES: std::sync::OnceLock<CString> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| CString::new(kiln::targets().join(",")).unwrap_or_default()).as_ptr()
}
