//! Row kernels for the GPU targets, a block per row: the memory-bound chains whose every
//! iteration of the parallel loop reduces a row (LayerNorm, Softmax, RMSNorm, a reduction
//! over the last axis, their fused epilogues).
//!
//! The cpu lowering gives them one parallel iteration per row, holding `Let`s with reductions
//! over the row and loops over its columns:
//!
//! ```text
//! parallel r in 0..R {
//!     %s0 = f(reduce(j in 0..C: x[r, j]))
//!     for c in 0..C { y[r, c] = g(%s0, x[r, c]) }
//!     ...
//! }
//! ```
//!
//! On a GPU a thread per row leaves the chip idle (a 128-row LayerNorm is 4 warps) and its
//! loads uncoalesced (a warp reads 32 rows apart). [`recognize`] takes such a kernel and
//! [`emit`] writes it with a block of [`RowKernel::threads`] threads per row, cooperating,
//! statement by statement, with a barrier after each:
//! - a `Let`'s reductions: thread `t` reduces columns `t, t + T, t + 2T, …` into a partial,
//!   stores it to shared memory, and the partials are combined by a tree (`T/2`, `T/4`, …, 1
//!   threads, a barrier between levels); every thread then reads the total and computes the
//!   `Let`'s value (the same in every thread);
//! - a loop over the columns: thread `t` runs iterations `t, t + T, …` (consecutive threads,
//!   consecutive columns: coalesced);
//! - any other statement (a store of the row's result): thread 0.
//!
//! As for [`crate::gpu_tile`], the schedule is written in two mappings of the same text: a
//! `gpu.func` on a grid of `R` blocks (`gpu: true`), and the host emulation (`gpu: false`), a
//! function over blocks `%lo..%hi` whose phases are loops over the block's threads, a barrier
//! the end of one. The partial sums, the tree and each thread's columns are the same, so the
//! host numerics are the GPU's.

use crate::gpu::{static_idx, GpuArch};
use crate::gpu_tile::take_reductions;
use crate::native::{Emitter, HostBlocks, MlirOptions};
use crate::TargetError;
use kiln_ir::kernel::{Idx, Kernel, Stmt, Val};
use kiln_ir::Dim;

/// The thread variable (one on the GPU; a loop of its own per phase on the host).
const TID: usize = (1 << 22) + 40;
/// The `Let` slots standing for a statement's reductions (taken out of its value).
const TOTAL: usize = (1 << 22) + 41;

/// A row kernel read for a block per row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowKernel {
    /// Rows: the parallel loop's extent (blocks).
    pub rows: u64,
    /// Threads a block (a power of two, a whole number of warps).
    pub threads: u64,
    /// The parallel loop's variable (the block's row).
    pub var: usize,
    /// Sequential loops around the parallel one (a batch of one, say), outermost first: every
    /// block runs them, its row in each.
    pub outer: Vec<(usize, Idx)>,
    /// The row's statements.
    pub body: Vec<Stmt>,
}

impl RowKernel {
    pub fn grid(&self) -> [u64; 3] {
        [self.rows, 1, 1]
    }
    /// Shared memory a block uses: one partial per thread.
    pub fn shared_bytes(&self) -> u64 {
        4 * self.threads
    }
}

/// Kernel `k` as a row kernel for `arch`, if it is one: known shapes, no locals, one parallel
/// loop whose body has a `Let` with a reduction, whose loops over the columns have
/// independent iterations (each stores only elements indexed by its variable, and reads an
/// element it stores only where it stores it), with no loop nested in them; not when its rows
/// are narrower than a warp and enough to fill the chip with a thread per row. The block is
/// the row's width rounded up to a power of two, at least a warp, at most the chip's block
/// size ([`GpuArch::block_threads`]).
pub fn recognize(k: &Kernel, arch: &GpuArch) -> Option<RowKernel> {
    if !k.locals.is_empty() || k.buffers.iter().any(|b| b.shape.iter().any(|d| matches!(d, Dim::Sym(_)))) {
        return None;
    }
    let mut outer = Vec::new();
    let mut nest = k.body.as_slice();
    let (var, extent, body) = loop {
        match nest {
            [Stmt::For { var, extent, parallel: true, body }] => break (var, extent, body),
            [Stmt::For { var, extent, parallel: false, body }] => {
                static_idx(extent, k)?;
                outer.push((*var, extent.clone()));
                nest = body;
            }
            _ => return None,
        }
    };
    let rows = static_idx(extent, k)?;
    let mut widest = 0i64;
    let mut reduces = false;
    for s in body {
        match s {
            // A store of the row's own (thread 0's) may reduce as well, but only a `Let`'s
            // reduction makes a row kernel: a store of one reduction per iteration is a
            // per-element kernel (a Conv's or MatMul's output), a thread per element.
            Stmt::Let { value, .. } | Stmt::Store { value, .. } => {
                let mut rs = Vec::new();
                take_reductions(value, &mut rs, &|n| TOTAL + n);
                for r in &rs {
                    let Val::Reduce { extent, .. } = r else { continue };
                    widest = widest.max(static_idx(extent, k)?);
                    reduces |= matches!(s, Stmt::Let { .. });
                }
            }
            Stmt::For { var: c, extent, parallel: false, body } => {
                if !columns_independent(body, *c, k.inputs) {
                    return None;
                }
                widest = widest.max(static_idx(extent, k)?);
            }
            _ => return None,
        }
    }
    if !reduces || rows <= 0 {
        return None;
    }
    let warp = arch.warp();
    // Rows narrower than a warp, enough of them to fill the chip a thread each (256 a
    // SM/CU): a thread per row wastes no lanes.
    if (widest as u64) < warp && rows as u64 >= 256 * arch.description().cores as u64 {
        return None;
    }
    let threads = (widest.max(1) as u64).next_power_of_two().clamp(warp, arch.block_threads().max(warp));
    Some(RowKernel { rows: rows as u64, threads, var: *var, outer, body: body.clone() })
}

/// Whether the iterations of column loop `c` over `body` (`Let`s and `Store`s only) may run
/// on different threads: every store is to an output and indexed by `c`, and every load of a
/// buffer the loop stores reads an element the same iteration stores.
fn columns_independent(body: &[Stmt], c: usize, inputs: usize) -> bool {
    let mut stored: Vec<(usize, &Vec<Idx>)> = Vec::new();
    for s in body {
        match s {
            Stmt::Store { buf, index, .. } if *buf >= inputs && index.contains(&Idx::Var(c)) => {
                stored.push((*buf, index))
            }
            Stmt::Store { .. } => return false,
            Stmt::Let { .. } => {}
            _ => return false,
        }
    }
    body.iter().all(|s| match s {
        Stmt::Store { value, .. } | Stmt::Let { value, .. } => loads_ok(value, &stored),
        _ => false,
    })
}

/// Whether every load in `v` of a buffer in `stored` reads an element stored there.
fn loads_ok(v: &Val, stored: &[(usize, &Vec<Idx>)]) -> bool {
    let mut ok = match v {
        Val::Load { buf, index } => {
            !stored.iter().any(|(b, _)| b == buf) || stored.iter().any(|(b, i)| b == buf && *i == index)
        }
        _ => true,
    };
    v.map_parts(
        &mut |x| {
            ok &= loads_ok(x, stored);
            x.clone()
        },
        &mut Idx::clone,
    );
    ok
}

/// The row kernel as a `gpu.func` (`gpu`) or the host emulation's `func.func` over blocks
/// `%lo..%hi` (see the module's documentation).
pub fn emit(k: &Kernel, rk: &RowKernel, options: MlirOptions, gpu: bool) -> String {
    let mut e = Emitter::new(k, MlirOptions { gpu, ..options });
    let t = rk.threads;
    let red_ty = if gpu { format!("memref<{t}xf32, 3>") } else { format!("memref<{t}xf32>") };
    let red_ty = red_ty.as_str();
    let params = crate::native::block_params(k, gpu);
    let (c0, c1) = (e.idx(0, &Idx::Const(0)), e.idx(0, &Idx::Const(1)));
    let base = if gpu {
        e.line(0, &format!("%i{} = gpu.block_id x", rk.var));
        e.line(0, &format!("%i{TID} = gpu.thread_id x"));
        0
    } else {
        e.line(0, &format!("%red = memref.alloc() : {red_ty}"));
        e.line(0, &format!("scf.for %i{} = %lo to %hi step {c1} {{", rk.var));
        1
    };
    // The sequential loops around the rows, in every thread (the same trip counts: the
    // barriers inside are reached by all).
    for (n, (v, ext)) in rk.outer.iter().enumerate() {
        let ext = e.idx(base + n, ext);
        e.line(base + n, &format!("scf.for %i{v} = {c0} to {ext} step {c1} {{"));
    }
    let depth = base + rk.outer.len();
    let cx = Phases { gpu, depth, threads: t, c0: c0.clone(), c1, red_ty };
    for s in &rk.body {
        match s {
            Stmt::Let { slot, value } => {
                let rest = cx.reductions(&mut e, value);
                let v = e.val(depth, &rest);
                e.slots.insert(*slot, v);
            }
            Stmt::For { var, extent, body, .. } => {
                cx.phase(&mut e, &mut |e, d| {
                    let (ext, step) = (e.idx(d, extent), e.idx(d, &Idx::Const(t as i64)));
                    e.line(d, &format!("scf.for %i{var} = %i{TID} to {ext} step {step} {{"));
                    e.stmts(d + 1, body);
                    e.line(d, "}");
                });
            }
            Stmt::Store { buf, index, value } => {
                // A store of the row's own (its reductions shared first): thread 0.
                let store = Stmt::Store { buf: *buf, index: index.clone(), value: cx.reductions(&mut e, value) };
                if gpu {
                    let first = e.fresh();
                    e.line(depth, &format!("{first} = arith.cmpi eq, %i{TID}, {c0} : index"));
                    e.line(depth, &format!("scf.if {first} {{"));
                    e.stmts(depth + 1, std::slice::from_ref(&store));
                    e.line(depth, "}");
                    e.line(depth, "gpu.barrier");
                } else {
                    e.stmts(depth, std::slice::from_ref(&store));
                }
            }
            Stmt::Mma(_) => unreachable!("recognize takes no register tiles"),
        }
    }
    for n in (0..rk.outer.len()).rev() {
        e.line(base + n, "}");
    }
    if gpu {
        format!(
            "gpu.func @{}({}) workgroup(%red: {red_ty}) kernel {{\n{}  gpu.return\n}}\n",
            k.name,
            params.join(", "),
            e.out
        )
    } else {
        e.line(0, "}");
        e.line(0, &format!("memref.dealloc %red : {red_ty}"));
        let mut params = params;
        params.push("%lo: index".into());
        params.push("%hi: index".into());
        format!(
            "func.func @{}({}) attributes {{ llvm.emit_c_interface }} {{\n{}  return\n}}\n",
            k.name,
            params.join(", "),
            e.out
        )
    }
}

/// How [`emit`] writes a block's phases at `depth`.
struct Phases<'a> {
    gpu: bool,
    depth: usize,
    threads: u64,
    c0: String,
    c1: String,
    red_ty: &'a str,
}

impl Phases<'_> {
    /// `f` run by every thread (on the host, a loop over them), then a barrier.
    fn phase(&self, e: &mut Emitter, f: &mut dyn FnMut(&mut Emitter, usize)) {
        if self.gpu {
            f(e, self.depth);
            e.line(self.depth, "gpu.barrier");
        } else {
            let n = e.idx(self.depth, &Idx::Const(self.threads as i64));
            e.line(self.depth, &format!("scf.for %i{TID} = {} to {n} step {} {{", self.c0, self.c1));
            f(e, self.depth + 1);
            e.line(self.depth, "}");
        }
    }

    /// `value`'s outermost reductions shared by the block (each thread's partial over its
    /// strided columns, the tree in shared memory, the total read by all); returns `value`
    /// with each replaced by its total's slot.
    fn reductions(&self, e: &mut Emitter, value: &Val) -> Val {
        let (depth, t, red_ty) = (self.depth, self.threads, self.red_ty);
        let mut rs = Vec::new();
        let rest = take_reductions(value, &mut rs, &|n| TOTAL + n);
        for (n, r) in rs.iter().enumerate() {
            let Val::Reduce { op, var, extent, body } = r else { unreachable!("taken reductions") };
            let (init, combine) = crate::native::reduction(*op);
            // Each thread's partial over its columns, into shared memory.
            self.phase(e, &mut |e, d| {
                let (init, ext, step) = (e.constant(d, init), e.idx(d, extent), e.idx(d, &Idx::Const(t as i64)));
                let (p, acc) = (e.fresh(), e.fresh());
                e.line(
                    d,
                    &format!(
                        "{p} = scf.for %i{var} = %i{TID} to {ext} step {step} iter_args({acc} = {init}) -> (f32) {{"
                    ),
                );
                let v = e.val(d + 1, body);
                let x = e.fresh();
                e.line(d + 1, &format!("{x} = {combine} {acc}, {v} : f32"));
                e.line(d + 1, &format!("scf.yield {x} : f32"));
                e.line(d, "}");
                e.line(d, &format!("memref.store {p}, %red[%i{TID}] : {red_ty}"));
            });
            // The tree: `half` threads combine their partial with the one `half` on.
            let mut half = t / 2;
            while half > 0 {
                let h = e.idx(depth, &Idx::Const(half as i64));
                if self.gpu {
                    let inside = e.fresh();
                    e.line(depth, &format!("{inside} = arith.cmpi ult, %i{TID}, {h} : index"));
                    e.line(depth, &format!("scf.if {inside} {{"));
                } else {
                    e.line(depth, &format!("scf.for %i{TID} = {} to {h} step {} {{", self.c0, self.c1));
                }
                let d = depth + 1;
                let (a, o, b, x) = (e.fresh(), e.fresh(), e.fresh(), e.fresh());
                e.line(d, &format!("{a} = memref.load %red[%i{TID}] : {red_ty}"));
                e.line(d, &format!("{o} = arith.addi %i{TID}, {h} : index"));
                e.line(d, &format!("{b} = memref.load %red[{o}] : {red_ty}"));
                e.line(d, &format!("{x} = {combine} {a}, {b} : f32"));
                e.line(d, &format!("memref.store {x}, %red[%i{TID}] : {red_ty}"));
                e.line(depth, "}");
                if self.gpu {
                    e.line(depth, "gpu.barrier");
                }
                half /= 2;
            }
            let total = e.fresh();
            e.line(depth, &format!("{total} = memref.load %red[{}] : {red_ty}", self.c0));
            if self.gpu {
                // Every thread has read the total before the next partials overwrite it.
                e.line(depth, "gpu.barrier");
            }
            e.slots.insert(TOTAL + n, total);
        }
        rest
    }
}

/// The row kernel `rows` of `kernel` compiled for the host emulation ([`emit`] with
/// `gpu: false`).
pub fn host_blocks(kernel: Kernel, rows: &RowKernel) -> Result<HostBlocks, TargetError> {
    let text = emit(&kernel, rows, MlirOptions::default(), false);
    HostBlocks::compile(kernel, &text, rows.grid(), rows.threads)
}
