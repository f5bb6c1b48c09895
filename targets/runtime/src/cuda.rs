//! Launches the kernels of `kiln compile MODEL --target cuda -o DIR` through the CUDA driver
//! API, loaded at run time with `dlopen("libcuda.so.1")`: this crate builds everywhere and
//! links nothing of CUDA. Where no driver is installed, [`CudaKernels::load`] says so
//! ([`Error`] starting with [`NO_DRIVER`]).
//!
//! Each kernel of `DIR/manifest.json` is launched on its grid and block with one strided memref
//! descriptor per buffer (allocated pointer, aligned pointer, offset 0, sizes, row-major
//! strides), as the manifest's argument layout says. Kernels the manifest lists as host kernels
//! are not here: a driver of the whole model runs them on the host.

use crate::Error;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::Path;

/// How an error for a machine without the CUDA driver starts.
pub const NO_DRIVER: &str = "no CUDA driver";

type CuResult = c_int;
type CuDevicePtr = u64;

/// The driver entry points kiln uses.
struct Api {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    ctx_create: unsafe extern "C" fn(*mut *mut c_void, c_uint, c_int) -> CuResult,
    ctx_destroy: unsafe extern "C" fn(*mut c_void) -> CuResult,
    ctx_set_limit: unsafe extern "C" fn(c_int, usize) -> CuResult,
    ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    module_load_data: unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult,
    mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize) -> CuResult,
    dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
    launch: unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

/// One kernel of the manifest: its function and launch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelInfo {
    pub name: String,
    pub node: String,
    pub function: String,
    pub file: String,
    /// `None` while the threads depend on a symbolic dim (computed per launch from the inputs'
    /// shapes then: `threads` is the kernel's parallel extent).
    pub grid: Option<[u32; 3]>,
    pub block: [u32; 3],
    /// The columns of a two-dimensional grid (the manifest's `cols_known`).
    pub cols: Option<u64>,
    /// Buffers: (rank, is input, f32: else one byte per element, a bool tensor).
    pub args: Vec<(usize, bool, bool)>,
    pub local_bytes: Option<u64>,
}

/// The kernels of a compiled directory loaded on GPU 0.
pub struct CudaKernels {
    api: Api,
    handle: *mut c_void,
    ctx: *mut c_void,
    kernels: Vec<KernelInfo>,
    functions: Vec<*mut c_void>,
}

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `F` must be a function pointer type with the symbol's C signature.
unsafe fn cast<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size (checked); the caller vouches for the signature.
    unsafe { std::mem::transmute_copy(&p) }
}

fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

/// Reads the kernels of `DIR/manifest.json` (no driver needed).
pub fn read_manifest(dir: &Path) -> Result<Vec<KernelInfo>, Error> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("{}: not JSON: {e}", path.display())))?;
    if json["target"] != "cuda" {
        return Err(err(format!("{}: not a cuda manifest (target {})", path.display(), json["target"])));
    }
    let bad = |what: &str| err(format!("{}: kernel without {what}", path.display()));
    let three = |v: &serde_json::Value| -> Option<[u32; 3]> {
        let a = v.as_array()?;
        Some([a.first()?.as_u64()? as u32, a.get(1)?.as_u64()? as u32, a.get(2)?.as_u64()? as u32])
    };
    json["kernels"]
        .as_array()
        .ok_or_else(|| bad("a kernels list"))?
        .iter()
        .map(|k| {
            let s = |f: &str| k[f].as_str().map(str::to_string).ok_or_else(|| bad(f));
            let args = k["args"]
                .as_array()
                .ok_or_else(|| bad("args"))?
                .iter()
                .map(|a| {
                    let rank = a["shape"].as_array().ok_or_else(|| bad("an argument shape"))?.len();
                    Ok((rank, a["role"] == "input", a["dtype"] == "f32"))
                })
                .collect::<Result<_, Error>>()?;
            Ok(KernelInfo {
                name: s("name")?,
                node: s("node")?,
                function: s("function")?,
                file: s("file")?,
                grid: three(&k["grid"]),
                block: three(&k["block"]).ok_or_else(|| bad("block"))?,
                cols: k["cols_known"].as_u64(),
                args,
                local_bytes: k["local_bytes"].as_u64(),
            })
        })
        .collect()
}

impl CudaKernels {
    /// Opens the CUDA driver, creates a context on GPU 0 and loads every kernel's PTX from
    /// `dir` (the driver compiles it for the GPU). Without a driver: an error starting with
    /// [`NO_DRIVER`].
    pub fn load(dir: &Path) -> Result<CudaKernels, Error> {
        let kernels = read_manifest(dir)?;
        let lib = CString::new("libcuda.so.1").expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is closed in Drop.
        let handle = unsafe { crate::dlopen(lib.as_ptr(), crate::RTLD_NOW) };
        if handle.is_null() {
            // SAFETY: dlerror returns a C string or null.
            let why = unsafe {
                let e = crate::dlerror();
                if e.is_null() {
                    "not found".to_string()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            return Err(err(format!("{NO_DRIVER}: {why}")));
        }
        let sym = |name: &str| -> Result<*mut c_void, Error> {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: a live handle and a valid C string.
            let p = unsafe { crate::dlsym(handle, c.as_ptr()) };
            if p.is_null() {
                Err(err(format!("libcuda.so.1 has no {name}")))
            } else {
                Ok(p)
            }
        };
        // SAFETY: each symbol is the driver API function of that name, whose C signature the
        // field's type spells (CUDA driver API, `_v2` entry points for 64-bit pointers).
        let api = unsafe {
            Api {
                init: cast(sym("cuInit")?),
                device_get: cast(sym("cuDeviceGet")?),
                ctx_create: cast(sym("cuCtxCreate_v2")?),
                ctx_destroy: cast(sym("cuCtxDestroy_v2")?),
                ctx_set_limit: cast(sym("cuCtxSetLimit")?),
                ctx_synchronize: cast(sym("cuCtxSynchronize")?),
                module_load_data: cast(sym("cuModuleLoadData")?),
                module_get_function: cast(sym("cuModuleGetFunction")?),
                mem_alloc: cast(sym("cuMemAlloc_v2")?),
                mem_free: cast(sym("cuMemFree_v2")?),
                htod: cast(sym("cuMemcpyHtoD_v2")?),
                dtoh: cast(sym("cuMemcpyDtoH_v2")?),
                launch: cast(sym("cuLaunchKernel")?),
                error_string: cast(sym("cuGetErrorString")?),
            }
        };
        let mut me = CudaKernels { api, handle, ctx: std::ptr::null_mut(), kernels, functions: Vec::new() };
        // SAFETY: driver calls with valid out-pointers, in the order the driver API requires.
        unsafe {
            me.check((me.api.init)(0), "cuInit")?;
            let mut dev = 0;
            me.check((me.api.device_get)(&mut dev, 0), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            me.check((me.api.ctx_create)(&mut ctx, 0, dev), "cuCtxCreate")?;
            me.ctx = ctx;
            // Local buffers live on each thread's stack (CU_LIMIT_STACK_SIZE = 0).
            let stack = me.kernels.iter().filter_map(|k| k.local_bytes).max().unwrap_or(0);
            if stack > 0 {
                me.check((me.api.ctx_set_limit)(0, stack as usize + 1024), "cuCtxSetLimit(stack)")?;
            }
        }
        let mut modules: std::collections::HashMap<String, *mut c_void> = std::collections::HashMap::new();
        for k in me.kernels.clone() {
            let module = match modules.get(&k.file) {
                Some(&m) => m,
                None => {
                    let p = dir.join(&k.file);
                    let mut ptx = std::fs::read(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
                    ptx.push(0);
                    let mut m = std::ptr::null_mut();
                    // SAFETY: a NUL-terminated PTX image, alive for the call.
                    me.check(unsafe { (me.api.module_load_data)(&mut m, ptx.as_ptr().cast()) }, &k.file)?;
                    modules.insert(k.file.clone(), m);
                    m
                }
            };
            let name = CString::new(k.function.clone()).map_err(|_| err("a NUL in a function name"))?;
            let mut f = std::ptr::null_mut();
            // SAFETY: a loaded module and a valid C string.
            me.check(unsafe { (me.api.module_get_function)(&mut f, module, name.as_ptr()) }, &k.function)?;
            me.functions.push(f);
        }
        Ok(me)
    }

    /// The manifest's kernels, in program order.
    pub fn kernels(&self) -> &[KernelInfo] {
        &self.kernels
    }

    fn check(&self, r: CuResult, what: &str) -> Result<(), Error> {
        if r == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a static string or leaves null.
        unsafe { (self.api.error_string)(r, &mut s) };
        let why = if s.is_null() {
            format!("CUDA error {r}")
        } else {
            // SAFETY: a static C string from the driver.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(err(format!("{what}: {why}")))
    }

    /// Launches kernel `index` on `inputs` (f32 row-major, with their shapes), making outputs of
    /// `output_shapes`; `threads` sizes the grid when the manifest's grid is open (symbolic
    /// dims). Returns the outputs.
    pub fn launch(
        &self,
        index: usize,
        inputs: &[(&[f32], &[usize])],
        output_shapes: &[Vec<usize>],
        threads: Option<u64>,
    ) -> Result<Vec<Vec<f32>>, Error> {
        let k = self.kernels.get(index).ok_or_else(|| err(format!("no kernel {index}")))?;
        let f = self.functions[index];
        let n_in = k.args.iter().filter(|a| a.1).count();
        if inputs.len() != n_in || output_shapes.len() != k.args.len() - n_in {
            return Err(err(format!(
                "kernel {}: {} inputs and {} outputs given, the manifest has {} and {}",
                k.name,
                inputs.len(),
                output_shapes.len(),
                n_in,
                k.args.len() - n_in
            )));
        }
        if let Some(i) = k.args.iter().position(|a| !a.2) {
            return Err(err(format!(
                "kernel {}: buffer {i} is a bool tensor, which this launcher does not pass yet",
                k.name
            )));
        }
        let shapes: Vec<&[usize]> =
            inputs.iter().map(|(_, s)| *s).chain(output_shapes.iter().map(Vec::as_slice)).collect();
        let mut buffers: Vec<CuDevicePtr> = Vec::new();
        let result = (|| {
            for (i, s) in shapes.iter().enumerate() {
                if s.len() != k.args[i].0 {
                    return Err(err(format!(
                        "kernel {}: buffer {i} of rank {}, expected {}",
                        k.name,
                        s.len(),
                        k.args[i].0
                    )));
                }
                let bytes = s.iter().product::<usize>().max(1) * 4;
                let mut p = 0;
                // SAFETY: a valid out-pointer in the current context.
                self.check(unsafe { (self.api.mem_alloc)(&mut p, bytes) }, "cuMemAlloc")?;
                buffers.push(p);
                if let Some((data, _)) = inputs.get(i) {
                    // SAFETY: `data` holds the elements its shape says (checked by the caller's
                    // shapes; the copy reads exactly `len` elements).
                    self.check(unsafe { (self.api.htod)(p, data.as_ptr().cast(), data.len() * 4) }, "cuMemcpyHtoD")?;
                }
            }
            // The parameters: per buffer (ptr, ptr, 0, sizes..., strides...), 64-bit each.
            let mut words: Vec<u64> = Vec::new();
            for (s, &p) in shapes.iter().zip(&buffers) {
                words.extend([p, p, 0]);
                words.extend(s.iter().map(|&d| d as u64));
                let mut strides = vec![0u64; s.len()];
                let mut acc = 1u64;
                for d in (0..s.len()).rev() {
                    strides[d] = acc;
                    acc *= s[d] as u64;
                }
                words.extend(strides);
            }
            let mut params: Vec<*mut c_void> = words.iter_mut().map(|w| w as *mut u64 as *mut c_void).collect();
            let grid = match (k.grid, threads) {
                (Some(g), _) => g,
                (None, Some(t)) => match k.cols {
                    Some(c) if c > 0 => [
                        c.div_ceil(k.block[0] as u64).max(1) as u32,
                        (t / c).div_ceil(k.block[1] as u64).max(1) as u32,
                        1,
                    ],
                    _ => [t.div_ceil(k.block[0] as u64).max(1) as u32, 1, 1],
                },
                (None, None) => return Err(err(format!("kernel {}: an open grid needs the thread count", k.name))),
            };
            // SAFETY: `params` points at one value per kernel parameter, as the PTX entry
            // declares them (the manifest's layout); the buffers are live device allocations.
            self.check(
                unsafe {
                    (self.api.launch)(
                        f,
                        grid[0],
                        grid[1],
                        grid[2],
                        k.block[0],
                        k.block[1],
                        k.block[2],
                        0,
                        std::ptr::null_mut(),
                        params.as_mut_ptr(),
                        std::ptr::null_mut(),
                    )
                },
                &format!("cuLaunchKernel {}", k.name),
            )?;
            // SAFETY: no arguments.
            self.check(unsafe { (self.api.ctx_synchronize)() }, &format!("kernel {}", k.name))?;
            let mut outs = Vec::new();
            for (s, &p) in output_shapes.iter().zip(&buffers[n_in..]) {
                let mut o = vec![0f32; s.iter().product()];
                // SAFETY: the device buffer holds at least `o.len()` f32.
                self.check(unsafe { (self.api.dtoh)(o.as_mut_ptr().cast(), p, o.len() * 4) }, "cuMemcpyDtoH")?;
                outs.push(o);
            }
            Ok(outs)
        })();
        for p in buffers {
            // SAFETY: allocations of this call.
            unsafe { (self.api.mem_free)(p) };
        }
        result
    }
}

impl Drop for CudaKernels {
    fn drop(&mut self) {
        // SAFETY: the context (if made) and the handle are ours; nothing uses them after.
        unsafe {
            if !self.ctx.is_null() {
                (self.api.ctx_destroy)(self.ctx);
            }
            crate::dlclose(self.handle);
        }
    }
}
