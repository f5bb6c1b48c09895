//! Recurrent networks: RNN, GRU and LSTM, with directions, activations, clip, sequence
//! lengths, initial states, peepholes and both layouts.

use super::{dim_div, expect_float, sigmoid};
use crate::bail;
use crate::graph::{checked_numel, opt, req, AttrView, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&Recurrent(Kind::Rnn), &Recurrent(Kind::Gru), &Recurrent(Kind::Lstm)]);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rnn,
    Gru,
    Lstm,
}

impl Kind {
    fn gates(self) -> usize {
        match self {
            Kind::Rnn => 1,
            Kind::Gru => 3,
            Kind::Lstm => 4,
        }
    }

    fn default_acts(self) -> &'static [&'static str] {
        match self {
            Kind::Rnn => &["Tanh"],
            Kind::Gru => &["Sigmoid", "Tanh"],
            Kind::Lstm => &["Sigmoid", "Tanh", "Tanh"],
        }
    }

    fn outputs(self) -> usize {
        if self == Kind::Lstm {
            3
        } else {
            2
        }
    }
}

/// `RNN`, `GRU` or `LSTM` (ONNX opset 22 semantics): runs the cell over the sequence axis of
/// `X` in each direction, producing all hidden states `Y`, the last hidden state `Y_h` and,
/// for LSTM, the last cell state `Y_c`. Steps past a batch entry's `sequence_lens` leave `Y`
/// zero and the state unchanged.
struct Recurrent(Kind);

/// An activation function of a recurrent cell, with its alpha/beta.
#[derive(Clone, Copy, Debug)]
enum Act {
    Relu,
    Tanh,
    Sigmoid,
    Affine(f64, f64),
    LeakyRelu(f64),
    ThresholdedRelu(f64),
    ScaledTanh(f64, f64),
    HardSigmoid(f64, f64),
    Elu(f64),
    Softsign,
    Softplus,
}

impl Act {
    fn apply(self, x: f64) -> f64 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Tanh => x.tanh(),
            Act::Sigmoid => sigmoid(x),
            Act::Affine(a, b) => a * x + b,
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
            Act::ScaledTanh(a, b) => a * (b * x).tanh(),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * (x.exp() - 1.0)
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => x.exp().ln_1p(),
        }
    }
}

/// Parses activation names; alphas and betas are consumed in order by the functions that take
/// them (as onnxruntime does), with the ONNX operators' defaults when the lists run out.
fn parse_acts(names: &[String], alphas: &[f32], betas: &[f32]) -> OpResult<Vec<Act>> {
    let (mut ai, mut bi) = (alphas.iter(), betas.iter());
    let mut alpha = |d: f64| ai.next().map_or(d, |&v| v as f64);
    let mut beta = |d: f64| bi.next().map_or(d, |&v| v as f64);
    names
        .iter()
        .map(|n| {
            Ok(match n.to_ascii_lowercase().as_str() {
                "relu" => Act::Relu,
                "tanh" => Act::Tanh,
                "sigmoid" => Act::Sigmoid,
                "affine" => Act::Affine(alpha(1.0), beta(0.0)),
                "leakyrelu" => Act::LeakyRelu(alpha(0.01)),
                "thresholdedrelu" => Act::ThresholdedRelu(alpha(1.0)),
                "scaledtanh" => Act::ScaledTanh(alpha(1.0), beta(1.0)),
                "hardsigmoid" => Act::HardSigmoid(alpha(0.2), beta(0.5)),
                "elu" => Act::Elu(alpha(1.0)),
                "softsign" => Act::Softsign,
                "softplus" => Act::Softplus,
                _ => bail!("unknown activation function '{n}'"),
            })
        })
        .collect()
}

fn num_directions(attrs: &AttrView) -> OpResult<usize> {
    match attrs.string("direction", "forward")?.as_str() {
        "forward" | "reverse" => Ok(1),
        "bidirectional" => Ok(2),
        d => bail!("direction must be forward, reverse or bidirectional, found '{d}'"),
    }
}

impl OpDef for Recurrent {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Rnn => "RNN",
            Kind::Gru => "GRU",
            Kind::Lstm => "LSTM",
        }
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let dt = x.dtype;
        if !dt.is_float() {
            bail!("X must be a float tensor, found {dt}");
        }
        let dirs = Dim::Known(num_directions(&cx.attrs)? as u64);
        let layout = cx.attrs.int("layout", 0)?;
        let hidden = match cx.attrs.int("hidden_size", 0)? {
            h if h > 0 => Some(Dim::Known(h as u64)),
            _ => cx
                .input(2)?
                .shape
                .as_ref()
                .and_then(|s| s.get(2).cloned())
                .or_else(|| cx.input(1).ok()?.shape.as_ref().and_then(|s| dim_div(s.get(1)?, self.0.gates()))),
        };
        let hidden = hidden.unwrap_or_else(|| cx.fresh_dim());
        let (seq, batch) = match &x.shape {
            Some(s) if s.len() == 3 => {
                if layout == 0 {
                    (s[0].clone(), s[1].clone())
                } else {
                    (s[1].clone(), s[0].clone())
                }
            }
            Some(s) => bail!("X must have rank 3, found rank {}", s.len()),
            None => (cx.fresh_dim(), cx.fresh_dim()),
        };
        let (y, state) = if layout == 0 {
            (vec![seq, dirs.clone(), batch.clone(), hidden.clone()], vec![dirs, batch, hidden])
        } else {
            (vec![batch.clone(), seq, dirs.clone(), hidden.clone()], vec![batch, dirs, hidden])
        };
        let mut out = vec![TensorType::new(dt, y)];
        out.extend((1..self.0.outputs()).map(|_| TensorType::new(dt, state.clone())));
        Ok(out)
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let kind = self.0;
        let (x, w, r) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(x, "X")?;
        let dt = x.dtype();
        for (t, n) in [(w, "W"), (r, "R")] {
            if t.dtype() != dt {
                bail!("{n} must have X's element type {dt}, found {}", t.dtype());
            }
        }
        let layout = cx.attrs.int("layout", 0)?;
        let [a0, a1, isz] = *x.shape.as_slice() else { bail!("X must have rank 3, found shape {:?}", x.shape) };
        let (seq, batch) = if layout == 0 { (a0, a1) } else { (a1, a0) };
        let direction = cx.attrs.string("direction", "forward")?;
        let dirs = num_directions(&cx.attrs)?;
        let g = kind.gates();
        let [rd, rg, h] = *r.shape.as_slice() else { bail!("R must have rank 3, found shape {:?}", r.shape) };
        if rd != dirs || rg != g * h {
            bail!("R must have shape [{dirs}, {}, {h}], found {:?}", g * h, r.shape);
        }
        let hs = cx.attrs.int("hidden_size", 0)?;
        if hs > 0 && hs as usize != h {
            bail!("hidden_size {hs} does not match R's shape {:?}", r.shape);
        }
        if w.shape != [dirs, g * h, isz] {
            bail!("W must have shape [{dirs}, {}, {isz}], found {:?}", g * h, w.shape);
        }
        let bias = match opt(inputs, 3) {
            Some(b) if b.shape == [dirs, 2 * g * h] => b.to_f64(),
            Some(b) => bail!("B must have shape [{dirs}, {}], found {:?}", 2 * g * h, b.shape),
            None => vec![0.0; dirs * 2 * g * h],
        };
        let lens: Vec<usize> = match opt(inputs, 4) {
            Some(l) => {
                if !l.dtype().is_int() || l.len() != batch {
                    bail!("sequence_lens must be {batch} integers, found {} {:?}", l.dtype(), l.shape);
                }
                l.to_i64()
                    .into_iter()
                    .map(|v| {
                        if (0..=seq as i64).contains(&v) {
                            Ok(v as usize)
                        } else {
                            bail!("sequence length {v} is out of range [0, {seq}]")
                        }
                    })
                    .collect::<OpResult<_>>()?
            }
            None => vec![seq; batch],
        };
        // Initial states, as [dirs, batch, h].
        let state_in = |i: usize, what: &str| -> OpResult<Vec<f64>> {
            let Some(t) = opt(inputs, i) else {
                return Ok(vec![0.0; dirs * batch * h]);
            };
            let want = if layout == 0 { [dirs, batch, h] } else { [batch, dirs, h] };
            if t.shape != want {
                bail!("{what} must have shape {want:?}, found {:?}", t.shape);
            }
            let v = t.to_f64();
            Ok(if layout == 0 { v } else { swap01(&v, batch, dirs, h) })
        };
        let h0 = state_in(5, "initial_h")?;
        let c0 = if kind == Kind::Lstm { state_in(6, "initial_c")? } else { vec![] };
        let peep = match opt(inputs, 7).filter(|_| kind == Kind::Lstm) {
            Some(p) if p.shape == [dirs, 3 * h] => p.to_f64(),
            Some(p) => bail!("P must have shape [{dirs}, {}], found {:?}", 3 * h, p.shape),
            None => vec![0.0; dirs * 3 * h],
        };
        let names = cx.attrs.strings("activations")?;
        let na = kind.default_acts().len();
        let acts = match names {
            None => {
                let d: Vec<String> =
                    (0..dirs).flat_map(|_| kind.default_acts().iter().map(|s| s.to_string())).collect();
                parse_acts(&d, &[], &[])?
            }
            Some(n) => {
                let alphas = cx.attrs.floats("activation_alpha")?.unwrap_or_default();
                let betas = cx.attrs.floats("activation_beta")?.unwrap_or_default();
                let n = if n.len() == na && dirs == 2 { [n.clone(), n].concat() } else { n };
                if n.len() != na * dirs {
                    bail!("expected {} activations, found {}", na * dirs, n.len());
                }
                parse_acts(&n, &alphas, &betas)?
            }
        };
        let clip = match cx.attrs.get("clip") {
            Some(_) => Some(cx.attrs.float("clip", 0.0)? as f64),
            None => None,
        };
        if let Some(c) = clip.filter(|c| c.is_nan() || *c < 0.0) {
            bail!("clip must be a non-negative threshold, found {c}");
        }
        let input_forget = cx.attrs.int("input_forget", 0)? != 0;
        let lbr = cx.attrs.int("linear_before_reset", 0)? != 0;

        let xv = x.to_f64();
        let (wv, rv) = (w.to_f64(), r.to_f64());
        let xat = |t: usize, b: usize| -> &[f64] {
            let off = if layout == 0 { (t * batch + b) * isz } else { (b * seq + t) * isz };
            &xv[off..off + isz]
        };
        let ny = checked_numel(&[seq, dirs, batch, h])?;
        let mut y = vec![0.0; ny];
        let mut yh = vec![0.0; dirs * batch * h];
        let mut yc = vec![0.0; dirs * batch * h];
        let mut gx = vec![0.0; g * h];
        let mut gh = vec![0.0; g * h];
        for d in 0..dirs {
            let reverse = direction == "reverse" || d == 1;
            let a = &acts[d * na..(d + 1) * na];
            let act = |i: usize, v: f64| a[i].apply(clip.map_or(v, |c| v.clamp(-c, c)));
            let wd = &wv[d * g * h * isz..(d + 1) * g * h * isz];
            let rdm = &rv[d * g * h * h..(d + 1) * g * h * h];
            let (wb, rb) =
                (&bias[d * 2 * g * h..d * 2 * g * h + g * h], &bias[d * 2 * g * h + g * h..(d + 1) * 2 * g * h]);
            let pd = &peep[d * 3 * h..(d + 1) * 3 * h];
            for b in 0..batch {
                let mut hs: Vec<f64> = h0[(d * batch + b) * h..][..h].to_vec();
                let mut cs: Vec<f64> =
                    if kind == Kind::Lstm { c0[(d * batch + b) * h..][..h].to_vec() } else { vec![] };
                for step in 0..lens[b] {
                    let t = if reverse { lens[b] - 1 - step } else { step };
                    let xt = xat(t, b);
                    for (k, (o, p)) in gx.iter_mut().zip(gh.iter_mut()).enumerate() {
                        *o = dot(xt, &wd[k * isz..(k + 1) * isz]) + wb[k];
                        *p = dot(&hs, &rdm[k * h..(k + 1) * h]) + rb[k];
                    }
                    let new: Vec<f64> = match kind {
                        Kind::Rnn => (0..h).map(|k| act(0, gx[k] + gh[k])).collect(),
                        Kind::Gru => {
                            let z: Vec<f64> = (0..h).map(|k| act(0, gx[k] + gh[k])).collect();
                            let rg: Vec<f64> = (0..h).map(|k| act(0, gx[h + k] + gh[h + k])).collect();
                            let rh: Vec<f64> = rg.iter().zip(&hs).map(|(r, s)| r * s).collect();
                            (0..h)
                                .map(|k| {
                                    let inner = if lbr {
                                        rg[k] * gh[2 * h + k]
                                    } else {
                                        dot(&rh, &rdm[(2 * h + k) * h..(2 * h + k + 1) * h]) + rb[2 * h + k]
                                    };
                                    let cand = act(1, gx[2 * h + k] + inner);
                                    (1.0 - z[k]) * cand + z[k] * hs[k]
                                })
                                .collect()
                        }
                        Kind::Lstm => (0..h)
                            .map(|k| {
                                let i = act(0, gx[k] + gh[k] + pd[k] * cs[k]);
                                let f = if input_forget {
                                    1.0 - i
                                } else {
                                    act(0, gx[2 * h + k] + gh[2 * h + k] + pd[2 * h + k] * cs[k])
                                };
                                let c = act(1, gx[3 * h + k] + gh[3 * h + k]);
                                let cn = f * cs[k] + i * c;
                                let o = act(0, gx[h + k] + gh[h + k] + pd[h + k] * cn);
                                cs[k] = cn;
                                o * act(2, cn)
                            })
                            .collect(),
                    };
                    hs = new;
                    y[((t * dirs + d) * batch + b) * h..][..h].copy_from_slice(&hs);
                }
                yh[(d * batch + b) * h..][..h].copy_from_slice(&hs);
                if kind == Kind::Lstm {
                    yc[(d * batch + b) * h..][..h].copy_from_slice(&cs);
                }
            }
        }
        let (y, yh, yc) = if layout == 0 {
            (
                Tensor::from_f64(dt, &[seq, dirs, batch, h], y),
                Tensor::from_f64(dt, &[dirs, batch, h], yh),
                Tensor::from_f64(dt, &[dirs, batch, h], yc),
            )
        } else {
            // [seq, dirs, batch, h] → [batch, seq, dirs, h]; states [dirs, batch, h] → [batch, dirs, h].
            let mut yt = vec![0.0; ny];
            for t in 0..seq {
                for d in 0..dirs {
                    for b in 0..batch {
                        yt[((b * seq + t) * dirs + d) * h..][..h]
                            .copy_from_slice(&y[((t * dirs + d) * batch + b) * h..][..h]);
                    }
                }
            }
            (
                Tensor::from_f64(dt, &[batch, seq, dirs, h], yt),
                Tensor::from_f64(dt, &[batch, dirs, h], swap01(&yh, dirs, batch, h)),
                Tensor::from_f64(dt, &[batch, dirs, h], swap01(&yc, dirs, batch, h)),
            )
        };
        let mut out = vec![y, yh];
        if kind == Kind::Lstm {
            out.push(yc);
        }
        Ok(out)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Swaps the first two axes of a `[n0, n1, inner]` array.
fn swap01(v: &[f64], n0: usize, n1: usize, inner: usize) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for i in 0..n0 {
        for j in 0..n1 {
            out[(j * n0 + i) * inner..][..inner].copy_from_slice(&v[(i * n1 + j) * inner..][..inner]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::Attrs;

    #[test]
    fn rnn_with_identity_weights_accumulates_tanh() {
        let attrs = Attrs::new();
        let cx = EvalCx {
            attrs: AttrView(&attrs),
            num_outputs: 2,
            opset: 22,
            regions: &[],
            runner: &crate::graph::NoRegions,
        };
        let x = Tensor::from_f32(&[2, 1, 1], vec![0.5, 0.25]);
        let w = Tensor::from_f32(&[1, 1, 1], vec![1.0]);
        let r = Tensor::from_f32(&[1, 1, 1], vec![1.0]);
        let out = Recurrent(Kind::Rnn).eval(&cx, &[Some(&x), Some(&w), Some(&r)]).unwrap();
        let h1 = 0.5f64.tanh();
        let h2 = (0.25 + h1).tanh();
        let y = out[0].as_f32().unwrap();
        assert!((y[0] as f64 - h1).abs() < 1e-6 && (y[1] as f64 - h2).abs() < 1e-6);
        assert_eq!(out[1].shape, vec![1, 1, 1]);
    }

    #[test]
    fn unknown_activation_is_an_error() {
        assert!(parse_acts(&["Nope".to_string()], &[], &[]).is_err());
    }
}
