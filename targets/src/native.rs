//! Kernels of the kernel dialect as native host code: each [`Kernel`] becomes one MLIR
//! function of upstream dialects (`scf` loops, `memref` loads/stores, `arith`/`math` scalar
//! code; every buffer a dynamically sized memref, so one compiled kernel runs at any size),
//! compiled in process by [`crate::jit`].

use crate::jit::{Entry, Jit, MemRef};
use crate::{HostKernel, TargetError};
use kiln_ir::kernel::{BinOp, ByZero, Idx, Kernel, Mma, RedOp, Stmt, UnOp, Val};
use kiln_ir::tensor::Data;
use kiln_ir::{DType, Dim, Tensor};
use kiln_passes::lower::Schedules;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The memref type of a rank-`r` f32 buffer with dynamic sizes.
fn memref(r: usize) -> String {
    memref_of(r, "f32")
}

/// The memref type of a rank-`r` buffer of `elem` with dynamic sizes.
fn memref_of(r: usize, elem: &str) -> String {
    let mut s = String::from("memref<");
    for _ in 0..r {
        s.push_str("?x");
    }
    s.push_str(elem);
    s.push('>');
    s
}

/// The MLIR element type of a kernel buffer: `f32`, or `i8` for a boolean one (one byte per
/// element, 0 or 1, as Rust stores `bool`).
fn elem_type(dtype: DType) -> &'static str {
    if dtype == DType::Bool {
        "i8"
    } else {
        "f32"
    }
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

/// A reduction's identity and the MLIR op that combines two of its values.
pub(crate) fn reduction(op: RedOp) -> (f64, &'static str) {
    match op {
        RedOp::Sum => (0.0, "arith.addf"),
        RedOp::Max => (f64::NEG_INFINITY, "arith.maximumf"),
        RedOp::Min => (f64::INFINITY, "arith.minimumf"),
    }
}

/// Emits a kernel's statements and values as MLIR text (the GPU GEMM tiling in
/// [`crate::gpu_tile`] uses it for loads, index math and epilogues).
pub(crate) struct Emitter<'k> {
    k: &'k Kernel,
    pub(crate) out: String,
    next: usize,
    /// The SSA value each `Let` slot names.
    pub(crate) slots: HashMap<usize, String>,
    /// The depth of the parallel loops that run over `%lo..%hi` (one thread's share) rather
    /// than their whole extent ([`split_loop`]).
    split: Option<usize>,
    options: MlirOptions,
}

impl<'k> Emitter<'k> {
    /// An emitter for `k`'s values with no shared parallel loop.
    pub(crate) fn new(k: &'k Kernel, options: MlirOptions) -> Emitter<'k> {
        Emitter { k, out: String::new(), next: 0, slots: HashMap::new(), split: None, options }
    }

    pub(crate) fn kernel(&self) -> &'k Kernel {
        self.k
    }

    pub(crate) fn options(&self) -> MlirOptions {
        self.options
    }

    pub(crate) fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%t{}", self.next)
    }

    pub(crate) fn line(&mut self, depth: usize, text: &str) {
        let _ = writeln!(self.out, "{}{text}", "  ".repeat(depth + 1));
    }

    pub(crate) fn idx(&mut self, depth: usize, i: &Idx) -> String {
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
                let ty = memref_of(self.rank(*buf), self.elem(*buf));
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

    /// The rank of buffer `buf` (a parameter or a local).
    fn rank(&self, buf: usize) -> usize {
        match self.k.buffers.get(buf) {
            Some(b) => b.shape.len(),
            None => self.k.locals.get(buf - self.k.buffers.len()).map_or(0, |l| l.size.len()),
        }
    }

    /// The MLIR element type of buffer `buf` (locals are f32).
    fn elem(&self, buf: usize) -> &'static str {
        self.k.buffers.get(buf).map_or("f32", |b| elem_type(b.dtype))
    }

    /// The one-dimensional view of buffer `buf` (see [`flat_buffers`]).
    fn flat(&self, buf: usize) -> String {
        if self.rank(buf) == 1 {
            format!("%b{buf}")
        } else {
            format!("%f{buf}")
        }
    }

    /// The row-major offset of element `index` of buffer `buf`.
    fn flat_offset(&mut self, depth: usize, buf: usize, index: &[Idx]) -> String {
        let mut e = index.first().cloned().unwrap_or(Idx::Const(0));
        for (axis, i) in index.iter().enumerate().skip(1) {
            let scaled = Idx::Mul(Box::new(e), Box::new(Idx::Dim { buf, axis }));
            e = Idx::Add(Box::new(scaled), Box::new(i.clone()));
        }
        self.idx(depth, &e.simplify())
    }

    /// `base + k` (index).
    fn offset_by(&mut self, depth: usize, base: &str, k: i64) -> String {
        if k == 0 {
            return base.to_string();
        }
        let c = self.idx(depth, &Idx::Const(k));
        let t = self.fresh();
        self.line(depth, &format!("{t} = arith.addi {base}, {c} : index"));
        t
    }

    /// A vector of `lanes` f32 from the one-dimensional view `flat` at `off`, masked (lanes off
    /// read `zero`'s) when `mask` is given.
    fn vload(&mut self, depth: usize, flat: &str, off: &str, mask: Option<&str>, lanes: usize, zero: &str) -> String {
        let (vt, mt) = (format!("vector<{lanes}xf32>"), format!("vector<{lanes}xi1>"));
        let t = self.fresh();
        match mask {
            Some(m) => self.line(
                depth,
                &format!("{t} = vector.maskedload {flat}[{off}], {m}, {zero} : memref<?xf32>, {mt}, {vt} into {vt}"),
            ),
            None => self.line(depth, &format!("{t} = vector.load {flat}[{off}] : memref<?xf32>, {vt}")),
        }
        t
    }

    /// Stores vector `value` of `lanes` f32 into `flat` at `off` (lanes masked off are left
    /// alone).
    fn vstore(&mut self, depth: usize, flat: &str, off: &str, mask: Option<&str>, lanes: usize, value: &str) {
        let (vt, mt) = (format!("vector<{lanes}xf32>"), format!("vector<{lanes}xi1>"));
        match mask {
            Some(m) => {
                self.line(depth, &format!("vector.maskedstore {flat}[{off}], {m}, {value} : memref<?xf32>, {mt}, {vt}"))
            }
            None => self.line(depth, &format!("vector.store {value}, {flat}[{off}] : memref<?xf32>, {vt}")),
        }
    }

    /// The stride `stride` as an index, the lanes' offsets `[0, stride, 2·stride, ...]` as a
    /// vector of i32 (a gather's or scatter's indices) and a mask of every lane.
    fn lane_offsets(&mut self, depth: usize, stride: &Idx, lanes: usize) -> (String, String, String) {
        let step = self.idx(depth, stride);
        let (s32, splat, iota, index) = (self.fresh(), self.fresh(), self.fresh(), self.fresh());
        let it = format!("vector<{lanes}xi32>");
        let lanes_text: Vec<String> = (0..lanes).map(|l| l.to_string()).collect();
        self.line(depth, &format!("{s32} = arith.index_cast {step} : index to i32"));
        self.line(depth, &format!("{splat} = vector.broadcast {s32} : i32 to {it}"));
        self.line(depth, &format!("{iota} = arith.constant dense<[{}]> : {it}", lanes_text.join(", ")));
        self.line(depth, &format!("{index} = arith.muli {iota}, {splat} : {it}"));
        let all = self.fresh();
        self.line(depth, &format!("{all} = vector.constant_mask [{lanes}] : vector<{lanes}xi1>"));
        (step, index, all)
    }

    /// A register tile of multiply-accumulates ([`Mma`]): `rows × cols/lanes` vector
    /// accumulators carried through the reduction loops (`scf.for` iter_args), each step one
    /// vector load of `B` per `lanes` columns, one broadcast of `a` per row and a `vector.fma` per
    /// accumulator; then `C` += the accumulators.
    fn mma(&mut self, depth: usize, m: &Mma) {
        let vt = format!("vector<{}xf32>", m.lanes);
        let mt = format!("vector<{}xi1>", m.lanes);
        let nv = m.cols / m.lanes;
        let n = m.rows * nv;
        let lanes = m.lanes as i64;
        // Masks for a partial tile: vector v holds clamp(valid − v·lanes, 0, lanes) columns.
        let masks: Option<Vec<String>> = (m.valid != Idx::Const(m.cols as i64)).then(|| {
            (0..nv)
                .map(|v| {
                    let left = Idx::Sub(Box::new(m.valid.clone()), Box::new(Idx::Const(v as i64 * lanes)));
                    let count = Idx::Max(
                        Box::new(Idx::Const(0)),
                        Box::new(Idx::Min(Box::new(Idx::Const(lanes)), Box::new(left))),
                    );
                    let c = self.idx(depth, &count.simplify());
                    let t = self.fresh();
                    self.line(depth, &format!("{t} = vector.create_mask {c} : {mt}"));
                    t
                })
                .collect()
        });
        let zero = self.fresh();
        self.line(depth, &format!("{zero} = arith.constant dense<0.0> : {vt}"));
        let tys = vec![vt.as_str(); n].join(", ");
        let mut accs = vec![zero.clone(); n];
        let mut results = Vec::new();
        for (lvl, (var, extent)) in m.red.iter().enumerate() {
            let d = depth + lvl;
            let (lo, e, step) = (self.idx(d, &Idx::Const(0)), self.idx(d, extent), self.idx(d, &Idx::Const(1)));
            let res = self.fresh();
            let args: Vec<String> = (0..n).map(|_| self.fresh()).collect();
            let iter: Vec<String> = args.iter().zip(&accs).map(|(a, x)| format!("{a} = {x}")).collect();
            self.line(
                d,
                &format!(
                    "{res}:{n} = scf.for %i{var} = {lo} to {e} step {step} iter_args({}) -> ({tys}) {{",
                    iter.join(", ")
                ),
            );
            results.push(res);
            accs = args;
        }
        let d = depth + m.red.len();
        let (bbuf, bflat) = (m.b.0, self.flat(m.b.0));
        let boff = self.flat_offset(d, bbuf, &m.b.1);
        let mask = |v: usize| masks.as_ref().map(|mk| mk[v].clone());
        let mut bvecs = Vec::new();
        for v in 0..nv {
            let off = self.offset_by(d, &boff, v as i64 * lanes);
            bvecs.push(self.vload(d, &bflat, &off, mask(v).as_deref(), m.lanes, &zero));
        }
        let mut new = Vec::new();
        for r in 0..m.rows {
            let a = self.val(d, &m.a.subst(m.row, &Idx::Const(r as i64)));
            let bc = self.fresh();
            self.line(d, &format!("{bc} = vector.broadcast {a} : f32 to {vt}"));
            for (v, bv) in bvecs.iter().enumerate() {
                let t = self.fresh();
                self.line(d, &format!("{t} = vector.fma {bc}, {bv}, {} : {vt}", accs[r * nv + v]));
                new.push(t);
            }
        }
        for (lvl, res) in results.iter().enumerate().rev() {
            self.line(depth + lvl + 1, &format!("scf.yield {} : {tys}", new.join(", ")));
            self.line(depth + lvl, "}");
            new = (0..n).map(|i| format!("{res}#{i}")).collect();
        }
        // C += the accumulators.
        let (cbuf, cflat) = (m.c.0, self.flat(m.c.0));
        let mut strided: Option<(String, String, String)> = None;
        for r in 0..m.rows {
            let index: Vec<Idx> = m.c.1.iter().map(|i| i.subst(m.row, &Idx::Const(r as i64)).simplify()).collect();
            let coff = self.flat_offset(depth, cbuf, &index);
            for v in 0..nv {
                let acc = &new[r * nv + v];
                if m.c_col == Idx::Const(1) {
                    let off = self.offset_by(depth, &coff, v as i64 * lanes);
                    let old = self.vload(depth, &cflat, &off, mask(v).as_deref(), m.lanes, &zero);
                    let sum = self.fresh();
                    self.line(depth, &format!("{sum} = arith.addf {old}, {acc} : {vt}"));
                    self.vstore(depth, &cflat, &off, mask(v).as_deref(), m.lanes, &sum);
                } else {
                    // Strided columns (no masks: the lowering gives such tiles full columns):
                    // a gather and a scatter per vector.
                    debug_assert!(masks.is_none(), "a partial tile with strided columns");
                    let (off, old, sum) = (self.fresh(), self.fresh(), self.fresh());
                    let first = self.idx(depth, &Idx::Const(v as i64 * lanes));
                    let (step, index, all) =
                        strided.get_or_insert_with(|| self.lane_offsets(depth, &m.c_col, m.lanes)).clone();
                    let skip = self.fresh();
                    self.line(depth, &format!("{skip} = arith.muli {first}, {step} : index"));
                    self.line(depth, &format!("{off} = arith.addi {coff}, {skip} : index"));
                    let it = format!("vector<{lanes}xi32>");
                    self.line(
                        depth,
                        &format!("{old} = vector.gather {cflat}[{off}][{index}], {all}, {zero} : memref<?xf32>, {it}, {mt}, {vt} into {vt}"),
                    );
                    self.line(depth, &format!("{sum} = arith.addf {old}, {acc} : {vt}"));
                    self.line(
                        depth,
                        &format!(
                            "vector.scatter {cflat}[{off}][{index}], {all}, {sum} : memref<?xf32>, {it}, {mt}, {vt}"
                        ),
                    );
                }
            }
        }
    }

    pub(crate) fn constant(&mut self, depth: usize, v: f64) -> String {
        let t = self.fresh();
        self.line(depth, &format!("{t} = arith.constant {} : f32", f32_literal(v)));
        t
    }

    /// `op` on two f32 values.
    fn f2(&mut self, depth: usize, op: &str, a: &str, b: &str) -> String {
        let t = self.fresh();
        // Products feeding sums may fuse into FMAs (the polynomials of exp, tanh, erf).
        let flags = if matches!(op, "arith.mulf" | "arith.addf" | "arith.subf") { " fastmath<contract>" } else { "" };
        self.line(depth, &format!("{t} = {op} {a}, {b}{flags} : f32"));
        t
    }

    /// `op` of `a` and the constant `c`.
    fn fk(&mut self, depth: usize, op: &str, a: &str, c: f64) -> String {
        let c = self.constant(depth, c);
        self.f2(depth, op, a, &c)
    }

    /// `coeffs[0]·x^(n-1) + … + coeffs[n-1]`, by Horner's rule.
    fn horner(&mut self, depth: usize, x: &str, coeffs: &[f64]) -> String {
        let mut p = self.constant(depth, coeffs[0]);
        for &c in &coeffs[1..] {
            let m = self.f2(depth, "arith.mulf", &p, x);
            p = self.fk(depth, "arith.addf", &m, c);
        }
        p
    }

    /// `if a <pred> bound { then } else { other }` for f32 values, branch-free.
    fn select_cmp(&mut self, depth: usize, pred: &str, a: &str, bound: f64, then: &str, other: &str) -> String {
        let b = self.constant(depth, bound);
        let (c, t) = (self.fresh(), self.fresh());
        self.line(depth, &format!("{c} = arith.cmpf {pred}, {a}, {b} : f32"));
        self.line(depth, &format!("{t} = arith.select {c}, {then}, {other} : f32"));
        t
    }

    /// `e^x` in straight-line code the loop vectorizer can widen (a libm call stops it):
    /// Cephes' range reduction `x = n·ln2 + r` and degree-7 polynomial, scaled by `2^n` with
    /// `ldexp` (one `vscalefps` on AVX-512), which also gives `+inf` on overflow and 0 (through
    /// subnormals) on underflow; within 2 ulp of libm. NaN stays NaN (the clamp propagates it).
    fn exp(&mut self, depth: usize, x: &str) -> String {
        let lo = self.fk(depth, "arith.maximumf", x, -104.0);
        let xc = self.fk(depth, "arith.minimumf", &lo, 89.0);
        let t = self.fk(depth, "arith.mulf", &xc, std::f64::consts::LOG2_E);
        let t = self.fk(depth, "arith.addf", &t, 0.5);
        let n = self.fresh();
        self.line(depth, &format!("{n} = math.floor {t} : f32"));
        let a = self.fk(depth, "arith.mulf", &n, 0.693359375);
        let r = self.f2(depth, "arith.subf", &xc, &a);
        let b = self.fk(depth, "arith.mulf", &n, -2.12194440e-4);
        let r = self.f2(depth, "arith.subf", &r, &b);
        let p = self.horner(
            depth,
            &r,
            &[1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1],
        );
        let rr = self.f2(depth, "arith.mulf", &r, &r);
        let p = self.f2(depth, "arith.mulf", &p, &rr);
        let p = self.f2(depth, "arith.addf", &p, &r);
        let p = self.fk(depth, "arith.addf", &p, 1.0);
        let ni = self.fresh();
        self.line(depth, &format!("{ni} = arith.fptosi {n} : f32 to i32"));
        if self.options.ldexp {
            let y = self.fresh();
            self.line(depth, &format!("{y} = llvm.intr.ldexp({p}, {ni}) : (f32, i32) -> f32"));
            return y;
        }
        // Else `p · 2^⌊n/2⌋ · 2^(n-⌊n/2⌋)`, both factors built in the exponent bits (integer
        // vector ops every vector unit has) and normal for the clamped n in [-150, 128]; the
        // products underflow through subnormals to 0 and overflow to +inf, as ldexp does.
        let (c127, c23, e, sh, scale) = (self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        self.line(depth, &format!("{c127} = arith.constant 127 : i32"));
        self.line(depth, &format!("{c23} = arith.constant 23 : i32"));
        let (half, rest, e2, sh2, scale2) = (self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        let two = self.fresh();
        self.line(depth, &format!("{two} = arith.constant 2 : i32"));
        self.line(depth, &format!("{half} = arith.divsi {ni}, {two} : i32"));
        self.line(depth, &format!("{rest} = arith.subi {ni}, {half} : i32"));
        self.line(depth, &format!("{e} = arith.addi {half}, {c127} : i32"));
        self.line(depth, &format!("{sh} = arith.shli {e}, {c23} : i32"));
        self.line(depth, &format!("{scale} = arith.bitcast {sh} : i32 to f32"));
        self.line(depth, &format!("{e2} = arith.addi {rest}, {c127} : i32"));
        self.line(depth, &format!("{sh2} = arith.shli {e2}, {c23} : i32"));
        self.line(depth, &format!("{scale2} = arith.bitcast {sh2} : i32 to f32"));
        let y = self.f2(depth, "arith.mulf", &p, &scale);
        self.f2(depth, "arith.mulf", &y, &scale2)
    }

    /// `x·P(x²)/Q(x²)` with `x` clamped to `±clamp` (the rational forms Eigen uses for tanh
    /// and erf: a few ulp, vectorizable).
    fn odd_rational(&mut self, depth: usize, x: &str, clamp: f64, p: &[f64], q: &[f64]) -> String {
        let lo = self.fk(depth, "arith.maximumf", x, -clamp);
        let xc = self.fk(depth, "arith.minimumf", &lo, clamp);
        let x2 = self.f2(depth, "arith.mulf", &xc, &xc);
        let pn = self.horner(depth, &x2, p);
        let pn = self.f2(depth, "arith.mulf", &pn, &xc);
        let qn = self.horner(depth, &x2, q);
        self.f2(depth, "arith.divf", &pn, &qn)
    }

    fn tanh(&mut self, depth: usize, x: &str) -> String {
        let r = self.odd_rational(
            depth,
            x,
            7.905_311,
            &[
                -2.76076847742355e-16,
                2.00018790482477e-13,
                -8.60467152213735e-11,
                5.12229709037114e-08,
                1.48572235717979e-05,
                6.37261928875436e-04,
                4.89352455891786e-03,
            ],
            &[1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03],
        );
        // Tiny inputs: tanh x = x (the rational form loses relative accuracy there).
        let a = self.fresh();
        self.line(depth, &format!("{a} = math.absf {x} : f32"));
        self.select_cmp(depth, "olt", &a, 0.0004, x, &r)
    }

    fn erf(&mut self, depth: usize, x: &str) -> String {
        self.odd_rational(
            depth,
            x,
            4.0,
            &[
                -2.72614225801306e-10,
                2.77068142495902e-08,
                -2.10102402082508e-06,
                -5.69250639462346e-05,
                -7.34990630326855e-04,
                -2.95459980854025e-03,
                -1.60960333262415e-02,
            ],
            &[
                -1.45660718464996e-05,
                -2.13374055278905e-04,
                -1.68282697438203e-03,
                -7.37332916720468e-03,
                -1.42647390514189e-02,
            ],
        )
    }

    /// `ln x` in straight-line code (for GPUs, which have no libm here): Cephes' `logf`
    /// (mantissa in [√½, √2), degree-8 polynomial); NaN below 0, -inf at 0, +inf at +inf.
    fn log(&mut self, depth: usize, x: &str) -> String {
        let (bits, e8, e, mbits, m) = (self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        let (c23, c126, cmask, chalf) = (self.fresh(), self.fresh(), self.fresh(), self.fresh());
        self.line(depth, &format!("{c23} = arith.constant 23 : i32"));
        self.line(depth, &format!("{c126} = arith.constant 126 : i32"));
        self.line(depth, &format!("{cmask} = arith.constant 8388607 : i32"));
        self.line(depth, &format!("{chalf} = arith.constant 1056964608 : i32"));
        self.line(depth, &format!("{bits} = arith.bitcast {x} : f32 to i32"));
        self.line(depth, &format!("{e8} = arith.shrui {bits}, {c23} : i32"));
        let ei = self.fresh();
        self.line(depth, &format!("{ei} = arith.subi {e8}, {c126} : i32"));
        self.line(depth, &format!("{e} = arith.sitofp {ei} : i32 to f32"));
        let low = self.fresh();
        self.line(depth, &format!("{low} = arith.andi {bits}, {cmask} : i32"));
        self.line(depth, &format!("{mbits} = arith.ori {low}, {chalf} : i32"));
        self.line(depth, &format!("{m} = arith.bitcast {mbits} : i32 to f32"));
        // m in [0.5, 1): below √½ use 2m − 1 and e − 1, else m − 1.
        let sqrthf = self.constant(depth, std::f64::consts::FRAC_1_SQRT_2);
        let small = self.fresh();
        self.line(depth, &format!("{small} = arith.cmpf olt, {m}, {sqrthf} : f32"));
        let twice = self.f2(depth, "arith.addf", &m, &m);
        let mm = self.fresh();
        self.line(depth, &format!("{mm} = arith.select {small}, {twice}, {m} : f32"));
        let r = self.fk(depth, "arith.subf", &mm, 1.0);
        let e1 = self.fk(depth, "arith.subf", &e, 1.0);
        let ee = self.fresh();
        self.line(depth, &format!("{ee} = arith.select {small}, {e1}, {e} : f32"));
        let z = self.f2(depth, "arith.mulf", &r, &r);
        let p = self.horner(
            depth,
            &r,
            &[
                7.0376836292e-2,
                -1.1514610310e-1,
                1.1676998740e-1,
                -1.2420140846e-1,
                1.4249322787e-1,
                -1.6668057665e-1,
                2.0000714765e-1,
                -2.4999993993e-1,
                3.3333331174e-1,
            ],
        );
        let y = self.f2(depth, "arith.mulf", &p, &z);
        let y = self.f2(depth, "arith.mulf", &y, &r);
        let t = self.fk(depth, "arith.mulf", &ee, -2.12194440e-4);
        let y = self.f2(depth, "arith.addf", &y, &t);
        let h = self.fk(depth, "arith.mulf", &z, 0.5);
        let y = self.f2(depth, "arith.subf", &y, &h);
        let y = self.f2(depth, "arith.addf", &r, &y);
        let t = self.fk(depth, "arith.mulf", &ee, 0.693359375);
        let y = self.f2(depth, "arith.addf", &y, &t);
        // Special values: x < 0 or NaN → NaN, 0 → -inf, +inf → +inf.
        let nan = self.constant(depth, f64::NAN);
        let y = self.select_cmp(depth, "ult", x, 0.0, &nan, &y);
        let ninf = self.constant(depth, f64::NEG_INFINITY);
        let y = self.select_cmp(depth, "oeq", x, 0.0, &ninf, &y);
        let pinf = self.constant(depth, f64::INFINITY);
        self.select_cmp(depth, "oeq", x, f64::INFINITY, &pinf, &y)
    }

    /// `a^b` for GPUs: small constant exponents as products (exact, as libm's), others as
    /// `exp(b·ln|a|)`, negated for a negative base and an odd integer exponent, NaN for a
    /// negative base and a fractional one, 1 for `b = 0`.
    fn pow(&mut self, depth: usize, a: &str, b: &Val) -> String {
        match b {
            Val::Const(c) if *c == 1.0 => return a.to_string(),
            Val::Const(c) if *c == 2.0 => return self.f2(depth, "arith.mulf", a, a),
            Val::Const(c) if *c == 3.0 => {
                let sq = self.f2(depth, "arith.mulf", a, a);
                return self.f2(depth, "arith.mulf", &sq, a);
            }
            Val::Const(c) if *c == 0.5 => {
                let t = self.fresh();
                self.line(depth, &format!("{t} = math.sqrt {a} : f32"));
                return t;
            }
            _ => {}
        }
        let b = self.val(depth, b);
        let abs = self.fresh();
        self.line(depth, &format!("{abs} = math.absf {a} : f32"));
        let l = self.log(depth, &abs);
        let bl = self.f2(depth, "arith.mulf", &b, &l);
        let r = self.exp(depth, &bl);
        // The exponent's integrality and parity (|b| < 2^31 where it matters).
        let fl = self.fresh();
        self.line(depth, &format!("{fl} = math.floor {b} : f32"));
        let (int, bi, odd_bit, even, one) = (self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        self.line(depth, &format!("{int} = arith.cmpf oeq, {fl}, {b} : f32"));
        self.line(depth, &format!("{bi} = arith.fptosi {fl} : f32 to i32"));
        self.line(depth, &format!("{one} = arith.constant 1 : i32"));
        self.line(depth, &format!("{odd_bit} = arith.andi {bi}, {one} : i32"));
        self.line(depth, &format!("{even} = arith.cmpi ne, {odd_bit}, {one} : i32"));
        let neg = self.fresh();
        self.line(depth, &format!("{neg} = arith.negf {r} : f32"));
        let signed = self.fresh();
        self.line(depth, &format!("{signed} = arith.select {even}, {r}, {neg} : f32"));
        let nan = self.constant(depth, f64::NAN);
        let on_neg = self.fresh();
        self.line(depth, &format!("{on_neg} = arith.select {int}, {signed}, {nan} : f32"));
        let y = self.select_cmp(depth, "olt", a, 0.0, &on_neg, &r);
        let one_f = self.constant(depth, 1.0);
        self.select_cmp(depth, "oeq", &b, 0.0, &one_f, &y)
    }

    pub(crate) fn val(&mut self, depth: usize, v: &Val) -> String {
        match v {
            Val::Const(c) => self.constant(depth, *c),
            Val::Load { buf, index } => {
                let ix: Vec<String> = index.iter().map(|i| self.idx(depth, i)).collect();
                let t = self.fresh();
                let elem = self.elem(*buf);
                let ty = memref_of(index.len(), elem);
                self.line(depth, &format!("{t} = memref.load %b{buf}[{}] : {ty}", ix.join(", ")));
                if elem == "f32" {
                    return t;
                }
                let f = self.fresh();
                self.line(depth, &format!("{f} = arith.uitofp {t} : {elem} to f32"));
                f
            }
            Val::Un(op, x) => {
                let x = self.val(depth, x);
                let t = self.fresh();
                let text = match op {
                    UnOp::Neg => format!("{t} = arith.negf {x} : f32"),
                    UnOp::Abs => format!("{t} = math.absf {x} : f32"),
                    UnOp::Exp => return self.exp(depth, &x),
                    UnOp::Log if self.options.gpu => return self.log(depth, &x),
                    UnOp::Log => format!("{t} = math.log {x} : f32"),
                    UnOp::Sqrt => format!("{t} = math.sqrt {x} : f32"),
                    UnOp::Tanh => return self.tanh(depth, &x),
                    UnOp::Erf => return self.erf(depth, &x),
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
                        let e = self.exp(depth, &n);
                        let d = self.fk(depth, "arith.addf", &e, 1.0);
                        let one = self.constant(depth, 1.0);
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
                let (identity, combine) = reduction(*op);
                let init = self.constant(depth, identity);
                let e = self.idx(depth, extent);
                let (lo, step) = (self.idx(depth, &Idx::Const(0)), self.idx(depth, &Idx::Const(1)));
                let (r, acc) = (self.fresh(), self.fresh());
                self.line(
                    depth,
                    &format!("{r} = scf.for %i{var} = {lo} to {e} step {step} iter_args({acc} = {init}) -> (f32) {{"),
                );
                let v = self.val(depth + 1, body);
                let n = self.fresh();
                // Reassociation lets LLVM vectorize the reduction (partial sums per lane).
                self.line(depth + 1, &format!("{n} = {combine} {acc}, {v} fastmath<reassoc,contract> : f32"));
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
            Val::Select { lhs, rhs, then, other } => {
                let (l, r) = (self.idx(depth, lhs), self.idx(depth, rhs));
                let (a, b) = (self.val(depth, then), self.val(depth, other));
                let (c, t) = (self.fresh(), self.fresh());
                self.line(depth, &format!("{c} = arith.cmpi slt, {l}, {r} : index"));
                self.line(depth, &format!("{t} = arith.select {c}, {a}, {b} : f32"));
                t
            }
            Val::Where { cond, then, other } => {
                let cond = self.val(depth, cond);
                let (a, b) = (self.val(depth, then), self.val(depth, other));
                let zero = self.constant(depth, 0.0);
                let (c, t) = (self.fresh(), self.fresh());
                self.line(depth, &format!("{c} = arith.cmpf une, {cond}, {zero} : f32"));
                self.line(depth, &format!("{t} = arith.select {c}, {a}, {b} : f32"));
                t
            }
            Val::Bin(BinOp::Pow, a, b) if self.options.gpu => {
                let a = self.val(depth, a);
                self.pow(depth, &a, b)
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
                // A row-invariant divisor becomes one reciprocal and multiplies (`arcp`);
                // `contract` allows fused multiply-adds.
                let flags = match op {
                    BinOp::Div => " fastmath<arcp,contract>",
                    BinOp::Add | BinOp::Sub | BinOp::Mul => " fastmath<contract>",
                    _ => "",
                };
                let t = self.fresh();
                self.line(depth, &format!("{t} = {name} {a}, {b}{flags} : f32"));
                t
            }
        }
    }

    pub(crate) fn stmts(&mut self, depth: usize, body: &[Stmt]) {
        for s in body {
            match s {
                Stmt::For { var, extent, body, parallel } => {
                    let (lo, e) = if *parallel && self.split == Some(depth) {
                        ("%lo".to_string(), "%hi".to_string())
                    } else {
                        (self.idx(depth, &Idx::Const(0)), self.idx(depth, extent))
                    };
                    let step = self.idx(depth, &Idx::Const(1));
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
                Stmt::Mma(m) => self.mma(depth, m),
            }
        }
    }
}

/// The buffers [`Mma`] tiles address by flat offset (each gets a one-dimensional view).
fn flat_buffers(body: &[Stmt], out: &mut BTreeSet<usize>) {
    for s in body {
        match s {
            Stmt::For { body, .. } => flat_buffers(body, out),
            Stmt::Mma(m) => {
                out.insert(m.b.0);
                out.insert(m.c.0);
            }
            Stmt::Store { .. } | Stmt::Let { .. } => {}
        }
    }
}

/// The loop a kernel's threads share, if it has one: its depth, the extents of the loops
/// around it and its own extent. Either the kernel's top-level statements are all parallel
/// loops over one extent (each thread runs them all over its own range), or the top is a
/// chain of single loops down to a parallel one (threads split it when the loops around it
/// run once, e.g. a batch of 1).
pub fn split_loop(k: &Kernel) -> Option<(usize, Vec<&Idx>, &Idx)> {
    if k.body.len() > 1 {
        let mut extent = None;
        for s in &k.body {
            match s {
                Stmt::For { parallel: true, extent: e, .. } if extent.is_none_or(|x| x == e) => extent = Some(e),
                _ => return None,
            }
        }
        return extent.map(|e| (0, Vec::new(), e));
    }
    let mut outer = Vec::new();
    let mut s = k.body.first()?;
    loop {
        match s {
            Stmt::For { parallel: true, extent, .. } => return Some((outer.len(), outer, extent)),
            Stmt::For { extent, body, .. } if body.len() == 1 => {
                outer.push(extent);
                s = &body[0];
            }
            _ => return None,
        }
    }
}

/// The kernel as an MLIR function of upstream dialects, named after the kernel, taking every
/// buffer (inputs, then outputs) as a dynamically sized memref, then `%lo, %hi: index`: the
/// range of the shared parallel loop ([`split_loop`]) this call runs (ignored by a kernel
/// without one).
///
/// The buffers are `llvm.noalias`: a kernel's outputs never overlap its inputs or each other
/// (the JIT allocates each output; the AOT arena gives tensors live at the same kernel disjoint
/// ranges). Inputs may be the same tensor twice: they are only read.
pub fn to_mlir(k: &Kernel) -> String {
    to_mlir_with(k, MlirOptions::default())
}

/// The machine-dependent choices of the MLIR a kernel becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlirOptions {
    /// `e^x` scales by `2^n` with `llvm.intr.ldexp` (one `vscalefps` on AVX-512), else by
    /// multiplying with `2^n` built in the exponent bits: RISC-V has no ldexp instruction, and
    /// LLVM makes a vector ldexp one `ldexpf` call per element there.
    pub ldexp: bool,
    /// Code for a GPU kernel ([`to_gpu_func`]): `log` and `pow` in straight-line code (the
    /// NVPTX and AMDGPU backends have no libm; LLVM aborts on `llvm.pow` for NVPTX).
    pub gpu: bool,
}

impl Default for MlirOptions {
    /// The host's (`cpu`).
    fn default() -> MlirOptions {
        MlirOptions { ldexp: true, gpu: false }
    }
}

impl MlirOptions {
    /// The options for code compiled for `code`.
    pub fn for_code(code: &crate::jit::CodeTarget) -> MlirOptions {
        MlirOptions { ldexp: !code.triple.starts_with("riscv"), gpu: false }
    }
}

/// [`to_mlir`] with machine-dependent `options`.
pub fn to_mlir_with(k: &Kernel, options: MlirOptions) -> String {
    let mut params: Vec<String> = k
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("%b{i}: {} {{llvm.noalias}}", memref_of(b.shape.len(), elem_type(b.dtype))))
        .collect();
    params.push("%lo: index".into());
    params.push("%hi: index".into());
    let split = split_loop(k).map(|(depth, _, _)| depth);
    let mut e = Emitter { k, out: String::new(), next: 0, slots: HashMap::new(), split, options };
    emit_body(&mut e, false);
    format!(
        "func.func @{}({}) attributes {{ llvm.emit_c_interface }} {{\n{}  return\n}}\n",
        k.name,
        params.join(", "),
        e.out
    )
}

/// The kernel as a `gpu.func` kernel (MLIR's `gpu` dialect), to be placed in a `gpu.module`:
/// every buffer a dynamically sized memref (inputs, then outputs), no other parameter. The
/// shared parallel loop ([`split_loop`]) is mapped to the grid: thread
/// `block_id.x · block_dim.x + thread_id.x` runs its iteration `lo` (`lo..min(lo + 1,
/// extent)`: threads past the extent run none), the loops around it whole. A kernel without
/// one runs whole in every thread it is launched with (one: [`gpu_launch_extent`] says so).
/// With `cols` (a divisor of the extent: the loop enumerates `rows × cols` row-major, as a
/// flattened loop does) the grid is two-dimensional instead: the thread at column
/// `block_id.x · block_dim.x + thread_id.x` (below `cols`) and row `block_id.y · block_dim.y +
/// thread_id.y` runs iteration `row · cols + col`.
/// Local buffers live on each thread's stack (`memref.alloca`).
pub fn to_gpu_func(k: &Kernel, options: MlirOptions, cols: Option<&Idx>) -> String {
    let params: Vec<String> = k
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("%b{i}: {}", memref_of(b.shape.len(), elem_type(b.dtype))))
        .collect();
    let shared = split_loop(k);
    let split = shared.as_ref().map(|(depth, _, _)| *depth);
    let options = MlirOptions { gpu: true, ..options };
    let mut e = Emitter { k, out: String::new(), next: 0, slots: HashMap::new(), split, options };
    e.line(0, "%gpu_block = gpu.block_id x");
    e.line(0, "%gpu_block_dim = gpu.block_dim x");
    e.line(0, "%gpu_thread = gpu.thread_id x");
    e.line(0, "%gpu_base = arith.muli %gpu_block, %gpu_block_dim : index");
    let cols = cols.filter(|_| shared.is_some());
    match cols {
        Some(c) => {
            e.line(0, "%gpu_col = arith.addi %gpu_base, %gpu_thread : index");
            e.line(0, "%gpu_block_y = gpu.block_id y");
            e.line(0, "%gpu_block_dim_y = gpu.block_dim y");
            e.line(0, "%gpu_thread_y = gpu.thread_id y");
            e.line(0, "%gpu_base_y = arith.muli %gpu_block_y, %gpu_block_dim_y : index");
            e.line(0, "%gpu_row = arith.addi %gpu_base_y, %gpu_thread_y : index");
            let c = e.idx(0, c);
            e.line(0, &format!("%gpu_row_base = arith.muli %gpu_row, {c} : index"));
            e.line(0, "%lo = arith.addi %gpu_row_base, %gpu_col : index");
            e.line(0, &format!("%gpu_in_row = arith.cmpi slt, %gpu_col, {c} : index"));
        }
        None => e.line(0, "%lo = arith.addi %gpu_base, %gpu_thread : index"),
    }
    e.line(0, "%gpu_one = arith.constant 1 : index");
    e.line(0, "%gpu_next = arith.addi %lo, %gpu_one : index");
    if cols.is_some() {
        // A column past the row's end runs nothing.
        e.line(0, "%gpu_end = arith.select %gpu_in_row, %gpu_next, %lo : index");
    }
    match shared {
        Some((_, _, extent)) => {
            let x = e.idx(0, extent);
            let end = if cols.is_some() { "%gpu_end" } else { "%gpu_next" };
            e.line(0, &format!("%hi = arith.minsi {end}, {x} : index"));
        }
        None => e.line(0, "%hi = arith.addi %gpu_next, %gpu_one : index"),
    }
    emit_body(&mut e, true);
    format!("gpu.func @{}({}) kernel {{\n{}  gpu.return\n}}\n", k.name, params.join(", "), e.out)
}

/// The number of threads a GPU launch of `k` needs ([`to_gpu_func`]): the extent of its
/// shared parallel loop, or 1 without one.
pub fn gpu_launch_extent(k: &Kernel) -> Option<&Idx> {
    split_loop(k).map(|(_, _, e)| e)
}

/// Locals, one-dimensional views, the statements and the locals' release: the body of a
/// kernel's function. `stack`: locals on the stack (a GPU thread's), else on the heap.
fn emit_body(e: &mut Emitter, stack: bool) {
    let k = e.k;
    // Local buffers: allocated once per call (per thread), freed at the end.
    for (i, l) in k.locals.iter().enumerate() {
        let sizes: Vec<String> = l.size.iter().map(|d| e.idx(0, d)).collect();
        let n = k.buffers.len() + i;
        let op = if stack { "memref.alloca" } else { "memref.alloc" };
        e.line(0, &format!("%b{n} = {op}({}) : {}", sizes.join(", "), memref(l.size.len())));
    }
    let mut flat = BTreeSet::new();
    flat_buffers(&k.body, &mut flat);
    for buf in flat {
        let r = e.rank(buf);
        if r > 1 {
            let all: Vec<String> = (0..r).map(|d| d.to_string()).collect();
            e.line(
                0,
                &format!(
                    "%f{buf} = memref.collapse_shape %b{buf} [[{}]] : {} into memref<?xf32>",
                    all.join(", "),
                    memref(r)
                ),
            );
        }
    }
    e.stmts(0, &k.body);
    if !stack {
        for (i, l) in k.locals.iter().enumerate() {
            e.line(0, &format!("memref.dealloc %b{} : {}", k.buffers.len() + i, memref(l.size.len())));
        }
    }
}

/// Threads native kernels use (0: every core); see [`set_threads`].
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many threads native kernels run on (`None`: every core); process-wide, like
/// onnxruntime's intra-op thread count.
pub fn set_threads(n: Option<usize>) {
    THREADS.store(n.unwrap_or(0), Ordering::Relaxed);
}

/// Threads native kernels run on now.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Below this many output elements a kernel without inner loops runs on one thread. Starting
/// spinning workers costs well under a microsecond (`pool`), but a worker's share must come
/// from the caller's cache and go back to it: on 2 cores a chain of 13 one-loop kernels breaks
/// even at about 16K elements and gains from 32K on (66 vs 80 us at 32K, 115 vs 150 us at 64K).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// The value of an index expression given the buffers' run-time shapes (outer loop variables
/// do not occur in the extents this is used for).
pub(crate) fn eval_idx(i: &Idx, shapes: &[&[usize]]) -> Option<i64> {
    let dim = |buf: usize, axis: usize| shapes.get(buf).and_then(|s| s.get(axis)).map(|&n| n as i64);
    i.eval(&|_| None, &dim, ByZero::Fail).ok()
}

/// Whether a statement list has a loop or reduction inside its top-level loop's body (work
/// per iteration beyond one element).
fn heavy(body: &[Stmt]) -> bool {
    fn val(v: &Val) -> bool {
        match v {
            Val::Reduce { .. } => true,
            Val::Un(_, a) => val(a),
            Val::Bin(_, a, b) => val(a) || val(b),
            Val::IfLess { then, other, .. } | Val::Select { then, other, .. } => val(then) || val(other),
            Val::Where { cond, then, other } => val(cond) || val(then) || val(other),
            _ => false,
        }
    }
    body.iter().any(|s| match s {
        Stmt::For { body, .. } => body.iter().any(|s| matches!(s, Stmt::For { .. } | Stmt::Mma(_))) || heavy(body),
        Stmt::Store { value, .. } | Stmt::Let { value, .. } => val(value),
        Stmt::Mma(_) => true,
    })
}

/// Pointers into descriptors that live for the duration of one call, shared by its threads.
struct Packed(Vec<*mut i64>);
// SAFETY: the descriptors are only read by the kernel (the data they point at is written at
// disjoint indices by the threads of one call, each over its own range of the parallel loop).
unsafe impl Sync for Packed {}

impl Packed {
    fn pointers(&self) -> Vec<*mut i64> {
        self.0.clone()
    }
}

/// One launch of a kernel, planned from the graph op's operands the same way for every
/// [`Backend`]: the tensors its input buffers read, its outputs' shapes (symbolic dims bound
/// by the inputs) and the extent of its shared parallel loop.
pub struct Launch<'a> {
    pub kernel: &'a Kernel,
    /// The input buffers' tensors: f32, or bool (read by the kernel as one `i8` per element).
    pub inputs: Vec<&'a Tensor>,
    /// The output buffers' shapes (outputs are f32).
    pub outputs: Vec<Vec<usize>>,
    /// The extent of the loop a call's `lo..hi` range covers ([`split_loop`]; 0 without one):
    /// a call with `lo = 0, hi = extent` runs the whole kernel.
    pub extent: i64,
    /// Whether the loops around the shared loop run once, so that calls over disjoint ranges
    /// of it split the whole kernel (between threads).
    pub splittable: bool,
    /// Whether the kernel works beyond one element per iteration ([`heavy`]): worth splitting
    /// even when its outputs are small.
    pub heavy: bool,
}

impl<'a> Launch<'a> {
    /// Plans `kernel` on the graph op's `operands` (the kernel reads the ones its
    /// `operands` list names, shaped as its input buffers declare): checks dtypes, ranks and
    /// known dims, binds symbolic dims (consistently across inputs) and sizes the outputs.
    pub fn new(kernel: &'a Kernel, operands: &[&'a Tensor], heavy: bool) -> Result<Launch<'a>, TargetError> {
        let k = kernel;
        let inputs: Vec<&Tensor> = k
            .operands
            .iter()
            .map(|&i| {
                operands.get(i).copied().ok_or_else(|| {
                    TargetError::Codegen(format!("kernel {} reads operand {i}, got {}", k.name, operands.len()))
                })
            })
            .collect::<Result<_, _>>()?;
        if let Some(t) = inputs.iter().find(|t| !matches!(t.data, Data::F32(_) | Data::Bool(_))) {
            return Err(TargetError::Codegen(format!("kernel {}: a {} buffer", k.name, t.dtype())));
        }
        let outputs = output_shapes(k, &inputs)?;
        let all: Vec<&[usize]> =
            inputs.iter().map(|t| t.shape.as_slice()).chain(outputs.iter().map(Vec::as_slice)).collect();
        let computable = |e: &Idx| {
            eval_idx(e, &all)
                .ok_or_else(|| TargetError::Codegen(format!("kernel {}: the extent {e} is not computable", k.name)))
        };
        // The shared loop's extent, and whether the loops around it run once (else one call
        // runs the whole kernel, its split loop over all of its range each time; a kernel
        // without a shared loop is never split).
        let (extent, splittable) = match split_loop(k) {
            Some((_, outer, e)) => {
                let mut alone = true;
                for o in outer {
                    alone &= computable(o)? == 1;
                }
                (computable(e)?, alone)
            }
            None => (0, false),
        };
        Ok(Launch { kernel, inputs, outputs, extent, splittable, heavy })
    }
}

/// Where a [`NativeModel`]'s kernels execute: in process ([`JitBackend`], the `cpu` target) or
/// in a runner on another machine (`rvv`'s kernel runner under qemu). A backend is built once
/// per model from the MLIR module of its kernels ([`Build`]).
pub trait Backend {
    /// Runs function `function` (an index into the functions the backend was built with) for
    /// `launch`; returns the outputs, f32, shaped as `launch.outputs`.
    fn launch(&self, function: usize, launch: &Launch) -> Result<Vec<Tensor>, TargetError>;
}

/// Builds a [`Backend`] from a model's kernels: the MLIR module of upstream dialects and the
/// names of its kernel functions, in the order [`Backend::launch`] numbers them.
pub type Build<'b> = &'b dyn Fn(&str, &[String]) -> Result<Box<dyn Backend>, TargetError>;

/// Kernels JIT-compiled in process for the host, each call's shared loop split over
/// [`threads`] (the `cpu` target's backend).
pub struct JitBackend {
    entries: Vec<Entry>,
    // The entry points point into it.
    _jit: Jit,
}

impl JitBackend {
    /// Compiles `mlir` for the host; `functions` are its kernel functions in launch order.
    pub fn compile(mlir: &str, functions: &[String]) -> Result<JitBackend, TargetError> {
        let jit = Jit::compile(mlir)?;
        let entries = functions
            .iter()
            .map(|f| {
                jit.entry(f).ok_or_else(|| {
                    TargetError::Codegen(format!("no function {f} with a C interface in the compiled module"))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(JitBackend { entries, _jit: jit })
    }
}

/// One memref descriptor per input of `l`, over the tensor's own data: f32, or bools as one
/// byte per element, 0 or 1 (the kernel reads them as `i8`).
fn input_memrefs(l: &Launch) -> Result<Vec<MemRef>, TargetError> {
    l.inputs
        .iter()
        .map(|t| match &t.data {
            Data::F32(d) => Ok(MemRef::new(d.as_ptr(), d.len(), &t.shape)),
            Data::Bool(d) => Ok(MemRef::new(d.as_ptr().cast(), d.len(), &t.shape)),
            _ => Err(TargetError::Codegen(format!("kernel {}: a {} buffer", l.kernel.name, t.dtype()))),
        })
        .collect()
}

impl JitBackend {
    /// The compiled function `function` of `l`'s kernel.
    fn entry(&self, function: usize, l: &Launch) -> Result<Entry, TargetError> {
        self.entries.get(function).copied().ok_or_else(|| {
            TargetError::Codegen(format!("kernel {}: no function {function} (a kiln bug)", l.kernel.name))
        })
    }

    /// Runs function `function` for `launch` once per `(lo, hi)` range of its shared parallel
    /// loop, one call after another, into outputs first filled with NaN (elements no call
    /// stores stay NaN): a GPU launch's threads emulated on the host, each thread's range as
    /// its `gpu.func` computes it ([`to_gpu_func`]).
    pub fn launch_ranges(
        &self,
        function: usize,
        l: &Launch,
        ranges: &mut dyn Iterator<Item = (i64, i64)>,
    ) -> Result<Vec<Tensor>, TargetError> {
        self.entry(function, l)?;
        let mut outs: Vec<Vec<f32>> = l.outputs.iter().map(|shape| vec![f32::NAN; shape.iter().product()]).collect();
        let mut args = input_memrefs(l)?;
        for (o, s) in outs.iter_mut().zip(&l.outputs) {
            args.push(MemRef::of(o, s));
        }
        let mut ptrs: Vec<*mut i64> = args.iter_mut().map(MemRef::as_mut_ptr).collect();
        // SAFETY: as in `launch`: the function was generated from this kernel (one memref per
        // buffer over live data of its shape, then the range).
        unsafe { self.call_ranges(function, &mut ptrs, ranges)? };
        drop(args);
        Ok(outs.into_iter().zip(&l.outputs).map(|(o, s)| Tensor::from_f32(s, o)).collect())
    }

    /// Calls function `function` once per `(lo, hi)` range of its shared parallel loop on the
    /// memref descriptors `descriptors` (one per buffer); a range past the loop's extent runs
    /// no iteration.
    ///
    /// # Safety
    /// Each descriptor must describe live memory of its sizes and strides, of the element type
    /// and rank of the function's buffer in that position, writable for output buffers.
    pub unsafe fn call_ranges(
        &self,
        function: usize,
        descriptors: &mut [*mut i64],
        ranges: &mut dyn Iterator<Item = (i64, i64)>,
    ) -> Result<(), TargetError> {
        let entry = *self
            .entries
            .get(function)
            .ok_or_else(|| TargetError::Codegen(format!("no function {function} (a kiln bug)")))?;
        for (mut lo, mut hi) in ranges {
            let mut packed: Vec<*mut ()> = descriptors.iter_mut().map(|p| p as *mut *mut i64 as *mut ()).collect();
            packed.push(&mut lo as *mut i64 as *mut ());
            packed.push(&mut hi as *mut i64 as *mut ());
            // SAFETY: the caller's descriptors fit the function (one per buffer, then the range).
            unsafe { (entry.0)(packed.as_mut_ptr()) };
        }
        Ok(())
    }
}

/// The parameters of a block-synchronous kernel's function ([`crate::gpu_tile`],
/// [`crate::gpu_rows`]): a memref per buffer, `noalias` in the host mapping.
pub(crate) fn block_params(k: &Kernel, gpu: bool) -> Vec<String> {
    let noalias = if gpu { "" } else { " {llvm.noalias}" };
    k.buffers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("%b{i}: {}{noalias}", memref_of(b.shape.len(), elem_type(b.dtype))))
        .collect()
}

/// A block-synchronous GPU kernel built for the host: the host mapping of a GEMM tile
/// ([`crate::gpu_tile`]) or a row kernel ([`crate::gpu_rows`]), a function over blocks
/// `%lo..%hi` whose phases are loops over each block's threads, run one block at a time.
pub struct HostBlocks {
    kernel: Kernel,
    grid: [u64; 3],
    threads: u64,
    backend: JitBackend,
}

impl HostBlocks {
    /// `text` (the host mapping of `kernel`, launched on `grid` blocks of `threads` threads)
    /// compiled for the host.
    pub fn compile(kernel: Kernel, text: &str, grid: [u64; 3], threads: u64) -> Result<HostBlocks, TargetError> {
        let backend = JitBackend::compile(text, std::slice::from_ref(&kernel.name))?;
        Ok(HostBlocks { kernel, grid, threads, backend })
    }

    /// The launch's grid.
    pub fn grid(&self) -> [u64; 3] {
        self.grid
    }

    /// Threads a block (one-dimensional).
    pub fn threads(&self) -> u64 {
        self.threads
    }

    fn blocks(&self) -> i64 {
        self.grid.iter().product::<u64>() as i64
    }

    /// Runs the launch over buffers given as strided memref descriptors (as a GPU launch
    /// receives them), block by block.
    ///
    /// # Safety
    /// `descriptors` are the kernel's buffers in order, each a valid descriptor of its rank
    /// over memory of its size.
    pub unsafe fn call_blocks(&self, descriptors: &mut [*mut i64]) -> Result<(), TargetError> {
        // SAFETY: the caller's guarantee; function 0 is this kernel.
        unsafe { self.backend.call_ranges(0, descriptors, &mut (0..self.blocks()).map(|b| (b, b + 1))) }
    }

    /// Runs the launch as the GPU would, block by block (x fastest, then y, then z), each
    /// block's threads phase by phase, into outputs first filled with NaN.
    pub fn run(&self, operands: &[&Tensor]) -> Result<Vec<Tensor>, TargetError> {
        let l = Launch::new(&self.kernel, operands, true)?;
        self.backend.launch_ranges(0, &l, &mut (0..self.blocks()).map(|b| (b, b + 1)))
    }
}

/// The `(lo, hi)` range of the shared parallel loop (of `extent` iterations) each thread of a
/// GPU launch of `grid` × `block` threads (x, y) runs, block by block, thread by thread: for a
/// one-dimensional launch thread `t` runs `t..min(t + 1, extent)`; for a two-dimensional one
/// ([`to_gpu_func`] with `cols`) the thread at column `col` and row `row` runs `row · cols +
/// col` when `col < cols`. Ranges past the extent are empty.
pub fn gpu_thread_ranges(
    grid: [u64; 2],
    block: [u64; 2],
    cols: Option<i64>,
    extent: i64,
) -> impl Iterator<Item = (i64, i64)> {
    let (gx, gy, bx, by) = (grid[0] as i64, grid[1] as i64, block[0] as i64, block[1] as i64);
    (0..gy * gx * by * bx).map(move |t| {
        let (blk, thr) = (t / (by * bx), t % (by * bx));
        match cols {
            Some(cols) => {
                let (row, col) = ((blk / gx) * by + thr / bx, (blk % gx) * bx + thr % bx);
                let lo = row * cols + col;
                (lo, if col < cols { (lo + 1).min(extent) } else { lo })
            }
            None => (t, (t + 1).min(extent)),
        }
    })
}

impl Backend for JitBackend {
    fn launch(&self, function: usize, l: &Launch) -> Result<Vec<Tensor>, TargetError> {
        let entry = self.entry(function, l)?;
        let mut outs: Vec<Vec<f32>> = l
            .outputs
            .iter()
            // Not zeroed: a kernel stores every element of its outputs (the kernel dialect's
            // contract), before anything reads them.
            .map(|shape| Vec::with_capacity(shape.iter().product()))
            .collect();
        let mut args = input_memrefs(l)?;
        for (o, s) in outs.iter_mut().zip(&l.outputs) {
            args.push(MemRef::new(o.as_mut_ptr(), s.iter().product(), s));
        }
        let extent = l.extent;
        let elements: usize = l.outputs.iter().map(|s| s.iter().product::<usize>()).sum();
        let threads = threads();
        let worth = l.heavy || elements >= PARALLEL_MIN_ELEMENTS;
        let chunks = if l.splittable && extent > 1 && threads > 1 && worth { threads.min(extent as usize) } else { 1 };
        let descriptors = Packed(args.iter_mut().map(MemRef::as_mut_ptr).collect());
        let call = |c: usize| {
            let (mut lo, mut hi) = ((extent as usize * c / chunks) as i64, (extent as usize * (c + 1) / chunks) as i64);
            let mut ptrs = descriptors.pointers();
            let mut packed: Vec<*mut ()> = ptrs.iter_mut().map(|p| p as *mut *mut i64 as *mut ()).collect();
            packed.push(&mut lo as *mut i64 as *mut ());
            packed.push(&mut hi as *mut i64 as *mut ());
            // SAFETY: the function was generated from this kernel: one memref per buffer (f32,
            // or i8 over a bool slice) of the buffer's rank, then the loop range; inputs are
            // only read, and the calls of one run write disjoint ranges of the outputs'
            // parallel loop. Indices stay within the descriptors' sizes when the inputs'
            // shapes satisfy the model's shape rules (checked by `Launch::new` for known dims
            // and shared symbols; a dim broadcast against another symbol is 1 or equal, as
            // the kernel's producers guarantee).
            unsafe { (entry.0)(packed.as_mut_ptr()) };
        };
        if chunks == 1 {
            call(0);
        } else {
            // The calling thread runs the first share; a pool of `threads - 1` the others.
            crate::pool::shared(threads - 1).run(chunks, &call);
        }
        drop(args);
        Ok(outs
            .into_iter()
            .zip(&l.outputs)
            .map(|(mut o, s)| {
                // SAFETY: the kernel stored every element (the kernel dialect's contract); the
                // capacity is exactly the element count.
                unsafe { o.set_len(s.iter().product()) };
                Tensor::from_f32(s, o)
            })
            .collect())
    }
}

/// The shapes of kernel `k`'s outputs for `inputs` (its input buffers' tensors, in order): each
/// input is checked against its buffer (dtype, rank, known dims, one size per symbol), and the
/// outputs' symbolic dims take the sizes the inputs bind.
pub(crate) fn output_shapes(k: &Kernel, inputs: &[&Tensor]) -> Result<Vec<Vec<usize>>, TargetError> {
    let mut bind: HashMap<&str, usize> = HashMap::new();
    for (t, b) in inputs.iter().zip(&k.buffers) {
        if t.dtype() != b.dtype || t.rank() != b.shape.len() {
            return Err(TargetError::Codegen(format!(
                "kernel {} input {}: expected {} of rank {}, got {} of rank {}",
                k.name,
                b.name,
                b.dtype,
                b.shape.len(),
                t.dtype(),
                t.rank()
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
    k.outputs()
        .iter()
        .map(|b| {
            b.shape
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => Ok(*n as usize),
                    Dim::Sym(s) => bind.get(&**s).copied().ok_or_else(|| {
                        TargetError::Codegen(format!("kernel {}: output dim '{s}' is bound by no input", k.name))
                    }),
                })
                .collect()
        })
        .collect()
}

/// The output shapes kernel `k` makes from `inputs` (tensors for its input buffers, in
/// order): symbolic dims bound by the inputs.
pub fn kernel_output_shapes(k: &Kernel, inputs: &[&Tensor]) -> Result<Vec<Vec<usize>>, TargetError> {
    output_shapes(k, inputs)
}

/// A kernel compiled to native code on its own.
pub struct NativeKernel {
    kernel: Kernel,
    heavy: bool,
    backend: JitBackend,
}

impl NativeKernel {
    pub fn compile(kernel: Kernel) -> Result<NativeKernel, TargetError> {
        // Allocation behaves as in a whole model (tuning measures kernels this way).
        keep_freed_memory();
        let backend = JitBackend::compile(&to_mlir(&kernel), std::slice::from_ref(&kernel.name))?;
        Ok(NativeKernel { heavy: heavy(&kernel.body), kernel, backend })
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Runs the kernel on the graph op's `operands` (the kernel reads the f32 ones, shaped as
    /// its input buffers declare); the outputs' sizes come from the inputs' bindings of the
    /// symbolic dims.
    pub fn run(&self, operands: &[&Tensor]) -> Result<Vec<Tensor>, TargetError> {
        self.backend.launch(0, &Launch::new(&self.kernel, operands, self.heavy)?)
    }

    /// [`NativeKernel::run`] as a GPU launch of `threads` threads would run it, emulated on the
    /// host: thread `t` runs the shared parallel loop's range `t..min(t + 1, extent)` (none
    /// past the extent), one thread after another ([`JitBackend::launch_ranges`]). Returns
    /// the outputs and the loop's extent.
    pub fn run_as_gpu(&self, operands: &[&Tensor], threads: u64) -> Result<(Vec<Tensor>, i64), TargetError> {
        let l = Launch::new(&self.kernel, operands, self.heavy)?;
        let extent = l.extent;
        let mut ranges = gpu_thread_ranges([threads, 1], [1, 1], None, extent);
        Ok((self.backend.launch_ranges(0, &l, &mut ranges)?, extent))
    }

    /// [`NativeKernel::run_as_gpu`] for a two-dimensional launch ([`to_gpu_func`] with
    /// `cols`): `grid` × `block` threads (x, y), the one at column `col` and row `row` running
    /// `row · cols + col..` one iteration when `col < cols` (none past the extent), block by
    /// block, thread by thread.
    pub fn run_as_gpu_2d(
        &self,
        operands: &[&Tensor],
        grid: [u64; 2],
        block: [u64; 2],
        cols: i64,
    ) -> Result<(Vec<Tensor>, i64), TargetError> {
        let l = Launch::new(&self.kernel, operands, self.heavy)?;
        let extent = l.extent;
        let mut ranges = gpu_thread_ranges(grid, block, Some(cols), extent);
        Ok((self.backend.launch_ranges(0, &l, &mut ranges)?, extent))
    }
}

/// How a [`NativeModel`] computes a top-level op other than through the interpreter's
/// semantics.
enum Step {
    /// A constant: its value, shared by every run.
    Constant(std::rc::Rc<Tensor>),
    /// A kernel compiled to native code: function `function` of the model's [`Backend`];
    /// `planted` adds 0.5 to every element it outputs ([`PLANT_BUG_ENV`]).
    Kernel { kernel: Kernel, function: usize, heavy: bool, planted: bool },
}

/// The environment variable that plants a wrong kernel, for testing `kiln run --check`: its
/// value names a node; the native kernel computing it adds 0.5 to every element it outputs.
pub const PLANT_BUG_ENV: &str = "KILN_DEBUG_WRONG_KERNEL";

/// The ops of `m` that launch a kernel, in program order, with the names every stage gives
/// their kernels (`--emit kernel`, host-kernel lists, profiles, AOT).
pub fn launched_kernels(m: &kiln_ir::Module) -> Vec<(kiln_ir::ir::OpId, String)> {
    m.body
        .ops
        .iter()
        .copied()
        .filter(|&o| kiln_passes::fusion::launches_kernel(m, o))
        .enumerate()
        .map(|(i, o)| (o, kernel_name(i, m.op(o).op_type())))
        .collect()
}

/// The MLIR of `kernels` as one module, each set of identical kernels (repeated blocks of a
/// network) emitted once; and for each kernel, the function that computes it.
pub fn module_text<'k>(kernels: impl IntoIterator<Item = &'k Kernel>, options: MlirOptions) -> (String, Vec<String>) {
    let mut functions: HashMap<String, String> = HashMap::new();
    let mut text = String::new();
    let mut function_of = Vec::new();
    for k in kernels {
        let key = format!("{:?}", Kernel { name: String::new(), ..k.clone() });
        let f = functions.entry(key).or_insert_with(|| {
            text.push_str(&to_mlir_with(k, options));
            k.name.clone()
        });
        function_of.push(f.clone());
    }
    (text, function_of)
}

/// The name kernel `i` (counting launched kernels in program order) of op type `op` gets.
fn kernel_name(i: usize, op: &str) -> String {
    format!("k{i}_{}", op.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

/// A whole model as native code: every kernel of the (fused) graph that lowers to the kernel
/// dialect is compiled (all in one MLIR module and one JIT), constants stay in place, views
/// and shape arithmetic are evaluated on the host. A kernel that does not lower yet runs on
/// the host's reference implementation and is listed ([`NativeModel::host_kernels`]), the
/// way an execution provider hands unsupported nodes back. Runs go through the interpreter's
/// driver ([`kiln_ir::interp::run_custom`]): its input checks, value lifetimes and error
/// messages, with the kernels and constants supplied here.
pub struct NativeModel {
    module: kiln_ir::Module,
    steps: HashMap<kiln_ir::ir::OpId, Step>,
    host: Vec<HostKernel>,
    /// Where the kernels run (`None` when no kernel lowers).
    backend: Option<Box<dyn Backend>>,
}

/// A planted bug's output: 0.5 added to every element.
fn plant_bug(t: Tensor) -> Tensor {
    let values = t.as_f32().expect("kernel outputs are f32").iter().map(|x| x + 0.5).collect();
    Tensor::from_f32(&t.shape, values)
}

/// Keeps freed tensor memory in the process (glibc): kernel outputs of a few MB would otherwise
/// be fresh `mmap`s, page-faulted in on every run (a third of a LayerNorm's time). Set once,
/// process-wide, like onnxruntime's arena; allocations over 32 MiB are still mapped.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only tunes glibc's allocator; called once, before kernels run.
        ONCE.call_once(|| unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
        });
    }
}

impl NativeModel {
    /// Compiles `m` for the host: its kernels JIT-compiled in process ([`JitBackend`]).
    pub fn compile(m: &kiln_ir::Module) -> Result<NativeModel, TargetError> {
        NativeModel::compile_tuned(m, &crate::Tuned::default())
    }

    /// [`NativeModel::compile`] with tuned schedules for the kernels whose workload is in
    /// `tuned` (the host's default schedule for the others).
    pub fn compile_tuned(m: &kiln_ir::Module, tuned: &crate::Tuned) -> Result<NativeModel, TargetError> {
        let jit: Build = &|mlir, functions| Ok(Box::new(JitBackend::compile(mlir, functions)?));
        let schedules = Schedules { default: crate::cpu::schedule().clone(), tuned: tuned.clone() };
        NativeModel::compile_with(m, &schedules, MlirOptions::default(), jit)
    }

    /// Compiles `m`, each kernel lowered with its schedule from `schedules` (tuned, or the
    /// target's default tile sizes) and emitted with `options`, on the backend `build` makes
    /// from their MLIR module.
    pub fn compile_with(
        m: &kiln_ir::Module,
        schedules: &Schedules,
        options: MlirOptions,
        build: Build,
    ) -> Result<NativeModel, TargetError> {
        keep_freed_memory();
        use kiln_passes::fusion::{classify, OpClass};
        let planted = std::env::var(PLANT_BUG_ENV).ok();
        let mut steps = HashMap::new();
        let mut kernels: Vec<(kiln_ir::ir::OpId, Kernel)> = Vec::new();
        let mut host = Vec::new();
        for &o in &m.body.ops {
            let op = m.op(o);
            if classify(m, o) == OpClass::Constant {
                if let Some(kiln_ir::attr::Attr::Tensor(t)) = op.attrs.get("value") {
                    steps.insert(o, Step::Constant(std::rc::Rc::new(t.clone())));
                }
            }
        }
        for (o, name) in launched_kernels(m) {
            let op = m.op(o);
            match kiln_passes::lower::lower_with(m, o, &name, &schedules.for_op(m, o)) {
                Ok(k) => kernels.push((o, k)),
                Err(why) => {
                    host.push(HostKernel { name, node: op.node_name().to_string(), op: op.op_type().to_string(), why })
                }
            }
        }
        let backend = if kernels.is_empty() {
            None
        } else {
            // Identical kernels (repeated blocks of a network) are compiled once.
            let (text, function_of) = module_text(kernels.iter().map(|(_, k)| k), options);
            let mut functions: Vec<String> = Vec::new();
            for ((o, kernel), f) in kernels.into_iter().zip(function_of) {
                let function = functions.iter().position(|g| *g == f).unwrap_or_else(|| {
                    functions.push(f);
                    functions.len() - 1
                });
                let planted = planted.as_deref() == Some(m.op(o).node_name());
                steps.insert(o, Step::Kernel { heavy: heavy(&kernel.body), kernel, function, planted });
            }
            Some(build(&text, &functions)?)
        };
        Ok(NativeModel { module: m.clone(), steps, host, backend })
    }

    /// Kernels that run as native code.
    pub fn kernels(&self) -> usize {
        self.steps.values().filter(|s| matches!(s, Step::Kernel { .. })).count()
    }

    /// Kernels that run on the host's reference implementation (not lowered yet).
    pub fn host_kernels(&self) -> &[HostKernel] {
        &self.host
    }

    /// Runs the model on inputs ordered as its graph inputs.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        self.run_observed(inputs, &mut |_, _| {}).map(|(outs, _)| outs)
    }

    /// [`NativeModel::run`], showing `observe` each top-level op's outputs as they are made;
    /// also returns the run's statistics.
    pub fn run_observed(
        &self,
        inputs: Vec<Tensor>,
        observe: &mut dyn FnMut(kiln_ir::ir::OpId, &[std::rc::Rc<Tensor>]),
    ) -> Result<(Vec<Tensor>, kiln_ir::interp::RunStats), TargetError> {
        use std::rc::Rc;
        // Omitted operands are no buffer of a kernel: an empty stand-in keeps the positions.
        let omitted = Tensor::from_f32(&[0], vec![]);
        let native = |o: kiln_ir::ir::OpId, operands: &[Option<&Tensor>]| {
            Some(match self.steps.get(&o)? {
                Step::Constant(t) => Ok(vec![t.clone()]),
                Step::Kernel { kernel, function, heavy, planted } => {
                    let refs: Vec<&Tensor> = operands.iter().map(|t| t.unwrap_or(&omitted)).collect();
                    let backend = self.backend.as_ref().expect("a model with kernels has a backend");
                    Launch::new(kernel, &refs, *heavy)
                        .and_then(|l| backend.launch(*function, &l))
                        .map(|outs| if *planted { outs.into_iter().map(plant_bug).collect() } else { outs })
                        .map_err(|e| kiln_ir::graph::OpError(e.to_string()))
                        .map(|outs| outs.into_iter().map(Rc::new).collect())
                }
            })
        };
        Ok(kiln_ir::interp::run_custom(&self.module, inputs, observe, &native)?)
    }
}
