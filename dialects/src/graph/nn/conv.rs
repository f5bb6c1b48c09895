//! Convolutions: Conv, ConvInteger, QLinearConv, ConvTranspose, Col2Im.
//!
//! Conv lowers each (image, group) to one GEMM `W[Mg × Cg·k] · cols[Cg·k × P]`, building the
//! im2col matrix in chunks of output positions so its buffer stays small; a 1×1 stride-1 conv
//! reads the input directly. ConvTranspose and Col2Im are the adjoint: a GEMM into columns, then
//! a scatter-add of the columns into the image.

use super::gemm::{gemm, MatRef};
use super::quant::{round_in, saturate_to};
use super::{expect_nc, known, nc_spatial, spatial_attr, uses_f32, Geom, Real, WindowParams};
use crate::bail;
use crate::graph::{checked_numel, ints_of, opt, req, AttrView, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&Conv, &ConvInteger, &QLinearConv, &ConvTranspose, &Col2Im]);
}

/// Shapes and window of a Conv.
struct ConvSetup {
    geom: Geom,
    group: usize,
    /// Batch, input channels, output channels.
    n: usize,
    c: usize,
    m: usize,
    out_shape: Vec<usize>,
}

fn group_attr(a: AttrView) -> OpResult<usize> {
    let g = a.int("group", 1)?;
    if g < 1 {
        bail!("group must be positive, found {g}");
    }
    Ok(g as usize)
}

/// The window parameters of a conv whose kernel is W's trailing dims (checked against `kernel_shape`).
fn conv_window(a: AttrView, wspatial: &[usize]) -> OpResult<WindowParams> {
    if let Some(ks) = a.ints("kernel_shape")? {
        if ks.len() != wspatial.len() || ks.iter().zip(wspatial).any(|(&k, &w)| k != w as i64) {
            bail!("kernel_shape {ks:?} does not match the weight's spatial dims {wspatial:?}");
        }
    }
    WindowParams::new(a, wspatial.to_vec(), false)
}

fn conv_setup(a: AttrView, x: &[usize], w: &[usize]) -> OpResult<ConvSetup> {
    if !(3..=5).contains(&x.len()) || w.len() != x.len() {
        bail!("Conv needs X [N, C, 1 to 3 spatial dims] and W of the same rank, found {x:?} and {w:?}");
    }
    let group = group_attr(a)?;
    let (n, c, m) = (x[0], x[1], w[0]);
    if w[1].checked_mul(group) != Some(c) || m % group != 0 {
        bail!("Conv with group {group}: X has {c} channels and W is {w:?} (expected [M, C/group, ...], M divisible by group)");
    }
    let geom = conv_window(a, &w[2..])?.geometry(&x[2..])?;
    let mut out_shape = vec![n, m];
    out_shape.extend_from_slice(&geom.out[3 - (x.len() - 2)..]);
    checked_numel(&out_shape)?;
    Ok(ConvSetup { geom, group, n, c, m, out_shape })
}

fn infer_conv(cx: &mut InferCx, dtype: DType, xi: usize, wi: usize) -> OpResult<TensorType> {
    let (x, w) = (cx.input(xi)?, cx.input(wi)?);
    let Some(xs) = nc_spatial(x, "X")? else { return Ok(TensorType::unranked(dtype)) };
    let nsp = xs.len() - 2;
    let m = match &w.shape {
        Some(ws) if ws.len() != xs.len() => bail!("W must have the rank of X ({}), found {w}", xs.len()),
        Some(ws) => ws[0].clone(),
        None => cx.fresh_dim(),
    };
    let kernel: Option<Vec<usize>> = match cx.attrs.ints("kernel_shape")? {
        Some(k) => Some(k.iter().map(|&v| v.max(1) as usize).collect()),
        None => w.shape.as_ref().and_then(|ws| ws[2..].iter().map(known).collect()),
    };
    let mut out = vec![xs[0].clone(), m];
    match kernel {
        Some(k) if k.len() == nsp => {
            let wp = WindowParams::new(cx.attrs, k, false)?;
            out.extend(wp.infer_dims(cx, &xs[2..])?);
        }
        _ => out.extend(cx.fresh_dims(nsp)),
    }
    Ok(TensorType::new(dtype, out))
}

/// Fills rows `0..k` of the im2col block for output positions `p0..p0+np` of one group.
fn im2col<T: Real>(x: &[T], cg: usize, g: &Geom, p0: usize, np: usize, col: &mut [T]) {
    let [_, oh, ow] = g.out;
    let [kd, kh, kw] = g.kernel;
    let insz = g.in_size();
    let [_, ih, iw] = g.input;
    let mut row = 0;
    for c in 0..cg {
        let xc = &x[c * insz..(c + 1) * insz];
        for a in 0..kd {
            for b in 0..kh {
                for e in 0..kw {
                    let dst = &mut col[row * np..(row + 1) * np];
                    let (mut od, mut oy, mut ox) = (p0 / (oh * ow), (p0 / ow) % oh, p0 % ow);
                    for d in dst.iter_mut() {
                        *d = match (g.src(0, od, a), g.src(1, oy, b), g.src(2, ox, e)) {
                            (Some(z), Some(y), Some(xx)) => xc[(z * ih + y) * iw + xx],
                            _ => T::ZERO,
                        };
                        ox += 1;
                        if ox == ow {
                            ox = 0;
                            oy += 1;
                            if oy == oh {
                                oy = 0;
                                od += 1;
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
}

/// The convolution of `x` `[N, C, spatial]` with `w` `[M, C/group, kernel]`, plus bias.
fn conv_real<T: Real>(s: &ConvSetup, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let g = &s.geom;
    let (cg, mg) = (s.c / s.group, s.m / s.group);
    let (insz, p, ks) = (g.in_size(), g.out_size(), g.kernel_size());
    let k = cg * ks;
    let mut y = vec![T::ZERO; s.n * s.m * p];
    if let Some(b) = bias {
        for (i, row) in y.chunks_exact_mut(p.max(1)).enumerate() {
            row.iter_mut().for_each(|v| *v = b[i % s.m]);
        }
    }
    let direct = ks == 1 && g.stride == [1; 3] && g.pad == [0; 3] && g.input == g.out;
    let chunk = (1usize << 18).div_ceil(k.max(1)).clamp(16, p.max(16));
    let mut col = if direct { Vec::new() } else { vec![T::ZERO; k * chunk.min(p)] };
    for n in 0..s.n {
        for gi in 0..s.group {
            let xg = &x[(n * s.c + gi * cg) * insz..(n * s.c + (gi + 1) * cg) * insz];
            let a = MatRef::rows(w, gi * mg * k, k);
            let yoff = (n * s.m + gi * mg) * p;
            if direct {
                gemm(mg, p, k, a, MatRef::rows(xg, 0, p), &mut y[yoff..], p);
                continue;
            }
            for p0 in (0..p).step_by(chunk) {
                let np = chunk.min(p - p0);
                im2col(xg, cg, g, p0, np, &mut col[..k * np]);
                gemm(mg, np, k, a, MatRef::rows(&col, 0, np), &mut y[yoff + p0..], p);
            }
        }
    }
    y
}

/// N-D convolution (1 to 3 spatial dims) with groups, strides, dilations, pads/auto_pad and optional bias.
struct Conv;

impl OpDef for Conv {
    fn name(&self) -> &'static str {
        "Conv"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let t = cx.input(0)?.dtype;
        if !t.is_float() {
            bail!("Conv needs float inputs, found {t}");
        }
        Ok(vec![infer_conv(cx, t, 0, 1)?])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, w, b) = (req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2));
        let t = x.dtype();
        if !t.is_float() || w.dtype() != t || b.is_some_and(|b| b.dtype() != t) {
            bail!("Conv needs float inputs of one type, found {t} and {}", w.dtype());
        }
        expect_nc(x, "X")?;
        let s = conv_setup(cx.attrs, &x.shape, &w.shape)?;
        if let Some(b) = b {
            if b.len() != s.m {
                bail!("bias must have {} elements, found shape {:?}", s.m, b.shape);
            }
        }
        let y = if uses_f32(t) {
            let bv = b.map(f32::values);
            f32::tensor(t, &s.out_shape, conv_real(&s, &f32::values(x), &f32::values(w), bv.as_deref()))
        } else {
            let bv = b.map(f64::values);
            f64::tensor(t, &s.out_shape, conv_real(&s, &f64::values(x), &f64::values(w), bv.as_deref()))
        };
        Ok(vec![y])
    }
}

/// `x - zero_point` as f64, with a scalar zero point or (`per_channel`) one per leading-dim slice.
fn shifted(t: &Tensor, zp: Option<&Tensor>, what: &str) -> OpResult<Vec<f64>> {
    if !matches!(t.dtype(), DType::I8 | DType::U8) {
        bail!("{what} must be int8 or uint8, found {}", t.dtype());
    }
    let mut v = t.to_f64();
    let Some(zp) = zp else { return Ok(v) };
    let z = zp.to_f64();
    let lead = t.shape.first().copied().unwrap_or(1);
    if z.len() == 1 {
        v.iter_mut().for_each(|x| *x -= z[0]);
    } else if z.len() == lead && lead > 0 {
        let per = v.len() / lead;
        for (i, x) in v.iter_mut().enumerate() {
            *x -= z[i / per.max(1)];
        }
    } else {
        bail!("{what} zero point has {} elements, expected 1 or {lead}", z.len());
    }
    Ok(v)
}

/// Integer convolution: `(x - x_zero_point) ⊛ (w - w_zero_point)`, accumulated exactly in int32.
struct ConvInteger;

impl OpDef for ConvInteger {
    fn name(&self) -> &'static str {
        "ConvInteger"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        Ok(vec![infer_conv(cx, DType::I32, 0, 1)?])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, w) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_nc(x, "x")?;
        let s = conv_setup(cx.attrs, &x.shape, &w.shape)?;
        if opt(inputs, 2).is_some_and(|z| z.len() != 1) {
            bail!("x_zero_point must be a scalar");
        }
        let xv = shifted(x, opt(inputs, 2), "x")?;
        let wv = shifted(w, opt(inputs, 3), "w")?;
        Ok(vec![Tensor::from_f64(DType::I32, &s.out_shape, conv_real(&s, &xv, &wv, None))])
    }
}

/// Quantized convolution: dequantize x and w, convolve (with int32 bias), requantize to y's type.
struct QLinearConv;

impl OpDef for QLinearConv {
    fn name(&self) -> &'static str {
        "QLinearConv"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let t = cx.opt_input(7).map_or(cx.input(0)?.dtype, |z| z.dtype);
        Ok(vec![infer_conv(cx, t, 0, 3)?])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, xs, w, ws, ys) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 3)?, req(inputs, 4)?, req(inputs, 6)?);
        let (yzp, b) = (opt(inputs, 7), opt(inputs, 8));
        expect_nc(x, "x")?;
        let s = conv_setup(cx.attrs, &x.shape, &w.shape)?;
        let xv = shifted(x, opt(inputs, 2), "x")?;
        let wv = shifted(w, opt(inputs, 5), "w")?;
        let bv = match b {
            Some(b) if b.len() != s.m => bail!("bias must have {} elements, found shape {:?}", s.m, b.shape),
            Some(b) => Some(b.to_f64()),
            None => None,
        };
        let acc = conv_real(&s, &xv, &wv, bv.as_deref());
        let (Some(sx), Some(sy)) = (xs.scalar_value_f64(), ys.scalar_value_f64()) else {
            bail!("x_scale and y_scale must be scalars");
        };
        let wsv = ws.to_f64();
        if wsv.len() != 1 && wsv.len() != s.m {
            bail!("w_scale must have 1 or {} elements, found {}", s.m, wsv.len());
        }
        let st = xs.dtype();
        let factors: Vec<f64> = wsv.iter().map(|&w| round_in(st, round_in(st, sx * w) / sy)).collect();
        let zy = yzp.and_then(|z| z.scalar_value_f64()).unwrap_or(0.0);
        let p = s.geom.out_size().max(1);
        let v = acc
            .iter()
            .enumerate()
            .map(|(i, &r)| (r * factors[if factors.len() == 1 { 0 } else { (i / p) % s.m }] + zy).round_ties_even())
            .collect();
        let out_t = yzp.map_or(x.dtype(), |z| z.dtype());
        Ok(vec![saturate_to(out_t, &s.out_shape, v)?])
    }
}

/// Scatter-adds columns `[C·k × P]` into an image `[C, image]` (the adjoint of [`im2col`]);
/// `g.input` is the image, `g.out` the column positions.
fn col2im<T: Real>(cols: &[T], c: usize, g: &Geom, img: &mut [T]) {
    let [od, oh, ow] = g.out;
    let [kd, kh, kw] = g.kernel;
    let [_, ih, iw] = g.input;
    let (insz, p) = (g.in_size(), g.out_size());
    let mut row = 0;
    for ch in 0..c {
        let im = &mut img[ch * insz..(ch + 1) * insz];
        for a in 0..kd {
            for b in 0..kh {
                for e in 0..kw {
                    let src = &cols[row * p..(row + 1) * p];
                    for z in 0..od {
                        let Some(zz) = g.src(0, z, a) else { continue };
                        for y in 0..oh {
                            let Some(yy) = g.src(1, y, b) else { continue };
                            let base = (zz * ih + yy) * iw;
                            let srow = &src[(z * oh + y) * ow..(z * oh + y + 1) * ow];
                            for (xo, &v) in srow.iter().enumerate() {
                                if let Some(xx) = g.src(2, xo, e) {
                                    im[base + xx] += v;
                                }
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
}

/// Transposed convolution (the gradient of Conv): output size from strides, pads, `output_padding`
/// or an explicit `output_shape`, with groups, dilations and auto_pad.
struct ConvTranspose;

/// `(pads_begin, out_len)` along each spatial axis of a ConvTranspose.
fn convt_axes(a: AttrView, xsp: &[Option<usize>], kernel: &[usize]) -> OpResult<Vec<(usize, Option<usize>)>> {
    let n = kernel.len();
    let strides = spatial_attr(a, "strides", n, 1)?;
    let dil = spatial_attr(a, "dilations", n, 1)?;
    let opad = spatial_attr(a, "output_padding", n, 0)?;
    let pads = spatial_attr(a, "pads", 2 * n, 0)?;
    let auto_pad = a.string("auto_pad", "NOTSET")?;
    if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
        bail!("strides, dilations and kernel dims must be positive");
    }
    // Bounds that keep the window arithmetic in range (no tensor is that large).
    if kernel.iter().chain(&strides).chain(&dil).chain(&opad).chain(&pads).any(|&v| v > 1 << 31) {
        bail!("kernel dims, strides, dilations and pads must be at most 2^31");
    }
    let out_shape = a.ints("output_shape")?.map(|v| v[v.len().saturating_sub(n)..].to_vec());
    let same = matches!(auto_pad.as_str(), "SAME_UPPER" | "SAME_LOWER");
    (0..n)
        .map(|i| {
            let ek = (kernel[i] - 1) * dil[i] + 1;
            let Some(len) = xsp[i] else { return Ok((0, None)) };
            if len as u128 > crate::tensor::MAX_ELEMENTS {
                bail!("spatial axis {i}: input length {len} is too large");
            }
            let full = strides[i] * (len.max(1) - 1) + opad[i] + ek;
            let target = match &out_shape {
                Some(o) if o.len() == n => Some(o[i].max(0) as usize),
                Some(o) => bail!("output_shape {o:?} must have {n} spatial entries"),
                None if same => Some(len * strides[i]),
                None => None,
            };
            match target {
                Some(t) => {
                    let total = full.saturating_sub(t);
                    let (lo, hi) = (total / 2, total - total / 2);
                    Ok((if auto_pad == "SAME_UPPER" { lo } else { hi }, Some(t)))
                }
                None => {
                    let (pb, pe) = (pads[i], pads[i + n]);
                    if full < pb + pe {
                        bail!("pads {pads:?} are larger than the ConvTranspose output along axis {i}");
                    }
                    Ok((pb, Some(full - pb - pe)))
                }
            }
        })
        .collect()
}

impl OpDef for ConvTranspose {
    fn name(&self) -> &'static str {
        "ConvTranspose"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, w) = (cx.input(0)?, cx.input(1)?);
        let t = x.dtype;
        let Some(xs) = nc_spatial(x, "X")? else { return Ok(vec![TensorType::unranked(t)]) };
        let nsp = xs.len() - 2;
        let group = group_attr(cx.attrs)? as u64;
        let (m, kernel) = match &w.shape {
            Some(ws) if ws.len() == xs.len() => {
                let m = ws[1].known().and_then(|d| d.checked_mul(group)).map_or_else(|| cx.fresh_dim(), Dim::Known);
                (m, ws[2..].iter().map(known).collect::<Option<Vec<_>>>())
            }
            Some(_) => bail!("W must have the rank of X ({}), found {w}", xs.len()),
            None => (cx.fresh_dim(), None),
        };
        let kernel = cx.attrs.ints("kernel_shape")?.map(|k| k.iter().map(|&v| v.max(1) as usize).collect()).or(kernel);
        let mut out = vec![xs[0].clone(), m];
        match kernel {
            Some(k) if k.len() == nsp => {
                let xsp: Vec<Option<usize>> = xs[2..].iter().map(known).collect();
                for (_, len) in convt_axes(cx.attrs, &xsp, &k)? {
                    out.push(len.map_or_else(|| cx.fresh_dim(), |l| Dim::Known(l as u64)));
                }
            }
            _ => out.extend(cx.fresh_dims(nsp)),
        }
        Ok(vec![TensorType::new(t, out)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, w, b) = (req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2));
        let t = x.dtype();
        if !t.is_float() || w.dtype() != t || b.is_some_and(|b| b.dtype() != t) {
            bail!("ConvTranspose needs float inputs of one type, found {t} and {}", w.dtype());
        }
        expect_nc(x, "X")?;
        let group = group_attr(cx.attrs)?;
        if w.rank() != x.rank() || w.shape[0] != x.shape[1] || x.shape[1] % group != 0 {
            bail!("ConvTranspose: X {:?} and W {:?} do not match (W is [C, M/group, kernel...])", x.shape, w.shape);
        }
        let nsp = x.rank() - 2;
        let kernel = w.shape[2..].to_vec();
        let xsp: Vec<Option<usize>> = x.shape[2..].iter().map(|&d| Some(d)).collect();
        let axes = convt_axes(cx.attrs, &xsp, &kernel)?;
        let mut g = Geom::default();
        let off = 3 - nsp;
        let strides = spatial_attr(cx.attrs, "strides", nsp, 1)?;
        let dil = spatial_attr(cx.attrs, "dilations", nsp, 1)?;
        for i in 0..nsp {
            g.input[off + i] = axes[i].1.unwrap_or(0);
            g.out[off + i] = x.shape[2 + i];
            g.kernel[off + i] = kernel[i];
            g.stride[off + i] = strides[i];
            g.dil[off + i] = dil[i];
            g.pad[off + i] = axes[i].0;
        }
        let Some(m) = w.shape[1].checked_mul(group) else { bail!("group {group} is too large") };
        let (n, c) = (x.shape[0], x.shape[1]);
        let mut out_shape = vec![n, m];
        out_shape.extend_from_slice(&g.input[off..]);
        checked_numel(&out_shape)?;
        if let Some(b) = b {
            if b.len() != m {
                bail!("bias must have {m} elements, found shape {:?}", b.shape);
            }
        }
        fn run<T: Real>(
            x: &[T],
            w: &[T],
            b: Option<&[T]>,
            g: &Geom,
            (n, c, m, group): (usize, usize, usize, usize),
        ) -> Vec<T> {
            let (cg, mg) = (c / group, m / group);
            let (p, ks, img) = (g.out_size(), g.kernel_size(), g.in_size());
            let kc = mg * ks;
            let mut y = vec![T::ZERO; n * m * img];
            let mut cols = vec![T::ZERO; kc * p];
            for ni in 0..n {
                for gi in 0..group {
                    cols.iter_mut().for_each(|v| *v = T::ZERO);
                    let a = MatRef::rows(w, gi * cg * kc, kc).t();
                    let xb = MatRef::rows(x, (ni * c + gi * cg) * p, p);
                    gemm(kc, p, cg, a, xb, &mut cols, p);
                    let yo = (ni * m + gi * mg) * img;
                    col2im(&cols, mg, g, &mut y[yo..yo + mg * img]);
                }
                if let Some(b) = b {
                    for (j, ch) in y[ni * m * img..(ni + 1) * m * img].chunks_exact_mut(img.max(1)).enumerate() {
                        ch.iter_mut().for_each(|v| *v += b[j]);
                    }
                }
            }
            y
        }
        let dims = (n, c, m, group);
        let y = if uses_f32(t) {
            let bv = b.map(f32::values);
            f32::tensor(t, &out_shape, run(&f32::values(x), &f32::values(w), bv.as_deref(), &g, dims))
        } else {
            let bv = b.map(f64::values);
            f64::tensor(t, &out_shape, run(&f64::values(x), &f64::values(w), bv.as_deref(), &g, dims))
        };
        Ok(vec![y])
    }
}

/// Rearranges column blocks `[N, C·prod(block), L]` into images `[N, C, image_shape]`, summing overlaps.
struct Col2Im;

impl OpDef for Col2Im {
    fn name(&self) -> &'static str {
        "Col2Im"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let t = x.dtype;
        let (Some(img), Some(blk)) = (cx.const_input(1), cx.const_input(2)) else {
            return Ok(vec![TensorType::unranked(t)]);
        };
        let (img, blk) = (ints_of(img)?, ints_of(blk)?);
        let mut out = Vec::new();
        match &x.shape {
            Some(s) if s.len() == 3 => {
                out.push(s[0].clone());
                let bs = blk.iter().try_fold(1i64, |p, &b| p.checked_mul(b));
                out.push(match (s[1].known(), bs) {
                    (Some(cb), Some(bs)) if bs > 0 => Dim::Known(cb / bs as u64),
                    _ => cx.fresh_dim(),
                });
            }
            Some(_) => bail!("Col2Im input must be [N, C*prod(block_shape), L], found {x}"),
            None => out.extend(cx.fresh_dims(2)),
        }
        out.extend(img.iter().map(|&d| Dim::Known(d.max(0) as u64)));
        Ok(vec![TensorType::new(t, out)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let (img, blk) = (ints_of(req(inputs, 1)?)?, ints_of(req(inputs, 2)?)?);
        if !x.dtype().is_float() || x.rank() != 3 {
            bail!("Col2Im needs a float [N, C*prod(block_shape), L] input, found {} {:?}", x.dtype(), x.shape);
        }
        let nsp = img.len();
        if !(1..=3).contains(&nsp) || blk.len() != nsp || img.iter().chain(&blk).any(|&d| d <= 0) {
            bail!("image_shape {img:?} and block_shape {blk:?} must be 1 to 3 positive dims each, of one length");
        }
        let img: Vec<usize> = img.iter().map(|&d| d as usize).collect();
        let blk: Vec<usize> = blk.iter().map(|&d| d as usize).collect();
        let wp = WindowParams::new(cx.attrs, blk.clone(), false)?;
        let g = wp.geometry(&img)?;
        let bs = checked_numel(&blk)?;
        let (n, cb, l) = (x.shape[0], x.shape[1], x.shape[2]);
        if cb % bs != 0 || l != checked_numel(&g.out)? {
            bail!("Col2Im input {:?} does not match {bs} block elements and {} block positions", x.shape, g.out_size());
        }
        let c = cb / bs;
        let mut out_shape = vec![n, c];
        out_shape.extend_from_slice(&img);
        checked_numel(&out_shape)?;
        let xv = f64::values(x);
        let isz = g.in_size();
        let mut y = vec![0.0f64; n * c * isz];
        for ni in 0..n {
            col2im(&xv[ni * cb * l..(ni + 1) * cb * l], c, &g, &mut y[ni * c * isz..(ni + 1) * c * isz]);
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &out_shape, y)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::{Attr, Attrs};

    #[test]
    fn conv_3x3_with_padding_sums_neighbourhoods() {
        let mut attrs = Attrs::new();
        attrs.insert("pads".into(), Attr::Ints(vec![1, 1, 1, 1]));
        let s = conv_setup(AttrView(&attrs), &[1, 1, 3, 3], &[1, 1, 3, 3]).unwrap();
        assert_eq!(s.out_shape, vec![1, 1, 3, 3]);
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let y = conv_real(&s, &x, &[1.0; 9], None);
        assert_eq!(y, vec![8.0, 15.0, 12.0, 21.0, 36.0, 27.0, 20.0, 33.0, 24.0]);
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let attrs = Attrs::new();
        let g = WindowParams::new(AttrView(&attrs), vec![2, 2], false).unwrap().geometry(&[3, 3]).unwrap();
        let x: Vec<f64> = (0..9).map(|v| v as f64).collect();
        let mut cols = vec![0.0; 4 * 4];
        im2col(&x, 1, &g, 0, 4, &mut cols);
        let mut img = vec![0.0; 9];
        col2im(&cols, 1, &g, &mut img);
        // Each pixel is counted once per window covering it.
        let counts = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0];
        assert!(img.iter().zip(&x).zip(&counts).all(|((&i, &v), &c)| i == v * c));
    }
}
