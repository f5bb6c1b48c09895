//! Resize (and the older Upsample): separable nearest / linear / cubic interpolation.
//!
//! Each resized axis is planned once ([`plan_axis`]: for every output position, the input taps
//! and their weights, following the ONNX reference's coordinate transforms, neighbor selection,
//! `exclude_outside` and antialias filters), then applied as one pass over the data
//! ([`apply_axis`]). f32 inputs are resized in f32; other types in f64.

use super::axes_in;
use super::{const_ints, kd};
use crate::bail;
use crate::graph::{checked_numel, opt, req};
use crate::graph::{AttrView, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&Resize, &Upsample]);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// onnxruntime's opset < 11 rule: floor when upsampling, ceil when downsampling.
    Simple,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Nearest(Nearest),
    Linear,
    Cubic,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
    TfCropAndResize,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Policy {
    Stretch,
    NotLarger,
    NotSmaller,
}

/// Resize's attributes, with defaults by opset.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    mode: Mode,
    coord: Coord,
    cubic_a: f64,
    exclude_outside: bool,
    extrapolation: f64,
    antialias: bool,
    policy: Policy,
}

impl Cfg {
    fn resize(a: &AttrView, opset: i64) -> OpResult<Cfg> {
        let legacy = opset < 11;
        let nearest = match a.string("nearest_mode", "round_prefer_floor")?.as_str() {
            _ if legacy => Nearest::Simple,
            "round_prefer_floor" => Nearest::RoundPreferFloor,
            "round_prefer_ceil" => Nearest::RoundPreferCeil,
            "floor" => Nearest::Floor,
            "ceil" => Nearest::Ceil,
            m => bail!("unknown nearest_mode '{m}'"),
        };
        let mode = match a.string("mode", "nearest")?.as_str() {
            "nearest" => Mode::Nearest(nearest),
            "linear" | "bilinear" | "trilinear" => Mode::Linear,
            "cubic" | "bicubic" => Mode::Cubic,
            m => bail!("mode must be nearest, linear or cubic, found '{m}'"),
        };
        let coord = match a.string("coordinate_transformation_mode", "half_pixel")?.as_str() {
            _ if legacy => Coord::Asymmetric,
            "half_pixel" => Coord::HalfPixel,
            "half_pixel_symmetric" => Coord::HalfPixelSymmetric,
            "pytorch_half_pixel" => Coord::PytorchHalfPixel,
            "align_corners" => Coord::AlignCorners,
            "asymmetric" => Coord::Asymmetric,
            "tf_half_pixel_for_nn" => Coord::TfHalfPixelForNn,
            "tf_crop_and_resize" => Coord::TfCropAndResize,
            m => bail!("unknown coordinate_transformation_mode '{m}'"),
        };
        let policy = match a.string("keep_aspect_ratio_policy", "stretch")?.as_str() {
            "stretch" => Policy::Stretch,
            "not_larger" => Policy::NotLarger,
            "not_smaller" => Policy::NotSmaller,
            p => bail!("unknown keep_aspect_ratio_policy '{p}'"),
        };
        let antialias = a.int("antialias", 0)? != 0;
        if antialias && matches!(mode, Mode::Nearest(_)) {
            bail!("antialias is not supported with mode nearest");
        }
        Ok(Cfg {
            mode,
            coord,
            cubic_a: a.float("cubic_coeff_a", -0.75)? as f64,
            exclude_outside: a.int("exclude_outside", 0)? != 0,
            extrapolation: a.float("extrapolation_value", 0.0)? as f64,
            antialias,
            policy,
        })
    }
}

/// How one axis is resized: `taps` input indices and weights per output position.
struct AxisPlan {
    axis: usize,
    out: usize,
    taps: usize,
    idx: Vec<usize>,
    w: Vec<f64>,
    /// Output positions that take the extrapolation value (tf_crop_and_resize).
    extrap: Vec<bool>,
}

fn cubic_kernel(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// Interpolation weights for fractional position `ratio` in (0, 1] (the reference's get_coeffs).
fn coeffs(cfg: &Cfg, ratio: f64, scale: f64, nearest: Nearest) -> Vec<f64> {
    let normalize = |v: Vec<f64>| {
        let s: f64 = v.iter().sum();
        v.into_iter().map(|c| c / s).collect()
    };
    match cfg.mode {
        Mode::Nearest(_) => {
            if ratio == ratio.trunc() {
                return vec![0.0, 1.0];
            }
            let right = match nearest {
                Nearest::RoundPreferFloor => ratio > 0.5,
                Nearest::RoundPreferCeil => ratio >= 0.5,
                Nearest::Floor => false,
                Nearest::Ceil | Nearest::Simple => true,
            };
            if right {
                vec![0.0, 1.0]
            } else {
                vec![1.0, 0.0]
            }
        }
        Mode::Linear if cfg.antialias => {
            let s = scale.min(1.0);
            let start = (-1.0 / s).floor() as i64 + 1;
            let footprint = 2 - 2 * start;
            normalize(
                (start..start + footprint).map(|i| (1.0 - ((i as f64 - ratio) * s).abs()).clamp(0.0, 1.0)).collect(),
            )
        }
        Mode::Linear => vec![1.0 - ratio, ratio],
        Mode::Cubic if cfg.antialias => {
            let s = scale.min(1.0);
            let i_start = (-2.0 / s).floor() as i64 + 1;
            let i_end = 2 - i_start;
            normalize((i_start..i_end).map(|i| cubic_kernel(s * (i as f64 - ratio), cfg.cubic_a)).collect())
        }
        Mode::Cubic => {
            let a = cfg.cubic_a;
            [ratio + 1.0, ratio, 1.0 - ratio, 2.0 - ratio].iter().map(|&x| cubic_kernel(x, a)).collect()
        }
    }
}

/// Plans the resize of one axis from `in_w` to `out_w` elements.
fn plan_axis(cfg: &Cfg, axis: usize, in_w: usize, out_w: usize, scale: f64, roi: (f64, f64)) -> OpResult<AxisPlan> {
    if in_w == 0 && out_w > 0 {
        bail!("cannot resize an empty axis {axis} to {out_w} elements");
    }
    let nearest = match cfg.mode {
        Mode::Nearest(Nearest::Simple) => {
            if scale < 1.0 {
                Nearest::Ceil
            } else {
                Nearest::Floor
            }
        }
        Mode::Nearest(n) => n,
        _ => Nearest::Floor,
    };
    let (inf, out_f) = (in_w as f64, scale * in_w as f64);
    let mut plan = AxisPlan { axis, out: out_w, taps: 0, idx: Vec::new(), w: Vec::new(), extrap: vec![false; out_w] };
    for y in 0..out_w {
        let yf = y as f64;
        let x = match cfg.coord {
            Coord::AlignCorners if out_f == 1.0 => 0.0,
            Coord::AlignCorners => yf * (inf - 1.0) / (out_f - 1.0),
            Coord::Asymmetric => yf / scale,
            Coord::TfHalfPixelForNn => (yf + 0.5) / scale,
            Coord::TfCropAndResize => {
                let x = if out_f == 1.0 {
                    (roi.1 - roi.0) * (inf - 1.0) / 2.0
                } else {
                    yf * (roi.1 - roi.0) * (inf - 1.0) / (out_f - 1.0)
                };
                let x = x + roi.0 * (inf - 1.0);
                plan.extrap[y] = x < 0.0 || x > inf - 1.0;
                x
            }
            Coord::PytorchHalfPixel if out_f == 1.0 => -0.5,
            Coord::PytorchHalfPixel | Coord::HalfPixel => (yf + 0.5) / scale - 0.5,
            Coord::HalfPixelSymmetric => {
                let adjustment = out_w as f64 / out_f;
                let offset = inf / 2.0 * (1.0 - adjustment);
                offset + (yf + 0.5) / scale - 0.5
            }
        };
        if !x.is_finite() || x.abs() > 1e15 {
            bail!("resize coordinate is not finite (scale {scale})");
        }
        let ratio = if x == x.floor() { 1.0 } else { x - x.floor() };
        let mut c = coeffs(cfg, ratio, scale, nearest);
        let n = c.len();
        if y == 0 {
            plan.taps = n;
        } else if n != plan.taps {
            bail!("internal: resize kernel size changed along an axis");
        }
        let pad = n.div_ceil(2) as f64;
        let xp = x + pad;
        let p = xp.floor();
        let frac = xp - p;
        let half = (n / 2) as i64;
        let offset = if n.is_multiple_of(2) {
            if frac == 0.0 {
                -half
            } else {
                -half + 1
            }
        } else {
            let base = -(((n - 1) / 2) as i64);
            if frac <= 0.5 {
                base
            } else {
                base + 1
            }
        };
        let start = p as i64 + offset - pad as i64;
        if cfg.exclude_outside {
            for (j, cj) in c.iter_mut().enumerate() {
                let i = start + j as i64;
                if i < 0 || i >= in_w as i64 {
                    *cj = 0.0;
                }
            }
            let s: f64 = c.iter().sum();
            let s = if s == 0.0 { 1.0 } else { s };
            c.iter_mut().for_each(|cj| *cj /= s);
        }
        for (j, &cj) in c.iter().enumerate() {
            plan.idx.push((start + j as i64).clamp(0, in_w as i64 - 1).max(0) as usize);
            plan.w.push(cj);
        }
    }
    // Nearest picks one tap: keep just it, so values (inf, large ints) are copied exactly.
    if matches!(cfg.mode, Mode::Nearest(_)) && plan.taps == 2 {
        let (idx, w) = (std::mem::take(&mut plan.idx), std::mem::take(&mut plan.w));
        for y in 0..out_w {
            let j = if w[2 * y] != 0.0 { 0 } else { 1 };
            plan.idx.push(idx[2 * y + j]);
            plan.w.push(1.0);
        }
        plan.taps = 1;
    }
    Ok(plan)
}

/// A float type the resize passes compute in.
trait Num: Copy + Default + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    fn of(x: f64) -> Self;
}
impl Num for f32 {
    fn of(x: f64) -> f32 {
        x as f32
    }
}
impl Num for f64 {
    fn of(x: f64) -> f64 {
        x
    }
}

/// Applies one axis plan to `src` of `shape`; returns the new buffer (shape updated in place).
fn apply_axis<F: Num>(src: &[F], shape: &mut [usize], plan: &AxisPlan, extrapolation: f64) -> Vec<F> {
    let a = plan.axis;
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    let in_w = shape[a];
    let w: Vec<F> = plan.w.iter().map(|&c| F::of(c)).collect();
    let ext = F::of(extrapolation);
    let mut out = vec![F::default(); outer * plan.out * inner];
    for o in 0..outer {
        let src_o = &src[o * in_w * inner..(o + 1) * in_w * inner];
        for y in 0..plan.out {
            let dst = &mut out[(o * plan.out + y) * inner..(o * plan.out + y + 1) * inner];
            if plan.extrap[y] {
                dst.fill(ext);
                continue;
            }
            for t in 0..plan.taps {
                let (i, c) = (plan.idx[y * plan.taps + t], w[y * plan.taps + t]);
                let row = &src_o[i * inner..(i + 1) * inner];
                if t == 0 {
                    dst.iter_mut().zip(row).for_each(|(d, &s)| *d = s * c);
                } else {
                    dst.iter_mut().zip(row).for_each(|(d, &s)| *d = *d + s * c);
                }
            }
        }
    }
    shape[a] = plan.out;
    out
}

/// Resizes `x` given per-axis (full rank) output sizes, scales and ROI.
fn resize(
    x: &Tensor,
    cfg: &Cfg,
    axes: &[usize],
    out: &[usize],
    scales: &[f64],
    roi: &[(f64, f64)],
) -> OpResult<Tensor> {
    if !x.dtype().is_numeric() {
        bail!("Resize needs a numeric input, found {}", x.dtype());
    }
    checked_numel(out)?;
    let mut plans = Vec::new();
    for &a in axes {
        let trivial_roi = cfg.coord != Coord::TfCropAndResize || (roi[a].0 == 0.0 && roi[a].1 == 1.0);
        if (scales[a] - 1.0).abs() <= 1e-9 && out[a] == x.shape[a] && trivial_roi {
            continue;
        }
        plans.push(plan_axis(cfg, a, x.shape[a], out[a], scales[a], roi[a])?);
    }
    let mut shape = x.shape.clone();
    if let Some(v) = x.as_f32() {
        let mut buf = v.to_vec();
        for p in &plans {
            buf = apply_axis(&buf, &mut shape, p, cfg.extrapolation);
        }
        return Ok(Tensor::from_f32(&shape, buf));
    }
    let mut buf = x.to_f64();
    for p in &plans {
        buf = apply_axis(&buf, &mut shape, p, cfg.extrapolation);
    }
    if x.dtype().is_int() {
        buf.iter_mut().for_each(|v| *v = v.round_ties_even());
    }
    Ok(Tensor::from_f64(x.dtype(), &shape, buf))
}

/// Full-rank output sizes and scales from `sizes` or `scales` given for `axes`.
fn sizes_and_scales(
    cfg: &Cfg,
    in_shape: &[usize],
    axes: &[usize],
    sizes: Option<&[i64]>,
    scales: Option<&[f64]>,
) -> OpResult<(Vec<usize>, Vec<f64>)> {
    let mut out = in_shape.to_vec();
    let mut sc = vec![1.0; in_shape.len()];
    if let Some(sizes) = sizes {
        if sizes.len() != axes.len() || sizes.iter().any(|&s| s < 0) {
            bail!("sizes {sizes:?} must have one non-negative size per axis ({} axes)", axes.len());
        }
        for (&a, &s) in axes.iter().zip(sizes) {
            out[a] = s as usize;
            sc[a] = s as f64 / in_shape[a] as f64;
        }
        if cfg.policy != Policy::Stretch {
            let vals = axes.iter().map(|&a| sc[a]);
            let s = if cfg.policy == Policy::NotLarger {
                vals.fold(f64::INFINITY, f64::min)
            } else {
                vals.fold(f64::NEG_INFINITY, f64::max)
            };
            for &a in axes {
                sc[a] = s;
                out[a] = (s * in_shape[a] as f64 + 0.5) as usize;
            }
        }
    } else if let Some(scales) = scales {
        if scales.len() != axes.len() || scales.iter().any(|&s| s.is_nan() || s <= 0.0 || !s.is_finite()) {
            bail!("scales {scales:?} must have one positive scale per axis ({} axes)", axes.len());
        }
        for (&a, &s) in axes.iter().zip(scales) {
            sc[a] = s;
            let n = (s * in_shape[a] as f64).floor();
            if n > u32::MAX as f64 {
                bail!("scale {s} makes axis {a} too large");
            }
            out[a] = n as usize;
        }
    } else {
        bail!("Resize needs either scales or sizes");
    }
    if let Some(a) = out.iter().position(|&n| n > u32::MAX as usize) {
        bail!("output size {} of axis {a} is too large", out[a]);
    }
    Ok((out, sc))
}

/// An input that is present and non-empty (ONNX passes "absent" as an empty tensor too).
fn nonempty<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    opt(inputs, i).filter(|t| !t.is_empty())
}

/// `Resize(X, roi?, scales?, sizes?)`: resizes X by `scales` or to `sizes` (over `axes`) with
/// nearest, linear or cubic interpolation. Opset 10 takes `(X, scales)` with asymmetric
/// coordinates.
struct Resize;

fn resize_axes(a: &AttrView, rank: usize) -> OpResult<Vec<usize>> {
    match a.ints("axes")? {
        Some(ax) => axes_in(&ax, rank),
        None => Ok((0..rank).collect()),
    }
}

impl OpDef for Resize {
    fn name(&self) -> &'static str {
        "Resize"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let cfg = Cfg::resize(&cx.attrs, cx.opset)?;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let axes = resize_axes(&cx.attrs, d.len())?;
        let (scales_i, sizes_i) = if cx.opset < 11 { (1, usize::MAX) } else { (2, 3) };
        let present = |i: usize| cx.opt_input(i).is_some_and(|t| t.num_elements() != Some(0));
        let sizes = if present(sizes_i) { const_ints(cx, sizes_i) } else { None };
        let scales: Option<Vec<f64>> = if present(scales_i) {
            cx.const_input(scales_i).filter(|t| t.dtype().is_float() && !t.is_empty()).map(|t| t.to_f64())
        } else {
            None
        };
        infer_resized(cx, &cfg, d, &axes, sizes, scales, present(sizes_i), dtype)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let cfg = Cfg::resize(&cx.attrs, cx.opset)?;
        let axes = resize_axes(&cx.attrs, x.rank())?;
        let (roi, scales, sizes) = if cx.opset < 11 {
            (None, nonempty(inputs, 1), None)
        } else {
            (nonempty(inputs, 1), nonempty(inputs, 2), nonempty(inputs, 3))
        };
        let sizes = sizes.map(|t| t.to_i64());
        let scales = scales.map(|t| t.to_f64());
        let (out, sc) = sizes_and_scales(&cfg, &x.shape, &axes, sizes.as_deref(), scales.as_deref())?;
        let mut full_roi = vec![(0.0, 1.0); x.rank()];
        if let (Coord::TfCropAndResize, Some(r)) = (cfg.coord, roi) {
            let r = r.to_f64();
            if r.len() != 2 * axes.len() {
                bail!("roi must have 2 × {} values, found {}", axes.len(), r.len());
            }
            for (i, &a) in axes.iter().enumerate() {
                full_roi[a] = (r[i], r[axes.len() + i]);
            }
        }
        Ok(vec![resize(x, &cfg, &axes, &out, &sc, &full_roi)?])
    }
}

/// Output type of Resize/Upsample from constant sizes or scales where known.
fn infer_resized(
    cx: &mut InferCx,
    cfg: &Cfg,
    d: Vec<Dim>,
    axes: &[usize],
    sizes: Option<Vec<i64>>,
    scales: Option<Vec<f64>>,
    sizes_given: bool,
    dtype: DType,
) -> OpResult<Vec<TensorType>> {
    let static_in: Option<Vec<usize>> = d.iter().map(|x| x.known().map(|n| n as usize)).collect();
    let mut shape = d.clone();
    match (sizes, scales, static_in) {
        (Some(s), _, Some(ins)) => {
            let (out, _) = sizes_and_scales(cfg, &ins, axes, Some(&s), None)?;
            shape = out.into_iter().map(kd).collect();
        }
        (Some(s), _, None) if cfg.policy == Policy::Stretch => {
            if s.len() != axes.len() || s.iter().any(|&v| v < 0) {
                bail!("sizes {s:?} must have one non-negative size per axis ({} axes)", axes.len());
            }
            for (&a, &v) in axes.iter().zip(&s) {
                shape[a] = Dim::Known(v as u64);
            }
        }
        (None, Some(s), _) if !sizes_given => {
            if s.len() != axes.len() {
                bail!("scales {s:?} must have one scale per axis ({} axes)", axes.len());
            }
            for (&a, &v) in axes.iter().zip(&s) {
                shape[a] = match &d[a] {
                    Dim::Known(n) => kd((v * *n as f64).floor().max(0.0) as usize),
                    _ if v == 1.0 => d[a].clone(),
                    _ => cx.fresh_dim(),
                };
            }
        }
        _ => {
            for &a in axes {
                shape[a] = cx.fresh_dim();
            }
        }
    }
    Ok(vec![TensorType::new(dtype, shape)])
}

/// `Upsample(X, scales)` (deprecated): nearest or linear upsampling by `scales` with asymmetric
/// coordinates. Opset 7 takes `scales` as an attribute, opset 1 `height_scale`/`width_scale`.
struct Upsample;

fn upsample_cfg(a: &AttrView) -> OpResult<Cfg> {
    let mode = match a.string("mode", "nearest")?.as_str() {
        "nearest" => Mode::Nearest(Nearest::Simple),
        "linear" | "bilinear" => Mode::Linear,
        m => bail!("Upsample mode must be nearest or linear, found '{m}'"),
    };
    Ok(Cfg {
        mode,
        coord: Coord::Asymmetric,
        cubic_a: -0.75,
        exclude_outside: false,
        extrapolation: 0.0,
        antialias: false,
        policy: Policy::Stretch,
    })
}

/// Upsample's scales from its attributes (opset < 9), `None` when they come from input 1.
fn upsample_attr_scales(a: &AttrView, rank: Option<usize>) -> OpResult<Option<Vec<f64>>> {
    if let Some(s) = a.floats("scales")? {
        return Ok(Some(s.into_iter().map(f64::from).collect()));
    }
    if a.has("height_scale") || a.has("width_scale") {
        let (h, w) = (a.float("height_scale", 1.0)? as f64, a.float("width_scale", 1.0)? as f64);
        let r = rank.unwrap_or(4);
        let mut s = vec![1.0; r];
        if r >= 2 {
            s[r - 2] = h;
            s[r - 1] = w;
        }
        return Ok(Some(s));
    }
    Ok(None)
}

impl OpDef for Upsample {
    fn name(&self) -> &'static str {
        "Upsample"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dtype = x.dtype;
        let cfg = upsample_cfg(&cx.attrs)?;
        let Some(d) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(dtype)]);
        };
        let axes: Vec<usize> = (0..d.len()).collect();
        let scales = match upsample_attr_scales(&cx.attrs, Some(d.len()))? {
            Some(s) => Some(s),
            None => cx.const_input(1).map(|t| t.to_f64()),
        };
        infer_resized(cx, &cfg, d, &axes, None, scales, false, dtype)
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let cfg = upsample_cfg(&cx.attrs)?;
        let scales = match upsample_attr_scales(&cx.attrs, Some(x.rank()))? {
            Some(s) => s,
            None => req(inputs, 1)?.to_f64(),
        };
        let axes: Vec<usize> = (0..x.rank()).collect();
        let (out, sc) = sizes_and_scales(&cfg, &x.shape, &axes, None, Some(&scales))?;
        let roi = vec![(0.0, 1.0); x.rank()];
        Ok(vec![resize(x, &cfg, &axes, &out, &sc, &roi)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode, coord: Coord) -> Cfg {
        Cfg {
            mode,
            coord,
            cubic_a: -0.75,
            exclude_outside: false,
            extrapolation: 0.0,
            antialias: false,
            policy: Policy::Stretch,
        }
    }

    #[test]
    fn nearest_upsample_repeats() {
        let x = Tensor::from_f32(&[1, 2], vec![1.0, 2.0]);
        let c = cfg(Mode::Nearest(Nearest::Floor), Coord::Asymmetric);
        let y = resize(&x, &c, &[0, 1], &[1, 4], &[1.0, 2.0], &[(0.0, 1.0); 2]).unwrap();
        assert_eq!(y.as_f32().unwrap(), &[1.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn linear_half_pixel_matches_reference() {
        // numpy reference: resize [1, 3] by 2 along the last axis (half_pixel, linear).
        let x = Tensor::from_f64(DType::F64, &[3], vec![1.0, 2.0, 4.0]);
        let c = cfg(Mode::Linear, Coord::HalfPixel);
        let y = resize(&x, &c, &[0], &[6], &[2.0], &[(0.0, 1.0)]).unwrap();
        assert_eq!(y.to_f64(), vec![1.0, 1.25, 1.75, 2.5, 3.5, 4.0]);
    }
}
