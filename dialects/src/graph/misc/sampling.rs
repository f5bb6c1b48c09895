//! Spatial sampling: GridSample (N-D, nearest/linear/cubic, zeros/border/reflection padding),
//! AffineGrid (2-D and 3-D) and RoiAlign (avg/max pooling of bilinear samples).

use super::expect_float;
use crate::bail;
use crate::graph::{checked_numel, ints_of, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&GridSample, &AffineGrid, &RoiAlign]);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Padding {
    Zeros,
    Border,
    Reflection,
}

/// `GridSample` (opset 16-22): samples `X [N, C, D1..Dr]` at the normalized locations of
/// `grid [N, O1..Or, r]` (last axis ordered x, y, z: innermost spatial dim first) by nearest,
/// (multi)linear or (multi)cubic interpolation, with zeros, border or reflection padding.
struct GridSample;

/// Reflects `x` into `[lo, hi]` by bouncing off the borders (as PyTorch's GridSampler does).
fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let rng = hi - lo;
    if rng <= 0.0 || !x.is_finite() {
        return lo;
    }
    let bounce = |dx: f64, near: f64, far: f64, sign: f64| {
        let n = (dx / rng).trunc();
        let r = dx - n * rng;
        if n % 2.0 == 0.0 {
            near + sign * r
        } else {
            far - sign * r
        }
    };
    if x < lo {
        bounce(lo - x, lo, hi, 1.0)
    } else if x > hi {
        bounce(x - hi, hi, lo, -1.0)
    } else {
        x
    }
}

/// Keys' cubic convolution weights (A = -0.75) for the 4 taps around a fraction `t`.
fn cubic_coeffs(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let w = |x: f64| {
        let x = x.abs();
        if x <= 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
        } else {
            0.0
        }
    };
    [w(t + 1.0), w(t), w(1.0 - t), w(2.0 - t)]
}

impl OpDef for GridSample {
    fn name(&self) -> &'static str {
        "GridSample"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, g) = (cx.input(0)?, cx.input(1)?);
        if !x.dtype.is_numeric() || !g.dtype.is_float() {
            bail!("expected a numeric X and a float grid, found {} and {}", x.dtype, g.dtype);
        }
        let shape = match (&x.shape, &g.shape) {
            (Some(xs), Some(gs)) => {
                if xs.len() < 3 || gs.len() != xs.len() {
                    bail!("X and grid must have one rank of at least 3, found {} and {}", xs.len(), gs.len());
                }
                let mut s = vec![xs[0].clone(), xs[1].clone()];
                s.extend(gs[1..gs.len() - 1].iter().cloned());
                Some(s)
            }
            _ => None,
        };
        Ok(vec![TensorType { dtype: x.dtype, shape }])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, grid) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_float(grid, "grid")?;
        if !x.dtype().is_numeric() {
            bail!("X must be numeric, found {}", x.dtype());
        }
        let rank = x.rank();
        if rank < 3 || grid.rank() != rank {
            bail!("X {:?} and grid {:?} must have one rank of at least 3", x.shape, grid.shape);
        }
        let r = rank - 2;
        let (n, c) = (x.shape[0], x.shape[1]);
        if grid.shape[0] != n || grid.shape[rank - 1] != r {
            bail!("grid must have shape [{n}, ..., {r}], found {:?}", grid.shape);
        }
        let mode = match cx.attrs.string("mode", if cx.opset < 20 { "bilinear" } else { "linear" })?.as_str() {
            "nearest" => Mode::Nearest,
            "linear" | "bilinear" => Mode::Linear,
            "cubic" | "bicubic" => Mode::Cubic,
            m => bail!("unknown mode '{m}'"),
        };
        let padding = match cx.attrs.string("padding_mode", "zeros")?.as_str() {
            "zeros" => Padding::Zeros,
            "border" => Padding::Border,
            "reflection" => Padding::Reflection,
            p => bail!("unknown padding_mode '{p}'"),
        };
        let align = cx.attrs.int("align_corners", 0)? != 0;
        let dims = &x.shape[2..];
        let out_sp = &grid.shape[1..rank - 1];
        let mut out_shape = vec![n, c];
        out_shape.extend_from_slice(out_sp);
        let total = checked_numel(&out_shape)?;
        let npts: usize = out_sp.iter().product();
        let in_sp: usize = dims.iter().product();
        let (xv, gv) = (x.to_f64(), grid.to_f64());
        let mut y = vec![0.0; total];
        let strides = crate::tensor::strides(dims);
        // Per point: (flat offset within a channel, weight) of every tap that reads inside X.
        let mut taps: Vec<(usize, f64)> = Vec::new();
        let mut per_dim: Vec<Vec<(i64, f64)>> = vec![Vec::new(); r];
        for ni in 0..n {
            for p in 0..npts {
                let g = &gv[(ni * npts + p) * r..][..r];
                for (i, pd) in per_dim.iter_mut().enumerate() {
                    let len = dims[i] as f64;
                    let norm = g[r - 1 - i];
                    let mut v = if align { (norm + 1.0) / 2.0 * (len - 1.0) } else { ((norm + 1.0) * len - 1.0) / 2.0 };
                    v = v as f32 as f64;
                    if mode == Mode::Nearest {
                        v = v.round_ties_even();
                    }
                    let (lo, hi) = if align { (0.0, len - 1.0) } else { (-0.5, len - 0.5) };
                    if v < lo || v > hi {
                        match padding {
                            Padding::Border => v = v.clamp(0.0, (len - 1.0).max(0.0)),
                            Padding::Reflection => v = reflect(v, lo, hi),
                            Padding::Zeros => {}
                        }
                    }
                    pd.clear();
                    if !v.is_finite() {
                        continue;
                    }
                    let v = v.clamp(-1e9, 1e9);
                    match mode {
                        Mode::Nearest => pd.push((v.trunc() as i64, 1.0)),
                        Mode::Linear => {
                            let f = v.floor();
                            pd.extend([(f as i64, 1.0 - (v - f)), (f as i64 + 1, v - f)]);
                        }
                        Mode::Cubic => {
                            let f = v.floor();
                            let w = cubic_coeffs(v - f);
                            pd.extend((0..4).map(|k| (f as i64 - 1 + k as i64, w[k])));
                        }
                    }
                    // Resolve padding on each tap index.
                    pd.retain_mut(|(idx, _)| {
                        let l = dims[i] as i64;
                        if (0..l).contains(idx) {
                            return true;
                        }
                        match padding {
                            Padding::Zeros => false,
                            Padding::Border => {
                                *idx = (*idx).clamp(0, l - 1);
                                l > 0
                            }
                            Padding::Reflection => {
                                *idx = (reflect(*idx as f64, lo, hi).trunc() as i64).clamp(0, l - 1);
                                l > 0
                            }
                        }
                    });
                }
                taps.clear();
                taps.push((0, 1.0));
                for (i, pd) in per_dim.iter().enumerate() {
                    let prev = std::mem::take(&mut taps);
                    for &(off, w) in &prev {
                        for &(idx, wi) in pd {
                            taps.push((off + idx as usize * strides[i], w * wi));
                        }
                    }
                }
                for ci in 0..c {
                    let base = (ni * c + ci) * in_sp;
                    let v: f64 = taps.iter().map(|&(off, w)| w * xv[base + off]).sum();
                    y[(ni * c + ci) * npts + p] = v;
                }
            }
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &out_shape, y)])
    }
}

/// `AffineGrid` (opset 20): the sampling grid `[N, H, W, 2]` (or `[N, D, H, W, 3]`) obtained
/// by applying each affine matrix `theta [N, 2, 3]` (`[N, 3, 4]`) to the normalized pixel
/// coordinates of an output of `size`.
struct AffineGrid;

/// Normalized coordinates of `s` pixels along one axis.
fn base_coords(s: usize, align: bool) -> Vec<f64> {
    (0..s)
        .map(|i| {
            if align {
                if s <= 1 {
                    -1.0
                } else {
                    -1.0 + 2.0 * i as f64 / (s - 1) as f64
                }
            } else {
                -1.0 + (2 * i + 1) as f64 / s as f64
            }
        })
        .collect()
}

impl OpDef for AffineGrid {
    fn name(&self) -> &'static str {
        "AffineGrid"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let theta = cx.input(0)?;
        if !theta.dtype.is_float() {
            bail!("theta must be a float tensor, found {}", theta.dtype);
        }
        let dt = theta.dtype;
        if let Some(size) = cx.const_input(1) {
            let s = ints_of(size)?;
            if (s.len() == 4 || s.len() == 5) && s.iter().all(|&d| d >= 0) {
                let mut shape: Vec<usize> = vec![s[0] as usize];
                shape.extend(s[2..].iter().map(|&d| d as usize));
                shape.push(s.len() - 2);
                return Ok(vec![TensorType::known(dt, &shape)]);
            }
            bail!("size must be [N, C, H, W] or [N, C, D, H, W], found {s:?}");
        }
        let spatial = match cx.input(1)?.static_shape().as_deref() {
            Some([4]) => 2,
            Some([5]) => 3,
            _ => return Ok(vec![TensorType::unranked(dt)]),
        };
        let n = theta.shape.as_ref().and_then(|s| s.first().cloned()).unwrap_or_else(|| cx.fresh_dim());
        let mut shape = vec![n];
        shape.extend(cx.fresh_dims(spatial));
        shape.push(Dim::Known(spatial as u64));
        Ok(vec![TensorType::new(dt, shape)])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (theta, size) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_float(theta, "theta")?;
        let s = ints_of(size)?;
        if !(s.len() == 4 || s.len() == 5) || s.iter().any(|&d| d < 0) {
            bail!("size must be [N, C, H, W] or [N, C, D, H, W], found {s:?}");
        }
        let sp = s.len() - 2;
        let n = s[0] as usize;
        if theta.shape != [n, sp, sp + 1] {
            bail!("theta must have shape [{n}, {sp}, {}], found {:?}", sp + 1, theta.shape);
        }
        let align = cx.attrs.int("align_corners", 0)? != 0;
        let dims: Vec<usize> = s[2..].iter().map(|&d| d as usize).collect();
        for &d in &dims {
            checked_numel(&[d])?;
        }
        let mut out_shape = vec![n];
        out_shape.extend_from_slice(&dims);
        out_shape.push(sp);
        let total = checked_numel(&out_shape)?;
        // Coordinates per axis, innermost first: x over W, y over H, z over D.
        let coords: Vec<Vec<f64>> = dims.iter().rev().map(|&d| base_coords(d, align)).collect();
        let th = theta.to_f64();
        let npts: usize = dims.iter().product();
        let mut out = Vec::with_capacity(total);
        let mut pt = vec![0.0; sp + 1];
        pt[sp] = 1.0;
        for ni in 0..n {
            let m = &th[ni * sp * (sp + 1)..][..sp * (sp + 1)];
            for p in 0..npts {
                // Decompose p (row-major over dims) into per-axis indices, innermost first.
                let mut rem = p;
                for (k, &d) in dims.iter().rev().enumerate() {
                    pt[k] = coords[k][rem % d];
                    rem /= d;
                }
                for row in m.chunks(sp + 1) {
                    out.push(row.iter().zip(&pt).map(|(a, b)| a * b).sum());
                }
            }
        }
        Ok(vec![Tensor::from_f64(theta.dtype(), &out_shape, out)])
    }
}

/// `RoiAlign` (opset 10/16/22): for each region of interest `rois[r] = (x1, y1, x2, y2)` on
/// image `batch_indices[r]`, average (or max) bilinear samples on a regular grid inside each of
/// the `output_height × output_width` bins. `coordinate_transformation_mode` half_pixel
/// (default since opset 16) shifts the scaled box by half a pixel.
struct RoiAlign;

impl OpDef for RoiAlign {
    fn name(&self) -> &'static str {
        "RoiAlign"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, rois) = (cx.input(0)?, cx.input(1)?);
        if !x.dtype.is_float() {
            bail!("X must be a float tensor, found {}", x.dtype);
        }
        let oh = cx.attrs.int("output_height", 1)?;
        let ow = cx.attrs.int("output_width", 1)?;
        if oh <= 0 || ow <= 0 {
            bail!("output_height and output_width must be positive, found {oh} and {ow}");
        }
        let r = rois.shape.as_ref().and_then(|s| s.first().cloned()).unwrap_or_else(|| cx.fresh_dim());
        let c = x.shape.as_ref().and_then(|s| s.get(1).cloned()).unwrap_or_else(|| cx.fresh_dim());
        Ok(vec![TensorType::new(x.dtype, vec![r, c, Dim::Known(oh as u64), Dim::Known(ow as u64)])])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, rois, bidx) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(x, "X")?;
        expect_float(rois, "rois")?;
        let [n, c, h, w] = *x.shape.as_slice() else { bail!("X must have rank 4, found shape {:?}", x.shape) };
        let nr = bidx.len();
        if rois.shape != [nr, 4] || bidx.rank() != 1 {
            bail!("rois must have shape [R, 4] and batch_indices [R], found {:?} and {:?}", rois.shape, bidx.shape);
        }
        let batch = ints_of(bidx)?;
        let oh = cx.attrs.int("output_height", 1)?;
        let ow = cx.attrs.int("output_width", 1)?;
        if oh <= 0 || ow <= 0 {
            bail!("output_height and output_width must be positive, found {oh} and {ow}");
        }
        let (ph, pw) = (oh as usize, ow as usize);
        let sr = cx.attrs.int("sampling_ratio", 0)?;
        let scale = cx.attrs.float("spatial_scale", 1.0)? as f64;
        let is_max = match cx.attrs.string("mode", "avg")?.to_ascii_lowercase().as_str() {
            "avg" => false,
            "max" => true,
            m => bail!("mode must be avg or max, found '{m}'"),
        };
        let default_ctm = if cx.opset < 16 { "output_half_pixel" } else { "half_pixel" };
        let half_pixel = match cx.attrs.string("coordinate_transformation_mode", default_ctm)?.as_str() {
            "half_pixel" => true,
            "output_half_pixel" => false,
            m => bail!("coordinate_transformation_mode must be half_pixel or output_half_pixel, found '{m}'"),
        };
        let out_shape = [nr, c, ph, pw];
        let mut y = vec![0.0; checked_numel(&out_shape)?];
        if h == 0 || w == 0 {
            return Ok(vec![Tensor::from_f64(x.dtype(), &out_shape, y)]);
        }
        let (xv, rv) = (x.to_f64(), rois.to_f64());
        let offset = if half_pixel { 0.5 } else { 0.0 };
        for ri in 0..nr {
            let b = batch[ri];
            if b < 0 || b as usize >= n {
                bail!("batch index {b} is out of range [0, {n})");
            }
            let roi = &rv[ri * 4..ri * 4 + 4];
            let (sw, sh) = (roi[0] * scale - offset, roi[1] * scale - offset);
            let (mut rw, mut rh) = (roi[2] * scale - offset - sw, roi[3] * scale - offset - sh);
            if !half_pixel {
                rw = rw.max(1.0);
                rh = rh.max(1.0);
            }
            let (bh, bw) = (rh / ph as f64, rw / pw as f64);
            let grid = |size: f64| -> usize {
                if sr > 0 {
                    sr as usize
                } else {
                    size.ceil().max(0.0) as usize
                }
            };
            let (gh, gw) = (grid(bh), grid(bw));
            if checked_numel(&[gh, gw, ph, pw])? > 1 << 26 {
                bail!("region {ri} needs a {gh}x{gw} sampling grid per bin, which is too large");
            }
            let count = (gh * gw).max(1) as f64;
            // Bilinear taps (4 offsets and weights) of every sample of every bin, shared by channels.
            let mut samples: Vec<([usize; 4], [f64; 4])> = Vec::with_capacity(gh * gw * ph * pw);
            for py in 0..ph {
                for px in 0..pw {
                    for iy in 0..gh {
                        let yy = sh + py as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = sw + px as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            samples.push(bilinear_taps(yy, xx, h, w));
                        }
                    }
                }
            }
            let per_bin = gh * gw;
            for ci in 0..c {
                let plane = &xv[(b as usize * c + ci) * h * w..][..h * w];
                for bin in 0..ph * pw {
                    let ss = &samples[bin * per_bin..(bin + 1) * per_bin];
                    let v = if is_max {
                        ss.iter()
                            .map(|(p, wt)| (0..4).map(|k| wt[k] * plane[p[k]]).fold(f64::NEG_INFINITY, f64::max))
                            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                            .unwrap_or(0.0)
                    } else {
                        ss.iter().map(|(p, wt)| (0..4).map(|k| wt[k] * plane[p[k]]).sum::<f64>()).sum::<f64>() / count
                    };
                    y[(ri * c + ci) * ph * pw + bin] = v;
                }
            }
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &out_shape, y)])
    }
}

/// The 4 neighbours and weights of a bilinear sample at `(y, x)` on an `h × w` plane; samples
/// more than one pixel outside get zero weight.
fn bilinear_taps(y: f64, x: f64, h: usize, w: usize) -> ([usize; 4], [f64; 4]) {
    if !(y >= -1.0 && y <= h as f64 && x >= -1.0 && x <= w as f64) {
        return ([0; 4], [0.0; 4]);
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut yl, mut xl) = (y as usize, x as usize);
    let yh = if yl >= h - 1 {
        yl = h - 1;
        y = yl as f64;
        yl
    } else {
        yl + 1
    };
    let xh = if xl >= w - 1 {
        xl = w - 1;
        x = xl as f64;
        xl
    } else {
        xl + 1
    };
    let (ly, lx) = (y - yl as f64, x - xl as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    ([yl * w + xl, yl * w + xh, yh * w + xl, yh * w + xh], [hy * hx, hy * lx, ly * hx, ly * lx])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_bounces_off_borders() {
        assert_eq!(reflect(-1.0, 0.0, 3.0), 1.0);
        assert_eq!(reflect(4.0, 0.0, 3.0), 2.0);
        assert_eq!(reflect(7.0, 0.0, 3.0), 1.0);
        assert_eq!(reflect(1.5, 0.0, 3.0), 1.5);
    }

    #[test]
    fn cubic_weights_sum_to_one() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let s: f64 = cubic_coeffs(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn affine_grid_identity_gives_base_coords() {
        assert_eq!(base_coords(2, false), vec![-0.5, 0.5]);
        assert_eq!(base_coords(3, true), vec![-1.0, 0.0, 1.0]);
    }
}
