//! Kernels of the kernel dialect as native host code: each [`Kernel`] becomes one MLIR
//! function of upstream dialects (`scf` loops, `memref` loads/stores, `arith`/`math` scalar
//! code; every buffer a dynamically sized memref, so one compiled kernel runs at any size),
//! compiled in process by [`crate::jit`].

use crate::jit::{Jit, MemRef};
use crate::TargetError;
use kiln_ir::kernel::{BinOp, Idx, Kernel, RedOp, Stmt, UnOp, Val};
use kiln_ir::{Dim, Tensor};
use std::collections::HashMap;
use std::fmt::Write;

/// The memref type of a rank-`r` f32 buffer with dynamic sizes.
fn memref(r: usize) -> String {
    let mut s = String::from("memref<");
    for _ in 0..r {
        s.push_str("?x");
    }
    s.push_str("f32>");
    s
}

/// An f32 literal MLIR parses exactly (hex for non-finite values).
fn f32_literal(v: f64) -> String {
    let f = v as f32;
    if f.is_finite() {
        format!("{:.9e}", f)
    } else {
        format!("0x{:08X}", f.to_bits())
    }
}

struct Emitter<'k> {
    k: &'k Kernel,
    out: String,
    next: usize,
    /// The SSA value each `Let` slot names.
    slots: HashMap<usize, String>,
}

impl Emitter<'_> {
    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%t{}", self.next)
    }

    fn line(&mut self, depth: usize, text: &str) {
        let _ = writeln!(self.out, "{}{text}", "  ".repeat(depth + 1));
    }

    fn idx(&mut self, depth: usize, i: &Idx) -> String {
        let (op, a, b) = match i {
            Idx::Var(v) => return format!("%i{v}"),
            Idx::Const(c) => {
                let t = self.fresh();
                self.line(depth, &format!("{t} = arith.constant {c} : index"));
                return t;
            }
            Idx::Dim { buf, axis } => {
                let c = self.idx(depth, &Idx::Const(*axis as i64));
                let t = self.fresh();
                let ty = memref(self.k.buffers[*buf].shape.len());
                self.line(depth, &format!("{t} = memref.dim %b{buf}, {c} : {ty}"));
                return t;
            }
            Idx::ZeroIfOne(a, b) => {
                let (a, b) = (self.idx(depth, a), self.idx(depth, b));
                let (one, zero) = (self.idx(depth, &Idx::Const(1)), self.idx(depth, &Idx::Const(0)));
                let c = self.fresh();
                self.line(depth, &format!("{c} = arith.cmpi eq, {a}, {one} : index"));
                let t = self.fresh();
                self.line(depth, &format!("{t} = arith.select {c}, {zero}, {b} : index"));
                return t;
            }
            Idx::Add(a, b) => ("arith.addi", a, b),
            Idx::Sub(a, b) => ("arith.subi", a, b),
            Idx::Mul(a, b) => ("arith.muli", a, b),
            Idx::Div(a, b) => ("arith.divui", a, b),
            Idx::Rem(a, b) => ("arith.remui", a, b),
            Idx::Min(a, b) => ("arith.minsi", a, b),
            Idx::Max(a, b) => ("arith.maxsi", a, b),
        };
        let (a, b) = (self.idx(depth, a), self.idx(depth, b));
        let t = self.fresh();
        self.line(depth, &format!("{t} = {op} {a}, {b} : index"));
        t
    }

    fn constant(&mut self, depth: usize, v: f64) -> String {
        let t = self.fresh();
        self.line(depth, &format!("{t} = arith.constant {} : f32", f32_literal(v)));
        t
    }

    fn val(&mut self, depth: usize, v: &Val) -> String {
        match v {
            Val::Const(c) => self.constant(depth, *c),
            Val::Load { buf, index } => {
                let ix: Vec<String> = index.iter().map(|i| self.idx(depth, i)).collect();
                let t = self.fresh();
                let ty = memref(index.len());
                self.line(depth, &format!("{t} = memref.load %b{buf}[{}] : {ty}", ix.join(", ")));
                t
            }
            Val::Un(op, x) => {
                let x = self.val(depth, x);
                let t = self.fresh();
                let text = match op {
                    UnOp::Neg => format!("{t} = arith.negf {x} : f32"),
                    UnOp::Abs => format!("{t} = math.absf {x} : f32"),
                    UnOp::Exp => format!("{t} = math.exp {x} : f32"),
                    UnOp::Log => format!("{t} = math.log {x} : f32"),
                    UnOp::Sqrt => format!("{t} = math.sqrt {x} : f32"),
                    UnOp::Tanh => format!("{t} = math.tanh {x} : f32"),
                    UnOp::Erf => format!("{t} = math.erf {x} : f32"),
                    UnOp::Floor => format!("{t} = math.floor {x} : f32"),
                    UnOp::Ceil => format!("{t} = math.ceil {x} : f32"),
                    UnOp::Recip => {
                        let one = self.constant(depth, 1.0);
                        format!("{t} = arith.divf {one}, {x} : f32")
                    }
                    UnOp::Relu => {
                        let zero = self.constant(depth, 0.0);
                        format!("{t} = arith.maximumf {x}, {zero} : f32")
                    }
                    UnOp::Sigmoid => {
                        // 1 / (1 + exp(-x))
                        let n = self.fresh();
                        self.line(depth, &format!("{n} = arith.negf {x} : f32"));
                        let e = self.fresh();
                        self.line(depth, &format!("{e} = math.exp {n} : f32"));
                        let one = self.constant(depth, 1.0);
                        let d = self.fresh();
                        self.line(depth, &format!("{d} = arith.addf {one}, {e} : f32"));
                        format!("{t} = arith.divf {one}, {d} : f32")
                    }
                };
                self.line(depth, &text);
                t
            }
            Val::Scalar(s) => self.slots.get(s).cloned().unwrap_or_else(|| format!("%undefined_slot{s}")),
            Val::FromIdx(i) => {
                let i = self.idx(depth, i);
                let (n, t) = (self.fresh(), self.fresh());
                self.line(depth, &format!("{n} = arith.index_cast {i} : index to i64"));
                self.line(depth, &format!("{t} = arith.sitofp {n} : i64 to f32"));
                t
            }
            Val::Reduce { op, var, extent, body } => {
                let init = self.constant(
                    depth,
                    match op {
                        RedOp::Sum => 0.0,
                        RedOp::Max => f64::NEG_INFINITY,
                        RedOp::Min => f64::INFINITY,
                    },
                );
                let e = self.idx(depth, extent);
                let (lo, step) = (self.idx(depth, &Idx::Const(0)), self.idx(depth, &Idx::Const(1)));
                let (r, acc) = (self.fresh(), self.fresh());
                self.line(
                    depth,
                    &format!("{r} = scf.for %i{var} = {lo} to {e} step {step} iter_args({acc} = {init}) -> (f32) {{"),
                );
                let v = self.val(depth + 1, body);
                let combine = match op {
                    RedOp::Sum => "arith.addf",
                    RedOp::Max => "arith.maximumf",
                    RedOp::Min => "arith.minimumf",
                };
                let n = self.fresh();
                self.line(depth + 1, &format!("{n} = {combine} {acc}, {v} : f32"));
                self.line(depth + 1, &format!("scf.yield {n} : f32"));
                self.line(depth, "}");
                r
            }
            Val::IfLess { lhs, rhs, then, other } => {
                let (l, r) = (self.idx(depth, lhs), self.idx(depth, rhs));
                let (c, t) = (self.fresh(), self.fresh());
                self.line(depth, &format!("{c} = arith.cmpi slt, {l}, {r} : index"));
                self.line(depth, &format!("{t} = scf.if {c} -> (f32) {{"));
                let a = self.val(depth + 1, then);
                self.line(depth + 1, &format!("scf.yield {a} : f32"));
                self.line(depth, "} else {");
                let b = self.val(depth + 1, other);
                self.line(depth + 1, &format!("scf.yield {b} : f32"));
                self.line(depth, "}");
                t
            }
            Val::Bin(op, a, b) => {
                let (a, b) = (self.val(depth, a), self.val(depth, b));
                let name = match op {
                    BinOp::Add => "arith.addf",
                    BinOp::Sub => "arith.subf",
                    BinOp::Mul => "arith.mulf",
                    BinOp::Div => "arith.divf",
                    BinOp::Max => "arith.maximumf",
                    BinOp::Min => "arith.minimumf",
                    BinOp::Pow => "math.powf",
                };
                let t = self.fresh();
                self.line(depth, &format!("{t} = {name} {a}, {b} : f32"));
                t
            }
        }
    }

    fn stmts(&mut self, depth: usize, body: &[Stmt]) {
        for s in body {
            match s {
                Stmt::For { var, extent, body, .. } => {
                    let e = self.idx(depth, extent);
                    let (lo, step) = (self.idx(depth, &Idx::Const(0)), self.idx(depth, &Idx::Const(1)));
                    self.line(depth, &format!("scf.for %i{var} = {lo} to {e} step {step} {{"));
                    self.stmts(depth + 1, body);
                    self.line(depth, "}");
                }
                Stmt::Let { slot, value } => {
                    let v = self.val(depth, value);
                    self.slots.insert(*slot, v);
                }
                Stmt::Store { buf, index, value } => {
                    let v = self.val(depth, value);
                    let ix: Vec<String> = index.iter().map(|i| self.idx(depth, i)).collect();
                    let ty = memref(index.len());
                    self.line(depth, &format!("memref.store {v}, %b{buf}[{}] : {ty}", ix.join(", ")));
                }
            }
        }
    }
}

/// The kernel as an MLIR module of upstream dialects: one function named after the kernel,
/// taking every buffer (inputs, then outputs) as a dynamically sized memref.
pub fn to_mlir(k: &Kernel) -> String {
    let params: Vec<String> =
        k.buffers.iter().enumerate().map(|(i, b)| format!("%b{i}: {}", memref(b.shape.len()))).collect();
    let mut e = Emitter { k, out: String::new(), next: 0, slots: HashMap::new() };
    e.stmts(0, &k.body);
    format!(
        "func.func @{}({}) attributes {{ llvm.emit_c_interface }} {{\n{}  return\n}}\n",
        k.name,
        params.join(", "),
        e.out
    )
}

/// A kernel compiled to native code.
pub struct NativeKernel {
    kernel: Kernel,
    jit: Jit,
}

impl NativeKernel {
    pub fn compile(kernel: Kernel) -> Result<NativeKernel, TargetError> {
        let jit = Jit::compile(&to_mlir(&kernel))?;
        Ok(NativeKernel { kernel, jit })
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Runs the kernel on the graph op's `operands` (the kernel reads the f32 ones, shaped as
    /// its input buffers declare); the outputs' sizes come from the inputs' bindings of the
    /// symbolic dims.
    pub fn run(&self, operands: &[&Tensor]) -> Result<Vec<Tensor>, TargetError> {
        let k = &self.kernel;
        let inputs: Vec<&Tensor> = k
            .operands
            .iter()
            .map(|&i| {
                operands.get(i).copied().ok_or_else(|| {
                    TargetError::Codegen(format!("kernel {} reads operand {i}, got {}", k.name, operands.len()))
                })
            })
            .collect::<Result<_, _>>()?;
        let mut bind: HashMap<&str, usize> = HashMap::new();
        for (t, b) in inputs.iter().zip(&k.buffers) {
            if t.as_f32().is_none() || t.rank() != b.shape.len() {
                return Err(TargetError::Codegen(format!(
                    "kernel {} input {}: expected f32 of rank {}",
                    k.name,
                    b.name,
                    b.shape.len()
                )));
            }
            for (d, &n) in b.shape.iter().zip(&t.shape) {
                match d {
                    Dim::Known(m) if *m as usize != n => {
                        return Err(TargetError::Codegen(format!("kernel {} input {}: dim {m} != {n}", k.name, b.name)))
                    }
                    Dim::Sym(s) => {
                        if let Some(prev) = bind.insert(s, n) {
                            if prev != n {
                                return Err(TargetError::Codegen(format!(
                                    "kernel {}: dim '{s}' is {prev} in one input and {n} in another",
                                    k.name
                                )));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut outs: Vec<Vec<f32>> = Vec::new();
        let mut shapes: Vec<Vec<usize>> = Vec::new();
        for b in k.outputs() {
            let shape = b
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => Ok(*n as usize),
                    Dim::Sym(s) => bind.get(&**s).copied().ok_or_else(|| {
                        TargetError::Codegen(format!("kernel {}: output dim '{s}' is bound by no input", k.name))
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            outs.push(vec![0.0; shape.iter().product()]);
            shapes.push(shape);
        }
        let mut args: Vec<MemRef> = inputs
            .iter()
            .map(|t| {
                let d = t.as_f32().expect("checked above");
                MemRef::new(d.as_ptr(), d.len(), &t.shape)
            })
            .collect();
        for (o, s) in outs.iter_mut().zip(&shapes) {
            args.push(MemRef::of(o, s));
        }
        // SAFETY: the function was generated from this kernel: one f32 memref per buffer, of
        // the buffer's rank; inputs are only read. Indices stay within the descriptors' sizes
        // when the inputs' shapes satisfy the model's shape rules (checked above for known
        // dims and shared symbols; a dim broadcast against another symbol is 1 or equal, as
        // the kernel's producers guarantee).
        unsafe { self.jit.call(&k.name, &mut args)? };
        Ok(outs.into_iter().zip(shapes).map(|(o, s)| Tensor::from_f32(&s, o)).collect())
    }
}

/// How a [`NativeModel`] computes a top-level op other than through the interpreter's
/// semantics (views and host shape arithmetic are evaluated on the host by those).
enum Step {
    /// A constant: its value, shared by every run.
    Constant(std::rc::Rc<Tensor>),
    /// A kernel compiled to native code.
    Kernel(NativeKernel),
}

/// A whole model as native code: every kernel of the (fused) graph compiled, constants in
/// place, views and shape arithmetic evaluated on the host. Compiling fails, naming every
/// kernel that is not lowered yet, rather than run anything some other way. Runs go through
/// the interpreter's driver ([`kiln_ir::interp::run_custom`]): its input checks, value
/// lifetimes and error messages, with the kernels and constants supplied here.
pub struct NativeModel {
    module: kiln_ir::Module,
    steps: HashMap<kiln_ir::ir::OpId, Step>,
}

impl NativeModel {
    pub fn compile(m: &kiln_ir::Module) -> Result<NativeModel, TargetError> {
        use kiln_passes::fusion::{classify, OpClass};
        let mut steps = HashMap::new();
        let mut missing = Vec::new();
        for (i, &o) in m.body.ops.iter().enumerate() {
            let op = m.op(o);
            match classify(m, o) {
                OpClass::Constant => {
                    if let Some(kiln_ir::attr::Attr::Tensor(t)) = op.attrs.get("value") {
                        steps.insert(o, Step::Constant(std::rc::Rc::new(t.clone())));
                    }
                }
                OpClass::View | OpClass::Host => {}
                _ => match kiln_passes::lower::lower(m, o, &format!("k{i}")) {
                    Ok(k) => {
                        steps.insert(o, Step::Kernel(NativeKernel::compile(k)?));
                    }
                    Err(why) => missing.push(format!("node '{}' ({}): {why}", op.node_name(), op.op_type())),
                },
            }
        }
        if !missing.is_empty() {
            return Err(TargetError::Codegen(format!(
                "{} kernel(s) are not lowered to native code yet: {}",
                missing.len(),
                missing.join("; ")
            )));
        }
        Ok(NativeModel { module: m.clone(), steps })
    }

    /// Kernels that run as native code.
    pub fn kernels(&self) -> usize {
        self.steps.values().filter(|s| matches!(s, Step::Kernel(_))).count()
    }

    /// Runs the model on inputs ordered as its graph inputs.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        use std::rc::Rc;
        let native = |o: kiln_ir::ir::OpId, operands: &[Option<&Tensor>]| {
            Some(match self.steps.get(&o)? {
                Step::Constant(t) => Ok(vec![t.clone()]),
                Step::Kernel(k) => operands
                    .iter()
                    .map(|t| t.ok_or_else(|| kiln_ir::graph::OpError("an omitted operand".into())))
                    .collect::<Result<Vec<&Tensor>, _>>()
                    .and_then(|refs| k.run(&refs).map_err(|e| kiln_ir::graph::OpError(e.to_string())))
                    .map(|outs| outs.into_iter().map(Rc::new).collect()),
            })
        };
        let (outs, _) = kiln_ir::interp::run_custom(&self.module, inputs, &mut |_, _| {}, &native)?;
        Ok(outs)
    }
}
