//! Attention kernels: `softmax(Q·Kᵀ·scale + mask)·V` for one `Attention` op (4-D `[B, H, S, D]`
//! operands, optional additive mask, `is_causal`, grouped-query heads), with the layout
//! prologue of its fused group (head-split reshapes and transposes) folded into the loads.
//!
//! Per query row, the scores live in a local buffer of the key length (one per thread):
//! `scores[j] = scale·(q·k_j) + mask`; then the row max, `exp(scores - max)` in place and its
//! sum; the output row accumulates `p_j · v_j` (the head dim innermost, contiguous in V and
//! the output) and is scaled by `1/sum` at the end. With `is_causal` the key loops stop at
//! the diagonal (`j <= i`). The parallel loop runs over batch × heads.

use super::{b, LowerResult, Lowering};
use kiln_ir::graph::AttrView;
use kiln_ir::ir::{Module, OpId};
use kiln_ir::kernel::{BinOp, Idx, Local, RedOp, Stmt, UnOp, Val};
use kiln_ir::Dim;

/// The output shape `[B, Hq, S, Dv]` of Attention op `att`, from its operands (the graph's
/// result type may carry a symbol no operand binds; these are the sizes it computes).
pub(super) fn output_shape(m: &Module, att: OpId) -> LowerResult<Vec<Dim>> {
    let op = m.op(att);
    let q = op.operands.first().copied().flatten().ok_or("Attention without Q")?;
    let v = op.operands.get(2).copied().flatten().ok_or("Attention without V")?;
    let shape = |x| m.value(x).ty.shape.clone().ok_or("Attention operands of unknown rank");
    let (qs, vs) = (shape(q)?, shape(v)?);
    if qs.len() != 4 || vs.len() != 4 {
        return Err("Attention on 3-D inputs is not lowered yet (4-D [B, H, S, D] only)".into());
    }
    Ok(vec![qs[0].clone(), qs[1].clone(), qs[2].clone(), vs[3].clone()])
}

/// The local buffers (numbered from `locals_at`) and loop nest of Attention op `att` storing
/// into buffer `out`.
pub(super) fn body(lw: &Lowering, att: OpId, out: usize, locals_at: usize) -> LowerResult<(Vec<Local>, Vec<Stmt>)> {
    let op = lw.m.op(att);
    let attrs = AttrView(&op.attrs);
    let operand = |i: usize| op.operands.get(i).copied().flatten();
    if (4..op.operands.len()).any(|i| operand(i).is_some()) {
        return Err("Attention with a KV cache or nonpad lengths is not lowered yet".into());
    }
    if attrs.float("softcap", 0.0).map_err(|e| e.0)? != 0.0 {
        return Err("Attention with softcap is not lowered yet".into());
    }
    if attrs.int("qk_matmul_output_mode", 0).map_err(|e| e.0)? != 0 {
        return Err("Attention returning its QK matrix is not lowered yet".into());
    }
    let (q, k, v) = (operand(0).ok_or("no Q")?, operand(1).ok_or("no K")?, operand(2).ok_or("no V")?);
    let (qs, ks, vs) = (lw.shape(q)?.to_vec(), lw.shape(k)?.to_vec(), lw.shape(v)?.to_vec());
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        return Err("Attention on 3-D inputs is not lowered yet (4-D [B, H, S, D] only)".into());
    }
    let head_dim = qs[3].known().ok_or("Attention with a symbolic head size")?;
    let scale = attrs.float("scale", 1.0 / (head_dim as f32).sqrt()).map_err(|e| e.0)? as f64;
    // Extents: B·Hq rows of heads, S queries, T keys, D and Dv.
    let (hq, hkv) = (lw.dim(&qs[1])?, lw.dim(&ks[1])?);
    let (s, t, d, dv) = (lw.dim(&qs[2])?, lw.dim(&ks[2])?, lw.dim(&qs[3])?, lw.dim(&vs[3])?);
    let heads = Idx::Mul(b(lw.dim(&qs[0])?), b(hq.clone()));
    let (bh, i) = (Idx::Var(0), Idx::Var(1));
    let batch = Idx::Div(b(bh.clone()), b(hq.clone()));
    let head = Idx::Rem(b(bh), b(hq.clone()));
    // Grouped-query attention: query head h reads key/value head h / (Hq / Hkv).
    let kv_head = if qs[1] == ks[1] { head.clone() } else { Idx::Div(b(head.clone()), b(Idx::Div(b(hq), b(hkv)))) };
    if attrs.int("left_window_size", -1).map_err(|e| e.0)? >= 0
        || attrs.int("right_window_size", -1).map_err(|e| e.0)? >= 0
    {
        return Err("Attention with a sliding window is not lowered yet".into());
    }
    // Causal (without a cache): key j takes part iff j <= i, so the key loops stop at i + 1,
    // which stays within the keys when S <= T.
    let keys = if attrs.int("is_causal", 0).map_err(|e| e.0)? != 0 {
        match (&qs[2], &ks[2]) {
            (a, c) if a == c => {}
            (Dim::Known(a), Dim::Known(c)) if c >= a => {}
            _ => return Err("causal Attention whose key length may be shorter than the query length".into()),
        }
        Idx::Add(b(i.clone()), b(Idx::Const(1)))
    } else {
        t.clone()
    };
    let scores = locals_at;
    let (j, jd, dz, ja, da, df) = (2, 3, 4, 5, 6, 7);
    // scores[j] = scale · Σ_d q[d]·k_j[d] + mask
    let dot_var = lw.fresh_var();
    let qk = Val::Reduce {
        op: RedOp::Sum,
        var: dot_var,
        extent: d.clone(),
        body: Box::new(Val::Bin(
            BinOp::Mul,
            Box::new(lw.value(q, &[batch.clone(), head.clone(), i.clone(), Idx::Var(dot_var)])?),
            Box::new(lw.value(k, &[batch.clone(), kv_head.clone(), Idx::Var(j), Idx::Var(dot_var)])?),
        )),
    };
    let mut score = Val::Bin(BinOp::Mul, Box::new(qk), Box::new(Val::Const(scale)));
    if let Some(mask) = operand(3) {
        let full = [qs[0].clone(), qs[1].clone(), qs[2].clone(), ks[2].clone()];
        let at = [batch.clone(), head.clone(), i.clone(), Idx::Var(j)];
        let ix = lw.broadcast(&at, &full, lw.shape(mask)?)?;
        score = Val::Bin(BinOp::Add, Box::new(score), Box::new(lw.value(mask, &ix)?));
    }
    let row = |var: usize| Val::Load { buf: scores, index: vec![Idx::Var(var)] };
    let (max_var, sum_var) = (lw.fresh_var(), lw.fresh_var());
    let out_at = |var: usize| vec![batch.clone(), head.clone(), i.clone(), Idx::Var(var)];
    let out_val = |var: usize| Val::Load { buf: out, index: out_at(var) };
    let per_query = vec![
        Stmt::For {
            var: j,
            extent: keys.clone(),
            parallel: false,
            body: vec![Stmt::Store { buf: scores, index: vec![Idx::Var(j)], value: score }],
        },
        Stmt::Let {
            slot: 0,
            value: Val::Reduce { op: RedOp::Max, var: max_var, extent: keys.clone(), body: Box::new(row(max_var)) },
        },
        Stmt::For {
            var: jd,
            extent: keys.clone(),
            parallel: false,
            body: vec![Stmt::Store {
                buf: scores,
                index: vec![Idx::Var(jd)],
                value: Val::Un(UnOp::Exp, Box::new(Val::Bin(BinOp::Sub, Box::new(row(jd)), Box::new(Val::Scalar(0))))),
            }],
        },
        Stmt::Let {
            slot: 1,
            value: Val::Un(
                UnOp::Recip,
                Box::new(Val::Reduce {
                    op: RedOp::Sum,
                    var: sum_var,
                    extent: keys.clone(),
                    body: Box::new(row(sum_var)),
                }),
            ),
        },
        Stmt::For {
            var: dz,
            extent: dv.clone(),
            parallel: false,
            body: vec![Stmt::Store { buf: out, index: out_at(dz), value: Val::Const(0.0) }],
        },
        Stmt::For {
            var: ja,
            extent: keys,
            parallel: false,
            body: vec![Stmt::For {
                var: da,
                extent: dv.clone(),
                parallel: false,
                body: vec![Stmt::Store {
                    buf: out,
                    index: out_at(da),
                    value: Val::Bin(
                        BinOp::Add,
                        Box::new(out_val(da)),
                        Box::new(Val::Bin(
                            BinOp::Mul,
                            Box::new(row(ja)),
                            Box::new(lw.value(v, &[batch.clone(), kv_head.clone(), Idx::Var(ja), Idx::Var(da)])?),
                        )),
                    ),
                }],
            }],
        },
        Stmt::For {
            var: df,
            extent: dv,
            parallel: false,
            body: vec![Stmt::Store {
                buf: out,
                index: out_at(df),
                value: Val::Bin(BinOp::Mul, Box::new(out_val(df)), Box::new(Val::Scalar(1))),
            }],
        },
    ];
    let body = vec![Stmt::For {
        var: 0,
        extent: heads,
        parallel: true,
        body: vec![Stmt::For { var: 1, extent: s, parallel: false, body: per_query }],
    }];
    Ok((vec![Local { name: "scores".into(), size: vec![t] }], body))
}
