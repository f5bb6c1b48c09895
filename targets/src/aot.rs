//! Ahead-of-time compilation for `cpu` (`kiln compile MODEL --target cpu -o DIR`): the model's
//! kernels as a host object, a C driver that calls them in order over one arena, the weights
//! embedded, linked into a relocatable object, a shared library and a C header with one entry
//! point per model. Loading and running it needs no LLVM or MLIR (see `kiln-runtime`).
//! `--target rvv` builds the same artifacts for riscv64 with the vector extension, compiled by
//! LLVM for [`CodeTarget::riscv64`] and linked by the riscv64 cross gcc ([`AotTarget`]).
//!
//! Memory planning: every intermediate tensor gets an offset in one arena, assigned greedily
//! (largest first, first fit) among the tensors whose live ranges overlap; views alias their
//! operand's storage and extend its range. Graph outputs are written in place into the
//! caller's buffers. The arena's size is the model's planned peak, reported by
//! `<name>_arena_bytes()` and in the artifact's summary.
//!
//! Scope of this first cut: static shapes, f32 tensors between kernels, every kernel lowered to
//! the kernel dialect (models with host fallbacks are refused, naming them), one thread.

use crate::jit::{optimize, to_llvm_ir, CodeTarget};
use crate::native::{launched_kernels, module_text, split_loop};
use crate::TargetError;
use kiln_ir::attr::Attr;
use kiln_ir::ir::{Module, ValueDef, ValueId};
use kiln_ir::DType;
use kiln_passes::fusion::{classify, OpClass};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn err(msg: impl std::fmt::Display) -> TargetError {
    TargetError::Codegen(msg.to_string())
}

/// Where a tensor lives at run time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Storage {
    Input(usize),
    Output(usize),
    /// Byte offset into the embedded weights.
    Weight(usize),
    /// Byte offset into the arena.
    Arena(usize),
    /// A view of another value: its storage.
    View(ValueId),
}

/// What [`compile`] wrote.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub object: PathBuf,
    pub library: PathBuf,
    pub header: PathBuf,
    pub driver: PathBuf,
    /// The entry point: `int <entry>(const float *const *inputs, float *const *outputs, void *arena)`.
    pub entry: String,
    pub kernels: usize,
    pub arena_bytes: usize,
    pub weight_bytes: usize,
}

/// A C identifier from a model name.
pub fn c_name(s: &str) -> String {
    let mut n: String = s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if n.is_empty() || n.starts_with(|c: char| c.is_ascii_digit()) {
        n.insert_str(0, "m_");
    }
    n
}

pub(crate) fn static_shape(m: &Module, v: ValueId) -> Result<Vec<usize>, TargetError> {
    m.value(v).ty.static_shape().ok_or_else(|| {
        err(format!(
            "ahead-of-time compilation (cpu/rvv libraries, GPU plans) needs static shapes: {} is {} (compile a model with fixed sizes)",
            m.value_label(v),
            m.value(v).ty
        ))
    })
}

/// Greedy first-fit offsets for `(bytes, first, last)` live ranges (largest first); returns
/// the offsets and the arena size.
fn plan(tensors: &[(usize, usize, usize)]) -> (Vec<usize>, usize) {
    const ALIGN: usize = 64;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].0));
    let mut offsets = vec![0; tensors.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut total = 0;
    for i in order {
        let (size, first, last) = tensors[i];
        let size = size.div_ceil(ALIGN) * ALIGN;
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| tensors[j].1 <= last && first <= tensors[j].2)
            .map(|&j| (offsets[j], offsets[j] + tensors[j].0.div_ceil(ALIGN) * ALIGN))
            .collect();
        busy.sort();
        let mut at = 0;
        for (lo, hi) in busy {
            if at + size <= lo {
                break;
            }
            at = at.max(hi);
        }
        offsets[i] = at;
        total = total.max(at + size);
        placed.push(i);
    }
    (offsets, total)
}

/// Where every tensor kernels touch lives when a model's kernels run in program order over one
/// arena (the cpu AOT driver, a GPU plan): graph inputs and outputs in the caller's buffers,
/// constants in one weights blob, views aliasing their operand, every other kernel result at an
/// arena offset planned from its live range ([`plan`]).
pub(crate) struct MemoryPlan {
    /// Each stored value (views map to the value they alias: [`plan_root`]).
    pub storage: HashMap<ValueId, Storage>,
    /// The weights blob (f32 little-endian, bools one byte each), each tensor 64-byte aligned.
    pub weights: Vec<u8>,
    pub arena_bytes: usize,
}

/// What `v` is stored as: itself, or for a view ([`Storage::View`]) the value it aliases.
pub(crate) fn plan_root(storage: &HashMap<ValueId, Storage>, mut v: ValueId) -> ValueId {
    while let Some(Storage::View(b)) = storage.get(&v) {
        v = *b;
    }
    v
}

/// Plans the storage of fused module `m` whose ops at `kernels` (op positions in the body, and
/// the op) run as kernels. f32 and bool tensors (one byte per element) are placed; shapes must
/// be static.
pub(crate) fn plan_memory(m: &Module, kernels: &[(usize, kiln_ir::ir::OpId)]) -> Result<MemoryPlan, TargetError> {
    plan_memory_placing(m, kernels, &|d| d == DType::F32 || d == DType::Bool)
}

/// [`plan_memory`] placing the constants and views of the element types `placed` accepts (a GPU
/// plan with host steps places every type with a byte size).
pub(crate) fn plan_memory_placing(
    m: &Module,
    kernels: &[(usize, kiln_ir::ir::OpId)],
    placed: &dyn Fn(DType) -> bool,
) -> Result<MemoryPlan, TargetError> {
    let ops = &m.body.ops;
    let mut storage: HashMap<ValueId, Storage> = HashMap::new();
    let mut weights: Vec<u8> = Vec::new();
    for &o in ops {
        let op = m.op(o);
        match classify(m, o) {
            OpClass::Constant => {
                if let (Some(Attr::Tensor(t)), Some(&r)) = (op.attrs.get("value"), op.results.first()) {
                    if placed(t.dtype()) {
                        let at = weights.len().div_ceil(64) * 64;
                        weights.resize(at, 0);
                        weights.extend(t.data.to_le_bytes());
                        storage.insert(r, Storage::Weight(at));
                    }
                }
            }
            OpClass::View => {
                let (Some(Some(a)), Some(&r)) = (op.operands.first(), op.results.first()) else { continue };
                if placed(m.value(r).ty.dtype) {
                    storage.insert(r, Storage::View(*a));
                }
            }
            _ => {}
        }
    }
    for (i, &v) in m.inputs().iter().enumerate() {
        static_shape(m, v)?;
        storage.insert(v, Storage::Input(i));
    }
    let outputs: Vec<ValueId> = m.outputs().to_vec();
    for &v in &outputs {
        static_shape(m, v)?;
    }
    // Kernel results that are graph outputs (not views of them) are written in place.
    for (j, &v) in outputs.iter().enumerate() {
        if matches!(m.value(v).def, ValueDef::OpResult(..)) && !storage.contains_key(&v) {
            storage.insert(v, Storage::Output(j));
        }
    }
    // Live ranges of the other kernel results.
    let mut range: HashMap<ValueId, (usize, usize)> = HashMap::new();
    for (pos, o) in kernels {
        for &r in &m.op(*o).results {
            if !storage.contains_key(&r) {
                range.insert(r, (*pos, *pos));
            }
        }
    }
    let touch = |v: ValueId, pos: usize, range: &mut HashMap<ValueId, (usize, usize)>| {
        if let Some(r) = range.get_mut(&plan_root(&storage, v)) {
            r.1 = r.1.max(pos);
        }
    };
    for (pos, &o) in ops.iter().enumerate() {
        for v in m.op(o).operands.iter().flatten() {
            touch(*v, pos, &mut range);
        }
    }
    for &v in &outputs {
        touch(v, ops.len(), &mut range);
    }
    let mut arena_vals: Vec<ValueId> = range.keys().copied().collect();
    arena_vals.sort();
    let mut sized = Vec::new();
    for &v in &arena_vals {
        let n: usize = static_shape(m, v)?.iter().product();
        let (a, b) = range[&v];
        sized.push((n * m.value(v).ty.dtype.size_bytes(), a, b));
    }
    let (offsets, arena_bytes) = plan(&sized);
    for (v, off) in arena_vals.iter().zip(offsets) {
        storage.insert(*v, Storage::Arena(off));
    }
    Ok(MemoryPlan { storage, weights, arena_bytes })
}

fn shape_list(s: &[usize]) -> String {
    s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

fn run(cmd: &mut std::process::Command) -> Result<(), TargetError> {
    let out = cmd.output().map_err(|e| err(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(err(format!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

/// The machine an AOT artifact is for: the target's name (in the generated files' comments),
/// LLVM's code target for the kernels and the C compiler that builds the driver and links.
#[derive(Clone, Debug)]
pub struct AotTarget {
    pub target: &'static str,
    pub code: CodeTarget,
    pub cc: String,
    /// The lowering's tile sizes for the machine.
    pub schedule: kiln_passes::lower::Schedule,
}

impl AotTarget {
    /// The host (`cpu`): its CPU and features; the C compiler `$CC`, else `cc`.
    pub fn host() -> AotTarget {
        AotTarget {
            target: "cpu",
            code: CodeTarget::host(),
            cc: std::env::var("CC").unwrap_or_else(|_| "cc".into()),
            schedule: crate::cpu::schedule().clone(),
        }
    }
}

/// Compiles fused module `m` (named `name`) ahead of time for the host into `dir`.
pub fn compile(m: &Module, name: &str, dir: &Path) -> Result<Artifact, TargetError> {
    compile_for(m, name, dir, &AotTarget::host())
}

/// Compiles fused module `m` (named `name`) ahead of time for `target` into `dir`.
pub fn compile_for(m: &Module, name: &str, dir: &Path, target: &AotTarget) -> Result<Artifact, TargetError> {
    let cc = || target.cc.clone();
    let entry = c_name(name);
    let ops = m.body.ops.clone();
    let mut kernels = Vec::new(); // (op position, op, kernel)
    let mut host = Vec::new();
    let names: HashMap<kiln_ir::ir::OpId, String> = launched_kernels(m).into_iter().collect();
    for (pos, &o) in ops.iter().enumerate() {
        let op = m.op(o);
        if matches!(classify(m, o), OpClass::Constant | OpClass::Host | OpClass::View) {
            continue;
        }
        let kname = &names[&o];
        match kiln_passes::lower::lower_with(m, o, kname, &target.schedule) {
            Ok(k) if k.buffers.iter().any(|b| b.dtype != DType::F32) => host.push(format!(
                "{kname} (node '{}', {}): reads a non-f32 tensor (AOT passes f32 tensors only)",
                op.node_name(),
                op.op_type()
            )),
            Ok(k) => kernels.push((pos, o, k)),
            Err(why) => host.push(format!("{kname} (node '{}', {}): {why}", op.node_name(), op.op_type())),
        }
    }
    if !host.is_empty() {
        return Err(err(format!(
            "AOT needs every kernel as native code; {} are not lowered yet: {}",
            host.len(),
            host.join("; ")
        )));
    }
    for &v in m.inputs() {
        if m.value(v).ty.dtype != DType::F32 {
            return Err(err(format!("AOT takes f32 inputs only; {} is {}", m.value_label(v), m.value(v).ty)));
        }
    }
    let outputs: Vec<ValueId> = m.outputs().to_vec();
    for &v in &outputs {
        if m.value(v).ty.dtype != DType::F32 {
            return Err(err(format!("AOT gives f32 outputs only; {} is {}", m.value_label(v), m.value(v).ty)));
        }
    }
    let positions: Vec<(usize, kiln_ir::ir::OpId)> = kernels.iter().map(|(p, o, _)| (*p, *o)).collect();
    let memory = plan_memory(m, &positions)?;
    let (storage, weights, arena_bytes) = (&memory.storage, &memory.weights, memory.arena_bytes);
    let root = |v: ValueId| plan_root(storage, v);
    let place = |v: ValueId| -> Result<String, TargetError> {
        Ok(match storage.get(&root(v)) {
            Some(Storage::Input(i)) => format!("(float *)inputs[{i}]"),
            Some(Storage::Output(j)) => format!("outputs[{j}]"),
            Some(Storage::Weight(off)) => format!("(float *)(kiln_weights_{entry} + {off})"),
            Some(Storage::Arena(off)) => format!("(float *)((char *)arena + {off})"),
            Some(Storage::View(_)) | None => {
                return Err(err(format!("AOT: no storage for {} (a kiln bug)", m.value_label(v))))
            }
        })
    };

    // The driver. Identical kernels share one function.
    let (mlir, functions) =
        module_text(kernels.iter().map(|(_, _, k)| k), crate::native::MlirOptions::for_code(&target.code));
    let mut ranks: Vec<usize> = Vec::new();
    let mut calls = String::new();
    let mut decls = String::new();
    for ((_, o, k), function) in kernels.iter().zip(&functions) {
        let op = m.op(*o);
        // The graph value and static shape of every buffer.
        let bound: Vec<(ValueId, Vec<usize>)> = (0..k.buffers.len())
            .map(|bi| {
                let v = if bi < k.inputs {
                    op.operands[k.operands[bi]].expect("lowered kernels read present operands")
                } else {
                    op.results[bi - k.inputs]
                };
                static_shape(m, v).map(|s| (v, s))
            })
            .collect::<Result<_, _>>()?;
        let mut args = Vec::new();
        for (bi, (b, (v, shape))) in k.buffers.iter().zip(&bound).enumerate() {
            if shape.len() != b.shape.len() {
                return Err(err(format!("AOT: kernel {} buffer {bi} rank mismatch (a kiln bug)", k.name)));
            }
            let r = shape.len();
            if !ranks.contains(&r) {
                ranks.push(r);
            }
            let _ = writeln!(calls, "  kiln_memref{r} b{bi}_{} = {{ 0 }};", k.name);
            let _ = writeln!(
                calls,
                "  kiln_set{r}(&b{bi}_{}, {}, (const int64_t[]){{ {} }});",
                k.name,
                place(*v)?,
                if r == 0 { "0".into() } else { shape_list(shape) }
            );
            args.push((r, format!("&b{bi}_{}", k.name)));
        }
        // One thread: the split loop (see `split_loop`) runs its whole range.
        let extent = match split_loop(k) {
            Some((_, _, e)) => {
                let refs: Vec<&[usize]> = bound.iter().map(|(_, s)| s.as_slice()).collect();
                crate::native::eval_idx(e, &refs).ok_or_else(|| err("AOT: a parallel extent is not computable"))?
            }
            None => 0,
        };
        let params: Vec<String> = args.iter().map(|(r, _)| format!("kiln_memref{r} *")).collect();
        if function == &k.name {
            let _ = writeln!(decls, "extern void _mlir_ciface_{}({}, int64_t, int64_t);", k.name, params.join(", "));
        }
        let names: Vec<String> = args.iter().map(|(_, a)| a.clone()).collect();
        let _ = writeln!(calls, "  _mlir_ciface_{function}({}, 0, {extent});", names.join(", "));
    }
    // Outputs that are not written in place (views, inputs, constants): copied at the end.
    for (j, &v) in outputs.iter().enumerate() {
        if storage.get(&v) != Some(&Storage::Output(j)) {
            let n: usize = static_shape(m, v)?.iter().product();
            let _ = writeln!(calls, "  memcpy(outputs[{j}], {}, {});", place(v)?, n * 4);
        }
    }
    ranks.sort();
    let mut structs = String::new();
    for r in &ranks {
        let (sz, set) = if *r == 0 {
            (String::new(), String::new())
        } else {
            (
                format!(" int64_t size[{r}]; int64_t stride[{r}];"),
                format!(
                    "\n  int64_t s = 1;\n  for (int i = {r} - 1; i >= 0; i--) {{ m->size[i] = shape[i]; m->stride[i] = s; s *= shape[i]; }}"
                ),
            )
        };
        let _ = writeln!(
            structs,
            "typedef struct {{ float *allocated; float *aligned; int64_t offset;{sz} }} kiln_memref{r};\n\
             static void kiln_set{r}(kiln_memref{r} *m, float *p, const int64_t *shape) {{\n  \
             (void)shape;\n  m->allocated = p; m->aligned = p; m->offset = 0;{set}\n}}"
        );
    }
    let info = c_string(&serde_json_like(m, name, arena_bytes)?);
    let elements = |vs: &[ValueId]| -> Result<String, TargetError> {
        let n: Vec<String> = vs
            .iter()
            .map(|&v| static_shape(m, v).map(|s| s.iter().product::<usize>().to_string()))
            .collect::<Result<_, _>>()?;
        Ok(if n.is_empty() { "0".into() } else { n.join(", ") })
    };
    let (ni, no, ie, oe) = (m.inputs().len(), outputs.len(), elements(m.inputs())?, elements(&outputs)?);
    let t = target.target;
    let c_src = format!(
        "/* {name}: generated by kiln (AOT, target {t}). Do not edit. */\n\
         #include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n#include \"{entry}.h\"\n\n\
         {structs}\n{decls}\nextern const unsigned char kiln_weights_{entry}[];\n\n\
         size_t {entry}_arena_bytes(void) {{ return {arena_bytes}; }}\n\n\
         const char *{entry}_info(void) {{ return {info}; }}\n\n\
         int {entry}_run(const float *const *inputs, float *const *outputs, void *arena) {{\n  \
         void *owned = NULL;\n  if (!arena && {arena_bytes} > 0) {{\n    \
         if (posix_memalign(&owned, 64, {arena_bytes}) != 0) return 1;\n    arena = owned;\n  }}\n\
         {calls}  free(owned);\n  return 0;\n}}\n\n\
         /* Generic names, for loaders that do not know the model's name. */\n\
         const int64_t kiln_num_inputs = {ni};\nconst int64_t kiln_num_outputs = {no};\n\
         const int64_t kiln_input_elements[] = {{ {ie} }};\nconst int64_t kiln_output_elements[] = {{ {oe} }};\n\
         size_t kiln_arena_bytes(void) {{ return {entry}_arena_bytes(); }}\n\
         const char *kiln_info(void) {{ return {entry}_info(); }}\n\
         int kiln_run(const float *const *inputs, float *const *outputs, void *arena) {{ return {entry}_run(inputs, outputs, arena); }}\n"
    );
    let mut header = format!(
        "/* {name}: generated by kiln (AOT, target {t}). */\n#ifndef KILN_{up}_H\n#define KILN_{up}_H\n#include <stddef.h>\n\n\
         #ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n",
        up = entry.to_uppercase()
    );
    for (i, &v) in m.inputs().iter().enumerate() {
        let s = static_shape(m, v)?;
        let _ = writeln!(header, "/* input {i} '{}': float[{}] */", m.value_label(v), shape_list(&s));
        let _ = writeln!(header, "#define {}_INPUT{i}_ELEMENTS {}", entry.to_uppercase(), s.iter().product::<usize>());
    }
    for (j, &v) in outputs.iter().enumerate() {
        let s = static_shape(m, v)?;
        let _ = writeln!(header, "/* output {j} '{}': float[{}] */", m.value_label(v), shape_list(&s));
        let _ = writeln!(header, "#define {}_OUTPUT{j}_ELEMENTS {}", entry.to_uppercase(), s.iter().product::<usize>());
    }
    let _ = write!(
        header,
        "#define {up}_NUM_INPUTS {}\n#define {up}_NUM_OUTPUTS {}\n\n\
         /* Bytes of scratch memory a run needs (pass an aligned buffer of this size, or NULL). */\n\
         size_t {entry}_arena_bytes(void);\n\
         /* Inputs and outputs as their JSON description: names and shapes. */\n\
         const char *{entry}_info(void);\n\
         /* Runs the model: row-major f32 inputs and outputs; 0 on success. Output buffers must\n\
            not overlap the inputs, each other or the arena (the kernels assume no aliasing). */\n\
         int {entry}_run(const float *const *inputs, float *const *outputs, void *arena);\n\n\
         #ifdef __cplusplus\n}}\n#endif\n#endif\n",
        m.inputs().len(),
        outputs.len(),
        up = entry.to_uppercase()
    );

    // Kernels to a host object; weights through the assembler; one relocatable object.
    std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    // Absolute: the C compiler runs in `dir` (for the weights' `.incbin`) on paths under it.
    let dir = &std::path::absolute(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let write = |p: &Path, bytes: &[u8]| std::fs::write(p, bytes).map_err(|e| err(format!("{}: {e}", p.display())));
    let header_path = dir.join(format!("{entry}.h"));
    let driver_path = dir.join(format!("{entry}.c"));
    let weights_path = dir.join(format!("{entry}.weights"));
    write(&header_path, header.as_bytes())?;
    write(&driver_path, c_src.as_bytes())?;
    write(&weights_path, weights)?;
    let tm = target.code.machine()?;
    let kernels_obj = dir.join(format!("{entry}.kernels.o"));
    {
        let ctx = inkwell::context::Context::create();
        let module =
            if mlir.is_empty() { ctx.create_module("kiln") } else { optimize(&ctx, &to_llvm_ir(&mlir)?, &tm)? };
        tm.write_to_file(&module, inkwell::targets::FileType::Object, &kernels_obj)
            .map_err(|e| err(format!("LLVM code generation failed: {e}")))?;
    }
    let weights_s = dir.join(format!("{entry}.weights.S"));
    write(
        &weights_s,
        format!(
            "  .section .rodata\n  .globl kiln_weights_{entry}\n  .balign 64\nkiln_weights_{entry}:\n  .incbin \"{}\"\n  .byte 0\n  .section .note.GNU-stack,\"\",@progbits\n",
            weights_path.file_name().and_then(|f| f.to_str()).unwrap_or_default()
        )
        .as_bytes(),
    )?;
    let object = dir.join(format!("{entry}.o"));
    let library = dir.join(format!("lib{entry}.so"));
    let driver_obj = dir.join(format!("{entry}.driver.o"));
    let weights_obj = dir.join(format!("{entry}.weights.o"));
    run(std::process::Command::new(cc())
        .current_dir(dir)
        .args(["-c", "-O2", "-fPIC"])
        .arg(&driver_path)
        .arg("-o")
        .arg(&driver_obj))?;
    run(std::process::Command::new(cc())
        .current_dir(dir)
        .args(["-c", "-fPIC"])
        .arg(&weights_s)
        .arg("-o")
        .arg(&weights_obj))?;
    run(std::process::Command::new(cc())
        .args(["-r", "-nostdlib"])
        .args([&kernels_obj, &driver_obj, &weights_obj])
        .arg("-o")
        .arg(&object))?;
    run(std::process::Command::new(cc()).arg("-shared").arg(&object).arg("-o").arg(&library).arg("-lm"))?;
    for p in [&kernels_obj, &driver_obj, &weights_obj, &weights_s] {
        let _ = std::fs::remove_file(p);
    }
    Ok(Artifact {
        object,
        library,
        header: header_path,
        driver: driver_path,
        entry,
        kernels: kernels.len(),
        arena_bytes,
        weight_bytes: weights.len(),
    })
}

/// `s` as a C string literal.
fn c_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out.push('"');
    out
}

/// The model's inputs and outputs as JSON: `{"name", "arena_bytes", "inputs": [{"name",
/// "shape"}], "outputs": [...]}`.
fn serde_json_like(m: &Module, name: &str, arena: usize) -> Result<String, TargetError> {
    let port = |v: ValueId| -> Result<String, TargetError> {
        Ok(format!("{{\"name\":{:?},\"shape\":[{}]}}", m.value_label(v), shape_list(&static_shape(m, v)?)))
    };
    let ins: Vec<String> = m.inputs().iter().map(|&v| port(v)).collect::<Result<_, _>>()?;
    let outs: Vec<String> = m.outputs().iter().map(|&v| port(v)).collect::<Result<_, _>>()?;
    Ok(format!(
        "{{\"name\":{name:?},\"arena_bytes\":{arena},\"inputs\":[{}],\"outputs\":[{}]}}",
        ins.join(","),
        outs.join(",")
    ))
}
