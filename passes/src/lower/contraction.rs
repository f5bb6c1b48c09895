//! Contraction kernels (Conv, MatMul, Gemm), alone or as the anchor of a `graph.fused` kernel
//! of kind `contraction` with an elementwise epilogue.
//!
//! Instead of a reduction per output element, a contraction accumulates into its output
//! buffer: the output is initialized (zero, a Conv's bias, a Gemm's `beta · C`), then every
//! product is added in a loop order whose innermost loop walks the output and one operand
//! contiguously (LLVM vectorizes it), and last an epilogue pass applies the fused elementwise
//! ops in place, reading the contraction's element back from the output buffer.
//!
//! - Conv (NCHW, 1 to 3 spatial dims, groups, strides, pads or `auto_pad`, dilations, bias):
//!   `for (n, block of CONV_OC_BLOCK output channels) parallel: init; for ic, taps of the
//!   leading axes: for output rows: for output columns: Σ over the last axis' taps`, the rows
//!   running over the taps' in-bounds range and the columns split into an interior where every
//!   tap is in bounds and edge columns (index arithmetic with [`Idx::Min`]/[`Idx::Max`]: no
//!   bounds check in the interior and no padding copy).
//!   With [`Schedule::whole_matmul`] (a matrix unit's code generator), a batch-1, group-1,
//!   unit-stride 2-D Conv is one whole GEMM instead (over `X` for a 1×1 Conv, else over the
//!   im2col columns, [`Im2col`]).
//! - MatMul (2-D and batched with broadcast batch dims) and Gemm (`transA`, `transB`, `alpha`,
//!   `beta`, `C` broadcast, 1-D operands): rows in parallel blocks (the [`Schedule`]'s
//!   `matmul_row_block`, 64); per block, tiles of 1024 columns and 128 values of `k`. Per tile, each
//!   32-column strip of `B` is packed into a contiguous `b_panel` local (any `B`
//!   layout, transposed included; no L1 set conflicts from power-of-two row strides), then
//!   register tiles ([`Mma`]) of 8 rows × 32 columns (on AVX-512) accumulate
//!   over the `k` tile while the panel stays in L1. With fewer than 16 rows known (a
//!   matrix-vector product, a batch-1 FC layer) nothing would share the panel: [`MATMUL_ROWS`]
//!   rows at a time accumulate `C[i, j] += Σ_v A[i, k + v] · B[k + v, j]` over
//!   [`MATMUL_K_UNROLL`] values of `k` with `j` innermost, streaming `B`'s rows.
//!
//! Every loop nest parallelizes over its outermost loop, whose iterations write disjoint parts
//! of the output (output channels of an image; a block of rows). A MatMul whose accumulate form
//! does not apply (an epilogue that reads the product at another element than the one it
//! writes, an output of another shape) is left to the inline-reduction form of
//! [`super::lower`]; such a Conv is refused.

use super::{b, LowerResult, Lowering, Schedule};
use kiln_ir::graph::AttrView;
use kiln_ir::ir::{Module, OpId, ValueId};
use kiln_ir::kernel::{BinOp, Buffer, Idx, Im2col, Kernel, Knobs, Local, Mma, Stmt, Val};
use kiln_ir::Dim;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

// Schedule constants (to become `Knobs` the autotuner sets), chosen on a 512×768·768×768
// MatMul, a 256×4096·4096×4096 one and a 64-channel 56×56 3×3 Conv on one Zen 4 core.

/// Rows of a MatMul's output accumulated together (each `B` value loaded serves them all).
pub const MATMUL_ROWS: usize = 4;
/// Values of the reduction dim added per pass over a row tile (loads and stores of the
/// output per product divided by this).
pub const MATMUL_K_UNROLL: usize = 4;
/// Output channels of a Conv accumulated together (each input value loaded serves them all),
/// at most: the largest divisor of the channels per group up to this.
pub const CONV_OC_BLOCK: i64 = 4;
/// Output channels a Conv needs for the whole-GEMM form ([`Schedule::whole_matmul`]): a
/// matrix unit's tile height (16 on the `npu` presets).
pub const WHOLE_CONV_MIN_CHANNELS: i64 = 16;
/// Taps along a Conv's last spatial axis summed per pass over an output row, at most (beyond
/// it, one tap per pass).
pub const CONV_MAX_TAP_UNROLL: i64 = 8;

// Register tiles ([`Mma`]), sized for 32 vector registers of 16 lanes (AVX-512): `rows ×
// cols / lanes` accumulators plus the `B` vectors and a broadcast.

fn add(x: Idx, y: Idx) -> Idx {
    Idx::Add(b(x), b(y))
}
fn sub(x: Idx, y: Idx) -> Idx {
    Idx::Sub(b(x), b(y))
}
fn mul(x: Idx, y: Idx) -> Idx {
    Idx::Mul(b(x), b(y))
}
fn div(x: Idx, y: Idx) -> Idx {
    Idx::Div(b(x), b(y))
}
fn rem(x: Idx, y: Idx) -> Idx {
    Idx::Rem(b(x), b(y))
}
fn min(x: Idx, y: Idx) -> Idx {
    Idx::Min(b(x), b(y))
}
fn max(x: Idx, y: Idx) -> Idx {
    Idx::Max(b(x), b(y))
}
fn c(v: i64) -> Idx {
    Idx::Const(v)
}
/// `⌈x / t⌉` for `x ≥ 0`.
fn ceil_div(x: Idx, t: i64) -> Idx {
    div(add(x, c(t - 1)), c(t))
}
fn fadd(x: Val, y: Val) -> Val {
    Val::Bin(BinOp::Add, Box::new(x), Box::new(y))
}
fn fmul(x: Val, y: Val) -> Val {
    Val::Bin(BinOp::Mul, Box::new(x), Box::new(y))
}
fn for_(var: usize, extent: Idx, parallel: bool, body: Vec<Stmt>) -> Stmt {
    Stmt::For { var, extent: extent.simplify(), parallel, body }
}
fn simplified(idx: &[Idx]) -> Vec<Idx> {
    idx.iter().map(|i| i.clone().simplify()).collect()
}

/// A kernel's parts as [`super::lower`] set them up.
pub(super) struct Parts<'a> {
    pub m: &'a Module,
    pub name: &'a str,
    pub ops: &'a [OpId],
    pub yields: &'a [ValueId],
    pub buffers: &'a [Buffer],
    pub inputs: usize,
    pub operands: &'a [usize],
    pub arg: &'a HashMap<ValueId, usize>,
    pub syms: &'a HashMap<String, (usize, usize)>,
    pub inside: &'a HashMap<ValueId, OpId>,
    pub outer: &'a HashMap<ValueId, ValueId>,
    pub sched: &'a Schedule,
}

/// The kernel of a contraction (a Conv, MatMul or Gemm, alone or anchoring the kernel's ops)
/// in accumulate form: `Ok(None)` when the kernel has no such anchor, or when a MatMul's fast
/// form does not apply (the caller then builds the inline-reduction form).
pub(super) fn lower(p: &Parts) -> LowerResult<Option<Kernel>> {
    let anchors: Vec<OpId> =
        p.ops.iter().copied().filter(|&o| matches!(p.m.op(o).op_type(), "Conv" | "MatMul" | "Gemm")).collect();
    let [anchor] = anchors[..] else { return Ok(None) };
    let t = p.m.op(anchor).op_type();
    // Per element (the GPU schedule): MatMul, Gemm and 2-D Convs (any group) lower in the
    // inline-reduction form (`Lowering::conv_element`); other Convs keep the accumulate form.
    if p.sched.matmul_per_element && (t != "Conv" || per_element_conv(p.m, anchor)) {
        return Ok(None);
    }
    let built = Builder::new(p, anchor).and_then(|bd| match t {
        "Conv" => bd.conv().map(Some),
        _ => bd.matmul(),
    });
    match built {
        Ok(Some((body, locals))) => Ok(Some(Kernel {
            name: p.name.to_string(),
            buffers: p.buffers.to_vec(),
            inputs: p.inputs,
            operands: p.operands.to_vec(),
            locals,
            body,
            knobs: Knobs::default(),
        })),
        Ok(None) => Ok(None),
        Err(e) if t == "Conv" => Err(e),
        // The inline form may still apply.
        Err(_) => Ok(None),
    }
}

/// Builds a contraction's loop nest: the anchor's result reads back from the accumulator
/// buffer, where the epilogue also stores.
struct Builder<'p, 'm> {
    p: &'p Parts<'m>,
    lw: Lowering<'m>,
    anchor: OpId,
    /// The anchor's result.
    result: ValueId,
    /// The output buffer the anchor accumulates into.
    acc: usize,
    /// The kernel's outputs other than the accumulator when it holds the anchor's result:
    /// (buffer, value).
    stores: Vec<(usize, ValueId)>,
    next_slot: Cell<usize>,
}

impl<'p, 'm> Builder<'p, 'm> {
    fn new(p: &'p Parts<'m>, anchor: OpId) -> LowerResult<Builder<'p, 'm>> {
        let op = p.m.op(anchor);
        let t = op.op_type();
        let result = *op.results.first().ok_or("a contraction without a result")?;
        let shape = p.m.value(result).ty.shape.clone().ok_or("a contraction of unknown rank")?;
        // Every output is the shape of the anchor's result (stored at the element the
        // accumulator holds); the accumulator is the anchor's own output, else the first.
        let mut acc = None;
        for (k, &y) in p.yields.iter().enumerate() {
            if p.m.value(y).ty.shape.as_deref() != Some(&shape[..]) {
                return Err(format!("a {t} kernel with an output of another shape than the {t}"));
            }
            if y == result && acc.is_none() {
                acc = Some(p.inputs + k);
            }
        }
        let acc = match acc {
            Some(a) => a,
            None if !p.yields.is_empty() => p.inputs,
            None => return Err("a kernel without outputs".into()),
        };
        let stores: Vec<(usize, ValueId)> =
            p.yields.iter().enumerate().map(|(k, &y)| (p.inputs + k, y)).filter(|&(buf, _)| buf != acc).collect();
        let mut arg = p.arg.clone();
        arg.insert(result, acc);
        let lw = Lowering {
            m: p.m,
            arg,
            inside: p.inside.clone(),
            syms: p.syms.clone(),
            // No reductions in a contraction's epilogue: no row is the kernel's.
            rank: p.buffers.get(acc).map_or(0, |b| b.shape.len()),
            rows: usize::MAX,
            slots: RefCell::new(Vec::new()),
            memo: RefCell::new(HashMap::new()),
            next_var: Default::default(),
            outer: p.outer.clone(),
            windows: RefCell::new(Vec::new()),
            sched: p.sched.clone(),
        };
        Ok(Builder { p, lw, anchor, result, acc, stores, next_slot: Cell::new(0) })
    }

    fn slot(&self) -> usize {
        let s = self.next_slot.get();
        self.next_slot.set(s + 1);
        s
    }

    fn shape(&self, v: ValueId) -> LowerResult<Vec<Dim>> {
        Ok(self.lw.shape(v)?.to_vec())
    }

    fn operand(&self, i: usize) -> Option<ValueId> {
        self.p.m.op(self.anchor).operands.get(i).copied().flatten()
    }

    fn attrs(&self) -> AttrView<'_> {
        AttrView(&self.p.m.op(self.anchor).attrs)
    }

    /// Whether the epilogue changes the accumulator or writes other outputs.
    fn has_epilogue(&self) -> bool {
        !self.stores.is_empty() || self.p.yields[self.acc - self.p.inputs] != self.result
    }

    /// The epilogue's stores at output element `idx` (the accumulator's last: the others
    /// read it). Each reads the accumulator at `idx` only, so the pass can run in place.
    fn epilogue(&self, idx: &[Idx]) -> LowerResult<Vec<Stmt>> {
        let mut out = Vec::new();
        let acc_yield = self.p.yields[self.acc - self.p.inputs];
        let mut all: Vec<(usize, ValueId)> = self.stores.clone();
        if acc_yield != self.result {
            all.push((self.acc, acc_yield));
        }
        // Axes of extent 1 index 0 (as broadcasting reads them).
        let shape = self.shape(self.result)?;
        let idx: Vec<Idx> =
            idx.iter().zip(&shape).map(|(i, d)| if *d == Dim::Known(1) { c(0) } else { i.clone() }).collect();
        let want = simplified(&idx);
        for (buf, y) in all {
            let value = self.lw.value(y, &idx)?;
            if !reads_only_at(&value, self.acc, &want) {
                return Err(format!(
                    "an epilogue that reads the contraction at another element than it writes ({value} at [{}])",
                    want.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
            out.push(Stmt::Store { buf, index: want.clone(), value });
        }
        if !self.lw.slots.borrow().is_empty() {
            return Err("a reduction in a contraction's epilogue".into());
        }
        Ok(out)
    }

    /// A loop nest over `dims` (loop variables from `first`) with `body(index)` inside, the
    /// element index being `prefix` then the loop variables.
    fn nest(
        &self,
        first: usize,
        prefix: &[Idx],
        dims: &[Idx],
        body: impl FnOnce(&[Idx]) -> LowerResult<Vec<Stmt>>,
    ) -> LowerResult<Vec<Stmt>> {
        let mut idx = prefix.to_vec();
        idx.extend((0..dims.len()).map(|d| Idx::Var(first + d)));
        let mut s = body(&idx)?;
        for (d, e) in dims.iter().enumerate().rev() {
            s = vec![for_(first + d, e.clone(), false, s)];
        }
        Ok(s)
    }

    // ---------------------------------------------------------------- Conv

    fn conv(&self) -> LowerResult<(Vec<Stmt>, Vec<Local>)> {
        let lw = &self.lw;
        let (x, w) = (self.operand(0).ok_or("Conv without X")?, self.operand(1).ok_or("Conv without W")?);
        let bias = self.operand(2);
        let (xs, ws, ys) = (self.shape(x)?, self.shape(w)?, self.shape(self.result)?);
        let r = xs.len();
        if !(3..=5).contains(&r) || ws.len() != r || ys.len() != r {
            return Err(format!("Conv of rank {r} is not lowered (1 to 3 spatial dims)"));
        }
        let sp = r - 2;
        let ConvAttrs { group, kernel, strides, dilations, pad } = conv_attrs(&self.attrs(), &xs, &ws)?;
        let dim = |d: &Dim| lw.dim(d);
        let (n, m, cg) = (dim(&ys[0])?, dim(&ys[1])?, dim(&ws[1])?);
        let out_dims: Vec<Idx> = ys[2..].iter().map(dim).collect::<Result<_, _>>()?;
        let in_dims: Vec<Idx> = xs[2..].iter().map(dim).collect::<Result<_, _>>()?;
        let g = ConvGeom {
            x,
            w,
            bias,
            group,
            kernel: kernel.clone(),
            strides: strides.clone(),
            dilations: dilations.clone(),
            pad: pad.clone(),
            n: n.clone(),
            cg: cg.clone(),
            out_dims: out_dims.clone(),
            in_dims: in_dims.clone(),
        };
        if lw.sched.whole_matmul {
            if let Some(whole) = self.conv_whole(&g, ys[1].known())? {
                return Ok(whole);
            }
        }
        if let Some(tiled) = self.conv_tiled(&g, ys[1].known())? {
            return Ok(tiled);
        }
        // Output channels per parallel iteration (all in one group).
        let ocb = match ys[1].known() {
            Some(mk) => (1..=CONV_OC_BLOCK).rev().find(|b| (mk as i64 / group) % b == 0).unwrap_or(1),
            None => 1,
        };
        let blocks = div(m.clone(), c(ocb));
        // Loop variables: 0 (image, channel block), 1 input channel of the group, 2.. taps of
        // the spatial axes, 2 + sp.. output positions.
        let ni = div(Idx::Var(0), blocks.clone());
        let oc0 = mul(rem(Idx::Var(0), blocks.clone()), c(ocb));
        let ocs: Vec<Idx> = (0..ocb).map(|u| add(oc0.clone(), c(u))).collect();
        let ch = add(mul(div(oc0.clone(), div(m.clone(), c(group))), cg.clone()), Idx::Var(1));
        let last = sp - 1;
        // Taps along the last axis are unrolled (each input value loaded serves them all) up to
        // a bound; beyond it, one tap per pass over the row.
        let unroll = kernel[last] <= CONV_MAX_TAP_UNROLL;
        let kwu = if unroll { kernel[last] } else { 1 };
        let kw0 = if unroll { c(0) } else { Idx::Var(2 + last) };
        let tap = |d: usize, q: i64| if d == last { add(kw0.clone(), c(q)) } else { Idx::Var(2 + d) };
        let outv = |d: usize| Idx::Var(2 + sp + d);
        let acc = self.acc;
        // Init: the bias or zero.
        let mut body = Vec::new();
        for oc in &ocs {
            body.extend(self.conv_init(&g, 1, &ni, oc.clone())?);
        }
        let (lo, hi) = (|d, k| g.first_out(d, k), |d, k| g.end_out(d, k));
        let in_at = |d, o, k| g.in_at(d, o, k);
        // Positions along the leading axes: o = lo(tap) + loop variable.
        let rows: Vec<Idx> = (0..last).map(|d| add(lo(d, tap(d, 0)), outv(d)).simplify()).collect();
        // The weights of the taps along the last axis, per output channel.
        let mut wlets = Vec::new();
        let mut wslot = vec![vec![0; kwu as usize]; ocb as usize];
        for (u, oc) in ocs.iter().enumerate() {
            for q in 0..kwu {
                let mut widx = vec![oc.clone(), Idx::Var(1)];
                widx.extend((0..sp).map(|d| tap(d, q)));
                let sl = self.slot();
                wslot[u][q as usize] = sl;
                wlets.push(Stmt::Let { slot: sl, value: lw.value(w, &widx)? });
            }
        }
        // One output column `ow` of every channel of the block: Σ over the taps of the row.
        // `only`: the taps to add (unguarded), all by default.
        let column = |ow: Idx, guarded: bool, only: Option<Vec<i64>>| -> LowerResult<Vec<Stmt>> {
            let qs: Vec<i64> = only.unwrap_or_else(|| (0..kwu).collect());
            if qs.is_empty() {
                return Ok(Vec::new());
            }
            let mut st = Vec::new();
            let mut xslot = Vec::new();
            for &q in &qs {
                let mut xidx = vec![ni.clone(), ch.clone()];
                xidx.extend((0..last).map(|d| in_at(d, rows[d].clone(), tap(d, 0))));
                let iw = in_at(last, ow.clone(), tap(last, q)).simplify();
                xidx.push(iw.clone());
                let mut v = lw.value(x, &xidx)?;
                if guarded {
                    // Signed compares: iw may be negative (padding); the load runs only in bounds.
                    let inside = Val::IfLess {
                        lhs: iw.clone(),
                        rhs: in_dims[last].clone(),
                        then: Box::new(v),
                        other: Box::new(Val::Const(0.0)),
                    };
                    v = Val::IfLess { lhs: iw, rhs: c(0), then: Box::new(Val::Const(0.0)), other: Box::new(inside) };
                }
                let sl = self.slot();
                xslot.push((q as usize, sl));
                st.push(Stmt::Let { slot: sl, value: v });
            }
            for (u, oc) in ocs.iter().enumerate() {
                let mut oidx = vec![ni.clone(), oc.clone()];
                oidx.extend(rows.iter().cloned());
                oidx.push(ow.clone());
                let oidx = simplified(&oidx);
                let mut sum = Val::Load { buf: acc, index: oidx.clone() };
                for &(q, sl) in &xslot {
                    sum = fadd(sum, fmul(Val::Scalar(wslot[u][q]), Val::Scalar(sl)));
                }
                st.push(Stmt::Store { buf: acc, index: oidx, value: sum });
            }
            Ok(st)
        };
        // The last axis: the interior [l, h) where every tap is in bounds, then the edges
        // (some taps in the padding) with bounds checks.
        let cv = outv(last);
        let ol = out_dims[last].clone();
        let l = min(lo(last, tap(last, 0)), ol.clone()).simplify();
        let h = max(l.clone(), hi(last, tap(last, kwu - 1))).simplify();
        let mut cols = vec![for_(
            2 + sp + last,
            sub(h.clone(), l.clone()),
            false,
            column(add(l.clone(), cv.clone()), false, None)?,
        )];
        match (&l, &h, &ol, &in_dims[last]) {
            // Known sizes and few edge columns: each edge column adds just its in-bounds taps.
            (Idx::Const(l), Idx::Const(h), Idx::Const(ol), Idx::Const(len)) if *l <= 8 && ol - h <= 8 => {
                let (s, p, dl) = (strides[last], pad[last], dilations[last]);
                for ow in (0..*l).chain(*h..*ol) {
                    let taps: Vec<i64> = (0..kwu).filter(|q| (0..*len).contains(&(ow * s - p + q * dl))).collect();
                    cols.extend(column(c(ow), false, Some(taps))?);
                }
            }
            _ if kwu > 1 => {
                cols.push(for_(2 + sp + last, l, false, column(cv.clone(), true, None)?));
                cols.push(for_(2 + sp + last, sub(ol, h.clone()), false, column(add(h, cv), true, None)?));
            }
            _ => {}
        }
        let mut inner = cols;
        for d in (0..last).rev() {
            let ext = max(c(0), sub(hi(d, tap(d, 0)), lo(d, tap(d, 0))));
            inner = vec![for_(2 + sp + d, ext, false, inner)];
        }
        let mut taps = wlets;
        taps.extend(inner);
        if !unroll {
            taps = vec![for_(2 + last, c(kernel[last]), false, taps)];
        }
        for d in (0..last).rev() {
            taps = vec![for_(2 + d, c(kernel[d]), false, taps)];
        }
        body.push(for_(1, cg, false, taps));
        for oc in &ocs {
            body.extend(self.conv_epilogue(&g, 1, &ni, oc.clone())?);
        }
        Ok((vec![for_(0, mul(n, blocks), true, body)], Vec::new()))
    }

    /// A 2-D Conv on register tiles ([`Mma`]), when one applies (`None`: the caller builds the
    /// row-vectorized form). `channels`: the output's channel count, if known.
    ///
    /// - A 1×1 Conv with unit strides and no padding is a GEMM per image and group:
    ///   `Y[co, p] += W[co, ci] · X[ci, p]` over the flattened pixels `p`; tiles of
    ///   up to 8 output channels × 32 pixels (on AVX-512; the [`Schedule`] sets both) (the last tile masked).
    /// - Any other Conv whose groups have a multiple of the vector lanes in output channels is direct:
    ///   per output row, tiles of up to 8 output pixels × 32 (or 16) output channels,
    ///   reducing over input channels and taps, the weights of the channel block packed into a
    ///   local `[taps, channels]` panel first so that each tap's channels are one vector load.
    ///   The taps in the padding along the leading axis are cut off the reduction's range per
    ///   output row. Along a row of known width, the tiles holding edge pixels guard their loads
    ///   branch-free ([`Val::Select`]); with a width known at run time, edge pixels are tiles of
    ///   one pixel with their own tap ranges.
    fn conv_tiled(&self, g: &ConvGeom, channels: Option<u64>) -> LowerResult<Option<(Vec<Stmt>, Vec<Local>)>> {
        let Some(mk) = channels.map(|c| c as i64) else { return Ok(None) };
        if g.kernel.len() != 2 || g.group <= 0 || mk % g.group != 0 {
            return Ok(None);
        }
        let cog = mk / g.group;
        let lw = &self.lw;
        let acc = self.acc;
        let (oh, ow) = (g.out_dims[0].clone(), g.out_dims[1].clone());
        // Init and epilogue: loops over the tile's channels (loop variable 1).
        let init = |ni: &Idx, co0: &Idx, count: i64| -> LowerResult<Stmt> {
            Ok(for_(1, c(count), false, self.conv_init(g, 2, ni, add(co0.clone(), Idx::Var(1)))?))
        };
        let epilogue = |body: &mut Vec<Stmt>, ni: &Idx, co0: &Idx, count: i64| -> LowerResult<()> {
            let e = self.conv_epilogue(g, 2, ni, add(co0.clone(), Idx::Var(1)))?;
            if !e.is_empty() {
                body.push(for_(1, c(count), false, e));
            }
            Ok(())
        };
        // The loop variable standing for an Mma tile's row (never a loop of its own).
        const ROW: usize = 63;
        // Same extents in and out (no end padding either): pixel p is the same element of both.
        let pointwise = g.kernel == [1, 1] && g.strides == [1, 1] && g.pad == [0, 0] && g.out_dims == g.in_dims;
        if let (true, Some(xb)) = (pointwise, self.param(g.x)) {
            let mr = (1..=self.lw.sched.conv_channel_rows as i64).rev().find(|r| cog % r == 0).unwrap_or(1);
            let tiles = c(mk / mr);
            // Loop variables: 0 (image, tile of channels), 1 pixel tile, 2 input channel.
            let ni = div(Idx::Var(0), tiles.clone());
            let co0 = mul(rem(Idx::Var(0), tiles.clone()), c(mr));
            let ch0 = mul(div(co0.clone(), c(cog)), g.cg.clone());
            let pixels = mul(oh.clone(), ow.clone());
            let cols = self.lw.sched.mma_cols as i64;
            let full = div(pixels.clone(), c(cols));
            let tile = |p0: Idx, valid: Idx| -> LowerResult<Stmt> {
                let a = lw.value(g.w, &simplified(&[add(co0.clone(), Idx::Var(ROW)), Idx::Var(2), c(0), c(0)]))?;
                Ok(Stmt::Mma(Box::new(Mma {
                    rows: mr as usize,
                    cols: self.lw.sched.mma_cols,
                    lanes: self.lw.sched.lanes,
                    valid: valid.simplify(),
                    row: ROW,
                    red: vec![(2, g.cg.clone())],
                    a,
                    // Pixel p of a channel is element [n, c, 0, p] in row-major order.
                    b: (xb, simplified(&[ni.clone(), add(ch0.clone(), Idx::Var(2)), c(0), p0.clone()])),
                    c: (acc, simplified(&[ni.clone(), add(co0.clone(), Idx::Var(ROW)), c(0), p0])),
                    c_col: c(1),
                })))
            };
            let mut body = vec![init(&ni, &co0, mr)?];
            body.push(for_(1, full.clone(), false, vec![tile(mul(Idx::Var(1), c(cols)), c(cols))?]));
            let tail = mul(full.clone(), c(cols));
            body.push(for_(
                1,
                min(c(1), rem(pixels.clone(), c(cols))),
                false,
                vec![tile(tail.clone(), sub(pixels, tail))?],
            ));
            epilogue(&mut body, &ni, &co0, mr)?;
            return Ok(Some((vec![for_(0, mul(g.n.clone(), tiles), true, body)], Vec::new())));
        }
        // Direct: output channels in the vectors.
        let nr = if cog % 32 == 0 {
            32
        } else if cog % self.lw.sched.lanes as i64 == 0 {
            self.lw.sched.lanes as i64
        } else {
            return Ok(None);
        };
        let [kh, kw] = [g.kernel[0], g.kernel[1]];
        let blocks = c(mk / nr);
        let ni = div(Idx::Var(0), blocks.clone());
        let co0 = mul(rem(Idx::Var(0), blocks.clone()), c(nr));
        let ch0 = mul(div(co0.clone(), c(cog)), g.cg.clone());
        let panel = self.p.buffers.len();
        let taps = mul(g.cg.clone(), c(kh * kw));
        let locals = vec![Local { name: "weights".into(), size: vec![taps.simplify(), c(nr)] }];
        // Pack: panel[(ci·KH + y)·KW + x, j] = W[co0 + j, ci, y, x] (loop variables 1..=4).
        let pack = self.nest(1, &[], &[g.cg.clone(), c(kh), c(kw), c(nr)], |v| {
            let pk = add(mul(add(mul(v[0].clone(), c(kh)), v[1].clone()), c(kw)), v[2].clone());
            let wv = lw
                .value(g.w, &simplified(&[add(co0.clone(), v[3].clone()), v[0].clone(), v[1].clone(), v[2].clone()]))?;
            Ok(vec![Stmt::Store { buf: panel, index: simplified(&[pk, v[3].clone()]), value: wv }])
        })?;
        // Per output row (loop variable 1): the taps of the leading axis in bounds,
        // [y0, y0 + ny).
        let row = Idx::Var(1);
        let (y0, y1) = g.taps(0, row.clone());
        let ny = max(c(0), sub(y1, y0.clone()));
        // A tile of `rows` pixels from `o0`, taps [kx0, kx0 + nx) along the row. Loop variables
        // 3 (input channel), 4 (tap row), 5 (tap column).
        let plane = mul(oh.clone(), ow.clone());
        // `guarded`: taps along the row may fall in the padding (they read zero; the load's
        // index is clamped in bounds, branch-free).
        let tile = |rows: usize, o0: Idx, kx0: Idx, nx: Idx, guarded: bool| -> LowerResult<Stmt> {
            let o = add(o0.clone(), Idx::Var(ROW));
            let ky = add(y0.clone(), Idx::Var(4));
            let kx = add(kx0.clone(), Idx::Var(5));
            let ih = g.in_at(0, row.clone(), ky.clone());
            let iw = g.in_at(1, o.clone(), kx.clone());
            let ch = add(ch0.clone(), Idx::Var(3));
            let a = if guarded {
                let width = g.in_dims[1].clone();
                let inside = max(c(0), min(iw.clone(), sub(width.clone(), c(1))));
                let v = lw.value(g.x, &simplified(&[ni.clone(), ch, ih, inside]))?;
                let iw = iw.simplify();
                Val::Select {
                    lhs: iw.clone(),
                    rhs: c(0),
                    then: Box::new(Val::Const(0.0)),
                    other: Box::new(Val::Select {
                        lhs: iw,
                        rhs: width,
                        then: Box::new(v),
                        other: Box::new(Val::Const(0.0)),
                    }),
                }
            } else {
                lw.value(g.x, &simplified(&[ni.clone(), ch, ih, iw]))?
            };
            let k = add(mul(add(mul(Idx::Var(3), c(kh)), ky), c(kw)), kx);
            Ok(Stmt::Mma(Box::new(Mma {
                rows,
                cols: nr as usize,
                lanes: self.lw.sched.lanes,
                valid: c(nr),
                row: ROW,
                red: vec![(3, g.cg.clone()), (4, ny.clone()), (5, nx.simplify())],
                a,
                b: (panel, simplified(&[k, c(0)])),
                c: (acc, simplified(&[ni.clone(), co0.clone(), row.clone(), o])),
                c_col: plane.clone().simplify(),
            })))
        };
        // The interior pixels [l, h): every tap along the row in bounds.
        let l = min(g.first_out(1, c(0)), ow.clone()).simplify();
        let h = max(l.clone(), g.end_out(1, c(kw - 1))).simplify();
        let mut per_row = Vec::new();
        if let (Idx::Const(owk), Idx::Const(lk), Idx::Const(hk)) = (&ow, &l, &h) {
            // Known sizes: the row in even tiles of at most `conv_pixel_rows` pixels; a tile with
            // pixels outside [l, h) guards its loads; a run of interior tiles is one loop.
            let (owk, lk, hk) = (*owk, *lk, *hk);
            let mr = ceil_div_const(owk, ceil_div_const(owk, self.lw.sched.conv_pixel_rows as i64));
            let mut run: Option<(i64, i64)> = None;
            let flush = |run: &mut Option<(i64, i64)>, per_row: &mut Vec<Stmt>| -> LowerResult<()> {
                if let Some((from, count)) = run.take() {
                    let o0 = add(c(from), mul(Idx::Var(2), c(mr)));
                    per_row.push(for_(2, c(count), false, vec![tile(mr as usize, o0, c(0), c(kw), false)?]));
                }
                Ok(())
            };
            let mut start = 0;
            while start < owk {
                let rows = mr.min(owk - start);
                let interior = start >= lk && start + rows <= hk;
                if interior && rows == mr {
                    match &mut run {
                        Some((_, count)) => *count += 1,
                        None => run = Some((start, 1)),
                    }
                } else {
                    flush(&mut run, &mut per_row)?;
                    per_row.push(tile(rows as usize, c(start), c(0), c(kw), !interior)?);
                }
                start += rows;
            }
            flush(&mut run, &mut per_row)?;
        } else {
            // Sizes known at run time: interior tiles, then edge pixels one at a time with
            // their own taps.
            let width = sub(h.clone(), l.clone()).simplify();
            let mr = self.lw.sched.conv_pixel_rows as i64;
            let full = div(width.clone(), c(mr));
            per_row.push(for_(
                2,
                full.clone(),
                false,
                vec![tile(mr as usize, add(l.clone(), mul(Idx::Var(2), c(mr))), c(0), c(kw), false)?],
            ));
            let done = add(l.clone(), mul(full, c(mr)));
            per_row.push(for_(2, rem(width, c(mr)), false, vec![tile(1, add(done, Idx::Var(2)), c(0), c(kw), false)?]));
            let edge = |o: Idx| -> LowerResult<Stmt> {
                let (a, z) = g.taps(1, o.clone());
                tile(1, o, a.clone(), max(c(0), sub(z, a)), false)
            };
            per_row.push(for_(2, l.clone(), false, vec![edge(Idx::Var(2))?]));
            per_row.push(for_(2, sub(ow.clone(), h.clone()), false, vec![edge(add(h, Idx::Var(2)))?]));
        }
        let mut body = pack;
        body.push(init(&ni, &co0, nr)?);
        body.push(for_(1, oh, false, per_row));
        epilogue(&mut body, &ni, &co0, nr)?;
        Ok(Some((vec![for_(0, mul(g.n.clone(), blocks), true, body)], locals)))
    }

    /// [`Schedule::whole_matmul`]: a 2-D Conv of one image and one group with unit strides
    /// and dilations and known sizes as one whole GEMM `Y[co, p] += Σ_k W[co, k] · B[k, p]`
    /// for the matrix unit's code generator: with `B` = `X` itself for a 1×1 Conv without
    /// padding, else `B` the im2col columns local ([`Im2col`]: `pack; mma`, which the `npu`
    /// target forms on chip instead of materializing). Init (the bias) before, the epilogue
    /// after. `None` for other Convs, for fewer than [`WHOLE_CONV_MIN_CHANNELS`] output
    /// channels (too few rows for a matrix unit's tile), and when `X` or `W` is not a kernel
    /// buffer.
    fn conv_whole(&self, g: &ConvGeom, channels: Option<u64>) -> LowerResult<Option<(Vec<Stmt>, Vec<Local>)>> {
        let known = |i: &Idx| if let Idx::Const(v) = i.clone().simplify() { Some(v) } else { None };
        let (Some(cout), Some(1), Some(cin)) = (channels.map(|c| c as i64), known(&g.n), known(&g.cg)) else {
            return Ok(None);
        };
        let dims: Option<Vec<i64>> = g.in_dims.iter().chain(&g.out_dims).map(known).collect();
        let (Some(dims), Some(xb), Some(wb)) = (dims, self.param(g.x), self.param(g.w)) else { return Ok(None) };
        if g.kernel.len() != 2 || g.group != 1 || g.strides != [1, 1] || g.dilations != [1, 1] {
            return Ok(None);
        }
        let [h, w, oh, ow] = dims[..] else { return Ok(None) };
        let pointwise = g.kernel == [1, 1] && g.pad == [0, 0] && (h, w) == (oh, ow);
        if cout < WHOLE_CONV_MIN_CHANNELS || oh <= 0 || ow <= 0 {
            return Ok(None);
        }
        let acc = self.acc;
        let lanes = self.lw.sched.lanes;
        let mut body = Vec::new();
        let mut locals = Vec::new();
        if pointwise {
            // Init over (channel, flat pixel), the form a GEMM's init has: the code generator
            // adds a per-channel bias to the accumulators instead of reading it back.
            let value = match g.bias {
                Some(bv) => self.lw.value(bv, &[Idx::Var(1)])?,
                None => Val::Const(0.0),
            };
            let store = Stmt::Store { buf: acc, index: vec![c(0), Idx::Var(1), c(0), Idx::Var(2)], value };
            body.push(for_(1, c(cout), false, vec![for_(2, c(oh * ow), false, vec![store])]));
            const ROW: usize = 63;
            body.push(Stmt::Mma(Box::new(Mma {
                rows: cout as usize,
                cols: (oh * ow) as usize,
                lanes,
                valid: c(oh * ow),
                row: ROW,
                red: vec![(6, c(cin))],
                a: Val::Load { buf: wb, index: vec![Idx::Var(ROW), Idx::Var(6), c(0), c(0)] },
                b: (xb, vec![c(0), Idx::Var(6), c(0), c(0)]),
                c: (acc, vec![c(0), Idx::Var(ROW), c(0), c(0)]),
                c_col: c(1),
            })));
        } else {
            body.push(for_(1, c(cout), false, self.conv_init(g, 2, &c(0), Idx::Var(1))?));
            let im = Im2col {
                x: xb,
                col: self.p.buffers.len(),
                cin,
                h,
                w,
                kh: g.kernel[0],
                kw: g.kernel[1],
                pad_top: g.pad[0],
                pad_left: g.pad[1],
                oh,
                ow,
            };
            locals.push(Local { name: "columns".into(), size: vec![c(im.k()), c(oh * ow)] });
            body.push(im.pack());
            body.push(Stmt::Mma(Box::new(im.mma(wb, acc, cout as usize, lanes))));
        }
        let e = self.conv_epilogue(g, 2, &c(0), Idx::Var(1))?;
        if !e.is_empty() {
            body.push(for_(1, c(cout), false, e));
        }
        Ok(Some((body, locals)))
    }

    /// The init of output channel `co` of image `ni` (the bias or zero) over the output
    /// positions (loop variables from `first`).
    fn conv_init(&self, g: &ConvGeom, first: usize, ni: &Idx, co: Idx) -> LowerResult<Vec<Stmt>> {
        let value = match g.bias {
            Some(bv) => self.lw.value(bv, std::slice::from_ref(&co))?,
            None => Val::Const(0.0),
        };
        let acc = self.acc;
        self.nest(first, &[ni.clone(), co], &g.out_dims, |idx| {
            Ok(vec![Stmt::Store { buf: acc, index: simplified(idx), value }])
        })
    }

    /// The epilogue pass of output channel `co` of image `ni` (nothing without an epilogue).
    fn conv_epilogue(&self, g: &ConvGeom, first: usize, ni: &Idx, co: Idx) -> LowerResult<Vec<Stmt>> {
        if !self.has_epilogue() {
            return Ok(Vec::new());
        }
        self.nest(first, &[ni.clone(), co], &g.out_dims, |idx| self.epilogue(idx))
    }

    /// The parameter buffer holding value `v`, when the kernel reads it as is (not computed
    /// inside the kernel).
    fn param(&self, v: ValueId) -> Option<usize> {
        self.lw.arg.get(&v).copied()
    }

    // ---------------------------------------------------------------- MatMul, Gemm

    /// `Ok(None)` when the fast form does not apply.
    fn matmul(&self) -> LowerResult<Option<(Vec<Stmt>, Vec<Local>)>> {
        let lw = &self.lw;
        let sched = &lw.sched;
        let op = self.p.m.op(self.anchor);
        let gemm = op.op_type() == "Gemm";
        let (a, bm) = (self.operand(0).ok_or("no A")?, self.operand(1).ok_or("no B")?);
        let (sa, sb, so) = (self.shape(a)?, self.shape(bm)?, self.shape(self.result)?);
        let e = |x: kiln_ir::graph::OpError| x.0;
        let attrs = self.attrs();
        let (ta, tb) = if gemm {
            (attrs.int("transA", 0).map_err(e)? != 0, attrs.int("transB", 0).map_err(e)? != 0)
        } else {
            (false, false)
        };
        let (alpha, beta) = if gemm {
            (attrs.float("alpha", 1.0).map_err(e)? as f64, attrs.float("beta", 1.0).map_err(e)? as f64)
        } else {
            (1.0, 1.0)
        };
        let cmat = if gemm { self.operand(2) } else { None };
        let (ra, rb) = (sa.len(), sb.len());
        if ra == 0 || rb == 0 || (gemm && (ra != 2 || rb != 2)) {
            return Err("a MatMul of scalars or a Gemm of other than matrices".into());
        }
        // A 1-D operand is a matrix of one row (A) or one column (B) whose dim the output
        // drops: the loops run over the output with those dims put back (`virt`).
        let (a_vec, b_vec) = (ra == 1, rb == 1);
        let nb = so.len().checked_sub((!a_vec) as usize + (!b_vec) as usize).ok_or("a MatMul of a bad rank")?;
        let out_batch = &so[..nb];
        let mut virt = out_batch.to_vec();
        virt.push(if a_vec { Dim::Known(1) } else { so[nb].clone() });
        virt.push(if b_vec { Dim::Known(1) } else { so[so.len() - 1].clone() });
        let r = virt.len();
        let kdim = if a_vec {
            &sa[0]
        } else if ta {
            &sa[ra - 2]
        } else {
            &sa[ra - 1]
        };
        let (nn, kk) = (lw.dim(&virt[r - 1])?, lw.dim(kdim)?);
        let a_batch = if a_vec { &[][..] } else { &sa[..ra - 2] };
        let b_batch = if b_vec { &[][..] } else { &sb[..rb - 2] };
        // B shared by every row (no batch dims of its own): rows flatten over the batch.
        let shared = b_batch.iter().all(|d| *d == Dim::Known(1));
        let rows_shape: Vec<Dim> = if shared { virt[..r - 1].to_vec() } else { vec![virt[r - 2].clone()] };
        let mut rows = c(1);
        for d in &rows_shape {
            rows = mul(rows, lw.dim(d)?);
        }
        let mut batches = c(1);
        if !shared {
            for d in out_batch {
                batches = mul(batches, lw.dim(d)?);
            }
        }
        // Loop variables: 0 (batch, row block), 1 column tile, 2 row group, 3.. inside.
        let groups = ceil_div(rows.clone(), sched.matmul_row_block);
        let v0 = Idx::Var(0);
        let (bt, grp) =
            if shared { (c(0), v0.clone()) } else { (div(v0.clone(), groups.clone()), rem(v0, groups.clone())) };
        let g0 = mul(grp, c(sched.matmul_row_block));
        let grows = min(c(sched.matmul_row_block), sub(rows.clone(), g0.clone()));
        let j0 = mul(Idx::Var(1), c(sched.matmul_tile_n));
        let nj = min(c(sched.matmul_tile_n), sub(nn.clone(), j0.clone()));
        // The index into `virt` (all but the column) of row `row` (an index into rows).
        let prefix = |row: Idx| -> LowerResult<Vec<Idx>> {
            if shared {
                lw.delinearize(row, &rows_shape)
            } else {
                let mut p = lw.delinearize(bt.clone(), out_batch)?;
                p.push(row);
                Ok(p)
            }
        };
        // A's index for prefix `pre` and reduction index `k`; B's for `k`, column `j`.
        let a_idx = |pre: &[Idx], k: Idx| -> LowerResult<Vec<Idx>> {
            if a_vec {
                return Ok(vec![k]);
            }
            let mut ix = lw.broadcast(&pre[..r - 2], out_batch, a_batch)?;
            let i = pre[r - 2].clone();
            ix.extend(if ta { [k, i] } else { [i, k] });
            Ok(ix)
        };
        let b_idx = |pre: &[Idx], k: Idx, j: Idx| -> LowerResult<Vec<Idx>> {
            if b_vec {
                return Ok(vec![k]);
            }
            let mut ix = lw.broadcast(&pre[..r - 2], out_batch, b_batch)?;
            ix.extend(if tb { [j, k] } else { [k, j] });
            Ok(ix)
        };
        // The output's index of `virt`'s (`pre`, `j`).
        let with_col = |pre: &[Idx], j: Idx| {
            let mut v = pre[..r - 2].to_vec();
            if !a_vec {
                v.push(pre[r - 2].clone());
            }
            if !b_vec {
                v.push(j);
            }
            simplified(&v)
        };
        let acc = self.acc;
        let finish = alpha != 1.0;
        let init_val = |pre: &[Idx], j: Idx| -> LowerResult<Val> {
            match cmat {
                Some(cv) if !finish => {
                    let cix = lw.broadcast(&with_col(pre, j), &so, &self.shape(cv)?)?;
                    Ok(fmul(Val::Const(beta), lw.value(cv, &cix)?))
                }
                _ => Ok(Val::Const(0.0)),
            }
        };
        let finish_val = |pre: &[Idx], j: Idx| -> LowerResult<Val> {
            let mut v = fmul(Val::Const(alpha), Val::Load { buf: acc, index: with_col(pre, j.clone()) });
            if let Some(cv) = cmat {
                let cix = lw.broadcast(&with_col(pre, j), &so, &self.shape(cv)?)?;
                v = fadd(v, fmul(Val::Const(beta), lw.value(cv, &cix)?));
            }
            Ok(v)
        };
        let epi = self.has_epilogue();
        let pres_of = |row0: &Idx, u: usize| -> LowerResult<Vec<Vec<Idx>>> {
            (0..u).map(|q| prefix(add(row0.clone(), c(q as i64)))).collect()
        };
        let col = |v: usize| add(j0.clone(), Idx::Var(v));
        // Init of `u` rows from `row0` over the column tile (loop variable `v`).
        let init = |row0: Idx, u: usize, v: usize| -> LowerResult<Vec<Stmt>> {
            let mut s = Vec::new();
            for pre in &pres_of(&row0, u)? {
                let store = Stmt::Store { buf: acc, index: with_col(pre, col(v)), value: init_val(pre, col(v))? };
                s.push(for_(v, nj.clone(), false, vec![store]));
            }
            Ok(s)
        };
        // Alpha, C and the epilogue, in place.
        let finish_rows = |row0: Idx, u: usize, v: usize| -> LowerResult<Vec<Stmt>> {
            let mut s = Vec::new();
            for pre in &pres_of(&row0, u)? {
                let mut st = Vec::new();
                if finish {
                    st.push(Stmt::Store { buf: acc, index: with_col(pre, col(v)), value: finish_val(pre, col(v))? });
                }
                if epi {
                    st.extend(self.epilogue(&with_col(pre, col(v)))?);
                }
                if !st.is_empty() {
                    s.push(for_(v, nj.clone(), false, st));
                }
            }
            Ok(s)
        };
        // The products of `u` rows from `row0` with k in [k0, k0 + kl), `ku` values of k per
        // pass over the columns (then the remainder one at a time); loop variables v, v + 1.
        let products = |row0: Idx, u: usize, k0: Idx, kl: Idx, v: usize| -> LowerResult<Vec<Stmt>> {
            let pres = pres_of(&row0, u)?;
            let kstep = |ku: usize, k0: Idx| -> LowerResult<Vec<Stmt>> {
                let mut lets = Vec::new();
                let mut aslots = vec![vec![0; ku]; u];
                for (q, pre) in pres.iter().enumerate() {
                    for t in 0..ku {
                        let sl = self.slot();
                        aslots[q][t] = sl;
                        let value = lw.value(a, &a_idx(pre, add(k0.clone(), c(t as i64)))?)?;
                        lets.push(Stmt::Let { slot: sl, value });
                    }
                }
                let mut inner = Vec::new();
                let mut bslots = vec![0; ku];
                for t in 0..ku {
                    let sl = self.slot();
                    bslots[t] = sl;
                    let value = lw.value(bm, &b_idx(&pres[0], add(k0.clone(), c(t as i64)), col(v + 1))?)?;
                    inner.push(Stmt::Let { slot: sl, value });
                }
                for (q, pre) in pres.iter().enumerate() {
                    let ix = with_col(pre, col(v + 1));
                    let mut sum = Val::Load { buf: acc, index: ix.clone() };
                    for t in 0..ku {
                        sum = fadd(sum, fmul(Val::Scalar(aslots[q][t]), Val::Scalar(bslots[t])));
                    }
                    inner.push(Stmt::Store { buf: acc, index: ix, value: sum });
                }
                lets.push(for_(v + 1, nj.clone(), false, inner));
                Ok(lets)
            };
            let ku = MATMUL_K_UNROLL as i64;
            let full = div(kl.clone(), c(ku));
            let mut s =
                vec![for_(v, full.clone(), false, kstep(MATMUL_K_UNROLL, add(k0.clone(), mul(Idx::Var(v), c(ku))))?)];
            s.push(for_(v, rem(kl, c(ku)), false, kstep(1, add(add(k0, mul(full, c(ku))), Idx::Var(v)))?));
            Ok(s)
        };
        // Rows of the group: blocks of MATMUL_ROWS, then one at a time (loop variable `v`).
        let mr = MATMUL_ROWS as i64;
        let full_blocks = div(grows.clone(), c(mr));
        let rows_loop = |v: usize, f: &dyn Fn(Idx, usize) -> LowerResult<Vec<Stmt>>| -> LowerResult<Vec<Stmt>> {
            Ok(vec![
                for_(v, full_blocks.clone(), false, f(add(g0.clone(), mul(Idx::Var(v), c(mr))), MATMUL_ROWS)?),
                for_(
                    v,
                    rem(grows.clone(), c(mr)),
                    false,
                    f(add(add(g0.clone(), mul(full_blocks.clone(), c(mr))), Idx::Var(v)), 1)?,
                ),
            ])
        };
        // A matrix unit's code generator blocks the whole product itself: one `Mma` of all rows
        // and columns over all of K (sizes known, `B` contiguous along its columns).
        if sched.whole_matmul && shared && !a_vec && !b_vec && !tb {
            if let (Idx::Const(m), Idx::Const(n), Idx::Const(k)) =
                (rows.clone().simplify(), nn.clone().simplify(), kk.clone().simplify())
            {
                if m > 0 && n > 0 && k > 0 {
                    if let Some(w) =
                        self.whole_matmul(m, n, k, &prefix, &a_idx, &b_idx, &with_col, &init_val, &finish_val)?
                    {
                        return Ok(Some(w));
                    }
                }
            }
        }
        // Loop variables: 0 (batch, row group), 1 column tile, 2 reduction tile or rows, 3 rows.
        let kt = sched.matmul_tile_k;
        let k0 = mul(Idx::Var(2), c(kt));
        let kl = min(c(kt), sub(kk.clone(), k0.clone()));
        let mut tile = rows_loop(2, &|row0, u| init(row0, u, 3))?;
        let mut locals = Vec::new();
        // Register tiles, unless the rows are known to be too few to share the packed `B`
        // (a matrix-vector product streams `B`'s rows instead).
        let few_rows = matches!(rows.clone().simplify(), Idx::Const(n) if n < 2 * sched.matmul_mma_rows as i64);
        let ktile = if b_vec || few_rows {
            rows_loop(3, &|row0, u| products(row0, u, k0.clone(), kl.clone(), 4))?
        } else {
            // The loop variable standing for an Mma tile's row (never a loop of its own).
            const ROW: usize = 63;
            let (cols, mr) = (sched.mma_cols as i64, sched.matmul_mma_rows as i64);
            let k = add(k0.clone(), Idx::Var(5));
            // The `B` tile, `matmul_tile_k` × `mma_cols`, packed contiguously: in place, `B`'s rows
            // a power of two apart would fall into a few L1 sets and evict each other (and a
            // transposed `B` would not be contiguous at all).
            let panel = self.p.buffers.len();
            locals.push(Local { name: "b_panel".into(), size: vec![c(sched.matmul_tile_k), c(cols)] });
            // The tile of `rows` rows from `row0` and columns from `jt` (`valid` of them),
            // over the reduction tile (loop variable 5).
            let mma = |row0: Idx, rows: usize, jt: &Idx, valid: &Idx| -> LowerResult<Stmt> {
                let pre = prefix(add(row0, Idx::Var(ROW)))?;
                Ok(Stmt::Mma(Box::new(Mma {
                    rows,
                    cols: self.lw.sched.mma_cols,
                    lanes: self.lw.sched.lanes,
                    valid: valid.clone().simplify(),
                    row: ROW,
                    red: vec![(5, kl.clone().simplify())],
                    a: lw.value(a, &a_idx(&pre, k.clone())?)?,
                    b: (panel, vec![Idx::Var(5), c(0)]),
                    c: (acc, with_col(&pre, jt.clone())),
                    c_col: c(1),
                })))
            };
            // One column tile (loop variable 3): pack it, then every row of the group in tiles
            // of `matmul_mma_rows` rows (loop variable 4), then one row at a time; the panel
            // stays in L1 while the rows go by.
            let over_rows = |jt: Idx, valid: Idx| -> LowerResult<Vec<Stmt>> {
                let full = div(grows.clone(), c(mr));
                let rest = add(g0.clone(), mul(full.clone(), c(mr)));
                let at = b_idx(&prefix(g0.clone())?, add(k0.clone(), Idx::Var(4)), add(jt.clone(), Idx::Var(5)))?;
                let store =
                    Stmt::Store { buf: panel, index: vec![Idx::Var(4), Idx::Var(5)], value: lw.value(bm, &at)? };
                let tiles = mma(add(g0.clone(), mul(Idx::Var(4), c(mr))), mr as usize, &jt, &valid)?;
                Ok(vec![
                    for_(4, kl.clone(), false, vec![for_(5, valid.clone(), false, vec![store])]),
                    for_(4, full, false, vec![tiles]),
                    for_(4, rem(grows.clone(), c(mr)), false, vec![mma(add(rest, Idx::Var(4)), 1, &jt, &valid)?]),
                ])
            };
            let full = div(nj.clone(), c(cols));
            let tail = mul(full.clone(), c(cols));
            let last = over_rows(add(j0.clone(), tail.clone()), sub(nj.clone(), tail))?;
            vec![
                for_(3, full, false, over_rows(add(j0.clone(), mul(Idx::Var(3), c(cols))), c(cols))?),
                for_(3, min(c(1), rem(nj.clone(), c(cols))), false, last),
            ]
        };
        tile.push(for_(2, ceil_div(kk.clone(), kt), false, ktile));
        tile.extend(rows_loop(2, &|row0, u| finish_rows(row0, u, 3))?);
        let tiles = for_(1, ceil_div(nn, sched.matmul_tile_n), false, tile);
        Ok(Some((vec![for_(0, mul(batches, groups), true, vec![tiles])], locals)))
    }
}

type IdxOf<'a> = &'a dyn Fn(Idx) -> LowerResult<Vec<Idx>>;
type IdxOf2<'a> = &'a dyn Fn(&[Idx], Idx) -> LowerResult<Vec<Idx>>;
type IdxOf3<'a> = &'a dyn Fn(&[Idx], Idx, Idx) -> LowerResult<Vec<Idx>>;
type ValOf<'a> = &'a dyn Fn(&[Idx], Idx) -> LowerResult<Val>;

impl Builder<'_, '_> {
    /// [`Schedule::whole_matmul`]: `init; C[r, 0..n] += Σ_k A[r, k] · B[k, 0..n]` as one
    /// [`Mma`] of `m` rows and `n` columns; then alpha, `C` and the epilogue in place. Loop
    /// variables: 2 rows, 3 columns, 5 the reduction, 63 the tile's row. `None` when `B` is not
    /// a kernel buffer or `A`'s element not a load (the tiled form then).
    #[allow(clippy::too_many_arguments)]
    fn whole_matmul(
        &self,
        m: i64,
        n: i64,
        k: i64,
        prefix: IdxOf,
        a_idx: IdxOf2,
        b_idx: IdxOf3,
        with_col: &dyn Fn(&[Idx], Idx) -> Vec<Idx>,
        init_val: ValOf,
        finish_val: ValOf,
    ) -> LowerResult<Option<(Vec<Stmt>, Vec<Local>)>> {
        const ROW: usize = 63;
        let lw = &self.lw;
        let op = self.p.m.op(self.anchor);
        let (a, bm) = (self.operand(0).ok_or("no A")?, self.operand(1).ok_or("no B")?);
        let acc = self.acc;
        let gemm = op.op_type() == "Gemm";
        let alpha = if gemm { self.attrs().float("alpha", 1.0).map_err(|x| x.0)? as f64 } else { 1.0 };
        let (r, j) = (Idx::Var(2), Idx::Var(3));
        let pre = prefix(r.clone())?;
        let init = Stmt::Store { buf: acc, index: with_col(&pre, j.clone()), value: init_val(&pre, j.clone())? };
        let mut body = vec![for_(2, c(m), false, vec![for_(3, c(n), false, vec![init])])];
        let tpre = prefix(Idx::Var(ROW))?;
        // `B` must be a buffer (not a value computed in the kernel) and `a` a load.
        let Some(bbuf) = self.param(bm) else { return Ok(None) };
        let aval = lw.value(a, &a_idx(&tpre, Idx::Var(5))?)?;
        if !matches!(aval, Val::Load { .. }) {
            return Ok(None);
        }
        body.push(Stmt::Mma(Box::new(Mma {
            rows: m as usize,
            cols: n as usize,
            lanes: lw.sched.lanes,
            valid: c(n),
            row: ROW,
            red: vec![(5, c(k))],
            a: aval,
            b: (bbuf, simplified(&b_idx(&prefix(c(0))?, Idx::Var(5), c(0))?)),
            c: (acc, with_col(&tpre, c(0))),
            c_col: c(1),
        })));
        let mut fin = Vec::new();
        if alpha != 1.0 {
            fin.push(Stmt::Store { buf: acc, index: with_col(&pre, j.clone()), value: finish_val(&pre, j.clone())? });
        }
        if self.has_epilogue() {
            fin.extend(self.epilogue(&with_col(&pre, j))?);
        }
        if !fin.is_empty() {
            body.push(for_(2, c(m), false, vec![for_(3, c(n), false, fin)]));
        }
        Ok(Some((body, Vec::new())))
    }
}

/// `⌈x / t⌉` of known positive sizes.
fn ceil_div_const(x: i64, t: i64) -> i64 {
    (x + t - 1) / t
}

/// A Conv's operands and geometry, as [`Builder::conv`] resolved them (per spatial axis `d`:
/// `pad` the begin padding, `in_dims`/`out_dims` the extents).
struct ConvGeom {
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    group: i64,
    kernel: Vec<i64>,
    strides: Vec<i64>,
    dilations: Vec<i64>,
    pad: Vec<i64>,
    n: Idx,
    cg: Idx,
    out_dims: Vec<Idx>,
    in_dims: Vec<Idx>,
}

impl ConvGeom {
    /// The input index along axis `d` of output position `o` and tap `k`: `o·s − p + k·d`.
    fn in_at(&self, d: usize, o: Idx, k: Idx) -> Idx {
        add(sub(mul(o, c(self.strides[d])), c(self.pad[d])), mul(k, c(self.dilations[d])))
    }

    /// The output positions whose input index is in bounds for tap `k` along axis `d` are
    /// `[first_out, end_out)`: `⌈max(0, p − k·d) / s⌉` and `min(O, ⌈max(0, L + p − k·d) / s⌉)`;
    /// both shrink as `k` grows.
    fn first_out(&self, d: usize, k: Idx) -> Idx {
        ceil_div(max(c(0), sub(c(self.pad[d]), mul(k, c(self.dilations[d])))), self.strides[d])
    }

    fn end_out(&self, d: usize, k: Idx) -> Idx {
        let reach = max(c(0), sub(add(self.in_dims[d].clone(), c(self.pad[d])), mul(k, c(self.dilations[d]))));
        min(self.out_dims[d].clone(), ceil_div(reach, self.strides[d]))
    }

    /// The taps along axis `d` whose input index is in bounds for output position `o`:
    /// `[⌈max(0, p − o·s) / d⌉, min(K, ⌈max(0, L + p − o·s) / d⌉))`.
    fn taps(&self, d: usize, o: Idx) -> (Idx, Idx) {
        let at = mul(o, c(self.strides[d]));
        let first = ceil_div(max(c(0), sub(c(self.pad[d]), at.clone())), self.dilations[d]);
        let reach = max(c(0), sub(add(self.in_dims[d].clone(), c(self.pad[d])), at));
        (first, min(c(self.kernel[d]), ceil_div(reach, self.dilations[d])))
    }
}

/// Whether every load of buffer `buf` in `v` reads element `at`.
fn reads_only_at(v: &Val, buf: usize, at: &[Idx]) -> bool {
    match v {
        Val::Load { buf: lb, index } => *lb != buf || index == at,
        Val::Const(_) | Val::Scalar(_) | Val::FromIdx(_) => true,
        Val::Un(_, x) => reads_only_at(x, buf, at),
        Val::Bin(_, x, y) => reads_only_at(x, buf, at) && reads_only_at(y, buf, at),
        Val::Reduce { body, .. } => reads_only_at(body, buf, at),
        Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => {
            reads_only_at(then, buf, at) && reads_only_at(other, buf, at)
        }
        Val::Where { cond, then, other } => {
            reads_only_at(cond, buf, at) && reads_only_at(then, buf, at) && reads_only_at(other, buf, at)
        }
    }
}

/// A Conv's attributes, checked: group, kernel size, strides, dilations and the begin padding
/// per spatial axis (from `pads` or `auto_pad`).
pub(super) struct ConvAttrs {
    pub group: i64,
    pub kernel: Vec<i64>,
    pub strides: Vec<i64>,
    pub dilations: Vec<i64>,
    pub pad: Vec<i64>,
}

/// Reads a Conv's attributes for input shape `xs` and weight shape `ws` (same rank).
pub(super) fn conv_attrs(a: &AttrView<'_>, xs: &[Dim], ws: &[Dim]) -> LowerResult<ConvAttrs> {
    let sp = xs.len() - 2;
    let e = |x: kiln_ir::graph::OpError| x.0;
    let group = a.int("group", 1).map_err(e)?;
    if group < 1 {
        return Err("Conv with a group below 1".into());
    }
    let kernel: Vec<i64> = ws[2..]
        .iter()
        .map(|d| d.known().map(|k| k as i64).ok_or("Conv with a symbolic kernel size"))
        .collect::<Result<_, _>>()?;
    if let Some(ks) = a.ints("kernel_shape").map_err(e)? {
        if ks != kernel {
            return Err("Conv kernel_shape differs from W's spatial dims".into());
        }
    }
    let spatial = |name: &str, n: usize, fill: i64| -> LowerResult<Vec<i64>> {
        let v = a.ints(name).map_err(e)?.unwrap_or_else(|| vec![fill; n]);
        if v.len() != n || v.iter().any(|&x| x < 0) {
            return Err(format!("Conv attribute {name} {v:?} is not {n} non-negative values"));
        }
        Ok(v)
    };
    let strides = spatial("strides", sp, 1)?;
    let dilations = spatial("dilations", sp, 1)?;
    let pads = spatial("pads", 2 * sp, 0)?;
    if strides.contains(&0) || dilations.contains(&0) {
        return Err("Conv with a zero stride or dilation".into());
    }
    let auto_pad = a.string("auto_pad", "NOTSET").map_err(e)?;
    // Begin padding per spatial axis (the output's extent comes from its buffer).
    let mut pad = Vec::new();
    for d in 0..sp {
        pad.push(match auto_pad.as_str() {
            "NOTSET" => pads[d],
            "VALID" => 0,
            "SAME_UPPER" | "SAME_LOWER" => {
                let len = xs[2 + d].known().ok_or("Conv with auto_pad SAME over a symbolic spatial dim")? as i64;
                let ek = (kernel[d] - 1) * dilations[d] + 1;
                let out = (len + strides[d] - 1) / strides[d];
                let total = ((out.max(1) - 1) * strides[d] + ek - len).max(0);
                if auto_pad == "SAME_UPPER" {
                    total / 2
                } else {
                    total - total / 2
                }
            }
            other => return Err(format!("Conv auto_pad {other} is not known")),
        });
    }
    Ok(ConvAttrs { group, kernel, strides, dilations, pad })
}

impl Lowering<'_> {
    /// Element `idx` (`[n, m, oh, ow]`) of a 2-D Conv in per-element form (the GPU schedule,
    /// `Schedule::matmul_per_element`): `Σ_k w[m, c, kh, kw] · x[n, c, ih, iw]` over
    /// `k = (c·KH + kh)·KW + kw` (an implicit GEMM's reduction), `ih = oh·sh − ph + kh·dh`
    /// (likewise `iw`), the input zero in the padding; plus `bias[m]`. With `G` groups the
    /// input's channel is `(m / (M/G))·(C/G) + c` (depthwise: `m / (M/C)`). An error for any
    /// other Conv (1-D, 3-D), which the caller lowers in accumulate form.
    pub(super) fn conv_element(&self, o: OpId, idx: &[Idx]) -> LowerResult<Val> {
        let op = self.m.op(o);
        let operand = |i: usize| op.operands.get(i).copied().flatten();
        let (x, w) = (operand(0).ok_or("Conv without X")?, operand(1).ok_or("Conv without W")?);
        let (xs, ws) = (self.shape(x)?.to_vec(), self.shape(w)?.to_vec());
        if xs.len() != 4 || ws.len() != 4 || idx.len() != 4 {
            return Err("a per-element Conv is 2-D only".into());
        }
        let ConvAttrs { group, kernel, strides, dilations, pad } = conv_attrs(&AttrView(&op.attrs), &xs, &ws)?;
        let (kh, kw) = (kernel[0], kernel[1]);
        let k = self.fresh_var();
        let taps = kh * kw;
        let ch = if taps == 1 { Idx::Var(k) } else { div(Idx::Var(k), c(taps)) };
        let th = rem(div(Idx::Var(k), c(kw)), c(kh));
        let tw = rem(Idx::Var(k), c(kw));
        // The input's channel: the group's first (output channel m is in group m / (M/G)) plus c.
        let xch = if group == 1 {
            ch.clone()
        } else {
            let per_group = div(self.dim(&ws[0])?, c(group));
            add(mul(div(idx[1].clone(), per_group), self.dim(&ws[1])?), ch.clone()).simplify()
        };
        let mut at = vec![idx[0].clone(), xch];
        let mut guards = Vec::new();
        for (d, t) in [th, tw].into_iter().enumerate() {
            let i = add(sub(mul(idx[2 + d].clone(), c(strides[d])), c(pad[d])), mul(t, c(dilations[d]))).simplify();
            // In bounds for every output without a check: no begin padding and the last
            // output's last tap inside the input.
            let len = xs[2 + d].known().map(|n| n as i64);
            let out = self.shape(op.results[0])?.get(2 + d).and_then(|d| d.known()).map(|n| n as i64);
            let inside = match (len, out) {
                (Some(len), Some(out)) => pad[d] == 0 && (out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] < len,
                _ => false,
            };
            if !inside {
                guards.push((i.clone(), self.dim(&xs[2 + d])?));
            }
            at.push(i);
        }
        let mut xv = self.value(x, &at)?;
        for (i, len) in guards.into_iter().rev() {
            // Signed compares (`i` is negative in the begin padding); the load runs in bounds only.
            let below = Val::IfLess { lhs: i.clone(), rhs: len, then: Box::new(xv), other: Box::new(Val::Const(0.0)) };
            xv = Val::IfLess { lhs: i, rhs: c(0), then: Box::new(Val::Const(0.0)), other: Box::new(below) };
        }
        let wv = self.value(w, &[idx[1].clone(), ch, rem(div(Idx::Var(k), c(kw)), c(kh)), rem(Idx::Var(k), c(kw))])?;
        let extent = mul(self.dim(&ws[1])?, c(taps)).simplify();
        let sum = Val::Reduce { op: kiln_ir::kernel::RedOp::Sum, var: k, extent, body: Box::new(fmul(wv, xv)) };
        Ok(match operand(2) {
            Some(bias) => fadd(sum, self.value(bias, &[idx[1].clone()])?),
            None => sum,
        })
    }
}

/// Whether Conv `o` has the per-element form ([`Lowering::conv_element`]): 2-D, any number of
/// groups.
fn per_element_conv(m: &Module, o: OpId) -> bool {
    let op = m.op(o);
    let rank = op.operands.first().copied().flatten().and_then(|x| m.value(x).ty.shape.as_ref().map(|s| s.len()));
    rank == Some(4) && matches!(AttrView(&op.attrs).int("group", 1), Ok(g) if g >= 1)
}
