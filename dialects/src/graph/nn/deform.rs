//! DeformConv: a 2-D convolution whose kernel taps are shifted by learned per-position offsets.

use super::gemm::{gemm, MatRef};
use super::{spatial_attr, uses_f32, Real};
use crate::bail;
use crate::graph::{checked_numel, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add(&DeformConv);
}

/// Deformable convolution (2-D): each kernel tap samples X bilinearly (zeros outside) at its
/// regular position plus an offset from `offset` `[N, offset_group·kh·kw·2, oh, ow]`, optionally
/// scaled by `mask` `[N, offset_group·kh·kw, oh, ow]`; then a grouped conv with W and bias B.
struct DeformConv;

/// Bilinear sample of a `h×w` plane at real coordinates `(y, x)`, zero outside.
fn bilinear<T: Real>(p: &[T], h: usize, w: usize, y: f64, x: f64) -> f64 {
    let (y0, x0) = (y.floor(), x.floor());
    let (dy, dx) = (y - y0, x - x0);
    let at = |yy: f64, xx: f64| {
        // Written so that NaN coordinates fall outside too.
        if !(yy >= 0.0 && xx >= 0.0 && yy < h as f64 && xx < w as f64) {
            0.0
        } else {
            p[yy as usize * w + xx as usize].f64()
        }
    };
    at(y0, x0) * (1.0 - dy) * (1.0 - dx)
        + at(y0, x0 + 1.0) * (1.0 - dy) * dx
        + at(y0 + 1.0, x0) * dy * (1.0 - dx)
        + at(y0 + 1.0, x0 + 1.0) * dy * dx
}

impl OpDef for DeformConv {
    fn name(&self) -> &'static str {
        "DeformConv"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (x, w, off) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
        if !x.dtype.is_float() {
            bail!("DeformConv needs float inputs, found {}", x.dtype);
        }
        let (Some(xs), Some(os)) = (&x.shape, &off.shape) else { return Ok(vec![TensorType::unranked(x.dtype)]) };
        let m = w.shape.as_ref().and_then(|s| s.first().cloned()).unwrap_or_else(|| cx.fresh_dim());
        let mut out: Vec<Dim> = vec![xs.first().cloned().unwrap_or_else(|| cx.fresh_dim()), m];
        out.extend(os.iter().skip(2).cloned());
        Ok(vec![TensorType::new(x.dtype, out)])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, w, off, b, mask) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?, opt(inputs, 3), opt(inputs, 4));
        let t = x.dtype();
        if !t.is_float() || [w, off].iter().chain(b.iter()).chain(mask.iter()).any(|v| v.dtype() != t) {
            bail!("DeformConv needs float inputs of one type");
        }
        if x.rank() != 4 || w.rank() != 4 || off.rank() != 4 {
            bail!("DeformConv supports 2-D inputs only: X {:?}, W {:?}, offset {:?}", x.shape, w.shape, off.shape);
        }
        let group = cx.attrs.int("group", 1)?.max(1) as usize;
        let og = cx.attrs.int("offset_group", 1)?.max(1) as usize;
        let (n, c, ih, iw) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let (m, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
        let (oh, ow) = (off.shape[2], off.shape[3]);
        let ks = kh * kw;
        if c != w.shape[1] * group || m % group != 0 || c % og != 0 || off.shape[0] != n || off.shape[1] != og * ks * 2
        {
            bail!(
                "DeformConv shapes do not match: X {:?}, W {:?}, offset {:?}, group {group}, offset_group {og}",
                x.shape,
                w.shape,
                off.shape
            );
        }
        if mask.is_some_and(|mk| mk.shape != [n, og * ks, oh, ow]) || b.is_some_and(|b| b.len() != m) {
            bail!("mask must be [{n}, {}, {oh}, {ow}] and B must have {m} elements", og * ks);
        }
        let strides = spatial_attr(cx.attrs, "strides", 2, 1)?;
        let dil = spatial_attr(cx.attrs, "dilations", 2, 1)?;
        let pads = spatial_attr(cx.attrs, "pads", 4, 0)?;
        let out_shape = [n, m, oh, ow];
        checked_numel(&out_shape)?;
        let geo = (strides, dil, pads);
        fn run<T: Real>(
            x: &Tensor,
            w: &Tensor,
            off: &Tensor,
            b: Option<&Tensor>,
            mask: Option<&Tensor>,
            d: [usize; 10],
            (s, dl, p): &(Vec<usize>, Vec<usize>, Vec<usize>),
        ) -> Vec<T> {
            let [n, c, ih, iw, m, kh, kw, oh, ow, og] = d;
            let (xv, wv, ov) = (T::values(x), T::values(w), off.to_f64());
            let mv = mask.map(|t| t.to_f64());
            let (ks, p_out) = (kh * kw, oh * ow);
            let (group, cpo) = (c / (w.shape[1].max(1)), c / og);
            let (cg, mg) = (c / group, m / group);
            let mut y = vec![T::ZERO; n * m * p_out];
            if let Some(b) = b {
                let bv = b.to_f64();
                for (i, row) in y.chunks_exact_mut(p_out.max(1)).enumerate() {
                    row.iter_mut().for_each(|v| *v = T::of(bv[i % m]));
                }
            }
            let mut col = vec![T::ZERO; cg * ks * p_out];
            for ni in 0..n {
                for gi in 0..group {
                    for cl in 0..cg {
                        let ch = gi * cg + cl;
                        let g = ch / cpo;
                        let plane = &xv[(ni * c + ch) * ih * iw..(ni * c + ch + 1) * ih * iw];
                        for a in 0..kh {
                            for e in 0..kw {
                                let k = a * kw + e;
                                let dst = &mut col[(cl * ks + k) * p_out..(cl * ks + k + 1) * p_out];
                                let obase = ((ni * og + g) * ks + k) * 2 * p_out;
                                for i in 0..oh {
                                    for j in 0..ow {
                                        let q = i * ow + j;
                                        let yy = (i * s[0] + a * dl[0]) as f64 - p[0] as f64 + ov[obase + q];
                                        let xx = (j * s[1] + e * dl[1]) as f64 - p[1] as f64 + ov[obase + p_out + q];
                                        let mut v = bilinear(plane, ih, iw, yy, xx);
                                        if let Some(mv) = &mv {
                                            v *= mv[((ni * og + g) * ks + k) * p_out + q];
                                        }
                                        dst[q] = T::of(v);
                                    }
                                }
                            }
                        }
                    }
                    let kk = cg * ks;
                    let a = MatRef::rows(&wv, gi * mg * kk, kk);
                    let yo = (ni * m + gi * mg) * p_out;
                    gemm(mg, p_out, kk, a, MatRef::rows(&col, 0, p_out), &mut y[yo..], p_out);
                }
            }
            y
        }
        let d = [n, c, ih, iw, m, kh, kw, oh, ow, og];
        let y = if uses_f32(t) {
            f32::tensor(t, &out_shape, run::<f32>(x, w, off, b, mask, d, &geo))
        } else {
            f64::tensor(t, &out_shape, run::<f64>(x, w, off, b, mask, d, &geo))
        };
        Ok(vec![y])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_interpolates_and_zero_pads() {
        let p = [0.0f64, 1.0, 2.0, 3.0];
        assert_eq!(bilinear(&p, 2, 2, 0.5, 0.5), 1.5);
        assert_eq!(bilinear(&p, 2, 2, 1.0, 1.0), 3.0);
        assert_eq!(bilinear(&p, 2, 2, -1.0, 0.0), 0.0);
    }
}
