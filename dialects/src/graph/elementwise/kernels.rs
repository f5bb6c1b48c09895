//! Shared elementwise machinery: the element traits ops are written against ([`Real`] for
//! floats, [`IntElem`] for integers) and the broadcasting loops ([`zip_map`], [`zip3_map`]).
//!
//! Broadcasting coalesces the output's axes into as few runs as possible and then loops over
//! contiguous rows, with the innermost loop specialized for "both operands contiguous" and
//! "one operand fixed", so a bias add or a residual add runs as a plain slice loop.

use crate::bail;
use crate::graph::{checked_numel, OpResult};
use crate::tensor::Data;
use crate::types::{broadcast_shapes, Shape};
use half::{bf16, f16};
use std::ops::{Add, BitAnd, BitOr, BitXor, Div, Mul, Neg, Not, Sub};

/// A float element type computed natively (f32, f64; f16 and bf16 compute in f32).
pub(super) trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// A constant of this type (rounded).
    fn c(v: f64) -> Self;
    fn abs(self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn round_even(self) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn exp_m1(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn tan(self) -> Self;
    fn asin(self) -> Self;
    fn acos(self) -> Self;
    fn atan(self) -> Self;
    fn sinh(self) -> Self;
    fn cosh(self) -> Self;
    fn asinh(self) -> Self;
    fn acosh(self) -> Self;
    fn atanh(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn powf(self, e: Self) -> Self;
    /// C `fmod`: the remainder with the dividend's sign.
    fn fmod(self, d: Self) -> Self;
    fn copysign(self, s: Self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ident, $erf:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn c(v: f64) -> Self {
                v as $t
            }
            impl_real!(@delegate $t: abs floor ceil sqrt exp exp_m1 ln ln_1p sin cos tan asin acos atan
                sinh cosh asinh acosh atanh tanh);
            fn round_even(self) -> Self {
                self.round_ties_even()
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            fn fmod(self, d: Self) -> Self {
                self % d
            }
            fn copysign(self, s: Self) -> Self {
                <$t>::copysign(self, s)
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
    (@delegate $t:ident: $($m:ident)*) => {
        $(fn $m(self) -> Self { <$t>::$m(self) })*
    };
}

impl_real!(f32, erf_f32);
impl_real!(f64, erf_f64);

/// The error function, to about 1e-7 relative (Taylor series near 0, Numerical Recipes'
/// `erfcc` Chebyshev fit elsewhere).
pub(super) fn erf_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let z = x.abs();
    if z < 0.5 {
        // erf(x) = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = x * x;
        let (mut term, mut sum) = (x, x);
        for n in 1..20 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        return sum * std::f64::consts::FRAC_2_SQRT_PI;
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// The error function in f32 arithmetic, to a few f32 ulps (the same fits as [`erf_f64`]).
pub(super) fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    if z < 0.5 {
        let x2 = x * x;
        // Taylor terms through x^13: the next is below 1e-9 relative for |x| < 0.5.
        let p = 1.0
            + x2 * (-1.0 / 3.0
                + x2 * (1.0 / 10.0
                    + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 + x2 * (-1.0 / 1320.0 + x2 * (1.0 / 9360.0))))));
        return x * p * std::f32::consts::FRAC_2_SQRT_PI;
    }
    if z.is_nan() {
        return x;
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// An integer element type.
pub(super) trait IntElem:
    Copy + Ord + Default + BitAnd<Output = Self> + BitOr<Output = Self> + BitXor<Output = Self> + Not<Output = Self>
{
    const BITS: u32;
    fn is_neg(self) -> bool;
    fn as_i64(self) -> i64;
    /// Wrapping conversion (C cast) from i64.
    fn from_i64(v: i64) -> Self;
    fn as_f64(self) -> f64;
    /// C cast from f64: truncates toward zero, saturates, NaN becomes 0.
    fn from_f64(v: f64) -> Self;
    fn wadd(self, o: Self) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wmul(self, o: Self) -> Self;
    fn wneg(self) -> Self;
    fn wabs(self) -> Self;
    /// C division (toward zero); 0 when dividing by zero.
    fn cdiv(self, o: Self) -> Self;
    /// C remainder (dividend's sign); 0 when dividing by zero.
    fn crem(self, o: Self) -> Self;
    fn shl_bits(self, s: u32) -> Self;
    fn shr_bits(self, s: u32) -> Self;
}

macro_rules! impl_int {
    ($signed:expr; $($t:ident)*) => {$(
        impl IntElem for $t {
            const BITS: u32 = <$t>::BITS;
            fn is_neg(self) -> bool {
                $signed && self.leading_zeros() == 0
            }
            fn as_i64(self) -> i64 {
                self as i64
            }
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            fn as_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            fn wmul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn wneg(self) -> Self {
                self.wrapping_neg()
            }
            fn wabs(self) -> Self {
                if self.is_neg() { self.wrapping_neg() } else { self }
            }
            fn cdiv(self, o: Self) -> Self {
                if o == 0 { 0 } else { self.wrapping_div(o) }
            }
            fn crem(self, o: Self) -> Self {
                if o == 0 { 0 } else { self.wrapping_rem(o) }
            }
            fn shl_bits(self, s: u32) -> Self {
                self.wrapping_shl(s)
            }
            fn shr_bits(self, s: u32) -> Self {
                self.wrapping_shr(s)
            }
        }
    )*};
}

impl_int!(true; i8 i16 i32 i64);
impl_int!(false; u8 u16 u32 u64);

/// Integer power by squaring, wrapping like numpy; a negative exponent gives `1/base`
/// truncated toward zero.
pub(super) fn ipow<T: IntElem>(base: T, exp: T) -> T {
    if exp.is_neg() {
        return match base.as_i64() {
            1 => T::from_i64(1),
            -1 => T::from_i64(if exp.as_i64() % 2 == 0 { 1 } else { -1 }),
            _ => T::default(),
        };
    }
    // Unsigned exponents above i64::MAX round-trip through the cast unchanged.
    let (mut b, mut e, mut acc) = (base, exp.as_i64() as u64, T::from_i64(1));
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wmul(b);
        }
        b = b.wmul(b);
        e >>= 1;
    }
    acc
}

/// How a broadcast output walks its operands: rows of `inner` elements whose starts are
/// given by an odometer over the outer axes.
struct Plan<const K: usize> {
    inner: usize,
    inner_strides: [usize; K],
    outer_dims: Vec<usize>,
    outer_strides: Vec<[usize; K]>,
}

impl<const K: usize> Plan<K> {
    fn new(out: &[usize], ins: [&[usize]; K]) -> Plan<K> {
        // Per output axis (size > 1 only): its size and each operand's element stride.
        let mut axes: Vec<(usize, [usize; K])> = Vec::new();
        let rank = out.len();
        let mut in_strides = vec![[0usize; K]; rank];
        for (k, shape) in ins.iter().enumerate() {
            let off = rank - shape.len();
            let mut s = 1;
            for i in (0..shape.len()).rev() {
                in_strides[i + off][k] = if shape[i] == 1 { 0 } else { s };
                s *= shape[i];
            }
        }
        for i in 0..rank {
            if out[i] != 1 {
                axes.push((out[i], in_strides[i]));
            }
        }
        // Merge an axis into the one inside it when every operand walks them contiguously.
        let mut merged: Vec<(usize, [usize; K])> = Vec::new();
        for (d, s) in axes.into_iter().rev() {
            if let Some((di, si)) = merged.last_mut() {
                if (0..K).all(|k| s[k] == si[k] * *di) {
                    *di *= d;
                    continue;
                }
            }
            merged.push((d, s));
        }
        merged.reverse();
        let (inner, inner_strides) = merged.pop().unwrap_or((1, [0; K]));
        let outer_dims = merged.iter().map(|m| m.0).collect();
        let outer_strides = merged.iter().map(|m| m.1).collect();
        Plan { inner, inner_strides, outer_dims, outer_strides }
    }

    /// Calls `f` with each row's start offsets, in output order.
    fn rows(&self, mut f: impl FnMut([usize; K])) {
        let rank = self.outer_dims.len();
        let mut idx = vec![0usize; rank];
        let mut off = [0usize; K];
        loop {
            f(off);
            let mut ax = rank;
            loop {
                if ax == 0 {
                    return;
                }
                ax -= 1;
                idx[ax] += 1;
                for k in 0..K {
                    off[k] += self.outer_strides[ax][k];
                }
                if idx[ax] < self.outer_dims[ax] {
                    break;
                }
                for k in 0..K {
                    off[k] -= self.outer_strides[ax][k] * idx[ax];
                }
                idx[ax] = 0;
            }
        }
    }
}

fn check_len(what: &str, len: usize, shape: &[usize]) -> OpResult<()> {
    if shape.iter().product::<usize>() != len {
        bail!("{what} holds {len} elements, its shape {shape:?} says otherwise");
    }
    Ok(())
}

/// The numpy broadcast of two shapes, or an error naming them.
pub(super) fn broadcast_pair(sa: &[usize], sb: &[usize]) -> OpResult<Shape> {
    match broadcast_shapes(sa, sb) {
        Some(s) => Ok(s),
        None => bail!("shapes {sa:?} and {sb:?} cannot be broadcast together"),
    }
}

/// `f(a, b)` elementwise with numpy broadcasting; returns the output shape and values.
pub(super) fn zip_map<A, B, O>(
    a: &[A],
    sa: &[usize],
    b: &[B],
    sb: &[usize],
    f: impl Fn(&A, &B) -> O,
) -> OpResult<(Shape, Vec<O>)> {
    check_len("input 0", a.len(), sa)?;
    check_len("input 1", b.len(), sb)?;
    if sa == sb {
        return Ok((sa.to_vec(), a.iter().zip(b).map(|(x, y)| f(x, y)).collect()));
    }
    let shape = broadcast_pair(sa, sb)?;
    let n = checked_numel(&shape)?;
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Ok((shape, out));
    }
    let plan = Plan::new(&shape, [sa, sb]);
    let len = plan.inner;
    let [ia, ib] = plan.inner_strides;
    plan.rows(|[oa, ob]| match (ia, ib) {
        (0, 0) => {
            let (x, y) = (&a[oa], &b[ob]);
            out.extend((0..len).map(|_| f(x, y)));
        }
        (_, 0) => {
            let y = &b[ob];
            out.extend(a[oa..oa + len].iter().map(|x| f(x, y)));
        }
        (0, _) => {
            let x = &a[oa];
            out.extend(b[ob..ob + len].iter().map(|y| f(x, y)));
        }
        _ => out.extend(a[oa..oa + len].iter().zip(&b[ob..ob + len]).map(|(x, y)| f(x, y))),
    });
    Ok((shape, out))
}

/// `f(a, b, c)` elementwise with numpy broadcasting of three operands.
pub(super) fn zip3_map<A, B, C, O>(
    (a, sa): (&[A], &[usize]),
    (b, sb): (&[B], &[usize]),
    (c, sc): (&[C], &[usize]),
    f: impl Fn(&A, &B, &C) -> O,
) -> OpResult<(Shape, Vec<O>)> {
    check_len("input 0", a.len(), sa)?;
    check_len("input 1", b.len(), sb)?;
    check_len("input 2", c.len(), sc)?;
    let shape = broadcast_pair(&broadcast_pair(sa, sb)?, sc)?;
    let n = checked_numel(&shape)?;
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Ok((shape, out));
    }
    let plan = Plan::new(&shape, [sa, sb, sc]);
    let len = plan.inner;
    let [ia, ib, ic] = plan.inner_strides;
    plan.rows(|[oa, ob, oc]| {
        out.extend((0..len).map(|i| f(&a[oa + i * ia], &b[ob + i * ib], &c[oc + i * ic])));
    });
    Ok((shape, out))
}

/// f16/bf16 data widened to f32 (the type they compute in), or `None` for other types.
pub(super) fn half_to_f32(d: &Data) -> Option<Vec<f32>> {
    match d {
        Data::F16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
        Data::BF16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
        _ => None,
    }
}

/// Rounds f32 results back to the half type `like` (f16 or bf16); other types keep f32.
pub(super) fn f32_to_half(like: &Data, v: Vec<f32>) -> Data {
    match like {
        Data::F16(_) => Data::F16(v.into_iter().map(f16::from_f32).collect()),
        Data::BF16(_) => Data::BF16(v.into_iter().map(bf16::from_f32).collect()),
        _ => Data::F32(v),
    }
}

/// Applies `$body` to the slice of an integer [`Data`] variant (bound to `$v`, of element type
/// implementing [`IntElem`]), wrapping the resulting `Vec` in the same variant; `$else` for
/// other variants.
macro_rules! map_int_data {
    ($data:expr, $v:ident => $body:expr, else $other:expr) => {{
        use $crate::tensor::Data as D;
        match $data {
            D::I8($v) => D::I8($body),
            D::I16($v) => D::I16($body),
            D::I32($v) => D::I32($body),
            D::I64($v) => D::I64($body),
            D::U8($v) => D::U8($body),
            D::U16($v) => D::U16($body),
            D::U32($v) => D::U32($body),
            D::U64($v) => D::U64($body),
            #[allow(unreachable_patterns)]
            _ => $other,
        }
    }};
}

/// Like [`map_int_data`] for two operands of the same integer variant.
macro_rules! zip_int_data {
    ($a:expr, $b:expr, ($x:ident, $y:ident) => $body:expr, else $other:expr) => {{
        use $crate::tensor::Data as D;
        match ($a, $b) {
            (D::I8($x), D::I8($y)) => D::I8($body),
            (D::I16($x), D::I16($y)) => D::I16($body),
            (D::I32($x), D::I32($y)) => D::I32($body),
            (D::I64($x), D::I64($y)) => D::I64($body),
            (D::U8($x), D::U8($y)) => D::U8($body),
            (D::U16($x), D::U16($y)) => D::U16($body),
            (D::U32($x), D::U32($y)) => D::U32($body),
            (D::U64($x), D::U64($y)) => D::U64($body),
            _ => $other,
        }
    }};
}

pub(super) use {map_int_data, zip_int_data};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_rows_and_columns() {
        let (s, v) = zip_map(&[1, 2, 3], &[3], &[10, 20], &[2, 1], |a, b| a + b).unwrap();
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![11, 12, 13, 21, 22, 23]);
        let (s, v) = zip_map(&[1, 2], &[2, 1, 1], &[0, 10, 20], &[1, 3], |a, b| a + b).unwrap();
        assert_eq!(s, vec![2, 1, 3]);
        assert_eq!(v, vec![1, 11, 21, 2, 12, 22]);
        let (s, v) = zip_map(&[5], &[], &[1, 2], &[2], |a, b| a * b).unwrap();
        assert_eq!((s, v), (vec![2], vec![5, 10]));
        assert!(zip_map(&[1, 2], &[2], &[1, 2, 3], &[3], |a, b| a + b).is_err());
    }

    #[test]
    fn broadcast_matches_index_reference() {
        use crate::tensor::broadcast_index;
        // Every pair of shapes of rank <= 3 with dims in {1, 2, 3} (dropping mismatches).
        let mut shapes: Vec<Vec<usize>> = vec![vec![]];
        for r in 1..=3u32 {
            for code in 0..3usize.pow(r) {
                shapes.push((0..r).map(|i| code / 3usize.pow(i) % 3 + 1).collect());
            }
        }
        let mut checked = 0;
        for sa in &shapes {
            for sb in &shapes {
                let Some(out) = broadcast_shapes(sa, sb) else {
                    continue;
                };
                let a: Vec<i64> = (0..sa.iter().product::<usize>() as i64).collect();
                let b: Vec<i64> = (0..sb.iter().product::<usize>() as i64).map(|x| x * 1000).collect();
                let (s, v) = zip_map(&a, sa, &b, sb, |x, y| x + y).unwrap();
                let (ia, ib) = (broadcast_index(sa, &out), broadcast_index(sb, &out));
                let want: Vec<i64> = ia.iter().zip(&ib).map(|(&i, &j)| a[i] + b[j]).collect();
                assert_eq!((s, v), (out.clone(), want.clone()), "{sa:?} {sb:?}");
                let (_, w) = zip3_map((&a, sa), (&b, sb), (&[1i64], &[]), |x, y, z| x + y + z).unwrap();
                assert_eq!(w, want.iter().map(|x| x + 1).collect::<Vec<_>>());
                checked += 1;
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn three_way_broadcast() {
        let (s, v) =
            zip3_map((&[true, false], &[2, 1]), (&[1, 2], &[2]), (&[9], &[]), |&c, &x, &y| if c { x } else { y })
                .unwrap();
        assert_eq!((s, v), (vec![2, 2], vec![1, 2, 9, 9]));
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in
            [(0.0, 0.0), (0.1, 0.1124629160), (0.5, 0.5204998778), (1.0, 0.8427007929), (-2.0, -0.9953222650)]
        {
            assert!((erf_f64(x) - want).abs() < 2e-7, "erf({x})");
        }
        assert!((erf_f64(1e-9) / 1.1283791670955126e-9 - 1.0).abs() < 1e-12);
        for i in -400..400 {
            let x = i as f32 / 80.0;
            let (a, b) = (erf_f32(x) as f64, erf_f64(x as f64));
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "erf_f32({x}) = {a}, want {b}");
        }
        assert!((erf_f32(1e-20) / 1.1283791e-20 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn integer_power_wraps() {
        assert_eq!(ipow(3i32, 4), 81);
        assert_eq!(ipow(2i8, 7), -128);
        assert_eq!(ipow(2i64, -1), 0);
        assert_eq!(ipow(-1i64, -3), -1);
        assert_eq!(ipow(7u8, 0), 1);
    }
}
