//! Recurrent-state sequence ops (opset 27): CausalConvWithState (depthwise causal 1-D
//! convolution with a carried window) and LinearAttention (linear / gated / delta-rule
//! attention with a carried `[d_k, d_v]` state per head).

use super::{dim_div, dim_mul, expect_float, rounder, sigmoid};
use crate::bail;
use crate::graph::{checked_numel, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&CausalConvWithState, &LinearAttention]);
}

/// `CausalConvWithState`: `output[b, c, l] = act(bias[c] + Σ_k padded[b, c, l + k]·w[c, 0, k])`
/// where `padded` is `past_state` (or zeros) followed by `input`; `present_state` is the last
/// `k - 1` positions of `padded`. `activation` is none or silu/swish.
struct CausalConvWithState;

impl OpDef for CausalConvWithState {
    fn name(&self) -> &'static str {
        "CausalConvWithState"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("input must be a float tensor, found {}", x.dtype);
        }
        let k = cx.input(1)?.shape.as_ref().and_then(|s| s.get(2)?.known()).filter(|&k| k >= 1);
        let (b, c) = match &x.shape {
            Some(s) if s.len() == 3 => (s[0].clone(), s[1].clone()),
            Some(s) => bail!("input must have rank 3, found rank {}", s.len()),
            None => (cx.fresh_dim(), cx.fresh_dim()),
        };
        let km1 = k.map_or_else(|| cx.fresh_dim(), |k| Dim::Known(k - 1));
        Ok(vec![x.clone(), TensorType::new(x.dtype, vec![b, c, km1])])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, w) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_float(x, "input")?;
        let silu = match cx.attrs.string("activation", "none")?.as_str() {
            "none" => false,
            "silu" | "swish" => true,
            a => bail!("activation must be none, silu or swish, found '{a}'"),
        };
        let [b, c, l] = *x.shape.as_slice() else { bail!("input must have rank 3, found shape {:?}", x.shape) };
        let [wc, 1, k] = *w.shape.as_slice() else { bail!("weight must have shape [C, 1, k], found {:?}", w.shape) };
        if wc != c || k == 0 {
            bail!("weight must have shape [{c}, 1, k>=1], found {:?}", w.shape);
        }
        let bias = match opt(inputs, 2) {
            Some(t) if t.shape == [c] => t.to_f64(),
            Some(t) => bail!("bias must have shape [{c}], found {:?}", t.shape),
            None => vec![0.0; c],
        };
        let p = l + k - 1;
        let xv = x.to_f64();
        let past = match opt(inputs, 3) {
            Some(t) if t.shape == [b, c, k - 1] => t.to_f64(),
            Some(t) => bail!("past_state must have shape [{b}, {c}, {}], found {:?}", k - 1, t.shape),
            None => vec![0.0; b * c * (k - 1)],
        };
        let wv = w.to_f64();
        let rnd = rounder(x.dtype());
        let mut out = vec![0.0; checked_numel(&[b, c, l])?];
        let mut state = Vec::with_capacity(b * c * (k - 1));
        let mut padded = vec![0.0; p];
        for bc in 0..b * c {
            let ch = bc % c;
            padded[..k - 1].copy_from_slice(&past[bc * (k - 1)..(bc + 1) * (k - 1)]);
            padded[k - 1..].copy_from_slice(&xv[bc * l..(bc + 1) * l]);
            let wk = &wv[ch * k..(ch + 1) * k];
            for li in 0..l {
                let v: f64 = padded[li..li + k].iter().zip(wk).map(|(a, b)| a * b).sum::<f64>() + bias[ch];
                let v = rnd(v);
                out[bc * l + li] = if silu {
                    let v32 = v as f32 as f64;
                    v32 * (sigmoid(v32) as f32 as f64)
                } else {
                    v
                };
            }
            state.extend_from_slice(&padded[l..]);
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &[b, c, l], out), Tensor::from_f64(x.dtype(), &[b, c, k - 1], state)])
    }
}

/// `LinearAttention`: per head, a state `S [d_k, d_v]` is (optionally) decayed by
/// `exp(decay_t)`, (optionally) delta-corrected (`v_t ← β_t (v_t − Sᵀk_t)`), updated with
/// `k_t ⊗ v_t`, and read as `o_t = scale · q_tᵀ S` (query heads share KV heads in groups).
/// Inputs are `[B, T, H·D]`; outputs the attention `[B, T, H_q·d_v]` and the final state.
struct LinearAttention;

impl OpDef for LinearAttention {
    fn name(&self) -> &'static str {
        "LinearAttention"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (q, v) = (cx.input(0)?, cx.input(2)?);
        if !q.dtype.is_float() {
            bail!("query must be a float tensor, found {}", q.dtype);
        }
        let qh = cx.attrs.int("q_num_heads", 0)?;
        let kvh = cx.attrs.int("kv_num_heads", 0)?;
        if qh <= 0 || kvh <= 0 || qh % kvh != 0 {
            bail!("q_num_heads ({qh}) must be a positive multiple of kv_num_heads ({kvh})");
        }
        let (qh, kvh) = (qh as usize, kvh as usize);
        let (Some(qs), Some(vs)) = (&q.shape, &v.shape) else {
            return Ok(vec![TensorType::unranked(q.dtype), TensorType::unranked(q.dtype)]);
        };
        if qs.len() != 3 || vs.len() != 3 {
            bail!("query and value must have rank 3, found ranks {} and {}", qs.len(), vs.len());
        }
        let dv = dim_div(&vs[2], kvh);
        let dk = dim_div(&qs[2], qh);
        let hidden = dv.as_ref().and_then(|d| dim_mul(d, &Dim::Known(qh as u64)));
        let mut f = |d: Option<Dim>| d.unwrap_or_else(|| cx.fresh_dim());
        let (hidden, dk, dv) = (f(hidden), f(dk), f(dv));
        let state_dt = cx.opt_input(3).map_or(q.dtype, |t| t.dtype);
        Ok(vec![
            TensorType::new(q.dtype, vec![qs[0].clone(), qs[1].clone(), hidden]),
            TensorType::new(state_dt, vec![qs[0].clone(), Dim::Known(kvh as u64), dk, dv]),
        ])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (q, k, v) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(q, "query")?;
        let rule = cx.attrs.string("update_rule", "gated_delta")?;
        let (gating, delta) = match rule.as_str() {
            "linear" => (false, false),
            "gated" => (true, false),
            "delta" => (false, true),
            "gated_delta" => (true, true),
            r => bail!("update_rule must be linear, gated, delta or gated_delta, found '{r}'"),
        };
        let qh = cx.attrs.int("q_num_heads", 0)?;
        let kvh = cx.attrs.int("kv_num_heads", 0)?;
        if qh <= 0 || kvh <= 0 || qh % kvh != 0 {
            bail!("q_num_heads ({qh}) must be a positive multiple of kv_num_heads ({kvh})");
        }
        let (hq, hk) = (qh as usize, kvh as usize);
        let decay = opt(inputs, 4);
        let beta = opt(inputs, 5);
        if gating != decay.is_some() || delta != beta.is_some() {
            bail!(
                "update_rule '{rule}' {} decay and {} beta",
                if gating { "requires" } else { "forbids" },
                if delta { "requires" } else { "forbids" }
            );
        }
        let [b, t, qhid] = *q.shape.as_slice() else { bail!("query must have rank 3, found {:?}", q.shape) };
        let [kb, kt, khid] = *k.shape.as_slice() else { bail!("key must have rank 3, found {:?}", k.shape) };
        let [vb, vt, vhid] = *v.shape.as_slice() else { bail!("value must have rank 3, found {:?}", v.shape) };
        if qhid % hq != 0 || vhid % hk != 0 || (kb, kt, vb, vt) != (b, t, b, t) || khid != qhid / hq * hk {
            bail!(
                "query {:?}, key {:?} and value {:?} are inconsistent with {hq}/{hk} heads",
                q.shape,
                k.shape,
                v.shape
            );
        }
        let (dk, dv) = (qhid / hq, vhid / hk);
        let group = hq / hk;
        // Per-step decay and beta readers.
        let decay_v = match decay {
            Some(d) if d.rank() == 3 && d.shape[..2] == [b, t] && (d.shape[2] == hk || d.shape[2] == hk * dk) => {
                Some((d.to_f64(), d.shape[2]))
            }
            Some(d) => bail!("decay must have shape [{b}, {t}, {hk} or {}], found {:?}", hk * dk, d.shape),
            None => None,
        };
        let beta_v = match beta {
            Some(x) if x.rank() == 3 && x.shape[..2] == [b, t] && (x.shape[2] == hk || x.shape[2] == 1) => {
                Some((x.to_f64(), x.shape[2]))
            }
            Some(x) => bail!("beta must have shape [{b}, {t}, {hk} or 1], found {:?}", x.shape),
            None => None,
        };
        let ssz = checked_numel(&[b, hk, dk, dv])?;
        let (mut state, state_dt) = match opt(inputs, 3) {
            Some(s) if s.shape == [b, hk, dk, dv] => (s.to_f64(), s.dtype()),
            Some(s) => bail!("past_state must have shape [{b}, {hk}, {dk}, {dv}], found {:?}", s.shape),
            None => (vec![0.0; ssz], q.dtype()),
        };
        let f32r = |x: f64| x as f32 as f64;
        state.iter_mut().for_each(|x| *x = f32r(*x));
        let scale = match cx.attrs.float("scale", 0.0)? {
            s if s != 0.0 => s as f64,
            _ => 1.0 / (dk as f64).sqrt(),
        };
        let (qv, kv, vv) = (q.to_f64(), k.to_f64(), v.to_f64());
        let mut out = vec![0.0; checked_numel(&[b, t, hq * dv])?];
        let mut vt_buf = vec![0.0; dv];
        for bi in 0..b {
            for ti in 0..t {
                for h in 0..hk {
                    let s = &mut state[(bi * hk + h) * dk * dv..][..dk * dv];
                    let kt = &kv[(bi * t + ti) * khid + h * dk..][..dk];
                    if let Some((dvals, dl)) = &decay_v {
                        let row = &dvals[(bi * t + ti) * dl..][..*dl];
                        for d in 0..dk {
                            let g = if *dl == hk { row[h] } else { row[h * dk + d] };
                            let e = g.exp();
                            s[d * dv..(d + 1) * dv].iter_mut().for_each(|x| *x *= e);
                        }
                    }
                    vt_buf.copy_from_slice(&vv[(bi * t + ti) * vhid + h * dv..][..dv]);
                    if let Some((bvals, bl)) = &beta_v {
                        let bt = bvals[(bi * t + ti) * bl + if *bl == 1 { 0 } else { h }];
                        for (m, x) in vt_buf.iter_mut().enumerate() {
                            let retrieved: f64 = (0..dk).map(|d| s[d * dv + m] * kt[d]).sum();
                            *x = bt * (*x - retrieved);
                        }
                    }
                    for d in 0..dk {
                        for m in 0..dv {
                            s[d * dv + m] += kt[d] * vt_buf[m];
                        }
                    }
                    for g in 0..group {
                        let qhd = h * group + g;
                        let qt = &qv[(bi * t + ti) * qhid + qhd * dk..][..dk];
                        let o = &mut out[(bi * t + ti) * hq * dv + qhd * dv..][..dv];
                        for (m, om) in o.iter_mut().enumerate() {
                            *om = scale * (0..dk).map(|d| qt[d] * s[d * dv + m]).sum::<f64>();
                        }
                    }
                }
            }
        }
        Ok(vec![
            Tensor::from_f64(q.dtype(), &[b, t, hq * dv], out),
            Tensor::from_f64(state_dt, &[b, hk, dk, dv], state),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::Attrs;
    use crate::graph::AttrView;

    #[test]
    fn causal_conv_carries_state() {
        let attrs = Attrs::new();
        let cx = EvalCx {
            attrs: AttrView(&attrs),
            num_outputs: 2,
            opset: 27,
            regions: &[],
            runner: &crate::graph::NoRegions,
        };
        let x = Tensor::from_f32(&[1, 1, 3], vec![1.0, 2.0, 3.0]);
        let w = Tensor::from_f32(&[1, 1, 2], vec![1.0, 10.0]);
        let past = Tensor::from_f32(&[1, 1, 1], vec![5.0]);
        let out = CausalConvWithState.eval(&cx, &[Some(&x), Some(&w), None, Some(&past)]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[15.0, 21.0, 32.0]);
        assert_eq!(out[1].as_f32().unwrap(), &[3.0]);
    }
}
