//! Guarded matrix tiles: an [`Mma`] whose `a` picks between a load and zero by conditions on
//! its innermost reduction variable (a direct Conv's edge tile: the taps that fall in the
//! padding read zero, the load's index is clamped in bounds) becomes one single-row tile per
//! row, each over the taps its row keeps, with the load unguarded and unclamped. Those are
//! plain matrix tiles.

use super::affine;
use kiln_ir::kernel::{Idx, Mma, Val};
use std::collections::HashMap;

/// Loop variables of the kept taps.
const TAP: usize = usize::MAX - 400;

/// The single-row tiles of a guarded tile, or `None` when `a` does not have that form.
pub fn split(m: &Mma) -> Option<Vec<Mma>> {
    let (kx, extent) = m.red.last()?.clone();
    let mut out = Vec::new();
    for r in 0..m.rows {
        let row = Idx::Const(r as i64);
        let a = m.a.subst(m.row, &row);
        // The path to the load: its conditions, each with the branch taken.
        let mut path = Vec::new();
        let load = find_load(&a, &mut path)?;
        let (mut lo, mut hi) = (Idx::Const(0), extent.clone());
        for (lhs, rhs, taken) in path {
            let d = affine::lin(&Idx::Sub(Box::new(lhs), Box::new(rhs)), &HashMap::new());
            if d.opaque_in(kx) {
                return None;
            }
            let s = d.coef(kx);
            let base = d.to_idx(&[kx]);
            let neg = |e: Idx| Idx::Sub(Box::new(Idx::Const(0)), Box::new(e));
            let plus = |e: Idx, k: i64| Idx::Add(Box::new(e), Box::new(Idx::Const(k)));
            // base + s·kx < 0 holds (taken) or not.
            match (s, taken) {
                (1, true) => hi = min(hi, neg(base)),
                (1, false) => lo = max(lo, neg(base)),
                (-1, true) => lo = max(lo, plus(base, 1)),
                (-1, false) => hi = min(hi, plus(base, 1)),
                (0, _) => {
                    // The whole row or none of it: base < 0 keeps it when taken.
                    let all = min(Idx::Const(1), max(Idx::Const(0), neg(base.clone())));
                    let keep = if taken { all } else { Idx::Sub(Box::new(Idx::Const(1)), Box::new(all)) };
                    hi = min(hi, Idx::Mul(Box::new(keep), Box::new(extent.clone())));
                }
                _ => return None,
            }
        }
        let tap = TAP - r;
        let by = Idx::Add(Box::new(Idx::Var(tap)), Box::new(lo.clone()));
        let Val::Load { buf, index } = load else { return None };
        // Only the indices along the guarded taps lose their clamp.
        let index = index
            .iter()
            .map(|i| {
                let i = i.subst(kx, &by);
                if i.uses(tap) {
                    unclamp(&i).simplify()
                } else {
                    i.simplify()
                }
            })
            .collect();
        let mut red = m.red.clone();
        let last = red.len() - 1;
        red[last] = (tap, max(Idx::Const(0), Idx::Sub(Box::new(hi), Box::new(lo))).simplify());
        out.push(Mma {
            rows: 1,
            cols: m.cols,
            lanes: m.lanes,
            valid: m.valid.subst(m.row, &row),
            row: m.row,
            red,
            a: Val::Load { buf, index },
            b: (m.b.0, m.b.1.iter().map(|i| i.subst(kx, &by).simplify()).collect()),
            c: (m.c.0, m.c.1.iter().map(|i| i.subst(m.row, &row).simplify()).collect()),
            c_col: m.c_col.clone(),
        });
    }
    Some(out)
}

fn min(a: Idx, b: Idx) -> Idx {
    Idx::Min(Box::new(a), Box::new(b))
}

fn max(a: Idx, b: Idx) -> Idx {
    Idx::Max(Box::new(a), Box::new(b))
}

/// The one load of `a` (the other leaves zero), with the conditions on the way to it.
fn find_load(a: &Val, path: &mut Vec<(Idx, Idx, bool)>) -> Option<Val> {
    match a {
        Val::Load { .. } => Some(a.clone()),
        Val::IfLess { lhs, rhs, then, other } | Val::Select { lhs, rhs, then, other } => {
            let zero = |v: &Val| matches!(v, Val::Const(c) if *c == 0.0);
            if zero(other) {
                path.push((lhs.clone(), rhs.clone(), true));
                find_load(then, path)
            } else if zero(then) {
                path.push((lhs.clone(), rhs.clone(), false));
                find_load(other, path)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// `e` for `max(0, min(e, k))` and its mirror images (a clamp the kept taps never need).
fn unclamp(i: &Idx) -> Idx {
    let zero = |x: &Idx| matches!(x, Idx::Const(0));
    match i {
        Idx::Max(a, b) => match (&**a, &**b) {
            (z, Idx::Min(e, _)) | (Idx::Min(e, _), z) if zero(z) => return unclamp(e),
            _ => {}
        },
        Idx::Min(a, b) => match (&**a, &**b) {
            (Idx::Max(z, e), _) | (Idx::Max(e, z), _) if zero(z) => return unclamp(e),
            _ => {}
        },
        _ => {}
    }
    i.map_operands(&mut unclamp)
}
