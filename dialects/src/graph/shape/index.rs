//! Indexing ops: Gather, GatherElements, GatherND, Scatter, ScatterElements, ScatterND,
//! TensorScatter, NonZero, OneHot.

use super::{build, elems, expect_index_dtype, kd, norm_index, same_dtype};
use crate::bail;
use crate::graph::{checked_numel, norm_axis, opt, req, same_as_input};
use crate::graph::{EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::{strides, Tensor};
use crate::types::{DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Gather,
        &GatherElements,
        &GatherND,
        &ScatterElements { name: "ScatterElements" },
        &ScatterElements { name: "Scatter" },
        &ScatterND,
        &TensorScatter,
        &NonZero,
        &OneHot,
    ]);
}

/// Copies `src[s..s + len]` for every `s` in `starts` into a tensor of `shape`.
fn gather_runs(t: &Tensor, shape: Vec<usize>, starts: &[usize], len: usize) -> OpResult<Tensor> {
    checked_numel(&shape)?;
    with_elem!(t.dtype(), T => {
        let src = elems::<T>(t)?;
        let mut out = Vec::with_capacity(starts.len() * len);
        for &s in starts {
            out.extend_from_slice(&src[s..s + len]);
        }
        Ok(build(shape, out))
    })
}

/// Calls `f(flat, coords)` for every index of `shape`, row-major.
fn for_each_index(shape: &[usize], mut f: impl FnMut(usize, &[usize]) -> OpResult<()>) -> OpResult<()> {
    let n: usize = shape.iter().product();
    let mut idx = vec![0usize; shape.len()];
    for flat in 0..n {
        f(flat, &idx)?;
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gathers

/// `Gather(data, indices)`: takes entries of `data` along `axis` at `indices` (negative ones count
/// from the end); the output shape is `data[..axis] ++ indices ++ data[axis+1..]`.
struct Gather;

impl OpDef for Gather {
    fn name(&self) -> &'static str {
        "Gather"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, i) = (cx.input(0)?, cx.input(1)?);
        let shape = match (&x.shape, &i.shape) {
            (Some(d), Some(ind)) => {
                let a = norm_axis(cx.attrs.int("axis", 0)?, d.len())?;
                if d.is_empty() {
                    bail!("Gather data must have rank >= 1");
                }
                Some(d[..a].iter().chain(ind).chain(&d[a + 1..]).cloned().collect())
            }
            _ => None,
        };
        Ok(vec![TensorType { dtype: x.dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, ind) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_index_dtype(ind, "indices")?;
        if x.rank() == 0 {
            bail!("Gather data must have rank >= 1");
        }
        let a = norm_axis(cx.attrs.int("axis", 0)?, x.rank())?;
        let d = x.shape[a];
        let inner: usize = x.shape[a + 1..].iter().product();
        let outer: usize = x.shape[..a].iter().product();
        let idx: Vec<usize> = ind.to_i64().into_iter().map(|i| norm_index(i, d, "index")).collect::<OpResult<_>>()?;
        let shape: Vec<usize> = x.shape[..a].iter().chain(&ind.shape).chain(&x.shape[a + 1..]).copied().collect();
        if checked_numel(&shape)? == 0 {
            return Ok(vec![Tensor::zeros(x.dtype(), &shape)]);
        }
        let mut starts = Vec::with_capacity(outer * idx.len());
        for o in 0..outer {
            starts.extend(idx.iter().map(|&i| (o * d + i) * inner));
        }
        Ok(vec![gather_runs(x, shape, &starts, inner)?])
    }
}

/// Flat data offsets for an elementwise gather/scatter along `axis`: the position of each entry
/// of `indices` in a tensor of shape `data`, with the `axis` coordinate taken from the index.
fn element_targets(data: &[usize], ind: &Tensor, axis: usize) -> OpResult<Vec<usize>> {
    if ind.rank() != data.len() {
        bail!("indices must have the data's rank {}, found rank {}", data.len(), ind.rank());
    }
    for k in 0..data.len() {
        if k != axis && ind.shape[k] > data[k] {
            bail!("indices shape {:?} exceeds data shape {data:?} in dim {k}", ind.shape);
        }
    }
    let st = strides(data);
    let vals = ind.to_i64();
    let mut out = Vec::with_capacity(vals.len());
    for_each_index(&ind.shape, |flat, c| {
        let i = norm_index(vals[flat], data[axis], "index")?;
        out.push(c.iter().enumerate().map(|(k, &v)| if k == axis { i } else { v } * st[k]).sum());
        Ok(())
    })?;
    Ok(out)
}

/// `GatherElements(data, indices)`: `out[i][j][k] = data[indices[i][j][k]][j][k]` (for axis 0).
struct GatherElements;

impl OpDef for GatherElements {
    fn name(&self) -> &'static str {
        "GatherElements"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, i) = (cx.input(0)?, cx.input(1)?);
        Ok(vec![TensorType { dtype: x.dtype, shape: i.shape.clone() }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, ind) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_index_dtype(ind, "indices")?;
        let a = norm_axis(cx.attrs.int("axis", 0)?, x.rank())?;
        if x.rank() == 0 {
            bail!("GatherElements data must have rank >= 1");
        }
        let idx = element_targets(&x.shape, ind, a)?;
        Ok(vec![x.gather_flat(ind.shape.clone(), &idx)])
    }
}

/// Validated GatherND/ScatterND geometry.
struct NdGeom {
    /// Flat offset in `data` of each index tuple.
    offsets: Vec<usize>,
    /// Elements addressed by one tuple (the slice `data[b + k..]`).
    chunk: usize,
}

/// Resolves the index tuples (last axis of `ind`) into data offsets, with `b` batch dims.
fn nd_geometry(data: &[usize], ind: &Tensor, b: usize) -> OpResult<NdGeom> {
    let (r, q) = (data.len(), ind.rank());
    if q < 1 || r < 1 {
        bail!("data and indices must have rank >= 1, found {r} and {q}");
    }
    if b >= q.min(r) {
        bail!("batch_dims {b} must be smaller than both ranks ({r}, {q})");
    }
    if data[..b] != ind.shape[..b] {
        bail!("batch dims of data {data:?} and indices {:?} differ", ind.shape);
    }
    let k = ind.shape[q - 1];
    if k < 1 || k > r - b {
        bail!("index tuples of length {k} do not fit data of rank {r} with {b} batch dims");
    }
    let st = strides(data);
    let batch_stride: usize = data[b..].iter().product();
    let per_batch: usize = ind.shape[b..q - 1].iter().product();
    let vals = ind.to_i64();
    let mut offsets = Vec::with_capacity(vals.len() / k);
    for (t, tuple) in vals.chunks(k).enumerate() {
        let mut off = (t / per_batch.max(1)) * batch_stride;
        for (j, &v) in tuple.iter().enumerate() {
            off += norm_index(v, data[b + j], "index")? * st[b + j];
        }
        offsets.push(off);
    }
    Ok(NdGeom { offsets, chunk: data[b + k..].iter().product() })
}

/// `GatherND(data, indices)`: gathers the slices of `data` that the last axis of `indices`
/// addresses, after `batch_dims` leading batch axes.
struct GatherND;

impl OpDef for GatherND {
    fn name(&self) -> &'static str {
        "GatherND"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, i) = (cx.input(0)?, cx.input(1)?);
        let b = cx.attrs.int("batch_dims", 0)?.max(0) as usize;
        let shape = match (&x.shape, &i.shape) {
            (Some(d), Some(ind)) if !ind.is_empty() => match ind[ind.len() - 1] {
                Dim::Known(k) if b + k as usize <= d.len() => {
                    Some(ind[..ind.len() - 1].iter().chain(&d[b + k as usize..]).cloned().collect())
                }
                Dim::Known(k) => bail!("index tuples of length {k} do not fit data of rank {}", d.len()),
                _ => None,
            },
            _ => None,
        };
        Ok(vec![TensorType { dtype: x.dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, ind) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_index_dtype(ind, "indices")?;
        let b = cx.attrs.int("batch_dims", 0)?;
        if b < 0 {
            bail!("batch_dims must be non-negative, found {b}");
        }
        let g = nd_geometry(&x.shape, ind, b as usize)?;
        let k = ind.shape[ind.rank() - 1];
        let shape: Vec<usize> = ind.shape[..ind.rank() - 1].iter().chain(&x.shape[b as usize + k..]).copied().collect();
        Ok(vec![gather_runs(x, shape, &g.offsets, g.chunk)?])
    }
}

// ---------------------------------------------------------------------------------------------
// Scatters

#[derive(Clone, Copy, PartialEq)]
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(cx: &EvalCx) -> OpResult<Reduction> {
    Ok(match cx.attrs.string("reduction", "none")?.as_str() {
        "none" => Reduction::None,
        "add" => Reduction::Add,
        "mul" => Reduction::Mul,
        "max" => Reduction::Max,
        "min" => Reduction::Min,
        r => bail!("reduction must be none, add, mul, max or min, found '{r}'"),
    })
}

/// A copy of `data` with `updates[i]` written to (or combined into) `data[targets[i]]`, in order.
fn scatter_apply(data: &Tensor, updates: &Tensor, targets: &[usize], red: Reduction) -> OpResult<Tensor> {
    same_dtype(data, updates, "updates")?;
    if targets.len() != updates.len() {
        bail!("internal: {} scatter targets for {} updates", targets.len(), updates.len());
    }
    let dt = data.dtype();
    if red == Reduction::None {
        return with_elem!(dt, T => {
            let out = scatter_copy(elems::<T>(data)?, elems::<T>(updates)?, targets);
            Ok(build(data.shape.clone(), out))
        });
    }
    if dt == DType::String {
        bail!("reduction is not defined for strings");
    }
    if dt.is_float() {
        let (mut out, upd) = (data.to_f64(), updates.to_f64());
        for (&t, &u) in targets.iter().zip(&upd) {
            let o = &mut out[t];
            *o = match red {
                Reduction::Add => *o + u,
                Reduction::Mul => *o * u,
                Reduction::Max => o.max(u),
                Reduction::Min => o.min(u),
                Reduction::None => u,
            };
        }
        return Ok(Tensor::from_f64(dt, &data.shape, out));
    }
    let (mut out, upd) = (data.to_i64(), updates.to_i64());
    for (&t, &u) in targets.iter().zip(&upd) {
        let o = &mut out[t];
        *o = match red {
            Reduction::Add => o.wrapping_add(u),
            Reduction::Mul => o.wrapping_mul(u),
            Reduction::Max => (*o).max(u),
            Reduction::Min => (*o).min(u),
            Reduction::None => u,
        };
    }
    Ok(Tensor::from_i64_as(dt, &data.shape, out))
}

/// A copy of `data` with `updates[i]` written at `targets[i]`, in order.
fn scatter_copy<T: Clone>(data: &[T], updates: &[T], targets: &[usize]) -> Vec<T> {
    let mut out = data.to_vec();
    for (&t, u) in targets.iter().zip(updates) {
        out[t] = u.clone();
    }
    out
}

/// `ScatterElements(data, indices, updates)` (and the older `Scatter`): a copy of `data` with
/// `out[indices[i][j]][j] = updates[i][j]` (axis 0), optionally reduced with add/mul/max/min.
struct ScatterElements {
    name: &'static str,
}

impl OpDef for ScatterElements {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, ind, upd) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_index_dtype(ind, "indices")?;
        if x.rank() == 0 {
            bail!("data must have rank >= 1");
        }
        if ind.shape != upd.shape {
            bail!("indices {:?} and updates {:?} must have one shape", ind.shape, upd.shape);
        }
        let a = norm_axis(cx.attrs.int("axis", 0)?, x.rank())?;
        let targets = element_targets(&x.shape, ind, a)?;
        Ok(vec![scatter_apply(x, upd, &targets, reduction(cx)?)?])
    }
}

/// `ScatterND(data, indices, updates)`: a copy of `data` with the slices addressed by the index
/// tuples replaced by (or reduced with) `updates`.
struct ScatterND;

impl OpDef for ScatterND {
    fn name(&self) -> &'static str {
        "ScatterND"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, ind, upd) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_index_dtype(ind, "indices")?;
        let g = nd_geometry(&x.shape, ind, 0)?;
        let k = ind.shape[ind.rank() - 1];
        let want: Vec<usize> = ind.shape[..ind.rank() - 1].iter().chain(&x.shape[k..]).copied().collect();
        if upd.shape != want {
            bail!("updates must have shape {want:?}, found {:?}", upd.shape);
        }
        let targets: Vec<usize> = g.offsets.iter().flat_map(|&o| o..o + g.chunk).collect();
        Ok(vec![scatter_apply(x, upd, &targets, reduction(cx)?)?])
    }
}

/// `TensorScatter(past_cache, update, write_indices?)`: writes `update` into the cache along
/// `axis`, starting at each batch entry's write index (`linear`, or `circular` wrapping).
struct TensorScatter;

impl OpDef for TensorScatter {
    fn name(&self) -> &'static str {
        "TensorScatter"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (cache, upd) = (req(inputs, 0)?, req(inputs, 1)?);
        same_dtype(cache, upd, "update")?;
        let circular = match cx.attrs.string("mode", "linear")?.as_str() {
            "linear" => false,
            "circular" => true,
            m => bail!("mode must be linear or circular, found '{m}'"),
        };
        let r = cache.rank();
        let axis = norm_axis(cx.attrs.int("axis", -2)?, r)?;
        if axis == 0 {
            bail!("axis must not be the batch axis 0");
        }
        let ok = upd.rank() == r
            && (0..r).all(|k| if k == axis { upd.shape[k] <= cache.shape[k] } else { upd.shape[k] == cache.shape[k] });
        if !ok {
            bail!("update shape {:?} does not fit cache shape {:?} on axis {axis}", upd.shape, cache.shape);
        }
        let batch = cache.shape[0];
        let wi = match opt(inputs, 2) {
            Some(w) => {
                expect_index_dtype(w, "write_indices")?;
                let v = w.to_i64();
                if v.len() != batch {
                    bail!("write_indices has {} entries, the batch has {batch}", v.len());
                }
                v
            }
            None => vec![0; batch],
        };
        let (max, seq) = (cache.shape[axis], upd.shape[axis]);
        let inner: usize = cache.shape[axis + 1..].iter().product();
        let prefix: usize = cache.shape[..axis].iter().product();
        let per_batch: usize = cache.shape[1..axis].iter().product();
        let mut targets = Vec::with_capacity(upd.len());
        for p in 0..prefix {
            let w = wi[p / per_batch.max(1)];
            for s in 0..seq {
                let mut t = w + s as i64;
                if circular && max > 0 {
                    t = t.rem_euclid(max as i64);
                }
                if t < 0 || t as usize >= max {
                    bail!("write position {t} is out of range for a cache of length {max}");
                }
                let base = (p * max + t as usize) * inner;
                targets.extend(base..base + inner);
            }
        }
        Ok(vec![scatter_apply(cache, upd, &targets, Reduction::None)?])
    }
}

// ---------------------------------------------------------------------------------------------
// NonZero, OneHot

/// `NonZero(X)`: the indices of the non-zero elements, as an int64 `[rank, count]` tensor.
struct NonZero;

impl OpDef for NonZero {
    fn name(&self) -> &'static str {
        "NonZero"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let rank = match x.rank() {
            Some(r) => kd(r.max(1)),
            None => cx.fresh_dim(),
        };
        let n = match cx.const_input(0) {
            Some(t) => kd(t.to_bool().iter().filter(|&&b| b).count()),
            None => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(DType::I64, vec![rank, n])])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        // A scalar behaves as a one-element vector (numpy's nonzero).
        let shape = if x.rank() == 0 { vec![1] } else { x.shape.clone() };
        let nz: Vec<usize> = x.to_bool().iter().enumerate().filter(|(_, &b)| b).map(|(i, _)| i).collect();
        let st = strides(&shape);
        let r = shape.len();
        let mut out = vec![0i64; r * nz.len()];
        for (j, &flat) in nz.iter().enumerate() {
            for k in 0..r {
                out[k * nz.len() + j] = ((flat / st[k]) % shape[k]) as i64;
            }
        }
        Ok(vec![Tensor::from_i64(&[r, nz.len()], out)])
    }
}

/// `OneHot(indices, depth, values)`: a new axis of size `depth` at `axis` holding `values[1]`
/// where it equals the index (negative indices count from `depth`) and `values[0]` elsewhere.
struct OneHot;

fn onehot_axis(cx_attrs: &crate::graph::AttrView, rank: usize) -> OpResult<usize> {
    norm_axis(cx_attrs.int("axis", -1)?, rank + 1)
}

fn depth_of(t: &Tensor) -> OpResult<usize> {
    let Some(d) = t.scalar_value_f64() else { bail!("depth must be a single value, found shape {:?}", t.shape) };
    if !d.is_finite() || d < 0.0 {
        bail!("depth must be a non-negative number, found {d}");
    }
    Ok(d as usize)
}

impl OpDef for OneHot {
    fn name(&self) -> &'static str {
        "OneHot"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (i, v) = (cx.input(0)?, cx.input(2)?);
        let dtype = v.dtype;
        let Some(d) = i.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let a = onehot_axis(&cx.attrs, d.len())?;
        let depth = match cx.const_input(1) {
            Some(t) => kd(depth_of(t)?),
            None => cx.fresh_dim(),
        };
        let mut shape = d;
        shape.insert(a, depth);
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (ind, depth, values) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        if !ind.dtype().is_numeric() {
            bail!("indices must be numeric, found {}", ind.dtype());
        }
        let depth = depth_of(depth)?;
        if values.len() != 2 {
            bail!("values must hold [off_value, on_value], found {} elements", values.len());
        }
        let a = onehot_axis(&cx.attrs, ind.rank())?;
        let mut shape = ind.shape.clone();
        shape.insert(a, depth);
        checked_numel(&shape)?;
        let inner: usize = ind.shape[a..].iter().product();
        let idx = ind.to_i64();
        let dl = depth as i64;
        with_elem!(values.dtype(), T => {
            let out = one_hot(&idx, inner, dl, elems::<T>(values)?);
            Ok(vec![build(shape, out)])
        })
    }
}

/// One-hot rows: for each block of `inner` indices, `depth` rows of `values[1]` where the
/// (normalized) index equals the row and `values[0]` elsewhere.
fn one_hot<T: Clone>(idx: &[i64], inner: usize, depth: i64, values: &[T]) -> Vec<T> {
    let (off, on) = (&values[0], &values[1]);
    let mut out = Vec::with_capacity(idx.len() * depth.max(0) as usize);
    for chunk in idx.chunks(inner.max(1)) {
        for d in 0..depth {
            out.extend(chunk.iter().map(|&i| {
                let i = if i < 0 { i + depth } else { i };
                if i == d {
                    on.clone()
                } else {
                    off.clone()
                }
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathernd_with_batch_dims() {
        // data [2,2,2], indices [2,1] with batch_dims 1 → rows data[b, idx[b]].
        let ind = Tensor::from_i64(&[2, 1], vec![1, 0]);
        let g = nd_geometry(&[2, 2, 2], &ind, 1).unwrap();
        assert_eq!(g.offsets, vec![2, 4]);
        assert_eq!(g.chunk, 2);
    }

    #[test]
    fn scatter_reductions() {
        let data = Tensor::from_f32(&[3], vec![1.0, 2.0, 3.0]);
        let upd = Tensor::from_f32(&[2], vec![5.0, 7.0]);
        let t = scatter_apply(&data, &upd, &[0, 0], Reduction::Add).unwrap();
        assert_eq!(t.as_f32().unwrap(), &[13.0, 2.0, 3.0]);
        let t = scatter_apply(&data, &upd, &[2, 1], Reduction::None).unwrap();
        assert_eq!(t.as_f32().unwrap(), &[1.0, 7.0, 5.0]);
    }
}
