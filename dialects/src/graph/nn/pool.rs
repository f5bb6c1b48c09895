//! Pooling: MaxPool, AveragePool, LpPool, their Global forms, and MaxUnpool.

use super::{expect_nc, nc_spatial, spatial_attr, uses_f32, Geom, Real, WindowParams};
use crate::bail;
use crate::graph::{checked_numel, ints_of, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Pool { name: "MaxPool", kind: Kind::Max },
        &Pool { name: "AveragePool", kind: Kind::Avg },
        &Pool { name: "LpPool", kind: Kind::Lp },
        &GlobalPool { name: "GlobalMaxPool", kind: Kind::Max },
        &GlobalPool { name: "GlobalAveragePool", kind: Kind::Avg },
        &GlobalPool { name: "GlobalLpPool", kind: Kind::Lp },
        &MaxUnpool,
    ]);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Max,
    Avg,
    Lp,
}

/// Per-kind settings read from attributes.
struct PoolOpts {
    kind: Kind,
    count_include_pad: bool,
    p: f64,
}

/// Pools every `[N·C]` plane of `x`; returns the values and, for Max, the flat spatial argmax.
fn pool_real<T: Real>(x: &[T], planes: usize, g: &Geom, o: &PoolOpts) -> (Vec<T>, Vec<usize>) {
    let (insz, outsz) = (g.in_size(), g.out_size());
    let [od, oh, ow] = g.out;
    let [kd, kh, kw] = g.kernel;
    let [_, ih, iw] = g.input;
    let mut y = Vec::with_capacity(planes * outsz);
    let mut arg = Vec::with_capacity(if o.kind == Kind::Max { planes * outsz } else { 0 });
    // Taps of the padded (not ceil-extended) window along axis `a` at output `i`.
    let padded_taps = |a: usize, i: usize, k: usize| {
        (0..k).filter(|&t| i * g.stride[a] + t * g.dil[a] < g.input[a] + g.pad[a] + g.pad_end[a]).count()
    };
    for pl in 0..planes {
        let xp = &x[pl * insz..(pl + 1) * insz];
        for z in 0..od {
            for yy in 0..oh {
                for xx in 0..ow {
                    let (mut best, mut bi, mut sum, mut cnt) = (T::NEG_INF, usize::MAX, 0.0f64, 0usize);
                    for a in 0..kd {
                        let Some(sz) = g.src(0, z, a) else { continue };
                        for b in 0..kh {
                            let Some(sy) = g.src(1, yy, b) else { continue };
                            for e in 0..kw {
                                let Some(sx) = g.src(2, xx, e) else { continue };
                                let idx = (sz * ih + sy) * iw + sx;
                                let v = xp[idx];
                                match o.kind {
                                    Kind::Max => {
                                        if bi == usize::MAX || v > best {
                                            best = v;
                                            bi = idx;
                                        }
                                    }
                                    Kind::Avg => sum += v.f64(),
                                    Kind::Lp => sum += v.f64().abs().powf(o.p),
                                }
                                cnt += 1;
                            }
                        }
                    }
                    y.push(match o.kind {
                        Kind::Max => {
                            arg.push(bi);
                            best
                        }
                        Kind::Avg => {
                            let n = if o.count_include_pad {
                                padded_taps(0, z, kd) * padded_taps(1, yy, kh) * padded_taps(2, xx, kw)
                            } else {
                                cnt
                            };
                            T::of(sum / n as f64)
                        }
                        Kind::Lp => T::of(sum.powf(1.0 / o.p)),
                    });
                }
            }
        }
    }
    (y, arg)
}

/// f32 max pooling without padding or dilation checks per tap (the common CNN case).
fn max_pool_f32_fast(x: &[f32], planes: usize, g: &Geom) -> Vec<f32> {
    let (insz, [_, oh, ow], [_, kh, kw], [_, ih, iw]) = (g.in_size(), g.out, g.kernel, g.input);
    let mut y = Vec::with_capacity(planes * oh * ow);
    for pl in 0..planes {
        let xp = &x[pl * insz..(pl + 1) * insz];
        for yy in 0..oh {
            let y0 = (yy * g.stride[1]).saturating_sub(g.pad[1]);
            let y1 = (yy * g.stride[1] + kh).saturating_sub(g.pad[1]).min(ih);
            for xx in 0..ow {
                let x0 = (xx * g.stride[2]).saturating_sub(g.pad[2]);
                let x1 = (xx * g.stride[2] + kw).saturating_sub(g.pad[2]).min(iw);
                let mut m = f32::NEG_INFINITY;
                for r in y0..y1 {
                    if x0 >= x1 {
                        break;
                    }
                    for &v in &xp[r * iw + x0..r * iw + x1] {
                        m = if v > m { v } else { m };
                    }
                }
                y.push(m);
            }
        }
    }
    y
}

/// Pooling parameters and geometry from attributes and an input shape.
fn pool_geom(cx_attrs: crate::graph::AttrView, nsp: usize) -> OpResult<WindowParams> {
    let Some(k) = cx_attrs.ints("kernel_shape")? else { bail!("attribute 'kernel_shape' is required") };
    if k.len() != nsp || k.iter().any(|&v| v <= 0) {
        bail!("kernel_shape {k:?} must have {nsp} positive entries");
    }
    WindowParams::new(cx_attrs, k.iter().map(|&v| v as usize).collect(), true)
}

/// Sliding-window pooling over 1 to 3 spatial dims: max (with optional Indices output, as flat
/// indices in row-major or, with `storage_order` 1, column-major spatial order), average
/// (`count_include_pad`) or Lp (`p`), with strides, dilations, pads/auto_pad and `ceil_mode`.
struct Pool {
    name: &'static str,
    kind: Kind,
}

impl OpDef for Pool {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let t = x.dtype;
        if !(t.is_float() || self.kind == Kind::Max && matches!(t, DType::I8 | DType::U8)) {
            bail!("{} does not support element type {t}", self.name);
        }
        let Some(xs) = nc_spatial(x, "X")? else {
            return Ok(vec![TensorType::unranked(t), TensorType::unranked(DType::I64)]);
        };
        let wp = pool_geom(cx.attrs, xs.len() - 2)?;
        let mut out = xs[..2].to_vec();
        out.extend(wp.infer_dims(cx, &xs[2..])?);
        Ok(vec![TensorType::new(t, out.clone()), TensorType::new(DType::I64, out)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let t = x.dtype();
        if !(t.is_float() || self.kind == Kind::Max && matches!(t, DType::I8 | DType::U8)) {
            bail!("{} does not support element type {t}", self.name);
        }
        expect_nc(x, "X")?;
        let nsp = x.rank() - 2;
        let g = pool_geom(cx.attrs, nsp)?.geometry(&x.shape[2..])?;
        let mut shape = x.shape[..2].to_vec();
        shape.extend_from_slice(&g.out[3 - nsp..]);
        checked_numel(&shape)?;
        let o = PoolOpts {
            kind: self.kind,
            count_include_pad: cx.attrs.int("count_include_pad", 0)? != 0,
            p: cx.attrs.int("p", 2)? as f64,
        };
        let planes = x.shape[0] * x.shape[1];
        let want_idx = self.kind == Kind::Max && cx.num_outputs > 1;
        let fast = self.kind == Kind::Max && !want_idx && t == DType::F32 && g.dil == [1; 3] && g.kernel[0] == 1;
        let (y, arg) = if fast {
            (f32::tensor(t, &shape, max_pool_f32_fast(x.as_f32().unwrap_or_default(), planes, &g)), vec![])
        } else if uses_f32(t) {
            let (y, a) = pool_real(&f32::values(x), planes, &g, &o);
            (f32::tensor(t, &shape, y), a)
        } else {
            let (y, a) = pool_real(&f64::values(x), planes, &g, &o);
            (f64::tensor(t, &shape, y), a)
        };
        if !want_idx {
            return Ok(vec![y]);
        }
        let col_major = cx.attrs.int("storage_order", 0)? != 0;
        let (insz, osz) = (g.in_size(), g.out_size().max(1));
        let sp = &g.input[3 - nsp..];
        let idx = arg
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let base = (i / osz * insz) as i64;
                if !col_major || a == usize::MAX {
                    return if a == usize::MAX { -1 } else { base + a as i64 };
                }
                // Re-linearize the spatial position column-major.
                let (mut rem, mut coords) = (a, vec![0; nsp]);
                for d in (0..nsp).rev() {
                    coords[d] = rem % sp[d];
                    rem /= sp[d];
                }
                let (mut lin, mut mul) = (0, 1);
                for d in 0..nsp {
                    lin += coords[d] * mul;
                    mul *= sp[d];
                }
                base + lin as i64
            })
            .collect();
        Ok(vec![y, Tensor::from_i64(&shape, idx)])
    }
}

/// Max / average / Lp pooling over all spatial dims: `[N, C, d...]` → `[N, C, 1...]`.
struct GlobalPool {
    name: &'static str,
    kind: Kind,
}

impl OpDef for GlobalPool {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("{} needs a float input, found {}", self.name, x.dtype);
        }
        let Some(xs) = &x.shape else { return Ok(vec![x.clone()]) };
        if xs.len() < 2 {
            bail!("{} needs an [N, C, ...] input, found {x}", self.name);
        }
        let mut out = xs[..2].to_vec();
        out.extend((2..xs.len()).map(|_| Dim::Known(1)));
        Ok(vec![TensorType::new(x.dtype, out)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_float() || x.rank() < 2 {
            bail!("{} needs a float [N, C, ...] input, found {} {:?}", self.name, x.dtype(), x.shape);
        }
        let mut shape = x.shape[..2].to_vec();
        shape.extend((2..x.rank()).map(|_| 1));
        let planes = x.shape[0] * x.shape[1];
        let sz: usize = x.shape[2..].iter().product();
        let p = cx.attrs.int("p", 2)? as f64;
        let kind = self.kind;
        fn run<T: Real>(x: &[T], planes: usize, sz: usize, kind: Kind, p: f64) -> Vec<T> {
            (0..planes)
                .map(|pl| {
                    let s = &x[pl * sz..(pl + 1) * sz];
                    match kind {
                        Kind::Max => s.iter().fold(T::NEG_INF, |m, &v| if v > m { v } else { m }),
                        Kind::Avg => {
                            let mut acc = T::ZERO;
                            s.iter().for_each(|&v| acc += v);
                            T::of(acc.f64() / sz as f64)
                        }
                        Kind::Lp => T::of(s.iter().map(|v| v.f64().abs().powf(p)).sum::<f64>().powf(1.0 / p)),
                    }
                })
                .collect()
        }
        let t = x.dtype();
        let y = if uses_f32(t) {
            f32::tensor(t, &shape, run(&f32::values(x), planes, sz, kind, p))
        } else {
            f64::tensor(t, &shape, run(&f64::values(x), planes, sz, kind, p))
        };
        Ok(vec![y])
    }
}

/// The inverse of MaxPool: scatters X into zeros at the flat positions given by Indices; the
/// output size follows from kernel/strides/pads unless `output_shape` is given.
struct MaxUnpool;

fn unpool_shape(cx_attrs: crate::graph::AttrView, xs: &[usize]) -> OpResult<Vec<usize>> {
    let nsp = xs.len() - 2;
    let Some(k) = cx_attrs.ints("kernel_shape")? else { bail!("attribute 'kernel_shape' is required") };
    if k.len() != nsp || k.iter().any(|&v| v <= 0) {
        bail!("kernel_shape {k:?} must have {nsp} positive entries");
    }
    let strides = spatial_attr(cx_attrs, "strides", nsp, 1)?;
    let pads = spatial_attr(cx_attrs, "pads", 2 * nsp, 0)?;
    let mut out = xs[..2].to_vec();
    for i in 0..nsp {
        let full = (xs[2 + i].max(1) - 1).checked_mul(strides[i]).and_then(|v| v.checked_add(k[i] as usize));
        let Some(full) = full else { bail!("the output of spatial axis {i} is too large") };
        let Some(v) = pads[i].checked_add(pads[i + nsp]).and_then(|p| full.checked_sub(p)) else {
            bail!("pads {pads:?} are too large")
        };
        out.push(v);
    }
    Ok(out)
}

impl OpDef for MaxUnpool {
    fn name(&self) -> &'static str {
        "MaxUnpool"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let t = x.dtype;
        if let Some(os) = cx.const_input(2) {
            let v = ints_of(os)?;
            return Ok(vec![TensorType::known(t, &v.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>())]);
        }
        if cx.opt_input(2).is_some() {
            let r = x.rank();
            return Ok(vec![match r {
                Some(r) => TensorType::new(t, cx.fresh_dims(r)),
                None => TensorType::unranked(t),
            }]);
        }
        let Some(xs) = nc_spatial(x, "X")? else { return Ok(vec![TensorType::unranked(t)]) };
        match xs.iter().map(|d| d.known().map(|v| v as usize)).collect::<Option<Vec<_>>>() {
            Some(s) => Ok(vec![TensorType::known(t, &unpool_shape(cx.attrs, &s)?)]),
            None => Ok(vec![TensorType::new(t, cx.fresh_dims(xs.len()))]),
        }
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, ind) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_nc(x, "X")?;
        if ind.shape != x.shape || !ind.dtype().is_int() {
            bail!("I must be an integer tensor of X's shape {:?}, found {} {:?}", x.shape, ind.dtype(), ind.shape);
        }
        let inferred = unpool_shape(cx.attrs, &x.shape)?;
        let shape = match opt(inputs, 2) {
            Some(s) => {
                let v = ints_of(s)?;
                if v.len() != x.rank() || v.iter().zip(&inferred).any(|(&o, &i)| o < i as i64) {
                    bail!("output_shape {v:?} must have rank {} and be at least {inferred:?}", x.rank());
                }
                v.iter().map(|&d| d as usize).collect()
            }
            None => inferred.clone(),
        };
        let n = checked_numel(&shape)?;
        let ninf = checked_numel(&inferred)?;
        let xv = x.to_f64();
        let mut flat = vec![0.0f64; ninf];
        for (&i, &v) in ind.to_i64().iter().zip(&xv) {
            if i < 0 || i as usize >= ninf {
                bail!("index {i} is out of range for an output of {ninf} elements");
            }
            flat[i as usize] = v;
        }
        // Embed the inferred-shape result at the origin of the requested shape.
        let mut y = vec![0.0f64; n];
        let ostr = crate::tensor::strides(&shape);
        let istr = crate::tensor::strides(&inferred);
        for (i, &v) in flat.iter().enumerate() {
            let dst: usize = (0..shape.len()).map(|d| (i / istr[d]) % inferred[d] * ostr[d]).sum();
            y[dst] = v;
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &shape, y)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::{Attr, Attrs};
    use crate::graph::AttrView;

    fn geom(attrs: &Attrs, input: &[usize]) -> Geom {
        pool_geom(AttrView(attrs), input.len()).unwrap().geometry(input).unwrap()
    }

    #[test]
    fn average_pool_counts_pad_only_when_asked() {
        let mut attrs = Attrs::new();
        attrs.insert("kernel_shape".into(), Attr::Ints(vec![2]));
        attrs.insert("pads".into(), Attr::Ints(vec![1, 0]));
        let g = geom(&attrs, &[3]);
        assert_eq!(g.out[2], 3);
        let x = [2.0f64, 4.0, 6.0];
        let mut o = PoolOpts { kind: Kind::Avg, count_include_pad: false, p: 2.0 };
        assert_eq!(pool_real(&x, 1, &g, &o).0, vec![2.0, 3.0, 5.0]);
        o.count_include_pad = true;
        assert_eq!(pool_real(&x, 1, &g, &o).0, vec![1.0, 3.0, 5.0]);
    }

    #[test]
    fn max_pool_ceil_mode_and_fast_path_agree() {
        let mut attrs = Attrs::new();
        attrs.insert("kernel_shape".into(), Attr::Ints(vec![2, 2]));
        attrs.insert("strides".into(), Attr::Ints(vec![2, 2]));
        attrs.insert("ceil_mode".into(), Attr::Int(1));
        let g = geom(&attrs, &[3, 3]);
        assert_eq!(g.out, [1, 2, 2]);
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let o = PoolOpts { kind: Kind::Max, count_include_pad: false, p: 2.0 };
        let (slow, arg) = pool_real(&x, 1, &g, &o);
        assert_eq!(slow, vec![4.0, 5.0, 7.0, 8.0]);
        assert_eq!(arg, vec![4, 5, 7, 8]);
        assert_eq!(max_pool_f32_fast(&x, 1, &g), slow);
    }
}
