//! In-process native code from MLIR: a module of upstream dialects (func, scf, arith, math,
//! memref, vector) is lowered to the LLVM dialect by an MLIR pass pipeline (melior), translated
//! to LLVM IR, optimized by LLVM's `default<O3>` pipeline for the host CPU (its name and
//! features on every function, so the vectorizers use AVX2/AVX-512/FMA or NEON) and compiled
//! in process by LLVM's MCJIT (inkwell).
//!
//! This is the bottom of the `cpu` target's path (issue #5: kernel dialect → upstream MLIR →
//! here). The same lowering and optimization serve other machines ([`CodeTarget`]): `rvv`
//! takes the optimized module as a riscv64 object ([`emit_for`]) and runs it under qemu. Functions are called through their C interface (`llvm.emit_c_interface`) and a
//! packed wrapper kiln adds for each (`_mlir_<name>`, one pointer per argument, as MLIR's own
//! execution engine does): every memref argument is a pointer to a strided descriptor
//! ([`MemRef`]).

use crate::TargetError;
use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;
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
convert-scf-to-cf,convert-vector-to-llvm,convert-math-to-llvm,expand-strided-metadata,lower-affine,\
convert-math-to-libm,finalize-memref-to-llvm,convert-to-llvm,reconcile-unrealized-casts)";

/// A compiled function's packed entry point (see [`Jit::entry`]); plain code, callable from
/// any thread.
#[derive(Clone, Copy)]
pub struct Entry(pub unsafe extern "C" fn(*mut *mut ()));

/// A JIT-compiled MLIR module.
pub struct Jit {
    // Owns the module and its code; dropped before the context it was made in (see Drop).
    engine: std::mem::ManuallyDrop<inkwell::execution_engine::ExecutionEngine<'static>>,
    context: *mut inkwell::context::Context,
    /// The optimized LLVM IR that was compiled.
    ir: String,
}

// SAFETY: the engine is only used to look functions up after construction; compiled code is
// plain machine code callable from any thread.
unsafe impl Send for Jit {}
unsafe impl Sync for Jit {}

impl Drop for Jit {
    fn drop(&mut self) {
        // SAFETY: the engine (and the module it owns) was made in `context`, which outlives it
        // by being freed only here, after it.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.engine);
            drop(Box::from_raw(self.context));
        }
    }
}

/// A strided memref descriptor over f32 data, as MLIR's C interface lays it out (any rank):
/// allocated and aligned pointers, offset, sizes, strides (in elements), all 64-bit words.
pub struct MemRef {
    words: Vec<i64>,
}

impl MemRef {
    /// The descriptor's words (what a C-interface function's memref argument points at).
    pub fn as_mut_ptr(&mut self) -> *mut i64 {
        self.words.as_mut_ptr()
    }
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

pub(crate) fn context() -> Context {
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

/// Lowers `mlir` (upstream dialects) to the LLVM dialect and translates it to LLVM IR (not
/// optimized yet).
pub fn to_llvm_ir(mlir: &str) -> Result<String, TargetError> {
    let ctx = context();
    let mut module =
        Module::parse(&ctx, mlir).ok_or_else(|| codegen("the generated MLIR does not parse (a kiln bug)"))?;
    let pm = PassManager::new(&ctx);
    parse_pass_pipeline(pm.as_operation_pass_manager(), PIPELINE).map_err(codegen)?;
    pm.run(&mut module).map_err(|e| codegen(format!("lowering to the LLVM dialect failed: {e}")))?;
    if !module.as_operation().verify() {
        return Err(codegen("the lowered module does not verify (a kiln bug)"));
    }
    llvm_ir(&module).ok_or_else(|| codegen("the lowered module does not translate to LLVM IR (a kiln bug)"))
}

/// The machine LLVM generates code for: a target triple, a CPU name and its features. The
/// `cpu` target compiles for [`CodeTarget::host`], `rvv` for [`CodeTarget::riscv64`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeTarget {
    pub triple: String,
    pub cpu: String,
    pub features: String,
}

impl CodeTarget {
    /// The host as LLVM detects it: its triple, CPU name and every feature it has (AVX2,
    /// AVX-512, FMA or NEON), so the vectorizers use them.
    pub fn host() -> CodeTarget {
        use inkwell::targets::TargetMachine;
        CodeTarget {
            triple: TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned(),
            cpu: TargetMachine::get_host_cpu_name().to_string(),
            features: TargetMachine::get_host_cpu_features().to_string(),
        }
    }

    /// 64-bit RISC-V Linux, RV64GC with the vector extension (V 1.0) and vector registers of at
    /// least `vlen` bits (`Zvl<vlen>b`): LLVM sizes fixed-length vectors and scalable loops'
    /// minimum trip by it, so the code needs a machine (or `qemu -cpu rv64,vlen=...`) with at
    /// least that VLEN. The ABI is lp64d, LLVM's default with `+d`.
    pub fn riscv64(vlen: u32) -> CodeTarget {
        CodeTarget {
            triple: "riscv64-unknown-linux-gnu".into(),
            cpu: "generic-rv64".into(),
            features: format!("+m,+a,+f,+d,+c,+v,+zvl{vlen}b"),
        }
    }

    /// LLVM's target machine for it, optimizing at `-O3`, position-independent code.
    pub fn machine(&self) -> Result<inkwell::targets::TargetMachine, TargetError> {
        use inkwell::targets::{CodeModel, InitializationConfig, RelocMode, Target as LlvmTarget, TargetTriple};
        let cfg = InitializationConfig::default();
        if self.triple.starts_with("riscv") {
            LlvmTarget::initialize_riscv(&cfg);
        } else {
            LlvmTarget::initialize_native(&cfg).map_err(codegen)?;
        }
        let triple = TargetTriple::create(&self.triple);
        let target = LlvmTarget::from_triple(&triple).map_err(|e| codegen(e.to_string()))?;
        target
            .create_target_machine(
                &triple,
                &self.cpu,
                &self.features,
                inkwell::OptimizationLevel::Aggressive,
                RelocMode::PIC,
                CodeModel::Default,
            )
            .ok_or_else(|| codegen(format!("LLVM has no target machine for {} ({})", self.triple, self.cpu)))
    }
}

/// The host's target machine: its triple, CPU name and features, optimizing at `-O3`.
pub fn host_machine() -> Result<inkwell::targets::TargetMachine, TargetError> {
    CodeTarget::host().machine()
}

/// Parses `ir` into `ctx`, adds a packed wrapper (`_mlir_<name>`) for every C-interface
/// function (`_mlir_ciface_<name>`), stamps `tm`'s CPU and features on every function and runs
/// LLVM's `default<O3>` pipeline for `tm`.
pub fn optimize<'c>(
    ctx: &'c inkwell::context::Context,
    ir: &str,
    tm: &inkwell::targets::TargetMachine,
) -> Result<inkwell::module::Module<'c>, TargetError> {
    use inkwell::attributes::AttributeLoc;
    use inkwell::memory_buffer::MemoryBuffer;
    use inkwell::passes::PassBuilderOptions;
    let buf = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), "kiln");
    let module = ctx.create_module_from_ir(buf).map_err(|e| codegen(format!("LLVM IR does not parse: {e}")))?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    // Packed wrappers: `void _mlir_<name>(ptr args)`, `args[i]` pointing at argument i.
    let ptr = ctx.ptr_type(inkwell::AddressSpace::default());
    let builder = ctx.create_builder();
    let cifaces: Vec<_> = module
        .get_functions()
        .filter(|f| f.get_name().to_bytes().starts_with(b"_mlir_ciface_") && f.count_basic_blocks() > 0)
        .collect();
    let noalias = ctx.create_enum_attribute(inkwell::attributes::Attribute::get_named_enum_kind_id("noalias"), 0);
    for f in cifaces {
        let name = f.get_name().to_string_lossy()["_mlir_ciface_".len()..].to_string();
        // Memref arguments marked `llvm.noalias` in MLIR get it on the C interface's descriptor
        // pointers only; the function itself takes the data pointers, which need it for LLVM
        // to hoist and vectorize across buffers.
        let marked = (0..f.count_params())
            .any(|i| f.get_enum_attribute(AttributeLoc::Param(i), noalias.get_enum_kind_id()).is_some());
        if let Some(inner) = module.get_function(&name).filter(|_| marked) {
            // Each memref is (allocated pointer, aligned pointer, offset, sizes, strides): the
            // aligned pointer, every second pointer, is the one accessed.
            let pointers = inner.get_param_iter().enumerate().filter(|(_, p)| p.is_pointer_value());
            for (i, _) in pointers.skip(1).step_by(2) {
                inner.add_attribute(AttributeLoc::Param(i as u32), noalias);
            }
        }
        let wrapper =
            module.add_function(&format!("_mlir_{name}"), ctx.void_type().fn_type(&[ptr.into()], false), None);
        builder.position_at_end(ctx.append_basic_block(wrapper, "entry"));
        let args = wrapper.get_first_param().expect("one parameter").into_pointer_value();
        let built = (|| -> Result<(), inkwell::builder::BuilderError> {
            let mut values: Vec<inkwell::values::BasicMetadataValueEnum> = Vec::new();
            for (i, p) in f.get_param_iter().enumerate() {
                // SAFETY (of the GEP): `args` has one entry per parameter, by the convention.
                let slot =
                    unsafe { builder.build_gep(ptr, args, &[ctx.i64_type().const_int(i as u64, false)], "slot")? };
                let at = builder.build_load(ptr, slot, "at")?.into_pointer_value();
                values.push(builder.build_load(p.get_type(), at, "arg")?.into());
            }
            builder.build_call(f, &values, "")?;
            builder.build_return(None)?;
            Ok(())
        })();
        built.map_err(|e| codegen(format!("building the packed wrapper of {name}: {e}")))?;
    }
    let cpu = tm.get_cpu().to_string();
    let features = tm.get_feature_string().to_string_lossy().into_owned();
    for f in module.get_functions().filter(|f| f.count_basic_blocks() > 0) {
        f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-cpu", &cpu));
        f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-features", &features));
    }
    module.verify().map_err(|e| codegen(format!("the LLVM module does not verify (a kiln bug): {e}")))?;
    module
        .run_passes("default<O3>", tm, PassBuilderOptions::create())
        .map_err(|e| codegen(format!("LLVM optimization failed: {e}")))?;
    Ok(module)
}

/// What [`emit`] and [`emit_for`] produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    /// Optimized LLVM IR (text).
    LlvmIr,
    /// Assembly (text) of the code target.
    Assembly,
    /// A relocatable object file for the code target.
    Object,
}

/// Lowers `mlir` (upstream dialects) through LLVM's `-O3` pipeline for the host, as [`Jit`]
/// does, and returns the artifact instead of running it.
pub fn emit(mlir: &str, what: Artifact) -> Result<Vec<u8>, TargetError> {
    emit_for(mlir, what, &CodeTarget::host())
}

/// [`emit`] for any code target (`riscv64` for `rvv`): the same MLIR lowering, LLVM's `-O3`
/// pipeline for `target`, and its optimized IR, assembly or object code.
pub fn emit_for(mlir: &str, what: Artifact, target: &CodeTarget) -> Result<Vec<u8>, TargetError> {
    use inkwell::targets::FileType;
    let ir = to_llvm_ir(mlir)?;
    let tm = target.machine()?;
    let ctx = inkwell::context::Context::create();
    let module = optimize(&ctx, &ir, &tm)?;
    let file = match what {
        Artifact::LlvmIr => return Ok(module.print_to_string().to_bytes().to_vec()),
        Artifact::Assembly => FileType::Assembly,
        Artifact::Object => FileType::Object,
    };
    tm.write_to_memory_buffer(&module, file)
        .map(|b| b.as_slice().to_vec())
        .map_err(|e| codegen(format!("LLVM code generation failed: {e}")))
}

impl Jit {
    /// Parses `mlir` (upstream dialects), lowers it to LLVM, optimizes it and compiles it for
    /// the host.
    pub fn compile(mlir: &str) -> Result<Jit, TargetError> {
        let ir = to_llvm_ir(mlir)?;
        let tm = host_machine()?;
        let context = Box::into_raw(Box::new(inkwell::context::Context::create()));
        // SAFETY: `context` lives until `Jit::drop`, after the engine; the 'static borrow
        // never escapes the Jit.
        let ctx: &'static inkwell::context::Context = unsafe { &*context };
        let made = optimize(ctx, &ir, &tm).and_then(|module| {
            let ir = module.print_to_string().to_string();
            module
                .create_jit_execution_engine(inkwell::OptimizationLevel::Aggressive)
                .map(|engine| (engine, ir))
                .map_err(|e| codegen(format!("LLVM's JIT refused the module: {e}")))
        });
        match made {
            Ok((engine, ir)) => Ok(Jit { engine: std::mem::ManuallyDrop::new(engine), context, ir }),
            Err(e) => {
                // SAFETY: nothing made in the context survives (the module was dropped).
                drop(unsafe { Box::from_raw(context) });
                Err(e)
            }
        }
    }

    /// The optimized LLVM IR this JIT compiled.
    pub fn llvm_ir(&self) -> &str {
        &self.ir
    }

    /// The packed entry point of `name` (a function with `llvm.emit_c_interface`): it takes an
    /// array with one pointer per argument, pointing at the argument (for a memref argument, at
    /// a pointer to its descriptor). Valid while this `Jit` lives.
    pub fn entry(&self, name: &str) -> Option<Entry> {
        let addr = self.engine.get_function_address(&format!("_mlir_{name}")).ok()?;
        // SAFETY: the packed wrappers kiln adds all have this signature.
        (addr != 0).then(|| Entry(unsafe { std::mem::transmute::<usize, unsafe extern "C" fn(*mut *mut ())>(addr) }))
    }

    /// Calls `name` (a function with `llvm.emit_c_interface` whose arguments are all f32
    /// memrefs) on `args`.
    ///
    /// # Safety
    /// The function's signature must be exactly `args.len()` memrefs of the descriptors' ranks
    /// and element type f32, and it must only access the elements the descriptors describe.
    pub unsafe fn call(&self, name: &str, args: &mut [MemRef]) -> Result<(), TargetError> {
        let entry = self
            .entry(name)
            .ok_or_else(|| codegen(format!("no function {name} with a C interface in the compiled module")))?;
        let mut ptrs: Vec<*mut i64> = args.iter_mut().map(|a| a.words.as_mut_ptr()).collect();
        let mut packed: Vec<*mut ()> = ptrs.iter_mut().map(|p| p as *mut *mut i64 as *mut ()).collect();
        // SAFETY: the caller guarantees the signature; each packed entry points at a live
        // pointer to a live descriptor.
        unsafe { (entry.0)(packed.as_mut_ptr()) };
        Ok(())
    }
}
