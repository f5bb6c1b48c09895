//! Control flow: If, Loop and Scan. Their bodies are the op's regions: a region's block
//! arguments are the subgraph's inputs and its yields are the subgraph's outputs; `eval` runs
//! them through [`crate::graph::RegionRunner`].
//!
//! Result types: the values a body yields are typed in the module, which a shape rule cannot
//! see, so the frontend records their element types in the `kiln.result_dtypes` attribute
//! (ONNX type names, one per op result) and `infer` returns unranked tensors of those types.
//! Without the attribute, loop-carried/state results take their initial value's type and any
//! other result defaults to float.

use super::result_dtypes;
use crate::bail;
use crate::graph::{norm_axis, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::ir::Region;
use crate::tensor::{Data, Tensor};
use crate::types::{DType, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&If, &Loop, &Scan, &Fused]);
}

/// `fused` (kiln's own op, `graph.fused`): a group of graph ops that later lowering turns into
/// one kernel. Its region (graph attribute `body`) takes the op's operands as block arguments
/// and yields its results; attribute `kind` says what the kernel is built around
/// (`elementwise`, `reduction`, `contraction`, `attention`, ...). Semantics: run the region.
/// Result types come from `kiln.result_dtypes`; the verifier checks them against the region's
/// yields.
struct Fused;

impl OpDef for Fused {
    fn name(&self) -> &'static str {
        "fused"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        result_types(cx, &[])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let body = region(cx, "body")?;
        let args = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                Some(t) => Ok((*t).clone()),
                None => bail!("fused operand {i} is missing"),
            })
            .collect::<OpResult<Vec<_>>>()?;
        let outs = cx.runner.run_region(body, args)?;
        if outs.len() != cx.num_outputs {
            bail!("the fused body yields {} values, the op has {} results", outs.len(), cx.num_outputs);
        }
        Ok(outs)
    }
}

/// Unranked result types from `kiln.result_dtypes`, else `fallback[i]`, else float.
fn result_types(cx: &InferCx, fallback: &[DType]) -> OpResult<Vec<TensorType>> {
    let declared = result_dtypes(&cx.attrs)?.unwrap_or_default();
    Ok((0..cx.num_outputs)
        .map(|i| {
            let dt = declared.get(i).or(fallback.get(i)).copied().unwrap_or(DType::F32);
            TensorType::unranked(dt)
        })
        .collect())
}

/// The region a graph attribute names.
fn region<'a>(cx: &EvalCx<'a>, attr: &str) -> OpResult<&'a Region> {
    let i = cx.attrs.region(attr)? as usize;
    match cx.regions.get(i) {
        Some(r) => Ok(r),
        None => bail!("graph attribute '{attr}' names region {i}, the op has {}", cx.regions.len()),
    }
}

/// A single-element boolean condition.
fn cond_of(t: &Tensor, what: &str) -> OpResult<bool> {
    if t.len() != 1 {
        bail!("{what} must have one element, found shape {:?}", t.shape);
    }
    Ok(t.to_bool()[0])
}

/// `If`: runs `then_branch` when `cond` is true, else `else_branch`; its results are the
/// branch's outputs.
struct If;

impl OpDef for If {
    fn name(&self) -> &'static str {
        "If"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        result_types(cx, &[])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let c = cond_of(crate::graph::req(inputs, 0)?, "cond")?;
        let body = region(cx, if c { "then_branch" } else { "else_branch" })?;
        let outs = cx.runner.run_region(body, vec![])?;
        if outs.len() < cx.num_outputs {
            bail!("the branch yields {} values, the op has {} results", outs.len(), cx.num_outputs);
        }
        Ok(outs)
    }
}

/// `Loop`: runs `body(iteration_num, cond, carried...)` → `(cond, carried..., scan...)` while
/// the condition holds and fewer than `M` iterations ran; results are the final carried values
/// and each scan output stacked along a new leading axis.
struct Loop;

impl OpDef for Loop {
    fn name(&self) -> &'static str {
        "Loop"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let carried: Vec<DType> =
            cx.inputs.iter().skip(2).map(|t| t.as_ref().map_or(DType::F32, |t| t.dtype)).collect();
        result_types(cx, &carried)
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let max = match inputs.first().copied().flatten() {
            Some(m) if m.len() == 1 && m.dtype().is_int() => Some(m.to_i64()[0]),
            Some(m) => bail!("M must be a single integer, found {} {:?}", m.dtype(), m.shape),
            None => None,
        };
        let mut cond = match inputs.get(1).copied().flatten() {
            Some(c) => cond_of(c, "cond")?,
            None => true,
        };
        let mut carried: Vec<Tensor> = inputs
            .iter()
            .skip(2)
            .enumerate()
            .map(|(i, t)| match t {
                Some(t) => Ok((*t).clone()),
                None => bail!("loop-carried input {i} is missing"),
            })
            .collect::<OpResult<_>>()?;
        let n = carried.len();
        let k = cx.num_outputs.saturating_sub(n);
        let body = region(cx, "body")?;
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); k];
        let mut it: i64 = 0;
        while cond && max.is_none_or(|m| it < m) {
            let mut args = vec![Tensor::from_i64(&[], vec![it]), Tensor::from_bool(&[], vec![cond])];
            args.append(&mut carried);
            let mut outs = cx.runner.run_region(body, args)?;
            if outs.len() < 1 + n + k {
                bail!("the body yields {} values, expected at least {}", outs.len(), 1 + n + k);
            }
            cond = cond_of(&outs[0], "the body's condition output")?;
            let rest = outs.split_off(1);
            let (c, s) = rest.split_at(n);
            carried = c.to_vec();
            for (acc, t) in scans.iter_mut().zip(s) {
                acc.push(t.clone());
            }
            it += 1;
        }
        let dtypes = result_dtypes(&cx.attrs)?.unwrap_or_default();
        let mut out = carried;
        for (i, slices) in scans.into_iter().enumerate() {
            let dt = dtypes.get(n + i).copied().unwrap_or(DType::F32);
            out.push(stack(&slices, 0, dt)?);
        }
        Ok(out)
    }
}

/// `Scan` (opset 8 with a batch axis and `sequence_lens`, opset 9+ without): runs
/// `body(state..., scan slices...)` → `(state..., scan output slices...)` once per slice of the
/// scan inputs along their scan axes (optionally reversed); results are the final states and
/// the scan output slices stacked along their output axes.
struct Scan;

impl OpDef for Scan {
    fn name(&self) -> &'static str {
        "Scan"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let skip = usize::from(cx.opset < 9);
        let states: Vec<DType> =
            cx.inputs.iter().skip(skip).map(|t| t.as_ref().map_or(DType::F32, |t| t.dtype)).collect();
        result_types(cx, &states)
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let m = cx.attrs.int("num_scan_inputs", 0)?;
        if m <= 0 {
            bail!("num_scan_inputs must be positive, found {m}");
        }
        let m = m as usize;
        let v1 = cx.opset < 9;
        let skip = usize::from(v1);
        let vals: Vec<&Tensor> = inputs
            .iter()
            .skip(skip)
            .enumerate()
            .map(|(i, t)| match t {
                Some(t) => Ok(*t),
                None => bail!("input {} is missing", i + skip),
            })
            .collect::<OpResult<_>>()?;
        if vals.len() < m {
            bail!("expected at least {m} scan inputs, found {} inputs", vals.len());
        }
        let n = vals.len() - m;
        let k = cx.num_outputs.saturating_sub(n);
        let dtypes = result_dtypes(&cx.attrs)?.unwrap_or_default();
        let out_dt = |i: usize| dtypes.get(n + i).copied().unwrap_or(DType::F32);
        let body = region(cx, "body")?;
        let ints = |name: &str, len: usize| -> OpResult<Vec<i64>> {
            let v = cx.attrs.ints(name)?.unwrap_or_else(|| vec![0; len]);
            if v.len() != len {
                bail!("{name} must have {len} entries, found {}", v.len());
            }
            Ok(v)
        };
        if v1 {
            let dirs = ints("directions", m)?;
            return scan_batched(cx, body, inputs.first().copied().flatten(), &vals, n, k, &dirs, out_dt);
        }
        let in_axes = ints("scan_input_axes", m)?;
        let in_dirs = ints("scan_input_directions", m)?;
        let out_axes = ints("scan_output_axes", k)?;
        let out_dirs = ints("scan_output_directions", k)?;
        let mut axes = Vec::with_capacity(m);
        let mut len = None;
        for (j, t) in vals[n..].iter().enumerate() {
            if t.rank() == 0 {
                bail!("scan input {j} must have rank at least 1");
            }
            let a = norm_axis(in_axes[j], t.rank())?;
            if len.is_some_and(|l| l != t.shape[a]) {
                bail!("scan inputs have different lengths along their scan axes");
            }
            len = Some(t.shape[a]);
            axes.push(a);
        }
        let len = len.unwrap_or(0);
        let mut states: Vec<Tensor> = vals[..n].iter().map(|t| (*t).clone()).collect();
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); k];
        for it in 0..len {
            let mut args = std::mem::take(&mut states);
            for (j, t) in vals[n..].iter().enumerate() {
                let i = if in_dirs[j] == 1 { len - 1 - it } else { it };
                args.push(slice_axis(t, axes[j], i));
            }
            let outs = cx.runner.run_region(body, args)?;
            if outs.len() < n + k {
                bail!("the body yields {} values, expected {}", outs.len(), n + k);
            }
            let (s, rest) = outs.split_at(n);
            states = s.to_vec();
            for (acc, t) in scans.iter_mut().zip(rest) {
                acc.push(t.clone());
            }
        }
        let mut out = states;
        for (i, mut slices) in scans.into_iter().enumerate() {
            if out_dirs[i] == 1 {
                slices.reverse();
            }
            let rank = slices.first().map_or(0, |t| t.rank()) + 1;
            let axis = norm_axis(out_axes[i], rank)?;
            out.push(stack(&slices, axis, out_dt(i))?);
        }
        Ok(out)
    }
}

/// Scan-8: every state and scan input has a leading batch axis; each batch entry is scanned on
/// its own (for `sequence_lens[b]` steps), scan outputs are zero-padded to the full length.
#[allow(clippy::too_many_arguments)]
fn scan_batched(
    cx: &EvalCx,
    body: &Region,
    lens: Option<&Tensor>,
    vals: &[&Tensor],
    n: usize,
    k: usize,
    dirs: &[i64],
    out_dt: impl Fn(usize) -> DType,
) -> OpResult<Vec<Tensor>> {
    for t in vals {
        if t.rank() == 0 {
            bail!("Scan-8 inputs need a batch axis, found a scalar");
        }
    }
    let batch = vals[0].shape[0];
    let first = vals[n];
    if first.rank() < 2 {
        bail!("Scan-8 scan inputs need [batch, sequence, ...] shapes, found {:?}", first.shape);
    }
    let seq = first.shape[1];
    if vals.iter().any(|t| t.shape[0] != batch) || vals[n..].iter().any(|t| t.rank() < 2 || t.shape[1] != seq) {
        bail!("Scan-8 inputs must share batch size {batch} and sequence length {seq}");
    }
    let lens: Vec<usize> = match lens {
        Some(l) => l
            .to_i64()
            .into_iter()
            .map(|v| {
                if (0..=seq as i64).contains(&v) {
                    Ok(v as usize)
                } else {
                    bail!("sequence length {v} is out of range [0, {seq}]")
                }
            })
            .collect::<OpResult<_>>()?,
        None => vec![seq; batch],
    };
    if lens.len() != batch {
        bail!("sequence_lens must have {batch} entries, found {}", lens.len());
    }
    let mut final_states: Vec<Vec<Tensor>> = vec![Vec::new(); n];
    let mut scan_out: Vec<Vec<Tensor>> = vec![Vec::new(); k];
    for (b, &len) in lens.iter().enumerate() {
        let mut states: Vec<Tensor> = vals[..n].iter().map(|t| slice_axis(t, 0, b)).collect();
        let seqs: Vec<Tensor> = vals[n..].iter().map(|t| slice_axis(t, 0, b)).collect();
        let mut slices: Vec<Vec<Tensor>> = vec![Vec::new(); k];
        for it in 0..len {
            let mut args = std::mem::take(&mut states);
            for (j, t) in seqs.iter().enumerate() {
                let i = if dirs[j] == 1 { len - 1 - it } else { it };
                args.push(slice_axis(t, 0, i));
            }
            let outs = cx.runner.run_region(body, args)?;
            if outs.len() < n + k {
                bail!("the body yields {} values, expected {}", outs.len(), n + k);
            }
            let (s, rest) = outs.split_at(n);
            states = s.to_vec();
            for (acc, t) in slices.iter_mut().zip(rest) {
                acc.push(t.clone());
            }
        }
        for (acc, s) in final_states.iter_mut().zip(states) {
            acc.push(s);
        }
        for (i, mut sl) in slices.into_iter().enumerate() {
            if let Some(proto) = sl.first().cloned() {
                while sl.len() < seq {
                    sl.push(Tensor::zeros(proto.dtype(), &proto.shape));
                }
            }
            scan_out[i].push(stack(&sl, 0, out_dt(i))?);
        }
    }
    let mut out = Vec::with_capacity(n + k);
    for (i, s) in final_states.into_iter().enumerate() {
        out.push(stack(&s, 0, vals[i].dtype())?);
    }
    for (i, s) in scan_out.into_iter().enumerate() {
        out.push(stack(&s, 0, out_dt(i))?);
    }
    Ok(out)
}

/// The `i`-th slice of `t` along `axis`, with that axis removed.
fn slice_axis(t: &Tensor, axis: usize, i: usize) -> Tensor {
    let outer: usize = t.shape[..axis].iter().product();
    let n = t.shape[axis];
    let inner: usize = t.shape[axis + 1..].iter().product();
    let idx: Vec<usize> = (0..outer).flat_map(|o| (0..inner).map(move |k| (o * n + i) * inner + k)).collect();
    let mut shape = t.shape.clone();
    shape.remove(axis);
    t.gather_flat(shape, &idx)
}

/// Appends `b`'s elements to `a` when both hold one element type.
fn append(a: &mut Data, b: &Data) -> bool {
    macro_rules! cat {
        ($($v:ident),*) => {
            match (a, b) {
                $((Data::$v(x), Data::$v(y)) => { x.extend_from_slice(y); true })*
                _ => false,
            }
        };
    }
    cat!(F16, BF16, F32, F64, I8, I16, I32, I64, U8, U16, U32, U64, Bool, Str)
}

/// Stacks equally shaped tensors along a new axis `axis`; no tensors gives shape `[0]` of `dt`.
fn stack(ts: &[Tensor], axis: usize, dt: DType) -> OpResult<Tensor> {
    let Some(first) = ts.first() else {
        return Ok(Tensor::zeros(dt, &[0]));
    };
    if axis > first.rank() {
        bail!("stacking axis {axis} is out of range for slices of rank {}", first.rank());
    }
    let mut all = Data::zeros(first.dtype(), 0);
    for t in ts {
        if t.shape != first.shape || !append(&mut all, &t.data) {
            bail!("scan output slices differ: {} {:?} and {} {:?}", first.dtype(), first.shape, t.dtype(), t.shape);
        }
    }
    let n = ts.len();
    let len = first.len();
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis..].iter().product();
    let idx: Vec<usize> =
        (0..outer).flat_map(|o| (0..n).flat_map(move |j| (0..inner).map(move |k| j * len + o * inner + k))).collect();
    let mut shape = first.shape.clone();
    shape.insert(axis, n);
    let flat = Tensor { shape: vec![n * len], data: all };
    Ok(flat.gather_flat(shape, &idx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::{Attr, Attrs};
    use crate::ir::{Block, Module};

    /// `main(M: i64, x: f32[1])` = Loop(M, -, x) with body `y = x + x`, yielding `(cond, y, y)`.
    fn doubling_loop() -> Module {
        let mut m = Module::new("t");
        let f1 = TensorType::known(DType::F32, &[1]);
        let mv = m.add_arg(TensorType::known(DType::I64, &[]), Some("M".into()));
        let x = m.add_arg(f1.clone(), Some("x".into()));
        let it = m.add_arg(TensorType::known(DType::I64, &[]), None);
        let c = m.add_arg(TensorType::known(DType::Bool, &[]), None);
        let xi = m.add_arg(f1.clone(), None);
        let add = m.create_op("graph.Add", vec![Some(xi), Some(xi)], vec![f1.clone()], Attrs::new(), vec![]);
        let y = m.op(add).results[0];
        let body = Region { blocks: vec![Block { args: vec![it, c, xi], ops: vec![add], yields: vec![c, y, y] }] };
        let mut attrs = Attrs::new();
        attrs.insert("body".into(), Attr::Region(0));
        attrs.insert("kiln.result_dtypes".into(), Attr::Strs(vec!["float".into(), "float".into()]));
        let lp = m.create_op(
            "graph.Loop",
            vec![Some(mv), None, Some(x)],
            vec![TensorType::unranked(DType::F32), TensorType::unranked(DType::F32)],
            attrs,
            vec![body],
        );
        m.body = Block { args: vec![mv, x], ops: vec![lp], yields: m.op(lp).results.clone() };
        m
    }

    #[test]
    fn loop_carries_values_and_stacks_scan_outputs() {
        let m = doubling_loop();
        let out =
            crate::interp::run(&m, vec![Tensor::from_i64(&[], vec![3]), Tensor::from_f32(&[1], vec![1.0])]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[8.0]);
        assert_eq!(out[1].shape, vec![3, 1]);
        assert_eq!(out[1].as_f32().unwrap(), &[2.0, 4.0, 8.0]);
        // Zero trips: the initial value comes back and the scan output is empty.
        let out =
            crate::interp::run(&m, vec![Tensor::from_i64(&[], vec![0]), Tensor::from_f32(&[1], vec![1.0])]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[1.0]);
        assert_eq!(out[1].shape, vec![0]);
    }

    #[test]
    fn stack_and_slice_round_trip() {
        let a = Tensor::from_i64(&[2], vec![1, 2]);
        let b = Tensor::from_i64(&[2], vec![3, 4]);
        let s0 = stack(&[a.clone(), b.clone()], 0, DType::I64).unwrap();
        assert_eq!((s0.shape.clone(), s0.to_i64()), (vec![2, 2], vec![1, 2, 3, 4]));
        let s1 = stack(&[a, b.clone()], 1, DType::I64).unwrap();
        assert_eq!(s1.to_i64(), vec![1, 3, 2, 4]);
        assert_eq!(slice_axis(&s1, 1, 1), b);
        assert_eq!(stack(&[], 0, DType::F32).unwrap().shape, vec![0]);
    }
}
