//! Sliding-window ops as element expressions: pooling (MaxPool, AveragePool, LpPool and their
//! Global forms) and LRN.
//!
//! Each output element is a [`Val::Reduce`] nest over its window (one loop per spatial axis, so
//! the windows' loops nest inside the kernel's elementwise loop nest and need no per-row
//! scalars). Padding is never materialized: a tap outside the input is the reduction's
//! identity (−∞ for max, 0 for sums), chosen by [`Val::IfLess`] on the tap's position in the
//! padded input (signed, and the load only runs in bounds). The checks are left out along axes
//! whose windows all stay inside the input, which is the common unpadded case.

use super::{add, b, mul, LowerResult, Lowering};
use kiln_ir::graph::AttrView;
use kiln_ir::ir::OpId;
use kiln_ir::kernel::{BinOp, Idx, RedOp, UnOp, Val};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Max,
    Avg,
    Lp,
}

/// One spatial axis of a pooling window.
struct Axis {
    /// Input length (run time for global pooling).
    len: Idx,
    kernel: Idx,
    stride: i64,
    dil: i64,
    /// Padding before the input.
    pad: i64,
    /// Whether some tap lies before the input (after it).
    below: bool,
    above: bool,
    /// Known input length and end padding, when the window can leave the input.
    known: Option<(i64, i64)>,
    /// Taps of the last window beyond the padded input (ceil mode), when some are.
    beyond_pads: bool,
}

/// `(pad_begin, pad_end, out_len)` along an axis of length `len`, as the interpreter computes
/// them (`auto_pad`, explicit pads, `ceil_mode`).
fn axis_geometry(
    auto_pad: &str,
    (k, s, d): (i64, i64, i64),
    (pb, pe): (i64, i64),
    ceil: bool,
    len: i64,
) -> LowerResult<(i64, i64, i64)> {
    let ek = (k - 1) * d + 1;
    match auto_pad {
        "SAME_UPPER" | "SAME_LOWER" => {
            let out = (len + s - 1) / s;
            let total = ((out.max(1) - 1) * s + ek - len).max(0);
            let small = total / 2;
            Ok(if auto_pad == "SAME_UPPER" { (small, total - small, out) } else { (total - small, small, out) })
        }
        "VALID" => {
            if len < ek {
                return Err("a pooling window longer than its input".into());
            }
            Ok((0, 0, (len - ek) / s + 1))
        }
        "NOTSET" => {
            let padded = len + pb + pe;
            if padded < ek {
                return Err("a pooling window longer than its padded input".into());
            }
            let mut out = if ceil { (padded - ek + s - 1) / s + 1 } else { (padded - ek) / s + 1 };
            if ceil && (out - 1) * s >= len + pb {
                out -= 1;
            }
            Ok((pb, pe, out))
        }
        other => Err(format!("auto_pad {other} is not lowered")),
    }
}

impl Lowering<'_> {
    /// A pooling op's output element `idx`: a reduction over its window.
    pub(super) fn pool(&self, o: OpId, idx: &[Idx]) -> LowerResult<Val> {
        let op = self.m.op(o);
        let t = op.op_type();
        let attrs = AttrView(&op.attrs);
        let kind = match t {
            "MaxPool" | "GlobalMaxPool" => Kind::Max,
            "AveragePool" | "GlobalAveragePool" => Kind::Avg,
            _ => Kind::Lp,
        };
        let xv = op.operands.first().copied().flatten().ok_or_else(|| format!("{t}: no input"))?;
        let xs = self.shape(xv)?.to_vec();
        let out = self.shape(op.results[0])?.to_vec();
        if !(3..=5).contains(&xs.len()) || out.len() != xs.len() || idx.len() != xs.len() {
            return Err(format!("{t} of a rank-{} value is not lowered", xs.len()));
        }
        let nsp = xs.len() - 2;
        let p = attrs.int("p", 2).map_err(|e| e.0)?;
        let mut axes = Vec::with_capacity(nsp);
        if t.starts_with("Global") {
            for d in &xs[2..] {
                let len = self.dim(d)?;
                axes.push(Axis {
                    len: len.clone(),
                    kernel: len,
                    stride: 1,
                    dil: 1,
                    pad: 0,
                    below: false,
                    above: false,
                    known: None,
                    beyond_pads: false,
                });
            }
        } else {
            let ints = |name: &str, n: usize, fill: i64| -> LowerResult<Vec<i64>> {
                let v = attrs.ints(name).map_err(|e| e.0)?.unwrap_or_else(|| vec![fill; n]);
                if v.len() != n || v.iter().any(|&x| x < 0) {
                    return Err(format!("{t}: bad attribute '{name}' {v:?}"));
                }
                Ok(v)
            };
            let kernel = attrs.ints("kernel_shape").map_err(|e| e.0)?.ok_or("kernel_shape is required")?;
            if kernel.len() != nsp || kernel.iter().any(|&k| k <= 0) {
                return Err(format!("{t}: bad kernel_shape {kernel:?}"));
            }
            let (strides, dils, pads) =
                (ints("strides", nsp, 1)?, ints("dilations", nsp, 1)?, ints("pads", 2 * nsp, 0)?);
            if strides.contains(&0) || dils.contains(&0) {
                return Err(format!("{t}: zero strides or dilations"));
            }
            let auto_pad = attrs.string("auto_pad", "NOTSET").map_err(|e| e.0)?;
            let ceil = attrs.int("ceil_mode", 0).map_err(|e| e.0)? != 0;
            for i in 0..nsp {
                let len =
                    xs[2 + i].known().ok_or_else(|| format!("{t} over a symbolic spatial dim is not lowered"))? as i64;
                let (k, s, d) = (kernel[i], strides[i], dils[i]);
                let (pb, pe, n) = axis_geometry(&auto_pad, (k, s, d), (pads[i], pads[i + nsp]), ceil, len)?;
                if out[2 + i].known() != Some(n as u64) {
                    return Err(format!("{t}: output dim {} is not the window count {n}", out[2 + i]));
                }
                // Positions in the padded input run over [0, last].
                let last = (n - 1) * s + (k - 1) * d;
                axes.push(Axis {
                    len: Idx::Const(len),
                    kernel: Idx::Const(k),
                    stride: s,
                    dil: d,
                    pad: pb,
                    below: pb > 0,
                    above: last >= len + pb,
                    known: Some((len, pe)),
                    beyond_pads: last >= len + pb + pe,
                });
            }
        }
        // The window's loop variables and the input element each tap reads.
        let vars: Vec<usize> = axes.iter().map(|_| self.fresh_var()).collect();
        let pos: Vec<Idx> = axes
            .iter()
            .zip(&vars)
            .enumerate()
            .map(|(i, (a, &v))| {
                Idx::Add(
                    b(Idx::Mul(b(idx[2 + i].clone()), b(Idx::Const(a.stride)))),
                    b(Idx::Mul(b(Idx::Var(v)), b(Idx::Const(a.dil)))),
                )
                .simplify()
            })
            .collect();
        let mut at = idx[..2].to_vec();
        at.extend(pos.iter().zip(&axes).map(|(q, a)| Idx::Sub(b(q.clone()), b(Idx::Const(a.pad))).simplify()));
        let e = self.value(xv, &at)?;
        let mut body = match (kind, p) {
            (Kind::Lp, 1) => Val::Un(UnOp::Abs, Box::new(e)),
            (Kind::Lp, 2) => mul(e.clone(), e),
            (Kind::Lp, p) => {
                Val::Bin(BinOp::Pow, Box::new(Val::Un(UnOp::Abs, Box::new(e))), Box::new(Val::Const(p as f64)))
            }
            _ => e,
        };
        let (red, identity) = match kind {
            Kind::Max => (RedOp::Max, f64::NEG_INFINITY),
            _ => (RedOp::Sum, 0.0),
        };
        for ((a, &v), q) in axes.iter().zip(&vars).zip(&pos).rev() {
            if a.above {
                let end = Idx::Add(b(a.len.clone()), b(Idx::Const(a.pad))).simplify();
                body = Val::IfLess {
                    lhs: q.clone(),
                    rhs: end,
                    then: Box::new(body),
                    other: Box::new(Val::Const(identity)),
                };
            }
            if a.below {
                body = Val::IfLess {
                    lhs: q.clone(),
                    rhs: Idx::Const(a.pad),
                    then: Box::new(Val::Const(identity)),
                    other: Box::new(body),
                };
            }
            body = Val::Reduce { op: red, var: v, extent: a.kernel.clone(), body: Box::new(body) };
        }
        match kind {
            Kind::Max => Ok(body),
            Kind::Lp => Ok(match p {
                1 => body,
                2 => Val::Un(UnOp::Sqrt, Box::new(body)),
                p => Val::Bin(BinOp::Pow, Box::new(body), Box::new(Val::Const(1.0 / p as f64))),
            }),
            Kind::Avg => {
                let include_pad = attrs.int("count_include_pad", 0).map_err(|e| e.0)? != 0;
                let mut whole = Idx::Const(1);
                let mut count: Option<Val> = None;
                for (i, a) in axes.iter().enumerate() {
                    let partial = if include_pad { a.beyond_pads } else { a.below || a.above };
                    match (partial, a.known) {
                        (true, Some((len, pe))) => {
                            let (lo, hi) = if include_pad { (0, len + a.pad + pe) } else { (a.pad, len + a.pad) };
                            let k = a.kernel.clone();
                            let Idx::Const(k) = k else { unreachable!("windows with known inputs have known kernels") };
                            let c = self.taps(&idx[2 + i], a.stride, a.dil, k, lo, hi);
                            count = Some(match count {
                                Some(n) => mul(n, c),
                                None => c,
                            });
                        }
                        _ => whole = Idx::Mul(b(whole), b(a.kernel.clone())),
                    }
                }
                let mut n = Val::FromIdx(whole.simplify());
                if let Some(c) = count {
                    n = mul(n, c);
                }
                Ok(Val::Bin(BinOp::Div, Box::new(body), Box::new(n)))
            }
        }
    }

    /// How many taps `t` in `0..k` of the window at output position `o` lie in `[lo, hi)` of
    /// the padded input (`o·s + t·d` is the tap's position), as a float.
    fn taps(&self, o: &Idx, s: i64, d: i64, k: i64, lo: i64, hi: i64) -> Val {
        let start = Val::FromIdx(Idx::Mul(b(o.clone()), b(Idx::Const(s))).simplify());
        let sub = |c: i64, x: Val| Val::Bin(BinOp::Sub, Box::new(Val::Const(c as f64)), Box::new(x));
        let over_d = |x: Val, round: UnOp| {
            if d == 1 {
                x
            } else {
                Val::Un(round, Box::new(Val::Bin(BinOp::Div, Box::new(x), Box::new(Val::Const(d as f64)))))
            }
        };
        // First tap: max(0, ceil((lo - start) / d)) (0 when lo is 0); last: min(k - 1,
        // floor((hi - 1 - start) / d)).
        let first = if lo == 0 {
            Val::Const(0.0)
        } else {
            Val::Bin(BinOp::Max, Box::new(Val::Const(0.0)), Box::new(over_d(sub(lo, start.clone()), UnOp::Ceil)))
        };
        let last = Val::Bin(
            BinOp::Min,
            Box::new(Val::Const((k - 1) as f64)),
            Box::new(over_d(sub(hi - 1, start), UnOp::Floor)),
        );
        let n = add(Val::Bin(BinOp::Sub, Box::new(last), Box::new(first)), Val::Const(1.0));
        Val::Bin(BinOp::Max, Box::new(Val::Const(0.0)), Box::new(n))
    }

    /// LRN's output element `idx`: `x / (bias + α/size · Σ x²)^β`, the sum over the `size`
    /// channels around `idx`'s, clamped to the channels there are.
    pub(super) fn lrn(&self, o: OpId, idx: &[Idx]) -> LowerResult<Val> {
        let op = self.m.op(o);
        let attrs = AttrView(&op.attrs);
        let xv = op.operands.first().copied().flatten().ok_or("LRN: no input")?;
        let xs = self.shape(xv)?.to_vec();
        if xs.len() < 2 || idx.len() != xs.len() {
            return Err("LRN of a value of rank below 2".into());
        }
        let size = attrs.int("size", 0).map_err(|e| e.0)?;
        if size < 1 {
            return Err("LRN with a size below 1".into());
        }
        let f = |n: &str, d: f32| attrs.float(n, d).map(f64::from).map_err(|e| e.0);
        let (alpha, beta, bias) = (f("alpha", 1e-4)?, f("beta", 0.75)?, f("bias", 1.0)?);
        let lo = (size - 1) / 2;
        // Channel ch - lo + t for t in 0..size, as position ch + t of a channel axis padded by lo.
        let v = self.fresh_var();
        let q = Idx::Add(b(idx[1].clone()), b(Idx::Var(v))).simplify();
        let mut at = idx.to_vec();
        at[1] = Idx::Sub(b(q.clone()), b(Idx::Const(lo))).simplify();
        let e = self.value(xv, &at)?;
        let mut sq = Val::IfLess {
            lhs: q.clone(),
            rhs: Idx::Add(b(self.dim(&xs[1])?), b(Idx::Const(lo))).simplify(),
            then: Box::new(mul(e.clone(), e)),
            other: Box::new(Val::Const(0.0)),
        };
        if lo > 0 {
            sq = Val::IfLess { lhs: q, rhs: Idx::Const(lo), then: Box::new(Val::Const(0.0)), other: Box::new(sq) };
        }
        let sum = Val::Reduce { op: RedOp::Sum, var: v, extent: Idx::Const(size), body: Box::new(sq) };
        // The interpreter rounds α/size to f32 before scaling the sum.
        let k = (alpha / size as f64) as f32 as f64;
        let den =
            Val::Bin(BinOp::Pow, Box::new(add(Val::Const(bias), mul(Val::Const(k), sum))), Box::new(Val::Const(beta)));
        Ok(Val::Bin(BinOp::Div, Box::new(self.value(xv, idx)?), Box::new(den)))
    }
}

#[cfg(test)]
mod tests {
    use super::axis_geometry;

    #[test]
    fn window_geometry_follows_the_interpreter() {
        // (pad_begin, pad_end, out) for a window of 3 (stride 2) over 7: explicit pads.
        assert_eq!(axis_geometry("NOTSET", (3, 2, 1), (1, 1), false, 7), Ok((1, 1, 4)));
        // Ceil mode adds a last window that starts inside the input...
        assert_eq!(axis_geometry("NOTSET", (2, 2, 1), (0, 0), true, 3), Ok((0, 0, 2)));
        // ...but not one that would start in the end padding.
        assert_eq!(axis_geometry("NOTSET", (3, 2, 1), (1, 1), true, 4), Ok((1, 1, 3)));
        assert_eq!(axis_geometry("NOTSET", (1, 2, 1), (0, 1), true, 3), Ok((0, 1, 2)));
        // SAME pads split the total, the odd one after (UPPER) or before (LOWER) the input.
        assert_eq!(axis_geometry("SAME_UPPER", (2, 1, 1), (0, 0), false, 5), Ok((0, 1, 5)));
        assert_eq!(axis_geometry("SAME_LOWER", (2, 1, 1), (0, 0), false, 5), Ok((1, 0, 5)));
        assert_eq!(axis_geometry("VALID", (3, 1, 2), (9, 9), false, 7), Ok((0, 0, 3)));
        assert!(axis_geometry("VALID", (3, 1, 3), (0, 0), false, 6).is_err());
    }
}
