//! Layout ops: Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Expand, Concat, Split, Tile,
//! DepthToSpace, SpaceToDepth.

use super::{axes_in, axis_in};
use super::{build, const_ints, elems, gather_maps, in_dims, istrides, kd, permuted, product_dim, static_len};
use super::{ints_attr_or_input, strided_view};
use crate::bail;
use crate::graph::{checked_numel, ints_of, req};
use crate::graph::{EvalCx, InferCx, OpDef, OpResult, Registry, SymInt};
use crate::tensor::Tensor;
use crate::types::{broadcast_dims, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Reshape,
        &Transpose,
        &Flatten,
        &Squeeze,
        &Unsqueeze,
        &Expand,
        &Concat,
        &Split,
        &Tile,
        &DepthToSpace,
        &SpaceToDepth,
    ]);
}

// ---------------------------------------------------------------------------------------------
// Reshape

/// `Reshape(data, shape)`: same elements, new shape; `0` copies the input dim (unless
/// `allowzero`), `-1` is inferred. Opset < 5 takes `shape` as an attribute.
struct Reshape;

fn allowzero(attrs: &crate::graph::AttrView, opset: i64) -> OpResult<bool> {
    Ok(opset >= 14 && attrs.int("allowzero", 0)? != 0)
}

/// Resolves a Reshape target against a concrete input shape.
fn resolve_reshape(input: &[usize], target: &[i64], allowzero: bool) -> OpResult<Vec<usize>> {
    let total = checked_numel(input)?;
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer_at.replace(i).is_some() {
                    bail!("shape {target:?} has more than one -1");
                }
                out.push(1);
            }
            0 if !allowzero => match input.get(i) {
                Some(&d) => out.push(d),
                None => bail!("shape {target:?} copies dim {i} (0), but the input has rank {}", input.len()),
            },
            t if t < 0 => bail!("shape {target:?} has invalid dim {t}"),
            t => out.push(t as usize),
        }
    }
    let known = checked_numel(&out)?;
    if let Some(i) = infer_at {
        if known == 0 {
            if total != 0 {
                bail!("cannot infer the -1 in shape {target:?} for input shape {input:?}");
            }
            out[i] = 0;
        } else {
            if total % known != 0 {
                bail!("cannot reshape input of shape {input:?} to {target:?}");
            }
            out[i] = total / known;
        }
    } else if known != total {
        bail!("cannot reshape input of shape {input:?} ({total} elements) to {out:?} ({known} elements)");
    }
    Ok(out)
}

/// Symbolic version of [`resolve_reshape`].
fn reshape_dims(cx: &mut InferCx, input: Option<&[Dim]>, target: &[SymInt], allowzero: bool) -> OpResult<Vec<Dim>> {
    let ints: Option<Vec<i64>> = target.iter().map(|t| if let SymInt::Int(n) = t { Some(*n) } else { None }).collect();
    let static_in = input.and_then(|s| s.iter().map(|d| d.known().map(|n| n as usize)).collect::<Option<Vec<_>>>());
    if let (Some(shape), Some(ints)) = (static_in, &ints) {
        return Ok(resolve_reshape(&shape, ints, allowzero)?.into_iter().map(kd).collect());
    }
    let mut out: Vec<Option<Dim>> = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, t) in target.iter().enumerate() {
        let t = match t {
            // A symbolic entry (e.g. the batch size read by `Shape`) is that dimension.
            SymInt::Sym(s) => {
                out.push(Some(Dim::Sym(s.clone())));
                continue;
            }
            SymInt::Int(n) => *n,
        };
        out.push(match t {
            -1 => {
                if infer_at.replace(i).is_some() {
                    bail!("shape {target:?} has more than one -1");
                }
                None
            }
            0 if !allowzero => match input {
                Some(s) => match s.get(i) {
                    Some(d) => Some(d.clone()),
                    None => bail!("shape {target:?} copies dim {i} (0), but the input has rank {}", s.len()),
                },
                None => Some(cx.fresh_dim()),
            },
            t if t < 0 => bail!("shape {target:?} has invalid dim {t}"),
            t => Some(Dim::Known(t as u64)),
        });
    }
    if let Some(i) = infer_at {
        out[i] = Some(infer_minus_one(input, &out).unwrap_or_else(|| cx.fresh_dim()));
    }
    Ok(out.into_iter().map(|d| d.unwrap_or(Dim::Known(1))).collect())
}

/// The `-1` dim of a reshape from symbolic dims: what is left of the input after cancelling the
/// output's known factors and symbols, if that is a single known size or symbol.
fn infer_minus_one(input: Option<&[Dim]>, out: &[Option<Dim>]) -> Option<Dim> {
    let input = input?;
    let mut in_known: u64 = 1;
    let mut in_syms: Vec<&Dim> = Vec::new();
    for d in input {
        match d {
            Dim::Known(k) => in_known = in_known.checked_mul(*k)?,
            s => in_syms.push(s),
        }
    }
    let mut out_known: u64 = 1;
    for d in out.iter().flatten() {
        match d {
            Dim::Known(k) => out_known = out_known.checked_mul(*k)?,
            s => {
                let pos = in_syms.iter().position(|x| *x == s)?;
                in_syms.swap_remove(pos);
            }
        }
    }
    match in_syms.as_slice() {
        [] if out_known != 0 && in_known.is_multiple_of(out_known) => Some(Dim::Known(in_known / out_known)),
        [s] if in_known == out_known => Some((*s).clone()),
        _ => None,
    }
}

impl OpDef for Reshape {
    fn name(&self) -> &'static str {
        "Reshape"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?.clone();
        let az = allowzero(&cx.attrs, cx.opset)?;
        let target = match cx.attrs.ints("shape")? {
            Some(s) => Some(s.into_iter().map(SymInt::Int).collect::<Vec<_>>()),
            None => cx.shape_value(1),
        };
        let shape = match target {
            Some(t) => Some(reshape_dims(cx, x.shape.as_deref(), &t, az)?),
            None => static_len(cx, 1).map(|n| cx.fresh_dims(n)),
        };
        Ok(vec![TensorType { dtype: x.dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let Some(target) = ints_attr_or_input(cx, inputs, "shape", 1)? else { bail!("Reshape needs a 'shape' input") };
        let shape = resolve_reshape(&x.shape, &target, allowzero(&cx.attrs, cx.opset)?)?;
        Ok(vec![x.clone().reshaped(shape)])
    }
}

// ---------------------------------------------------------------------------------------------
// Transpose, Flatten, Squeeze, Unsqueeze

/// `Transpose(data)`: permutes the axes by `perm` (default: reversed).
struct Transpose;

fn perm_of(cx_perm: Option<Vec<i64>>, rank: usize) -> OpResult<Vec<usize>> {
    match cx_perm {
        None => Ok((0..rank).rev().collect()),
        Some(p) => {
            if p.len() != rank {
                bail!("perm {p:?} has {} entries, the input has rank {rank}", p.len());
            }
            axes_in(&p, rank)
        }
    }
}

impl OpDef for Transpose {
    fn name(&self) -> &'static str {
        "Transpose"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let perm = cx.attrs.ints("perm")?;
        let shape = match (&x.shape, perm) {
            (Some(d), p) => {
                let p = perm_of(p, d.len())?;
                Some(p.iter().map(|&i| d[i].clone()).collect())
            }
            (None, Some(p)) => Some(cx.fresh_dims(p.len())),
            (None, None) => None,
        };
        Ok(vec![TensorType { dtype: x.dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let perm = perm_of(cx.attrs.ints("perm")?, x.rank())?;
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(vec![x.clone()]);
        }
        Ok(vec![permuted(x, &x.shape, &perm)])
    }
}

/// `Flatten(input)`: a 2-D view `[prod(dims[..axis]), prod(dims[axis..])]`.
struct Flatten;

fn flatten_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    if axis < -r || axis > r {
        bail!("axis {axis} is out of range for Flatten of rank {rank}");
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}

impl OpDef for Flatten {
    fn name(&self) -> &'static str {
        "Flatten"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let shape = match in_dims(cx, 0)? {
            Some(d) => {
                let a = flatten_axis(cx.attrs.int("axis", 1)?, d.len())?;
                vec![product_dim(cx, &d[..a]), product_dim(cx, &d[a..])]
            }
            None => cx.fresh_dims(2),
        };
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let a = flatten_axis(cx.attrs.int("axis", 1)?, x.rank())?;
        let shape = vec![x.shape[..a].iter().product(), x.shape[a..].iter().product()];
        Ok(vec![x.clone().reshaped(shape)])
    }
}

/// `Squeeze(data, axes?)`: removes the given size-1 axes (default: every size-1 axis).
struct Squeeze;

impl OpDef for Squeeze {
    fn name(&self) -> &'static str {
        "Squeeze"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let Some(d) = &x.shape else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let axes = match cx.attrs.ints("axes")? {
            Some(a) => Some(a),
            None if cx.opt_input(1).is_some() => match const_ints(cx, 1) {
                Some(a) => Some(a),
                // Unknown axes: only the rank is known, when the axes' count is.
                None => {
                    let shape = static_len(cx, 1).and_then(|n| d.len().checked_sub(n)).map(|r| cx.fresh_dims(r));
                    return Ok(vec![TensorType { dtype, shape }]);
                }
            },
            None => None,
        };
        let shape = match axes {
            Some(a) => {
                let a = axes_in(&a, d.len())?;
                for &i in &a {
                    if let Dim::Known(k) = d[i] {
                        if k != 1 {
                            bail!("cannot squeeze axis {i} of size {k}");
                        }
                    }
                }
                (0..d.len()).filter(|i| !a.contains(i)).map(|i| d[i].clone()).collect()
            }
            None => {
                if d.iter().any(|x| matches!(x, Dim::Sym(_))) {
                    return Ok(vec![TensorType::unranked(dtype)]);
                }
                d.iter().filter(|x| **x != Dim::Known(1)).cloned().collect()
            }
        };
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let shape = match ints_attr_or_input(cx, inputs, "axes", 1)? {
            Some(a) => {
                let a = axes_in(&a, x.rank())?;
                for &i in &a {
                    if x.shape[i] != 1 {
                        bail!("cannot squeeze axis {i} of size {}", x.shape[i]);
                    }
                }
                (0..x.rank()).filter(|i| !a.contains(i)).map(|i| x.shape[i]).collect()
            }
            None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
        };
        Ok(vec![x.clone().reshaped(shape)])
    }
}

/// `Unsqueeze(data, axes)`: inserts size-1 axes at the given output positions.
struct Unsqueeze;

fn unsqueeze<T: Clone>(dims: &[T], axes: &[i64], one: T) -> OpResult<Vec<T>> {
    let out_rank = dims.len() + axes.len();
    let a = axes_in(axes, out_rank)?;
    let mut it = dims.iter();
    Ok((0..out_rank)
        .map(|k| if a.contains(&k) { one.clone() } else { it.next().cloned().unwrap_or(one.clone()) })
        .collect())
}

impl OpDef for Unsqueeze {
    fn name(&self) -> &'static str {
        "Unsqueeze"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let axes = match cx.attrs.ints("axes")? {
            Some(a) => Some(a),
            None => const_ints(cx, 1),
        };
        let shape = match (&x.shape, axes) {
            (Some(d), Some(a)) => Some(unsqueeze(d, &a, Dim::Known(1))?),
            (Some(d), None) => static_len(cx, 1).map(|n| cx.fresh_dims(d.len() + n)),
            (None, _) => None,
        };
        Ok(vec![TensorType { dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let Some(axes) = ints_attr_or_input(cx, inputs, "axes", 1)? else { bail!("Unsqueeze needs 'axes'") };
        let shape = unsqueeze(&x.shape, &axes, 1)?;
        Ok(vec![x.clone().reshaped(shape)])
    }
}

// ---------------------------------------------------------------------------------------------
// Expand, Concat, Split, Tile

/// `Expand(input, shape)`: broadcasts the input against `shape` (numpy rules, both ways).
struct Expand;

impl OpDef for Expand {
    fn name(&self) -> &'static str {
        "Expand"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let shape = match cx.shape_value(1) {
            Some(s) => {
                let Some(target) = s.iter().map(SymInt::to_dim).collect::<Option<Vec<Dim>>>() else {
                    bail!("Expand shape {s:?} has a negative dim");
                };
                let mut fresh = Vec::new();
                let Some(mut out) = broadcast_dims(&d, &target, &mut || {
                    fresh.push(());
                    Dim::sym("?")
                }) else {
                    bail!("input shape {} cannot be expanded to {s:?}", TensorType::new(dtype, d))
                };
                for o in out.iter_mut() {
                    if *o == Dim::sym("?") {
                        *o = cx.fresh_dim();
                    }
                }
                Some(out)
            }
            None => static_len(cx, 1).map(|n| {
                let r = n.max(d.len());
                (0..r)
                    .map(|k| match (k + d.len()).checked_sub(r).map(|j| &d[j]) {
                        Some(Dim::Known(v)) if *v != 1 => Dim::Known(*v),
                        _ => cx.fresh_dim(),
                    })
                    .collect()
            }),
        };
        Ok(vec![TensorType { dtype, shape }])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let target = ints_of(req(inputs, 1)?)?;
        if target.iter().any(|&v| v < 0) {
            bail!("Expand shape {target:?} has a negative dim");
        }
        let target: Vec<usize> = target.iter().map(|&v| v as usize).collect();
        let Some(out) = crate::types::broadcast_shapes(&x.shape, &target) else {
            bail!("input shape {:?} cannot be expanded to {target:?}", x.shape)
        };
        checked_numel(&out)?;
        let st = istrides(&x.shape);
        let off = out.len() - x.rank();
        let strides: Vec<isize> =
            (0..out.len()).map(|k| if k < off || x.shape[k - off] == 1 { 0 } else { st[k - off] }).collect();
        Ok(vec![strided_view(x, out, &strides, 0)])
    }
}

/// `Concat(inputs...)`: joins tensors along `axis`.
struct Concat;

fn concat_axis(cx_attrs: &crate::graph::AttrView, opset: i64) -> OpResult<i64> {
    match cx_attrs.get("axis") {
        Some(_) => cx_attrs.int("axis", 0),
        None if opset < 4 => Ok(1),
        None => bail!("Concat needs the 'axis' attribute"),
    }
}

impl OpDef for Concat {
    fn name(&self) -> &'static str {
        "Concat"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let first = cx.input(0)?;
        let dtype = first.dtype;
        let mut ranked: Vec<&Vec<Dim>> = Vec::new();
        let mut any_unranked = false;
        for i in 0..cx.inputs.len() {
            let t = cx.input(i)?;
            if t.dtype != dtype {
                bail!("all inputs must have one element type, found {dtype} and {}", t.dtype);
            }
            match &t.shape {
                Some(s) => ranked.push(s),
                None => any_unranked = true,
            }
        }
        let Some(&r0) = ranked.first() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let rank = r0.len();
        if rank == 0 {
            bail!("Concat inputs must have rank >= 1, found a scalar");
        }
        let axis = axis_in(concat_axis(&cx.attrs, cx.opset)?, rank)?;
        let mut out = Vec::with_capacity(rank);
        let mut sum: Option<u64> = (!any_unranked).then_some(0);
        for s in &ranked {
            if s.len() != rank {
                bail!("all inputs must have one rank, found {rank} and {}", s.len());
            }
            sum = match (sum, &s[axis]) {
                (Some(a), Dim::Known(k)) => Some(a + k),
                _ => None,
            };
        }
        for k in 0..rank {
            if k == axis {
                out.push(match sum {
                    Some(n) => Dim::Known(n),
                    None if ranked.len() == 1 && !any_unranked => r0[k].clone(),
                    None => cx.fresh_dim(),
                });
                continue;
            }
            let mut d = r0[k].clone();
            for s in &ranked {
                match (&d, &s[k]) {
                    (Dim::Known(a), Dim::Known(b)) if a != b => {
                        bail!("inputs differ in dim {k} ({a} vs {b}) outside the concat axis")
                    }
                    (Dim::Sym(_), Dim::Known(_)) => d = s[k].clone(),
                    _ => {}
                }
            }
            out.push(d);
        }
        Ok(vec![TensorType::new(dtype, out)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let ts: Vec<&Tensor> = (0..inputs.len()).map(|i| req(inputs, i)).collect::<OpResult<_>>()?;
        let Some(&t0) = ts.first() else { bail!("Concat needs at least one input") };
        let rank = t0.rank();
        if rank == 0 {
            bail!("Concat inputs must have rank >= 1, found a scalar");
        }
        let axis = axis_in(concat_axis(&cx.attrs, cx.opset)?, rank)?;
        let mut out_shape = t0.shape.clone();
        out_shape[axis] = 0;
        for t in &ts {
            if t.dtype() != t0.dtype() {
                bail!("all inputs must have one element type, found {} and {}", t0.dtype(), t.dtype());
            }
            let same = t.rank() == rank && (0..rank).all(|k| k == axis || t.shape[k] == t0.shape[k]);
            if !same {
                bail!("cannot concatenate shapes {:?} and {:?} along axis {axis}", t0.shape, t.shape);
            }
            out_shape[axis] += t.shape[axis];
        }
        checked_numel(&out_shape)?;
        let outer: usize = t0.shape[..axis].iter().product();
        with_elem!(t0.dtype(), T => {
            let srcs: Vec<&[T]> = ts.iter().map(|t| elems::<T>(t)).collect::<OpResult<_>>()?;
            let chunks: Vec<usize> = ts.iter().map(|t| t.shape[axis..].iter().product()).collect();
            let mut out = Vec::with_capacity(out_shape.iter().product());
            for o in 0..outer {
                for (s, &c) in srcs.iter().zip(&chunks) {
                    out.extend_from_slice(&s[o * c..(o + 1) * c]);
                }
            }
            Ok(vec![build(out_shape, out)])
        })
    }
}

/// `Split(input, split?)`: cuts the input along `axis` into pieces of the given sizes (default:
/// `num_outputs` equal pieces, the last one smaller when the size does not divide).
struct Split;

fn default_split(dim: usize, n: usize) -> OpResult<Vec<usize>> {
    if n == 0 {
        bail!("Split needs at least one output");
    }
    if dim.is_multiple_of(n) {
        return Ok(vec![dim / n; n]);
    }
    let div = dim / n + 1;
    let Some(last) = dim.checked_sub(div * (n - 1)) else {
        bail!("cannot split a dimension of size {dim} into {n} outputs")
    };
    let mut v = vec![div; n];
    v[n - 1] = last;
    Ok(v)
}

fn split_count(cx_attrs: &crate::graph::AttrView, num_outputs: usize) -> OpResult<usize> {
    match cx_attrs.get("num_outputs") {
        Some(_) => {
            let n = cx_attrs.int("num_outputs", 0)?;
            if n < 1 || n as usize != num_outputs {
                bail!("num_outputs is {n}, the node has {num_outputs} outputs");
            }
            Ok(n as usize)
        }
        None => Ok(num_outputs),
    }
}

impl OpDef for Split {
    fn name(&self) -> &'static str {
        "Split"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?.clone();
        let n = split_count(&cx.attrs, cx.num_outputs)?.max(cx.num_outputs);
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(x.dtype); n]);
        };
        if d.is_empty() {
            bail!("cannot split a scalar");
        }
        let axis = axis_in(cx.attrs.int("axis", 0)?, d.len())?;
        let split = match cx.attrs.ints("split")? {
            Some(s) => Some(s),
            None => const_ints(cx, 1),
        };
        let sizes: Vec<Option<u64>> = match (split, &d[axis]) {
            (Some(s), _) => {
                if s.iter().any(|&v| v < 0) {
                    bail!("split sizes {s:?} must be non-negative");
                }
                if let Dim::Known(k) = d[axis] {
                    if s.iter().try_fold(0i64, |a, &b| a.checked_add(b)) != Some(k as i64) {
                        bail!("split sizes {s:?} do not add up to the axis size {k}");
                    }
                }
                s.iter().map(|&v| Some(v as u64)).collect()
            }
            (None, Dim::Known(k)) if cx.opt_input(1).is_none() => {
                default_split(*k as usize, n)?.into_iter().map(|v| Some(v as u64)).collect()
            }
            _ => vec![None; n],
        };
        let mut outs = Vec::with_capacity(sizes.len().max(n));
        for s in sizes.iter().chain(std::iter::repeat(&None)).take(sizes.len().max(n)) {
            let mut dims = d.clone();
            dims[axis] = match s {
                Some(v) => Dim::Known(*v),
                None => cx.fresh_dim(),
            };
            outs.push(TensorType::new(x.dtype, dims));
        }
        Ok(outs)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if x.rank() == 0 {
            bail!("cannot split a scalar");
        }
        let axis = axis_in(cx.attrs.int("axis", 0)?, x.rank())?;
        let dim = x.shape[axis];
        let sizes = match ints_attr_or_input(cx, inputs, "split", 1)? {
            Some(s) => {
                let sum = s.iter().try_fold(0i64, |a, &b| a.checked_add(b));
                if s.iter().any(|&v| v < 0) || sum != Some(dim as i64) {
                    bail!("split sizes {s:?} must be non-negative and add up to the axis size {dim}");
                }
                s.iter().map(|&v| v as usize).collect()
            }
            None => default_split(dim, split_count(&cx.attrs, cx.num_outputs)?)?,
        };
        if sizes.len() < cx.num_outputs {
            bail!("split gives {} pieces, the node has {} outputs", sizes.len(), cx.num_outputs);
        }
        let strides = istrides(&x.shape);
        let mut pos = 0;
        let mut outs = Vec::with_capacity(sizes.len());
        for s in sizes {
            let mut shape = x.shape.clone();
            shape[axis] = s;
            outs.push(strided_view(x, shape, &strides, pos as isize * strides[axis]));
            pos += s;
        }
        Ok(outs)
    }
}

/// `Tile(input, repeats)`: repeats the input `repeats[k]` times along each axis `k`.
struct Tile;

impl OpDef for Tile {
    fn name(&self) -> &'static str {
        "Tile"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let shape = match const_ints(cx, 1) {
            Some(r) => {
                if r.len() != d.len() || r.iter().any(|&v| v < 0) {
                    bail!("repeats {r:?} must be {} non-negative counts", d.len());
                }
                d.iter().zip(&r).map(|(dim, &k)| dim_mul(cx, dim, k as u64)).collect()
            }
            None => cx.fresh_dims(d.len()),
        };
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let r = ints_of(req(inputs, 1)?)?;
        if r.len() != x.rank() || r.iter().any(|&v| v < 0) {
            bail!("repeats {r:?} must be {} non-negative counts", x.rank());
        }
        let out: Vec<usize> = x.shape.iter().zip(&r).map(|(&d, &k)| d.saturating_mul(k as usize)).collect();
        checked_numel(&out)?;
        let maps: Vec<Vec<usize>> = x.shape.iter().zip(&out).map(|(&d, &o)| (0..o).map(|i| i % d).collect()).collect();
        Ok(vec![gather_maps(x, &maps, None)?])
    }
}

/// `d * k` as a dim: known when `d` is, `d` itself when `k == 1`.
pub(crate) fn dim_mul(cx: &mut InferCx, d: &Dim, k: u64) -> Dim {
    match d {
        Dim::Known(n) => match n.checked_mul(k) {
            Some(m) => Dim::Known(m),
            None => cx.fresh_dim(),
        },
        _ if k == 1 => d.clone(),
        _ if k == 0 => Dim::Known(0),
        _ => cx.fresh_dim(),
    }
}

// ---------------------------------------------------------------------------------------------
// DepthToSpace, SpaceToDepth

fn blocksize(cx_attrs: &crate::graph::AttrView) -> OpResult<usize> {
    let b = cx_attrs.int("blocksize", 0)?;
    // blocksize² channels must be countable: larger blocks cannot fit any tensor.
    if !(1..=1 << 16).contains(&b) {
        bail!("blocksize must be a positive integer up to 65536, found {b}");
    }
    Ok(b as usize)
}

fn dcr_mode(cx_attrs: &crate::graph::AttrView) -> OpResult<bool> {
    match cx_attrs.string("mode", "DCR")?.as_str() {
        "DCR" => Ok(true),
        "CRD" => Ok(false),
        m => bail!("mode must be DCR or CRD, found '{m}'"),
    }
}

/// Shape rule shared by DepthToSpace (`up`) and SpaceToDepth.
fn space_depth_infer(cx: &mut InferCx, up: bool) -> OpResult<Vec<TensorType>> {
    let x = cx.input(0)?;
    let dtype = x.dtype;
    let bs = blocksize(&cx.attrs)? as u64;
    let Some(d) = x.shape.clone() else {
        return Ok(vec![TensorType::new(dtype, cx.fresh_dims(4))]);
    };
    if d.len() != 4 {
        bail!("expected a rank-4 input, found rank {}", d.len());
    }
    let div = |cx: &mut InferCx, dim: &Dim, k: u64| -> OpResult<Dim> {
        match dim {
            Dim::Known(n) if n % k != 0 => bail!("dimension {n} is not divisible by {k}"),
            Dim::Known(n) => Ok(Dim::Known(n / k)),
            _ => Ok(cx.fresh_dim()),
        }
    };
    let shape = if up {
        vec![d[0].clone(), div(cx, &d[1], bs * bs)?, dim_mul(cx, &d[2], bs), dim_mul(cx, &d[3], bs)]
    } else {
        vec![d[0].clone(), dim_mul(cx, &d[1], bs * bs), div(cx, &d[2], bs)?, div(cx, &d[3], bs)?]
    };
    Ok(vec![TensorType::new(dtype, shape)])
}

/// `DepthToSpace(input)`: moves depth blocks of `blocksize²` channels into spatial blocks
/// (DCR or CRD channel order).
struct DepthToSpace;

impl OpDef for DepthToSpace {
    fn name(&self) -> &'static str {
        "DepthToSpace"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        space_depth_infer(cx, true)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let bs = blocksize(&cx.attrs)?;
        let [b, c, h, w] = x.shape[..] else { bail!("expected a rank-4 input, found shape {:?}", x.shape) };
        if bs > c.max(1) {
            bail!("blocksize {bs} is larger than the {c} channels");
        }
        if c % (bs * bs) != 0 {
            bail!("channels {c} are not divisible by blocksize² = {}", bs * bs);
        }
        let c2 = c / (bs * bs);
        let t = if dcr_mode(&cx.attrs)? {
            permuted(x, &[b, bs, bs, c2, h, w], &[0, 3, 4, 1, 5, 2])
        } else {
            permuted(x, &[b, c2, bs, bs, h, w], &[0, 1, 4, 2, 5, 3])
        };
        Ok(vec![t.reshaped(vec![b, c2, h * bs, w * bs])])
    }
}

/// `SpaceToDepth(input)`: moves spatial `blocksize × blocksize` blocks into channels.
struct SpaceToDepth;

impl OpDef for SpaceToDepth {
    fn name(&self) -> &'static str {
        "SpaceToDepth"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        space_depth_infer(cx, false)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let bs = blocksize(&cx.attrs)?;
        let [b, c, h, w] = x.shape[..] else { bail!("expected a rank-4 input, found shape {:?}", x.shape) };
        if h % bs != 0 || w % bs != 0 {
            bail!("spatial dims {h}x{w} are not divisible by blocksize {bs}");
        }
        let view = [b, c, h / bs, bs, w / bs, bs];
        let t = if dcr_mode(&cx.attrs)? {
            permuted(x, &view, &[0, 3, 5, 1, 2, 4])
        } else {
            permuted(x, &view, &[0, 1, 3, 5, 2, 4])
        };
        Ok(vec![t.reshaped(vec![b, c * bs * bs, h / bs, w / bs])])
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{attrs, eval, infer};
    use super::*;
    use crate::attr::Attr;
    use crate::tensor::Data;
    use crate::types::DType;

    fn n() -> Dim {
        Dim::sym("N")
    }

    #[test]
    fn reshape_keeps_symbolic_batch() {
        let x = TensorType::new(DType::F32, vec![n(), Dim::Known(3), Dim::Known(4)]);
        let shape = TensorType::known(DType::I64, &[2]);
        let c = Tensor::from_i64(&[2], vec![0, -1]);
        let t = infer(&Reshape, &attrs(&[]), &[x, shape], &[None, Some(c)]).unwrap();
        assert_eq!(t[0], TensorType::new(DType::F32, vec![n(), Dim::Known(12)]));
    }

    #[test]
    fn concat_and_transpose_carry_symbols() {
        let a = TensorType::new(DType::F32, vec![n(), Dim::Known(2)]);
        let b = TensorType::new(DType::F32, vec![n(), Dim::Known(3)]);
        let t = infer(&Concat, &attrs(&[("axis", Attr::Int(-1))]), &[a.clone(), b], &[]).unwrap();
        assert_eq!(t[0], TensorType::new(DType::F32, vec![n(), Dim::Known(5)]));
        let t = infer(&Transpose, &attrs(&[]), &[a], &[]).unwrap();
        assert_eq!(t[0], TensorType::new(DType::F32, vec![Dim::Known(2), n()]));
    }

    #[test]
    fn expand_and_unsqueeze_rules() {
        let x = TensorType::known(DType::F32, &[3, 1]);
        let c = Tensor::from_i64(&[3], vec![2, 1, 6]);
        let t = infer(&Expand, &attrs(&[]), &[x, TensorType::known(DType::I64, &[3])], &[None, Some(c)]);
        assert_eq!(t.unwrap()[0], TensorType::known(DType::F32, &[2, 3, 6]));
        let x = TensorType::new(DType::Bool, vec![n()]);
        let c = Tensor::from_i64(&[2], vec![0, -1]);
        let t = infer(&Unsqueeze, &attrs(&[]), &[x, TensorType::known(DType::I64, &[2])], &[None, Some(c)]);
        assert_eq!(t.unwrap()[0], TensorType::new(DType::Bool, vec![Dim::Known(1), n(), Dim::Known(1)]));
    }

    #[test]
    fn transpose_and_concat_strings() {
        let s = |v: &[&str]| Data::Str(v.iter().map(|x| x.to_string()).collect());
        let x = Tensor::new(vec![2, 2], s(&["a", "b", "c", "d"]));
        let y = eval(&Transpose, &attrs(&[]), &[&x], 1).unwrap();
        assert_eq!(y[0].data, s(&["a", "c", "b", "d"]));
        let y = eval(&Concat, &attrs(&[("axis", Attr::Int(1))]), &[&x, &x], 1).unwrap();
        assert_eq!(y[0].shape, vec![2, 4]);
        assert_eq!(y[0].data, s(&["a", "b", "a", "b", "c", "d", "c", "d"]));
    }

    #[test]
    fn split_uneven_and_depth_to_space() {
        let x = Tensor::from_i64(&[5], (0..5).collect());
        let a = attrs(&[("num_outputs", Attr::Int(2))]);
        let y = eval(&Split, &a, &[&x], 2).unwrap();
        assert_eq!((y[0].to_i64(), y[1].to_i64()), (vec![0, 1, 2], vec![3, 4]));
        let x = Tensor::from_i64(&[1, 4, 1, 1], vec![0, 1, 2, 3]);
        let y = eval(&DepthToSpace, &attrs(&[("blocksize", Attr::Int(2))]), &[&x], 1).unwrap();
        assert_eq!(y[0].shape, vec![1, 1, 2, 2]);
        assert_eq!(y[0].to_i64(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        assert_eq!(resolve_reshape(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(resolve_reshape(&[0, 3], &[3, 0], true).unwrap(), vec![3, 0]);
        assert!(resolve_reshape(&[2, 3], &[4, -1], false).is_err());
        assert!(resolve_reshape(&[2, 3], &[-1, -1], false).is_err());
    }

    #[test]
    fn reshape_infers_symbolic_minus_one() {
        let n = Dim::sym("N");
        let out = infer_minus_one(Some(&[n.clone(), Dim::Known(3), Dim::Known(4)]), &[Some(n.clone()), None]);
        assert_eq!(out, Some(Dim::Known(12)));
        let out = infer_minus_one(Some(&[n.clone(), Dim::Known(12)]), &[Some(Dim::Known(12)), None]);
        assert_eq!(out, Some(n));
    }

    #[test]
    fn default_split_makes_last_chunk_smaller() {
        assert_eq!(default_split(7, 3).unwrap(), vec![3, 3, 1]);
        assert_eq!(default_split(6, 3).unwrap(), vec![2, 2, 2]);
        assert!(default_split(2, 4).is_err());
    }
}
