//! Windowing ops: Slice, Pad, CenterCropPad, Compress, ReverseSequence.

use super::{const_ints, gather_maps, istrides, kd, same_dtype, strided_view, FILL};
use crate::bail;
use crate::graph::{checked_numel, ints_of, norm_axes, norm_axis, opt, req};
use crate::graph::{EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&Slice, &Pad, &CenterCropPad, &Compress, &ReverseSequence]);
}

// ---------------------------------------------------------------------------------------------
// Slice

/// `Slice(data, starts, ends, axes?, steps?)`: numpy-style strided slicing with clamping and
/// negative steps. Opset < 10 takes `starts`/`ends`/`axes` as attributes.
struct Slice;

/// Slice parameters: starts, ends, axes, steps (each possibly unknown at compile time).
struct SliceArgs {
    starts: Vec<i64>,
    ends: Vec<i64>,
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
}

/// numpy's `PySlice_AdjustIndices`: the first index and the element count along a dim.
fn adjust_slice(dim: usize, start: i64, end: i64, step: i64) -> OpResult<(i64, usize)> {
    if step == 0 {
        bail!("slice step must not be 0");
    }
    let d = dim as i128;
    let clamp = |v: i64| -> i128 {
        let mut v = v as i128;
        if v < 0 {
            v += d;
            if v < 0 {
                v = if step < 0 { -1 } else { 0 };
            }
        } else if v >= d {
            v = if step < 0 { d - 1 } else { d };
        }
        v
    };
    let (s, e, st) = (clamp(start), clamp(end), step as i128);
    let len = if st < 0 {
        if e < s {
            (s - e - 1) / (-st) + 1
        } else {
            0
        }
    } else if s < e {
        (e - s - 1) / st + 1
    } else {
        0
    };
    Ok((s as i64, len as usize))
}

impl SliceArgs {
    fn check(&self, rank: usize) -> OpResult<(Vec<usize>, Vec<i64>)> {
        let n = self.starts.len();
        if self.ends.len() != n {
            bail!("starts {:?} and ends {:?} differ in length", self.starts, self.ends);
        }
        let axes = match &self.axes {
            Some(a) if a.len() != n => bail!("axes {a:?} must have {n} entries like starts"),
            Some(a) => norm_axes(a, rank)?,
            None if n > rank => bail!("{n} starts for a rank-{rank} input"),
            None => (0..n).collect(),
        };
        let steps = match &self.steps {
            Some(s) if s.len() != n => bail!("steps {s:?} must have {n} entries like starts"),
            Some(s) => s.clone(),
            None => vec![1; n],
        };
        Ok((axes, steps))
    }

    /// Per-axis (first index, length, step) of the slice of `shape`.
    fn resolve(&self, shape: &[usize]) -> OpResult<Vec<(i64, usize, i64)>> {
        let (axes, steps) = self.check(shape.len())?;
        let mut out: Vec<(i64, usize, i64)> = shape.iter().map(|&d| (0, d, 1)).collect();
        for (i, &a) in axes.iter().enumerate() {
            let (s, len) = adjust_slice(shape[a], self.starts[i], self.ends[i], steps[i])?;
            // The step only matters between two elements; keep strides small otherwise.
            out[a] = (s, len, if len > 1 { steps[i] } else { 1 });
        }
        Ok(out)
    }
}

fn slice_args_eval(cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<SliceArgs> {
    if cx.opset < 10 {
        let (Some(starts), Some(ends)) = (cx.attrs.ints("starts")?, cx.attrs.ints("ends")?) else {
            bail!("Slice (opset < 10) needs 'starts' and 'ends' attributes")
        };
        return Ok(SliceArgs { starts, ends, axes: cx.attrs.ints("axes")?, steps: None });
    }
    Ok(SliceArgs {
        starts: ints_of(req(inputs, 1)?)?,
        ends: ints_of(req(inputs, 2)?)?,
        axes: opt(inputs, 3).map(ints_of).transpose()?,
        steps: opt(inputs, 4).map(ints_of).transpose()?,
    })
}

/// The slice arguments when all are known at compile time.
fn slice_args_infer(cx: &InferCx) -> OpResult<Option<SliceArgs>> {
    if cx.opset < 10 {
        let (Some(starts), Some(ends)) = (cx.attrs.ints("starts")?, cx.attrs.ints("ends")?) else {
            bail!("Slice (opset < 10) needs 'starts' and 'ends' attributes")
        };
        return Ok(Some(SliceArgs { starts, ends, axes: cx.attrs.ints("axes")?, steps: None }));
    }
    let get = |i: usize| -> Option<Option<Vec<i64>>> {
        match cx.opt_input(i) {
            None => Some(None),
            Some(_) => const_ints(cx, i).map(Some),
        }
    };
    let (Some(Some(starts)), Some(Some(ends)), Some(axes), Some(steps)) = (get(1), get(2), get(3), get(4)) else {
        return Ok(None);
    };
    Ok(Some(SliceArgs { starts, ends, axes, steps }))
}

/// Whether a slice of a dim of unknown size provably keeps all of it.
fn keeps_whole_dim(start: i64, end: i64, step: i64) -> bool {
    const BIG: i64 = 1 << 62;
    let forward = step == 1 && (start == 0 || start <= -BIG) && end >= BIG;
    let backward = step == -1 && (start == -1 || start >= BIG) && end <= -BIG;
    forward || backward
}

impl OpDef for Slice {
    fn name(&self) -> &'static str {
        "Slice"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let Some(args) = slice_args_infer(cx)? else {
            // Unknown bounds: the sliced axes get fresh dims (all axes if they are unknown too).
            let axes = if cx.opset >= 10 && cx.opt_input(3).is_some() { const_ints(cx, 3) } else { None };
            let axes = match axes {
                Some(a) => norm_axes(&a, d.len())?,
                None => (0..d.len()).collect(),
            };
            let shape = (0..d.len()).map(|k| if axes.contains(&k) { cx.fresh_dim() } else { d[k].clone() }).collect();
            return Ok(vec![TensorType::new(dtype, shape)]);
        };
        let (axes, steps) = args.check(d.len())?;
        let mut shape = d.clone();
        for (i, &a) in axes.iter().enumerate() {
            shape[a] = match &d[a] {
                Dim::Known(n) => kd(adjust_slice(*n as usize, args.starts[i], args.ends[i], steps[i])?.1),
                Dim::Sym(_) if steps[i] == 0 => bail!("slice step must not be 0"),
                Dim::Sym(_) if keeps_whole_dim(args.starts[i], args.ends[i], steps[i]) => d[a].clone(),
                Dim::Sym(_) => cx.fresh_dim(),
            };
        }
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let per_axis = slice_args_eval(cx, inputs)?.resolve(&x.shape)?;
        let st = istrides(&x.shape);
        let shape: Vec<usize> = per_axis.iter().map(|p| p.1).collect();
        let strides: Vec<isize> = per_axis.iter().zip(&st).map(|(p, &s)| s * p.2 as isize).collect();
        let empty = shape.contains(&0);
        let base: isize = if empty { 0 } else { per_axis.iter().zip(&st).map(|(p, &s)| p.0 as isize * s).sum() };
        Ok(vec![strided_view(x, shape, &strides, base)])
    }
}

// ---------------------------------------------------------------------------------------------
// Pad

/// `Pad(data, pads, constant_value?, axes?)`: pads (or, with negative pads, crops) each axis in
/// `constant`, `reflect`, `edge` or `wrap` mode. Opset < 11 takes `pads` (opset 1: `paddings`)
/// and `value` as attributes.
struct Pad;

#[derive(Clone, Copy, PartialEq)]
enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

fn pad_mode(cx_attrs: &crate::graph::AttrView) -> OpResult<PadMode> {
    Ok(match cx_attrs.string("mode", "constant")?.as_str() {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        m => bail!("Pad mode must be constant, reflect, edge or wrap, found '{m}'"),
    })
}

/// The input index each output position of a padded axis reads (or [`FILL`]). Negative pads crop
/// first; the modes then pad the cropped range.
fn pad_map(dim: usize, begin: i64, end: i64, mode: PadMode) -> OpResult<Vec<usize>> {
    let (begin, end) = (begin as i128, end as i128);
    let lo = (-begin).max(0);
    let hi = dim as i128 - (-end).max(0);
    let c = hi - lo;
    if c < 0 {
        bail!("pads ({begin}, {end}) crop more than the dimension of size {dim}");
    }
    let (pb, pe) = (begin.max(0), end.max(0));
    let total = c + pb + pe;
    if total > crate::tensor::MAX_ELEMENTS as i128 {
        bail!("pads ({begin}, {end}) make a dimension of {total} elements");
    }
    if c == 0 && (pb > 0 || pe > 0) && mode != PadMode::Constant {
        bail!("cannot pad an empty dimension in this mode");
    }
    Ok((0..total)
        .map(|o| {
            let j = o - pb;
            let k = if (0..c).contains(&j) {
                j
            } else {
                match mode {
                    PadMode::Constant => return FILL,
                    PadMode::Edge => j.clamp(0, c - 1),
                    PadMode::Wrap => j.rem_euclid(c),
                    PadMode::Reflect if c == 1 => 0,
                    PadMode::Reflect => {
                        let p = 2 * (c - 1);
                        let m = j.rem_euclid(p);
                        if m >= c {
                            p - m
                        } else {
                            m
                        }
                    }
                }
            };
            (lo + k) as usize
        })
        .collect())
}

/// Full-rank (begin, end) pads from `pads` over `axes` (all axes when absent).
fn full_pads(pads: &[i64], axes: Option<&[i64]>, rank: usize) -> OpResult<Vec<(i64, i64)>> {
    let axes = match axes {
        Some(a) => norm_axes(a, rank)?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        bail!("pads {pads:?} must have 2 × {} entries", axes.len());
    }
    let mut out = vec![(0, 0); rank];
    for (i, &a) in axes.iter().enumerate() {
        out[a] = (pads[i], pads[axes.len() + i]);
    }
    Ok(out)
}

impl OpDef for Pad {
    fn name(&self) -> &'static str {
        "Pad"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let pads = if cx.opset < 11 {
            let attr = if cx.opset < 2 { "paddings" } else { "pads" };
            match cx.attrs.ints(attr)? {
                Some(p) => Some(p),
                None => bail!("Pad needs the '{attr}' attribute"),
            }
        } else {
            const_ints(cx, 1)
        };
        let axes = if cx.opt_input(3).is_some() { const_ints(cx, 3).map(Some) } else { Some(None) };
        let (Some(pads), Some(axes)) = (pads, axes) else {
            return Ok(vec![TensorType::new(dtype, cx.fresh_dims(d.len()))]);
        };
        let full = full_pads(&pads, axes.as_deref(), d.len())?;
        let mut shape = Vec::with_capacity(d.len());
        for (dim, &(b, e)) in d.iter().zip(&full) {
            shape.push(match dim {
                Dim::Known(n) => {
                    let v = *n as i128 + b as i128 + e as i128;
                    if v < 0 {
                        bail!("pads ({b}, {e}) crop more than the dimension of size {n}");
                    }
                    Dim::Known(v as u64)
                }
                _ if b == 0 && e == 0 => dim.clone(),
                _ => cx.fresh_dim(),
            });
        }
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let mode = pad_mode(&cx.attrs)?;
        let (pads, value, axes) = if cx.opset < 11 {
            let attr = if cx.opset < 2 { "paddings" } else { "pads" };
            let Some(p) = cx.attrs.ints(attr)? else { bail!("Pad needs the '{attr}' attribute") };
            let v = cx.attrs.float("value", 0.0)? as f64;
            (p, Some(Tensor::from_f64(x.dtype(), &[1], vec![v])), None)
        } else {
            let v = opt(inputs, 2).cloned();
            if let Some(v) = &v {
                same_dtype(x, v, "constant_value")?;
            }
            (ints_of(req(inputs, 1)?)?, v, opt(inputs, 3).map(ints_of).transpose()?)
        };
        let full = full_pads(&pads, axes.as_deref(), x.rank())?;
        let maps: Vec<Vec<usize>> =
            x.shape.iter().zip(&full).map(|(&d, &(b, e))| pad_map(d, b, e, mode)).collect::<OpResult<_>>()?;
        Ok(vec![gather_maps(x, &maps, value.as_ref())?])
    }
}

// ---------------------------------------------------------------------------------------------
// CenterCropPad, Compress, ReverseSequence

/// `CenterCropPad(input, shape)`: center-crops or zero-pads the given `axes` to `shape`.
struct CenterCropPad;

impl OpDef for CenterCropPad {
    fn name(&self) -> &'static str {
        "CenterCropPad"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let axes = match cx.attrs.ints("axes")? {
            Some(a) => norm_axes(&a, d.len())?,
            None => (0..d.len()).collect(),
        };
        let target = const_ints(cx, 1);
        let mut shape = d.clone();
        for (i, &a) in axes.iter().enumerate() {
            shape[a] = match target.as_ref().map(|t| t.get(i).copied()) {
                Some(Some(v)) if v >= 0 => Dim::Known(v as u64),
                Some(_) => bail!("shape {target:?} must have one non-negative size per axis"),
                None => cx.fresh_dim(),
            };
        }
        Ok(vec![TensorType::new(dtype, shape)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let target = ints_of(req(inputs, 1)?)?;
        let axes = match cx.attrs.ints("axes")? {
            Some(a) => norm_axes(&a, x.rank())?,
            None => (0..x.rank()).collect(),
        };
        if target.len() != axes.len() || target.iter().any(|&v| v < 0) {
            bail!("shape {target:?} must have one non-negative size per axis ({} axes)", axes.len());
        }
        let mut maps: Vec<Vec<usize>> = x.shape.iter().map(|&d| (0..d).collect()).collect();
        for (&a, &sh) in axes.iter().zip(&target) {
            let (dim, sh) = (x.shape[a], sh as usize);
            checked_numel(&[sh])?;
            maps[a] = if sh <= dim {
                let start = (dim - sh) / 2;
                (start..start + sh).collect()
            } else {
                let start = (sh - dim) / 2;
                (0..sh).map(|o| if o >= start && o < start + dim { o - start } else { FILL }).collect()
            };
        }
        Ok(vec![gather_maps(x, &maps, None)?])
    }
}

/// `Compress(input, condition)`: keeps the slices along `axis` (the flattened input when absent)
/// whose condition is true.
struct Compress;

impl OpDef for Compress {
    fn name(&self) -> &'static str {
        "Compress"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let count = cx.const_input(1).map(|c| c.to_bool().iter().filter(|&&b| b).count());
        let n = match count {
            Some(c) => kd(c),
            None => cx.fresh_dim(),
        };
        let shape = match (cx.attrs.get("axis"), &x.shape) {
            (None, _) => Some(vec![n]),
            (Some(_), Some(d)) => {
                let a = norm_axis(cx.attrs.int("axis", 0)?, d.len())?;
                let mut s = d.clone();
                s[a] = n;
                Some(s)
            }
            (Some(_), None) => None,
        };
        Ok(vec![TensorType { dtype, shape }])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let cond = req(inputs, 1)?;
        if cond.rank() != 1 {
            bail!("condition must be 1-D, found shape {:?}", cond.shape);
        }
        let (x, axis) = match cx.attrs.get("axis") {
            None => (x.clone().reshaped(vec![x.len()]), 0),
            Some(_) => (x.clone(), norm_axis(cx.attrs.int("axis", 0)?, x.rank())?),
        };
        if x.rank() == 0 {
            bail!("Compress with an axis needs an input of rank >= 1");
        }
        let dim = x.shape[axis];
        let keep: Vec<usize> = cond.to_bool().iter().enumerate().filter(|(_, &b)| b).map(|(i, _)| i).collect();
        if keep.last().is_some_and(|&i| i >= dim) {
            bail!("condition has {} entries, the axis has only {dim}", cond.len());
        }
        let mut maps: Vec<Vec<usize>> = x.shape.iter().map(|&d| (0..d).collect()).collect();
        maps[axis] = keep;
        Ok(vec![gather_maps(&x, &maps, None)?])
    }
}

/// `ReverseSequence(input, sequence_lens)`: reverses the first `sequence_lens[b]` steps along
/// `time_axis` of each batch entry `b` along `batch_axis`.
struct ReverseSequence;

impl OpDef for ReverseSequence {
    fn name(&self) -> &'static str {
        "ReverseSequence"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        super::super::same_as_input(cx, 0)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let lens = ints_of(req(inputs, 1)?)?;
        if x.rank() < 2 {
            bail!("input must have rank >= 2, found {}", x.rank());
        }
        let ba = norm_axis(cx.attrs.int("batch_axis", 1)?, x.rank())?;
        let ta = norm_axis(cx.attrs.int("time_axis", 0)?, x.rank())?;
        if ba == ta || ba > 1 || ta > 1 {
            bail!("batch_axis and time_axis must be 0 and 1 in some order, found {ba} and {ta}");
        }
        let (nb, nt) = (x.shape[ba], x.shape[ta]);
        if lens.len() != nb {
            bail!("sequence_lens has {} entries, the batch has {nb}", lens.len());
        }
        if let Some(&l) = lens.iter().find(|&&l| l < 0 || l as usize > nt) {
            bail!("sequence length {l} is out of range [0, {nt}]");
        }
        let st = crate::tensor::strides(&x.shape);
        let idx: Vec<usize> = (0..x.len())
            .map(|o| {
                let b = (o / st[ba]) % nb;
                let t = (o / st[ta]) % nt;
                let l = lens[b] as usize;
                if t < l {
                    o - t * st[ta] + (l - 1 - t) * st[ta]
                } else {
                    o
                }
            })
            .collect();
        Ok(vec![x.gather_flat(x.shape.clone(), &idx)])
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{attrs, eval, infer};
    use super::*;
    use crate::types::DType;

    #[test]
    fn slice_infers_known_and_symbolic_dims() {
        let x = TensorType::new(DType::F32, vec![Dim::sym("N"), Dim::Known(10)]);
        let i = TensorType::known(DType::I64, &[1]);
        let c = |v: i64| Some(Tensor::from_i64(&[1], vec![v]));
        let t = infer(&Slice, &attrs(&[]), &[x.clone(), i.clone(), i.clone(), i.clone()], &[None, c(2), c(-3), c(1)]);
        assert_eq!(t.unwrap()[0], TensorType::new(DType::F32, vec![Dim::sym("N"), Dim::Known(5)]));
        let t = infer(&Slice, &attrs(&[]), &[x.clone(), i.clone(), i.clone(), i], &[None, c(0), c(i64::MAX), c(0)]);
        assert_eq!(t.unwrap()[0], x);
    }

    #[test]
    fn slice_negative_step_and_pad_reflect() {
        let x = Tensor::from_i64(&[5], (0..5).collect());
        let t = |v: i64| Tensor::from_i64(&[1], vec![v]);
        let y = eval(&Slice, &attrs(&[]), &[&x, &t(-1), &t(i64::MIN), &t(0), &t(-2)], 1).unwrap();
        assert_eq!(y[0].to_i64(), vec![4, 2, 0]);
        let x = Tensor::from_f32(&[3], vec![1.0, 2.0, 3.0]);
        let a = attrs(&[("mode", crate::attr::Attr::Str("reflect".into()))]);
        let pads = Tensor::from_i64(&[2], vec![2, 1]);
        let y = eval(&Pad, &a, &[&x, &pads], 1).unwrap();
        assert_eq!(y[0].as_f32().unwrap(), &[3.0, 2.0, 1.0, 2.0, 3.0, 2.0]);
    }

    #[test]
    fn slice_clamps_like_numpy() {
        assert_eq!(adjust_slice(10, 0, i64::MAX, 1).unwrap(), (0, 10));
        assert_eq!(adjust_slice(10, -1, i64::MIN, -1).unwrap(), (9, 10));
        assert_eq!(adjust_slice(10, 20, 1000, 1).unwrap(), (10, 0));
        assert_eq!(adjust_slice(10, 8, 1, -3).unwrap(), (8, 3));
        assert!(adjust_slice(3, 0, 1, 0).is_err());
    }

    #[test]
    fn pad_maps_each_mode() {
        assert_eq!(pad_map(3, 2, 1, PadMode::Reflect).unwrap(), vec![2, 1, 0, 1, 2, 1]);
        assert_eq!(pad_map(3, 2, 1, PadMode::Edge).unwrap(), vec![0, 0, 0, 1, 2, 2]);
        assert_eq!(pad_map(3, 2, 1, PadMode::Wrap).unwrap(), vec![1, 2, 0, 1, 2, 0]);
        assert_eq!(pad_map(3, 1, -1, PadMode::Constant).unwrap(), vec![FILL, 0, 1]);
        assert!(pad_map(2, -2, -1, PadMode::Constant).is_err());
    }
}
