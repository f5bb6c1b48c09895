//! The `shape` family: data movement, indexing, shape queries, tensor creation and resizing.
//!
//! - [`layout`]: Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Expand, Concat, Split, Tile,
//!   DepthToSpace, SpaceToDepth.
//! - [`crop`]: Slice, Pad, CenterCropPad, Compress, ReverseSequence.
//! - [`index`]: Gather, GatherElements, GatherND, Scatter, ScatterElements, ScatterND,
//!   TensorScatter, NonZero, OneHot.
//! - [`create`]: Shape, Size, Constant, ConstantOfShape, Range, EyeLike, Trilu.
//! - [`resize`]: Resize, Upsample.
//!
//! Data movement is dtype-generic: ops are written once over an element type `T: Elem` and
//! instantiated for every [`DType`] (strings and bools included) with [`with_elem!`].

use super::{checked_numel, strided_copy, InferCx, OpResult, Registry};
use crate::bail;
use crate::tensor::{Data, Tensor};
use crate::types::{DType, Dim};
use half::{bf16, f16};

/// Runs `$body` with `$T` bound to the Rust element type of the dtype `$dt`.
macro_rules! with_elem {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            $crate::types::DType::F16 => {
                type $T = ::half::f16;
                $body
            }
            $crate::types::DType::BF16 => {
                type $T = ::half::bf16;
                $body
            }
            $crate::types::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::types::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::types::DType::I8 => {
                type $T = i8;
                $body
            }
            $crate::types::DType::I16 => {
                type $T = i16;
                $body
            }
            $crate::types::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::types::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::types::DType::U8 => {
                type $T = u8;
                $body
            }
            $crate::types::DType::U16 => {
                type $T = u16;
                $body
            }
            $crate::types::DType::U32 => {
                type $T = u32;
                $body
            }
            $crate::types::DType::U64 => {
                type $T = u64;
                $body
            }
            $crate::types::DType::Bool => {
                type $T = bool;
                $body
            }
            $crate::types::DType::String => {
                type $T = String;
                $body
            }
            $crate::types::DType::F8E4M3FN => {
                type $T = $crate::lowp::F8E4M3FN;
                $body
            }
            $crate::types::DType::F8E4M3FNUZ => {
                type $T = $crate::lowp::F8E4M3FNUZ;
                $body
            }
            $crate::types::DType::F8E5M2 => {
                type $T = $crate::lowp::F8E5M2;
                $body
            }
            $crate::types::DType::F8E5M2FNUZ => {
                type $T = $crate::lowp::F8E5M2FNUZ;
                $body
            }
            $crate::types::DType::F8E8M0 => {
                type $T = $crate::lowp::F8E8M0;
                $body
            }
            $crate::types::DType::F4E2M1 => {
                type $T = $crate::lowp::F4E2M1;
                $body
            }
            $crate::types::DType::U4 => {
                type $T = $crate::lowp::U4;
                $body
            }
            $crate::types::DType::I4 => {
                type $T = $crate::lowp::I4;
                $body
            }
            $crate::types::DType::U2 => {
                type $T = $crate::lowp::U2;
                $body
            }
            $crate::types::DType::I2 => {
                type $T = $crate::lowp::I2;
                $body
            }
        }
    };
}

mod create;
mod crop;
mod index;
mod layout;
mod resize;

pub fn register(r: &mut Registry) {
    layout::register(r);
    crop::register(r);
    index::register(r);
    create::register(r);
    resize::register(r);
}

/// An element type a [`Data`] buffer can hold; lets data-movement code be generic.
pub(crate) trait Elem: Clone + Default + 'static {
    fn slice(d: &Data) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> Data;
}

macro_rules! impl_elem {
    ($($t:ty => $var:ident),* $(,)?) => {
        $(impl Elem for $t {
            fn slice(d: &Data) -> Option<&[$t]> {
                match d {
                    Data::$var(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<$t>) -> Data {
                Data::$var(v)
            }
        })*
    };
}

impl_elem!(
    f16 => F16, bf16 => BF16, f32 => F32, f64 => F64, i8 => I8, i16 => I16, i32 => I32,
    i64 => I64, u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Bool, String => Str,
    crate::lowp::F8E4M3FN => F8E4M3FN, crate::lowp::F8E4M3FNUZ => F8E4M3FNUZ,
    crate::lowp::F8E5M2 => F8E5M2, crate::lowp::F8E5M2FNUZ => F8E5M2FNUZ, crate::lowp::F8E8M0 => F8E8M0,
    crate::lowp::F4E2M1 => F4E2M1, crate::lowp::U4 => U4, crate::lowp::I4 => I4, crate::lowp::U2 => U2,
    crate::lowp::I2 => I2,
);

/// The elements of `t` as `T` (an error if `t` holds another type).
pub(crate) fn elems<T: Elem>(t: &Tensor) -> OpResult<&[T]> {
    match T::slice(&t.data) {
        Some(v) => Ok(v),
        None => bail!("expected a tensor of the data's element type, found {}", t.dtype()),
    }
}

/// A tensor from a shape and a buffer of `T`.
pub(crate) fn build<T: Elem>(shape: Vec<usize>, v: Vec<T>) -> Tensor {
    Tensor::new(shape, T::wrap(v))
}

/// Checks that `b` has the same element type as `a`.
pub(crate) fn same_dtype(a: &Tensor, b: &Tensor, what: &str) -> OpResult<()> {
    if a.dtype() != b.dtype() {
        bail!("{what} must have the data's element type {}, found {}", a.dtype(), b.dtype());
    }
    Ok(())
}

/// Row-major strides as `isize`.
pub(crate) fn istrides(shape: &[usize]) -> Vec<isize> {
    crate::tensor::strides(shape).into_iter().map(|s| s as isize).collect()
}

/// A strided view of `t` (see [`strided_copy`]) materialized as a tensor of `out_shape`.
pub(crate) fn strided_view(t: &Tensor, out_shape: Vec<usize>, strides: &[isize], base: isize) -> Tensor {
    let data = crate::map_data!(&t.data, v => strided_copy(v, &out_shape, strides, base));
    Tensor::new(out_shape, data)
}

/// Reads `t` as an array of shape `view` (same element count) and permutes its axes by `perm`:
/// the flat result of `transpose(reshape(t, view), perm)`.
pub(crate) fn permuted(t: &Tensor, view: &[usize], perm: &[usize]) -> Tensor {
    let st = istrides(view);
    let out_shape: Vec<usize> = perm.iter().map(|&p| view[p]).collect();
    // Input axes that stay adjacent and in order move as one: merging them makes the copy work
    // on longer contiguous runs. Each group is (its last input axis, its size).
    let mut groups: Vec<(usize, usize)> = Vec::with_capacity(perm.len());
    for &p in perm {
        match groups.last_mut() {
            Some(g) if p == g.0 + 1 => *g = (p, g.1 * view[p]),
            _ => groups.push((p, view[p])),
        }
    }
    let sizes: Vec<usize> = groups.iter().map(|g| g.1).collect();
    let strides: Vec<isize> = groups.iter().map(|g| st[g.0]).collect();
    let data = crate::map_data!(&t.data, v => strided_copy(v, &sizes, &strides, 0));
    Tensor::new(out_shape, data)
}

/// Marks an output position that takes the fill value in [`gather_maps`].
pub(crate) const FILL: usize = usize::MAX;

/// Output element `o` is `src[Σ_k maps[k][o_k]·stride_k]` (input row-major strides), or `fill`
/// where any `maps[k][o_k]` is [`FILL`].
fn map_gather<T: Clone>(src: &[T], in_shape: &[usize], maps: &[Vec<usize>], fill: &T) -> Vec<T> {
    let out_shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    let n: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let r = out_shape.len();
    if r == 0 {
        out.push(src[0].clone());
        return out;
    }
    let st = crate::tensor::strides(in_shape);
    let last = &maps[r - 1];
    let mut idx = vec![0usize; r - 1];
    loop {
        let mut base = Some(0usize);
        for k in 0..r - 1 {
            let m = maps[k][idx[k]];
            base = if m == FILL { None } else { base.map(|b| b + m * st[k]) };
        }
        match base {
            None => out.extend(std::iter::repeat_n(fill.clone(), last.len())),
            Some(b) => {
                let s = st[r - 1];
                out.extend(last.iter().map(|&m| if m == FILL { fill.clone() } else { src[b + m * s].clone() }))
            }
        }
        let mut ax = r - 1;
        loop {
            if ax == 0 {
                return out;
            }
            ax -= 1;
            idx[ax] += 1;
            if idx[ax] < out_shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
}

/// Gathers `t` through one index map per axis (see [`map_gather`]); `fill` (its first element,
/// else zero) fills the [`FILL`] positions. Map entries must be in range of `t`'s dims.
pub(crate) fn gather_maps(t: &Tensor, maps: &[Vec<usize>], fill: Option<&Tensor>) -> OpResult<Tensor> {
    let out_shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    checked_numel(&out_shape)?;
    if maps.len() != t.rank() {
        bail!("internal: {} index maps for a rank-{} tensor", maps.len(), t.rank());
    }
    with_elem!(t.dtype(), T => {
        let src = elems::<T>(t)?;
        let fill_v: T = match fill {
            Some(f) => elems::<T>(f)?.first().cloned().unwrap_or_default(),
            None => T::default(),
        };
        Ok(build(out_shape, map_gather(src, &t.shape, maps, &fill_v)))
    })
}

/// A known dimension.
pub(crate) fn kd(n: usize) -> Dim {
    Dim::Known(n as u64)
}

/// Input `i`'s dims, `None` if its rank is unknown.
pub(crate) fn in_dims(cx: &InferCx, i: usize) -> OpResult<Option<Vec<Dim>>> {
    Ok(cx.input(i)?.shape.clone())
}

/// Input `i`'s constant value as i64s, when known and integer.
pub(crate) fn const_ints(cx: &InferCx, i: usize) -> Option<Vec<i64>> {
    cx.const_input(i).filter(|t| t.dtype().is_int()).map(|t| t.to_i64())
}

/// The length of a 1-D input (shape, axes, pads, ...) when its type says so statically (and it
/// is a plausible rank: a longer one is left unknown rather than typed with that many dims).
pub(crate) fn static_len(cx: &InferCx, i: usize) -> Option<usize> {
    let t = cx.opt_input(i)?;
    match t.shape.as_deref() {
        Some([d]) => d.known().filter(|&n| n <= 1024).map(|n| n as usize),
        Some([]) => Some(1),
        _ => None,
    }
}

/// The product of `dims`: known when all are known, the one symbol when it is the only
/// non-unit factor, a fresh symbol otherwise.
pub(crate) fn product_dim(cx: &mut InferCx, dims: &[Dim]) -> Dim {
    let mut known: u64 = 1;
    let mut syms = Vec::new();
    for d in dims {
        match d {
            Dim::Known(k) => known = known.saturating_mul(*k),
            Dim::Sym(_) => syms.push(d.clone()),
        }
    }
    match (syms.len(), known) {
        (0, k) => Dim::Known(k),
        (_, 0) => Dim::Known(0),
        (1, 1) => syms.swap_remove(0),
        _ => cx.fresh_dim(),
    }
}

/// Normalizes an index into a dim of size `dim`, allowing negatives (from the end).
pub(crate) fn norm_index(i: i64, dim: usize, what: &str) -> OpResult<usize> {
    let d = dim as i64;
    if i < -d || i >= d {
        bail!("{what} {i} is out of range for a dimension of size {dim}");
    }
    Ok(if i < 0 { (i + d) as usize } else { i as usize })
}

/// Normalizes a possibly negative axis into `[0, rank)` (so a scalar has no axis).
pub(crate) fn axis_in(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}

/// Normalizes a list of axes with [`axis_in`]; duplicates are an error.
pub(crate) fn axes_in(axes: &[i64], rank: usize) -> OpResult<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = axis_in(a, rank)?;
        if out.contains(&n) {
            bail!("axis {a} is repeated in {axes:?}");
        }
        out.push(n);
    }
    Ok(out)
}

/// Reads an integer list from the attribute `attr` when present, else from input `i`.
pub(crate) fn ints_attr_or_input(
    cx: &super::EvalCx,
    inputs: &[Option<&Tensor>],
    attr: &str,
    i: usize,
) -> OpResult<Option<Vec<i64>>> {
    if let Some(v) = cx.attrs.ints(attr)? {
        return Ok(Some(v));
    }
    match super::opt(inputs, i) {
        Some(t) => Ok(Some(super::ints_of(t)?)),
        None => Ok(None),
    }
}

/// Checks that a tensor's dtype is one of the integer index types.
pub(crate) fn expect_index_dtype(t: &Tensor, what: &str) -> OpResult<()> {
    if !matches!(t.dtype(), DType::I32 | DType::I64) {
        bail!("{what} must be int32 or int64, found {}", t.dtype());
    }
    Ok(())
}

/// Test helpers: run an op's shape rule or semantics directly.
#[cfg(test)]
pub(crate) mod testing {
    use crate::attr::{Attr, Attrs};
    use crate::graph::{EvalCx, InferCx, OpDef, OpResult};

    use crate::tensor::Tensor;
    use crate::types::TensorType;

    pub fn attrs(kv: &[(&str, Attr)]) -> Attrs {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    /// Runs `op.infer` on input types, with constant values where given.
    pub fn infer(
        op: &dyn OpDef,
        a: &Attrs,
        inputs: &[TensorType],
        consts: &[Option<Tensor>],
    ) -> OpResult<Vec<TensorType>> {
        let ins: Vec<Option<TensorType>> = inputs.iter().cloned().map(Some).collect();
        let cs: Vec<Option<&Tensor>> = (0..inputs.len()).map(|i| consts.get(i).and_then(|c| c.as_ref())).collect();
        let mut next = 0;
        let mut cx = InferCx::new(a, &ins, &cs, 1, 25, &[], &mut next);
        op.infer(&mut cx)
    }

    /// Runs `op.eval` at the latest opset.
    pub fn eval(op: &dyn OpDef, a: &Attrs, inputs: &[&Tensor], outs: usize) -> OpResult<Vec<Tensor>> {
        let cx = EvalCx {
            attrs: crate::graph::AttrView(a),
            num_outputs: outs,
            opset: 25,
            regions: &[],
            runner: &crate::graph::NoRegions,
        };
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|&t| Some(t)).collect();
        op.eval(&cx, &ins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inputs and attributes must give results or errors, never panics.
    #[test]
    fn ops_never_panic_on_random_inputs() {
        use crate::attr::{Attr, Attrs};
        use crate::graph::{AttrView, EvalCx, InferCx, OpDef};
        use crate::types::TensorType;
        let mut reg = Registry { ops: Default::default(), families: Default::default(), family: "shape" };
        register(&mut reg);
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let dtypes = [DType::F32, DType::I64, DType::I32, DType::Bool, DType::String, DType::F16];
        let strs =
            ["constant", "reflect", "edge", "wrap", "DCR", "CRD", "nearest", "linear", "cubic", "add", "max", "none"];
        let names = reg.names();
        for _ in 0..20000 {
            let op: &dyn OpDef = reg.get(names[rnd(names.len() as u64) as usize]).expect("op");
            let mut inputs = Vec::new();
            for _ in 0..rnd(5) {
                if rnd(6) == 0 {
                    inputs.push(None);
                    continue;
                }
                // Shape-like inputs are mostly int64; updates often share the data's type and shape.
                let first = inputs.first().and_then(|t: &Option<Tensor>| t.as_ref());
                let dt = match (inputs.len(), rnd(4), first) {
                    (0, _, _) | (_, 0, _) => dtypes[rnd(dtypes.len() as u64) as usize],
                    (_, 1, Some(f)) => f.dtype(),
                    _ => DType::I64,
                };
                let shape: Vec<usize> = match (rnd(3), first) {
                    (0, Some(f)) => f.shape.clone(),
                    _ => (0..rnd(4)).map(|_| rnd(4) as usize).collect(),
                };
                let n: usize = shape.iter().product();
                let vals: Vec<i64> = (0..n).map(|_| rnd(10) as i64 - 4).collect();
                inputs.push(Some(Tensor::from_i64_as(dt, &shape, vals)));
            }
            let mut attrs = Attrs::new();
            for key in [
                "axis",
                "axes",
                "perm",
                "mode",
                "blocksize",
                "k",
                "upper",
                "batch_dims",
                "reduction",
                "start",
                "end",
                "num_outputs",
                "split",
                "pads",
                "value",
                "coordinate_transformation_mode",
                "time_axis",
                "batch_axis",
                "shape",
            ] {
                if rnd(4) != 0 {
                    continue;
                }
                let v = match rnd(4) {
                    0 => Attr::Int(rnd(7) as i64 - 3),
                    1 => Attr::Ints((0..rnd(4)).map(|_| rnd(7) as i64 - 3).collect()),
                    2 => Attr::Str(strs[rnd(strs.len() as u64) as usize].into()),
                    _ => Attr::Float(rnd(5) as f32 - 1.0),
                };
                attrs.insert(key.into(), v);
            }
            let opset = [7, 9, 10, 11, 13, 18, 25][rnd(7) as usize];
            let nout = 1 + rnd(3) as usize;
            let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_ref()).collect();
            let cx = EvalCx {
                attrs: AttrView(&attrs),
                num_outputs: nout,
                opset,
                regions: &[],
                runner: &crate::graph::NoRegions,
            };
            let _ = op.eval(&cx, &refs);
            let types: Vec<Option<TensorType>> =
                inputs.iter().map(|t| t.as_ref().map(|t| TensorType::known(t.dtype(), &t.shape))).collect();
            let consts: Vec<Option<&Tensor>> = refs.iter().map(|t| if rnd(2) == 0 { *t } else { None }).collect();
            let mut next = 0;
            let mut icx = InferCx::new(&attrs, &types, &consts, nout, opset, &[], &mut next);
            let _ = op.infer(&mut icx);
        }
    }

    #[test]
    fn strided_copy_transposes() {
        let src: Vec<i32> = (0..6).collect();
        // [2,3] transposed to [3,2]
        let out = strided_copy(&src, &[3, 2], &[1, 3], 0);
        assert_eq!(out, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn permuted_merges_adjacent_axes() {
        let t = Tensor::from_i64(&[2, 3, 2], (0..12).collect());
        // [0, 2, 1]: axes 1 and 2 swap; [1, 2, 0]: axes 1, 2 move together.
        let y = permuted(&t, &t.shape, &[0, 2, 1]);
        assert_eq!(y.shape, vec![2, 2, 3]);
        assert_eq!(y.to_i64(), vec![0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]);
        let y = permuted(&t, &t.shape, &[1, 2, 0]);
        assert_eq!(y.shape, vec![3, 2, 2]);
        assert_eq!(y.to_i64(), vec![0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]);
    }

    #[test]
    fn map_gather_fills() {
        let src = vec![1.0f32, 2.0, 3.0, 4.0];
        let maps = vec![vec![FILL, 0, 1], vec![1, 0]];
        let out = map_gather(&src, &[2, 2], &maps, &9.0);
        assert_eq!(out, vec![9.0, 9.0, 2.0, 1.0, 4.0, 3.0]);
    }
}
