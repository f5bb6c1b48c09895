//! The `reduce` family of graph ops: reductions (`Reduce*`, `ArgMax`/`ArgMin`), selection and
//! scans (`TopK`, `CumSum`/`CumProd`, `Unique`, `NonMaxSuppression`), linear algebra (`Det`,
//! `Einsum`), signal processing (windows, `DFT`, `STFT`, `MelWeightMatrix`) and losses
//! (`SoftmaxCrossEntropyLoss`, `NegativeLogLikelihoodLoss`).
//!
//! Shared machinery lives here: [`Elem`] (per-element-type access without converting whole
//! buffers), [`fold_axes`] (a cache-friendly reduction over any set of axes) and
//! [`strided_copy`] (transposes, diagonals and broadcasts as one strided copy).

mod arg;
mod einsum;
mod linalg;
mod loss;
mod nms;
mod reducers;
mod scan;
mod signal;
mod unique;

use super::{norm_axis, strided_copy, OpResult, Registry};
use crate::bail;
use crate::tensor::Tensor;
use half::{bf16, f16};

pub fn register(r: &mut Registry) {
    reducers::register(r);
    arg::register(r);
    scan::register(r);
    unique::register(r);
    linalg::register(r);
    einsum::register(r);
    signal::register(r);
    loss::register(r);
    nms::register(r);
}

/// A numeric or bool element type, read in place (no whole-buffer conversion).
pub(crate) trait Elem: Copy + PartialOrd + Send + Sync + 'static {
    /// Lowest value (identity of `max`).
    const LOWEST: Self;
    /// Highest value (identity of `min`).
    const HIGHEST: Self;
    fn f64(self) -> f64;
    /// As i64 (u64 wraps; floats truncate).
    fn i64(self) -> i64;
}

macro_rules! elem_int {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const LOWEST: Self = <$t>::MIN;
            const HIGHEST: Self = <$t>::MAX;
            fn f64(self) -> f64 { self as f64 }
            fn i64(self) -> i64 { self as i64 }
        }
    )*};
}
elem_int!(i8, i16, i32, i64, u8, u16, u32, u64);

impl Elem for f32 {
    const LOWEST: Self = f32::NEG_INFINITY;
    const HIGHEST: Self = f32::INFINITY;
    fn f64(self) -> f64 {
        self as f64
    }
    fn i64(self) -> i64 {
        self as i64
    }
}

impl Elem for f64 {
    const LOWEST: Self = f64::NEG_INFINITY;
    const HIGHEST: Self = f64::INFINITY;
    fn f64(self) -> f64 {
        self
    }
    fn i64(self) -> i64 {
        self as i64
    }
}

impl Elem for f16 {
    const LOWEST: Self = f16::NEG_INFINITY;
    const HIGHEST: Self = f16::INFINITY;
    fn f64(self) -> f64 {
        self.to_f64()
    }
    fn i64(self) -> i64 {
        self.to_f64() as i64
    }
}

impl Elem for bf16 {
    const LOWEST: Self = bf16::NEG_INFINITY;
    const HIGHEST: Self = bf16::INFINITY;
    fn f64(self) -> f64 {
        self.to_f64()
    }
    fn i64(self) -> i64 {
        self.to_f64() as i64
    }
}

impl<const K: u8> Elem for crate::lowp::Lowp<K> {
    const LOWEST: Self = Self::LOWEST;
    const HIGHEST: Self = Self::HIGHEST;
    fn f64(self) -> f64 {
        self.to_f64()
    }
    fn i64(self) -> i64 {
        self.to_i64()
    }
}

impl Elem for bool {
    const LOWEST: Self = false;
    const HIGHEST: Self = true;
    fn f64(self) -> f64 {
        self as u8 as f64
    }
    fn i64(self) -> i64 {
        self as i64
    }
}

/// [`crate::for_each_data!`] with strings evaluating `$str` (bodies here need [`Elem`]).
macro_rules! with_elems {
    ($data:expr, $v:ident => $body:expr, str => $str:expr) => {
        $crate::for_each_data!($data, $v => $body, str _ => $str)
    };
}
pub(crate) use with_elems;

/// [`crate::map_data!`] with strings evaluating `$str` (which must diverge or be a `Data`).
macro_rules! map_elems {
    ($data:expr, $v:ident => $body:expr, str => $str:expr) => {
        $crate::map_data!($data, $v => $body, str _ => $str)
    };
}
pub(crate) use map_elems;

/// Folds `x` (row-major, `shape`) over the axes where `reduced[i]` is true: returns one
/// accumulator per output element (the kept axes, row-major), each started at `init`.
/// Size-1 axes are ignored and neighbouring axes of the same kind are merged, so the inner
/// loop always runs over a contiguous stretch of `x`.
pub(crate) fn fold_axes<T: Copy, A: Copy>(
    x: &[T],
    shape: &[usize],
    reduced: &[bool],
    init: A,
    f: impl Fn(A, T) -> A,
) -> Vec<A> {
    // Merged groups (size, reduced), outermost first.
    let mut groups: Vec<(usize, bool)> = Vec::new();
    for (&d, &r) in shape.iter().zip(reduced) {
        if d == 1 {
            continue;
        }
        match groups.last_mut() {
            Some((n, lr)) if *lr == r => *n *= d,
            _ => groups.push((d, r)),
        }
    }
    let out_n: usize = groups.iter().filter(|g| !g.1).map(|g| g.0).product();
    let mut acc = vec![init; out_n];
    if x.is_empty() {
        return acc;
    }
    // Strides in x and in acc for each group.
    let mut in_strides = vec![0usize; groups.len()];
    let mut out_strides = vec![0usize; groups.len()];
    let (mut si, mut so) = (1usize, 1usize);
    for (i, &(n, r)) in groups.iter().enumerate().rev() {
        in_strides[i] = si;
        si *= n;
        if !r {
            out_strides[i] = so;
            so *= n;
        }
    }
    fold_rec(x, &groups, &in_strides, &out_strides, 0, 0, 0, &mut acc, &f);
    acc
}

fn fold_rec<T: Copy, A: Copy>(
    x: &[T],
    groups: &[(usize, bool)],
    in_strides: &[usize],
    out_strides: &[usize],
    level: usize,
    in_off: usize,
    out_off: usize,
    acc: &mut [A],
    f: &impl Fn(A, T) -> A,
) {
    if level == groups.len() {
        acc[out_off] = f(acc[out_off], x[in_off]);
        return;
    }
    let (n, r) = groups[level];
    if level + 1 == groups.len() {
        let xs = &x[in_off..in_off + n];
        if r {
            let mut a = acc[out_off];
            for &v in xs {
                a = f(a, v);
            }
            acc[out_off] = a;
        } else {
            for (a, &v) in acc[out_off..out_off + n].iter_mut().zip(xs) {
                *a = f(*a, v);
            }
        }
        return;
    }
    for i in 0..n {
        fold_rec(
            x,
            groups,
            in_strides,
            out_strides,
            level + 1,
            in_off + i * in_strides[level],
            out_off + i * out_strides[level],
            acc,
            f,
        );
    }
}

/// Permutes the axes of a row-major buffer: output axis `i` is input axis `perm[i]`.
pub(crate) fn permute<T: Clone>(x: &[T], shape: &[usize], perm: &[usize]) -> (Vec<T>, Vec<usize>) {
    let st = crate::tensor::strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let out_strides: Vec<isize> = perm.iter().map(|&p| st[p] as isize).collect();
    (strided_copy(x, &out_shape, &out_strides, 0), out_shape)
}

/// Splits `shape` at `axis` into (outer, axis length, inner) element counts.
pub(crate) fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// A single-element integer tensor (`k`, `axis`, sizes) as i64.
pub(crate) fn int_scalar(t: &Tensor, what: &str) -> OpResult<i64> {
    if !t.dtype().is_int() {
        bail!("{what} must be an integer tensor, found {}", t.dtype());
    }
    match t.scalar_value_i64() {
        Some(v) => Ok(v),
        None => bail!("{what} must hold exactly one element, found shape {:?}", t.shape),
    }
}

/// A single-element float (or integer) tensor as f64.
pub(crate) fn float_scalar(t: &Tensor, what: &str) -> OpResult<f64> {
    if !t.dtype().is_numeric() {
        bail!("{what} must be a numeric tensor, found {}", t.dtype());
    }
    match t.scalar_value_f64() {
        Some(v) => Ok(v),
        None => bail!("{what} must hold exactly one element, found shape {:?}", t.shape),
    }
}

/// Normalizes `axis` for a tensor of `rank` (rank 0 is an error: there is no axis to pick).
pub(crate) fn axis_of(axis: i64, rank: usize) -> OpResult<usize> {
    if rank == 0 {
        bail!("expected a tensor of rank >= 1 for axis {axis}, found a scalar");
    }
    norm_axis(axis, rank)
}

/// A non-negative size from a run-time value.
pub(crate) fn to_size(v: i64, what: &str) -> OpResult<usize> {
    if v < 0 {
        bail!("{what} must be non-negative, found {v}");
    }
    usize::try_from(v).map_err(|_| super::OpError(format!("{what} {v} is too large")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::attr::{Attr, Attrs};
    use crate::graph::{AttrView, EvalCx};

    /// Evaluates op `name` directly (no module) for unit tests.
    pub(crate) fn eval_op(
        name: &str,
        attrs: &[(&str, Attr)],
        inputs: &[Option<&Tensor>],
        num_outputs: usize,
        opset: i64,
    ) -> OpResult<Vec<Tensor>> {
        let a: Attrs = attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let Some(op) = crate::graph::lookup(name) else { bail!("no op {name}") };
        let cx = EvalCx { attrs: AttrView(&a), num_outputs, opset, regions: &[], runner: &crate::graph::NoRegions };
        op.eval(&cx, inputs)
    }

    #[test]
    fn fold_axes_merges_and_reduces() {
        let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
        // Reduce axes 0 and 2 of [2,3,4].
        let s = fold_axes(&x, &[2, 3, 4], &[true, false, true], 0.0f64, |a, v| a + v as f64);
        assert_eq!(s, vec![60.0, 92.0, 124.0]);
        let all = fold_axes(&x, &[2, 3, 4], &[true; 3], 0.0f64, |a, v| a + v as f64);
        assert_eq!(all, vec![276.0]);
        let empty: Vec<f32> = vec![];
        let e = fold_axes(&empty, &[2, 0, 3], &[false, true, false], 1.0f64, |a, v| a * v as f64);
        assert_eq!(e, vec![1.0; 6]);
    }

    #[test]
    fn permute_transposes() {
        let (v, s) = permute(&[1, 2, 3, 4, 5, 6], &[2, 3], &[1, 0]);
        assert_eq!(s, vec![3, 2]);
        assert_eq!(v, vec![1, 4, 2, 5, 3, 6]);
    }
}
