//! Block-tiled MatMul/Gemm for the GPU targets: shared memory as the local level, barriers,
//! vectorized global loads, the matrix unit (tensor cores, MFMA).
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
//!
//! With the chip's matrix unit ([`MatrixInst`], [`GemmTile::mma`]) the compute step is
//! warp-level instead: each warp's `rm × rn` part is `rm/m × rn/n` of the instruction's
//! products per `k` step, its lanes' fragments read from the shared tiles (rows padded
//! against bank conflicts) by the instruction's lane layout, the accumulators' positions the
//! store phase's. The host mapping runs the same fragment loads in a thread loop, then per warp
//! the instruction emulated from the same layout (`@<kernel>_mma`).

use crate::gpu::GpuArch;
use crate::native::{Emitter, HostBlocks, MlirOptions};
use crate::TargetError;
use kiln_ir::kernel::{BinOp, Idx, Kernel, RedOp, Stmt, Val};
use kiln_ir::machine::MachineDescription;
use kiln_ir::{DType, Dim};

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
/// The matrix-unit tile's instruction-`k` steps within a K step, and the host emulation's
/// lanes and warps.
const KS: usize = (1 << 22) + 15;
const LANE: usize = (1 << 22) + 16;
const WARP: usize = (1 << 22) + 17;
/// The `Let` slot standing for the accumulator in the epilogue.
const ACC: usize = 1 << 22;

/// Lanes of a vectorized global load (16 bytes).
const LANES: u64 = 4;

/// A block tile: `tm × tn` outputs a block, `rm × rn` a thread (a warp with [`GemmTile::mma`]),
/// K in steps of `tk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GemmTile {
    pub tm: u64,
    pub tn: u64,
    pub tk: u64,
    pub rm: u64,
    pub rn: u64,
    /// The matrix unit's warp-wide products compute the tile: each warp its `rm × rn` part, as
    /// `rm/m × rn/n` of the instruction's `m × n` products per `k` step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mma: Option<MatrixInst>,
}

impl GemmTile {
    /// Threads (warps with [`GemmTile::mma`]) along the tile's columns and rows.
    pub fn tx(&self) -> u64 {
        self.tn / self.rn
    }
    pub fn ty(&self) -> u64 {
        self.tm / self.rm
    }
    pub fn threads(&self) -> u64 {
        self.tx() * self.ty() * self.mma.map_or(1, |i| i.lanes())
    }
    /// Words of padding after each `k` row of the shared tiles: with the matrix unit, lanes
    /// reading the same row at different `k` then fall in different banks.
    pub fn pad(&self) -> u64 {
        self.mma.map_or(0, |i| i.pad())
    }
    /// Shared memory a block stages per K step: the `a` and `b` tiles, f32.
    pub fn shared_bytes(&self) -> u64 {
        4 * self.tk * (self.tm + self.tn + 2 * self.pad())
    }
    /// 32-bit registers a thread needs at least: accumulators, one step's operands (fragments),
    /// and about 16 for addresses and loop state.
    pub fn registers_per_thread(&self) -> u64 {
        match self.mma {
            Some(i) => {
                let [m, n, _] = i.shape();
                let (mi, ni) = (self.rm / m, self.rn / n);
                let [a, b, c] = i.regs();
                mi * ni * c + i.parts() * (mi * a + ni * b) + 16
            }
            None => self.rm * self.rn + self.rm + self.rn + 16,
        }
    }
    /// The accumulators a thread holds.
    pub fn accumulators(&self) -> u64 {
        match self.mma {
            Some(i) => {
                let [m, n, _] = i.shape();
                (self.rm / m) * (self.rn / n) * i.regs()[2]
            }
            None => self.rm * self.rn,
        }
    }
}

/// A matrix-unit instruction: a warp-wide `m × n × k` product whose operands and accumulators
/// are spread over the lanes' registers ("fragments"), lane `l`'s register `r` holding the
/// element at `a_at`, `b_at`, `c_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatrixInst {
    /// NVIDIA `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32` (sm_80 and later). TF32
    /// keeps 10 bits of mantissa, so each f32 operand is split into a TF32 `hi` and the TF32 of
    /// its remainder `lo`, and the product is `hi·lo + lo·hi + hi·hi`, three instructions
    /// ("3xTF32"): f32 accuracy (only `lo·lo`, below f32's last bit, is left out).
    MmaTf32x3,
    /// AMD `v_mfma_f32_16x16x4f32` (CDNA: gfx90a, gfx942), f32 operands, a 64-lane wavefront.
    MfmaF32,
}

impl MatrixInst {
    /// The instruction for a chip's matrix unit as its description gives it (`matrix_shape`,
    /// warp), if kiln has one.
    pub fn for_machine(d: &MachineDescription) -> Option<MatrixInst> {
        let warp = d.gpu.as_ref()?.warp;
        match (d.matrix_shape.as_slice(), warp) {
            ([16, 8, 8], 32) => Some(MatrixInst::MmaTf32x3),
            ([16, 16, 4], 64) => Some(MatrixInst::MfmaF32),
            _ => None,
        }
    }
    /// `[m, n, k]`.
    pub fn shape(self) -> [u64; 3] {
        match self {
            MatrixInst::MmaTf32x3 => [16, 8, 8],
            MatrixInst::MfmaF32 => [16, 16, 4],
        }
    }
    /// Lanes that execute it together.
    pub fn lanes(self) -> u64 {
        match self {
            MatrixInst::MmaTf32x3 => 32,
            MatrixInst::MfmaF32 => 64,
        }
    }
    /// Registers a lane holds of `a`, `b` and the accumulator.
    pub fn regs(self) -> [u64; 3] {
        match self {
            MatrixInst::MmaTf32x3 => [4, 2, 4],
            MatrixInst::MfmaF32 => [1, 1, 4],
        }
    }
    /// Parts each f32 operand is split into (`hi`, `lo` for 3xTF32).
    pub fn parts(self) -> u64 {
        match self {
            MatrixInst::MmaTf32x3 => 2,
            MatrixInst::MfmaF32 => 1,
        }
    }
    /// The instructions of one product, as (part of `a`, part of `b`), in issue order: the
    /// small terms first.
    pub fn products(self) -> &'static [(u64, u64)] {
        match self {
            MatrixInst::MmaTf32x3 => &[(0, 1), (1, 0), (0, 0)],
            MatrixInst::MfmaF32 => &[(0, 0)],
        }
    }
    /// Shared-tile row padding (words) that spreads a fragment load over the banks.
    fn pad(self) -> u64 {
        match self {
            MatrixInst::MmaTf32x3 => 8,
            MatrixInst::MfmaF32 => 16,
        }
    }
    /// (row, k) of `a` in lane `lane`'s register `r` (PTX ISA "Matrix Fragments for
    /// mma.m16n8k8", .tf32; AMD CDNA ISA, `v_mfma_f32_16x16x4f32`).
    pub fn a_at(self, lane: &Idx, r: u64) -> (Idx, Idx) {
        let r = r as i64;
        match self {
            MatrixInst::MmaTf32x3 => (
                add(Idx::Div(Box::new(lane.clone()), c(4)), Idx::Const(8 * (r % 2))),
                add(Idx::Rem(Box::new(lane.clone()), c(4)), Idx::Const(4 * (r / 2))),
            ),
            MatrixInst::MfmaF32 => (Idx::Rem(Box::new(lane.clone()), c(16)), Idx::Div(Box::new(lane.clone()), c(16))),
        }
    }
    /// (k, col) of `b` in lane `lane`'s register `r`.
    pub fn b_at(self, lane: &Idx, r: u64) -> (Idx, Idx) {
        let r = r as i64;
        match self {
            MatrixInst::MmaTf32x3 => {
                (add(Idx::Rem(Box::new(lane.clone()), c(4)), Idx::Const(4 * r)), Idx::Div(Box::new(lane.clone()), c(4)))
            }
            MatrixInst::MfmaF32 => (Idx::Div(Box::new(lane.clone()), c(16)), Idx::Rem(Box::new(lane.clone()), c(16))),
        }
    }
    /// (row, col) of the accumulator in lane `lane`'s register `r`.
    pub fn c_at(self, lane: &Idx, r: u64) -> (Idx, Idx) {
        let r = r as i64;
        match self {
            MatrixInst::MmaTf32x3 => (
                add(Idx::Div(Box::new(lane.clone()), c(4)), Idx::Const(8 * (r / 2))),
                add(mul(Idx::Rem(Box::new(lane.clone()), c(4)), 2), Idx::Const(r % 2)),
            ),
            MatrixInst::MfmaF32 => (
                add(mul(Idx::Div(Box::new(lane.clone()), c(16)), 4), Idx::Const(r)),
                Idx::Rem(Box::new(lane.clone()), c(16)),
            ),
        }
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

/// `v` with its outermost reductions taken out: each is pushed on `out` and becomes
/// `Val::Scalar(slot(n))`, `n` its position in `out`.
pub(crate) fn take_reductions(v: &Val, out: &mut Vec<Val>, slot: &dyn Fn(usize) -> usize) -> Val {
    if let Val::Reduce { .. } = v {
        out.push(v.clone());
        return Val::Scalar(slot(out.len() - 1));
    }
    v.map_parts(&mut |x| take_reductions(x, out, slot), &mut Idx::clone)
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
    let epilogue = take_reductions(value, &mut reductions, &|_| ACC).try_map_idx(&mut |i| rw(i).ok_or(())).ok()?;
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
        tile: GemmTile { tm: 0, tn: 0, tk: 0, rm: 0, rn: 0, mma: None },
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
        tile: GemmTile { tm: 0, tn: 0, tk: 0, rm: 0, rn: 0, mma: None },
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

/// The tile for a `batch × m × n` output on `arch`. Where the description has a matrix unit
/// kiln drives ([`MatrixInst::for_machine`]) and the output is at least one instruction's
/// `m × n`, the matrix-unit tile ([`mma_tile`]). Otherwise `rm × rn = 4 × 4` register
/// micro-tiles, `tk = 16`; up to the chip's block size of threads (16 × 16 where it is 256),
/// halved (the larger side first) while the grid has fewer blocks than the chip has SMs/CUs
/// and a block keeps at least a warp. Checked against the description: threads per block,
/// static shared memory per block, registers per SM.
pub fn choose_tile(batch: u64, m: u64, n: u64, d: &MachineDescription) -> Result<GemmTile, TargetError> {
    let limits =
        d.gpu.as_ref().ok_or_else(|| TargetError::Config(format!("{}: the description has no GPU limits", d.name)))?;
    let (rm, rn, tk) = (4, 4, 16);
    let warp = limits.warp.max(1) as u64;
    let blocks = |tm: u64, tn: u64| n.div_ceil(tn) * m.div_ceil(tm) * batch;
    let mma = MatrixInst::for_machine(d).filter(|i| m >= i.shape()[0] && n >= i.shape()[1]);
    let tile = match mma {
        Some(inst) => mma_tile(inst, m, n, d.cores as u64, &blocks),
        None => {
            let threads = crate::gpu::block_threads(limits);
            let mut tx = n.div_ceil(rn).next_power_of_two().min(16);
            let mut ty = m.div_ceil(rm).next_power_of_two().min((threads / tx).max(1)).min(16);
            while blocks(ty * rm, tx * rn) < d.cores as u64 && tx * ty / 2 >= warp {
                if tx >= ty {
                    tx /= 2;
                } else {
                    ty /= 2;
                }
            }
            GemmTile { tm: ty * rm, tn: tx * rn, tk, rm, rn, mma: None }
        }
    };
    check_tile(tile, d)
}

/// The matrix-unit tile: 2 × 2 warps of 32 × 32 outputs each, made smaller (warps first,
/// then each warp's products) while a side is twice what the output needs, then while the
/// grid has fewer blocks than the chip has SMs/CUs.
fn mma_tile(inst: MatrixInst, m: u64, n: u64, cores: u64, blocks: &dyn Fn(u64, u64) -> u64) -> GemmTile {
    let [im, inn, _] = inst.shape();
    let (mut wm, mut wn, mut mi, mut ni) = (2, 2, 32 / im, 32 / inn);
    let shrink = |w: &mut u64, p: &mut u64| {
        if *w > 1 {
            *w /= 2;
            true
        } else if *p > 1 {
            *p /= 2;
            true
        } else {
            false
        }
    };
    while wm * mi * im > m.next_power_of_two().max(im) && shrink(&mut wm, &mut mi) {}
    while wn * ni * inn > n.next_power_of_two().max(inn) && shrink(&mut wn, &mut ni) {}
    while blocks(wm * mi * im, wn * ni * inn) < cores {
        let rows = wm * mi * im >= wn * ni * inn;
        if !(if rows { shrink(&mut wm, &mut mi) } else { shrink(&mut wn, &mut ni) })
            && !(if rows { shrink(&mut wn, &mut ni) } else { shrink(&mut wm, &mut mi) })
        {
            break;
        }
    }
    let (rm, rn) = (mi * im, ni * inn);
    GemmTile { tm: wm * rm, tn: wn * rn, tk: 16, rm, rn, mma: Some(inst) }
}

/// `tile` checked against description `d`: threads per block, static shared memory per block,
/// registers per SM and per thread.
fn check_tile(tile: GemmTile, d: &MachineDescription) -> Result<GemmTile, TargetError> {
    let limits =
        d.gpu.as_ref().ok_or_else(|| TargetError::Config(format!("{}: the description has no GPU limits", d.name)))?;
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
    let sa_ty = format!("memref<{}x{}xf32{shared_space}>", t.tk, t.tm + t.pad());
    let sb_ty = format!("memref<{}x{}xf32{shared_space}>", t.tk, t.tn + t.pad());
    let mut e = Emitter::new(k, MlirOptions { gpu, ..options });
    let params = crate::native::block_params(k, gpu);
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
    let n_acc = t.accumulators() as usize;
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
        let r = match t.mma {
            Some(inst) => mma_phase_gpu(&mut e, g, inst, ("%sa", &sa_ty), ("%sb", &sb_ty), &accs),
            None => compute_phase(&mut e, g, T_GPU, "%sa", &sa_ty, "%sb", &sb_ty, &accs),
        };
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
        if let Some(inst) = t.mma {
            e.line(0, &format!("%frags = memref.alloc() : {}", frags_type(&t, inst)));
        }
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
        if let Some(inst) = t.mma {
            mma_phase_host(
                &mut e,
                g,
                inst,
                ("%sa", &sa_ty),
                ("%sb", &sb_ty),
                &format!("memref<{threads}x{n_acc}xf32>"),
            );
        } else {
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
        }
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
        if let Some(inst) = t.mma {
            e.line(0, &format!("memref.dealloc %frags : {}", frags_type(&t, inst)));
        }
        let mut params = params;
        params.push("%lo: index".into());
        params.push("%hi: index".into());
        let emulated = match t.mma {
            Some(inst) => mma_emulation(k, g, inst),
            None => String::new(),
        };
        format!(
            "func.func @{}({}) attributes {{ llvm.emit_c_interface }} {{\n{}  return\n}}\n{emulated}",
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

/// Where thread `tv`'s accumulators sit in the block's `tm × tn` tile (row, col), in their
/// order: its `rm × rn` micro-tile row-major, or with the matrix unit the accumulator
/// fragments of its warp's products, (row tile, column tile, register) order.
fn acc_positions(t: &GemmTile, tv: usize) -> Vec<(Idx, Idx)> {
    let mut out = Vec::new();
    match t.mma {
        None => {
            for i in 0..t.rm {
                for j in 0..t.rn {
                    out.push((
                        add(mul(Idx::Div(Box::new(var(tv)), c(t.tx() as i64)), t.rm as i64), Idx::Const(i as i64)),
                        add(mul(Idx::Rem(Box::new(var(tv)), c(t.tx() as i64)), t.rn as i64), Idx::Const(j as i64)),
                    ));
                }
            }
        }
        Some(inst) => {
            let [im, inn, _] = inst.shape();
            let lane = Idx::Rem(Box::new(var(tv)), c(inst.lanes() as i64));
            let (row0, col0) = warp_origin(t, &Idx::Div(Box::new(var(tv)), c(inst.lanes() as i64)));
            for i in 0..t.rm / im {
                for j in 0..t.rn / inn {
                    for r in 0..inst.regs()[2] {
                        let (row, col) = inst.c_at(&lane, r);
                        out.push((
                            add(add(row0.clone(), Idx::Const((i * im) as i64)), row),
                            add(add(col0.clone(), Idx::Const((j * inn) as i64)), col),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// The first row and column of warp `warp`'s part of the block tile (warps row-major,
/// [`GemmTile::tx`] of them along the columns).
fn warp_origin(t: &GemmTile, warp: &Idx) -> (Idx, Idx) {
    (
        mul(Idx::Div(Box::new(warp.clone()), c(t.tx() as i64)), t.rm as i64),
        mul(Idx::Rem(Box::new(warp.clone()), c(t.tx() as i64)), t.rn as i64),
    )
}

/// Thread `tv`'s outputs: the epilogue on each accumulator ([`acc_positions`]), stored where
/// the row and column are inside the output.
fn store_phase(e: &mut Emitter, g: &TiledGemm, tv: usize, accs: &[String]) {
    let t = g.tile;
    let d = 2;
    for ((r, cl), acc) in acc_positions(&t, tv).into_iter().zip(accs) {
        let row = add(mul(var(BY), t.tm as i64), r).simplify();
        let col = add(mul(var(BX), t.tn as i64), cl).simplify();
        let ok = in_bounds(e, d, &[(&row, g.m as i64), (&col, g.n as i64)]);
        e.line(d, &format!("scf.if {ok} {{"));
        let put = |x: &Idx| x.subst(ROW, &row).subst(COL, &col).subst(BATCH, &var(BZ));
        let value = g.epilogue.map_idx(&mut |x| put(x));
        e.slots.insert(ACC, acc.clone());
        let v = e.val(d + 1, &value);
        let ix: Vec<String> = g.index.iter().map(|x| e.idx(d + 1, &put(x))).collect();
        e.line(d + 1, &format!("memref.store {v}, %b{}[{}] : {}", g.out, ix.join(", "), memref(ix.len())));
        e.line(d, "}");
    }
}

/// The host emulation's per-thread fragment registers: `threads × fragments`.
fn frags_type(t: &GemmTile, inst: MatrixInst) -> String {
    let [im, inn, _] = inst.shape();
    let [ar, br, _] = inst.regs();
    let n = inst.parts() * (t.rm / im * ar + t.rn / inn * br);
    format!("memref<{}x{n}xf32>", t.threads())
}

/// Where the fragments of `a`'s row tile `i`, part `p` start among a thread's fragments, and
/// those of `b`'s column tile `j`, part `p`.
fn frag_offsets(t: &GemmTile, inst: MatrixInst, i: u64, pa: u64, j: u64, pb: u64) -> (u64, u64) {
    let [im, _, _] = inst.shape();
    let [ar, br, _] = inst.regs();
    let parts = inst.parts();
    ((i * parts + pa) * ar, (t.rm / im) * parts * ar + (j * parts + pb) * br)
}

/// `x` as the instruction takes it: the TF32 `hi` and `lo` of 3xTF32 (`hi` = `x` rounded to
/// TF32, to nearest with ties away from zero, as `cvt.rna.tf32.f32`; `lo` = `x − hi` (exact)
/// rounded likewise; NaN kept), or `x` itself.
fn split_operand(e: &mut Emitter, d: usize, inst: MatrixInst, x: &str) -> Vec<String> {
    match inst {
        MatrixInst::MfmaF32 => vec![x.to_string()],
        MatrixInst::MmaTf32x3 => {
            let tf32 = |e: &mut Emitter, x: &str| {
                let (b, h, m, s, a, r, n, o) =
                    (e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh());
                e.line(d, &format!("{b} = arith.bitcast {x} : f32 to i32"));
                e.line(d, &format!("{h} = arith.constant 4096 : i32"));
                e.line(d, &format!("{m} = arith.constant -8192 : i32"));
                e.line(d, &format!("{s} = arith.addi {b}, {h} : i32"));
                e.line(d, &format!("{a} = arith.andi {s}, {m} : i32"));
                e.line(d, &format!("{r} = arith.bitcast {a} : i32 to f32"));
                e.line(d, &format!("{n} = arith.cmpf uno, {x}, {x} : f32"));
                e.line(d, &format!("{o} = arith.select {n}, {x}, {r} : f32"));
                o
            };
            let hi = tf32(e, x);
            let rest = e.fresh();
            e.line(d, &format!("{rest} = arith.subf {x}, {hi} : f32"));
            let lo = tf32(e, &rest);
            vec![hi, lo]
        }
    }
}

/// Thread `tv`'s fragments for the instruction `k` step at `%i{KS}` of the shared tiles: `a`'s
/// then `b`'s, each in (row or column tile, part, register) order ([`frag_offsets`]).
fn fragments(
    e: &mut Emitter,
    g: &TiledGemm,
    inst: MatrixInst,
    tv: usize,
    d: usize,
    (sa, sa_ty): (&str, &str),
    (sb, sb_ty): (&str, &str),
) -> Vec<String> {
    let t = g.tile;
    let [im, inn, _] = inst.shape();
    let [ar, br, _] = inst.regs();
    let lane = Idx::Rem(Box::new(var(tv)), c(inst.lanes() as i64));
    let (row0, col0) = warp_origin(&t, &Idx::Div(Box::new(var(tv)), c(inst.lanes() as i64)));
    let mut out = Vec::new();
    for is_a in [true, false] {
        let (s, s_ty, tiles, regs, origin, ext) =
            if is_a { (sa, sa_ty, t.rm / im, ar, &row0, im) } else { (sb, sb_ty, t.rn / inn, br, &col0, inn) };
        for i in 0..tiles {
            let mut parts: Vec<Vec<String>> = vec![Vec::new(); inst.parts() as usize];
            for r in 0..regs {
                let (k, f) = if is_a {
                    let (row, k) = inst.a_at(&lane, r);
                    (k, row)
                } else {
                    inst.b_at(&lane, r)
                };
                let kk = e.idx(d, &add(var(KS), k).simplify());
                let ff = e.idx(d, &add(add(origin.clone(), Idx::Const((i * ext) as i64)), f).simplify());
                let v = e.fresh();
                e.line(d, &format!("{v} = memref.load {s}[{kk}, {ff}] : {s_ty}"));
                for (p, x) in split_operand(e, d, inst, &v).into_iter().enumerate() {
                    parts[p].push(x);
                }
            }
            out.extend(parts.into_iter().flatten());
        }
    }
    out
}

/// Each (row tile, column tile, instruction of the product) of a warp's part, in order: the
/// fragment offsets of its `a` and `b` and of its accumulators.
fn mma_issues(t: &GemmTile, inst: MatrixInst) -> Vec<(u64, u64, u64)> {
    let [im, inn, _] = inst.shape();
    let cr = inst.regs()[2];
    let mut out = Vec::new();
    for i in 0..t.rm / im {
        for j in 0..t.rn / inn {
            for &(pa, pb) in inst.products() {
                let (ao, bo) = frag_offsets(t, inst, i, pa, j, pb);
                out.push((ao, bo, (i * (t.rn / inn) + j) * cr));
            }
        }
    }
    out
}

/// The instruction on the GPU: `a`, `b` fragments and accumulators `c` in, the new
/// accumulators out.
fn mma_op(e: &mut Emitter, d: usize, inst: MatrixInst, a: &[String], b: &[String], acc: &[String]) -> Vec<String> {
    match inst {
        MatrixInst::MmaTf32x3 => {
            let ints = |e: &mut Emitter, xs: &[String]| -> Vec<String> {
                xs.iter()
                    .map(|x| {
                        let i = e.fresh();
                        e.line(d, &format!("{i} = arith.bitcast {x} : f32 to i32"));
                        i
                    })
                    .collect()
            };
            let (ai, bi) = (ints(e, a), ints(e, b));
            let r = e.fresh();
            let st = "!llvm.struct<(f32, f32, f32, f32)>";
            e.line(
                d,
                &format!(
                    "{r} = nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, \
multiplicandAPtxType = #nvvm.mma_type<tf32>, multiplicandBPtxType = #nvvm.mma_type<tf32>, \
shape = #nvvm.shape<m = 16, n = 8, k = 8>}} : (i32, i32, f32) -> {st}",
                    ai.join(", "),
                    bi.join(", "),
                    acc.join(", ")
                ),
            );
            (0..4)
                .map(|i| {
                    let x = e.fresh();
                    e.line(d, &format!("{x} = llvm.extractvalue {r}[{i}] : {st}"));
                    x
                })
                .collect()
        }
        MatrixInst::MfmaF32 => {
            let (cv, z, r) = (e.fresh(), e.fresh(), e.fresh());
            e.line(d, &format!("{cv} = vector.from_elements {} : vector<4xf32>", acc.join(", ")));
            e.line(d, &format!("{z} = arith.constant 0 : i32"));
            e.line(
                d,
                &format!(
                    "{r} = rocdl.mfma.f32.16x16x4f32 {}, {}, {cv}, {z}, {z}, {z} : (f32, f32, vector<4xf32>, i32, i32, i32) -> vector<4xf32>",
                    a[0], b[0]
                ),
            );
            (0..4)
                .map(|i| {
                    let x = e.fresh();
                    e.line(d, &format!("{x} = vector.extract {r}[{i}] : f32 from vector<4xf32>"));
                    x
                })
                .collect()
        }
    }
}

/// The GPU thread's products over one K step: for each instruction `k` step, its fragments
/// from the shared tiles, then its warp's instructions; returns the new accumulators.
fn mma_phase_gpu(
    e: &mut Emitter,
    g: &TiledGemm,
    inst: MatrixInst,
    sa: (&str, &str),
    sb: (&str, &str),
    accs: &[String],
) -> Vec<String> {
    let t = g.tile;
    let d = 1;
    let n = accs.len();
    let [ar, br, cr] = inst.regs().map(|x| x as usize);
    let (lo, hi, step) =
        (e.idx(d, &Idx::Const(0)), e.idx(d, &Idx::Const(t.tk as i64)), e.idx(d, &Idx::Const(inst.shape()[2] as i64)));
    let res = e.fresh();
    let args: Vec<String> = (0..n).map(|_| e.fresh()).collect();
    let inits: Vec<String> = args.iter().zip(accs).map(|(a, x)| format!("{a} = {x}")).collect();
    let f32s = vec!["f32"; n].join(", ");
    e.line(
        d,
        &format!(
            "{res}:{n} = scf.for %i{KS} = {lo} to {hi} step {step} iter_args({}) -> ({f32s}) {{",
            inits.join(", ")
        ),
    );
    let frags = fragments(e, g, inst, T_GPU, d + 1, sa, sb);
    let mut acc = args;
    for (ao, bo, co) in mma_issues(&t, inst) {
        let (ao, bo, co) = (ao as usize, bo as usize, co as usize);
        let out = mma_op(e, d + 1, inst, &frags[ao..ao + ar], &frags[bo..bo + br], &acc[co..co + cr]);
        acc.splice(co..co + cr, out);
    }
    e.line(d + 1, &format!("scf.yield {} : {f32s}", acc.join(", ")));
    e.line(d, "}");
    (0..n).map(|i| format!("{res}#{i}")).collect()
}

/// The host emulation's products over one K step: per instruction `k` step, a thread loop
/// writing each thread's fragments (the same loads as [`mma_phase_gpu`]) to `%frags`, then a
/// warp loop calling the instruction's emulation ([`mma_emulation`]) on them and `%accs`.
fn mma_phase_host(e: &mut Emitter, g: &TiledGemm, inst: MatrixInst, sa: (&str, &str), sb: (&str, &str), acc_ty: &str) {
    let t = g.tile;
    let d = 2;
    let ft = frags_type(&t, inst);
    let (c0, c1) = (e.idx(d, &Idx::Const(0)), e.idx(d, &Idx::Const(1)));
    let (tk, ik) = (e.idx(d, &Idx::Const(t.tk as i64)), e.idx(d, &Idx::Const(inst.shape()[2] as i64)));
    let (threads, warps) = (e.idx(d, &Idx::Const(t.threads() as i64)), e.idx(d, &Idx::Const((t.tx() * t.ty()) as i64)));
    e.line(d, &format!("scf.for %i{KS} = {c0} to {tk} step {ik} {{"));
    e.line(d + 1, &format!("scf.for %i{T_COMP} = {c0} to {threads} step {c1} {{"));
    let frags = fragments(e, g, inst, T_COMP, d + 2, sa, sb);
    for (q, f) in frags.iter().enumerate() {
        let q = e.idx(d + 2, &Idx::Const(q as i64));
        e.line(d + 2, &format!("memref.store {f}, %frags[%i{T_COMP}, {q}] : {ft}"));
    }
    e.line(d + 1, "}");
    e.line(d + 1, &format!("scf.for %i{WARP} = {c0} to {warps} step {c1} {{"));
    let t0 = e.idx(d + 2, &mul(var(WARP), inst.lanes() as i64));
    for (ao, bo, co) in mma_issues(&t, inst) {
        let [ao, bo, co] = [ao, bo, co].map(|x| e.idx(d + 2, &Idx::Const(x as i64)));
        e.line(
            d + 2,
            &format!(
                "func.call @{}_mma(%frags, %accs, {t0}, {ao}, {bo}, {co}) : ({ft}, {acc_ty}, index, index, index, index) -> ()",
                e.kernel().name
            ),
        );
    }
    e.line(d + 1, "}");
    e.line(d, "}");
}

/// The instruction as the host emulation runs it, `@<kernel>_mma(frags, accs, t0, ao, bo, co)`:
/// one warp's (threads `t0..t0 + lanes`) product `D = A·B + C`, each lane's fragments at `ao`
/// (`a`), `bo` (`b`) and accumulators at `co`, placed in the `m × k` and `k × n` matrices by the
/// instruction's lane layout ([`MatrixInst::a_at`], `b_at`, `c_at`); TF32 operands keep their
/// top 19 bits (the unit ignores the rest); each result summed over `k` in order in f32.
fn mma_emulation(k: &Kernel, g: &TiledGemm, inst: MatrixInst) -> String {
    let t = g.tile;
    let mut e = Emitter::new(k, MlirOptions::default());
    let ft = frags_type(&t, inst);
    let acc_ty = format!("memref<{}x{}xf32>", t.threads(), t.accumulators());
    let [im, inn, ik] = inst.shape();
    let [ar, br, cr] = inst.regs();
    let (mat_a, mat_b) = (format!("memref<{im}x{ik}xf32>"), format!("memref<{ik}x{inn}xf32>"));
    let lane = var(LANE);
    let (c0, c1, lanes) =
        (e.idx(0, &Idx::Const(0)), e.idx(0, &Idx::Const(1)), e.idx(0, &Idx::Const(inst.lanes() as i64)));
    e.line(0, &format!("%ma = memref.alloca() : {mat_a}"));
    e.line(0, &format!("%mb = memref.alloca() : {mat_b}"));
    // Scatter the lanes' fragments into the matrices.
    e.line(0, &format!("scf.for %i{LANE} = {c0} to {lanes} step {c1} {{"));
    let tl = e.fresh();
    e.line(1, &format!("{tl} = arith.addi %t0, %i{LANE} : index"));
    for (regs, base, mat, ty) in [(ar, "%ao", "%ma", &mat_a), (br, "%bo", "%mb", &mat_b)] {
        for r in 0..regs {
            let (x, y) = if mat == "%ma" { inst.a_at(&lane, r) } else { inst.b_at(&lane, r) };
            let q = e.fresh();
            let rc = e.idx(1, &Idx::Const(r as i64));
            e.line(1, &format!("{q} = arith.addi {base}, {rc} : index"));
            let v = e.fresh();
            e.line(1, &format!("{v} = memref.load %fr[{tl}, {q}] : {ft}"));
            let v = match inst {
                MatrixInst::MmaTf32x3 => {
                    let (b, m, a, f) = (e.fresh(), e.fresh(), e.fresh(), e.fresh());
                    e.line(1, &format!("{b} = arith.bitcast {v} : f32 to i32"));
                    e.line(1, &format!("{m} = arith.constant -8192 : i32"));
                    e.line(1, &format!("{a} = arith.andi {b}, {m} : i32"));
                    e.line(1, &format!("{f} = arith.bitcast {a} : i32 to f32"));
                    f
                }
                MatrixInst::MfmaF32 => v,
            };
            let (x, y) = (e.idx(1, &x.simplify()), e.idx(1, &y.simplify()));
            e.line(1, &format!("memref.store {v}, {mat}[{x}, {y}] : {ty}"));
        }
    }
    e.line(0, "}");
    // Each lane's accumulators: C + Σ_k A[row, k]·B[k, col].
    e.line(0, &format!("scf.for %i{LANE} = {c0} to {lanes} step {c1} {{"));
    let tl = e.fresh();
    e.line(1, &format!("{tl} = arith.addi %t0, %i{LANE} : index"));
    let kend = e.idx(1, &Idx::Const(ik as i64));
    for r in 0..cr {
        let (row, col) = inst.c_at(&lane, r);
        let (row, col) = (e.idx(1, &row.simplify()), e.idx(1, &col.simplify()));
        let (q, rc, x) = (e.fresh(), e.idx(1, &Idx::Const(r as i64)), e.fresh());
        e.line(1, &format!("{q} = arith.addi %co, {rc} : index"));
        e.line(1, &format!("{x} = memref.load %ac[{tl}, {q}] : {acc_ty}"));
        let (s, kv, sum, a, b, p, y) = (e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh(), e.fresh());
        e.line(1, &format!("{s} = scf.for {kv} = {c0} to {kend} step {c1} iter_args({sum} = {x}) -> (f32) {{"));
        e.line(2, &format!("{a} = memref.load %ma[{row}, {kv}] : {mat_a}"));
        e.line(2, &format!("{b} = memref.load %mb[{kv}, {col}] : {mat_b}"));
        e.line(2, &format!("{p} = arith.mulf {a}, {b} : f32"));
        e.line(2, &format!("{y} = arith.addf {sum}, {p} : f32"));
        e.line(2, &format!("scf.yield {y} : f32"));
        e.line(1, "}");
        e.line(1, &format!("memref.store {s}, %ac[{tl}, {q}] : {acc_ty}"));
    }
    e.line(0, "}");
    format!(
        "func.func private @{}_mma(%fr: {ft}, %ac: {acc_ty}, %t0: index, %ao: index, %bo: index, %co: index) {{\n{}  return\n}}\n",
        k.name, e.out
    )
}

/// The tiled GEMM `gemm` of `kernel` compiled for the host emulation ([`emit`] with
/// `gpu: false`).
pub fn host_blocks(kernel: Kernel, gemm: &TiledGemm) -> Result<HostBlocks, TargetError> {
    let text = emit(&kernel, gemm, MlirOptions::default(), false);
    HostBlocks::compile(kernel, &text, gemm.grid(), gemm.tile.threads())
}
