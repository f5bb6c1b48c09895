//! The CUDA driver as a [`Device`] for kiln's GPU plans ([`crate::gpu`]): the driver API is
//! loaded at run time with `dlopen("libcuda.so.1")`, so this crate builds everywhere and links
//! nothing of CUDA. Where no driver is installed, [`CudaDevice::open`] says so ([`Error`]
//! starting with [`NO_DRIVER`]).
//!
//! Each function is loaded from its PTX file (the driver compiles it for GPU 0) and launched on
//! its grid and block with one 64-bit value per parameter: a strided memref descriptor per
//! buffer (allocated pointer, aligned pointer, offset 0, sizes, row-major strides).

use crate::gpu::Device;
use crate::Error;
use std::collections::HashMap;
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

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `F` must be a function pointer type with the symbol's C signature.
unsafe fn cast<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size (checked); the caller vouches for the signature.
    unsafe { std::mem::transmute_copy(&p) }
}

/// GPU 0 through the CUDA driver: a context, the loaded modules and functions.
pub struct CudaDevice {
    api: Api,
    handle: *mut c_void,
    ctx: *mut c_void,
    modules: HashMap<String, *mut c_void>,
    functions: HashMap<String, *mut c_void>,
    allocations: Vec<CuDevicePtr>,
}

fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

impl CudaDevice {
    /// Opens the CUDA driver and creates a context on GPU 0. Without a driver: an error
    /// starting with [`NO_DRIVER`].
    pub fn open() -> Result<CudaDevice, Error> {
        let lib = CString::new("libcuda.so.1").expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is closed in Drop.
        let handle = unsafe { crate::dlopen(lib.as_ptr(), crate::RTLD_NOW) };
        if handle.is_null() {
            return Err(err(format!("{NO_DRIVER}: {}", crate::last_dl_error())));
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
        let api = (|| unsafe {
            Ok::<Api, Error>(Api {
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
            })
        })();
        let api = match api {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: nothing from the library is in use.
                unsafe { crate::dlclose(handle) };
                return Err(e);
            }
        };
        let mut me = CudaDevice {
            api,
            handle,
            ctx: std::ptr::null_mut(),
            modules: HashMap::new(),
            functions: HashMap::new(),
            allocations: Vec::new(),
        };
        // SAFETY: driver calls with valid out-pointers, in the order the driver API requires.
        unsafe {
            me.check((me.api.init)(0), "cuInit")?;
            let mut dev = 0;
            me.check((me.api.device_get)(&mut dev, 0), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            me.check((me.api.ctx_create)(&mut ctx, 0, dev), "cuCtxCreate")?;
            me.ctx = ctx;
        }
        Ok(me)
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
        Err(err(format!("{what}: {why} (CUDA error {r})")))
    }
}

impl Device for CudaDevice {
    fn load(&mut self, dir: &Path, file: &str, function: &str) -> Result<(), Error> {
        let module = match self.modules.get(file) {
            Some(&m) => m,
            None => {
                let p = dir.join(file);
                let mut ptx = std::fs::read(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
                ptx.push(0);
                let mut m = std::ptr::null_mut();
                // SAFETY: a NUL-terminated PTX image, alive for the call.
                self.check(unsafe { (self.api.module_load_data)(&mut m, ptx.as_ptr().cast()) }, file)?;
                self.modules.insert(file.to_string(), m);
                m
            }
        };
        let name = CString::new(function).map_err(|_| err("a NUL in a function name"))?;
        let mut f = std::ptr::null_mut();
        // SAFETY: a loaded module and a valid C string.
        self.check(unsafe { (self.api.module_get_function)(&mut f, module, name.as_ptr()) }, function)?;
        self.functions.insert(function.to_string(), f);
        Ok(())
    }

    fn set_stack(&mut self, bytes: u64) -> Result<(), Error> {
        // Local buffers live on each thread's stack (CU_LIMIT_STACK_SIZE = 0).
        // SAFETY: a plain driver call in the current context.
        self.check(unsafe { (self.api.ctx_set_limit)(0, bytes as usize + 1024) }, "cuCtxSetLimit(stack)")
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, Error> {
        let mut p = 0;
        // SAFETY: a valid out-pointer in the current context.
        self.check(unsafe { (self.api.mem_alloc)(&mut p, bytes.max(1)) }, &format!("cuMemAlloc({bytes} bytes)"))?;
        self.allocations.push(p);
        Ok(p)
    }

    fn upload(&mut self, to: u64, data: &[u8]) -> Result<(), Error> {
        // SAFETY: `data` is live for the copy; the caller gives a device range of its size.
        self.check(unsafe { (self.api.htod)(to, data.as_ptr().cast(), data.len()) }, "cuMemcpyHtoD")
    }

    fn download(&mut self, from: u64, out: &mut [u8]) -> Result<(), Error> {
        // SAFETY: `out` is live and writable for the copy.
        self.check(unsafe { (self.api.dtoh)(out.as_mut_ptr().cast(), from, out.len()) }, "cuMemcpyDtoH")
    }

    fn launch(
        &mut self,
        function: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        params: &[u64],
    ) -> Result<(), Error> {
        let f = *self.functions.get(function).ok_or_else(|| err(format!("function {function} was not loaded")))?;
        let mut words = params.to_vec();
        let mut ptrs: Vec<*mut c_void> = words.iter_mut().map(|w| w as *mut u64 as *mut c_void).collect();
        // SAFETY: `ptrs` points at one 64-bit value per kernel parameter, as the PTX entry
        // declares them (the plan's layout), alive for the call (the driver copies them).
        self.check(
            unsafe {
                (self.api.launch)(
                    f,
                    grid[0],
                    grid[1],
                    grid[2],
                    block[0],
                    block[1],
                    block[2],
                    shared,
                    std::ptr::null_mut(),
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            &format!("cuLaunchKernel {function}"),
        )
    }

    fn synchronize(&mut self) -> Result<(), Error> {
        // SAFETY: no arguments.
        self.check(unsafe { (self.api.ctx_synchronize)() }, "cuCtxSynchronize")
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: the allocations, the context (if made) and the handle are ours; nothing uses
        // them after.
        unsafe {
            for &p in &self.allocations {
                (self.api.mem_free)(p);
            }
            if !self.ctx.is_null() {
                (self.api.ctx_destroy)(self.ctx);
            }
            crate::dlclose(self.handle);
        }
    }
}
