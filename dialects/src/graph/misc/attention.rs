//! Attention (scaled dot-product attention with masks, KV caches, GQA, softcap and sliding
//! windows), RotaryEmbedding and SwiGLU.

use super::{dim_add, dim_div, dim_mul, expect_float, rounder, sigmoid};
use crate::bail;
use crate::graph::{checked_numel, opt, req, same_as_input, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::{broadcast_index, Tensor};
use crate::types::{broadcast_shapes, DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&Attention, &RotaryEmbedding, &SwiGLU]);
}

/// `Attention` (opset 23-25): `softmax(softcap(Q·Kᵀ·scale) + bias)·V` per head, where the bias
/// combines `attn_mask` (bool or additive, right-aligned broadcasting, padded with -inf up to
/// the total key length), `is_causal` (bottom-right aligned), a sliding window and
/// `nonpad_kv_seqlen`. Accepts 4-D `[B, H, S, D]` or 3-D `[B, S, H·D]` inputs (with
/// `q_num_heads`/`kv_num_heads`), grouped-query heads and a past KV cache; outputs `Y`,
/// `present_key`, `present_value` and the QK matrix selected by `qk_matmul_output_mode`.
struct Attention;

/// A `[batch, heads, seq, head_size]` view of Q, K or V, as f64.
struct Heads {
    b: usize,
    h: usize,
    s: usize,
    d: usize,
    data: Vec<f64>,
}

/// Brings a 4-D tensor or a 3-D `[B, S, H·D]` tensor to `[B, H, S, D]`.
fn to_heads(t: &Tensor, heads: usize, what: &str) -> OpResult<Heads> {
    match *t.shape.as_slice() {
        [b, h, s, d] => Ok(Heads { b, h, s, d, data: t.to_f64() }),
        [b, s, hidden] => {
            if heads == 0 || hidden % heads != 0 {
                bail!("{what} hidden size {hidden} is not a multiple of the head count {heads}");
            }
            let d = hidden / heads;
            let x = t.to_f64();
            let mut data = vec![0.0; x.len()];
            for bi in 0..b {
                for si in 0..s {
                    for hi in 0..heads {
                        let src = (bi * s + si) * hidden + hi * d;
                        let dst = ((bi * heads + hi) * s + si) * d;
                        data[dst..dst + d].copy_from_slice(&x[src..src + d]);
                    }
                }
            }
            Ok(Heads { b, h: heads, s, d, data })
        }
        _ => bail!("{what} must have rank 3 or 4, found shape {:?}", t.shape),
    }
}

/// Concatenates a past cache `[B, H, P, D]` with new entries along the sequence axis.
fn concat_seq(past: Option<&Tensor>, new: &Heads, what: &str) -> OpResult<(usize, Vec<f64>)> {
    let Some(p) = past else {
        return Ok((new.s, new.data.clone()));
    };
    let [pb, ph, ps, pd] = *p.shape.as_slice() else { bail!("{what} must have rank 4, found shape {:?}", p.shape) };
    if (pb, ph, pd) != (new.b, new.h, new.d) {
        bail!("{what} shape {:?} does not match [{}, {}, _, {}]", p.shape, new.b, new.h, new.d);
    }
    let t = ps + new.s;
    let pv = p.to_f64();
    let mut out = Vec::with_capacity(checked_numel(&[new.b, new.h, t, new.d])?);
    for bh in 0..new.b * new.h {
        out.extend_from_slice(&pv[bh * ps * pd..(bh + 1) * ps * pd]);
        out.extend_from_slice(&new.data[bh * new.s * pd..(bh + 1) * new.s * pd]);
    }
    Ok((t, out))
}

impl OpDef for Attention {
    fn name(&self) -> &'static str {
        "Attention"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (q, k, v) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
        let dt = q.dtype;
        if !dt.is_float() {
            bail!("Q must be a float tensor, found {dt}");
        }
        if k.dtype != dt || v.dtype != dt {
            bail!("Q, K and V must have one element type, found {dt}, {} and {}", k.dtype, v.dtype);
        }
        let (Some(qs), Some(ks), Some(vs)) = (&q.shape, &k.shape, &v.shape) else {
            return Ok(vec![TensorType::unranked(dt); 4]);
        };
        let rank = qs.len();
        if !(rank == 3 || rank == 4) || ks.len() != rank || vs.len() != rank {
            bail!("Q, K and V must all have rank 3 or all rank 4, found ranks {rank}, {} and {}", ks.len(), vs.len());
        }
        let (b, hq, sq, hkv, skv, dk, dv) = if rank == 4 {
            (
                qs[0].clone(),
                Some(qs[1].clone()),
                qs[2].clone(),
                Some(ks[1].clone()),
                ks[2].clone(),
                Some(ks[3].clone()),
                Some(vs[3].clone()),
            )
        } else {
            let qh = cx.attrs.int("q_num_heads", 0)?;
            let kvh = cx.attrs.int("kv_num_heads", 0)?;
            if qh <= 0 || kvh <= 0 {
                bail!("3-D inputs need positive q_num_heads and kv_num_heads, found {qh} and {kvh}");
            }
            let kvh = kvh as usize;
            (
                qs[0].clone(),
                Some(Dim::Known(qh as u64)),
                qs[1].clone(),
                Some(Dim::Known(kvh as u64)),
                ks[1].clone(),
                dim_div(&ks[2], kvh),
                dim_div(&vs[2], kvh),
            )
        };
        let past = cx.opt_input(4).and_then(|t| t.shape.as_ref()).filter(|s| s.len() == 4);
        let total = match past {
            Some(p) => dim_add(&p[2], &skv),
            None => Some(skv),
        };
        let mut f = |d: Option<Dim>| d.unwrap_or_else(|| cx.fresh_dim());
        let (hq, hkv, dk, dv, total) = (f(hq), f(hkv), f(dk), f(dv), f(total));
        let y = if rank == 4 {
            vec![b.clone(), hq.clone(), sq.clone(), dv.clone()]
        } else {
            let hidden = f(dim_mul(&hq, &dv));
            vec![b.clone(), sq.clone(), hidden]
        };
        Ok(vec![
            TensorType::new(dt, y),
            TensorType::new(dt, vec![b.clone(), hkv.clone(), total.clone(), dk]),
            TensorType::new(dt, vec![b.clone(), hkv, total.clone(), dv]),
            TensorType::new(dt, vec![b, hq, sq, total]),
        ])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (q, k, v) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(q, "Q")?;
        let dt = q.dtype();
        if k.dtype() != dt || v.dtype() != dt {
            bail!("Q, K and V must have one element type, found {dt}, {} and {}", k.dtype(), v.dtype());
        }
        let rank = q.rank();
        if k.rank() != rank || v.rank() != rank {
            bail!("Q, K and V must have one rank, found {:?}, {:?} and {:?}", q.shape, k.shape, v.shape);
        }
        let (qh, kvh) = if rank == 3 {
            let qh = cx.attrs.int("q_num_heads", 0)?;
            let kvh = cx.attrs.int("kv_num_heads", 0)?;
            if qh <= 0 || kvh <= 0 {
                bail!("3-D inputs need positive q_num_heads and kv_num_heads, found {qh} and {kvh}");
            }
            (qh as usize, kvh as usize)
        } else {
            (0, 0)
        };
        let q4 = to_heads(q, qh, "Q")?;
        let k4 = to_heads(k, kvh, "K")?;
        let v4 = to_heads(v, kvh, "V")?;
        if k4.b != q4.b || v4.b != q4.b || v4.h != k4.h || v4.s != k4.s || k4.d != q4.d {
            bail!("Q {:?}, K {:?} and V {:?} have inconsistent shapes", q.shape, k.shape, v.shape);
        }
        let (b, hq, sq, dk, hkv, dv) = (q4.b, q4.h, q4.s, q4.d, k4.h, v4.d);
        if hkv == 0 || hq % hkv != 0 {
            bail!("the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})");
        }
        let (past_k, past_v) = (opt(inputs, 4), opt(inputs, 5));
        if past_k.is_some() != past_v.is_some() {
            bail!("past_key and past_value must be given together");
        }
        let past_len = past_k.map_or(0, |p| p.shape.get(2).copied().unwrap_or(0));
        let (t, present_k) = concat_seq(past_k, &k4, "past_key")?;
        let (tv, present_v) = concat_seq(past_v, &v4, "past_value")?;
        if tv != t {
            bail!("past_key and past_value have different sequence lengths");
        }
        let nonpad = match opt(inputs, 6) {
            None => None,
            Some(_) if past_k.is_some() => {
                bail!("nonpad_kv_seqlen cannot be combined with past_key/past_value")
            }
            Some(n) => {
                if !n.dtype().is_int() || n.len() != b {
                    bail!("nonpad_kv_seqlen must be {b} integers, found {} of shape {:?}", n.dtype(), n.shape);
                }
                Some(n.to_i64())
            }
        };
        let rnd = rounder(dt);
        let scale = match cx.attrs.get("scale") {
            Some(_) => cx.attrs.float("scale", 1.0)? as f64,
            None => 1.0 / (dk as f64).sqrt(),
        };
        let s = rnd(scale.sqrt());
        let qs: Vec<f64> = q4.data.iter().map(|&x| rnd(x * s)).collect();
        let ks: Vec<f64> = present_k.iter().map(|&x| rnd(x * s)).collect();

        let bias = attention_bias(cx, opt(inputs, 3), [b, hq, sq, t], past_len, nonpad.as_deref())?;

        // Q·Kᵀ (with GQA head sharing), softcap.
        let rep = hq / hkv;
        let n = checked_numel(&[b, hq, sq, t])?;
        let mut qk = vec![0.0; n];
        for bi in 0..b {
            for hi in 0..hq {
                let kh = bi * hkv + hi / rep;
                for i in 0..sq {
                    let qrow = &qs[((bi * hq + hi) * sq + i) * dk..][..dk];
                    for j in 0..t {
                        let krow = &ks[(kh * t + j) * dk..][..dk];
                        let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                        qk[((bi * hq + hi) * sq + i) * t + j] = rnd(dot);
                    }
                }
            }
        }
        let softcap = cx.attrs.float("softcap", 0.0)? as f64;
        if softcap > 0.0 {
            for x in qk.iter_mut() {
                *x = rnd(rnd(rnd(*x / softcap).tanh()) * softcap);
            }
        }
        let mode = cx.attrs.int("qk_matmul_output_mode", 0)?;
        let with_bias: Vec<f64> = qk.iter().zip(&bias).map(|(a, b)| rnd(a + b)).collect();
        let sm_dt = match cx.attrs.get("softmax_precision") {
            None => dt,
            Some(_) => {
                let code = cx.attrs.int("softmax_precision", 1)?;
                match DType::from_onnx_code(code) {
                    Some(d) if d.is_float() => d,
                    _ => bail!("softmax_precision {code} is not a float type"),
                }
            }
        };
        let sm_rnd = rounder(sm_dt);
        let mut probs = vec![0.0; n];
        for r in 0..n.checked_div(t).unwrap_or(0) {
            let (row, out) = (&with_bias[r * t..(r + 1) * t], &mut probs[r * t..(r + 1) * t]);
            if bias[r * t..(r + 1) * t].iter().all(|&x| x == f64::NEG_INFINITY) {
                continue; // a fully masked row attends nothing
            }
            softmax_row(row, out, sm_rnd, sm_dt == DType::BF16);
            for p in out.iter_mut() {
                *p = rnd(*p);
            }
        }
        let qk_out = match mode {
            0 | 1 => qk,
            2 => with_bias,
            3 => probs.clone(),
            m => bail!("qk_matmul_output_mode must be 0, 1, 2 or 3, found {m}"),
        };

        // P·V.
        let mut y = vec![0.0; checked_numel(&[b, hq, sq, dv])?];
        for bi in 0..b {
            for hi in 0..hq {
                let vh = bi * hkv + hi / rep;
                for i in 0..sq {
                    let prow = &probs[((bi * hq + hi) * sq + i) * t..][..t];
                    let yrow = &mut y[((bi * hq + hi) * sq + i) * dv..][..dv];
                    for (j, &p) in prow.iter().enumerate() {
                        if p == 0.0 {
                            continue;
                        }
                        let vrow = &present_v[(vh * t + j) * dv..][..dv];
                        for (o, &x) in yrow.iter_mut().zip(vrow) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
        let y = if rank == 3 {
            let mut out = vec![0.0; y.len()];
            for bi in 0..b {
                for hi in 0..hq {
                    for i in 0..sq {
                        let src = ((bi * hq + hi) * sq + i) * dv;
                        let dst = (bi * sq + i) * hq * dv + hi * dv;
                        out[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                    }
                }
            }
            Tensor::from_f64(dt, &[b, sq, hq * dv], out)
        } else {
            Tensor::from_f64(dt, &[b, hq, sq, dv], y)
        };
        Ok(vec![
            y,
            Tensor::from_f64(dt, &[b, hkv, t, dk], present_k),
            Tensor::from_f64(dt, &[b, hkv, t, dv], present_v),
            Tensor::from_f64(dt, &[b, hq, sq, t], qk_out),
        ])
    }
}

/// The additive attention bias `[B, Hq, Sq, T]`: mask, causal frontier, window, key padding.
fn attention_bias(
    cx: &EvalCx,
    mask: Option<&Tensor>,
    shape: [usize; 4],
    past_len: usize,
    nonpad: Option<&[i64]>,
) -> OpResult<Vec<f64>> {
    let [b, hq, sq, t] = shape;
    let n = checked_numel(&shape)?;
    let mut bias = vec![0.0; n];
    let ninf = f64::NEG_INFINITY;
    if let Some(m) = mask {
        if m.rank() == 0 || m.rank() > 4 {
            bail!("attn_mask must have rank 1 to 4, found shape {:?}", m.shape);
        }
        if !(m.dtype() == DType::Bool || m.dtype().is_float()) {
            bail!("attn_mask must be bool or float, found {}", m.dtype());
        }
        let ml = m.shape[m.rank() - 1];
        if ml > t {
            bail!("attn_mask's last dim {ml} exceeds the total key length {t}");
        }
        let mut padded = m.shape.clone();
        if let Some(l) = padded.last_mut() {
            *l = t;
        }
        if broadcast_shapes(&padded, &shape).as_deref() != Some(&shape[..]) {
            bail!("attn_mask shape {:?} does not broadcast to {:?}", m.shape, shape);
        }
        let is_bool = m.dtype() == DType::Bool;
        let mv = m.to_f64();
        for (o, pi) in broadcast_index(&padded, &shape).into_iter().enumerate() {
            let (row, j) = (pi / t, pi % t);
            bias[o] = if j >= ml {
                ninf
            } else {
                let x = mv[row * ml + j];
                if is_bool {
                    if x != 0.0 {
                        0.0
                    } else {
                        ninf
                    }
                } else {
                    x
                }
            };
        }
    }
    let causal = cx.attrs.int("is_causal", 0)? != 0;
    let left = cx.attrs.int("left_window_size", -1)?;
    let right = cx.attrs.int("right_window_size", -1)?;
    if left < -1 || right < -1 {
        bail!("window sizes must be -1 or nonnegative, found {left} and {right}");
    }
    let window = left >= 0 || right >= 0;
    if !(causal || window || nonpad.is_some()) {
        return Ok(bias);
    }
    for bi in 0..b {
        let offset = match nonpad {
            Some(np) if past_len == 0 => np[bi].saturating_sub(sq as i64),
            _ => past_len as i64,
        };
        for hi in 0..hq {
            for i in 0..sq {
                let row = &mut bias[((bi * hq + hi) * sq + i) * t..][..t];
                for (j, x) in row.iter_mut().enumerate() {
                    let diff = (i as i64).saturating_add(offset).saturating_sub(j as i64);
                    let masked = (causal && diff < 0)
                        || (left >= 0 && diff > left)
                        || (right >= 0 && diff.saturating_neg() > right)
                        || nonpad.is_some_and(|np| j as i64 >= np[bi]);
                    if masked {
                        *x += ninf;
                    }
                }
            }
        }
    }
    Ok(bias)
}

/// Softmax of one row into `out`, computed in the precision `rnd` rounds to; a row whose max is
/// -inf gives zeros. With `seq_sum` the denominator is accumulated with rounding at every step
/// (as a bfloat16 reduction does).
fn softmax_row(row: &[f64], out: &mut [f64], rnd: fn(f64) -> f64, seq_sum: bool) {
    let mut max = f64::NEG_INFINITY;
    for &x in row {
        let x = rnd(x);
        if x.is_nan() || max.is_nan() {
            max = f64::NAN;
        } else if x > max {
            max = x;
        }
    }
    let safe = if max == f64::NEG_INFINITY { 0.0 } else { max };
    let mut sum = 0.0;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = rnd(rnd(rnd(x) - safe).exp());
        sum = if seq_sum { rnd(sum + *o) } else { sum + *o };
    }
    let sum = if rnd(sum) == 0.0 { 1.0 } else { rnd(sum) };
    for o in out.iter_mut() {
        *o = rnd(*o / sum);
    }
}

/// `RotaryEmbedding` (opset 23): rotates the first `rotary_embedding_dim` features of each head
/// by the angles in `cos_cache`/`sin_cache` (looked up by `position_ids` when given), pairing
/// halves or, with `interleaved`, adjacent elements. Input `[B, H, S, D]` or `[B, S, H·D]`.
struct RotaryEmbedding;

impl OpDef for RotaryEmbedding {
    fn name(&self) -> &'static str {
        "RotaryEmbedding"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("X must be a float tensor, found {}", x.dtype);
        }
        if let Some(r) = x.rank() {
            if r != 3 && r != 4 {
                bail!("X must have rank 3 or 4, found rank {r}");
            }
        }
        same_as_input(cx, 0)
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, cos, sin) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        expect_float(x, "X")?;
        let pos = opt(inputs, 3);
        let (b, h, s, d, four) = match *x.shape.as_slice() {
            [b, h, s, d] => (b, h, s, d, true),
            [b, s, hidden] => {
                let nh = cx.attrs.int("num_heads", 0)?;
                if nh <= 0 || hidden % nh as usize != 0 {
                    bail!("3-D input needs num_heads dividing the hidden size {hidden}, found {nh}");
                }
                (b, nh as usize, s, hidden / nh as usize, false)
            }
            _ => bail!("X must have rank 3 or 4, found shape {:?}", x.shape),
        };
        let rd = match cx.attrs.int("rotary_embedding_dim", 0)? {
            0 => d,
            r if r > 0 && r as usize <= d && r % 2 == 0 => r as usize,
            r => bail!("rotary_embedding_dim {r} must be even and at most the head size {d}"),
        };
        let half = rd / 2;
        let interleaved = cx.attrs.int("interleaved", 0)? != 0;
        if cos.shape != sin.shape {
            bail!("cos_cache {:?} and sin_cache {:?} must have one shape", cos.shape, sin.shape);
        }
        if cos.shape.last() != Some(&half) {
            bail!("the caches' last dim must be rotary_embedding_dim/2 = {half}, found shape {:?}", cos.shape);
        }
        // Row of the caches for each (batch, position).
        let rows: Vec<usize> = match pos {
            Some(p) => {
                if !p.dtype().is_int() || p.shape != [b, s] {
                    bail!("position_ids must be integers of shape [{b}, {s}], found {} {:?}", p.dtype(), p.shape);
                }
                let max = if cos.rank() == 2 {
                    cos.shape[0]
                } else {
                    bail!("with position_ids the caches must be 2-D, found {:?}", cos.shape)
                };
                p.to_i64()
                    .into_iter()
                    .map(|i| {
                        if i >= 0 && (i as usize) < max {
                            Ok(i as usize)
                        } else {
                            bail!("position id {i} is out of range [0, {max})")
                        }
                    })
                    .collect::<OpResult<_>>()?
            }
            None => {
                if cos.shape != [b, s, half] {
                    bail!("without position_ids the caches must have shape [{b}, {s}, {half}], found {:?}", cos.shape);
                }
                (0..b * s).collect()
            }
        };
        let (cv, sv, xv) = (cos.to_f64(), sin.to_f64(), x.to_f64());
        let mut y = xv.clone();
        for bi in 0..b {
            for si in 0..s {
                let row = rows[bi * s + si] * half;
                let (c, sn) = (&cv[row..row + half], &sv[row..row + half]);
                for hi in 0..h {
                    let base = if four { ((bi * h + hi) * s + si) * d } else { (bi * s + si) * h * d + hi * d };
                    for i in 0..half {
                        let (a, bb) =
                            if interleaved { (base + 2 * i, base + 2 * i + 1) } else { (base + i, base + half + i) };
                        let (x1, x2) = (xv[a], xv[bb]);
                        y[a] = c[i] * x1 - sn[i] * x2;
                        y[bb] = sn[i] * x1 + c[i] * x2;
                    }
                }
            }
        }
        Ok(vec![Tensor::from_f64(x.dtype(), &x.shape, y)])
    }
}

/// `SwiGLU`: `Y = A · sigmoid(alpha · A) · B` for two tensors of one shape (no broadcasting).
struct SwiGLU;

impl OpDef for SwiGLU {
    fn name(&self) -> &'static str {
        "SwiGLU"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (a, b) = (cx.input(0)?, cx.input(1)?);
        if !a.dtype.is_float() || a.dtype != b.dtype {
            bail!("A and B must be float tensors of one type, found {} and {}", a.dtype, b.dtype);
        }
        same_as_input(cx, 0)
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_float(a, "A")?;
        if a.dtype() != b.dtype() || a.shape != b.shape {
            bail!(
                "A and B must have one type and shape, found {} {:?} and {} {:?}",
                a.dtype(),
                a.shape,
                b.dtype(),
                b.shape
            );
        }
        let alpha = cx.attrs.float("alpha", 1.0)? as f64;
        let rnd = rounder(a.dtype());
        let y =
            a.to_f64().into_iter().zip(b.to_f64()).map(|(x, g)| rnd(rnd(x * rnd(sigmoid(alpha * x))) * g)).collect();
        Ok(vec![Tensor::from_f64(a.dtype(), &a.shape, y)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::Attrs;
    use crate::graph::AttrView;

    fn cx(attrs: &Attrs) -> EvalCx<'_> {
        EvalCx { attrs: AttrView(attrs), num_outputs: 4, opset: 23, regions: &[], runner: &crate::graph::NoRegions }
    }

    #[test]
    fn attention_with_one_key_copies_its_value() {
        let a = Attrs::new();
        let q = Tensor::from_f32(&[1, 1, 2, 2], vec![1.0, 0.0, 0.0, 1.0]);
        let k = Tensor::from_f32(&[1, 1, 1, 2], vec![3.0, 4.0]);
        let v = Tensor::from_f32(&[1, 1, 1, 3], vec![5.0, 6.0, 7.0]);
        let out = Attention.eval(&cx(&a), &[Some(&q), Some(&k), Some(&v)]).unwrap();
        assert_eq!(out[0].shape, vec![1, 1, 2, 3]);
        assert_eq!(out[0].as_f32().unwrap(), &[5.0, 6.0, 7.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn causal_attention_masks_future_keys() {
        let mut a = Attrs::new();
        a.insert("is_causal".into(), crate::attr::Attr::Int(1));
        let q = Tensor::from_f32(&[1, 1, 2, 1], vec![1.0, 1.0]);
        let k = Tensor::from_f32(&[1, 1, 2, 1], vec![1.0, 1.0]);
        let v = Tensor::from_f32(&[1, 1, 2, 1], vec![2.0, 4.0]);
        let out = Attention.eval(&cx(&a), &[Some(&q), Some(&k), Some(&v)]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[2.0, 3.0]);
    }

    #[test]
    fn rotary_rotates_pairs() {
        let a = Attrs::new();
        let x = Tensor::from_f32(&[1, 1, 1, 2], vec![1.0, 0.0]);
        let cos = Tensor::from_f32(&[1, 1, 1], vec![0.0]);
        let sin = Tensor::from_f32(&[1, 1, 1], vec![1.0]);
        let out = RotaryEmbedding.eval(&cx(&a), &[Some(&x), Some(&cos), Some(&sin)]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[0.0, 1.0]);
    }
}
