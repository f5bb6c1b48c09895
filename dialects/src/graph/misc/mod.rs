//! The `misc` family of graph ops: attention and rotary embeddings, recurrent networks,
//! control flow (If, Loop, Scan), spatial sampling (GridSample, AffineGrid, RoiAlign) and
//! small gated ops.
//!
//! Submodules: [`attention`] (Attention, RotaryEmbedding, SwiGLU), [`rnn`] (RNN, GRU, LSTM),
//! [`control`] (If, Loop, Scan), [`sampling`] (GridSample, AffineGrid, RoiAlign),
//! [`stateful`] (CausalConvWithState, LinearAttention).

mod attention;
mod control;
mod rnn;
mod sampling;
mod stateful;

use super::{AttrView, OpResult, Registry};
use crate::bail;
use crate::tensor::Tensor;
use crate::types::{DType, Dim};

pub fn register(r: &mut Registry) {
    attention::register(r);
    rnn::register(r);
    control::register(r);
    sampling::register(r);
    stateful::register(r);
}

/// Rounds an f64 to the precision of `dt` and back, mirroring where ONNX's reference
/// materializes an intermediate in the input's element type.
fn rounder(dt: DType) -> fn(f64) -> f64 {
    match dt {
        DType::F32 => |x| x as f32 as f64,
        DType::F16 => |x| half::f16::from_f64(x).to_f64(),
        DType::BF16 => |x| half::bf16::from_f64(x).to_f64(),
        _ => |x| x,
    }
}

/// Requires a floating-point tensor.
fn expect_float(t: &Tensor, what: &str) -> OpResult<()> {
    if !t.dtype().is_float() {
        bail!("{what} must be a float tensor, found {}", t.dtype());
    }
    Ok(())
}

/// Parses the `kiln.result_dtypes` attribute (ONNX type names, one per result) that the
/// frontend sets on ops with subgraphs, whose result types the shape rule cannot see.
fn result_dtypes(attrs: &AttrView) -> OpResult<Option<Vec<DType>>> {
    let Some(names) = attrs.strings("kiln.result_dtypes")? else {
        return Ok(None);
    };
    names
        .iter()
        .map(|n| match DType::ALL.into_iter().find(|d| d.onnx_name() == n) {
            Some(d) => Ok(d),
            None => bail!("kiln.result_dtypes names unknown element type '{n}'"),
        })
        .collect::<OpResult<Vec<_>>>()
        .map(Some)
}

/// `a * b` on dims when both are known; `None` otherwise.
fn dim_mul(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(Dim::Known(a.known()?.checked_mul(b.known()?)?))
}

/// `a / n` on a known dim when it divides evenly.
fn dim_div(a: &Dim, n: usize) -> Option<Dim> {
    let a = a.known()?;
    (n > 0 && a % n as u64 == 0).then(|| Dim::Known(a / n as u64))
}

/// `a + b` on dims when both are known.
fn dim_add(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(Dim::Known(a.known()?.checked_add(b.known()?)?))
}

/// Logistic sigmoid.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
