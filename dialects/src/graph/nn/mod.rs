//! The `nn` family of graph ops: convolution, pooling, normalization, matrix products,
//! quantization, softmax and dropout.
//!
//! Float work runs on one of two element types ([`Real`]): `f32` for f32/f16/bf16 tensors and
//! `f64` for everything else (f64 and the integer inputs of the quantized ops, where f64 is exact).
//! Convolutions and matrix products share one cache-blocked GEMM kernel ([`gemm`]).

mod conv;
mod deform;
mod gemm;
mod matmul;
mod norm;
mod pool;
mod quant;
mod softmax;

use super::{AttrView, InferCx, OpResult, Registry};
use crate::bail;
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};
use std::borrow::Cow;

pub fn register(r: &mut Registry) {
    conv::register(r);
    deform::register(r);
    matmul::register(r);
    norm::register(r);
    pool::register(r);
    quant::register(r);
    softmax::register(r);
}

/// A float type the kernels compute in.
pub(crate) trait Real:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    fn exp(self) -> Self;
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// The tensor's elements in this type (borrowed when it already is).
    fn values(t: &Tensor) -> Cow<'_, [Self]>;
    /// A tensor of `dtype` from values of this type.
    fn tensor(dtype: DType, shape: &[usize], v: Vec<Self>) -> Tensor;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INF: f32 = f32::NEG_INFINITY;
    fn of(v: f64) -> f32 {
        v as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    #[inline(always)]
    fn mul_add(self, b: f32, c: f32) -> f32 {
        f32::mul_add(self, b, c)
    }
    fn values(t: &Tensor) -> Cow<'_, [f32]> {
        match t.as_f32() {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(t.to_f64().into_iter().map(|x| x as f32).collect()),
        }
    }
    fn tensor(dtype: DType, shape: &[usize], v: Vec<f32>) -> Tensor {
        if dtype == DType::F32 {
            Tensor::from_f32(shape, v)
        } else {
            Tensor::from_f64(dtype, shape, v.into_iter().map(|x| x as f64).collect())
        }
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INF: f64 = f64::NEG_INFINITY;
    fn of(v: f64) -> f64 {
        v
    }
    fn f64(self) -> f64 {
        self
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn mul_add(self, b: f64, c: f64) -> f64 {
        f64::mul_add(self, b, c)
    }
    fn values(t: &Tensor) -> Cow<'_, [f64]> {
        match &t.data {
            crate::tensor::Data::F64(v) => Cow::Borrowed(v),
            _ => Cow::Owned(t.to_f64()),
        }
    }
    fn tensor(dtype: DType, shape: &[usize], v: Vec<f64>) -> Tensor {
        Tensor::from_f64(dtype, shape, v)
    }
}

/// Whether a tensor of `dtype` computes in f32 (f32, f16, bf16) rather than f64.
pub(crate) fn uses_f32(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Checks that a tensor holds floats.
pub(crate) fn expect_float(t: &Tensor, what: &str) -> OpResult<()> {
    if !t.dtype().is_float() {
        bail!("{what} must be a float tensor, found {}", t.dtype());
    }
    Ok(())
}

/// Checks a float input type at compile time.
pub(crate) fn expect_float_type(t: &TensorType, what: &str) -> OpResult<()> {
    if !t.dtype.is_float() {
        bail!("{what} must be a float tensor, found {}", t.dtype);
    }
    Ok(())
}

/// An optional ints attribute checked to have `n` non-negative entries (default `fill`).
pub(crate) fn spatial_attr(a: AttrView, name: &str, n: usize, fill: usize) -> OpResult<Vec<usize>> {
    match a.ints(name)? {
        None => Ok(vec![fill; n]),
        Some(v) => {
            if v.len() != n {
                bail!("attribute '{name}' must have {n} entries, found {}", v.len());
            }
            v.iter()
                .map(|&x| if x < 0 { bail!("attribute '{name}' has a negative entry {x}") } else { Ok(x as usize) })
                .collect()
        }
    }
}

/// Sliding-window parameters of a conv/pool op along its spatial axes.
#[derive(Clone, Debug)]
pub(crate) struct WindowParams {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Explicit pads `[b1.., e1..]` (ignored when `auto_pad` is set).
    pub pads: Vec<usize>,
    pub auto_pad: String,
    pub ceil: bool,
}

impl WindowParams {
    /// Reads `strides`, `dilations`, `pads`, `auto_pad` (and `ceil_mode` when `ceil_attr`).
    pub fn new(a: AttrView, kernel: Vec<usize>, ceil_attr: bool) -> OpResult<WindowParams> {
        let n = kernel.len();
        let strides = spatial_attr(a, "strides", n, 1)?;
        let dilations = spatial_attr(a, "dilations", n, 1)?;
        let pads = spatial_attr(a, "pads", 2 * n, 0)?;
        if strides.contains(&0) || dilations.contains(&0) {
            bail!("strides and dilations must be positive, found {strides:?} and {dilations:?}");
        }
        if kernel.contains(&0) {
            bail!("kernel dims must be positive, found {kernel:?}");
        }
        // Bounds that keep the window arithmetic in range (no tensor is that large).
        if kernel.iter().chain(&strides).chain(&dilations).chain(&pads).any(|&v| v > 1 << 31) {
            bail!("kernel {kernel:?}, strides {strides:?}, dilations {dilations:?} and pads {pads:?} must be at most 2^31");
        }
        let auto_pad = a.string("auto_pad", "NOTSET")?;
        if !matches!(auto_pad.as_str(), "NOTSET" | "SAME_UPPER" | "SAME_LOWER" | "VALID") {
            bail!("auto_pad must be NOTSET, SAME_UPPER, SAME_LOWER or VALID, found {auto_pad}");
        }
        let ceil = ceil_attr && a.int("ceil_mode", 0)? != 0;
        Ok(WindowParams { kernel, strides, dilations, pads, auto_pad, ceil })
    }

    /// `(pad_begin, pad_end, out_len)` along spatial axis `i` for an input of length `len`.
    pub fn axis(&self, i: usize, len: usize) -> OpResult<(usize, usize, usize)> {
        let (k, s, d) = (self.kernel[i], self.strides[i], self.dilations[i]);
        if len as u128 > crate::tensor::MAX_ELEMENTS {
            bail!("spatial axis {i}: input length {len} is too large");
        }
        let ek = (k - 1) * d + 1;
        match self.auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let out = len.div_ceil(s);
                let total = ((out.max(1) - 1) * s + ek).saturating_sub(len);
                let small = total / 2;
                Ok(if self.auto_pad == "SAME_UPPER" {
                    (small, total - small, out)
                } else {
                    (total - small, small, out)
                })
            }
            "VALID" => {
                if len < ek {
                    bail!("spatial axis {i}: input length {len} is shorter than the window {ek}");
                }
                Ok((0, 0, (len - ek) / s + 1))
            }
            _ => {
                let n = self.kernel.len();
                let (pb, pe) = (self.pads[i], self.pads[i + n]);
                let padded = len + pb + pe;
                if padded < ek {
                    bail!("spatial axis {i}: padded input length {padded} is shorter than the window {ek}");
                }
                let mut out = if self.ceil { (padded - ek).div_ceil(s) + 1 } else { (padded - ek) / s + 1 };
                // The last window must start inside the input or its begin padding.
                if self.ceil && (out - 1) * s >= len + pb {
                    out -= 1;
                }
                Ok((pb, pe, out))
            }
        }
    }

    /// Output spatial dims for static input dims.
    pub fn geometry(&self, spatial: &[usize]) -> OpResult<Geom> {
        if spatial.len() != self.kernel.len() {
            bail!("expected {} spatial dims, found {}", self.kernel.len(), spatial.len());
        }
        let mut g = Geom::default();
        let off = 3 - spatial.len();
        for (i, &len) in spatial.iter().enumerate() {
            let (pb, _pe, out) = self.axis(i, len)?;
            g.input[off + i] = len;
            g.out[off + i] = out;
            g.kernel[off + i] = self.kernel[i];
            g.stride[off + i] = self.strides[i];
            g.dil[off + i] = self.dilations[i];
            g.pad[off + i] = pb;
            g.pad_end[off + i] = _pe;
        }
        Ok(g)
    }

    /// Output spatial dims from symbolic input dims (fresh symbols where unknown).
    pub fn infer_dims(&self, cx: &mut InferCx, spatial: &[Dim]) -> OpResult<Vec<Dim>> {
        if spatial.len() != self.kernel.len() {
            bail!("expected {} spatial dims, found {}", self.kernel.len(), spatial.len());
        }
        let mut out = Vec::with_capacity(spatial.len());
        for (i, d) in spatial.iter().enumerate() {
            out.push(match d.known() {
                Some(len) => Dim::Known(self.axis(i, len as usize)?.2 as u64),
                None => cx.fresh_dim(),
            });
        }
        Ok(out)
    }
}

/// A sliding window over 3 spatial axes (1-D and 2-D ops get leading axes of size 1).
#[derive(Clone, Debug)]
pub(crate) struct Geom {
    pub input: [usize; 3],
    pub out: [usize; 3],
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub dil: [usize; 3],
    pub pad: [usize; 3],
    pub pad_end: [usize; 3],
}

impl Default for Geom {
    fn default() -> Geom {
        Geom { input: [1; 3], out: [1; 3], kernel: [1; 3], stride: [1; 3], dil: [1; 3], pad: [0; 3], pad_end: [0; 3] }
    }
}

impl Geom {
    pub fn in_size(&self) -> usize {
        self.input.iter().product()
    }
    pub fn out_size(&self) -> usize {
        self.out.iter().product()
    }
    pub fn kernel_size(&self) -> usize {
        self.kernel.iter().product()
    }
    /// Input coordinate along axis `a` of output position `o` and kernel tap `k`, if inside.
    #[inline]
    pub fn src(&self, a: usize, o: usize, k: usize) -> Option<usize> {
        let p = (o * self.stride[a] + k * self.dil[a]).checked_sub(self.pad[a])?;
        (p < self.input[a]).then_some(p)
    }
}

/// The spatial dims of an `[N, C, spatial..]` type, when ranked.
pub(crate) fn nc_spatial(t: &TensorType, what: &str) -> OpResult<Option<Vec<Dim>>> {
    match &t.shape {
        None => Ok(None),
        Some(s) if s.len() < 3 => bail!("{what} must have rank >= 3 ([N, C, spatial...]), found rank {}", s.len()),
        Some(s) => Ok(Some(s.clone())),
    }
}

/// Checks the rank of an `[N, C, spatial..]` tensor with 1 to 3 spatial axes.
pub(crate) fn expect_nc(t: &Tensor, what: &str) -> OpResult<()> {
    if !(3..=5).contains(&t.rank()) {
        bail!("{what} must have rank 3 to 5 ([N, C, 1 to 3 spatial dims]), found shape {:?}", t.shape);
    }
    Ok(())
}

/// A known dim's size.
pub(crate) fn known(d: &Dim) -> Option<usize> {
    d.known().map(|n| n as usize)
}
