//! In-process native code from MLIR: a module of upstream dialects (func, scf, arith, math,
//! memref, vector) is lowered to the LLVM dialect by an MLIR pass pipeline (melior) and
//! compiled for the host by MLIR's execution engine (LLVM ORC JIT, optimization level 3).
//!
//! This is the bottom of the `cpu` target's path (issue #5: kernel dialect → upstream MLIR →
//! here). Functions are called through their C interface (`llvm.emit_c_interface`): every
//! argument is a memref, passed as a pointer to a strided descriptor ([`MemRef`]).

use crate::TargetError;
use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::{Context, ExecutionEngine};
use std::sync::Once;

unsafe extern "C" {
    // Exported by libMLIRCAPITarget (not bound by mlir-sys); the caller frees the result.
    fn mlirTranslateModuleToLLVMIRToString(module: mlir_sys::MlirOperation) -> *mut std::os::raw::c_char;
    fn free(p: *mut std::ffi::c_void);
}

/// The LLVM IR of a module already lowered to the LLVM dialect, or `None` if it does not
/// translate.
pub fn llvm_ir(module: &Module) -> Option<String> {
    // SAFETY: the module is a live, verified operation; the returned C string is owned by us.
    unsafe {
        let p = mlirTranslateModuleToLLVMIRToString(module.as_operation().to_raw());
        if p.is_null() {
            return None;
        }
        let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        free(p.cast());
        (!s.is_empty()).then_some(s)
    }
}

/// The lowering pipeline from upstream dialects to the LLVM dialect.
pub const PIPELINE: &str = "builtin.module(convert-vector-to-scf,convert-linalg-to-loops,lower-affine,\
convert-scf-to-cf,convert-vector-to-llvm,convert-math-to-llvm,expand-strided-metadata,\
convert-math-to-libm,finalize-memref-to-llvm,convert-to-llvm,reconcile-unrealized-casts)";

/// A JIT-compiled MLIR module.
pub struct Jit {
    // The engine owns the compiled code; the context must outlive it.
    engine: ExecutionEngine,
    _context: Box<Context>,
}

/// A strided memref descriptor over f32 data, as MLIR's C interface lays it out (any rank):
/// allocated and aligned pointers, offset, sizes, strides (in elements), all 64-bit words.
pub struct MemRef {
    words: Vec<i64>,
}

impl MemRef {
    /// A row-major view of `data` with `shape`. The caller keeps `data` alive and unmoved while
    /// the descriptor is used, and lets the kernel write it only if it may.
    pub fn new(data: *const f32, len: usize, shape: &[usize]) -> MemRef {
        assert_eq!(len, shape.iter().product::<usize>(), "shape {shape:?} does not match the data");
        let mut strides = vec![0i64; shape.len()];
        let mut s = 1i64;
        for i in (0..shape.len()).rev() {
            strides[i] = s;
            s *= shape[i] as i64;
        }
        let mut words = vec![data as i64, data as i64, 0];
        words.extend(shape.iter().map(|&d| d as i64));
        words.extend(strides);
        MemRef { words }
    }

    /// A view of a mutable slice.
    pub fn of(data: &mut [f32], shape: &[usize]) -> MemRef {
        MemRef::new(data.as_mut_ptr(), data.len(), shape)
    }
}

fn context() -> Context {
    static PASSES: Once = Once::new();
    PASSES.call_once(register_all_passes);
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let ctx = Context::new();
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    register_all_llvm_translations(&ctx);
    ctx
}

fn codegen(msg: impl std::fmt::Display) -> TargetError {
    TargetError::Codegen(msg.to_string())
}

impl Jit {
    /// Parses `mlir` (upstream dialects), lowers it to LLVM and compiles it for the host.
    pub fn compile(mlir: &str) -> Result<Jit, TargetError> {
        let ctx = Box::new(context());
        let mut module =
            Module::parse(&ctx, mlir).ok_or_else(|| codegen("the generated MLIR does not parse (a kiln bug)"))?;
        let pm = PassManager::new(&ctx);
        parse_pass_pipeline(pm.as_operation_pass_manager(), PIPELINE).map_err(codegen)?;
        pm.run(&mut module).map_err(|e| codegen(format!("lowering to the LLVM dialect failed: {e}")))?;
        if !module.as_operation().verify() {
            return Err(codegen("the lowered module does not verify (a kiln bug)"));
        }
        // The engine comes back null (and unusable) when translation fails: check first.
        if llvm_ir(&module).is_none() {
            return Err(codegen("the lowered module does not translate to LLVM IR (a kiln bug)"));
        }
        let engine = ExecutionEngine::new(&module, 3, &[], false, false);
        Ok(Jit { engine, _context: ctx })
    }

    /// Calls `name` (a function with `llvm.emit_c_interface` whose arguments are all f32
    /// memrefs) on `args`.
    ///
    /// # Safety
    /// The function's signature must be exactly `args.len()` memrefs of the descriptors' ranks
    /// and element type f32, and it must only access the elements the descriptors describe.
    pub unsafe fn call(&self, name: &str, args: &mut [MemRef]) -> Result<(), TargetError> {
        let mut ptrs: Vec<*mut i64> = args.iter_mut().map(|a| a.words.as_mut_ptr()).collect();
        let mut packed: Vec<*mut ()> = ptrs.iter_mut().map(|p| p as *mut *mut i64 as *mut ()).collect();
        if self.engine.lookup(&format!("_mlir__mlir_ciface_{name}")).is_null() {
            return Err(codegen(format!("no function {name} with a C interface in the compiled module")));
        }
        // SAFETY: the caller guarantees the signature; each packed entry points at a live
        // pointer to a live descriptor. (The C API prefixes `_mlir_ciface_` to the name.)
        unsafe { self.engine.invoke_packed(name, &mut packed) }.map_err(|e| codegen(format!("calling {name}: {e}")))
    }
}
