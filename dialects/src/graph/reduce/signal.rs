//! Signal processing: `HannWindow`, `HammingWindow`, `BlackmanWindow`, `DFT`, `STFT`,
//! `MelWeightMatrix`. Complex values are stored as a trailing axis of size 2 (real, imaginary);
//! real signals may use a trailing axis of size 1.

use super::{float_scalar, int_scalar, to_size};
use crate::bail;
use crate::graph::{checked_numel, norm_axis, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};
use std::f64::consts::PI;

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Window { name: "HannWindow", kind: WindowKind::Hann },
        &Window { name: "HammingWindow", kind: WindowKind::Hamming },
        &Window { name: "BlackmanWindow", kind: WindowKind::Blackman },
        &Dft,
        &Stft,
        &MelWeightMatrix,
    ]);
}

#[derive(Clone, Copy)]
enum WindowKind {
    Hann,
    Hamming,
    Blackman,
}

/// A window function of length `size` (input 0) in `output_datatype` (default float):
/// Hann `sin²(πn/N)`, Hamming `25/46 - 21/46·cos(2πn/N)`, Blackman
/// `0.42 - 0.5·cos(2πn/N) + 0.08·cos(4πn/N)`, with `N = size` (`periodic=1`) or `size - 1`.
struct Window {
    name: &'static str,
    kind: WindowKind,
}

fn output_dtype(cx_dtype: Option<DType>, name: &str) -> OpResult<DType> {
    let dt = cx_dtype.unwrap_or(DType::F32);
    if !dt.is_numeric() {
        bail!("{name} cannot produce element type {dt}");
    }
    Ok(dt)
}

impl OpDef for Window {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let dt = output_dtype(cx.attrs.dtype("output_datatype")?, self.name)?;
        let n = match cx.const_input(0) {
            Some(t) => Dim::Known(to_size(int_scalar(t, "size")?, "size")? as u64),
            None => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(dt, vec![n])])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let dt = output_dtype(cx.attrs.dtype("output_datatype")?, self.name)?;
        let size = to_size(int_scalar(req(inputs, 0)?, "size")?, "size")?;
        checked_numel(&[size])?;
        let periodic = cx.attrs.int("periodic", 1)? != 0;
        let big_n = if periodic { size as f64 } else { size as f64 - 1.0 };
        let v = (0..size)
            .map(|i| {
                let x = i as f64 / big_n;
                match self.kind {
                    WindowKind::Hann => (PI * x).sin().powi(2),
                    WindowKind::Hamming => 25.0 / 46.0 - (21.0 / 46.0) * (2.0 * PI * x).cos(),
                    WindowKind::Blackman => 0.42 - 0.5 * (2.0 * PI * x).cos() + 0.08 * (4.0 * PI * x).cos(),
                }
            })
            .collect();
        Ok(vec![Tensor::from_f64(dt, &[size], v)])
    }
}

/// A complex number as (re, im).
type C64 = (f64, f64);

/// In-place discrete Fourier transform of `z` (unnormalized; `inverse` flips the exponent
/// sign). Radix-2 for powers of two, direct summation otherwise.
fn fft(z: &mut [C64], inverse: bool) {
    let n = z.len();
    if n <= 1 {
        return;
    }
    let sign = if inverse { 1.0 } else { -1.0 };
    if n.is_power_of_two() {
        let mut j = 0;
        for i in 1..n {
            let mut bit = n >> 1;
            while j & bit != 0 {
                j ^= bit;
                bit >>= 1;
            }
            j |= bit;
            if i < j {
                z.swap(i, j);
            }
        }
        let mut len = 2;
        while len <= n {
            let ang = sign * 2.0 * PI / len as f64;
            for start in (0..n).step_by(len) {
                for k in 0..len / 2 {
                    let (s, c) = (ang * k as f64).sin_cos();
                    let (a, b) = (z[start + k], z[start + k + len / 2]);
                    let t = (b.0 * c - b.1 * s, b.0 * s + b.1 * c);
                    z[start + k] = (a.0 + t.0, a.1 + t.1);
                    z[start + k + len / 2] = (a.0 - t.0, a.1 - t.1);
                }
            }
            len <<= 1;
        }
        return;
    }
    let tw: Vec<C64> = (0..n).map(|k| (sign * 2.0 * PI * k as f64 / n as f64).sin_cos()).map(|(s, c)| (c, s)).collect();
    let src = z.to_vec();
    for (k, out) in z.iter_mut().enumerate() {
        let mut acc = (0.0, 0.0);
        for (j, x) in src.iter().enumerate() {
            let w = tw[(j * k) % n];
            acc.0 += x.0 * w.0 - x.1 * w.1;
            acc.1 += x.0 * w.1 + x.1 * w.0;
        }
        *out = acc;
    }
}

/// What a DFT along one axis computes.
#[derive(Clone, Copy)]
struct DftMode {
    n: usize,
    inverse: bool,
    onesided: bool,
}

impl DftMode {
    /// Output length along the axis and output channel count (2 complex, 1 real).
    fn out_dims(self) -> (usize, usize) {
        match (self.inverse, self.onesided) {
            (false, true) => (self.n / 2 + 1, 2),
            (true, true) => (self.n, 1),
            _ => (self.n, 2),
        }
    }

    /// Transforms one lane of complex input (any length; truncated/zero-padded to `n`).
    fn lane(self, input: &[C64], buf: &mut Vec<C64>) {
        let n = self.n;
        buf.clear();
        if self.inverse && self.onesided {
            // Hermitian completion of a one-sided spectrum, then a real inverse transform.
            buf.resize(n, (0.0, 0.0));
            for k in 0..=n / 2 {
                buf[k] = input.get(k).copied().unwrap_or((0.0, 0.0));
            }
            buf[0].1 = 0.0;
            if n.is_multiple_of(2) {
                buf[n / 2].1 = 0.0;
            }
            for k in n / 2 + 1..n {
                let (re, im) = buf[n - k];
                buf[k] = (re, -im);
            }
        } else {
            buf.extend(input.iter().take(n).copied());
            buf.resize(n, (0.0, 0.0));
        }
        fft(buf, self.inverse);
        if self.inverse {
            let s = 1.0 / n as f64;
            buf.iter_mut().for_each(|z| *z = (z.0 * s, z.1 * s));
        }
        buf.truncate(self.out_dims().0);
    }
}

/// Applies `mode` along `axis` of `x` (shape `[..., c]`, c = 1 or 2); returns data and shape.
fn dft_axis(x: &[f64], shape: &[usize], axis: usize, mode: DftMode) -> OpResult<(Vec<f64>, Vec<usize>)> {
    let r = shape.len();
    let c = shape[r - 1];
    let (outer, len, inner) = super::split_at_axis(&shape[..r - 1], axis);
    let (out_len, oc) = mode.out_dims();
    let mut out_shape = shape.to_vec();
    out_shape[axis] = out_len;
    out_shape[r - 1] = oc;
    let total = checked_numel(&out_shape)?;
    let mut out = vec![0.0; total];
    let (mut lane, mut buf) = (Vec::with_capacity(len), Vec::with_capacity(mode.n));
    for o in 0..outer {
        for i in 0..inner {
            lane.clear();
            lane.extend((0..len).map(|j| {
                let p = ((o * len + j) * inner + i) * c;
                (x[p], if c == 2 { x[p + 1] } else { 0.0 })
            }));
            mode.lane(&lane, &mut buf);
            for (j, z) in buf.iter().enumerate() {
                let p = ((o * out_len + j) * inner + i) * oc;
                out[p] = z.0;
                if oc == 2 {
                    out[p + 1] = z.1;
                }
            }
        }
    }
    Ok((out, out_shape))
}

/// `DFT`: the discrete Fourier transform of `input` (`[..., 1|2]`, real or complex) along
/// `axis` (opset 20: input 2, default -2; before: attribute, default 1) with `dft_length`
/// points (input 1; default the axis length). `onesided` keeps the `n/2+1` non-redundant
/// bins; `inverse` computes the normalized inverse (with `onesided`, a real inverse from a
/// one-sided spectrum).
struct Dft;

impl Dft {
    fn axis(cx_attrs: crate::graph::AttrView, opset: i64, axis_input: Option<i64>, rank: usize) -> OpResult<usize> {
        let a = if cx_attrs.has("axis") || opset < 20 { cx_attrs.int("axis", 1)? } else { axis_input.unwrap_or(-2) };
        let ax = norm_axis(a, rank)?;
        if ax + 1 >= rank {
            bail!("DFT axis {a} must not be the last (complex) axis of a rank-{rank} input");
        }
        Ok(ax)
    }
}

impl OpDef for Dft {
    fn name(&self) -> &'static str {
        "DFT"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("DFT expects a float input, found {}", x.dtype);
        }
        let Some(shape) = x.shape.clone() else {
            return Ok(vec![TensorType::unranked(x.dtype)]);
        };
        if shape.len() < 2 {
            bail!("DFT expects an input of rank >= 2, found rank {}", shape.len());
        }
        let axis_input = match (cx.opt_input(2), cx.const_input(2)) {
            (Some(_), Some(t)) => Some(int_scalar(t, "axis")?),
            (Some(_), None) if cx.opset >= 20 => {
                let dims = cx.fresh_dims(shape.len() - 1);
                let mut d = dims;
                d.push(cx.fresh_dim());
                return Ok(vec![TensorType::new(x.dtype, d)]);
            }
            _ => None,
        };
        let axis = Self::axis(cx.attrs, cx.opset, axis_input, shape.len())?;
        let inverse = cx.attrs.int("inverse", 0)? != 0;
        let onesided = cx.attrs.int("onesided", 0)? != 0;
        let n = match (cx.opt_input(1), cx.const_input(1)) {
            (Some(_), Some(t)) => Some(to_size(int_scalar(t, "dft_length")?, "dft_length")?),
            (Some(_), None) => None,
            (None, _) => shape[axis].known().map(|l| {
                let l = l as usize;
                if inverse && onesided {
                    2 * l.saturating_sub(1)
                } else {
                    l
                }
            }),
        };
        let mut out = shape.clone();
        let last = out.len() - 1;
        out[last] = Dim::Known(if inverse && onesided { 1 } else { 2 });
        out[axis] = match n {
            Some(n) => Dim::Known(DftMode { n, inverse, onesided }.out_dims().0 as u64),
            None => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(x.dtype, out)])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_float() {
            bail!("DFT expects a float input, found {}", x.dtype());
        }
        let r = x.rank();
        if r < 2 || !(1..=2).contains(&x.shape[r - 1]) {
            bail!("DFT expects shape [..., 1] or [..., 2], found {:?}", x.shape);
        }
        let axis_input = if cx.opset >= 20 { opt(inputs, 2).map(|t| int_scalar(t, "axis")).transpose()? } else { None };
        let axis = Self::axis(cx.attrs, cx.opset, axis_input, r)?;
        let inverse = cx.attrs.int("inverse", 0)? != 0;
        let onesided = cx.attrs.int("onesided", 0)? != 0;
        let len = x.shape[axis];
        let n = match opt(inputs, 1) {
            Some(t) => to_size(int_scalar(t, "dft_length")?, "dft_length")?,
            None if inverse && onesided => 2 * len.saturating_sub(1),
            None => len,
        };
        if n == 0 {
            bail!("DFT length must be positive");
        }
        checked_numel(&[n])?;
        let (v, shape) = dft_axis(&x.to_f64(), &x.shape, axis, DftMode { n, inverse, onesided })?;
        Ok(vec![Tensor::from_f64(x.dtype(), &shape, v)])
    }
}

/// `STFT`: short-time Fourier transform of `signal` (`[batch, length, 1|2]`): frames of
/// `frame_length` (input 3, default the window length) every `frame_step` (input 1) samples,
/// each multiplied by `window` (input 2, default ones) and transformed; output
/// `[batch, frames, bins, 2]` with `bins = n/2+1` when `onesided` (default) else `n`.
struct Stft;

impl OpDef for Stft {
    fn name(&self) -> &'static str {
        "STFT"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("STFT expects a float signal, found {}", x.dtype);
        }
        let onesided = cx.attrs.int("onesided", 1)? != 0;
        let step = cx.const_input(1).map(|t| int_scalar(t, "frame_step")).transpose()?;
        let fl = match (cx.opt_input(3), cx.const_input(3)) {
            (Some(_), Some(t)) => Some(int_scalar(t, "frame_length")?),
            (Some(_), None) => None,
            (None, _) => cx.opt_input(2).and_then(|w| w.shape.as_ref()?.first()?.known()).map(|n| n as i64),
        };
        let len = x.shape.as_ref().and_then(|s| s.get(1)?.known()).map(|n| n as i64);
        let batch = match x.shape.as_ref().and_then(|s| s.first().cloned()) {
            Some(b) => b,
            None => cx.fresh_dim(),
        };
        let frames = match (len, fl, step) {
            (Some(l), Some(f), Some(s)) if s > 0 && f > 0 && l >= f => Dim::Known((1 + (l - f) / s) as u64),
            _ => cx.fresh_dim(),
        };
        let bins = match fl {
            Some(f) if f > 0 => Dim::Known(if onesided { f as u64 / 2 + 1 } else { f as u64 }),
            _ => cx.fresh_dim(),
        };
        Ok(vec![TensorType::new(x.dtype, vec![batch, frames, bins, Dim::Known(2)])])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_float() || x.rank() != 3 || !(1..=2).contains(&x.shape[2]) {
            bail!("STFT expects a float signal of shape [batch, length, 1|2], found {} {:?}", x.dtype(), x.shape);
        }
        let step = int_scalar(req(inputs, 1)?, "frame_step")?;
        if step <= 0 {
            bail!("frame_step must be positive, found {step}");
        }
        let window = opt(inputs, 2).map(|w| w.to_f64());
        if let Some(w) = opt(inputs, 2) {
            if w.rank() != 1 {
                bail!("window must be 1-D, found shape {:?}", w.shape);
            }
        }
        let fl = match (opt(inputs, 3), &window) {
            (Some(t), _) => to_size(int_scalar(t, "frame_length")?, "frame_length")?,
            (None, Some(w)) => w.len(),
            (None, None) => x.shape[1],
        };
        let (batch, len, c) = (x.shape[0], x.shape[1], x.shape[2]);
        if fl == 0 || fl > len {
            bail!("frame_length {fl} must be in 1..={len} (the signal length)");
        }
        let window = window.unwrap_or_else(|| vec![1.0; fl]);
        let frames = 1 + (len - fl) / step as usize;
        let onesided = cx.attrs.int("onesided", 1)? != 0;
        let mode = DftMode { n: fl, inverse: false, onesided };
        let bins = mode.out_dims().0;
        let out_shape = [batch, frames, bins, 2];
        let mut out = vec![0.0; checked_numel(&out_shape)?];
        let v = x.to_f64();
        let (mut lane, mut buf) = (Vec::with_capacity(window.len()), Vec::with_capacity(fl));
        for b in 0..batch {
            for f in 0..frames {
                let begin = f * step as usize;
                lane.clear();
                lane.extend(window.iter().enumerate().map(|(j, &w)| {
                    let t = begin + j;
                    if t >= len {
                        return (0.0, 0.0);
                    }
                    let p = (b * len + t) * c;
                    (v[p] * w, if c == 2 { v[p + 1] * w } else { 0.0 })
                }));
                mode.lane(&lane, &mut buf);
                let base = (b * frames + f) * bins * 2;
                for (k, z) in buf.iter().enumerate() {
                    out[base + 2 * k] = z.0;
                    out[base + 2 * k + 1] = z.1;
                }
            }
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &out_shape, out)])
    }
}

/// `MelWeightMatrix`: the `[dft_length/2+1, num_mel_bins]` matrix of triangular filters that
/// maps a linear-frequency spectrogram to the mel scale between `lower_edge_hertz` and
/// `upper_edge_hertz` at `sample_rate` (ONNX's reference construction).
struct MelWeightMatrix;

impl OpDef for MelWeightMatrix {
    fn name(&self) -> &'static str {
        "MelWeightMatrix"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let dt = output_dtype(cx.attrs.dtype("output_datatype")?, "MelWeightMatrix")?;
        let mut dim = |i: usize, f: fn(usize) -> usize| -> OpResult<Dim> {
            Ok(match cx.const_input(i) {
                Some(t) => Dim::Known(f(to_size(int_scalar(t, "size")?, "size")?) as u64),
                None => cx.fresh_dim(),
            })
        };
        let bins = dim(1, |n| n / 2 + 1)?;
        let mels = dim(0, |n| n)?;
        Ok(vec![TensorType::new(dt, vec![bins, mels])])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let dt = output_dtype(cx.attrs.dtype("output_datatype")?, "MelWeightMatrix")?;
        let mels = to_size(int_scalar(req(inputs, 0)?, "num_mel_bins")?, "num_mel_bins")?;
        let dft_len = to_size(int_scalar(req(inputs, 1)?, "dft_length")?, "dft_length")?;
        let rate = int_scalar(req(inputs, 2)?, "sample_rate")?;
        let lo = float_scalar(req(inputs, 3)?, "lower_edge_hertz")?;
        let hi = float_scalar(req(inputs, 4)?, "upper_edge_hertz")?;
        if rate <= 0 {
            bail!("sample_rate must be positive, found {rate}");
        }
        let nbins = dft_len / 2 + 1;
        let mut out = vec![0.0f64; checked_numel(&[nbins, mels])?];
        let to_mel = |hz: f64| 2595.0 * (hz / 700.0).ln_1p() / 10f64.ln();
        let (lo_mel, hi_mel) = (to_mel(lo), to_mel(hi));
        let step = (hi_mel - lo_mel) / (mels + 2) as f64;
        let points: Vec<i64> = (0..mels + 2)
            .map(|i| {
                let hz = 700.0 * ((i as f64 * step + lo_mel) / 2595.0 * 10f64.ln()).exp_m1();
                (((dft_len + 1) as f64 * hz) / rate as f64).floor() as i64
            })
            .collect();
        let mut set = |j: i64, i: usize, v: f64| -> OpResult<()> {
            match usize::try_from(j) {
                Ok(j) if j < nbins => {
                    out[j * mels + i] = v;
                    Ok(())
                }
                _ => bail!("mel filter edge {j} falls outside the {nbins} spectrogram bins"),
            }
        };
        for i in 0..mels {
            let (l, c, h) = (points[i], points[i + 1], points[i + 2]);
            if c == l {
                set(c, i, 1.0)?;
            } else {
                for j in l..=c {
                    set(j, i, (j - l) as f64 / (c - l) as f64)?;
                }
            }
            if h > c {
                for j in c..h {
                    set(j, i, (h - j) as f64 / (h - c) as f64)?;
                }
            }
        }
        Ok(vec![Tensor::from_f64(dt, &[nbins, mels], out)])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::attr::Attr;
    use crate::tensor::Tensor;

    #[test]
    fn dft_of_impulse_and_roundtrip() {
        // A real signal [1, 2, 3, 4] as [1, 4, 1]; its DFT along axis 1.
        let x = Tensor::from_f32(&[1, 4, 1], vec![1.0, 2.0, 3.0, 4.0]);
        let y = eval_op("DFT", &[], &[Some(&x)], 1, 17).unwrap().remove(0);
        assert_eq!(y.shape, vec![1, 4, 2]);
        let want = [10.0, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0];
        assert!(y.to_f64().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5));
        let z = eval_op("DFT", &[("inverse", Attr::Int(1))], &[Some(&y)], 1, 17).unwrap().remove(0);
        let want = [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0];
        assert!(z.to_f64().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5));
        // Non-power-of-two, one-sided, then a real inverse back.
        let x = Tensor::from_f64(crate::types::DType::F64, &[5, 1], vec![1.0, -1.0, 2.0, 0.5, 3.0]);
        let ax = Tensor::from_i64(&[], vec![0]);
        let y = eval_op("DFT", &[("onesided", Attr::Int(1))], &[Some(&x), None, Some(&ax)], 1, 20).unwrap().remove(0);
        assert_eq!(y.shape, vec![3, 2]);
        let n = Tensor::from_i64(&[], vec![5]);
        let a = [("onesided", Attr::Int(1)), ("inverse", Attr::Int(1))];
        let z = eval_op("DFT", &a, &[Some(&y), Some(&n), Some(&ax)], 1, 20).unwrap().remove(0);
        assert_eq!(z.shape, vec![5, 1]);
        assert!(z.to_f64().iter().zip(x.to_f64()).all(|(a, b)| (a - b).abs() < 1e-9));
    }

    #[test]
    fn windows() {
        let n = Tensor::from_i64(&[], vec![4]);
        let y = eval_op("HannWindow", &[], &[Some(&n)], 1, 17).unwrap().remove(0);
        let want = [0.0, 0.5, 1.0, 0.5];
        assert!(y.to_f64().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
