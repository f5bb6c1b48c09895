//! Index analysis at concrete shapes: folding sizes to constants, value ranges, and affine
//! forms (`Σ cᵢ·xᵢ + c₀` over loop variables, with non-affine parts kept as opaque atoms).

use kiln_ir::kernel::{Idx, Kernel, Mma, Stmt, Val};
use std::collections::HashMap;

/// `i` with every `Dim` replaced by its size (`shapes`: parameters then locals).
pub fn fold(i: &Idx, shapes: &[Vec<usize>]) -> Idx {
    i.map(&mut |x| match x {
        Idx::Dim { buf, axis } => match shapes.get(buf).and_then(|s| s.get(axis)) {
            Some(&n) => Idx::Const(n as i64),
            None => x,
        },
        x => x,
    })
}

/// Applies `f` to every index of a value (an index that becomes a constant, a constant).
pub fn map_val(v: &Val, f: &dyn Fn(&Idx) -> Idx) -> Val {
    v.map_idx(&mut |i| f(i)).map(&mut |x| match x {
        Val::FromIdx(Idx::Const(c)) => Val::Const(c as f64),
        x => x,
    })
}

/// Applies `f` to every index of a statement.
pub fn map_stmt(s: &Stmt, f: &dyn Fn(&Idx) -> Idx) -> Stmt {
    match s {
        Stmt::For { var, extent, parallel, body } => Stmt::For {
            var: *var,
            extent: f(extent),
            parallel: *parallel,
            body: body.iter().map(|s| map_stmt(s, f)).collect(),
        },
        Stmt::Store { buf, index, value } => {
            Stmt::Store { buf: *buf, index: index.iter().map(f).collect(), value: map_val(value, f) }
        }
        Stmt::Let { slot, value } => Stmt::Let { slot: *slot, value: map_val(value, f) },
        Stmt::Mma(m) => Stmt::Mma(Box::new(Mma {
            valid: f(&m.valid),
            red: m.red.iter().map(|(v, e)| (*v, f(e))).collect(),
            a: map_val(&m.a, f),
            b: (m.b.0, m.b.1.iter().map(f).collect()),
            c: (m.c.0, m.c.1.iter().map(f).collect()),
            c_col: f(&m.c_col),
            ..(**m).clone()
        })),
    }
}

/// `v` with every buffer number `b` replaced by `map(b)`.
pub fn remap_val(v: &Val, map: &dyn Fn(usize) -> usize) -> Val {
    v.map(&mut |x| match x {
        Val::Load { buf, index } => Val::Load { buf: map(buf), index },
        x => x,
    })
}

/// `s` with every buffer number `b` replaced by `map(b)` (sizes are folded already).
pub fn remap_buffers(s: &Stmt, map: &dyn Fn(usize) -> usize) -> Stmt {
    match s {
        Stmt::For { var, extent, parallel, body } => Stmt::For {
            var: *var,
            extent: extent.clone(),
            parallel: *parallel,
            body: body.iter().map(|s| remap_buffers(s, map)).collect(),
        },
        Stmt::Store { buf, index, value } => {
            Stmt::Store { buf: map(*buf), index: index.clone(), value: remap_val(value, map) }
        }
        Stmt::Let { slot, value } => Stmt::Let { slot: *slot, value: remap_val(value, map) },
        Stmt::Mma(m) => Stmt::Mma(Box::new(Mma {
            a: remap_val(&m.a, map),
            b: (map(m.b.0), m.b.1.clone()),
            c: (map(m.c.0), m.c.1.clone()),
            ..(**m).clone()
        })),
    }
}

/// The kernel with every size folded and every index simplified.
pub fn fold_kernel(k: &Kernel, shapes: &[Vec<usize>]) -> Kernel {
    let f = |i: &Idx| fold(i, shapes).simplify();
    Kernel { body: k.body.iter().map(|s| map_stmt(s, &f)).collect(), ..k.clone() }
}

/// The inclusive range of `e`'s values, given exclusive upper bounds of the variables (each
/// variable runs from 0); `None` when unbounded.
pub fn range(e: &Idx, vars: &HashMap<usize, i64>) -> Option<(i64, i64)> {
    let r = |x: &Idx| range(x, vars);
    Some(match e {
        Idx::Var(v) => (0, vars.get(v)?.checked_sub(1)?.max(0)),
        Idx::Const(c) => (*c, *c),
        Idx::Dim { .. } => return None,
        Idx::Add(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            (a.0.checked_add(b.0)?, a.1.checked_add(b.1)?)
        }
        Idx::Sub(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            (a.0.checked_sub(b.1)?, a.1.checked_sub(b.0)?)
        }
        Idx::Mul(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            let p = [a.0.checked_mul(b.0)?, a.0.checked_mul(b.1)?, a.1.checked_mul(b.0)?, a.1.checked_mul(b.1)?];
            (*p.iter().min()?, *p.iter().max()?)
        }
        Idx::Div(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            if b.0 <= 0 {
                return None;
            }
            let p = [a.0.div_euclid(b.0), a.0.div_euclid(b.1), a.1.div_euclid(b.0), a.1.div_euclid(b.1)];
            (*p.iter().min()?, *p.iter().max()?)
        }
        Idx::Rem(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            if b.0 <= 0 {
                return None;
            }
            if a.0 >= 0 && a.1 < b.0 {
                a
            } else {
                (0, b.1 - 1)
            }
        }
        Idx::Min(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            (a.0.min(b.0), a.1.min(b.1))
        }
        Idx::Max(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            (a.0.max(b.0), a.1.max(b.1))
        }
        Idx::ZeroIfOne(a, b) => {
            let (a, b) = (r(a)?, r(b)?);
            if a == (1, 1) {
                (0, 0)
            } else if a.0 > 1 || a.1 < 1 {
                b
            } else {
                (b.0.min(0), b.1.max(0))
            }
        }
    })
}

/// An affine form `Σ coef·var + Σ coef·atom + c` (atoms: non-affine sub-indices).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Lin {
    pub vars: Vec<(usize, i64)>,
    pub atoms: Vec<(Idx, i64)>,
    pub c: i64,
}

impl Lin {
    fn konst(c: i64) -> Lin {
        Lin { c, ..Lin::default() }
    }

    fn atom(i: Idx) -> Lin {
        Lin { atoms: vec![(i, 1)], ..Lin::default() }
    }

    pub fn is_const(&self) -> bool {
        self.vars.is_empty() && self.atoms.is_empty()
    }

    /// The coefficient of variable `v`.
    pub fn coef(&self, v: usize) -> i64 {
        self.vars.iter().find(|(x, _)| *x == v).map_or(0, |x| x.1)
    }

    /// Whether an atom mentions `v` (then the form is not affine in `v`).
    pub fn opaque_in(&self, v: usize) -> bool {
        self.atoms.iter().any(|(a, _)| a.uses(v))
    }

    fn add(mut self, o: Lin, sign: i64) -> Lin {
        self.c = self.c.wrapping_add(o.c.wrapping_mul(sign));
        for (v, c) in o.vars {
            match self.vars.iter_mut().find(|(x, _)| *x == v) {
                Some(e) => e.1 += c * sign,
                None => self.vars.push((v, c * sign)),
            }
        }
        for (a, c) in o.atoms {
            match self.atoms.iter_mut().find(|(x, _)| *x == a) {
                Some(e) => e.1 += c * sign,
                None => self.atoms.push((a, c * sign)),
            }
        }
        self.vars.retain(|x| x.1 != 0);
        self.atoms.retain(|x| x.1 != 0);
        self
    }

    fn scale(mut self, k: i64) -> Lin {
        if k == 0 {
            return Lin::default();
        }
        self.c = self.c.wrapping_mul(k);
        for v in &mut self.vars {
            v.1 *= k;
        }
        for a in &mut self.atoms {
            a.1 *= k;
        }
        self
    }

    /// The form as an index, leaving out the variables in `skip`.
    pub fn to_idx(&self, skip: &[usize]) -> Idx {
        let mut e = Idx::Const(self.c);
        for (v, c) in &self.vars {
            if !skip.contains(v) {
                e = Idx::Add(Box::new(e), Box::new(Idx::Mul(Box::new(Idx::Var(*v)), Box::new(Idx::Const(*c)))));
            }
        }
        for (a, c) in &self.atoms {
            e = Idx::Add(Box::new(e), Box::new(Idx::Mul(Box::new(a.clone()), Box::new(Idx::Const(*c)))));
        }
        e.simplify()
    }

    /// The inclusive range of the form.
    pub fn range(&self, vars: &HashMap<usize, i64>) -> Option<(i64, i64)> {
        let mut lo = self.c;
        let mut hi = self.c;
        let terms = self.vars.iter().map(|(v, c)| (range(&Idx::Var(*v), vars), *c));
        let atoms = self.atoms.iter().map(|(a, c)| (range(a, vars), *c));
        for (r, c) in terms.chain(atoms) {
            let (a, b) = r?;
            let (x, y) = (a.checked_mul(c)?, b.checked_mul(c)?);
            lo = lo.checked_add(x.min(y))?;
            hi = hi.checked_add(x.max(y))?;
        }
        Some((lo, hi))
    }
}

/// The affine form of `e` (`vars`: exclusive upper bounds of the loop variables, used to
/// simplify divisions and remainders whose remainder part stays within the divisor).
pub fn lin(e: &Idx, vars: &HashMap<usize, i64>) -> Lin {
    match e {
        Idx::Var(v) => Lin { vars: vec![(*v, 1)], ..Lin::default() },
        Idx::Const(c) => Lin::konst(*c),
        Idx::Add(a, b) => lin(a, vars).add(lin(b, vars), 1),
        Idx::Sub(a, b) => lin(a, vars).add(lin(b, vars), -1),
        Idx::Mul(a, b) => {
            let (la, lb) = (lin(a, vars), lin(b, vars));
            if lb.is_const() {
                la.scale(lb.c)
            } else if la.is_const() {
                lb.scale(la.c)
            } else {
                Lin::atom(e.clone())
            }
        }
        Idx::Div(a, b) | Idx::Rem(a, b) => {
            let (la, lb) = (lin(a, vars), lin(b, vars));
            if !lb.is_const() || lb.c <= 0 {
                return Lin::atom(e.clone());
            }
            let d = lb.c;
            if la.is_const() {
                return Lin::konst(if matches!(e, Idx::Div(..)) { la.c.div_euclid(d) } else { la.c.rem_euclid(d) });
            }
            // e = d·q + r with r = Σ (c mod d)·x + c₀ mod d; exact when r stays in [0, d).
            let mut q = Lin::konst(la.c.div_euclid(d));
            let mut r = Lin::konst(la.c.rem_euclid(d));
            for (v, c) in &la.vars {
                q = q.add(Lin { vars: vec![(*v, c.div_euclid(d))], ..Lin::default() }, 1);
                r = r.add(Lin { vars: vec![(*v, c.rem_euclid(d))], ..Lin::default() }, 1);
            }
            for (a, c) in &la.atoms {
                q = q.add(Lin { atoms: vec![(a.clone(), c.div_euclid(d))], ..Lin::default() }, 1);
                r = r.add(Lin { atoms: vec![(a.clone(), c.rem_euclid(d))], ..Lin::default() }, 1);
            }
            match r.range(vars) {
                Some((lo, hi)) if lo >= 0 && hi < d => {
                    if matches!(e, Idx::Div(..)) {
                        q
                    } else {
                        r
                    }
                }
                _ => Lin::atom(e.clone()),
            }
        }
        Idx::Min(a, b) | Idx::Max(a, b) => {
            let (ra, rb) = (range(a, vars), range(b, vars));
            let is_min = matches!(e, Idx::Min(..));
            match (ra, rb) {
                (Some(x), Some(y)) if x.1 <= y.0 => lin(if is_min { a } else { b }, vars),
                (Some(x), Some(y)) if y.1 <= x.0 => lin(if is_min { b } else { a }, vars),
                _ => Lin::atom(e.clone()),
            }
        }
        Idx::ZeroIfOne(a, b) => match range(a, vars) {
            Some((1, 1)) => Lin::default(),
            Some((lo, hi)) if lo > 1 || hi < 1 => lin(b, vars),
            _ => Lin::atom(e.clone()),
        },
        Idx::Dim { .. } => Lin::atom(e.clone()),
    }
}

/// The row-major flat offset of `index` in a buffer of shape `shape`, as an affine form.
pub fn flat(index: &[Idx], shape: &[usize], vars: &HashMap<usize, i64>) -> Lin {
    let mut acc = Lin::default();
    let mut stride = 1i64;
    for (i, &d) in index.iter().zip(shape).rev() {
        acc = acc.add(lin(i, vars).scale(stride), 1);
        stride = stride.saturating_mul(d as i64);
    }
    acc
}

/// The row-major flat offset of `index` as an index expression.
pub fn flat_idx(index: &[Idx], shape: &[usize]) -> Idx {
    let mut e = Idx::Const(0);
    for (i, &d) in index.iter().zip(shape) {
        e = Idx::Add(Box::new(Idx::Mul(Box::new(e), Box::new(Idx::Const(d as i64)))), Box::new(i.clone()));
    }
    e.simplify()
}
