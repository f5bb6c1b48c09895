//! Normalizations: BatchNormalization, InstanceNormalization, LRN, LayerNormalization,
//! GroupNormalization, RMSNormalization, MeanVarianceNormalization, LpNormalization.

use super::{expect_float, expect_float_type, uses_f32, Real};
use crate::bail;
use crate::graph::{norm_axes, norm_axis, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::{broadcast_index, Tensor};
use crate::types::{broadcast_shapes, DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &BatchNormalization,
        &InstanceNormalization,
        &Lrn,
        &LayerNormalization,
        &GroupNormalization,
        &RmsNormalization,
        &MeanVarianceNormalization,
        &LpNormalization,
    ]);
}

/// Mean and (biased) variance of a slice, in f64.
fn moments<T: Real>(s: &[T]) -> (f64, f64) {
    let n = s.len().max(1) as f64;
    let mean = s.iter().map(|v| v.f64()).sum::<f64>() / n;
    let var = s.iter().map(|v| (v.f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// Computes in f32 or f64 per the tensor's dtype and rebuilds a tensor of the same dtype.
macro_rules! by_real {
    ($t:expr, $f:ident ( $($arg:expr),* )) => {
        if uses_f32($t) { $f::<f32>($($arg),*) } else { $f::<f64>($($arg),*) }
    };
}

/// `y = scale · (x - mean) / sqrt(var + epsilon) + B` per channel of `[N, C, ...]`. In training mode
/// (`training_mode`, or more than one output requested) it normalizes with the batch statistics and
/// also returns the running mean and variance updated with `momentum`. Opsets before 9 may give
/// per-activation (`spatial = 0`) parameters of shape `[C, d...]`, which are applied elementwise.
struct BatchNormalization;

impl OpDef for BatchNormalization {
    fn name(&self) -> &'static str {
        "BatchNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        expect_float_type(x, "X")?;
        let mean = cx.opt_input(3).cloned().unwrap_or_else(|| TensorType::unranked(x.dtype));
        let var = cx.opt_input(4).cloned().unwrap_or_else(|| mean.clone());
        Ok(vec![x.clone(), mean.clone(), var.clone(), mean, var])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let p: Vec<&Tensor> = (1..5).map(|i| req(inputs, i)).collect::<OpResult<_>>()?;
        expect_float(x, "X")?;
        if x.rank() < 2 {
            bail!("X must have rank >= 2 ([N, C, ...]), found {:?}", x.shape);
        }
        let (n, c) = (x.shape[0], x.shape[1]);
        let sp: usize = x.shape[2..].iter().product();
        let eps = cx.attrs.float("epsilon", 1e-5)? as f64;
        let training = cx.attrs.int("training_mode", 0)? != 0 || cx.num_outputs > 1;
        let per_act = p.iter().all(|t| t.len() == c * sp) && sp > 1;
        if !per_act && p.iter().any(|t| t.len() != c) {
            bail!(
                "scale, B, mean and var must each have {c} elements, found shapes {:?}",
                p.iter().map(|t| &t.shape).collect::<Vec<_>>()
            );
        }
        let pv: Vec<Vec<f64>> = p.iter().map(|t| t.to_f64()).collect();
        let t = x.dtype();
        if !training {
            // y = x * a + b with per-channel (or per-activation) a, b.
            let a: Vec<f64> = (0..pv[0].len()).map(|i| pv[0][i] / (pv[3][i] + eps).sqrt()).collect();
            let b: Vec<f64> = (0..a.len()).map(|i| pv[1][i] - pv[2][i] * a[i]).collect();
            fn affine<T: Real>(x: &Tensor, a: &[f64], b: &[f64], c: usize, sp: usize, per_act: bool) -> Tensor {
                let xv = T::values(x);
                let mut y = vec![T::ZERO; xv.len()];
                let per = if per_act { c * sp } else { c };
                let step = if per_act { 1 } else { sp.max(1) };
                for (ch, (dst, src)) in y.chunks_mut(step).zip(xv.chunks(step)).enumerate() {
                    let (ai, bi) = (T::of(a[ch % per]), T::of(b[ch % per]));
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = s * ai + bi;
                    }
                }
                T::tensor(x.dtype(), &x.shape, y)
            }
            let y = by_real!(t, affine(x, &a, &b, c, sp, per_act));
            let (m, v) = (p[2].clone(), p[3].clone());
            return Ok(vec![y, m.clone(), v.clone(), m, v]);
        }
        if per_act {
            bail!("training-mode BatchNormalization needs per-channel parameters");
        }
        let momentum = cx.attrs.float("momentum", 0.9)? as f64;
        let xv = x.to_f64();
        let mut bm = vec![0.0; c];
        let mut bv = vec![0.0; c];
        let cnt = (n * sp).max(1) as f64;
        for (i, &v) in xv.iter().enumerate() {
            bm[(i / sp.max(1)) % c] += v;
        }
        bm.iter_mut().for_each(|m| *m /= cnt);
        for (i, &v) in xv.iter().enumerate() {
            let ch = (i / sp.max(1)) % c;
            bv[ch] += (v - bm[ch]).powi(2);
        }
        bv.iter_mut().for_each(|v| *v /= cnt);
        let y = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = (i / sp.max(1)) % c;
                pv[0][ch] * (v - bm[ch]) / (bv[ch] + eps).sqrt() + pv[1][ch]
            })
            .collect();
        let rm = (0..c).map(|i| pv[2][i] * momentum + bm[i] * (1.0 - momentum)).collect();
        let rv = (0..c).map(|i| pv[3][i] * momentum + bv[i] * (1.0 - momentum)).collect();
        let (mt, vt) = (p[2].dtype(), p[3].dtype());
        Ok(vec![
            Tensor::from_f64(t, &x.shape, y),
            Tensor::from_f64(mt, &p[2].shape, rm),
            Tensor::from_f64(vt, &p[3].shape, rv),
            Tensor::from_f64(mt, &p[2].shape, bm),
            Tensor::from_f64(vt, &p[3].shape, bv.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()),
        ])
    }
}

/// Normalizes contiguous blocks of `block` elements; the affine parameters of element `i` are
/// `scale[pidx(i)]` and `bias[pidx(i)]`. Returns y and the per-block mean and 1/std.
fn normalize_blocks<T: Real>(
    xv: &[T],
    block: usize,
    eps: f64,
    rms: bool,
    scale: &[f64],
    bias: Option<&[f64]>,
    pidx: &dyn Fn(usize) -> usize,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let mut y = vec![T::ZERO; xv.len()];
    let nb = xv.len().checked_div(block).unwrap_or(0);
    let (mut means, mut invs) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
    for (bi, (src, dst)) in xv.chunks(block.max(1)).zip(y.chunks_mut(block.max(1))).enumerate() {
        let (mean, var) = if rms {
            (0.0, src.iter().map(|v| v.f64().powi(2)).sum::<f64>() / src.len().max(1) as f64)
        } else {
            moments(src)
        };
        let inv = 1.0 / (var + eps).sqrt();
        for (j, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
            let i = pidx(bi * block + j);
            let b = bias.map_or(0.0, |b| b[i]);
            *d = T::of((s.f64() - mean) * inv * scale[i] + b);
        }
        means.push(mean);
        invs.push(inv);
    }
    (y, means, invs)
}

/// Per-(n, c) normalization over the spatial dims: `y = scale · (x - mean) / sqrt(var + eps) + B`.
struct InstanceNormalization;

impl OpDef for InstanceNormalization {
    fn name(&self) -> &'static str {
        "InstanceNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float_type(cx.input(0)?, "input")?;
        Ok(vec![cx.input(0)?.clone()])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, s, b) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(x, "input")?;
        if x.rank() < 2 || s.len() != x.shape[1] || b.len() != x.shape[1] {
            bail!(
                "InstanceNormalization needs [N, C, ...] input and [C] scale/B, found {:?}, {:?}, {:?}",
                x.shape,
                s.shape,
                b.shape
            );
        }
        let (c, sp) = (x.shape[1], x.shape[2..].iter().product::<usize>());
        let eps = cx.attrs.float("epsilon", 1e-5)? as f64;
        let (sv, bv) = (s.to_f64(), b.to_f64());
        let pidx = move |i: usize| (i / sp.max(1)) % c;
        fn go<T: Real>(
            x: &Tensor,
            sp: usize,
            eps: f64,
            sv: &[f64],
            bv: &[f64],
            pidx: &dyn Fn(usize) -> usize,
        ) -> Tensor {
            let (y, _, _) = normalize_blocks(&T::values(x), sp, eps, false, sv, Some(bv), pidx);
            T::tensor(x.dtype(), &x.shape, y)
        }
        Ok(vec![by_real!(x.dtype(), go(x, sp, eps, &sv, &bv, &pidx))])
    }
}

/// Local response normalization across channels:
/// `y = x / (bias + alpha/size · Σ x²)^beta` over a window of `size` neighbouring channels.
struct Lrn;

impl OpDef for Lrn {
    fn name(&self) -> &'static str {
        "LRN"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float_type(cx.input(0)?, "X")?;
        Ok(vec![cx.input(0)?.clone()])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        expect_float(x, "X")?;
        if x.rank() < 2 {
            bail!("LRN needs an [N, C, ...] input, found {:?}", x.shape);
        }
        let size = cx.attrs.int("size", 0)?;
        if size < 1 {
            bail!("attribute 'size' must be positive, found {size}");
        }
        let (alpha, beta, bias) = (
            cx.attrs.float("alpha", 1e-4)? as f64,
            cx.attrs.float("beta", 0.75)? as f64,
            cx.attrs.float("bias", 1.0)? as f64,
        );
        let (n, c, sp) = (x.shape[0], x.shape[1], x.shape[2..].iter().product::<usize>());
        let size = size as usize;
        let (lo, hi) = ((size - 1) / 2, (size - 1).div_ceil(2));
        fn go<T: Real>(
            x: &Tensor,
            (n, c, sp, lo, hi, size): (usize, usize, usize, usize, usize, usize),
            (alpha, beta, bias): (f64, f64, f64),
        ) -> Tensor {
            let xv = T::values(x);
            let mut y = vec![T::ZERO; xv.len()];
            let mut sq = vec![T::ZERO; sp];
            let k = T::of(alpha / size as f64);
            for ni in 0..n {
                let img = &xv[ni * c * sp..(ni + 1) * c * sp];
                for ch in 0..c {
                    sq.iter_mut().for_each(|v| *v = T::ZERO);
                    for cc in ch.saturating_sub(lo)..(ch + hi + 1).min(c) {
                        for (s, &v) in sq.iter_mut().zip(&img[cc * sp..(cc + 1) * sp]) {
                            *s += v * v;
                        }
                    }
                    let dst = &mut y[(ni * c + ch) * sp..(ni * c + ch + 1) * sp];
                    for ((d, &v), &s) in dst.iter_mut().zip(&img[ch * sp..(ch + 1) * sp]).zip(&sq) {
                        *d = T::of(v.f64() / (bias + (k * s).f64()).powf(beta));
                    }
                }
            }
            T::tensor(x.dtype(), &x.shape, y)
        }
        Ok(vec![by_real!(x.dtype(), go(x, (n, c, sp, lo, hi, size), (alpha, beta, bias)))])
    }
}

/// The stash type (`stash_type` attribute, an ONNX type code; default float).
fn stash_dtype(cx_attrs: crate::graph::AttrView) -> OpResult<DType> {
    Ok(cx_attrs.dtype("stash_type")?.unwrap_or(DType::F32))
}

/// Output types of LayerNormalization-style ops: Y like X, then statistics `[X[..axis], 1...]`.
fn stats_types(cx: &InferCx, axis: i64, stats: DType) -> OpResult<Vec<TensorType>> {
    let x = cx.input(0)?;
    expect_float_type(x, "X")?;
    let st = match &x.shape {
        Some(s) => {
            let a = norm_axis(axis, s.len())?;
            let mut d: Vec<Dim> = s[..a].to_vec();
            d.extend((a..s.len()).map(|_| Dim::Known(1)));
            TensorType::new(stats, d)
        }
        None => TensorType::unranked(stats),
    };
    Ok(vec![x.clone(), st.clone(), st])
}

/// Element index maps of a parameter broadcast to X's shape.
fn param_map(p: &Tensor, x: &[usize], what: &str) -> OpResult<Vec<usize>> {
    if broadcast_shapes(&p.shape, x).as_deref() != Some(x) {
        bail!("{what} of shape {:?} does not broadcast to X's shape {x:?}", p.shape);
    }
    Ok(broadcast_index(&p.shape, x))
}

/// Shared eval of LayerNormalization (`rms = false`) and RMSNormalization (`rms = true`).
fn layer_norm(cx: &EvalCx, inputs: &[Option<&Tensor>], rms: bool) -> OpResult<Vec<Tensor>> {
    let (x, s, b) = (req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2));
    expect_float(x, "X")?;
    let a = norm_axis(cx.attrs.int("axis", -1)?, x.rank())?;
    let eps = cx.attrs.float("epsilon", 1e-5)? as f64;
    let block: usize = x.shape[a..].iter().product();
    let si = param_map(s, &x.shape, "Scale")?;
    let bi = match b {
        Some(b) => Some(param_map(b, &x.shape, "B")?),
        None => None,
    };
    // Gather the parameters elementwise (cheap next to the normalization itself).
    let sv = s.to_f64();
    let scale: Vec<f64> = si.iter().map(|&i| sv[i]).collect();
    let bias: Option<Vec<f64>> = b.zip(bi).map(|(b, bi)| {
        let bv = b.to_f64();
        bi.iter().map(|&i| bv[i]).collect()
    });
    let xv = x.to_f64();
    let (y, mut means, mut invs) = normalize_blocks(&xv, block, eps, rms, &scale, bias.as_deref(), &|i| i);
    let mut sshape = x.shape[..a].to_vec();
    sshape.extend((a..x.rank()).map(|_| 1));
    if block == 0 {
        // Statistics of empty blocks (numpy's mean of nothing).
        let n = sshape.iter().product();
        (means, invs) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    }
    let st = stash_dtype(cx.attrs)?;
    let st = if st.is_float() { st } else { DType::F32 };
    Ok(vec![
        Tensor::from_f64(x.dtype(), &x.shape, y),
        Tensor::from_f64(st, &sshape, means),
        Tensor::from_f64(st, &sshape, invs),
    ])
}

/// `y = (x - mean) / sqrt(var + epsilon) · Scale + B` over the axes from `axis` on; optionally
/// also returns Mean and InvStdDev.
struct LayerNormalization;

impl OpDef for LayerNormalization {
    fn name(&self) -> &'static str {
        "LayerNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let st = stash_dtype(cx.attrs)?;
        stats_types(cx, cx.attrs.int("axis", -1)?, if st.is_float() { st } else { DType::F32 })
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        layer_norm(cx, inputs, false)
    }
}

/// `y = x / sqrt(mean(x²) + epsilon) · scale` over the axes from `axis` on.
struct RmsNormalization;

impl OpDef for RmsNormalization {
    fn name(&self) -> &'static str {
        "RMSNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        Ok(stats_types(cx, cx.attrs.int("axis", -1)?, DType::F32)?.into_iter().take(1).collect())
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        Ok(layer_norm(cx, inputs, true)?.into_iter().take(1).collect())
    }
}

/// Normalizes each of `num_groups` channel groups of `[N, C, ...]`, then applies a per-channel
/// (opset 21) or per-group (opset 18) scale and bias.
struct GroupNormalization;

impl OpDef for GroupNormalization {
    fn name(&self) -> &'static str {
        "GroupNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float_type(cx.input(0)?, "X")?;
        Ok(vec![cx.input(0)?.clone()])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, s, b) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(x, "X")?;
        let g = cx.attrs.int("num_groups", 0)?;
        if x.rank() < 2 || g < 1 || x.shape[1] % g as usize != 0 {
            bail!("GroupNormalization needs [N, C, ...] with C divisible by num_groups {g}, found {:?}", x.shape);
        }
        let (c, g) = (x.shape[1], g as usize);
        let sp: usize = x.shape[2..].iter().product();
        let per_group = s.len() == g && c != g;
        let want = if per_group { g } else { c };
        if s.len() != want || b.len() != want {
            bail!("scale and bias must have {c} (or {g}) elements, found {:?} and {:?}", s.shape, b.shape);
        }
        let eps = cx.attrs.float("epsilon", 1e-5)? as f64;
        let cg = c / g;
        let pidx = move |i: usize| {
            let ch = (i / sp.max(1)) % c;
            if per_group {
                ch / cg
            } else {
                ch
            }
        };
        let xv = x.to_f64();
        let (y, _, _) = normalize_blocks(&xv, cg * sp, eps, false, &s.to_f64(), Some(&b.to_f64()), &pidx);
        Ok(vec![Tensor::from_f64(x.dtype(), &x.shape, y)])
    }
}

/// `y = (x - mean) / (sqrt(var) + 1e-9)` with statistics over `axes` (default `[0, 2, 3]`).
struct MeanVarianceNormalization;

impl OpDef for MeanVarianceNormalization {
    fn name(&self) -> &'static str {
        "MeanVarianceNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float_type(cx.input(0)?, "X")?;
        Ok(vec![cx.input(0)?.clone()])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        expect_float(x, "X")?;
        let axes = norm_axes(&cx.attrs.ints("axes")?.unwrap_or_else(|| vec![0, 2, 3]), x.rank())?;
        // Group elements by their coordinates on the kept axes.
        let st = crate::tensor::strides(&x.shape);
        let kept: Vec<usize> = (0..x.rank()).filter(|a| !axes.contains(a)).collect();
        let key = |i: usize| kept.iter().fold(0, |k, &a| k * x.shape[a] + (i / st[a]) % x.shape[a]);
        let nk: usize = kept.iter().map(|&a| x.shape[a]).product();
        let xv = x.to_f64();
        let (mut sum, mut cnt) = (vec![0.0; nk], vec![0usize; nk]);
        for (i, &v) in xv.iter().enumerate() {
            sum[key(i)] += v;
            cnt[key(i)] += 1;
        }
        let mean: Vec<f64> = sum.iter().zip(&cnt).map(|(s, &c)| s / c.max(1) as f64).collect();
        let mut var = vec![0.0; nk];
        for (i, &v) in xv.iter().enumerate() {
            var[key(i)] += (v - mean[key(i)]).powi(2);
        }
        let y = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let k = key(i);
                (v - mean[k]) / ((var[k] / cnt[k].max(1) as f64).sqrt() + 1e-9)
            })
            .collect();
        Ok(vec![Tensor::from_f64(x.dtype(), &x.shape, y)])
    }
}

/// `y = x / ‖x‖_p` along `axis` (p is 1 or 2).
struct LpNormalization;

impl OpDef for LpNormalization {
    fn name(&self) -> &'static str {
        "LpNormalization"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        expect_float_type(cx.input(0)?, "input")?;
        Ok(vec![cx.input(0)?.clone()])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        expect_float(x, "input")?;
        let p = cx.attrs.int("p", 2)?;
        if p != 1 && p != 2 {
            bail!("p must be 1 or 2, found {p}");
        }
        if x.rank() == 0 {
            bail!("LpNormalization needs rank >= 1");
        }
        let a = norm_axis(cx.attrs.int("axis", -1)?, x.rank())?;
        let (n, inner) = (x.shape[a], x.shape[a + 1..].iter().product::<usize>());
        let xv = x.to_f64();
        let mut y = vec![0.0; xv.len()];
        for o in 0..xv.len().checked_div(n * inner).unwrap_or(0) {
            for q in 0..inner {
                let idx = |i: usize| o * n * inner + i * inner + q;
                let norm = if p == 1 {
                    (0..n).map(|i| xv[idx(i)].abs()).sum::<f64>()
                } else {
                    (0..n).map(|i| xv[idx(i)].powi(2)).sum::<f64>().sqrt()
                };
                for i in 0..n {
                    y[idx(i)] = if norm == 0.0 { 0.0 } else { xv[idx(i)] / norm };
                }
            }
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &x.shape, y)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_blocks_zero_mean_unit_variance() {
        let x = [1.0f64, 3.0, 10.0, 20.0];
        let (y, m, _) = normalize_blocks(&x, 2, 0.0, false, &[1.0; 4], None, &|i| i);
        assert_eq!(m, vec![2.0, 15.0]);
        assert!(y.iter().zip([-1.0, 1.0, -1.0, 1.0]).all(|(a, b)| (a - b).abs() < 1e-12));
        let (r, _, _) = normalize_blocks(&[3.0f64, 4.0], 2, 0.0, true, &[1.0; 2], None, &|i| i);
        let rms = (12.5f64).sqrt();
        assert!((r[0] - 3.0 / rms).abs() < 1e-12);
    }
}
