//! Runs a model kiln compiled ahead of time, with nothing but the system's dynamic loader:
//! `kiln compile MODEL --target cpu -o DIR` writes `DIR/lib<name>.so`; [`Model::open`] loads
//! it and [`Model::run`] calls its entry point. This crate links no LLVM or MLIR.
//! Models compiled for `cuda` (`-o DIR` writes `DIR/plan.json`) run through [`gpu::Executor`]
//! on the CUDA driver ([`cuda::CudaDevice`]); the `kiln-gpu-run` binary wraps that.
//!
//! ```no_run
//! let model = kiln_runtime::Model::open("out/libmodel.so".as_ref())?;
//! let x = vec![0.5f32; model.inputs()[0].elements()];
//! let outputs = model.run(&[&x])?;
//! # Ok::<(), kiln_runtime::Error>(())
//! ```

pub mod cuda;
pub mod gpu;
pub mod npy;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

unsafe extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
    fn dlclose(handle: *mut c_void) -> c_int;
}

const RTLD_NOW: c_int = 2;

/// Why a model could not be loaded or run.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// An input or output of a model: its name and shape (f32, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Port {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

type RunFn = unsafe extern "C" fn(*const *const f32, *const *mut f32, *mut c_void) -> c_int;

/// A loaded model.
pub struct Model {
    handle: *mut c_void,
    run: RunFn,
    arena_bytes: usize,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by the loader.
    unsafe {
        let e = dlerror();
        if e.is_null() {
            "unknown loader error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn ports(v: &serde_json::Value, key: &str) -> Result<Vec<Port>, Error> {
    let bad = || Error(format!("the model's description has no valid '{key}'"));
    v[key]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|p| {
            let name = p["name"].as_str().ok_or_else(bad)?.to_string();
            let shape = p["shape"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            Ok(Port { name, shape })
        })
        .collect()
}

impl Model {
    /// Loads `lib<name>.so`.
    pub fn open(path: &Path) -> Result<Model, Error> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error(format!("{}: a path with a NUL byte", path.display())))?;
        // SAFETY: loading a shared library runs its initializers; kiln's have none of their own.
        let handle = unsafe { dlopen(c.as_ptr(), RTLD_NOW) };
        if handle.is_null() {
            return Err(Error(format!("{}: {}", path.display(), last_dl_error())));
        }
        let sym = |name: &str| -> Result<*mut c_void, Error> {
            let n = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: `handle` is a live library handle.
            let p = unsafe { dlsym(handle, n.as_ptr()) };
            if p.is_null() {
                Err(Error(format!("{}: not a kiln model (no {name})", path.display())))
            } else {
                Ok(p)
            }
        };
        let made = (|| {
            // SAFETY: kiln's AOT libraries define these with exactly these signatures.
            unsafe {
                let info: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(sym("kiln_info")?);
                let arena: unsafe extern "C" fn() -> usize = std::mem::transmute(sym("kiln_arena_bytes")?);
                let run: RunFn = std::mem::transmute(sym("kiln_run")?);
                let text = CStr::from_ptr(info()).to_string_lossy().into_owned();
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error(format!("{}: bad model description: {e}", path.display())))?;
                Ok(Model {
                    handle,
                    run,
                    arena_bytes: arena(),
                    inputs: ports(&v, "inputs")?,
                    outputs: ports(&v, "outputs")?,
                })
            }
        })();
        if made.is_err() {
            // SAFETY: nothing from the library outlives this.
            unsafe { dlclose(handle) };
        }
        made
    }

    pub fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    /// Scratch memory a run takes (the model's planned peak of intermediates).
    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }

    /// Runs the model on row-major f32 inputs, one slice per input of exactly its size.
    pub fn run(&self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> {
        if inputs.len() != self.inputs.len() {
            return Err(Error(format!("the model takes {} inputs, got {}", self.inputs.len(), inputs.len())));
        }
        for (p, x) in self.inputs.iter().zip(inputs) {
            if x.len() != p.elements() {
                return Err(Error(format!(
                    "input '{}' has shape {:?} ({} floats), got {}",
                    p.name,
                    p.shape,
                    p.elements(),
                    x.len()
                )));
            }
        }
        let mut outs: Vec<Vec<f32>> = self.outputs.iter().map(|p| vec![0.0; p.elements()]).collect();
        // 64-byte aligned scratch, as the generated code assumes.
        let mut arena: Vec<u128> = vec![0; self.arena_bytes.div_ceil(16) + 4];
        let base = arena.as_mut_ptr() as usize;
        let aligned = (base.div_ceil(64) * 64) as *mut c_void;
        let ins: Vec<*const f32> = inputs.iter().map(|x| x.as_ptr()).collect();
        let out_ptrs: Vec<*mut f32> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        // SAFETY: pointers to buffers of exactly the sizes the model declares, and an arena of
        // at least `arena_bytes` bytes at a 64-byte boundary.
        let rc = unsafe { (self.run)(ins.as_ptr(), out_ptrs.as_ptr(), aligned) };
        if rc != 0 {
            return Err(Error(format!("the model's run failed (code {rc})")));
        }
        Ok(outs)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and no code from it runs after this.
        unsafe { dlclose(self.handle) };
    }
}
