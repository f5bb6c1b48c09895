//! Block-tiled MatMul/Gemm for the GPU targets: shared memory as the local level, barriers,
//! vectorized global loads.
//!
//! A MatMul/Gemm lowers per output element (`Schedule::matmul_per_element`: one parallel
//! loop over `batch × M × N`, storing `epilogue(Σ_k a(row, k) · b(k, col))`). [`recognize`]
//! reads that form back (the flattened loop variable rewritten into `batch`, `row`, `col`,
//! the two loads split into the operand that varies with the row and the one that varies
//! with the column) and picks a [`GemmTile`] from the chip's description. A 2-D Conv with one
//! group, lowered per output element as well, is read back as an implicit GEMM
//! (`read_back_conv`: rows the output channels, columns the output pixels, batch the images,
//! K `C·KH·KW`; the input's padding checks become its operand's load guards, so the tile
//! loads gather the patches, im2col on the fly, with zeros in the padding). [`emit`] then
//! writes the kernel in block-synchronous form, in one of two mappings of the same schedule:
//!
//! - each block computes a `tm × tn` output tile, each of its `tx × ty` threads a `rm × rn`
//!   register micro-tile; K is walked in `tk` steps, each step's `a` (`tk × tm`) and `b`
//!   (`tk × tn`) tiles staged cooperatively into shared memory (zero past M, N and K), with a
//!   barrier after the stores and another before the next step's stores; the epilogue (bias,
//!   scale, fused elementwise ops) runs on the accumulators, stores bounds-checked;
//! - `gpu: true`: a `gpu.func` on a `ceil(N/tn) × ceil(M/tm) × batch` grid of `tx·ty` threads
//!   (`thread_id.x`), the tiles in workgroup memory (address space 3: `.shared` on NVPTX, LDS on
//!   AMDGPU), the accumulators `scf.for` results (registers), `gpu.barrier`, global loads
//!   `vector<4xf32>` with 16-byte alignment where the operand is contiguous along the tile
//!   axis and the sizes are multiples of 4;
//! - `gpu: false` (the host emulation): a `func.func` over blocks `%lo..%hi` (the grid in
//!   x-fastest order) that runs each phase's "thread loop" over all the block's threads one
//!   after another (the barrier is the boundary between two thread loops), the accumulators in
//!   a per-thread array. Same tiles, same zero padding, same summation order per output
//!   element: the host numerics are the schedule's.

use crate::gpu::GpuArch;
use crate::native::{Emitter, JitBackend, Launch, MlirOptions};
use crate::TargetError;
use kiln_ir::kernel::{BinOp, Idx, Kernel, RedOp, Stmt, Val};
use kiln_ir::machine::MachineDescription;
use kiln_ir::{DType, Dim, Tensor};

/// Loop variables of the tiled form (far above any a lowering uses).
const ROW: usize = (1 << 22) + 1;
const COL: usize = (1 << 22) + 2;
const BATCH: usize = (1 << 22) + 3;
const BX: usize = (1 << 22) + 4;
const BY: usize = (1 << 22) + 5;
const BZ: usize = (1 << 22) + 6;
const K0: usize = (1 << 22) + 7;
const KK: usize = (1 << 22) + 8;
/// The thread variable of each phase (one on the GPU; a loop of its own per phase on the host).
const T_INIT: usize = (1 << 22) + 10;
const T_LOAD: usize = (1 << 22) + 11;
const T_COMP: usize = (1 << 22) + 12;
const T_STORE: usize = (1 << 22) + 13;
const T_GPU: usize = (1 << 22) + 14;
/// The `Let` slot standing for the accumulator in the epilogue.
const ACC: usize = 1 << 22;

/// Lanes of a vectorized global load (16 bytes).
const LANES: u64 = 4;

/// A block tile: `tm × tn` outputs a block, `rm × rn` a thread, K in steps of `tk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GemmTile {
    pub tm: u64,
    pub tn: u64,
    pub tk: u64,
    pub rm: u64,
    pub rn: u64,
}

impl GemmTile {
    /// Threads along the tile's columns and rows.
    pub fn tx(&self) -> u64 {
        self.tn / self.rn
    }
    pub fn ty(&self) -> u64 {
        self.tm / self.rm
    }
    pub fn threads(&self) -> u64 {
        self.tx() * self.ty()
    }
    /// Shared memory a block stages per K step: the `a` and `b` tiles, f32.
    pub fn shared_bytes(&self) -> u64 {
        4 * self.tk * (self.tm + self.tn)
    }
    /// 32-bit registers a thread needs at least: accumulators, one step's operands, and
    /// about 16 for addresses and loop state.
    pub fn registers_per_thread(&self) -> u64 {
        self.rm * self.rn + self.rm + self.rn + 16
    }
}

/// One operand of the product, its index in [`ROW`]/[`COL`], `k` and [`BATCH`].
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    pub buf: usize,
    pub index: Vec<Idx>,
    /// The variable (`k`, or the row/column) along which it is contiguous, when loads of
    /// [`LANES`] elements along it are aligned and stay in bounds.
    pub vector_along: Option<usize>,
    /// The variable consecutive threads walk when loading scalars (the contiguous one).
    pub fast: usize,
    /// Loaded only where every `expr < bound` (signed), zero elsewhere: a Conv's input
    /// padding (im2col on the fly); empty for a MatMul/Gemm.
    pub guards: Vec<(Idx, i64)>,
}

/// A MatMul/Gemm kernel in per-element form, read back for tiling.
#[derive(Clone, Debug, PartialEq)]
pub struct TiledGemm {
    pub batch: u64,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    /// The reduction variable.
    pub kvar: usize,
    /// The operand that varies with the row (`a`) and the one with the column (`b`).
    pub a: Operand,
    pub b: Operand,
    pub out: usize,
    pub index: Vec<Idx>,
    /// The stored value, the reduction as `Val::Scalar(ACC)`.
    pub epilogue: Val,
    pub tile: GemmTile,
}

impl TiledGemm {
    /// Blocks along x (columns), y (rows), z (batch).
    pub fn grid(&self) -> [u64; 3] {
        [self.n.div_ceil(self.tile.tn), self.m.div_ceil(self.tile.tm), self.batch]
    }
    pub fn blocks(&self) -> u64 {
        self.grid().iter().product()
    }
    /// Multiply-adds of the product.
    pub fn fmas(&self) -> u64 {
        self.batch * self.m * self.n * self.k
    }
    /// Elements loaded from global memory: each block loads its `a` and `b` tiles once per K
    /// step (padding included).
    pub fn global_loads(&self) -> u64 {
        let steps = self.k.div_ceil(self.tile.tk);
        self.blocks() * steps * self.tile.tk * (self.tile.tm + self.tile.tn)
    }
}

/// `i` with every buffer dim replaced by its (known) value, simplified.
fn concrete(i: &Idx, k: &Kernel) -> Option<Idx> {
    i.try_map(&mut |x| match x {
        Idx::Dim { buf, axis } => match k.buffers.get(buf).and_then(|b| b.shape.get(axis)) {
            Some(Dim::Known(n)) => Ok(Idx::Const(*n as i64)),
            _ => Err(()),
        },
        x => Ok(x),
    })
    .ok()
    .map(Idx::simplify)
}

/// `i` rewritten top-down: where `f` gives a node a replacement (`Some(Some(new))`), that (its
/// operands not visited); where it gives `Some(None)`, the node with its operands rewritten;
/// `None` from `f` fails the whole rewrite.
fn try_rewrite_top_down(i: &Idx, f: &mut dyn FnMut(&Idx) -> Option<Option<Idx>>) -> Option<Idx> {
    match f(i)? {
        Some(new) => Some(new),
        None => i.try_map_operands(&mut |x| try_rewrite_top_down(x, f).ok_or(())).ok(),
    }
}

/// `v` with `Let` slot `slot` replaced by the value it binds.
fn replace_scalar(v: &Val, slot: usize, by: &Val) -> Val {
    v.map(&mut |x| if x == Val::Scalar(slot) { by.clone() } else { x })
}

/// `v` with its reductions taken out: each becomes `Val::Scalar(ACC)` and is pushed on `out`.
fn take_reductions(v: &Val, out: &mut Vec<Val>) -> Val {
    if let Val::Reduce { .. } = v {
        out.push(v.clone());
        return Val::Scalar(ACC);
    }
    v.map_parts(&mut |x| take_reductions(x, out), &mut Idx::clone)
}

/// The flattened variable `v` over `b × m × n` rewritten into [`ROW`], [`COL`] and `inner`
/// (its batch index, an expression of [`BATCH`]) where the lowering's forms show them
/// (`v % n`, `v / n % m`, `v / n / m`, `v / n`); `None` where `v` is left.
fn unflatten(i: &Idx, v: usize, m: i64, n: i64, inner: &Idx) -> Option<Idx> {
    let is = |x: &Idx, c: i64| *x == Idx::Const(c);
    let var = Idx::Var(v);
    // `v / n` (the flat row over the batch), which is `v` itself when `n` is 1 (the lowering's
    // `v % 1` and `v / 1` simplify away, as `q % 1` and `q / 1` do when `m` is 1).
    let q = |x: &Idx| if n == 1 { *x == var } else { matches!(x, Idx::Div(a, b) if **a == var && is(b, n)) };
    let out = try_rewrite_top_down(i, &mut |x| {
        Some(match x {
            Idx::Rem(a, b) if q(a) && is(b, m) => Some(Idx::Var(ROW)),
            Idx::Div(a, b) if q(a) && is(b, m) => Some(inner.clone()),
            x if q(x) => Some(add(mul(inner.clone(), m), Idx::Var(ROW)).simplify()),
            Idx::Rem(a, b) if **a == var && is(b, n) => Some(Idx::Var(COL)),
            _ => None,
        })
    })?;
    (!out.uses(v)).then_some(out)
}

/// Reads kernel `k` back as a MatMul/Gemm in per-element form and tiles it for `arch`;
/// `Ok(None)` when it is not one (or a shape is not known). An error when the tile the
/// description allows does not fit it (never a silent over-subscription).
pub fn recognize(k: &Kernel, arch: &GpuArch) -> Result<Option<TiledGemm>, TargetError> {
    let Some(mut g) = read_back(k).or_else(|| read_back_conv(k)) else { return Ok(None) };
    g.tile = choose_tile(g.batch, g.m, g.n, &arch.description())?;
    g.a.vector_along = vector_axis(k, &g.a, g.kvar, ROW, g.k, g.m, g.tile.tk, g.tile.tm);
    g.b.vector_along = vector_axis(k, &g.b, g.kvar, COL, g.k, g.n, g.tile.tk, g.tile.tn);
    Ok(Some(g))
}

/// The innermost body of a per-element kernel: `Let`s then one `Store` (a reduction bound once
/// and used twice, as by a fused GELU). Returns the stored buffer, its index, the stored value
/// with the `Let`s substituted, and the buffer's shape; `None` for any other body, a kernel
/// with locals, or a symbolic shape.
fn store_of<'k>(k: &'k Kernel, body: &'k [Stmt]) -> Option<(&'k usize, &'k Vec<Idx>, Val, Vec<u64>)> {
    let (Some(Stmt::Store { buf: out, index, value }), lets) = (body.last(), &body[..body.len().saturating_sub(1)])
    else {
        return None;
    };
    let mut value = value.clone();
    for s in lets.iter().rev() {
        let Stmt::Let { slot, value: bound } = s else { return None };
        value = replace_scalar(&value, *slot, bound);
    }
    if !k.locals.is_empty() || k.buffers.iter().any(|b| b.shape.iter().any(|d| matches!(d, Dim::Sym(_)))) {
        return None;
    }
    let shape: Vec<u64> = k.buffers[*out]
        .shape
        .iter()
        .map(|d| match d {
            Dim::Known(n) => *n,
            Dim::Sym(_) => 0,
        })
        .collect();
    Some((out, index, value, shape))
}

/// A per-element kernel's stored value read as one sum of products: `epilogue(Σ_kvar x·y)`.
struct Product {
    /// The value with the reduction replaced by `Val::Scalar(ACC)`, its indices rewritten.
    epilogue: Val,
    kvar: usize,
    /// The reduction's extent (constant).
    kk: i64,
    x: Val,
    y: Val,
}

/// `value` as [`Product`] (a reduction used twice is one accumulator), its indices rewritten by
/// `rw`; `None` when it is not one sum of products of constant extent.
fn product(k: &Kernel, value: &Val, rw: &dyn Fn(&Idx) -> Option<Idx>) -> Option<Product> {
    let mut reductions = Vec::new();
    let epilogue = take_reductions(value, &mut reductions).try_map_idx(&mut |i| rw(i).ok_or(())).ok()?;
    reductions.dedup();
    let [Val::Reduce { op: RedOp::Sum, var: kvar, extent, body }] = reductions.as_slice() else { return None };
    let Idx::Const(kk) = concrete(extent, k)? else { return None };
    let Val::Bin(BinOp::Mul, x, y) = &**body else { return None };
    Some(Product { epilogue, kvar: *kvar, kk, x: (**x).clone(), y: (**y).clone() })
}

/// A load of an f32 input buffer of `k`: the buffer and its index rewritten by `rw`.
fn input_load(k: &Kernel, v: &Val, rw: &dyn Fn(&Idx) -> Option<Idx>) -> Option<(usize, Vec<Idx>)> {
    match v {
        Val::Load { buf, index } if *buf < k.inputs && k.buffers[*buf].dtype == DType::F32 => {
            Some((*buf, index.iter().map(rw).collect::<Option<Vec<Idx>>>()?))
        }
        _ => None,
    }
}

fn read_back(k: &Kernel) -> Option<TiledGemm> {
    // Sequential loops around the parallel one (leading batch dims the lowering kept).
    let mut outer: Vec<(usize, &Idx)> = Vec::new();
    let mut stmts = k.body.as_slice();
    let (var, body) = loop {
        match stmts {
            [Stmt::For { parallel: false, var, extent, body }] => {
                outer.push((*var, extent));
                stmts = body;
            }
            [Stmt::For { parallel: true, var, body, .. }] => break (var, body),
            _ => return None,
        }
    };
    let (out, index, value, shape) = store_of(k, body)?;
    let r = shape.len();
    if r < 2 || shape.contains(&0) {
        return None;
    }
    let (m, n, batch) = (shape[r - 2], shape[r - 1], shape[..r - 2].iter().product::<u64>());
    // Outer loop `o_i` is digit i of the batch index over the outer extents, the parallel
    // loop's own batch (`inner`) the rest.
    let extents: Vec<i64> = outer
        .iter()
        .map(|(_, e)| match concrete(e, k) {
            Some(Idx::Const(c)) if c > 0 => Some(c),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let outer_total: i64 = extents.iter().product();
    if batch as i64 % outer_total != 0 {
        return None;
    }
    let inner_batch = batch as i64 / outer_total;
    let inner = match (inner_batch, outer_total) {
        (1, _) => Idx::Const(0),
        (_, 1) => Idx::Var(BATCH),
        _ => Idx::Rem(Box::new(Idx::Var(BATCH)), c(inner_batch)),
    };
    let mut digits: Vec<(usize, Idx)> = Vec::new();
    let mut below = inner_batch;
    for ((o, _), e) in outer.iter().zip(&extents).rev() {
        digits.push((*o, Idx::Rem(Box::new(Idx::Div(Box::new(Idx::Var(BATCH)), c(below))), c(*e)).simplify()));
        below *= e;
    }
    let rw = |i: &Idx| {
        let i = digits.iter().fold(concrete(i, k)?, |i, (o, by)| i.subst(*o, by));
        unflatten(&i, *var, m as i64, n as i64, &inner)
    };
    let index: Vec<Idx> = index.iter().map(rw).collect::<Option<_>>()?;
    let Product { epilogue, kvar, kk, x, y } = product(k, &value, &rw)?;
    let (x, y) = (input_load(k, &x, &rw)?, input_load(k, &y, &rw)?);
    let uses = |ix: &[Idx], v: usize| ix.iter().any(|i| i.uses(v));
    let (a, b) = if !uses(&x.1, COL) && !uses(&y.1, ROW) {
        (x, y)
    } else if !uses(&y.1, COL) && !uses(&x.1, ROW) {
        (y, x)
    } else {
        return None;
    };
    if kk < 1 || epilogue.uses(kvar) || uses(&index, kvar) {
        return None;
    }
    let operand = |(buf, index): (usize, Vec<Idx>), free: usize| {
        let fast = match index.last() {
            Some(Idx::Var(v)) if *v == kvar => kvar,
            _ => free,
        };
        Operand { buf, index, vector_along: None, fast, guards: Vec::new() }
    };
    Some(TiledGemm {
        batch,
        m,
        n,
        k: kk as u64,
        kvar,
        a: operand(a, ROW),
        b: operand(b, COL),
        out: *out,
        index,
        epilogue,
        tile: GemmTile { tm: 0, tn: 0, tk: 0, rm: 0, rn: 0 },
    })
}

/// Reads kernel `k` back as a 2-D Conv with one group in per-element form (the GPU schedule's
/// `Lowering::conv_element`: sequential loops over the image `n` and output channel `m`, a
/// parallel one over the output pixels `p` of `OH·OW`, storing `epilogue(Σ_k w[m, k…] ·
/// guarded(x[n, k…, p…]))`) as an implicit GEMM: rows the output channels ([`ROW`], operand
/// `a` the weights, contiguous along `k`), columns the pixels ([`COL`], operand `b` the input
/// patches gathered on the fly, the padding checks its [`Operand::guards`]), batch the images.
fn read_back_conv(k: &Kernel) -> Option<TiledGemm> {
    // Sequential loops, then the parallel one (the lowering and `gpu::flatten` merge the
    // output's axes in various ways), then `Let`s and one `Store`.
    let mut loops: Vec<(usize, &Idx)> = Vec::new();
    let mut stmts = k.body.as_slice();
    let body = loop {
        match stmts {
            [Stmt::For { parallel: false, var, extent, body }] => {
                loops.push((*var, extent));
                stmts = body;
            }
            [Stmt::For { parallel: true, var, extent, body }] => {
                loops.push((*var, extent));
                break body;
            }
            _ => return None,
        }
    };
    let (out, index, value, shape) = store_of(k, body)?;
    let [n, m, oh, ow] = shape[..] else { return None };
    let extents: Vec<i64> = loops
        .iter()
        .map(|(_, e)| match concrete(e, k) {
            Some(Idx::Const(c)) if c > 0 => Some(c),
            _ => None,
        })
        .collect::<Option<_>>()?;
    if extents.iter().product::<i64>() as u64 != n * m * oh * ow {
        return None;
    }
    // The loops walk the output in row-major order: loop i is `L / inner_i % extent_i` of
    // the linear output position `L`. A digit term `v / D % E` of a loop variable is then
    // `L / D' % E'`, which (where it starts and ends on the output's axis boundaries) is
    // the axes it spans: the pixel `COL` (`oh = COL / OW`, `ow = COL % OW`), the channel `ROW`,
    // the image `BATCH`.
    let (ow_, oh_, m_) = (ow as i64, oh as i64, m as i64);
    let bounds = [1, ow_, ow_ * oh_, ow_ * oh_ * m_, ow_ * oh_ * m_ * n as i64];
    let digits = [
        Idx::Rem(Box::new(var(COL)), c(ow_)).simplify(),
        Idx::Div(Box::new(var(COL)), c(ow_)).simplify(),
        var(ROW),
        var(BATCH),
    ];
    let inner: Vec<i64> = (0..loops.len()).map(|i| extents[i + 1..].iter().product()).collect();
    let span = |d: i64, e: i64| -> Option<Idx> {
        let j = bounds.iter().position(|&b| b == d)?;
        let j2 = (j + 1..5).find(|&j2| bounds[j2] == d * e)?;
        if (j, j2) == (0, 2) {
            return Some(var(COL));
        }
        let mut x = Idx::Const(0);
        for a in (j..j2).rev() {
            x = add(mul(x, bounds[a + 1] / bounds[a]), digits[a].clone());
        }
        Some(x.simplify())
    };
    fn term(x: &Idx, loops: &[(usize, &Idx)]) -> Option<(usize, i64, Option<i64>)> {
        match x {
            Idx::Var(v) => loops.iter().position(|(l, _)| l == v).map(|i| (i, 1, None)),
            Idx::Div(a, b) => match (term(a, loops)?, &**b) {
                ((i, d, None), Idx::Const(q)) if *q > 0 => Some((i, d * q, None)),
                _ => None,
            },
            Idx::Rem(a, b) => match (term(a, loops)?, &**b) {
                ((i, d, None), Idx::Const(e)) if *e > 0 => Some((i, d, Some(*e))),
                _ => None,
            },
            _ => None,
        }
    }
    let rw = |i: &Idx| -> Option<Idx> {
        let i = concrete(i, k)?;
        let out = try_rewrite_top_down(&i, &mut |x| match term(x, &loops) {
            Some((l, d, e)) => {
                let ext = extents[l];
                if ext % d != 0 {
                    return None;
                }
                let e = match e {
                    Some(e) if e < ext / d && (ext / d) % e != 0 => return None,
                    Some(e) => e.min(ext / d),
                    None => ext / d,
                };
                Some(Some(span(inner[l] * d, e)?))
            }
            None => Some(None),
        })?
        .simplify();
        (!loops.iter().any(|(v, _)| out.uses(*v))).then_some(out)
    };
    let index: Vec<Idx> = index.iter().map(rw).collect::<Option<_>>()?;
    let want = [var(BATCH), var(ROW), digits[1].clone(), digits[0].clone()];
    if index != want {
        return None;
    }
    let Product { epilogue, kvar, kk, x: wv, y: xv } = product(k, &value, &rw)?;
    // The input's padding checks around its load: `lhs < rhs ? x : 0` and `lhs < rhs ? 0 : x`.
    let mut guards = Vec::new();
    let mut x = &xv;
    loop {
        match x {
            Val::IfLess { lhs, rhs, then, other } if **other == Val::Const(0.0) => {
                guards.push((Idx::Sub(Box::new(rw(lhs)?), Box::new(rw(rhs)?)).simplify(), 0));
                x = then;
            }
            Val::IfLess { lhs, rhs, then, other } if **then == Val::Const(0.0) => {
                guards.push((Idx::Sub(Box::new(rw(rhs)?), Box::new(rw(lhs)?)).simplify(), 1));
                x = other;
            }
            _ => break,
        }
    }
    let (w, x) = (input_load(k, &wv, &rw)?, input_load(k, x, &rw)?);
    let uses = |ix: &[Idx], v: usize| ix.iter().any(|i| i.uses(v));
    let guarded = guards.iter().any(|(i, _)| i.uses(ROW));
    if kk < 1
        || uses(&w.1, COL)
        || uses(&w.1, BATCH)
        || uses(&x.1, ROW)
        || guarded
        || epilogue.uses(kvar)
        || uses(&index, kvar)
    {
        return None;
    }
    Some(TiledGemm {
        batch: n,
        m,
        n: oh * ow,
        k: kk as u64,
        kvar,
        a: Operand { buf: w.0, index: w.1, vector_along: None, fast: kvar, guards: Vec::new() },
        b: Operand { buf: x.0, index: x.1, vector_along: None, fast: COL, guards },
        out: *out,
        index,
        epilogue,
        tile: GemmTile { tm: 0, tn: 0, tk: 0, rm: 0, rn: 0 },
    })
}

/// The axis (`kvar` or `free`, tried in that order) along which `x` can be loaded [`LANES`]
/// at a time: its row-major offset is that variable plus a base that is a multiple of
/// [`LANES`] ([`contiguous_base`]: the last index alone over rows of a multiple of [`LANES`],
/// or a Conv's `w[m, c, kh, kw]` over `k = (c·KH + kh)·KW + kw`, or a 1×1 Conv's input over
/// the pixels), no load guard depends on it, and its extent and tile are multiples of
/// [`LANES`] (so an aligned group never straddles an edge, and starts 16-byte aligned).
#[allow(clippy::too_many_arguments)]
fn vector_axis(
    k: &Kernel,
    x: &Operand,
    kvar: usize,
    free: usize,
    kext: u64,
    fext: u64,
    tk: u64,
    tf: u64,
) -> Option<usize> {
    let dims = known_dims(k, x.buf)?;
    [(kvar, kext, tk), (free, fext, tf)].into_iter().find_map(|(v, ext, tile)| {
        let fits = ext % LANES == 0 && tile % LANES == 0 && !x.guards.iter().any(|(i, _)| i.uses(v));
        (fits && contiguous_base(&dims, &x.index, v).is_some()).then_some(v)
    })
}

/// The dims of buffer `buf` of `k`, all known (else `None`).
fn known_dims(k: &Kernel, buf: usize) -> Option<Vec<i64>> {
    k.buffers[buf]
        .shape
        .iter()
        .map(|d| match d {
            Dim::Known(n) => Some(*n as i64),
            Dim::Sym(_) => None,
        })
        .collect()
}

/// `base` where the row-major offset of `index` into a buffer of `dims` is `var + base` for
/// every (non-negative) value of the variables, `base` free of `var` and a multiple of
/// [`LANES`] whatever its variables' values: then [`LANES`] consecutive values of `var` from
/// a multiple of [`LANES`] read one aligned group of consecutive elements. Decided on the
/// offset's [`Linear`] form.
pub fn contiguous_base(dims: &[i64], index: &[Idx], var: usize) -> Option<Idx> {
    if dims.len() != index.len() {
        return None;
    }
    let mut off = Linear::default();
    let mut stride = 1;
    for (i, d) in index.iter().zip(dims).rev() {
        off = off.plus(Linear::of(i).scaled(stride));
        stride *= d;
    }
    let unit = Atom::Digit { var, d: 1, e: None };
    let lanes = LANES as i64;
    let mut base = Idx::Const(off.constant);
    let mut found = false;
    for (atom, coef) in &off.terms {
        if *atom == unit && *coef == 1 {
            found = true;
        } else if atom.uses(var) || coef % lanes != 0 {
            return None;
        } else {
            base = add(base, Idx::Mul(Box::new(atom.idx()), c(*coef)));
        }
    }
    (found && off.constant % lanes == 0).then(|| base.simplify())
}

/// A term's atom in [`Linear`] form: a digit `(v / d) % e` of loop variable `v` (`e` `None`:
/// no remainder, `v / d` itself), or any other index, opaque.
#[derive(Clone, Debug, PartialEq)]
enum Atom {
    Digit { var: usize, d: i64, e: Option<i64> },
    Other(Idx),
}

impl Atom {
    fn uses(&self, v: usize) -> bool {
        match self {
            Atom::Digit { var, .. } => *var == v,
            Atom::Other(i) => i.uses(v),
        }
    }

    fn idx(&self) -> Idx {
        match self {
            Atom::Digit { var, d, e } => {
                let q = Idx::Div(Box::new(Idx::Var(*var)), c(*d));
                match e {
                    Some(e) => Idx::Rem(Box::new(q), c(*e)),
                    None => q,
                }
                .simplify()
            }
            Atom::Other(i) => i.clone(),
        }
    }
}

/// An index as `Σ coef·atom + constant` over non-negative loop variables, the digits of one
/// variable that recombine merged (`c·((v/d)%e) + c·e·((v/(d·e))%f) = c·((v/d)%(e·f))`, so a
/// variable split into digits and flattened back is the variable again). Reads `/` and `%` of
/// a digit by a constant (`(v/d)/q = v/(d·q)`; `((v/d)%e)/q = (v/(d·q))%(e/q)` and
/// `((v/d)%e)%q = (v/d)%q` where `q` divides `e`); anything else is an opaque atom.
#[derive(Clone, Debug, Default, PartialEq)]
struct Linear {
    terms: Vec<(Atom, i64)>,
    constant: i64,
}

impl Linear {
    fn atom(a: Atom) -> Linear {
        Linear { terms: vec![(a, 1)], constant: 0 }
    }

    fn of(i: &Idx) -> Linear {
        // `x` as one digit `(v/d)%e` with coefficient 1.
        let digit = |x: &Idx| match Linear::of(x) {
            Linear { terms, constant: 0 } => match terms.as_slice() {
                [(Atom::Digit { var, d, e }, 1)] => Some((*var, *d, *e)),
                _ => None,
            },
            _ => None,
        };
        let other = || Linear::atom(Atom::Other(i.clone()));
        match i {
            Idx::Const(c) => Linear { terms: Vec::new(), constant: *c },
            Idx::Var(v) => Linear::atom(Atom::Digit { var: *v, d: 1, e: None }),
            Idx::Add(a, b) => Linear::of(a).plus(Linear::of(b)),
            Idx::Sub(a, b) => Linear::of(a).plus(Linear::of(b).scaled(-1)),
            Idx::Mul(a, b) => match (&**a, &**b) {
                (x, Idx::Const(k)) | (Idx::Const(k), x) => Linear::of(x).scaled(*k),
                _ => other(),
            },
            Idx::Div(a, q) => match (digit(a), &**q) {
                (Some((var, d, None)), Idx::Const(q)) if *q > 0 => Linear::atom(Atom::Digit { var, d: d * q, e: None }),
                (Some((var, d, Some(e))), Idx::Const(q)) if *q > 0 && e % q == 0 => {
                    Linear::atom(Atom::Digit { var, d: d * q, e: Some(e / q) })
                }
                _ => other(),
            },
            Idx::Rem(a, q) => match (digit(a), &**q) {
                (Some((var, d, e)), Idx::Const(q)) if *q > 0 && e.is_none_or(|e| e % q == 0) => {
                    Linear::atom(Atom::Digit { var, d, e: Some(*q) })
                }
                _ => other(),
            },
            _ => other(),
        }
    }

    fn scaled(mut self, k: i64) -> Linear {
        self.constant *= k;
        for (_, coef) in &mut self.terms {
            *coef *= k;
        }
        self.terms.retain(|(_, coef)| *coef != 0);
        self
    }

    /// `self + o`, like atoms collected and digits merged.
    fn plus(mut self, o: Linear) -> Linear {
        self.constant += o.constant;
        for (atom, coef) in o.terms {
            match self.terms.iter_mut().find(|(a, _)| *a == atom) {
                Some((_, c)) => *c += coef,
                None => self.terms.push((atom, coef)),
            }
        }
        self.terms.retain(|(_, coef)| *coef != 0);
        // `c·((v/d)%e) + c·e·((v/(d·e))%f)` → `c·((v/d)%(e·f))`, until none is left.
        'merge: loop {
            for i in 0..self.terms.len() {
                let (Atom::Digit { var, d, e: Some(e) }, coef) = self.terms[i] else { continue };
                let high = |(a, k): &(Atom, i64)| {
                    matches!(a, Atom::Digit { var: v, d: dh, .. } if *v == var && *dh == d * e) && *k == coef * e
                };
                if let Some(j) = self.terms.iter().position(high) {
                    let (Atom::Digit { e: f, .. }, _) = self.terms.remove(j) else { unreachable!() };
                    let i = if j < i { i - 1 } else { i };
                    self.terms[i].0 = Atom::Digit { var, d, e: f.map(|f| e * f) };
                    continue 'merge;
                }
            }
            break self;
        }
    }
}

/// The tile for a `batch × m × n` output on `arch`: `rm × rn = 4 × 4` register micro-tiles,
/// `tk = 16`; up to the chip's block size of threads (16 × 16 where it is 256), halved (the
/// larger side first) while the grid has fewer blocks than the chip has SMs/CUs and a block
/// keeps at least a warp. Checked against the description: threads per block, static shared memory
/// per block, registers per SM.
pub fn choose_tile(batch: u64, m: u64, n: u64, d: &MachineDescription) -> Result<GemmTile, TargetError> {
    let limits =
        d.gpu.as_ref().ok_or_else(|| TargetError::Config(format!("{}: the description has no GPU limits", d.name)))?;
    let (rm, rn, tk) = (4, 4, 16);
    let threads = crate::gpu::block_threads(limits);
    let mut tx = n.div_ceil(rn).next_power_of_two().min(16);
    let mut ty = m.div_ceil(rm).next_power_of_two().min((threads / tx).max(1)).min(16);
    let blocks = |tx: u64, ty: u64| n.div_ceil(tx * rn) * m.div_ceil(ty * rm) * batch;
    let warp = limits.warp.max(1) as u64;
    while blocks(tx, ty) < d.cores as u64 && tx * ty / 2 >= warp {
        if tx >= ty {
            tx /= 2;
        } else {
            ty /= 2;
        }
    }
    let tile = GemmTile { tm: ty * rm, tn: tx * rn, tk, rm, rn };
    let over = |what: &str, need: u64, have: u64| {
        TargetError::Config(format!(
            "{}: a {}x{}x{} GEMM tile needs {need} {what}, the description allows {have}",
            d.name, tile.tm, tile.tn, tile.tk
        ))
    };
    if tile.threads() > limits.max_threads_per_block as u64 {
        return Err(over("threads per block", tile.threads(), limits.max_threads_per_block as u64));
    }
    if tile.shared_bytes() > limits.static_shared_bytes_per_block {
        return Err(over(
            "bytes of shared memory per block",
            tile.shared_bytes(),
            limits.static_shared_bytes_per_block,
        ));
    }
    let regs = tile.registers_per_thread() * tile.threads();
    if regs > limits.registers_per_sm as u64 || tile.registers_per_thread() > limits.max_registers_per_thread as u64 {
        return Err(over("registers per block", regs, limits.registers_per_sm as u64));
    }
    Ok(tile)
}

fn c(v: i64) -> Box<Idx> {
    Box::new(Idx::Const(v))
}
fn add(a: Idx, b: Idx) -> Idx {
    Idx::Add(Box::new(a), Box::new(b))
}
fn mul(a: Idx, b: i64) -> Idx {
    Idx::Mul(Box::new(a), c(b))
}
fn var(v: usize) -> Idx {
    Idx::Var(v)
}

/// The MLIR memref type of a buffer of rank `r` (as `native` declares parameters).
fn memref(r: usize) -> String {
    format!("memref<{}f32>", "?x".repeat(r))
}

/// The tiled kernel: a `gpu.func` (`gpu`), or the host emulation's `func.func` over blocks
/// `%lo..%hi` (see the module's documentation).
pub fn emit(k: &Kernel, g: &TiledGemm, options: MlirOptions, gpu: bool) -> String {
    let t = g.tile;
    let shared_space = if gpu { ", 3" } else { "" };
    let sa_ty = format!("memref<{}x{}xf32{shared_space}>", t.tk, t.tm);
    let sb_ty = format!("memref<{}x{}xf32{shared_space}>", t.tk, t.tn);
    let mut e = Emitter::new(k, MlirOptions { gpu, ..options });
    let params: Vec<String> = k
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let noalias = if gpu { "" } else { " {llvm.noalias}" };
            format!("%b{i}: {}{noalias}", memref(b.shape.len()))
        })
        .collect();
    // One-dimensional views of the operands loaded as vectors.
    for x in [&g.a, &g.b] {
        let r = k.buffers[x.buf].shape.len();
        if x.vector_along.is_some() && r > 1 {
            let all: Vec<String> = (0..r).map(|d| d.to_string()).collect();
            let line = format!(
                "%f{} = memref.collapse_shape %b{} [[{}]] : {} into memref<?xf32>",
                x.buf,
                x.buf,
                all.join(", "),
                memref(r)
            );
            if !e.out.contains(&line) {
                e.line(0, &line);
            }
        }
    }
    let n_acc = (t.rm * t.rn) as usize;
    let zero = e.constant(0, 0.0);
    let (c0, c1) = (e.idx(0, &Idx::Const(0)), e.idx(0, &Idx::Const(1)));
    let kext = e.idx(0, &Idx::Const(g.k as i64));
    let tk = e.idx(0, &Idx::Const(t.tk as i64));
    let threads = t.threads() as i64;
    if gpu {
        e.line(0, &format!("%i{BX} = gpu.block_id x"));
        e.line(0, &format!("%i{BY} = gpu.block_id y"));
        e.line(0, &format!("%i{BZ} = gpu.block_id z"));
        e.line(0, &format!("%i{T_GPU} = gpu.thread_id x"));
        let inits: Vec<String> = (0..n_acc).map(|i| format!("%x{i} = {zero}")).collect();
        let f32s = vec!["f32"; n_acc].join(", ");
        e.line(
            0,
            &format!(
                "%acc:{n_acc} = scf.for %i{K0} = {c0} to {kext} step {tk} iter_args({}) -> ({f32s}) {{",
                inits.join(", ")
            ),
        );
        load_phase(&mut e, g, T_GPU, "%sa", &sa_ty, "%sb", &sb_ty, true);
        e.line(1, "gpu.barrier");
        let accs: Vec<String> = (0..n_acc).map(|i| format!("%x{i}")).collect();
        let r = compute_phase(&mut e, g, T_GPU, "%sa", &sa_ty, "%sb", &sb_ty, &accs);
        e.line(1, "gpu.barrier");
        e.line(1, &format!("scf.yield {} : {f32s}", r.join(", ")));
        e.line(0, "}");
        let accs: Vec<String> = (0..n_acc).map(|i| format!("%acc#{i}")).collect();
        store_phase(&mut e, g, T_GPU, &accs);
        format!(
            "gpu.func @{}({}) workgroup(%sa: {sa_ty}, %sb: {sb_ty}) kernel {{\n{}  gpu.return\n}}\n",
            k.name,
            params.join(", "),
            e.out
        )
    } else {
        let [gx, gy, _] = g.grid();
        e.line(0, &format!("%sa = memref.alloc() : {sa_ty}"));
        e.line(0, &format!("%sb = memref.alloc() : {sb_ty}"));
        e.line(0, &format!("%accs = memref.alloc() : memref<{threads}x{n_acc}xf32>"));
        let ixs: Vec<String> = (0..n_acc).map(|i| e.idx(0, &Idx::Const(i as i64))).collect();
        e.line(0, &format!("scf.for %blk = %lo to %hi step {c1} {{"));
        let (gx, gy) = (e.idx(1, &Idx::Const(gx as i64)), e.idx(1, &Idx::Const(gy as i64)));
        e.line(1, &format!("%i{BX} = arith.remui %blk, {gx} : index"));
        e.line(1, &format!("%blk_yz = arith.divui %blk, {gx} : index"));
        e.line(1, &format!("%i{BY} = arith.remui %blk_yz, {gy} : index"));
        e.line(1, &format!("%i{BZ} = arith.divui %blk_yz, {gy} : index"));
        let tn = e.idx(1, &Idx::Const(threads));
        // Thread loop: accumulators to zero.
        e.line(1, &format!("scf.for %i{T_INIT} = {c0} to {tn} step {c1} {{"));
        for ix in &ixs {
            e.line(2, &format!("memref.store {zero}, %accs[%i{T_INIT}, {ix}] : memref<{threads}x{n_acc}xf32>"));
        }
        e.line(1, "}");
        e.line(1, &format!("scf.for %i{K0} = {c0} to {kext} step {tk} {{"));
        // Thread loop: stage the step's tiles (the barrier: this loop ends before the next).
        e.line(2, &format!("scf.for %i{T_LOAD} = {c0} to {tn} step {c1} {{"));
        load_phase(&mut e, g, T_LOAD, "%sa", &sa_ty, "%sb", &sb_ty, false);
        e.line(2, "}");
        // Thread loop: each thread's micro-tile over the step.
        e.line(2, &format!("scf.for %i{T_COMP} = {c0} to {tn} step {c1} {{"));
        let accs: Vec<String> = ixs
            .iter()
            .map(|ix| {
                let a = e.fresh();
                e.line(3, &format!("{a} = memref.load %accs[%i{T_COMP}, {ix}] : memref<{threads}x{n_acc}xf32>"));
                a
            })
            .collect();
        let r = compute_phase(&mut e, g, T_COMP, "%sa", &sa_ty, "%sb", &sb_ty, &accs);
        for (v, ix) in r.iter().zip(&ixs) {
            e.line(3, &format!("memref.store {v}, %accs[%i{T_COMP}, {ix}] : memref<{threads}x{n_acc}xf32>"));
        }
        e.line(2, "}");
        e.line(1, "}");
        // Thread loop: epilogue and stores.
        e.line(1, &format!("scf.for %i{T_STORE} = {c0} to {tn} step {c1} {{"));
        let accs: Vec<String> = ixs
            .iter()
            .map(|ix| {
                let a = e.fresh();
                e.line(2, &format!("{a} = memref.load %accs[%i{T_STORE}, {ix}] : memref<{threads}x{n_acc}xf32>"));
                a
            })
            .collect();
        store_phase(&mut e, g, T_STORE, &accs);
        e.line(1, "}");
        e.line(0, "}");
        e.line(0, &format!("memref.dealloc %sa : {sa_ty}"));
        e.line(0, &format!("memref.dealloc %sb : {sb_ty}"));
        e.line(0, &format!("memref.dealloc %accs : memref<{threads}x{n_acc}xf32>"));
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

/// `cond0 && cond1` for `a < x`, `b < y` (index compares).
fn in_bounds(e: &mut Emitter, depth: usize, checks: &[(&Idx, i64)]) -> String {
    let mut all: Option<String> = None;
    for (a, bound) in checks {
        let (a, b) = (e.idx(depth, a), e.idx(depth, &Idx::Const(*bound)));
        let t = e.fresh();
        e.line(depth, &format!("{t} = arith.cmpi slt, {a}, {b} : index"));
        all = Some(match all {
            None => t,
            Some(p) => {
                let u = e.fresh();
                e.line(depth, &format!("{u} = arith.andi {p}, {t} : i1"));
                u
            }
        });
    }
    all.expect("a check")
}

/// Thread `tv`'s share of staging the step's `a` (`tk × tm`, stored `sa[kk][r]`) and `b`
/// (`tk × tn`, `sb[kk][c]`) tiles: element (or [`LANES`]-group) `tv + threads·s`, zero past
/// M, N or K.
#[allow(clippy::too_many_arguments)]
fn load_phase(e: &mut Emitter, g: &TiledGemm, tv: usize, sa: &str, sa_ty: &str, sb: &str, sb_ty: &str, gpu: bool) {
    let t = g.tile;
    let d = 3;
    for (x, free, fext, tf, block, s, s_ty) in
        [(&g.a, ROW, g.m, t.tm, BY, sa, sa_ty), (&g.b, COL, g.n, t.tn, BX, sb, sb_ty)]
    {
        let lanes = if x.vector_along.is_some() { LANES } else { 1 };
        let along = x.vector_along.unwrap_or(x.fast);
        let groups = t.tk * tf / lanes;
        let per_thread = groups.div_ceil(t.threads());
        for step in 0..per_thread {
            let gi = add(var(tv), Idx::Const((step * t.threads()) as i64));
            // (kk, f): the group's first element in the tile.
            let (kk, f) = if along == g.kvar {
                let per = (t.tk / lanes) as i64;
                (mul(Idx::Rem(Box::new(gi.clone()), c(per)), lanes as i64), Idx::Div(Box::new(gi.clone()), c(per)))
            } else {
                let per = (tf / lanes) as i64;
                (Idx::Div(Box::new(gi.clone()), c(per)), mul(Idx::Rem(Box::new(gi.clone()), c(per)), lanes as i64))
            };
            let kg = add(var(K0), kk.clone());
            let fg = add(mul(var(block), tf as i64), f.clone());
            let at = |i: &Idx| i.subst(g.kvar, &kg).subst(free, &fg).subst(BATCH, &var(BZ));
            let guards: Vec<(Idx, i64)> = x.guards.iter().map(|(i, b)| (at(i).simplify(), *b)).collect();
            let mut checks = vec![(&kg, g.k as i64), (&fg, fext as i64)];
            let last = (gi.clone(), (groups) as i64);
            if !groups.is_multiple_of(t.threads()) {
                checks.push((&last.0, last.1));
            }
            checks.extend(guards.iter().map(|(i, b)| (i, *b)));
            let index: Vec<Idx> = x.index.iter().map(at).collect();
            let ok = in_bounds(e, d, &checks);
            let vty = if lanes > 1 { format!("vector<{lanes}xf32>") } else { "f32".into() };
            let v = e.fresh();
            e.line(d, &format!("{v} = scf.if {ok} -> ({vty}) {{"));
            if lanes > 1 {
                // The row-major offset, `along + base` (`vector_axis` checked that form).
                let dims = known_dims(e.kernel(), x.buf).expect("known dims (store_of checked)");
                let base = contiguous_base(&dims, &x.index, along).expect("a vector operand's offset");
                let first = if along == g.kvar { &kg } else { &fg };
                let off = e.idx(d + 1, &add(at(&base), first.clone()).simplify());
                let flat = if dims.len() > 1 { format!("%f{}", x.buf) } else { format!("%b{}", x.buf) };
                let align = if gpu { " {alignment = 16}" } else { "" };
                let l = e.fresh();
                e.line(d + 1, &format!("{l} = vector.load {flat}[{off}]{align} : memref<?xf32>, {vty}"));
                e.line(d + 1, &format!("scf.yield {l} : {vty}"));
                e.line(d, "} else {");
                let z = e.fresh();
                e.line(d + 1, &format!("{z} = arith.constant dense<0.0> : {vty}"));
                e.line(d + 1, &format!("scf.yield {z} : {vty}"));
            } else {
                let l = e.val(d + 1, &Val::Load { buf: x.buf, index });
                e.line(d + 1, &format!("scf.yield {l} : f32"));
                e.line(d, "} else {");
                let z = e.constant(d + 1, 0.0);
                e.line(d + 1, &format!("scf.yield {z} : f32"));
            }
            e.line(d, "}");
            // Past the tile (a partial last round of groups): nothing to store.
            let inside =
                if !groups.is_multiple_of(t.threads()) { Some(in_bounds(e, d, &[(&last.0, last.1)])) } else { None };
            if let Some(inside) = &inside {
                e.line(d, &format!("scf.if {inside} {{"));
            }
            if lanes > 1 && along != g.kvar {
                let (a, b) = (e.idx(d, &kk), e.idx(d, &f));
                e.line(d, &format!("vector.store {v}, {s}[{a}, {b}] : {s_ty}, {vty}"));
            } else {
                for j in 0..lanes {
                    let lane = if lanes > 1 {
                        let l = e.fresh();
                        e.line(d, &format!("{l} = vector.extract {v}[{j}] : f32 from {vty}"));
                        l
                    } else {
                        v.clone()
                    };
                    let a = e.idx(d, &add(kk.clone(), Idx::Const(j as i64)).simplify());
                    let b = e.idx(d, &f);
                    e.line(d, &format!("memref.store {lane}, {s}[{a}, {b}] : {s_ty}"));
                }
            }
            if inside.is_some() {
                e.line(d, "}");
            }
        }
    }
}

/// Thread `tv`'s micro-tile over one K step: `acc[i][j] += sa[kk][r0 + i] · sb[kk][c0 + j]`
/// for `kk` in `0..tk` (operands read from shared memory as vectors); returns the new
/// accumulators (row-major).
#[allow(clippy::too_many_arguments)]
fn compute_phase(
    e: &mut Emitter,
    g: &TiledGemm,
    tv: usize,
    sa: &str,
    sa_ty: &str,
    sb: &str,
    sb_ty: &str,
    accs: &[String],
) -> Vec<String> {
    let t = g.tile;
    let d = 3;
    let n = accs.len();
    let r0 = e.idx(d, &mul(Idx::Div(Box::new(var(tv)), c(t.tx() as i64)), t.rm as i64));
    let c0 = e.idx(d, &mul(Idx::Rem(Box::new(var(tv)), c(t.tx() as i64)), t.rn as i64));
    let (lo, hi, one) = (e.idx(d, &Idx::Const(0)), e.idx(d, &Idx::Const(t.tk as i64)), e.idx(d, &Idx::Const(1)));
    let res = e.fresh();
    let args: Vec<String> = (0..n).map(|_| e.fresh()).collect();
    let inits: Vec<String> = args.iter().zip(accs).map(|(a, x)| format!("{a} = {x}")).collect();
    let f32s = vec!["f32"; n].join(", ");
    e.line(
        d,
        &format!("{res}:{n} = scf.for %i{KK} = {lo} to {hi} step {one} iter_args({}) -> ({f32s}) {{", inits.join(", ")),
    );
    let va = e.fresh();
    let vb = e.fresh();
    let (ra, rb) = (format!("vector<{}xf32>", t.rm), format!("vector<{}xf32>", t.rn));
    let align = if e.options().gpu { " {alignment = 16}" } else { "" };
    e.line(d + 1, &format!("{va} = vector.load {sa}[%i{KK}, {r0}]{align} : {sa_ty}, {ra}"));
    e.line(d + 1, &format!("{vb} = vector.load {sb}[%i{KK}, {c0}]{align} : {sb_ty}, {rb}"));
    let ai: Vec<String> = (0..t.rm)
        .map(|i| {
            let x = e.fresh();
            e.line(d + 1, &format!("{x} = vector.extract {va}[{i}] : f32 from {ra}"));
            x
        })
        .collect();
    let bj: Vec<String> = (0..t.rn)
        .map(|j| {
            let x = e.fresh();
            e.line(d + 1, &format!("{x} = vector.extract {vb}[{j}] : f32 from {rb}"));
            x
        })
        .collect();
    let mut out = Vec::new();
    for i in 0..t.rm as usize {
        for j in 0..t.rn as usize {
            let (p, s) = (e.fresh(), e.fresh());
            e.line(d + 1, &format!("{p} = arith.mulf {}, {} fastmath<contract> : f32", ai[i], bj[j]));
            e.line(d + 1, &format!("{s} = arith.addf {}, {p} fastmath<contract> : f32", args[i * t.rn as usize + j]));
            out.push(s);
        }
    }
    e.line(d + 1, &format!("scf.yield {} : {f32s}", out.join(", ")));
    e.line(d, "}");
    (0..n).map(|i| format!("{res}#{i}")).collect()
}

/// Thread `tv`'s outputs: the epilogue on each accumulator of its micro-tile, stored where
/// the row and column are inside the output.
fn store_phase(e: &mut Emitter, g: &TiledGemm, tv: usize, accs: &[String]) {
    let t = g.tile;
    let d = 2;
    for i in 0..t.rm {
        for j in 0..t.rn {
            let row = add(
                add(mul(var(BY), t.tm as i64), mul(Idx::Div(Box::new(var(tv)), c(t.tx() as i64)), t.rm as i64)),
                Idx::Const(i as i64),
            );
            let col = add(
                add(mul(var(BX), t.tn as i64), mul(Idx::Rem(Box::new(var(tv)), c(t.tx() as i64)), t.rn as i64)),
                Idx::Const(j as i64),
            );
            let ok = in_bounds(e, d, &[(&row, g.m as i64), (&col, g.n as i64)]);
            e.line(d, &format!("scf.if {ok} {{"));
            let put = |x: &Idx| x.subst(ROW, &row).subst(COL, &col).subst(BATCH, &var(BZ));
            let value = g.epilogue.map_idx(&mut |x| put(x));
            e.slots.insert(ACC, accs[(i * t.rn + j) as usize].clone());
            let v = e.val(d + 1, &value);
            let ix: Vec<String> = g.index.iter().map(|x| e.idx(d + 1, &put(x))).collect();
            e.line(d + 1, &format!("memref.store {v}, %b{}[{}] : {}", g.out, ix.join(", "), memref(ix.len())));
            e.line(d, "}");
        }
    }
}

/// A tiled GEMM compiled for the host emulation ([`emit`] with `gpu: false`).
pub struct HostTiled {
    kernel: Kernel,
    gemm: TiledGemm,
    backend: JitBackend,
}

impl HostTiled {
    pub fn compile(kernel: Kernel, gemm: TiledGemm) -> Result<HostTiled, TargetError> {
        let text = emit(&kernel, &gemm, MlirOptions::default(), false);
        let backend = JitBackend::compile(&text, std::slice::from_ref(&kernel.name))?;
        Ok(HostTiled { kernel, gemm, backend })
    }

    pub fn gemm(&self) -> &TiledGemm {
        &self.gemm
    }

    /// Runs the launch over buffers given as strided memref descriptors (as a GPU launch
    /// receives them), block by block.
    ///
    /// # Safety
    /// `descriptors` are the kernel's buffers in order, each a valid descriptor of its rank
    /// over memory of its size.
    pub unsafe fn call_blocks(&self, descriptors: &mut [*mut i64]) -> Result<(), TargetError> {
        let blocks = self.gemm.blocks() as i64;
        // SAFETY: the caller's guarantee; function 0 is this kernel.
        unsafe { self.backend.call_ranges(0, descriptors, &mut (0..blocks).map(|b| (b, b + 1))) }
    }

    /// Runs the launch as the GPU would, block by block (x fastest, then y, then z), each
    /// block's threads phase by phase, into outputs first filled with NaN.
    pub fn run(&self, operands: &[&Tensor]) -> Result<Vec<Tensor>, TargetError> {
        let l = Launch::new(&self.kernel, operands, true)?;
        let blocks = self.gemm.blocks() as i64;
        self.backend.launch_ranges(0, &l, &mut (0..blocks).map(|b| (b, b + 1)))
    }
}
